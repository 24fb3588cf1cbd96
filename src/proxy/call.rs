//! What a call leaves behind. [`CallRecord`]: one per call, settled when the
//! call ends however it ends (a backend's answer, the gateway's own, the
//! client leaving): the calls count and the duration histogram. An
//! [`AttemptRecord`]: one per attempt on one backend: its load, the
//! attempts count, outlier detection and what a learning policy hears.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::time::Instant;

use crate::access_log::Entry;
use crate::upstream::ReplayBody;

use super::services::ServiceRuntime;
use super::status;
use super::trace::{AttemptSpan, CallEnd, CallSpan};
use super::ProxyState;
use crate::balance::{Balancer, Outcome, PLACED_BY_FALLBACK};
use crate::members::Member;
use crate::upstream::StreamPermit;

/// One call, from its arrival at the gateway to its end.
pub struct CallRecord {
    state: Arc<ProxyState>,
    started: Instant,
    /// Known once routed.
    service: Option<Arc<ServiceRuntime>>,
    /// The member the last attempt went to.
    member: Option<Arc<Member>>,
    status: Option<u32>,
    /// What only the access log and the call's span need; kept only for a
    /// call that is logged or traced.
    details: Option<Box<CallDetails>>,
}

/// The access log's and the trace's view of a call, filled in as it goes.
struct CallDetails {
    time: std::time::SystemTime,
    client: SocketAddr,
    path: Option<http::uri::PathAndQuery>,
    route: Option<Arc<str>>,
    policy: Option<Arc<str>>,
    policy_version: Option<String>,
    /// The last pick was the fallback round-robin's.
    fallback: bool,
    request: Option<ReplayBody>,
    response_bytes: u64,
    attempts: u32,
    /// The call's span, when it is traced.
    span: Option<CallSpan>,
}

impl CallRecord {
    pub fn start(state: Arc<ProxyState>, started: Instant) -> Self {
        state.metrics.active_calls.inc();
        CallRecord {
            state,
            started,
            service: None,
            member: None,
            status: None,
            details: None,
        }
    }

    /// Keeps what the access log and a trace say of this call (only when
    /// one of them is on), and its span if it is traced.
    pub fn keep_details(&mut self, client: SocketAddr, uri: &http::Uri, span: Option<CallSpan>) {
        self.details = Some(Box::new(CallDetails {
            time: std::time::SystemTime::now(),
            client,
            // Shares the request's bytes: no copy.
            path: uri.path_and_query().cloned(),
            route: None,
            policy: None,
            policy_version: None,
            fallback: false,
            request: None,
            response_bytes: 0,
            attempts: 0,
            span,
        }));
    }

    /// The call's span, if it is traced.
    pub fn span(&self) -> Option<&CallSpan> {
        self.details.as_ref()?.span.as_ref()
    }

    pub fn note_route(&mut self, route: Option<&Arc<crate::proxy::router::Route>>) {
        if let (Some(log), Some(route)) = (self.details.as_mut(), route) {
            log.route = Some(route.matched.clone());
            log.policy = Some(route.policy.clone());
        }
    }

    pub fn note_request(&mut self, body: &ReplayBody) {
        if let Some(log) = self.details.as_mut() {
            log.request = Some(body.clone_handle());
        }
    }

    pub fn note_placed(&mut self, policy: Option<&Arc<dyn Balancer>>, placed_by: u8) {
        if let Some(log) = self.details.as_mut() {
            log.policy_version = policy.and_then(|b| b.placed_version(placed_by));
            log.fallback = placed_by == PLACED_BY_FALLBACK;
        }
    }

    /// Bytes of response messages passed to the client.
    pub fn note_response_bytes(&mut self, bytes: usize) {
        if let Some(log) = self.details.as_mut() {
            log.response_bytes += bytes as u64;
        }
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    pub fn routed(&mut self, service: &Arc<ServiceRuntime>) {
        self.service = Some(service.clone());
    }

    pub fn attempting(&mut self, member: &Arc<Member>) {
        self.member = Some(member.clone());
        if let Some(log) = self.details.as_mut() {
            log.attempts += 1;
        }
    }

    /// The call's gRPC status (the first one set wins).
    pub fn set_status(&mut self, code: u32) {
        self.status.get_or_insert(code);
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        // No status: the client went away first.
        let code = self.status.unwrap_or(status::CANCELLED);
        self.state.metrics.active_calls.dec();
        let latency = self.started.elapsed().as_secs_f64();
        match (&self.service, &self.member) {
            (Some(service), Some(member)) => {
                member.counts.calls.inc(code);
                service.latency.observe(latency);
            }
            (Some(service), None) => {
                service.unanswered.inc(code);
                service.latency.observe(latency);
            }
            (None, _) => {
                self.state.unrouted.inc(code);
                self.state.unrouted_latency.observe(latency);
            }
        }
        let Some(details) = self.details.take() else {
            return;
        };
        let service = self.service.as_ref().map(|s| s.name.clone());
        let backend = self.member.as_ref().map(|m| m.backend.addr.clone());
        if let Some(span) = &details.span {
            span.finish(&CallEnd {
                code,
                route: details.route.as_deref(),
                service: service.as_deref(),
                backend: backend.as_deref(),
                policy: details.policy.as_deref(),
                policy_version: details.policy_version.as_deref(),
                attempts: details.attempts,
                fallback: details.fallback,
            });
        }
        if let Some(access_log) = &self.state.access_log {
            let CallDetails {
                time,
                client,
                path,
                route,
                policy,
                policy_version,
                request,
                response_bytes,
                attempts,
                ..
            } = *details;
            access_log.record(Entry {
                time,
                client: Some(client),
                path,
                route,
                service,
                backend,
                policy,
                policy_version,
                status: code,
                duration: self.started.elapsed(),
                request_bytes: request.as_ref().map_or(0, ReplayBody::bytes_read),
                response_bytes,
                attempts,
            });
        }
    }
}

/// The policy that placed a call and wants to learn how it ended.
pub struct Learner {
    pub balancer: Arc<dyn Balancer>,
    /// The endpoint set's generation at the pick.
    pub generation: u64,
    /// The chosen endpoint's position in that set.
    pub set_index: u32,
    /// Which of the balancer's versions placed the call.
    pub placed_by: u8,
}

/// One attempt of a call on one backend.
pub struct AttemptRecord {
    state: Arc<ProxyState>,
    service: Arc<ServiceRuntime>,
    member: Arc<Member>,
    learner: Option<Learner>,
    /// When the call (not this attempt) arrived: what a learning policy hears.
    call_started: Instant,
    started: Instant,
    status: Option<u32>,
    /// The status is the gateway's verdict on the backend (its deadline
    /// passed while the backend said nothing), not the backend's word.
    gateway_deadline: bool,
    /// The stream it holds in the backend's pool, until the response ends.
    permit: Option<StreamPermit>,
    /// The attempt's span, when the call is traced.
    span: Option<AttemptSpan>,
}

impl AttemptRecord {
    pub fn start(
        state: Arc<ProxyState>,
        service: Arc<ServiceRuntime>,
        member: Arc<Member>,
        learner: Option<Learner>,
        call_started: Instant,
    ) -> Self {
        member.backend.load.start();
        AttemptRecord {
            state,
            service,
            member,
            learner,
            call_started,
            started: Instant::now(),
            status: None,
            gateway_deadline: false,
            permit: None,
            span: None,
        }
    }

    /// Ends `span` with this attempt (its status set then).
    pub fn traced_by(&mut self, span: Option<AttemptSpan>) {
        self.span = span;
    }

    pub fn hold(&mut self, permit: StreamPermit) {
        self.permit = Some(permit);
    }

    pub fn service(&self) -> &str {
        &self.service.name
    }

    pub fn backend_addr(&self) -> &str {
        &self.member.backend.addr
    }

    /// The backend's response headers arrived: the latency its policies read.
    pub fn answered(&self) {
        self.member
            .backend
            .load
            .observe_latency(self.started.elapsed());
    }

    /// The attempt's gRPC status (the first one set wins).
    pub fn set_status(&mut self, code: u32) {
        self.status.get_or_insert(code);
    }

    /// The call's deadline passed while this backend had not finished.
    pub fn deadline_passed(&mut self) {
        if self.status.is_none() {
            self.status = Some(status::DEADLINE_EXCEEDED);
            self.gateway_deadline = true;
        }
    }
}

impl Drop for AttemptRecord {
    fn drop(&mut self) {
        // No status: the client went away first.
        let code = self.status.unwrap_or(status::CANCELLED);
        let backend = &self.member.backend;
        backend.load.finish(code == status::OK);
        self.member.counts.attempts.inc(code);
        if let Some(span) = self.span.take() {
            span.finish(code);
        }
        match code {
            status::UNAVAILABLE => self.state.backend_failed(&self.service, &self.member),
            status::DEADLINE_EXCEEDED if self.gateway_deadline => {
                // Accepted, then said nothing in time: as telling as a reset.
                self.state.backend_failed(&self.service, &self.member)
            }
            status::CANCELLED => {}
            _ => backend.outlier.record_success(),
        }
        if let Some(learner) = self.learner.take() {
            let latency = self.call_started.elapsed();
            learner.balancer.observe(&Outcome {
                generation: learner.generation,
                set_index: learner.set_index,
                status: code,
                latency_us: u32::try_from(latency.as_micros()).unwrap_or(u32::MAX),
                placed_by: learner.placed_by,
            });
        }
    }
}
