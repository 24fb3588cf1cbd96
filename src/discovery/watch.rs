//! The one task that keeps a [`ServiceTable`] in step with etcd.
//!
//! A session lists the prefix (paged, at one revision), then watches from
//! `revision + 1`. When a session ends in an error it is resumed from the last
//! revision the table applied, after a capped, jittered backoff. A compacted
//! start revision, a revision that went backwards, or a different cluster
//! forces a re-list, applied as one reset. Only progress that etcd confirms
//! (events, progress notifications) ever moves the revision.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio_util::sync::CancellationToken;

use super::table::{Kv, KvChange, Position, ServiceTable};
use super::EtcdConfig;

/// Why a watch session ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("etcd request failed: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    #[error("watch start revision {requested} was compacted (oldest kept: {compacted})")]
    Compacted { requested: i64, compacted: i64 },
    #[error("etcd cancelled the watch: {0}")]
    Cancelled(String),
    #[error("etcd closed the watch stream")]
    Closed,
    #[error("etcd response without a header")]
    NoHeader,
}

const LIST_PAGE: i64 = 1000;

/// Starts the watch task; it runs until `cancel`.
pub fn spawn_watch(
    client: Client,
    table: Arc<ServiceTable>,
    config: EtcdConfig,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
        loop {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                outcome = run_session(client.clone(), &table, &config, &mut backoff) => outcome,
            };
            table.metrics().etcd_connected.set(0);
            table.metrics().watch_restarts.inc();
            let err = match outcome {
                Ok(never) => match never {},
                Err(err) => err,
            };
            let delay = if let WatchError::Compacted { .. } = err {
                // The history we would resume from is gone: re-list at once.
                table.forget_position();
                Duration::ZERO
            } else {
                backoff.next_delay()
            };
            tracing::warn!(cause = %err, retry_in = ?delay, "etcd watch session ended; resuming");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    })
}

enum Never {}

async fn run_session(
    mut client: Client,
    table: &ServiceTable,
    config: &EtcdConfig,
    backoff: &mut Backoff,
) -> Result<Never, WatchError> {
    let prefix = table.prefix().to_owned();
    let timeout = config.request_timeout;
    // A one-key read tells the cluster and its current revision.
    let probe = deadline(
        timeout,
        client.get(
            prefix.as_str(),
            Some(
                GetOptions::new()
                    .with_prefix()
                    .with_keys_only()
                    .with_limit(1),
            ),
        ),
    )
    .await?;
    let head = probe.header().ok_or(WatchError::NoHeader)?;
    let now = Position {
        cluster_id: head.cluster_id(),
        revision: head.revision(),
    };
    let start = match table.position() {
        Some(at) if at.cluster_id == now.cluster_id && at.revision <= now.revision => {
            at.revision + 1
        }
        known => {
            let reason = match known {
                None if !table.is_ready() => "start",
                None => "compacted",
                Some(at) if at.cluster_id != now.cluster_id => "cluster_changed",
                Some(_) => "revision_backwards",
            };
            let listed = list(&mut client, &prefix, now.revision, timeout).await?;
            tracing::info!(
                reason,
                revision = now.revision,
                keys = listed.len(),
                "listed etcd prefix"
            );
            let kvs: Vec<Kv<'_>> = listed
                .iter()
                .map(|kv| Kv {
                    key: kv.key(),
                    value: kv.value(),
                    lease: kv.lease(),
                })
                .collect();
            table.reset(&kvs, now, reason);
            now.revision + 1
        }
    };

    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(start)
        .with_progress_notify();
    let mut stream = deadline(timeout, client.watch(prefix.as_str(), Some(options))).await?;
    table.metrics().etcd_connected.set(1);
    backoff.reset();
    loop {
        let Some(resp) = stream.message().await? else {
            return Err(WatchError::Closed);
        };
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                return Err(WatchError::Compacted {
                    requested: start,
                    compacted: resp.compact_revision(),
                });
            }
            return Err(WatchError::Cancelled(resp.cancel_reason().to_owned()));
        }
        let cluster_id = resp.header().map_or(now.cluster_id, |h| h.cluster_id());
        let events = resp.events();
        if events.is_empty() {
            // Creation ack or progress notification: every event up to the
            // header revision has been delivered.
            if !resp.created() {
                if let Some(h) = resp.header() {
                    table.advance_to(Position {
                        cluster_id,
                        revision: h.revision(),
                    });
                }
            }
            continue;
        }
        let mut revision = 0;
        let changes: Vec<KvChange<'_>> = events
            .iter()
            .filter_map(|ev| {
                let kv = ev.kv()?;
                revision = revision.max(kv.mod_revision());
                Some(match ev.event_type() {
                    EventType::Put => KvChange::Put {
                        key: kv.key(),
                        value: kv.value(),
                        lease: kv.lease(),
                    },
                    EventType::Delete => KvChange::Delete { key: kv.key() },
                })
            })
            .collect();
        table.apply(
            &changes,
            Position {
                cluster_id,
                revision,
            },
        );
    }
}

/// Lists every key under `prefix` at `revision`, a page at a time, so a large
/// fleet never needs one response bigger than the client's message limit.
async fn list(
    client: &mut Client,
    prefix: &str,
    revision: i64,
    timeout: Duration,
) -> Result<Vec<etcd_client::KeyValue>, WatchError> {
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut all = Vec::new();
    loop {
        let options = GetOptions::new()
            .with_range(end.clone())
            .with_revision(revision)
            .with_limit(LIST_PAGE);
        let mut page = deadline(timeout, client.get(from.clone(), Some(options))).await?;
        let more = page.more();
        let kvs = page.take_kvs();
        let Some(last) = kvs.last() else { break };
        from = last.key().to_vec();
        from.push(0);
        all.extend(kvs);
        if !more {
            break;
        }
    }
    Ok(all)
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

async fn deadline<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, WatchError> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| WatchError::Timeout(limit))?
        .map_err(WatchError::from)
}

/// Capped exponential backoff with full jitter.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            current: min,
        }
    }

    pub fn reset(&mut self) {
        self.current = self.min;
    }

    pub fn next_delay(&mut self) -> Duration {
        let cap = self.current;
        self.current = (self.current * 2).min(self.max);
        let jitter = rand::random_range(0.5..=1.0);
        cap.mul_f64(jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/svc/"), b"/svc0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<_> = (0..8).map(|_| b.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(1)));
        assert!(delays[7] >= Duration::from_millis(500));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
