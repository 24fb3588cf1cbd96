//! `weir serve`'s configuration file (TOML): every key, its default, and the
//! checks that run once at start. An invalid file is an error naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path}: `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The gRPC listener.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// The admin HTTP listener (`/metrics`, `/healthz`, `/readyz`, JSON views).
    #[serde(default = "defaults::admin")]
    pub admin: SocketAddr,
    /// A file holding the bearer token every admin request must carry
    /// (`Authorization: Bearer <token>`); none required when unset.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Threads serving client connections, each a single-threaded runtime
    /// (the first is the main thread, which also runs discovery, health
    /// checks and the admin listener); 0 = one per CPU core.
    #[serde(default)]
    pub worker_threads: usize,
    /// How long calls in flight may finish after SIGTERM.
    #[serde(default = "defaults::drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// After SIGTERM, how long `/readyz` answers 503 while the gateway still
    /// serves as before, so an orchestrator stops sending it clients before
    /// GOAWAY tells the connected ones to leave (0: GOAWAY at once).
    #[serde(default, with = "humantime_serde")]
    pub drain_delay: Duration,
    /// TLS (ALPN h2) on the gRPC listener; cleartext h2 without it.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// One JSON line per call; off unless the section is present.
    #[serde(default)]
    pub access_log: Option<AccessLogConfig>,
    /// OpenTelemetry traces over OTLP/gRPC; off unless the section is present.
    #[serde(default)]
    pub tracing: Option<TracingConfig>,
    #[serde(default)]
    pub etcd: EtcdSection,
    #[serde(default)]
    pub upstream: UpstreamSection,
    #[serde(default)]
    pub retry: RetrySection,
    #[serde(default)]
    pub health_check: HealthCheckSection,
    #[serde(default)]
    pub outlier: OutlierSection,
    /// The gateway's own zone, offered to policies (`env.zone`).
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(default)]
    pub policy: PolicySection,
    /// What one client may make the gateway hold.
    #[serde(default)]
    pub limits: LimitsSection,
    #[serde(default, rename = "route")]
    pub routes: Vec<RouteConfig>,
}

/// What one client (or connection pattern) may make the gateway hold. Each
/// limit has a default fit for an edge; README "Limits and hostile clients"
/// says what a client sees when it hits one.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSection {
    /// From accept to the first request: TLS handshake, HTTP/2 preface,
    /// the first HEADERS. A connection that takes longer is closed.
    #[serde(default = "defaults::handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A connection with no stream open this long gets GOAWAY.
    #[serde(default = "defaults::idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connections older than this are drained with GOAWAY ("0s": never).
    #[serde(default, with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Client connections open at once; beyond, new ones are closed at once.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Streams one client connection may have open at once.
    #[serde(default = "defaults::max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// The largest header block a client may send, in bytes.
    #[serde(default = "defaults::max_header_list_bytes")]
    pub max_header_list_bytes: u32,
    /// A call with no bytes moving either way this long is ended with
    /// DEADLINE_EXCEEDED on both sides (a route may say otherwise).
    #[serde(default = "defaults::stream_idle_timeout", with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
    /// `grpc-timeout` values above this are clipped to it.
    #[serde(default = "defaults::max_grpc_timeout", with = "humantime_serde")]
    pub max_grpc_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    /// Where `<name>.wasm` policies are loaded from and watched; none by default.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Also take policies published in etcd under `<prefix>/_policies/<name>`.
    #[serde(default = "defaults::yes")]
    pub from_etcd: bool,
    /// How long one pick may run before it is cut off (and falls back).
    #[serde(default = "defaults::pick_deadline", with = "humantime_serde")]
    pub deadline: Duration,
    /// Linear memory one policy instance may use, in MiB.
    #[serde(default = "defaults::policy_memory_mib")]
    pub memory_mib: usize,
    /// Long-lived instances per policy (picks run on them in parallel).
    #[serde(default = "defaults::policy_instances")]
    pub instances: usize,
    /// The largest policy component accepted (file or etcd), in MiB.
    #[serde(default = "defaults::policy_max_size_mib")]
    pub max_size_mib: usize,
    /// Policy names taken from etcd: `name` or `prefix-*`; every name when
    /// unset.
    #[serde(default)]
    pub allow: Option<Vec<String>>,
    /// `ed25519:BASE64` public keys; when set, a component (etcd or the
    /// directory) is installed only with a valid signature by one of them.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Fleet rollouts (`weir policy rollout`): the guards that roll a
    /// candidate back, and how this gateway reports.
    #[serde(default)]
    pub rollout: RolloutSection,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSection {
    /// Follow `<prefix>/_rollout/` and report under `<prefix>/_gateways/`.
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// This gateway in the fleet view and in the states it writes; the
    /// host name and the listen port when unset.
    #[serde(default)]
    pub gateway_id: Option<String>,
    /// Roll back when the candidate's server-side error rate exceeds the
    /// current's by more than this (0.05: five points).
    #[serde(default = "defaults::max_error_rate_increase")]
    pub max_error_rate_increase: f64,
    /// Roll back when the candidate's p99 exceeds the current's by more
    /// than this fraction (0.5: half again), beyond chance (see
    /// `policy::rollout::judge`).
    #[serde(default = "defaults::max_p99_increase")]
    pub max_p99_increase: f64,
    /// Calls the candidate must place in the window before it is judged.
    #[serde(default = "defaults::min_calls")]
    pub min_calls: u64,
    /// The span the candidate and the current are compared over.
    #[serde(default = "defaults::rollout_window", with = "humantime_serde")]
    pub window: Duration,
    /// Candidate faults within the window that roll it back.
    #[serde(default = "defaults::max_candidate_faults")]
    pub max_candidate_faults: u64,
    /// How often this gateway writes its report.
    #[serde(default = "defaults::report_every", with = "humantime_serde")]
    pub report_every: Duration,
}

/// `[access_log]`: present, every call is logged as one JSON line.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// The file lines are appended to (reopened on SIGHUP); stdout if unset.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Entries waiting for the writer; beyond, new ones are dropped (counted).
    #[serde(default = "defaults::access_log_buffer")]
    pub buffer: usize,
}

/// `[tracing]`: present, calls are traced (a sample of them) and their
/// spans exported over OTLP/gRPC.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP/gRPC address, e.g. `http://127.0.0.1:4317`
    /// (cleartext: a collector beside the gateway).
    pub otlp_endpoint: String,
    /// The share of calls without a client `traceparent` that are traced
    /// (0 to 1). Changes live on SIGHUP.
    #[serde(default = "defaults::sample_ratio")]
    pub sample_ratio: f64,
    /// A client's `traceparent` sampled flag decides for its call (the W3C
    /// "parent-based" rule); off, the ratio decides every call (a client
    /// cannot make the gateway trace all it sends). The client's trace is
    /// continued either way.
    #[serde(default = "defaults::yes")]
    pub follow_client_sampling: bool,
    /// `service.name` of the gateway's spans.
    #[serde(default = "defaults::service_name")]
    pub service_name: String,
    /// Finished spans waiting for the exporter; beyond, new ones are
    /// dropped (counted in `weir_trace_spans_dropped_total`).
    #[serde(default = "defaults::trace_queue")]
    pub queue: usize,
    /// How long one export to the collector may take.
    #[serde(default = "defaults::export_timeout", with = "humantime_serde")]
    pub export_timeout: Duration,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Clients must present a certificate signed by this CA (PEM).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: "require" (default) or "optional" (asked for,
    /// checked when given, not required).
    #[serde(default)]
    pub client_auth: ClientAuthMode,
}

/// `[tls] client_auth`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuthMode {
    #[default]
    Require,
    Optional,
}

/// `[upstream.tls]`: TLS (and mTLS) to backends.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// CA certificate(s) (PEM) backends' certificates must chain to.
    pub ca: PathBuf,
    /// Client certificate and key (PEM) for backends that require one.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// The name checked in backends' certificates; by default each
    /// backend's host.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Whether routes use TLS unless they say (`upstream_tls`); true.
    #[serde(default = "defaults::yes")]
    pub default: bool,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdSection {
    #[serde(default = "defaults::etcd_endpoints")]
    pub endpoints: Vec<String>,
    #[serde(default = "defaults::prefix")]
    pub prefix: String,
    /// Where the last known endpoint sets are saved; none by default.
    #[serde(default)]
    pub snapshot: Option<PathBuf>,
    #[serde(default = "defaults::lease_polls_per_second")]
    pub lease_polls_per_second: u32,
    /// How often the watch asks etcd to confirm it is alive and current; a
    /// member silent for that long is left for another.
    #[serde(default = "defaults::progress_interval", with = "humantime_serde")]
    pub progress_interval: Duration,
    /// CA certificate(s) (PEM) for `https://` endpoints.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM), for etcd's `--client-cert-auth`.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// etcd user (etcd authentication enabled).
    #[serde(default)]
    pub username: Option<String>,
    /// The user's password, from this file (else `$WEIR_ETCD_PASSWORD`).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    /// HTTP/2 connections calls are spread over before another is opened.
    #[serde(default = "defaults::connections_per_backend")]
    pub connections_per_backend: usize,
    /// Connections to one backend at most: another opens when all are full.
    #[serde(default = "defaults::max_connections_per_backend")]
    pub max_connections_per_backend: usize,
    /// Streams one connection carries at most (the backend's own
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` too is respected).
    #[serde(default = "defaults::max_streams_per_connection")]
    pub max_streams_per_connection: u32,
    /// Requests one connection carries before it is replaced (its calls
    /// finish first); unset: until HTTP/2's stream ids run out (2^30).
    #[serde(default)]
    pub max_requests_per_connection: Option<u64>,
    /// Calls that may wait for a free stream to one backend at once.
    #[serde(default = "defaults::max_queued_per_backend")]
    pub max_queued_per_backend: usize,
    /// How long a call waits for a free stream before it goes elsewhere.
    #[serde(default = "defaults::queue_timeout", with = "humantime_serde")]
    pub queue_timeout: Duration,
    #[serde(default = "defaults::connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// HTTP/2 PING interval while streams are open ("0s": never ping).
    #[serde(default = "defaults::keepalive_interval", with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(default = "defaults::keepalive_timeout", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Error messages sent to clients may name backend addresses.
    #[serde(default)]
    pub name_backends_in_errors: bool,
    /// TLS to backends; none by default.
    #[serde(default)]
    pub tls: Option<UpstreamTlsConfig>,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySection {
    /// Retries allowed as a share of calls (across the gateway), in percent.
    #[serde(default = "defaults::budget_percent")]
    pub budget_percent: f32,
    /// Retries always allowed per second, whatever the share.
    #[serde(default = "defaults::min_retries_per_second")]
    pub min_per_second: u32,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSection {
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    #[serde(default = "defaults::health_interval", with = "humantime_serde")]
    pub interval: Duration,
    #[serde(default = "defaults::health_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive SERVING answers that make an unhealthy backend healthy.
    #[serde(default = "defaults::healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failed checks that make a backend unhealthy.
    #[serde(default = "defaults::unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// The service name sent in `grpc.health.v1.HealthCheckRequest` ("" = the whole server).
    #[serde(default)]
    pub service: String,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierSection {
    /// Consecutive failed calls (unreachable, reset, UNAVAILABLE) that eject a backend.
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    /// First ejection's length; each further ejection of the same backend adds as much.
    #[serde(default = "defaults::base_ejection_time", with = "humantime_serde")]
    pub base_ejection_time: Duration,
    #[serde(default = "defaults::max_ejection_time", with = "humantime_serde")]
    pub max_ejection_time: Duration,
    /// At most this share of a service's endpoints is ejected at once (at least one).
    #[serde(default = "defaults::max_ejection_percent")]
    pub max_ejection_percent: u32,
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A gRPC path prefix (`/pkg.Service/`), a full method path
    /// (`/pkg.Service/Method`), or `/`: every call no other route matches.
    #[serde(rename = "match")]
    pub path: String,
    /// The etcd service name.
    pub service: String,
    #[serde(default = "defaults::policy")]
    pub policy: String,
    /// Retries of a call that never reached a backend.
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    /// The route's methods are safe to repeat: a call whose backend was
    /// lost before it answered (connection reset, process killed) is also
    /// retried, within `retries`, though that backend may have seen it.
    #[serde(default)]
    pub idempotent: bool,
    /// Settings for the route's policy, read with `call.route-option`.
    #[serde(default)]
    pub options: std::collections::BTreeMap<String, String>,
    /// The longest a call without `grpc-timeout` may last (none by default).
    #[serde(default, with = "humantime_serde")]
    pub max_duration: Option<Duration>,
    /// Overrides `[limits] stream_idle_timeout` for this route.
    #[serde(default, with = "humantime_serde")]
    pub stream_idle_timeout: Option<Duration>,
    /// Request headers the route's policy may not read, beside
    /// `authorization`, `cookie` and `proxy-authorization`.
    #[serde(default)]
    pub hide_headers: Vec<String>,
    /// Headers hidden by default that the route's policy may read.
    #[serde(default)]
    pub expose_headers: Vec<String>,
    /// TLS to this route's backends, overriding `[upstream.tls] default`.
    #[serde(default)]
    pub upstream_tls: Option<bool>,
}

impl RouteConfig {
    /// A route of `path` to `service` with every other setting at its default.
    pub fn new(path: &str, service: &str) -> RouteConfig {
        RouteConfig {
            path: path.to_owned(),
            service: service.to_owned(),
            policy: defaults::policy(),
            retries: defaults::retries(),
            idempotent: false,
            options: Default::default(),
            max_duration: None,
            stream_idle_timeout: None,
            hide_headers: Vec::new(),
            expose_headers: Vec::new(),
            upstream_tls: None,
        }
    }
}

mod defaults {
    use std::net::SocketAddr;
    use std::time::Duration;

    pub fn listen() -> SocketAddr {
        "127.0.0.1:50050".parse().expect("valid")
    }
    pub fn admin() -> SocketAddr {
        "127.0.0.1:9901".parse().expect("valid")
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn access_log_buffer() -> usize {
        65_536
    }
    pub fn sample_ratio() -> f64 {
        0.01
    }
    pub fn service_name() -> String {
        "weir".into()
    }
    pub fn trace_queue() -> usize {
        4096
    }
    pub fn export_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn etcd_endpoints() -> Vec<String> {
        vec!["http://127.0.0.1:2379".into()]
    }
    pub fn prefix() -> String {
        "/services".into()
    }
    pub fn lease_polls_per_second() -> u32 {
        100
    }
    pub fn progress_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn connections_per_backend() -> usize {
        1
    }
    pub fn max_connections_per_backend() -> usize {
        32
    }
    pub fn max_streams_per_connection() -> u32 {
        1000
    }
    pub fn max_queued_per_backend() -> usize {
        1000
    }
    pub fn queue_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(1)
    }
    /// C-core, grpc-go and grpc-java servers accept one ping per 5 minutes
    /// while streams are open and send GOAWAY ENHANCE_YOUR_CALM to clients
    /// that ping more often; pings only detect a dead connection sooner.
    pub fn keepalive_interval() -> Duration {
        Duration::from_secs(300)
    }
    pub fn keepalive_timeout() -> Duration {
        Duration::from_secs(20)
    }
    pub fn budget_percent() -> f32 {
        20.0
    }
    pub fn min_retries_per_second() -> u32 {
        10
    }
    pub fn yes() -> bool {
        true
    }
    pub fn health_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn health_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn healthy_threshold() -> u32 {
        1
    }
    pub fn unhealthy_threshold() -> u32 {
        2
    }
    pub fn consecutive_failures() -> u32 {
        5
    }
    pub fn base_ejection_time() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_ejection_time() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_ejection_percent() -> u32 {
        50
    }
    pub fn pick_deadline() -> Duration {
        Duration::from_millis(1)
    }
    pub fn policy_memory_mib() -> usize {
        8
    }
    pub fn policy_instances() -> usize {
        4
    }
    pub fn policy_max_size_mib() -> usize {
        32
    }
    pub fn handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_connections() -> usize {
        10_000
    }
    /// Envoy's guidance for an edge proxy.
    pub fn max_concurrent_streams() -> u32 {
        100
    }
    pub fn max_header_list_bytes() -> u32 {
        16 * 1024
    }
    pub fn stream_idle_timeout() -> Duration {
        Duration::from_secs(300)
    }
    pub fn max_grpc_timeout() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn policy() -> String {
        "round-robin".into()
    }
    pub fn retries() -> u32 {
        2
    }
    pub fn max_error_rate_increase() -> f64 {
        0.05
    }
    pub fn max_p99_increase() -> f64 {
        0.5
    }
    pub fn min_calls() -> u64 {
        100
    }
    pub fn rollout_window() -> Duration {
        Duration::from_secs(30)
    }
    pub fn max_candidate_faults() -> u64 {
        10
    }
    pub fn report_every() -> Duration {
        Duration::from_secs(2)
    }
}

macro_rules! default_section {
    ($($t:ty),*) => {$(
        impl Default for $t {
            fn default() -> Self {
                toml::from_str("").expect("every field has a default")
            }
        }
    )*};
}
default_section!(
    LimitsSection,
    EtcdSection,
    UpstreamSection,
    RetrySection,
    HealthCheckSection,
    OutlierSection,
    PolicySection,
    RolloutSection
);

/// Bounds that keep arithmetic on settings from overflowing (and a typo
/// such as `"5000d"` from meaning something nobody wants).
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
const MAX_LEASE_POLLS_PER_SECOND: u32 = 10_000;
const MAX_POLICY_MEMORY_MIB: usize = 4096;
const MAX_POLICY_INSTANCES: usize = 256;
const MAX_PICK_DEADLINE: Duration = Duration::from_secs(1);

/// The native policy, always available (and every policy's fallback).
pub const NATIVE_POLICY: &str = "round-robin";

/// Policy names become file names and etcd keys: keep them plain.
pub fn valid_policy_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Config {
    /// How many threads serve client connections: `worker_threads`, or one
    /// per core when it is 0.
    pub fn data_threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and checks `text`; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let config: Config =
            serde_path_to_error::deserialize(de).map_err(|e| ConfigError::Invalid {
                path: path.to_owned(),
                key: e.path().to_string(),
                message: e.inner().message().to_owned(),
            })?;
        config.checked(path)
    }

    /// `self`, if its settings hold together (what [`Config::parse`]
    /// checks of a file); `origin` names where it came from in errors.
    pub fn checked(self, origin: &Path) -> Result<Config, ConfigError> {
        self.check()
            .map_err(|(key, message)| ConfigError::Invalid {
                path: origin.to_owned(),
                key,
                message,
            })?;
        Ok(self)
    }

    /// Whether calls on `route` reach their backends over TLS.
    /// What `weir serve` cannot change while it runs that differs in
    /// `next`, by key: a reload that changes any of these is refused whole.
    /// Routes (their services, policies, options, retries, timeouts and
    /// headers) change live, unless a route would change whether a
    /// service's backends are reached over TLS; so do `[limits]`,
    /// `[retry]`, `[health_check]`, `[outlier]`, the pick deadline, size
    /// limit, allow list, trusted keys and rollout guards of `[policy]`,
    /// and `tracing.sample_ratio`.
    pub fn fixed_differences(&self, next: &Config) -> Vec<&'static str> {
        let mut changed = Vec::new();
        let mut differ = |key: &'static str, same: bool| {
            if !same {
                changed.push(key);
            }
        };
        differ("listen", self.listen == next.listen);
        differ("admin", self.admin == next.admin);
        differ(
            "admin_token_file",
            self.admin_token_file == next.admin_token_file,
        );
        differ("worker_threads", self.worker_threads == next.worker_threads);
        differ("drain_timeout", self.drain_timeout == next.drain_timeout);
        differ("drain_delay", self.drain_delay == next.drain_delay);
        differ("tls", self.tls == next.tls);
        differ("access_log", self.access_log == next.access_log);
        // The sampling ratio changes live; the pipeline does not.
        let pipeline = |t: &Option<TracingConfig>| {
            t.clone().map(|t| TracingConfig {
                sample_ratio: 0.0,
                ..t
            })
        };
        differ(
            "tracing",
            pipeline(&self.tracing) == pipeline(&next.tracing),
        );
        differ("etcd", self.etcd == next.etcd);
        differ("upstream", self.upstream == next.upstream);
        differ("zone", self.zone == next.zone);
        // Of `[policy]`, what the engine and the watches were built with.
        let p = (&self.policy, &next.policy);
        differ("policy.dir", p.0.dir == p.1.dir);
        differ("policy.from_etcd", p.0.from_etcd == p.1.from_etcd);
        differ("policy.memory_mib", p.0.memory_mib == p.1.memory_mib);
        differ("policy.instances", p.0.instances == p.1.instances);
        let (r, n) = (&p.0.rollout, &p.1.rollout);
        differ("policy.rollout.enabled", r.enabled == n.enabled);
        differ("policy.rollout.gateway_id", r.gateway_id == n.gateway_id);
        differ(
            "policy.rollout.report_every",
            r.report_every == n.report_every,
        );
        // A service's transport is set when it is first used.
        let running_tls = |service: &str| {
            self.routes
                .iter()
                .find(|r| r.service == service)
                .map_or_else(
                    || self.upstream.tls.as_ref().is_some_and(|t| t.default),
                    |r| self.upstream_tls_for(r),
                )
        };
        differ(
            "route.upstream_tls",
            next.routes
                .iter()
                .all(|r| next.upstream_tls_for(r) == running_tls(&r.service)),
        );
        changed
    }

    pub fn upstream_tls_for(&self, route: &RouteConfig) -> bool {
        let default = self.upstream.tls.as_ref().is_some_and(|t| t.default);
        route.upstream_tls.unwrap_or(default) && self.upstream.tls.is_some()
    }

    fn check(&self) -> Result<(), (String, String)> {
        let fail = |key: String, msg: &str| Err((key, msg.to_owned()));
        if self.etcd.endpoints.is_empty() {
            return fail(
                "etcd.endpoints".into(),
                "at least one etcd endpoint is needed",
            );
        }
        if !(1..=MAX_LEASE_POLLS_PER_SECOND).contains(&self.etcd.lease_polls_per_second) {
            return Err((
                "etcd.lease_polls_per_second".into(),
                format!("must be between 1 and {MAX_LEASE_POLLS_PER_SECOND}"),
            ));
        }
        let upstream = &self.upstream;
        if upstream.connections_per_backend == 0 {
            return fail(
                "upstream.connections_per_backend".into(),
                "must be at least 1",
            );
        }
        if upstream.max_connections_per_backend < upstream.connections_per_backend
            || upstream.max_connections_per_backend > 1024
        {
            return fail(
                "upstream.max_connections_per_backend".into(),
                "must be between connections_per_backend and 1024",
            );
        }
        if upstream.max_streams_per_connection == 0 {
            return fail(
                "upstream.max_streams_per_connection".into(),
                "must be at least 1",
            );
        }
        if upstream
            .max_requests_per_connection
            // A client's HTTP/2 stream ids: the odd numbers below 2^31.
            .is_some_and(|n| !(1..=1 << 30).contains(&n))
        {
            return fail(
                "upstream.max_requests_per_connection".into(),
                "must be between 1 and 1073741824 (HTTP/2's stream ids)",
            );
        }
        if upstream.keepalive_interval > MAX_DURATION {
            return fail("upstream.keepalive_interval".into(), "must be at most 24h");
        }
        if !upstream.keepalive_interval.is_zero()
            && upstream.keepalive_interval < Duration::from_secs(10)
        {
            tracing::warn!(
                interval = ?upstream.keepalive_interval,
                "upstream.keepalive_interval under 10s: gRPC servers allow one ping per 5 minutes by default and answer more with GOAWAY ENHANCE_YOUR_CALM"
            );
        }
        if !(0.0..=100.0).contains(&self.retry.budget_percent) {
            return fail("retry.budget_percent".into(), "must be between 0 and 100");
        }
        if self.health_check.healthy_threshold == 0 || self.health_check.unhealthy_threshold == 0 {
            return fail("health_check".into(), "thresholds must be at least 1");
        }
        let durations = [
            ("etcd.progress_interval", self.etcd.progress_interval),
            ("health_check.interval", self.health_check.interval),
            ("health_check.timeout", self.health_check.timeout),
            ("upstream.connect_timeout", self.upstream.connect_timeout),
            (
                "upstream.keepalive_interval",
                self.upstream.keepalive_interval,
            ),
            (
                "upstream.keepalive_timeout",
                self.upstream.keepalive_timeout,
            ),
            (
                "outlier.base_ejection_time",
                self.outlier.base_ejection_time,
            ),
            ("outlier.max_ejection_time", self.outlier.max_ejection_time),
            ("policy.deadline", self.policy.deadline),
            ("drain_timeout", self.drain_timeout),
            ("limits.handshake_timeout", self.limits.handshake_timeout),
            ("limits.idle_timeout", self.limits.idle_timeout),
            (
                "limits.stream_idle_timeout",
                self.limits.stream_idle_timeout,
            ),
            ("limits.max_grpc_timeout", self.limits.max_grpc_timeout),
        ];
        for (key, value) in durations {
            if value.is_zero() || value > MAX_DURATION {
                return Err((key.into(), "must be above zero and at most 24h".to_owned()));
            }
        }
        if let Some(log) = &self.access_log {
            if !(1..=1 << 24).contains(&log.buffer) {
                return fail("access_log.buffer".into(), "must be between 1 and 16777216");
            }
        }
        if let Some(t) = &self.tracing {
            let endpoint = t.otlp_endpoint.parse::<http::Uri>();
            let usable = endpoint
                .as_ref()
                .is_ok_and(|u| u.scheme_str() == Some("http") && u.authority().is_some());
            if !usable {
                return fail(
                    "tracing.otlp_endpoint".into(),
                    "must be an http:// address, e.g. http://127.0.0.1:4317 (a collector beside the gateway: TLS to it is not supported yet)",
                );
            }
            if !(0.0..=1.0).contains(&t.sample_ratio) {
                return fail("tracing.sample_ratio".into(), "must be between 0 and 1");
            }
            if !(1..=1 << 16).contains(&t.queue) {
                return fail("tracing.queue".into(), "must be between 1 and 65536");
            }
            if t.export_timeout.is_zero() || t.export_timeout > Duration::from_secs(60) {
                return fail(
                    "tracing.export_timeout".into(),
                    "must be more than 0 and at most 60s",
                );
            }
        }
        if self.drain_delay > MAX_DURATION {
            return fail("drain_delay".into(), "must be at most 24h");
        }
        if !(1..=MAX_POLICY_MEMORY_MIB).contains(&self.policy.memory_mib) {
            return Err((
                "policy.memory_mib".into(),
                format!("must be between 1 and {MAX_POLICY_MEMORY_MIB} (a policy's 32-bit memory)"),
            ));
        }
        if !(1..=1024).contains(&self.policy.max_size_mib) {
            return fail("policy.max_size_mib".into(), "must be between 1 and 1024");
        }
        if !(1..=MAX_POLICY_INSTANCES).contains(&self.policy.instances) {
            return Err((
                "policy.instances".into(),
                format!("must be between 1 and {MAX_POLICY_INSTANCES}"),
            ));
        }
        if self.policy.deadline > MAX_PICK_DEADLINE {
            return fail("policy.deadline".into(), "must be at most 1s");
        }
        let rollout = &self.policy.rollout;
        if !(0.0..=1.0).contains(&rollout.max_error_rate_increase) {
            return fail(
                "policy.rollout.max_error_rate_increase".into(),
                "is a fraction of calls, 0 to 1",
            );
        }
        if !(rollout.max_p99_increase >= 0.0 && rollout.max_p99_increase.is_finite()) {
            return fail(
                "policy.rollout.max_p99_increase".into(),
                "is a fraction, 0 or more",
            );
        }
        if rollout.window < Duration::from_secs(1) || rollout.window > MAX_DURATION {
            return fail("policy.rollout.window".into(), "must be between 1s and 24h");
        }
        if rollout.report_every < Duration::from_millis(100)
            || rollout.report_every > Duration::from_secs(60)
        {
            return fail(
                "policy.rollout.report_every".into(),
                "must be between 100ms and 60s",
            );
        }
        if let Some(id) = &rollout.gateway_id {
            if id.is_empty() || id.contains('/') {
                return fail(
                    "policy.rollout.gateway_id".into(),
                    "must be non-empty, without `/`",
                );
            }
        }
        let limits = &self.limits;
        if limits.max_connection_age > MAX_DURATION {
            return fail("limits.max_connection_age".into(), "must be at most 24h");
        }
        if limits.max_connections == 0 || limits.max_concurrent_streams == 0 {
            return fail(
                "limits".into(),
                "max_connections and max_concurrent_streams must be at least 1",
            );
        }
        if limits.max_header_list_bytes < 1024 {
            return fail(
                "limits.max_header_list_bytes".into(),
                "must be at least 1024",
            );
        }
        if self.outlier.max_ejection_percent > 100 {
            return fail("outlier.max_ejection_percent".into(), "must be at most 100");
        }
        // TLS to backends is chosen per service: its routes must agree.
        let mut tls_of: std::collections::HashMap<&str, (usize, bool)> = Default::default();
        for (i, route) in self.routes.iter().enumerate() {
            if route.upstream_tls == Some(true) && self.upstream.tls.is_none() {
                return fail(
                    format!("route[{i}].upstream_tls"),
                    "needs [upstream.tls] (its ca at least)",
                );
            }
            let tls = self.upstream_tls_for(route);
            if let Some((j, other)) = tls_of.insert(&route.service, (i, tls)) {
                if other != tls {
                    return Err((
                        format!("route[{i}].upstream_tls"),
                        format!(
                            "route[{j}] reaches service {:?} with upstream TLS {}: one service, one transport",
                            route.service,
                            if other { "on" } else { "off" }
                        ),
                    ));
                }
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            let key = |field: &str| format!("route[{i}].{field}");
            let segments: Vec<&str> = route.path.split('/').collect();
            // "/" (every call), "/pkg.Service/" or "/pkg.Service/Method"
            let every_call = route.path == "/";
            if !every_call
                && (!route.path.starts_with('/') || segments.len() != 3 || segments[1].is_empty())
            {
                return fail(
                    key("match"),
                    "must be `/`, `/pkg.Service/` or `/pkg.Service/Method`",
                );
            }
            if route.service.is_empty() || route.service.starts_with('_') {
                return fail(
                    key("service"),
                    "must be a non-empty etcd service name not starting with `_`",
                );
            }
            if !valid_policy_name(&route.policy) {
                return fail(
                    key("policy"),
                    "policy names are letters, digits, `-` and `_`",
                );
            }
            if route.policy != NATIVE_POLICY && self.policy.dir.is_none() && !self.policy.from_etcd
            {
                return Err((
                    key("policy"),
                    format!("policy {:?} needs [policy] dir or from_etcd", route.policy),
                ));
            }
            for (field, value) in [
                ("max_duration", route.max_duration),
                ("stream_idle_timeout", route.stream_idle_timeout),
            ] {
                if value.is_some_and(|d| d.is_zero() || d > MAX_DURATION) {
                    return fail(key(field), "must be above zero and at most 24h");
                }
            }
            if self.routes[..i].iter().any(|r| r.path == route.path) {
                return fail(key("match"), "the same match appears in an earlier route");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("weir.toml"))
    }

    #[test]
    fn the_documented_example_parses_and_defaults_fill_the_rest() {
        let c = parse(
            r#"
            listen = "127.0.0.1:50050"
            admin  = "127.0.0.1:9901"
            [etcd]
            endpoints = ["http://127.0.0.1:2379"]
            prefix = "/services"
            [[route]]
            match = "/grpc.testing.TestService/"
            service = "interop"
            policy = "round-robin"
            "#,
        )
        .unwrap();
        assert_eq!(c.routes[0].service, "interop");
        assert_eq!(c.routes[0].retries, 2);
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(1));
        assert_eq!(c.outlier.consecutive_failures, 5);
        assert!(c.health_check.enabled);
        let empty = parse("").unwrap();
        assert_eq!(empty.listen.to_string(), "127.0.0.1:50050");
        assert_eq!(empty.drain_timeout, Duration::from_secs(10));
    }

    #[test]
    fn errors_name_the_key() {
        let msg = |t: &str| parse(t).unwrap_err().to_string();
        assert!(
            msg("[upstream]\nconect_timeout = \"1s\"").contains("upstream"),
            "{}",
            msg("[upstream]\nconect_timeout = \"1s\"")
        );
        assert!(msg("[upstream]\nconnect_timeout = \"soon\"").contains("upstream.connect_timeout"));
        let no_sources = "[policy]\nfrom_etcd = false\n[[route]]\nmatch = \"/a.B/\"\nservice = \"s\"\npolicy = \"nope\"";
        assert!(msg(no_sources).contains("route[0].policy"));
        assert!(
            msg("[[route]]\nmatch = \"/a.B/\"\nservice = \"s\"\npolicy = \"no/pe\"")
                .contains("route[0].policy")
        );
        // `/` takes every call no other route matches.
        assert!(parse("[[route]]\nmatch = \"/\"\nservice = \"s\"").is_ok());
        assert!(msg("[[route]]\nmatch = \"//\"\nservice = \"s\"").contains("route[0].match"));
        assert!(msg("[[route]]\nmatch = \"a.B\"\nservice = \"s\"").contains("route[0].match"));
        assert!(msg("[[route]]\nmatch = \"/a.B/\"\nservice = 3").contains("route[0].service"));
        assert!(msg("listen = \"nowhere\"").contains("listen"));
        assert!(msg("[etcd]\nendpoints = []").contains("etcd.endpoints"));
        assert!(msg("[upstream]\nmax_requests_per_connection = 0")
            .contains("upstream.max_requests_per_connection"));
        assert!(msg("[upstream]\nmax_requests_per_connection = 2000000000")
            .contains("upstream.max_requests_per_connection"));
        let lifetime = parse("[upstream]\nmax_requests_per_connection = 1000000").unwrap();
        assert_eq!(
            lifetime.upstream.max_requests_per_connection,
            Some(1_000_000)
        );
    }

    /// Each of these once panicked at start (a zero interval, a division to
    /// zero, a multiplication or shift that overflowed) instead of naming
    /// the key.
    #[test]
    fn a_reload_may_change_live_settings_but_not_what_was_built_at_start() {
        let base = "[etcd]\nendpoints = [\"http://127.0.0.1:2379\"]\n";
        let running = parse(base).unwrap();
        let differ =
            |extra: &str| running.fixed_differences(&parse(&format!("{extra}\n{base}")).unwrap());
        for live in [
            "[limits]\nmax_grpc_timeout = \"5s\"\nmax_connections = 10",
            "[retry]\nbudget_percent = 5.0",
            "[health_check]\nenabled = false",
            "[outlier]\nconsecutive_failures = 2",
            "[policy]\ndeadline = \"5ms\"\nallow = [\"a\"]",
            "[policy.rollout]\nmin_calls = 5",
        ] {
            assert!(differ(live).is_empty(), "{live}: {:?}", differ(live));
        }
        assert_eq!(differ("[policy]\nmemory_mib = 64"), ["policy.memory_mib"]);
        assert_eq!(differ("listen = \"127.0.0.1:1\""), ["listen"]);
        assert_eq!(
            differ("[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\""),
            ["tracing"]
        );
        // With tracing on, its ratio changes live; its endpoint does not.
        let traced = parse(&format!(
            "{base}[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\n"
        ))
        .unwrap();
        let next = |extra: &str| {
            parse(&format!(
                "{base}[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\n{extra}"
            ))
            .unwrap()
        };
        assert!(traced
            .fixed_differences(&next("sample_ratio = 0.5"))
            .is_empty());
        assert_eq!(
            traced.fixed_differences(&next("service_name = \"edge\"")),
            ["tracing"]
        );
    }

    #[test]
    fn values_that_once_panicked_are_errors_naming_their_key() {
        for (text, key) in [
            ("[health_check]\ninterval = \"0s\"", "health_check.interval"),
            ("[health_check]\ntimeout = \"0s\"", "health_check.timeout"),
            (
                "[etcd]\nlease_polls_per_second = 4000000000",
                "etcd.lease_polls_per_second",
            ),
            (
                "[outlier]\nbase_ejection_time = \"100000000years\"",
                "outlier.base_ejection_time",
            ),
            (
                "[outlier]\nmax_ejection_time = \"0s\"",
                "outlier.max_ejection_time",
            ),
            (
                "[policy]\nmemory_mib = 18446744073709551615",
                "policy.memory_mib",
            ),
            ("[policy]\ninstances = 100000000", "policy.instances"),
            ("[policy]\ndeadline = \"1h\"", "policy.deadline"),
            (
                "[upstream]\nkeepalive_interval = \"0s\"",
                "upstream.keepalive_interval",
            ),
            ("drain_timeout = \"0s\"", "drain_timeout"),
            (
                "[tracing]\notlp_endpoint = \"127.0.0.1:4317\"",
                "tracing.otlp_endpoint",
            ),
            (
                "[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\nsample_ratio = 1.5",
                "tracing.sample_ratio",
            ),
            (
                "[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\nqueue = 0",
                "tracing.queue",
            ),
            (
                "[tracing]\notlp_endpoint = \"http://127.0.0.1:4317\"\nexport_timeout = \"0s\"",
                "tracing.export_timeout",
            ),
        ] {
            let err = parse(text).expect_err(text).to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }
}
