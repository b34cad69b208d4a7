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

fn h2c_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).http2_only(true).build_http()
}

/// Reads frames until the body ends (`Ok`) or breaks (`Err`), with the text seen so far.
async fn drain(body: &mut Incoming) -> Result<String, String> {
    let mut text = String::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), body.frame()).await.expect("the body moves on") {
            Some(Ok(frame)) => text.push_str(&String::from_utf8_lossy(&frame.into_data().unwrap_or_default())),
            Some(Err(_)) => return Err(text),
            None => return Ok(text),
        }
    }
}

fn sse_payloads(text: &str) -> Vec<&str> {
    text.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).collect()
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

#[tokio::test]
async fn chunks_before_the_usage_chunk_carry_a_null_usage_only_when_it_was_asked_for() {
    let sim = Sim::start(SimOptions { tokens: 2, ..SimOptions::default() }).await.unwrap();
    let mut request = chat(true);
    request["stream_options"] = json!({ "include_usage": true });
    request["max_completion_tokens"] = json!(1);
    let response = client().request(post(&sim, "/v1/chat/completions", &request)).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let events = events(response.into_body()).await;
    assert_eq!(events.len(), 1 + 1 + 1 + 1 + 1, "{events:?}");
    for event in &events[..3] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["usage"], Value::Null);
        assert!(chunk.as_object().unwrap().contains_key("usage"), "{event}");
        assert_eq!(chunk["choices"][0]["logprobs"], Value::Null);
    }
    let content: Value = serde_json::from_str(&events[1]).unwrap();
    assert_eq!(content["choices"][0]["delta"]["content"], " The");
    let finish: Value = serde_json::from_str(&events[2]).unwrap();
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["choices"][0]["finish_reason"], "length", "capped by max_completion_tokens");
    let usage: Value = serde_json::from_str(&events[3]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 1);
    assert_eq!(events[4], "[DONE]");
}

#[tokio::test]
async fn a_request_with_tools_gets_a_call_of_the_first_tool() {
    let sim = Sim::start(SimOptions::default()).await.unwrap();
    let mut request = chat(false);
    request["tools"] = json!([
        { "type": "function", "function": { "name": "get_weather", "parameters": {} } },
        { "type": "function", "function": { "name": "other" } },
    ]);
    let (status, body) = send(&sim, "/v1/chat/completions", &request).await;
    assert_eq!(status, 200);
    let message = &body["choices"][0]["message"];
    assert_eq!(message["content"], Value::Null);
    assert_eq!(message["tool_calls"][0]["id"], "call_0");
    assert_eq!(message["tool_calls"][0]["type"], "function");
    assert_eq!(message["tool_calls"][0]["function"], json!({ "name": "get_weather", "arguments": "{}" }));
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls");

    request["stream"] = json!(true);
    let response = client().request(post(&sim, "/v1/chat/completions", &request)).await.unwrap();
    let events = events(response.into_body()).await;
    assert_eq!(events.len(), 1 + 1 + 1 + 1, "{events:?}");
    let call: Value = serde_json::from_str(&events[1]).unwrap();
    let entry = &call["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!((entry["index"].clone(), entry["function"]["name"].clone()), (json!(0), json!("get_weather")));
    let finish: Value = serde_json::from_str(&events[2]).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");

    request["stream"] = json!(false);
    request["tool_choice"] = json!("none");
    let (_, body) = send(&sim, "/v1/chat/completions", &request).await;
    assert!(body["choices"][0]["message"]["content"].is_string());
}

#[tokio::test]
async fn embeddings_take_token_arrays_and_bad_bodies_get_400() {
    let sim = Sim::start(SimOptions { embedding_dim: 8, ..SimOptions::default() }).await.unwrap();
    let (status, body) = send(&sim, "/v1/embeddings", &json!({ "model": LLAMA, "input": [[1, 2], [3]] })).await;
    assert_eq!(status, 200);
    assert_eq!(body["object"], "list");
    assert_eq!(body["data"][1]["index"], 1);
    assert_eq!(body["data"][1]["embedding"].as_array().unwrap().len(), 8);
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    let (status, body) = send(&sim, "/v1/embeddings", &json!({ "model": LLAMA })).await;
    assert_eq!((status.as_u16(), body["error"]["type"].clone()), (400, json!("BadRequestError")));
    let (status, body) = send(&sim, "/v1/chat/completions", &json!({ "messages": [] })).await;
    assert_eq!((status.as_u16(), body["error"]["code"].clone()), (400, json!(400)));
    let bad = Request::post(format!("{}/v1/chat/completions", sim.url())).body(Full::from("{not json")).unwrap();
    let response = client().request(bad).await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(response.headers()["content-type"], "application/json");
    assert_eq!(sim.stats().completed, 1);
}

#[tokio::test]
async fn the_api_key_guards_v1_but_not_health_or_metrics() {
    let sim = Sim::start(SimOptions { api_key: Some("k".into()), ..SimOptions::default() }).await.unwrap();
    let (status, body) = get(&sim, "/v1/models").await;
    assert_eq!(status, 401);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["type"], "AuthenticationError");
    assert_eq!(get(&sim, "/v1/nothing").await.0, 401, "the key is checked before the route");
    assert_eq!(get(&sim, "/v1/health/ready").await.0, 200);
    assert_eq!(get(&sim, "/v1/metrics").await.0, 200);
    let wrong = Request::post(format!("{}/v1/chat/completions", sim.url()))
        .header("authorization", "Bearer nope")
        .body(Full::new(Bytes::from(chat(false).to_string())))
        .unwrap();
    assert_eq!(client().request(wrong).await.unwrap().status(), 401);
    assert_eq!(sim.stats().requests, 0, "refused before it counts as inference");
}

#[tokio::test]
async fn recorded_requests_keep_method_path_headers_and_body() {
    let sim = Sim::start(SimOptions { record_requests: true, ..SimOptions::default() }).await.unwrap();
    let body = chat(false).to_string();
    let request = Request::post(format!("{}/v1/chat/completions?trace=1", sim.url()))
        .header("x-request-id", "abc")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    assert_eq!(client().request(request).await.unwrap().status(), 200);
    get(&sim, "/v1/models").await;
    let seen = sim.recorded();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].method, Method::POST);
    assert_eq!(seen[0].path, "/v1/chat/completions?trace=1");
    assert_eq!(seen[0].headers["x-request-id"], "abc");
    assert_eq!(seen[0].body, body.as_bytes());
    assert_eq!((seen[1].method.clone(), seen[1].path.as_str()), (Method::GET, "/v1/models"));

    let quiet = Sim::start(SimOptions::default()).await.unwrap();
    send(&quiet, "/v1/chat/completions", &chat(false)).await;
    assert!(quiet.recorded().is_empty());
}

#[tokio::test]
async fn every_request_fails_at_rate_one_and_status_zero_means_500() {
    let sim = Sim::start(SimOptions {
        failures: Failures { error_rate: 1.0, ..Failures::default() },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    for path in ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"] {
        let (status, body) = send(&sim, path, &json!({ "model": LLAMA, "prompt": "x", "input": "x" })).await;
        assert_eq!(status, 500);
        assert_eq!(body["error"]["type"], "InternalServerError");
        assert_eq!(body["error"]["code"], 500);
    }
    let stats = sim.stats();
    assert_eq!((stats.requests, stats.errors_injected, stats.completed, stats.cancelled), (3, 3, 0, 0));
}

#[tokio::test]
async fn non_stream_resets_and_stalls_send_headers_then_break_or_go_silent() {
    let sim = Sim::start(SimOptions {
        failures: Failures { reset_after_chunks: Some(1), ..Failures::default() },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let response = client().request(post(&sim, "/v1/chat/completions", &chat(false))).await.unwrap();
    assert_eq!(response.status(), 200);
    let length: usize = response.headers()["content-length"].to_str().unwrap().parse().unwrap();
    let seen = drain(&mut response.into_body()).await.expect_err("the body breaks");
    assert_eq!(seen.len(), length / 2);

    sim.set_failures(Failures { stall_after_chunks: Some(0), ..Failures::default() });
    let response = client().request(post(&sim, "/v1/chat/completions", &chat(false))).await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    assert!(tokio::time::timeout(Duration::from_millis(150), body.frame()).await.is_err());
    drop(body);
    eventually("the stalled answer counts as cancelled", || sim.stats().cancelled == 1).await;
    assert_eq!(sim.stats().errors_injected, 2);
}

#[tokio::test]
async fn a_reset_beyond_the_last_token_still_breaks_before_the_end() {
    let sim = Sim::start(SimOptions {
        tokens: 3,
        failures: Failures { reset_after_chunks: Some(10), ..Failures::default() },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let response = client().request(post(&sim, "/v1/chat/completions", &chat(true))).await.unwrap();
    let text = drain(&mut response.into_body()).await.expect_err("the stream breaks");
    assert_eq!(sse_payloads(&text).len(), 1 + 3, "{text}");
    assert!(!text.contains("finish_reason\":\"stop") && !text.contains("[DONE]"));
    let stats = sim.stats();
    assert_eq!((stats.completed, stats.cancelled, stats.errors_injected), (0, 0, 1));
}

#[tokio::test]
async fn a_client_leaving_mid_stream_cancels_generation_and_frees_the_slot() {
    for h2 in [false, true] {
        let sim =
            Sim::start(SimOptions { tokens: 1000, chunk_delay: Duration::from_millis(5), ..SimOptions::default() })
                .await
                .unwrap();
        let client = if h2 { h2c_client() } else { client() };
        let response = client.request(post(&sim, "/v1/chat/completions", &chat(true))).await.unwrap();
        assert_eq!(response.version(), if h2 { http::Version::HTTP_2 } else { http::Version::HTTP_11 });
        let mut body = response.into_body();
        for _ in 0..3 {
            body.frame().await.unwrap().unwrap();
        }
        assert_eq!(sim.stats().running, 1);
        drop(body);
        eventually("the stream is cancelled", || sim.stats().cancelled == 1 && sim.stats().running == 0).await;
        let produced = sim.stats().chunks_sent;
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(sim.stats().chunks_sent, produced, "generation stopped (h2: {h2})");
        assert_eq!(sim.stats().completed, 0);
    }
}

#[tokio::test]
async fn latency_is_ttft_plus_a_delay_per_token_without_streaming() {
    let sim = Sim::start(SimOptions {
        tokens: 4,
        ttft: Duration::from_millis(60),
        chunk_delay: Duration::from_millis(10),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let started = Instant::now();
    let (status, _) = send(&sim, "/v1/chat/completions", &chat(false)).await;
    assert_eq!(status, 200);
    assert!(started.elapsed() >= Duration::from_millis(100), "{:?}", started.elapsed());
}

#[tokio::test]
async fn dropping_the_sim_closes_its_port() {
    let sim = Sim::start(SimOptions::default()).await.unwrap();
    let addr = sim.addr();
    assert_eq!(get(&sim, "/v1/health/live").await.0, 200);
    drop(sim);
    let start = Instant::now();
    while tokio::net::TcpStream::connect(addr).await.is_ok() {
        assert!(start.elapsed() < Duration::from_secs(5), "the port stays open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

mod tls {
    use super::*;
    use hyper_rustls::HttpsConnector;
    use std::sync::Arc;

    fn https_client(ca: &rcgen::Certificate, h2: bool) -> Client<HttpsConnector<HttpConnector>, Full<Bytes>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.der().clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config).https_only();
        let connector = if h2 { connector.enable_http2().build() } else { connector.enable_http1().build() };
        Client::builder(TokioExecutor::new()).http2_only(h2).build(connector)
    }

    #[tokio::test]
    async fn https_serves_http1_and_h2_and_stop_ends_open_h2_streams() {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let tls = nim_sim::SimTls { cert_pem: certified.cert.pem(), key_pem: certified.key_pair.serialize_pem() };
        let sim = Sim::start(SimOptions {
            tls: Some(tls),
            failures: Failures { stall_after_chunks: Some(1), ..Failures::default() },
            ..SimOptions::default()
        })
        .await
        .unwrap();
        assert!(sim.url().starts_with("https://localhost:"), "{}", sim.url());

        let health = Request::get(format!("{}/v1/health/ready", sim.url())).body(Full::default()).unwrap();
        let response = https_client(&certified.cert, false).request(health).await.unwrap();
        assert_eq!((response.status(), response.version()), (StatusCode::OK, http::Version::HTTP_11));

        let response = https_client(&certified.cert, true).request(post(&sim, "/v1/chat/completions", &chat(true)));
        let response = response.await.unwrap();
        assert_eq!((response.status(), response.version()), (StatusCode::OK, http::Version::HTTP_2));
        let mut body = response.into_body();
        body.frame().await.unwrap().unwrap(); // role
        body.frame().await.unwrap().unwrap(); // one token, then the stall
        let stats = sim.stats();
        assert_eq!((stats.running, stats.chunks_sent), (1, 1));
        let addr = sim.addr();
        sim.stop().await;
        assert!(drain(&mut body).await.is_err(), "the stream breaks at stop");
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn bad_tls_material_is_refused_at_start() {
        let tls = nim_sim::SimTls { cert_pem: "nope".into(), key_pem: "nope".into() };
        let error = Sim::start(SimOptions { tls: Some(tls), ..SimOptions::default() }).await.err().unwrap();
        assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    }
}

#[tokio::test]
async fn injected_errors_carry_retry_after_when_asked() {
    let sim = Sim::start(SimOptions {
        failures: Failures { error_rate: 1.0, error_status: 429, retry_after: Some(7), ..Failures::default() },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let response = client().request(post(&sim, "/v1/chat/completions", &chat(false))).await.unwrap();
    assert_eq!(response.status(), 429);
    assert_eq!(response.headers()["retry-after"], "7");
    sim.set_failures(Failures { error_rate: 1.0, error_status: 503, ..Failures::default() });
    let response = client().request(post(&sim, "/v1/chat/completions", &chat(false))).await.unwrap();
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_none());
}

#[tokio::test]
async fn an_early_end_closes_the_stream_cleanly_without_finish_or_done() {
    let sim = Sim::start(SimOptions {
        tokens: 5,
        failures: Failures { end_after_chunks: Some(2), ..Failures::default() },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let response = client().request(post(&sim, "/v1/chat/completions", &chat(true))).await.unwrap();
    let text = drain(&mut response.into_body()).await.expect("ends cleanly, not broken");
    let payloads = sse_payloads(&text);
    assert_eq!(payloads.iter().filter(|p| p.contains("\"content\":\" ")).count(), 2, "{text}");
    assert!(!text.contains("[DONE]") && !text.contains("finish_reason\":\"stop"), "{text}");
    assert_eq!(sim.stats().errors_injected, 1);
    assert_eq!(sim.stats().completed, 0);
}

#[tokio::test]
async fn the_default_metrics_page_is_nim1_byte_for_byte() {
    let sim = Sim::start(SimOptions::default()).await.unwrap();
    send(&sim, "/v1/chat/completions", &chat(false)).await;
    let (_, page) = get(&sim, "/v1/metrics").await;
    // The body is 97 bytes, so 24 prompt tokens.
    let expected = "\
# HELP num_requests_running Number of requests currently running on GPU.
# TYPE num_requests_running gauge
num_requests_running{model_name=\"meta/llama-3.1-8b-instruct\"} 0
# HELP num_requests_waiting Number of requests waiting to be processed.
# TYPE num_requests_waiting gauge
num_requests_waiting{model_name=\"meta/llama-3.1-8b-instruct\"} 0
# HELP gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE gpu_cache_usage_perc gauge
gpu_cache_usage_perc{model_name=\"meta/llama-3.1-8b-instruct\"} 0
# HELP prompt_tokens_total Number of prefill tokens processed.
# TYPE prompt_tokens_total counter
prompt_tokens_total{model_name=\"meta/llama-3.1-8b-instruct\"} 24
# HELP generation_tokens_total Number of generation tokens processed.
# TYPE generation_tokens_total counter
generation_tokens_total{model_name=\"meta/llama-3.1-8b-instruct\"} 16
# HELP request_success_total Count of successfully processed requests.
# TYPE request_success_total counter
request_success_total{model_name=\"meta/llama-3.1-8b-instruct\"} 1
";
    assert_eq!(page, expected);
}

/// A chat request whose only message is `content`.
fn chat_about(content: &str, stream: bool) -> Value {
    json!({ "model": LLAMA, "messages": [{ "role": "user", "content": content }], "stream": stream, "max_tokens": 1 })
}

/// Whole KV-cache blocks (16 tokens of 4 bytes) in a request's `messages` as sent.
fn chat_blocks(request: &Value) -> u64 {
    request["messages"].to_string().len() as u64 / 64
}

/// A sim with a KV cache of `kv_cache_tokens` in blocks of 16 tokens.
fn cached(kv_cache_tokens: u64) -> SimOptions {
    SimOptions { kv_cache_tokens, ..SimOptions::default() }
}

/// The prefix-cache hit tokens of one request.
async fn hit_of(sim: &Sim, path: &str, request: &Value) -> u64 {
    let before = sim.stats().prefix_cache_hits;
    assert_eq!(send(sim, path, request).await.0, 200);
    sim.stats().prefix_cache_hits - before
}

// The clock is paused and advances only to the sim's timers, so elapsed times are exactly what
// the sim waited, whatever the machine is doing.
#[tokio::test(start_paused = true)]
async fn a_repeated_prompt_reaches_its_first_token_sooner_by_its_cached_prefill() {
    let prefill = Duration::from_micros(200);
    let sim = Sim::start(SimOptions {
        ttft: Duration::from_millis(5),
        prefill_per_token: prefill,
        kv_cache_tokens: 100_000,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let request = chat_about(&"You are a helpful assistant. ".repeat(140), true);
    let time_to_first_token = || async {
        let started = tokio::time::Instant::now();
        let response = client().request(post(&sim, "/v1/chat/completions", &request)).await.unwrap();
        let mut body = response.into_body();
        body.frame().await.unwrap().unwrap(); // the role event waits for the first token
        let elapsed = started.elapsed();
        drain(&mut body).await.unwrap();
        elapsed
    };

    let cold = time_to_first_token().await;
    let prompt_tokens = sim.stats().prompt_tokens;
    assert!(prompt_tokens > 1000, "{prompt_tokens}");
    let expected = Duration::from_millis(5) + prefill * prompt_tokens as u32;
    assert!(cold >= expected && cold < expected + Duration::from_millis(5), "{cold:?}, expected {expected:?}");

    let warm = time_to_first_token().await;
    let stats = sim.stats();
    assert_eq!(stats.prefix_cache_hits, chat_blocks(&request) * 16, "every whole block of the prompt");
    let uncached = prompt_tokens - stats.prefix_cache_hits;
    assert!(uncached < 50, "the body around the prompt and its ragged tail: {uncached}");
    let expected = Duration::from_millis(5) + prefill * uncached as u32;
    assert!(warm >= expected && warm < expected + Duration::from_millis(5), "{warm:?}, expected {expected:?}");
    assert!(warm * 4 < cold, "{warm:?} against {cold:?}");
    assert_eq!(stats.prefix_cache_queries, 2 * prompt_tokens);
}

#[tokio::test]
async fn a_prompt_sharing_only_its_first_half_hits_about_half() {
    let sim = Sim::start(cached(100_000)).await.unwrap();
    let (shared, first, second) = ("s".repeat(4000), "a".repeat(4000), "b".repeat(4000));
    let completion = |prompt: String| json!({ "model": LLAMA, "prompt": prompt, "max_tokens": 1 });
    assert_eq!(hit_of(&sim, "/v1/completions", &completion(format!("{shared}{first}"))).await, 0);
    let queried = sim.stats().prefix_cache_queries;
    let hit = hit_of(&sim, "/v1/completions", &completion(format!("{shared}{second}"))).await;
    // The raw prompt starts with its quote: 4001 shared bytes hold 62 whole blocks of 64 bytes.
    assert_eq!(hit, 62 * 16);
    let rate = hit as f64 / (sim.stats().prefix_cache_queries - queried) as f64;
    assert!((0.45..0.55).contains(&rate), "{rate}");
    assert_eq!(hit_of(&sim, "/v1/completions", &completion(format!("{shared}{second}"))).await, 2000, "now whole");
}

#[tokio::test]
async fn the_least_recently_used_prompt_is_evicted_when_the_cache_is_full() {
    // Room for 32 blocks: two prompts of 16 (1,024 bytes and the quote).
    let sim = Sim::start(cached(512)).await.unwrap();
    let completion = |c: char| json!({ "model": LLAMA, "prompt": c.to_string().repeat(1024), "max_tokens": 1 });
    let path = "/v1/completions";
    assert_eq!(hit_of(&sim, path, &completion('a')).await, 0);
    assert_eq!(hit_of(&sim, path, &completion('b')).await, 0);
    assert_eq!(hit_of(&sim, path, &completion('a')).await, 256, "both fit; a is now the most recent");
    assert_eq!(hit_of(&sim, path, &completion('c')).await, 0);
    assert_eq!(sim.stats().kv_cached_tokens, 512, "full");
    assert_eq!(hit_of(&sim, path, &completion('a')).await, 256, "c evicted b, the least recent");
    assert_eq!(hit_of(&sim, path, &completion('b')).await, 0);
    assert_eq!(hit_of(&sim, path, &completion('a')).await, 256, "b then evicted c");
    assert_eq!(hit_of(&sim, path, &completion('c')).await, 0);
}

/// Samples of a Prometheus text page as (name, labels, value), checking that every family has
/// HELP and TYPE lines before its sample and every value parses.
fn scrape(page: &str) -> Vec<(String, String, f64)> {
    let mut typed = Vec::new();
    let mut samples = Vec::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(kind == "gauge" || (kind == "counter" && name.ends_with("_total")), "{line}");
            assert!(page.contains(&format!("# HELP {name} ")), "{name} has no HELP");
            typed.push(name.to_owned());
        } else if !line.starts_with('#') {
            let (series, value) = line.rsplit_once(' ').unwrap();
            let (name, labels) = series.split_once('{').unwrap();
            assert!(typed.iter().any(|t| t == name), "{name} sampled before its TYPE");
            samples.push((name.to_owned(), labels.trim_end_matches('}').to_owned(), value.parse().unwrap()));
        }
    }
    samples
}

fn sample(samples: &[(String, String, f64)], name: &str) -> f64 {
    let (_, labels, value) = samples.iter().find(|(n, ..)| n == name).unwrap_or_else(|| panic!("no {name}"));
    assert_eq!(labels, &format!("model_name=\"{LLAMA}\""));
    *value
}

/// Runs a prompt twice, then holds one request of it running and one waiting for the single
/// GPU slot, and scrapes the page `dialect` writes then; returns the page and the stats.
async fn page_under_load(dialect: nim_sim::MetricsDialect) -> (String, nim_sim::SimStats) {
    let sim = Sim::start(SimOptions {
        kv_cache_tokens: 4096,
        max_concurrency: 1,
        gated_chunks: true,
        tokens: 1,
        metrics_dialect: dialect,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let request = chat_about(&"x".repeat(2000), true);
    for _ in 0..2 {
        sim.release_chunks(1);
        let response = client().request(post(&sim, "/v1/chat/completions", &request)).await.unwrap();
        drain(&mut response.into_body()).await.unwrap();
    }
    let running = client().request(post(&sim, "/v1/chat/completions", &request)).await.unwrap();
    let waiting = tokio::spawn(client().request(post(&sim, "/v1/chat/completions", &request)));
    eventually("one running, one waiting", || sim.stats().running == 1 && sim.stats().waiting == 1).await;
    let (status, page) = get(&sim, "/v1/metrics").await;
    assert_eq!(status, 200);
    let stats = sim.stats();
    assert_eq!(chat_blocks(&request), 31);
    drop((running, waiting));
    (page, stats)
}

#[tokio::test]
async fn the_vllm_dialect_names_the_queue_cache_usage_and_prefix_hits_as_vllm_does() {
    let (page, stats) = page_under_load(nim_sim::MetricsDialect::Vllm).await;
    let samples = scrape(&page);
    assert!(samples.iter().all(|(name, ..)| name.starts_with("vllm:")), "{page}");
    assert_eq!(sample(&samples, "vllm:num_requests_running"), 1.0);
    assert_eq!(sample(&samples, "vllm:num_requests_waiting"), 1.0);
    // The running request holds its 31 blocks of the 256 the cache has.
    assert_eq!(sample(&samples, "vllm:kv_cache_usage_perc"), 31.0 / 256.0);
    assert_eq!(sample(&samples, "vllm:prefix_cache_queries_total"), stats.prefix_cache_queries as f64);
    assert_eq!(sample(&samples, "vllm:prefix_cache_hits_total"), (2 * 31 * 16) as f64, "two of three hit");
    assert_eq!(sample(&samples, "vllm:prompt_tokens_total"), stats.prompt_tokens as f64);
    assert_eq!(sample(&samples, "vllm:request_success_total"), 2.0);
    assert!(page.contains(&format!("vllm:num_requests_waiting{{model_name=\"{LLAMA}\"}} 1.0\n")), "{page}");
}

#[tokio::test]
async fn the_sglang_dialect_names_the_queue_token_usage_and_hit_rate_as_sglang_does() {
    let (page, stats) = page_under_load(nim_sim::MetricsDialect::Sglang).await;
    let samples = scrape(&page);
    assert!(samples.iter().all(|(name, ..)| name.starts_with("sglang:")), "{page}");
    assert_eq!(sample(&samples, "sglang:num_running_reqs"), 1.0);
    assert_eq!(sample(&samples, "sglang:num_queue_reqs"), 1.0);
    assert_eq!(sample(&samples, "sglang:token_usage"), 31.0 / 256.0);
    assert_eq!(sample(&samples, "sglang:cache_hit_rate"), stats.prefix_cache_hit_rate());
    assert_eq!(sample(&samples, "sglang:cached_tokens_total"), stats.prefix_cache_hits as f64);
    assert_eq!(sample(&samples, "sglang:prompt_tokens_total"), stats.prompt_tokens as f64);
}

#[tokio::test]
async fn the_nim1_dialect_adds_prefix_cache_counters_only_with_the_cache_model() {
    let (page, stats) = page_under_load(nim_sim::MetricsDialect::Nim1).await;
    let samples = scrape(&page);
    let names: Vec<&str> = samples.iter().map(|(name, ..)| name.as_str()).collect();
    assert_eq!(
        names,
        [
            "num_requests_running",
            "num_requests_waiting",
            "gpu_cache_usage_perc",
            "prompt_tokens_total",
            "generation_tokens_total",
            "request_success_total",
            "prefix_cache_queries_total",
            "prefix_cache_hits_total"
        ]
    );
    assert_eq!(sample(&samples, "num_requests_waiting"), 1.0);
    assert_eq!(sample(&samples, "gpu_cache_usage_perc"), 31.0 / 256.0);
    assert_eq!(sample(&samples, "prefix_cache_queries_total"), stats.prefix_cache_queries as f64);
    assert_eq!(sample(&samples, "prefix_cache_hits_total"), stats.prefix_cache_hits as f64);
    assert!(page.contains(&format!("prefix_cache_hits_total{{model_name=\"{LLAMA}\"}} 992\n")), "{page}");

    let plain = Sim::start(SimOptions::default()).await.unwrap();
    send(&plain, "/v1/chat/completions", &chat(false)).await;
    assert!(!get(&plain, "/v1/metrics").await.1.contains("prefix_cache"));
    let stats = plain.stats();
    assert_eq!((stats.prefix_cache_queries, stats.prefix_cache_hits, stats.kv_cached_tokens), (0, 0, 0));
}

#[tokio::test]
async fn a_kv_cache_with_blocks_of_no_tokens_is_refused_at_start() {
    let options = SimOptions { kv_cache_tokens: 1024, kv_block_tokens: 0, ..SimOptions::default() };
    let error = Sim::start(options).await.err().unwrap();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
}

const RERANK: &str = "nvidia/nv-rerankqa-mistral-4b-v3";

fn respond(input: Value, stream: bool) -> Value {
    json!({ "model": LLAMA, "input": input, "stream": stream })
}

/// The typed events of a whole Responses stream as (event line, parsed data), checking that every
/// event is one `event:` line and one `data:` line.
fn typed_events(text: &str) -> Vec<(String, Value)> {
    let events: Vec<&str> = text.split_terminator("\n\n").collect();
    assert!(text.ends_with("\n\n"), "{text}");
    events
        .iter()
        .map(|event| {
            let (line, data) = event.split_once('\n').unwrap_or_else(|| panic!("not typed: {event}"));
            let kind = line.strip_prefix("event: ").unwrap_or_else(|| panic!("no event line: {event}"));
            let data = data.strip_prefix("data: ").unwrap_or_else(|| panic!("no data line: {event}"));
            assert!(!data.contains('\n'), "{event}");
            (kind.to_owned(), serde_json::from_str(data).unwrap())
        })
        .collect()
}

/// A Responses answer with its ids (`resp_<n>`, `msg_<n>`) blanked, which differ per request.
fn without_ids(mut response: Value) -> Value {
    assert!(response["id"].as_str().unwrap().starts_with("resp_"), "{response}");
    response["id"] = json!("resp_");
    for item in response["output"].as_array_mut().unwrap() {
        assert!(item["id"].as_str().unwrap().starts_with("msg_"), "{item}");
        item["id"] = json!("msg_");
    }
    response
}

#[tokio::test]
async fn a_response_has_openais_shape_chats_text_and_usage() {
    let sim = Sim::start(SimOptions { tokens: 4, ..SimOptions::default() }).await.unwrap();
    let request = respond(json!("hi"), false);
    let (status, body) = send(&sim, "/v1/responses", &request).await;
    assert_eq!(status, 200);
    let (_, chat) = send(&sim, "/v1/chat/completions", &chat(false)).await;
    let input_tokens = request.to_string().len() as u64 / 4;
    assert_eq!(
        without_ids(body.clone()),
        json!({
            "id": "resp_", "object": "response", "created_at": 1_700_000_000, "status": "completed",
            "error": null, "incomplete_details": null, "instructions": null, "max_output_tokens": null,
            "model": LLAMA,
            "output": [{
                "type": "message", "id": "msg_", "status": "completed", "role": "assistant",
                "content": [{ "type": "output_text", "text": " The quick brown fox", "annotations": [], "logprobs": [] }]
            }],
            "parallel_tool_calls": true, "previous_response_id": null,
            "reasoning": { "effort": null, "summary": null }, "store": false, "temperature": 1.0,
            "text": { "format": { "type": "text" } }, "tool_choice": "auto", "tools": [], "top_p": 1.0,
            "truncation": "disabled",
            "usage": {
                "input_tokens": input_tokens, "input_tokens_details": { "cached_tokens": 0 },
                "output_tokens": 4, "output_tokens_details": { "reasoning_tokens": 0 },
                "total_tokens": input_tokens + 4
            },
            "user": null, "metadata": {}
        })
    );
    assert_eq!(body["output"][0]["content"][0]["text"], chat["choices"][0]["message"]["content"], "chat's text");
    let stats = sim.stats();
    assert_eq!((stats.requests, stats.completed, stats.generation_tokens), (2, 2, 8));
    assert_eq!(stats.prompt_tokens, input_tokens + chat["usage"]["prompt_tokens"].as_u64().unwrap());

    // Input items in either form, and instructions, echoed as sent; only the ids differ.
    let items = json!([
        { "role": "user", "content": "hi" },
        { "type": "message", "role": "user", "content": [{ "type": "input_text", "text": "there" }] }
    ]);
    let mut request = respond(items, false);
    request["instructions"] = json!("Be \"brief\".");
    let (status, first) = send(&sim, "/v1/responses", &request).await;
    assert_eq!(status, 200);
    assert_eq!(first["instructions"], "Be \"brief\".");
    let (_, second) = send(&sim, "/v1/responses", &request).await;
    assert_ne!(first["id"], second["id"]);
    assert_ne!(first["output"][0]["id"], second["output"][0]["id"]);
    assert_eq!(without_ids(first), without_ids(second), "deterministic but for the ids");
}

#[tokio::test]
async fn a_responses_request_for_an_unknown_model_or_without_input_is_refused_as_chat_is() {
    let sim = Sim::start(SimOptions { api_key: Some("k".into()), ..SimOptions::default() }).await.unwrap();
    let (status, body) = send(&sim, "/v1/responses", &respond(json!("hi"), false)).await;
    assert_eq!((status.as_u16(), body["error"]["type"].clone()), (401, json!("AuthenticationError")));
    assert_eq!(sim.stats().requests, 0);

    let authorized = |body: Value| {
        Request::post(format!("{}/v1/responses", sim.url()))
            .header("authorization", "Bearer k")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let read = |response: http::Response<Incoming>| async move {
        let status = response.status().as_u16();
        let body: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        (status, body)
    };
    let (status, body) =
        read(client().request(authorized(json!({ "model": "no/such", "input": "hi" }))).await.unwrap()).await;
    assert_eq!(status, 404);
    assert_eq!(
        body,
        json!({ "error": { "message": "The model `no/such` does not exist.", "type": "NotFoundError", "code": 404 } })
    );
    for bad in [json!({ "model": LLAMA }), json!({ "model": LLAMA, "input": 42 })] {
        let (status, body) = read(client().request(authorized(bad)).await.unwrap()).await;
        assert_eq!((status, body["error"]["type"].clone()), (400, json!("BadRequestError")), "{body}");
    }
    let (status, _) = read(client().request(authorized(json!({ "model": LLAMA, "input": "hi" }))).await.unwrap()).await;
    assert_eq!(status, 200);
    let stats = sim.stats();
    assert_eq!((stats.requests, stats.completed), (4, 1));
}

#[tokio::test]
async fn a_responses_stream_sends_typed_events_in_openais_order_and_no_done() {
    let sim = Sim::start(SimOptions { tokens: 3, record_requests: true, ..SimOptions::default() }).await.unwrap();
    let (_, json_answer) = send(&sim, "/v1/responses", &respond(json!("hi"), false)).await;
    let response = client().request(post(&sim, "/v1/responses", &respond(json!("hi"), true))).await.unwrap();
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let text = drain(&mut response.into_body()).await.unwrap();
    assert!(!text.contains("[DONE]"), "{text}");
    let events = typed_events(&text);
    let kinds: Vec<&str> = events.iter().map(|(kind, _)| kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    for (n, (kind, data)) in events.iter().enumerate() {
        assert_eq!((data["type"].as_str(), data["sequence_number"].as_u64()), (Some(kind.as_str()), Some(n as u64)));
    }
    let created = &events[0].1["response"];
    assert_eq!((created["status"].clone(), created["output"].clone()), (json!("in_progress"), json!([])));
    assert_eq!(created["usage"], Value::Null);
    assert_eq!(events[1].1["response"], *created);
    let item_id = events[2].1["item"]["id"].clone();
    assert_eq!(
        events[2].1["item"],
        json!({ "type": "message", "id": item_id, "status": "in_progress", "role": "assistant", "content": [] })
    );
    assert_eq!(
        events[4].1,
        json!({
            "type": "response.output_text.delta", "item_id": item_id, "output_index": 0, "content_index": 0,
            "delta": " The", "logprobs": [], "sequence_number": 4
        })
    );
    let deltas: String = events[4..7].iter().map(|(_, data)| data["delta"].as_str().unwrap()).collect();
    let json_text = json_answer["output"][0]["content"][0]["text"].as_str().unwrap();
    assert_eq!(deltas, json_text);
    assert_eq!(events[7].1["text"], json_text);
    assert_eq!(events[8].1["part"], json_answer["output"][0]["content"][0]);
    assert_eq!(events[9].1["item"]["id"], item_id);
    let completed = &events[10].1["response"];
    assert_eq!(completed["id"], created["id"]);
    assert_eq!(without_ids(completed.clone()), without_ids(json_answer.clone()), "the whole response");
    let requested = sim.recorded()[1].body.len() as u64 / 4;
    assert_eq!(completed["usage"]["input_tokens"], requested);
    assert_eq!(completed["usage"]["output_tokens"], 3);
    assert_eq!(completed["usage"]["total_tokens"], requested + 3);
    let stats = sim.stats();
    assert_eq!((stats.chunks_sent, stats.generation_tokens, stats.completed), (3, 6, 2));
}

#[tokio::test]
async fn max_output_tokens_cuts_a_response_as_incomplete() {
    let sim = Sim::start(SimOptions { tokens: 5, ..SimOptions::default() }).await.unwrap();
    let mut request = respond(json!("hi"), false);
    request["max_output_tokens"] = json!(2);
    let (status, body) = send(&sim, "/v1/responses", &request).await;
    assert_eq!(status, 200);
    assert_eq!(
        (body["status"].clone(), body["incomplete_details"].clone()),
        (json!("incomplete"), json!({ "reason": "max_output_tokens" }))
    );
    assert_eq!(body["max_output_tokens"], 2);
    assert_eq!(body["output"][0]["status"], "incomplete");
    assert_eq!(body["output"][0]["content"][0]["text"], " The quick");
    assert_eq!(body["usage"]["output_tokens"], 2);

    request["stream"] = json!(true);
    let response = client().request(post(&sim, "/v1/responses", &request)).await.unwrap();
    let events = typed_events(&drain(&mut response.into_body()).await.unwrap());
    assert_eq!(events.len(), 4 + 2 + 4);
    let (kind, last) = events.last().unwrap();
    assert_eq!(kind, "response.incomplete");
    let mut terminal = without_ids(last["response"].clone());
    assert_eq!(terminal["usage"]["output_tokens"], 2);
    // The streamed request's body is longer ("stream":true), so it has its own input tokens.
    terminal["usage"] = body["usage"].clone();
    assert_eq!(terminal, without_ids(body));
    assert!(events.iter().all(|(kind, _)| kind != "response.completed"));

    request["max_output_tokens"] = json!(5);
    request["stream"] = json!(false);
    let (_, body) = send(&sim, "/v1/responses", &request).await;
    assert_eq!(body["status"], "completed", "a cap the answer does not reach cuts nothing");
}

#[tokio::test]
async fn an_early_end_of_a_responses_stream_sends_no_terminal_event() {
    let sim = Sim::start(SimOptions {
        tokens: 5,
        failures: Failures { end_after_chunks: Some(2), ..Failures::default() },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let response = client().request(post(&sim, "/v1/responses", &respond(json!("hi"), true))).await.unwrap();
    let text = drain(&mut response.into_body()).await.expect("ends cleanly, not broken");
    let kinds: Vec<String> = typed_events(&text).into_iter().map(|(kind, _)| kind).collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta"
        ]
    );
    let stats = sim.stats();
    assert_eq!((stats.errors_injected, stats.completed, stats.cancelled), (1, 0, 0));

    sim.set_failures(Failures { reset_after_chunks: Some(1), ..Failures::default() });
    let response = client().request(post(&sim, "/v1/responses", &respond(json!("hi"), true))).await.unwrap();
    let text = drain(&mut response.into_body()).await.expect_err("the stream breaks");
    assert_eq!(text.matches("event: response.output_text.delta\n").count(), 1, "{text}");
    assert!(!text.contains("response.completed"), "{text}");

    sim.set_failures(Failures { stall_after_chunks: Some(1), ..Failures::default() });
    let response = client().request(post(&sim, "/v1/responses", &respond(json!("hi"), true))).await.unwrap();
    let mut body = response.into_body();
    let mut seen = String::new();
    while !seen.contains("response.output_text.delta") {
        seen.push_str(&String::from_utf8_lossy(&body.frame().await.unwrap().unwrap().into_data().unwrap()));
    }
    assert!(tokio::time::timeout(Duration::from_millis(150), body.frame()).await.is_err(), "silent after one delta");
    drop(body);
    eventually("the stalled stream counts as cancelled", || sim.stats().cancelled == 1).await;
    assert_eq!(sim.stats().errors_injected, 3);
}

#[tokio::test]
async fn injected_errors_and_a_full_queue_refuse_responses_and_rankings_too() {
    let sim = Sim::start(SimOptions {
        models: vec![LLAMA.into(), RERANK.into()],
        failures: Failures { error_rate: 1.0, error_status: 503, retry_after: Some(3), ..Failures::default() },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let ranking = json!({ "model": RERANK, "query": { "text": "q" }, "passages": [{ "text": "p" }] });
    for (path, body) in [("/v1/responses", respond(json!("hi"), true)), ("/v1/ranking", ranking)] {
        let response = client().request(post(&sim, path, &body)).await.unwrap();
        assert_eq!(
            (response.status().as_u16(), response.headers()["retry-after"].to_str().unwrap()),
            (503, "3"),
            "{path}"
        );
    }
    let stats = sim.stats();
    assert_eq!((stats.requests, stats.errors_injected, stats.completed), (2, 2, 0));
}

// The clock is paused, as in the chat test, so the time to first token is exact.
#[tokio::test(start_paused = true)]
async fn a_responses_stream_acknowledges_at_once_and_waits_for_the_first_token_after_cached_prefill() {
    let prefill = Duration::from_micros(200);
    let sim = Sim::start(SimOptions {
        ttft: Duration::from_millis(5),
        prefill_per_token: prefill,
        kv_cache_tokens: 100_000,
        record_requests: true,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let instructions = "You are a helpful assistant. ".repeat(100);
    let request = |input: &str| json!({ "model": LLAMA, "instructions": instructions, "input": input, "stream": true });
    // Times to the frame holding `response.created` and to the first delta.
    let sim = &sim;
    let timed = |request: Value| async move {
        let started = tokio::time::Instant::now();
        let response = client().request(post(sim, "/v1/responses", &request)).await.unwrap();
        let mut body = response.into_body();
        let mut seen = String::new();
        let mut acknowledged = None;
        while !seen.contains("response.output_text.delta") {
            seen.push_str(&String::from_utf8_lossy(&body.frame().await.unwrap().unwrap().into_data().unwrap()));
            acknowledged.get_or_insert(started.elapsed());
        }
        let first_token = started.elapsed();
        let events = typed_events(&format!("{seen}{}", drain(&mut body).await.unwrap()));
        (acknowledged.unwrap(), first_token, events.last().unwrap().1["response"]["usage"].clone())
    };

    let (acknowledged, cold, usage) = timed(request("first question")).await;
    let prompt_tokens = sim.recorded()[0].body.len() as u64 / 4;
    assert_eq!(usage["input_tokens"], prompt_tokens);
    assert_eq!(usage["input_tokens_details"]["cached_tokens"], 0);
    assert!(acknowledged < Duration::from_millis(1), "created and in_progress at once: {acknowledged:?}");
    let expected = Duration::from_millis(5) + prefill * prompt_tokens as u32;
    assert!(cold >= expected && cold < expected + Duration::from_millis(5), "{cold:?}, expected {expected:?}");

    // Another input after the same instructions: the instructions' whole blocks are cached.
    let (_, warm, usage) = timed(request("second question")).await;
    let cached = usage["input_tokens_details"]["cached_tokens"].as_u64().unwrap();
    assert_eq!(cached, json!(instructions).to_string().len() as u64 / 64 * 16, "the instructions' whole blocks");
    assert_eq!(sim.stats().prefix_cache_hits, cached);
    let uncached = usage["input_tokens"].as_u64().unwrap() - cached;
    let expected = Duration::from_millis(5) + prefill * uncached as u32;
    assert!(warm >= expected && warm < expected + Duration::from_millis(5), "{warm:?}, expected {expected:?}");
}

fn rerank(query: &str, passages: &[&str]) -> Value {
    let passages: Vec<Value> = passages.iter().map(|text| json!({ "text": text })).collect();
    json!({ "model": RERANK, "query": { "text": query }, "passages": passages, "truncate": "END" })
}

#[tokio::test]
async fn rankings_order_passages_by_shared_words_deterministically_with_usage() {
    let sim = Sim::start(SimOptions {
        models: vec![RERANK.into()],
        ttft: Duration::from_millis(30),
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let request = rerank(
        "Which GPU runs NIM fastest?",
        &["Bananas are yellow.", "NIM runs on any NVIDIA GPU.", "The fastest GPU runs NIM: which is it?", "gpu"],
    );
    let started = Instant::now();
    let (status, body) = send(&sim, "/v1/ranking", &request).await;
    assert!(started.elapsed() >= Duration::from_millis(30), "ttft applies: {:?}", started.elapsed());
    assert_eq!(status, 200);
    let tokens = request.to_string().len() as u64 / 4;
    // Five query words: which gpu runs nim fastest. A logit is those present minus those absent.
    assert_eq!(
        body,
        json!({
            "rankings": [
                { "index": 2, "logit": 5.0 },
                { "index": 1, "logit": 1.0 },
                { "index": 3, "logit": -3.0 },
                { "index": 0, "logit": -5.0 }
            ],
            "usage": { "prompt_tokens": tokens, "total_tokens": tokens }
        })
    );
    let (_, again) = send(&sim, "/v1/ranking", &request).await;
    assert_eq!(again, body, "deterministic");

    let (_, ties) = send(&sim, "/v1/ranking", &rerank("a b", &["b", "c", "a"])).await;
    let order: Vec<u64> = ties["rankings"].as_array().unwrap().iter().map(|r| r["index"].as_u64().unwrap()).collect();
    assert_eq!(order, [0, 2, 1], "equal logits by index");

    let stats = sim.stats();
    assert_eq!((stats.requests, stats.completed, stats.generation_tokens, stats.chunks_sent), (3, 3, 0, 0));
    assert_eq!(stats.prompt_tokens, 2 * tokens + rerank("a b", &["b", "c", "a"]).to_string().len() as u64 / 4);
}

#[tokio::test]
async fn a_ranking_with_a_bad_body_an_unknown_model_or_no_key_is_refused() {
    let sim = Sim::start(SimOptions {
        models: vec![RERANK.into()],
        api_key: Some("k".into()),
        record_requests: true,
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let ranking = |body: &Value, key: &str| {
        Request::post(format!("{}/v1/ranking", sim.url()))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap()
    };
    let read = |response: http::Response<Incoming>| async move {
        let status = response.status().as_u16();
        let body: Value = serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
        (status, body)
    };
    let good = rerank("q", &["p"]);
    let (status, body) = read(client().request(ranking(&good, "nope")).await.unwrap()).await;
    assert_eq!((status, body["error"]["code"].clone()), (401, json!(401)));

    let bad_bodies = [
        json!({ "model": RERANK, "passages": [{ "text": "p" }] }),
        json!({ "model": RERANK, "query": "q", "passages": [{ "text": "p" }] }),
        json!({ "model": RERANK, "query": { "text": "q" } }),
        json!({ "model": RERANK, "query": { "text": "q" }, "passages": ["p"] }),
        json!({ "model": RERANK, "query": { "text": "q" }, "passages": [{ "text": "p" }, { "content": "p" }] }),
        json!({ "model": RERANK, "query": { "text": "q" }, "passages": { "text": "p" } }),
    ];
    for bad in &bad_bodies {
        let (status, body) = read(client().request(ranking(bad, "k")).await.unwrap()).await;
        assert_eq!(
            (status, body["error"]["type"].clone(), body["error"]["code"].clone()),
            (400, json!("BadRequestError"), json!(400)),
            "{bad}"
        );
        assert!(body["error"]["message"].as_str().unwrap().contains("must be"), "{body}");
    }
    let mut unknown = good.clone();
    unknown["model"] = json!("no/such");
    let (status, body) = read(client().request(ranking(&unknown, "k")).await.unwrap()).await;
    assert_eq!((status, body["error"]["type"].clone()), (404, json!("NotFoundError")));
    let (status, _) = read(client().request(ranking(&good, "k")).await.unwrap()).await;
    assert_eq!(status, 200);

    let stats = sim.stats();
    assert_eq!((stats.requests, stats.completed, stats.prompt_tokens), (8, 1, good.to_string().len() as u64 / 4));
    let recorded = sim.recorded();
    assert_eq!(recorded.len(), 9, "refused ones included");
    assert_eq!((recorded[8].path.as_str(), recorded[8].body.clone()), ("/v1/ranking", Bytes::from(good.to_string())));
}
