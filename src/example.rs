//! The example echo service (feature `testkit`): the backend of `make demo`,
//! the examples and the tests. Implements all four call kinds; each reply
//! names the instance that answered; requests can ask for a delay or an error.
//!
//! [`EchoBackend`] serves it on its own accept loop, so [`EchoBackend::kill`]
//! can drop every connection at once, as a crash would.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_stream::{Stream, StreamExt};
use tonic::metadata::{KeyAndValueRef, MetadataMap};
use tonic::{Request, Response, Status, Streaming};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

pub mod pb {
    tonic::include_proto!("weir.example.v1");
}

use pb::echo_server::{Echo, EchoServer};
use pb::{EchoReply, EchoRequest};

/// Messages of this size and more must pass (the proxy's promise is 16 MiB+).
pub const MAX_MESSAGE: usize = 64 * 1024 * 1024;

/// What an instance has seen, for tests and the demo's table.
#[derive(Debug, Default)]
pub struct EchoStats {
    pub calls: AtomicU64,
    /// Calls whose client went away before the answer (cancellation reached us).
    pub cancelled: AtomicU64,
    pub active: AtomicU64,
}

#[derive(Clone)]
struct EchoService {
    name: Arc<str>,
    stats: Arc<EchoStats>,
    /// Extra delay added to every call (a slow instance), in ms.
    slow_ms: Arc<AtomicU64>,
    /// A gRPC code every call fails with (a broken instance); 0 for none.
    fail_code: Arc<AtomicU32>,
}

/// Counts a call; if dropped before `finish`, the call was cancelled.
struct CallGuard {
    stats: Arc<EchoStats>,
    finished: bool,
}

impl CallGuard {
    fn new(stats: &Arc<EchoStats>) -> Self {
        stats.calls.fetch_add(1, Ordering::Relaxed);
        stats.active.fetch_add(1, Ordering::Relaxed);
        CallGuard {
            stats: stats.clone(),
            finished: false,
        }
    }
    fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.stats.active.fetch_sub(1, Ordering::Relaxed);
        if !self.finished {
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Request metadata named `x-echo-*` comes back as response metadata, and the
/// `grpc-timeout` and W3C `traceparent` and `tracestate` the instance
/// received as `x-seen-grpc-timeout`, `x-seen-traceparent` and
/// `x-seen-tracestate`.
fn echoed(request: &MetadataMap) -> MetadataMap {
    let mut out = MetadataMap::new();
    if let Some(t) = request.get("grpc-timeout") {
        out.insert("x-seen-grpc-timeout", t.clone());
    }
    if let Some(t) = request.get("traceparent") {
        out.insert("x-seen-traceparent", t.clone());
    }
    if let Some(t) = request.get("tracestate") {
        out.insert("x-seen-tracestate", t.clone());
    }
    for kv in request.iter() {
        match kv {
            KeyAndValueRef::Ascii(k, v) if k.as_str().starts_with("x-echo-") => {
                out.insert(k.clone(), v.clone());
            }
            KeyAndValueRef::Binary(k, v) if k.as_str().starts_with("x-echo-") => {
                out.insert_bin(k.clone(), v.clone());
            }
            _ => {}
        }
    }
    out
}

impl EchoService {
    fn reply(&self, req: &EchoRequest, count: u32) -> EchoReply {
        EchoReply {
            message: req.message.clone(),
            payload: req.payload.clone(),
            instance: self.name.to_string(),
            count,
        }
    }

    async fn delay(&self, req: &EchoRequest) {
        let ms = req.delay_ms as u64 + self.slow_ms.load(Ordering::Relaxed);
        if ms > 0 {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }

    /// The error a request asked for, with details and trailing metadata.
    fn failure(&self, req: &EchoRequest) -> Option<Status> {
        let code = match req.fail_code {
            0 => self.fail_code.load(Ordering::Relaxed),
            asked => asked,
        };
        if code == 0 {
            return None;
        }
        let mut status = Status::with_details(
            tonic::Code::from(code as i32),
            format!("{} failed as asked", self.name),
            bytes::Bytes::from_static(b"\x08\x2a details"),
        );
        status
            .metadata_mut()
            .insert("x-trailer-instance", self.name.parse().expect("ascii name"));
        status.metadata_mut().insert_bin(
            "x-trailer-bin",
            tonic::metadata::MetadataValue::from_bytes(b"\x00\xffbin"),
        );
        Some(status)
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let guard = CallGuard::new(&self.stats);
        let meta = echoed(request.metadata());
        let req = request.into_inner();
        self.delay(&req).await;
        guard.finish();
        if let Some(status) = self.failure(&req) {
            return Err(status);
        }
        let mut resp = Response::new(self.reply(&req, 1));
        *resp.metadata_mut() = meta;
        Ok(resp)
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let guard = CallGuard::new(&self.stats);
        let meta = echoed(request.metadata());
        let mut stream = request.into_inner();
        let mut count = 0;
        let mut last = EchoRequest::default();
        while let Some(req) = stream.message().await? {
            count += 1;
            last = req;
        }
        self.delay(&last).await;
        guard.finish();
        let mut resp = Response::new(self.reply(&last, count));
        *resp.metadata_mut() = meta;
        Ok(resp)
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let guard = CallGuard::new(&self.stats);
        let meta = echoed(request.metadata());
        let req = request.into_inner();
        let this = self.clone();
        let stream = async_stream(move |tx| async move {
            for i in 0..req.repeat {
                this.delay(&req).await;
                if tx.send(Ok(this.reply(&req, i + 1))).await.is_err() {
                    return; // client gone: the guard counts a cancellation
                }
            }
            guard.finish();
            if let Some(status) = this.failure(&req) {
                let _client_may_be_gone = tx.send(Err(status)).await;
            }
        });
        let mut resp = Response::new(stream);
        *resp.metadata_mut() = meta;
        Ok(resp)
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let guard = CallGuard::new(&self.stats);
        let meta = echoed(request.metadata());
        let mut input = request.into_inner();
        let this = self.clone();
        let stream = async_stream(move |tx| async move {
            let mut n = 0;
            loop {
                match input.next().await {
                    Some(Ok(req)) => {
                        n += 1;
                        this.delay(&req).await;
                        if tx.send(Ok(this.reply(&req, n))).await.is_err() {
                            return;
                        }
                    }
                    Some(Err(_)) => return, // the client reset: a cancellation
                    None => break,
                }
            }
            guard.finish();
        });
        let mut resp = Response::new(stream);
        *resp.metadata_mut() = meta;
        Ok(resp)
    }
}

/// A stream fed by a task; the task is dropped when the stream is.
fn async_stream<F, Fut>(body: F) -> ReplyStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<EchoReply, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let task = tokio::spawn(body(tx));
    let abort = task.abort_handle();
    Box::pin(AbortOnDrop {
        inner: tokio_stream::wrappers::ReceiverStream::new(rx),
        abort,
    })
}

struct AbortOnDrop {
    inner: tokio_stream::wrappers::ReceiverStream<Result<EchoReply, Status>>,
    abort: tokio::task::AbortHandle,
}

impl Stream for AbortOnDrop {
    type Item = Result<EchoReply, Status>;
    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.abort.abort();
    }
}

/// A running echo instance on a loopback port.
pub struct EchoBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub stats: Arc<EchoStats>,
    slow_ms: Arc<AtomicU64>,
    fail_code: Arc<AtomicU32>,
    health: HealthReporter,
    kill: tokio_util::sync::CancellationToken,
    server: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl EchoBackend {
    /// Serves on `127.0.0.1:0`.
    pub async fn start(name: &str) -> std::io::Result<EchoBackend> {
        EchoBackend::start_on(name, "127.0.0.1:0".parse().expect("addr")).await
    }

    pub async fn start_on(name: &str, addr: SocketAddr) -> std::io::Result<EchoBackend> {
        EchoBackend::serve(name, addr, None).await
    }

    /// Serves TLS on `127.0.0.1:0` (requiring client certificates when
    /// `tls` has a client CA): the upstream TLS tests' backend.
    pub async fn start_tls(
        name: &str,
        tls: Arc<crate::tls::ServerTls>,
    ) -> std::io::Result<EchoBackend> {
        EchoBackend::serve(name, "127.0.0.1:0".parse().expect("addr"), Some(tls)).await
    }

    /// Serves on `addr`, over TLS with `tls`.
    pub async fn serve(
        name: &str,
        addr: SocketAddr,
        tls: Option<Arc<crate::tls::ServerTls>>,
    ) -> std::io::Result<EchoBackend> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let stats = Arc::new(EchoStats::default());
        let slow_ms = Arc::new(AtomicU64::new(0));
        let fail_code = Arc::new(AtomicU32::new(0));
        let service = EchoService {
            name: name.into(),
            stats: stats.clone(),
            slow_ms: slow_ms.clone(),
            fail_code: fail_code.clone(),
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<EchoServer<EchoService>>().await;
        health.set_service_status("", ServingStatus::Serving).await;
        let routes = tonic::service::Routes::new(
            EchoServer::new(service)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(health_service);
        let kill = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(accept_loop(listener, routes, tls, kill.clone()));
        Ok(EchoBackend {
            name: name.to_owned(),
            addr,
            stats,
            slow_ms,
            fail_code,
            health,
            kill,
            server: std::sync::Mutex::new(Some(server)),
        })
    }

    /// Reports SERVING or NOT_SERVING on `grpc.health.v1.Health` (all services).
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.health.set_service_status("", status).await;
        self.health
            .set_service_status("weir.example.v1.Echo", status)
            .await;
    }

    /// Adds a delay to every call (a slow instance).
    pub fn set_slow(&self, delay: Duration) {
        self.slow_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
    }

    /// Makes every call fail with gRPC `code` (0: succeed again), while the
    /// instance stays up and reports SERVING: a broken instance that health
    /// checks do not catch.
    pub fn set_failing(&self, code: u32) {
        self.fail_code.store(code, Ordering::Relaxed);
    }

    pub fn calls(&self) -> u64 {
        self.stats.calls.load(Ordering::Relaxed)
    }

    /// Calls being served now.
    pub fn active(&self) -> u64 {
        self.stats.active.load(Ordering::Relaxed)
    }

    /// Closes the listener and every connection, as a crash would; returns
    /// once they are all closed.
    pub async fn kill(&self) {
        self.kill.cancel();
        let server = self.server.lock().expect("server handle").take();
        if let Some(server) = server {
            let _cancelled_or_done = server.await;
        }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        if let Some(server) = self.server.lock().expect("server handle").take() {
            server.abort();
        }
    }
}

/// Accepts connections and serves each on its own task. On `kill`, every
/// connection task is aborted and awaited, so their sockets are closed when
/// this returns; aborting this task also drops them all.
async fn accept_loop(
    listener: TcpListener,
    routes: tonic::service::Routes,
    tls: Option<Arc<crate::tls::ServerTls>>,
    kill: tokio_util::sync::CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = kill.cancelled() => {
                drop(listener);
                connections.shutdown().await;
                return;
            }
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(routes.clone());
                let acceptor = tls.as_ref().map(|t| t.acceptor());
                connections.spawn(async move {
                    let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .adaptive_window(true)
                        .clone();
                    let served = match acceptor {
                        None => builder.serve_connection(TokioIo::new(stream), service).await,
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                            Err(err) => {
                                tracing::debug!(cause = %err, "echo TLS handshake failed");
                                return;
                            }
                        },
                    };
                    if let Err(err) = served {
                        tracing::debug!(cause = %err, "echo connection ended");
                    }
                });
            }
            Some(_) = connections.join_next() => {}
        }
    }
}
