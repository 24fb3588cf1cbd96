//! A weir balancing policy: a canary split by endpoint metadata.
//!
//! Endpoints registered with the metadata `track=canary` get a share of the
//! calls — the route's option `canary-percent`, else CANARY_PERCENT; the
//! other endpoints take the rest, in turn. With no canary among the
//! candidates (or nothing but canaries), all of them take turns.
//!
//! How a policy works: the gateway calls `pick` for every call, with the
//! number of candidates (0..count are the endpoints this call may use), the
//! generation of the service's endpoint set, and a fresh random number. The
//! rest it can ask through host calls — `backends::*` (addresses, weights,
//! metadata, health, lease, load), `call::*` (service, method, headers),
//! `env::*` (random, clock, log, zone) — all documented in wit/policy.wit.
//! State kept in statics lives as long as the policy version is loaded.

wit_bindgen::generate!({ path: "wit", world: "balancer" });

use std::cell::RefCell;
use std::collections::HashMap;

use weir::policy::{backends, call};

/// The share of calls that go to canaries, in percent, unless the route
/// sets `canary-percent` in its `[route.options]`.
const CANARY_PERCENT: u64 = 5;

struct State {
    /// The endpoint set `track` was learned on.
    generation: u64,
    /// Whether an endpoint is a canary, by its index in the whole set
    /// (`set-index`): stable while the generation is. Reading metadata is a
    /// host call with strings, so each endpoint is asked once per generation.
    track: HashMap<u32, bool>,
    /// Turns, for the round-robin within each group.
    turn: usize,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State {
        generation: u64::MAX,
        track: HashMap::new(),
        turn: 0,
    });
}

struct Canary;

impl Guest for Canary {
    fn pick(count: u32, generation: u64, random: u64) -> Result<u32, String> {
        if count == 0 {
            return Err("no candidates".into());
        }
        STATE.with(|state| {
            let mut state = state.borrow_mut();
            if state.generation != generation {
                // The set changed: set indices now mean other endpoints.
                state.generation = generation;
                state.track.clear();
            }
            let (mut canary, mut stable) = (Vec::new(), Vec::new());
            for (candidate, set_index) in (0..count).zip(backends::set_indices()) {
                let is_canary = *state.track.entry(set_index).or_insert_with(|| {
                    backends::metadata(candidate, "track").as_deref() == Some("canary")
                });
                if is_canary {
                    canary.push(candidate);
                } else {
                    stable.push(candidate);
                }
            }
            let percent = call::route_option("canary-percent")
                .and_then(|p| p.parse().ok())
                .unwrap_or(CANARY_PERCENT);
            let pool = match (canary.is_empty(), stable.is_empty()) {
                (false, false) if random % 100 < percent => canary,
                (false, false) | (true, false) => stable,
                _ => canary, // nothing but canaries
            };
            state.turn = state.turn.wrapping_add(1);
            Ok(pool[state.turn % pool.len()])
        })
    }
}

export!(Canary);
