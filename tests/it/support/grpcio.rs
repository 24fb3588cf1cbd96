//! A gRPC server nobody here wrote, as a real process: Python grpcio
//! (tests/python/echo_server.py: the Echo service and grpc.health.v1),
//! registered in etcd through the library API.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use weir::testkit::Etcd;
use weir::{Registration, RegistrationSpec};

use super::{client, PREFIX};

/// A grpcio server (tests/python/echo_server.py), registered in etcd.
pub struct GrpcioBackend {
    child: Child,
    pub addr: SocketAddr,
    _registration: Registration,
}

impl GrpcioBackend {
    pub async fn start(etcd: &Etcd, service: &str, name: &str, args: &[&str]) -> GrpcioBackend {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = crate::support::venv_python();
        let mut child = Command::new(python)
            .arg(root.join("tests/python/echo_server.py"))
            .arg(root.join("proto"))
            .arg(name)
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python runs");
        let stdout = child.stdout.take().expect("stdout");
        let port = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            BufReader::new(stdout).read_line(&mut line).expect("read");
            line.trim()
                .strip_prefix("listening on ")
                .and_then(|p| p.parse::<u16>().ok())
                .unwrap_or_else(|| panic!("unexpected first line from the grpcio server: {line:?}"))
        })
        .await
        .unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let spec = RegistrationSpec::new(PREFIX, service, &addr.to_string());
        let mut registration = Registration::spawn(client(etcd).await, spec).expect("registration");
        registration.registered().await;
        GrpcioBackend {
            child,
            addr,
            _registration: registration,
        }
    }

    /// SIGTERM: the server sends GOAWAY and finishes its calls (grace period).
    pub fn stop_gracefully(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }
}

impl GrpcioBackend {
    /// SIGKILL: the process ends at once, its connections reset.
    pub fn kill(&mut self) {
        let _already_gone_is_fine = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for GrpcioBackend {
    fn drop(&mut self) {
        let _already_gone_is_fine = self.child.kill();
        let _ = self.child.wait();
    }
}
