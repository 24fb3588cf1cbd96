//! The `weir` command: parses the command line and hands over to the library.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use weir::discovery::EtcdConfig;

// The data path allocates small, short-lived objects on two threads at a high
// rate (h2 frames, header maps, tasks); mimalloc serves that with less CPU than
// glibc's malloc (see the README's load figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use weir::register::{KeyFormat, RegistrationSpec};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "A gRPC edge gateway with etcd discovery and WebAssembly policies"
)]
struct Cli {
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `weir=debug`.
    #[arg(long, global = true, env = "WEIR_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// The configuration file (TOML); see the README for every key.
        #[arg(long, default_value = "weir.toml")]
        config: std::path::PathBuf,
    },
    /// Keep one instance registered in etcd until SIGTERM/SIGINT, then revoke its lease.
    Register {
        #[command(flatten)]
        etcd: EtcdFlags,
        #[arg(long, default_value = "/services")]
        prefix: String,
        #[arg(long)]
        service: String,
        /// The instance's address, host:port.
        #[arg(long)]
        addr: String,
        /// Lease TTL in seconds.
        #[arg(long, default_value_t = 10)]
        ttl: i64,
        #[arg(long, default_value_t = 100)]
        weight: u32,
        /// Metadata, KEY=VALUE; repeat for more.
        #[arg(long = "meta", value_parser = parse_meta)]
        meta: Vec<(String, String)>,
        #[arg(long, value_enum, default_value_t = KeyFormat::Weir)]
        format: KeyFormat,
    },
    /// Work with WebAssembly policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Work with configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the endpoint sets under a prefix; with --watch, follow them.
    Discover {
        #[command(flatten)]
        etcd: EtcdFlags,
        #[arg(long, default_value = "/services")]
        prefix: String,
        /// One JSON object mapping each service to its endpoints.
        #[arg(long)]
        json: bool,
        /// Keep printing changes until interrupted.
        #[arg(long)]
        watch: bool,
        /// Seconds to wait for the first listing.
        #[arg(long, default_value_t = 10)]
        wait: u64,
    },
}

/// How a command reaches etcd: the flags match the `[etcd]` config keys.
#[derive(clap::Args)]
struct EtcdFlags {
    /// etcd endpoint(s), comma-separated or repeated (https:// with --ca).
    #[arg(long, required = true, value_delimiter = ',')]
    etcd: Vec<String>,
    /// CA certificate(s) (PEM) the etcd members' certificates chain to.
    #[arg(long)]
    ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for etcd's --client-cert-auth.
    #[arg(long, requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// etcd user; the password comes from --password-file or $WEIR_ETCD_PASSWORD.
    #[arg(long)]
    username: Option<String>,
    #[arg(long)]
    password_file: Option<std::path::PathBuf>,
}

impl EtcdFlags {
    fn access(self) -> weir::discovery::EtcdAccess {
        weir::discovery::EtcdAccess {
            endpoints: self.etcd,
            ca: self.ca,
            cert: self.cert,
            key: self.key,
            username: self.username,
            password_file: self.password_file,
        }
    }
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Check FILE as `weir serve` reads it (syntax, keys, values, routes),
    /// without starting anything; exits non-zero naming the key at fault.
    Check { file: std::path::PathBuf },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy and show how it spreads synthetic picks.
    Check {
        /// The policy component (.wasm).
        file: std::path::PathBuf,
        /// Synthetic endpoints to pick among.
        #[arg(long, default_value_t = 5)]
        backends: usize,
        #[arg(long, default_value_t = 3000)]
        picks: usize,
        /// Metadata for one synthetic endpoint, N:KEY=VALUE (N counts from
        /// 1, as listed); repeat for more.
        #[arg(long = "meta", value_parser = parse_endpoint_meta)]
        meta: Vec<(usize, String, String)>,
        /// Linear memory one instance may use, as the gateway's
        /// `[policy] memory_mib` (a Python policy needs 32).
        #[arg(long, default_value_t = 8)]
        memory_mib: usize,
        /// How long one pick may run, as the gateway's `[policy] deadline`.
        #[arg(long, default_value = "1ms", value_parser = humantime::parse_duration)]
        deadline: std::time::Duration,
    },
    /// Make a signing key: writes the secret key to --out (mode 0600) and
    /// prints the public key for `[policy] trusted_keys` as the last line.
    Keygen {
        #[arg(long, default_value = "weir-policy.key")]
        out: std::path::PathBuf,
    },
    /// Sign a policy component: writes FILE.sig beside it (install FILE.sig
    /// with FILE in the policy directory, or put it in etcd as NAME.sig).
    Sign {
        /// The policy component (.wasm).
        file: std::path::PathBuf,
        /// The secret key file `weir policy keygen` wrote.
        #[arg(long)]
        key: std::path::PathBuf,
    },
    /// Store FILE in etcd as a version of NAME (chunked, content-addressed;
    /// FILE.sig goes with it). Runs nowhere until a rollout names it; the
    /// version's digest is the last line printed.
    Publish {
        name: String,
        file: std::path::PathBuf,
        #[command(flatten)]
        fleet: FleetFlags,
    },
    /// List NAME's published versions.
    History {
        name: String,
        #[command(flatten)]
        fleet: FleetFlags,
    },
    /// Delete a version of NAME (not while its rollout uses it).
    Delete {
        name: String,
        /// The version's digest (or its first 8+ characters).
        version: String,
        #[command(flatten)]
        fleet: FleetFlags,
    },
    /// Run VERSION of NAME on every gateway: at once (no flag), in shadow
    /// (it picks beside the current version; calls go by the current) or
    /// as a canary on PCT % of calls.
    Rollout {
        name: String,
        /// The version's digest (or its first 8+ characters).
        version: String,
        #[arg(long, conflicts_with = "canary")]
        shadow: bool,
        #[arg(long, value_name = "PCT")]
        canary: Option<f64>,
        /// Promote the candidate once it has stayed within its guards this
        /// long (e.g. 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        auto_promote_after: Option<Duration>,
        #[command(flatten)]
        fleet: FleetFlags,
    },
    /// Make NAME's candidate its current version on every gateway.
    Promote {
        name: String,
        #[command(flatten)]
        fleet: FleetFlags,
    },
    /// Drop NAME's candidate on every gateway.
    Rollback {
        name: String,
        #[command(flatten)]
        fleet: FleetFlags,
    },
    /// NAME's rollout across the fleet: the state and every gateway's figures.
    Status {
        name: String,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        fleet: FleetFlags,
    },
}

/// Where a fleet's policies live: etcd and the prefix.
#[derive(clap::Args)]
struct FleetFlags {
    #[command(flatten)]
    etcd: EtcdFlags,
    #[arg(long, default_value = "/services")]
    prefix: String,
}

fn parse_endpoint_meta(s: &str) -> Result<(usize, String, String), String> {
    let (n, kv) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not N:KEY=VALUE"))?;
    let n: usize = n
        .parse()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| format!("{n:?} is not an endpoint number (1, 2, ...)"))?;
    let (k, v) = parse_meta(kv)?;
    Ok((n - 1, k, v))
}

fn parse_meta(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))?;
    if k.is_empty() {
        return Err(format!("{s:?} has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // `weir serve` installs its subscriber once its configuration says
    // whether calls are traced.
    if !matches!(cli.command, Command::Serve { .. }) {
        weir::telemetry::init_logs(&cli.log, None)?;
    }
    // `weir serve` runs its own layout: one single-threaded runtime per data
    // thread (server::Gateway starts the others); this one, on the main
    // thread, also runs discovery, health checks and the admin listener.
    let mut runtime = match &cli.command {
        Command::Serve { .. } => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    runtime.enable_all();
    let runtime = runtime.build().context("starting the tokio runtime")?;
    runtime.block_on(run(cli.command, &cli.log))
}

async fn run(command: Command, log: &str) -> anyhow::Result<()> {
    match command {
        Command::Serve { config } => weir::commands::serve::run(&config, log).await,
        Command::Policy { command } => policy_command(command).await,
        Command::Config {
            command: ConfigCommand::Check { file },
        } => {
            let config = weir::config::Config::load(&file)?;
            println!(
                "{}: valid ({} route(s), etcd prefix {})",
                file.display(),
                config.routes.len(),
                config.etcd.prefix
            );
            Ok(())
        }
        Command::Register {
            etcd,
            prefix,
            service,
            addr,
            ttl,
            weight,
            meta,
            format,
        } => {
            let mut spec = RegistrationSpec::new(&prefix, &service, &addr);
            spec.ttl_secs = ttl;
            spec.weight = weight;
            spec.metadata = meta.into_iter().collect::<BTreeMap<_, _>>();
            spec.format = format;
            weir::commands::register::run(&etcd.access(), spec).await
        }
        Command::Discover {
            etcd,
            prefix,
            json,
            watch,
            wait,
        } => {
            let access = etcd.access();
            let mut config = EtcdConfig::new(access.endpoints.clone(), prefix);
            config.access = access;
            weir::commands::discover::run(weir::commands::discover::DiscoverArgs {
                config,
                json,
                watch,
                wait: Duration::from_secs(wait),
            })
            .await
        }
    }
}

async fn policy_command(command: PolicyCommand) -> anyhow::Result<()> {
    use weir::commands::fleet;
    match command {
        PolicyCommand::Check {
            file,
            backends,
            picks,
            meta,
            memory_mib,
            deadline,
        } => {
            if deadline.is_zero() || deadline > std::time::Duration::from_secs(10) {
                anyhow::bail!("--deadline must be above zero and at most 10s: {deadline:?}");
            }
            let limits = weir::policy::Limits {
                memory_bytes: memory_mib.clamp(1, 4096) << 20,
                deadline,
                ..Default::default()
            };
            tokio::task::spawn_blocking(move || {
                weir::commands::policy::check(&file, backends, picks, &meta, limits)
            })
            .await?
        }
        PolicyCommand::Keygen { out } => weir::commands::policy::keygen(&out),
        PolicyCommand::Sign { file, key } => weir::commands::policy::sign(&file, &key),
        PolicyCommand::Publish { name, file, fleet } => {
            fleet::publish(&fleet.etcd.access(), &fleet.prefix, &name, &file).await
        }
        PolicyCommand::History { name, fleet } => {
            fleet::history(&fleet.etcd.access(), &fleet.prefix, &name).await
        }
        PolicyCommand::Delete {
            name,
            version,
            fleet,
        } => fleet::delete(&fleet.etcd.access(), &fleet.prefix, &name, &version).await,
        PolicyCommand::Rollout {
            name,
            version,
            shadow,
            canary,
            auto_promote_after,
            fleet,
        } => {
            let placement = match (shadow, canary) {
                (true, _) => fleet::Placement::Shadow,
                (false, Some(pct)) => fleet::Placement::Canary(pct),
                (false, None) => fleet::Placement::Current,
            };
            fleet::rollout(
                &fleet.etcd.access(),
                &fleet.prefix,
                &name,
                &version,
                placement,
                auto_promote_after,
            )
            .await
        }
        PolicyCommand::Promote { name, fleet } => {
            let access = fleet.etcd.access();
            fleet::end_trial(&access, &fleet.prefix, &name, fleet::Ending::Promote).await
        }
        PolicyCommand::Rollback { name, fleet } => {
            let access = fleet.etcd.access();
            fleet::end_trial(&access, &fleet.prefix, &name, fleet::Ending::Rollback).await
        }
        PolicyCommand::Status { name, json, fleet } => {
            fleet::status(&fleet.etcd.access(), &fleet.prefix, &name, json).await
        }
    }
}
