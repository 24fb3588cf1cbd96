//! `weir serve`: run the gateway until SIGTERM or SIGINT, then drain.

use std::path::Path;

use anyhow::Context;

use crate::config::Config;
use crate::server::Gateway;

pub async fn run(config_path: &Path) -> anyhow::Result<()> {
    // The handler first, so a SIGTERM during start-up is not the default kill.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let config = Config::load(config_path)?;
    let gateway = Gateway::start(config)
        .await
        .context("starting the gateway")?;
    tokio::select! {
        _ = terminate.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
    }
    gateway.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}
