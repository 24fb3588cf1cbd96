//! The signals operators and policies read, checked against what happened:
//! one count per call, series that leave with their backend, ejection of a
//! backend that accepts calls and then says nothing.

use std::time::Duration;

use tonic::{Code, Request};

use crate::support::gateway::{admin_get, raw_call, req, Env};
use crate::support::{client, eventually, key};

const ROUTE: &str = "[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\n";

/// The sum of a counter family's samples (`name` without `_total`).
fn sum(metrics: &str, name: &str) -> u64 {
    let prefix = format!("{name}_total{{");
    metrics
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Regression: a failed call was counted twice (under its backend and under
/// `backend="-"`), and calls the gateway answered itself had no duration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_call_adds_exactly_one_to_the_calls_count_however_it_ends() {
    // Health checks off (the extra config lands in `[health_check]`), so
    // the dead endpoints stay candidates and every call retries.
    let mut env = Env::start(0, &format!("enabled = false\n{ROUTE}retries = 2\n")).await;
    env.add_backend("echo", "live", 100).await;
    let mut etcd = client(&env.etcd).await;
    for port in 1..=2 {
        etcd.put(key("echo", &format!("127.0.0.1:{port}")), "", None)
            .await
            .unwrap();
    }
    env.wait_endpoints("echo", 3).await;
    let admin = env.gateway().admin_addr;
    let mut c = env.client().await;
    let metrics = || async move { admin_get(admin, "/metrics").await.1 };

    // A call that fails at the gateway after attempts on dead endpoints.
    env.backend(0).set_failing(Code::Unavailable as u32);
    let before = metrics().await;
    let err = c.unary(req("fails")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    let after = metrics().await;
    assert_eq!(
        sum(&after, "weir_calls") - sum(&before, "weir_calls"),
        1,
        "one failed call, one count:\n{after}"
    );
    let duration = "weir_call_duration_seconds_count{service=\"echo\"} ";
    assert_eq!(sample(&after, duration) - sample(&before, duration), 1);
    assert!(
        sum(&after, "weir_attempts") > sum(&before, "weir_attempts"),
        "its attempts are counted on their own:\n{after}"
    );

    // A call that succeeds, one that misses its deadline at the gateway,
    // and one that matches no service: one count each.
    env.backend(0).set_failing(0);
    for _ in 0..20 {
        // The dead endpoints may be picked (and retried) first.
        if c.unary(req("ok")).await.is_ok() {
            break;
        }
    }
    let before = metrics().await;
    let ok = c.unary(req("ok")).await;
    env.backend(0).set_slow(Duration::from_secs(5));
    let mut slow = Request::new(req("slow"));
    slow.set_timeout(Duration::from_millis(300));
    let late = c.unary(slow).await;
    let unrouted = raw_call(
        env.gateway().grpc_addr,
        "POST",
        "/nowhere.Service/Call",
        &[("content-type", "application/grpc")],
        &[],
    )
    .await;
    assert_eq!(unrouted.grpc_status(), Some(Code::Unimplemented as u32));
    // The late call ends at the gateway when the client's reset (its own
    // timer fired too) or the gateway's deadline gets there: wait for it.
    let ended = || async { sum(&metrics().await, "weir_calls") - sum(&before, "weir_calls") >= 3 };
    crate::support::eventually("the three calls counted", Duration::from_secs(10), ended).await;
    let after = metrics().await;
    assert_eq!(
        sum(&after, "weir_calls") - sum(&before, "weir_calls"),
        3,
        "three calls, three counts ({ok:?}, {late:?}):\n{after}"
    );
}

/// Regression: 17 series per (service, backend) were made and never
/// removed, so every rollout with new addresses added series for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_leaves_takes_its_series_with_it() {
    let mut env = Env::start(2, ROUTE).await;
    let admin = env.gateway().admin_addr;
    let mut c = env.client().await;
    for _ in 0..10 {
        c.unary(req("x")).await.expect("call");
    }
    let leaving = env.backend(1).addr.to_string();
    let staying = env.backend(0).addr.to_string();
    let series_of = |m: &str, addr: &str| -> Vec<String> {
        m.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&format!("\"{addr}\"")))
            .map(str::to_owned)
            .collect()
    };
    eventually("series for both backends", Duration::from_secs(10), || {
        let (leaving, staying) = (leaving.clone(), staying.clone());
        async move {
            let m = admin_get(admin, "/metrics").await.1;
            let l = series_of(&m, &leaving);
            l.iter().any(|s| s.starts_with("weir_calls_total"))
                && l.iter().any(|s| s.starts_with("weir_health_checks_total"))
                && !series_of(&m, &staying).is_empty()
        }
    })
    .await;

    let (backend, registration) = env.backends.remove(1);
    registration.deregister().await.expect("deregister");
    env.wait_endpoints("echo", 1).await;
    for _ in 0..5 {
        c.unary(req("x")).await.expect("call");
    }
    eventually(
        "no series of the backend that left",
        Duration::from_secs(10),
        || {
            let leaving = leaving.clone();
            async move {
                let m = admin_get(admin, "/metrics").await.1;
                series_of(&m, &leaving).is_empty()
            }
        },
    )
    .await;
    let m = admin_get(admin, "/metrics").await.1;
    assert!(
        series_of(&m, &staying)
            .iter()
            .any(|s| s.starts_with("weir_calls_total")),
        "the other backend keeps its series:\n{m}"
    );
    drop(backend);
}

/// Regression: a DEADLINE_EXCEEDED the gateway enforced counted as a
/// success, so a backend that accepts calls and then says nothing was
/// never ejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_accepts_then_hangs_is_ejected() {
    // The gateway's own deadline (the route's max_duration), not the
    // client's: a client that times out at the same moment resets the call
    // first about half the time, and a call the client left says nothing of
    // the backend.
    let env = Env::start(
        2,
        &format!("enabled = false\n[outlier]\nconsecutive_failures = 3\n{ROUTE}max_duration = \"300ms\"\n"),
    )
    .await;
    let admin = env.gateway().admin_addr;
    let hanging = env.backend(1).addr.to_string();
    env.backend(1).set_slow(Duration::from_secs(30));
    let mut c = env.client().await;
    for _ in 0..12 {
        let _ = c.unary(Request::new(req("x"))).await;
    }
    let (_, services) = admin_get(admin, "/services").await;
    let v: serde_json::Value = serde_json::from_str(&services).unwrap();
    let endpoint = v["echo"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["addr"] == hanging.as_str())
        .cloned()
        .unwrap_or_default();
    assert_eq!(endpoint["backend"]["ejected"], true, "{services}");
    let (_, m) = admin_get(admin, "/metrics").await;
    assert_eq!(
        sample(
            &m,
            &format!("weir_ejections_total{{backend=\"{hanging}\"}} ")
        ),
        1,
        "{m}"
    );
    // Calls now go to the healthy one.
    for _ in 0..5 {
        let mut r = Request::new(req("x"));
        r.set_timeout(Duration::from_secs(5));
        c.unary(r).await.expect("the healthy backend answers");
    }
}

/// Client-facing messages name the service; the backend's address only when
/// `upstream.name_backends_in_errors` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_addresses_reach_clients_only_when_configured() {
    let env = Env::start(
        0,
        &format!("enabled = false\n[upstream]\nname_backends_in_errors = true\n{ROUTE}"),
    )
    .await;
    let mut etcd = client(&env.etcd).await;
    etcd.put(key("echo", "127.0.0.1:1"), "", None)
        .await
        .unwrap();
    env.wait_endpoints("echo", 1).await;
    let mut c = env.client().await;
    let err = c.unary(req("x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("127.0.0.1:1"), "{}", err.message());
}
