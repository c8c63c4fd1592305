//! The content library: a single-instance store of whole files keyed by their BLAKE3,
//! used by site servers (what refreshes import) and by DP agents (what versions are
//! built from).
//!
//! Layout under the library root:
//!
//! ```text
//! objects/ab/abcdef…   one file per distinct content, named by its BLAKE3 (hex)
//! tmp/                 files being written; emptied at open
//! ```
//!
//! **Architecture Invariant:** nothing is ever visible under `objects/` that is not
//! whole and fsync'd: files are written in `tmp/`, fsync'd, then renamed; the fan-out
//! directories are fsync'd by [`Library::sync`] before a caller commits anything that
//! names them. The object's name is the hash of the bytes that were actually written,
//! computed while writing, so a name never lies about its content.
//!
//! Garbage collection is mark-and-sweep: the caller names the live hashes (those of the
//! retained versions) and [`Library::sweep`] removes the rest that are older than the
//! sweep's start, so a refresh importing concurrently loses nothing.

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::SystemTime;

use dpsync_hash::{ChunkParams, FileDigest, FileHash, digest_stream};

/// A library operation that failed, naming the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum LibraryError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("content {hash} is not in the library")]
    Missing { hash: FileHash },
    #[error("content {hash} in the library is corrupt (its bytes hash to {actual})")]
    Corrupt { hash: FileHash, actual: FileHash },
    #[error("{path}: written bytes hash to {actual}, expected {expected}")]
    HashMismatch { path: PathBuf, expected: FileHash, actual: FileHash },
}

impl LibraryError {
    /// True when the disk is full: callers report it as such rather than as corruption.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, LibraryError::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC))
    }
}

pub type Result<T> = std::result::Result<T, LibraryError>;

trait IoContext<T> {
    fn at(self, path: &Path) -> Result<T>;
}
impl<T> IoContext<T> for io::Result<T> {
    fn at(self, path: &Path) -> Result<T> {
        self.map_err(|source| LibraryError::Io { path: path.to_owned(), source })
    }
}

/// The outcome of importing one stream.
#[derive(Debug, Clone)]
pub struct Imported {
    pub digest: FileDigest,
    /// False when the content was already in the library (the copy was discarded).
    pub stored_new: bool,
}

/// What a sweep removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepStats {
    pub objects_removed: u64,
    pub bytes_removed: u64,
    pub objects_kept: u64,
}

/// The mode of a stored object: readable by its owner only, never writable (a DP that
/// hard-links an object into a tree gives the inode the entry's mode instead; its data
/// directory is 0700).
pub const OBJECT_MODE: u32 = 0o400;

/// A content library rooted at a directory.
#[derive(Debug)]
pub struct Library {
    root: PathBuf,
    objects: PathBuf,
    tmp: PathBuf,
    dirty_dirs: Mutex<HashSet<PathBuf>>,
    tmp_counter: AtomicU64,
    finisher: Finisher,
}

/// An object written by an [`ImportBatch`], waiting to be made durable and named.
struct Pending {
    file: File,
    tmp: PathBuf,
    hash: FileHash,
    batch: Arc<BatchState>,
}

/// A batch's objects not yet finished, and the first error among them.
#[derive(Debug, Default)]
struct BatchState {
    counts: Mutex<(usize, Option<LibraryError>)>,
    changed: Condvar,
    /// Small objects written but not yet synced: made durable together by one `syncfs`
    /// at [`ImportBatch::finish`], then named.
    small: Mutex<Vec<(PathBuf, FileHash)>>,
}

/// Threads that fsync and rename the objects of import batches, so the threads that
/// hash never wait for the disk. Started on first use; they stop with the library.
#[derive(Debug, Default)]
struct Finisher {
    queue: Mutex<Option<mpsc::Sender<Pending>>>,
}

impl Finisher {
    const THREADS: usize = 4;
}

/// Imports whose fsync and rename run on the library's finisher threads while the
/// caller goes on reading and hashing; objects under 1 MiB are made durable together by
/// one `syncfs` at the end instead. Nothing is named in `objects/` before it is
/// whole and fsync'd, as with [`Library::import`]; the batch's objects are all there,
/// durably, once [`ImportBatch::finish`] returns `Ok`.
#[derive(Debug)]
pub struct ImportBatch {
    lib: Arc<Library>,
    state: Arc<BatchState>,
}

impl ImportBatch {
    /// Objects a batch lets wait at once (each holds a file descriptor).
    const MAX_PENDING: usize = 64;
    /// Objects smaller than this are synced together at the end rather than one by one.
    const SMALL: u64 = 1 << 20;

    /// Reads `reader` once: hashes it, chunks it, and writes a copy whose fsync and
    /// rename into the library happen later. `stored_new` is false only when the content
    /// was already stored when the import started.
    pub fn import<R: Read>(&self, reader: R, params: &ChunkParams) -> Result<Imported> {
        let tmp = self.lib.temp_path();
        let written = create_new(&tmp).and_then(|mut file| {
            let digest = digest_stream(reader, &mut file, params).at(&tmp)?;
            Ok((file, digest))
        });
        let (file, digest) = match written {
            Ok(r) => r,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let stored_new = !self.lib.object_path(&digest.hash).is_file();
        if digest.size < Self::SMALL {
            drop(file);
            self.state.small.lock().unwrap().push((tmp, digest.hash));
            return Ok(Imported { digest, stored_new });
        }
        {
            let counts = self.state.counts.lock().unwrap();
            let mut counts = self.state.changed.wait_while(counts, |c| c.0 >= Self::MAX_PENDING).unwrap();
            counts.0 += 1;
        }
        self.lib
            .finisher_queue()
            .send(Pending { file, tmp, hash: digest.hash, batch: self.state.clone() })
            .expect("finisher threads run while the library exists");
        Ok(Imported { digest, stored_new })
    }

    /// Waits for every object of the batch, then makes the renames durable
    /// ([`Library::sync`]). Returns the first error of any object.
    pub fn finish(self) -> Result<()> {
        let counts = self.state.counts.lock().unwrap();
        let mut counts = self.state.changed.wait_while(counts, |c| c.0 > 0).unwrap();
        if let Some(e) = counts.1.take() {
            return Err(e);
        }
        drop(counts);
        let small = std::mem::take(&mut *self.state.small.lock().unwrap());
        if !small.is_empty() {
            self.lib.sync_filesystem()?;
            for (tmp, hash) in small {
                self.lib.adopt_durable(&tmp, &hash)?;
            }
        }
        self.lib.sync()
    }
}

impl Drop for ImportBatch {
    /// A batch dropped unfinished (a failed refresh) still waits for its objects, so no
    /// write of it outlives the caller's error, and removes the small ones it never named.
    fn drop(&mut self) {
        let counts = self.state.counts.lock().unwrap();
        drop(self.state.changed.wait_while(counts, |c| c.0 > 0));
        for (tmp, _) in std::mem::take(&mut *self.state.small.lock().unwrap()) {
            let _ = fs::remove_file(tmp);
        }
    }
}

impl Library {
    /// Opens (creating if needed) the library at `root`, and clears `tmp/`. The library's
    /// folder is made 0700 (tightened, with a warning, if it was looser): a package's
    /// content is no business of other local users, whatever the source folder allowed.
    pub fn open(root: &Path) -> Result<Self> {
        Self::open_with_tmp(root, &root.join("tmp"))
    }

    /// [`Library::open`] with files being written in `tmp` (cleared here) instead of
    /// `tmp/`: several processes sharing one library each keep their own, so one that
    /// starts never removes another's half-written files. `tmp` must be on the library's
    /// filesystem (a folder beneath `root`).
    pub fn open_with_tmp(root: &Path, tmp: &Path) -> Result<Self> {
        let objects = root.join("objects");
        let tmp = tmp.to_owned();
        fs::create_dir_all(&objects).at(&objects)?;
        let md = fs::metadata(root).at(root)?;
        if md.permissions().mode() & 0o077 != 0 {
            fs::set_permissions(root, fs::Permissions::from_mode(0o700)).at(root)?;
            tracing::warn!(library = %root.display(), "the content library was open to other users; made it 0700");
        }
        if tmp.exists() {
            fs::remove_dir_all(&tmp).at(&tmp)?;
        }
        fs::create_dir_all(&tmp).at(&tmp)?;
        Ok(Self {
            root: root.to_owned(),
            objects,
            tmp,
            dirty_dirs: Mutex::new(HashSet::new()),
            tmp_counter: AtomicU64::new(0),
            finisher: Finisher::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the content with `hash` lives (whether or not it is there).
    pub fn object_path(&self, hash: &FileHash) -> PathBuf {
        let hex = hash.to_hex();
        self.objects.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, hash: &FileHash) -> bool {
        self.object_path(hash).is_file()
    }

    /// A fresh path in `tmp/` (same filesystem as `objects/`, so renames are atomic).
    pub fn temp_path(&self) -> PathBuf {
        let n = self.tmp_counter.fetch_add(1, Ordering::Relaxed);
        self.tmp.join(format!("{}-{n}", std::process::id()))
    }

    /// Reads `reader` once: hashes it, chunks it, and stores a copy under its hash.
    pub fn import<R: Read>(&self, reader: R, params: &ChunkParams) -> Result<Imported> {
        let tmp = self.temp_path();
        let result = (|| {
            let mut file = create_new(&tmp)?;
            let digest = digest_stream(reader, &mut file, params).at(&tmp)?;
            let stored_new = self.adopt_file(file, &tmp, &digest.hash)?;
            Ok(Imported { digest, stored_new })
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Starts a batch of imports whose fsyncs and renames overlap the hashing.
    pub fn import_batch(self: &Arc<Self>) -> ImportBatch {
        ImportBatch { lib: self.clone(), state: Arc::default() }
    }

    fn finisher_queue(self: &Arc<Self>) -> mpsc::Sender<Pending> {
        let mut queue = self.finisher.queue.lock().unwrap();
        queue
            .get_or_insert_with(|| {
                let (tx, rx) = mpsc::channel::<Pending>();
                let rx = Arc::new(Mutex::new(rx));
                for _ in 0..Finisher::THREADS {
                    // Held weakly: dropping the library drops the queue, and the threads end.
                    let (rx, lib) = (rx.clone(), Arc::downgrade(self));
                    std::thread::Builder::new()
                        .name("library-fsync".into())
                        .spawn(move || {
                            loop {
                                let Ok(job) = rx.lock().unwrap().recv() else { return };
                                let result = match lib.upgrade() {
                                    Some(lib) => lib.adopt_file(job.file, &job.tmp, &job.hash).map(|_| ()),
                                    None => Err(LibraryError::Io {
                                        path: job.tmp.clone(),
                                        source: io::Error::other("the library was closed"),
                                    }),
                                };
                                if result.is_err() {
                                    let _ = fs::remove_file(&job.tmp);
                                }
                                let mut counts = job.batch.counts.lock().unwrap();
                                counts.0 -= 1;
                                if let Err(e) = result {
                                    counts.1.get_or_insert(e);
                                }
                                job.batch.changed.notify_all();
                            }
                        })
                        .expect("spawning a library thread");
                }
                tx
            })
            .clone()
    }

    /// Moves a complete file that the caller wrote at `tmp` (from [`Library::temp_path`])
    /// and whose bytes it hashed to `hash` into the library. Returns false when the
    /// content was already there (and `tmp` was discarded).
    pub fn adopt(&self, tmp: &Path, hash: &FileHash) -> Result<bool> {
        let file = File::open(tmp).at(tmp)?;
        self.adopt_file(file, tmp, hash)
    }

    /// Like [`Library::adopt`], for a file whose bytes the caller has already made
    /// durable (e.g. by [`Library::sync_filesystem`] after writing it): no fsync of its own.
    pub fn adopt_durable(&self, tmp: &Path, hash: &FileHash) -> Result<bool> {
        self.adopt_file_synced(None, tmp, hash)
    }

    /// Names `tmp` (a file the caller wrote, hashed to `hash`, and has made durable since,
    /// e.g. by a `syncfs` of the filesystem) as the object `hash`, without a flush of its
    /// own. Unlike [`Library::adopt_durable`], the inode keeps its mode and times when
    /// something else already links it (a version tree placed before the flush); only an
    /// unlinked file gets the objects' mode. With `replace`, content already stored under
    /// `hash` is replaced (a repair); otherwise `tmp` is dropped and false returned (a tree
    /// linking it keeps its inode as a copy of its own).
    pub fn name_durable(&self, tmp: &Path, hash: &FileHash, replace: bool) -> Result<bool> {
        let dest = self.object_path(hash);
        if !replace && dest.is_file() {
            fs::remove_file(tmp).at(tmp)?;
            return Ok(false);
        }
        if fs::metadata(tmp).at(tmp)?.nlink() == 1 {
            fs::set_permissions(tmp, fs::Permissions::from_mode(OBJECT_MODE)).at(tmp)?;
        }
        self.rename_to_object(tmp, &dest)?;
        Ok(true)
    }

    /// Renames `tmp` to the object path `dest`, creating its folder if needed; both
    /// folders are recorded for the next [`Library::sync`].
    fn rename_to_object(&self, tmp: &Path, dest: &Path) -> Result<()> {
        let dir = dest.parent().expect("object paths have a parent");
        if !dir.is_dir() {
            fs::create_dir_all(dir).at(dir)?;
            self.dirty_dirs.lock().unwrap().insert(self.objects.clone());
        }
        fs::rename(tmp, dest).at(dest)?;
        self.dirty_dirs.lock().unwrap().insert(dir.to_owned());
        Ok(())
    }

    /// Makes everything written on the library's filesystem durable with one `syncfs`:
    /// for many small files, one flush instead of one per file.
    pub fn sync_filesystem(&self) -> Result<()> {
        let root = File::open(&self.root).at(&self.root)?;
        rustix::fs::syncfs(&root).map_err(io::Error::from).at(&self.root)
    }

    fn adopt_file(&self, file: File, tmp: &Path, hash: &FileHash) -> Result<bool> {
        self.adopt_file_synced(Some(file), tmp, hash)
    }

    /// Names `tmp` as the object `hash`, after fsyncing `file` (`None`: the caller made
    /// the bytes durable already).
    fn adopt_file_synced(&self, file: Option<File>, tmp: &Path, hash: &FileHash) -> Result<bool> {
        let dest = self.object_path(hash);
        if dest.is_file() {
            fs::remove_file(tmp).at(tmp)?;
            return Ok(false);
        }
        if let Some(file) = file {
            file.sync_all().at(tmp)?;
        }
        fs::set_permissions(tmp, fs::Permissions::from_mode(OBJECT_MODE)).at(tmp)?;
        self.rename_to_object(tmp, &dest)?;
        Ok(true)
    }

    /// Like [`Library::adopt`], but replaces content already stored under `hash` (a repair:
    /// the old copy may be damaged). Trees that hard-link the old inode keep it.
    pub fn adopt_replacing(&self, tmp: &Path, hash: &FileHash) -> Result<()> {
        let dest = self.object_path(hash);
        let file = File::open(tmp).at(tmp)?;
        file.sync_all().at(tmp)?;
        fs::set_permissions(tmp, fs::Permissions::from_mode(OBJECT_MODE)).at(tmp)?;
        let dir = dest.parent().expect("object paths have a parent");
        fs::create_dir_all(dir).at(dir)?;
        fs::rename(tmp, &dest).at(&dest)?;
        self.dirty_dirs.lock().unwrap().insert(dir.to_owned());
        Ok(())
    }

    /// Makes the existing file `holder` (a tree's own copy of the content `hash`, made
    /// durable by its tree) the library's object for `hash`, by a hard link, replacing
    /// the object there: no bytes are copied and `holder`'s mode and times are kept.
    pub fn adopt_link(&self, holder: &Path, hash: &FileHash) -> Result<()> {
        let dest = self.object_path(hash);
        let tmp = self.temp_path();
        fs::hard_link(holder, &tmp).at(holder)?;
        let dir = dest.parent().expect("object paths have a parent");
        let placed = fs::create_dir_all(dir).at(dir).and_then(|()| fs::rename(&tmp, &dest).at(&dest));
        if placed.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        placed?;
        self.dirty_dirs.lock().unwrap().insert(dir.to_owned());
        Ok(())
    }

    /// Verifies an assembled temp file against `expected` and adopts it.
    pub fn adopt_verified(&self, tmp: &Path, expected: &FileHash) -> Result<bool> {
        let actual = hash_file(tmp)?;
        if actual != *expected {
            let _ = fs::remove_file(tmp);
            return Err(LibraryError::HashMismatch { path: tmp.to_owned(), expected: *expected, actual });
        }
        self.adopt(tmp, expected)
    }

    /// Makes every rename since the last call durable (fsyncs the directories touched).
    pub fn sync(&self) -> Result<()> {
        let dirs: Vec<PathBuf> = self.dirty_dirs.lock().unwrap().drain().collect();
        if dirs.len() > 8 {
            return self.sync_filesystem();
        }
        for d in dirs {
            File::open(&d).and_then(|f| f.sync_all()).at(&d)?;
        }
        Ok(())
    }

    /// Opens stored content for reading.
    pub fn open_object(&self, hash: &FileHash) -> Result<File> {
        let p = self.object_path(hash);
        File::open(&p).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LibraryError::Missing { hash: *hash },
            _ => LibraryError::Io { path: p, source: e },
        })
    }

    /// Reads `len` bytes at `offset` of stored content (a chunk).
    pub fn read_range(&self, hash: &FileHash, offset: u64, len: usize) -> Result<Vec<u8>> {
        let f = self.open_object(hash)?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).at(&self.object_path(hash))?;
        Ok(buf)
    }

    /// Re-reads stored content and checks it against its name.
    pub fn verify(&self, hash: &FileHash) -> Result<()> {
        let p = self.object_path(hash);
        if !p.is_file() {
            return Err(LibraryError::Missing { hash: *hash });
        }
        let actual = hash_file(&p)?;
        if actual != *hash {
            return Err(LibraryError::Corrupt { hash: *hash, actual });
        }
        Ok(())
    }

    /// Removes stored content (e.g. found corrupt).
    pub fn remove(&self, hash: &FileHash) -> Result<()> {
        let p = self.object_path(hash);
        match fs::remove_file(&p) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(LibraryError::Io { path: p, source: e }),
            _ => Ok(()),
        }
    }

    /// Every hash stored.
    pub fn list(&self) -> Result<Vec<FileHash>> {
        let mut out = Vec::new();
        for fan in fs::read_dir(&self.objects).at(&self.objects)? {
            let fan = fan.at(&self.objects)?.path();
            if !fan.is_dir() {
                continue;
            }
            for obj in fs::read_dir(&fan).at(&fan)? {
                let obj = obj.at(&fan)?;
                if let Some(h) = obj.file_name().to_str().and_then(|n| FileHash::from_hex(n).ok()) {
                    out.push(h);
                }
            }
        }
        Ok(out)
    }

    /// Removes every object not in `live` whose file was last changed before `started`.
    pub fn sweep(&self, live: &HashSet<FileHash>, started: SystemTime) -> Result<SweepStats> {
        let mut stats = SweepStats::default();
        for h in self.list()? {
            if live.contains(&h) {
                stats.objects_kept += 1;
                continue;
            }
            let p = self.object_path(&h);
            let Ok(md) = fs::symlink_metadata(&p) else { continue };
            if md.modified().map(|m| m >= started).unwrap_or(true) {
                stats.objects_kept += 1;
                continue;
            }
            self.remove(&h)?;
            stats.objects_removed += 1;
            stats.bytes_removed += md.len();
        }
        self.sync()?;
        Ok(stats)
    }
}

fn create_new(path: &Path) -> Result<File> {
    OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).at(path)
}

/// BLAKE3 of a file on disk, streaming.
pub fn hash_file(path: &Path) -> Result<FileHash> {
    let mut f = File::open(path).at(path)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(FileHash::from(h.finalize()))
}

/// Writes `data` to `dest` durably: temp file beside it, fsync, rename, fsync the dir.
pub fn write_atomic(dest: &Path, data: &[u8]) -> io::Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let tmp =
        dir.join(format!(".{}.tmp-{}", dest.file_name().unwrap_or_default().to_string_lossy(), std::process::id()));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dest)?;
    File::open(dir)?.sync_all()
}
