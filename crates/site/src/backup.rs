//! `dpsync backup` (a consistent snapshot of a running site) and `dpsync restore` (lay a
//! backup out as the data directory of a new server, offline).
//!
//! A backup folder holds:
//!
//! ```text
//! backup.json          what is in it: format, site, dpsync version, database backend,
//!                      and the size and BLAKE3 of every file below (written last: a
//!                      folder without it is not a backup, or one that did not finish)
//! dpsync.db            the SQLite database (`VACUUM INTO`: one consistent state of it)
//! receive.db           a child site's receiving database, when there is one
//! site.key             the signing key DPs and child sites have pinned
//! tls/                 the self-signed certificate, its key and fingerprint
//! trusted-sites.json   other sites' pinned keys
//! package-owners.json  ownership chains of packages handed to another site (if any)
//! server.toml          the configuration file the server was started with
//! library/objects/…    with --with-library: the content library (hard links where the
//!                      backup is on the same filesystem, copies otherwise)
//! ```
//!
//! **Consistency:** the backup holds the garbage-collection lock shared from before the
//! database copy until the last object is copied, so no object leaves the library
//! meanwhile; and a version is committed only once every file it names is in the library.
//! So every object the copied database names is among those copied after it. Restore
//! checks it again against the restored database.
//!
//! Everything written is private (files 0600, objects 0400, folders 0700): the backup
//! holds the site key and the targets' tokens.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use dpsync_api::{BackupProgress, BackupReport, BackupRequest, LibraryCopy, RestoreReport};
use dpsync_hash::{DecodeLimits, FileHash, Manifest};
use dpsync_library::Library;
use dpsync_store::{Backend, Store, now_ms};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{Site, SiteError};

/// The name of a backup's manifest.
pub const MANIFEST: &str = "backup.json";
/// `format` in every `backup.json`.
pub const FORMAT: &str = "dpsync-backup";
/// The newest layout this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const DATABASE: &str = "dpsync.db";
const RECEIVE_DATABASE: &str = "receive.db";
const SITE_KEY: &str = "site.key";
const TRUST_STORE: &str = "trusted-sites.json";
/// Ownership chains of packages handed to another site, kept beside the trust store.
const OWNERS: &str = "package-owners.json";
const CONFIG: &str = "server.toml";
const TLS: &str = "tls";
const LIBRARY: &str = "library";
/// The files of `DATA_DIR/tls` a backup takes.
const TLS_FILES: [&str; 3] = ["cert.pem", "key.pem", "fingerprint"];

/// `backup.json`: the on-disk description of a backup (format version 1).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupManifest {
    pub format: String,
    pub format_version: u32,
    pub site_code: String,
    pub dpsync_version: String,
    /// Unix milliseconds.
    pub created_at: i64,
    /// The data directory the backup was taken from.
    pub data_dir: String,
    pub database: DatabaseEntry,
    pub receive_database: bool,
    pub site_key: bool,
    pub tls: bool,
    pub trust_store: bool,
    pub config: Option<ConfigEntry>,
    pub library: LibraryEntry,
    /// Every file but the library objects (which are named by their BLAKE3): path
    /// relative to the backup folder → size and BLAKE3.
    pub files: BTreeMap<String, FileEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatabaseEntry {
    /// `sqlite` or `postgres`.
    pub backend: String,
    /// False for PostgreSQL (backed up by its administrator with `pg_dump -Fc`).
    pub included: bool,
    /// The store's schema version when the backup was taken.
    pub schema_version: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConfigEntry {
    /// Where the server's configuration file was.
    pub original_path: String,
    /// Its copy in the backup.
    pub file: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LibraryEntry {
    pub included: bool,
    pub objects: u64,
    pub bytes: u64,
    /// `hardlink`, `copy` or `mixed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub size: u64,
    pub blake3: String,
}

// ---------------------------------------------------------------------------------------
// Progress

/// Live progress of a backup (on the server) or a restore (in the CLI).
#[derive(Debug)]
pub struct Progress {
    dir: String,
    phase: Mutex<&'static str>,
    objects_done: AtomicU64,
    objects_total: AtomicU64,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    started_ms: i64,
}

impl Progress {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.display().to_string(),
            phase: Mutex::new("starting"),
            objects_done: AtomicU64::new(0),
            objects_total: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            started_ms: now_ms(),
        }
    }

    fn phase(&self, phase: &'static str) {
        *self.phase.lock().unwrap() = phase;
    }

    pub fn snapshot(&self) -> BackupProgress {
        BackupProgress {
            running: true,
            dir: Some(self.dir.clone()),
            phase: (*self.phase.lock().unwrap()).to_owned(),
            objects_done: self.objects_done.load(Relaxed),
            objects_total: self.objects_total.load(Relaxed),
            bytes_done: self.bytes_done.load(Relaxed),
            bytes_total: self.bytes_total.load(Relaxed),
            started_ms: self.started_ms,
        }
    }
}

/// The backup a site is running, if any (one at a time).
#[derive(Debug, Default)]
pub(crate) struct Running(Mutex<Option<Arc<Progress>>>);

/// Clears [`Running`] when the backup ends, however it ends.
struct RunningGuard<'a>(&'a Running);

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        *self.0.0.lock().unwrap() = None;
    }
}

// ---------------------------------------------------------------------------------------
// Backup (on the running server)

impl Site {
    /// `GET /v1/backup`.
    pub fn backup_progress(&self) -> BackupProgress {
        match &*self.backup.0.lock().unwrap() {
            Some(p) => p.snapshot(),
            None => BackupProgress::default(),
        }
    }

    /// `POST /v1/backup`: writes a consistent snapshot of this running site into
    /// `req.dir`. The work runs in its own task: a client that goes away does not leave
    /// a half-written backup behind.
    pub async fn backup(self: &Arc<Self>, req: BackupRequest) -> Result<BackupReport, SiteError> {
        let dir = PathBuf::from(&req.dir);
        if !dir.is_absolute() {
            return Err(SiteError::Invalid(format!("backup folder {:?} must be an absolute path", req.dir)));
        }
        self.refuse_inside_data_dir(&dir)?;
        let progress = Arc::new(Progress::new(&dir));
        {
            let mut running = self.backup.0.lock().unwrap();
            if let Some(other) = &*running {
                return Err(SiteError::Conflict(format!(
                    "a backup into {} is running; wait for it to finish",
                    other.dir
                )));
            }
            *running = Some(progress.clone());
        }
        let site = self.clone();
        let task = tokio::spawn(async move {
            let _running = RunningGuard(&site.backup);
            let created = prepare_dir(&dir)?;
            let result = site.write_backup(&dir, req.with_library, &progress).await;
            if result.is_err() {
                // Nothing in the folder is of use without backup.json; all of it is ours.
                clear_dir(&dir, created);
            }
            result
        });
        let report = task.await.map_err(|e| SiteError::Internal(anyhow!("backup task: {e}")))??;
        tracing::info!(
            dir = %report.dir,
            library_objects = report.library.as_ref().map(|l| l.objects).unwrap_or(0),
            ms = report.duration_ms,
            "backup written"
        );
        Ok(report)
    }

    /// A backup inside the data directory would be lost with it (and a library copy
    /// inside the library would copy itself).
    fn refuse_inside_data_dir(&self, dir: &Path) -> Result<(), SiteError> {
        let data = fs::canonicalize(&self.cfg.data_dir).unwrap_or_else(|_| self.cfg.data_dir.clone());
        let mut probe = dir.to_path_buf();
        let mut rest = Vec::new();
        while !probe.exists() {
            match (probe.file_name(), probe.parent()) {
                (Some(name), Some(parent)) => {
                    rest.push(name.to_owned());
                    probe = parent.to_path_buf();
                }
                _ => break,
            }
        }
        let mut real = fs::canonicalize(&probe).unwrap_or(probe);
        real.extend(rest.iter().rev());
        if real.starts_with(&data) {
            return Err(SiteError::Invalid(format!(
                "backup folder {} is inside the data directory {}; write backups elsewhere (ideally another disk)",
                dir.display(),
                data.display()
            )));
        }
        Ok(())
    }

    async fn write_backup(
        &self,
        dir: &Path,
        with_library: bool,
        progress: &Arc<Progress>,
    ) -> Result<BackupReport, SiteError> {
        let started = Instant::now();
        let data = &self.cfg.data_dir;
        // Held until the last object is copied: gc removes nothing meanwhile.
        let _gc_shared = self.gc_lock.read().await;
        let mut notes = Vec::new();
        let mut files = BTreeMap::new();

        progress.phase("database");
        // The receiving database first: a version it records as arrived is then always
        // in the site database copied after it (as after a crash between the two).
        let receive = data.join(RECEIVE_DATABASE);
        let receive_database = receive.is_file();
        if receive_database {
            let dest = dir.join(RECEIVE_DATABASE);
            create_private(&dest)?;
            dpsync_store::snapshot_sqlite_file(&receive, &dest)
                .await
                .with_context(|| format!("cannot copy {}", receive.display()))?;
        }
        let backend = self.store.backend();
        let database = match backend {
            Backend::Sqlite => {
                let dest = dir.join(DATABASE);
                create_private(&dest)?;
                self.store.snapshot_into(&dest).await.context("cannot copy the database")?;
                DatabaseEntry {
                    backend: backend.as_str().into(),
                    included: true,
                    schema_version: dpsync_store::SCHEMA_VERSION,
                    note: None,
                }
            }
            Backend::Postgres => {
                let note = "the PostgreSQL database is not in this backup: its administrator backs it up \
                            (pg_dump -Fc) and restores it with pg_restore into an empty database before \
                            `dpsync restore`"
                    .to_owned();
                notes.push(note.clone());
                DatabaseEntry {
                    backend: backend.as_str().into(),
                    included: false,
                    schema_version: dpsync_store::SCHEMA_VERSION,
                    note: Some(note),
                }
            }
        };

        progress.phase("files");
        let mut copies: Vec<(PathBuf, String)> = Vec::new();
        // In the data directory, or in the library given by --library.
        let site_key = self.cfg.site_key_path.is_file();
        if site_key {
            copies.push((self.cfg.site_key_path.clone(), SITE_KEY.into()));
        }
        let trust_store = data.join(TRUST_STORE).is_file();
        if trust_store {
            copies.push((data.join(TRUST_STORE), TRUST_STORE.into()));
        }
        if data.join(OWNERS).is_file() {
            copies.push((data.join(OWNERS), OWNERS.into()));
        }
        let mut tls = false;
        for name in TLS_FILES {
            let p = data.join(TLS).join(name);
            if p.is_file() {
                tls = true;
                copies.push((p, format!("{TLS}/{name}")));
            }
        }
        let config = self
            .cfg
            .config_file
            .as_ref()
            .map(|p| ConfigEntry { original_path: p.display().to_string(), file: CONFIG.into() });
        if let Some(p) = &self.cfg.config_file {
            copies.push((p.clone(), CONFIG.into()));
        }
        if let Some(cert) = &self.cfg.tls.cert {
            notes.push(format!(
                "the TLS certificate and key given with --tls-cert/--tls-key ({}) are not in this backup; \
                 back them up with the rest of your certificates",
                cert.display()
            ));
        }
        if self.cfg.listen_token.is_some() {
            notes.push(
                "the token parent sites present (--token / --token-file) is not in this backup; give it again \
                 when starting the restored site"
                    .into(),
            );
        }
        let dir_owned = dir.to_path_buf();
        let db_files: Vec<String> = [(receive_database, RECEIVE_DATABASE), (database.included, DATABASE)]
            .into_iter()
            .filter(|(present, _)| *present)
            .map(|(_, name)| name.to_owned())
            .collect();
        let written = tokio::task::spawn_blocking(move || -> Result<BTreeMap<String, FileEntry>> {
            let mut out = BTreeMap::new();
            for name in db_files {
                let p = dir_owned.join(&name);
                let f = File::open(&p).with_context(|| format!("cannot open {}", p.display()))?;
                f.sync_all().with_context(|| format!("cannot sync {}", p.display()))?;
                out.insert(name, hash_existing(&p)?);
            }
            for (src, rel) in copies {
                let dest = dir_owned.join(&rel);
                if let Some(parent) = dest.parent() {
                    make_private_dir(parent)?;
                }
                let entry = copy_hashed(&src, &dest, 0o600)?;
                out.insert(rel, entry);
            }
            Ok(out)
        })
        .await
        .context("backup task")??;
        files.extend(written);

        let library = if with_library {
            progress.phase("library");
            let (src, dest, p) = (self.library.clone(), dir.join(LIBRARY), progress.clone());
            let copied =
                tokio::task::spawn_blocking(move || copy_library(&src, &dest, &p)).await.context("backup task")??;
            if copied.copied > 0 && copied.linked == 0 {
                notes.push(format!(
                    "{} is not on the library's filesystem: the library was copied, not hard-linked",
                    dir.display()
                ));
            }
            Some(copied)
        } else {
            notes.push(
                "the content library is not in this backup: after a restore, the next refresh of each package \
                 re-reads its whole source; until then that package cannot be redistributed or sent to a new DP"
                    .into(),
            );
            None
        };

        progress.phase("manifest");
        let manifest = BackupManifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            site_code: self.cfg.site_code.clone(),
            dpsync_version: env!("CARGO_PKG_VERSION").into(),
            created_at: progress.started_ms,
            data_dir: data.display().to_string(),
            database: database.clone(),
            receive_database,
            site_key,
            tls,
            trust_store,
            config: config.clone(),
            library: match &library {
                Some(l) => {
                    LibraryEntry { included: true, objects: l.objects, bytes: l.bytes, method: Some(l.method.clone()) }
                }
                None => LibraryEntry::default(),
            },
            files: files.clone(),
        };
        let text = serde_json::to_vec_pretty(&manifest).context("encoding backup.json")?;
        let dir_owned = dir.to_path_buf();
        tokio::task::spawn_blocking(move || write_private_atomic(&dir_owned.join(MANIFEST), &text))
            .await
            .context("backup task")??;
        Ok(BackupReport {
            dir: dir.display().to_string(),
            site_code: manifest.site_code,
            dpsync_version: manifest.dpsync_version,
            created_at: manifest.created_at,
            database: database.backend,
            database_included: database.included,
            receive_database,
            site_key,
            tls,
            trust_store,
            config: config.map(|c| c.original_path),
            library,
            files: files.len() as u64,
            bytes: files.values().map(|f| f.size).sum(),
            duration_ms: started.elapsed().as_millis() as u64,
            notes,
        })
    }
}

/// Creates the backup folder (0700) or checks that the existing one is empty. Returns
/// whether it was created.
fn prepare_dir(dir: &Path) -> Result<bool, SiteError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if let Some(first) = entries.next() {
                let name = first.map(|e| e.file_name().to_string_lossy().into_owned()).unwrap_or_default();
                return Err(SiteError::Refused(format!(
                    "backup folder {} is not empty (it holds {name:?}); back up into a new or empty folder",
                    dir.display()
                )));
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot make {} private (chmod 700)", dir.display()))?;
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            make_private_dir(dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotADirectory => {
            Err(SiteError::Refused(format!("backup folder {} is a file, not a folder", dir.display())))
        }
        Err(e) => Err(SiteError::Refused(format!("cannot use {} as the backup folder: {e}", dir.display()))),
    }
}

/// Removes what a failed backup or restore wrote into `dir` (and `dir` if it made it).
fn clear_dir(dir: &Path, created: bool) {
    let result = if created {
        fs::remove_dir_all(dir)
    } else {
        fs::read_dir(dir).and_then(|rd| {
            for e in rd {
                let p = e?.path();
                if p.is_dir() { fs::remove_dir_all(&p)? } else { fs::remove_file(&p)? }
            }
            Ok(())
        })
    };
    if let Err(e) = result {
        tracing::warn!(dir = %dir.display(), "cannot remove what the failed run wrote: {e}");
    }
}

/// Copies every object of `src` into a library at `dest`, hard-linking where the
/// filesystem allows and copying otherwise; every object is read and checked against its
/// name on the way (a hard-linked one after linking).
fn copy_library(src: &Library, dest: &Path, progress: &Progress) -> Result<LibraryCopy> {
    let objects = src.list().context("cannot list the content library")?;
    let sized: Vec<(FileHash, u64)> =
        objects.into_iter().filter_map(|h| fs::metadata(src.object_path(&h)).ok().map(|m| (h, m.len()))).collect();
    progress.objects_total.store(sized.len() as u64, Relaxed);
    progress.bytes_total.store(sized.iter().map(|(_, n)| n).sum(), Relaxed);
    place_objects(&sized, |h| src.object_path(h), dest, progress)
}

/// What [`place_objects`] did.
fn place_objects(
    objects: &[(FileHash, u64)],
    source_of: impl Fn(&FileHash) -> PathBuf + Sync,
    dest: &Path,
    progress: &Progress,
) -> Result<LibraryCopy> {
    make_private_dir(dest)?;
    let lib = Library::open(dest).with_context(|| format!("cannot create the library {}", dest.display()))?;
    make_private_dir(&dest.join("objects"))?;
    let links_work = AtomicBool::new(true);
    let (linked, copied, bytes) = (AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0));
    objects.par_iter().try_for_each(|(hash, _)| -> Result<()> {
        let from = source_of(hash);
        let to = lib.object_path(hash);
        let fan = to.parent().expect("object paths have a parent");
        if !fan.is_dir() {
            match fs::DirBuilder::new().mode(0o700).create(fan) {
                Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
                    return Err(anyhow!("cannot create {}: {e}", fan.display()));
                }
                _ => {}
            }
        }
        if links_work.load(Relaxed) {
            match fs::hard_link(&from, &to) {
                Ok(()) => {
                    let actual = dpsync_library::hash_file(&to)?;
                    if actual != *hash {
                        let _ = fs::remove_file(&to);
                        bail!("library object {} is damaged (its bytes hash to {actual})", from.display());
                    }
                    let size = fs::metadata(&to).map(|m| m.len()).unwrap_or(0);
                    linked.fetch_add(1, Relaxed);
                    bytes.fetch_add(size, Relaxed);
                    progress.objects_done.fetch_add(1, Relaxed);
                    progress.bytes_done.fetch_add(size, Relaxed);
                    return Ok(());
                }
                Err(e) if link_unsupported(&e) => links_work.store(false, Relaxed),
                Err(e) => return Err(anyhow!("cannot link {} to {}: {e}", from.display(), to.display())),
            }
        }
        let tmp = lib.temp_path();
        let entry = copy_hashed(&from, &tmp, 0o600)?;
        if entry.blake3 != hash.to_hex() {
            let _ = fs::remove_file(&tmp);
            bail!("library object {} is damaged (its bytes hash to {})", from.display(), entry.blake3);
        }
        fs::set_permissions(&tmp, fs::Permissions::from_mode(dpsync_library::OBJECT_MODE))
            .with_context(|| format!("cannot set the mode of {}", tmp.display()))?;
        fs::rename(&tmp, &to).with_context(|| format!("cannot rename {} to {}", tmp.display(), to.display()))?;
        copied.fetch_add(1, Relaxed);
        bytes.fetch_add(entry.size, Relaxed);
        progress.objects_done.fetch_add(1, Relaxed);
        progress.bytes_done.fetch_add(entry.size, Relaxed);
        Ok(())
    })?;
    lib.sync_filesystem().with_context(|| format!("cannot sync {}", dest.display()))?;
    let tmp = dest.join("tmp");
    drop(lib);
    let _ = fs::remove_dir(&tmp);
    let (linked, copied) = (linked.into_inner(), copied.into_inner());
    let method = match (linked, copied) {
        (_, 0) => "hardlink",
        (0, _) => "copy",
        _ => "mixed",
    };
    Ok(LibraryCopy { objects: linked + copied, bytes: bytes.into_inner(), linked, copied, method: method.into() })
}

/// A hard link that cannot be made here (another filesystem, or one without links), so
/// a copy is made instead.
fn link_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EXDEV | libc::EPERM | libc::EMLINK | libc::EOPNOTSUPP))
}

// ---------------------------------------------------------------------------------------
// Restore (offline: no server runs on the new data directory)

/// What `dpsync restore` is asked to do.
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// The backup folder.
    pub backup_dir: PathBuf,
    /// The new data directory (absent or empty).
    pub data_dir: PathBuf,
    /// For a backup of a PostgreSQL site: the database restored with `pg_restore`, to be
    /// checked (site code, library complete) and fixed up (scan caches, without library).
    pub database_url: Option<String>,
}

/// Reads and checks `DIR/backup.json`.
pub fn read_manifest(dir: &Path) -> Result<BackupManifest> {
    let path = dir.join(MANIFEST);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            bail!("{} has no {MANIFEST}: it is not a dpsync backup, or the backup did not finish", dir.display())
        }
        Err(e) => bail!("cannot read {}: {e}", path.display()),
    };
    #[derive(Deserialize)]
    struct Head {
        format: String,
        format_version: u32,
    }
    let head: Head = serde_json::from_slice(&text)
        .with_context(|| format!("{} is damaged or not a dpsync backup manifest", path.display()))?;
    if head.format != FORMAT {
        bail!("{} is not a dpsync backup manifest (format {:?})", path.display(), head.format);
    }
    if head.format_version > FORMAT_VERSION {
        bail!(
            "the backup in {} has format version {}, newer than this dpsync knows ({FORMAT_VERSION}); \
             restore it with the dpsync that wrote it or a newer one",
            dir.display(),
            head.format_version
        );
    }
    let m: BackupManifest = serde_json::from_slice(&text).with_context(|| format!("{} is damaged", path.display()))?;
    if m.database.schema_version > dpsync_store::SCHEMA_VERSION {
        bail!(
            "the backup's database has schema version {}, newer than this dpsync knows ({}); \
             restore it with dpsync {} or newer",
            m.database.schema_version,
            dpsync_store::SCHEMA_VERSION,
            m.dpsync_version
        );
    }
    for rel in m.files.keys() {
        if !allowed_file(rel) {
            bail!("{} names a file {rel:?} that is not part of a backup; refusing it", path.display());
        }
    }
    for (wanted, name) in [
        (m.database.included, DATABASE),
        (m.receive_database, RECEIVE_DATABASE),
        (m.site_key, SITE_KEY),
        (m.trust_store, TRUST_STORE),
    ] {
        if wanted && !m.files.contains_key(name) {
            bail!("{} says the backup holds {name} but lists no such file; it is damaged", path.display());
        }
    }
    Ok(m)
}

/// The files a backup may hold besides the library: nothing a manifest names can land
/// outside the new data directory.
fn allowed_file(rel: &str) -> bool {
    let parts: Vec<Component> = Path::new(rel).components().collect();
    match parts.as_slice() {
        [Component::Normal(name)] => {
            [DATABASE, RECEIVE_DATABASE, SITE_KEY, TRUST_STORE, OWNERS, CONFIG].iter().any(|n| name.to_str() == Some(n))
        }
        [Component::Normal(tls), Component::Normal(name)] => {
            tls.to_str() == Some(TLS) && TLS_FILES.iter().any(|n| name.to_str() == Some(n))
        }
        _ => false,
    }
}

/// Lays the backup in `opts.backup_dir` out as the data directory `opts.data_dir`, which
/// must be absent or empty; on any failure, what was written there is removed again.
pub async fn restore(opts: RestoreOptions, progress: Arc<Progress>) -> Result<RestoreReport> {
    let started = Instant::now();
    let backup =
        std::path::absolute(&opts.backup_dir).with_context(|| format!("invalid path {}", opts.backup_dir.display()))?;
    let new =
        std::path::absolute(&opts.data_dir).with_context(|| format!("invalid path {}", opts.data_dir.display()))?;
    progress.phase("checking");
    let manifest = read_manifest(&backup)?;
    let postgres = manifest.database.backend == Backend::Postgres.as_str();
    if opts.database_url.is_some() && !postgres {
        bail!(
            "this backup holds a {} database, laid out as {DATABASE} in the new data directory; \
             --database-url is for backups of a PostgreSQL site",
            manifest.database.backend
        );
    }
    if let Some(url) = &opts.database_url
        && !(url.starts_with("postgres://") || url.starts_with("postgresql://"))
    {
        bail!("--database-url must be the postgres://… URL of the database restored with pg_restore");
    }
    if new.starts_with(&backup) || backup.starts_with(&new) {
        bail!("the new data directory and the backup folder must not contain one another");
    }
    let created = prepare_new_data_dir(&new)?;
    let result = lay_out(&backup, &new, &manifest, &opts, &progress).await;
    match result {
        Ok((library, scan_caches_cleared, database_checked, mut notes)) => {
            let mut start = format!(
                "dpsync server --data-dir {} --site-code {}",
                shell_word(&new.display().to_string()),
                manifest.site_code
            );
            if postgres {
                let url = opts.database_url.as_deref().map(super::redact_url);
                start.push_str(&format!(" --database-url {}", url.as_deref().unwrap_or("postgres://…")));
            }
            let config = manifest.config.as_ref().map(|_| new.join(CONFIG).display().to_string());
            if let (Some(c), Some(entry)) = (&config, &manifest.config) {
                start.push_str(&format!(" --config {}", shell_word(c)));
                notes.push(format!(
                    "the configuration file (it was {}) is now {c}: check data_dir, socket and database_url in it",
                    entry.original_path
                ));
            }
            if !manifest.library.included {
                notes.push(if scan_caches_cleared {
                    "the content library is empty (the backup holds none): the next refresh of each package \
                     re-reads its whole source folder and imports it; the DPs still receive only what changed. \
                     Until a package has been refreshed it cannot be redistributed (`dpsync redistribute`), sent \
                     to a new DP or repaired, and a rollback works only for targets that still hold the old version"
                        .into()
                } else {
                    "the content library is empty (the backup holds none) and the database was not given \
                     (--database-url): run `dpsync refresh PKG --verify` for every package once the server runs, \
                     so that its source is imported again; until then packages cannot be redistributed"
                        .into()
                });
            }
            if postgres && opts.database_url.is_none() {
                notes.push(
                    "the PostgreSQL database is not in the backup: restore it first (pg_restore into an empty \
                     database), then start the server with --database-url pointing at it"
                        .into(),
                );
            }
            Ok(RestoreReport {
                backup_dir: backup.display().to_string(),
                data_dir: new.display().to_string(),
                site_code: manifest.site_code.clone(),
                backup_created_at: manifest.created_at,
                database: manifest.database.backend.clone(),
                database_restored: manifest.database.included,
                database_checked,
                receive_database: manifest.receive_database,
                site_key: manifest.site_key,
                tls: manifest.tls,
                trust_store: manifest.trust_store,
                config,
                config_original: manifest.config.as_ref().map(|c| c.original_path.clone()),
                library,
                scan_caches_cleared,
                start,
                duration_ms: started.elapsed().as_millis() as u64,
                notes,
            })
        }
        Err(e) => {
            clear_dir(&new, created);
            Err(e.context("nothing was restored"))
        }
    }
}

/// The new data directory: created 0700, or an existing empty folder (made 0700).
fn prepare_new_data_dir(new: &Path) -> Result<bool> {
    match fs::read_dir(new) {
        Ok(entries) => {
            let names: Vec<String> =
                entries.filter_map(|e| e.ok()).take(3).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            if !names.is_empty() {
                bail!(
                    "the new data directory {} is not empty (it holds {}); restore only into a new or empty \
                     folder, so that nothing of another server is mixed in",
                    new.display(),
                    names.join(", ")
                );
            }
            fs::set_permissions(new, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("cannot make {} private (chmod 700)", new.display()))?;
            Ok(false)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            make_private_dir(new)?;
            Ok(true)
        }
        Err(e) => bail!("cannot use {} as the new data directory: {e}", new.display()),
    }
}

type LaidOut = (Option<LibraryCopy>, bool, bool, Vec<String>);

async fn lay_out(
    backup: &Path,
    new: &Path,
    manifest: &BackupManifest,
    opts: &RestoreOptions,
    progress: &Arc<Progress>,
) -> Result<LaidOut> {
    let mut notes = Vec::new();
    progress.phase("files");
    let (b, n, files) = (backup.to_path_buf(), new.to_path_buf(), manifest.files.clone());
    tokio::task::spawn_blocking(move || -> Result<()> {
        for (rel, want) in &files {
            let (src, dest) = (b.join(rel), n.join(rel));
            if !src.is_file() {
                bail!("the backup is damaged: {rel} is missing from {}", b.display());
            }
            if let Some(parent) = dest.parent() {
                make_private_dir(parent)?;
            }
            let got = copy_hashed(&src, &dest, 0o600)?;
            if got.size != want.size {
                bail!(
                    "the backup is damaged: {rel} does not match {MANIFEST} (it has {} bytes, expected {})",
                    got.size,
                    want.size
                );
            }
            if got.blake3 != want.blake3 {
                bail!(
                    "the backup is damaged: {rel} does not match {MANIFEST} (its BLAKE3 is {}, expected {})",
                    got.blake3,
                    want.blake3
                );
            }
        }
        Ok(())
    })
    .await
    .context("restore task")??;

    let library = if manifest.library.included {
        progress.phase("library");
        let (b, n, p, expected) = (backup.join(LIBRARY), new.join(LIBRARY), progress.clone(), manifest.library.clone());
        Some(
            tokio::task::spawn_blocking(move || -> Result<LibraryCopy> {
                let objects = backup_objects(&b)?;
                let bytes: u64 = objects.iter().map(|(_, n)| n).sum();
                if objects.len() as u64 != expected.objects || bytes != expected.bytes {
                    bail!(
                        "the backup is damaged: its library holds {} objects ({bytes} bytes), {MANIFEST} says {} \
                         ({} bytes)",
                        objects.len(),
                        expected.objects,
                        expected.bytes
                    );
                }
                p.objects_total.store(objects.len() as u64, Relaxed);
                p.bytes_total.store(bytes, Relaxed);
                let objects_dir = b.join("objects");
                place_objects(
                    &objects,
                    |h| {
                        let hex = h.to_hex();
                        objects_dir.join(&hex[..2]).join(hex)
                    },
                    &n,
                    &p,
                )
                .map_err(|e| e.context("the backup's library"))
            })
            .await
            .context("restore task")??,
        )
    } else {
        make_private_dir(&new.join(LIBRARY))?;
        None
    };

    progress.phase("database");
    let url = if manifest.database.included {
        Some(format!("sqlite://{}", new.join(DATABASE).display()))
    } else {
        opts.database_url.clone()
    };
    let mut scan_caches_cleared = false;
    let database_checked = url.is_some();
    if let Some(url) = url {
        let store = Store::connect(&url)
            .await
            .with_context(|| format!("cannot open the restored database {}", super::redact_url(&url)))?;
        let checked = check_database(&store, manifest, new).await;
        let cleared = match checked {
            Ok(()) if !manifest.library.included => {
                let empty = dpsync_scan::ScanCache::default().encode();
                store.forget_scan_caches(&empty).await.map(|_| true).map_err(anyhow::Error::from)
            }
            Ok(()) => Ok(false),
            Err(e) => Err(e),
        };
        store.close().await;
        scan_caches_cleared = cleared?;
    }
    if manifest.receive_database {
        let db = dpsync_store::agent::AgentDb::open(&new.join(RECEIVE_DATABASE))
            .await
            .context("cannot open the restored receiving database")?;
        let forgotten = db.forget_staged().await;
        db.close().await;
        if forgotten? > 0 {
            notes.push("versions the parent site was sending when the backup was taken will be sent again".into());
        }
    }
    Ok((library, scan_caches_cleared, database_checked, notes))
}

/// The restored database is this backup's site, and (with a library) every object its
/// versions name is in the restored library.
async fn check_database(store: &Store, manifest: &BackupManifest, new: &Path) -> Result<()> {
    match store.meta_get("site_code").await? {
        Some(code) if code != manifest.site_code => bail!(
            "the database belongs to site {code}, but the backup is of site {}; restore the matching database",
            manifest.site_code
        ),
        _ => {}
    }
    if !manifest.library.included {
        return Ok(());
    }
    let manifests = store.live_file_hashes().await?;
    let objects = new.join(LIBRARY).join("objects");
    let missing = tokio::task::spawn_blocking(move || -> Result<Vec<FileHash>> {
        let mut missing = std::collections::BTreeSet::new();
        for blob in manifests {
            let m = Manifest::decode(&blob, &DecodeLimits::default()).context("a stored manifest is corrupt")?;
            for h in m.files().filter_map(|e| e.file_hash()) {
                let hex = h.to_hex();
                if !objects.join(&hex[..2]).join(&hex).is_file() {
                    missing.insert(h);
                }
            }
        }
        Ok(missing.into_iter().collect())
    })
    .await
    .context("restore task")??;
    if let Some(first) = missing.first() {
        bail!(
            "the backup is incomplete: {} file(s) the database's versions name are not in its library (e.g. {first}); \
             take a new backup with --with-library",
            missing.len()
        );
    }
    Ok(())
}

/// The objects of a backup's library, with their sizes; anything else in it is refused.
fn backup_objects(lib: &Path) -> Result<Vec<(FileHash, u64)>> {
    let objects = lib.join("objects");
    let mut out = Vec::new();
    let rd =
        fs::read_dir(&objects).with_context(|| format!("the backup is damaged: cannot read {}", objects.display()))?;
    for fan in rd {
        let fan = fan.with_context(|| format!("cannot read {}", objects.display()))?;
        let fan_name = fan.file_name().to_string_lossy().into_owned();
        for obj in fs::read_dir(fan.path()).with_context(|| format!("cannot read {}", fan.path().display()))? {
            let obj = obj.with_context(|| format!("cannot read {}", fan.path().display()))?;
            let name = obj.file_name().to_string_lossy().into_owned();
            let hash = FileHash::from_hex(&name).ok().filter(|_| name.starts_with(&fan_name));
            let md =
                fs::symlink_metadata(obj.path()).with_context(|| format!("cannot read {}", obj.path().display()))?;
            match hash {
                Some(h) if md.is_file() => out.push((h, md.len())),
                _ => bail!("the backup is damaged: {} is not a library object", obj.path().display()),
            }
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Files

/// A folder only its owner can enter (created with its parents, or tightened).
fn make_private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    // The mode given to DirBuilder is filtered by the umask.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make {} private (chmod 700)", dir.display()))
}

/// An empty file only its owner can read (SQLite's `VACUUM INTO` then fills it).
fn create_private(path: &Path) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// Copies `src` to the new file `dest` (created with `mode`, fsync'd), hashing on the way.
fn copy_hashed(src: &Path, dest: &Path, mode: u32) -> Result<FileEntry> {
    let mut input = File::open(src).with_context(|| format!("cannot read {}", src.display()))?;
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(dest)
        .with_context(|| format!("cannot create {}", dest.display()))?;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = input.read(&mut buf).with_context(|| format!("cannot read {}", src.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).with_context(|| format!("cannot write {}", dest.display()))?;
        size += n as u64;
    }
    out.sync_all().with_context(|| format!("cannot write {}", dest.display()))?;
    Ok(FileEntry { size, blake3: hasher.finalize().to_hex().to_string() })
}

fn hash_existing(path: &Path) -> Result<FileEntry> {
    let size = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
    let hash = dpsync_library::hash_file(path)?;
    Ok(FileEntry { size, blake3: hash.to_hex() })
}

/// Writes `data` to `dest` (mode 0600) durably: temp file, fsync, rename, fsync the folder.
fn write_private_atomic(dest: &Path, data: &[u8]) -> Result<()> {
    let dir = dest.parent().expect("a file in a folder");
    let tmp = dir.join(format!(".{}.tmp", dest.file_name().unwrap_or_default().to_string_lossy()));
    let _ = fs::remove_file(&tmp);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(data).and_then(|_| f.sync_all()).with_context(|| format!("cannot write {}", tmp.display()))?;
    }
    fs::rename(&tmp, dest).with_context(|| format!("cannot rename {} to {}", tmp.display(), dest.display()))?;
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot sync {}", dir.display()))
}

/// `s`, quoted for a shell when it needs it.
fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+=:@,".contains(&b)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_backup_files_are_allowed() {
        for ok in ["dpsync.db", "receive.db", "site.key", "trusted-sites.json", "server.toml", "tls/cert.pem"] {
            assert!(allowed_file(ok), "{ok}");
        }
        for bad in ["../x", "/etc/passwd", "tls/../site.key", "tls/other", "library/objects/ab/ab", "x", "tls"] {
            assert!(!allowed_file(bad), "{bad}");
        }
    }

    #[test]
    fn shell_words() {
        assert_eq!(shell_word("/srv/dpsync"), "/srv/dpsync");
        assert_eq!(shell_word("/srv/my data"), "'/srv/my data'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }

    #[test]
    fn copies_are_private_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a");
        fs::write(&src, b"hello").unwrap();
        let dest = dir.path().join("b");
        let e = copy_hashed(&src, &dest, 0o600).unwrap();
        assert_eq!(e, FileEntry { size: 5, blake3: blake3::hash(b"hello").to_hex().to_string() });
        assert_eq!(fs::metadata(&dest).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(copy_hashed(&src, &dest, 0o600).is_err(), "an existing file is never overwritten");
    }

    #[test]
    fn new_data_dir_must_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let new = dir.path().join("new");
        assert!(prepare_new_data_dir(&new).unwrap(), "created");
        assert_eq!(fs::metadata(&new).unwrap().permissions().mode() & 0o777, 0o700);
        assert!(!prepare_new_data_dir(&new).unwrap(), "empty: used as it is");
        fs::write(new.join("x"), b"").unwrap();
        let e = prepare_new_data_dir(&new).unwrap_err().to_string();
        assert!(e.contains("not empty") && e.contains('x'), "{e}");
    }
}
