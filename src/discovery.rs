//! Discovery: the live picture of which backend instances exist, read from etcd.
//!
//! Owns everything that talks to etcd on the gateway's side: the watch task
//! ([`watch`]), the lease TTL poller ([`lease`]), the snapshot file
//! ([`snapshot`]), and the [`ServiceTable`] that the hot path reads.

pub mod endpoint;
pub mod key_format;
pub mod lease;
pub mod policies;
pub mod snapshot;
pub mod table;
pub mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use endpoint::{DeclaredHealth, Endpoint, EndpointSet};
pub use lease::{LeaseHandle, LeasePollConfig};
pub use table::{Position, ServiceSlot, ServiceTable};

use crate::metrics::DiscoveryMetrics;

/// How to reach etcd and what to read there.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// Bound on every unary etcd request (list pages, the probe).
    pub request_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub lease_poll: LeasePollConfig,
    /// Where the last known sets are kept; `None` keeps them in memory only.
    pub snapshot: Option<PathBuf>,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        EtcdConfig {
            endpoints,
            prefix: prefix.into(),
            request_timeout: Duration::from_secs(5),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            lease_poll: LeasePollConfig::default(),
            snapshot: None,
        }
    }
}

/// A client for `endpoints`. Connection is lazy: this succeeds while etcd is down.
///
/// HTTP/2 pings go every 10 s: etcd cuts streams of clients that ping more
/// often than its `--grpc-keepalive-min-time` (5 s by default).
pub async fn connect(endpoints: &[String]) -> Result<etcd_client::Client, etcd_client::Error> {
    let options = etcd_client::ConnectOptions::new()
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_connect_timeout(Duration::from_secs(3));
    etcd_client::Client::connect(endpoints, Some(options)).await
}

/// Builds the table (from the snapshot file when there is one) and starts the
/// watch, the lease poller and the snapshot writer on `tasks`.
pub async fn start(
    config: &EtcdConfig,
    metrics: DiscoveryMetrics,
    tasks: &TaskTracker,
    cancel: CancellationToken,
) -> Result<Arc<ServiceTable>, etcd_client::Error> {
    let table = Arc::new(ServiceTable::new(&config.prefix, metrics));
    if let Some(path) = &config.snapshot {
        match snapshot::load(&table, path) {
            Ok(true) => {
                tracing::info!(path = %path.display(), "serving the last known sets from the snapshot until etcd answers")
            }
            Ok(false) => {}
            Err(err) => tracing::warn!(cause = %err, "snapshot ignored"),
        }
    }
    let client = connect(&config.endpoints).await?;
    tasks.spawn(watch::spawn_watch(
        client.clone(),
        table.clone(),
        config.clone(),
        cancel.clone(),
    ));
    tasks.spawn(lease::spawn_lease_poller(
        client,
        table.leases().clone(),
        config.lease_poll,
        cancel.clone(),
    ));
    if let Some(path) = &config.snapshot {
        tasks.spawn(snapshot::spawn_snapshot_writer(
            table.clone(),
            path.clone(),
            Duration::from_millis(500),
            cancel,
        ));
    }
    Ok(table)
}
