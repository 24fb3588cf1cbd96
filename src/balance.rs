//! The seam where a policy picks the backend of a call.
//!
//! A [`Balancer`] sees the call and the usable candidates and returns the
//! position of its choice among them. [`RoundRobin`] is the native policy
//! and the fallback whenever a policy fails.

use std::sync::atomic::{AtomicUsize, Ordering};

use std::sync::Arc;

use http::HeaderMap;

use crate::members::Members;

/// One call, as a policy sees it.
pub struct PickContext<'a> {
    pub service: &'a str,
    pub method: &'a str,
    /// The request's headers, shared (policies that read them keep a reference).
    pub headers: &'a Arc<HeaderMap>,
    pub members: &'a Arc<Members>,
    /// Positions in `members` that may be picked (usable, not yet tried).
    pub candidates: &'a [usize],
    /// The matched route's `[route.options]` (none for unrouted calls).
    pub options: Option<&'a Arc<RouteOptions>>,
}

/// A route's settings for its policy: `[route.options]` in the config.
pub type RouteOptions = std::collections::BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PickError(pub String);

pub trait Balancer: Send + Sync + 'static {
    fn name(&self) -> &str;
    /// Returns a position in `ctx.candidates`.
    fn pick(&self, ctx: &PickContext<'_>) -> Result<usize, PickError>;
    /// True when the policy wants to be told each call's outcome; the proxy
    /// keeps nothing for `observe` otherwise.
    fn learns(&self) -> bool {
        false
    }
    /// How a call this policy placed ended. Called as the call ends, on the
    /// thread that ends it: keep it short.
    fn observe(&self, _outcome: &Outcome) {}
}

/// How a call ended, told to policies that learn from outcomes.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// The generation of the endpoint set the pick was made on.
    pub generation: u64,
    /// The endpoint's index in that set (its position in `Members`).
    pub set_index: u32,
    /// The call's gRPC status code.
    pub status: u32,
    /// From the gateway's receipt of the call to its end, in microseconds.
    pub latency_us: u32,
}

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Balancer for RoundRobin {
    fn name(&self) -> &str {
        "round-robin"
    }

    fn pick(&self, ctx: &PickContext<'_>) -> Result<usize, PickError> {
        if ctx.candidates.is_empty() {
            return Err(PickError("no candidates".into()));
        }
        Ok(self.next.fetch_add(1, Ordering::Relaxed) % ctx.candidates.len())
    }
}
