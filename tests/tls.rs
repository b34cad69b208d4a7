//! TLS on both sides with a test CA generated here (rcgen, `test_pki`): an https backend trusted through
//! its `ca_file` (and refused without it), the gateway's own TLS listener negotiating h2, and
//! its certificate rotated without a restart.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use nimgate::config::raw::{RawBackend, RawConfig, RawTls};
use nimgate_tests::*;

const LLAMA: &str = "meta/llama-3.1-8b-instruct";

/// A CA and a `localhost` certificate it signed, as PEM, written to a temporary directory.
struct TestPki {
    _dir: tempfile::TempDir,
    ca_pem: String,
    ca_file: PathBuf,
    cert_pem: String,
    key_pem: String,
    cert_file: PathBuf,
    key_file: PathBuf,
}

fn pki() -> TestPki {
    let (ca_pem, cert_pem, key_pem) = test_pki(&["localhost"]);
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, cert_file, key_file) =
        (dir.path().join("ca.pem"), dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&ca_file, &ca_pem).unwrap();
    std::fs::write(&cert_file, &cert_pem).unwrap();
    std::fs::write(&key_file, &key_pem).unwrap();
    TestPki { _dir: dir, ca_pem, ca_file, cert_pem, key_pem, cert_file, key_file }
}

async fn https_sim(pki: &TestPki) -> nim_sim::Sim {
    sim(SimOptions {
        models: vec![LLAMA.into()],
        tokens: 4,
        tls: Some(nim_sim::SimTls { cert_pem: pki.cert_pem.clone(), key_pem: pki.key_pem.clone() }),
        ..SimOptions::default()
    })
    .await
}

#[tokio::test]
async fn an_https_backend_is_reached_through_rustls_with_its_ca_file() {
    let pki = pki();
    let sim = https_sim(&pki).await;
    assert!(sim.url().starts_with("https://localhost:"));
    let gw = gateway()
        .backend_with(RawBackend {
            name: "secure".into(),
            url: sim.url(),
            ca_file: Some(pki.ca_file.display().to_string()),
            ..RawBackend::default()
        })
        .route(LLAMA, &["secure"])
        .key("team-a", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");

    let reply = client.chat(LLAMA).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let mut body = client.chat_stream(LLAMA).await.into_body();
    let text: String = all_frames(&mut body).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(sim.stats().completed, 2);
}

#[tokio::test]
async fn an_https_backend_with_an_untrusted_certificate_is_refused() {
    let pki = pki();
    let sim = https_sim(&pki).await;
    let gw =
        gateway().backend("untrusted", &sim.url()).route(LLAMA, &["untrusted"]).key("team-a", &["*"]).start().await;
    gw.client("team-a").chat(LLAMA).await.assert_error(502, "upstream_unavailable");
    // The cause is the operators' to read, in /admin/backends (and the access line).
    let errors = gw.admin_backend("untrusted").await["recent_errors"].to_string();
    assert!(errors.to_lowercase().contains("certificate"), "{errors}");
    assert_eq!(sim.stats().requests, 0);
}

/// A gateway serving TLS with `pki`'s certificate, in front of `backend`, with `change` made
/// to its config.
async fn tls_gateway(pki: &TestPki, backend: &nim_sim::Sim, change: impl FnOnce(&mut RawConfig)) -> TestGateway {
    gateway()
        .sim_route(LLAMA, &[backend])
        .key("team-a", &["*"])
        .with(|raw| {
            raw.server.tls =
                Some(RawTls { cert: pki.cert_file.display().to_string(), key: pki.key_file.display().to_string() });
            change(raw);
        })
        .start()
        .await
}

#[tokio::test]
async fn the_gateway_serves_tls_with_h2_by_alpn() {
    let pki = pki();
    let backend = sim_serving(&[LLAMA]).await;
    let gw = tls_gateway(&pki, &backend, |_| {}).await;

    let client = https_client_trusting(&pki.ca_pem);

    let url = format!("https://localhost:{}", gw.running.addr().port());
    let request = TestClient::new(&url, Some(format!("Bearer {}", secret("team-a")))).request(
        Method::POST,
        "/v1/chat/completions",
        chat_body(LLAMA, false).to_string(),
        &[],
    );
    let response = client.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("chat.completion"));
}

#[tokio::test]
async fn a_tls_client_that_goes_silent_after_its_handshake_is_closed_by_the_first_bytes_deadline() {
    use tokio::io::AsyncReadExt;
    let pki = pki();
    let backend = sim_serving(&[LLAMA]).await;
    let gw = tls_gateway(&pki, &backend, |raw| raw.server.header_read_timeout = Some("400ms".into())).await;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(&pki.ca_pem)));
    let tcp = tokio::net::TcpStream::connect(gw.running.addr()).await.unwrap();
    let started = std::time::Instant::now();
    let mut tls = connector.connect("localhost".try_into().unwrap(), tcp).await.expect("the handshake completes");
    let mut buffer = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(3), tls.read(&mut buffer)).await;
    assert!(matches!(read, Ok(Ok(0) | Err(_))), "the silent TLS connection stayed open: {read:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

fn client_tls(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// A client that trusts only `ca_pem` (h2 or HTTP/1.1 by ALPN), one fresh connection per
/// request so that each sees the certificate served at that moment.
fn https_client_trusting(
    ca_pem: &str,
) -> hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let tls = client_tls(ca_pem);
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build::<_, Full<Bytes>>(connector)
}

#[tokio::test]
async fn a_rotated_certificate_is_served_from_the_next_connection_without_a_restart() {
    let (old, new) = (pki(), pki());
    // The served files live in their own directory, as a mounted Secret does.
    let secret_dir = tempfile::tempdir().unwrap();
    let (cert, key) = (secret_dir.path().join("tls.crt"), secret_dir.path().join("tls.key"));
    std::fs::copy(&old.cert_file, &cert).unwrap();
    std::fs::copy(&old.key_file, &key).unwrap();
    let backend = sim_serving(&[LLAMA]).await;
    let gw = gateway()
        .sim_route(LLAMA, &[&backend])
        .key("team-a", &["*"])
        .with(|raw| raw.server.tls = Some(RawTls { cert: cert.display().to_string(), key: key.display().to_string() }))
        .start_from_file()
        .await;
    let chat = || https_chat(&gw);
    let (trusts_old, trusts_new) = (https_client_trusting(&old.ca_pem), https_client_trusting(&new.ca_pem));
    assert_eq!(trusts_old.request(chat()).await.unwrap().status(), 200);
    assert!(trusts_new.request(chat()).await.is_err());

    // Rotation: new key first, then the certificate, as a renewal writes them.
    std::fs::copy(&new.key_file, &key).unwrap();
    std::fs::copy(&new.cert_file, &cert).unwrap();
    eventually("the new certificate is served", Duration::from_secs(3), || async {
        trusts_new.request(chat()).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(trusts_old.request(chat()).await.is_err(), "the old certificate is no longer served");
}

#[tokio::test]
async fn the_watch_follows_the_certificate_to_a_directory_named_by_a_reload() {
    let (first, second, third) = (pki(), pki(), pki());
    let (old_dir, new_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let place = |dir: &std::path::Path, pki: &TestPki| {
        std::fs::copy(&pki.key_file, dir.join("tls.key")).unwrap();
        std::fs::copy(&pki.cert_file, dir.join("tls.crt")).unwrap();
    };
    let tls_in = |dir: &std::path::Path| RawTls {
        cert: dir.join("tls.crt").display().to_string(),
        key: dir.join("tls.key").display().to_string(),
    };
    place(old_dir.path(), &first);
    let backend = sim_serving(&[LLAMA]).await;
    let gw = gateway()
        .sim_route(LLAMA, &[&backend])
        .key("team-a", &["*"])
        .with(|raw| raw.server.tls = Some(tls_in(old_dir.path())))
        .start_from_file()
        .await;
    let chat = || https_chat(&gw);
    // A reload moves the certificate to a directory nobody watched at start...
    place(new_dir.path(), &second);
    let mut raw: nimgate::config::raw::RawConfig = serde_json::from_slice(&std::fs::read(&gw.path).unwrap()).unwrap();
    raw.server.tls = Some(tls_in(new_dir.path()));
    write_config(&gw.path, &raw);
    let trusts_second = https_client_trusting(&second.ca_pem);
    eventually("the reload by the file watch serves the moved certificate", Duration::from_secs(3), || async {
        trusts_second.request(chat()).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
    // Past the debounce: nothing about the config file is pending any more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.reloads("ok").await, 1);
    // ... and its renewal there is served without another reload by hand.
    place(new_dir.path(), &third);
    let trusts_third = https_client_trusting(&third.ca_pem);
    eventually("the renewed certificate in the new directory is served", Duration::from_secs(3), || async {
        trusts_third.request(chat()).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
}

/// A chat request of team-a to the TLS listener of `gw`, by its certificate's name.
fn https_chat(gw: &FileGateway) -> http::Request<http_body_util::Full<bytes::Bytes>> {
    let url = format!("https://localhost:{}", gw.gw.running.addr().port());
    TestClient::new(&url, Some(format!("Bearer {}", secret("team-a")))).request(
        Method::POST,
        "/v1/chat/completions",
        chat_body(LLAMA, false).to_string(),
        &[],
    )
}
