//! `weir register`: keep one instance registered until SIGTERM or SIGINT.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use crate::discovery::etcd::EtcdError;
use crate::register::{RegisterError, Registration, RegistrationSpec};

/// How long a stopping agent waits for etcd to revoke its lease.
const DEREGISTER_WAIT: Duration = Duration::from_secs(3);

pub async fn run(endpoints: &[String], spec: RegistrationSpec) -> anyhow::Result<()> {
    // Handlers first: once the key can be in etcd, a SIGTERM must revoke it,
    // never kill the process with the default action.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let client = crate::discovery::connect(endpoints).await?;
    let key = spec.key();
    let mut registration = Registration::spawn(client, spec)?;
    let stopped_early = tokio::select! {
        lease = registration.registered() => {
            println!("registered {key} (lease {lease:x})");
            false
        }
        _ = terminate.recv() => true,
        _ = interrupt.recv() => true,
    };
    if !stopped_early {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
    }
    // Revokes the lease if one was granted, even before the key was confirmed.
    match tokio::time::timeout(DEREGISTER_WAIT, registration.deregister()).await {
        Ok(Ok(())) => {
            println!("deregistered {key}");
            Ok(())
        }
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(RegisterError::Etcd(EtcdError::Timeout(DEREGISTER_WAIT)).into()),
    }
}
