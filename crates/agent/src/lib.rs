//! The receiving side of dpsync: a distribution point's agent (`dpsync agent`) and, with
//! another [`VersionSink`], a child site's receiver.
//!
//! [`Agent`] receives versions over the transfer protocol: it stages the signed
//! manifest, keeps the verified chunks it is sent (across restarts), writes files as
//! their chunks arrive, and assembles the rest into its content library at commit. What
//! a whole, verified version then becomes is the sink's business: [`DpTrees`] lays it
//! out as a tree, switches `current` and serves it to clients.
//!
//! On a DP, under the data directory:
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
//! **API Boundary:** [`run`] serves an already-bound listener until a shutdown future
//! completes; the binary binds, parses and handles signals.

mod arrival;
mod check;
mod config;
pub mod daemon;
mod dp;
pub mod import;
mod install;
mod metrics;
mod page;
mod sink;

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use bytes::Bytes;
use dpsync_hash::{ChunkId, ContentRoot, DecodeLimits, FileHash, Manifest, RelPath};
use dpsync_library::Library;
use dpsync_store::agent::{AgentDb, ChunkLocation, PackRows, PackedChunk, Staged};
use dpsync_transfer::service::{CommitStage, OfferMeta, ReceiveError, Receiver, ServedFile, ServiceConfig};
use dpsync_transfer::trust::TrustStore;
use dpsync_transfer::wire::{CommitResponse, PackageState, ValidateResponse};

use metrics::Metrics;

pub use config::{AgentConfig, AgentSettings};
pub use dp::DpTrees;
pub use install::{InstallError, Installed, Source, assemble_missing};
pub use sink::{Arrived, VersionSink};

/// Files of a package written as their chunks arrived, since its last commit.
#[derive(Debug, Default)]
struct Arrivals {
    /// The staged version's planned files (`None`: every chunk goes to a pack).
    plan: Option<arrival::Plan>,
    /// Files adopted into the library since the last commit. Those the committed version
    /// does not use (its version was replaced mid-transfer) are collected after it.
    adopted: Vec<FileHash>,
}

/// What every receiver shares, whatever its sink: the receiving database, the content
/// library, the trust store and the per-package locks. Sinks get it in every call.
#[derive(Debug)]
pub struct Core {
    trust: Arc<TrustStore>,
    data_dir: PathBuf,
    db: AgentDb,
    library: Arc<Library>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
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

/// Where a receiver keeps its state and content.
#[derive(Debug, Clone)]
pub struct CoreConfig {
    /// Staging packs go under `data_dir/staging`.
    pub data_dir: PathBuf,
    /// The receiving database's file.
    pub db_file: PathBuf,
    pub library: Arc<Library>,
    pub trust: Arc<TrustStore>,
    /// Free space to keep on the data disk.
    pub disk_reserve: u64,
}

fn internal(context: &str) -> impl FnOnce(dpsync_store::StoreError) -> ReceiveError + '_ {
    move |e| ReceiveError::Internal(format!("{context}: {e}"))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ReceiveError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| ReceiveError::Internal(format!("worker: {e}")))
}

impl Core {
    pub async fn open(cfg: CoreConfig) -> Result<Self> {
        let db = AgentDb::open(&cfg.db_file).await.context("receiving database")?;
        let write_on_arrival = {
            use std::os::unix::fs::MetadataExt;
            let dev = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
            let same = dev(&cfg.data_dir).is_some() && dev(&cfg.data_dir) == dev(cfg.library.root());
            if !same {
                tracing::info!("the library is on another filesystem: files are assembled at commit");
            }
            same
        };
        Ok(Self {
            trust: cfg.trust,
            data_dir: cfg.data_dir,
            db,
            library: cfg.library,
            locks: Mutex::new(HashMap::new()),
            metrics: Metrics::default(),
            disk_reserve: cfg.disk_reserve,
            pack_counter: AtomicU64::new(0),
            arrivals: Mutex::new(HashMap::new()),
            write_on_arrival,
        })
    }

    pub fn db(&self) -> &AgentDb {
        &self.db
    }

    pub fn library(&self) -> &Arc<Library> {
        &self.library
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Records a version as installed (its number, root, where it lives and its
    /// manifest) and forgets what was staged for it.
    pub async fn record_install(&self, arrived: &Arrived, dir: &str) -> Result<(), ReceiveError> {
        let pkg = arrived.package.as_str();
        self.db
            .record_install(pkg, arrived.version, &arrived.content_root, dir, &arrived.encoded)
            .await
            .map_err(internal("recording the install"))?;
        let built: HashSet<FileHash> = arrived.installed.built.iter().copied().collect();
        let index = chunk_index_rows(&arrived.manifest, &built);
        self.db.index_chunks(&index).await.map_err(internal("chunk index"))?;
        let _ = tokio::fs::remove_dir_all(self.staging_dir(pkg)).await;
        self.metrics.installs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// What the receiver holds of `pkg`: installed, previous and staged versions.
    pub async fn package_state(&self, pkg: &str) -> Result<PackageState, ReceiveError> {
        let p = self.db.package_summary(pkg).await.map_err(internal("state"))?.unwrap_or_default();
        let staged = self.db.latest_staged_version(pkg).await.map_err(internal("state"))?;
        Ok(PackageState {
            package: pkg.to_owned(),
            installed_version: p.installed_version,
            installed_root: p.installed_root.map(|r| r.to_hex()),
            previous_version: p.previous_version,
            staged_version: staged,
            broken: p.broken,
        })
    }

    /// Drops the chunk index entries of library objects just removed.
    pub async fn forget_objects(&self, removed: Vec<FileHash>) {
        forget_objects(&self.db, removed).await
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
        format!("{}-{}-{n}", dpsync_store::now_ms(), std::process::id())
    }

    fn check_disk(&self, incoming: u64) -> Result<(), ReceiveError> {
        if let Ok(st) = rustix::fs::statvfs(&self.data_dir) {
            let free = st.f_bavail.saturating_mul(st.f_frsize);
            if free < incoming.saturating_add(self.disk_reserve) {
                return Err(ReceiveError::InsufficientStorage(format!(
                    "only {} MiB free on the receiver's data disk, {} MiB reserved; free space there",
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
        let staged: HashSet<ChunkId> =
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
                    if seen.insert(c.id) && !staged.contains(&c.id) {
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
        let known = self.db.indexed_chunks(&candidates).await.map_err(internal("chunk index"))?;
        let lib = self.library.clone();
        let available: HashSet<ChunkId> =
            blocking(move || known.into_iter().filter(|loc| lib.contains(&loc.file)).map(|loc| loc.chunk).collect())
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
        for c in self.db.staged_chunks(pkg).await.map_err(internal("staged chunks"))? {
            sources.insert(c.chunk, Source::Pack { path: staging.join(c.pack), offset: c.offset, len: c.len });
        }
        let known: HashSet<ChunkId> = sources.keys().copied().collect();
        let (lib, m) = (self.library.clone(), manifest.clone());
        let wanted: Vec<ChunkId> = blocking(move || {
            let mut seen = HashSet::new();
            m.files()
                .filter(|e| force || !lib.contains(&e.file_hash().expect("file")))
                .flat_map(|e| e.chunks())
                .filter(|c| !known.contains(&c.id) && seen.insert(c.id))
                .map(|c| c.id)
                .collect()
        })
        .await?;
        let rows = self.db.indexed_chunks(&wanted).await.map_err(internal("chunk index"))?;
        let lib = self.library.clone();
        let rows = blocking(move || rows.into_iter().filter(|loc| lib.contains(&loc.file)).collect::<Vec<_>>()).await?;
        for loc in rows {
            sources.entry(loc.chunk).or_insert(Source::Object { hash: loc.file, offset: loc.offset, len: loc.len });
        }
        Ok(sources)
    }

    /// The staged manifest of `version`: the one decoded at `offer` when it is that
    /// version's, else the staged blob decoded.
    async fn staged_manifest(
        &self,
        pkg: &str,
        version: i64,
        staged: &mut Staged,
    ) -> Result<Arc<Manifest>, ReceiveError> {
        let offered = self.arrivals(pkg).lock().await.plan.take().and_then(|p| p.manifest_of(version));
        let staged_blob = std::mem::take(&mut staged.manifest);
        let staged_root = staged.content_root;
        let (manifest, blob) = blocking(move || {
            let m = match offered.filter(|m| m.content_root() == staged_root) {
                Some(m) => Ok(m),
                None => Manifest::decode(&staged_blob, &DecodeLimits::default())
                    .map(Arc::new)
                    .map_err(|e| ReceiveError::Internal(format!("staged manifest: {e}"))),
            };
            (m, staged_blob)
        })
        .await?;
        staged.manifest = blob;
        manifest
    }
}

/// Chunk index rows of the files of `manifest` in `files`: every chunk in every one of
/// them (its first place in each), so that removing one file leaves the others indexed.
fn chunk_index_rows(manifest: &Manifest, files: &HashSet<FileHash>) -> Vec<ChunkLocation> {
    let mut rows = Vec::new();
    let mut seen = HashSet::new();
    for e in manifest.files() {
        let h = e.file_hash().expect("file");
        if !files.contains(&h) {
            continue;
        }
        let mut offset = 0u64;
        for c in e.chunks() {
            if seen.insert((c.id, h)) {
                rows.push(ChunkLocation { chunk: c.id, file: h, offset, len: c.len });
            }
            offset += u64::from(c.len);
        }
    }
    rows
}

/// Drops the chunk index entries of library objects just removed.
async fn forget_objects(db: &AgentDb, removed: Vec<FileHash>) {
    for h in removed {
        if let Err(e) = db.unindex_file(&h).await {
            tracing::warn!("chunk index: {e}");
        }
    }
}

/// The file hashes of a stored manifest (none when it does not decode), read from its
/// encoding without decoding the whole manifest.
fn manifest_hashes(blob: Option<&Vec<u8>>) -> Vec<FileHash> {
    blob.and_then(|b| Manifest::file_hashes_of_encoding(b).ok()).unwrap_or_default()
}

/// The receiving side: the protocol's [`Receiver`], with what becomes of a verified
/// version decided by its sink `S`.
#[derive(Debug)]
pub struct Agent<S> {
    core: Core,
    sink: Arc<S>,
}

impl<S: VersionSink> Agent<S> {
    pub fn new(core: Core, sink: S) -> Self {
        Self { core, sink: Arc::new(sink) }
    }

    pub fn core(&self) -> &Core {
        &self.core
    }

    pub fn sink(&self) -> &S {
        &self.sink
    }

    /// Closes the database (at shutdown).
    pub async fn close(&self) {
        self.core.db.close().await;
    }
}

impl<S: VersionSink> Receiver for Agent<S> {
    async fn base_manifest(&self, pkg: &str, root: &ContentRoot) -> Result<Option<Arc<Manifest>>, ReceiveError> {
        let core = &self.core;
        let summary = core.db.package_summary(pkg).await.map_err(internal("base manifest"))?.unwrap_or_default();
        if summary.installed_root.as_ref() == Some(root)
            && let Some(v) = summary.installed_version
            && let Some(m) = self.sink.live_manifest(pkg, v)
        {
            return Ok(Some(m));
        }
        // Not in memory: the stored manifests (several MB each for large trees).
        let p = core.db.package(pkg).await.map_err(internal("base manifest"))?.unwrap_or_default();
        if p.installed_root.as_ref() == Some(root) {
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
        let rows = self.core.db.indexed_chunks(&ids).await.map_err(internal("chunk index"))?;
        let lib = self.core.library.clone();
        blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut out = HashMap::new();
            let mut total = 0u64;
            for loc in rows {
                // A chunk is indexed in every file that holds it: the first that reads
                // back intact answers.
                if out.contains_key(&loc.chunk) {
                    continue;
                }
                let Ok(f) = lib.open_object(&loc.file) else { continue };
                total += u64::from(loc.len);
                if total > max_bytes {
                    break;
                }
                let mut buf = vec![0u8; loc.len as usize];
                if f.read_exact_at(&mut buf, loc.offset).is_ok() && ChunkId::from(blake3::hash(&buf)) == loc.chunk {
                    out.insert(loc.chunk, Bytes::from(buf));
                }
            }
            out
        })
        .await
    }

    async fn peer_chunks(
        &self,
        pkg: &str,
        ticket: &str,
        ids: Vec<ChunkId>,
        max_bytes: u64,
    ) -> Result<HashMap<ChunkId, Bytes>, ReceiveError> {
        let now = dpsync_store::now_ms() / 1000;
        let t = self.core.trust.check_ticket(ticket, pkg, now).map_err(|e| {
            tracing::warn!(package = pkg, "refused chunks to a peer: {e}");
            ReceiveError::Forbidden(e.to_string())
        })?;
        // Only chunks of this package's installed content: the ticket is for it alone.
        let summary = self.core.db.package_summary(pkg).await.map_err(internal("peer chunks"))?.unwrap_or_default();
        let Some(root) = summary.installed_root else { return Ok(HashMap::new()) };
        let Some(manifest) = self.base_manifest(pkg, &root).await? else { return Ok(HashMap::new()) };
        let ids = blocking(move || {
            let held: std::collections::HashSet<ChunkId> =
                manifest.entries().iter().flat_map(|e| e.chunks().iter().map(|c| c.id)).collect();
            ids.into_iter().filter(|id| held.contains(id)).collect::<Vec<_>>()
        })
        .await?;
        tracing::debug!(package = pkg, holder = %t.holder, chunks = ids.len(), "serving chunks to a peer");
        self.read_chunks(pkg, ids, max_bytes).await
    }

    async fn package_state(&self, pkg: &str) -> Result<PackageState, ReceiveError> {
        self.core.package_state(pkg).await
    }

    async fn offer(
        &self,
        pkg: &str,
        version: i64,
        manifest: Arc<Manifest>,
        force: bool,
        meta: OfferMeta,
    ) -> Result<Vec<ChunkId>, ReceiveError> {
        let core = &self.core;
        let lock = core.lock(pkg);
        let _g = lock.lock().await;
        // What the sink can refuse without the signature is refused before checking it
        // (which pins a key on first use).
        self.sink.check_offer(pkg, &meta)?;
        let p = core.db.package_summary(pkg).await.map_err(internal("offer"))?.unwrap_or_default();
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
        core.check_signature(pkg, version, &root.to_hex(), &meta)?;
        // Only a verified version registers the package (on a child site, assigns it to
        // the site's targets): a refused offer leaves no trace.
        self.sink.accept_package(pkg, &meta).await?;
        if !force && !p.broken && p.installed_version == Some(version) && p.installed_root == Some(root) {
            return Ok(vec![]);
        }
        core.db
            .stage(Staged {
                package: pkg.to_owned(),
                version,
                content_root: root,
                manifest: encoded,
                force,
                signature: meta.signature.clone(),
            })
            .await
            .map_err(internal("staging"))?;
        let arrivals = core.arrivals(pkg);
        let mut arrivals = arrivals.lock().await;
        arrivals.plan = None;
        let missing = core.missing_chunks(pkg, manifest.clone(), force).await?;
        if core.write_on_arrival && !force && !missing.is_empty() {
            let (lib, staging, prefix) = (core.library.clone(), core.staging_dir(pkg), core.pack_name());
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
        let core = &self.core;
        if core.db.latest_staged_version(pkg).await.map_err(internal("chunks"))?.is_none() {
            return Err(ReceiveError::Conflict {
                message: format!("no manifest of {pkg} was offered; send the manifest first"),
                missing: vec![],
            });
        }
        let bytes: u64 = chunks.iter().map(|(_, d)| d.len() as u64).sum();
        core.check_disk(bytes)?;
        let count = chunks.len() as u64;
        // Held until the batch is recorded: batches of one package are written and
        // recorded one at a time.
        let cell = core.arrivals(pkg);
        let mut arrivals = cell.lock().await;
        let name = format!("{}.pack", core.pack_name());
        let (lib, path, taken) = (core.library.clone(), core.staging_dir(pkg).join(&name), arrivals.plan.take());
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
                ReceiveError::InsufficientStorage(format!("the receiver's disk is full: {e}"))
            } else {
                ReceiveError::Internal(format!("writing chunks: {e}"))
            }
        })?;
        let rows = |pack: String, r: Vec<arrival::PackRow>| PackRows {
            pack,
            chunks: r.into_iter().map(|(chunk, offset, len)| PackedChunk { chunk, offset, len }).collect(),
        };
        let mut staged: Vec<PackRows> = outcome.staged.into_iter().map(|(pack, r)| rows(pack, r)).collect();
        if !packed.is_empty() {
            staged.push(rows(name, packed));
        }
        let adopted_packs: Vec<String> = outcome.adopted.iter().map(|a| a.pack.clone()).collect();
        let index: Vec<ChunkLocation> = outcome
            .adopted
            .iter()
            .flat_map(|a| {
                a.chunks.iter().map(|&(chunk, offset, len)| ChunkLocation { chunk, file: a.hash, offset, len })
            })
            .collect();
        core.db.record_arrivals(pkg, &staged, &adopted_packs, &index).await.map_err(internal("recording chunks"))?;
        arrivals.adopted.extend(outcome.adopted.iter().map(|a| a.hash));
        drop(arrivals);
        core.metrics.chunks_received.fetch_add(count, Ordering::Relaxed);
        core.metrics.chunk_bytes_received.fetch_add(bytes, Ordering::Relaxed);
        core.metrics.files_written_on_arrival.fetch_add(adopted_packs.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    async fn commit(&self, pkg: &str, version: i64) -> Result<CommitResponse, ReceiveError> {
        let core = &self.core;
        // Owned: the sink may keep it for clean-up that runs after the answer.
        let guard = core.lock(pkg).lock_owned().await;
        let clock = std::time::Instant::now();
        let p = core.db.package_summary(pkg).await.map_err(internal("commit"))?.unwrap_or_default();
        let Some(mut staged) = core.db.staged(pkg, version).await.map_err(internal("commit"))? else {
            if p.installed_version == Some(version) && !p.broken {
                return Ok(CommitResponse {
                    installed_version: version,
                    content_root: p.installed_root.map(|r| r.to_hex()).unwrap_or_default(),
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
        // whole are assembled by `build` from their packs, like any other file.
        let manifest = core.staged_manifest(pkg, version, &mut staged).await?;
        let sources = core.chunk_sources(pkg, &manifest, staged.force).await?;
        let (sink, lib, m2, force, package) =
            (self.sink.clone(), core.library.clone(), manifest.clone(), staged.force, pkg.to_owned());
        self.sink.prepare_build(core, pkg, force).await?;
        let prepare_ms = clock.elapsed().as_millis() as u64;
        let built = blocking(move || sink.build(&lib, &package, version, &m2, &sources, force)).await?;
        let installed = match built {
            Ok(i) => i,
            Err(InstallError::Missing(missing)) => {
                for id in &missing {
                    let _ = core.db.forget_staged_chunk(pkg, id).await;
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
                return Err(ReceiveError::InsufficientStorage(format!("the receiver's disk is full: {e}")));
            }
            Err(e) => return Err(ReceiveError::Internal(e.to_string())),
        };
        let written_on_arrival = std::mem::take(&mut core.arrivals(pkg).lock().await.adopted);
        let files_built = installed.files_built + written_on_arrival.len() as u64;
        let files_linked = installed.files_linked;
        core.metrics.files_built.fetch_add(files_built, Ordering::Relaxed);
        let content_root = staged.content_root.to_hex();
        let arrived = Arrived {
            package: pkg.to_owned(),
            version,
            content_root: staged.content_root,
            manifest,
            encoded: staged.manifest,
            signature: staged.signature,
            installed,
            written_on_arrival,
            guard,
        };
        self.sink.commit(core, arrived).await?;
        tracing::debug!(
            package = pkg,
            version,
            prepare_ms,
            total_ms = clock.elapsed().as_millis() as u64,
            "commit done"
        );
        Ok(CommitResponse { installed_version: version, content_root, files_built, files_linked })
    }

    fn commit_progress(&self, pkg: &str) -> Option<CommitStage> {
        self.sink.build_progress(pkg)
    }

    async fn relabel(
        &self,
        pkg: &str,
        version: i64,
        root: &str,
        meta: OfferMeta,
    ) -> Result<CommitResponse, ReceiveError> {
        let core = &self.core;
        let lock = core.lock(pkg);
        let _g = lock.lock().await;
        core.check_signature(pkg, version, root, &meta)?;
        let p = core.db.package_summary(pkg).await.map_err(internal("relabel"))?.unwrap_or_default();
        match p.installed_version {
            Some(iv) if !p.broken && p.installed_root.is_some_and(|r| r.to_hex() == root) && iv <= version => {
                if iv < version {
                    self.sink.relabel(core, pkg, version, root, &meta).await?;
                    core.db.relabel(pkg, version).await.map_err(internal("relabel"))?;
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
        let core = &self.core;
        let lock = core.lock(pkg);
        let _g = lock.lock().await;
        let arrived = std::mem::take(&mut *core.arrivals(pkg).lock().await).adopted;
        let removed = self.sink.remove(core, pkg, arrived).await?;
        core.db.delete_package(pkg).await.map_err(internal("remove"))?;
        let staging = core.staging_dir(pkg);
        if let Err(e) = tokio::fs::remove_dir_all(&staging).await
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(package = pkg, "cannot remove {}: {e}", staging.display());
        }
        core.forget_objects(removed).await;
        tracing::info!(package = pkg, "package removed");
        Ok(())
    }

    async fn status(&self, pkg: &str) -> Result<serde_json::Value, ReceiveError> {
        self.sink.status(&self.core, pkg).await
    }

    async fn set_owner(&self, pkg: &str, chain: String) -> Result<dpsync_transfer::wire::OwnerAnswer, ReceiveError> {
        let core = &self.core;
        let lock = core.lock(pkg);
        let _g = lock.lock().await;
        let own = core.trust.record_ownership(pkg, &chain).map_err(|e| {
            tracing::warn!(package = pkg, "ownership chain refused: {e}");
            ReceiveError::Forbidden(e.to_string())
        })?;
        let owner = own.owner().to_owned();
        let chain = dpsync_transfer::trust::Handover::encode_chain(&own.chain);
        self.sink.owner_changed(core, pkg, &owner, &chain).await?;
        Ok(dpsync_transfer::wire::OwnerAnswer { owner, chain })
    }

    async fn validate(&self, pkg: &str) -> Result<ValidateResponse, ReceiveError> {
        let lock = self.core.lock(pkg);
        let _g = lock.lock().await;
        let result = self.sink.validate(&self.core, pkg).await;
        if let Ok(r) = &result
            && r.installed_version.is_some()
        {
            let ok = r.broken.is_empty() && r.repaired.is_empty();
            self.core.metrics.validations.fetch_add(1, Ordering::Relaxed);
            if !ok {
                self.core.metrics.validation_failures.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = self.core.db.record_validation(pkg, dpsync_store::now_ms(), ok).await {
                tracing::warn!(package = pkg, "cannot record the validation: {e}");
            }
        }
        result
    }

    fn chunks_rejected(&self, _pkg: &str, count: u64) {
        self.core.metrics.chunks_rejected.fetch_add(count, Ordering::Relaxed);
    }

    async fn home_page(&self) -> Option<String> {
        Some(self.page().await)
    }

    async fn open_file(&self, pkg: &str, path: &RelPath) -> Result<ServedFile, ReceiveError> {
        self.sink.open_file(pkg, path)
    }

    fn metrics(&self) -> String {
        let mut registry = metrics::registry();
        self.core.metrics.register(&mut registry);
        if let Some(free) = daemon::disk_free(&self.core.data_dir) {
            registry.register(
                "disk_free_bytes",
                "Free space for the receiver on its data directory's filesystem",
                prometheus_client::metrics::gauge::ConstGauge::new(i64::try_from(free).unwrap_or(i64::MAX)),
            );
        }
        self.sink.register_metrics(&mut registry);
        metrics::encode(&registry)
    }
}

/// Opens a DP agent's state under `cfg.data_dir`: its library, database and trust store,
/// and the installed versions it serves.
pub async fn open_dp(cfg: &AgentConfig) -> Result<Agent<DpTrees>> {
    daemon::secure_data_dir(&cfg.data_dir)?;
    let trust = Arc::new(TrustStore::open(&cfg.data_dir.join("trusted-sites.json"), &cfg.trust, cfg.strict_trust)?);
    let lib_dir = cfg.data_dir.join("library");
    let library = Arc::new(tokio::task::spawn_blocking(move || Library::open(&lib_dir)).await??);
    let core = Core::open(CoreConfig {
        data_dir: cfg.data_dir.clone(),
        db_file: cfg.data_dir.join("agent.db"),
        library,
        trust,
        disk_reserve: cfg.disk_reserve,
    })
    .await?;
    let trees = DpTrees::load(&core, cfg.validate_read_rate).await?;
    Ok(Agent::new(core, trees))
}

/// Runs a DP agent on `listener` until `shutdown` completes. The caller has bound the
/// listener and holds the data directory's lock ([`daemon::lock_data_dir`]).
pub async fn run(
    listener: tokio::net::TcpListener,
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    run_with_ready(listener, cfg, shutdown, || {}).await
}

/// [`run`], calling `ready` once the agent's state is open and it is about to serve (the
/// binary tells systemd then).
pub async fn run_with_ready(
    listener: tokio::net::TcpListener,
    cfg: AgentConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce() + Send,
) -> Result<()> {
    let addr = listener.local_addr()?;
    dpsync_library::write_atomic(&cfg.data_dir.join("listen.addr"), addr.to_string().as_bytes())
        .with_context(|| format!("cannot write {}", cfg.data_dir.join("listen.addr").display()))?;
    let tls = daemon::listener_tls(&cfg.data_dir, &addr.to_string(), &cfg.tls)?;
    let agent = Arc::new(open_dp(&cfg).await?);
    if cfg.token.is_none() {
        tracing::warn!(
            "no --token: any site that can reach this port can push content (use only on a trusted network)"
        );
    }
    let service = ServiceConfig {
        token: cfg.token.clone(),
        role: "dp",
        site_code: None,
        site_key: None,
        decode_limits: DecodeLimits::default(),
    };
    let app = dpsync_transfer::service::router(agent.clone(), service);
    tracing::info!(listen = %addr, tls = tls.is_some(), data_dir = %cfg.data_dir.display(), "dpsync agent ready");
    ready();
    dpsync_transfer::listen::serve(listener, app, tls, shutdown).await.context("serving")?;
    agent.close().await;
    tracing::info!("dpsync agent stopped");
    Ok(())
}
