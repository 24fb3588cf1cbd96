//! Feeding new policy versions in while traffic flows: the policy directory
//! (notify) and etcd (`<prefix>/_policies/<name>`, through discovery).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::set::{policy_name, PolicySet};

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
                                // One write often arrives as several events: install each content once,
                                // so a late duplicate cannot roll back a newer version from etcd.
        let mut installed: HashMap<PathBuf, String> = HashMap::new();
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
                let bytes = match tokio::fs::read(&path).await {
                    Ok(b) => b,
                    Err(err) => {
                        tracing::warn!(policy = name, cause = %err, "policy file unreadable; the loaded version keeps serving");
                        continue;
                    }
                };
                let digest = super::version::digest(&bytes);
                if installed.get(&path) == Some(&digest) {
                    continue;
                }
                let (set, source) = (set.clone(), path.display().to_string());
                let outcome =
                    tokio::task::spawn_blocking(move || set.install(&name, &bytes, source).is_ok())
                        .await;
                match outcome {
                    // Remembered only once installed: a failed attempt may be retried.
                    Ok(true) => {
                        installed.insert(path.clone(), digest);
                    }
                    Ok(false) => {}
                    Err(err) => tracing::error!(cause = %err, "policy install task failed"),
                }
            }
        }
    }))
}

/// Installs the policies discovery reads from etcd.
pub fn spawn_etcd_consumer(
    set: Arc<PolicySet>,
    mut updates: mpsc::Receiver<crate::discovery::policies::PolicyUpdate>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // A re-list after a reconnect delivers every key again: skip what
        // this key already installed, so it cannot undo a newer file version.
        let mut installed: HashMap<String, String> = HashMap::new();
        loop {
            let update = tokio::select! {
                _ = cancel.cancelled() => return,
                u = updates.recv() => match u { Some(u) => u, None => return },
            };
            let digest = super::version::digest(&update.bytes);
            if installed.get(&update.key) == Some(&digest) {
                continue;
            }
            let (set, key) = (set.clone(), update.key.clone());
            let outcome = tokio::task::spawn_blocking(move || {
                set.install(&update.name, &update.bytes, update.key).is_ok()
            })
            .await;
            match outcome {
                Ok(true) => {
                    installed.insert(key, digest);
                }
                Ok(false) => {}
                Err(err) => tracing::error!(cause = %err, "policy install task failed"),
            }
        }
    })
}
