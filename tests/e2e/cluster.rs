//! Several server nodes of one site on one PostgreSQL database and one shared library
//! folder: a node killed in the middle of a distribution loses its jobs to the other,
//! which finishes them without sending again what arrived; refreshes through two nodes at
//! once; and the refusals that keep a second key, library or SQLite server off a site's
//! database. Tests on PostgreSQL skip (saying so) when no server is reachable, unless
//! `DPSYNC_REQUIRE_POSTGRES=1`.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;
use crate::proxy::Proxy;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// `--lease-secs` of the nodes in these tests: a dead node's jobs move after this.
const LEASE_SECS: u64 = 3;

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Options of node `name` of site PS1 on `db`, sharing `library`.
fn node_opts(db: &PgDatabase, library: &Path, name: &str) -> ServerOpts {
    ServerOpts {
        database_url: Some(db.url.clone()),
        args: vec![
            "--library".into(),
            s(library).into(),
            "--node".into(),
            name.into(),
            "--lease-secs".into(),
            LEASE_SECS.to_string(),
            "--retry-delay-ms".into(),
            "200".into(),
        ],
        ..ServerOpts::site("PS1")
    }
}

fn target_state<'a>(status: &'a Value, name: &str) -> &'a str {
    target_of(status, name)["state"].as_str().unwrap_or("")
}

/// Two rate-limited DPs behind byte-counting proxies, a package of about 16 MiB distributed by node A;
/// A is SIGKILLed in the middle of both transfers; node B (started while A's jobs run,
/// leaving them alone) takes them over once A's lease runs out and finishes them: both
/// trees equal the source, and what crossed each link in all stays within 1.05 × the
/// package.
#[test]
fn a_killed_node_loses_its_jobs_to_the_other_which_finishes_them() {
    let Some(db) = PgDatabase::create() else { return };
    const RATE: u64 = 3 * MIB;
    let dir = TestDir::new();
    let library = dir.join("library");
    let src = dir.join("src");
    let mut tree = gen_tree(&src, 30, 1501, 0..64 * KIB);
    tree.add_file(&src, "big/payload.bin", 14 * MIB, 1502);
    set_old_mtimes(&src);
    let total = tree.total_bytes();

    let mut a = Server::start_with(dir.join("node-a"), node_opts(&db, &library, "a"));
    let agents: Vec<Agent> =
        (1..=2).map(|i| Agent::start(dir.join(format!("dp{i}")), Some(&format!("token-dp{i}")))).collect();
    let proxies: Vec<Proxy> = agents.iter().map(|ag| Proxy::start(ag.addr())).collect();
    // The proxies only count: the rate limit is the site's (`dp add --rate-limit`), as
    // for a branch link.
    for (i, p) in proxies.iter().enumerate() {
        let name = format!("dp{}", i + 1);
        let token = format!("token-{name}");
        a.cli_json(&["dp", "add", &name, &p.url(), "--token", &token, "--rate-limit", &RATE.to_string()]);
    }
    let id = text(&a.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    a.cli_json(&["distribute", &id, "--dp", "dp1", "--dp", "dp2"]);
    assert_eq!(num(&a.cli_json(&["refresh", &id]), "source_version"), 1);

    let agent_daemons: Vec<&Daemon> = agents.iter().map(Agent::daemon).collect();
    let running_on_a = |st: &Value| {
        ["dp1", "dp2"].iter().all(|n| {
            let t = target_of(st, n);
            t["state"] == "in_progress" && t["node"] == "a"
        })
    };
    a.wait_status(&id, "node a to run both jobs", Duration::from_secs(30), &agent_daemons, |st| {
        assert!(["dp1", "dp2"].iter().all(|n| target_state(st, n) != "installed"), "finished too soon: {st:#}");
        running_on_a(st)
    });

    let text_status = String::from_utf8_lossy(&a.cli(&["status", &id]).stdout).into_owned();
    assert!(text_status.contains("running on node a"), "{text_status}");

    // Node B starts meanwhile: A's live jobs stay A's.
    let b = Server::start_with(dir.join("node-b"), node_opts(&db, &library, "b"));
    let info = b.cli_json(&["info"]);
    let nodes: Vec<&str> = info["nodes"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(nodes, ["a", "b"], "{info:#}");
    assert!(info["nodes"].as_array().unwrap().iter().all(|n| n["alive"] == true), "{info:#}");
    assert_eq!(info["site_key"], a.cli_json(&["info"])["site_key"], "one site key");
    let text_info = String::from_utf8_lossy(&b.cli(&["info"]).stdout).into_owned();
    assert!(
        text_info.contains("node a") && text_info.contains("node b") && text_info.contains("last heartbeat"),
        "{text_info}"
    );
    b.wait_status(&id, "a third of the package to cross to each DP", Duration::from_secs(30), &agent_daemons, |st| {
        assert!(running_on_a(st), "node b took node a's live jobs: {st:#}");
        proxies.iter().all(|p| p.bytes_up() >= total / 3)
    });

    a.kill9();
    let killed = Instant::now();
    let before: Vec<u64> = proxies.iter().map(Proxy::bytes_up).collect();
    eprintln!("killed node a; {before:?} bytes had crossed to the DPs");
    assert!(before.iter().all(|&n| n < total), "a DP already had everything: {before:?}");

    // B takes the jobs over after A's lease, and needs about what is left to send.
    let limit = Duration::from_secs(LEASE_SECS + 2) + Duration::from_secs(total / RATE + 20);
    for name in ["dp1", "dp2"] {
        b.wait_installed(&id, name, 1, limit.saturating_sub(killed.elapsed()), &agent_daemons);
    }
    eprintln!("node b finished both {:?} after the kill", killed.elapsed());
    for (i, ag) in agents.iter().enumerate() {
        assert_same_tree(&src, &ag.current(&id));
        let sent = proxies[i].bytes_up();
        eprintln!("dp{}: {sent} bytes crossed for {total} bytes of content", i + 1);
        assert!(sent as f64 <= 1.05 * total as f64, "dp{} was sent {sent} bytes for {total}", i + 1);
    }
    let log = b.log();
    assert!(log.contains("took over jobs whose node stopped renewing its lease"), "node b's log:\n{log}");
    let info = b.cli_json(&["info"]);
    let a_row = info["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "a").unwrap().clone();
    assert_eq!(a_row["alive"], false, "{info:#}");
    drop(b);
    drop(a);
    drop(proxies);
    drop(agents);
    drop(db);
}

/// Refreshes of one package through both nodes at once, several rounds: each succeeds
/// with its own version or is refused with a clear message; versions never repeat and
/// only grow; and they run one after the other (the new file of a round is read by one
/// of them only).
#[test]
fn concurrent_refreshes_through_two_nodes_get_distinct_versions() {
    let Some(db) = PgDatabase::create() else { return };
    let dir = TestDir::new();
    let library = dir.join("library");
    let src = dir.join("src");
    let mut tree = gen_tree(&src, 200, 1511, 0..32 * KIB);
    let a = Server::start_with(dir.join("node-a"), node_opts(&db, &library, "a"));
    let b = Server::start_with(dir.join("node-b"), node_opts(&db, &library, "b"));
    let id = text(&a.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    set_old_mtimes(&src);
    let mut versions = vec![num(&b.cli_json(&["refresh", &id]), "source_version")];
    for round in 0..4u64 {
        tree.add_file(&src, &format!("round-{round}.bin"), 2 * MIB, 1520 + round);
        // Old times: no file is re-read for having changed too recently to be trusted.
        set_old_mtimes(&src);
        let mut hashed = Vec::new();
        let outs = std::thread::scope(|sc| {
            let ra = sc.spawn(|| a.cli(&["refresh", &id, "--json"]));
            let rb = sc.spawn(|| b.cli(&["refresh", &id, "--json"]));
            [ra.join().unwrap(), rb.join().unwrap()]
        });
        for out in outs {
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            if out.status.success() {
                let r: Value = serde_json::from_slice(&out.stdout).unwrap();
                versions.push(num(&r, "source_version"));
                hashed.push(num(&r, "bytes_hashed"));
            } else {
                assert!(
                    stderr.starts_with("dpsync: ")
                        && stderr.trim_end().lines().count() == 1
                        && stderr.contains("refresh"),
                    "a refresh failed without a clear refusal: {stderr}"
                );
            }
        }
        // One after the other: the second starts from the first's version, so the new
        // file is read once in the round, not by both.
        assert_eq!(hashed.iter().sum::<u64>(), 2 * MIB, "round {round}: bytes hashed {hashed:?}");
    }
    eprintln!("versions: {versions:?}");
    let mut sorted = versions.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), versions.len(), "a version was given twice: {versions:?}");
    assert!(versions.len() >= 5, "most refreshes were refused: {versions:?}");
    let shown = a.cli_json(&["package", "show", &id]);
    let stored: Vec<u64> = shown["versions"].as_array().unwrap().iter().map(|v| num(v, "source_version")).collect();
    assert!(stored.windows(2).all(|w| w[0] < w[1]), "versions only grow: {stored:?}");
    assert_eq!(num(&shown, "source_version"), *sorted.last().unwrap());
    drop(b);
    drop(a);
    drop(db);
}

/// A second server on a site's database with its own key, or with the site's key but
/// another library, is refused naming what differs; so is a second server on one SQLite
/// file. The nodes that belong keep running.
#[test]
fn a_second_key_or_library_or_sqlite_server_is_refused() {
    let dir = TestDir::new();
    // SQLite: a second server (its own data directory) on the first one's database.
    let first = Server::start(dir.join("sqlite-a"), "PS1");
    let db_file = first.data_dir.join("dpsync.db");
    let opts = ServerOpts { database_url: Some(format!("sqlite://{}", db_file.display())), ..ServerOpts::site("PS1") };
    let e = Server::refuse_to_start(dir.join("sqlite-b"), &opts);
    assert!(e.contains("is in use by another dpsync server") && e.contains("PostgreSQL"), "{e}");
    first.cli_json(&["info"]);
    drop(first);

    let Some(db) = PgDatabase::create() else { return };
    let library = dir.join("library");
    let a = Server::start_with(dir.join("node-a"), node_opts(&db, &library, "a"));

    // Its own library, so its own key: the key differs.
    let other: PathBuf = dir.join("other-library");
    let e = Server::refuse_to_start(dir.join("node-b"), &node_opts(&db, &other, "b"));
    assert!(e.contains("signing key") && e.contains("is not the key of site PS1") && e.contains("--library"), "{e}");
    // No --library at all (the new user's mistake): its data directory's own key.
    let plain = ServerOpts { database_url: Some(db.url.clone()), ..ServerOpts::site("PS1") };
    let e = Server::refuse_to_start(dir.join("node-c"), &plain);
    assert!(e.contains("signing key"), "{e}");
    // The site's key, in another library folder: the library differs.
    let copied = dir.join("copied-library");
    fs::create_dir_all(&copied).unwrap();
    fs::set_permissions(&copied, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    fs::copy(library.join("site.key"), copied.join("site.key")).unwrap();
    let e = Server::refuse_to_start(dir.join("node-d"), &node_opts(&db, &copied, "d"));
    assert!(e.contains("content library") && e.contains("is not the library of site PS1"), "{e}");

    // The same library: a node of the site.
    let mut b = Server::start_with(dir.join("node-b2"), node_opts(&db, &library, "b"));
    assert_eq!(b.cli_json(&["info"])["site_key"], a.cli_json(&["info"])["site_key"]);
    // A clean stop is seen at once by the other nodes.
    b.terminate();
    let info = a.cli_json(&["info"]);
    let b_row = info["nodes"].as_array().unwrap().iter().find(|n| n["name"] == "b").unwrap().clone();
    assert_eq!(b_row["alive"], false, "{info:#}");
    drop(b);
    drop(a);
    drop(db);
}

/// Both nodes alive, ten rounds: a new version is refreshed through one node and, at a
/// random moment of its distribution, one node (chosen at random) is SIGKILLed and
/// started again. Every round ends with both DPs on the round's version and trees equal
/// to the source; versions never repeat; and no version was installed twice on a DP,
/// which a job pushed by two nodes at once would do (each commit logs one
/// "version installed" line on the agent).
#[test]
fn killing_either_node_at_random_moments_loses_nothing() {
    let Some(db) = PgDatabase::create() else { return };
    const RATE: u64 = 2 * MIB;
    let dir = TestDir::new();
    let library = dir.join("library");
    let src = dir.join("src");
    let mut tree = gen_tree(&src, 40, 1531, 0..32 * KIB);
    let mut nodes = [
        Server::start_with(dir.join("node-a"), node_opts(&db, &library, "a")),
        Server::start_with(dir.join("node-b"), node_opts(&db, &library, "b")),
    ];
    let agents: Vec<Agent> =
        (1..=2).map(|i| Agent::start(dir.join(format!("dp{i}")), Some(&format!("token-dp{i}")))).collect();
    for (i, ag) in agents.iter().enumerate() {
        let name = format!("dp{}", i + 1);
        let token = format!("token-{name}");
        nodes[0].cli_json(&["dp", "add", &name, &ag.url(), "--token", &token, "--rate-limit", &RATE.to_string()]);
    }
    let id = text(&nodes[0].cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    nodes[1].cli_json(&["distribute", &id, "--dp", "dp1", "--dp", "dp2"]);
    let mut rng = Rng::new(1532);
    let mut versions = Vec::new();
    let mut mid_job = 0;
    for round in 0..10u64 {
        tree.add_file(&src, &format!("round-{round}.bin"), 2 * MIB + rng.below(MIB), 1540 + round);
        let via = rng.below(2) as usize;
        let v = num(&nodes[via].cli_json(&["refresh", &id]), "source_version");
        versions.push(v);
        std::thread::sleep(Duration::from_millis(rng.range(50..900)));
        let victim = rng.below(2) as usize;
        let victim_name = ["a", "b"][victim];
        let st = nodes[1 - victim].status(&id);
        let held = ["dp1", "dp2"].iter().filter(|n| target_of(&st, n)["node"] == victim_name).count();
        mid_job += usize::from(held > 0);
        eprintln!("round {round}: version {v} through node {via}, killing node {victim_name} ({held} jobs held)");
        nodes[victim].kill9();
        nodes[victim].restart();
        let other = &nodes[1 - victim];
        let agent_daemons: Vec<&Daemon> = agents.iter().map(Agent::daemon).collect();
        for name in ["dp1", "dp2"] {
            other.wait_installed(&id, name, v, Duration::from_secs(60), &agent_daemons);
        }
        for ag in &agents {
            assert_same_tree(&src, &ag.current(&id));
        }
    }
    eprintln!("{mid_job} of 10 kills hit a node while it ran jobs");
    assert!(mid_job >= 1, "no kill hit a node in the middle of a job: the loop tested nothing");
    let mut distinct = versions.clone();
    distinct.dedup();
    assert_eq!(distinct, versions, "versions repeat");
    assert!(versions.windows(2).all(|w| w[0] < w[1]), "versions only grow: {versions:?}");
    for (i, ag) in agents.iter().enumerate() {
        let log = ag.log();
        for v in &versions {
            let needle = format!("version installed package=\"{id}\" version={v} ");
            let n = log.matches(&needle).count();
            assert!(n <= 1, "dp{} installed version {v} {n} times: two nodes pushed one job", i + 1);
        }
        let last = versions.last().unwrap();
        assert!(log.contains(&format!("version installed package=\"{id}\" version={last} ")), "dp{}", i + 1);
    }
    drop(nodes);
    drop(agents);
    drop(db);
}

/// A child site run by two nodes (one PostgreSQL database, one library, one TLS
/// certificate): the parent registers it with both addresses; with the first node
/// stopped, a refresh at the parent reaches the child through the second, and the
/// child's DP installs it.
#[test]
fn a_parent_uses_the_next_address_of_a_child_site_when_one_fails() {
    let Some(db) = PgDatabase::create() else { return };
    let dir = TestDir::new();
    let src = dir.join("src");
    gen_tree(&src, 30, 1551, 0..64 * KIB);
    set_old_mtimes(&src);
    let tls = dir.join("ch1-tls");
    let out = run_bounded(
        dpsync_command().args(["cert", "create", "--out", s(&tls), "--host", "127.0.0.1", "--json"]),
        CLI_TIMEOUT,
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fingerprint = text(&serde_json::from_slice(&out.stdout).unwrap(), "fingerprint").to_owned();
    let library = dir.join("ch1-library");
    let child = |name: &str| {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut opts = node_opts(&db, &library, name);
        opts.site_code = Some("CH1".into());
        opts.args.extend(
            [
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--token",
                "link",
                "--tls-cert",
                s(&tls.join("cert.pem")),
                "--tls-key",
                s(&tls.join("key.pem")),
            ]
            .map(String::from),
        );
        (Server::start_with(dir.join(format!("ch1-{name}")), opts), format!("https://127.0.0.1:{port}"))
    };
    let (mut ch1a, url_a) = child("a");
    let (ch1b, url_b) = child("b");
    let dp = Agent::start(dir.join("dp1"), Some("dp-token"));
    ch1a.cli_json(&["dp", "add", "dp1", &dp.url(), "--token", "dp-token"]);

    let ps1 = Server::start(dir.join("ps1"), "PS1");
    let r = ps1.cli_json(&["site", "add", "ch1", &url_a, &url_b, "--token", "link", "--fingerprint", &fingerprint]);
    assert_eq!(text(&r, "url"), format!("{url_a} {url_b}"), "{r:#}");
    let id = text(&ps1.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
    ps1.cli_json(&["distribute", &id, "--site", "ch1"]);
    ps1.cli_json(&["refresh", &id]);
    let daemons = [ch1a.daemon(), ch1b.daemon(), dp.daemon()];
    ps1.wait_installed(&id, "ch1", 1, Duration::from_secs(60), &daemons);
    ch1b.wait_installed(&id, "dp1", 1, Duration::from_secs(60), &[dp.daemon()]);

    // The first node goes away: version 2 goes through the second address.
    ch1a.terminate();
    fs::write(src.join("new.txt"), b"version 2").unwrap();
    ps1.cli_json(&["refresh", &id]);
    ps1.wait_installed(&id, "ch1", 2, Duration::from_secs(60), &[ch1b.daemon(), dp.daemon()]);
    ch1b.wait_installed(&id, "dp1", 2, Duration::from_secs(60), &[dp.daemon()]);
    assert_same_tree(&src, &dp.current(&id));
    let log = ps1.log();
    assert!(log.contains(&format!("trying its next address {url_b}")), "PS1's log:\n{log}");
    drop(ps1);
    drop(ch1b);
    drop(ch1a);
    drop(dp);
    drop(db);
}
