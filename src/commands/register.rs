//! `weir register`: keep one instance registered until SIGTERM or SIGINT.

use std::time::Duration;

use tokio::signal::unix::{signal, SignalKind};

use crate::discovery::etcd::{EtcdAccess, EtcdError};
use crate::register::{RegisterError, Registration, RegistrationSpec};

/// How long a stopping agent waits for etcd to revoke its lease.
const DEREGISTER_WAIT: Duration = Duration::from_secs(3);

pub async fn run(access: &EtcdAccess, spec: RegistrationSpec) -> anyhow::Result<()> {
    // Handlers first: once the key can be in etcd, a SIGTERM must revoke it,
    // never kill the process with the default action.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let client = crate::discovery::connect(access).await?;
    let key = spec.key();
    let mut registration = Registration::spawn(client, spec)?;
    let stopped_early = tokio::select! {
        lease = registration.registered() => {
            if lease == 0 {
                // The agent gave up (etcd refused it): say why.
                let ended = registration.deregister().await;
                let cause = ended.err().map(|e| e.to_string()).unwrap_or_else(|| "the registration ended".into());
                anyhow::bail!("registering {key}: {cause}");
            }
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
