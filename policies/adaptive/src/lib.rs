//! adaptive: learns from outcomes (world `stateful-balancer`: its scores
//! move to the next version of it on a swap).
//!
//! Health checks and outlier detection catch a backend that is down; they do
//! not catch one that answers every call with INTERNAL. This policy does:
//! each endpoint has a score in (0, 1], kept per set index and started over
//! when the set changes. A call that failed on the server's side cuts its
//! endpoint's score by a third; a success wins back a sixteenth of the way to
//! 1. A pick draws two random candidates and takes one with odds in
//! proportion to their merit, score × weight ÷ (calls in flight + 1): shares
//! follow the weights while all is well, a failing or busy endpoint loses
//! nearly every draw, and one pick in 64 goes to a random candidate so a
//! recovered endpoint is noticed.

wit_bindgen::generate!({ path: "../../wit", world: "stateful-balancer" });

use std::cell::RefCell;
use weir::policy::backends;

/// The lowest score: an endpoint is never written off for good.
const FLOOR: f32 = 1.0 / 64.0;
/// One pick in this many explores.
const EXPLORE_EVERY: u64 = 64;

/// gRPC codes that mean the server failed the call (not the caller's fault).
fn server_failure(status: u32) -> bool {
    matches!(status, 2 | 4 | 8 | 13 | 14 | 15)
}

struct State {
    generation: u64,
    /// Score per set index.
    scores: Vec<f32>,
}

thread_local! {
    static STATE: RefCell<State> = const { RefCell::new(State { generation: u64::MAX, scores: Vec::new() }) };
}

impl State {
    fn for_generation(&mut self, generation: u64) -> &mut Vec<f32> {
        if self.generation != generation {
            self.generation = generation;
            self.scores = vec![1.0; backends::total() as usize];
        }
        &mut self.scores
    }
}

struct Adaptive;

impl Adaptive {
    fn merit(scores: &[f32], candidate: u32) -> f32 {
        let score = scores
            .get(backends::set_index(candidate) as usize)
            .copied()
            .unwrap_or(1.0);
        let load = backends::load_of(candidate);
        score * load.weight.max(1) as f32 / (load.active_requests as f32 + 1.0)
    }
}

impl Guest for Adaptive {
    fn pick(n: u32, generation: u64, r: u64) -> Result<u32, String> {
        if n == 0 {
            return Err("no candidates".into());
        }
        if n == 1 || r % EXPLORE_EVERY == 0 {
            return Ok(((r >> 8) % u64::from(n)) as u32);
        }
        let a = ((r >> 8) % u64::from(n)) as u32;
        let b = (a + 1 + ((r >> 36) % u64::from(n - 1)) as u32) % n;
        STATE.with(|state| {
            let mut state = state.borrow_mut();
            let scores = state.for_generation(generation);
            let (ma, mb) = (Self::merit(scores, a), Self::merit(scores, b));
            // A fraction of 1 from the random number, remixed (the draws of
            // `a` and `b` used its bits as they are).
            let draw = (r.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as f32 / (1u64 << 24) as f32;
            Ok(if draw * (ma + mb) < ma { a } else { b })
        })
    }

    fn observe(generation: u64, set_index: u32, status: u32, _latency_us: u32) {
        STATE.with(|state| {
            let mut state = state.borrow_mut();
            if state.generation != generation {
                return; // the set changed since: the index means another endpoint
            }
            let Some(score) = state.scores.get_mut(set_index as usize) else {
                return;
            };
            *score = if server_failure(status) {
                (*score * 2.0 / 3.0).max(FLOOR)
            } else if status == 0 {
                *score + (1.0 - *score) / 16.0
            } else {
                *score // the caller's doing (cancelled, invalid argument...): no signal
            };
        });
    }

    /// `adp1`, the generation (u64), then each score (f32), little-endian.
    fn export_state() -> Vec<u8> {
        STATE.with(|state| {
            let state = state.borrow();
            let mut out = Vec::with_capacity(12 + 4 * state.scores.len());
            out.extend_from_slice(STATE_MAGIC);
            out.extend_from_slice(&state.generation.to_le_bytes());
            for score in &state.scores {
                out.extend_from_slice(&score.to_le_bytes());
            }
            out
        })
    }

    /// Takes what `export_state` wrote; anything else is ignored (the
    /// scores start fresh).
    fn import_state(bytes: Vec<u8>) {
        let Some(rest) = bytes.strip_prefix(STATE_MAGIC) else {
            return;
        };
        if rest.len() < 8 || (rest.len() - 8) % 4 != 0 {
            return;
        }
        let (generation, scores) = rest.split_at(8);
        let generation = u64::from_le_bytes(generation.try_into().expect("8 bytes"));
        let scores = scores
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .map(|s| if s.is_finite() { s.clamp(FLOOR, 1.0) } else { 1.0 })
            .collect();
        STATE.with(|state| *state.borrow_mut() = State { generation, scores });
    }
}

/// The first bytes of an exported state (its format's version).
const STATE_MAGIC: &[u8] = b"adp1";

export!(Adaptive);
