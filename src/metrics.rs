//! Prometheus metrics, grouped by the module that records them.
//!
//! Each group registers itself into one shared [`Registry`]; a group built with
//! `Default` records into nothing visible, which is what unit tests want.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// What discovery records.
#[derive(Clone, Debug, Default)]
pub struct DiscoveryMetrics {
    /// Watch events applied, by kind (`put`, `delete`).
    pub events: Family<KindLabel, Counter>,
    /// Full re-lists applied as a reset, by reason.
    pub resyncs: Family<ReasonLabel, Counter>,
    /// etcd values that could not be read and were skipped.
    pub skipped_values: Counter,
    /// Watch sessions that ended in an error and were resumed.
    pub watch_restarts: Counter,
    /// 1 while a watch session is established and synced, else 0.
    pub etcd_connected: Gauge,
    pub services: Gauge,
    pub endpoints: Gauge,
    /// Snapshot file writes that failed.
    pub snapshot_failures: Counter,
}

impl DiscoveryMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = DiscoveryMetrics::default();
        let r = registry.sub_registry_with_prefix("weir_discovery");
        r.register("events", "etcd watch events applied", m.events.clone());
        r.register(
            "resyncs",
            "full re-lists applied as a reset",
            m.resyncs.clone(),
        );
        r.register(
            "skipped_values",
            "etcd values that could not be read and were skipped",
            m.skipped_values.clone(),
        );
        r.register(
            "watch_restarts",
            "watch sessions that ended in an error and were resumed",
            m.watch_restarts.clone(),
        );
        r.register(
            "etcd_connected",
            "1 while the etcd watch is established and synced",
            m.etcd_connected.clone(),
        );
        r.register("services", "services known", m.services.clone());
        r.register("endpoints", "endpoints known", m.endpoints.clone());
        r.register(
            "snapshot_failures",
            "snapshot file writes that failed",
            m.snapshot_failures.clone(),
        );
        m
    }
}
