//! `compare`: dpsync against rsync, on loopback, with the same trees and the same changes.
//!
//! ```text
//! cargo run --release -p dpsync-bench --bin compare -- [--scenario mixed|tiny|big|all]
//!     [--dps 4] [--scale 0.1..1] [--json out.json] [--dir /tmp/PATH] [--keep]
//! ```
//!
//! For each scenario it generates a seeded source tree, then starts
//!
//! - a real `dpsync server` and `--dps` agents (`dpsync agent --insecure-http`), each agent
//!   behind its own counting TCP proxy, the package distributed to every agent;
//! - an rsync daemon (`rsync --daemon --no-detach`) with one module per DP, and one counting
//!   proxy per rsync client in front of it.
//!
//! Then, for each step (initial distribution, 1 % of files changed, no change, 100 bytes
//! inserted at the start of the largest file), it changes the source once and brings every
//! destination up to date with each tool in turn:
//!
//! - dpsync: `dpsync refresh PKG --wait --json`, timed until the bench sees every target
//!   `installed` at the new version (it polls the admin socket every `--poll-ms`); the
//!   CLI's own exit time is recorded too;
//! - rsync: `--dps` clients in parallel, `rsync -a --delete --no-whole-file src/
//!   rsync://127.0.0.1:PORT/dpN/` (rsync's best case: one client per destination).
//!
//! Each step records wall time, bytes on the wire (both directions, counted by the proxies
//! the same way for both tools), the peak RSS of every process (`VmHWM`, reset before each
//! step through `/proc/PID/clear_refs`; `wait4` rusage for the clients; a 20 ms `/proc`
//! sampler for the rsync daemon's per-connection children) and CPU seconds (`/proc/PID/stat`
//! utime + stime deltas; the daemon's reaped children through cutime + cstime). Every
//! destination is checked against the source after every step (the whole file list with
//! sizes, and the bytes of every changed file plus a random sample).
//!
//! The page cache is warm (nothing is dropped); `sync` runs between steps, untimed. dpsync
//! makes everything durable (fsync); rsync does not fsync.
#![allow(unsafe_code)] // libc::wait4 (rusage of a child), splice/pipe2/fcntl (the proxy), kill.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use dpsync_testkit::{Rng, lognormal_sizes};
use rayon::prelude::*;
use serde_json::{Value, json};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

use dpsync_bench::harness::{Daemon, Res, admin_get, err, wait_for};

// ---------------------------------------------------------------------------------------
// Arguments

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mixed,
    Tiny,
    Big,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Mixed => "mixed",
            Kind::Tiny => "tiny",
            Kind::Big => "big",
        }
    }
}

#[derive(Debug)]
struct Args {
    scenarios: Vec<Kind>,
    dps: usize,
    scale: f64,
    json: Option<PathBuf>,
    dir: Option<PathBuf>,
    dpsync: PathBuf,
    parallel_targets: Option<usize>,
    rsync_args: Vec<String>,
    seed: u64,
    poll_ms: u64,
    keep: bool,
    /// A branch link on every destination's proxy (both tools): rate and round trip.
    link: Option<Link>,
}

/// A shaped link: each direction carries at most `rate` bytes per second (token bucket,
/// no burst beyond one read) and delays every byte by half the round trip.
#[derive(Debug, Clone, Copy)]
struct Link {
    rate: u64,
    rtt: Duration,
}

impl Link {
    /// `100mbit,20ms`, `10mbit,50ms`, `2MiB,100ms` (rate: bit units kbit/mbit/gbit or byte
    /// units KB/MB/KiB/MiB; the delay is the round-trip time).
    fn parse(text: &str) -> Res<Self> {
        let bad = || format!("--link {text:?}: use RATE,RTT, e.g. 100mbit,20ms or 10mbit,50ms");
        let (rate, rtt) = text.split_once(',').ok_or_else(bad)?;
        let rate = rate.trim().to_ascii_lowercase();
        let split = rate.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rate.len());
        let (n, unit) = rate.split_at(split);
        let n: f64 = n.parse().map_err(|_| bad())?;
        let bytes_per_s = n * match unit {
            "kbit" => 1e3 / 8.0,
            "mbit" => 1e6 / 8.0,
            "gbit" => 1e9 / 8.0,
            "kb" => 1e3,
            "mb" => 1e6,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "" | "b" => 1.0,
            _ => return Err(bad()),
        };
        let rtt = rtt.trim().to_ascii_lowercase();
        let ms: f64 = rtt.strip_suffix("ms").ok_or_else(bad)?.parse().map_err(|_| bad())?;
        if bytes_per_s < 1024.0 || !(0.0..=10_000.0).contains(&ms) {
            return Err(bad());
        }
        Ok(Link { rate: bytes_per_s as u64, rtt: Duration::from_secs_f64(ms / 1000.0) })
    }
}

impl std::fmt::Display for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} Mbit/s, {} ms RTT", self.rate as f64 * 8.0 / 1e6, self.rtt.as_millis())
    }
}

const USAGE: &str = "usage: compare [--scenario mixed|tiny|big|all] [--dps N] [--scale S] [--json PATH] [--dir PATH]
               [--dpsync PATH] [--parallel-targets N] [--rsync-args ARGS] [--seed S] [--poll-ms MS] [--keep]
  --scenario     which trees (repeatable; default all): mixed (~20,000 files, log-normal 1 KiB-200 MiB, ~2 GiB),
                 tiny (100,000 files of 0-4 KiB), big (one 2 GiB file)
  --dps N        destinations (dpsync agents; rsync modules and clients) (default 4)
  --scale S      multiplies file counts and sizes, 0 < S <= 1 (default 1.0)
  --json PATH    also write every measurement as JSON
  --dir PATH     working folder (default /tmp/dpsync-compare-PID); removed at the end unless --keep
  --dpsync PATH  the dpsync binary (default: `dpsync` next to this binary, i.e. target/release/dpsync)
  --parallel-targets N   passed to `dpsync server` (default: the server's, 8)
  --rsync-args ARGS      rsync options, space-separated (default \"-a --delete --no-whole-file\")
  --seed S       seed of the trees and changes (default 1)
  --poll-ms MS   how often the bench asks the dpsync server whether every target is installed (default 25)
  --link RATE,RTT   a branch link on every destination's proxy, for both tools: a token-bucket rate per
                 direction and the round-trip time (half each way), e.g. 100mbit,20ms or 10mbit,50ms
  --keep         keep the working folder";

fn parse_args() -> Res<Args> {
    let exe = std::env::current_exe().map_err(err("current_exe"))?;
    let mut a = Args {
        scenarios: Vec::new(),
        dps: 4,
        scale: 1.0,
        json: None,
        dir: None,
        dpsync: exe.with_file_name("dpsync"),
        parallel_targets: None,
        rsync_args: "-a --delete --no-whole-file".split(' ').map(String::from).collect(),
        seed: 1,
        poll_ms: 25,
        keep: false,
        link: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--scenario" => match value("--scenario")?.as_str() {
                "mixed" => a.scenarios.push(Kind::Mixed),
                "tiny" => a.scenarios.push(Kind::Tiny),
                "big" => a.scenarios.push(Kind::Big),
                "all" => a.scenarios.extend([Kind::Mixed, Kind::Tiny, Kind::Big]),
                other => return Err(format!("unknown scenario {other:?}\n{USAGE}")),
            },
            "--dps" => a.dps = value("--dps")?.parse().map_err(err("--dps"))?,
            "--scale" => a.scale = value("--scale")?.parse().map_err(err("--scale"))?,
            "--json" => a.json = Some(value("--json")?.into()),
            "--dir" => a.dir = Some(value("--dir")?.into()),
            "--dpsync" => a.dpsync = value("--dpsync")?.into(),
            "--parallel-targets" => {
                a.parallel_targets = Some(value("--parallel-targets")?.parse().map_err(err("--parallel-targets"))?)
            }
            "--rsync-args" => a.rsync_args = value("--rsync-args")?.split_whitespace().map(String::from).collect(),
            "--seed" => a.seed = value("--seed")?.parse().map_err(err("--seed"))?,
            "--poll-ms" => a.poll_ms = value("--poll-ms")?.parse().map_err(err("--poll-ms"))?,
            "--keep" => a.keep = true,
            "--link" => a.link = Some(Link::parse(&value("--link")?)?),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if a.scenarios.is_empty() {
        a.scenarios = vec![Kind::Mixed, Kind::Tiny, Kind::Big];
    }
    let mut seen = BTreeSet::new();
    a.scenarios.retain(|k| seen.insert(k.name()));
    if !(a.scale > 0.0 && a.scale <= 1.0) {
        return Err(format!("--scale must be in (0, 1], got {}", a.scale));
    }
    if a.dps == 0 {
        return Err("--dps must be at least 1".into());
    }
    if !a.dpsync.is_file() {
        return Err(format!(
            "no dpsync binary at {}: build it first (`cargo build --release -p dpsync`) or pass --dpsync",
            a.dpsync.display()
        ));
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("compare: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------
// Trees

/// The source tree as the bench believes it to be (relative path → size).
#[derive(Debug)]
struct Tree {
    kind: Kind,
    root: PathBuf,
    files: BTreeMap<String, u64>,
    dirs: Vec<String>,
    seed: u64,
    /// Content generations written so far (each write gets fresh random bytes).
    generation: u64,
    /// Files of the log-normal distribution, for new files.
    size_pool: Vec<u64>,
}

impl Tree {
    fn bytes(&self) -> u64 {
        self.files.values().sum()
    }
    fn largest(&self) -> Option<(String, u64)> {
        self.files.iter().max_by_key(|(p, s)| (**s, std::cmp::Reverse((*p).clone()))).map(|(p, s)| (p.clone(), *s))
    }
}

fn content_rng(seed: u64, generation: u64, idx: u64) -> Rng {
    let mut r =
        Rng::new(seed ^ generation.wrapping_mul(0xA24B_AED4_963E_E407) ^ idx.wrapping_mul(0x9FB2_1C65_1E98_DF25));
    r.next_u64();
    r
}

fn generate(kind: Kind, root: &Path, scale: f64, seed: u64) -> Res<Tree> {
    let mut rng = Rng::new(seed ^ 0xC0FF_EE00 ^ kind as u64);
    let (sizes, per_dir): (Vec<u64>, usize) = match kind {
        Kind::Mixed => {
            let n = ((20_000.0 * scale).round() as usize).max(20);
            let total = (2.0 * GIB as f64 * scale) as u64;
            let max = ((200.0 * MIB as f64 * scale) as u64).max(MIB);
            (lognormal_sizes(n, total, KIB, max, &mut rng), 40)
        }
        Kind::Tiny => {
            let n = ((100_000.0 * scale).round() as usize).max(100);
            ((0..n).map(|_| rng.below(4 * KIB + 1)).collect(), 100)
        }
        Kind::Big => (vec![(2.0 * GIB as f64 * scale) as u64], 1),
    };
    let mut files = BTreeMap::new();
    let mut dirs = BTreeSet::new();
    let names: Vec<(String, u64)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            if kind == Kind::Big {
                return ("big.bin".to_string(), size);
            }
            let leaf = i / per_dir;
            let dir = format!("d{:03}/s{:02}", leaf / 10, leaf % 10);
            dirs.insert(dir.clone());
            (format!("{dir}/f{i:06}.bin"), size)
        })
        .collect();
    for d in &dirs {
        fs::create_dir_all(root.join(d)).map_err(err(root.join(d).display()))?;
    }
    fs::create_dir_all(root).map_err(err(root.display()))?;
    names.par_iter().enumerate().try_for_each(|(i, (rel, size))| -> Res<()> {
        let p = root.join(rel);
        let mut f = io::BufWriter::with_capacity(256 * 1024, File::create(&p).map_err(err(p.display()))?);
        content_rng(seed, 0, i as u64).write_to(&mut f, *size).map_err(err(p.display()))?;
        f.flush().map_err(err(p.display()))
    })?;
    for (rel, size) in names {
        files.insert(rel, size);
    }
    sync();
    Ok(Tree {
        kind,
        root: root.to_owned(),
        files,
        dirs: dirs.into_iter().collect(),
        seed,
        generation: 1,
        size_pool: sizes,
    })
}

/// What a change step did, for the report and for the checks.
#[derive(Debug, Default)]
struct Change {
    appended: Vec<String>,
    edited: Vec<String>,
    added: Vec<String>,
    deleted: Vec<String>,
    inserted: Vec<String>,
}

impl Change {
    fn touched(&self) -> Vec<String> {
        [&self.appended, &self.edited, &self.added, &self.inserted].into_iter().flatten().cloned().collect()
    }
    fn summary(&self) -> Value {
        json!({
            "appended": self.appended.len(),
            "edited_4k_in_middle": self.edited.len(),
            "added": self.added.len(),
            "deleted": self.deleted.len(),
            "inserted_100_bytes_at_start": self.inserted,
        })
    }
}

/// About 1 % of the files: a quarter appended to, a quarter edited in the middle (4 KiB,
/// in the largest files), a quarter new, a quarter deleted. The big tree gets one 4 KiB
/// edit in the middle of its file.
fn change_one_percent(tree: &mut Tree, rng: &mut Rng) -> Res<Change> {
    let mut ch = Change::default();
    let gen_ = tree.generation;
    tree.generation += 1;
    let paths: Vec<String> = tree.files.keys().cloned().collect();
    if tree.kind == Kind::Big {
        let (p, size) = tree.largest().ok_or("empty tree")?;
        edit_middle(tree, &p, size, 4 * KIB, gen_, 0)?;
        ch.edited.push(p);
        return Ok(ch);
    }
    let k = (paths.len() / 100).max(4);
    let q = k / 4;
    let mut used = BTreeSet::new();
    // Edits: the largest files (≥ 1 MiB where there are such), 4 KiB in the middle.
    let mut by_size: Vec<(u64, String)> = tree.files.iter().map(|(p, s)| (*s, p.clone())).collect();
    by_size.sort_unstable_by(|a, b| b.cmp(a));
    let big_enough = by_size.iter().filter(|(s, _)| *s >= MIB).count().max(q.min(by_size.len()));
    let mut candidates: Vec<String> = by_size[..big_enough].iter().map(|(_, p)| p.clone()).collect();
    let mut i = 0u64;
    while ch.edited.len() < q && !candidates.is_empty() {
        let p = candidates.swap_remove(rng.below(candidates.len() as u64) as usize);
        let size = tree.files[&p];
        if size == 0 || !used.insert(p.clone()) {
            continue;
        }
        edit_middle(tree, &p, size, (4 * KIB).min(size.div_ceil(2)), gen_, i)?;
        i += 1;
        ch.edited.push(p);
    }
    let mut pick = |rng: &mut Rng| -> String {
        loop {
            let p = &paths[rng.below(paths.len() as u64) as usize];
            if used.insert(p.clone()) {
                return p.clone();
            }
        }
    };
    let appends: Vec<String> = (0..q).map(|_| pick(rng)).collect();
    let deletes: Vec<String> = (0..q).map(|_| pick(rng)).collect();
    for p in appends {
        let extra = match tree.kind {
            Kind::Tiny => 1 + rng.below(512),
            _ => 1 + rng.below(64 * KIB),
        };
        let full = tree.root.join(&p);
        let mut f = OpenOptions::new().append(true).open(&full).map_err(err(full.display()))?;
        content_rng(tree.seed, gen_, 1_000_000 + i).write_to(&mut f, extra).map_err(err(full.display()))?;
        i += 1;
        *tree.files.get_mut(&p).expect("known") += extra;
        ch.appended.push(p);
    }
    for p in deletes {
        let full = tree.root.join(&p);
        fs::remove_file(&full).map_err(err(full.display()))?;
        tree.files.remove(&p);
        ch.deleted.push(p);
    }
    for n in 0..q {
        let dir = &tree.dirs[rng.below(tree.dirs.len() as u64) as usize];
        let size = tree.size_pool[rng.below(tree.size_pool.len() as u64) as usize];
        let rel = format!("{dir}/new-{gen_}-{n:05}.bin");
        let full = tree.root.join(&rel);
        let mut f = File::create(&full).map_err(err(full.display()))?;
        content_rng(tree.seed, gen_, 2_000_000 + n as u64).write_to(&mut f, size).map_err(err(full.display()))?;
        tree.files.insert(rel.clone(), size);
        ch.added.push(rel);
    }
    sync();
    Ok(ch)
}

fn edit_middle(tree: &Tree, rel: &str, size: u64, len: u64, gen_: u64, i: u64) -> Res<()> {
    let full = tree.root.join(rel);
    let f = OpenOptions::new().write(true).open(&full).map_err(err(full.display()))?;
    let mut buf = vec![0u8; len as usize];
    content_rng(tree.seed, gen_, 3_000_000 + i).fill(&mut buf);
    f.write_all_at(&buf, (size - len) / 2).map_err(err(full.display()))
}

/// 100 random bytes inserted at the start of the largest file (rewritten aside and renamed).
fn insert_at_start(tree: &mut Tree) -> Res<Change> {
    let gen_ = tree.generation;
    tree.generation += 1;
    let (rel, size) = tree.largest().ok_or("empty tree")?;
    let full = tree.root.join(&rel);
    let tmp = full.with_extension("insert-tmp");
    {
        let mut out = File::create(&tmp).map_err(err(tmp.display()))?;
        content_rng(tree.seed, gen_, 4_000_000).write_to(&mut out, 100).map_err(err(tmp.display()))?;
        let mut src = File::open(&full).map_err(err(full.display()))?;
        io::copy(&mut src, &mut out).map_err(err(tmp.display()))?;
    }
    fs::rename(&tmp, &full).map_err(err(full.display()))?;
    tree.files.insert(rel.clone(), size + 100);
    sync();
    Ok(Change { inserted: vec![rel], ..Change::default() })
}

fn sync() {
    let _ = Command::new("sync").status();
}

// ---------------------------------------------------------------------------------------
// Checks

/// Every regular file under `root`, relative path → size (symlinks to folders followed
/// only for `root` itself, which is `current` on a DP).
fn list_files(root: &Path) -> Res<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(fs::canonicalize(root).map_err(err(root.display()))?, String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        for e in fs::read_dir(&dir).map_err(err(dir.display()))? {
            let e = e.map_err(err(dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            let ft = e.file_type().map_err(err(e.path().display()))?;
            if ft.is_dir() {
                stack.push((e.path(), rel));
            } else if ft.is_file() {
                out.insert(rel, e.metadata().map_err(err(e.path().display()))?.len());
            } else {
                out.insert(rel, u64::MAX);
            }
        }
    }
    Ok(out)
}

/// Equal bytes: whole files up to 256 MiB; bigger ones at 64 spread 1 MiB windows plus the
/// first and last MiB.
fn same_bytes(a: &Path, b: &Path, size: u64) -> Res<bool> {
    let (fa, fb) = (File::open(a).map_err(err(a.display()))?, File::open(b).map_err(err(b.display()))?);
    let win = MIB;
    let windows: Vec<(u64, u64)> = if size <= 256 * MIB {
        (0..size.div_ceil(win)).map(|i| (i * win, win.min(size - i * win))).collect()
    } else {
        let mut w: Vec<(u64, u64)> = (0..64).map(|i| (i * (size - win) / 63, win)).collect();
        w.push((size - win, win));
        w
    };
    let (mut ba, mut bb) = (vec![0u8; win as usize], vec![0u8; win as usize]);
    for (off, len) in windows {
        let n = len as usize;
        fa.read_exact_at(&mut ba[..n], off).map_err(err(a.display()))?;
        fb.read_exact_at(&mut bb[..n], off).map_err(err(b.display()))?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Checks one destination against the source: the same file list with the same sizes,
/// and the same bytes for every changed file and `sample` random others (all of them when
/// the tree has at most 2,000 files). Returns the number of files whose bytes were compared.
fn check_dest(tree: &Tree, dest: &Path, change: &Change, rng: &mut Rng, sample: usize) -> Res<usize> {
    let got = list_files(dest)?;
    if got != tree.files {
        let missing: Vec<&String> = tree.files.keys().filter(|k| !got.contains_key(*k)).take(3).collect();
        let extra: Vec<&String> = got.keys().filter(|k| !tree.files.contains_key(*k)).take(3).collect();
        let differ: Vec<&String> =
            tree.files.iter().filter(|(k, v)| got.get(*k).is_some_and(|g| g != *v)).map(|(k, _)| k).take(3).collect();
        return Err(format!(
            "{}: {} files, expected {}; missing {missing:?}, extra {extra:?}, size differs {differ:?}",
            dest.display(),
            got.len(),
            tree.files.len()
        ));
    }
    let mut chosen: BTreeSet<String> = change.touched().into_iter().collect();
    let keys: Vec<&String> = tree.files.keys().collect();
    if keys.len() <= 2000 {
        chosen.extend(keys.iter().map(|k| (*k).clone()));
    } else {
        for _ in 0..sample {
            chosen.insert(keys[rng.below(keys.len() as u64) as usize].clone());
        }
    }
    for rel in &chosen {
        if !same_bytes(&tree.root.join(rel), &dest.join(rel), tree.files[rel])? {
            return Err(format!("{}: {rel} differs from the source", dest.display()));
        }
    }
    Ok(chosen.len())
}

// ---------------------------------------------------------------------------------------
// /proc

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// (ppid, utime + stime, cutime + cstime) in clock ticks.
fn proc_stat(pid: u32) -> Option<(u32, u64, u64)> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    // Fields from 3 (state): ppid is field 4, utime 14, stime 15, cutime 16, cstime 17.
    Some((n(1)? as u32, n(11)? + n(12)?, n(13)? + n(14)?))
}

fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn reset_hwm(pid: u32) {
    let _ = fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// A long-lived process watched over one step.
#[derive(Debug)]
struct Watch {
    role: &'static str,
    name: String,
    pid: u32,
    ticks0: u64,
    children_ticks0: u64,
}

impl Watch {
    fn start(role: &'static str, name: &str, pid: u32) -> Self {
        reset_hwm(pid);
        let (_, t, c) = proc_stat(pid).unwrap_or_default();
        Watch { role, name: name.into(), pid, ticks0: t, children_ticks0: c }
    }
    /// (cpu seconds of itself, of its reaped children, peak RSS KiB).
    fn finish(&self) -> ProcUse {
        let (_, t, c) = proc_stat(self.pid).unwrap_or_default();
        ProcUse {
            role: self.role,
            name: self.name.clone(),
            pid: self.pid,
            cpu_s: (t.saturating_sub(self.ticks0)) as f64 / clk_tck(),
            children_cpu_s: (c.saturating_sub(self.children_ticks0)) as f64 / clk_tck(),
            peak_rss_kib: vm_hwm_kib(self.pid).unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone)]
struct ProcUse {
    role: &'static str,
    name: String,
    pid: u32,
    cpu_s: f64,
    /// CPU of reaped children (the rsync daemon's connections).
    children_cpu_s: f64,
    peak_rss_kib: u64,
}

impl ProcUse {
    fn to_json(&self) -> Value {
        json!({"role": self.role, "name": self.name, "pid": self.pid, "cpu_s": self.cpu_s,
               "children_cpu_s": self.children_cpu_s, "peak_rss_kib": self.peak_rss_kib})
    }
}

/// Samples the peak RSS of every descendant of `root` every 20 ms (the rsync daemon's
/// per-connection processes live only for one transfer).
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<BTreeMap<u32, (String, u64)>>,
}

impl Sampler {
    fn start(root: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let handle = thread::spawn(move || {
            let mut seen: BTreeMap<u32, (String, u64)> = BTreeMap::new();
            loop {
                let done = s2.load(Ordering::SeqCst);
                let mut parent = BTreeMap::new();
                if let Ok(rd) = fs::read_dir("/proc") {
                    for e in rd.flatten() {
                        if let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                            && let Some((ppid, _, _)) = proc_stat(pid)
                        {
                            parent.insert(pid, ppid);
                        }
                    }
                }
                for &pid in parent.keys() {
                    let mut p = pid;
                    let mut depth = 0;
                    while p != root && p > 1 && depth < 16 {
                        p = parent.get(&p).copied().unwrap_or(0);
                        depth += 1;
                    }
                    if p == root
                        && pid != root
                        && let Some(h) = vm_hwm_kib(pid)
                    {
                        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                        let e = seen.entry(pid).or_insert((comm.trim().to_owned(), 0));
                        e.1 = e.1.max(h);
                    }
                }
                if done {
                    return seen;
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        Sampler { stop, handle }
    }
    fn finish(self) -> BTreeMap<u32, (String, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().unwrap_or_default()
    }
}

/// Waits for `child` with `wait4`: (success, wall end, CPU seconds, max RSS KiB).
fn wait_rusage(child: Child) -> Res<(bool, Instant, f64, u64)> {
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: valid pointers to locals; `pid` is our own unreaped child (std's `Child`
        // is never waited on afterwards: it is forgotten below).
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r == pid {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(format!("wait4({pid}): {e}"));
        }
    }
    let end = Instant::now();
    std::mem::forget(child);
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    Ok((ok, end, tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_maxrss as u64))
}

// ---------------------------------------------------------------------------------------
// The counting proxy

/// Forwards every connection to one upstream address and counts the bytes in both
/// directions. std threads, `splice` through a pipe (no copy through user space).
struct Proxy {
    addr: SocketAddr,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl Proxy {
    /// A proxy to `upstream`, shaped like `link` when given.
    fn start(upstream: SocketAddr, link: Option<Link>) -> Res<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").map_err(err("proxy bind"))?;
        let addr = listener.local_addr().map_err(err("proxy addr"))?;
        let (up, down, stop) =
            (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (u2, d2, s2) = (up.clone(), down.clone(), stop.clone());
        // One bucket per direction for all connections of this destination: the link.
        let (up_bucket, down_bucket) = (Arc::new(Mutex::new(None)), Arc::new(Mutex::new(None)));
        let accept = thread::spawn(move || {
            for c in listener.incoming() {
                if s2.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = c else { continue };
                let Ok(server) = TcpStream::connect(upstream) else {
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (Ok(c2), Ok(s3)) = (client.try_clone(), server.try_clone()) else { continue };
                let (u3, d3) = (u2.clone(), d2.clone());
                match link {
                    Some(l) => {
                        let (up_bucket, down_bucket) = (up_bucket.clone(), down_bucket.clone());
                        thread::spawn(move || shaped_pump(client, server, &u3, l, &up_bucket));
                        thread::spawn(move || shaped_pump(s3, c2, &d3, l, &down_bucket));
                    }
                    None => {
                        thread::spawn(move || pump(client, server, &u3));
                        thread::spawn(move || pump(s3, c2, &d3));
                    }
                }
            }
        });
        Ok(Proxy { addr, up, down, stop, accept: Some(accept) })
    }
    fn bytes(&self) -> (u64, u64) {
        (self.up.load(Ordering::SeqCst), self.down.load(Ordering::SeqCst))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

/// When the bytes sent so far on one direction of a link may leave (virtual time).
type Bucket = Arc<Mutex<Option<Instant>>>;

/// Like [`pump`] over a shaped link: a reader thread stamps what it reads, this thread
/// writes each piece half a round trip later, no faster than the link's rate (shared by
/// every connection in this direction through `bucket`).
fn shaped_pump(src: TcpStream, dst: TcpStream, count: &AtomicU64, link: Link, bucket: &Bucket) {
    let (tx, rx) = std::sync::mpsc::sync_channel::<(Instant, Vec<u8>)>(256);
    let mut reader = match src.try_clone() {
        Ok(r) => r,
        Err(_) => return,
    };
    let one_way = link.rtt / 2;
    let feeder = thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((Instant::now() + one_way, buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut out = &dst;
    for (due, piece) in rx {
        let leave = {
            let mut next = bucket.lock().unwrap();
            let start = next.map_or(due, |t| t.max(due));
            *next = Some(start + Duration::from_secs_f64(piece.len() as f64 / link.rate as f64));
            start
        };
        if let Some(wait) = leave.checked_duration_since(Instant::now()) {
            thread::sleep(wait);
        }
        if out.write_all(&piece).is_err() {
            break;
        }
        count.fetch_add(piece.len() as u64, Ordering::Relaxed);
    }
    let _ = feeder.join();
    let _ = dst.shutdown(Shutdown::Write);
    let _ = src.shutdown(Shutdown::Read);
}

/// Copies `src` to `dst` until EOF, counting; then half-closes `dst`.
fn pump(src: TcpStream, dst: TcpStream, count: &AtomicU64) {
    if splice_pump(&src, &dst, count).is_err() {
        let _ = copy_pump(&src, &dst, count);
    }
    let _ = dst.shutdown(Shutdown::Write);
    let _ = src.shutdown(Shutdown::Read);
}

fn copy_pump(mut src: &TcpStream, mut dst: &TcpStream, count: &AtomicU64) -> io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        dst.write_all(&buf[..n])?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

struct Pipe(RawFd, RawFd);

impl Drop for Pipe {
    fn drop(&mut self) {
        // SAFETY: both fds were returned by pipe2 and are owned by this value only.
        unsafe {
            libc::close(self.0);
            libc::close(self.1);
        }
    }
}

/// `Err` before any byte moved means "splice is not usable here": fall back to copying.
fn splice_pump(src: &TcpStream, dst: &TcpStream, count: &AtomicU64) -> io::Result<()> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` is a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let pipe = Pipe(fds[0], fds[1]);
    // SAFETY: fcntl on a pipe fd we own; failure only leaves the default size.
    unsafe { libc::fcntl(pipe.1, libc::F_SETPIPE_SZ, 1 << 20) };
    // No SPLICE_F_MORE: on a socket it means MSG_MORE, which holds back small writes (latency).
    let flags = libc::SPLICE_F_MOVE;
    let mut moved_any = false;
    loop {
        // SAFETY: plain fds, null offsets (sockets and pipes have no offset).
        let n = unsafe {
            libc::splice(src.as_raw_fd(), std::ptr::null_mut(), pipe.1, std::ptr::null_mut(), 1 << 20, flags)
        };
        if n == 0 {
            return Ok(());
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return if moved_any { Ok(()) } else { Err(e) };
        }
        moved_any = true;
        let mut left = n as usize;
        while left > 0 {
            // SAFETY: as above.
            let m = unsafe {
                libc::splice(pipe.0, std::ptr::null_mut(), dst.as_raw_fd(), std::ptr::null_mut(), left, flags)
            };
            if m < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Ok(());
            }
            if m == 0 {
                return Ok(());
            }
            left -= m as usize;
            count.fetch_add(m as u64, Ordering::Relaxed);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Daemons

/// One environment: a dpsync server and agents, an rsync daemon, their proxies.
struct Env {
    dpsync: PathBuf,
    server_dir: PathBuf,
    sock: PathBuf,
    package: String,
    server: Daemon,
    agents: Vec<(Daemon, PathBuf, Proxy)>,
    rsyncd: Daemon,
    rsync_port: u16,
    rsync_dests: Vec<PathBuf>,
    rsync_proxies: Vec<Proxy>,
    logs: PathBuf,
}

fn free_port() -> Res<u16> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(err("bind"))?;
    Ok(l.local_addr().map_err(err("addr"))?.port())
}

impl Env {
    fn start(args: &Args, base: &Path, src: &Path) -> Res<Self> {
        let logs = base.join("logs");
        fs::create_dir_all(&logs).map_err(err(logs.display()))?;
        let server_dir = base.join("server");
        let sock = server_dir.join("admin.sock");
        let mut sargs = vec!["server", "--data-dir", server_dir.to_str().ok_or("non-UTF-8 path")?];
        let pt = args.parallel_targets.map(|n| n.to_string());
        if let Some(pt) = &pt {
            sargs.extend(["--parallel-targets", pt.as_str()]);
        }
        // The daemons log warnings only, unless RUST_LOG says otherwise.
        let log_level = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        let env = [("RUST_LOG", log_level.as_str())];
        let mut server = Daemon::spawn("dpsync server", &args.dpsync, &sargs, &logs.join("server.log"), &env)?;
        wait_for("the dpsync server", Duration::from_secs(30), || {
            server.alive()?;
            Ok(sock.exists() && admin_get(&sock, "/v1/site").is_ok())
        })?;
        let mut agents = Vec::new();
        for i in 1..=args.dps {
            let dir = base.join(format!("agent{i}"));
            let mut a = Daemon::spawn_agent(
                &format!("agent dp{i}"),
                &args.dpsync,
                &dir,
                &logs.join(format!("agent{i}.log")),
                &env,
            )?;
            let addr_file = dir.join("listen.addr");
            wait_for("an agent's listen.addr", Duration::from_secs(30), || {
                a.alive()?;
                Ok(fs::read_to_string(&addr_file).is_ok_and(|s| s.trim().parse::<SocketAddr>().is_ok()))
            })?;
            let addr: SocketAddr = fs::read_to_string(&addr_file)
                .map_err(err("listen.addr"))?
                .trim()
                .parse()
                .map_err(err("listen.addr"))?;
            let proxy = Proxy::start(addr, args.link)?;
            agents.push((a, dir, proxy));
        }
        // The rsync daemon: one module per DP.
        let rsync_port = free_port()?;
        let mut conf = format!(
            "use chroot = no\nreverse lookup = no\nnumeric ids = yes\nuid = {uid}\ngid = {gid}\nlog file = {log}\ntransfer logging = no\nmax connections = 0\n",
            // SAFETY: getuid/getgid cannot fail.
            uid = unsafe { libc::getuid() },
            gid = unsafe { libc::getgid() },
            log = logs.join("rsyncd.log").display()
        );
        let mut rsync_dests = Vec::new();
        for i in 1..=args.dps {
            let d = base.join("rsync").join(format!("dp{i}"));
            fs::create_dir_all(&d).map_err(err(d.display()))?;
            conf.push_str(&format!("[dp{i}]\n    path = {}\n    read only = no\n", d.display()));
            rsync_dests.push(d);
        }
        let conf_path = base.join("rsyncd.conf");
        fs::write(&conf_path, conf).map_err(err(conf_path.display()))?;
        let port = rsync_port.to_string();
        let conf_arg = format!("--config={}", conf_path.display());
        let mut rsyncd = Daemon::spawn(
            "rsync daemon",
            Path::new("rsync"),
            &["--daemon", "--no-detach", &conf_arg, "--address=127.0.0.1", "--port", &port],
            &logs.join("rsyncd.out"),
            &[],
        )?;
        let rsync_addr: SocketAddr = format!("127.0.0.1:{rsync_port}").parse().map_err(err("addr"))?;
        wait_for("the rsync daemon", Duration::from_secs(20), || {
            rsyncd.alive()?;
            Ok(TcpStream::connect(rsync_addr).is_ok())
        })?;
        let rsync_proxies = (0..args.dps).map(|_| Proxy::start(rsync_addr, args.link)).collect::<Res<Vec<_>>>()?;

        let mut env = Env {
            dpsync: args.dpsync.clone(),
            server_dir,
            sock,
            package: String::new(),
            server,
            agents,
            rsyncd,
            rsync_port,
            rsync_dests,
            rsync_proxies,
            logs,
        };
        // The package and its DPs (set-up, not timed).
        let p = env.cli(&["package", "add", "bench", src.to_str().ok_or("non-UTF-8 path")?])?;
        env.package = p["id"].as_str().ok_or("package add: no id")?.to_owned();
        let mut names = Vec::new();
        for (i, (_, _, proxy)) in env.agents.iter().enumerate() {
            let name = format!("dp{}", i + 1);
            env.cli(&["dp", "add", &name, &format!("http://{}", proxy.addr)])?;
            names.push(name);
        }
        let mut d = vec!["distribute".to_string(), env.package.clone()];
        for n in &names {
            d.extend(["--dp".to_string(), n.clone()]);
        }
        env.cli(&d.iter().map(String::as_str).collect::<Vec<_>>())?;
        Ok(env)
    }

    fn cli(&self, args: &[&str]) -> Res<Value> {
        let out = Command::new(&self.dpsync)
            .arg("--data-dir")
            .arg(&self.server_dir)
            .arg("--json")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(err("dpsync CLI"))?;
        if !out.status.success() {
            return Err(format!(
                "dpsync {}: {} {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                String::from_utf8_lossy(&out.stdout).trim()
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(err(format!("dpsync {} output", args.join(" "))))
    }

    fn status(&self) -> Res<Value> {
        admin_get(&self.sock, &format!("/v1/packages/{}/status", self.package))
    }

    fn live_tree(&self, i: usize) -> PathBuf {
        self.agents[i].1.join("packages").join(&self.package).join("current")
    }

    fn alive(&mut self) -> Res<()> {
        self.server.alive()?;
        for (a, _, _) in &mut self.agents {
            a.alive()?;
        }
        self.rsyncd.alive()
    }
}

// ---------------------------------------------------------------------------------------
// One step, each tool

#[derive(Debug, Clone, Default)]
struct Run {
    wall_s: f64,
    /// dpsync: when `refresh --wait` exited (it polls every 300 ms).
    cli_wall_s: Option<f64>,
    bytes_up: u64,
    bytes_down: u64,
    /// dpsync: sum of `bytes_sent_last` over the targets, as dpsync counts it.
    reported_bytes: Option<u64>,
    procs: Vec<ProcUse>,
    extra: Value,
}

impl Run {
    fn bytes(&self) -> u64 {
        self.bytes_up + self.bytes_down
    }
    fn cpu_s(&self) -> f64 {
        self.procs.iter().map(|p| p.cpu_s + p.children_cpu_s).sum()
    }
    fn peak(&self, role: &str) -> u64 {
        self.procs.iter().filter(|p| p.role == role).map(|p| p.peak_rss_kib).max().unwrap_or(0)
    }
    fn to_json(&self) -> Value {
        json!({
            "wall_s": self.wall_s,
            "cli_wall_s": self.cli_wall_s,
            "bytes_on_wire": self.bytes(),
            "bytes_to_destinations": self.bytes_up,
            "bytes_from_destinations": self.bytes_down,
            "bytes_reported_by_dpsync": self.reported_bytes,
            "cpu_s": self.cpu_s(),
            "processes": self.procs.iter().map(ProcUse::to_json).collect::<Vec<_>>(),
            "extra": self.extra,
        })
    }
}

fn proxy_bytes(ps: &[&Proxy]) -> (u64, u64) {
    ps.iter().map(|p| p.bytes()).fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn run_dpsync(env: &mut Env, poll: Duration) -> Res<Run> {
    env.alive()?;
    let before = env.status()?;
    let expected = before["source_version"].as_i64().unwrap_or(0) + 1;
    let mut watches = vec![Watch::start("dpsync server", "server", env.server.pid())];
    for (i, (a, _, _)) in env.agents.iter().enumerate() {
        watches.push(Watch::start("dpsync agent", &format!("dp{}", i + 1), a.pid()));
    }
    let proxies: Vec<&Proxy> = env.agents.iter().map(|a| &a.2).collect();
    let (u0, d0) = proxy_bytes(&proxies);
    let t0 = Instant::now();
    let mut child = Command::new(&env.dpsync)
        .arg("--data-dir")
        .arg(&env.server_dir)
        .args(["--json", "refresh", &env.package, "--wait"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(err("dpsync refresh"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let cli = thread::spawn(move || -> Res<(bool, Instant, f64, u64, String, String)> {
        let err_t = thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        let (ok, end, cpu, rss) = wait_rusage(child)?;
        Ok((ok, end, cpu, rss, out, err_t.join().unwrap_or_default()))
    });
    // Poll until every target holds the new version.
    let settled_at;
    let deadline = t0 + Duration::from_secs(3600);
    loop {
        let s = env.status()?;
        let targets = s["targets"].as_array().cloned().unwrap_or_default();
        if let Some(f) = targets.iter().find(|t| t["state"] == "failed") {
            return Err(format!("dpsync target failed: {f}"));
        }
        let done = !targets.is_empty()
            && targets
                .iter()
                .all(|t| t["state"] == "installed" && t["installed_version"].as_i64().unwrap_or(0) >= expected);
        if done {
            settled_at = Instant::now();
            break;
        }
        if Instant::now() > deadline {
            return Err("dpsync did not finish within an hour".into());
        }
        if cli.is_finished() {
            // The CLI gave up (or finished before we saw it): one more look after it.
            let s = env.status()?;
            let ok = s["targets"].as_array().is_some_and(|ts| {
                ts.iter().all(|t| t["state"] == "installed" && t["installed_version"].as_i64().unwrap_or(0) >= expected)
            });
            if ok {
                settled_at = Instant::now();
                break;
            }
        }
        thread::sleep(poll);
    }
    let (ok, cli_end, cli_cpu, cli_rss, out, errs) = cli.join().map_err(|_| "CLI thread panicked")??;
    if !ok {
        return Err(format!("dpsync refresh --wait failed: {} {}", errs.trim(), out.trim()));
    }
    let (u1, d1) = proxy_bytes(&proxies);
    let mut procs: Vec<ProcUse> = watches.iter().map(Watch::finish).collect();
    procs.push(ProcUse {
        role: "dpsync CLI",
        name: "refresh --wait".into(),
        pid: 0,
        cpu_s: cli_cpu,
        children_cpu_s: 0.0,
        peak_rss_kib: cli_rss,
    });
    let after = env.status()?;
    let reported: u64 = after["targets"]
        .as_array()
        .map(|ts| ts.iter().map(|t| t["bytes_sent_last"].as_i64().unwrap_or(0).max(0) as u64).sum())
        .unwrap_or(0);
    let report: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    let extra = json!({
        "source_version": expected,
        "refresh_duration_ms": report["duration_ms"],
        "files_added": report["files_added"],
        "files_changed": report["files_changed"],
        "files_removed": report["files_removed"],
        "bytes_hashed": report["bytes_hashed"],
        "targets": after["targets"].as_array().map(|ts| ts.iter().map(|t| json!({
            "name": t["name"], "state": t["state"], "installed_version": t["installed_version"],
            "bytes_sent_last": t["bytes_sent_last"]})).collect::<Vec<_>>()),
    });
    Ok(Run {
        wall_s: (settled_at - t0).as_secs_f64(),
        cli_wall_s: Some((cli_end - t0).as_secs_f64()),
        bytes_up: u1 - u0,
        bytes_down: d1 - d0,
        reported_bytes: Some(reported),
        procs,
        extra,
    })
}

fn run_rsync(env: &mut Env, args: &Args, src: &Path) -> Res<Run> {
    env.alive()?;
    let daemon = Watch::start("rsync daemon", "rsync --daemon", env.rsyncd.pid());
    let sampler = Sampler::start(env.rsyncd.pid());
    let proxies: Vec<&Proxy> = env.rsync_proxies.iter().collect();
    let (u0, d0) = proxy_bytes(&proxies);
    let src_arg = format!("{}/", src.display());
    let t0 = Instant::now();
    let mut clients = Vec::new();
    for (i, p) in env.rsync_proxies.iter().enumerate() {
        let log = File::create(env.logs.join(format!("rsync-client{}.log", i + 1))).map_err(err("log"))?;
        let log2 = log.try_clone().map_err(err("log"))?;
        let child = Command::new("rsync")
            .args(&args.rsync_args)
            .arg(&src_arg)
            .arg(format!("rsync://127.0.0.1:{}/dp{}/", p.addr.port(), i + 1))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(err("rsync"))?;
        clients.push(thread::spawn(move || wait_rusage(child)));
    }
    let mut procs = Vec::new();
    let mut last_end = t0;
    let mut failed = Vec::new();
    for (i, c) in clients.into_iter().enumerate() {
        let (ok, end, cpu, rss) = c.join().map_err(|_| "rsync wait thread panicked")??;
        if !ok {
            failed.push(format!("dp{}", i + 1));
        }
        last_end = last_end.max(end);
        procs.push(ProcUse {
            role: "rsync client",
            name: format!("client dp{}", i + 1),
            pid: 0,
            cpu_s: cpu,
            children_cpu_s: 0.0,
            peak_rss_kib: rss,
        });
    }
    let wall = (last_end - t0).as_secs_f64();
    // The daemon reaps its connection processes right after the clients end.
    thread::sleep(Duration::from_millis(200));
    let children = sampler.finish();
    let (u1, d1) = proxy_bytes(&proxies);
    procs.push(daemon.finish());
    for (pid, (comm, kib)) in &children {
        procs.push(ProcUse {
            role: "rsync daemon child",
            name: comm.clone(),
            pid: *pid,
            cpu_s: 0.0, // counted in the daemon's children_cpu_s
            children_cpu_s: 0.0,
            peak_rss_kib: *kib,
        });
    }
    if !failed.is_empty() {
        return Err(format!("rsync failed for {} (logs in {})", failed.join(", "), env.logs.display()));
    }
    Ok(Run {
        wall_s: wall,
        cli_wall_s: None,
        bytes_up: u1 - u0,
        bytes_down: d1 - d0,
        reported_bytes: None,
        procs,
        extra: json!({"rsync_args": args.rsync_args, "port": env.rsync_port}),
    })
}

// ---------------------------------------------------------------------------------------
// The scenarios

#[derive(Debug)]
struct StepResult {
    scenario: Kind,
    step: &'static str,
    change: Value,
    dpsync: Run,
    rsync: Run,
    checked_files: usize,
}

fn run_scenario(args: &Args, kind: Kind, base: &Path, rng: &mut Rng) -> Res<(Value, Vec<StepResult>)> {
    let dir = base.join(kind.name());
    let src = dir.join("src");
    eprintln!("[{}] generating the tree (scale {}) …", kind.name(), args.scale);
    let t = Instant::now();
    let mut tree = generate(kind, &src, args.scale, args.seed)?;
    let median = {
        let mut s: Vec<u64> = tree.files.values().copied().collect();
        s.sort_unstable();
        s[s.len() / 2]
    };
    let tree_info = json!({
        "files": tree.files.len(),
        "bytes": tree.bytes(),
        "folders": tree.dirs.len(),
        "largest": tree.largest().map(|l| l.1),
        "median": median,
    });
    eprintln!(
        "[{}] {} files, {:.1} MiB, written in {:.1} s",
        kind.name(),
        tree.files.len(),
        tree.bytes() as f64 / MIB as f64,
        t.elapsed().as_secs_f64()
    );
    let mut env = Env::start(args, &dir, &src)?;
    eprintln!(
        "[{}] dpsync server, {} agents and the rsync daemon are up; package {}",
        kind.name(),
        args.dps,
        env.package
    );
    let steps: &[&'static str] = match kind {
        Kind::Mixed => &["initial", "changed_1pct", "no_change", "insert_100b_start"],
        Kind::Tiny => &["initial", "changed_1pct", "no_change"],
        Kind::Big => &["initial", "changed_1pct", "no_change", "insert_100b_start"],
    };
    let mut results = Vec::new();
    for &step in steps {
        let change = match step {
            "changed_1pct" => change_one_percent(&mut tree, rng)?,
            "insert_100b_start" => insert_at_start(&mut tree)?,
            _ => Change::default(),
        };
        sync();
        // A refresh that starts within 50 ms of a write reads that file again next time
        // (the scan cache's racy window); edits are rarely that fresh in real use.
        thread::sleep(Duration::from_millis(200));
        eprintln!("[{}] {step}: dpsync …", kind.name());
        let d = run_dpsync(&mut env, Duration::from_millis(args.poll_ms))?;
        let mut checked = 0;
        for i in 0..args.dps {
            checked += check_dest(&tree, &env.live_tree(i), &change, rng, 20)?;
        }
        sync();
        eprintln!(
            "[{}] {step}: dpsync {:.2} s, {:.1} MiB on the wire; rsync …",
            kind.name(),
            d.wall_s,
            d.bytes() as f64 / MIB as f64
        );
        let r = run_rsync(&mut env, args, &src)?;
        for dest in &env.rsync_dests {
            check_dest(&tree, dest, &change, rng, 20)?;
        }
        sync();
        eprintln!(
            "[{}] {step}: rsync {:.2} s, {:.1} MiB on the wire",
            kind.name(),
            r.wall_s,
            r.bytes() as f64 / MIB as f64
        );
        results.push(StepResult {
            scenario: kind,
            step,
            change: change.summary(),
            dpsync: d,
            rsync: r,
            checked_files: checked,
        });
    }
    drop(env);
    Ok((tree_info, results))
}

/// The goals, as ratios dpsync / rsync: (wall, bytes). On loopback: the initial copy no
/// slower than rsync, 1 % changed in half its time, no change in a quarter, 100 bytes
/// inserted at the start of the big file in 0.8 of it. Behind a branch link (`wan`):
/// every step no slower and no more bytes, no change in a quarter of the time, an
/// insertion in 0.8 of it.
fn goal(kind: Kind, step: &str, wan: bool) -> (Option<f64>, Option<f64>) {
    if wan {
        return match step {
            "no_change" => (Some(0.25), Some(1.0)),
            "insert_100b_start" => (Some(0.8), Some(1.0)),
            _ => (Some(1.0), Some(1.0)),
        };
    }
    match (kind, step) {
        (Kind::Mixed, "initial") => (Some(1.0), Some(1.0)),
        (Kind::Mixed, "changed_1pct") => (Some(0.5), Some(1.0)),
        (Kind::Mixed | Kind::Tiny, "no_change") => (Some(0.25), Some(0.1)),
        (Kind::Big, "insert_100b_start") => (Some(0.8), Some(0.3)),
        _ => (None, None),
    }
}

fn human_bytes(b: u64) -> String {
    if b >= GIB {
        format!("{:.2} GiB", b as f64 / GIB as f64)
    } else if b >= MIB {
        format!("{:.1} MiB", b as f64 / MIB as f64)
    } else if b >= KIB {
        format!("{:.1} KiB", b as f64 / KIB as f64)
    } else {
        format!("{b} B")
    }
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { f64::INFINITY }
}

fn verdict(r: f64, g: Option<f64>) -> String {
    match g {
        Some(g) if r <= g => format!("{r:.2} (≤ {g}: met)"),
        Some(g) => format!("**{r:.2}** (≤ {g}: missed)"),
        None => format!("{r:.2}"),
    }
}

fn print_table(results: &[StepResult], wan: bool) {
    println!();
    println!(
        "| scenario | step | wall dpsync | wall rsync | wall ratio | wire dpsync | wire rsync | wire ratio | CPU dpsync | CPU rsync | CPU ratio |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in results {
        let (gw, gb) = goal(r.scenario, r.step, wan);
        println!(
            "| {} | {} | {:.2} s | {:.2} s | {} | {} | {} | {} | {:.1} s | {:.1} s | {:.2} |",
            r.scenario.name(),
            r.step,
            r.dpsync.wall_s,
            r.rsync.wall_s,
            verdict(ratio(r.dpsync.wall_s, r.rsync.wall_s), gw),
            human_bytes(r.dpsync.bytes()),
            human_bytes(r.rsync.bytes()),
            verdict(ratio(r.dpsync.bytes() as f64, r.rsync.bytes() as f64), gb),
            r.dpsync.cpu_s(),
            r.rsync.cpu_s(),
            ratio(r.dpsync.cpu_s(), r.rsync.cpu_s()),
        );
    }
    println!();
    println!(
        "| scenario | step | `refresh --wait` exit | dpsync's own count | peak RSS server | peak RSS agent (max) | peak RSS rsync client (max) | peak RSS rsync daemon child (max) |"
    );
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in results {
        let mib = |k: u64| format!("{:.1} MiB", k as f64 / 1024.0);
        let server = r.dpsync.peak("dpsync server");
        let agent = r.dpsync.peak("dpsync agent");
        println!(
            "| {} | {} | {:.2} s | {} | {}{} | {}{} | {} | {} |",
            r.scenario.name(),
            r.step,
            r.dpsync.cli_wall_s.unwrap_or(0.0),
            human_bytes(r.dpsync.reported_bytes.unwrap_or(0)),
            mib(server),
            if server > 128 * 1024 { " (> 128: missed)" } else { "" },
            mib(agent),
            if agent > 64 * 1024 { " (> 64: missed)" } else { "" },
            mib(r.rsync.peak("rsync client")),
            mib(r.rsync.peak("rsync daemon child")),
        );
    }
}

fn run() -> Res<()> {
    let args = parse_args()?;
    let base =
        args.dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("dpsync-compare-{}", std::process::id())));
    if base.exists() && fs::read_dir(&base).map_err(err(base.display()))?.next().is_some() {
        return Err(format!("{} exists and is not empty; remove it or pass another --dir", base.display()));
    }
    fs::create_dir_all(&base).map_err(err(base.display()))?;
    let rsync_version = Command::new("rsync")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_owned))
        .ok_or("rsync is not on PATH")?;
    let dpsync_version = Command::new(&args.dpsync)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    eprintln!(
        "{dpsync_version} against {rsync_version}; {} DPs; scale {}; link {}; working folder {}",
        args.dps,
        args.scale,
        args.link.map_or_else(|| "loopback, unshaped".to_owned(), |l| l.to_string()),
        base.display()
    );
    let started = Instant::now();
    let mut rng = Rng::new(args.seed ^ 0xBE4C_0000);
    let mut all = Vec::new();
    let mut trees = serde_json::Map::new();
    let mut outcome = Ok(());
    for &kind in &args.scenarios {
        match run_scenario(&args, kind, &base, &mut rng) {
            Ok((info, results)) => {
                trees.insert(kind.name().into(), info);
                all.extend(results);
            }
            Err(e) => {
                // Keep everything of a failed scenario: its logs and data directories.
                outcome = Err(format!(
                    "scenario {}: {e} (kept {}, logs in logs/ there; remove it when done)",
                    kind.name(),
                    base.join(kind.name()).display()
                ));
                break;
            }
        }
        if !args.keep {
            let _ = fs::remove_dir_all(base.join(kind.name()));
        }
    }
    print_table(&all, args.link.is_some());
    if let Some(path) = &args.json {
        let doc = json!({
            "benchmark": "dpsync-bench compare",
            "dpsync": dpsync_version,
            "rsync": rsync_version,
            "rsync_args": args.rsync_args,
            "dps": args.dps,
            "scale": args.scale,
            "link": args.link.map(|l| json!({ "bytes_per_s": l.rate, "rtt_ms": l.rtt.as_millis() as u64 })),
            "seed": args.seed,
            "parallel_targets": args.parallel_targets,
            "poll_ms": args.poll_ms,
            "machine": machine(),
            "trees": trees,
            "total_s": started.elapsed().as_secs_f64(),
            "steps": all.iter().map(|r| {
                let (gw, gb) = goal(r.scenario, r.step, args.link.is_some());
                json!({
                    "scenario": r.scenario.name(),
                    "step": r.step,
                    "change": r.change,
                    "files_compared_per_run": r.checked_files,
                    "dpsync": r.dpsync.to_json(),
                    "rsync": r.rsync.to_json(),
                    "ratio_wall": ratio(r.dpsync.wall_s, r.rsync.wall_s),
                    "ratio_bytes": ratio(r.dpsync.bytes() as f64, r.rsync.bytes() as f64),
                    "ratio_cpu": ratio(r.dpsync.cpu_s(), r.rsync.cpu_s()),
                    "goal_wall": gw,
                    "goal_bytes": gb,
                })
            }).collect::<Vec<_>>(),
        });
        let text = serde_json::to_string_pretty(&doc).map_err(err("json"))?;
        fs::write(path, text + "\n").map_err(err(path.display()))?;
        eprintln!("results written to {}", path.display());
    }
    if args.keep {
        eprintln!("kept {}", base.display());
    } else if outcome.is_ok() {
        let _ = fs::remove_dir_all(&base);
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    outcome
}

fn machine() -> Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()));
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({
        "nproc": thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu": cpu,
        "mem_gib": mem_kib.map(|k| (k as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0),
        "kernel": kernel.trim(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_parse_in_bits_or_bytes_with_a_round_trip() {
        let l = Link::parse("100mbit,20ms").unwrap();
        assert_eq!((l.rate, l.rtt), (12_500_000, Duration::from_millis(20)));
        let l = Link::parse("2MiB, 100ms").unwrap();
        assert_eq!((l.rate, l.rtt), (2 << 20, Duration::from_millis(100)));
        for bad in ["100mbit", "fast,20ms", "100mbit,20", "1b,20ms", "10mbit,-1ms"] {
            assert!(Link::parse(bad).is_err(), "{bad}");
        }
    }
}
