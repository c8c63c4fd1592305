//! Chunks from other DPs: a pull DP fetches the chunks it lacks from the sources its
//! site names, with the site's ticket, and keeps only those whose BLAKE3 is the id it
//! asked for (ids that come from the manifest the owner signed). A source that fails,
//! is slow or sends a bad chunk is dropped for the rest of the pull and the next one in
//! rank order takes its place; what no source could give is answered as missing, and
//! the site sends it.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dpsync_hash::ChunkId;

use crate::client::TargetClient;
use crate::service::{ReceiveError, Receiver};
use crate::wire::{self, PeerSource, PullAnswer, PullRequest};

/// Chunk ids per request to a peer (its answer is capped at
/// [`wire::TARGET_BATCH_RAW_BYTES`]; what does not fit is asked again).
const IDS_PER_REQUEST: usize = 64;
/// Sources asked at the same time.
const AT_ONCE: usize = 3;
/// A peer that takes longer than this for one request is slow: the next one takes over.
const PEER_CALL_LIMIT: Duration = Duration::from_secs(30);
/// A peer that sends nothing for this long is given up.
const PEER_STALL: Duration = Duration::from_secs(10);

/// Chunk ids still to fetch, with the sources that were asked for them and lacked them.
struct Work {
    ids: Vec<ChunkId>,
    lacked_by: HashSet<usize>,
}

struct Pull<R> {
    receiver: Arc<R>,
    pkg: String,
    version: i64,
    ticket: String,
    queue: Mutex<VecDeque<Work>>,
    fetched: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
    dropped: Mutex<Vec<String>>,
    deadline: Instant,
}

/// Runs one pull (see the module docs) for at most the request's budget.
pub async fn pull<R: Receiver>(receiver: Arc<R>, pkg: &str, version: i64, req: PullRequest) -> PullAnswer {
    let budget = Duration::from_secs(req.budget_secs.clamp(1, 600));
    let queue: VecDeque<Work> =
        req.chunks.chunks(IDS_PER_REQUEST).map(|ids| Work { ids: ids.to_vec(), lacked_by: HashSet::new() }).collect();
    let p = Arc::new(Pull {
        receiver,
        pkg: pkg.to_owned(),
        version,
        ticket: req.ticket,
        queue: Mutex::new(queue),
        fetched: Default::default(),
        bytes: Default::default(),
        dropped: Mutex::default(),
        deadline: Instant::now() + budget,
    });
    let sources: Vec<(usize, PeerSource)> = req.sources.into_iter().enumerate().collect();
    let mut next = sources.iter();
    let mut running = tokio::task::JoinSet::new();
    for (i, s) in next.by_ref().take(AT_ONCE) {
        running.spawn(work(p.clone(), *i, s.clone()));
    }
    // A source that is dropped hands its place to the next one in rank order.
    while let Some(ended) = running.join_next().await {
        if matches!(ended, Ok(false))
            && let Some((i, s)) = next.next()
        {
            running.spawn(work(p.clone(), *i, s.clone()));
        }
    }
    let missing = p.queue.lock().unwrap().drain(..).flat_map(|w| w.ids).collect();
    let dropped = std::mem::take(&mut *p.dropped.lock().unwrap());
    PullAnswer {
        fetched: p.fetched.load(std::sync::atomic::Ordering::Relaxed),
        bytes_from_peers: p.bytes.load(std::sync::atomic::Ordering::Relaxed),
        missing,
        dropped,
    }
}

/// One source's worker: takes work it was not asked before until none is left or the
/// budget is spent (`true`), or the source is dropped (`false`).
async fn work<R: Receiver>(p: Arc<Pull<R>>, me: usize, source: PeerSource) -> bool {
    let client = match TargetClient::new(&source.name, &source.url, None, source.fingerprint.as_deref()) {
        Ok(c) => c.with_stall(PEER_STALL),
        Err(e) => {
            drop_source(&p, &source, &format!("cannot reach it: {e}"));
            return false;
        }
    };
    loop {
        if Instant::now() >= p.deadline {
            return true;
        }
        let Some(item) = take(&p, me) else { return true };
        let answer = tokio::time::timeout(PEER_CALL_LIMIT, client.peer_chunks(&p.pkg, &p.ticket, &item.ids)).await;
        let body = match answer {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => {
                give_back(&p, item);
                drop_source(&p, &source, &format!("it failed: {e}"));
                return false;
            }
            Err(_) => {
                give_back(&p, item);
                drop_source(&p, &source, &format!("it took over {} s for one batch", PEER_CALL_LIMIT.as_secs()));
                return false;
            }
        };
        p.bytes.fetch_add(body.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let wanted: HashSet<ChunkId> = item.ids.iter().copied().collect();
        let checked = tokio::task::spawn_blocking(move || verify(&body, &wanted)).await;
        let (good, bad) = match checked {
            Ok(r) => r,
            Err(e) => (Vec::new(), Some(format!("verification task: {e}"))),
        };
        let got: HashSet<ChunkId> = good.iter().map(|(id, _)| *id).collect();
        if !good.is_empty() {
            let n = good.len() as u64;
            let (r, pkg, version) = (p.receiver.clone(), p.pkg.clone(), p.version);
            // Its own task: a site that goes away does not cancel a store half-way.
            let stored = tokio::spawn(async move { r.store_chunks(&pkg, version, good).await })
                .await
                .unwrap_or_else(|e| Err(ReceiveError::Internal(format!("receiver task: {e}"))));
            if let Err(e) = stored {
                tracing::warn!(package = %p.pkg, "cannot keep chunks from peer {}: {e}", source.name);
                give_back(&p, item);
                return true;
            }
            p.fetched.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        let rest: Vec<ChunkId> = item.ids.into_iter().filter(|id| !got.contains(id)).collect();
        if let Some(why) = bad {
            give_back(&p, Work { ids: rest, lacked_by: item.lacked_by });
            drop_source(&p, &source, &format!("it sent a bad chunk ({why})"));
            return false;
        }
        if !rest.is_empty() {
            // Not held there (or over the answer's cap): another source may have them,
            // and this one is asked again only for the part over the cap.
            let mut lacked_by = item.lacked_by;
            if got.is_empty() {
                lacked_by.insert(me);
            }
            give_back(&p, Work { ids: rest, lacked_by });
        }
    }
}

/// The next work `me` was not asked for before.
fn take<R>(p: &Pull<R>, me: usize) -> Option<Work> {
    let mut q = p.queue.lock().unwrap();
    let at = q.iter().position(|w| !w.lacked_by.contains(&me))?;
    q.remove(at)
}

fn give_back<R>(p: &Pull<R>, w: Work) {
    if !w.ids.is_empty() {
        p.queue.lock().unwrap().push_front(w);
    }
}

fn drop_source<R>(p: &Pull<R>, source: &PeerSource, why: &str) {
    tracing::warn!(
        package = %p.pkg,
        version = p.version,
        peer = %source.name,
        "dropping peer {} for the rest of this transfer: {why}",
        source.name
    );
    p.dropped.lock().unwrap().push(source.name.clone());
}

/// The chunks of a peer's answer that are ones asked for and match their ids, and why
/// the answer is bad if anything in it is (a chunk that does not match, one not asked
/// for, a batch that does not decode).
fn verify(body: &Bytes, wanted: &HashSet<ChunkId>) -> (Vec<(ChunkId, Bytes)>, Option<String>) {
    let batch = match wire::decode_batch(body) {
        Ok(b) => b,
        Err(e) => return (Vec::new(), Some(format!("the batch does not decode: {e}"))),
    };
    let mut good = Vec::with_capacity(batch.len());
    for c in batch {
        if !wanted.contains(&c.id) {
            return (good, Some(format!("chunk {} was not asked for", c.id)));
        }
        match c.decode() {
            Ok(raw) if ChunkId::from(blake3::hash(&raw)) == c.id => good.push((c.id, raw)),
            _ => return (good, Some(format!("chunk {} does not match its BLAKE3", c.id))),
        }
    }
    (good, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::WireChunk;

    #[test]
    fn a_flipped_byte_or_a_chunk_not_asked_for_makes_the_answer_bad() {
        let a = Bytes::from(vec![7u8; 5000]);
        let b = Bytes::from(vec![9u8; 3000]);
        let (ia, ib) = (ChunkId::from(blake3::hash(&a)), ChunkId::from(blake3::hash(&b)));
        let body = wire::encode_batch(&[WireChunk::stored(ia, &a), WireChunk::stored(ib, &b)]);
        let both: HashSet<ChunkId> = [ia, ib].into();
        let (good, bad) = verify(&body, &both);
        assert_eq!((good.len(), bad), (2, None));

        let only_a: HashSet<ChunkId> = [ia].into();
        let (good, bad) = verify(&body, &only_a);
        assert_eq!(good.len(), 1);
        assert!(bad.unwrap().contains("not asked for"));

        let mut flipped = body.to_vec();
        let at = flipped.len() - 10;
        flipped[at] ^= 1;
        let (good, bad) = verify(&Bytes::from(flipped), &both);
        assert_eq!(good.len(), 1, "the first chunk is intact");
        assert!(bad.unwrap().contains("does not match"));
    }
}
