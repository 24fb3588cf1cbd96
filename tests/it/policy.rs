//! WebAssembly policies: the real compiled guests (build/policies, built by
//! `make policies`), on synthetic sets and through the gateway.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};
use weir::balance::{Balancer, PickContext};
use weir::members::Members;
use weir::metrics::PolicyMetrics;
use weir::policy::{synthetic_members, Limits, PolicyEngine, PolicySet, REVERT_AFTER};

pub fn policy_file(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("build/policies")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: `make test` (make policies) builds it",
        path.display()
    );
    path
}

/// A policy set with the default sandbox limits (the sandbox tests).
fn strict_set() -> PolicySet {
    set_with(Limits::default())
}

/// A policy set for algorithm tests: a generous deadline, so a pick the OS
/// preempts on a loaded test machine is not cut off (the gateway would fall
/// back; these tests check the algorithm itself).
fn set() -> PolicySet {
    set_with(Limits {
        deadline: Duration::from_millis(100),
        ..Limits::default()
    })
}

fn set_with(limits: Limits) -> PolicySet {
    PolicySet::new(
        Arc::new(PolicyEngine::new(limits, Some("zone-1".into())).unwrap()),
        None,
        PolicyMetrics::default(),
    )
}

fn loaded(name: &str) -> (PolicySet, Arc<dyn Balancer>) {
    let set = set();
    set.install_file(name, &policy_file(name)).unwrap();
    let balancer = set.balancer(name);
    (set, balancer)
}

fn pick(b: &dyn Balancer, members: &Arc<Members>, headers: &HeaderMap) -> Result<usize, String> {
    let candidates: Vec<usize> = (0..members.len()).collect();
    let ctx = PickContext {
        service: "svc",
        method: "M",
        headers: &Arc::new(headers.clone()),
        members,
        candidates: &candidates,
        options: None,
        hidden_headers: weir::balance::HiddenHeaders::sensitive(),
    };
    b.pick(&ctx)
        .map(|i| candidates[i])
        .map_err(|e| e.to_string())
}

fn counts(b: &dyn Balancer, members: &Arc<Members>, n: usize) -> Vec<usize> {
    let mut c = vec![0; members.len()];
    for _ in 0..n {
        c[pick(b, members, &HeaderMap::new()).unwrap()] += 1;
    }
    c
}

#[test]
fn round_robin_is_exact() {
    let (_set, rr) = loaded("round-robin");
    let members = synthetic_members(7);
    let mut c = vec![0usize; 7];
    for n in 1..=1000 {
        c[pick(&*rr, &members, &HeaderMap::new()).unwrap()] += 1;
        let (lo, hi) = (c.iter().min().unwrap(), c.iter().max().unwrap());
        assert!(
            hi - lo <= 1,
            "after {n} calls no backend is more than one ahead: {c:?}"
        );
    }
}

#[test]
fn weighted_matches_the_weights_within_2_percent() {
    let (_set, w) = loaded("weighted");
    let members = synthetic_members(3); // weights 100, 200, 300
    let c = counts(&*w, &members, 10_000);
    for (i, want) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].iter().enumerate() {
        let got = c[i] as f64 / 10_000.0;
        assert!(
            (got - want).abs() <= 0.02,
            "backend {i}: share {got:.3}, weight share {want:.3} ({c:?})"
        );
    }
}

#[test]
fn least_conn_sends_new_calls_to_the_idle_backend() {
    least_conn_prefers_the_idle_backend("least-conn");
}

/// The same policy written in C (policies/least-conn-c) behaves the same.
#[test]
fn least_conn_written_in_c_sends_new_calls_to_the_idle_backend() {
    least_conn_prefers_the_idle_backend("least-conn-c");
}

fn least_conn_prefers_the_idle_backend(policy: &str) {
    let (_set, lc) = loaded(policy);
    let members = synthetic_members(3);
    // Two backends hold long-running calls; the third is idle.
    for m in &members.list[..2] {
        for _ in 0..5 {
            m.backend.load.start();
        }
    }
    assert_eq!(counts(&*lc, &members, 200), vec![0, 0, 200]);
    // With many backends (the power of two choices), the busy ones still lose.
    let many = synthetic_members(20);
    for m in &many.list[..19] {
        for _ in 0..3 {
            m.backend.load.start();
        }
    }
    // Two of twenty are drawn per call, so the idle one wins whenever drawn:
    // about twice its fair share, and more than any busy backend of its weight.
    let c = counts(&*lc, &many, 2000);
    assert!(
        c[19] > 2000 / 20 * 3 / 2,
        "the idle backend gets well over its share: {c:?}"
    );
    let same_weight_busy = (0..19)
        .filter(|i| i % 3 == 19 % 3)
        .map(|i| c[i])
        .max()
        .unwrap();
    assert!(c[19] > same_weight_busy, "{c:?}");
}

#[test]
fn consistent_hash_keeps_keys_and_moves_about_one_nth_when_a_backend_is_added() {
    let (_set, ch) = loaded("consistent-hash");
    let ten = synthetic_members(10);
    let eleven = synthetic_members(11); // the same ten, plus one
                                        // All keys on ten endpoints, then on eleven: the ring is rebuilt twice, not per key.
    let with_key = |k: u32| {
        let mut h = HeaderMap::new();
        h.insert("x-hash-key", HeaderValue::from(k));
        h
    };
    const KEYS: u32 = 5000;
    let before: Vec<usize> = (0..KEYS)
        .map(|k| pick(&*ch, &ten, &with_key(k)).unwrap())
        .collect();
    for k in (0..KEYS).step_by(7) {
        assert_eq!(
            before[k as usize],
            pick(&*ch, &ten, &with_key(k)).unwrap(),
            "key {k} stays put"
        );
    }
    let after: Vec<usize> = (0..KEYS)
        .map(|k| pick(&*ch, &eleven, &with_key(k)).unwrap())
        .collect();
    let mut moved = 0;
    for (a, b) in before.iter().zip(&after) {
        if a != b {
            assert_eq!(*b, 10, "a key only ever moves to the new backend");
            moved += 1;
        }
    }
    let share = moved as f64 / f64::from(KEYS);
    assert!(
        (0.5 / 11.0..1.6 / 11.0).contains(&share),
        "about 1/11 of keys moved: {share:.3}"
    );
}

#[test]
fn zone_aware_keeps_calls_in_the_gateways_zone() {
    let (_set, z) = loaded("zone-aware");
    let members = synthetic_members(6); // zones 0,1,2,0,1,2; the gateway is in zone-1
    let c = counts(&*z, &members, 600);
    assert_eq!(c[0] + c[2] + c[3] + c[5], 0, "{c:?}");
    assert!(c[1] > 200 && c[4] > 200, "{c:?}");
    let mut headers = HeaderMap::new();
    headers.insert("x-zone", HeaderValue::from_static("zone-2"));
    for _ in 0..50 {
        assert!([2, 5].contains(&pick(&*z, &members, &headers).unwrap()));
    }
}

fn testing_pick(b: &dyn Balancer, members: &Arc<Members>, misdeed: &str) -> Result<usize, String> {
    let mut headers = HeaderMap::new();
    headers.insert("x-policy-test", HeaderValue::from_str(misdeed).unwrap());
    pick(b, members, &headers)
}

#[test]
fn the_sandbox_cuts_off_loops_memory_bombs_and_traps_and_the_next_pick_works() {
    let set = strict_set();
    set.install_file("testing", &policy_file("testing"))
        .unwrap();
    let t = set.balancer("testing");
    let members = synthetic_members(3);
    for (misdeed, expect) in [
        ("loop", "ran past its deadline"),
        ("bomb", "memory limit"),
        ("trap", "trapped"),
        ("range", "out of range"),
        ("error", "asked to fail"),
    ] {
        let began = Instant::now();
        let err = testing_pick(&*t, &members, misdeed).unwrap_err();
        assert!(err.contains(expect), "{misdeed}: {err}");
        if misdeed == "loop" {
            assert!(
                began.elapsed() < Duration::from_millis(200),
                "cut off near the 1 ms deadline (within a few ms; a preempted test thread adds more), not left to run: {:?}",
                began.elapsed()
            );
        }
        assert_eq!(
            pick(&*t, &members, &HeaderMap::new()),
            Ok(0),
            "after {misdeed}, the policy picks again"
        );
    }
    let version = set.policy("testing").unwrap().current().unwrap();
    assert_eq!(version.faults.load(std::sync::atomic::Ordering::Relaxed), 5);
}

#[test]
fn bad_files_leave_the_previous_version_serving() {
    let set = set();
    let good = set.install_file("p", &policy_file("round-robin")).unwrap();
    let core_module = b"\0asm\x01\0\0\0";
    for (what, bytes) in [
        ("garbage", b"not wasm at all".to_vec()),
        ("a core module", core_module.to_vec()),
        (
            "another world",
            std::fs::read(policy_file("other-world")).unwrap(),
        ),
    ] {
        let err = set.install("p", &bytes, what.into()).unwrap_err();
        let current = set.policy("p").unwrap().current().unwrap();
        assert_eq!(
            current.digest, good.digest,
            "{what} left the old version serving"
        );
        assert!(set
            .policy("p")
            .unwrap()
            .last_error()
            .unwrap()
            .contains(&err.to_string()));
    }
    let view = set.describe().to_string();
    assert!(view.contains("last_error"), "{view}");
}

#[test]
fn a_version_that_keeps_failing_is_reverted_to_the_last_good_one() {
    let set = set();
    let good = set.install_file("p", &policy_file("round-robin")).unwrap();
    set.install_file("p", &policy_file("testing")).unwrap();
    let b = set.balancer("p");
    let members = synthetic_members(3);
    // Trapped instances are re-made at a bounded rate: picks meanwhile are
    // `busy` (they fall back too, but do not count toward the revert).
    let began = Instant::now();
    while set.policy("p").unwrap().current().unwrap().digest != good.digest {
        assert!(testing_pick(&*b, &members, "trap").is_err());
        assert!(began.elapsed() < Duration::from_secs(10), "never reverted");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        set.policy("p").unwrap().current().unwrap().digest,
        good.digest,
        "reverted"
    );
    assert!(set
        .policy("p")
        .unwrap()
        .last_error()
        .unwrap()
        .contains("reverted"));
    assert!(pick(&*b, &members, &HeaderMap::new()).is_ok());
}

/// Regression: deadline faults counted toward a revert like any other, yet
/// a deadline counts wall time: a busy machine that preempts picks reverted
/// good versions. Only a long unbroken run of deadline faults (a policy
/// that really loops) reverts now.
#[test]
fn deadline_faults_revert_a_version_only_after_a_long_unbroken_run() {
    let set = strict_set();
    let good = set.install_file("p", &policy_file("round-robin")).unwrap();
    let testing = set.install_file("p", &policy_file("testing")).unwrap();
    let b = set.balancer("p");
    let members = synthetic_members(3);
    let current = || set.policy("p").unwrap().current().unwrap().digest.clone();
    for _ in 0..REVERT_AFTER + 2 {
        assert!(testing_pick(&*b, &members, "loop").is_err());
        // A cut-off instance is re-made at a bounded rate: let it be.
        std::thread::sleep(Duration::from_millis(15));
    }
    assert_eq!(
        current(),
        testing.digest,
        "a few deadline faults do not revert"
    );
    std::thread::sleep(Duration::from_millis(60));
    assert!(
        pick(&*b, &members, &HeaderMap::new()).is_ok(),
        "a good pick"
    );
    let began = Instant::now();
    let mut faults = 0;
    while current() != good.digest {
        assert!(testing_pick(&*b, &members, "loop").is_err());
        faults += 1;
        assert!(began.elapsed() < Duration::from_secs(20), "never reverted");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        faults >= weir::policy::REVERT_AFTER_DEADLINES,
        "an unbroken run of them reverts, not fewer: {faults}"
    );
}

mod through_the_gateway {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use tonic::metadata::MetadataValue;
    use tonic::Request;
    use weir::policy::digest;
    use weir::register::{Registration, RegistrationSpec};

    use super::policy_file;
    use crate::support::gateway::{admin_get, req, Env};
    use crate::support::{client, eventually, wait_on, PREFIX};

    /// A route to `policy` from `dir`, under a generous pick deadline: these
    /// tests check what a policy chooses, and a pick the OS preempts past
    /// the default 1 ms falls back to round-robin (by design) on a busy
    /// machine. The sandbox tests keep the default.
    fn route(policy: &str, dir: &std::path::Path) -> String {
        format!(
            "[policy]\ndir = {:?}\ndeadline = \"100ms\"\n[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\npolicy = \"{policy}\"\n",
            dir.display().to_string()
        )
    }

    /// A condition for `eventually`: policy `name` serves the version `want`.
    fn serving_digest(
        policies: &std::sync::Arc<weir::policy::PolicySet>,
        name: &'static str,
        want: String,
    ) -> impl FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> {
        let policies = policies.clone();
        move || {
            let (policies, want) = (policies.clone(), want.clone());
            Box::pin(async move {
                policies
                    .policy(name)
                    .and_then(|p| p.current())
                    .is_some_and(|v| v.digest == want)
            })
        }
    }

    fn builtins() -> std::path::PathBuf {
        policy_file("testing").parent().unwrap().to_owned()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_misbehaving_policy_never_fails_a_call() {
        let default_deadline = route("testing", &builtins()).replace("deadline = \"100ms\"\n", "");
        let env = Env::start(2, &default_deadline).await;
        let mut c = env.client().await;
        for misdeed in ["loop", "bomb", "trap", "range", "error"] {
            let mut r = Request::new(req(misdeed));
            r.metadata_mut()
                .insert("x-policy-test", MetadataValue::try_from(misdeed).unwrap());
            let began = Instant::now();
            let reply = c.unary(r).await;
            assert!(
                reply.is_ok(),
                "{misdeed}: the call fell back and succeeded: {reply:?}"
            );
            assert!(
                began.elapsed() < Duration::from_millis(500),
                "{misdeed}: {:?}",
                began.elapsed()
            );
        }
        let (_, m) = admin_get(env.gateway().admin_addr, "/metrics").await;
        for kind in ["deadline", "memory", "trap", "out_of_range", "error"] {
            assert!(
                m.contains(&format!(
                    "weir_policy_faults_total{{policy=\"testing\",kind=\"{kind}\"}} 1"
                )),
                "{kind}:\n{m}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn twenty_swaps_by_file_and_etcd_under_load_fail_no_call() {
        let dir = tempfile::tempdir().unwrap();
        // Every write brings new bytes for its source, and each differs from
        // the version serving: the file alternates round-robin / least-conn,
        // etcd alternates random / weighted.
        let versions = ["round-robin", "random", "least-conn", "weighted"]
            .map(|p| std::fs::read(policy_file(p)).unwrap());
        std::fs::write(dir.path().join("swap.wasm"), &versions[0]).unwrap();
        let env = Env::start(3, &route("swap", dir.path())).await;
        let failed = std::sync::Arc::new(AtomicU64::new(0));
        let done = std::sync::Arc::new(AtomicU64::new(0));
        let stop = tokio_util::sync::CancellationToken::new();
        let mut workers = Vec::new();
        for _ in 0..4 {
            let mut c = env.client().await;
            let (failed, done, stop) = (failed.clone(), done.clone(), stop.clone());
            workers.push(tokio::spawn(async move {
                while !stop.is_cancelled() {
                    match c.unary(req("swap")).await {
                        Ok(_) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        let mut etcd = client(&env.etcd).await;
        let slot = env.gateway().policies.policy("swap").unwrap();
        let mut took = Vec::new();
        for i in 1..=20 {
            let bytes = if i % 2 == 1 {
                &versions[[1, 3][(i / 2) % 2]]
            } else {
                &versions[[2, 0][(i / 2 - 1) % 2]]
            };
            let began = Instant::now();
            if i % 2 == 0 {
                // Atomic replace: write beside, rename over.
                let tmp = dir.path().join("swap.wasm.tmp");
                std::fs::write(&tmp, bytes).unwrap();
                std::fs::rename(&tmp, dir.path().join("swap.wasm")).unwrap();
            } else {
                etcd.put(format!("{PREFIX}/_policies/swap"), bytes.clone(), None)
                    .await
                    .unwrap();
            }
            let want = digest(bytes);
            while slot.current().map(|v| v.digest.clone()) != Some(want.clone()) {
                assert!(
                    began.elapsed() < Duration::from_secs(5),
                    "swap {i} never took effect"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            took.push(began.elapsed());
            tokio::time::sleep(Duration::from_millis(30)).await; // traffic on this version
        }
        stop.cancel();
        for w in workers {
            w.await.unwrap();
        }
        assert_eq!(
            failed.load(Ordering::Relaxed),
            0,
            "no call failed across 20 swaps"
        );
        assert!(
            done.load(Ordering::Relaxed) > 200,
            "traffic flowed: {}",
            done.load(Ordering::Relaxed)
        );
        // How soon a swap is in effect is a figure for the demo's summary
        // and the benches; here each one only had to happen (bounded above).
        tracing::info!(?took, "swap delays");
        let (_, m) = admin_get(env.gateway().admin_addr, "/metrics").await;
        assert!(
            m.contains("weir_policy_reloads_total{policy=\"swap\",result=\"ok\"} 21"),
            "{m}"
        );
    }

    /// Regression: the policy watch resumed from its old revision after
    /// etcd was wiped, so a version published afterwards (at a revision
    /// lower than the one the gateway had seen) was never installed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_policy_published_after_etcd_is_wiped_is_installed() {
        let dir = tempfile::tempdir().unwrap();
        let mut env = Env::start(0, &route("wiped", dir.path())).await;
        let before = std::fs::read(policy_file("round-robin")).unwrap();
        let after = std::fs::read(policy_file("least-conn")).unwrap();
        let mut etcd = client(&env.etcd).await;
        // Move the revision well past what the fresh etcd will reach (the
        // gateway's own fleet report writes to it too), then the policy at
        // the top of that history.
        for i in 0..30 {
            etcd.put(format!("/elsewhere/{i}"), "x", None)
                .await
                .unwrap();
        }
        etcd.put(format!("{PREFIX}/_policies/wiped"), before.clone(), None)
            .await
            .unwrap();
        let policies = env.gateway().policies.clone();
        let serving = |want: String| serving_digest(&policies, "wiped", want);
        eventually(
            "the first version is installed",
            Duration::from_secs(10),
            serving(digest(&before)),
        )
        .await;

        env.etcd.wipe_and_restart();
        let mut etcd = client(&env.etcd).await;
        etcd.put(format!("{PREFIX}/_policies/wiped"), after.clone(), None)
            .await
            .unwrap();
        eventually(
            "the version published after the wipe is installed",
            Duration::from_secs(30),
            serving(digest(&after)),
        )
        .await;
    }

    /// Regression: after a version was reverted on a gateway, publishing the
    /// same bytes again was skipped there for good (the reloader remembered
    /// the content as settled). A new put is a new publication.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reverted_version_published_again_is_installed_again() {
        let dir = tempfile::tempdir().unwrap();
        let env = Env::start(2, &route("flaky", dir.path())).await;
        let key = format!("{PREFIX}/_policies/flaky");
        let good = std::fs::read(policy_file("round-robin")).unwrap();
        let testing = std::fs::read(policy_file("testing")).unwrap();
        let mut etcd = client(&env.etcd).await;
        let policies = env.gateway().policies.clone();
        let serving = |want: String| serving_digest(&policies, "flaky", want);
        for bytes in [&good, &testing] {
            etcd.put(key.as_str(), bytes.clone(), None).await.unwrap();
            eventually(
                "published version serving",
                Duration::from_secs(10),
                serving(digest(bytes)),
            )
            .await;
        }
        // Calls that make it fail until it is reverted (they still succeed).
        let mut c = env.client().await;
        for _ in 0..weir::policy::REVERT_AFTER {
            let mut r = Request::new(req("x"));
            r.metadata_mut()
                .insert("x-policy-test", MetadataValue::try_from("error").unwrap());
            c.unary(r).await.expect("a fallback pick");
        }
        eventually("reverted", Duration::from_secs(10), serving(digest(&good))).await;
        // The operator fixed what the version depended on, and publishes it again.
        etcd.put(key.as_str(), testing.clone(), None).await.unwrap();
        eventually(
            "the republished version serving again",
            Duration::from_secs(10),
            serving(digest(&testing)),
        )
        .await;
    }

    /// The same broken bytes, written again (more file events), are not
    /// tried again: one refusal is counted once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_file_is_refused_once_however_many_events_it_makes() {
        let dir = tempfile::tempdir().unwrap();
        let env = Env::start(1, &route("round-robin", dir.path())).await;
        let admin = env.gateway().admin_addr;
        let failed = || async move {
            let (_, m) = admin_get(admin, "/metrics").await;
            m.lines()
                .find_map(|l| {
                    l.strip_prefix(
                        "weir_policy_reloads_total{policy=\"broken\",result=\"failed\"} ",
                    )
                })
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        let broken = dir.path().join("broken.wasm");
        std::fs::write(&broken, b"not a component").unwrap();
        eventually(
            "the broken file refused",
            Duration::from_secs(10),
            || async move { failed().await == 1 },
        )
        .await;
        // More events on the same write (its metadata changes, its content
        // and modification time do not): nothing is tried again.
        for mode in [0o600, 0o644, 0o640] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(mode)).unwrap();
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        // A later, valid file loading shows the watcher got past those events.
        std::fs::copy(policy_file("random"), dir.path().join("later.wasm")).unwrap();
        eventually(
            "the later file loaded",
            Duration::from_secs(10),
            || async move {
                let (_, p) = admin_get(admin, "/policies").await;
                let v: serde_json::Value = serde_json::from_str(&p).unwrap();
                v["policies"]["later"]["current"]["digest"].is_string()
            },
        )
        .await;
        assert_eq!(failed().await, 1, "the same broken bytes were refused once");
    }

    /// `observe` reaches the policy: the adaptive policy (world
    /// learning-balancer) hears of each call's status and moves calls off an
    /// instance that answers every call with INTERNAL while its health check
    /// says SERVING, which round-robin, health checks and outlier detection
    /// (it counts UNAVAILABLE) would all keep sending a third of the calls.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_learning_policy_hears_outcomes_and_avoids_a_failing_instance() {
        let env = Env::start(3, &route("adaptive", &builtins())).await;
        env.backend(2).set_failing(13);
        let mut c = env.client().await;
        let mut failed = 0u32;
        // The first calls teach it; count only after those.
        for i in 0..400 {
            let reply = c.unary(req("x")).await;
            if i >= 100 && reply.is_err() {
                failed += 1;
            }
        }
        // Probes (1 pick in 64, a third of them on the broken instance) and
        // a pick now and then while its score climbs back: well under the
        // hundred that round-robin would send it.
        assert!(
            failed < 30,
            "{failed} of 300 calls still went to the failing instance"
        );
        let (_, policies) = admin_get(env.gateway().admin_addr, "/policies").await;
        let policies: serde_json::Value = serde_json::from_str(&policies).unwrap();
        assert_eq!(
            policies["policies"]["adaptive"]["current"]["learns_from_outcomes"], true,
            "{policies}"
        );
    }

    /// `[route.options]` reach the policy: consistent-hash hashes on the
    /// header the route names, and ignores its default one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_route_option_tells_consistent_hash_which_header_to_hash_on() {
        let config = format!(
            "{}[route.options]\nheader = \"x-user\"\n",
            route("consistent-hash", &builtins())
        );
        let env = Env::start(3, &config).await;
        let (_, routes) = admin_get(env.gateway().admin_addr, "/routes").await;
        assert!(routes.contains("x-user"), "{routes}");
        let mut c = env.client().await;
        let call = |user: String, other: String| {
            let mut r = Request::new(req("x"));
            r.metadata_mut()
                .insert("x-user", MetadataValue::try_from(user).unwrap());
            r.metadata_mut()
                .insert("x-hash-key", MetadataValue::try_from(other).unwrap());
            r
        };
        let mut homes = std::collections::HashSet::new();
        for user in 0..30 {
            let mut seen = std::collections::HashSet::new();
            // The default header varies; the route's header does not.
            for other in 0..8 {
                let reply = c
                    .unary(call(format!("user-{user}"), format!("k{other}")))
                    .await;
                seen.insert(reply.unwrap().into_inner().instance);
            }
            assert_eq!(
                seen.len(),
                1,
                "user-{user} always lands on one backend: {seen:?}"
            );
            homes.extend(seen);
        }
        assert!(
            homes.len() >= 2,
            "30 users spread over the backends: {homes:?}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lease_aware_stops_picking_an_instance_whose_lease_is_ending() {
        let env = Env::start(0, &route("lease-aware", &builtins())).await;
        let mut regs = Vec::new();
        let mut echos = Vec::new();
        for name in ["steady", "doomed"] {
            let echo = weir::example::EchoBackend::start(name).await.unwrap();
            let mut spec = RegistrationSpec::new(PREFIX, "echo", &echo.addr.to_string());
            // 5 s: kept alive every 1.7 s, a healthy lease never reads below 3 s.
            spec.ttl_secs = 5;
            let mut reg = Registration::spawn(client(&env.etcd).await, spec).unwrap();
            reg.registered().await;
            regs.push(reg);
            echos.push(echo);
        }
        env.wait_endpoints("echo", 2).await;
        let doomed = echos[1].addr.to_string();
        let mut c = env.client().await;
        let mut seen_doomed = false;
        for _ in 0..20 {
            seen_doomed |= c.unary(req("x")).await.unwrap().into_inner().instance == "doomed";
        }
        assert!(
            seen_doomed,
            "both instances serve while their leases are kept alive"
        );
        drop(regs.pop()); // the doomed agent crashes: no keep-alives, no revoke
        wait_on(
            &env.gateway().table,
            "the doomed lease below one second, key still there",
            Duration::from_secs(10),
            |t| {
                t.get("echo").is_some_and(|s| {
                    s.endpoints.iter().any(|e| {
                        *e.addr == doomed
                            && e.lease
                                .as_ref()
                                .and_then(|l| l.remaining_ms())
                                .is_some_and(|ms| ms < 900)
                    })
                })
            },
        )
        .await;
        for _ in 0..20 {
            assert_eq!(
                c.unary(req("x")).await.unwrap().into_inner().instance,
                "steady",
                "drained before etcd dropped the key"
            );
        }
    }
}

/// The adaptive policy's learned scores move to its next version: what each
/// instance of the new version holds right after the swap equals what the
/// old one held (world `stateful-balancer`, `export-state`/`import-state`).
#[test]
fn the_adaptive_policy_keeps_its_scores_across_a_swap() {
    let set = set();
    set.install_file("adaptive", &policy_file("adaptive"))
        .unwrap();
    let old = set.policy("adaptive").unwrap().current().unwrap();
    assert!(old.carries_state, "adaptive exports its state");
    let balancer = set.balancer("adaptive");
    let members = synthetic_members(4);
    // Pick (so the scores exist for this generation), then tell it that
    // calls on endpoint 2 fail and on the others succeed.
    for _ in 0..50 {
        pick(&*balancer, &members, &HeaderMap::new()).unwrap();
    }
    for i in 0..400u32 {
        let set_index = i % 4;
        balancer.observe(&weir::balance::Outcome {
            generation: members.generation(),
            set_index,
            status: if set_index == 2 { 14 } else { 0 },
            latency_us: 1_000,
            placed_by: 0,
        });
    }
    let engine = set.engine();
    let before = old.export_states(engine);
    assert!(
        before.iter().flatten().any(|s| s.len() > 12),
        "the old version learned scores: {before:?}"
    );
    // A new version of the same policy (another digest, same code).
    let next = crate::fleet::padded(&std::fs::read(policy_file("adaptive")).unwrap(), 8);
    let new = set.install("adaptive", &next, "next".into()).unwrap();
    assert_ne!(new.digest, old.digest);
    let after = new.export_states(engine);
    assert_eq!(after, before, "the new version holds the old one's scores");
}

/// The same through a rollout, as the gateway applies one from etcd: v2 is
/// tried as a 50 % canary (learning from its own calls meanwhile), then
/// promoted; the promoted version holds what the current one had learned
/// at that moment.
#[test]
fn the_adaptive_policy_keeps_its_scores_across_a_promotion() {
    use weir::discovery::fleet::Mode;
    use weir::policy::candidate::Trial;
    let set = set();
    let engine = set.engine();
    let bytes = std::fs::read(policy_file("adaptive")).unwrap();
    let v1 = set
        .prepare_published("adaptive", &bytes, None, "v1".into())
        .unwrap();
    set.apply_rollout("adaptive", v1.clone(), None);
    let balancer = set.balancer("adaptive");
    let members = synthetic_members(4);
    // Every call its outcome, heard by the version that placed it: calls
    // the current placed fail on endpoint 2, calls the candidate placed on
    // endpoint 3, so the two versions learn different scores.
    let calls = |n: usize| {
        for _ in 0..n {
            let candidates: Vec<usize> = (0..members.len()).collect();
            let ctx = PickContext {
                service: "svc",
                method: "M",
                headers: &Arc::new(HeaderMap::new()),
                members: &members,
                candidates: &candidates,
                options: None,
                hidden_headers: weir::balance::HiddenHeaders::sensitive(),
            };
            let (picked, placed_by) = balancer.pick_placed(&ctx).unwrap();
            let set_index = picked as u32;
            let failing = if placed_by == 0 { 2 } else { 3 };
            balancer.observe(&weir::balance::Outcome {
                generation: members.generation(),
                set_index,
                status: if set_index == failing { 14 } else { 0 },
                latency_us: 1_000,
                placed_by,
            });
        }
    };
    calls(400);
    let v2 = set
        .prepare_published(
            "adaptive",
            &crate::fleet::padded(&bytes, 8),
            None,
            "v2".into(),
        )
        .unwrap();
    let trial = Trial {
        mode: Mode::Canary,
        percent: 50.0,
        auto_promote_after_secs: None,
        since_secs: 1,
    };
    set.apply_rollout("adaptive", v1.clone(), Some((v2.clone(), trial)));
    calls(400);
    let before = v1.export_states(engine);
    assert!(
        before.iter().flatten().any(|s| s.len() > 12),
        "the current version learned scores: {before:?}"
    );
    assert_ne!(
        v2.export_states(engine),
        before,
        "the candidate learned other scores during the canary"
    );
    // The promotion: v2 becomes current, no candidate.
    set.apply_rollout("adaptive", v2.clone(), None);
    let serving = set.policy("adaptive").unwrap().current().unwrap();
    assert!(Arc::ptr_eq(&serving, &v2));
    assert_eq!(
        v2.export_states(engine),
        before,
        "the promoted version holds the scores the current one had"
    );
}

/// A component built against `weir:policy@0.1.0` (before 0.2.0 added the
/// stateful world) still installs and picks: the host links 0.1.0 beside
/// 0.2.0.
#[test]
fn a_component_built_for_wit_0_1_0_keeps_working() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/zone-aware-wit-0.1.0.wasm");
    let bytes = std::fs::read(&path).unwrap();
    let imports_0_1_0 = bytes
        .windows(b"weir:policy/backends@0.1.0".len())
        .any(|w| w == b"weir:policy/backends@0.1.0");
    assert!(imports_0_1_0, "the fixture imports weir:policy 0.1.0");
    let set = set();
    set.install("old", &bytes, path.display().to_string())
        .expect("a 0.1.0 component installs");
    let balancer = set.balancer("old");
    let members = synthetic_members(3);
    for _ in 0..10 {
        let picked = pick(&*balancer, &members, &HeaderMap::new()).unwrap();
        assert!(picked < 3);
    }
}
