//! least-conn: fewest calls in flight per unit of weight.
//!
//! With a handful of candidates every one is compared (exact, and cheap);
//! above that, the power of two choices: two candidates drawn at random, the
//! lighter wins. That tracks the least-loaded backend closely without
//! scanning every candidate on every call.

wit_bindgen::generate!({ path: "../../wit", world: "balancer" });

use weir::policy::{backends, env};

/// Up to this many candidates, all are compared.
const SCAN_ALL: u32 = 4;

struct LeastConn;

/// Calls in flight per unit of weight, compared without division. Idle
/// candidates tie, and ties keep the first (randomly placed) one.
fn lighter(a: u32, b: u32) -> bool {
    let (wa, wb) = (u64::from(backends::weight(a).max(1)), u64::from(backends::weight(b).max(1)));
    let (la, lb) = (u64::from(backends::active_requests(a)), u64::from(backends::active_requests(b)));
    la * wb <= lb * wa
}

impl Guest for LeastConn {
    fn pick() -> Result<u32, String> {
        let n = backends::count();
        if n == 0 {
            return Err("no candidates".into());
        }
        let r = env::random();
        if n <= SCAN_ALL {
            // Start at a random candidate so ties spread instead of piling on 0.
            let start = (r % u64::from(n)) as u32;
            let mut best = start;
            for step in 1..n {
                let i = (start + step) % n;
                if !lighter(best, i) {
                    best = i;
                }
            }
            return Ok(best);
        }
        let a = (r % u64::from(n)) as u32;
        // A second, different candidate from the high bits.
        let b = (a + 1 + ((r >> 32) % u64::from(n - 1)) as u32) % n;
        Ok(if lighter(a, b) { a } else { b })
    }
}

export!(LeastConn);
