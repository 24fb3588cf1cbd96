//! Active health checks with the standard `grpc.health.v1.Health/Check`.
//!
//! One task probes every live backend each interval (one probe per backend at
//! a time) and moves it between SERVING and NOT_SERVING by the configured
//! thresholds. A backend without a health service (UNIMPLEMENTED) stays
//! `unknown`, which does not keep calls away.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::BodyExt;
use prost::Message;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::{Backend, Backends, CheckedHealth, PoolError, ReplayBody};

/// How backends are probed, and how many answers in a row move them.
#[derive(Clone, Debug)]
pub struct HealthCheckSettings {
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive SERVING answers that make an unhealthy backend healthy.
    pub healthy_threshold: u32,
    /// Consecutive failed checks that make a backend unhealthy.
    pub unhealthy_threshold: u32,
    /// The service name asked about ("" = the whole server).
    pub service: String,
}

impl Default for HealthCheckSettings {
    fn default() -> Self {
        HealthCheckSettings {
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            healthy_threshold: 1,
            unhealthy_threshold: 2,
            service: String::new(),
        }
    }
}

/// Probes every live backend each interval, by the settings `settings`
/// holds now: a change (a configuration reload) applies from the next
/// round; `None` stops the checks and forgets their verdicts, so no backend
/// stays out for a check that no longer runs.
pub fn spawn_health_checks(
    backends: Arc<Backends>,
    mut settings: watch::Receiver<Option<HealthCheckSettings>>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // Counts settings: a probe started under older ones records nothing
        // (checks switched off must leave no verdict behind).
        let era = Arc::new(AtomicU64::new(0));
        loop {
            let current = settings.borrow_and_update().clone();
            let this_era = era.fetch_add(1, Ordering::AcqRel) + 1;
            let Some(current) = current else {
                for backend in backends.live() {
                    backend.forget_health();
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    changed = settings.changed() => if changed.is_err() { return },
                }
                continue;
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                changed = settings.changed() => if changed.is_err() { return },
                _ = check_rounds(&backends, current, (era.clone(), this_era)) => {}
            }
        }
    })
}

/// Runs health-check rounds every `settings.interval`, forever; results
/// are recorded only while `era` is still the one they were started in.
async fn check_rounds(
    backends: &Arc<Backends>,
    settings: HealthCheckSettings,
    (era, this_era): (Arc<AtomicU64>, u64),
) {
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let request = Bytes::from(grpc_frame(&HealthCheckRequest {
        service: settings.service.clone(),
    }));
    loop {
        tick.tick().await;
        for backend in backends.live() {
            if backend.check_running.swap(true, Ordering::AcqRel) {
                continue;
            }
            let (settings, request, era) = (settings.clone(), request.clone(), era.clone());
            tokio::spawn(async move {
                let result = probe(&backend, &settings, request).await;
                backend.check_running.store(false, Ordering::Release);
                let Some(result) = result else { return };
                if era.load(Ordering::Acquire) != this_era {
                    return; // the settings changed while it ran
                }
                if let Some(now) = backend.record_check(
                    result,
                    settings.healthy_threshold,
                    settings.unhealthy_threshold,
                ) {
                    tracing::info!(backend = %backend.addr, health = now.as_str(), "backend health changed");
                }
            });
        }
    }
}

/// One `grpc.health.v1.Health/Check` on the backend's own pool (the same
/// connections, settings and limits as its calls). `None`: no verdict,
/// because the backend is at capacity (that is not ill health).
async fn probe(
    backend: &Backend,
    settings: &HealthCheckSettings,
    request: Bytes,
) -> Option<CheckedHealth> {
    let checked = tokio::time::timeout(settings.timeout, async {
        let stream = match backend.pool.stream().await {
            Ok(stream) => stream,
            Err(PoolError::Connect(err)) => {
                tracing::debug!(backend = %backend.addr, cause = %err, "health check: cannot connect");
                return Some(CheckedHealth::NotServing);
            }
            Err(busy) => {
                tracing::debug!(backend = %backend.addr, cause = %busy, "health check skipped");
                return None;
            }
        };
        let Some(uri) = backend.uri(http::uri::PathAndQuery::from_static(CHECK_PATH)) else {
            tracing::warn!(backend = %backend.addr, "backend address is not a URI authority; not serving");
            return Some(CheckedHealth::NotServing);
        };
        let mut req = http::Request::new(ReplayBody::fixed(request));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
        let sender = stream.sender.clone();
        let _permit = stream.into_permit();
        let resp = match super::send(sender, req).await {
            Ok(resp) => resp,
            Err(err) => {
                tracing::debug!(backend = %backend.addr, cause = %crate::errors::chain(&err), "health check failed");
                return Some(CheckedHealth::NotServing);
            }
        };
        Some(verdict(resp).await)
    })
    .await;
    checked.unwrap_or(Some(CheckedHealth::NotServing))
}

const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
const SERVING: i32 = 1;

/// What a health-check response says.
async fn verdict(resp: http::Response<super::UpstreamBody>) -> CheckedHealth {
    if resp.status() != http::StatusCode::OK {
        return CheckedHealth::NotServing;
    }
    let trailers_only = grpc_status(resp.headers());
    let Ok(collected) = resp.into_body().collect().await else {
        return CheckedHealth::NotServing;
    };
    let status = trailers_only.or_else(|| collected.trailers().and_then(grpc_status));
    match status {
        Some(0) => {}
        Some(UNIMPLEMENTED) => return CheckedHealth::Unknown,
        _ => return CheckedHealth::NotServing,
    }
    let body = collected.to_bytes();
    let message = body.get(5..).unwrap_or_default();
    match HealthCheckResponse::decode(message) {
        Ok(r) if r.status == SERVING => CheckedHealth::Serving,
        _ => CheckedHealth::NotServing,
    }
}

const UNIMPLEMENTED: u32 = 12;

fn grpc_status(headers: &http::HeaderMap) -> Option<u32> {
    const GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");
    headers.get(GRPC_STATUS)?.to_str().ok()?.parse().ok()
}

/// A message in gRPC's length-prefixed framing (uncompressed).
fn grpc_frame(message: &impl Message) -> Vec<u8> {
    let body = message.encode_to_vec();
    let mut framed = Vec::with_capacity(5 + body.len());
    framed.push(0);
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    framed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::PoolConfig;

    #[tokio::test]
    async fn a_probe_of_an_address_that_is_no_uri_says_not_serving_instead_of_panicking() {
        let backends = Backends::new(PoolConfig::default());
        let b = backends.get(&"a b:80".into(), false);
        let request = Bytes::from(grpc_frame(&HealthCheckRequest::default()));
        let verdict = probe(&b, &HealthCheckSettings::default(), request).await;
        assert_eq!(verdict, Some(CheckedHealth::NotServing));
    }

    #[test]
    fn thresholds_gate_transitions() {
        let backends = Backends::new(PoolConfig::default());
        let b = backends.get(&"127.0.0.1:1".into(), false);
        assert_eq!(
            b.record_check(CheckedHealth::Serving, 2, 2),
            Some(CheckedHealth::Serving),
            "first answer decides"
        );
        assert_eq!(b.record_check(CheckedHealth::NotServing, 2, 2), None);
        assert_eq!(
            b.record_check(CheckedHealth::NotServing, 2, 2),
            Some(CheckedHealth::NotServing)
        );
        assert!(!b.is_usable());
        assert_eq!(b.record_check(CheckedHealth::Serving, 2, 2), None);
        assert_eq!(
            b.record_check(CheckedHealth::Serving, 2, 2),
            Some(CheckedHealth::Serving)
        );
        assert!(b.is_usable());
    }
}
