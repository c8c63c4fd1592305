//! Long commits through the real router on a loopback socket: the client asks for an early
//! `202 Accepted` (`Prefer: respond-async`), follows the commit with `GET …/commit` and
//! gets its outcome however long it takes, with the receiver's progress on the way; a
//! commit that stops making progress is given up (retryable); a sender that does not ask
//! (an older site) is answered when the commit is done, as before.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dpsync_hash::{ChunkId, Manifest, RelPath};
use dpsync_transfer::client::RejectReason;
use dpsync_transfer::client::{CommitPolls, TargetClient, TransferError};
use dpsync_transfer::service::{self, CommitStage, OfferMeta, ReceiveError, Receiver, ServedFile, ServiceConfig};
use dpsync_transfer::wire::{CommitResponse, PackageState, ValidateResponse};

const PKG: &str = "PS100001";

/// How a commit of [`Slow`] behaves.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// Counts `steps` files, one every `step`, then succeeds.
    Succeed { steps: u64, step: Duration },
    /// Counts `steps` files, then answers that a chunk is missing.
    Missing { steps: u64, step: Duration },
    /// Never ends and never moves.
    Hang,
}

/// A receiver whose commits take time and report how far they are.
#[derive(Debug)]
struct Slow {
    plan: Plan,
    commits_started: AtomicU64,
    done: AtomicU64,
}

fn unsupported() -> ReceiveError {
    ReceiveError::BadRequest("not in this test".into())
}

impl Receiver for Slow {
    async fn package_state(&self, _pkg: &str) -> Result<PackageState, ReceiveError> {
        Err(unsupported())
    }
    async fn offer(
        &self,
        _pkg: &str,
        _version: i64,
        _manifest: Arc<Manifest>,
        _force: bool,
        _meta: OfferMeta,
    ) -> Result<Vec<ChunkId>, ReceiveError> {
        Err(unsupported())
    }
    async fn store_chunks(
        &self,
        _pkg: &str,
        _version: i64,
        _chunks: Vec<(ChunkId, Bytes)>,
    ) -> Result<(), ReceiveError> {
        Err(unsupported())
    }
    async fn commit(&self, _pkg: &str, version: i64) -> Result<CommitResponse, ReceiveError> {
        self.commits_started.fetch_add(1, Ordering::Relaxed);
        let (steps, step) = match self.plan {
            Plan::Succeed { steps, step } | Plan::Missing { steps, step } => (steps, step),
            Plan::Hang => return std::future::pending().await,
        };
        for _ in 0..steps {
            tokio::time::sleep(step).await;
            self.done.fetch_add(1, Ordering::Relaxed);
        }
        if let Plan::Missing { .. } = self.plan {
            return Err(ReceiveError::Conflict {
                message: "1 chunk is missing".into(),
                missing: vec![ChunkId::from_bytes([7; 32])],
            });
        }
        Ok(CommitResponse {
            installed_version: version,
            content_root: "ab".repeat(32),
            files_built: steps,
            files_linked: 0,
        })
    }
    fn commit_progress(&self, _pkg: &str) -> Option<CommitStage> {
        let files_total = match self.plan {
            Plan::Succeed { steps, .. } | Plan::Missing { steps, .. } => steps,
            Plan::Hang => 0,
        };
        Some(CommitStage {
            phase: "building the version tree".into(),
            files_done: self.done.load(Ordering::Relaxed),
            files_total,
        })
    }
    async fn relabel(
        &self,
        _pkg: &str,
        _version: i64,
        _root: &str,
        _meta: OfferMeta,
    ) -> Result<CommitResponse, ReceiveError> {
        Err(unsupported())
    }
    async fn remove(&self, _pkg: &str) -> Result<(), ReceiveError> {
        Err(unsupported())
    }
    async fn validate(&self, _pkg: &str) -> Result<ValidateResponse, ReceiveError> {
        Err(unsupported())
    }
    async fn open_file(&self, _pkg: &str, _path: &RelPath) -> Result<ServedFile, ReceiveError> {
        Err(unsupported())
    }
    async fn status(&self, _pkg: &str) -> Result<serde_json::Value, ReceiveError> {
        Err(unsupported())
    }
    fn metrics(&self) -> String {
        String::new()
    }
}

async fn serve(plan: Plan) -> (SocketAddr, Arc<Slow>) {
    let receiver = Arc::new(Slow { plan, commits_started: AtomicU64::new(0), done: AtomicU64::new(0) });
    let cfg = ServiceConfig {
        token: Some("secret".into()),
        role: "dp",
        site_code: None,
        site_key: None,
        decode_limits: Default::default(),
    };
    let app = service::router(receiver.clone(), cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, receiver)
}

/// A client that asks for an early answer at once and polls every second at most.
fn client(addr: SocketAddr, stall: Duration) -> TargetClient {
    TargetClient::new("dp1", &format!("http://{addr}"), Some("secret".into()), None)
        .unwrap()
        .with_commit_polls(CommitPolls { first_wait: Duration::ZERO, poll_wait: Duration::from_secs(1), stall })
}

#[tokio::test]
async fn a_long_commit_is_followed_to_its_end_with_progress() {
    let (addr, receiver) = serve(Plan::Succeed { steps: 25, step: Duration::from_millis(100) }).await;
    let started = Instant::now();
    let mut reports = Vec::new();
    let r = client(addr, Duration::from_secs(60))
        .commit_reporting(PKG, 3, |p| reports.push((p.phase.clone(), p.files_done, p.files_total)))
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(2500), "answered before the commit ended");
    assert_eq!((r.installed_version, r.files_built), (3, 25));
    assert!(reports.len() >= 2, "progress was reported while it ran: {reports:?}");
    assert!(
        reports.iter().all(|(phase, _, total)| phase == "building the version tree" && *total == 25),
        "{reports:?}"
    );
    assert!(reports.windows(2).all(|w| w[0].1 <= w[1].1), "progress only grows: {reports:?}");
    assert_eq!(receiver.commits_started.load(Ordering::Relaxed), 1, "the polls followed one commit");
}

#[tokio::test]
async fn a_commit_error_reaches_the_sender_through_the_polls() {
    let (addr, _) = serve(Plan::Missing { steps: 15, step: Duration::from_millis(100) }).await;
    let err = client(addr, Duration::from_secs(60)).commit(PKG, 3).await.unwrap_err();
    match err {
        TransferError::Rejected { reason: RejectReason::MissingChunks(missing), .. } => {
            assert_eq!(missing, vec![ChunkId::from_bytes([7; 32])])
        }
        e => panic!("expected the missing chunk, got {e}"),
    }
}

#[tokio::test]
async fn a_commit_that_stops_moving_is_given_up_and_retried_later() {
    let (addr, _) = serve(Plan::Hang).await;
    let started = Instant::now();
    let err = client(addr, Duration::from_secs(2)).commit(PKG, 3).await.unwrap_err();
    assert!(matches!(err, TransferError::Timeout { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("made no progress"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
}

/// A sender that does not ask for an early answer (an older site) gets the outcome when
/// the commit is done; a poll of a commit the receiver does not know is `404`.
#[tokio::test]
async fn without_prefer_the_answer_waits_for_the_end() {
    let (addr, _) = serve(Plan::Succeed { steps: 10, step: Duration::from_millis(100) }).await;
    let http = reqwest::Client::new();
    let url = format!("http://{addr}/v1/packages/{PKG}/versions/4/commit");
    let unknown = http.get(&url).bearer_auth("secret").send().await.unwrap();
    assert_eq!(unknown.status(), reqwest::StatusCode::NOT_FOUND);
    let started = Instant::now();
    let resp = http.post(&url).bearer_auth("secret").send().await.unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(1000));
    let body: CommitResponse = resp.json().await.unwrap();
    assert_eq!(body.installed_version, 4);
    // The finished outcome stays available to a poll.
    let polled = http.get(&url).bearer_auth("secret").send().await.unwrap();
    assert_eq!(polled.status(), reqwest::StatusCode::OK);
}
