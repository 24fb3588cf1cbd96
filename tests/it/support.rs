//! Shared helpers: a discovery running against a real etcd, and waiting on a
//! condition with a deadline (never sleep-and-hope).

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weir::discovery::{self, EtcdConfig, ServiceTable};
use weir::metrics::DiscoveryMetrics;
use weir::testkit::Etcd;

pub const PREFIX: &str = "/services";

/// A discovery (watch, lease poller, optional snapshot writer) under test.
pub struct Discovery {
    pub table: Arc<ServiceTable>,
    pub metrics: DiscoveryMetrics,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Discovery {
    pub async fn start(endpoints: Vec<String>, snapshot: Option<PathBuf>) -> Discovery {
        let mut config = EtcdConfig::new(endpoints, PREFIX);
        config.snapshot = snapshot;
        config.follow.backoff_max = Duration::from_millis(500);
        Discovery::start_with(config).await
    }

    pub async fn start_with(config: EtcdConfig) -> Discovery {
        let metrics = DiscoveryMetrics::default();
        let tasks = TaskTracker::new();
        let cancel = CancellationToken::new();
        let table = discovery::start(&config, metrics.clone(), &tasks, cancel.clone())
            .await
            .expect("discovery starts");
        Discovery {
            table,
            metrics,
            cancel,
            tasks,
        }
    }

    /// Started and synced with `etcd`.
    pub async fn synced(etcd: &Etcd) -> Discovery {
        let d = Discovery::start(etcd.endpoints(), None).await;
        d.wait("first listing", |t| t.is_ready()).await;
        d
    }

    /// Waits (up to 10 s) until `check` holds on the table.
    pub async fn wait(&self, what: &str, check: impl Fn(&ServiceTable) -> bool) {
        self.wait_for(what, Duration::from_secs(10), check).await;
    }

    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        check: impl Fn(&ServiceTable) -> bool,
    ) {
        wait_on(&self.table, what, limit, check).await;
    }

    /// Sorted addresses of `service`.
    pub fn addrs(&self, service: &str) -> Vec<String> {
        addrs(&self.table, service)
    }

    pub async fn stop(self) -> Arc<ServiceTable> {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.table
    }
}

pub fn addrs(table: &ServiceTable, service: &str) -> Vec<String> {
    let mut v: Vec<String> = table
        .get(service)
        .map(|s| s.endpoints.iter().map(|e| e.addr.to_string()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

pub async fn client(etcd: &Etcd) -> etcd_client::Client {
    discovery::connect(&discovery::EtcdAccess::new(etcd.endpoints()))
        .await
        .expect("etcd client")
}

/// An echo backend named `name`, registered (and waited for) as service
/// `echo` under `prefix`; keep both for as long as the backend should stay.
pub async fn registered_echo(
    etcd: &Etcd,
    prefix: &str,
    name: &str,
) -> (weir::example::EchoBackend, weir::register::Registration) {
    let echo = weir::example::EchoBackend::start(name).await.unwrap();
    let spec = weir::register::RegistrationSpec::new(prefix, "echo", &echo.addr.to_string());
    let mut reg = weir::register::Registration::spawn(client(etcd).await, spec).unwrap();
    reg.registered().await;
    (echo, reg)
}

/// The Python of the `.venv` that `make test` makes (grpcio, grpcio-tools,
/// opentelemetry-proto): the peers nobody here wrote run on it.
pub fn venv_python() -> std::path::PathBuf {
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: `make test` creates it (python3 -m venv .venv; pip install grpcio grpcio-tools opentelemetry-proto)",
        python.display()
    );
    python
}

/// Polls an async condition every 20 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !check().await {
        if Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn key(service: &str, addr: &str) -> String {
    format!("{PREFIX}/{service}/{addr}")
}

/// Waits until `check` holds on `table`, re-checking on every change and at
/// least every 50 ms (lease TTLs move without a change notification).
pub async fn wait_on(
    table: &ServiceTable,
    what: &str,
    limit: Duration,
    check: impl Fn(&ServiceTable) -> bool,
) {
    let mut changes = table.subscribe();
    let deadline = Instant::now() + limit;
    while !check(table) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let seen: Vec<_> = table
                .services()
                .keys()
                .map(|s| (s.to_string(), addrs(table, s)))
                .collect();
            panic!("timed out after {limit:?} waiting for {what}; table: {seen:?}");
        }
        let _ = tokio::time::timeout(left.min(Duration::from_millis(50)), changes.changed()).await;
    }
}

pub mod gateway;
pub mod grpcio;
pub mod pki;
pub mod process;
