//! Walks a package's source tree and says what a refresh must read.
//!
//! [`scan`] yields every entry's kind, path, mode, size and times, and collects every
//! refused entry (non-UTF-8 names, symlinks out of the tree, special files, unreadable
//! directories) instead of stopping at the first: the caller reports them all.
//! [`SourceRoot`] is the folder opened once: the scan and every later read of a file
//! (`SourceRoot::open_file`) go through its descriptor and never cross a symlink, so a
//! writer racing a refresh cannot make it read or list anything outside the folder.
//! [`plan`] compares a scan with the previous version and its [`ScanCache`] and decides,
//! per file, whether the previous hash can be reused or the file must be read.
//!
//! **Architecture Invariant:** scanning never reads file contents and never writes;
//! nothing outside the source folder is ever listed, stat'ed as an entry, or opened.

mod cache;
mod root;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use dpsync_hash::path::escape_controls;
use dpsync_hash::{Chunks, EntryKind, FileHash, Manifest, RelPath};

pub use cache::{CacheDecodeError, RACY_WINDOW_NS, ScanCache};
pub use root::{Resolver, SourceChanged, SourceKind, SourceRoot, SourceStat};

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

/// One refused entry, with the reason in words an administrator can act on. `path` is
/// as found on disk; its message escapes control characters (a name may hold a newline).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", escape_controls(path), escape_controls(reason))]
pub struct ScanProblem {
    pub path: String,
    pub reason: String,
}

/// A scan that could not start at all.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("source folder {} does not exist", shown(.0))]
    Missing(PathBuf),
    #[error("source {} is not a folder", shown(.0))]
    NotADirectory(PathBuf),
    #[error("source folder {}: {source}", shown(.path))]
    Unreadable { path: PathBuf, source: std::io::Error },
}

/// A path for a message, control characters escaped.
fn shown(p: &Path) -> String {
    escape_controls(&p.to_string_lossy()).into_owned()
}

/// The result of walking a tree: accepted entries sorted by path, and all problems.
#[derive(Debug, Default)]
pub struct Scan {
    pub entries: Vec<ScanEntry>,
    pub problems: Vec<ScanProblem>,
}

/// Walks `root` without following symlinks: [`SourceRoot::open`] then
/// [`SourceRoot::scan`].
pub fn scan(root: &Path) -> Result<Scan, ScanError> {
    SourceRoot::open(root)?.scan()
}

/// What a refresh must do with one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilePlan {
    /// Unchanged since the previous version: reuse its hash and chunks.
    Reuse { hash: FileHash, size: u64, chunks: Chunks },
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
    let mut out = Plan::default();
    for entry in scan {
        let decision = match entry.kind {
            ScanKind::File => {
                let reused = (!verify)
                    .then(|| {
                        // By binary search in the sorted manifest: no index of it is built.
                        let old = previous?.get(entry.path.as_str())?;
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
