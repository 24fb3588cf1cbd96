//! weir's integration tests: one binary, real etcd, real processes.

mod demo;
mod discovery;
mod proxy;
mod register;
mod support;
