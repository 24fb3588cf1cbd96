//! `weir serve`: puts discovery, the upstreams and the proxy together behind
//! the gRPC listener and the admin listener, and drains on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::balance::{Balancer, RoundRobin};
use crate::config::{Config, RouteConfig};
use crate::discovery::{self, EtcdConfig, ServiceTable};
use crate::listener::Runtimes;
use crate::metrics::{ClientConnMetrics, DiscoveryMetrics, PolicyMetrics, ProxyMetrics};
use crate::policy::rollout::Guards;
use crate::policy::{self, PolicyEngine, PolicySet};
use crate::proxy::router::Router;
use crate::proxy::services::ServiceRuntimes;
use crate::proxy::{CallCounts, CallLimits, Proxy, ProxyState, RetrySettings};
use crate::telemetry::{Sampler, Telemetry};
use crate::upstream::{
    health, BackendStats, Backends, HealthCheckSettings, OutlierSettings, PoolConfig,
};

mod conn;
mod settings;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("etcd client: {0}")]
    Etcd(#[from] discovery::EtcdError),
    #[error("policies: {0}")]
    Policy(String),
    #[error("{0}")]
    Config(String),
}

/// How long start-up waits for the first etcd listing before listening anyway.
const STARTUP_WAIT: Duration = Duration::from_secs(10);

/// A running gateway.
pub struct Gateway {
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub table: Arc<ServiceTable>,
    pub proxy: Arc<Proxy>,
    pub policies: Arc<PolicySet>,
    /// Where each call's line goes, when `[access_log]` is set.
    access_log: Option<AccessLog>,
    /// Where traced calls' spans go, when `[tracing]` is set.
    telemetry: Option<Arc<Telemetry>>,
    /// What a reload changes besides the routes.
    live: LiveSenders,
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
        let (health, health_settings) = watch::channel(health_settings(&config));
        let (guards, guards_settings) = watch::channel(Guards::from(&config.policy.rollout));
        let live = LiveReceivers {
            sampler,
            health: health_settings,
            guards: guards_settings,
        };
        let parts = start_data_path(&config, live, &mut registry, &tasks, &background).await?;
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
        wait_until_ready(&parts.table).await;

        let stop = CancellationToken::new();
        let draining = CancellationToken::new();
        let connections = TaskTracker::new();
        let limits = Arc::new(conn::ClientLimits::new(
            &config.limits,
            ClientConnMetrics::register(&mut registry),
        ));
        let live = LiveSenders {
            health,
            guards,
            client_limits: limits.clone(),
        };
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
            limits,
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
            table: parts.table,
            proxy: parts.proxy,
            policies: parts.policies,
            access_log: parts.access_log,
            telemetry,
            live,
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
        // Everything that can fail, before anything changes.
        let provenance = policy::provenance::Provenance::new(
            next.policy.allow.clone(),
            &next.policy.trusted_keys,
        )
        .map_err(|e| format!("policy.trusted_keys: {e}; nothing was changed"))?;
        let services = self.proxy.services().clone();
        let router = Router::new(&next.routes, &services, |route| {
            route_policy(&self.policies, route)
        });
        self.proxy.set_router(router);
        self.proxy.state().set_settings(
            CallLimits::from(&next.limits),
            OutlierSettings::from(&next.outlier),
        );
        // A SIGHUP that changed nothing (after a log rotation) must not
        // start budgets afresh nor a health-check round early.
        if next.retry != running.retry {
            services.set_retry(RetrySettings::from(&next.retry));
        }
        self.live.client_limits.set(&next.limits);
        if next.health_check != running.health_check {
            self.live.health.send_replace(health_settings(&next));
        }
        if next.policy.rollout != running.policy.rollout {
            self.live
                .guards
                .send_replace(Guards::from(&next.policy.rollout));
        }
        let policy_limits = policy::Limits::from(&next.policy);
        self.policies
            .engine()
            .set_live_limits(policy_limits.deadline, policy_limits.max_component_bytes);
        self.policies.set_provenance(provenance);
        if let (Some(telemetry), Some(tracing)) = (&self.telemetry, &next.tracing) {
            telemetry.sampler().set_ratio(tracing.sample_ratio);
        }
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
        if let Some(log) = &self.access_log {
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
        if let Some(log) = self.access_log.clone() {
            let _ = tokio::task::spawn_blocking(move || log.close()).await;
        }
        if let Some(telemetry) = self.telemetry.clone() {
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
        }
    }
}

/// Where the parts that follow a configuration reload read their settings.
struct LiveReceivers {
    sampler: Option<Sampler>,
    health: watch::Receiver<Option<HealthCheckSettings>>,
    guards: watch::Receiver<Guards>,
}

/// The parts of the running gateway a configuration reload changes
/// (besides the router).
struct LiveSenders {
    health: watch::Sender<Option<HealthCheckSettings>>,
    guards: watch::Sender<Guards>,
    client_limits: Arc<conn::ClientLimits>,
}

/// `[health_check]` as the checks take it: `None` when they are off.
fn health_settings(config: &Config) -> Option<HealthCheckSettings> {
    (config.health_check.enabled).then(|| HealthCheckSettings::from(&config.health_check))
}

/// What the data path is made of.
struct DataPath {
    table: Arc<ServiceTable>,
    proxy: Arc<Proxy>,
    policies: Arc<PolicySet>,
    access_log: Option<AccessLog>,
}

/// Discovery, backends, policies and the proxy, with their background
/// tasks (member refresh, health checks) on `tasks`.
async fn start_data_path(
    config: &Config,
    live: LiveReceivers,
    registry: &mut Registry,
    tasks: &TaskTracker,
    background: &CancellationToken,
) -> Result<DataPath, StartError> {
    let access_log = match &config.access_log {
        Some(c) => Some(
            AccessLog::start(c.path.clone(), c.buffer, registry).map_err(|e| {
                let path = c
                    .path
                    .as_ref()
                    .map_or("stdout".into(), |p| p.display().to_string());
                StartError::Config(format!("[access_log] cannot open {path}: {e}"))
            })?,
        ),
        None => None,
    };
    let discovery_metrics = DiscoveryMetrics::register(registry);
    let proxy_metrics = ProxyMetrics::register(registry);
    let policy_metrics = PolicyMetrics::register(registry);
    let etcd = EtcdConfig::from(config);
    let table = discovery::start(&etcd, discovery_metrics, tasks, background.clone()).await?;
    let mut backends = Backends::new(PoolConfig::from(&config.upstream));
    if let Some(t) = &config.upstream.tls {
        let tls = Arc::new(
            crate::tls::ClientTls::load(crate::tls::ClientFiles {
                ca: t.ca.clone(),
                cert: t.cert.clone(),
                key: t.key.clone(),
                server_name: t.server_name.clone(),
            })
            .map_err(|e| StartError::Tls(format!("[upstream.tls] {e}")))?,
        );
        let checked = tls.clone();
        tasks.spawn(reload_tls(
            "upstream TLS material ([upstream.tls])",
            move || checked.reload_if_changed(),
            background.clone(),
        ));
        backends = backends.with_tls(tls);
    }
    let backends = Arc::new(backends);
    let state = Arc::new(ProxyState::new(
        proxy_metrics.clone(),
        backends.clone(),
        OutlierSettings::from(&config.outlier),
        CallLimits::from(&config.limits),
        config.upstream.name_backends_in_errors,
        access_log.clone(),
        live.sampler,
    ));
    let transport = crate::proxy::services::UpstreamTransport {
        tls_by_default: config.upstream.tls.as_ref().is_some_and(|t| t.default),
        services: config
            .routes
            .iter()
            .map(|r| (r.service.clone(), config.upstream_tls_for(r)))
            .collect(),
    };
    let services = Arc::new(ServiceRuntimes::new(
        table.clone(),
        proxy_metrics,
        RetrySettings::from(&config.retry),
        transport,
    ));
    let policies = start_policies(config, policy_metrics, live.guards, tasks, background).await?;
    let router = Router::new(&config.routes, &services, |route| {
        route_policy(&policies, route)
    });
    let proxy = Arc::new(Proxy::new(state, router, services));
    let weir = registry.sub_registry_with_prefix("weir");
    weir.register_collector(Box::new(CallCounts::new(&proxy)));
    weir.register_collector(Box::new(BackendStats(backends.clone())));
    registry
        .sub_registry_with_prefix("weir_policy")
        .register_collector(Box::new(policy::rollout::RolloutMetrics(policies.clone())));
    registry
        .sub_registry_with_prefix("weir_discovery")
        .register_collector(Box::new(discovery::Staleness(table.clone())));
    tasks.spawn(keep_members_current(
        proxy.clone(),
        table.clone(),
        background.clone(),
    ));
    tasks.spawn(health::spawn_health_checks(
        backends,
        live.health,
        background.clone(),
    ));
    Ok(DataPath {
        table,
        proxy,
        policies,
        access_log,
    })
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

/// Waits for the first etcd listing (or the snapshot), so early calls do
/// not find every service empty; after [`STARTUP_WAIT`], serves anyway.
async fn wait_until_ready(table: &ServiceTable) {
    let mut changes = table.subscribe();
    let ready = tokio::time::timeout(STARTUP_WAIT, async {
        while !table.is_ready() {
            if changes.changed().await.is_err() {
                break;
            }
        }
    });
    if ready.await.is_err() {
        tracing::warn!(wait = ?STARTUP_WAIT, "no etcd listing and no snapshot yet: serving anyway, calls get UNAVAILABLE until etcd answers");
    }
}

/// Rebuilds the members of every service the data path knows (routed, or
/// called before) as soon as discovery changes them, so their backends are
/// health-checked before they take calls and no call pays for the rebuild.
async fn keep_members_current(
    proxy: Arc<Proxy>,
    table: Arc<ServiceTable>,
    cancel: CancellationToken,
) {
    let mut changes = table.subscribe();
    loop {
        let backends = &proxy.state().backends;
        for service in proxy.services().all() {
            service.members(backends);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = changes.changed() => if changed.is_err() { return },
        }
    }
}

/// The policy engine, the policies of the directory, and the reloaders.
async fn start_policies(
    config: &Config,
    metrics: PolicyMetrics,
    guards: watch::Receiver<Guards>,
    tasks: &TaskTracker,
    background: &CancellationToken,
) -> Result<Arc<PolicySet>, StartError> {
    let limits = policy::Limits::from(&config.policy);
    let zone = config.zone.as_deref().map(Arc::from);
    let engine = PolicyEngine::new(limits, zone).map_err(|e| StartError::Policy(e.to_string()))?;
    let provenance = policy::provenance::Provenance::new(
        config.policy.allow.clone(),
        &config.policy.trusted_keys,
    )
    .map_err(|e| StartError::Policy(format!("policy.trusted_keys: {e}")))?;
    let set = Arc::new(
        PolicySet::new(Arc::new(engine), config.policy.dir.clone(), metrics)
            .with_provenance(provenance),
    );
    let loader = set.clone();
    let failures = tokio::task::spawn_blocking(move || loader.load_dir())
        .await
        .map_err(|e| StartError::Policy(e.to_string()))?;
    for (name, err) in failures {
        tracing::warn!(policy = name, cause = %err, "policy not loaded at start");
    }
    if let Some(dir) = &config.policy.dir {
        let watch = policy::reload::spawn_dir_watch(set.clone(), dir.clone(), background.clone())
            .map_err(|e| StartError::Policy(format!("watching {}: {e}", dir.display())))?;
        tasks.spawn(async move {
            if let Err(err) = watch.await {
                tracing::error!(cause = %err, "the policy directory watcher stopped; file changes are no longer picked up");
            }
        });
    }
    if config.policy.from_etcd {
        let (watch, published) = discovery::policies::spawn_policy_watch(
            EtcdConfig::from(config).access,
            &config.etcd.prefix,
            EtcdConfig::from(config).follow,
            background.clone(),
        );
        tasks.spawn(watch);
        tasks.spawn(policy::reload::spawn_etcd_consumer(
            set.clone(),
            published,
            background.clone(),
        ));
        if config.policy.rollout.enabled {
            start_rollouts(config, &set, guards, tasks, background);
        }
    }
    for route in &config.routes {
        if route.policy != crate::config::NATIVE_POLICY && !set.has(&route.policy) {
            let known: Vec<String> = set.names();
            if !config.policy.from_etcd {
                return Err(StartError::Policy(format!(
                    "route {:?}: no policy {:?} in the policy directory (loaded: {})",
                    route.path,
                    route.policy,
                    known.join(", ")
                )));
            }
            tracing::warn!(route = %route.path, policy = %route.policy, "policy has no version yet: calls use round-robin until one is published");
        }
    }
    Ok(set)
}

/// Follows the fleet's rollout states (`<prefix>/_rollout/`), guards their
/// candidates, and keeps this gateway's report under `<prefix>/_gateways/`.
fn start_rollouts(
    config: &Config,
    set: &Arc<PolicySet>,
    guards: watch::Receiver<Guards>,
    tasks: &TaskTracker,
    background: &CancellationToken,
) {
    let etcd = EtcdConfig::from(config);
    let prefix = config.etcd.prefix.clone();
    let id = settings::gateway_id(config);
    let (watch, states) = discovery::policies::spawn_key_watch(
        etcd.access.clone(),
        discovery::fleet::rollout_prefix(&prefix),
        etcd.follow,
        background.clone(),
    );
    tasks.spawn(watch);
    tasks.spawn(policy::rollout::spawn(
        set.clone(),
        etcd.access.clone(),
        prefix.clone(),
        states,
        guards,
        id.clone(),
        background.clone(),
    ));
    tasks.spawn(report_to_fleet(
        set.clone(),
        etcd.access,
        prefix,
        id,
        config.policy.rollout.report_every,
        background.clone(),
    ));
}

/// Lease TTL of a gateway's report: a gateway that dies leaves the fleet
/// view this long after.
const REPORT_TTL_SECS: i64 = 10;

/// Keeps `<prefix>/_gateways/<id>` current (written only when it changed)
/// under a lease; revoked on a clean shutdown.
async fn report_to_fleet(
    set: Arc<PolicySet>,
    access: discovery::EtcdAccess,
    prefix: String,
    id: String,
    every: Duration,
    cancel: CancellationToken,
) {
    let Some(client) = discovery::etcd::connect_until(&access, &cancel).await else {
        return;
    };
    let report =
        || serde_json::json!({ "id": id, "policies": policy::rollout::report(&set) }).to_string();
    let (latest, value) = tokio::sync::watch::channel(report());
    let key = format!("{}{id}", discovery::fleet::gateways_prefix(&prefix));
    let registration = crate::register::Registration::keep(client, key, REPORT_TTL_SECS, value);
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = report();
        latest.send_if_modified(|was| {
            let changed = *was != now;
            if changed {
                *was = now;
            }
            changed
        });
    }
    if let Err(err) = registration.deregister().await {
        tracing::debug!(cause = %err, "gateway report not withdrawn (its lease will end)");
    }
}

/// A route's policy: a WebAssembly policy of that name, or the native
/// round-robin when the route asks for `round-robin` and none is loaded.
fn route_policy(policies: &PolicySet, route: &RouteConfig) -> Arc<dyn Balancer> {
    if route.policy == crate::config::NATIVE_POLICY && !policies.has(&route.policy) {
        return Arc::new(RoundRobin::default());
    }
    policies.balancer(&route.policy)
}

/// How often certificate and key files are checked for changes.
pub const TLS_RELOAD_EVERY: Duration = Duration::from_millis(500);

/// Reloads TLS material (`what`) with `check` whenever its files change:
/// new connections use the new material, established ones keep theirs.
async fn reload_tls(
    what: &'static str,
    check: impl Fn() -> crate::tls::Reload + Clone + Send + Sync + 'static,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(TLS_RELOAD_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match tokio::task::spawn_blocking(check.clone()).await {
            Ok(crate::tls::Reload::Unchanged) => {}
            Ok(crate::tls::Reload::Reloaded) => {
                tracing::info!(what, "TLS material reloaded; new connections use it")
            }
            Ok(crate::tls::Reload::Failed(err)) => tracing::warn!(
                what,
                cause = %err,
                "TLS files changed but cannot be used; the previous material keeps serving"
            ),
            Err(err) => tracing::error!(what, cause = %err, "TLS reload task failed"),
        }
    }
}
