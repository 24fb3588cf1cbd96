//! Reading an etcd key-value into an endpoint registration.
//!
//! Two layouts are read side by side, told apart by the value:
//! 1. weir's own: key `<prefix>/<service>/<host:port>`, value empty, a bare
//!    `host:port`, or JSON `{"addr","weight","status","metadata"}` (every field
//!    optional; the address defaults to the key's last segment).
//! 2. etcd's gRPC naming (`client/v3/naming/endpoints`): key
//!    `<prefix>/<service>/<anything>`, value `{"Op":0,"Addr":"host:port","Metadata":...}`;
//!    the format has no weight, so a `weight` field in `Metadata` is read as one.
//!
//! In both, the service is everything between the prefix and the last `/`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::endpoint::DeclaredHealth;

pub const DEFAULT_WEIGHT: u32 = 100;

/// Keys under `<prefix>/_policies/` (and any service starting with `_`) are
/// reserved for weir itself and never read as endpoints.
pub const RESERVED_SERVICE_MARK: char = '_';

/// A registration read from one key-value, not yet bound to a lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    pub service: String,
    pub addr: String,
    pub weight: u32,
    pub health: DeclaredHealth,
    pub metadata: BTreeMap<String, String>,
}

/// Why a key-value was skipped. Shown in the log next to the key.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ValueError {
    #[error("key has no `<service>/<id>` part after the prefix")]
    KeyShape,
    #[error("key is not valid UTF-8")]
    KeyNotUtf8,
    #[error("value is not valid UTF-8")]
    ValueNotUtf8,
    #[error("value is not valid JSON: {0}")]
    Json(String),
    #[error("value has the wrong shape: {0}")]
    Shape(String),
    #[error("address {0:?} is not host:port")]
    Address(String),
    #[error("unknown status {0:?} (expected healthy or unhealthy)")]
    Status(String),
    #[error("naming-format operation {0} is not an add (Op 0)")]
    NamingOp(i64),
}

/// What a key under the prefix is, before its value is read.
#[derive(Debug, PartialEq, Eq)]
pub enum KeyKind<'a> {
    Endpoint {
        service: &'a str,
        id: &'a str,
    },
    /// Reserved for weir (policies published through etcd).
    Reserved,
}

/// Splits `key` (with the watched prefix, ending in `/`, already removed).
pub fn classify_key(rest: &str) -> Result<KeyKind<'_>, ValueError> {
    let (service, id) = rest.rsplit_once('/').ok_or(ValueError::KeyShape)?;
    if service.is_empty() || id.is_empty() {
        return Err(ValueError::KeyShape);
    }
    if service.starts_with(RESERVED_SERVICE_MARK) {
        return Ok(KeyKind::Reserved);
    }
    Ok(KeyKind::Endpoint { service, id })
}

#[derive(Deserialize)]
struct WeirValue {
    addr: Option<String>,
    weight: Option<u32>,
    status: Option<String>,
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NamingValue {
    #[serde(default)]
    op: i64,
    addr: String,
    #[serde(default)]
    metadata: Value,
}

/// Reads one value. `service` and `id` come from [`classify_key`].
pub fn parse_value(service: &str, id: &str, value: &[u8]) -> Result<Registration, ValueError> {
    let text = std::str::from_utf8(value).map_err(|_| ValueError::ValueNotUtf8)?;
    let text = text.trim();
    let base = |addr: String| Registration {
        service: service.to_owned(),
        addr,
        weight: DEFAULT_WEIGHT,
        health: DeclaredHealth::Healthy,
        metadata: BTreeMap::new(),
    };
    if text.is_empty() {
        return checked(base(id.to_owned()));
    }
    if !text.starts_with('{') {
        // A bare `host:port`, as many hand-written registrations are.
        return checked(base(text.to_owned()));
    }
    let json: Value = serde_json::from_str(text).map_err(|e| ValueError::Json(e.to_string()))?;
    if json.get("Addr").is_some() {
        let v: NamingValue =
            serde_json::from_value(json).map_err(|e| ValueError::Shape(e.to_string()))?;
        if v.op != 0 {
            return Err(ValueError::NamingOp(v.op));
        }
        let mut reg = base(v.addr);
        reg.metadata = naming_metadata(v.metadata);
        // The naming format has no weight field; a `weight` in its metadata stands in.
        if let Some(w) = reg.metadata.get("weight") {
            reg.weight = w
                .parse()
                .map_err(|_| ValueError::Shape(format!("Metadata.weight {w:?} is not a u32")))?;
        }
        return checked(reg);
    }
    let v: WeirValue =
        serde_json::from_value(json).map_err(|e| ValueError::Shape(e.to_string()))?;
    let mut reg = base(v.addr.unwrap_or_else(|| id.to_owned()));
    reg.weight = v.weight.unwrap_or(DEFAULT_WEIGHT);
    reg.metadata = v.metadata.unwrap_or_default();
    if let Some(status) = v.status {
        reg.health = parse_status(&status)?;
    }
    checked(reg)
}

fn parse_status(status: &str) -> Result<DeclaredHealth, ValueError> {
    match status.to_ascii_lowercase().as_str() {
        "healthy" | "serving" | "up" | "" => Ok(DeclaredHealth::Healthy),
        "unhealthy" | "not_serving" | "not-serving" | "down" | "draining" => {
            Ok(DeclaredHealth::Unhealthy)
        }
        _ => Err(ValueError::Status(status.to_owned())),
    }
}

/// The naming format's metadata is any JSON value (Go's `interface{}`); an
/// object's fields become metadata, scalars as their JSON text.
fn naming_metadata(value: Value) -> BTreeMap<String, String> {
    match value {
        Value::Object(map) => map
            .into_iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                (k, v)
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

fn checked(reg: Registration) -> Result<Registration, ValueError> {
    if !is_host_port(&reg.addr) {
        return Err(ValueError::Address(reg.addr));
    }
    Ok(reg)
}

/// `host:port` or `[v6]:port`: a host name (letters, digits, `-`, `.`,
/// `_`) or an IP address, and a port from 1 to 65535 — nothing a URI
/// authority would refuse, so every part of the gateway that dials or
/// probes the address can use it.
pub fn is_host_port(addr: &str) -> bool {
    let Some((host, port)) = addr.rsplit_once(':') else {
        return false;
    };
    let port_ok = !port.is_empty()
        && port.len() <= 5
        && port.bytes().all(|b| b.is_ascii_digit())
        && port.parse::<u16>().is_ok_and(|p| p != 0);
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|h| h.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    };
    port_ok && host_ok && addr.parse::<http::uri::Authority>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &str) -> Result<Registration, ValueError> {
        parse_value("svc", "10.0.0.1:80", v.as_bytes())
    }

    #[test]
    fn addresses_a_uri_would_refuse_are_not_host_port() {
        for bad in [
            "a b:80",
            "a\tb:80",
            "host:",
            ":80",
            "host:0",
            "host:65536",
            "host:+80",
            "user@host:80",
            "host/x:80",
            "[::1:80",
            "[zz]:80",
            "host:80 ",
            "ho%st:80",
        ] {
            assert!(!is_host_port(bad), "{bad:?} accepted");
        }
        for good in [
            "127.0.0.1:80",
            "[::1]:50051",
            "echo-1.svc.cluster.local:443",
            "my_host:1",
        ] {
            assert!(is_host_port(good), "{good:?} refused");
        }
    }

    #[test]
    fn empty_value_takes_address_from_key() {
        let r = parse("").unwrap();
        assert_eq!(r.addr, "10.0.0.1:80");
        assert_eq!(r.weight, DEFAULT_WEIGHT);
        assert_eq!(r.health, DeclaredHealth::Healthy);
    }

    #[test]
    fn bare_host_port_value() {
        assert_eq!(parse("127.0.0.1:9000").unwrap().addr, "127.0.0.1:9000");
        assert_eq!(parse("[::1]:9000").unwrap().addr, "[::1]:9000");
    }

    #[test]
    fn weir_json_with_every_field() {
        let r = parse(
            r#"{"addr":"h:1","weight":7,"status":"unhealthy","metadata":{"zone":"a"},"future":1}"#,
        )
        .unwrap();
        assert_eq!(r.addr, "h:1");
        assert_eq!(r.weight, 7);
        assert_eq!(r.health, DeclaredHealth::Unhealthy);
        assert_eq!(r.metadata.get("zone").map(String::as_str), Some("a"));
    }

    #[test]
    fn naming_format() {
        let r =
            parse(r#"{"Op":0,"Addr":"10.1.1.1:50051","Metadata":{"zone":"b","n":3,"weight":25}}"#)
                .unwrap();
        assert_eq!(r.weight, 25);
        assert_eq!(r.addr, "10.1.1.1:50051");
        assert_eq!(r.metadata.get("zone").map(String::as_str), Some("b"));
        assert_eq!(r.metadata.get("n").map(String::as_str), Some("3"));
        let r = parse(r#"{"Addr":"10.1.1.1:50051","Metadata":null}"#).unwrap();
        assert!(r.metadata.is_empty());
        assert!(matches!(
            parse(r#"{"Addr":"10.1.1.1:50051","Metadata":{"weight":"x"}}"#),
            Err(ValueError::Shape(_))
        ));
        assert_eq!(
            parse(r#"{"Op":1,"Addr":"10.1.1.1:50051"}"#),
            Err(ValueError::NamingOp(1))
        );
    }

    #[test]
    fn malformed_values_are_errors() {
        assert!(matches!(parse("{not json"), Err(ValueError::Json(_))));
        assert!(matches!(
            parse(r#"{"addr":""}"#),
            Err(ValueError::Address(_))
        ));
        assert!(matches!(
            parse(r#"{"weight":"heavy"}"#),
            Err(ValueError::Shape(_))
        ));
        assert!(matches!(
            parse(r#"{"weight":-1}"#),
            Err(ValueError::Shape(_))
        ));
        assert!(matches!(
            parse(r#"{"metadata":{"a":1}}"#),
            Err(ValueError::Shape(_))
        ));
        assert!(matches!(
            parse(r#"{"status":"helthy"}"#),
            Err(ValueError::Status(_))
        ));
        assert!(matches!(parse("just words"), Err(ValueError::Address(_))));
        assert!(matches!(parse("host:0"), Err(ValueError::Address(_))));
        assert!(matches!(parse("[]:80"), Err(ValueError::Address(_))));
        assert_eq!(
            parse_value("s", "i", &[0xff, 0xfe]),
            Err(ValueError::ValueNotUtf8)
        );
    }

    #[test]
    fn keys() {
        assert_eq!(
            classify_key("a/b/c/10.0.0.1:1"),
            Ok(KeyKind::Endpoint {
                service: "a/b/c",
                id: "10.0.0.1:1"
            })
        );
        assert_eq!(classify_key("_policies/rr"), Ok(KeyKind::Reserved));
        assert_eq!(classify_key("lonely"), Err(ValueError::KeyShape));
        assert_eq!(classify_key("svc/"), Err(ValueError::KeyShape));
        assert_eq!(classify_key("/id"), Err(ValueError::KeyShape));
    }
}
