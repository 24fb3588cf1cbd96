//! `weir discover`: print the endpoint sets under a prefix, optionally following them.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::discovery::{self, EndpointSet, EtcdConfig};
use crate::metrics::DiscoveryMetrics;

pub struct DiscoverArgs {
    pub config: EtcdConfig,
    pub json: bool,
    pub watch: bool,
    /// How long to wait for the first listing.
    pub wait: Duration,
}

pub async fn run(args: DiscoverArgs) -> anyhow::Result<()> {
    // Once, to say at once what is wrong with the settings or credentials
    // (the table's own connection retries quietly in the background).
    discovery::connect(&args.config.access).await?;
    let tasks = TaskTracker::new();
    let cancel = CancellationToken::new();
    let table = discovery::start(
        &args.config,
        DiscoveryMetrics::default(),
        &tasks,
        cancel.clone(),
    )
    .await?;
    let mut changes = table.subscribe();
    tokio::time::timeout(args.wait, async {
        while !table.is_ready() {
            if changes.changed().await.is_err() {
                break;
            }
        }
    })
    .await
    .with_context(|| {
        format!(
            "no listing from etcd at {:?} within {:?} (the log says why)",
            args.config.access.endpoints, args.wait
        )
    })?;
    // Give the lease poller a moment so the first listing shows TTLs.
    let polled = tokio::time::Instant::now() + Duration::from_secs(2);
    while table.leases().unpolled() > 0 && tokio::time::Instant::now() < polled {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut shown = table.services();
    print_all(&shown, args.json)?;
    if args.watch {
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { break },
                _ = tokio::signal::ctrl_c() => break,
            }
            let now = table.services();
            if args.json {
                print_all(&now, true)?;
            } else {
                print_diff(&shown, &now)?;
            }
            shown = now;
        }
    }
    cancel.cancel();
    tasks.close();
    Ok(())
}

type Services = BTreeMap<Arc<str>, Arc<EndpointSet>>;

fn print_all(services: &Services, json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let map: serde_json::Map<String, serde_json::Value> = services
            .iter()
            .filter(|(_, set)| !set.is_empty())
            .map(|(name, set)| {
                let eps = set.endpoints.iter().map(|e| e.to_json()).collect();
                (name.to_string(), serde_json::Value::Array(eps))
            })
            .collect();
        writeln!(out, "{}", serde_json::Value::Object(map))?;
    } else {
        writeln!(
            out,
            "{:<24} {:<22} {:>6} {:<9} {:>17} {:>8}  METADATA",
            "SERVICE", "ADDRESS", "WEIGHT", "STATUS", "LEASE", "TTL"
        )?;
        for (name, set) in services {
            for e in &set.endpoints {
                writeln!(out, "{}", line(name, e))?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

fn line(service: &str, e: &discovery::Endpoint) -> String {
    let lease = e.lease_id().map_or("-".to_owned(), |l| format!("{l:x}"));
    let ttl = match e.lease.as_ref().map(|l| l.remaining_ms()) {
        None => "-".to_owned(),
        Some(None) => "?".to_owned(),
        Some(Some(ms)) => format!("{:.1}s", ms as f64 / 1000.0),
    };
    let meta: Vec<String> = e.metadata.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!(
        "{:<24} {:<22} {:>6} {:<9} {:>17} {:>8}  {}",
        service,
        &*e.addr,
        e.weight,
        e.health.as_str(),
        lease,
        ttl,
        meta.join(",")
    )
}

fn print_diff(before: &Services, after: &Services) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    let stamp = time_of_day();
    let empty: Vec<Arc<discovery::Endpoint>> = Vec::new();
    let names: std::collections::BTreeSet<&Arc<str>> = before.keys().chain(after.keys()).collect();
    for name in names {
        let old = before.get(name).map_or(&empty, |s| &s.endpoints);
        let new = after.get(name).map_or(&empty, |s| &s.endpoints);
        if let (Some(a), Some(b)) = (before.get(name), after.get(name)) {
            if Arc::ptr_eq(a, b) {
                continue;
            }
        }
        let old_by_key: BTreeMap<&str, &Arc<discovery::Endpoint>> =
            old.iter().map(|e| (&*e.key, e)).collect();
        let new_by_key: BTreeMap<&str, &Arc<discovery::Endpoint>> =
            new.iter().map(|e| (&*e.key, e)).collect();
        for (key, e) in &new_by_key {
            match old_by_key.get(key) {
                None => writeln!(out, "{stamp} + {}", line(name, e))?,
                Some(o) if !Arc::ptr_eq(o, e) => writeln!(out, "{stamp} ~ {}", line(name, e))?,
                Some(_) => {}
            }
        }
        for (key, e) in &old_by_key {
            if !new_by_key.contains_key(key) {
                writeln!(out, "{stamp} - {}", line(name, e))?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// UTC time of day, `HH:MM:SS.mmm`: enough to follow a live change log.
fn time_of_day() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        now.subsec_millis()
    )
}
