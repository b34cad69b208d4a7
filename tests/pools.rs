//! Backend pools that survive failures (#7), over real sockets with nim-sim backends:
//! balancing by weight and by load, ejection and return, fallback, the wait queue, the retry
//! budget, broken streams, NIM-load awareness and `/admin/backends`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use nim_sim::Sim;
use nimgate::config::raw::{RawBackend, RawBalancing, RawLoadMetrics, RawRoute, RawTimeouts};
use nimgate_tests::*;

const LLAMA: &str = "meta/llama-3.1-8b-instruct";

fn backend(name: &str, url: &str) -> RawBackend {
    RawBackend { name: name.into(), url: url.into(), ..RawBackend::default() }
}

fn route(model: &str, backends: &[&str], fallback: &[&str]) -> RawRoute {
    RawRoute {
        model: model.into(),
        backends: backends.iter().map(|b| b.to_string()).collect(),
        fallback: fallback.iter().map(|b| b.to_string()).collect(),
        ..RawRoute::default()
    }
}

fn balancing(change: impl FnOnce(&mut RawBalancing)) -> impl FnOnce(&mut nimgate::config::raw::RawConfig) {
    move |raw| change(&mut raw.balancing)
}

async fn closed_port() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

async fn slow_sim(ttft: Duration) -> Sim {
    sim(SimOptions { ttft, ..SimOptions::default() }).await
}

/// A backend failing as `failures` say (named `failing`, with `timeouts`) beside a healthy one
/// (`healthy`), both in the pool of LLAMA.
async fn failing_beside_healthy(failures: Failures, timeouts: Option<RawTimeouts>) -> (Sim, Sim, TestGateway) {
    let failing = sim(SimOptions { failures, ..SimOptions::default() }).await;
    let healthy = sim_serving(&[LLAMA]).await;
    let gw = gateway()
        .backend_with(RawBackend { timeouts, ..backend("failing", &failing.url()) })
        .backend("healthy", &healthy.url())
        .route_with(route(LLAMA, &["failing", "healthy"], &[]))
        .key("team-a", &["*"])
        .start()
        .await;
    (failing, healthy, gw)
}

#[tokio::test]
async fn traffic_is_spread_by_weight() {
    let (a, b) = (sim_serving(&[LLAMA]).await, sim_serving(&[LLAMA]).await);
    let gw = gateway()
        .backend_with(RawBackend { weight: Some(1), ..backend("a", &a.url()) })
        .backend_with(RawBackend { weight: Some(3), ..backend("b", &b.url()) })
        .route_with(route(LLAMA, &["a", "b"], &[]))
        .key("team-a", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");
    for _ in 0..400 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    let (a, b) = (a.stats().requests, b.stats().requests);
    assert_eq!(a + b, 400);
    assert!((240..=360).contains(&b), "weight 3 of 4 should take about 300 of 400: a {a}, b {b}");
}

#[tokio::test]
async fn a_fast_backend_serves_clearly_more_than_a_slow_one_under_concurrency() {
    let slow = slow_sim(Duration::from_secs(1)).await;
    let fast = sim_serving(&[LLAMA]).await;
    let gw = gateway().sim_route(LLAMA, &[&slow, &fast]).key("team-a", &["*"]).start().await;
    let client = gw.client("team-a");
    let until = Instant::now() + Duration::from_secs(3);
    let workers: Vec<_> = (0..20)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                while Instant::now() < until {
                    assert_eq!(client.chat(LLAMA).await.status, 200);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let (slow, fast) = (slow.stats().requests, fast.stats().requests);
    assert!(fast > 20 * slow, "in-flight counts steer load to the fast backend: slow {slow}, fast {fast}");
}

#[tokio::test]
async fn a_backend_killed_mid_run_costs_no_request_started_after_it_died() {
    let (a, b) = (sim_serving(&[LLAMA]).await, sim_serving(&[LLAMA]).await);
    let gw = gateway()
        .backend("a", &a.url())
        .backend("b", &b.url())
        .route_with(route(LLAMA, &["a", "b"], &[]))
        .key("team-a", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");
    let died_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let failed_after_death = Arc::new(AtomicU64::new(0));
    let served_after_death = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(2);
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (client, died_at) = (client.clone(), Arc::clone(&died_at));
            let (failed, served) = (Arc::clone(&failed_after_death), Arc::clone(&served_after_death));
            tokio::spawn(async move {
                while Instant::now() < until {
                    let started = Instant::now();
                    let status = client.chat(LLAMA).await.status;
                    if died_at.lock().unwrap().is_some_and(|died| started > died) {
                        if status == 200 { &served } else { &failed }.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.stop().await;
    *died_at.lock().unwrap() = Some(Instant::now());
    for worker in workers {
        worker.await.unwrap();
    }
    assert_eq!(failed_after_death.load(Ordering::Relaxed), 0);
    assert!(served_after_death.load(Ordering::Relaxed) > 50);
    let state = gw.admin_backend("a").await;
    assert_eq!(state["ejected"], true, "{state}");
}

#[tokio::test]
async fn a_closed_port_is_ejected_and_comes_back_when_it_listens_again() {
    let live = sim_serving(&[LLAMA]).await;
    let down = closed_port().await;
    let gw = gateway()
        .backend("down", &down)
        .backend("live", &live.url())
        .route_with(route(LLAMA, &["down", "live"], &[]))
        .with(balancing(|b| {
            b.eject_after = Some(2);
            b.ejection_base = Some("300ms".into());
        }))
        .key("team-a", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");
    for _ in 0..20 {
        assert_eq!(client.chat(LLAMA).await.status, 200, "connect errors are retried on the live backend");
    }
    let state = gw.admin_backend("down").await;
    assert_eq!(state["ejected"], true, "{state}");
    assert_eq!(state["recent_errors"][0]["kind"], "connect", "{state}");

    // The port comes back: after the ejection it gets traffic again.
    let listener = tokio::net::TcpListener::bind(down.trim_start_matches("http://")).await.unwrap();
    let back = Sim::start_on(listener, SimOptions::default()).await.unwrap();
    eventually("the returned backend serves again", Duration::from_secs(5), || async {
        client.chat(LLAMA).await;
        back.stats().requests > 0
    })
    .await;
    let state = gw.admin_backend("down").await;
    assert_eq!((state["ejected"].as_bool(), state["consecutive_failures"].as_u64()), (Some(false), Some(0)));
}

#[tokio::test]
async fn the_fallback_serves_when_the_whole_pool_is_down() {
    let hosted = sim_serving(&[LLAMA]).await;
    let (down_a, down_b) = (closed_port().await, closed_port().await);
    let gw = gateway()
        .backend("a", &down_a)
        .backend("b", &down_b)
        .backend("hosted", &hosted.url())
        .route_with(route(LLAMA, &["a", "b"], &["hosted"]))
        .key("team-a", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");
    for _ in 0..10 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    assert_eq!(hosted.stats().requests, 10);
}

#[tokio::test]
async fn everything_down_fails_fast_once_ejected() {
    let (down_a, down_b) = (closed_port().await, closed_port().await);
    let gw = gateway()
        .backend("a", &down_a)
        .backend("b", &down_b)
        .route_with(route(LLAMA, &["a"], &["b"]))
        .with(balancing(|b| b.eject_after = Some(3)))
        .key("team-a", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");
    for _ in 0..3 {
        client.chat(LLAMA).await.assert_error(502, "upstream_unavailable");
    }
    let started = Instant::now();
    let message = client.chat(LLAMA).await.assert_error(503, "no_healthy_backend");
    assert!(started.elapsed() < Duration::from_millis(200), "{:?}", started.elapsed());
    assert!(!message.contains("ejected"), "backend states stay out of client errors: {message}");
    for backend in ["a", "b"] {
        assert_eq!(gw.admin_backend(backend).await["ejected"], true, "operators see them in /admin/backends");
    }
}

#[tokio::test]
async fn max_concurrency_holds_and_the_queue_is_bounded() {
    let sim = slow_sim(Duration::from_millis(300)).await;
    let gw = gateway()
        .backend_with(RawBackend { max_concurrency: Some(2), ..backend("gpu", &sim.url()) })
        .route_with(route(LLAMA, &["gpu"], &[]))
        .with(balancing(|b| {
            b.queue_length = Some(3);
            b.queue_timeout = Some("5s".into());
        }))
        .key("team-a", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");
    let (peak, peak_queued) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let watcher = tokio::spawn({
        let (peak, peak_queued, admin) = (Arc::clone(&peak), Arc::clone(&peak_queued), gw.admin_client());
        let series = format!("nimgate_queue_length{{model=\"{LLAMA}\"}} ");
        async move {
            loop {
                let reply = admin.get("/admin/backends").await;
                peak.fetch_max(reply.json()["backends"][0]["in_flight"].as_u64().unwrap(), Ordering::Relaxed);
                let text = admin.get("/metrics").await.text();
                let queued = text.lines().find_map(|l| l.strip_prefix(&series)).and_then(|v| v.trim().parse().ok());
                peak_queued.fetch_max(queued.expect("the route's queue gauge"), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });
    let started = Instant::now();
    let requests: Vec<_> = (0..10)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.chat(LLAMA).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for request in requests {
        let reply = request.await.unwrap();
        if reply.status == 503 {
            reply.assert_error(503, "no_healthy_backend");
            assert_eq!(reply.header("retry-after"), Some("1"));
        }
        statuses.push(reply.status);
    }
    watcher.abort();
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 200, 200, 200, 503, 503, 503, 503, 503], "2 served, 3 queued, 5 refused");
    assert_eq!(sim.stats().requests, 5);
    assert!(peak.load(Ordering::Relaxed) <= 2, "in flight peaked at {}", peak.load(Ordering::Relaxed));
    assert_eq!(peak_queued.load(Ordering::Relaxed), 3, "nimgate_queue_length showed the 3 waiting");
    assert!(started.elapsed() >= Duration::from_millis(900), "the queued ones waited their turn");
}

#[tokio::test]
async fn the_retry_budget_stops_a_retry_storm() {
    let failing = || {
        sim(SimOptions {
            failures: Failures { error_rate: 1.0, error_status: 502, ..Failures::default() },
            ..SimOptions::default()
        })
    };
    let (a, b) = (failing().await, failing().await);
    let gw = gateway()
        .sim_route(LLAMA, &[&a, &b])
        .with(balancing(|b| {
            b.retry_budget = Some(0.1);
            b.min_retries_per_second = Some(0);
            b.eject_after = Some(1_000_000);
        }))
        .key("team-a", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");
    for _ in 0..200 {
        let reply = client.chat(LLAMA).await;
        assert_eq!(reply.status, 502, "the upstream's own error passes through when not retried");
    }
    let attempts = a.stats().requests + b.stats().requests;
    // Without a budget every request would be tried on both backends: 400 attempts.
    assert!((200..=225).contains(&attempts), "200 requests, at most a tenth retried: {attempts} attempts");
}

#[tokio::test]
async fn retries_move_a_failing_request_to_another_backend() {
    let unavailable = Failures { error_rate: 1.0, error_status: 503, ..Failures::default() };
    let (failing, healthy, gw) = failing_beside_healthy(unavailable, None).await;
    let client = gw.client("team-a");
    for _ in 0..20 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    assert_eq!(healthy.stats().requests, 20);
    assert!(failing.stats().requests >= 1);
}

#[tokio::test]
async fn a_stalled_stream_ends_with_an_error_event_after_the_idle_timeout() {
    let stalling = sim(SimOptions {
        failures: Failures { stall_after_chunks: Some(2), ..Failures::default() },
        ..SimOptions::default()
    })
    .await;
    let gw = one_backend(&stalling, timeouts(|t| t.idle = Some("300ms".into()))).await;
    let client = gw.client("team-a");
    let started = Instant::now();
    let response = client
        .send(client.request(Method::POST, "/v1/chat/completions", chat_body(LLAMA, true).to_string(), &[]))
        .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let text: String = all_frames(&mut body).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "{took:?}");
    assert!(!text.contains("[DONE]"), "{text}");
    let events = sse_data(&text);
    let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_timeout", "{text}");
    eventually("the stalled upstream request is cancelled", Duration::from_secs(5), || async {
        stalling.stats().cancelled == 1
    })
    .await;
    let state = gw.admin_backend("gpu").await;
    assert_eq!(state["recent_errors"][0]["kind"], "timeout", "{state}");
    assert_eq!(state["in_flight"], 0);
}

#[tokio::test]
async fn a_steady_stream_outlives_its_idle_timeout_and_is_cut_when_it_stalls() {
    // Chunks every 100 ms for about a second under a 300 ms idle timeout: the timer fires and
    // is moved forward several times while the body waits for chunks, then the stall ends it.
    // Over HTTP/1.1 the connection's task polls the body; over h2, a task of the stream's own.
    let stalling = sim(SimOptions {
        tokens: 12,
        chunk_delay: Duration::from_millis(100),
        failures: Failures { stall_after_chunks: Some(10), ..Failures::default() },
        ..SimOptions::default()
    })
    .await;
    let gw = one_backend(&stalling, timeouts(|t| t.idle = Some("300ms".into()))).await;
    let client = gw.client("team-a");
    let h2 = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    for version in [http::Version::HTTP_11, http::Version::HTTP_2] {
        let started = Instant::now();
        let request = client.request(Method::POST, "/v1/chat/completions", chat_body(LLAMA, true).to_string(), &[]);
        let response = match version {
            http::Version::HTTP_2 => h2.request(request).await.expect("the gateway answers"),
            _ => client.send(request).await,
        };
        assert_eq!((response.version(), response.status()), (version, http::StatusCode::OK));
        let mut body = response.into_body();
        let text: String =
            all_frames(&mut body).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
        let took = started.elapsed();
        // Not cut at the first 300 ms (every chunk arrives, below), nor long after the stall.
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "{version:?}: {took:?}");
        let events = sse_data(&text);
        // Text chunks: the first chunk carries the role and an empty content.
        let content = events.iter().filter(|e| e.contains("\"content\":\"") && !e.contains("\"content\":\"\"")).count();
        assert_eq!(content, 10, "{version:?}: every chunk sent before the stall arrives: {text}");
        let last: serde_json::Value = serde_json::from_str(events.last().unwrap()).unwrap();
        assert_eq!(last["error"]["code"], "upstream_timeout", "{version:?}: {text}");
    }
}

/// A sim with one GPU slot and a long time to first token, with `waiting` requests sent to
/// it directly and left waiting: its `/v1/metrics` reports them.
async fn busy_nim(waiting: usize) -> (Sim, Vec<tokio::task::JoinHandle<()>>) {
    busy_nim_speaking(waiting, nim_sim::MetricsDialect::Nim1).await
}

/// `busy_nim` whose metrics page is in `dialect`.
async fn busy_nim_speaking(
    waiting: usize,
    dialect: nim_sim::MetricsDialect,
) -> (Sim, Vec<tokio::task::JoinHandle<()>>) {
    let sim = sim(SimOptions {
        ttft: Duration::from_secs(30),
        max_concurrency: 1,
        metrics_dialect: dialect,
        ..SimOptions::default()
    })
    .await;
    let direct = TestClient::new(&sim.url(), None);
    let load = (0..=waiting)
        .map(|_| {
            let direct = direct.clone();
            tokio::spawn(async move {
                direct.chat(LLAMA).await;
            })
        })
        .collect();
    let expected = waiting as u64;
    let probe = &sim;
    eventually(
        "the sim reports its queue",
        Duration::from_secs(5),
        || async move { probe.stats().waiting == expected },
    )
    .await;
    (sim, load)
}

/// A backend whose NIM load is read every 100 ms; full only by its waiting queue (nim-sim's
/// KV cache is full whenever anything waits).
fn scraped(name: &str, url: &str, max_waiting: u64) -> RawBackend {
    RawBackend {
        load_metrics: Some(RawLoadMetrics {
            interval: Some("100ms".into()),
            max_waiting: Some(max_waiting),
            max_kv_cache_usage: Some(1.0),
            ..RawLoadMetrics::default()
        }),
        ..backend(name, url)
    }
}

#[tokio::test]
async fn the_queue_is_read_from_nim_2_pages_of_vllm_and_sglang_alike() {
    for dialect in [nim_sim::MetricsDialect::Vllm, nim_sim::MetricsDialect::Sglang] {
        let (busy, load) = busy_nim_speaking(3, dialect).await;
        let gw = gateway()
            .backend_with(scraped("busy", &busy.url(), 2))
            .route_with(route(LLAMA, &["busy"], &[]))
            .key("team-a", &["*"])
            .start()
            .await;
        eventually(&format!("the {dialect:?} page's queue is read"), Duration::from_secs(5), || async {
            let state = gw.admin_backend("busy").await;
            state["load"]["waiting"] == 3 && state["load"]["running"] == 1 && state["load"]["full"] == true
        })
        .await;
        for task in load {
            task.abort();
        }
    }
}

#[tokio::test]
async fn a_nim_reporting_a_long_queue_gets_less_traffic() {
    let (busy, load) = busy_nim(6).await;
    let idle = sim_serving(&[LLAMA]).await;
    let gw = gateway()
        .backend_with(scraped("busy", &busy.url(), 100))
        .backend_with(scraped("idle", &idle.url(), 100))
        .route_with(route(LLAMA, &["busy", "idle"], &[]))
        .key("team-a", &["*"])
        .start()
        .await;
    eventually("the gateway has read the busy NIM's queue", Duration::from_secs(5), || async {
        gw.admin_backend("busy").await["load"]["waiting"] == 6
    })
    .await;
    let client = gw.client("team-a");
    let before = busy.stats().requests;
    for _ in 0..40 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    assert_eq!(busy.stats().requests - before, 0, "the NIM with 6 waiting got none of 40");
    assert_eq!(idle.stats().requests, 40);
    let state = gw.admin_backend("busy").await;
    assert_eq!((state["load"]["waiting"].as_u64(), state["load"]["full"].as_bool()), (Some(6), Some(false)));
    for task in load {
        task.abort();
    }
}

#[tokio::test]
async fn a_pool_full_by_nim_load_spills_to_its_fallback_and_one_with_room_does_not() {
    let (busy, load) = busy_nim(4).await;
    let roomy = sim_serving(&[LLAMA, "nvidia/nemotron"]).await;
    let (hosted_a, hosted_b) = (sim_serving(&[LLAMA]).await, sim_serving(&["nvidia/nemotron"]).await);
    let gw = gateway()
        .backend_with(scraped("busy", &busy.url(), 2))
        .backend_with(scraped("roomy", &roomy.url(), 2))
        .backend("hosted-a", &hosted_a.url())
        .backend("hosted-b", &hosted_b.url())
        .route_with(route(LLAMA, &["busy"], &["hosted-a"]))
        .route_with(route("nvidia/nemotron", &["roomy"], &["hosted-b"]))
        .key("team-a", &["*"])
        .start()
        .await;
    eventually("the busy NIM counts as full", Duration::from_secs(5), || async {
        gw.admin_backend("busy").await["load"]["full"] == true
    })
    .await;
    let client = gw.client("team-a");
    for _ in 0..10 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
        assert_eq!(client.chat("nvidia/nemotron").await.status, 200);
    }
    assert_eq!(hosted_a.stats().requests, 10, "the full pool spilled to its fallback");
    assert_eq!(hosted_b.stats().requests, 0, "the pool with room kept its traffic");
    assert_eq!(roomy.stats().requests, 10);
    for task in load {
        task.abort();
    }
}

#[tokio::test]
async fn an_upstream_429_moves_the_request_and_takes_the_backend_out() {
    let overloaded = Failures { error_rate: 1.0, error_status: 429, ..Failures::default() };
    let (overloaded, _other, gw) = failing_beside_healthy(overloaded, None).await;
    let client = gw.client("team-a");
    for _ in 0..20 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    assert!(overloaded.stats().requests <= 1, "out of rotation after its first 429");
    let state = gw.admin_backend("failing").await;
    assert_eq!(
        (state["ejected"].as_bool(), state["recent_errors"][0]["kind"].as_str()),
        (Some(true), Some("overloaded"))
    );

    // With nowhere else to go, the 429 passes through.
    let alone = gateway().sim_route(LLAMA, &[&overloaded]).key("team-a", &["*"]).start().await;
    assert_eq!(alone.client("team-a").chat(LLAMA).await.status, 429);
}

#[tokio::test]
async fn active_health_checks_take_a_backend_out_and_bring_it_back() {
    let flaky = sim_serving(&[LLAMA]).await;
    let steady = sim_serving(&[LLAMA]).await;
    let flaky_addr = flaky.addr();
    let check = nimgate::config::raw::RawHealthCheck {
        interval: Some("100ms".into()),
        unhealthy_after: Some(2),
        healthy_after: Some(2),
        ..Default::default()
    };
    let gw = gateway()
        .backend_with(RawBackend { health_check: Some(check.clone()), ..backend("flaky", &flaky.url()) })
        .backend_with(RawBackend { health_check: Some(check), ..backend("steady", &steady.url()) })
        .route_with(route(LLAMA, &["flaky", "steady"], &[]))
        .key("team-a", &["*"])
        .start()
        .await;
    assert_eq!(gw.admin_backend("flaky").await["health"], "healthy");
    flaky.stop().await;
    eventually("the stopped backend fails its health check", Duration::from_secs(5), || async {
        gw.admin_backend("flaky").await["health"] == "unhealthy"
    })
    .await;
    let listener = tokio::net::TcpListener::bind(flaky_addr).await.unwrap();
    let back = Sim::start_on(listener, SimOptions::default()).await.unwrap();
    eventually("the backend passes its health check again", Duration::from_secs(5), || async {
        gw.admin_backend("flaky").await["health"] == "healthy"
    })
    .await;
    let client = gw.client("team-a");
    for _ in 0..20 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    assert!(back.stats().requests > 0);
}

#[tokio::test]
async fn admin_backends_shows_state_and_no_credentials() {
    let sim = sim(SimOptions { api_key: Some("nvapi-upstream-secret".into()), ..SimOptions::default() }).await;
    let gw = gateway()
        .backend_with(RawBackend {
            api_key_env: Some("HOSTED_KEY".into()),
            max_concurrency: Some(7),
            ..backend("hosted", &sim.url())
        })
        .env("HOSTED_KEY", "nvapi-upstream-secret")
        .route_with(route(LLAMA, &["hosted"], &[]))
        .key("team-a", &["*"])
        .start()
        .await;
    assert_eq!(gw.client("team-a").chat(LLAMA).await.status, 200);
    let reply = gw.admin_client().get("/admin/backends").await;
    assert!(!reply.text().contains("nvapi-upstream-secret"));
    let state = &reply.json()["backends"][0];
    assert_eq!(state["name"], "hosted");
    assert_eq!((state["max_concurrency"].as_u64(), state["requests"].as_u64()), (Some(7), Some(1)));
    assert_eq!((state["in_flight"].as_u64(), state["health"].as_str()), (Some(0), Some("unchecked")));
    // The answered request's connection waits for the next one.
    assert_eq!(state["idle_connections"], 1, "{state}");
    assert_eq!(gw.admin_client().get("/admin/nothing").await.status, 404);
}

/// A gateway with one backend `gpu` on `sim`, with `timeouts`, serving LLAMA to team-a.
async fn one_backend(sim: &Sim, timeouts: Option<RawTimeouts>) -> TestGateway {
    gateway()
        .backend_with(RawBackend { timeouts, ..backend("gpu", &sim.url()) })
        .route_with(route(LLAMA, &["gpu"], &[]))
        .key("team-a", &["*"])
        .start()
        .await
}

fn timeouts(change: impl FnOnce(&mut RawTimeouts)) -> Option<RawTimeouts> {
    let mut t = RawTimeouts::default();
    change(&mut t);
    Some(t)
}

/// The text of a whole streamed answer.
async fn stream_text(client: &TestClient, model: &str) -> String {
    answer_text(client.chat_stream(model).await).await
}

/// The text of a whole streamed answer already begun.
async fn answer_text(response: http::Response<hyper::body::Incoming>) -> String {
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    all_frames(&mut body).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect()
}

/// The `error.code` of a stream's last event, which must not be followed by `[DONE]`.
fn final_error_code(text: &str) -> String {
    assert!(!text.contains("[DONE]"), "a broken stream never ends with [DONE]: {text}");
    let events = sse_data(text);
    let last: serde_json::Value = serde_json::from_str(events.last().expect("some event")).unwrap();
    last["error"]["code"].as_str().unwrap_or_else(|| panic!("the last event is an error: {text}")).to_owned()
}

#[tokio::test]
async fn a_reset_before_the_answer_is_retried_on_another_backend() {
    let resets = Failures { reset_after_chunks: Some(0), ..Failures::default() };
    let (resetting, healthy, gw) = failing_beside_healthy(resets, None).await;
    let client = gw.client("team-a");
    for _ in 0..20 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    let reset = resetting.stats().requests;
    assert!(reset >= 1, "some first attempts went to the resetting backend");
    assert_eq!(healthy.stats().requests, 20, "each of them was retried there");
    let (_, s) = scrape(&gw).await;
    assert_eq!(value(&s, "nimgate_upstream_errors_total{backend=\"failing\",kind=\"reset\"}"), reset as f64);
    assert_eq!(value(&s, &format!("nimgate_retries_total{{backend=\"failing\",model=\"{LLAMA}\"}}")), reset as f64);
}

#[tokio::test]
async fn a_first_byte_timeout_is_retried_on_another_backend() {
    let hanging =
        sim(SimOptions { failures: Failures { hang: true, ..Failures::default() }, ..SimOptions::default() }).await;
    let healthy = sim_serving(&[LLAMA]).await;
    // The hanging backend first and the healthy one as fallback: every request meets the
    // hang until the hanging backend is ejected, whatever the balancer would draw.
    let gw = gateway()
        .backend_with(RawBackend {
            timeouts: timeouts(|t| t.first_byte = Some("200ms".into())),
            ..backend("failing", &hanging.url())
        })
        .backend("healthy", &healthy.url())
        .route_with(route(LLAMA, &["failing"], &["healthy"]))
        .key("team-a", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");
    for _ in 0..6 {
        let started = Instant::now();
        assert_eq!(client.chat(LLAMA).await.status, 200);
        assert!(started.elapsed() < Duration::from_secs(2), "never the whole hang: {:?}", started.elapsed());
    }
    let hung = hanging.stats().requests;
    assert!(hung >= 1, "some first attempts went to the hanging backend");
    assert_eq!(healthy.stats().requests, 6);
    let (_, s) = scrape(&gw).await;
    assert_eq!(value(&s, "nimgate_upstream_errors_total{backend=\"failing\",kind=\"timeout\"}"), hung as f64);
    eventually("the timed-out upstream requests are cancelled", Duration::from_secs(5), || async {
        hanging.stats().cancelled == hung
    })
    .await;
}

/// A port whose listener never accepts and whose accept queue is full: the kernel drops
/// further SYNs, so a connect there hangs until the connector's timeout (what a host that
/// black-holes traffic looks like), all on loopback. Keep the returned sockets alive.
fn blackhole() -> (String, Vec<std::net::TcpStream>, tokio::net::TcpListener) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)) {
            Ok(stream) => held.push(stream),
            Err(_) => return (format!("http://{addr}"), held, listener),
        }
    }
    panic!("the accept queue of {addr} never filled");
}

#[tokio::test]
async fn a_connect_timeout_fails_fast_and_is_retried_elsewhere() {
    let (url, _held, _listener) = blackhole();
    let healthy = sim_serving(&[LLAMA]).await;
    let gw = gateway()
        .backend_with(RawBackend {
            timeouts: timeouts(|t| t.connect = Some("200ms".into())),
            ..backend("blackhole", &url)
        })
        .backend("healthy", &healthy.url())
        .route_with(route("alone", &["blackhole"], &[]))
        // The black hole first, so that every request meets it.
        .route_with(RawRoute { upstream_model: Some(LLAMA.into()), ..route("either", &["blackhole"], &["healthy"]) })
        .key("team-a", &["*"])
        .with(balancing(|b| b.eject_after = Some(1000)))
        .start()
        .await;
    let client = gw.client("team-a");
    let started = Instant::now();
    client.chat("alone").await.assert_error(502, "upstream_unavailable");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(190) && took < Duration::from_secs(2), "the connect timeout: {took:?}");
    for _ in 0..6 {
        assert_eq!(client.chat("either").await.status, 200);
    }
    assert_eq!(healthy.stats().requests, 6);
    let (_, s) = scrape(&gw).await;
    assert!(value(&s, "nimgate_upstream_errors_total{backend=\"blackhole\",kind=\"connect\"}") >= 2.0);
}

#[tokio::test]
async fn the_total_timeout_ends_a_long_stream_with_an_error_event() {
    let long = sim(SimOptions { tokens: 40, chunk_delay: Duration::from_millis(50), ..SimOptions::default() }).await;
    let gw = one_backend(&long, timeouts(|t| t.total = Some("500ms".into()))).await;
    let client = gw.client("team-a");
    let started = Instant::now();
    let text = stream_text(&client, LLAMA).await;
    let took = started.elapsed();
    assert_eq!(final_error_code(&text), "upstream_timeout");
    assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(1500), "{took:?}");
    assert!(sse_data(&text).len() > 3, "the stream ran until the deadline: {text}");
    // A non-stream answer that would take 2 s: 504 at the deadline.
    let started = Instant::now();
    client.chat(LLAMA).await.assert_error(504, "upstream_timeout");
    assert!(started.elapsed() < Duration::from_millis(1500), "{:?}", started.elapsed());
    let (_, s) = scrape(&gw).await;
    assert_eq!(value(&s, "nimgate_upstream_errors_total{backend=\"gpu\",kind=\"timeout\"}"), 2.0);
}

#[tokio::test]
async fn a_stream_that_closes_without_done_ends_with_an_error_event() {
    let truncating = sim(SimOptions {
        failures: Failures { end_after_chunks: Some(2), ..Failures::default() },
        ..SimOptions::default()
    })
    .await;
    let gw = gateway().backend("gpu", &truncating.url()).route(LLAMA, &["gpu"]).key("team-a", &["*"]).start().await;
    let text = stream_text(&gw.client("team-a"), LLAMA).await;
    assert_eq!(final_error_code(&text), "upstream_unavailable");
    assert_eq!(sse_data(&text).iter().filter(|e| e.contains("\"content\":\" ")).count(), 2, "{text}");
    let (_, s) = scrape(&gw).await;
    assert_eq!(value(&s, "nimgate_upstream_errors_total{backend=\"gpu\",kind=\"stream_broken\"}"), 1.0);
    let state = gw.admin_backend("gpu").await;
    assert_eq!(state["recent_errors"][0]["kind"], "stream_broken", "{state}");
}

#[tokio::test]
async fn a_backend_ejected_for_broken_streams_is_logged_like_one_ejected_for_failed_requests() {
    let logs = Logs::default();
    let _capture = logs.capture_json();
    let truncating = sim(SimOptions {
        gated_chunks: true,
        failures: Failures { end_after_chunks: Some(1), ..Failures::default() },
        ..SimOptions::default()
    })
    .await;
    let erroring = Failures { error_rate: 1.0, error_status: 500, ..Failures::default() };
    let erroring = sim(SimOptions { failures: erroring, ..SimOptions::default() }).await;
    let gw = gateway()
        .backend("streams", &truncating.url())
        .backend("requests", &erroring.url())
        .route_with(RawRoute { upstream_model: Some(LLAMA.into()), ..route("s", &["streams"], &[]) })
        .route_with(RawRoute { upstream_model: Some(LLAMA.into()), ..route("r", &["requests"], &[]) })
        .key("team-a", &["*"])
        .with(balancing(|b| b.eject_after = Some(2)))
        .start()
        .await;
    let client = gw.client("team-a");
    // An answered head trusts a backend again: both heads come before either stream breaks,
    // so the two breaks are consecutive failures.
    let streams = [client.chat_stream("s").await, client.chat_stream("s").await];
    truncating.release_chunks(2);
    for response in streams {
        assert_eq!(final_error_code(&answer_text(response).await), "upstream_unavailable");
    }
    for _ in 0..2 {
        assert_eq!(client.chat("r").await.status, 500);
    }
    let ejections = logs.with_message("backend ejected after consecutive failures");
    let [streams, requests] = ["streams", "requests"].map(|name| {
        let found: Vec<_> = ejections.iter().filter(|fields| fields["backend"] == name).collect();
        assert_eq!(found.len(), 1, "one ejection of {name} logged: {ejections:#?}");
        found[0].clone()
    });
    let names = |fields: &serde_json::Value| {
        let mut names: Vec<_> = fields.as_object().unwrap().keys().cloned().collect();
        names.sort();
        names
    };
    assert_eq!(names(&streams), ["backend", "cause", "ejected_for", "failures", "message"], "{streams}");
    assert_eq!(names(&streams), names(&requests), "the same fields: {streams} {requests}");
    assert_eq!((&streams["failures"], &streams["ejected_for"]), (&requests["failures"], &requests["ejected_for"]));
    assert_eq!(streams["failures"], 2);
    assert_eq!(streams["cause"], "the backend closed the stream before it was complete");
    assert_eq!(requests["cause"], "answered 500 Internal Server Error");
}

#[tokio::test]
async fn retry_after_sets_how_long_an_overloaded_backend_stays_out() {
    let overloaded = |status: u16, retry_after: Option<u32>| {
        sim(SimOptions {
            failures: Failures { error_rate: 1.0, error_status: status, retry_after, ..Failures::default() },
            ..SimOptions::default()
        })
    };
    let (hosted_429, hosted_503, capped, bare) = (
        overloaded(429, Some(20)).await,
        overloaded(503, Some(20)).await,
        overloaded(429, Some(3600)).await,
        overloaded(429, None).await,
    );
    let gw = gateway()
        .backend("h429", &hosted_429.url())
        .backend("h503", &hosted_503.url())
        .backend("capped", &capped.url())
        .backend("bare", &bare.url())
        .route_with(RawRoute { upstream_model: Some(LLAMA.into()), ..route("a", &["h429"], &[]) })
        .route_with(RawRoute { upstream_model: Some(LLAMA.into()), ..route("b", &["h503"], &[]) })
        .route_with(RawRoute { upstream_model: Some(LLAMA.into()), ..route("c", &["capped"], &[]) })
        .route_with(RawRoute { upstream_model: Some(LLAMA.into()), ..route("d", &["bare"], &[]) })
        .key("team-a", &["*"])
        .with(balancing(|b| {
            b.ejection_base = Some("2s".into());
            b.ejection_max = Some("60s".into());
        }))
        .start()
        .await;
    let client = gw.client("team-a");
    let passed = client.chat("a").await;
    assert_eq!(
        (passed.status.as_u16(), passed.header("retry-after")),
        (429, Some("20")),
        "the upstream's answer passes through"
    );
    // Each route has only this backend: the third refusal in a row takes it out.
    assert_eq!(gw.admin_backend("h429").await["ejected"], false);
    for _ in 0..2 {
        assert_eq!(client.chat("a").await.status, 429);
    }
    for _ in 0..3 {
        assert_eq!(client.chat("b").await.status, 503);
        assert_eq!(client.chat("c").await.status, 429);
        assert_eq!(client.chat("d").await.status, 429);
    }
    let out_for = |state: serde_json::Value| {
        assert_eq!(state["ejected"], true, "{state}");
        state["ejected_for_ms"].as_u64().unwrap()
    };
    let h429 = out_for(gw.admin_backend("h429").await);
    assert!((15_000..=20_000).contains(&h429), "out for its Retry-After of 20 s: {h429} ms");
    let h503 = out_for(gw.admin_backend("h503").await);
    assert!((15_000..=20_000).contains(&h503), "a 503 with Retry-After too: {h503} ms");
    let capped = out_for(gw.admin_backend("capped").await);
    assert!((25_000..=30_000).contains(&capped), "at most 30 s whatever it asks: {capped} ms");
    let bare = out_for(gw.admin_backend("bare").await);
    assert!((1_000..=2_000).contains(&bare), "without Retry-After, ejection_base: {bare} ms");
    // While out, the route answers 503 at once without asking the backend again.
    client.chat("a").await.assert_error(503, "no_healthy_backend");
    assert_eq!(hosted_429.stats().requests, 3);
    let (_, s) = scrape(&gw).await;
    assert_eq!(value(&s, "nimgate_upstream_errors_total{backend=\"h429\",kind=\"overloaded\"}"), 3.0);
    assert_eq!(value(&s, "nimgate_upstream_errors_total{backend=\"h503\",kind=\"5xx\"}"), 3.0);
    assert_eq!(value(&s, "nimgate_backend_healthy{backend=\"h429\"}"), 0.0, "out of rotation");
}

#[tokio::test]
async fn readiness_turns_503_at_once_when_draining_while_streams_finish() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gated = sim(SimOptions { tokens: 3, gated_chunks: true, ..SimOptions::default() }).await;
    let gw = gateway().backend("gpu", &gated.url()).route(LLAMA, &["gpu"]).key("team-a", &["*"]).start().await;
    let client = gw.client("team-a");
    let mut stream = client.chat_stream(LLAMA).await.into_body();
    // A load balancer's probe, mid-way through its request head when the drain begins.
    let addr = gw.url.trim_start_matches("http://").to_owned();
    let mut probe = tokio::net::TcpStream::connect(&addr).await.unwrap();
    probe.write_all(b"GET /health/ready HTTP/1.1\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let gateway = Arc::clone(&gw.gateway);
    let TestGateway { running, .. } = gw;
    let drained = tokio::spawn(running.shutdown());
    eventually("the gateway is draining", Duration::from_secs(2), || async { gateway.is_draining() }).await;
    probe.write_all(b"host: gateway\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), probe.read_to_end(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("draining"), "{answer}");
    assert!(tokio::net::TcpStream::connect(&addr).await.is_err(), "new connections are refused");
    // The stream begun before the drain still completes.
    gated.release_chunks(100);
    let text: String = all_frames(&mut stream).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    assert!(text.contains("[DONE]"), "{text}");
    tokio::time::timeout(Duration::from_secs(5), drained).await.unwrap().unwrap();
}
