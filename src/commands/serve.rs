//! `weir serve`: run the gateway until SIGTERM or SIGINT, then drain.
//! SIGHUP reads the configuration file again (routes change live) and
//! reopens the access log (after a rotation).

use std::path::Path;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::server::Gateway;
use crate::telemetry::{early_logs, init_logs, Telemetry};

/// Runs the gateway configured by the file at `config_path`; `log` is the
/// log filter (EnvFilter syntax).
pub async fn run(config_path: &Path, log: &str) -> anyhow::Result<()> {
    // The handlers first, so a signal during start-up is not the default kill.
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    // Read under a log subscriber of its own: whether calls are traced (the
    // global subscriber's make-up) is in the file, and its warnings count.
    let config = tracing::subscriber::with_default(early_logs(log)?, || Config::load(config_path))?;
    let telemetry = match &config.tracing {
        Some(tracing) => Some(Telemetry::start(tracing).context("starting [tracing]")?),
        None => None,
    };
    init_logs(log, telemetry.as_ref())?;
    let gateway = Gateway::start_traced(config, telemetry)
        .await
        .context("starting the gateway")?;
    loop {
        tokio::select! {
            _ = terminate.recv() => {
                tracing::info!("SIGTERM: draining");
                break;
            }
            _ = interrupt.recv() => {
                tracing::info!("SIGINT: draining");
                break;
            }
            _ = hangup.recv() => {
                reload(&gateway, config_path);
                gateway.reopen_logs();
            }
        }
    }
    // A second SIGTERM or SIGINT cuts the drain delay short.
    let hurry = gateway.hurry();
    tokio::spawn(async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        tracing::info!("second signal: GOAWAY now");
        hurry.cancel();
    });
    gateway.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// SIGHUP: the file read again and applied, or why not (the running
/// configuration stays either way).
fn reload(gateway: &Gateway, config_path: &Path) {
    match Config::load(config_path) {
        Ok(next) => match gateway.reload(next) {
            Ok(routes) => {
                tracing::info!(path = %config_path.display(), routes, "SIGHUP: configuration reloaded")
            }
            Err(why) => {
                tracing::warn!(path = %config_path.display(), "SIGHUP: configuration not reloaded: {why}")
            }
        },
        Err(err) => {
            tracing::warn!(path = %config_path.display(), "SIGHUP: configuration not reloaded, the running one stays: {err:#}")
        }
    }
}
