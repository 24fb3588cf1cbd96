//! Real etcd processes for tests and benchmarks (feature `testkit`).
//!
//! Each [`Etcd`] runs one or more members on free loopback ports in its own
//! temp dir and kills them on drop. Members can be stopped, restarted on the
//! same ports (same data), or wiped (a new cluster on the same address).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Plain HTTP `/health` and `/metrics`, whatever the client URLs speak.
    metrics_port: u16,
    child: Option<Child>,
}

/// A running etcd (one member, or a cluster).
pub struct Etcd {
    dir: TempDir,
    members: Vec<Member>,
    binary: PathBuf,
    tls: Option<EtcdTls>,
}

/// TLS on an etcd's client URLs: its certificate and key (PEM files), and
/// the CA whose client certificates it requires (`--client-cert-auth`).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Where the `etcd` binary is: `$ETCD_BIN`, else `etcd` on `PATH`.
fn find_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("ETCD_BIN") {
        return path.into();
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join("etcd");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "the etcd binary was not found on PATH (or $ETCD_BIN). \
         `make test` installs it (Debian package etcd-server); tests never skip without it."
    );
}

/// etcd fsyncs every write; on a test machine running many etcds at once that
/// makes timings (a revoke, a put) swing by seconds. Test data is throwaway:
/// keep it in memory (tmpfs) where there is one.
fn data_dir() -> TempDir {
    let builder = || {
        let mut b = tempfile::Builder::new();
        b.prefix("weir-etcd-");
        b
    };
    if std::path::Path::new("/dev/shm").is_dir() {
        if let Ok(dir) = builder().tempdir_in("/dev/shm") {
            return dir;
        }
    }
    builder().tempdir().expect("temp dir")
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}

impl Etcd {
    /// One member.
    pub fn start() -> Etcd {
        Etcd::start_cluster(1)
    }

    /// `n` members forming one cluster.
    pub fn start_cluster(n: usize) -> Etcd {
        Etcd::start_with(n, None)
    }

    /// One member serving `https://` and requiring client certificates.
    pub fn start_tls(tls: EtcdTls) -> Etcd {
        Etcd::start_with(1, Some(tls))
    }

    fn start_with(n: usize, tls: Option<EtcdTls>) -> Etcd {
        let binary = find_binary();
        // Ports are chosen free and then released, which can race with another
        // process; a member that fails to bind is retried on new ports.
        for attempt in 0..5 {
            let dir = data_dir();
            let members = (0..n)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client_port: free_port(),
                    peer_port: free_port(),
                    metrics_port: free_port(),
                    child: None,
                })
                .collect();
            let mut etcd = Etcd {
                dir,
                members,
                binary: binary.clone(),
                tls: tls.clone(),
            };
            let all: Vec<usize> = (0..n).collect();
            for &i in &all {
                etcd.spawn_member(i, "new");
            }
            match etcd.wait_healthy(&all, Duration::from_secs(20)) {
                Ok(()) => return etcd,
                Err(why) if attempt < 4 && why.contains("address already in use") => continue,
                Err(why) => panic!("etcd did not start: {why}"),
            }
        }
        unreachable!()
    }

    /// Client URLs of every member.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    pub fn endpoint(&self, member: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[member].client_port)
    }

    /// Kills every member (as a crash would); data stays.
    pub fn stop(&mut self) {
        for i in 0..self.members.len() {
            self.stop_member(i);
        }
    }

    pub fn stop_member(&mut self, member: usize) {
        if let Some(mut child) = self.members[member].child.take() {
            let _already_dead = child.kill();
            let _reaped = child.wait();
        }
    }

    /// Starts every stopped member again on its ports, with its data.
    pub fn restart(&mut self) {
        let stopped: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].child.is_none())
            .collect();
        if let Err(why) = self.respawn(&stopped, "existing") {
            panic!("etcd did not restart: {why}");
        }
    }

    pub fn restart_member(&mut self, member: usize) {
        if let Err(why) = self.respawn(&[member], "existing") {
            panic!("etcd member {member} did not restart: {why}");
        }
    }

    /// Stops everything, deletes the data and starts a fresh cluster on the
    /// same ports: every lease and key is gone and revisions start over.
    pub fn wipe_and_restart(&mut self) {
        self.stop();
        for m in &self.members {
            let _may_not_exist = std::fs::remove_dir_all(self.dir.path().join(&m.name));
        }
        let all: Vec<usize> = (0..self.members.len()).collect();
        if let Err(why) = self.respawn(&all, "new") {
            panic!("etcd did not start after the wipe: {why}");
        }
    }

    /// Freezes a member (SIGSTOP): it keeps its connections open and answers
    /// nothing, as a member cut off by a partition looks to its clients.
    pub fn pause_member(&mut self, member: usize) {
        self.signal(member, "-STOP");
    }

    /// Thaws a member frozen by [`Etcd::pause_member`].
    pub fn resume_member(&mut self, member: usize) {
        self.signal(member, "-CONT");
    }

    fn signal(&mut self, member: usize, signal: &str) {
        let Some(child) = self.members[member].child.as_ref() else {
            panic!("etcd member {member} is not running");
        };
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal} member {member}");
    }

    /// Watch streams a member serves (`etcd_debugging_mvcc_watch_stream_total`
    /// from its `/metrics`); 0 when it does not answer.
    pub fn watch_streams(&self, member: usize) -> u64 {
        let body = get(self.members[member].metrics_port, "/metrics").unwrap_or_default();
        body.lines()
            .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watch_stream_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn_member(&mut self, i: usize, state: &str) {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let m = &self.members[i];
        let data = self.dir.path().join(&m.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("{}.log", m.name)))
            .expect("etcd log file");
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let metrics = format!("http://127.0.0.1:{}", m.metrics_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut command = Command::new(&self.binary);
        if let Some(tls) = &self.tls {
            command
                .arg("--cert-file")
                .arg(&tls.cert)
                .arg("--key-file")
                .arg(&tls.key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = command
            .arg("--listen-metrics-urls")
            .arg(&metrics)
            .arg("--name")
            .arg(&m.name)
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(cluster.join(","))
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--initial-cluster-token")
            .arg(format!("weir-test-{}", self.dir.path().display()))
            .arg("--heartbeat-interval")
            .arg("50")
            .arg("--election-timeout")
            .arg("500")
            .arg("--log-level")
            .arg("warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.binary.display()));
        self.members[i].child = Some(child);
    }

    /// Starts `members` again on their own ports and waits until they are
    /// healthy. While a member was down, another process may have drawn one
    /// of its ports from the ephemeral range for a connection: a member that
    /// cannot bind is started again a moment later (a few times).
    fn respawn(&mut self, members: &[usize], state: &str) -> Result<(), String> {
        for &i in members {
            self.spawn_member(i, state);
        }
        let mut retries = 0;
        loop {
            match self.wait_healthy(members, Duration::from_secs(30)) {
                Err(why) if retries < 5 && why.contains("address already in use") => {
                    retries += 1;
                    std::thread::sleep(Duration::from_secs(1));
                    for &i in members {
                        let exited = self.members[i]
                            .child
                            .as_mut()
                            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))));
                        if exited {
                            self.spawn_member(i, state);
                        }
                    }
                }
                done => return done,
            }
        }
    }

    fn wait_healthy(&mut self, members: &[usize], limit: Duration) -> Result<(), String> {
        let deadline = Instant::now() + limit;
        for &i in members {
            loop {
                if let Some(child) = self.members[i].child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        return Err(format!(
                            "member {i} exited ({status}): {}",
                            self.log_tail(i)
                        ));
                    }
                }
                if health_ok(self.members[i].metrics_port) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "member {i} not healthy within {limit:?}: {}",
                        self.log_tail(i)
                    ));
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
        Ok(())
    }

    fn log_tail(&self, i: usize) -> String {
        let log = std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}.log", self.members[i].name)),
        )
        .unwrap_or_default();
        let start = log.len().saturating_sub(2000);
        log[log
            .char_indices()
            .map(|(i, _)| i)
            .find(|&j| j >= start)
            .unwrap_or(0)..]
            .to_owned()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

/// etcd's `/health` answers `{"health":"true"}` once the member serves.
fn health_ok(port: u16) -> bool {
    get(port, "/health").is_some_and(|body| body.contains("\"health\":\"true\""))
}

/// A blocking GET on a member's client port (briefly bounded): the response.
fn get(port: u16, path: &str) -> Option<String> {
    let mut stream =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
            .ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).ok()?;
    let mut body = String::new();
    let _ = stream.read_to_string(&mut body);
    Some(body)
}

/// GET over HTTP/1.1 (the admin listener): (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, &[]).await
}

/// An HTTP/1.1 request with extra header lines (`Name: value`).
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[&str],
) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: weir\r\nConnection: close\r\nContent-Length: 0\r\n{extra}\r\n"
    );
    s.write_all(request.as_bytes()).await?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await?;
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_whose_port_was_taken_while_down_restarts_once_it_is_free() {
        let mut etcd = Etcd::start();
        etcd.stop_member(0);
        // As a connection drawing the port from the ephemeral range would.
        let taken = TcpListener::bind(("127.0.0.1", etcd.members[0].client_port))
            .expect("the stopped member's port is free");
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(1500));
            drop(taken);
        });
        etcd.restart_member(0);
        release.join().unwrap();
        assert!(health_ok(etcd.members[0].metrics_port));
    }
}
