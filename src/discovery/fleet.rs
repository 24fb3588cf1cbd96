//! The fleet's policy records in etcd, shared by every gateway of a prefix
//! and by the `weir policy` commands that change them:
//!
//! - `<prefix>.chunks/<digest>/<n>`: a component's bytes, content-addressed
//!   by SHA-256 and cut into chunks under etcd's request limit (1.5 MiB by
//!   default), so a component of any size up to the policy size cap can be
//!   published. Beside the prefix, not under it: every gateway watches
//!   `<prefix>/` for endpoints, and an 18 MB publication under it would
//!   stream to every watcher (gateways, `weir discover --watch`) to be
//!   dropped there; chunks are read only when a manifest names them;
//! - `<prefix>/_versions/<name>/<digest>`: a version's manifest (size, digest,
//!   time, signature): written after its chunks, so a manifest seen means
//!   every chunk is there. Versions stay until deleted;
//! - `<prefix>/_rollout/<name>`: which version runs (current), which is
//!   being tried (candidate), how (shadow or canary, with its share): changed
//!   only by compare-and-swap transactions, so two writers (an operator, a
//!   gateway's guard) never undo each other unknowingly;
//! - `<prefix>/_gateways/<id>`: each gateway's report, bound to its lease.
//!
//! Publishing changes nothing that runs: only a rollout state does.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::etcd::{bounded, EtcdError};

/// Bytes per chunk: with its key and the request's framing, well under
/// etcd's default request limit (1.5 MiB), and a few per response stay
/// under the client's 4 MiB decode limit (chunks are read one at a time).
pub const CHUNK_BYTES: usize = 1 << 20;

/// How long one etcd request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Compare-and-swap attempts before a change gives up (others kept
/// changing the same state meanwhile).
const CAS_ATTEMPTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Refused(String),
    #[error("{key} is unreadable: {cause}")]
    Corrupt { key: String, cause: String },
}

/// A published version: what `weir policy history` lists and what a gateway
/// checks the fetched bytes against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    /// SHA-256 of the component, hex: the version's identity.
    pub digest: String,
    pub size: u64,
    pub chunks: u32,
    /// Seconds since the Unix epoch.
    pub published_at: u64,
    /// The text of the component's `.sig`, if it was signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
}

/// How a candidate is tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// No candidate: the current version places every call.
    #[default]
    Steady,
    /// The candidate picks too, beside the current, on every call; the
    /// call goes where the current picks.
    Shadow,
    /// The candidate places `percent` % of calls.
    Canary,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Steady => "steady",
            Mode::Shadow => "shadow",
            Mode::Canary => "canary",
        }
    }
}

/// The rollout state of one policy name.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RolloutState {
    pub current: Option<String>,
    pub candidate: Option<String>,
    pub mode: Mode,
    /// The candidate's share of calls in canary mode, 0–100.
    #[serde(default)]
    pub percent: f64,
    /// Promote the candidate once it has stayed within its guards this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_promote_after_secs: Option<u64>,
    /// When the candidate was set (seconds since the Unix epoch).
    #[serde(default)]
    pub candidate_since: u64,
    /// The last change: when, by whom, why.
    #[serde(default)]
    pub changed_at: u64,
    #[serde(default)]
    pub changed_by: String,
    #[serde(default)]
    pub reason: String,
}

/// A rollout state as read, with the revision a swap must find unchanged.
#[derive(Debug, Clone)]
pub struct Versioned {
    pub state: RolloutState,
    pub mod_revision: i64,
}

fn base(prefix: &str) -> &str {
    prefix.trim_end_matches('/')
}

pub fn rollout_prefix(prefix: &str) -> String {
    format!("{}/_rollout/", base(prefix))
}

pub fn rollout_key(prefix: &str, name: &str) -> String {
    format!("{}{name}", rollout_prefix(prefix))
}

pub fn versions_prefix(prefix: &str, name: &str) -> String {
    format!("{}/_versions/{name}/", base(prefix))
}

pub fn manifest_key(prefix: &str, name: &str, digest: &str) -> String {
    format!("{}{digest}", versions_prefix(prefix, name))
}

fn chunks_prefix(prefix: &str, digest: &str) -> String {
    format!("{}.chunks/{digest}/", base(prefix))
}

fn chunk_key(prefix: &str, digest: &str, n: u32) -> String {
    format!("{}{n:05}", chunks_prefix(prefix, digest))
}

pub fn gateways_prefix(prefix: &str) -> String {
    format!("{}/_gateways/", base(prefix))
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Stores `bytes` as a version of `name`: chunks first, the manifest last.
/// Publishing the same bytes again returns the manifest already there.
pub async fn publish(
    client: &mut Client,
    prefix: &str,
    name: &str,
    bytes: &[u8],
    signature: Option<String>,
) -> Result<Manifest, FleetError> {
    let digest = sha256_hex(bytes);
    let key = manifest_key(prefix, name, &digest);
    if let Some(existing) = get_manifest(client, &key).await? {
        if existing.signature == signature || signature.is_none() {
            return Ok(existing);
        }
    }
    let pieces: Vec<&[u8]> = bytes.chunks(CHUNK_BYTES).collect();
    for (n, piece) in pieces.iter().enumerate() {
        bounded(
            REQUEST_TIMEOUT,
            client.put(chunk_key(prefix, &digest, n as u32), piece.to_vec(), None),
        )
        .await?;
    }
    let manifest = Manifest {
        name: name.to_owned(),
        digest,
        size: bytes.len() as u64,
        chunks: pieces.len() as u32,
        published_at: now_secs(),
        signature,
    };
    let text = serde_json::to_vec(&manifest).expect("a manifest serializes");
    bounded(REQUEST_TIMEOUT, client.put(key, text, None)).await?;
    Ok(manifest)
}

async fn get_manifest(client: &mut Client, key: &str) -> Result<Option<Manifest>, FleetError> {
    let resp = bounded(REQUEST_TIMEOUT, client.get(key, None)).await?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(None);
    };
    serde_json::from_slice(kv.value())
        .map(Some)
        .map_err(|e| FleetError::Corrupt {
            key: key.to_owned(),
            cause: e.to_string(),
        })
}

/// Every version of `name`, oldest first. An unreadable manifest is
/// skipped and named in the log.
pub async fn history(
    client: &mut Client,
    prefix: &str,
    name: &str,
) -> Result<Vec<Manifest>, FleetError> {
    let resp = bounded(
        REQUEST_TIMEOUT,
        client.get(
            versions_prefix(prefix, name),
            Some(GetOptions::new().with_prefix()),
        ),
    )
    .await?;
    let mut found: Vec<Manifest> = resp
        .kvs()
        .iter()
        .filter_map(|kv| match serde_json::from_slice::<Manifest>(kv.value()) {
            Ok(m) => Some(m),
            Err(err) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), cause = %err, "unreadable policy manifest skipped");
                None
            }
        })
        .collect();
    found.sort_by(|a, b| (a.published_at, &a.digest).cmp(&(b.published_at, &b.digest)));
    Ok(found)
}

/// The version of `name` whose digest is `version` or starts with it (at
/// least 8 characters, and only one may match).
pub async fn resolve(
    client: &mut Client,
    prefix: &str,
    name: &str,
    version: &str,
) -> Result<Manifest, FleetError> {
    let all = history(client, prefix, name).await?;
    let matching: Vec<&Manifest> = all
        .iter()
        .filter(|m| m.digest == version || (version.len() >= 8 && m.digest.starts_with(version)))
        .collect();
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(FleetError::NotFound(format!(
            "no version {version} of policy {name:?} is published (weir policy history {name})"
        ))),
        _ => Err(FleetError::Refused(format!(
            "{version} names more than one version of {name:?}: give more of the digest"
        ))),
    }
}

/// Reads a version's bytes and checks them against its manifest.
pub async fn fetch(
    client: &mut Client,
    prefix: &str,
    manifest: &Manifest,
) -> Result<Vec<u8>, FleetError> {
    let mut bytes = Vec::with_capacity(manifest.size as usize);
    for n in 0..manifest.chunks {
        let key = chunk_key(prefix, &manifest.digest, n);
        let resp = bounded(REQUEST_TIMEOUT, client.get(key.as_str(), None)).await?;
        let Some(kv) = resp.kvs().first() else {
            return Err(FleetError::Corrupt {
                key,
                cause: "chunk missing".into(),
            });
        };
        bytes.extend_from_slice(kv.value());
    }
    let digest = sha256_hex(&bytes);
    if bytes.len() as u64 != manifest.size || digest != manifest.digest {
        return Err(FleetError::Corrupt {
            key: chunks_prefix(prefix, &manifest.digest),
            cause: format!(
                "{} bytes with digest {digest}, the manifest says {} bytes with digest {}",
                bytes.len(),
                manifest.size,
                manifest.digest
            ),
        });
    }
    Ok(bytes)
}

/// Deletes version `digest` of `name`; its chunks go too unless another
/// name published the same bytes. Refused while the rollout uses it.
pub async fn delete(
    client: &mut Client,
    prefix: &str,
    name: &str,
    digest: &str,
) -> Result<(), FleetError> {
    // The manifest goes only if the rollout state is still the one read
    // (one transaction): a rollout that picks this version meanwhile wins,
    // and the delete looks again.
    let mut deleted = false;
    for _ in 0..CAS_ATTEMPTS {
        let read = read_rollout(client, prefix, name).await?;
        if let Some(current) = &read {
            let s = &current.state;
            if s.current.as_deref() == Some(digest) || s.candidate.as_deref() == Some(digest) {
                return Err(FleetError::Refused(format!(
                    "version {digest} of {name:?} is in its rollout (current or candidate): roll it back or promote another first"
                )));
            }
        }
        let key = rollout_key(prefix, name);
        let unchanged = match &read {
            Some(v) => Compare::mod_revision(key.as_str(), CompareOp::Equal, v.mod_revision),
            None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
        };
        let txn = Txn::new()
            .when([unchanged])
            .and_then([TxnOp::delete(manifest_key(prefix, name, digest), None)]);
        if bounded(REQUEST_TIMEOUT, client.txn(txn)).await?.succeeded() {
            deleted = true;
            break;
        }
    }
    if !deleted {
        return Err(FleetError::Refused(format!(
            "the rollout of {name:?} kept changing under this delete ({CAS_ATTEMPTS} tries); try again"
        )));
    }
    let all = bounded(
        REQUEST_TIMEOUT,
        client.get(
            format!("{}/_versions/", base(prefix)),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        ),
    )
    .await?;
    let shared = all
        .kvs()
        .iter()
        .any(|kv| kv.key().ends_with(format!("/{digest}").as_bytes()));
    if !shared {
        bounded(
            REQUEST_TIMEOUT,
            client.delete(
                chunks_prefix(prefix, digest),
                Some(etcd_client::DeleteOptions::new().with_prefix()),
            ),
        )
        .await?;
    }
    Ok(())
}

/// The rollout state of `name`, if it has one.
pub async fn read_rollout(
    client: &mut Client,
    prefix: &str,
    name: &str,
) -> Result<Option<Versioned>, FleetError> {
    let key = rollout_key(prefix, name);
    let resp = bounded(REQUEST_TIMEOUT, client.get(key.as_str(), None)).await?;
    let Some(kv) = resp.kvs().first() else {
        return Ok(None);
    };
    let state = parse_rollout(&key, kv.value())?;
    Ok(Some(Versioned {
        state,
        mod_revision: kv.mod_revision(),
    }))
}

pub fn parse_rollout(key: &str, value: &[u8]) -> Result<RolloutState, FleetError> {
    serde_json::from_slice(value).map_err(|e| FleetError::Corrupt {
        key: key.to_owned(),
        cause: e.to_string(),
    })
}

/// Writes `state` if the key is still at `expected` (its mod revision as
/// read; `None`: the key must not exist) and every version it names is
/// still published. False when someone changed the state first: read it
/// again and decide again; `NotFound` when a version it names was deleted.
pub async fn swap_rollout(
    client: &mut Client,
    prefix: &str,
    name: &str,
    expected: Option<i64>,
    state: &RolloutState,
) -> Result<bool, FleetError> {
    let key = rollout_key(prefix, name);
    let compare = match expected {
        Some(rev) => Compare::mod_revision(key.as_str(), CompareOp::Equal, rev),
        None => Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
    };
    // Every version the state names must still be published (a delete
    // checks the state in its own transaction): in the same transaction.
    let named: Vec<String> = [&state.current, &state.candidate]
        .into_iter()
        .flatten()
        .map(|digest| manifest_key(prefix, name, digest))
        .collect();
    let mut compares = vec![compare];
    compares.extend(
        named
            .iter()
            .map(|m| Compare::create_revision(m.as_str(), CompareOp::Greater, 0)),
    );
    let text = serde_json::to_vec(state).expect("a rollout state serializes");
    let txn = Txn::new()
        .when(compares)
        .and_then([TxnOp::put(key.as_str(), text, None)])
        .or_else(
            named
                .iter()
                .map(|m| TxnOp::get(m.as_str(), Some(GetOptions::new().with_keys_only())))
                .collect::<Vec<_>>(),
        );
    let resp = bounded(REQUEST_TIMEOUT, client.txn(txn)).await?;
    if resp.succeeded() {
        return Ok(true);
    }
    for (manifest, op) in named.iter().zip(resp.op_responses()) {
        if let etcd_client::TxnOpResponse::Get(get) = op {
            if get.kvs().is_empty() {
                return Err(FleetError::NotFound(format!(
                    "{manifest} is gone: the version was deleted; publish it again"
                )));
            }
        }
    }
    Ok(false)
}

/// Reads the state of `name`, asks `change` for the next one and swaps it
/// in; again if someone changed it meanwhile. `change` refuses with a
/// reason (nothing is written then).
pub async fn change_rollout(
    client: &mut Client,
    prefix: &str,
    name: &str,
    mut change: impl FnMut(Option<&RolloutState>) -> Result<RolloutState, String>,
) -> Result<RolloutState, FleetError> {
    for _ in 0..CAS_ATTEMPTS {
        let read = read_rollout(client, prefix, name).await?;
        let next = change(read.as_ref().map(|v| &v.state)).map_err(FleetError::Refused)?;
        if swap_rollout(
            client,
            prefix,
            name,
            read.as_ref().map(|v| v.mod_revision),
            &next,
        )
        .await?
        {
            return Ok(next);
        }
    }
    Err(FleetError::Refused(format!(
        "the rollout of {name:?} kept changing under this change ({CAS_ATTEMPTS} tries); try again"
    )))
}

/// Every gateway's report (`<prefix>/_gateways/`), as JSON values.
pub async fn gateway_reports(
    client: &mut Client,
    prefix: &str,
) -> Result<Vec<serde_json::Value>, FleetError> {
    let resp = bounded(
        REQUEST_TIMEOUT,
        client.get(
            gateways_prefix(prefix),
            Some(GetOptions::new().with_prefix()),
        ),
    )
    .await?;
    Ok(resp
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect())
}

/// Writes this gateway's report under its lease.
pub async fn put_report(
    client: &mut Client,
    prefix: &str,
    id: &str,
    lease: i64,
    report: &serde_json::Value,
) -> Result<(), FleetError> {
    let key = format!("{}{id}", gateways_prefix(prefix));
    let text = serde_json::to_vec(report).expect("a report serializes");
    bounded(
        REQUEST_TIMEOUT,
        client.put(key, text, Some(PutOptions::new().with_lease(lease))),
    )
    .await?;
    Ok(())
}

impl RolloutState {
    /// `current` places every call (no candidate).
    fn steady(current: Option<String>, by: &str, reason: String) -> RolloutState {
        RolloutState {
            current,
            candidate: None,
            mode: Mode::Steady,
            percent: 0.0,
            auto_promote_after_secs: None,
            candidate_since: 0,
            changed_at: now_secs(),
            changed_by: by.to_owned(),
            reason,
        }
    }

    /// `version` runs on every call now (no candidate).
    pub fn set_current(&self, version: &str, by: &str) -> RolloutState {
        RolloutState::steady(
            Some(version.to_owned()),
            by,
            format!("{} made current", short(version)),
        )
    }

    /// `version` tried beside the current one, in `mode` (canary: on
    /// `percent` % of calls).
    pub fn try_candidate(
        &self,
        version: &str,
        mode: Mode,
        percent: f64,
        auto_promote_after_secs: Option<u64>,
        by: &str,
    ) -> Result<RolloutState, String> {
        let Some(current) = &self.current else {
            return Err("no current version to compare a candidate with: make one current first (weir policy rollout NAME VERSION, without --shadow or --canary)".into());
        };
        if current == version {
            return Err(format!("{} is the current version already", short(version)));
        }
        if mode == Mode::Canary && !(0.0..=100.0).contains(&percent) {
            return Err(format!("--canary {percent}: a share is 0 to 100"));
        }
        let now = now_secs();
        Ok(RolloutState {
            current: self.current.clone(),
            candidate: Some(version.to_owned()),
            mode,
            percent: if mode == Mode::Canary { percent } else { 0.0 },
            auto_promote_after_secs,
            candidate_since: now,
            changed_at: now,
            changed_by: by.to_owned(),
            reason: match mode {
                Mode::Canary => format!("{} on {percent}% of calls", short(version)),
                _ => format!("{} in {}", short(version), mode.as_str()),
            },
        })
    }

    /// The candidate becomes the current version.
    pub fn promote(&self, by: &str, reason: &str) -> Result<RolloutState, String> {
        let Some(candidate) = &self.candidate else {
            return Err("no candidate to promote".into());
        };
        Ok(RolloutState::steady(
            Some(candidate.clone()),
            by,
            reason.to_owned(),
        ))
    }

    /// The candidate is dropped; the current version places every call.
    pub fn rollback(&self, by: &str, reason: &str) -> Result<RolloutState, String> {
        if self.candidate.is_none() {
            return Err("no candidate to roll back".into());
        }
        Ok(RolloutState::steady(
            self.current.clone(),
            by,
            reason.to_owned(),
        ))
    }
}

/// The first 12 characters of a digest, for messages.
pub fn short(digest: &str) -> &str {
    digest.get(..12).unwrap_or(digest)
}
