//! Named policies, each one whose current version is swapped atomically.
//! Calls in flight keep the version they loaded; a new one is compiled and
//! checked off the hot path before it is swapped in.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use arc_swap::ArcSwapOption;

use super::candidate::{Candidate, Trial, PLACED_BY_CANDIDATE};
use super::engine::PolicyEngine;
use super::provenance::{Provenance, Refusal};
use super::version::PolicyVersion;
use super::PolicyError;
use crate::balance::{Balancer, Outcome, PickContext, PickError};
use crate::config::valid_policy_name as valid_name;
use crate::metrics::PolicyMetrics;

/// One pick in this many is timed for `weir_policy_pick_duration_seconds`.
const TIMED_EVERY: u64 = 32;

pub struct NamedPolicy {
    pub name: Arc<str>,
    current: ArcSwapOption<PolicyVersion>,
    last_good: ArcSwapOption<PolicyVersion>,
    last_error: Mutex<Option<String>>,
    /// A version tried beside the current one (a fleet rollout).
    candidate: ArcSwapOption<Candidate>,
}

impl NamedPolicy {
    pub fn current(&self) -> Option<Arc<PolicyVersion>> {
        self.current.load_full()
    }

    pub fn candidate(&self) -> Option<Arc<Candidate>> {
        self.candidate.load_full()
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().expect("last error").clone()
    }
}

pub struct PolicySet {
    engine: Arc<PolicyEngine>,
    policies: RwLock<HashMap<Arc<str>, Arc<NamedPolicy>>>,
    metrics: PolicyMetrics,
    dir: Option<PathBuf>,
    /// Replaced by a configuration reload; judges what is installed after.
    provenance: arc_swap::ArcSwap<Provenance>,
}

impl PolicySet {
    pub fn new(engine: Arc<PolicyEngine>, dir: Option<PathBuf>, metrics: PolicyMetrics) -> Self {
        PolicySet {
            engine,
            policies: RwLock::new(HashMap::new()),
            metrics,
            dir,
            provenance: arc_swap::ArcSwap::from_pointee(Provenance::default()),
        }
    }

    /// Sets which names may come from etcd and whose signatures count.
    pub fn with_provenance(self, provenance: Provenance) -> Self {
        self.set_provenance(provenance);
        self
    }

    /// Judges components installed from now on by `provenance` (those
    /// serving stay: a reload never takes a working policy away).
    pub fn set_provenance(&self, provenance: Provenance) {
        self.provenance.store(Arc::new(provenance));
    }

    pub fn engine(&self) -> &Arc<PolicyEngine> {
        &self.engine
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Installs every `*.wasm` of the policy directory; returns the failures.
    pub fn load_dir(&self) -> Vec<(String, PolicyError)> {
        let Some(dir) = &self.dir else {
            return Vec::new();
        };
        let mut failures = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(source) => {
                return vec![(
                    dir.display().to_string(),
                    PolicyError::Read {
                        path: dir.clone(),
                        source,
                    },
                )]
            }
        };
        let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        paths.sort();
        for path in paths {
            if let Some(name) = policy_name(&path) {
                if let Err(err) = self.install_file(&name, &path) {
                    failures.push((name, err));
                }
            }
        }
        failures
    }

    pub fn install_file(&self, name: &str, path: &Path) -> Result<Arc<PolicyVersion>, PolicyError> {
        let limit = self.engine.limits().max_component_bytes;
        let bytes = std::fs::metadata(path)
            .and_then(|m| {
                if m.len() > limit as u64 {
                    return Ok(Err(PolicyError::TooLarge {
                        size: usize::try_from(m.len()).unwrap_or(usize::MAX),
                        limit,
                    }));
                }
                std::fs::read(path).map(Ok)
            })
            .map_err(|source| PolicyError::Read {
                path: path.to_owned(),
                source,
            })
            .and_then(|read| read);
        // The signature, if any, sits beside the component: FILE.wasm.sig.
        let mut sig_path = path.as_os_str().to_owned();
        sig_path.push(".sig");
        let signature = std::fs::read(&sig_path).ok();
        match bytes {
            Ok(bytes) => self.install_signed(
                name,
                &bytes,
                signature.as_deref(),
                path.display().to_string(),
            ),
            Err(err) => Err(self.failed(name, err)),
        }
    }

    /// Installs a version published in etcd under `key`, if its name is
    /// allowed there. A name that is not allowed makes no state here (the
    /// prefix's writers choose names): it is logged and counted only.
    pub fn install_published(
        &self,
        name: &str,
        bytes: &[u8],
        signature: Option<&[u8]>,
        key: String,
    ) -> Result<Arc<PolicyVersion>, PolicyError> {
        self.allowed_from_etcd(name, &key)?;
        self.install_signed(name, bytes, signature, key)
    }

    /// Refuses a name `[policy] allow` does not let etcd publish. It makes
    /// no state here (the prefix's writers choose names): it is logged and
    /// counted only.
    fn allowed_from_etcd(&self, name: &str, source: &str) -> Result<(), PolicyError> {
        if self.provenance.load().allows(name) {
            return Ok(());
        }
        let refusal = Refusal::NotAllowed(name.to_owned());
        self.count_refusal(&refusal);
        tracing::warn!(source, cause = %refusal, "policy in etcd ignored");
        Err(refusal.into())
    }

    /// Checks a version a fleet rollout names (its name allowed from etcd,
    /// its signature, the component and a trial pick) without serving it.
    /// Blocking: it compiles.
    pub fn prepare_published(
        &self,
        name: &str,
        bytes: &[u8],
        signature: Option<&[u8]>,
        source: String,
    ) -> Result<Arc<PolicyVersion>, PolicyError> {
        self.allowed_from_etcd(name, &source)?;
        let digest = super::version::digest_bytes(bytes);
        if let Err(refusal) = self.provenance.load().check(&digest, signature) {
            self.count_refusal(&refusal);
            return Err(self.failed(name, refusal.into()));
        }
        super::validate(&self.engine, name, bytes, source).map_err(|err| self.failed(name, err))
    }

    /// Serves `current` for `name` and tries `candidate` beside it (its
    /// mode and canary share), or none. A candidate kept as it was keeps its
    /// figures; a promoted candidate is the very version that was tried
    /// (compiled once), given the learned state of the version it replaces
    /// (which placed most calls). Blocking (guest calls): call it off the
    /// runtime's threads.
    pub fn apply_rollout(
        &self,
        name: &str,
        current: Arc<PolicyVersion>,
        candidate: Option<(Arc<PolicyVersion>, Trial)>,
    ) {
        let policy = self.policy_or_create(name);
        let serving = policy.current();
        if serving.as_ref().is_none_or(|v| !Arc::ptr_eq(v, &current)) {
            self.hand_over(name, serving.as_deref(), &current);
            let old = policy.current.swap(Some(current.clone()));
            if old.is_some() {
                policy.last_good.store(old);
            }
            *policy.last_error.lock().expect("last error") = None;
            self.metrics.reload(name, "ok");
            tracing::info!(policy = name, digest = %current.digest, source = %current.source, "policy version installed (rollout: current)");
        }
        let tried = policy.candidate();
        match candidate {
            None => {
                if let Some(was) = tried {
                    policy.candidate.store(None);
                    tracing::info!(policy = name, candidate = %was.version.digest, "rollout candidate no longer tried");
                }
            }
            Some((version, trial)) => {
                let unchanged = tried.as_ref().is_some_and(|t| {
                    Arc::ptr_eq(&t.version, &version)
                        && t.mode == trial.mode
                        && t.percent == trial.percent
                        && t.since_secs == trial.since_secs
                        && t.auto_promote_after_secs == trial.auto_promote_after_secs
                });
                if !unchanged {
                    tracing::info!(policy = name, candidate = %version.digest, mode = trial.mode.as_str(), percent = trial.percent, "rollout candidate tried");
                    policy
                        .candidate
                        .store(Some(Arc::new(Candidate::new(version, &trial))));
                }
            }
        }
    }

    /// Moves the learned state of the version serving `name` to the one
    /// about to replace it, when both carry state (`stateful-balancer`).
    /// The calls placed between the two steps are not in it.
    fn hand_over(&self, name: &str, from: Option<&PolicyVersion>, to: &PolicyVersion) {
        let Some(from) = from.filter(|f| f.carries_state && to.carries_state) else {
            return;
        };
        let states = from.export_states(&self.engine);
        let taken = to.import_states(&self.engine, &states);
        tracing::info!(policy = name, from = %from.digest, to = %to.digest, instances = taken, "learned state handed to the new version");
    }

    fn count_refusal(&self, refusal: &Refusal) {
        self.metrics
            .refused
            .get_or_create(&crate::metrics::ReasonLabel {
                reason: refusal.reason(),
            })
            .inc();
    }

    /// Compiles, checks and swaps in a new version of `name`. Blocking (it
    /// compiles): call it off the hot path. On failure the old version keeps
    /// serving and the reason is logged, counted and kept for the admin view.
    pub fn install(
        &self,
        name: &str,
        bytes: &[u8],
        source: String,
    ) -> Result<Arc<PolicyVersion>, PolicyError> {
        self.install_signed(name, bytes, None, source)
    }

    /// [`install`](Self::install) with the component's signature (the text
    /// of its `.sig`), checked against `[policy] trusted_keys` first.
    pub fn install_signed(
        &self,
        name: &str,
        bytes: &[u8],
        signature: Option<&[u8]>,
        source: String,
    ) -> Result<Arc<PolicyVersion>, PolicyError> {
        if let Some(current) = self.policy(name).and_then(|s| s.current()) {
            if current.digest == super::version::digest(bytes) {
                return Ok(current); // the same bytes again (a touch, a re-list)
            }
        }
        let digest = super::version::digest_bytes(bytes);
        if let Err(refusal) = self.provenance.load().check(&digest, signature) {
            self.count_refusal(&refusal);
            return Err(self.failed(name, refusal.into()));
        }
        let outcome = super::validate(&self.engine, name, bytes, source);
        match outcome {
            Ok(version) => {
                let policy = self.policy_or_create(name);
                self.hand_over(name, policy.current().as_deref(), &version);
                let old = policy.current.swap(Some(version.clone()));
                if old.is_some() {
                    policy.last_good.store(old);
                }
                *policy.last_error.lock().expect("last error") = None;
                self.metrics.reload(name, "ok");
                tracing::info!(policy = name, digest = %version.digest, source = %version.source, "policy version installed");
                Ok(version)
            }
            Err(err) => Err(self.failed(name, err)),
        }
    }

    fn failed(&self, name: &str, err: PolicyError) -> PolicyError {
        self.metrics.reload(name, "failed");
        tracing::warn!(policy = name, cause = %err, "policy not installed; the previous version keeps serving");
        if let Some(policy) = self.policy(name) {
            *policy.last_error.lock().expect("last error") = Some(err.to_string());
        } else if valid_name(name) {
            *self
                .policy_or_create(name)
                .last_error
                .lock()
                .expect("last error") = Some(err.to_string());
        }
        err
    }

    /// Takes `name`'s version out of service when it came from `source`
    /// (its etcd key was deleted): calls on its routes use the native
    /// round-robin until a version is published again.
    pub fn remove(&self, name: &str, source: &str) {
        let Some(policy) = self.policy(name) else {
            return;
        };
        let current = policy.current();
        if current.as_ref().is_none_or(|v| v.source != source) {
            return; // served from elsewhere (a file): not this key's to remove
        }
        policy.current.store(None);
        policy.last_good.store(None);
        *policy.last_error.lock().expect("last error") =
            Some(format!("removed: {source} was deleted"));
        self.metrics.reload(name, "removed");
        tracing::info!(
            policy = name,
            key = source,
            "policy removed: its etcd key was deleted; its routes use round-robin"
        );
    }

    pub fn policy(&self, name: &str) -> Option<Arc<NamedPolicy>> {
        self.policies
            .read()
            .expect("policy set poisoned")
            .get(name)
            .cloned()
    }

    fn policy_or_create(&self, name: &str) -> Arc<NamedPolicy> {
        if let Some(policy) = self.policy(name) {
            return policy;
        }
        let mut policies = self.policies.write().expect("policy set poisoned");
        policies
            .entry(name.into())
            .or_insert_with(|| {
                Arc::new(NamedPolicy {
                    name: name.into(),
                    current: ArcSwapOption::empty(),
                    last_good: ArcSwapOption::empty(),
                    last_error: Mutex::new(None),
                    candidate: ArcSwapOption::empty(),
                })
            })
            .clone()
    }

    /// Names with a version serving, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .policies
            .read()
            .expect("policy set poisoned")
            .values()
            .filter(|s| s.current().is_some())
            .map(|s| s.name.to_string())
            .collect();
        names.sort();
        names
    }

    /// True when `name` has a version serving.
    pub fn has(&self, name: &str) -> bool {
        self.policy(name).is_some_and(|s| s.current().is_some())
    }

    /// The balancer for routes naming `name` (its policy is created empty if
    /// needed, and filled when a version arrives).
    pub fn balancer(&self, name: &str) -> Arc<dyn Balancer> {
        let label = crate::metrics::PolicyLabel {
            policy: name.to_owned(),
        };
        Arc::new(WasmBalancer {
            policy: self.policy_or_create(name),
            engine: self.engine.clone(),
            picks: self.metrics.picks.get_or_create(&label).clone(),
            pick_duration: self.metrics.pick_duration.get_or_create(&label).clone(),
            metrics: self.metrics.clone(),
        })
    }

    /// Every policy, for the admin view.
    pub fn describe(&self) -> serde_json::Value {
        let policies: BTreeMap<Arc<str>, Arc<NamedPolicy>> = self
            .policies
            .read()
            .expect("policy set poisoned")
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let policies: serde_json::Map<String, serde_json::Value> = policies
            .iter()
            .map(|(name, policy)| {
                let v = policy.current();
                let version = v.as_ref().map(|v| {
                    serde_json::json!({
                        "digest": v.digest,
                        "source": v.source,
                        "loaded_at_unix": v.loaded_at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                        "picks": v.picks.sum(),
                        "faults": v.faults.load(std::sync::atomic::Ordering::Relaxed),
                        "reads_call": v.reads_call,
                        "learns_from_outcomes": v.learns_from_outcomes,
                        "carries_state": v.carries_state,
                    })
                });
                let candidate = policy.candidate().map(|c| {
                    serde_json::json!({
                        "digest": c.version.digest,
                        "mode": c.mode.as_str(),
                        "percent": c.percent,
                        "withdrawn": c.withdrawn.load(Ordering::Relaxed),
                    })
                });
                (name.to_string(), serde_json::json!({ "current": version, "candidate": candidate, "last_error": policy.last_error() }))
            })
            .collect();
        serde_json::json!({
            "dir": self.dir.as_ref().map(|d| d.display().to_string()),
            "limits": { "deadline_us": self.engine.limits().deadline.as_micros() as u64, "memory_bytes": self.engine.limits().memory_bytes },
            "policies": policies,
        })
    }
}

/// `dir/<name>.wasm` → `name`.
pub fn policy_name(path: &Path) -> Option<String> {
    if path.extension()? != "wasm" {
        return None;
    }
    let stem = path.file_stem()?.to_str()?;
    valid_name(stem).then(|| stem.to_owned())
}

/// A policy behind the `Balancer` seam. Its metric handles are made once.
pub struct WasmBalancer {
    policy: Arc<NamedPolicy>,
    engine: Arc<PolicyEngine>,
    picks: crate::metrics::SpreadCounter,
    pick_duration: prometheus_client::metrics::histogram::Histogram,
    metrics: PolicyMetrics,
}

impl Balancer for WasmBalancer {
    fn name(&self) -> &str {
        &self.policy.name
    }

    fn placed_version(&self, placed_by: u8) -> Option<String> {
        let short = |digest: &str| digest.chars().take(12).collect::<String>();
        if placed_by == crate::balance::PLACED_BY_FALLBACK {
            return Some("fallback (round-robin)".into());
        }
        if placed_by == PLACED_BY_CANDIDATE {
            let candidate = self.policy.candidate()?;
            return Some(format!("{} (candidate)", short(&candidate.version.digest)));
        }
        self.policy.current().map(|v| short(&v.digest))
    }

    fn pick(&self, ctx: &PickContext<'_>) -> Result<usize, PickError> {
        self.pick_placed(ctx).map(|(position, _)| position)
    }

    /// With a candidate: in canary mode it places its share of calls (if
    /// it faults, the current version places the call); in shadow mode it
    /// picks too, after the current, and only the difference is counted.
    fn pick_placed(&self, ctx: &PickContext<'_>) -> Result<(usize, u8), PickError> {
        let candidate = self.policy.candidate.load();
        let Some(candidate) = candidate.as_ref() else {
            return self.pick_current(ctx).map(|p| (p, 0));
        };
        if candidate.takes_call() {
            match candidate.version.pick(&self.engine, ctx) {
                Ok(position) => return Ok((position, PLACED_BY_CANDIDATE)),
                Err(fault) => self.candidate_faulted(candidate, &fault),
            }
        }
        let position = self.pick_current(ctx)?;
        if candidate.shadows() {
            let stats = &candidate.stats;
            match candidate.version.pick(&self.engine, ctx) {
                Ok(shadow) => {
                    stats.shadowed.fetch_add(1, Ordering::Relaxed);
                    if shadow != position {
                        stats.divergent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(fault) => self.candidate_faulted(candidate, &fault),
            }
        }
        Ok((position, 0))
    }

    fn learns(&self) -> bool {
        self.policy.candidate.load().is_some()
            || self
                .policy
                .current
                .load()
                .as_ref()
                .is_some_and(|v| v.learns_from_outcomes)
    }

    fn observe(&self, outcome: &Outcome) {
        let candidate = self.policy.candidate.load();
        let by_candidate = outcome.placed_by == PLACED_BY_CANDIDATE;
        if let Some(candidate) = candidate.as_ref() {
            let arm = if by_candidate {
                &candidate.stats.candidate
            } else {
                &candidate.stats.current
            };
            arm.record(outcome.status, outcome.latency_us);
            if by_candidate {
                self.observe_with(&candidate.version, outcome);
                return;
            }
        }
        let guard = self.policy.current.load();
        if let Some(version) = guard.as_ref() {
            self.observe_with(version, outcome);
        }
    }
}

impl WasmBalancer {
    fn pick_current(&self, ctx: &PickContext<'_>) -> Result<usize, PickError> {
        let guard = self.policy.current.load();
        let Some(version) = guard.as_ref() else {
            return Err(PickError(format!(
                "policy {:?} has no version loaded",
                &*self.policy.name
            )));
        };
        // Time one pick in TIMED_EVERY: reading the clock twice and filling
        // the histogram would cost more than a simple policy's pick.
        let timed = self.picks.inc() % TIMED_EVERY == 0;
        let started = timed.then(Instant::now);
        let outcome = version.pick(&self.engine, ctx);
        if let Some(started) = started {
            self.pick_duration.observe(started.elapsed().as_secs_f64());
        }
        outcome.map_err(|fault| {
            self.metrics.fault(&self.policy.name, fault.kind());
            if version.failing() {
                self.revert(version, &fault);
            }
            PickError(format!("policy {:?} {fault}", &*self.policy.name))
        })
    }

    fn observe_with(&self, version: &PolicyVersion, outcome: &Outcome) {
        if !version.learns_from_outcomes {
            return;
        }
        if let Err(fault) = version.observe(&self.engine, outcome) {
            // Only this observation is lost; picks are not affected.
            self.metrics.fault(&self.policy.name, fault.kind());
            tracing::debug!(policy = %self.policy.name, %fault, "observe failed");
        }
    }

    /// A candidate's pick faulted: counted; one that keeps faulting is no
    /// longer tried here, and the rollout guard rolls it back everywhere.
    fn candidate_faulted(&self, candidate: &Candidate, fault: &super::version::Fault) {
        if matches!(fault, super::version::Fault::Busy) {
            return; // every instance picking at once: not the candidate's doing
        }
        candidate
            .stats
            .candidate_faults
            .fetch_add(1, Ordering::Relaxed);
        self.metrics.fault(&self.policy.name, fault.kind());
        if candidate.version.failing() && !candidate.withdrawn.swap(true, Ordering::Relaxed) {
            tracing::warn!(policy = %self.policy.name, candidate = %candidate.version.digest, %fault, "the candidate keeps faulting: no longer tried on this gateway");
        }
    }

    /// Puts the last good version back; with none to go back to, takes the
    /// failing one out of service (calls use the native round-robin).
    fn revert(&self, failing: &Arc<PolicyVersion>, fault: &super::version::Fault) {
        let good = self.policy.last_good.load_full();
        let swapped = self
            .policy
            .current
            .compare_and_swap(&Some(failing.clone()), good.clone());
        if !swapped
            .as_ref()
            .is_some_and(|cur| Arc::ptr_eq(cur, failing))
        {
            return; // another pick got there first, or a new version arrived
        }
        match good {
            Some(good) => {
                self.metrics.reverted(&self.policy.name);
                *self.policy.last_error.lock().expect("last error") = Some(format!(
                    "version {} reverted after repeated faults in a row (last: {fault})",
                    failing.digest
                ));
                tracing::warn!(policy = %self.policy.name, failing = %failing.digest, restored = %good.digest, "policy keeps failing: reverted to its last good version");
            }
            None => {
                self.metrics.disabled(&self.policy.name);
                *self.policy.last_error.lock().expect("last error") = Some(format!(
                    "version {} disabled after repeated faults in a row, with no earlier version to go back to (last: {fault}); calls use round-robin",
                    failing.digest
                ));
                tracing::warn!(policy = %self.policy.name, failing = %failing.digest, "policy keeps failing and has no earlier version: disabled, its routes use round-robin");
            }
        }
    }
}
