//! HTTP/2 connections to one backend, shared by every call to it.
//!
//! A pool keeps `n` connections; calls are spread over them and
//! multiplexed on each. Each connects on first use and again after its
//! connection closes. Callers that find one connecting wait for that one
//! attempt; no lock is held across the wait.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::replay::ReplayBody;

#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// HTTP/2 connections kept to each backend.
    pub connections: usize,
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            connections: 1,
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {addr} timed out after {after:?}")]
    Timeout { addr: Arc<str>, after: Duration },
    #[error("connect to {addr} failed: {cause}")]
    Io {
        addr: Arc<str>,
        cause: Arc<std::io::Error>,
    },
    #[error("HTTP/2 handshake with {addr} failed: {cause}")]
    Handshake {
        addr: Arc<str>,
        cause: Arc<hyper::Error>,
    },
}

pub type Sender = SendRequest<ReplayBody>;
type Attempt = watch::Receiver<Option<Result<Sender, ConnectError>>>;

enum ConnState {
    Idle,
    Connecting(Attempt),
    Ready(Sender),
}

pub struct Pool {
    addr: Arc<str>,
    config: PoolConfig,
    conns: Box<[Mutex<ConnState>]>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish()
    }
}

impl Pool {
    pub fn new(addr: Arc<str>, config: PoolConfig) -> Self {
        let conns = (0..config.connections.max(1))
            .map(|_| Mutex::new(ConnState::Idle))
            .collect();
        Pool {
            addr,
            config,
            conns,
            next: AtomicUsize::new(0),
        }
    }

    /// A sender on an open connection, connecting first if needed.
    pub async fn sender(&self) -> Result<Sender, ConnectError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        let mut attempt = {
            let mut conn = self.conns[i].lock().expect("pool connection poisoned");
            match &*conn {
                ConnState::Ready(s) if !s.is_closed() => return Ok(s.clone()),
                ConnState::Connecting(rx) => rx.clone(),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    *conn = ConnState::Connecting(rx.clone());
                    tokio::spawn(connect_into(self.addr.clone(), self.config.clone(), tx));
                    rx
                }
            }
        };
        let outcome = loop {
            if let Some(outcome) = attempt.borrow_and_update().clone() {
                break outcome;
            }
            if attempt.changed().await.is_err() {
                break Err(ConnectError::Io {
                    addr: self.addr.clone(),
                    cause: Arc::new(std::io::Error::other("connect task ended")),
                });
            }
        };
        let mut conn = self.conns[i].lock().expect("pool connection poisoned");
        if let ConnState::Connecting(rx) = &*conn {
            if rx.same_channel(&attempt) {
                *conn = match &outcome {
                    Ok(s) => ConnState::Ready(s.clone()),
                    Err(_) => ConnState::Idle,
                };
            }
        }
        outcome
    }

    /// True when some conn holds an open connection.
    pub fn is_connected(&self) -> bool {
        self.conns.iter().any(|s| {
            matches!(&*s.lock().expect("pool connection poisoned"), ConnState::Ready(s) if !s.is_closed())
        })
    }
}

async fn connect_into(
    addr: Arc<str>,
    config: PoolConfig,
    done: watch::Sender<Option<Result<Sender, ConnectError>>>,
) {
    let outcome = connect(&addr, &config).await;
    done.send_replace(Some(outcome));
}

async fn connect(addr: &Arc<str>, config: &PoolConfig) -> Result<Sender, ConnectError> {
    let stream = tokio::time::timeout(config.connect_timeout, TcpStream::connect(&**addr))
        .await
        .map_err(|_| ConnectError::Timeout {
            addr: addr.clone(),
            after: config.connect_timeout,
        })?
        .map_err(|e| ConnectError::Io {
            addr: addr.clone(),
            cause: Arc::new(e),
        })?;
    if let Err(err) = stream.set_nodelay(true) {
        // Still usable, only slower for small frames.
        tracing::debug!(backend = %addr, cause = %err, "cannot set TCP_NODELAY");
    }
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        .keep_alive_while_idle(true)
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ConnectError::Handshake {
            addr: addr.clone(),
            cause: Arc::new(e),
        })?;
    let addr = addr.clone();
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(backend = %addr, cause = %err, "upstream connection ended");
        }
    });
    Ok(sender)
}
