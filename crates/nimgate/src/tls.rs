//! TLS material: the listener's certificate and key (`server.tls`) and extra CA certificates
//! for https backends (`backends[].ca_file`), read from PEM files when a snapshot is built so
//! that `check-config` reports a bad file before anything is served.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The rustls crypto provider nimgate uses everywhere, listener and backends alike (ring: no C
/// toolchain beyond cc).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The listener's rustls configuration, offering h2 and HTTP/1.1 by ALPN.
pub fn server_config(cert_path: &Path, key_path: &Path) -> Result<Arc<ServerConfig>, TlsFileError> {
    let certs = certificates(cert_path)?;
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| TlsFileError::Key(format!("no private key read from {}: {e}", key_path.display())))?;
    let mut config = ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsFileError::Key(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| TlsFileError::Key(format!("certificate and key do not form a usable pair: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Every certificate in a PEM file; an empty or unreadable file is an error.
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsFileError::Cert(format!("cannot read certificates from {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsFileError::Cert(format!("no PEM certificate found in {}", path.display())));
    }
    Ok(certs)
}

/// Which of the two files was wrong, so validation can point at the right field.
#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error("{0}")]
    Cert(String),
    #[error("{0}")]
    Key(String),
}
