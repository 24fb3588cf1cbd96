//! Who may change what the gateway runs, and what it tells whom: policy
//! provenance (`[policy] allow`, `trusted_keys`, `weir policy keygen` and
//! `sign` run as the real binary), the admin token, and the headers a
//! policy may not read.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tonic::Request;

use crate::policy::policy_file;
use crate::support::gateway::{admin_get, req, Env};
use crate::support::{client, eventually, PREFIX};

/// `weir policy keygen` into `dir`: (secret key path, public key).
fn keygen(dir: &Path, name: &str) -> (std::path::PathBuf, String) {
    let key = dir.join(name);
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["policy", "keygen", "--out"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let public = String::from_utf8(out.stdout).unwrap();
    let public = public.lines().last().unwrap().trim().to_owned();
    assert!(public.starts_with("ed25519:"), "{public}");
    (key, public)
}

/// `weir policy sign FILE --key KEY`: the `.sig` text it wrote beside FILE.
fn sign(file: &Path, key: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["policy", "sign"])
        .arg(file)
        .arg("--key")
        .arg(key)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let written = String::from_utf8(out.stdout).unwrap();
    std::fs::read_to_string(written.trim()).unwrap()
}

async fn last_error(env: &Env, name: &str) -> String {
    let (_, p) = admin_get(env.gateway().admin_addr, "/policies").await;
    let v: serde_json::Value = serde_json::from_str(&p).unwrap();
    v["policies"][name]["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// With `trusted_keys`, a component in the directory installs only with a
/// valid signature by a trusted key beside it: unsigned, signed by a
/// stranger and signed over other bytes are refused (and say which); the
/// refusals are counted; then a good signature installs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_components_signed_by_a_trusted_key_install_from_the_directory() {
    let keys = tempfile::tempdir().unwrap();
    let (trusted, public) = keygen(keys.path(), "trusted.key");
    let (stranger, _) = keygen(keys.path(), "stranger.key");
    let dir = tempfile::tempdir().unwrap();
    let component = dir.path().join("p.wasm");
    std::fs::copy(policy_file("least-conn"), &component).unwrap();
    let env = Env::start(
        1,
        &format!(
            "[policy]\ndir = {:?}\ntrusted_keys = [\"{public}\"]\n[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\npolicy = \"p\"\n",
            dir.path().display().to_string()
        ),
    )
    .await;
    let policies = env.gateway().policies.clone();
    assert!(policies.policy("p").and_then(|p| p.current()).is_none());
    assert!(last_error(&env, "p").await.contains("unsigned"));

    // Signed by a key the gateway does not trust.
    let scratch = tempfile::tempdir().unwrap();
    let copy = scratch.path().join("p.wasm");
    std::fs::copy(&component, &copy).unwrap();
    std::fs::write(dir.path().join("p.wasm.sig"), sign(&copy, &stranger)).unwrap();
    eventually("refused: unknown key", Duration::from_secs(10), || async {
        last_error(&env, "p")
            .await
            .contains("not in [policy] trusted_keys")
    })
    .await;

    // Signed by the trusted key, but over other bytes.
    let other = scratch.path().join("other.wasm");
    std::fs::copy(policy_file("round-robin"), &other).unwrap();
    std::fs::write(dir.path().join("p.wasm.sig"), sign(&other, &trusted)).unwrap();
    eventually(
        "refused: signature mismatch",
        Duration::from_secs(10),
        || async { last_error(&env, "p").await.contains("does not match") },
    )
    .await;
    assert!(policies.policy("p").and_then(|p| p.current()).is_none());

    // The right signature: installed, and calls are served by it.
    std::fs::write(dir.path().join("p.wasm.sig"), sign(&copy, &trusted)).unwrap();
    let want = weir::policy::digest(&std::fs::read(&component).unwrap());
    eventually("installed once signed", Duration::from_secs(10), || {
        let policies = policies.clone();
        let want = want.clone();
        async move {
            policies
                .policy("p")
                .and_then(|p| p.current())
                .is_some_and(|v| v.digest == want)
        }
    })
    .await;
    env.client().await.unary(req("signed")).await.unwrap();
    let (_, m) = admin_get(env.gateway().admin_addr, "/metrics").await;
    for reason in ["unsigned", "unknown_key", "bad_signature"] {
        assert!(
            m.contains(&format!("weir_policy_refused_total{{reason=\"{reason}\"}}")),
            "{reason} counted:\n{m}"
        );
    }
}

/// From etcd: a name outside `allow` is ignored (no state, counted); an
/// allowed one needs its signature at `NAME.sig`, put with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_policies_need_an_allowed_name_and_a_trusted_signature() {
    let keys = tempfile::tempdir().unwrap();
    let (trusted, public) = keygen(keys.path(), "trusted.key");
    let env = Env::start(
        1,
        &format!(
            "[policy]\nallow = [\"team-*\"]\ntrusted_keys = [\"{public}\"]\n[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\npolicy = \"team-a\"\n"
        ),
    )
    .await;
    let scratch = tempfile::tempdir().unwrap();
    let component = scratch.path().join("least-conn.wasm");
    std::fs::copy(policy_file("least-conn"), &component).unwrap();
    let bytes = std::fs::read(&component).unwrap();
    let signature = sign(&component, &trusted);
    let mut etcd = client(&env.etcd).await;
    let key = |name: &str| format!("{PREFIX}/_policies/{name}");

    // Not allowed, though signed: ignored.
    etcd.put(key("intruder"), bytes.clone(), None)
        .await
        .unwrap();
    etcd.put(key("intruder.sig"), signature.clone(), None)
        .await
        .unwrap();
    // Allowed, unsigned: refused.
    etcd.put(key("team-b"), bytes.clone(), None).await.unwrap();
    // Allowed and signed, both in one transaction.
    let txn = etcd_client::Txn::new().and_then([
        etcd_client::TxnOp::put(key("team-a.sig"), signature.clone(), None),
        etcd_client::TxnOp::put(key("team-a"), bytes.clone(), None),
    ]);
    etcd.txn(txn).await.unwrap();

    let policies = env.gateway().policies.clone();
    let want = weir::policy::digest(&bytes);
    eventually("team-a installed", Duration::from_secs(10), || {
        let (policies, want) = (policies.clone(), want.clone());
        async move {
            policies
                .policy("team-a")
                .and_then(|p| p.current())
                .is_some_and(|v| v.digest == want)
        }
    })
    .await;
    eventually("team-b refused", Duration::from_secs(10), || async {
        last_error(&env, "team-b").await.contains("unsigned")
    })
    .await;
    assert!(policies.policy("intruder").is_none(), "no state for it");
    let (_, m) = admin_get(env.gateway().admin_addr, "/metrics").await;
    assert!(
        m.contains("weir_policy_refused_total{reason=\"not_allowed\"}"),
        "{m}"
    );
    assert!(
        !m.contains("intruder"),
        "no series named by the prefix's writers"
    );
    env.client().await.unary(req("team-a")).await.unwrap();
}

/// `admin_token_file`: every admin request carries the token or gets 401;
/// and the admin listener only reads (anything but GET is refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_wants_its_token_and_only_reads() {
    let etcd = weir::testkit::Etcd::start();
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "s3cret-admin-token-0123456789\n").unwrap();
    let mut config = crate::support::gateway::config(&etcd, "");
    config.admin_token_file = Some(token_file);
    let gateway = weir::Gateway::start(config).await.unwrap();
    let admin = gateway.admin_addr;
    use weir::testkit::http_request;
    for path in ["/metrics", "/readyz", "/healthz", "/services"] {
        let (status, body) = http_request(admin, "GET", path, &[]).await.unwrap();
        assert_eq!(status, 401, "{path} without a token: {body}");
        let wrong = ["Authorization: Bearer s3cret-admin-token-0123456788"];
        let (status, _) = http_request(admin, "GET", path, &wrong).await.unwrap();
        assert_eq!(status, 401, "{path} with a wrong token");
    }
    let right = ["Authorization: Bearer s3cret-admin-token-0123456789"];
    let (status, body) = http_request(admin, "GET", "/metrics", &right)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, _) = http_request(admin, "POST", "/policies", &right)
        .await
        .unwrap();
    assert_eq!(status, 405);
    gateway.shutdown().await;

    // A token too short to be one is refused at start, naming the file.
    let short = dir.path().join("short");
    std::fs::write(&short, "abc").unwrap();
    let mut config = crate::support::gateway::config(&etcd, "");
    config.admin_token_file = Some(short);
    let err = weir::Gateway::start(config).await.err().expect("refused");
    assert!(err.to_string().contains("admin_token_file"), "{err}");
}

/// `call.header` answers nothing for credentials, nor for a route's
/// `hide_headers`; `expose_headers` opens one up. (The testing policy
/// picks candidate 1 when it can read the header `peek:` names.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_cannot_read_credentials_unless_the_route_exposes_them() {
    let builtins = policy_file("testing").parent().unwrap().to_owned();
    let env = Env::start(
        2,
        &format!(
            "[policy]\ndir = {:?}\ndeadline = \"100ms\"\n[[route]]\nmatch = \"/weir.example.v1.Echo/\"\nservice = \"echo\"\npolicy = \"testing\"\nhide_headers = [\"X-Tenant\"]\nexpose_headers = [\"cookie\"]\n",
            builtins.display().to_string()
        ),
    )
    .await;
    let mut c = env.client().await;
    let mut served_by = async |peek: &str, header: Option<(&'static str, &str)>| {
        let mut r = Request::new(req("peek"));
        r.metadata_mut()
            .insert("x-policy-test", format!("peek:{peek}").parse().unwrap());
        if let Some((name, value)) = header {
            r.metadata_mut().insert(name, value.parse().unwrap());
        }
        c.unary(r).await.unwrap().into_inner().instance
    };
    let unseen = served_by("x-absent", None).await;
    let seen = served_by("x-visible", Some(("x-visible", "1"))).await;
    assert_ne!(unseen, seen, "the policy tells seen from unseen headers");
    for (name, value) in [
        ("authorization", "Bearer secret"),
        ("proxy-authorization", "Basic c2VjcmV0"),
        ("x-tenant", "acme"),
    ] {
        assert_eq!(
            served_by(name, Some((name, value))).await,
            unseen,
            "{name} is hidden from the policy"
        );
    }
    assert_eq!(
        served_by("cookie", Some(("cookie", "session=1"))).await,
        seen,
        "the route exposes cookie"
    );
}
