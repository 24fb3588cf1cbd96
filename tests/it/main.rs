//! weir's integration tests: one binary, real etcd, real processes.

mod demo;
mod discovery;
mod proxy;
mod python;
mod register;
mod serve;
mod support;
