//! HTTP/2 connections to one backend, shared by every call to it.
//!
//! A pool keeps `n` connection slots; calls are spread over them and
//! multiplexed on each. A slot connects on first use and again after its
//! connection closes. Callers that find a slot connecting wait for that one
//! attempt; no lock is held across the wait.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::proxy::body::ReplayBody;

#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub connections: usize,
    pub connect_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
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

enum SlotState {
    Idle,
    Connecting(Attempt),
    Ready(Sender),
}

pub struct Pool {
    addr: Arc<str>,
    config: PoolConfig,
    slots: Box<[Mutex<SlotState>]>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool").field("addr", &self.addr).finish()
    }
}

impl Pool {
    pub fn new(addr: Arc<str>, config: PoolConfig) -> Self {
        let slots = (0..config.connections.max(1))
            .map(|_| Mutex::new(SlotState::Idle))
            .collect();
        Pool {
            addr,
            config,
            slots,
            next: AtomicUsize::new(0),
        }
    }

    /// A sender on an open connection, connecting first if needed.
    pub async fn sender(&self) -> Result<Sender, ConnectError> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut attempt = {
            let mut slot = self.slots[i].lock().expect("pool slot poisoned");
            match &*slot {
                SlotState::Ready(s) if !s.is_closed() => return Ok(s.clone()),
                SlotState::Connecting(rx) => rx.clone(),
                _ => {
                    let (tx, rx) = watch::channel(None);
                    *slot = SlotState::Connecting(rx.clone());
                    tokio::spawn(connect_slot(self.addr.clone(), self.config.clone(), tx));
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
        let mut slot = self.slots[i].lock().expect("pool slot poisoned");
        if let SlotState::Connecting(rx) = &*slot {
            if rx.same_channel(&attempt) {
                *slot = match &outcome {
                    Ok(s) => SlotState::Ready(s.clone()),
                    Err(_) => SlotState::Idle,
                };
            }
        }
        outcome
    }

    /// True when some slot holds an open connection.
    pub fn is_connected(&self) -> bool {
        self.slots.iter().any(|s| {
            matches!(&*s.lock().expect("pool slot poisoned"), SlotState::Ready(s) if !s.is_closed())
        })
    }
}

async fn connect_slot(
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
    let _ = stream.set_nodelay(true);
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
