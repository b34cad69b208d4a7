//! Every failure the gateway answers itself, over real sockets: status, contract code and the
//! OpenAI error shape, and that the backend was not bothered when it should not be.

use std::time::{Duration, Instant};

use http::Method;
use nimgate::config::raw::{RawBackend, RawTimeouts};
use nimgate_tests::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LLAMA: &str = "meta/llama-3.1-8b-instruct";

async fn setup() -> (nim_sim::Sim, TestGateway) {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], record_requests: true, ..SimOptions::default() }).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).max_body_bytes(64 * 1024).start().await;
    (sim, gw)
}

#[tokio::test]
async fn malformed_bodies_get_400_invalid_request_and_never_reach_a_backend() {
    let (sim, gw) = setup().await;
    let client = gw.client("team-a");
    let cases = [
        ("not json at all", "not valid JSON"),
        ("", "empty"),
        ("[1, 2]", "must be a JSON object"),
        (r#"{"messages": []}"#, "`model` is required"),
        (r#"{"model": 7, "messages": []}"#, "`model` must be a string"),
        (r#"{"model": ["a"], "messages": []}"#, "`model` must be a string"),
        (r#"{"model": "meta/llama-3.1-8b-instruct", "stream": "yes"}"#, "`stream` must be a boolean"),
    ];
    for (body, words) in cases {
        let reply = client.post("/v1/chat/completions", body).await;
        let message = reply.assert_error(400, "invalid_request");
        assert!(message.contains(words), "{body:?}: {message}");
        assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
    }
    assert_eq!(sim.stats().requests, 0);
}

#[tokio::test]
async fn an_unrouted_model_gets_404_model_not_found() {
    let (sim, gw) = setup().await;
    let reply = gw.client("team-a").chat("qwen/qwen2.5-7b-instruct").await;
    let message = reply.assert_error(404, "model_not_found");
    assert!(message.contains("qwen/qwen2.5-7b-instruct"));
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
    assert_eq!(sim.stats().requests, 0);
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_are_answered_not_forwarded() {
    let (sim, gw) = setup().await;
    let client = gw.client("team-a");
    client.get("/v1/assistants").await.assert_error(404, "not_found");
    let reply = client.get("/v1/chat/completions").await;
    reply.assert_error(405, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("POST"));
    let reply = client.post("/v1/models", "{}").await;
    reply.assert_error(405, "method_not_allowed");
    assert_eq!(reply.header("allow"), Some("GET"));
    assert_eq!(sim.stats().requests, 0);
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_by_its_content_length() {
    let (sim, gw) = setup().await;
    let big = json!({ "model": LLAMA, "messages": [{ "role": "user", "content": "x".repeat(70 * 1024) }] });
    let message =
        gw.client("team-a").post_json("/v1/chat/completions", &big).await.assert_error(413, "request_too_large");
    assert!(message.contains("65536"));
    assert_eq!(sim.stats().requests, 0);
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_gets_413_without_being_read_to_its_end() {
    let (_sim, gw) = setup().await;
    let mut stream = tokio::net::TcpStream::connect(gw.running.addr()).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n",
        secret("team-a")
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    // 80 KiB in chunks, over the 64 KiB cap, and never the terminating chunk: the gateway must
    // answer from what it has seen instead of waiting for (or buffering) the rest.
    let chunk = format!("{:x}\r\n{}\r\n", 8192, "y".repeat(8192));
    for _ in 0..10 {
        stream.write_all(chunk.as_bytes()).await.unwrap();
    }
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("request_too_large"), "{answer}");
}

#[tokio::test]
async fn a_refused_connection_gets_502_upstream_unavailable_at_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let gw = gateway().backend("dead", &dead).route(LLAMA, &["dead"]).key("team-a", &["*"]).start().await;

    let started = Instant::now();
    let reply = gw.client("team-a").chat(LLAMA).await;
    let message = reply.assert_error(502, "upstream_unavailable");
    assert_eq!(reply.json()["error"]["type"], "server_error");
    // No backend name, address or OS error reaches the client (they are in the access log).
    for internal in ["dead", "127.0.0.1", "os error", "refused"] {
        assert!(!message.contains(internal), "{internal} in a client error: {message}");
    }
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_connection_reset_before_the_answer_gets_502() {
    let sim = sim(SimOptions {
        models: vec![LLAMA.into()],
        failures: Failures { reset_after_chunks: Some(0), ..Failures::default() },
        ..SimOptions::default()
    })
    .await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;
    gw.client("team-a").chat(LLAMA).await.assert_error(502, "upstream_unavailable");
    assert_eq!(sim.stats().requests, 1, "a retry goes to another backend, never the same one: here there is none");
}

#[tokio::test]
async fn a_backend_too_slow_to_answer_gets_504_after_its_first_byte_timeout() {
    let sim = sim(SimOptions {
        models: vec![LLAMA.into()],
        failures: Failures { hang: true, ..Failures::default() },
        ..SimOptions::default()
    })
    .await;
    let gw = gateway()
        .backend_with(RawBackend {
            name: "slow".into(),
            url: sim.url(),
            timeouts: Some(RawTimeouts { first_byte: Some("300ms".into()), ..RawTimeouts::default() }),
            ..RawBackend::default()
        })
        .route(LLAMA, &["slow"])
        .key("team-a", &["*"])
        .start()
        .await;

    let started = Instant::now();
    let reply = gw.client("team-a").chat(LLAMA).await;
    let message = reply.assert_error(504, "upstream_timeout");
    assert!(!message.contains("slow"), "no backend name in a client error: {message}");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(3), "{took:?}");
    eventually("the abandoned upstream request is cancelled", Duration::from_secs(5), || async {
        sim.stats().cancelled == 1
    })
    .await;
}

#[tokio::test]
async fn a_stream_cut_mid_way_ends_with_an_error_event_and_no_done() {
    let sim = sim(SimOptions {
        models: vec![LLAMA.into()],
        tokens: 10,
        failures: Failures { reset_after_chunks: Some(2), ..Failures::default() },
        ..SimOptions::default()
    })
    .await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;
    let client = gw.client("team-a");
    let response = client
        .send(client.request(Method::POST, "/v1/chat/completions", chat_body(LLAMA, true).to_string(), &[]))
        .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut text = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), http_body_util::BodyExt::frame(&mut body)).await.unwrap() {
            Some(Ok(frame)) => text.push_str(&String::from_utf8_lossy(&frame.into_data().unwrap_or_default())),
            Some(Err(e)) => panic!("the error travels as an event, not as a broken connection: {e}"),
            None => break,
        }
    }
    assert!(!text.contains("[DONE]"), "a broken stream must not look complete: {text}");
    let events = sse_data(&text);
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "server_error", "{text}");
    assert_eq!(last["error"]["code"], "upstream_unavailable");
    assert!(events[..events.len() - 1].iter().all(|e| e.contains("chat.completion.chunk")), "{text}");
}

#[tokio::test(start_paused = true)]
async fn a_body_that_stops_arriving_gets_408_after_the_read_timeout() {
    let (sim, gw) = setup().await;
    let mut stream = tokio::net::TcpStream::connect(gw.running.addr()).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\":",
        secret("team-a")
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut answer = vec![0u8; 4096];
    let n = stream.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() >= nimgate::request::BODY_READ_TIMEOUT);
    assert_eq!(sim.stats().requests, 0);
}
