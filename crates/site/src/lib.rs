//! The site server (`dpsync server`): owns the store and the content library, runs
//! refreshes, the durable job runner that pushes versions to targets, garbage
//! collection, and answers the admin API. A site started with a receiving listener is
//! also a child site: it receives like a DP (the agent crate's core) and commits what
//! it receives to its own store ([`ChildSite`]).
//!
//! **API Boundary:** [`run`] serves already-bound [`Listeners`] until a shutdown future
//! completes; the binary parses flags, binds, and handles signals.

mod admin;
pub mod backup;
mod clients;
mod cluster;
mod config;
mod distribute;
pub mod export;
mod handover;
mod lifecycle;
mod metrics;
mod receive;
mod refresh;
mod targets;
pub mod web;
pub mod windows;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use dpsync_hash::{ChunkParams, DecodeLimits, FileHash, Manifest};
use dpsync_library::Library;
use dpsync_store::{Store, StoreError};
use tokio_util::sync::CancellationToken;

use dpsync_api::{GcReport, Progress};

pub use admin::router;
pub use config::{ServerConfig, ServerSettings};
pub use distribute::DistConfig;
pub use metrics::SiteMetrics;
pub use receive::ChildSite;

/// A decoded manifest and its compressed wire form.
type WireManifest = (Arc<Manifest>, bytes::Bytes);
/// A cache slot filled once: pushes of one version that start together wait for the
/// first one's decode instead of each holding a decoded copy of their own.
type CacheSlot = Arc<tokio::sync::OnceCell<WireManifest>>;

/// A failure the admin API reports; the variant picks the HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// The request is understood but refused (bad source tree, not the owner, …).
    #[error("{0}")]
    Refused(String),
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl From<StoreError> for SiteError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(m) => SiteError::NotFound(m),
            StoreError::Conflict(m) => SiteError::Conflict(m),
            e => SiteError::Internal(anyhow::Error::new(e).context("store")),
        }
    }
}

/// Shared state of a running site server.
#[derive(Debug)]
pub struct Site {
    pub metrics: SiteMetrics,
    pub cfg: ServerConfig,
    pub store: Store,
    pub library: Arc<Library>,
    pub params: ChunkParams,
    package_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Refreshes hold it shared; `gc` holds it exclusively, so a sweep never removes
    /// content a refresh has imported but not yet committed.
    gc_lock: tokio::sync::RwLock<()>,
    pub dist: DistConfig,
    /// Wakes the job runner.
    jobs: tokio::sync::Notify,
    /// Set with a wake of `jobs` that brings new work (a version committed, an action
    /// asked): the runner claims at once instead of letting ended jobs gather first.
    jobs_new_work: std::sync::atomic::AtomicBool,
    /// Wakes the scheduler (a schedule changed).
    schedules: tokio::sync::Notify,
    /// Scheduled validations running at once (see `lifecycle`).
    validation_slots: tokio::sync::Semaphore,
    /// Scheduled runs in progress (`refresh PKG`, `validate TARGET_ID`).
    scheduled_running: Mutex<HashSet<String>>,
    /// Live progress of running jobs, by (package, target id).
    pub progress: Mutex<HashMap<(String, i64), Progress>>,
    /// Pull DPs' jobs: who waits for a source, and who takes a version from the site
    /// because no source has it yet (see `distribute::PullJobs`).
    pull_jobs: distribute::PullJobs,
    /// Decoded manifests and their compressed wire form, by (package, version).
    manifest_cache: Mutex<HashMap<(String, i64), CacheSlot>>,
    /// Compressed manifest deltas, by (package, base version, version), with the decoded
    /// base (bounded like `manifest_cache`).
    delta_cache: Mutex<HashMap<(String, i64, i64), CacheSlot>>,
    /// Chunk batches held in memory by all pushes together, in KiB (see `DistConfig`).
    batch_memory: distribute::Budget,
    /// This site's signing key (`site.key` in the library given by `--library`, else in
    /// the data directory).
    pub site_key: dpsync_transfer::trust::SiteKey,
    /// Pinned keys of the sites whose packages this site receives and relays.
    pub trust: Arc<dpsync_transfer::trust::TrustStore>,
    /// One HTTP client per target, reused across jobs.
    clients: clients::Clients,
    /// The backup running now, if any.
    backup: backup::Running,
    /// This start of the node (random): its `nodes` row names it, so a second process
    /// with the same `--node` is noticed.
    pub instance: String,
    /// Held while the server runs on a SQLite database.
    /// Held while this server serves a SQLite database; released when `run` returns (a
    /// server restarted in the same process must not find it taken by the old one's
    /// lingering tasks).
    sqlite_lock: Mutex<Option<std::fs::File>>,
}

impl Site {
    pub async fn open(cfg: ServerConfig) -> Result<Self> {
        dpsync_agent::daemon::secure_data_dir(&cfg.data_dir)?;
        let dist = cfg.dist.clone();
        let shared = cfg.library_dir != cfg.data_dir.join("library");
        if shared {
            dpsync_agent::daemon::secure_data_dir(&cfg.library_dir)
                .with_context(|| format!("the content library {} (--library)", cfg.library_dir.display()))?;
        }
        let site_key = dpsync_transfer::trust::SiteKey::load_or_create(&cfg.site_key_path)?;
        let trust = Arc::new(dpsync_transfer::trust::TrustStore::open(
            &cfg.data_dir.join("trusted-sites.json"),
            &cfg.trust,
            cfg.strict_trust,
        )?);
        // SQLite serves one server: a second one on the same file (from another data
        // directory) is refused before it touches anything.
        let sqlite_lock = match sqlite_path(&cfg.database_url) {
            Some(db) => Some(lock_sqlite(&db)?),
            None => None,
        };
        let store = match Store::connect(&cfg.database_url).await {
            Ok(store) => store,
            // Names the file and says what to do already.
            Err(e @ StoreError::Corrupt { .. }) => return Err(e.into()),
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("cannot open the database {}", redact_url(&cfg.database_url))));
            }
        };
        match store.meta_get("site_code").await? {
            Some(code) if code != cfg.site_code => bail!(
                "this data directory belongs to site {code}, not {}; pass --site-code {code} or use another --data-dir",
                cfg.site_code
            ),
            Some(_) => {}
            None => store.meta_set("site_code", &cfg.site_code).await?,
        }
        let lib_dir = cfg.library_dir.clone();
        let tmp = if shared { lib_dir.join("tmp").join(&cfg.node) } else { lib_dir.join("tmp") };
        let library = tokio::task::spawn_blocking(move || Library::open_with_tmp(&lib_dir, &tmp)).await??;
        cluster::check(&store, &cfg, &site_key).await?;
        let clients = clients::Clients::new(cfg.dist.stall);
        Ok(Self {
            metrics: SiteMetrics::default(),
            cfg,
            store,
            library: Arc::new(library),
            params: ChunkParams::default(),
            package_locks: Mutex::new(HashMap::new()),
            gc_lock: tokio::sync::RwLock::new(()),
            batch_memory: distribute::Budget::new(dist.batch_memory),
            dist,
            jobs: tokio::sync::Notify::new(),
            jobs_new_work: std::sync::atomic::AtomicBool::new(false),
            schedules: tokio::sync::Notify::new(),
            validation_slots: tokio::sync::Semaphore::new(lifecycle::VALIDATIONS_AT_ONCE),
            scheduled_running: Mutex::new(HashSet::new()),
            progress: Mutex::new(HashMap::new()),
            pull_jobs: distribute::PullJobs::default(),
            manifest_cache: Mutex::new(HashMap::new()),
            delta_cache: Mutex::new(HashMap::new()),
            site_key,
            trust,
            clients,
            backup: Default::default(),
            instance: cluster::instance_id(),
            sqlite_lock: Mutex::new(sqlite_lock),
        })
    }

    fn package_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.package_locks.lock().unwrap().entry(id.to_owned()).or_default().clone()
    }

    pub async fn find_package(&self, pkg: &str) -> Result<dpsync_store::Package, SiteError> {
        self.store.package(pkg).await?.ok_or_else(|| {
            SiteError::NotFound(format!(
                "no package {pkg:?} on site {}; `dpsync package list` shows them",
                self.cfg.site_code
            ))
        })
    }

    /// Prunes old versions and removes library content no retained version names.
    pub async fn gc(&self) -> Result<GcReport, SiteError> {
        let _exclusive = self.gc_lock.write().await;
        let _everywhere = self.store.cluster_lock(&[(dpsync_store::ClusterKey::Library, false)]).await?;
        let started = std::time::SystemTime::now();
        let mut report = GcReport::default();
        for p in self.store.packages().await? {
            report.versions_pruned += self.store.prune_versions(&p.id, self.cfg.keep_versions).await?;
        }
        let manifests = self.store.live_file_hashes().await?;
        let library = self.library.clone();
        let stats = tokio::task::spawn_blocking(move || -> Result<_> {
            let mut live = HashSet::<FileHash>::new();
            for blob in manifests {
                let m = Manifest::decode(&blob, &DecodeLimits::default()).context("a stored manifest is corrupt")?;
                live.extend(m.files().filter_map(|e| e.file_hash()));
            }
            Ok(library.sweep(&live, started)?)
        })
        .await
        .context("gc task")??;
        report.objects_removed = stats.objects_removed;
        report.bytes_removed = stats.bytes_removed;
        report.objects_kept = stats.objects_kept;
        tracing::info!(?report, "garbage collection done");
        Ok(report)
    }
}

/// The file of a `sqlite:` database URL (none for an in-memory one or PostgreSQL).
fn sqlite_path(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (!path.is_empty() && !path.starts_with(":memory:")).then(|| PathBuf::from(path))
}

/// Locks `DB-server.lock` beside a SQLite database for as long as the file is open.
fn lock_sqlite(db: &std::path::Path) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut name = db.as_os_str().to_owned();
    name.push("-server.lock");
    let path = PathBuf::from(name);
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    if f.try_lock().is_err() {
        bail!(
            "the SQLite database {} is in use by another dpsync server; SQLite serves one server only: \
             stop the other one, or run several nodes on PostgreSQL (--database-url postgres://…) with one --library",
            db.display()
        );
    }
    Ok(f)
}

/// Hides a password in a database URL for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The sockets a server serves, bound before it starts (tests bind port 0).
#[derive(Debug)]
pub struct Listeners {
    /// The admin API (the CLI's socket).
    pub admin: tokio::net::UnixListener,
    /// Where the admin socket lives; removed at shutdown.
    pub admin_path: PathBuf,
    /// The receiving side, for a parent site (child sites only).
    pub receive: Option<tokio::net::TcpListener>,
    /// `/metrics` for Prometheus (`--metrics-listen`, which serves nothing else).
    pub metrics: Option<tokio::net::TcpListener>,
    /// The status page, `/v1/status` and `/metrics` (`--http-listen`).
    pub http: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Binds what `cfg` asks for: the admin socket (refusing a world-writable folder or
    /// a socket another server answers on), and the receiving and metrics listeners.
    pub async fn bind(cfg: &ServerConfig) -> Result<Self> {
        let admin = bind_admin_socket(&cfg.socket).await?;
        let receive = match &cfg.listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen on {addr}; is the port taken or the address wrong?"))?,
            ),
            None => None,
        };
        let metrics = match &cfg.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {addr}"))?,
            ),
            None => None,
        };
        let http = match &cfg.http_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("cannot listen for the status page on {addr}; is the port taken or the address wrong?")
            })?),
            None => None,
        };
        Ok(Self { admin, admin_path: cfg.socket.clone(), receive, metrics, http })
    }
}

/// Runs a site server on `listeners` until `shutdown` completes. The caller holds the
/// data directory's lock ([`dpsync_agent::daemon::lock_data_dir`]).
pub async fn run(
    listeners: Listeners,
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    run_with_ready(listeners, cfg, shutdown, || {}).await
}

/// [`run`], calling `ready` once the store is open and every listener serves (the
/// binary tells systemd then).
pub async fn run_with_ready(
    listeners: Listeners,
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: impl FnOnce() + Send,
) -> Result<()> {
    let socket = listeners.admin_path.clone();
    let result = serve(listeners, cfg, shutdown, ready).await;
    if let Err(e) = std::fs::remove_file(&socket)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %socket.display(), "cannot remove the admin socket: {e}");
    }
    result
}

async fn serve(
    listeners: Listeners,
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: impl FnOnce() + Send,
) -> Result<()> {
    let site = Arc::new(Site::open(cfg).await?);
    let stop = CancellationToken::new();
    let trigger = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        trigger.cancel();
    });
    tracing::info!(
        site = %site.cfg.site_code,
        data_dir = %site.cfg.data_dir.display(),
        socket = %listeners.admin_path.display(),
        database = %redact_url(&site.cfg.database_url),
        node = %site.cfg.node,
        library = %site.cfg.library_dir.display(),
        "dpsync server ready"
    );
    site.store.register_node(&site.cfg.node, &site.instance).await?;
    tokio::spawn(cluster::heartbeat(site.clone(), stop.clone()));
    tokio::spawn(distribute::run_jobs(site.clone(), stop.clone()));
    tokio::spawn(lifecycle::run_schedules(site.clone(), stop.clone()));
    if let Some(tcp) = listeners.receive {
        serve_receiving(&site, tcp, stop.clone()).await?;
    }
    if let Some(tcp) = listeners.metrics {
        let addr = tcp.local_addr()?;
        let app = admin::metrics_router(site.clone());
        let stop = stop.clone();
        tokio::spawn(async move {
            if let Err(e) = axum::serve(tcp, app).with_graceful_shutdown(stop.cancelled_owned()).await {
                tracing::error!("metrics listener: {e}");
            }
        });
        tracing::info!(listen = %addr, "serving /metrics");
    }
    if let Some(tcp) = listeners.http {
        web::serve(&site, tcp, stop.clone()).await?;
    }
    let app = router(site.clone());
    ready();
    let served = axum::serve(listeners.admin, app).with_graceful_shutdown(stop.clone().cancelled_owned()).await;
    stop.cancel();
    // The other nodes need not wait for this one's leases to run out.
    match site.store.node_stopped(&site.cfg.node, &site.instance).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(jobs = n, "gave this node's running jobs back to the queue"),
        Err(e) => tracing::warn!("cannot record this node's stop: {e}"),
    }
    site.store.close().await;
    site.sqlite_lock.lock().unwrap().take();
    tracing::info!("dpsync server stopped");
    served.context("admin socket")
}

/// Starts the receiving side of a child site on `tcp`.
async fn serve_receiving(site: &Arc<Site>, tcp: tokio::net::TcpListener, stop: CancellationToken) -> Result<()> {
    let addr = tcp.local_addr()?;
    let data_dir = &site.cfg.data_dir;
    let tls = dpsync_agent::daemon::listener_tls(data_dir, &addr.to_string(), &site.cfg.tls)?;
    dpsync_library::write_atomic(&data_dir.join("listen.addr"), addr.to_string().as_bytes())
        .with_context(|| format!("cannot write {}", data_dir.join("listen.addr").display()))?;
    let core = dpsync_agent::Core::open(dpsync_agent::CoreConfig {
        data_dir: data_dir.clone(),
        db_file: data_dir.join("receive.db"),
        library: site.library.clone(),
        trust: site.trust.clone(),
        disk_reserve: site.cfg.disk_reserve,
    })
    .await?;
    let receiver = Arc::new(dpsync_agent::Agent::new(core, ChildSite::new(site.clone())));
    if site.cfg.listen_token.is_none() {
        tracing::warn!("no --token for --listen: any site that can reach {addr} can push content here");
    }
    let service = dpsync_transfer::service::ServiceConfig {
        token: site.cfg.listen_token.clone(),
        role: "site",
        site_code: Some(site.cfg.site_code.clone()),
        site_key: Some(site.site_key.public_hex()),
        decode_limits: DecodeLimits::default(),
    };
    let app = dpsync_transfer::service::router(receiver.clone(), service);
    tokio::spawn(async move {
        if let Err(e) = dpsync_transfer::listen::serve(tcp, app, tls, stop.cancelled_owned()).await {
            tracing::error!("receiving service: {e}");
        }
        receiver.close().await;
    });
    tracing::info!(listen = %addr, "receiving content from a parent site");
    Ok(())
}

async fn bind_admin_socket(path: &PathBuf) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let mode = std::fs::metadata(parent).map(|m| m.permissions().mode()).unwrap_or(0);
        if mode & 0o002 != 0 {
            bail!(
                "the admin socket's folder {} is world-writable, so anyone could replace the socket; \
                 use a folder writable only by the server's user (e.g. the data directory)",
                parent.display()
            );
        }
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            bail!("a server is already listening on {}; stop it or pass another --socket", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
        tracing::warn!(socket = %path.display(), "removed a stale admin socket");
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on the admin socket {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(listener)
}
