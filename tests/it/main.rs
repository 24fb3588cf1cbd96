//! weir's integration tests: one binary, real etcd, real processes.

mod client_side;
mod demo;
mod discovery;
mod etcd_auth;
mod fleet;
mod grpcio;
mod guide;
mod hostile;
mod policy;
mod proxy;
mod python;
mod register;
mod serve;
mod signals;
mod support;
mod tidy;
mod tls;
mod traces;
mod trust;
