//! WebAssembly balancing policies: the wasmtime host, the named policy
//! versions with hot swap, and the reloaders that feed them.
//!
//! Only this module knows wasmtime. To the data path a policy is just a
//! [`crate::balance::Balancer`]; when it fails, the call falls back to the
//! built-in round-robin, and a policy that keeps failing is reverted to its
//! last good version.

pub mod candidate;
pub(crate) mod check;
mod engine;
mod host;
pub mod provenance;
pub(crate) mod reload;
pub mod rollout;
mod set;
mod version;
mod wasi;

use std::sync::Arc;

pub use check::synthetic_members;
pub use engine::{Limits, PolicyEngine};
pub use set::{policy_name, NamedPolicy, PolicySet, WasmBalancer};
pub use version::{digest, Fault, PolicyVersion, REVERT_AFTER, REVERT_AFTER_DEADLINES};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the policy engine could not start: {0}")]
    Engine(String),
    #[error("not a WebAssembly component: {0}")]
    Invalid(String),
    #[error("not a weir:policy balancer (imports or exports do not match wit/policy.wit): {0}")]
    World(String),
    #[error("the trial pick on a synthetic set failed: {0}")]
    Trial(String),
    #[error("policy names are letters, digits, `-` and `_`: {0:?}")]
    Name(String),
    #[error("the component's memory starts at {needs_mib} MiB, over the limit (`[policy] memory_mib`, `--memory-mib`): set it to {needs_mib} or more, with room to grow (32 for a Python policy)")]
    TooMuchMemory { needs_mib: u64 },
    #[error("the component is {size} bytes, over the {limit}-byte limit ([policy] max_size_mib)")]
    TooLarge { size: usize, limit: usize },
    #[error("refused: {0}")]
    Refused(#[from] provenance::Refusal),
}

impl PolicyError {
    /// Whether the same bytes would be refused again. A trial pick can fail
    /// for a busy machine (its deadline counts wall time) and a read for
    /// the file system: those are worth another try; a malformed component
    /// or a wrong world is not.
    pub fn is_final(&self) -> bool {
        !matches!(self, PolicyError::Trial(_) | PolicyError::Read { .. })
    }
}

/// Everything an install checks before a version may serve: the name, the
/// component (compiled, its imports and exports those of `wit/policy.wit`)
/// and a trial pick on a synthetic set under the sandbox limits. Installs
/// and `weir policy check` both go through here. Blocking: it compiles.
pub fn validate(
    engine: &PolicyEngine,
    name: &str,
    bytes: &[u8],
    source: String,
) -> Result<Arc<version::PolicyVersion>, PolicyError> {
    if !crate::config::valid_policy_name(name) {
        return Err(PolicyError::Name(name.to_owned()));
    }
    let compiled = engine.compile(bytes)?;
    let version = Arc::new(version::PolicyVersion::new(
        engine, name, source, bytes, compiled,
    ));
    version
        .warm_up(engine)
        .map_err(|f| PolicyError::Trial(f.to_string()))?;
    check::trial(engine, &version).map_err(PolicyError::Trial)?;
    Ok(version)
}
