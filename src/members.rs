//! The membership vocabulary shared by the balancing seam, the policy host
//! and the data path: a service's endpoints joined with their backends, at
//! one generation of its endpoint set.
//!
//! It sits above discovery (endpoints) and upstream (backends) and below
//! everything that picks or forwards, so `balance`, `policy` and `proxy`
//! speak of the same members without depending on one another.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::discovery::{DeclaredHealth, Endpoint, EndpointSet};
use crate::upstream::{Backend, Backends};

/// How many of something ended with each gRPC status code (0 to 16).
#[derive(Debug, Default)]
pub struct CodeCounts([AtomicU64; 17]);

impl CodeCounts {
    /// Counts one; codes beyond 16 count as UNKNOWN (2).
    pub fn inc(&self, code: u32) {
        let i = if (code as usize) < self.0.len() {
            code as usize
        } else {
            2
        };
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    /// `(code, count)` for every code counted at least once.
    pub fn nonzero(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.0
            .iter()
            .enumerate()
            .map(|(code, n)| (code as u32, n.load(Ordering::Relaxed)))
            .filter(|(_, n)| *n > 0)
    }

    pub fn total(&self) -> u64 {
        self.0.iter().map(|n| n.load(Ordering::Relaxed)).sum()
    }
}

/// What one backend of one service did: calls that ended there (the last
/// attempt went to it) and attempts. Shared by every member for that
/// backend across endpoint-set generations; gone with the last of them.
#[derive(Debug, Default)]
pub struct MemberCounts {
    pub calls: CodeCounts,
    pub attempts: CodeCounts,
}

/// One endpoint of a service, with its backend and its counts.
pub struct Member {
    pub endpoint: Arc<Endpoint>,
    pub backend: Arc<Backend>,
    pub counts: Arc<MemberCounts>,
}

impl Member {
    pub fn new(endpoint: Arc<Endpoint>, backend: Arc<Backend>, counts: Arc<MemberCounts>) -> Self {
        Member {
            endpoint,
            backend,
            counts,
        }
    }

    /// May a call be routed here (declared healthy, passing checks, not ejected)?
    pub fn is_usable(&self) -> bool {
        self.endpoint.health == DeclaredHealth::Healthy && self.backend.is_usable()
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
            .map(|e| {
                let counts = Arc::new(MemberCounts::default());
                Arc::new(Member::new(e.clone(), backends.get(&e.addr, false), counts))
            })
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
