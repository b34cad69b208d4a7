//! Hot reload without dropping a request (#8): file edits, a ConfigMap-style symlink swap and
//! the admin API put a new config in force within seconds; an invalid file changes nothing;
//! requests in flight finish on their snapshot; state of unchanged keys and backends survives.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use nimgate::config::raw::{RawBackend, RawConfig, RawLimits, RawRoute};
use nimgate_tests::*;

const LLAMA: &str = "meta/llama-3.1-8b-instruct";
const MISTRAL: &str = "mistralai/mistral-7b-instruct";

fn route(model: &str, backend: &str) -> RawRoute {
    RawRoute { model: model.into(), backends: vec![backend.into()], ..RawRoute::default() }
}

/// One sim serving both models, a route for LLAMA, keys team-a (limited) and team-b.
async fn setup() -> (nim_sim::Sim, FileGateway) {
    let sim = sim_serving(&[LLAMA, MISTRAL]).await;
    let gw = gateway()
        .backend("gpu", &sim.url())
        .route_with(route(LLAMA, "gpu"))
        .key_limited("team-a", &["*"], Some(600), None)
        .key("team-b", &["*"])
        .start_from_file()
        .await;
    (sim, gw)
}

fn base(gw: &FileGateway) -> RawConfig {
    let text = std::fs::read(&gw.path).unwrap();
    serde_json::from_slice(&text).unwrap()
}

fn changed(mut raw: RawConfig) -> RawConfig {
    raw.routes.push(route(MISTRAL, "gpu"));
    raw.keys.retain(|k| k.name != "team-b");
    raw.keys[0].limits = Some(RawLimits { requests_per_minute: Some(1200), ..RawLimits::default() });
    raw
}

async fn assert_changes_visible(gw: &FileGateway, within: Duration) {
    let (a, b) = (gw.gw.client("team-a"), gw.gw.client("team-b"));
    let started = Instant::now();
    eventually("the new route, the revoked key and the new limit are in force", within, || async {
        a.chat(MISTRAL).await.status == 200
            && b.chat(LLAMA).await.status == 401
            && a.chat(LLAMA).await.header("x-ratelimit-limit-requests") == Some("1200")
    })
    .await;
    assert!(started.elapsed() < within);
}

#[tokio::test]
async fn a_file_edit_adds_a_route_revokes_a_key_and_changes_a_limit_within_two_seconds() {
    let (_sim, gw) = setup().await;
    let (a, b) = (gw.gw.client("team-a"), gw.gw.client("team-b"));
    a.chat(MISTRAL).await.assert_error(404, "model_not_found");
    assert_eq!(b.chat(LLAMA).await.status, 200);
    assert_eq!(a.chat(LLAMA).await.header("x-ratelimit-limit-requests"), Some("600"));

    let before = gw.gw.admin_client().get("/admin/config").await.json();
    gw.write(&changed(base(&gw)));
    assert_changes_visible(&gw, Duration::from_secs(2)).await;
    assert_eq!(gw.reloads("ok").await, 1);
    let config = gw.gw.admin_client().get("/admin/config").await.json();
    assert_eq!(config["version"], 2);
    assert_ne!(config["hash"], before["hash"], "the content hash follows the file");
    assert_eq!(config["hash"].as_str().map(str::len), Some(64));
}

#[tokio::test]
async fn a_configmap_style_symlink_swap_is_picked_up() {
    let sim = sim_serving(&[LLAMA, MISTRAL]).await;
    let builder = gateway()
        .backend("gpu", &sim.url())
        .route_with(route(LLAMA, "gpu"))
        .key_limited("team-a", &["*"], Some(600), None)
        .key("team-b", &["*"])
        .key("steady", &["*"]);
    let first = builder.raw();
    // The kubelet's layout: the file is a symlink through `..data` to a timestamped directory.
    let dir = tempfile::tempdir().unwrap();
    let mount = dir.path().to_path_buf();
    let mount = mount.as_path();
    std::fs::create_dir(mount.join("..2026_11_25_1")).unwrap();
    write_config(&mount.join("..2026_11_25_1/nimgate.json"), &first);
    std::os::unix::fs::symlink("..2026_11_25_1", mount.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/nimgate.json", mount.join("nimgate.json")).unwrap();
    let path = mount.join("nimgate.json");
    let gw = builder.serve_file(dir, path, nimgate::config::EnvSource::Map(Default::default())).await;

    // Traffic of a key the update keeps, all through the swap: not one request may fail.
    let running = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let traffic = {
        let (client, running) = (gw.gw.client("steady"), Arc::clone(&running));
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            while running.load(std::sync::atomic::Ordering::Relaxed) {
                statuses.push(client.chat(LLAMA).await.status.as_u16());
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;

    // An update: a new directory, a new `..data` link renamed over the old one.
    std::fs::create_dir(mount.join("..2026_11_25_2")).unwrap();
    write_config(&mount.join("..2026_11_25_2/nimgate.json"), &changed(first));
    std::os::unix::fs::symlink("..2026_11_25_2", mount.join("..data_tmp")).unwrap();
    std::fs::rename(mount.join("..data_tmp"), mount.join("..data")).unwrap();
    std::fs::remove_dir_all(mount.join("..2026_11_25_1")).unwrap();
    assert_changes_visible(&gw, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    running.store(false, std::sync::atomic::Ordering::Relaxed);
    let statuses = traffic.await.unwrap();
    assert!(statuses.len() >= 10, "{} requests ran through the swap", statuses.len());
    assert!(statuses.iter().all(|&s| s == 200), "every request through the swap answered: {statuses:?}");
}

#[tokio::test]
async fn the_admin_api_reloads_and_reports_an_invalid_file_with_its_problems() {
    let (_sim, gw) = setup().await;
    let admin = gw.gw.admin_client();
    // The watch would reload too; the admin call is what this test checks, so it comes first.
    let mut raw = changed(base(&gw));
    raw.keys[0].models = vec!["*".into()];
    write_config(&gw.path, &raw);
    let reply = gw.admin_reload().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.json()["version"].as_u64().unwrap() >= 2);
    assert_changes_visible(&gw, Duration::from_secs(1)).await;

    let mut broken = raw.clone();
    broken.routes.push(RawRoute { model: "x/*".into(), backends: vec!["nowhere".into()], ..RawRoute::default() });
    broken.backends.push(RawBackend { name: "bad".into(), url: "ftp://x".into(), ..RawBackend::default() });
    write_config(&gw.path, &broken);
    let version = admin.get("/admin/config").await.json()["version"].clone();
    let reply = admin.post("/admin/reload", "").await;
    assert_eq!(reply.status, 422, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["error"]["code"], "invalid_config");
    let paths: Vec<&str> = body["problems"].as_array().unwrap().iter().map(|p| p["path"].as_str().unwrap()).collect();
    assert!(
        paths.contains(&"backends[1].url") && paths.iter().any(|p| p.starts_with("routes[2].backends")),
        "{paths:?}"
    );
    // Still serving the last good config.
    assert_eq!(gw.gw.client("team-a").chat(MISTRAL).await.status, 200);
    assert_eq!(admin.get("/admin/config").await.json()["version"], version);
    assert!(gw.reloads("error").await >= 1);
}

#[tokio::test]
async fn an_invalid_file_keeps_the_old_config_serving_and_counts_the_error() {
    let (_sim, gw) = setup().await;
    std::fs::write(&gw.path, b"{ this is not json").unwrap();
    eventually("the failed reload is counted", Duration::from_secs(3), || async { gw.reloads("error").await == 1 })
        .await;
    assert_eq!(gw.reloads("ok").await, 0);
    assert_eq!(gw.gw.client("team-b").chat(LLAMA).await.status, 200);
    let config = gw.gw.admin_client().get("/admin/config").await.json();
    assert_eq!(config["version"], 1);
}

#[tokio::test]
async fn admin_config_shows_the_config_in_force_without_secrets() {
    let (_sim, gw) = setup().await;
    let config = gw.gw.admin_client().get("/admin/config").await;
    assert_eq!(config.status, 200);
    let body = config.json();
    assert_eq!(body["version"], 1);
    assert_eq!(body["hash"].as_str().unwrap().len(), 64);
    assert_eq!(body["config"]["keys"][0]["name"], "team-a");
    assert_eq!(body["config"]["keys"][0]["key_sha256"], "<redacted>");
    assert!(!config.text().contains(&nimgate::auth::digest_hex(&secret("team-a"))));
}

#[tokio::test]
async fn a_stream_begun_before_a_reload_that_removes_its_route_completes() {
    let sim = sim(SimOptions {
        models: vec![LLAMA.into()],
        tokens: 30,
        chunk_delay: Duration::from_millis(20),
        ..SimOptions::default()
    })
    .await;
    let gw = gateway()
        .backend("gpu", &sim.url())
        .route_with(route(LLAMA, "gpu"))
        .route_with(route("other/*", "gpu"))
        .key("team-a", &["*"])
        .start_from_file()
        .await;
    let client = gw.gw.client("team-a");
    let response = client
        .send(client.request(Method::POST, "/v1/chat/completions", chat_body(LLAMA, true).to_string(), &[]))
        .await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = next_frame(&mut body, Duration::from_secs(5)).await.expect("the stream started");

    let mut raw = base(&gw);
    raw.routes.retain(|r| r.model != LLAMA);
    raw.backends[0].weight = Some(2); // the backend changes too: a fresh one serves new requests
    write_config(&gw.path, &raw);
    assert_eq!(gw.admin_reload().await.status, 200);
    client.chat(LLAMA).await.assert_error(404, "model_not_found");

    let rest = all_frames(&mut body).await;
    let text: String = std::iter::once(first).chain(rest).map(|f| String::from_utf8_lossy(&f).into_owned()).collect();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(sse_data(&text).len(), 1 + 30 + 1 + 1, "role, 30 tokens, finish, [DONE]");
}

#[tokio::test]
async fn limiter_and_backend_state_survive_an_unrelated_reload() {
    let sim = sim_serving(&[LLAMA]).await;
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let gw = gateway()
        .backend("gpu", &sim.url())
        .backend("down", &closed)
        // `down` first, so that the first request ejects it whatever the balancer draws.
        .route_with(RawRoute {
            model: LLAMA.into(),
            backends: vec!["down".into()],
            fallback: vec!["gpu".into()],
            ..RawRoute::default()
        })
        .key_limited("team-a", &["*"], Some(1), None) // one request a minute
        .key("team-b", &["*"])
        .with(|raw| raw.balancing.eject_after = Some(1))
        .start_from_file()
        .await;
    let (a, b) = (gw.gw.client("team-a"), gw.gw.client("team-b"));
    assert_eq!(a.chat(LLAMA).await.status, 200);
    a.chat(LLAMA).await.assert_error(429, "rate_limit_exceeded");
    for _ in 0..5 {
        assert_eq!(b.chat(LLAMA).await.status, 200);
    }
    let before = gw.gw.admin_backend("down").await;
    assert_eq!(before["ejected"], true, "{before}");
    let gpu_requests = gw.gw.admin_backend("gpu").await["requests"].clone();

    let mut raw = base(&gw);
    raw.routes.push(route(MISTRAL, "gpu"));
    write_config(&gw.path, &raw);
    assert_eq!(gw.admin_reload().await.status, 200);

    a.chat(LLAMA).await.assert_error(429, "rate_limit_exceeded");
    let after = gw.gw.admin_backend("down").await;
    assert_eq!((after["ejected"].as_bool(), after["failures"].clone()), (Some(true), before["failures"].clone()));
    assert_eq!(gw.gw.admin_backend("gpu").await["requests"], gpu_requests, "the same backend, its counters kept");

    // A changed URL is a new backend: fresh state.
    let mut raw = base(&gw);
    raw.backends[1].url = sim.url();
    write_config(&gw.path, &raw);
    assert_eq!(gw.admin_reload().await.status, 200);
    let fresh = gw.gw.admin_backend("down").await;
    assert_eq!((fresh["ejected"].as_bool(), fresh["failures"].as_u64()), (Some(false), Some(0)), "{fresh}");
}

#[tokio::test]
async fn fifty_reloads_under_steady_traffic_fail_no_request() {
    // Streams of 20 chunks 5 ms apart (about 100 ms each) span several reloads each.
    let sim = sim(SimOptions {
        models: vec![LLAMA.into()],
        tokens: 20,
        chunk_delay: Duration::from_millis(5),
        ..SimOptions::default()
    })
    .await;
    let gw = gateway()
        .backend("gpu", &sim.url())
        .route_with(route(LLAMA, "gpu"))
        .key_limited("team-a", &["*"], Some(600_000), Some(600_000_000))
        .start_from_file()
        .await;
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let served = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|i| {
            let client = gw.gw.client("team-a");
            let (failures, served, stop) = (Arc::clone(&failures), Arc::clone(&served), Arc::clone(&stop));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let stream = i % 2 == 1;
                    let request =
                        client.request(Method::POST, "/v1/chat/completions", chat_body(LLAMA, stream).to_string(), &[]);
                    // Every way a request can fail counts: no answer, a broken body, a status
                    // other than 200, a stream without its end.
                    let outcome = match client.try_fetch(request).await {
                        Ok(reply) if reply.status != 200 => Err(format!("{}: {}", reply.status, reply.text())),
                        Ok(reply) if stream && !reply.text().trim_end().ends_with("data: [DONE]") => {
                            Err(format!("a stream lost its end: {}", reply.text()))
                        }
                        Ok(_) => Ok(()),
                        Err(e) => Err(e),
                    };
                    match outcome {
                        Ok(()) => served.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            failures.lock().unwrap().push(e);
                            0
                        }
                    };
                }
            })
        })
        .collect();
    let original = base(&gw);
    for i in 0..50 {
        let mut raw = original.clone();
        // Alternate between configs that differ in an unrelated route and in the backend's
        // weight (a changed backend: the new requests get a fresh one while old ones finish).
        raw.routes.push(route(&format!("filler/model-{i}"), "gpu"));
        if i % 2 == 1 {
            raw.backends[0].weight = Some(2);
        }
        write_config(&gw.path, &raw);
        let reply = gw.admin_reload().await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await.unwrap();
    }
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(failures.is_empty(), "{} requests failed, the first: {:?}", failures.len(), failures.first());
    let served = served.load(Ordering::Relaxed);
    assert!(served > 100, "traffic was steady: {served}");
    assert!(gw.reloads("ok").await >= 50);
    assert_eq!(sim.stats().completed, served, "every request served reached the backend once");
}

#[tokio::test]
async fn a_long_stream_outlives_reloads_that_remove_its_route_and_move_its_backend() {
    // 60 chunks 50 ms apart: a 3 s stream, as a long generation is for the gateway.
    let long = sim(SimOptions {
        models: vec![LLAMA.into()],
        tokens: 60,
        chunk_delay: Duration::from_millis(50),
        ..SimOptions::default()
    })
    .await;
    let other = sim_serving(&[LLAMA]).await;
    let gw = gateway()
        .backend("gpu", &long.url())
        .route_with(route(LLAMA, "gpu"))
        .key("team-a", &["*"])
        .start_from_file()
        .await;
    let client = gw.gw.client("team-a");
    let response = client.chat_stream(LLAMA).await;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let first = next_frame(&mut body, Duration::from_secs(5)).await.expect("the stream started");
    let original = base(&gw);
    let mut versions = Vec::new();
    for step in 0..6 {
        let mut raw = original.clone();
        match step % 3 {
            0 => raw.routes = vec![route("other/*", "gpu")], // its route removed
            1 => raw.backends[0].url = other.url(),          // its backend moved: a new backend `gpu`
            _ => raw.backends[0].weight = Some(3),           // its backend changed again
        }
        write_config(&gw.path, &raw);
        let reply = gw.admin_reload().await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        versions.push(reply.json()["version"].as_u64().unwrap());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(versions.windows(2).all(|w| w[1] == w[0] + 1), "each reload applied: {versions:?}");
    let rest = all_frames(&mut body).await;
    let text: String = std::iter::once(first).chain(rest).map(|f| String::from_utf8_lossy(&f).into_owned()).collect();
    assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    assert_eq!(sse_data(&text).len(), 1 + 60 + 1 + 1, "role, 60 tokens, finish, [DONE]: nothing lost");
    assert_eq!(long.stats().completed, 1);
    assert_eq!(gw.gw.admin_backend("gpu").await["in_flight"], 0);
}

#[tokio::test]
async fn listen_addresses_and_logging_need_a_restart_and_say_so() {
    let (_sim, gw) = setup().await;
    let mut raw = base(&gw);
    raw.server.admin_listen = Some("127.0.0.1:1".into());
    raw.logging.format = Some("json".into());
    raw.routes.push(route(MISTRAL, "gpu"));
    write_config(&gw.path, &raw);
    let reply = gw.admin_reload().await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let expected = serde_json::json!(["server.admin_listen", "logging"]);
    assert_eq!(reply.json()["restart_needed"], expected);
    // The rest of the change applies; the admin listener stays where it was bound.
    assert_eq!(gw.gw.client("team-a").chat(MISTRAL).await.status, 200);
    let config = gw.gw.admin_client().get("/admin/config").await.json();
    assert_eq!(config["restart_needed"], expected);
}

#[tokio::test]
async fn a_change_of_tuning_keeps_a_backends_in_flight_count_and_ejection() {
    let gated =
        sim(SimOptions { models: vec![LLAMA.into()], tokens: 2, gated_chunks: true, ..SimOptions::default() }).await;
    let closed = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let gw = gateway()
        .backend_with(RawBackend { max_concurrency: Some(1), ..RawBackend::default() })
        .with(|raw| {
            raw.backends[0].name = "gpu".into();
            raw.backends[0].url = gated.url();
        })
        .backend("down", &closed)
        .route_with(route(LLAMA, "gpu"))
        .route_with(route("x/*", "down"))
        .key("team-a", &["*"])
        .with(|raw| {
            raw.balancing.eject_after = Some(1);
            raw.balancing.queue_timeout = Some("200ms".into());
        })
        .start_from_file()
        .await;
    let client = gw.gw.client("team-a");
    client.chat("x/model").await.assert_error(502, "upstream_unavailable");
    assert_eq!(gw.gw.admin_backend("down").await["ejected"], true);
    let first = client.chat_stream(LLAMA).await;
    assert_eq!(first.status(), 200);

    // New weights, a higher cap, another ejection policy: tuning only.
    let mut raw = base(&gw);
    raw.backends[0].weight = Some(5);
    raw.backends[0].max_concurrency = Some(2);
    raw.backends[1].weight = Some(3);
    raw.balancing.eject_after = Some(2);
    write_config(&gw.path, &raw);
    assert_eq!(gw.admin_reload().await.status, 200);
    let (gpu, down) = (gw.gw.admin_backend("gpu").await, gw.gw.admin_backend("down").await);
    assert_eq!((gpu["in_flight"].as_u64(), gpu["requests"].as_u64()), (Some(1), Some(1)), "carried over: {gpu}");
    assert_eq!(down["ejected"], true, "still ejected: {down}");

    // The cap of 2 counts the stream begun before the reload: one more fits, a third waits
    // out its queue timeout.
    let second = client.chat_stream(LLAMA).await;
    assert_eq!(second.status(), 200);
    client.chat(LLAMA).await.assert_error(503, "no_healthy_backend");
    gated.release_chunks(100);
    for response in [first, second] {
        let mut body = response.into_body();
        let text: String =
            all_frames(&mut body).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
        assert!(text.contains("[DONE]"), "{text}");
    }
    assert_eq!(gw.gw.admin_backend("gpu").await["in_flight"], 0);
    // A new URL is another server: that backend starts fresh.
    let mut raw = base(&gw);
    raw.backends[1].url = gated.url();
    write_config(&gw.path, &raw);
    assert_eq!(gw.admin_reload().await.status, 200);
    assert_eq!(gw.gw.admin_backend("down").await["ejected"], false);
}

#[tokio::test]
async fn a_busy_log_file_beside_the_config_does_not_defer_a_reload() {
    let (_sim, gw) = setup().await;
    let log = gw.path.with_file_name("access.log");
    let writing = tokio::spawn(async move {
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&log).unwrap();
        loop {
            writeln!(file, "a log line").unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.write(&changed(base(&gw)));
    // Sooner than the 2 s that bound a debounce: the log's events are not waited for at all.
    assert_changes_visible(&gw, Duration::from_millis(1500)).await;
    writing.abort();
}

#[tokio::test]
async fn a_request_admitted_under_old_limits_settles_nothing_into_the_new_ones() {
    let slow =
        sim(SimOptions { models: vec![LLAMA.into()], ttft: Duration::from_millis(500), ..SimOptions::default() }).await;
    let long = sim(SimOptions { models: vec![MISTRAL.into()], tokens: 2000, ..SimOptions::default() }).await;
    let file = gateway()
        .backend("slow", &slow.url())
        .backend("long", &long.url())
        .route_with(route(LLAMA, "slow"))
        .route_with(route(MISTRAL, "long"))
        .key_limited("team-a", &["*"], None, Some(1000))
        .start_from_file()
        .await;
    let client = file.gw.client("team-a");
    let admitted_before = tokio::spawn({
        let client = client.clone();
        async move { client.chat(LLAMA).await.status }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut raw = base(&file);
    raw.keys[0].limits = Some(RawLimits { tokens_per_minute: Some(5000), ..RawLimits::default() });
    file.write(&raw);
    assert_eq!(file.admin_reload().await.status, 200);
    // Under the new limit: an answer of about 2,000 tokens.
    assert_eq!(client.chat(MISTRAL).await.status, 200);
    // The request admitted under the old limit ends now; its settlement must not replace the
    // new bucket (which would forget the 2,000 tokens just spent).
    assert_eq!(admitted_before.await.unwrap(), 200);
    let reply = client.chat(MISTRAL).await;
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("5000"));
    let remaining: u64 = reply.header("x-ratelimit-remaining-tokens").unwrap().parse().unwrap();
    assert!(remaining < 3500, "the tokens spent under the new limit were forgotten: {remaining} left");
}
