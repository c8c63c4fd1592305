//! The site's `/metrics` (Prometheus text format 0.0.4, through `prometheus-client`),
//! served on the admin socket and on `--metrics-listen`.
//!
//! A registry is built for each scrape from a snapshot: the counters are plain atomics
//! bumped where the work happens, and the gauges come from two aggregate store queries,
//! so a scrape costs the same whatever the number of packages, and a deleted package's
//! series disappears with it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use anyhow::anyhow;
use dpsync_store::{PackageVersion, StateCount};
use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

use super::{Site, SiteError};

/// `Content-Type` of [`Site::metrics_text`].
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Counters exported on `/metrics` (the gauges are read from the store at scrape time).
#[derive(Debug, Default)]
pub struct SiteMetrics {
    pub refreshes: AtomicU64,
    pub refresh_failures: AtomicU64,
    pub bytes_hashed: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub jobs_succeeded: AtomicU64,
    pub jobs_retried: AtomicU64,
    pub jobs_failed: AtomicU64,
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

impl Site {
    /// Prometheus text exposition of the site's counters, its packages' versions and its
    /// distributions by target kind and state.
    pub async fn metrics_text(&self) -> Result<String, SiteError> {
        let versions = self.store.package_versions().await?;
        let states = self.store.distribution_state_counts().await?;
        Ok(exposition(&self.metrics, &versions, &states)?)
    }
}

/// The exposition of one snapshot. Names are `dpsync_site_*` (counters end in `_total`);
/// scripts scrape them, so they never change.
fn exposition(m: &SiteMetrics, versions: &[PackageVersion], states: &[StateCount]) -> anyhow::Result<String> {
    let mut registry = Registry::with_prefix("dpsync_site");
    for (name, help, value) in [
        ("refreshes", "Refreshes committed", &m.refreshes),
        ("refresh_failures", "Refreshes refused or failed", &m.refresh_failures),
        ("bytes_hashed", "Source bytes read and hashed", &m.bytes_hashed),
        ("bytes_sent", "Bytes sent to targets (request bodies)", &m.bytes_sent),
        ("jobs_succeeded", "Distribution jobs finished", &m.jobs_succeeded),
        ("jobs_retried", "Distribution attempts that will be retried", &m.jobs_retried),
        ("jobs_failed", "Distribution jobs failed for good", &m.jobs_failed),
    ] {
        registry.register(name, help, ConstCounter::new(value.load(Relaxed)));
    }
    registry.register("packages", "Packages on this site", ConstGauge::new(versions.len() as i64));
    let version = Family::<PackageLabels, Gauge>::default();
    for p in versions {
        version.get_or_create(&PackageLabels { package: p.id.clone() }).set(p.current_version);
    }
    registry.register("package_version", "Current source version", version);
    let distributions = Family::<DistributionLabels, Gauge>::default();
    for c in states {
        let labels = DistributionLabels { kind: c.kind.as_str(), state: c.state.as_str() };
        distributions.get_or_create(&labels).set(c.count.try_into().unwrap_or(i64::MAX));
    }
    registry.register("distributions", "Distributions by target kind and state", distributions);
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry).map_err(|_| anyhow!("cannot encode the metrics"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dpsync_store::{DistState, TargetKind};
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
        let text = exposition(&m, &versions, &states).unwrap();
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
        // Line-oriented scripts keep working: one `name value` line per counter.
        assert!(text.lines().any(|l| l == "dpsync_site_refreshes_total 3"), "{text}");
        assert!(text.contains("dpsync_site_package_version{package=\"PS100001\"} 3\n"), "{text}");
    }

    #[test]
    fn an_empty_site_still_exports_every_counter() {
        let s = parse(&exposition(&SiteMetrics::default(), &[], &[]).unwrap());
        for name in ["refreshes", "refresh_failures", "bytes_hashed", "bytes_sent", "jobs_succeeded", "jobs_retried"] {
            assert_eq!(sample(&s, &format!("dpsync_site_{name}_total"), &[]), &Value::Counter(0.0));
        }
        assert_eq!(sample(&s, "dpsync_site_packages", &[]), &Value::Gauge(0.0));
    }
}
