//! HTTP/2 connections to one backend, shared by every call to it and by its
//! health checks: the one dialer of the gateway.
//!
//! The pool knows each connection's open streams and the backend's own
//! limit (`SETTINGS_MAX_CONCURRENT_STREAMS`, read from the connection as it
//! runs). A call takes a stream on the least busy connection that has room;
//! when every connection is full it opens another, up to
//! `max_connections`; beyond that it waits in a bounded queue for at most
//! `queue_timeout`, then gives up as *not reached*, so the call can go to
//! another backend. Nothing ever waits without bound inside h2.
//!
//! HTTP/2 conduct toward backends (gRPC servers are strict about pings):
//! no keep-alive ping while no stream is open; the interval defaults to
//! what grpc-go, grpc-java and C-core servers accept without complaint; a
//! backend that answers pings with GOAWAY `ENHANCE_YOUR_CALM`
//! (`too_many_pings`) gets twice the interval from then on, as grpc-go's
//! client does. A connection that received a GOAWAY takes no new stream.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::either::Either;

use super::exchange::Sender;
use crate::errors::chain as error_chain;

#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Connections opened before a full one forces another; calls are
    /// spread over them.
    pub connections: usize,
    /// At most this many connections to one backend.
    pub max_connections: usize,
    /// Streams one connection carries at most, whatever the backend allows.
    pub max_streams_per_connection: u32,
    /// Requests one connection carries in its life; then it takes no new
    /// one, finishes those it has and closes, and another opens. At most
    /// [`STREAM_IDS`].
    pub max_requests_per_connection: u64,
    /// Calls that may wait for a stream at once (beyond: not reached at once).
    pub max_queued: usize,
    /// How long a call waits for a stream before it is not reached.
    pub queue_timeout: Duration,
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval while streams are open; `None`: no pings.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            connections: 1,
            max_connections: 32,
            max_streams_per_connection: 1000,
            max_requests_per_connection: STREAM_IDS,
            max_queued: 1000,
            queue_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Some(Duration::from_secs(300)),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: Arc<str>, after: Duration },
    #[error("connect to {addr} failed: {cause}")]
    Io { addr: Arc<str>, cause: String },
    #[error("HTTP/2 handshake with {addr} failed: {cause}")]
    Handshake { addr: Arc<str>, cause: String },
    #[error("TLS with {addr} failed: {cause}")]
    Tls { addr: Arc<str>, cause: String },
}

/// Why no stream could be had.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("{addr} is at capacity: no stream free within {waited:?} ({streams} streams open on {connections} connections)")]
    QueueTimeout {
        addr: Arc<str>,
        waited: Duration,
        streams: u32,
        connections: usize,
    },
    #[error("{addr} is at capacity and {queued} calls already wait for it")]
    QueueFull { addr: Arc<str>, queued: usize },
}

/// Streams a client can open on one HTTP/2 connection: its stream ids are
/// the odd numbers below 2^31 (RFC 9113 §5.1.1). h2 refuses the next one
/// without closing the connection, so the pool retires a connection first.
pub const STREAM_IDS: u64 = 1 << 30;

/// Per-stream receive window toward backends (Envoy's edge guidance).
const STREAM_WINDOW: u32 = 64 << 10;
/// HTTP/2's largest window.
const MAX_WINDOW: u32 = (1 << 31) - 1;

/// One HTTP/2 connection and what the pool knows of it.
struct Conn {
    sender: Sender,
    /// Streams the pool handed out on it and that have not ended (shared
    /// with its keep-alive, which pings only while some are open).
    streams: Arc<AtomicU32>,
    /// The backend's `SETTINGS_MAX_CONCURRENT_STREAMS` as last seen.
    peer_max: Arc<AtomicUsize>,
    /// A GOAWAY arrived: the calls on it finish, no new one starts.
    going_away: Arc<AtomicBool>,
    /// The connection ended.
    closed: Arc<AtomicBool>,
    /// Streams opened on it so far (changed under the pool's lock).
    opened: AtomicU64,
    /// It carried `max_requests_per_connection`: no new stream starts.
    retired: AtomicBool,
    /// The serving runtime whose thread drives it (`listener::runtime_index`).
    home: usize,
}

impl Conn {
    fn usable(&self) -> bool {
        !self.going_away.load(Ordering::Relaxed)
            && !self.closed.load(Ordering::Relaxed)
            && !self.retired.load(Ordering::Relaxed)
    }

    fn limit(&self, cap: u32) -> u32 {
        let peer = self.peer_max.load(Ordering::Relaxed);
        cap.min(u32::try_from(peer).unwrap_or(u32::MAX))
    }
}

struct Conns {
    open: Vec<Arc<Conn>>,
    /// Connects in progress; as many as the calls waiting need.
    connecting: usize,
    /// How the last connect failed, with a count of failures so far, so a
    /// waiter can tell a failure that happened while it waited.
    last_failure: Option<(u64, ConnectError)>,
    failures: u64,
}

/// Counters of one pool, for `/services` and the metrics.
#[derive(Debug, Default)]
struct Stats {
    queued: AtomicUsize,
    queue_timeouts: AtomicU64,
    ping_backoffs: AtomicU64,
    goaways: AtomicU64,
    tls_failures: AtomicU64,
}

pub struct Pool {
    addr: Arc<str>,
    config: PoolConfig,
    /// TLS to this backend (`[upstream.tls]`, the route's `upstream_tls`).
    tls: Option<Arc<crate::tls::ClientTls>>,
    conns: Mutex<Conns>,
    /// Wakes callers waiting for a stream or a connection.
    freed: Notify,
    /// The keep-alive interval for new connections, in milliseconds (0: none).
    keepalive_ms: AtomicU64,
    stats: Stats,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish()
    }
}

/// A stream on one of the pool's connections: send one request with it. The
/// stream counts as open until this is dropped (with the response).
pub struct Stream {
    pub sender: Sender,
    permit: StreamPermit,
}

impl Stream {
    /// Marks the connection as going away after a request on it met the
    /// backend's GOAWAY: later calls use another connection.
    pub fn connection_going_away(&self) {
        self.permit.conn.going_away.store(true, Ordering::Relaxed);
    }

    /// The backend sent a GOAWAY on this stream's connection.
    pub fn is_going_away(&self) -> bool {
        self.permit.conn.going_away.load(Ordering::Relaxed)
    }

    /// The part that must live as long as the response.
    pub fn into_permit(self) -> StreamPermit {
        self.permit
    }
}

/// Holds one stream of a connection open in the pool's books.
pub struct StreamPermit {
    conn: Arc<Conn>,
    pool: Arc<Pool>,
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::Relaxed);
        self.pool.freed.notify_one();
    }
}

/// What `/services` shows of a pool.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct PoolView {
    pub connections: usize,
    pub streams: u32,
    /// The smallest stream limit among open connections (theirs or ours).
    pub stream_limit: Option<u32>,
    pub queued: usize,
    pub queue_timeouts: u64,
    pub goaways: u64,
    pub ping_backoffs: u64,
    pub keepalive_interval_ms: u64,
    /// Connections whose TLS handshake failed (a certificate that does
    /// not verify, a refused client certificate).
    pub tls_failures: u64,
}

impl Pool {
    pub fn new(
        addr: Arc<str>,
        config: PoolConfig,
        tls: Option<Arc<crate::tls::ClientTls>>,
    ) -> Self {
        let keepalive_ms = config
            .keepalive_interval
            .map_or(0, |d| d.as_millis() as u64);
        Pool {
            addr,
            config,
            tls,
            conns: Mutex::new(Conns {
                open: Vec::new(),
                connecting: 0,
                last_failure: None,
                failures: 0,
            }),
            freed: Notify::new(),
            keepalive_ms: AtomicU64::new(keepalive_ms),
            stats: Stats::default(),
        }
    }

    /// A stream on an open connection: the least busy one with room, a new
    /// connection when all are full, or a bounded wait for one to free.
    pub async fn stream(self: &Arc<Self>) -> Result<Stream, PoolError> {
        // Most calls find room at once: no clock read, no queue.
        let failures_before = match self.take_or_connect(1) {
            Taken::Stream(stream) => return Ok(stream),
            Taken::Failed(err) => return Err(err.into()),
            Taken::Wait { failures } => failures,
        };
        let began = Instant::now();
        let mut deadline = began + self.config.queue_timeout;
        let mut queued: Option<QueueSlot<'_>> = None;
        loop {
            // Register interest before looking, so a release in between is not missed.
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let waiting = self.stats.queued.load(Ordering::Relaxed) + usize::from(queued.is_none());
            match self.take_or_connect(waiting) {
                Taken::Stream(stream) => return Ok(stream),
                Taken::Failed(err) => return Err(err.into()),
                Taken::Wait { .. } => {}
            }
            if queued.is_none() {
                queued = Some(self.enqueue()?);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {
                    // Waiting on the first connection, not on a full one:
                    // that connect has its own bound.
                    let connect_bound = began + self.config.connect_timeout * 2;
                    if self.only_connecting() && Instant::now() < connect_bound {
                        deadline = connect_bound;
                        continue;
                    }
                    return Err(self.queue_timeout());
                }
                _ = freed => {}
            }
            // A connect that failed while nothing is open fails the waiters
            // at once: there is nothing to wait for.
            let conns = self.conns.lock().expect("pool poisoned");
            if conns.open.is_empty() && conns.connecting == 0 && conns.failures > failures_before {
                if let Some((_, err)) = &conns.last_failure {
                    return Err(err.clone().into());
                }
            }
        }
    }

    /// Takes a stream if a connection has room; else starts connects, as
    /// many as the `waiting` calls need (and the cap allows).
    fn take_or_connect(self: &Arc<Self>, waiting: usize) -> Taken {
        let mut conns = self.conns.lock().expect("pool poisoned");
        conns.open.retain(|c| c.usable());
        let cap = self.config.max_streams_per_connection;
        let here = crate::listener::runtime_index();
        let roomiest = |home_only: bool| {
            conns
                .open
                .iter()
                .filter(|c| !home_only || c.home == here)
                .filter(|c| c.streams.load(Ordering::Relaxed) < c.limit(cap))
                .min_by_key(|c| c.streams.load(Ordering::Relaxed))
                .cloned()
        };
        // A connection this thread drives first: a call and its upstream
        // connection on one thread wake each other without crossing threads.
        let roomiest = roomiest(true).or_else(|| roomiest(false));
        let max = self.config.max_connections.max(1);
        if let Some(conn) = roomiest {
            // Spread over the first `connections` before packing them, and
            // give every serving thread its own: open the next one in the
            // background; this call need not wait.
            let busy = conn.streams.load(Ordering::Relaxed) > 0;
            let away = conn.home != here;
            let spread = busy && conns.open.len() < self.config.connections.min(max);
            let opened = conn.opened.fetch_add(1, Ordering::Relaxed) + 1;
            let lifetime = self.config.max_requests_per_connection.clamp(1, STREAM_IDS);
            let retiring = opened >= lifetime;
            if retiring {
                // Its last stream: the next call opens another connection.
                conn.retired.store(true, Ordering::Relaxed);
            }
            if (spread || away || retiring) && conns.connecting == 0 && conns.open.len() < max {
                conns.connecting += 1;
                tokio::spawn(connect_into(self.clone()));
            }
            conn.streams.fetch_add(1, Ordering::Relaxed);
            return Taken::Stream(Stream {
                sender: conn.sender.clone(),
                permit: StreamPermit {
                    conn: conn.clone(),
                    pool: self.clone(),
                },
            });
        }
        // Every connection is full: connects for the waiting calls, each
        // new connection good for about as many streams as the others.
        let per_connection = conns
            .open
            .iter()
            .map(|c| c.limit(cap) as usize)
            .min()
            .unwrap_or(cap as usize)
            .max(1);
        let wanted = waiting.div_ceil(per_connection);
        while conns.connecting < wanted && conns.open.len() + conns.connecting < max {
            conns.connecting += 1;
            tokio::spawn(connect_into(self.clone()));
        }
        if conns.open.is_empty() && conns.connecting == 0 {
            if let Some((_, err)) = &conns.last_failure {
                return Taken::Failed(err.clone());
            }
        }
        Taken::Wait {
            failures: conns.failures,
        }
    }

    fn enqueue(&self) -> Result<QueueSlot<'_>, PoolError> {
        let queued = self.stats.queued.fetch_add(1, Ordering::Relaxed);
        let slot = QueueSlot(&self.stats.queued);
        if queued >= self.config.max_queued {
            return Err(PoolError::QueueFull {
                addr: self.addr.clone(),
                queued,
            });
        }
        Ok(slot)
    }

    fn queue_timeout(&self) -> PoolError {
        self.stats.queue_timeouts.fetch_add(1, Ordering::Relaxed);
        let view = self.view();
        PoolError::QueueTimeout {
            addr: self.addr.clone(),
            waited: self.config.queue_timeout,
            streams: view.streams,
            connections: view.connections,
        }
    }

    /// Nothing is open and a connect is under way.
    fn only_connecting(&self) -> bool {
        let conns = self.conns.lock().expect("pool poisoned");
        conns.open.is_empty() && conns.connecting > 0
    }

    fn open_count(&self) -> usize {
        let conns = self.conns.lock().expect("pool poisoned");
        conns.open.iter().filter(|c| c.usable()).count()
    }

    /// True when some connection is open and takes new streams.
    pub fn is_connected(&self) -> bool {
        self.open_count() > 0
    }

    pub fn view(&self) -> PoolView {
        let conns = self.conns.lock().expect("pool poisoned");
        let open: Vec<&Arc<Conn>> = conns.open.iter().filter(|c| c.usable()).collect();
        PoolView {
            connections: open.len(),
            streams: open.iter().map(|c| c.streams.load(Ordering::Relaxed)).sum(),
            stream_limit: open
                .iter()
                .map(|c| c.limit(self.config.max_streams_per_connection))
                .min(),
            queued: self.stats.queued.load(Ordering::Relaxed),
            queue_timeouts: self.stats.queue_timeouts.load(Ordering::Relaxed),
            goaways: self.stats.goaways.load(Ordering::Relaxed),
            ping_backoffs: self.stats.ping_backoffs.load(Ordering::Relaxed),
            keepalive_interval_ms: self.keepalive_ms.load(Ordering::Relaxed),
            tls_failures: self.stats.tls_failures.load(Ordering::Relaxed),
        }
    }

    /// Whether calls reach this backend over TLS.
    pub fn uses_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Why the last connection attempt failed, while no connection since
    /// has succeeded.
    pub fn last_connect_error(&self) -> Option<String> {
        let conns = self.conns.lock().expect("pool poisoned");
        conns.last_failure.as_ref().map(|(_, e)| e.to_string())
    }

    /// The connection ended: a backend that found our pings too frequent
    /// gets them half as often from now on.
    fn connection_ended(&self, outcome: Result<(), Ended>) {
        self.freed.notify_waiters();
        let Err(err) = outcome else { return };
        let Ended::H2(h2) = &err else {
            tracing::info!(backend = %self.addr, cause = %err, "upstream connection ended");
            return;
        };
        if h2.is_go_away() && h2.is_remote() {
            self.stats.goaways.fetch_add(1, Ordering::Relaxed);
        }
        if h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) && h2.is_remote() {
            let before = self.keepalive_ms.load(Ordering::Relaxed);
            if before > 0 {
                let after = before.saturating_mul(2);
                self.keepalive_ms.store(after, Ordering::Relaxed);
                self.stats.ping_backoffs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    backend = %self.addr,
                    cause = %error_chain(&err),
                    before_ms = before,
                    after_ms = after,
                    "backend sent GOAWAY ENHANCE_YOUR_CALM: keep-alive pings to it now half as often"
                );
                return;
            }
        }
        tracing::info!(backend = %self.addr, cause = %error_chain(&err), "upstream connection ended");
    }
}

enum Taken {
    Stream(Stream),
    /// Nothing open, nothing connecting, and the last connect failed.
    Failed(ConnectError),
    /// No room; `failures`: connects failed so far.
    Wait {
        failures: u64,
    },
}

/// A place in the pool's queue, given back on drop.
struct QueueSlot<'a>(&'a AtomicUsize);

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Opens one connection for `pool` and adds it, telling every waiter.
async fn connect_into(pool: Arc<Pool>) {
    let outcome = connect(&pool).await;
    {
        let mut conns = pool.conns.lock().expect("pool poisoned");
        conns.connecting -= 1;
        match outcome {
            Ok(conn) => {
                conns.open.push(conn);
                conns.last_failure = None;
            }
            Err(err) => {
                if let ConnectError::Tls { .. } = err {
                    // A certificate problem does not mend itself: say it.
                    pool.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(backend = %pool.addr, cause = %err, "backend unusable: TLS handshake failed");
                } else {
                    tracing::debug!(backend = %pool.addr, cause = %err, "connect failed");
                }
                conns.failures += 1;
                conns.last_failure = Some((conns.failures, err));
            }
        }
    }
    pool.freed.notify_waiters();
}

async fn connect(pool: &Arc<Pool>) -> Result<Arc<Conn>, ConnectError> {
    let addr = &pool.addr;
    let config = &pool.config;
    let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(&**addr))
        .await
        .map_err(|_| ConnectError::Timeout {
            addr: addr.clone(),
            after: config.connect_timeout,
        })?
        .map_err(|e| ConnectError::Io {
            addr: addr.clone(),
            cause: error_chain(&e),
        })?;
    if let Err(err) = stream.set_nodelay(true) {
        // Still usable, only slower for small frames.
        tracing::debug!(backend = %addr, cause = %err, "cannot set TCP_NODELAY");
    }
    let stream = match &pool.tls {
        None => Either::Left(stream),
        Some(tls) => {
            let tls_error = |cause: String| ConnectError::Tls {
                addr: addr.clone(),
                cause,
            };
            let name = tls.server_name(addr).map_err(tls_error)?;
            let handshake = tls.connector().connect(name, stream);
            let tls_stream = tokio::time::timeout(config.connect_timeout, handshake)
                .await
                .map_err(|_| {
                    tls_error(format!("no handshake within {:?}", config.connect_timeout))
                })?
                .map_err(|e| tls_error(error_chain(&e)))?;
            Either::Right(tls_stream)
        }
    };
    let keepalive = match pool.keepalive_ms.load(Ordering::Relaxed) {
        0 => None,
        ms => Some(Duration::from_millis(ms)),
    };
    let going_away = Arc::new(AtomicBool::new(false));
    let heard = Arc::new(AtomicBool::new(false));
    let (tap, settings_seen) = FrameTap::new(stream, going_away.clone(), heard.clone());
    let handshake = h2::client::Builder::new()
        // A stream holds at most this much a slow client has not taken; the
        // connection's window covers every stream's, so unread streams never
        // stall the others on the connection.
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(
            STREAM_WINDOW
                .saturating_mul(config.max_streams_per_connection)
                .min(MAX_WINDOW),
        )
        // Until the backend's SETTINGS say otherwise (no limit, if they say nothing).
        .initial_max_send_streams(config.max_streams_per_connection as usize)
        // hyper's client defaults, kept when weir moved to h2 directly.
        .max_header_list_size(MAX_HEADER_LIST)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake::<_, Bytes>(tap);
    let (sender, mut connection) = tokio::time::timeout(config.connect_timeout, handshake)
        .await
        .map_err(|_| ConnectError::Handshake {
            addr: addr.clone(),
            cause: format!("no HTTP/2 handshake within {:?}", config.connect_timeout),
        })?
        .map_err(|e| ConnectError::Handshake {
            addr: addr.clone(),
            cause: error_chain(&e),
        })?;
    let streams = Arc::new(AtomicU32::new(0));
    let keepalive = keepalive.and_then(|every| {
        Some(KeepAlive {
            ping_pong: connection.ping_pong()?,
            every,
            timeout: config.keepalive_timeout,
            timer: Box::pin(tokio::time::sleep(every)),
            heard,
            streams: streams.clone(),
            awaiting: false,
        })
    });
    let peer_max = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicBool::new(false));
    let driven = Driven {
        connection,
        peer_max: peer_max.clone(),
        keepalive,
    };
    // Weak: the pool owns its connections, not the other way round; when
    // the backend goes, the pool drops the senders and the connection ends.
    let owner = Arc::downgrade(pool);
    let ended = closed.clone();
    tokio::spawn(async move {
        let outcome = driven.await;
        ended.store(true, Ordering::Relaxed);
        if let Some(pool) = owner.upgrade() {
            pool.connection_ended(outcome);
        }
    });
    // The backend's first frame (its SETTINGS) before any call uses it.
    let waited = tokio::time::timeout(config.connect_timeout, settings_seen).await;
    let Ok(Ok(limit)) = waited else {
        return Err(ConnectError::Handshake {
            addr: addr.clone(),
            cause: "no SETTINGS frame from the backend".into(),
        });
    };
    let limit = limit.map_or(usize::MAX, |l| l as usize);
    peer_max.fetch_max(
        limit.min(config.max_streams_per_connection as usize),
        Ordering::Relaxed,
    );
    Ok(Arc::new(Conn {
        sender,
        streams,
        peer_max,
        going_away,
        closed,
        opened: AtomicU64::new(0),
        retired: AtomicBool::new(false),
        home: crate::listener::runtime_index(),
    }))
}

/// Response header blocks larger than this end the stream (hyper's default).
const MAX_HEADER_LIST: u32 = 16 << 10;
/// Request bytes h2 buffers per stream beyond the backend's window (hyper's default).
const MAX_SEND_BUFFER: usize = 1 << 20;

/// A backend connection: plain TCP, or TLS over it.
type Transport = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

type Connection = h2::client::Connection<FrameTap<Transport>, Bytes>;

/// How a backend connection ended, when not cleanly.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error(transparent)]
    H2(#[from] h2::Error),
    #[error("no answer to a keep-alive PING within {0:?}")]
    KeepAliveTimeout(Duration),
}

/// Drives a connection, noting the backend's stream limit after each step
/// (its SETTINGS frames are read while the connection runs), and pings
/// the backend while streams are open but it has been quiet.
struct Driven {
    connection: Connection,
    peer_max: Arc<AtomicUsize>,
    keepalive: Option<KeepAlive>,
}

impl Future for Driven {
    type Output = Result<(), Ended>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let outcome = Pin::new(&mut this.connection).poll(cx);
        this.peer_max.store(
            this.connection.max_concurrent_send_streams(),
            Ordering::Relaxed,
        );
        if let Poll::Ready(outcome) = outcome {
            return Poll::Ready(outcome.map_err(Ended::from));
        }
        if let Some(keepalive) = this.keepalive.as_mut() {
            keepalive.poll(cx)?;
        }
        Poll::Pending
    }
}

/// Keep-alive pings, as gRPC servers accept them: only while streams are
/// open, and only after an interval in which nothing came from the
/// backend; a ping unanswered within the timeout ends the connection (a
/// dead peer is noticed).
struct KeepAlive {
    ping_pong: h2::PingPong,
    every: Duration,
    timeout: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// Bytes came from the backend since the last tick (set by the tap).
    heard: Arc<AtomicBool>,
    /// The pool's count of open streams on this connection.
    streams: Arc<AtomicU32>,
    /// A ping is out, not yet answered.
    awaiting: bool,
}

impl KeepAlive {
    fn poll(&mut self, cx: &mut Context<'_>) -> Result<(), Ended> {
        if self.awaiting {
            if let Poll::Ready(answered) = self.ping_pong.poll_pong(cx) {
                // An error here is the connection's, which it reports itself.
                let _ = answered;
                self.awaiting = false;
                self.heard.store(false, Ordering::Relaxed);
                self.timer.as_mut().reset(Instant::now() + self.every);
            }
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            if self.awaiting {
                return Err(Ended::KeepAliveTimeout(self.timeout));
            }
            let heard = self.heard.swap(false, Ordering::Relaxed);
            if heard || self.streams.load(Ordering::Relaxed) == 0 {
                self.timer.as_mut().reset(Instant::now() + self.every);
                continue;
            }
            if self.ping_pong.send_ping(h2::Ping::opaque()).is_ok() {
                self.awaiting = true;
                self.timer.as_mut().reset(Instant::now() + self.timeout);
                // Registers for the answer.
                if self.ping_pong.poll_pong(cx).is_ready() {
                    self.awaiting = false;
                    self.timer.as_mut().reset(Instant::now() + self.every);
                }
            } else {
                self.timer.as_mut().reset(Instant::now() + self.every);
            }
        }
        Ok(())
    }
}

/// Passes a connection's bytes through, reading the frame headers on the
/// way (payloads are skipped, not copied): the backend's first frame, its
/// SETTINGS with the stream limit, and any GOAWAY. A new connection is
/// handed out only once its SETTINGS arrived, so no call is queued inside
/// h2 behind a limit the pool did not know yet; a GOAWAY marks the
/// connection as going away the moment its bytes are read, before h2 has
/// processed whatever follows it.
struct FrameTap<IO> {
    io: IO,
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes of the current frame still to pass.
    skip: usize,
    /// The first frame's payload while it is read (a SETTINGS frame).
    first_settings: Option<Vec<u8>>,
    seen: Option<tokio::sync::oneshot::Sender<Option<u32>>>,
    going_away: Arc<AtomicBool>,
    /// Set whenever bytes arrive (the keep-alive's sign of life).
    heard: Arc<AtomicBool>,
}

const FRAME_SETTINGS: u8 = 0x4;
const FRAME_GOAWAY: u8 = 0x7;

impl<IO> FrameTap<IO> {
    fn new(
        io: IO,
        going_away: Arc<AtomicBool>,
        heard: Arc<AtomicBool>,
    ) -> (Self, tokio::sync::oneshot::Receiver<Option<u32>>) {
        let (seen, rx) = tokio::sync::oneshot::channel();
        let tap = FrameTap {
            io,
            header: [0; 9],
            header_len: 0,
            skip: 0,
            first_settings: None,
            seen: Some(seen),
            going_away,
            heard,
        };
        (tap, rx)
    }

    fn observe(&mut self, mut read: &[u8]) {
        if !read.is_empty() {
            self.heard.store(true, Ordering::Relaxed);
        }
        while !read.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(read.len());
                if let Some(payload) = self.first_settings.as_mut() {
                    payload.extend_from_slice(&read[..n]);
                }
                read = &read[n..];
                self.skip -= n;
                if self.skip == 0 {
                    self.settings_done();
                }
                continue;
            }
            let n = (9 - self.header_len).min(read.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&read[..n]);
            self.header_len += n;
            read = &read[n..];
            if self.header_len < 9 {
                return;
            }
            self.header_len = 0;
            let h = self.header;
            let length = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
            let kind = h[3];
            if kind == FRAME_GOAWAY {
                self.going_away.store(true, Ordering::Relaxed);
            }
            if self.seen.is_some() {
                if kind == FRAME_SETTINGS && h[4] & 0x1 == 0 {
                    self.first_settings = Some(Vec::with_capacity(length));
                } else {
                    // Not SETTINGS first: h2 will fail the handshake.
                    if let Some(seen) = self.seen.take() {
                        let _handshake_may_have_given_up = seen.send(None);
                    }
                }
            }
            self.skip = length;
            if length == 0 {
                self.settings_done();
            }
        }
    }

    /// The first SETTINGS frame is whole: tell its stream limit.
    fn settings_done(&mut self) {
        let Some(payload) = self.first_settings.take() else {
            return;
        };
        let limit = payload
            .chunks_exact(6)
            .filter(|e| u16::from_be_bytes([e[0], e[1]]) == 0x3)
            .map(|e| u32::from_be_bytes([e[2], e[3], e[4], e[5]]))
            .next_back();
        if let Some(seen) = self.seen.take() {
            let _handshake_may_have_given_up = seen.send(limit);
        }
    }
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FrameTap<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let outcome = Pin::new(&mut self.io).poll_read(cx, buf);
        self.observe(&buf.filled()[before..]);
        outcome
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FrameTap<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(entries: &[(u16, u32)]) -> Vec<u8> {
        let len = entries.len() * 6;
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            0x4,
            0,
            0,
            0,
            0,
            0,
        ];
        for (id, v) in entries {
            f.extend_from_slice(&id.to_be_bytes());
            f.extend_from_slice(&v.to_be_bytes());
        }
        f
    }

    #[test]
    fn the_tap_reads_the_stream_limit_from_the_first_settings_frame_in_pieces() {
        let going_away = Arc::new(AtomicBool::new(false));
        let (mut tap, mut seen) = FrameTap::new((), going_away.clone(), Arc::default());
        let frame = settings(&[(0x4, 65535), (0x3, 10), (0x5, 16384)]);
        for chunk in frame.chunks(4) {
            tap.observe(chunk);
        }
        assert_eq!(seen.try_recv().unwrap(), Some(10));
        assert!(!going_away.load(Ordering::Relaxed));
    }

    #[test]
    fn settings_without_a_limit_say_so() {
        let (mut tap, mut seen) = FrameTap::new((), Arc::default(), Arc::default());
        tap.observe(&settings(&[(0x4, 65535)]));
        assert_eq!(seen.try_recv().unwrap(), None);
    }

    #[test]
    fn a_goaway_after_other_frames_marks_the_connection_at_once() {
        let going_away = Arc::new(AtomicBool::new(false));
        let (mut tap, _seen) = FrameTap::new((), going_away.clone(), Arc::default());
        let mut bytes = settings(&[(0x3, 100)]);
        // A DATA frame of 5 bytes, then GOAWAY (last stream 7, NO_ERROR).
        bytes.extend_from_slice(&[0, 0, 5, 0x0, 0, 0, 0, 0, 1, b'h', b'e', b'l', b'l', b'o']);
        bytes.extend_from_slice(&[0, 0, 8, FRAME_GOAWAY, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0]);
        let (first, rest) = bytes.split_at(20);
        tap.observe(first);
        assert!(!going_away.load(Ordering::Relaxed));
        tap.observe(rest);
        assert!(going_away.load(Ordering::Relaxed));
    }

    /// A backend that stops answering (its process hung, the path to it
    /// dropped) is noticed by the keep-alive: the call on it fails and
    /// the connection leaves the pool, instead of waiting forever.
    #[tokio::test]
    async fn a_backend_that_stops_answering_pings_loses_its_connection() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: Arc<str> = listener.local_addr().unwrap().to_string().into();
        let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (socket, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(socket).await.unwrap();
            let request = conn.accept().await.unwrap().unwrap();
            accepted_tx.send(()).unwrap();
            // Hung: holds the call and the connection, reads nothing more.
            std::future::pending::<()>().await;
            drop((conn, request));
        });
        let config = PoolConfig {
            keepalive_interval: Some(Duration::from_millis(100)),
            keepalive_timeout: Duration::from_millis(300),
            ..PoolConfig::default()
        };
        let pool = Arc::new(Pool::new(addr.clone(), config, None));
        let stream = pool.stream().await.expect("a stream");
        let mut request = http::Request::new(super::super::ReplayBody::fixed(Bytes::from_static(
            b"hello",
        )));
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = format!("http://{addr}/a.B/C").parse().unwrap();
        let sent = tokio::spawn(super::super::send(stream.sender.clone(), request));
        accepted_rx.await.expect("the backend took the call");
        let outcome = tokio::time::timeout(Duration::from_secs(10), sent)
            .await
            .expect("the call ended within 10 s")
            .unwrap();
        assert!(outcome.is_err(), "a hung backend answered: {outcome:?}");
        drop(stream);
        assert!(!pool.is_connected(), "the dead connection is still offered");
    }

    /// A connection that carried `max_requests_per_connection` takes no
    /// more: the next call opens another, and the old one closes once its
    /// calls are done (h2 ids run out after 2^30 streams, and a backend
    /// added to a fleet gets its share of long-lived clients).
    #[tokio::test]
    async fn a_connection_retires_after_its_request_limit_and_closes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: Arc<str> = listener.local_addr().unwrap().to_string().into();
        // Per accepted connection: requests it served, and whether it ended.
        let (served_tx, mut served_rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            for index in 0.. {
                let (socket, _) = listener.accept().await.unwrap();
                let served = served_tx.clone();
                tokio::spawn(async move {
                    let mut conn = h2::server::handshake(socket).await.unwrap();
                    let mut requests = 0;
                    while let Some(Ok((_, mut respond))) = conn.accept().await {
                        requests += 1;
                        let response = http::Response::new(());
                        respond.send_response(response, true).unwrap();
                    }
                    served.send((index, requests)).unwrap();
                });
            }
        });
        let config = PoolConfig {
            max_requests_per_connection: 3,
            ..PoolConfig::default()
        };
        let pool = Arc::new(Pool::new(addr.clone(), config, None));
        for _ in 0..7 {
            let stream = pool.stream().await.expect("a stream");
            let mut request = http::Request::new(super::super::ReplayBody::fixed(
                Bytes::from_static(b"hello"),
            ));
            *request.method_mut() = http::Method::POST;
            *request.uri_mut() = format!("http://{addr}/a.B/C").parse().unwrap();
            let response = super::super::send(stream.sender.clone(), request)
                .await
                .expect("answered");
            assert_eq!(response.status(), 200);
        }
        let mut ended = Vec::new();
        while ended.len() < 2 {
            let next = tokio::time::timeout(Duration::from_secs(10), served_rx.recv())
                .await
                .expect("the retired connections closed within 10 s");
            ended.push(next.unwrap());
        }
        ended.sort();
        assert_eq!(
            ended,
            [(0, 3), (1, 3)],
            "connections closed with the requests they served"
        );
        assert_eq!(
            pool.view().connections,
            1,
            "one connection open, with the 7th call's"
        );
    }
}
