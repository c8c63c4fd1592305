//! The receiver's `/metrics` (Prometheus text format 0.0.4, through `prometheus-client`).
//!
//! A registry is built for each scrape from the counters (plain atomics bumped where the
//! work happens) and the sink's own series, so a removed package's series disappears
//! with it. Every name starts with `dpsync_agent_`; scripts scrape them, so they never
//! change.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::registry::Registry;

/// Counters of the receiving core, whatever its sink.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) chunks_received: AtomicU64,
    pub(crate) chunk_bytes_received: AtomicU64,
    pub(crate) installs: AtomicU64,
    pub(crate) files_built: AtomicU64,
    pub(crate) files_written_on_arrival: AtomicU64,
    pub(crate) chunks_rejected: AtomicU64,
    pub(crate) validations: AtomicU64,
    pub(crate) validation_failures: AtomicU64,
}

impl Metrics {
    pub(crate) fn register(&self, registry: &mut Registry) {
        register_counters(
            registry,
            [
                ("chunks_received", "Verified chunks received", &self.chunks_received),
                ("chunk_bytes_received", "Bytes of verified chunks received", &self.chunk_bytes_received),
                ("installs", "Versions installed", &self.installs),
                ("files_built", "Files assembled from chunks", &self.files_built),
                (
                    "files_written_on_arrival",
                    "Files written whole from arriving chunks (not assembled at commit)",
                    &self.files_written_on_arrival,
                ),
                ("chunks_rejected", "Chunks that failed verification on arrival (sent again)", &self.chunks_rejected),
                ("validations", "Validations of installed packages", &self.validations),
                ("validation_failures", "Validations that found damaged or missing files", &self.validation_failures),
            ],
        );
    }
}

/// Registers each `(name, help, counter)` as a counter `NAME_total` with its current value.
pub(crate) fn register_counters<'a>(
    registry: &mut Registry,
    counters: impl IntoIterator<Item = (&'static str, &'static str, &'a AtomicU64)>,
) {
    for (name, help, value) in counters {
        registry.register(name, help, ConstCounter::new(value.load(Relaxed)));
    }
}

/// The `package` label of per-package series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub(crate) struct PackageLabels {
    pub(crate) package: String,
}

/// A registry for one scrape: series registered in it are named `dpsync_agent_*`.
pub(crate) fn registry() -> Registry {
    Registry::with_prefix("dpsync_agent")
}

/// The text exposition of `registry`.
pub(crate) fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing to a String fails only if an encoder reports an error, and these do not.
    if prometheus_text::encode(&mut out, registry).is_err() {
        tracing::error!("cannot encode the metrics");
    }
    out
}
