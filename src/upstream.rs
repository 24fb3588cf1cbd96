//! Upstream: one [`Backend`] per address, shared by every service that lists
//! it: its connection pool, its load, its health and its outlier state.
//!
//! Backends live as long as some endpoint set references them; the registry
//! holds them weakly, so a backend that leaves etcd is dropped (and its
//! connections closed) once the last call on it ends.

pub(crate) mod health;
mod load;
mod outlier;
mod pool;
mod replay;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

pub use health::HealthCheckSettings;
pub use load::Load;
pub use outlier::{Outlier, OutlierSettings};
pub use pool::{Pool, PoolConfig};
pub use replay::{BoxError, ReplayBody};

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
    pub pool: Pool,
    pub load: Load,
    pub outlier: Outlier,
    health: AtomicU8,
    streak: Mutex<(u32, u32)>,
    check_running: AtomicBool,
    health_channel: OnceLock<tonic::transport::Channel>,
}

impl Backend {
    fn new(addr: Arc<str>, pool: PoolConfig) -> Self {
        Backend {
            pool: Pool::new(addr.clone(), pool),
            addr,
            load: Load::default(),
            outlier: Outlier::default(),
            health: AtomicU8::new(CheckedHealth::Unknown as u8),
            streak: Mutex::new((0, 0)),
            check_running: AtomicBool::new(false),
            health_channel: OnceLock::new(),
        }
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

    /// May calls go here now (not ejected, not failing health checks)?
    pub fn is_usable(&self) -> bool {
        self.health() != CheckedHealth::NotServing && !self.outlier.is_ejected()
    }
}

/// Interns backends by address.
#[derive(Debug)]
pub struct Backends {
    map: Mutex<HashMap<Arc<str>, Weak<Backend>>>,
    pool: PoolConfig,
}

impl Backends {
    pub fn new(pool: PoolConfig) -> Self {
        Backends {
            map: Mutex::new(HashMap::new()),
            pool,
        }
    }

    pub fn get(&self, addr: &Arc<str>) -> Arc<Backend> {
        let mut map = self.map.lock().expect("backends poisoned");
        if let Some(b) = map.get(addr).and_then(Weak::upgrade) {
            return b;
        }
        let b = Arc::new(Backend::new(addr.clone(), self.pool.clone()));
        map.insert(addr.clone(), Arc::downgrade(&b));
        b
    }

    /// The backend at `addr`, if one exists.
    pub fn find(&self, addr: &str) -> Option<Arc<Backend>> {
        self.map
            .lock()
            .expect("backends poisoned")
            .get(addr)
            .and_then(Weak::upgrade)
    }

    /// Every backend still referenced; forgets the others.
    pub fn live(&self) -> Vec<Arc<Backend>> {
        let mut map = self.map.lock().expect("backends poisoned");
        map.retain(|_, w| w.strong_count() > 0);
        map.values().filter_map(Weak::upgrade).collect()
    }
}
