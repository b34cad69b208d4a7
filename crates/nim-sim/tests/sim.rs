//! nim-sim over real sockets: the shapes it answers, its GPU queue, its failure injection and
//! its counters, which the gateway's own tests rely on.

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nim_sim::{Failures, Sim, SimOptions};
use serde_json::{Value, json};

const LLAMA: &str = "meta/llama-3.1-8b-instruct";

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

fn post(sim: &Sim, path: &str, body: &Value) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::POST)
        .uri(format!("{}{path}", sim.url()))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

async fn send(sim: &Sim, path: &str, body: &Value) -> (StatusCode, Value) {
    let response = client().request(post(sim, path, body)).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

async fn get(sim: &Sim, path: &str) -> (StatusCode, String) {
    let request = Request::get(format!("{}{path}", sim.url())).body(Full::new(Bytes::new())).unwrap();
    let response = client().request(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

fn chat(stream: bool) -> Value {
    json!({ "model": LLAMA, "messages": [{ "role": "user", "content": "hi" }], "stream": stream })
}

/// The `data:` payloads of a whole SSE body.
async fn events(body: Incoming) -> Vec<String> {
    let bytes = body.collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: ").map(str::to_owned))
        .collect()
}

async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let start = Instant::now();
    while !condition() {
        assert!(start.elapsed() < Duration::from_secs(5), "not within 5s: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn chat_completion_has_openai_shape_and_usage() {
    let sim = Sim::start(SimOptions { tokens: 4, ..SimOptions::default() }).await.unwrap();
    let (status, body) = send(&sim, "/v1/chat/completions", &chat(false)).await;
    assert_eq!(status, 200);
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], LLAMA);
    assert_eq!(body["choices"][0]["message"]["content"], " The quick brown fox");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 4);
    let stats = sim.stats();
    assert_eq!((stats.requests, stats.completed, stats.generation_tokens), (1, 1, 4));
    assert!(stats.prompt_tokens > 0);

    let mut capped = chat(false);
    capped["max_tokens"] = json!(2);
    let (_, body) = send(&sim, "/v1/chat/completions", &capped).await;
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn a_stream_is_role_tokens_finish_optional_usage_then_done() {
    let sim = Sim::start(SimOptions { tokens: 3, ..SimOptions::default() }).await.unwrap();
    let plain =
        events(client().request(post(&sim, "/v1/chat/completions", &chat(true))).await.unwrap().into_body()).await;
    assert_eq!(plain.len(), 1 + 3 + 1 + 1);
    assert_eq!(plain.last().unwrap(), "[DONE]");
    let first: Value = serde_json::from_str(&plain[0]).unwrap();
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    let finish: Value = serde_json::from_str(&plain[4]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "stop");
    assert!(finish.get("usage").is_none());

    let mut with_usage = chat(true);
    with_usage["stream_options"] = json!({ "include_usage": true });
    let events =
        events(client().request(post(&sim, "/v1/chat/completions", &with_usage)).await.unwrap().into_body()).await;
    assert_eq!(events.len(), 1 + 3 + 1 + 1 + 1);
    let usage: Value = serde_json::from_str(&events[5]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], 3);
    assert_eq!(sim.stats().chunks_sent, 6);
}

#[tokio::test]
async fn completions_and_embeddings_answer_in_their_shapes() {
    let sim =
        Sim::start(SimOptions { models: vec!["e5".into(), LLAMA.into()], ..SimOptions::default() }).await.unwrap();
    let (status, body) =
        send(&sim, "/v1/completions", &json!({ "model": LLAMA, "prompt": "x", "max_tokens": 3 })).await;
    assert_eq!(status, 200);
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"][0]["text"], " The quick brown");

    let stream = client()
        .request(post(
            &sim,
            "/v1/completions",
            &json!({ "model": LLAMA, "prompt": "x", "max_tokens": 2, "stream": true }),
        ))
        .await
        .unwrap();
    let events = events(stream.into_body()).await;
    assert_eq!(events.len(), 2 + 1 + 1);

    let (status, floats) = send(&sim, "/v1/embeddings", &json!({ "model": "e5", "input": ["a", "b"] })).await;
    assert_eq!(status, 200);
    assert_eq!(floats["data"].as_array().unwrap().len(), 2);
    let (_, b64) =
        send(&sim, "/v1/embeddings", &json!({ "model": "e5", "input": "a", "encoding_format": "base64" })).await;
    let bytes =
        base64::engine::general_purpose::STANDARD.decode(b64["data"][0]["embedding"].as_str().unwrap()).unwrap();
    let decoded: Vec<f64> = bytes.chunks(4).map(|c| f64::from(f32::from_le_bytes(c.try_into().unwrap()))).collect();
    let expected: Vec<f64> =
        floats["data"][0]["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(decoded.len(), 16);
    for (d, e) in decoded.iter().zip(&expected) {
        assert!((d - e).abs() < 1e-6);
    }
}

#[tokio::test]
async fn models_health_and_metrics_are_served() {
    let sim = Sim::start(SimOptions::default()).await.unwrap();
    let (status, models) = get(&sim, "/v1/models").await;
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert_eq!(models["data"][0]["id"], LLAMA);
    assert_eq!(models["data"][0]["owned_by"], "meta");
    assert_eq!(get(&sim, "/v1/health/ready").await.0, 200);
    assert_eq!(get(&sim, "/v1/health/live").await.0, 200);

    send(&sim, "/v1/chat/completions", &chat(false)).await;
    let (status, metrics) = get(&sim, "/v1/metrics").await;
    assert_eq!(status, 200);
    for family in ["num_requests_running", "num_requests_waiting", "gpu_cache_usage_perc", "prompt_tokens_total"] {
        assert!(metrics.contains(&format!("# TYPE {family} ")), "{family}");
    }
    assert!(metrics.contains(&format!("generation_tokens_total{{model_name=\"{LLAMA}\"}} 16")), "{metrics}");
}

#[tokio::test]
async fn unknown_models_paths_and_keys_get_nim_error_envelopes() {
    let sim = Sim::start(SimOptions { api_key: Some("secret".into()), ..SimOptions::default() }).await.unwrap();
    let (status, body) = send(&sim, "/v1/chat/completions", &chat(false)).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["code"], 401);

    let authorized = |model: &str| {
        Request::post(format!("{}/v1/chat/completions", sim.url()))
            .header("authorization", "Bearer secret")
            .body(Full::new(Bytes::from(json!({ "model": model, "messages": [] }).to_string())))
            .unwrap()
    };
    let response = client().request(authorized("no/such")).await.unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error"]["type"], "NotFoundError");
    assert_eq!(body["error"]["code"], 404);
    assert_eq!(client().request(authorized(LLAMA)).await.unwrap().status(), 200);
    assert_eq!(get(&sim, "/v2/anything").await.0, 404);
}

#[tokio::test]
async fn error_injection_is_deterministic_and_changeable_at_run_time() {
    let sim = Sim::start(SimOptions {
        failures: Failures { error_rate: 0.5, error_status: 503, ..Failures::default() },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(send(&sim, "/v1/chat/completions", &chat(false)).await.0.as_u16());
    }
    assert_eq!(statuses, [200, 503, 200, 503]);
    assert_eq!(sim.stats().errors_injected, 2);
    sim.set_failures(Failures::default());
    assert_eq!(send(&sim, "/v1/chat/completions", &chat(false)).await.0, 200);
    assert_eq!(send(&sim, "/v1/chat/completions", &chat(false)).await.0, 200);
}

#[tokio::test]
async fn resets_break_the_connection_before_or_during_the_answer() {
    let sim = Sim::start(SimOptions {
        failures: Failures { reset_after_chunks: Some(0), ..Failures::default() },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    assert!(client().request(post(&sim, "/v1/chat/completions", &chat(false))).await.is_err());

    sim.set_failures(Failures { reset_after_chunks: Some(2), ..Failures::default() });
    let response = client().request(post(&sim, "/v1/chat/completions", &chat(true))).await.unwrap();
    let mut body = response.into_body();
    let mut content = 0;
    let broken = loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                content += usize::from(String::from_utf8_lossy(frame.data_ref().unwrap()).contains("\"content\":\" "))
            }
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    assert!(broken);
    assert_eq!(content, 2);
}

#[tokio::test]
async fn a_stall_sends_some_chunks_then_nothing_and_a_hang_sends_nothing() {
    let sim = Sim::start(SimOptions {
        failures: Failures { stall_after_chunks: Some(1), ..Failures::default() },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let response = client().request(post(&sim, "/v1/chat/completions", &chat(true))).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap(); // role
    body.frame().await.unwrap().unwrap(); // token 1
    assert!(tokio::time::timeout(Duration::from_millis(200), body.frame()).await.is_err());
    drop(body);
    eventually("the stalled stream counts as cancelled", || sim.stats().cancelled == 1).await;

    sim.set_failures(Failures { hang: true, ..Failures::default() });
    let pending = tokio::time::timeout(
        Duration::from_millis(200),
        client().request(post(&sim, "/v1/chat/completions", &chat(false))),
    );
    assert!(pending.await.is_err());
    eventually("the hung request counts as cancelled", || sim.stats().cancelled == 2).await;
}

#[tokio::test]
async fn the_gpu_queues_beyond_max_concurrency_and_refuses_beyond_max_queue() {
    let sim = Sim::start(SimOptions {
        max_concurrency: 1,
        max_queue: Some(1),
        ttft: Duration::from_millis(300),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let first = tokio::spawn(client().request(post(&sim, "/v1/chat/completions", &chat(false))));
    eventually("one running", || sim.stats().running == 1).await;
    let second = tokio::spawn(client().request(post(&sim, "/v1/chat/completions", &chat(false))));
    eventually("one waiting", || sim.stats().waiting == 1).await;
    let (_, metrics) = get(&sim, "/v1/metrics").await;
    assert!(metrics.contains(&format!("num_requests_waiting{{model_name=\"{LLAMA}\"}} 1")), "{metrics}");

    let (status, body) = send(&sim, "/v1/chat/completions", &chat(false)).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["code"], 429);

    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(second.await.unwrap().unwrap().status(), 200);
    eventually("queue drained", || sim.stats().running == 0 && sim.stats().waiting == 0).await;
}

#[tokio::test]
async fn gated_chunks_wait_for_release() {
    let sim = Sim::start(SimOptions { tokens: 2, gated_chunks: true, ..SimOptions::default() }).await.unwrap();
    let response = client().request(post(&sim, "/v1/chat/completions", &chat(true))).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap(); // role
    assert!(tokio::time::timeout(Duration::from_millis(100), body.frame()).await.is_err());
    assert_eq!(sim.stats().chunks_sent, 0);
    sim.release_chunks(2);
    let rest = events(body).await;
    assert_eq!(rest.last().unwrap(), "[DONE]");
    assert_eq!(sim.stats().chunks_sent, 2);
}

#[tokio::test]
async fn split_events_arrive_in_two_frames_each() {
    let sim = Sim::start(SimOptions { tokens: 2, split_events: true, ..SimOptions::default() }).await.unwrap();
    let response = client().request(post(&sim, "/v1/chat/completions", &chat(true))).await.unwrap();
    let mut body = response.into_body();
    let mut frames = Vec::new();
    while let Some(frame) = body.frame().await {
        frames.push(frame.unwrap().into_data().unwrap());
    }
    let whole: Vec<u8> = frames.iter().flat_map(|f| f.to_vec()).collect();
    let events = String::from_utf8(whole).unwrap().matches("\n\n").count();
    assert_eq!(events, 1 + 2 + 1 + 1);
    assert_eq!(frames.len(), 2 * events, "each event in two frames");
    assert!(!frames[0].ends_with(b"\n\n"));
}

#[tokio::test]
async fn stop_closes_the_port_and_breaks_open_streams() {
    let sim = Sim::start(SimOptions { tokens: 1000, chunk_delay: Duration::from_millis(10), ..SimOptions::default() })
        .await
        .unwrap();
    let addr = sim.addr();
    let response = client().request(post(&sim, "/v1/chat/completions", &chat(true))).await.unwrap();
    let mut body = response.into_body();
    body.frame().await.unwrap().unwrap();
    sim.stop().await;
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            match body.frame().await {
                Some(Ok(_)) => continue,
                other => break other.is_some(),
            }
        }
    })
    .await
    .expect("the stream ends at once");
    assert!(ended, "an error, not a clean end");
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}
