//! The data path's view of each service: its endpoints joined with their
//! backends, rebuilt only when the endpoint set changes (never per call),
//! and what the service keeps across calls: its fallback round-robin, its
//! retry budget, its counts and metric handles.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tower::retry::budget::TpsBudget;

use super::RetrySettings;
use crate::balance::RoundRobin;
use crate::discovery::{EndpointSet, ServiceSlot, ServiceTable};
use crate::members::{CodeCounts, Member, MemberCounts, Members};
use crate::metrics::{ProxyMetrics, ServiceLabel};
use crate::upstream::Backends;

/// Everything the data path keeps per service.
pub struct ServiceRuntime {
    pub name: Arc<str>,
    /// Its backends are reached over TLS.
    pub tls: bool,
    slot: Arc<ServiceSlot>,
    members: ArcSwap<Members>,
    /// The built-in round-robin: the policy of unrouted calls, and the
    /// fallback when a policy fails.
    pub fallback: RoundRobin,
    /// Retries this service may make: a failing service spends its own
    /// budget, never a healthy one's.
    /// Replaced (afresh) when a reload changes `[retry]`.
    pub retry_budget: ArcSwap<TpsBudget>,
    /// Calls the gateway answered without a backend's answer, by code.
    pub unanswered: CodeCounts,
    /// Counts per backend address, shared by that backend's members.
    counts: Mutex<HashMap<Arc<str>, Weak<MemberCounts>>>,
    pub latency: Histogram,
    pub panic_mode: Counter,
    pub retries: Counter,
    pub retries_budget_exhausted: Counter,
}

impl ServiceRuntime {
    /// The current members; rebuilt here when the endpoint set has changed.
    pub fn members(&self, backends: &Backends) -> Arc<Members> {
        let set = self.slot.load();
        let current = self.members.load_full();
        if Arc::ptr_eq(current.set(), &set) {
            return current;
        }
        let old: HashMap<&str, &Arc<Member>> =
            current.list.iter().map(|m| (&*m.endpoint.key, m)).collect();
        let mut counts = self.counts.lock().expect("service counts poisoned");
        let list = set
            .endpoints
            .iter()
            .map(|e| match old.get(&*e.key) {
                Some(m) if Arc::ptr_eq(&m.endpoint, e) => Arc::clone(m),
                _ => {
                    if let Some(lease) = &e.lease {
                        lease.mark_in_use();
                    }
                    let shared = match counts.get(&e.addr).and_then(Weak::upgrade) {
                        Some(c) => c,
                        None => {
                            let c = Arc::new(MemberCounts::default());
                            counts.insert(e.addr.clone(), Arc::downgrade(&c));
                            c
                        }
                    };
                    Arc::new(Member::new(
                        e.clone(),
                        backends.get(&e.addr, self.tls),
                        shared,
                    ))
                }
            })
            .collect();
        counts.retain(|_, c| c.strong_count() > 0);
        drop(counts);
        let fresh = Arc::new(Members::new(set, list));
        self.members.store(fresh.clone());
        fresh
    }

    /// The counts of every backend some member still refers to.
    pub fn backend_counts(&self) -> Vec<(Arc<str>, Arc<MemberCounts>)> {
        let counts = self.counts.lock().expect("service counts poisoned");
        counts
            .iter()
            .filter_map(|(addr, c)| Some((addr.clone(), c.upgrade()?)))
            .collect()
    }
}

/// Service runtimes by name: created for routes at start, and on first use
/// for services reached by name (only if etcd knows them, so client paths
/// cannot grow this map).
pub struct ServiceRuntimes {
    table: Arc<ServiceTable>,
    map: ArcSwap<HashMap<Arc<str>, Arc<ServiceRuntime>>>,
    writer: Mutex<()>,
    metrics: ProxyMetrics,
    retry: Mutex<RetrySettings>,
    transport: UpstreamTransport,
}

/// Which services' backends are reached over TLS: named ones (from their
/// routes), and the rest.
#[derive(Clone, Debug, Default)]
pub struct UpstreamTransport {
    pub tls_by_default: bool,
    pub services: HashMap<String, bool>,
}

impl UpstreamTransport {
    fn tls(&self, service: &str) -> bool {
        self.services
            .get(service)
            .copied()
            .unwrap_or(self.tls_by_default)
    }
}

impl std::fmt::Debug for ServiceRuntimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceRuntimes")
            .field("services", &self.map.load().len())
            .finish()
    }
}

impl ServiceRuntimes {
    pub fn new(
        table: Arc<ServiceTable>,
        metrics: ProxyMetrics,
        retry: RetrySettings,
        transport: UpstreamTransport,
    ) -> Self {
        ServiceRuntimes {
            table,
            map: ArcSwap::from_pointee(HashMap::new()),
            writer: Mutex::new(()),
            metrics,
            retry: Mutex::new(retry),
            transport,
        }
    }

    /// Every service's retries are budgeted by `retry` from now on (each
    /// budget starts afresh).
    pub fn set_retry(&self, retry: RetrySettings) {
        let _writer = self.writer.lock().expect("runtimes poisoned");
        for rt in self.map.load().values() {
            rt.retry_budget.store(Arc::new(retry.budget()));
        }
        *self.retry.lock().expect("retry settings") = retry;
    }

    /// True once discovery has loaded a listing or a snapshot.
    pub fn is_ready(&self) -> bool {
        self.table.is_ready()
    }

    /// The runtime of a service etcd knows, or `None`. Only names etcd
    /// lists make state (and metric series): never a name a client chose.
    pub fn known(&self, name: &str) -> Option<Arc<ServiceRuntime>> {
        if let Some(rt) = self.map.load().get(name) {
            return Some(rt.clone());
        }
        self.table.get(name)?;
        Some(self.create(name))
    }

    /// The runtime of `name`, created (empty) if etcd does not know it yet.
    pub fn create(&self, name: &str) -> Arc<ServiceRuntime> {
        let _writer = self.writer.lock().expect("runtimes poisoned");
        if let Some(rt) = self.map.load().get(name) {
            return rt.clone();
        }
        let slot = self.table.slot(name);
        let set = slot.load();
        let label = ServiceLabel {
            service: name.to_owned(),
        };
        let rt = Arc::new(ServiceRuntime {
            name: name.into(),
            tls: self.transport.tls(name),
            members: ArcSwap::from_pointee(Members::new(
                Arc::new(EndpointSet::empty(set.service.clone())),
                Vec::new(),
            )),
            slot,
            fallback: RoundRobin::default(),
            retry_budget: ArcSwap::from_pointee(
                self.retry.lock().expect("retry settings").budget(),
            ),
            unanswered: CodeCounts::default(),
            counts: Mutex::new(HashMap::new()),
            latency: self.metrics.call_duration.get_or_create(&label).clone(),
            panic_mode: self.metrics.panic_mode.get_or_create(&label).clone(),
            retries: self.metrics.retries.get_or_create(&label).clone(),
            retries_budget_exhausted: self
                .metrics
                .retries_budget_exhausted
                .get_or_create(&label)
                .clone(),
        });
        let mut map = HashMap::clone(&self.map.load());
        map.insert(rt.name.clone(), rt.clone());
        self.map.store(Arc::new(map));
        rt
    }

    pub fn all(&self) -> Vec<Arc<ServiceRuntime>> {
        self.map.load().values().cloned().collect()
    }
}
