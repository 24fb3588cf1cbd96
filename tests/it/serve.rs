//! `weir serve` as a real process: configuration errors, and SIGTERM draining.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use weir::example::pb::echo_client::EchoClient;
use weir::example::pb::EchoRequest;
use weir::testkit::Etcd;

use crate::support::PREFIX;

#[test]
fn an_invalid_config_is_rejected_with_the_keys_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    std::fs::write(
        &path,
        "[policy]\nfrom_etcd = false\n[[route]]\nmatch = \"/a.B/\"\nservice = \"s\"\npolicy = \"fastest\"\n",
    )
    .unwrap();
    // Bounded: were the file accepted, `weir serve` would run on.
    let out = Command::new("timeout")
        .args(["20", env!("CARGO_BIN_EXE_weir"), "serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("route[0].policy") && stderr.contains("fastest"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_calls_in_flight_then_exits() {
    let etcd = Etcd::start();
    let (echo, _reg) = crate::support::registered_echo(&etcd, PREFIX, "only").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weir.toml");
    std::fs::write(
        &path,
        format!(
            "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[etcd]\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\n[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\n",
            etcd.endpoint(0)
        ),
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["serve", "--config"])
        .arg(&path)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let grpc_addr = loop {
        let line = lines.next().expect("weir logs before exiting").unwrap();
        if let Some(rest) = line.split("grpc_addr=").nth(1) {
            break rest.split_whitespace().next().unwrap().to_owned();
        }
    };
    let drain_log = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());

    let mut c = EchoClient::connect(format!("http://{grpc_addr}"))
        .await
        .unwrap();
    // Wait until the gateway has listed etcd (the first call succeeds).
    crate::support::eventually("the gateway to serve", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move { c.unary(EchoRequest::default()).await.is_ok() }
    })
    .await;
    let in_flight = tokio::spawn(async move {
        c.unary(EchoRequest {
            delay_ms: 800,
            message: "drain".into(),
            ..Default::default()
        })
        .await
    });
    crate::support::eventually(
        "the slow call to reach the backend",
        Duration::from_secs(5),
        || async { echo.stats.active.load(std::sync::atomic::Ordering::Relaxed) == 1 },
    )
    .await;
    assert!(Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let reply = in_flight
        .await
        .unwrap()
        .expect("the call in flight completes during the drain");
    assert_eq!(reply.into_inner().message, "drain");
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "weir serve exits cleanly after draining: {status}"
    );
    let log = drain_log.join().unwrap().join("\n");
    assert!(log.contains("SIGTERM") && log.contains("stopped"), "{log}");
}

/// Context switches of every thread of process `pid` so far.
fn wakeups(pid: u32) -> u64 {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total += status
            .lines()
            .filter(|l| {
                l.starts_with("voluntary_ctxt_switches")
                    || l.starts_with("nonvoluntary_ctxt_switches")
            })
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}

/// An idle gateway with WebAssembly policies (a policy directory, picks
/// made) wakes a few times a second at most. Regressions: the epoch ticker
/// ticked 4,000 times a second regardless, and the directory watch fed
/// itself (reading a component is an inotify event) hundreds of times a
/// second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gateway_with_wasm_policies_sleeps() {
    let etcd = Etcd::start();
    let (_echo, _reg) = crate::support::registered_echo(&etcd, PREFIX, "idle").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        crate::policy::policy_file("least-conn"),
        dir.path().join("lc.wasm"),
    )
    .unwrap();
    let child = crate::support::process::WeirServe::start(&format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n[etcd]\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\n[policy]\ndir = {:?}\n[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\npolicy = \"lc\"\n",
        etcd.endpoint(0),
        dir.path().display().to_string()
    ));
    let grpc_addr = child.grpc_addr;
    let mut c = EchoClient::connect(format!("http://{grpc_addr}"))
        .await
        .unwrap();
    crate::support::eventually("served through the policy", Duration::from_secs(10), || {
        let mut c = c.clone();
        async move { c.unary(EchoRequest::default()).await.is_ok() }
    })
    .await;
    for _ in 0..20 {
        c.unary(EchoRequest::default()).await.unwrap();
    }
    drop(c);
    // Someone reads the policy (a backup, `sha256sum`): an access, no change.
    std::fs::read(dir.path().join("lc.wasm")).unwrap();
    // Idle now: count wake-ups over 3 s, after the ticker's 100 ms linger.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = child.pid();
    let before = wakeups(pid);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let per_second = (wakeups(pid) - before) as f64 / 3.0;
    eprintln!("idle gateway: {per_second:.1} wake-ups per second");
    assert!(
        per_second < 100.0,
        "an idle gateway woke {per_second:.0} times a second"
    );
}

/// CPU ticks (utime + stime) of each thread of `pid`, by thread name.
fn ticks_by_thread(pid: u32) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let Some((_, after_name)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = fields
            .get(11)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
            + fields
                .get(12)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0);
        found.push((name.trim().to_owned(), ticks));
    }
    found
}

/// `worker_threads = 3`: client connections are spread over the main thread
/// and two data threads (thread-per-core), and each of them serves calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_connections_are_spread_over_the_data_threads() {
    let etcd = Etcd::start();
    let (_echo, _reg) = crate::support::registered_echo(&etcd, PREFIX, "spread").await;
    let child = crate::support::process::WeirServe::start(&format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworker_threads = 3\n[etcd]\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\n[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\n",
        etcd.endpoint(0),
    ));
    let grpc_addr = child.grpc_addr;
    let data_threads = |pid| {
        ticks_by_thread(pid)
            .into_iter()
            .filter(|(name, _)| name.starts_with("weir-data-"))
            .collect::<Vec<_>>()
    };
    // A new thread names itself once it runs: look until both have.
    let pid = child.pid();
    crate::support::eventually(
        "two data threads run",
        Duration::from_secs(10),
        || async move { data_threads(pid).len() == 2 },
    )
    .await;
    let before = data_threads(child.pid());
    // Six connections (one per tonic client), calling at once.
    let mut calls = Vec::new();
    for _ in 0..6 {
        let mut c = EchoClient::connect(format!("http://{grpc_addr}"))
            .await
            .unwrap();
        calls.push(tokio::spawn(async move {
            for _ in 0..3000 {
                c.unary(EchoRequest::default()).await.unwrap();
            }
        }));
    }
    for call in calls {
        call.await.unwrap();
    }
    let after = data_threads(child.pid());
    eprintln!("data threads' CPU ticks before {before:?}, after {after:?}");
    for ((name, was), (_, is)) in before.iter().zip(&after) {
        assert!(
            is - was >= 3,
            "{name} served (almost) nothing: {was} -> {is} ticks"
        );
    }
    // Each thread calls the backend over a connection of its own.
    let (_, services) = crate::support::gateway::admin_get(child.admin_addr, "/services").await;
    let v: serde_json::Value = serde_json::from_str(&services).unwrap();
    let pool = &v["echo"]["endpoints"][0]["backend"]["pool"];
    assert_eq!(
        pool["connections"], 3,
        "one upstream connection per thread: {pool}"
    );
}
