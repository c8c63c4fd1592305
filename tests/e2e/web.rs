//! The server's web listener (`--http-listen`) and what operators run it with: the
//! status page in headless Chromium (driven through chromedriver's WebDriver API), its
//! live progress, `/metrics` through a Prometheus parser, the token, the refusal off
//! loopback without one, the agent's own page, systemd readiness, completions and man
//! pages.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use dpsync_testkit::{Daemon, http_get, poll_every, write_random_file};
use serde_json::{Value, json};

use crate::harness::*;

const WAIT: Duration = Duration::from_secs(60);
const TOKEN: &str = "0123456789abcdef0123456789abcdef";

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A site with the web listener on loopback (with a token), two running agents `dp1` and
/// `dp2`, `gone` (a DP nobody listens for), a child site `CH1` with its own DP `branch1`,
/// and a package `Office` distributed to all four targets.
struct WebSite {
    server: Server,
    child: Server,
    agents: Vec<Agent>,
    id: String,
    web: std::net::SocketAddr,
    dir: TestDir,
}

impl WebSite {
    fn start() -> Self {
        let dir = TestDir::new();
        let token_file = dir.join("http-token");
        fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).unwrap();
        let args = ["--http-listen", "127.0.0.1:0", "--http-token-file", s(&token_file), "--retries", "0"];
        let opts = ServerOpts { args: args.iter().map(|a| a.to_string()).collect(), ..ServerOpts::site("PS1") };
        let server = Server::start_with(dir.join("d"), opts);
        let web = fs::read_to_string(dir.join("d/http.addr")).expect("http.addr").trim().parse().unwrap();
        let src = dir.join("src");
        fs::create_dir_all(src.join("sub")).unwrap();
        write_random_file(&src.join("setup.exe"), 300_000, 1);
        write_random_file(&src.join("sub/data.bin"), 100_000, 2);
        let id = text(&server.cli_json(&["package", "add", "Office", s(&src)]), "id").to_owned();
        let mut agents = Vec::new();

        // The child site and its DP, which it assigns the package to when it arrives.
        let child_opts = ServerOpts {
            args: ["--listen", "127.0.0.1:0", "--token", "child-token"].map(String::from).to_vec(),
            ..ServerOpts::site("CH1")
        };
        let child = Server::start_with(dir.join("ch1"), child_opts);
        let branch = Agent::start(dir.join("branch1"), Some("token-branch1"));
        child.cli_json(&["dp", "add", "branch1", &branch.url(), "--token", "token-branch1"]);
        agents.push(branch);
        let child_addr = fs::read_to_string(dir.join("ch1/listen.addr")).expect("listen.addr");
        let fingerprint = fs::read_to_string(dir.join("ch1/tls/fingerprint")).expect("fingerprint");
        let child_url = format!("https://{}", child_addr.trim());
        server.cli_json(&[
            "site",
            "add",
            "CH1",
            &child_url,
            "--token",
            "child-token",
            "--fingerprint",
            fingerprint.trim(),
        ]);

        for name in ["dp1", "dp2"] {
            let token = format!("token-{name}");
            let agent = Agent::start(dir.join(name), Some(&token));
            server.cli_json(&["dp", "add", name, &agent.url(), "--token", &token]);
            agents.push(agent);
        }
        // Port 9 on loopback: nothing listens there, every connection is refused.
        server.cli_json(&["dp", "add", "gone", "http://127.0.0.1:9", "--token", "t"]);
        server.cli_json(&["distribute", &id, "--dp", "dp1", "--dp", "dp2", "--dp", "gone", "--site", "CH1"]);
        server.cli_json(&["refresh", &id]);
        let site = Self { server, child, agents, id, web, dir };
        site.server.wait_status(
            &site.id,
            "dp1, dp2, CH1 and branch1 installed, gone failed",
            WAIT,
            &site.daemons(),
            |st| {
                let state = |n| target_of(st, n)["state"].clone();
                let branch =
                    target_of(st, "CH1")["targets"].as_array().and_then(|t| t.first()).map(|b| b["state"].clone());
                state("dp1") == "installed"
                    && state("dp2") == "installed"
                    && state("CH1") == "installed"
                    && state("gone") == "failed"
                    && branch == Some(json!("installed"))
            },
        );
        site
    }

    fn daemons(&self) -> Vec<&Daemon> {
        let mut d = vec![self.child.daemon()];
        d.extend(self.agents.iter().map(Agent::daemon));
        d
    }

    fn get(&self, path: &str, token: bool) -> dpsync_testkit::HttpResponse {
        let auth = format!("Bearer {TOKEN}");
        let headers: Vec<(&str, &str)> = if token { vec![("authorization", auth.as_str())] } else { vec![] };
        http_get(self.web, path, &headers)
    }
}

// ---------------------------------------------------------------------------------------
// The page in a real browser

#[test]
fn status_page_in_headless_chromium_shows_states_errors_and_live_progress() {
    let Some(browser) = Browser::start() else { return };
    let mut site = WebSite::start();
    let session = browser.session();

    // The token once in the address; the server moves it into a cookie and redirects.
    session.go(&format!("http://{}/?token={TOKEN}", site.web));
    assert_eq!(session.eval("return location.search"), json!(""), "the token left the address bar");
    session.eval("window.dpsyncMarker = 42; return 0");
    let view = session.wait_for("the page to show dp1, dp2 and gone", WAIT, |v| {
        let state = |n: &str| row(v, n).map(|r| r["state"].clone());
        (state("dp1") == Some(json!("installed"))
            && state("dp2") == Some(json!("installed"))
            && state("gone") == Some(json!("failed")))
        .then(|| v.clone())
    });
    assert_eq!(view["packages"], json!([site.id]), "{view:#}");
    let gone = row(&view, "gone").unwrap();
    assert_eq!(gone["pill"], "failed", "the state is shown in words: {gone:#}");
    assert_eq!(gone["group"], "failing");
    let error = gone["error"].as_str().unwrap();
    assert!(error.contains("gone"), "the unreachable DP's error names it: {error}");
    assert!(!gone["age"].as_str().unwrap().is_empty(), "the error's age is shown: {gone:#}");
    assert_eq!(gone["color"], "rgb(180, 35, 24)", "failing is red: {gone:#}");
    assert_eq!(row(&view, "dp1").unwrap()["color"], "rgb(26, 127, 55)", "installed is green");
    assert_eq!(row(&view, "dp1").unwrap()["version"], "v1");
    let first = view["rows"][0]["target"].clone();
    assert_eq!(first, "gone", "failing targets come first: {view:#}");
    let branch = row(&view, "branch1").expect("the child site's DP is shown");
    assert_eq!((branch["state"].as_str(), branch["nested"].as_str()), (Some("installed"), Some("CH1")), "{view:#}");
    assert_eq!(row(&view, "CH1").unwrap()["state"], "installed");
    assert_eq!(view["summary"], json!({"installed": "4", "active": "0", "waiting": "0", "failing": "1"}), "{view:#}");
    assert!(view["heading"].as_str().unwrap().contains("Office"), "{view:#}");

    // A rate-limited transfer of a second package: the page (never reloaded) grows a
    // section for it and shows its progress moving.
    let slow = site.dir.join("slow");
    let agent = Agent::start(site.dir.join("dp3"), Some("token-dp3"));
    site.server.cli_json(&["dp", "add", "dp3", &agent.url(), "--token", "token-dp3", "--rate-limit", "524288"]);
    site.agents.push(agent);
    fs::create_dir_all(&slow).unwrap();
    write_random_file(&slow.join("big.bin"), 8 << 20, 3);
    let big = text(&site.server.cli_json(&["package", "add", "Big", s(&slow)]), "id").to_owned();
    site.server.cli_json(&["distribute", &big, "--dp", "dp3"]);
    site.server.cli_json(&["refresh", &big]);
    let progress_of = |v: &Value| {
        v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["package"] == big.as_str() && r["target"] == "dp3")
            .and_then(|r| r["progress"].as_str().filter(|p| p.contains(" / ")).map(str::to_owned))
    };
    let seen = session.wait_for("dp3's progress to show", WAIT, |v| progress_of(v));
    let moved = session.wait_for("dp3's progress to move", WAIT, |v| progress_of(v).filter(|p| *p != seen));
    assert_ne!(seen, moved);
    assert!(moved.contains("/s") && moved.contains("left"), "rate and time left: {moved}");
    let during = session.view();
    assert_eq!(row(&during, "dp3").unwrap()["state"], "in_progress", "{during:#}");
    assert_eq!(during["summary"]["active"], "1", "{during:#}");
    assert_eq!(during["packages"], json!([site.id, big]), "a section for the new package: {during:#}");
    let shot = session.screenshot(&target_dir().join("web-status.png"));
    eprintln!("screenshot of the status page during a transfer: {}", shot.display());
    assert_eq!(session.eval("return window.dpsyncMarker"), json!(42), "the page was not reloaded");
    session.wait_for("dp3 to be installed on the page", WAIT, |v| {
        (row(v, "dp3").map(|r| r["state"].clone()) == Some(json!("installed"))).then_some(())
    });
    assert_eq!(session.eval("return window.dpsyncMarker"), json!(42), "the page was not reloaded");

    // 5,000 targets: the script keeps one page of rows, pages and filters.
    session.eval(FIVE_THOUSAND_SCRIPT);
    let range = |v: &Value| v.as_str().map(str::to_owned);
    let read = r#"const s = document.querySelector("section.pkg");
        return {range: s.querySelector(".pager .range").textContent, rows: s.querySelectorAll("tr.row").length,
                first: s.querySelector("tr.row").dataset.target, total: document.querySelectorAll("tr.row").length}"#;
    let wait_page = |what: &str, want: &str| {
        let deadline = Instant::now() + WAIT;
        loop {
            let v = session.eval(read);
            if range(&v["range"]).as_deref() == Some(want) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}: {v:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let v = wait_page("5,000 targets", "1–50 of 5000");
    assert_eq!((v["rows"].as_u64(), v["first"].as_str()), (Some(50), Some("dp0007")), "failing first: {v:#}");
    assert!(v["total"].as_u64().unwrap() <= 60, "one page of rows: {v:#}");
    session.eval(r#"document.querySelector("section.pkg .pager .next").click(); return 0"#);
    let v = wait_page("the second page", "51–100 of 5000");
    assert_eq!(v["rows"], 50);
    session.eval(
        r#"const f = document.getElementById("filter"); f.value = "dp4321";
           f.dispatchEvent(new Event("input")); return 0"#,
    );
    let v = wait_page("the filter", "1–1 of 1");
    assert_eq!(v["first"], "dp4321");
    session.screenshot(&target_dir().join("web-status-5000.png"));
}

/// Replaces the page's data source with 5,000 targets of one package (one of them failed,
/// the rest installed), so that the next poll renders them.
const FIVE_THOUSAND_SCRIPT: &str = r#"
const targets = [];
for (let i = 0; i < 5000; i++) {
  const name = "dp" + String(i).padStart(4, "0");
  targets.push({ name, kind: "dp", state: i === 7 ? "failed" : "installed", installed_version: 1, desired_version: 1,
                 last_error: i === 7 ? "connection refused" : null, updated_at: Date.now(), progress: null });
}
const body = JSON.stringify([{ package: "PS1ABCDE", name: "Many", source_site: "PS1", source_version: 1,
                               content_root: "ab".repeat(32), targets }]);
window.fetch = async () => new Response(body, { status: 200, headers: { "content-type": "application/json" } });
return 0;
"#;

/// The row of `target` in a [`Session::view`], if shown.
fn row<'a>(view: &'a Value, target: &str) -> Option<&'a Value> {
    view["rows"].as_array()?.iter().find(|r| r["target"] == target)
}

/// What the page shows, read from its DOM.
const VIEW_SCRIPT: &str = r#"
const text = (e) => (e ? e.textContent : null);
return {
  packages: [...document.querySelectorAll("section.pkg")].map((s) => s.dataset.package),
  heading: text(document.querySelector("section.pkg h2")),
  summary: { installed: text(document.getElementById("n-installed")), active: text(document.getElementById("n-active")),
             waiting: text(document.getElementById("n-waiting")), failing: text(document.getElementById("n-failing")) },
  rows: [...document.querySelectorAll("tr.row")].map((r) => ({
    package: r.closest("section").dataset.package,
    target: r.dataset.target, state: r.dataset.state, group: r.dataset.group,
    nested: r.classList.contains("nested") ? r.closest("tbody").dataset.name : null,
    pill: text(r.querySelector(".pill")), color: getComputedStyle(r.querySelector(".pill")).color,
    version: text(r.querySelector("td.ver")), progress: text(r.querySelector(".ptext")),
    error: text(r.querySelector(".etext")), age: text(r.querySelector(".eage")),
  })),
};
"#;

/// `target/` of this workspace (where the screenshot goes).
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// chromedriver with headless Chromium, or `None` (the test is skipped, saying why)
/// when they are not installed; under `CI=true` their absence fails the test.
struct Browser {
    driver: Daemon,
    chromium: PathBuf,
    url: String,
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
    _dir: TestDir,
}

fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).flat_map(|d| names.iter().map(move |n| d.join(n))).find(|p| p.is_file())
}

impl Browser {
    fn start() -> Option<Self> {
        let (chromium, driver) = (find_program(&["chromium", "chromium-browser"]), find_program(&["chromedriver"]));
        let (Some(chromium), Some(driver)) = (chromium, driver) else {
            let why = "Chromium and chromedriver are needed (Debian: apt-get install chromium chromium-driver)";
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{why}; .ci/run installs them");
            }
            eprintln!("skipping the browser test: {why}");
            return None;
        };
        let dir = TestDir::new();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut cmd = Command::new(&driver);
        cmd.arg(format!("--port={port}"));
        let driver = Daemon::start("chromedriver", cmd, &dir.join("chromedriver.log"));
        let url = format!("http://127.0.0.1:{port}");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap();
        let browser = Self { driver, chromium, url, rt, http, _dir: dir };
        let ready = poll_every(Duration::from_millis(100), Duration::from_secs(20), || {
            browser.call("GET", "/status", None).ok().filter(|v| v["ready"] == true)
        });
        assert!(ready.is_some(), "chromedriver did not get ready:\n{}", browser.driver.log_tail(20));
        Some(browser)
    }

    /// One WebDriver call; `Err` with the driver's message when it answers an error.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.rt.block_on(async {
            let url = format!("{}{path}", self.url);
            let req = match method {
                "GET" => self.http.get(url),
                "DELETE" => self.http.delete(url),
                _ => self.http.post(url).json(&body.unwrap_or(json!({}))),
            };
            let resp = req.send().await.map_err(|e| e.to_string())?;
            let status = resp.status();
            let v: Value = resp.json().await.map_err(|e| e.to_string())?;
            if status.is_success() { Ok(v["value"].clone()) } else { Err(format!("{status}: {}", v["value"])) }
        })
    }

    fn session(&self) -> Session<'_> {
        let chromium = self.chromium.to_str().expect("a UTF-8 path");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--window-size=1280,800", "--hide-scrollbars", "--force-device-scale-factor=1"],
            },
        }}});
        let v = self
            .call("POST", "/session", Some(caps))
            .unwrap_or_else(|e| panic!("cannot start headless Chromium: {e}\n{}", self.driver.log_tail(30)));
        let id = v["sessionId"].as_str().expect("a session id").to_owned();
        Session { browser: self, id }
    }
}

struct Session<'a> {
    browser: &'a Browser,
    id: String,
}

impl Session<'_> {
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}{path}", self.id);
        self.browser.call(method, &path, body).unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    fn go(&self, url: &str) {
        self.call("POST", "/url", Some(json!({ "url": url })));
    }

    fn eval(&self, script: &str) -> Value {
        self.call("POST", "/execute/sync", Some(json!({ "script": script, "args": [] })))
    }

    fn view(&self) -> Value {
        self.eval(VIEW_SCRIPT)
    }

    /// Polls the page's DOM until `probe` finds what it waits for; panics after `timeout`
    /// with the last view.
    fn wait_for<T>(&self, what: &str, timeout: Duration, mut probe: impl FnMut(&Value) -> Option<T>) -> T {
        let start = Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < timeout {
            last = self.view();
            if let Some(t) = probe(&last) {
                return t;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("timed out after {timeout:?} waiting for {what}; the page showed:\n{last:#}");
    }

    fn screenshot(&self, path: &Path) -> PathBuf {
        let b64 = self.call("GET", "/screenshot", None);
        let png = base64_decode(b64.as_str().expect("base64 text"));
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, png).unwrap();
        path.to_owned()
    }
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        let _ = self.browser.call("DELETE", &format!("/session/{}", self.id), None);
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c:?}"),
    };
    let digits: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, d)| acc | (u32::from(*d) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

#[test]
fn base64_decodes_what_webdriver_sends() {
    assert_eq!(base64_decode("aGVsbG8gd29ybGQ="), b"hello world");
    assert_eq!(base64_decode("iVBORw=="), b"\x89PNG");
}

// ---------------------------------------------------------------------------------------
// The listener without a browser

#[test]
fn web_listener_serves_status_and_metrics_only_with_its_token() {
    let site = WebSite::start();

    // No token, a wrong one: refused with what to do.
    for path in ["/", "/v1/status", "/metrics", "/static/status.js"] {
        let r = site.get(path, false);
        assert_eq!(r.status, 401, "{path} without the token: {}", r.body_text());
        assert!(r.body_text().contains("open /?token=TOKEN"), "{}", r.body_text());
    }
    let wrong = http_get(site.web, "/v1/status", &[("authorization", "Bearer nope")]);
    assert_eq!((wrong.status, wrong.body_text().starts_with("wrong token")), (401, true));
    let wrong = http_get(site.web, "/?token=nope", &[]);
    assert_eq!(wrong.status, 401);
    // The token in the address becomes an HttpOnly cookie, and the address loses it.
    let r = http_get(site.web, &format!("/?token={TOKEN}"), &[]);
    assert_eq!((r.status, r.header("location")), (303, Some("/")));
    let cookie = r.header("set-cookie").expect("a cookie");
    assert!(cookie.starts_with("dpsync_token=") && cookie.contains("HttpOnly"), "{cookie}");
    assert!(!cookie.contains(TOKEN), "the browser does not keep the token itself: {cookie}");
    let value = cookie.split(';').next().unwrap();
    let forged = http_get(site.web, "/", &[("cookie", &format!("dpsync_token={TOKEN}"))]);
    assert_eq!(forged.status, 401, "the token is not the cookie");
    let page = http_get(site.web, "/", &[("cookie", value)]);
    assert_eq!(page.status, 200);
    assert!(page.header("content-security-policy").is_some_and(|c| c.contains("script-src 'self'")));
    let html = page.body_text();
    for needle in
        [site.id.as_str(), "data-target=\"dp1\" data-state=\"installed\"", "data-target=\"gone\" data-state=\"failed\""]
    {
        assert!(html.contains(needle), "the page lacks {needle}:\n{html}");
    }

    // /v1/status is `status --json` for every package.
    let all: Value = serde_json::from_slice(&site.get("/v1/status", true).body).unwrap();
    let one = site.server.status(&site.id);
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all:#}");
    assert_eq!(all[0]["package"], one["package"]);
    assert_eq!(all[0]["targets"].as_array().unwrap().len(), 4);
    assert_eq!(all[0]["targets"][0]["name"], "CH1");
    assert_eq!(all[0]["targets"][0]["targets"][0]["name"], "branch1", "child sites carry their own targets");
    assert_eq!(all[0]["last_refresh"]["ok"], true, "{all:#}");

    // /metrics through a Prometheus text parser, with per-target series.
    let text = site.get("/metrics", true).body_text();
    let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text");
    let value = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .map(|x| x.value.clone())
            .unwrap_or_else(|| panic!("no {name}{labels:?} in\n{text}"))
    };
    use prometheus_parse::Value::{Counter, Gauge};
    let pkg = site.id.as_str();
    let on = |t: &'static str| [("package", pkg), ("target", t)];
    assert_eq!(value("dpsync_site_target_installed_version", &on("dp1")), Gauge(1.0));
    assert_eq!(value("dpsync_site_target_installed_version", &on("dp2")), Gauge(1.0));
    assert_eq!(value("dpsync_site_target_state", &[("target", "dp1"), ("state", "installed")]), Gauge(1.0));
    assert_eq!(value("dpsync_site_target_state", &[("target", "gone"), ("state", "failed")]), Gauge(1.0));
    assert_eq!(value("dpsync_site_target_consecutive_failures", &on("gone")), Gauge(1.0));
    assert_eq!(value("dpsync_site_target_consecutive_failures", &on("dp1")), Gauge(0.0));
    let Counter(sent) = value("dpsync_site_target_bytes_sent_total", &on("dp1")) else { panic!("a counter") };
    assert!(sent > 100_000.0, "{sent}");
    let Gauge(success) = value("dpsync_site_target_last_success_timestamp_seconds", &on("dp1")) else { panic!() };
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(success > now - 120.0 && success <= now + 1.0, "{success} vs {now}");
    assert!(!text.contains(&format!("target_last_success_timestamp_seconds{{package=\"{pkg}\",target=\"gone\"}}")));
    assert_eq!(value("dpsync_site_package_last_refresh_success", &[("package", pkg)]), Gauge(1.0));
    assert!(matches!(
        value("dpsync_site_refresh_phase_duration_seconds", &[("phase", "scan")]),
        prometheus_parse::Value::Histogram(_)
    ));
    assert!(matches!(
        value("dpsync_site_job_duration_seconds", &[("kind", "dp"), ("outcome", "installed")]),
        prometheus_parse::Value::Histogram(_)
    ));
    assert!(matches!(value("dpsync_site_disk_free_bytes", &[]), Gauge(f) if f > 0.0));

    // The agent's page: what it holds, without a token.
    let agent = &site.agents[1];
    let page = agent.get("/", &[]);
    assert_eq!(page.status, 200, "{}", page.body_text());
    let html = page.body_text();
    assert!(html.contains(&format!("<tr data-package=\"{pkg}\">")) && html.contains("v1"), "{html}");
    assert!(html.contains("400.0 KiB") || html.contains("390.6 KiB"), "the package's size: {html}");
    assert!(html.contains("never"), "not validated yet: {html}");
    site.server.cli_json(&["validate", pkg, "--dp", "dp1"]);
    let html = agent.get("/", &[]).body_text();
    assert!(html.contains("all files intact"), "{html}");
    let metrics = agent.get("/metrics", &[]).body_text();
    for line in [
        "dpsync_agent_validations_total 1",
        "dpsync_agent_validation_failures_total 0",
        "dpsync_agent_chunks_rejected_total 0",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no {line:?} in\n{metrics}");
    }
    assert!(metrics.contains("dpsync_agent_disk_free_bytes "), "{metrics}");

    // The alert rules and the dashboard use only series that exist.
    let exported: std::collections::HashSet<&str> = text
        .lines()
        .chain(metrics.lines())
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    for file in ["alerts.yml", "grafana-dashboard.json"] {
        let doc = fs::read_to_string(docs.join(file)).unwrap();
        let mut used = 0;
        for (at, _) in doc.match_indices("dpsync_") {
            let name: String =
                doc[at..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit()).collect();
            if name.starts_with("dpsync_site_") || name.starts_with("dpsync_agent_") {
                assert!(exported.contains(name.as_str()), "docs/{file} uses {name}, which no listener exports");
                used += 1;
            }
        }
        assert!(used > 10, "docs/{file} uses dpsync's series");
    }
}

#[test]
fn web_listener_off_loopback_needs_a_private_token_file_and_serves_tls() {
    let dir = TestDir::new();
    let opts =
        |args: &[&str]| ServerOpts { args: args.iter().map(|a| a.to_string()).collect(), ..ServerOpts::site("PS1") };
    let e = Server::refuse_to_start(dir.join("d"), &opts(&["--http-listen", "0.0.0.0:0"]));
    assert!(
        e.contains("http_listen: 0.0.0.0:0 is not a loopback address, so the status page needs a token")
            && e.contains("--http-token-file"),
        "{e}"
    );
    assert_eq!(e.trim().lines().count(), 1, "one line: {e}");
    let token = dir.join("token");
    fs::write(&token, TOKEN).unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
    let e =
        Server::refuse_to_start(dir.join("d"), &opts(&["--http-listen", "0.0.0.0:0", "--http-token-file", s(&token)]));
    assert!(e.contains("is readable by others; run `chmod 600"), "{e}");

    // With a private token file it starts, and serves TLS with the data directory's
    // self-signed certificate (reached here over loopback).
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    let server =
        Server::start_with(dir.join("d"), opts(&["--http-listen", "0.0.0.0:0", "--http-token-file", s(&token)]));
    let bound: std::net::SocketAddr = fs::read_to_string(dir.join("d/http.addr")).unwrap().trim().parse().unwrap();
    assert!(bound.ip().is_unspecified(), "{bound}");
    let port = bound.port();
    let plain = dpsync_testkit::try_http_get(([127, 0, 0, 1], port).into(), "/v1/status", &[]);
    assert!(plain.is_err() || plain.is_ok_and(|r| r.status != 200 && r.status != 401), "no plain HTTP off loopback");
    let cert = fs::read(dir.join("d/tls/cert.pem")).expect("the self-signed certificate");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (status, body) = rt.block_on(async {
        let client = reqwest::Client::builder()
            .tls_certs_only([reqwest::Certificate::from_pem(&cert).unwrap()])
            .build()
            .unwrap();
        let url = format!("https://127.0.0.1:{port}/v1/status");
        let denied = client.get(&url).send().await.expect("a TLS answer");
        assert_eq!(denied.status(), 401);
        let r = client.get(&url).bearer_auth(TOKEN).send().await.expect("a TLS answer");
        (r.status(), r.text().await.unwrap())
    });
    assert_eq!((status.as_u16(), body.as_str()), (200, "[]"));
    drop(server);
}

// ---------------------------------------------------------------------------------------
// Running as a service

/// Datagrams the daemon sent to its `NOTIFY_SOCKET`, until `want` arrived.
fn expect_notification(sock: &std::os::unix::net::UnixDatagram, want: &str, daemon: &Daemon) {
    let mut buf = [0u8; 512];
    let deadline = Instant::now() + WAIT;
    let mut got = Vec::new();
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.lines().any(|l| l == want) {
                return;
            }
            got.push(msg);
        }
    }
    panic!("no {want} on NOTIFY_SOCKET (got {got:?}){}", log_tails(&[daemon]));
}

/// The command line and environment of `contrib/systemd/UNIT`, with the unit's paths
/// moved under `root`: the binary under test for `/usr/local/bin/dpsync`, and
/// `root/etc/dpsync`, `root/var/lib`, `root/run` for the unit's folders (`etc` holding
/// copies of the example configuration files in `contrib/systemd`).
fn unit_command(unit: &str, root: &Path) -> Command {
    let contrib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../contrib/systemd");
    let etc = root.join("etc/dpsync");
    fs::create_dir_all(&etc).unwrap();
    for example in ["server.toml", "agent.toml"] {
        fs::copy(contrib.join(example), etc.join(example)).unwrap();
    }
    let relocate = |v: &str| -> String {
        for (from, to) in [
            ("/usr/local/bin/dpsync", PathBuf::from(DPSYNC)),
            ("/etc/dpsync", etc.clone()),
            ("/var/lib", root.join("var/lib")),
            ("/run", root.join("run")),
        ] {
            if let Some(rest) = v.strip_prefix(from) {
                return format!("{}{rest}", to.display());
            }
        }
        v.to_owned()
    };
    let text = fs::read_to_string(contrib.join(unit)).unwrap();
    let mut exec = None;
    let mut env = Vec::new();
    for line in text.lines() {
        if let Some(kv) = line.strip_prefix("Environment=") {
            let (k, v) = kv.split_once('=').expect("Environment=KEY=VALUE");
            env.push((k.to_owned(), relocate(v)));
        } else if let Some(cmd) = line.strip_prefix("ExecStart=") {
            exec = Some(cmd.split_whitespace().map(relocate).collect::<Vec<_>>());
        }
    }
    assert!(text.lines().any(|l| l == "Type=notify"), "{unit} is Type=notify");
    let exec = exec.unwrap_or_else(|| panic!("no ExecStart in {unit}"));
    let mut cmd = Command::new(&exec[0]);
    cmd.args(&exec[1..]).env_clear().env("PATH", "/usr/bin:/bin").envs(env);
    cmd
}

#[test]
fn the_systemd_units_start_daemons_that_report_ready_and_stopping() {
    let dir = TestDir::new();
    let path = dir.join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();

    // The server as its unit starts it (the example server.toml's port made free).
    let mut cmd = unit_command("dpsync-server.service", dir.path());
    cmd.env("NOTIFY_SOCKET", &path).env("DPSYNC_HTTP_LISTEN", "127.0.0.1:0");
    let mut server = Daemon::start("server (unit)", cmd, &dir.join("server.log"));
    expect_notification(&sock, "READY=1", &server);
    // Ready means serving: the status page and the admin socket answer at once.
    let data = dir.join("var/lib/dpsync");
    let web = fs::read_to_string(data.join("http.addr")).unwrap().trim().parse().unwrap();
    assert_eq!(http_get(web, "/v1/status", &[]).status, 200);
    let socket = dir.join("run/dpsync/admin.sock");
    let info = run_bounded(dpsync_command().args(["info", "--json", "--socket", s(&socket)]), CLI_TIMEOUT);
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    server.stop();
    expect_notification(&sock, "STOPPING=1", &server);

    // The agent as its unit starts it, on a free loopback port with a token of its own.
    let token = dir.join("token");
    fs::write(&token, TOKEN).unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    let mut cmd = unit_command("dpsync-agent.service", dir.path());
    cmd.env("NOTIFY_SOCKET", &path)
        .env("DPSYNC_LISTEN", "127.0.0.1:0")
        .env("DPSYNC_TOKEN_FILE", &token)
        .env("DPSYNC_INSECURE_HTTP", "true");
    let mut agent = Daemon::start("agent (unit)", cmd, &dir.join("agent.log"));
    expect_notification(&sock, "READY=1", &agent);
    let addr = fs::read_to_string(dir.join("var/lib/dpsync-agent/listen.addr")).unwrap().trim().parse().unwrap();
    assert_eq!(http_get(addr, "/v1/hello", &[]).status, 200, "ready means serving");
    agent.stop();
    expect_notification(&sock, "STOPPING=1", &agent);
}

#[test]
fn completions_and_man_pages_come_from_the_command_line_definitions() {
    for (shell, marker) in [("bash", "_dpsync()"), ("zsh", "#compdef dpsync"), ("fish", "complete -c dpsync")] {
        let out = run_bounded(dpsync_command().args(["completions", shell]), CLI_TIMEOUT);
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && script.contains(marker), "{shell}: {script:.300}");
        assert!(script.contains("http-listen") && script.contains("refresh"), "{shell} knows the commands and flags");
    }
    let out = run_bounded(dpsync_command().args(["completions", "tcsh"]), CLI_TIMEOUT);
    assert!(!out.status.success(), "an unknown shell is refused");

    let dir = TestDir::new();
    let man = dir.join("man1");
    let out = run_bounded(dpsync_command().args(["man", s(&man), "--json"]), CLI_TIMEOUT);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let pages: Vec<&str> = listed["pages"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for page in ["dpsync.1", "dpsync-server.1", "dpsync-agent.1", "dpsync-refresh.1", "dpsync-dp-add.1"] {
        assert!(pages.contains(&page), "{page} in {pages:?}");
    }
    let server = fs::read_to_string(man.join("dpsync-server.1")).unwrap();
    assert!(server.starts_with(".ie") || server.contains(".TH dpsync-server 1"), "{server:.200}");
    assert!(server.contains("http\\-listen"), "the server's page documents its flags");
}
