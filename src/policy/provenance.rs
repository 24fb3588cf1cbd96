//! Who may change what the gateway runs: `[policy] allow` (which names are
//! taken from etcd) and `trusted_keys` (whose ed25519 signature a component
//! must carry, from etcd or the directory).
//!
//! A signature is over the component's SHA-256 digest and travels beside
//! it: `FILE.wasm.sig` in the directory, `<prefix>/_policies/NAME.sig` in
//! etcd. Its text is one line, `ed25519:<public key> <signature>` (both
//! base64): naming the key lets a refusal say "signed by an unknown key"
//! apart from "the signature does not match".

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

/// The scheme prefix of public keys and signature lines.
const SCHEME: &str = "ed25519:";
/// The prefix of a secret key file's one line.
const SECRET_SCHEME: &str = "ed25519-secret:";

/// Why a component is refused before it is compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("policy name {0:?} is not in [policy] allow")]
    NotAllowed(String),
    #[error(
        "unsigned: [policy] trusted_keys is set and no signature was found beside the component"
    )]
    Unsigned,
    #[error("the signature cannot be read: {0}")]
    Malformed(String),
    #[error("signed by {0}, which is not in [policy] trusted_keys")]
    UnknownKey(String),
    #[error("the signature by {0} does not match the component (signed other bytes?)")]
    BadSignature(String),
}

impl Refusal {
    /// The metric label of this refusal.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::NotAllowed(_) => "not_allowed",
            Refusal::Unsigned => "unsigned",
            Refusal::Malformed(_) => "malformed_signature",
            Refusal::UnknownKey(_) => "unknown_key",
            Refusal::BadSignature(_) => "bad_signature",
        }
    }
}

/// The provenance rules of one gateway. The default allows every name and
/// requires no signature.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    /// Name patterns (`name`, or `prefix-*`); `None` allows every name.
    allow: Option<Vec<String>>,
    trusted: Vec<VerifyingKey>,
}

impl Provenance {
    /// From the config's `allow` patterns and `trusted_keys`
    /// (`ed25519:BASE64`); an unreadable key is an error naming it.
    pub fn new(allow: Option<Vec<String>>, trusted_keys: &[String]) -> Result<Provenance, String> {
        let trusted = trusted_keys
            .iter()
            .map(|k| parse_public_key(k))
            .collect::<Result<_, _>>()?;
        Ok(Provenance { allow, trusted })
    }

    /// Whether policies named `name` may be taken from etcd.
    pub fn allows(&self, name: &str) -> bool {
        self.allow.as_ref().is_none_or(|patterns| {
            patterns.iter().any(|p| match p.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => p == name,
            })
        })
    }

    pub fn requires_signatures(&self) -> bool {
        !self.trusted.is_empty()
    }

    /// Checks `signature` (the text of a `.sig`) over `digest` (the
    /// component's SHA-256) when signatures are required.
    pub fn check(&self, digest: &[u8; 32], signature: Option<&[u8]>) -> Result<(), Refusal> {
        if self.trusted.is_empty() {
            return Ok(());
        }
        let (key, signature) = parse_signature(signature.ok_or(Refusal::Unsigned)?)?;
        let named = format!("{SCHEME}{}", BASE64.encode(key.as_bytes()));
        if !self.trusted.contains(&key) {
            return Err(Refusal::UnknownKey(named));
        }
        key.verify(digest, &signature)
            .map_err(|_| Refusal::BadSignature(named))
    }
}

/// `ed25519:BASE64` (32 bytes) as a key.
pub fn parse_public_key(text: &str) -> Result<VerifyingKey, String> {
    let b64 = text
        .trim()
        .strip_prefix(SCHEME)
        .ok_or_else(|| format!("{text:?}: a trusted key is written {SCHEME}BASE64"))?;
    let bytes: [u8; 32] = BASE64
        .decode(b64)
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| format!("{text:?}: not 32 bytes of base64"))?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("{text:?}: not an ed25519 key: {e}"))
}

fn parse_signature(text: &[u8]) -> Result<(VerifyingKey, Signature), Refusal> {
    let text = std::str::from_utf8(text).map_err(|_| Refusal::Malformed("not UTF-8".into()))?;
    let (key, sig) = text
        .trim()
        .split_once(' ')
        .ok_or_else(|| Refusal::Malformed(format!("expected `{SCHEME}KEY SIGNATURE`")))?;
    let key = parse_public_key(key).map_err(Refusal::Malformed)?;
    let sig: [u8; 64] = BASE64
        .decode(sig.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Refusal::Malformed("the signature is not 64 bytes of base64".into()))?;
    Ok((key, Signature::from_bytes(&sig)))
}

/// A new signing key: the secret key file's text and the public key to put
/// in `trusted_keys`.
pub fn keygen() -> (String, String) {
    let seed: [u8; 32] = rand::random();
    let key = SigningKey::from_bytes(&seed);
    (
        format!("{SECRET_SCHEME}{}\n", BASE64.encode(seed)),
        format!("{SCHEME}{}", BASE64.encode(key.verifying_key().as_bytes())),
    )
}

/// The `.sig` text for a component, signed with a secret key file's text.
pub fn sign(secret: &str, component: &[u8]) -> Result<String, String> {
    let seed: [u8; 32] = secret
        .trim()
        .strip_prefix(SECRET_SCHEME)
        .and_then(|b64| BASE64.decode(b64).ok())
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            format!("not a key written by `weir policy keygen` ({SECRET_SCHEME}BASE64)")
        })?;
    let key = SigningKey::from_bytes(&seed);
    let signature = key.sign(&super::version::digest_bytes(component));
    Ok(format!(
        "{SCHEME}{} {}\n",
        BASE64.encode(key.verifying_key().as_bytes()),
        BASE64.encode(signature.to_bytes())
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusting(public: &str) -> Provenance {
        Provenance::new(None, &[public.to_owned()]).unwrap()
    }

    #[test]
    fn a_signature_by_a_trusted_key_over_the_component_passes() {
        let (secret, public) = keygen();
        let component = b"component bytes";
        let sig = sign(&secret, component).unwrap();
        let digest = super::super::version::digest_bytes(component);
        assert_eq!(
            trusting(&public).check(&digest, Some(sig.as_bytes())),
            Ok(())
        );
    }

    #[test]
    fn unsigned_other_bytes_unknown_keys_and_garbage_are_refused() {
        let (secret, public) = keygen();
        let (stranger, _) = keygen();
        let p = trusting(&public);
        let digest = super::super::version::digest_bytes(b"the real one");
        assert_eq!(p.check(&digest, None), Err(Refusal::Unsigned));
        let other = sign(&secret, b"something else").unwrap();
        assert!(matches!(
            p.check(&digest, Some(other.as_bytes())),
            Err(Refusal::BadSignature(_))
        ));
        let by_stranger = sign(&stranger, b"the real one").unwrap();
        assert!(matches!(
            p.check(&digest, Some(by_stranger.as_bytes())),
            Err(Refusal::UnknownKey(_))
        ));
        assert!(matches!(
            p.check(&digest, Some(b"nonsense")),
            Err(Refusal::Malformed(_))
        ));
        // With no trusted keys nothing is required.
        assert_eq!(Provenance::default().check(&digest, None), Ok(()));
    }

    #[test]
    fn allow_patterns_match_names_and_prefixes() {
        let p = Provenance::new(Some(vec!["least-conn".into(), "team-a-*".into()]), &[]).unwrap();
        assert!(p.allows("least-conn") && p.allows("team-a-canary"));
        assert!(!p.allows("least-conn2") && !p.allows("team-b-x"));
        assert!(Provenance::default().allows("anything"));
    }

    #[test]
    fn a_malformed_trusted_key_is_named() {
        let err = Provenance::new(None, &["ed25519:short".into()]).unwrap_err();
        assert!(err.contains("ed25519:short"), "{err}");
    }
}
