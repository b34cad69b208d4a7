//! Client connections under hostile clients, over real sockets: the first-bytes deadline
//! (nothing sent, `P`, half an h2 preface, half a head), the connection cap, idle keep-alive
//! and idle h2 connections that answer pings, slow heads on a kept-alive connection, heads
//! over `max_header_bytes`, and a client that stops reading its stream.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use nimgate_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LLAMA: &str = "meta/llama-3.1-8b-instruct";

fn addr(gw: &TestGateway) -> SocketAddr {
    gw.running.addr()
}

/// Reads until the gateway closes the connection; how long that took. Bytes it sends first
/// (a response) are read and dropped.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buffer)).await {
            Ok(Ok(0) | Err(_)) => return started.elapsed(),
            Ok(Ok(_)) => continue,
            Err(_) => panic!("the gateway kept the connection open for {limit:?}"),
        }
    }
}

/// One HTTP/1.1 chat request on `stream`, its response read whole (by Content-Length).
async fn chat_on(stream: &mut TcpStream, key: &str) -> String {
    let body = serde_json::to_vec(&chat_body(LLAMA, false)).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        secret(key),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer)).await.unwrap().unwrap();
        assert!(n > 0, "connection closed mid-response: {}", String::from_utf8_lossy(&received));
        received.extend_from_slice(&buffer[..n]);
        let text = String::from_utf8_lossy(&received).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap()))
                .expect("a content-length");
            if received.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

async fn sim_gateway(with: impl FnOnce(&mut nimgate::config::RawConfig)) -> (nim_sim::Sim, TestGateway) {
    let sim = sim_serving(&[LLAMA]).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team", &["*"]).with(with).start().await;
    (sim, gw)
}

#[tokio::test]
async fn silent_and_half_open_connections_are_closed_by_the_first_bytes_deadline() {
    let (_sim, gw) = sim_gateway(|raw| raw.server.header_read_timeout = Some("300ms".into())).await;
    let openings: [&[u8]; 4] =
        [b"", b"P", b"PRI * HTTP/2.0\r\n", b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"];
    let mut clients = Vec::new();
    for opening in openings {
        let mut stream = TcpStream::connect(addr(&gw)).await.unwrap();
        stream.write_all(opening).await.unwrap();
        clients.push((opening, stream));
    }
    for (opening, mut stream) in clients {
        let took = closed_within(&mut stream, Duration::from_secs(3)).await;
        assert!(took < Duration::from_secs(2), "{:?} closed after {took:?}", String::from_utf8_lossy(opening));
    }
    let (_, samples) = scrape(&gw).await;
    assert_eq!(value(&samples, "nimgate_connections_expired_total{reason=\"first_bytes\"}"), 4.0);
    // A real client is served as before.
    assert_eq!(gw.client("team").chat(LLAMA).await.status, 200);
}

#[tokio::test]
async fn a_thousand_silent_connections_over_max_connections_do_not_lock_out_a_real_client() {
    // Each silent connection costs two descriptors here (client and server side, one process).
    let limit = raise_open_files_limit(4096);
    let silent = if limit >= 2600 { 1000 } else { ((limit - 200) / 2) as usize };
    let cap = silent / 2;
    let (_sim, gw) = sim_gateway(|raw| {
        raw.server.header_read_timeout = Some("250ms".into());
        raw.server.max_connections = Some(cap as u32);
    })
    .await;
    let mut sockets = Vec::with_capacity(silent);
    for _ in 0..silent {
        sockets.push(TcpStream::connect(addr(&gw)).await.unwrap());
    }
    let started = Instant::now();
    let reply = gw.client("team").chat(LLAMA).await;
    let served_in = started.elapsed();
    assert_eq!(reply.status, 200);
    assert!(
        served_in < Duration::from_secs(1),
        "{silent} silent connections (cap {cap}) delayed a client {served_in:?}"
    );
    for stream in &mut sockets {
        closed_within(stream, Duration::from_secs(5)).await;
    }
    let (_, samples) = scrape(&gw).await;
    assert!(value(&samples, "nimgate_connection_limit_reached_total") >= 1.0);
    assert!(value(&samples, "nimgate_connections_expired_total{reason=\"first_bytes\"}") >= silent as f64);
    println!("{silent} silent connections, max_connections {cap}: a real request served in {served_in:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_lives_for_the_idle_timeout_not_the_header_timeout() {
    let (_sim, gw) = sim_gateway(|raw| {
        raw.server.header_read_timeout = Some("400ms".into());
        raw.server.idle_timeout = Some("1500ms".into());
    })
    .await;
    let mut stream = TcpStream::connect(addr(&gw)).await.unwrap();
    assert!(chat_on(&mut stream, "team").await.starts_with("HTTP/1.1 200"));
    // Idle for longer than header_read_timeout: still open, and serves the next request.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(chat_on(&mut stream, "team").await.starts_with("HTTP/1.1 200"));
    let idle = closed_within(&mut stream, Duration::from_secs(5)).await;
    assert!(idle >= Duration::from_millis(1200), "closed after {idle:?}, before idle_timeout");
    let (_, samples) = scrape(&gw).await;
    assert_eq!(value(&samples, "nimgate_connections_expired_total{reason=\"idle\"}"), 1.0);
}

#[tokio::test]
async fn a_slow_head_on_a_kept_alive_connection_is_closed_after_the_header_timeout() {
    let (_sim, gw) = sim_gateway(|raw| {
        raw.server.header_read_timeout = Some("400ms".into());
        raw.server.idle_timeout = Some("30s".into());
    })
    .await;
    let mut stream = TcpStream::connect(addr(&gw)).await.unwrap();
    assert!(chat_on(&mut stream, "team").await.starts_with("HTTP/1.1 200"));
    stream.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHo").await.unwrap();
    let took = closed_within(&mut stream, Duration::from_secs(5)).await;
    assert!(took < Duration::from_secs(2), "a stalled head kept the connection {took:?}");
    let (_, samples) = scrape(&gw).await;
    assert_eq!(value(&samples, "nimgate_connections_expired_total{reason=\"header_read\"}"), 1.0);
}

#[tokio::test]
async fn an_idle_h2_connection_answering_pings_is_closed_with_goaway_after_the_idle_timeout() {
    let (_sim, gw) = sim_gateway(|raw| raw.server.idle_timeout = Some("800ms".into())).await;
    let io = TokioIo::new(TcpStream::connect(addr(&gw)).await.unwrap());
    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_millis(100))
        .keep_alive_while_idle(true)
        .handshake::<_, Full<Bytes>>(io)
        .await
        .unwrap();
    let connection = tokio::spawn(connection);
    let request = http::Request::post(format!("{}/v1/chat/completions", gw.url))
        .header("authorization", format!("Bearer {}", secret("team")))
        .body(Full::new(Bytes::from(serde_json::to_vec(&chat_body(LLAMA, false)).unwrap())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await;
    assert!(ended.is_ok(), "the idle h2 connection stayed open while it answered pings");
    assert!(started.elapsed() >= Duration::from_millis(500), "closed after {:?}", started.elapsed());
    let (_, samples) = scrape(&gw).await;
    assert_eq!(value(&samples, "nimgate_connections_expired_total{reason=\"idle\"}"), 1.0);
}

#[tokio::test]
async fn a_head_over_max_header_bytes_gets_431_in_openai_shape() {
    let (_sim, gw) = sim_gateway(|raw| raw.server.max_header_bytes = Some(4096)).await;
    let client = gw.client("team");
    let big = "x".repeat(5000);
    let request = client.request(
        http::Method::POST,
        "/v1/chat/completions",
        serde_json::to_vec(&chat_body(LLAMA, false)).unwrap(),
        &[("x-padding", &big)],
    );
    let reply = client.fetch(request).await;
    let message = reply.assert_error(431, "request_header_too_large");
    assert!(message.contains("4096"), "{message}");
    // Just under the limit passes.
    let fits = "x".repeat(3000);
    let request = client.request(
        http::Method::POST,
        "/v1/chat/completions",
        serde_json::to_vec(&chat_body(LLAMA, false)).unwrap(),
        &[("x-padding", &fits)],
    );
    assert_eq!(client.fetch(request).await.status, 200);
}

#[tokio::test]
async fn a_client_that_stops_reading_its_stream_loses_it_and_frees_the_backend() {
    // A long, fast stream: far more than the socket buffers hold.
    let sim = sim(SimOptions {
        models: vec![LLAMA.into()],
        tokens: 200_000,
        chunk_delay: Duration::ZERO,
        ..SimOptions::default()
    })
    .await;
    let gw = gateway()
        .backend("gpu", &sim.url())
        .route(LLAMA, &["gpu"])
        .key("team", &["*"])
        .with(|raw| raw.server.idle_timeout = Some("700ms".into()))
        .start()
        .await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr(&gw)).await.unwrap();
    let body = serde_json::to_vec(&chat_body(LLAMA, true)).unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
        secret("team"),
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let mut first = [0u8; 1024];
    assert!(stream.read(&mut first).await.unwrap() > 0);
    assert!(String::from_utf8_lossy(&first).starts_with("HTTP/1.1 200"));
    // Now the client reads nothing more but keeps its socket open.
    eventually("the backend slot is given back", Duration::from_secs(10), || async {
        gw.admin_backend("gpu").await["in_flight"] == 0
    })
    .await;
    eventually("the upstream request is cancelled", Duration::from_secs(5), || async { sim.stats().cancelled == 1 })
        .await;
    let (_, samples) = scrape(&gw).await;
    assert_eq!(value(&samples, "nimgate_connections_expired_total{reason=\"write_stalled\"}"), 1.0);
    drop(stream);
}
