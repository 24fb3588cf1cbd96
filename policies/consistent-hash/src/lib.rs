//! consistent-hash: calls with the same `x-hash-key` header go to the same
//! backend, and adding or removing one of N backends moves only about 1/N of
//! the keys.
//!
//! A ring of virtual nodes over the whole endpoint set (not just this call's
//! candidates) is rebuilt only when the set's generation changes. A key maps
//! to the first virtual node at or after its hash; if that endpoint is not a
//! candidate (ejected, unhealthy), the walk goes on to the next one. Calls
//! without the header are spread at random.

wit_bindgen::generate!({ path: "../../wit", world: "balancer" });

use std::cell::RefCell;
use weir::policy::{backends, call, env};

const HEADER: &str = "x-hash-key";
const VNODES: u32 = 160;

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
    ring.points.clear();
    ring.points.reserve((total * VNODES) as usize);
    for set_index in 0..total {
        let addr = backends::total_address(set_index);
        for v in 0..VNODES {
            ring.points.push((hash(addr.as_bytes(), u64::from(v)), set_index));
        }
    }
    ring.points.sort_unstable();
    ring.generation = generation;
}

struct ConsistentHash;

impl Guest for ConsistentHash {
    fn pick() -> Result<u32, String> {
        let n = backends::count();
        if n == 0 {
            return Err("no candidates".into());
        }
        let Some(key) = call::header(HEADER) else {
            return Ok((env::random() % u64::from(n)) as u32);
        };
        RING.with(|ring| {
            let mut ring = ring.borrow_mut();
            let generation = backends::generation();
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
                if seen_unusable > 4 * VNODES * 8 {
                    break; // most of the ring is unusable: stop walking
                }
            }
            Ok((h % u64::from(n)) as u32)
        })
    }
}

export!(ConsistentHash);
