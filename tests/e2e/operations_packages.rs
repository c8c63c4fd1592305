//! Operating packages: `package set` (name, source, priority, refresh schedule),
//! `package delete`, scheduled refreshes, JSON logs, and the regression tests of pruning
//! and of `refresh --dry-run` after a rollback.

use std::fs::{self, File};
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

/// `package set` renames, moves the source (checked like `package add`), and says what
/// to pass when given nothing.
#[test]
fn package_set_renames_and_moves_the_source_with_the_add_checks() {
    let f = fixture(&[]);
    f.server.cli_json(&["refresh", &f.id]);
    let p = f.server.cli_json(&["package", "set", "app", "--name", "app2"]);
    assert_eq!((text(&p, "id"), text(&p, "name")), (f.id.as_str(), "app2"), "{p}");
    assert_eq!(text(&f.server.cli_json(&["package", "show", "app2"]), "id"), f.id);

    let other = f.dir.join("other");
    fs::create_dir_all(&other).unwrap();
    fs::write(other.join("c.txt"), b"charlie\n").unwrap();
    let p = f.server.cli_json(&["package", "set", &f.id, "--source", s(&other)]);
    assert_eq!(text(&p, "source_path"), s(&other), "{p}");
    let v2 = f.server.cli_json(&["refresh", &f.id]);
    assert_eq!(
        (num(&v2, "source_version"), num(&v2, "files_added"), num(&v2, "files_removed"), num(&v2, "files")),
        (2, 1, 2, 1),
        "{v2}"
    );

    let missing = f.dir.join("missing");
    let e = f.server.cli_fail(&["package", "set", &f.id, "--source", s(&missing)]);
    assert!(e.contains("cannot be used") && e.contains("missing"), "{e}");
    let e = f.server.cli_fail(&["package", "set", &f.id, "--source", s(&other.join("c.txt"))]);
    assert!(e.contains("is not a folder"), "{e}");
    let e = f.server.cli_fail(&["package", "set", &f.id, "--source", s(&f.server.library())]);
    assert!(e.contains("lies inside the server's data directory"), "{e}");
    let e = f.server.cli_fail(&["package", "set", &f.id, "--source", s(f.dir.path())]);
    assert!(e.contains("contains the server's data directory"), "{e}");
    let e = f.server.cli_fail(&["package", "set", &f.id]);
    assert!(e.contains("nothing to change") && e.contains("--priority"), "{e}");
    let e = f.server.cli_fail(&["package", "set", &f.id, "--refresh-every", "500ms"]);
    assert!(e.contains("at least 1s"), "{e}");
    let out = f.server.cli(&["package", "set", &f.id, "--refresh-every", "soon"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("not a duration: use e.g. 30s"), "{e}");
    // A refused change changed nothing.
    assert_eq!(text(&f.server.cli_json(&["package", "show", &f.id]), "source_path"), s(&other));
}

/// With one job at a time, due jobs of a high-priority package are claimed before the
/// medium ones queued earlier.
#[test]
fn jobs_of_higher_priority_packages_are_claimed_first() {
    let f = fixture(&["--parallel-targets", "1"]);
    let agent = Agent::start(f.dir.join("a1"), Some("t1"));
    f.server.cli_json(&["dp", "add", "dp1", &agent.url(), "--token", "t1", "--rate-limit", "1048576"]);
    // The blocker keeps the only job slot busy for ~3 s while the others are queued.
    write_random_file(&f.src.join("big.bin"), 3 << 20, 7);
    f.server.cli_json(&["refresh", &f.id]);
    let mut ids = Vec::new();
    for name in ["first-queued", "urgent"] {
        let src = f.dir.join(name);
        fs::create_dir_all(&src).unwrap();
        fs::write(src.join("readme.txt"), name).unwrap();
        let id = text(&f.server.cli_json(&["package", "add", name, s(&src)]), "id").to_owned();
        f.server.cli_json(&["refresh", &id]);
        ids.push(id);
    }
    let p = f.server.cli_json(&["package", "set", "urgent", "--priority", "high"]);
    assert_eq!(text(&p, "priority"), "high");
    f.server.cli_json(&["distribute", &f.id, "--dp", "dp1"]);
    f.server.wait_status(&f.id, "the blocker to be sent", WAIT, &[agent.daemon()], |s| {
        target_of(s, "dp1")["state"] == "in_progress"
    });
    for id in &ids {
        f.server.cli_json(&["distribute", id, "--dp", "dp1"]);
    }
    let installed: Vec<Value> =
        ids.iter().map(|id| f.server.wait_installed(id, "dp1", 1, WAIT, &[agent.daemon()])).collect();
    let (first_queued, urgent) = (num(&installed[0], "updated_at"), num(&installed[1], "updated_at"));
    assert!(urgent < first_queued, "the high-priority package went second: {installed:#?}");
    let blocker = f.server.target_status(&f.id, "dp1");
    assert!(num(&blocker, "updated_at") <= urgent, "nothing overtook the running job: {blocker}");
}

/// The version and the due time of a package's scheduled refresh.
fn schedule_of(server: &Server, id: &str) -> (u64, i64) {
    let show = server.cli_json(&["package", "show", id]);
    (num(&show, "source_version"), show["next_refresh_at"].as_i64().unwrap_or(-1))
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// `--refresh-every 2s`: a version is committed when the content changed and only then;
/// the schedule survives a restart, and runs missed while the server was down run once.
#[test]
fn scheduled_refresh_commits_only_changes_and_survives_restarts() {
    let mut f = fixture(&[]);
    let p = f.server.cli_json(&["package", "set", "app", "--refresh-every", "2s"]);
    assert_eq!(p["refresh_every_ms"], 2000, "{p}");
    let deadline = Duration::from_secs(30);
    let wait_version = |server: &Server, v: u64| {
        poll_until(deadline, || (schedule_of(server, &f.id).0 == v).then_some(()))
            .unwrap_or_else(|| panic!("no version {v} within {deadline:?}{}", log_tails(&[server.daemon()])))
    };
    wait_version(&f.server, 1);
    // Two more runs with nothing changed: no new version.
    for _ in 0..2 {
        let (_, due) = schedule_of(&f.server, &f.id);
        poll_until(deadline, || (schedule_of(&f.server, &f.id).1 > due).then_some(())).expect("the schedule moves on");
    }
    assert_eq!(schedule_of(&f.server, &f.id).0, 1, "an unchanged scheduled refresh commits nothing");
    let show = f.server.cli_json(&["package", "show", &f.id]);
    assert!(show["schedule_error"].is_null(), "{show}");

    fs::write(f.src.join("a.txt"), b"alpha two\n").unwrap();
    wait_version(&f.server, 2);

    // Down for more than two intervals, with a change: one run after the restart.
    f.server.terminate();
    let stopped_at = now_ms();
    fs::write(f.src.join("a.txt"), b"alpha three\n").unwrap();
    poll_until(deadline, || (now_ms() > stopped_at + 3 * 2000).then_some(())).unwrap();
    f.server.restart();
    let restarted = now_ms();
    wait_version(&f.server, 3);
    let (_, next) = schedule_of(&f.server, &f.id);
    assert!(next >= restarted + 1000, "the next run is an interval after the missed one ran: {next} vs {restarted}");
    let runs = f.server.log().matches("refresh started").count();
    assert_eq!(runs, 1, "the missed runs ran once:\n{}", f.server.log());

    // Failures are kept for `package show`, and the schedule can be removed.
    fs::rename(&f.src, f.dir.join("gone")).unwrap();
    poll_until(deadline, || {
        f.server.cli_json(&["package", "show", &f.id])["schedule_error"].as_str().map(str::to_owned)
    })
    .expect("the failure of a scheduled refresh is recorded");
    let p = f.server.cli_json(&["package", "set", &f.id, "--no-schedule"]);
    assert!(p["refresh_every_ms"].is_null() && p["next_refresh_at"].is_null(), "{p}");
}

/// `package delete`: off every target (a target that is down keeps the removal queued
/// and the package `deleting`), then its rows go and `gc` reclaims its content.
#[test]
fn package_delete_removes_from_every_target_then_forgets() {
    let f = fixture(&["--retry-delay-ms", "200"]);
    let a1 = Agent::start(f.dir.join("a1"), Some("t1"));
    let mut a2 = Agent::start(f.dir.join("a2"), Some("t2"));
    f.server.cli_json(&["dp", "add", "dp1", &a1.url(), "--token", "t1"]);
    f.server.cli_json(&["dp", "add", "dp2", &a2.url(), "--token", "t2"]);
    write_random_file(&f.src.join("only-here.bin"), 200_000, 3);
    f.server.cli_json(&["distribute", &f.id, "--dp", "dp1", "--dp", "dp2"]);
    f.server.cli_json(&["refresh", &f.id]);
    for dp in ["dp1", "dp2"] {
        f.server.wait_installed(&f.id, dp, 1, WAIT, &[a1.daemon(), a2.daemon()]);
    }
    let object = library_object(&f.server.library(), &blake3_hex(&fs::read(f.src.join("only-here.bin")).unwrap()));
    assert!(object.exists());

    a2.terminate();
    let r = f.server.cli_json(&["package", "delete", "app"]);
    assert_eq!(text(&r, "state"), "deleting", "{r}");
    f.server.wait_status(&f.id, "dp1 to drop it", WAIT, &[a1.daemon()], |s| target_of(s, "dp1")["state"] == "removed");
    assert!(!a1.current(&f.id).exists(), "dp1 dropped the tree");
    let list = f.server.cli_json(&["package", "list"]);
    assert_eq!(list[0]["state"], "deleting", "{list}");
    let e = f.server.cli_fail(&["refresh", &f.id]);
    assert!(e.contains("being deleted"), "{e}");
    let e = f.server.cli_fail(&["distribute", &f.id, "--dp", "dp1"]);
    assert!(e.contains("being deleted"), "{e}");
    f.server.cli_json(&["gc"]);
    assert!(object.exists(), "content stays while the package is not gone");

    a2.restart();
    poll_until(WAIT, || f.server.cli_json(&["package", "list"]).as_array().unwrap().is_empty().then_some(()))
        .unwrap_or_else(|| panic!("the package is still listed{}", log_tails(&[f.server.daemon(), a2.daemon()])));
    assert!(!a2.current(&f.id).exists(), "dp2 dropped the tree once back");
    let e = f.server.cli_fail(&["package", "show", &f.id]);
    assert!(e.contains("no package"), "{e}");
    let gc = f.server.cli_json(&["gc"]);
    assert!(num(&gc, "objects_removed") >= 1 && !object.exists(), "gc reclaims the content: {gc}");

    // --wait follows the removals to the end; a package on no target goes at once.
    let src2 = f.dir.join("src2");
    fs::create_dir_all(&src2).unwrap();
    fs::write(src2.join("x.txt"), b"x").unwrap();
    let id2 = text(&f.server.cli_json(&["package", "add", "second", s(&src2)]), "id").to_owned();
    f.server.cli_json(&["distribute", &id2, "--dp", "dp1", "--dp", "dp2"]);
    f.server.cli_json(&["refresh", &id2]);
    for dp in ["dp1", "dp2"] {
        f.server.wait_installed(&id2, dp, 1, WAIT, &[a1.daemon(), a2.daemon()]);
    }
    let out = f.server.cli(&["package", "delete", &id2, "--wait"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        stdout.contains("dp1") && stdout.contains("removed") && stdout.contains(&format!("deleted {id2}")),
        "{stdout}"
    );
    assert!(!a1.current(&id2).exists() && !a2.current(&id2).exists());
    let id3 = text(&f.server.cli_json(&["package", "add", "third", s(&src2)]), "id").to_owned();
    let r = f.server.cli_json(&["package", "delete", &id3]);
    assert_eq!(text(&r, "state"), "deleted", "{r}");
}

fn mode_of(path: &Path) -> u32 {
    fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
}

/// Every kind of damage in `current/` is found: what needs no content (extra entries,
/// modes, times, links) is put right by the DP at once, also on the library object and
/// the previous version's tree that share the inode; missing and damaged files are
/// repaired by the site, which sends only what the DP no longer holds.
#[test]
fn validation_finds_and_repairs_every_kind_of_damage() {
    let f = fixture(&[]);
    let agent = Agent::start(f.dir.join("a1"), Some("t1"));
    f.server.cli_json(&["dp", "add", "dp1", &agent.url(), "--token", "t1"]);
    fs::create_dir_all(f.src.join("sub")).unwrap();
    write_random_file(&f.src.join("sub/c.bin"), 1 << 20, 11);
    write_random_file(&f.src.join("d.bin"), 64 << 10, 12);
    std::os::unix::fs::symlink("a.txt", f.src.join("ln")).unwrap();
    set_old_mtimes(&f.src);
    f.server.cli_json(&["distribute", &f.id, "--dp", "dp1"]);
    f.server.cli_json(&["refresh", &f.id]);
    f.server.wait_installed(&f.id, "dp1", 1, WAIT, &[agent.daemon()]);
    // A second version, so that a previous tree shares the inodes of unchanged files.
    fs::write(f.src.join("b.txt"), b"bravo changed\n").unwrap();
    set_old_mtime(&f.src.join("b.txt"));
    f.server.cli_json(&["refresh", &f.id]);
    f.server.wait_installed(&f.id, "dp1", 2, WAIT, &[agent.daemon()]);
    let current = agent.current(&f.id);
    assert_same_tree_and_times(&f.src, &current);
    let versions = agent.package_dir(&f.id).join("versions");
    let live = fs::canonicalize(&current).unwrap();
    let previous =
        fs::read_dir(&versions).unwrap().map(|e| e.unwrap().path()).find(|p| *p != live).expect("previous tree");
    let a_mode = mode_of(&f.src.join("a.txt"));
    let a_object = library_object(&agent.library(), &blake3_hex(&fs::read(f.src.join("a.txt")).unwrap()));

    // The damage.
    fs::write(current.join("extra.txt"), b"not ours").unwrap();
    fs::create_dir_all(current.join("junk/deeper")).unwrap();
    fs::write(current.join("junk/deeper/x"), b"x").unwrap();
    fs::set_permissions(current.join("a.txt"), fs::Permissions::from_mode(0o777)).unwrap();
    assert_eq!(mode_of(&a_object), 0o777, "a chmod in current/ reaches the library object (one inode)");
    assert_eq!(mode_of(&previous.join("a.txt")), 0o777, "… and the previous version's tree");
    filetime_now(&current.join("b.txt"));
    fs::remove_file(current.join("ln")).unwrap();
    std::os::unix::fs::symlink("b.txt", current.join("ln")).unwrap();
    let c_bytes = fs::read(current.join("sub/c.bin")).unwrap();
    fs::remove_file(current.join("sub/c.bin")).unwrap();
    let d = current.join("d.bin");
    let d_mode = mode_of(&d);
    fs::set_permissions(&d, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&d, b"garbage").unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(d_mode)).unwrap();

    let out = f.server.cli(&["validate", &f.id, "--json"]);
    assert_eq!(out.status.code(), Some(1), "damage found: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let t = target_of(&v, "dp1");
    assert_eq!(t["broken"], serde_json::json!(["d.bin", "sub/c.bin"]), "{v:#}");
    assert_eq!(t["repair_queued"], true, "{v:#}");
    let repaired: Vec<&str> = t["repaired"].as_array().unwrap().iter().map(|r| r.as_str().unwrap()).collect();
    for (path, what) in [
        ("extra.txt:", "extra file removed"),
        ("junk:", "extra folder removed"),
        ("a.txt:", "mode 0777 set back"),
        ("b.txt:", "modification time set back"),
        ("ln:", "link pointed at b.txt"),
    ] {
        assert!(repaired.iter().any(|r| r.starts_with(path) && r.contains(what)), "{path} {what}: {repaired:#?}");
    }
    // Put right at once, on every link of the inode.
    assert!(!current.join("extra.txt").exists() && !current.join("junk").exists());
    assert_eq!(fs::read_link(current.join("ln")).unwrap(), Path::new("a.txt"));
    assert_eq!((mode_of(&current.join("a.txt")), mode_of(&a_object)), (a_mode, a_mode));
    assert_eq!(mode_of(&previous.join("a.txt")), a_mode, "the previous tree's link is right again");

    // The site repairs the rest, sending the damaged file but not the deleted one, whose
    // library object the DP still holds.
    let before = num(&f.server.target_status(&f.id, "dp1"), "bytes_sent_total");
    let t = f.server.wait_installed(&f.id, "dp1", 2, WAIT, &[agent.daemon()]);
    assert_same_tree_and_times(&f.src, &current);
    assert_eq!(fs::read(current.join("sub/c.bin")).unwrap(), c_bytes);
    let sent = num(&t, "bytes_sent_total") - before;
    assert!(
        sent < c_bytes.len() as u64 / 2,
        "the repair sent {sent} bytes: the missing file's content was still there"
    );
    let again = f.server.cli_json(&["validate", &f.id]);
    let t = target_of(&again, "dp1");
    assert!(t["ok"] == true && t["repaired"].is_null(), "nothing left to repair: {again:#}");
    assert!(f.server.target_status(&f.id, "dp1")["last_validated_at"].as_i64().is_some());
}

/// Sets a file's modification time to now (as `touch` does).
fn filetime_now(path: &Path) {
    File::options().append(true).open(path).and_then(|f| f.set_modified(std::time::SystemTime::now())).unwrap();
}

/// `dp add --validate-every 2s`: a DP's content is checked on its own and what broke is
/// repaired without a command; `status --json` carries when it was last checked.
#[test]
fn scheduled_validation_repairs_without_a_command() {
    let f = fixture(&[]);
    let agent = Agent::start(f.dir.join("a1"), Some("t1"));
    let t = f.server.cli_json(&["dp", "add", "dp1", &agent.url(), "--token", "t1", "--validate-every", "2s"]);
    assert_eq!(t["validate_every_ms"], 2000, "{t}");
    set_old_mtimes(&f.src);
    f.server.cli_json(&["distribute", &f.id, "--dp", "dp1"]);
    f.server.cli_json(&["refresh", &f.id]);
    f.server.wait_installed(&f.id, "dp1", 1, WAIT, &[agent.daemon()]);
    let first = f.server.wait_status(&f.id, "a scheduled validation", WAIT, &[agent.daemon()], |s| {
        target_of(s, "dp1")["last_validated_at"].is_i64()
    });
    let first = target_of(&first, "dp1")["last_validated_at"].as_i64().unwrap();

    let current = agent.current(&f.id);
    fs::write(current.join("dropped-in.txt"), b"x").unwrap();
    let a = current.join("a.txt");
    fs::set_permissions(&a, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&a, b"tampered").unwrap();
    let s = f.server.wait_status(&f.id, "the next validation to repair dp1", WAIT, &[agent.daemon()], |s| {
        let t = target_of(s, "dp1");
        t["last_validated_at"].as_i64() > Some(first)
            && t["state"] == "installed"
            && !current.join("dropped-in.txt").exists()
            && fs::read(&a).ok().as_deref() == Some(b"alpha one\n".as_slice())
    });
    assert_same_tree_and_times(&f.src, &current);
    assert!(f.server.log().contains("scheduled validation found damage"), "{s:#}");

    let e = f.server.cli_fail(&["dp", "add", "dp2", &agent.url(), "--validate-every", "100ms"]);
    assert!(e.contains("at least 1s"), "{e}");
}

/// A DP reads no faster than `--validate-read-mib-s` while validating, so a check of a
/// large tree leaves its disk to clients.
#[test]
fn validation_reads_at_the_dp_rate_limit() {
    let f = fixture(&[]);
    let agent = Agent::start_with(f.dir.join("a1"), Some("t1"), &["--validate-read-mib-s", "1"]);
    f.server.cli_json(&["dp", "add", "dp1", &agent.url(), "--token", "t1"]);
    write_random_file(&f.src.join("three.bin"), 3 << 20, 21);
    f.server.cli_json(&["distribute", &f.id, "--dp", "dp1"]);
    f.server.cli_json(&["refresh", &f.id]);
    f.server.wait_installed(&f.id, "dp1", 1, WAIT, &[agent.daemon()]);
    let started = std::time::Instant::now();
    let v = f.server.cli_json(&["validate", &f.id]);
    let took = started.elapsed();
    assert_eq!(target_of(&v, "dp1")["ok"], true, "{v:#}");
    assert!(took >= Duration::from_millis(2500), "3 MiB at 1 MiB/s took only {took:?}");
}
