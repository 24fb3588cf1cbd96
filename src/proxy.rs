//! The hot path: one gRPC call from the client to a backend and back.
//!
//! route → the service's members (cached per endpoint-set generation) →
//! usable candidates → the policy's pick → the backend's pooled HTTP/2
//! connection → the response streamed back. Calls that never reached a
//! backend are retried on another one, within the route's limit and the
//! global retry budget. Nothing here waits on etcd or holds a lock across
//! an `.await`.

pub mod body;
pub mod call;
pub mod router;
pub mod services;
pub mod status;
pub mod timeout;

use std::sync::Arc;

use http::{HeaderMap, HeaderValue, Request, Response};
use hyper::body::Incoming;
use smallvec::SmallVec;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};

use crate::balance::{Balancer, PickContext, RouteOptions};
use crate::metrics::{BackendLabel, CallLabels, ProxyMetrics};
use crate::upstream::{Backends, OutlierSettings, ReplayBody};

use crate::members::{Member, Members};
use body::{Observed, ResponseBody};
use call::{CallRecord, Learner};
use router::{split_path, Router};
use services::{ServiceRuntime, ServiceRuntimes};
use status::ProxyError;

/// Retries allowed for calls that match no route.
const DEFAULT_RETRIES: u32 = 2;

/// How many retries the gateway allows on top of its calls.
#[derive(Clone, Debug)]
pub struct RetrySettings {
    /// Retries allowed as a share of calls, in percent.
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

/// State every call shares.
pub struct ProxyState {
    pub metrics: ProxyMetrics,
    pub backends: Arc<Backends>,
    outlier: OutlierSettings,
    retry_budget: TpsBudget,
}

impl ProxyState {
    pub fn new(
        metrics: ProxyMetrics,
        backends: Arc<Backends>,
        outlier: OutlierSettings,
        retry: &RetrySettings,
    ) -> Self {
        let budget = TpsBudget::new(
            std::time::Duration::from_secs(10),
            retry.min_per_second,
            retry.budget_percent / 100.0,
        );
        ProxyState {
            metrics,
            backends,
            outlier,
            retry_budget: budget,
        }
    }

    /// A call to `member` failed in a way that points at the backend; eject it
    /// after enough in a row, unless too much of the service is ejected already.
    pub fn backend_failed(&self, service: &ServiceRuntime, member: &Member) {
        let backend = &member.backend;
        if !backend.outlier.record_failure(&self.outlier) {
            return;
        }
        let members = service.members(&self.backends, &self.metrics);
        let ejected = members
            .list
            .iter()
            .filter(|m| m.backend.outlier.is_ejected())
            .count();
        let cap = (members.len() * self.outlier.max_ejection_percent as usize / 100).max(1);
        if ejected >= cap {
            tracing::warn!(backend = %backend.addr, service = %service.name, ejected, "not ejecting: the service's ejection cap is reached");
            return;
        }
        let length = backend.outlier.eject(&self.outlier);
        self.metrics
            .ejections
            .get_or_create(&BackendLabel {
                backend: backend.addr.to_string(),
            })
            .inc();
        tracing::warn!(backend = %backend.addr, service = %service.name, ?length, "backend ejected after consecutive failures");
    }
}

pub struct Proxy {
    shared: Arc<ProxyState>,
    router: Router,
    services: Arc<ServiceRuntimes>,
}

/// Where a call goes, once routed.
struct Target<'a> {
    service: Arc<ServiceRuntime>,
    /// The route's policy; `None` for unrouted calls (the service's round-robin).
    balancer: Option<&'a Arc<dyn Balancer>>,
    retries: u32,
    /// Calls may be repeated after a backend was lost mid-call.
    idempotent: bool,
    options: Option<&'a Arc<RouteOptions>>,
}

/// What every attempt of a call sends.
#[derive(Clone, Copy)]
struct CallParts<'a> {
    parts: &'a http::request::Parts,
    headers: &'a Arc<HeaderMap>,
    deadline: Option<Instant>,
    started: Instant,
}

/// How one attempt on one backend ended.
enum Attempt {
    Answered(Response<ResponseBody>),
    /// The backend may have seen the call (or the deadline passed): final.
    Failed(ProxyError),
    /// The call cannot have reached the backend: another may take it.
    NotReached(ProxyError),
    /// The backend was lost before it answered; it may have seen the call,
    /// so only an idempotent route may send it again.
    Lost(ProxyError),
}

impl Proxy {
    pub fn new(shared: Arc<ProxyState>, router: Router, services: Arc<ServiceRuntimes>) -> Self {
        Proxy {
            shared,
            router,
            services,
        }
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn services(&self) -> &ServiceRuntimes {
        &self.services
    }

    pub fn shared(&self) -> &Arc<ProxyState> {
        &self.shared
    }

    /// Handles one call; every outcome is a gRPC response.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ResponseBody> {
        let started = Instant::now();
        match self.forward(req, started).await {
            Ok(resp) => resp,
            Err((service, err)) => {
                self.shared
                    .metrics
                    .calls
                    .get_or_create(&CallLabels {
                        service,
                        backend: "-".into(),
                        code: status::name(err.code()),
                    })
                    .inc();
                tracing::debug!(cause = %err, "call answered by the gateway");
                err.into_response()
            }
        }
    }

    /// On error, also returns the service name for the metrics.
    async fn forward(
        &self,
        req: Request<Incoming>,
        started: Instant,
    ) -> Result<Response<ResponseBody>, (String, ProxyError)> {
        let (mut parts, body) = req.into_parts();
        let unrouted = |e| ("-".to_owned(), e);
        check_grpc(&parts).map_err(unrouted)?;
        let path = parts.uri.path();
        let (grpc_service, method) =
            split_path(path).ok_or_else(|| unrouted(ProxyError::BadPath(path.to_owned())))?;
        let target = self.target(path, grpc_service).map_err(unrouted)?;
        let name = target.service.name.to_string();
        let deadline = parts
            .headers
            .get("grpc-timeout")
            .and_then(timeout::parse)
            .map(|d| started + d);
        // Shared once, so a policy that reads headers does not copy them per pick.
        let headers = Arc::new(std::mem::take(&mut parts.headers));

        let members = target
            .service
            .members(&self.shared.backends, &self.shared.metrics);
        if members.is_empty() {
            let err = if self.services.is_ready() {
                ProxyError::NoEndpoints {
                    service: name.clone(),
                }
            } else {
                ProxyError::NotReady {
                    service: name.clone(),
                }
            };
            return Err((name, err));
        }
        self.shared.retry_budget.deposit();
        let body = ReplayBody::new(body);
        let call = CallParts {
            parts: &parts,
            headers: &headers,
            deadline,
            started,
        };
        let mut tried: SmallVec<[usize; 4]> = SmallVec::new();
        loop {
            let chosen = self
                .pick(&target, &members, &tried, &headers, method)
                .map_err(|e| (name.clone(), e))?;
            tried.push(chosen);
            let member = &members.list[chosen];
            // A policy that learns from outcomes hears how this attempt ends.
            let learner = target.balancer.filter(|b| b.learns()).map(|b| Learner {
                balancer: b.clone(),
                generation: members.generation(),
                set_index: chosen as u32,
            });
            let error = match self.attempt(&target, member, learner, &body, &call).await {
                Attempt::Answered(resp) => return Ok(resp),
                Attempt::Failed(err) => return Err((name, err)),
                Attempt::Lost(err) if !target.idempotent => return Err((name, err)),
                Attempt::NotReached(err) | Attempt::Lost(err) => err,
            };
            let more_allowed =
                tried.len() <= target.retries as usize && tried.len() < members.len();
            if !more_allowed {
                return Err((name, error));
            }
            if !self.shared.retry_budget.withdraw() {
                self.shared.metrics.retries_budget_exhausted.inc();
                return Err((name, error));
            }
            target.service.retries.inc();
        }
    }

    /// Sends the call to `member`'s backend.
    async fn attempt(
        &self,
        target: &Target<'_>,
        member: &Arc<Member>,
        learner: Option<Learner>,
        body: &ReplayBody,
        call: &CallParts<'_>,
    ) -> Attempt {
        let service = &target.service;
        let CallParts {
            parts,
            headers,
            deadline,
            started,
        } = *call;
        let deadline_exceeded = || {
            Attempt::Failed(ProxyError::DeadlineExceeded {
                service: service.name.to_string(),
            })
        };
        let Some(body) = body.retry() else {
            // An earlier attempt sent more than can be replayed.
            return Attempt::Failed(ProxyError::Upstream {
                service: service.name.to_string(),
                backend: member.backend.addr.to_string(),
                cause: "the request was too large to send again after a failed attempt".into(),
            });
        };
        let mut sender = match within(deadline, member.backend.pool.sender()).await {
            None => return deadline_exceeded(),
            Some(Ok(sender)) => sender,
            Some(Err(err)) => {
                self.shared.backend_failed(service, member);
                return Attempt::NotReached(ProxyError::Unreachable {
                    service: service.name.to_string(),
                    cause: err.to_string(),
                });
            }
        };
        let mut upstream = Request::new(body);
        *upstream.method_mut() = http::Method::POST;
        *upstream.uri_mut() = upstream_uri(&member.backend.addr, &parts.uri);
        *upstream.headers_mut() = HeaderMap::clone(headers);
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            upstream
                .headers_mut()
                .insert("grpc-timeout", timeout::encode(left));
        }
        let mut record = CallRecord::start(
            self.shared.clone(),
            service.clone(),
            member.clone(),
            learner,
            started,
        );
        match within(deadline, sender.send_request(upstream)).await {
            None => {
                record.set_status(status::DEADLINE_EXCEEDED);
                deadline_exceeded()
            }
            Some(Ok(resp)) => Attempt::Answered(respond(resp, record, deadline)),
            Some(Err(err)) => {
                record.set_status(status::UNAVAILABLE);
                let error = ProxyError::Upstream {
                    service: service.name.to_string(),
                    backend: member.backend.addr.to_string(),
                    cause: err.to_string(),
                };
                if refused_before_processing(&err) {
                    Attempt::NotReached(error)
                } else {
                    Attempt::Lost(error)
                }
            }
        }
    }

    fn target<'a>(&'a self, path: &str, grpc_service: &str) -> Result<Target<'a>, ProxyError> {
        if let Some(route) = self.router.route(path) {
            return Ok(Target {
                service: route.service.clone(),
                balancer: Some(&route.balancer),
                retries: route.retries,
                idempotent: route.idempotent,
                options: Some(&route.options),
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
            balancer: None,
            retries: DEFAULT_RETRIES,
            idempotent: false,
            options: None,
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
    ) -> Result<usize, ProxyError> {
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
        };
        let fallback = &target.service.fallback;
        let balancer = target.balancer.map_or(fallback as &dyn Balancer, |b| &**b);
        let position = match balancer.pick(&ctx) {
            Ok(p) if p < candidates.len() => p,
            outcome => {
                tracing::debug!(
                    policy = balancer.name(),
                    ?outcome,
                    "policy gave no usable pick; falling back to round-robin"
                );
                fallback.pick(&ctx).expect("candidates is not empty")
            }
        };
        Ok(candidates[position])
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

fn upstream_uri(addr: &str, original: &http::Uri) -> http::Uri {
    let path = original.path_and_query().map_or("/", |p| p.as_str());
    http::Uri::builder()
        .scheme("http")
        .authority(addr)
        .path_and_query(path)
        .build()
        .unwrap_or_else(|_| original.clone())
}

/// True when the backend cannot have processed the request: it refused the
/// stream, or the connection was going away before the stream opened.
fn refused_before_processing(err: &hyper::Error) -> bool {
    use std::error::Error as _;
    if err.is_canceled() {
        return true; // the connection was not ready; nothing was sent
    }
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        source = e.source();
    }
    false
}

/// The backend's response on its way to the client.
fn respond(
    resp: Response<Incoming>,
    mut record: CallRecord,
    deadline: Option<Instant>,
) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    if parts.status != http::StatusCode::OK {
        // Not a gRPC answer: say what it was, as gRPC.
        let code = status::from_http(parts.status);
        record.set_status(code);
        let msg = format!(
            "backend {} answered HTTP {}",
            record.backend_addr(),
            parts.status
        );
        return status::trailers_only(code, &msg);
    }
    if let Some(code) = status::code_of(&parts.headers) {
        record.set_status(code); // trailers-only
    }
    parts.headers.remove("content-length");
    if !parts.headers.contains_key(http::header::CONTENT_TYPE) {
        parts.headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
    }
    let deadline = deadline.map(|d| Box::pin(tokio::time::sleep_until(d)));
    Response::from_parts(
        parts,
        ResponseBody::Upstream(Box::pin(Observed::new(body, deadline, record))),
    )
}
