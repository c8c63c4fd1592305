//! The pushing side of the protocol: one [`TargetClient`] per target, over reqwest.
//! Every call counts the request bytes it put on the wire, so the site can report
//! what each target cost.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dpsync_hash::ChunkId;
use reqwest::{Method, StatusCode, header};
use serde::de::DeserializeOwned;

use crate::wire::{
    self, BatchResponse, CommitProgress, CommitResponse, Hello, PackageState, ValidateResponse, WireError,
};

/// Why a call to a target failed. [`TransferError::is_retryable`] drives the site's
/// retry policy; a refusal says why in a [`RejectReason`], so no caller needs to know
/// which HTTP status carries what.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransferError {
    #[error("{target} is unreachable: {message}")]
    Unreachable { target: String, message: String },
    #[error("{target} is unreachable (no answer in time): {message}")]
    Timeout { target: String, message: String },
    /// The target answered, and refused the call.
    #[error("{target} refused the request: {reason}")]
    Rejected { target: String, reason: RejectReason },
    /// The target's TLS certificate is not the pinned one (or, unpinned, not trusted):
    /// retrying does not help, an administrator must check it and re-pin.
    #[error(
        "{target}: TLS certificate check failed ({message}); check the target's certificate and the \
         pinned fingerprint (the target's DATA_DIR/tls/fingerprint)"
    )]
    Certificate { target: String, message: String },
    /// This site could not set up a client for the target (its TLS settings).
    #[error("cannot set up a connection to {target}: {message}")]
    Client { target: String, message: String },
    #[error("{target} answered something this site does not understand: {message}")]
    Protocol { target: String, message: String },
}

impl TransferError {
    /// Network failures, timeouts and refusals that heal by themselves (see
    /// [`RejectReason::is_retryable`]) are worth retrying; a refused token, a certificate
    /// that does not match its pin or an answer this site does not understand need an
    /// administrator.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransferError::Unreachable { .. } | TransferError::Timeout { .. } => true,
            TransferError::Rejected { reason, .. } => reason.is_retryable(),
            TransferError::Certificate { .. } | TransferError::Client { .. } | TransferError::Protocol { .. } => false,
        }
    }

    /// The target's name, as the client was given it.
    pub fn target(&self) -> &str {
        match self {
            TransferError::Unreachable { target, .. }
            | TransferError::Timeout { target, .. }
            | TransferError::Rejected { target, .. }
            | TransferError::Certificate { target, .. }
            | TransferError::Client { target, .. }
            | TransferError::Protocol { target, .. } => target,
        }
    }

    /// Why the target refused the call, if it did.
    pub fn reason(&self) -> Option<&RejectReason> {
        match self {
            TransferError::Rejected { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// Why a target refused a call: the protocol's answers by meaning (the HTTP status and
/// the [`WireError`] body of the answer). The messages are the target's own.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// The push token is missing or not the one the target accepts.
    #[error("wrong or missing token ({0})")]
    Unauthorized(String),
    /// The target refuses this content or this sender: a signature it does not trust, a
    /// package it owns itself, …
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A manifest delta against content the target does not hold: offer the full manifest.
    #[error("it does not hold the base of the manifest delta ({0})")]
    BaseUnknown(String),
    /// A commit that still lacks these chunks (or they failed verification there).
    #[error("it still lacks {} chunks", .0.len())]
    MissingChunks(Vec<ChunkId>),
    /// No such package, version or endpoint there.
    #[error("not found: {0}")]
    NotFound(String),
    /// A body (or what it decompresses to) over the target's limits.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The target refuses to fill its disk.
    #[error("not enough disk space: {0}")]
    InsufficientStorage(String),
    /// A request the target could not parse or accept as sent.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The request clashes with the target's state (a version older than the installed
    /// one, a commit with nothing staged, …).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The target (or a proxy before it) asks to come back later.
    #[error("busy: {0}")]
    Busy(String),
    /// The target failed while handling the call.
    #[error("server error {status}: {message}")]
    Server { status: u16, message: String },
    /// An answer the protocol does not use (a proxy, or not a dpsync target at all).
    #[error("unexpected answer {status}: {message}")]
    Other { status: u16, message: String },
}

impl RejectReason {
    /// Refusals that may heal without an administrator: missing chunks or base (the
    /// sender resends), a full disk (space may be freed), a conflict with a transfer in
    /// progress, a busy or failing target.
    pub fn is_retryable(&self) -> bool {
        match self {
            RejectReason::BaseUnknown(_)
            | RejectReason::MissingChunks(_)
            | RejectReason::InsufficientStorage(_)
            | RejectReason::Conflict(_)
            | RejectReason::Busy(_)
            | RejectReason::Server { .. } => true,
            RejectReason::Unauthorized(_)
            | RejectReason::Forbidden(_)
            | RejectReason::NotFound(_)
            | RejectReason::TooLarge(_)
            | RejectReason::BadRequest(_)
            | RejectReason::Other { .. } => false,
        }
    }

    /// The reason an error answer gives: its status, and its [`WireError`] body when it
    /// has one (else the start of the body as text).
    pub fn from_answer(status: StatusCode, body: &[u8]) -> Self {
        let wire: Option<WireError> = serde_json::from_slice(body).ok();
        let message = wire
            .as_ref()
            .map(|b| b.error.clone())
            .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).trim().to_owned());
        match status {
            StatusCode::UNAUTHORIZED => RejectReason::Unauthorized(message),
            StatusCode::FORBIDDEN => RejectReason::Forbidden(message),
            StatusCode::NOT_FOUND => RejectReason::NotFound(message),
            StatusCode::PAYLOAD_TOO_LARGE => RejectReason::TooLarge(message),
            StatusCode::INSUFFICIENT_STORAGE => RejectReason::InsufficientStorage(message),
            StatusCode::BAD_REQUEST => RejectReason::BadRequest(message),
            StatusCode::CONFLICT => match wire {
                Some(w) if w.code.as_deref() == Some(wire::ERROR_BASE_UNKNOWN) => RejectReason::BaseUnknown(message),
                Some(w) if !w.missing.is_empty() => RejectReason::MissingChunks(w.missing),
                _ => RejectReason::Conflict(message),
            },
            StatusCode::REQUEST_TIMEOUT | StatusCode::TOO_MANY_REQUESTS => RejectReason::Busy(message),
            s if s.is_server_error() => RejectReason::Server { status: s.as_u16(), message },
            s => RejectReason::Other { status: s.as_u16(), message },
        }
    }
}

/// The HTTP client under [`TargetClient`]s (cheap to clone; clones share connections).
#[derive(Debug, Clone)]
pub struct HttpClient(reqwest::Client);

impl HttpClient {
    /// With `fingerprint`, the target's TLS certificate is pinned by its SHA-256 (one
    /// client per pin), else checked against the system's certificate authorities (one
    /// client may serve every such target).
    pub fn new(fingerprint: Option<&str>) -> Result<Self, String> {
        http_client(fingerprint).map(Self)
    }
}

fn http_client(fingerprint: Option<&str>) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder();
    if let Some(fp) = fingerprint {
        let cfg = crate::trust::pinned_client_config(fp).map_err(|e| e.to_string())?;
        builder = builder.tls_backend_preconfigured(cfg);
    }
    builder
        .connect_timeout(Duration::from_secs(10))
        .tcp_user_timeout(DEFAULT_STALL)
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| e.to_string())
}

/// A connection to one target's receiving service.
///
/// No call has a deadline for the whole request: a call fails when it stops making
/// progress. While a request body is being sent, that is `stall` without a byte taken
/// (and, in the kernel, `stall` with sent data unacknowledged: `TCP_USER_TIMEOUT`);
/// once it is sent, the answer must come within the time the bytes still queued need
/// at the link's measured rate, plus what the call itself may take on the target, plus
/// `stall`. A slow link therefore never times out while it moves, and a peer that
/// hangs (TLS done, then silence) is given up after about `stall`.
#[derive(Debug, Clone)]
pub struct TargetClient {
    http: reqwest::Client,
    base: String,
    name: String,
    token: Option<String>,
    commit_polls: CommitPolls,
    stall: Duration,
    /// Bytes per second the link carried on recent large requests (0 = not measured
    /// yet); shared by the clones of this client.
    rate: Arc<AtomicU64>,
    /// Spaces the bytes of every request body to the target (shared by the clones).
    pacer: Arc<Pacer>,
}

/// Holds the bytes sent to one target to a rate across all its calls (every package,
/// every connection): each slice of a request body is scheduled after the ones before
/// it, `len / rate` apart, with no credit saved up while idle. In any one second the
/// target gets at most the rate plus one slice.
#[derive(Debug, Default)]
struct Pacer {
    /// Bytes per second; 0: not limited.
    rate: AtomicU64,
    /// When the next slice may go.
    next: std::sync::Mutex<Option<Instant>>,
}

impl Pacer {
    /// When `n` bytes may go (`None`: now, not limited); reserves their time.
    fn reserve(&self, n: usize) -> Option<Instant> {
        let rate = self.rate.load(Ordering::Relaxed);
        if rate == 0 {
            return None;
        }
        let now = Instant::now();
        let mut next = self.next.lock().unwrap();
        let start = next.map_or(now, |t| t.max(now));
        *next = Some(start + Duration::from_secs_f64(n as f64 / rate as f64));
        Some(start)
    }
}

/// How long a target may take to act on a call before it answers, beyond moving the
/// bytes: most calls answer at once; validating or removing a large tree takes longer.
const ACT_QUICKLY: Duration = Duration::ZERO;
const ACT_AT_LENGTH: Duration = Duration::from_secs(30 * 60);
/// A manifest of many files takes a while to check against what the target holds.
const ACT_ON_MANIFEST: Duration = Duration::from_secs(5 * 60);

/// [`TargetClient::with_stall`]'s default.
pub const DEFAULT_STALL: Duration = Duration::from_secs(60);

/// The rate assumed for a link not measured yet, to bound the wait for an answer after
/// a body was handed to the kernel (whose buffers may still hold all of it).
const UNMEASURED_RATE: u64 = 4 << 10;

/// Requests with bodies at least this large measure the link's rate.
const MEASURED_BODY: usize = 32 << 10;

/// Where a request body stands: bytes taken by the connection, and when the last were.
#[derive(Debug)]
struct BodyProgress {
    started: Instant,
    taken: AtomicU64,
    /// Milliseconds after `started` that bytes were last taken.
    last_ms: AtomicU64,
}

impl BodyProgress {
    fn new() -> Arc<Self> {
        Arc::new(Self { started: Instant::now(), taken: AtomicU64::new(0), last_ms: AtomicU64::new(0) })
    }

    fn took(&self, n: usize) {
        self.taken.fetch_add(n as u64, Ordering::Relaxed);
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// The body waits for its turn until `at`: that is not a lack of progress.
    fn held_until(&self, at: Instant) {
        let ms = at.saturating_duration_since(self.started).as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }

    fn last(&self) -> Instant {
        self.started + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A request body handed to the connection in slices, each when `pacer` lets it go,
/// recording its progress.
fn progress_body(body: Bytes, progress: Arc<BodyProgress>, pacer: Arc<Pacer>) -> reqwest::Body {
    const SLICE: usize = 16 << 10;
    let slices = futures::stream::unfold(0usize, move |at| {
        let (body, progress, pacer) = (body.clone(), progress.clone(), pacer.clone());
        async move {
            if at >= body.len() {
                return None;
            }
            let end = (at + SLICE).min(body.len());
            if let Some(when) = pacer.reserve(end - at) {
                progress.held_until(when);
                tokio::time::sleep_until(when.into()).await;
            }
            progress.took(end - at);
            Some((Ok::<Bytes, std::io::Error>(body.slice(at..end)), end))
        }
    });
    reqwest::Body::wrap_stream(slices)
}

/// How a commit is followed: the target is asked to answer `202 Accepted` with its
/// progress after `first_wait` rather than hold the request until a long commit ends,
/// then polled (`GET …/commit`, each poll held up to `poll_wait`). A commit whose
/// progress does not move for `stall` is given up (retryable).
#[derive(Debug, Clone, Copy)]
pub struct CommitPolls {
    pub first_wait: Duration,
    pub poll_wait: Duration,
    pub stall: Duration,
}

impl Default for CommitPolls {
    fn default() -> Self {
        Self {
            first_wait: Duration::from_secs(5),
            poll_wait: Duration::from_secs(20),
            stall: Duration::from_secs(30 * 60),
        }
    }
}

impl TargetClient {
    /// `base` is the target's URL (`http://host:port` or `https://…`).
    /// With `fingerprint`, the target's TLS certificate is pinned by its SHA-256 instead of
    /// being checked against certificate authorities.
    pub fn new(
        name: &str,
        base: &str,
        token: Option<String>,
        fingerprint: Option<&str>,
    ) -> Result<Self, TransferError> {
        let http =
            http_client(fingerprint).map_err(|message| TransferError::Client { target: name.into(), message })?;
        Ok(Self::with_http(&HttpClient(http), name, base, token))
    }

    /// A client over `http`, an [`HttpClient`] without a pin that several targets may
    /// share (its connections are pooled by address; each call carries its target's
    /// token): building one reads the system's certificate authorities, which thousands
    /// of targets need not each do.
    pub fn with_http(http: &HttpClient, name: &str, base: &str, token: Option<String>) -> Self {
        Self {
            http: http.0.clone(),
            base: base.trim_end_matches('/').to_owned(),
            name: name.to_owned(),
            token,
            commit_polls: CommitPolls::default(),
            stall: DEFAULT_STALL,
            rate: Arc::default(),
            pacer: Arc::default(),
        }
    }

    /// Holds what is sent to the target, over all calls of this client and its clones,
    /// to `bytes_per_s` (`None`: no limit). Takes effect at the next slice of a body.
    pub fn set_rate_limit(&self, bytes_per_s: Option<u64>) {
        self.pacer.rate.store(bytes_per_s.unwrap_or(0), Ordering::Relaxed);
    }

    /// Gives up a call after `stall` without progress (see [`TargetClient`]) instead
    /// of [`DEFAULT_STALL`]. Commit polls are held for less than that.
    pub fn with_stall(mut self, stall: Duration) -> Self {
        self.stall = stall;
        self.commit_polls.poll_wait = self.commit_polls.poll_wait.min(stall / 2);
        self.commit_polls.first_wait = self.commit_polls.first_wait.min(stall / 2);
        self
    }

    /// The link's measured rate in bytes per second, once a large request has crossed it.
    pub fn measured_rate(&self) -> Option<u64> {
        Some(self.rate.load(Ordering::Relaxed)).filter(|r| *r > 0)
    }

    /// Folds one request's rate into the measurement (a moving average that follows a
    /// link that got slower within a few requests).
    fn measure(&self, bytes: usize, took: Duration) {
        let now = (bytes as f64 / took.as_secs_f64().max(1e-3)) as u64;
        let _ = self.rate.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(if old == 0 { now.max(1) } else { (old / 2 + now / 2).max(1) })
        });
    }

    /// Follows commits with `polls` instead of the defaults.
    pub fn with_commit_polls(mut self, polls: CommitPolls) -> Self {
        self.commit_polls = polls;
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends one request and waits for its answer's head while it makes progress; the
    /// target may take `acting` (beyond moving the bytes) before it answers.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
        extra: &[(&str, String)],
        acting: Duration,
    ) -> Result<reqwest::Response, TransferError> {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        for (k, v) in extra {
            req = req.header(*k, v);
        }
        let progress = BodyProgress::new();
        let len = body.as_ref().map_or(0, |(b, _)| b.len());
        if let Some((b, ct)) = body {
            req = req.header(header::CONTENT_TYPE, ct).header(header::CONTENT_LENGTH, b.len()).body(progress_body(
                b,
                progress.clone(),
                self.pacer.clone(),
            ));
        }
        let answer = req.send();
        tokio::pin!(answer);
        let resp = loop {
            let deadline = self.give_up_at(&progress, len, acting);
            tokio::select! {
                r = &mut answer => break r.map_err(|e| self.net_error(e))?,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if self.give_up_at(&progress, len, acting) <= Instant::now() {
                        return Err(self.stalled(&progress, len, path));
                    }
                }
            }
        };
        if len >= MEASURED_BODY {
            self.measure(len, progress.started.elapsed());
        }
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let bytes = self.body_of(resp).await.unwrap_or_default();
        Err(TransferError::Rejected { target: self.name.clone(), reason: RejectReason::from_answer(status, &bytes) })
    }

    /// When a call whose body is `len` bytes and stands at `progress` stops being
    /// waited for.
    fn give_up_at(&self, progress: &BodyProgress, len: usize, acting: Duration) -> Instant {
        let last = progress.last();
        if progress.taken() < len as u64 {
            return last + self.stall;
        }
        // The whole body may still sit in the kernel's buffers: give it the time to
        // cross the link at its measured rate.
        let rate = self.measured_rate().unwrap_or(UNMEASURED_RATE);
        last + self.stall + acting + Duration::from_secs_f64(len as f64 / rate as f64)
    }

    fn stalled(&self, progress: &BodyProgress, len: usize, path: &str) -> TransferError {
        let call = path.split('?').next().unwrap_or(path);
        let message = if progress.taken() < len as u64 {
            format!(
                "no progress for {} s sending {call} ({} of {len} bytes sent); the link or the target is stuck",
                self.stall.as_secs(),
                progress.taken()
            )
        } else {
            format!("no answer to {call} within {} s after sending it", progress.last().elapsed().as_secs())
        };
        TransferError::Timeout { target: self.name.clone(), message }
    }

    /// An answer's body, as long as it keeps coming.
    async fn body_of(&self, resp: reqwest::Response) -> Result<Bytes, TransferError> {
        let mut resp = resp;
        let mut out = bytes::BytesMut::new();
        loop {
            match tokio::time::timeout(self.stall, resp.chunk()).await {
                Ok(Ok(Some(piece))) => out.extend_from_slice(&piece),
                Ok(Ok(None)) => return Ok(out.freeze()),
                Ok(Err(e)) => return Err(self.net_error(e)),
                Err(_) => {
                    return Err(TransferError::Timeout {
                        target: self.name.clone(),
                        message: format!("the answer stopped coming for {} s", self.stall.as_secs()),
                    });
                }
            }
        }
    }

    fn net_error(&self, e: reqwest::Error) -> TransferError {
        let message = error_chain(&e);
        let lower = message.to_ascii_lowercase();
        if lower.contains("certificate") || lower.contains("fingerprint") {
            // A TLS identity mismatch does not heal by retrying: it needs an administrator.
            return TransferError::Certificate { target: self.name.clone(), message };
        }
        if e.is_timeout() {
            TransferError::Timeout { target: self.name.clone(), message }
        } else {
            TransferError::Unreachable { target: self.name.clone(), message }
        }
    }

    async fn json<T: DeserializeOwned>(&self, resp: reqwest::Response) -> Result<T, TransferError> {
        let bytes = self.body_of(resp).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| TransferError::Protocol { target: self.name.clone(), message: e.to_string() })
    }

    pub async fn hello(&self) -> Result<Hello, TransferError> {
        let r = self.send(Method::GET, "/v1/hello", None, &[], ACT_QUICKLY).await?;
        self.json(r).await
    }

    pub async fn package_state(&self, pkg: &str) -> Result<PackageState, TransferError> {
        let r = self.send(Method::GET, &format!("/v1/packages/{pkg}"), None, &[], ACT_QUICKLY).await?;
        self.json(r).await
    }

    /// [`TargetClient::package_state`] that must be answered whole within `within`
    /// (connecting, the TLS handshake and the answer): the first call of a job, so a
    /// target that is down, black-holed or hung (accepts, then says nothing) costs the
    /// job runner seconds, not a stall timeout. A healthy target answers it at once.
    pub async fn probe_state(&self, pkg: &str, within: Duration) -> Result<PackageState, TransferError> {
        match tokio::time::timeout(within, self.package_state(pkg)).await {
            Ok(answer) => answer,
            Err(_) => Err(TransferError::Timeout {
                target: self.name.clone(),
                message: format!(
                    "no answer within {} s (connecting, TLS handshake or its first answer)",
                    within.as_secs_f64()
                ),
            }),
        }
    }

    /// Sends a version's manifest (already compressed); answers the chunks the target lacks.
    #[allow(clippy::too_many_arguments)]
    pub async fn offer(
        &self,
        pkg: &str,
        version: i64,
        compressed: Bytes,
        root: &str,
        force: bool,
        name: &str,
        signed: &Signed,
    ) -> Result<Vec<ChunkId>, TransferError> {
        self.offer_body(pkg, version, compressed, wire::CONTENT_TYPE_MANIFEST, root, force, name, signed).await
    }

    /// Sends a version as a manifest delta (already compressed) against content the target
    /// holds; [`RejectReason::BaseUnknown`] when it does not hold it any more.
    #[allow(clippy::too_many_arguments)]
    pub async fn offer_delta(
        &self,
        pkg: &str,
        version: i64,
        compressed: Bytes,
        root: &str,
        name: &str,
        signed: &Signed,
    ) -> Result<Vec<ChunkId>, TransferError> {
        self.offer_body(pkg, version, compressed, wire::CONTENT_TYPE_MANIFEST_DELTA, root, false, name, signed).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn offer_body(
        &self,
        pkg: &str,
        version: i64,
        compressed: Bytes,
        content_type: &'static str,
        root: &str,
        force: bool,
        name: &str,
        signed: &Signed,
    ) -> Result<Vec<ChunkId>, TransferError> {
        let path = format!(
            "/v1/packages/{pkg}/versions/{version}/manifest?force={force}&name={}&{}",
            percent_encode(name),
            signed.query()
        );
        let r = self
            .send(
                Method::PUT,
                &path,
                Some((compressed, content_type)),
                &[(wire::HEADER_CONTENT_ROOT, root.to_owned())],
                ACT_ON_MANIFEST,
            )
            .await?;
        let bytes = self.body_of(r).await?;
        wire::decode_ids(&bytes)
            .ok_or_else(|| TransferError::Protocol { target: self.name.clone(), message: "bad chunk id list".into() })
    }

    /// Asks a pull DP to fetch chunks from its peers (see [`wire::PullRequest`]); it
    /// answers within about `req.budget_secs`.
    pub async fn pull(
        &self,
        pkg: &str,
        version: i64,
        req: &wire::PullRequest,
    ) -> Result<wire::PullAnswer, TransferError> {
        let body = Bytes::from(serde_json::to_vec(req).expect("serializable"));
        let acting = Duration::from_secs(req.budget_secs + 30);
        let r = self
            .send(
                Method::POST,
                &format!("/v1/packages/{pkg}/versions/{version}/pull"),
                Some((body, "application/json")),
                &[],
                acting,
            )
            .await?;
        self.json(r).await
    }

    /// Asks a peer DP for chunks of `pkg` by id, with a site-issued ticket; answers a
    /// chunk batch (unverified: the caller checks every chunk).
    pub async fn peer_chunks(&self, pkg: &str, ticket: &str, ids: &[ChunkId]) -> Result<Bytes, TransferError> {
        let r = self
            .send(
                Method::POST,
                &format!("/v1/packages/{pkg}/peer-chunks"),
                Some((wire::encode_ids(ids), wire::CONTENT_TYPE_CHUNK_IDS)),
                &[(wire::HEADER_PEER_TICKET, ticket.to_owned())],
                ACT_QUICKLY,
            )
            .await?;
        self.body_of(r).await
    }

    /// Sends one encoded chunk batch.
    pub async fn send_batch(&self, pkg: &str, version: i64, body: Bytes) -> Result<BatchResponse, TransferError> {
        let r = self
            .send(
                Method::POST,
                &format!("/v1/packages/{pkg}/versions/{version}/chunks"),
                Some((body, wire::CONTENT_TYPE_CHUNKS)),
                &[],
                ACT_QUICKLY,
            )
            .await?;
        self.json(r).await
    }

    pub async fn commit(&self, pkg: &str, version: i64) -> Result<CommitResponse, TransferError> {
        self.commit_reporting(pkg, version, |_| {}).await
    }

    /// Asks the target to commit `version` and follows the commit to its end, however
    /// long it takes while it makes progress, passing each progress report to
    /// `on_progress`. A target that does not answer `202` (older ones) is simply waited
    /// for, as far as the read timeout allows.
    pub async fn commit_reporting(
        &self,
        pkg: &str,
        version: i64,
        mut on_progress: impl FnMut(&CommitProgress) + Send,
    ) -> Result<CommitResponse, TransferError> {
        let path = format!("/v1/packages/{pkg}/versions/{version}/commit");
        let polls = self.commit_polls;
        let ask = [("prefer", format!("{}, wait={}", wire::PREFER_RESPOND_ASYNC, polls.first_wait.as_secs()))];
        let poll = [("prefer", format!("wait={}", polls.poll_wait.as_secs()))];
        // A poll answered 404 means the target no longer knows the commit (it restarted):
        // ask again (a commit of an installed version answers at once).
        let mut asked = 0;
        'ask: loop {
            asked += 1;
            let mut resp = self.send(Method::POST, &path, None, &ask, polls.first_wait).await?;
            let mut seen: Option<(String, u64)> = None;
            let mut moved = Instant::now();
            loop {
                if resp.status() != StatusCode::ACCEPTED {
                    return self.json(resp).await;
                }
                let p: CommitProgress = self.json(resp).await?;
                on_progress(&p);
                let now = (p.phase.clone(), p.files_done);
                if seen.as_ref() != Some(&now) {
                    seen = Some(now);
                    moved = Instant::now();
                } else if moved.elapsed() >= polls.stall {
                    return Err(TransferError::Timeout {
                        target: self.name.clone(),
                        message: format!(
                            "the commit of {pkg} version {version} made no progress for {} s ({}, {}/{} files)",
                            polls.stall.as_secs(),
                            p.phase,
                            p.files_done,
                            p.files_total
                        ),
                    });
                }
                resp = match self.send(Method::GET, &path, None, &poll, polls.poll_wait).await {
                    Ok(r) => r,
                    Err(TransferError::Rejected { reason: RejectReason::NotFound(_), .. }) if asked < 3 => {
                        continue 'ask;
                    }
                    Err(e) => return Err(e),
                };
            }
        }
    }

    /// Asks the target to record `version` for the content it already has (`root`).
    pub async fn relabel(
        &self,
        pkg: &str,
        version: i64,
        root: &str,
        signed: &Signed,
    ) -> Result<CommitResponse, TransferError> {
        let path = format!("/v1/packages/{pkg}/versions/{version}/relabel?root={root}&{}", signed.query());
        let r = self.send(Method::POST, &path, None, &[], ACT_AT_LENGTH).await?;
        self.json(r).await
    }

    pub async fn remove(&self, pkg: &str) -> Result<(), TransferError> {
        self.send(Method::DELETE, &format!("/v1/packages/{pkg}"), None, &[], ACT_AT_LENGTH).await.map(|_| ())
    }

    /// Gives the target the ownership chain of a package handed to another site (it
    /// verifies and keeps it, so that it takes the new owner's versions).
    pub async fn set_owner(&self, pkg: &str, chain: &str) -> Result<wire::OwnerAnswer, TransferError> {
        let body = Some((Bytes::from(chain.to_owned()), "text/plain; charset=utf-8"));
        let r = self.send(Method::PUT, &format!("/v1/packages/{pkg}/owner"), body, &[], ACT_QUICKLY).await?;
        self.json(r).await
    }

    /// The target's own status of a package (a child site's view of its targets).
    pub async fn status(&self, pkg: &str) -> Result<serde_json::Value, TransferError> {
        let r = self.send(Method::GET, &format!("/v1/packages/{pkg}/status"), None, &[], ACT_QUICKLY).await?;
        self.json(r).await
    }

    pub async fn validate(&self, pkg: &str) -> Result<ValidateResponse, TransferError> {
        let r = self.send(Method::POST, &format!("/v1/packages/{pkg}/validate"), None, &[], ACT_AT_LENGTH).await?;
        self.json(r).await
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s
}

/// The owner's signature of a version, and the owner's public key, as sent with it.
#[derive(Debug, Clone, Default)]
pub struct Signed {
    pub source_site: String,
    pub signature: Option<String>,
    pub site_key: Option<String>,
}

impl Signed {
    fn query(&self) -> String {
        let mut q = format!("source_site={}", percent_encode(&self.source_site));
        if let Some(s) = &self.signature {
            q.push_str(&format!("&signature={}", percent_encode(s)));
        }
        if let Some(k) = &self.site_key {
            q.push_str(&format!("&site_key={}", percent_encode(k)));
        }
        q
    }
}

/// Percent-encodes everything but unreserved characters (RFC 3986), for a path
/// segment or a query value.
/// Checks a target's base URL as an administrator typed it and returns it normalized
/// (no trailing `/`): `http(s)://HOST:PORT`, with a host a site can connect to (not
/// `0.0.0.0` or `[::]`) and a port other than 0; `https` when a certificate is pinned.
pub fn check_target_url(url: &str, pinned: bool) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/').to_owned();
    let parsed = reqwest::Url::parse(&url).map_err(|e| format!("URL {url:?} is invalid: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(format!("URL {url:?} must be https://HOST:PORT (or http:// for a DP run with --insecure-http)"));
    }
    let unspecified = parsed
        .host_str()
        .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
        .and_then(|h| h.parse::<std::net::IpAddr>().ok())
        .is_some_and(|ip| ip.is_unspecified());
    if unspecified {
        return Err(format!("URL {url:?} names no host a site can connect to; use the target's own address or name"));
    }
    if parsed.port_or_known_default() == Some(0) {
        return Err(format!("URL {url:?} has port 0; use the port the target listens on"));
    }
    if pinned && parsed.scheme() != "https" {
        return Err("--fingerprint pins a TLS certificate: use an https:// URL".into());
    }
    Ok(url)
}

pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::body::Bytes as AxumBytes;
    use dpsync_hash::{Manifest, RelPath};

    use super::*;
    use crate::service::{self, OfferMeta, ReceiveError, Receiver, ServedFile, ServiceConfig};
    use crate::wire::{CommitResponse, PackageState, ValidateResponse};

    const TOKEN: &str = "the-token";
    const PKG: &str = "PS100001";

    fn id(n: u8) -> ChunkId {
        ChunkId::from_bytes([n; 32])
    }

    fn body(error: &str, missing: Vec<ChunkId>, code: Option<&str>) -> Vec<u8> {
        serde_json::to_vec(&WireError { error: error.into(), missing, code: code.map(Into::into) }).unwrap()
    }

    #[test]
    fn every_answer_maps_to_its_reason_and_retry_policy() {
        let cases: Vec<(u16, Vec<u8>, RejectReason, bool)> = vec![
            (401, body("wrong token", vec![], None), RejectReason::Unauthorized("wrong token".into()), false),
            (403, body("untrusted", vec![], None), RejectReason::Forbidden("untrusted".into()), false),
            (404, body("no such endpoint", vec![], None), RejectReason::NotFound("no such endpoint".into()), false),
            (413, body("over the limit", vec![], None), RejectReason::TooLarge("over the limit".into()), false),
            (507, body("disk full", vec![], None), RejectReason::InsufficientStorage("disk full".into()), true),
            (400, body("bad framing", vec![], None), RejectReason::BadRequest("bad framing".into()), false),
            (
                409,
                body("no base", vec![], Some(wire::ERROR_BASE_UNKNOWN)),
                RejectReason::BaseUnknown("no base".into()),
                true,
            ),
            (409, body("2 missing", vec![id(1), id(2)], None), RejectReason::MissingChunks(vec![id(1), id(2)]), true),
            (409, body("older", vec![], None), RejectReason::Conflict("older".into()), true),
            (429, body("slow down", vec![], None), RejectReason::Busy("slow down".into()), true),
            (408, b"".to_vec(), RejectReason::Busy(String::new()), true),
            (500, body("boom", vec![], None), RejectReason::Server { status: 500, message: "boom".into() }, true),
            // A proxy's own answer: no JSON body, its text is the message.
            (
                502,
                b"<html>Bad Gateway</html>".to_vec(),
                RejectReason::Server { status: 502, message: "<html>Bad Gateway</html>".into() },
                true,
            ),
            (418, b"teapot".to_vec(), RejectReason::Other { status: 418, message: "teapot".into() }, false),
        ];
        for (status, body, expected, retryable) in cases {
            let got = RejectReason::from_answer(StatusCode::from_u16(status).unwrap(), &body);
            assert_eq!(got, expected, "{status}");
            assert_eq!(got.is_retryable(), retryable, "{status}: {got}");
            let e = TransferError::Rejected { target: "dp1".into(), reason: got };
            assert_eq!(e.is_retryable(), retryable, "{e}");
            assert!(e.to_string().starts_with("dp1 "), "{e}");
        }
    }

    #[test]
    fn network_and_certificate_errors_are_classified() {
        let t = || "dp1".to_owned();
        assert!(TransferError::Unreachable { target: t(), message: "refused".into() }.is_retryable());
        assert!(TransferError::Timeout { target: t(), message: "slow".into() }.is_retryable());
        let cert = TransferError::Certificate { target: t(), message: "mismatch".into() };
        assert!(!cert.is_retryable());
        assert!(cert.to_string().contains("fingerprint"), "{cert}");
        assert!(!TransferError::Client { target: t(), message: "x".into() }.is_retryable());
        assert!(!TransferError::Protocol { target: t(), message: "x".into() }.is_retryable());
    }

    /// A receiver that answers `package_state` with the error it is told to.
    #[derive(Default)]
    struct Refuser {
        next: Mutex<Option<ReceiveError>>,
    }

    fn unused<T>() -> Result<T, ReceiveError> {
        Err(ReceiveError::Internal("not used by this test".into()))
    }

    impl Receiver for Refuser {
        async fn package_state(&self, pkg: &str) -> Result<PackageState, ReceiveError> {
            match self.next.lock().unwrap().take() {
                Some(e) => Err(e),
                None => Ok(PackageState {
                    package: pkg.into(),
                    installed_version: None,
                    installed_root: None,
                    previous_version: None,
                    staged_version: None,
                    broken: false,
                }),
            }
        }
        async fn offer(
            &self,
            _: &str,
            _: i64,
            _: Arc<Manifest>,
            _: bool,
            _: OfferMeta,
        ) -> Result<Vec<ChunkId>, ReceiveError> {
            unused()
        }
        async fn store_chunks(&self, _: &str, _: i64, _: Vec<(ChunkId, AxumBytes)>) -> Result<(), ReceiveError> {
            unused()
        }
        async fn commit(&self, _: &str, _: i64) -> Result<CommitResponse, ReceiveError> {
            unused()
        }
        async fn relabel(&self, _: &str, _: i64, _: &str, _: OfferMeta) -> Result<CommitResponse, ReceiveError> {
            unused()
        }
        async fn remove(&self, _: &str) -> Result<(), ReceiveError> {
            unused()
        }
        async fn validate(&self, _: &str) -> Result<ValidateResponse, ReceiveError> {
            unused()
        }
        async fn open_file(&self, _: &str, _: &RelPath) -> Result<ServedFile, ReceiveError> {
            unused()
        }
        async fn status(&self, _: &str) -> Result<serde_json::Value, ReceiveError> {
            unused()
        }
        fn metrics(&self) -> String {
            String::new()
        }
    }

    /// What the receiving service answers, the client reads back as the same reason.
    #[tokio::test]
    async fn the_service_refusals_reach_the_client_as_reasons() {
        let receiver = Arc::new(Refuser::default());
        let cfg = ServiceConfig {
            token: Some(TOKEN.into()),
            role: "dp",
            site_code: None,
            site_key: None,
            decode_limits: Default::default(),
        };
        let app = service::router(receiver.clone(), cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = TargetClient::new("dp1", &url, Some(TOKEN.into()), None).unwrap();
        assert!(client.package_state(PKG).await.is_ok());

        let cases = vec![
            (ReceiveError::NotFound("gone".into()), RejectReason::NotFound("gone".into())),
            (ReceiveError::BadRequest("bad".into()), RejectReason::BadRequest("bad".into())),
            (ReceiveError::Unauthorized("who".into()), RejectReason::Unauthorized("who".into())),
            (ReceiveError::Forbidden("untrusted".into()), RejectReason::Forbidden("untrusted".into())),
            (ReceiveError::PayloadTooLarge("big".into()), RejectReason::TooLarge("big".into())),
            (
                ReceiveError::Conflict { message: "lacks".into(), missing: vec![id(7)] },
                RejectReason::MissingChunks(vec![id(7)]),
            ),
            (
                ReceiveError::Conflict { message: "older".into(), missing: vec![] },
                RejectReason::Conflict("older".into()),
            ),
            (ReceiveError::InsufficientStorage("full".into()), RejectReason::InsufficientStorage("full".into())),
            (ReceiveError::BaseUnknown("no base".into()), RejectReason::BaseUnknown("no base".into())),
            (ReceiveError::Internal("boom".into()), RejectReason::Server { status: 500, message: "boom".into() }),
        ];
        for (sent, expected) in cases {
            *receiver.next.lock().unwrap() = Some(sent.clone());
            match client.package_state(PKG).await {
                Err(TransferError::Rejected { target, reason }) => {
                    assert_eq!(target, "dp1");
                    assert_eq!(reason, expected, "{sent:?}");
                }
                other => panic!("{sent:?}: expected a refusal, got {other:?}"),
            }
        }

        // The service's own refusals: a wrong token, a bad package id, an unknown endpoint.
        let wrong = TargetClient::new("dp1", &url, Some("not-the-token".into()), None).unwrap();
        let e = wrong.package_state(PKG).await.unwrap_err();
        assert!(matches!(e.reason(), Some(RejectReason::Unauthorized(m)) if m.contains("wrong token")), "{e:?}");
        assert!(!e.is_retryable());
        let e = client.package_state("../etc").await.unwrap_err();
        assert!(matches!(e.reason(), Some(RejectReason::BadRequest(_)) | Some(RejectReason::NotFound(_))), "{e:?}");
        let e = client.validate(PKG).await.unwrap_err();
        assert!(matches!(e.reason(), Some(RejectReason::Server { status: 500, .. })), "{e:?}");

        // Nobody listening any more: unreachable, and worth retrying.
        server.abort();
        let _ = server.await;
        let closed = TargetClient::new("dp1", &url, None, None).unwrap();
        let e = closed.hello().await.unwrap_err();
        assert!(matches!(e, TransferError::Unreachable { .. }), "{e:?}");
        assert!(e.is_retryable() && e.to_string().contains("dp1") && e.to_string().contains("unreachable"), "{e}");
    }
}
