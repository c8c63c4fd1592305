//! The manifest: the full description of one source version, and its canonical
//! encoding.
//!
//! Encoding, format 1 (all integers little-endian):
//!
//! ```text
//! "DPSM" u16 format=1 u64 entry_count
//! entry*: u16 path_len, path (UTF-8), u8 kind (0 dir, 1 file, 2 symlink),
//!         u32 mode (permission bits), i64 mtime (ns since the epoch),
//!         file:    u64 size, [32] BLAKE3, u32 chunk_count, chunk_count × ([32] BLAKE3, u32 len)
//!         symlink: u16 target_len, target (UTF-8)
//! ```
//!
//! Entries are sorted by path bytes and unique; every entry's parent is a directory
//! entry that comes before it. The encoding is canonical: a decoder accepts exactly the
//! bytes the encoder produces, so `encode(decode(b)) == b`, and equal trees give equal
//! bytes and so an equal [`ContentRoot`].

use std::collections::{HashMap, HashSet};

use crate::ids::{ChunkId, ContentRoot, FileHash};
use crate::path::{self, PathError, RelPath};

const MAGIC: &[u8; 4] = b"DPSM";
/// The encoding's version marker.
pub const FORMAT_VERSION: u16 = 1;
const ROOT_CONTEXT: &str = "dpsync 2026-11 manifest content root v1";
/// Largest chunk a manifest may name (FastCDC's own ceiling).
pub const MAX_CHUNK_LEN: u32 = 16 << 20;

/// One content-defined piece of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Chunk {
    pub id: ChunkId,
    pub len: u32,
}

/// The chunks of a file, in order; derefs to `[Chunk]`. A single chunk (every file up
/// to the chunker's minimum size, so nearly every file of a tree of small files) is held
/// inline, more in a boxed slice of exactly their number: a decoded manifest then costs
/// no allocation per small file for its chunk list.
#[derive(Clone, Default)]
pub struct Chunks(ChunksRepr);

#[derive(Clone)]
enum ChunksRepr {
    One(Chunk),
    Many(Box<[Chunk]>),
}

impl Default for ChunksRepr {
    fn default() -> Self {
        ChunksRepr::Many(Box::default())
    }
}

impl Chunks {
    pub fn as_slice(&self) -> &[Chunk] {
        match &self.0 {
            ChunksRepr::One(c) => std::slice::from_ref(c),
            ChunksRepr::Many(b) => b,
        }
    }

    pub fn to_vec(&self) -> Vec<Chunk> {
        self.as_slice().to_vec()
    }
}

impl std::ops::Deref for Chunks {
    type Target = [Chunk];
    fn deref(&self) -> &[Chunk] {
        self.as_slice()
    }
}

impl std::ops::DerefMut for Chunks {
    fn deref_mut(&mut self) -> &mut [Chunk] {
        match &mut self.0 {
            ChunksRepr::One(c) => std::slice::from_mut(c),
            ChunksRepr::Many(b) => b,
        }
    }
}

impl From<Vec<Chunk>> for Chunks {
    fn from(v: Vec<Chunk>) -> Self {
        match v.as_slice() {
            [one] => Chunks(ChunksRepr::One(*one)),
            _ => Chunks(ChunksRepr::Many(v.into_boxed_slice())),
        }
    }
}

impl From<&[Chunk]> for Chunks {
    fn from(v: &[Chunk]) -> Self {
        match v {
            [one] => Chunks(ChunksRepr::One(*one)),
            _ => Chunks(ChunksRepr::Many(v.into())),
        }
    }
}

impl FromIterator<Chunk> for Chunks {
    fn from_iter<I: IntoIterator<Item = Chunk>>(iter: I) -> Self {
        iter.into_iter().collect::<Vec<_>>().into()
    }
}

impl<'a> IntoIterator for &'a Chunks {
    type Item = &'a Chunk;
    type IntoIter = std::slice::Iter<'a, Chunk>;
    fn into_iter(self) -> Self::IntoIter {
        self.as_slice().iter()
    }
}

impl PartialEq for Chunks {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl Eq for Chunks {}

impl PartialEq<Vec<Chunk>> for Chunks {
    fn eq(&self, other: &Vec<Chunk>) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl std::hash::Hash for Chunks {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.as_slice().hash(state)
    }
}

impl std::fmt::Debug for Chunks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Dir,
    File { size: u64, hash: FileHash, chunks: Chunks },
    Symlink { target: String },
}

/// One path in a source version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: RelPath,
    /// Permission bits only (`mode & 0o7777`).
    pub mode: u32,
    /// Modification time in nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    pub kind: EntryKind,
}

impl Entry {
    pub fn file_hash(&self) -> Option<FileHash> {
        match &self.kind {
            EntryKind::File { hash, .. } => Some(*hash),
            _ => None,
        }
    }
    pub fn size(&self) -> u64 {
        match &self.kind {
            EntryKind::File { size, .. } => *size,
            _ => 0,
        }
    }
    pub fn chunks(&self) -> &[Chunk] {
        match &self.kind {
            EntryKind::File { chunks, .. } => chunks,
            _ => &[],
        }
    }
    pub fn is_file(&self) -> bool {
        matches!(self.kind, EntryKind::File { .. })
    }
}

/// Bounds a decoder enforces on untrusted input.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    pub max_entries: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self { max_entries: 5_000_000 }
    }
}

/// Why a manifest was refused. Every variant that concerns an entry names its path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("manifest is truncated")]
    Truncated,
    #[error("not a dpsync manifest (bad magic)")]
    BadMagic,
    #[error("manifest format {0} is not supported (this build reads format {FORMAT_VERSION})")]
    UnsupportedFormat(u16),
    #[error("manifest has {count} entries; the limit is {limit}")]
    TooManyEntries { count: u64, limit: u64 },
    #[error("manifest entry {index}: {source}")]
    Path { index: u64, source: PathError },
    #[error("manifest entry {path:?} is out of order or duplicated")]
    NotSorted { path: String },
    #[error("manifest entry {path:?} has no directory entry for its parent")]
    MissingParent { path: String },
    #[error("manifest entry {path:?} has an unknown kind {kind}")]
    UnknownKind { path: String, kind: u8 },
    #[error("manifest entry {path:?} has invalid mode {mode:#o}")]
    BadMode { path: String, mode: u32 },
    #[error("manifest entry {path:?}: chunks add up to {chunks} bytes but the size is {size}")]
    ChunkSizeMismatch { path: String, chunks: u64, size: u64 },
    #[error("manifest entry {path:?} has a chunk of invalid length {len}")]
    BadChunkLength { path: String, len: u32 },
    #[error("manifest has {0} unexpected bytes after its last entry")]
    TrailingBytes(usize),
}

/// A validated, sorted manifest.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Manifest {
    entries: Vec<Entry>,
}

/// What changed between two manifests, by path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestDiff {
    pub added: Vec<RelPath>,
    pub changed: Vec<RelPath>,
    pub removed: Vec<RelPath>,
    pub unchanged: u64,
}

impl Manifest {
    /// Sorts `entries` and validates them as a decoder would.
    pub fn new(mut entries: Vec<Entry>) -> Result<Self, DecodeError> {
        entries.sort_by(|a, b| a.path.as_str().as_bytes().cmp(b.path.as_str().as_bytes()));
        let mut v = Validator::default();
        for e in &entries {
            v.check(e)?;
        }
        check_symlink_chains(&entries)?;
        Ok(Self { entries })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn into_entries(self) -> Vec<Entry> {
        self.entries
    }

    /// The entry at `path`, by binary search.
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries
            .binary_search_by(|e| e.path.as_str().as_bytes().cmp(path.as_bytes()))
            .ok()
            .map(|i| &self.entries[i])
    }

    pub fn files(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter().filter(|e| e.is_file())
    }

    /// Total bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files().map(Entry::size).sum()
    }

    /// The canonical encoding.
    pub fn encode(&self) -> Vec<u8> {
        let chunk_count: usize = self.entries.iter().map(|e| e.chunks().len()).sum();
        let mut out = Vec::with_capacity(14 + self.entries.len() * 96 + chunk_count * 36);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            let p = e.path.as_str().as_bytes();
            out.extend_from_slice(&(p.len() as u16).to_le_bytes());
            out.extend_from_slice(p);
            out.push(match e.kind {
                EntryKind::Dir => 0,
                EntryKind::File { .. } => 1,
                EntryKind::Symlink { .. } => 2,
            });
            out.extend_from_slice(&e.mode.to_le_bytes());
            out.extend_from_slice(&e.mtime_ns.to_le_bytes());
            match &e.kind {
                EntryKind::Dir => {}
                EntryKind::File { size, hash, chunks } => {
                    out.extend_from_slice(&size.to_le_bytes());
                    out.extend_from_slice(hash.as_bytes());
                    out.extend_from_slice(&(chunks.len() as u32).to_le_bytes());
                    for c in chunks {
                        out.extend_from_slice(c.id.as_bytes());
                        out.extend_from_slice(&c.len.to_le_bytes());
                    }
                }
                EntryKind::Symlink { target } => {
                    out.extend_from_slice(&(target.len() as u16).to_le_bytes());
                    out.extend_from_slice(target.as_bytes());
                }
            }
        }
        out
    }

    /// Decodes and validates untrusted bytes.
    pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<Self, DecodeError> {
        let mut r = Reader { b: bytes };
        let count = r.header()?;
        if count > limits.max_entries {
            return Err(DecodeError::TooManyEntries { count, limit: limits.max_entries });
        }
        // Each entry takes at least 15 bytes: never trust `count` for an allocation.
        let mut entries = Vec::with_capacity((count as usize).min(bytes.len() / 15));
        let mut v = Validator::default();
        for index in 0..count {
            let plen = r.u16()? as usize;
            let path = RelPath::from_bytes(r.take(plen)?).map_err(|source| DecodeError::Path { index, source })?;
            let kind_byte = r.u8()?;
            let mode = r.u32()?;
            let mtime_ns = r.i64()?;
            let kind = match kind_byte {
                0 => EntryKind::Dir,
                1 => {
                    let size = r.u64()?;
                    let hash = FileHash::from_bytes(r.array()?);
                    let n = r.u32()? as usize;
                    if n > r.b.len() / 36 {
                        return Err(DecodeError::Truncated);
                    }
                    let chunks = if n == 1 {
                        let id = ChunkId::from_bytes(r.array()?);
                        Chunks(ChunksRepr::One(Chunk { id, len: r.u32()? }))
                    } else {
                        let mut chunks = Vec::with_capacity(n);
                        for _ in 0..n {
                            let id = ChunkId::from_bytes(r.array()?);
                            chunks.push(Chunk { id, len: r.u32()? });
                        }
                        chunks.into()
                    };
                    EntryKind::File { size, hash, chunks }
                }
                2 => {
                    let tlen = r.u16()? as usize;
                    let target = std::str::from_utf8(r.take(tlen)?)
                        .map_err(|_| DecodeError::Path {
                            index,
                            source: PathError::SymlinkEscapes { link: path.to_string(), target: "<not UTF-8>".into() },
                        })?
                        .to_owned();
                    EntryKind::Symlink { target }
                }
                kind => {
                    return Err(DecodeError::UnknownKind { path: path.to_string(), kind });
                }
            };
            let entry = Entry { path, mode, mtime_ns, kind };
            v.check(&entry)?;
            entries.push(entry);
        }
        if !r.b.is_empty() {
            return Err(DecodeError::TrailingBytes(r.b.len()));
        }
        check_symlink_chains(&entries)?;
        Ok(Self { entries })
    }

    /// BLAKE3 in derive-key mode over the canonical encoding: equal content, equal root.
    pub fn content_root(&self) -> ContentRoot {
        Self::root_of_encoding(&self.encode())
    }

    /// The encoding and its content root, encoding once.
    pub fn encode_with_root(&self) -> (Vec<u8>, ContentRoot) {
        let encoded = self.encode();
        let root = Self::root_of_encoding(&encoded);
        (encoded, root)
    }

    /// The content root of an encoded manifest. The encoding is canonical, so for bytes
    /// that [`Manifest::decode`] accepts this is the decoded manifest's root.
    pub fn root_of_encoding(encoded: &[u8]) -> ContentRoot {
        let mut h = blake3::Hasher::new_derive_key(ROOT_CONTEXT);
        h.update(encoded);
        ContentRoot::from(h.finalize())
    }

    /// The file hashes of an encoded manifest, in entry order, read without building
    /// the manifest (a few bytes per file instead of a decoded entry each). It reads the
    /// structure only: for bytes that [`Manifest::decode`] accepts it equals the decoded
    /// manifest's `files()` hashes; meant for encodings this process stored itself.
    pub fn file_hashes_of_encoding(encoded: &[u8]) -> Result<Vec<FileHash>, DecodeError> {
        let mut r = Reader { b: encoded };
        let count = r.header()?;
        let mut out = Vec::new();
        for _ in 0..count {
            let plen = r.u16()? as usize;
            r.take(plen)?;
            let kind = r.u8()?;
            r.take(4 + 8)?;
            match kind {
                0 => {}
                1 => {
                    r.take(8)?;
                    out.push(FileHash::from_bytes(r.array()?));
                    let n = r.u32()? as usize;
                    r.take(n.checked_mul(36).ok_or(DecodeError::Truncated)?)?;
                }
                2 => {
                    let tlen = r.u16()? as usize;
                    r.take(tlen)?;
                }
                kind => return Err(DecodeError::UnknownKind { path: String::new(), kind }),
            }
        }
        if !r.b.is_empty() {
            return Err(DecodeError::TrailingBytes(r.b.len()));
        }
        Ok(out)
    }

    /// What changed from `old` to `self`. An entry is unchanged when kind, mode, mtime,
    /// size, hash and symlink target are all equal.
    pub fn diff(&self, old: &Manifest) -> ManifestDiff {
        let mut d = ManifestDiff::default();
        let (mut i, mut j) = (0, 0);
        let (new, old) = (&self.entries, &old.entries);
        while i < new.len() || j < old.len() {
            let ord = match (new.get(i), old.get(j)) {
                (Some(a), Some(b)) => a.path.as_str().as_bytes().cmp(b.path.as_str().as_bytes()),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, _) => std::cmp::Ordering::Greater,
            };
            match ord {
                std::cmp::Ordering::Less => {
                    d.added.push(new[i].path.clone());
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    d.removed.push(old[j].path.clone());
                    j += 1;
                }
                std::cmp::Ordering::Equal => {
                    if new[i] == old[j] {
                        d.unchanged += 1;
                    } else {
                        d.changed.push(new[i].path.clone());
                    }
                    i += 1;
                    j += 1;
                }
            }
        }
        d
    }
}

#[derive(Default)]
struct Validator {
    /// Position of the next entry in the sorted list, for `DecodeError::Path`.
    index: u64,
    prev: Option<RelPath>,
    dirs: HashSet<RelPath>,
}

impl Validator {
    fn check(&mut self, e: &Entry) -> Result<(), DecodeError> {
        let p = e.path.as_str();
        if let Some(prev) = &self.prev
            && prev.as_str().as_bytes() >= p.as_bytes()
        {
            return Err(DecodeError::NotSorted { path: p.to_owned() });
        }
        if let Some(parent) = e.path.parent()
            && !self.dirs.contains(&parent)
        {
            return Err(DecodeError::MissingParent { path: p.to_owned() });
        }
        if e.mode > 0o7777 {
            return Err(DecodeError::BadMode { path: p.to_owned(), mode: e.mode });
        }
        match &e.kind {
            EntryKind::Dir => {
                self.dirs.insert(e.path.clone());
            }
            EntryKind::File { size, chunks, .. } => {
                let mut sum = 0u64;
                for c in chunks {
                    if c.len == 0 || c.len > MAX_CHUNK_LEN {
                        return Err(DecodeError::BadChunkLength { path: p.to_owned(), len: c.len });
                    }
                    sum += c.len as u64;
                }
                if sum != *size {
                    return Err(DecodeError::ChunkSizeMismatch { path: p.to_owned(), chunks: sum, size: *size });
                }
            }
            EntryKind::Symlink { target } => {
                path::resolve_symlink(&e.path, target)
                    .map_err(|source| DecodeError::Path { index: self.index, source })?;
            }
        }
        self.prev = Some(e.path.clone());
        self.index += 1;
        Ok(())
    }
}

/// The package root in [`check_symlink_chains`]' folder tree (other nodes are entry indices).
const ROOT: usize = usize::MAX;

/// Where the kernel gets to while resolving a symlink target inside the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Walk {
    /// A folder of the tree (an entry index or [`ROOT`]).
    Dir(usize),
    /// The lookup ends inside the tree: at a file, a missing name, a symlink checked on
    /// its own, or a loop (which the kernel refuses).
    Stop,
    /// A `..` above the package root.
    Escapes,
    /// More than [`path::MAX_SYMLINK_NESTING`] symlinks nested.
    TooDeep,
}

#[derive(Debug, Clone, Copy)]
enum LinkState {
    InProgress,
    Done(Walk),
}

/// The folder tree of a validated, sorted entry list: folders and symlinks by (parent,
/// name), and each entry's parent folder.
struct Tree<'a> {
    entries: &'a [Entry],
    parent: Vec<usize>,
    children: HashMap<(usize, &'a str), usize>,
}

impl<'a> Tree<'a> {
    /// Resolves `target` from folder `start` the way the kernel does: `..` from the real
    /// folder reached so far, symlinks on the way followed (the last one only with
    /// `follow_last`).
    fn walk(
        &self,
        start: usize,
        target: &'a str,
        follow_last: bool,
        depth: usize,
        memo: &mut HashMap<usize, LinkState>,
    ) -> Walk {
        let mut cur = start;
        let mut parts = target.split('/').filter(|c| !c.is_empty() && *c != ".").peekable();
        while let Some(c) = parts.next() {
            if c == ".." {
                if cur == ROOT {
                    return Walk::Escapes;
                }
                cur = self.parent[cur];
                continue;
            }
            let last = parts.peek().is_none();
            let Some(&j) = self.children.get(&(cur, c)) else { return Walk::Stop };
            match &self.entries[j].kind {
                EntryKind::Dir => cur = j,
                EntryKind::Symlink { .. } if last && !follow_last => return Walk::Stop,
                EntryKind::Symlink { .. } => match self.link_as_dir(j, depth + 1, memo) {
                    Walk::Dir(d) => cur = d,
                    other => return other,
                },
                EntryKind::File { .. } => return Walk::Stop,
            }
        }
        Walk::Dir(cur)
    }

    /// Where the kernel gets to through symlink `j` used as a folder (memoised).
    fn link_as_dir(&self, j: usize, depth: usize, memo: &mut HashMap<usize, LinkState>) -> Walk {
        if depth > path::MAX_SYMLINK_NESTING {
            return Walk::TooDeep;
        }
        match memo.get(&j) {
            Some(LinkState::InProgress) => return Walk::Stop,
            Some(LinkState::Done(w)) => return *w,
            None => {}
        }
        let EntryKind::Symlink { target } = &self.entries[j].kind else { unreachable!("a symlink entry") };
        memo.insert(j, LinkState::InProgress);
        let w = self.walk(self.parent[j], target, true, depth, memo);
        memo.insert(j, LinkState::Done(w));
        w
    }
}

/// Refuses a symlink whose target, as the kernel resolves it through the other symlinks
/// of the manifest, climbs above the package root. Each link alone is checked lexically
/// ([`path::resolve_symlink`]); but after `s -> .`, the kernel reads `t -> s/../x` as the
/// root's parent, so a DP would install a working link out of its data directory. Runs
/// in time linear in the manifest (each link is resolved once, lookups by (folder, name)).
fn check_symlink_chains(entries: &[Entry]) -> Result<(), DecodeError> {
    if !entries.iter().any(|e| matches!(e.kind, EntryKind::Symlink { .. })) {
        return Ok(());
    }
    let mut dirs: HashMap<&str, usize> = HashMap::new();
    let mut tree = Tree { entries, parent: Vec::with_capacity(entries.len()), children: HashMap::new() };
    for (i, e) in entries.iter().enumerate() {
        let p = e.path.as_str();
        let (parent, name) = match p.rsplit_once('/') {
            // Validated: every parent is a folder entry that comes earlier.
            Some((dir, name)) => (dirs.get(dir).copied().unwrap_or(ROOT), name),
            None => (ROOT, p),
        };
        tree.parent.push(parent);
        match e.kind {
            EntryKind::Dir => {
                dirs.insert(p, i);
                tree.children.insert((parent, name), i);
            }
            EntryKind::Symlink { .. } => {
                tree.children.insert((parent, name), i);
            }
            EntryKind::File { .. } => {}
        }
    }
    let mut memo = HashMap::new();
    for (i, e) in entries.iter().enumerate() {
        let EntryKind::Symlink { target } = &e.kind else { continue };
        let source = match tree.walk(tree.parent[i], target, false, 0, &mut memo) {
            Walk::Dir(_) | Walk::Stop => continue,
            Walk::Escapes => PathError::SymlinkEscapes { link: e.path.to_string(), target: target.clone() },
            Walk::TooDeep => PathError::SymlinkChainTooLong { link: e.path.to_string() },
        };
        return Err(DecodeError::Path { index: i as u64, source });
    }
    Ok(())
}

/// Input ran out before a field was complete (shared by the manifest and delta decoders).
#[derive(Debug)]
pub(crate) struct Truncated;

impl From<Truncated> for DecodeError {
    fn from(_: Truncated) -> Self {
        DecodeError::Truncated
    }
}

/// Little-endian fields read off a byte slice, every length checked first.
pub(crate) struct Reader<'a> {
    pub(crate) b: &'a [u8],
}

impl<'a> Reader<'a> {
    /// The magic and format of a manifest encoding; returns its entry count.
    fn header(&mut self) -> Result<u64, DecodeError> {
        if self.take(4)? != MAGIC {
            return Err(DecodeError::BadMagic);
        }
        let format = self.u16()?;
        if format != FORMAT_VERSION {
            return Err(DecodeError::UnsupportedFormat(format));
        }
        Ok(self.u64()?)
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if self.b.len() < n {
            return Err(Truncated);
        }
        let (head, tail) = self.b.split_at(n);
        self.b = tail;
        Ok(head)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        Ok(self.take(N)?.try_into().expect("length checked"))
    }
    pub(crate) fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.take(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, Truncated> {
        self.array().map(u16::from_le_bytes)
    }
    pub(crate) fn u32(&mut self) -> Result<u32, Truncated> {
        self.array().map(u32::from_le_bytes)
    }
    pub(crate) fn u64(&mut self) -> Result<u64, Truncated> {
        self.array().map(u64::from_le_bytes)
    }
    pub(crate) fn i64(&mut self) -> Result<i64, Truncated> {
        self.array().map(i64::from_le_bytes)
    }
}
