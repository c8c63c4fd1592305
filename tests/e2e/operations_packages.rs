//! Operating packages: `package set` (name, source, priority, refresh schedule),
//! `package delete`, scheduled refreshes, JSON logs, and the regression tests of pruning
//! and of `refresh --dry-run` after a rollback.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;

/// Longest a distribution step may take in these tests.
const WAIT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A server on `DIR/d` (with `server_args`) and a package `app` over `DIR/src` holding
/// `a.txt` and `b.txt`.
struct Fixture {
    server: Server,
    src: PathBuf,
    id: String,
    // Last, so that the daemons are stopped before their directories are removed.
    dir: TestDir,
}

fn fixture(server_args: &[&str]) -> Fixture {
    let dir = TestDir::new();
    let src = dir.join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("a.txt"), b"alpha one\n").unwrap();
    fs::write(src.join("b.txt"), b"bravo stays the same\n").unwrap();
    let opts = ServerOpts { args: server_args.iter().map(|a| a.to_string()).collect(), ..ServerOpts::site("PS1") };
    let server = Server::start_with(dir.join("d"), opts);
    let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    Fixture { server, src, id, dir }
}

/// Every line of a daemon's log parsed as JSON; panics naming the first that is not.
fn json_lines(what: &str, log: &str) -> Vec<Value> {
    log.lines()
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .unwrap_or_else(|e| panic!("a line of the {what} log is not JSON ({e}): {line:?}\n--- log\n{log}"))
        })
        .collect()
}

#[test]
fn log_format_json_makes_every_daemon_line_json() {
    let f = fixture(&["--log-format", "json"]);
    // The agent takes it from its TOML file.
    let config = f.dir.join("agent.toml");
    fs::write(&config, "log_format = \"json\"\n").unwrap();
    let mut agent = Agent::start_with(f.dir.join("a1"), Some("t1"), &["--config", s(&config)]);
    f.server.cli_json(&["dp", "add", "dp1", &agent.url(), "--token", "t1"]);
    f.server.cli_json(&["distribute", &f.id, "--dp", "dp1"]);
    f.server.cli_json(&["refresh", &f.id]);
    f.server.wait_installed(&f.id, "dp1", 1, WAIT, &[agent.daemon()]);
    // A warning with fields: a target that is down.
    agent.terminate();
    fs::write(f.src.join("a.txt"), b"alpha two\n").unwrap();
    f.server.cli_json(&["refresh", &f.id]);
    f.server.wait_status(&f.id, "dp1 to be retried", WAIT, &[], |s| target_of(s, "dp1")["state"] == "retrying");
    let mut server = f.server;
    server.terminate();

    let lines = json_lines("server", &server.log());
    assert!(lines.len() >= 4, "too few log lines: {lines:?}");
    for l in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(l[key].is_string(), "{key} missing in {l}");
        }
    }
    assert!(lines.iter().any(|l| l["message"] == "dpsync server ready" && l["site"] == "PS1"), "{lines:#?}");
    assert!(
        lines.iter().any(|l| l["level"] == "INFO" && l["message"] == "refresh committed" && l["version"] == 2),
        "a number field keeps its type: {lines:#?}"
    );
    assert!(lines.iter().any(|l| l["level"] == "WARN" && l["target"].is_string() && l["package"] == f.id.as_str()));

    let lines = json_lines("agent", &agent.log());
    assert!(lines.len() >= 2, "too few agent log lines: {lines:?}");
    assert!(lines.iter().all(|l| l["level"].is_string() && l["message"].is_string()), "{lines:#?}");

    // A wrong value is refused naming the setting and where it came from.
    fs::write(&config, "log_format = \"yaml\"\n").unwrap();
    let err = agent.refuse_to_start();
    assert!(err.contains("log_format") && err.contains("agent.toml"), "{err}");
}

/// `gc` and the pruning at each refresh agree with `keep_versions`: a removal queued for a
/// DP that is down does not keep the version it was asked at.
#[test]
fn a_removal_queued_for_a_down_dp_does_not_keep_old_versions() {
    let f = fixture(&["--keep-versions", "2", "--retry-delay-ms", "200"]);
    let mut agent = Agent::start(f.dir.join("a1"), Some("t1"));
    f.server.cli_json(&["dp", "add", "dp1", &agent.url(), "--token", "t1"]);
    f.server.cli_json(&["distribute", &f.id, "--dp", "dp1"]);
    f.server.cli_json(&["refresh", &f.id]);
    f.server.wait_installed(&f.id, "dp1", 1, WAIT, &[agent.daemon()]);
    agent.terminate();
    f.server.cli_json(&["remove", &f.id, "--dp", "dp1"]);
    for i in 2..=5 {
        fs::write(f.src.join("a.txt"), format!("alpha {i}\n")).unwrap();
        f.server.cli_json(&["refresh", &f.id]);
    }
    let gc = f.server.cli_json(&["gc"]);
    let show = f.server.cli_json(&["package", "show", &f.id]);
    assert_eq!(version_numbers(&show), [4, 5], "keep_versions = 2 keeps 2 versions; gc said {gc}");
    let t = f.server.target_status(&f.id, "dp1");
    assert_eq!(t["state"], "retrying", "the removal is still queued: {t}");
}

/// After a rollback, `refresh --dry-run` lists as changed exactly what the real refresh
/// then commits as changed, although the rollback restored an older scan cache.
#[test]
fn dry_run_after_rollback_agrees_with_the_refresh() {
    let f = fixture(&[]);
    set_old_mtimes(&f.src);
    f.server.cli_json(&["refresh", &f.id]);
    // b.txt: same content, time and mode, but its ctime moves (v2 reads it again).
    let b = f.src.join("b.txt");
    let mode = fs::metadata(&b).unwrap().permissions().mode() & 0o7777;
    fs::set_permissions(&b, fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(&b, fs::Permissions::from_mode(mode)).unwrap();
    fs::write(f.src.join("a.txt"), b"alpha changed, longer\n").unwrap();
    set_old_mtime(&f.src.join("a.txt"));
    let v2 = f.server.cli_json(&["refresh", &f.id]);
    assert_eq!((num(&v2, "files_changed"), num(&v2, "files_unchanged")), (1, 1), "{v2}");
    let rb = f.server.cli_json(&["rollback", &f.id]);
    assert_eq!(num(&rb, "source_version"), 3, "{rb}");

    let dry = f.server.cli_json(&["refresh", &f.id, "--dry-run"]);
    let real = f.server.cli_json(&["refresh", &f.id]);
    assert_eq!(dry["changed"], serde_json::json!(["a.txt"]), "dry run: {dry:#}");
    for key in ["files_added", "files_changed", "files_removed", "files_unchanged"] {
        assert_eq!(num(&dry, key), num(&real, key), "{key}: dry run {dry:#} vs refresh {real:#}");
    }
}
