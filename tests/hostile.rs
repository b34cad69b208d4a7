//! Keys and backends that try to break a limit or the gateway's memory: over-limit keys
//! sending big bodies, many unfinished bodies on one h2 connection, `max_tokens` near
//! `u64::MAX`, a backend reporting absurd usage, and outages that must not cost a key its
//! token budget. Real sockets throughout; hostile backends are small servers on loopback.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use nimgate_tests::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LLAMA: &str = "meta/llama-3.1-8b-instruct";
const MIB: usize = 1024 * 1024;

#[tokio::test]
async fn a_key_over_its_limit_is_refused_before_its_body_is_read() {
    let sim = sim_serving(&[LLAMA]).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key_limited("team", &["*"], Some(1), None).start().await;
    assert_eq!(gw.client("team").chat(LLAMA).await.status, 200);

    // 200 more requests each declare 1 MiB and send 64 KiB of it: their 429s come at once,
    // and the gateway holds none of their bodies.
    let before = resident_bytes();
    let started = Instant::now();
    let mut refusals = Vec::new();
    for _ in 0..200 {
        let addr = gw.running.addr();
        refusals.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {}\r\nContent-Length: {MIB}\r\n\r\n",
                secret("team")
            );
            stream.write_all(head.as_bytes()).await.unwrap();
            let _ = stream.write_all(&[b' '; 64 * 1024]).await;
            let mut answer = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut answer))
                .await
                .expect("the refusal does not wait for the body")
                .unwrap();
            String::from_utf8_lossy(&answer[..n]).into_owned()
        }));
    }
    for refusal in refusals {
        let text = refusal.await.unwrap();
        assert!(text.starts_with("HTTP/1.1 429"), "{text}");
        assert!(text.contains("rate_limit_exceeded") && text.to_ascii_lowercase().contains("retry-after"), "{text}");
    }
    let grown = resident_bytes().saturating_sub(before);
    println!("200 over-limit 1 MiB bodies refused in {:?}; RSS grew {} KiB", started.elapsed(), grown / 1024);
    assert_eq!(gw.gateway.body_budget().available() as u64, nimgate::config::validate::DEFAULT_MAX_BUFFERED_BODY_BYTES);
}

/// A request body that sends all but its last byte, then never ends.
struct Unfinished {
    chunk: Option<Bytes>,
}

impl Body for Unfinished {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.chunk.take() {
            Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
            None => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(MIB as u64)
    }
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test]
async fn unfinished_bodies_on_one_h2_connection_hold_no_more_than_the_body_budget() {
    let sim = sim_serving(&[LLAMA]).await;
    let budget = 4 * MIB as u64;
    let gw = gateway()
        .sim_route(LLAMA, &[&sim])
        .key("team", &["*"])
        .max_body_bytes(MIB as u64)
        .with(|raw| {
            raw.server.max_buffered_body_bytes = Some(budget);
            raw.server.header_read_timeout = Some("1s".into());
        })
        .start()
        .await;
    let before = resident_bytes();
    let io = TokioIo::new(TcpStream::connect(gw.running.addr()).await.unwrap());
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(TokioExecutor::new()).handshake::<_, Unfinished>(io).await.unwrap();
    let connection = tokio::spawn(connection);
    let chunk = Bytes::from(vec![b' '; MIB - 1]);
    let mut requests = Vec::new();
    for _ in 0..64 {
        let mut sender = sender.clone();
        let request = http::Request::post(format!("{}/v1/chat/completions", gw.url))
            .header("authorization", format!("Bearer {}", secret("team")))
            .body(Unfinished { chunk: Some(chunk.clone()) })
            .unwrap();
        requests.push(tokio::spawn(async move {
            let response = sender.send_request(request).await.ok()?;
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.ok()?.to_bytes();
            Some((status, String::from_utf8_lossy(&body).into_owned()))
        }));
    }
    // Those that found no room within header_read_timeout are refused; the rest wait for
    // their last byte.
    let started = Instant::now();
    let mut refused = 0;
    while requests.iter().filter(|r| r.is_finished()).count() < 60 && started.elapsed() < Duration::from_secs(8) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for request in &mut requests {
        if request.is_finished() {
            let (status, body) = request.await.unwrap().expect("an answer");
            assert_eq!(status, 503, "{body}");
            assert!(body.contains("server_overloaded"), "{body}");
            refused += 1;
        }
    }
    let grown = resident_bytes().saturating_sub(before);
    println!("64 unfinished 1 MiB bodies, budget 4 MiB: {refused} refused, RSS grew {} KiB", grown / 1024);
    assert!(refused >= 56, "only {refused} of 64 refused within {:?}", started.elapsed());
    assert!(grown < 40 * MIB as u64, "RSS grew {grown} bytes with a 4 MiB body budget");
    assert!(gw.gateway.body_budget().available() < MIB, "the bodies still waiting hold the budget");
    let (_, samples) = scrape(&gw).await;
    assert!(value(&samples, "nimgate_body_budget_waits_total{result=\"refused\"}") >= 56.0);
    // The client leaves (hyper's h2 client closes its socket once nothing uses it): every
    // byte of room comes back.
    for request in &requests {
        request.abort();
    }
    connection.abort();
    drop(sender);
    eventually("the budget is whole again", Duration::from_secs(5), || async {
        gw.gateway.body_budget().available() as u64 == budget
    })
    .await;
}

#[tokio::test]
async fn a_max_tokens_near_u64_max_cannot_wrap_a_token_limit() {
    // A backend that takes its time (nim-sim refuses such a max_tokens itself).
    let answer = json!({"id": "x", "object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 5}});
    let url = answering_backend(
        Duration::from_millis(300),
        200,
        &[("content-type", "application/json")],
        &answer.to_string(),
    )
    .await;
    let gw = gateway()
        .backend("slow", &url)
        .route(LLAMA, &["slow"])
        .key_limited("team", &["*"], None, Some(1000))
        .start()
        .await;
    let client = gw.client("team");
    let mut body = chat_body(LLAMA, false);
    body["max_tokens"] = json!(u64::MAX - 1);
    let replies = (0..8).map(|_| {
        let (client, body) = (client.clone(), body.clone());
        tokio::spawn(async move { client.post_json("/v1/chat/completions", &body).await.status.as_u16() })
    });
    let mut statuses = Vec::new();
    for reply in replies {
        statuses.push(reply.await.unwrap());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 429, 429, 429, 429, 429, 429, 429]);
}

#[tokio::test]
async fn a_backend_reporting_absurd_usage_neither_panics_nor_opens_nor_locks_out_the_key() {
    let max = u64::MAX;
    let answer = json!({
        "id": "x", "object": "chat.completion", "model": LLAMA,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": max, "completion_tokens": max}
    });
    let url =
        answering_backend(Duration::ZERO, 200, &[("content-type", "application/json")], &answer.to_string()).await;
    let gw = gateway()
        .backend("liar", &url)
        .route(LLAMA, &["liar"])
        .key_limited("team", &["*"], None, Some(600))
        .start()
        .await;
    let client = gw.client("team");
    assert_eq!(client.chat(LLAMA).await.status, 200);
    for _ in 0..3 {
        let reply = client.chat(LLAMA).await;
        reply.assert_error(429, "rate_limit_exceeded");
        let retry_after: u64 = reply.header("retry-after").unwrap().parse().unwrap();
        // Ten minutes of debt at most, plus the time to refill this request's estimate.
        assert!((60..=720).contains(&retry_after), "Retry-After: {retry_after}");
    }
}

#[tokio::test]
async fn requests_failing_before_any_upstream_answer_cost_no_tokens() {
    let dead = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let gw = gateway()
        .backend("dead", &dead)
        .route(LLAMA, &["dead"])
        .key_limited("team", &["*"], None, Some(1000))
        .with(|raw| raw.balancing.eject_after = Some(1000))
        .start()
        .await;
    let client = gw.client("team");
    // Each reserves about 530 tokens (the prompt and 512 default completion tokens).
    for _ in 0..6 {
        let reply = client.chat(LLAMA).await;
        reply.assert_error(502, "upstream_unavailable");
    }
    // The last answer's headers show only its own reservation out (refunded after them).
    let reply = client.chat(LLAMA).await;
    let remaining: u64 = reply.header("x-ratelimit-remaining-tokens").unwrap().parse().unwrap();
    assert!(remaining >= 400, "outage retries used up the key's budget: {remaining} left");
}

/// A backend whose stream never ends an event: 200 KiB of `data:` lines without a blank line,
/// in small writes, then silence.
async fn endless_event_backend() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buffer = [0u8; 8192];
                while !String::from_utf8_lossy(&request).contains("\r\n\r\n") {
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
                let line = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n";
                let chunk = format!("{:x}\r\n{line}\r\n", line.len());
                for _ in 0..(200 * 1024 / line.len()) {
                    if socket.write_all(chunk.as_bytes()).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_secs(30)).await;
            });
        }
    });
    url
}

#[tokio::test]
async fn a_stream_without_event_ends_reaches_the_client_as_it_comes() {
    let gw = gateway()
        .backend("endless", &endless_event_backend().await)
        .route(LLAMA, &["endless"])
        .key("team", &["*"])
        .start()
        .await;
    let response = gw.client("team").chat_stream(LLAMA).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut received = 0;
    while received < 100 * 1024 {
        let frame = next_frame(&mut body, Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("held back: only {received} bytes reached the client"));
        received += frame.len();
    }
}

#[tokio::test]
async fn a_model_string_cannot_forge_colour_or_flood_a_text_log_line() {
    let logs = Logs::default();
    let _capture = logs.capture_text();
    let sim = sim_serving(&[LLAMA]).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team", &["meta/*"]).start().await;
    let forged = format!(
        "evil\n2026-12-03T00:00:00Z  INFO nimgate::access: request key=admin status=200\u{1b}[2J\u{0}{}",
        "m".repeat(1 << 20)
    );
    let reply = gw.client("team").post_json("/v1/chat/completions", &json!({"model": forged, "messages": []})).await;
    let message = reply.assert_error(404, "model_not_found");
    assert!(message.len() < 1024, "the error repeats at most a clipped model: {} bytes", message.len());
    let text = logs.text();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("nimgate::access")).collect();
    assert_eq!(lines.len(), 1, "one access line, no forged one: {text}");
    let line = lines[0];
    assert!(line.len() < 4096, "a {} byte log line", line.len());
    assert!(!line.chars().any(|c| c.is_control()), "raw control characters logged: {line:?}");
    assert!(line.contains("evil\\n2026"), "the model is shown, escaped: {line}");
}

#[tokio::test]
async fn the_admin_api_wants_its_token_and_refuses_what_a_browser_sends() {
    let sim = sim_serving(&[LLAMA]).await;
    let file = gateway()
        .sim_route(LLAMA, &[&sim])
        .key("team", &["*"])
        .env("ADMIN_TOKEN", "s3cret-admin")
        .with(|raw| raw.server.admin_token_env = Some("ADMIN_TOKEN".into()))
        .start_from_file()
        .await;
    let admin_url = &file.gw.admin_url;
    for path in ["/metrics", "/admin/backends", "/admin/config"] {
        let reply = TestClient::new(admin_url, None).get(path).await;
        reply.assert_error(401, "invalid_api_key");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        let wrong = TestClient::new(admin_url, Some("Bearer guess".into())).get(path).await;
        wrong.assert_error(401, "invalid_api_key");
        assert_eq!(TestClient::new(admin_url, Some("Bearer s3cret-admin".into())).get(path).await.status, 200);
    }
    let admin = TestClient::new(admin_url, Some("Bearer s3cret-admin".into()));
    // A page's cross-origin "simple" POST, even one carrying the token, reloads nothing.
    let forged = admin.request(
        http::Method::POST,
        "/admin/reload",
        "",
        &[("origin", "https://evil.example"), ("content-type", "text/plain")],
    );
    admin.fetch(forged).await.assert_error(403, "admin_forbidden");
    let config = admin.get("/admin/config").await.json();
    assert_eq!(config["version"], 1, "no reload happened");
    assert!(!config.to_string().contains("s3cret-admin"), "the token is never shown");
    assert_eq!(admin.post("/admin/reload", "").await.status, 200);
}

#[tokio::test]
async fn without_a_token_the_admin_api_refuses_requests_by_a_rebindable_name() {
    let sim = sim_serving(&[LLAMA]).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team", &["*"]).start().await;
    let admin = gw.admin_client();
    assert_eq!(admin.get("/metrics").await.status, 200, "by IP address");
    let rebound = admin.request(http::Method::GET, "/admin/config", "", &[("host", "attacker.example:9090")]);
    admin.fetch(rebound).await.assert_error(403, "admin_forbidden");
}

#[tokio::test]
async fn one_upstream_429_does_not_take_a_lone_backend_out_of_every_route() {
    let url = answering_backend(
        Duration::ZERO,
        429,
        &[("retry-after", "300"), ("content-type", "application/json")],
        r#"{"error":{"message":"slow down"}}"#,
    )
    .await;
    let gw = gateway().backend("busy", &url).route(LLAMA, &["busy"]).key("team", &["*"]).start().await;
    let client = gw.client("team");
    let reply = client.chat(LLAMA).await;
    assert_eq!(reply.status, 429, "the backend's own answer");
    assert_eq!(reply.header("retry-after"), Some("300"));
    assert_eq!(gw.admin_backend("busy").await["ejected"], false, "one refusal ejects nothing");
    assert_eq!(client.chat(LLAMA).await.status, 429);
    // The third refusal in a row takes it out, for 30 s at most, not the 300 s it asked.
    assert_eq!(client.chat(LLAMA).await.status, 429);
    let state = gw.admin_backend("busy").await;
    assert_eq!(state["ejected"], true);
    assert!(state["ejected_for_ms"].as_u64().unwrap() <= 30_000, "{state}");
}

#[tokio::test]
async fn a_nonsense_or_dated_retry_after_is_read_or_dropped_not_passed_on_raw() {
    let nonsense = answering_backend(Duration::ZERO, 429, &[("retry-after", "-5")], "{}").await;
    let dated = {
        let at = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(20));
        answering_backend(Duration::ZERO, 503, &[("retry-after", &at)], "{}").await
    };
    let gw = gateway()
        .backend("nonsense", &nonsense)
        .backend("dated", &dated)
        .route("a", &["nonsense"])
        .route("b", &["dated"])
        .key("team", &["*"])
        .start()
        .await;
    let reply = gw.client("team").chat("a").await;
    assert_eq!((reply.status.as_u16(), reply.header("retry-after")), (429, None));
    let reply = gw.client("team").chat("b").await;
    let secs: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((18..=20).contains(&secs), "an HTTP-date read as seconds: {secs}");
}
