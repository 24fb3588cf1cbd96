//! Fleet rollout of policies, from outside: a 3-member etcd cluster, three
//! `weir serve` processes, backends under continuous load, and every step
//! taken with the `weir policy` verbs an operator would type.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use weir::example::pb::echo_client::EchoClient;
use weir::example::pb::EchoRequest;
use weir::example::EchoBackend;
use weir::register::{Registration, RegistrationSpec};
use weir::testkit::Etcd;

use crate::support::gateway::admin_get;
use crate::support::process::WeirServe;
use crate::support::{client, eventually};

const PREFIX: &str = "/fleet";

/// Runs `weir ARGS` against `etcd`; (success, stdout, stderr).
fn weir(etcd: &Etcd, args: &[&str]) -> (bool, String, String) {
    let endpoints = etcd.endpoints().join(",");
    let out = Command::new("timeout")
        .args(["60", env!("CARGO_BIN_EXE_weir")])
        .args(args)
        .args(["--etcd", &endpoints, "--prefix", PREFIX])
        .output()
        .expect("weir runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `weir ARGS`, which must succeed; its stdout.
fn weir_ok(etcd: &Etcd, args: &[&str]) -> String {
    let (ok, out, err) = weir(etcd, args);
    assert!(ok, "weir {args:?} failed: {out}{err}");
    out
}

/// `weir policy publish NAME FILE`: the digest (its last line).
fn publish(etcd: &Etcd, name: &str, file: &std::path::Path) -> String {
    let out = weir_ok(etcd, &["policy", "publish", name, file.to_str().unwrap()]);
    out.lines().last().expect("a digest").trim().to_owned()
}

fn status(etcd: &Etcd) -> serde_json::Value {
    let out = weir_ok(etcd, &["policy", "status", "pick", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

/// `component` with a custom section of `padding` bytes appended: the same
/// behaviour under another digest (and as large as asked).
pub fn padded(component: &[u8], padding: usize) -> Vec<u8> {
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let name = b"weir-test-padding";
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name);
    body.resize(body.len() + padding, 0x5a);
    let mut out = component.to_vec();
    out.push(0); // custom section
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

/// What the load saw, by phase.
#[derive(Default)]
struct Load {
    phase: AtomicUsize,
    calls: [AtomicU64; 8],
    failed: [AtomicU64; 8],
    by_bad: [AtomicU64; 8],
    stop: AtomicBool,
}

impl Load {
    fn set_phase(&self, phase: usize) {
        self.phase.store(phase, Ordering::SeqCst);
    }
    fn calls(&self, phase: usize) -> u64 {
        self.calls[phase].load(Ordering::SeqCst)
    }
    fn failed(&self, phase: usize) -> u64 {
        self.failed[phase].load(Ordering::SeqCst)
    }
}

const STEADY: usize = 1;
const SHADOW: usize = 2;
const CANARY: usize = 3;
const PROMOTED: usize = 4;
const BAD: usize = 5;
const AFTER: usize = 6;
const BIG: usize = 7;

/// The digest each gateway's admin view says serves `pick`.
async fn serving(gateways: &[WeirServe]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for g in gateways {
        let (_, body) = admin_get(g.admin_addr, "/policies").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        out.push(
            v["policies"]["pick"]["current"]["digest"]
                .as_str()
                .map(str::to_owned),
        );
    }
    out
}

async fn all_serve(gateways: &[WeirServe], digest: &str, limit: Duration) -> Duration {
    let began = Instant::now();
    let want = Some(digest.to_owned());
    eventually(&format!("every gateway serves {digest}"), limit, || async {
        serving(gateways).await.iter().all(|d| *d == want)
    })
    .await;
    began.elapsed()
}

/// Every step of a rollout with three gateways under load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_rolls_out_across_the_fleet_and_a_bad_candidate_is_rolled_back() {
    let mut etcd = Etcd::start_cluster(3);
    // Three good backends in the gateways' zone; a fourth that fails every
    // call, in another zone, on a port whose key sorts first (so the
    // `testing` policy, which picks candidate 0, picks it).
    let mut backends = Vec::new();
    for i in 0..3 {
        let echo = EchoBackend::start(&format!("good-{i}")).await.unwrap();
        let mut spec = RegistrationSpec::new(PREFIX, "echo", &echo.addr.to_string());
        spec.metadata.insert("zone".into(), "good".into());
        backends.push((echo, spec));
    }
    let bad = loop {
        let port = 10_000 + rand::random::<u16>() % 9_000;
        if let Ok(echo) = EchoBackend::start_on("bad", ([127, 0, 0, 1], port).into()).await {
            break echo;
        }
    };
    bad.set_failing(13); // INTERNAL: answered, not retried, not ejected
    let mut spec = RegistrationSpec::new(PREFIX, "echo", &bad.addr.to_string());
    spec.metadata.insert("zone".into(), "bad".into());
    backends.push((bad, spec));
    let mut registrations = Vec::new();
    for (_, spec) in &backends {
        let mut reg = Registration::spawn(client(&etcd).await, spec.clone()).unwrap();
        reg.registered().await;
        registrations.push(reg);
    }

    // Versions: the current (zone-aware: stays in zone "good"), a candidate
    // that behaves the same under another digest, a bad one, and a 20 MB one.
    let dir = tempfile::tempdir().unwrap();
    let zone_aware = std::fs::read(crate::policy::policy_file("zone-aware")).unwrap();
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let v1_file = write("v1.wasm", &zone_aware);
    let v2_file = write("v2.wasm", &padded(&zone_aware, 16));
    let bad_file = write(
        "bad.wasm",
        &std::fs::read(crate::policy::policy_file("testing")).unwrap(),
    );
    let big_file = write("big.wasm", &padded(&zone_aware, 20 << 20));

    // A generous pick deadline: a pick cut short falls back to the native
    // round-robin, which would send a call to the bad backend; this test is
    // about rollouts on a busy machine, not about deadlines. Likewise a
    // generous p99 guard: on a loaded test machine one version's p99 can
    // be twice the other's by chance; the error-rate guard is judged here.
    let endpoints: Vec<String> = etcd.endpoints().iter().map(|e| format!("{e:?}")).collect();
    let mut gateways: Vec<WeirServe> = (0..3)
        .map(|i| {
            WeirServe::start(&format!(
                "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nzone = \"good\"\nworker_threads = 1\n\
                 [etcd]\nendpoints = [{}]\nprefix = \"{PREFIX}\"\n\
                 [policy]\ndeadline = \"50ms\"\n\
                 [policy.rollout]\ngateway_id = \"gw-{i}\"\nmin_calls = 50\nwindow = \"10s\"\nmax_p99_increase = 10.0\nreport_every = \"200ms\"\n\
                 [[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\npolicy = \"pick\"\n",
                endpoints.join(",")
            ))
        })
        .collect();

    // Publishing changes nothing; a rollout without a mode makes it current.
    let v1 = publish(&etcd, "pick", &v1_file);
    assert_eq!(v1.len(), 64, "a SHA-256 digest: {v1}");
    weir_ok(&etcd, &["policy", "rollout", "pick", &v1[..12]]);
    all_serve(&gateways, &v1, Duration::from_secs(60)).await;

    // Continuous load: two callers per gateway, one call after another.
    let load = Arc::new(Load::default());
    load.set_phase(STEADY);
    let mut callers = Vec::new();
    for g in &gateways {
        for _ in 0..2 {
            let mut c = EchoClient::connect(format!("http://{}", g.grpc_addr))
                .await
                .unwrap();
            let load = load.clone();
            callers.push(tokio::spawn(async move {
                while !load.stop.load(Ordering::Relaxed) {
                    let phase = load.phase.load(Ordering::SeqCst);
                    let reply = c.unary(EchoRequest::default()).await;
                    load.calls[phase].fetch_add(1, Ordering::SeqCst);
                    match reply {
                        Ok(r) if r.get_ref().instance == "bad" => {
                            load.by_bad[phase].fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(_) => {}
                        Err(status) => {
                            load.failed[phase].fetch_add(1, Ordering::SeqCst);
                            if status.message().contains("bad failed") {
                                load.by_bad[phase].fetch_add(1, Ordering::SeqCst);
                            }
                        }
                    }
                }
            }));
        }
    }
    eventually("calls flow", Duration::from_secs(30), || async {
        load.calls(STEADY) > 300
    })
    .await;

    // Shadow: every gateway reports picks compared, and some differing
    // (zone-aware takes the less busy of two at random).
    let v2 = publish(&etcd, "pick", &v2_file);
    load.set_phase(SHADOW);
    weir_ok(&etcd, &["policy", "rollout", "pick", &v2, "--shadow"]);
    eventually(
        "every gateway reports divergence in shadow",
        Duration::from_secs(60),
        || async {
            let s = status(&etcd);
            let gws = s["gateways"].as_array().cloned().unwrap_or_default();
            gws.len() == 3
                && gws.iter().all(|g| {
                    g["candidate"] == v2.as_str()
                        && g["mode"] == "shadow"
                        && g["shadowed"].as_u64().unwrap_or(0) > 50
                        && g["divergent"].as_u64().unwrap_or(0) > 0
                })
        },
    )
    .await;

    // Canary 20 %, with an etcd member stopped meanwhile: each gateway's
    // candidate places 20 ± 5 % of its calls.
    load.set_phase(CANARY);
    weir_ok(&etcd, &["policy", "rollout", "pick", &v2, "--canary", "20"]);
    etcd.stop_member(0);
    let mut shares = Vec::new();
    eventually(
        "each gateway's canary share is measured",
        Duration::from_secs(120),
        || {
            let s = status(&etcd);
            shares = s["gateways"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter(|g| g["mode"] == "canary")
                .map(|g| {
                    let cur = g["calls"].as_u64().unwrap_or(0);
                    let cand = g["candidate_calls"].as_u64().unwrap_or(0);
                    (cur + cand, cand as f64 * 100.0 / (cur + cand).max(1) as f64)
                })
                .collect::<Vec<_>>();
            let done = shares.len() == 3 && shares.iter().all(|(n, _)| *n >= 1500);
            async move { done }
        },
    )
    .await;
    eprintln!("canary shares (calls, %): {shares:?}");
    for (calls, share) in &shares {
        assert!(
            (15.0..=25.0).contains(share),
            "canary share {share:.1}% of {calls} calls"
        );
    }

    // Promote: every gateway serves v2 (the command's own etcd member is up).
    load.set_phase(PROMOTED);
    weir_ok(&etcd, &["policy", "promote", "pick"]);
    let took = all_serve(&gateways, &v2, Duration::from_secs(30)).await;
    eprintln!("promotion reached every gateway in {took:?}");
    etcd.restart_member(0);

    // A bad candidate: the guard of whichever gateway sees it first rolls it
    // back for all, having failed about its share of calls meanwhile.
    let bad_digest = publish(&etcd, "pick", &bad_file);
    load.set_phase(BAD);
    weir_ok(
        &etcd,
        &["policy", "rollout", "pick", &bad_digest, "--canary", "20"],
    );
    eventually(
        "the guard rolls the bad candidate back",
        Duration::from_secs(120),
        || async {
            let s = status(&etcd);
            s["candidate"].is_null() && s["reason"].as_str().unwrap_or("").contains("guard")
        },
    )
    .await;
    // The other gateways follow through their watch.
    eventually(
        "no gateway tries the bad candidate any more",
        Duration::from_secs(30),
        || async {
            let s = status(&etcd);
            s["gateways"]
                .as_array()
                .is_some_and(|g| g.len() == 3 && g.iter().all(|g| g["candidate"].is_null()))
        },
    )
    .await;
    load.set_phase(AFTER);
    let reason = status(&etcd)["reason"].as_str().unwrap_or("").to_owned();
    eprintln!("rolled back: {reason}");
    let (bad_calls, bad_failed) = (load.calls(BAD), load.failed(BAD));
    eprintln!("during the bad canary: {bad_failed} of {bad_calls} calls failed");
    assert!(bad_failed > 0, "the bad candidate placed calls");
    assert!(
        (bad_failed as f64) <= 0.25 * bad_calls as f64 + 20.0,
        "failed calls beyond the canary share: {bad_failed} of {bad_calls}"
    );
    eventually(
        "calls flow after the rollback",
        Duration::from_secs(30),
        || async { load.calls(AFTER) > 200 },
    )
    .await;

    // A 20 MB version: published in chunks, tried, promoted everywhere.
    load.set_phase(BIG);
    let big = publish(&etcd, "pick", &big_file);
    // Its 21 chunks sit beside the prefix: the endpoint watch (on `/fleet/`)
    // never streams them.
    let mut kv = client(&etcd).await;
    let keys_only = || {
        Some(
            etcd_client::GetOptions::new()
                .with_prefix()
                .with_keys_only(),
        )
    };
    let chunks = kv
        .get(format!("{PREFIX}.chunks/{big}/"), keys_only())
        .await
        .unwrap();
    assert_eq!(chunks.kvs().len(), 21, "20 MB in 1 MiB chunks");
    let under = kv
        .get(
            format!("{PREFIX}/"),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    let bytes: usize = under.kvs().iter().map(|kv| kv.value().len()).sum();
    assert!(bytes < 1 << 20, "{bytes} bytes under {PREFIX}/");
    let history = weir_ok(&etcd, &["policy", "history", "pick"]);
    assert!(history.contains(&big) && history.contains(&v1), "{history}");
    weir_ok(
        &etcd,
        &["policy", "rollout", "pick", &big, "--canary", "10"],
    );
    eventually(
        "every gateway tries the 20 MB candidate",
        Duration::from_secs(120),
        || async {
            let s = status(&etcd);
            s["gateways"]
                .as_array()
                .is_some_and(|g| g.len() == 3 && g.iter().all(|g| g["candidate"] == big.as_str()))
        },
    )
    .await;
    weir_ok(&etcd, &["policy", "promote", "pick"]);
    all_serve(&gateways, &big, Duration::from_secs(60)).await;
    let big_calls = load.calls(BIG);

    load.stop.store(true, Ordering::Relaxed);
    for c in callers {
        c.await.unwrap();
    }
    let phases: BTreeMap<usize, (u64, u64, u64)> = (1..8)
        .map(|p| {
            (
                p,
                (
                    load.calls(p),
                    load.failed(p),
                    load.by_bad[p].load(Ordering::SeqCst),
                ),
            )
        })
        .collect();
    eprintln!("calls, failed, by the bad backend, by phase: {phases:?}");
    for phase in [STEADY, SHADOW, CANARY, PROMOTED, AFTER, BIG] {
        assert_eq!(
            load.failed(phase),
            0,
            "failed calls in phase {phase}: {phases:?}"
        );
    }
    assert!(big_calls > 0);

    // A deleted version goes; one in use may not.
    let (ok, _, err) = weir(&etcd, &["policy", "delete", "pick", &big]);
    assert!(
        !ok && err.contains("rollout"),
        "deleting the current version: {err}"
    );
    weir_ok(&etcd, &["policy", "delete", "pick", &bad_digest]);
    assert!(!weir_ok(&etcd, &["policy", "history", "pick"]).contains(&bad_digest));

    // A gateway killed (no goodbye) leaves the fleet view when its lease ends.
    let killed = gateways.pop().unwrap();
    drop(killed);
    eventually(
        "the killed gateway leaves the status",
        Duration::from_secs(60),
        || async {
            let s = status(&etcd);
            s["gateways"].as_array().is_some_and(|g| g.len() == 2)
        },
    )
    .await;
    drop(registrations);
}

/// `--auto-promote-after`: a candidate that stays within its guards that
/// long is promoted by a gateway (one compare-and-swap), and every gateway
/// then serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_within_its_guards_is_promoted_after_its_time() {
    let etcd = Etcd::start();
    let (_echo, _reg) = crate::support::registered_echo(&etcd, PREFIX, "good").await;
    let dir = tempfile::tempdir().unwrap();
    let least_conn = std::fs::read(crate::policy::policy_file("least-conn")).unwrap();
    let v1_file = dir.path().join("v1.wasm");
    let v2_file = dir.path().join("v2.wasm");
    std::fs::write(&v1_file, &least_conn).unwrap();
    std::fs::write(&v2_file, padded(&least_conn, 16)).unwrap();
    // A generous p99 guard, as in the fleet test: the candidate is the same
    // code, yet on a loaded test machine its p99 over a few thousand sub-ms
    // calls can be half again the current's by chance (2.0 ms against 1.5
    // seen), and the guard would roll it back before its time.
    let gateway = WeirServe::start(&format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworker_threads = 1\n\
         [etcd]\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\n\
         [policy]\ndeadline = \"50ms\"\n\
         [policy.rollout]\ngateway_id = \"solo\"\nmin_calls = 20\nwindow = \"5s\"\nmax_p99_increase = 10.0\nreport_every = \"200ms\"\n\
         [[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\npolicy = \"pick\"\n",
        etcd.endpoint(0)
    ));
    let gateways = [gateway];
    let v1 = publish(&etcd, "pick", &v1_file);
    weir_ok(&etcd, &["policy", "rollout", "pick", &v1]);
    all_serve(&gateways, &v1, Duration::from_secs(60)).await;
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let mut c = EchoClient::connect(format!("http://{}", gateways[0].grpc_addr))
        .await
        .unwrap();
    let caller = {
        let (stop, failed) = (stop.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if c.unary(EchoRequest::default()).await.is_err() {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let v2 = publish(&etcd, "pick", &v2_file);
    weir_ok(
        &etcd,
        &[
            "policy",
            "rollout",
            "pick",
            &v2,
            "--canary",
            "50",
            "--auto-promote-after",
            "2s",
        ],
    );
    eventually(
        "the gateway promotes the candidate",
        Duration::from_secs(60),
        || async {
            let s = status(&etcd);
            assert!(
                !(s["current"] == v1.as_str() && s["candidate"].is_null()),
                "rolled back instead: {s}"
            );
            s["current"] == v2.as_str() && s["candidate"].is_null()
        },
    )
    .await;
    let s = status(&etcd);
    assert_eq!(s["changed_by"], "solo", "promoted by the gateway: {s}");
    assert!(
        s["reason"].as_str().unwrap_or("").contains("auto-promoted"),
        "{s}"
    );
    all_serve(&gateways, &v2, Duration::from_secs(30)).await;
    stop.store(true, Ordering::Relaxed);
    caller.await.unwrap();
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no call failed");
}

/// A Python policy (componentize-py, about 18 MB: over etcd's value limit)
/// is published through etcd in chunks and serves calls; its WASI imports
/// have no capabilities: the policy's attempts to read a file, to connect
/// to a listening socket and to read the environment each get an error it
/// can catch (no trap, no fallback), and its `print` reaches the gateway's
/// log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_policy_is_published_through_etcd_and_gets_no_capabilities() {
    let etcd = Etcd::start();
    let (_echo, _reg) = crate::support::registered_echo(&etcd, PREFIX, "good").await;
    let secret = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret.path(), "a secret the policy must not read").unwrap();
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.set_nonblocking(true).unwrap();
    let gateway = WeirServe::start(&format!(
        "listen = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\nworker_threads = 1\n\
         [etcd]\nendpoints = [\"{}\"]\nprefix = \"{PREFIX}\"\n\
         [policy]\ndeadline = \"50ms\"\nmemory_mib = 32\n\
         [[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\npolicy = \"pick\"\n\
         [route.options]\nprobe-file = {:?}\nprobe-addr = \"{}\"\n",
        etcd.endpoint(0),
        secret.path().display().to_string(),
        probe.local_addr().unwrap(),
    ));
    let file = crate::policy::policy_file("python/sandbox-py");
    assert!(std::fs::metadata(&file).unwrap().len() > 4 << 20);
    let version = publish(&etcd, "pick", &file);
    weir_ok(&etcd, &["policy", "rollout", "pick", &version]);
    // Compiling a Python interpreter takes a core tens of seconds.
    let gateways = [gateway];
    all_serve(&gateways, &version, Duration::from_secs(240)).await;

    let mut c = EchoClient::connect(format!("http://{}", gateways[0].grpc_addr))
        .await
        .unwrap();
    for i in 0..20 {
        let reply = c.unary(EchoRequest::default()).await;
        assert!(reply.is_ok(), "call {i}: {reply:?}");
    }
    let (_, metrics) = admin_get(gateways[0].admin_addr, "/metrics").await;
    let picks = metrics
        .lines()
        .find(|l| l.starts_with("weir_policy_picks_total{policy=\"pick\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(picks.is_some_and(|n| n >= 20), "{metrics}");
    let faults: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("weir_policy_faults_total{policy=\"pick\"") && !l.ends_with(" 0"))
        .collect();
    assert!(faults.is_empty(), "the policy's picks held: {faults:?}");
    assert!(
        matches!(probe.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "no connection reached the probe socket"
    );
    eventually(
        "the policy's log lines",
        Duration::from_secs(10),
        || async {
            gateways[0].logged("sandbox held").is_some()
                && gateways[0]
                    .logged("sandbox-py: printed to stdout")
                    .is_some()
        },
    )
    .await;
    let held = gateways[0].logged("sandbox held").unwrap();
    eprintln!("{held}");
    let probed = secret.path().display().to_string();
    assert!(
        held.contains(&probed),
        "the call's pick tried {probed}: {held}"
    );
    for (what, error) in [
        ("open", "FileNotFoundError"),
        ("connect", "PermissionError"),
        ("environ", "LookupError: the environment is empty"),
    ] {
        assert!(held.contains(&format!("{what}: {error}")), "{what}: {held}");
    }
    assert!(!held.contains("a secret"), "{held}");
}

/// The rollout state and a version's manifest change only together: a
/// state naming a version that was deleted is not written (`NotFound`),
/// and a version the state names is not deleted (refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_never_names_a_deleted_version_nor_a_delete_takes_a_named_one() {
    use weir::discovery::fleet::{self, FleetError, RolloutState};

    let etcd = Etcd::start();
    let mut etcd_client = client(&etcd).await;
    let least_conn = std::fs::read(crate::policy::policy_file("least-conn")).unwrap();
    let v1 = fleet::publish(&mut etcd_client, PREFIX, "pick", &least_conn, None)
        .await
        .unwrap()
        .digest;
    let v2 = fleet::publish(
        &mut etcd_client,
        PREFIX,
        "pick",
        &padded(&least_conn, 8),
        None,
    )
    .await
    .unwrap()
    .digest;
    let state = RolloutState::default().set_current(&v1, "test");
    assert!(
        fleet::swap_rollout(&mut etcd_client, PREFIX, "pick", None, &state)
            .await
            .unwrap()
    );
    // v1 is current: its delete is refused, and it stays.
    let refused = fleet::delete(&mut etcd_client, PREFIX, "pick", &v1).await;
    assert!(
        matches!(refused, Err(FleetError::Refused(_))),
        "{refused:?}"
    );
    assert!(fleet::resolve(&mut etcd_client, PREFIX, "pick", &v1)
        .await
        .is_ok());
    // v2 is deleted; a state naming it is then never written.
    fleet::delete(&mut etcd_client, PREFIX, "pick", &v2)
        .await
        .unwrap();
    let read = fleet::read_rollout(&mut etcd_client, PREFIX, "pick")
        .await
        .unwrap()
        .unwrap();
    let naming_v2 = read.state.set_current(&v2, "test");
    let written = fleet::swap_rollout(
        &mut etcd_client,
        PREFIX,
        "pick",
        Some(read.mod_revision),
        &naming_v2,
    )
    .await;
    assert!(
        matches!(written, Err(FleetError::NotFound(_))),
        "{written:?}"
    );
    let after = fleet::read_rollout(&mut etcd_client, PREFIX, "pick")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.state.current.as_deref(), Some(v1.as_str()));
}
