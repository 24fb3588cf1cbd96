//! Client-side mode: a `weir::client::Channel` inside the test process,
//! given to tonic clients, with a real etcd, real backends (in-process tonic
//! ones, and grpcio processes) and real policy components — no gateway.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::metadata::MetadataValue;
use weir::client::Channel;
use weir::example::pb::echo_client::EchoClient;
use weir::example::pb::EchoRequest;
use weir::example::EchoBackend;
use weir::register::{Registration, RegistrationSpec};
use weir::testkit::Etcd;

use crate::policy::policy_file;
use crate::support::gateway::req;
use crate::support::grpcio::GrpcioBackend;
use crate::support::{client, eventually, PREFIX};

/// An echo backend registered as `service` with `weight`.
async fn backend(
    etcd: &Etcd,
    service: &str,
    name: &str,
    weight: u32,
) -> (EchoBackend, Registration) {
    let echo = EchoBackend::start(name).await.expect("echo backend");
    let mut spec = RegistrationSpec::new(PREFIX, service, &echo.addr.to_string());
    spec.weight = weight;
    let mut registration = Registration::spawn(client(etcd).await, spec).expect("registration");
    registration.registered().await;
    (echo, registration)
}

/// Echo backends `a` and `b`, registered as service `echo`, equal weights.
async fn two_backends(etcd: &Etcd) -> [(EchoBackend, Registration); 2] {
    [
        backend(etcd, "echo", "a", 100).await,
        backend(etcd, "echo", "b", 100).await,
    ]
}

fn builder(etcd: &Etcd, service: &str) -> weir::client::Builder {
    Channel::builder(etcd.endpoints(), PREFIX, service)
}

/// The value of the metric line that starts with `series ` in `channel`'s metrics.
fn metric(channel: &Channel, series: &str) -> Option<f64> {
    channel.metrics().lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Which instance answered each of `calls` sequential calls.
async fn spread(channel: &Channel, calls: usize) -> BTreeMap<String, usize> {
    let mut c = EchoClient::new(channel.clone());
    let mut seen = BTreeMap::new();
    for _ in 0..calls {
        let instance = c
            .unary(req("spread"))
            .await
            .expect("call")
            .into_inner()
            .instance;
        *seen.entry(instance).or_default() += 1;
    }
    seen
}

/// Calls made by a set of workers until stopped.
struct Load {
    ok: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<tonic::Status>>>,
    by_instance: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    stop: CancellationToken,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    /// `workers` loops of unary calls (each `delay_ms` long at its backend).
    fn start(channel: &Channel, workers: usize, delay_ms: u32) -> Load {
        let load = Load {
            ok: Arc::default(),
            failed: Arc::default(),
            by_instance: Arc::default(),
            stop: CancellationToken::new(),
            workers: Vec::new(),
        };
        let mut handles = Vec::new();
        for _ in 0..workers {
            let mut c = EchoClient::new(channel.clone());
            let (ok, failed, by_instance, stop) = (
                load.ok.clone(),
                load.failed.clone(),
                load.by_instance.clone(),
                load.stop.clone(),
            );
            handles.push(tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let mut request = tonic::Request::new(EchoRequest {
                        delay_ms,
                        ..req("load")
                    });
                    request.set_timeout(Duration::from_secs(10));
                    match c.unary(request).await {
                        Ok(reply) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            let instance = reply.into_inner().instance;
                            *by_instance.lock().unwrap().entry(instance).or_default() += 1;
                        }
                        Err(status) => failed.lock().unwrap().push(status),
                    }
                }
            }));
        }
        Load {
            workers: handles,
            ..load
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    fn calls_to(&self, instance: &str) -> u64 {
        self.by_instance
            .lock()
            .unwrap()
            .get(instance)
            .copied()
            .unwrap_or(0)
    }

    /// Stops the workers; the calls that succeeded and the failures.
    async fn stop(self) -> (u64, Vec<tonic::Status>) {
        self.stop.cancel();
        for w in self.workers {
            w.await.unwrap();
        }
        let failed = std::mem::take(&mut *self.failed.lock().unwrap());
        (self.ok.load(Ordering::Relaxed), failed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spread_follows_round_robin_weighted_and_least_conn() {
    let etcd = Etcd::start();
    let mut kept = Vec::new();
    for name in ["a", "b", "c"] {
        kept.push(backend(&etcd, "rr", name, 100).await);
    }
    kept.push(backend(&etcd, "w", "light", 100).await);
    kept.push(backend(&etcd, "w", "heavy", 300).await);
    kept.push(backend(&etcd, "lc", "fast", 100).await);
    kept.push(backend(&etcd, "lc", "slow", 100).await);

    // Native round-robin: exact.
    let rr = builder(&etcd, "rr").connect().await.expect("channel");
    let seen = spread(&rr, 300).await;
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|n| (99..=101).contains(n)), "{seen:?}");

    // The weighted component: 1:3 (800 random picks; 50 is over 4 sigma).
    // Picks get 200 ms: one that missed the 1 ms default on this busy
    // machine would fall back to round-robin and blur the spread.
    let weighted = builder(&etcd, "w")
        .policy_file(policy_file("weighted"))
        .pick_deadline(Duration::from_millis(200))
        .connect()
        .await
        .expect("channel");
    let seen = spread(&weighted, 800).await;
    let heavy = seen.get("heavy").copied().unwrap_or(0);
    assert!((550..=650).contains(&heavy), "weights 100:300 → {seen:?}");

    // The least-conn component keeps calls off the slow instance: it
    // always has calls in flight when a new one is placed.
    kept[6].0.set_slow(Duration::from_millis(50));
    let lc = builder(&etcd, "lc")
        .policy_file(policy_file("least-conn"))
        .pick_deadline(Duration::from_millis(200))
        .connect()
        .await
        .expect("channel");
    let load = Load::start(&lc, 8, 0);
    eventually("400 calls", Duration::from_secs(30), || async {
        load.ok() >= 400
    })
    .await;
    let (fast, slow) = (load.calls_to("fast"), load.calls_to("slow"));
    let (_, failed) = load.stop().await;
    assert!(failed.is_empty(), "{failed:?}");
    assert!(
        slow * 4 < fast,
        "least-conn favours the fast instance: fast {fast}, slow {slow}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_registered_while_calls_flow_gets_calls_within_a_second() {
    let etcd = Etcd::start();
    let _first = backend(&etcd, "echo", "first", 100).await;
    let channel = builder(&etcd, "echo").connect().await.expect("channel");
    let load = Load::start(&channel, 4, 0);
    eventually("calls flowing", Duration::from_secs(10), || async {
        load.ok() > 50
    })
    .await;
    let _late = backend(&etcd, "echo", "late", 100).await;
    let registered = Instant::now();
    eventually(
        "calls to the late backend",
        Duration::from_secs(10),
        || async { load.calls_to("late") > 0 },
    )
    .await;
    let took = registered.elapsed();
    let (_, failed) = load.stop().await;
    assert!(failed.is_empty(), "{failed:?}");
    // The goal is within a second (a watch event, then the next pick); the
    // bound leaves room for a machine busy with the rest of the suite.
    eprintln!("the late backend got its first call {took:?} after it was registered");
    assert!(
        took < Duration::from_secs(3),
        "the late backend got its first call {took:?} after it was registered"
    );
}

/// Python grpcio backends, one SIGKILLed while calls flow: on an idempotent
/// channel the calls it had in flight are sent again, and none fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_sigkilled_under_load_loses_no_idempotent_call() {
    let etcd = Etcd::start();
    let mut victim = GrpcioBackend::start(&etcd, "py", "py-victim", &[]).await;
    let _others = [
        GrpcioBackend::start(&etcd, "py", "py-1", &[]).await,
        GrpcioBackend::start(&etcd, "py", "py-2", &[]).await,
    ];
    let channel = builder(&etcd, "py")
        .idempotent(true)
        .connect()
        .await
        .expect("channel");
    let load = Load::start(&channel, 8, 20);
    eventually(
        "calls on every backend",
        Duration::from_secs(20),
        || async {
            ["py-victim", "py-1", "py-2"]
                .iter()
                .all(|b| load.calls_to(b) > 10)
        },
    )
    .await;
    victim.kill();
    let after = load.ok();
    eventually("calls after the kill", Duration::from_secs(20), || async {
        load.ok() > after + 200
    })
    .await;
    let (_, failed) = load.stop().await;
    assert!(failed.is_empty(), "no call failed: {failed:?}");
    // Sent again: the calls in flight on the killed backend (which only an
    // idempotent channel may resend), and those refused by its closed port
    // while its registration stays.
    let retried = metric(&channel, "weir_retries_total{service=\"py\"}").unwrap_or(0.0);
    assert!(retried >= 1.0, "calls were sent again: {retried}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_published_through_etcd_under_load_swaps_with_zero_failed_calls() {
    let etcd = Etcd::start();
    let mut kept = Vec::new();
    for name in ["a", "b", "c"] {
        kept.push(backend(&etcd, "echo", name, 100).await);
    }
    // No version of "pick" yet: calls are spread by the round-robin fallback.
    // A pick that missed its deadline on this busy machine would fall back
    // to round-robin and spread the calls this test counts on one instance.
    let channel = builder(&etcd, "echo")
        .policy("pick")
        .pick_deadline(Duration::from_millis(200))
        .connect()
        .await
        .expect("channel");
    let load = Load::start(&channel, 4, 0);
    eventually(
        "calls on every backend",
        Duration::from_secs(10),
        || async { ["a", "b", "c"].iter().all(|b| load.calls_to(b) > 20) },
    )
    .await;
    let mut etcd_client = client(&etcd).await;
    let key = format!("{PREFIX}/_policies/pick");
    // `testing` places every call on the first candidate.
    etcd_client
        .put(
            key.clone(),
            std::fs::read(policy_file("testing")).unwrap(),
            None,
        )
        .await
        .unwrap();
    let reloads = "weir_policy_reloads_total{policy=\"pick\",result=\"ok\"}";
    eventually(
        "the first version installed",
        Duration::from_secs(10),
        || async { metric(&channel, reloads) == Some(1.0) },
    )
    .await;
    let mut c = EchoClient::new(channel.clone());
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        seen.insert(c.unary(req("pinned")).await.unwrap().into_inner().instance);
    }
    assert_eq!(seen.len(), 1, "one instance takes every call: {seen:?}");
    // And swapped again, to least-conn, while the load goes on.
    etcd_client
        .put(key, std::fs::read(policy_file("least-conn")).unwrap(), None)
        .await
        .unwrap();
    eventually(
        "the second version installed",
        Duration::from_secs(10),
        || async { metric(&channel, reloads) == Some(2.0) },
    )
    .await;
    let before = load.ok();
    eventually("calls after the swaps", Duration::from_secs(10), || async {
        load.ok() > before + 100
    })
    .await;
    let (ok, failed) = load.stop().await;
    assert!(
        failed.is_empty(),
        "no call failed across the swaps: {failed:?}"
    );
    assert!(ok > 200, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_for_ten_seconds_under_load_fails_no_call() {
    let mut etcd = Etcd::start();
    let _kept = two_backends(&etcd).await;
    let channel = builder(&etcd, "echo").connect().await.expect("channel");
    let load = Load::start(&channel, 4, 1);
    eventually("calls flowing", Duration::from_secs(10), || async {
        load.ok() > 50
    })
    .await;
    etcd.stop();
    let down = load.ok();
    // The outage itself is what is tested: ten seconds without etcd.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let during = load.ok() - down;
    etcd.restart();
    let back = load.ok();
    eventually(
        "calls after etcd came back",
        Duration::from_secs(10),
        || async { load.ok() > back + 50 },
    )
    .await;
    let (both, a, b) = (load.ok(), load.calls_to("a"), load.calls_to("b"));
    let (_, failed) = load.stop().await;
    assert!(failed.is_empty(), "no call failed: {failed:?}");
    assert!(during > 500, "calls flowed while etcd was down: {during}");
    assert!(
        a > 0 && b > 0,
        "both backends kept their calls: {a} + {b} of {both}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_policy_falls_back_and_the_next_call_uses_it_again() {
    let etcd = Etcd::start();
    let _kept = two_backends(&etcd).await;
    let channel = builder(&etcd, "echo")
        .policy_file(policy_file("testing"))
        .pick_deadline(Duration::from_millis(200))
        .connect()
        .await
        .expect("channel");
    let mut c = EchoClient::new(channel.clone());
    let mut trapping = tonic::Request::new(req("trap"));
    trapping
        .metadata_mut()
        .insert("x-policy-test", MetadataValue::from_static("trap"));
    c.unary(trapping)
        .await
        .expect("the call fell back and succeeded");
    assert_eq!(
        metric(
            &channel,
            "weir_policy_faults_total{policy=\"testing\",kind=\"trap\"}"
        ),
        Some(1.0),
        "{}",
        channel.metrics()
    );
    // The policy serves the next call (a fresh instance): `testing` places
    // every call on the first candidate.
    let seen = spread(&channel, 20).await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(channel
        .metrics()
        .contains("weir_policy_picks_total{policy=\"testing\"}"));
}

/// The example binary against Python grpcio health servers, with the
/// native policy and a WebAssembly component from a file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_calls_grpcio_health_servers_through_a_client_side_channel() {
    let etcd = Etcd::start();
    let _servers = [
        GrpcioBackend::start(&etcd, "health", "py-a", &[]).await,
        GrpcioBackend::start(&etcd, "health", "py-b", &[]).await,
    ];
    let bin = Path::new(env!("CARGO_BIN_EXE_weir")).parent().unwrap();
    let example = bin.join("examples/client_side");
    assert!(
        example.exists(),
        "{} is missing: `make test` builds the examples",
        example.display()
    );
    let least_conn = policy_file("least-conn");
    for policy in ["round-robin", least_conn.to_str().unwrap()] {
        let endpoints = etcd.endpoints().join(",");
        let out = tokio::task::spawn_blocking({
            let example = example.clone();
            let policy = policy.to_owned();
            move || {
                Command::new(&example)
                    .args(["--etcd", &endpoints, "--prefix", PREFIX])
                    .args(["--service", "health", "--calls", "300"])
                    .args(["--concurrency", "4", "--policy", &policy])
                    .output()
                    .expect("the example runs")
            }
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let report = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{policy}: {report}");
        let last: serde_json::Value =
            serde_json::from_str(stdout.lines().last().unwrap_or("")).expect(&report);
        assert_eq!(last["ok"], 300, "{policy}: {report}");
        assert_eq!(last["failed"], 0, "{policy}: {report}");
        assert_eq!(
            last["by_status"],
            serde_json::json!({"OK": 300}),
            "{report}"
        );
        let (p50, p99) = (
            last["p50_ms"].as_f64().unwrap(),
            last["p99_ms"].as_f64().unwrap(),
        );
        assert!(p50 > 0.0 && p50 <= p99, "{report}");
    }
}

/// A caller's deadline holds through the channel: a call to a backend that
/// answers too late ends DEADLINE_EXCEEDED at its deadline, not the backend's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_deadline_ends_a_call_the_backend_is_slow_to_answer() {
    let etcd = Etcd::start();
    let _kept = backend(&etcd, "echo", "slow", 100).await;
    let channel = builder(&etcd, "echo").connect().await.expect("channel");
    let mut c = EchoClient::new(channel.clone());
    let mut request = tonic::Request::new(EchoRequest {
        delay_ms: 5_000,
        ..req("late")
    });
    request.set_timeout(Duration::from_millis(300));
    let began = Instant::now();
    let status = c
        .unary(request)
        .await
        .expect_err("the deadline passes first");
    assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "ended at the caller's deadline, not the backend's answer: {:?}",
        began.elapsed()
    );
}

/// With a snapshot, a channel starts while etcd is down and calls the
/// instances it last knew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_with_a_snapshot_starts_and_serves_while_etcd_is_down() {
    let mut etcd = Etcd::start();
    let _kept = two_backends(&etcd).await;
    let dir = tempfile::tempdir().unwrap();
    let snapshot = dir.path().join("instances.json");
    let first = builder(&etcd, "echo")
        .snapshot(&snapshot)
        .connect()
        .await
        .expect("channel");
    assert_eq!(spread(&first, 4).await.len(), 2);
    eventually("the snapshot written", Duration::from_secs(10), || async {
        std::fs::read_to_string(&snapshot).is_ok_and(|s| s.contains("echo"))
    })
    .await;
    drop(first);
    etcd.stop();
    let second = builder(&etcd, "echo")
        .snapshot(&snapshot)
        .ready_timeout(Duration::from_secs(5))
        .connect()
        .await
        .expect("a channel from the snapshot");
    let seen = spread(&second, 10).await;
    assert_eq!(seen.len(), 2, "both instances from the snapshot: {seen:?}");
    // Without a snapshot, no channel: connect says why.
    let none = builder(&etcd, "echo")
        .ready_timeout(Duration::from_secs(1))
        .connect()
        .await;
    assert!(
        matches!(none, Err(weir::client::ConnectError::NotReady { .. })),
        "{:?}",
        none.err()
    );
}

/// The last clone dropped, the channel's watches end: nothing of it is left
/// running in the caller's process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_clone_stops_the_channels_watches() {
    let etcd = Etcd::start();
    let _kept = backend(&etcd, "echo", "a", 100).await;
    let before = etcd.watch_streams(0);
    let channel = builder(&etcd, "echo").connect().await.expect("channel");
    let clone = channel.clone();
    eventually(
        "the channel's watches open",
        Duration::from_secs(10),
        || async { etcd.watch_streams(0) > before },
    )
    .await;
    assert_eq!(spread(&clone, 2).await.len(), 1);
    drop(channel);
    // A clone keeps it alive.
    assert_eq!(spread(&clone, 2).await.len(), 1);
    drop(clone);
    eventually(
        "the channel's watches closed",
        Duration::from_secs(10),
        || async { etcd.watch_streams(0) == before },
    )
    .await;
}

/// A component from a file needs neither etcd nor a policy directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_file_serves_without_etcd_policies() {
    let etcd = Etcd::start();
    let _kept = two_backends(&etcd).await;
    let channel = builder(&etcd, "echo")
        .policies_from_etcd(false)
        .policy_file(policy_file("testing"))
        .pick_deadline(Duration::from_millis(200))
        .connect()
        .await
        .expect("a channel with a policy from a file only");
    let seen = spread(&channel, 10).await;
    assert_eq!(
        seen.len(),
        1,
        "`testing` picks the first candidate: {seen:?}"
    );
}
