//! An example client: drives unary calls through the gateway and prints how
//! they spread across the instances that answered.
//!
//! cargo run --example echo_client -- --target 127.0.0.1:50050 --calls 300 --concurrency 4

use std::collections::BTreeMap;
use std::time::Instant;

use clap::Parser;
use tonic::transport::Channel;
use weir::example::pb::echo_client::EchoClient;
use weir::example::pb::EchoRequest;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:50050")]
    target: String,
    #[arg(long, default_value_t = 300)]
    calls: usize,
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channel = Channel::from_shared(format!("http://{}", args.target))?
        .connect()
        .await?;
    let began = Instant::now();
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let mut client = EchoClient::new(channel.clone());
        let calls = args.calls / args.concurrency + usize::from(w < args.calls % args.concurrency);
        workers.push(tokio::spawn(async move {
            let mut seen: BTreeMap<String, usize> = BTreeMap::new();
            let mut failed: BTreeMap<String, usize> = BTreeMap::new();
            for i in 0..calls {
                let req = EchoRequest {
                    message: format!("call {i}"),
                    ..Default::default()
                };
                match client.unary(req).await {
                    Ok(r) => *seen.entry(r.into_inner().instance).or_default() += 1,
                    Err(s) => {
                        *failed
                            .entry(format!("{:?}: {}", s.code(), s.message()))
                            .or_default() += 1
                    }
                }
            }
            (seen, failed)
        }));
    }
    let (mut seen, mut failed) = (BTreeMap::new(), BTreeMap::new());
    for w in workers {
        let (s, f) = w.await?;
        for (k, v) in s {
            *seen.entry(k).or_insert(0) += v;
        }
        for (k, v) in f {
            *failed.entry(k).or_insert(0) += v;
        }
    }
    let ok: usize = seen.values().sum();
    let nfailed: usize = failed.values().sum();
    println!(
        "{} calls in {:.0} ms: {ok} ok, {nfailed} failed",
        args.calls,
        began.elapsed().as_secs_f64() * 1e3
    );
    for (instance, n) in &seen {
        let share = *n as f64 * 100.0 / ok.max(1) as f64;
        println!(
            "  {instance:<6} {n:>6} calls  {share:>5.1}%  {}",
            "#".repeat((share / 2.0).round() as usize)
        );
    }
    for (why, n) in &failed {
        println!("  failed {n}: {why}");
    }
    Ok(())
}
