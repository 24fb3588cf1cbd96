//! The live table of services: one atomically swapped [`EndpointSet`] per
//! service, and the etcd position (cluster and revision) it reflects.
//!
//! Readers (the hot path) load a set without locking or waiting. The single
//! writer (the watch task, or a snapshot load) serialises on a mutex that is
//! never held across an `.await`, rebuilds only the services a batch touches,
//! and keeps the `Arc` of every endpoint whose registration did not change.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::endpoint::{Endpoint, EndpointSet};
use super::etcd::{Kv, KvChange, Position};
use super::key_format::{classify_key, parse_value, KeyKind, Registration, ValueError};
use super::lease::LeaseTable;
use crate::metrics::{DiscoveryMetrics, KindLabel, ReasonLabel};

/// Milliseconds on tokio's clock since the first call, from 1.
fn clock_ms() -> i64 {
    static ORIGIN: std::sync::OnceLock<tokio::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(tokio::time::Instant::now);
    tokio::time::Instant::now()
        .saturating_duration_since(origin)
        .as_millis() as i64
        + 1
}

/// The slot of one service. Routes keep the `Arc` and load from it per call;
/// a slot is never removed, so a service that comes back is seen by them.
#[derive(Debug)]
pub struct ServiceSlot {
    set: ArcSwap<EndpointSet>,
}

impl ServiceSlot {
    fn new(service: Arc<str>) -> Self {
        ServiceSlot {
            set: ArcSwap::from_pointee(EndpointSet::empty(service)),
        }
    }

    pub fn load(&self) -> Arc<EndpointSet> {
        self.set.load_full()
    }
}

type SlotMap = HashMap<Arc<str>, Arc<ServiceSlot>>;
type Listed = BTreeMap<Arc<str>, Option<(Registration, i64)>>;

#[derive(Debug)]
pub struct ServiceTable {
    prefix: String,
    slots: ArcSwap<SlotMap>,
    position: Mutex<Option<Position>>,
    writer: Mutex<()>,
    generation: AtomicU64,
    ready: AtomicBool,
    /// When etcd last said anything on the watch (tokio clock, ms; 0: never).
    heard_at_ms: AtomicI64,
    changes: watch::Sender<u64>,
    leases: Arc<LeaseTable>,
    metrics: DiscoveryMetrics,
}

/// What a batch did to one service, before it is swapped in.
enum Op {
    Put(Arc<str>, Registration, i64),
    Delete(Arc<str>),
}

impl ServiceTable {
    /// A table for the keys under `prefix` (a trailing `/` is implied).
    pub fn new(prefix: &str, metrics: DiscoveryMetrics) -> Self {
        let prefix = format!("{}/", prefix.trim_end_matches('/'));
        ServiceTable {
            prefix,
            slots: ArcSwap::from_pointee(SlotMap::new()),
            position: Mutex::new(None),
            writer: Mutex::new(()),
            generation: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            heard_at_ms: AtomicI64::new(0),
            changes: watch::channel(0).0,
            leases: Arc::new(LeaseTable::default()),
            metrics,
        }
    }

    /// The watched key prefix, ending in `/`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn leases(&self) -> &Arc<LeaseTable> {
        &self.leases
    }

    pub fn metrics(&self) -> &DiscoveryMetrics {
        &self.metrics
    }

    /// The current set of `service`, if it was ever seen.
    pub fn get(&self, service: &str) -> Option<Arc<EndpointSet>> {
        self.slots.load().get(service).map(|s| s.load())
    }

    /// The slot of `service`, created empty if unknown. For routes to hold.
    pub fn slot(&self, service: &str) -> Arc<ServiceSlot> {
        if let Some(slot) = self.slots.load().get(service) {
            return slot.clone();
        }
        let _writer = self.writer.lock().expect("table writer poisoned");
        self.slot_locked(service)
    }

    /// Every service with its current set, sorted by name.
    pub fn services(&self) -> BTreeMap<Arc<str>, Arc<EndpointSet>> {
        self.slots
            .load()
            .iter()
            .map(|(k, v)| (k.clone(), v.load()))
            .collect()
    }

    /// True once a full listing or a snapshot has been loaded.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// etcd said something on the watch just now.
    pub fn heard(&self) {
        self.heard_at_ms.store(clock_ms(), Ordering::Relaxed);
    }

    /// How long since etcd last said anything on the watch (an event, a
    /// progress notification, an answer to a progress request); `None`
    /// before it ever did. The sets are as old as this, or older.
    pub fn since_heard(&self) -> Option<std::time::Duration> {
        let at = self.heard_at_ms.load(Ordering::Relaxed);
        (at != 0).then(|| std::time::Duration::from_millis((clock_ms() - at).max(0) as u64))
    }

    pub fn position(&self) -> Option<Position> {
        *self.position.lock().expect("position poisoned")
    }

    /// Progress without events (a progress notification).
    pub fn advance_to(&self, position: Position) {
        let mut p = self.position.lock().expect("position poisoned");
        if p.is_none_or(|p| p.cluster_id != position.cluster_id || p.revision < position.revision) {
            *p = Some(position);
        }
    }

    /// Forgets the position so the next watch session re-lists (compaction).
    pub fn forget_position(&self) {
        *self.position.lock().expect("position poisoned") = None;
    }

    /// Counts changes; `changed()` on the receiver wakes on every applied change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Applies one batch of watch events at `position`.
    pub fn apply(&self, changes: &[KvChange<'_>], position: Position) {
        let _writer = self.writer.lock().expect("table writer poisoned");
        let mut by_service: BTreeMap<Arc<str>, Vec<Op>> = BTreeMap::new();
        for change in changes {
            match *change {
                KvChange::Put {
                    key, value, lease, ..
                } => {
                    self.metrics.events.get_or_create(&kind("put")).inc();
                    if let Some((service, key, reg)) = self.read(key, value) {
                        by_service
                            .entry(service)
                            .or_default()
                            .push(Op::Put(key, reg, lease));
                    }
                }
                KvChange::Delete { key } => {
                    self.metrics.events.get_or_create(&kind("delete")).inc();
                    let Ok(key) = std::str::from_utf8(key) else {
                        continue;
                    };
                    let Some(rest) = key.strip_prefix(&self.prefix) else {
                        continue;
                    };
                    if let Ok(KeyKind::Endpoint { service, .. }) = classify_key(rest) {
                        by_service
                            .entry(service.into())
                            .or_default()
                            .push(Op::Delete(key.into()));
                    }
                }
            }
        }
        let mut changed = false;
        for (service, ops) in by_service {
            let slot = self.slot_locked(&service);
            let current = slot.load();
            let mut endpoints: BTreeMap<Arc<str>, Arc<Endpoint>> = current
                .endpoints
                .iter()
                .map(|e| (e.key.clone(), e.clone()))
                .collect();
            for op in ops {
                match op {
                    Op::Put(key, reg, lease) => {
                        let fresh = self.endpoint(key.clone(), reg, lease);
                        match endpoints.get(&key) {
                            Some(old) if old.same_registration(&fresh) => {}
                            _ => {
                                endpoints.insert(key, Arc::new(fresh));
                            }
                        }
                    }
                    Op::Delete(key) => {
                        endpoints.remove(&key);
                    }
                }
            }
            changed |= self.swap_if_changed(&slot, &current, endpoints.into_values().collect());
        }
        self.advance_to(position);
        if changed {
            self.publish();
        }
    }

    /// Replaces the whole table with a full listing taken at `position`.
    /// Unchanged endpoints keep their `Arc`; services that vanished become empty.
    /// A key whose value cannot be read keeps the endpoint it had, if any.
    pub fn reset(&self, kvs: &[Kv<'_>], position: Position, reason: &'static str) {
        let _writer = self.writer.lock().expect("table writer poisoned");
        self.metrics
            .resyncs
            .get_or_create(&ReasonLabel { reason })
            .inc();
        // service -> key -> the registration read, or None when unreadable.
        let mut listed: BTreeMap<Arc<str>, Listed> = BTreeMap::new();
        for kv in kvs {
            let Ok(key) = std::str::from_utf8(kv.key) else {
                self.skip(&String::from_utf8_lossy(kv.key), &ValueError::KeyNotUtf8);
                continue;
            };
            let Some(rest) = key.strip_prefix(&self.prefix) else {
                continue;
            };
            match classify_key(rest) {
                Ok(KeyKind::Endpoint { service, id }) => {
                    let parsed = match parse_value(service, id, kv.value) {
                        Ok(reg) => Some((reg, kv.lease)),
                        Err(err) => {
                            self.skip(key, &err);
                            None
                        }
                    };
                    listed
                        .entry(service.into())
                        .or_default()
                        .insert(key.into(), parsed);
                }
                Ok(KeyKind::Reserved) => {}
                Err(err) => self.skip(key, &err),
            }
        }
        let known: Vec<Arc<str>> = self.slots.load().keys().cloned().collect();
        for service in known {
            listed.entry(service).or_default();
        }
        for (service, keys) in listed {
            let slot = self.slot_locked(&service);
            let current = slot.load();
            let mut endpoints = Vec::with_capacity(keys.len());
            for (key, parsed) in keys {
                let old = current.get(&key);
                match (parsed, old) {
                    (Some((reg, lease)), old) => {
                        let fresh = self.endpoint(key, reg, lease);
                        match old {
                            Some(old) if old.same_registration(&fresh) => {
                                endpoints.push(old.clone())
                            }
                            _ => endpoints.push(Arc::new(fresh)),
                        }
                    }
                    (None, Some(old)) => endpoints.push(old.clone()),
                    (None, None) => {}
                }
            }
            self.swap_if_changed(&slot, &current, endpoints);
        }
        *self.position.lock().expect("position poisoned") = Some(position);
        self.ready.store(true, Ordering::Release);
        // Published even when nothing changed: readiness is news too.
        self.publish();
    }

    /// Loads sets saved earlier (the snapshot file), before etcd answers.
    pub fn restore(
        &self,
        services: Vec<(Arc<str>, Vec<RestoredEndpoint>)>,
        position: Option<Position>,
    ) {
        let _writer = self.writer.lock().expect("table writer poisoned");
        for (service, eps) in services {
            let slot = self.slot_locked(&service);
            let current = slot.load();
            let mut endpoints: Vec<Arc<Endpoint>> = eps
                .into_iter()
                .map(|e| Arc::new(self.endpoint(e.key, e.registration, e.lease)))
                .collect();
            endpoints.sort_by(|a, b| a.key.cmp(&b.key));
            endpoints.dedup_by(|a, b| a.key == b.key);
            self.swap_if_changed(&slot, &current, endpoints);
        }
        *self.position.lock().expect("position poisoned") = position;
        self.ready.store(true, Ordering::Release);
        self.publish();
    }

    fn read(&self, key: &[u8], value: &[u8]) -> Option<(Arc<str>, Arc<str>, Registration)> {
        let Ok(key) = std::str::from_utf8(key) else {
            self.skip(&String::from_utf8_lossy(key), &ValueError::KeyNotUtf8);
            return None;
        };
        let rest = key.strip_prefix(&self.prefix)?;
        match classify_key(rest) {
            Ok(KeyKind::Endpoint { service, id }) => match parse_value(service, id, value) {
                Ok(reg) => Some((service.into(), key.into(), reg)),
                Err(err) => {
                    self.skip(key, &err);
                    None
                }
            },
            Ok(KeyKind::Reserved) => None,
            Err(err) => {
                self.skip(key, &err);
                None
            }
        }
    }

    fn skip(&self, key: &str, err: &ValueError) {
        self.metrics.skipped_values.inc();
        tracing::warn!(key, cause = %err, "skipped an etcd value that cannot be read; endpoints already known are kept");
    }

    fn endpoint(&self, key: Arc<str>, reg: Registration, lease: i64) -> Endpoint {
        Endpoint {
            key,
            addr: reg.addr.into(),
            weight: reg.weight,
            health: reg.health,
            metadata: reg.metadata,
            lease: self.leases.handle(lease),
        }
    }

    /// Needs the writer lock.
    fn slot_locked(&self, service: &str) -> Arc<ServiceSlot> {
        if let Some(slot) = self.slots.load().get(service) {
            return slot.clone();
        }
        let name: Arc<str> = service.into();
        let slot = Arc::new(ServiceSlot::new(name.clone()));
        let mut map = SlotMap::clone(&self.slots.load());
        map.insert(name, slot.clone());
        self.slots.store(Arc::new(map));
        self.metrics.services.set(self.slots.load().len() as i64);
        slot
    }

    fn swap_if_changed(
        &self,
        slot: &ServiceSlot,
        current: &EndpointSet,
        endpoints: Vec<Arc<Endpoint>>,
    ) -> bool {
        let unchanged = current.endpoints.len() == endpoints.len()
            && current
                .endpoints
                .iter()
                .zip(&endpoints)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if unchanged {
            return false;
        }
        self.metrics
            .endpoints
            .inc_by(endpoints.len() as i64 - current.endpoints.len() as i64);
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        slot.set.store(Arc::new(EndpointSet {
            service: current.service.clone(),
            endpoints,
            generation,
        }));
        true
    }

    fn publish(&self) {
        self.changes.send_modify(|n| *n += 1);
    }
}

/// An endpoint read back from the snapshot file.
#[derive(Debug)]
pub struct RestoredEndpoint {
    pub key: Arc<str>,
    pub registration: Registration,
    pub lease: i64,
}

fn kind(kind: &'static str) -> KindLabel {
    KindLabel { kind }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: Position = Position {
        cluster_id: 1,
        revision: 10,
    };

    fn put<'a>(key: &'a str, value: &'a str) -> KvChange<'a> {
        KvChange::Put {
            key: key.as_bytes(),
            value: value.as_bytes(),
            lease: 0,
            revision: 1,
        }
    }

    fn addrs(table: &ServiceTable, service: &str) -> Vec<String> {
        table
            .get(service)
            .map(|s| s.endpoints.iter().map(|e| e.addr.to_string()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn put_update_delete() {
        let table = ServiceTable::new("/svc", DiscoveryMetrics::default());
        table.apply(&[put("/svc/a/h:1", ""), put("/svc/a/h:2", "")], AT);
        assert_eq!(addrs(&table, "a"), ["h:1", "h:2"]);
        let before = table.get("a").unwrap();
        table.apply(&[put("/svc/a/h:1", r#"{"weight":5}"#)], AT);
        let after = table.get("a").unwrap();
        assert_eq!(after.endpoints[0].weight, 5);
        assert!(
            Arc::ptr_eq(&before.endpoints[1], &after.endpoints[1]),
            "untouched endpoint kept"
        );
        assert!(after.generation > before.generation);
        table.apply(&[KvChange::Delete { key: b"/svc/a/h:1" }], AT);
        assert_eq!(addrs(&table, "a"), ["h:2"]);
    }

    #[test]
    fn identical_reput_keeps_the_set() {
        let table = ServiceTable::new("/svc", DiscoveryMetrics::default());
        table.apply(&[put("/svc/a/h:1", "")], AT);
        let before = table.get("a").unwrap();
        table.apply(&[put("/svc/a/h:1", "")], AT);
        assert!(Arc::ptr_eq(&before, &table.get("a").unwrap()));
    }

    #[test]
    fn malformed_value_is_skipped_and_keeps_what_was_known() {
        let metrics = DiscoveryMetrics::default();
        let table = ServiceTable::new("/svc", metrics.clone());
        table.apply(&[put("/svc/a/h:1", ""), put("/svc/a/h:2", "")], AT);
        table.apply(
            &[
                put("/svc/a/h:1", "{oops"),
                put("/svc/a/h:3", r#"{"addr":""}"#),
            ],
            AT,
        );
        assert_eq!(addrs(&table, "a"), ["h:1", "h:2"]);
        assert_eq!(metrics.skipped_values.get(), 2);
    }

    #[test]
    fn reset_diffs_against_current_state() {
        let table = ServiceTable::new("/svc", DiscoveryMetrics::default());
        table.apply(
            &[
                put("/svc/a/h:1", ""),
                put("/svc/a/h:2", ""),
                put("/svc/b/h:3", ""),
            ],
            AT,
        );
        let kept = table.get("a").unwrap().endpoints[0].clone();
        let kv = |k: &'static str, v: &'static str| Kv {
            key: k.as_bytes(),
            value: v.as_bytes(),
            lease: 0,
            revision: 1,
        };
        table.reset(
            &[
                kv("/svc/a/h:1", ""),
                kv("/svc/a/h:4", ""),
                kv("/svc/_policies/x", "wasm"),
            ],
            Position {
                cluster_id: 1,
                revision: 20,
            },
            "test",
        );
        assert_eq!(addrs(&table, "a"), ["h:1", "h:4"]);
        assert!(Arc::ptr_eq(&kept, &table.get("a").unwrap().endpoints[0]));
        assert!(addrs(&table, "b").is_empty(), "vanished service is emptied");
        assert!(table.get("_policies").is_none());
        assert_eq!(table.position().unwrap().revision, 20);
    }

    #[test]
    fn keys_outside_the_prefix_are_ignored() {
        let table = ServiceTable::new("/svc/", DiscoveryMetrics::default());
        table.apply(&[put("/other/a/h:1", ""), put("/svcx/a/h:1", "")], AT);
        assert!(table.services().is_empty());
    }
}
