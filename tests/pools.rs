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
    assert!(message.contains("a ejected for") && message.contains("b ejected for"), "{message}");
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
    let peak = Arc::new(AtomicU64::new(0));
    let watcher = tokio::spawn({
        let (peak, admin) = (Arc::clone(&peak), gw.admin_client());
        async move {
            loop {
                let reply = admin.get("/admin/backends").await;
                peak.fetch_max(reply.json()["backends"][0]["in_flight"].as_u64().unwrap(), Ordering::Relaxed);
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
    let failing = sim(SimOptions {
        failures: Failures { error_rate: 1.0, error_status: 503, ..Failures::default() },
        ..SimOptions::default()
    })
    .await;
    let healthy = sim_serving(&[LLAMA]).await;
    let gw = gateway().sim_route(LLAMA, &[&failing, &healthy]).key("team-a", &["*"]).start().await;
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
    let gw = gateway()
        .backend_with(RawBackend {
            timeouts: Some(RawTimeouts { idle: Some("300ms".into()), ..RawTimeouts::default() }),
            ..backend("gpu", &stalling.url())
        })
        .route_with(route(LLAMA, &["gpu"], &[]))
        .key("team-a", &["*"])
        .start()
        .await;
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

/// A sim with one GPU slot and a long time to first token, with `waiting` requests sent to
/// it directly and left waiting: its `/v1/metrics` reports them.
async fn busy_nim(waiting: usize) -> (Sim, Vec<tokio::task::JoinHandle<()>>) {
    let sim = sim(SimOptions { ttft: Duration::from_secs(30), max_concurrency: 1, ..SimOptions::default() }).await;
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
    let overloaded = sim(SimOptions {
        failures: Failures { error_rate: 1.0, error_status: 429, ..Failures::default() },
        ..SimOptions::default()
    })
    .await;
    let other = sim_serving(&[LLAMA]).await;
    let gw = gateway()
        .backend("hosted", &overloaded.url())
        .backend("other", &other.url())
        .route_with(route(LLAMA, &["hosted", "other"], &[]))
        .key("team-a", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");
    for _ in 0..20 {
        assert_eq!(client.chat(LLAMA).await.status, 200);
    }
    assert!(overloaded.stats().requests <= 1, "out of rotation after its first 429");
    let state = gw.admin_backend("hosted").await;
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
    assert_eq!(gw.admin_client().get("/admin/nothing").await.status, 404);
}
