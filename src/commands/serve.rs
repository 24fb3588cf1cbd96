//! `weir serve`: run the gateway until SIGTERM or SIGINT, then drain.
//! SIGHUP reopens the access log (after a rotation).

use std::path::Path;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::server::Gateway;

pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    // The handlers first, so a signal during start-up is not the default kill.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let config = Config::load(config_path)?;
    let gateway = Gateway::start(config)
        .await
        .context("starting the gateway")?;
    loop {
        tokio::select! {
            _ = terminate.recv() => {
                tracing::info!("SIGTERM: draining");
                break;
            }
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT: draining");
                break;
            }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reopening the access log");
                gateway.reopen_logs();
            }
        }
    }
    gateway.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
