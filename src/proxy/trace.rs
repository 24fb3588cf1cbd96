//! The spans of a traced call: one server span for the call, a client span
//! per attempt on a backend (its context is what the backend is sent as
//! `traceparent`). Attributes follow the OpenTelemetry RPC conventions
//! (`rpc.*`, `server.*`, `client.*`), weir's own are under `weir.*`.
//! Only calls the sampler chose have any of this.

use std::net::SocketAddr;

use http::HeaderMap;
use opentelemetry::trace::{Status, TraceContextExt};
use opentelemetry::KeyValue;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::telemetry::{inject, CALL_SPANS};
use crate::tls::host_of;

use super::router::split_path;
use super::status;

/// A traced call's server span; clones are handles to the same span, which
/// ends when the last one is dropped.
#[derive(Clone)]
pub struct CallSpan {
    span: tracing::Span,
}

/// How a traced call ended, as its span says.
pub struct CallEnd<'a> {
    pub code: u32,
    pub route: Option<&'a str>,
    pub service: Option<&'a str>,
    pub backend: Option<&'a str>,
    pub policy: Option<&'a str>,
    pub policy_version: Option<&'a str>,
    pub attempts: u32,
    /// The last pick was the round-robin fallback's (the policy gave none).
    pub fallback: bool,
}

impl CallSpan {
    /// Starts the span of a call to `path` from `client`, as a child of
    /// `parent` (the client's `traceparent`; an empty context starts a trace).
    pub fn start(parent: opentelemetry::Context, path: &str, client: SocketAddr) -> CallSpan {
        let (name, service, method) = rpc_names(path);
        let span = tracing::info_span!(
            target: CALL_SPANS,
            parent: None,
            "call",
            otel.name = name,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
            client.address = %client.ip(),
        );
        // Set as attributes, not span fields: those would arrive as text.
        span.set_attribute("client.port", i64::from(client.port()));
        if parent.has_active_span() {
            let _ = span.set_parent(parent);
        }
        CallSpan { span }
    }

    /// Starts the span of the call's `number`th attempt (from 1) to `path`
    /// on `backend`.
    pub fn attempt(&self, number: u32, path: &str, backend: &str) -> AttemptSpan {
        let (name, service, method) = rpc_names(path);
        let span = tracing::info_span!(
            target: CALL_SPANS,
            parent: &self.span,
            "attempt",
            otel.name = name,
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = service,
            rpc.method = method,
        );
        span.set_attribute("weir.attempt", i64::from(number));
        span.set_attribute("server.address", host_of(backend).to_owned());
        if let Some(port) = backend_port(backend) {
            span.set_attribute("server.port", i64::from(port));
        }
        AttemptSpan { span }
    }

    /// The call goes to another backend because of `reason` (an event on
    /// the call's span).
    pub fn retrying(&self, reason: &str) {
        self.span.add_event(
            "retry",
            vec![KeyValue::new("weir.retry.reason", reason.to_owned())],
        );
    }

    pub fn finish(&self, end: &CallEnd<'_>) {
        let span = &self.span;
        span.set_attribute("rpc.grpc.status_code", i64::from(end.code));
        let text = |key: &'static str, value: Option<&str>| {
            if let Some(value) = value {
                span.set_attribute(key, value.to_owned());
            }
        };
        text("weir.route", end.route);
        text("weir.service", end.service);
        text("weir.backend", end.backend);
        text("weir.policy", end.policy);
        text("weir.policy_version", end.policy_version);
        span.set_attribute("weir.attempts", i64::from(end.attempts));
        span.set_attribute("weir.fallback", end.fallback);
        // A server span's error codes, by the RPC conventions.
        if matches!(
            end.code,
            status::UNKNOWN
                | status::DEADLINE_EXCEEDED
                | status::UNIMPLEMENTED
                | status::INTERNAL
                | status::UNAVAILABLE
                | status::DATA_LOSS
        ) {
            span.set_status(Status::error(status::name(end.code)));
        }
    }
}

/// One attempt's client span; clones are handles to the same span.
#[derive(Clone)]
pub struct AttemptSpan {
    span: tracing::Span,
}

impl AttemptSpan {
    /// Makes this attempt the parent the backend sees (`traceparent`,
    /// `tracestate`), in place of what the client sent.
    pub fn inject(&self, headers: &mut HeaderMap) {
        inject(&self.span.context(), headers);
    }

    /// The attempt did not get an answer: why.
    pub fn failed(&self, cause: &str) {
        self.span
            .set_attribute("weir.attempt.error", cause.to_owned());
        self.span.set_status(Status::error(cause.to_owned()));
    }

    /// The attempt's gRPC status (the backend's, or the gateway's verdict).
    pub fn finish(&self, code: u32) {
        self.span
            .set_attribute("rpc.grpc.status_code", i64::from(code));
        if code != status::OK {
            self.span.set_status(Status::error(status::name(code)));
        }
    }
}

/// A span's name (`package.Service/Method`, the RPC conventions'), and the
/// service and method of `path`.
fn rpc_names(path: &str) -> (&str, &str, &str) {
    let (service, method) = split_path(path).unwrap_or(("", ""));
    (path.strip_prefix('/').unwrap_or(path), service, method)
}

fn backend_port(addr: &str) -> Option<u16> {
    addr.rsplit_once(':')?.1.parse().ok()
}
