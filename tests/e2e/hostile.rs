//! Hostile input against running receivers: a DP agent (`dpsync agent`) and a child site
//! (`dpsync server --listen`). The test is the attacker: a Rust client that builds valid,
//! signed versions itself and breaks one thing at a time, over raw HTTP (std `TcpStream`,
//! so that malformed requests can be sent too) and, for TLS, the real `TargetClient`.
//!
//! Every refused case asserts: a clear 4xx with a JSON `{"error": …}` naming the problem;
//! nothing written outside the receiver's data directory (a snapshot of the rest of the
//! test directory, a canary folder beside the data directory, absolute target paths);
//! the live tree unchanged (`current` and its digest, the version trees); and the daemon
//! still serving (a good download).
//!
//! The tamper tests run real processes: parent PS1 → child CH1 → DP. A malicious relay
//! cannot install altered content (whatever key or site it claims), and a child whose
//! content library was tampered with cannot make the DP install corrupt bytes.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use dpsync_hash::{ChunkId, ChunkParams, Entry, EntryKind, FileHash, Manifest, RelPath, digest_stream};
use dpsync_transfer::trust::SiteKey;
use dpsync_transfer::wire::{self, Codec, WireChunk};
use serde_json::Value;

use crate::harness::*;

const TOKEN: &str = "dp-hostile-token";
const PKG: &str = "PS100001";
const SITE: &str = "PS1";
/// Context of the content root (`dpsync_hash::manifest`): needed to sign manifests the
/// library refuses to build.
const ROOT_CONTEXT: &str = "dpsync 2026-11 manifest content root v1";
const MTIME: i64 = 1_700_000_000_000_000_000;
const SECRET: &[u8] = b"canary secret outside the data directory";

// ---------------------------------------------------------------------------------------
// Raw HTTP

fn parse_response(mut raw: &[u8]) -> Option<HttpResponse> {
    // Skip interim answers (`100 Continue`).
    while raw.starts_with(b"HTTP/1.1 1") {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        raw = &raw[end + 4..];
    }
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[end + 4..];
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let body = if get("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            let nl = rest[i..].windows(2).position(|w| w == b"\r\n")?;
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[i..i + nl]).trim(), 16).ok()?;
            i += nl + 2;
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(i..i + size)?);
            i += size + 2;
        }
        out
    } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        rest.get(..len).unwrap_or(rest).to_vec()
    } else {
        rest.to_vec()
    };
    Some(HttpResponse { status, headers, body })
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Sends raw bytes (a whole request, well-formed or not) and reads the answer until the
/// server closes; `None` when it closed without a parseable answer.
fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Option<HttpResponse> {
    let mut s = connect(addr);
    let _ = s.write_all(bytes);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    parse_response(&raw)
}

/// One request with `Connection: close`; the body is written while the answer is read,
/// so a server that answers early (413) and closes is seen answering.
fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    let mut s = connect(addr);
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write request head");
    let mut reader = s.try_clone().expect("clone socket");
    let body = body.to_vec();
    let writer = std::thread::spawn(move || {
        for piece in body.chunks(1 << 20) {
            if s.write_all(piece).is_err() {
                break;
            }
        }
    });
    let mut raw = Vec::new();
    let _ = reader.read_to_end(&mut raw);
    let _ = writer.join();
    parse_response(&raw).unwrap_or_else(|| {
        panic!("{method} {path}: no HTTP answer: {:?}", String::from_utf8_lossy(&raw[..raw.len().min(300)]))
    })
}

/// Asserts a refusal: `status`, a JSON body `{"error": …}` whose message contains
/// `needle` (case-insensitive). Returns the message.
#[track_caller]
fn assert_refused(r: &HttpResponse, status: u16, needle: &str, case: &str) -> String {
    assert_eq!(r.status, status, "{case}: expected {status}, got {} {}", r.status, r.body_text());
    assert!(
        r.header("content-type").is_some_and(|c| c.starts_with("application/json")),
        "{case}: error body is not JSON ({:?}): {}",
        r.header("content-type"),
        r.body_text()
    );
    let v: Value =
        serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{case}: bad JSON ({e}): {}", r.body_text()));
    let msg = v["error"].as_str().unwrap_or_else(|| panic!("{case}: no \"error\" string in {v}")).to_owned();
    assert!(
        msg.to_ascii_lowercase().contains(&needle.to_ascii_lowercase()),
        "{case}: error {msg:?} does not mention {needle:?}"
    );
    msg
}

// ---------------------------------------------------------------------------------------
// Versions built and signed by the test

/// A version: its manifest and the bytes of every chunk and file.
#[derive(Debug, Clone)]
struct Version {
    manifest: Manifest,
    chunks: HashMap<ChunkId, Vec<u8>>,
    files: BTreeMap<String, Vec<u8>>,
}

impl Version {
    fn build(dirs: &[&str], files: &[(&str, Vec<u8>)], links: &[(&str, &str)]) -> Self {
        let mut entries = Vec::new();
        let mut chunks = HashMap::new();
        for d in dirs {
            entries.push(Entry { path: RelPath::new(*d).unwrap(), mode: 0o755, mtime_ns: MTIME, kind: EntryKind::Dir });
        }
        for (p, data) in files {
            let d = digest_stream(&data[..], &mut std::io::sink(), &ChunkParams::default()).unwrap();
            let mut off = 0usize;
            for c in &d.chunks {
                chunks.insert(c.id, data[off..off + c.len as usize].to_vec());
                off += c.len as usize;
            }
            entries.push(Entry {
                path: RelPath::new(*p).unwrap(),
                mode: 0o644,
                mtime_ns: MTIME,
                kind: EntryKind::File { size: d.size, hash: d.hash, chunks: d.chunks.into() },
            });
        }
        for (p, t) in links {
            entries.push(Entry {
                path: RelPath::new(*p).unwrap(),
                mode: 0o777,
                mtime_ns: MTIME,
                kind: EntryKind::Symlink { target: (*t).to_owned() },
            });
        }
        let files = files.iter().map(|(p, d)| ((*p).to_owned(), d.clone())).collect();
        Self { manifest: Manifest::new(entries).expect("a valid test version"), chunks, files }
    }

    fn root(&self) -> String {
        self.manifest.content_root().to_hex()
    }

    fn body(&self) -> Vec<u8> {
        wire::compress_manifest(&self.manifest.encode())
    }

    fn batch(&self, ids: &[ChunkId]) -> Vec<u8> {
        let chunks: Vec<WireChunk> = ids.iter().map(|id| WireChunk::encode(*id, &self.chunks[id])).collect();
        wire::encode_batch(&chunks).to_vec()
    }
}

/// The first good version: a folder, a multi-chunk file, a small file, an empty file and
/// a symlink.
fn v1() -> Version {
    Version::build(
        &["bin"],
        &[
            ("readme.txt", b"hello from v1\n".to_vec()),
            ("bin/tool.bin", random_bytes(400 << 10, 11)),
            ("empty.dat", Vec::new()),
        ],
        &[("link", "readme.txt")],
    )
}

/// A second version whose only new content is one file.
fn v2_with(name: &str, data: Vec<u8>) -> Version {
    let base = v1();
    let mut files: Vec<(&str, Vec<u8>)> = base.files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    files.push((name, data));
    Version::build(&["bin"], &files, &[("link", "readme.txt")])
}

/// Content root of raw manifest bytes, as the receiver computes it for a valid manifest.
fn raw_root(encoded: &[u8]) -> String {
    let mut h = blake3::Hasher::new_derive_key(ROOT_CONTEXT);
    h.update(encoded);
    h.finalize().to_hex().to_string()
}

/// Query string of an offer: the package's name and the owner's signature.
fn offer_query(key: &SiteKey, site: &str, pkg: &str, version: i64, root: &str) -> String {
    format!(
        "force=false&name=app&source_site={site}&signature={}&site_key={}",
        key.sign(pkg, site, version, root),
        key.public_hex()
    )
}

/// A receiver's push routes, as the test (the attacker, or a good sender) uses them.
#[derive(Debug, Clone)]
struct Target {
    addr: SocketAddr,
    token: String,
}

impl Target {
    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }

    fn offer_raw(&self, pkg: &str, version: &str, query: &str, root: Option<&str>, body: &[u8]) -> HttpResponse {
        let auth = self.auth();
        let mut headers = vec![("Authorization", auth.as_str()), ("Content-Type", wire::CONTENT_TYPE_MANIFEST)];
        if let Some(r) = root {
            headers.push((wire::HEADER_CONTENT_ROOT, r));
        }
        request(self.addr, "PUT", &format!("/v1/packages/{pkg}/versions/{version}/manifest?{query}"), &headers, body)
    }

    /// Offers `v` as `version`, signed by `key` for `site`.
    fn offer(&self, key: &SiteKey, site: &str, pkg: &str, version: i64, v: &Version) -> HttpResponse {
        let root = v.root();
        self.offer_raw(pkg, &version.to_string(), &offer_query(key, site, pkg, version, &root), Some(&root), &v.body())
    }

    /// Offers a (compressed) manifest delta for `version`, claiming content root `root`.
    fn offer_delta_raw(&self, key: &SiteKey, version: i64, root: Option<&str>, body: &[u8]) -> HttpResponse {
        let auth = self.auth();
        let mut headers = vec![("Authorization", auth.as_str()), ("Content-Type", wire::CONTENT_TYPE_MANIFEST_DELTA)];
        if let Some(r) = root {
            headers.push((wire::HEADER_CONTENT_ROOT, r));
        }
        let query = offer_query(key, SITE, PKG, version, root.unwrap_or(&"0".repeat(64)));
        request(self.addr, "PUT", &format!("/v1/packages/{PKG}/versions/{version}/manifest?{query}"), &headers, body)
    }

    fn chunks(&self, pkg: &str, version: i64, body: &[u8]) -> HttpResponse {
        let auth = self.auth();
        request(
            self.addr,
            "POST",
            &format!("/v1/packages/{pkg}/versions/{version}/chunks"),
            &[("Authorization", &auth), ("Content-Type", wire::CONTENT_TYPE_CHUNKS)],
            body,
        )
    }

    fn commit(&self, pkg: &str, version: i64) -> HttpResponse {
        let auth = self.auth();
        request(
            self.addr,
            "POST",
            &format!("/v1/packages/{pkg}/versions/{version}/commit"),
            &[("Authorization", &auth)],
            b"",
        )
    }

    fn state(&self, pkg: &str) -> Value {
        let auth = self.auth();
        let r = request(self.addr, "GET", &format!("/v1/packages/{pkg}"), &[("Authorization", &auth)], b"");
        assert_eq!(r.status, 200, "{}", r.body_text());
        serde_json::from_slice(&r.body).unwrap()
    }

    /// Offer, send what is missing, commit: asserts every step succeeds.
    fn push(&self, key: &SiteKey, site: &str, pkg: &str, version: i64, v: &Version) {
        let r = self.offer(key, site, pkg, version, v);
        assert_eq!(r.status, 200, "offer {pkg} v{version}: {}", r.body_text());
        let missing = wire::decode_ids(&r.body).expect("chunk id list");
        if !missing.is_empty() {
            let r = self.chunks(pkg, version, &v.batch(&missing));
            assert_eq!(r.status, 200, "chunks: {}", r.body_text());
            let resp: Value = serde_json::from_slice(&r.body).unwrap();
            assert_eq!(resp["rejected"], serde_json::json!([]), "{resp}");
        }
        let r = self.commit(pkg, version);
        assert_eq!(r.status, 200, "commit {pkg} v{version}: {}", r.body_text());
    }
}

// ---------------------------------------------------------------------------------------
// The fixture: a DP agent holding v1, and what must not change

struct Fixture {
    agent: Agent,
    dp: Target,
    key: SiteKey,
    v1: Version,
    // Last: the daemon stops before its directory is removed.
    dir: TestDir,
}

impl Fixture {
    fn new() -> Self {
        let dir = TestDir::new();
        fs::create_dir_all(dir.join("outside")).unwrap();
        fs::write(dir.join("outside/secret.txt"), SECRET).unwrap();
        let agent = Agent::start(dir.join("dp"), Some(TOKEN));
        let dp = Target { addr: agent.addr(), token: TOKEN.into() };
        let key = SiteKey::load_or_create(&dir.join("ps1.key")).unwrap();
        let v1 = v1();
        dp.push(&key, SITE, PKG, 1, &v1);
        let f = Self { agent, dp, key, v1, dir };
        f.assert_serves_v1();
        f
    }

    fn current(&self) -> PathBuf {
        self.agent.current(PKG)
    }

    /// A good download still works, and the live tree is v1.
    #[track_caller]
    fn assert_serves_v1(&self) {
        for (p, data) in &self.v1.files {
            let r = self.agent.download(PKG, p);
            assert_eq!(r.status, 200, "download {p}: {}", r.body_text());
            assert!(r.body == *data, "download {p}: wrong bytes");
        }
        let r = self.agent.download(PKG, "link");
        assert_eq!(r.body, self.v1.files["readme.txt"]);
        let hello = self.agent.get("/v1/hello", &[]);
        assert_eq!(hello.status, 200);
    }

    fn guard(&self) -> Guard {
        Guard {
            outside: snapshot_outside(self.dir.path(), &self.agent.data_dir),
            current_link: fs::read_link(self.current()).ok(),
            current: tree_digest(&self.current()),
            versions: list(&self.agent.package_dir(PKG).join("versions")),
        }
    }

    /// Everything a refused request must leave alone.
    #[track_caller]
    fn assert_untouched(&mut self, g: &Guard, case: &str) {
        assert!(self.agent.daemon_mut().is_running(), "{case}: the agent died{}", log_tails(&[self.agent.daemon()]));
        let now = snapshot_outside(self.dir.path(), &self.agent.data_dir);
        assert_eq!(now, g.outside, "{case}: files changed outside the data directory");
        assert_eq!(fs::read_link(self.current()).ok(), g.current_link, "{case}: `current` was switched");
        let d = tree_digest(&self.current()).diff(&g.current);
        assert!(d.is_empty(), "{case}: the live tree changed:\n{d}");
        assert_eq!(list(&self.agent.package_dir(PKG).join("versions")), g.versions, "{case}: version trees changed");
        for p in hostile_absolute_paths() {
            assert!(fs::symlink_metadata(&p).is_err(), "{case}: {} was created", p.display());
        }
        self.assert_serves_v1();
        let st = self.dp.state(PKG);
        assert_eq!(st["installed_version"], 1, "{case}: {st}");
        assert_eq!(st["installed_root"], self.v1.root().as_str(), "{case}: {st}");
    }

    /// The bytes of every file under the agent's data directory, for "never stored".
    fn data_dir_contains(&self, needle: &[u8]) -> Option<PathBuf> {
        for e in walkdir::WalkDir::new(&self.agent.data_dir).follow_links(false).into_iter().flatten() {
            if e.file_type().is_file()
                && let Ok(b) = fs::read(e.path())
                && b.windows(needle.len()).any(|w| w == needle)
            {
                return Some(e.path().to_owned());
            }
        }
        None
    }
}

#[derive(Debug)]
struct Guard {
    outside: BTreeMap<String, (u64, i64, u32)>,
    current_link: Option<PathBuf>,
    current: TreeDigest,
    versions: Vec<String>,
}

fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Every path under the test directory except the data directory and the daemons' logs
/// (which grow), with size, mtime and mode.
fn snapshot_outside(root: &Path, data_dir: &Path) -> BTreeMap<String, (u64, i64, u32)> {
    let mut out = BTreeMap::new();
    let walk = walkdir::WalkDir::new(root).follow_links(false).into_iter().filter_entry(|e| e.path() != data_dir);
    for e in walk.flatten() {
        let rel = e.path().strip_prefix(root).unwrap().to_string_lossy().into_owned();
        if rel.ends_with(".log") {
            continue;
        }
        let md = e.path().symlink_metadata().unwrap();
        let size = if md.is_dir() { 0 } else { md.len() };
        out.insert(rel, (size, if md.is_dir() { 0 } else { md.mtime() }, md.mode()));
    }
    out
}

/// Absolute paths the hostile manifests name.
fn hostile_absolute_paths() -> Vec<PathBuf> {
    vec![
        PathBuf::from(format!("/tmp/dpsync-hostile-{}", std::process::id())),
        PathBuf::from(format!("/tmp/dpsync-hostile-{}-link", std::process::id())),
    ]
}

// ---------------------------------------------------------------------------------------
// Raw manifests (any path, any kind), signed over their would-be content root

#[derive(Debug, Clone)]
enum RawEntry {
    Dir(Vec<u8>),
    File(Vec<u8>, Vec<u8>),
    Link(Vec<u8>, Vec<u8>),
}

fn raw_manifest(entries: &[RawEntry]) -> Vec<u8> {
    let mut out = b"DPSM".to_vec();
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for e in entries {
        let (path, kind, mode) = match e {
            RawEntry::Dir(p) => (p, 0u8, 0o755u32),
            RawEntry::File(p, _) => (p, 1, 0o644),
            RawEntry::Link(p, _) => (p, 2, 0o777),
        };
        out.extend_from_slice(&(path.len() as u16).to_le_bytes());
        out.extend_from_slice(path);
        out.push(kind);
        out.extend_from_slice(&mode.to_le_bytes());
        out.extend_from_slice(&MTIME.to_le_bytes());
        match e {
            RawEntry::Dir(_) => {}
            RawEntry::File(_, data) => {
                out.extend_from_slice(&(data.len() as u64).to_le_bytes());
                out.extend_from_slice(blake3::hash(data).as_bytes());
                if data.is_empty() {
                    out.extend_from_slice(&0u32.to_le_bytes());
                } else {
                    out.extend_from_slice(&1u32.to_le_bytes());
                    out.extend_from_slice(blake3::hash(data).as_bytes());
                    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
                }
            }
            RawEntry::Link(_, target) => {
                out.extend_from_slice(&(target.len() as u16).to_le_bytes());
                out.extend_from_slice(target);
            }
        }
    }
    out
}

fn file(p: &str) -> RawEntry {
    RawEntry::File(p.as_bytes().to_vec(), b"pwned\n".to_vec())
}

fn link(p: &str, t: &str) -> RawEntry {
    RawEntry::Link(p.as_bytes().to_vec(), t.as_bytes().to_vec())
}

fn dir(p: &str) -> RawEntry {
    RawEntry::Dir(p.as_bytes().to_vec())
}

impl Fixture {
    /// Offers raw manifest bytes as version 2, correctly signed and with the matching
    /// content-root header: only the manifest itself is wrong.
    fn offer_raw_manifest(&self, encoded: &[u8]) -> HttpResponse {
        let root = raw_root(encoded);
        let q = offer_query(&self.key, SITE, PKG, 2, &root);
        self.dp.offer_raw(PKG, "2", &q, Some(&root), &wire::compress_manifest(encoded))
    }
}

// ---------------------------------------------------------------------------------------
// Authentication

#[test]
fn push_routes_refuse_missing_and_wrong_tokens() {
    let mut f = Fixture::new();
    let g = f.guard();
    let v2 = v2_with("new.txt", b"v2 content\n".to_vec());
    let root = v2.root();
    let q = offer_query(&f.key, SITE, PKG, 2, &root);
    let manifest_path = format!("/v1/packages/{PKG}/versions/2/manifest?{q}");
    let v2_body = v2.body();
    let all_ids: Vec<ChunkId> = v2.chunks.keys().copied().collect();
    let batch = v2.batch(&all_ids);
    let relabel = format!("/v1/packages/{PKG}/versions/2/relabel?root={}&source_site={SITE}", f.v1.root());
    let routes: Vec<(&str, String, Vec<u8>)> = vec![
        ("GET", format!("/v1/packages/{PKG}"), vec![]),
        ("DELETE", format!("/v1/packages/{PKG}"), vec![]),
        ("PUT", manifest_path, v2_body),
        ("POST", format!("/v1/packages/{PKG}/versions/2/chunks"), batch),
        ("POST", format!("/v1/packages/{PKG}/versions/1/commit"), vec![]),
        ("POST", relabel, vec![]),
        ("POST", format!("/v1/packages/{PKG}/validate"), vec![]),
        ("GET", format!("/v1/packages/{PKG}/status"), vec![]),
        // A site that could make a DP pull could point it at any address.
        (
            "POST",
            format!("/v1/packages/{PKG}/versions/2/pull"),
            br#"{"ticket": "", "sources": [], "chunks": [], "budget_secs": 1}"#.to_vec(),
        ),
    ];
    let wrong = [
        (None, "missing bearer token"),
        (Some("Bearer wrong-token".to_owned()), "wrong token"),
        (Some(format!("Bearer {}", &TOKEN[..TOKEN.len() - 1])), "wrong token"),
        (Some(format!("Bearer {TOKEN}x")), "wrong token"),
        (Some(format!("Bearer {}", TOKEN.to_uppercase())), "wrong token"),
        (Some(format!("bearer {TOKEN}")), "missing bearer token"),
        (Some(format!("Basic {TOKEN}")), "missing bearer token"),
        (Some(TOKEN.to_owned()), "missing bearer token"),
        // Header values are trimmed: "Bearer " is "Bearer", no token at all.
        (Some("Bearer ".to_owned()), "missing bearer token"),
        (Some("Bearer  ".to_owned() + TOKEN), "wrong token"),
    ];
    for (method, path, body) in &routes {
        for (auth, needle) in &wrong {
            let case = format!("{method} {path} with {auth:?}");
            let mut headers = vec![];
            if let Some(a) = auth {
                headers.push(("Authorization", a.as_str()));
            }
            let r = request(f.dp.addr, method, path, &headers, body);
            assert_refused(&r, 401, needle, &case);
        }
    }
    // A repeated header: the first one counts; a second, right token does not help.
    let wrong_first = format!("Authorization: Bearer nope\r\nAuthorization: Bearer {TOKEN}\r\n");
    let r = raw_exchange(
        f.dp.addr,
        format!("DELETE /v1/packages/{PKG} HTTP/1.1\r\nHost: x\r\n{wrong_first}Connection: close\r\n\r\n").as_bytes(),
    )
    .expect("an answer");
    assert_refused(&r, 401, "wrong token", "two Authorization headers");
    f.assert_untouched(&g, "unauthenticated pushes");
    assert!(f.agent.log().contains("refused a push call"), "refusals are logged");
    assert!(!f.agent.log().contains(TOKEN), "the token must never be logged");
}

// ---------------------------------------------------------------------------------------
// TLS

/// Starts an agent serving TLS (the default) and returns it with its address, once it
/// has written its fingerprint.
fn start_tls_agent(data_dir: &Path) -> (Daemon, SocketAddr, String) {
    fs::create_dir_all(data_dir).unwrap();
    let mut cmd = dpsync_command();
    cmd.arg("agent").arg("--data-dir").arg(data_dir).args(["--listen", "127.0.0.1:0", "--token", TOKEN]);
    let log = PathBuf::from(format!("{}.agent.log", data_dir.display()));
    let d = Daemon::start("TLS agent", cmd, &log);
    let (addr, fp) = wait_until("the TLS agent to listen", START_TIMEOUT, &[&d], || {
        let addr: SocketAddr = fs::read_to_string(data_dir.join("listen.addr")).ok()?.trim().parse().ok()?;
        let fp = fs::read_to_string(data_dir.join("tls/fingerprint")).ok()?.trim().to_owned();
        (fp.len() == 64 && TcpStream::connect(addr).is_ok()).then_some((addr, fp))
    });
    (d, addr, fp)
}

#[test]
fn tls_with_the_wrong_pinned_fingerprint_pushes_nothing() {
    use dpsync_transfer::client::{Signed, TargetClient, TransferError};
    dpsync_transfer::trust::install_crypto_provider();
    let dir = TestDir::new();
    let data = dir.join("dp");
    let (mut daemon, addr, fp) = start_tls_agent(&data);
    let url = format!("https://{addr}");
    let key = SiteKey::load_or_create(&dir.join("ps1.key")).unwrap();
    let v1 = v1();
    let v2 = v2_with("new.txt", b"v2\n".to_vec());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let signed = |v: &Version, version: i64| Signed {
        source_site: SITE.into(),
        signature: Some(key.sign(PKG, SITE, version, &v.root())),
        site_key: Some(key.public_hex()),
    };
    rt.block_on(async {
        // The right pin: a full push works over TLS.
        let good = TargetClient::new("dp", &url, Some(TOKEN.into()), Some(&fp)).unwrap();
        assert_eq!(good.hello().await.unwrap().role, "dp");
        let missing = good.offer(PKG, 1, v1.body().into(), &v1.root(), false, "app", &signed(&v1, 1)).await.unwrap();
        good.send_batch(PKG, 1, v1.batch(&missing).into()).await.unwrap();
        good.commit(PKG, 1).await.unwrap();
    });
    let before = tree_digest(&data.join("packages").join(PKG).join("current"));
    assert!(!before.0.is_empty());
    let staged_before = list(&data.join("staging"));

    // Wrong pins: another certificate's fingerprint, the right one with a digit changed,
    // and the colon form of a wrong one.
    let mut flipped = fp.clone().into_bytes();
    flipped[10] = if flipped[10] == b'0' { b'1' } else { b'0' };
    let flipped = String::from_utf8(flipped).unwrap();
    let other = "ab".repeat(32);
    let colons = other.as_bytes().chunks(2).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join(":");
    for wrong in [flipped.as_str(), other.as_str(), colons.as_str()] {
        rt.block_on(async {
            let c = TargetClient::new("dp", &url, Some(TOKEN.into()), Some(wrong)).unwrap();
            let errs = vec![
                c.hello().await.map(|_| ()).unwrap_err(),
                c.package_state(PKG).await.map(|_| ()).unwrap_err(),
                c.offer(PKG, 2, v2.body().into(), &v2.root(), false, "app", &signed(&v2, 2))
                    .await
                    .map(|_| ())
                    .unwrap_err(),
                c.commit(PKG, 2).await.map(|_| ()).unwrap_err(),
                c.remove(PKG).await.unwrap_err(),
            ];
            for e in errs {
                match &e {
                    TransferError::Certificate { .. } => {
                        assert!(e.to_string().contains("fingerprint"), "{e}");
                        assert!(!e.is_retryable(), "a certificate mismatch needs an administrator: {e}");
                    }
                    other => panic!("pin {wrong}: expected a TLS refusal, got {other:?}"),
                }
            }
        });
    }
    // Plain HTTP to the TLS port gets no service either.
    let plain = raw_exchange(addr, format!("DELETE /v1/packages/{PKG} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nConnection: close\r\n\r\n").as_bytes());
    assert!(plain.as_ref().is_none_or(|r| r.status >= 400), "{plain:?}");

    // Nothing was pushed: same live tree, nothing new staged, v1 still installed.
    assert!(daemon.is_running(), "{}", log_tails(&[&daemon]));
    assert!(tree_digest(&data.join("packages").join(PKG).join("current")).diff(&before).is_empty());
    assert_eq!(list(&data.join("staging")), staged_before);
    rt.block_on(async {
        let good = TargetClient::new("dp", &url, Some(TOKEN.into()), Some(&fp)).unwrap();
        let st = good.package_state(PKG).await.unwrap();
        assert_eq!(st.installed_version, Some(1));
        assert_eq!(st.staged_version, None, "{st:?}");
    });
    daemon.stop();
}

// ---------------------------------------------------------------------------------------
// Manifests

#[test]
fn hostile_manifest_paths_are_refused() {
    let mut f = Fixture::new();
    let g = f.guard();
    let abs = hostile_absolute_paths();
    let abs_file = abs[0].to_string_lossy().into_owned();
    let abs_link = abs[1].to_string_lossy().into_owned();
    let long_path = format!("{}b", "a/".repeat(2049));
    let long_dirs: Vec<RawEntry> = {
        let mut v = Vec::new();
        let mut p = String::from("a");
        while p.len() < 4096 {
            v.push(RawEntry::Dir(p.clone().into_bytes()));
            p.push_str("/a");
        }
        v.push(RawEntry::File(format!("{p}/b").into_bytes(), b"x".to_vec()));
        v
    };
    let cases: Vec<(&str, Vec<RawEntry>, &str)> = vec![
        ("dot-dot", vec![file("../../outside/pwned")], "'..' component"),
        ("dot-dot inside", vec![dir("a"), file("a/../../../outside/pwned")], "'..' component"),
        ("dot-dot alone", vec![file("..")], "'..' component"),
        ("absolute", vec![file(&abs_file)], "absolute"),
        ("NUL", vec![file("a\0b")], "control character"),
        ("newline", vec![file("a\nb")], "control character"),
        ("backslash", vec![file("..\\..\\outside\\pwned")], "backslash"),
        ("empty component", vec![file("a//b")], "empty or '.' component"),
        ("dot component", vec![dir("a"), file("a/./b")], "empty or '.' component"),
        ("empty path", vec![file("")], "empty path"),
        ("overlong path", vec![file(&long_path)], "limit is 4096"),
        ("overlong nested", long_dirs, "limit is 4096"),
        ("overlong component", vec![file(&"c".repeat(256))], "longer than 255"),
        ("not UTF-8", vec![RawEntry::File(b"bad-\xff\xfe".to_vec(), b"x".to_vec())], "not valid utf-8"),
        ("symlink out", vec![link("evil", "../../../../outside/secret.txt")], "outside the package"),
        ("symlink absolute", vec![link("evil", &abs_link)], "outside the package"),
        ("symlink to /etc", vec![link("evil", "/etc/passwd")], "outside the package"),
        ("symlink backslash", vec![link("evil", "..\\..\\etc")], "outside the package"),
        ("symlink NUL", vec![link("evil", "a\0")], "outside the package"),
        ("symlink empty", vec![link("evil", "")], "outside the package"),
        ("symlink climbing from a dir", vec![dir("d"), link("d/evil", "../..")], "outside the package"),
        // Each link alone is lexically inside; through `s` (the root) the kernel climbs out.
        ("symlink chain", vec![link("s", "."), link("t", "s/../outside/secret.txt")], "outside the package"),
        (
            "deep symlink chain",
            vec![dir("a"), dir("a/b"), link("a/b/s", "../.."), link("a/b/t", "s/../x")],
            "outside the package",
        ),
        ("entry under a symlink", vec![link("s", "."), file("s/pwned")], "no directory entry for its parent"),
        ("missing parent", vec![file("nodir/pwned")], "no directory entry for its parent"),
        ("unsorted", vec![file("b"), file("a")], "out of order"),
        ("duplicate", vec![file("a"), file("a")], "out of order"),
        ("dir then file same path", vec![dir("a"), file("a")], "out of order"),
    ];
    for (case, entries, needle) in cases {
        let r = f.offer_raw_manifest(&raw_manifest(&entries));
        let msg = assert_refused(&r, 400, needle, case);
        assert!(msg.starts_with("manifest refused"), "{case}: {msg}");
        assert!(!msg.contains('\n') && msg.len() < 8192, "{case}: error message is unbounded: {} bytes", msg.len());
    }
    // 10,000 entries with the same path.
    let same: Vec<RawEntry> = (0..10_000).map(|_| file("same.txt")).collect();
    let started = Instant::now();
    let r = f.offer_raw_manifest(&raw_manifest(&same));
    assert_refused(&r, 400, "out of order or duplicated", "10,000 identical paths");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());

    // The hostile manifests were never staged.
    let st = f.dp.state(PKG);
    assert_eq!(st["staged_version"], Value::Null, "{st}");
    assert!(!f.agent.staging(PKG).exists() || count_entries(&f.agent.staging(PKG)) == 0);
    f.assert_untouched(&g, "hostile manifest paths");
}

#[test]
fn malformed_manifests_and_queries_are_refused() {
    let mut f = Fixture::new();
    let g = f.guard();
    let v2 = v2_with("new.txt", b"v2 content\n".to_vec());
    let root = v2.root();
    let q = offer_query(&f.key, SITE, PKG, 2, &root);
    let body = v2.body();
    let encoded = v2.manifest.encode();
    let dp = f.dp.clone();

    // The body.
    assert_refused(&dp.offer_raw(PKG, "2", &q, Some(&root), b"not zstd at all"), 400, "not valid zstd", "not zstd");
    assert_refused(&dp.offer_raw(PKG, "2", &q, Some(&root), b""), 400, "zstd", "empty body");
    let junk = wire::compress_manifest(b"{\"entries\": \"json, not a manifest\"}");
    assert_refused(&dp.offer_raw(PKG, "2", &q, Some(&root), &junk), 400, "bad magic", "zstd of junk");
    assert_refused(&dp.offer_raw(PKG, "2", &q, Some(&root), &body[..body.len() / 2]), 400, "zstd", "truncated zstd");
    let mut trailing = encoded.clone();
    trailing.extend_from_slice(b"extra");
    assert_refused(
        &dp.offer_raw(PKG, "2", &q, None, &wire::compress_manifest(&trailing)),
        400,
        "unexpected bytes",
        "trailing bytes",
    );
    let truncated = wire::compress_manifest(&encoded[..encoded.len() - 7]);
    assert_refused(&dp.offer_raw(PKG, "2", &q, None, &truncated), 400, "truncated", "truncated manifest");
    let mut bad_format = encoded.clone();
    bad_format[4] = 9;
    assert_refused(
        &dp.offer_raw(PKG, "2", &q, None, &wire::compress_manifest(&bad_format)),
        400,
        "format 9",
        "unknown format",
    );
    let mut huge_count = encoded.clone();
    huge_count[6..14].copy_from_slice(&u64::MAX.to_le_bytes());
    assert_refused(
        &dp.offer_raw(PKG, "2", &q, None, &wire::compress_manifest(&huge_count)),
        400,
        "the limit is",
        "huge entry count",
    );
    // A file whose chunk lengths do not add up to its size.
    let mut sizes = raw_manifest(&[RawEntry::File(b"f".to_vec(), b"abc".to_vec())]);
    let size_at = 4 + 2 + 8 + 2 + 1 + 1 + 4 + 8;
    sizes[size_at..size_at + 8].copy_from_slice(&4u64.to_le_bytes());
    assert_refused(&f.offer_raw_manifest(&sizes), 400, "chunks add up to 3 bytes but the size is 4", "size mismatch");
    // The content root the sender claims must be the manifest's.
    let other_root = "0".repeat(64);
    assert_refused(&dp.offer_raw(PKG, "2", &q, Some(&other_root), &body), 400, "content root", "root header");
    // A manifest body over the 256 MiB limit is refused before it is sent.
    let big = (wire::MAX_MANIFEST_BYTES + 1).to_string();
    let auth = dp.auth();
    let r = request(
        dp.addr,
        "PUT",
        &format!("/v1/packages/{PKG}/versions/2/manifest?{q}"),
        &[("Authorization", &auth), ("Content-Length", &big), ("Expect", "100-continue")],
        b"",
    );
    assert_refused(&r, 413, "limit", "manifest over 256 MiB");

    // The URL and query.
    let cases: Vec<(String, &str, u16, &str)> = vec![
        (PKG.into(), "two", 400, "cannot parse"),
        (PKG.into(), "0", 400, "version 0 is invalid"),
        (PKG.into(), "-3", 400, "version -3 is invalid"),
        (PKG.into(), "99999999999999999999999", 400, "cannot parse"),
        ("ps100001".into(), "2", 400, "not a package id"),
        ("PS1".into(), "2", 400, "not a package id"),
        ("..%2f..%2fx".into(), "2", 400, "not a package id"),
        ("PS10000G".into(), "2", 400, "not a package id"),
    ];
    for (pkg, version, status, needle) in &cases {
        let r = dp.offer_raw(pkg, version, &q, Some(&root), &body);
        assert_refused(&r, *status, needle, &format!("package {pkg:?} version {version:?}"));
    }
    for bad_query in [
        q.replace("force=false", "force=maybe"),
        format!("{q}&force=1"),
        q.replace("force=false", "force=%ff"),
        format!("{q}&signature=%zz"),
    ] {
        let r = dp.offer_raw(PKG, "2", &bad_query, Some(&root), &body);
        assert_refused(&r, 400, "query", &format!("query {bad_query}"));
    }
    // Relabel: a root that is not hex, a missing root.
    let auth = dp.auth();
    for (query, needle) in [("root=xyz&source_site=PS1", "hex"), ("source_site=PS1", "query")] {
        let r = request(
            dp.addr,
            "POST",
            &format!("/v1/packages/{PKG}/versions/2/relabel?{query}"),
            &[("Authorization", &auth)],
            b"",
        );
        assert_refused(&r, 400, needle, query);
    }
    // A method that does not exist, an endpoint that does not exist.
    let r = request(dp.addr, "PATCH", &format!("/v1/packages/{PKG}"), &[("Authorization", &auth)], b"");
    assert_refused(&r, 405, "method not allowed", "PATCH");
    let r = request(dp.addr, "GET", "/v2/anything", &[], b"");
    assert_refused(&r, 404, "no such endpoint", "unknown endpoint");

    let st = dp.state(PKG);
    assert_eq!(st["staged_version"], Value::Null, "{st}");
    f.assert_untouched(&g, "malformed manifests");
}

// ---------------------------------------------------------------------------------------
// Signatures

#[test]
fn unsigned_or_wrongly_signed_versions_are_refused() {
    let mut f = Fixture::new();
    let other = SiteKey::load_or_create(&f.dir.join("intruder.key")).unwrap();
    let g = f.guard();
    let v2 = v2_with("new.txt", b"v2 content\n".to_vec());
    let root = v2.root();
    let body = v2.body();
    let dp = f.dp.clone();
    let good_sig = f.key.sign(PKG, SITE, 2, &root);
    let pk = f.key.public_hex();
    let mut flipped = good_sig.clone().into_bytes();
    flipped[7] = if flipped[7] == b'a' { b'b' } else { b'a' };
    let flipped = String::from_utf8(flipped).unwrap();
    let v1_sig = f.key.sign(PKG, SITE, 1, &f.v1.root());
    let cases: Vec<(String, u16, &str)> = vec![
        (
            format!("name=app&source_site={SITE}&signature={flipped}&site_key={pk}"),
            403,
            "does not match the pinned key",
        ),
        (format!("name=app&source_site={SITE}&signature={}&site_key={pk}", "00".repeat(64)), 403, "does not match"),
        (format!("name=app&source_site={SITE}&signature=zz&site_key={pk}"), 403, "does not match"),
        (format!("name=app&source_site={SITE}&site_key={pk}"), 403, "not signed"),
        (format!("name=app&source_site={SITE}"), 403, "not signed"),
        (format!("name=app&signature={good_sig}&site_key={pk}"), 400, "source site"),
        // Signed by another key, presenting that key, after PS1's key was pinned.
        (
            format!(
                "name=app&source_site={SITE}&signature={}&site_key={}",
                other.sign(PKG, SITE, 2, &root),
                other.public_hex()
            ),
            403,
            "does not match the pinned key",
        ),
        // The owner's genuine signature, replayed: for version 1, for another package,
        // for another site.
        (format!("name=app&source_site={SITE}&signature={v1_sig}&site_key={pk}"), 403, "does not match"),
        (
            format!("name=app&source_site={SITE}&signature={}&site_key={pk}", f.key.sign("PS100002", SITE, 2, &root)),
            403,
            "does not match",
        ),
        // Another source site claimed for PS1's package, with that site's own key and a
        // valid signature by it: a first-use pin must not let it take the package over.
        (
            format!(
                "name=app&source_site=EV1&signature={}&site_key={}",
                other.sign(PKG, "EV1", 2, &root),
                other.public_hex()
            ),
            403,
            "PS1",
        ),
    ];
    for (query, status, needle) in &cases {
        let r = dp.offer_raw(PKG, "2", query, Some(&root), &body);
        assert_refused(&r, *status, needle, query);
    }
    // Nothing of v2 can be committed after those refusals, and the trust store still holds
    // only PS1's key.
    assert_refused(&dp.commit(PKG, 2), 409, "offer it first", "commit after refused offers");
    let trusted: Value =
        serde_json::from_slice(&fs::read(f.agent.data_dir.join("trusted-sites.json")).unwrap()).unwrap();
    assert_eq!(trusted, serde_json::json!({ SITE: pk }), "trust store changed");

    // Relabel (same content, new number) needs the owner's signature too.
    let v1_root = f.v1.root();
    let auth = dp.auth();
    for (query, needle) in [
        (format!("root={v1_root}&source_site={SITE}&signature={v1_sig}&site_key={pk}"), "does not match"),
        (format!("root={v1_root}&source_site={SITE}"), "not signed"),
        (
            format!(
                "root={v1_root}&source_site={SITE}&signature={}&site_key={}",
                other.sign(PKG, SITE, 5, &v1_root),
                other.public_hex()
            ),
            "does not match",
        ),
    ] {
        let r = request(
            dp.addr,
            "POST",
            &format!("/v1/packages/{PKG}/versions/5/relabel?{query}"),
            &[("Authorization", &auth)],
            b"",
        );
        assert_refused(&r, 403, needle, &format!("relabel {query}"));
    }
    f.assert_untouched(&g, "bad signatures");
    // The good signature still works afterwards.
    dp.push(&f.key, SITE, PKG, 2, &v2);
    assert_eq!(f.agent.download(PKG, "new.txt").body, b"v2 content\n");
}

/// With `--strict-trust`, a site nobody pinned is refused even with a valid signature.
#[test]
fn strict_trust_refuses_unpinned_sites() {
    let dir = TestDir::new();
    let data = dir.join("dp");
    fs::create_dir_all(&data).unwrap();
    let key = SiteKey::load_or_create(&dir.join("ps1.key")).unwrap();
    let mut cmd = dpsync_command();
    cmd.arg("agent").arg("--data-dir").arg(&data).args([
        "--listen",
        "127.0.0.1:0",
        "--insecure-http",
        "--token",
        TOKEN,
        "--strict-trust",
    ]);
    let d = Daemon::start("strict agent", cmd, &PathBuf::from(format!("{}.agent.log", data.display())));
    let addr: SocketAddr = wait_until("the strict agent", START_TIMEOUT, &[&d], || {
        let a: SocketAddr = fs::read_to_string(data.join("listen.addr")).ok()?.trim().parse().ok()?;
        try_http_get(a, "/v1/hello", &[]).ok().filter(|r| r.status == 200).map(|_| a)
    });
    let dp = Target { addr, token: TOKEN.into() };
    let r = dp.offer(&key, SITE, PKG, 1, &v1());
    assert_refused(&r, 403, "not trusted here", "strict trust");
    assert!(!data.join("packages").exists());
    let trusted: Value = serde_json::from_slice(&fs::read(data.join("trusted-sites.json")).unwrap()).unwrap();
    assert_eq!(trusted, serde_json::json!({}));
}

// ---------------------------------------------------------------------------------------
// Chunks

#[test]
fn chunks_that_do_not_verify_are_never_installed() {
    let mut f = Fixture::new();
    let g = f.guard();
    let dp = f.dp.clone();
    let marker = b"TAMPERED-CHUNK-BYTES-0123456789".repeat(40);

    // 1. A chunk whose bytes do not match its id: rejected, not stored.
    let v2 = v2_with("new.bin", random_bytes(3000, 21));
    let r = dp.offer(&f.key, SITE, PKG, 2, &v2);
    assert_eq!(r.status, 200, "{}", r.body_text());
    let missing = wire::decode_ids(&r.body).unwrap();
    assert_eq!(missing.len(), 1, "only the new file's chunk is needed");
    let id = missing[0];
    let forged = vec![
        WireChunk { id, codec: Codec::Raw, raw_len: marker.len() as u32, bases: vec![], data: marker.clone().into() },
        WireChunk::encode(id, &marker),
        WireChunk { id, codec: Codec::Zstd, raw_len: 3000, bases: vec![], data: b"not zstd".to_vec().into() },
        WireChunk { id, codec: Codec::Raw, raw_len: 3001, bases: vec![], data: v2.chunks[&id].clone().into() },
    ];
    for c in forged {
        let r = dp.chunks(PKG, 2, &wire::encode_batch(&[c]));
        assert_eq!(r.status, 200, "{}", r.body_text());
        let resp: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(resp["accepted"], 0, "{resp}");
        assert_eq!(resp["rejected"], serde_json::json!([id.to_hex()]), "{resp}");
    }
    assert_eq!(f.data_dir_contains(&marker[..64]), None, "forged chunk bytes were stored");
    // 2. The chunk never arrives: commit answers 409 with exactly what is missing.
    let r = dp.commit(PKG, 2);
    let msg = assert_refused(&r, 409, "missing", "commit without the chunk");
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["missing"], serde_json::json!([id.to_hex()]), "{msg}");
    f.assert_untouched(&g, "forged and missing chunks");

    // 3. A file whose chunks are genuine but do not hash to the file's BLAKE3.
    let honest = random_bytes(5000, 31);
    let mut entries = f.v1.manifest.entries().to_vec();
    let d = digest_stream(&honest[..], &mut std::io::sink(), &ChunkParams::default()).unwrap();
    entries.push(Entry {
        path: RelPath::new("lie.bin").unwrap(),
        mode: 0o644,
        mtime_ns: MTIME,
        kind: EntryKind::File {
            size: d.size,
            hash: FileHash::from(blake3::hash(b"something else")),
            chunks: d.chunks.into(),
        },
    });
    let lie = Version {
        manifest: Manifest::new(entries).unwrap(),
        chunks: HashMap::from([(ChunkId::from(blake3::hash(&honest)), honest.clone())]),
        files: BTreeMap::new(),
    };
    let r = dp.offer(&f.key, SITE, PKG, 3, &lie);
    assert_eq!(r.status, 200, "{}", r.body_text());
    let missing = wire::decode_ids(&r.body).unwrap();
    let r = dp.chunks(PKG, 3, &lie.batch(&missing));
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_refused(&dp.commit(PKG, 3), 400, "do not hash to the file's BLAKE3", "file hash mismatch");
    assert!(
        !library_object(&f.agent.library(), &blake3_hex(b"something else")).exists()
            && !library_object(&f.agent.library(), &blake3_hex(&honest)).exists(),
        "a file that failed verification reached the library"
    );
    f.assert_untouched(&g, "file hash mismatch");
}

#[test]
fn hostile_manifest_and_chunk_deltas_are_refused() {
    use dpsync_hash::{ContentRoot, ManifestDelta};
    let mut f = Fixture::new();
    let g = f.guard();
    let dp = f.dp.clone();
    // v2: the multi-chunk file edited in its middle, and one new file.
    let mut tool = f.v1.files["bin/tool.bin"].clone();
    tool[200_000..200_100].fill(0x5A);
    let v2 = Version::build(
        &["bin"],
        &[
            ("readme.txt", f.v1.files["readme.txt"].clone()),
            ("bin/tool.bin", tool.clone()),
            ("empty.dat", Vec::new()),
            ("new.bin", random_bytes(3000, 51)),
        ],
        &[("link", "readme.txt")],
    );
    let delta = ManifestDelta::between(&f.v1.manifest, &v2.manifest);
    let body = wire::compress_manifest(&delta.encode());
    let root = v2.root();

    // 1. Malformed deltas: not zstd, zstd of garbage, a truncated delta, no content root.
    let mut truncated = delta.encode();
    truncated.truncate(truncated.len() - 3);
    for (case, b, needle) in [
        ("not zstd", b"garbage".to_vec(), "not valid zstd"),
        ("garbage delta", wire::compress_manifest(b"DPSD\x01\x00garbage"), "manifest delta refused"),
        ("a full manifest as a delta", f.v1.body(), "bad magic"),
        ("truncated delta", wire::compress_manifest(&truncated), "truncated"),
    ] {
        assert_refused(&dp.offer_delta_raw(&f.key, 2, Some(&root), &b), 400, needle, case);
    }
    assert_refused(&dp.offer_delta_raw(&f.key, 2, None, &body), 400, "x-dpsync-content-root", "no content root");
    f.assert_untouched(&g, "malformed deltas");

    // 2. A delta against content the DP does not hold: 409 with the code the sender
    //    recognizes (it then sends the full manifest).
    let mut unknown = delta.clone();
    unknown.base = ContentRoot::from_bytes([0x42; 32]);
    let r = dp.offer_delta_raw(&f.key, 2, Some(&root), &wire::compress_manifest(&unknown.encode()));
    assert_refused(&r, 409, "send the full manifest", "unknown base");
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["code"], wire::ERROR_BASE_UNKNOWN, "{v}");
    f.assert_untouched(&g, "unknown base");

    // 3. A delta whose result is not the content the signature covers: the owner signed v3,
    //    the delta gives v2.
    let v3 = v2_with("other.bin", random_bytes(2000, 52));
    let r = dp.offer_delta_raw(&f.key, 2, Some(&v3.root()), &body);
    assert_refused(&r, 400, "does not give the claimed content root", "result does not match the root");
    // A delta that copies chunks the base entry does not have.
    let mut bad = delta.clone();
    for u in &mut bad.upserts {
        if let dpsync_hash::DeltaKind::File { ops, .. } = &mut u.kind {
            ops.insert(0, dpsync_hash::ChunkOp::Copy { start: 1000, count: 5 });
        }
    }
    let r = dp.offer_delta_raw(&f.key, 2, Some(&root), &wire::compress_manifest(&bad.encode()));
    assert_refused(&r, 400, "does not have", "copy out of range");
    f.assert_untouched(&g, "deltas that do not give the signed content");

    // 4. The good delta is staged and answers the chunks v2 needs.
    let r = dp.offer_delta_raw(&f.key, 2, Some(&root), &body);
    assert_eq!(r.status, 200, "{}", r.body_text());
    let missing = wire::decode_ids(&r.body).unwrap();
    assert!(!missing.is_empty());

    // 5. Chunk deltas: against a base id the DP does not hold, or a base whose bytes are
    //    not the ones it was encoded against: rejected, nothing kept.
    let old_tool = &f.v1.files["bin/tool.bin"];
    let base_of = |id: &ChunkId| -> (ChunkId, Vec<u8>) {
        // The v1 chunk of tool.bin covering the same offset.
        let e = v2.manifest.get("bin/tool.bin").unwrap();
        let mut off = 0u64;
        for c in e.chunks() {
            if c.id == *id {
                break;
            }
            off += c.len as u64;
        }
        let mut boff = 0u64;
        for c in f.v1.manifest.get("bin/tool.bin").unwrap().chunks() {
            if off < boff + c.len as u64 {
                return (c.id, old_tool[boff as usize..(boff + c.len as u64) as usize].to_vec());
            }
            boff += c.len as u64;
        }
        unreachable!()
    };
    let tool_ids: Vec<ChunkId> = v2.manifest.get("bin/tool.bin").unwrap().chunks().iter().map(|c| c.id).collect();
    let edited = *missing.iter().find(|id| tool_ids.contains(id)).expect("the edited chunk is missing");
    let (base_id, base_bytes) = base_of(&edited);
    let good = WireChunk::encode_against(edited, &v2.chunks[&edited], &[base_id], &base_bytes);
    assert_eq!(good.codec, Codec::ZstdDelta, "a 100-byte edit compresses well against its base");
    let bogus_base = ChunkId::from_bytes([0x99; 32]);
    let mut wrong_base = good.clone();
    wrong_base.bases = vec![bogus_base];
    let other_base = f.v1.manifest.get("bin/tool.bin").unwrap().chunks().iter().map(|c| c.id).find(|c| *c != base_id);
    let mut mismatched = good.clone();
    mismatched.bases = other_base.into_iter().collect();
    // A run naming the right base and then a chunk the DP does not hold.
    let mut run = good.clone();
    run.codec = Codec::ZstdDeltaRun;
    run.bases = vec![base_id, bogus_base];
    for (case, c) in
        [("bogus base id", wrong_base), ("another held chunk as base", mismatched), ("a run with an unknown base", run)]
    {
        let r = dp.chunks(PKG, 2, &wire::encode_batch(&[c]));
        assert_eq!(r.status, 200, "{case}: {}", r.body_text());
        let resp: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(resp["accepted"], 0, "{case}: {resp}");
        assert_eq!(resp["rejected"], serde_json::json!([edited.to_hex()]), "{case}: {resp}");
    }
    let r = dp.commit(PKG, 2);
    assert_refused(&r, 409, "missing", "commit without the rejected chunk");
    f.assert_untouched(&g, "chunk deltas with bad bases");

    // 6. The good chunk delta and the rest, plainly: v2 installs, byte for byte.
    let mut batch = vec![good];
    batch.extend(missing.iter().filter(|id| **id != edited).map(|id| WireChunk::encode(*id, &v2.chunks[id])));
    let r = dp.chunks(PKG, 2, &wire::encode_batch(&batch));
    let resp: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(resp["rejected"], serde_json::json!([]), "{resp}");
    let r = dp.commit(PKG, 2);
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert!(f.agent.download(PKG, "bin/tool.bin").body == tool, "the delta-encoded chunk was assembled wrongly");
}

#[test]
fn hostile_chunk_batches_are_refused() {
    let mut f = Fixture::new();
    let g = f.guard();
    let dp = f.dp.clone();
    let v2 = v2_with("new.bin", random_bytes(3000, 41));
    let r = dp.offer(&f.key, SITE, PKG, 2, &v2);
    assert_eq!(r.status, 200, "{}", r.body_text());
    let missing = wire::decode_ids(&r.body).unwrap();
    let good = v2.batch(&missing);

    let mut trailing = good.clone();
    trailing.push(0);
    let mut bad_codec = good.clone();
    bad_codec[10 + 32] = 7;
    let mut bad_format = good.clone();
    bad_format[4] = 3;
    let mut zero_len = good.clone();
    zero_len[10 + 33..10 + 37].copy_from_slice(&0u32.to_le_bytes());
    let mut huge_count = good.clone();
    huge_count[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("truncated batch", good[..good.len() - 10].to_vec(), 400, "truncated"),
        ("truncated header", good[..7].to_vec(), 400, "truncated"),
        ("empty body", vec![], 400, "truncated"),
        ("bad magic", b"XXXX\x01\x00\x00\x00\x00\x00".to_vec(), 400, "bad magic"),
        ("trailing bytes", trailing, 400, "trailing bytes"),
        ("unknown codec", bad_codec, 400, "unknown codec"),
        ("unknown format", bad_format, 400, "format 3"),
        ("zero-length chunk", zero_len, 400, "exceeds the limit"),
        ("2^32-1 chunks claimed", huge_count, 400, "truncated"),
    ];
    for (case, body, status, needle) in cases {
        assert_refused(&dp.chunks(PKG, 2, &body), status, needle, case);
    }
    // A chunk declared larger than 16 MiB.
    let mut too_big = good.clone();
    too_big[10 + 33..10 + 37].copy_from_slice(&(dpsync_hash::manifest::MAX_CHUNK_LEN + 1).to_le_bytes());
    assert_refused(&dp.chunks(PKG, 2, &too_big), 400, "exceeds the limit", "chunk over 16 MiB");

    // A body over 32 MiB: refused with 413 whether announced or sent.
    let over = wire::MAX_BATCH_BYTES + 1;
    let auth = dp.auth();
    let path = format!("/v1/packages/{PKG}/versions/2/chunks");
    let r = request(
        dp.addr,
        "POST",
        &path,
        &[("Authorization", &auth), ("Content-Length", &over.to_string()), ("Expect", "100-continue")],
        b"",
    );
    assert_refused(&r, 413, "limit", "announced 32 MiB + 1 batch");
    let r = dp.chunks(PKG, 2, &vec![0x5a; over]);
    assert_refused(&r, 413, "limit", "32 MiB + 1 batch");
    // The same, chunked (no length announced).
    let mut s = connect(dp.addr);
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut reader = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let piece = vec![0x5au8; 1 << 20];
        for _ in 0..40 {
            if s.write_all(format!("{:x}\r\n", piece.len()).as_bytes()).is_err()
                || s.write_all(&piece).is_err()
                || s.write_all(b"\r\n").is_err()
            {
                return;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n");
    });
    let mut raw = Vec::new();
    let _ = reader.read_to_end(&mut raw);
    let _ = writer.join();
    assert_refused(&parse_response(&raw).expect("an answer"), 413, "limit", "chunked 40 MiB batch");

    // A small body that would decompress to far more than a batch may hold: 2000 copies
    // of one compressed 16 MiB chunk (32 GiB) in ~3 MB.
    let zeros = vec![0u8; dpsync_hash::manifest::MAX_CHUNK_LEN as usize];
    let z = WireChunk::encode(ChunkId::from(blake3::hash(&zeros)), &zeros);
    let bomb = wire::encode_batch(&vec![z; 2000]);
    assert!(bomb.len() < 8 << 20);
    let started = Instant::now();
    assert_refused(&dp.chunks(PKG, 2, &bomb), 413, "decompresses to more than", "decompression bomb");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());

    // The HTTP body itself cut short: the client promises 1000 bytes, sends 10, and
    // stops writing.
    let mut s = connect(dp.addr);
    s.write_all(
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Length: 1000\r\nConnection: close\r\n\r\n0123456789")
            .as_bytes(),
    )
    .unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    if let Some(r) = parse_response(&raw) {
        assert_refused(&r, 400, "body", "body shorter than its length");
    }

    // Malformed HTTP: garbage, a smuggling attempt, an enormous header. hyper answers
    // these itself (no JSON: the request never reaches the service) or closes.
    for raw in [
        b"GARBAGE\r\n\r\n".to_vec(),
        format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nAuthorization: {auth}\r\n\r\n0\r\n\r\n").into_bytes(),
        format!("GET /v1/hello HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(1 << 20)).into_bytes(),
        b"GET /v1/hello HTTP/9.9\r\n\r\n".to_vec(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03".to_vec(),
    ] {
        if let Some(r) = raw_exchange(dp.addr, &raw) {
            assert!((400..500).contains(&r.status), "{:?}: {} {}", String::from_utf8_lossy(&raw[..20]), r.status, r.body_text());
        }
    }
    // Slowloris-style: a connection that sends half a request and waits does not block
    // others.
    let mut idle = connect(dp.addr);
    idle.write_all(b"POST /v1/packages/PS100001/versions/2/chunks HTTP/1.1\r\nHost: x\r\n").unwrap();

    // Nothing from these batches was stored; the good batch still works.
    let st = dp.state(PKG);
    assert_eq!(st["staged_version"], 2, "{st}");
    f.assert_untouched(&g, "hostile batches");
    drop(idle);
    dp.push(&f.key, SITE, PKG, 2, &v2);
    assert_eq!(f.agent.download(PKG, "new.bin").body, v2.files["new.bin"]);
}

// ---------------------------------------------------------------------------------------
// Downloads

#[test]
fn download_paths_cannot_escape() {
    let mut f = Fixture::new();
    let g = f.guard();
    let files = format!("/v1/packages/{PKG}/files");
    let cases: Vec<(String, &[u16])> = vec![
        (format!("{files}/%2e%2e/%2e%2e/etc/passwd"), &[400]),
        (format!("{files}/..%2f..%2fetc%2fpasswd"), &[400]),
        (format!("{files}/%2e%2e%2f%2e%2e%2f%2e%2e%2f%2e%2e%2foutside%2fsecret.txt"), &[400]),
        (format!("{files}/../../../../outside/secret.txt"), &[400, 404]),
        (format!("{files}/bin/../../../../../outside/secret.txt"), &[400, 404]),
        (format!("{files}/a%00b"), &[400]),
        (format!("{files}/readme.txt%00.png"), &[400]),
        (format!("{files}/%5c..%5c..%5cetc%5cpasswd"), &[400]),
        (format!("{files}/..%5c..%5coutside%5csecret.txt"), &[400]),
        (format!("{files}//etc/passwd"), &[400, 404]),
        (format!("{files}/%2fetc%2fpasswd"), &[400]),
        (format!("{files}/%ff%fe"), &[400]),
        (format!("{files}/%"), &[400, 404]),
        (format!("{files}/./readme.txt"), &[400, 404]),
        (format!("{files}/bin/"), &[400, 404]),
        (format!("{files}/bin"), &[404]),
        (format!("{files}/nope.txt"), &[404]),
        (format!("{files}/{}", "a/".repeat(2100)), &[400]),
        ("/v1/packages/..%2f..%2f..%2fetc/files/passwd".to_owned(), &[400]),
        ("/v1/packages/%2e%2e/files/outside/secret.txt".to_owned(), &[400]),
        ("/v1/packages/PS100002/files/readme.txt".to_owned(), &[404]),
    ];
    for (path, allowed) in &cases {
        let r = f.agent.get(path, &[]);
        assert!(allowed.contains(&r.status), "GET {path}: {} {}", r.status, r.body_text());
        assert_refused(&r, r.status, "", path);
        assert!(!r.body.windows(5).any(|w| w == b"root:"), "GET {path} served /etc/passwd");
        assert!(!r.body.windows(SECRET.len()).any(|w| w == SECRET), "GET {path} served the canary");
    }
    // Ranges that try to read past the end or wrap around.
    let r = f.agent.get(&format!("{files}/readme.txt"), &[("Range", "bytes=99999999999999999999-")]);
    assert_eq!(r.body, f.v1.files["readme.txt"], "an unparseable range serves the whole file");
    let r = f.agent.get(&format!("{files}/readme.txt"), &[("Range", "bytes=5-18446744073709551615")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, f.v1.files["readme.txt"][5..]);
    let r = f.agent.get(&format!("{files}/readme.txt"), &[("Range", "bytes=-0")]);
    assert_eq!(r.status, 416);
    f.assert_untouched(&g, "hostile downloads");
}

// ---------------------------------------------------------------------------------------
// A child site as the receiver

/// Starts a child site CH1 receiving on plain HTTP with `token`; returns it and its
/// receiving address.
fn start_child(data_dir: PathBuf, code: &str, token: &str) -> (Server, SocketAddr) {
    let mut opts = ServerOpts::site(code);
    opts.args = ["--listen", "127.0.0.1:0", "--token", token, "--insecure-http", "--retry-delay-ms", "200"]
        .map(String::from)
        .to_vec();
    let server = Server::start_with(&data_dir, opts);
    let addr_file = data_dir.join("listen.addr");
    let addr: SocketAddr = wait_until(&format!("{code} to listen"), START_TIMEOUT, &[server.daemon()], || {
        let a: SocketAddr = fs::read_to_string(&addr_file).ok()?.trim().parse().ok()?;
        try_http_get(a, "/v1/hello", &[]).ok().filter(|r| r.status == 200).map(|_| a)
    });
    (server, addr)
}

fn package_ids(server: &Server) -> Vec<String> {
    let v = server.cli_json(&["package", "list"]);
    let arr = v.as_array().or_else(|| v["packages"].as_array()).cloned().unwrap_or_default();
    arr.iter().filter_map(|p| p["id"].as_str().map(str::to_owned)).collect()
}

#[test]
fn child_site_refuses_its_own_packages_and_bad_signatures() {
    let dir = TestDir::new();
    let (mut ch1, addr) = start_child(dir.join("ch1"), "CH1", "ch1-token");
    let target = Target { addr, token: "ch1-token".into() };
    let parent = SiteKey::load_or_create(&dir.join("ps1.key")).unwrap();
    let v = v1();
    let root = v.root();

    // A package claiming the child's own site code as its source.
    let r = target.offer(&parent, "CH1", "CH100001", 1, &v);
    assert_refused(&r, 403, "names this site (CH1)", "own site code");
    let r = target.offer(&parent, "ch1", "CH100001", 1, &v);
    assert_refused(&r, 403, "CH1", "own site code, lower case");

    // Bad signatures.
    let pk = parent.public_hex();
    let other = SiteKey::load_or_create(&dir.join("other.key")).unwrap();
    let bad: Vec<(String, u16, &str)> = vec![
        (format!("name=app&source_site={SITE}&signature={}&site_key={pk}", "11".repeat(64)), 403, "does not verify"),
        (format!("name=app&source_site={SITE}&site_key={pk}"), 403, "not signed"),
        (
            format!("name=app&source_site={SITE}&signature={}&site_key={pk}", other.sign(PKG, SITE, 1, &root)),
            403,
            "does not verify",
        ),
        // Someone else's package id claimed by a different site.
        (
            format!(
                "name=app&source_site=EV1&signature={}&site_key={}",
                other.sign(PKG, "EV1", 1, &root),
                other.public_hex()
            ),
            403,
            "PS1",
        ),
        (format!("source_site={SITE}&signature={}&site_key={pk}", parent.sign(PKG, SITE, 1, &root)), 400, "name"),
    ];
    for (query, status, needle) in &bad {
        let r = target.offer_raw(PKG, "1", query, Some(&root), &v.body());
        assert_refused(&r, *status, needle, query);
    }
    // Unauthenticated.
    let r = request(addr, "DELETE", &format!("/v1/packages/{PKG}"), &[], b"");
    assert_refused(&r, 401, "missing bearer token", "child without token");
    // A site validates through its own targets: a package it does not hold is not found.
    let auth = target.auth();
    let r = request(addr, "POST", &format!("/v1/packages/{PKG}/validate"), &[("Authorization", &auth)], b"");
    assert_refused(&r, 404, "no package", "validate on a site of a package it lacks");

    // None of that left a trace: no package, no pinned key, no library content.
    assert!(package_ids(&ch1).is_empty(), "refused offers registered packages: {:?}", package_ids(&ch1));
    let trusted: Value =
        serde_json::from_slice(&fs::read(dir.join("ch1/trusted-sites.json")).unwrap_or_else(|_| b"{}".to_vec()))
            .unwrap();
    assert_eq!(trusted, serde_json::json!({}), "a refused offer pinned a key");
    assert!(ch1.daemon_mut().is_running());

    // The genuine version is accepted (and pins PS1), and a different key is refused
    // afterwards.
    target.push(&parent, SITE, PKG, 1, &v);
    assert_eq!(package_ids(&ch1), vec![PKG.to_owned()]);
    let v2 = v2_with("new.txt", b"v2\n".to_vec());
    let r = target.offer_raw(
        PKG,
        "2",
        &format!(
            "name=app&source_site={SITE}&signature={}&site_key={}",
            other.sign(PKG, SITE, 2, &v2.root()),
            other.public_hex()
        ),
        Some(&v2.root()),
        &v2.body(),
    );
    assert_refused(&r, 403, "does not match the pinned key", "child: another key after pinning");
    let show = ch1.cli_json(&["package", "show", PKG]);
    assert_eq!(version_numbers(&show), vec![1], "{show:#}");
}

// ---------------------------------------------------------------------------------------
// Tampering through a child site: PS1 → CH1 → DP, all real processes

const DP_TOKEN: &str = "tamper-dp-token";
const CH1_TOKEN: &str = "tamper-ch1-token";

struct Chain {
    ps1: Server,
    ch1: Server,
    dp: Agent,
    src: PathBuf,
    pkg: String,
    dir: TestDir,
}

impl Chain {
    /// PS1 → CH1 → dp, package `app` refreshed once and installed on the DP.
    fn new() -> Self {
        let dir = TestDir::new();
        let src = dir.join("src");
        gen_tree(&src, 12, 77, 1..40 << 10);
        set_old_mtimes(&src);
        let dp = Agent::start(dir.join("dp"), Some(DP_TOKEN));
        let (ch1, ch1_addr) = start_child(dir.join("ch1"), "CH1", CH1_TOKEN);
        ch1.cli_json(&["dp", "add", "dp", &dp.url(), "--token", DP_TOKEN]);
        let mut opts = ServerOpts::site("PS1");
        opts.args = ["--retry-delay-ms", "200"].map(String::from).to_vec();
        let ps1 = Server::start_with(dir.join("ps1"), opts);
        ps1.cli_json(&["site", "add", "CH1", &format!("http://{ch1_addr}"), "--token", CH1_TOKEN]);
        let pkg = text(&ps1.cli_json(&["package", "add", "app", src.to_str().unwrap()]), "id").to_owned();
        ps1.cli_json(&["distribute", &pkg, "--site", "CH1"]);
        let out = ps1.cli(&["refresh", &pkg, "--wait", "--timeout", "30", "--json"]);
        assert!(out.status.success(), "refresh: {}", String::from_utf8_lossy(&out.stderr));
        let c = Self { ps1, ch1, dp, src, pkg, dir };
        let expected = tree_digest(&c.src);
        wait_until("v1 on the DP", Duration::from_secs(30), &c.daemons(), || {
            let cur = c.dp.current(&c.pkg);
            (cur.exists() && tree_digest(&cur).diff(&expected).is_empty()).then_some(())
        });
        c
    }

    fn daemons(&self) -> Vec<&Daemon> {
        vec![self.ps1.daemon(), self.ch1.daemon(), self.dp.daemon()]
    }

    fn dp_target(&self) -> Target {
        Target { addr: self.dp.addr(), token: DP_TOKEN.into() }
    }

    /// The source as PS1 published it as v1 (modes and times included, so that its
    /// content root is the one PS1 signed; checked against the DP's installed root).
    fn published(&self) -> Version {
        let mut entries = Vec::new();
        let mut chunks = HashMap::new();
        let mut files = BTreeMap::new();
        for e in walkdir::WalkDir::new(&self.src).min_depth(1).sort_by_file_name() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(&self.src).unwrap().to_str().unwrap().to_owned();
            let md = e.path().symlink_metadata().unwrap();
            let mtime_ns = md.mtime() * 1_000_000_000 + md.mtime_nsec();
            let mode = md.mode() & 0o7777;
            let kind = if e.file_type().is_dir() {
                EntryKind::Dir
            } else {
                let data = fs::read(e.path()).unwrap();
                let d = digest_stream(&data[..], &mut std::io::sink(), &ChunkParams::default()).unwrap();
                let mut off = 0usize;
                for ch in &d.chunks {
                    chunks.insert(ch.id, data[off..off + ch.len as usize].to_vec());
                    off += ch.len as usize;
                }
                files.insert(rel.clone(), data);
                EntryKind::File { size: d.size, hash: d.hash, chunks: d.chunks.into() }
            };
            entries.push(Entry { path: RelPath::new(rel).unwrap(), mode, mtime_ns, kind });
        }
        let v = Version { manifest: Manifest::new(entries).unwrap(), chunks, files };
        let installed = self.dp_target().state(&self.pkg)["installed_root"].as_str().unwrap_or_default().to_owned();
        assert_eq!(v.root(), installed, "the test rebuilds PS1's v1 manifest exactly");
        v
    }
}

/// The largest file of a tree, relative path and bytes.
fn largest(root: &Path) -> (String, Vec<u8>) {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in walkdir::WalkDir::new(root).sort_by_file_name().into_iter().flatten() {
        if e.file_type().is_file() {
            let len = e.metadata().unwrap().len();
            if best.as_ref().is_none_or(|(l, _)| len > *l) {
                best = Some((len, e.path().to_owned()));
            }
        }
    }
    let (_, p) = best.expect("a file");
    (p.strip_prefix(root).unwrap().to_str().unwrap().to_owned(), fs::read(&p).unwrap())
}

#[test]
fn a_malicious_relay_cannot_install_altered_content() {
    let c = Chain::new();
    let dp = c.dp_target();
    let before = tree_digest(&c.dp.current(&c.pkg));
    let (victim, original) = largest(&c.src);
    let mut altered = original.clone();
    altered[..16].copy_from_slice(b"ALTERED-BY-RELAY");

    // The relay's own version of the package: same paths, altered bytes.
    let mut evil = c.published();
    let files: Vec<(String, Vec<u8>)> =
        evil.files.iter().map(|(p, b)| (p.clone(), if *p == victim { altered.clone() } else { b.clone() })).collect();
    let dirs: Vec<String> = evil
        .manifest
        .entries()
        .iter()
        .filter(|e| matches!(e.kind, EntryKind::Dir))
        .map(|e| e.path.to_string())
        .collect();
    evil = Version::build(
        &dirs.iter().map(String::as_str).collect::<Vec<_>>(),
        &files.iter().map(|(p, b)| (p.as_str(), b.clone())).collect::<Vec<_>>(),
        &[],
    );
    let relay_key = SiteKey::load_or_create(&c.dir.join("relay.key")).unwrap();
    let ps1_key = fs::read_to_string(c.dp.data_dir.join("trusted-sites.json")).unwrap();
    assert!(ps1_key.contains(SITE), "the DP pinned PS1's key on first use: {ps1_key}");
    let root = evil.root();
    // What the relay legitimately holds: PS1's signature of v1 (ed25519 is deterministic,
    // so signing with PS1's key file gives exactly the signature CH1 relays).
    let ps1 = SiteKey::load_or_create(&c.ps1.data_dir.join("site.key")).unwrap();
    let published = c.published();
    let v1_sig = ps1.sign(&c.pkg, SITE, 1, &published.root());
    let attempts: Vec<(String, &str)> = vec![
        // PS1's genuine v1 signature replayed over the altered content, as v1 and v2.
        (format!("name=app&source_site={SITE}&signature={v1_sig}"), "does not match the pinned key"),
        // Signed with the relay's own key, claiming PS1.
        (
            format!(
                "name=app&source_site={SITE}&signature={}&site_key={}",
                relay_key.sign(&c.pkg, SITE, 2, &root),
                relay_key.public_hex()
            ),
            "does not match the pinned key",
        ),
        // Claiming to be another owner with its own (first-use) key.
        (
            format!(
                "name=app&source_site=CH1&signature={}&site_key={}",
                relay_key.sign(&c.pkg, "CH1", 2, &root),
                relay_key.public_hex()
            ),
            "PS1",
        ),
        // No signature at all.
        (format!("name=app&source_site={SITE}"), "not signed"),
    ];
    for (query, needle) in &attempts {
        for (version, force) in [("2", "false"), ("2", "true"), ("1", "true")] {
            let r = dp.offer_raw(&c.pkg, version, &format!("force={force}&{query}"), Some(&root), &evil.body());
            assert_refused(&r, 403, needle, &format!("v{version} force={force} {query}"));
        }
    }
    // Relabel: the altered root under PS1's genuine signature of v1.
    let auth = dp.auth();
    let r = request(
        dp.addr,
        "POST",
        &format!("/v1/packages/{}/versions/2/relabel?root={root}&source_site={SITE}&signature={v1_sig}", c.pkg),
        &[("Authorization", &auth)],
        b"",
    );
    assert_refused(&r, 403, "does not match", "relabel with a replayed signature");
    // Chunks of the altered file pushed anyway: verified and stored at most, never
    // committed without an accepted manifest.
    let ids: Vec<ChunkId> = evil.chunks.keys().copied().collect();
    let r = dp.chunks(&c.pkg, 2, &evil.batch(&ids));
    assert!(r.status == 409 || r.status == 200, "{} {}", r.status, r.body_text());
    assert_refused(&dp.commit(&c.pkg, 2), 409, "offer it first", "commit of a refused version");

    // The DP keeps v1, as published.
    let after = tree_digest(&c.dp.current(&c.pkg));
    assert!(after.diff(&before).is_empty(), "the DP's tree changed:\n{}", after.diff(&before));
    assert!(tree_digest(&c.dp.current(&c.pkg)).diff(&tree_digest(&c.src)).is_empty());
    let served = c.dp.download(&c.pkg, &victim);
    assert_eq!(served.status, 200);
    assert!(served.body == original, "the DP serves altered bytes");
    assert_eq!(dp.state(&c.pkg)["installed_version"], 1);
}

#[test]
fn a_tampered_child_library_never_reaches_the_dp() {
    let c = Chain::new();
    let before = tree_digest(&c.dp.current(&c.pkg));
    let (victim, original) = largest(&c.src);
    assert!(original.len() > 64);
    // Tamper with the child's stored copy of the file (same size, different bytes).
    let obj = library_object(&c.ch1.library(), &blake3_hex(&original));
    assert!(obj.exists(), "CH1 keeps the file at {}", obj.display());
    let mut perms = fs::metadata(&obj).unwrap().permissions();
    perms.set_mode(perms.mode() | 0o200);
    fs::set_permissions(&obj, perms).unwrap();
    let marker = b"TAMPERED-ON-CH1!";
    let mut bytes = fs::read(&obj).unwrap();
    bytes[..marker.len()].copy_from_slice(marker);
    fs::write(&obj, &bytes).unwrap();

    // CH1 must now send every chunk again (redistribute: nothing on the DP is trusted).
    let out = c.ch1.cli(&["redistribute", &c.pkg, "--dp", "dp", "--wait", "--timeout", "30", "--json"]);
    let status = c.ch1.wait_status(&c.pkg, "CH1's job to fail", Duration::from_secs(30), &[c.dp.daemon()], |s| {
        target_of(s, "dp")["state"] == "failed"
    });
    let t = target_of(&status, "dp");
    let err = t["last_error"].as_str().or_else(|| t["error"].as_str()).unwrap_or_default().to_owned();
    assert!(
        err.contains("damaged"),
        "CH1's job should fail naming the damaged library object, got {t:#}\nredistribute: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The DP never received, stored or installed the tampered bytes.
    for e in walkdir::WalkDir::new(&c.dp.data_dir).follow_links(false).into_iter().flatten() {
        if e.file_type().is_file() {
            let b = fs::read(e.path()).unwrap();
            assert!(!b.windows(marker.len()).any(|w| w == marker), "tampered bytes in {}", e.path().display());
        }
    }
    let after = tree_digest(&c.dp.current(&c.pkg));
    assert!(after.diff(&before).is_empty(), "the DP's tree changed:\n{}", after.diff(&before));
    assert!(c.dp.download(&c.pkg, &victim).body == original);

    // And if a relay skipped that check and sent the tampered bytes under the genuine
    // chunk ids, the DP would verify them again and refuse them.
    let dp = c.dp_target();
    let published = c.published();
    let d = digest_stream(&original[..], &mut std::io::sink(), &ChunkParams::default()).unwrap();
    let first = d.chunks[0];
    let forged = WireChunk::encode(first.id, &bytes[..first.len as usize]);
    // Offer the genuine v1 again with force, with the owner's signature the relay holds
    // (ed25519 is deterministic: PS1's key file gives exactly that signature).
    let ps1 = SiteKey::load_or_create(&c.ps1.data_dir.join("site.key")).unwrap();
    let root = published.root();
    let q = format!("force=true&name=app&source_site={SITE}&signature={}", ps1.sign(&c.pkg, SITE, 1, &root));
    let r = dp.offer_raw(&c.pkg, "1", &q, Some(&root), &published.body());
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert!(wire::decode_ids(&r.body).unwrap().contains(&first.id), "with force the DP wants every chunk");
    let r = dp.chunks(&c.pkg, 1, &wire::encode_batch(&[forged]));
    let resp: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(resp["rejected"], serde_json::json!([first.id.to_hex()]), "{resp}");
    // The DP may rebuild from its own copies, each chunk verified as it is read: the tree
    // stays what PS1 published either way.
    let r = dp.commit(&c.pkg, 1);
    assert!(r.status == 200 || r.status == 409, "{} {}", r.status, r.body_text());
    assert!(tree_digest(&c.dp.current(&c.pkg)).diff(&before).is_empty());
    assert!(c.dp.download(&c.pkg, &victim).body == original);

    // A fresh DP, which holds nothing to fall back on, gets the genuine manifest and the
    // forged chunk: it refuses the chunk and cannot commit until the genuine one comes.
    let fresh = Agent::start(c.dir.join("dp2"), Some(DP_TOKEN));
    let t2 = Target { addr: fresh.addr(), token: DP_TOKEN.into() };
    let q = format!(
        "name=app&source_site={SITE}&signature={}&site_key={}",
        ps1.sign(&c.pkg, SITE, 1, &root),
        ps1.public_hex()
    );
    let r = t2.offer_raw(&c.pkg, "1", &q, Some(&root), &published.body());
    assert_eq!(r.status, 200, "{}", r.body_text());
    let wanted = wire::decode_ids(&r.body).unwrap();
    assert!(wanted.contains(&first.id));
    let r = t2.chunks(&c.pkg, 1, &wire::encode_batch(&[WireChunk::encode(first.id, &bytes[..first.len as usize])]));
    let resp: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(resp["rejected"], serde_json::json!([first.id.to_hex()]), "{resp}");
    let rest: Vec<ChunkId> = wanted.iter().copied().filter(|id| *id != first.id).collect();
    if !rest.is_empty() {
        let r = t2.chunks(&c.pkg, 1, &published.batch(&rest));
        assert_eq!(r.status, 200, "{}", r.body_text());
    }
    let r = t2.commit(&c.pkg, 1);
    assert_refused(&r, 409, "missing", "fresh DP: commit without the genuine chunk");
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["missing"], serde_json::json!([first.id.to_hex()]), "{v}");
    assert!(!fresh.current(&c.pkg).exists(), "the fresh DP installed something");
    for e in walkdir::WalkDir::new(&fresh.data_dir).follow_links(false).into_iter().flatten() {
        if e.file_type().is_file() {
            let b = fs::read(e.path()).unwrap();
            assert!(!b.windows(marker.len()).any(|w| w == marker), "tampered bytes in {}", e.path().display());
        }
    }
    // The genuine chunk completes it.
    let r = t2.chunks(&c.pkg, 1, &published.batch(&[first.id]));
    assert_eq!(r.status, 200, "{}", r.body_text());
    let r = t2.commit(&c.pkg, 1);
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert!(tree_digest(&fresh.current(&c.pkg)).diff(&tree_digest(&c.src)).is_empty());
}

// ---------------------------------------------------------------------------------------
// Chunks in an unusual order, chunks shared by files, a damaged partial file

/// The agent's `dpsync_agent_files_written_on_arrival_total` counter.
fn written_on_arrival(agent: &Agent) -> u64 {
    let r = agent.get("/metrics", &[]);
    assert_eq!(r.status, 200, "{}", r.body_text());
    let text = r.body_text();
    let line = text
        .lines()
        .find(|l| l.starts_with("dpsync_agent_files_written_on_arrival_total "))
        .unwrap_or_else(|| panic!("no written-on-arrival counter in\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

/// A file's chunk ids, in file order.
fn chunk_ids(v: &Version, path: &str) -> Vec<ChunkId> {
    v.manifest.get(path).unwrap().chunks().iter().map(|c| c.id).collect()
}

#[test]
fn files_whose_chunks_arrive_out_of_order_or_are_shared_still_install() {
    let f = Fixture::new();
    let written_v1 = written_on_arrival(&f.agent);
    let shared = random_bytes(2 << 20, 71);
    let mut with_shared_start = shared[..1 << 20].to_vec();
    with_shared_start.extend(random_bytes(1 << 20, 72));
    let base = v1();
    let mut files: Vec<(&str, Vec<u8>)> = base.files.iter().map(|(p, d)| (p.as_str(), d.clone())).collect();
    files.push(("in-order.bin", random_bytes(2 << 20, 73)));
    files.push(("reversed.bin", random_bytes(2 << 20, 74)));
    files.push(("shared-a.bin", shared));
    files.push(("shared-b.bin", with_shared_start));
    let v2 = Version::build(&["bin"], &files, &[("link", "readme.txt")]);
    for p in ["in-order.bin", "reversed.bin", "shared-a.bin"] {
        assert!(chunk_ids(&v2, p).len() >= 4, "{p} needs several chunks for this test");
    }
    let first = chunk_ids(&v2, "shared-a.bin")[0];
    assert!(chunk_ids(&v2, "shared-b.bin").contains(&first), "the two files must share chunks");

    let r = f.dp.offer(&f.key, SITE, PKG, 2, &v2);
    assert_eq!(r.status, 200, "{}", r.body_text());
    let missing = wire::decode_ids(&r.body).unwrap();
    // Everything in file order, except `reversed.bin`, whose chunks come last to first.
    let reversed: Vec<ChunkId> = chunk_ids(&v2, "reversed.bin").into_iter().rev().collect();
    let mut order: Vec<ChunkId> = missing.iter().copied().filter(|id| !reversed.contains(id)).collect();
    order.extend(&reversed);
    assert_eq!(order.len(), missing.len());
    for part in order.chunks(order.len() / 3 + 1) {
        let r = f.dp.chunks(PKG, 2, &v2.batch(part));
        assert_eq!(r.status, 200, "{}", r.body_text());
    }
    let r = f.dp.commit(PKG, 2);
    assert_eq!(r.status, 200, "{}", r.body_text());
    for (p, data) in &v2.files {
        let r = f.agent.download(PKG, p);
        assert_eq!(r.status, 200, "{p}: {}", r.body_text());
        assert!(r.body == *data, "{p}: wrong bytes");
    }
    // Only `in-order.bin` could be written as it arrived; the others were assembled.
    assert_eq!(written_on_arrival(&f.agent) - written_v1, 1);
    assert!(!f.agent.staging(PKG).exists() || count_entries(&f.agent.staging(PKG)) == 0);
}

#[test]
fn a_damaged_partial_file_is_detected_and_its_chunk_asked_for_again() {
    let mut f = Fixture::new();
    let big = random_bytes(4 << 20, 81);
    let v2 = v2_with("big.bin", big.clone());
    let ids = chunk_ids(&v2, "big.bin");
    assert!(ids.len() >= 8, "big.bin needs several chunks for this test");
    let r = f.dp.offer(&f.key, SITE, PKG, 2, &v2);
    assert_eq!(r.status, 200, "{}", r.body_text());
    let missing = wire::decode_ids(&r.body).unwrap();
    assert_eq!(missing, ids, "a new file's chunks are asked for in file order");
    // Half of the file arrives, is written to its partial file, then the agent dies.
    let half = ids.len() / 2;
    let r = f.dp.chunks(PKG, 2, &v2.batch(&ids[..half]));
    assert_eq!(r.status, 200, "{}", r.body_text());
    f.agent.kill9();
    let staging = f.agent.staging(PKG);
    let packs: Vec<PathBuf> = fs::read_dir(&staging).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(packs.len(), 1, "one partial file: {packs:?}");
    let held = fs::read(&packs[0]).unwrap();
    let first_len = v2.manifest.get("big.bin").unwrap().chunks()[0].len as usize;
    assert!(held.len() >= first_len && big.starts_with(&held), "the partial file holds the file's first bytes");
    // Damage one byte of the second chunk on disk.
    let at = first_len + 10;
    let file = fs::OpenOptions::new().write(true).open(&packs[0]).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &[held[at] ^ 0xff], at as u64).unwrap();
    drop(file);

    f.agent.restart();
    f.assert_serves_v1();
    let r = f.dp.offer(&f.key, SITE, PKG, 2, &v2);
    assert_eq!(r.status, 200, "{}", r.body_text());
    let missing = wire::decode_ids(&r.body).unwrap();
    assert_eq!(missing, ids[half..].to_vec(), "what arrived before the kill is not asked for again");
    let r = f.dp.chunks(PKG, 2, &v2.batch(&missing));
    assert_eq!(r.status, 200, "{}", r.body_text());
    // The damaged chunk is found when the file is assembled, and asked for again.
    let r = f.dp.commit(PKG, 2);
    assert_refused(&r, 409, "missing", "commit with a damaged staged chunk");
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(v["missing"], serde_json::json!([ids[1].to_hex()]), "{v}");
    f.assert_serves_v1();
    let r = f.dp.chunks(PKG, 2, &v2.batch(&ids[1..2]));
    assert_eq!(r.status, 200, "{}", r.body_text());
    let r = f.dp.commit(PKG, 2);
    assert_eq!(r.status, 200, "{}", r.body_text());
    let r = f.agent.download(PKG, "big.bin");
    assert!(r.status == 200 && r.body == big, "big.bin: status {}, wrong bytes", r.status);
}

// ---------------------------------------------------------------------------------------
// A damaged database: the daemons refuse to start on it

#[test]
fn a_garbled_database_page_stops_the_server_and_the_agent_at_start() {
    let dir = TestDir::new();
    let src = dir.join("src");
    gen_tree(&src, 300, 4242, 0..8 << 10);
    set_old_mtimes(&src);
    let mut server = Server::start(dir.join("d"), SITE);
    let mut agent = Agent::start(dir.join("a"), Some(TOKEN));
    server.cli_json(&["dp", "add", "dp1", &agent.url(), "--token", TOKEN, "--group", "all"]);
    let src_arg = src.to_str().expect("UTF-8 test path");
    let id = text(&server.cli_json(&["package", "add", "app", src_arg]), "id").to_owned();
    server.cli_json(&["distribute", &id, "--group", "all"]);
    server.cli_json(&["refresh", &id, "--wait", "--timeout", "60"]);
    write_random_file(&src.join("changed.bin"), 64 << 10, 4243);
    set_old_mtimes(&src);
    server.cli_json(&["refresh", &id, "--wait", "--timeout", "60"]);
    server.wait_installed(&id, "dp1", 2, Duration::from_secs(60), &[agent.daemon()]);
    assert!(server.terminate().success(), "the server stops cleanly{}", log_tails(&[server.daemon()]));
    assert!(agent.terminate().success(), "the agent stops cleanly{}", log_tails(&[agent.daemon()]));

    // The server: a page in the middle of its store.
    let db = server.data_dir.join("dpsync.db");
    let page = garble_middle_sqlite_page(&db);
    let garbled = fs::read(&db).unwrap();
    let err = Server::refuse_to_start(&server.data_dir, &ServerOpts::site(SITE));
    let last = err.lines().last().unwrap_or_default();
    let db_name = db.canonicalize().unwrap().display().to_string();
    assert!(last.starts_with("dpsync: ") && last.contains(&db_name), "page {page}: names {db_name}:\n{err}");
    assert!(last.contains("damaged") && last.contains("backup"), "says what to do:\n{err}");
    assert!(fs::read(&db).unwrap() == garbled, "nothing was written to the damaged store");

    // The agent: a page in the middle of its database.
    let db = agent.data_dir.join("agent.db");
    let page = garble_middle_sqlite_page(&db);
    let err = agent.refuse_to_start();
    let last = err.lines().last().unwrap_or_default();
    let db_name = db.canonicalize().unwrap().display().to_string();
    assert!(last.starts_with("dpsync: ") && last.contains(&db_name), "page {page}: names {db_name}:\n{err}");
    assert!(last.contains("damaged") && last.contains("redistribute"), "says what to do:\n{err}");
}

/// A forged or altered ownership chain cannot take a package over: the DP refuses it
/// (403), keeps no owner for it, and still takes only the owner's versions; a genuine
/// handover is taken, after which the new owner's versions install and the old owner's
/// new ones are refused.
#[test]
fn forged_handovers_are_refused_and_a_genuine_one_is_taken() {
    use dpsync_transfer::trust::Handover;
    let mut f = Fixture::new();
    let intruder = SiteKey::load_or_create(&f.dir.join("intruder.key")).unwrap();
    let heir = SiteKey::load_or_create(&f.dir.join("heir.key")).unwrap();
    let g = f.guard();
    let dp = f.dp.clone();
    let auth = dp.auth();
    let put_owner = |chain: &str| {
        request(dp.addr, "PUT", &format!("/v1/packages/{PKG}/owner"), &[("Authorization", &auth)], chain.as_bytes())
    };
    let forged = intruder.hand_over(PKG, SITE, "EV1", &intruder.public_hex(), 2);
    let mut altered = f.key.hand_over(PKG, SITE, "CH1", &heir.public_hex(), 2);
    altered.to_key = intruder.public_hex();
    let from_elsewhere = intruder.hand_over(PKG, "EV1", "EV2", &intruder.public_hex(), 2);
    for (what, chain) in [
        ("signed by another key", Handover::encode_chain(&[forged])),
        ("altered after signing", Handover::encode_chain(&[altered])),
        ("not starting at the owner", Handover::encode_chain(&[from_elsewhere])),
        ("not a chain", "PS1:nonsense".to_owned()),
    ] {
        let r = put_owner(&chain);
        assert_refused(&r, 403, "", what);
    }
    let unauthenticated = request(dp.addr, "PUT", &format!("/v1/packages/{PKG}/owner"), &[], b"x");
    assert_eq!(unauthenticated.status, 401, "the owner route needs the token");
    assert!(
        !f.agent.data_dir.join("package-owners.json").exists() || {
            let kept = fs::read_to_string(f.agent.data_dir.join("package-owners.json")).unwrap();
            !kept.contains(PKG)
        }
    );
    f.assert_untouched(&g, "forged handovers");

    // The genuine handover to CH1 from version 2.
    let genuine = Handover::encode_chain(&[f.key.hand_over(PKG, SITE, "CH1", &heir.public_hex(), 2)]);
    let r = put_owner(&genuine);
    assert_eq!(r.status, 200, "{}", r.body_text());
    let v2 = v2_with("new.txt", b"from the new owner\n".to_vec());
    let old_owner = dp.offer(&f.key, SITE, PKG, 2, &v2);
    assert_refused(&old_owner, 403, "CH1", "the former owner's new version");
    dp.push(&heir, "CH1", PKG, 2, &v2);
    assert_eq!(f.agent.download(PKG, "new.txt").body, b"from the new owner\n");
}
