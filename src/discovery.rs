//! Discovery: the live picture of which backend instances exist, read from etcd.
//!
//! Owns everything that talks to etcd on the gateway's side: the watch task
//! ([`watch`]), the lease TTL poller ([`lease`]), the snapshot file
//! ([`snapshot`]), and the [`ServiceTable`] that the hot path reads.

mod endpoint;
pub mod etcd;
pub mod fleet;
pub(crate) mod key_format;
mod lease;
pub(crate) mod policies;
mod snapshot;
mod table;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use endpoint::{DeclaredHealth, Endpoint, EndpointSet};
pub use etcd::{connect, EtcdAccess, EtcdError, FollowSettings, Position};
pub use lease::{LeaseHandle, LeasePollConfig};
pub use table::{ServiceSlot, ServiceTable};
pub use watch::spawn_watch;

use crate::metrics::DiscoveryMetrics;

/// How to reach etcd and what to read there.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    pub access: EtcdAccess,
    pub prefix: String,
    /// Request bounds and backoff of the watch sessions.
    pub follow: FollowSettings,
    pub lease_poll: LeasePollConfig,
    /// Where the last known sets are kept; `None` keeps them in memory only.
    pub snapshot: Option<PathBuf>,
}

impl EtcdConfig {
    pub fn new(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        EtcdConfig {
            access: EtcdAccess::new(endpoints),
            prefix: prefix.into(),
            follow: FollowSettings::default(),
            lease_poll: LeasePollConfig::default(),
            snapshot: None,
        }
    }
}

/// Builds the table (from the snapshot file when there is one) and starts the
/// watch, the lease poller and the snapshot writer on `tasks`.
pub async fn start(
    config: &EtcdConfig,
    metrics: DiscoveryMetrics,
    tasks: &TaskTracker,
    cancel: CancellationToken,
) -> Result<Arc<ServiceTable>, EtcdError> {
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
    config.access.check()?;
    // Both wait for etcd as long as it takes (credentials are checked by
    // etcd): the snapshot, if any, serves meanwhile.
    tasks.spawn(watch::spawn_watch(
        table.clone(),
        config.clone(),
        cancel.clone(),
    ));
    let (access, leases, lease_poll, stop) = (
        config.access.clone(),
        table.leases().clone(),
        config.lease_poll,
        cancel.clone(),
    );
    tasks.spawn(async move {
        if let Some(client) = etcd::connect_until(&access, &stop).await {
            let _ended = lease::spawn_lease_poller(client, leases, lease_poll, stop).await;
        }
    });
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

/// `weir_discovery_seconds_since_heard`: how long since etcd last said
/// anything on the watch; the endpoint sets are at least this old.
#[derive(Debug)]
pub struct Staleness(pub Arc<ServiceTable>);

impl prometheus_client::collector::Collector for Staleness {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let Some(age) = self.0.since_heard() else {
            return Ok(());
        };
        let mut metric = encoder.encode_descriptor(
            "seconds_since_heard",
            "seconds since etcd last said anything on the watch (events, progress); absent before it ever did",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        metric.encode_gauge(&age.as_secs_f64())
    }
}
