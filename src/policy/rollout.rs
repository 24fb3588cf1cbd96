//! A fleet rollout on this gateway: follows `<prefix>/_rollout/` (through
//! discovery's key watch), fetches and checks the versions each state names
//! (`discovery::fleet`: chunks, manifest, digest, signature), serves the
//! current one and tries the candidate beside it; and guards the candidate:
//! when its calls do worse than the current's by more than `[policy.rollout]`
//! allows, or it keeps faulting, this gateway writes the rollback (one
//! compare-and-swap; the others follow through their watch). A candidate
//! that stayed within its guards for `--auto-promote-after` is promoted
//! the same way.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::candidate::{ArmSnapshot, Candidate, Trial};
use super::set::PolicySet;
use super::version::PolicyVersion;
use crate::discovery::etcd::{connect_until, EtcdAccess};
use crate::discovery::fleet::{self, Manifest, Mode, RolloutState};
use crate::discovery::policies::Published;

/// When a candidate is rolled back (`[policy.rollout]`).
#[derive(Debug, Clone)]
pub struct Guards {
    /// The candidate's server-side error rate may exceed the current's by
    /// at most this much (0.05: five points).
    pub max_error_rate_increase: f64,
    /// The candidate's p99 may exceed the current's by at most this
    /// fraction (0.5: half again), beyond what chance gives.
    pub max_p99_increase: f64,
    /// Calls the candidate must have placed in the window before its
    /// figures are judged.
    pub min_calls: u64,
    /// The span the two are compared over.
    pub window: Duration,
    /// Candidate faults (picks that trapped, overran or erred) in the window
    /// that roll it back.
    pub max_candidate_faults: u64,
}

impl Default for Guards {
    fn default() -> Self {
        Guards {
            max_error_rate_increase: 0.05,
            max_p99_increase: 0.5,
            min_calls: 100,
            window: Duration::from_secs(30),
            max_candidate_faults: 10,
        }
    }
}

/// Calls each version must place in the window before their p99s are
/// compared (the error rate needs only `min_calls`).
pub const P99_MIN_CALLS: u64 = 500;

/// How often the guards look at the figures.
const GUARD_EVERY: Duration = Duration::from_secs(1);

/// How long a version that could not be fetched or checked waits before
/// the next try.
const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Starts following the rollout states under `prefix` and guarding their
/// candidates. `gateway` names this gateway in the states it writes.
pub fn spawn(
    set: Arc<PolicySet>,
    access: EtcdAccess,
    prefix: String,
    states: watch::Receiver<Published>,
    guards: watch::Receiver<Guards>,
    gateway: String,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(client) = connect_until(&access, &cancel).await else {
            return;
        };
        let follow = follow_states(
            set.clone(),
            client.clone(),
            prefix.clone(),
            states,
            cancel.clone(),
        );
        let guard = guard_candidates(set, client, prefix, guards, gateway, cancel);
        tokio::join!(follow, guard);
    })
}

/// Versions by policy name and digest: compiled ones (a promotion swaps in
/// the very version the candidate was, no compile), and refused ones with
/// why (not fetched and compiled again while a state names them).
#[derive(Default)]
struct Prepared {
    ready: HashMap<(String, String), Arc<PolicyVersion>>,
    refused: HashMap<(String, String), String>,
}

async fn follow_states(
    set: Arc<PolicySet>,
    mut client: Client,
    prefix: String,
    mut states: watch::Receiver<Published>,
    cancel: CancellationToken,
) {
    let mut prepared = Prepared::default();
    // The last state applied per name (so a re-list changes nothing).
    let mut applied: HashMap<String, RolloutState> = HashMap::new();
    loop {
        let latest = states.borrow_and_update().clone();
        let mut all_applied = true;
        for update in latest.values() {
            let name = &update.name;
            let state = match fleet::parse_rollout(&update.key, &update.bytes) {
                Ok(state) => state,
                Err(err) => {
                    tracing::warn!(cause = %err, "rollout state skipped");
                    continue;
                }
            };
            if applied.get(name) == Some(&state) {
                continue;
            }
            match apply(&set, &mut client, &prefix, name, &state, &mut prepared).await {
                Ok(()) => {
                    applied.insert(name.clone(), state);
                }
                Err(err) => {
                    all_applied = false;
                    tracing::warn!(policy = %name, cause = %err, retry_in = ?RETRY_AFTER, "rollout state not applied yet");
                }
            }
        }
        // A deleted state ends its trial; the current version keeps serving.
        for (name, _) in applied
            .iter()
            .filter(|(n, _)| !latest.values().any(|u| &u.name == *n))
        {
            if let Some(current) = set.policy(name).and_then(|p| p.current()) {
                apply_off_runtime(&set, name, current, None).await;
            }
        }
        applied.retain(|n, _| latest.values().any(|u| &u.name == n));
        // Keep only what some state still names.
        let named = |(name, digest): &(String, String)| {
            latest.values().any(|u| {
                &u.name == name
                    && fleet::parse_rollout(&u.key, &u.bytes).is_ok_and(|s| {
                        s.current.as_deref() == Some(digest.as_str())
                            || s.candidate.as_deref() == Some(digest.as_str())
                    })
            })
        };
        prepared.ready.retain(|key, _| named(key));
        prepared.refused.retain(|key, _| named(key));
        let retry = async {
            if all_applied {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(RETRY_AFTER).await
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = states.changed() => if changed.is_err() { return },
            _ = retry => {}
        }
    }
}

/// Why a state could not be applied (yet).
#[derive(Debug, thiserror::Error)]
enum ApplyError {
    #[error(transparent)]
    Fleet(#[from] fleet::FleetError),
    #[error("version {digest} does not install: {cause}")]
    Refused { digest: String, cause: String },
}

async fn apply(
    set: &Arc<PolicySet>,
    client: &mut Client,
    prefix: &str,
    name: &str,
    state: &RolloutState,
    prepared: &mut Prepared,
) -> Result<(), ApplyError> {
    let Some(current_digest) = &state.current else {
        return Ok(()); // nothing named to run yet
    };
    let current = match prepare(set, client, prefix, name, current_digest, prepared).await {
        Ok(current) => current,
        Err(err) => {
            // What serves keeps serving; a candidate of an older state is
            // no longer this state's to try.
            if let Some(serving) = set.policy(name).and_then(|p| p.current()) {
                apply_off_runtime(set, name, serving, None).await;
            }
            return Err(err);
        }
    };
    let (candidate, outcome) = match (&state.candidate, state.mode) {
        (Some(digest), Mode::Shadow | Mode::Canary) => {
            match prepare(set, client, prefix, name, digest, prepared).await {
                Ok(version) => {
                    let trial = Trial {
                        mode: state.mode,
                        percent: state.percent,
                        auto_promote_after_secs: state.auto_promote_after_secs,
                        since_secs: state.candidate_since,
                    };
                    (Some((version, trial)), Ok(()))
                }
                // The current serves alone until the candidate installs.
                Err(err) => (None, Err(err)),
            }
        }
        _ => (None, Ok(())),
    };
    apply_off_runtime(set, name, current, candidate).await;
    outcome
}

/// [`PolicySet::apply_rollout`] on a blocking thread (a state hand-over
/// makes guest calls and may wait for an instance).
async fn apply_off_runtime(
    set: &Arc<PolicySet>,
    name: &str,
    current: Arc<PolicyVersion>,
    candidate: Option<(Arc<PolicyVersion>, Trial)>,
) {
    let (set, name) = (set.clone(), name.to_owned());
    let applied = tokio::task::spawn_blocking(move || set.apply_rollout(&name, current, candidate));
    if let Err(err) = applied.await {
        tracing::error!(cause = %err, "applying a rollout state failed");
    }
}

/// The compiled version `digest` of `name`: from `prepared`, or fetched
/// from etcd and checked (compiling it off the runtime's threads).
async fn prepare(
    set: &Arc<PolicySet>,
    client: &mut Client,
    prefix: &str,
    name: &str,
    digest: &str,
    prepared: &mut Prepared,
) -> Result<Arc<PolicyVersion>, ApplyError> {
    let key = (name.to_owned(), digest.to_owned());
    if let Some(version) = prepared.ready.get(&key) {
        return Ok(version.clone());
    }
    if let Some(cause) = prepared.refused.get(&key) {
        return Err(ApplyError::Refused {
            digest: digest.to_owned(),
            cause: cause.clone(),
        });
    }
    let refuse = |prepared: &mut Prepared, cause: String| {
        prepared.refused.insert(key.clone(), cause.clone());
        ApplyError::Refused {
            digest: digest.to_owned(),
            cause,
        }
    };
    let manifest: Manifest = fleet::resolve(client, prefix, name, digest).await?;
    let limit = set.engine().limits().max_component_bytes as u64;
    if manifest.size > limit {
        let cause = format!(
            "{} bytes, over the {limit}-byte limit ([policy] max_size_mib)",
            manifest.size
        );
        return Err(refuse(prepared, cause));
    }
    let bytes = fleet::fetch(client, prefix, &manifest).await?;
    let source = fleet::manifest_key(prefix, name, digest);
    let (checker, owned_name) = (set.clone(), name.to_owned());
    let signature = manifest.signature.clone();
    let checked = tokio::task::spawn_blocking(move || {
        checker.prepare_published(
            &owned_name,
            &bytes,
            signature.as_deref().map(str::as_bytes),
            source,
        )
    })
    .await;
    match checked {
        Ok(Ok(version)) => {
            prepared.ready.insert(key, version.clone());
            Ok(version)
        }
        // Refused for a reason the same bytes would meet again: remembered.
        Ok(Err(err)) if err.is_final() => Err(refuse(prepared, err.to_string())),
        Ok(Err(err)) => Err(ApplyError::Refused {
            digest: digest.to_owned(),
            cause: err.to_string(),
        }),
        Err(err) => Err(ApplyError::Refused {
            digest: digest.to_owned(),
            cause: err.to_string(),
        }),
    }
}

/// One candidate's figures over time, to compare over the guard window.
struct Watched {
    candidate: Arc<Candidate>,
    /// (when, current, candidate, candidate faults), oldest first.
    snapshots: VecDeque<(tokio::time::Instant, ArmSnapshot, ArmSnapshot, u64)>,
}

async fn guard_candidates(
    set: Arc<PolicySet>,
    mut client: Client,
    prefix: String,
    guards: watch::Receiver<Guards>,
    gateway: String,
    cancel: CancellationToken,
) {
    let mut watched: BTreeMap<String, Watched> = BTreeMap::new();
    let mut tick = tokio::time::interval(GUARD_EVERY);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        // The guards in force now (a configuration reload changes them).
        let guards = guards.borrow().clone();
        let now = tokio::time::Instant::now();
        for name in set.names() {
            let Some(candidate) = set.policy(&name).and_then(|p| p.candidate()) else {
                watched.remove(&name);
                continue;
            };
            let entry = watched.entry(name.clone()).or_insert_with(|| Watched {
                candidate: candidate.clone(),
                snapshots: VecDeque::new(),
            });
            if !Arc::ptr_eq(&entry.candidate, &candidate) {
                *entry = Watched {
                    candidate: candidate.clone(),
                    snapshots: VecDeque::new(),
                };
            }
            let stats = &candidate.stats;
            let faults = stats.candidate_faults.load(Ordering::Relaxed);
            entry.snapshots.push_back((
                now,
                stats.current.snapshot(),
                stats.candidate.snapshot(),
                faults,
            ));
            while entry.snapshots.len() > 1 && now - entry.snapshots[0].0 > guards.window {
                entry.snapshots.pop_front();
            }
            let (_, cur0, cand0, faults0) = entry.snapshots[0];
            let (_, cur1, cand1, faults1) = *entry.snapshots.back().expect("just pushed");
            let verdict = judge(
                &guards,
                &cur1.since(&cur0),
                &cand1.since(&cand0),
                faults1 - faults0,
                candidate.withdrawn.load(Ordering::Relaxed),
            );
            let digest = candidate.version.digest.clone();
            if let Some(why) = verdict {
                tracing::warn!(policy = %name, candidate = %digest, reason = %why, "rollout guard: rolling the candidate back across the fleet");
                let by = gateway.clone();
                let changed = fleet::change_rollout(&mut client, &prefix, &name, |state| {
                    let state = state.cloned().unwrap_or_default();
                    if !same_trial(&state, &candidate) {
                        return Err("already changed".into());
                    }
                    state.rollback(&by, &format!("guard on {by}: {why}"))
                })
                .await;
                if let Err(err) = changed {
                    tracing::debug!(policy = %name, cause = %err, "rollback not written (another writer first, or etcd unreachable)");
                }
                continue;
            }
            if let Some(after) = auto_promote_due(&candidate) {
                let window = cand1.since(&cand0);
                let judged = candidate.mode == Mode::Shadow || window.calls >= guards.min_calls;
                if judged {
                    let by = gateway.clone();
                    let changed = fleet::change_rollout(&mut client, &prefix, &name, |state| {
                        let state = state.cloned().unwrap_or_default();
                        if !same_trial(&state, &candidate) {
                            return Err("already changed".into());
                        }
                        state.promote(
                            &by,
                            &format!("auto-promoted by {by} after {after}s within its guards"),
                        )
                    })
                    .await;
                    match changed {
                        Ok(_) => {
                            tracing::info!(policy = %name, candidate = %digest, "rollout: candidate promoted after staying within its guards")
                        }
                        Err(err) => {
                            tracing::debug!(policy = %name, cause = %err, "promotion not written")
                        }
                    }
                }
            }
        }
    }
}

/// Why the candidate's window is worse than the guards allow, if it is.
pub fn judge(
    guards: &Guards,
    current: &ArmSnapshot,
    candidate: &ArmSnapshot,
    candidate_faults: u64,
    withdrawn: bool,
) -> Option<String> {
    if withdrawn || candidate_faults >= guards.max_candidate_faults.max(1) {
        return Some(format!(
            "the candidate faulted {candidate_faults} times in {:?}",
            guards.window
        ));
    }
    if candidate.calls < guards.min_calls.max(1) {
        return None;
    }
    let (cand_rate, cur_rate) = (candidate.error_rate(), current.error_rate());
    if cand_rate - cur_rate > guards.max_error_rate_increase {
        return Some(format!(
            "error rate {:.1}% over {} calls against the current's {:.1}% (guard: +{:.1} points)",
            cand_rate * 100.0,
            candidate.calls,
            cur_rate * 100.0,
            guards.max_error_rate_increase * 100.0
        ));
    }
    // A p99 of a few dozen calls is its slowest call: compared only once
    // both versions placed enough calls for a p99 to mean something.
    let p99_calls = guards.min_calls.max(P99_MIN_CALLS);
    if candidate.calls < p99_calls || current.calls < p99_calls {
        return None;
    }
    // The line: the current's p99 (a bucket's upper bound) raised by the
    // allowed fraction; calls at or over it are those of buckets starting
    // at or above it, so the guard acts at +0 to +12.5 % more than asked.
    let cur_p99_us = current.quantile_us(0.99)?;
    let line_us = (cur_p99_us as f64 * (1.0 + guards.max_p99_increase)).ceil() as u64;
    let over = candidate.calls_from_us(line_us);
    if slower_than_chance(
        over,
        candidate.calls,
        current.calls_from_us(line_us),
        current.calls,
    ) {
        let ms = |us: u64| us as f64 / 1000.0;
        let cand_p99 = candidate.quantile_us(0.99).unwrap_or(line_us);
        return Some(format!(
            "p99 {:.1} ms against the current's {:.1} ms (guard: +{:.0}%; {over} of {} calls at {:.1} ms or more)",
            ms(cand_p99),
            ms(cur_p99_us),
            guards.max_p99_increase * 100.0,
            candidate.calls,
            ms(line_us),
        ));
    }
    None
}

/// The candidate's p99 is over the line — more than 1 % of its calls are
/// — and more of its calls are than of the current's by more than chance:
/// three standard errors of the difference of the two shares.
///
/// Two p99s of a thousand calls of one distribution differ by half by
/// chance, more so on a busy host (the same code, canary against current:
/// 2.0 ms against 1.5 ms seen, and rolled back). A burst of slow calls
/// lands on both versions alike, so the current's share over the same
/// line is the yardstick. The price: a window of a few hundred calls
/// catches only a large regression (every call 2x slower: about half the
/// looks at 500 calls each, most at 1,000); the guard looks every second,
/// and a window fills.
fn slower_than_chance(cand_slower: u64, cand_calls: u64, cur_slower: u64, cur_calls: u64) -> bool {
    let (n_c, n_k) = (cand_calls as f64, cur_calls as f64);
    let (p_c, p_k) = (cand_slower as f64 / n_c, cur_slower as f64 / n_k);
    if p_c <= 0.01 {
        return false;
    }
    let pooled = (cand_slower + cur_slower) as f64 / (n_c + n_k);
    let standard_error = (pooled * (1.0 - pooled) * (1.0 / n_c + 1.0 / n_k)).sqrt();
    p_c - p_k > 3.0 * standard_error
}

/// The candidate's auto-promotion delay in seconds, once it has passed.
fn auto_promote_due(candidate: &Candidate) -> Option<u64> {
    let after = candidate.auto_promote_after_secs?;
    let since = candidate.since_secs;
    (fleet::now_secs() >= since.saturating_add(after)).then_some(after)
}

/// The state in etcd still tries the very trial this gateway judged (same
/// version, mode and start): a guard never ends a newer trial of the same
/// version on figures of an older one.
fn same_trial(state: &RolloutState, candidate: &Candidate) -> bool {
    state.candidate.as_deref() == Some(candidate.version.digest.as_str())
        && state.mode == candidate.mode
        && state.candidate_since == candidate.since_secs
}

/// This gateway's view of every rollout, for `<prefix>/_gateways/<id>`.
pub fn report(set: &PolicySet) -> serde_json::Value {
    let mut policies = serde_json::Map::new();
    for name in set.names() {
        let Some(policy) = set.policy(&name) else {
            continue;
        };
        let current = policy.current().map(|v| v.digest.clone());
        let candidate = policy.candidate();
        let mut entry = serde_json::json!({ "current": current });
        if let Some(c) = candidate {
            let s = &c.stats;
            entry["candidate"] = c.version.digest.clone().into();
            entry["mode"] = c.mode.as_str().into();
            entry["percent"] = c.percent.into();
            entry["calls"] = serde_json::json!({
                "current": s.current.snapshot().to_json(),
                "candidate": s.candidate.snapshot().to_json(),
            });
            entry["shadowed"] = s.shadowed.load(Ordering::Relaxed).into();
            entry["divergent"] = s.divergent.load(Ordering::Relaxed).into();
            entry["candidate_faults"] = s.candidate_faults.load(Ordering::Relaxed).into();
            entry["withdrawn"] = c.withdrawn.load(Ordering::Relaxed).into();
        } else {
            entry["mode"] = "steady".into();
        }
        policies.insert(name, entry);
    }
    serde_json::Value::Object(policies)
}

/// `weir_policy_rollout_*`: each rollout's figures on this gateway, read at
/// scrape time from the candidates (nothing counted twice on the hot path).
/// They count from the moment the candidate was set, and start over with
/// the next candidate.
pub struct RolloutMetrics(pub Arc<PolicySet>);

impl std::fmt::Debug for RolloutMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RolloutMetrics")
    }
}

impl prometheus_client::collector::Collector for RolloutMetrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use crate::metrics::{encode_counters, encode_gauges, PolicyLabel, RolloutLabels};
        let mut calls = Vec::new();
        let mut failures = Vec::new();
        let mut divergent = Vec::new();
        let mut faults = Vec::new();
        let mut share = Vec::new();
        for name in self.0.names() {
            let Some(candidate) = self.0.policy(&name).and_then(|p| p.candidate()) else {
                continue;
            };
            let s = &candidate.stats;
            for (version, arm) in [("current", &s.current), ("candidate", &s.candidate)] {
                let snap = arm.snapshot();
                let labels = RolloutLabels {
                    policy: name.clone(),
                    version,
                };
                calls.push((labels.clone(), snap.calls));
                failures.push((labels, snap.failures));
            }
            let policy = PolicyLabel {
                policy: name.clone(),
            };
            divergent.push((policy.clone(), s.divergent.load(Ordering::Relaxed)));
            faults.push((policy.clone(), s.candidate_faults.load(Ordering::Relaxed)));
            let placed = match candidate.mode {
                Mode::Canary => candidate.percent,
                _ => 0.0,
            };
            share.push((policy, placed));
        }
        encode_counters(&mut encoder, "rollout_calls", "calls placed during a rollout, by policy and by the version that placed them (current, candidate)", calls)?;
        encode_counters(&mut encoder, "rollout_failures", "those calls that failed on the server's side (UNKNOWN, DEADLINE_EXCEEDED, INTERNAL, UNAVAILABLE, DATA_LOSS)", failures)?;
        encode_counters(
            &mut encoder,
            "rollout_divergent_picks",
            "shadow mode: calls where the candidate picked another endpoint than the current",
            divergent,
        )?;
        encode_counters(
            &mut encoder,
            "rollout_candidate_faults",
            "picks of the candidate that faulted (the current placed the call)",
            faults,
        )?;
        encode_gauges(
            &mut encoder,
            "rollout_canary_percent",
            "the candidate's share of calls in canary mode (0 in shadow)",
            share,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::candidate::ArmStats;

    /// An arm that placed `calls` calls of each (count, latency ms).
    fn arm(calls: &[(u64, f64)]) -> ArmSnapshot {
        let stats = ArmStats::default();
        for &(count, ms) in calls {
            for _ in 0..count {
                stats.record(0, (ms * 1000.0) as u32);
            }
        }
        stats.snapshot()
    }

    fn guards() -> Guards {
        Guards {
            min_calls: 20,
            ..Guards::default()
        }
    }

    #[test]
    fn the_same_latencies_are_never_rolled_back() {
        let both = arm(&[(980, 0.4), (15, 1.5), (5, 9.0)]);
        assert_eq!(judge(&guards(), &both, &both, 0, false), None);
    }

    #[test]
    fn a_few_more_slow_calls_than_the_current_by_chance_are_not_a_regression() {
        // The current's p99 is its 990th call (0.4 ms); the candidate's is
        // one of its 20 slow ones (2 ms): five times as slow, yet 20 of
        // 1,000 against 10 of 1,000 is what a burst shared by chance gives.
        let current = arm(&[(990, 0.4), (10, 2.0)]);
        let candidate = arm(&[(980, 0.4), (20, 2.0)]);
        assert!(candidate.quantile_ms(0.99).unwrap() > 1.5 * current.quantile_ms(0.99).unwrap());
        assert_eq!(judge(&guards(), &current, &candidate, 0, false), None);
    }

    #[test]
    fn a_candidate_slower_in_its_tail_or_throughout_is_rolled_back() {
        let current = arm(&[(990, 0.4), (10, 2.0)]);
        let tail = arm(&[(900, 0.4), (100, 2.0)]);
        let why = judge(&guards(), &current, &tail, 0, false).expect("rolled back");
        assert!(
            why.starts_with(
                "p99 2.0 ms against the current's 0.4 ms (guard: +50%; 100 of 1000 calls at 0.6 ms or more)"
            ),
            "{why}"
        );
        let throughout = arm(&[(1000, 0.9)]);
        assert!(judge(&guards(), &current, &throughout, 0, false).is_some());
    }

    #[test]
    fn the_margin_is_three_standard_errors_of_the_two_shares() {
        // 0 of 1,000 over the line for the current: the candidate's share
        // must pass 3 SE of the pooled difference (11 of 1,000 do, 10 not:
        // 1 % is not over 1 %).
        let current = arm(&[(1000, 0.4)]);
        assert_eq!(
            judge(
                &guards(),
                &current,
                &arm(&[(990, 0.4), (10, 2.0)]),
                0,
                false
            ),
            None
        );
        assert!(judge(
            &guards(),
            &current,
            &arm(&[(989, 0.4), (11, 2.0)]),
            0,
            false
        )
        .is_some());
        // Unequal arms (a 10 % canary): 5 of 4,500 for the current. 5 of
        // the candidate's 500 are past chance but only 1 %: its p99 is not
        // over the line. 6 are.
        let current = arm(&[(4495, 0.4), (5, 2.0)]);
        assert_eq!(
            judge(&guards(), &current, &arm(&[(495, 0.4), (5, 2.0)]), 0, false),
            None,
            "5 of 500: its p99 is within the line"
        );
        assert!(judge(&guards(), &current, &arm(&[(494, 0.4), (6, 2.0)]), 0, false).is_some());
    }

    #[test]
    fn p99s_of_too_few_calls_are_not_compared() {
        let current = arm(&[(400, 0.4)]);
        let candidate = arm(&[(400, 5.0)]);
        assert_eq!(judge(&guards(), &current, &candidate, 0, false), None);
    }
}
