//! Trying a policy on a synthetic set: the trial pick before a swap, and
//! `weir policy check`.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::engine::PolicyEngine;
use super::version::PolicyVersion;
use crate::balance::PickContext;
use crate::discovery::{DeclaredHealth, Endpoint, EndpointSet};
use crate::members::Members;
use crate::upstream::{Backends, PoolConfig};

/// Synthetic sets' generations are at and above this: a policy keeps state
/// per generation, and the trial pick runs on the instances that then serve
/// real sets, whose generations (a counter from 1) never get this high.
const SYNTHETIC_GENERATIONS: u64 = 1 << 63;

/// `n` synthetic endpoints in three zones with weights 100, 200, 300, ... .
/// The same `n` gives the same set; each size has its own generation.
pub fn synthetic_members(n: usize) -> Arc<Members> {
    synthetic_members_with(n, &[])
}

/// `synthetic_members`, with extra metadata: (position, key, value).
pub fn synthetic_members_with(n: usize, meta: &[(usize, String, String)]) -> Arc<Members> {
    let endpoints = (0..n)
        .map(|i| {
            let addr = format!("10.0.{}.{}:50051", i / 250, i % 250 + 1);
            let mut metadata = BTreeMap::new();
            metadata.insert("zone".to_owned(), format!("zone-{}", i % 3));
            for (_, k, v) in meta.iter().filter(|(at, ..)| *at == i) {
                metadata.insert(k.clone(), v.clone());
            }
            Arc::new(Endpoint {
                key: format!("/synthetic/svc/{addr}").into(),
                addr: addr.into(),
                weight: 100 * (i as u32 % 3 + 1),
                health: DeclaredHealth::Healthy,
                metadata,
                lease: None,
            })
        })
        .collect();
    let set = Arc::new(EndpointSet {
        service: "synthetic".into(),
        endpoints,
        generation: SYNTHETIC_GENERATIONS | n as u64,
    });
    let backends = Backends::new(PoolConfig::default());
    Arc::new(Members::unconnected(set, &backends))
}

/// One pick on three synthetic endpoints, under the sandbox limits.
pub fn trial(engine: &PolicyEngine, version: &PolicyVersion) -> Result<(), String> {
    let members = synthetic_members(3);
    let candidates = [0usize, 1, 2];
    let headers = Arc::new(http::HeaderMap::new());
    let ctx = PickContext {
        service: "synthetic",
        method: "Trial",
        headers: &headers,
        members: &members,
        candidates: &candidates,
        options: None,
        hidden_headers: crate::balance::HiddenHeaders::sensitive(),
    };
    let picked = pick_despite_preemption(engine, version, &ctx, 2).map_err(|f| f.to_string())?;
    if version.learns_from_outcomes {
        // A learning policy is also told how its trial call went.
        let told = crate::balance::Outcome {
            generation: members.generation(),
            set_index: picked as u32,
            status: 0,
            latency_us: 1_000,
            placed_by: 0,
        };
        version
            .observe(engine, &told)
            .map_err(|f| format!("observe {f}"))?;
    }
    Ok(())
}

/// A pick, tried again up to `retries` times if it ran past its deadline.
/// Deadlines count wall time, so a pick the OS preempted (a busy machine)
/// is not the policy's fault; a policy that really runs too long fails
/// every time.
fn pick_despite_preemption(
    engine: &PolicyEngine,
    version: &PolicyVersion,
    ctx: &PickContext<'_>,
    retries: usize,
) -> Result<usize, super::version::Fault> {
    let mut outcome = version.pick(engine, ctx);
    for _ in 0..retries {
        match outcome {
            Err(super::version::Fault::Deadline) => outcome = version.pick(engine, ctx),
            _ => break,
        }
    }
    outcome
}

/// `weir policy check`: how `picks` synthetic picks spread over `n` endpoints.
pub fn spread(
    engine: &PolicyEngine,
    version: &PolicyVersion,
    n: usize,
    picks: usize,
    meta: &[(usize, String, String)],
) -> Result<Vec<(String, u32, usize)>, String> {
    let members = synthetic_members_with(n, meta);
    let candidates: Vec<usize> = (0..n).collect();

    let mut counts = vec![0usize; n];
    for i in 0..picks {
        // Vary the key so hash-based policies show their spread.
        let mut varied = http::HeaderMap::new();
        varied.insert("x-hash-key", http::HeaderValue::from(i as u64));
        let headers = Arc::new(varied);
        let ctx = PickContext {
            service: "synthetic",
            method: "Check",
            headers: &headers,
            members: &members,
            candidates: &candidates,
            options: None,
            hidden_headers: crate::balance::HiddenHeaders::sensitive(),
        };
        let at = pick_despite_preemption(engine, version, &ctx, 3)
            .map_err(|f| format!("pick {i}: {f}"))?;
        counts[at] += 1;
    }
    Ok(members
        .list
        .iter()
        .zip(counts)
        .map(|(m, c)| (m.endpoint.addr.to_string(), m.endpoint.weight, c))
        .collect())
}
