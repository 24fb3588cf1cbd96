//! round-robin: each call goes to the next candidate in turn.

wit_bindgen::generate!({ path: "../../wit", world: "balancer" });

use core::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

struct RoundRobin;

impl Guest for RoundRobin {
    fn pick(n: u32, _generation: u64, _random: u64) -> Result<u32, String> {
        if n == 0 {
            return Err("no candidates".into());
        }
        Ok(NEXT.fetch_add(1, Ordering::Relaxed) % n)
    }
}

export!(RoundRobin);
