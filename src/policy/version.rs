//! One compiled version of a policy, with its long-lived instances.
//!
//! Policy state (a round-robin counter, a hash ring) lives in an instance's
//! memory, so instances are kept, never made per call. A version keeps a few
//! of them so both cores can pick at once; a pick takes a free one without
//! waiting when it can. An instance that trapped cannot be entered again: it
//! is dropped and a fresh one made from the `InstancePre` on the next pick.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use wasmtime::component::TypedFunc;
use wasmtime::{Store, StoreLimitsBuilder, Trap};

use super::engine::{Compiled, PolicyEngine};
use super::host::{Balancer, BalancerPre, CallView, HostState};
use crate::balance::{Outcome, PickContext};

/// Why a pick did not give a usable answer.
#[derive(Debug, thiserror::Error)]
pub enum Fault {
    #[error("ran past its deadline")]
    Deadline,
    #[error("hit its memory limit")]
    Memory,
    #[error("trapped: {0}")]
    Trap(String),
    #[error("picked {0}, out of range")]
    OutOfRange(u32),
    #[error("returned an error: {0}")]
    Error(String),
    #[error("could not be instantiated: {0}")]
    Instantiate(String),
    #[error("had no free instance (every one was picking)")]
    Busy,
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Deadline => "deadline",
            Fault::Memory => "memory",
            Fault::Trap(_) => "trap",
            Fault::OutOfRange(_) => "out_of_range",
            Fault::Error(_) => "error",
            Fault::Instantiate(_) => "instantiate",
            Fault::Busy => "busy",
        }
    }
}

/// Faults of the policy's own making in a row (traps, errors, out of range,
/// memory) after which a version is reverted to the last good one.
pub const REVERT_AFTER: u32 = 10;

/// Deadline faults in a row after which a version is reverted. A deadline
/// counts wall time, so a pick the OS preempted on a busy machine runs past
/// it through no fault of the policy's: only a long unbroken run of them
/// (a policy that really loops) reverts a version.
pub const REVERT_AFTER_DEADLINES: u32 = 100;

/// How often an instance's place may be refilled after a trap: a policy that
/// traps on every pick costs at most one instantiation per this, per place.
const REFILL_EVERY: std::time::Duration = std::time::Duration::from_millis(50);

/// One long-lived instance's place, on cache lines of its own: threads
/// picking on their own instances write no line another one reads.
#[repr(align(128))]
struct Instance {
    live: Mutex<Option<Live>>,
    /// Someone is making this place's instance (off its lock).
    refilling: AtomicBool,
    /// When the place was last refilled (ms on the process clock).
    refilled_at_ms: AtomicU64,
}

/// Milliseconds since the first call, from 1.
fn clock_ms() -> u64 {
    static ORIGIN: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(std::time::Instant::now);
    origin.elapsed().as_millis() as u64 + 1
}

struct Live {
    store: Store<HostState>,
    bindings: Balancer,
    /// The optional `observe` export (world `learning-balancer`).
    observe: Option<TypedFunc<(u64, u32, u32, u32), ()>>,
    /// The optional state exports (world `stateful-balancer`).
    state: Option<StateFuncs>,
}

struct StateFuncs {
    export: TypedFunc<(), (Vec<u8>,)>,
    import: TypedFunc<(Vec<u8>,), ()>,
}

impl std::fmt::Debug for PolicyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyVersion")
            .field("name", &self.name)
            .field("digest", &self.digest)
            .field("source", &self.source)
            .finish()
    }
}

pub struct PolicyVersion {
    pub name: Arc<str>,
    /// A short digest of the component's bytes, to tell versions apart.
    pub digest: String,
    /// Where it came from: a file path or an etcd key.
    pub source: String,
    pub loaded_at: SystemTime,
    pub reads_call: bool,
    pub learns_from_outcomes: bool,
    /// Hands its learned state to the version that replaces it.
    pub carries_state: bool,
    pre: BalancerPre<HostState>,
    instances: Box<[Instance]>,
    pub picks: crate::metrics::Spread,
    pub faults: AtomicU64,
    consecutive_faults: AtomicU32,
    consecutive_deadlines: AtomicU32,
}

impl PolicyVersion {
    pub fn new(
        engine: &PolicyEngine,
        name: &str,
        source: String,
        bytes: &[u8],
        compiled: Compiled,
    ) -> PolicyVersion {
        PolicyVersion {
            name: name.into(),
            digest: digest(bytes),
            source,
            loaded_at: SystemTime::now(),
            reads_call: compiled.reads_call,
            learns_from_outcomes: compiled.learns_from_outcomes,
            carries_state: compiled.carries_state,
            pre: compiled.pre,
            instances: (0..engine.limits().instances.max(1))
                .map(|_| Instance {
                    live: Mutex::new(None),
                    refilling: AtomicBool::new(false),
                    refilled_at_ms: AtomicU64::new(0),
                })
                .collect(),
            picks: crate::metrics::Spread::default(),
            faults: AtomicU64::new(0),
            consecutive_faults: AtomicU32::new(0),
            consecutive_deadlines: AtomicU32::new(0),
        }
    }

    /// Makes every instance now (off the hot path: at install), so no pick
    /// pays for one unless an instance trapped.
    pub fn warm_up(&self, engine: &PolicyEngine) -> Result<(), Fault> {
        for instance in self.instances.iter() {
            let live = self
                .instantiate(engine)
                .map_err(|e| Fault::Instantiate(format!("{e:#}")))?;
            *instance.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(live);
        }
        Ok(())
    }

    /// The version keeps failing: revert it (see [`REVERT_AFTER`] and
    /// [`REVERT_AFTER_DEADLINES`]).
    pub fn failing(&self) -> bool {
        self.consecutive_faults.load(Ordering::Relaxed) >= REVERT_AFTER
            || self.consecutive_deadlines.load(Ordering::Relaxed) >= REVERT_AFTER_DEADLINES
    }

    /// Asks the policy for a position in `ctx.candidates`.
    pub fn pick(&self, engine: &PolicyEngine, ctx: &PickContext<'_>) -> Result<usize, Fault> {
        self.picks.add();
        let outcome = self.pick_inner(engine, ctx);
        match &outcome {
            Ok(_) => {
                // Read before written: a store to a line every thread
                // reads would move it between cores on every pick.
                if self.consecutive_faults.load(Ordering::Relaxed) != 0 {
                    self.consecutive_faults.store(0, Ordering::Relaxed);
                }
                if self.consecutive_deadlines.load(Ordering::Relaxed) != 0 {
                    self.consecutive_deadlines.store(0, Ordering::Relaxed);
                }
            }
            // No free instance: not the policy's doing.
            Err(Fault::Busy) => {}
            Err(Fault::Deadline) => {
                self.faults.fetch_add(1, Ordering::Relaxed);
                self.consecutive_deadlines.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.faults.fetch_add(1, Ordering::Relaxed);
                self.consecutive_faults.fetch_add(1, Ordering::Relaxed);
            }
        }
        outcome
    }

    fn pick_inner(&self, engine: &PolicyEngine, ctx: &PickContext<'_>) -> Result<usize, Fault> {
        let members = ctx.members;
        let mut instance = self.acquire_live(engine)?;
        let live = instance.as_mut().expect("instantiated above");
        let view = &mut live.store.data_mut().call;
        view.members = Some(members.clone());
        view.candidates.clear();
        // Candidates are distinct positions in ascending order: as many as
        // there are members means all of them, and nothing need be copied.
        view.all = ctx.candidates.len() == members.len();
        if !view.all {
            view.candidates
                .extend(ctx.candidates.iter().map(|&c| c as u32));
        }
        let count = ctx.candidates.len() as u32;
        let generation = members.generation();
        if self.reads_call {
            view.service = ctx.service.into();
            view.method.clear();
            view.method.push_str(ctx.method);
            view.headers = Some(Arc::clone(ctx.headers));
            view.options = ctx.options.cloned();
            view.hidden_headers = Some(Arc::clone(ctx.hidden_headers));
        }
        let running = engine.running();
        live.store.set_epoch_deadline(engine.deadline_ticks());
        let result = live
            .bindings
            .call_pick(&mut live.store, count, generation, rand::random());
        drop(running);
        let view = &mut live.store.data_mut().call;
        view.members = None;
        view.headers = None;
        view.options = None;
        view.hidden_headers = None;
        match result {
            Ok(Ok(i)) if (i as usize) < ctx.candidates.len() => Ok(i as usize),
            Ok(Ok(i)) => Err(Fault::OutOfRange(i)),
            Ok(Err(msg)) => Err(Fault::Error(msg.chars().take(256).collect())),
            Err(err) => {
                // The instance cannot be entered again after a trap.
                *instance = None;
                Err(classify(&err))
            }
        }
    }

    /// Tells the policy how a call it placed ended (if it exports
    /// `observe`). A fault loses this observation only: it is counted, the
    /// instance re-made if it trapped, and no call is affected.
    pub fn observe(&self, engine: &PolicyEngine, outcome: &Outcome) -> Result<(), Fault> {
        if !self.learns_from_outcomes {
            return Ok(());
        }
        let mut instance = self.acquire_live(engine)?;
        let live = instance.as_mut().expect("instantiated above");
        let Some(observe) = live.observe else {
            return Ok(());
        };
        let _running = engine.running();
        live.store.set_epoch_deadline(engine.deadline_ticks());
        let args = (
            outcome.generation,
            outcome.set_index,
            outcome.status,
            outcome.latency_us,
        );
        observe.call(&mut live.store, args).map_err(|err| {
            *instance = None;
            classify(&err)
        })
    }

    /// Each instance's learned state (`export-state`), in instance order;
    /// `None` for an instance that has none to give (not made, or faulted).
    /// Empty for a version that does not carry state.
    pub fn export_states(&self, engine: &PolicyEngine) -> Vec<Option<Vec<u8>>> {
        if !self.carries_state {
            return Vec::new();
        }
        self.instances
            .iter()
            .map(|instance| {
                let mut guard = instance.live.lock().unwrap_or_else(|p| p.into_inner());
                let live = guard.as_mut()?;
                let funcs = live.state.as_ref()?;
                let _running = engine.running();
                live.store.set_epoch_deadline(engine.instantiate_ticks());
                match funcs.export.call(&mut live.store, ()) {
                    Ok((state,)) => Some(state),
                    Err(err) => {
                        tracing::warn!(policy = %self.name, fault = %classify(&err), "export-state failed: that instance's state is lost");
                        *guard = None;
                        None
                    }
                }
            })
            .collect()
    }

    /// Gives each instance the state of the matching instance of the
    /// version this one replaces (see [`export_states`](Self::export_states)).
    /// Returns how many instances took one.
    pub fn import_states(&self, engine: &PolicyEngine, states: &[Option<Vec<u8>>]) -> usize {
        if !self.carries_state {
            return 0;
        }
        let mut taken = 0;
        for (instance, state) in self.instances.iter().zip(states) {
            let Some(state) = state else { continue };
            let mut guard = instance.live.lock().unwrap_or_else(|p| p.into_inner());
            let Some(live) = guard.as_mut() else { continue };
            let Some(funcs) = live.state.as_ref() else {
                continue;
            };
            let _running = engine.running();
            live.store.set_epoch_deadline(engine.instantiate_ticks());
            match funcs.import.call(&mut live.store, (state.clone(),)) {
                Ok(()) => taken += 1,
                Err(err) => {
                    tracing::warn!(policy = %self.name, fault = %classify(&err), "import-state failed: that instance starts fresh");
                    *guard = None;
                }
            }
        }
        taken
    }

    /// The first free instance, in order: picks one after another always use
    /// the first, so a stateful policy (round-robin's counter) stays exact;
    /// more are used only while picks really run at the same time. Never
    /// waits: when every instance is picking, the pick is `Busy` (and falls
    /// back). A place left empty by a trap is refilled here, without holding
    /// its lock while the instance is made.
    fn acquire_live(&self, engine: &PolicyEngine) -> Result<MutexGuard<'_, Option<Live>>, Fault> {
        // Each thread starts from an instance of its own, so threads do not
        // contend for the first one, an instance stays in one core's cache,
        // and a stateful policy (a round-robin counter) keeps an even
        // sequence per instance.
        let first = crate::metrics::thread_slot() % self.instances.len();
        let (before, from_mine) = self.instances.split_at(first);
        for instance in from_mine.iter().chain(before) {
            let Ok(guard) = instance.live.try_lock() else {
                continue;
            };
            if guard.is_some() {
                return Ok(guard);
            }
            drop(guard);
            let last = instance.refilled_at_ms.load(Ordering::Relaxed);
            if last != 0 && clock_ms() < last + REFILL_EVERY.as_millis() as u64 {
                continue; // refilled moments ago and trapped again: not yet
            }
            if instance.refilling.swap(true, Ordering::AcqRel) {
                continue; // another pick is making it
            }
            instance.refilled_at_ms.store(clock_ms(), Ordering::Relaxed);
            let made = self.instantiate(engine);
            // Others only try this lock, and let go at once while it is empty.
            let mut guard = instance.live.lock().unwrap_or_else(|p| p.into_inner());
            instance.refilling.store(false, Ordering::Release);
            let live = made.map_err(|e| Fault::Instantiate(format!("{e:#}")))?;
            *guard = Some(live);
            return Ok(guard);
        }
        Err(Fault::Busy)
    }

    fn instantiate(&self, engine: &PolicyEngine) -> wasmtime::Result<Live> {
        let state = HostState {
            limits: StoreLimitsBuilder::new()
                .memory_size(engine.limits().memory_bytes)
                .instances(16)
                .trap_on_grow_failure(true)
                .build(),
            call: CallView::default(),
            policy: self.name.clone(),
            zone: engine.zone.clone(),
            wasi: Default::default(),
        };
        let mut store = Store::new(engine.engine(), state);
        store.limiter(|s| &mut s.limits);
        // Instantiating (memory set-up, start functions) gets more room than a pick.
        let _running = engine.running();
        store.set_epoch_deadline(engine.instantiate_ticks());
        let instance = self.pre.instance_pre().instantiate(&mut store)?;
        let bindings = Balancer::new(&mut store, &instance)?;
        let observe = if self.learns_from_outcomes {
            Some(instance.get_typed_func(&mut store, "observe")?)
        } else {
            None
        };
        let state = if self.carries_state {
            Some(StateFuncs {
                export: instance.get_typed_func(&mut store, "export-state")?,
                import: instance.get_typed_func(&mut store, "import-state")?,
            })
        } else {
            None
        };
        Ok(Live {
            store,
            bindings,
            observe,
            state,
        })
    }
}

fn classify(err: &wasmtime::Error) -> Fault {
    if let Some(trap) = err.downcast_ref::<Trap>() {
        if *trap == Trap::Interrupt {
            return Fault::Deadline;
        }
    }
    let text = format!("{err:#}");
    if text.contains("forcing trap when growing memory")
        || text.contains("memory") && text.contains("limit")
    {
        return Fault::Memory;
    }
    // The first line is "error while executing at wasm backtrace:"; what
    // happened is the root cause (a trap code, or the WASI stub that was
    // called), and the innermost frame says where.
    let cause = err.root_cause().to_string();
    let frame = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("0:"))
        .map(|l| format!(" (in {})", l.trim_start_matches("0:").trim()))
        .unwrap_or_default();
    Fault::Trap(format!("{cause}{frame}").chars().take(300).collect())
}

/// The identity of a component: SHA-256 of its bytes, in hex. (It keys the
/// compile cache: a weak hash would let a colliding component be served
/// in place of another.)
pub fn digest(bytes: &[u8]) -> String {
    digest_bytes(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// SHA-256 of a component: what a signature signs.
pub fn digest_bytes(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}
