//! Remaining TTLs of the etcd leases that keep endpoints alive.
//!
//! Endpoints share one [`LeaseHandle`] per lease id. A single poller asks etcd
//! for each lease's TTL at a bounded rate, soonest-due first, and stores the
//! expiry instant; readers compute what is left without touching etcd. Between
//! polls the remaining TTL counts down, so a lease whose keep-alives stopped
//! reads as running out even before the next poll.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::etcd::bounded;

const UNKNOWN: i64 = i64::MIN;

/// Milliseconds on a process-wide monotonic clock (tokio's, so paused-time
/// tests can drive it).
fn clock_ms() -> i64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    Instant::now().saturating_duration_since(origin).as_millis() as i64
}

#[derive(Debug)]
struct LeaseState {
    id: i64,
    /// `clock_ms()` at which the lease runs out, as of the last poll.
    expires_at_ms: AtomicI64,
}

/// A shared view of one lease. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct LeaseHandle(Arc<LeaseState>);

impl LeaseHandle {
    pub fn id(&self) -> i64 {
        self.0.id
    }

    /// Milliseconds left before etcd drops the lease, or `None` before the first poll.
    pub fn remaining_ms(&self) -> Option<i64> {
        let at = self.0.expires_at_ms.load(Ordering::Relaxed);
        (at != UNKNOWN).then(|| (at - clock_ms()).max(0))
    }

    fn record_ttl(&self, ttl_secs: i64) {
        let ms = if ttl_secs < 0 { 0 } else { ttl_secs * 1000 };
        self.0
            .expires_at_ms
            .store(clock_ms() + ms, Ordering::Relaxed);
    }
}

/// Interns lease handles by id and hands new ones to the poller.
#[derive(Debug)]
pub struct LeaseTable {
    leases: Mutex<HashMap<i64, Weak<LeaseState>>>,
    new_leases: mpsc::UnboundedSender<Weak<LeaseState>>,
    receiver: Mutex<Option<mpsc::UnboundedReceiver<Weak<LeaseState>>>>,
}

impl Default for LeaseTable {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        LeaseTable {
            leases: Mutex::new(HashMap::new()),
            new_leases: tx,
            receiver: Mutex::new(Some(rx)),
        }
    }
}

impl LeaseTable {
    /// The handle for lease `id`; `None` for keys without a lease (id 0).
    pub fn handle(&self, id: i64) -> Option<LeaseHandle> {
        if id == 0 {
            return None;
        }
        let mut leases = self.leases.lock().expect("lease table poisoned");
        if let Some(state) = leases.get(&id).and_then(Weak::upgrade) {
            return Some(LeaseHandle(state));
        }
        let state = Arc::new(LeaseState {
            id,
            expires_at_ms: AtomicI64::new(UNKNOWN),
        });
        leases.insert(id, Arc::downgrade(&state));
        if leases.len() > 64 && leases.len().is_power_of_two() {
            leases.retain(|_, w| w.strong_count() > 0);
        }
        // The poller may not run (e.g. a one-shot listing); a closed channel is fine.
        let _unpolled_is_fine = self.new_leases.send(Arc::downgrade(&state));
        Some(LeaseHandle(state))
    }

    /// Leases still referenced whose TTL has not been polled yet.
    pub fn unpolled(&self) -> usize {
        let leases = self.leases.lock().expect("lease table poisoned");
        leases
            .values()
            .filter_map(Weak::upgrade)
            .filter(|s| s.expires_at_ms.load(Ordering::Relaxed) == UNKNOWN)
            .count()
    }
}

/// How often the poller may ask etcd, and how stale a TTL may get.
#[derive(Clone, Copy, Debug)]
pub struct LeasePollConfig {
    pub polls_per_second: u32,
    pub max_interval: Duration,
}

impl Default for LeasePollConfig {
    fn default() -> Self {
        LeasePollConfig {
            polls_per_second: 100,
            max_interval: Duration::from_secs(10),
        }
    }
}

/// Polls lease TTLs until `cancel`. Only one poller per table.
pub fn spawn_lease_poller(
    client: etcd_client::Client,
    table: Arc<LeaseTable>,
    config: LeasePollConfig,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let receiver = table
        .receiver
        .lock()
        .expect("lease table poisoned")
        .take()
        .expect("one lease poller per table");
    tokio::spawn(poll_leases(client, receiver, config, cancel))
}

async fn poll_leases(
    mut client: etcd_client::Client,
    mut new_leases: mpsc::UnboundedReceiver<Weak<LeaseState>>,
    config: LeasePollConfig,
    cancel: CancellationToken,
) {
    let mut due: BinaryHeap<Reverse<(Instant, i64)>> = BinaryHeap::new();
    let mut known: HashMap<i64, Weak<LeaseState>> = HashMap::new();
    let mut rate = tokio::time::interval(Duration::from_secs(1) / config.polls_per_second.max(1));
    rate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next_due = due.peek().map(|Reverse((at, _))| *at);
        tokio::select! {
            _ = cancel.cancelled() => return,
            Some(lease) = new_leases.recv() => {
                if let Some(state) = lease.upgrade() {
                    if known.insert(state.id, lease).is_none() {
                        due.push(Reverse((Instant::now(), state.id)));
                    }
                }
            }
            _ = sleep_until_opt(next_due) => {
                let Some(Reverse((_, id))) = due.pop() else { continue };
                let Some(state) = known.get(&id).and_then(Weak::upgrade) else {
                    known.remove(&id);
                    continue;
                };
                rate.tick().await;
                let handle = LeaseHandle(state);
                let next = match bounded(
                    Duration::from_secs(3),
                    client.lease_time_to_live(id, None),
                ).await {
                    Ok(resp) => {
                        handle.record_ttl(resp.ttl());
                        let half = Duration::from_millis((resp.ttl().max(0) as u64) * 500);
                        half.clamp(Duration::from_millis(500), config.max_interval)
                    }
                    Err(err) => {
                        tracing::debug!(lease = id, cause = %err, "lease TTL poll failed");
                        Duration::from_secs(1)
                    }
                };
                due.push(Reverse((Instant::now() + next, id)));
            }
        }
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_are_shared_per_lease() {
        let table = LeaseTable::default();
        assert!(table.handle(0).is_none());
        let a = table.handle(7).unwrap();
        let b = table.handle(7).unwrap();
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert_eq!(a.remaining_ms(), None);
        assert_eq!(table.unpolled(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn remaining_ttl_counts_down_between_polls() {
        let table = LeaseTable::default();
        let lease = table.handle(9).unwrap();
        lease.record_ttl(10);
        assert_eq!(lease.remaining_ms(), Some(10_000));
        tokio::time::advance(Duration::from_millis(4_000)).await;
        assert_eq!(lease.remaining_ms(), Some(6_000));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(lease.remaining_ms(), Some(0));
        lease.record_ttl(-1);
        assert_eq!(lease.remaining_ms(), Some(0));
        assert_eq!(table.unpolled(), 0);
    }
}
