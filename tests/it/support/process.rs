//! `weir serve` as a real process, for tests that measure it from outside
//! (its memory, its wake-ups): started on a config text, killed however the
//! test ends.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

pub struct WeirServe {
    child: Child,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl WeirServe {
    /// Writes `config` to a file, runs `weir serve` on it, and returns once
    /// it logs its listeners' addresses (its log is drained meanwhile).
    pub fn start(config: &str) -> WeirServe {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weir.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["serve", "--config"])
            .arg(&path)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let addr_after = |line: &str, field: &str| -> Option<SocketAddr> {
            line.split(field)
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        };
        let (grpc_addr, admin_addr) = loop {
            let line = lines.next().expect("weir logs before exiting").unwrap();
            if let (Some(g), Some(a)) = (
                addr_after(&line, "grpc_addr="),
                addr_after(&line, "admin_addr="),
            ) {
                break (g, a);
            }
        };
        std::thread::spawn(move || lines.for_each(drop)); // keep the pipe drained
        WeirServe {
            child,
            grpc_addr,
            admin_addr,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for WeirServe {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
