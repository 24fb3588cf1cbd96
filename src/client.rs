//! Client-side mode: the gateway's data path inside a Rust service, with no
//! gateway hop. A [`Channel`] resolves one etcd service, keeps its
//! instances current by the same watch, checks their health, ejects
//! outliers, retries what cannot have reached a backend, and lets the same
//! policies (native, or WebAssembly components hot-swapped from etcd) pick
//! the backend of every call — the `data_path` core `weir serve`
//! runs, given a tonic client's calls in-process instead of a listener's.
//!
//! ```
//! # // A real etcd and a registered backend (the example echo service),
//! # // started by the testkit so that this example runs as a doc test.
//! # #[tokio::main(flavor = "multi_thread", worker_threads = 2)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let etcd = weir::testkit::Etcd::start();
//! # let greeter = weir::example::EchoBackend::start("greeter-1").await?;
//! # let access = weir::discovery::EtcdAccess::new(etcd.endpoints());
//! # let spec = weir::RegistrationSpec::new("/services", "greeter", &greeter.addr.to_string());
//! # let mut registration =
//! #     weir::Registration::spawn(weir::discovery::connect(&access).await?, spec)?;
//! # registration.registered().await;
//! # let endpoints = etcd.endpoints(); // ["http://127.0.0.1:2379"] in production
//! use tonic_health::pb::health_check_response::ServingStatus;
//! use tonic_health::pb::health_client::HealthClient;
//! use tonic_health::pb::HealthCheckRequest;
//!
//! let channel = weir::client::Channel::builder(endpoints, "/services", "greeter")
//!     // `round-robin` is native; any other name is a WebAssembly policy
//!     // published under /services/_policies/ (`.policy_file(path)`: from a file).
//!     .policy("round-robin")
//!     .connect()
//!     .await?;
//! let mut health = HealthClient::new(channel.clone()); // a clone is an Arc
//! let answer = health
//!     .check(HealthCheckRequest { service: String::new() })
//!     .await?;
//! assert_eq!(answer.into_inner().status(), ServingStatus::Serving);
//! # Ok(())
//! # }
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, ConfigError, RouteConfig};
use crate::data_path::{DataPath, StartError};
use crate::policy::policy_name;
use crate::upstream::{strip_connection_headers, BoxError, RequestBody};

/// How long [`Builder::connect`] waits for the first etcd listing (or the
/// snapshot) by default.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a channel's calls come from, for the data path's records: the
/// process itself, not a peer.
const IN_PROCESS: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0);

/// Why a channel could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("client-side channel settings: {0}")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("no etcd listing and no snapshot within {waited:?} (etcd at {endpoints})")]
    NotReady { waited: Duration, endpoints: String },
}

/// A client-side balanced channel to one etcd service: give it to any
/// tonic-generated client (`GreeterClient::new(channel)`). Cheap to clone;
/// the clones share one data path, which stops (watches, health checks,
/// upstream connections) when the last clone is dropped and the calls it
/// carried have ended. Make one per service and share it: each channel
/// runs its own watch of the prefix and its own policy engine (two
/// threads), as a gateway does.
#[derive(Clone)]
pub struct Channel {
    inner: Arc<Inner>,
}

struct Inner {
    data: DataPath,
    service: String,
    registry: Registry,
    /// Ends the background tasks when the last clone goes.
    background: CancellationToken,
    _tasks: TaskTracker,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.background.cancel();
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("service", &self.inner.service)
            .finish_non_exhaustive()
    }
}

impl Channel {
    /// A channel to `service`, registered under `prefix` in the etcd at
    /// `endpoints` (in either key format `weir register` writes).
    pub fn builder<I, S>(endpoints: I, prefix: &str, service: &str) -> Builder
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut config = Config::parse("", Path::new("(client-side channel)"))
            .expect("the empty configuration is valid");
        config.etcd.endpoints = endpoints.into_iter().map(Into::into).collect();
        config.etcd.prefix = prefix.to_owned();
        Builder::from_config(config, service)
    }

    /// The etcd service this channel calls.
    pub fn service(&self) -> &str {
        &self.inner.service
    }

    /// The channel's metrics (the gateway's names: `weir_calls_total`,
    /// `weir_backend_*`, `weir_policy_*`, `weir_discovery_*`) in the
    /// Prometheus text format.
    pub fn metrics(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// How a [`Channel`] is made. Every setting is the gateway's of the same
/// name ([`Builder::from_config`] takes a whole `weir.toml`); the channel
/// has one route, `/` (every call), to its service.
pub struct Builder {
    config: Config,
    service: String,
    route: RouteConfig,
    policy_files: Vec<(String, PathBuf)>,
    ready_timeout: Duration,
}

impl Builder {
    /// A channel to `service` with the settings of `config` (etcd access,
    /// snapshot, upstream pool and TLS, retry budget, health checks,
    /// outlier ejection, limits, policy engine); its listeners, routes,
    /// access log, tracing and fleet rollout are not used.
    pub fn from_config(mut config: Config, service: &str) -> Builder {
        // A client is not a gateway: it does not report to the fleet view.
        config.policy.rollout.enabled = false;
        config.access_log = None;
        config.tracing = None;
        config.routes.clear();
        let route = RouteConfig::new("/", service);
        Builder {
            config,
            service: service.to_owned(),
            route,
            policy_files: Vec::new(),
            ready_timeout: READY_TIMEOUT,
        }
    }

    /// The policy that picks each call's backend: `round-robin` (native,
    /// the default) or the name of a WebAssembly policy published under
    /// `<prefix>/_policies/` (hot-swapped as new versions are published)
    /// or found in [`Builder::policy_dir`].
    pub fn policy(mut self, name: &str) -> Builder {
        self.route.policy = name.to_owned();
        self
    }

    /// A WebAssembly policy component from a file (its name: the file's
    /// stem); a version later published under that name in etcd replaces it.
    pub fn policy_file(mut self, path: impl Into<PathBuf>) -> Builder {
        let path = path.into();
        let name = policy_name(&path).unwrap_or_else(|| "policy".into());
        self.route.policy = name.clone();
        self.policy_files.push((name, path));
        self
    }

    /// A directory of policy components, watched for changes as `[policy]
    /// dir` is by the gateway.
    pub fn policy_dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.config.policy.dir = Some(dir.into());
        self
    }

    /// Whether policies are taken from etcd (`<prefix>/_policies/`); on by
    /// default.
    pub fn policies_from_etcd(mut self, on: bool) -> Builder {
        self.config.policy.from_etcd = on;
        self
    }

    /// How long a policy's pick may take before the call falls back to
    /// round-robin (`[policy] deadline`).
    pub fn pick_deadline(mut self, limit: Duration) -> Builder {
        self.config.policy.deadline = limit;
        self
    }

    /// Settings the policy reads with `call.route-option`.
    pub fn policy_option(mut self, key: &str, value: &str) -> Builder {
        self.route.options.insert(key.to_owned(), value.to_owned());
        self
    }

    /// The calls are safe to repeat: a call whose backend was lost before
    /// it answered is sent to another (within the retries). Off by default:
    /// only calls that cannot have reached a backend are retried.
    pub fn idempotent(mut self, on: bool) -> Builder {
        self.route.idempotent = on;
        self
    }

    /// Retries of a call on other backends (2 by default), within the
    /// service's retry budget.
    pub fn retries(mut self, retries: u32) -> Builder {
        self.route.retries = retries;
        self
    }

    /// The longest a call without a deadline of its own may last.
    pub fn max_duration(mut self, limit: Duration) -> Builder {
        self.route.max_duration = Some(limit);
        self
    }

    /// `grpc.health.v1` checks of every instance (`[health_check]`).
    pub fn health_checks(mut self, on: bool) -> Builder {
        self.config.health_check.enabled = on;
        self
    }

    /// A snapshot file of the instance sets: written as they change, read
    /// at start when etcd cannot be reached (`[etcd] snapshot`).
    pub fn snapshot(mut self, path: impl Into<PathBuf>) -> Builder {
        self.config.etcd.snapshot = Some(path.into());
        self
    }

    /// How long [`Builder::connect`] waits for the first listing.
    pub fn ready_timeout(mut self, wait: Duration) -> Builder {
        self.ready_timeout = wait;
        self
    }

    /// Starts the channel's data path (watch, policies, health checks) and
    /// waits for the first etcd listing or the snapshot.
    pub async fn connect(self) -> Result<Channel, ConnectError> {
        let Builder {
            mut config,
            service,
            route,
            policy_files,
            ready_timeout,
        } = self;
        // A policy from a file needs neither a policy directory nor etcd,
        // which the file check asks of a named one: checked as native, then
        // named again (its name was checked when the file was given).
        let from_file = policy_files.iter().any(|(name, _)| *name == route.policy);
        let policy = route.policy.clone();
        config.routes = vec![route];
        if from_file {
            config.routes[0].policy = crate::config::NATIVE_POLICY.into();
        }
        let mut config = config.checked(Path::new("(client-side channel)"))?;
        config.routes[0].policy = policy;
        let mut registry = Registry::default();
        let background = CancellationToken::new();
        // Whatever ends this early (an error, or the caller dropping the
        // future), the tasks started so far stop with it.
        let stop_early = background.clone().drop_guard();
        let tasks = TaskTracker::new();
        let data = DataPath::start(
            &config,
            None,
            &policy_files,
            &mut registry,
            &tasks,
            &background,
        )
        .await?;
        tasks.close();
        let inner = Arc::new(Inner {
            data,
            service,
            registry,
            background,
            _tasks: tasks,
        });
        stop_early.disarm();
        if !inner.data.ready_within(ready_timeout).await {
            return Err(ConnectError::NotReady {
                waited: ready_timeout,
                endpoints: config.etcd.endpoints.join(","),
            });
        }
        Ok(Channel { inner })
    }
}

/// A call's response body (a backend's, streamed, or the data path's own
/// gRPC error).
pub struct ResponseBody(crate::proxy::body::ResponseBody);

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.0).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

/// The future of one call through a [`Channel`].
pub type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<ResponseBody>, Infallible>> + Send>>;

/// Every call ends in a response: failures are gRPC statuses, as from a
/// gateway, never a transport error.
impl<B> tower::Service<http::Request<B>> for Channel
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = http::Response<ResponseBody>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> ResponseFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut request = request.map(RequestBody::boxed);
            strip_connection_headers(request.headers_mut());
            let response = inner.data.proxy.handle(request, IN_PROCESS).await;
            Ok(response.map(ResponseBody))
        })
    }
}
