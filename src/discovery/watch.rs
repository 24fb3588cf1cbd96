//! The task that keeps a [`ServiceTable`] in step with etcd: the table is a
//! [`Follower`] of the prefix, followed by the one etcd session loop.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use super::etcd::{self, Follower, Kv, KvChange, Position, Relist};
use super::table::ServiceTable;
use super::EtcdConfig;

/// Starts the watch task; it runs until `cancel`.
pub fn spawn_watch(
    table: Arc<ServiceTable>,
    config: EtcdConfig,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let prefix = table.prefix().to_owned();
        // Reserved names (`_policies/`, ...) are never services: not listed
        // here, and their events not handed over.
        etcd::follow(
            &config.access,
            &prefix,
            Some("_"),
            config.follow,
            &*table,
            &cancel,
        )
        .await;
    })
}

impl Follower for ServiceTable {
    fn position(&self) -> Option<Position> {
        ServiceTable::position(self)
    }

    fn reset(&self, kvs: &[Kv<'_>], at: Position, reason: Relist) {
        ServiceTable::reset(self, kvs, at, reason.as_str());
    }

    fn apply(&self, changes: &[KvChange<'_>], at: Position) {
        ServiceTable::apply(self, changes, at);
    }

    fn advance_to(&self, at: Position) {
        ServiceTable::advance_to(self, at);
    }

    fn forget_position(&self) {
        ServiceTable::forget_position(self);
    }

    fn heard(&self) {
        ServiceTable::heard(self);
    }

    fn watching(&self, established: bool) {
        let metrics = self.metrics();
        metrics.etcd_connected.set(i64::from(established));
        if !established {
            metrics.watch_restarts.inc();
        }
    }
}
