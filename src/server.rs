//! `weir serve`: puts discovery, the upstreams and the proxy together behind
//! the gRPC listener and the admin listener, and drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::data_path::{reload_tls, DataPath};
use crate::discovery::ServiceTable;
use crate::listener::Runtimes;
use crate::metrics::ClientConnMetrics;
use crate::policy::PolicySet;
use crate::proxy::Proxy;
use crate::telemetry::Telemetry;

pub use crate::data_path::{StartError, TLS_RELOAD_EVERY};

mod conn;

/// How long start-up waits for the first etcd listing before listening anyway.
const STARTUP_WAIT: Duration = Duration::from_secs(10);

/// A running gateway.
pub struct Gateway {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub table: Arc<ServiceTable>,
    pub proxy: Arc<Proxy>,
    pub policies: Arc<PolicySet>,
    /// The core behind the listeners (what a reload changes, mostly).
    data: DataPath,
    /// Where traced calls' spans go, when `[tracing]` is set.
    telemetry: Option<Arc<Telemetry>>,
    /// Limits of new client connections (a reload changes them).
    client_limits: Arc<conn::ClientLimits>,
    /// The configuration in force (a reload replaces its routes).
    running: std::sync::Mutex<Config>,
    /// Marks the gateway draining (`/readyz` 503), `drain_delay` before `stop`.
    draining: CancellationToken,
    drain_delay: Duration,
    /// Cuts the drain delay short (a second signal).
    hurry: CancellationToken,
    /// Stops accepting and drains connections.
    stop: CancellationToken,
    /// Stops the background tasks (discovery, health checks, admin).
    background: CancellationToken,
    connections: TaskTracker,
    tasks: TaskTracker,
    drain_timeout: Duration,
    /// Ends the data threads (after a shutdown, or when dropped).
    data_threads: CancellationToken,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.data_threads.cancel();
    }
}

impl Gateway {
    /// Starts discovery, the policies and the data path, binds both
    /// listeners, waits (boundedly) for the first etcd listing, then serves.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        Self::start_traced(config, None).await
    }

    /// [`Gateway::start`], with calls traced through `telemetry` (the
    /// pipeline `[tracing]` describes, started by the caller so the log
    /// subscriber can carry its spans from the first line).
    pub async fn start_traced(
        config: Config,
        telemetry: Option<Telemetry>,
    ) -> Result<Gateway, StartError> {
        let telemetry = telemetry.map(Arc::new);
        let admin_token = match &config.admin_token_file {
            Some(path) => Some(crate::admin::read_token(path).map_err(StartError::Config)?),
            None => None,
        };
        let mut registry = Registry::default();
        let background = CancellationToken::new();
        let tasks = TaskTracker::new();
        if let Some(t) = &telemetry {
            t.register(&mut registry);
        }
        let sampler = telemetry.as_ref().map(|t| t.sampler());
        let parts =
            DataPath::start(&config, sampler, &[], &mut registry, &tasks, &background).await?;
        let grpc = bind(config.listen).await?;
        let admin = bind(config.admin).await?;
        let tls = match &config.tls {
            Some(t) => Some(Arc::new(
                crate::tls::ServerTls::load(crate::tls::ServerFiles {
                    cert: t.cert.clone(),
                    key: t.key.clone(),
                    client_ca: t.client_ca.clone(),
                    client_auth: match t.client_auth {
                        crate::config::ClientAuthMode::Require => crate::tls::ClientAuth::Required,
                        crate::config::ClientAuthMode::Optional => crate::tls::ClientAuth::Optional,
                    },
                })
                .map_err(StartError::Tls)?,
            )),
            None => None,
        };
        if !parts.ready_within(STARTUP_WAIT).await {
            tracing::warn!(wait = ?STARTUP_WAIT, "no etcd listing and no snapshot yet: serving anyway, calls get UNAVAILABLE until etcd answers");
        }

        let stop = CancellationToken::new();
        let draining = CancellationToken::new();
        let connections = TaskTracker::new();
        let limits = Arc::new(conn::ClientLimits::new(
            &config.limits,
            ClientConnMetrics::register(&mut registry),
        ));
        if let Some(tls) = &tls {
            let checked = tls.clone();
            tasks.spawn(reload_tls(
                "listener certificate ([tls])",
                move || checked.reload_if_changed(),
                background.clone(),
            ));
        }
        let data_threads = CancellationToken::new();
        let runtimes = Runtimes::start(config.data_threads() - 1, &data_threads)
            .map_err(|e| StartError::Config(format!("starting the data threads: {e}")))?;
        let threads = runtimes.count();
        tasks.spawn(conn::accept(
            grpc.listener,
            runtimes,
            tls,
            parts.proxy.clone(),
            limits.clone(),
            connections.clone(),
            stop.clone(),
        ));
        let admin_state = crate::admin::AdminState {
            registry: Arc::new(registry),
            table: parts.table.clone(),
            proxy: parts.proxy.clone(),
            policies: parts.policies.clone(),
            token: admin_token,
            draining: draining.clone(),
        };
        tasks.spawn(crate::admin::serve(
            admin.listener,
            admin_state,
            tasks.clone(),
            background.clone(),
        ));
        tracing::info!(grpc_addr = %grpc.addr, admin_addr = %admin.addr, tls = config.tls.is_some(), threads, "weir serving");
        Ok(Gateway {
            grpc_addr: grpc.addr,
            admin_addr: admin.addr,
            table: parts.table.clone(),
            proxy: parts.proxy.clone(),
            policies: parts.policies.clone(),
            data: parts,
            telemetry,
            client_limits: limits,
            running: std::sync::Mutex::new(config.clone()),
            draining,
            drain_delay: config.drain_delay,
            hurry: CancellationToken::new(),
            stop,
            background,
            connections,
            tasks,
            drain_timeout: config.drain_timeout,
            data_threads,
        })
    }

    /// Applies `next`, the configuration file read again (SIGHUP): new calls
    /// are routed by its routes (services, policies, options, retries,
    /// timeouts) and held to its limits, retry budgets and outlier rules;
    /// new connections to its connection limits; the next health-check
    /// round, guard look and policy install to its settings; the sampling
    /// ratio changes at once. Calls in flight finish as they began. A
    /// change to a setting that cannot change while running is refused
    /// whole, naming it, and the running configuration stays. Returns the
    /// routes in force.
    pub fn reload(&self, next: Config) -> Result<usize, String> {
        let mut running = self.running.lock().expect("running config");
        let fixed = running.fixed_differences(&next);
        if !fixed.is_empty() {
            return Err(format!(
                "{} cannot change while weir runs (restart to change them); nothing was changed",
                fixed.join(", ")
            ));
        }
        self.data.apply_live(&running, &next)?;
        self.client_limits.set(&next.limits);
        let routes = next.routes.len();
        *running = next;
        Ok(routes)
    }

    /// Cancelled, cuts `shutdown`'s drain delay short (GOAWAY at once).
    pub fn hurry(&self) -> CancellationToken {
        self.hurry.clone()
    }

    /// Opens the access log file again (SIGHUP, after a rotation).
    pub fn reopen_logs(&self) {
        if let Some(log) = &self.data.access_log {
            log.reopen();
        }
    }

    /// Says it is draining (`/readyz` 503) and serves on for `drain_delay`,
    /// then stops accepting, sends GOAWAY, lets calls in flight finish up to
    /// the drain timeout, and stops everything.
    pub async fn shutdown(self) {
        self.draining.cancel();
        tracing::info!(delay = ?self.drain_delay, "draining: /readyz answers 503; GOAWAY after the drain delay");
        tokio::select! {
            _ = tokio::time::sleep(self.drain_delay) => {}
            _ = self.hurry.cancelled() => tracing::info!("drain delay cut short"),
        }
        self.stop.cancel();
        self.connections.close();
        if tokio::time::timeout(self.drain_timeout, self.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?self.drain_timeout, "drain timeout: closing connections with calls still in flight");
        }
        self.background.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        if let Some(log) = self.data.access_log.clone() {
            let _ = tokio::task::spawn_blocking(move || log.close()).await;
        }
        if let Some(telemetry) = self.telemetry.clone() {
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        }
    }
}

/// A bound listener and the address it got.
struct Bound {
    listener: TcpListener,
    addr: SocketAddr,
}

async fn bind(addr: SocketAddr) -> Result<Bound, StartError> {
    let bind_error = |source| StartError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let addr = listener.local_addr().map_err(bind_error)?;
    Ok(Bound { listener, addr })
}
