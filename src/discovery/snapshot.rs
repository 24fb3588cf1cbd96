//! The last known endpoint sets on disk, so a gateway can start and serve
//! while etcd is unreachable. Written atomically (temp file, fsync, rename).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::endpoint::DeclaredHealth;
use super::etcd::Position;
use super::key_format::Registration;
use super::table::{RestoredEndpoint, ServiceTable};

const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot read snapshot {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write snapshot {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {path} is not a weir snapshot: {source}")]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("snapshot {path} has format {found}, this weir reads {FORMAT}")]
    Format { path: PathBuf, found: u32 },
}

#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    format: u32,
    position: Option<Position>,
    services: BTreeMap<String, Vec<SavedEndpoint>>,
}

#[derive(Serialize, Deserialize)]
struct SavedEndpoint {
    key: String,
    addr: String,
    weight: u32,
    health: DeclaredHealth,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    lease: i64,
}

/// Writes the table to `path`.
pub fn save(table: &ServiceTable, path: &Path) -> Result<(), SnapshotError> {
    // Position first: content read after it is at least as new, and replaying
    // events over newer content is harmless, while skipping them is not.
    let position = table.position();
    let services = table
        .services()
        .into_iter()
        .filter(|(_, set)| !set.is_empty())
        .map(|(name, set)| {
            let eps = set
                .endpoints
                .iter()
                .map(|e| SavedEndpoint {
                    key: e.key.to_string(),
                    addr: e.addr.to_string(),
                    weight: e.weight,
                    health: e.health,
                    metadata: e.metadata.clone(),
                    lease: e.lease_id().unwrap_or(0),
                })
                .collect();
            (name.to_string(), eps)
        })
        .collect();
    let file = SnapshotFile {
        format: FORMAT,
        position,
        services,
    };
    let bytes = serde_json::to_vec(&file).expect("snapshot serialises");
    let write_err = |source| SnapshotError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(write_err)?;
        f.write_all(&bytes).map_err(write_err)?;
        f.sync_all().map_err(write_err)?;
    }
    std::fs::rename(&tmp, path).map_err(write_err)?;
    Ok(())
}

/// Loads `path` into `table`. Returns false when there is no file.
pub fn load(table: &ServiceTable, path: &Path) -> Result<bool, SnapshotError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(source) => {
            return Err(SnapshotError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let file: SnapshotFile =
        serde_json::from_slice(&bytes).map_err(|source| SnapshotError::Parse {
            path: path.to_owned(),
            source,
        })?;
    if file.format != FORMAT {
        return Err(SnapshotError::Format {
            path: path.to_owned(),
            found: file.format,
        });
    }
    let services = file
        .services
        .into_iter()
        .map(|(name, eps)| {
            let eps = eps
                .into_iter()
                .map(|e| RestoredEndpoint {
                    key: e.key.into(),
                    registration: Registration {
                        service: name.clone(),
                        addr: e.addr,
                        weight: e.weight,
                        health: e.health,
                        metadata: e.metadata,
                    },
                    lease: e.lease,
                })
                .collect();
            (Arc::<str>::from(name), eps)
        })
        .collect();
    table.restore(services, file.position);
    Ok(true)
}

/// Saves the table after every burst of changes (at most one write per `every`).
pub fn spawn_snapshot_writer(
    table: Arc<ServiceTable>,
    path: PathBuf,
    every: Duration,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut changes = table.subscribe();
        changes.mark_unchanged();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = changes.changed() => if r.is_err() { return },
            }
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::time::sleep(every) => {}
            }
            if !table.is_ready() {
                continue;
            }
            let (t, p) = (table.clone(), path.clone());
            match tokio::task::spawn_blocking(move || save(&t, &p)).await {
                Ok(Ok(())) => tracing::debug!(path = %path.display(), "snapshot saved"),
                Ok(Err(err)) => {
                    table.metrics().snapshot_failures.inc();
                    tracing::warn!(cause = %err, "snapshot not saved");
                }
                Err(err) => tracing::error!(cause = %err, "snapshot task failed"),
            }
            if cancel.is_cancelled() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::etcd::KvChange;
    use crate::metrics::DiscoveryMetrics;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snap.json");
        let table = ServiceTable::new("/s", DiscoveryMetrics::default());
        let at = Position {
            cluster_id: 3,
            revision: 44,
        };
        table.apply(
            &[KvChange::Put {
                key: b"/s/a/h:1",
                value: br#"{"weight":3,"metadata":{"zone":"z"}}"#,
                lease: 77,
                revision: 1,
            }],
            at,
        );
        save(&table, &path).unwrap();
        let back = ServiceTable::new("/s", DiscoveryMetrics::default());
        assert!(load(&back, &path).unwrap());
        assert!(back.is_ready());
        assert_eq!(back.position(), Some(at));
        let e = &back.get("a").unwrap().endpoints[0];
        assert_eq!((&*e.addr, e.weight, e.lease_id()), ("h:1", 3, Some(77)));
        assert_eq!(e.metadata["zone"], "z");
    }

    #[test]
    fn missing_and_corrupt_files() {
        let dir = tempfile::tempdir().unwrap();
        let table = ServiceTable::new("/s", DiscoveryMetrics::default());
        assert!(!load(&table, &dir.path().join("none")).unwrap());
        let bad = dir.path().join("bad");
        std::fs::write(&bad, b"{nope").unwrap();
        assert!(matches!(
            load(&table, &bad),
            Err(SnapshotError::Parse { .. })
        ));
        assert!(!table.is_ready());
    }
}
