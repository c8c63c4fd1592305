//! Walks a package's source tree and says what a refresh must read.
//!
//! [`scan`] yields every entry's kind, path, mode, size and times, and collects every
//! refused entry (non-UTF-8 names, symlinks out of the tree, special files, unreadable
//! directories) instead of stopping at the first: the caller reports them all.
//! [`plan`] compares a scan with the previous version and its [`ScanCache`] and decides,
//! per file, whether the previous hash can be reused or the file must be read.
//!
//! **Architecture Invariant:** scanning never reads file contents and never writes.

mod cache;

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use dpsync_hash::path::resolve_symlink;
use dpsync_hash::{Chunk, Entry, EntryKind, FileHash, Manifest, RelPath};
use rayon::prelude::*;

pub use cache::{CacheDecodeError, ScanCache};

/// The metadata that decides whether a file must be read again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStat {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    pub ino: u64,
    pub dev: u64,
}

impl FileStat {
    pub fn of(md: &std::fs::Metadata) -> Self {
        Self {
            size: md.len(),
            mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            ino: md.ino(),
            dev: md.dev(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanKind {
    Dir,
    File,
    Symlink { target: String },
}

/// One accepted entry of a source tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanEntry {
    pub path: RelPath,
    pub kind: ScanKind,
    pub mode: u32,
    pub stat: FileStat,
}

/// One refused entry, with the reason in words an administrator can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct ScanProblem {
    pub path: String,
    pub reason: String,
}

/// A scan that could not start at all.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("source folder {0} does not exist")]
    Missing(PathBuf),
    #[error("source {0} is not a folder")]
    NotADirectory(PathBuf),
    #[error("source folder {path}: {source}")]
    Unreadable { path: PathBuf, source: std::io::Error },
}

/// The result of walking a tree: accepted entries sorted by path, and all problems.
#[derive(Debug, Default)]
pub struct Scan {
    pub entries: Vec<ScanEntry>,
    pub problems: Vec<ScanProblem>,
}

/// Walks `root` without following symlinks.
pub fn scan(root: &Path) -> Result<Scan, ScanError> {
    let md = std::fs::metadata(root).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => ScanError::Missing(root.to_owned()),
        _ => ScanError::Unreadable { path: root.to_owned(), source: e },
    })?;
    if !md.is_dir() {
        return Err(ScanError::NotADirectory(root.to_owned()));
    }
    let canonical_root =
        std::fs::canonicalize(root).map_err(|e| ScanError::Unreadable { path: root.to_owned(), source: e })?;
    let mut out = Scan::default();
    let walker = walkdir::WalkDir::new(root).follow_links(false).min_depth(1).sort_by_file_name();
    let mut it = walker.into_iter();
    let mut found = Vec::new();
    while let Some(item) = it.next() {
        let dent = match item {
            Ok(d) => d,
            Err(e) => {
                let path = e.path().map(|p| display_rel(root, p)).unwrap_or_else(|| root.display().to_string());
                out.problems.push(ScanProblem { path, reason: format!("cannot be read: {e}") });
                continue;
            }
        };
        let rel_os = dent.path().strip_prefix(root).expect("walkdir yields paths under its root");
        let path = match RelPath::from_bytes(rel_os.as_os_str().as_bytes()) {
            Ok(p) => p,
            Err(e) => {
                out.problems.push(ScanProblem { path: display_rel(root, dent.path()), reason: e.to_string() });
                if dent.file_type().is_dir() {
                    it.skip_current_dir();
                }
                continue;
            }
        };
        found.push((path, dent));
    }
    // Stats (and symlink checks) are the bulk of a scan that reads nothing: they run on
    // all cores, after the walk fixed the set of entries.
    let classified: Vec<Result<ScanEntry, ScanProblem>> =
        found.into_par_iter().map(|(path, dent)| classify(&canonical_root, path, &dent)).collect();
    for c in classified {
        match c {
            Ok(e) => out.entries.push(e),
            Err(p) => out.problems.push(p),
        }
    }
    out.entries.sort_by(|a, b| a.path.as_str().as_bytes().cmp(b.path.as_str().as_bytes()));
    out.problems.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Stats one walked entry and decides what it is.
fn classify(canonical_root: &Path, path: RelPath, dent: &walkdir::DirEntry) -> Result<ScanEntry, ScanProblem> {
    let md =
        dent.metadata().map_err(|e| ScanProblem { path: path.to_string(), reason: format!("cannot be read: {e}") })?;
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        ScanKind::Dir
    } else if ft.is_file() {
        ScanKind::File
    } else if ft.is_symlink() {
        match check_symlink(canonical_root, dent.path(), &path) {
            Ok(target) => ScanKind::Symlink { target },
            Err(reason) => return Err(ScanProblem { path: path.to_string(), reason }),
        }
    } else {
        return Err(ScanProblem {
            path: path.to_string(),
            reason: "is a special file (device, FIFO or socket); only files, folders and symlinks are allowed".into(),
        });
    };
    Ok(ScanEntry { path, kind, mode: md.mode() & 0o7777, stat: FileStat::of(&md) })
}

fn display_rel(root: &Path, p: &Path) -> String {
    p.strip_prefix(root).unwrap_or(p).to_string_lossy().into_owned()
}

fn check_symlink(canonical_root: &Path, on_disk: &Path, path: &RelPath) -> Result<String, String> {
    let target = std::fs::read_link(on_disk).map_err(|e| format!("symlink cannot be read: {e}"))?;
    let target = std::str::from_utf8(target.as_os_str().as_bytes())
        .map_err(|_| "symlink target is not valid UTF-8".to_owned())?
        .to_owned();
    resolve_symlink(path, &target).map_err(|e| format!("{e}; symlinks must stay inside the source folder"))?;
    // Lexically inside; where it resolves on disk, it must resolve inside too
    // (a link through another link can leave the tree).
    if let Ok(real) = std::fs::canonicalize(on_disk)
        && !real.starts_with(canonical_root)
    {
        return Err(format!(
            "symlink points to {target:?}, which resolves to {} outside the source folder",
            real.display()
        ));
    }
    Ok(target)
}

/// What a refresh must do with one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilePlan {
    /// Unchanged since the previous version: reuse its hash and chunks.
    Reuse { hash: FileHash, size: u64, chunks: Vec<Chunk> },
    /// New, changed, or `--verify`: read it.
    Read,
}

/// Per-entry decisions for a refresh, in path order.
#[derive(Debug, Default)]
pub struct Plan {
    pub items: Vec<(ScanEntry, Option<FilePlan>)>,
    /// Bytes of the files that must be read.
    pub bytes_to_read: u64,
    pub files_to_read: u64,
}

/// Decides, per file, whether `previous` (with the stats in `cache`) still describes it.
pub fn plan(scan: Vec<ScanEntry>, previous: Option<&Manifest>, cache: &ScanCache, verify: bool) -> Plan {
    let prev: HashMap<&str, &Entry> =
        previous.map(|m| m.entries().iter().map(|e| (e.path.as_str(), e)).collect()).unwrap_or_default();
    let mut out = Plan::default();
    for entry in scan {
        let decision = match entry.kind {
            ScanKind::File => {
                let reused = (!verify)
                    .then(|| {
                        let old = prev.get(entry.path.as_str())?;
                        let cached = cache.get(entry.path.as_str())?;
                        match &old.kind {
                            EntryKind::File { size, hash, chunks }
                                if cached == entry.stat && *size == entry.stat.size =>
                            {
                                Some(FilePlan::Reuse { hash: *hash, size: *size, chunks: chunks.clone() })
                            }
                            _ => None,
                        }
                    })
                    .flatten();
                Some(reused.unwrap_or_else(|| {
                    out.bytes_to_read += entry.stat.size;
                    out.files_to_read += 1;
                    FilePlan::Read
                }))
            }
            _ => None,
        };
        out.items.push((entry, decision));
    }
    out
}
