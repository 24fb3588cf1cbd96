//! Policies published through etcd, under `<prefix>/_policies/<name>`: the
//! key's value is the component's bytes. Every gateway of a fleet watching
//! the same prefix swaps together.
//!
//! [`PublishedPolicies`] follows that prefix through the one etcd session
//! loop (so it is listed again after a compaction, a wipe or a restore) and
//! offers the latest bytes of every key as a `watch` value: a consumer that
//! is busy compiling sees only the newest version of each key when it looks
//! again, and nothing is ever queued without bound.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::etcd::{self, FollowSettings, Follower, Kv, KvChange, Position, Relist};

/// A policy version read from etcd.
#[derive(Debug)]
pub struct PolicyUpdate {
    pub name: String,
    pub key: String,
    pub bytes: Vec<u8>,
    /// Which publication this is: the etcd history (counted up when etcd was
    /// wiped or restored) and the key's mod revision in it. Publishing the
    /// same bytes again makes a new one (so a version reverted on this
    /// gateway can be installed again); a re-listing does not.
    pub publication: (u64, i64),
}

/// The latest published bytes, by etcd key.
pub type Published = Arc<BTreeMap<String, Arc<PolicyUpdate>>>;

/// The key prefix policies are published under.
pub fn policies_prefix(prefix: &str) -> String {
    format!("{}/_policies/", prefix.trim_end_matches('/'))
}

/// The follower of `<prefix>/_policies/`.
struct PublishedPolicies {
    prefix: String,
    position: Mutex<Option<Position>>,
    /// Counts etcd histories: revisions start over in a wiped etcd.
    history: std::sync::atomic::AtomicU64,
    latest: watch::Sender<Published>,
}

/// Starts following the policies published under `prefix`; the receiver
/// always holds the latest bytes of every policy key.
pub fn spawn_policy_watch(
    access: etcd::EtcdAccess,
    prefix: &str,
    settings: FollowSettings,
    cancel: CancellationToken,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<Published>) {
    spawn_key_watch(access, policies_prefix(prefix), settings, cancel)
}

/// The same follower for any reserved key prefix (the fleet's rollout
/// states, `<prefix>/_rollout/`): the latest value of every key under it,
/// named by the rest of the key.
pub fn spawn_key_watch(
    access: etcd::EtcdAccess,
    key_prefix: String,
    settings: FollowSettings,
    cancel: CancellationToken,
) -> (tokio::task::JoinHandle<()>, watch::Receiver<Published>) {
    let (latest, receiver) = watch::channel(Published::default());
    let follower = PublishedPolicies {
        prefix: key_prefix,
        position: Mutex::new(None),
        history: std::sync::atomic::AtomicU64::new(0),
        latest,
    };
    let task = tokio::spawn(async move {
        let prefix = follower.prefix.clone();
        etcd::follow(&access, &prefix, None, settings, &follower, &cancel).await;
    });
    (task, receiver)
}

impl PublishedPolicies {
    fn update(
        &self,
        key: &[u8],
        value: &[u8],
        revision: i64,
    ) -> Option<(String, Arc<PolicyUpdate>)> {
        let key = String::from_utf8_lossy(key).into_owned();
        let name = key.strip_prefix(&self.prefix)?.to_owned();
        let update = PolicyUpdate {
            name,
            key: key.clone(),
            bytes: value.to_vec(),
            publication: (
                self.history.load(std::sync::atomic::Ordering::Relaxed),
                revision,
            ),
        };
        Some((key, Arc::new(update)))
    }

    fn set_position(&self, at: Position) {
        *self.position.lock().expect("policy position poisoned") = Some(at);
    }
}

impl Follower for PublishedPolicies {
    fn position(&self) -> Option<Position> {
        *self.position.lock().expect("policy position poisoned")
    }

    fn reset(&self, kvs: &[Kv<'_>], at: Position, reason: Relist) {
        if matches!(reason, Relist::RevisionBackwards | Relist::ClusterChanged) {
            // Another history: its revisions say nothing of the old one's.
            self.history
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let listed: BTreeMap<_, _> = kvs
            .iter()
            .filter_map(|kv| self.update(kv.key, kv.value, kv.revision))
            .collect();
        tracing::info!(
            reason = reason.as_str(),
            policies = listed.len(),
            "policies listed from etcd"
        );
        self.latest.send_replace(Arc::new(listed));
        self.set_position(at);
    }

    fn apply(&self, changes: &[KvChange<'_>], at: Position) {
        let mut latest = BTreeMap::clone(&self.latest.borrow());
        for change in changes {
            match *change {
                KvChange::Put {
                    key,
                    value,
                    revision,
                    ..
                } => {
                    if let Some((key, update)) = self.update(key, value, revision) {
                        latest.insert(key, update);
                    }
                }
                KvChange::Delete { key } => {
                    let key = String::from_utf8_lossy(key);
                    latest.remove(&*key);
                    tracing::info!(key = %key, "policy key deleted in etcd; the loaded version keeps serving");
                }
            }
        }
        self.latest.send_replace(Arc::new(latest));
        self.set_position(at);
    }

    fn advance_to(&self, at: Position) {
        self.set_position(at);
    }

    fn forget_position(&self) {
        *self.position.lock().expect("policy position poisoned") = None;
    }
}
