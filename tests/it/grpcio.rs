//! weir in front of a gRPC server nobody here wrote: Python grpcio, whose
//! C-core HTTP/2 enforces what tonic does not (ping limits, stream limits)
//! and which stops gracefully with GOAWAY.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::Request;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use weir::example::pb::echo_client::EchoClient;
use weir::example::pb::EchoRequest;

use crate::support::eventually;
use crate::support::gateway::{admin_get, req, wait_active_requests, Env};
use crate::support::grpcio::GrpcioBackend;

async fn channel(env: &Env) -> Channel {
    Channel::from_shared(format!("http://{}", env.gateway().grpc_addr))
        .unwrap()
        .connect()
        .await
        .expect("connect to the gateway")
}

/// A `grpc.health.v1.Health/Watch` through the gateway.
async fn open_watch(env: &Env) -> tonic::Streaming<tonic_health::pb::HealthCheckResponse> {
    HealthClient::new(channel(env).await)
        .watch(HealthCheckRequest::default())
        .await
        .expect("watch starts")
        .into_inner()
}

const HEALTH_ROUTE: &str = "[[route]]\nmatch = \"/grpc.health.v1.Health/\"\nservice = \"py\"\n";
const ECHO_ROUTE: &str = "[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"py\"\n";

/// Regression: weir pinged idle upstream connections every 10 s; C-core
/// allows one ping per 5 minutes and sent GOAWAY ENHANCE_YOUR_CALM after
/// the third, so every quiet stream died at 40 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_health_watch_through_weir_lives_two_minutes() {
    // Health checks off (the extra config lands in `[health_check]`): the
    // watch is the only stream, so the connection is truly quiet.
    let env = Env::start(0, &format!("enabled = false\n{HEALTH_ROUTE}")).await;
    let _py = GrpcioBackend::start(&env.etcd, "py", "py-watch", &[]).await;
    env.wait_endpoints("py", 1).await;
    let mut watch = open_watch(&env).await;
    let first = watch
        .message()
        .await
        .expect("first answer")
        .expect("a message");
    assert_eq!(first.status, 1, "SERVING");
    let quiet = tokio::time::timeout(Duration::from_secs(120), watch.message()).await;
    assert!(
        quiet.is_err(),
        "the quiet stream ended on its own: {quiet:?}"
    );
    // The client cancels; that is the only way it ends.
    drop(watch);
    let (_, m) = admin_get(env.gateway().admin_addr, "/metrics").await;
    assert!(
        !m.lines()
            .any(|l| l.starts_with("weir_upstream_goaways_total") && !l.ends_with(" 0")),
        "no GOAWAY from the backend:\n{m}"
    );
}

/// A backend that finds our pings too frequent gets them half as often.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goaway_enhance_your_calm_makes_weir_ping_that_backend_less() {
    // Health checks off (the extra config lands in `[health_check]`): their
    // traffic would keep the connection from ever being quiet.
    let env = Env::start(
        0,
        &format!("enabled = false\n[upstream]\nkeepalive_interval = \"1s\"\n{HEALTH_ROUTE}"),
    )
    .await;
    let py = GrpcioBackend::start(&env.etcd, "py", "py-calm", &[]).await;
    env.wait_endpoints("py", 1).await;
    let mut watch = open_watch(&env).await;
    watch.message().await.expect("first answer");
    let admin = env.gateway().admin_addr;
    let addr = py.addr.to_string();
    eventually(
        "the backend's keep-alive interval doubled",
        Duration::from_secs(30),
        || {
            let addr = addr.clone();
            async move {
                let (_, services) = admin_get(admin, "/services").await;
                let v: serde_json::Value = serde_json::from_str(&services).unwrap();
                v["py"]["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|e| {
                        e["addr"] == addr.as_str()
                            && e["backend"]["pool"]["keepalive_interval_ms"] == 2000
                            && e["backend"]["pool"]["ping_backoffs"] == 1
                    })
            }
        },
    )
    .await;
    let (_, m) = admin_get(admin, "/metrics").await;
    assert!(
        m.contains(&format!(
            "weir_upstream_ping_backoffs_total{{backend=\"{}\"}} 1",
            py.addr
        )),
        "{m}"
    );
}

/// Regression: the pool handed out a connection whatever its load; past the
/// backend's SETTINGS_MAX_CONCURRENT_STREAMS calls queued without bound
/// inside hyper, behind long ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_limited_to_10_streams_does_not_hold_up_a_plain_call() {
    // Backends named in errors: a failure says what ended the backend's stream
    // (seen once in CI, under the whole suite's load: 5 of 100 long calls
    // UNAVAILABLE "a backend failed before answering").
    let env = Env::start(
        0,
        &format!("[upstream]\nname_backends_in_errors = true\n{ECHO_ROUTE}"),
    )
    .await;
    let _py = GrpcioBackend::start(
        &env.etcd,
        "py",
        "py-limited",
        &["--max-concurrent-streams", "10"],
    )
    .await;
    env.wait_endpoints("py", 1).await;
    let ch = channel(&env).await;
    let mut c = EchoClient::new(ch.clone());
    c.unary(req("warm")).await.expect("a first call");
    let started = Arc::new(AtomicU64::new(0));
    let mut long = Vec::new();
    for i in 0..100 {
        let mut c = EchoClient::new(ch.clone());
        let started = started.clone();
        long.push(tokio::spawn(async move {
            let mut r = Request::new(EchoRequest {
                delay_ms: 4_000,
                ..req(&format!("long {i}"))
            });
            r.set_timeout(Duration::from_secs(30));
            started.fetch_add(1, Ordering::Relaxed);
            c.unary(r).await
        }));
    }
    while started.load(Ordering::Relaxed) < 100 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_active_requests(
        env.gateway().admin_addr,
        100,
        "all 100 long calls sent to the backend",
    )
    .await;
    // Another client (its own connection: the gateway gives each client
    // connection 100 streams, and the long calls hold them). Queued behind
    // them, it would wait their 4 s.
    let mut c = EchoClient::new(channel(&env).await);
    let began = Instant::now();
    let mut plain = Request::new(req("plain"));
    plain.set_timeout(Duration::from_secs(3));
    let answer = c.unary(plain).await;
    let took = began.elapsed();
    assert!(
        answer.is_ok(),
        "the plain call answered: {answer:?} after {took:?}"
    );
    let mut failed = Vec::new();
    for call in long {
        if let Err(e) = call.await.unwrap() {
            failed.push(e);
        }
    }
    assert!(
        failed.is_empty(),
        "every long call answered too (more connections, not a queue): {} failed: {failed:?}",
        failed.len()
    );
    let (_, services) = admin_get(env.gateway().admin_addr, "/services").await;
    let v: serde_json::Value = serde_json::from_str(&services).unwrap();
    let pool = &v["py"]["endpoints"][0]["backend"]["pool"];
    assert_eq!(
        pool["stream_limit"], 10,
        "the backend's limit was learned: {pool}"
    );
}

/// Regression: only a GOAWAY with NO_ERROR was read as "not processed", so a
/// rolling restart failed calls on routes that are not idempotent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_backend_stopped_gracefully_under_load_fails_no_call() {
    let env = Env::start(0, ECHO_ROUTE).await;
    let leaving = GrpcioBackend::start(&env.etcd, "py", "py-leaving", &["--grace", "5"]).await;
    let _staying = GrpcioBackend::start(&env.etcd, "py", "py-staying", &[]).await;
    env.wait_endpoints("py", 2).await;
    let ch = channel(&env).await;
    let failed = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let stop = tokio_util::sync::CancellationToken::new();
    let mut workers = Vec::new();
    for w in 0..8 {
        let mut c = EchoClient::new(ch.clone());
        let (failed, done, stop) = (failed.clone(), done.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.is_cancelled() {
                let r = Request::new(EchoRequest {
                    delay_ms: 20,
                    ..req(&format!("w{w}"))
                });
                match c.unary(r).await {
                    Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        }));
    }
    eventually("traffic flows", Duration::from_secs(10), || {
        let done = done.clone();
        async move { done.load(Ordering::Relaxed) > 100 }
    })
    .await;
    leaving.stop_gracefully();
    let at_stop = done.load(Ordering::Relaxed);
    eventually(
        "traffic keeps flowing after the stop",
        Duration::from_secs(20),
        || {
            let done = done.clone();
            async move { done.load(Ordering::Relaxed) > at_stop + 300 }
        },
    )
    .await;
    stop.cancel();
    let mut errors = Vec::new();
    for w in workers {
        errors.extend(w.await.unwrap());
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no call failed across the graceful stop: {errors:?}"
    );
}
