//! The DP agent (`dpsync agent`): receives versions over the transfer protocol,
//! verifies and installs them, and serves installed files to clients.
//!
//! On disk, under the data directory:
//!
//! ```text
//! agent.db                      state (installed versions, staged chunks, chunk index)
//! library/objects/…             verified files by BLAKE3, hard-linked into trees
//! packages/P/current -> versions/vN-…   the live tree: always one whole version
//! packages/P/versions/…         the current and the previous version
//! staging/P/*.pack              verified chunks received for P, kept across restarts;
//!                               some are files being written as their chunks arrive
//! listen.addr                   the address actually bound (useful with port 0)
//! ```
//!
//! A commit answers once `current` is switched and the install recorded. The tree of
//! the version that fell out of (current, previous) and the library objects only it
//! used are removed afterwards by a task that still holds the package's lock, so the
//! next offer, commit or removal of the package waits for it.

mod arrival;
mod install;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use dpsync_hash::path::resolve_symlink;
use dpsync_hash::{ChunkId, ContentRoot, DecodeLimits, EntryKind, FileHash, Manifest, RelPath};
use dpsync_library::Library;
use dpsync_store::agent::{AgentDb, Staged};
use dpsync_transfer::service::{OfferMeta, ReceiveError, Receiver, ServedFile, ServiceConfig};
use dpsync_transfer::wire::{CommitResponse, PackageState, ValidateResponse};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use install::{InstallError, Source};

/// Settings of `dpsync agent`, as written in its TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentFile {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    /// Path of a file holding the token (preferred over `token`).
    pub token_file: Option<PathBuf>,
    pub token: Option<String>,
    /// Free space to keep on the data directory's filesystem, in MiB. Default 256.
    pub disk_reserve_mib: Option<u64>,
}

/// The resolved agent configuration.
#[derive(Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub listen: String,
    pub token: Option<String>,
    pub disk_reserve: u64,
    pub tls: crate::config::TlsOptions,
    /// Source sites' keys pinned by the operator.
    pub trust: Vec<(String, String)>,
    /// Refuse versions from source sites not pinned by the operator (no trust on first use).
    pub strict_trust: bool,
}

impl std::fmt::Debug for AgentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentConfig")
            .field("data_dir", &self.data_dir)
            .field("listen", &self.listen)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("disk_reserve", &self.disk_reserve)
            .finish()
    }
}

impl AgentConfig {
    #[allow(clippy::too_many_arguments)] // one per flag; called once, from the CLI
    pub fn resolve(
        config: Option<&Path>,
        data_dir: Option<PathBuf>,
        listen: Option<String>,
        token: Option<String>,
        token_file: Option<PathBuf>,
        tls: crate::config::TlsOptions,
        trust: Vec<(String, String)>,
        strict_trust: bool,
    ) -> Result<Self> {
        let file: AgentFile = crate::config::load_toml(config)?;
        let Some(data_dir) = data_dir.or(file.data_dir) else {
            bail!("no data directory: pass --data-dir DIR (or set DPSYNC_DATA_DIR)")
        };
        let Some(listen) = listen.or(file.listen) else {
            bail!("no listen address: pass --listen ADDR, e.g. --listen 0.0.0.0:8443")
        };
        let token = match token_file.or(file.token_file) {
            Some(path) => Some(crate::config::read_secret(&path)?),
            None => token.or(file.token),
        };
        Ok(Self {
            data_dir: crate::config::absolute(&data_dir)?,
            listen,
            token,
            disk_reserve: file.disk_reserve_mib.unwrap_or(256) << 20,
            tls,
            trust,
            strict_trust,
        })
    }
}

/// Counters exported on `/metrics`.
#[derive(Debug, Default)]
struct Metrics {
    chunks_received: AtomicU64,
    chunk_bytes_received: AtomicU64,
    installs: AtomicU64,
    files_built: AtomicU64,
    files_written_on_arrival: AtomicU64,
    files_served: AtomicU64,
    bytes_served: AtomicU64,
}

/// A package as served to clients.
#[derive(Debug)]
struct Live {
    version: i64,
    dir: PathBuf,
    manifest: Arc<Manifest>,
}

/// Files of a package written as their chunks arrived, since its last commit.
#[derive(Debug, Default)]
struct Arrivals {
    /// The staged version's planned files (`None`: every chunk goes to a pack).
    plan: Option<arrival::Plan>,
    /// Files adopted into the library since the last commit. Those the committed version
    /// does not use (its version was replaced mid-transfer) are collected after it.
    adopted: Vec<FileHash>,
}

/// What the receiving side does with a verified version.
#[derive(Debug, Clone)]
pub enum Mode {
    /// A distribution point: build the version tree, switch `current`, serve clients.
    Dp,
    /// A child site: commit the version to the site's store and library; the site's own
    /// jobs then fan it out to its targets.
    Site(Arc<crate::site::Site>),
}

/// The receiving side's shared state (a DP agent, or a child site's receiver).
#[derive(Debug)]
pub struct Agent {
    mode: Mode,
    trust: Arc<dpsync_transfer::trust::TrustStore>,
    data_dir: PathBuf,
    db: AgentDb,
    library: Arc<Library>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    live: RwLock<HashMap<String, Arc<Live>>>,
    metrics: Metrics,
    disk_reserve: u64,
    pack_counter: AtomicU64,
    /// Per package, the files written as their chunks arrive (see `arrival`). Its lock
    /// also orders concurrent `store_chunks` calls.
    arrivals: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Arrivals>>>>,
    /// Whether the staging area and the library share a filesystem (a file written in
    /// staging can be renamed into the library).
    write_on_arrival: bool,
}

fn internal(context: &str) -> impl FnOnce(dpsync_store::StoreError) -> ReceiveError + '_ {
    move |e| ReceiveError::Internal(format!("{context}: {e}"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ReceiveError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ReceiveError::Internal(format!("worker: {e}")))
}

impl Agent {
    pub async fn open(
        data_dir: &Path,
        disk_reserve: u64,
        mode: Mode,
        trust: Arc<dpsync_transfer::trust::TrustStore>,
    ) -> Result<Self> {
        let (db_file, library) = match &mode {
            Mode::Dp => {
                let lib_dir = data_dir.join("library");
                ("agent.db", Arc::new(tokio::task::spawn_blocking(move || Library::open(&lib_dir)).await??))
            }
            Mode::Site(site) => ("receive.db", site.library.clone()),
        };
        let db = AgentDb::open(&data_dir.join(db_file)).await.context("receiving database")?;
        let write_on_arrival = {
            use std::os::unix::fs::MetadataExt;
            let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
            let same = dev(data_dir).is_some() && dev(data_dir) == dev(library.root());
            if !same {
                tracing::info!("the library is on another filesystem: files are assembled at commit");
            }
            same
        };
        let agent = Self {
            mode,
            trust,
            data_dir: data_dir.to_owned(),
            db,
            library,
            locks: Mutex::new(HashMap::new()),
            live: RwLock::new(HashMap::new()),
            metrics: Metrics::default(),
            disk_reserve,
            pack_counter: AtomicU64::new(0),
            arrivals: Mutex::new(HashMap::new()),
            write_on_arrival,
        };
        for p in agent.db.packages().await? {
            if matches!(agent.mode, Mode::Site(_)) {
                break;
            }
            if let (Some(v), Some(dir), Some(m)) = (p.installed_version, &p.installed_dir, &p.installed_manifest) {
                let manifest = Manifest::decode(m, &DecodeLimits::default())
                    .with_context(|| format!("stored manifest of {} is corrupt", p.id))?;
                agent
                    .live
                    .write()
                    .unwrap()
                    .insert(p.id.clone(), Arc::new(Live { version: v, dir: dir.into(), manifest: Arc::new(manifest) }));
                agent.restore_current(&p.id, dir);
                agent.remove_stray_trees(&p.id, &[p.installed_dir.clone(), p.previous_dir.clone()]);
            }
        }
        Ok(agent)
    }

    /// Nothing is staged or installed unless its owner signed it (see `transfer::trust`).
    fn check_signature(&self, pkg: &str, version: i64, root: &str, meta: &OfferMeta) -> Result<(), ReceiveError> {
        let Some(site) = &meta.source_site else {
            return Err(ReceiveError::BadRequest("the source site of the version is missing".into()));
        };
        self.trust.check(pkg, site, version, root, meta.signature.as_deref(), meta.site_key.as_deref()).map_err(|e| {
            tracing::warn!(package = pkg, version, "refused: {e}");
            ReceiveError::Forbidden(e.to_string())
        })
    }

    fn pkg_dir(&self, pkg: &str) -> PathBuf {
        self.data_dir.join("packages").join(pkg)
    }

    fn staging_dir(&self, pkg: &str) -> PathBuf {
        self.data_dir.join("staging").join(pkg)
    }

    fn lock(&self, pkg: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks.lock().unwrap().entry(pkg.to_owned()).or_default().clone()
    }

    fn arrivals(&self, pkg: &str) -> Arc<tokio::sync::Mutex<Arrivals>> {
        self.arrivals.lock().unwrap().entry(pkg.to_owned()).or_default().clone()
    }

    /// A unique name prefix for a pack in a staging folder.
    fn pack_name(&self) -> String {
        let n = self.pack_counter.fetch_add(1, Ordering::Relaxed);
        format!("{}-{}-{n}", crate::util::now_ms(), std::process::id())
    }

    /// Points `current` back at the recorded tree when a crash left it elsewhere: an
    /// install killed after switching `current` but before recording the install leaves
    /// it on a tree that [`Agent::remove_stray_trees`] then deletes.
    fn restore_current(&self, pkg: &str, installed_dir: &str) {
        let pkg_dir = self.pkg_dir(pkg);
        let Some(name) = Path::new(installed_dir).file_name() else { return };
        let rel = Path::new("versions").join(name);
        if std::fs::read_link(pkg_dir.join("current")).ok().as_deref() == Some(rel.as_path()) {
            return;
        }
        if !pkg_dir.join(&rel).is_dir() {
            tracing::error!(package = pkg, dir = installed_dir, "the installed version's tree is missing");
            return;
        }
        tracing::warn!(
            package = pkg,
            dir = installed_dir,
            "current did not point at the installed version (an install was interrupted); switching it back"
        );
        if let Err(e) = install::switch_current(&pkg_dir, &rel.to_string_lossy()) {
            tracing::error!(package = pkg, "cannot switch current back: {e}");
        }
    }

    /// Deletes version trees left by an install that died before it was recorded.
    fn remove_stray_trees(&self, pkg: &str, keep: &[Option<String>]) {
        let versions = self.pkg_dir(pkg).join("versions");
        let Ok(rd) = std::fs::read_dir(&versions) else { return };
        for e in rd.flatten() {
            let p = e.path();
            if !keep.iter().flatten().any(|k| Path::new(k) == p) {
                tracing::info!(package = pkg, dir = %p.display(), "removing an unused version tree");
                let _ = install::remove_tree(&p);
            }
        }
    }

    fn check_disk(&self, incoming: u64) -> Result<(), ReceiveError> {
        if let Ok(st) = rustix::fs::statvfs(&self.data_dir) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            if free < incoming.saturating_add(self.disk_reserve) {
                return Err(ReceiveError::InsufficientStorage(format!(
                    "only {} MiB free on the DP's data disk, {} MiB reserved; free space on the DP",
                    free >> 20,
                    self.disk_reserve >> 20
                )));
            }
        }
        Ok(())
    }

    async fn missing_chunks(
        &self,
        pkg: &str,
        manifest: Arc<Manifest>,
        force: bool,
    ) -> Result<Vec<ChunkId>, ReceiveError> {
        let staged: HashSet<Vec<u8>> =
            self.db.staged_chunk_ids(pkg).await.map_err(internal("staged chunks"))?.into_iter().collect();
        let lib = self.library.clone();
        let candidates = blocking(move || {
            let mut seen_files = HashSet::new();
            let mut seen = HashSet::new();
            let mut out = Vec::new();
            for e in manifest.files() {
                let h = e.file_hash().expect("file");
                if !seen_files.insert(h) || (!force && lib.contains(&h)) {
                    continue;
                }
                for c in e.chunks() {
                    if seen.insert(c.id) && !staged.contains(c.id.as_bytes().as_slice()) {
                        out.push(c.id);
                    }
                }
            }
            out
        })
        .await?;
        if force || candidates.is_empty() {
            return Ok(candidates);
        }
        let ids: Vec<Vec<u8>> = candidates.iter().map(|c| c.as_bytes().to_vec()).collect();
        let known = self.db.indexed_chunks(&ids).await.map_err(internal("chunk index"))?;
        let lib = self.library.clone();
        let available: HashSet<ChunkId> = blocking(move || {
            known
                .into_iter()
                .filter(|(_, file, _, _)| FileHash::from_slice(file).is_some_and(|h| lib.contains(&h)))
                .filter_map(|(id, _, _, _)| ChunkId::from_slice(&id))
                .collect()
        })
        .await?;
        Ok(candidates.into_iter().filter(|c| !available.contains(c)).collect())
    }

    /// Where to read every chunk of the files the library lacks (all files with `force`).
    async fn chunk_sources(
        &self,
        pkg: &str,
        manifest: &Arc<Manifest>,
        force: bool,
    ) -> Result<HashMap<ChunkId, Source>, ReceiveError> {
        let mut sources = HashMap::new();
        let staging = self.staging_dir(pkg);
        for (id, pack, offset, len) in self.db.staged_chunks(pkg).await.map_err(internal("staged chunks"))? {
            if let Some(id) = ChunkId::from_slice(&id) {
                sources.insert(id, Source::Pack { path: staging.join(pack), offset: offset as u64, len: len as u32 });
            }
        }
        let known: HashSet<ChunkId> = sources.keys().copied().collect();
        let (lib, m) = (self.library.clone(), manifest.clone());
        let wanted: Vec<Vec<u8>> = blocking(move || {
            let mut seen = HashSet::new();
            m.files()
                .filter(|e| force || !lib.contains(&e.file_hash().expect("file")))
                .flat_map(|e| e.chunks())
                .filter(|c| !known.contains(&c.id) && seen.insert(c.id))
                .map(|c| c.id.as_bytes().to_vec())
                .collect()
        })
        .await?;
        for (id, file, offset, len) in self.db.indexed_chunks(&wanted).await.map_err(internal("chunk index"))? {
            if let (Some(id), Some(hash)) = (ChunkId::from_slice(&id), FileHash::from_slice(&file)) {
                sources.insert(id, Source::Object { hash, offset: offset as u64, len: len as u32 });
            }
        }
        Ok(sources)
    }

    /// Chunk index rows of the files of `manifest` in `files`.
    fn chunk_index_rows(manifest: &Manifest, files: &HashSet<FileHash>) -> Vec<(Vec<u8>, Vec<u8>, i64, i64)> {
        let mut rows = Vec::new();
        let mut seen = HashSet::new();
        for e in manifest.files() {
            let h = e.file_hash().expect("file");
            if !files.contains(&h) {
                continue;
            }
            let mut offset = 0i64;
            for c in e.chunks() {
                if seen.insert(c.id) {
                    rows.push((c.id.as_bytes().to_vec(), h.as_bytes().to_vec(), offset, c.len as i64));
                }
                offset += c.len as i64;
            }
        }
        rows
    }

    async fn forget_objects(&self, removed: Vec<FileHash>) {
        forget_objects(&self.db, removed).await
    }
}

/// Drops the chunk index entries of library objects just removed.
async fn forget_objects(db: &AgentDb, removed: Vec<FileHash>) {
    for h in removed {
        if let Err(e) = db.unindex_file(h.as_bytes()).await {
            tracing::warn!("chunk index: {e}");
        }
    }
}

fn manifest_hashes(blob: Option<&Vec<u8>>) -> Vec<FileHash> {
    blob.and_then(|b| Manifest::decode(b, &DecodeLimits::default()).ok())
        .map(|m| m.files().filter_map(|e| e.file_hash()).collect())
        .unwrap_or_default()
}

impl Receiver for Agent {
    async fn base_manifest(&self, pkg: &str, root: &ContentRoot) -> Result<Option<Arc<Manifest>>, ReceiveError> {
        let hex = root.to_hex();
        let summary = self.db.package_summary(pkg).await.map_err(internal("base manifest"))?.unwrap_or_default();
        if summary.installed_root.as_deref() == Some(hex.as_str()) {
            let live = self.live.read().unwrap().get(pkg).cloned();
            if let Some(live) = live.filter(|l| Some(l.version) == summary.installed_version) {
                return Ok(Some(live.manifest.clone()));
            }
        }
        // Not in memory: the stored manifests (several MB each for large trees).
        let p = self.db.package(pkg).await.map_err(internal("base manifest"))?.unwrap_or_default();
        if p.installed_root.as_deref() == Some(hex.as_str()) {
            let Some(blob) = p.installed_manifest else { return Ok(None) };
            return blocking(move || Manifest::decode(&blob, &DecodeLimits::default()).ok().map(Arc::new)).await;
        }
        // The previous version: its root is not recorded, so it is computed.
        let Some(blob) = p.previous_manifest else { return Ok(None) };
        let root = *root;
        blocking(move || {
            (Manifest::root_of_encoding(&blob) == root)
                .then(|| Manifest::decode(&blob, &DecodeLimits::default()).ok().map(Arc::new))
                .flatten()
        })
        .await
    }

    async fn read_chunks(
        &self,
        _pkg: &str,
        ids: Vec<ChunkId>,
        max_bytes: u64,
    ) -> Result<HashMap<ChunkId, Bytes>, ReceiveError> {
        let wanted: Vec<Vec<u8>> = ids.iter().map(|c| c.as_bytes().to_vec()).collect();
        let rows = self.db.indexed_chunks(&wanted).await.map_err(internal("chunk index"))?;
        let lib = self.library.clone();
        blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut out = HashMap::new();
            let mut total = 0u64;
            for (id, file, offset, len) in rows {
                let (Some(id), Some(hash)) = (ChunkId::from_slice(&id), FileHash::from_slice(&file)) else { continue };
                total += len as u64;
                if total > max_bytes {
                    break;
                }
                let Ok(f) = lib.open_object(&hash) else { continue };
                let mut buf = vec![0u8; len as usize];
                if f.read_exact_at(&mut buf, offset as u64).is_ok() && ChunkId::from(blake3::hash(&buf)) == id {
                    out.insert(id, Bytes::from(buf));
                }
            }
            out
        })
        .await
    }

    async fn package_state(&self, pkg: &str) -> Result<PackageState, ReceiveError> {
        let p = self.db.package_summary(pkg).await.map_err(internal("state"))?.unwrap_or_default();
        let staged = self.db.latest_staged_version(pkg).await.map_err(internal("state"))?;
        Ok(PackageState {
            package: pkg.to_owned(),
            installed_version: p.installed_version,
            installed_root: p.installed_root,
            previous_version: p.previous_version,
            staged_version: staged,
            broken: p.broken,
        })
    }

    async fn offer(
        &self,
        pkg: &str,
        version: i64,
        manifest: Arc<Manifest>,
        force: bool,
        meta: OfferMeta,
    ) -> Result<Vec<ChunkId>, ReceiveError> {
        let lock = self.lock(pkg);
        let _g = lock.lock().await;
        if let Mode::Site(site) = &self.mode {
            // What a site can refuse without the signature is refused before checking it
            // (which pins a key on first use).
            if meta.name.is_none() {
                return Err(ReceiveError::BadRequest(
                    "a site needs the package's name and source site with its manifest".into(),
                ));
            }
            if meta.source_site.as_deref().is_some_and(|s| s.eq_ignore_ascii_case(&site.cfg.site_code)) {
                return Err(ReceiveError::Forbidden(format!(
                    "package {pkg} names this site ({}) as its owner; a parent cannot push it here",
                    site.cfg.site_code
                )));
            }
        }
        let p = self.db.package_summary(pkg).await.map_err(internal("offer"))?.unwrap_or_default();
        if let Some(iv) = p.installed_version
            && version < iv
        {
            return Err(ReceiveError::Conflict {
                message: format!("{pkg} version {version} is older than the installed version {iv}"),
                missing: vec![],
            });
        }
        let m2 = manifest.clone();
        let (encoded, root) = blocking(move || m2.encode_with_root()).await?;
        let root = root.to_hex();
        self.check_signature(pkg, version, &root, &meta)?;
        // Only a verified version registers the package on a child site (and assigns it
        // to the site's targets): a refused offer leaves no trace.
        if let Mode::Site(site) = &self.mode {
            site.accept_package(pkg, &meta).await?;
        }
        if !force && !p.broken && p.installed_version == Some(version) && p.installed_root.as_deref() == Some(&root) {
            return Ok(vec![]);
        }
        self.db
            .stage(&Staged {
                package: pkg.to_owned(),
                version,
                content_root: root,
                manifest: encoded,
                force,
                signature: meta.signature.clone(),
            })
            .await
            .map_err(internal("staging"))?;
        let arrivals = self.arrivals(pkg);
        let mut arrivals = arrivals.lock().await;
        arrivals.plan = None;
        let missing = self.missing_chunks(pkg, manifest.clone(), force).await?;
        if self.write_on_arrival && !force && !missing.is_empty() {
            let (lib, staging, prefix) = (self.library.clone(), self.staging_dir(pkg), self.pack_name());
            let (m, ids) = (manifest, missing);
            let (new, ids) =
                blocking(move || (arrival::Plan::new(version, m, &ids, &lib, staging, prefix), ids)).await?;
            tracing::info!(
                package = pkg,
                version,
                missing = ids.len(),
                written_on_arrival = new.len(),
                "manifest staged"
            );
            arrivals.plan = Some(new);
            return Ok(ids);
        }
        tracing::info!(package = pkg, version, missing = missing.len(), force, "manifest staged");
        Ok(missing)
    }

    async fn store_chunks(&self, pkg: &str, version: i64, chunks: Vec<(ChunkId, Bytes)>) -> Result<(), ReceiveError> {
        if self.db.latest_staged_version(pkg).await.map_err(internal("chunks"))?.is_none() {
            return Err(ReceiveError::Conflict {
                message: format!("no manifest of {pkg} was offered; send the manifest first"),
                missing: vec![],
            });
        }
        let bytes: u64 = chunks.iter().map(|(_, d)| d.len() as u64).sum();
        self.check_disk(bytes)?;
        let count = chunks.len() as u64;
        // Held until the batch is recorded: batches of one package are written and
        // recorded one at a time.
        let cell = self.arrivals(pkg);
        let mut arrivals = cell.lock().await;
        let name = format!("{}.pack", self.pack_name());
        let (lib, path, taken) = (self.library.clone(), self.staging_dir(pkg).join(&name), arrivals.plan.take());
        let (taken, result) = blocking(move || {
            let mut taken = taken;
            let outcome = match taken.as_mut() {
                Some(p) => p.accept(&lib, version, chunks),
                None => Ok(arrival::Outcome { rest: chunks, ..Default::default() }),
            };
            let result = outcome.and_then(|mut o| {
                let packed = if o.rest.is_empty() { vec![] } else { install::write_pack(&path, &o.rest)? };
                o.rest = vec![];
                Ok((o, packed))
            });
            // After a failed write the plan's files are not trusted further: what they
            // recorded stays as packs, the rest goes to packs.
            (if result.is_ok() { taken } else { None }, result)
        })
        .await?;
        arrivals.plan = taken;
        let (outcome, packed) = result.map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                ReceiveError::InsufficientStorage(format!("the DP's disk is full: {e}"))
            } else {
                ReceiveError::Internal(format!("writing chunks: {e}"))
            }
        })?;
        let rows = |r: Vec<arrival::PackRow>| -> Vec<(Vec<u8>, i64, i64)> {
            r.into_iter().map(|(id, off, len)| (id.as_bytes().to_vec(), off as i64, len as i64)).collect()
        };
        let mut staged: Vec<dpsync_store::agent::PackRows> =
            outcome.staged.into_iter().map(|(pack, r)| (pack, rows(r))).collect();
        if !packed.is_empty() {
            staged.push((name, rows(packed)));
        }
        let adopted_packs: Vec<String> = outcome.adopted.iter().map(|a| a.pack.clone()).collect();
        let index: Vec<(Vec<u8>, Vec<u8>, i64, i64)> = outcome
            .adopted
            .iter()
            .flat_map(|a| {
                a.chunks.iter().map(|(id, off, len)| {
                    (id.as_bytes().to_vec(), a.hash.as_bytes().to_vec(), *off as i64, *len as i64)
                })
            })
            .collect();
        self.db.record_arrivals(pkg, &staged, &adopted_packs, &index).await.map_err(internal("recording chunks"))?;
        arrivals.adopted.extend(outcome.adopted.iter().map(|a| a.hash));
        drop(arrivals);
        self.metrics.chunks_received.fetch_add(count, Ordering::Relaxed);
        self.metrics.chunk_bytes_received.fetch_add(bytes, Ordering::Relaxed);
        self.metrics.files_written_on_arrival.fetch_add(adopted_packs.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn commit(&self, pkg: &str, version: i64) -> Result<CommitResponse, ReceiveError> {
        // Owned: the clean-up after an install keeps holding it in the background.
        let guard = self.lock(pkg).lock_owned().await;
        let p = self.db.package_summary(pkg).await.map_err(internal("commit"))?.unwrap_or_default();
        let Some(mut staged) = self.db.staged(pkg, version).await.map_err(internal("commit"))? else {
            if p.installed_version == Some(version) && !p.broken {
                return Ok(CommitResponse {
                    installed_version: version,
                    content_root: p.installed_root.unwrap_or_default(),
                    files_built: 0,
                    files_linked: 0,
                });
            }
            return Err(ReceiveError::Conflict {
                message: format!("no manifest of {pkg} version {version} is staged; offer it first"),
                missing: vec![],
            });
        };
        // Files written on arrival are in the library now; planned files that are not
        // whole are assembled below from their packs, like any other file.
        let offered = self.arrivals(pkg).lock().await.plan.take().and_then(|p| p.manifest_of(version));
        // The manifest decoded at `offer` when it is the staged one; else the staged blob.
        let staged_blob = std::mem::take(&mut staged.manifest);
        let staged_root = staged.content_root.clone();
        let (manifest, blob) = blocking(move || {
            let m = match offered.filter(|m| m.content_root().to_hex() == staged_root) {
                Some(m) => Ok(m),
                None => Manifest::decode(&staged_blob, &DecodeLimits::default())
                    .map(Arc::new)
                    .map_err(|e| ReceiveError::Internal(format!("staged manifest: {e}"))),
            };
            (m, staged_blob)
        })
        .await?;
        staged.manifest = blob;
        let manifest = manifest?;
        let sources = self.chunk_sources(pkg, &manifest, staged.force).await?;
        let (lib, pkg_dir, m2, force) = (self.library.clone(), self.pkg_dir(pkg), manifest.clone(), staged.force);
        let site_mode = matches!(self.mode, Mode::Site(_));
        let result = blocking(move || {
            let installed = if site_mode {
                install::assemble_missing(&lib, &m2, &sources, force)
            } else {
                std::fs::create_dir_all(&pkg_dir).map_err(|source| InstallError::Io {
                    context: format!("creating {}", pkg_dir.display()),
                    source,
                })?;
                install::install(&lib, &pkg_dir, version, &m2, &sources, force)
            }?;
            let built: HashSet<FileHash> = installed.built.iter().copied().collect();
            Ok::<_, InstallError>((Self::chunk_index_rows(&m2, &built), installed))
        })
        .await?;
        let (index, installed) = match result {
            Ok(i) => i,
            Err(InstallError::Missing(missing)) => {
                for id in &missing {
                    let _ = self.db.forget_staged_chunk(pkg, id.as_bytes()).await;
                }
                tracing::warn!(package = pkg, version, missing = missing.len(), "commit refused: chunks missing");
                return Err(ReceiveError::Conflict {
                    message: format!(
                        "{} chunks of {pkg} version {version} are missing or failed verification",
                        missing.len()
                    ),
                    missing,
                });
            }
            Err(e @ InstallError::BadManifest(_)) => return Err(ReceiveError::BadRequest(e.to_string())),
            Err(e) if e.is_disk_full() => {
                return Err(ReceiveError::InsufficientStorage(format!("the DP's disk is full: {e}")));
            }
            Err(e) => return Err(ReceiveError::Internal(e.to_string())),
        };
        let arrived = std::mem::take(&mut self.arrivals(pkg).lock().await.adopted);
        let written = arrived.len() as u64;
        let files_built = installed.files_built + written;
        if let Mode::Site(site) = &self.mode {
            site.accept_version(pkg, version, &staged.content_root, staged.manifest.clone(), staged.signature.clone())
                .await?;
        }
        // The version that falls out of (current, previous): its tree and the content
        // only it used go after the answer. Its manifest is read before the install
        // record replaces it.
        let dir = installed.dir.display().to_string();
        let dropped =
            p.previous_dir.as_ref().is_some_and(|d| !site_mode && Some(d) != p.installed_dir.as_ref() && *d != dir);
        let dropped_manifest =
            if dropped { self.db.previous_manifest(pkg).await.map_err(internal("commit"))? } else { None };
        self.db
            .record_install(pkg, version, &staged.content_root, &dir, &staged.manifest)
            .await
            .map_err(internal("recording the install"))?;
        self.db.index_chunks(&index).await.map_err(internal("chunk index"))?;
        let _ = tokio::fs::remove_dir_all(self.staging_dir(pkg)).await;
        self.metrics.files_built.fetch_add(files_built, Ordering::Relaxed);
        if site_mode {
            tracing::info!(package = pkg, version, built = files_built, "version received from the parent site");
            return Ok(CommitResponse {
                installed_version: version,
                content_root: staged.content_root,
                files_built,
                files_linked: 0,
            });
        }
        self.live
            .write()
            .unwrap()
            .insert(pkg.to_owned(), Arc::new(Live { version, dir: installed.dir.clone(), manifest }));
        self.metrics.installs.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            package = pkg,
            version,
            built = installed.files_built,
            written_on_arrival = written,
            linked = installed.files_linked,
            bytes_built = installed.bytes_built,
            "version installed"
        );
        let (db, lib, pkg_dir) = (self.db.clone(), self.library.clone(), self.pkg_dir(pkg));
        let keep = [Some(dir), p.installed_dir.clone()];
        let package = pkg.to_owned();
        tokio::spawn(async move {
            let _guard = guard;
            let removed = tokio::task::spawn_blocking(move || {
                if let Ok(rd) = std::fs::read_dir(pkg_dir.join("versions")) {
                    for e in rd.flatten() {
                        if !keep.iter().flatten().any(|k| Path::new(k) == e.path()) {
                            let _ = install::remove_tree(&e.path());
                        }
                    }
                }
                // Every object the new tree uses has a second link now: of the files
                // written on arrival, only those of a replaced version have none.
                let mut candidates = manifest_hashes(dropped_manifest.as_ref());
                candidates.extend(arrived);
                install::collect_unlinked(&lib, candidates)
            })
            .await;
            match removed {
                Ok(removed) => forget_objects(&db, removed).await,
                Err(e) => tracing::warn!(package, "cleaning up after the install: {e}"),
            }
        });
        Ok(CommitResponse {
            installed_version: version,
            content_root: staged.content_root,
            files_built,
            files_linked: installed.files_linked,
        })
    }

    async fn relabel(
        &self,
        pkg: &str,
        version: i64,
        root: &str,
        meta: OfferMeta,
    ) -> Result<CommitResponse, ReceiveError> {
        let lock = self.lock(pkg);
        let _g = lock.lock().await;
        self.check_signature(pkg, version, root, &meta)?;
        let p = self.db.package_summary(pkg).await.map_err(internal("relabel"))?.unwrap_or_default();
        match p.installed_version {
            Some(iv) if !p.broken && p.installed_root.as_deref() == Some(root) && iv <= version => {
                if iv < version {
                    if let Mode::Site(site) = &self.mode {
                        // Only a site needs the manifest: it records the version with it.
                        let full = self.db.package(pkg).await.map_err(internal("relabel"))?;
                        if let Some(m) = full.and_then(|p| p.installed_manifest) {
                            site.accept_version(pkg, version, root, m, meta.signature.clone()).await?;
                        }
                    }
                    self.db.relabel(pkg, version).await.map_err(internal("relabel"))?;
                    let live = self.live.read().unwrap().get(pkg).cloned();
                    if let Some(live) = live {
                        let relabeled = Live { version, dir: live.dir.clone(), manifest: live.manifest.clone() };
                        self.live.write().unwrap().insert(pkg.to_owned(), Arc::new(relabeled));
                    }
                    tracing::info!(package = pkg, from = iv, to = version, "same content, version recorded");
                }
                Ok(CommitResponse {
                    installed_version: version,
                    content_root: root.to_owned(),
                    files_built: 0,
                    files_linked: 0,
                })
            }
            _ => Err(ReceiveError::Conflict {
                message: format!("{pkg}: the installed content is not {root}; send the manifest"),
                missing: vec![],
            }),
        }
    }

    async fn remove(&self, pkg: &str) -> Result<(), ReceiveError> {
        let lock = self.lock(pkg);
        let _g = lock.lock().await;
        let arrived = std::mem::take(&mut *self.arrivals(pkg).lock().await).adopted;
        if let Mode::Site(site) = &self.mode {
            site.remove_everywhere(pkg).await?;
            self.db.delete_package(pkg).await.map_err(internal("remove"))?;
            let _ = tokio::fs::remove_dir_all(self.staging_dir(pkg)).await;
            return Ok(());
        }
        let p = self.db.package(pkg).await.map_err(internal("remove"))?.unwrap_or_default();
        self.live.write().unwrap().remove(pkg);
        let mut candidates = manifest_hashes(p.installed_manifest.as_ref());
        candidates.extend(manifest_hashes(p.previous_manifest.as_ref()));
        candidates.extend(arrived);
        let (lib, pkg_dir, staging) = (self.library.clone(), self.pkg_dir(pkg), self.staging_dir(pkg));
        let removed = blocking(move || -> std::io::Result<Vec<FileHash>> {
            let _ = std::fs::remove_file(pkg_dir.join("current"));
            install::remove_tree(&pkg_dir)?;
            let _ = std::fs::remove_dir_all(&staging);
            Ok(install::collect_unlinked(&lib, candidates))
        })
        .await?
        .map_err(|e| ReceiveError::Internal(format!("removing {pkg}: {e}")))?;
        self.db.delete_package(pkg).await.map_err(internal("remove"))?;
        self.forget_objects(removed).await;
        tracing::info!(package = pkg, "package removed");
        Ok(())
    }

    async fn status(&self, pkg: &str) -> Result<serde_json::Value, ReceiveError> {
        match &self.mode {
            Mode::Site(site) => {
                let report = site.status(pkg).await.map_err(|e| ReceiveError::NotFound(e.to_string()))?;
                serde_json::to_value(report).map_err(|e| ReceiveError::Internal(e.to_string()))
            }
            Mode::Dp => {
                let state = self.package_state(pkg).await?;
                serde_json::to_value(state).map_err(|e| ReceiveError::Internal(e.to_string()))
            }
        }
    }

    async fn validate(&self, pkg: &str) -> Result<ValidateResponse, ReceiveError> {
        if matches!(self.mode, Mode::Site(_)) {
            return Err(ReceiveError::BadRequest(
                "a site holds no installed tree to validate; validate its DPs".into(),
            ));
        }
        let lock = self.lock(pkg);
        let _g = lock.lock().await;
        let Some(live) = self.live.read().unwrap().get(pkg).cloned() else {
            return Ok(ValidateResponse { package: pkg.to_owned(), ..Default::default() });
        };
        let lib = self.library.clone();
        let l2 = live.clone();
        let (checked, broken) = blocking(move || {
            use std::os::unix::fs::MetadataExt;
            let mut checked = 0u64;
            let mut broken = Vec::new();
            for e in l2.manifest.files() {
                checked += 1;
                let path = l2.dir.join(e.path.as_str());
                let expected = e.file_hash().expect("file");
                let ok = install::open_nofollow(&path).ok().and_then(|f| {
                    let md = f.metadata().ok()?;
                    let mut h = blake3::Hasher::new();
                    h.update_reader(&f).ok()?;
                    Some((FileHash::from(h.finalize()) == expected && md.len() == e.size(), md.ino()))
                });
                if ok.is_some_and(|(good, _)| good) {
                    continue;
                }
                // Drop the library's copy if it is the same damaged inode.
                let obj_ino = std::fs::metadata(lib.object_path(&expected)).ok().map(|m| m.ino());
                if ok.is_none() || obj_ino == ok.map(|(_, ino)| ino) {
                    let _ = lib.remove(&expected);
                }
                broken.push((e.path.to_string(), expected));
            }
            (checked, broken)
        })
        .await?;
        if !broken.is_empty() {
            self.db.set_broken(pkg, true).await.map_err(internal("validate"))?;
            for (_, h) in &broken {
                if !self.library.contains(h) {
                    let _ = self.db.unindex_file(h.as_bytes()).await;
                }
            }
            tracing::warn!(package = pkg, broken = broken.len(), "validation found damaged files");
        }
        Ok(ValidateResponse {
            package: pkg.to_owned(),
            installed_version: Some(live.version),
            files_checked: checked,
            broken: broken.into_iter().map(|(p, _)| p).collect(),
        })
    }

    async fn open_file(&self, pkg: &str, path: &RelPath) -> Result<ServedFile, ReceiveError> {
        let not_found = || ReceiveError::NotFound(format!("{pkg} has no file {path}"));
        let Some(live) = self.live.read().unwrap().get(pkg).cloned() else {
            return Err(ReceiveError::NotFound(format!("package {pkg} is not installed on this DP")));
        };
        let mut current = path.clone();
        for _ in 0..16 {
            let entry = live.manifest.get(current.as_str()).ok_or_else(not_found)?;
            match &entry.kind {
                EntryKind::File { size, hash, .. } => {
                    let full = live.dir.join(current.as_str());
                    let file = install::open_nofollow(&full).map_err(|_| not_found())?;
                    let modified = file.metadata().ok().and_then(|m| m.modified().ok());
                    self.metrics.files_served.fetch_add(1, Ordering::Relaxed);
                    self.metrics.bytes_served.fetch_add(*size, Ordering::Relaxed);
                    return Ok(ServedFile { file, len: *size, hash: *hash, modified });
                }
                EntryKind::Symlink { target } => {
                    current = resolve_symlink(&current, target).ok().flatten().ok_or_else(not_found)?;
                }
                EntryKind::Dir => return Err(not_found()),
            }
        }
        Err(not_found())
    }

    fn metrics(&self) -> String {
        let m = &self.metrics;
        let live = self.live.read().unwrap();
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}\n"));
        };
        counter(
            "dpsync_agent_chunks_received_total",
            "Verified chunks received.",
            m.chunks_received.load(Ordering::Relaxed),
        );
        counter(
            "dpsync_agent_chunk_bytes_received_total",
            "Bytes of verified chunks received.",
            m.chunk_bytes_received.load(Ordering::Relaxed),
        );
        counter("dpsync_agent_installs_total", "Versions installed.", m.installs.load(Ordering::Relaxed));
        counter(
            "dpsync_agent_files_built_total",
            "Files assembled from chunks.",
            m.files_built.load(Ordering::Relaxed),
        );
        counter(
            "dpsync_agent_files_written_on_arrival_total",
            "Files written whole from arriving chunks (not assembled at commit).",
            m.files_written_on_arrival.load(Ordering::Relaxed),
        );
        counter("dpsync_agent_files_served_total", "Client downloads started.", m.files_served.load(Ordering::Relaxed));
        counter(
            "dpsync_agent_bytes_served_total",
            "Bytes of files opened for clients.",
            m.bytes_served.load(Ordering::Relaxed),
        );
        out.push_str("# HELP dpsync_agent_package_version Installed source version per package.\n# TYPE dpsync_agent_package_version gauge\n");
        for (id, l) in live.iter() {
            out.push_str(&format!("dpsync_agent_package_version{{package=\"{id}\"}} {}\n", l.version));
        }
        out
    }
}

/// Runs `dpsync agent` until SIGINT/SIGTERM.
pub async fn run(cfg: AgentConfig) -> Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create the data directory {}", cfg.data_dir.display()))?;
    let _lock = crate::site::lock_data_dir(&cfg.data_dir)?;
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}; is the port taken or the address wrong?", cfg.listen))?;
    let addr = listener.local_addr()?;
    dpsync_library::write_atomic(&cfg.data_dir.join("listen.addr"), addr.to_string().as_bytes())?;
    let trust = Arc::new(dpsync_transfer::trust::TrustStore::open(
        &cfg.data_dir.join("trusted-sites.json"),
        &cfg.trust,
        cfg.strict_trust,
    )?);
    let tls = crate::config::listener_tls(&cfg.data_dir, &cfg.listen, &cfg.tls)?;
    let agent = Arc::new(Agent::open(&cfg.data_dir, cfg.disk_reserve, Mode::Dp, trust).await?);
    if cfg.token.is_none() {
        tracing::warn!(
            "no --token: any site that can reach this port can push content (use only on a trusted network)"
        );
    }
    let service =
        ServiceConfig { token: cfg.token.clone(), role: "dp", site_code: None, decode_limits: DecodeLimits::default() };
    let app = dpsync_transfer::service::router(agent.clone(), service);
    let shutdown = CancellationToken::new();
    crate::site::spawn_signal_handler(shutdown.clone());
    tracing::info!(
        listen = %addr,
        tls = tls.is_some(),
        data_dir = %cfg.data_dir.display(),
        "dpsync agent ready"
    );
    dpsync_transfer::listen::serve(listener, app, tls, shutdown.cancelled_owned()).await.context("serving")?;
    agent.db.close().await;
    tracing::info!("dpsync agent stopped");
    Ok(())
}
