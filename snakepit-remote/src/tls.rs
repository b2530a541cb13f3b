//! Mutual TLS with rustls and the `ring` provider.
//!
//! The workspace enables exactly one rustls crypto provider, `ring`, and installs it explicitly
//! ([`install_crypto_provider`]): with two providers compiled in by different dependency paths
//! rustls cannot pick one and panics at first use. Every config here is also built with the
//! provider named, so nothing depends on the process default.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// The crypto provider every config uses: `ring`.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs `ring` as the process's default rustls provider (for libraries that build configs
/// without naming one). Idempotent: an already installed provider is kept.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bad = |reason: String| Error::Tls { path: path.display().to_string(), reason };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(format!("cannot read certificates: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file: {e}")))?;
    if certs.is_empty() {
        return Err(bad("no certificate in it".into()));
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| Error::Tls {
        path: path.display().to_string(),
        reason: format!("no usable private key: {e}"),
    })
}

fn roots(path: &Path) -> Result<rustls::RootCertStore, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(path)? {
        roots.add(c).map_err(|e| Error::Tls {
            path: path.display().to_string(),
            reason: format!("not a CA certificate: {e}"),
        })?;
    }
    Ok(roots)
}

/// The agent's side: its certificate and key, and the CA its clients' certificates must chain
/// to (a client without one, with one from another CA, or with an expired one fails the
/// handshake).
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The agent's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA of the front ends' client certificates (PEM).
    pub client_ca: PathBuf,
}

impl ServerTls {
    /// Agent TLS from three PEM files.
    pub fn new(cert: impl Into<PathBuf>, key: impl Into<PathBuf>, client_ca: impl Into<PathBuf>) -> Self {
        ServerTls { cert: cert.into(), key: key.into(), client_ca: client_ca.into() }
    }

    /// The rustls config (HTTP/2 only, client certificates required).
    pub fn config(&self) -> Result<Arc<rustls::ServerConfig>, Error> {
        let provider = provider();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(&self.client_ca)?),
            provider.clone(),
        )
        .build()
        .map_err(|e| Error::Tls { path: self.client_ca.display().to_string(), reason: e.to_string() })?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls { path: "(provider)".into(), reason: e.to_string() })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs(&self.cert)?, key(&self.key)?)
            .map_err(|e| Error::Tls { path: self.key.display().to_string(), reason: e.to_string() })?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}

/// The front end's side: the CA the agents' certificates chain to, and this front end's client
/// certificate and key.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The agents' CA (PEM).
    pub ca: PathBuf,
    /// This front end's certificate chain (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

impl ClientTls {
    /// Front-end TLS from three PEM files.
    pub fn new(ca: impl Into<PathBuf>, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        ClientTls { ca: ca.into(), cert: cert.into(), key: key.into() }
    }

    /// The rustls config (HTTP/2 only).
    pub fn config(&self) -> Result<Arc<rustls::ClientConfig>, Error> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls { path: "(provider)".into(), reason: e.to_string() })?
            .with_root_certificates(roots(&self.ca)?)
            .with_client_auth_cert(certs(&self.cert)?, key(&self.key)?)
            .map_err(|e| Error::Tls { path: self.key.display().to_string(), reason: e.to_string() })?;
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(cfg))
    }
}
