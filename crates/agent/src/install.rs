//! Building a version on a DP (blocking code, run on worker threads): assemble the
//! files the library still lacks at commit (those not written as their chunks arrived,
//! see `arrival`) from verified chunks, build the version tree from the library, and
//! switch `current` to it atomically.
//!
//! **Architecture Invariant:** nothing reaches a version tree that was not checked
//! against its BLAKE3: every chunk is re-hashed as it is read, every assembled file as
//! it is written; the tree is built in a fresh directory and only a rename of the
//! `current` symlink makes it live.
//!
//! A tree costs no fsync per file: its files are hard links (to the library's object, or
//! to a copy made once per distinct content, mode and time) and copies written without a
//! flush of their own, and the whole tree is made durable by one `syncfs` before
//! `current` is switched to it. A package of 200,000 identical files is 200,000 links to
//! a handful of inodes: a new copy is started whenever one reaches the filesystem's link
//! limit (`EMLINK`, 65,000 on ext4).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
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

/// Assembles every file of `manifest` that the library lacks (all of them with
/// `force`), then builds and switches to the version tree under `pkg_dir`.
pub fn install(
    lib: &Library,
    pkg_dir: &Path,
    version: i64,
    manifest: &Manifest,
    sources: &HashMap<ChunkId, Source>,
    force: bool,
    progress: &BuildProgress,
) -> Result<Installed, InstallError> {
    let clock = std::time::Instant::now();
    let mut out = assemble_missing_reporting(lib, manifest, sources, force, progress)?;
    out.assemble_ms = clock.elapsed().as_millis() as u64;
    let versions = pkg_dir.join("versions");
    fs::create_dir_all(&versions).map_err(io(format!("creating {}", versions.display())))?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let name = format!("v{version}-{stamp:x}");
    let dir = versions.join(&name);
    fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let (linked, place_ms, sync_ms) = build_tree_timed(lib, &dir, manifest, progress, NO_LINK_LIMIT)?;
    (out.files_linked, out.place_ms, out.sync_ms) = (linked, place_ms, sync_ms);
    switch_current(pkg_dir, &format!("versions/{name}"))?;
    progress.start(BuildProgress::RECORDING, 0);
    out.dir = dir;
    Ok(out)
}

/// Puts every file of `manifest` into the library, assembling those it lacks (all of
/// them with `force`) from verified chunks. Nothing is built when a chunk is missing.
pub fn assemble_missing(
    lib: &Library,
    manifest: &Manifest,
    sources: &HashMap<ChunkId, Source>,
    force: bool,
) -> Result<Installed, InstallError> {
    assemble_missing_reporting(lib, manifest, sources, force, &BuildProgress::default())
}

fn assemble_missing_reporting(
    lib: &Library,
    manifest: &Manifest,
    sources: &HashMap<ChunkId, Source>,
    force: bool,
    progress: &BuildProgress,
) -> Result<Installed, InstallError> {
    let mut out = Installed::default();
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
        match assemble(lib, e, sources, &mut readers, force)? {
            Ok(n) => {
                out.files_built += 1;
                out.bytes_built += n;
                out.built.push(e.file_hash().expect("files have hashes"));
            }
            Err(mut ids) => bad.append(&mut ids),
        }
    }
    if !bad.is_empty() {
        bad.sort();
        bad.dedup();
        return Err(InstallError::Missing(bad));
    }
    lib.sync().map_err(|e| InstallError::Io { context: "library".into(), source: std::io::Error::other(e) })?;
    Ok(out)
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

/// Writes one file from its chunks into the library. `Ok(Err(ids))` names chunks whose
/// source did not verify.
fn assemble(
    lib: &Library,
    e: &Entry,
    sources: &HashMap<ChunkId, Source>,
    readers: &mut Readers,
    force: bool,
) -> Result<Result<u64, Vec<ChunkId>>, InstallError> {
    let EntryKind::File { hash, size, chunks } = &e.kind else { unreachable!("only files are assembled") };
    let tmp = lib.temp_path();
    let file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(format!("creating {}", tmp.display())))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = blake3::Hasher::new();
    let mut buf = Vec::new();
    let mut bad = Vec::new();
    for c in chunks {
        let src = &sources[&c.id];
        let (path, offset, len) = match src {
            Source::Pack { path, offset, len } => (path.clone(), *offset, *len),
            Source::Object { hash, offset, len } => (lib.object_path(hash), *offset, *len),
        };
        buf.resize(len as usize, 0);
        let ok =
            len == c.len && readers.read(&path, offset, &mut buf).is_ok() && ChunkId::from(blake3::hash(&buf)) == c.id;
        if !ok {
            bad.push(c.id);
            continue;
        }
        hasher.update(&buf);
        w.write_all(&buf).map_err(io(format!("writing {}", tmp.display())))?;
    }
    let file = w
        .into_inner()
        .map_err(|e| InstallError::Io { context: format!("writing {}", tmp.display()), source: e.into_error() })?;
    drop(file);
    if !bad.is_empty() {
        let _ = fs::remove_file(&tmp);
        return Ok(Err(bad));
    }
    if FileHash::from(hasher.finalize()) != *hash {
        let _ = fs::remove_file(&tmp);
        return Err(InstallError::BadManifest(format!("{}: its chunks do not hash to the file's BLAKE3", e.path)));
    }
    let adopted = if force { lib.adopt_replacing(&tmp, hash) } else { lib.adopt(&tmp, hash).map(|_| ()) };
    adopted.map_err(|e| InstallError::Io { context: "library".into(), source: std::io::Error::other(e) })?;
    Ok(Ok(*size))
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

/// Creates the tree and makes it durable with one `syncfs`; returns how many files are
/// hard links (to a library object or to a copy of one). `link_limit` stands in for the
/// filesystem's link limit in tests.
#[cfg(test)]
pub(crate) fn build_tree(
    lib: &Library,
    dir: &Path,
    manifest: &Manifest,
    progress: &BuildProgress,
    link_limit: u64,
) -> Result<u64, InstallError> {
    build_tree_timed(lib, dir, manifest, progress, link_limit).map(|(linked, _, _)| linked)
}

/// [`build_tree`], also returning the milliseconds spent placing entries and syncing.
fn build_tree_timed(
    lib: &Library,
    dir: &Path,
    manifest: &Manifest,
    progress: &BuildProgress,
    link_limit: u64,
) -> Result<(u64, u64, u64), InstallError> {
    let clock = std::time::Instant::now();
    let mut linked = 0;
    let mut dirs = Vec::new();
    let mut placer = Placer { lib, link_limit, copies: HashMap::new() };
    progress.start(BuildProgress::PLACING, manifest.entries().len() as u64);
    for e in manifest.entries() {
        progress.step();
        // Paths are validated RelPaths whose parents are directory entries created
        // before them, so joining cannot leave `dir` or pass through a symlink.
        let dest = dir.join(e.path.as_str());
        match &e.kind {
            EntryKind::Dir => {
                fs::create_dir(&dest).map_err(io(format!("creating {}", dest.display())))?;
                dirs.push((dest, e));
            }
            EntryKind::Symlink { target } => {
                std::os::unix::fs::symlink(target, &dest).map_err(io(format!("creating {}", dest.display())))?;
            }
            EntryKind::File { hash, .. } => {
                if placer.place(hash, &dest, e.mode, system_time(e.mtime_ns))? {
                    linked += 1;
                }
            }
        }
    }
    // Modes and times of directories last (deepest first: a folder's mode may forbid
    // writing into it).
    for (d, e) in dirs.iter().rev() {
        let f = File::open(d).map_err(io(format!("opening {}", d.display())))?;
        f.set_permissions(fs::Permissions::from_mode(e.mode)).map_err(io(format!("chmod {}", d.display())))?;
        f.set_modified(system_time(e.mtime_ns)).map_err(io(format!("setting the time of {}", d.display())))?;
    }
    // One flush for the whole tree (files copied, links, folders and their metadata)
    // instead of one fsync per file or folder: on a tree of many small files the
    // per-file flushes were nearly all of the time.
    let place_ms = clock.elapsed().as_millis() as u64;
    progress.start(BuildProgress::SYNCING, 0);
    let root = File::open(dir).map_err(io(format!("opening {}", dir.display())))?;
    rustix::fs::syncfs(&root).map_err(|e| InstallError::Io {
        context: format!("syncing the filesystem of {}", dir.display()),
        source: e.into(),
    })?;
    Ok((linked, place_ms, clock.elapsed().as_millis() as u64 - place_ms))
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
    /// Links an inode may have (besides the filesystem's own limit).
    link_limit: u64,
    /// Copies made in this tree, by (content, mode, time): later entries with the same
    /// content and metadata are linked to them. Only content whose library object could
    /// not carry an entry gets one, so this holds no more than the copies made.
    copies: HashMap<(FileHash, u32, SystemTime), Inode>,
}

impl Placer<'_> {
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
            copy_object(self.lib, hash, dest, mode, mtime)?;
            *inode = Inode { path: dest.to_owned(), links: 1 };
            return Ok(false);
        }
        let obj = self.lib.object_path(hash);
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
        copy_object(self.lib, hash, dest, mode, mtime)?;
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

/// Writes a new inode at `dest` with the library object's bytes and the entry's mode and
/// time. Not flushed here: the tree is made durable as a whole.
fn copy_object(lib: &Library, hash: &FileHash, dest: &Path, mode: u32, mtime: SystemTime) -> Result<(), InstallError> {
    let mut from = lib.open_object(hash).map_err(|e| InstallError::Io {
        context: format!("library object {hash}"),
        source: std::io::Error::other(e),
    })?;
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
