//! Files written as their chunks arrive (blocking code, run on worker threads).
//!
//! The site sends the chunks a receiver lacks in manifest file order, so on a first
//! install most files can be written straight from the incoming batches: each byte is
//! written once, and the only hashing left here is the whole file's BLAKE3 (the service
//! already checked every chunk against its id). A file is planned this way when every
//! one of its chunks was asked for and no other file being built needs one of them
//! ([`Plan::new`]).
//!
//! A file being written is itself a staging pack (`staging/P/*.pack`): after each batch
//! it is made durable (one `syncfs` for the whole batch: the staging folder shares the
//! library's filesystem) and its chunks are recorded in `staged_chunks` with their offsets, so a
//! receiver killed mid-file keeps what it received and is not sent it again. Once
//! whole, its BLAKE3 is checked against the manifest and it is adopted into the library
//! (already durable: a rename); the caller then indexes its chunks and forgets its staged rows, and
//! commit finds the file in the library. A planned file whose chunk arrives out of order
//! is abandoned: what it holds stays an ordinary pack, the chunk goes to a pack, and
//! commit assembles the file from packs as for any other file (re-checking every chunk
//! as it reads it).
//!
//! **Architecture Invariant:** nothing is adopted that does not hash to the manifest's
//! BLAKE3 of the file; a pack's rows are recorded only after its bytes are durable.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use dpsync_hash::{ChunkId, FileHash, Manifest};
use dpsync_library::Library;

/// A chunk written to a pack: `(chunk, offset, len)`.
pub type PackRow = (ChunkId, u64, u32);

/// The files of one staged version that are written as their chunks arrive.
#[derive(Debug)]
pub struct Plan {
    version: i64,
    manifest: Arc<Manifest>,
    staging: PathBuf,
    /// Unique prefix of this plan's pack names.
    prefix: String,
    /// Every chunk of a planned file: (file slot, index of the chunk in the file).
    by_chunk: HashMap<ChunkId, (u32, u32)>,
    files: Vec<Slot>,
}

#[derive(Debug)]
struct Slot {
    /// Index of the file in `manifest.entries()`.
    entry: u32,
    state: State,
}

#[derive(Debug)]
enum State {
    Waiting,
    Writing(Box<Partial>),
    Done,
    Abandoned,
}

#[derive(Debug)]
struct Partial {
    pack: String,
    file: File,
    hasher: blake3::Hasher,
    /// Index of the next chunk the file needs.
    next: u32,
    len: u64,
    /// Rows written by the current batch, not yet fsync'd.
    unsynced: Vec<PackRow>,
}

/// A file adopted into the library during a batch.
#[derive(Debug)]
pub struct Adopted {
    /// The pack it was written as: its staged rows are to be forgotten.
    pub pack: String,
    pub hash: FileHash,
    /// Chunk index rows of the file: `(chunk, offset, len)`.
    pub chunks: Vec<PackRow>,
}

/// What one batch did.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Chunks appended to files still being written (or abandoned), durable now: per pack.
    pub staged: Vec<(String, Vec<PackRow>)>,
    pub adopted: Vec<Adopted>,
    /// Chunks that are not the next chunk of a planned file: for an ordinary pack.
    pub rest: Vec<(ChunkId, Bytes)>,
}

impl Plan {
    /// Plans the files of `manifest` the library lacks whose chunks are all in `missing`
    /// (the chunks the sender was asked for) and used by no other file being built.
    pub fn new(
        version: i64,
        manifest: Arc<Manifest>,
        missing: &[ChunkId],
        lib: &Library,
        staging: PathBuf,
        prefix: String,
    ) -> Self {
        let missing: HashSet<ChunkId> = missing.iter().copied().collect();
        let mut uses: HashMap<ChunkId, u32> = HashMap::new();
        let mut candidates = Vec::new();
        let mut seen = HashSet::new();
        for (i, e) in manifest.entries().iter().enumerate() {
            let Some(h) = e.file_hash() else { continue };
            if !seen.insert(h) || lib.contains(&h) {
                continue;
            }
            for c in e.chunks() {
                *uses.entry(c.id).or_default() += 1;
            }
            if !e.chunks().is_empty() && e.chunks().iter().all(|c| missing.contains(&c.id)) {
                candidates.push(i);
            }
        }
        let mut by_chunk = HashMap::new();
        let mut files = Vec::new();
        for i in candidates {
            let chunks = manifest.entries()[i].chunks();
            if chunks.iter().all(|c| uses[&c.id] == 1) {
                let slot = files.len() as u32;
                for (k, c) in chunks.iter().enumerate() {
                    by_chunk.insert(c.id, (slot, k as u32));
                }
                files.push(Slot { entry: i as u32, state: State::Waiting });
            }
        }
        by_chunk.shrink_to_fit();
        Self { version, manifest, staging, prefix, by_chunk, files }
    }

    /// The manifest of `version`, if this plan was made for it.
    pub fn manifest_of(&self, version: i64) -> Option<Arc<Manifest>> {
        (self.version == version).then(|| self.manifest.clone())
    }

    /// How many files are planned.
    pub fn len(&self) -> usize {
        self.files.len()
    }

    /// Writes each chunk that is the next chunk of a planned file to that file, adopts
    /// the files completed, fsyncs the others, and hands back the chunks that fit none.
    pub fn accept(&mut self, lib: &Library, version: i64, chunks: Vec<(ChunkId, Bytes)>) -> std::io::Result<Outcome> {
        let mut out = Outcome::default();
        if version != self.version {
            out.rest = chunks;
            return Ok(out);
        }
        let mut touched: Vec<u32> = Vec::new();
        let mut completed: Vec<(File, Adopted)> = Vec::new();
        let mut created = false;
        for (id, data) in chunks {
            let Some(&(slot, k)) = self.by_chunk.get(&id) else {
                out.rest.push((id, data));
                continue;
            };
            let entry = &self.manifest.entries()[self.files[slot as usize].entry as usize];
            let n = entry.chunks().len() as u32;
            let len_ok = data.len() == entry.chunks()[k as usize].len as usize;
            let s = &mut self.files[slot as usize];
            match &mut s.state {
                // Already in the library, or already written and recorded (a resent batch).
                State::Done => continue,
                State::Writing(p) if k < p.next && len_ok => continue,
                State::Waiting if k == 0 && len_ok => {
                    fs::create_dir_all(&self.staging)?;
                    let pack = format!("{}-{slot}.pack", self.prefix);
                    let file = fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(self.staging.join(&pack))?;
                    created = true;
                    s.state = State::Writing(Box::new(Partial {
                        pack,
                        file,
                        hasher: blake3::Hasher::new(),
                        next: 0,
                        len: 0,
                        unsynced: Vec::new(),
                    }));
                }
                State::Writing(p) if k == p.next && len_ok => {}
                _ => {
                    // Out of order: the file is built at commit from packs instead.
                    if let State::Writing(p) = std::mem::replace(&mut s.state, State::Abandoned) {
                        p.file.sync_data()?;
                        if !p.unsynced.is_empty() {
                            out.staged.push((p.pack, p.unsynced));
                        }
                    } else {
                        s.state = State::Abandoned;
                    }
                    out.rest.push((id, data));
                    continue;
                }
            }
            let State::Writing(p) = &mut s.state else { unreachable!("set above") };
            p.file.write_all(&data)?;
            p.hasher.update(&data);
            p.unsynced.push((id, p.len, data.len() as u32));
            p.len += data.len() as u64;
            p.next += 1;
            if p.next < n {
                if p.unsynced.len() == 1 {
                    touched.push(slot);
                }
                continue;
            }
            // Whole: adopt it when it hashes to the manifest's BLAKE3.
            let hash = entry.file_hash().expect("planned entries are files");
            let State::Writing(p) = std::mem::replace(&mut s.state, State::Done) else { unreachable!() };
            let Partial { pack, file, hasher, unsynced, .. } = *p;
            if FileHash::from(hasher.finalize()) != hash {
                // A manifest whose chunks do not make its file: commit reports it.
                file.sync_data()?;
                s.state = State::Abandoned;
                out.staged.push((pack, unsynced));
                continue;
            }
            let mut offset = 0u64;
            let chunks = entry
                .chunks()
                .iter()
                .map(|c| {
                    offset += c.len as u64;
                    (c.id, offset - c.len as u64, c.len)
                })
                .collect();
            completed.push((file, Adopted { pack, hash, chunks }));
        }
        // The batch's files (whole and partial) and the staging folder are made durable
        // together, with one `syncfs` of the filesystem they share with the library: one
        // flush for a batch of many small files instead of one per file.
        let partial: Vec<u32> = touched
            .into_iter()
            .filter(|slot| matches!(&self.files[*slot as usize].state, State::Writing(p) if !p.unsynced.is_empty()))
            .collect();
        if !completed.is_empty() || !partial.is_empty() || created {
            lib.sync_filesystem().map_err(std::io::Error::other)?;
        }
        for slot in partial {
            if let State::Writing(p) = &mut self.files[slot as usize].state {
                out.staged.push((p.pack.clone(), std::mem::take(&mut p.unsynced)));
            }
        }
        for (file, adopted) in completed {
            drop(file);
            lib.adopt_durable(&self.staging.join(&adopted.pack), &adopted.hash).map_err(std::io::Error::other)?;
            out.adopted.push(adopted);
        }
        if !out.adopted.is_empty() {
            lib.sync().map_err(std::io::Error::other)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpsync_hash::{ChunkParams, Entry, EntryKind, RelPath, digest_stream};

    fn bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 32);
        let mut n = 0u64;
        while out.len() < len {
            out.extend_from_slice(blake3::hash(&[seed.to_le_bytes(), n.to_le_bytes()].concat()).as_bytes());
            n += 1;
        }
        out.truncate(len);
        out
    }

    /// A manifest of `files`, and every chunk's bytes.
    fn version(files: &[(&str, &[u8])]) -> (Arc<Manifest>, HashMap<ChunkId, Bytes>) {
        let mut entries = Vec::new();
        let mut chunks = HashMap::new();
        for (path, data) in files {
            let d = digest_stream(*data, &mut std::io::sink(), &ChunkParams::default()).unwrap();
            let mut off = 0;
            for c in &d.chunks {
                chunks.insert(c.id, Bytes::copy_from_slice(&data[off..off + c.len as usize]));
                off += c.len as usize;
            }
            entries.push(Entry {
                path: RelPath::new(*path).unwrap(),
                mode: 0o644,
                mtime_ns: 0,
                kind: EntryKind::File { size: d.size, hash: d.hash, chunks: d.chunks.into() },
            });
        }
        (Arc::new(Manifest::new(entries).unwrap()), chunks)
    }

    fn ids(m: &Manifest, path: &str) -> Vec<ChunkId> {
        m.get(path).unwrap().chunks().iter().map(|c| c.id).collect()
    }

    #[test]
    fn in_order_files_are_adopted_and_the_others_go_to_packs() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::open(&dir.path().join("library")).unwrap();
        let a = bytes(1 << 20, 1);
        let mut b = a[..512 << 10].to_vec(); // shares its first chunks with `a`
        b.extend(bytes(512 << 10, 2));
        let c = bytes(1 << 20, 3);
        let d = bytes(1 << 20, 4);
        let (m, chunks) = version(&[("a", &a), ("b", &b), ("c", &c), ("d", &d)]);
        assert!(ids(&m, "c").len() >= 3);
        let mut missing: Vec<ChunkId> = Vec::new();
        for p in ["a", "b", "c", "d"] {
            for id in ids(&m, p) {
                if !missing.contains(&id) {
                    missing.push(id);
                }
            }
        }
        let staging = dir.path().join("staging");
        let mut plan = Plan::new(7, m.clone(), &missing, &lib, staging.clone(), "t".into());
        assert_eq!(plan.len(), 2, "a and b share chunks; c and d are planned");

        // d in order; c with its first two chunks swapped.
        let mut order = ids(&m, "d");
        let mut c_ids = ids(&m, "c");
        c_ids.swap(0, 1);
        order.extend(&c_ids);
        let batch = |ids: &[ChunkId]| ids.iter().map(|id| (*id, chunks[id].clone())).collect::<Vec<_>>();
        let half = order.len() / 2;
        let first = plan.accept(&lib, 7, batch(&order[..half])).unwrap();
        let second = plan.accept(&lib, 7, batch(&order[half..])).unwrap();
        let adopted: Vec<FileHash> = first.adopted.iter().chain(&second.adopted).map(|a| a.hash).collect();
        let d_hash = m.get("d").unwrap().file_hash().unwrap();
        assert_eq!(adopted, vec![d_hash]);
        assert!(lib.contains(&d_hash));
        assert_eq!(std::fs::read(lib.object_path(&d_hash)).unwrap(), d);
        // Every chunk of c reached a pack: none is written, none is lost.
        let rest: usize = first.rest.len() + second.rest.len();
        assert_eq!(rest, c_ids.len());
        // A batch for another version writes nothing.
        let other = plan.accept(&lib, 8, batch(&ids(&m, "a"))).unwrap();
        assert!(other.adopted.is_empty() && other.staged.is_empty());
        assert_eq!(other.rest.len(), ids(&m, "a").len());
    }

    #[test]
    fn a_file_spanning_batches_is_staged_until_whole() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::open(&dir.path().join("library")).unwrap();
        let data = bytes(2 << 20, 9);
        let (m, chunks) = version(&[("big", &data)]);
        let all = ids(&m, "big");
        assert!(all.len() >= 4);
        let staging = dir.path().join("staging");
        let mut plan = Plan::new(1, m.clone(), &all, &lib, staging.clone(), "t".into());
        let batch = |ids: &[ChunkId]| ids.iter().map(|id| (*id, chunks[id].clone())).collect::<Vec<_>>();
        let first = plan.accept(&lib, 1, batch(&all[..2])).unwrap();
        assert!(first.adopted.is_empty() && first.rest.is_empty());
        assert_eq!(first.staged.len(), 1);
        let (pack, rows) = &first.staged[0];
        assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), all[..2].to_vec());
        assert_eq!(rows[1].1, rows[0].2 as u64, "offsets follow the file");
        let on_disk = std::fs::read(staging.join(pack)).unwrap();
        assert!(data.starts_with(&on_disk) && !on_disk.is_empty());
        // A resent chunk already written is ignored.
        let again = plan.accept(&lib, 1, batch(&all[..1])).unwrap();
        assert!(again.staged.is_empty() && again.rest.is_empty());
        let last = plan.accept(&lib, 1, batch(&all[2..])).unwrap();
        assert_eq!(last.adopted.len(), 1);
        assert_eq!(&last.adopted[0].pack, pack);
        assert!(last.staged.is_empty(), "rows of an adopted file are not recorded");
        assert!(!staging.join(pack).exists());
        assert_eq!(std::fs::read(lib.object_path(&last.adopted[0].hash)).unwrap(), data);
    }
}
