//! weir: a gRPC edge gateway that learns its backends from etcd and lets a
//! WebAssembly policy pick the backend of every call.
//!
//! # Layout
//!
//! - [`discovery`]: the etcd watch, the lease TTL poller and the snapshot file,
//!   feeding a [`discovery::ServiceTable`] of immutable endpoint sets that the
//!   hot path reads without waiting.
//! - [`register`]: the registration agent (`weir register`, and a library API
//!   for servers that register themselves).
//! - `data_path`: the core both faces share — discovery, backends,
//!   policies and the proxy, built from a [`Config`].
//! - [`client`]: client-side mode — that core behind a tower `Service` any
//!   tonic client takes, in-process.
//! - [`server`]: `weir serve` — wires everything behind the gRPC listener
//!   ([`tls`] optional) and the [`admin`] listener; drains on shutdown.
//! - [`proxy`]: the hot path of one call: route, pick, forward, retry.
//! - [`balance`]: the seam where a policy picks a backend; the native round-robin.
//! - [`upstream`]: backends: connection pools, load, health checks, ejection.
//! - [`config`]: the configuration file.
//! - [`telemetry`]: which calls are traced, the span export, the log subscriber.
//! - [`metrics`]: Prometheus metric groups.
//! - [`commands`]: the command-line verbs that are more than a call.
//! - `example`, `testkit` (feature `testkit`): the example echo service, and
//!   real etcd processes for tests and benches.

#![forbid(unsafe_code)]

pub(crate) mod access_log;
pub(crate) mod admin;
pub mod balance;
pub mod client;
pub mod commands;
pub mod config;
pub(crate) mod data_path;
pub mod discovery;
pub(crate) mod errors;
#[cfg(feature = "testkit")]
pub mod example;
pub(crate) mod listener;
pub mod members;
pub mod metrics;
pub mod policy;
pub(crate) mod proxy;
pub mod register;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod upstream;

#[cfg(feature = "testkit")]
pub mod testkit;

// What the binary, tests, benches and examples reach for most.
pub use config::Config;
pub use proxy::status::name as grpc_status_name;
pub use proxy::timeout::parse as parse_grpc_timeout;
pub use register::{KeyFormat, Registration, RegistrationSpec};
pub use server::Gateway;
