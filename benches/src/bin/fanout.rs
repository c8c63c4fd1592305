//! `fanout`: one version to N DPs behind a rate-limited site uplink, pushed by the site
//! vs pulled by the DPs from each other (`dp add --pull --source auto`).
//!
//! ```text
//! cargo build -p dpsync -p dpsync-bench
//! target/debug/fanout [--dps 10,50,200] [--mib 32] [--uplink-mib-s 32] [--modes push,pull]
//!     [--parallel-targets N] [--dpsync target/debug/dpsync] [--dir /tmp/PATH] [--json out.json]
//! ```
//!
//! For each N and mode it starts a fresh `dpsync server` and N agents (`dpsync agent
//! --insecure-http`, each behind a proxy), adds them to one group (pull: `--pull --source
//! auto`), refreshes a package of `--mib` MiB of incompressible files, then times `distribute
//! --group` until every DP reports the version `installed`. The proxies share one pacer for
//! the client→DP direction at `--uplink-mib-s`: what the site sends to any DP goes through
//! that one "uplink". A DP fetching from a peer also goes through the peer's proxy, but
//! only its small id lists go that way; the chunks come back in the other direction,
//! which is not limited (peers are on the branch side of the uplink).
//!
//! Recorded: time until all installed, bytes out of the site (sum of `bytes_sent_last`),
//! bytes between peers (sum of `bytes_from_peers_last`), the server's CPU seconds and
//! peak RSS (`VmHWM`). Every DP's tree is checked (file sizes and BLAKE3) at the end.
#![allow(unsafe_code)] // libc::kill (stop a daemon with SIGTERM).

use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dpsync_testkit::Rng;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

use dpsync_bench::harness::{Daemon, Res, admin_get, err, wait_for};

struct Args {
    dps: Vec<usize>,
    mib: u64,
    uplink: u64,
    modes: Vec<String>,
    parallel_targets: Option<String>,
    dpsync: PathBuf,
    dir: PathBuf,
    json: Option<PathBuf>,
}

fn parse_args() -> Res<Args> {
    let exe = std::env::current_exe().map_err(err("current_exe"))?;
    let mut a = Args {
        dps: vec![10, 50, 200],
        mib: 32,
        uplink: 32 * MIB,
        modes: vec!["push".into(), "pull".into()],
        parallel_targets: None,
        dpsync: exe.with_file_name("dpsync"),
        dir: std::env::temp_dir().join(format!("dpsync-fanout-{}", std::process::id())),
        json: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--dps" => a.dps = val()?.split(',').map(|n| n.trim().parse().map_err(err("--dps"))).collect::<Res<_>>()?,
            "--mib" => a.mib = val()?.parse().map_err(err("--mib"))?,
            "--uplink-mib-s" => a.uplink = val()?.parse::<u64>().map_err(err("--uplink-mib-s"))? * MIB,
            "--modes" => a.modes = val()?.split(',').map(str::to_owned).collect(),
            "--parallel-targets" => a.parallel_targets = Some(val()?),
            "--dpsync" => a.dpsync = val()?.into(),
            "--dir" => a.dir = val()?.into(),
            "--json" => a.json = Some(val()?.into()),
            other => return Err(format!("unknown argument {other}; see the module docs")),
        }
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("fanout: {e}");
        std::process::exit(1);
    }
}

fn run() -> Res<()> {
    let args = parse_args()?;
    fs::create_dir_all(&args.dir).map_err(err(args.dir.display()))?;
    let src = args.dir.join("src");
    let files = generate(&src, args.mib)?;
    let mut results = Vec::new();
    println!(
        "{:>5} {:>5} {:>10} {:>14} {:>10} {:>14} {:>10} {:>10}",
        "N", "mode", "time s", "site out", "copies", "between peers", "srv cpu s", "srv RSS"
    );
    for &n in &args.dps {
        for mode in &args.modes {
            let base = args.dir.join(format!("{mode}-{n}"));
            let r = one_run(&args, &base, &src, &files, n, mode)?;
            let copies = r["site_bytes"].as_f64().unwrap_or(0.0) / (args.mib * MIB) as f64;
            println!(
                "{:>5} {:>5} {:>10.1} {:>14} {:>10.2} {:>14} {:>10.1} {:>9}M",
                n,
                mode,
                r["seconds"].as_f64().unwrap_or(0.0),
                r["site_bytes"].as_u64().unwrap_or(0),
                copies,
                r["peer_bytes"].as_u64().unwrap_or(0),
                r["server_cpu_s"].as_f64().unwrap_or(0.0),
                r["server_peak_rss_kib"].as_u64().unwrap_or(0) / 1024
            );
            results.push(r);
            let _ = fs::remove_dir_all(&base);
        }
    }
    if let Some(path) = &args.json {
        let doc = json!({"mib": args.mib, "uplink_bytes_per_s": args.uplink, "runs": results});
        fs::write(path, serde_json::to_vec_pretty(&doc).unwrap()).map_err(err(path.display()))?;
    }
    let _ = fs::remove_dir_all(&args.dir);
    Ok(())
}

/// Incompressible files adding up to `mib` MiB (8 of them); their sizes and BLAKE3s.
fn generate(src: &Path, mib: u64) -> Res<Vec<(String, u64, blake3::Hash)>> {
    fs::create_dir_all(src).map_err(err(src.display()))?;
    let mut rng = Rng::new(2026);
    let mut out = Vec::new();
    let each = mib * MIB / 8;
    for i in 0..8 {
        let name = format!("file{i}.bin");
        let mut data = vec![0u8; each as usize];
        rng.fill(&mut data);
        fs::write(src.join(&name), &data).map_err(err(&name))?;
        out.push((name, each, blake3::hash(&data)));
    }
    Ok(out)
}

fn one_run(
    args: &Args,
    base: &Path,
    src: &Path,
    files: &[(String, u64, blake3::Hash)],
    n: usize,
    mode: &str,
) -> Res<Value> {
    let logs = base.join("logs");
    fs::create_dir_all(&logs).map_err(err(logs.display()))?;
    let server_dir = base.join("server");
    let sock = server_dir.join("admin.sock");
    let env = [("RUST_LOG", "warn")];
    let sd = server_dir.to_str().ok_or("non-UTF-8 path")?;
    let mut sargs = vec!["server", "--data-dir", sd];
    if let Some(n) = &args.parallel_targets {
        sargs.extend(["--parallel-targets", n.as_str()]);
    }
    let mut server = Daemon::spawn("server", &args.dpsync, &sargs, &logs.join("server.log"), &env)?;
    wait_for("the server", Duration::from_secs(30), || {
        server.alive()?;
        Ok(sock.exists() && admin_get(&sock, "/v1/site").is_ok())
    })?;
    let uplink = Arc::new(Pacer::new(args.uplink));
    let mut agents = Vec::new();
    for i in 1..=n {
        let dir = base.join(format!("dp{i}"));
        let a = Daemon::spawn_agent(&format!("dp{i}"), &args.dpsync, &dir, &logs.join(format!("dp{i}.log")), &env)?;
        agents.push((a, dir));
    }
    let mut proxies = Vec::new();
    for (a, dir) in agents.iter_mut() {
        let addr_file = dir.join("listen.addr");
        wait_for("an agent's listen.addr", Duration::from_secs(60), || {
            a.alive()?;
            Ok(fs::read_to_string(&addr_file).is_ok_and(|s| s.trim().parse::<SocketAddr>().is_ok()))
        })?;
        let addr: SocketAddr =
            fs::read_to_string(&addr_file).map_err(err("listen.addr"))?.trim().parse().map_err(err("listen.addr"))?;
        proxies.push(Proxy::start(addr, uplink.clone())?);
    }
    let cli = |a: &[&str]| cli(&args.dpsync, &server_dir, a);
    let pkg = cli(&["package", "add", "bench", src.to_str().ok_or("non-UTF-8 path")?])?["id"]
        .as_str()
        .ok_or("package add: no id")?
        .to_owned();
    cli(&["refresh", &pkg])?;
    for (i, p) in proxies.iter().enumerate() {
        let (name, url) = (format!("dp{}", i + 1), format!("http://{}", p.addr));
        let mut a = vec!["dp", "add", &name, &url, "--group", "g"];
        if mode == "pull" {
            a.extend(["--pull", "--source", "auto"]);
        }
        cli(&a)?;
    }
    let cpu0 = proc_cpu(server.pid());
    let started = Instant::now();
    cli(&["distribute", &pkg, "--group", "g"])?;
    let status = loop {
        server.alive()?;
        let s = admin_get(&sock, &format!("/v1/packages/{pkg}/status"))?;
        let targets = s["targets"].as_array().cloned().unwrap_or_default();
        let done = targets.iter().filter(|t| t["state"] == "installed").count();
        if done == n {
            break s;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            return Err(format!("{mode} N={n}: {done} of {n} installed after an hour"));
        }
        thread::sleep(Duration::from_millis(200));
    };
    let seconds = started.elapsed().as_secs_f64();
    let cpu = proc_cpu(server.pid()) - cpu0;
    let rss = vm_hwm_kib(server.pid());
    let sum = |k: &str| -> u64 {
        status["targets"].as_array().map_or(0, |ts| ts.iter().map(|t| t[k].as_u64().unwrap_or(0)).sum())
    };
    let (site_bytes, peer_bytes) = (sum("bytes_sent_last"), sum("bytes_from_peers_last"));
    // Every tree whole.
    for (_, dir) in &agents {
        let tree = dir.join("packages").join(&pkg).join("current");
        for (name, size, hash) in files {
            let data = fs::read(tree.join(name)).map_err(err(format!("{}/{name}", tree.display())))?;
            if data.len() as u64 != *size || blake3::hash(&data) != *hash {
                return Err(format!("{}/{name} differs from the source", tree.display()));
            }
        }
    }
    drop(proxies);
    drop(agents);
    drop(server);
    Ok(json!({
        "dps": n, "mode": mode, "seconds": seconds, "site_bytes": site_bytes, "peer_bytes": peer_bytes,
        "server_cpu_s": cpu, "server_peak_rss_kib": rss,
    }))
}

fn cli(dpsync: &Path, server_dir: &Path, args: &[&str]) -> Res<Value> {
    let out = Command::new(dpsync)
        .arg("--data-dir")
        .arg(server_dir)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(err("dpsync CLI"))?;
    if !out.status.success() {
        return Err(format!("dpsync {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    serde_json::from_slice(&out.stdout).map_err(err(format!("dpsync {} output", args.join(" "))))
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// utime + stime of a process, in seconds.
fn proc_cpu(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (tick(11) + tick(12)) as f64 / clk_tck()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// The uplink: proxies sharing one pacer for the client→DP direction

/// Spaces bytes to `rate` per second across every proxy that holds it.
struct Pacer {
    rate: u64,
    state: Mutex<(Instant, u64)>,
}

impl Pacer {
    fn new(rate: u64) -> Self {
        Self { rate, state: Mutex::new((Instant::now(), 0)) }
    }

    fn take(&self, n: usize) {
        let due = {
            let mut s = self.state.lock().unwrap();
            // No credit for idle time: restart the clock when behind it.
            let now = Instant::now();
            let at = s.0 + Duration::from_secs_f64(s.1 as f64 / self.rate as f64);
            if at < now {
                *s = (now, 0);
            }
            s.1 += n as u64;
            s.0 + Duration::from_secs_f64(s.1 as f64 / self.rate as f64)
        };
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
    }
}

struct Proxy {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: SocketAddr, pacer: Arc<Pacer>) -> Res<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(err("proxy bind"))?;
        let addr = listener.local_addr().map_err(err("proxy addr"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        thread::spawn(move || {
            for client in listener.incoming() {
                if stopping.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(upstream) else { continue };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) else { continue };
                let p = pacer.clone();
                thread::spawn(move || pump(client, server, Some(&p)));
                thread::spawn(move || pump(s2, c2, None));
            }
        });
        Ok(Self { addr, stop })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(self.addr);
    }
}

fn pump(mut src: TcpStream, mut dst: TcpStream, pacer: Option<&Pacer>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        // Small reads when paced, so that the rate is smooth.
        let want = if pacer.is_some() { 16 << 10 } else { buf.len() };
        match src.read(&mut buf[..want]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if let Some(p) = pacer {
                    p.take(n);
                }
                if dst.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = src.shutdown(Shutdown::Both);
    let _ = dst.shutdown(Shutdown::Both);
}

// ---------------------------------------------------------------------------------------
// Daemons and the admin socket
