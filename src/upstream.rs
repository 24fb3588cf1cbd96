//! Upstream: one [`Backend`] per address, shared by every service that lists
//! it: its connection pool, its load, its health and its outlier state.
//!
//! Backends live as long as some endpoint set references them; the registry
//! holds them weakly, so a backend that leaves etcd is dropped (and its
//! connections closed) once the last call on it ends.

mod exchange;
pub(crate) mod health;
mod load;
mod outlier;
mod pool;
mod replay;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;

use crate::metrics::{encode_counters, encode_gauges, BackendLabel, HealthLabels};
use crate::tls::ClientTls;

pub use exchange::{send, strip_connection_headers, SendError, UpstreamBody};
pub use health::HealthCheckSettings;
pub use load::Load;
pub use outlier::{Outlier, OutlierSettings, OutlierVerdict};
pub use pool::{Pool, PoolConfig, PoolError, PoolView, Stream, StreamPermit, STREAM_IDS};
pub use replay::{BoxError, ReplayBody, RequestBody};

/// What active health checks last concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CheckedHealth {
    /// Not checked yet, checks disabled, or the backend has no health service.
    Unknown = 0,
    Serving = 1,
    NotServing = 2,
}

impl CheckedHealth {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckedHealth::Unknown => "unknown",
            CheckedHealth::Serving => "serving",
            CheckedHealth::NotServing => "not_serving",
        }
    }
}

#[derive(Debug)]
pub struct Backend {
    pub addr: Arc<str>,
    /// `addr` as a URI authority, parsed once (`None`: not one; such a
    /// backend is never dialled successfully either).
    authority: Option<http::uri::Authority>,
    pub pool: Arc<Pool>,
    pub load: Load,
    pub outlier: Outlier,
    health: AtomicU8,
    streak: Mutex<(u32, u32)>,
    check_running: AtomicBool,
    /// Health-check results by kind (unknown, serving, not serving).
    checks: [AtomicU64; 3],
}

impl Backend {
    /// The URI of a request to this backend for `path` (`http`: TLS, when
    /// used, is the connection's). `None` when the address is no authority.
    pub fn uri(&self, path: http::uri::PathAndQuery) -> Option<http::Uri> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(self.authority.clone()?);
        parts.path_and_query = Some(path);
        http::Uri::from_parts(parts).ok()
    }

    fn new(addr: Arc<str>, pool: PoolConfig, tls: Option<Arc<ClientTls>>) -> Self {
        Backend {
            pool: Arc::new(Pool::new(addr.clone(), pool, tls)),
            authority: addr.parse().ok(),
            addr,
            load: Load::default(),
            outlier: Outlier::default(),
            health: AtomicU8::new(CheckedHealth::Unknown as u8),
            streak: Mutex::new((0, 0)),
            check_running: AtomicBool::new(false),
            checks: Default::default(),
        }
    }

    /// Health checks that concluded `result`, since the backend appeared.
    pub fn checks(&self, result: CheckedHealth) -> u64 {
        self.checks[result as usize].load(Ordering::Relaxed)
    }

    pub fn health(&self) -> CheckedHealth {
        match self.health.load(Ordering::Relaxed) {
            1 => CheckedHealth::Serving,
            2 => CheckedHealth::NotServing,
            _ => CheckedHealth::Unknown,
        }
    }

    /// Records one health-check result and applies the thresholds; returns the
    /// new state when it changed.
    pub fn record_check(
        &self,
        result: CheckedHealth,
        healthy_after: u32,
        unhealthy_after: u32,
    ) -> Option<CheckedHealth> {
        self.checks[result as usize].fetch_add(1, Ordering::Relaxed);
        let mut streak = self.streak.lock().expect("health streak poisoned");
        let current = self.health();
        let next = match result {
            CheckedHealth::Unknown => CheckedHealth::Unknown,
            CheckedHealth::Serving => {
                *streak = (streak.0 + 1, 0);
                if current == CheckedHealth::Serving
                    || streak.0 >= healthy_after
                    || current == CheckedHealth::Unknown
                {
                    CheckedHealth::Serving
                } else {
                    current
                }
            }
            CheckedHealth::NotServing => {
                *streak = (0, streak.1 + 1);
                if streak.1 >= unhealthy_after {
                    CheckedHealth::NotServing
                } else {
                    current
                }
            }
        };
        self.health.store(next as u8, Ordering::Relaxed);
        (next != current).then_some(next)
    }

    /// Health checks stopped: no verdict holds any more.
    pub fn forget_health(&self) {
        let mut streak = self.streak.lock().expect("health streak poisoned");
        *streak = (0, 0);
        self.health
            .store(CheckedHealth::Unknown as u8, Ordering::Relaxed);
    }

    /// May calls go here now (not ejected, not failing health checks)?
    pub fn is_usable(&self) -> bool {
        self.health() != CheckedHealth::NotServing && !self.outlier.is_ejected()
    }
}

/// A backend's address, and whether it is reached over TLS.
type BackendKey = (Arc<str>, bool);

/// Interns backends by address and transport (one address may be reached
/// over TLS for one service and in the clear for another).
#[derive(Debug)]
pub struct Backends {
    map: Mutex<HashMap<BackendKey, Weak<Backend>>>,
    pool: PoolConfig,
    tls: Option<Arc<ClientTls>>,
}

impl Backends {
    pub fn new(pool: PoolConfig) -> Self {
        Backends {
            map: Mutex::new(HashMap::new()),
            pool,
            tls: None,
        }
    }

    /// Backends asked for with `tls` are reached with this material.
    pub fn with_tls(mut self, tls: Arc<ClientTls>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The backend at `addr`, over TLS when `tls` (and TLS is configured).
    pub fn get(&self, addr: &Arc<str>, tls: bool) -> Arc<Backend> {
        let tls = if tls { self.tls.clone() } else { None };
        let key = (addr.clone(), tls.is_some());
        let mut map = self.map.lock().expect("backends poisoned");
        if let Some(b) = map.get(&key).and_then(Weak::upgrade) {
            return b;
        }
        let b = Arc::new(Backend::new(addr.clone(), self.pool.clone(), tls));
        map.insert(key, Arc::downgrade(&b));
        b
    }

    /// A backend at `addr`, if one exists (over either transport).
    pub fn find(&self, addr: &str) -> Option<Arc<Backend>> {
        let map = self.map.lock().expect("backends poisoned");
        let addr: Arc<str> = addr.into();
        [true, false]
            .into_iter()
            .find_map(|tls| map.get(&(addr.clone(), tls)).and_then(Weak::upgrade))
    }

    /// Every backend still referenced; forgets the others.
    pub fn live(&self) -> Vec<Arc<Backend>> {
        let mut map = self.map.lock().expect("backends poisoned");
        map.retain(|_, w| w.strong_count() > 0);
        map.values().filter_map(Weak::upgrade).collect()
    }
}

/// The per-backend series (`weir_health_checks_total`, `weir_ejections_total`,
/// `weir_upstream_*`), read at scrape time from the live backends: a
/// backend that leaves takes its series with it.
#[derive(Debug)]
pub struct BackendStats(pub Arc<Backends>);

impl Collector for BackendStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut live = self.0.live();
        live.sort_by(|a, b| a.addr.cmp(&b.addr));
        let label = |b: &Backend| BackendLabel {
            backend: b.addr.to_string(),
        };
        let checks = live.iter().flat_map(|b| {
            [
                CheckedHealth::Serving,
                CheckedHealth::NotServing,
                CheckedHealth::Unknown,
            ]
            .into_iter()
            .filter(|r| b.checks(*r) > 0)
            .map(|r| {
                let labels = HealthLabels {
                    backend: b.addr.to_string(),
                    result: r.as_str(),
                };
                (labels, b.checks(r))
            })
        });
        encode_counters(
            &mut encoder,
            "health_checks",
            "active health-check results",
            checks,
        )?;
        encode_counters(
            &mut encoder,
            "ejections",
            "times a backend was ejected after consecutive failures",
            live.iter().map(|b| (label(b), b.outlier.ejections())),
        )?;
        let views: Vec<(BackendLabel, PoolView)> =
            live.iter().map(|b| (label(b), b.pool.view())).collect();
        let gauge = |f: fn(&PoolView) -> i64| {
            views
                .iter()
                .map(move |(l, v)| (l.clone(), f(v)))
                .collect::<Vec<_>>()
        };
        let counter = |f: fn(&PoolView) -> u64| {
            views
                .iter()
                .map(move |(l, v)| (l.clone(), f(v)))
                .collect::<Vec<_>>()
        };
        encode_gauges(
            &mut encoder,
            "upstream_connections",
            "open HTTP/2 connections to a backend",
            gauge(|v| v.connections as i64),
        )?;
        encode_gauges(
            &mut encoder,
            "upstream_streams",
            "streams open to a backend (calls and health checks)",
            gauge(|v| i64::from(v.streams)),
        )?;
        encode_gauges(
            &mut encoder,
            "upstream_queued",
            "calls waiting for a free stream to a backend",
            gauge(|v| v.queued as i64),
        )?;
        encode_counters(
            &mut encoder,
            "upstream_queue_timeouts",
            "calls that found no free stream to a backend in time (sent elsewhere or failed)",
            counter(|v| v.queue_timeouts),
        )?;
        encode_counters(
            &mut encoder,
            "upstream_goaways",
            "connections a backend ended with GOAWAY",
            counter(|v| v.goaways),
        )?;
        encode_counters(
            &mut encoder,
            "upstream_ping_backoffs",
            "times a backend's GOAWAY ENHANCE_YOUR_CALM doubled its keep-alive interval",
            counter(|v| v.ping_backoffs),
        )?;
        encode_counters(
            &mut encoder,
            "upstream_tls_failures",
            "connections to a backend whose TLS handshake failed (its certificate did not verify, or ours was refused)",
            counter(|v| v.tls_failures),
        )?;
        encode_gauges(
            &mut encoder,
            "backend_active_requests",
            "calls in flight on a backend",
            live.iter().map(|b| (label(b), i64::from(b.load.active()))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(addr: &str) -> Backend {
        Backend::new(addr.into(), PoolConfig::default(), None)
    }

    #[test]
    fn a_backends_uri_is_its_address_and_the_calls_path() {
        let path = |p: &'static str| http::uri::PathAndQuery::from_static(p);
        assert_eq!(
            backend("127.0.0.1:50051").uri(path("/a.B/C")).unwrap(),
            "http://127.0.0.1:50051/a.B/C"
        );
        assert_eq!(
            backend("[::1]:7000").uri(path("/x.Y/Z")).unwrap(),
            "http://[::1]:7000/x.Y/Z"
        );
        assert!(backend("not an address").uri(path("/a.B/C")).is_none());
    }
}
