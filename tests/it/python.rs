//! The same calls from a gRPC client nobody here wrote: Python grpcio.

use std::path::Path;
use std::process::Command;

use crate::support::gateway::Env;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_calls_every_kind_through_the_gateway() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} is missing: `make test` creates it (python3 -m venv .venv; pip install grpcio grpcio-tools)", python.display());
    let env = Env::start(
        2,
        "[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"",
    )
    .await;
    let target = env.gateway().grpc_addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(root.join("tests/python/echo_client.py"))
            .arg(target)
            .arg(root.join("proto"))
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "grpcio client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all checks ok"), "{stdout}");
}
