//! The configuration file turned into each subsystem's own settings: the one
//! place where `config` sections meet the types that discovery, upstream,
//! the proxy and the policy host take.

use crate::config::{
    Config, HealthCheckSection, OutlierSection, PolicySection, RetrySection, UpstreamSection,
};
use crate::config::{LimitsSection, RolloutSection};
use crate::discovery::{EtcdAccess, EtcdConfig, LeasePollConfig};
use crate::policy::Limits;
use crate::proxy::{CallLimits, RetrySettings};
use crate::upstream::{HealthCheckSettings, OutlierSettings, PoolConfig};

impl From<&Config> for EtcdConfig {
    fn from(config: &Config) -> Self {
        let mut etcd = EtcdConfig::new(config.etcd.endpoints.clone(), config.etcd.prefix.clone());
        etcd.access = EtcdAccess {
            endpoints: config.etcd.endpoints.clone(),
            ca: config.etcd.ca.clone(),
            cert: config.etcd.cert.clone(),
            key: config.etcd.key.clone(),
            username: config.etcd.username.clone(),
            password_file: config.etcd.password_file.clone(),
        };
        etcd.snapshot = config.etcd.snapshot.clone();
        etcd.follow.progress_interval = config.etcd.progress_interval;
        etcd.lease_poll = LeasePollConfig {
            polls_per_second: config.etcd.lease_polls_per_second,
            ..LeasePollConfig::default()
        };
        etcd
    }
}

impl From<&UpstreamSection> for PoolConfig {
    fn from(section: &UpstreamSection) -> Self {
        PoolConfig {
            connections: section.connections_per_backend,
            max_connections: section.max_connections_per_backend,
            max_streams_per_connection: section.max_streams_per_connection,
            max_requests_per_connection: section
                .max_requests_per_connection
                .unwrap_or(crate::upstream::STREAM_IDS),
            max_queued: section.max_queued_per_backend,
            queue_timeout: section.queue_timeout,
            connect_timeout: section.connect_timeout,
            keepalive_interval: (!section.keepalive_interval.is_zero())
                .then_some(section.keepalive_interval),
            keepalive_timeout: section.keepalive_timeout,
        }
    }
}

impl From<&HealthCheckSection> for HealthCheckSettings {
    fn from(section: &HealthCheckSection) -> Self {
        HealthCheckSettings {
            interval: section.interval,
            timeout: section.timeout,
            healthy_threshold: section.healthy_threshold,
            unhealthy_threshold: section.unhealthy_threshold,
            service: section.service.clone(),
        }
    }
}

impl From<&OutlierSection> for OutlierSettings {
    fn from(section: &OutlierSection) -> Self {
        OutlierSettings {
            consecutive_failures: section.consecutive_failures,
            base_ejection_time: section.base_ejection_time,
            max_ejection_time: section.max_ejection_time,
            max_ejection_percent: section.max_ejection_percent,
        }
    }
}

impl From<&RetrySection> for RetrySettings {
    fn from(section: &RetrySection) -> Self {
        RetrySettings {
            budget_percent: section.budget_percent,
            min_per_second: section.min_per_second,
        }
    }
}

impl From<&LimitsSection> for CallLimits {
    fn from(section: &LimitsSection) -> Self {
        CallLimits {
            stream_idle_timeout: section.stream_idle_timeout,
            max_grpc_timeout: section.max_grpc_timeout,
        }
    }
}

impl From<&PolicySection> for Limits {
    fn from(section: &PolicySection) -> Self {
        Limits {
            deadline: section.deadline,
            // Bounded by the config check, so the shift cannot overflow.
            memory_bytes: section.memory_mib << 20,
            instances: section.instances,
            max_component_bytes: section.max_size_mib << 20,
        }
    }
}

impl From<&RolloutSection> for crate::policy::rollout::Guards {
    fn from(section: &RolloutSection) -> Self {
        crate::policy::rollout::Guards {
            max_error_rate_increase: section.max_error_rate_increase,
            max_p99_increase: section.max_p99_increase,
            min_calls: section.min_calls,
            window: section.window,
            max_candidate_faults: section.max_candidate_faults,
        }
    }
}

/// This gateway's name in the fleet: `[policy.rollout] gateway_id`, else
/// the host name and the gRPC listener's port.
pub(super) fn gateway_id(config: &Config) -> String {
    if let Some(id) = &config.policy.rollout.gateway_id {
        return id.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty() && !h.contains('/'))
        .unwrap_or_else(|| "weir".into());
    format!("{host}:{}", config.listen.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file's defaults and the subsystems' own defaults say the same:
    /// a library user who builds settings by hand gets what `weir serve` does.
    #[test]
    fn file_defaults_match_the_subsystems_defaults() {
        let config = Config::parse("", std::path::Path::new("weir.toml")).unwrap();
        let pool = PoolConfig::from(&config.upstream);
        let default_pool = PoolConfig::default();
        assert_eq!(pool.connections, default_pool.connections);
        assert_eq!(pool.max_connections, default_pool.max_connections);
        assert_eq!(
            pool.max_streams_per_connection,
            default_pool.max_streams_per_connection
        );
        assert_eq!(pool.max_queued, default_pool.max_queued);
        assert_eq!(pool.queue_timeout, default_pool.queue_timeout);
        assert_eq!(pool.connect_timeout, default_pool.connect_timeout);
        assert_eq!(pool.keepalive_interval, default_pool.keepalive_interval);
        assert_eq!(pool.keepalive_timeout, default_pool.keepalive_timeout);
        let health = HealthCheckSettings::from(&config.health_check);
        let default_health = HealthCheckSettings::default();
        assert_eq!(health.interval, default_health.interval);
        assert_eq!(health.timeout, default_health.timeout);
        assert_eq!(health.healthy_threshold, default_health.healthy_threshold);
        assert_eq!(
            health.unhealthy_threshold,
            default_health.unhealthy_threshold
        );
        let outlier = OutlierSettings::from(&config.outlier);
        let default_outlier = OutlierSettings::default();
        assert_eq!(
            outlier.consecutive_failures,
            default_outlier.consecutive_failures
        );
        assert_eq!(
            outlier.base_ejection_time,
            default_outlier.base_ejection_time
        );
        assert_eq!(outlier.max_ejection_time, default_outlier.max_ejection_time);
        assert_eq!(
            outlier.max_ejection_percent,
            default_outlier.max_ejection_percent
        );
        let retry = RetrySettings::from(&config.retry);
        assert_eq!(
            retry.budget_percent,
            RetrySettings::default().budget_percent
        );
        assert_eq!(
            retry.min_per_second,
            RetrySettings::default().min_per_second
        );
        let limits = Limits::from(&config.policy);
        assert_eq!(limits.deadline, Limits::default().deadline);
        assert_eq!(limits.memory_bytes, Limits::default().memory_bytes);
        assert_eq!(limits.instances, Limits::default().instances);
        assert_eq!(
            limits.max_component_bytes,
            Limits::default().max_component_bytes
        );
    }
}
