//! The Redis store against a real `redis-server` of each test's own: replicas (gateways in
//! this process, each with its own store and connection) share one limit per key; an outage
//! follows `on_store_error` and ends without a restart; reloads switch stores. The tests of
//! separate processes, one killed, are the binary's (`crates/nimgate/tests/shared_limits.rs`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nim_sim::SimOptions;
use nimgate::auth::{Key, KeyName, Limits};
use nimgate::config::raw::RawLimits;
use nimgate::config::{OnStoreError, RateLimitSettings, RedisSettings, StoreSettings};
use nimgate::limits::{Limiter, Unadmitted};
use nimgate_tests::*;
use serde_json::json;

#[path = "../crates/nimgate/tests/process/redis.rs"]
mod redis_server;
use redis_server::RedisServer;

const LLAMA: &str = "meta/llama-3.1-8b-instruct";

/// A gateway config of `sim` with the Redis store at `url` and `policy`, plus `team` limited
/// by `limits`.
fn replica(sim: &nim_sim::Sim, url: &str, policy: &str, limits: RawLimits) -> GatewayBuilder {
    let (url, policy) = (url.to_owned(), policy.to_owned());
    gateway().sim_route(LLAMA, &[sim]).key_with_limits("team", &["*"], limits).with(move |raw| {
        raw.rate_limits.store = Some("redis".into());
        raw.rate_limits.redis_url = Some(url);
        raw.rate_limits.on_store_error = Some(policy);
        raw.rate_limits.timeout = Some("200ms".into());
    })
}

fn rpm(n: u64) -> RawLimits {
    RawLimits { requests_per_minute: Some(n), ..RawLimits::default() }
}

#[tokio::test]
async fn two_replicas_admit_one_minute_of_requests_between_them() {
    let redis = RedisServer::start();
    let sim = sim_serving(&[LLAMA]).await;
    let a = replica(&sim, &redis.url(), "deny", rpm(60)).start().await;
    let b = replica(&sim, &redis.url(), "deny", rpm(60)).start().await;
    let (ca, cb) = (a.client("team"), b.client("team"));

    let started = Instant::now();
    let mut admitted = 0;
    let mut refusals = Vec::new();
    for i in 0..120 {
        let reply = if i % 2 == 0 { ca.chat(LLAMA).await } else { cb.chat(LLAMA).await };
        match reply.status.as_u16() {
            200 => admitted += 1,
            429 => refusals.push(reply),
            other => panic!("{other}: {}", reply.text()),
        }
    }
    // 60 at once, plus one a second refilled while the 120 ran.
    let refilled = started.elapsed().as_secs();
    assert!((60..=62 + refilled).contains(&admitted), "{admitted} admitted in {:?}", started.elapsed());
    assert_eq!(sim.stats().requests, admitted);

    // Every refusal, from either replica, says the same: the next admission is within a second.
    for refused in &refusals {
        refused.assert_error(429, "rate_limit_exceeded");
        assert_eq!(refused.header("retry-after"), Some("1"));
        assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("0"));
    }
    // Retry-After from one replica holds on the other.
    let refused = ca.chat(LLAMA).await;
    assert_eq!(refused.status, 429);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(cb.chat(LLAMA).await.status, 200, "admitted on the other replica after Retry-After");
    assert_eq!(ca.chat(LLAMA).await.status, 429, "and that used the one refilled");
}

#[tokio::test]
async fn streams_through_two_replicas_never_take_more_than_the_minute_plus_one_overshoot() {
    let redis = RedisServer::start();
    let sim = sim(SimOptions {
        models: vec![LLAMA.into()],
        tokens: 60,
        chunk_delay: Duration::from_millis(10),
        ..SimOptions::default()
    })
    .await;
    let limits = RawLimits { tokens_per_minute: Some(1000), ..RawLimits::default() };
    let a = replica(&sim, &redis.url(), "deny", limits.clone()).start().await;
    let b = replica(&sim, &redis.url(), "deny", limits).start().await;

    let started = Instant::now();
    let body = json!({
        "model": LLAMA, "stream": true, "max_tokens": 60,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "Say something."}],
    });
    let streams: Vec<_> = (0..40)
        .map(|i| {
            let client = if i % 2 == 0 { a.client("team") } else { b.client("team") };
            let body = body.clone();
            tokio::spawn(async move {
                let reply = client.post_json("/v1/chat/completions", &body).await;
                if reply.status != 200 {
                    return 0;
                }
                let usage = sse_data(&reply.text())
                    .iter()
                    .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
                    .find_map(|v| v["usage"]["total_tokens"].as_u64());
                usage.expect("a usage event")
            })
        })
        .collect();
    let mut used = Vec::new();
    for stream in streams {
        used.push(stream.await.unwrap());
    }
    let total: u64 = used.iter().sum();
    let admitted = used.iter().filter(|&&u| u > 0).count();
    let overshoot = used.iter().copied().max().unwrap_or(0);
    let refilled = (started.elapsed().as_secs_f64() * 1000.0 / 60.0).ceil() as u64;
    assert!(admitted >= 5, "{admitted} admitted");
    assert!(
        total <= 1000 + refilled + overshoot,
        "{total} tokens through both replicas ({admitted} streams) for a minute of 1000 (+{refilled} refilled)"
    );
}

#[tokio::test]
async fn max_concurrency_holds_across_replicas() {
    let redis = RedisServer::start();
    let sim =
        sim(SimOptions { models: vec![LLAMA.into()], gated_chunks: true, tokens: 20, ..SimOptions::default() }).await;
    let limits = RawLimits { max_concurrency: Some(2), ..RawLimits::default() };
    let a = replica(&sim, &redis.url(), "deny", limits.clone()).start().await;
    let b = replica(&sim, &redis.url(), "deny", limits).start().await;

    let first = a.client("team").chat_stream(LLAMA).await;
    assert_eq!(first.status(), 200);
    let second = b.client("team").chat_stream(LLAMA).await;
    assert_eq!(second.status(), 200);
    for gw in [&a, &b] {
        let refused = gw.client("team").chat(LLAMA).await;
        refused.assert_error(429, "concurrency_limit_exceeded");
        assert_eq!(refused.header("retry-after"), Some("1"));
    }
    // A client leaving gives its slot back on every replica.
    drop(first);
    eventually("the slot is back", Duration::from_secs(5), || async {
        b.client("team").chat(LLAMA).await.status == 200
    })
    .await;
    sim.release_chunks(1000);
    let mut second = second.into_body();
    all_frames(&mut second).await;
    eventually("both slots are back", Duration::from_secs(5), || async {
        let (x, y) = (a.client("team").chat_stream(LLAMA).await, b.client("team").chat_stream(LLAMA).await);
        x.status() == 200 && y.status() == 200
    })
    .await;
}

#[tokio::test]
async fn an_outage_follows_on_store_error_and_ends_without_a_restart() {
    let mut redis = RedisServer::start();
    let sim = sim_serving(&[LLAMA]).await;
    let allow = replica(&sim, &redis.url(), "allow", rpm(3)).start().await;
    let deny = replica(&sim, &redis.url(), "deny", rpm(3)).start().await;
    let reply = allow.client("team").chat(LLAMA).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-ratelimit-remaining-requests"), Some("2"));

    redis.stop();
    for _ in 0..5 {
        let admitted = allow.client("team").chat(LLAMA).await;
        assert_eq!(admitted.status, 200, "allow admits");
        assert!(admitted.header("x-ratelimit-remaining-requests").is_none(), "and shows no quota it does not know");
        let refused = deny.client("team").chat(LLAMA).await;
        let message = refused.assert_error(503, "rate_limit_unavailable");
        assert_eq!(refused.json()["error"]["type"], "server_error");
        assert!(!message.contains("rate limit reached"), "{message}");
        assert_eq!(refused.header("retry-after"), Some("1"));
    }
    let (_, allowed) = scrape(&allow).await;
    assert_eq!(value(&allowed, "nimgate_rate_limit_store_errors_total{action=\"allowed\"}"), 5.0);
    let (_, denied) = scrape(&deny).await;
    assert_eq!(value(&denied, "nimgate_rate_limit_store_errors_total{action=\"denied\"}"), 5.0);

    // Redis is back (empty, as after a crash): the limits hold again, with no restart.
    redis.start_again();
    eventually("the deny replica admits again", Duration::from_secs(10), || async {
        deny.client("team").chat(LLAMA).await.status == 200
    })
    .await;
    // The allow replica's connection is back too once it shows the key's quota again (a look
    // at /v1/models, which consumes nothing).
    eventually("the allow replica reads Redis again", Duration::from_secs(10), || async {
        allow.client("team").get("/v1/models").await.header("x-ratelimit-remaining-requests") == Some("2")
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(allow.client("team").chat(LLAMA).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 200, 429, 429], "a fresh minute of 3, one taken by the deny replica");
}

#[tokio::test]
async fn two_hundred_concurrent_first_requests_of_a_fresh_key_admit_exactly_its_allowance() {
    let redis = RedisServer::start();
    let settings = RateLimitSettings {
        default_max_tokens: 512,
        store: StoreSettings::Redis(RedisSettings {
            url: redis.url(),
            shown: redis.url(),
            ca_pem: None,
            key_prefix: "test:".into(),
            timeout: Duration::from_secs(2),
            lease_ttl: Duration::from_secs(30),
        }),
        on_store_error: OnStoreError::Deny,
    };
    let limiter = Arc::new(Limiter::new(&settings, unregistered_counter()));
    for (name, limits, allowance) in [
        ("rpm", Limits { requests_per_minute: Some(50), ..Limits::default() }, 50),
        ("burst", Limits { requests_per_minute: Some(600), burst: Some(7), ..Limits::default() }, 7),
        ("tokens", Limits { tokens_per_minute: Some(1000), ..Limits::default() }, 10),
        ("slots", Limits { max_concurrency: Some(3), ..Limits::default() }, 3),
    ] {
        let key = Arc::new(Key::new(KeyName::new(name), Vec::new(), limits));
        let start = Arc::new(tokio::sync::Barrier::new(200));
        let tasks: Vec<_> = (0..200)
            .map(|_| {
                let (limiter, key, start) = (Arc::clone(&limiter), Arc::clone(&key), Arc::clone(&start));
                tokio::spawn(async move {
                    start.wait().await;
                    limiter.admit(&key, 100).await
                })
            })
            .collect();
        let mut held = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                Ok(admission) => held.push(admission),
                Err(Unadmitted::Refused(_)) => {}
                Err(Unadmitted::StoreUnavailable) => panic!("redis did not answer"),
            }
        }
        assert_eq!(held.len(), allowance, "{name}");
    }
}

#[tokio::test]
async fn a_reload_switches_stores_and_unchanged_keys_keep_their_state() {
    let (redis, other) = (RedisServer::start(), RedisServer::start());
    let sim = sim_serving(&[LLAMA]).await;
    let memory = || gateway().sim_route(LLAMA, &[&sim]).key_limited("team", &["*"], Some(5), None);
    let gw = memory().start().await;
    let client = gw.client("team");
    let remaining = |reply: &Reply| reply.header("x-ratelimit-remaining-requests").map(str::to_owned);
    assert_eq!(remaining(&client.chat(LLAMA).await).as_deref(), Some("4"));

    // To Redis: its own state, fresh.
    gw.gateway.replace(replica(&sim, &redis.url(), "deny", rpm(5)).snapshot());
    assert_eq!(remaining(&client.chat(LLAMA).await).as_deref(), Some("4"));
    assert_eq!(redis.command("DBSIZE"), ":1", "the key's request state is in Redis");
    // The same store again (another key added): the key keeps its state.
    let same = replica(&sim, &redis.url(), "deny", rpm(5)).key("other", &["*"]);
    gw.gateway.replace(same.snapshot());
    assert_eq!(remaining(&client.chat(LLAMA).await).as_deref(), Some("3"));
    // Another Redis: state there.
    gw.gateway.replace(replica(&sim, &other.url(), "deny", rpm(5)).snapshot());
    assert_eq!(remaining(&client.chat(LLAMA).await).as_deref(), Some("4"));
    assert_eq!(other.command("DBSIZE"), ":1");
    // Back to memory, which starts afresh too.
    gw.gateway.replace(memory().snapshot());
    assert_eq!(remaining(&client.chat(LLAMA).await).as_deref(), Some("4"));
}

#[tokio::test]
async fn the_redis_password_shows_in_no_log_line_and_not_in_the_admin_config() {
    let logs = Logs::default();
    let _guard = logs.capture_text();
    let sim = sim_serving(&[LLAMA]).await;
    // Nothing listens there: every admission fails, and is logged.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let url = format!("redis://:s3cret-pass@{closed}/0");
    let file = replica(&sim, &url, "allow", rpm(5)).start_from_file().await;
    let gw = &file.gw;
    for _ in 0..3 {
        assert_eq!(gw.client("team").chat(LLAMA).await.status, 200);
    }
    let config = gw.admin_client().get("/admin/config").await.text();
    assert!(config.contains("redis://<redacted>@127.0.0.1"), "{config}");
    let text = logs.text();
    assert!(text.contains("rate limit store failed"), "{text}");
    assert_eq!(text.matches("rate limit store failed").count(), 1, "one line for the three: {text}");
    assert!(!text.contains("s3cret") && !config.contains("s3cret"), "{text}");
}

/// `rate_limit_store_errors_total` of a limiter outside a gateway.
fn unregistered_counter() -> prometheus::IntCounterVec {
    prometheus::IntCounterVec::new(prometheus::Opts::new("store_errors", "-"), &["action"]).unwrap()
}

#[tokio::test]
async fn rediss_reaches_a_tls_redis_trusted_through_its_ca_file_and_refuses_an_untrusted_one() {
    let (ca_pem, cert_pem, key_pem) = test_pki(&["127.0.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    let (ca_file, cert_file, key_file) =
        (dir.path().join("ca.pem"), dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&ca_file, ca_pem).unwrap();
    std::fs::write(&cert_file, cert_pem).unwrap();
    std::fs::write(&key_file, key_pem).unwrap();

    let redis = RedisServer::start_tls(&cert_file, &key_file);
    assert!(redis.url().starts_with("rediss://"));
    let sim = sim_serving(&[LLAMA]).await;
    let ca_path = ca_file.display().to_string();
    // A TLS handshake in a debug build on a busy machine can outlast 200 ms.
    let trusted = replica(&sim, &redis.url(), "deny", rpm(5))
        .with(move |raw| {
            raw.rate_limits.redis_ca_file = Some(ca_path);
            raw.rate_limits.timeout = Some("5s".into());
        })
        .start()
        .await;
    let reply = trusted.client("team").chat(LLAMA).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-ratelimit-remaining-requests"), Some("4"), "Redis answered, over TLS");

    // The system's roots do not know the test CA: no connection, so `deny` refuses.
    let untrusted = replica(&sim, &redis.url(), "deny", rpm(5)).start().await;
    untrusted.client("team").chat(LLAMA).await.assert_error(503, "rate_limit_unavailable");
}

#[tokio::test]
async fn a_redis_that_stops_answering_costs_each_request_at_most_the_timeout() {
    let redis = RedisServer::start();
    let sim = sim_serving(&[LLAMA]).await;
    let allow = replica(&sim, &redis.url(), "allow", rpm(100)).start().await;
    let deny = replica(&sim, &redis.url(), "deny", rpm(100)).start().await;
    assert_eq!(allow.client("team").chat(LLAMA).await.status, 200);
    assert_eq!(deny.client("team").chat(LLAMA).await.status, 200);

    redis.pause();
    for _ in 0..3 {
        let started = Instant::now();
        let admitted = allow.client("team").chat(LLAMA).await;
        assert_eq!(admitted.status, 200);
        assert!(admitted.header("x-ratelimit-remaining-requests").is_none());
        deny.client("team").chat(LLAMA).await.assert_error(503, "rate_limit_unavailable");
        // Two requests, each waiting for the 200 ms timeout and no longer.
        assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    }
    redis.resume();
    eventually("Redis answers again", Duration::from_secs(10), || async {
        deny.client("team").chat(LLAMA).await.header("x-ratelimit-remaining-requests").is_some()
    })
    .await;
}
