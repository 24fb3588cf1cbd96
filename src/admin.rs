//! The admin HTTP listener: `/metrics` (Prometheus text), `/healthz`,
//! `/readyz` (ready once the first etcd listing or the snapshot is loaded),
//! and JSON views: `/routes`, `/services` (endpoints with live load and
//! health), `/policies` (versions, faults, the last load error).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::discovery::ServiceTable;
use crate::proxy::Proxy;

#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub table: Arc<ServiceTable>,
    pub proxy: Arc<Proxy>,
    pub policies: Arc<crate::policy::PolicySet>,
    /// SHA-256 of the bearer token every request must carry
    /// (`admin_token_file`); none required when unset.
    pub token: Option<[u8; 32]>,
    /// Cancelled when a drain starts (SIGTERM): `/readyz` answers 503 from
    /// then on, before any GOAWAY is sent.
    pub draining: tokio_util::sync::CancellationToken,
}

/// Reads `admin_token_file`: the token is its content, trimmed.
pub fn read_token(path: &std::path::Path) -> Result<[u8; 32], String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("admin_token_file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.len() < 16 {
        return Err(format!(
            "admin_token_file {}: the token must be at least 16 characters",
            path.display()
        ));
    }
    Ok(sha256(token.as_bytes()))
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}

/// Whether `req` carries the admin token. Digests are compared, so the
/// time taken says nothing of how much of a guess was right.
fn authorized(state: &AdminState, req: &Request<Incoming>) -> bool {
    let Some(want) = &state.token else {
        return true;
    };
    req.headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|given| sha256(given.trim().as_bytes()) == *want)
}

/// Serves admin requests until `cancel`; connections are tasks of `tasks`
/// and close when `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    tasks: TaskTracker,
    cancel: CancellationToken,
) {
    let closing = cancel.clone();
    let here = crate::listener::Runtimes::here();
    crate::listener::accept_loop("admin", listener, here, tasks, cancel, move |incoming, peer| {
        let (state, closing) = (state.clone(), closing.clone());
        async move {
            let stream = match incoming.into_stream() {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::debug!(%peer, cause = %err, "admin connection lost before it was served");
                    return;
                }
            };
            let service = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(&state, req)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let outcome = tokio::select! {
                outcome = conn.as_mut() => outcome,
                _ = closing.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(err) = outcome {
                tracing::debug!(cause = %crate::errors::chain(&err), "admin connection ended");
            }
        }
    })
    .await;
}

fn handle(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if !authorized(state, &req) {
        let mut denied = reply(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "an admin token is required: Authorization: Bearer <the token of admin_token_file>\n"
                .into(),
        );
        denied.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            http::HeaderValue::from_static("Bearer"),
        );
        return denied;
    }
    // Every view only reads: nothing here changes the gateway's state.
    if req.method() != http::Method::GET && req.method() != http::Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "the admin listener only answers GET\n".into(),
        );
    }
    match req.uri().path() {
        "/metrics" => {
            let mut text = String::new();
            match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
                Ok(()) => reply(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    text,
                ),
                Err(err) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    err.to_string(),
                ),
            }
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if state.draining.is_cancelled() => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "draining: shutting down, send no new clients\n".into(),
        ),
        "/readyz" if state.table.is_ready() => {
            let heard = match state.table.since_heard() {
                Some(age) => format!("etcd last heard from {:.1}s ago", age.as_secs_f64()),
                None => "serving the snapshot; etcd not heard from yet".to_owned(),
            };
            reply(StatusCode::OK, "text/plain", format!("ready ({heard})\n"))
        }
        "/readyz" => reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "waiting for the first etcd listing\n".into(),
        ),
        "/routes" => json_reply(routes(state)),
        "/services" => json_reply(services(state)),
        "/policies" => json_reply(state.policies.describe()),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found; try /metrics /healthz /readyz /routes /services /policies\n".into(),
        ),
    }
}

fn routes(state: &AdminState) -> Value {
    // The routes in force (a reload replaces them): exact matches, then
    // prefixes, longest first.
    let router = state.proxy.router();
    let routes: Vec<Value> = router
        .routes()
        .map(|r| json!({ "match": &*r.matched, "service": &*r.service.name, "policy": r.balancer.name(), "retries": r.retries, "idempotent": r.idempotent, "options": &*r.options }))
        .collect();
    json!({ "routes": routes, "unrouted": "calls go to the etcd service named after their gRPC service" })
}

fn services(state: &AdminState) -> Value {
    let backends = &state.proxy.state().backends;
    let mut out = serde_json::Map::new();
    for (name, set) in state.table.services() {
        let endpoints: Vec<Value> = set
            .endpoints
            .iter()
            .map(|e| {
                let mut v = e.to_json();
                if let Some(b) = backends.find(&e.addr) {
                    v["backend"] = json!({
                        "active_requests": b.load.active(),
                        "latency_ewma_us": b.load.latency_ewma_us(),
                        "successes": b.load.successes(),
                        "failures": b.load.failures(),
                        "health": b.health().as_str(),
                        "ejected": b.outlier.is_ejected(),
                        "times_ejected": b.outlier.times_ejected(),
                        "connected": b.pool.is_connected(),
                        "tls": b.pool.uses_tls(),
                        "last_connect_error": b.pool.last_connect_error(),
                        "pool": b.pool.view(),
                    });
                }
                v
            })
            .collect();
        out.insert(
            name.to_string(),
            json!({ "generation": set.generation, "endpoints": endpoints }),
        );
    }
    Value::Object(out)
}

fn json_reply(v: Value) -> Response<Full<Bytes>> {
    reply(StatusCode::OK, "application/json", format!("{v:#}\n"))
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}
