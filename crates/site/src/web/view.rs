//! What the status page shows, computed from the JSON of `GET /v1/status` (a list of
//! `status --json` documents), so that the server's first render and the page's script,
//! which re-renders from the same JSON every poll, agree. Fields that newer servers add
//! (`next_retry_at`, `next_window_at`, `last_error_at`, …) are shown when present and
//! never required; an unknown state is shown by its word, in grey.
//!
//! `status.js` mirrors these rules (rank, counts, paging, texts); the end-to-end browser
//! test checks the rendered page.

use serde_json::Value;

/// Targets shown per page of a package.
pub const PAGE_SIZE: usize = 50;

/// How a state is sorted and counted: problems first, then work under way, then waiting,
/// then done.
pub fn rank(state: &str) -> u8 {
    match state {
        "failed" | "validation_failed" => 0,
        "retrying" => 1,
        "in_progress" | "validating" | "removing" => 2,
        "waiting_window" | "pending" => 3,
        "installed" => 5,
        "removed" => 6,
        _ => 4,
    }
}

/// The summary group of a state: `failing`, `active`, `waiting`, `installed` or `other`.
pub fn group(state: &str) -> &'static str {
    match rank(state) {
        0 | 1 => "failing",
        2 => "active",
        3 => "waiting",
        5 => "installed",
        _ => "other",
    }
}

/// Counts per summary group, over every target and every child site's targets.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub installed: u64,
    pub active: u64,
    pub waiting: u64,
    pub failing: u64,
    pub other: u64,
}

impl Counts {
    pub fn add(&mut self, targets: &[Value]) {
        for t in targets {
            match group(str_of(t, "state")) {
                "failing" => self.failing += 1,
                "active" => self.active += 1,
                "waiting" => self.waiting += 1,
                "installed" => self.installed += 1,
                _ => self.other += 1,
            }
            self.add(arr(t, "targets"));
        }
    }
}

pub fn str_of<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

pub fn int_of(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}

pub fn arr<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key).and_then(Value::as_array).map(Vec::as_slice).unwrap_or(&[])
}

/// A package's targets in display order: by rank, then name.
pub fn sorted(targets: &[Value]) -> Vec<&Value> {
    let mut out: Vec<&Value> = targets.iter().collect();
    out.sort_by(|a, b| {
        (rank(str_of(a, "state")), str_of(a, "name")).cmp(&(rank(str_of(b, "state")), str_of(b, "name")))
    });
    out
}

/// `1536` → `1.5 KiB`.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n.max(0.0);
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{v:.0} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

/// A duration in words: `45 s`, `12 min`, `3 h`, `2 d`.
pub fn span(ms: i64) -> String {
    let s = ms.max(0) / 1000;
    match s {
        0..60 => format!("{s} s"),
        60..3600 => format!("{} min", s / 60),
        3600..86400 => format!("{} h", s / 3600),
        _ => format!("{} d", s / 86400),
    }
}

/// How long something quick took: `0.2 s`, `12 s`, `2 min`.
pub fn took(ms: i64) -> String {
    if ms < 10_000 { format!("{:.1} s", ms.max(0) as f64 / 1000.0) } else { span(ms) }
}

/// `ago(now, t)`: `just now`, `3 min ago`.
pub fn ago(now: i64, at: i64) -> String {
    if now - at < 1000 { "just now".into() } else { format!("{} ago", span(now - at)) }
}

/// The progress text of a target: bytes done of planned, rate and time left while
/// sending; the phase otherwise. `None` when no job runs.
pub fn progress(t: &Value, now: i64) -> Option<(Option<f64>, String)> {
    let p = t.get("progress").filter(|p| p.is_object())?;
    let phase = str_of(p, "phase").replace('_', " ");
    let planned = p.get("bytes_planned").and_then(Value::as_f64).unwrap_or(0.0);
    let done = p.get("bytes_done").and_then(Value::as_f64).unwrap_or(0.0);
    if planned <= 0.0 {
        return Some((None, phase));
    }
    let fraction = (done / planned).clamp(0.0, 1.0);
    let mut text = format!("{} / {}", bytes(done), bytes(planned));
    let started = int_of(p, "started_ms").unwrap_or(now);
    let secs = (now - started) as f64 / 1000.0;
    if secs > 0.5 && done > 0.0 {
        let rate = done / secs;
        text.push_str(&format!(" · {}/s · {} left", bytes(rate), span((((planned - done) / rate) * 1000.0) as i64)));
    }
    Some((Some(fraction), text))
}

/// When the target's last error happened: `last_error_at` when the server says, else the
/// row's last change.
pub fn error_at(t: &Value) -> Option<i64> {
    int_of(t, "last_error_at").or_else(|| int_of(t, "updated_at"))
}

/// What happens next: a retry or a send window, when the server says.
pub fn next(t: &Value, now: i64) -> String {
    let state = str_of(t, "state");
    let in_words = |at: i64| if at > now { format!("in {}", span(at - now)) } else { "now".into() };
    if let Some(at) = int_of(t, "next_window_at") {
        return format!("window opens {}", in_words(at));
    }
    let retry =
        int_of(t, "next_retry_at").or_else(|| (state == "retrying").then(|| int_of(t, "next_attempt_at")).flatten());
    match retry {
        Some(at) => format!("retry {}", in_words(at)),
        None => String::new(),
    }
}

/// `v3`, `v3 → v4` while a newer version is wanted, `–` when none is installed.
pub fn versions(t: &Value) -> String {
    let installed = int_of(t, "installed_version");
    let desired = int_of(t, "desired_version").filter(|d| *d > 0);
    match (installed, desired) {
        (Some(i), Some(d)) if d != i && str_of(t, "state") != "removed" => format!("v{i} → v{d}"),
        (Some(i), _) => format!("v{i}"),
        (None, Some(d)) if !matches!(str_of(t, "state"), "removed" | "removing") => format!("– → v{d}"),
        _ => "–".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn problems_sort_first_and_count_once_with_child_targets() {
        let targets = vec![
            json!({"name": "a", "state": "installed"}),
            json!({"name": "b", "state": "failed"}),
            json!({"name": "c", "state": "waiting_window"}),
            json!({"name": "d", "state": "in_progress"}),
            json!({"name": "e", "state": "retrying"}),
            json!({"name": "f", "state": "something_new"}),
            json!({"name": "child", "state": "installed", "targets": [
                {"name": "x", "state": "failed"}, {"name": "y", "state": "installed"}]}),
        ];
        let order: Vec<&str> = sorted(&targets).iter().map(|t| str_of(t, "name")).collect();
        assert_eq!(order, ["b", "e", "d", "c", "f", "a", "child"]);
        let mut c = Counts::default();
        c.add(&targets);
        assert_eq!(c, Counts { installed: 3, active: 1, waiting: 1, failing: 3, other: 1 });
    }

    #[test]
    fn texts_for_people() {
        assert_eq!(bytes(0.0), "0 B");
        assert_eq!(bytes(1536.0), "1.5 KiB");
        assert_eq!(bytes(3.0 * 1024.0 * 1024.0 * 1024.0), "3.0 GiB");
        assert_eq!(ago(100_000, 100_000), "just now");
        assert_eq!(ago(10_000_000, 10_000_000 - 180_000), "3 min ago");
        let t = json!({"state": "retrying", "next_attempt_at": 70_000, "installed_version": 2, "desired_version": 3});
        assert_eq!(next(&t, 10_000), "retry in 1 min");
        assert_eq!(versions(&t), "v2 → v3");
        let t = json!({"state": "waiting_window", "next_window_at": 10_000 + 2 * 3_600_000});
        assert_eq!(next(&t, 10_000), "window opens in 2 h");
        assert_eq!(next(&json!({"state": "installed", "next_attempt_at": 5}), 10_000), "");
        let t = json!({"progress": {"phase": "sending", "bytes_planned": 4096, "bytes_done": 1024, "started_ms": 0}});
        let (fraction, text) = progress(&t, 2000).unwrap();
        assert_eq!(fraction, Some(0.25));
        assert_eq!(text, "1.0 KiB / 4.0 KiB · 512 B/s · 6 s left");
        assert_eq!(took(250), "0.2 s");
        assert_eq!(took(12_500), "12 s");
        assert_eq!(took(125_000), "2 min");
        assert_eq!(progress(&json!({"progress": null}), 0), None);
    }
}
