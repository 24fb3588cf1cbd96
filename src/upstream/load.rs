//! Per-backend load: active requests, a peak-EWMA of latency, and outcome counts.
//! These are the numbers balancing policies read.
//!
//! The latency is the time to the response headers, never a whole call:
//! a stream that lives 40 s says nothing about how fast the backend answers,
//! and must not make latency-reading policies shun it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// How fast the latency average forgets (the decay's time constant).
const DECAY: Duration = Duration::from_secs(10);

#[derive(Debug)]
pub struct Load {
    active: AtomicU32,
    successes: AtomicU64,
    failures: AtomicU64,
    ewma: Mutex<PeakEwma>,
    /// The average as last written under `ewma`, for readers: a policy
    /// reads it for every candidate of every call, and should not take a
    /// lock every call's end takes too.
    ewma_us: AtomicU32,
}

#[derive(Debug)]
struct PeakEwma {
    micros: f64,
    at: Instant,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            active: AtomicU32::new(0),
            successes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            ewma: Mutex::new(PeakEwma {
                micros: 0.0,
                at: Instant::now(),
            }),
            ewma_us: AtomicU32::new(0),
        }
    }
}

impl Load {
    pub fn active(&self) -> u32 {
        self.active.load(Ordering::Relaxed)
    }

    pub fn successes(&self) -> u64 {
        self.successes.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    pub fn start(&self) {
        self.active.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends a call started with [`Load::start`].
    pub fn finish(&self, success: bool) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        if success {
            self.successes.fetch_add(1, Ordering::Relaxed);
        } else {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One time-to-response-headers sample. Peak-EWMA: a slower answer than
    /// the average takes over at once; faster ones pull it down with a
    /// time-based decay (as in Finagle and linkerd).
    pub fn observe_latency(&self, latency: Duration) {
        let sample = latency.as_secs_f64() * 1e6;
        let now = Instant::now();
        let mut e = self.ewma.lock().expect("ewma poisoned");
        if sample > e.micros {
            e.micros = sample;
        } else {
            let elapsed = now.saturating_duration_since(e.at).as_secs_f64();
            let w = (-elapsed / DECAY.as_secs_f64()).exp();
            e.micros = e.micros * w + sample * (1.0 - w);
        }
        e.at = now;
        self.ewma_us
            .store(e.micros.min(f64::from(u32::MAX)) as u32, Ordering::Relaxed);
    }

    /// The latency average in microseconds.
    pub fn latency_ewma_us(&self) -> u32 {
        self.ewma_us.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_up_and_decays_down() {
        let load = Load::default();
        load.start();
        load.observe_latency(Duration::from_millis(100));
        load.finish(true);
        assert_eq!(load.latency_ewma_us(), 100_000);
        tokio::time::advance(DECAY).await;
        load.start();
        load.observe_latency(Duration::from_millis(10));
        load.finish(true);
        let after = load.latency_ewma_us();
        assert!(
            (40_000..50_000).contains(&after),
            "decayed toward the faster sample: {after}"
        );
        assert_eq!(
            (load.active(), load.successes(), load.failures()),
            (0, 2, 0)
        );
    }
}
