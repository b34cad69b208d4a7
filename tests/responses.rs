//! The Responses API and NIM's reranking API (#18) through the gateway, over real sockets with
//! nim-sim: answers pass byte for byte, usage in the Responses API's names settles token
//! limits, a stream cut before its terminal event ends with the Responses error event, and
//! ranking is routed, ACL'd and limited like chat.

use bytes::Bytes;
use http::Method;
use nimgate_tests::*;
use serde_json::{Value, json};

const LLAMA: &str = "meta/llama-3.1-8b-instruct";
const RERANK: &str = "nvidia/nv-rerankqa-mistral-4b-v3";

fn responses(stream: bool, max_output_tokens: Option<u64>) -> Value {
    let mut body = json!({ "model": LLAMA, "input": "Write a haiku about GPUs", "stream": stream });
    if let Some(max) = max_output_tokens {
        body["max_output_tokens"] = json!(max);
    }
    body
}

/// `text` with the values nim-sim makes up per answer (ids, timestamps) blanked, so two
/// answers to the same request compare byte for byte.
fn masked(text: &str) -> String {
    let mut out = text.to_owned();
    for key in ["\"id\":\"", "\"item_id\":\"", "\"created_at\":", "\"created\":"] {
        let mut from = 0;
        while let Some(found) = out[from..].find(key) {
            let start = from + found + key.len();
            let end = start + out[start..].find(['"', ',', '}']).unwrap_or(0);
            out.replace_range(start..end, "*");
            from = start + 1;
        }
    }
    out
}

async fn body_text(response: http::Response<hyper::body::Incoming>) -> String {
    let mut body = response.into_body();
    all_frames(&mut body).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect()
}

/// Sends `body` to `path` straight to the sim, as the gateway would (no key).
async fn direct(sim: &nim_sim::Sim, path: &str, body: &Value) -> String {
    let client = TestClient::new(&sim.url(), None);
    body_text(client.send(client.request(Method::POST, path, body.to_string(), &[])).await).await
}

async fn through(gw: &TestGateway, key: &str, path: &str, body: &Value) -> (u16, String) {
    let client = gw.client(key);
    let response = client.send(client.request(Method::POST, path, body.to_string(), &[])).await;
    let status = response.status().as_u16();
    (status, body_text(response).await)
}

fn record(options: SimOptions) -> SimOptions {
    SimOptions { models: vec![LLAMA.into(), RERANK.into()], record_requests: true, ..options }
}

#[tokio::test]
async fn a_responses_answer_and_stream_pass_through_as_the_backend_sent_them() {
    let sim = sim(record(SimOptions { tokens: 6, ..SimOptions::default() })).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;
    for stream in [false, true] {
        let request = responses(stream, None);
        let (status, via_gateway) = through(&gw, "team-a", "/v1/responses", &request).await;
        assert_eq!(status, 200, "{via_gateway}");
        let straight = direct(&sim, "/v1/responses", &request).await;
        assert_eq!(masked(&via_gateway), masked(&straight), "stream: {stream}");
        // Forwarded untouched: no stream_options asked on the client's behalf.
        let sent = &sim.recorded()[sim.recorded().len() - 2].body;
        assert_eq!(sent, &Bytes::from(request.to_string()));
    }
    let (_, stream) = through(&gw, "team-a", "/v1/responses", &responses(true, None)).await;
    assert!(stream.starts_with("event: response.created\n"), "{stream}");
    assert!(stream.trim_end().rsplit("\n\n").next().unwrap().starts_with("event: response.completed\n"), "{stream}");
    assert!(!stream.contains("[DONE]"));
    let (_, samples) = scrape(&gw).await;
    let backend = format!("sim-{}", sim.addr().port());
    let series =
        format!("nimgate_requests_total{{backend=\"{backend}\",code=\"200\",key=\"team-a\",model=\"{LLAMA}\"}}");
    assert_eq!(value(&samples, &series), 3.0);
}

#[tokio::test]
async fn responses_usage_settles_token_limits_and_counts_tokens() {
    let sim = sim(record(SimOptions { tokens: 20, ..SimOptions::default() })).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key_limited("team-a", &["*"], None, Some(6000)).start().await;
    let client = gw.client("team-a");
    let reply = client.post_json("/v1/responses", &responses(false, Some(300))).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let usage = &reply.json()["usage"];
    let used = usage["total_tokens"].as_u64().unwrap();
    // The reservation (body / 4 + 300) was replaced by the usage the answer reported.
    let left: u64 = client.get("/v1/models").await.header("x-ratelimit-remaining-tokens").unwrap().parse().unwrap();
    assert!((6000 - used..6000 - used + 50).contains(&left), "left {left}, used {used}");
    // A stream: its terminal event's usage.
    let (status, text) = through(&gw, "team-a", "/v1/responses", &responses(true, Some(300))).await;
    assert_eq!(status, 200);
    let completed = text.rsplit("data: ").next().unwrap().trim();
    let completed: Value = serde_json::from_str(completed).unwrap();
    let stream_used = completed["response"]["usage"]["total_tokens"].as_u64().unwrap();
    let (_, samples) = scrape(&gw).await;
    let counted = |kind: &str| {
        value(&samples, &format!("nimgate_tokens_total{{key=\"team-a\",kind=\"{kind}\",model=\"{LLAMA}\"}}"))
    };
    assert_eq!(counted("prompt") + counted("completion"), (used + stream_used) as f64);
    assert_eq!(counted("completion"), 40.0, "20 output tokens in each answer");
}

#[tokio::test]
async fn a_key_is_refused_once_its_responses_usage_has_spent_its_tokens() {
    let sim = sim(record(SimOptions { tokens: 50, ..SimOptions::default() })).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key_limited("team-a", &["*"], None, Some(200)).start().await;
    let client = gw.client("team-a");
    let mut admitted = 0;
    for _ in 0..5 {
        let reply = client.post_json("/v1/responses", &responses(false, Some(60))).await;
        match reply.status.as_u16() {
            200 => admitted += 1,
            429 => {
                assert!(reply.assert_error(429, "rate_limit_exceeded").contains("tokens per minute"));
                break;
            }
            other => panic!("{other}: {}", reply.text()),
        }
    }
    // Each request reserves its body / 4 (about 26) + 60 and is charged its usage, about
    // 26 + 50: the first two fit in 200, the third's reservation no longer does.
    assert_eq!(admitted, 2);
}

#[tokio::test]
async fn a_responses_stream_cut_before_its_terminal_event_ends_with_the_responses_error_event() {
    for failures in [
        Failures { end_after_chunks: Some(2), ..Failures::default() },
        Failures { reset_after_chunks: Some(2), ..Failures::default() },
    ] {
        let sim = sim(record(SimOptions { tokens: 6, failures: failures.clone(), ..SimOptions::default() })).await;
        let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;
        let (status, text) = through(&gw, "team-a", "/v1/responses", &responses(true, None)).await;
        assert_eq!(status, 200);
        assert!(text.contains("response.output_text.delta"), "{text}");
        assert!(!text.contains("response.completed") && !text.contains("[DONE]"), "{text}");
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        let data = last.strip_prefix("event: error\ndata: ").unwrap_or_else(|| panic!("{failures:?}: {last}"));
        let error: Value = serde_json::from_str(data).unwrap();
        assert_eq!(error["type"], "error");
        assert_eq!(error["code"], "upstream_unavailable");
        assert!(error["message"].as_str().unwrap().contains("broke"), "{error}");
    }
}

#[tokio::test]
async fn ranking_is_routed_acl_checked_and_limited_like_chat() {
    let sim = sim(record(SimOptions::default())).await;
    let gw = gateway()
        .sim_route(RERANK, &[&sim])
        .key_limited("search", &["nvidia/*"], Some(2), None)
        .key("chat-only", &["meta/*"])
        .start()
        .await;
    let request = json!({
        "model": RERANK,
        "query": { "text": "what is a kv cache" },
        "passages": [{ "text": "bread and butter" }, { "text": "a cache of attention keys and values" }],
    });
    let (status, text) = through(&gw, "search", "/v1/ranking", &request).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(text, direct(&sim, "/v1/ranking", &request).await, "byte for byte");
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["rankings"][0]["index"], 1, "the passage sharing the query's words first: {answer}");
    let refused = gw.client("chat-only").post_json("/v1/ranking", &request).await;
    refused.assert_error(403, "model_not_allowed");
    assert_eq!(gw.client("search").post_json("/v1/ranking", &request).await.status, 200);
    gw.client("search").post_json("/v1/ranking", &request).await.assert_error(429, "rate_limit_exceeded");
    let (_, samples) = scrape(&gw).await;
    let counted = |kind: &str| {
        value(&samples, &format!("nimgate_tokens_total{{key=\"search\",kind=\"{kind}\",model=\"{RERANK}\"}}"))
    };
    assert_eq!(counted("completion"), 0.0, "a ranking generates nothing");
    // Two rankings answered, each counted at the usage its answer reported.
    let reported = answer["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(counted("prompt"), 2.0 * reported as f64);
}
