//! Request and token limits over real sockets, through the gateway to nim-sim: 429 with
//! `Retry-After` and the `x-ratelimit-*` headers, refills timed against `Retry-After`, token
//! reservations that keep streams from overshooting, settlement from reported usage (JSON
//! answers, usage chunks asked for on the client's behalf and hidden from it, events split
//! across frames) and refunds after short answers.

use std::time::{Duration, Instant};

use http::Method;
use nimgate::config::raw::{RawBackend, RawLimits};
use nimgate_tests::*;
use serde_json::{Value, json};

const LLAMA: &str = "meta/llama-3.1-8b-instruct";

fn header_u64(reply: &Reply, name: &str) -> u64 {
    reply.header(name).unwrap_or_else(|| panic!("missing {name}")).parse().unwrap()
}

/// A chat request body with `max_tokens`, `stream` and, optionally, stream_options.
fn request(max_tokens: Option<u64>, stream: bool, include_usage: bool) -> Value {
    let mut body = chat_body(LLAMA, stream);
    if let Some(max) = max_tokens {
        body["max_tokens"] = json!(max);
    }
    if include_usage {
        body["stream_options"] = json!({ "include_usage": true });
    }
    body
}

/// Reads a streaming answer whole; returns its text.
async fn stream_text(client: &TestClient, body: &Value) -> (http::StatusCode, http::HeaderMap, String) {
    let response = client.send(client.request(Method::POST, "/v1/chat/completions", body.to_string(), &[])).await;
    let (parts, mut body) = response.into_parts();
    let text = all_frames(&mut body).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    (parts.status, parts.headers, text)
}

/// The usage-only events of an SSE text.
fn usage_events(text: &str) -> Vec<Value> {
    sse_data(text)
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|e| e["choices"] == json!([]) && e["usage"].is_object())
        .collect()
}

/// Tokens the key has left now, as the gateway reports them on any answer.
async fn tokens_left(client: &TestClient) -> u64 {
    header_u64(&client.get("/v1/models").await, "x-ratelimit-remaining-tokens")
}

/// `20s`, `39.9s`, `1m0s`, `250ms` in seconds.
fn openai_seconds(text: &str) -> f64 {
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.parse::<f64>().unwrap() / 1000.0;
    }
    let text = text.strip_suffix('s').unwrap();
    match text.split_once('m') {
        Some((m, s)) => m.parse::<f64>().unwrap() * 60.0 + s.parse::<f64>().unwrap(),
        None => text.parse().unwrap(),
    }
}

#[tokio::test]
async fn a_minute_of_requests_goes_back_to_back_then_429_with_retry_after_and_headers() {
    let sim = sim_serving(&[LLAMA]).await;
    let gw = gateway()
        .sim_route(LLAMA, &[&sim])
        .key_limited("team-a", &["*"], Some(3), None)
        .key_limited("team-b", &["*"], Some(3), None)
        .start()
        .await;
    let client = gw.client("team-a");

    // The minute's 3 at once, counted down on every answer; full again 20 s per request later.
    for (left, reset) in [(2, 20.0), (1, 40.0), (0, 60.0)] {
        let reply = client.chat(LLAMA).await;
        assert_eq!(reply.status, 200);
        assert_eq!(header_u64(&reply, "x-ratelimit-limit-requests"), 3);
        assert_eq!(header_u64(&reply, "x-ratelimit-remaining-requests"), left);
        let shown = reply.header("x-ratelimit-reset-requests").unwrap();
        let secs = openai_seconds(shown);
        assert!(secs <= reset && secs > reset - 1.0, "{shown} for {reset}s");
        assert!(reply.header("x-ratelimit-limit-tokens").is_none(), "no token limit, no token headers");
    }
    let refused = client.chat(LLAMA).await;
    let message = refused.assert_error(429, "rate_limit_exceeded");
    assert_eq!(refused.json()["error"]["type"], "rate_limit_error");
    assert!(message.contains("rate limit") && message.contains("3 requests per minute"), "{message}");
    assert_eq!(refused.header("retry-after"), Some("20"), "the next request's turn, not the minute");
    assert_eq!(header_u64(&refused, "x-ratelimit-remaining-requests"), 0);
    assert_eq!(sim.stats().requests, 3, "the refused request never reached the backend");

    assert_eq!(gw.client("team-b").chat(LLAMA).await.status, 200, "another key is unaffected");
}

#[tokio::test]
async fn a_burst_of_one_spaces_requests_and_admits_again_after_retry_after() {
    let sim = sim_serving(&[LLAMA]).await;
    let limits = RawLimits { requests_per_minute: Some(60), burst: Some(1), ..RawLimits::default() };
    let gw = gateway().sim_route(LLAMA, &[&sim]).key_with_limits("team-a", &["*"], limits).start().await;
    let client = gw.client("team-a");
    let first = client.chat(LLAMA).await;
    assert_eq!(first.status, 200);
    assert_eq!(header_u64(&first, "x-ratelimit-remaining-requests"), 0);
    let refused = client.chat(LLAMA).await;
    refused.assert_error(429, "rate_limit_exceeded");
    assert_eq!(refused.header("retry-after"), Some("1"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(client.chat(LLAMA).await.status, 200, "admitted again after Retry-After");
}

#[tokio::test]
async fn retry_after_matches_the_real_refill_time() {
    let sim = sim_serving(&[LLAMA]).await;
    // 30 per minute, at most 5 back to back: then one every 2 s.
    let limits = RawLimits { requests_per_minute: Some(30), burst: Some(5), ..RawLimits::default() };
    let gw = gateway().sim_route(LLAMA, &[&sim]).key_with_limits("team-a", &["*"], limits).start().await;
    let client = gw.client("team-a");
    for _ in 0..5 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    let refused = client.chat(LLAMA).await;
    assert_eq!(refused.status, 429);
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(retry_after, 2);

    let since = Instant::now();
    while client.chat(LLAMA).await.status == 429 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waited = since.elapsed();
    assert_admitted_as_announced(waited, retry_after);
}

#[tokio::test]
async fn token_retry_after_matches_the_real_refill_time() {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], tokens: 100, ..SimOptions::default() }).await;
    // 600 per minute = 10 tokens per second.
    let gw = gateway().sim_route(LLAMA, &[&sim]).key_limited("team-a", &["*"], None, Some(600)).start().await;
    let client = gw.client("team-a");
    // Spend most of the minute: the answer's real usage (its prompt + 100) is what is charged.
    assert_eq!(client.post_json("/v1/chat/completions", &request(Some(400), false, false)).await.status, 200);
    let left = tokens_left(&client).await;
    let refused = client.post_json("/v1/chat/completions", &request(Some(left + 10), false, false)).await;
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert!(refused.assert_error(429, "rate_limit_exceeded").contains("tokens per minute"));
    let retry_after: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((2..=4).contains(&retry_after), "{retry_after}");

    let since = Instant::now();
    while client.post_json("/v1/chat/completions", &request(Some(left + 10), false, false)).await.status == 429 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let waited = since.elapsed();
    assert_admitted_as_announced(waited, retry_after);
}

/// Polled every 50 ms, admission comes within a second of `Retry-After`, and not before the
/// second it names has begun.
fn assert_admitted_as_announced(waited: Duration, retry_after: u64) {
    let announced = Duration::from_secs(retry_after);
    assert!(
        waited > announced - Duration::from_secs(1) && waited <= announced + Duration::from_millis(150),
        "admitted after {waited:?}, Retry-After said {retry_after}s"
    );
}

#[tokio::test]
async fn a_json_answer_is_charged_its_reported_usage() {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], tokens: 20, ..SimOptions::default() }).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key_limited("team-a", &["*"], None, Some(6000)).start().await;
    let client = gw.client("team-a");

    let reply = client.post_json("/v1/chat/completions", &request(Some(300), false, false)).await;
    assert_eq!(reply.status, 200);
    let usage = reply.json()["usage"]["total_tokens"].as_u64().unwrap();
    assert_eq!(header_u64(&reply, "x-ratelimit-limit-tokens"), 6000);
    // At admission the whole estimate (prompt + 300) was held...
    assert!(header_u64(&reply, "x-ratelimit-remaining-tokens") <= 6000 - 300);
    // ...and the real usage replaced it (refills add at most 100 per second).
    let left = tokens_left(&client).await;
    assert!((6000 - usage..6000 - usage + 50).contains(&left), "left {left}, used {usage}");
}

#[tokio::test]
async fn a_refund_after_a_short_answer_lets_the_next_request_in_at_once() {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], tokens: 5, ..SimOptions::default() }).await;
    let gw = gateway()
        .sim_route(LLAMA, &[&sim])
        .key_limited("team-a", &["*"], None, Some(600))
        .with(|raw| raw.rate_limits.default_max_tokens = Some(450))
        .start()
        .await;
    let client = gw.client("team-a");
    // Each request reserves its prompt (~25) + 450 of the 600: without the refund of the ~445
    // an answer of 5 tokens leaves unused, the second request would wait for a minute.
    for _ in 0..2 {
        let reply = client.post_json("/v1/chat/completions", &request(None, false, false)).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    for _ in 0..2 {
        let (status, _, _) = stream_text(&client, &request(None, true, false)).await;
        assert_eq!(status, 200);
    }
}

#[tokio::test]
async fn a_stream_whose_client_did_not_ask_for_usage_is_charged_but_shows_none() {
    let sim =
        sim(SimOptions { models: vec![LLAMA.into()], tokens: 30, record_requests: true, ..SimOptions::default() })
            .await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key_limited("team-a", &["*"], None, Some(6000)).start().await;
    let client = gw.client("team-a");

    let (status, headers, text) = stream_text(&client, &request(Some(100), true, false)).await;
    assert_eq!(status, 200);
    assert!(headers.contains_key("x-ratelimit-remaining-tokens"));
    assert!(usage_events(&text).is_empty(), "the client sees no usage chunk: {text}");
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(sse_data(&text).len(), 1 + 30 + 1 + 1, "every other event arrives");

    let sent = sim.recorded()[0].body.clone();
    let sent: Value = serde_json::from_slice(&sent).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true, "asked upstream on the client's behalf");
    let charged = sent.to_string().len() as u64 / 4 + 30; // the sim's prompt count + its tokens
    let left = tokens_left(&client).await;
    assert!((6000 - charged - 2..6000 - charged + 50).contains(&left), "left {left}, charged {charged}");
}

#[tokio::test]
async fn a_stream_whose_client_asked_for_usage_gets_it() {
    let sim = sim(SimOptions { models: vec![LLAMA.into()], tokens: 7, ..SimOptions::default() }).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key_limited("team-a", &["*"], None, Some(6000)).start().await;
    let (_, _, text) = stream_text(&gw.client("team-a"), &request(Some(100), true, true)).await;
    let usage = usage_events(&text);
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0]["usage"]["completion_tokens"], 7);
}

#[tokio::test]
async fn a_usage_event_split_across_two_frames_is_counted_and_hidden() {
    let sim = sim(SimOptions {
        models: vec![LLAMA.into()],
        tokens: 12,
        split_events: true,
        record_requests: true,
        ..SimOptions::default()
    })
    .await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key_limited("team-a", &["*"], None, Some(6000)).start().await;
    let client = gw.client("team-a");

    let (_, _, text) = stream_text(&client, &request(Some(500), true, false)).await;
    assert!(usage_events(&text).is_empty(), "{text}");
    assert_eq!(sse_data(&text).len(), 1 + 12 + 1 + 1);

    let charged = sim.recorded()[0].body.len() as u64 / 4 + 12;
    let left = tokens_left(&client).await;
    assert!((6000 - charged - 2..6000 - charged + 50).contains(&left), "left {left}, charged {charged}");
}

#[tokio::test]
async fn streams_cannot_overshoot_the_token_limit_beyond_their_reservations() {
    let sim = sim(SimOptions {
        models: vec![LLAMA.into()],
        tokens: 60,
        chunk_delay: Duration::from_millis(10),
        gated_chunks: true,
        ..SimOptions::default()
    })
    .await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key_limited("team-a", &["*"], None, Some(200)).start().await;
    let client = gw.client("team-a");
    let body = request(Some(60), true, false).to_string();
    let estimate = body.len() as u64 / 4 + 60;
    assert!(2 * estimate <= 200 && 3 * estimate > 200, "two fit, three do not ({estimate})");

    // Two streams are admitted and held open; nothing has been charged by usage yet.
    let first = client.send(client.request(Method::POST, "/v1/chat/completions", body.clone(), &[])).await;
    let second = client.send(client.request(Method::POST, "/v1/chat/completions", body.clone(), &[])).await;
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    // A third is refused on their reservations alone: charging only after the answers would let it in.
    let third = client.post("/v1/chat/completions", body.clone()).await;
    third.assert_error(429, "rate_limit_exceeded");
    assert_eq!(sim.stats().requests, 2);

    sim.release_chunks(1000);
    for response in [first, second] {
        let mut body = response.into_body();
        all_frames(&mut body).await;
    }
    // The answers used what they reserved (the sim counts the prompt the same way), so nothing
    // overshot, and the charge now on the key is their reported usage.
    let charged = 2 * (sim_prompt_tokens(&body) + 60);
    assert!(charged <= 200, "the reservations covered what the streams used ({charged})");
    let left = tokens_left(&client).await;
    assert!((200 - charged..200 - charged + 10).contains(&left), "left {left}, charged {charged}");
    // And the stream usage keeps the limit reached for the next one.
    client.post("/v1/chat/completions", body).await.assert_error(429, "rate_limit_exceeded");
}

/// The prompt tokens nim-sim reports for a request the gateway amended to ask for usage.
fn sim_prompt_tokens(client_body: &str) -> u64 {
    (client_body.len() as u64 + r#""stream_options":{"include_usage":true},"#.len() as u64) / 4
}

#[tokio::test]
async fn a_backend_without_stream_usage_is_estimated_from_the_stream() {
    let sim =
        sim(SimOptions { models: vec![LLAMA.into()], tokens: 40, record_requests: true, ..SimOptions::default() })
            .await;
    let gw = gateway()
        .backend_with(RawBackend {
            name: "no-usage".into(),
            url: sim.url(),
            stream_usage: Some(false),
            ..RawBackend::default()
        })
        .route(LLAMA, &["no-usage"])
        .key_limited("team-a", &["*"], None, Some(6000))
        .start()
        .await;
    let client = gw.client("team-a");
    let body = request(Some(1000), true, false);

    let (_, _, text) = stream_text(&client, &body).await;
    assert_eq!(sse_data(&text).len(), 1 + 40 + 1 + 1);
    assert_eq!(sim.recorded()[0].body, body.to_string(), "the request is forwarded untouched");
    // Estimated: the prompt estimate plus one token per text event, not the 1000 reserved.
    let estimated = body.to_string().len() as u64 / 4 + 40;
    let left = tokens_left(&client).await;
    assert!((6000 - estimated - 2..6000 - estimated + 50).contains(&left), "left {left}, estimated {estimated}");
}

#[tokio::test]
async fn every_answer_to_a_limited_key_carries_its_limits() {
    let sim = sim_serving(&[LLAMA]).await;
    let gw = gateway()
        .sim_route(LLAMA, &[&sim])
        .key_limited("team-a", &["meta/*"], Some(600), Some(100_000))
        .key("unlimited", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");
    for reply in [
        client.chat(LLAMA).await,
        client.chat("meta/not-routed").await,
        client.post("/v1/chat/completions", "{not json").await,
        client.get("/v1/models").await,
    ] {
        assert_eq!(header_u64(&reply, "x-ratelimit-limit-requests"), 600, "{}", reply.status);
        assert_eq!(header_u64(&reply, "x-ratelimit-limit-tokens"), 100_000);
        assert!(reply.header("x-ratelimit-reset-tokens").is_some());
    }
    let reply = gw.client("unlimited").chat(LLAMA).await;
    assert!(reply.header("x-ratelimit-limit-requests").is_none());
}

#[tokio::test]
async fn limiter_state_survives_a_new_snapshot_for_unchanged_keys_only() {
    let sim = sim_serving(&[LLAMA]).await;
    let config = |rpm_b: u64| {
        gateway().sim_route(LLAMA, &[&sim]).key_limited("team-a", &["*"], Some(60), None).key_limited(
            "team-b",
            &["*"],
            Some(rpm_b),
            None,
        )
    };
    let gw = config(60).start().await;
    for name in ["team-a", "team-b"] {
        for _ in 0..3 {
            assert_eq!(gw.client(name).chat(LLAMA).await.status, 200);
        }
    }

    // The same keys, team-b with a new limit: team-a keeps what it spent, team-b starts afresh.
    gw.gateway.replace(config(120).snapshot());
    let a = gw.client("team-a").chat(LLAMA).await;
    assert_eq!(header_u64(&a, "x-ratelimit-remaining-requests"), 56, "60 - 3 - this one");
    let b = gw.client("team-b").chat(LLAMA).await;
    assert_eq!(header_u64(&b, "x-ratelimit-remaining-requests"), 119, "a fresh minute of 120, minus this one");
}

#[tokio::test]
async fn max_concurrency_refuses_while_the_keys_streams_run_and_admits_when_one_ends() {
    let sim =
        sim(SimOptions { models: vec![LLAMA.into()], gated_chunks: true, tokens: 50, ..SimOptions::default() }).await;
    let limits = RawLimits { max_concurrency: Some(2), ..RawLimits::default() };
    let gw = gateway()
        .sim_route(LLAMA, &[&sim])
        .key_with_limits("team-a", &["*"], limits)
        .key("unlimited", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");

    let first = client.chat_stream(LLAMA).await;
    assert_eq!(first.status(), 200);
    let second = client.chat_stream(LLAMA).await;
    assert_eq!(second.status(), 200);
    let refused = client.chat(LLAMA).await;
    let message = refused.assert_error(429, "concurrency_limit_exceeded");
    assert_eq!(refused.json()["error"]["type"], "rate_limit_error");
    assert!(message.contains("rate limit") && message.contains("2 requests in flight"), "{message}");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(gw.client("unlimited").chat(LLAMA).await.status, 200, "other keys are not counted");

    // A client that leaves mid-stream gives its slot back.
    drop(first);
    eventually("the abandoned stream's slot is back", Duration::from_secs(5), || async {
        client.chat(LLAMA).await.status == 200
    })
    .await;
    let third = client.chat_stream(LLAMA).await;
    assert_eq!(third.status(), 200);
    client.chat(LLAMA).await.assert_error(429, "concurrency_limit_exceeded");
    // A stream that ends gives its slot back.
    sim.release_chunks(100_000);
    let mut second = second.into_body();
    let text: String = all_frames(&mut second).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    assert!(text.contains("[DONE]"));
    let mut third = third.into_body();
    all_frames(&mut third).await;
    eventually("every slot is back", Duration::from_secs(5), || async {
        let (a, b) = (client.chat_stream(LLAMA).await, client.chat_stream(LLAMA).await);
        a.status() == 200 && b.status() == 200
    })
    .await;
}

/// A chunk whose text is `[DONE]`, then the usage chunk (`completion_tokens` of 1,000), then
/// the real `data: [DONE]`.
const DONE_IN_TEXT: [&str; 3] = [
    "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"[DONE]\"}}],\"usage\":null}\n\n",
    "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":1000,\"total_tokens\":1010}}\n\n",
    "data: [DONE]\n\n",
];

/// A backend streaming one chat answer in `writes`, apart in time so that they reach the
/// gateway as separate frames.
async fn sse_backend(writes: &'static [&'static str]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 8192];
                // The head, then the body its Content-Length announces.
                loop {
                    let text = String::from_utf8_lossy(&request).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let length = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                            .unwrap_or(0);
                        if request.len() >= end + 4 + length {
                            break;
                        }
                    }
                    let Ok(n) = socket.read(&mut buffer).await else { return };
                    if n == 0 {
                        return;
                    }
                    request.extend_from_slice(&buffer[..n]);
                }
                let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n";
                if socket.write_all(head.as_bytes()).await.is_err() {
                    return;
                }
                for event in writes {
                    let chunk = format!("{:x}\r\n{event}\r\n", event.len());
                    if socket.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let _ = socket.write_all(b"0\r\n\r\n").await;
            });
        }
    });
    url
}

/// Streams `writes` through a key limited to 6,000 tokens a minute: the stream's text as the
/// client read it, and the tokens the key has left after it.
async fn stream_through_limited_key(writes: &'static [&'static str]) -> (String, u64) {
    let gw = gateway()
        .backend("sse", &sse_backend(writes).await)
        .route(LLAMA, &["sse"])
        .key_limited("team-a", &["*"], None, Some(6000))
        .start()
        .await;
    let client = gw.client("team-a");
    let (status, _, text) = stream_text(&client, &request(Some(100), true, false)).await;
    assert_eq!(status, 200, "{text}");
    (text, tokens_left(&client).await)
}

/// What a key limited to 6,000 tokens has left once charged the usage chunk's 1,010 (give or
/// take the minute's refill), rather than an estimate made before that chunk went by.
const LEFT_AFTER_REPORTED_USAGE: std::ops::Range<u64> = 6000 - 1010..6000 - 1010 + 50;

#[tokio::test]
async fn a_stream_whose_text_says_done_is_charged_its_reported_usage() {
    let (text, left) = stream_through_limited_key(&DONE_IN_TEXT).await;
    assert!(text.contains("\"content\":\"[DONE]\""), "{text}");
    assert!(usage_events(&text).is_empty(), "the usage chunk nimgate asked for is hidden: {text}");
    assert!(LEFT_AFTER_REPORTED_USAGE.contains(&left), "left {left}");
}

#[tokio::test]
async fn a_frame_that_ends_right_after_done_in_a_chunks_text_does_not_end_the_stream() {
    // The chunk's text is `data: [DONE]`, and its first write ends right after it, as the
    // stream's last bytes would.
    static WRITES: [&str; 4] = [
        "data: {\"id\":\"c\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"data: [DONE]",
        "\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":10,\"completion_tokens\":1000,\"total_tokens\":1010}}\n\n",
        "data: [DONE]\n\n",
    ];
    let (text, left) = stream_through_limited_key(&WRITES).await;
    assert!(text.contains("\"content\":\"data: [DONE]\""), "{text}");
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert!(LEFT_AFTER_REPORTED_USAGE.contains(&left), "left {left}");
}
