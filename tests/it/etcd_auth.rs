//! etcd with TLS, client certificates and authentication, set up with the
//! real `etcdctl`: the gateway (a read-only user), `weir register` (a user
//! that may write only its service's keys) and a policy published by the
//! root user all work with the right credentials, and fail clearly with
//! wrong ones.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use weir::example::EchoBackend;
use weir::testkit::{Etcd, EtcdTls};

use crate::policy::policy_file;
use crate::support::gateway::req;
use crate::support::pki::Pki;
use crate::support::{eventually, PREFIX};

/// `etcdctl` over TLS with the test client certificate, as `user`.
fn etcdctl(etcd: &Etcd, pki: &Pki, user: Option<&str>, args: &[&str]) -> std::process::Output {
    let dir = pki.dir.path();
    let mut c = Command::new("etcdctl");
    c.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoint(0)))
        .arg(format!("--cacert={}", pki.ca().display()))
        .arg(format!("--cert={}", dir.join("client.pem").display()))
        .arg(format!("--key={}", dir.join("client.key").display()));
    if let Some(user) = user {
        c.arg(format!("--user={user}"));
    }
    c.args(args).output().expect("etcdctl runs")
}

fn ok(out: std::process::Output) -> String {
    assert!(out.status.success(), "etcdctl: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `weir` with the etcd TLS flags and `user`'s password file.
fn weir_cli(etcd: &Etcd, pki: &Pki, user: &str, args: &[&str]) -> Command {
    let dir = pki.dir.path();
    let mut c = Command::new(env!("CARGO_BIN_EXE_weir"));
    c.args(args)
        .arg("--etcd")
        .arg(etcd.endpoint(0))
        .arg("--ca")
        .arg(pki.ca())
        .arg("--cert")
        .arg(dir.join("client.pem"))
        .arg("--key")
        .arg(dir.join("client.key"))
        .arg("--username")
        .arg(user)
        .arg("--password-file")
        .arg(dir.join(format!("{user}.password")));
    c
}

fn write_password(dir: &Path, user: &str, password: &str) {
    std::fs::write(
        dir.join(format!("{user}.password")),
        format!("{password}\n"),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_registration_and_policies_work_through_etcd_tls_and_auth() {
    let pki = Pki::new("weir test CA");
    let (cert, key) = pki.issue("etcd", "etcd");
    // The client certificate's name is no etcd user: identity comes from
    // the username and password.
    pki.issue("client", "weir-test-client");
    let etcd = Etcd::start_tls(EtcdTls {
        ca: pki.ca(),
        cert,
        key,
    });
    let dir = pki.dir.path();
    ok(etcdctl(&etcd, &pki, None, &["user", "add", "root:rootpw"]));
    let _exists = etcdctl(&etcd, &pki, None, &["role", "add", "root"]);
    let _granted = etcdctl(&etcd, &pki, None, &["user", "grant-role", "root", "root"]);
    ok(etcdctl(&etcd, &pki, None, &["auth", "enable"]));
    let root = Some("root:rootpw");
    let services = format!("{PREFIX}/");
    let echo_keys = format!("{PREFIX}/echo/");
    for (user, password, role, perm, prefix) in [
        ("gateway", "gwpw", "reader", "read", services.as_str()),
        (
            "registrar",
            "rgpw",
            "echo-writer",
            "readwrite",
            echo_keys.as_str(),
        ),
    ] {
        ok(etcdctl(&etcd, &pki, root, &["role", "add", role]));
        ok(etcdctl(
            &etcd,
            &pki,
            root,
            &[
                "role",
                "grant-permission",
                role,
                "--prefix=true",
                perm,
                prefix,
            ],
        ));
        ok(etcdctl(
            &etcd,
            &pki,
            root,
            &["user", "add", &format!("{user}:{password}")],
        ));
        ok(etcdctl(
            &etcd,
            &pki,
            root,
            &["user", "grant-role", user, role],
        ));
        write_password(dir, user, password);
    }
    write_password(dir, "wrong", "not-the-password");

    // Registration with keep-alives, as the user who may write echo's keys.
    let echo = EchoBackend::start("tls-etcd").await.unwrap();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _register = Killed(
        weir_cli(
            &etcd,
            &pki,
            "registrar",
            &[
                "register",
                "--service",
                "echo",
                "--ttl",
                "5",
                "--addr",
                &echo.addr.to_string(),
            ],
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap(),
    );

    // The gateway reads with the read-only user.
    let mut config = crate::support::gateway::config(
        &etcd,
        "[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\npolicy = \"published\"\n",
    );
    config.etcd.ca = Some(pki.ca());
    config.etcd.cert = Some(dir.join("client.pem"));
    config.etcd.key = Some(dir.join("client.key"));
    config.etcd.username = Some("gateway".into());
    config.etcd.password_file = Some(dir.join("gateway.password"));
    let gateway = weir::Gateway::start(config).await.expect("starts");
    let c = weir::example::pb::echo_client::EchoClient::connect(format!(
        "http://{}",
        gateway.grpc_addr
    ))
    .await
    .unwrap();
    eventually(
        "a call through the registered backend",
        Duration::from_secs(20),
        || {
            let mut c = c.clone();
            async move {
                c.unary(req("tls"))
                    .await
                    .is_ok_and(|r| r.into_inner().instance == "tls-etcd")
            }
        },
    )
    .await;

    // A policy published by root (etcdctl reads the value from stdin).
    let mut put = Command::new("etcdctl");
    put.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.endpoint(0)))
        .arg(format!("--cacert={}", pki.ca().display()))
        .arg(format!("--cert={}", dir.join("client.pem").display()))
        .arg(format!("--key={}", dir.join("client.key").display()))
        .arg("--user=root:rootpw")
        .args(["put", &format!("{PREFIX}/_policies/published")])
        .stdin(std::fs::File::open(policy_file("least-conn")).unwrap());
    ok(put.output().unwrap());
    let policies = gateway.policies.clone();
    eventually(
        "the published policy installed",
        Duration::from_secs(20),
        || {
            let policies = policies.clone();
            async move {
                policies
                    .policy("published")
                    .and_then(|p| p.current())
                    .is_some()
            }
        },
    )
    .await;
    c.clone().unary(req("after")).await.unwrap();
    gateway.shutdown().await;

    // Wrong credentials and permissions fail, saying which.
    let failed = |out: std::process::Output| {
        assert!(!out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stderr).to_lowercase()
    };
    let err = failed(
        weir_cli(
            &etcd,
            &pki,
            "wrong",
            &["discover", "--prefix", PREFIX, "--wait", "5"],
        )
        .output()
        .unwrap(),
    );
    assert!(err.contains("authentication failed"), "{err}");
    let err = failed(
        weir_cli(
            &etcd,
            &pki,
            "registrar",
            &["register", "--service", "other", "--addr", "127.0.0.1:1"],
        )
        .output()
        .unwrap(),
    );
    assert!(err.contains("permission denied"), "{err}");
    let stranger = Pki::new("another CA");
    let (cert, key) = stranger.issue("client", "weir-test-client");
    let err = failed(
        Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["discover", "--prefix", PREFIX, "--wait", "5", "--etcd"])
            .arg(etcd.endpoint(0))
            .arg("--ca")
            .arg(pki.ca())
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg("--username")
            .arg("gateway")
            .arg("--password-file")
            .arg(dir.join("gateway.password"))
            .output()
            .unwrap(),
    );
    assert!(err.contains("tls") || err.contains("certificate"), "{err}");
}
