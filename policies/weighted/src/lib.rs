//! weighted: smooth weighted round-robin, as in nginx.
//!
//! Every call, each candidate's current weight grows by its weight; the
//! largest wins and is lowered by the total. Over any window the shares
//! follow the weights, and heavy backends are spread out, not bunched.
//! The current weights are kept per endpoint of the set and start over when
//! the set's generation changes.

wit_bindgen::generate!({ path: "../../wit", world: "balancer" });

use std::cell::RefCell;
use weir::policy::backends;

struct State {
    generation: u64,
    current: Vec<i64>,
    /// Rotation for the all-weights-zero case.
    turn: u32,
}

thread_local! {
    static STATE: RefCell<State> = const { RefCell::new(State { generation: u64::MAX, current: Vec::new(), turn: 0 }) };
}

struct Weighted;

impl Guest for Weighted {
    fn pick(_count: u32, generation: u64, _random: u64) -> Result<u32, String> {
        let weights = backends::weights();
        if weights.is_empty() {
            return Err("no candidates".into());
        }
        STATE.with(|state| {
            let mut state = state.borrow_mut();
            if state.generation != generation {
                state.generation = generation;
                state.current = vec![0; backends::total() as usize];
            }
            let mut total = 0i64;
            let mut best: Option<(u32, usize)> = None;
            let slots = backends::set_indices();
            for (i, (w, slot)) in weights.iter().zip(slots).enumerate() {
                let slot = slot as usize;
                if slot >= state.current.len() {
                    state.current.resize(slot + 1, 0);
                }
                let w = i64::from(*w);
                state.current[slot] += w;
                total += w;
                if best.is_none_or(|(_, b)| state.current[slot] > state.current[b]) {
                    best = Some((i as u32, slot));
                }
            }
            let (pick, slot) = best.expect("weights is not empty");
            if total == 0 {
                // Every weight is zero: take turns rather than starve them all.
                state.turn = state.turn.wrapping_add(1);
                return Ok(state.turn % weights.len() as u32);
            }
            state.current[slot] -= total;
            Ok(pick)
        })
    }
}

export!(Weighted);
