//! `weir register`: keep one instance registered until SIGTERM or SIGINT.

use std::time::Duration;

use crate::register::{RegisterError, Registration, RegistrationSpec};

pub async fn run(endpoints: &[String], spec: RegistrationSpec) -> anyhow::Result<()> {
    let client = crate::discovery::connect(endpoints).await?;
    let key = spec.key();
    let mut registration = Registration::spawn(client, spec)?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        lease = registration.registered() => {
            println!("registered {key} (lease {lease:x})");
        }
        _ = terminate.recv() => return Ok(()),
        _ = tokio::signal::ctrl_c() => return Ok(()),
    }
    tokio::select! {
        _ = terminate.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    match tokio::time::timeout(Duration::from_secs(3), registration.deregister()).await {
        Ok(Ok(())) => {
            println!("deregistered {key}");
            Ok(())
        }
        Ok(Err(err)) => Err(err.into()),
        Err(_) => Err(RegisterError::Timeout.into()),
    }
}
