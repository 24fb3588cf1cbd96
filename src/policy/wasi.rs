//! WASI 0.2 for policies, with no capabilities.
//!
//! A guest's language runtime imports WASI (Rust's std some of it, a Python
//! interpreter from componentize-py all of it) and calls some of it on its
//! own: the environment at start, stdout for `print`, the clocks, random
//! seeds. Each of those is answered here as a sandbox with nothing in it:
//!
//! - no environment, no arguments, no working directory;
//! - no preopened directory (opening a file fails in the guest's libc);
//! - sockets: creating one and resolving a name are refused (`access-denied`);
//! - stdin is closed; stdout and stderr go to the gateway's log, a line at a
//!   time (info and warn), naming the policy;
//! - clocks read the host's; random numbers come from the gateway's generator;
//! - nothing may wait: a `poll` or `block` on a pollable that is not ready
//!   traps (a pick never blocks its thread; the pick then falls back).
//!
//! Everything else WASI (file and socket methods, which need a handle no
//! policy can get; other WASI versions) is linked to a function that traps.
//! Written here rather than taken from wasmtime-wasi: its synchronous
//! bindings wait by entering a tokio runtime (`Handle::block_on`), which
//! panics on the runtime threads picks run on, and it needs wasmtime's
//! `async` feature.

use std::time::{Instant, SystemTime};

use wasmtime::component::types::ComponentItem;
use wasmtime::component::{
    ComponentType, Linker, LinkerInstance, Lower, Resource, ResourceType, Val, WasmList,
};
use wasmtime::{Engine, StoreContextMut};

use super::host::HostState;

/// Longest byte string a policy may ask for at once: more would let a guest
/// make the host allocate without bound (guest memory has its own limit).
const MAX_RANDOM_BYTES: u64 = 64 * 1024;

/// A line of stdout or stderr longer than this is logged in pieces.
const MAX_LINE: usize = 1024;

/// Clock pollables one instance may hold at once.
const MAX_TIMERS: usize = 64;

/// How much a policy may write to stdout or stderr before asking again.
const WRITE_PERMIT: u64 = 4096;

/// Lines one instance may log a second (stdout and stderr together); more
/// are dropped, and counted in the next line logged.
const LINES_PER_SECOND: u32 = 100;

/// Per-instance WASI state: partial output lines and clock pollables.
#[derive(Default)]
pub struct WasiState {
    /// Bytes written to stdout (0) and stderr (1) since their last newline.
    lines: [Vec<u8>; 2],
    /// Deadlines of clock pollables (monotonic nanoseconds), by slot.
    timers: Vec<Option<u64>>,
    /// The second (of the monotonic clock) lines are being counted in, how
    /// many were logged in it, and how many dropped since the last logged.
    second: u64,
    logged: u32,
    dropped: u64,
}

// Host types of the WASI resources weir hands out or names. A resource a
// guest sees in several interfaces (`pollable` in io/poll, io/streams and
// the clocks) must be the same host type everywhere it is linked, so the
// type follows the resource's name (`resource_type`).
struct Pollable;
struct IoError;
struct InputStream;
struct OutputStream;
struct Network;
struct Descriptor;
struct TerminalInput;
struct TerminalOutput;

/// wasi:io/streams `stream-error`.
#[derive(ComponentType, Lower)]
#[component(variant)]
enum StreamError {
    #[component(name = "last-operation-failed")]
    #[allow(dead_code)] // weir's streams fail only by being closed
    LastOperationFailed(Resource<IoError>),
    #[component(name = "closed")]
    Closed,
}

/// wasi:clocks/wall-clock `datetime`.
#[derive(ComponentType, Lower)]
#[component(record)]
struct Datetime {
    seconds: u64,
    nanoseconds: u32,
}

/// Stdout and stderr: resource reps of `output-stream`.
const STDOUT: u32 = 1;
const STDERR: u32 = 2;

/// The pollable that is always ready (streams never make a policy wait).
const READY: u32 = 0;

/// The host type given to each resource of a component's imports, by the
/// component's own type: an interface that uses another's resource under
/// another name (`use wasi:io/error.{error as io-error}`) gets the same host
/// type as the interface that defines it.
#[derive(Default)]
pub struct ResourceTypes(Vec<(ResourceType, ResourceType)>);

impl ResourceTypes {
    /// The host type for `resource` (the component's view), named `name`
    /// where it is first seen (its defining interface: imports come in
    /// dependency order).
    fn host_type(&mut self, resource: ResourceType, name: &str) -> ResourceType {
        if let Some((_, host)) = self.0.iter().find(|(seen, _)| *seen == resource) {
            return *host;
        }
        let host = resource_type(name);
        self.0.push((resource, host));
        host
    }
}

/// Links WASI import `name` (a whole interface, such as
/// `wasi:cli/environment@0.2.9`) into `linker`: what a sandbox without
/// capabilities answers, and traps for the rest. `types`: the resources
/// met so far in this component's imports.
pub fn define(
    linker: &mut Linker<HostState>,
    engine: &Engine,
    name: &str,
    item: ComponentItem,
    types: &mut ResourceTypes,
) -> wasmtime::Result<()> {
    let ComponentItem::ComponentInstance(instance) = item else {
        return Ok(()); // a WASI import is an interface; anything else fails to link
    };
    let (interface, version) = name.split_once('@').unwrap_or((name, ""));
    let p2 = version.starts_with("0.2.");
    let mut linked = linker.instance(name)?;
    for (export, ty) in instance.exports(engine) {
        match ty.ty {
            ComponentItem::Resource(resource) => {
                let host = types.host_type(resource, export);
                linked.resource(export, host, drop_resource(host))?;
            }
            ComponentItem::ComponentFunc(_)
                if !(p2 && provide(&mut linked, interface, export)?) =>
            {
                let called = format!("{name}#{export}");
                linked.func_new(export, move |_, _, _, _| {
                    wasmtime::bail!("unknown import: `{called}` has not been defined")
                })?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn resource_type(name: &str) -> ResourceType {
    match name {
        "pollable" => ResourceType::host::<Pollable>(),
        "error" => ResourceType::host::<IoError>(),
        "input-stream" => ResourceType::host::<InputStream>(),
        "output-stream" => ResourceType::host::<OutputStream>(),
        "network" => ResourceType::host::<Network>(),
        "descriptor" => ResourceType::host::<Descriptor>(),
        "terminal-input" => ResourceType::host::<TerminalInput>(),
        "terminal-output" => ResourceType::host::<TerminalOutput>(),
        // Resources no policy can get a handle to (sockets, directory streams).
        _ => ResourceType::host::<()>(),
    }
}

type Dtor = Box<dyn Fn(StoreContextMut<'_, HostState>, u32) -> wasmtime::Result<()> + Send + Sync>;

fn drop_resource(host: ResourceType) -> Dtor {
    if host == ResourceType::host::<Pollable>() {
        return Box::new(|mut store, rep| {
            if rep != READY {
                if let Some(slot) = store.data_mut().wasi.timers.get_mut(rep as usize - 1) {
                    *slot = None;
                }
            }
            Ok(())
        });
    }
    Box::new(|_, _| Ok(()))
}

/// Defines function `export` of `interface` if this sandbox answers it;
/// says whether it did.
fn provide(
    linked: &mut LinkerInstance<'_, HostState>,
    interface: &str,
    export: &str,
) -> wasmtime::Result<bool> {
    type Store<'a> = StoreContextMut<'a, HostState>;
    match (interface, export) {
        // wasi:cli: nothing to read, stdout and stderr to the log.
        ("wasi:cli/environment", "get-environment") => {
            linked.func_wrap(export, |_, (): ()| Ok((Vec::<(String, String)>::new(),)))?
        }
        ("wasi:cli/environment", "get-arguments") => {
            linked.func_wrap(export, |_, (): ()| Ok((Vec::<String>::new(),)))?
        }
        ("wasi:cli/environment", "initial-cwd") => {
            linked.func_wrap(export, |_, (): ()| Ok((None::<String>,)))?
        }
        ("wasi:cli/stdin", "get-stdin") => linked.func_wrap(export, |_, (): ()| {
            Ok((Resource::<InputStream>::new_own(0),))
        })?,
        ("wasi:cli/stdout", "get-stdout") => linked.func_wrap(export, |_, (): ()| {
            Ok((Resource::<OutputStream>::new_own(STDOUT),))
        })?,
        ("wasi:cli/stderr", "get-stderr") => linked.func_wrap(export, |_, (): ()| {
            Ok((Resource::<OutputStream>::new_own(STDERR),))
        })?,
        ("wasi:cli/terminal-stdin", "get-terminal-stdin") => {
            linked.func_wrap(export, |_, (): ()| Ok((None::<Resource<TerminalInput>>,)))?
        }
        ("wasi:cli/terminal-stdout" | "wasi:cli/terminal-stderr", _) => {
            linked.func_wrap(export, |_, (): ()| Ok((None::<Resource<TerminalOutput>>,)))?
        }

        // wasi:io/streams: stdin is closed; writes are logged by line.
        ("wasi:io/streams", "[method]input-stream.read" | "[method]input-stream.blocking-read") => {
            linked.func_wrap(export, |_, (_, _): (Resource<InputStream>, u64)| {
                Ok((Err::<Vec<u8>, _>(StreamError::Closed),))
            })?
        }
        ("wasi:io/streams", "[method]input-stream.skip" | "[method]input-stream.blocking-skip") => {
            linked.func_wrap(export, |_, (_, _): (Resource<InputStream>, u64)| {
                Ok((Err::<u64, _>(StreamError::Closed),))
            })?
        }
        ("wasi:io/streams", "[method]input-stream.subscribe") => linked
            .func_wrap(export, |_, (_,): (Resource<InputStream>,)| {
                Ok((Resource::<Pollable>::new_own(READY),))
            })?,
        ("wasi:io/streams", "[method]output-stream.check-write") => linked
            .func_wrap(export, |_, (_,): (Resource<OutputStream>,)| {
                Ok((Ok::<u64, StreamError>(WRITE_PERMIT),))
            })?,
        (
            "wasi:io/streams",
            "[method]output-stream.write" | "[method]output-stream.blocking-write-and-flush",
        ) => linked.func_wrap(
            export,
            |mut store: Store<'_>, (stream, bytes): (Resource<OutputStream>, WasmList<u8>)| {
                // Checked before a byte is copied; over the permit is a
                // trap, as WASI says.
                if bytes.len() as u64 > WRITE_PERMIT {
                    wasmtime::bail!(
                        "wrote {} bytes to stdout/stderr at once (at most {WRITE_PERMIT})",
                        bytes.len()
                    );
                }
                let copied = bytes.as_le_slice(&store).to_vec();
                store.data_mut().write_output(stream.rep(), &copied);
                Ok((Ok::<(), StreamError>(()),))
            },
        )?,
        (
            "wasi:io/streams",
            "[method]output-stream.flush" | "[method]output-stream.blocking-flush",
        ) => linked.func_wrap(export, |_, (_,): (Resource<OutputStream>,)| {
            Ok((Ok::<(), StreamError>(()),))
        })?,
        (
            "wasi:io/streams",
            "[method]output-stream.write-zeroes"
            | "[method]output-stream.blocking-write-zeroes-and-flush",
        ) => linked.func_wrap(export, |_, (_, _): (Resource<OutputStream>, u64)| {
            Ok((Ok::<(), StreamError>(()),))
        })?,
        (
            "wasi:io/streams",
            "[method]output-stream.splice" | "[method]output-stream.blocking-splice",
        ) => linked.func_wrap(
            export,
            |_, (_, _, _): (Resource<OutputStream>, Resource<InputStream>, u64)| {
                Ok((Err::<u64, _>(StreamError::Closed),))
            },
        )?,
        ("wasi:io/streams", "[method]output-stream.subscribe") => linked
            .func_wrap(export, |_, (_,): (Resource<OutputStream>,)| {
                Ok((Resource::<Pollable>::new_own(READY),))
            })?,

        // wasi:io/poll: answered from the clock; waiting is not allowed.
        ("wasi:io/poll", "[method]pollable.ready") => linked
            .func_wrap(export, |store: Store<'_>, (p,): (Resource<Pollable>,)| {
                Ok((store.data().ready(p.rep()),))
            })?,
        ("wasi:io/poll", "[method]pollable.block") => {
            linked.func_wrap(export, |store: Store<'_>, (p,): (Resource<Pollable>,)| {
                if !store.data().ready(p.rep()) {
                    wasmtime::bail!("a policy may not wait (pollable.block on a timer)");
                }
                Ok(())
            })?
        }
        ("wasi:io/poll", "poll") => linked.func_wrap(
            export,
            |store: Store<'_>, (pollables,): (Vec<Resource<Pollable>>,)| {
                let ready: Vec<u32> = (0..pollables.len() as u32)
                    .filter(|&i| store.data().ready(pollables[i as usize].rep()))
                    .collect();
                if ready.is_empty() && !pollables.is_empty() {
                    wasmtime::bail!("a policy may not wait (poll with nothing ready)");
                }
                Ok((ready,))
            },
        )?,

        // wasi:clocks: the host's.
        ("wasi:clocks/monotonic-clock", "now") => {
            linked.func_wrap(export, |_, (): ()| Ok((monotonic_ns(),)))?
        }
        ("wasi:clocks/monotonic-clock", "resolution") => {
            linked.func_wrap(export, |_, (): ()| Ok((1u64,)))?
        }
        ("wasi:clocks/monotonic-clock", "subscribe-instant") => linked
            .func_wrap(export, |mut store: Store<'_>, (when,): (u64,)| {
                Ok((store.data_mut().timer(when)?,))
            })?,
        ("wasi:clocks/monotonic-clock", "subscribe-duration") => {
            linked.func_wrap(export, |mut store: Store<'_>, (after,): (u64,)| {
                Ok((store
                    .data_mut()
                    .timer(monotonic_ns().saturating_add(after))?,))
            })?
        }
        ("wasi:clocks/wall-clock", "now") => linked.func_wrap(export, |_, (): ()| {
            let since = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default();
            Ok((Datetime {
                seconds: since.as_secs(),
                nanoseconds: since.subsec_nanos(),
            },))
        })?,
        ("wasi:clocks/wall-clock", "resolution") => linked.func_wrap(export, |_, (): ()| {
            Ok((Datetime {
                seconds: 0,
                nanoseconds: 1,
            },))
        })?,

        // wasi:filesystem: no directory at all.
        ("wasi:filesystem/preopens", "get-directories") => linked
            .func_wrap(export, |_, (): ()| {
                Ok((Vec::<(Resource<Descriptor>, String)>::new(),))
            })?,

        // wasi:sockets: a network handle that grants nothing.
        ("wasi:sockets/instance-network", "instance-network") => {
            linked.func_wrap(export, |_, (): ()| Ok((Resource::<Network>::new_own(0),)))?
        }
        ("wasi:sockets/tcp-create-socket", "create-tcp-socket")
        | ("wasi:sockets/udp-create-socket", "create-udp-socket")
        | ("wasi:sockets/ip-name-lookup", "resolve-addresses") => {
            linked.func_new(export, |_, _, _, results: &mut [Val]| {
                results[0] = Val::Result(Err(Some(Box::new(Val::Enum("access-denied".into())))));
                Ok(())
            })?
        }

        // wasi:random: the gateway's generator.
        ("wasi:random/insecure-seed", "insecure-seed") => linked
            .func_wrap(export, |_, (): ()| {
                Ok(((rand::random::<u64>(), rand::random::<u64>()),))
            })?,
        ("wasi:random/random", "get-random-u64")
        | ("wasi:random/insecure", "get-insecure-random-u64") => {
            linked.func_wrap(export, |_, (): ()| Ok((rand::random::<u64>(),)))?
        }
        ("wasi:random/random", "get-random-bytes")
        | ("wasi:random/insecure", "get-insecure-random-bytes") => {
            linked.func_wrap(export, |_, (len,): (u64,)| {
                if len > MAX_RANDOM_BYTES {
                    wasmtime::bail!(
                        "asked for {len} random bytes (at most {MAX_RANDOM_BYTES} at once)"
                    );
                }
                let mut bytes = vec![0u8; len as usize];
                rand::fill(&mut bytes[..]);
                Ok((bytes,))
            })?
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Nanoseconds on the gateway's monotonic clock (the one `env.now-ms` reads).
pub fn monotonic_ns() -> u64 {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    ORIGIN.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

impl HostState {
    /// Appends to stdout or stderr and logs every line completed.
    fn write_output(&mut self, stream: u32, bytes: &[u8]) {
        let which = usize::from(stream == STDERR);
        let buffer = &mut self.wasi.lines[which];
        buffer.extend_from_slice(bytes);
        let mut complete = Vec::new();
        while let Some(end) = buffer
            .iter()
            .position(|&b| b == b'\n')
            .or((buffer.len() >= MAX_LINE).then_some(MAX_LINE))
        {
            let end = end.min(MAX_LINE);
            let line: Vec<u8> = buffer.drain(..end).collect();
            if buffer.first() == Some(&b'\n') {
                buffer.remove(0);
            }
            complete.push(line);
        }
        for line in complete {
            self.log_line(which, &line);
        }
    }

    /// Logs one line of stdout (0) or stderr (1), within the rate limit.
    fn log_line(&mut self, which: usize, line: &[u8]) {
        let second = monotonic_ns() / 1_000_000_000;
        let wasi = &mut self.wasi;
        if wasi.second != second {
            (wasi.second, wasi.logged) = (second, 0);
        }
        if wasi.logged >= LINES_PER_SECOND {
            wasi.dropped += 1;
            return;
        }
        wasi.logged += 1;
        let dropped = std::mem::take(&mut wasi.dropped);
        let line = String::from_utf8_lossy(line);
        let line = line.trim_end();
        if which == 0 {
            tracing::info!(policy = %self.policy, stream = "stdout", dropped, "{line}");
        } else {
            tracing::warn!(policy = %self.policy, stream = "stderr", dropped, "{line}");
        }
    }

    /// A pollable ready at `deadline` (monotonic nanoseconds).
    fn timer(&mut self, deadline: u64) -> wasmtime::Result<Resource<Pollable>> {
        let timers = &mut self.wasi.timers;
        let slot = match timers.iter().position(Option::is_none) {
            Some(free) => free,
            None if timers.len() < MAX_TIMERS => {
                timers.push(None);
                timers.len() - 1
            }
            None => wasmtime::bail!("a policy may hold at most {MAX_TIMERS} clock pollables"),
        };
        timers[slot] = Some(deadline);
        Ok(Resource::new_own(slot as u32 + 1))
    }

    fn ready(&self, pollable: u32) -> bool {
        if pollable == READY {
            return true;
        }
        let deadline = self
            .wasi
            .timers
            .get(pollable as usize - 1)
            .copied()
            .flatten();
        deadline.is_none_or(|d| monotonic_ns() >= d)
    }
}
