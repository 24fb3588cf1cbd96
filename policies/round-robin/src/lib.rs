//! round-robin: each call goes to the next candidate in turn.

wit_bindgen::generate!({ path: "../../wit", world: "balancer" });

use core::sync::atomic::{AtomicU32, Ordering};
use weir::policy::backends;

static NEXT: AtomicU32 = AtomicU32::new(0);

struct RoundRobin;

impl Guest for RoundRobin {
    fn pick() -> Result<u32, String> {
        let n = backends::count();
        if n == 0 {
            return Err("no candidates".into());
        }
        Ok(NEXT.fetch_add(1, Ordering::Relaxed) % n)
    }
}

export!(RoundRobin);
