//! consistent-hash: calls with the same key header go to the same backend,
//! and adding or removing one of N backends moves only about 1/N of the
//! keys. The header is the route's option `header` (`[route.options]`),
//! `x-hash-key` by default.
//!
//! A ring of virtual nodes over the whole endpoint set (not just this call's
//! candidates) is rebuilt only when the set's generation changes. A key maps
//! to the first virtual node at or after its hash; if that endpoint is not a
//! candidate (ejected, unhealthy), the walk goes on to the next one. Calls
//! without the header are spread at random.

wit_bindgen::generate!({ path: "../../wit", world: "balancer" });

use std::cell::RefCell;
use weir::policy::{backends, call};

const DEFAULT_HEADER: &str = "x-hash-key";
/// Points per endpoint: 160 for small sets, fewer for large ones, so the
/// ring stays near 8,192 points and rebuilding it fits in a pick's deadline.
const VNODES: u32 = 160;
const RING_POINTS: u32 = 8192;

fn vnodes(total: u32) -> u32 {
    (RING_POINTS / total.max(1)).clamp(8, VNODES)
}

struct Ring {
    generation: u64,
    /// (hash, index in the set), sorted by hash.
    points: Vec<(u64, u32)>,
}

thread_local! {
    static RING: RefCell<Ring> = const { RefCell::new(Ring { generation: u64::MAX, points: Vec::new() }) };
}

/// FNV-1a, then a splitmix64 finaliser to spread nearby inputs.
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn rebuild(ring: &mut Ring, generation: u64) {
    let total = backends::total();
    let per = vnodes(total);
    ring.points.clear();
    ring.points.reserve((total * per) as usize);
    for set_index in 0..total {
        let addr = backends::total_address(set_index);
        for v in 0..per {
            ring.points.push((hash(addr.as_bytes(), u64::from(v)), set_index));
        }
    }
    ring.points.sort_unstable();
    ring.generation = generation;
}

struct ConsistentHash;

impl Guest for ConsistentHash {
    fn pick(n: u32, generation: u64, random: u64) -> Result<u32, String> {
        if n == 0 {
            return Err("no candidates".into());
        }
        let header = call::route_option("header");
        let Some(key) = call::header(header.as_deref().unwrap_or(DEFAULT_HEADER)) else {
            return Ok((random % u64::from(n)) as u32);
        };
        RING.with(|ring| {
            let mut ring = ring.borrow_mut();
            if ring.generation != generation {
                rebuild(&mut ring, generation);
            }
            let h = hash(key.as_bytes(), 0);
            let start = ring.points.partition_point(|(p, _)| *p < h);
            let len = ring.points.len();
            let mut seen_unusable = 0u32;
            for step in 0..len {
                let (_, set_index) = ring.points[(start + step) % len];
                if let Some(candidate) = backends::candidate_of(set_index) {
                    return Ok(candidate);
                }
                seen_unusable += 1;
                if seen_unusable > 4 * RING_POINTS {
                    break; // most of the ring is unusable: stop walking
                }
            }
            Ok((h % u64::from(n)) as u32)
        })
    }
}

export!(ConsistentHash);
