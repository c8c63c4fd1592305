//! The site's `/metrics` (Prometheus text format 0.0.4, through `prometheus-client`),
//! served on the admin socket, on `--http-listen` and on `--metrics-listen`.
//!
//! A registry is built for each scrape from a snapshot: the counters are plain atomics
//! bumped where the work happens, the histograms live here between scrapes, and the
//! gauges come from three aggregate store queries, so a scrape costs the same whatever
//! the number of packages and targets, and a deleted package's series disappears with it.
//! Label sets are bounded by configuration: per package, per (package, target), per
//! refresh phase, per target kind and job outcome; never per file or chunk.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use anyhow::anyhow;
use dpsync_api::{LastRefresh, RefreshReport};
use dpsync_store::{PackageVersion, StateCount, TargetKind, TargetSeries};
use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::{Site, SiteError};

/// `Content-Type` of [`Site::metrics_text`].
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// 10 ms to about 45 min in ×3 steps: a refresh phase or a push takes anything in between.
fn duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.01, 3.0, 12))
}

/// What `/metrics` exports beyond the store's rows: counters, histograms and the last
/// refresh of each package (kept in memory; after a restart the store's last commit
/// stands in for it on the status page).
#[derive(Debug)]
pub struct SiteMetrics {
    pub refreshes: AtomicU64,
    pub refresh_failures: AtomicU64,
    pub bytes_hashed: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Bytes pull DPs reported fetching from other DPs.
    pub bytes_from_peers: AtomicU64,
    pub jobs_succeeded: AtomicU64,
    pub jobs_retried: AtomicU64,
    pub jobs_failed: AtomicU64,
    refresh_phases: Histograms<PhaseLabels>,
    job_durations: Histograms<JobLabels>,
    last_refresh: Mutex<HashMap<String, LastRefresh>>,
}

impl Default for SiteMetrics {
    fn default() -> Self {
        Self {
            refreshes: AtomicU64::new(0),
            refresh_failures: AtomicU64::new(0),
            bytes_hashed: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            bytes_from_peers: AtomicU64::new(0),
            jobs_succeeded: AtomicU64::new(0),
            jobs_retried: AtomicU64::new(0),
            jobs_failed: AtomicU64::new(0),
            refresh_phases: Family::new_with_constructor(duration_histogram),
            job_durations: Family::new_with_constructor(duration_histogram),
            last_refresh: Mutex::new(HashMap::new()),
        }
    }
}

impl SiteMetrics {
    /// Records a refresh of package `pkg` (its id) that ran for `took`: its result for the
    /// package's series and the status page, and (when it committed) its phases for the
    /// histograms.
    pub fn record_refresh(&self, pkg: &str, result: &Result<RefreshReport, SiteError>, took: Duration) {
        let now = dpsync_store::now_ms();
        let (key, last) = match result {
            Ok(r) if r.dry_run => return,
            Ok(r) => {
                let p = &r.phases;
                for (phase, ms) in [
                    ("load", p.load_ms),
                    ("scan", p.scan_ms),
                    ("read", p.read_ms),
                    ("commit", p.commit_ms),
                    ("total", r.duration_ms),
                ] {
                    self.refresh_phases.get_or_create(&PhaseLabels { phase }).observe(ms as f64 / 1000.0);
                }
                let last = LastRefresh {
                    at: now,
                    ok: true,
                    duration_ms: Some(took.as_millis() as u64),
                    source_version: Some(r.source_version),
                    error: None,
                };
                (r.package.clone(), last)
            }
            // Only refreshes of packages that exist have a series: a mistyped id must not
            // add one.
            Err(SiteError::NotFound(_)) => return,
            Err(e) => {
                let last = LastRefresh {
                    at: now,
                    ok: false,
                    duration_ms: Some(took.as_millis() as u64),
                    source_version: None,
                    error: Some(e.to_string()),
                };
                (pkg.to_owned(), last)
            }
        };
        self.last_refresh.lock().unwrap().insert(key, last);
    }

    /// The last refresh this server ran of `pkg`, if any.
    pub fn last_refresh(&self, pkg: &str) -> Option<LastRefresh> {
        self.last_refresh.lock().unwrap().get(pkg).cloned()
    }

    /// Records how long a distribution job took and how it ended (`installed`,
    /// `removed`, `retry`, `failed`).
    pub fn record_job(&self, kind: TargetKind, outcome: &'static str, took: Duration) {
        self.job_durations.get_or_create(&JobLabels { kind: kind.as_str(), outcome }).observe(took.as_secs_f64());
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PackageLabels {
    package: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct DistributionLabels {
    kind: &'static str,
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TargetLabels {
    package: String,
    target: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct TargetStateLabels {
    package: String,
    target: String,
    kind: &'static str,
    state: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct JobLabels {
    kind: &'static str,
    outcome: &'static str,
}

/// One scrape's rows from the store and the disk.
#[derive(Debug, Default)]
struct Snapshot {
    versions: Vec<PackageVersion>,
    states: Vec<StateCount>,
    targets: Vec<TargetSeries>,
    disk_free: Option<u64>,
}

impl Site {
    /// Prometheus text exposition of the site's counters and histograms, its packages'
    /// versions and last refreshes, every distribution's state, bytes, installed version,
    /// last success and consecutive failures, and the data disk's free space.
    pub async fn metrics_text(&self) -> Result<String, SiteError> {
        let data_dir = self.cfg.data_dir.clone();
        let snapshot = Snapshot {
            versions: self.store.package_versions().await?,
            states: self.store.distribution_state_counts().await?,
            targets: self.store.target_series().await?,
            disk_free: tokio::task::spawn_blocking(move || dpsync_agent::daemon::disk_free(&data_dir))
                .await
                .ok()
                .flatten(),
        };
        Ok(exposition(&self.metrics, &snapshot)?)
    }
}

fn seconds(ms: i64) -> f64 {
    ms as f64 / 1000.0
}

/// The exposition of one snapshot. Names are `dpsync_site_*` (counters end in `_total`);
/// scripts and alert rules (`docs/alerts.yml`) scrape them, so they never change.
fn exposition(m: &SiteMetrics, s: &Snapshot) -> anyhow::Result<String> {
    let mut registry = Registry::with_prefix("dpsync_site");
    for (name, help, value) in [
        ("refreshes", "Refreshes committed", &m.refreshes),
        ("refresh_failures", "Refreshes refused or failed", &m.refresh_failures),
        ("bytes_hashed", "Source bytes read and hashed", &m.bytes_hashed),
        ("bytes_sent", "Bytes sent to targets (request bodies)", &m.bytes_sent),
        ("bytes_from_peers", "Bytes pull DPs fetched from other DPs", &m.bytes_from_peers),
        ("jobs_succeeded", "Distribution jobs finished", &m.jobs_succeeded),
        ("jobs_retried", "Distribution attempts that will be retried", &m.jobs_retried),
        ("jobs_failed", "Distribution jobs failed for good", &m.jobs_failed),
    ] {
        registry.register(name, help, ConstCounter::new(value.load(Relaxed)));
    }
    registry.register("packages", "Packages on this site", ConstGauge::new(s.versions.len() as i64));
    let version = Family::<PackageLabels, Gauge>::default();
    for p in &s.versions {
        version.get_or_create(&PackageLabels { package: p.id.clone() }).set(p.current_version);
    }
    registry.register("package_version", "Current source version", version);

    let refreshed = Family::<PackageLabels, Gauge<f64, AtomicU64>>::default();
    let refresh_ok = Family::<PackageLabels, Gauge>::default();
    let refresh_took = Family::<PackageLabels, Gauge<f64, AtomicU64>>::default();
    {
        let last = m.last_refresh.lock().unwrap();
        for p in &s.versions {
            let Some(r) = last.get(&p.id) else { continue };
            let labels = PackageLabels { package: p.id.clone() };
            refreshed.get_or_create(&labels).set(seconds(r.at));
            refresh_ok.get_or_create(&labels).set(i64::from(r.ok));
            if let Some(ms) = r.duration_ms {
                refresh_took.get_or_create(&labels).set(ms as f64 / 1000.0);
            }
        }
    }
    registry.register(
        "package_last_refresh_timestamp_seconds",
        "When the last refresh run by this server ended (Unix time)",
        refreshed,
    );
    registry.register("package_last_refresh_success", "1 if the last refresh committed, 0 if it failed", refresh_ok);
    registry.register("package_last_refresh_duration_seconds", "How long the last refresh took", refresh_took);

    let distributions = Family::<DistributionLabels, Gauge>::default();
    for c in &s.states {
        let labels = DistributionLabels { kind: c.kind.as_str(), state: c.state.as_str() };
        distributions.get_or_create(&labels).set(c.count.try_into().unwrap_or(i64::MAX));
    }
    registry.register("distributions", "Distributions by target kind and state", distributions);

    let state = Family::<TargetStateLabels, Gauge>::default();
    let sent = Family::<TargetLabels, Counter>::default();
    let installed = Family::<TargetLabels, Gauge>::default();
    let success = Family::<TargetLabels, Gauge<f64, AtomicU64>>::default();
    let failures = Family::<TargetLabels, Gauge>::default();
    for t in &s.targets {
        let labels = TargetLabels { package: t.package_id.clone(), target: t.target_name.clone() };
        let state_labels = TargetStateLabels {
            package: t.package_id.clone(),
            target: t.target_name.clone(),
            kind: t.target_kind.as_str(),
            state: t.state.as_str(),
        };
        state.get_or_create(&state_labels).set(1);
        sent.get_or_create(&labels).inc_by(t.bytes_sent_total.max(0) as u64);
        if let Some(v) = t.installed_version {
            installed.get_or_create(&labels).set(v);
        }
        if let Some(at) = t.last_success_at {
            success.get_or_create(&labels).set(seconds(at));
        }
        failures.get_or_create(&labels).set(t.consecutive_failures);
    }
    registry.register("target_state", "1 for the current state of each (package, target)", state);
    registry.register("target_bytes_sent", "Bytes sent to the target for the package, ever", sent);
    registry.register("target_installed_version", "Source version the target last reported installed", installed);
    registry.register(
        "target_last_success_timestamp_seconds",
        "When the target last finished installing the package (Unix time)",
        success,
    );
    registry.register("target_consecutive_failures", "Failed attempts since the last success or request", failures);

    registry.register(
        "refresh_phase_duration_seconds",
        "Time spent in each phase of committed refreshes (load, scan, read, commit, total)",
        m.refresh_phases.clone(),
    );
    registry.register(
        "job_duration_seconds",
        "Distribution job durations by target kind and outcome",
        m.job_durations.clone(),
    );
    if let Some(free) = s.disk_free {
        registry.register(
            "disk_free_bytes",
            "Free space for the server on the data directory's filesystem",
            ConstGauge::new(i64::try_from(free).unwrap_or(i64::MAX)),
        );
    }
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry).map_err(|_| anyhow!("cannot encode the metrics"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpsync_store::DistState;
    use prometheus_parse::{Scrape, Value};

    fn parse(text: &str) -> Scrape {
        Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("a valid exposition")
    }

    fn sample<'a>(s: &'a Scrape, name: &str, labels: &[(&str, &str)]) -> &'a Value {
        &s.samples
            .iter()
            .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {name}{labels:?} in {:#?}", s.samples))
            .value
    }

    #[test]
    fn exposition_parses_with_the_names_scripts_scrape() {
        let m = SiteMetrics::default();
        m.refreshes.store(3, Relaxed);
        m.bytes_sent.store(1 << 40, Relaxed);
        let versions = [
            PackageVersion { id: "PS100001".into(), current_version: 3 },
            PackageVersion { id: "PS100002".into(), current_version: 0 },
        ];
        let states = [
            StateCount { kind: TargetKind::Dp, state: DistState::Installed, count: 2 },
            StateCount { kind: TargetKind::Site, state: DistState::Failed, count: 1 },
        ];
        let targets = vec![
            TargetSeries {
                package_id: "PS100001".into(),
                target_name: "dp1".into(),
                target_kind: TargetKind::Dp,
                state: DistState::Installed,
                installed_version: Some(3),
                bytes_sent_total: 5000,
                consecutive_failures: 0,
                last_success_at: Some(1_700_000_000_500),
            },
            TargetSeries {
                package_id: "PS100001".into(),
                target_name: "dp2".into(),
                target_kind: TargetKind::Dp,
                state: DistState::Failed,
                installed_version: None,
                bytes_sent_total: 0,
                consecutive_failures: 6,
                last_success_at: None,
            },
        ];
        m.record_job(TargetKind::Dp, "installed", Duration::from_millis(1500));
        let snapshot =
            Snapshot { versions: versions.to_vec(), states: states.to_vec(), targets, disk_free: Some(1 << 30) };
        let text = exposition(&m, &snapshot).unwrap();
        let s = parse(&text);
        assert_eq!(sample(&s, "dpsync_site_refreshes_total", &[]), &Value::Counter(3.0), "{text}");
        assert_eq!(sample(&s, "dpsync_site_bytes_sent_total", &[]), &Value::Counter((1u64 << 40) as f64));
        assert_eq!(sample(&s, "dpsync_site_jobs_failed_total", &[]), &Value::Counter(0.0));
        assert_eq!(sample(&s, "dpsync_site_packages", &[]), &Value::Gauge(2.0));
        assert_eq!(sample(&s, "dpsync_site_package_version", &[("package", "PS100001")]), &Value::Gauge(3.0));
        assert_eq!(sample(&s, "dpsync_site_package_version", &[("package", "PS100002")]), &Value::Gauge(0.0));
        let dist = |kind, state| sample(&s, "dpsync_site_distributions", &[("kind", kind), ("state", state)]);
        assert_eq!(dist("dp", "installed"), &Value::Gauge(2.0));
        assert_eq!(dist("site", "failed"), &Value::Gauge(1.0));
        assert_eq!(s.docs["dpsync_site_refreshes_total"], "Refreshes committed.");
        let target = |name, dp| sample(&s, name, &[("package", "PS100001"), ("target", dp)]);
        assert_eq!(target("dpsync_site_target_bytes_sent_total", "dp1"), &Value::Counter(5000.0));
        assert_eq!(target("dpsync_site_target_installed_version", "dp1"), &Value::Gauge(3.0));
        assert_eq!(target("dpsync_site_target_last_success_timestamp_seconds", "dp1"), &Value::Gauge(1_700_000_000.5));
        assert_eq!(target("dpsync_site_target_consecutive_failures", "dp2"), &Value::Gauge(6.0));
        assert_eq!(
            sample(&s, "dpsync_site_target_state", &[("target", "dp2"), ("state", "failed"), ("kind", "dp")]),
            &Value::Gauge(1.0)
        );
        assert!(!text.contains("dpsync_site_target_installed_version{package=\"PS100001\",target=\"dp2\"}"), "{text}");
        assert!(!text.contains("target_last_success_timestamp_seconds{package=\"PS100001\",target=\"dp2\"}"));
        match sample(&s, "dpsync_site_job_duration_seconds", &[("kind", "dp"), ("outcome", "installed")]) {
            Value::Histogram(h) => {
                assert!(h.iter().any(|b| b.less_than > 1.5 && b.count == 1.0), "{h:?}");
                assert!(h.iter().any(|b| b.less_than < 1.5 && b.count == 0.0), "{h:?}");
            }
            v => panic!("not a histogram: {v:?}"),
        }
        assert_eq!(sample(&s, "dpsync_site_disk_free_bytes", &[]), &Value::Gauge((1u64 << 30) as f64));
        // Line-oriented scripts keep working: one `name value` line per counter.
        assert!(text.lines().any(|l| l == "dpsync_site_refreshes_total 3"), "{text}");
        assert!(text.contains("dpsync_site_package_version{package=\"PS100001\"} 3\n"), "{text}");
    }

    #[test]
    fn the_last_refresh_of_each_package_is_its_result() {
        let m = SiteMetrics::default();
        let versions = vec![PackageVersion { id: "PS100001".into(), current_version: 3 }];
        let refused = Err(SiteError::Refused("source folder /src is missing; create it".into()));
        m.record_refresh("PS100001", &refused, Duration::from_millis(250));
        m.record_refresh("PS1FFFFF", &Err(SiteError::NotFound("no package".into())), Duration::ZERO);
        let last = m.last_refresh("PS100001").expect("recorded");
        assert_eq!((last.ok, last.duration_ms, last.source_version), (false, Some(250), None));
        assert_eq!(last.error.as_deref(), Some("source folder /src is missing; create it"));
        assert_eq!(m.last_refresh("PS1FFFFF"), None, "an unknown package gets no series");
        let text = exposition(&m, &Snapshot { versions, ..Snapshot::default() }).unwrap();
        let s = parse(&text);
        let pkg = [("package", "PS100001")];
        assert_eq!(sample(&s, "dpsync_site_package_last_refresh_success", &pkg), &Value::Gauge(0.0));
        assert_eq!(sample(&s, "dpsync_site_package_last_refresh_duration_seconds", &pkg), &Value::Gauge(0.25));
        // A failed refresh observes no phases.
        assert!(!text.contains("dpsync_site_refresh_phase_duration_seconds_bucket"), "{text}");
    }

    #[test]
    fn an_empty_site_still_exports_every_counter() {
        let s = parse(&exposition(&SiteMetrics::default(), &Snapshot::default()).unwrap());
        for name in ["refreshes", "refresh_failures", "bytes_hashed", "bytes_sent", "jobs_succeeded", "jobs_retried"] {
            assert_eq!(sample(&s, &format!("dpsync_site_{name}_total"), &[]), &Value::Counter(0.0));
        }
        assert_eq!(sample(&s, "dpsync_site_packages", &[]), &Value::Gauge(0.0));
    }
}
