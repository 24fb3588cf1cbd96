//! Feeding new policy versions in while traffic flows: the policy directory
//! (notify) and etcd (`<prefix>/_policies/<name>`, through discovery).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::set::{policy_name, PolicySet};
use crate::discovery::policies::Published;

/// The suffix of a signature beside a component (file or etcd key).
const SIG: &str = ".sig";

/// A file write settled: the content's digest, modification time, and
/// the signature's digest.
type Written = (String, Option<std::time::SystemTime>, Option<String>);

/// An etcd publication settled: the component's and its signature's.
type Publication = ((u64, i64), Option<(u64, i64)>);

/// A component offered for install, and where it came from.
struct Offer {
    name: String,
    bytes: Vec<u8>,
    /// The text of its `.sig`, if one was found beside it.
    signature: Option<Vec<u8>>,
    source: String,
    /// From etcd (where `[policy] allow` applies) rather than the directory.
    published: bool,
}

/// Writes are often several events (create, write, close): wait this long
/// after the last one before reading the file.
const SETTLE: Duration = Duration::from_millis(10);

/// Watches the policy directory and installs each `<name>.wasm` that changes.
pub fn spawn_dir_watch(
    set: Arc<PolicySet>,
    dir: PathBuf,
    cancel: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, notify::Error> {
    let (tx, mut rx) = mpsc::unbounded_channel::<PathBuf>();
    let mut watcher =
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
            // Opening a file is an event too (inotify's IN_OPEN): reading a
            // component on an event must not make another, or the watch
            // feeds itself (it did: hundreds of wake-ups a second, idle).
            // Only a close after writing is news among the accesses.
            Ok(event) if is_read(&event.kind) => {}
            Ok(event) => {
                for path in event.paths {
                    let _receiver_gone_on_shutdown = tx.send(path);
                }
            }
            Err(err) => tracing::warn!(cause = %err, "policy directory watch error"),
        })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(tokio::spawn(async move {
        let _watcher = watcher; // dropped (and stopped) with this task
                                // One write often arrives as several events: try each content once,
                                // so a late duplicate cannot roll back a newer version from etcd.
                                // Settled by content and modification time: the same write's late
                                // events are skipped; writing the same bytes again is tried again
                                // (a version reverted here comes back when it is written anew).
        let mut settled: HashMap<PathBuf, Written> = HashMap::new();
        loop {
            let first = tokio::select! {
                _ = cancel.cancelled() => return,
                p = rx.recv() => match p { Some(p) => p, None => return },
            };
            let mut changed: HashSet<PathBuf> = HashSet::from([first]);
            // Settle: collect the rest of the burst.
            while let Ok(Some(p)) = tokio::time::timeout(SETTLE, rx.recv()).await {
                changed.insert(p);
            }
            // A signature written (or replaced) beside a component is a
            // reason to try that component again.
            let changed: HashSet<PathBuf> = changed
                .into_iter()
                .map(|p| match p.to_str().and_then(|s| s.strip_suffix(".sig")) {
                    Some(component) => PathBuf::from(component),
                    None => p,
                })
                .collect();
            for path in changed {
                let Some(name) = policy_name(&path) else {
                    continue;
                };
                if !path.exists() {
                    tracing::info!(
                        policy = name,
                        "policy file removed; the loaded version keeps serving"
                    );
                    continue;
                }
                let limit = set.engine().limits().max_component_bytes as u64;
                if let Ok(meta) = tokio::fs::metadata(&path).await {
                    if meta.len() > limit {
                        let set = set.clone();
                        let refused =
                            tokio::task::spawn_blocking(move || set.install_file(&name, &path))
                                .await;
                        if let Ok(Err(err)) = refused {
                            tracing::debug!(cause = %err, "policy file refused by size");
                        }
                        continue;
                    }
                }
                let bytes = match tokio::fs::read(&path).await {
                    Ok(b) => b,
                    Err(err) => {
                        tracing::warn!(policy = name, cause = %err, "policy file unreadable; the loaded version keeps serving");
                        continue;
                    }
                };
                let modified = tokio::fs::metadata(&path)
                    .await
                    .ok()
                    .and_then(|m| m.modified().ok());
                // The signature is part of what was written.
                let mut sig_path = path.as_os_str().to_owned();
                sig_path.push(".sig");
                let signature = tokio::fs::read(&sig_path).await.ok();
                let this_write = (
                    super::version::digest(&bytes),
                    modified,
                    signature.as_deref().map(super::version::digest),
                );
                if settled.get(&path) == Some(&this_write) {
                    continue;
                }
                let source = path.display().to_string();
                let offer = Offer {
                    name,
                    bytes,
                    signature,
                    source,
                    published: false,
                };
                if install_settles(&set, offer).await {
                    settled.insert(path.clone(), this_write);
                }
            }
        }
    }))
}

/// An access that changes nothing: an open, a read, a close after reading.
fn is_read(kind: &notify::EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    matches!(kind, notify::EventKind::Access(access)
        if !matches!(access, AccessKind::Close(AccessMode::Write)))
}

/// Installs the policies discovery reads from etcd: whenever the published
/// set changes, each key whose latest bytes are not settled yet.
pub fn spawn_etcd_consumer(
    set: Arc<PolicySet>,
    mut published: watch::Receiver<Published>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // A re-list after a reconnect shows every key again: skip each put
        // already settled (by its publication), so a re-list can neither undo a
        // newer file version nor bring back a version reverted here. A new
        // put of the same bytes has a new revision: it is tried again.
        let mut settled: HashMap<String, Publication> = HashMap::new();
        let mut before: Published = Published::default();
        loop {
            let latest = published.borrow_and_update().clone();
            for (key, gone) in before
                .iter()
                .filter(|(k, _)| !latest.contains_key(*k) && !k.ends_with(SIG))
            {
                let (set, name, key) = (set.clone(), gone.name.clone(), key.clone());
                settled.remove(&key);
                let removal = tokio::task::spawn_blocking(move || set.remove(&name, &key));
                if let Err(err) = removal.await {
                    tracing::error!(cause = %err, "policy removal task failed");
                }
            }
            before = latest.clone();
            for update in latest.values().filter(|u| !u.key.ends_with(SIG)) {
                // `NAME.sig` beside `NAME` carries its signature.
                let signature = latest.get(&format!("{}{SIG}", update.key));
                let publication = (update.publication, signature.map(|s| s.publication));
                if settled.get(&update.key) == Some(&publication) {
                    continue;
                }
                let offer = Offer {
                    name: update.name.clone(),
                    bytes: update.bytes.clone(),
                    signature: signature.map(|s| s.bytes.clone()),
                    source: update.key.clone(),
                    published: true,
                };
                if install_settles(&set, offer).await {
                    settled.insert(update.key.clone(), publication);
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = published.changed() => if changed.is_err() { return },
            }
        }
    })
}

/// Installs a content off the runtime's threads (it compiles). True when
/// this content is settled for its source: installed, or refused for a
/// reason the same bytes would meet again — so a duplicate event neither
/// rolls back a newer version nor counts one refusal twice. A refusal that
/// may pass on another try (a preempted trial pick) leaves it unsettled.
async fn install_settles(set: &Arc<PolicySet>, offer: Offer) -> bool {
    let set = set.clone();
    let install = move || {
        let Offer {
            name,
            bytes,
            signature,
            source,
            published,
        } = offer;
        if published {
            set.install_published(&name, &bytes, signature.as_deref(), source)
        } else {
            set.install_signed(&name, &bytes, signature.as_deref(), source)
        }
    };
    match tokio::task::spawn_blocking(install).await {
        Ok(Ok(_)) => true,
        Ok(Err(err)) => err.is_final(),
        Err(err) => {
            tracing::error!(cause = %err, "policy install task failed");
            false
        }
    }
}
