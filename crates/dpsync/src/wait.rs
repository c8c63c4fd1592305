//! Following a distribution to its end (`--wait`): polls the package's status, shows
//! progress (redrawn in place on a terminal, one line per change otherwise), and
//! decides the exit code: 0 when every target holds the version, 1 when any failed.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::cli::enc;
use crate::util::human_bytes;
use dpsync_api::AdminClient;
use dpsync_api::{DistState, StatusReport, TargetKind, TargetStatus};

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

/// A target is settled when it holds `version` (or was removed), or has failed.
fn settled(t: &TargetStatus, version: i64) -> Option<bool> {
    let done_here = match t.state {
        DistState::Installed => {
            t.installed_version.is_some_and(|v| v >= version) && t.desired_version <= t.installed_version.unwrap_or(0)
        }
        DistState::Removed => true,
        DistState::Failed => return Some(false),
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
    for c in &t.targets {
        collect_failed(c, &format!("{name}/"), out);
    }
}

pub async fn wait(c: &AdminClient, pkg: &str, version: i64, timeout: Option<u64>, json: bool) -> Result<WaitOutcome> {
    let started = Instant::now();
    let deadline = timeout.map(|s| started + Duration::from_secs(s));
    let tty = !json && std::io::stderr().is_terminal();
    let mut last_states: HashMap<String, String> = HashMap::new();
    let mut drawn = 0usize;
    // Small changes and relabels settle in milliseconds: ask again soon at first, then
    // every 200 ms (terminal) or 300 ms.
    let slowest = Duration::from_millis(if tty { 200 } else { 300 });
    let mut pause = Duration::from_millis(25);
    loop {
        let status: StatusReport = c.get(&format!("/v1/packages/{}/status", enc(pkg))).await?;
        let results: Vec<Option<bool>> = status.targets.iter().map(|t| settled(t, version)).collect();
        let done = results.iter().all(Option::is_some);
        if tty {
            drawn = redraw(&status, version, started, drawn);
        } else if !json {
            for t in &status.targets {
                let line = state_line(t);
                if last_states.get(&t.name) != Some(&line) {
                    eprintln!("{:<16} {line}", t.name);
                    last_states.insert(t.name.clone(), line);
                }
            }
        }
        let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
        if done || timed_out {
            let mut failed = Vec::new();
            for t in &status.targets {
                collect_failed(t, "", &mut failed);
            }
            if !failed.is_empty() {
                eprintln!("dpsync: {} of {} targets failed: {}", failed.len(), status.targets.len(), failed.join("; "));
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
                eprintln!(
                    "{} version {version} is on all {} targets ({:.1} s)",
                    pkg,
                    status.targets.len(),
                    started.elapsed().as_secs_f64()
                );
            }
            return Ok(WaitOutcome { status, failed, timed_out: timed_out && !done });
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(slowest);
    }
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

fn redraw(status: &StatusReport, version: i64, started: Instant, previous: usize) -> usize {
    let mut err = std::io::stderr().lock();
    if previous > 0 {
        let _ = write!(err, "\x1b[{previous}A");
    }
    let mut lines = 0;
    for t in &status.targets {
        let mut line = format!("{:<16} {}", t.name, state_line(t));
        if let Some(p) = &t.progress
            && p.bytes_planned > 0
        {
            let pct = p.bytes_done as f64 * 100.0 / p.bytes_planned as f64;
            let elapsed = (dpsync_store::now_ms() - p.started_ms).max(1) as f64 / 1000.0;
            let rate = p.bytes_done as f64 / elapsed;
            let eta = if rate > 0.0 { (p.bytes_planned - p.bytes_done) as f64 / rate } else { 0.0 };
            line.push_str(&format!(
                "  {}/{} ({pct:.0} %) {}/s  ETA {eta:.0} s",
                human_bytes(p.bytes_done),
                human_bytes(p.bytes_planned),
                human_bytes(rate as u64)
            ));
        }
        let _ = writeln!(err, "\x1b[2K{line}");
        lines += 1;
    }
    let _ = writeln!(err, "\x1b[2Kwaiting for version {version}: {:.0} s", started.elapsed().as_secs_f64());
    lines + 1
}

pub fn print_status(s: &StatusReport) {
    println!(
        "{} ({})  source site {}  version {}  root {}",
        s.package,
        s.name,
        s.source_site,
        s.source_version,
        s.content_root.as_deref().map(|r| &r[..16.min(r.len())]).unwrap_or("-")
    );
    if s.targets.is_empty() {
        println!("  not distributed; `dpsync distribute {} --dp NAME`", s.package);
        return;
    }
    println!(
        "  {:<18} {:<5} {:<17} {:>9} {:>11} {:>11}  LAST ERROR",
        "TARGET", "KIND", "STATE", "INSTALLED", "SENT LAST", "SENT TOTAL"
    );
    fn row(t: &TargetStatus, indent: usize) {
        println!(
            "  {:<18} {:<5} {:<17} {:>9} {:>11} {:>11}  {}",
            format!("{}{}", " ".repeat(indent), t.name),
            t.kind,
            t.state,
            t.installed_version.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            human_bytes(t.bytes_sent_last.max(0) as u64),
            human_bytes(t.bytes_sent_total.max(0) as u64),
            t.last_error.as_deref().unwrap_or("")
        );
        for c in &t.targets {
            row(c, indent + 2);
        }
    }
    for t in &s.targets {
        row(t, 0);
    }
}
