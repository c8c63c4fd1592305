//! The pushing side of the protocol: one [`TargetClient`] per target, over reqwest.
//! Every call counts the request bytes it put on the wire, so the site can report
//! what each target cost.

use std::time::{Duration, Instant};

use bytes::Bytes;
use dpsync_hash::ChunkId;
use reqwest::{Method, StatusCode, header};
use serde::de::DeserializeOwned;

use crate::wire::{
    self, BatchResponse, CommitProgress, CommitResponse, Hello, PackageState, ValidateResponse, WireError,
};

/// Why a call to a target failed. [`TransferError::is_retryable`] drives the site's
/// retry policy.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransferError {
    #[error("{target} is unreachable: {message}")]
    Unreachable { target: String, message: String },
    #[error("{target} timed out: {message}")]
    Timeout { target: String, message: String },
    #[error("{target} refused the request ({status}): {message}")]
    Rejected { target: String, status: u16, message: String },
    #[error("{target} failed ({status}): {message}")]
    Server { target: String, status: u16, message: String },
    #[error("{target} still lacks {} chunks", missing.len())]
    MissingChunks { target: String, missing: Vec<ChunkId> },
    /// The target does not hold the base of a manifest delta: offer the full manifest.
    #[error("{target} does not hold the base of the manifest delta: {message}")]
    BaseUnknown { target: String, message: String },
    #[error("{target} answered something this site does not understand: {message}")]
    Protocol { target: String, message: String },
}

impl TransferError {
    /// Network failures, timeouts, 5xx, 507 (disk full) and 429 are worth retrying;
    /// other 4xx answers (bad token, bad request) need an administrator.
    pub fn is_retryable(&self) -> bool {
        match self {
            TransferError::Unreachable { .. } | TransferError::Timeout { .. } | TransferError::Server { .. } => true,
            TransferError::MissingChunks { .. } | TransferError::BaseUnknown { .. } => true,
            TransferError::Rejected { status, .. } => matches!(*status, 408 | 409 | 429),
            TransferError::Protocol { .. } => false,
        }
    }
}

/// A connection to one target's receiving service.
#[derive(Debug, Clone)]
pub struct TargetClient {
    http: reqwest::Client,
    base: String,
    name: String,
    token: Option<String>,
    commit_polls: CommitPolls,
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
        let mut builder = reqwest::Client::builder();
        if let Some(fp) = fingerprint {
            let cfg = crate::trust::pinned_client_config(fp)
                .map_err(|e| TransferError::Protocol { target: name.into(), message: e.to_string() })?;
            builder = builder.tls_backend_preconfigured(cfg);
        }
        let http = builder
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(300))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| TransferError::Protocol { target: name.into(), message: e.to_string() })?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            name: name.to_owned(),
            token,
            commit_polls: CommitPolls::default(),
        })
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

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(Bytes, &'static str)>,
        extra: &[(&str, String)],
    ) -> Result<reqwest::Response, TransferError> {
        let mut req = self.http.request(method, self.url(path));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        for (k, v) in extra {
            req = req.header(*k, v);
        }
        if let Some((b, ct)) = body {
            req = req.header(header::CONTENT_TYPE, ct).body(b);
        }
        let resp = req.send().await.map_err(|e| self.net_error(e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let bytes = resp.bytes().await.unwrap_or_default();
        let body: Option<WireError> = serde_json::from_slice(&bytes).ok();
        let message = body
            .as_ref()
            .map(|b| b.error.clone())
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(300)]).into_owned());
        let target = self.name.clone();
        Err(match status {
            StatusCode::CONFLICT
                if body.as_ref().is_some_and(|b| b.code.as_deref() == Some(wire::ERROR_BASE_UNKNOWN)) =>
            {
                TransferError::BaseUnknown { target, message }
            }
            StatusCode::CONFLICT if body.as_ref().is_some_and(|b| !b.missing.is_empty()) => {
                TransferError::MissingChunks { target, missing: body.map(|b| b.missing).unwrap_or_default() }
            }
            s if s.is_server_error() => TransferError::Server { target, status: s.as_u16(), message },
            s => TransferError::Rejected { target, status: s.as_u16(), message },
        })
    }

    fn net_error(&self, e: reqwest::Error) -> TransferError {
        let message = error_chain(&e);
        let lower = message.to_ascii_lowercase();
        if lower.contains("certificate") || lower.contains("fingerprint") {
            // A TLS identity mismatch does not heal by retrying: it needs an administrator.
            return TransferError::Rejected {
                target: self.name.clone(),
                status: 495,
                message: format!(
                    "TLS: {message}; check the target's certificate and the pinned --fingerprint \
                     (the target's DATA_DIR/tls/fingerprint)"
                ),
            };
        }
        if e.is_timeout() {
            TransferError::Timeout { target: self.name.clone(), message }
        } else {
            TransferError::Unreachable { target: self.name.clone(), message }
        }
    }

    async fn json<T: DeserializeOwned>(&self, resp: reqwest::Response) -> Result<T, TransferError> {
        let bytes = resp.bytes().await.map_err(|e| self.net_error(e))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| TransferError::Protocol { target: self.name.clone(), message: e.to_string() })
    }

    pub async fn hello(&self) -> Result<Hello, TransferError> {
        let r = self.send(Method::GET, "/v1/hello", None, &[]).await?;
        self.json(r).await
    }

    pub async fn package_state(&self, pkg: &str) -> Result<PackageState, TransferError> {
        let r = self.send(Method::GET, &format!("/v1/packages/{pkg}"), None, &[]).await?;
        self.json(r).await
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
    /// holds; [`TransferError::BaseUnknown`] when it does not hold it any more.
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
            .send(Method::PUT, &path, Some((compressed, content_type)), &[(wire::HEADER_CONTENT_ROOT, root.to_owned())])
            .await?;
        let bytes = r.bytes().await.map_err(|e| self.net_error(e))?;
        wire::decode_ids(&bytes)
            .ok_or_else(|| TransferError::Protocol { target: self.name.clone(), message: "bad chunk id list".into() })
    }

    /// Sends one encoded chunk batch.
    pub async fn send_batch(&self, pkg: &str, version: i64, body: Bytes) -> Result<BatchResponse, TransferError> {
        let r = self
            .send(
                Method::POST,
                &format!("/v1/packages/{pkg}/versions/{version}/chunks"),
                Some((body, wire::CONTENT_TYPE_CHUNKS)),
                &[],
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
            let mut resp = self.send(Method::POST, &path, None, &ask).await?;
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
                resp = match self.send(Method::GET, &path, None, &poll).await {
                    Ok(r) => r,
                    Err(TransferError::Rejected { status: 404, .. }) if asked < 3 => continue 'ask,
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
        let r = self.send(Method::POST, &path, None, &[]).await?;
        self.json(r).await
    }

    pub async fn remove(&self, pkg: &str) -> Result<(), TransferError> {
        self.send(Method::DELETE, &format!("/v1/packages/{pkg}"), None, &[]).await.map(|_| ())
    }

    /// The target's own status of a package (a child site's view of its targets).
    pub async fn status(&self, pkg: &str) -> Result<serde_json::Value, TransferError> {
        let r = self.send(Method::GET, &format!("/v1/packages/{pkg}/status"), None, &[]).await?;
        self.json(r).await
    }

    pub async fn validate(&self, pkg: &str) -> Result<ValidateResponse, TransferError> {
        let r = self.send(Method::POST, &format!("/v1/packages/{pkg}/validate"), None, &[]).await?;
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
