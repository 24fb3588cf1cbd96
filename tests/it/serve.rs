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

/// SIGTERM with `drain_delay`: `/readyz` answers 503 at once while the
/// connected clients are still served (no GOAWAY yet: a new call on an open
/// connection succeeds); after the delay GOAWAY ends the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_answers_503_from_sigterm_before_goaway_reaches_a_client() {
    use bytes::Bytes;
    use std::time::Instant;

    let etcd = Etcd::start();
    let (_echo, _reg) = crate::support::registered_echo(&etcd, PREFIX, "only").await;
    let gateway = crate::support::process::WeirServe::start(&format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworker_threads = 1\ndrain_delay = \"10s\"\n\
         [etcd]\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\n\
         [[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\n",
        etcd.endpoint(0)
    ));
    let readyz = || async {
        crate::support::gateway::admin_get(gateway.admin_addr, "/readyz")
            .await
            .0
    };
    crate::support::eventually("ready", Duration::from_secs(30), || async {
        readyz().await == 200
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(gateway.grpc_addr)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(conn);
    let call = |mut send: h2::client::SendRequest<Bytes>| async move {
        let request = http::Request::builder()
            .method("POST")
            .uri("http://weir/weir.example.v1.Echo/Unary")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap();
        send = send.ready().await?;
        let (response, mut body) = send.send_request(request, false)?;
        let message = crate::support::gateway::encode(&crate::support::gateway::req("x"));
        body.send_data(crate::support::gateway::frame(&message), true)?;
        let mut response = response.await?;
        // The message first: h2 gives trailers only once the data is read.
        while let Some(data) = response.body_mut().data().await {
            let data = data?;
            let _ = response
                .body_mut()
                .flow_control()
                .release_capacity(data.len());
        }
        let trailers = response.body_mut().trailers().await?;
        let status = trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| response.headers().get("grpc-status"))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok::<_, h2::Error>(status)
    };
    let within = |what: &'static str, f| async move {
        tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .unwrap_or_else(|_| panic!("{what} took over 30 s"))
    };
    assert_eq!(
        within("the first call", call(send.clone()))
            .await
            .unwrap()
            .as_deref(),
        Some("0")
    );

    let term = Instant::now();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &gateway.pid().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    crate::support::eventually(
        "/readyz 503 after SIGTERM",
        Duration::from_secs(5),
        || async { readyz().await == 503 },
    )
    .await;
    let unready_after = term.elapsed();
    // Still served: GOAWAY has not been sent on this connection.
    assert_eq!(
        within("a call while draining", call(send.clone()))
            .await
            .unwrap()
            .as_deref(),
        Some("0"),
        "a new call on the open connection after /readyz went 503"
    );
    assert!(!connection.is_finished(), "no GOAWAY yet");
    // Then GOAWAY: the connection ends (it has no call in flight).
    let ended = tokio::time::timeout(Duration::from_secs(60), connection).await;
    assert!(ended.is_ok(), "GOAWAY after the drain delay");
    let goaway_after = term.elapsed();
    eprintln!("/readyz 503 after {unready_after:?}; connection ended after {goaway_after:?}");
    assert!(
        goaway_after >= Duration::from_secs(9),
        "GOAWAY waited for the drain delay: {goaway_after:?}"
    );
}

/// `[access_log] path`: every call of a mixed run is one JSON line with its
/// status and backend; a rotation (rename, then SIGHUP) loses no line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_is_one_access_log_line_and_a_rotation_loses_none() {
    use std::collections::BTreeMap;

    let etcd = Etcd::start();
    let (echo_a, _reg_a) = crate::support::registered_echo(&etcd, PREFIX, "a").await;
    let (echo_b, _reg_b) = crate::support::registered_echo(&etcd, PREFIX, "b").await;
    let addr_of: BTreeMap<String, String> = [
        ("a".to_owned(), echo_a.addr.to_string()),
        ("b".to_owned(), echo_b.addr.to_string()),
    ]
    .into();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let gateway = crate::support::process::WeirServe::start(&format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworker_threads = 1\n\
         [access_log]\npath = {:?}\n\
         [etcd]\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\n\
         [[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\n",
        log.display().to_string(),
        etcd.endpoint(0)
    ));
    let mut c = EchoClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .unwrap();
    // Warm-up: until both backends answer; every call counted, each is a line.
    let warm_up_calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    crate::support::eventually("both backends serve", Duration::from_secs(30), || {
        let (mut c, calls) = (c.clone(), warm_up_calls.clone());
        async move {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..8 {
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if let Ok(r) = c.unary(EchoRequest::default()).await {
                    seen.insert(r.into_inner().instance);
                }
            }
            seen.len() == 2
        }
    })
    .await;
    let lines = |path: &std::path::Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    let warm_up = warm_up_calls.load(std::sync::atomic::Ordering::SeqCst);
    crate::support::eventually("the warm-up lines", Duration::from_secs(10), || async {
        lines(&log).len() >= warm_up
    })
    .await;

    let mut expected_ok: BTreeMap<String, usize> = BTreeMap::new();
    let ok_calls = |c: &mut EchoClient<tonic::transport::Channel>, n: usize| {
        let mut c = c.clone();
        async move {
            let mut by = Vec::new();
            for _ in 0..n {
                by.push(
                    c.unary(EchoRequest::default())
                        .await
                        .unwrap()
                        .into_inner()
                        .instance,
                );
            }
            by
        }
    };
    for who in ok_calls(&mut c, 20).await {
        *expected_ok.entry(addr_of[&who].clone()).or_default() += 1;
    }
    for _ in 0..5 {
        let failed = c
            .unary(EchoRequest {
                fail_code: 5,
                ..Default::default()
            })
            .await;
        assert_eq!(failed.unwrap_err().code(), tonic::Code::NotFound);
    }
    for _ in 0..3 {
        let reply = crate::support::gateway::raw_call(
            gateway.grpc_addr,
            "POST",
            "/nope.Missing/Call",
            &[("content-type", "application/grpc")],
            &[&[][..]],
        )
        .await;
        assert_eq!(reply.grpc_status(), Some(12));
    }
    crate::support::eventually("28 more lines", Duration::from_secs(10), || async {
        lines(&log).len() >= warm_up + 28
    })
    .await;

    // Rotation: rename, more calls (still to the renamed file), SIGHUP,
    // then calls into the new file.
    std::fs::rename(&log, &rotated).unwrap();
    for who in ok_calls(&mut c, 10).await {
        *expected_ok.entry(addr_of[&who].clone()).or_default() += 1;
    }
    // Written (to the renamed file) before the signal: lines still queued
    // at a SIGHUP would rightly go to the new file.
    crate::support::eventually(
        "38 lines in the renamed file",
        Duration::from_secs(10),
        || async { lines(&rotated).len() >= warm_up + 38 },
    )
    .await;
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &gateway.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    crate::support::eventually("the log reopened", Duration::from_secs(10), || async {
        log.exists()
    })
    .await;
    for who in ok_calls(&mut c, 10).await {
        *expected_ok.entry(addr_of[&who].clone()).or_default() += 1;
    }
    crate::support::eventually("every line", Duration::from_secs(10), || async {
        lines(&rotated).len() + lines(&log).len() >= warm_up + 48
    })
    .await;
    let after_reopen = lines(&log);
    assert_eq!(
        after_reopen.len(),
        10,
        "the calls after SIGHUP: {after_reopen:?}"
    );
    let all: Vec<serde_json::Value> = lines(&rotated)
        .into_iter()
        .skip(warm_up)
        .chain(after_reopen)
        .collect();
    assert_eq!(all.len(), 48, "each call once: {all:#?}");

    let mut ok_by_backend: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_status: BTreeMap<u64, usize> = BTreeMap::new();
    for line in &all {
        let status = line["grpc_status"].as_u64().unwrap();
        *by_status.entry(status).or_default() += 1;
        assert!(
            line["client"].as_str().unwrap().starts_with("127.0.0.1:"),
            "{line}"
        );
        assert!(line["duration_ms"].as_f64().unwrap() >= 0.0, "{line}");
        match status {
            0 | 5 => {
                assert_eq!(line["path"], "/weir.example.v1.Echo/Unary", "{line}");
                assert_eq!(line["route"], "/weir.example.v1.Echo/", "{line}");
                assert_eq!(line["service"], "echo", "{line}");
                assert_eq!(line["attempts"], 1, "{line}");
                let backend = line["backend"].as_str().unwrap();
                assert!(addr_of.values().any(|a| a == backend), "{line}");
                if status == 0 {
                    *ok_by_backend.entry(backend.to_owned()).or_default() += 1;
                    assert!(line["request_bytes"].as_u64().unwrap() > 0, "{line}");
                    assert!(line["response_bytes"].as_u64().unwrap() > 0, "{line}");
                }
            }
            12 => {
                assert_eq!(line["path"], "/nope.Missing/Call", "{line}");
                assert!(line["backend"].is_null(), "{line}");
            }
            other => panic!("unexpected status {other}: {line}"),
        }
    }
    assert_eq!(by_status, BTreeMap::from([(0, 40), (5, 5), (12, 3)]));
    assert_eq!(
        ok_by_backend, expected_ok,
        "each OK call logged with the backend that answered"
    );
}

/// `weir config check FILE`: a valid file is said valid; an invalid one
/// fails naming the key, and nothing is started either way.
#[test]
fn weir_config_check_names_the_key_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let path = dir.path().join("weir.toml");
        std::fs::write(&path, text).unwrap();
        let out = Command::new("timeout")
            .args(["20", env!("CARGO_BIN_EXE_weir"), "config", "check"])
            .arg(&path)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = check("[[route]]\nmatch = \"/a.B/\"\nservice = \"b\"\n");
    assert!(ok && text.contains("valid (1 route(s)"), "{text}");
    let (ok, text) = check("[access_log]\nbuffer = 0\n");
    assert!(!ok && text.contains("access_log.buffer"), "{text}");
}

/// SIGHUP under continuous load: a route's service and policy changed in
/// the file take effect for new calls, with no call failed; an invalid file
/// and a change that cannot apply live (the listen address) change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_routes_under_load_and_refuses_what_cannot_change() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;
    use weir::register::{Registration, RegistrationSpec};

    let etcd = Etcd::start();
    let (_alpha, _reg_alpha) = crate::support::registered_echo(&etcd, PREFIX, "alpha").await;
    let beta = weir::example::EchoBackend::start("beta").await.unwrap();
    let mut reg_beta = Registration::spawn(
        crate::support::client(&etcd).await,
        RegistrationSpec::new(PREFIX, "beta", &beta.addr.to_string()),
    )
    .unwrap();
    reg_beta.registered().await;
    let policies = crate::policy::policy_file("least-conn")
        .parent()
        .unwrap()
        .display()
        .to_string();
    let config = |listen: &str, service: &str, policy: &str| {
        format!(
            "listen = \"{listen}\"\nadmin = \"127.0.0.1:0\"\nworker_threads = 1\n\
             [etcd]\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\n\
             [policy]\ndir = {policies:?}\ndeadline = \"50ms\"\n\
             [[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"{service}\"\npolicy = \"{policy}\"\n",
            etcd.endpoint(0)
        )
    };
    let gateway =
        crate::support::process::WeirServe::start(&config("127.0.0.1:0", "echo", "round-robin"));
    let rewrite = |text: &str| gateway.rewrite_config(text);
    let c = EchoClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .unwrap();
    crate::support::eventually("served by alpha", Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { c.unary(EchoRequest::default()).await.is_ok() }
    })
    .await;

    // Continuous load: every reply's instance, in order, and every failure.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let answered_by: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let load = {
        let (stop, failed, answered_by) = (stop.clone(), failed.clone(), answered_by.clone());
        let c = c.clone();
        tokio::spawn(async move {
            let mut workers = Vec::new();
            for _ in 0..4 {
                let (stop, failed, answered_by, mut c) =
                    (stop.clone(), failed.clone(), answered_by.clone(), c.clone());
                workers.push(tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match c.unary(EchoRequest::default()).await {
                            Ok(r) => answered_by
                                .lock()
                                .unwrap()
                                .push((Instant::now(), r.into_inner().instance)),
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }));
            }
            for w in workers {
                w.await.unwrap();
            }
        })
    };
    let served_by = |who: &'static str| {
        let answered_by = answered_by.clone();
        move || {
            let answered_by = answered_by.clone();
            async move {
                let seen = answered_by.lock().unwrap();
                seen.len() >= 10 && seen[seen.len() - 10..].iter().all(|(_, i)| i == who)
            }
        }
    };
    crate::support::eventually("load on alpha", Duration::from_secs(10), served_by("alpha")).await;

    // The route moves to service beta, under the least-conn policy.
    rewrite(&config("127.0.0.1:0", "beta", "least-conn"));
    let hup = Instant::now();
    gateway.signal("HUP");
    crate::support::eventually("load on beta", Duration::from_secs(10), served_by("beta")).await;
    let first_beta = answered_by
        .lock()
        .unwrap()
        .iter()
        .find(|(_, i)| i == "beta")
        .map(|(at, _)| at.duration_since(hup))
        .unwrap();
    eprintln!("the new route served its first call {first_beta:?} after SIGHUP");
    let (_, routes) = crate::support::gateway::admin_get(gateway.admin_addr, "/routes").await;
    let routes: serde_json::Value = serde_json::from_str(&routes).unwrap();
    assert_eq!(routes["routes"][0]["service"], "beta", "{routes}");
    assert_eq!(routes["routes"][0]["policy"], "least-conn", "{routes}");

    // An invalid file, then a listen address change: refused, nothing changes.
    rewrite("[[route]]\nmatch = 5\n");
    gateway.signal("HUP");
    crate::support::eventually(
        "the invalid file refused",
        Duration::from_secs(10),
        || async {
            gateway
                .logged("configuration not reloaded, the running one stays")
                .is_some()
        },
    )
    .await;
    rewrite(&config("127.0.0.1:1", "echo", "round-robin"));
    gateway.signal("HUP");
    crate::support::eventually(
        "the listen change refused",
        Duration::from_secs(10),
        || async {
            gateway
                .logged("listen cannot change while weir runs")
                .is_some()
        },
    )
    .await;
    let refused_at = answered_by.lock().unwrap().len();
    crate::support::eventually(
        "more calls after the refusals",
        Duration::from_secs(10),
        || async { answered_by.lock().unwrap().len() >= refused_at + 50 },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let seen = answered_by.lock().unwrap();
    assert!(
        seen[refused_at..].iter().all(|(_, i)| i == "beta"),
        "still routed to beta after the refused reloads"
    );
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "no call failed across the reloads ({} answered)",
        seen.len()
    );
}

/// SIGHUP applies more than routes: `[limits]` (a new grpc-timeout clip on
/// the next call, new stream limits on the next connection) and
/// `[health_check]` (switched on, the next round runs) take effect without
/// a restart and without failing a call; engine settings are refused by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_limits_and_health_checks_live_and_refuses_engine_settings() {
    let etcd = Etcd::start();
    let (echo, _reg) = crate::support::registered_echo(&etcd, PREFIX, "a").await;
    let config = |limits: &str, health: bool, memory_mib: u32| {
        format!(
            "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworker_threads = 1\n\
             [limits]\n{limits}\n\
             [health_check]\nenabled = {health}\ninterval = \"200ms\"\n\
             [policy]\nmemory_mib = {memory_mib}\n\
             [etcd]\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\n\
             [[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\n",
            etcd.endpoint(0)
        )
    };
    let gateway = crate::support::process::WeirServe::start(&config(
        "max_grpc_timeout = \"30s\"\nmax_concurrent_streams = 100",
        false,
        16,
    ));
    let rewrite = |text: &str| gateway.rewrite_config(text);
    let mut c = EchoClient::connect(format!("http://{}", gateway.grpc_addr))
        .await
        .unwrap();
    // The grpc-timeout a backend sees for a 20 s deadline.
    let seen_timeout = |mut c: EchoClient<tonic::transport::Channel>| async move {
        let mut request = tonic::Request::new(EchoRequest::default());
        request.set_timeout(Duration::from_secs(20));
        let reply = c.unary(request).await.expect("the call succeeds");
        let seen = reply.metadata().get("x-seen-grpc-timeout").unwrap();
        weir::parse_grpc_timeout(&http::HeaderValue::from_str(seen.to_str().unwrap()).unwrap())
            .unwrap()
    };
    let seen = seen_timeout(c.clone()).await;
    assert!(
        seen > Duration::from_secs(15),
        "not clipped at 30 s: {seen:?}"
    );
    // The stream limit a new connection is offered.
    let offered_streams = || async {
        let tcp = tokio::net::TcpStream::connect(gateway.grpc_addr)
            .await
            .unwrap();
        let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        // SETTINGS arrive with the first exchange: wait for them.
        crate::support::eventually("the gateway's SETTINGS", Duration::from_secs(10), || {
            let send = send.clone();
            async move { send.current_max_send_streams() != usize::MAX }
        })
        .await;
        send = send.ready().await.unwrap();
        send.current_max_send_streams()
    };
    assert_eq!(offered_streams().await, 100);
    let health = || async {
        let (_, services) =
            crate::support::gateway::admin_get(gateway.admin_addr, "/services").await;
        let services: serde_json::Value = serde_json::from_str(&services).unwrap();
        services["echo"]["endpoints"][0]["backend"]["health"]
            .as_str()
            .unwrap_or("")
            .to_owned()
    };
    assert_eq!(health().await, "unknown", "health checks are off");

    rewrite(&config(
        "max_grpc_timeout = \"2s\"\nmax_concurrent_streams = 7",
        true,
        16,
    ));
    gateway.signal("HUP");
    crate::support::eventually("the reload logged", Duration::from_secs(10), || async {
        gateway.logged("configuration reloaded").is_some()
    })
    .await;
    let seen = seen_timeout(c.clone()).await;
    assert!(
        seen <= Duration::from_secs(2),
        "clipped to the new 2 s: {seen:?}"
    );
    assert_eq!(
        offered_streams().await,
        7,
        "a new connection gets the new limit"
    );
    crate::support::eventually("a health check ran", Duration::from_secs(10), || async {
        health().await == "serving"
    })
    .await;

    // The engine's memory is sized at start: refused, by name.
    rewrite(&config(
        "max_grpc_timeout = \"30s\"\nmax_concurrent_streams = 100",
        true,
        32,
    ));
    gateway.signal("HUP");
    crate::support::eventually(
        "the memory change refused",
        Duration::from_secs(10),
        || async {
            gateway
                .logged("policy.memory_mib cannot change while weir runs")
                .is_some()
        },
    )
    .await;
    let seen = seen_timeout(c.clone()).await;
    assert!(
        seen <= Duration::from_secs(2),
        "the refused file changed nothing: {seen:?}"
    );
    c.unary(EchoRequest::default()).await.unwrap();
    drop(echo);
}
