//! Child sites: a parent site PS1 with one DP (dp1), its child site CH1 with two DPs
//! (dp2, dp3), and CH1's own child GC1 with one DP (dp4). Site links use TLS with the
//! child's self-signed certificate pinned, and tokens; DPs use plain HTTP with tokens.
//!
//! One refresh at the top reaches every tier; a change crosses each site link about
//! once, not once per DP behind it; a child relays but never refreshes or rolls back
//! its parent's package; a child killed mid-transfer resumes without any DP ever
//! showing a mixed tree; a rollback at the owner propagates; a child's administrator
//! may take the package off one of its own DPs and the parent's later versions respect
//! that.

use std::collections::BTreeMap;
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::append as append_bytes;
use crate::harness::*;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const CH1_TOKEN: &str = "ch1-link-secret";
const GC1_TOKEN: &str = "gc1-link-secret";
const DP_TOKEN: &str = "dp-secret";
/// `--timeout` of every `--wait`, and the bound of every poll.
const WAIT_SECS: u64 = 30;
const WAIT_DURATION: Duration = Duration::from_secs(WAIT_SECS);
const DP_NAMES: [&str; 4] = ["dp1", "dp2", "dp3", "dp4"];

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Short retry delays so a restarted peer is reached again quickly.
fn server_opts(code: &str) -> ServerOpts {
    let mut o = ServerOpts::site(code);
    o.args = ["--retry-delay-ms", "200", "--retries", "8"].map(String::from).to_vec();
    o
}

/// A port that was free a moment ago (bound on 127.0.0.1:0 and released), for a daemon
/// that must come back on the same address after a restart.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

#[derive(Debug, Default)]
struct Opts {
    /// `--rate-limit` of the link PS1 → CH1.
    ch1_rate_limit: Option<u64>,
    /// Bind CH1 to a fixed port (so it can be restarted on the same URL).
    ch1_fixed_port: bool,
}

/// The three tiers, with package `app` (source `DIR/src`) distributed from PS1 to dp1 and
/// CH1 but not yet refreshed (no version).
struct Topology {
    ps1: Server,
    ch1: Server,
    gc1: Server,
    /// dp1 (PS1), dp2 and dp3 (CH1), dp4 (GC1), in that order.
    dps: Vec<Agent>,
    src: PathBuf,
    pkg: String,
    // Last, so that the daemons are stopped before their directory is removed.
    #[allow(dead_code)]
    dir: TestDir,
}

/// A child site's receiving side: its TLS URL and the fingerprint of its self-signed
/// certificate (pinned by the parent).
struct Link {
    url: String,
    fingerprint: String,
}

/// Starts a site server that receives from a parent on `listen` (TLS, self-signed) with
/// `token`; returns it and how to reach it.
fn start_child(data_dir: PathBuf, code: &str, token: &str, listen: &str) -> (Server, Link) {
    let mut opts = server_opts(code);
    opts.args.extend(["--listen", listen, "--token", token].map(String::from));
    let server = Server::start_with(&data_dir, opts);
    let addr_file = data_dir.join("listen.addr");
    let addr: SocketAddr =
        wait_until(&format!("{code} to write listen.addr"), START_TIMEOUT, &[server.daemon()], || {
            fs::read_to_string(&addr_file).ok().and_then(|s| s.trim().parse().ok())
        });
    let fp_file = data_dir.join("tls").join("fingerprint");
    let fingerprint = fs::read_to_string(&fp_file)
        .unwrap_or_else(|e| panic!("{code} wrote no {}: {e}", fp_file.display()))
        .trim()
        .to_owned();
    (server, Link { url: format!("https://{addr}"), fingerprint })
}

/// `site add NAME URL --token T --fingerprint FP [--rate-limit R]` at `parent`.
fn add_site(parent: &Server, name: &str, link: &Link, token: &str, rate_limit: Option<u64>) {
    let rate = rate_limit.map(|r| r.to_string());
    let mut args = vec!["site", "add", name, &link.url, "--token", token, "--fingerprint", &link.fingerprint];
    if let Some(r) = &rate {
        args.extend(["--rate-limit", r]);
    }
    parent.cli_json(&args);
}

fn add_dp(server: &Server, name: &str, agent: &Agent) {
    server.cli_json(&["dp", "add", name, &agent.url(), "--token", DP_TOKEN]);
}

impl Topology {
    fn new(seed: u64, files: usize, opts: Opts) -> Self {
        let dir = TestDir::new();
        let src = dir.join("src");
        gen_tree(&src, files, seed, 1..96 * KIB);
        set_old_mtimes(&src);
        let dps: Vec<Agent> = DP_NAMES.iter().map(|n| Agent::start(dir.join(n), Some(DP_TOKEN))).collect();

        // Bottom-up: a site assigns a new package to the targets it has when the package
        // first arrives, so each tier's targets exist before its parent sends anything.
        let (gc1, gc1_link) = start_child(dir.join("gc1"), "GC1", GC1_TOKEN, "127.0.0.1:0");
        add_dp(&gc1, "dp4", &dps[3]);

        let listen = if opts.ch1_fixed_port { format!("127.0.0.1:{}", free_port()) } else { "127.0.0.1:0".into() };
        let (ch1, ch1_link) = start_child(dir.join("ch1"), "CH1", CH1_TOKEN, &listen);
        add_dp(&ch1, "dp2", &dps[1]);
        add_dp(&ch1, "dp3", &dps[2]);
        add_site(&ch1, "GC1", &gc1_link, GC1_TOKEN, None);

        let ps1 = Server::start_with(dir.join("ps1"), server_opts("PS1"));
        add_dp(&ps1, "dp1", &dps[0]);
        add_site(&ps1, "CH1", &ch1_link, CH1_TOKEN, opts.ch1_rate_limit);
        let pkg = text(&ps1.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
        ps1.cli_json(&["distribute", &pkg, "--dp", "dp1", "--site", "CH1"]);
        Self { ps1, ch1, gc1, dps, src, pkg, dir }
    }

    fn dp(&self, name: &str) -> &Agent {
        &self.dps[DP_NAMES.iter().position(|n| *n == name).expect("known DP")]
    }

    fn sites(&self) -> Vec<&Daemon> {
        vec![self.ps1.daemon(), self.ch1.daemon(), self.gc1.daemon()]
    }

    /// Every daemon, for logs in panic messages.
    fn all(&self) -> Vec<&Daemon> {
        let mut v = self.sites();
        v.extend(self.dps.iter().map(|a| a.daemon()));
        v
    }

    /// `refresh PKG --wait --timeout 30 --json` at PS1, asserting exit 0; returns its JSON
    /// (the refresh report with the final `status`).
    fn refresh_wait(&self) -> Value {
        let args = ["refresh", &self.pkg, "--wait", "--timeout", &WAIT_SECS.to_string(), "--json"];
        let started = Instant::now();
        let out = self.ps1.cli(&args);
        assert!(
            out.status.success(),
            "`dpsync {}` at PS1 exited {} after {:?}:\n{}{}",
            args.join(" "),
            out.status,
            started.elapsed(),
            String::from_utf8_lossy(&out.stderr).trim(),
            log_tails(&self.all())
        );
        serde_json::from_slice(&out.stdout).expect("refresh --json prints JSON")
    }

    /// Asserts the live tree of each named DP is byte-identical to `expected`.
    fn assert_dps_hold(&self, names: &[&str], expected: &TreeDigest, what: &str) {
        for n in names {
            let cur = self.dp(n).current(&self.pkg);
            assert!(cur.exists(), "{n} has no live tree {} ({what}){}", cur.display(), log_tails(&self.all()));
            let d = tree_digest(&cur).diff(expected);
            assert!(d.is_empty(), "{n}'s live tree differs from {what}:\n{d}");
        }
    }

    /// Asserts PS1's nested status shows every named DP installed at `version`.
    fn assert_status_installed(&self, status: &Value, names: &[&str], version: u64) {
        let dps = dp_entries(status);
        for n in names {
            let t = dps.get(*n).unwrap_or_else(|| panic!("{n} is not in PS1's status:\n{status:#}"));
            assert_eq!(t["state"], "installed", "{n}'s state in PS1's status:\n{status:#}");
            assert_eq!(t["installed_version"].as_u64(), Some(version), "{n}'s version in PS1's status:\n{status:#}");
        }
    }

    /// Appends `append` incompressible bytes to the largest file and adds a new file of
    /// `new_file` bytes; returns the digest of the changed source.
    fn change(&self, seed: u64, append: u64, new_file: u64) -> TreeDigest {
        if append > 0 {
            let largest = largest_file(&self.src);
            append_bytes(&largest, &random_bytes(append as usize, seed));
        }
        if new_file > 0 {
            write_random_file(&self.src.join(format!("added/new-{seed}.bin")), new_file, seed ^ 0xA5A5);
        }
        set_old_mtimes(&self.src);
        tree_digest(&self.src)
    }
}

/// The largest regular file under `root` (ties: first by path).
fn largest_file(root: &Path) -> PathBuf {
    let mut best: Option<(u64, PathBuf)> = None;
    for e in walkdir::WalkDir::new(root).sort_by_file_name() {
        let e = e.expect("walk source");
        if e.file_type().is_file() {
            let len = e.metadata().expect("metadata").len();
            if best.as_ref().is_none_or(|(l, _)| len > *l) {
                best = Some((len, e.path().to_owned()));
            }
        }
    }
    best.expect("a file in the source").1
}

/// Every DP in a `status --json` document, child sites' own targets included, by name.
fn dp_entries(status: &Value) -> BTreeMap<String, Value> {
    fn walk(targets: &Value, out: &mut BTreeMap<String, Value>) {
        for t in targets.as_array().into_iter().flatten() {
            if t["kind"] == "dp" {
                out.insert(text(t, "name").to_owned(), t.clone());
            }
            walk(&t["targets"], out);
        }
    }
    let mut out = BTreeMap::new();
    walk(&status["targets"], &mut out);
    out
}

fn bytes_sent_last(t: &Value) -> u64 {
    num(t, "bytes_sent_last")
}

// ---------------------------------------------------------------------------------------

#[test]
fn one_refresh_at_the_top_installs_on_every_tier() {
    let t = Topology::new(11, 50, Opts::default());
    let r = t.refresh_wait();
    assert_eq!(num(&r, "source_version"), 1);
    let want = tree_digest(&t.src);
    t.assert_dps_hold(&DP_NAMES, &want, "the source");

    let status = t.ps1.status(&t.pkg);
    assert_eq!(status["source_site"], "PS1");
    t.assert_status_installed(&status, &DP_NAMES, 1);
    // The nesting follows the tree: CH1 holds dp2, dp3 and GC1; GC1 holds dp4.
    let ch1 = target_of(&status, "CH1");
    assert_eq!(ch1["kind"], "site");
    assert_eq!(ch1["state"], "installed");
    assert_eq!(ch1["installed_version"].as_u64(), Some(1));
    for n in ["dp2", "dp3"] {
        assert_eq!(target_of(ch1, n)["kind"], "dp");
    }
    let gc1 = target_of(ch1, "GC1");
    assert_eq!(gc1["kind"], "site");
    assert_eq!(gc1["installed_version"].as_u64(), Some(1));
    assert_eq!(target_of(gc1, "dp4")["installed_version"].as_u64(), Some(1));

    // The relays keep the package's id, owner and version number.
    for (site, code) in [(&t.ch1, "CH1"), (&t.gc1, "GC1")] {
        let show = site.cli_json(&["package", "show", &t.pkg]);
        assert_eq!(show["source_site"], "PS1", "{code}: {show:#}");
        assert_eq!(num(&show, "source_version"), 1, "{code}: {show:#}");
        assert_eq!(show["content_root"], status["content_root"], "{code}: {show:#}");
    }
}

#[test]
fn a_change_crosses_each_site_link_once() {
    let t = Topology::new(12, 60, Opts::default());
    t.refresh_wait();
    let want = t.change(1201, 200 * KIB, 300 * KIB);
    let r = t.refresh_wait();
    assert_eq!(num(&r, "source_version"), 2);
    t.assert_dps_hold(&DP_NAMES, &want, "the changed source");

    let status = t.ps1.status(&t.pkg);
    t.assert_status_installed(&status, &DP_NAMES, 2);
    let dp1 = bytes_sent_last(target_of(&status, "dp1"));
    let ch1_entry = target_of(&status, "CH1");
    let to_ch1 = bytes_sent_last(ch1_entry);
    let dp2 = bytes_sent_last(target_of(ch1_entry, "dp2"));
    let dp3 = bytes_sent_last(target_of(ch1_entry, "dp3"));
    let to_gc1 = bytes_sent_last(target_of(ch1_entry, "GC1"));
    let dp4 = bytes_sent_last(target_of(target_of(ch1_entry, "GC1"), "dp4"));
    eprintln!(
        "bytes sent for the change: dp1 {dp1}, PS1→CH1 {to_ch1}, dp2 {dp2}, dp3 {dp3}, CH1→GC1 {to_gc1}, dp4 {dp4}"
    );
    // One DP needs about the change (500 KiB of incompressible data), not the tree.
    assert!((500 * KIB..2 * MIB).contains(&dp1), "dp1 received {dp1} bytes for a 500 KiB change:\n{status:#}");
    let bound = dp1 + dp1 / 4 + 64 * KIB;
    assert!(to_ch1 <= bound, "PS1→CH1 carried {to_ch1} bytes, one DP needed {dp1} (bound {bound}):\n{status:#}");
    assert!(to_gc1 <= bound, "CH1→GC1 carried {to_gc1} bytes, one DP needed {dp1} (bound {bound}):\n{status:#}");
    for (n, b) in [("dp2", dp2), ("dp3", dp3), ("dp4", dp4)] {
        assert!(b <= bound, "{n} received {b} bytes, dp1 needed {dp1}:\n{status:#}");
    }
}

#[test]
fn a_child_relays_but_does_not_refresh_its_parents_package() {
    let t = Topology::new(13, 30, Opts::default());
    t.refresh_wait();
    let msg = t.ch1.cli_fail(&["refresh", &t.pkg]);
    assert!(msg.contains("PS1"), "the refusal should name the owner PS1: {msg}");
    assert!(msg.contains(&t.pkg), "the refusal should name the package: {msg}");

    for (site, code) in [(&t.ch1, "CH1"), (&t.gc1, "GC1")] {
        let list = site.cli_json(&["package", "list"]);
        let p = list
            .as_array()
            .expect("package list is an array")
            .iter()
            .find(|p| p["id"] == t.pkg.as_str())
            .unwrap_or_else(|| panic!("{code} does not list {}: {list:#}", t.pkg));
        assert_eq!(p["source_site"], "PS1", "{code}: {p:#}");
        assert_eq!(num(p, "source_version"), 1, "{code}: the refused refresh must not commit: {p:#}");
        assert!(p["source_path"].is_null(), "{code} has no source folder for a relayed package: {p:#}");
    }
    // The grandchild refuses too, naming the owner, not its direct parent.
    let msg = t.gc1.cli_fail(&["refresh", &t.pkg]);
    assert!(msg.contains("PS1"), "GC1's refusal should name the owner PS1: {msg}");
}

/// A digest of the tree `current` points to (resolved once, so a switch in the middle of
/// the walk cannot fake a mix); `None` if a read fails (a tree being deleted).
fn live_digest(current: &Path) -> Option<TreeDigest> {
    let link = fs::read_link(current).ok()?;
    try_tree_digest(&current.parent()?.join(link)).ok()
}

#[test]
fn a_child_killed_mid_transfer_resumes_and_no_dp_ever_shows_a_mix() {
    let mut t = Topology::new(14, 30, Opts { ch1_rate_limit: Some(2_000_000), ch1_fixed_port: true });
    t.refresh_wait();
    let old = tree_digest(&t.src);
    t.assert_dps_hold(&DP_NAMES, &old, "the source");
    let change = 30 * MIB;
    let new = t.change(1401, 16 * KIB, change);

    // Sample every DP's live tree until the end: each must be the old or the new tree.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let currents: Vec<(String, PathBuf)> =
            DP_NAMES.iter().map(|n| (n.to_string(), t.dp(n).current(&t.pkg))).collect();
        let (old, new) = (old.clone(), new.clone());
        std::thread::spawn(move || {
            let mut seen: BTreeMap<String, (u32, u32, u32)> = BTreeMap::new(); // old, new, unreadable
            let mut mixes = Vec::new();
            // Bounded even if the test fails before it says stop.
            let deadline = Instant::now() + Duration::from_secs(90);
            loop {
                let last = stop.load(Ordering::SeqCst) || Instant::now() > deadline;
                for (n, cur) in &currents {
                    let e = seen.entry(n.clone()).or_default();
                    match live_digest(cur) {
                        Some(d) if d == old => e.0 += 1,
                        Some(d) if d == new => e.1 += 1,
                        Some(d) => {
                            mixes.push(format!("{n}: neither the old nor the new tree; vs new:\n{}", d.diff(&new)))
                        }
                        None => e.2 += 1,
                    }
                }
                if last {
                    return (seen, mixes);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    let r = t.ps1.cli_json(&["refresh", &t.pkg]);
    let v2 = num(&r, "source_version");
    assert_eq!(v2, 2);

    // Let CH1 stage a few MB of the change, then kill it.
    let staging = t.ch1.data_dir.join("staging").join(&t.pkg);
    let staged_bytes = || -> u64 {
        fs::read_dir(&staging)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    wait_until("CH1 to stage 3 MB of the change", Duration::from_secs(20), &t.sites(), || {
        (staged_bytes() >= 3_000_000).then_some(())
    });
    t.ch1.kill9();
    let staged = staged_bytes();
    assert!(staged >= 3_000_000, "CH1's staged packs vanished with the kill ({staged} bytes left)");
    assert!(staged < change, "CH1 received the whole change before the kill; slow the link down");
    std::thread::sleep(Duration::from_millis(300));
    t.ch1.restart();

    let status =
        t.ps1.wait_status(&t.pkg, "all four DPs to install version 2", Duration::from_secs(35), &t.all()[1..], |s| {
            let dps = dp_entries(s);
            DP_NAMES.iter().all(|n| {
                dps.get(*n).is_some_and(|d| d["state"] == "installed" && d["installed_version"].as_u64() == Some(v2))
            })
        });
    stop.store(true, Ordering::SeqCst);
    let (seen, mixes) = sampler.join().expect("sampler thread");
    eprintln!("samples per DP (old, new, unreadable): {seen:?}");
    assert!(mixes.is_empty(), "a DP showed a mixed tree:\n{}", mixes.join("\n"));
    for n in DP_NAMES {
        let (o, nw, unreadable) = seen[n];
        assert!(o >= 1 && nw >= 1, "{n} was sampled {o} times old and {nw} times new: too few samples");
        assert_eq!(unreadable, 0, "{n}'s live tree could not be read {unreadable} times");
    }
    t.assert_dps_hold(&DP_NAMES, &new, "the changed source");
    t.assert_status_installed(&status, &DP_NAMES, v2);

    // CH1 kept what it had staged: the link carried the change about once.
    let to_ch1 = bytes_sent_last(target_of(&status, "CH1"));
    eprintln!("PS1→CH1 carried {to_ch1} bytes for a {change}-byte change; {staged} bytes were staged at the kill");
    assert!(
        to_ch1 < change + staged / 2,
        "PS1→CH1 carried {to_ch1} bytes for a {change}-byte change: the restarted child did not keep its \
         {staged} staged bytes:\n{status:#}"
    );
}

#[test]
fn a_rollback_at_the_owner_propagates_and_a_child_cannot_roll_back() {
    let t = Topology::new(15, 40, Opts::default());
    t.refresh_wait();
    let v1 = tree_digest(&t.src);
    let v2 = t.change(1501, 200 * KIB, 300 * KIB);
    t.refresh_wait();
    t.assert_dps_hold(&DP_NAMES, &v2, "version 2");

    let out = t.ps1.cli(&["rollback", &t.pkg, "--wait", "--timeout", &WAIT_SECS.to_string(), "--json"]);
    assert!(
        out.status.success(),
        "rollback --wait at PS1 exited {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        log_tails(&t.all())
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("rollback --json prints JSON");
    assert_eq!(num(&r, "source_version"), 3, "{r:#}");
    assert_eq!(num(&r, "restored_version"), 1, "{r:#}");
    t.assert_dps_hold(&DP_NAMES, &v1, "version 1 (rolled back to)");
    t.assert_status_installed(&t.ps1.status(&t.pkg), &DP_NAMES, 3);

    for (site, code) in [(&t.ch1, "CH1"), (&t.gc1, "GC1")] {
        let msg = site.cli_fail(&["rollback", &t.pkg]);
        assert!(msg.contains("PS1"), "{code}'s refusal should name the owner PS1: {msg}");
        let show = site.cli_json(&["package", "show", &t.pkg]);
        assert_eq!(num(&show, "source_version"), 3, "{code}: the refused rollback must not commit: {show:#}");
    }
    t.assert_dps_hold(&DP_NAMES, &v1, "version 1 (after the refused rollbacks)");
}

#[test]
fn a_childs_admin_removes_a_package_from_one_of_its_dps() {
    let t = Topology::new(16, 30, Opts::default());
    t.refresh_wait();
    let out = t.ch1.cli(&["remove", &t.pkg, "--dp", "dp3", "--wait", "--timeout", &WAIT_SECS.to_string()]);
    assert!(
        out.status.success(),
        "remove --dp dp3 --wait at CH1 exited {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        log_tails(&t.all())
    );
    let dp3_dir = t.dp("dp3").package_dir(&t.pkg);
    assert!(!dp3_dir.exists(), "dp3 still has {} after the removal", dp3_dir.display());

    let want = t.change(1601, 100 * KIB, 200 * KIB);
    let r = t.refresh_wait();
    let v2 = num(&r, "source_version");
    assert_eq!(v2, 2);
    t.assert_dps_hold(&["dp1", "dp2", "dp4"], &want, "the changed source");
    assert!(!dp3_dir.exists(), "the parent's new version reached dp3 after CH1 removed it there");
    let status = t.ps1.status(&t.pkg);
    t.assert_status_installed(&status, &["dp1", "dp2", "dp4"], v2);
    let dp3 = &dp_entries(&status)["dp3"];
    assert_eq!(dp3["state"], "removed", "dp3 in PS1's status:\n{status:#}");
    assert!(dp3["installed_version"].is_null(), "dp3 in PS1's status:\n{status:#}");
}

#[test]
fn a_package_the_parent_removed_from_a_child_comes_back_when_sent_again() {
    let t = Topology::new(17, 30, Opts::default());
    t.refresh_wait();
    let want = tree_digest(&t.src);
    let wait = WAIT_SECS.to_string();
    // CH1's administrator takes it off dp3 first: that choice must survive.
    t.ch1.cli_json(&["remove", &t.pkg, "--dp", "dp3", "--wait", "--timeout", &wait]);

    t.ps1.cli_json(&["remove", &t.pkg, "--site", "CH1", "--wait", "--timeout", &wait]);
    for n in ["dp2", "dp4"] {
        let d = t.dp(n).package_dir(&t.pkg);
        wait_until(&format!("{n} to lose the package"), WAIT_DURATION, &t.all(), || (!d.exists()).then_some(()));
    }
    t.assert_dps_hold(&["dp1"], &want, "the source");

    let out = t.ps1.cli(&["distribute", &t.pkg, "--site", "CH1", "--wait", "--timeout", &wait]);
    assert!(
        out.status.success(),
        "distribute --site CH1 --wait exited {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        log_tails(&t.all())
    );
    t.assert_dps_hold(&["dp1", "dp2", "dp4"], &want, "the source (sent again)");
    assert!(!t.dp("dp3").package_dir(&t.pkg).exists(), "dp3 got the package back although CH1's admin removed it");
    let status = t.ps1.status(&t.pkg);
    t.assert_status_installed(&status, &["dp1", "dp2", "dp4"], 1);
    assert_eq!(dp_entries(&status)["dp3"]["state"], "removed", "{status:#}");
}

/// v1 everywhere; then dp2 is down (so CH1 cannot finish), PS1 commits v2, CH1 accepts it
/// and is killed: PS1 sees CH1 at v2 but cannot ask it about its own targets.
fn child_down_after_accepting_a_version() -> Topology {
    let mut t = Topology::new(18, 20, Opts::default());
    t.refresh_wait();
    t.dps[1].kill9();
    t.change(1801, 10 * KIB, 10 * KIB);
    t.ps1.cli_json(&["refresh", &t.pkg]);
    t.ps1.wait_status(&t.pkg, "CH1 to hold version 2", WAIT_DURATION, &t.all()[1..], |s| {
        let c = target_of(s, "CH1");
        c["state"] == "installed" && c["installed_version"].as_u64() == Some(2)
    });
    t.ch1.kill9();
    t
}

#[test]
fn status_says_when_a_child_site_cannot_report_its_own_targets() {
    let t = child_down_after_accepting_a_version();
    let status = t.ps1.status(&t.pkg);
    let ch1 = target_of(&status, "CH1");
    assert!(ch1["targets"].is_null(), "CH1 is down, yet its targets are shown: {status:#}");
    let err =
        ch1["last_error"].as_str().unwrap_or_else(|| panic!("CH1 shows no reason for its missing targets: {status:#}"));
    assert!(err.contains("unknown"), "{err}");
}

#[test]
fn wait_does_not_succeed_while_a_child_site_cannot_report_its_own_targets() {
    let t = child_down_after_accepting_a_version();
    let out = t.ps1.cli(&["distribute", &t.pkg, "--dp", "dp1", "--site", "CH1", "--wait", "--timeout", "3"]);
    assert!(
        !out.status.success(),
        "--wait reported success while CH1 (down) has not installed version 2 on its DPs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_small_change_relays_as_deltas_on_every_link() {
    let t = Topology::new(13, 800, Opts::default());
    t.refresh_wait();
    let full = {
        let status = t.ps1.status(&t.pkg);
        bytes_sent_last(target_of(&status, "dp1"))
    };
    let want = t.change(1301, 100, 0);
    let r = t.refresh_wait();
    assert_eq!(num(&r, "source_version"), 2);
    t.assert_dps_hold(&DP_NAMES, &want, "the changed source");
    let status = t.ps1.status(&t.pkg);
    t.assert_status_installed(&status, &DP_NAMES, 2);
    let ch1_entry = target_of(&status, "CH1");
    let gc1_entry = target_of(ch1_entry, "GC1");
    let links = [
        ("PS1→dp1", bytes_sent_last(target_of(&status, "dp1"))),
        ("PS1→CH1", bytes_sent_last(ch1_entry)),
        ("CH1→dp2", bytes_sent_last(target_of(ch1_entry, "dp2"))),
        ("CH1→dp3", bytes_sent_last(target_of(ch1_entry, "dp3"))),
        ("CH1→GC1", bytes_sent_last(gc1_entry)),
        ("GC1→dp4", bytes_sent_last(target_of(gc1_entry, "dp4"))),
    ];
    eprintln!("bytes sent for a 100-byte append (first install of dp1: {full}): {links:?}");
    // A manifest delta and one chunk encoded against the one it replaces, on every link
    // (the full manifest of 800 files alone is about 100 KB).
    for (link, sent) in links {
        assert!(sent < 4 * KIB, "{link} carried {sent} bytes for a 100-byte append:\n{status:#}");
    }
}

/// `validate PKG` at the top covers every tier: a child site validates its own DPs (and
/// its child's, through it), reports what they found under their names, and repairs them.
#[test]
fn validate_at_the_top_covers_the_dps_of_child_sites() {
    let t = Topology::new(18, 20, Opts::default());
    t.refresh_wait();
    let clean = t.ps1.cli_json(&["validate", &t.pkg]);
    for name in ["dp1", "CH1"] {
        assert_eq!(target_of(&clean, name)["ok"], true, "{clean:#}");
    }
    assert!(num(target_of(&clean, "CH1"), "files_checked") >= 3 * 20, "dp2, dp3 and dp4 were checked: {clean:#}");

    let victim = largest_file(&t.src).strip_prefix(&t.src).unwrap().to_str().unwrap().to_owned();
    for dp in ["dp3", "dp4"] {
        let path = t.dp(dp).current(&t.pkg).join(&victim);
        fs::remove_file(&path).unwrap();
    }
    fs::write(t.dp("dp2").current(&t.pkg).join("stray.txt"), b"x").unwrap();
    let out = t.ps1.cli(&["validate", &t.pkg, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ch1 = target_of(&v, "CH1");
    assert_eq!(ch1["ok"], false, "{v:#}");
    let broken: Vec<&str> = ch1["broken"].as_array().unwrap().iter().map(|b| b.as_str().unwrap()).collect();
    assert_eq!(broken, [format!("GC1: dp4: {victim}"), format!("dp3: {victim}")], "{v:#}");
    let repaired = ch1["repaired"].as_array().unwrap();
    assert!(repaired.contains(&Value::from("dp2: stray.txt: extra file removed")), "{v:#}");
    // Deleting the file moved its folder's time on dp3 and dp4: put back too.
    let folder = Path::new(&victim).parent().unwrap().to_str().unwrap();
    assert!(repaired.contains(&Value::from(format!("dp3: {folder}: modification time set back"))), "{v:#}");
    assert_eq!(ch1["repair_queued"], true, "{v:#}");
    assert_eq!(target_of(&v, "dp1")["ok"], true, "{v:#}");

    let want = tree_digest(&t.src);
    poll_until(WAIT_DURATION, || {
        ["dp2", "dp3", "dp4"]
            .iter()
            .all(|n| try_tree_digest(&t.dp(n).current(&t.pkg)).is_ok_and(|d| d == want))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("the child sites did not repair their DPs{}", log_tails(&t.all())));
    let again = t.ps1.cli_json(&["validate", &t.pkg]);
    assert_eq!(target_of(&again, "CH1")["ok"], true, "{again:#}");
}

/// `SetSourceSite`: PS1 hands its package to its child CH1. Afterwards only CH1 refreshes
/// it, versions keep growing, the id stays, and every DP below CH1 (one of them offline
/// during the handover, one behind the grandchild GC1) takes CH1's versions without any
/// key being pinned again.
#[test]
fn a_package_handed_to_a_child_site_is_refreshed_there_and_reaches_every_dp() {
    let mut t = Topology::new(23, 20, Opts::default());
    t.refresh_wait();
    let v1 = tree_digest(&t.src);
    t.dps[2].terminate(); // dp3, behind CH1, is offline during the handover

    let set = t.ps1.cli_json(&["package", "set", &t.pkg, "--source-site", "CH1"]);
    assert_eq!(set["source_site"], "CH1", "{set:#}");
    assert_eq!(set["id"], t.pkg.as_str(), "the id stays");
    let msg = t.ps1.cli_fail(&["refresh", &t.pkg]);
    assert!(msg.contains("CH1"), "PS1's refusal should name the new owner: {msg}");
    let msg = t.ps1.cli_fail(&["package", "set", &t.pkg, "--source-site", "GC1"]);
    assert!(msg.contains("CH1"), "only the owner hands a package over: {msg}");

    // CH1 learns it owns the package, is given a source folder and refreshes it.
    let p = poll_until(WAIT_DURATION, || {
        let p = t.ch1.cli_json(&["package", "show", &t.pkg]);
        (p["source_site"] == "CH1").then_some(p)
    })
    .unwrap_or_else(|| panic!("CH1 never took the package over{}", log_tails(&t.all())));
    assert_eq!(num(&p, "source_version"), 1, "{p:#}");
    let src2 = t.dir.join("src2");
    gen_tree(&src2, 25, 2323, 1..64 * KIB);
    set_old_mtimes(&src2);
    t.ch1.cli_json(&["package", "set", &t.pkg, "--source", s(&src2)]);
    let r = t.ch1.cli_json(&["refresh", &t.pkg]);
    assert_eq!(num(&r, "source_version"), 2, "versions keep growing at the new owner: {r:#}");
    let v2 = tree_digest(&src2);
    for (site, dp) in [(&t.ch1, "dp2"), (&t.gc1, "dp4")] {
        site.wait_installed(&t.pkg, dp, 2, WAIT_DURATION, &t.all());
    }
    t.assert_dps_hold(&["dp2", "dp4"], &v2, "CH1's version 2");

    // The DP that was offline takes CH1's version when it is back, without a command.
    t.dps[2].restart();
    t.ch1.wait_installed(&t.pkg, "dp3", 2, WAIT_DURATION, &t.all());
    t.assert_dps_hold(&["dp3"], &v2, "CH1's version 2");
    // PS1's own DP keeps what PS1 last sent; nothing was pinned anew anywhere.
    t.assert_dps_hold(&["dp1"], &v1, "PS1's version 1");
    for dp in ["dp2", "dp3", "dp4"] {
        let pinned = fs::read_to_string(t.dp(dp).data_dir.join("trusted-sites.json")).unwrap();
        assert!(!pinned.contains("CH1"), "{dp} pinned CH1's key: {pinned}");
        assert!(t.dp(dp).log().contains("package handed over"), "{dp} did not record the handover");
    }
    // A version signed by the old owner after the handover is refused everywhere: PS1
    // cannot make one (refused above); its rollback is refused too.
    let msg = t.ps1.cli_fail(&["rollback", &t.pkg]);
    assert!(msg.contains("CH1"), "{msg}");

    // The other way: CH1 hands it back to PS1, which takes it back and refreshes it.
    let msg = t.ps1.cli_fail(&["package", "set", &t.pkg, "--source-site", "PS1"]);
    assert!(msg.contains("has not handed it"), "PS1 cannot take it before CH1 hands it back: {msg}");
    t.ch1.cli_json(&["package", "set", &t.pkg, "--source-site", "PS1"]);
    let back = t.ps1.cli_json(&["package", "set", &t.pkg, "--source-site", "PS1"]);
    assert_eq!(back["source_site"], "PS1", "{back:#}");
    let msg = t.ch1.cli_fail(&["refresh", &t.pkg]);
    assert!(msg.contains("PS1"), "CH1 no longer owns it: {msg}");
    assert!(back["source_path"].is_null(), "a package handed away keeps no source folder: {back:#}");
    t.ps1.cli_json(&["package", "set", &t.pkg, "--source", s(&t.src)]);
    let v3 = t.change(24, 8 * KIB, 4 * KIB);
    let r = t.ps1.cli_json(&["refresh", &t.pkg]);
    assert_eq!(num(&r, "source_version"), 3, "versions keep growing after the handback: {r:#}");
    for (site, dp) in [(&t.ps1, "dp1"), (&t.ch1, "dp2"), (&t.ch1, "dp3"), (&t.gc1, "dp4")] {
        site.wait_installed(&t.pkg, dp, 3, WAIT_DURATION, &t.all());
    }
    t.assert_dps_hold(&DP_NAMES, &v3, "PS1's version 3");
}
