//! Pooled keep-alive HTTP clients to backends: one per backend, so that each keeps its own
//! connection pool, connect timeout and trust roots. https uses rustls with the webpki roots
//! (plus a backend's own `ca_file`), negotiating h2 or HTTP/1.1 by ALPN; http is HTTP/1.1.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

/// The client type every backend uses. Request bodies are whole (`Full<Bytes>`): the gateway
/// reads a request under its size cap before choosing where it goes.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Idle upstream connections are closed after this; NIM's own keep-alive is longer.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Builds a client with the given connect timeout, trusting the webpki roots and `extra_ca`.
pub fn build(
    connect_timeout: Duration,
    extra_ca: Option<&[CertificateDer<'static>]>,
) -> Result<UpstreamClient, String> {
    let mut roots = webpki_roots();
    for cert in extra_ca.unwrap_or_default() {
        roots.add(cert.clone()).map_err(|e| format!("CA certificate rejected: {e}"))?;
    }
    let tls = tls_config(roots)?;

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(30)));
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);

    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(POOL_IDLE_TIMEOUT)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector))
}

/// The rustls crypto provider nimgate uses everywhere (ring: no C toolchain beyond cc).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn webpki_roots() -> RootCertStore {
    RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() }
}

fn tls_config(roots: RootCertStore) -> Result<ClientConfig, String> {
    Ok(ClientConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}
