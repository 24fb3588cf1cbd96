//! least-conn: fewest calls in flight per unit of weight.
//!
//! With a handful of candidates every one is compared (exact, and cheap);
//! above that, the power of two choices: two candidates drawn at random, the
//! lighter wins. That tracks the least-loaded backend closely without
//! scanning every candidate on every call.

wit_bindgen::generate!({ path: "../../wit", world: "balancer" });

use weir::policy::backends::{self, Load};

/// Up to this many candidates, all are compared.
const SCAN_ALL: u32 = 4;

struct LeastConn;

/// Calls in flight per unit of weight, compared without division. Idle
/// candidates tie, and ties keep the first (randomly placed) one.
fn lighter(a: &Load, b: &Load) -> bool {
    let (wa, wb) = (u64::from(a.weight.max(1)), u64::from(b.weight.max(1)));
    u64::from(a.active_requests) * wb <= u64::from(b.active_requests) * wa
}

impl Guest for LeastConn {
    fn pick(n: u32, _generation: u64, r: u64) -> Result<u32, String> {
        if n == 0 {
            return Err("no candidates".into());
        }
        if n <= SCAN_ALL {
            // Start at a random candidate so ties spread instead of piling on 0.
            let start = (r % u64::from(n)) as u32;
            let (mut best, mut best_load) = (start, backends::load_of(start));
            for step in 1..n {
                let i = (start + step) % n;
                let load = backends::load_of(i);
                if !lighter(&best_load, &load) {
                    (best, best_load) = (i, load);
                }
            }
            return Ok(best);
        }
        let a = (r % u64::from(n)) as u32;
        // A second, different candidate from the high bits.
        let b = (a + 1 + ((r >> 32) % u64::from(n - 1)) as u32) % n;
        Ok(if lighter(&backends::load_of(a), &backends::load_of(b)) { a } else { b })
    }
}

export!(LeastConn);
