//! The same calls from a gRPC client nobody here wrote: Python grpcio.

use std::path::Path;
use std::process::Command;

use crate::support::gateway::Env;

const ROUTE: &str = "[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_calls_every_kind_through_the_gateway() {
    let env = Env::start(2, ROUTE).await;
    run_client(&env, &[]).await;
}

/// The same checks over mTLS to the listener: grpcio presents a client
/// certificate from the CA the gateway's `client_ca` names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_grpcio_calls_every_kind_over_mtls() {
    let server = crate::support::pki::Pki::new("server CA");
    let clients = crate::support::pki::Pki::new("clients CA");
    let (cert, key) = server.issue("listener", "weir");
    let (client_cert, client_key) = clients.issue("python", "python client");
    let env = Env::start(
        2,
        &format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n{ROUTE}",
            cert.display().to_string(),
            key.display().to_string(),
            clients.ca().display().to_string()
        ),
    )
    .await;
    run_client(
        &env,
        &[server.ca(), client_cert.clone(), client_key.clone()],
    )
    .await;
}

/// Runs `tests/python/echo_client.py` against the gateway; it must pass
/// every check.
async fn run_client(env: &Env, tls: &[std::path::PathBuf]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = crate::support::venv_python();
    let target = env.gateway().grpc_addr.to_string();
    let tls = tls.to_vec();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(root.join("tests/python/echo_client.py"))
            .arg(target)
            .arg(root.join("proto"))
            .args(tls)
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
