//! Operating targets: `dp set` / `dp show` / `dp remove` (and their `site` twins), groups
//! that stay assigned to packages (also on a child site), retries that never give up
//! (slow retries, `retry`, retries on a changed connection setting), a pinned certificate
//! that no longer matches, the `status` roll-ups, and what `remove --wait` says.

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

const TOKEN: &str = "dp-secret";
/// The bound of every poll and `--wait` here.
const WAIT: Duration = Duration::from_secs(30);

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A server (started with `server_args`), a package `app` over `DIR/src` holding a few
/// files, and agents added with [`Ops::agent`].
struct Ops {
    server: Server,
    agents: Vec<Agent>,
    src: PathBuf,
    id: String,
    // Last, so that the daemons are stopped before their directories are removed.
    dir: TestDir,
}

impl Ops {
    fn new(server_args: &[&str]) -> Self {
        let dir = TestDir::new();
        let src = dir.join("src");
        gen_tree(&src, 12, 4242, 1..40_000);
        set_old_mtimes(&src);
        let opts = ServerOpts { args: server_args.iter().map(|a| a.to_string()).collect(), ..ServerOpts::site("PS1") };
        let server = Server::start_with(dir.join("d"), opts);
        let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
        Self { server, agents: Vec::new(), src, id, dir }
    }

    /// Starts agent number `agents.len() + 1` (token [`TOKEN`]); returns its index.
    fn agent(&mut self) -> usize {
        let i = self.agents.len();
        self.agents.push(Agent::start(self.dir.join(format!("a{}", i + 1)), Some(TOKEN)));
        i
    }

    /// `dp add NAME URL --token TOKEN` plus `extra`.
    fn add_dp(&self, name: &str, i: usize, extra: &[&str]) -> Value {
        let url = self.agents[i].url();
        let mut args = vec!["dp", "add", name, &url, "--token", TOKEN];
        args.extend_from_slice(extra);
        self.server.cli_json(&args)
    }

    fn daemons(&self) -> Vec<&Daemon> {
        self.agents.iter().map(Agent::daemon).collect()
    }

    fn wait_installed(&self, pkg: &str, name: &str, version: u64) -> Value {
        self.server.wait_installed(pkg, name, version, WAIT, &self.daemons())
    }

    /// Polls `status app --json` until `name` is in `state`; returns its entry.
    fn wait_state(&self, name: &str, state: &str) -> Value {
        let s = self.server.wait_status(&self.id, &format!("{name} to be {state}"), WAIT, &self.daemons(), |s| {
            target_of(s, name)["state"] == state
        });
        target_of(&s, name).clone()
    }

    /// Runs the CLI (text output) and returns (exit code, stdout, stderr).
    fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.server.cli(args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn refresh(&self) -> u64 {
        num(&self.server.cli_json(&["refresh", &self.id]), "source_version")
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

// ---------------------------------------------------------------------------------------
// dp set / show / remove

#[test]
fn dp_set_show_and_remove_then_the_name_is_free_again() {
    let mut ops = Ops::new(&[]);
    let (a1, a2) = (ops.agent(), ops.agent());
    ops.add_dp("dp1", a1, &[]);
    ops.add_dp("dp2", a2, &[]);
    ops.server.cli_json(&["distribute", &ops.id, "--dp", "dp1", "--dp", "dp2"]);
    ops.server.cli_json(&["refresh", &ops.id, "--wait", "--timeout", "30"]);

    // show: settings without the token, and the package's state there.
    let shown = ops.server.cli_json(&["dp", "show", "dp1"]);
    assert_eq!((shown["name"].as_str(), shown["has_token"].as_bool()), (Some("dp1"), Some(true)), "{shown:#}");
    assert!(!shown.to_string().contains(TOKEN), "the token is never shown: {shown:#}");
    let p = &shown["packages"][0];
    assert_eq!(
        (p["package"].as_str(), p["state"].as_str(), p["installed_version"].as_u64()),
        (Some(&*ops.id), Some("installed"), Some(1)),
        "{shown:#}"
    );
    assert_eq!(shown["counts"]["installed"], 1, "{shown:#}");
    let (code, text, _) = ops.run(&["dp", "show", "dp1"]);
    assert_eq!(code, 0);
    assert!(text.contains("token        set") && !text.contains(TOKEN), "{text}");
    assert!(text.contains(&ops.id) && text.contains("installed"), "{text}");

    // set: only what is given changes; --no-… clears.
    let r = ops.server.cli_json(&["dp", "set", "dp1", "--rate-limit", "1048576", "--group", "east"]);
    assert_eq!(r["changed"], serde_json::json!(["group", "rate_limit"]), "{r:#}");
    assert_eq!(
        (r["rate_limit"].as_u64(), r["group"].as_str(), r["has_token"].as_bool()),
        (Some(1048576), Some("east"), Some(true)),
        "{r:#}"
    );
    let r = ops.server.cli_json(&["dp", "set", "dp1", "--no-rate-limit", "--no-group"]);
    assert!(r["rate_limit"].is_null() && r["group"].is_null(), "{r:#}");
    assert_eq!(r["url"].as_str(), Some(&*ops.agents[a1].url()), "{r:#}");
    let e = ops.server.cli_fail(&["dp", "set", "dp1"]);
    assert!(e.contains("nothing to change"), "{e}");
    let e = ops.server.cli_fail(&["dp", "set", "dp1", "--rate-limit", "10"]);
    assert!(e.contains("at least 1024"), "{e}");
    let e = ops.server.cli_fail(&["site", "set", "dp1", "--url", "http://127.0.0.1:9"]);
    assert!(e.contains("dp1 is a DP") && e.contains("dpsync dp"), "{e}");
    let e = ops.server.cli_fail(&["dp", "set", "nosuch", "--group", "g"]);
    assert!(e.contains("no DP named \"nosuch\""), "{e}");

    // remove: the package goes from the DP, then the DP from the site.
    let (code, out, err) = ops.run(&["dp", "remove", "dp2"]);
    assert_eq!(code, 0, "{out}{err}{}", log_tails(&ops.daemons()));
    assert!(out.contains("removed DP dp2 (1 package taken off it)"), "{out}");
    assert!(err.contains("removing 1 package from dp2"), "progress on stderr: {err}");
    assert!(!ops.agents[a2].package_dir(&ops.id).exists(), "the package left dp2");
    let list = ops.server.cli_json(&["dp", "list"]);
    assert!(list.as_array().unwrap().iter().all(|t| t["name"] != "dp2"), "{list:#}");
    let st = ops.server.status(&ops.id);
    assert_eq!(st["targets"].as_array().unwrap().len(), 1, "dp2's rows are gone: {st:#}");
    let e = ops.server.cli_fail(&["dp", "remove", "dp2"]);
    assert!(e.contains("no DP named \"dp2\""), "{e}");

    // The name is free again.
    ops.add_dp("dp2", a2, &[]);
    ops.server.cli_json(&["distribute", &ops.id, "--dp", "dp2"]);
    ops.wait_installed(&ops.id, "dp2", 1);
    assert_same_tree(&ops.src, &ops.agents[a2].current(&ops.id));
}

#[test]
fn dp_remove_keeps_an_unreachable_dp_unless_forgotten() {
    let mut ops = Ops::new(&["--retry-delay-ms", "100"]);
    let a1 = ops.agent();
    ops.add_dp("dp1", a1, &[]);
    ops.server.cli_json(&["distribute", &ops.id, "--dp", "dp1"]);
    ops.server.cli_json(&["refresh", &ops.id, "--wait", "--timeout", "30"]);
    ops.agents[a1].kill9();

    let started = Instant::now();
    let out = ops.server.cli(&["dp", "remove", "dp1", "--timeout", "3"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "bounded by --timeout: {:?}", started.elapsed());
    let last = err.lines().last().unwrap_or("");
    assert!(last.starts_with("dpsync: could not remove 1 package from dp1:"), "{err}");
    assert!(last.contains(&ops.id) && last.contains("unreachable"), "names the package and why: {err}");
    assert!(last.contains("`dpsync dp remove dp1 --forget`"), "says what to do next: {err}");
    let shown = ops.server.cli_json(&["dp", "show", "dp1"]);
    assert_eq!(shown["packages"][0]["action"], "remove", "kept, its removal still queued: {shown:#}");

    let r = ops.server.cli_json(&["dp", "remove", "dp1", "--forget"]);
    assert_eq!((r["forgotten"].as_bool(), r["kind"].as_str()), (Some(true), Some("dp")), "{r:#}");
    assert!(ops.server.cli_json(&["dp", "list"]).as_array().unwrap().is_empty());
    // The DP was not asked: its copy is still there.
    assert!(ops.agents[a1].current(&ops.id).exists());
    // And the name can be used again, e.g. for the same DP once it is back.
    ops.agents[a1].restart();
    ops.add_dp("dp1", a1, &[]);
    let shown = ops.server.cli_json(&["dp", "show", "dp1"]);
    assert!(shown["packages"].as_array().unwrap().is_empty(), "a new target starts with nothing: {shown:#}");
}

// ---------------------------------------------------------------------------------------
// Connection settings and certificates

#[test]
fn a_new_token_retries_the_failed_dp_at_once() {
    // One attempt, and the slow retry at its default (30 min): only `dp set` can make
    // this DP install within the test.
    let mut ops = Ops::new(&["--retries", "0"]);
    let a1 = ops.agent();
    let url = ops.agents[a1].url();
    ops.server.cli_json(&["dp", "add", "dp1", &url, "--token", "not-the-token"]);
    ops.server.cli_json(&["distribute", &ops.id, "--dp", "dp1"]);
    let before = now_ms();
    ops.refresh();
    let t = ops.wait_state("dp1", "failed");
    let error = t["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("`dpsync dp set dp1 --token …`"), "{t:#}");
    let (at, next) = (t["last_error_at"].as_i64().unwrap(), t["next_retry_at"].as_i64().unwrap());
    assert!(at >= before && at <= now_ms(), "last_error_at is when it failed: {t:#}");
    let slow = next - at;
    assert!((25 * 60_000..=35 * 60_000).contains(&slow), "failed means: tried again in about 30 min: {t:#}");

    let token_file = ops.dir.join("token");
    fs::write(&token_file, TOKEN).unwrap();
    fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let r = ops.server.cli_json(&["dp", "set", "dp1", "--token-file", s(&token_file)]);
    assert_eq!(r["changed"], serde_json::json!(["token"]), "{r:#}");
    assert_eq!(r["retried"], serde_json::json!([ops.id]), "{r:#}");
    let started = Instant::now();
    let t = ops.wait_installed(&ops.id, "dp1", 1);
    assert!(started.elapsed() < Duration::from_secs(20), "retried at once, not in 30 min");
    assert!(t["last_error"].is_null() && t["last_error_at"].is_null() && t["next_retry_at"].is_null(), "{t:#}");
}

/// Starts an agent serving TLS with its self-signed certificate; returns it with its URL
/// and fingerprint.
fn start_tls_agent(data_dir: &Path) -> (Daemon, String, String) {
    fs::create_dir_all(data_dir).unwrap();
    let mut cmd = dpsync_command();
    cmd.arg("agent").arg("--data-dir").arg(data_dir).args(["--listen", "127.0.0.1:0", "--token", TOKEN]);
    let d = Daemon::start("TLS agent", cmd, &PathBuf::from(format!("{}.agent.log", data_dir.display())));
    let (addr, fp) = wait_until("the TLS agent to listen", START_TIMEOUT, &[&d], || {
        let addr: SocketAddr = fs::read_to_string(data_dir.join("listen.addr")).ok()?.trim().parse().ok()?;
        let fp = fs::read_to_string(data_dir.join("tls/fingerprint")).ok()?.trim().to_owned();
        (fp.len() == 64 && TcpStream::connect(addr).is_ok()).then_some((addr, fp))
    });
    (d, format!("https://{addr}"), fp)
}

#[test]
fn a_certificate_that_no_longer_matches_its_pin_names_the_command_that_repins() {
    let ops = Ops::new(&["--retries", "0"]);
    let (agent, url, fingerprint) = start_tls_agent(&ops.dir.join("tls-dp"));
    // Pinned to another certificate (as after the DP's certificate was regenerated).
    let old = "ab".repeat(32);
    ops.server.cli_json(&["dp", "add", "dp1", &url, "--token", TOKEN, "--fingerprint", &old]);
    ops.server.cli_json(&["distribute", &ops.id, "--dp", "dp1"]);
    ops.refresh();
    let s =
        ops.server.wait_status(&ops.id, "dp1 to fail", WAIT, &[&agent], |s| target_of(s, "dp1")["state"] == "failed");
    let error = target_of(&s, "dp1")["last_error"].as_str().unwrap().to_owned();
    assert!(error.contains("does not match the pinned one") && error.contains(&fingerprint), "{error}");
    assert!(error.contains(&format!("`dpsync dp set dp1 --fingerprint {fingerprint}`")), "{error}");
    assert!(!error.contains("refused the request"), "not a refusal: {error}");

    let r = ops.server.cli_json(&["dp", "set", "dp1", "--fingerprint", &fingerprint]);
    assert_eq!(r["retried"], serde_json::json!([ops.id]), "{r:#}");
    ops.server.wait_installed(&ops.id, "dp1", 1, WAIT, &[&agent]);
    assert_same_tree(&ops.src, &ops.dir.join("tls-dp").join("packages").join(&ops.id).join("current"));
}

// ---------------------------------------------------------------------------------------
// Groups

#[test]
fn dps_that_join_a_group_later_receive_its_packages() {
    let mut ops = Ops::new(&[]);
    let (a1, a2, a3, a4) = (ops.agent(), ops.agent(), ops.agent(), ops.agent());
    ops.add_dp("dp1", a1, &["--group", "east"]);
    let r = ops.server.cli_json(&["distribute", &ops.id, "--group", "east"]);
    assert_eq!((r["targets"].clone(), r["groups"].clone()), (serde_json::json!(["dp1"]), serde_json::json!(["east"])));
    ops.server.cli_json(&["refresh", &ops.id, "--wait", "--timeout", "30"]);

    // Added with the group: it receives the package with no other command.
    ops.add_dp("dp2", a2, &["--group", "east"]);
    ops.wait_installed(&ops.id, "dp2", 1);
    // Moved into the group with `dp set`.
    ops.add_dp("dp3", a3, &[]);
    assert!(ops.server.status(&ops.id)["targets"].as_array().unwrap().iter().all(|t| t["name"] != "dp3"));
    let r = ops.server.cli_json(&["dp", "set", "dp3", "--group", "east"]);
    assert_eq!(r["assigned"], serde_json::json!([ops.id]), "{r:#}");
    ops.wait_installed(&ops.id, "dp3", 1);
    for i in [a2, a3] {
        assert_same_tree(&ops.src, &ops.agents[i].current(&ops.id));
    }
    // Later versions reach them like any target.
    fs::write(ops.src.join("added.txt"), b"v2").unwrap();
    ops.server.cli_json(&["refresh", &ops.id, "--wait", "--timeout", "30"]);

    // Leaving the group takes nothing off the DP.
    let r = ops.server.cli_json(&["dp", "set", "dp3", "--no-group"]);
    assert!(r["group"].is_null() && r["assigned"].as_array().unwrap().is_empty(), "{r:#}");
    assert_eq!(ops.server.target_status(&ops.id, "dp3")["state"], "installed");
    assert!(ops.agents[a3].current(&ops.id).join("added.txt").exists());

    // A group with no DP yet can hold the package; its first DP receives it.
    let r = ops.server.cli_json(&["distribute", &ops.id, "--group", "west"]);
    assert!(r["targets"].as_array().unwrap().is_empty(), "{r:#}");
    let (code, out, _) = ops.run(&["distribute", &ops.id, "--group", "west"]);
    assert_eq!(code, 0);
    assert!(out.contains("no DP is in group west yet") && out.contains("DPs that join it later receive it"), "{out}");
    ops.add_dp("dp4", a4, &["--group", "west"]);
    ops.wait_installed(&ops.id, "dp4", 2);
    assert_same_tree(&ops.src, &ops.agents[a4].current(&ops.id));
}

#[test]
fn a_child_site_sends_received_packages_to_dps_added_later() {
    let dir = TestDir::new();
    let src = dir.join("src");
    gen_tree(&src, 10, 77, 1..30_000);
    set_old_mtimes(&src);
    let ch1_dir = dir.join("ch1");
    let mut opts = ServerOpts::site("CH1");
    opts.args = ["--listen", "127.0.0.1:0", "--token", "link"].map(String::from).to_vec();
    let ch1 = Server::start_with(&ch1_dir, opts);
    let addr: SocketAddr = wait_until("CH1 to listen", START_TIMEOUT, &[ch1.daemon()], || {
        fs::read_to_string(ch1_dir.join("listen.addr")).ok()?.trim().parse().ok()
    });
    let fp = fs::read_to_string(ch1_dir.join("tls/fingerprint")).unwrap().trim().to_owned();
    let ps1 = Server::start(dir.join("ps1"), "PS1");
    ps1.cli_json(&["site", "add", "CH1", &format!("https://{addr}"), "--token", "link", "--fingerprint", &fp]);
    let id = text(&ps1.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    ps1.cli_json(&["distribute", &id, "--site", "CH1"]);
    ps1.cli_json(&["refresh", &id, "--wait", "--timeout", "30"]);
    // The child holds the package and has no DP yet.
    assert_eq!(num(&ch1.cli_json(&["package", "show", &id]), "source_version"), 1);

    let dp = Agent::start(dir.join("dp5"), Some(TOKEN));
    ch1.cli_json(&["dp", "add", "dp5", &dp.url(), "--token", TOKEN]);
    ch1.wait_installed(&id, "dp5", 1, WAIT, &[dp.daemon()]);
    assert_same_tree(&src, &dp.current(&id));
    // The parent sees it through the child.
    let st = ps1.status(&id);
    let nested = &target_of(&st, "CH1")["targets"];
    assert!(
        nested.as_array().is_some_and(|a| a.iter().any(|t| t["name"] == "dp5" && t["state"] == "installed")),
        "{st:#}"
    );

    // `site set` / `site show` / `site remove` work on child sites like their `dp` twins.
    let r = ps1.cli_json(&["site", "set", "CH1", "--fingerprint", &fp.to_ascii_uppercase()]);
    assert!(r["changed"].as_array().unwrap().is_empty() && r["retried"].as_array().unwrap().is_empty(), "{r:#}");
    let e = ps1.cli_fail(&["dp", "remove", "CH1"]);
    assert!(e.contains("CH1 is a child site") && e.contains("dpsync site"), "{e}");
    let shown = ps1.cli_json(&["site", "show", "CH1"]);
    assert_eq!((shown["kind"].as_str(), shown["packages"][0]["state"].as_str()), (Some("site"), Some("installed")));
    let r = ps1.cli_json(&["site", "remove", "CH1"]);
    assert_eq!((r["forgotten"].as_bool(), r["removed"].clone()), (Some(true), serde_json::json!([id])), "{r:#}");
    assert!(ps1.cli_json(&["site", "list"]).as_array().unwrap().is_empty());
    // The child took the package off its own DP.
    ch1.wait_status(&id, "dp5 to lose the package", WAIT, &[dp.daemon()], |s| {
        target_of(s, "dp5")["state"] == "removed"
    });
    assert!(!dp.package_dir(&id).exists());
}

// ---------------------------------------------------------------------------------------
// Retries that never give up

#[test]
fn a_dp_down_longer_than_the_fast_retries_is_installed_by_the_slow_retry() {
    let mut ops = Ops::new(&["--retries", "1", "--retry-delay-ms", "100", "--slow-retry", "2s"]);
    let (a1, a2) = (ops.agent(), ops.agent());
    ops.add_dp("dp1", a1, &[]);
    ops.add_dp("dp2", a2, &[]);
    ops.server.cli_json(&["distribute", &ops.id, "--dp", "dp1", "--dp", "dp2"]);
    ops.agents[a2].kill9();

    // --wait ends once every target is installed or failing, naming the failing one.
    let out = ops.server.cli(&["refresh", &ops.id, "--wait", "--timeout", "30"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("dp2") && err.contains("unreachable") && !err.contains("dp1:"), "{err}");
    let t = ops.server.target_status(&ops.id, "dp2");
    assert!(["failed", "in_progress"].contains(&t["state"].as_str().unwrap()), "{t:#}");

    // Down for longer than the fast retries: still failing, tried every ~2 s.
    let failed = ops.wait_state("dp2", "failed");
    assert!(
        failed["next_retry_at"].as_i64().is_some_and(|at| at > failed["last_error_at"].as_i64().unwrap()),
        "{failed:#}"
    );
    let tries = num(&failed, "attempts");
    let again = ops.server.wait_status(&ops.id, "another slow retry", WAIT, &ops.daemons(), |s| {
        let t = target_of(s, "dp2");
        t["state"] == "failed" && num(t, "attempts") > tries
    });
    assert!(num(target_of(&again, "dp2"), "attempts") > 2, "past the fast retries: {again:#}");

    // Back up: installed without any command.
    ops.agents[a2].restart();
    let t = ops.wait_installed(&ops.id, "dp2", 1);
    assert!(t["last_error"].is_null(), "{t:#}");
    assert_same_tree(&ops.src, &ops.agents[a2].current(&ops.id));

    // A removal queued while the DP is down is retried until it is done.
    ops.agents[a2].kill9();
    ops.server.cli_json(&["remove", &ops.id, "--dp", "dp2"]);
    let s = ops.server.wait_status(&ops.id, "the removal to be retried", WAIT, &ops.daemons(), |s| {
        let t = target_of(s, "dp2");
        t["action"] == "remove" && num(t, "attempts") >= 3
    });
    assert_ne!(target_of(&s, "dp2")["state"], "removed", "{s:#}");
    ops.agents[a2].restart();
    ops.wait_state("dp2", "removed");
    assert!(!ops.agents[a2].package_dir(&ops.id).exists());
}

#[test]
fn retry_and_distribute_try_a_failed_dp_now_and_status_rolls_up() {
    // One attempt, then the slow retry at its default (30 min).
    let mut ops = Ops::new(&["--retries", "0"]);
    let (a1, a2) = (ops.agent(), ops.agent());
    ops.add_dp("dp1", a1, &[]);
    ops.add_dp("dp2", a2, &[]);
    let other_src = ops.dir.join("src2");
    gen_tree(&other_src, 3, 99, 1..1000);
    let other = text(&ops.server.cli_json(&["package", "add", "tools", s(&other_src)]), "id").to_owned();
    for p in [&ops.id, &other] {
        ops.server.cli_json(&["distribute", p, "--dp", "dp1", "--dp", "dp2"]);
    }
    ops.agents[a2].kill9();
    for p in [&ops.id, &other] {
        ops.server.cli(&["refresh", p, "--wait", "--timeout", "30"]);
    }
    ops.wait_state("dp2", "failed");

    // The roll-up: one line per package with its targets counted by state.
    let (code, out, _) = ops.run(&["status"]);
    assert_eq!(code, 0);
    let line = out.lines().find(|l| l.starts_with(&ops.id)).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("1 failed") && line.contains("1 installed"), "{out}");
    assert_eq!(out.lines().filter(|l| l.starts_with(&other)).count(), 1, "{out}");
    let all = ops.server.cli_json(&["status"]);
    let mine = all.as_array().unwrap().iter().find(|s| s["package"] == ops.id.as_str()).unwrap();
    assert_eq!(mine["counts"], serde_json::json!({"failed": 1, "installed": 1}), "{mine:#}");
    assert_eq!(mine["targets"].as_array().unwrap().len(), 2, "the JSON keeps the per-target shape: {mine:#}");

    // Only what fails, everywhere.
    let failing = ops.server.cli_json(&["status", "--failed"]);
    let failing = failing.as_array().unwrap();
    assert_eq!(failing.len(), 2, "both packages fail on dp2: {failing:#?}");
    for s in failing {
        let targets = s["targets"].as_array().unwrap();
        assert_eq!(targets.len(), 1, "{s:#}");
        assert_eq!(targets[0]["name"], "dp2");
        assert!(targets[0]["next_retry_at"].as_i64().is_some() && targets[0]["last_error"].is_string(), "{s:#}");
    }
    let (_, out, _) = ops.run(&["status", "--failed"]);
    assert!(out.contains("dp2") && out.contains("next try in") && !out.contains("dp1"), "{out}");
    let shown = ops.server.cli_json(&["dp", "show", "dp2"]);
    assert_eq!(shown["counts"], serde_json::json!({"failed": 2}), "{shown:#}");

    // Back up, but the next slow retry is 30 min away: `retry` tries now.
    ops.agents[a2].restart();
    let r = ops.server.cli_json(&["retry", &ops.id, "--dp", "dp2", "--wait", "--timeout", "30"]);
    assert_eq!(target_of(&r, "dp2")["state"], "installed", "{r:#}");
    let (code, out, _) = ops.run(&["retry", &ops.id]);
    assert_eq!((code, out.trim()), (0, format!("{}: nothing is failing", ops.id).as_str()));
    // `distribute` of a failed target tries it now too.
    assert_eq!(ops.server.target_status(&other, "dp2")["state"], "failed");
    let r = ops.server.cli_json(&["distribute", &other, "--dp", "dp2", "--wait", "--timeout", "30"]);
    assert_eq!(target_of(&r, "dp2")["state"], "installed", "{r:#}");
    let (_, out, _) = ops.run(&["status", "--failed"]);
    assert_eq!(out.trim(), "nothing is failing");
}

// ---------------------------------------------------------------------------------------
// What `remove --wait` says

#[test]
fn remove_wait_says_where_the_package_is_and_where_it_was_removed() {
    let mut ops = Ops::new(&[]);
    for name in ["dp1", "dp2", "dp3"] {
        let i = ops.agent();
        ops.add_dp(name, i, &[]);
    }
    ops.server.cli_json(&["distribute", &ops.id, "--dp", "dp1", "--dp", "dp2", "--dp", "dp3"]);
    ops.server.cli_json(&["refresh", &ops.id, "--wait", "--timeout", "30"]);
    let (code, _, err) = ops.run(&["remove", &ops.id, "--dp", "dp3", "--wait", "--timeout", "30"]);
    assert_eq!(code, 0, "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with(&format!("{} version 1 is on 2 targets; removed from dp3 (", ops.id)), "{err}");
    assert!(!err.contains("all 3"), "{err}");
}
