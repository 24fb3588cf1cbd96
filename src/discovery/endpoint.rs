//! The immutable picture of one service's instances, as the hot path reads it.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::lease::LeaseHandle;

/// What the registration itself says about an instance's health. Active health
/// checks (the data path) come on top of this; they never rewrite it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeclaredHealth {
    Healthy,
    Unhealthy,
}

impl DeclaredHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            DeclaredHealth::Healthy => "healthy",
            DeclaredHealth::Unhealthy => "unhealthy",
        }
    }
}

/// One backend instance as registered in etcd.
///
/// Identity is the etcd key: two keys naming the same address are two
/// endpoints, and metadata never takes part in identity.
#[derive(Debug)]
pub struct Endpoint {
    pub key: Arc<str>,
    pub addr: Arc<str>,
    pub weight: u32,
    pub health: DeclaredHealth,
    pub metadata: BTreeMap<String, String>,
    /// The etcd lease that keeps the key alive, if any, with its polled TTL.
    pub lease: Option<LeaseHandle>,
}

impl Endpoint {
    pub fn lease_id(&self) -> Option<i64> {
        self.lease.as_ref().map(|l| l.id())
    }

    /// True when `other` describes the same registration, so a reset can keep
    /// the existing `Arc` (and whatever per-endpoint state hangs off it).
    pub fn same_registration(&self, other: &Endpoint) -> bool {
        self.key == other.key
            && self.addr == other.addr
            && self.weight == other.weight
            && self.health == other.health
            && self.metadata == other.metadata
            && self.lease_id() == other.lease_id()
    }
}

/// An immutable snapshot of one service's endpoints, sorted by key.
/// Rebuilt by discovery on change and swapped in whole.
#[derive(Debug)]
pub struct EndpointSet {
    pub service: Arc<str>,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Changes whenever the set changes; policies use it to rebuild derived
    /// state (hash rings, tables) only when needed.
    pub generation: u64,
}

impl EndpointSet {
    pub fn empty(service: Arc<str>) -> Self {
        EndpointSet {
            service,
            endpoints: Vec::new(),
            generation: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&Arc<Endpoint>> {
        self.endpoints
            .binary_search_by(|e| (*e.key).cmp(key))
            .ok()
            .map(|i| &self.endpoints[i])
    }
}

impl Endpoint {
    /// The JSON shape shown by `weir discover --json` and the admin views.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "key": &*self.key,
            "addr": &*self.addr,
            "weight": self.weight,
            "status": self.health.as_str(),
            "metadata": self.metadata,
            "lease": self.lease_id(),
            "lease_ttl_ms": self.lease.as_ref().and_then(|l| l.remaining_ms()),
        })
    }
}
