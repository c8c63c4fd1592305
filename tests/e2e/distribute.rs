//! Distribution end to end: one site server pushing to real `dpsync agent` processes on
//! loopback. Identical trees after `refresh --wait`, bytes on the wire for small
//! changes, an agent or the server killed in the middle of a transfer, an agent that
//! stays down, damage on the wire, `rollback`, `redistribute`, `remove`, client
//! downloads, `validate` and repair, the no-change relabel, and a wrong token.
//!
//! Byte-count assertions use incompressible (BLAKE3-stream) data, so compression does
//! not blur them.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use dpsync_hash::{ChunkParams, digest_stream};
use serde_json::Value;

use crate::harness::*;
use crate::proxy::Proxy;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// Longest a distribution step may take in these tests.
const WAIT: Duration = Duration::from_secs(60);

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A server on `DIR/d`, agents on `DIR/a1`, `DIR/a2`, … registered as `dp1`, `dp2`, …
/// (group `all`, each with its own token), and a package `app` over `DIR/src`.
struct Site {
    server: Server,
    agents: Vec<Agent>,
    src: PathBuf,
    id: String,
    // Last, so that the daemons are stopped before their directories are removed.
    dir: TestDir,
}

impl Site {
    /// Server started with `server_args` (e.g. `--retries`), package `app` added over an
    /// empty `DIR/src`; no DP yet.
    fn new(server_args: &[&str]) -> Self {
        let dir = TestDir::new();
        let src = dir.join("src");
        fs::create_dir_all(&src).unwrap();
        let opts = ServerOpts { args: server_args.iter().map(|a| a.to_string()).collect(), ..ServerOpts::site("PS1") };
        let server = Server::start_with(dir.join("d"), opts);
        let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
        Self { server, agents: Vec::new(), src, id, dir }
    }

    /// [`Site::new`] with `n` DPs.
    fn with_dps(n: usize, server_args: &[&str]) -> Self {
        let mut site = Self::new(server_args);
        for _ in 0..n {
            site.add_dp(None);
        }
        site
    }

    /// Starts the next agent (`dpN`, token `token-dpN`) and adds it to the server, with
    /// `--rate-limit` if given. Returns its index.
    fn add_dp(&mut self, rate_limit: Option<u64>) -> usize {
        let i = self.agents.len();
        let name = dp(i);
        let token = format!("token-{name}");
        let agent = Agent::start(self.dir.join(format!("a{}", i + 1)), Some(&token));
        let url = agent.url();
        self.agents.push(agent);
        self.register(i, &url, Some(&token), rate_limit);
        i
    }

    /// `dp add dpN URL --group all [--token T] [--rate-limit R]`.
    fn register(&self, i: usize, url: &str, token: Option<&str>, rate_limit: Option<u64>) {
        let name = dp(i);
        let mut args = vec!["dp", "add", name.as_str(), url, "--group", "all"];
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        let rate = rate_limit.map(|r| r.to_string());
        if let Some(r) = &rate {
            args.extend(["--rate-limit", r.as_str()]);
        }
        self.server.cli_json(&args);
    }

    /// `distribute app --group all`.
    fn distribute_all(&self) {
        let r = self.server.cli_json(&["distribute", &self.id, "--group", "all"]);
        assert_eq!(r["targets"].as_array().map(Vec::len), Some(self.agents.len()), "{r:#}");
    }

    fn daemons(&self) -> Vec<&Daemon> {
        let mut d = vec![self.server.daemon()];
        d.extend(self.agents.iter().map(Agent::daemon));
        d
    }

    fn tails(&self) -> String {
        log_tails(&self.daemons())
    }

    /// Runs `args` + `--json` and expects exit 0; returns the JSON.
    fn cli_ok(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.server.cli(&a);
        if !out.status.success() {
            panic!(
                "`dpsync {}` failed ({}): {}\n--- stdout\n{}{}",
                a.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout),
                self.tails()
            );
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("`dpsync {}` printed no JSON ({e}): {}", a.join(" "), String::from_utf8_lossy(&out.stdout))
        })
    }

    /// `refresh app --wait --json`, which must exit 0; returns its JSON (with `status`).
    fn refresh_wait(&self) -> Value {
        self.cli_ok(&["refresh", &self.id, "--wait", "--timeout", "60"])
    }

    /// `refresh app --wait --json` whatever its outcome.
    fn refresh_wait_output(&self) -> Output {
        self.server.cli(&["refresh", &self.id, "--wait", "--timeout", "60", "--json"])
    }

    fn status(&self) -> Value {
        self.server.status(&self.id)
    }

    /// Waits until `dpN` has `version` installed; returns its status entry.
    fn wait_installed(&self, i: usize, version: u64) -> Value {
        self.server.wait_installed(&self.id, &dp(i), version, WAIT, &self.daemons()[1..])
    }

    /// Asserts every agent's live tree equals the source (content, modes, times).
    fn assert_all_match_source(&self) {
        for a in &self.agents {
            assert_same_tree_and_times(&self.src, &a.current(&self.id));
        }
    }
}

/// The name of the `i`-th DP (0-based): `dp1`, `dp2`, …
fn dp(i: usize) -> String {
    format!("dp{}", i + 1)
}

fn sent_last(t: &Value) -> u64 {
    num(t, "bytes_sent_last")
}

fn sent_total(t: &Value) -> u64 {
    num(t, "bytes_sent_total")
}

/// Upper bound of the encoded manifest of the tree under `root`, before compression,
/// from its real chunk lists: per entry 60 bytes + its path (+ a symlink's target), per
/// chunk 36 bytes (BLAKE3 + length), a header, and 1 KiB of compression framing.
fn manifest_bound(root: &Path) -> u64 {
    let params = ChunkParams::default();
    let mut total = 64 + 1024;
    for e in walkdir::WalkDir::new(root).min_depth(1) {
        let e = e.unwrap();
        let rel = e.path().strip_prefix(root).unwrap().as_os_str().len() as u64;
        total += 60 + rel;
        if e.file_type().is_symlink() {
            total += 2 + fs::read_link(e.path()).unwrap().as_os_str().len() as u64;
        } else if e.file_type().is_file() {
            let d = digest_stream(fs::File::open(e.path()).unwrap(), &mut std::io::sink(), &params).unwrap();
            total += 36 * d.chunks.len() as u64;
        }
    }
    total
}

/// Overwrites `len` bytes at `offset` of an existing file with fresh random bytes.
fn overwrite(path: &Path, offset: u64, len: usize, seed: u64) {
    let mut f = fs::OpenOptions::new().write(true).open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&random_bytes(len, seed)).unwrap();
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Sum of the sizes of the `*.pack` files in a staging folder (0 if it does not exist).
fn staged_bytes(staging: &Path) -> u64 {
    let Ok(rd) = fs::read_dir(staging) else { return 0 };
    rd.flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "pack"))
        .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .sum()
}

/// A generated tree with some variety beyond [`gen_tree`]: an executable, a read-only
/// file, a private folder, a symlink. Old mtimes set.
fn varied_tree(src: &Path, files: usize, seed: u64, sizes: std::ops::Range<u64>) -> Tree {
    let mut tree = gen_tree(src, files, seed, sizes);
    tree.add_file(src, "bin/run.sh", 3000, seed + 1);
    chmod(&src.join("bin/run.sh"), 0o755);
    tree.add_file(src, "conf/readonly.cfg", 1234, seed + 2);
    chmod(&src.join("conf/readonly.cfg"), 0o444);
    tree.add_file(src, "private/secret.dat", 40 * KIB, seed + 3);
    chmod(&src.join("private/secret.dat"), 0o600);
    chmod(&src.join("private"), 0o700);
    tree.add_symlink(src, "bin/run-link", "run.sh");
    set_old_mtimes(src);
    tree
}

// ---------------------------------------------------------------------------------------
// 1. Identical trees on three DPs

#[test]
fn refresh_wait_installs_identical_trees_on_three_dps() {
    let site = Site::with_dps(3, &[]);
    let tree = varied_tree(&site.src, 400, 101, 0..96 * KIB);
    site.distribute_all();
    let r = site.refresh_wait();
    assert_eq!(num(&r, "source_version"), 1);
    site.assert_all_match_source();

    let total = tree.total_bytes();
    for (i, a) in site.agents.iter().enumerate() {
        let t = target_of(&r["status"], &dp(i));
        assert_eq!(t["state"], "installed", "{t:#}");
        assert_eq!(t["installed_version"], 1, "{t:#}");
        assert!(t["last_error"].is_null(), "{t:#}");
        // Everything went over the wire once (random data does not compress).
        assert!(sent_last(t) >= total, "{}: sent {} < {total} bytes of content", dp(i), sent_last(t));
        assert!(sent_last(t) < total + total / 20 + manifest_bound(&site.src), "{}: sent {}", dp(i), sent_last(t));
        assert_eq!(sent_total(t), sent_last(t));
        // The live tree is a symlink to a version folder.
        let link = fs::read_link(a.current(&site.id)).expect("current is a symlink");
        assert!(link.starts_with("versions"), "current -> {}", link.display());
        // And clients get the same bytes.
        let (rel, _) = tree.files.iter().find(|(_, n)| **n > 1000).unwrap();
        let resp = a.download(&site.id, rel);
        assert_eq!(resp.status, 200, "{}", resp.body_text());
        assert_eq!(resp.body, fs::read(site.src.join(rel)).unwrap());
    }
}

/// Bytes a process handed to `write`-like calls so far (`wchar` in `/proc/PID/io`).
fn bytes_written_by(pid: u32) -> u64 {
    let io = fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines().find_map(|l| l.strip_prefix("wchar: ")).unwrap().trim().parse().unwrap()
}

#[test]
fn a_first_install_writes_each_received_byte_once() {
    let site = Site::with_dps(1, &[]);
    let mut tree = gen_tree(&site.src, 60, 111, 0..256 * KIB);
    tree.add_file(&site.src, "big/a.bin", 12 * MIB, 112);
    tree.add_file(&site.src, "big/b.bin", 5 * MIB, 113);
    set_old_mtimes(&site.src);
    site.distribute_all();
    let pid = site.agents[0].daemon().pid();
    let before = bytes_written_by(pid);
    site.refresh_wait();
    site.assert_all_match_source();
    let written = bytes_written_by(pid) - before;
    let total = tree.total_bytes();
    eprintln!("the agent wrote {written} bytes for {total} bytes of content");
    // Content once, plus its database (manifest twice, chunk rows) and its log.
    assert!(written >= total, "wrote {written} bytes for {total} bytes of content");
    assert!(written < total + total / 10 + 2 * MIB, "wrote {written} bytes for {total} bytes of content");
    let staging = site.agents[0].staging(&site.id);
    assert!(!staging.exists() || count_entries(&staging) == 0, "staging is empty after the install");
}

// ---------------------------------------------------------------------------------------
// 2. A 1 % change

#[test]
fn one_percent_change_sends_about_the_changed_bytes() {
    let site = Site::with_dps(3, &[]);
    let src = &site.src;
    let mut tree = gen_tree(src, 300, 202, 0..300 * KIB);
    tree.add_file(src, "big/twelve.bin", 12 * MIB, 5);
    for i in 0..4 {
        tree.add_file(src, &format!("small/s{i}.txt"), 3 * KIB, 300 + i);
    }
    set_old_mtimes(src);
    site.distribute_all();
    site.refresh_wait();
    let total = tree.total_bytes();
    let before = site.status();

    // The change: new files, appends, a 4 KiB edit in the middle of a large file,
    // deleted files.
    let mut changed = 0u64;
    for (i, size) in [140 * KIB, 150 * KIB, 130 * KIB, 140 * KIB].into_iter().enumerate() {
        tree.add_file(src, &format!("new/n{i}.bin"), size, 400 + i as u64);
        changed += size;
    }
    for i in 0..4u64 {
        append(&src.join(format!("small/s{i}.txt")), &random_bytes(4 * KIB as usize, 500 + i));
        changed += 4 * KIB;
    }
    overwrite(&src.join("big/twelve.bin"), 6 * MIB + 12_345, 4 * KIB as usize, 600);
    changed += 4 * KIB;
    let doomed: Vec<String> = tree
        .files
        .iter()
        .filter(|(p, n)| **n > 0 && !p.starts_with("big/") && !p.starts_with("small/") && !p.starts_with("new/"))
        .map(|(p, _)| p.clone())
        .take(3)
        .collect();
    for p in &doomed {
        fs::remove_file(src.join(p)).unwrap();
        tree.files.remove(p);
    }
    set_old_mtimes(src);
    // The test's own premise: about 1 % of the bytes changed.
    assert!(changed * 100 > total * 8 / 10 && changed * 100 < total * 12 / 10, "changed {changed} of {total}");

    let r = site.refresh_wait();
    assert_eq!(num(&r, "source_version"), 2);
    assert_eq!(num(&r, "files_added"), 4);
    assert_eq!(num(&r, "files_changed"), 5);
    assert_eq!(num(&r, "files_removed"), 3);
    site.assert_all_match_source();
    let manifest = manifest_bound(src);
    // New files in full, appended and overwritten bytes, a manifest delta: the full
    // manifest is not sent again.
    let limit = changed + changed / 25 + 8 * KIB;
    assert!(limit < changed + manifest, "the bound is below the full manifest's cost");
    for i in 0..3 {
        let t = target_of(&r["status"], &dp(i));
        let sent = sent_last(t);
        eprintln!(
            "{}: sent {sent} bytes for {changed} changed bytes (manifest bound {manifest}, limit {limit})",
            dp(i)
        );
        assert!(sent >= changed, "{}: {sent} bytes cannot carry {changed} new random bytes", dp(i));
        assert!(sent <= limit, "{}: sent {sent} bytes > 1.04 × {changed} changed + 8 KiB", dp(i));
        let old = target_of(&before, &dp(i));
        assert_eq!(sent_total(t), sent_total(old) + sent, "{}: total = previous total + last", dp(i));
    }
}

// ---------------------------------------------------------------------------------------
// 3. Insert 100 bytes at the start of a 64 MiB file

#[test]
fn inserting_100_bytes_at_the_start_of_a_64_mib_file_sends_little() {
    let site = Site::with_dps(3, &[]);
    let src = &site.src;
    gen_tree(src, 20, 303, 0..32 * KIB);
    let big = src.join("big/sixtyfour.bin");
    write_random_file(&big, 64 * MIB, 33);
    set_old_mtimes(src);
    site.distribute_all();
    site.refresh_wait();

    let old = fs::read(&big).unwrap();
    let mut new = random_bytes(100, 34);
    new.extend_from_slice(&old);
    drop(old);
    fs::write(&big, &new).unwrap();
    drop(new);
    set_old_mtimes(src);
    let r = site.refresh_wait();
    assert_eq!(num(&r, "files_changed"), 1);
    site.assert_all_match_source();
    for i in 0..3 {
        let sent = sent_last(target_of(&r["status"], &dp(i)));
        eprintln!("{}: sent {sent} bytes for a 100-byte insertion", dp(i));
        // A manifest delta and the first chunk as a delta against the old first chunk.
        assert!(sent < 4 * KIB, "{}: sent {sent} bytes (≥ 4 KiB) for a 100-byte insertion", dp(i));
    }
}

/// Edits, then the original copied back (same content, new time), then more edits: each
/// version's changed chunks go as deltas against what the DP holds, never the whole file
/// again — also once the versions that first brought the unchanged chunks are gone.
#[test]
fn edits_after_a_revert_send_only_the_changed_chunks() {
    const SIZE: u64 = 30_000_000;
    let site = Site::with_dps(1, &[]);
    let big = site.src.join("big.bin");
    write_random_file(&big, SIZE, 41);
    let original = fs::read(&big).unwrap();
    set_old_mtimes(&site.src);
    site.distribute_all();
    site.refresh_wait();

    // Five 4 KiB blocks spread through the file, at other places each round.
    let edit = |round: u64| {
        for k in 0..5u64 {
            let offset = (k * 6_000_000 + round * 1_234_567) % (SIZE - 4096);
            overwrite(&big, offset, 4096, 1000 * round + k);
        }
    };
    let steps = ["edits", "revert", "new edits", "more edits", "yet more edits"];
    for (round, step) in steps.iter().enumerate() {
        match round {
            1 => fs::write(&big, &original).unwrap(),
            _ => edit(round as u64 + 1),
        }
        set_old_mtimes(&site.src);
        let r = site.refresh_wait();
        site.assert_all_match_source();
        let sent = sent_last(target_of(&r["status"], &dp(0)));
        eprintln!("{step}: sent {sent} bytes");
        assert!(
            sent <= 64 * KIB,
            "{step}: sent {sent} bytes (> 64 KiB) for at most five 4 KiB blocks\n{}",
            site.tails()
        );
    }
    assert!(!site.tails().contains("sending them again without a base"), "a delta was refused:\n{}", site.tails());
}

/// A DP's rate limit holds for the DP, not per package: two packages pushed to it at
/// once share it, measured on the wire over every 1 s window.
#[test]
fn a_rate_limit_holds_across_packages() {
    const LIMIT: u64 = 1_000_000;
    let mut site = Site::new(&[]);
    let token = "token-dp1";
    let agent = Agent::start(site.dir.join("a1"), Some(token));
    let proxy = Proxy::start(agent.addr());
    site.agents.push(agent);
    site.register(0, &proxy.url(), Some(token), Some(LIMIT));
    write_random_file(&site.src.join("one.bin"), 3 * MIB, 51);
    let src2 = site.dir.join("src2");
    write_random_file(&src2.join("two.bin"), 3 * MIB, 52);
    set_old_mtimes(&site.src);
    set_old_mtimes(&src2);
    let id2 = text(&site.cli_ok(&["package", "add", "app2", s(&src2)]), "id").to_owned();
    for id in [site.id.as_str(), id2.as_str()] {
        site.cli_ok(&["distribute", id, "--dp", "dp1"]);
    }

    let done = std::sync::atomic::AtomicBool::new(false);
    let samples = std::thread::scope(|scope| {
        let sampler = scope.spawn(|| {
            let mut v = vec![(std::time::Instant::now(), proxy.bytes_up())];
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                v.push((std::time::Instant::now(), proxy.bytes_up()));
            }
            v
        });
        for id in [site.id.as_str(), id2.as_str()] {
            site.cli_ok(&["refresh", id]);
        }
        for id in [site.id.as_str(), id2.as_str()] {
            site.server.wait_installed(id, "dp1", 1, WAIT, &site.daemons()[1..]);
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        sampler.join().unwrap()
    });
    // The fastest second on the wire, and the whole transfer's average.
    let mut fastest = 0f64;
    for (i, (t0, b0)) in samples.iter().enumerate() {
        if let Some((t1, b1)) = samples[i..].iter().find(|(t, _)| t.duration_since(*t0) >= Duration::from_secs(1)) {
            fastest = fastest.max((b1 - b0) as f64 / t1.duration_since(*t0).as_secs_f64());
        }
    }
    let (first, last) = (samples.first().unwrap(), samples.last().unwrap());
    let average = (last.1 - first.1) as f64 / last.0.duration_since(first.0).as_secs_f64();
    eprintln!("limit {LIMIT} B/s: fastest second {fastest:.0} B/s, average {average:.0} B/s");
    assert!(last.1 >= 6 * MIB, "only {} bytes crossed for two packages of 3 MiB", last.1);
    assert!(fastest <= 1.1 * LIMIT as f64, "{fastest:.0} B/s in one second, over 1.1 × the limit of {LIMIT}");
    assert!(average >= 0.5 * LIMIT as f64, "{average:.0} B/s on average: the limit was not used");
}

// ---------------------------------------------------------------------------------------
// 4. SIGKILL an agent in the middle of a transfer

#[test]
fn agent_killed_mid_transfer_resumes_and_keeps_serving_the_old_version() {
    const RATE: u64 = 8 * MIB;
    const PAYLOAD: u64 = 40 * MIB;
    let mut site = Site::new(&["--retries", "10", "--retry-delay-ms", "300"]);
    let slow = site.add_dp(Some(RATE));
    site.add_dp(None);
    let src = site.src.clone();
    gen_tree(&src, 30, 404, 0..32 * KIB);
    write_random_file(&src.join("big/payload.bin"), MIB, 41);
    set_old_mtimes(&src);
    site.distribute_all();
    site.refresh_wait();
    let v1_digest = tree_digest(&src);
    let v1_payload = fs::read(src.join("big/payload.bin")).unwrap();

    // Version 2: a new 40 MiB payload, sent at 8 MiB/s to dp1.
    write_random_file(&src.join("big/payload.bin"), PAYLOAD, 42);
    set_old_mtimes(&src);
    let r = site.cli_ok(&["refresh", &site.id]);
    assert_eq!(num(&r, "source_version"), 2);

    let id = site.id.clone();
    let agent = &site.agents[slow];
    let staging = agent.staging(&id);
    let old_served = |agent: &Agent, when: &str| {
        let resp = agent.download(&id, "big/payload.bin");
        assert_eq!(resp.status, 200, "{when}: {}", resp.body_text());
        assert!(resp.body == v1_payload, "{when}: dp1 served {} bytes that are not version 1", resp.body.len());
        assert_eq!(tree_digest(&agent.current(&id)).diff(&v1_digest), "", "{when}: current/ is not version 1");
    };
    // Mid-transfer, clients still get version 1 whole.
    let mut checked_mid_transfer = false;
    site.server.wait_status(&id, "dp1 to receive 12 MiB", WAIT, &[agent.daemon()], |s| {
        let t = target_of(s, "dp1");
        if t["state"] == "in_progress" && sent_last(t) > MIB && !checked_mid_transfer {
            old_served(agent, "during the transfer");
            checked_mid_transfer = true;
        }
        assert_ne!(t["state"], "installed", "dp1 finished before it could be killed: {t:#}");
        sent_last(t) >= 12 * MIB && staged_bytes(&staging) > 0
    });
    assert!(checked_mid_transfer);

    site.agents[slow].kill9();
    let s =
        site.server.wait_status(&id, "dp1 to be retrying", WAIT, &[], |s| target_of(s, "dp1")["state"] == "retrying");
    let t = target_of(&s, "dp1");
    assert!(t["last_error"].as_str().is_some_and(|e| e.contains("dp1")), "{t:#}");
    let before = sent_last(t);
    let staged = staged_bytes(&staging);
    eprintln!("killed dp1 after {before} bytes sent; {staged} bytes staged");
    assert!(staged >= 8 * MIB, "only {staged} bytes staged on dp1 after {before} bytes sent");
    // On disk, the live tree is still version 1 whole.
    assert_eq!(tree_digest(&site.agents[slow].current(&id)).diff(&v1_digest), "");

    site.agents[slow].restart();
    let agent = &site.agents[slow];
    old_served(agent, "after the restart");
    let t = site.server.target_status(&id, "dp1");
    assert_eq!(t["installed_version"], 1, "dp1 installed version 2 before the old version could be checked: {t:#}");

    let t = site.wait_installed(slow, 2);
    let after = sent_last(&t) - before;
    let slack = RATE / 4 + 256 * KIB; // a batch written but not recorded when killed, + manifest
    eprintln!("dp1: {before} bytes before the kill, {after} after; {staged} were staged");
    assert!(sent_last(&t) < before + PAYLOAD, "dp1 was sent everything again: {before} + {after}");
    assert!(
        after <= PAYLOAD - staged + slack,
        "after the restart dp1 was sent {after} bytes, more than the {} it lacked (+{slack})",
        PAYLOAD - staged
    );
    site.wait_installed(1, 2);
    site.assert_all_match_source();
    assert!(!staging.exists(), "the staging area is removed after the install");
}

// ---------------------------------------------------------------------------------------
// 5. An agent that stays down

#[test]
fn agent_that_stays_down_fails_and_the_others_install() {
    let mut site = Site::with_dps(3, &["--retries", "2", "--retry-delay-ms", "100"]);
    varied_tree(&site.src, 50, 505, 0..64 * KIB);
    site.distribute_all();
    site.agents[1].kill9();

    let started = Instant::now();
    let out = site.refresh_wait_output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "refresh --wait must fail; stderr: {stderr}{}", site.tails());
    assert!(stderr.contains("dp2"), "the failure names dp2: {stderr}");
    assert!(!stderr.contains("dp1") && !stderr.contains("dp3"), "only dp2 failed: {stderr}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());

    let s = site.status();
    let t = target_of(&s, "dp2");
    assert_eq!(t["state"], "failed", "{t:#}");
    assert_eq!(num(t, "attempts"), 3, "one attempt and two retries: {t:#}");
    assert!(t["last_error"].as_str().is_some_and(|e| e.contains("dp2") && e.contains("unreachable")), "{t:#}");
    assert!(t["installed_version"].is_null(), "{t:#}");
    for i in [0, 2] {
        let t = target_of(&s, &dp(i));
        assert_eq!(t["state"], "installed", "{t:#}");
        assert_eq!(t["installed_version"], 1, "{t:#}");
        assert_same_tree_and_times(&site.src, &site.agents[i].current(&site.id));
    }
    assert!(!site.agents[1].package_dir(&site.id).exists());
}

// ---------------------------------------------------------------------------------------
// 6. SIGKILL the server in the middle of a distribution

#[test]
fn server_killed_mid_distribution_resumes_after_restart() {
    const RATE: u64 = 8 * MIB;
    const PAYLOAD: u64 = 40 * MIB;
    let mut site = Site::new(&["--retry-delay-ms", "200"]);
    let slow = site.add_dp(Some(RATE));
    site.add_dp(None);
    let mut tree = gen_tree(&site.src, 40, 606, 0..64 * KIB);
    tree.add_file(&site.src, "big/payload.bin", PAYLOAD, 61);
    set_old_mtimes(&site.src);
    site.distribute_all();
    let r = site.cli_ok(&["refresh", &site.id]);
    assert_eq!(num(&r, "source_version"), 1);
    let total = tree.total_bytes();

    let id = site.id.clone();
    let staging = site.agents[slow].staging(&id);
    site.server.wait_status(&id, "dp1 to receive 10 MiB", WAIT, &[site.agents[slow].daemon()], |s| {
        let t = target_of(s, "dp1");
        assert_ne!(t["state"], "installed", "dp1 finished before the server could be killed: {t:#}");
        sent_last(t) >= 10 * MIB
    });
    site.server.kill9();
    let staged = staged_bytes(&staging);
    eprintln!("killed the server; {staged} bytes staged on dp1");
    assert!(staged >= 8 * MIB, "only {staged} bytes staged");
    assert!(!site.agents[slow].current(&id).exists(), "nothing is live on dp1 before its install");

    site.server.restart();
    let t = site.wait_installed(slow, 1);
    site.wait_installed(1, 1);
    site.assert_all_match_source();
    // What had arrived was not sent again: everything counted (before and after the
    // crash) stays within one copy of the content plus a batch and the manifest.
    let sent = sent_last(&t);
    eprintln!("dp1: {sent} bytes sent in all for {total} bytes of content");
    assert!(sent + RATE / 4 >= total, "dp1: only {sent} bytes counted for {total} bytes of content");
    assert!(
        sent <= total + RATE / 4 + manifest_bound(&site.src),
        "dp1 was sent {sent} bytes for {total} bytes of content"
    );
}

// ---------------------------------------------------------------------------------------
// 7. A chunk damaged on the wire

#[test]
fn chunk_corrupted_on_the_wire_is_rejected_and_sent_again() {
    let mut site = Site::new(&["--retry-delay-ms", "200"]);
    site.add_dp(None);
    // dp2 is reached through a proxy that flips one byte of one chunk batch.
    let token = "token-dp2";
    let agent = Agent::start(site.dir.join("a2"), Some(token));
    let proxy = Proxy::start(agent.addr());
    site.agents.push(agent);
    site.register(1, &proxy.url(), Some(token), None);
    let mut tree = gen_tree(&site.src, 60, 707, 0..128 * KIB);
    tree.add_file(&site.src, "big/eight.bin", 8 * MIB, 71);
    set_old_mtimes(&site.src);
    site.distribute_all();

    proxy.corrupt_in_body_once();
    let r = site.refresh_wait();
    assert_eq!(proxy.faults_injected(), 1, "the proxy damaged one byte");
    site.assert_all_match_source();
    let agent_saw = site.agents[1].log().contains("chunks failed verification");
    let server_resent = site.server.log().contains("rejected damaged chunks");
    eprintln!("dp2 logged a rejected chunk: {agent_saw}; the server logged a resend: {server_resent}");
    assert!(
        agent_saw || server_resent,
        "neither did dp2 log a rejected chunk nor did the server resend one{}",
        site.tails()
    );
    // The resend costs at most a chunk or two more than the direct DP.
    let (direct, proxied) = (sent_last(target_of(&r["status"], "dp1")), sent_last(target_of(&r["status"], "dp2")));
    assert!(proxied > direct, "dp2 ({proxied}) should have been sent the damaged chunk again (dp1: {direct})");
    assert!(proxied <= direct + 2 * 256 * KIB + 1024, "dp2 {proxied} vs dp1 {direct}");
}

// ---------------------------------------------------------------------------------------
// 8. Rollback

#[test]
fn rollback_restores_the_previous_content_everywhere_cheaply() {
    let site = Site::with_dps(3, &[]);
    let src = &site.src;
    let mut tree = varied_tree(src, 120, 808, 0..200 * KIB);
    tree.add_file(src, "big/four.bin", 4 * MIB, 81);
    set_old_mtimes(src);
    site.distribute_all();
    site.refresh_wait();
    let a_digest = tree_digest(src);
    let a_times = tree_mtimes(src);
    let a_manifest = manifest_bound(src);

    // Content B: some files changed, some removed, some added, the big one replaced.
    let names: Vec<String> = tree.files.keys().filter(|p| tree.files[*p] > 0).cloned().collect();
    for (k, p) in names.iter().take(10).enumerate() {
        write_random_file(&src.join(p), 50 * KIB, 900 + k as u64);
    }
    for p in names.iter().rev().take(5) {
        fs::remove_file(src.join(p)).unwrap();
    }
    for k in 0..5 {
        write_random_file(&src.join(format!("added/a{k}.bin")), 70 * KIB, 950 + k);
    }
    write_random_file(&src.join("big/four.bin"), 4 * MIB, 82);
    set_old_mtimes(src);
    let r2 = site.refresh_wait();
    assert_eq!(num(&r2, "source_version"), 2);
    site.assert_all_match_source();

    let rb = site.cli_ok(&["rollback", &site.id, "--wait", "--timeout", "60"]);
    assert_eq!(num(&rb, "source_version"), 3, "{rb:#}");
    assert_eq!(num(&rb, "restored_version"), 1, "{rb:#}");
    for (i, a) in site.agents.iter().enumerate() {
        let cur = a.current(&site.id);
        assert_eq!(tree_digest(&cur).diff(&a_digest), "", "{}: the tree is not version 1's content", dp(i));
        assert_eq!(tree_mtimes(&cur), a_times, "{}: times differ from version 1's", dp(i));
        let t = target_of(&rb["status"], &dp(i));
        assert_eq!(t["state"], "installed", "{t:#}");
        assert_eq!(t["installed_version"], 3, "{t:#}");
        let sent = sent_last(t);
        eprintln!("{}: rollback sent {sent} bytes (manifest bound {a_manifest})", dp(i));
        assert!(sent <= a_manifest + 64 * KIB, "{}: rollback sent {sent} bytes; the content was already there", dp(i));
    }
}

// ---------------------------------------------------------------------------------------
// 9. Redistribute

#[test]
fn redistribute_sends_the_whole_package_to_one_dp_only() {
    let site = Site::with_dps(3, &[]);
    let mut tree = gen_tree(&site.src, 100, 909, 0..256 * KIB);
    tree.add_file(&site.src, "big/six.bin", 6 * MIB, 91);
    set_old_mtimes(&site.src);
    site.distribute_all();
    site.refresh_wait();
    let total = tree.total_bytes();
    let before = site.status();
    let link_before: Vec<PathBuf> = site.agents.iter().map(|a| fs::read_link(a.current(&site.id)).unwrap()).collect();

    let s = site.cli_ok(&["redistribute", &site.id, "--dp", "dp2", "--wait", "--timeout", "60"]);
    let t = target_of(&s, "dp2");
    assert_eq!(t["state"], "installed", "{t:#}");
    assert_eq!(t["installed_version"], 1, "{t:#}");
    let sent = sent_last(t);
    eprintln!("dp2: redistribute sent {sent} bytes for {total} bytes of content");
    assert!(sent * 10 >= total * 9, "redistribute sent {sent} bytes, less than 90 % of {total}");
    assert_eq!(sent_total(t), sent_total(target_of(&before, "dp2")) + sent);
    assert_ne!(fs::read_link(site.agents[1].current(&site.id)).unwrap(), link_before[1], "dp2 got a new tree");
    for i in [0, 2] {
        let (old, new) = (target_of(&before, &dp(i)), target_of(&s, &dp(i)));
        for k in ["state", "installed_version", "bytes_sent_last", "bytes_sent_total", "attempts"] {
            assert_eq!(old[k], new[k], "{}: {k} changed: {old:#} → {new:#}", dp(i));
        }
        assert_eq!(fs::read_link(site.agents[i].current(&site.id)).unwrap(), link_before[i]);
    }
    site.assert_all_match_source();
}

// ---------------------------------------------------------------------------------------
// 10. Remove

#[test]
fn remove_takes_the_package_off_one_dp_only() {
    let site = Site::with_dps(3, &[]);
    let tree = varied_tree(&site.src, 40, 1010, 0..64 * KIB);
    site.distribute_all();
    site.refresh_wait();
    let (rel, _) = tree.files.iter().find(|(_, n)| **n > 0).unwrap();

    site.cli_ok(&["remove", &site.id, "--dp", "dp2", "--wait", "--timeout", "60"]);
    let s = site.status();
    let t = target_of(&s, "dp2");
    assert_eq!(t["state"], "removed", "{t:#}");
    assert!(t["installed_version"].is_null(), "{t:#}");
    let gone = &site.agents[1];
    assert!(!gone.package_dir(&site.id).exists(), "{} still exists", gone.package_dir(&site.id).display());
    assert!(!gone.staging(&site.id).exists());
    let resp = gone.download(&site.id, rel);
    assert_eq!(resp.status, 404, "{}", resp.body_text());
    let left: Vec<PathBuf> = walkdir::WalkDir::new(gone.library().join("objects"))
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    assert!(left.is_empty(), "dp2's library still holds the package's files: {left:?}");
    for i in [0, 2] {
        let t = target_of(&s, &dp(i));
        assert_eq!(t["state"], "installed", "{t:#}");
        assert_eq!(t["installed_version"], 1, "{t:#}");
        assert_same_tree_and_times(&site.src, &site.agents[i].current(&site.id));
        assert_eq!(site.agents[i].download(&site.id, rel).status, 200);
    }
}

// ---------------------------------------------------------------------------------------
// 11. Downloads

#[test]
fn downloads_support_ranges_etags_and_refuse_escaping_paths() {
    let site = Site::with_dps(1, &[]);
    let src = &site.src;
    let readme = random_bytes(1000, 1111);
    fs::create_dir_all(src.join("docs")).unwrap();
    fs::write(src.join("docs/readme.txt"), &readme).unwrap();
    write_random_file(&src.join("bin/app.exe"), 300 * KIB, 1112);
    fs::write(src.join("docs/empty.txt"), b"").unwrap();
    fs::write(src.join("with space.txt"), b"spaced").unwrap();
    std::os::unix::fs::symlink("bin/app.exe", src.join("latest")).unwrap();
    set_old_mtimes(src);
    site.distribute_all();
    site.refresh_wait();
    let a = &site.agents[0];
    let id = &site.id;
    let file = |rel: &str| format!("/v1/packages/{id}/files/{rel}");

    // Whole file, with its BLAKE3 as ETag.
    let full = a.get(&file("docs/readme.txt"), &[]);
    assert_eq!(full.status, 200);
    assert_eq!(full.body, readme);
    assert_eq!(full.header("content-length"), Some("1000"));
    assert_eq!(full.header("accept-ranges"), Some("bytes"));
    let etag = format!("\"{}\"", blake3_hex(&readme));
    assert_eq!(full.header("etag"), Some(etag.as_str()));
    let app = fs::read(src.join("bin/app.exe")).unwrap();
    let big = a.get(&file("bin/app.exe"), &[]);
    assert_eq!((big.status, big.body == app), (200, true));
    assert_eq!(big.header("etag"), Some(format!("\"{}\"", blake3_hex(&app)).as_str()));

    // Ranges.
    let r = a.get(&file("docs/readme.txt"), &[("Range", "bytes=10-19")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &readme[10..20]);
    assert_eq!(r.header("content-range"), Some("bytes 10-19/1000"));
    assert_eq!(r.header("content-length"), Some("10"));
    let r = a.get(&file("docs/readme.txt"), &[("Range", "bytes=-7")]);
    assert_eq!(r.status, 206);
    assert_eq!(r.body, &readme[993..]);
    assert_eq!(r.header("content-range"), Some("bytes 993-999/1000"));
    let r = a.get(&file("docs/readme.txt"), &[("Range", "bytes=990-")]);
    assert_eq!((r.status, r.body.as_slice()), (206, &readme[990..]));
    let r = a.get(&file("bin/app.exe"), &[("Range", "bytes=200000-200099")]);
    assert_eq!((r.status, r.body.as_slice()), (206, &app[200_000..200_100]));
    for unsatisfiable in ["bytes=1000-", "bytes=5000-6000"] {
        let r = a.get(&file("docs/readme.txt"), &[("Range", unsatisfiable)]);
        assert_eq!(r.status, 416, "{unsatisfiable}");
        assert_eq!(r.header("content-range"), Some("bytes */1000"), "{unsatisfiable}");
    }

    // Conditional requests.
    let r = a.get(&file("docs/readme.txt"), &[("If-None-Match", &etag)]);
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    let other = format!("\"{}\"", blake3_hex(b"something else"));
    assert_eq!(a.get(&file("docs/readme.txt"), &[("If-None-Match", &other)]).status, 200);

    // Other entries.
    let r = a.get(&file("docs/empty.txt"), &[]);
    assert_eq!((r.status, r.body.len()), (200, 0));
    let r = a.get(&file("docs/empty.txt"), &[("Range", "bytes=0-")]);
    assert_eq!((r.status, r.header("content-range")), (416, Some("bytes */0")), "no byte of an empty file");
    let r = a.get(&file("with%20space.txt"), &[]);
    assert_eq!((r.status, r.body.as_slice()), (200, &b"spaced"[..]));
    let r = a.get(&file("latest"), &[]);
    assert_eq!((r.status, r.body == app), (200, true), "a symlink in the package serves its target");
    for missing in ["docs/nothere.txt", "docs", "nothere/readme.txt"] {
        let r = a.get(&file(missing), &[]);
        assert_eq!(r.status, 404, "{missing}: {}", r.body_text());
    }
    assert_eq!(a.get("/v1/packages/PS1FFFFF/files/docs/readme.txt", &[]).status, 404);

    // Paths that try to leave the tree: 400 or 404, never a file outside.
    let outside = fs::read_to_string(a.data_dir.join("listen.addr")).unwrap();
    let attempts = [
        file("%2e%2e/%2e%2e/%2e%2e/listen.addr"),
        file("..%2f..%2f..%2flisten.addr"),
        file("docs%2f..%2f..%2f..%2f..%2flisten.addr"),
        file("docs/%2e%2e/%2e%2e/%2e%2e/%2e%2e/listen.addr"),
        file("../../../listen.addr"),
        file("docs/../../../../listen.addr"),
        file("%2fetc%2fpasswd"),
        file("/etc/passwd"),
        file("docs/readme.txt%00.png"),
        file("docs%5c..%5c..%5c..%5c..%5clisten.addr"),
        file("%252e%252e/%252e%252e/%252e%252e/listen.addr"),
        "/v1/packages/..%2f..%2f/files/listen.addr".to_owned(),
        "/v1/packages/%2e%2e/files/%2e%2e/listen.addr".to_owned(),
        "/v1/packages/../../listen.addr".to_owned(),
    ];
    for path in &attempts {
        let r = a.get(path, &[]);
        assert!(r.status == 400 || r.status == 404, "GET {path}: status {} body {}", r.status, r.body_text());
        let body = r.body_text();
        assert!(!body.contains(outside.trim()) && !body.contains("root:"), "GET {path} leaked: {body}");
    }
}

#[test]
fn a_resumed_download_across_a_version_switch_gets_the_whole_new_file() {
    let site = Site::with_dps(1, &[]);
    let rel = "bin/setup.msi";
    write_random_file(&site.src.join(rel), 300 * KIB, 1141);
    set_old_mtimes(&site.src);
    site.distribute_all();
    site.refresh_wait();
    let a = &site.agents[0];
    let file = format!("/v1/packages/{}/files/{rel}", site.id);
    let v1 = fs::read(site.src.join(rel)).unwrap();
    let first = a.get(&file, &[]);
    assert_eq!((first.status, first.body == v1), (200, true));
    let old_etag = first.header("etag").expect("ETag").to_owned();
    assert!(first.header("last-modified").is_some(), "Last-Modified is sent");

    // The client got part of v1; meanwhile the DP switches to v2.
    write_random_file(&site.src.join(rel), 400 * KIB, 1142);
    set_old_mtimes(&site.src);
    site.refresh_wait();
    site.server.wait_installed(&site.id, "dp1", 2, WAIT, &site.daemons()[1..]);
    let v2 = fs::read(site.src.join(rel)).unwrap();
    let new_etag = format!("\"{}\"", blake3_hex(&v2));

    // Resuming with the old validator: the whole new file, never a splice of both.
    let r = a.get(&file, &[("Range", "bytes=10-"), ("If-Range", &old_etag)]);
    assert_eq!(r.status, 200, "If-Range with the old ETag must not answer a range of the new version");
    assert!(r.body == v2, "the body is the whole new version ({} bytes)", r.body.len());
    assert_eq!(r.header("content-range"), None);
    assert_eq!(r.header("etag"), Some(new_etag.as_str()));

    // With the current validators, the range.
    let r = a.get(&file, &[("Range", "bytes=10-"), ("If-Range", &new_etag)]);
    assert_eq!((r.status, r.body.as_slice()), (206, &v2[10..]));
    let lm = r.header("last-modified").expect("Last-Modified").to_owned();
    let r = a.get(&file, &[("Range", "bytes=10-"), ("If-Range", &lm)]);
    assert_eq!((r.status, r.body.as_slice()), (206, &v2[10..]), "If-Range: {lm}");
}

// ---------------------------------------------------------------------------------------
// 12. Validate and repair

#[test]
fn validate_finds_a_damaged_file_and_the_repair_sends_only_it() {
    let site = Site::with_dps(3, &[]);
    let src = &site.src;
    let mut tree = gen_tree(src, 150, 1212, 0..128 * KIB);
    tree.add_file(src, "big/four.bin", 4 * MIB, 121);
    set_old_mtimes(src);
    site.distribute_all();
    site.refresh_wait();
    let ok = site.cli_ok(&["validate", &site.id]);
    assert!(ok["targets"].as_array().unwrap().iter().all(|t| t["ok"] == true), "{ok:#}");
    let before = site.status();

    // Damage dp2's copy in place (it is a hard link into dp2's library).
    let victim = site.agents[1].current(&site.id).join("big/four.bin");
    let mode = fs::metadata(&victim).unwrap().permissions().mode();
    chmod(&victim, mode | 0o200);
    overwrite(&victim, MIB, 100, 1213);
    chmod(&victim, mode);
    assert_ne!(fs::read(&victim).unwrap(), fs::read(src.join("big/four.bin")).unwrap());

    let out = site.server.cli(&["validate", &site.id, "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "validate must exit 1; stderr: {stderr}");
    assert!(stderr.contains("dp2") && !stderr.contains("dp1") && !stderr.contains("dp3"), "{stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("validate --json prints JSON");
    let t = target_of(&v, "dp2");
    assert_eq!(t["ok"], false, "{v:#}");
    assert_eq!(t["broken"], serde_json::json!(["big/four.bin"]), "{v:#}");
    assert_eq!(t["repair_queued"], true, "{v:#}");
    for i in [0, 2] {
        assert_eq!(target_of(&v, &dp(i))["ok"], true, "{v:#}");
    }

    let s = site.server.wait_status(&site.id, "dp2 to be repaired", WAIT, &[site.agents[1].daemon()], |s| {
        target_of(s, "dp2")["state"] == "installed"
    });
    site.assert_all_match_source();
    let t = target_of(&s, "dp2");
    assert_eq!(t["installed_version"], 1);
    let sent = sent_last(t);
    eprintln!("dp2: repair sent {sent} bytes for a {} byte file", 4 * MIB);
    assert!(sent >= 4 * MIB, "repair sent {sent} bytes, less than the damaged file");
    assert!(sent <= 4 * MIB + manifest_bound(src) + 64 * KIB, "repair sent {sent} bytes for one 4 MiB file");
    for i in [0, 2] {
        let (old, new) = (target_of(&before, &dp(i)), target_of(&s, &dp(i)));
        assert_eq!(old["bytes_sent_total"], new["bytes_sent_total"], "{}: nothing sent to undamaged DPs", dp(i));
    }
    let again = site.cli_ok(&["validate", &site.id]);
    assert!(again["targets"].as_array().unwrap().iter().all(|t| t["ok"] == true), "{again:#}");
}

/// Removes the immutable attribute it set, even when the test fails.
struct Immutable(PathBuf);

impl Immutable {
    /// Makes `dir` immutable (no entry can be removed from it, even by root); `None` where
    /// the filesystem or the process cannot (the caller says why it skips).
    fn set(dir: &Path) -> Option<Self> {
        let ok = std::process::Command::new("chattr").arg("+i").arg(dir).status().is_ok_and(|s| s.success());
        ok.then(|| Self(dir.to_owned()))
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn validate_fails_loudly_when_a_damaged_library_copy_cannot_be_removed() {
    let site = Site::with_dps(1, &[]);
    let src = &site.src;
    gen_tree(src, 5, 1214, 1..16 * KIB);
    let mut tree = gen_tree(src, 1, 1215, 1..2);
    tree.add_file(src, "big/one.bin", MIB, 1216);
    set_old_mtimes(src);
    site.distribute_all();
    site.refresh_wait();

    // Damage the DP's copy in place: it is a hard link to the library's object, so the
    // object is damaged too and must go before a repair can link it again.
    let agent = &site.agents[0];
    let victim = agent.current(&site.id).join("big/one.bin");
    let mode = fs::metadata(&victim).unwrap().permissions().mode();
    chmod(&victim, mode | 0o200);
    overwrite(&victim, 1000, 100, 1217);
    chmod(&victim, mode);
    let hash = blake3::hash(&fs::read(src.join("big/one.bin")).unwrap()).to_hex().to_string();
    let object = library_object(&agent.library(), &hash);
    assert!(object.is_file(), "the library holds {}", object.display());
    let shard = object.parent().unwrap().to_owned();
    let Some(_immutable) = Immutable::set(&shard) else {
        if std::env::var_os("CI").is_some() {
            panic!(
                "chattr +i {} failed: this test needs an ext4/xfs filesystem and CAP_LINUX_IMMUTABLE",
                shard.display()
            );
        }
        eprintln!("skipped: chattr +i is not available here (needs ext4/xfs and CAP_LINUX_IMMUTABLE)");
        return;
    };

    let out = site.server.cli(&["validate", &site.id, "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "validate must fail; stderr: {stderr}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("validate --json prints JSON");
    let t = target_of(&v, "dp1");
    assert_eq!(t["ok"], false, "{v:#}");
    let error = t["error"].as_str().unwrap_or_default();
    assert!(error.contains("big/one.bin") && error.contains("cannot be removed"), "the error names the file: {v:#}");
    assert_eq!(t["repair_queued"], false, "no repair may link the damaged object again: {v:#}");
    assert!(object.is_file(), "the object is still there");
}

#[test]
fn validate_puts_back_a_deleted_current_link_without_a_restart() {
    let site = Site::with_dps(1, &[]);
    gen_tree(&site.src, 20, 1218, 1..32 * KIB);
    set_old_mtimes(&site.src);
    site.distribute_all();
    site.refresh_wait();
    let current = site.agents[0].current(&site.id);
    let target = fs::read_link(&current).unwrap();
    fs::remove_file(&current).unwrap();
    assert!(fs::symlink_metadata(&current).is_err());

    let v = site.cli_ok(&["validate", &site.id]);
    let t = target_of(&v, "dp1");
    assert_eq!(t["ok"], true, "the content itself is whole: {v:#}");
    let repaired = t["repaired"].as_array().cloned().unwrap_or_default();
    assert!(repaired.iter().any(|r| r.as_str().unwrap_or("").contains("current")), "reported: {v:#}");
    assert_eq!(fs::read_link(&current).unwrap(), target, "current points at the installed tree again");
    site.assert_all_match_source();
    let again = site.cli_ok(&["validate", &site.id]);
    assert!(target_of(&again, "dp1")["repaired"].is_null(), "nothing left to repair: {again:#}");
}

// ---------------------------------------------------------------------------------------
// 13. A refresh that changes nothing

#[test]
fn unchanged_refresh_records_the_version_without_sending() {
    let site = Site::with_dps(3, &[]);
    varied_tree(&site.src, 200, 1313, 0..64 * KIB);
    site.distribute_all();
    let r1 = site.refresh_wait();
    let links: Vec<PathBuf> = site.agents.iter().map(|a| fs::read_link(a.current(&site.id)).unwrap()).collect();

    let r2 = site.refresh_wait();
    assert_eq!(num(&r2, "source_version"), 2);
    assert_eq!(r2["content_changed"], false);
    for (i, a) in site.agents.iter().enumerate() {
        let (old, t) = (target_of(&r1["status"], &dp(i)), target_of(&r2["status"], &dp(i)));
        assert_eq!(t["state"], "installed", "{t:#}");
        assert_eq!(t["installed_version"], 2, "{t:#}");
        assert_eq!(sent_last(t), 0, "{}: a no-change refresh sends nothing: {t:#}", dp(i));
        assert_eq!(sent_total(t), sent_total(old), "{t:#}");
        assert_eq!(fs::read_link(a.current(&site.id)).unwrap(), links[i], "{}: the tree was not rebuilt", dp(i));
        assert!(
            a.get("/metrics", &[])
                .body_text()
                .contains(&format!("dpsync_agent_package_version{{package=\"{}\"}} 2", site.id)),
            "{}: metrics show version 2",
            dp(i)
        );
    }
    site.assert_all_match_source();
}

// ---------------------------------------------------------------------------------------
// 14. A wrong token

#[test]
fn wrong_token_fails_fast_without_retrying() {
    // Default retry settings: a retry would take seconds, and show in `attempts`.
    let mut site = Site::new(&[]);
    let wrong = Agent::start(site.dir.join("a1"), Some("the-right-token"));
    let missing = Agent::start(site.dir.join("a2"), Some("another-token"));
    site.register(0, &wrong.url(), Some("a-wrong-token"), None);
    site.register(1, &missing.url(), None, None);
    site.agents.push(wrong);
    site.agents.push(missing);
    site.add_dp(None);
    varied_tree(&site.src, 30, 1414, 0..32 * KIB);
    site.distribute_all();

    let started = Instant::now();
    let out = site.refresh_wait_output();
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}{}", site.tails());
    assert!(stderr.contains("dp1") && stderr.contains("dp2") && !stderr.contains("dp3"), "{stderr}");
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    let s = site.status();
    for i in 0..2 {
        let t = target_of(&s, &dp(i));
        assert_eq!(t["state"], "failed", "{t:#}");
        assert_eq!(num(t, "attempts"), 1, "a refused token is not retried: {t:#}");
        let e = t["last_error"].as_str().unwrap_or_default();
        assert!(e.contains("token") && e.contains(&dp(i)), "{}: error should name the token problem: {e}", dp(i));
        assert!(!site.agents[i].package_dir(&site.id).exists());
    }
    let t = target_of(&s, "dp3");
    assert_eq!((t["state"].as_str(), t["installed_version"].as_u64()), (Some("installed"), Some(1)), "{t:#}");
    assert_same_tree_and_times(&site.src, &site.agents[2].current(&site.id));
}

// ---------------------------------------------------------------------------------------
// 15. A crash between the switch of `current` and its record

/// An agent killed after it switched `current` to a new tree but before it recorded the
/// install comes back with `current` pointing at that unrecorded tree. At start it
/// deletes trees it has no record of; `current` must then be the recorded version again,
/// whole, never a dangling link.
#[test]
fn agent_restart_after_a_crash_between_switch_and_record_keeps_a_whole_current() {
    let mut site = Site::with_dps(1, &[]);
    let tree = gen_tree(&site.src, 30, 1515, 0..32 * KIB);
    set_old_mtimes(&site.src);
    site.distribute_all();
    site.refresh_wait();
    let (rel, _) = tree.files.iter().find(|(_, n)| **n > 0).map(|(p, n)| (p.clone(), *n)).unwrap();
    append(&site.src.join(&rel), b"version 2");
    set_old_mtimes(&site.src);
    site.refresh_wait();
    let id = site.id.clone();

    // The state a SIGKILL between `switch_current` and `record_install` leaves: a fully
    // built tree of a version 3 the database does not know, and `current` pointing at it.
    site.agents[0].terminate();
    let pkg_dir = site.agents[0].package_dir(&id);
    let unrecorded = pkg_dir.join("versions/v3-dead");
    fs::create_dir_all(&unrecorded).unwrap();
    fs::write(unrecorded.join("only-in-v3.txt"), b"never recorded").unwrap();
    std::os::unix::fs::symlink("versions/v3-dead", pkg_dir.join("current.tmp")).unwrap();
    fs::rename(pkg_dir.join("current.tmp"), pkg_dir.join("current")).unwrap();

    site.agents[0].restart();
    let current = site.agents[0].current(&id);
    assert!(
        current.is_dir(),
        "after the restart {} is not a folder (-> {:?})",
        current.display(),
        fs::read_link(&current)
    );
    assert_same_tree_and_times(&site.src, &current);
    let resp = site.agents[0].download(&id, &rel);
    assert_eq!((resp.status, resp.body == fs::read(site.src.join(&rel)).unwrap()), (200, true));
}

// ---------------------------------------------------------------------------------------
// 16. Recycling the previous tree, and a crash between the recycle and the switch

/// The version trees in `pkg_dir/versions`, and the one `current` names.
fn trees(pkg_dir: &Path) -> (Vec<PathBuf>, PathBuf) {
    let mut all: Vec<PathBuf> = fs::read_dir(pkg_dir.join("versions")).unwrap().map(|e| e.unwrap().path()).collect();
    all.sort();
    (all, pkg_dir.join(fs::read_link(pkg_dir.join("current")).unwrap()))
}

/// A DP builds each version by recycling the tree of the version before the live one
/// (the folder itself is reused: same inode), so two trees stay on disk. An agent killed
/// after it renamed that tree for the next version and began editing it (before the
/// switch) comes back with `current` whole, the half-edited tree removed, and installs
/// the next versions correctly (afresh once, since its previous tree is gone, then by
/// recycling again).
#[test]
fn a_half_recycled_tree_left_by_a_crash_is_removed_and_installs_go_on() {
    let mut site = Site::with_dps(1, &[]);
    let tree = gen_tree(&site.src, 60, 1616, 0..16 * KIB);
    set_old_mtimes(&site.src);
    site.distribute_all();
    let id = site.id.clone();
    let pkg_dir = site.agents[0].package_dir(&id);
    let files: Vec<String> = tree.files.keys().cloned().collect();
    let mut version = 0;
    let mut change = |site: &Site, i: usize| {
        append(&site.src.join(&files[i]), format!("change {i}").as_bytes());
        fs::write(site.src.join(format!("added-{i}.txt")), format!("added {i}")).unwrap();
        set_old_mtimes(&site.src);
        version += 1;
        let r = site.refresh_wait();
        assert_eq!(num(&r, "source_version"), version);
        site.assert_all_match_source();
        assert_same_tree_and_times(&site.src, &site.agents[0].current(&id));
    };
    change(&site, 0);
    change(&site, 1);
    change(&site, 2);
    // current = v3, previous = v2: v4 is built in v2's folder.
    let (before, current) = trees(&pkg_dir);
    assert_eq!(before.len(), 2, "{before:?}");
    let previous = before.iter().find(|t| **t != current).unwrap().clone();
    let previous_inode = fs::metadata(&previous).unwrap().ino();
    change(&site, 3);
    let (after, current) = trees(&pkg_dir);
    assert_eq!(after.len(), 2, "{after:?}");
    assert_eq!(fs::metadata(&current).unwrap().ino(), previous_inode, "v4 was not built in v2's folder");
    assert!(site.agents[0].log().contains("recycled=true"), "the install log says it recycled");

    // The state a SIGKILL mid-recycle leaves: the previous tree (v3) renamed for a v5 the
    // database does not know, half edited.
    site.agents[0].terminate();
    let previous = after.iter().find(|t| **t != current).unwrap().clone();
    let half = pkg_dir.join("versions/v5-dead");
    fs::rename(&previous, &half).unwrap();
    fs::remove_file(half.join(&files[5])).unwrap();
    fs::write(half.join("only-in-v5.txt"), b"never recorded").unwrap();
    site.agents[0].restart();
    let (now, current) = trees(&pkg_dir);
    assert_eq!(now, vec![current.clone()], "the half-recycled tree is removed at start");
    assert_same_tree_and_times(&site.src, &site.agents[0].current(&id));

    // v5: its previous tree is gone, so it is built afresh; v6 recycles v4's tree again.
    change(&site, 6);
    let (after, current) = trees(&pkg_dir);
    assert_eq!(after.len(), 2, "{after:?}");
    let previous_inode = fs::metadata(after.iter().find(|t| **t != current).unwrap()).unwrap().ino();
    change(&site, 7);
    let (_, current) = trees(&pkg_dir);
    assert_eq!(fs::metadata(&current).unwrap().ino(), previous_inode, "v6 was not built in v4's folder");
}

// ---------------------------------------------------------------------------------------
// Deltas: small changes against the version a DP holds

/// Inserts `bytes` at the start of the file at `path`.
fn prepend(path: &Path, bytes: &[u8]) {
    let mut new = bytes.to_vec();
    new.extend_from_slice(&fs::read(path).unwrap());
    fs::write(path, new).unwrap();
}

/// Refreshes, checks every DP got the change byte for byte, and returns what each DP cost.
fn refresh_and_costs(site: &Site, version: u64) -> Vec<u64> {
    let r = site.refresh_wait();
    assert_eq!(num(&r, "source_version"), version);
    site.assert_all_match_source();
    (0..site.agents.len()).map(|i| sent_last(target_of(&r["status"], &dp(i)))).collect()
}

#[test]
fn small_changes_cost_their_size_not_the_manifest() {
    let site = Site::with_dps(2, &[]);
    let src = &site.src;
    gen_tree(src, 2500, 707, 0..4 * KIB);
    write_random_file(&src.join("big/large.bin"), 24 * MIB, 71);
    write_random_file(&src.join("logs/app.log"), 50 * KIB, 72);
    set_old_mtimes(src);
    site.distribute_all();
    site.refresh_wait();
    let full = manifest_bound(src);
    // The test's premise: the full manifest alone is far over every bound below.
    assert!(full > 256 * KIB, "manifest bound {full}");

    // 100 bytes inserted at the start of the large file.
    prepend(&src.join("big/large.bin"), &random_bytes(100, 73));
    set_old_mtimes(src);
    for (i, sent) in refresh_and_costs(&site, 2).into_iter().enumerate() {
        eprintln!("{}: sent {sent} bytes for a 100-byte insert (full manifest ≈ {full})", dp(i));
        assert!(sent < 2 * KIB, "{}: sent {sent} bytes for a 100-byte insert", dp(i));
    }

    // 4 KiB overwritten in the middle of the large file.
    overwrite(&src.join("big/large.bin"), 12 * MIB + 777, 4 * KIB as usize, 74);
    set_old_mtimes(src);
    for (i, sent) in refresh_and_costs(&site, 3).into_iter().enumerate() {
        eprintln!("{}: sent {sent} bytes for a 4 KiB overwrite", dp(i));
        assert!(sent >= 4 * KIB, "{}: {sent} bytes cannot carry 4 KiB of new random bytes", dp(i));
        assert!(sent < 8 * KIB, "{}: sent {sent} bytes for a 4 KiB overwrite", dp(i));
    }

    // 100 bytes appended to a log file.
    append(&src.join("logs/app.log"), &random_bytes(100, 75));
    set_old_mtimes(src);
    for (i, sent) in refresh_and_costs(&site, 4).into_iter().enumerate() {
        eprintln!("{}: sent {sent} bytes for a 100-byte append", dp(i));
        assert!(sent < KIB, "{}: sent {sent} bytes for a 100-byte append", dp(i));
    }
    let log = site.server.log();
    assert!(!log.contains("sending the full manifest"), "no DP lacked its base");
}

#[test]
fn a_dp_that_lost_its_base_gets_the_full_manifest() {
    let mut site = Site::with_dps(2, &[]);
    let src = &site.src;
    gen_tree(src, 600, 808, 0..4 * KIB);
    set_old_mtimes(src);
    site.distribute_all();
    site.refresh_wait();
    let full = manifest_bound(src);

    // dp2 forgets the manifest of what it has installed (its record says v1 is there, so
    // the site offers a delta against v1, which dp2 cannot apply).
    site.agents[1].terminate();
    let db = site.agents[1].data_dir.join("agent.db");
    let out = std::process::Command::new("sqlite3")
        .arg(&db)
        .arg("UPDATE packages SET installed_manifest = NULL, previous_manifest = NULL")
        .output()
        .expect("sqlite3");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    site.agents[1].restart();

    let first = site.src.join(gen_first_file(&site.src));
    append(&first, &random_bytes(100, 81));
    set_old_mtimes(&site.src);
    let sent = refresh_and_costs(&site, 2);
    eprintln!("sent {sent:?} bytes (full manifest ≈ {full})");
    assert!(sent[0] < 4 * KIB, "dp1 still holds its base: {} bytes", sent[0]);
    assert!(sent[1] > full / 4, "dp2 needed the full manifest, yet only {} bytes went", sent[1]);
    assert!(site.server.log().contains("sending the full manifest"), "the fallback is logged");

    // From then on dp2 holds a base again.
    append(&first, &random_bytes(100, 82));
    set_old_mtimes(&site.src);
    let sent = refresh_and_costs(&site, 3);
    assert!(sent.iter().all(|s| *s < 4 * KIB), "{sent:?}");
}

/// The first regular file under `root` (in sorted order), relative.
fn gen_first_file(root: &Path) -> String {
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(root)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file())
        .map(|e| e.path().strip_prefix(root).unwrap().to_owned())
        .collect();
    files.sort();
    files[0].to_string_lossy().into_owned()
}

#[test]
fn a_chunk_whose_base_the_dp_lost_is_sent_again_without_it() {
    let site = Site::with_dps(1, &[]);
    let src = &site.src;
    gen_tree(src, 30, 909, 0..8 * KIB);
    let big = src.join("big/data.bin");
    write_random_file(&big, 3 * MIB, 91);
    set_old_mtimes(src);
    site.distribute_all();
    site.refresh_wait();

    // The DP's library loses the big file's object (its tree keeps its own link), so the
    // chunk the site encodes against the old bytes cannot be decoded there.
    let object = library_object(&site.agents[0].library(), &blake3_hex(&fs::read(&big).unwrap()));
    fs::remove_file(&object).expect("the DP holds the file in its library");
    overwrite(&big, MIB + 5000, 4 * KIB as usize, 92);
    set_old_mtimes(src);
    let sent = refresh_and_costs(&site, 2);
    let log = site.server.log();
    assert!(log.contains("their base missing there"), "the chunk was rejected and sent again{}", site.tails());
    // Every chunk of the file went (the DP lacks them all), the edited one twice at most.
    assert!(sent[0] > 3 * MIB && sent[0] < 3 * MIB + 512 * KIB, "sent {}", sent[0]);
}
