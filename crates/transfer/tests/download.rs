//! Client downloads (`GET /v1/packages/P/files/…`) through the real router on a loopback
//! socket, with a receiver that serves one file whose content can be switched to another
//! version: ranges, `If-None-Match`, and `If-Range` (RFC 9110 §13.1.5) — a range is
//! served only while the client's validator still names the current content.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dpsync_hash::{ChunkId, FileHash, Manifest, RelPath};
use dpsync_transfer::service::{self, OfferMeta, ReceiveError, Receiver, ServedFile, ServiceConfig};
use dpsync_transfer::wire::{CommitResponse, PackageState, ValidateResponse};
use reqwest::StatusCode;

const PKG: &str = "PS100001";
const FILE: &str = "bin/app.bin";

/// One file's content and modification time.
#[derive(Debug, Clone)]
struct Version {
    bytes: Vec<u8>,
    modified: SystemTime,
}

/// Serves [`FILE`] of [`PKG`] from whichever [`Version`] is current; refuses everything else.
#[derive(Debug)]
struct OneFile {
    current: Mutex<Version>,
}

fn unsupported() -> ReceiveError {
    ReceiveError::BadRequest("not in this test".into())
}

impl Receiver for OneFile {
    async fn package_state(&self, _pkg: &str) -> Result<PackageState, ReceiveError> {
        Err(unsupported())
    }
    async fn offer(
        &self,
        _pkg: &str,
        _version: i64,
        _manifest: Arc<Manifest>,
        _force: bool,
        _meta: OfferMeta,
    ) -> Result<Vec<ChunkId>, ReceiveError> {
        Err(unsupported())
    }
    async fn store_chunks(
        &self,
        _pkg: &str,
        _version: i64,
        _chunks: Vec<(ChunkId, Bytes)>,
    ) -> Result<(), ReceiveError> {
        Err(unsupported())
    }
    async fn commit(&self, _pkg: &str, _version: i64) -> Result<CommitResponse, ReceiveError> {
        Err(unsupported())
    }
    async fn relabel(
        &self,
        _pkg: &str,
        _version: i64,
        _root: &str,
        _meta: OfferMeta,
    ) -> Result<CommitResponse, ReceiveError> {
        Err(unsupported())
    }
    async fn remove(&self, _pkg: &str) -> Result<(), ReceiveError> {
        Err(unsupported())
    }
    async fn validate(&self, _pkg: &str) -> Result<ValidateResponse, ReceiveError> {
        Err(unsupported())
    }
    async fn open_file(&self, pkg: &str, path: &RelPath) -> Result<ServedFile, ReceiveError> {
        if pkg != PKG || path.as_str() != FILE {
            return Err(ReceiveError::NotFound(format!("{pkg} has no file {path}")));
        }
        let v = self.current.lock().unwrap().clone();
        let mut file = tempfile::tempfile().map_err(|e| ReceiveError::Internal(e.to_string()))?;
        file.write_all(&v.bytes).map_err(|e| ReceiveError::Internal(e.to_string()))?;
        Ok(ServedFile {
            file,
            len: v.bytes.len() as u64,
            hash: FileHash::from(blake3::hash(&v.bytes)),
            modified: Some(v.modified),
        })
    }
    async fn status(&self, _pkg: &str) -> Result<serde_json::Value, ReceiveError> {
        Err(unsupported())
    }
    fn metrics(&self) -> String {
        String::new()
    }
}

/// The router on a loopback port, serving `first`.
struct Fixture {
    addr: SocketAddr,
    receiver: Arc<OneFile>,
    client: reqwest::Client,
}

impl Fixture {
    async fn start(first: Version) -> Self {
        let receiver = Arc::new(OneFile { current: Mutex::new(first) });
        let cfg = ServiceConfig {
            token: Some("secret".into()),
            role: "dp",
            site_code: None,
            site_key: None,
            decode_limits: Default::default(),
        };
        let app = service::router(receiver.clone(), cfg);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap();
        Self { addr, receiver, client }
    }

    /// Installs another version of the file (what a DP does at commit).
    fn switch_to(&self, v: Version) {
        *self.receiver.current.lock().unwrap() = v;
    }

    async fn get(&self, headers: &[(&str, &str)]) -> Answer {
        let mut req = self.client.get(format!("http://{}/v1/packages/{PKG}/files/{FILE}", self.addr));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status();
        let header = |name: &str| resp.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
        let (etag, content_range, last_modified) = (header("etag"), header("content-range"), header("last-modified"));
        let body = resp.bytes().await.unwrap().to_vec();
        Answer { status, etag, content_range, last_modified, body }
    }
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    etag: Option<String>,
    content_range: Option<String>,
    last_modified: Option<String>,
    body: Vec<u8>,
}

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn etag_of(bytes: &[u8]) -> String {
    format!("\"{}\"", blake3::hash(bytes).to_hex())
}

/// 2023-11-14 22:13:20 UTC and 22:13:21: long ago, whole seconds.
fn t(secs_after: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000 + secs_after)
}

fn v1() -> Version {
    Version { bytes: content(1000, 1), modified: t(0) }
}

fn v2() -> Version {
    Version { bytes: content(1200, 2), modified: t(60) }
}

#[tokio::test]
async fn plain_range_and_last_modified() {
    let f = Fixture::start(v1()).await;
    let v = v1();
    let full = f.get(&[]).await;
    assert_eq!(full.status, StatusCode::OK);
    assert_eq!(full.body, v.bytes);
    assert_eq!(full.etag.as_deref(), Some(etag_of(&v.bytes).as_str()));
    assert_eq!(full.last_modified.as_deref(), Some("Tue, 14 Nov 2023 22:13:20 GMT"));
    let r = f.get(&[("Range", "bytes=10-")]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, &v.bytes[10..]);
    assert_eq!(r.content_range.as_deref(), Some("bytes 10-999/1000"));
    assert_eq!(r.last_modified.as_deref(), Some("Tue, 14 Nov 2023 22:13:20 GMT"));
}

#[tokio::test]
async fn if_range_with_the_current_etag_serves_the_range() {
    let f = Fixture::start(v1()).await;
    let v = v1();
    let etag = etag_of(&v.bytes);
    let r = f.get(&[("Range", "bytes=10-"), ("If-Range", &etag)]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, &v.bytes[10..]);
    assert_eq!(r.content_range.as_deref(), Some("bytes 10-999/1000"));
    assert_eq!(r.etag.as_deref(), Some(etag.as_str()));
}

#[tokio::test]
async fn if_range_with_an_old_etag_serves_the_whole_new_file() {
    let f = Fixture::start(v1()).await;
    let old = etag_of(&v1().bytes);
    assert_eq!(f.get(&[]).await.etag.as_deref(), Some(old.as_str()));
    f.switch_to(v2());
    let new = v2();
    let r = f.get(&[("Range", "bytes=10-"), ("If-Range", &old)]).await;
    assert_eq!(r.status, StatusCode::OK, "a resumed download must not splice two versions");
    assert_eq!(r.body, new.bytes);
    assert_eq!(r.content_range, None);
    assert_eq!(r.etag.as_deref(), Some(etag_of(&new.bytes).as_str()));
    // The same with a range that the new version could not satisfy.
    let r = f.get(&[("Range", "bytes=5000-"), ("If-Range", &old)]).await;
    assert_eq!((r.status, r.body == new.bytes), (StatusCode::OK, true));
}

#[tokio::test]
async fn if_range_with_a_weak_etag_never_matches() {
    let f = Fixture::start(v1()).await;
    let v = v1();
    let weak = format!("W/{}", etag_of(&v.bytes));
    let r = f.get(&[("Range", "bytes=10-"), ("If-Range", &weak)]).await;
    assert_eq!(r.status, StatusCode::OK, "strong comparison: a weak tag never matches");
    assert_eq!(r.body, v.bytes);
}

#[tokio::test]
async fn if_range_with_the_last_modified_date_serves_the_range() {
    let f = Fixture::start(v1()).await;
    let v = v1();
    let lm = f.get(&[]).await.last_modified.expect("Last-Modified");
    let r = f.get(&[("Range", "bytes=10-19"), ("If-Range", &lm)]).await;
    assert_eq!(r.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(r.body, &v.bytes[10..20]);
    assert_eq!(r.content_range.as_deref(), Some("bytes 10-19/1000"));
    // The obsolete date formats name the same instant (RFC 9110 §5.6.7).
    for same in ["Tuesday, 14-Nov-23 22:13:20 GMT", "Tue Nov 14 22:13:20 2023"] {
        let r = f.get(&[("Range", "bytes=10-19"), ("If-Range", same)]).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{same}");
    }
}

#[tokio::test]
async fn if_range_with_another_date_serves_the_whole_file() {
    let f = Fixture::start(v1()).await;
    let lm = f.get(&[]).await.last_modified.expect("Last-Modified");
    f.switch_to(v2());
    let new = v2();
    for date in [lm.as_str(), "Tue, 14 Nov 2023 22:13:19 GMT", "Wed, 15 Nov 2023 22:13:20 GMT"] {
        let r = f.get(&[("Range", "bytes=10-"), ("If-Range", date)]).await;
        assert_eq!(r.status, StatusCode::OK, "{date}");
        assert_eq!(r.body, new.bytes, "{date}");
        assert_eq!(r.etag.as_deref(), Some(etag_of(&new.bytes).as_str()));
    }
}

#[tokio::test]
async fn a_modification_time_in_the_future_is_never_a_strong_validator() {
    // Last-Modified is at most the answer's Date (RFC 9110 §8.8.2.1), and a date less than
    // a second before Date is not a strong validator (§8.8.2.2): another version may
    // follow within the same second.
    let future = SystemTime::now() + Duration::from_secs(3600);
    let f = Fixture::start(Version { bytes: content(1000, 3), modified: future }).await;
    let lm = f.get(&[]).await.last_modified.expect("Last-Modified");
    let lm_time = httpdate::parse_http_date(&lm).unwrap();
    assert!(lm_time <= SystemTime::now(), "Last-Modified {lm} is not in the future");
    let r = f.get(&[("Range", "bytes=10-"), ("If-Range", &lm)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body.len(), 1000);
}

#[tokio::test]
async fn garbage_if_range_serves_the_whole_file() {
    let f = Fixture::start(v1()).await;
    let v = v1();
    let etag = etag_of(&v.bytes);
    let list = format!("{etag}, {etag}");
    let unquoted = etag.trim_matches('"').to_owned();
    for garbage in ["", "*", "yesterday", "\"", unquoted.as_str(), list.as_str(), "Tue, 14 Nov 2023 25:13:20 GMT"] {
        let r = f.get(&[("Range", "bytes=10-"), ("If-Range", garbage)]).await;
        assert_eq!(r.status, StatusCode::OK, "If-Range: {garbage:?}");
        assert_eq!(r.body, v.bytes, "If-Range: {garbage:?}");
    }
}

#[tokio::test]
async fn if_range_without_range_and_other_range_forms_are_unchanged() {
    let f = Fixture::start(v1()).await;
    let v = v1();
    let etag = etag_of(&v.bytes);
    // No Range: If-Range is ignored.
    let r = f.get(&[("If-Range", "\"nope\"")]).await;
    assert_eq!((r.status, r.body == v.bytes), (StatusCode::OK, true));
    // Several ranges: the whole file, as before.
    let r = f.get(&[("Range", "bytes=0-1,5-6"), ("If-Range", &etag)]).await;
    assert_eq!((r.status, r.body == v.bytes), (StatusCode::OK, true));
    // Unsatisfiable with a matching validator: 416, as without If-Range.
    let r = f.get(&[("Range", "bytes=1000-"), ("If-Range", &etag)]).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.content_range.as_deref(), Some("bytes */1000"));
    // If-None-Match is evaluated first.
    let r = f.get(&[("If-None-Match", &etag), ("Range", "bytes=10-"), ("If-Range", &etag)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
}
