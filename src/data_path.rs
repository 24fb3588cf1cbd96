//! The data path: discovery, backends, policies and the proxy, built from a
//! [`Config`] with their background tasks. One core with two faces: the
//! gateway (`server`) puts listeners in front of it; the client-side
//! channel (`client`) hands it a tonic client's calls in-process.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::balance::{Balancer, RoundRobin};
use crate::config::{Config, RouteConfig};
use crate::discovery::{self, EtcdConfig, ServiceTable};
use crate::metrics::{DiscoveryMetrics, PolicyMetrics, ProxyMetrics};
use crate::policy::rollout::Guards;
use crate::policy::{self, PolicyEngine, PolicySet};
use crate::proxy::router::Router;
use crate::proxy::services::ServiceRuntimes;
use crate::proxy::{CallCounts, CallLimits, Proxy, ProxyState, RetrySettings};
use crate::telemetry::Sampler;
use crate::upstream::{
    health, BackendStats, Backends, HealthCheckSettings, OutlierSettings, PoolConfig,
};

mod settings;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
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

/// The data path of a gateway or a client-side channel.
pub struct DataPath {
    pub table: Arc<ServiceTable>,
    pub proxy: Arc<Proxy>,
    pub policies: Arc<PolicySet>,
    /// Where each call's line goes, when `[access_log]` is set.
    pub access_log: Option<AccessLog>,
    /// Where the health checks and the rollout guards read their settings.
    health: watch::Sender<Option<HealthCheckSettings>>,
    guards: watch::Sender<Guards>,
    /// Which calls are traced, when `[tracing]` is set.
    sampler: Option<Sampler>,
}

impl DataPath {
    /// Starts discovery, the backends, the policies (directory, etcd,
    /// rollouts) and the proxy as `config` says, with their background
    /// tasks (member refresh, health checks, watches) on `tasks` until
    /// `background` is cancelled, and their metrics in `registry`.
    /// `policy_files` (name, file) are installed beside the policy
    /// directory's before any call is routed.
    pub async fn start(
        config: &Config,
        sampler: Option<Sampler>,
        policy_files: &[(String, PathBuf)],
        registry: &mut Registry,
        tasks: &TaskTracker,
        background: &CancellationToken,
    ) -> Result<DataPath, StartError> {
        let (health, health_settings) = watch::channel(health_settings(config));
        let (guards, guards_settings) = watch::channel(Guards::from(&config.policy.rollout));
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
            sampler.clone(),
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
        let policies = start_policies(
            config,
            policy_files,
            policy_metrics,
            guards_settings,
            tasks,
            background,
        )
        .await?;
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
            health_settings,
            background.clone(),
        ));
        Ok(DataPath {
            table,
            proxy,
            policies,
            access_log,
            health,
            guards,
            sampler,
        })
    }

    /// Applies what of `next` can change while calls flow (`running`: the
    /// configuration in force): new calls are routed by its routes
    /// (services, policies, options, retries, timeouts) and held to its
    /// call limits, retry budgets and outlier rules; the next health-check
    /// round, guard look and policy install follow its settings; the
    /// sampling ratio changes at once. Calls in flight finish as they
    /// began. What can fail is checked first: on an error nothing changed.
    pub fn apply_live(&self, running: &Config, next: &Config) -> Result<(), String> {
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
        if next.health_check != running.health_check {
            self.health.send_replace(health_settings(next));
        }
        if next.policy.rollout != running.policy.rollout {
            self.guards.send_replace(Guards::from(&next.policy.rollout));
        }
        let policy_limits = policy::Limits::from(&next.policy);
        self.policies
            .engine()
            .set_live_limits(policy_limits.deadline, policy_limits.max_component_bytes);
        self.policies.set_provenance(provenance);
        if let (Some(sampler), Some(tracing)) = (&self.sampler, &next.tracing) {
            sampler.set_ratio(tracing.sample_ratio);
        }
        Ok(())
    }
}

/// `[health_check]` as the checks take it: `None` when they are off.
fn health_settings(config: &Config) -> Option<HealthCheckSettings> {
    (config.health_check.enabled).then(|| HealthCheckSettings::from(&config.health_check))
}

impl DataPath {
    /// Waits up to `wait` for the first etcd listing (or the snapshot), so
    /// early calls do not find every service empty; whether it came.
    pub async fn ready_within(&self, wait: Duration) -> bool {
        let table = &self.table;
        let mut changes = table.subscribe();
        let ready = tokio::time::timeout(wait, async {
            while !table.is_ready() {
                if changes.changed().await.is_err() {
                    break;
                }
            }
        });
        ready.await.is_ok() && table.is_ready()
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
    files: &[(String, PathBuf)],
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
    for (name, path) in files {
        let (installer, named, file) = (set.clone(), name.clone(), path.clone());
        tokio::task::spawn_blocking(move || installer.install_file(&named, &file))
            .await
            .map_err(|e| StartError::Policy(e.to_string()))?
            .map_err(|e| {
                StartError::Policy(format!("policy {name:?} from {}: {e}", path.display()))
            })?;
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
pub async fn reload_tls(
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
