//! `weir serve` as a real process, for tests that measure it from outside
//! (its memory, its wake-ups): started on a config text, killed however the
//! test ends.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

/// Log lines kept per process (the newest; older ones are let go).
const KEPT_LINES: usize = 10_000;

pub struct WeirServe {
    child: Child,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    log: Arc<Mutex<std::collections::VecDeque<String>>>,
    _dir: tempfile::TempDir,
}

impl WeirServe {
    /// Writes `config` to a file, runs `weir serve` on it, and returns once
    /// it logs its listeners' addresses (its log is kept meanwhile).
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
        let log = Arc::new(Mutex::new(std::collections::VecDeque::new()));
        let kept = log.clone();
        // Keeps the pipe drained, and the newest lines for `logged`.
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut kept = kept.lock().unwrap();
                if kept.len() == KEPT_LINES {
                    kept.pop_front();
                }
                kept.push_back(line);
            }
        });
        WeirServe {
            child,
            grpc_addr,
            admin_addr,
            log,
            _dir: dir,
        }
    }

    /// The newest kept log line that contains `text`.
    pub fn logged(&self, text: &str) -> Option<String> {
        let log = self.log.lock().unwrap();
        log.iter().rev().find(|line| line.contains(text)).cloned()
    }

    /// The configuration file it was started on (rewrite it, then SIGHUP).
    pub fn config_path(&self) -> std::path::PathBuf {
        self._dir.path().join("weir.toml")
    }

    /// Replaces its configuration file with `text` at once (written beside
    /// it, then renamed over it), ready for a SIGHUP.
    pub fn rewrite_config(&self, text: &str) {
        let path = self.config_path();
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    /// Sends the process `signal` (`"HUP"`, `"TERM"`).
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -{signal}");
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
