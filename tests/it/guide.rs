//! docs/writing-a-policy.md, followed as written: its `sh` blocks run in
//! order (in a temp HOME, against a running gateway), and the policy they
//! build and deploy must be hot-loaded and do what the guide says.

use std::path::Path;
use std::time::Duration;

use weir::example::EchoBackend;
use weir::register::{Registration, RegistrationSpec};

use crate::support::gateway::{admin_get, req, Env};
use crate::support::{client, eventually, PREFIX};

const GUIDE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/writing-a-policy.md");

/// The guide's shell blocks (fenced ```sh), in order.
fn shell_blocks(markdown: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in markdown.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), text) => {
                block.push_str(text);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_guide_followed_step_by_step_gives_a_policy_the_gateway_hot_loads() {
    let policy_dir = tempfile::tempdir().unwrap();
    let home = tempfile::tempdir().unwrap();
    // The route names the guide's policy before it exists: round-robin
    // serves until it is deployed.
    let config = format!(
        "[policy]\ndir = {:?}\ndeadline = \"100ms\"\n[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\npolicy = \"canary\"\n",
        policy_dir.path().display().to_string()
    );
    let mut env = Env::start(0, &config).await;
    for (name, track) in [
        ("stable-1", None),
        ("stable-2", None),
        ("canary", Some("canary")),
    ] {
        let echo = EchoBackend::start(name).await.unwrap();
        let mut spec = RegistrationSpec::new(PREFIX, "echo", &echo.addr.to_string());
        if let Some(track) = track {
            spec.metadata.insert("track".into(), track.into());
        }
        let mut reg = Registration::spawn(client(&env.etcd).await, spec).unwrap();
        reg.registered().await;
        env.backends.push((echo, reg));
    }
    env.wait_endpoints("echo", 3).await;

    let blocks = shell_blocks(&std::fs::read_to_string(GUIDE).unwrap());
    assert!(blocks.len() >= 5, "the guide's steps: {blocks:?}");
    let script = format!("set -euo pipefail\n{}", blocks.join("\n"));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(root)
        .env("HOME", home.path())
        .env("POLICY_DIR", policy_dir.path())
        .env("ETCD", env.etcd.endpoint(0))
        .output()
        .await
        .unwrap();
    let log = format!(
        "{script}\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the guide's steps failed:\n{log}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("a valid weir:policy balancer") && stdout.contains("track=canary"),
        "weir policy check ran:\n{log}"
    );
    assert!(
        stdout.contains("canary-py.wasm: a valid weir:policy balancer"),
        "the Python policy was built and checked:\n{log}"
    );

    let admin = env.gateway().admin_addr;
    eventually(
        "the gateway to serve the guide's policy",
        Duration::from_secs(10),
        || async move {
            let (_, body) = admin_get(admin, "/policies").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["policies"]["canary"]["current"]["digest"].is_string()
        },
    )
    .await;

    // What the guide says it does: about 5% to the canary, the rest in turn.
    let mut c = env.client().await;
    let mut counts = std::collections::HashMap::<String, u32>::new();
    for _ in 0..1000 {
        let who = c.unary(req("x")).await.unwrap().into_inner().instance;
        *counts.entry(who).or_default() += 1;
    }
    let canary = counts.get("canary").copied().unwrap_or(0);
    let (_, p) = admin_get(admin, "/policies").await;
    let (_, sv) = admin_get(admin, "/services").await;
    assert!(
        (15..=100).contains(&canary),
        "about 5% of 1000 to the canary: {counts:?}\n{p}\n{sv}"
    );
    for stable in ["stable-1", "stable-2"] {
        let n = counts.get(stable).copied().unwrap_or(0);
        assert!((430..=520).contains(&n), "the rest in turn: {counts:?}");
    }
}
