//! The accept loop every listener uses (the gRPC listener, the admin
//! listener): accept until stopped, back off when accepting fails (out of
//! file descriptors, say) instead of spinning, and track every connection
//! so a shutdown can wait for them.
//!
//! Where an accepted connection is served is the [`Runtimes`]' choice: the
//! gRPC listener spreads its connections over one single-threaded runtime
//! per core (thread-per-core: a connection, its streams and their timers
//! stay on one thread, woken by that thread's own reactor), the admin
//! listener serves on the runtime that accepts.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

thread_local! {
    /// The index of the serving runtime this thread runs (see [`Runtimes`]).
    static RUNTIME: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Which serving runtime the calling thread runs: 0 for the accepting one
/// (and any thread that is not a data thread), N for `weir-data-N`. The
/// upstream pool keeps each runtime's calls on connections that runtime
/// drives, so a call and its upstream connection share a thread.
pub fn runtime_index() -> usize {
    RUNTIME.with(|r| r.get())
}

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// An accepted connection on its way to the runtime that serves it.
pub struct Incoming(Socket);

enum Socket {
    /// Registered with the accepting runtime's reactor (served there).
    Registered(TcpStream),
    /// Handed to another runtime: registered by the task that serves it.
    Moving(std::net::TcpStream),
}

impl Incoming {
    /// The stream, registered with the reactor of the runtime that polls
    /// the caller (call it inside the connection's task).
    pub fn into_stream(self) -> std::io::Result<TcpStream> {
        match self.0 {
            Socket::Registered(stream) => Ok(stream),
            Socket::Moving(stream) => TcpStream::from_std(stream),
        }
    }
}

/// The runtimes connections are served on: the accepting one (index 0)
/// and any data threads, each connection going to the one with the fewest
/// open (ties to the lowest index), so long-lived HTTP/2 connections spread
/// evenly whatever order they arrive and close in.
#[derive(Clone)]
pub struct Runtimes {
    slots: Arc<[Slot]>,
}

struct Slot {
    /// `None` for the accepting runtime.
    handle: Option<Handle>,
    open: Arc<AtomicUsize>,
}

impl Runtimes {
    /// Only the runtime that accepts.
    pub fn here() -> Self {
        Runtimes::with_handles(Vec::new())
    }

    /// The accepting runtime and `extra` threads named `weir-data-N`, each
    /// running a single-threaded runtime until `stop`; a thread's tasks end
    /// with it.
    pub fn start(extra: usize, stop: &CancellationToken) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(extra);
        for n in 1..=extra {
            let started = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .and_then(|runtime| {
                    let handle = runtime.handle().clone();
                    let stop = stop.clone();
                    std::thread::Builder::new()
                        .name(format!("weir-data-{n}"))
                        .spawn(move || {
                            RUNTIME.with(|r| r.set(n));
                            runtime.block_on(stop.cancelled())
                        })
                        .map(|_| handle)
                });
            match started {
                Ok(handle) => handles.push(handle),
                Err(err) => {
                    stop.cancel(); // the threads already started end
                    return Err(err);
                }
            }
        }
        Ok(Runtimes::with_handles(handles))
    }

    fn with_handles(handles: Vec<Handle>) -> Self {
        let here = Slot {
            handle: None,
            open: Arc::default(),
        };
        let others = handles.into_iter().map(|h| Slot {
            handle: Some(h),
            open: Arc::default(),
        });
        Runtimes {
            slots: std::iter::once(here).chain(others).collect(),
        }
    }

    /// How many runtimes serve connections.
    pub fn count(&self) -> usize {
        self.slots.len()
    }

    fn least_loaded(&self) -> &Slot {
        self.slots
            .iter()
            .min_by_key(|s| s.open.load(Ordering::Relaxed))
            .expect("the accepting runtime is always a slot")
    }
}

/// Accepts connections on `listener` until `stop`, serving each with
/// `serve` as a task of `connections` on one of `runtimes`. `name` names
/// the listener in logs.
pub async fn accept_loop<S, F>(
    name: &'static str,
    listener: TcpListener,
    runtimes: Runtimes,
    connections: TaskTracker,
    stop: CancellationToken,
    mut serve: S,
) where
    S: FnMut(Incoming, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut backoff = BACKOFF_MIN;
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(listener = name, cause = %err, retry_in = ?backoff, "accept failed; backing off");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        backoff = BACKOFF_MIN;
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(listener = name, %peer, cause = %err, "cannot set TCP_NODELAY");
        }
        let slot = runtimes.least_loaded();
        let incoming = match &slot.handle {
            None => Incoming(Socket::Registered(stream)),
            Some(_) => match stream.into_std() {
                Ok(moving) => Incoming(Socket::Moving(moving)),
                Err(err) => {
                    tracing::debug!(listener = name, %peer, cause = %err, "cannot hand a connection over");
                    continue;
                }
            },
        };
        let open = OpenConnection::new(slot.open.clone());
        let task = connections.track_future(serve(incoming, peer));
        let task = async move {
            let _open = open; // given back however the task ends
            task.await;
        };
        match &slot.handle {
            None => drop(tokio::spawn(task)),
            Some(handle) => drop(handle.spawn(task)),
        }
    }
}

/// One connection counted on its runtime's slot until dropped.
struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    fn new(open: Arc<AtomicUsize>) -> Self {
        open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(open)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
