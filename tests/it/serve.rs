//! `weir serve` as a real process: configuration errors, and SIGTERM draining.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use weir::example::pb::echo_client::EchoClient;
use weir::example::pb::EchoRequest;
use weir::example::EchoBackend;
use weir::register::{Registration, RegistrationSpec};
use weir::testkit::Etcd;

use crate::support::{client, PREFIX};

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
    let echo = EchoBackend::start("only").await.unwrap();
    let mut reg = Registration::spawn(
        client(&etcd).await,
        RegistrationSpec::new(PREFIX, "echo", &echo.addr.to_string()),
    )
    .unwrap();
    reg.registered().await;
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
