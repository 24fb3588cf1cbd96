//! The registration agent: keeps one instance registered in etcd under a
//! lease for as long as it lives, and removes it at once when it stops.
//!
//! It grants a lease, puts the key, and keeps the lease alive. When the lease
//! is lost (etcd restarted with new data, a keep-alive gap longer than the
//! TTL) it puts the key again under a new lease. [`Registration::deregister`]
//! revokes the lease, so discovery drops the instance without waiting for
//! the TTL. `weir register` is this code behind a command line.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::discovery::etcd::{bounded, Backoff, EtcdError};

/// How the key and value are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KeyFormat {
    /// `<prefix>/<service>/<addr>` = `{"addr","weight","status","metadata"}`
    #[default]
    Weir,
    /// `<prefix>/<service>/<addr>` = `{"Op":0,"Addr","Metadata"}` (etcd's gRPC naming)
    EtcdNaming,
}

/// What to register.
#[derive(Clone, Debug)]
pub struct RegistrationSpec {
    pub prefix: String,
    pub service: String,
    pub addr: String,
    /// Lease TTL in seconds (etcd's granularity).
    pub ttl_secs: i64,
    pub weight: u32,
    pub metadata: BTreeMap<String, String>,
    pub format: KeyFormat,
}

impl RegistrationSpec {
    pub fn new(prefix: &str, service: &str, addr: &str) -> Self {
        RegistrationSpec {
            prefix: prefix.to_owned(),
            service: service.to_owned(),
            addr: addr.to_owned(),
            ttl_secs: 10,
            weight: crate::discovery::key_format::DEFAULT_WEIGHT,
            metadata: BTreeMap::new(),
            format: KeyFormat::Weir,
        }
    }

    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.prefix.trim_end_matches('/'),
            self.service,
            self.addr
        )
    }

    pub fn value(&self) -> String {
        match self.format {
            KeyFormat::Weir => json!({
                "addr": self.addr,
                "weight": self.weight,
                "status": "healthy",
                "metadata": self.metadata,
            }),
            KeyFormat::EtcdNaming => {
                let mut metadata = self.metadata.clone();
                metadata.insert("weight".into(), self.weight.to_string());
                json!({ "Op": 0, "Addr": self.addr, "Metadata": metadata })
            }
        }
        .to_string()
    }

    fn validate(&self) -> Result<(), RegisterError> {
        if !crate::discovery::key_format::is_host_port(&self.addr) {
            return Err(RegisterError::Invalid(format!(
                "address {:?} is not host:port",
                self.addr
            )));
        }
        if self.service.is_empty() || self.service.starts_with('_') {
            return Err(RegisterError::Invalid(format!(
                "service {:?} must be non-empty and not start with '_' (reserved)",
                self.service
            )));
        }
        if self.ttl_secs < 2 {
            return Err(RegisterError::Invalid(
                "ttl must be at least 2 seconds".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("invalid registration: {0}")]
    Invalid(String),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("lease {0} was lost")]
    LeaseLost(i64),
    #[error("keep-alive stream closed")]
    StreamClosed,
    #[error("the registration task stopped: {0}")]
    Task(String),
}

impl From<etcd_client::Error> for RegisterError {
    fn from(err: etcd_client::Error) -> Self {
        RegisterError::Etcd(EtcdError::Request(err))
    }
}

/// Where a registration stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegistrationState {
    Pending,
    Registered { lease: i64 },
}

/// A running registration. Dropping it stops the keep-alives without revoking
/// (as a crash would); call [`Registration::deregister`] to leave cleanly.
pub struct Registration {
    stop: CancellationToken,
    state: watch::Receiver<RegistrationState>,
    task: Option<JoinHandle<Result<(), RegisterError>>>,
    /// The value of a registration whose value never changes.
    _fixed: Option<watch::Sender<String>>,
}

/// A key held under a lease, with its value as it changes.
struct Leased {
    key: String,
    ttl_secs: i64,
    value: watch::Receiver<String>,
}

impl Registration {
    /// Starts registering in the background; it keeps retrying while etcd is down.
    pub fn spawn(client: Client, spec: RegistrationSpec) -> Result<Registration, RegisterError> {
        spec.validate()?;
        let (fixed, value) = watch::channel(spec.value());
        let mut registration = Registration::keep(client, spec.key(), spec.ttl_secs, value);
        registration._fixed = Some(fixed);
        Ok(registration)
    }

    /// Keeps `key` in etcd under a lease of `ttl_secs`, written again
    /// whenever `value` changes (a gateway's report in the fleet view);
    /// gone when the lease ends.
    pub fn keep(
        client: Client,
        key: String,
        ttl_secs: i64,
        value: watch::Receiver<String>,
    ) -> Registration {
        let stop = CancellationToken::new();
        let (tx, rx) = watch::channel(RegistrationState::Pending);
        let leased = Leased {
            key,
            ttl_secs,
            value,
        };
        let task = tokio::spawn(keep_registered(client, leased, tx, stop.clone()));
        Registration {
            stop,
            state: rx,
            task: Some(task),
            _fixed: None,
        }
    }

    pub fn state(&self) -> RegistrationState {
        *self.state.borrow()
    }

    /// Waits until the key is in etcd; returns its lease.
    pub async fn registered(&mut self) -> i64 {
        loop {
            if let RegistrationState::Registered { lease } = *self.state.borrow_and_update() {
                return lease;
            }
            if self.state.changed().await.is_err() {
                return 0;
            }
        }
    }

    /// Watches the state (each re-registration shows as a new lease).
    pub fn subscribe(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// Stops the keep-alives and revokes the lease, removing the key now.
    pub async fn deregister(mut self) -> Result<(), RegisterError> {
        self.stop.cancel();
        let task = self.task.take().expect("task present until deregister");
        task.await.map_err(|e| RegisterError::Task(e.to_string()))?
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn keep_registered(
    mut client: Client,
    mut spec: Leased,
    state: watch::Sender<RegistrationState>,
    stop: CancellationToken,
) -> Result<(), RegisterError> {
    let mut lease: Option<i64> = None;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => Ok(()),
            r = hold(&mut client, &mut spec, &mut lease, &state, &mut backoff) => r,
        };
        match outcome {
            Ok(()) => return revoke(&mut client, lease).await,
            Err(RegisterError::Etcd(err)) if err.is_refused() => {
                tracing::error!(key = %spec.key, cause = %err, "etcd refused the registration; giving up");
                let _best_effort = revoke(&mut client, lease).await;
                return Err(RegisterError::Etcd(err));
            }
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(key = %spec.key, cause = %crate::errors::chain(&err), retry_in = ?delay, "registration interrupted; registering again");
                tokio::select! {
                    _ = stop.cancelled() => return revoke(&mut client, lease).await,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// One stretch of being registered; returns only on an error.
async fn hold(
    client: &mut Client,
    spec: &mut Leased,
    lease: &mut Option<i64>,
    state: &watch::Sender<RegistrationState>,
    backoff: &mut Backoff,
) -> Result<(), RegisterError> {
    let ttl = Duration::from_secs(spec.ttl_secs as u64);
    let timeout = (ttl / 2).min(Duration::from_secs(3));
    // Reuse the lease we had if etcd still knows it; otherwise grant a new one.
    if let Some(id) = *lease {
        let ttl_left = bounded(timeout, client.lease_time_to_live(id, None))
            .await?
            .ttl();
        if ttl_left <= 0 {
            tracing::info!(lease = id, "lease expired while away; granting a new one");
            *lease = None;
        }
    }
    let id = match *lease {
        Some(id) => id,
        None => {
            let granted = bounded(timeout, client.lease_grant(spec.ttl_secs, None)).await?;
            *lease = Some(granted.id());
            granted.id()
        }
    };
    let value = spec.value.borrow_and_update().clone();
    bounded(
        timeout,
        client.put(
            spec.key.as_str(),
            value,
            Some(PutOptions::new().with_lease(id)),
        ),
    )
    .await?;
    let (mut keeper, mut responses) = bounded(timeout, client.lease_keep_alive(id)).await?;
    state.send_replace(RegistrationState::Registered { lease: id });
    tracing::info!(key = %spec.key, lease = id, ttl = spec.ttl_secs, "registered");
    backoff.reset();

    let mut tick = tokio::time::interval((ttl / 3).max(Duration::from_millis(500)));
    let mut last_ack = Instant::now();
    let mut value_open = true;
    loop {
        tokio::select! {
            changed = spec.value.changed(), if value_open => {
                if changed.is_err() {
                    value_open = false; // no more changes: keep the last one
                    continue;
                }
                let value = spec.value.borrow_and_update().clone();
                bounded(
                    timeout,
                    client.put(spec.key.as_str(), value, Some(PutOptions::new().with_lease(id))),
                )
                .await?;
            }
            _ = tick.tick() => {
                if last_ack.elapsed() >= ttl {
                    // etcd may already have dropped the key: start over.
                    *lease = None;
                    return Err(RegisterError::LeaseLost(id));
                }
                keeper.keep_alive().await?;
            }
            msg = responses.message() => match msg? {
                Some(resp) if resp.ttl() > 0 => last_ack = Instant::now(),
                Some(_) => {
                    *lease = None;
                    return Err(RegisterError::LeaseLost(id));
                }
                None => return Err(RegisterError::StreamClosed),
            },
        }
    }
}

async fn revoke(client: &mut Client, lease: Option<i64>) -> Result<(), RegisterError> {
    let Some(id) = lease else { return Ok(()) };
    bounded(Duration::from_secs(2), client.lease_revoke(id)).await?;
    tracing::info!(lease = id, "lease revoked; deregistered");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::key_format::{classify_key, parse_value, KeyKind};

    #[test]
    fn both_formats_read_back_as_the_same_registration() {
        for format in [KeyFormat::Weir, KeyFormat::EtcdNaming] {
            let mut spec = RegistrationSpec::new("/services/", "echo", "127.0.0.1:7001");
            spec.format = format;
            spec.metadata.insert("zone".into(), "a".into());
            spec.weight = 25;
            let key = spec.key();
            assert_eq!(key, "/services/echo/127.0.0.1:7001");
            let KeyKind::Endpoint { service, id } =
                classify_key(&key["/services/".len()..]).unwrap()
            else {
                panic!("not an endpoint key")
            };
            let reg = parse_value(service, id, spec.value().as_bytes()).unwrap();
            assert_eq!(reg.addr, "127.0.0.1:7001");
            assert_eq!(reg.metadata["zone"], "a");
            assert_eq!(reg.weight, 25);
        }
    }

    #[test]
    fn invalid_specs_are_refused() {
        let bad = |f: fn(&mut RegistrationSpec)| {
            let mut s = RegistrationSpec::new("/p", "svc", "127.0.0.1:1");
            f(&mut s);
            s.validate().is_err()
        };
        assert!(bad(|s| s.addr = "nope".into()));
        assert!(bad(|s| s.service = "_policies".into()));
        assert!(bad(|s| s.ttl_secs = 1));
        assert!(!bad(|_| {}));
    }
}
