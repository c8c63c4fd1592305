//! Following a distribution to its end (`--wait`): polls the package's status, shows
//! progress on stderr (indicatif bars on a terminal, one line per change otherwise), and
//! decides the exit code: 0 when every target holds the version, 1 when any failed.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::enc;
use crate::util::{human_bytes, outln, plural};
use dpsync_api::AdminClient;
use dpsync_api::{DistState, Progress, StatusReport, TargetKind, TargetStatus};

/// How a wait ended.
#[derive(Debug)]
pub struct WaitOutcome {
    pub status: StatusReport,
    pub failed: Vec<String>,
    pub timed_out: bool,
}

impl WaitOutcome {
    pub fn exit_code(&self) -> ExitCode {
        if self.failed.is_empty() && !self.timed_out { ExitCode::SUCCESS } else { ExitCode::FAILURE }
    }
}

/// A target is settled when it holds `version` (or was removed), or has failed, or
/// waits for its next send window (which may be hours away: `--wait` says so and ends).
fn settled(t: &TargetStatus, version: i64) -> Option<bool> {
    let done_here = match t.state {
        DistState::Installed => {
            t.installed_version.is_some_and(|v| v >= version) && t.desired_version <= t.installed_version.unwrap_or(0)
        }
        DistState::Removed => true,
        DistState::Failed | DistState::WaitingWindow => return Some(false),
        _ => false,
    };
    if !done_here {
        return None;
    }
    if t.kind == TargetKind::Site && t.targets.is_empty() && t.last_error.is_some() {
        // The child could not report its own targets: keep waiting.
        return None;
    }
    // A child site is settled when its own targets are.
    for child in &t.targets {
        match settled(child, version) {
            Some(true) => {}
            other => return other,
        }
    }
    Some(true)
}

fn collect_failed(t: &TargetStatus, prefix: &str, out: &mut Vec<String>) {
    let name = format!("{prefix}{}", t.name);
    if t.state == DistState::Failed {
        out.push(format!("{name}: {}", t.last_error.as_deref().unwrap_or("failed")));
    }
    if t.state == DistState::WaitingWindow {
        let opens = t.next_window_at.map(|at| format!(" (opens {})", crate::util::when(at))).unwrap_or_default();
        out.push(format!("{name}: outside its send windows; sent when the next opens{opens}"));
    }
    for c in &t.targets {
        collect_failed(c, &format!("{name}/"), out);
    }
}

pub async fn wait(c: &AdminClient, pkg: &str, version: i64, timeout: Option<u64>, json: bool) -> Result<WaitOutcome> {
    let started = Instant::now();
    let deadline = timeout.map(|s| started + Duration::from_secs(s));
    let mut view = View::new(json, version);
    // Small changes and relabels settle in milliseconds: ask again soon at first, then
    // every 200 ms (terminal) or 300 ms.
    let slowest = Duration::from_millis(if matches!(view, View::Bars(_)) { 200 } else { 300 });
    let mut pause = Duration::from_millis(25);
    loop {
        let status: StatusReport = c.get(&format!("/v1/packages/{}/status", enc(pkg))).await?;
        let results: Vec<Option<bool>> = status.targets.iter().map(|t| settled(t, version)).collect();
        let done = results.iter().all(Option::is_some);
        view.show(&status, results.iter().filter(|r| r.is_some()).count());
        let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
        if done || timed_out {
            view.finish();
            let mut failed = Vec::new();
            for t in &status.targets {
                collect_failed(t, "", &mut failed);
            }
            let total = status.targets.len() as u64;
            if !failed.is_empty() {
                eprintln!("dpsync: {} of {} failed: {}", failed.len(), plural(total, "target"), failed.join("; "));
            } else if timed_out && !done {
                let pending: Vec<&str> = status
                    .targets
                    .iter()
                    .zip(&results)
                    .filter(|(_, r)| r.is_none())
                    .map(|(t, _)| t.name.as_str())
                    .collect();
                eprintln!("dpsync: timed out waiting for {}", pending.join(", "));
            } else if !json {
                eprintln!("{}", done_message(pkg, version, &status.targets, started.elapsed()));
            }
            return Ok(WaitOutcome { status, failed, timed_out: timed_out && !done });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(slowest);
    }
}

/// What a wait that ended well says: where the version is, and where the package was
/// removed (a removed target does not hold it).
fn done_message(pkg: &str, version: i64, targets: &[TargetStatus], took: Duration) -> String {
    let secs = took.as_secs_f64();
    let removed: Vec<&str> =
        targets.iter().filter(|t| t.state == DistState::Removed).map(|t| t.name.as_str()).collect();
    let on = targets.len() - removed.len();
    let holding = match (on, removed.len()) {
        (0, 0) => return format!("{pkg} is not distributed to any target: nothing to wait for"),
        (0, _) => format!("{pkg} is on no target"),
        (1, 0) => format!("{pkg} version {version} is on 1 target"),
        (n, 0) => format!("{pkg} version {version} is on all {n} targets"),
        (n, _) => format!("{pkg} version {version} is on {}", plural(n as u64, "target")),
    };
    if removed.is_empty() {
        format!("{holding} ({secs:.1} s)")
    } else {
        format!("{holding}; removed from {} ({secs:.1} s)", removed.join(", "))
    }
}

/// `status` without a package: one line per package with its targets counted by state.
pub fn print_rollup(all: &[StatusReport]) {
    if all.is_empty() {
        outln!("no packages; `dpsync package add NAME SOURCE_DIR` adds one");
        return;
    }
    outln!("{:<10} {:<24} {:>7} {:>7}  STATES", "PACKAGE", "NAME", "VERSION", "TARGETS");
    for s in all {
        let states: Vec<String> = s.counts.iter().map(|(state, n)| format!("{n} {state}")).collect();
        outln!(
            "{:<10} {:<24} {:>7} {:>7}  {}",
            s.package,
            s.name,
            s.source_version,
            s.targets.len(),
            if states.is_empty() { "not distributed".to_owned() } else { states.join(", ") }
        );
    }
}

/// `status --failed`: every failing target of every package, with its error and next try.
pub fn print_failing(all: &[StatusReport]) {
    if all.is_empty() {
        outln!("nothing is failing");
        return;
    }
    fn row(pkg: &str, t: &TargetStatus, prefix: &str) {
        let name = format!("{prefix}{}", t.name);
        if t.is_failing() {
            let next = t.next_retry_at.map(|at| format!("next try {}", crate::util::when(at))).unwrap_or_default();
            let since = t.last_error_at.map(|at| format!("since {}", crate::util::when(at))).unwrap_or_default();
            outln!("{pkg:<10} {name:<18} {:<17} {since:<16} {next}", t.state);
            outln!("    {}", t.last_error.as_deref().unwrap_or("(no error recorded)"));
        }
        for c in &t.targets {
            row(pkg, c, &format!("{name}/"));
        }
    }
    for s in all {
        for t in &s.targets {
            row(&s.package, t, "");
        }
    }
}

/// `dp remove NAME` / `site remove NAME`: queues the removal of every package from the
/// target, follows it (progress on stderr), and forgets the target once all are removed.
/// Exits 1 naming the packages that could not be removed, keeping the target.
pub async fn remove_target(
    c: &AdminClient,
    json: bool,
    kind: &str,
    name: &str,
    forget: bool,
    timeout: u64,
) -> Result<ExitCode> {
    use dpsync_api::{RemoveTarget, TargetDetail, TargetRemoval};
    let path = format!("/v1/targets/{}/remove", enc(name));
    let req = RemoveTarget { kind: Some(kind.into()), forget };
    let what = if kind == "site" { "child site" } else { "DP" };
    let mut r: TargetRemoval = c.post(&path, &req).await?;
    let deadline = Instant::now() + Duration::from_secs(timeout);
    let mut last_line = String::new();
    let mut stuck: Vec<String> = Vec::new();
    while !r.forgotten {
        let d: TargetDetail = c.get(&format!("/v1/targets/{}", enc(name))).await?;
        let total = d.packages.len();
        let done = d.packages.iter().filter(|p| p.state == DistState::Removed).count();
        let line = format!("removing {} from {name}: {done} of {total} removed", plural(total as u64, "package"));
        if !json && line != last_line {
            eprintln!("{line}");
            last_line = line;
        }
        let open: Vec<_> = d.packages.iter().filter(|p| p.state != DistState::Removed).collect();
        if open.is_empty() {
            r = c.post(&path, &req).await?;
            continue;
        }
        // A removal that failed for a reason that needs an administrator (e.g. a wrong
        // token) will not succeed by waiting.
        let hopeless = open.iter().all(|p| p.state == DistState::Failed);
        if hopeless || Instant::now() >= deadline {
            stuck = open
                .iter()
                .map(|p| format!("{}: {}", p.package, p.last_error.as_deref().unwrap_or(p.state.as_str())))
                .collect();
            r.removing = open.iter().map(|p| p.package.clone()).collect();
            r.removed =
                d.packages.iter().filter(|p| p.state == DistState::Removed).map(|p| p.package.clone()).collect();
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if json {
        outln!("{}", serde_json::to_string_pretty(&r)?);
    }
    if !r.forgotten {
        eprintln!(
            "dpsync: could not remove {} from {name}: {}; {name} is kept: run `dpsync {kind} remove {name}` again once \
             it answers, or `dpsync {kind} remove {name} --forget` to forget it without removing them",
            plural(stuck.len() as u64, "package"),
            stuck.join("; ")
        );
        return Ok(ExitCode::FAILURE);
    }
    if !json {
        if forget {
            outln!("forgot {what} {name} (nothing was removed from it)");
        } else {
            outln!("removed {what} {name} ({} taken off it)", plural(r.removed.len() as u64, "package"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How `--wait` shows progress on stderr.
enum View {
    /// `--json`: nothing; the final document says it all.
    Quiet,
    /// Not a terminal (a log, a CI job): a line `NAME STATE vN …` each time a target's
    /// line changes. Scripts read these; keep the format.
    Lines(HashMap<String, String>),
    /// A terminal: a bar per target, redrawn in place, and a summary line.
    Bars(Bars),
}

impl View {
    fn new(json: bool, version: i64) -> Self {
        if json {
            View::Quiet
        } else if std::io::stderr().is_terminal() {
            View::Bars(Bars::new(version))
        } else {
            View::Lines(HashMap::new())
        }
    }

    fn show(&mut self, status: &StatusReport, settled: usize) {
        match self {
            View::Quiet => {}
            View::Lines(last) => {
                for t in &status.targets {
                    let line = state_line(t);
                    if last.get(&t.name) != Some(&line) {
                        eprintln!("{:<16} {line}", t.name);
                        last.insert(t.name.clone(), line);
                    }
                }
            }
            View::Bars(bars) => bars.show(status, settled),
        }
    }

    /// Leaves each target's last line on the screen, without the summary.
    fn finish(&mut self) {
        if let View::Bars(bars) = self {
            for (bar, _) in bars.targets.values() {
                bar.finish();
            }
            bars.summary.finish_and_clear();
        }
    }
}

/// The terminal display: one line per target (a byte bar while it transfers, its state
/// otherwise) above a summary line with a spinner and the time waited.
struct Bars {
    multi: MultiProgress,
    /// By target name: its line, and whether it shows a transfer.
    targets: HashMap<String, (ProgressBar, bool)>,
    summary: ProgressBar,
    version: i64,
}

impl Bars {
    fn new(version: i64) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let summary = multi.add(ProgressBar::new_spinner().with_style(style("{spinner} {msg} ({elapsed})")));
        summary.enable_steady_tick(Duration::from_millis(120));
        Self { multi, targets: HashMap::new(), summary, version }
    }

    fn show(&mut self, status: &StatusReport, settled: usize) {
        for t in &status.targets {
            let (bar, transferring) = self.targets.entry(t.name.clone()).or_insert_with(|| {
                let bar = ProgressBar::new(0).with_prefix(t.name.clone()).with_style(style(STATE_LINE));
                (self.multi.insert_before(&self.summary, bar), false)
            });
            match &t.progress {
                Some(p) if p.bytes_planned > 0 => {
                    if !*transferring {
                        bar.set_style(style(TRANSFER_LINE));
                        *transferring = true;
                    }
                    bar.set_length(p.bytes_planned);
                    bar.set_position(p.bytes_done.min(p.bytes_planned));
                    bar.set_message(transfer_message(t, p));
                }
                _ => {
                    if *transferring {
                        bar.set_style(style(STATE_LINE));
                        *transferring = false;
                    }
                    bar.set_message(state_line(t));
                }
            }
        }
        self.summary.set_message(format!(
            "waiting for version {}: {} of {} done",
            self.version,
            settled,
            plural(status.targets.len() as u64, "target")
        ));
    }
}

const STATE_LINE: &str = "{prefix:<16} {msg}";
const TRANSFER_LINE: &str = "{prefix:<16} [{bar:30}] {binary_bytes}/{binary_total_bytes} ({percent} %) {msg}";

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).expect("a valid template").progress_chars("=> ")
}

/// Rate and ETA of a running transfer, from the site's clock: the status is polled, so
/// the job's own start time gives steadier numbers than the gaps between polls.
fn transfer_message(t: &TargetStatus, p: &Progress) -> String {
    let elapsed = (dpsync_store::now_ms() - p.started_ms).max(1) as f64 / 1000.0;
    let rate = p.bytes_done as f64 / elapsed;
    let left = p.bytes_planned.saturating_sub(p.bytes_done) as f64;
    let eta = if rate > 0.0 { format!("ETA {:.0} s", left / rate) } else { "ETA -".into() };
    format!("{}/s  {eta}  {}", human_bytes(rate as u64), state_line(t))
}

fn state_line(t: &TargetStatus) -> String {
    let mut s =
        format!("{:<12} v{}", t.state, t.installed_version.map(|v| v.to_string()).unwrap_or_else(|| "-".into()));
    if matches!(t.state, DistState::Retrying | DistState::Failed)
        && let Some(e) = &t.last_error
    {
        s.push_str(&format!("  ({e})"));
    }
    if let Some(p) = &t.progress {
        s.push_str(&format!("  {}", p.phase));
    }
    s
}

pub fn print_status(s: &StatusReport) {
    if s.source_version == 0 {
        outln!(
            "{} ({})  source site {}  no version yet: `dpsync refresh {}` commits the first one",
            s.package,
            s.name,
            s.source_site,
            s.package
        );
    } else {
        outln!(
            "{} ({})  source site {}  version {}  root {}",
            s.package,
            s.name,
            s.source_site,
            s.source_version,
            s.content_root.as_deref().map(|r| &r[..16.min(r.len())]).unwrap_or("-")
        );
    }
    if s.targets.is_empty() {
        outln!("  not distributed; `dpsync distribute {} --dp NAME`", s.package);
        return;
    }
    outln!(
        "  {:<18} {:<5} {:<17} {:>9} {:>11} {:>11}  LAST ERROR",
        "TARGET",
        "KIND",
        "STATE",
        "INSTALLED",
        "SENT LAST",
        "SENT TOTAL"
    );
    fn row(t: &TargetStatus, indent: usize) {
        outln!(
            "  {:<18} {:<5} {:<17} {:>9} {:>11} {:>11}  {}",
            format!("{}{}", " ".repeat(indent), t.name),
            t.kind,
            t.state,
            t.installed_version.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            human_bytes(t.bytes_sent_last.max(0) as u64),
            human_bytes(t.bytes_sent_total.max(0) as u64),
            match (t.next_window_at, &t.node) {
                (Some(at), _) => format!("next send window opens {}", crate::util::when(at)),
                (None, Some(node)) => format!("running on node {node}"),
                (None, None) => t.last_error.clone().unwrap_or_default(),
            }
        );
        for c in &t.targets {
            row(c, indent + 2);
        }
    }
    for t in &s.targets {
        row(t, 0);
    }
}
