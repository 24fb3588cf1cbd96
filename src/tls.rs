//! TLS, both ways, from PEM files: the gRPC listener's (its certificate,
//! and optionally the CA its clients' certificates must chain to) and the
//! upstream one (the CA backends' certificates must chain to, optionally a
//! client certificate for mTLS). Both offer ALPN h2 and are reloaded from
//! disk when their files change: new connections use the new material,
//! established ones keep theirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Whether the listener requires client certificates or only asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    Required,
    Optional,
}

/// The listener's TLS settings.
#[derive(Clone, Debug)]
pub struct ServerFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate signed by this CA (or may, when
    /// `client_auth` is optional).
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

/// The upstream TLS settings.
#[derive(Clone, Debug)]
pub struct ClientFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The name backends' certificates are checked for; by default the
    /// host of each backend's address.
    pub server_name: Option<String>,
}

/// Material built from files, rebuilt when any of them changes.
#[derive(Debug)]
struct Reloading<T> {
    current: ArcSwap<T>,
    files: Vec<PathBuf>,
    stamps: std::sync::Mutex<Vec<Option<SystemTime>>>,
}

impl<T> Reloading<T> {
    fn new(value: T, files: Vec<PathBuf>) -> Self {
        let stamps = stamps(&files);
        Reloading {
            current: ArcSwap::from_pointee(value),
            files,
            stamps: std::sync::Mutex::new(stamps),
        }
    }

    /// Rebuilds with `build` when a file's modification time changed.
    /// A file that cannot be used leaves the old material in place: the
    /// error is returned for the log, and tried again on the next change.
    fn reload_if_changed(&self, build: impl FnOnce() -> Result<T, String>) -> Reload {
        let now = stamps(&self.files);
        let mut seen = self.stamps.lock().expect("tls stamps poisoned");
        if *seen == now {
            return Reload::Unchanged;
        }
        *seen = now;
        match build() {
            Ok(value) => {
                self.current.store(Arc::new(value));
                Reload::Reloaded
            }
            Err(err) => Reload::Failed(err),
        }
    }
}

fn stamps(files: &[PathBuf]) -> Vec<Option<SystemTime>> {
    files
        .iter()
        .map(|f| std::fs::metadata(f).and_then(|m| m.modified()).ok())
        .collect()
}

/// What a reload check did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    Unchanged,
    Reloaded,
    /// The files changed but cannot be used; the old material serves.
    Failed(String),
}

/// The listener's TLS: an acceptor per new connection from the current
/// certificate.
#[derive(Debug)]
pub struct ServerTls {
    files: ServerFiles,
    config: Reloading<ServerConfig>,
}

impl ServerTls {
    pub fn load(files: ServerFiles) -> Result<ServerTls, String> {
        let config = server_config(&files)?;
        let mut watched = vec![files.cert.clone(), files.key.clone()];
        watched.extend(files.client_ca.clone());
        Ok(ServerTls {
            config: Reloading::new(config, watched),
            files,
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.current.load_full())
    }

    pub fn reload_if_changed(&self) -> Reload {
        self.config.reload_if_changed(|| server_config(&self.files))
    }
}

/// The upstream TLS: a connector from the current material, and the name
/// to check a backend's certificate for.
#[derive(Debug)]
pub struct ClientTls {
    files: ClientFiles,
    config: Reloading<ClientConfig>,
}

impl ClientTls {
    pub fn load(files: ClientFiles) -> Result<ClientTls, String> {
        let config = client_config(&files)?;
        if let Some(name) = &files.server_name {
            ServerName::try_from(name.clone()).map_err(|e| format!("server_name {name:?}: {e}"))?;
        }
        let mut watched = vec![files.ca.clone()];
        watched.extend(files.cert.clone());
        watched.extend(files.key.clone());
        Ok(ClientTls {
            config: Reloading::new(config, watched),
            files,
        })
    }

    pub fn connector(&self) -> TlsConnector {
        TlsConnector::from(self.config.current.load_full())
    }

    /// The name a backend at `addr` (host:port) must prove.
    pub fn server_name(&self, addr: &str) -> Result<ServerName<'static>, String> {
        let host = match &self.files.server_name {
            Some(name) => name.as_str(),
            None => host_of(addr),
        };
        ServerName::try_from(host.to_owned()).map_err(|e| format!("{host:?}: {e}"))
    }

    pub fn reload_if_changed(&self) -> Reload {
        self.config.reload_if_changed(|| client_config(&self.files))
    }
}

/// The host of `host:port` (`[v6]:port` too).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

fn provider() -> Arc<tokio_rustls::rustls::crypto::CryptoProvider> {
    Arc::new(tokio_rustls::rustls::crypto::ring::default_provider())
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect())
        .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("key {}: {e}", path.display()))
}

fn roots(path: &Path, what: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path, what)? {
        roots
            .add(cert)
            .map_err(|e| format!("{what} {}: {e}", path.display()))?;
    }
    Ok(roots)
}

fn server_config(files: &ServerFiles) -> Result<ServerConfig, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca, "client_ca")?),
                provider(),
            );
            let verifier = match files.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("client_ca {}: {e}", ca.display()))?,
            )
        }
    };
    let mut config = builder
        .with_single_cert(certs(&files.cert, "certificate")?, key(&files.key)?)
        .map_err(|e| format!("certificate and key do not fit: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

fn client_config(files: &ClientFiles) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots(&files.ca, "ca")?);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key_file)) => builder
            .with_client_auth_cert(certs(cert, "cert")?, key(key_file)?)
            .map_err(|e| format!("cert and key do not fit: {e}"))?,
        (None, None) => builder.with_no_client_auth(),
        _ => return Err("cert and key go together".into()),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_of_addresses() {
        assert_eq!(host_of("10.0.0.1:443"), "10.0.0.1");
        assert_eq!(host_of("[::1]:50051"), "::1");
        assert_eq!(host_of("echo.internal:8443"), "echo.internal");
    }
}
