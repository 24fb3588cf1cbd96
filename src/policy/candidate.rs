//! A candidate version tried beside a policy's current one (a rollout in
//! shadow or canary mode), and what each of them did with the calls they
//! placed: counts, server-side failures, latency. The guards compare the
//! two; `weir policy status` shows them.
//!
//! Everything here is counted with relaxed atomics on the hot path: a
//! pick or an outcome adds, never locks.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::version::PolicyVersion;
use crate::discovery::fleet::Mode;

/// The tag a pick leaves on a call its candidate placed (0: the current).
pub const PLACED_BY_CANDIDATE: u8 = 1;

/// gRPC codes that count as the server side failing a call (the guards'
/// error rate): UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS.
pub fn is_server_failure(code: u32) -> bool {
    matches!(code, 2 | 4 | 13 | 14 | 15)
}

/// Latency buckets, log-linear: exact below 8 µs, then 8 per power of two
/// (each 12.5 % wide), up to u32::MAX µs. A p99 compared against 1.5x
/// another needs buckets finer than the 2x of plain powers of two.
const SUB: u64 = 8;
const BUCKETS: usize = 33 * SUB as usize;

fn bucket(latency_us: u32) -> usize {
    let v = u64::from(latency_us);
    if v < SUB {
        return v as usize;
    }
    let octave = 63 - u64::from(v.leading_zeros()); // 3 and up
    let sub = (v >> (octave - 3)) & (SUB - 1);
    ((octave - 2) * SUB + sub) as usize
}

/// The exclusive upper bound of bucket `b`, in µs.
fn upper_us(b: usize) -> u64 {
    let b = b as u64;
    if b < SUB {
        return b + 1;
    }
    let (octave, sub) = (b / SUB + 2, b % SUB);
    (SUB + sub + 1) << (octave - 3)
}

/// The calls one version placed, cumulative (windows are differences of
/// two snapshots).
#[derive(Debug)]
pub struct ArmStats {
    calls: AtomicU64,
    failures: AtomicU64,
    latency: [AtomicU64; BUCKETS],
}

impl Default for ArmStats {
    fn default() -> Self {
        ArmStats {
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

/// A copy of an [`ArmStats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArmSnapshot {
    pub calls: u64,
    pub failures: u64,
    latency: [u64; BUCKETS],
}

impl Default for ArmSnapshot {
    fn default() -> Self {
        ArmSnapshot {
            calls: 0,
            failures: 0,
            latency: [0; BUCKETS],
        }
    }
}

impl ArmStats {
    pub fn record(&self, status: u32, latency_us: u32) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if is_server_failure(status) {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        self.latency[bucket(latency_us).min(BUCKETS - 1)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ArmSnapshot {
        ArmSnapshot {
            calls: self.calls.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            latency: std::array::from_fn(|b| self.latency[b].load(Ordering::Relaxed)),
        }
    }
}

impl ArmSnapshot {
    /// What happened between `earlier` and this snapshot.
    pub fn since(&self, earlier: &ArmSnapshot) -> ArmSnapshot {
        ArmSnapshot {
            calls: self.calls.saturating_sub(earlier.calls),
            failures: self.failures.saturating_sub(earlier.failures),
            latency: std::array::from_fn(|b| self.latency[b].saturating_sub(earlier.latency[b])),
        }
    }

    /// Server-side failures per call (0 with no calls).
    pub fn error_rate(&self) -> f64 {
        if self.calls == 0 {
            0.0
        } else {
            self.failures as f64 / self.calls as f64
        }
    }

    /// Calls that took `us` or longer, certainly: those in buckets that
    /// start at `us` or above.
    pub fn calls_from_us(&self, us: u64) -> u64 {
        self.latency
            .iter()
            .enumerate()
            .filter(|&(b, _)| b > 0 && upper_us(b - 1) >= us)
            .map(|(_, n)| n)
            .sum()
    }

    /// The latency below which a fraction `q` of calls ended, in ms: the
    /// upper bound of the bucket it falls in (so within 12.5 %).
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        self.quantile_us(q).map(|us| us as f64 / 1000.0)
    }

    /// [`ArmSnapshot::quantile_ms`] in µs.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(upper_us(b));
            }
        }
        None
    }

    pub fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "calls": self.calls,
            "failures": self.failures,
            "error_rate": self.error_rate(),
            "p50_ms": self.quantile_ms(0.5),
            "p99_ms": self.quantile_ms(0.99),
        })
    }
}

/// What a rollout observed on this gateway since its candidate was set.
#[derive(Debug, Default)]
pub struct RolloutStats {
    pub current: ArmStats,
    pub candidate: ArmStats,
    /// Shadow mode: calls where both picked, and where they differed.
    pub shadowed: AtomicU64,
    pub divergent: AtomicU64,
    /// Picks of the candidate that faulted (the call went by the current).
    pub candidate_faults: AtomicU64,
}

/// How a candidate is tried, as its rollout state says.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    pub mode: Mode,
    /// Canary share, 0–100.
    pub percent: f64,
    pub auto_promote_after_secs: Option<u64>,
    /// When the candidate was set (seconds since the Unix epoch).
    pub since_secs: u64,
}

/// A candidate version and how it is tried.
pub struct Candidate {
    pub version: Arc<PolicyVersion>,
    pub mode: Mode,
    /// Canary share, 0–100 (as set).
    pub percent: f64,
    pub auto_promote_after_secs: Option<u64>,
    pub since_secs: u64,
    /// Canary share in parts per 2^32 of a random draw.
    threshold: u64,
    pub stats: RolloutStats,
    /// The candidate kept faulting: no longer tried here (the guard rolls
    /// it back across the fleet).
    pub withdrawn: AtomicBool,
}

impl Candidate {
    pub fn new(version: Arc<PolicyVersion>, trial: &Trial) -> Candidate {
        let Trial {
            mode,
            percent,
            auto_promote_after_secs,
            since_secs,
        } = *trial;
        let share = if mode == Mode::Canary {
            percent.clamp(0.0, 100.0) / 100.0
        } else {
            0.0
        };
        Candidate {
            version,
            mode,
            percent,
            auto_promote_after_secs,
            since_secs,
            threshold: (share * (1u64 << 32) as f64) as u64,
            stats: RolloutStats::default(),
            withdrawn: AtomicBool::new(false),
        }
    }

    /// Whether this call goes to the candidate (canary mode, by a draw).
    pub fn takes_call(&self) -> bool {
        self.mode == Mode::Canary
            && !self.withdrawn.load(Ordering::Relaxed)
            && u64::from(rand::random::<u32>()) < self.threshold
    }

    pub fn shadows(&self) -> bool {
        self.mode == Mode::Shadow && !self.withdrawn.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_buckets_and_windows_subtract() {
        let arm = ArmStats::default();
        for _ in 0..98 {
            arm.record(0, 1_000); // ~1 ms
        }
        arm.record(14, 100_000); // ~100 ms, UNAVAILABLE
        arm.record(5, 100_000); // NOT_FOUND: the client's doing
        let all = arm.snapshot();
        assert_eq!(all.calls, 100);
        assert_eq!(all.failures, 1);
        assert_eq!(all.quantile_ms(0.5), Some(1.024));
        assert_eq!(all.quantile_ms(0.99), Some(106.496));
        arm.record(0, 10);
        let window = arm.snapshot().since(&all);
        assert_eq!(window.calls, 1);
        assert_eq!(window.failures, 0);
        assert_eq!(window.quantile_ms(0.99), Some(0.011));
        assert_eq!(ArmSnapshot::default().quantile_ms(0.5), None);
    }

    #[test]
    fn every_latency_falls_in_a_bucket_at_most_an_eighth_wide() {
        for us in [
            0u32,
            1,
            7,
            8,
            9,
            15,
            16,
            17,
            1000,
            65_535,
            100_000,
            u32::MAX,
        ] {
            let b = bucket(us);
            assert!(b < BUCKETS, "{us} µs: bucket {b}");
            let (low, high) = (if b == 0 { 0 } else { upper_us(b - 1) }, upper_us(b));
            assert!(
                low <= u64::from(us) && u64::from(us) < high,
                "{us} µs not in [{low}, {high})"
            );
            assert!(high - low <= (low / 8).max(1), "[{low}, {high}) too wide");
        }
        assert_eq!(ArmSnapshot::default().quantile_ms(0.5), None);
    }

    #[test]
    fn calls_from_a_line_are_those_of_buckets_starting_at_it_or_above() {
        let stats = ArmStats::default();
        // Buckets [2048, 2304), [2304, 2560), [2560, 2816).
        for us in [2100, 2303, 2304, 2400, 2600] {
            stats.record(0, us);
        }
        let arm = stats.snapshot();
        assert_eq!(arm.calls_from_us(2304), 3, "a line on a boundary");
        assert_eq!(arm.calls_from_us(2305), 1, "a line inside a bucket");
        assert_eq!(arm.calls_from_us(2048), 5);
        assert_eq!(arm.calls_from_us(1), 5);
        assert_eq!(arm.quantile_us(0.5), Some(2560));
    }
}
