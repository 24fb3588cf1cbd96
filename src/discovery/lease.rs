//! Remaining TTLs of the etcd leases that keep endpoints alive.
//!
//! Endpoints share one [`LeaseHandle`] per lease id. A single poller asks etcd
//! for each lease's TTL at a bounded rate and stores the expiry instant;
//! readers compute what is left without touching etcd. Between polls the
//! remaining TTL counts down, so a lease whose keep-alives stopped reads as
//! running out even before the next poll.
//!
//! A count-down is only as good as its last poll: a healthy lease's
//! keep-alives renew it in etcd while the count-down here goes on. So a TTL
//! whose last poll is older than half the lease's granted TTL reads as
//! unknown, never as "about to expire". Leases of services the data path
//! uses are polled first (every third of their TTL); when the poll rate
//! cannot keep up with the fleet, a warning says so.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
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
    let now = Instant::now();
    // Signed and floored, so that differences are exact even on a clock
    // behind the origin (a test runtime's paused clock can be: the origin
    // may come from another runtime). Saturating at the origin made two
    // readings 4,900 ms apart differ by 4,899.
    let nanos = match now.checked_duration_since(origin) {
        Some(after) => after.as_nanos() as i128,
        None => -(origin.duration_since(now).as_nanos() as i128),
    };
    nanos.div_euclid(1_000_000) as i64
}

#[derive(Debug)]
struct LeaseState {
    id: i64,
    /// `clock_ms()` at which the lease runs out, as of the last poll.
    expires_at_ms: AtomicI64,
    /// `clock_ms()` of the last poll.
    polled_at_ms: AtomicI64,
    /// The TTL the lease was granted with, in ms (0: unknown).
    granted_ms: AtomicI64,
    /// Some service the data path uses has an endpoint under this lease.
    in_use: AtomicBool,
}

impl LeaseState {
    fn new(id: i64) -> Self {
        LeaseState {
            id,
            expires_at_ms: AtomicI64::new(UNKNOWN),
            polled_at_ms: AtomicI64::new(0),
            granted_ms: AtomicI64::new(0),
            in_use: AtomicBool::new(false),
        }
    }
}

/// A shared view of one lease. Cloning is cheap.
#[derive(Clone, Debug)]
pub struct LeaseHandle(Arc<LeaseState>);

impl LeaseHandle {
    pub fn id(&self) -> i64 {
        self.0.id
    }

    /// Milliseconds left before etcd drops the lease; `None` before the
    /// first poll, and when the last poll is older than half the lease's
    /// granted TTL (its keep-alives may well have renewed it since).
    pub fn remaining_ms(&self) -> Option<i64> {
        let at = self.0.expires_at_ms.load(Ordering::Relaxed);
        if at == UNKNOWN {
            return None;
        }
        let now = clock_ms();
        let granted = self.0.granted_ms.load(Ordering::Relaxed);
        let polled = self.0.polled_at_ms.load(Ordering::Relaxed);
        if granted > 0 && now - polled > granted / 2 {
            return None;
        }
        Some((at - now).max(0))
    }

    /// The data path uses a service with an endpoint under this lease: poll
    /// it before the others.
    pub fn mark_in_use(&self) {
        self.0.in_use.store(true, Ordering::Relaxed);
    }

    /// One poll's answer: `ttl_secs` left (negative: gone) of `granted_secs`.
    fn record_ttl(&self, ttl_secs: i64, granted_secs: i64) {
        let now = clock_ms();
        let ms = if ttl_secs < 0 { 0 } else { ttl_secs * 1000 };
        self.0
            .granted_ms
            .store(granted_secs.max(0) * 1000, Ordering::Relaxed);
        self.0.polled_at_ms.store(now, Ordering::Relaxed);
        self.0.expires_at_ms.store(now + ms, Ordering::Relaxed);
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
        let state = Arc::new(LeaseState::new(id));
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

/// Due polls: leases in use first, then the others, each soonest-due first.
#[derive(Default)]
struct DuePolls {
    in_use: BinaryHeap<Reverse<(Instant, i64)>>,
    others: BinaryHeap<Reverse<(Instant, i64)>>,
}

impl DuePolls {
    fn push(&mut self, at: Instant, id: i64, in_use: bool) {
        let heap = if in_use {
            &mut self.in_use
        } else {
            &mut self.others
        };
        heap.push(Reverse((at, id)));
    }

    fn next_due(&self) -> Option<Instant> {
        let first = |h: &BinaryHeap<Reverse<(Instant, i64)>>| h.peek().map(|Reverse((at, _))| *at);
        match (first(&self.in_use), first(&self.others)) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next lease to poll now: an in-use one if any is due.
    fn pop_due(&mut self, now: Instant) -> Option<(Instant, i64)> {
        for heap in [&mut self.in_use, &mut self.others] {
            if heap.peek().is_some_and(|Reverse((at, _))| *at <= now) {
                return heap.pop().map(|Reverse(due)| due);
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.in_use.len() + self.others.len()
    }
}

/// How far behind polls may fall before the poller says it cannot keep up.
const LAG_WARNING: Duration = Duration::from_secs(2);

async fn poll_leases(
    mut client: etcd_client::Client,
    mut new_leases: mpsc::UnboundedReceiver<Weak<LeaseState>>,
    config: LeasePollConfig,
    cancel: CancellationToken,
) {
    let mut due = DuePolls::default();
    let mut known: HashMap<i64, Weak<LeaseState>> = HashMap::new();
    let mut rate = tokio::time::interval(Duration::from_secs(1) / config.polls_per_second.max(1));
    rate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut warned_at: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            Some(lease) = new_leases.recv() => {
                if let Some(state) = lease.upgrade() {
                    if known.insert(state.id, lease).is_none() {
                        due.push(Instant::now(), state.id, state.in_use.load(Ordering::Relaxed));
                    }
                }
            }
            _ = sleep_until_opt(due.next_due()) => {
                let Some((was_due, id)) = due.pop_due(Instant::now()) else { continue };
                let Some(state) = known.get(&id).and_then(Weak::upgrade) else {
                    known.remove(&id);
                    continue;
                };
                rate.tick().await;
                let lag = Instant::now().saturating_duration_since(was_due);
                if lag > LAG_WARNING && warned_at.is_none_or(|at| at.elapsed() > Duration::from_secs(60)) {
                    warned_at = Some(Instant::now());
                    tracing::warn!(
                        leases = due.len() + 1,
                        polls_per_second = config.polls_per_second,
                        ?lag,
                        "lease TTL polls cannot keep up with the fleet: TTLs polled too long ago read as unknown (raise etcd.lease_polls_per_second)"
                    );
                }
                let in_use = state.in_use.load(Ordering::Relaxed);
                let handle = LeaseHandle(state);
                let next = match bounded(
                    Duration::from_secs(3),
                    client.lease_time_to_live(id, None),
                ).await {
                    Ok(resp) => {
                        handle.record_ttl(resp.ttl(), resp.granted_ttl());
                        let granted = Duration::from_secs(resp.granted_ttl().max(0) as u64);
                        if in_use {
                            // Polled well within half its TTL, so it stays known.
                            (granted / 3).clamp(Duration::from_millis(500), config.max_interval)
                        } else {
                            (granted / 2).clamp(Duration::from_millis(500), config.max_interval)
                        }
                    }
                    Err(err) => {
                        tracing::debug!(lease = id, cause = %err, "lease TTL poll failed");
                        Duration::from_secs(1)
                    }
                };
                due.push(Instant::now() + next, id, in_use);
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
        lease.record_ttl(10, 10);
        assert_eq!(lease.remaining_ms(), Some(10_000));
        tokio::time::advance(Duration::from_millis(4_000)).await;
        assert_eq!(lease.remaining_ms(), Some(6_000));
        lease.record_ttl(-1, 0);
        assert_eq!(lease.remaining_ms(), Some(0), "gone");
        assert_eq!(table.unpolled(), 0);
    }

    /// Regression: past ~600 instances at the default rate, polls were older
    /// than the TTL, so healthy leases counted down to zero here while their
    /// keep-alives renewed them in etcd, and lease-aware drained them.
    #[tokio::test(start_paused = true)]
    async fn a_ttl_polled_longer_ago_than_half_the_lease_is_unknown_not_expiring() {
        let table = LeaseTable::default();
        let lease = table.handle(9).unwrap();
        lease.record_ttl(6, 10);
        tokio::time::advance(Duration::from_millis(4_900)).await;
        assert_eq!(lease.remaining_ms(), Some(1_100));
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_eq!(
            lease.remaining_ms(),
            None,
            "last poll older than half the TTL"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(lease.remaining_ms(), None);
    }
}
