//! zone-aware: keeps calls in the caller's zone, spilling over when it is busy.
//!
//! The zone is the request's `x-zone` header (another with the route option
//! `header`), else the gateway's own `zone` setting. Candidates whose metadata `zone` matches are preferred (the least
//! busy of two, at random); when none matches, or the local zone's best
//! candidate is much busier than the best elsewhere, the call spills over to
//! every candidate.

wit_bindgen::generate!({ path: "../../wit", world: "balancer" });

use weir::policy::{backends, call, env};

/// How many more calls in flight the local zone may carry before spilling.
const SPILL_AT: u32 = 8;

struct ZoneAware;

fn two_choices(pool: &[u32], r: u64) -> u32 {
    if pool.len() == 1 {
        return pool[0];
    }
    let a = pool[(r % pool.len() as u64) as usize];
    let b = pool[((r >> 32) % pool.len() as u64) as usize];
    if backends::active_requests(a) <= backends::active_requests(b) { a } else { b }
}

impl Guest for ZoneAware {
    fn pick(n: u32, _generation: u64, r: u64) -> Result<u32, String> {
        if n == 0 {
            return Err("no candidates".into());
        }
        let all: Vec<u32> = (0..n).collect();
        let header = call::route_option("header");
        let Some(zone) = call::header(header.as_deref().unwrap_or("x-zone")).or_else(env::zone) else {
            return Ok(two_choices(&all, r));
        };
        let (local, remote): (Vec<u32>, Vec<u32>) =
            all.iter().partition(|&&i| backends::metadata(i, "zone").as_deref() == Some(zone.as_str()));
        if local.is_empty() {
            return Ok(two_choices(&all, r));
        }
        let least = |pool: &[u32]| pool.iter().map(|&i| backends::active_requests(i)).min().unwrap_or(u32::MAX);
        if !remote.is_empty() && least(&local) > least(&remote) + SPILL_AT {
            return Ok(two_choices(&all, r));
        }
        Ok(two_choices(&local, r))
    }
}

export!(ZoneAware);
