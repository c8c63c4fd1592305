//! Building a version on a DP (blocking code, run on worker threads): assemble the
//! files the library still lacks at commit (those not written as their chunks arrived,
//! see `arrival`) from verified chunks, build the version tree from the library, and
//! switch `current` to it atomically.
//!
//! **Architecture Invariant:** nothing reaches a version tree that was not checked
//! against its BLAKE3: every chunk is re-hashed as it is read, every assembled file as
//! it is written; the tree is built aside (a fresh directory, or the previous version's
//! tree renamed away before its first edit) and only a rename of the `current` symlink
//! makes it live.
//!
//! A tree costs no fsync per file: its files are hard links (to the library's object, or
//! to a copy made once per distinct content, mode and time) and copies written without a
//! flush of their own, and the whole tree, with the files assembled for it, is made
//! durable by one `syncfs` before the assembled files get their library names and
//! `current` is switched to it. Recycling the previous tree makes the cost follow the
//! change: only entries that differ between the two manifests are touched. A package of 200,000 identical files is 200,000 links to
//! a handful of inodes: a new copy is started whenever one reaches the filesystem's link
//! limit (`EMLINK`, 65,000 on ext4).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dpsync_hash::{ChunkId, Entry, EntryKind, FileHash, Manifest};
use dpsync_library::Library;
use dpsync_transfer::service::CommitStage;

/// Where a chunk can be read from.
#[derive(Debug, Clone)]
pub enum Source {
    Pack { path: PathBuf, offset: u64, len: u32 },
    Object { hash: FileHash, offset: u64, len: u32 },
}

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// Chunks with no source, or whose source failed verification (and was dropped).
    #[error("{} chunks are missing", .0.len())]
    Missing(Vec<ChunkId>),
    #[error("{0}")]
    BadManifest(String),
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl InstallError {
    pub fn is_disk_full(&self) -> bool {
        matches!(self, InstallError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> InstallError {
    let context = context.into();
    move |source| InstallError::Io { context, source }
}

/// What an install did.
#[derive(Debug, Default)]
pub struct Installed {
    pub dir: PathBuf,
    pub files_built: u64,
    pub files_linked: u64,
    pub bytes_built: u64,
    /// The files assembled (their chunks are to be indexed).
    pub built: Vec<FileHash>,
    /// Whether the tree was built by recycling the previous version's.
    pub recycled: bool,
    /// Entries a recycled tree kept as they were (nothing done for them).
    pub files_kept: u64,
    /// When the previous version's tree was consumed by this install (recycled, or
    /// removed after a failed attempt at recycling): the content whose links it dropped,
    /// the candidates for collection. `None`: that tree is still there.
    pub released: Option<Vec<FileHash>>,
    /// Milliseconds spent assembling files, placing the tree's entries, and making it
    /// durable (logged with the install).
    pub assemble_ms: u64,
    pub place_ms: u64,
    pub sync_ms: u64,
}

/// How far a build has come: read by the receiving service while a commit runs, so
/// that a long commit reports progress instead of looking hung.
#[derive(Debug, Default)]
pub struct BuildProgress {
    phase: AtomicU8,
    done: AtomicU64,
    total: AtomicU64,
}

impl BuildProgress {
    const ASSEMBLING: u8 = 1;
    const PLACING: u8 = 2;
    const SYNCING: u8 = 3;
    const RECORDING: u8 = 4;

    fn start(&self, phase: u8, total: u64) {
        self.done.store(0, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
        self.phase.store(phase, Ordering::Relaxed);
    }

    fn step(&self) {
        self.done.fetch_add(1, Ordering::Relaxed);
    }

    /// What the service shows the sender.
    pub fn stage(&self) -> CommitStage {
        let phase = match self.phase.load(Ordering::Relaxed) {
            Self::ASSEMBLING => "assembling files",
            Self::PLACING => "building the version tree",
            Self::SYNCING => "making the tree durable",
            Self::RECORDING => "recording the install",
            _ => "preparing",
        };
        CommitStage {
            phase: phase.into(),
            files_done: self.done.load(Ordering::Relaxed),
            files_total: self.total.load(Ordering::Relaxed),
        }
    }
}

/// The tree of the version before the live one (not live, about to fall out of
/// (current, previous)) and its manifest: the next install recycles it.
#[derive(Debug)]
pub struct Previous {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

/// Files assembled at commit that are not named in the library yet: written without a
/// flush of their own, made durable by the `syncfs` that also makes the tree durable,
/// and only then given their library names. A crash before that leaves files in the
/// library's `tmp/` (cleared at open), never an object whose bytes are not durable.
#[derive(Debug, Default)]
pub(crate) struct Pending {
    files: HashMap<FileHash, PathBuf>,
    /// Replace content already stored under the same hash (a forced repair).
    replace: bool,
}

impl Pending {
    /// Where the bytes of `hash` are: its assembled file, else the library's object.
    fn path(&self, lib: &Library, hash: &FileHash) -> PathBuf {
        self.files.get(hash).cloned().unwrap_or_else(|| lib.object_path(hash))
    }

    /// Names every file in the library; their bytes must be durable already. The renames
    /// are made durable too (`Library::sync`).
    fn name(&self, lib: &Library) -> Result<(), InstallError> {
        let lib_err = |e: dpsync_library::LibraryError| InstallError::Io {
            context: "library".into(),
            source: std::io::Error::other(e),
        };
        for (hash, tmp) in &self.files {
            lib.name_durable(tmp, hash, self.replace).map_err(lib_err)?;
        }
        lib.sync().map_err(lib_err)
    }

    /// Makes the files durable (one `syncfs`) and names them: for when no tree follows.
    fn sync_and_name(&self, lib: &Library) -> Result<(), InstallError> {
        if !self.files.is_empty() {
            lib.sync_filesystem()
                .map_err(|e| InstallError::Io { context: "library".into(), source: std::io::Error::other(e) })?;
        }
        self.name(lib)
    }

    fn discard(&self) {
        for tmp in self.files.values() {
            let _ = fs::remove_file(tmp);
        }
    }
}

/// Assembles every file of `manifest` that the library lacks (all of them with
/// `force`), then builds and switches to the version tree under `pkg_dir`: by recycling
/// `previous` when it is given and the difference is small (see [`recycle_tree`]),
/// else in a fresh folder.
#[allow(clippy::too_many_arguments)]
pub fn install(
    lib: &Library,
    pkg_dir: &Path,
    version: i64,
    manifest: &Manifest,
    sources: &HashMap<ChunkId, Source>,
    force: bool,
    previous: Option<Previous>,
    progress: &BuildProgress,
) -> Result<Installed, InstallError> {
    install_limited(lib, pkg_dir, version, manifest, sources, force, previous, progress, NO_LINK_LIMIT)
}

#[allow(clippy::too_many_arguments)]
fn install_limited(
    lib: &Library,
    pkg_dir: &Path,
    version: i64,
    manifest: &Manifest,
    sources: &HashMap<ChunkId, Source>,
    force: bool,
    previous: Option<Previous>,
    progress: &BuildProgress,
    link_limit: u64,
) -> Result<Installed, InstallError> {
    let clock = std::time::Instant::now();
    let (mut out, pending) = assemble_pending(lib, manifest, sources, force, progress)?;
    out.assemble_ms = clock.elapsed().as_millis() as u64;
    let built = place_and_switch(lib, pkg_dir, version, manifest, previous, &pending, progress, link_limit, &mut out);
    match built {
        Ok(()) => Ok(out),
        Err(e) => {
            pending.discard();
            Err(e)
        }
    }
}

/// Builds the tree (recycled or fresh), makes it and `pending` durable with one
/// `syncfs`, names `pending` in the library, and switches `current`.
#[allow(clippy::too_many_arguments)]
fn place_and_switch(
    lib: &Library,
    pkg_dir: &Path,
    version: i64,
    manifest: &Manifest,
    previous: Option<Previous>,
    pending: &Pending,
    progress: &BuildProgress,
    link_limit: u64,
    out: &mut Installed,
) -> Result<(), InstallError> {
    let clock = std::time::Instant::now();
    let versions = pkg_dir.join("versions");
    fs::create_dir_all(&versions).map_err(io(format!("creating {}", versions.display())))?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let name = format!("v{version}-{stamp:x}");
    let dir = versions.join(&name);
    let mut placed = None;
    if let Some(prev) = previous {
        match recycle_tree(lib, pending, &prev, &dir, manifest, progress, link_limit) {
            Ok(Some(r)) => placed = Some(r),
            Ok(None) => {}
            Err(e) => {
                // Half-edited: it goes like any stray tree, and with it every link it
                // held (its objects are candidates for collection).
                tracing::warn!(
                    dir = %prev.dir.display(),
                    "cannot recycle the previous version's tree, building afresh: {e}"
                );
                if let Err(err) = remove_tree(&dir) {
                    tracing::warn!(dir = %dir.display(), "cannot remove a half-recycled tree: {err}");
                }
                out.released = Some(prev.manifest.files().filter_map(|e| e.file_hash()).collect());
            }
        }
    }
    let linked = match placed {
        Some(r) => {
            out.recycled = true;
            out.files_kept = r.kept;
            out.released = Some(r.released);
            r.linked
        }
        None => {
            fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
            place_fresh(lib, pending, &dir, manifest, progress, link_limit)?
        }
    };
    out.files_linked = linked;
    out.place_ms = clock.elapsed().as_millis() as u64;
    // One flush for the whole tree (files copied, links, folders and their metadata) and
    // the files assembled for it, instead of one fsync per file or folder: on a tree of
    // many small files the per-file flushes were nearly all of the time.
    progress.start(BuildProgress::SYNCING, 0);
    let root = File::open(&dir).map_err(io(format!("opening {}", dir.display())))?;
    rustix::fs::syncfs(&root).map_err(|e| InstallError::Io {
        context: format!("syncing the filesystem of {}", dir.display()),
        source: e.into(),
    })?;
    // Durable now: the assembled files get their library names (before `current` is
    // switched, so that an install is never recorded with objects still unnamed).
    pending.name(lib)?;
    switch_current(pkg_dir, &format!("versions/{name}"))?;
    out.sync_ms = (clock.elapsed().as_millis() as u64).saturating_sub(out.place_ms);
    progress.start(BuildProgress::RECORDING, 0);
    out.dir = dir;
    Ok(())
}

/// Puts every file of `manifest` into the library, assembling those it lacks (all of
/// them with `force`) from verified chunks. Nothing is built when a chunk is missing.
pub fn assemble_missing(
    lib: &Library,
    manifest: &Manifest,
    sources: &HashMap<ChunkId, Source>,
    force: bool,
) -> Result<Installed, InstallError> {
    let (out, pending) = assemble_pending(lib, manifest, sources, force, &BuildProgress::default())?;
    if let Err(e) = pending.sync_and_name(lib) {
        pending.discard();
        return Err(e);
    }
    Ok(out)
}

/// Assembles the files the library lacks into temp files, verified but neither flushed
/// nor named. When some fail (a chunk that does not verify), those assembled are made
/// durable and named before the error is returned, so that a retry does not build them
/// again.
fn assemble_pending(
    lib: &Library,
    manifest: &Manifest,
    sources: &HashMap<ChunkId, Source>,
    force: bool,
    progress: &BuildProgress,
) -> Result<(Installed, Pending), InstallError> {
    let mut out = Installed::default();
    let mut pending = Pending { files: HashMap::new(), replace: force };
    let mut seen = std::collections::HashSet::new();
    let to_build: Vec<&Entry> = manifest
        .files()
        .filter(|e| {
            let h = e.file_hash().expect("files have hashes");
            seen.insert(h) && (force || !lib.contains(&h))
        })
        .collect();
    let mut missing: Vec<ChunkId> =
        to_build.iter().flat_map(|e| e.chunks()).map(|c| c.id).filter(|id| !sources.contains_key(id)).collect();
    missing.sort();
    missing.dedup();
    if !missing.is_empty() {
        return Err(InstallError::Missing(missing));
    }
    let mut readers = Readers::default();
    let mut bad = Vec::new();
    progress.start(BuildProgress::ASSEMBLING, to_build.len() as u64);
    for e in &to_build {
        progress.step();
        match assemble(lib, e, sources, &mut readers) {
            Ok(Ok((tmp, n))) => {
                let hash = e.file_hash().expect("files have hashes");
                out.files_built += 1;
                out.bytes_built += n;
                out.built.push(hash);
                pending.files.insert(hash, tmp);
            }
            Ok(Err(mut ids)) => bad.append(&mut ids),
            Err(err) => {
                pending.discard();
                return Err(err);
            }
        }
    }
    if !bad.is_empty() {
        bad.sort();
        bad.dedup();
        pending.sync_and_name(lib)?;
        return Err(InstallError::Missing(bad));
    }
    Ok((out, pending))
}

#[derive(Default)]
struct Readers {
    open: HashMap<PathBuf, File>,
}

impl Readers {
    fn read(&mut self, path: &Path, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        if !self.open.contains_key(path) {
            if self.open.len() > 64 {
                self.open.clear();
            }
            self.open.insert(path.to_owned(), File::open(path)?);
        }
        self.open[path].read_exact_at(buf, offset)
    }
}

/// Writes one file from its chunks into a temp file of the library, without a flush:
/// returns its path and size once its bytes hashed to the entry's BLAKE3 (the caller
/// makes it durable, then names it). `Ok(Err(ids))` names chunks whose source did not
/// verify.
///
/// Consecutive chunks that lie end to end in one source (a file rebuilt from its old
/// version is mostly such runs) are read with one `pread` of up to [`RUN_BYTES`] and
/// written straight from that buffer. Chunks from a staging pack are checked against
/// their ids as they are read; chunks from a library object (content verified when it
/// was stored) are covered by the whole file's BLAKE3, and are checked one by one only
/// when that fails, to name the damaged ones: a rebuilt file is hashed once, not twice.
fn assemble(
    lib: &Library,
    e: &Entry,
    sources: &HashMap<ChunkId, Source>,
    readers: &mut Readers,
) -> Result<Result<(PathBuf, u64), Vec<ChunkId>>, InstallError> {
    let EntryKind::File { hash, size, chunks } = &e.kind else { unreachable!("only files are assembled") };
    let tmp = lib.temp_path();
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(format!("creating {}", tmp.display())))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = Vec::new();
    let mut bad = Vec::new();
    let runs = source_runs(lib, chunks, sources);
    for run in &runs {
        buf.resize(run.len as usize, 0);
        if !run.exact || readers.read(&run.path, run.offset, &mut buf).is_err() {
            bad.extend(run.chunks.iter().map(|c| c.id));
            continue;
        }
        if run.from_pack {
            let failed = bad.len();
            bad.extend(chunks_not_matching(&buf, run.chunks));
            if bad.len() > failed {
                continue;
            }
        }
        if bad.is_empty() {
            hasher.update(&buf);
            file.write_all(&buf).map_err(io(format!("writing {}", tmp.display())))?;
        }
    }
    drop(file);
    if bad.is_empty() && FileHash::from(hasher.finalize()) != *hash {
        // Which chunk is wrong: a damaged library object, or a manifest whose chunks do
        // not make up its file.
        bad = damaged_object_chunks(readers, &runs, &mut buf);
        if bad.is_empty() {
            let _ = fs::remove_file(&tmp);
            return Err(InstallError::BadManifest(format!("{}: its chunks do not hash to the file's BLAKE3", e.path)));
        }
    }
    if !bad.is_empty() {
        let _ = fs::remove_file(&tmp);
        return Ok(Err(bad));
    }
    Ok(Ok((tmp, *size)))
}

/// The most a run of chunks read at once holds.
const RUN_BYTES: u64 = 4 << 20;

/// Chunks that lie end to end in one source file.
struct SourceRun<'a> {
    path: PathBuf,
    /// The source file, compared while grouping (its path is built once per run).
    file: SourceFile<'a>,
    offset: u64,
    len: u64,
    from_pack: bool,
    /// False for a chunk whose source's length is not the manifest's (it fails).
    exact: bool,
    chunks: &'a [dpsync_hash::Chunk],
}

#[derive(PartialEq, Eq)]
enum SourceFile<'a> {
    Pack(&'a Path),
    Object(&'a FileHash),
}

/// Groups `chunks` (every one with a source) into runs of at most [`RUN_BYTES`] (a chunk
/// larger than that is a run of its own). A chunk whose source length differs from the
/// manifest's is a run of its own, not `exact`.
fn source_runs<'a>(
    lib: &Library,
    chunks: &'a [dpsync_hash::Chunk],
    sources: &'a HashMap<ChunkId, Source>,
) -> Vec<SourceRun<'a>> {
    let mut runs: Vec<SourceRun<'a>> = Vec::new();
    let mut start = 0;
    for (i, c) in chunks.iter().enumerate() {
        let (file, offset, len) = match &sources[&c.id] {
            Source::Pack { path, offset, len } => (SourceFile::Pack(path), *offset, *len),
            Source::Object { hash, offset, len } => (SourceFile::Object(hash), *offset, *len),
        };
        let exact = len == c.len;
        if let Some(last) = runs.last_mut()
            && exact
            && last.exact
            && last.file == file
            && last.offset + last.len == offset
            && last.len + u64::from(len) <= RUN_BYTES
        {
            last.len += u64::from(len);
            last.chunks = &chunks[start..=i];
            continue;
        }
        start = i;
        let (path, from_pack) = match file {
            SourceFile::Pack(path) => (path.to_owned(), true),
            SourceFile::Object(hash) => (lib.object_path(hash), false),
        };
        runs.push(SourceRun { path, file, offset, len: u64::from(len), from_pack, exact, chunks: &chunks[i..=i] });
    }
    runs
}

/// Reads again the runs taken from library objects and names the chunks that do not hash
/// to their ids.
fn damaged_object_chunks(readers: &mut Readers, runs: &[SourceRun<'_>], buf: &mut Vec<u8>) -> Vec<ChunkId> {
    let mut bad = Vec::new();
    for run in runs.iter().filter(|r| !r.from_pack && r.exact) {
        buf.resize(run.len as usize, 0);
        if readers.read(&run.path, run.offset, buf).is_err() {
            bad.extend(run.chunks.iter().map(|c| c.id));
            continue;
        }
        bad.extend(chunks_not_matching(buf, run.chunks));
    }
    bad
}

/// The chunks of a run (its bytes in `buf`, end to end) whose bytes do not hash to their id.
fn chunks_not_matching(buf: &[u8], chunks: &[dpsync_hash::Chunk]) -> Vec<ChunkId> {
    let mut rest = buf;
    let mut bad = Vec::new();
    for c in chunks {
        let (piece, tail) = rest.split_at(c.len as usize);
        rest = tail;
        if ChunkId::from(blake3::hash(piece)) != c.id {
            bad.push(c.id);
        }
    }
    bad
}

pub(crate) fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// No link limit of our own: the filesystem's (`EMLINK`) decides.
const NO_LINK_LIMIT: u64 = u64::MAX;

/// Creates the tree in the empty folder `dir` and makes it durable with one `syncfs`;
/// returns how many files are hard links (to a library object or to a copy of one).
/// `link_limit` stands in for the filesystem's link limit in tests.
#[cfg(test)]
pub(crate) fn build_tree(
    lib: &Library,
    dir: &Path,
    manifest: &Manifest,
    progress: &BuildProgress,
    link_limit: u64,
) -> Result<u64, InstallError> {
    let linked = place_fresh(lib, &Pending::default(), dir, manifest, progress, link_limit)?;
    progress.start(BuildProgress::SYNCING, 0);
    rustix::fs::syncfs(File::open(dir).unwrap()).unwrap();
    Ok(linked)
}

/// Places every entry of `manifest` in the empty folder `dir` (not flushed); returns how
/// many files are hard links.
fn place_fresh(
    lib: &Library,
    pending: &Pending,
    dir: &Path,
    manifest: &Manifest,
    progress: &BuildProgress,
    link_limit: u64,
) -> Result<u64, InstallError> {
    let mut linked = 0;
    let mut dirs = Vec::new();
    let mut placer = Placer { lib, pending, link_limit, copies: HashMap::new() };
    progress.start(BuildProgress::PLACING, manifest.entries().len() as u64);
    for e in manifest.entries() {
        progress.step();
        // Paths are validated RelPaths whose parents are directory entries created
        // before them, so joining cannot leave `dir` or pass through a symlink.
        if placer.place_entry(dir, e)? {
            linked += 1;
        }
        if matches!(e.kind, EntryKind::Dir) {
            dirs.push(e);
        }
    }
    // Modes and times of directories last (deepest first: a folder's mode may forbid
    // writing into it).
    for e in dirs.iter().rev() {
        set_dir_metadata(&dir.join(e.path.as_str()), e)?;
    }
    Ok(linked)
}

fn set_dir_metadata(d: &Path, e: &Entry) -> Result<(), InstallError> {
    let f = File::open(d).map_err(io(format!("opening {}", d.display())))?;
    f.set_permissions(fs::Permissions::from_mode(e.mode)).map_err(io(format!("chmod {}", d.display())))?;
    f.set_modified(system_time(e.mtime_ns)).map_err(io(format!("setting the time of {}", d.display())))?;
    Ok(())
}

/// What recycling the previous tree did.
#[derive(Debug)]
struct Recycled {
    linked: u64,
    kept: u64,
    released: Vec<FileHash>,
}

/// Whether the tree's entry for `old` can stay as it is for `new` (same path). Folders
/// always can (their mode and time are set apart); a symlink's own mode and time are not
/// part of what a tree reproduces.
fn unchanged(old: &Entry, new: &Entry) -> bool {
    match (&old.kind, &new.kind) {
        (EntryKind::File { hash: a, .. }, EntryKind::File { hash: b, .. }) => {
            a == b && old.mode == new.mode && old.mtime_ns == new.mtime_ns
        }
        (EntryKind::Symlink { target: a }, EntryKind::Symlink { target: b }) => a == b,
        (EntryKind::Dir, EntryKind::Dir) => true,
        _ => false,
    }
}

fn parent_of(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..i])
}

/// Builds `manifest` at `dir` from the previous version's tree, in O(changed): renames
/// `prev.dir` to `dir` (made durable at once, so that a crash never leaves a half-edited
/// tree under the previous version's name), removes the entries that are gone or
/// changed, places those that are new or changed (same rules as a fresh tree), and puts
/// back the mode and time of every folder whose entries or metadata changed. Not
/// flushed: the caller's `syncfs` makes it durable before `current` is switched to it.
///
/// `Ok(None)`: nothing was touched because recycling would not pay (more than half the
/// paths differ, or the previous tree is not there). An error after the rename leaves a
/// half-edited tree at `dir`, which the caller removes before building afresh. Whatever
/// is touched is checked to be what the previous manifest says it is (kind; a folder
/// removed must be empty once its entries are), so a tree that does not match its
/// manifest is not silently built upon.
fn recycle_tree(
    lib: &Library,
    pending: &Pending,
    prev: &Previous,
    dir: &Path,
    manifest: &Manifest,
    progress: &BuildProgress,
    link_limit: u64,
) -> Result<Option<Recycled>, InstallError> {
    let old: HashMap<&str, &Entry> = prev.manifest.entries().iter().map(|e| (e.path.as_str(), e)).collect();
    let new: HashMap<&str, &Entry> = manifest.entries().iter().map(|e| (e.path.as_str(), e)).collect();
    // Sorted by path (manifest order), so a folder comes before what it holds.
    let removes: Vec<&Entry> =
        prev.manifest.entries().iter().filter(|o| new.get(o.path.as_str()).is_none_or(|n| !unchanged(o, n))).collect();
    let adds: Vec<&Entry> =
        manifest.entries().iter().filter(|n| old.get(n.path.as_str()).is_none_or(|o| !unchanged(o, n))).collect();
    let dir_meta: Vec<&Entry> = manifest
        .entries()
        .iter()
        .filter(|n| {
            matches!(n.kind, EntryKind::Dir)
                && old
                    .get(n.path.as_str())
                    .is_some_and(|o| matches!(o.kind, EntryKind::Dir) && (o.mode != n.mode || o.mtime_ns != n.mtime_ns))
        })
        .collect();
    let changed: HashSet<&str> = removes.iter().chain(&adds).map(|e| e.path.as_str()).collect();
    let paths = old.len() + new.len() - old.keys().filter(|p| new.contains_key(*p)).count();
    if changed.len() * 2 > paths || !prev.dir.is_dir() {
        return Ok(None);
    }
    let versions = dir.parent().expect("a version tree has a parent");
    fs::rename(&prev.dir, dir).map_err(io(format!("renaming {} to {}", prev.dir.display(), dir.display())))?;
    File::open(versions).and_then(|f| f.sync_all()).map_err(io(format!("syncing {}", versions.display())))?;

    progress.start(BuildProgress::PLACING, (removes.len() + adds.len()) as u64);
    // Folders whose entries change, and every old folder above them that an owner could
    // not write into or enter: made writable (0700 added) while editing.
    let mut touched: HashSet<&str> = HashSet::new();
    for e in removes.iter().chain(&adds) {
        touched.insert(parent_of(e.path.as_str()));
    }
    let mut unlocked: Vec<&Entry> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for t in &touched {
        let mut p = *t;
        while !p.is_empty() && seen.insert(p) {
            if let Some(o) = old.get(p).filter(|o| matches!(o.kind, EntryKind::Dir) && o.mode & 0o700 != 0o700) {
                unlocked.push(o);
            }
            p = parent_of(p);
        }
    }
    unlocked.sort_by(|a, b| a.path.as_str().cmp(b.path.as_str()));
    for o in &unlocked {
        let d = dir.join(o.path.as_str());
        let md = fs::symlink_metadata(&d).map_err(io(format!("reading {}", d.display())))?;
        if !md.is_dir() {
            return Err(mismatch(&d, "a folder"));
        }
        fs::set_permissions(&d, fs::Permissions::from_mode(o.mode | 0o700))
            .map_err(io(format!("chmod {}", d.display())))?;
    }

    // What is gone or changed, deepest first (a path sorts after its folder's).
    let mut released = Vec::new();
    for o in removes.iter().rev() {
        progress.step();
        let d = dir.join(o.path.as_str());
        let md = fs::symlink_metadata(&d).map_err(io(format!("reading {}", d.display())))?;
        match &o.kind {
            EntryKind::Dir if md.is_dir() => fs::remove_dir(&d).map_err(io(format!("removing {}", d.display())))?,
            EntryKind::File { hash, .. } if md.is_file() => {
                fs::remove_file(&d).map_err(io(format!("removing {}", d.display())))?;
                released.push(*hash);
            }
            EntryKind::Symlink { .. } if md.is_symlink() => {
                fs::remove_file(&d).map_err(io(format!("removing {}", d.display())))?
            }
            EntryKind::Dir => return Err(mismatch(&d, "a folder")),
            EntryKind::File { .. } => return Err(mismatch(&d, "a file")),
            EntryKind::Symlink { .. } => return Err(mismatch(&d, "a symlink")),
        }
    }
    // What is new or changed, folders before what they hold.
    let mut placer = Placer { lib, pending, link_limit, copies: HashMap::new() };
    let mut linked = 0;
    for e in &adds {
        progress.step();
        if placer.place_entry(dir, e)? {
            linked += 1;
        }
    }
    // Modes and times of the folders that changed or whose entries did, deepest first
    // (this also locks again the folders unlocked above).
    let mut restore: Vec<&Entry> = adds.iter().copied().filter(|e| matches!(e.kind, EntryKind::Dir)).collect();
    restore.extend(dir_meta);
    restore.extend(unlocked.iter().filter_map(|o| new.get(o.path.as_str()).copied()));
    restore.extend(touched.iter().filter_map(|t| new.get(t).copied()));
    restore.retain(|e| matches!(e.kind, EntryKind::Dir));
    restore.sort_by(|a, b| b.path.as_str().cmp(a.path.as_str()));
    restore.dedup_by(|a, b| a.path == b.path);
    for e in restore {
        set_dir_metadata(&dir.join(e.path.as_str()), e)?;
    }
    let kept = manifest.entries().len() as u64 - adds.len() as u64;
    Ok(Some(Recycled { linked, kept, released }))
}

fn mismatch(path: &Path, what: &str) -> InstallError {
    InstallError::Io {
        context: format!("{} in the previous version's tree", path.display()),
        source: std::io::Error::other(format!("not {what} as its manifest says")),
    }
}

/// An inode of this tree that entries with the same content, mode and time are linked to.
#[derive(Debug)]
struct Inode {
    path: PathBuf,
    links: u64,
}

/// Places the files of one tree.
#[derive(Debug)]
struct Placer<'a> {
    lib: &'a Library,
    /// Files assembled for this install and not named in the library yet.
    pending: &'a Pending,
    /// Links an inode may have (besides the filesystem's own limit).
    link_limit: u64,
    /// Copies made in this tree, by (content, mode, time): later entries with the same
    /// content and metadata are linked to them. Only content whose library object could
    /// not carry an entry gets one, so this holds no more than the copies made.
    copies: HashMap<(FileHash, u32, SystemTime), Inode>,
}

impl Placer<'_> {
    /// Creates the entry `e` under `dir`; returns whether it is a file placed as a link.
    fn place_entry(&mut self, dir: &Path, e: &Entry) -> Result<bool, InstallError> {
        let dest = dir.join(e.path.as_str());
        match &e.kind {
            EntryKind::Dir => fs::create_dir(&dest).map_err(io(format!("creating {}", dest.display())))?,
            EntryKind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &dest).map_err(io(format!("creating {}", dest.display())))?
            }
            EntryKind::File { hash, .. } => return self.place(hash, &dest, e.mode, system_time(e.mtime_ns)),
        }
        Ok(false)
    }

    /// Places one file at `dest`: a hard link to the library object when its inode can
    /// carry this entry's mode and time (no other link, or the same metadata) and has a
    /// link to spare; else a link to this tree's copy with that metadata; else a new copy
    /// (the first such entry, or the last copy is full). Returns whether it is a link.
    fn place(&mut self, hash: &FileHash, dest: &Path, mode: u32, mtime: SystemTime) -> Result<bool, InstallError> {
        let key = (*hash, mode, mtime);
        if let Some(inode) = self.copies.get_mut(&key) {
            if inode.links < self.link_limit && link(&inode.path, dest)? {
                inode.links += 1;
                return Ok(true);
            }
            copy_object(&self.pending.path(self.lib, hash), dest, mode, mtime)?;
            *inode = Inode { path: dest.to_owned(), links: 1 };
            return Ok(false);
        }
        let obj = self.pending.path(self.lib, hash);
        let md = fs::metadata(&obj).map_err(io(format!("library object {hash}")))?;
        let same = md.mode() & 0o7777 == mode && md.modified().ok() == Some(mtime);
        if (md.nlink() == 1 || same) && md.nlink() < self.link_limit {
            if !same {
                fs::set_permissions(&obj, fs::Permissions::from_mode(mode))
                    .map_err(io(format!("chmod {}", obj.display())))?;
                File::open(&obj)
                    .and_then(|f| f.set_modified(mtime))
                    .map_err(io(format!("setting the time of {}", obj.display())))?;
            }
            if link(&obj, dest)? {
                return Ok(true);
            }
        }
        copy_object(&obj, dest, mode, mtime)?;
        self.copies.insert(key, Inode { path: dest.to_owned(), links: 1 });
        Ok(false)
    }
}

/// Hard-links `src` at `dest`; `false` when `src` has all the links its filesystem allows
/// (or lies on another filesystem).
fn link(src: &Path, dest: &Path) -> Result<bool, InstallError> {
    match fs::hard_link(src, dest) {
        Ok(()) => Ok(true),
        // EXDEV: a library on another filesystem than the trees cannot be linked from.
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMLINK | libc::EXDEV)) => Ok(false),
        Err(e) => Err(io(format!("linking {}", dest.display()))(e)),
    }
}

/// Writes a new inode at `dest` with the bytes of `src` (a library object, or a file
/// assembled for it) and the entry's mode and time. Not flushed here: the tree is made
/// durable as a whole.
fn copy_object(src: &Path, dest: &Path, mode: u32, mtime: SystemTime) -> Result<(), InstallError> {
    let mut from = File::open(src).map_err(io(format!("opening {}", src.display())))?;
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(io(format!("creating {}", dest.display())))?;
    std::io::copy(&mut from, &mut to).map_err(io(format!("copying to {}", dest.display())))?;
    to.set_permissions(fs::Permissions::from_mode(mode)).map_err(io(format!("chmod {}", dest.display())))?;
    to.set_modified(mtime).map_err(io(format!("setting the time of {}", dest.display())))?;
    Ok(())
}

/// Points `pkg_dir/current` at `rel_target` with one rename: readers see the old tree
/// or the new one, never a mix.
pub fn switch_current(pkg_dir: &Path, rel_target: &str) -> Result<(), InstallError> {
    let tmp = pkg_dir.join("current.tmp");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(rel_target, &tmp).map_err(io(format!("creating {}", tmp.display())))?;
    fs::rename(&tmp, pkg_dir.join("current")).map_err(io("switching current"))?;
    File::open(pkg_dir).and_then(|f| f.sync_all()).map_err(io(format!("syncing {}", pkg_dir.display())))?;
    Ok(())
}

/// Removes a tree, making read-only directories writable first.
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in walkdir::WalkDir::new(dir).follow_links(false).into_iter().flatten() {
        if entry.file_type().is_dir() {
            let _ = fs::set_permissions(entry.path(), fs::Permissions::from_mode(0o700));
        }
    }
    fs::remove_dir_all(dir)
}

/// Removes library objects no tree links any more (link count 1) among `candidates`.
/// Returns the hashes removed.
///
/// Content a `kept` tree (its folder and manifest) still holds in a copy of its own (made
/// because the object's inode carried another mode or time) is not dropped: that copy
/// becomes the library's object instead, so the content stays known to later deltas and
/// installs without being stored twice.
pub fn collect_unlinked(
    lib: &Library,
    candidates: impl IntoIterator<Item = FileHash>,
    kept: &[(&Path, &Manifest)],
) -> Vec<FileHash> {
    let unlinked: HashSet<FileHash> =
        candidates.into_iter().filter(|h| fs::metadata(lib.object_path(h)).is_ok_and(|md| md.nlink() == 1)).collect();
    let mut holders: HashMap<FileHash, PathBuf> = HashMap::new();
    for (dir, manifest) in kept {
        for e in manifest.files() {
            if let Some(h) = e.file_hash().filter(|h| unlinked.contains(h)) {
                holders.entry(h).or_insert_with(|| dir.join(e.path.as_str()));
            }
        }
    }
    let mut removed = Vec::new();
    for h in unlinked {
        if let Some(holder) = holders.get(&h) {
            match lib.adopt_link(holder, &h) {
                Ok(()) => continue,
                Err(e) => tracing::warn!(object = %h, "cannot keep a tree's copy as the library object: {e}"),
            }
        }
        if lib.remove(&h).is_ok() {
            removed.push(h);
        }
    }
    if let Err(e) = lib.sync() {
        tracing::warn!("syncing the library: {e}");
    }
    removed
}

/// Appends verified chunks to a new pack file, durably. Returns `(id, offset, len)`.
/// Chunks are written from the received buffers as they are (no intermediate copy).
pub fn write_pack(path: &Path, chunks: &[(ChunkId, bytes::Bytes)]) -> std::io::Result<Vec<(ChunkId, u64, u32)>> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)?;
    }
    let mut file = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    let mut offset = 0u64;
    let mut out = Vec::with_capacity(chunks.len());
    for (id, data) in chunks {
        file.write_all(data)?;
        out.push((*id, offset, data.len() as u32));
        offset += data.len() as u64;
    }
    file.sync_all()?;
    if let Some(parent) = path.parent() {
        File::open(parent)?.sync_all()?;
    }
    Ok(out)
}

/// Opens an installed file without following a symlink at its last component.
pub fn open_nofollow(path: &Path) -> std::io::Result<File> {
    fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(path)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use dpsync_hash::{ChunkParams, RelPath};

    use super::*;

    fn file(path: &str, digest: &dpsync_hash::FileDigest, mode: u32, mtime_ns: i64) -> Entry {
        Entry {
            path: RelPath::new(path).unwrap(),
            mode,
            mtime_ns,
            kind: EntryKind::File { size: digest.size, hash: digest.hash, chunks: digest.chunks.clone().into() },
        }
    }

    /// With a link limit of 4 standing in for ext4's 65,000: 40 identical empty files
    /// (two mode/time variants) and a few copies of a small file are all placed, each
    /// with its own mode, time and bytes, and no inode ever gets more than 4 links.
    #[test]
    fn identical_files_past_the_link_limit_get_fresh_copies() {
        const LIMIT: u64 = 4;
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::open(&dir.path().join("library")).unwrap();
        let empty = lib.import(&b""[..], &ChunkParams::default()).unwrap().digest;
        let small = lib.import(&b"hello, tree"[..], &ChunkParams::default()).unwrap().digest;
        let mut entries =
            vec![Entry { path: RelPath::new("d").unwrap(), mode: 0o755, mtime_ns: 0, kind: EntryKind::Dir }];
        for i in 0..40 {
            // Half with the time of the first, half with another (a second variant).
            let mtime = if i % 2 == 0 { 1_000_000_000 } else { 2_000_000_000 };
            entries.push(file(&format!("d/e{i:02}"), &empty, 0o644, mtime));
        }
        for i in 0..6 {
            entries.push(file(&format!("s{i}"), &small, 0o600 + (i % 2) * 0o40, 3_000_000_000));
        }
        let manifest = Manifest::new(entries).unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir(&tree).unwrap();
        let progress = BuildProgress::default();
        let linked = build_tree(&lib, &tree, &manifest, &progress, LIMIT).unwrap();

        let mut inodes = HashSet::new();
        let mut copies = 0;
        for e in manifest.files() {
            let p = tree.join(e.path.as_str());
            let md = fs::symlink_metadata(&p).unwrap();
            assert!(md.is_file(), "{}", e.path);
            assert_eq!(md.mode() & 0o7777, e.mode, "{}", e.path);
            assert_eq!(md.modified().unwrap(), system_time(e.mtime_ns), "{}", e.path);
            assert!(md.nlink() <= LIMIT, "{} has {} links", e.path, md.nlink());
            let want: &[u8] = if e.file_hash() == Some(empty.hash) { b"" } else { b"hello, tree" };
            assert_eq!(fs::read(&p).unwrap(), want, "{}", e.path);
            if inodes.insert(md.ino())
                && md.ino() != fs::metadata(lib.object_path(&e.file_hash().unwrap())).unwrap().ino()
            {
                copies += 1;
            }
        }
        // Empty files: the library object (3 tree links) for the first variant, then
        // copies of up to 4 links: 20 = 3 + 4 × 4 + 1 → 5 copies; the other variant's 20 =
        // 4 × 5 → 5 copies. The small file: its object (mode 0600), one copy for 0640.
        assert_eq!(copies, 5 + 5 + 1, "copies made");
        assert_eq!(linked, 46 - copies, "every file that is not a copy is a link");
        assert_eq!(progress.stage().phase, "making the tree durable");
        assert!(fs::metadata(lib.object_path(&empty.hash)).unwrap().nlink() <= LIMIT);
    }

    fn dir_entry(path: &str, mode: u32, mtime_ns: i64) -> Entry {
        Entry { path: RelPath::new(path).unwrap(), mode, mtime_ns, kind: EntryKind::Dir }
    }

    fn symlink_entry(path: &str, target: &str) -> Entry {
        Entry {
            path: RelPath::new(path).unwrap(),
            mode: 0o777,
            mtime_ns: 0,
            kind: EntryKind::Symlink { target: target.into() },
        }
    }

    /// Every entry under `root` (not `root` itself): kind, and mode, mtime and bytes for
    /// files and folders, target for symlinks.
    fn snapshot(root: &Path) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for e in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            let md = fs::symlink_metadata(e.path()).unwrap();
            let what = if md.is_symlink() {
                format!("link -> {}", fs::read_link(e.path()).unwrap().display())
            } else {
                let meta = format!("{:o} {:?}", md.mode() & 0o7777, md.modified().unwrap());
                if md.is_dir() {
                    format!("dir {meta}")
                } else {
                    format!("file {meta} {:?}", fs::read(e.path()).unwrap())
                }
            };
            out.push((rel, what));
        }
        out
    }

    fn inode(p: &Path) -> u64 {
        fs::symlink_metadata(p).unwrap().ino()
    }

    /// A library holding `contents`, and their digests.
    fn library(root: &Path, contents: &[&[u8]]) -> (Library, Vec<dpsync_hash::FileDigest>) {
        let lib = Library::open(root).unwrap();
        let digests = contents.iter().map(|c| lib.import(*c, &ChunkParams::default()).unwrap().digest).collect();
        (lib, digests)
    }

    /// The tree `manifest` builds fresh, in a library of its own (so that its links do
    /// not change how the tree under test is placed).
    fn fresh(root: &Path, contents: &[&[u8]], manifest: &Manifest, limit: u64) -> PathBuf {
        let (lib, _) = library(&root.join("lib"), contents);
        let tree = root.join("tree");
        fs::create_dir_all(&tree).unwrap();
        build_tree(&lib, &tree, manifest, &BuildProgress::default(), limit).unwrap();
        tree
    }

    const CONTENTS: [&[u8]; 6] = [b"alpha", b"beta", b"gamma", b"delta", b"", b"epsilon"];

    /// Two versions that differ in every way a tree can: files added and removed, content,
    /// mode and time changed, a file turned into a folder and a folder into a file, a
    /// symlink retargeted, entries changed inside a read-only folder (and one in a
    /// read-only folder inside another), a folder's mode and time, a folder removed with
    /// what it holds; and 30 files that stay as they are. With a link limit of 3, the 12
    /// identical empty files `v2` adds past what `v1` has need copies.
    fn versions(d: &[dpsync_hash::FileDigest]) -> (Manifest, Manifest) {
        let t = |s: i64| s * 1_000_000_000;
        let mut v1 = vec![
            dir_entry("a", 0o755, t(1)),
            file("a/content", &d[0], 0o644, t(2)),
            file("a/mode", &d[1], 0o644, t(2)),
            file("a/time", &d[2], 0o644, t(2)),
            file("a/gone", &d[3], 0o600, t(2)),
            dir_entry("gone-dir", 0o700, t(3)),
            file("gone-dir/f", &d[0], 0o644, t(2)),
            dir_entry("gone-dir/sub", 0o500, t(3)),
            file("gone-dir/sub/g", &d[1], 0o400, t(2)),
            file("was-file", &d[3], 0o644, t(4)),
            dir_entry("was-dir", 0o755, t(5)),
            file("was-dir/x", &d[2], 0o644, t(5)),
            symlink_entry("link", "a/content"),
            dir_entry("ro", 0o555, t(6)),
            file("ro/old", &d[0], 0o444, t(6)),
            dir_entry("ro/inner", 0o500, t(7)),
            file("ro/inner/old", &d[1], 0o400, t(7)),
            dir_entry("meta", 0o755, t(8)),
            dir_entry("keep", 0o755, t(9)),
            dir_entry("many", 0o755, t(9)),
        ];
        for i in 0..30 {
            v1.push(file(&format!("keep/k{i:02}"), &d[i % 4], 0o644, t(10 + i as i64 % 3)));
        }
        for i in 0..4 {
            v1.push(file(&format!("many/e{i:02}"), &d[4], 0o644, t(20)));
        }
        let mut v2 = vec![
            dir_entry("a", 0o755, t(1)),
            file("a/content", &d[5], 0o644, t(2)),
            file("a/mode", &d[1], 0o640, t(2)),
            file("a/time", &d[2], 0o644, t(3)),
            file("a/new", &d[5], 0o644, t(2)),
            dir_entry("was-file", 0o750, t(4)),
            file("was-file/y", &d[0], 0o644, t(4)),
            file("was-dir", &d[2], 0o644, t(5)),
            symlink_entry("link", "a/mode"),
            dir_entry("ro", 0o555, t(6)),
            file("ro/new", &d[5], 0o444, t(6)),
            dir_entry("ro/inner", 0o500, t(7)),
            file("ro/inner/new", &d[0], 0o400, t(7)),
            dir_entry("meta", 0o700, t(11)),
            dir_entry("keep", 0o755, t(9)),
            dir_entry("many", 0o755, t(9)),
        ];
        for i in 0..30 {
            v2.push(file(&format!("keep/k{i:02}"), &d[i % 4], 0o644, t(10 + i as i64 % 3)));
        }
        for i in 0..16 {
            v2.push(file(&format!("many/e{i:02}"), &d[4], 0o644, t(20)));
        }
        (Manifest::new(v1).unwrap(), Manifest::new(v2).unwrap())
    }

    /// Recycling builds exactly the tree a fresh build would, both ways (v1 → v2 → v1),
    /// touching only what changed: the 30 unchanged files keep their inode, the folder is
    /// the previous tree's own, and the objects whose links it dropped are reported. With
    /// a link limit of 3, no inode gets more links than that.
    #[test]
    fn a_recycled_tree_equals_a_fresh_one_and_keeps_what_did_not_change() {
        const LIMIT: u64 = 3;
        let dir = tempfile::tempdir().unwrap();
        let (lib, d) = library(&dir.path().join("library"), &CONTENTS);
        let (v1, v2) = versions(&d);
        let pkg = dir.path().join("pkg");
        let none = HashMap::new();
        let progress = BuildProgress::default();
        let install = |version, m: &Manifest, previous| {
            install_limited(&lib, &pkg, version, m, &none, false, previous, &progress, LIMIT).unwrap()
        };
        let first = install(1, &v1, None);
        assert!(first.released.is_none() && !first.recycled);
        assert_eq!(snapshot(&first.dir), snapshot(&fresh(&dir.path().join("f1"), &CONTENTS, &v1, LIMIT)));

        let kept: Vec<(PathBuf, u64)> = (0..30)
            .map(|i| first.dir.join(format!("keep/k{i:02}")))
            .map(|p| {
                let ino = inode(&p);
                (p, ino)
            })
            .collect();
        let root_inode = inode(&first.dir);
        let second = install(2, &v2, Some(Previous { dir: first.dir.clone(), manifest: v1.clone() }));
        assert!(!first.dir.exists(), "the previous tree was renamed");
        assert_eq!(inode(&second.dir), root_inode, "the new tree is the previous one, recycled");
        assert_eq!(
            fs::read_link(pkg.join("current")).unwrap(),
            Path::new("versions").join(second.dir.file_name().unwrap())
        );
        assert_eq!(snapshot(&second.dir), snapshot(&fresh(&dir.path().join("f2"), &CONTENTS, &v2, LIMIT)));
        for (p, ino) in &kept {
            let now = second.dir.join(p.strip_prefix(&first.dir).unwrap());
            assert_eq!(inode(&now), *ino, "{} was placed again", now.display());
        }
        assert_eq!(second.files_kept as usize, v2.entries().len() - 22, "entries left as they were");
        assert!(second.recycled);
        let mut released = second.released.clone().expect("recycled");
        released.sort();
        let mut want = vec![d[0].hash, d[1].hash, d[2].hash, d[3].hash, d[0].hash, d[1].hash, d[3].hash, d[2].hash];
        want.extend([d[0].hash, d[1].hash]);
        want.sort();
        assert_eq!(released, want, "one per file link removed");

        let third = install(3, &v1, Some(Previous { dir: second.dir.clone(), manifest: v2.clone() }));
        assert_eq!(inode(&third.dir), root_inode);
        assert_eq!(snapshot(&third.dir), snapshot(&fresh(&dir.path().join("f3"), &CONTENTS, &v1, LIMIT)));
        for e in walkdir::WalkDir::new(&third.dir) {
            let md = fs::symlink_metadata(e.unwrap().path()).unwrap();
            assert!(md.is_dir() || md.nlink() <= LIMIT, "an inode with {} links", md.nlink());
        }
    }

    /// Recycling falls back to a fresh build, never worse than one: when more than half
    /// the paths differ (the previous tree is left for the commit to remove), and when the
    /// previous tree is not what its manifest says (a file it should hold is gone): the
    /// half-edited tree is removed and every object it linked is a candidate.
    #[test]
    fn recycling_falls_back_to_a_fresh_build() {
        let dir = tempfile::tempdir().unwrap();
        let (lib, d) = library(&dir.path().join("library"), &CONTENTS);
        let (v1, v2) = versions(&d);
        let pkg = dir.path().join("pkg");
        let none = HashMap::new();
        let progress = BuildProgress::default();
        let install = |version, m: &Manifest, previous| {
            install_limited(&lib, &pkg, version, m, &none, false, previous, &progress, NO_LINK_LIMIT).unwrap()
        };
        let small = Manifest::new(vec![file("other", &d[0], 0o644, 0)]).unwrap();
        let first = install(1, &v1, None);
        let second = install(2, &small, Some(Previous { dir: first.dir.clone(), manifest: v1.clone() }));
        assert!(second.released.is_none() && first.dir.is_dir(), "a large difference is built afresh");
        assert_eq!(snapshot(&second.dir), snapshot(&fresh(&dir.path().join("f2"), &CONTENTS, &small, NO_LINK_LIMIT)));

        // A file a change touches is missing from the previous tree.
        fs::set_permissions(first.dir.join("ro"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::remove_file(first.dir.join("ro/old")).unwrap();
        let third = install(3, &v2, Some(Previous { dir: first.dir.clone(), manifest: v1.clone() }));
        assert!(!first.dir.exists());
        let versions: Vec<_> = fs::read_dir(pkg.join("versions")).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(versions.len(), 2, "the half-recycled tree is gone: {versions:?}");
        assert_eq!(snapshot(&third.dir), snapshot(&fresh(&dir.path().join("f3"), &CONTENTS, &v2, NO_LINK_LIMIT)));
        assert!(!third.recycled);
        assert_eq!(third.released.unwrap().len(), v1.files().count(), "every link of that tree went");
    }

    /// Files assembled at commit are linked by the tree before they are named: after the
    /// install each is a library object (the tree's inode, with the entry's mode), nothing
    /// is left in `tmp/`, and a chunk that does not verify fails the install while the
    /// files that did verify are kept in the library.
    #[test]
    fn assembled_files_are_named_after_the_tree_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::open(&dir.path().join("library")).unwrap();
        let params = ChunkParams::default();
        let data_a = b"assembled file a".to_vec();
        let data_b = b"assembled file b".to_vec();
        let da = dpsync_hash::digest_stream(&data_a[..], &mut std::io::sink(), &params).unwrap();
        let db = dpsync_hash::digest_stream(&data_b[..], &mut std::io::sink(), &params).unwrap();
        let pack = dir.path().join("packs/p1");
        let rows = write_pack(
            &pack,
            &[
                (da.chunks[0].id, bytes::Bytes::from(data_a.clone())),
                (db.chunks[0].id, bytes::Bytes::from(data_b.clone())),
            ],
        )
        .unwrap();
        let sources: HashMap<ChunkId, Source> =
            rows.iter().map(|&(id, offset, len)| (id, Source::Pack { path: pack.clone(), offset, len })).collect();
        let m =
            Manifest::new(vec![file("a", &da, 0o640, 5_000_000_000), file("b", &db, 0o644, 6_000_000_000)]).unwrap();
        let pkg = dir.path().join("pkg");
        let done = install(&lib, &pkg, 1, &m, &sources, false, None, &BuildProgress::default()).unwrap();
        assert_eq!(done.files_built, 2);
        for (name, digest, data) in [("a", &da, &data_a), ("b", &db, &data_b)] {
            let obj = lib.object_path(&digest.hash);
            assert_eq!(&fs::read(&obj).unwrap(), data);
            assert_eq!(inode(&obj), inode(&done.dir.join(name)), "{name}: the tree links the assembled inode");
        }
        assert_eq!(fs::metadata(done.dir.join("a")).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(fs::read_dir(dir.path().join("library/tmp")).unwrap().count(), 0, "nothing left unnamed");

        // The chunk of `c` is damaged in its pack: `c` fails, `d` is kept.
        let data_c = b"third".to_vec();
        let data_d = b"fourth".to_vec();
        let dc = dpsync_hash::digest_stream(&data_c[..], &mut std::io::sink(), &params).unwrap();
        let dd = dpsync_hash::digest_stream(&data_d[..], &mut std::io::sink(), &params).unwrap();
        let pack2 = dir.path().join("packs/p2");
        let rows = write_pack(
            &pack2,
            &[
                (dd.chunks[0].id, bytes::Bytes::from(data_d.clone())),
                (dc.chunks[0].id, bytes::Bytes::from_static(b"THIRD")),
            ],
        )
        .unwrap();
        let sources: HashMap<ChunkId, Source> =
            rows.iter().map(|&(id, offset, len)| (id, Source::Pack { path: pack2.clone(), offset, len })).collect();
        let m2 = Manifest::new(vec![file("c", &dc, 0o644, 0), file("d", &dd, 0o644, 0)]).unwrap();
        let err = install(&lib, &pkg, 2, &m2, &sources, false, None, &BuildProgress::default()).unwrap_err();
        assert!(matches!(&err, InstallError::Missing(ids) if ids == &vec![dc.chunks[0].id]), "{err}");
        assert!(lib.contains(&dd.hash) && !lib.contains(&dc.hash));
        assert_eq!(fs::read(lib.object_path(&dd.hash)).unwrap(), data_d);
        assert_eq!(fs::metadata(lib.object_path(&dd.hash)).unwrap().mode() & 0o777, 0o400);
        assert_eq!(
            fs::read_link(pkg.join("current")).unwrap(),
            Path::new("versions").join(done.dir.file_name().unwrap())
        );
    }

    fn noise(seed: u8, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        blake3::Hasher::new().update(&[seed]).finalize_xof().fill(&mut b);
        b
    }

    /// A file rebuilt from its old version's library object (100 bytes inserted at its
    /// start): the old chunks are read in runs (end to end in the object, at most
    /// `RUN_BYTES` each), the result is byte for byte the new file; when the object is
    /// damaged, the install fails naming exactly the chunk whose bytes changed, and
    /// nothing is left in the library's `tmp/`.
    #[test]
    fn a_file_rebuilt_from_an_old_object_is_read_in_runs_and_a_damaged_chunk_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let lib = Library::open(&dir.path().join("library")).unwrap();
        let params = ChunkParams { min: 4 << 10, avg: 16 << 10, max: 64 << 10 };
        let old = noise(7, 12 << 20);
        let old_d = lib.import(&old[..], &params).unwrap().digest;
        let mut new = noise(8, 100);
        new.extend_from_slice(&old);
        let new_d = dpsync_hash::digest_stream(&new[..], &mut std::io::sink(), &params).unwrap();
        assert!(new_d.chunks.len() > 100, "{} chunks", new_d.chunks.len());
        // Sources: the old object for every chunk they share; the new first chunk(s) from a pack.
        let mut at = 0u64;
        let mut sources: HashMap<ChunkId, Source> = HashMap::new();
        for c in &old_d.chunks {
            sources.insert(c.id, Source::Object { hash: old_d.hash, offset: at, len: c.len });
            at += u64::from(c.len);
        }
        let mut pos = 0usize;
        let mut fresh = Vec::new();
        for c in &new_d.chunks {
            if !sources.contains_key(&c.id) {
                fresh.push((c.id, bytes::Bytes::copy_from_slice(&new[pos..pos + c.len as usize])));
            }
            pos += c.len as usize;
        }
        assert!(!fresh.is_empty() && fresh.len() < 4, "{} new chunks", fresh.len());
        let pack = dir.path().join("packs/p1");
        for (id, offset, len) in write_pack(&pack, &fresh).unwrap() {
            sources.insert(id, Source::Pack { path: pack.clone(), offset, len });
        }
        let entry = file("big", &new_d, 0o644, 0);
        let runs = source_runs(&lib, entry.chunks(), &sources);
        assert!(runs.len() <= fresh.len() + 1 + (12 << 20) / RUN_BYTES as usize + 1, "{} runs", runs.len());
        assert!(runs.iter().all(|r| r.len <= RUN_BYTES && r.exact));
        assert_eq!(runs.iter().map(|r| r.chunks.len()).sum::<usize>(), new_d.chunks.len());

        let m = Manifest::new(vec![entry.clone()]).unwrap();
        let pkg = dir.path().join("pkg");
        let done = install(&lib, &pkg, 1, &m, &sources, false, None, &BuildProgress::default()).unwrap();
        assert_eq!(fs::read(done.dir.join("big")).unwrap(), new);

        // The old object damaged in the middle: the chunk holding that byte is named.
        let mut damaged_new = new.clone();
        damaged_new.push(1); // another file, so that the library lacks it
        let d2 = dpsync_hash::digest_stream(&damaged_new[..], &mut std::io::sink(), &params).unwrap();
        let obj = lib.object_path(&old_d.hash);
        let mut perms = fs::metadata(&obj).unwrap().permissions();
        perms.set_mode(0o600);
        fs::set_permissions(&obj, perms).unwrap();
        let spot = 6 << 20;
        let f = fs::OpenOptions::new().write(true).open(&obj).unwrap();
        f.write_all_at(&[old[spot] ^ 0xff], spot as u64).unwrap();
        let mut at = 0u64;
        let victim = old_d
            .chunks
            .iter()
            .find(|c| {
                at += u64::from(c.len);
                at > spot as u64
            })
            .unwrap()
            .id;
        let mut pos = 0usize;
        let mut fresh = Vec::new();
        for c in &d2.chunks {
            if !sources.contains_key(&c.id) {
                fresh.push((c.id, bytes::Bytes::copy_from_slice(&damaged_new[pos..pos + c.len as usize])));
            }
            pos += c.len as usize;
        }
        let pack2 = dir.path().join("packs/p2");
        for (id, offset, len) in write_pack(&pack2, &fresh).unwrap() {
            sources.insert(id, Source::Pack { path: pack2.clone(), offset, len });
        }
        let m2 = Manifest::new(vec![file("big", &d2, 0o644, 0)]).unwrap();
        let err = install(&lib, &pkg, 2, &m2, &sources, false, None, &BuildProgress::default()).unwrap_err();
        assert!(matches!(&err, InstallError::Missing(ids) if ids == &vec![victim]), "{err}");
        assert!(!lib.contains(&d2.hash));
        assert_eq!(fs::read_dir(dir.path().join("library/tmp")).unwrap().count(), 0, "nothing left unnamed");
    }

    /// Only `EMLINK` (and `EXDEV`) mean "make a copy"; any other failure names the path.
    #[test]
    fn a_link_that_fails_otherwise_names_its_path() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        fs::write(&a, b"x").unwrap();
        assert!(link(&a, &dir.path().join("b")).unwrap());
        let err = link(&dir.path().join("missing"), &dir.path().join("c")).unwrap_err();
        assert!(err.to_string().contains("linking"), "{err}");
    }
}
