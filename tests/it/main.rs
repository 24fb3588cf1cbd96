//! weir's integration tests: one binary, real etcd, real processes.

mod demo;
mod discovery;
mod guide;
mod policy;
mod proxy;
mod python;
mod register;
mod serve;
mod support;
mod tidy;
