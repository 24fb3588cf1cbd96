//! Active health checks with the standard `grpc.health.v1.Health/Check`.
//!
//! One task probes every live backend each interval (one probe per backend at
//! a time) and moves it between SERVING and NOT_SERVING by the configured
//! thresholds. A backend without a health service (UNIMPLEMENTED) stays
//! `unknown`, which does not keep calls away.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use super::{Backend, Backends, CheckedHealth};
use crate::config::HealthCheckSection;
use crate::metrics::ProxyMetrics;

pub fn spawn_health_checks(
    backends: Arc<Backends>,
    config: HealthCheckSection,
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
                    metrics.health_check(&backend.addr, result);
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

async fn probe(backend: &Backend, config: &HealthCheckSection) -> CheckedHealth {
    let channel = backend
        .health_channel
        .get_or_init(|| {
            tonic::transport::Endpoint::from_shared(format!("http://{}", backend.addr))
                .expect("backend addresses are host:port")
                .connect_timeout(config.timeout)
                .connect_lazy()
        })
        .clone();
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
    use std::time::Duration;

    #[test]
    fn thresholds_gate_transitions() {
        let backends = Backends::new(PoolConfig {
            connections: 1,
            connect_timeout: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(5),
        });
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
