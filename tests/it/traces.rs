//! Traces, checked at a receiver nobody here wrote: the OTLP TraceService
//! of PyPI's `opentelemetry-proto`, served by grpcio
//! (`tests/python/otlp_collector.py`), fed by a real `weir serve`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use weir::example::pb::echo_client::EchoClient;
use weir::example::pb::EchoRequest;
use weir::testkit::Etcd;

use crate::support::process::WeirServe;
use crate::support::PREFIX;

/// The Python OTLP receiver, and the spans it has printed.
struct Collector {
    child: Child,
    port: u16,
    spans: Arc<Mutex<Vec<Value>>>,
}

impl Collector {
    fn start() -> Collector {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = crate::support::venv_python();
        let mut child = Command::new(python)
            .arg(root.join("tests/python/otlp_collector.py"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("the collector starts").unwrap();
        let port = first
            .strip_prefix("listening on ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line: {first}"));
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let span = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                kept.lock().unwrap().push(span);
            }
        });
        Collector { child, port, spans }
    }

    fn spans(&self) -> Vec<Value> {
        self.spans.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or("")
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

/// The trace id and parent span id of a `traceparent`.
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].to_owned(), parts[2].to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_a_server_span_with_its_attempts_and_continues_the_clients_trace() {
    let etcd = Etcd::start();
    let (echo_a, _reg_a) = crate::support::registered_echo(&etcd, PREFIX, "a").await;
    let (echo_b, _reg_b) = crate::support::registered_echo(&etcd, PREFIX, "b").await;
    // A registered instance nothing listens on: a call picked for it is
    // refused at connect and retried on another (two attempt spans).
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let spec = weir::register::RegistrationSpec::new(PREFIX, "echo", &dead.to_string());
    let mut reg_dead =
        weir::register::Registration::spawn(crate::support::client(&etcd).await, spec).unwrap();
    reg_dead.registered().await;
    let collector = Collector::start();
    let gateway = WeirServe::start(&format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworker_threads = 1\n\
         [tracing]\notlp_endpoint = \"http://127.0.0.1:{}\"\nsample_ratio = 1.0\nservice_name = \"edge-test\"\n\
         [health_check]\nenabled = false\n\
         [etcd]\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\n\
         [[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\n",
        collector.port,
        etcd.endpoint(0)
    ));
    let mut c = EchoClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .unwrap();

    // N calls without a traceparent: N server spans, each with its attempts.
    const N: usize = 20;
    for i in 0..N {
        c.unary(EchoRequest {
            message: format!("call {i}"),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("call {i}: {e}"));
    }
    let server_spans = |spans: &[Value]| -> Vec<Value> {
        spans
            .iter()
            .filter(|s| text(s, "kind") == "SERVER")
            .cloned()
            .collect()
    };
    crate::support::eventually(
        "a server span per call at the receiver",
        Duration::from_secs(30),
        || async { server_spans(&collector.spans()).len() >= N },
    )
    .await;
    let spans = collector.spans();
    let servers = server_spans(&spans);
    assert_eq!(servers.len(), N, "one server span per call: {servers:#?}");
    let live = [echo_a.addr.to_string(), echo_b.addr.to_string()];
    let mut retried = 0;
    for server in &servers {
        assert_eq!(text(server, "name"), "weir.example.v1.Echo/Unary");
        assert_eq!(text(server, "service"), "edge-test");
        assert_eq!(
            text(server, "parent_span_id"),
            "",
            "a root: no client parent"
        );
        assert_eq!(attr(server, "rpc.system"), "grpc");
        assert_eq!(attr(server, "rpc.service"), "weir.example.v1.Echo");
        assert_eq!(attr(server, "rpc.method"), "Unary");
        assert_eq!(attr(server, "rpc.grpc.status_code"), 0);
        assert_eq!(attr(server, "weir.route"), "/weir.example.v1.Echo/");
        assert_eq!(attr(server, "weir.service"), "echo");
        assert_eq!(attr(server, "weir.policy"), "round-robin");
        assert_eq!(attr(server, "weir.fallback"), false);
        assert!(attr(server, "client.port").as_i64().is_some(), "{server:#}");
        let backend = attr(server, "weir.backend").as_str().unwrap_or("");
        assert!(live.iter().any(|a| a == backend), "{server:#}");
        let attempts: Vec<&Value> = spans
            .iter()
            .filter(|s| {
                text(s, "kind") == "CLIENT"
                    && text(s, "trace_id") == text(server, "trace_id")
                    && text(s, "parent_span_id") == text(server, "span_id")
            })
            .collect();
        let n = attr(server, "weir.attempts").as_i64().unwrap();
        assert_eq!(attempts.len() as i64, n, "attempt spans of {server:#}");
        let mut attempts = attempts;
        attempts.sort_by_key(|s| attr(s, "weir.attempt").as_i64());
        let last = attempts.last().unwrap();
        assert_eq!(attr(last, "rpc.grpc.status_code"), 0);
        assert_eq!(text(last, "name"), "weir.example.v1.Echo/Unary");
        if n > 1 {
            retried += 1;
            let first = attempts[0];
            assert_eq!(first["status"]["code"], "ERROR", "{first:#}");
            assert_eq!(attr(first, "server.address"), "127.0.0.1");
            assert_eq!(attr(first, "server.port"), i64::from(dead.port()));
            let events = server["events"].as_array().unwrap();
            assert!(
                events.iter().any(|e| e["name"] == "retry"
                    && !text(&e["attributes"], "weir.retry.reason").is_empty()),
                "the retry and its reason on the call's span: {server:#}"
            );
        }
    }
    assert!(
        retried >= 1,
        "no call met the dead instance first in {N} round-robin calls"
    );

    // A client's sampled traceparent: the gateway's span is its child, and
    // the backend's parent is the gateway's attempt span.
    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let mut request = tonic::Request::new(EchoRequest::default());
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{client_trace}-{client_span}-01")
            .parse()
            .unwrap(),
    );
    request
        .metadata_mut()
        .insert("tracestate", "vendor=opaque".parse().unwrap());
    let reply = c.unary(request).await.unwrap();
    let seen = reply
        .metadata()
        .get("x-seen-traceparent")
        .expect("the backend got a traceparent")
        .to_str()
        .unwrap()
        .to_owned();
    let (seen_trace, seen_parent) = ids(&seen);
    assert_eq!(seen_trace, client_trace, "the client's trace goes on");
    assert_eq!(
        reply
            .metadata()
            .get("x-seen-tracestate")
            .map(|v| v.to_str().unwrap()),
        Some("vendor=opaque"),
        "the client's tracestate goes on"
    );
    crate::support::eventually(
        "the traced call's spans at the receiver",
        Duration::from_secs(30),
        || async {
            collector
                .spans()
                .iter()
                .any(|s| text(s, "span_id") == seen_parent)
        },
    )
    .await;
    let spans = collector.spans();
    let by_id: HashMap<&str, &Value> = spans.iter().map(|s| (text(s, "span_id"), s)).collect();
    let attempt = by_id[seen_parent.as_str()];
    assert_eq!(
        text(attempt, "kind"),
        "CLIENT",
        "the backend's parent is the attempt"
    );
    let server = by_id
        .get(text(attempt, "parent_span_id"))
        .expect("the attempt's parent was exported");
    assert_eq!(text(server, "kind"), "SERVER");
    assert_eq!(text(server, "trace_id"), client_trace);
    assert_eq!(
        text(server, "parent_span_id"),
        client_span,
        "the client's span is the gateway's span's parent"
    );

    // An unsampled client traceparent: not traced, passed on as it came.
    let unsampled_trace = "0af7651916cd43dd8448eb211c80319c";
    let unsampled = format!("00-{unsampled_trace}-b7ad6b7169203331-00");
    let mut request = tonic::Request::new(EchoRequest::default());
    request
        .metadata_mut()
        .insert("traceparent", unsampled.parse().unwrap());
    let reply = c.unary(request).await.unwrap();
    assert_eq!(
        reply.metadata().get("x-seen-traceparent").unwrap(),
        unsampled.as_str()
    );
    // Traced calls without a tracestate send none (not an empty one).
    let reply = c.unary(EchoRequest::default()).await.unwrap();
    assert!(reply.metadata().get("x-seen-traceparent").is_some());
    assert!(reply.metadata().get("x-seen-tracestate").is_none());
    // Every span sent so far is at the receiver (`exported` counts them).
    let exported = || async {
        let (_, metrics) = crate::support::gateway::admin_get(gateway.admin_addr, "/metrics").await;
        metrics
            .lines()
            .find_map(|l| l.strip_prefix("weir_trace_spans_exported_total "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0)
    };
    crate::support::eventually(
        "the export of the last spans",
        Duration::from_secs(30),
        || async { exported().await == collector.spans().len() && exported().await > 0 },
    )
    .await;
    assert!(
        !collector
            .spans()
            .iter()
            .any(|s| text(s, "trace_id") == unsampled_trace),
        "a call whose client said not sampled was traced"
    );
    drop(reg_dead);
}

/// An unreachable collector costs spans, counted, and never a call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_collector_drops_spans_and_counts_them_while_calls_succeed() {
    let etcd = Etcd::start();
    let (_echo, _reg) = crate::support::registered_echo(&etcd, PREFIX, "a").await;
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let gateway = WeirServe::start(&format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworker_threads = 1\n\
         [tracing]\notlp_endpoint = \"http://{nobody}\"\nsample_ratio = 1.0\nexport_timeout = \"1s\"\n\
         [etcd]\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\n\
         [[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\n",
        etcd.endpoint(0)
    ));
    let mut c = EchoClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .unwrap();
    for i in 0..50 {
        c.unary(EchoRequest::default())
            .await
            .unwrap_or_else(|e| panic!("call {i} failed with the collector away: {e}"));
    }
    let dropped = || async {
        let (_, metrics) = crate::support::gateway::admin_get(gateway.admin_addr, "/metrics").await;
        metrics
            .lines()
            .filter(|l| l.starts_with("weir_trace_spans_dropped_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    // 50 calls, each a server span and an attempt span.
    crate::support::eventually(
        "100 spans counted as dropped",
        Duration::from_secs(30),
        || async { dropped().await == 100 },
    )
    .await;
}
