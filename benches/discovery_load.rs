//! Discovery at fleet scale against a real etcd: 10,000 instances across 1,000
//! services. Prints the time to the first complete set, resident memory, and
//! how long one change takes from `put` to the table. `make bench-discovery`.
//!
//! Under `cargo test` (no `--bench` flag) it runs a small fleet once, so the
//! benchmark cannot rot.

use std::time::{Duration, Instant};

use etcd_client::{Txn, TxnOp};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use weir::discovery::{self, EtcdConfig};
use weir::metrics::DiscoveryMetrics;
use weir::testkit::Etcd;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (services, per_service, changes) = if full { (1_000, 10, 200) } else { (20, 5, 10) };
    let instances = services * per_service;
    let etcd = Etcd::start();
    let mut client = discovery::connect(&discovery::EtcdAccess::new(etcd.endpoints()))
        .await
        .unwrap();

    let ops: Vec<TxnOp> = (0..instances)
        .map(|n| {
            let (s, i) = (n / per_service, n % per_service);
            TxnOp::put(
                format!("/services/svc-{s}/10.{}.{}.{}:50051", s / 256, s % 256, i),
                format!(r#"{{"weight":100,"metadata":{{"zone":"z{}"}}}}"#, i % 3),
                None,
            )
        })
        .collect();
    for chunk in ops.chunks(100) {
        client
            .txn(Txn::new().and_then(chunk.to_vec()))
            .await
            .unwrap();
    }

    let rss_before = rss_kib();
    let tasks = TaskTracker::new();
    let cancel = CancellationToken::new();
    let began = Instant::now();
    let config = EtcdConfig::new(etcd.endpoints(), "/services");
    let table = discovery::start(&config, DiscoveryMetrics::default(), &tasks, cancel.clone())
        .await
        .unwrap();
    let mut updates = table.subscribe();
    while !table.is_ready() {
        updates.changed().await.unwrap();
    }
    let first_set = began.elapsed();
    let total: usize = table.services().values().map(|s| s.len()).sum();
    assert_eq!(total, instances, "every instance listed");
    let rss_after = rss_kib();

    let mut latencies = Vec::with_capacity(changes);
    for n in 0..changes {
        let key = format!("/services/svc-{}/10.9.9.9:{}", n % services, 1000 + n);
        let service = format!("svc-{}", n % services);
        let sent = Instant::now();
        client.put(key.clone(), "", None).await.unwrap();
        loop {
            if table.get(&service).is_some_and(|s| s.get(&key).is_some()) {
                break;
            }
            updates.changed().await.unwrap();
        }
        latencies.push(sent.elapsed());
    }
    cancel.cancel();
    tasks.close();
    tasks.wait().await;

    println!("discovery at scale: {instances} instances across {services} services (real etcd 3.4, loopback)");
    println!(
        "  time to the first complete set: {:.1} ms",
        first_set.as_secs_f64() * 1e3
    );
    println!(
        "  resident memory: {:.1} MiB after the listing ({:+.1} MiB for discovery)",
        rss_after as f64 / 1024.0,
        (rss_after as f64 - rss_before as f64) / 1024.0
    );
    println!(
        "  one change, put to visible in the table: median {:.2} ms over {changes} puts",
        median(&mut latencies).as_secs_f64() * 1e3
    );
}
