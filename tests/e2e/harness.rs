//! Process harness for the end-to-end tests: temporary directories, a site server and
//! DP agents driven through the real CLI, and what only these tests need. Generators,
//! tree digests, the daemon guard and bounded waits come from `dpsync-testkit`
//! (re-exported here).
//!
//! Everything here bounds its waits and, when a wait times out, panics with the last
//! lines of the logs of the daemons concerned. Tests run in parallel: each one works in
//! its own short directory under `/tmp` (Unix socket paths are limited to 107 bytes).
//! Set `DPSYNC_KEEP_TEST_DIRS=1` to keep the directory of a failed test.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, SystemTime};

pub use dpsync_testkit::{
    Daemon, HttpResponse, LOG_TAIL_LINES, Node, Rng, Tree, TreeDigest, file_text, gen_tree, http_get, poll_every,
    poll_until, random_bytes, tree_digest, try_http_get, try_tree_digest, write_random_file,
};
use serde_json::Value;

/// The `dpsync` binary under test.
pub const DPSYNC: &str = env!("CARGO_BIN_EXE_dpsync");
/// Longest a CLI command may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a daemon may take to become ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a daemon may take to stop after SIGTERM (or to die after SIGKILL).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Commands

/// A `dpsync` command with no `DPSYNC_*` settings inherited from the test's environment
/// (except `DPSYNC_LOG`), so an administrator's shell cannot change what a test sees.
pub fn dpsync_command() -> Command {
    let mut cmd = Command::new(DPSYNC);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("DPSYNC_") && k != "DPSYNC_LOG" {
            cmd.env_remove(&*k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to its end with captured output; kills it and panics after `timeout`.
pub fn run_bounded(cmd: &mut Command, timeout: Duration) -> Output {
    try_run_bounded(cmd, timeout).unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// [`run_bounded`], with an error when the program cannot be started at all.
pub fn try_run_bounded(cmd: &mut Command, timeout: Duration) -> std::io::Result<Output> {
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = out.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = err.read_to_end(&mut b);
        b
    });
    let status = poll_until(timeout, || child.try_wait().expect("try_wait"));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    match status {
        Some(status) => Ok(Output { status, stdout, stderr }),
        None => panic!(
            "{cmd:?} did not finish within {timeout:?}; killed it.\n--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// Polls `probe` until it returns `Some`, at most `timeout`; on timeout panics naming
/// `what`, with the last lines of each daemon's log.
pub fn wait_until<T>(what: &str, timeout: Duration, daemons: &[&Daemon], probe: impl FnMut() -> Option<T>) -> T {
    poll_until(timeout, probe)
        .unwrap_or_else(|| panic!("timed out after {timeout:?} waiting for {what}{}", log_tails(daemons)))
}

/// The last [`LOG_TAIL_LINES`] lines of each daemon's log, for panic messages.
pub fn log_tails(daemons: &[&Daemon]) -> String {
    let mut s = String::new();
    for d in daemons {
        s.push_str(&format!(
            "\n--- last {LOG_TAIL_LINES} lines of {} ({})\n{}",
            d.name(),
            d.log_path().display(),
            d.log_tail(LOG_TAIL_LINES)
        ));
    }
    s
}

// ---------------------------------------------------------------------------------------
// Temporary directories

/// A fresh directory `/tmp/dpsXXXXXX`, removed when dropped, unless the test failed and
/// `DPSYNC_KEEP_TEST_DIRS=1`. Declare it before the daemons that use it, so that they
/// are stopped (dropped) first.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    pub fn new() -> Self {
        let path = tempfile::Builder::new()
            .prefix("dps")
            .rand_bytes(6)
            .tempdir_in("/tmp")
            .expect("cannot create a temporary directory in /tmp")
            .keep();
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if std::env::var("DPSYNC_KEEP_TEST_DIRS").as_deref() == Ok("1") {
                eprintln!("test directory kept: {}", self.path.display());
                return;
            }
            eprintln!("(set DPSYNC_KEEP_TEST_DIRS=1 to keep the test directory {})", self.path.display());
        }
        if fs::remove_dir_all(&self.path).is_err() {
            // A test may have left an unreadable folder behind: open everything up, retry.
            make_writable(&self.path);
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn make_writable(p: &Path) {
    let Ok(md) = fs::symlink_metadata(p) else { return };
    if md.is_dir() {
        let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o755));
        if let Ok(rd) = fs::read_dir(p) {
            for e in rd.flatten() {
                make_writable(&e.path());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Daemons

/// The harness's way with a [`Daemon`]: every wait and stop is bounded and panics, with
/// the daemon's log, when it fails.
pub trait DaemonExt {
    /// Spawns `cmd` with its output appended to `log_path`; panics if it cannot start.
    fn start(name: &str, cmd: Command, log_path: &Path) -> Daemon;
    /// SIGKILL, then reap.
    fn kill9(&mut self);
    /// SIGTERM and wait for it to exit; panics (after a SIGKILL) if it does not stop
    /// within [`STOP_TIMEOUT`].
    fn stop(&mut self) -> ExitStatus;
    /// Waits for the process to exit by itself; panics after `timeout`.
    fn expect_exit(&mut self, timeout: Duration) -> ExitStatus;
    /// Waits until the log holds `needle` at least `n` times; panics if the process exits
    /// first or after `timeout`.
    fn expect_log_count(&mut self, needle: &str, n: usize, timeout: Duration);
}

impl DaemonExt for Daemon {
    fn start(name: &str, cmd: Command, log_path: &Path) -> Daemon {
        Daemon::spawn(name, cmd, log_path).unwrap_or_else(|e| panic!("{e}"))
    }

    fn kill9(&mut self) {
        self.kill();
    }

    fn stop(&mut self) -> ExitStatus {
        match self.terminate(STOP_TIMEOUT) {
            dpsync_testkit::Stop::Exited(s) | dpsync_testkit::Stop::AlreadyExited(s) => s,
            killed @ dpsync_testkit::Stop::Killed { .. } => panic!("{}: {killed}{}", self.name(), log_tails(&[self])),
        }
    }

    fn expect_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.wait_exit(timeout).unwrap_or_else(|| {
            panic!("timed out after {timeout:?} waiting for {} to exit{}", self.name(), log_tails(&[self]))
        })
    }

    fn expect_log_count(&mut self, needle: &str, n: usize, timeout: Duration) {
        if let Err(e) = self.wait_for_log_count(needle, n, timeout) {
            panic!("{e}{}", log_tails(&[self]));
        }
    }
}

// ---------------------------------------------------------------------------------------
// The site server

/// How to start a server besides its data directory.
#[derive(Debug, Clone, Default)]
pub struct ServerOpts {
    pub site_code: Option<String>,
    pub database_url: Option<String>,
    /// Admin socket (default `DATA_DIR/admin.sock`).
    pub socket: Option<PathBuf>,
    /// TOML configuration file.
    pub config: Option<PathBuf>,
    /// More `dpsync server` arguments.
    pub args: Vec<String>,
    /// More environment variables for the server process.
    pub env: Vec<(String, String)>,
}

impl ServerOpts {
    pub fn site(code: &str) -> Self {
        Self { site_code: Some(code.to_owned()), ..Self::default() }
    }
}

/// A running `dpsync server`, driven through the CLI. Its logs are the files
/// `DATA_DIR.serverN.log` beside the data directory (one per start).
#[derive(Debug)]
pub struct Server {
    pub data_dir: PathBuf,
    pub opts: ServerOpts,
    daemon: Option<Daemon>,
    starts: u32,
}

impl Server {
    /// Starts a server on `data_dir` with `site_code` and waits until it answers.
    pub fn start(data_dir: impl AsRef<Path>, site_code: &str) -> Self {
        Self::start_with(data_dir, ServerOpts::site(site_code))
    }

    pub fn start_with(data_dir: impl AsRef<Path>, opts: ServerOpts) -> Self {
        let mut s = Self { data_dir: data_dir.as_ref().to_owned(), opts, daemon: None, starts: 0 };
        s.spawn_and_wait();
        s
    }

    /// The `dpsync server …` command line for `data_dir` and `opts`.
    pub fn command(data_dir: &Path, opts: &ServerOpts) -> Command {
        let mut cmd = dpsync_command();
        cmd.arg("server").arg("--data-dir").arg(data_dir);
        if let Some(c) = &opts.site_code {
            cmd.args(["--site-code", c]);
        }
        if let Some(u) = &opts.database_url {
            cmd.args(["--database-url", u]);
        }
        if let Some(s) = &opts.socket {
            cmd.arg("--socket").arg(s);
        }
        if let Some(c) = &opts.config {
            cmd.arg("--config").arg(c);
        }
        cmd.args(&opts.args);
        cmd.envs(opts.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// Runs a server that must refuse to start: asserts it exits non-zero (within
    /// [`START_TIMEOUT`]) and returns its stderr.
    pub fn refuse_to_start(data_dir: impl AsRef<Path>, opts: &ServerOpts) -> String {
        let out = run_bounded(&mut Self::command(data_dir.as_ref(), opts), START_TIMEOUT);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "the server started although it should have refused; stderr:\n{stderr}");
        assert_eq!(out.status.code(), Some(1), "the server should exit 1; stderr:\n{stderr}");
        stderr
    }

    fn spawn_and_wait(&mut self) {
        self.starts += 1;
        let log = PathBuf::from(format!("{}.server{}.log", self.data_dir.display(), self.starts));
        let name = format!("server {} (start {})", self.data_dir.display(), self.starts);
        let mut d = Daemon::start(&name, Self::command(&self.data_dir, &self.opts), &log);
        let mut last_info = String::new();
        let ready = d.wait_ready("it was ready", START_TIMEOUT, || {
            let out = run_bounded(&mut self.cli_command(&["info", "--json"]), CLI_TIMEOUT);
            last_info = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            out.status.success().then_some(())
        });
        if let Err(e) = ready {
            panic!("{e}; last `info`: {last_info}{}", log_tails(&[&d]));
        }
        self.daemon = Some(d);
    }

    /// Stops the server if it runs (SIGTERM) and starts it again on the same data dir.
    pub fn restart(&mut self) {
        if let Some(d) = self.daemon.as_mut() {
            d.stop();
        }
        self.spawn_and_wait();
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("server was started")
    }

    pub fn daemon_mut(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("server was started")
    }

    /// The log of the current (latest) start.
    pub fn log(&self) -> String {
        self.daemon().log()
    }

    pub fn kill9(&mut self) {
        self.daemon_mut().kill9();
    }

    pub fn terminate(&mut self) -> ExitStatus {
        self.daemon_mut().stop()
    }

    pub fn socket(&self) -> PathBuf {
        self.opts.socket.clone().unwrap_or_else(|| self.data_dir.join("admin.sock"))
    }

    /// `DATA_DIR/library`.
    pub fn library(&self) -> PathBuf {
        self.data_dir.join("library")
    }

    /// A CLI command aimed at this server (`--data-dir`, and `--socket` if it has one).
    pub fn cli_command(&self, args: &[&str]) -> Command {
        let mut cmd = dpsync_command();
        cmd.arg("--data-dir").arg(&self.data_dir);
        if let Some(s) = &self.opts.socket {
            cmd.arg("--socket").arg(s);
        }
        cmd.args(args);
        cmd
    }

    /// Runs the CLI against this server.
    pub fn cli(&self, args: &[&str]) -> Output {
        run_bounded(&mut self.cli_command(args), CLI_TIMEOUT)
    }

    /// Runs the CLI with `--json`, asserts success, and parses its stdout.
    pub fn cli_json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a);
        if !out.status.success() {
            panic!(
                "`dpsync {}` failed ({}): {}{}",
                a.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                self.tails()
            );
        }
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!("`dpsync {}` printed no JSON ({e}): {}", a.join(" "), String::from_utf8_lossy(&out.stdout))
        })
    }

    /// Runs the CLI expecting failure: asserts exit code 1 and a one-line reason on
    /// stderr (`dpsync: …`), and returns that line.
    pub fn cli_fail(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "`dpsync {}` succeeded but should have failed; stdout:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(out.status.code(), Some(1), "`dpsync {}`: exit code; stderr: {stderr}", args.join(" "));
        let line = stderr.trim_end_matches('\n');
        assert!(
            !line.is_empty() && !line.contains('\n'),
            "`dpsync {}` should give a one-line reason on stderr, got:\n{stderr}",
            args.join(" ")
        );
        assert!(line.starts_with("dpsync: "), "reason should start with `dpsync: `: {line}");
        line.to_owned()
    }

    /// Starts the CLI in the background (output to `DATA_DIR.NAME.log`), e.g. a refresh
    /// to interrupt.
    pub fn spawn_cli(&self, name: &str, args: &[&str]) -> Daemon {
        let log = PathBuf::from(format!("{}.{name}.log", self.data_dir.display()));
        Daemon::start(name, self.cli_command(args), &log)
    }

    fn tails(&self) -> String {
        self.daemon.as_ref().map(|d| log_tails(&[d])).unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------
// JSON

/// `v[key]` as u64; panics showing `v` if absent or not a number.
pub fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key:?} is not a number in {v:#}"))
}

/// `v[key]` as a string; panics showing `v` otherwise.
pub fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_else(|| panic!("{key:?} is not a string in {v:#}"))
}

/// The `source_version` of each version in a `package show --json` answer.
pub fn version_numbers(show: &Value) -> Vec<u64> {
    show["versions"]
        .as_array()
        .unwrap_or_else(|| panic!("no versions array in {show:#}"))
        .iter()
        .map(|v| num(v, "source_version"))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Source trees

/// Appends `bytes` to a file.
pub fn append(path: &Path, bytes: &[u8]) {
    let mut f =
        fs::OpenOptions::new().append(true).open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.write_all(bytes).unwrap_or_else(|e| panic!("append to {}: {e}", path.display()));
}

/// Gives every file and folder under `root` whose mtime is less than an hour old an
/// mtime a day back, so the scan cache's racy window (see `crates/scan/src/cache.rs`)
/// never applies. Entries already old are not touched (touching changes the ctime,
/// which would make the next refresh read them again), so it is safe to call after
/// every change. Symlinks are left alone (their times do not matter).
pub fn set_old_mtimes(root: &Path) {
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let md = fs::symlink_metadata(root).unwrap_or_else(|e| panic!("{}: {e}", root.display()));
    if md.file_type().is_symlink() {
        return;
    }
    if md.is_dir() {
        for e in fs::read_dir(root).expect("read_dir") {
            set_old_mtimes(&e.expect("dir entry").path());
        }
    }
    if (md.is_dir() || md.is_file()) && md.modified().expect("mtime") > hour_ago {
        set_old_mtime(root);
    }
}

/// Sets one file's or folder's mtime (and atime) to a day ago.
pub fn set_old_mtime(path: &Path) {
    let day_ago = SystemTime::now() - Duration::from_secs(86_400);
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    f.set_times(fs::FileTimes::new().set_modified(day_ago).set_accessed(day_ago))
        .unwrap_or_else(|e| panic!("set times of {}: {e}", path.display()));
}

/// Creates a FIFO.
pub fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL in path");
    #[allow(unsafe_code)]
    // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), 0o644) };
    assert_eq!(rc, 0, "mkfifo {}: {}", path.display(), std::io::Error::last_os_error());
}

/// Asserts two trees are identical, listing only the differences.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let d = tree_digest(a).diff(&tree_digest(b));
    assert!(d.is_empty(), "trees {} and {} differ:\n{d}", a.display(), b.display());
}

/// BLAKE3 (hex) of a byte string: how the content library names objects.
pub fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Where a content library holds the object with BLAKE3 `hex`.
pub fn library_object(library: &Path, hex: &str) -> PathBuf {
    library.join("objects").join(&hex[..2]).join(hex)
}

/// Number of entries directly in a folder (0 if it does not exist).
pub fn count_entries(dir: &Path) -> usize {
    fs::read_dir(dir).map(|rd| rd.count()).unwrap_or(0)
}

/// A non-UTF-8 file name.
pub fn non_utf8_name() -> &'static OsStr {
    OsStr::from_bytes(b"bad-\xff\xfe-name.txt")
}

// ---------------------------------------------------------------------------------------
// PostgreSQL

/// A fresh PostgreSQL database `dpsync_e2e_<random>` for one test, dropped (with
/// `FORCE`) when this value is dropped. Declare it before the server that uses it.
#[derive(Debug)]
pub struct PgDatabase {
    /// URL of the new database.
    pub url: String,
    admin_url: String,
    name: String,
}

impl PgDatabase {
    /// The server to use: env `DPSYNC_TEST_POSTGRES_URL`, default
    /// `postgres://postgres@127.0.0.1:5432/test`.
    pub fn admin_url() -> String {
        std::env::var("DPSYNC_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
    }

    /// Creates the database; `None` (after printing "skipping: …") when PostgreSQL is
    /// unreachable, unless env `DPSYNC_REQUIRE_POSTGRES=1`, then it panics.
    pub fn create() -> Option<Self> {
        let admin_url = Self::admin_url();
        if let Err(e) = psql(&admin_url, "SELECT 1") {
            if std::env::var("DPSYNC_REQUIRE_POSTGRES").as_deref() == Ok("1") {
                panic!("no PostgreSQL server at {admin_url} (DPSYNC_REQUIRE_POSTGRES=1): {e}");
            }
            eprintln!("skipping: no PostgreSQL server at {admin_url}");
            return None;
        }
        let name = format!("dpsync_e2e_{:016x}", Rng::new(std::process::id() as u64 ^ now_nanos()).next_u64());
        psql(&admin_url, &format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("cannot create database {name}: {e}"));
        let url = with_database(&admin_url, &name);
        Some(Self { url, admin_url, name })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        if let Err(e) = psql(&self.admin_url, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

fn now_nanos() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Runs one SQL statement with `psql`; the error is psql's stderr.
pub fn psql(url: &str, sql: &str) -> Result<String, String> {
    let mut cmd = Command::new("psql");
    cmd.arg(url).args(["-X", "-q", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]).env("PGCONNECT_TIMEOUT", "5");
    let out = try_run_bounded(&mut cmd, Duration::from_secs(20)).map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// `url` with its database name replaced by `db`.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

// ---------------------------------------------------------------------------------------
// SQLite files

/// Overwrites the page nearest the middle of a SQLite file that holds a b-tree node
/// (a table or index page in use: not free, not overflow) with garbage, as a disk or a
/// stray write would; returns the page number. The database must be closed (no WAL
/// left), and have at least 8 pages.
pub fn garble_middle_sqlite_page(path: &Path) -> u64 {
    for side in ["-wal", "-journal"] {
        let p = PathBuf::from(format!("{}{side}", path.display()));
        let left = fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert_eq!(left, 0, "{} holds {left} bytes: the database was not closed", p.display());
    }
    let db = fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert_eq!(&db[..16], b"SQLite format 3\0", "{} is not a SQLite file", path.display());
    let be32 = |at: usize| u32::from_be_bytes(db[at..at + 4].try_into().expect("4 bytes")) as u64;
    let page_size = match u16::from_be_bytes([db[16], db[17]]) {
        1 => 65536,
        n => n as u64,
    };
    let pages = db.len() as u64 / page_size;
    assert!(pages >= 8, "{} has only {pages} pages: no middle to garble", path.display());
    // The free list: trunk pages, each listing leaf pages.
    let mut free = BTreeSet::new();
    let mut trunk = be32(32);
    while trunk != 0 && free.insert(trunk) {
        let at = ((trunk - 1) * page_size) as usize;
        for i in 0..be32(at + 4) as usize {
            free.insert(be32(at + 8 + 4 * i));
        }
        trunk = be32(at);
    }
    let middle = pages / 2;
    let victim = (2..=pages)
        .filter(|p| !free.contains(p) && matches!(db[((p - 1) * page_size) as usize], 0x02 | 0x05 | 0x0a | 0x0d))
        .min_by_key(|p| p.abs_diff(middle))
        .unwrap_or_else(|| panic!("{} has no b-tree page past the first", path.display()));
    let mut f = fs::OpenOptions::new().write(true).open(path).expect("open the database for writing");
    std::os::unix::fs::FileExt::write_all_at(&f, &random_bytes(page_size as usize, victim), (victim - 1) * page_size)
        .expect("write the garbage");
    f.flush().expect("flush");
    f.sync_all().expect("fsync");
    victim
}

// ---------------------------------------------------------------------------------------
// DP agents

/// A running `dpsync agent` on `127.0.0.1`, serving plain HTTP (`--insecure-http`), on
/// port 0 at first start, then the same port again on restart, so the URL registered
/// with a server stays valid. Its log is the
/// file `DATA_DIR.agent.log` beside the data directory, appended to by every start.
#[derive(Debug)]
pub struct Agent {
    pub data_dir: PathBuf,
    pub token: Option<String>,
    /// More `dpsync agent` arguments (e.g. `--config FILE`).
    pub args: Vec<String>,
    daemon: Option<Daemon>,
    addr: Option<std::net::SocketAddr>,
    starts: u32,
}

impl Agent {
    /// Starts an agent on `data_dir` (with `--token` if given) and waits until it answers
    /// `GET /v1/hello`.
    pub fn start(data_dir: impl AsRef<Path>, token: Option<&str>) -> Self {
        Self::start_with(data_dir, token, &[])
    }

    /// [`Agent::start`] with more `dpsync agent` arguments.
    pub fn start_with(data_dir: impl AsRef<Path>, token: Option<&str>, args: &[&str]) -> Self {
        let mut a = Self {
            data_dir: data_dir.as_ref().to_owned(),
            token: token.map(str::to_owned),
            args: args.iter().map(|a| a.to_string()).collect(),
            daemon: None,
            addr: None,
            starts: 0,
        };
        a.spawn_and_wait();
        a
    }

    /// The `dpsync agent …` command line (the same address again once it has one).
    fn command(&self) -> Command {
        let listen = self.addr.map(|a| a.to_string()).unwrap_or_else(|| "127.0.0.1:0".into());
        let mut cmd = dpsync_command();
        cmd.arg("agent").arg("--data-dir").arg(&self.data_dir).args(["--listen", &listen]);
        // Plain HTTP: the tests' std HTTP client and the fault-injecting proxy speak it.
        if agent_has_insecure_http() {
            cmd.arg("--insecure-http");
        }
        if let Some(t) = &self.token {
            cmd.args(["--token", t]);
        }
        cmd.args(&self.args);
        cmd
    }

    /// Starts the (stopped) agent again on its data directory, expecting it to refuse:
    /// asserts it exits 1 (within [`START_TIMEOUT`]) and returns its stderr.
    pub fn refuse_to_start(&mut self) -> String {
        assert!(self.daemon.as_mut().is_none_or(|d| !d.is_running()), "stop the agent before starting it again");
        let out = run_bounded(&mut self.command(), START_TIMEOUT);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!out.status.success(), "the agent started although it should have refused; stderr:\n{stderr}");
        assert_eq!(out.status.code(), Some(1), "the agent should exit 1; stderr:\n{stderr}");
        stderr
    }

    fn spawn_and_wait(&mut self) {
        self.starts += 1;
        fs::create_dir_all(&self.data_dir).expect("create agent data dir");
        let addr_file = self.data_dir.join("listen.addr");
        let _ = fs::remove_file(&addr_file);
        let cmd = self.command();
        let name = format!("agent {} (start {})", self.data_dir.display(), self.starts);
        let mut d = Daemon::start(&name, cmd, &self.log_path());
        let ready = d.wait_ready("it was ready", START_TIMEOUT, || {
            let addr: std::net::SocketAddr = file_text(&addr_file)?.parse().ok()?;
            try_http_get(addr, "/v1/hello", &[]).is_ok_and(|r| r.status == 200).then_some(addr)
        });
        match ready {
            Ok(addr) => self.addr = Some(addr),
            Err(e) => panic!("{e}{}", log_tails(&[&d])),
        }
        self.daemon = Some(d);
    }

    /// `DATA_DIR.agent.log`.
    pub fn log_path(&self) -> PathBuf {
        PathBuf::from(format!("{}.agent.log", self.data_dir.display()))
    }

    /// Everything every start of this agent logged.
    pub fn log(&self) -> String {
        fs::read(self.log_path()).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("agent was started")
    }

    pub fn daemon_mut(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("agent was started")
    }

    /// The bound address.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr.expect("agent was started")
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `DATA_DIR/packages/PKG`.
    pub fn package_dir(&self, pkg: &str) -> PathBuf {
        self.data_dir.join("packages").join(pkg)
    }

    /// The live tree `DATA_DIR/packages/PKG/current`.
    pub fn current(&self, pkg: &str) -> PathBuf {
        self.package_dir(pkg).join("current")
    }

    /// `DATA_DIR/staging/PKG` (received chunks awaiting a commit).
    pub fn staging(&self, pkg: &str) -> PathBuf {
        self.data_dir.join("staging").join(pkg)
    }

    /// `DATA_DIR/library`.
    pub fn library(&self) -> PathBuf {
        self.data_dir.join("library")
    }

    /// Stops the agent if it runs (SIGTERM) and starts it again on the same address.
    pub fn restart(&mut self) {
        if let Some(d) = self.daemon.as_mut() {
            d.stop();
        }
        self.spawn_and_wait();
    }

    /// SIGKILL (and reap); [`Agent::restart`] starts it again.
    pub fn kill9(&mut self) {
        self.daemon_mut().kill9();
    }

    pub fn terminate(&mut self) -> ExitStatus {
        self.daemon_mut().stop()
    }

    /// `GET path` on the agent with extra request headers.
    pub fn get(&self, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
        http_get(self.addr(), path, headers)
    }

    /// `GET /v1/packages/PKG/files/REL` (REL is sent as given: encode it yourself).
    pub fn download(&self, pkg: &str, rel: &str) -> HttpResponse {
        self.get(&format!("/v1/packages/{pkg}/files/{rel}"), &[])
    }
}

/// Whether `dpsync agent` has `--insecure-http` (it serves TLS by default when it does).
fn agent_has_insecure_http() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| {
        let out = run_bounded(dpsync_command().args(["agent", "--help"]), CLI_TIMEOUT);
        String::from_utf8_lossy(&out.stdout).contains("--insecure-http")
    })
}

// ---------------------------------------------------------------------------------------
// Distribution status (`dpsync status PKG --json`)

impl Server {
    /// `status PKG --json`.
    pub fn status(&self, pkg: &str) -> Value {
        self.cli_json(&["status", pkg])
    }

    /// The entry of target `name` in `status PKG --json`.
    pub fn target_status(&self, pkg: &str, name: &str) -> Value {
        target_of(&self.status(pkg), name).clone()
    }

    /// Polls `status PKG --json` until `pred` holds (at most `timeout`); returns that
    /// status. On timeout panics naming `what`, with the last status and the logs of the
    /// server and of `daemons`.
    pub fn wait_status(
        &self,
        pkg: &str,
        what: &str,
        timeout: Duration,
        daemons: &[&Daemon],
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        let mut last = Value::Null;
        let found = poll_every(Duration::from_millis(50), timeout, || {
            last = self.status(pkg);
            pred(&last).then(|| last.clone())
        });
        found.unwrap_or_else(|| {
            let mut all = vec![self.daemon()];
            all.extend_from_slice(daemons);
            panic!("timed out after {timeout:?} waiting for {what}; last status:\n{last:#}{}", log_tails(&all));
        })
    }

    /// Waits until target `name` is `installed` with `version`; returns its status entry.
    pub fn wait_installed(&self, pkg: &str, name: &str, version: u64, timeout: Duration, daemons: &[&Daemon]) -> Value {
        let s = self.wait_status(pkg, &format!("{name} to install {pkg} version {version}"), timeout, daemons, |s| {
            let t = target_of(s, name);
            t["state"] == "installed" && t["installed_version"].as_u64() == Some(version)
        });
        target_of(&s, name).clone()
    }
}

/// The entry of target `name` in a `status --json` document; panics if absent.
pub fn target_of<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["targets"]
        .as_array()
        .unwrap_or_else(|| panic!("no targets array in {status:#}"))
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no target {name:?} in {status:#}"))
}

// ---------------------------------------------------------------------------------------
// Tree times

/// Modification times (ns since the epoch) of every file and folder under `root`
/// (relative path → ns); symlinks are left out.
pub fn tree_mtimes(root: &Path) -> BTreeMap<String, i128> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).follow_links(false) {
        let e = e.unwrap_or_else(|e| panic!("walk {}: {e}", root.display()));
        if e.file_type().is_symlink() {
            continue;
        }
        let md = e.metadata().expect("metadata");
        let ns = md.mtime() as i128 * 1_000_000_000 + md.mtime_nsec() as i128;
        let rel = e.path().strip_prefix(root).expect("under root").to_string_lossy().into_owned();
        out.insert(rel, ns);
    }
    out
}

/// [`assert_same_tree`], and the same modification time on every file and folder.
pub fn assert_same_tree_and_times(a: &Path, b: &Path) {
    assert_same_tree(a, b);
    let (ta, tb) = (tree_mtimes(a), tree_mtimes(b));
    let diff: Vec<String> = ta
        .iter()
        .filter(|(k, v)| tb.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}: mtime {v} vs {:?}", tb.get(k)))
        .collect();
    assert!(diff.is_empty(), "trees {} and {} differ in times:\n{}", a.display(), b.display(), diff.join("\n"));
}
