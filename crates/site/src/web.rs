//! The server's web listener (`--http-listen`): the status page (`/`), the JSON of
//! `status --json` for every package (`/v1/status`) and `/metrics`, all read-only.
//!
//! **Architecture Invariant:** nothing here changes state; the page is rendered from the
//! same JSON its script polls (`view.rs` holds the rules both follow).
//!
//! With a token (`--http-token-file`), every route needs it, on any address: as
//! `Authorization: Bearer …` (scripts, Prometheus), or as the `dpsync_token` cookie that
//! opening `/?token=…` once sets (browsers; the answer redirects to the same path
//! without the token, so it leaves the address bar and the history). The cookie holds a
//! BLAKE3 of the token, not the token: the browser never stores the secret itself, and
//! any token fits in a cookie. Off loopback the
//! server refuses to start without one (`config.rs`) and serves TLS with the receiving
//! listener's certificate options.

mod page;
mod view;

use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use super::{Site, SiteError};

const COOKIE: &str = "dpsync_token";
const SCRIPT: &str = include_str!("web/status.js");
const STYLE: &str = include_str!("web/status.css");
/// Only this server's own script and style; no inline code, no framing.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// Whether `addr` (`HOST:PORT`) only accepts connections from this machine.
pub fn is_loopback(addr: &str) -> bool {
    if let Ok(a) = addr.parse::<std::net::SocketAddr>() {
        return a.ip().is_loopback();
    }
    addr.rsplit_once(':').is_some_and(|(host, _)| host.eq_ignore_ascii_case("localhost"))
}

struct Web {
    site: Arc<Site>,
    token: Option<String>,
    /// The cookie value that stands for the token.
    cookie: Option<String>,
    tls: bool,
}

impl std::fmt::Debug for Web {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Web")
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .finish()
    }
}

/// What the browser keeps for `token`.
fn cookie_value(token: &str) -> String {
    let mut h = blake3::Hasher::new_derive_key("dpsync 2026 web listener cookie");
    h.update(token.as_bytes());
    h.finalize().to_hex().to_string()
}

/// The web listener's routes.
fn router(site: Arc<Site>, token: Option<String>, tls: bool) -> Router {
    let cookie = token.as_deref().map(cookie_value);
    let web = Arc::new(Web { site, token, cookie, tls });
    Router::new()
        .route("/", get(index))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/static/status.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/static/status.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route_layer(middleware::from_fn_with_state(web.clone(), authenticate))
        .with_state(web)
        .layer(middleware::map_response(security_headers))
}

/// Serves the web listener on `tcp` until `stop`: TLS off loopback (unless
/// `--insecure-http`), plain HTTP on loopback.
pub(crate) async fn serve(site: &Arc<Site>, tcp: tokio::net::TcpListener, stop: CancellationToken) -> Result<()> {
    let addr = tcp.local_addr()?;
    let cfg = &site.cfg;
    let tls = if addr.ip().is_loopback() {
        None
    } else {
        dpsync_agent::daemon::listener_tls(&cfg.data_dir, &addr.to_string(), &cfg.tls)?
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let app = router(site.clone(), cfg.http_token.clone(), tls.is_some());
    dpsync_library::write_atomic(&cfg.data_dir.join("http.addr"), addr.to_string().as_bytes())
        .with_context(|| format!("cannot write {}", cfg.data_dir.join("http.addr").display()))?;
    tokio::spawn(async move {
        if let Err(e) = dpsync_transfer::listen::serve(tcp, app, tls, stop.cancelled_owned()).await {
            tracing::error!("web listener: {e}");
        }
    });
    tracing::info!(url = %format!("{scheme}://{addr}/"), token = cfg.http_token.is_some(), "serving the status page");
    Ok(())
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "no-cache")], body).into_response()
}

async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What a request presents.
#[derive(Debug, PartialEq, Eq)]
enum Presented<'a> {
    Bearer(&'a str),
    Cookie(&'a str),
    Nothing,
}

/// The bearer header, else the cookie.
fn presented(headers: &HeaderMap) -> Presented<'_> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let cookie = || {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|kv| kv.trim().strip_prefix(COOKIE).and_then(|rest| rest.strip_prefix('=')))
    };
    match (bearer, cookie()) {
        (Some(b), _) => Presented::Bearer(b),
        (None, Some(c)) => Presented::Cookie(c),
        (None, None) => Presented::Nothing,
    }
}

/// The `token` query parameter, if any, percent-decoded.
fn query_token(req: &Request) -> Option<String> {
    let raw = req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix("token="))?;
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

async fn authenticate(State(web): State<Arc<Web>>, req: Request, next: Next) -> Response {
    let (Some(token), Some(cookie)) = (&web.token, &web.cookie) else { return next.run(req).await };
    if let Some(given) = query_token(&req) {
        if !constant_time_eq(given.as_bytes(), token.as_bytes()) {
            return refuse("wrong token");
        }
        // Keep it in a cookie the page's script cannot read, and drop it from the address.
        let secure = if web.tls { "; Secure" } else { "" };
        let set = format!("{COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict{secure}");
        return (StatusCode::SEE_OTHER, [(header::SET_COOKIE, set), (header::LOCATION, req.uri().path().to_owned())])
            .into_response();
    }
    let ok = match presented(req.headers()) {
        Presented::Bearer(given) => constant_time_eq(given.as_bytes(), token.as_bytes()),
        Presented::Cookie(given) => constant_time_eq(given.as_bytes(), cookie.as_bytes()),
        Presented::Nothing => return refuse("this page needs the token of the server's --http-token-file"),
    };
    if ok { next.run(req).await } else { refuse("wrong token") }
}

fn refuse(why: &str) -> Response {
    tracing::debug!("web listener refused a request: {why}");
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        format!("{why}: open /?token=TOKEN once in a browser, or send Authorization: Bearer TOKEN\n"),
    )
        .into_response()
}

/// The JSON of every package's status, as the page and `/v1/status` see it.
async fn status_json(site: &Site) -> Result<Vec<serde_json::Value>, SiteError> {
    let all = site.status_all().await?;
    all.into_iter().map(|s| serde_json::to_value(s).map_err(|e| SiteError::Internal(e.into()))).collect()
}

async fn index(State(web): State<Arc<Web>>) -> Result<Response, SiteError> {
    let packages = status_json(&web.site).await?;
    let html = page::render(&web.site.cfg.site_code, &packages, dpsync_store::now_ms());
    Ok(([(header::CONTENT_TYPE, "text/html; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], html)
        .into_response())
}

async fn status(State(web): State<Arc<Web>>) -> Result<Response, SiteError> {
    let all = web.site.status_all().await?;
    Ok(([(header::CACHE_CONTROL, "no-store")], Json(all)).into_response())
}

async fn metrics(State(web): State<Arc<Web>>) -> Result<Response, SiteError> {
    let text = web.site.metrics_text().await?;
    Ok(([(header::CONTENT_TYPE, super::metrics::CONTENT_TYPE)], text).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_addresses_are_loopback() {
        for a in ["127.0.0.1:8080", "[::1]:80", "localhost:9000", "127.1.2.3:1"] {
            assert!(is_loopback(a), "{a}");
        }
        for a in ["0.0.0.0:8080", "[::]:80", "10.0.0.5:80", "dp1.example:443", "localhost.example:80"] {
            assert!(!is_loopback(a), "{a}");
        }
    }

    #[test]
    fn the_token_comes_from_the_bearer_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        assert_eq!(presented(&h), Presented::Nothing);
        h.insert(header::COOKIE, HeaderValue::from_static("theme=dark; dpsync_token=abc; x=y"));
        assert_eq!(presented(&h), Presented::Cookie("abc"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer xyz"));
        assert_eq!(presented(&h), Presented::Bearer("xyz"));
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("dpsync_token_old=1"));
        assert_eq!(presented(&h), Presented::Nothing);
    }

    #[test]
    fn the_query_token_is_percent_decoded_and_the_cookie_is_not_the_token() {
        let req = |uri: &str| Request::builder().uri(uri).body(axum::body::Body::empty()).unwrap();
        assert_eq!(query_token(&req("/?x=1&token=a%2Bb%3D%3D")).as_deref(), Some("a+b=="));
        assert_eq!(query_token(&req("/?token=plain")).as_deref(), Some("plain"));
        assert_eq!(query_token(&req("/?token=bad%zz")).as_deref(), Some("bad%zz"));
        assert_eq!(query_token(&req("/")), None);
        let c = cookie_value("s3cret");
        assert_eq!(c.len(), 64);
        assert!(!c.contains("s3cret") && c == cookie_value("s3cret") && c != cookie_value("s3cret2"));
    }
}
