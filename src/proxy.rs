//! The hot path: one gRPC call from the client to a backend and back.
//!
//! route → the service's members (cached per endpoint-set generation) →
//! usable candidates → the policy's pick → a stream on the backend's pooled
//! HTTP/2 connection → the response streamed back. Calls that never reached
//! a backend are retried on another one, within the route's limit and the
//! service's retry budget. Nothing here waits on etcd or holds a lock across
//! an `.await`.

pub mod body;
pub mod call;
pub mod router;
pub mod services;
pub mod status;
pub mod timeout;
pub mod trace;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::DescriptorEncoder;
use prometheus_client::metrics::histogram::Histogram;
use smallvec::SmallVec;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::balance::{Balancer, HiddenHeaders, PickContext, RouteOptions};
use crate::members::{CodeCounts, Member, Members};
use crate::metrics::{encode_counters, CallLabels, ProxyMetrics, ServiceLabel};
use crate::upstream::{
    self as upstream, Backends, OutlierSettings, OutlierVerdict, PoolError, ReplayBody,
    RequestBody, SendError, UpstreamBody,
};

use body::{Expired, Observed, ResponseBody, Timers};
use call::{AttemptRecord, CallRecord, Learner};
use router::{split_path, Router};
use services::{ServiceRuntime, ServiceRuntimes};
use status::ProxyError;
use trace::{AttemptSpan, CallSpan};

/// Retries allowed for calls that match no route.
const DEFAULT_RETRIES: u32 = 2;

/// How many retries each service may make on top of its calls.
#[derive(Clone, Debug)]
pub struct RetrySettings {
    /// Retries allowed as a share of the service's calls, in percent.
    pub budget_percent: f32,
    /// Retries always allowed per second, whatever the share.
    pub min_per_second: u32,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            budget_percent: 20.0,
            min_per_second: 10,
        }
    }
}

impl RetrySettings {
    /// A fresh budget with these settings (one per service).
    pub fn budget(&self) -> TpsBudget {
        TpsBudget::new(
            std::time::Duration::from_secs(10),
            self.min_per_second,
            self.budget_percent / 100.0,
        )
    }
}

/// Bounds on one call's time, whatever its client asks for.
#[derive(Clone, Copy, Debug)]
pub struct CallLimits {
    /// No bytes moving either way this long ends a call (both sides).
    pub stream_idle_timeout: Duration,
    /// A `grpc-timeout` above this is clipped to it.
    pub max_grpc_timeout: Duration,
}

impl Default for CallLimits {
    fn default() -> Self {
        CallLimits {
            stream_idle_timeout: Duration::from_secs(300),
            max_grpc_timeout: Duration::from_secs(3600),
        }
    }
}

/// State every call shares.
pub struct ProxyState {
    pub metrics: ProxyMetrics,
    pub backends: Arc<Backends>,
    /// Both replaced whole by a configuration reload.
    outlier: arc_swap::ArcSwap<OutlierSettings>,
    limits: arc_swap::ArcSwap<CallLimits>,
    /// Client-facing error messages may name backend addresses.
    name_backends: bool,
    /// Calls that matched no service, by code, and their durations.
    unrouted: CodeCounts,
    unrouted_latency: Histogram,
    /// Where each call's line goes, when `[access_log]` is set.
    access_log: Option<crate::access_log::AccessLog>,
    /// Which calls are traced, when `[tracing]` is set.
    sampler: Option<crate::telemetry::Sampler>,
}

impl ProxyState {
    /// New calls are bounded by `limits`, failures judged by `outlier`
    /// (a configuration reload).
    pub fn set_settings(&self, limits: CallLimits, outlier: OutlierSettings) {
        self.limits.store(Arc::new(limits));
        self.outlier.store(Arc::new(outlier));
    }

    fn limits(&self) -> CallLimits {
        **self.limits.load()
    }

    pub fn new(
        metrics: ProxyMetrics,
        backends: Arc<Backends>,
        outlier: OutlierSettings,
        limits: CallLimits,
        name_backends: bool,
        access_log: Option<crate::access_log::AccessLog>,
        sampler: Option<crate::telemetry::Sampler>,
    ) -> Self {
        let unrouted_latency = metrics
            .call_duration
            .get_or_create(&ServiceLabel {
                service: "-".into(),
            })
            .clone();
        ProxyState {
            metrics,
            backends,
            outlier: arc_swap::ArcSwap::from_pointee(outlier),
            limits: arc_swap::ArcSwap::from_pointee(limits),
            name_backends,
            unrouted: CodeCounts::default(),
            unrouted_latency,
            access_log,
            sampler,
        }
    }

    /// A call to `member` failed in a way that points at the backend; eject it
    /// after enough in a row, unless too much of the service is ejected
    /// already. The service is looked over only when a streak reaches the
    /// threshold (and again each threshold further), never on every failure.
    pub fn backend_failed(&self, service: &ServiceRuntime, member: &Member) {
        let backend = &member.backend;
        let settings = self.outlier.load();
        let first = match backend.outlier.record_failure(&settings) {
            OutlierVerdict::Keep => return,
            OutlierVerdict::Eject { first_of_streak } => first_of_streak,
        };
        let members = service.members(&self.backends);
        let ejected = members
            .list
            .iter()
            .filter(|m| m.backend.outlier.is_ejected())
            .count();
        let cap = (members.len() * settings.max_ejection_percent as usize / 100).max(1);
        if ejected >= cap {
            if first {
                tracing::warn!(backend = %backend.addr, service = %service.name, ejected, "not ejecting: the service's ejection cap is reached");
            }
            return;
        }
        let length = backend.outlier.eject(&settings);
        tracing::warn!(backend = %backend.addr, service = %service.name, ?length, "backend ejected after consecutive failures");
    }
}

pub struct Proxy {
    state: Arc<ProxyState>,
    /// Swapped whole when the configuration is reloaded; a call keeps the
    /// one it was routed by.
    router: arc_swap::ArcSwap<Router>,
    services: Arc<ServiceRuntimes>,
}

/// Where a call goes, once routed.
struct Target<'a> {
    service: Arc<ServiceRuntime>,
    /// The route; `None` for unrouted calls.
    route: Option<&'a Arc<router::Route>>,
    /// The route's policy; `None` for unrouted calls (the service's round-robin).
    balancer: Option<&'a Arc<dyn Balancer>>,
    retries: u32,
    /// Calls may be repeated after a backend was lost mid-call.
    idempotent: bool,
    options: Option<&'a Arc<RouteOptions>>,
    hidden_headers: &'a Arc<HiddenHeaders>,
    /// The longest a call without `grpc-timeout` may last.
    max_duration: Option<Duration>,
    stream_idle_timeout: Duration,
}

/// What every attempt of a call sends.
#[derive(Clone, Copy)]
struct CallParts<'a> {
    parts: &'a http::request::Parts,
    headers: &'a Arc<HeaderMap>,
    deadline: Option<Instant>,
    stream_idle_timeout: Duration,
}

/// A backend's answer, with what must live as long as its body.
struct Answered {
    response: Response<UpstreamBody>,
    attempt: AttemptRecord,
    /// The attempt's own timers, armed since it began, carried on into
    /// the response: one timer each per call, not one per phase.
    timers: Timers,
}

/// How one attempt on one backend ended. (Moved once per attempt: boxing
/// the large variant would cost an allocation per call instead.)
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Answered(Answered),
    /// The backend may have seen the call (or the deadline passed): final.
    Failed(ProxyError),
    /// The call cannot have reached the backend: another may take it.
    NotReached(ProxyError),
    /// The backend was lost before it answered; it may have seen the call,
    /// so only an idempotent route may send it again.
    Lost(ProxyError),
}

impl Proxy {
    pub fn new(state: Arc<ProxyState>, router: Router, services: Arc<ServiceRuntimes>) -> Self {
        Proxy {
            state,
            router: arc_swap::ArcSwap::from_pointee(router),
            services,
        }
    }

    /// The routes calls are matched against now.
    pub fn router(&self) -> Arc<Router> {
        self.router.load_full()
    }

    /// Routes new calls by `router` from now on (a configuration reload);
    /// calls already routed keep the old one.
    pub fn set_router(&self, router: Router) {
        self.router.store(Arc::new(router));
    }

    pub fn services(&self) -> &Arc<ServiceRuntimes> {
        &self.services
    }

    pub fn state(&self) -> &Arc<ProxyState> {
        &self.state
    }

    /// Handles one call from `client`; every outcome is a gRPC response,
    /// and every call is counted (and logged) once, when it ends.
    pub async fn handle(
        &self,
        req: Request<RequestBody>,
        client: SocketAddr,
    ) -> Response<ResponseBody> {
        let mut call = CallRecord::start(self.state.clone(), Instant::now());
        let parent = (self.state.sampler.as_ref()).and_then(|s| s.sample(req.headers()));
        if self.state.access_log.is_some() || parent.is_some() {
            let span = parent.map(|p| CallSpan::start(p, req.uri().path(), client));
            call.keep_details(client, req.uri(), span);
        }
        match self.forward(req, &mut call).await {
            Ok(answered) => respond(answered, call, self.state.name_backends),
            Err(err) => {
                call.set_status(err.code());
                tracing::debug!(cause = %err, "call answered by the gateway");
                err.into_response(self.state.name_backends)
            }
        }
    }

    async fn forward(
        &self,
        req: Request<RequestBody>,
        call: &mut CallRecord,
    ) -> Result<Answered, ProxyError> {
        let (mut parts, body) = req.into_parts();
        check_grpc(&parts)?;
        let path = parts.uri.path();
        let (grpc_service, method) =
            split_path(path).ok_or_else(|| ProxyError::BadPath(path.to_owned()))?;
        let router = self.router.load_full();
        let target = self.target(&router, path, grpc_service)?;
        call.routed(&target.service);
        call.note_route(target.route);
        let name = &target.service.name;
        // The client's deadline, clipped; else the route's longest call.
        let deadline = parts
            .headers
            .get(status::GRPC_TIMEOUT)
            .and_then(timeout::parse)
            .map(|d| d.min(self.state.limits().max_grpc_timeout))
            .or(target.max_duration)
            .map(|d| call.started() + d);
        // Shared once, so a policy that reads headers does not copy them per pick.
        let headers = Arc::new(std::mem::take(&mut parts.headers));

        let members = target.service.members(&self.state.backends);
        if members.is_empty() {
            return Err(if self.services.is_ready() {
                ProxyError::NoEndpoints {
                    service: name.to_string(),
                }
            } else {
                ProxyError::NotReady {
                    service: name.to_string(),
                }
            });
        }
        target.service.retry_budget.load().deposit();
        let body = ReplayBody::new(body);
        call.note_request(&body);
        let span = call.span().cloned();
        let parts_of_call = CallParts {
            parts: &parts,
            headers: &headers,
            deadline,
            stream_idle_timeout: target.stream_idle_timeout,
        };
        let mut tried: SmallVec<[usize; 4]> = SmallVec::new();
        loop {
            let (chosen, placed_by) = self.pick(&target, &members, &tried, &headers, method)?;
            tried.push(chosen);
            call.note_placed(target.balancer, placed_by);
            let member = &members.list[chosen];
            call.attempting(member);
            let attempt_span = span
                .as_ref()
                .map(|s| s.attempt(tried.len() as u32, path, &member.backend.addr));
            // A policy that learns from outcomes hears how this attempt ends.
            let learner = target.balancer.filter(|b| b.learns()).map(|b| Learner {
                balancer: b.clone(),
                generation: members.generation(),
                set_index: chosen as u32,
                placed_by,
            });
            let started = call.started();
            let attempted = self
                .attempt(
                    &target,
                    member,
                    learner,
                    &body,
                    &parts_of_call,
                    started,
                    attempt_span.clone(),
                )
                .await;
            if let (
                Some(span),
                Attempt::Failed(err) | Attempt::NotReached(err) | Attempt::Lost(err),
            ) = (&attempt_span, &attempted)
            {
                span.failed(&err.attempt_cause());
            }
            let error = match attempted {
                Attempt::Answered(answered) => return Ok(answered),
                Attempt::Failed(err) => return Err(err),
                Attempt::Lost(err) if !target.idempotent => return Err(err),
                Attempt::NotReached(err) | Attempt::Lost(err) => err,
            };
            tracing::debug!(service = %name, backend = %member.backend.addr, cause = %error, "attempt failed; the call may go to another backend");
            let more_allowed =
                tried.len() <= target.retries as usize && tried.len() < members.len();
            if !more_allowed {
                return Err(error);
            }
            if !target.service.retry_budget.load().withdraw() {
                target.service.retries_budget_exhausted.inc();
                return Err(error);
            }
            target.service.retries.inc();
            if let Some(span) = &span {
                span.retrying(&error.attempt_cause());
            }
        }
    }

    /// Sends the call to `member`'s backend (`span`: the attempt's, when
    /// the call is traced).
    #[allow(clippy::too_many_arguments)]
    async fn attempt(
        &self,
        target: &Target<'_>,
        member: &Arc<Member>,
        learner: Option<Learner>,
        body: &ReplayBody,
        call: &CallParts<'_>,
        call_started: Instant,
        span: Option<AttemptSpan>,
    ) -> Attempt {
        let service = &target.service;
        let CallParts {
            parts,
            headers,
            deadline,
            stream_idle_timeout,
        } = *call;
        let deadline_exceeded = || {
            Attempt::Failed(ProxyError::DeadlineExceeded {
                service: service.name.to_string(),
            })
        };
        let upstream_error = |cause: String| ProxyError::Upstream {
            service: service.name.to_string(),
            backend: member.backend.addr.to_string(),
            cause,
        };
        let request = body;
        let Some(body) = body.retry() else {
            // An earlier attempt sent more than can be replayed.
            return Attempt::Failed(upstream_error(
                "the request was too large to send again after a failed attempt".into(),
            ));
        };
        let stream = match within(deadline, member.backend.pool.stream()).await {
            None => return deadline_exceeded(),
            Some(Ok(stream)) => stream,
            Some(Err(err)) => {
                if let PoolError::Connect(_) = err {
                    member.counts.attempts.inc(status::UNAVAILABLE);
                    self.state.backend_failed(service, member);
                } else {
                    // At capacity: busy, not broken.
                    member.counts.attempts.inc(status::RESOURCE_EXHAUSTED);
                }
                return Attempt::NotReached(ProxyError::Unreachable {
                    service: service.name.to_string(),
                    cause: err.to_string(),
                });
            }
        };
        let mut upstream = Request::new(body);
        *upstream.method_mut() = http::Method::POST;
        *upstream.uri_mut() = upstream_uri(&member.backend, &parts.uri);
        *upstream.headers_mut() = HeaderMap::clone(headers);
        if let Some(span) = &span {
            span.inject(upstream.headers_mut());
        }
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            upstream
                .headers_mut()
                .insert(status::GRPC_TIMEOUT, timeout::encode(left));
        }
        let mut record = AttemptRecord::start(
            self.state.clone(),
            service.clone(),
            member.clone(),
            learner,
            call_started,
        );
        record.traced_by(span);
        let mut timers = Timers::new(deadline, request, stream_idle_timeout);
        let sent = tokio::select! {
            biased;
            sent = upstream::send(stream.sender.clone(), upstream) => Some(sent),
            expired = std::future::poll_fn(|cx| timers.poll_expired(cx)) => match expired {
                Expired::Deadline => None,
                Expired::Idle => {
                    record.hold(stream.into_permit());
                    record.deadline_passed();
                    return Attempt::Failed(ProxyError::Idle {
                        service: service.name.to_string(),
                        after: stream_idle_timeout,
                    });
                }
            },
        };
        let refused = match &sent {
            Some(Ok(response)) => refused_while_going_away(response, &stream).await,
            _ => false,
        };
        match sent {
            None => {
                record.hold(stream.into_permit());
                record.deadline_passed();
                deadline_exceeded()
            }
            Some(Ok(response)) if refused => {
                // C-core answers so the calls it had received but not yet
                // handed to the application when it began to shut down.
                let code = status::code_of(response.headers()).unwrap_or(status::UNAVAILABLE);
                record.set_status(code);
                Attempt::NotReached(upstream_error(format!(
                    "the backend is going away and answered {} without processing the call",
                    status::name(code)
                )))
            }
            Some(Ok(response)) => {
                record.hold(stream.into_permit());
                record.answered();
                // Answered: no attempt follows, nothing need be kept for one.
                request.stop_keeping();
                Attempt::Answered(Answered {
                    response,
                    attempt: record,
                    timers,
                })
            }
            Some(Err(err @ SendError::Malformed(_))) => {
                // Not the backend's doing, and no other would take it.
                record.set_status(status::INTERNAL);
                Attempt::Failed(ProxyError::Unsendable {
                    service: service.name.to_string(),
                    cause: crate::errors::chain(&err),
                })
            }
            Some(Err(err)) => {
                let error = upstream_error(crate::errors::chain(&err));
                match not_processed(&err) {
                    Some(Refusal::GoingAway) => {
                        stream.connection_going_away();
                        record.set_status(status::CANCELLED); // not the backend's fault
                        Attempt::NotReached(error)
                    }
                    Some(Refusal::Refused) => {
                        record.set_status(status::CANCELLED);
                        Attempt::NotReached(error)
                    }
                    None => {
                        record.set_status(status::UNAVAILABLE);
                        Attempt::Lost(error)
                    }
                }
            }
        }
    }

    fn target<'a>(
        &'a self,
        router: &'a Router,
        path: &str,
        grpc_service: &str,
    ) -> Result<Target<'a>, ProxyError> {
        if let Some(route) = router.route(path) {
            return Ok(Target {
                service: route.service.clone(),
                route: Some(route),
                balancer: Some(&route.balancer),
                retries: route.retries,
                idempotent: route.idempotent,
                options: Some(&route.options),
                hidden_headers: &route.hidden_headers,
                max_duration: route.max_duration,
                stream_idle_timeout: route
                    .stream_idle_timeout
                    .unwrap_or_else(|| self.state.limits().stream_idle_timeout),
            });
        }
        if !self.services.is_ready() {
            // Unknown yet, not unknown: no UNIMPLEMENTED before the first
            // listing, and no state made for a name a client chose.
            return Err(ProxyError::NotReady {
                service: grpc_service.to_owned(),
            });
        }
        let service =
            self.services
                .known(grpc_service)
                .ok_or_else(|| ProxyError::UnknownService {
                    path: path.to_owned(),
                    service: grpc_service.to_owned(),
                })?;
        Ok(Target {
            service,
            route: None,
            balancer: None,
            retries: DEFAULT_RETRIES,
            idempotent: false,
            options: None,
            hidden_headers: HiddenHeaders::sensitive(),
            max_duration: None,
            stream_idle_timeout: self.state.limits().stream_idle_timeout,
        })
    }

    /// The candidates a call may use, and the policy's choice among them.
    fn pick(
        &self,
        target: &Target<'_>,
        members: &Arc<Members>,
        tried: &[usize],
        headers: &Arc<HeaderMap>,
        method: &str,
    ) -> Result<(usize, u8), ProxyError> {
        let mut candidates: SmallVec<[usize; 16]> = (0..members.len())
            .filter(|i| !tried.contains(i) && members.list[*i].is_usable())
            .collect();
        if candidates.is_empty() {
            // Panic mode: nothing usable is left, so every endpoint not yet tried is.
            candidates = (0..members.len()).filter(|i| !tried.contains(i)).collect();
            if candidates.is_empty() {
                return Err(ProxyError::Unreachable {
                    service: target.service.name.to_string(),
                    cause: "every endpoint was tried".into(),
                });
            }
            target.service.panic_mode.inc();
        }
        let ctx = PickContext {
            service: &target.service.name,
            method,
            headers,
            members,
            candidates: &candidates,
            options: target.options,
            hidden_headers: target.hidden_headers,
        };
        let fallback = &target.service.fallback;
        let balancer = target.balancer.map_or(fallback as &dyn Balancer, |b| &**b);
        let (position, placed_by) = match balancer.pick_placed(&ctx) {
            Ok((p, by)) if p < candidates.len() => (p, by),
            outcome => {
                tracing::debug!(
                    policy = balancer.name(),
                    ?outcome,
                    "policy gave no usable pick; falling back to round-robin"
                );
                (
                    fallback.pick(&ctx).expect("candidates is not empty"),
                    crate::balance::PLACED_BY_FALLBACK,
                )
            }
        };
        Ok((candidates[position], placed_by))
    }
}

fn check_grpc(parts: &http::request::Parts) -> Result<(), ProxyError> {
    if parts.method != http::Method::POST {
        return Err(ProxyError::NotGrpc("gRPC calls are POST"));
    }
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    if !content_type.is_some_and(|v| v.starts_with("application/grpc")) {
        return Err(ProxyError::NotGrpc("content-type is not application/grpc"));
    }
    Ok(())
}

/// Runs `fut` until `deadline` (if any); `None` when the deadline passed.
async fn within<T>(
    deadline: Option<Instant>,
    fut: impl std::future::Future<Output = T>,
) -> Option<T> {
    match deadline {
        Some(d) => tokio::time::timeout_at(d, fut).await.ok(),
        None => Some(fut.await),
    }
}

/// The request's URI toward `backend`: its authority (parsed once, when the
/// backend was made), the client's path (shared, not copied).
fn upstream_uri(backend: &upstream::Backend, original: &http::Uri) -> http::Uri {
    let path = original
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    backend.uri(path).unwrap_or_else(|| original.clone())
}

/// A trailers-only CANCELLED or UNAVAILABLE on a connection the backend
/// already sent GOAWAY on: the answer of a server that is shutting down to
/// calls it had not started (gRPC C-core does so for calls not yet handed
/// to the application). The GOAWAY's bytes precede these on the wire, so
/// the connection is known to be going away by the time they are read.
///
/// C-core may cancel those calls a moment before its GOAWAY is on the wire,
/// so a trailers-only CANCELLED (which a server answers a call it never
/// started, and rarely otherwise) waits briefly for the GOAWAY to be read.
async fn refused_while_going_away(
    response: &Response<UpstreamBody>,
    stream: &crate::upstream::Stream,
) -> bool {
    if response.status() != http::StatusCode::OK {
        return false;
    }
    match status::code_of(response.headers()) {
        Some(status::UNAVAILABLE) => stream.is_going_away(),
        Some(status::CANCELLED) => {
            let until = Instant::now() + GOAWAY_GRACE;
            while !stream.is_going_away() {
                if Instant::now() >= until {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            true
        }
        _ => false,
    }
}

/// How long a trailers-only CANCELLED waits for its backend's GOAWAY.
const GOAWAY_GRACE: Duration = Duration::from_millis(50);

/// Why a backend cannot have processed a request it was sent.
enum Refusal {
    /// Its GOAWAY says the stream is above the last one it processed (or
    /// the stream was opened after it): the connection takes no more.
    GoingAway,
    /// The stream was refused, or never left the gateway.
    Refused,
}

/// `Some` when the backend cannot have processed the request (RFC 9113
/// §8.7): a REFUSED_STREAM reset, a GOAWAY of any code for a stream above
/// its last-stream-id (h2 fails exactly those, and new ones, with the
/// GOAWAY's error; streams it did process end otherwise), or a request the
/// connection never took.
fn not_processed(err: &SendError) -> Option<Refusal> {
    let h2 = match err {
        SendError::NotSent(_) => return Some(Refusal::Refused),
        SendError::Stream(h2) => h2,
        SendError::Malformed(_) => return None,
    };
    if h2.is_go_away() && h2.is_remote() {
        return Some(Refusal::GoingAway);
    }
    (h2.reason() == Some(h2::Reason::REFUSED_STREAM) && h2.is_reset()).then_some(Refusal::Refused)
}

/// The backend's response on its way to the client.
fn respond(
    answered: Answered,
    mut call: CallRecord,
    name_backends: bool,
) -> Response<ResponseBody> {
    let Answered {
        response,
        mut attempt,
        timers,
    } = answered;
    let (mut parts, body) = response.into_parts();
    if parts.status != http::StatusCode::OK {
        // Not a gRPC answer: say what it was, as gRPC.
        let code = status::from_http(parts.status);
        attempt.set_status(code);
        call.set_status(code);
        let who = if name_backends {
            format!("backend {}", attempt.backend_addr())
        } else {
            "a backend".to_owned()
        };
        let msg = format!(
            "{who} of {:?} answered HTTP {}",
            attempt.service(),
            parts.status
        );
        return status::trailers_only(code, &msg);
    }
    if let Some(code) = status::code_of(&parts.headers) {
        attempt.set_status(code); // trailers-only
        call.set_status(code);
    }
    parts.headers.remove("content-length");
    if !parts.headers.contains_key(http::header::CONTENT_TYPE) {
        parts.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
    }
    Response::from_parts(
        parts,
        ResponseBody::Upstream(Box::pin(Observed::new(
            body,
            timers,
            attempt,
            call,
            name_backends,
        ))),
    )
}

/// `weir_calls_total` and `weir_attempts_total`, read at scrape time from
/// the counts the data path keeps: a backend's series go when it does.
#[derive(Debug)]
pub struct CallCounts {
    state: Arc<ProxyState>,
    services: Arc<ServiceRuntimes>,
}

impl CallCounts {
    pub fn new(proxy: &Proxy) -> Self {
        CallCounts {
            state: proxy.state.clone(),
            services: proxy.services.clone(),
        }
    }
}

impl std::fmt::Debug for ProxyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyState").finish_non_exhaustive()
    }
}

impl Collector for CallCounts {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let services = self.services.all();
        let rows = |service: &str, backend: &str, counts: &CodeCounts| {
            counts
                .nonzero()
                .map(|(code, n)| {
                    let labels = CallLabels {
                        service: service.to_owned(),
                        backend: backend.to_owned(),
                        code: status::name(code),
                    };
                    (labels, n)
                })
                .collect::<Vec<_>>()
        };
        let mut calls = rows("-", "-", &self.state.unrouted);
        let mut attempts = Vec::new();
        for service in &services {
            calls.extend(rows(&service.name, "-", &service.unanswered));
            for (addr, counts) in service.backend_counts() {
                calls.extend(rows(&service.name, &addr, &counts.calls));
                attempts.extend(rows(&service.name, &addr, &counts.attempts));
            }
        }
        encode_counters(
            &mut encoder,
            "calls",
            "gRPC calls by service, the backend of their last attempt (- when none answered) and status; each call counted once, when it ends",
            calls,
        )?;
        encode_counters(
            &mut encoder,
            "attempts",
            "attempts to send a call to a backend, by service, backend and status (CANCELLED: the client left, or the backend never saw it)",
            attempts,
        )
    }
}
