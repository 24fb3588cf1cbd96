//! A gateway under test: real etcd, real echo backends registered through the
//! library API, the gateway in-process, and tonic clients.

use std::time::Duration;

use tonic::transport::Channel;
use weir::config::Config;
use weir::example::pb::echo_client::EchoClient;
use weir::example::pb::EchoRequest;
use weir::example::{EchoBackend, MAX_MESSAGE};
use weir::register::{Registration, RegistrationSpec};
use weir::server::Gateway;
use weir::testkit::Etcd;

use super::{client, wait_on, PREFIX};

pub struct Env {
    pub etcd: Etcd,
    pub gateway: Option<Gateway>,
    pub backends: Vec<(EchoBackend, Registration)>,
}

/// Gateway settings for tests: loopback on free ports, quick health checks.
pub fn config(etcd: &Etcd, extra: &str) -> Config {
    let endpoints: Vec<String> = etcd.endpoints().iter().map(|e| format!("{e:?}")).collect();
    let text = format!(
        r#"
        listen = "127.0.0.1:0"
        admin = "127.0.0.1:0"
        drain_timeout = "5s"
        [etcd]
        endpoints = [{}]
        prefix = "{PREFIX}"
        [health_check]
        interval = "100ms"
        timeout = "500ms"
        {extra}
        "#,
        endpoints.join(",")
    );
    Config::parse(&text, std::path::Path::new("test.toml")).expect("test config")
}

impl Env {
    /// etcd, `n` echo backends registered as service `echo`, and a gateway with `extra` config.
    pub async fn start(n: usize, extra: &str) -> Env {
        let etcd = Etcd::start();
        let gateway = Gateway::start(config(&etcd, extra))
            .await
            .expect("gateway starts");
        let mut env = Env {
            etcd,
            gateway: Some(gateway),
            backends: Vec::new(),
        };
        for i in 0..n {
            env.add_backend("echo", &format!("b{i}"), 100).await;
        }
        if n > 0 {
            env.wait_endpoints("echo", n).await;
        }
        env
    }

    pub fn gateway(&self) -> &Gateway {
        self.gateway.as_ref().expect("gateway running")
    }

    pub async fn add_backend(&mut self, service: &str, name: &str, weight: u32) -> usize {
        let echo = EchoBackend::start(name).await.expect("echo backend");
        self.add_started(service, echo, weight).await
    }

    /// Registers a backend started elsewhere (over TLS, say).
    pub async fn add_started(&mut self, service: &str, echo: EchoBackend, weight: u32) -> usize {
        let mut spec = RegistrationSpec::new(PREFIX, service, &echo.addr.to_string());
        spec.weight = weight;
        let mut reg = Registration::spawn(client(&self.etcd).await, spec).expect("registration");
        reg.registered().await;
        self.backends.push((echo, reg));
        self.backends.len() - 1
    }

    pub fn backend(&self, i: usize) -> &EchoBackend {
        &self.backends[i].0
    }

    pub async fn wait_endpoints(&self, service: &str, n: usize) {
        wait_on(
            &self.gateway().table,
            &format!("{n} endpoints of {service}"),
            Duration::from_secs(10),
            |t| t.get(service).is_some_and(|s| s.len() == n),
        )
        .await;
    }

    pub async fn client(&self) -> EchoClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.gateway().grpc_addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to the gateway");
        EchoClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }
}

/// A gRPC message frame around `message` (uncompressed).
pub fn frame(message: &[u8]) -> bytes::Bytes {
    let mut f = Vec::with_capacity(5 + message.len());
    f.push(0);
    f.extend_from_slice(&(message.len() as u32).to_be_bytes());
    f.extend_from_slice(message);
    bytes::Bytes::from(f)
}

pub fn req(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.into(),
        ..Default::default()
    }
}

/// GET over HTTP/1.1 from the admin listener: (status, body).
pub async fn admin_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    weir::testkit::http_get(addr, path)
        .await
        .expect("admin listener")
}

/// Waits (up to 10 s) until some backend has `n` calls in flight from the
/// gateway (`weir_backend_active_requests`).
pub async fn wait_active_requests(admin: std::net::SocketAddr, n: u64, what: &str) {
    let line_end = format!(" {n}");
    super::eventually(what, Duration::from_secs(10), || {
        let line_end = line_end.clone();
        async move {
            let (_, m) = admin_get(admin, "/metrics").await;
            m.lines()
                .any(|l| l.starts_with("weir_backend_active_requests{") && l.ends_with(&line_end))
        }
    })
    .await;
}

/// What a raw call saw.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub messages: Vec<bytes::Bytes>,
    pub trailers: Option<http::HeaderMap>,
}

impl RawReply {
    /// `grpc-status` from the trailers, or from the headers (trailers-only).
    pub fn grpc_status(&self) -> Option<u32> {
        let from = |h: &http::HeaderMap| h.get("grpc-status")?.to_str().ok()?.parse().ok();
        self.trailers
            .as_ref()
            .and_then(from)
            .or_else(|| from(&self.headers))
    }

    pub fn grpc_message(&self) -> String {
        let from = |h: &http::HeaderMap| Some(h.get("grpc-message")?.to_str().ok()?.to_owned());
        self.trailers
            .as_ref()
            .and_then(from)
            .or_else(|| from(&self.headers))
            .unwrap_or_default()
    }
}

/// One gRPC call over a bare HTTP/2 connection: no client-side deadline, no
/// checks, any headers. For testing what the gateway itself answers.
pub async fn raw_call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    messages: &[&[u8]],
) -> RawReply {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    raw_call_on(stream, &addr.to_string(), method, path, headers, messages).await
}

/// [`raw_call`] over any connection (TLS, say).
pub async fn raw_call_on<IO>(
    io: IO,
    authority: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    messages: &[&[u8]],
) -> RawReply
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    let mut body = Vec::new();
    for m in messages {
        body.push(0u8);
        body.extend_from_slice(&(m.len() as u32).to_be_bytes());
        body.extend_from_slice(m);
    }
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{authority}{path}"))
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = sender
        .send_request(req)
        .await
        .expect("a response, never a dropped connection");
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.expect("a complete body");
    let trailers = collected.trailers().cloned();
    let mut data = collected.to_bytes();
    let mut messages = Vec::new();
    while data.len() >= 5 {
        let len = u32::from_be_bytes([data[1], data[2], data[3], data[4]]) as usize;
        messages.push(data.slice(5..5 + len));
        data = data.slice(5 + len..);
    }
    RawReply {
        status: parts.status.as_u16(),
        headers: parts.headers,
        messages,
        trailers,
    }
}

/// An `EchoRequest`, encoded.
pub fn encode(req: &EchoRequest) -> Vec<u8> {
    prost::Message::encode_to_vec(req)
}
