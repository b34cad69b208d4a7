//! The client of one backend. Plain http (a self-hosted NIM) goes through nimgate's own
//! keep-alive HTTP/1.1 connections (`connections`); https (the hosted API) through
//! hyper-util's pooled client with rustls, the webpki roots (plus a backend's own `ca_file`)
//! and h2 or HTTP/1.1 by ALPN. Each backend has its own, so that each keeps its own
//! connections, connect timeout and trust roots.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};

use super::connections::{Connections, Lease};
use super::error::{ClientError, root_cause};
use crate::tls::crypto_provider;

/// A backend's client. Request bodies are whole (`Full<Bytes>`): the gateway reads a request
/// under its size cap before choosing where it goes. Clones share connections.
#[derive(Clone)]
pub enum UpstreamClient {
    Http(Connections),
    /// Boxed: it is far larger than the other, and a backend holds one either way.
    Https(Box<Client<HttpsConnector<HttpConnector>, Full<Bytes>>>),
}

impl UpstreamClient {
    /// Keep-alive connections waiting for a request (http backends; hyper-util does not say).
    pub fn idle_connections(&self) -> Option<usize> {
        match self {
            Self::Http(connections) => Some(connections.idle()),
            Self::Https(_) => None,
        }
    }

    /// Sends `request`; the `Lease` holds the connection until the answer's body is done with.
    /// Not an async fn: the future is the chosen client's own, without a state machine around
    /// it that the request and the inner future would be moved into on every request.
    pub fn send(
        &self,
        request: Request<Full<Bytes>>,
    ) -> impl Future<Output = Result<(Response<Incoming>, Lease), ClientError>> + Send + '_ {
        match self {
            Self::Http(connections) => Either::Left(connections.send(request)),
            Self::Https(client) => Either::Right(send_https(client, request)),
        }
    }
}

async fn send_https(
    client: &Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<(Response<Incoming>, Lease), ClientError> {
    match client.request(request).await {
        Ok(response) => Ok((response, Lease::default())),
        Err(e) if e.is_connect() => Err(ClientError::Connect(root_cause(&e))),
        Err(e) => Err(ClientError::Failed(root_cause(&e))),
    }
}

/// Idle pooled https connections are closed after this; NIM's own keep-alive is longer.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The client for the backend at `base`, with the given connect timeout, trusting the webpki
/// roots and `extra_ca` for https.
pub fn build(
    base: &Uri,
    connect_timeout: Duration,
    extra_ca: Option<&[CertificateDer<'static>]>,
) -> Result<UpstreamClient, String> {
    if base.scheme_str() == Some("http") {
        return Connections::new(base, connect_timeout).map(UpstreamClient::Http);
    }
    https(connect_timeout, extra_ca).map(|client| UpstreamClient::Https(Box::new(client)))
}

/// hyper-util's pooled client over rustls, h2 or HTTP/1.1 by ALPN.
fn https(
    connect_timeout: Duration,
    extra_ca: Option<&[CertificateDer<'static>]>,
) -> Result<Client<HttpsConnector<HttpConnector>, Full<Bytes>>, String> {
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
