//! An example backend: the echo service (all four call kinds, `grpc.health.v1`),
//! registered in etcd through weir's library API while it runs.
//!
//! cargo run --example echo_server -- --name b1 --etcd http://127.0.0.1:2379 --weight 100 --meta zone=a
//!
//! SIGTERM/SIGINT deregisters (revokes the lease) and exits. SIGUSR1 toggles
//! a 50 ms delay on every call (a slow instance); SIGUSR2 toggles NOT_SERVING.

use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use weir::example::EchoBackend;
use weir::register::{Registration, RegistrationSpec};

#[derive(Parser)]
struct Args {
    /// The instance's name, returned in every reply.
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: std::net::SocketAddr,
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    etcd: Vec<String>,
    #[arg(long, default_value = "/services")]
    prefix: String,
    #[arg(long, default_value = "echo")]
    service: String,
    #[arg(long, default_value_t = 100)]
    weight: u32,
    #[arg(long, default_value_t = 5)]
    ttl: i64,
    /// Metadata, KEY=VALUE; repeat for more.
    #[arg(long = "meta")]
    meta: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let echo = EchoBackend::start_on(&args.name, args.listen).await?;
    let mut spec = RegistrationSpec::new(&args.prefix, &args.service, &echo.addr.to_string());
    spec.weight = args.weight;
    spec.ttl_secs = args.ttl;
    for kv in &args.meta {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--meta {kv:?} is not KEY=VALUE"))?;
        spec.metadata.insert(k.to_owned(), v.to_owned());
    }
    let client =
        weir::discovery::connect(&weir::discovery::EtcdAccess::new(args.etcd.clone())).await?;
    let mut registration = Registration::spawn(client, spec)?;
    registration.registered().await;
    println!("{} serving {} on {}", args.name, args.service, echo.addr);

    let (mut term, mut usr1, mut usr2) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::user_defined1())?,
        signal(SignalKind::user_defined2())?,
    );
    let (mut slow, mut serving) = (false, true);
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
            _ = usr1.recv() => {
                slow = !slow;
                echo.set_slow(if slow { Duration::from_millis(50) } else { Duration::ZERO });
                println!("{} is {}", args.name, if slow { "slow (50 ms per call)" } else { "fast again" });
            }
            _ = usr2.recv() => {
                serving = !serving;
                echo.set_serving(serving).await;
                println!("{} reports {}", args.name, if serving { "SERVING" } else { "NOT_SERVING" });
            }
        }
    }
    registration.deregister().await?;
    println!("{} deregistered", args.name);
    Ok(())
}
