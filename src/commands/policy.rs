//! `weir policy check FILE.wasm`: validate a policy as a swap would, and show
//! how it spreads synthetic picks, so authors can try one before deploying.
//! `weir policy keygen` and `weir policy sign`: the keys and signatures
//! `[policy] trusted_keys` asks for.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use crate::policy::check::spread;
use crate::policy::{Limits, PolicyEngine};

/// `meta`: extra metadata for synthetic endpoints, as (position, key, value).
pub fn check(
    file: &Path,
    backends: usize,
    picks: usize,
    meta: &[(usize, String, String)],
    limits: Limits,
) -> anyhow::Result<()> {
    if let Some((n, ..)) = meta.iter().find(|(n, ..)| *n >= backends.max(1)) {
        anyhow::bail!(
            "--meta names endpoint {}, but there are {} (--backends)",
            n + 1,
            backends.max(1)
        );
    }
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let engine = PolicyEngine::new(limits, Some("zone-0".into()))?;
    // The name only labels logs here; any file name will do.
    let name = file
        .file_stem()
        .and_then(|s| s.to_str())
        .filter(|s| crate::config::valid_policy_name(s))
        .unwrap_or("checked");
    let version = crate::policy::validate(&engine, name, &bytes, file.display().to_string())
        .with_context(|| format!("{} is not a usable policy", file.display()))?;
    println!(
        "{}: a valid weir:policy balancer (digest {}, reads call headers: {}, learns from outcomes: {})",
        file.display(),
        version.digest,
        yes_no(version.reads_call),
        yes_no(version.learns_from_outcomes)
    );
    let began = Instant::now();
    let counts = spread(&engine, &version, backends.max(1), picks.max(1), meta)
        .map_err(|e| anyhow::anyhow!(e))?;
    let per_pick = began.elapsed().as_nanos() as f64 / picks.max(1) as f64;
    println!(
        "{picks} picks over {} synthetic endpoints (weights 100/200/300 by position, zones zone-0..2, \
         x-hash-key varying, gateway zone zone-0), {per_pick:.0} ns per pick:",
        backends.max(1)
    );
    for (i, (addr, weight, n)) in counts.into_iter().enumerate() {
        let share = n as f64 * 100.0 / picks.max(1) as f64;
        let extra: Vec<String> = meta
            .iter()
            .filter(|(at, ..)| *at == i)
            .map(|(_, k, v)| format!("{k}={v}"))
            .collect();
        let line = format!(
            "  {addr:<18} weight {weight:>3}  {n:>6}  {share:>5.1}%  {:<50} {}",
            "#".repeat((share / 2.0).round() as usize),
            extra.join(" ")
        );
        println!("{}", line.trim_end());
    }
    Ok(())
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Writes a new secret key to `out` (never over an existing file) and
/// prints its public key.
pub fn keygen(out: &Path) -> anyhow::Result<()> {
    use std::io::Write;
    let (secret, public) = crate::policy::provenance::keygen();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(out).with_context(|| {
        format!(
            "creating {} (an existing key is never overwritten)",
            out.display()
        )
    })?;
    file.write_all(secret.as_bytes())
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "secret key written to {}; add the public key to [policy] trusted_keys:",
        out.display()
    );
    println!("{public}");
    Ok(())
}

/// Writes `FILE.sig`: the component's SHA-256 signed with the secret key.
pub fn sign(file: &Path, key: &Path) -> anyhow::Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let secret =
        std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    let signature = crate::policy::provenance::sign(&secret, &bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", key.display()))?;
    let mut out = file.as_os_str().to_owned();
    out.push(".sig");
    let out = std::path::PathBuf::from(out);
    std::fs::write(&out, signature).with_context(|| format!("writing {}", out.display()))?;
    println!("{}", out.display());
    Ok(())
}
