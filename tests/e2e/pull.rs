//! Pull DPs end to end: a seed DP installed by the site, pull DPs (`dp add --pull --source
//! seed`) that take the chunks they lack from it with the site's ticket. The site's link
//! to each pull DP (a counting proxy in front of it) carries only manifests and control;
//! a seed that is down sends the pull DPs back to the site; a peer that damages a byte is
//! dropped and the content fetched elsewhere; a peer refuses chunks without a valid ticket.
//!
//! Content is incompressible (BLAKE3-stream), so byte counts are not blurred.

use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::harness::*;
use crate::proxy::Proxy;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const WAIT: Duration = Duration::from_secs(90);

fn s(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// A server with package `app` (about 12 MiB in 41 files), installed on the DPs
/// `seeds` names (each started and registered directly, or through a proxy when asked).
struct Pulls {
    server: Server,
    src: PathBuf,
    id: String,
    package_bytes: u64,
    agents: Vec<(String, Agent)>,
    /// Proxies by target name (in front of the target, as the site reaches it).
    proxies: Vec<(String, Proxy)>,
    dir: TestDir,
}

impl Pulls {
    fn new() -> Self {
        let dir = TestDir::new();
        let src = dir.join("src");
        fs::create_dir_all(&src).unwrap();
        let mut tree = gen_tree(&src, 40, 1313, 0..256 * KIB);
        tree.add_file(&src, "big/eight.bin", 8 * MIB, 131);
        set_old_mtimes(&src);
        let package_bytes = tree.total_bytes();
        let server = Server::start_with(
            dir.join("d"),
            ServerOpts { args: vec!["--retry-delay-ms".into(), "200".into()], ..ServerOpts::site("PS1") },
        );
        let id = text(&server.cli_json(&["package", "add", "app", s(&src)]), "id").to_owned();
        server.cli_json(&["refresh", &id]);
        Self { server, src, id, package_bytes, agents: Vec::new(), proxies: Vec::new(), dir }
    }

    /// Starts agent `name` and registers it with `extra` `dp add` arguments; through a
    /// proxy the test keeps when `proxied`.
    fn add(&mut self, name: &str, proxied: bool, extra: &[&str]) {
        let token = format!("token-{name}");
        let agent = Agent::start(self.dir.join(name), Some(&token));
        let url = if proxied {
            let p = Proxy::start(agent.addr());
            let url = p.url();
            self.proxies.push((name.to_owned(), p));
            url
        } else {
            agent.url()
        };
        let mut args = vec!["dp", "add", name, url.as_str(), "--token", token.as_str()];
        args.extend_from_slice(extra);
        self.server.cli_json(&args);
        self.agents.push((name.to_owned(), agent));
    }

    fn agent(&self, name: &str) -> &Agent {
        &self.agents.iter().find(|(n, _)| n == name).expect("agent started").1
    }

    fn agent_mut(&mut self, name: &str) -> &mut Agent {
        &mut self.agents.iter_mut().find(|(n, _)| n == name).expect("agent started").1
    }

    fn proxy(&self, name: &str) -> &Proxy {
        &self.proxies.iter().find(|(n, _)| n == name).expect("proxy started").1
    }

    fn daemons(&self) -> Vec<&Daemon> {
        self.agents.iter().map(|(_, a)| a.daemon()).collect()
    }

    fn distribute(&self, names: &[&str]) {
        let mut args = vec!["distribute", self.id.as_str()];
        for n in names {
            args.extend(["--dp", n]);
        }
        self.server.cli_json(&args);
    }

    fn wait_installed(&self, name: &str) -> Value {
        self.server.wait_installed(&self.id, name, 1, WAIT, &self.daemons())
    }

    fn assert_matches_source(&self, name: &str) {
        assert_same_tree_and_times(&self.src, &self.agent(name).current(&self.id));
    }
}

fn num_of(t: &Value, key: &str) -> u64 {
    t[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {t:#}"))
}

#[test]
fn four_pull_dps_take_the_content_from_the_seed_and_the_site_sends_only_manifests() {
    let mut p = Pulls::new();
    p.add("seed", false, &[]);
    p.distribute(&["seed"]);
    p.wait_installed("seed");
    let pulls = ["pull1", "pull2", "pull3", "pull4"];
    for name in pulls {
        p.add(name, true, &["--pull", "--source", "seed"]);
    }
    let shown = p.server.cli_json(&["dp", "show", "pull1"]);
    assert_eq!(shown["pull_sources"], serde_json::json!(["seed"]), "{shown:#}");
    p.distribute(&pulls);
    for name in pulls {
        let t = p.wait_installed(name);
        p.assert_matches_source(name);
        // Everything the site said to it, both ways, through the proxy in front of it.
        let link = p.proxy(name).bytes_down() + p.proxy(name).bytes_up();
        let bound = p.package_bytes / 20;
        assert!(link <= bound, "{name}: the site's link carried {link} bytes (bound {bound}){}", p.server.log());
        let (from_site, from_peers) = (num_of(&t, "bytes_sent_last"), num_of(&t, "bytes_from_peers_last"));
        eprintln!("{name}: site link {link} bytes, bytes_sent_last {from_site}, bytes_from_peers_last {from_peers}");
        assert!(from_site <= bound, "{name}: bytes_sent_last {from_site} (bound {bound})");
        assert!(
            from_peers >= p.package_bytes * 9 / 10,
            "{name}: bytes_from_peers_last {from_peers} of a {} byte package",
            p.package_bytes
        );
    }
    // The seed served them: its log says nothing was refused.
    assert!(!p.agent("seed").log().contains("refused chunks to a peer"), "{}", p.agent("seed").log());
}

#[test]
fn with_the_seed_down_pull_dps_fall_back_to_the_site_and_converge() {
    let mut p = Pulls::new();
    p.add("seed", false, &[]);
    p.distribute(&["seed"]);
    p.wait_installed("seed");
    p.agent_mut("seed").terminate();
    let pulls = ["pull1", "pull2"];
    for name in pulls {
        p.add(name, false, &["--pull", "--source", "seed"]);
    }
    p.distribute(&pulls);
    for name in pulls {
        let t = p.wait_installed(name);
        p.assert_matches_source(name);
        assert_eq!(num_of(&t, "bytes_from_peers_last"), 0, "{t:#}");
        assert!(num_of(&t, "bytes_sent_last") >= p.package_bytes * 9 / 10, "the site sent it all: {t:#}");
        let log = p.agent(name).log();
        assert!(log.contains("dropping peer seed"), "{name} names the seed it gave up on:\n{log}");
    }
    assert!(p.server.log().contains("pulled from peers"), "{}", p.server.log());
}

#[test]
fn a_peer_that_damages_a_byte_is_dropped_and_the_content_comes_from_another() {
    let mut p = Pulls::new();
    // seed1 is reached (by the site and by peers) through a proxy that will damage a byte.
    p.add("seed1", true, &[]);
    p.add("seed2", false, &[]);
    p.distribute(&["seed1", "seed2"]);
    p.wait_installed("seed1");
    p.wait_installed("seed2");
    p.add("puller", true, &["--pull", "--source", "seed1", "--source", "seed2"]);
    // Past the answer's head and the batch header: a byte of the first chunk's data.
    p.proxy("seed1").flip_down_byte_after(8 * KIB);
    p.distribute(&["puller"]);
    let t = p.wait_installed("puller");
    p.assert_matches_source("puller");
    assert_eq!(p.proxy("seed1").faults_injected(), 1, "the proxy damaged one byte");
    let log = p.agent("puller").log();
    assert!(
        log.contains("dropping peer seed1") && log.contains("bad chunk"),
        "the puller names the peer that sent a bad chunk:\n{log}"
    );
    // The content came from seed2, not from the site.
    assert!(num_of(&t, "bytes_sent_last") <= p.package_bytes / 20, "{t:#}");
    assert!(num_of(&t, "bytes_from_peers_last") >= p.package_bytes * 9 / 10, "{t:#}");
}

/// `POST path` with `headers` and `body` to `addr`; answers the status code.
fn post_status(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)], body: &[u8]) -> u16 {
    let mut sock = std::net::TcpStream::connect(addr).expect("connect to the agent");
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut req =
        format!("POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    sock.write_all(req.as_bytes()).unwrap();
    sock.write_all(body).unwrap();
    let mut answer = String::new();
    let _ = sock.read_to_string(&mut answer);
    answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"))
}

#[test]
fn a_peer_refuses_chunks_without_a_valid_ticket() {
    let mut p = Pulls::new();
    p.add("seed", false, &[]);
    p.distribute(&["seed"]);
    p.wait_installed("seed");
    let seed = p.agent("seed");
    let path = format!("/v1/packages/{}/peer-chunks", p.id);
    // Thirty-two bytes: one chunk id (any: the ticket is checked first).
    let ids = [7u8; 32];
    assert_eq!(post_status(seed.addr(), &path, &[], &ids), 403, "no ticket");
    assert_eq!(post_status(seed.addr(), &path, &[("x-dpsync-ticket", "00ff")], &ids), 403, "garbage");
    // A well-formed ticket signed by another key than the site's.
    let forged = serde_json::json!({
        "site": "PS1", "holder": "intruder", "package": p.id, "version": 1,
        "expires_at": 4_000_000_000i64, "signature": "00".repeat(64),
    });
    let forged: String = serde_json::to_vec(&forged).unwrap().iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(post_status(seed.addr(), &path, &[("x-dpsync-ticket", &forged)], &ids), 403, "forged");
    // Not a push route either: the seed's own token does not open it.
    let bearer = "Bearer token-seed";
    assert_eq!(post_status(seed.addr(), &path, &[("authorization", bearer)], &ids), 403, "token only");
    assert!(seed.log().contains("refused chunks to a peer"), "{}", seed.log());
}

#[test]
fn pull_settings_are_checked_and_push_undoes_them() {
    let mut p = Pulls::new();
    p.add("seed", false, &[]);
    let err = p.server.cli_fail(&["dp", "add", "x", "http://127.0.0.1:9", "--pull", "--source", "auto"]);
    assert!(err.contains("add --group G"), "{err}");
    let err = p.server.cli_fail(&["dp", "set", "seed", "--pull", "--source", "seed"]);
    assert!(err.contains("cannot pull from itself"), "{err}");
    let r = p.server.cli_json(&["dp", "set", "seed", "--group", "g", "--pull", "--source", "auto"]);
    assert_eq!(r["pull_sources"], serde_json::json!(["auto"]), "{r:#}");
    let err = p.server.cli_fail(&["dp", "set", "seed", "--no-group"]);
    assert!(err.contains("--push"), "{err}");
    let r = p.server.cli_json(&["dp", "set", "seed", "--push"]);
    assert_eq!(r["pull_sources"], serde_json::json!([]), "{r:#}");
    assert!(r["changed"].as_array().unwrap().iter().any(|c| c == "pull_sources"), "{r:#}");
}

#[test]
fn pull_dps_of_a_group_distributed_together_take_one_copy_from_the_site() {
    let mut p = Pulls::new();
    let names = ["auto1", "auto2", "auto3", "auto4"];
    for name in names {
        p.add(name, false, &["--group", "g", "--pull", "--source", "auto"]);
    }
    p.server.cli_json(&["distribute", &p.id, "--group", "g"]);
    let (mut from_site, mut from_peers) = (0, 0);
    for name in names {
        let t = p.wait_installed(name);
        p.assert_matches_source(name);
        from_site += num_of(&t, "bytes_sent_last");
        from_peers += num_of(&t, "bytes_from_peers_last");
    }
    eprintln!("4 pull DPs (auto): {from_site} bytes from the site, {from_peers} between peers");
    // One DP is fed by the site, the others pull from DPs that have it.
    assert!(from_site <= p.package_bytes * 12 / 10, "the site sent {from_site} for a {} byte package", p.package_bytes);
    assert!(from_peers >= p.package_bytes * 27 / 10, "peers moved {from_peers}");
}

#[test]
fn a_peer_that_hangs_is_given_up_and_the_content_comes_from_another() {
    let mut p = Pulls::new();
    p.add("seed1", true, &[]);
    p.add("seed2", false, &[]);
    p.distribute(&["seed1", "seed2"]);
    p.wait_installed("seed1");
    p.wait_installed("seed2");
    p.add("puller", false, &["--pull", "--source", "seed1", "--source", "seed2"]);
    // seed1 accepts connections and then sends nothing.
    p.proxy("seed1").set_stalled(true);
    p.distribute(&["puller"]);
    let t = p.wait_installed("puller");
    p.assert_matches_source("puller");
    let log = p.agent("puller").log();
    assert!(log.contains("dropping peer seed1"), "the puller gives up on the hung peer:\n{log}");
    assert!(num_of(&t, "bytes_sent_last") <= p.package_bytes / 20, "{t:#}");
    assert!(num_of(&t, "bytes_from_peers_last") >= p.package_bytes * 9 / 10, "{t:#}");
    p.proxy("seed1").set_stalled(false);
}
