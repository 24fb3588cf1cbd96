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
    /// Request headers the policy may not read.
    pub hidden_headers: &'a Arc<HiddenHeaders>,
}

/// Request headers a policy may not read (`call.header` answers none):
/// credentials by default, plus a route's `hide_headers`, less its
/// `expose_headers`. Names are lower case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HiddenHeaders(Vec<String>);

/// Hidden unless a route exposes them: they carry credentials.
pub const SENSITIVE_HEADERS: [&str; 3] = ["authorization", "cookie", "proxy-authorization"];

impl HiddenHeaders {
    pub fn for_route(hide: &[String], expose: &[String]) -> HiddenHeaders {
        let exposed: Vec<String> = expose.iter().map(|h| h.to_ascii_lowercase()).collect();
        let mut hidden: Vec<String> = SENSITIVE_HEADERS
            .iter()
            .map(|h| (*h).to_owned())
            .chain(hide.iter().map(|h| h.to_ascii_lowercase()))
            .filter(|h| !exposed.contains(h))
            .collect();
        hidden.sort();
        hidden.dedup();
        HiddenHeaders(hidden)
    }

    /// The default set, for calls no route matched.
    pub fn sensitive() -> &'static Arc<HiddenHeaders> {
        static SENSITIVE: std::sync::OnceLock<Arc<HiddenHeaders>> = std::sync::OnceLock::new();
        SENSITIVE.get_or_init(|| Arc::new(HiddenHeaders::for_route(&[], &[])))
    }

    /// Whether `name` (lower case) is hidden.
    pub fn hides(&self, name: &str) -> bool {
        self.0.iter().any(|h| h == name)
    }
}

/// A route's settings for its policy: `[route.options]` in the config.
pub type RouteOptions = std::collections::BTreeMap<String, String>;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct PickError(pub String);

/// `placed_by` of a call the policy gave no usable pick for: the built-in
/// round-robin placed it (the policy hears its outcome as the current
/// version's).
pub const PLACED_BY_FALLBACK: u8 = u8::MAX;

pub trait Balancer: Send + Sync + 'static {
    fn name(&self) -> &str;
    /// Returns a position in `ctx.candidates`.
    fn pick(&self, ctx: &PickContext<'_>) -> Result<usize, PickError>;
    /// [`pick`](Self::pick), and which of the balancer's versions placed
    /// the call (0 unless a rollout tries a candidate): given back in the
    /// call's [`Outcome::placed_by`].
    fn pick_placed(&self, ctx: &PickContext<'_>) -> Result<(usize, u8), PickError> {
        self.pick(ctx).map(|position| (position, 0))
    }
    /// True when the policy wants to be told each call's outcome; the proxy
    /// keeps nothing for `observe` otherwise.
    fn learns(&self) -> bool {
        false
    }
    /// The version that placed a call (`placed_by` as `pick_placed` said,
    /// or [`PLACED_BY_FALLBACK`]), as the access log names it; `None` for
    /// the built-in balancers.
    fn placed_version(&self, _placed_by: u8) -> Option<String> {
        None
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
    /// What [`Balancer::pick_placed`] said placed the call.
    pub placed_by: u8,
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
