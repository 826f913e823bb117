//! TLS for both ports (`tls: {cert_file, key_file}` in `mkts.yml`), with rustls on ring.
//!
//! The files are read and checked once at start-up, so a missing or unreadable file, a file without a
//! PEM certificate or key, or a key that does not belong to the certificate is one clear error before
//! anything listens. The gRPC port (Flight, Flight SQL, `proto.Marketstore`) gets them as tonic's
//! identity (ALPN `h2`); the HTTP port (`/rpc`, `/ws`, `/heartbeat`, `/metrics`) as a rustls server
//! configuration offering HTTP/1.1 (WebSocket upgrades need it).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// The checked certificate chain and key.
pub struct TlsMaterial {
    /// PEM text as read, for tonic's identity.
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// The HTTP port's rustls configuration.
    pub http: Arc<rustls::ServerConfig>,
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("tls.{what} {}: cannot read: {e}", path.display()))
}

/// Read and check `cfg`'s files.
pub fn load(cfg: &TlsConfig) -> Result<TlsMaterial, String> {
    let cert_pem = read("cert_file", &cfg.cert_file)?;
    let key_pem = read("key_file", &cfg.key_file)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.cert_file {}: not a PEM certificate file: {e}", cfg.cert_file.display()))?;
    if chain.is_empty() {
        return Err(format!("tls.cert_file {}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)", cfg.cert_file.display()));
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("tls.key_file {}: holds no PEM private key: {e}", cfg.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut http = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "tls: the key in {} does not belong to the certificate in {}",
                cfg.key_file.display(),
                cfg.cert_file.display()
            ),
            other => format!("tls: cannot use {} with {}: {other}", cfg.cert_file.display(), cfg.key_file.display()),
        })?;
    http.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsMaterial { cert_pem, key_pem, http: Arc::new(http) })
}
