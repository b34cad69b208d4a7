//! `/metrics` after known traffic (#9): exact counter values and labels for answers, errors,
//! rate limits, retries and tokens (streamed and not), TTFB observations, bounded series under
//! a flood of unknown model names, and the exposition checked by `promtool check metrics`.

use std::io::Write;
use std::process::{Command, Stdio};

use nimgate::config::raw::{RawBackend, RawRoute};
use nimgate_tests::*;

const LLAMA: &str = "meta/llama-3.1-8b-instruct";

#[tokio::test]
async fn counters_after_known_traffic_have_exact_values_and_labels() {
    let sim = sim(SimOptions { tokens: 7, ..SimOptions::default() }).await;
    let failing = nim_sim::Sim::start(SimOptions {
        failures: Failures { error_rate: 1.0, error_status: 502, ..Failures::default() },
        ..SimOptions::default()
    })
    .await
    .unwrap();
    let gw = gateway()
        .backend("gpu", &sim.url())
        .backend("flaky", &failing.url())
        .route_with(RawRoute {
            model: "meta/*".into(),
            backends: vec!["flaky".into()],
            fallback: vec!["gpu".into()],
            ..RawRoute::default()
        })
        .key("team-a", &["*"])
        .key_limited("team-b", &["*"], Some(1), None) // one request a minute
        .with(|raw| raw.balancing.eject_after = Some(1000))
        .start()
        .await;
    let (a, b) = (gw.client("team-a"), gw.client("team-b"));

    // 3 JSON answers and 2 streams for team-a, each first tried on `flaky` (502) and retried.
    for _ in 0..3 {
        assert_eq!(a.chat(LLAMA).await.status, 200);
    }
    for _ in 0..2 {
        let response = a.chat_stream(LLAMA).await;
        assert_eq!(response.status(), 200);
        let mut body = response.into_body();
        let text: String =
            all_frames(&mut body).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
        assert!(
            text.contains("[DONE]") && !text.contains("\"usage\":{"),
            "the usage chunk nimgate asked for is hidden: {text}"
        );
    }
    // team-b: one answer, then a 429.
    assert_eq!(b.chat(LLAMA).await.status, 200);
    b.chat(LLAMA).await.assert_error(429, "rate_limit_exceeded");
    // Refusals before routing.
    a.chat("no/such-model").await.assert_error(404, "model_not_found");
    gw.anonymous().chat(LLAMA).await.assert_error(401, "invalid_api_key");

    let (_, s) = scrape(&gw).await;
    let requests = |backend: &str, key: &str, code: &str, model: &str| {
        value(
            &s,
            &format!("nimgate_requests_total{{backend=\"{backend}\",code=\"{code}\",key=\"{key}\",model=\"{model}\"}}"),
        )
    };
    assert_eq!(requests("gpu", "team-a", "200", "meta/*"), 5.0);
    assert_eq!(requests("gpu", "team-b", "200", "meta/*"), 1.0);
    // Refused before its body was read (the key had no request left): no model known yet.
    assert_eq!(requests("-", "team-b", "429", "-"), 1.0);
    assert_eq!(requests("-", "team-a", "404", "-"), 1.0, "an unrouted model is labelled -, not by its name");
    assert_eq!(requests("-", "-", "401", "-"), 1.0);
    assert_eq!(value(&s, "nimgate_rate_limited_total{key=\"team-b\",limit=\"requests\"}"), 1.0);
    assert_eq!(value(&s, "nimgate_retries_total{backend=\"flaky\",model=\"meta/*\"}"), 6.0);
    assert_eq!(value(&s, "nimgate_upstream_errors_total{backend=\"flaky\",kind=\"5xx\"}"), 6.0);
    assert_eq!(value(&s, "nimgate_time_to_first_byte_seconds_count{backend=\"gpu\",model=\"meta/*\"}"), 6.0);
    assert_eq!(value(&s, "nimgate_request_duration_seconds_count{backend=\"gpu\",model=\"meta/*\"}"), 6.0);
    // Each stream's gaps between its 11 frames: role, 7 tokens, finish, usage, [DONE].
    assert_eq!(value(&s, "nimgate_stream_chunk_gap_seconds_count{backend=\"gpu\",model=\"meta/*\"}"), 2.0 * 10.0);
    // Tokens: 7 completion tokens per answer as the sim reports them, streams included.
    assert_eq!(value(&s, "nimgate_tokens_total{key=\"team-a\",kind=\"completion\",model=\"meta/*\"}"), 5.0 * 7.0);
    assert_eq!(value(&s, "nimgate_tokens_total{key=\"team-b\",kind=\"completion\",model=\"meta/*\"}"), 7.0);
    let prompt =
        |key: &str| value(&s, &format!("nimgate_tokens_total{{key=\"{key}\",kind=\"prompt\",model=\"meta/*\"}}"));
    assert_eq!((prompt("team-a") + prompt("team-b")) as u64, sim.stats().prompt_tokens, "as the backend reported them");
    assert_eq!(value(&s, "nimgate_inflight_requests{backend=\"gpu\"}"), 0.0);
    assert_eq!(value(&s, "nimgate_backend_healthy{backend=\"flaky\"}"), 1.0);
    // The test clients keep their connections alive.
    assert!(value(&s, "nimgate_active_connections") >= 1.0);
}

#[tokio::test]
async fn a_flood_of_unknown_models_creates_no_series() {
    let sim = sim_serving(&[LLAMA]).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).key("team-a", &["*"]).start().await;
    let client = gw.client("team-a");
    client.chat("no/such-model-0").await.assert_error(404, "model_not_found");
    let (_, before) = scrape(&gw).await;
    for i in 1..500 {
        client.chat(&format!("no/such-model-{i}")).await.assert_error(404, "model_not_found");
    }
    let (text, after) = scrape(&gw).await;
    assert_eq!(before.len(), after.len(), "500 distinct unknown models, no new series");
    assert!(!text.contains("such-model"));
    assert_eq!(value(&after, "nimgate_requests_total{backend=\"-\",code=\"404\",key=\"team-a\",model=\"-\"}"), 500.0);
}

#[tokio::test]
async fn the_exposition_passes_promtool() {
    let sim = sim_serving(&[LLAMA]).await;
    let down = {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        format!("http://{}", listener.local_addr().unwrap())
    };
    let gw = gateway()
        .backend_with(RawBackend { name: "down".into(), url: down, ..RawBackend::default() })
        .backend("gpu", &sim.url())
        .route_with(RawRoute {
            model: LLAMA.into(),
            backends: vec!["down".into(), "gpu".into()],
            ..RawRoute::default()
        })
        .key_limited("team-a", &["*"], Some(1), None)
        .start()
        .await;
    let client = gw.client("team-a");
    client.chat(LLAMA).await;
    client.chat(LLAMA).await;
    client.chat("nothing").await;
    let (text, _) = scrape(&gw).await;
    promtool_check_metrics(&text);
}

/// `promtool check metrics` of an exposition: its format, names, help texts and units.
fn promtool_check_metrics(text: &str) {
    let mut check = Command::new(which_promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// promtool (Debian's `prometheus` package; `scripts/test` installs it).
fn which_promtool() -> &'static str {
    let found = Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    assert!(found, "promtool not found: install Debian's prometheus package (scripts/test does)");
    "promtool"
}

fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// Runs promtool with `args` in deploy/prometheus, and what it said.
fn promtool(args: &[&str]) -> String {
    let out = Command::new(which_promtool()).args(args).current_dir(repo("deploy/prometheus")).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}:\n{said}");
    said
}

#[test]
fn the_shipped_scrape_config_and_alerting_rules_pass_promtool() {
    let said = promtool(&["check", "config", "prometheus.yml"]);
    assert!(said.contains("SUCCESS: 6 rules found"), "the rules file is loaded with the config: {said}");
    let said = promtool(&["check", "rules", "nimgate-rules.yml"]);
    assert!(said.contains("SUCCESS: 6 rules found"), "{said}");
    // The alerts fire on the series they are meant for, and only on those.
    let said = promtool(&["test", "rules", "nimgate-rules.test.yml"]);
    assert!(said.contains("SUCCESS"), "{said}");
}

#[tokio::test]
async fn the_dashboard_and_rules_use_only_metrics_nimgate_exports() {
    // Traffic that makes every family exist: a stream, a retry off a failing backend, a wait
    // in the queue of a one-slot backend, a rate-limited request.
    let slow = sim(SimOptions {
        models: vec![LLAMA.into(), "queued/model".into()],
        tokens: 3,
        chunk_delay: std::time::Duration::from_millis(30),
        ..SimOptions::default()
    })
    .await;
    let failing = sim(SimOptions {
        failures: Failures { error_rate: 1.0, error_status: 502, ..Failures::default() },
        ..SimOptions::default()
    })
    .await;
    let gw = gateway()
        .backend_with(RawBackend {
            name: "slot".into(),
            url: slow.url(),
            max_concurrency: Some(1),
            ..RawBackend::default()
        })
        .backend("failing", &failing.url())
        .route_with(RawRoute {
            model: LLAMA.into(),
            backends: vec!["failing".into()],
            fallback: vec!["slot".into()],
            ..RawRoute::default()
        })
        .route("queued/*", &["slot"])
        .key("team-a", &["*"])
        .key_limited("team-b", &["*"], Some(1), None)
        .with(|raw| raw.balancing.eject_after = Some(1000))
        .start()
        .await;
    let client = gw.client("team-a");
    assert_eq!(client.chat(LLAMA).await.status, 200, "retried from the failing backend to its fallback");
    // Two streams on a one-slot backend: the second waits for the first.
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let response = client.chat_stream("queued/model").await;
                assert_eq!(response.status(), 200);
                let mut body = response.into_body();
                let frames = all_frames(&mut body).await;
                let text: String = frames.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
                assert!(text.contains("[DONE]"), "{text}");
            })
        })
        .collect();
    for stream in streams {
        stream.await.unwrap();
    }
    let limited = gw.client("team-b");
    limited.chat(LLAMA).await;
    limited.chat(LLAMA).await.assert_error(429, "rate_limit_exceeded");
    let (text, _) = scrape(&gw).await;
    // With every family present, the whole exposition passes promtool.
    promtool_check_metrics(&text);
    let exported: Vec<&str> =
        text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.split(' ').next()).collect();
    let dashboard = std::fs::read_to_string(repo("deploy/grafana/nimgate-dashboard.json")).unwrap();
    let rules = std::fs::read_to_string(repo("deploy/prometheus/nimgate-rules.yml")).unwrap();
    let dashboard_json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    assert!(dashboard_json["panels"].as_array().unwrap().len() >= 10);
    for (file, text) in [("dashboard", &dashboard), ("rules", &rules)] {
        let mut used: Vec<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("nimgate_"))
            .collect();
        used.sort_unstable();
        used.dedup();
        assert!(!used.is_empty());
        for name in used {
            let family =
                ["_bucket", "_count", "_sum"].iter().fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
            assert!(exported.contains(&family), "the {file} uses {name}, which nimgate does not export");
        }
    }
}

#[tokio::test]
async fn in_flight_queue_wait_and_time_to_first_token_are_observed() {
    // One GPU slot, 150 ms to the first token; the stream's head goes out at once, as NIM's does.
    let gated = sim(SimOptions {
        tokens: 2,
        ttft: std::time::Duration::from_millis(150),
        gated_chunks: true,
        ..SimOptions::default()
    })
    .await;
    let gw = gateway()
        .backend_with(RawBackend { max_concurrency: Some(1), ..RawBackend::default() })
        .with(|raw| {
            raw.backends[0].name = "gpu".into();
            raw.backends[0].url = gated.url();
        })
        .route(LLAMA, &["gpu"])
        .key("team-a", &["*"])
        .start()
        .await;
    let client = gw.client("team-a");
    let mut first = client.chat_stream(LLAMA).await.into_body();
    let (_, s) = scrape(&gw).await;
    assert_eq!(value(&s, "nimgate_inflight_requests{backend=\"gpu\"}"), 1.0, "the open stream is in flight");
    // The second request waits in the queue for the slot the first holds.
    let queued = tokio::spawn({
        let client = gw.client("team-a");
        async move { client.chat(LLAMA).await.status }
    });
    eventually("the second request is queued", std::time::Duration::from_secs(2), || async {
        gw.gateway.snapshot().routes.iter().next().unwrap().pool.queued() == 1
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    gated.release_chunks(100);
    let text: String = all_frames(&mut first).await.iter().map(|f| String::from_utf8_lossy(f).into_owned()).collect();
    assert!(text.contains("[DONE]"), "{text}");
    assert_eq!(queued.await.unwrap(), 200);

    let (_, s) = scrape(&gw).await;
    let series = |family: &str, labels: &str| value(&s, &format!("nimgate_{family}{{{labels}}}"));
    let route = format!("backend=\"gpu\",model=\"{LLAMA}\"");
    assert_eq!(series("inflight_requests", "backend=\"gpu\""), 0.0);
    assert_eq!(series("queue_wait_seconds_count", &format!("model=\"{LLAMA}\"")), 1.0);
    assert!(series("queue_wait_seconds_sum", &format!("model=\"{LLAMA}\"")) >= 0.1, "it waited the 100 ms and more");
    // Time to first byte is the first token's, not the head's: both answers took >= 150 ms.
    assert_eq!(series("time_to_first_byte_seconds_count", &route), 2.0);
    assert_eq!(series("time_to_first_byte_seconds_bucket", &format!("{route},le=\"0.1\"")), 0.0);
    assert!(series("time_to_first_byte_seconds_sum", &route) >= 0.3);
}
