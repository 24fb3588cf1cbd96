//! `make demo`: weir's story in a few minutes, narrated, with a live table.
//!
//! Starts a private etcd, three echo servers that register themselves with
//! different weights and zones, and `weir serve` with a policy directory.
//! Then it drives calls through the gateway while it swaps policies by file
//! and through etcd, slows a backend, kills one without deregistering, and
//! drops in a broken policy file. It ends by itself, stops everything it
//! started, and prints a summary; it exits non-zero if a call failed or a
//! step did not show what it should. `DEMO_FAST=1` runs the same story in
//! well under a minute (the test suite runs it so).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use tokio::process::{Child, Command};
use weir::example::pb::echo_client::EchoClient;
use weir::example::pb::EchoRequest;
use weir::testkit::{free_port, http_get, Etcd};

const PREFIX: &str = "/services";
const GATEWAY_ZONE: &str = "eu-1";
/// Calls in flight at once, each taking this long on a healthy backend.
const WORKERS: usize = 6;
const CALL_MS: u32 = 5;

struct Spec {
    name: &'static str,
    weight: u32,
    zone: &'static str,
}

const BACKENDS: [Spec; 3] = [
    Spec {
        name: "alpha",
        weight: 100,
        zone: "eu-1",
    },
    Spec {
        name: "beta",
        weight: 200,
        zone: "eu-1",
    },
    Spec {
        name: "gamma",
        weight: 300,
        zone: "eu-2",
    },
];

/// How long things take: the normal pace, or DEMO_FAST's.
struct Pace {
    step: Duration,
    tick: Duration,
    lease_ttl: u32,
}

/// Calls made by the driver, counted by the instance that answered.
#[derive(Default)]
struct Traffic {
    answered: [AtomicU64; 3],
    failed: AtomicU64,
    errors: Mutex<Vec<String>>,
    slowest_us: AtomicU64,
    stop: AtomicBool,
}

impl Traffic {
    fn counts(&self) -> [u64; 3] {
        [0, 1, 2].map(|i| self.answered[i].load(Ordering::Relaxed))
    }
    fn total(&self) -> u64 {
        self.counts().iter().sum::<u64>() + self.failed.load(Ordering::Relaxed)
    }
}

struct Backend {
    spec: &'static Spec,
    addr: SocketAddr,
    child: Option<Child>,
}

struct Demo {
    pace: Pace,
    work: tempfile::TempDir,
    etcd: Etcd,
    backends: Vec<Backend>,
    gateway: Child,
    grpc: SocketAddr,
    admin: SocketAddr,
    policy_dir: PathBuf,
    builtins: PathBuf,
    /// The `weir` binary (also the `weir policy` verbs).
    weir: PathBuf,
    traffic: Arc<Traffic>,
    table: Table,
    swaps: Vec<(String, Duration)>,
    /// Policy versions the gateway refused, from its own counter.
    rejected: u64,
    checks: Vec<(String, bool)>,
}

#[tokio::main]
async fn main() {
    let outcome = run().await;
    if let Err(err) = &outcome {
        eprintln!("\ndemo failed: {err:#}");
    }
    std::process::exit(if matches!(outcome, Ok(true)) { 0 } else { 1 });
}

/// Ok(true) when every call succeeded and every step showed what it should.
async fn run() -> Result<bool> {
    let fast = std::env::var("DEMO_FAST").is_ok_and(|v| v == "1");
    let pace = if fast {
        Pace {
            step: Duration::from_secs(3),
            tick: Duration::from_millis(250),
            lease_ttl: 2,
        }
    } else {
        Pace {
            step: Duration::from_secs(8),
            tick: Duration::from_millis(500),
            lease_ttl: 5,
        }
    };
    let began = Instant::now();
    let mut demo = Demo::start(pace).await?;
    let workers = demo.drive().await?;
    let story = demo.story().await;
    demo.traffic.stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let ok = match story {
        Ok(()) => demo.summary(began.elapsed()),
        Err(err) => {
            eprintln!("\na step could not run: {err:#}");
            false
        }
    };
    demo.stop(!ok).await;
    Ok(ok)
}

fn heading(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

fn say(text: &str) {
    println!("   {text}");
}

impl Demo {
    async fn start(pace: Pace) -> Result<Demo> {
        let exe = std::env::current_exe()?;
        let examples = exe.parent().context("the demo's own directory")?.to_owned();
        let weir = env_path("WEIR", examples.parent().unwrap_or(&examples).join("weir"));
        let server = env_path("SERVER", examples.join("echo_server"));
        let builtins = env_path(
            "POLICIES",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("build/policies"),
        );
        for (what, path) in [("weir", &weir), ("echo_server", &server)] {
            if !path.exists() {
                bail!("{what} is not built at {}: run `make demo`", path.display());
            }
        }
        if !builtins.join("round-robin.wasm").exists() {
            bail!(
                "no policies in {}: run `make demo` (it runs `make policies`)",
                builtins.display()
            );
        }
        let work = tempfile::Builder::new().prefix("weir-demo-").tempdir()?;

        heading("weir demo: a private etcd, three backends, the gateway");
        let etcd = tokio::task::spawn_blocking(Etcd::start).await?;
        let etcd_url = etcd.endpoints()[0].clone();
        say(&format!("etcd {etcd_url} (data in a temp dir)"));

        let mut backends = Vec::new();
        for spec in &BACKENDS {
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let child = Command::new(&server)
                .args([
                    "--name",
                    spec.name,
                    "--listen",
                    &addr.to_string(),
                    "--etcd",
                    &etcd_url,
                ])
                .args([
                    "--weight",
                    &spec.weight.to_string(),
                    "--meta",
                    &format!("zone={}", spec.zone),
                ])
                .args(["--ttl", &pace.lease_ttl.to_string()])
                .spawn_logged(&work.path().join(format!("{}.log", spec.name)))?;
            say(&format!(
                "{:<6} {addr}  weight {:>3}  zone {}  (registers itself with a {} s lease)",
                spec.name, spec.weight, spec.zone, pace.lease_ttl
            ));
            backends.push(Backend {
                spec,
                addr,
                child: Some(child),
            });
        }

        let policy_dir = work.path().join("policies");
        std::fs::create_dir(&policy_dir)?;
        std::fs::copy(
            builtins.join("round-robin.wasm"),
            policy_dir.join("demo.wasm"),
        )?;
        let grpc: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let admin: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let config = format!(
            r#"listen = "{grpc}"
admin = "{admin}"
zone = "{GATEWAY_ZONE}"
[etcd]
endpoints = ["{etcd_url}"]
prefix = "{PREFIX}"
[health_check]
interval = "500ms"
[policy]
dir = "{}"
[policy.rollout]
report_every = "500ms"
[[route]]
match = "/weir.example.v1.Echo/"
service = "echo"
policy = "demo"
idempotent = true
"#,
            policy_dir.display()
        );
        let config_path = work.path().join("weir.toml");
        std::fs::write(&config_path, &config)?;
        let gateway = Command::new(&weir)
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .env("WEIR_LOG", "info")
            .spawn_logged(&work.path().join("gateway.log"))?;
        say(&format!(
            "weir serve: gRPC {grpc}, admin http://{admin}, zone {GATEWAY_ZONE}; route /weir.example.v1.Echo/ -> service echo, policy \"demo\" (idempotent)"
        ));
        say(&format!(
            "policy \"demo\" is the file {}/demo.wasm (a copy of round-robin), watched",
            policy_dir.display()
        ));
        let tty = std::io::stdout().is_terminal();
        let demo = Demo {
            pace,
            work,
            etcd,
            backends,
            gateway,
            grpc,
            admin,
            policy_dir,
            builtins,
            weir,
            traffic: Arc::default(),
            table: Table::new(tty),
            swaps: Vec::new(),
            rejected: 0,
            checks: Vec::new(),
        };
        demo.wait_for(
            "the gateway to list three endpoints",
            Duration::from_secs(30),
            |s| endpoints(s).len() == 3,
        )
        .await?;
        Ok(demo)
    }

    /// Workers that keep WORKERS calls in flight until told to stop.
    async fn drive(&self) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.grpc))?
            .connect()
            .await
            .context("connecting to the gateway")?;
        let names: Vec<&str> = BACKENDS.iter().map(|b| b.name).collect();
        Ok((0..WORKERS)
            .map(|_| {
                let mut client = EchoClient::new(channel.clone());
                let traffic = self.traffic.clone();
                let names = names.clone();
                tokio::spawn(async move {
                    while !traffic.stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let call = EchoRequest {
                            message: "demo".into(),
                            delay_ms: CALL_MS,
                            ..Default::default()
                        };
                        match client.unary(call).await {
                            Ok(reply) => {
                                let who = reply.into_inner().instance;
                                if let Some(i) = names.iter().position(|n| *n == who) {
                                    traffic.answered[i].fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(status) => {
                                traffic.failed.fetch_add(1, Ordering::Relaxed);
                                let mut errors = traffic.errors.lock().expect("errors");
                                if errors.len() < 5 {
                                    errors.push(format!(
                                        "{:?}: {}",
                                        status.code(),
                                        status.message()
                                    ));
                                }
                            }
                        }
                        let us = sent.elapsed().as_micros() as u64;
                        traffic.slowest_us.fetch_max(us, Ordering::Relaxed);
                    }
                })
            })
            .collect())
    }

    async fn story(&mut self) -> Result<()> {
        heading("1. round-robin spreads the calls evenly");
        say(&format!("{WORKERS} clients keep a call in flight each; a call takes {CALL_MS} ms on a healthy backend"));
        let shares = self.run_step().await?;
        let even = shares.iter().all(|s| (0.28..=0.39).contains(s));
        self.check(
            format!("round-robin: shares {} (even: 33.3% each)", pct(&shares)),
            even,
        );

        heading("2. hot swap to `weighted`, by writing the policy file");
        let took = self.swap_file("weighted").await?;
        say(&format!(
            "cp weighted.wasm demo.wasm.tmp && mv demo.wasm.tmp demo.wasm: in effect after {}",
            ms(took)
        ));
        let shares = self.run_step().await?;
        let want = [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0];
        let close = shares.iter().zip(want).all(|(s, w)| (s - w).abs() < 0.06);
        self.check(
            format!(
                "weighted: shares {} (weights 100:200:300 → 16.7% 33.3% 50.0%)",
                pct(&shares)
            ),
            close,
        );

        heading("3. gamma turns slow (50 ms a call); swap to `least-conn`");
        self.signal("gamma", "-USR1")?;
        let took = self.swap_file("least-conn").await?;
        say(&format!("least-conn in effect after {}: it sends calls where fewest are in flight per unit of weight", ms(took)));
        let shares = self.run_step().await?;
        self.check(
            format!(
                "least-conn: slow gamma gets {:.1}% of calls (weighted gave it 50%)",
                shares[2] * 100.0
            ),
            shares[2] < 0.2,
        );
        self.signal("gamma", "-USR1")?;
        say("gamma is fast again");

        heading("4. a policy published through etcd: `zone-aware` for the whole fleet");
        let took = self.publish_through_etcd("zone-aware").await?;
        say(&format!(
            "etcdctl put {PREFIX}/_policies/demo < zone-aware.wasm: in effect after {} (every gateway watching {PREFIX} swaps together)",
            ms(took)
        ));
        say(&format!(
            "this gateway's zone is {GATEWAY_ZONE}: alpha and beta are local, gamma is not"
        ));
        let shares = self.run_step().await?;
        let local = shares[0] + shares[1];
        self.check(
            format!(
                "zone-aware: {:.1}% of calls stay in {GATEWAY_ZONE}",
                local * 100.0
            ),
            local > 0.95,
        );

        heading("5. beta is killed (SIGKILL): no deregistration, its lease still runs");
        self.traffic.slowest_us.store(0, Ordering::Relaxed);
        let failed_before = self.traffic.failed.load(Ordering::Relaxed);
        let retries = "weir_retries_total{service=\"echo\"}";
        let retried_before = self.counter(retries).await.unwrap_or(0);
        let beta_addr = self.backends[1].addr.to_string();
        let killed_at = Instant::now();
        if let Some(mut child) = self.backends[1].child.take() {
            child.kill().await?;
        }
        let shares = self.run_step().await?;
        let slowest = Duration::from_micros(self.traffic.slowest_us.load(Ordering::Relaxed));
        let failed = self.traffic.failed.load(Ordering::Relaxed) - failed_before;
        let retried = self
            .counter(retries)
            .await
            .unwrap_or(0)
            .saturating_sub(retried_before);
        say(&format!(
            "{retried} calls lost with beta were sent again to another backend (the route is idempotent); slowest call of this step {}",
            ms(slowest)
        ));
        self.check(
            format!(
                "after the kill: beta {:.1}% of calls, {failed} failed",
                shares[1] * 100.0
            ),
            shares[1] == 0.0 && failed == 0,
        );
        let lease = Duration::from_secs(u64::from(self.pace.lease_ttl) + 10);
        let gone = self
            .wait_for("beta's lease to end", lease, |s| {
                !endpoints(s).contains(&beta_addr)
            })
            .await;
        let gone_after = killed_at.elapsed();
        self.check(
            format!(
                "beta's endpoint left the set {:.1} s after the kill (lease {} s)",
                gone_after.as_secs_f64(),
                self.pace.lease_ttl
            ),
            gone.is_ok(),
        );

        heading("6. a broken policy file is dropped in");
        let serving = self.policy_digest().await?;
        write_atomically(
            &self.policy_dir.join("demo.wasm"),
            b"this is not a WebAssembly component",
        )?;
        say("echo 'this is not a WebAssembly component' > demo.wasm");
        let reason = self.wait_for_policy_error().await?;
        say(&format!("the gateway says: {reason}"));
        self.rejected = self
            .counter("weir_policy_reloads_total{policy=\"demo\",result=\"failed\"}")
            .await?;
        let shares = self.run_step().await?;
        let still = self.policy_digest().await? == serving;
        self.check(
            format!(
                "the previous version (zone-aware, {serving}) keeps serving: shares {}",
                pct(&shares)
            ),
            still && shares[0] > 0.95,
        );

        heading("7. a canary across the fleet: `weighted` on 20% of calls, then promoted");
        let zone_aware = self.builtins.join("zone-aware.wasm");
        let current = self
            .weir_policy(&["publish", "demo", &zone_aware.display().to_string()])
            .await?;
        self.weir_policy(&["rollout", "demo", &current]).await?;
        let weighted = self.builtins.join("weighted.wasm");
        let candidate = self
            .weir_policy(&["publish", "demo", &weighted.display().to_string()])
            .await?;
        self.weir_policy(&["rollout", "demo", &candidate, "--canary", "20"])
            .await?;
        say(&format!(
            "weir policy publish demo weighted.wasm; weir policy rollout demo {} --canary 20 (zone-aware, published too, is the current)",
            &candidate[..12]
        ));
        self.run_step().await?;
        let status: Value = serde_json::from_str(
            &self
                .weir_policy_output(&["status", "demo", "--json"])
                .await?,
        )?;
        let g = &status["gateways"][0];
        let (cur, cand) = (
            g["calls"].as_u64().unwrap_or(0),
            g["candidate_calls"].as_u64().unwrap_or(0),
        );
        let share = cand as f64 * 100.0 / (cur + cand).max(1) as f64;
        let p99 = |v: &Value| v.as_f64().map_or("-".into(), |m| format!("{m:.0} ms"));
        say(&format!(
            "weir policy status demo: current {cur} calls (p99 {}, errors {}), candidate {cand} calls (p99 {}, errors {})",
            p99(&g["p99_ms"]),
            g["error_rate"],
            p99(&g["candidate_p99_ms"]),
            g["candidate_error_rate"],
        ));
        self.check(
            format!("canary: the candidate placed {share:.1}% of calls (asked: 20%)"),
            (12.0..=28.0).contains(&share),
        );
        let promoted = Instant::now();
        self.weir_policy(&["promote", "demo"]).await?;
        let bytes = std::fs::read(&weighted)?;
        let took = self.until_serving(&bytes, promoted).await?;
        self.swaps.push(("weighted (promoted)".into(), took));
        self.check(
            format!(
                "weir policy promote demo: weighted serves every call after {}",
                ms(took)
            ),
            took < Duration::from_secs(5),
        );
        Ok(())
    }

    /// `weir policy ARGS` against the demo's etcd; the last line it printed.
    async fn weir_policy(&self, args: &[&str]) -> Result<String> {
        let out = self.weir_policy_output(args).await?;
        Ok(out.lines().last().unwrap_or("").trim().to_owned())
    }

    async fn weir_policy_output(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.weir)
            .arg("policy")
            .args(args)
            .args(["--etcd", &self.etcd.endpoints()[0], "--prefix", PREFIX])
            .output()
            .await
            .context("running weir policy")?;
        if !out.status.success() {
            bail!(
                "weir policy {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs the traffic for one step with the live table; returns each
    /// backend's share of the calls answered in the step's second half.
    async fn run_step(&mut self) -> Result<[f64; 3]> {
        let began = Instant::now();
        let half = began + self.pace.step / 2;
        let mut at_half = None;
        self.table.reset(self.traffic.counts());
        while began.elapsed() < self.pace.step {
            tokio::time::sleep(self.pace.tick).await;
            if at_half.is_none() && Instant::now() >= half {
                at_half = Some(self.traffic.counts());
            }
            let services = self.services().await.unwrap_or(Value::Null);
            self.table.tick(&self.traffic, &services, &self.backends);
        }
        self.table.finish();
        let start = at_half.unwrap_or_default();
        let end = self.traffic.counts();
        let delta: Vec<u64> = (0..3).map(|i| end[i] - start[i]).collect();
        let sum = delta.iter().sum::<u64>().max(1) as f64;
        Ok([0, 1, 2].map(|i| delta[i] as f64 / sum))
    }

    /// Replaces the policy file (write beside it, rename over it) and waits
    /// until the gateway serves the new version.
    async fn swap_file(&mut self, policy: &str) -> Result<Duration> {
        let bytes = std::fs::read(self.builtins.join(format!("{policy}.wasm")))?;
        let written = Instant::now();
        write_atomically(&self.policy_dir.join("demo.wasm"), &bytes)?;
        let took = self.until_serving(&bytes, written).await?;
        self.swaps.push((format!("{policy} (file)"), took));
        Ok(took)
    }

    async fn publish_through_etcd(&mut self, policy: &str) -> Result<Duration> {
        let path = self.builtins.join(format!("{policy}.wasm"));
        let bytes = std::fs::read(&path)?;
        let written = Instant::now();
        let status = Command::new("etcdctl")
            .args([
                "--endpoints",
                &self.etcd.endpoints()[0],
                "put",
                &format!("{PREFIX}/_policies/demo"),
            ])
            .stdin(std::fs::File::open(&path)?)
            .stdout(Stdio::null())
            .status()
            .await
            .context("running etcdctl")?;
        if !status.success() {
            bail!("etcdctl put failed: {status}");
        }
        let took = self.until_serving(&bytes, written).await?;
        self.swaps.push((format!("{policy} (etcd)"), took));
        Ok(took)
    }

    async fn until_serving(&self, bytes: &[u8], since: Instant) -> Result<Duration> {
        let want = weir::policy::digest(bytes);
        let deadline = since + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.policy_digest().await.is_ok_and(|d| d == want) {
                return Ok(since.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        bail!("the new policy version was not serving after 10 s")
    }

    async fn policies(&self) -> Result<Value> {
        let (_, body) = http_get(self.admin, "/policies").await?;
        Ok(serde_json::from_str(&body)?)
    }

    async fn policy_digest(&self) -> Result<String> {
        let p = self.policies().await?;
        p["policies"]["demo"]["current"]["digest"]
            .as_str()
            .map(str::to_owned)
            .context("no demo policy serving")
    }

    async fn wait_for_policy_error(&self) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let p = self.policies().await?;
            if let Some(reason) = p["policies"]["demo"]["last_error"].as_str() {
                return Ok(reason.to_owned());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        bail!("the gateway did not report the broken file within 10 s")
    }

    /// A counter from the gateway's /metrics.
    async fn counter(&self, series: &str) -> Result<u64> {
        let (_, body) = http_get(self.admin, "/metrics").await?;
        let value = body
            .lines()
            .find_map(|l| l.strip_prefix(series))
            .with_context(|| format!("{series} is not in /metrics"))?;
        Ok(value.trim().parse()?)
    }

    async fn services(&self) -> Result<Value> {
        let (_, body) = http_get(self.admin, "/services").await?;
        Ok(serde_json::from_str(&body)?)
    }

    async fn wait_for(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(s) = self.services().await {
                if done(&s) {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!(
            "gave up waiting for {what} after {within:?} (logs in {})",
            self.work.path().display()
        )
    }

    fn signal(&self, name: &str, signal: &str) -> Result<()> {
        let b = self
            .backends
            .iter()
            .find(|b| b.spec.name == name)
            .context("no such backend")?;
        let pid = b
            .child
            .as_ref()
            .and_then(Child::id)
            .context("backend not running")?;
        let ok = std::process::Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()?
            .success();
        if !ok {
            bail!("kill {signal} {pid} failed");
        }
        Ok(())
    }

    fn check(&mut self, what: String, ok: bool) {
        println!(
            "   {} {what}",
            if ok {
                "\x1b[32m✓\x1b[0m"
            } else {
                "\x1b[31m✗\x1b[0m"
            }
        );
        self.checks.push((what, ok));
    }

    fn summary(&self, took: Duration) -> bool {
        heading("summary");
        let calls = self.traffic.total();
        let failed = self.traffic.failed.load(Ordering::Relaxed);
        say(&format!(
            "calls made: {calls} in {:.1} s ({:.0}/s)",
            took.as_secs_f64(),
            calls as f64 / took.as_secs_f64()
        ));
        say(&format!("failed calls: {failed}"));
        for e in self.traffic.errors.lock().expect("errors").iter() {
            say(&format!("  {e}"));
        }
        let slowest = self.swaps.iter().map(|s| s.1).max().unwrap_or_default();
        say(&format!(
            "policy swaps: {} ({}), each in effect within {} of the write",
            self.swaps.len(),
            self.swaps
                .iter()
                .map(|(p, t)| format!("{p} {}", ms(*t)))
                .collect::<Vec<_>>()
                .join(", "),
            ms(slowest)
        ));
        say(&format!(
            "rejected policy versions: {} (weir_policy_reloads_total{{result=\"failed\"}}); the previous version kept serving",
            self.rejected
        ));
        let passed = self.checks.iter().filter(|c| c.1).count();
        say(&format!(
            "checks: {passed} of {} as expected",
            self.checks.len()
        ));
        failed == 0 && passed == self.checks.len()
    }

    /// Stops the backends (they deregister), then the gateway (it drains),
    /// then etcd; says what each did.
    async fn stop(mut self, keep_logs: bool) {
        heading("stopping what the demo started");
        let mut stopped = Vec::new();
        for b in &mut self.backends {
            if let Some(child) = b.child.take() {
                stopped.push((b.spec.name, terminate(child).await));
            }
        }
        let deregistered = self
            .wait_for(
                "the stopped backends to deregister",
                Duration::from_secs(10),
                |s| endpoints(s).is_empty(),
            )
            .await
            .is_ok();
        for (name, status) in stopped {
            say(&format!("{name}: {status}"));
        }
        say(&format!(
            "their registrations: {}",
            if deregistered {
                "revoked, the set is empty"
            } else {
                "still listed (they will expire with their leases)"
            }
        ));
        let status = terminate(self.gateway).await;
        say(&format!("gateway: {status}"));
        drop(self.etcd);
        say("etcd: stopped, its temp dir removed");
        if keep_logs {
            let logs = self.work.keep();
            say(&format!(
                "the logs of the gateway and the backends are kept in {}",
                logs.display()
            ));
        }
    }
}

trait SpawnLogged {
    /// Starts the program with its output in `log`, killed if dropped.
    fn spawn_logged(&mut self, log: &Path) -> Result<Child>;
}

impl SpawnLogged for Command {
    fn spawn_logged(&mut self, log: &Path) -> Result<Child> {
        let file = std::fs::File::create(log)?;
        self.stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {:?}", self.as_std().get_program()))
    }
}

/// SIGTERM, then up to 15 s to exit (SIGKILL after that).
async fn terminate(mut child: Child) -> String {
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
        Ok(Ok(status)) if status.success() => "exited cleanly".into(),
        Ok(Ok(status)) => format!("exited with {status}"),
        Ok(Err(err)) => format!("could not be waited for: {err}"),
        Err(_) => {
            let _ = child.kill().await;
            "did not stop within 15 s; killed".into()
        }
    }
}

/// The live per-backend table: redrawn in place on a terminal, printed once
/// per step otherwise (logs, CI).
struct Table {
    tty: bool,
    drawn: usize,
    last: [u64; 3],
    last_at: Instant,
    lines: Vec<String>,
}

impl Table {
    fn new(tty: bool) -> Table {
        Table {
            tty,
            drawn: 0,
            last: [0; 3],
            last_at: Instant::now(),
            lines: Vec::new(),
        }
    }

    fn reset(&mut self, counts: [u64; 3]) {
        self.drawn = 0;
        self.last = counts;
        self.last_at = Instant::now();
    }

    fn tick(&mut self, traffic: &Traffic, services: &Value, backends: &[Backend]) {
        let now = traffic.counts();
        let secs = self.last_at.elapsed().as_secs_f64().max(1e-3);
        let delta: Vec<u64> = (0..3).map(|i| now[i] - self.last[i]).collect();
        let sum = delta.iter().sum::<u64>().max(1) as f64;
        let live: BTreeMap<String, &Value> = endpoint_values(services)
            .map(|e| (e["addr"].as_str().unwrap_or("").to_owned(), e))
            .collect();
        let mut lines = vec![format!(
            "   {:<8}{:<6}{:>7}{:>10}{:>8}{:>8}  {:<12}",
            "backend", "zone", "weight", "calls/s", "share", "active", "health"
        )];
        for (i, b) in backends.iter().enumerate() {
            let (active, health) = match live.get(&b.addr.to_string()) {
                Some(e) => (
                    e["backend"]["active_requests"]
                        .as_u64()
                        .unwrap_or(0)
                        .to_string(),
                    e["backend"]["health"].as_str().unwrap_or("-").to_owned(),
                ),
                None => ("-".into(), "gone".into()),
            };
            lines.push(format!(
                "   {:<8}{:<6}{:>7}{:>10.0}{:>7.1}%{:>8}  {:<12}",
                b.spec.name,
                b.spec.zone,
                b.spec.weight,
                delta[i] as f64 / secs,
                delta[i] as f64 / sum * 100.0,
                active,
                health
            ));
        }
        lines.push(format!(
            "   {} calls so far, {} failed",
            traffic.total(),
            traffic.failed.load(Ordering::Relaxed)
        ));
        self.last = now;
        self.last_at = Instant::now();
        if self.tty {
            let mut out = std::io::stdout().lock();
            if self.drawn > 0 {
                let _ = write!(out, "\x1b[{}F\x1b[J", self.drawn);
            }
            for l in &lines {
                let _ = writeln!(out, "{l}");
            }
            let _ = out.flush();
            self.drawn = lines.len();
        }
        self.lines = lines;
    }

    fn finish(&mut self) {
        if !self.tty {
            for l in &self.lines {
                println!("{l}");
            }
        }
        self.drawn = 0;
    }
}

fn endpoint_values(services: &Value) -> impl Iterator<Item = &Value> {
    services["echo"]["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
}

/// The addresses of the echo service's endpoints in the admin view.
fn endpoints(services: &Value) -> Vec<String> {
    endpoint_values(services)
        .filter_map(|e| e["addr"].as_str().map(str::to_owned))
        .collect()
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("wasm.tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn env_path(var: &str, default: PathBuf) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or(default)
}

fn pct(shares: &[f64; 3]) -> String {
    shares
        .iter()
        .zip(&BACKENDS)
        .map(|(s, b)| format!("{} {:.1}%", b.name, s * 100.0))
        .collect::<Vec<_>>()
        .join(", ")
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}
