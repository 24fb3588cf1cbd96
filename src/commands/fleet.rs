//! `weir policy publish | history | delete | rollout | promote | rollback |
//! status`: a policy's versions and its rollout across every gateway of a
//! prefix, through the records `discovery::fleet` keeps in etcd.

use std::path::Path;

use anyhow::Context;
use etcd_client::Client;

use crate::discovery::fleet::{self, FleetError, Mode, RolloutState};
use crate::discovery::EtcdAccess;

/// Who changed a rollout, as the state records it.
fn operator() -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "someone".into());
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
    format!("{user}@{} (weir policy)", host.trim())
}

async fn client(access: &EtcdAccess) -> Result<Client, FleetError> {
    Ok(crate::discovery::etcd::connect_answering(access).await?)
}

/// Runs `op` (a connect and its requests), again while etcd's errors are
/// transient (a member down, a leader election) for up to 15 s: every
/// operation here is safe to repeat (a rollout change is a fresh
/// compare-and-swap each time).
async fn retrying<T, F, Fut>(mut op: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, FleetError>>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let mut delay = std::time::Duration::from_millis(100);
    loop {
        match op().await {
            Err(FleetError::Etcd(err))
                if err.is_transient() && std::time::Instant::now() < deadline =>
            {
                eprintln!("etcd: {err}; trying again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(2));
            }
            outcome => return outcome.map_err(anyhow::Error::from),
        }
    }
}

fn check_name(name: &str) -> anyhow::Result<()> {
    if !crate::config::valid_policy_name(name) {
        anyhow::bail!("{name:?} is not a policy name (letters, digits, `-` and `_`)");
    }
    Ok(())
}

/// Stores FILE as a version of NAME (with FILE.sig if it is there); the
/// digest is the last line printed. Nothing runs it until a rollout does.
pub async fn publish(
    access: &EtcdAccess,
    prefix: &str,
    name: &str,
    file: &Path,
) -> anyhow::Result<()> {
    check_name(name)?;
    let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let limit = crate::policy::Limits::default().max_component_bytes;
    if bytes.len() > limit {
        anyhow::bail!(
            "{} is {} bytes, over the policy size cap of {limit} bytes (gateways would refuse it)",
            file.display(),
            bytes.len()
        );
    }
    let mut sig_path = file.as_os_str().to_owned();
    sig_path.push(".sig");
    let signature = match std::fs::read_to_string(&sig_path) {
        Ok(text) => Some(text.trim().to_owned()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => None,
        Err(err) => {
            return Err(err).with_context(|| format!("reading {}", Path::new(&sig_path).display()))
        }
    };
    let manifest = retrying(|| async {
        let mut client = client(access).await?;
        fleet::publish(&mut client, prefix, name, &bytes, signature.clone()).await
    })
    .await?;
    eprintln!(
        "published {name}: {} bytes in {} chunk(s){}; no gateway runs it until `weir policy rollout {name} {}`",
        manifest.size,
        manifest.chunks,
        if manifest.signature.is_some() { ", signed" } else { "" },
        fleet::short(&manifest.digest),
    );
    println!("{}", manifest.digest);
    Ok(())
}

/// Lists NAME's versions, oldest first, marking the current and candidate.
pub async fn history(access: &EtcdAccess, prefix: &str, name: &str) -> anyhow::Result<()> {
    let (versions, state) = retrying(|| async {
        let mut client = client(access).await?;
        let versions = fleet::history(&mut client, prefix, name).await?;
        let state = fleet::read_rollout(&mut client, prefix, name).await?;
        Ok((versions, state.map(|v| v.state).unwrap_or_default()))
    })
    .await?;
    if versions.is_empty() {
        println!("no version of {name:?} is published under {prefix}");
        return Ok(());
    }
    println!(
        "{:<64}  {:>10}  {:>12}  {:<6}  role",
        "digest", "bytes", "published", "signed"
    );
    for m in versions {
        let role = if state.current.as_deref() == Some(m.digest.as_str()) {
            "current"
        } else if state.candidate.as_deref() == Some(m.digest.as_str()) {
            "candidate"
        } else {
            ""
        };
        println!(
            "{:<64}  {:>10}  {:>12}  {:<6}  {role}",
            m.digest,
            m.size,
            m.published_at,
            if m.signature.is_some() { "yes" } else { "no" }
        );
    }
    Ok(())
}

pub async fn delete(
    access: &EtcdAccess,
    prefix: &str,
    name: &str,
    version: &str,
) -> anyhow::Result<()> {
    let manifest = retrying(|| async {
        let mut client = client(access).await?;
        let manifest = fleet::resolve(&mut client, prefix, name, version).await?;
        fleet::delete(&mut client, prefix, name, &manifest.digest).await?;
        Ok(manifest)
    })
    .await?;
    println!("deleted version {} of {name}", manifest.digest);
    Ok(())
}

/// How `weir policy rollout` places a version.
pub enum Placement {
    /// Every call, now.
    Current,
    Shadow,
    Canary(f64),
}

pub async fn rollout(
    access: &EtcdAccess,
    prefix: &str,
    name: &str,
    version: &str,
    placement: Placement,
    auto_promote_after: Option<std::time::Duration>,
) -> anyhow::Result<()> {
    let by = operator();
    let next = retrying(|| async {
        let mut client = client(access).await?;
        let manifest = fleet::resolve(&mut client, prefix, name, version).await?;
        let digest = manifest.digest;
        fleet::change_rollout(&mut client, prefix, name, |state| {
            let state = state.cloned().unwrap_or_default();
            match placement {
                Placement::Current => Ok(state.set_current(&digest, &by)),
                Placement::Shadow => state.try_candidate(
                    &digest,
                    Mode::Shadow,
                    0.0,
                    auto_promote_after.map(|d| d.as_secs()),
                    &by,
                ),
                Placement::Canary(percent) => state.try_candidate(
                    &digest,
                    Mode::Canary,
                    percent,
                    auto_promote_after.map(|d| d.as_secs()),
                    &by,
                ),
            }
        })
        .await
    })
    .await?;
    print_state(name, &next);
    Ok(())
}

/// How `weir policy promote` / `rollback` ends a trial.
#[derive(Clone, Copy)]
pub enum Ending {
    Promote,
    Rollback,
}

pub async fn end_trial(
    access: &EtcdAccess,
    prefix: &str,
    name: &str,
    ending: Ending,
) -> anyhow::Result<()> {
    let by = operator();
    let next = retrying(|| async {
        let mut client = client(access).await?;
        fleet::change_rollout(&mut client, prefix, name, |state| {
            let Some(state) = state else {
                return Err(format!("{name:?} has no rollout"));
            };
            match ending {
                Ending::Promote => state.promote(&by, &format!("promoted by {by}")),
                Ending::Rollback => state.rollback(&by, &format!("rolled back by {by}")),
            }
        })
        .await
    })
    .await?;
    print_state(name, &next);
    Ok(())
}

fn print_state(name: &str, s: &RolloutState) {
    let short = |d: &Option<String>| {
        d.as_deref()
            .map_or("-".to_owned(), |d| fleet::short(d).to_owned())
    };
    println!(
        "{name}: current {} candidate {} mode {}{} ({})",
        short(&s.current),
        short(&s.candidate),
        s.mode.as_str(),
        if s.mode == Mode::Canary {
            format!(" {}%", s.percent)
        } else {
            String::new()
        },
        s.reason
    );
}

/// The rollout of NAME across the fleet: the state in etcd and every
/// gateway's report (a table, or one JSON object with `--json`).
pub async fn status(
    access: &EtcdAccess,
    prefix: &str,
    name: &str,
    json: bool,
) -> anyhow::Result<()> {
    let (state, reports) = retrying(|| async {
        let mut client = client(access).await?;
        let state = fleet::read_rollout(&mut client, prefix, name).await?;
        let reports = fleet::gateway_reports(&mut client, prefix).await?;
        Ok((state.map(|v| v.state).unwrap_or_default(), reports))
    })
    .await?;
    let gateways: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            let p = &r["policies"][name];
            let arm = |which: &str, field: &str| p["calls"][which][field].clone();
            serde_json::json!({
                "id": r["id"],
                "current": p["current"],
                "candidate": p["candidate"],
                "mode": p["mode"],
                "calls": arm("current", "calls"),
                "error_rate": arm("current", "error_rate"),
                "p50_ms": arm("current", "p50_ms"),
                "p99_ms": arm("current", "p99_ms"),
                "candidate_calls": arm("candidate", "calls"),
                "candidate_error_rate": arm("candidate", "error_rate"),
                "candidate_p50_ms": arm("candidate", "p50_ms"),
                "candidate_p99_ms": arm("candidate", "p99_ms"),
                "shadowed": p["shadowed"],
                "divergent": p["divergent"],
                "candidate_faults": p["candidate_faults"],
            })
        })
        .collect();
    if json {
        let out = serde_json::json!({
            "name": name,
            "current": state.current,
            "candidate": state.candidate,
            "mode": state.mode.as_str(),
            "percent": state.percent,
            "reason": state.reason,
            "changed_by": state.changed_by,
            "gateways": gateways,
        });
        println!("{out}");
        return Ok(());
    }
    print_state(name, &state);
    println!(
        "{:<24} {:<12} {:<12} {:>9} {:>7} {:>8} {:>9} {:>7} {:>8} {:>9}",
        "gateway",
        "current",
        "candidate",
        "calls",
        "err %",
        "p99 ms",
        "cand",
        "err %",
        "p99 ms",
        "diverged"
    );
    let text = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let digest = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => fleet::short(s).to_owned(),
        other => text(other),
    };
    let pct = |v: &serde_json::Value| {
        v.as_f64()
            .map_or("-".into(), |r| format!("{:.1}", r * 100.0))
    };
    let ms = |v: &serde_json::Value| v.as_f64().map_or("-".into(), |m| format!("{m:.1}"));
    for g in &gateways {
        println!(
            "{:<24} {:<12} {:<12} {:>9} {:>7} {:>8} {:>9} {:>7} {:>8} {:>9}",
            text(&g["id"]),
            digest(&g["current"]),
            digest(&g["candidate"]),
            text(&g["calls"]),
            pct(&g["error_rate"]),
            ms(&g["p99_ms"]),
            text(&g["candidate_calls"]),
            pct(&g["candidate_error_rate"]),
            ms(&g["candidate_p99_ms"]),
            text(&g["divergent"]),
        );
    }
    Ok(())
}
