//! Passive outlier detection: consecutive failed calls eject a backend for a
//! time that grows with each ejection, up to a cap.

use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
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
    /// `clock_ms()` until which the backend is ejected; 0 = not ejected.
    ejected_until: AtomicI64,
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

    pub fn record_success(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Records a failure; true when it crossed the threshold and the backend
    /// should be ejected (the caller checks the service's ejection cap).
    pub fn record_failure(&self, config: &OutlierSettings) -> bool {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        n >= config.consecutive_failures && !self.is_ejected()
    }

    /// Ejects for `base × times ejected` (capped); returns how long.
    pub fn eject(&self, config: &OutlierSettings) -> Duration {
        let times = self.times_ejected.fetch_add(1, Ordering::Relaxed) + 1;
        let length = config
            .base_ejection_time
            .checked_mul(times)
            .map_or(config.max_ejection_time, |l| {
                l.min(config.max_ejection_time)
            });
        let length_ms = i64::try_from(length.as_millis()).unwrap_or(i64::MAX / 2);
        self.ejected_until
            .store(clock_ms().saturating_add(length_ms), Ordering::Relaxed);
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
        assert!(!o.record_failure(&c));
        o.record_success();
        assert!(!o.record_failure(&c));
        assert!(!o.record_failure(&c));
        assert!(o.record_failure(&c));
        assert_eq!(o.eject(&c), Duration::from_secs(10));
        assert!(o.is_ejected());
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!o.is_ejected());
        assert_eq!(o.eject(&c), Duration::from_secs(20));
        assert_eq!(o.eject(&c), Duration::from_secs(25), "capped");
    }
}
