//! Active health checks with the standard `grpc.health.v1.Health/Check`.
//!
//! One task probes every live backend each interval (one probe per backend at
//! a time) and moves it between SERVING and NOT_SERVING by the configured
//! thresholds. A backend without a health service (UNIMPLEMENTED) stays
//! `unknown`, which does not keep calls away.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::{Backend, Backends, CheckedHealth};
use crate::metrics::ProxyMetrics;

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

pub fn spawn_health_checks(
    backends: Arc<Backends>,
    config: HealthCheckSettings,
    metrics: ProxyMetrics,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(config.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            for backend in backends.live() {
                if backend.check_running.swap(true, Ordering::AcqRel) {
                    continue;
                }
                let (config, metrics) = (config.clone(), metrics.clone());
                tokio::spawn(async move {
                    let result = probe(&backend, &config).await;
                    backend.check_running.store(false, Ordering::Release);
                    metrics.health_check(&backend.addr, result.as_str());
                    if let Some(now) = backend.record_check(
                        result,
                        config.healthy_threshold,
                        config.unhealthy_threshold,
                    ) {
                        tracing::info!(backend = %backend.addr, health = now.as_str(), "backend health changed");
                    }
                });
            }
        }
    })
}

async fn probe(backend: &Backend, config: &HealthCheckSettings) -> CheckedHealth {
    let channel = match backend.health_channel.get() {
        Some(channel) => channel.clone(),
        None => {
            // Discovery only lets host:port addresses through; should one
            // still not make a URI, the backend cannot be reached either.
            let endpoint = match tonic::transport::Endpoint::from_shared(format!(
                "http://{}",
                backend.addr
            )) {
                Ok(endpoint) => endpoint,
                Err(err) => {
                    tracing::warn!(backend = %backend.addr, cause = %err, "backend address is not a URI authority; not serving");
                    return CheckedHealth::NotServing;
                }
            };
            let channel = endpoint.connect_timeout(config.timeout).connect_lazy();
            backend.health_channel.get_or_init(|| channel).clone()
        }
    };
    let request = HealthCheckRequest {
        service: config.service.clone(),
    };
    match tokio::time::timeout(config.timeout, HealthClient::new(channel).check(request)).await {
        Ok(Ok(resp)) if resp.get_ref().status == ServingStatus::Serving as i32 => {
            CheckedHealth::Serving
        }
        Ok(Err(status)) if status.code() == tonic::Code::Unimplemented => CheckedHealth::Unknown,
        Ok(Ok(_)) | Ok(Err(_)) | Err(_) => CheckedHealth::NotServing,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::PoolConfig;

    #[tokio::test]
    async fn a_probe_of_an_address_that_is_no_uri_says_not_serving_instead_of_panicking() {
        let backends = Backends::new(PoolConfig::default());
        let b = backends.get(&"a b:80".into());
        let config = HealthCheckSettings::default();
        assert_eq!(probe(&b, &config).await, CheckedHealth::NotServing);
    }

    #[test]
    fn thresholds_gate_transitions() {
        let backends = Backends::new(PoolConfig::default());
        let b = backends.get(&"127.0.0.1:1".into());
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
