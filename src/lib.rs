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
//! - [`metrics`]: Prometheus metric groups.
//! - [`commands`]: the command-line verbs that are more than a call.
//! - `testkit` (feature `testkit`): starts a real etcd for tests and benches.

#![forbid(unsafe_code)]

pub mod admin;
pub mod balance;
pub mod commands;
pub mod config;
pub mod discovery;
#[cfg(feature = "testkit")]
pub mod example;
pub mod metrics;
pub mod proxy;
pub mod register;
pub mod server;
pub mod tls;
pub mod upstream;

#[cfg(feature = "testkit")]
pub mod testkit;
