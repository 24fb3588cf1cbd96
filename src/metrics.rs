//! Prometheus metrics, grouped by the module that records them.
//!
//! Each group registers itself into one shared [`Registry`]; a group built with
//! `Default` records into nothing visible, which is what unit tests want.
//! Series whose label sets come and go with backends (calls per backend,
//! pool and health figures) are not kept here: their owners count in plain
//! atomics and a collector encodes them at scrape time with
//! [`encode_counters`] and [`encode_gauges`], so a backend that leaves
//! takes its series with it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub service: String,
    pub backend: String,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabels {
    pub backend: String,
    pub result: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

/// What the data path records. (Calls and attempts per backend are
/// counted by the proxy and encoded at scrape time.)
#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    /// Call latency per service, gateway-answered calls included (`-`: no service).
    pub call_duration: Family<ServiceLabel, Histogram, fn() -> Histogram>,
    pub retries: Family<ServiceLabel, Counter>,
    /// Retries refused because the service's retry budget was spent.
    pub retries_budget_exhausted: Family<ServiceLabel, Counter>,
    /// Calls routed to every endpoint because none was usable.
    pub panic_mode: Family<ServiceLabel, Counter>,
    pub active_calls: Gauge,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        ProxyMetrics {
            call_duration: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            retries_budget_exhausted: Family::default(),
            panic_mode: Family::default(),
            active_calls: Gauge::default(),
        }
    }
}

impl ProxyMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = ProxyMetrics::default();
        let r = registry.sub_registry_with_prefix("weir");
        r.register(
            "call_duration_seconds",
            "call latency, from the request's arrival to the response's end, once per call (gateway-answered calls included)",
            m.call_duration.clone(),
        );
        r.register(
            "retries",
            "calls sent again to another backend",
            m.retries.clone(),
        );
        r.register(
            "retries_budget_exhausted",
            "retries refused because the service's retry budget was spent",
            m.retries_budget_exhausted.clone(),
        );
        r.register(
            "panic_mode",
            "calls routed to all endpoints because none was usable",
            m.panic_mode.clone(),
        );
        r.register("active_calls", "calls in flight", m.active_calls.clone());
        m
    }
}

/// What the client listener records.
#[derive(Clone, Debug, Default)]
pub struct ClientConnMetrics {
    /// Client connections open now.
    pub open: Gauge,
    /// Connections closed at once because `max_connections` were open.
    pub refused: Counter,
    /// Connections the gateway ended, by reason (`handshake_timeout`,
    /// `idle`, `max_age`).
    pub closed: Family<ReasonLabel, Counter>,
}

impl ClientConnMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = ClientConnMetrics::default();
        let r = registry.sub_registry_with_prefix("weir_client");
        r.register("connections", "client connections open", m.open.clone());
        r.register(
            "connections_refused",
            "client connections closed at once: limits.max_connections were open",
            m.refused.clone(),
        );
        r.register(
            "connections_closed",
            "client connections the gateway ended, by reason",
            m.closed.clone(),
        );
        m
    }

    pub fn closed(&self, reason: &'static str) {
        self.closed.get_or_create(&ReasonLabel { reason }).inc();
    }
}

/// A counter family computed at scrape time from plain values.
pub fn encode_counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        let mut metric: MetricEncoder<'_> = family.encode_family(&labels)?;
        metric.encode_counter::<NoLabelSet, u64, u64>(&value, None)?;
    }
    Ok(())
}

/// A gauge family computed at scrape time from plain values.
pub fn encode_gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, V)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in rows {
        let mut metric = family.encode_family(&labels)?;
        metric.encode_gauge(&value)?;
    }
    Ok(())
}

/// A rollout's figures by policy and the version that placed the calls
/// (`current` or `candidate`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabels {
    pub policy: String,
    pub version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyLabel {
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyKindLabels {
    pub policy: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyResultLabels {
    pub policy: String,
    pub result: &'static str,
}

fn pick_histogram() -> Histogram {
    Histogram::new([
        0.000_000_1,
        0.000_000_25,
        0.000_000_5,
        0.000_001,
        0.000_002_5,
        0.000_005,
        0.000_01,
        0.000_025,
        0.000_1,
        0.001,
    ])
}

/// A thread's slot among the [`SLOTS`] of a [`Spread`]: threads are
/// numbered in the order they first ask (a gateway's serving threads, a
/// client-side channel's tokio workers).
pub fn thread_slot() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local!(static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed));
    SLOT.with(|slot| *slot)
}

/// Slots of a [`Spread`] (threads beyond share them).
pub const SLOTS: usize = 8;

/// One value on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Padded<T>(pub T);

/// A counter every thread adds to on every call, kept as one count per
/// thread slot, each on its own cache line, summed when read: one shared
/// counter written by two cores moves its line between them on every
/// add. (`weir_policy_picks_total` was such a counter; with the version's
/// own count and the epoch ticker's, a WebAssembly pick wrote four lines
/// both serving threads wrote.)
#[derive(Debug, Default)]
pub struct Spread([Padded<AtomicU64>; SLOTS]);

impl Spread {
    /// Adds one; what this thread's slot held before.
    pub fn add(&self) -> u64 {
        self.add_by(1)
    }

    fn add_by(&self, v: u64) -> u64 {
        self.0[thread_slot() % SLOTS]
            .0
            .fetch_add(v, Ordering::Relaxed)
    }

    pub fn sum(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

impl prometheus_client::metrics::counter::Atomic<u64> for Spread {
    fn inc(&self) -> u64 {
        self.add()
    }

    fn inc_by(&self, v: u64) -> u64 {
        self.add_by(v)
    }

    fn get(&self) -> u64 {
        self.sum()
    }
}

/// A counter in a [`Spread`].
pub type SpreadCounter = Counter<u64, Spread>;

/// What the policy host records.
#[derive(Clone, Debug)]
pub struct PolicyMetrics {
    /// Added to on every pick by every serving thread: spread.
    pub picks: Family<PolicyLabel, SpreadCounter>,
    pub pick_duration: Family<PolicyLabel, Histogram, fn() -> Histogram>,
    /// Picks that failed (trap, deadline, memory, out of range, error), by kind.
    pub faults: Family<PolicyKindLabels, Counter>,
    /// Versions installed or refused.
    pub reloads: Family<PolicyResultLabels, Counter>,
    pub reverts: Family<PolicyLabel, Counter>,
    /// Failing versions taken out of service with nothing to revert to.
    pub disabled: Family<PolicyLabel, Counter>,
    /// Components refused for their provenance (name not allowed, signature).
    pub refused: Family<ReasonLabel, Counter>,
}

impl Default for PolicyMetrics {
    fn default() -> Self {
        PolicyMetrics {
            picks: Family::default(),
            pick_duration: Family::new_with_constructor(pick_histogram),
            faults: Family::default(),
            reloads: Family::default(),
            reverts: Family::default(),
            disabled: Family::default(),
            refused: Family::default(),
        }
    }
}

impl PolicyMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = PolicyMetrics::default();
        let r = registry.sub_registry_with_prefix("weir_policy");
        r.register(
            "picks",
            "picks asked of a WebAssembly policy",
            m.picks.clone(),
        );
        r.register(
            "pick_duration_seconds",
            "time a policy took to pick",
            m.pick_duration.clone(),
        );
        r.register(
            "faults",
            "picks that failed and fell back to round-robin, by kind",
            m.faults.clone(),
        );
        r.register(
            "reloads",
            "policy versions installed (ok) or refused (failed)",
            m.reloads.clone(),
        );
        r.register(
            "reverts",
            "failing versions reverted to their last good version",
            m.reverts.clone(),
        );
        r.register(
            "refused",
            "components refused for their provenance ([policy] allow, trusted_keys), by reason",
            m.refused.clone(),
        );
        r.register(
            "disabled",
            "failing versions taken out of service with no earlier version to revert to",
            m.disabled.clone(),
        );
        m
    }

    pub fn fault(&self, policy: &str, kind: &'static str) {
        self.faults
            .get_or_create(&PolicyKindLabels {
                policy: policy.to_owned(),
                kind,
            })
            .inc();
    }

    pub fn reload(&self, policy: &str, result: &'static str) {
        self.reloads
            .get_or_create(&PolicyResultLabels {
                policy: policy.to_owned(),
                result,
            })
            .inc();
    }

    pub fn disabled(&self, policy: &str) {
        self.disabled
            .get_or_create(&PolicyLabel {
                policy: policy.to_owned(),
            })
            .inc();
    }

    pub fn reverted(&self, policy: &str) {
        self.reverts
            .get_or_create(&PolicyLabel {
                policy: policy.to_owned(),
            })
            .inc();
    }
}
