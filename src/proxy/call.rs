//! The record of one call on one backend: load, outcome metrics, and outlier
//! detection, settled when the response ends or the client goes away.

use std::sync::Arc;

use tokio::time::Instant;

use super::services::ServiceRuntime;
use super::status;
use super::ProxyState;
use crate::balance::{Balancer, Outcome};
use crate::members::Member;

pub struct CallRecord {
    shared: Arc<ProxyState>,
    service: Arc<ServiceRuntime>,
    member: Arc<Member>,
    learner: Option<Learner>,
    started: Instant,
    status: Option<u32>,
}

/// The policy that placed a call and wants to learn how it ended.
pub struct Learner {
    pub balancer: Arc<dyn Balancer>,
    /// The endpoint set's generation at the pick.
    pub generation: u64,
    /// The chosen endpoint's position in that set.
    pub set_index: u32,
}

impl CallRecord {
    pub fn start(
        shared: Arc<ProxyState>,
        service: Arc<ServiceRuntime>,
        member: Arc<Member>,
        learner: Option<Learner>,
        started: Instant,
    ) -> Self {
        member.backend.load.start();
        shared.metrics.active_calls.inc();
        CallRecord {
            shared,
            service,
            member,
            learner,
            started,
            status: None,
        }
    }

    pub fn backend_addr(&self) -> &str {
        &self.member.backend.addr
    }

    pub fn service(&self) -> &str {
        &self.service.name
    }

    /// The call's gRPC status (the first one set wins).
    pub fn set_status(&mut self, code: u32) {
        self.status.get_or_insert(code);
    }

    /// The response ended without trailers: if no status came in the headers
    /// either, the backend broke the protocol.
    pub fn finish_without_trailers(&mut self) {
        self.status.get_or_insert(status::INTERNAL);
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        // No status: the client went away first.
        let code = self.status.unwrap_or(status::CANCELLED);
        let latency = self.started.elapsed();
        let backend = &self.member.backend;
        backend.load.finish(latency, code == status::OK);
        self.shared.metrics.active_calls.dec();
        self.member.count_call(code);
        self.service.latency.observe(latency.as_secs_f64());
        match code {
            status::UNAVAILABLE => self.shared.backend_failed(&self.service, &self.member),
            status::CANCELLED => {}
            _ => backend.outlier.record_success(),
        }
        if let Some(learner) = self.learner.take() {
            learner.balancer.observe(&Outcome {
                generation: learner.generation,
                set_index: learner.set_index,
                status: code,
                latency_us: u32::try_from(latency.as_micros()).unwrap_or(u32::MAX),
            });
        }
    }
}
