//! Per-pick cost of each built-in WebAssembly policy at 3, 100 and 1,000
//! backends, beside a native Rust implementation of the same algorithm
//! reading the same data, measured in the same run (criterion). The last line
//! reads `worst wasm/native ratio: R`. `make bench-pick` (it builds the
//! policies first).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion};
use http::{HeaderMap, HeaderValue};
use weir::balance::{Balancer, PickContext, PickError, RoundRobin};
use weir::members::Members;
use weir::metrics::PolicyMetrics;
use weir::policy::{synthetic_members, Limits, PolicyEngine, PolicySet};

const POLICIES: [&str; 7] = [
    "round-robin",
    "random",
    "least-conn",
    "least-conn-c",
    "least-conn-py",
    "weighted",
    "consistent-hash",
];

/// Policies compiled only when benchmarking: a Python one takes a core
/// about 25 s to compile, too long for `cargo test`'s one run of each.
const BENCH_ONLY: [&str; 1] = ["least-conn-py"];
const SIZES: [usize; 3] = [3, 100, 1000];

fn random_below(n: usize) -> usize {
    (rand::random::<u64>() % n as u64) as usize
}

/// least-conn's native twin: the same scan-or-two-choices on the same data.
struct LeastConn;
impl Balancer for LeastConn {
    fn name(&self) -> &str {
        "least-conn"
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Result<usize, PickError> {
        let load = |i: usize| {
            let m = &ctx.members.list[ctx.candidates[i]];
            (
                u64::from(m.backend.load.active()),
                u64::from(m.endpoint.weight.max(1)),
            )
        };
        let lighter = |a: usize, b: usize| {
            let ((la, wa), (lb, wb)) = (load(a), load(b));
            la * wb <= lb * wa
        };
        let n = ctx.candidates.len();
        let r = rand::random::<u64>();
        if n <= 4 {
            let start = (r % n as u64) as usize;
            let mut best = start;
            for step in 1..n {
                let i = (start + step) % n;
                if !lighter(best, i) {
                    best = i;
                }
            }
            return Ok(best);
        }
        let a = (r % n as u64) as usize;
        let b = (a + 1 + ((r >> 32) % (n as u64 - 1)) as usize) % n;
        Ok(if lighter(a, b) { a } else { b })
    }
}

struct Random;
impl Balancer for Random {
    fn name(&self) -> &str {
        "random"
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Result<usize, PickError> {
        Ok(random_below(ctx.candidates.len()))
    }
}

/// weighted's native twin: smooth weighted round-robin, state per set index.
#[derive(Default)]
struct Weighted {
    state: std::sync::Mutex<(u64, Vec<i64>)>,
}
impl Balancer for Weighted {
    fn name(&self) -> &str {
        "weighted"
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Result<usize, PickError> {
        let mut state = self.state.lock().unwrap();
        if state.0 != ctx.members.generation() {
            *state = (ctx.members.generation(), vec![0; ctx.members.len()]);
        }
        let (mut total, mut best) = (0i64, 0usize);
        for (i, &c) in ctx.candidates.iter().enumerate() {
            let w = i64::from(ctx.members.list[c].endpoint.weight);
            state.1[c] += w;
            total += w;
            if state.1[c] > state.1[ctx.candidates[best]] {
                best = i;
            }
        }
        state.1[ctx.candidates[best]] -= total;
        Ok(best)
    }
}

/// consistent-hash's native twin: the same ring, hash and walk.
#[derive(Default)]
struct ConsistentHash {
    ring: std::sync::Mutex<(u64, Vec<(u64, u32)>)>,
}
fn hash(bytes: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}
impl Balancer for ConsistentHash {
    fn name(&self) -> &str {
        "consistent-hash"
    }
    fn pick(&self, ctx: &PickContext<'_>) -> Result<usize, PickError> {
        let key = ctx
            .headers
            .get("x-hash-key")
            .map(|v| v.as_bytes())
            .unwrap_or_default();
        let mut ring = self.ring.lock().unwrap();
        if ring.0 != ctx.members.generation() {
            let mut points = Vec::new();
            for (i, m) in ctx.members.list.iter().enumerate() {
                for v in 0..160 {
                    points.push((hash(m.endpoint.addr.as_bytes(), v), i as u32));
                }
            }
            points.sort_unstable();
            *ring = (ctx.members.generation(), points);
        }
        let h = hash(key, 0);
        let start = ring.1.partition_point(|(p, _)| *p < h);
        for step in 0..ring.1.len() {
            let (_, set_index) = ring.1[(start + step) % ring.1.len()];
            if let Ok(c) = ctx.candidates.binary_search(&(set_index as usize)) {
                return Ok(c);
            }
        }
        Ok(0)
    }
}

fn native(policy: &str) -> Box<dyn Balancer> {
    match policy {
        "round-robin" => Box::new(RoundRobin::default()),
        "random" => Box::new(Random),
        // The C and Python policies implement the same algorithm as the Rust one.
        "least-conn" | "least-conn-c" | "least-conn-py" => Box::new(LeastConn),
        "weighted" => Box::new(Weighted::default()),
        "consistent-hash" => Box::new(ConsistentHash::default()),
        other => panic!("no native twin for {other}"),
    }
}

fn policy_file(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("build/policies");
    let dir = if name.ends_with("-py") {
        dir.join("python")
    } else {
        dir
    };
    let p = dir.join(format!("{name}.wasm"));
    assert!(
        p.exists(),
        "{} is missing: run `make policies` (make bench-pick does)",
        p.display()
    );
    p
}

/// One pick. A pick the OS preempted past its deadline falls back in the
/// gateway; here it just counts as picking 0.
fn run(
    b: &dyn Balancer,
    members: &Arc<Members>,
    candidates: &[usize],
    headers: &Arc<HeaderMap>,
) -> usize {
    let ctx = PickContext {
        service: "bench",
        method: "Pick",
        headers,
        members,
        candidates,
        options: None,
        hidden_headers: weir::balance::HiddenHeaders::sensitive(),
    };
    b.pick(&ctx).unwrap_or(0)
}

fn bench(c: &mut Criterion, benchmarking: bool) {
    // A Python policy's interpreter needs more than the default 8 MiB.
    let limits = Limits {
        memory_bytes: 32 << 20,
        ..Limits::default()
    };
    let engine = Arc::new(PolicyEngine::new(limits, None).expect("engine"));
    let set = PolicySet::new(engine, None, PolicyMetrics::default());
    for policy in POLICIES {
        if !benchmarking && BENCH_ONLY.contains(&policy) {
            continue;
        }
        set.install_file(policy, &policy_file(policy))
            .expect("install");
        let wasm = set.balancer(policy);
        let twin = native(policy);
        let mut group = c.benchmark_group(policy);
        for n in SIZES {
            let members = synthetic_members(n);
            // Some load, so least-conn compares real numbers.
            for (i, m) in members.list.iter().enumerate() {
                for _ in 0..(i % 5) {
                    m.backend.load.start();
                }
            }
            let candidates: Vec<usize> = (0..n).collect();
            let mut h = HeaderMap::new();
            h.insert("x-hash-key", HeaderValue::from_static("user-4711"));
            let headers = Arc::new(h);
            group.bench_with_input(BenchmarkId::new("wasm", n), &n, |b, _| {
                b.iter(|| run(&*wasm, &members, &candidates, &headers))
            });
            group.bench_with_input(BenchmarkId::new("native", n), &n, |b, _| {
                b.iter(|| run(&*twin, &members, &candidates, &headers))
            });
        }
        group.finish();
    }
}

/// Criterion's median estimate for one benchmark, in ns.
fn median_ns(policy: &str, kind: &str, n: usize) -> Option<f64> {
    let target = std::env::var("CARGO_TARGET_DIR")
        .unwrap_or_else(|_| concat!(env!("CARGO_MANIFEST_DIR"), "/target").into());
    let path = format!("{target}/criterion/{policy}/{kind}/{n}/new/estimates.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let benchmarking = std::env::args().any(|a| a == "--bench");
    bench(&mut c, benchmarking);
    c.final_summary();
    if !benchmarking {
        return; // `cargo test`: each benchmark ran once; there are no figures
    }
    println!("\nmedian ns per pick (wasm / native / ratio):");
    println!(
        "{:<16} {:>26} {:>26} {:>26}",
        "policy", "3 backends", "100 backends", "1000 backends"
    );
    let mut worst: BTreeMap<String, f64> = BTreeMap::new();
    for policy in POLICIES {
        let mut row = format!("{policy:<16}");
        for n in SIZES {
            match (median_ns(policy, "wasm", n), median_ns(policy, "native", n)) {
                (Some(w), Some(nat)) => {
                    row.push_str(&format!(" {:>10.0} / {:>6.0} / {:>4.1}x", w, nat, w / nat));
                    // An interpreter is compared with the Rust component below.
                    if !BENCH_ONLY.contains(&policy) {
                        worst.insert(format!("{policy} at {n}"), w / nat);
                    }
                }
                _ => row.push_str(&format!(" {:>26}", "-")),
            }
        }
        println!("{row}");
    }
    // The same algorithm written in C, Python and Rust, all as components.
    for (language, policy) in [("C", "least-conn-c"), ("Python", "least-conn-py")] {
        let mut row = format!("least-conn in {language} / Rust");
        row = format!("{row:<29}");
        for n in SIZES {
            if let (Some(other), Some(rust)) = (
                median_ns(policy, "wasm", n),
                median_ns("least-conn", "wasm", n),
            ) {
                row.push_str(&format!(" {:>25.2}x", other / rust));
            }
        }
        println!("{row}");
    }
    let (which, ratio) = worst
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(k, v)| (k.clone(), *v))
        .unwrap_or_default();
    println!("(worst: {which})");
    println!("worst wasm/native ratio: {ratio:.2}");
}
