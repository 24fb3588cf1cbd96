//! One client connection, held to the limits an edge needs: a bound on the
//! time to the first request (TLS handshake and HTTP/2 preface included),
//! GOAWAY after an idle spell and (optionally) at a maximum age, a cap on
//! connections open at once, and HTTP/2 settings that bound what one
//! connection can ask for (streams, header block size, resets).
//!
//! Timers are per connection and armed for the next thing that can happen
//! (no per-connection polling), so idle connections cost no wake-ups.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use arc_swap::ArcSwap;

use crate::config::LimitsSection;
use crate::listener::Runtimes;
use crate::metrics::ClientConnMetrics;
use crate::proxy::body::ResponseBody;
use crate::proxy::Proxy;
use crate::upstream::{BoxError, RequestBody};

/// The limits of client connections, and what enforcing them records.
pub(super) struct ClientLimits {
    /// Replaced by a configuration reload: each connection keeps the
    /// limits it was accepted under; the cap applies at once.
    settings: ArcSwap<ConnLimits>,
    pub metrics: ClientConnMetrics,
    open: AtomicUsize,
}

/// What one connection is held to.
pub(super) struct ConnLimits {
    handshake_timeout: Duration,
    idle_timeout: Duration,
    max_age: Option<Duration>,
    max_connections: usize,
    max_concurrent_streams: u32,
    max_header_list_bytes: u32,
}

impl From<&LimitsSection> for ConnLimits {
    fn from(section: &LimitsSection) -> Self {
        ConnLimits {
            handshake_timeout: section.handshake_timeout,
            idle_timeout: section.idle_timeout,
            max_age: (!section.max_connection_age.is_zero()).then_some(section.max_connection_age),
            max_connections: section.max_connections,
            max_concurrent_streams: section.max_concurrent_streams,
            max_header_list_bytes: section.max_header_list_bytes,
        }
    }
}

impl ClientLimits {
    pub fn new(section: &LimitsSection, metrics: ClientConnMetrics) -> Self {
        ClientLimits {
            settings: ArcSwap::from_pointee(ConnLimits::from(section)),
            metrics,
            open: AtomicUsize::new(0),
        }
    }

    /// Connections accepted from now on are held to `section`.
    pub fn set(&self, section: &LimitsSection) {
        self.settings.store(Arc::new(ConnLimits::from(section)));
    }

    /// A place for one more connection, or `None` at the cap.
    fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if before >= self.settings.load().max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            self.metrics.refused.inc();
            return None;
        }
        self.metrics.open.inc();
        Some(Admitted(self.clone()))
    }
}

/// One admitted connection; its place is given back on drop.
struct Admitted(Arc<ClientLimits>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.open.dec();
    }
}

/// Accepts client connections until `stop`, each served under `limits` on
/// one of `runtimes`.
pub(super) async fn accept(
    listener: TcpListener,
    runtimes: Runtimes,
    tls: Option<Arc<crate::tls::ServerTls>>,
    proxy: Arc<Proxy>,
    limits: Arc<ClientLimits>,
    connections: TaskTracker,
    stop: CancellationToken,
) {
    let serving = stop.clone();
    crate::listener::accept_loop("grpc", listener, runtimes, connections, stop, move |incoming, peer| {
        let (proxy, stop, tls) = (proxy.clone(), serving.clone(), tls.clone());
        // Admitted (or not) here, before the task runs: the cap holds however
        // fast connections arrive. Refused ones are closed at once.
        let admitted = limits.admit();
        let limits = limits.clone();
        let settings = limits.settings.load_full();
        async move {
            let Some(admitted) = admitted else {
                tracing::debug!(%peer, "connection refused: limits.max_connections open");
                return;
            };
            let stream = match incoming.into_stream() {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::debug!(%peer, cause = %err, "cannot register a handed-over connection");
                    return;
                }
            };
            let accepted = Instant::now();
            let handshake_deadline = accepted + settings.handshake_timeout;
            let held = Held {
                limits: &limits,
                settings: &settings,
            };
            let Some(acceptor) = tls.map(|t| t.acceptor()) else {
                serve_connection(stream, peer, proxy, held, accepted, stop).await;
                drop(admitted);
                return;
            };
            match tokio::time::timeout_at(handshake_deadline, acceptor.accept(stream)).await {
                Ok(Ok(tls_stream)) => {
                    serve_connection(tls_stream, peer, proxy, held, accepted, stop).await
                }
                Ok(Err(err)) => {
                    tracing::debug!(%peer, cause = %crate::errors::chain(&err), "TLS handshake failed")
                }
                Err(_) => {
                    limits.metrics.closed("handshake_timeout");
                    tracing::debug!(%peer, "TLS handshake timed out");
                }
            }
            drop(admitted);
        }
    })
    .await;
}

/// Streams a connection opens before its share of premature resets is judged.
const RESET_JUDGED_AFTER: usize = 100;

/// What the connection's timers look at: streams open, since when idle,
/// whether a request came at all; and how many streams the client reset
/// before they were answered (rapid reset: each such stream costs the
/// gateway a route, a pick and an upstream stream, and the client nothing).
struct Activity {
    open: AtomicUsize,
    idle_since: Mutex<Instant>,
    requested: AtomicBool,
    opened: AtomicUsize,
    premature: AtomicUsize,
    abusive: AtomicBool,
    changed: Notify,
}

impl Activity {
    fn stream_opened(&self) {
        self.requested.store(true, Ordering::Relaxed);
        self.open.fetch_add(1, Ordering::AcqRel);
        self.opened.fetch_add(1, Ordering::Relaxed);
    }

    fn stream_closed(&self, answered: bool) {
        if !answered {
            // More than half the streams reset before their answer, once
            // enough were opened to judge (Envoy's premature-reset rule).
            let premature = self.premature.fetch_add(1, Ordering::Relaxed) + 1;
            let opened = self.opened.load(Ordering::Relaxed);
            if opened >= RESET_JUDGED_AFTER && premature * 2 > opened {
                self.abusive.store(true, Ordering::Relaxed);
                self.changed.notify_one();
            }
        }
        if self.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.idle_since.lock().expect("activity poisoned") = Instant::now();
            self.changed.notify_one();
        }
    }

    /// When the connection is next due a look: the handshake deadline until
    /// a request came, the idle deadline while nothing is open, its age.
    fn next_deadline(
        &self,
        limits: &ConnLimits,
        accepted: Instant,
    ) -> Option<(Instant, &'static str)> {
        let mut due: Option<(Instant, &'static str)> = None;
        let mut consider = |at: Instant, why: &'static str| {
            if due.is_none_or(|(d, _)| at < d) {
                due = Some((at, why));
            }
        };
        if !self.requested.load(Ordering::Relaxed) {
            consider(accepted + limits.handshake_timeout, "handshake_timeout");
        } else if self.open.load(Ordering::Acquire) == 0 {
            let idle_since = *self.idle_since.lock().expect("activity poisoned");
            consider(idle_since + limits.idle_timeout, "idle");
        }
        if let Some(age) = limits.max_age {
            consider(accepted + age, "max_age");
        }
        due
    }
}

/// The limits a connection is held to, and where it records hitting them.
#[derive(Clone, Copy)]
struct Held<'a> {
    limits: &'a ClientLimits,
    settings: &'a ConnLimits,
}

async fn serve_connection<IO>(
    io: IO,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    held: Held<'_>,
    accepted: Instant,
    stop: CancellationToken,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Held { limits, settings } = held;
    let activity = Arc::new(Activity {
        open: AtomicUsize::new(0),
        idle_since: Mutex::new(accepted),
        requested: AtomicBool::new(false),
        opened: AtomicUsize::new(0),
        premature: AtomicUsize::new(0),
        abusive: AtomicBool::new(false),
        changed: Notify::new(),
    });
    let on_request = activity.clone();
    let service = service_fn(move |req| {
        let proxy = proxy.clone();
        // Held by the handler, then by the response body: the stream counts
        // as open until both are done, however the call ends.
        let mut stream = OpenStream::new(on_request.clone());
        async move {
            // Boxed: the call's future is large (routing, retries, the
            // policy pick, the upstream exchange) and hyper moves the stream's
            // future into its task; a box moves as a pointer.
            let response = Box::pin(proxy.handle(req.map(RequestBody::from), peer)).await;
            stream.answered = true;
            Ok::<_, Infallible>(response.map(|body| Tracked {
                inner: body,
                _stream: stream,
            }))
        }
    });
    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(256 << 10)
        .initial_connection_window_size(2 << 20)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(settings.max_header_list_bytes)
        // Rapid reset: a client that makes the gateway reset or that resets
        // too many streams before they are taken gets GOAWAY.
        .max_pending_accept_reset_streams(20)
        .max_local_error_reset_streams(256)
        .keep_alive_interval(Duration::from_secs(30))
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut draining = false;
    let outcome = loop {
        let due = if draining {
            None
        } else {
            activity.next_deadline(settings, accepted)
        };
        let sleep = async {
            match due {
                Some((at, _)) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            outcome = conn.as_mut() => break outcome,
            _ = stop.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = activity.changed.notified() => {
                if !draining && activity.abusive.load(Ordering::Relaxed) {
                    limits.metrics.closed("rapid_reset");
                    tracing::info!(%peer, "client resets most of its streams before they are answered: sending GOAWAY");
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            _ = sleep => {
                // Look again: a stream may have opened since the timer was set.
                let Some((at, why)) = activity.next_deadline(settings, accepted) else { continue };
                if at > Instant::now() {
                    continue;
                }
                limits.metrics.closed(why);
                if why == "handshake_timeout" {
                    tracing::debug!(%peer, "no request within limits.handshake_timeout: closing");
                    return; // nothing to drain: dropping the connection closes it
                }
                tracing::debug!(%peer, reason = why, "sending GOAWAY");
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    if let Err(err) = outcome {
        // h2's own protections end a connection with GOAWAY ENHANCE_YOUR_CALM
        // (too many resets it had to take or make); other errors of ours
        // are protocol errors of the client's.
        if let Some(h2) = crate::errors::h2_error(&err).filter(|e| e.is_library() && e.is_go_away())
        {
            let reason = if h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) {
                "rapid_reset"
            } else {
                "protocol_error"
            };
            limits.metrics.closed(reason);
        }
        tracing::debug!(%peer, cause = %crate::errors::chain(&err), "client connection ended with an error");
    }
}

/// One stream of the connection, open until dropped.
struct OpenStream {
    activity: Arc<Activity>,
    /// The gateway had its answer ready (else the client reset it first).
    answered: bool,
}

impl OpenStream {
    fn new(activity: Arc<Activity>) -> Self {
        activity.stream_opened();
        OpenStream {
            activity,
            answered: false,
        }
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.activity.stream_closed(self.answered);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its stream counted as open.
    struct Tracked {
        #[pin]
        inner: ResponseBody,
        _stream: OpenStream,
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}
