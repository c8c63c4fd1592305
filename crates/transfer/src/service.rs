//! The receiving side of the protocol (axum), shared by DP agents and child sites.
//! It authenticates, bounds and verifies every request, then calls a [`Receiver`].

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::io::SeekFrom;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use dpsync_hash::{ChunkId, ContentRoot, DecodeLimits, FileHash, Manifest, ManifestDelta, RelPath};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::wire::{
    self, BatchResponse, CommitProgress, CommitResponse, Hello, PackageState, ValidateResponse, WireError,
};

/// An error a receiver reports; the variant picks the HTTP status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReceiveError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// A body (or what it decompresses to) over a limit.
    #[error("{0}")]
    PayloadTooLarge(String),
    /// A commit that still lacks chunks, or a version that is not newer.
    #[error("{message}")]
    Conflict { message: String, missing: Vec<ChunkId> },
    /// The receiver refuses to fill its disk.
    #[error("{0}")]
    InsufficientStorage(String),
    /// A manifest delta against content the receiver does not hold (409, code
    /// [`wire::ERROR_BASE_UNKNOWN`]): the sender offers the full manifest instead.
    #[error("{0}")]
    BaseUnknown(String),
    #[error("{0}")]
    Internal(String),
}

impl IntoResponse for ReceiveError {
    fn into_response(self) -> Response {
        let (status, missing) = match &self {
            ReceiveError::NotFound(_) => (StatusCode::NOT_FOUND, vec![]),
            ReceiveError::BadRequest(_) => (StatusCode::BAD_REQUEST, vec![]),
            ReceiveError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, vec![]),
            ReceiveError::Forbidden(_) => (StatusCode::FORBIDDEN, vec![]),
            ReceiveError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, vec![]),
            ReceiveError::Conflict { missing, .. } => (StatusCode::CONFLICT, missing.clone()),
            ReceiveError::InsufficientStorage(_) => (StatusCode::INSUFFICIENT_STORAGE, vec![]),
            ReceiveError::BaseUnknown(_) => (StatusCode::CONFLICT, vec![]),
            ReceiveError::Internal(m) => {
                tracing::error!("{m}");
                (StatusCode::INTERNAL_SERVER_ERROR, vec![])
            }
        };
        let code = matches!(self, ReceiveError::BaseUnknown(_)).then(|| wire::ERROR_BASE_UNKNOWN.to_owned());
        (status, Json(WireError { error: self.to_string(), missing, code })).into_response()
    }
}

/// An installed file opened for a client download.
#[derive(Debug)]
pub struct ServedFile {
    pub file: std::fs::File,
    pub len: u64,
    pub hash: FileHash,
    pub modified: Option<SystemTime>,
}

/// What the sender says about an offered version beyond its manifest.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct OfferMeta {
    /// The package's name at its source site.
    pub name: Option<String>,
    /// The owning site's code.
    pub source_site: Option<String>,
    /// The owning site's signature over (package, source site, version, content root), hex.
    pub signature: Option<String>,
    /// The owning site's public key (hex), pinned by the receiver on first use.
    pub site_key: Option<String>,
}

/// What a receiver says it is doing while a commit runs (see [`Receiver::commit_progress`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitStage {
    pub phase: String,
    pub files_done: u64,
    pub files_total: u64,
}

/// What a DP agent or a child site does with verified input.
pub trait Receiver: Send + Sync + 'static {
    fn package_state(&self, pkg: &str) -> impl Future<Output = Result<PackageState, ReceiveError>> + Send;
    /// Stores the manifest of `version` and answers the chunks still needed. With
    /// `force`, every chunk of every file is needed (nothing local is trusted).
    fn offer(
        &self,
        pkg: &str,
        version: i64,
        manifest: Arc<Manifest>,
        force: bool,
        meta: OfferMeta,
    ) -> impl Future<Output = Result<Vec<ChunkId>, ReceiveError>> + Send;
    /// Keeps chunks whose hashes the service has already checked.
    fn store_chunks(
        &self,
        pkg: &str,
        version: i64,
        chunks: Vec<(ChunkId, Bytes)>,
    ) -> impl Future<Output = Result<(), ReceiveError>> + Send;
    fn commit(&self, pkg: &str, version: i64) -> impl Future<Output = Result<CommitResponse, ReceiveError>> + Send;
    /// How far the running commit of `pkg` has come (`None`: the receiver does not say).
    fn commit_progress(&self, _pkg: &str) -> Option<CommitStage> {
        None
    }
    /// Records `version` as installed when the installed content already has `root`
    /// (a refresh that changed nothing): O(1), no manifest on the wire.
    fn relabel(
        &self,
        pkg: &str,
        version: i64,
        root: &str,
        meta: OfferMeta,
    ) -> impl Future<Output = Result<CommitResponse, ReceiveError>> + Send;
    fn remove(&self, pkg: &str) -> impl Future<Output = Result<(), ReceiveError>> + Send;
    fn validate(&self, pkg: &str) -> impl Future<Output = Result<ValidateResponse, ReceiveError>> + Send;
    /// Opens an installed file for a client download (`None`: downloads not served).
    fn open_file(&self, pkg: &str, path: &RelPath) -> impl Future<Output = Result<ServedFile, ReceiveError>> + Send;
    /// The receiver's own distribution status of a package (child sites: its targets).
    fn status(&self, pkg: &str) -> impl Future<Output = Result<serde_json::Value, ReceiveError>> + Send;
    /// Verifies and keeps the ownership chain of a package handed to another site
    /// (`trust::Handover`, wire form); answers the owner now and the chain the receiver
    /// keeps (which may be longer than the one given: the package was handed on since).
    /// `Forbidden` for a chain that does not verify. The default takes none.
    fn set_owner(
        &self,
        _pkg: &str,
        _chain: String,
    ) -> impl Future<Output = Result<wire::OwnerAnswer, ReceiveError>> + Send {
        async { Err(ReceiveError::BadRequest("this receiver does not take package handovers".into())) }
    }
    /// Prometheus text exposition.
    fn metrics(&self) -> String;
    /// Counts chunks of `pkg` that failed verification (the service asks for them again).
    fn chunks_rejected(&self, _pkg: &str, _count: u64) {}
    /// A small read-only HTML page of what the receiver holds, for `GET /` (`None`: 404).
    fn home_page(&self) -> impl Future<Output = Option<String>> + Send {
        async { None }
    }
    /// The manifest with content root `root` of `pkg`, if the receiver holds that content
    /// (a version it has installed): the base a manifest delta is applied to. The
    /// default holds none, so every delta is answered "send the full manifest".
    fn base_manifest(
        &self,
        _pkg: &str,
        _root: &ContentRoot,
    ) -> impl Future<Output = Result<Option<Arc<Manifest>>, ReceiveError>> + Send {
        async { Ok(None) }
    }
    /// The bytes of those of `ids` the receiver holds in installed content (the bases of
    /// chunks encoded against them), at most `max_bytes` in all. The service checks each
    /// against its id before use; a chunk whose base is missing is rejected, and the
    /// sender sends it again without a base.
    fn read_chunks(
        &self,
        _pkg: &str,
        _ids: Vec<ChunkId>,
        _max_bytes: u64,
    ) -> impl Future<Output = Result<HashMap<ChunkId, Bytes>, ReceiveError>> + Send {
        async { Ok(HashMap::new()) }
    }
    /// The bytes of those of `ids` that are chunks of `pkg`'s installed content, for a
    /// peer DP that presents `ticket` (a site-issued `trust::Ticket`, wire form), at most
    /// `max_bytes` in all. `Forbidden` when the ticket does not verify. The default
    /// serves no peers.
    fn peer_chunks(
        &self,
        _pkg: &str,
        _ticket: &str,
        _ids: Vec<ChunkId>,
        _max_bytes: u64,
    ) -> impl Future<Output = Result<HashMap<ChunkId, Bytes>, ReceiveError>> + Send {
        async { Err(ReceiveError::Forbidden("this receiver serves no chunks to peers".into())) }
    }
}

/// Settings of the service.
#[derive(Clone)]
pub struct ServiceConfig {
    /// Bearer token every push call must present (`None`: no authentication).
    pub token: Option<String>,
    /// "dp" or "site".
    pub role: &'static str,
    pub site_code: Option<String>,
    /// The site's public signing key (child sites), told in `hello`.
    pub site_key: Option<String>,
    pub decode_limits: DecodeLimits,
}

impl std::fmt::Debug for ServiceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceConfig")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("role", &self.role)
            .field("site_code", &self.site_code)
            .finish()
    }
}

struct Shared<R> {
    receiver: Arc<R>,
    cfg: ServiceConfig,
    /// Commits running or recently finished, by (package, version): a commit runs as its
    /// own task, which a request for the same version joins and `GET …/commit` polls.
    commits: Mutex<HashMap<(String, i64), Arc<CommitTask>>>,
}

/// The outcome of a commit task, once it ended, and when.
type CommitOutcome = Option<(Result<CommitResponse, ReceiveError>, Instant)>;

/// One commit running as its own task.
#[derive(Debug)]
struct CommitTask {
    started: Instant,
    outcome: tokio::sync::watch::Receiver<CommitOutcome>,
}

impl CommitTask {
    /// How long a finished commit's outcome stays available to `GET …/commit`.
    const KEPT: Duration = Duration::from_secs(600);

    fn finished_at(&self) -> Option<Instant> {
        self.outcome.borrow().as_ref().map(|(_, at)| *at)
    }

    /// The outcome, waiting at most `wait` for it (`None`: as long as it takes);
    /// `None` if it is still running then.
    async fn outcome(&self, wait: Option<Duration>) -> Option<Result<CommitResponse, ReceiveError>> {
        let mut rx = self.outcome.clone();
        let done = async move {
            match rx.wait_for(Option::is_some).await {
                Ok(v) => v.as_ref().map(|(r, _)| r.clone()).expect("waited for an outcome"),
                Err(_) => Err(ReceiveError::Internal("the commit task ended without an outcome".into())),
            }
        };
        match wait {
            None => Some(done.await),
            Some(d) => tokio::time::timeout(d, done).await.ok(),
        }
    }
}

/// The commit task of `pkg` version `version`: the running one, or a new one.
fn start_commit<R: Receiver>(s: &Arc<Shared<R>>, pkg: &str, version: i64) -> Arc<CommitTask> {
    let mut commits = s.commits.lock().unwrap();
    commits.retain(|_, t| t.finished_at().is_none_or(|at| at.elapsed() < CommitTask::KEPT));
    let key = (pkg.to_owned(), version);
    if let Some(t) = commits.get(&key)
        && t.finished_at().is_none()
    {
        return t.clone();
    }
    let (tx, rx) = tokio::sync::watch::channel(None);
    let task = Arc::new(CommitTask { started: Instant::now(), outcome: rx });
    commits.insert(key, task.clone());
    let (r, pkg) = (s.receiver.clone(), pkg.to_owned());
    // Its own task (a client that goes away does not cancel it), inside another that
    // records the outcome even if it panics.
    tokio::spawn(async move {
        let outcome = tokio::spawn(async move { r.commit(&pkg, version).await })
            .await
            .unwrap_or_else(|e| Err(ReceiveError::Internal(format!("receiver task: {e}"))));
        tx.send_replace(Some((outcome, Instant::now())));
    });
    task
}

/// What a commit request asked for in its `Prefer` header(s): an early `202` answer
/// (`respond-async`) and how long to wait before it (`wait=N`, seconds).
#[derive(Debug, Default, PartialEq, Eq)]
struct Prefer {
    respond_async: bool,
    wait: Option<Duration>,
}

impl Prefer {
    fn of(headers: &HeaderMap) -> Self {
        let mut out = Self::default();
        for v in headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()) {
            for pref in v.split(',').map(str::trim) {
                if pref.eq_ignore_ascii_case(wire::PREFER_RESPOND_ASYNC) {
                    out.respond_async = true;
                } else if let Some(n) = pref.strip_prefix("wait=").and_then(|n| n.trim().parse::<u64>().ok()) {
                    out.wait = Some(Duration::from_secs(n.min(wire::MAX_COMMIT_WAIT_SECS)));
                }
            }
        }
        out
    }
}

/// Waits for the commit's outcome at most `wait` (`None`: to the end) and answers it,
/// or `202 Accepted` with its progress if it still runs.
async fn commit_answer<R: Receiver>(
    s: &Shared<R>,
    pkg: &str,
    version: i64,
    task: &CommitTask,
    wait: Option<Duration>,
) -> Result<Response, ReceiveError> {
    if let Some(outcome) = task.outcome(wait).await {
        return Ok(Json(outcome?).into_response());
    }
    let stage = s
        .receiver
        .commit_progress(pkg)
        .unwrap_or_else(|| CommitStage { phase: "running".into(), ..Default::default() });
    let progress = CommitProgress {
        package: pkg.to_owned(),
        version,
        phase: stage.phase,
        files_done: stage.files_done,
        files_total: stage.files_total,
        elapsed_ms: task.started.elapsed().as_millis() as u64,
    };
    let location = format!("/v1/packages/{pkg}/versions/{version}/commit");
    Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(progress)).into_response())
}

/// The service's routes. Push routes require the token; `hello`, file downloads and
/// `/metrics` do not.
pub fn router<R: Receiver>(receiver: Arc<R>, cfg: ServiceConfig) -> Router {
    let shared = Arc::new(Shared { receiver, cfg, commits: Mutex::new(HashMap::new()) });
    let push = Router::new()
        .route("/v1/packages/{pkg}", get(state::<R>).delete(remove::<R>))
        .route(
            "/v1/packages/{pkg}/versions/{version}/manifest",
            put(offer::<R>)
                .layer(DefaultBodyLimit::max(wire::MAX_MANIFEST_BYTES))
                .layer(middleware::from_fn_with_state(wire::MAX_MANIFEST_BYTES, refuse_announced_oversize)),
        )
        .route(
            "/v1/packages/{pkg}/versions/{version}/chunks",
            post(chunks::<R>)
                .layer(DefaultBodyLimit::max(wire::MAX_BATCH_BYTES))
                .layer(middleware::from_fn_with_state(wire::MAX_BATCH_BYTES, refuse_announced_oversize)),
        )
        .route("/v1/packages/{pkg}/versions/{version}/commit", post(commit::<R>).get(commit_state::<R>))
        .route("/v1/packages/{pkg}/versions/{version}/relabel", post(relabel::<R>))
        .route(
            "/v1/packages/{pkg}/versions/{version}/pull",
            post(pull::<R>).layer(DefaultBodyLimit::max(wire::MAX_PULL_REQUEST_BYTES)),
        )
        .route("/v1/packages/{pkg}/validate", post(validate::<R>))
        .route("/v1/packages/{pkg}/status", get(status::<R>))
        .route("/v1/packages/{pkg}/owner", put(set_owner::<R>))
        .route_layer(middleware::from_fn_with_state(shared.clone(), authenticate::<R>));
    Router::new()
        .route("/", get(home::<R>))
        .route("/v1/hello", get(hello::<R>))
        .route("/v1/packages/{pkg}/files/{*path}", get(download::<R>))
        .route("/metrics", get(metrics::<R>))
        // Peers hold no push token: a site-issued ticket is checked instead.
        .route("/v1/packages/{pkg}/peer-chunks", post(peer_chunks::<R>))
        .merge(push)
        .layer(DefaultBodyLimit::max(64 << 10))
        .with_state(shared)
        .fallback(|| async { ReceiveError::NotFound("no such endpoint".into()) })
        .layer(middleware::map_response(json_errors))
}

/// Gives every error answer the protocol's JSON body ([`WireError`]): axum's own
/// rejections (a path, query or body that does not parse, a body over its limit, a
/// method not allowed) are plain text otherwise.
async fn json_errors(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error())
        || resp.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"))
    {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 16 << 10).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text).trim().to_owned();
    let error = if text.is_empty() { status.canonical_reason().unwrap_or("error").to_ascii_lowercase() } else { text };
    let mut out = (status, Json(WireError { error, missing: vec![], code: None })).into_response();
    for (k, v) in &parts.headers {
        if k != header::CONTENT_TYPE && k != header::CONTENT_LENGTH {
            out.headers_mut().insert(k.clone(), v.clone());
        }
    }
    out
}

async fn authenticate<R: Receiver>(State(s): State<Arc<Shared<R>>>, req: Request, next: Next) -> Response {
    if let Some(expected) = &s.cfg.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.as_bytes()));
        if !ok {
            let why = if given.is_none() { "missing bearer token" } else { "wrong token" };
            tracing::warn!(path = %req.uri().path(), "refused a push call: {why}");
            return ReceiveError::Unauthorized(format!("{why}: this target only accepts its site's token"))
                .into_response();
        }
    }
    next.run(req).await
}

/// Answers 413 at once to a body whose announced length is over `limit`, before reading
/// any of it (and before `100 Continue`); a body that does not announce its length is cut
/// at the limit while it is read.
async fn refuse_announced_oversize(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(len) = announced
        && len > limit as u64
    {
        return ReceiveError::PayloadTooLarge(format!(
            "request body of {len} bytes is over the limit of {limit} bytes"
        ))
        .into_response();
    }
    next.run(req).await
}

/// Runs a state-changing receiver call as its own task: if the client goes away, the
/// call still runs to its end (and keeps its package lock until then) instead of being
/// cancelled between two steps.
async fn detached<T: Send + 'static>(
    call: impl Future<Output = Result<T, ReceiveError>> + Send + 'static,
) -> Result<T, ReceiveError> {
    tokio::spawn(call).await.map_err(|e| ReceiveError::Internal(format!("receiver task: {e}")))?
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Package ids are a 3-character site code and 5 hex digits, e.g. `PS100012`.
pub fn valid_package_id(pkg: &str) -> bool {
    pkg.len() == 8
        && pkg[..3].bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        && pkg[3..].bytes().all(|b| b.is_ascii_digit() || (b'A'..=b'F').contains(&b))
}

fn check_pkg(pkg: &str) -> Result<(), ReceiveError> {
    if valid_package_id(pkg) {
        Ok(())
    } else {
        Err(ReceiveError::BadRequest(format!("{:?} is not a package id (like PS100012)", truncate(pkg))))
    }
}

fn check_version(v: i64) -> Result<(), ReceiveError> {
    if v >= 1 { Ok(()) } else { Err(ReceiveError::BadRequest(format!("source version {v} is invalid"))) }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

async fn hello<R: Receiver>(State(s): State<Arc<Shared<R>>>) -> Json<Hello> {
    Json(Hello {
        protocol: wire::PROTOCOL_VERSION,
        role: s.cfg.role.into(),
        site_code: s.cfg.site_code.clone(),
        site_key: s.cfg.site_key.clone(),
        software: concat!("dpsync ", env!("CARGO_PKG_VERSION")).into(),
    })
}

/// `GET /`: the receiver's own page (no token: it shows nothing a client of the DP
/// could not already download or scrape).
async fn home<R: Receiver>(State(s): State<Arc<Shared<R>>>) -> Response {
    match s.receiver.home_page().await {
        Some(html) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], html)
            .into_response(),
        None => ReceiveError::NotFound("no such endpoint".into()).into_response(),
    }
}

async fn metrics<R: Receiver>(State(s): State<Arc<Shared<R>>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.receiver.metrics())
}

async fn state<R: Receiver>(
    State(s): State<Arc<Shared<R>>>,
    Path(pkg): Path<String>,
) -> Result<Json<PackageState>, ReceiveError> {
    check_pkg(&pkg)?;
    Ok(Json(s.receiver.package_state(&pkg).await?))
}

#[derive(Debug, Deserialize)]
struct OfferQuery {
    #[serde(default)]
    force: bool,
    name: Option<String>,
    source_site: Option<String>,
    signature: Option<String>,
    site_key: Option<String>,
}

async fn offer<R: Receiver>(
    State(s): State<Arc<Shared<R>>>,
    Path((pkg, version)): Path<(String, i64)>,
    Query(q): Query<OfferQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ReceiveError> {
    check_pkg(&pkg)?;
    check_version(version)?;
    let claimed_root = headers.get(wire::HEADER_CONTENT_ROOT).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let is_delta = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(wire::CONTENT_TYPE_MANIFEST_DELTA.as_bytes()));
    let limits = s.cfg.decode_limits;
    let manifest = if is_delta {
        manifest_from_delta(&s, &pkg, body, claimed_root, limits).await?
    } else {
        tokio::task::spawn_blocking(move || -> Result<Manifest, ReceiveError> {
            let raw = wire::decompress_manifest(&body)
                .map_err(|e| ReceiveError::BadRequest(format!("manifest body is not valid zstd: {e}")))?;
            let m = Manifest::decode(&raw, &limits)
                .map_err(|e| ReceiveError::BadRequest(format!("manifest refused: {e}")))?;
            if let Some(claimed) = claimed_root
                && m.content_root().to_hex() != claimed.to_ascii_lowercase()
            {
                return Err(ReceiveError::BadRequest("manifest does not match its content root".into()));
            }
            Ok(m)
        })
        .await
        .map_err(|e| ReceiveError::Internal(format!("manifest task: {e}")))??
    };
    let meta = OfferMeta { name: q.name, source_site: q.source_site, signature: q.signature, site_key: q.site_key };
    let (r, p) = (s.receiver.clone(), pkg.clone());
    let missing = detached(async move { r.offer(&p, version, Arc::new(manifest), q.force, meta).await }).await?;
    Ok(([(header::CONTENT_TYPE, wire::CONTENT_TYPE_CHUNK_IDS)], wire::encode_ids(&missing)).into_response())
}

/// Decodes a manifest delta, applies it to the base the receiver holds, and requires the
/// result to have the content root the sender claims (which the owner's signature covers,
/// checked by the receiver's `offer`).
async fn manifest_from_delta<R: Receiver>(
    s: &Shared<R>,
    pkg: &str,
    body: Bytes,
    claimed_root: Option<String>,
    limits: DecodeLimits,
) -> Result<Manifest, ReceiveError> {
    let Some(claimed) = claimed_root else {
        return Err(ReceiveError::BadRequest(format!(
            "a manifest delta needs the {} header",
            wire::HEADER_CONTENT_ROOT
        )));
    };
    let claimed = ContentRoot::from_hex(&claimed).map_err(|e| ReceiveError::BadRequest(e.to_string()))?;
    let delta = tokio::task::spawn_blocking(move || -> Result<ManifestDelta, ReceiveError> {
        let raw = wire::decompress_manifest(&body)
            .map_err(|e| ReceiveError::BadRequest(format!("manifest delta body is not valid zstd: {e}")))?;
        ManifestDelta::decode(&raw, &limits)
            .map_err(|e| ReceiveError::BadRequest(format!("manifest delta refused: {e}")))
    })
    .await
    .map_err(|e| ReceiveError::Internal(format!("manifest task: {e}")))??;
    let pkg_name = pkg.to_owned();
    let Some(base) = s.receiver.base_manifest(pkg, &delta.base).await? else {
        return Err(ReceiveError::BaseUnknown(format!(
            "{pkg}: this target does not hold content {}; send the full manifest",
            delta.base
        )));
    };
    tokio::task::spawn_blocking(move || -> Result<Manifest, ReceiveError> {
        // A refusal is the delta's fault only if the receiver's base really has the root
        // the delta names (checked only then: it costs a pass over the base); otherwise
        // the receiver's record is stale and the full manifest is the way forward.
        let refuse = |why: String| {
            if base.content_root() == delta.base {
                ReceiveError::BadRequest(why)
            } else {
                ReceiveError::BaseUnknown(format!(
                    "{pkg_name}: the content this target holds is not {}; send the full manifest",
                    delta.base
                ))
            }
        };
        let m = delta.apply(&base).map_err(|e| refuse(format!("manifest delta refused: {e}")))?;
        if m.encode().len() > wire::MAX_MANIFEST_DECODED {
            return Err(ReceiveError::PayloadTooLarge("manifest delta expands to too large a manifest".into()));
        }
        if m.content_root() != claimed {
            return Err(refuse("manifest delta applied to its base does not give the claimed content root".into()));
        }
        Ok(m)
    })
    .await
    .map_err(|e| ReceiveError::Internal(format!("manifest task: {e}")))?
}

/// A batch body as far as it came: the bytes, and why it ended early (the connection
/// broke, or nothing came for [`BODY_STALL`]) if it did.
async fn read_batch_body(body: axum::body::Body) -> Result<(Bytes, Option<String>), ReceiveError> {
    use futures::StreamExt;
    let mut stream = body.into_data_stream();
    let mut out = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout(BODY_STALL, stream.next()).await {
            Ok(Some(Ok(piece))) => {
                if out.len() + piece.len() > wire::MAX_BATCH_BYTES {
                    return Err(ReceiveError::PayloadTooLarge(format!(
                        "chunk batch is over the limit of {} bytes",
                        wire::MAX_BATCH_BYTES
                    )));
                }
                out.extend_from_slice(&piece);
            }
            Ok(None) => return Ok((out.freeze(), None)),
            Ok(Some(Err(e))) => return Ok((out.freeze(), Some(format!("the connection broke: {e}")))),
            Err(_) => return Ok((out.freeze(), Some(format!("nothing came for {} s", BODY_STALL.as_secs())))),
        }
    }
}

/// How long a batch body may send nothing before the receiver gives up on it.
const BODY_STALL: Duration = Duration::from_secs(120);

async fn chunks<R: Receiver>(
    State(s): State<Arc<Shared<R>>>,
    Path((pkg, version)): Path<(String, i64)>,
    body: axum::body::Body,
) -> Result<Json<BatchResponse>, ReceiveError> {
    check_pkg(&pkg)?;
    check_version(version)?;
    let (body, cut) = read_batch_body(body).await?;
    if let Some(why) = cut {
        // The sender is gone: what arrived whole is kept (in a task of its own, as the
        // connection's handler may be dropped), so that it is not sent again.
        let received = body.len();
        let kept = detached(async move {
            let batch = tokio::task::spawn_blocking(move || wire::decode_batch_prefix(&body))
                .await
                .map_err(|e| ReceiveError::Internal(format!("batch task: {e}")))?;
            if batch.is_empty() {
                return Ok(0);
            }
            accept_batch(&s, &pkg, version, batch).await.map(|r| r.accepted)
        })
        .await?;
        tracing::warn!(received, kept, "a chunk batch was cut short ({why}); kept its whole chunks");
        return Err(ReceiveError::BadRequest(format!("the chunk batch was cut short: {why}")));
    }
    let batch = tokio::task::spawn_blocking(move || {
        wire::decode_batch(&body).map_err(|e| match e {
            wire::BatchError::TooMuchData => ReceiveError::PayloadTooLarge(e.to_string()),
            e => ReceiveError::BadRequest(e.to_string()),
        })
    })
    .await
    .map_err(|e| ReceiveError::Internal(format!("batch task: {e}")))??;
    accept_batch(&s, &pkg, version, batch).await.map(Json)
}

/// Verifies the chunks of a batch (decoding those sent against base chunks) and stores
/// the good ones; answers which were accepted and which must come again.
async fn accept_batch<R: Receiver>(
    s: &Arc<Shared<R>>,
    pkg: &str,
    version: i64,
    batch: Vec<wire::WireChunk>,
) -> Result<BatchResponse, ReceiveError> {
    let pkg = pkg.to_owned();
    // Chunks encoded against a base chunk: the receiver reads the bases from what it
    // holds, and each is checked against its id here before it is used.
    let base_ids: HashSet<ChunkId> = batch.iter().flat_map(|c| c.bases.iter().copied()).collect();
    let bases = if base_ids.is_empty() {
        HashMap::new()
    } else {
        let (r, p) = (s.receiver.clone(), pkg.clone());
        let ids = base_ids.into_iter().collect();
        detached(async move { r.read_chunks(&p, ids, wire::MAX_BATCH_RAW_BYTES).await }).await?
    };
    let (good, rejected) = tokio::task::spawn_blocking(move || {
        let bases: HashMap<ChunkId, Bytes> =
            bases.into_iter().filter(|(id, b)| ChunkId::from(blake3::hash(b)) == *id).collect();
        let mut good = Vec::with_capacity(batch.len());
        let mut rejected = Vec::new();
        for c in batch {
            // A run of bases is their bytes in order; any one missing and there is none.
            let joined;
            let base = match &c.bases[..] {
                [] => None,
                [one] => bases.get(one).map(|b| &b[..]),
                run => match run.iter().map(|id| bases.get(id)).collect::<Option<Vec<_>>>() {
                    Some(parts) => {
                        joined = parts.iter().flat_map(|b| b.iter().copied()).collect::<Vec<u8>>();
                        Some(&joined[..])
                    }
                    None => None,
                },
            };
            match c.decode_with_base(base) {
                Ok(raw) if ChunkId::from(blake3::hash(&raw)) == c.id => good.push((c.id, raw)),
                _ => rejected.push(c.id),
            }
        }
        (good, rejected)
    })
    .await
    .map_err(|e| ReceiveError::Internal(format!("batch task: {e}")))?;
    if !rejected.is_empty() {
        tracing::warn!(package = %pkg, version, rejected = rejected.len(), "chunks failed verification; asking for them again");
        s.receiver.chunks_rejected(&pkg, rejected.len() as u64);
    }
    let accepted = good.len() as u64;
    if !good.is_empty() {
        let (r, p) = (s.receiver.clone(), pkg.clone());
        detached(async move { r.store_chunks(&p, version, good).await }).await?;
    }
    Ok(BatchResponse { accepted, rejected })
}

/// `POST …/pull`: fetches chunks from peer DPs (see [`crate::peer`]); runs as its own
/// task, so a site that goes away does not cut it half-way.
async fn pull<R: Receiver>(
    State(s): State<Arc<Shared<R>>>,
    Path((pkg, version)): Path<(String, i64)>,
    Json(req): Json<wire::PullRequest>,
) -> Result<Json<wire::PullAnswer>, ReceiveError> {
    check_pkg(&pkg)?;
    check_version(version)?;
    for source in &req.sources {
        crate::client::check_target_url(&source.url, source.fingerprint.is_some())
            .map_err(|e| ReceiveError::BadRequest(format!("source {}: {e}", truncate(&source.name))))?;
    }
    let r = s.receiver.clone();
    let answer = tokio::spawn(async move { crate::peer::pull(r, &pkg, version, req).await })
        .await
        .map_err(|e| ReceiveError::Internal(format!("pull task: {e}")))?;
    Ok(Json(answer))
}

/// `POST …/peer-chunks` (from another DP): the chunks asked for by id, as a batch, for
/// a holder of a site-issued ticket; `403` without one that verifies.
async fn peer_chunks<R: Receiver>(
    State(s): State<Arc<Shared<R>>>,
    Path(pkg): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ReceiveError> {
    check_pkg(&pkg)?;
    let Some(ticket) = headers.get(wire::HEADER_PEER_TICKET).and_then(|v| v.to_str().ok()) else {
        tracing::warn!(package = %pkg, "refused chunks to a peer without a ticket");
        return Err(ReceiveError::Forbidden("a peer ticket from the site is required to read chunks".into()));
    };
    let ids = wire::decode_ids(&body).ok_or_else(|| ReceiveError::BadRequest("bad chunk id list".into()))?;
    let (r, p, t) = (s.receiver.clone(), pkg.clone(), ticket.to_owned());
    let found = detached(async move { r.peer_chunks(&p, &t, ids, wire::TARGET_BATCH_RAW_BYTES).await }).await?;
    let body = tokio::task::spawn_blocking(move || {
        let mut b = wire::BatchBuilder::with_capacity(found.values().map(Bytes::len).sum());
        for (id, raw) in &found {
            b.push(&wire::WireChunk::stored(*id, raw));
        }
        b.finish()
    })
    .await
    .map_err(|e| ReceiveError::Internal(format!("batch task: {e}")))?;
    Ok(([(header::CONTENT_TYPE, wire::CONTENT_TYPE_CHUNKS)], body).into_response())
}

/// `POST …/commit`: runs the commit as its own task (or joins the one running for this
/// version) and answers its outcome; with `Prefer: respond-async`, answers `202` with its
/// progress if it is not done within `wait` seconds (default 5).
async fn commit<R: Receiver>(
    State(s): State<Arc<Shared<R>>>,
    Path((pkg, version)): Path<(String, i64)>,
    headers: HeaderMap,
) -> Result<Response, ReceiveError> {
    check_pkg(&pkg)?;
    check_version(version)?;
    let prefer = Prefer::of(&headers);
    let task = start_commit(&s, &pkg, version);
    let wait = prefer.respond_async.then(|| prefer.wait.unwrap_or(Duration::from_secs(5)));
    commit_answer(&s, &pkg, version, &task, wait).await
}

/// `GET …/commit`: the outcome of this version's commit, waiting for it at most `wait`
/// seconds (default 10), or `202` with its progress; `404` when no commit of it runs or
/// ended in the last 10 minutes (the receiver restarted): the sender commits again.
async fn commit_state<R: Receiver>(
    State(s): State<Arc<Shared<R>>>,
    Path((pkg, version)): Path<(String, i64)>,
    headers: HeaderMap,
) -> Result<Response, ReceiveError> {
    check_pkg(&pkg)?;
    check_version(version)?;
    let task = s.commits.lock().unwrap().get(&(pkg.clone(), version)).cloned().ok_or_else(|| {
        ReceiveError::NotFound(format!(
            "no commit of {pkg} version {version} runs here or ended recently; commit again"
        ))
    })?;
    let wait = Prefer::of(&headers).wait.unwrap_or(Duration::from_secs(10));
    commit_answer(&s, &pkg, version, &task, Some(wait)).await
}

#[derive(Debug, Deserialize)]
struct RelabelQuery {
    root: String,
    source_site: Option<String>,
    signature: Option<String>,
    site_key: Option<String>,
}

async fn relabel<R: Receiver>(
    State(s): State<Arc<Shared<R>>>,
    Path((pkg, version)): Path<(String, i64)>,
    Query(q): Query<RelabelQuery>,
) -> Result<Json<CommitResponse>, ReceiveError> {
    check_pkg(&pkg)?;
    check_version(version)?;
    let root = dpsync_hash::ContentRoot::from_hex(&q.root).map_err(|e| ReceiveError::BadRequest(e.to_string()))?;
    let meta = OfferMeta { name: None, source_site: q.source_site, signature: q.signature, site_key: q.site_key };
    let r = s.receiver.clone();
    Ok(Json(detached(async move { r.relabel(&pkg, version, &root.to_hex(), meta).await }).await?))
}

async fn remove<R: Receiver>(
    State(s): State<Arc<Shared<R>>>,
    Path(pkg): Path<String>,
) -> Result<StatusCode, ReceiveError> {
    check_pkg(&pkg)?;
    let r = s.receiver.clone();
    detached(async move { r.remove(&pkg).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /v1/packages/{pkg}/owner`: the package's ownership chain (text).
async fn set_owner<R: Receiver>(
    State(s): State<Arc<Shared<R>>>,
    Path(pkg): Path<String>,
    body: String,
) -> Result<Json<wire::OwnerAnswer>, ReceiveError> {
    check_pkg(&pkg)?;
    let r = s.receiver.clone();
    Ok(Json(detached(async move { r.set_owner(&pkg, body).await }).await?))
}

async fn status<R: Receiver>(
    State(s): State<Arc<Shared<R>>>,
    Path(pkg): Path<String>,
) -> Result<Json<serde_json::Value>, ReceiveError> {
    check_pkg(&pkg)?;
    Ok(Json(s.receiver.status(&pkg).await?))
}

async fn validate<R: Receiver>(
    State(s): State<Arc<Shared<R>>>,
    Path(pkg): Path<String>,
) -> Result<Json<ValidateResponse>, ReceiveError> {
    check_pkg(&pkg)?;
    let r = s.receiver.clone();
    Ok(Json(detached(async move { r.validate(&pkg).await }).await?))
}

async fn download<R: Receiver>(
    State(s): State<Arc<Shared<R>>>,
    Path((pkg, path)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ReceiveError> {
    check_pkg(&pkg)?;
    let path = RelPath::new(path).map_err(|e| ReceiveError::BadRequest(format!("bad path: {e}")))?;
    let served = s.receiver.open_file(&pkg, &path).await?;
    let etag = format!("\"{}\"", served.hash);
    if headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"))
    {
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    let now = SystemTime::now();
    let last_modified = served.modified.and_then(|m| http_time(m.min(now)));
    // A range of a file that changed since the client's validator would splice two
    // versions: with an `If-Range` that does not hold, the range is ignored.
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .filter(|_| headers.get(header::IF_RANGE).is_none_or(|v| if_range_holds(v, &etag, last_modified, now)))
        .map(|r| parse_range(r, served.len));
    let (status, start, len) = match range {
        None | Some(RangeSpec::Ignore) => (StatusCode::OK, 0, served.len),
        Some(RangeSpec::Satisfiable(start, end)) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        Some(RangeSpec::Unsatisfiable) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{}", served.len)), (header::ETAG, etag)],
            )
                .into_response());
        }
    };
    let mut file = tokio::fs::File::from_std(served.file);
    file.seek(SeekFrom::Start(start)).await.map_err(|e| ReceiveError::Internal(format!("seek: {e}")))?;
    let stream = tokio_util::io::ReaderStream::with_capacity(file.take(len), 256 << 10);
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(path.as_str())));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::ETAG, HeaderValue::from_str(&etag).expect("hex is a valid header"));
    if let Some(t) = last_modified {
        h.insert(header::LAST_MODIFIED, HeaderValue::from_str(&httpdate::fmt_http_date(t)).expect("ascii"));
    }
    if status == StatusCode::PARTIAL_CONTENT {
        let v = format!("bytes {}-{}/{}", start, start + len - 1, served.len);
        h.insert(header::CONTENT_RANGE, HeaderValue::from_str(&v).expect("ascii"));
    }
    Ok(resp)
}

/// `t` to the whole second, as an HTTP-date carries it; `None` outside the years
/// 1970-9999 that an HTTP-date can express.
fn http_time(t: SystemTime) -> Option<SystemTime> {
    let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    (secs < 253_402_300_800).then(|| std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs))
}

/// Whether an `If-Range` precondition holds (RFC 9110 §13.1.5), i.e. whether the client's
/// copy is still the file served. An entity-tag must equal `etag` by strong comparison
/// (a weak `W/"…"` tag never does). An HTTP-date (any of the three formats) must equal
/// `last_modified` exactly, and counts only as a strong validator when it is at least a
/// second older than the answer (`now`, §8.8.2.2). Anything else (a list, `*`, garbage)
/// does not hold.
fn if_range_holds(value: &HeaderValue, etag: &str, last_modified: Option<SystemTime>, now: SystemTime) -> bool {
    let Ok(v) = value.to_str() else { return false };
    let v = v.trim();
    if v.starts_with('"') || v.starts_with("W/") {
        return v == etag;
    }
    match (httpdate::parse_http_date(v), last_modified, http_time(now)) {
        (Ok(date), Some(lm), Some(now)) => date == lm && lm < now,
        _ => false,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum RangeSpec {
    /// Malformed or multi-range: serve the whole file (allowed by RFC 9110).
    Ignore,
    Satisfiable(u64, u64),
    Unsatisfiable,
}

fn parse_range(v: &str, len: u64) -> RangeSpec {
    let Some(spec) = v.trim().strip_prefix("bytes=") else { return RangeSpec::Ignore };
    if spec.contains(',') {
        return RangeSpec::Ignore;
    }
    let Some((a, b)) = spec.split_once('-') else { return RangeSpec::Ignore };
    let (a, b) = (a.trim(), b.trim());
    match (a.parse::<u64>().ok(), b.parse::<u64>().ok()) {
        (Some(start), end) if a.chars().all(|c| c.is_ascii_digit()) => {
            if b.is_empty() || end.is_some() {
                let end = end.unwrap_or(u64::MAX).min(len.saturating_sub(1));
                if start >= len || end < start { RangeSpec::Unsatisfiable } else { RangeSpec::Satisfiable(start, end) }
            } else {
                RangeSpec::Ignore
            }
        }
        (None, Some(suffix)) if a.is_empty() => {
            if suffix == 0 || len == 0 {
                RangeSpec::Unsatisfiable
            } else {
                RangeSpec::Satisfiable(len - suffix.min(len), len - 1)
            }
        }
        _ => RangeSpec::Ignore,
    }
}

fn content_type(path: &str) -> &'static str {
    let ext = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_default();
    match ext.as_str() {
        "txt" | "log" | "ini" | "cfg" => "text/plain; charset=utf-8",
        "htm" | "html" => "text/html; charset=utf-8",
        "json" => "application/json",
        "xml" => "application/xml",
        "zip" => "application/zip",
        "msi" => "application/x-msi",
        "exe" | "dll" => "application/vnd.microsoft.portable-executable",
        "ps1" => "text/plain; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), RangeSpec::Satisfiable(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), RangeSpec::Satisfiable(90, 99));
        assert_eq!(parse_range("bytes=90-500", 100), RangeSpec::Satisfiable(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), RangeSpec::Satisfiable(90, 99));
        assert_eq!(parse_range("bytes=-500", 100), RangeSpec::Satisfiable(0, 99));
        assert_eq!(parse_range("bytes=100-", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=5-2", 100), RangeSpec::Unsatisfiable);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("items=0-1", 100), RangeSpec::Ignore);
        assert_eq!(parse_range("bytes=x-1", 100), RangeSpec::Ignore);
    }

    #[test]
    fn if_range() {
        let etag = format!("\"{}\"", "ab".repeat(32));
        let lm = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let now = lm + std::time::Duration::from_secs(5);
        let holds = |v: &str| if_range_holds(&HeaderValue::from_str(v).unwrap(), &etag, Some(lm), now);
        assert!(holds(&etag));
        assert!(holds(&format!(" {etag} ")));
        assert!(!holds(&format!("W/{etag}")));
        assert!(!holds(&etag.to_ascii_uppercase()));
        assert!(!holds(&format!("{etag}, {etag}")));
        assert!(!holds("*"));
        assert!(holds("Tue, 14 Nov 2023 22:13:20 GMT"));
        assert!(holds("Tuesday, 14-Nov-23 22:13:20 GMT"));
        assert!(holds("Tue Nov 14 22:13:20 2023"));
        assert!(!holds("Tue, 14 Nov 2023 22:13:21 GMT"));
        assert!(!holds("garbage"));
        assert!(!holds(""));
        let date = HeaderValue::from_static("Tue, 14 Nov 2023 22:13:20 GMT");
        assert!(!if_range_holds(&date, &etag, None, now), "no Last-Modified: a date never holds");
        assert!(!if_range_holds(&date, &etag, Some(lm), lm), "not a second older than the answer: weak");
        assert!(if_range_holds(&date, &etag, Some(lm), lm + std::time::Duration::from_secs(1)));
        assert_eq!(http_time(lm + std::time::Duration::from_millis(999)), Some(lm));
        assert_eq!(http_time(std::time::UNIX_EPOCH - std::time::Duration::from_secs(1)), None);
    }

    #[test]
    fn prefer_header() {
        let of = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append("prefer", HeaderValue::from_str(v).unwrap());
            }
            Prefer::of(&h)
        };
        assert_eq!(of(&[]), Prefer::default());
        assert_eq!(of(&["respond-async, wait=7"]), Prefer { respond_async: true, wait: Some(Duration::from_secs(7)) });
        assert_eq!(
            of(&["Respond-Async", "wait=3"]),
            Prefer { respond_async: true, wait: Some(Duration::from_secs(3)) }
        );
        assert_eq!(of(&["wait=100000"]).wait, Some(Duration::from_secs(wire::MAX_COMMIT_WAIT_SECS)));
        assert_eq!(of(&["wait=x, handling=lenient"]), Prefer::default());
    }

    #[test]
    fn package_ids() {
        assert!(valid_package_id("PS100012"));
        assert!(valid_package_id("XY9ABCDE"));
        assert!(!valid_package_id("PS10001"));
        assert!(!valid_package_id("ps100012"));
        assert!(!valid_package_id("PS1000G2"));
        assert!(!valid_package_id("../../..."));
    }
}
