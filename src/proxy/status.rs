//! gRPC status codes on the wire, and the one place where the gateway's own
//! errors become gRPC responses.

use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use super::body::ResponseBody;

pub const OK: u32 = 0;
pub const CANCELLED: u32 = 1;
pub const UNKNOWN: u32 = 2;
pub const INVALID_ARGUMENT: u32 = 3;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const RESOURCE_EXHAUSTED: u32 = 8;
pub const INTERNAL: u32 = 13;
pub const UNIMPLEMENTED: u32 = 12;
pub const UNAVAILABLE: u32 = 14;
pub const DATA_LOSS: u32 = 15;

/// Names for metrics labels, indexed by code.
pub const NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

pub fn name(code: u32) -> &'static str {
    NAMES.get(code as usize).copied().unwrap_or("UNKNOWN")
}

// Names looked up on every call: as constants they are not parsed each time.
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// `grpc-status` of a header block, if present and well-formed.
pub fn code_of(headers: &HeaderMap) -> Option<u32> {
    headers.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// The gRPC code for a non-200 HTTP status from a backend (gRPC's HTTP mapping).
pub fn from_http(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => INTERNAL,
        401 => 16,
        403 => 7,
        404 => UNIMPLEMENTED,
        429 | 502 | 503 | 504 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

/// `grpc-message` is percent-encoded: bytes outside printable ASCII, and `%`.
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for b in message.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The trailer block of a call that ends with `code`.
pub fn trailers(code: u32, message: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(GRPC_STATUS, HeaderValue::from(code));
    if let Ok(v) = HeaderValue::from_str(&percent_encode(message)) {
        h.insert(GRPC_MESSAGE, v);
    }
    h
}

/// A trailers-only response: HTTP 200, the status in the only header block.
pub fn trailers_only(code: u32, message: &str) -> Response<ResponseBody> {
    let mut resp = Response::new(ResponseBody::Empty);
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.extend(trailers(code, message));
    resp
}

/// Why the gateway itself answered a call.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("not a gRPC request: {0}")]
    NotGrpc(&'static str),
    #[error("malformed gRPC path {0:?}: expected /package.Service/Method")]
    BadPath(String),
    #[error("no route matches {path} and etcd has no service named {service:?}")]
    UnknownService { path: String, service: String },
    #[error("service {service:?} has no endpoints")]
    NoEndpoints { service: String },
    #[error("service {service:?}: the gateway has not loaded endpoints from etcd yet")]
    NotReady { service: String },
    #[error("service {service:?}: no endpoint could be reached (last: {cause})")]
    Unreachable { service: String, cause: String },
    #[error("service {service:?}: backend {backend} failed before answering: {cause}")]
    Upstream {
        service: String,
        backend: String,
        cause: String,
    },
    #[error("service {service:?}: {cause}")]
    Unsendable { service: String, cause: String },
    #[error("deadline exceeded at the gateway before {service:?} answered")]
    DeadlineExceeded { service: String },
    #[error("service {service:?}: no bytes moved for {after:?} (the stream idle timeout)")]
    Idle {
        service: String,
        after: std::time::Duration,
    },
}

impl ProxyError {
    /// What ended the one attempt this error came from, for its span: the
    /// cause alone where the error carries one, else the whole message.
    pub fn attempt_cause(&self) -> String {
        match self {
            ProxyError::Unreachable { cause, .. } | ProxyError::Upstream { cause, .. } => {
                cause.clone()
            }
            other => other.to_string(),
        }
    }

    pub fn code(&self) -> u32 {
        match self {
            ProxyError::NotGrpc(_) => INVALID_ARGUMENT,
            ProxyError::BadPath(_) | ProxyError::UnknownService { .. } => UNIMPLEMENTED,
            ProxyError::NoEndpoints { .. }
            | ProxyError::NotReady { .. }
            | ProxyError::Unreachable { .. }
            | ProxyError::Upstream { .. } => UNAVAILABLE,
            ProxyError::DeadlineExceeded { .. } | ProxyError::Idle { .. } => DEADLINE_EXCEEDED,
            ProxyError::Unsendable { .. } => INTERNAL,
        }
    }

    /// What the client is told. Backend addresses (and the causes that
    /// name them) stay in the gateway's logs unless `name_backends`.
    pub fn client_message(&self, name_backends: bool) -> String {
        match self {
            ProxyError::Unreachable { service, .. } if !name_backends => {
                format!("service {service:?}: no endpoint could be reached")
            }
            ProxyError::Upstream { service, .. } if !name_backends => {
                format!("service {service:?}: a backend failed before answering")
            }
            _ => self.to_string(),
        }
    }

    pub fn into_response(self, name_backends: bool) -> Response<ResponseBody> {
        trailers_only(self.code(), &self.client_message(name_backends))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(percent_encode("a b%c\nü"), "a b%25c%0A%C3%BC");
    }

    #[test]
    fn trailers_only_carries_the_status_in_headers() {
        let r = ProxyError::NoEndpoints {
            service: "echo".into(),
        }
        .into_response(false);
        assert_eq!(r.status(), 200);
        assert_eq!(code_of(r.headers()), Some(UNAVAILABLE));
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert!(r.headers()["grpc-message"]
            .to_str()
            .unwrap()
            .contains("echo"));
    }

    #[test]
    fn clients_hear_the_service_and_not_backend_addresses_unless_allowed() {
        let err = ProxyError::Upstream {
            service: "echo".into(),
            backend: "10.1.2.3:50051".into(),
            cause: "connection reset".into(),
        };
        assert!(!err.client_message(false).contains("10.1.2.3"));
        assert!(err.client_message(false).contains("echo"));
        assert!(err.client_message(true).contains("10.1.2.3"));
        let err = ProxyError::Unreachable {
            service: "echo".into(),
            cause: "connect to 10.1.2.3:50051 failed".into(),
        };
        assert!(!err.client_message(false).contains("10.1.2.3"));
    }

    #[test]
    fn http_statuses_map_to_grpc_codes() {
        assert_eq!(from_http(StatusCode::SERVICE_UNAVAILABLE), UNAVAILABLE);
        assert_eq!(from_http(StatusCode::NOT_FOUND), UNIMPLEMENTED);
        assert_eq!(from_http(StatusCode::IM_A_TEAPOT), UNKNOWN);
    }
}
