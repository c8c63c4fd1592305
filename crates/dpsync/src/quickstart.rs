//! `dpsync quickstart`: the main job on one machine with no set-up.
//!
//! In a fresh folder (a temporary one, or the empty one given with `--data-dir`) it
//! starts this same executable as a site server and two DP agents on loopback, set up as
//! in production: TLS with each DP's self-signed certificate pinned by fingerprint, a
//! random token per DP, and the site's signing key pinned on the DPs (`--trust`). It
//! writes a sample package, adds it and the DPs, distributes, refreshes and waits until
//! both DPs hold it; then changes about 1 % of the source, refreshes again, checks each
//! DP's live tree against the source byte for byte, refreshes once more with nothing
//! changed, stops everything, and says what to do next.
//!
//! The daemons are children owned by [`Daemon`] guards: whatever goes wrong (an error, a
//! panic, Ctrl-C), they are killed and reaped, and a temporary folder is removed unless
//! `--keep`. The admin calls go straight through [`AdminClient`], as the CLI's would.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::cli::enc;
use crate::util::human_bytes;
use dpsync_api::AdminClient;
use dpsync_api::{
    DistributeReport, DistributeRequest, PackageInfo, RefreshReport, RefreshRequest, SiteInfo, StatusReport, TargetInfo,
};
use dpsync_testkit::{Daemon, NotReady, Rng, Stop, file_text, random_bytes, text_bytes, try_tree_digest};
use dpsync_transfer::client::TargetClient;

/// Longest a daemon may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest a daemon may take to exit after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest one admin call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest the DPs may take to install a version.
const INSTALL_TIMEOUT_SECS: u64 = 60;
/// Log lines of each daemon shown when the run fails.
const LOG_TAIL_LINES: usize = 15;
/// Longest path of a Unix socket (`sun_path` holds 108 bytes with the final NUL).
const MAX_SOCKET_PATH: usize = 107;

const PACKAGE_NAME: &str = "quickstart-sample";
const DPS: [&str; 2] = ["dp1", "dp2"];
const SAMPLE_FILES: usize = 300;
const SAMPLE_BYTES: u64 = 40 << 20;
const SAMPLE_SEED: u64 = 0x0D95_1AC0_2026;
const EDIT_BYTES: usize = 4096;
const APPEND_BYTES: usize = 2048;
const NEW_FILE: &str = "bin/x64/hotfix-kb5001.dll";
const NEW_FILE_BYTES: u64 = 384 << 10;

/// Runs the quick start; `Err` carries the one-line reason (the daemons' logs have
/// already been shown on stderr).
///
/// `data_dir` is the global `--data-dir` as given on the command line: the quickstart
/// works in that folder (new or empty) and keeps it, instead of a temporary one.
/// `DPSYNC_DATA_DIR` is not passed: that variable points admin commands at a real
/// server, and the quickstart, like its daemons, takes no `DPSYNC_*` setting.
pub async fn run(keep: bool, data_dir: Option<PathBuf>, json: bool) -> Result<ExitCode> {
    let started = Instant::now();
    let say = Say { quiet: json };
    // Declared before the daemons: dropped after them, so they are stopped first.
    let mut work = match data_dir {
        Some(dir) => Workdir::chosen(dir)?,
        None => Workdir::temporary(keep)?,
    };
    let mut daemons: Vec<Daemon> = Vec::new();
    let mut summary = Summary { dir: work.path.display().to_string(), kept: work.keep, ..Summary::default() };
    let result = tokio::select! {
        r = main_job(&work.path, &mut daemons, &mut summary, say) => r.map_err(|e| (e, true)),
        _ = tokio::signal::ctrl_c() => Err((anyhow!("interrupted (Ctrl-C)"), false)),
    };
    if let Err((e, show_logs)) = result {
        fail(&mut work, daemons, show_logs);
        return Err(e.context("quickstart failed"));
    }

    say.line("");
    say.line("Stopping the site server and both DPs (SIGTERM)");
    for d in &mut daemons {
        let stop = d.terminate_async(STOP_TIMEOUT).await;
        if !stop.is_clean() {
            say.line(format!("  {} {stop}", d.name()));
        }
        summary.stopped.push(Stopped::new(d, stop));
    }
    drop(daemons);
    if work.keep {
        say_kept(&work.path, &summary.package, say);
    } else {
        summary.removed = work.remove();
        if !summary.removed {
            bail!("could not remove the temporary directory {}", work.path.display());
        }
        say.line(format!(
            "Removed {} (run `dpsync quickstart --keep` to keep it and look around).",
            work.path.display()
        ));
    }
    summary.ok = true;
    summary.duration_ms = started.elapsed().as_millis() as u64;
    say.line(format!("Done in {:.1} s.", started.elapsed().as_secs_f64()));
    say_next(say);
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(ExitCode::SUCCESS)
}

/// After a failure: kills the daemons, shows their logs' tails (unless interrupted), and
/// removes the folder unless it is kept.
fn fail(work: &mut Workdir, mut daemons: Vec<Daemon>, show_logs: bool) {
    for d in &mut daemons {
        d.kill();
        if show_logs {
            eprintln!("--- last {LOG_TAIL_LINES} lines of the {} log ({})", d.name(), d.log_path().display());
            eprintln!("{}", d.log_tail(LOG_TAIL_LINES));
        }
    }
    drop(daemons);
    if work.keep {
        eprintln!("quickstart: kept {} (data directories and logs)", work.path.display());
    } else {
        work.remove();
        eprintln!("quickstart: removed {} (pass --keep to keep it)", work.path.display());
    }
}

fn say_kept(dir: &Path, pkg: &str, say: Say) {
    let server = dir.join("server");
    say.line(format!("Kept {}:", dir.display()));
    say.line("  source/            the sample package's source folder");
    say.line("  server/            the site server's data directory (SQLite, content library)");
    say.line("  dp1/, dp2/         the DPs' data directories (packages/<id>/current is the live tree)");
    say.line("  *.log              each daemon's log");
    say.line(format!(
        "  Start the server again with `dpsync server --data-dir {}`, then `dpsync status {pkg} --data-dir {}`.",
        server.display(),
        server.display()
    ));
}

fn say_next(say: Say) {
    const STEPS: &[(&str, &str)] = &[
        ("dpsync server --data-dir /srv/dpsync --site-code PS1", ""),
        ("dpsync agent --data-dir /srv/dp --listen 0.0.0.0:8443 --token-file TOKEN", "on each DP"),
        ("export DPSYNC_DATA_DIR=/srv/dpsync", "where the CLI finds the server"),
        ("dpsync package add NAME SOURCE_DIR", "prints its id, e.g. PS100001"),
        ("dpsync dp add dp1 https://dp1:8443 --token-file TOKEN --fingerprint FP", "FP: /srv/dp/tls/fingerprint"),
        ("dpsync distribute PS100001 --dp dp1", ""),
        ("dpsync refresh PS100001 --wait", ""),
    ];
    say.line("");
    say.line("Next, with your own machines and packages (README.md, \"Using it\", has the details):");
    for (cmd, why) in STEPS {
        say.line(if why.is_empty() { format!("  {cmd}") } else { format!("  {cmd:<72} # {why}") });
    }
}

// ---------------------------------------------------------------------------------------
// The job

async fn main_job(dir: &Path, daemons: &mut Vec<Daemon>, s: &mut Summary, say: Say) -> Result<()> {
    say.line(format!("dpsync quickstart: a site server and two DPs on this machine, in {}", dir.display()));
    // The site server first: the DPs pin its signing key.
    let (client, site) = start_server(dir, daemons, say).await?;
    s.site_code = site.site_code.clone();
    let tokens = start_dps(dir, &site, daemons, s, say).await?;

    let sample = write_sample(dir, s, say).await?;
    let pkg = add_and_distribute(&client, dir, &tokens, s, say).await?;
    let step = run_step(&client, dir, &pkg, "initial", say).await?;
    say.line(format!(
        "  sent {} ({} of content; chunks are compressed where that helps)",
        sent_list(&step.targets),
        human_bytes(step.refresh.total_bytes)
    ));
    let first_sent: Vec<i64> = step.targets.iter().map(|t| t.bytes_sent_last).collect();
    s.steps.push(step);

    change_sample(dir, sample, s, say).await?;
    let step = run_step(&client, dir, &pkg, "change", say).await?;
    say.line(format!("  sent {}", sent_compared(&step.targets, &first_sent)));
    s.steps.push(step);

    say.line("");
    say.line("3. Refresh again with nothing changed");
    let step = run_step(&client, dir, &pkg, "no_change", say).await?;
    say.line(format!(
        "  read {} from the source, sent {} (the DPs only recorded the new version number)",
        human_bytes(step.refresh.bytes_hashed),
        sent_list(&step.targets)
    ));
    s.steps.push(step);
    Ok(())
}

/// Starts the site server and waits until it answers on its admin socket.
async fn start_server(dir: &Path, daemons: &mut Vec<Daemon>, say: Say) -> Result<(AdminClient, SiteInfo)> {
    let server_dir = dir.join("server");
    let socket = server_dir.join("admin.sock");
    let mut cmd = dpsync_command()?;
    cmd.arg("server").arg("--data-dir").arg(&server_dir).arg("--socket").arg(&socket);
    // A DP that refuses content fails within a second instead of after minutes.
    cmd.args(["--retries", "2", "--retry-delay-ms", "250"]);
    daemons.push(spawn("site server", cmd, &dir.join("server.log"))?);
    let client = AdminClient::new(socket.clone());
    let info = wait_for_server(daemons.last_mut().expect("just pushed"), &client).await?;
    say.line(format!("  site server {} is up (admin socket {})", info.site_code, socket.display()));
    Ok((client, info))
}

/// Starts both DPs at once: TLS with a self-signed certificate, a random token, and the
/// site's key pinned, so they install only what this site signed. Their tokens.
async fn start_dps(
    dir: &Path,
    site: &SiteInfo,
    daemons: &mut Vec<Daemon>,
    s: &mut Summary,
    say: Say,
) -> Result<Vec<String>> {
    let mut tokens = Vec::new();
    for name in DPS {
        let token = format!("{:032x}", rand::random::<u128>());
        let mut cmd = dpsync_command()?;
        cmd.arg("agent").arg("--data-dir").arg(dir.join(name));
        cmd.args(["--listen", "127.0.0.1:0", "--token", &token]);
        cmd.arg("--trust").arg(format!("{}={}", site.site_code, site.site_key));
        daemons.push(spawn(name, cmd, &dir.join(format!("{name}.log")))?);
        tokens.push(token);
    }
    let agents = daemons.len() - DPS.len();
    for (i, name) in DPS.iter().enumerate() {
        let data_dir = dir.join(name);
        let (url, fingerprint) = wait_for_agent(&mut daemons[agents + i], &data_dir, &tokens[i]).await?;
        say.line(format!("  {name} is up at {url} (data directory {})", data_dir.display()));
        s.dps.push(DpInfo { name: name.to_string(), url, fingerprint, data_dir: data_dir.display().to_string() });
    }
    Ok(tokens)
}

/// Writes the sample package's source (off the executor).
async fn write_sample(dir: &Path, s: &mut Summary, say: Say) -> Result<Sample> {
    let src = dir.join("source");
    let root = src.clone();
    let sample = tokio::task::spawn_blocking(move || Sample::generate(&root))
        .await
        .context("sample task")?
        .context("cannot write the sample package")?;
    s.sample = sample.info();
    say.line("");
    say.line(format!(
        "1. A sample package: {} files in {} folders, {} ({})",
        s.sample.files,
        s.sample.dirs,
        human_bytes(s.sample.bytes),
        src.display()
    ));
    Ok(sample)
}

/// `package add`, `dp add` for both DPs (token and fingerprint pinned), `distribute`;
/// the package id.
async fn add_and_distribute(
    client: &AdminClient,
    dir: &Path,
    tokens: &[String],
    s: &mut Summary,
    say: Say,
) -> Result<String> {
    let src = dir.join("source");
    let add = serde_json::json!({ "name": PACKAGE_NAME, "source": src.display().to_string() });
    let p: PackageInfo = call("package add", client.post("/v1/packages", &add)).await?;
    say.line(format!("  package add {PACKAGE_NAME} {}  → {}", src.display(), p.id));
    s.package = p.id.clone();
    for (dp, token) in s.dps.iter().zip(tokens) {
        // JSON rather than `AddTarget`, so new optional fields keep their defaults.
        let req = serde_json::json!({
            "name": dp.name, "kind": "dp", "url": dp.url, "token": token, "fingerprint": dp.fingerprint,
        });
        let _: TargetInfo = call("dp add", client.post("/v1/targets", &req)).await?;
        say.line(format!("  dp add {} {} --token … --fingerprint {}…", dp.name, dp.url, &dp.fingerprint[..16]));
    }
    let req = DistributeRequest { dps: DPS.iter().map(|d| d.to_string()).collect(), ..Default::default() };
    let d: DistributeReport =
        call("distribute", client.post(&format!("/v1/packages/{}/distribute", enc(&p.id)), &req)).await?;
    say.line(format!("  distribute {} --dp dp1 --dp dp2  → {}", p.id, d.targets.join(", ")));
    Ok(p.id)
}

/// Changes about 1 % of the sample (off the executor) and says what changed.
async fn change_sample(dir: &Path, mut sample: Sample, s: &mut Summary, say: Say) -> Result<()> {
    let src = dir.join("source");
    let (sample, change) = tokio::task::spawn_blocking(move || sample.change(&src).map(|c| (sample, c)))
        .await
        .context("change task")?
        .context("cannot change the sample package")?;
    say.line("");
    say.line(format!(
        "2. Change about 1 %: append {} to {} files, rewrite {} in the middle of {} ({}), add {} ({}), delete {}",
        human_bytes(APPEND_BYTES as u64),
        change.appended.len(),
        human_bytes(EDIT_BYTES as u64),
        change.edited,
        human_bytes(change.edited_size),
        change.added,
        human_bytes(NEW_FILE_BYTES),
        change.removed
    ));
    say.line(format!(
        "  {} of {} changed ({:.2} %)",
        human_bytes(change.bytes_changed),
        human_bytes(sample.total_bytes()),
        change.bytes_changed as f64 * 100.0 / sample.total_bytes() as f64
    ));
    s.change = change;
    Ok(())
}

/// Refreshes, waits until both DPs hold the new version, shows the status, and checks
/// each DP's live tree against the source.
async fn run_step(client: &AdminClient, dir: &Path, pkg: &str, name: &'static str, say: Say) -> Result<Step> {
    // Files written less than 50 ms before a scan are read again by the next refresh
    // (the scan cache's racy window): let the clock move past the last write.
    tokio::time::sleep(Duration::from_millis(120)).await;
    let r: RefreshReport =
        call("refresh", client.post(&format!("/v1/packages/{}/refresh", enc(pkg)), &RefreshRequest::default())).await?;
    say_refresh(pkg, &r, say);
    let waited = Instant::now();
    let status = wait_installed(client, pkg, r.source_version).await?;
    let wait_ms = waited.elapsed().as_millis() as u64;
    let targets: Vec<TargetSummary> = status.targets.iter().map(TargetSummary::from).collect();
    let installed = targets.iter().filter(|t| t.state == "installed" && t.installed_version == Some(r.source_version));
    if installed.count() != DPS.len() {
        bail!("after the wait, not both DPs hold version {}: {}", r.source_version, serde_json::to_string(&targets)?);
    }
    say.line(format!(
        "  both DPs installed version {} in {:.2} s; `dpsync status {pkg}`:",
        r.source_version,
        wait_ms as f64 / 1000.0
    ));
    if !say.quiet {
        crate::wait::print_status(&status);
    }
    let verified = verify_dps(dir, pkg).await?;
    say.line(format!(
        "  dp1 and dp2: packages/{pkg}/current/ matches the source byte for byte ({} files, {})",
        verified[0].files,
        human_bytes(verified[0].bytes)
    ));
    Ok(Step { name, refresh: r, wait_ms, targets, status, verified })
}

fn say_refresh(pkg: &str, r: &RefreshReport, say: Say) {
    say.line(format!(
        "  refresh {pkg}  → source version {}{}",
        r.source_version,
        if r.content_changed { "" } else { " (content unchanged)" }
    ));
    say.line(format!(
        "    files: {} added, {} changed, {} removed, {} unchanged; read {} in {} files; {} ms",
        r.files_added,
        r.files_changed,
        r.files_removed,
        r.files_unchanged,
        human_bytes(r.bytes_hashed),
        r.files_read,
        r.duration_ms
    ));
    say.flush();
}

/// Follows the distribution of `version` until both DPs hold it; the last status.
async fn wait_installed(client: &AdminClient, pkg: &str, version: i64) -> Result<StatusReport> {
    let wait = crate::wait::wait(client, pkg, version, Some(INSTALL_TIMEOUT_SECS), true);
    let outcome = tokio::time::timeout(Duration::from_secs(INSTALL_TIMEOUT_SECS + 10), wait)
        .await
        .map_err(|_| anyhow!("the site server stopped answering while the DPs installed version {version}"))?
        .context("following the distribution")?;
    if !outcome.failed.is_empty() {
        bail!("distribution of {pkg} version {version} failed: {}", outcome.failed.join("; "));
    }
    if outcome.timed_out {
        bail!("the DPs did not install {pkg} version {version} within {INSTALL_TIMEOUT_SECS} s");
    }
    Ok(outcome.status)
}

/// Compares each DP's live tree of `pkg` with the source (off the executor).
async fn verify_dps(dir: &Path, pkg: &str) -> Result<Vec<Verified>> {
    let mut verified = Vec::new();
    for dp in DPS {
        let live = dir.join(dp).join("packages").join(pkg).join("current");
        let src = dir.join("source");
        let (files, dirs, bytes) = tokio::task::spawn_blocking(move || compare_trees(&src, &live))
            .await
            .context("verify task")?
            .with_context(|| format!("{dp}'s live tree of {pkg} does not match the source"))?;
        verified.push(Verified { dp: dp.to_owned(), files, dirs, bytes });
    }
    Ok(verified)
}

fn sent_list(targets: &[TargetSummary]) -> String {
    targets
        .iter()
        .map(|t| format!("{} to {}", human_bytes(t.bytes_sent_last.max(0) as u64), t.name))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What each target was sent, against its first push.
fn sent_compared(targets: &[TargetSummary], first_sent: &[i64]) -> String {
    targets
        .iter()
        .zip(first_sent)
        .map(|(t, first)| {
            let pct = t.bytes_sent_last as f64 * 100.0 / (*first).max(1) as f64;
            format!("{} to {} ({pct:.1} % of its first push)", human_bytes(t.bytes_sent_last.max(0) as u64), t.name)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// An admin call with a bound and a name in its error.
async fn call<T, E>(what: &str, fut: impl std::future::Future<Output = Result<T, E>>) -> Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(r) => r.with_context(|| format!("`{what}`")),
        Err(_) => bail!("`{what}`: the site server did not answer within {} s", CALL_TIMEOUT.as_secs()),
    }
}

// ---------------------------------------------------------------------------------------
// Daemons

/// This executable, with no `DPSYNC_*` setting inherited but `DPSYNC_LOG`: an
/// administrator's settings (database URL, socket, …) must not leak into the demo.
fn dpsync_command() -> Result<Command> {
    let exe = std::env::current_exe().context("cannot find the dpsync executable")?;
    let mut cmd = Command::new(exe);
    for (k, _) in std::env::vars_os() {
        let key = k.to_string_lossy();
        if key.starts_with("DPSYNC_") && key != "DPSYNC_LOG" {
            cmd.env_remove(&k);
        }
    }
    Ok(cmd)
}

fn spawn(name: &str, cmd: Command, log: &Path) -> Result<Daemon> {
    Ok(Daemon::spawn(name, cmd, log)?)
}

/// A failed start-up wait as a one-line error: with the log's last line if it exited.
fn not_ready(d: &Daemon, e: NotReady) -> anyhow::Error {
    match e.exited {
        Some(_) => anyhow!("{e}: {}", d.last_line()),
        None => anyhow!("{e}"),
    }
}

async fn wait_for_server(d: &mut Daemon, client: &AdminClient) -> Result<SiteInfo> {
    let probe = || async {
        if !client.socket().exists() {
            return None;
        }
        tokio::time::timeout(Duration::from_secs(2), client.get::<SiteInfo>("/v1/site")).await.ok()?.ok()
    };
    let what = format!("it answered on {}", client.socket().display());
    match d.wait_ready_async(&what, START_TIMEOUT, probe).await {
        Ok(info) => Ok(info),
        Err(e) => Err(not_ready(d, e)),
    }
}

/// Waits for `DATA_DIR/listen.addr` and `DATA_DIR/tls/fingerprint`, then for the agent
/// to answer `hello` over TLS with that certificate pinned; its URL and fingerprint.
async fn wait_for_agent(d: &mut Daemon, data_dir: &Path, token: &str) -> Result<(String, String)> {
    let name = d.name().to_owned();
    let addr_file = data_dir.join("listen.addr");
    let fp_file = data_dir.join("tls").join("fingerprint");
    let probe = || async {
        let url = format!("https://{}", file_text(&addr_file)?);
        let fp = file_text(&fp_file)?;
        let client = match TargetClient::new(&name, &url, Some(token.to_owned()), Some(&fp)) {
            Ok(c) => c,
            Err(e) => return Some(Err(anyhow!("{name}: {e}"))),
        };
        let hello = tokio::time::timeout(Duration::from_secs(2), client.hello()).await.ok()?.ok()?;
        if hello.role != "dp" {
            return Some(Err(anyhow!("{name} at {url} answered as a {:?}, not a DP", hello.role)));
        }
        Some(Ok((url, fp)))
    };
    match d.wait_ready_async("it answered over TLS", START_TIMEOUT, probe).await {
        Ok(ready) => ready,
        Err(e) => Err(not_ready(d, e)),
    }
}

// ---------------------------------------------------------------------------------------
// Output

#[derive(Debug, Clone, Copy)]
struct Say {
    quiet: bool,
}

impl Say {
    fn line(&self, s: impl AsRef<str>) {
        if !self.quiet {
            println!("{}", s.as_ref());
        }
    }
    fn flush(&self) {
        let _ = std::io::stdout().flush();
    }
}

/// The `--json` document.
#[derive(Debug, Default, Serialize)]
struct Summary {
    ok: bool,
    /// The folder it worked in (temporary, or `--data-dir`).
    dir: String,
    kept: bool,
    removed: bool,
    site_code: String,
    package: String,
    dps: Vec<DpInfo>,
    sample: SampleInfo,
    change: Change,
    /// `initial`, `change`, `no_change`.
    steps: Vec<Step>,
    stopped: Vec<Stopped>,
    duration_ms: u64,
}

#[derive(Debug, Default, Serialize)]
struct DpInfo {
    name: String,
    url: String,
    /// SHA-256 of its TLS certificate, pinned by the site.
    fingerprint: String,
    data_dir: String,
}

#[derive(Debug, Default, Serialize)]
struct SampleInfo {
    files: u64,
    dirs: u64,
    bytes: u64,
}

#[derive(Debug, Serialize)]
struct Step {
    name: &'static str,
    refresh: RefreshReport,
    /// From the refresh's answer until both DPs held the version.
    wait_ms: u64,
    targets: Vec<TargetSummary>,
    status: StatusReport,
    /// Each DP's live tree, compared with the source.
    verified: Vec<Verified>,
}

#[derive(Debug, Serialize)]
struct TargetSummary {
    name: String,
    state: String,
    installed_version: Option<i64>,
    bytes_sent_last: i64,
    bytes_sent_total: i64,
}

impl From<&dpsync_api::TargetStatus> for TargetSummary {
    fn from(t: &dpsync_api::TargetStatus) -> Self {
        Self {
            name: t.name.clone(),
            state: t.state.to_string(),
            installed_version: t.installed_version,
            bytes_sent_last: t.bytes_sent_last,
            bytes_sent_total: t.bytes_sent_total,
        }
    }
}

#[derive(Debug, Serialize)]
struct Verified {
    dp: String,
    files: u64,
    dirs: u64,
    bytes: u64,
}

#[derive(Debug, Default, Serialize)]
struct Change {
    appended: Vec<String>,
    edited: String,
    edited_size: u64,
    edit_offset: u64,
    added: String,
    removed: String,
    /// Bytes appended, rewritten and added (the deleted file not counted).
    bytes_changed: u64,
}

#[derive(Debug, Serialize)]
struct Stopped {
    name: String,
    /// Exited cleanly after SIGTERM.
    clean: bool,
    how: String,
}

impl Stopped {
    fn new(d: &Daemon, stop: Stop) -> Self {
        Self { name: d.name().to_owned(), clean: stop.is_clean(), how: stop.to_string() }
    }
}

// ---------------------------------------------------------------------------------------
// The folder

#[derive(Debug)]
struct Workdir {
    path: PathBuf,
    /// Kept at the end: `--keep`, or a folder the user chose.
    keep: bool,
    removed: bool,
}

impl Workdir {
    /// A new folder `dpsync-quickstart-XXXXXXXX` in the temporary directory.
    fn temporary(keep: bool) -> Result<Self> {
        let mut base = std::env::temp_dir();
        // A Unix socket path is limited to 107 bytes; the admin socket is `<dir>/server/admin.sock`.
        if base.as_os_str().len() > 60 {
            base = PathBuf::from("/tmp");
        }
        let path = base.join(format!("dpsync-quickstart-{:08x}", rand::random::<u32>()));
        fs::create_dir(&path).with_context(|| format!("cannot create a temporary directory {}", path.display()))?;
        Self::private(&path)?;
        Ok(Self { path, keep, removed: false })
    }

    /// The folder given with `--data-dir`: created if missing, refused unless empty (the
    /// quickstart lays out a source, a server and two DPs there), and kept at the end.
    fn chosen(dir: PathBuf) -> Result<Self> {
        let path = std::path::absolute(&dir).with_context(|| format!("invalid --data-dir {}", dir.display()))?;
        let socket = path.join("server").join("admin.sock");
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            bail!(
                "--data-dir {} is too long: the server's admin socket {} would exceed {MAX_SOCKET_PATH} bytes; \
                 choose a shorter path",
                path.display(),
                socket.display()
            );
        }
        match fs::read_dir(&path) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    bail!(
                        "--data-dir {} is not empty: the quickstart needs a new or empty folder \
                         (or leave out --data-dir to work in a temporary one)",
                        path.display()
                    );
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(&path).with_context(|| format!("cannot create {}", path.display()))?;
            }
            Err(e) => return Err(e).with_context(|| format!("--data-dir {} is not a usable folder", path.display())),
        }
        Self::private(&path)?;
        Ok(Self { path, keep: true, removed: false })
    }

    /// Tokens and keys go under it: only the owner may look.
    fn private(path: &Path) -> Result<()> {
        fs::set_permissions(path, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the mode of {}", path.display()))
    }

    /// Removes the folder; whether it is gone.
    fn remove(&mut self) -> bool {
        if !self.removed {
            let _ = fs::remove_dir_all(&self.path);
            self.removed = !self.path.exists();
        }
        self.removed
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if !self.keep {
            self.remove();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The sample package

/// Folders of the sample package, parents first.
const FOLDERS: &[&str] = &[
    "bin",
    "bin/arm64",
    "bin/x64",
    "bin/x86",
    "config",
    "config/locales",
    "data",
    "data/cab",
    "data/fonts",
    "data/images",
    "data/images/icons",
    "docs",
    "docs/de-DE",
    "docs/en-US",
    "docs/fr-FR",
    "docs/ja-JP",
    "lib",
    "lib/net8.0",
    "lib/net8.0/runtimes",
    "lib/net8.0/runtimes/win-x64",
    "lib/net8.0/runtimes/win-x64/native",
    "logs",
    "redist",
    "redist/vc",
    "scripts",
    "scripts/install",
    "scripts/uninstall",
    "tools",
    "tools/diagnostics",
];

/// The few big files, besides the largest (`data/cab/payload.cab`).
const BIG_FILES: &[(&str, u64)] = &[
    ("redist/vc/vc_redist.x64.msi", 3 << 20),
    ("redist/vc/vc_redist.x86.msi", (5 << 20) / 2),
    ("bin/x64/engine.dll", 2 << 20),
    ("data/fonts/NotoSans-Regular.ttf", (3 << 20) / 2),
];
const LARGEST: &str = "data/cab/payload.cab";

#[derive(Debug, Clone)]
struct SampleFile {
    size: u64,
    text: bool,
}

impl SampleFile {
    /// Its bytes: word salad for text (compressible), a BLAKE3 stream otherwise.
    fn content(&self, seed: u64) -> Vec<u8> {
        if self.text {
            text_bytes(&mut Rng::new(seed), self.size as usize)
        } else {
            random_bytes(self.size as usize, seed)
        }
    }
}

#[derive(Debug)]
struct Sample {
    files: BTreeMap<String, SampleFile>,
}

impl Sample {
    /// Writes the sample tree under `root`: [`SAMPLE_FILES`] files in nested folders,
    /// [`SAMPLE_BYTES`] in all; text files (compressible) and binaries (not). Same
    /// seed, same bytes.
    fn generate(root: &Path) -> Result<Self> {
        let files = Self::plan(&mut Rng::new(SAMPLE_SEED));
        fs::create_dir_all(root)?;
        for d in FOLDERS {
            fs::create_dir_all(root.join(d))?;
        }
        for (n, (path, f)) in files.iter().enumerate() {
            let p = root.join(path);
            fs::write(&p, f.content(SAMPLE_SEED.wrapping_add(n as u64 * 7919)))
                .with_context(|| format!("cannot write {}", p.display()))?;
            if path.ends_with(".sh") {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
            }
        }
        Ok(Self { files })
    }

    /// The files' paths, sizes and kinds: the big ones, then files named after their
    /// folder's role with log-uniform sizes (256 B … 192 KiB), then the largest, which
    /// makes up the total.
    fn plan(rng: &mut Rng) -> BTreeMap<String, SampleFile> {
        let mut files: BTreeMap<String, SampleFile> =
            BIG_FILES.iter().map(|(path, size)| (path.to_string(), SampleFile { size: *size, text: false })).collect();
        let mut i = 0;
        while files.len() < SAMPLE_FILES - 1 {
            i += 1;
            let folder = *rng.pick(FOLDERS);
            if folder == "logs" {
                continue; // stays an empty folder
            }
            let (stem, exts, text) = file_kind(folder);
            let ext = *rng.pick(exts);
            let size = (256f64 * (768f64).powf(rng.unit())) as u64;
            files.insert(format!("{folder}/{stem}-{i:03}.{ext}"), SampleFile { size, text: text || ext == "txt" });
        }
        let others: u64 = files.values().map(|f| f.size).sum();
        let largest = SAMPLE_BYTES.saturating_sub(others).max(8 << 20);
        files.insert(LARGEST.to_owned(), SampleFile { size: largest, text: false });
        files
    }

    fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }

    fn info(&self) -> SampleInfo {
        SampleInfo { files: self.files.len() as u64, dirs: FOLDERS.len() as u64, bytes: self.total_bytes() }
    }

    /// About 1 %: appends to three text files, rewrites 4 KiB in the middle of the
    /// largest file, adds one file and deletes another.
    fn change(&mut self, root: &Path) -> Result<Change> {
        let mut c = Change::default();
        let mut rng = Rng::new(SAMPLE_SEED ^ 0xC4A6E);
        let appended: Vec<String> =
            self.files.iter().filter(|(_, f)| f.text && f.size >= 4096).take(3).map(|(p, _)| p.clone()).collect();
        for path in appended {
            let mut f = fs::OpenOptions::new().append(true).open(root.join(&path))?;
            f.write_all(&text_bytes(&mut rng, APPEND_BYTES))?;
            self.files.get_mut(&path).expect("listed").size += APPEND_BYTES as u64;
            c.bytes_changed += APPEND_BYTES as u64;
            c.appended.push(path);
        }

        let size = self.files[LARGEST].size;
        let offset = (size / 2) & !4095;
        invert(&root.join(LARGEST), offset, EDIT_BYTES)?;
        c.edited = LARGEST.into();
        c.edited_size = size;
        c.edit_offset = offset;
        c.bytes_changed += EDIT_BYTES as u64;

        let added = SampleFile { size: NEW_FILE_BYTES, text: false };
        fs::write(root.join(NEW_FILE), added.content(SAMPLE_SEED ^ 0xADD))?;
        self.files.insert(NEW_FILE.into(), added);
        c.added = NEW_FILE.into();
        c.bytes_changed += NEW_FILE_BYTES;

        let removed = self
            .files
            .iter()
            .find(|(p, f)| p.starts_with("tools/") && !f.text && f.size > 0)
            .or_else(|| self.files.iter().find(|(p, _)| p.as_str() != LARGEST && p.as_str() != NEW_FILE))
            .map(|(p, _)| p.clone())
            .context("no file to delete")?;
        fs::remove_file(root.join(&removed))?;
        self.files.remove(&removed);
        c.removed = removed;
        Ok(c)
    }
}

/// File name stem, extensions and whether it is text, by the folder's role.
fn file_kind(folder: &str) -> (&'static str, &'static [&'static str], bool) {
    match folder.split('/').next().unwrap_or("") {
        "bin" | "lib" => ("module", &["dll", "exe", "dll", "pdb"], false),
        "config" => ("settings", &["xml", "json", "ini"], true),
        "docs" => ("guide", &["txt", "html", "md"], true),
        "scripts" => ("step", &["ps1", "cmd", "sh"], true),
        "data" => match folder {
            "data/images" | "data/images/icons" => ("image", &["png", "ico"], false),
            "data/fonts" => ("font", &["ttf"], false),
            _ => ("archive", &["cab", "bin"], false),
        },
        "redist" => ("redist", &["msi", "cab"], false),
        _ => ("tool", &["exe", "txt"], false),
    }
}

/// Inverts `len` bytes of a file at `offset`, in place.
fn invert(path: &Path, offset: u64, len: usize) -> Result<()> {
    let mut f = fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut bytes = vec![0u8; len];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut bytes)?;
    bytes.iter_mut().for_each(|b| *b = !*b);
    f.seek(SeekFrom::Start(offset))?;
    f.write_all(&bytes)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Verification

/// Compares two trees (the second may be a DP's `current` link): same paths, kinds,
/// modes and file bytes. (files, folders, bytes).
fn compare_trees(src: &Path, live: &Path) -> Result<(u64, u64, u64)> {
    let a = try_tree_digest(src).with_context(|| format!("cannot read {}", src.display()))?;
    let b = try_tree_digest(live).with_context(|| format!("cannot read {}", live.display()))?;
    let mut diffs = a.differences(&b);
    if !diffs.is_empty() {
        let n = diffs.len();
        diffs.truncate(5);
        bail!("{n} differences (source vs DP), e.g. {}", diffs.join("; "));
    }
    Ok(a.totals())
}
