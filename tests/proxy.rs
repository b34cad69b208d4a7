//! The proxy path over real sockets: gateway and simulated NIMs in-process on loopback.
//! Round trips, streaming without buffering, cancellation, header rules, byte-exact bodies,
//! aliases, upstream errors passed through, model listing, failover on unreachable backends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use nimgate::config::raw::{RawBackend, RawRoute};
use nimgate_tests::*;
use serde_json::json;

const LLAMA: &str = "meta/llama-3.1-8b-instruct";

#[tokio::test]
async fn non_streaming_chat_round_trips_with_usage() {
    let sim = sim_serving(&[LLAMA]).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;

    let reply = gw.client("team-a").chat(LLAMA).await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], LLAMA);
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert!(body["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    assert_eq!(sim.stats().completed, 1);
}

#[tokio::test]
async fn streaming_chat_arrives_as_sse_ending_in_done() {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], tokens: 5, ..SimOptions::default() }).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;

    let response = gw.client("team-a").chat_stream(LLAMA).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let mut body = response.into_body();
    let text: String = all_frames(&mut body).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();

    let events = sse_data(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<serde_json::Value> =
        events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert!(!content.is_empty());
    assert_eq!(
        chunks.iter().filter(|c| c["choices"][0]["delta"]["content"].as_str().is_some_and(|s| !s.is_empty())).count(),
        5
    );
    assert!(chunks.iter().all(|c| c.get("usage").is_none_or(|u| u.is_null())), "no usage chunk unless asked for");
}

#[tokio::test]
async fn stream_usage_chunk_passes_through_when_the_client_asks() {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], tokens: 3, ..SimOptions::default() }).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;
    let mut request = chat_body(LLAMA, true);
    request["stream_options"] = json!({ "include_usage": true });
    let client = gw.client("team-a");
    let response = client.send(client.request(Method::POST, "/v1/chat/completions", request.to_string(), &[])).await;
    let mut body = response.into_body();
    let text: String = all_frames(&mut body).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    let events = sse_data(&text);
    let usage: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    assert_eq!(usage["choices"], json!([]));
}

#[tokio::test]
async fn stream_chunks_reach_the_client_before_the_next_one_is_produced() {
    let sim =
        sim(SimOptions { models: vec![LLAMA.into()], tokens: 3, gated_chunks: true, ..SimOptions::default() }).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;

    let response = gw.client("team-a").chat_stream(LLAMA).await;
    let mut body = response.into_body();
    let role = next_frame(&mut body, Duration::from_secs(5)).await.unwrap();
    assert!(String::from_utf8_lossy(&role).contains("\"role\":\"assistant\""));

    for n in 1..=3u64 {
        sim.release_chunks(1);
        // The sim has produced chunk n and not n+1 (it waits for the next permit): if the
        // gateway buffered, this frame would never arrive and the read would time out.
        let frame = next_frame(&mut body, Duration::from_secs(5)).await.unwrap();
        let text = String::from_utf8_lossy(&frame);
        assert!(text.starts_with("data: ") && text.contains("\"content\""), "{text}");
        assert_eq!(sim.stats().chunks_sent, n);
    }
    let rest: String = all_frames(&mut body).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
}

#[tokio::test]
async fn a_client_leaving_mid_stream_cancels_the_upstream_generation() {
    let sim = sim(SimOptions {
        models: vec![LLAMA.into()],
        tokens: 10_000,
        chunk_delay: Duration::from_millis(20),
        ..SimOptions::default()
    })
    .await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;

    let response = gw.client("team-a").chat_stream(LLAMA).await;
    let mut body = response.into_body();
    next_frame(&mut body, Duration::from_secs(5)).await.unwrap();
    next_frame(&mut body, Duration::from_secs(5)).await.unwrap();
    drop(body);

    eventually("the sim sees its stream cancelled", Duration::from_secs(5), || async { sim.stats().cancelled == 1 })
        .await;
    let produced = sim.stats().chunks_sent;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(sim.stats().chunks_sent, produced, "generation stopped");
    assert_eq!(sim.stats().completed, 0);
}

#[tokio::test]
async fn a_client_leaving_before_the_answer_cancels_the_upstream_request() {
    let sim = sim(SimOptions {
        models: vec![LLAMA.into()],
        failures: Failures { hang: true, ..Failures::default() },
        ..SimOptions::default()
    })
    .await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;

    let client = gw.client("team-a");
    let pending = tokio::time::timeout(Duration::from_millis(300), client.chat(LLAMA)).await;
    assert!(pending.is_err(), "the sim hangs, so the client gives up");

    eventually("the sim sees the request cancelled", Duration::from_secs(5), || async { sim.stats().cancelled == 1 })
        .await;
}

#[tokio::test]
async fn the_backend_credential_replaces_the_clients() {
    let sim = sim(SimOptions {
        models: vec![LLAMA.into()],
        api_key: Some("nvapi-backend-secret".into()),
        record_requests: true,
        ..SimOptions::default()
    })
    .await;
    let gw = gateway()
        .backend_with(RawBackend {
            name: "hosted".into(),
            url: sim.url(),
            api_key_env: Some("TEST_NIM_KEY".into()),
            ..RawBackend::default()
        })
        .env("TEST_NIM_KEY", "nvapi-backend-secret")
        .route(LLAMA, &["hosted"])
        .key("team-a", &["*"])
        .start()
        .await;

    let reply = gw.client("team-a").chat(LLAMA).await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    let seen = sim.recorded();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].headers["authorization"], "Bearer nvapi-backend-secret");
    assert!(!format!("{:?}", seen[0].headers).contains(&secret("team-a")));
}

#[tokio::test]
async fn without_a_backend_credential_the_clients_is_still_not_forwarded() {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], record_requests: true, ..SimOptions::default() }).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;
    assert_eq!(gw.client("team-a").chat(LLAMA).await.status, 200);
    assert!(sim.recorded()[0].headers.get("authorization").is_none());
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_others_forwarded() {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], record_requests: true, ..SimOptions::default() }).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;
    let client = gw.client("team-a");
    let request = client.request(
        Method::POST,
        "/v1/chat/completions",
        chat_body(LLAMA, false).to_string(),
        &[
            ("connection", "keep-alive, x-hop-secret"),
            ("x-hop-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("x-team", "search"),
            // Identity claims a client must not be able to make to a backend.
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-host", "admin.internal"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=10.0.0.1"),
            ("x-real-ip", "10.0.0.1"),
        ],
    );
    assert_eq!(client.fetch(request).await.status, 200);
    let headers = &sim.recorded()[0].headers;
    assert!(headers.get("x-hop-secret").is_none());
    assert!(headers.get("keep-alive").is_none());
    for spoofed in ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "forwarded", "x-real-ip"] {
        assert!(headers.get(spoofed).is_none(), "{spoofed} reached the backend");
    }
    assert_eq!(headers["x-team"], "search");
    assert_eq!(headers["content-type"], "application/json");
}

#[tokio::test]
async fn a_client_request_id_is_kept_sent_upstream_and_returned() {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], record_requests: true, ..SimOptions::default() }).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;
    let client = gw.client("team-a");

    let request = client.request(
        Method::POST,
        "/v1/chat/completions",
        chat_body(LLAMA, false).to_string(),
        &[("x-request-id", "trace-42")],
    );
    let reply = client.fetch(request).await;
    assert_eq!(reply.header("x-request-id"), Some("trace-42"));
    assert_eq!(sim.recorded()[0].headers["x-request-id"], "trace-42");

    let reply = client.chat(LLAMA).await;
    let generated = reply.header("x-request-id").unwrap().to_owned();
    assert_eq!(generated.len(), 32);
    assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(sim.recorded()[1].headers["x-request-id"], generated.as_str());

    // Errors carry one too.
    let reply = client.chat("no/such-model").await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.header("x-request-id").map(str::len), Some(32));
}

#[tokio::test]
async fn tool_calls_and_a_multi_megabyte_image_pass_through_byte_identical() {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], record_requests: true, ..SimOptions::default() }).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;
    // Odd spacing, key order and escapes: none of it may be normalised on the way.
    let image = "QUJD".repeat(1024 * 1024); // 4 MiB of base64
    let body = format!(
        r#"{{ "messages" : [{{"role":"user","content":[{{"type":"text","text":"what is \u00e9 in this \"image\"?"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}]}}],
  "tools":[{{"type":"function","function":{{"name":"lookup_weather","description":"Weather","parameters":{{"type":"object","properties":{{"city":{{"type":"string"}}}},"required":["city"]}}}}}}],
  "tool_choice":"auto", "model":"{LLAMA}", "temperature":0.2 }}"#
    );
    let reply = gw.client("team-a").post("/v1/chat/completions", body.clone()).await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(sim.recorded()[0].body, Bytes::from(body));
    let answer = reply.json();
    assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "lookup_weather");
}

#[tokio::test]
async fn an_alias_is_rewritten_in_place_and_nothing_else_changes() {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], record_requests: true, ..SimOptions::default() }).await;
    let gw = gateway()
        .backend("nim", &sim.url())
        .route_with(RawRoute {
            model: "llama".into(),
            backends: vec!["nim".into()],
            upstream_model: Some(LLAMA.into()),
            ..RawRoute::default()
        })
        .key("team-a", &["llama"])
        .start()
        .await;
    let body = r#"{"model" :  "llama", "messages":[{"role":"user","content":"model: llama"}],"max_tokens":4}"#;

    let reply = gw.client("team-a").post("/v1/chat/completions", body).await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    let expected =
        format!(r#"{{"model" :  "{LLAMA}", "messages":[{{"role":"user","content":"model: llama"}}],"max_tokens":4}}"#);
    assert_eq!(sim.recorded()[0].body, Bytes::from(expected));
    assert_eq!(sim.recorded()[0].headers["content-length"], sim.recorded()[0].body.len().to_string().as_str());
}

#[tokio::test]
async fn a_route_that_passes_priority_sends_the_keys_in_place_of_the_clients() {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], record_requests: true, ..SimOptions::default() }).await;
    let gw = gateway()
        .backend("vllm", &sim.url())
        .route_with(RawRoute {
            model: LLAMA.into(),
            backends: vec!["vllm".into()],
            pass_priority: Some(true),
            ..RawRoute::default()
        })
        .key("interactive", &["*"])
        .key("batch", &["*"])
        .with(|raw| raw.keys[1].priority = Some(10))
        .start()
        .await;
    let plain = r#"{"model":"meta/llama-3.1-8b-instruct","messages":[],"max_tokens":4}"#;
    let claimed = r#"{"model":"meta/llama-3.1-8b-instruct","priority": -100,"messages":[],"max_tokens":4}"#;
    for (key, body) in [("interactive", plain), ("batch", plain), ("batch", claimed)] {
        assert_eq!(gw.client(key).post("/v1/chat/completions", body).await.status, 200);
    }
    let sent: Vec<String> = sim.recorded().iter().map(|r| String::from_utf8_lossy(&r.body).into_owned()).collect();
    assert_eq!(sent[0], r#"{"priority":0,"model":"meta/llama-3.1-8b-instruct","messages":[],"max_tokens":4}"#);
    assert_eq!(sent[1], r#"{"priority":10,"model":"meta/llama-3.1-8b-instruct","messages":[],"max_tokens":4}"#);
    assert_eq!(sent[2], r#"{"model":"meta/llama-3.1-8b-instruct","priority": 10,"messages":[],"max_tokens":4}"#);
    // A stream that asks for its usage on the client's behalf carries both edits.
    let stream = r#"{"model":"meta/llama-3.1-8b-instruct","stream":true,"messages":[]}"#;
    let reply = gw.client("batch").post("/v1/chat/completions", stream).await;
    assert!(reply.status == 200 && reply.text().ends_with("data: [DONE]\n\n"), "{}", reply.text());
    let last = String::from_utf8_lossy(&sim.recorded()[3].body).into_owned();
    let upstream: serde_json::Value = serde_json::from_str(&last).unwrap();
    assert_eq!(
        (upstream["priority"].as_i64(), upstream["stream_options"]["include_usage"].as_bool()),
        (Some(10), Some(true))
    );
}

#[tokio::test]
async fn an_upstream_error_response_reaches_the_client_unchanged() {
    let sim = sim(SimOptions {
        models: vec![LLAMA.into()],
        failures: Failures { error_rate: 1.0, error_status: 503, ..Failures::default() },
        ..SimOptions::default()
    })
    .await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;

    let reply = gw.client("team-a").chat(LLAMA).await;

    assert_eq!(reply.status, 503);
    let body = reply.json();
    assert_eq!(body["error"]["code"], 503, "NIM's envelope, untouched: {body}");

    // And a 404 for a model the backend does not know.
    let other = sim_serving(&["some/other-model"]).await;
    let gw = gateway().sim_route("*", &[&other]).key("team-a", &["*"]).start().await;
    let reply = gw.client("team-a").chat(LLAMA).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.json()["error"]["code"], 404);
}

#[tokio::test]
async fn completions_and_embeddings_are_routed_by_model() {
    let sim = sim_serving(&[LLAMA, "nvidia/nv-embedqa-e5-v5"]).await;
    let gw = gateway().sim_route("*", &[&sim]).key("team-a", &["*"]).start().await;
    let client = gw.client("team-a");

    let reply =
        client.post_json("/v1/completions", &json!({ "model": LLAMA, "prompt": "Once upon", "max_tokens": 4 })).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["object"], "text_completion");

    let reply =
        client.post_json("/v1/embeddings", &json!({ "model": "nvidia/nv-embedqa-e5-v5", "input": ["a", "b"] })).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.json()["data"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn an_unreachable_backend_is_skipped_for_the_next_in_the_pool_then_the_fallback() {
    let live = sim_serving(&[LLAMA]).await;
    let dead = closed_port_url().await;
    let gw = gateway()
        .backend("dead", &dead)
        .backend("live", &live.url())
        .route("pool", &["dead", "live"])
        .route_with(RawRoute {
            model: LLAMA.into(),
            backends: vec!["dead".into()],
            fallback: vec!["live".into()],
            ..RawRoute::default()
        })
        .with(|raw| raw.routes[0].upstream_model = Some(LLAMA.into()))
        .key("team-a", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");
    for _ in 0..4 {
        assert_eq!(client.chat("pool").await.status, 200);
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    assert_eq!(live.stats().requests, 8);
}

#[tokio::test]
async fn models_lists_exact_routes_and_what_glob_backends_report() {
    let nvidia = sim_serving(&[
        "nvidia/llama-3.1-nemotron-70b-instruct",
        "nvidia/nv-embedqa-e5-v5",
        "meta/llama-3.1-8b-instruct",
    ])
    .await;
    let gw = gateway()
        .sim_route(LLAMA, &[&nvidia])
        .sim_route("nvidia/*", &[&nvidia])
        .key("all", &["*"])
        .key("meta-only", &["meta/*"])
        .start()
        .await;

    let reply = gw.client("all").get("/v1/models").await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [LLAMA, "nvidia/llama-3.1-nemotron-70b-instruct", "nvidia/nv-embedqa-e5-v5"]);
    assert!(body["data"].as_array().unwrap().iter().all(|m| m["object"] == "model" && m["owned_by"].is_string()));

    let reply = gw.client("meta-only").get("/v1/models").await;
    let ids: Vec<String> =
        reply.json()["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(ids, [LLAMA]);
}

#[tokio::test]
async fn backend_model_lists_are_cached_not_fetched_per_call() {
    let sim = sim(SimOptions { models: vec!["nvidia/a".into()], record_requests: true, ..SimOptions::default() }).await;
    let gw = gateway().sim_route("nvidia/*", &[&sim]).key("all", &["*"]).start().await;
    for _ in 0..3 {
        let reply = gw.client("all").get("/v1/models").await;
        assert_eq!(reply.json()["data"][0]["id"], "nvidia/a");
    }
    assert_eq!(sim.recorded().iter().filter(|r| r.path == "/v1/models").count(), 1);
}

#[tokio::test]
async fn concurrent_model_lists_share_one_backend_fetch() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A backend that takes 200 ms to list its models, counting how often it is asked.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let asked = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&asked);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                let body = r#"{"object":"list","data":[{"id":"nvidia/a","object":"model"}]}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    let gw = gateway().backend("slow", &url).route("nvidia/*", &["slow"]).key("all", &["*"]).start().await;
    let mut lists = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let client = gw.client("all");
        lists.spawn(async move { client.get("/v1/models").await });
    }
    while let Some(reply) = lists.join_next().await {
        assert_eq!(reply.unwrap().json()["data"][0]["id"], "nvidia/a");
    }
    assert_eq!(asked.load(Ordering::SeqCst), 1, "eight callers, one fetch");
}

#[tokio::test]
async fn health_endpoints_answer_without_a_key() {
    let sim = sim_serving(&[LLAMA]).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;
    for path in ["/health/live", "/health/ready", "/v1/health/live", "/v1/health/ready"] {
        let reply = gw.anonymous().get(path).await;
        assert_eq!(reply.status, 200, "{path}");
        assert!(reply.json()["status"].is_string());
    }
}

#[tokio::test]
async fn h2_clients_are_served_and_streamed() {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], tokens: 4, ..SimOptions::default() }).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<Bytes>>();
    let request =
        gw.client("team-a").request(Method::POST, "/v1/chat/completions", chat_body(LLAMA, true).to_string(), &[]);
    let response = h2.request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let text = String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
}

/// A URL on which nothing listens.
async fn closed_port_url() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

/// A backend that answers each request and closes its connection soon after without saying so
/// (no `Connection: close`), as servers do when their keep-alive timeout ends.
async fn closing_backend() -> (String, Arc<AtomicU64>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let served = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&served);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 4096];
                // Head and body: the gateway sends a Content-Length; read until it is all here.
                loop {
                    let Ok(n) = socket.read(&mut buffer).await else { return };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&request);
                    if let Some((head, body)) = text.split_once("\r\n\r\n") {
                        let length = head
                            .lines()
                            .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length: ").map(str::to_owned))
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .unwrap_or(0);
                        if body.len() >= length {
                            break;
                        }
                    }
                }
                let body = r#"{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
                counter.fetch_add(1, Ordering::Relaxed);
                // Closed a moment later, while the connection waits idle in nimgate's pool.
                tokio::time::sleep(Duration::from_millis(20)).await;
            });
        }
    });
    (url, served)
}

#[tokio::test]
async fn a_backend_closing_its_idle_connections_costs_no_request() {
    let (url, served) = closing_backend().await;
    let gw = gateway().backend("closing", &url).route(LLAMA, &["closing"]).key("team-a", &["*"]).start().await;
    let client = gw.client("team-a");
    for i in 0..10 {
        let reply = client.chat(LLAMA).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
        // Past the close: the idle connection is dead when the next request comes.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert_eq!(served.load(Ordering::Relaxed), 10);
}
