//! Manifest deltas: a new manifest described as changes to a base manifest the receiver
//! already holds, so that a small change costs a small message.
//!
//! Encoding, format 1 (all integers little-endian):
//!
//! ```text
//! "DPSD" u16 format=1 [32] base content root
//! u64 removed_count, removed_count × (u16 path_len, path)
//! u64 upsert_count,  upsert_count × entry
//! entry: u16 path_len, path, u8 kind (0 dir, 1 file, 2 symlink), u32 mode, i64 mtime,
//!        file:    u64 size, [32] BLAKE3 of the file, u32 op_count, op*
//!                 op: u8 0 copy,    u32 start, u32 count   (chunks start.. of the base
//!                                                          entry at the same path)
//!                     u8 1 literal, u32 n, n × ([32] chunk BLAKE3, u32 len)
//!        symlink: u16 target_len, target
//! ```
//!
//! Removed paths and upserted entries are each sorted by path bytes and unique; a path is
//! never both removed and upserted; every op has a count of at least 1 and two literal
//! ops never follow each other. The decoder accepts exactly what the encoder produces,
//! so `decode(encode(d)) == d` and `encode(decode(b)) == b`.
//!
//! A delta does not carry the new content root: whoever applies it compares the result's
//! [`Manifest::content_root`] with the root the owner signed, so a wrong base or a hostile
//! delta cannot produce a manifest that passes for the signed one.

use crate::ids::{ChunkId, ContentRoot, FileHash};
use crate::manifest::{Chunk, DecodeError, DecodeLimits, Entry, EntryKind, MAX_CHUNK_LEN, Manifest, Reader, Truncated};
use crate::path::{PathError, RelPath};

const MAGIC: &[u8; 4] = b"DPSD";
/// The delta encoding's version marker.
pub const DELTA_FORMAT_VERSION: u16 = 1;
/// Most chunks a delta may expand to (the chunks a 1 GiB full manifest could name): copy
/// ops repeat base ranges, so a small delta must not be able to build a huge manifest.
pub const MAX_APPLIED_CHUNKS: u64 = (1 << 30) / 36;

/// How a changed file's chunk list is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkOp {
    /// `count` chunks of the base entry at the same path, from index `start`.
    Copy { start: u32, count: u32 },
    /// Chunks given in full.
    Literal(Vec<Chunk>),
}

/// The kind of an added or changed entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeltaKind {
    Dir,
    File { size: u64, hash: FileHash, ops: Vec<ChunkOp> },
    Symlink { target: String },
}

/// An added or changed entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaEntry {
    pub path: RelPath,
    pub mode: u32,
    pub mtime_ns: i64,
    pub kind: DeltaKind,
}

/// A new manifest as changes to a base manifest named by its content root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestDelta {
    pub base: ContentRoot,
    pub removed: Vec<RelPath>,
    pub upserts: Vec<DeltaEntry>,
}

/// Why a delta was refused (when decoding it, or when applying it to its base).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeltaError {
    #[error("manifest delta is truncated")]
    Truncated,
    #[error("not a dpsync manifest delta (bad magic)")]
    BadMagic,
    #[error("manifest delta format {0} is not supported (this build reads format {DELTA_FORMAT_VERSION})")]
    UnsupportedFormat(u16),
    #[error("manifest delta has {count} entries; the limit is {limit}")]
    TooManyEntries { count: u64, limit: u64 },
    #[error("manifest delta path {index}: {source}")]
    Path { index: u64, source: PathError },
    #[error("manifest delta path {path:?} is out of order, duplicated, or both removed and changed")]
    NotSorted { path: String },
    #[error("manifest delta entry {path:?} has an unknown kind {kind}")]
    UnknownKind { path: String, kind: u8 },
    #[error("manifest delta entry {path:?} has an unknown chunk op {op}")]
    UnknownOp { path: String, op: u8 },
    #[error("manifest delta entry {path:?} has an empty or split chunk op")]
    BadOp { path: String },
    #[error("manifest delta entry {path:?} has a chunk of invalid length {len}")]
    BadChunkLength { path: String, len: u32 },
    #[error("manifest delta has {0} unexpected bytes after its last entry")]
    TrailingBytes(usize),
    #[error("manifest delta removes {path:?}, which the base does not have")]
    RemovedMissing { path: String },
    #[error("manifest delta copies chunks of {path:?} that the base does not have")]
    CopyOutOfRange { path: String },
    #[error("manifest delta expands to more than {MAX_APPLIED_CHUNKS} chunks")]
    TooManyChunks,
    #[error("manifest delta gives an invalid manifest: {0}")]
    Result(#[from] DecodeError),
}

impl ManifestDelta {
    /// The delta that turns `base` into `new`.
    pub fn between(base: &Manifest, new: &Manifest) -> Self {
        let (b, n) = (base.entries(), new.entries());
        let mut removed = Vec::new();
        let mut upserts = Vec::new();
        let (mut i, mut j) = (0, 0);
        while i < n.len() || j < b.len() {
            let ord = match (n.get(i), b.get(j)) {
                (Some(x), Some(y)) => x.path.as_str().as_bytes().cmp(y.path.as_str().as_bytes()),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, _) => std::cmp::Ordering::Greater,
            };
            match ord {
                std::cmp::Ordering::Less => {
                    upserts.push(delta_entry(&n[i], None));
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    removed.push(b[j].path.clone());
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    if n[i] != b[j] {
                        upserts.push(delta_entry(&n[i], Some(&b[j])));
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        Self { base: base.content_root(), removed, upserts }
    }

    /// The new manifest: `base` (whose content root the caller has matched with
    /// [`ManifestDelta::base`]) with the changes applied, validated as a decoder would.
    pub fn apply(&self, base: &Manifest) -> Result<Manifest, DeltaError> {
        let b = base.entries();
        // Counted before anything is built: copy ops may repeat a base range many times.
        let mut bound: u64 = b.iter().map(|e| e.chunks().len() as u64).sum();
        for u in &self.upserts {
            if let DeltaKind::File { ops, .. } = &u.kind {
                for op in ops {
                    bound = bound.saturating_add(match op {
                        ChunkOp::Copy { count, .. } => u64::from(*count),
                        ChunkOp::Literal(c) => c.len() as u64,
                    });
                }
            }
        }
        if bound > MAX_APPLIED_CHUNKS {
            return Err(DeltaError::TooManyChunks);
        }
        let mut out: Vec<Entry> = Vec::with_capacity(b.len() + self.upserts.len());
        let (mut j, mut r, mut u) = (0, 0, 0);
        loop {
            let next_base = b.get(j).map(|e| &e.path);
            let next_removed = self.removed.get(r);
            let next_upsert = self.upserts.get(u).map(|e| &e.path);
            // The smallest path among the three lists comes next.
            let Some(p) = [next_base, next_removed, next_upsert]
                .into_iter()
                .flatten()
                .min_by(|x, y| x.as_str().as_bytes().cmp(y.as_str().as_bytes()))
            else {
                break;
            };
            let p = p.as_str().as_bytes();
            let in_base = next_base.is_some_and(|x| x.as_str().as_bytes() == p);
            let is_removed = next_removed.is_some_and(|x| x.as_str().as_bytes() == p);
            let is_upsert = next_upsert.is_some_and(|x| x.as_str().as_bytes() == p);
            let old = in_base.then(|| &b[j]);
            if is_removed {
                if old.is_none() {
                    return Err(DeltaError::RemovedMissing { path: self.removed[r].to_string() });
                }
            } else if is_upsert {
                out.push(materialize(&self.upserts[u], old)?);
            } else if let Some(old) = old {
                out.push(old.clone());
            }
            j += usize::from(in_base);
            r += usize::from(is_removed);
            u += usize::from(is_upsert);
        }
        Ok(Manifest::new(out)?)
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.removed.len() * 32 + self.upserts.len() * 128);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&DELTA_FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(self.base.as_bytes());
        out.extend_from_slice(&(self.removed.len() as u64).to_le_bytes());
        for p in &self.removed {
            put_str16(&mut out, p.as_str());
        }
        out.extend_from_slice(&(self.upserts.len() as u64).to_le_bytes());
        for e in &self.upserts {
            put_str16(&mut out, e.path.as_str());
            out.push(match e.kind {
                DeltaKind::Dir => 0,
                DeltaKind::File { .. } => 1,
                DeltaKind::Symlink { .. } => 2,
            });
            out.extend_from_slice(&e.mode.to_le_bytes());
            out.extend_from_slice(&e.mtime_ns.to_le_bytes());
            match &e.kind {
                DeltaKind::Dir => {}
                DeltaKind::Symlink { target } => put_str16(&mut out, target),
                DeltaKind::File { size, hash, ops } => {
                    out.extend_from_slice(&size.to_le_bytes());
                    out.extend_from_slice(hash.as_bytes());
                    out.extend_from_slice(&(ops.len() as u32).to_le_bytes());
                    for op in ops {
                        match op {
                            ChunkOp::Copy { start, count } => {
                                out.push(0);
                                out.extend_from_slice(&start.to_le_bytes());
                                out.extend_from_slice(&count.to_le_bytes());
                            }
                            ChunkOp::Literal(chunks) => {
                                out.push(1);
                                out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
                                for c in chunks {
                                    out.extend_from_slice(c.id.as_bytes());
                                    out.extend_from_slice(&c.len.to_le_bytes());
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Decodes untrusted bytes. Counts are checked against the bytes left before anything
    /// is sized from them; `limits.max_entries` bounds removed and upserted paths.
    pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Self, DeltaError> {
        let mut r = Reader { b: bytes };
        if r.take(4)? != MAGIC {
            return Err(DeltaError::BadMagic);
        }
        let format = r.u16()?;
        if format != DELTA_FORMAT_VERSION {
            return Err(DeltaError::UnsupportedFormat(format));
        }
        let base = ContentRoot::from_bytes(r.array()?);
        let mut index = 0u64;
        let removed_count = r.u64()?;
        if removed_count > limits.max_entries {
            return Err(DeltaError::TooManyEntries { count: removed_count, limit: limits.max_entries });
        }
        // A removed path takes at least 3 bytes, an entry at least 15.
        let mut removed: Vec<RelPath> = Vec::with_capacity((removed_count as usize).min(r.b.len() / 3));
        for _ in 0..removed_count {
            let p = read_path(&mut r, index)?;
            index += 1;
            if removed.last().is_some_and(|prev| prev.as_str().as_bytes() >= p.as_str().as_bytes()) {
                return Err(DeltaError::NotSorted { path: p.to_string() });
            }
            removed.push(p);
        }
        let upsert_count = r.u64()?;
        if upsert_count > limits.max_entries {
            return Err(DeltaError::TooManyEntries { count: upsert_count, limit: limits.max_entries });
        }
        let mut upserts: Vec<DeltaEntry> = Vec::with_capacity((upsert_count as usize).min(r.b.len() / 15));
        for _ in 0..upsert_count {
            let path = read_path(&mut r, index)?;
            index += 1;
            if upserts.last().is_some_and(|prev| prev.path.as_str().as_bytes() >= path.as_str().as_bytes())
                || removed.binary_search_by(|x| x.as_str().as_bytes().cmp(path.as_str().as_bytes())).is_ok()
            {
                return Err(DeltaError::NotSorted { path: path.to_string() });
            }
            let kind_byte = r.u8()?;
            let mode = r.u32()?;
            let mtime_ns = r.i64()?;
            let kind = match kind_byte {
                0 => DeltaKind::Dir,
                1 => {
                    let size = r.u64()?;
                    let hash = FileHash::from_bytes(r.array()?);
                    let n = r.u32()? as usize;
                    // Each op takes at least 5 bytes.
                    let mut ops = Vec::with_capacity(n.min(r.b.len() / 5));
                    for _ in 0..n {
                        let bad = || DeltaError::BadOp { path: path.to_string() };
                        let op = match r.u8()? {
                            0 => {
                                let (start, count) = (r.u32()?, r.u32()?);
                                if count == 0 {
                                    return Err(bad());
                                }
                                ChunkOp::Copy { start, count }
                            }
                            1 => {
                                let c = r.u32()? as usize;
                                if c == 0 || matches!(ops.last(), Some(ChunkOp::Literal(_))) {
                                    return Err(bad());
                                }
                                if c > r.b.len() / 36 {
                                    return Err(DeltaError::Truncated);
                                }
                                let mut chunks = Vec::with_capacity(c);
                                for _ in 0..c {
                                    let id = ChunkId::from_bytes(r.array()?);
                                    let len = r.u32()?;
                                    if len == 0 || len > MAX_CHUNK_LEN {
                                        return Err(DeltaError::BadChunkLength { path: path.to_string(), len });
                                    }
                                    chunks.push(Chunk { id, len });
                                }
                                ChunkOp::Literal(chunks)
                            }
                            op => return Err(DeltaError::UnknownOp { path: path.to_string(), op }),
                        };
                        ops.push(op);
                    }
                    DeltaKind::File { size, hash, ops }
                }
                2 => {
                    let tlen = r.u16()? as usize;
                    let target = std::str::from_utf8(r.take(tlen)?)
                        .map_err(|_| DeltaError::Path {
                            index,
                            source: PathError::SymlinkEscapes { link: path.to_string(), target: "<not UTF-8>".into() },
                        })?
                        .to_owned();
                    DeltaKind::Symlink { target }
                }
                kind => return Err(DeltaError::UnknownKind { path: path.to_string(), kind }),
            };
            upserts.push(DeltaEntry { path, mode, mtime_ns, kind });
        }
        if !r.b.is_empty() {
            return Err(DeltaError::TrailingBytes(r.b.len()));
        }
        Ok(Self { base, removed, upserts })
    }
}

/// An upserted entry with its chunk list built from `old` (the base entry at its path).
fn materialize(d: &DeltaEntry, old: Option<&Entry>) -> Result<Entry, DeltaError> {
    let kind = match &d.kind {
        DeltaKind::Dir => EntryKind::Dir,
        DeltaKind::Symlink { target } => EntryKind::Symlink { target: target.clone() },
        DeltaKind::File { size, hash, ops } => {
            let base_chunks = old.map(Entry::chunks).unwrap_or(&[]);
            let mut chunks = Vec::new();
            for op in ops {
                match op {
                    ChunkOp::Copy { start, count } => {
                        let (s, c) = (*start as usize, *count as usize);
                        let range = base_chunks
                            .get(s..s.saturating_add(c))
                            .ok_or_else(|| DeltaError::CopyOutOfRange { path: d.path.to_string() })?;
                        chunks.extend_from_slice(range);
                    }
                    ChunkOp::Literal(c) => chunks.extend_from_slice(c),
                }
            }
            EntryKind::File { size: *size, hash: *hash, chunks: chunks.into() }
        }
    };
    Ok(Entry { path: d.path.clone(), mode: d.mode, mtime_ns: d.mtime_ns, kind })
}

/// An added or changed entry; a changed file's chunks as runs of the old entry's chunks
/// (when `old` is a file) plus literal chunks.
fn delta_entry(new: &Entry, old: Option<&Entry>) -> DeltaEntry {
    let kind = match &new.kind {
        EntryKind::Dir => DeltaKind::Dir,
        EntryKind::Symlink { target } => DeltaKind::Symlink { target: target.clone() },
        EntryKind::File { size, hash, chunks } => {
            DeltaKind::File { size: *size, hash: *hash, ops: chunk_ops(old.map(Entry::chunks).unwrap_or(&[]), chunks) }
        }
    };
    DeltaEntry { path: new.path.clone(), mode: new.mode, mtime_ns: new.mtime_ns, kind }
}

/// `new` as copies of runs of `old` and literal chunks. A chunk found in `old` starts a
/// run at its first occurrence there, extended while both lists agree.
fn chunk_ops(old: &[Chunk], new: &[Chunk]) -> Vec<ChunkOp> {
    let mut first: std::collections::HashMap<Chunk, usize> = std::collections::HashMap::with_capacity(old.len());
    for (i, c) in old.iter().enumerate() {
        first.entry(*c).or_insert(i);
    }
    let mut ops = Vec::new();
    let mut i = 0;
    while i < new.len() {
        match first.get(&new[i]) {
            Some(&start) => {
                let mut n = 1;
                while i + n < new.len()
                    && start + n < old.len()
                    && new[i + n] == old[start + n]
                    && n < u32::MAX as usize
                {
                    n += 1;
                }
                ops.push(ChunkOp::Copy { start: start as u32, count: n as u32 });
                i += n;
            }
            None => {
                match ops.last_mut() {
                    Some(ChunkOp::Literal(l)) => l.push(new[i]),
                    _ => ops.push(ChunkOp::Literal(vec![new[i]])),
                }
                i += 1;
            }
        }
    }
    ops
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u16).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl From<Truncated> for DeltaError {
    fn from(_: Truncated) -> Self {
        DeltaError::Truncated
    }
}

fn read_path(r: &mut Reader<'_>, index: u64) -> Result<RelPath, DeltaError> {
    let len = r.u16()? as usize;
    RelPath::from_bytes(r.take(len)?).map_err(|source| DeltaError::Path { index, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(n: u8) -> Chunk {
        Chunk { id: ChunkId::from_bytes([n; 32]), len: 1000 }
    }

    #[test]
    fn an_insert_at_the_start_of_a_long_file_is_one_literal_and_one_copy() {
        let old: Vec<Chunk> = (0..200).map(chunk).collect();
        let mut new = old.clone();
        new[0] = Chunk { id: ChunkId::from_bytes([255; 32]), len: 1100 };
        let ops = chunk_ops(&old, &new);
        assert_eq!(ops, vec![ChunkOp::Literal(vec![new[0]]), ChunkOp::Copy { start: 1, count: 199 }]);
    }
}
