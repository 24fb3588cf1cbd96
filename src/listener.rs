//! The accept loop every listener uses (the gRPC listener, the admin
//! listener): accept until stopped, back off when accepting fails (out of
//! file descriptors, say) instead of spinning, and track every connection
//! so a shutdown can wait for them.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

const BACKOFF_MIN: Duration = Duration::from_millis(5);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts connections on `listener` until `stop`, serving each with
/// `serve` as a task of `connections`. `name` names the listener in logs.
pub async fn accept_loop<S, F>(
    name: &'static str,
    listener: TcpListener,
    connections: TaskTracker,
    stop: CancellationToken,
    mut serve: S,
) where
    S: FnMut(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut backoff = BACKOFF_MIN;
    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    tracing::warn!(listener = name, cause = %err, retry_in = ?backoff, "accept failed; backing off");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        backoff = BACKOFF_MIN;
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(listener = name, %peer, cause = %err, "cannot set TCP_NODELAY");
        }
        connections.spawn(serve(stream, peer));
    }
}
