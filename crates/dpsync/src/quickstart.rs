//! `dpsync quickstart`: the main job on one machine with no set-up.
//!
//! In a fresh temporary directory it starts this same executable as a site server and
//! two DP agents on loopback, set up as in production: TLS with each DP's self-signed
//! certificate pinned by fingerprint, a random token per DP, and the site's signing key
//! pinned on the DPs (`--trust`). It writes a sample package, adds it and the DPs,
//! distributes, refreshes and waits until both DPs hold it; then changes
//! about 1 % of the source, refreshes again, checks each DP's live tree against the
//! source byte for byte, refreshes once more with nothing changed, and stops everything.
//!
//! The daemons are children owned by [`Daemon`] guards: whatever goes wrong (an error, a
//! panic, Ctrl-C), they are killed and reaped, and the directory is removed unless
//! `--keep`. The admin calls go straight through [`AdminClient`], as the CLI's would.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::Serialize;

use crate::cli::enc;
use crate::util::human_bytes;
use dpsync_api::AdminClient;
use dpsync_api::{
    DistributeReport, DistributeRequest, PackageInfo, RefreshReport, RefreshRequest, SiteInfo, StatusReport, TargetInfo,
};
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
pub async fn run(keep: bool, json: bool) -> Result<ExitCode> {
    let started = Instant::now();
    let say = Say { quiet: json };
    // Declared before the daemons: dropped after them, so they are stopped first.
    let mut work = Workdir::create(keep)?;
    let mut daemons: Vec<Daemon> = Vec::new();
    let mut summary = Summary { dir: work.path.display().to_string(), kept: keep, ..Summary::default() };
    let result = tokio::select! {
        r = main_job(&work.path, &mut daemons, &mut summary, say) => r.map_err(|e| (e, true)),
        _ = tokio::signal::ctrl_c() => Err((anyhow!("interrupted (Ctrl-C)"), false)),
    };
    if let Err((e, show_logs)) = result {
        for d in &mut daemons {
            d.kill();
            if show_logs {
                eprintln!("--- last {LOG_TAIL_LINES} lines of the {} log ({})", d.name, d.log.display());
                eprintln!("{}", d.log_tail(LOG_TAIL_LINES));
            }
        }
        drop(daemons);
        if keep {
            eprintln!("quickstart: kept {} (data directories and logs)", work.path.display());
        } else {
            work.remove();
            eprintln!("quickstart: removed {} (pass --keep to keep it)", work.path.display());
        }
        return Err(e.context("quickstart failed"));
    }

    say.line("");
    say.line("Stopping the site server and both DPs (SIGTERM)");
    for d in &mut daemons {
        let stop = d.terminate().await;
        if !stop.clean {
            say.line(format!("  {} {}", d.name, stop.how));
        }
        summary.stopped.push(stop);
    }
    drop(daemons);
    if keep {
        say.line(format!("Kept {}:", work.path.display()));
        say.line("  source/            the sample package's source folder");
        say.line("  server/            the site server's data directory (SQLite, content library)");
        say.line("  dp1/, dp2/         the DPs' data directories (packages/<id>/current is the live tree)");
        say.line("  *.log              each daemon's log");
        say.line(format!(
            "  Start the server again with `dpsync server --data-dir {}`, then `dpsync status --data-dir {}`.",
            work.path.join("server").display(),
            work.path.join("server").display()
        ));
    } else {
        summary.removed = work.remove();
        if !summary.removed {
            bail!("could not remove the temporary directory {}", work.path.display());
        }
        say.line(format!("Removed {}", work.path.display()));
    }
    summary.ok = true;
    summary.duration_ms = started.elapsed().as_millis() as u64;
    say.line(format!("Done in {:.1} s.", started.elapsed().as_secs_f64()));
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    Ok(ExitCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------
// The job

async fn main_job(dir: &Path, daemons: &mut Vec<Daemon>, s: &mut Summary, say: Say) -> Result<()> {
    say.line(format!("dpsync quickstart: a site server and two DPs on this machine, in {}", dir.display()));

    // The site server first: the DPs pin its signing key.
    let server_dir = dir.join("server");
    let socket = server_dir.join("admin.sock");
    daemons.push(Daemon::spawn(
        "site server",
        vec![
            "server".into(),
            "--data-dir".into(),
            server_dir.clone().into(),
            "--socket".into(),
            socket.clone().into(),
            // A DP that refuses content fails within a second instead of after minutes.
            "--retries".into(),
            "2".into(),
            "--retry-delay-ms".into(),
            "250".into(),
        ],
        &dir.join("server.log"),
    )?);
    let client = AdminClient::new(socket.clone());
    let info = wait_for_server(&mut daemons[0], &client).await?;
    say.line(format!("  site server {} is up (admin socket {})", info.site_code, socket.display()));
    s.site_code = info.site_code.clone();

    // Both DPs at once: TLS with a self-signed certificate, a random token, and the
    // site's key pinned, so they install only what this site signed.
    let mut tokens = Vec::new();
    for name in DPS {
        let token = format!("{:032x}", rand::random::<u128>());
        daemons.push(Daemon::spawn(
            name,
            vec![
                "agent".into(),
                "--data-dir".into(),
                dir.join(name).into(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--token".into(),
                token.clone().into(),
                "--trust".into(),
                format!("{}={}", info.site_code, info.site_key).into(),
            ],
            &dir.join(format!("{name}.log")),
        )?);
        tokens.push(token);
    }
    for (i, name) in DPS.iter().enumerate() {
        let data_dir = dir.join(name);
        let (url, fingerprint) = wait_for_agent(&mut daemons[i + 1], &data_dir, &tokens[i]).await?;
        say.line(format!("  {name} is up at {url} (data directory {})", data_dir.display()));
        s.dps.push(DpInfo { name: name.to_string(), url, fingerprint, data_dir: data_dir.display().to_string() });
    }

    // A sample package.
    let src = dir.join("source");
    let src2 = src.clone();
    let mut sample = tokio::task::spawn_blocking(move || Sample::generate(&src2))
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
    let add = serde_json::json!({ "name": PACKAGE_NAME, "source": src.display().to_string() });
    let p: PackageInfo = call("package add", client.post("/v1/packages", &add)).await?;
    say.line(format!("  package add {PACKAGE_NAME} {}  → {}", src.display(), p.id));
    s.package = p.id.clone();
    for (dp, token) in s.dps.iter().zip(&tokens) {
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
    let step = run_step(&client, dir, &p.id, "initial", say).await?;
    let first_sent: Vec<i64> = step.targets.iter().map(|t| t.bytes_sent_last).collect();
    say.line(format!(
        "  sent {} ({} of content; chunks are compressed where that helps)",
        sent_list(&step.targets),
        human_bytes(step.refresh.total_bytes)
    ));
    s.steps.push(step);

    // Change about 1 %.
    let src2 = src.clone();
    let (sample2, change) = tokio::task::spawn_blocking(move || {
        let c = sample.change(&src2);
        c.map(|c| (sample, c))
    })
    .await
    .context("change task")?
    .context("cannot change the sample package")?;
    sample = sample2;
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
    let step = run_step(&client, dir, &p.id, "change", say).await?;
    let sent: Vec<String> = step
        .targets
        .iter()
        .zip(&first_sent)
        .map(|(t, first)| {
            let pct = t.bytes_sent_last as f64 * 100.0 / (*first).max(1) as f64;
            format!("{} to {} ({pct:.1} % of its first push)", human_bytes(t.bytes_sent_last.max(0) as u64), t.name)
        })
        .collect();
    say.line(format!("  sent {}", sent.join(", ")));
    s.steps.push(step);

    // Nothing changed.
    say.line("");
    say.line("3. Refresh again with nothing changed");
    let step = run_step(&client, dir, &p.id, "no_change", say).await?;
    say.line(format!(
        "  read {} from the source, sent {} (the DPs only recorded the new version number)",
        human_bytes(step.refresh.bytes_hashed),
        sent_list(&step.targets)
    ));
    s.steps.push(step);
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
    let waited = Instant::now();
    let wait = crate::wait::wait(client, pkg, r.source_version, Some(INSTALL_TIMEOUT_SECS), true);
    let outcome = tokio::time::timeout(Duration::from_secs(INSTALL_TIMEOUT_SECS + 10), wait)
        .await
        .map_err(|_| anyhow!("the site server stopped answering while the DPs installed version {}", r.source_version))?
        .context("following the distribution")?;
    if !outcome.failed.is_empty() {
        bail!("distribution of {pkg} version {} failed: {}", r.source_version, outcome.failed.join("; "));
    }
    if outcome.timed_out {
        bail!("the DPs did not install {pkg} version {} within {INSTALL_TIMEOUT_SECS} s", r.source_version);
    }
    let wait_ms = waited.elapsed().as_millis() as u64;
    let status = outcome.status;
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
    let mut verified = Vec::new();
    for dp in DPS {
        let live = dir.join(dp).join("packages").join(pkg).join("current");
        let src = dir.join("source");
        let v = tokio::task::spawn_blocking(move || compare_trees(&src, &live))
            .await
            .context("verify task")?
            .with_context(|| format!("{dp}'s live tree of {pkg} does not match the source"))?;
        verified.push(Verified { dp: dp.to_owned(), files: v.0, dirs: v.1, bytes: v.2 });
    }
    say.line(format!(
        "  dp1 and dp2: packages/{pkg}/current/ matches the source byte for byte ({} files, {})",
        verified[0].files,
        human_bytes(verified[0].bytes)
    ));
    Ok(Step { name, refresh: r, wait_ms, targets, status, verified })
}

fn sent_list(targets: &[TargetSummary]) -> String {
    targets
        .iter()
        .map(|t| format!("{} to {}", human_bytes(t.bytes_sent_last.max(0) as u64), t.name))
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

async fn wait_for_server(d: &mut Daemon, client: &AdminClient) -> Result<SiteInfo> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Some(status) = d.exited() {
            bail!("the site server exited during start-up ({status}): {}", d.last_line());
        }
        if client.socket().exists()
            && let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(2), client.get::<SiteInfo>("/v1/site")).await
        {
            return Ok(info);
        }
        if Instant::now() >= deadline {
            bail!(
                "the site server did not answer on {} within {} s",
                client.socket().display(),
                START_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits for `DATA_DIR/listen.addr` and `DATA_DIR/tls/fingerprint`, then for the agent
/// to answer `hello` over TLS with that certificate pinned; its URL and fingerprint.
async fn wait_for_agent(d: &mut Daemon, data_dir: &Path, token: &str) -> Result<(String, String)> {
    let deadline = Instant::now() + START_TIMEOUT;
    let addr_file = data_dir.join("listen.addr");
    let fp_file = data_dir.join("tls").join("fingerprint");
    loop {
        if let Some(status) = d.exited() {
            bail!("{} exited during start-up ({status}): {}", d.name, d.last_line());
        }
        if let (Ok(addr), Ok(fp)) = (fs::read_to_string(&addr_file), fs::read_to_string(&fp_file))
            && !addr.trim().is_empty()
            && !fp.trim().is_empty()
        {
            let url = format!("https://{}", addr.trim());
            let fp = fp.trim().to_owned();
            let client = TargetClient::new(&d.name, &url, Some(token.to_owned()), Some(&fp))
                .map_err(|e| anyhow!("{}: {e}", d.name))?;
            if let Ok(Ok(hello)) = tokio::time::timeout(Duration::from_secs(2), client.hello()).await {
                if hello.role != "dp" {
                    bail!("{} at {url} answered as a {:?}, not a DP", d.name, hello.role);
                }
                return Ok((url, fp));
            }
        }
        if Instant::now() >= deadline {
            bail!("{} did not answer within {} s", d.name, START_TIMEOUT.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
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
    /// The temporary directory.
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

// ---------------------------------------------------------------------------------------
// Temporary directory and daemons

#[derive(Debug)]
struct Workdir {
    path: PathBuf,
    keep: bool,
    removed: bool,
}

impl Workdir {
    fn create(keep: bool) -> Result<Self> {
        let mut base = std::env::temp_dir();
        // A Unix socket path is limited to 107 bytes; the admin socket is `<dir>/server/admin.sock`.
        if base.as_os_str().len() > 60 {
            base = PathBuf::from("/tmp");
        }
        let path = base.join(format!("dpsync-quickstart-{:08x}", rand::random::<u32>()));
        fs::create_dir(&path).with_context(|| format!("cannot create a temporary directory {}", path.display()))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("cannot set the mode of {}", path.display()))?;
        Ok(Self { path, keep, removed: false })
    }

    /// Removes the directory; whether it is gone.
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

/// A child `dpsync` process whose output goes to a log file. Dropping it kills and
/// reaps it.
#[derive(Debug)]
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
    status: Option<ExitStatus>,
}

impl Daemon {
    fn spawn(name: &str, args: Vec<OsString>, log: &Path) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find the dpsync executable")?;
        let out = fs::File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(&exe);
        cmd.args(&args);
        // An administrator's settings (database URL, socket, …) must not leak into the demo.
        for (k, _) in std::env::vars_os() {
            let key = k.to_string_lossy();
            if key.starts_with("DPSYNC_") && key != "DPSYNC_LOG" {
                cmd.env_remove(&k);
            }
        }
        cmd.stdin(Stdio::null()).stdout(out.try_clone()?).stderr(out);
        let child = cmd.spawn().with_context(|| format!("cannot start {name} ({})", exe.display()))?;
        Ok(Self { name: name.to_owned(), child, log: log.to_owned(), status: None })
    }

    /// The exit status, once it has exited (reaps it).
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().ok().flatten();
        }
        self.status
    }

    fn log_tail(&self, n: usize) -> String {
        let text = fs::read(&self.log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    fn last_line(&self) -> String {
        let line = self.log_tail(1);
        if line.is_empty() { "(its log is empty)".into() } else { line }
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`STOP_TIMEOUT`].
    async fn terminate(&mut self) -> Stopped {
        let name = self.name.clone();
        if let Some(s) = self.exited() {
            return Stopped { name, clean: false, how: format!("had already exited ({s})") };
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) has no memory effects. The child has not been reaped (checked
        // just above), so its pid still names it and cannot have been reused.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        if rc == 0 {
            let deadline = Instant::now() + STOP_TIMEOUT;
            while Instant::now() < deadline {
                if let Some(s) = self.exited() {
                    let clean = s.success();
                    let how = if clean { "stopped".to_owned() } else { format!("stopped with {s}") };
                    return Stopped { name, clean, how };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        self.kill();
        Stopped {
            name,
            clean: false,
            how: format!("did not stop within {} s of SIGTERM; killed", STOP_TIMEOUT.as_secs()),
        }
    }

    fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            self.status = self.child.wait().ok();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------
// The sample package

/// A small deterministic PRNG (SplitMix64).
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

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

const WORDS: &[&str] = &[
    "install",
    "package",
    "version",
    "server",
    "client",
    "update",
    "config",
    "value",
    "enable",
    "disable",
    "path",
    "registry",
    "service",
    "restart",
    "default",
    "policy",
    "user",
    "machine",
    "setting",
    "feature",
    "component",
    "driver",
    "network",
    "proxy",
    "timeout",
    "retry",
    "log",
    "level",
    "info",
    "warning",
    "error",
    "cache",
    "folder",
    "file",
    "hash",
    "content",
    "distribution",
    "point",
    "site",
    "boundary",
    "group",
    "deployment",
    "required",
    "available",
    "detect",
    "rule",
    "script",
    "exit",
    "code",
    "success",
    "failure",
    "reboot",
    "pending",
    "locale",
    "language",
    "display",
    "name",
    "description",
    "publisher",
    "product",
    "release",
    "notes",
    "build",
    "channel",
];

#[derive(Debug, Clone)]
struct SampleFile {
    size: u64,
    text: bool,
}

#[derive(Debug)]
struct Sample {
    files: BTreeMap<String, SampleFile>,
    dirs: BTreeSet<String>,
}

impl Sample {
    /// Writes the sample tree under `root`: [`SAMPLE_FILES`] files in nested folders,
    /// [`SAMPLE_BYTES`] in all; text files (compressible) and binaries (not). Same
    /// seed, same bytes.
    fn generate(root: &Path) -> Result<Self> {
        let mut rng = Rng(SAMPLE_SEED);
        let mut files: BTreeMap<String, SampleFile> = BTreeMap::new();
        for (path, size) in BIG_FILES {
            files.insert(path.to_string(), SampleFile { size: *size, text: false });
        }
        let mut i = 0;
        while files.len() < SAMPLE_FILES - 1 {
            i += 1;
            let folder = FOLDERS[rng.below(FOLDERS.len() as u64) as usize];
            if folder == "logs" {
                continue; // stays an empty folder
            }
            let (stem, exts, text): (&str, &[&str], bool) = match folder.split('/').next().unwrap_or("") {
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
            };
            let ext = exts[rng.below(exts.len() as u64) as usize];
            let text = text || ext == "txt";
            // Log-uniform between 256 B and 192 KiB.
            let size = (256f64 * (768f64).powf(rng.unit())) as u64;
            files.insert(format!("{folder}/{stem}-{i:03}.{ext}"), SampleFile { size, text });
        }
        let others: u64 = files.values().map(|f| f.size).sum();
        let largest = SAMPLE_BYTES.saturating_sub(others).max(8 << 20);
        files.insert(LARGEST.to_owned(), SampleFile { size: largest, text: false });

        fs::create_dir_all(root)?;
        for d in FOLDERS {
            fs::create_dir_all(root.join(d))?;
        }
        for (n, (path, f)) in files.iter().enumerate() {
            let bytes = content(f, SAMPLE_SEED.wrapping_add(n as u64 * 7919));
            let p = root.join(path);
            fs::write(&p, &bytes).with_context(|| format!("cannot write {}", p.display()))?;
            if path.ends_with(".sh") {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
            }
        }
        Ok(Self { files, dirs: FOLDERS.iter().map(|d| d.to_string()).collect() })
    }

    fn total_bytes(&self) -> u64 {
        self.files.values().map(|f| f.size).sum()
    }

    fn info(&self) -> SampleInfo {
        SampleInfo { files: self.files.len() as u64, dirs: self.dirs.len() as u64, bytes: self.total_bytes() }
    }

    /// About 1 %: appends to three text files, rewrites 4 KiB in the middle of the
    /// largest file, adds one file and deletes another.
    fn change(&mut self, root: &Path) -> Result<Change> {
        let mut c = Change::default();
        let mut rng = Rng(SAMPLE_SEED ^ 0xC4A6E);
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
        let mut f = fs::OpenOptions::new().read(true).write(true).open(root.join(LARGEST))?;
        let mut old = vec![0u8; EDIT_BYTES];
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut old)?;
        let new: Vec<u8> = old.iter().map(|b| !b).collect();
        f.seek(SeekFrom::Start(offset))?;
        f.write_all(&new)?;
        c.edited = LARGEST.into();
        c.edited_size = size;
        c.edit_offset = offset;
        c.bytes_changed += EDIT_BYTES as u64;

        let added = SampleFile { size: NEW_FILE_BYTES, text: false };
        fs::write(root.join(NEW_FILE), content(&added, SAMPLE_SEED ^ 0xADD))?;
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

fn content(f: &SampleFile, seed: u64) -> Vec<u8> {
    if f.text {
        text_bytes(&mut Rng(seed), f.size as usize)
    } else {
        let mut b = vec![0u8; f.size as usize];
        blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut b);
        b
    }
}

/// `len` bytes of word salad in lines: compressible like real text.
fn text_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 32);
    while out.len() < len {
        let words = 6 + rng.below(10);
        for w in 0..words {
            if w > 0 {
                out.push(b' ');
            }
            out.extend_from_slice(WORDS[rng.below(WORDS.len() as u64) as usize].as_bytes());
            if rng.below(5) == 0 {
                out.extend_from_slice(format!("={}", rng.below(10_000)).as_bytes());
            }
        }
        out.push(b'\n');
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------------------
// Verification

#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File { len: u64, mode: u32 },
    Other(String),
}

fn list_tree(root: &Path) -> Result<BTreeMap<String, Node>> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).min_depth(1).follow_links(false) {
        let e = e.with_context(|| format!("cannot read {}", root.display()))?;
        let rel = e.path().strip_prefix(root).expect("under root").to_string_lossy().into_owned();
        let md = e.path().symlink_metadata()?;
        let node = if md.is_dir() {
            Node::Dir
        } else if md.is_file() {
            Node::File { len: md.len(), mode: md.mode() & 0o7777 }
        } else {
            Node::Other(format!("{:?}", md.file_type()))
        };
        out.insert(rel, node);
    }
    Ok(out)
}

/// Compares two trees: same paths, kinds, modes and file bytes. (files, dirs, bytes).
fn compare_trees(src: &Path, live: &Path) -> Result<(u64, u64, u64)> {
    let live = fs::canonicalize(live).with_context(|| format!("{} is missing", live.display()))?;
    let a = list_tree(src)?;
    let b = list_tree(&live)?;
    let mut diffs = Vec::new();
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let (mut files, mut dirs, mut bytes) = (0, 0, 0);
    for k in keys {
        match (a.get(k), b.get(k)) {
            (Some(x), Some(y)) if x != y => diffs.push(format!("{k}: {x:?} on the source, {y:?} on the DP")),
            (Some(Node::File { len, .. }), Some(_)) => {
                if fs::read(src.join(k))? != fs::read(live.join(k))? {
                    diffs.push(format!("{k}: different bytes"));
                }
                files += 1;
                bytes += len;
            }
            (Some(Node::Dir), Some(_)) => dirs += 1,
            (Some(_), Some(_)) => {}
            (Some(_), None) => diffs.push(format!("{k}: missing on the DP")),
            (None, Some(_)) => diffs.push(format!("{k}: on the DP but not in the source")),
            (None, None) => unreachable!(),
        }
    }
    if !diffs.is_empty() {
        let n = diffs.len();
        diffs.truncate(5);
        bail!("{n} differences, e.g. {}", diffs.join("; "));
    }
    Ok((files, dirs, bytes))
}
