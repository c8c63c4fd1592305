//! The command line as a new administrator meets it: wording for one target, a
//! `distribute` before the first version, a reader that stops reading (`| head -1`),
//! file names with control characters in error messages, the explanation of a re-read
//! file, and `/metrics` of the site and an agent read by a Prometheus parser.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use prometheus_parse::{Scrape, Value as Sample};

use crate::harness::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A server with package `app` over `DIR/src` and, if asked, one DP `dp1`.
struct OneDp {
    server: Server,
    agent: Option<Agent>,
    src: PathBuf,
    id: String,
    // Last, so that the daemons are stopped before their directories are removed.
    _dir: TestDir,
}

impl OneDp {
    fn new(with_dp: bool) -> Self {
        let dir = TestDir::new();
        let src = dir.join("src");
        fs::create_dir_all(&src).unwrap();
        let server = Server::start(dir.join("d"), "PS1");
        let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
        let agent = with_dp.then(|| {
            let agent = Agent::start(dir.join("a1"), Some("token-dp1"));
            server.cli_json(&["dp", "add", "dp1", &agent.url(), "--token", "token-dp1"]);
            agent
        });
        Self { server, agent, src, id, _dir: dir }
    }

    /// Runs the CLI (no `--json`) and asserts exit 0; returns (stdout, stderr).
    fn ok(&self, args: &[&str]) -> (String, String) {
        let out = self.server.cli(args);
        let (stdout, stderr) = texts(&out);
        assert!(out.status.success(), "`dpsync {}` failed ({}):\n{stdout}\n{stderr}", args.join(" "), out.status);
        (stdout, stderr)
    }
}

fn texts(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Fails if `text` counts one of something in the plural ("1 targets").
fn assert_no_false_plural(text: &str) {
    for noun in ["targets", "files", "packages", "versions", "objects", "damaged files"] {
        assert!(!text.contains(&format!(" 1 {noun}")), "\"1 {noun}\" in:\n{text}");
    }
}

#[test]
fn distribute_before_the_first_refresh_says_there_is_no_version_yet() {
    let site = OneDp::new(true);
    let (out, _) = site.ok(&["distribute", &site.id, "--dp", "dp1"]);
    assert!(out.contains("no version yet: run `dpsync refresh PS100001` to send the first one"), "{out}");
    assert!(!out.contains("version 0"), "{out}");

    // Nothing to wait for: `--wait` returns at once instead of waiting for a version 0.
    let started = Instant::now();
    let (out, _) = site.ok(&["distribute", &site.id, "--dp", "dp1", "--wait", "--timeout", "30"]);
    assert!(out.contains("no version yet"), "{out}");
    assert!(started.elapsed() < Duration::from_secs(20), "--wait waited for a version that does not exist");
    let status = site.server.cli_json(&["distribute", &site.id, "--dp", "dp1", "--wait"]);
    assert_eq!(text(&status, "package"), site.id, "--json --wait prints the status document: {status:#}");

    let (out, _) = site.ok(&["status", &site.id]);
    assert!(out.contains("no version yet"), "{out}");
    assert!(!out.contains("version 0"), "{out}");
    let (out, _) = site.ok(&["package", "show", &site.id]);
    assert!(out.contains("none yet"), "{out}");
}

#[test]
fn one_target_one_file_one_package_are_singular() {
    let site = OneDp::new(true);
    site.ok(&["distribute", &site.id, "--dp", "dp1"]);
    fs::write(site.src.join("only.txt"), b"one file\n").unwrap();
    set_old_mtimes(&site.src);

    let (out, err) = site.ok(&["refresh", &site.id, "--wait", "--timeout", "60"]);
    assert!(out.contains("(1 file, "), "{out}");
    assert!(out.contains(" in 1 file, "), "{out}");
    assert!(out.contains("queued for 1 target\n"), "{out}");
    assert!(err.contains("PS100001 version 1 is on 1 target ("), "{err}");
    assert_no_false_plural(&out);
    assert_no_false_plural(&err);
    // Not a terminal: the progress lines keep their plain `NAME STATE vN` form.
    assert!(err.lines().any(|l| l.starts_with("dp1 ") && l.contains("installed") && l.contains("v1")), "{err}");

    let (out, _) = site.ok(&["validate", &site.id]);
    assert!(out.contains("ok (1 file checked)"), "{out}");
    let (out, _) = site.ok(&["info"]);
    assert!(out.contains(", 1 package, "), "{out}");
    let (out, _) = site.ok(&["status", &site.id]);
    assert!(out.contains("version 1  root "), "{out}");
    assert_no_false_plural(&out);
}

/// `dpsync … | head -1`: the reader closes the pipe before the command writes.
#[test]
fn a_reader_that_stops_reading_ends_the_command_quietly() {
    let site = OneDp::new(false);
    fs::write(site.src.join("a.txt"), b"a\n").unwrap();
    set_old_mtimes(&site.src);
    site.server.cli_json(&["refresh", &site.id]);
    for args in [
        vec!["status", site.id.as_str()],
        vec!["status"],
        vec!["package", "list"],
        vec!["refresh", site.id.as_str()],
        vec!["status", site.id.as_str(), "--json"],
    ] {
        let mut child =
            site.server.cli_command(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn dpsync");
        drop(child.stdout.take());
        let deadline = Instant::now() + CLI_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("`dpsync {}` did not exit within {CLI_TIMEOUT:?}", args.join(" "));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        // The command has exited: its few lines of stderr are all in the pipe.
        let mut stderr = String::new();
        child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
        assert!(!stderr.contains("panicked"), "`dpsync {}` panicked:\n{stderr}", args.join(" "));
        assert!(stderr.is_empty(), "`dpsync {}` printed:\n{stderr}", args.join(" "));
        assert!(status.success(), "`dpsync {}` exited with {status}", args.join(" "));
    }
}

#[test]
fn names_with_control_characters_are_escaped_in_the_one_line_reason() {
    let site = OneDp::new(false);
    fs::write(site.src.join("good.txt"), b"good\n").unwrap();
    // A FIFO cannot be published anyway; its name holds a newline and a tab.
    mkfifo(&site.src.join("a\nb.txt"));
    mkfifo(&site.src.join("tab\there"));
    set_old_mtimes(&site.src);
    // cli_fail asserts exit 1 and exactly one line on stderr.
    let line = site.server.cli_fail(&["refresh", &site.id]);
    assert!(line.contains(r"a\nb.txt"), "{line}");
    assert!(line.contains(r"tab\there"), "{line}");
    assert!(!line.chars().any(char::is_control), "{line:?}");

    let out = site.server.cli(&["refresh", &site.id, "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert!(doc["error"].as_str().unwrap().contains(r"a\nb.txt"), "{doc}");
}

#[test]
fn a_file_re_read_only_for_its_recent_timestamp_is_explained() {
    let site = OneDp::new(false);
    let path = site.src.join("fresh.txt");
    fs::write(&path, b"fresh\n").unwrap();
    // A timestamp that stays "too recent" at every scan (a clock ahead of this host's,
    // on a network share): each refresh reads the file again, and says why.
    let ahead = SystemTime::now() + Duration::from_secs(3600);
    fs::File::options().write(true).open(&path).unwrap().set_modified(ahead).unwrap();
    let first = site.server.cli_json(&["refresh", &site.id]);
    assert_eq!(num(&first, "files_recent"), 0, "a new file is read because it is new: {first:#}");
    let again = site.server.cli_json(&["refresh", &site.id]);
    assert_eq!(num(&again, "files_read"), 1, "{again:#}");
    assert_eq!(num(&again, "files_recent"), 1, "{again:#}");
    assert_eq!(num(&again, "files_changed"), 0, "{again:#}");
    // Same content: the version shares the stored manifest.
    assert_eq!((&again["unchanged_fast"], &again["manifest_stored"]), (&false.into(), &false.into()), "{again:#}");
    let window = num(&again, "recent_window_ms");
    assert!(window > 0, "{again:#}");
    let (out, _) = site.ok(&["refresh", &site.id]);
    assert!(
        out.contains(&format!(
            "re-read 1 file modified within {window} ms of the previous refresh (timestamps that recent can hide a change)"
        )),
        "{out}"
    );

    // With ordinary timestamps nothing is read, and nothing needs explaining.
    set_old_mtime(&path);
    let read = site.server.cli_json(&["refresh", &site.id]);
    assert_eq!((num(&read, "files_read"), &read["manifest_stored"]), (1, &true.into()), "{read:#}");
    let fast = site.server.cli_json(&["refresh", &site.id]);
    assert_eq!((num(&fast, "files_read"), &fast["unchanged_fast"]), (0, &true.into()), "{fast:#}");
    let (out, _) = site.ok(&["refresh", &site.id]);
    assert!(out.contains("hashed 0 B in 0 files"), "{out}");
    assert!(!out.contains("re-read"), "{out}");
}

/// `GET /metrics` on the server's admin socket.
fn admin_metrics(socket: &Path) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect to the admin socket");
    s.set_read_timeout(Some(CLI_TIMEOUT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: dpsync\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    body.to_owned()
}

fn scrape(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{text}"))
}

/// The value of the sample `name` with `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Sample {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| x.value.clone())
        .unwrap_or_else(|| panic!("no {name}{labels:?} among {:#?}", s.samples))
}

#[test]
fn metrics_of_the_site_and_the_agent_parse_as_prometheus_text() {
    let site = OneDp::new(true);
    site.ok(&["distribute", &site.id, "--dp", "dp1"]);
    fs::write(site.src.join("a.txt"), vec![7u8; 10_000]).unwrap();
    set_old_mtimes(&site.src);
    site.ok(&["refresh", &site.id, "--wait", "--timeout", "60"]);

    let site_metrics = scrape(&admin_metrics(&site.server.socket()));
    assert_eq!(value(&site_metrics, "dpsync_site_refreshes_total", &[]), Sample::Counter(1.0));
    assert_eq!(value(&site_metrics, "dpsync_site_bytes_hashed_total", &[]), Sample::Counter(10_000.0));
    match value(&site_metrics, "dpsync_site_jobs_succeeded_total", &[]) {
        Sample::Counter(n) => assert!(n >= 1.0, "the job to dp1 succeeded"),
        other => panic!("not a counter: {other:?}"),
    }
    assert_eq!(value(&site_metrics, "dpsync_site_packages", &[]), Sample::Gauge(1.0));
    assert_eq!(value(&site_metrics, "dpsync_site_package_version", &[("package", &site.id)]), Sample::Gauge(1.0));
    assert_eq!(
        value(&site_metrics, "dpsync_site_distributions", &[("kind", "dp"), ("state", "installed")]),
        Sample::Gauge(1.0)
    );

    let agent = site.agent.as_ref().unwrap();
    let r = agent.get("/metrics", &[]);
    assert_eq!(r.status, 200, "{}", r.body_text());
    let agent_metrics = scrape(&r.body_text());
    assert_eq!(value(&agent_metrics, "dpsync_agent_installs_total", &[]), Sample::Counter(1.0));
    assert_eq!(value(&agent_metrics, "dpsync_agent_files_served_total", &[]), Sample::Counter(0.0));
    assert_eq!(value(&agent_metrics, "dpsync_agent_package_version", &[("package", &site.id)]), Sample::Gauge(1.0));
    match value(&agent_metrics, "dpsync_agent_chunk_bytes_received_total", &[]) {
        Sample::Counter(n) => assert!(n > 0.0, "chunks were received"),
        other => panic!("not a counter: {other:?}"),
    }
}
