//! `import`: whole-tree import throughput of dpsync against `b3sum`.
//!
//! ```text
//! cargo run --release -p dpsync-bench --bin import -- [--files N] [--total-mib M]
//!     [--dir /tmp/PATH] [--json PATH] [--runs R] [--seed S] [--keep]
//! ```
//!
//! Generates a seeded tree of files with log-normal sizes (1 KiB … 64 MiB), then times,
//! best of `--runs` (default 3):
//!
//! - **dpsync import**: scan + plan + `Library::import` of every file in parallel with
//!   rayon, as `site/refresh.rs` does (fsync of every object, rename, directory fsyncs
//!   at the end), into a fresh library each run;
//! - **b3sum** over the same files (when it is on `PATH`), arguments in batches;
//! - for reference, dpsync's hash + chunk pass with `io::sink()` as the copy target, a
//!   plain streaming BLAKE3 of every file (no chunking, no copy), and `cp -r` + `sync -f`
//!   of the tree (the copy alone, durable: a floor for anything that keeps a copy).
//!
//! With `DPSYNC_BENCH_NO_FSYNC=1` it also times a bench-only replica of the import that
//! skips every fsync (objects and directories), to show fsync's share.
//!
//! Nothing is dropped from the page cache: every number is **warm** (the source tree is
//! in memory; the library's writes and fsyncs go to the disk).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dpsync_hash::{ChunkParams, Entry, EntryKind, Manifest, digest_stream};
use dpsync_library::{ImportBatch, Library};
use dpsync_scan::{FilePlan, ScanCache, ScanEntry, ScanKind, SourceRoot};
use dpsync_testkit::{Rng, lognormal_sizes};
use rayon::prelude::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;
const MIN_SIZE: u64 = KIB;
const MAX_SIZE: u64 = 64 * MIB;
const FILES_PER_DIR: usize = 40;
const MARKER: &str = "dpsync-bench-tree";

type Res<T> = Result<T, String>;

#[derive(Debug)]
struct Args {
    files: usize,
    total_mib: u64,
    dir: Option<PathBuf>,
    json: Option<PathBuf>,
    runs: usize,
    seed: u64,
    keep: bool,
    b3sum_threads: Option<u32>,
}

const USAGE: &str = "usage: import [--files N] [--total-mib M] [--dir /tmp/PATH] [--json PATH] [--runs R] \
[--seed S] [--b3sum-threads T] [--keep]
  --files N          files in the generated tree (default 2000)
  --total-mib M      total size of the tree in MiB (default 1024)
  --dir PATH         working folder (default /tmp/dpsync-bench-PID); created, and removed at the end
                     unless --keep; a folder kept by an earlier run with the same tree is reused
  --json PATH        also write the results as JSON to PATH
  --runs R           runs of each measurement, best taken (default 3)
  --seed S           PRNG seed of the tree (default 1)
  --b3sum-threads T  pass --num-threads T to b3sum (default: b3sum's own default, all cores)
  --keep             keep the generated tree
env: DPSYNC_BENCH_NO_FSYNC=1 also times an import replica without any fsync";

fn parse_args() -> Res<Args> {
    let mut a = Args {
        files: 2000,
        total_mib: 1024,
        dir: None,
        json: None,
        runs: 3,
        seed: 1,
        keep: false,
        b3sum_threads: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value\n{USAGE}"));
        let num = |name: &str, v: String| v.parse::<u64>().map_err(|e| format!("{name} {v}: {e}"));
        match arg.as_str() {
            "--files" => a.files = num("--files", value("--files")?)? as usize,
            "--total-mib" => a.total_mib = num("--total-mib", value("--total-mib")?)?,
            "--dir" => a.dir = Some(PathBuf::from(value("--dir")?)),
            "--json" => a.json = Some(PathBuf::from(value("--json")?)),
            "--runs" => a.runs = num("--runs", value("--runs")?)?.max(1) as usize,
            "--seed" => a.seed = num("--seed", value("--seed")?)?,
            "--b3sum-threads" => a.b3sum_threads = Some(num("--b3sum-threads", value("--b3sum-threads")?)? as u32),
            "--keep" => a.keep = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if a.files == 0 || a.total_mib == 0 {
        return Err("--files and --total-mib must be positive".into());
    }
    Ok(a)
}

fn main() {
    if let Err(e) = run() {
        eprintln!("import bench: {e}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------
// The tree

/// File sizes: log-normal (median ≈ 50 KiB, a long tail of big files), clamped to
/// 1 KiB … 64 MiB, scaled so that they add up to `total` (as nearly as the clamps allow).
fn file_sizes(n: usize, total: u64, rng: &mut Rng) -> Vec<u64> {
    lognormal_sizes(n, total, MIN_SIZE, MAX_SIZE, rng)
}

#[derive(Debug, Clone)]
struct Tree {
    root: PathBuf,
    files: Vec<(PathBuf, u64)>,
    bytes: u64,
    dirs: usize,
}

fn tree_layout(root: &Path, sizes: &[u64]) -> Tree {
    // Two levels of folders: dNN/sNN/fNNNNN.bin, FILES_PER_DIR files each.
    let mut dirs = std::collections::BTreeSet::new();
    let files: Vec<(PathBuf, u64)> = sizes
        .iter()
        .enumerate()
        .map(|(i, &size)| {
            let leaf = i / FILES_PER_DIR;
            let dir = root.join(format!("d{:02}", leaf / 8)).join(format!("s{:02}", leaf % 8));
            dirs.insert(dir.clone());
            (dir.join(format!("f{i:05}.bin")), size)
        })
        .collect();
    let bytes = sizes.iter().sum();
    Tree { root: root.to_owned(), files, bytes, dirs: dirs.len() }
}

/// Writes the tree: every file a slice of a 64 MiB random pool at a random offset, with
/// a unique 16-byte header so no two files are equal. fsync'd so that no writeback of
/// the source competes with the measurements.
fn write_tree(tree: &Tree, seed: u64) -> Res<()> {
    let mut rng = Rng::new(seed ^ 0x5EED_F00D);
    let pool_len = (MAX_SIZE + MIB) as usize;
    let mut pool = vec![0u8; pool_len];
    for w in pool.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    let offsets: Vec<usize> =
        tree.files.iter().map(|(_, size)| (rng.next_u64() % (pool_len as u64 - size)) as usize).collect();
    for (p, _) in &tree.files {
        let d = p.parent().expect("files are in folders");
        fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    tree.files.par_iter().zip(offsets.par_iter()).enumerate().try_for_each(|(i, ((path, size), &off))| {
        let size = *size as usize;
        let mut f = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&(i as u64).to_le_bytes());
        header[8..].copy_from_slice(&seed.to_le_bytes());
        let h = size.min(16);
        f.write_all(&header[..h])
            .and_then(|_| f.write_all(&pool[off + h..off + size]))
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("{}: {e}", path.display()))
    })
}

fn describe_sizes(tree: &Tree) -> String {
    let mut s: Vec<u64> = tree.files.iter().map(|f| f.1).collect();
    s.sort_unstable();
    let pct = |p: f64| s[((s.len() - 1) as f64 * p) as usize];
    let big: u64 = s.iter().filter(|&&x| x >= 16 * MIB).sum();
    format!(
        "sizes: min {}, median {}, p90 {}, p99 {}, max {}; {} files ≥ 16 MiB hold {:.0} % of the bytes",
        human(s[0]),
        human(pct(0.5)),
        human(pct(0.9)),
        human(pct(0.99)),
        human(s[s.len() - 1]),
        s.iter().filter(|&&x| x >= 16 * MIB).count(),
        100.0 * big as f64 / tree.bytes as f64
    )
}

fn human(b: u64) -> String {
    if b >= MIB { format!("{:.1} MiB", b as f64 / MIB as f64) } else { format!("{:.1} KiB", b as f64 / KIB as f64) }
}

// ---------------------------------------------------------------------------------------
// The measurements

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CopyTo {
    /// An `ImportBatch`, as a refresh uses: the real thing (fsync per object off the
    /// hashing threads, directory fsyncs).
    Library,
    /// A bench-only replica of `Library::import` with no fsync at all.
    LibraryNoFsync,
    /// Hash and chunk only: the copy goes to `io::sink()`.
    Sink,
}

/// Scan, plan, then hash + chunk + copy every file in parallel, as a refresh does.
/// Returns the bytes read.
fn dpsync_pass(src: &Path, library: Option<&Arc<Library>>, params: &ChunkParams, copy: CopyTo) -> Res<u64> {
    let batch = library.filter(|_| copy == CopyTo::Library).map(|l| l.import_batch());
    let root = SourceRoot::open(src).map_err(|e| e.to_string())?;
    let scan = root.scan().map_err(|e| e.to_string())?;
    if let Some(p) = scan.problems.first() {
        return Err(format!("scan refused {} entries, first: {p}", scan.problems.len()));
    }
    let plan = dpsync_scan::plan(scan.entries, None, &ScanCache::default(), false);
    let results: Vec<Res<Entry>> = plan
        .items
        .into_par_iter()
        .map(|(entry, decision)| -> Res<Entry> {
            let kind = match (&entry.kind, decision) {
                (ScanKind::Dir, _) => EntryKind::Dir,
                (ScanKind::Symlink { target }, _) => EntryKind::Symlink { target: target.clone() },
                (ScanKind::File, Some(FilePlan::Reuse { hash, size, chunks })) => {
                    EntryKind::File { size, hash, chunks }
                }
                (ScanKind::File, _) => import_one(&root, &entry, batch.as_ref(), library, params, copy)?,
            };
            Ok(Entry { path: entry.path.clone(), mode: entry.mode, mtime_ns: entry.stat.mtime_ns, kind })
        })
        .collect();
    let entries = results.into_iter().collect::<Res<Vec<Entry>>>()?;
    let manifest = Manifest::new(entries).map_err(|e| format!("manifest: {e}"))?;
    if let Some(batch) = batch {
        batch.finish().map_err(|e| e.to_string())?;
    }
    Ok(manifest.total_bytes())
}

fn import_one(
    root: &SourceRoot,
    entry: &ScanEntry,
    batch: Option<&ImportBatch>,
    library: Option<&Arc<Library>>,
    params: &ChunkParams,
    copy: CopyTo,
) -> Res<EntryKind> {
    let path = root.path().join(entry.path.as_str());
    let file = root.open_file(&entry.path).map_err(|e| format!("{}: {e}", path.display()))?;
    let ctx = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    let digest = match copy {
        CopyTo::Library => batch.expect("an import batch").import(&file, params).map_err(|e| ctx(&e))?.digest,
        CopyTo::LibraryNoFsync => {
            import_without_fsync(library.expect("a library"), &file, params).map_err(|e| ctx(&e))?
        }
        CopyTo::Sink => digest_stream(&file, &mut io::sink(), params).map_err(|e| ctx(&e))?,
    };
    if digest.size != entry.stat.size {
        return Err(format!("{}: read {} bytes, scanned {}", path.display(), digest.size, entry.stat.size));
    }
    Ok(EntryKind::File { size: digest.size, hash: digest.hash, chunks: digest.chunks.into() })
}

/// `Library::import` step for step (temp file, one-pass digest + copy, chmod, rename into
/// `objects/`), minus `sync_all`. For measuring only: such an object is not durable.
fn import_without_fsync(lib: &Library, reader: &File, params: &ChunkParams) -> io::Result<dpsync_hash::FileDigest> {
    let tmp = lib.temp_path();
    let mut file = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    let digest = digest_stream(reader, &mut file, params)?;
    let dest = lib.object_path(&digest.hash);
    if dest.is_file() {
        fs::remove_file(&tmp)?;
        return Ok(digest);
    }
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))?;
    let dir = dest.parent().expect("object paths have a parent");
    if !dir.is_dir() {
        fs::create_dir_all(dir)?;
    }
    fs::rename(&tmp, &dest)?;
    Ok(digest)
}

/// Streaming BLAKE3 of every file, rayon over files: what hashing alone costs.
fn blake3_pass(tree: &Tree) -> Res<u64> {
    tree.files.par_iter().try_for_each(|(p, _)| {
        let mut f = File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    h.update(&buf[..n]);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(format!("{}: {e}", p.display())),
            }
        }
        std::hint::black_box(h.finalize());
        Ok(())
    })?;
    Ok(tree.bytes)
}

fn b3sum_version() -> Option<String> {
    let out = Command::new("b3sum").arg("--version").stderr(Stdio::null()).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Argument lists of at most 1,000 files or 96 KiB each, as xargs would make them.
fn b3sum_batches(tree: &Tree) -> Vec<Vec<&Path>> {
    let mut batches = vec![Vec::new()];
    let mut bytes = 0usize;
    for (p, _) in &tree.files {
        let len = p.as_os_str().len() + 1;
        let cur = batches.last_mut().expect("non-empty");
        if !cur.is_empty() && (cur.len() >= 1000 || bytes + len > 96 * 1024) {
            batches.push(Vec::new());
            bytes = 0;
        }
        batches.last_mut().expect("non-empty").push(p.as_path());
        bytes += len;
    }
    batches
}

fn b3sum_pass(tree: &Tree, threads: Option<u32>) -> Res<u64> {
    for batch in b3sum_batches(tree) {
        let mut cmd = Command::new("b3sum");
        if let Some(t) = threads {
            cmd.arg("--num-threads").arg(t.to_string());
        }
        let status = cmd.arg("--").args(&batch).stdout(Stdio::null()).status().map_err(|e| format!("b3sum: {e}"))?;
        if !status.success() {
            return Err(format!("b3sum failed: {status}"));
        }
    }
    Ok(tree.bytes)
}

/// Flushes dirty pages between runs so one run's writeback does not land in the next.
fn settle() {
    let _ = Command::new("sync").status();
}

#[derive(Debug)]
struct Measured {
    key: &'static str,
    label: String,
    runs: Vec<Duration>,
    bytes: u64,
}

impl Measured {
    fn best(&self) -> Duration {
        self.runs.iter().copied().min().unwrap_or_default()
    }
    fn mib_s(&self) -> f64 {
        self.bytes as f64 / MIB as f64 / self.best().as_secs_f64()
    }
}

type Body<'a> = Box<dyn FnMut() -> Res<(Duration, u64)> + 'a>;

/// Runs every measurement once per round, `runs` rounds, so that all of them see the
/// same drift of the machine (page cache, disk, other load) rather than one of them
/// catching a slow minute. Each body times its own measured part and returns
/// `(elapsed, bytes)`, so that setup and cleanup stay out of the number. Dirty pages
/// are flushed (untimed) after every run.
fn measure_all(runs: usize, mut bodies: Vec<(&'static str, String, Body<'_>)>) -> Res<Vec<Measured>> {
    let mut out: Vec<Measured> = bodies
        .iter()
        .map(|(key, label, _)| Measured { key, label: label.clone(), runs: Vec::new(), bytes: 0 })
        .collect();
    for round in 1..=runs {
        for (m, (_, _, body)) in out.iter_mut().zip(bodies.iter_mut()) {
            let (elapsed, bytes) = body()?;
            m.runs.push(elapsed);
            m.bytes = bytes;
            settle();
        }
        eprintln!("  round {round} of {runs} done");
    }
    for m in &out {
        eprintln!("  {:<52} best {:>7.3} s  {:>8.0} MiB/s", m.label, m.best().as_secs_f64(), m.mib_s());
    }
    Ok(out)
}

fn timed(f: impl FnOnce() -> Res<u64>) -> Res<(Duration, u64)> {
    let t = Instant::now();
    let bytes = f()?;
    Ok((t.elapsed(), bytes))
}

// ---------------------------------------------------------------------------------------

fn run() -> Res<()> {
    let args = parse_args()?;
    let params = ChunkParams::default();
    let base =
        args.dir.clone().unwrap_or_else(|| std::env::temp_dir().join(format!("dpsync-bench-{}", std::process::id())));
    let src = base.join("src");
    let marker = base.join(MARKER);
    let tree_id = format!("v2 files={} total_mib={} seed={}\n", args.files, args.total_mib, args.seed);

    let mut rng = Rng::new(args.seed);
    let sizes = file_sizes(args.files, args.total_mib * MIB, &mut rng);
    let tree = tree_layout(&src, &sizes);

    let reuse = fs::read_to_string(&marker).is_ok_and(|s| s == tree_id);
    if !reuse {
        if base.exists() && fs::read_dir(&base).map_err(|e| format!("{}: {e}", base.display()))?.next().is_some() {
            return Err(format!(
                "{} exists and is not a tree made by this bench with the same --files/--total-mib/--seed; \
                 remove it or choose another --dir",
                base.display()
            ));
        }
        fs::create_dir_all(&src).map_err(|e| format!("{}: {e}", src.display()))?;
        eprintln!("writing {} files, {} into {} …", tree.files.len(), human(tree.bytes), src.display());
        let t = Instant::now();
        write_tree(&tree, args.seed)?;
        fs::write(&marker, &tree_id).map_err(|e| format!("{}: {e}", marker.display()))?;
        eprintln!("  written (and fsync'd) in {:.1} s", t.elapsed().as_secs_f64());
    } else {
        eprintln!("reusing the tree in {}", src.display());
    }
    eprintln!("{} files in {} folders, {}; {}", tree.files.len(), tree.dirs, human(tree.bytes), describe_sizes(&tree));

    // Warm the page cache with one untimed read of everything: every number is warm.
    blake3_pass(&tree)?;
    settle();

    let runs = args.runs;
    // A fresh library for each run of an import, opened before the clock starts. All are
    // removed only after the last measurement: ext4 allocates inodes slowly right after
    // many deletions (`recently_deleted` scans), which would charge this bench's own
    // cleanup to the next run.
    let lib_dirs = std::cell::RefCell::new(Vec::new());
    let with_library = |copy: CopyTo| -> Res<(Duration, u64)> {
        let dir = base.join(format!("lib-{}", lib_dirs.borrow().len()));
        lib_dirs.borrow_mut().push(dir.clone());
        let library = Arc::new(Library::open(&dir).map_err(|e| e.to_string())?);
        timed(|| dpsync_pass(&src, Some(&library), &params, copy))
    };
    let b3 = b3sum_version();
    let mut bodies: Vec<(&'static str, String, Body<'_>)> = Vec::new();

    // (a) dpsync import into a fresh library each run.
    bodies.push((
        "dpsync_import",
        "dpsync import (scan + hash + chunk + copy + fsync)".into(),
        Box::new(|| with_library(CopyTo::Library)),
    ));
    // Optional: the import without any fsync (bench-only replica).
    if std::env::var("DPSYNC_BENCH_NO_FSYNC").is_ok_and(|v| v == "1") {
        bodies.push((
            "dpsync_import_no_fsync",
            "dpsync import without fsync (bench-only replica)".into(),
            Box::new(|| with_library(CopyTo::LibraryNoFsync)),
        ));
    }
    // (b) b3sum.
    match &b3 {
        Some(v) => {
            let threads = args.b3sum_threads.map_or("default threads".to_string(), |t| format!("--num-threads {t}"));
            bodies.push((
                "b3sum",
                format!("{v} ({threads}), batched argument lists"),
                Box::new(|| timed(|| b3sum_pass(&tree, args.b3sum_threads))),
            ));
        }
        None => eprintln!(
            "b3sum is not on PATH: install it with `apt-get install b3sum` or `cargo install b3sum` \
             to compare; reporting dpsync alone"
        ),
    }
    // (c) hash + chunk, no copy; (d) BLAKE3 alone.
    bodies.push((
        "dpsync_hash_chunk_sink",
        "dpsync hash + chunk, copy to io::sink (no library)".into(),
        Box::new(|| timed(|| dpsync_pass(&src, None, &params, CopyTo::Sink))),
    ));
    bodies.push((
        "blake3_stream",
        "BLAKE3 only, 1 MiB reads, rayon over files".into(),
        Box::new(|| timed(|| blake3_pass(&tree))),
    ));
    // (e) The copy alone, as coreutils does it, made durable: a floor for any import
    // that keeps a copy of every byte.
    bodies.push((
        "cp_r_sync",
        "cp -r + sync -f (copy only, no hashing)".into(),
        Box::new(|| {
            let dir = base.join(format!("lib-{}", lib_dirs.borrow().len()));
            lib_dirs.borrow_mut().push(dir.clone());
            timed(|| {
                let cp: [&std::ffi::OsStr; 3] = ["-r".as_ref(), src.as_os_str(), dir.as_os_str()];
                let sync: [&std::ffi::OsStr; 2] = ["-f".as_ref(), dir.as_os_str()];
                for (prog, args) in [("cp", &cp[..]), ("sync", &sync[..])] {
                    let st = Command::new(prog).args(args).status().map_err(|e| format!("{prog}: {e}"))?;
                    if !st.success() {
                        return Err(format!("{prog} failed: {st}"));
                    }
                }
                Ok(tree.bytes)
            })
        }),
    ));
    eprintln!("measuring, best of {runs}, interleaved rounds (warm page cache) …");
    let results = measure_all(runs, bodies)?;

    for d in lib_dirs.borrow().iter() {
        fs::remove_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }

    // The table.
    let b3_best = results.iter().find(|m| m.key == "b3sum").map(Measured::mib_s);
    println!();
    println!(
        "{} files, {:.1} MiB, warm page cache, best of {runs}, {} rayon threads",
        tree.files.len(),
        tree.bytes as f64 / MIB as f64,
        rayon::current_num_threads()
    );
    println!("| measurement | best (s) | MiB/s | vs b3sum | runs (s) |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for m in &results {
        let runs_s: Vec<String> = m.runs.iter().map(|d| format!("{:.3}", d.as_secs_f64())).collect();
        let ratio = b3_best.map_or("—".to_string(), |b| format!("{:.2}", m.mib_s() / b));
        println!(
            "| {} | {:.3} | {:.0} | {} | {} |",
            m.label,
            m.best().as_secs_f64(),
            m.mib_s(),
            ratio,
            runs_s.join(", ")
        );
    }
    let import = results.iter().find(|m| m.key == "dpsync_import").expect("measured");
    let ratio = b3_best.map(|b| import.mib_s() / b);
    match ratio {
        Some(r) => {
            println!("\ndpsync import / b3sum = {r:.2} (goal ≥ 0.50: {})", if r >= 0.5 { "met" } else { "NOT met" })
        }
        None => println!("\nno b3sum: install it (`apt-get install b3sum` or `cargo install b3sum`) for the ratio"),
    }

    if let Some(path) = &args.json {
        let mut measurements = BTreeMap::new();
        for m in &results {
            measurements.insert(
                m.key,
                serde_json::json!({
                    "label": m.label,
                    "bytes": m.bytes,
                    "best_s": m.best().as_secs_f64(),
                    "mib_per_s": m.mib_s(),
                    "runs_s": m.runs.iter().map(Duration::as_secs_f64).collect::<Vec<_>>(),
                }),
            );
        }
        let doc = serde_json::json!({
            "benchmark": "dpsync-bench import",
            "page_cache": "warm (nothing dropped)",
            "machine": machine(),
            "tree": {
                "dir": tree.root.display().to_string(),
                "files": tree.files.len(),
                "folders": tree.dirs,
                "bytes": tree.bytes,
                "seed": args.seed,
            },
            "chunk_params": { "min": params.min, "avg": params.avg, "max": params.max },
            "runs": runs,
            "rayon_threads": rayon::current_num_threads(),
            "b3sum": b3,
            "b3sum_threads": args.b3sum_threads,
            "measurements": measurements,
            "ratio_import_to_b3sum": ratio,
            "goal_ratio": 0.5,
            "goal_met": ratio.map(|r| r >= 0.5),
        });
        let text = serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?;
        fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))?;
        eprintln!("results written to {}", path.display());
    }

    if args.keep {
        eprintln!("kept the tree in {} (rerun with --dir {} to reuse it)", base.display(), base.display());
    } else {
        fs::remove_dir_all(&base).map_err(|e| format!("{}: {e}", base.display()))?;
    }
    Ok(())
}

fn machine() -> serde_json::Value {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()));
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    serde_json::json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu": cpu,
        "mem_gib": mem_kib.map(|k| (k as f64 / (1024.0 * 1024.0) * 10.0).round() / 10.0),
    })
}
