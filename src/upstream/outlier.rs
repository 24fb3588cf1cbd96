//! Passive outlier detection: consecutive failed calls eject a backend for a
//! time that grows with each ejection, up to a cap.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// When a backend is ejected, and for how long.
#[derive(Clone, Debug)]
pub struct OutlierSettings {
    /// Consecutive failed calls that eject a backend.
    pub consecutive_failures: u32,
    /// First ejection's length; each further ejection adds as much.
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    /// At most this share of a service's endpoints is ejected at once (at least one).
    pub max_ejection_percent: u32,
}

impl Default for OutlierSettings {
    fn default() -> Self {
        OutlierSettings {
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

#[derive(Debug, Default)]
pub struct Outlier {
    consecutive_failures: AtomicU32,
    times_ejected: AtomicU32,
    /// Every ejection since the backend appeared (for the metrics).
    ejections: AtomicU64,
    /// `clock_ms()` until which the backend is ejected; 0 = never ejected.
    ejected_until: AtomicI64,
}

/// What a failure means for the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutlierVerdict {
    Keep,
    /// Eject it, if the service's cap allows; `first_of_streak` for the
    /// first verdict of this streak of failures (later ones come every
    /// `consecutive_failures` more).
    Eject {
        first_of_streak: bool,
    },
}

fn clock_ms() -> i64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    Instant::now().saturating_duration_since(origin).as_millis() as i64 + 1
}

impl Outlier {
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && clock_ms() < until
    }

    /// Every ejection since the backend appeared.
    pub fn ejections(&self) -> u64 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Ejections that still count toward the next one's length.
    pub fn times_ejected(&self) -> u32 {
        self.times_ejected.load(Ordering::Relaxed)
    }

    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Records a failure. An ejection is due when the streak reaches the
    /// threshold, and again each threshold further while the service's
    /// ejection cap keeps it in (so the cap is not looked at per call).
    pub fn record_failure(&self, settings: &OutlierSettings) -> OutlierVerdict {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let threshold = settings.consecutive_failures.max(1);
        if n < threshold || n % threshold != 0 || self.is_ejected() {
            return OutlierVerdict::Keep;
        }
        OutlierVerdict::Eject {
            first_of_streak: n == threshold,
        }
    }

    /// Ejects for `base × times ejected` (capped); returns how long. Past
    /// ejections are forgotten one per `base` of good behaviour since the
    /// last one ended, so a backend that failed once a week ago starts over.
    pub fn eject(&self, settings: &OutlierSettings) -> Duration {
        let now = clock_ms();
        let last_end = self.ejected_until.load(Ordering::Relaxed);
        let base_ms = (settings.base_ejection_time.as_millis() as i64).max(1);
        let forgiven = if last_end == 0 {
            0
        } else {
            u32::try_from((now - last_end).max(0) / base_ms).unwrap_or(u32::MAX)
        };
        let times = self
            .times_ejected
            .load(Ordering::Relaxed)
            .saturating_sub(forgiven)
            .saturating_add(1);
        self.times_ejected.store(times, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed);
        let length = settings
            .base_ejection_time
            .checked_mul(times)
            .map_or(settings.max_ejection_time, |l| {
                l.min(settings.max_ejection_time)
            });
        let length_ms = i64::try_from(length.as_millis()).unwrap_or(i64::MAX / 2);
        self.ejected_until
            .store(now.saturating_add(length_ms), Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        length
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> OutlierSettings {
        OutlierSettings {
            consecutive_failures: 3,
            base_ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            max_ejection_percent: 50,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_grows_and_is_capped() {
        let c = config();
        let o = Outlier::default();
        assert_eq!(o.record_failure(&c), OutlierVerdict::Keep);
        o.record_success();
        assert_eq!(o.record_failure(&c), OutlierVerdict::Keep);
        assert_eq!(o.record_failure(&c), OutlierVerdict::Keep);
        assert_eq!(
            o.record_failure(&c),
            OutlierVerdict::Eject {
                first_of_streak: true
            }
        );
        assert_eq!(o.eject(&c), Duration::from_secs(10));
        assert!(o.is_ejected());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!o.is_ejected());
        assert_eq!(o.eject(&c), Duration::from_secs(20));
        assert_eq!(o.eject(&c), Duration::from_secs(25), "capped");
    }

    /// Regression: a refused ejection (the service's cap) made every later
    /// failure rescan the service; now only each threshold-th does.
    #[test]
    fn a_long_streak_asks_for_ejection_only_every_threshold_failures() {
        let c = config();
        let o = Outlier::default();
        let verdicts: Vec<OutlierVerdict> = (0..9).map(|_| o.record_failure(&c)).collect();
        let asked: Vec<usize> = verdicts
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != OutlierVerdict::Keep)
            .map(|(i, _)| i + 1)
            .collect();
        assert_eq!(asked, [3, 6, 9]);
        assert_eq!(
            verdicts[5],
            OutlierVerdict::Eject {
                first_of_streak: false
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_history_decays_with_good_behaviour() {
        let c = config();
        let o = Outlier::default();
        assert_eq!(o.eject(&c), Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(o.eject(&c), Duration::from_secs(20), "soon again: longer");
        // Well behaved for long after that ejection ended: history forgotten.
        tokio::time::advance(Duration::from_secs(20 + 10 * 5)).await;
        assert_eq!(o.eject(&c), Duration::from_secs(10));
        assert_eq!(o.times_ejected(), 1);
    }
}
