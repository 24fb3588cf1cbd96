//! weir's integration tests: one binary, real etcd, real processes.

mod discovery;
mod register;
mod support;
