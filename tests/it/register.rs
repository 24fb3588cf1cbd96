//! The registration agent, as a library and as `weir register`.

use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;
use weir::register::{KeyFormat, Registration, RegistrationSpec};
use weir::testkit::Etcd;

use crate::support::{addrs, client, key, Discovery, PREFIX};

fn spec(addr: &str, ttl: i64) -> RegistrationSpec {
    let mut s = RegistrationSpec::new(PREFIX, "echo", addr);
    s.ttl_secs = ttl;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_survives_an_etcd_restart_and_a_wiped_etcd() {
    let mut etcd = Etcd::start();
    let d = Discovery::synced(&etcd).await;
    let mut reg = Registration::spawn(client(&etcd).await, spec("127.0.0.1:7001", 2)).unwrap();
    let first_lease = reg.registered().await;
    d.wait("registered", |t| addrs(t, "echo") == ["127.0.0.1:7001"])
        .await;

    // A restart with the same data: the lease lives on and keep-alives resume.
    etcd.stop();
    tokio::time::sleep(Duration::from_millis(500)).await;
    etcd.restart();
    let back = Instant::now();
    while back.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut c = client(&etcd).await;
    let present = c.get(key("echo", "127.0.0.1:7001"), None).await.unwrap();
    assert_eq!(
        present.kvs().len(),
        1,
        "still registered 3 s (> TTL) after the restart"
    );

    // A wiped etcd: lease and key are gone; the agent registers again under a new lease.
    etcd.wipe_and_restart();
    d.wait("registered again in the new cluster", |t| {
        t.get("echo").is_some_and(|s| {
            s.endpoints.len() == 1 && s.endpoints[0].lease_id().is_some_and(|l| l != first_lease)
        })
    })
    .await;
    assert_eq!(
        d.metrics
            .resyncs
            .get_or_create(&weir::metrics::ReasonLabel {
                reason: "revision_backwards"
            })
            .get(),
        1
    );
    reg.deregister().await.unwrap();
    d.wait("deregistered", |t| addrs(t, "echo").is_empty())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_agent_disappears_when_its_lease_ends() {
    let etcd = Etcd::start();
    let d = Discovery::synced(&etcd).await;
    let mut s = spec("127.0.0.1:7002", 2);
    s.format = KeyFormat::EtcdNaming;
    s.metadata.insert("zone".into(), "z1".into());
    let mut reg = Registration::spawn(client(&etcd).await, s).unwrap();
    reg.registered().await;
    d.wait("registered with metadata", |t| {
        t.get("echo").is_some_and(|s| {
            s.endpoints
                .first()
                .is_some_and(|e| e.metadata.get("zone").is_some_and(|z| z == "z1"))
        })
    })
    .await;
    let gone_from = Instant::now();
    drop(reg); // keep-alives stop, the lease is not revoked
    d.wait("the lease to end", |t| addrs(t, "echo").is_empty())
        .await;
    assert!(
        gone_from.elapsed() >= Duration::from_millis(500),
        "removed by expiry, not revocation"
    );
}

/// Runs `weir register` as a real process and stops it with SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_register_disappears_within_one_second_of_sigterm() {
    let etcd = Etcd::start();
    let d = Discovery::synced(&etcd).await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args([
            "register",
            "--etcd",
            &etcd.endpoint(0),
            "--prefix",
            PREFIX,
            "--service",
            "echo",
        ])
        .args([
            "--addr",
            "127.0.0.1:7003",
            "--ttl",
            "30",
            "--weight",
            "40",
            "--meta",
            "zone=z9",
        ])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    d.wait("the registration", |t| {
        addrs(t, "echo") == ["127.0.0.1:7003"]
    })
    .await;
    let e = d.table.get("echo").unwrap().endpoints[0].clone();
    assert_eq!((e.weight, e.metadata["zone"].as_str()), (40, "z9"));

    let sent = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    d.wait_for("removal after SIGTERM", Duration::from_secs(1), |t| {
        addrs(t, "echo").is_empty()
    })
    .await;
    assert!(sent.elapsed() < Duration::from_secs(1));
    let exit = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "weir register exits cleanly: {exit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_discover_prints_json_of_every_service() {
    let etcd = Etcd::start();
    let mut a = Registration::spawn(client(&etcd).await, spec("127.0.0.1:7004", 5)).unwrap();
    let mut s = RegistrationSpec::new(PREFIX, "other", "127.0.0.1:7005");
    s.weight = 3;
    let mut b = Registration::spawn(client(&etcd).await, s).unwrap();
    a.registered().await;
    b.registered().await;
    let out = tokio::task::spawn_blocking({
        let ep = etcd.endpoint(0);
        move || {
            Command::new(env!("CARGO_BIN_EXE_weir"))
                .args(["discover", "--json", "--etcd", &ep, "--prefix", PREFIX])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["echo"][0]["addr"], "127.0.0.1:7004");
    assert_eq!(json["other"][0]["weight"], 3);
    assert_eq!(json["other"][0]["status"], "healthy");
    let ttl = json["echo"][0]["lease_ttl_ms"]
        .as_i64()
        .expect("a polled lease TTL");
    assert!(ttl > 0 && ttl <= 5000, "ttl {ttl}");
}
