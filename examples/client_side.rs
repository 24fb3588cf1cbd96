//! Client-side mode from the command line: `grpc.health.v1.Health/Check`
//! calls (service `""`) through a [`weir::client::Channel`] to an etcd
//! service, with no gateway between. Any gRPC server that implements the
//! standard health service will do (grpcio's included).
//!
//! cargo run --release --example client_side -- --etcd http://127.0.0.1:2379 \
//!     --prefix /services --service greeter --calls 1000 --concurrency 8 \
//!     [--policy least-conn | --policy build/policies/least-conn.wasm] [--idempotent]
//!
//! Its last line is JSON: `{"ok": n, "failed": n, "by_status": {...},
//! "p50_ms": x, "p99_ms": y}`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use weir::client::Channel;

#[derive(Parser)]
struct Args {
    /// etcd endpoints, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    #[arg(long, default_value = "/services")]
    prefix: String,
    /// The etcd service to call.
    #[arg(long)]
    service: String,
    #[arg(long, default_value_t = 100)]
    calls: usize,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// A policy name (native `round-robin`, or one published in etcd), or a
    /// WebAssembly component file (`*.wasm`).
    #[arg(long, default_value = "round-robin")]
    policy: String,
    /// The calls may be sent again after a backend was lost mid-call.
    #[arg(long)]
    idempotent: bool,
    /// Each call's deadline.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    deadline: Duration,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let builder = Channel::builder(args.etcd.clone(), &args.prefix, &args.service);
    let builder = if args.policy.ends_with(".wasm") {
        builder.policy_file(&args.policy)
    } else {
        builder.policy(&args.policy)
    };
    let channel = builder.idempotent(args.idempotent).connect().await?;
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let mut client = HealthClient::new(channel.clone());
        let (next, calls, deadline) = (next.clone(), args.calls, args.deadline);
        workers.push(tokio::spawn(async move {
            let mut took = Vec::new();
            let mut codes: BTreeMap<&'static str, usize> = BTreeMap::new();
            while next.fetch_add(1, Ordering::Relaxed) < calls {
                let mut request = tonic::Request::new(HealthCheckRequest {
                    service: String::new(),
                });
                request.set_timeout(deadline);
                let began = Instant::now();
                let code = match client.check(request).await {
                    Ok(_) => 0,
                    Err(status) => status.code() as u32,
                };
                took.push(began.elapsed());
                *codes.entry(weir::grpc_status_name(code)).or_default() += 1;
            }
            (took, codes)
        }));
    }
    let mut took = Vec::new();
    let mut by_status: BTreeMap<&'static str, usize> = BTreeMap::new();
    for worker in workers {
        let (t, codes) = worker.await?;
        took.extend(t);
        for (code, n) in codes {
            *by_status.entry(code).or_default() += n;
        }
    }
    took.sort();
    let percentile = |p: f64| {
        let at = ((took.len() as f64 * p).ceil() as usize).clamp(1, took.len().max(1)) - 1;
        took.get(at).map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    let ok = by_status.get("OK").copied().unwrap_or(0);
    let summary = serde_json::json!({
        "ok": ok,
        "failed": took.len() - ok,
        "by_status": by_status,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
    });
    println!("{summary}");
    Ok(())
}
