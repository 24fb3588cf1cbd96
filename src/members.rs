//! The membership vocabulary shared by the balancing seam, the policy host
//! and the data path: a service's endpoints joined with their backends, at
//! one generation of its endpoint set.
//!
//! It sits above discovery (endpoints) and upstream (backends) and below
//! everything that picks or forwards, so `balance`, `policy` and `proxy`
//! speak of the same members without depending on one another.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;

use crate::discovery::{DeclaredHealth, Endpoint, EndpointSet};
use crate::upstream::{Backend, Backends};

/// One endpoint of a service, with its backend and its call counters.
pub struct Member {
    pub endpoint: Arc<Endpoint>,
    pub backend: Arc<Backend>,
    /// Calls ended on this member, indexed by gRPC status code.
    calls: Vec<Counter>,
}

impl Member {
    /// `calls` holds one counter per gRPC status code (empty: not counted).
    pub fn new(endpoint: Arc<Endpoint>, backend: Arc<Backend>, calls: Vec<Counter>) -> Self {
        Member {
            endpoint,
            backend,
            calls,
        }
    }

    /// May a call be routed here (declared healthy, passing checks, not ejected)?
    pub fn is_usable(&self) -> bool {
        self.endpoint.health == DeclaredHealth::Healthy && self.backend.is_usable()
    }

    pub fn count_call(&self, code: u32) {
        if let Some(c) = self.calls.get(code as usize) {
            c.inc();
        }
    }
}

/// A service's members at one generation of its endpoint set.
pub struct Members {
    set: Arc<EndpointSet>,
    pub list: Vec<Arc<Member>>,
}

impl Members {
    pub fn new(set: Arc<EndpointSet>, list: Vec<Arc<Member>>) -> Self {
        Members { set, list }
    }

    /// Members for a set outside any service: no metrics, no connections made
    /// (synthetic sets for policy checks and benchmarks).
    pub fn unconnected(set: Arc<EndpointSet>, backends: &Backends) -> Members {
        let list = set
            .endpoints
            .iter()
            .map(|e| Arc::new(Member::new(e.clone(), backends.get(&e.addr), Vec::new())))
            .collect();
        Members { set, list }
    }

    /// The endpoint set these members were built from.
    pub fn set(&self) -> &Arc<EndpointSet> {
        &self.set
    }

    pub fn generation(&self) -> u64 {
        self.set.generation
    }

    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}
