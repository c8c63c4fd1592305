//! A source folder opened once, and everything under it reached relative to that
//! descriptor without crossing a symbolic link in any component.
//!
//! The administrator's configured path is resolved once, by [`SourceRoot::open`]; from
//! then on, whoever can write inside the folder cannot redirect a read: a component that
//! is (or becomes, while a refresh runs) a symbolic link is refused, never followed.
//! Paths are opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
//! RESOLVE_NO_MAGICLINKS)` where the kernel has it (Linux 5.6+), otherwise with a chain
//! of `openat(O_NOFOLLOW | O_DIRECTORY)`, one per component, each relative to the last.
//! The scan ([`SourceRoot::scan`]) descends the same way: each folder is opened relative
//! to its parent's descriptor with `O_NOFOLLOW | O_DIRECTORY`.

use std::ffi::{CStr, CString, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use dpsync_hash::RelPath;
use dpsync_hash::path::{escape_controls, resolve_symlink};
use rayon::prelude::*;
use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

use crate::{FileStat, Scan, ScanEntry, ScanError, ScanKind, ScanProblem};

/// How paths under the root are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Resolver {
    /// `openat2` where the kernel has it, else the `openat` chain.
    #[default]
    Auto,
    /// `openat2` only: fails with `ENOSYS` where the kernel lacks it (for tests).
    Openat2,
    /// The `openat(O_NOFOLLOW | O_DIRECTORY)` chain only (what `Auto` falls back to).
    Chain,
}

/// Set once `openat2` turned out to be missing (before Linux 5.6) or blocked (seccomp).
static OPENAT2_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

/// What a read found when the tree moved under it: a component of the path became a
/// symbolic link (or stopped being a folder), or the file stopped being a regular file.
/// Carried inside the `io::Error`s of [`SourceRoot`]; its message names the path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: changed while it was read: {what}; refresh again", escape_controls(path))]
pub struct SourceChanged {
    pub path: String,
    pub what: &'static str,
}

impl SourceChanged {
    const REDIRECTED: &'static str = "a component of its path became a symbolic link or stopped being a folder";
    const NOT_REGULAR: &'static str = "it is no longer a regular file";

    /// The `SourceChanged` inside `e`, if that is what `e` is.
    pub fn of(e: &io::Error) -> Option<&SourceChanged> {
        e.get_ref()?.downcast_ref()
    }

    fn error(path: &str, what: &'static str) -> io::Error {
        io::Error::other(SourceChanged { path: path.to_owned(), what })
    }
}

/// What an entry is, by `lstat` (a symlink is reported as such, never followed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    Dir,
    File,
    Symlink,
    /// A device, FIFO or socket.
    Special,
}

/// An entry's `lstat`, relative to the root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceStat {
    pub kind: SourceKind,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub stat: FileStat,
}

impl SourceStat {
    fn of(st: &rustix::fs::Stat) -> Self {
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => SourceKind::Dir,
            FileType::RegularFile => SourceKind::File,
            FileType::Symlink => SourceKind::Symlink,
            _ => SourceKind::Special,
        };
        // The same numbers `std::fs::Metadata` gives (the refresh's fstat), so the scan
        // cache compares like with like.
        #[allow(clippy::unnecessary_cast)] // the field types differ between architectures
        let stat = FileStat {
            size: st.st_size as u64,
            mtime_ns: st.st_mtime as i64 * 1_000_000_000 + st.st_mtime_nsec as i64,
            ctime_ns: st.st_ctime as i64 * 1_000_000_000 + st.st_ctime_nsec as i64,
            ino: st.st_ino as u64,
            dev: st.st_dev as u64,
        };
        Self { kind, mode: st.st_mode & 0o7777, stat }
    }
}

/// A package's source folder, opened once. See the module documentation.
#[derive(Debug)]
pub struct SourceRoot {
    path: PathBuf,
    /// `path` with every symlink resolved at open (for the chain's symlink check).
    canonical: PathBuf,
    fd: OwnedFd,
    resolver: Resolver,
}

impl SourceRoot {
    /// Opens the folder at `path` (the administrator's path: symlinks in it are followed,
    /// once, here).
    pub fn open(path: &Path) -> Result<Self, ScanError> {
        Self::open_with(path, Resolver::Auto)
    }

    /// [`SourceRoot::open`] with a chosen [`Resolver`].
    pub fn open_with(path: &Path, resolver: Resolver) -> Result<Self, ScanError> {
        let unreadable = |e: io::Error| ScanError::Unreadable { path: path.to_owned(), source: e };
        let md = std::fs::metadata(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ScanError::Missing(path.to_owned()),
            _ => unreadable(e),
        })?;
        if !md.is_dir() {
            return Err(ScanError::NotADirectory(path.to_owned()));
        }
        let fd = rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(
            |e| match e {
                Errno::NOTDIR => ScanError::NotADirectory(path.to_owned()),
                Errno::NOENT => ScanError::Missing(path.to_owned()),
                e => unreadable(e.into()),
            },
        )?;
        let canonical = std::fs::canonicalize(path).map_err(unreadable)?;
        Ok(Self { path: path.to_owned(), canonical, fd, resolver })
    }

    /// The path it was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn resolver(&self) -> Resolver {
        self.resolver
    }

    /// Opens the regular file at `rel` for reading. Refused with a [`SourceChanged`]
    /// error when any component of `rel` is a symbolic link (the last one included) or
    /// the file is not a regular file; never blocks on a FIFO.
    pub fn open_file(&self, rel: &RelPath) -> io::Result<File> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NOCTTY | OFlags::NONBLOCK;
        let fd = self.open_beneath(rel.as_str(), flags).map_err(|e| crossing(rel.as_str(), e))?;
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(SourceChanged::error(rel.as_str(), SourceChanged::NOT_REGULAR));
        }
        // O_NONBLOCK only kept the open from waiting for a FIFO's writer.
        rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
        Ok(File::from(fd))
    }

    /// `lstat` of the entry at `rel`: the last component is not followed, and no other
    /// component may be a symbolic link.
    pub fn stat(&self, rel: &RelPath) -> io::Result<SourceStat> {
        self.at_parent(rel, |dir, name| rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW))
            .map(|st| SourceStat::of(&st))
    }

    /// The target of the symbolic link at `rel` (no other component may be one).
    pub fn read_link(&self, rel: &RelPath) -> io::Result<PathBuf> {
        self.at_parent(rel, |dir, name| rustix::fs::readlinkat(dir, name, Vec::new()))
            .map(|t| PathBuf::from(OsString::from_vec(t.into_bytes())))
    }

    /// Walks the tree without following any symlink: every accepted entry, and every
    /// refused one with its reason. Entries are sorted by path, problems by path.
    pub fn scan(&self) -> Result<Scan, ScanError> {
        let dir = Dir::read_from(&self.fd)
            .map_err(|e| ScanError::Unreadable { path: self.path.clone(), source: e.into() })?;
        let mut out = Scan::default();
        for r in self.walk(dir, None) {
            match r {
                Ok(e) => out.entries.push(e),
                Err(p) => out.problems.push(p),
            }
        }
        out.entries.sort_by(|a, b| a.path.as_str().as_bytes().cmp(b.path.as_str().as_bytes()));
        out.problems.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(out)
    }

    /// Lists one folder, classifies its entries (stats on all cores) and descends into
    /// its subfolders, each opened relative to this folder's descriptor with
    /// `O_NOFOLLOW | O_DIRECTORY`: a folder swapped for a symlink is refused, not listed.
    fn walk(&self, mut dir: Dir, prefix: Option<&RelPath>) -> Vec<Result<ScanEntry, ScanProblem>> {
        let here = || prefix.map_or_else(|| ".".to_owned(), |p| p.to_string());
        let mut out = Vec::new();
        let mut names: Vec<CString> = Vec::new();
        for item in &mut dir {
            match item {
                Ok(d) => {
                    let n = d.file_name();
                    if n.to_bytes() != b"." && n.to_bytes() != b".." {
                        names.push(n.to_owned());
                    }
                }
                Err(e) => {
                    out.push(Err(ScanProblem {
                        path: here(),
                        reason: format!("cannot be read: {}", io::Error::from(e)),
                    }));
                    break;
                }
            }
        }
        names.sort();
        let fd = match dir.fd() {
            Ok(fd) => fd,
            Err(e) => {
                out.push(Err(ScanProblem { path: here(), reason: format!("cannot be read: {}", io::Error::from(e)) }));
                return out;
            }
        };
        let classified: Vec<(Result<ScanEntry, ScanProblem>, &CStr)> =
            names.par_iter().map(|name| (self.classify(fd, prefix, name), name.as_c_str())).collect();
        let mut subdirs = Vec::new();
        for (r, name) in classified {
            if let Ok(e) = &r
                && e.kind == ScanKind::Dir
            {
                subdirs.push((e.path.clone(), name));
            }
            out.push(r);
        }
        let nested: Vec<Vec<Result<ScanEntry, ScanProblem>>> = subdirs
            .into_par_iter()
            .map(|(path, name)| {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                match rustix::fs::openat(fd, name, flags, Mode::empty()).and_then(Dir::new) {
                    Ok(sub) => self.walk(sub, Some(&path)),
                    Err(e) => vec![Err(ScanProblem { path: path.to_string(), reason: folder_open_failed(e) })],
                }
            })
            .collect();
        out.extend(nested.into_iter().flatten());
        out
    }

    /// Stats one entry of the folder `dir` (without following it) and decides what it is.
    fn classify(&self, dir: BorrowedFd<'_>, prefix: Option<&RelPath>, name: &CStr) -> Result<ScanEntry, ScanProblem> {
        let bytes = match prefix {
            Some(p) => [p.as_str().as_bytes(), b"/", name.to_bytes()].concat(),
            None => name.to_bytes().to_vec(),
        };
        let path = RelPath::from_bytes(&bytes)
            .map_err(|e| ScanProblem { path: String::from_utf8_lossy(&bytes).into_owned(), reason: e.to_string() })?;
        let problem = |reason: String| ScanProblem { path: path.to_string(), reason };
        let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| {
            problem(match e {
                Errno::NOENT => "vanished during the scan; refresh again".into(),
                e => format!("cannot be read: {}", io::Error::from(e)),
            })
        })?;
        let st = SourceStat::of(&st);
        let kind = match st.kind {
            SourceKind::Dir => ScanKind::Dir,
            SourceKind::File => ScanKind::File,
            SourceKind::Symlink => ScanKind::Symlink { target: self.check_symlink(dir, name, &path).map_err(problem)? },
            SourceKind::Special => {
                return Err(problem(
                    "is a special file (device, FIFO or socket); only files, folders and symlinks are allowed".into(),
                ));
            }
        };
        Ok(ScanEntry { path, kind, mode: st.mode, stat: st.stat })
    }

    /// Reads a symlink's target and checks that it stays inside the tree, by its text and
    /// where it resolves on disk (a link through another link can leave the tree).
    fn check_symlink(&self, dir: BorrowedFd<'_>, name: &CStr, path: &RelPath) -> Result<String, String> {
        let target =
            rustix::fs::readlinkat(dir, name, Vec::new()).map_err(|e| format!("symlink cannot be read: {e}"))?;
        let target =
            String::from_utf8(target.into_bytes()).map_err(|_| "symlink target is not valid UTF-8".to_owned())?;
        resolve_symlink(path, &target).map_err(|e| format!("{e}; symlinks must stay inside the source folder"))?;
        if let Some(where_to) = self.resolves_outside(path) {
            return Err(format!("symlink points to {target:?}, which resolves {where_to}"));
        }
        Ok(target)
    }

    /// Where the symlink at `path` leads on disk when that is outside the root (`None`
    /// when inside, dangling or unresolvable). Never opens anything but an `O_PATH`.
    fn resolves_outside(&self, path: &RelPath) -> Option<String> {
        if self.use_openat2() {
            let how = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
            match rustix::fs::openat2(&self.fd, path.as_str(), OFlags::PATH | OFlags::CLOEXEC, Mode::empty(), how) {
                Err(Errno::XDEV) => return Some("outside the source folder (through another symlink)".into()),
                Err(e) if self.resolver == Resolver::Auto && openat2_unavailable(e) => {
                    OPENAT2_UNAVAILABLE.store(true, Ordering::Relaxed);
                }
                _ => return None,
            }
        }
        let real = std::fs::canonicalize(self.canonical.join(path.as_str())).ok()?;
        (!real.starts_with(&self.canonical)).then(|| format!("to {} outside the source folder", real.display()))
    }

    fn use_openat2(&self) -> bool {
        match self.resolver {
            Resolver::Openat2 => true,
            Resolver::Chain => false,
            Resolver::Auto => !OPENAT2_UNAVAILABLE.load(Ordering::Relaxed),
        }
    }

    /// Runs `f` on the folder holding `rel` (opened beneath the root, crossing no
    /// symlink) and `rel`'s last component.
    fn at_parent<T>(
        &self,
        rel: &RelPath,
        f: impl FnOnce(BorrowedFd<'_>, &str) -> rustix::io::Result<T>,
    ) -> io::Result<T> {
        let s = rel.as_str();
        let r = match s.rsplit_once('/') {
            None => f(self.fd.as_fd(), s),
            Some((parent, name)) => {
                let flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
                self.open_beneath(parent, flags).and_then(|d| f(d.as_fd(), name))
            }
        };
        r.map_err(|e| crossing(s, e))
    }

    /// Opens `rel` (a validated relative path) under the root, crossing no symlink.
    fn open_beneath(&self, rel: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
        if !self.use_openat2() {
            return self.open_chain(rel, flags);
        }
        let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        let mut r = rustix::fs::openat2(&self.fd, rel, flags, Mode::empty(), how);
        // EAGAIN: the kernel saw a concurrent rename and could not vouch for the walk.
        for _ in 0..4 {
            if !matches!(r, Err(Errno::AGAIN)) {
                break;
            }
            r = rustix::fs::openat2(&self.fd, rel, flags, Mode::empty(), how);
        }
        match r {
            Err(e) if self.resolver == Resolver::Auto && (openat2_unavailable(e) || e == Errno::AGAIN) => {
                let chained = self.open_chain(rel, flags);
                if e == Errno::NOSYS || e == Errno::TOOBIG || (e == Errno::PERM && chained.is_ok()) {
                    OPENAT2_UNAVAILABLE.store(true, Ordering::Relaxed);
                }
                chained
            }
            r => r,
        }
    }

    /// One `openat` per component, each folder with `O_NOFOLLOW | O_DIRECTORY` relative to
    /// the previous one, the last with `flags | O_NOFOLLOW`.
    fn open_chain(&self, rel: &str, flags: OFlags) -> rustix::io::Result<OwnedFd> {
        let (parents, last) = match rel.rsplit_once('/') {
            Some((p, l)) => (Some(p), l),
            None => (None, rel),
        };
        let mut at: Option<OwnedFd> = None;
        for c in parents.into_iter().flat_map(|p| p.split('/')) {
            let dir_flags = OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let next =
                rustix::fs::openat(at.as_ref().map_or(self.fd.as_fd(), |d| d.as_fd()), c, dir_flags, Mode::empty())?;
            at = Some(next);
        }
        rustix::fs::openat(
            at.as_ref().map_or(self.fd.as_fd(), |d| d.as_fd()),
            last,
            flags | OFlags::NOFOLLOW,
            Mode::empty(),
        )
    }
}

/// `openat2` is not there (ENOSYS), does not know our `open_how` (E2BIG), or a seccomp
/// filter refuses it (EPERM).
fn openat2_unavailable(e: Errno) -> bool {
    e == Errno::NOSYS || e == Errno::TOOBIG || e == Errno::PERM
}

/// A symlink where a folder or the file was expected (ELOOP: a symlink; EXDEV: a way out
/// of the root; ENOTDIR: not a folder) is the tree changing under the reader.
fn crossing(path: &str, e: Errno) -> io::Error {
    match e {
        Errno::LOOP | Errno::XDEV | Errno::NOTDIR => SourceChanged::error(path, SourceChanged::REDIRECTED),
        e => e.into(),
    }
}

fn folder_open_failed(e: Errno) -> String {
    match e {
        Errno::LOOP | Errno::NOTDIR => {
            "changed while it was scanned: it is no longer a folder (a symbolic link or a file took its place); \
             refresh again"
                .into()
        }
        Errno::NOENT => "vanished during the scan; refresh again".into(),
        e => format!("cannot be read: {}", io::Error::from(e)),
    }
}
