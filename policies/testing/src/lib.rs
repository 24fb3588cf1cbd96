//! testing: a policy that misbehaves on request, for the sandbox tests.
//!
//! The `x-policy-test` header picks the misdeed: `loop` (never returns),
//! `trap` (unreachable), `bomb` (grows memory without end), `range` (an index
//! far out of range), `error` (returns an error), `log` (logs, then picks 0),
//! `peek:NAME` (picks candidate 1 when it can read header NAME, else 0: the
//! hidden-header tests). Without it, it picks candidate 0.

wit_bindgen::generate!({ path: "../../wit", world: "balancer" });

use weir::policy::{call, env};

struct Testing;

impl Guest for Testing {
    fn pick(_count: u32, _generation: u64, _random: u64) -> Result<u32, String> {
        match call::header("x-policy-test").as_deref() {
            Some("loop") => {
                let mut x = 0u64;
                loop {
                    x = core::hint::black_box(x.wrapping_add(1));
                }
            }
            Some("trap") => core::arch::wasm32::unreachable(),
            Some("bomb") => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1u8; 64 << 20]);
                    core::hint::black_box(&hoard);
                }
            }
            Some("range") => Ok(1_000_000),
            Some("error") => Err("asked to fail".into()),
            Some("log") => {
                env::log(2, "hello from the testing policy");
                Ok(0)
            }
            Some(peek) if peek.starts_with("peek:") => {
                Ok(u32::from(call::header(&peek["peek:".len()..]).is_some()))
            }
            _ => Ok(0),
        }
    }
}

export!(Testing);
