//! Policies published through etcd, under `<prefix>/_policies/<name>`: the
//! key's value is the component's bytes. Every gateway of a fleet watching
//! the same prefix swaps together. Listed, then watched from the next
//! revision; resumed after errors, re-listed after a compaction.

use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::watch::Backoff;

/// A policy version read from etcd.
#[derive(Debug)]
pub struct PolicyUpdate {
    pub name: String,
    pub key: String,
    pub bytes: Vec<u8>,
}

/// The key prefix policies are published under.
pub fn policies_prefix(prefix: &str) -> String {
    format!("{}/_policies/", prefix.trim_end_matches('/'))
}

pub fn spawn_policy_watch(
    client: Client,
    prefix: &str,
    updates: mpsc::Sender<PolicyUpdate>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let prefix = policies_prefix(prefix);
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut revision: Option<i64> = None;
        loop {
            let outcome = tokio::select! {
                _ = cancel.cancelled() => return,
                r = session(client.clone(), &prefix, &mut revision, &updates, &mut backoff) => r,
            };
            let delay = backoff.next_delay();
            tracing::warn!(cause = %outcome, retry_in = ?delay, "etcd policy watch ended; resuming");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    })
}

/// Runs until an error; `revision` is the last one applied.
async fn session(
    mut client: Client,
    prefix: &str,
    revision: &mut Option<i64>,
    updates: &mpsc::Sender<PolicyUpdate>,
    backoff: &mut Backoff,
) -> String {
    if revision.is_none() {
        let listed = match client
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await
        {
            Ok(r) => r,
            Err(e) => return format!("listing {prefix}: {e}"),
        };
        for kv in listed.kvs() {
            if !send(prefix, kv.key(), kv.value(), updates).await {
                return "the policy consumer stopped".into();
            }
        }
        *revision = Some(listed.header().map_or(0, |h| h.revision()));
    }
    let start = revision.unwrap_or(0) + 1;
    let options = WatchOptions::new().with_prefix().with_start_revision(start);
    let mut stream = match client.watch(prefix, Some(options)).await {
        Ok(s) => s,
        Err(e) => return format!("watching {prefix}: {e}"),
    };
    backoff.reset();
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return "the watch stream closed".into(),
            Err(e) => return format!("watch: {e}"),
        };
        if resp.canceled() {
            if resp.compact_revision() > 0 {
                *revision = None; // history gone: list again
            }
            return format!("watch cancelled: {}", resp.cancel_reason());
        }
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            *revision = Some(kv.mod_revision());
            match ev.event_type() {
                EventType::Put => {
                    if !send(prefix, kv.key(), kv.value(), updates).await {
                        return "the policy consumer stopped".into();
                    }
                }
                EventType::Delete => {
                    tracing::info!(key = %String::from_utf8_lossy(kv.key()), "policy key deleted in etcd; the loaded version keeps serving");
                }
            }
        }
    }
}

async fn send(
    prefix: &str,
    key: &[u8],
    value: &[u8],
    updates: &mpsc::Sender<PolicyUpdate>,
) -> bool {
    let key = String::from_utf8_lossy(key).into_owned();
    let Some(name) = key.strip_prefix(prefix).map(str::to_owned) else {
        return true;
    };
    updates
        .send(PolicyUpdate {
            name,
            key,
            bytes: value.to_vec(),
        })
        .await
        .is_ok()
}
