//! The load client of `make bench-load`'s client-side runs: the same tonic
//! Echo client, closed loop, against one backend directly, a gateway, or a
//! client-side channel (`weir::client::Channel`) over etcd — so the three
//! are measured by one client and compare.
//!
//! cargo run --release --example load_client -- --direct 127.0.0.1:7001
//! cargo run --release --example load_client -- --gateway 127.0.0.1:50050
//! cargo run --release --example load_client -- --etcd http://127.0.0.1:2379 --service echo \
//!     [--policy round-robin|FILE.wasm]
//!
//! Calls for `--warmup` (not measured), then for `--seconds`; its last line
//! is JSON: calls and failures of the measured part, calls per second, p50
//! and p99 in ms, the client process's own CPU µs per call (from
//! /proc/self/stat), and the calls of the whole run (`all_calls`, to divide
//! a gateway's CPU over the same run).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use weir::example::pb::echo_client::EchoClient;
use weir::example::pb::EchoRequest;

#[derive(Parser)]
struct Args {
    /// One backend, called directly with tonic's channel.
    #[arg(long, conflicts_with_all = ["gateway", "etcd"])]
    direct: Option<String>,
    /// A gateway, called with tonic's channel.
    #[arg(long, conflicts_with = "etcd")]
    gateway: Option<String>,
    /// etcd endpoints (comma-separated): a client-side channel.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    #[arg(long, default_value = "/services")]
    prefix: String,
    #[arg(long, default_value = "echo")]
    service: String,
    /// The client-side channel's policy: a name, or a component file.
    #[arg(long, default_value = "round-robin")]
    policy: String,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    seconds: Duration,
}

/// CPU time of this process so far (all threads, dead ones included), from
/// /proc/self/stat's utime + stime in clock ticks (USER_HZ: 100 on Linux).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    // After the command name: state is field 3, utime 14 and stime 15.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i)?.parse::<u64>().ok())
        .sum();
    Duration::from_millis(ticks * 10)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let direct = args.direct.as_ref().or(args.gateway.as_ref());
    let measured = match direct {
        Some(addrs) if addrs.contains(',') => {
            // Several backends: tonic's own balancing over a fixed list.
            let endpoints = addrs
                .split(',')
                .map(|a| tonic::transport::Endpoint::from_shared(format!("http://{a}")))
                .collect::<Result<Vec<_>, _>>()?;
            let ch = tonic::transport::Channel::balance_list(endpoints.into_iter());
            run(&args, || EchoClient::new(ch.clone())).await
        }
        Some(addr) => {
            let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))?
                .connect()
                .await?;
            run(&args, || EchoClient::new(ch.clone())).await
        }
        None => {
            anyhow::ensure!(!args.etcd.is_empty(), "--direct, --gateway or --etcd");
            let builder =
                weir::client::Channel::builder(args.etcd.clone(), &args.prefix, &args.service);
            let builder = if args.policy.ends_with(".wasm") {
                builder.policy_file(&args.policy)
            } else {
                builder.policy(&args.policy)
            };
            let ch = builder.connect().await?;
            run(&args, || EchoClient::new(ch.clone())).await
        }
    };
    let Measured {
        mut took,
        failed,
        all_calls,
        cpu,
    } = measured;
    took.sort();
    let at = |p: f64| {
        let i = ((took.len() as f64 * p).ceil() as usize).clamp(1, took.len().max(1)) - 1;
        took.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    let calls = took.len() as u64;
    let summary = serde_json::json!({
        "calls": calls,
        "failed": failed,
        "calls_per_s": calls as f64 / args.seconds.as_secs_f64(),
        "p50_ms": at(0.50),
        "p99_ms": at(0.99),
        "cpu_us_per_call": cpu.as_secs_f64() * 1e6 / calls.max(1) as f64,
        "all_calls": all_calls,
    });
    println!("{summary}");
    Ok(())
}

struct Measured {
    took: Vec<Duration>,
    failed: u64,
    all_calls: u64,
    cpu: Duration,
}

/// `concurrency` callers, each a client made by `client`, closed loop:
/// `warmup`, then `seconds` measured.
async fn run<T>(args: &Args, client: impl Fn() -> EchoClient<T>) -> Measured
where
    T: tonic::client::GrpcService<tonic::body::Body> + Send + 'static,
    T::Future: Send,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as http_body::Body>::Error:
        Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let (all, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut callers = Vec::new();
    for _ in 0..args.concurrency.max(1) {
        let mut c = client();
        let (measuring, stop, all, failed) =
            (measuring.clone(), stop.clone(), all.clone(), failed.clone());
        callers.push(tokio::spawn(async move {
            let mut took = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let began = Instant::now();
                let ok = c
                    .unary(EchoRequest {
                        message: "hello".into(),
                        ..Default::default()
                    })
                    .await
                    .is_ok();
                all.fetch_add(1, Ordering::Relaxed);
                if measuring.load(Ordering::Relaxed) {
                    if ok {
                        took.push(began.elapsed());
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            took
        }));
    }
    tokio::time::sleep(args.warmup).await;
    let cpu_before = cpu_time();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(args.seconds).await;
    measuring.store(false, Ordering::Relaxed);
    let cpu = cpu_time().saturating_sub(cpu_before);
    stop.store(true, Ordering::Relaxed);
    let mut took = Vec::new();
    for caller in callers {
        took.extend(caller.await.unwrap_or_default());
    }
    Measured {
        took,
        failed: failed.load(Ordering::Relaxed),
        all_calls: all.load(Ordering::Relaxed),
        cpu,
    }
}
