//! lease-aware: drains endpoints that are about to disappear.
//!
//! An endpoint whose etcd lease has less than a second left (its keep-alives
//! stopped: the instance is probably gone) or whose health is unknown gets
//! no new calls while others are fine. The rest share calls round-robin.
//! When nothing is fine, the call goes to the candidate with the most lease
//! left (no lease counts as the most).

wit_bindgen::generate!({ path: "../../wit", world: "balancer" });

use core::sync::atomic::{AtomicU32, Ordering};
use weir::policy::backends::{self, HealthState};

const MIN_LEASE_MS: i64 = 1_000;
static NEXT: AtomicU32 = AtomicU32::new(0);

fn fine(i: u32) -> bool {
    let lease_ok = backends::lease_ttl_ms(i).is_none_or(|ms| ms >= MIN_LEASE_MS);
    lease_ok && backends::health(i) != HealthState::Unknown
}

struct LeaseAware;

impl Guest for LeaseAware {
    fn pick(n: u32, _generation: u64, _random: u64) -> Result<u32, String> {
        if n == 0 {
            return Err("no candidates".into());
        }
        let turn = NEXT.fetch_add(1, Ordering::Relaxed);
        // Scan from the turn's position for the next fine candidate.
        for step in 0..n {
            let i = (turn + step) % n;
            if fine(i) {
                return Ok(i);
            }
        }
        let left = |i: u32| backends::lease_ttl_ms(i).unwrap_or(i64::MAX);
        Ok((0..n).max_by_key(|&i| left(i)).unwrap_or(turn % n))
    }
}

export!(LeaseAware);
