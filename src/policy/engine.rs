//! The one wasmtime `Engine` of the gateway, its linker, and the epoch clock
//! that bounds every pick in time. Compiling a policy happens here, off the
//! hot path.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

use super::host::{BalancerPre, HostState};
use super::PolicyError;
use crate::metrics::{thread_slot, Padded, SLOTS};

/// The sandbox every policy runs in.
#[derive(Clone, Debug)]
pub struct Limits {
    /// How long one pick may run before it is cut off.
    pub deadline: Duration,
    /// Linear memory one instance may grow to.
    pub memory_bytes: usize,
    /// Long-lived instances per policy version (picks run on them in parallel).
    pub instances: usize,
    /// The largest component accepted, checked before anything is compiled.
    pub max_component_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            deadline: Duration::from_millis(1),
            memory_bytes: 8 << 20,
            instances: 4,
            max_component_bytes: 32 << 20,
        }
    }
}

/// Compiled components kept for reuse.
const COMPILE_CACHE: usize = 16;

/// The epoch counts `TICK`s (see [`EpochClock`]); a pick's deadline is a
/// number of them. 1 ms: with the default 1 ms deadline a pick is stopped
/// one to two deadlines in while calls flow.
const TICK: Duration = Duration::from_millis(1);

/// Ticks of the epoch that span `deadline` whole (rounded up), plus one:
/// a pick's deadline counts from an epoch that advanced up to a tick
/// before the pick began.
fn ticks_of(deadline: Duration) -> u64 {
    u64::try_from(deadline.as_micros().div_ceil(TICK.as_micros()))
        .unwrap_or(u64::MAX)
        .max(1)
        .saturating_add(1)
}

/// What compiling and checking a component yields.
pub struct Compiled {
    pub pre: BalancerPre<HostState>,
    pub component: Component,
    pub reads_call: bool,
    pub learns_from_outcomes: bool,
    /// Exports `export-state` and `import-state` (world `stateful-balancer`).
    pub carries_state: bool,
}

pub struct PolicyEngine {
    engine: Engine,
    /// Recently compiled components by digest: going back to a version (a
    /// revert, a re-publish) costs no compile. Bounded; oldest out first.
    compiled: std::sync::Mutex<std::collections::VecDeque<(String, Component)>>,
    compiler: CompileThread,
    linker: Linker<HostState>,
    /// The deadline and the size limit change by a configuration reload;
    /// the memory and instances stay as the engine was made with.
    limits: arc_swap::ArcSwap<Limits>,
    /// `limits.deadline` in ticks, read by every pick: one load, where
    /// reading `limits` takes a guard of the swap and a division.
    deadline_ticks: AtomicU64,
    pub zone: Option<Arc<str>>,
    clock: EpochClock,
}

impl PolicyEngine {
    pub fn new(limits: Limits, zone: Option<Arc<str>>) -> Result<PolicyEngine, PolicyError> {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.cranelift_opt_level(OptLevel::Speed);
        config.max_wasm_stack(512 << 10);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_component_instances(256)
            .total_core_instances(256)
            .total_memories(256)
            .total_tables(256)
            .max_memory_size(limits.memory_bytes.max(1 << 20));
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| PolicyError::Engine(format!("{e:#}")))?;
        let mut linker = Linker::new(&engine);
        super::host::add_to_linker(&mut linker)
            .map_err(|e| PolicyError::Engine(format!("{e:#}")))?;
        let clock = EpochClock::start(engine.clone()).map_err(|e| {
            PolicyError::Engine(format!("cannot start the epoch backstop thread: {e}"))
        })?;
        let compiler = CompileThread::start(engine.clone())
            .map_err(|e| PolicyError::Engine(format!("cannot start the compile thread: {e}")))?;
        Ok(PolicyEngine {
            engine,
            compiled: Default::default(),
            compiler,
            linker,
            deadline_ticks: AtomicU64::new(ticks_of(limits.deadline)),
            limits: arc_swap::ArcSwap::from_pointee(limits),
            zone,
            clock,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The sandbox limits in force.
    pub fn limits(&self) -> Arc<Limits> {
        self.limits.load_full()
    }

    /// Picks from now on are cut off after `deadline`; components are
    /// accepted up to `max_component_bytes` (a configuration reload).
    pub fn set_live_limits(&self, deadline: Duration, max_component_bytes: usize) {
        let limits = Limits {
            deadline,
            max_component_bytes,
            ..Limits::clone(&self.limits.load())
        };
        self.limits.store(Arc::new(limits));
        self.deadline_ticks
            .store(ticks_of(deadline), Ordering::Relaxed);
    }

    /// Ticks of the epoch instantiating a policy may take (50 ms).
    pub fn instantiate_ticks(&self) -> u64 {
        (50_000 / TICK.as_micros()) as u64
    }

    /// Ticks of the epoch a pick may run for (at least one full `deadline`).
    pub fn deadline_ticks(&self) -> u64 {
        self.deadline_ticks.load(Ordering::Relaxed)
    }

    /// Compiles `bytes` and checks it is a `weir:policy` balancer: every import
    /// is one weir provides, and it exports `pick` with the right type.
    /// Blocks the caller (a blocking thread, never a runtime worker) while
    /// the compile thread works: a pathological component delays only its
    /// own install.
    pub fn compile(&self, bytes: &[u8]) -> Result<Compiled, PolicyError> {
        let limit = self.limits.load().max_component_bytes;
        if bytes.len() > limit {
            return Err(PolicyError::TooLarge {
                size: bytes.len(),
                limit,
            });
        }
        let digest = super::version::digest(bytes);
        let cached = {
            let cache = self.compiled.lock().expect("compile cache");
            cache
                .iter()
                .find(|(d, _)| *d == digest)
                .map(|(_, c)| c.clone())
        };
        let component = match cached {
            Some(c) => c,
            None => {
                let c = self.compiler.compile(bytes)?;
                let mut cache = self.compiled.lock().expect("compile cache");
                if cache.len() >= COMPILE_CACHE {
                    cache.pop_front();
                }
                cache.push_back((digest, c.clone()));
                c
            }
        };
        let ty = component.component_type();
        // Only weir's own interfaces and WASI may be imported; WASI is a
        // sandbox with no capabilities (`wasi.rs`).
        if let Some((name, _)) = ty
            .imports(&self.engine)
            .find(|(name, _)| !name.starts_with("weir:policy/") && !name.starts_with("wasi:"))
        {
            return Err(PolicyError::World(format!(
                "imports {name:?}, which weir does not provide"
            )));
        }
        let mut linker = self.linker.clone();
        let mut resource_types = super::wasi::ResourceTypes::default();
        for (name, item) in ty.imports(&self.engine) {
            if name.starts_with("wasi:") {
                super::wasi::define(
                    &mut linker,
                    &self.engine,
                    name,
                    item.ty,
                    &mut resource_types,
                )
                .map_err(|e| PolicyError::World(format!("{e:#}")))?;
            }
        }
        let instance_pre = linker
            .instantiate_pre(&component)
            .map_err(|e| PolicyError::World(format!("{e:#}")))?;
        let pre =
            BalancerPre::new(instance_pre).map_err(|e| PolicyError::World(format!("{e:#}")))?;
        let reads_call = ty
            .imports(&self.engine)
            .any(|(name, _)| name.starts_with("weir:policy/call"));
        let learns_from_outcomes = component.get_export_index(None, "observe").is_some();
        let carries_state = component.get_export_index(None, "export-state").is_some()
            && component.get_export_index(None, "import-state").is_some();
        Ok(Compiled {
            pre,
            component,
            reads_call,
            learns_from_outcomes,
            carries_state,
        })
    }

    /// Call before entering guest code (and before setting its deadline)
    /// and keep while it runs: it brings the epoch current, and the
    /// backstop keeps looking while the guest runs.
    pub fn running(&self) -> Running<'_> {
        self.clock.running()
    }

    /// Stops the epoch backstop thread (also done on drop).
    pub fn stop(&mut self) {
        self.clock.stop();
    }
}

/// The one thread components compile on, one at a time, at a low CPU
/// priority: a component that takes seconds to compile takes them mostly
/// from idle time, not from calls. (With wasmtime's parallel compilation, a compile
/// took every core while calls waited.)
struct CompileThread {
    requests: std::sync::mpsc::Sender<CompileRequest>,
}

/// The bytes to compile, and where the result goes.
type CompileRequest = (
    Vec<u8>,
    std::sync::mpsc::SyncSender<Result<Component, PolicyError>>,
);

impl CompileThread {
    fn start(engine: Engine) -> std::io::Result<CompileThread> {
        let (requests, incoming) = std::sync::mpsc::channel::<CompileRequest>();
        // Detached: it ends when the engine (the last sender) is dropped.
        std::thread::Builder::new()
            .name("weir-policy-compile".into())
            .spawn(move || {
                lower_priority();
                for (bytes, reply) in incoming {
                    let compiled = Component::new(&engine, &bytes)
                        .map_err(|e| compile_error(&format!("{e:#}")));
                    let _ = reply.send(compiled); // the caller may have gone
                }
            })?;
        Ok(CompileThread { requests })
    }

    fn compile(&self, bytes: &[u8]) -> Result<Component, PolicyError> {
        let gone = || PolicyError::Engine("the compile thread has stopped".into());
        let (reply, result) = std::sync::mpsc::sync_channel(1);
        self.requests
            .send((bytes.to_vec(), reply))
            .map_err(|_| gone())?;
        result.recv().map_err(|_| gone())?
    }
}

/// What a failed compile says. A component whose memory starts larger
/// than `[policy] memory_mib` (a Python policy starts near 13 MiB) is named
/// as such, with the setting that would admit it: wasmtime reports it only
/// as text ("memory has a minimum byte size of N which exceeds the limit").
fn compile_error(message: &str) -> PolicyError {
    let needs = message
        .split("minimum byte size of ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    match needs {
        Some(bytes) => PolicyError::TooMuchMemory {
            needs_mib: bytes.div_ceil(1 << 20),
        },
        None => PolicyError::Invalid(one_line(message)),
    }
}

/// Niceness 10: against one busy runtime worker the compile gets about a
/// tenth of a core (CFS weights 110 : 1024), so calls keep their CPU, yet an
/// install on a saturated gateway still finishes (at niceness 19 a 30 ms
/// compile took seconds while the test suite loaded both cores). Failing to
/// lower it is logged, never fatal.
fn lower_priority() {
    use thread_priority::unix::{
        set_thread_priority_and_policy, thread_native_id, NormalThreadSchedulePolicy,
        ThreadSchedulePolicy,
    };
    // The crate maps 0..=99 onto niceness 19..=-20 (rounding down): 22
    // is niceness 10, which the unit test below reads back from /proc.
    let lower = thread_priority::ThreadPriorityValue::try_from(22u8)
        .map_err(|e| format!("{e:?}"))
        .and_then(|p| {
            set_thread_priority_and_policy(
                thread_native_id(),
                thread_priority::ThreadPriority::Crossplatform(p),
                ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other),
            )
            .map_err(|e| format!("{e:?}"))
        });
    if let Err(e) = lower {
        tracing::warn!(error = %e, "cannot lower the policy compile thread's priority");
    }
}

/// The epoch is a clock of `TICK`s, brought up to date by whoever looks:
/// every guest call as it begins (a serving thread reads the clock and, a
/// tick or more since the last advance, advances it), and a backstop thread
/// for a guest that runs while no other begins (a policy that loops on the
/// only serving thread, or on all of them at once).
///
/// Why not a thread ticking every `TICK`: its 1,000 wake-ups a second, each
/// preempting a serving thread on a busy core, cost 3 % of the gateway's
/// throughput (README, "What a WebAssembly pick costs in place"); under
/// traffic the serving threads are awake anyway and keep the epoch current.
/// The backstop wakes every `BACKSTOP` while guests have run lately, every
/// `TICK` while it finds one running, and parks when none has run for
/// `LINGER` (an idle gateway has no wake-ups from it); the next guest call
/// wakes it.
///
/// A pick is stopped one deadline in at the earliest (its deadline counts
/// ticks from an epoch brought current as it began); while other calls
/// begin, by two deadlines; alone, within `BACKSTOP` or two deadlines,
/// whichever is longer.
struct EpochClock {
    shared: Arc<ClockShared>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct ClockShared {
    engine: Engine,
    /// What the epoch's ticks count from.
    origin: Instant,
    /// When (µs since `origin`) the epoch last advanced, on a line of its
    /// own: read by every guest call, written at most once a tick.
    advanced_at_us: Padded<AtomicU64>,
    /// Held by the thread advancing the epoch (see `catch_up`).
    advancing: std::sync::Mutex<()>,
    stop: AtomicBool,
    /// Guest calls running now, counted per thread slot on lines of their
    /// own: one counter written by every pick on both cores cost more than
    /// the pick (see README, "What a WebAssembly pick costs in place").
    active: [Padded<AtomicUsize>; SLOTS],
    /// The backstop parks (or is about to): a guest call must wake it.
    parked: AtomicBool,
}

impl ClockShared {
    fn any_running(&self) -> bool {
        self.active.iter().any(|a| a.0.load(Ordering::SeqCst) != 0)
    }

    fn now_us(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// How long ago (µs) the epoch last advanced: under traffic, a tick
    /// at most; long after the last guest call began, long.
    fn since_advance_us(&self) -> u64 {
        self.now_us()
            .saturating_sub(self.advanced_at_us.0.load(Ordering::Acquire))
    }

    /// Advances the epoch by the ticks since it last advanced, if any.
    /// `advanced_at_us` is published only once the epoch holds those
    /// ticks: a call that reads it, or waits here for the thread advancing,
    /// sets its deadline against a current epoch (publishing first let a
    /// call begun meanwhile count from a stale one, and be cut off early).
    fn catch_up(&self) {
        let tick = TICK.as_micros() as u64;
        if self.since_advance_us() < tick {
            return;
        }
        // At most once a tick; another thread due at the same moment waits
        // the few increments out.
        let _one = self.advancing.lock().unwrap_or_else(|p| p.into_inner());
        let at = self.advanced_at_us.0.load(Ordering::Acquire);
        let due = self.now_us().saturating_sub(at) / tick;
        if due == 0 {
            return; // advanced while this thread waited
        }
        // After a quiet spell no running guest waits on more ticks than the
        // longest deadline holds: those are as good as all of them.
        for _ in 0..due.min(MAX_CATCH_UP) {
            self.engine.increment_epoch();
        }
        self.advanced_at_us
            .0
            .store(at + due * tick, Ordering::Release);
    }
}

/// Ticks one catch-up advances at most: more than the longest deadline
/// (`[policy] deadline` is at most 1 s: 1,001 ticks) or an instantiation
/// (50 ms) counts.
const MAX_CATCH_UP: u64 = 2_000;

/// How often the backstop looks while guest calls come and go: it stops a
/// guest no other call's start brings the epoch past (200 wake-ups a
/// second under traffic, where ticking every `TICK` woke 1,000 times).
const BACKSTOP: Duration = Duration::from_millis(5);

/// No guest call begun for this long, and none running: the backstop parks.
const LINGER: Duration = Duration::from_millis(100);

/// Held while guest code runs (a pick, an observation, an instantiation):
/// the epoch that bounds it advances meanwhile.
pub struct Running<'a>(&'a AtomicUsize);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Release);
    }
}

impl EpochClock {
    fn start(engine: Engine) -> std::io::Result<EpochClock> {
        let shared = Arc::new(ClockShared {
            engine,
            origin: Instant::now(),
            advanced_at_us: Padded(AtomicU64::new(0)),
            advancing: std::sync::Mutex::new(()),
            stop: AtomicBool::new(false),
            active: Default::default(),
            parked: AtomicBool::new(false),
        });
        let seen = shared.clone();
        let thread = std::thread::Builder::new()
            .name("weir-policy-epoch".into())
            .spawn(move || {
                while !seen.stop.load(Ordering::Relaxed) {
                    if seen.any_running() {
                        seen.catch_up();
                        // One may be running long: look again a tick on.
                        std::thread::sleep(TICK);
                        continue;
                    }
                    // No guest runs: none needs the epoch now, and one that
                    // begins brings it current itself.
                    if seen.since_advance_us() > LINGER.as_micros() as u64 {
                        // Woken by the next guest call (or by stop). A
                        // call that began before `parked` was set has
                        // counted itself already: look once more.
                        seen.parked.store(true, Ordering::SeqCst);
                        if !seen.any_running() && !seen.stop.load(Ordering::SeqCst) {
                            std::thread::park();
                        }
                        seen.parked.store(false, Ordering::SeqCst);
                        continue;
                    }
                    std::thread::sleep(BACKSTOP);
                }
            })?;
        Ok(EpochClock {
            shared,
            thread: Some(thread),
        })
    }

    fn running(&self) -> Running<'_> {
        let mine = &self.shared.active[thread_slot() % SLOTS].0;
        mine.fetch_add(1, Ordering::SeqCst);
        // Counted before looking (and the backstop sets `parked` before it
        // looks at the counts): one of the two sees the other.
        if self.shared.parked.load(Ordering::SeqCst) {
            if let Some(t) = &self.thread {
                t.thread().unpark();
            }
        }
        // Before the caller sets its deadline: it counts from now.
        self.shared.catch_up();
        Running(mine)
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            if t.join().is_err() {
                // It only sleeps and increments: a panic there is a bug to hear of.
                tracing::error!("the policy epoch backstop thread panicked");
            }
        }
    }
}

impl Drop for EpochClock {
    fn drop(&mut self) {
        self.stop();
    }
}

/// wasmparser's messages can span lines (byte arrays printed with `{:#?}`):
/// one line reads better in a log line and the admin view.
fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The niceness of every thread of this process named like the compile
    /// thread (Linux truncates thread names to 15 bytes).
    fn compile_thread_niceness() -> Vec<i64> {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() != "weir-policy-com" {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
            // Fields after the parenthesised name; niceness is field 19 of stat.
            let after = stat.rsplit_once(") ").map(|(_, s)| s).unwrap_or("");
            if let Some(nice) = after.split(' ').nth(16).and_then(|n| n.parse().ok()) {
                found.push(nice);
            }
        }
        found
    }

    /// Context switches of this process's threads named `name` (15 bytes
    /// at most), by thread id.
    fn switches(name: &str) -> std::collections::BTreeMap<String, u64> {
        let mut found = std::collections::BTreeMap::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim() != name {
                continue;
            }
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let voluntary = status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            found.insert(task.file_name().to_string_lossy().into_owned(), voluntary);
        }
        found
    }

    /// The tests here find their engine's threads by name: one engine at a time.
    static ONE_ENGINE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A new engine, and a reading of its epoch thread's wake-ups.
    fn engine_and_its_wake_ups() -> (PolicyEngine, impl Fn() -> u64) {
        let before = switches("weir-policy-epo");
        let engine = PolicyEngine::new(Limits::default(), None).unwrap();
        // A new thread names itself once it runs: look until it has.
        let named_by = std::time::Instant::now() + Duration::from_secs(10);
        let tid = loop {
            let new = switches("weir-policy-epo")
                .into_keys()
                .find(|t| !before.contains_key(t));
            if let Some(tid) = new {
                break tid;
            }
            assert!(
                std::time::Instant::now() < named_by,
                "this engine's epoch thread"
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let count = move || {
            *switches("weir-policy-epo")
                .get(&tid)
                .expect("the epoch thread lives as long as its engine")
        };
        (engine, count)
    }

    /// With no guest running the epoch thread parks: it does not wake.
    /// Guest code running alone wakes it, and it looks every tick while
    /// that guest runs.
    #[test]
    fn the_epoch_thread_sleeps_while_no_guest_runs() {
        let _alone = ONE_ENGINE.lock().unwrap_or_else(|p| p.into_inner());
        let (engine, count) = engine_and_its_wake_ups();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let a = count();
            std::thread::sleep(Duration::from_millis(200));
            if count() == a {
                break; // no wake-up in 200 ms: parked
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the epoch thread never parked"
            );
        }
        let running = engine.running();
        let a = count();
        std::thread::sleep(Duration::from_millis(50));
        let b = count();
        drop(running);
        assert!(
            b > a + 10,
            "ticking while a guest runs: {a} -> {b} switches"
        );
    }

    /// Under traffic the guest calls' own starts keep the epoch current:
    /// with short calls coming and going, the backstop looks every 5 ms,
    /// not every tick (which was 1,000 wake-ups a second, each preempting a
    /// serving thread).
    #[test]
    fn under_traffic_the_epoch_thread_wakes_far_less_than_every_tick() {
        let _alone = ONE_ENGINE.lock().unwrap_or_else(|p| p.into_inner());
        let (engine, count) = engine_and_its_wake_ups();
        let a = count();
        let began = std::time::Instant::now();
        let mut calls = 0;
        while began.elapsed() < Duration::from_millis(500) {
            drop(engine.running());
            calls += 1;
            std::thread::sleep(Duration::from_micros(100));
        }
        let woke = count() - a;
        assert!(
            woke < 250,
            "{woke} wake-ups in 500 ms of {calls} guest calls (every tick: about 500)"
        );
    }

    #[test]
    fn components_compile_on_a_thread_of_low_priority() {
        let _alone = ONE_ENGINE.lock().unwrap_or_else(|p| p.into_inner());
        let engine = PolicyEngine::new(Limits::default(), None).unwrap();
        // An empty component compiles (and fails the world check after).
        let _ = engine.compile(b"\0asm\x0d\0\x01\0");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let found = compile_thread_niceness();
            if !found.is_empty() && found.iter().all(|n| *n == 10) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "compile threads' niceness: {found:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
