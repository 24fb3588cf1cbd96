//! weir's integration tests: one binary, real etcd, real processes.

mod demo;
mod discovery;
mod register;
mod support;
