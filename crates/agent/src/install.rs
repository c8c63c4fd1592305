//! Building a version on a DP (blocking code, run on worker threads): assemble the
//! files the library still lacks at commit (those not written as their chunks arrived,
//! see `arrival`) from verified chunks, build the version tree from the library, and
//! switch `current` to it atomically.
//!
//! **Architecture Invariant:** nothing reaches a version tree that was not checked
//! against its BLAKE3: every chunk is re-hashed as it is read, every assembled file as
//! it is written; the tree is built in a fresh directory and only a rename of the
//! `current` symlink makes it live.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dpsync_hash::{ChunkId, Entry, EntryKind, FileHash, Manifest};
use dpsync_library::Library;

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
) -> Result<Installed, InstallError> {
    let mut out = assemble_missing(lib, manifest, sources, force)?;
    let versions = pkg_dir.join("versions");
    fs::create_dir_all(&versions).map_err(io(format!("creating {}", versions.display())))?;
    let stamp = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let name = format!("v{version}-{stamp:x}");
    let dir = versions.join(&name);
    fs::create_dir(&dir).map_err(io(format!("creating {}", dir.display())))?;
    out.files_linked = build_tree(lib, &dir, manifest)?;
    switch_current(pkg_dir, &format!("versions/{name}"))?;
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
    for e in &to_build {
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

fn system_time(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

/// Creates the tree; returns how many files are hard links to the library.
fn build_tree(lib: &Library, dir: &Path, manifest: &Manifest) -> Result<u64, InstallError> {
    let mut linked = 0;
    let mut dirs = Vec::new();
    for e in manifest.entries() {
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
                if place_file(lib, hash, &dest, e.mode, system_time(e.mtime_ns))? {
                    linked += 1;
                }
            }
        }
    }
    // Modes and times of directories last (deepest first), then make them durable. The
    // metadata changes of up to 256 folders come before their fsyncs: on a journalling
    // filesystem the first fsync commits them all and the others find nothing left to
    // write. (Folders are opened before their mode may forbid it, as before.)
    let mut opened: Vec<(&Path, File)> = Vec::with_capacity(256);
    let sync = |opened: &mut Vec<(&Path, File)>| -> Result<(), InstallError> {
        for (d, f) in opened.drain(..) {
            f.sync_all().map_err(io(format!("syncing {}", d.display())))?;
        }
        Ok(())
    };
    for (d, e) in dirs.iter().rev() {
        let f = File::open(d).map_err(io(format!("opening {}", d.display())))?;
        f.set_permissions(fs::Permissions::from_mode(e.mode)).map_err(io(format!("chmod {}", d.display())))?;
        f.set_modified(system_time(e.mtime_ns)).map_err(io(format!("setting the time of {}", d.display())))?;
        opened.push((d, f));
        if opened.len() == 256 {
            sync(&mut opened)?;
        }
    }
    opened.push((dir, File::open(dir).map_err(io(format!("opening {}", dir.display())))?));
    sync(&mut opened)?;
    Ok(linked)
}

/// Hard-links the library object when its inode can carry this entry's mode and time
/// (no other link, or the same metadata); copies it otherwise.
fn place_file(lib: &Library, hash: &FileHash, dest: &Path, mode: u32, mtime: SystemTime) -> Result<bool, InstallError> {
    let obj = lib.object_path(hash);
    let md = fs::metadata(&obj).map_err(io(format!("library object {hash}")))?;
    let same = md.mode() & 0o7777 == mode && md.modified().ok() == Some(mtime);
    if md.nlink() == 1 || same {
        if !same {
            fs::set_permissions(&obj, fs::Permissions::from_mode(mode))
                .map_err(io(format!("chmod {}", obj.display())))?;
            File::open(&obj)
                .and_then(|f| f.set_modified(mtime))
                .map_err(io(format!("setting the time of {}", obj.display())))?;
        }
        fs::hard_link(&obj, dest).map_err(io(format!("linking {}", dest.display())))?;
        return Ok(true);
    }
    fs::copy(&obj, dest).map_err(io(format!("copying to {}", dest.display())))?;
    let f = File::open(dest).map_err(io(format!("opening {}", dest.display())))?;
    f.sync_all().map_err(io(format!("syncing {}", dest.display())))?;
    fs::set_permissions(dest, fs::Permissions::from_mode(mode)).map_err(io(format!("chmod {}", dest.display())))?;
    f.set_modified(mtime).map_err(io(format!("setting the time of {}", dest.display())))?;
    Ok(false)
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
pub fn collect_unlinked(lib: &Library, candidates: impl IntoIterator<Item = FileHash>) -> Vec<FileHash> {
    let mut removed = Vec::new();
    for h in candidates {
        if let Ok(md) = fs::metadata(lib.object_path(&h))
            && md.nlink() == 1
            && lib.remove(&h).is_ok()
        {
            removed.push(h);
        }
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
