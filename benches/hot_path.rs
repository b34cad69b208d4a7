//! Per-request steps of the gateway's hot path, each measured alone: the body peek, route
//! lookup, and the caller checks (key by digest, ACL, limiter admission and settlement) that
//! every request to a limited key pays. Numbers go in the issue notes; CI only runs each once.

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use criterion::{Criterion, criterion_group, criterion_main};
use http::HeaderMap;
use nimgate::Gateway;
use nimgate::config::raw::{RawBackend, RawConfig, RawKey, RawLimits, RawRoute};
use nimgate::config::{EnvSource, validate};

const KEYS: usize = 100;
const ROUTES: usize = 50;

/// A realistic config: 100 keys with limits (high enough never to refuse), 50 routes.
fn config() -> RawConfig {
    let mut raw = RawConfig::default();
    raw.backends.push(RawBackend { name: "nim".into(), url: "http://127.0.0.1:8000".into(), ..Default::default() });
    for i in 0..ROUTES {
        let model = if i % 5 == 0 { format!("org{i}/*") } else { format!("org{i}/model-{i}") };
        raw.routes.push(RawRoute { model, backends: vec!["nim".into()], ..Default::default() });
    }
    for i in 0..KEYS {
        raw.keys.push(RawKey {
            name: format!("team-{i}"),
            key_sha256: Some(nimgate::auth::digest_hex(&format!("sk-team-{i}"))),
            models: vec!["org1*".into(), format!("org{i}/*")],
            limits: Some(RawLimits {
                requests_per_minute: Some(60_000_000),
                tokens_per_minute: Some(60_000_000_000),
                ..RawLimits::default()
            }),
            ..Default::default()
        });
    }
    raw
}

/// Polls a future that completes without waiting (the in-memory store never waits).
fn now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("the in-memory limiter never waits"),
    }
}

fn caller_checks(c: &mut Criterion) {
    let snapshot = validate(&config(), &EnvSource::Map(Default::default())).expect("bench config is valid");
    let gateway = Gateway::new(snapshot);
    let snapshot = gateway.snapshot();
    // Requests cycle through the 100 keys, as real traffic does; one key alone would pass its
    // (bench-sized) 1M requests a second limit and measure refusals instead.
    let callers: Vec<HeaderMap> = (0..KEYS)
        .map(|i| {
            let mut headers = HeaderMap::new();
            headers.insert("authorization", format!("Bearer sk-team-{i}").parse().expect("header"));
            headers
        })
        .collect();
    let keys: Vec<_> = callers.iter().map(|h| snapshot.keys.authenticate(h).expect("known key").clone()).collect();
    let model = "org1/model-1";
    let mut next = (0..KEYS).cycle();

    c.bench_function("auth: key by sha256 digest", |b| {
        b.iter(|| black_box(snapshot.keys.authenticate(black_box(&callers[42])).is_ok()))
    });
    c.bench_function("acl: two globs", |b| b.iter(|| black_box(keys[42].allows(black_box(model)))));
    // As the handler does: the precheck before the body, admission on what it found after.
    c.bench_function("limits: precheck + admit + settle (requests and tokens)", |b| {
        b.iter(|| {
            let key = &keys[next.next().unwrap_or(0)];
            let checked = gateway.limiter().precheck(key).expect("not refused");
            let admission = now(gateway.limiter().admit_checked(key, black_box(700), checked)).expect("admitted");
            if let Some(permit) = admission.and_then(|a| a.permit) {
                permit.settle(black_box(300));
            }
        })
    });
    c.bench_function("auth + acl + limits: one request's caller checks", |b| {
        b.iter(|| {
            let key = snapshot.keys.authenticate(black_box(&callers[next.next().unwrap_or(0)])).expect("known key");
            assert!(key.allows(black_box(model)));
            let checked = gateway.limiter().precheck(key).expect("not refused");
            let admission = now(gateway.limiter().admit_checked(key, 700, checked)).expect("admitted");
            if let Some(permit) = admission.and_then(|a| a.permit) {
                permit.settle(300);
            }
        })
    });
}

/// A config with `routes` routes, one in five a glob, every key allowed everything.
fn routed(routes: usize) -> nimgate::Snapshot {
    let mut raw = config();
    raw.routes.clear();
    for i in 0..routes {
        let model = if i % 5 == 0 { format!("org{i}/*") } else { format!("org{i}/model-{i}") };
        raw.routes.push(RawRoute { model, backends: vec!["nim".into()], ..Default::default() });
    }
    validate(&raw, &EnvSource::Map(Default::default())).expect("bench config is valid")
}

fn route_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("route");
    for routes in [10, 10_000] {
        let snapshot = routed(routes);
        let (exact, glob) = (format!("org{}/model-{}", routes - 1, routes - 1), format!("org{}/anything", routes - 5));
        group.bench_function(format!("exact of {routes}"), |b| {
            b.iter(|| black_box(snapshot.routes.find(black_box(&exact))))
        });
        group.bench_function(format!("glob of {routes}"), |b| {
            b.iter(|| black_box(snapshot.routes.find(black_box(&glob))))
        });
        group.bench_function(format!("miss of {routes}"), |b| {
            b.iter(|| black_box(snapshot.routes.find(black_box("mistralai/unrouted-model"))))
        });
    }
    group.finish();
}

/// A chat body of about `size` bytes, most of it an image part (as vision requests are).
fn body_of(size: usize) -> String {
    let image = "QUJD".repeat(size / 4);
    format!(
        r#"{{"messages":[{{"role":"user","content":[{{"type":"text","text":"What is in this image?"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}]}}],"model":"org1/model-1","stream":true,"max_tokens":256}}"#
    )
}

fn model_extraction(c: &mut Criterion) {
    let mut group = c.benchmark_group("peek");
    for (label, size) in [("1 KB", 1 << 10), ("100 KB", 100 << 10), ("5 MB", 5 << 20)] {
        let body = body_of(size);
        group.throughput(criterion::Throughput::Bytes(body.len() as u64));
        group.bench_function(label, |b| {
            b.iter(|| black_box(nimgate::request::peek(black_box(body.as_bytes())).is_ok()))
        });
    }
    group.finish();
}

fn usage_scanning(c: &mut Criterion) {
    use nimgate::streaming::usage::{ContentCounter, UsageEventStripper, UsageScanner};
    let chunk = bytes::Bytes::from_static(
        br#"data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1700000000,"model":"meta/llama-3.1-8b-instruct","choices":[{"index":0,"delta":{"content":" fox"},"logprobs":null,"finish_reason":null}],"usage":null}

"#,
    );
    let mut group = c.benchmark_group("usage per chunk");
    group.bench_function("scan", |b| {
        let mut scanner = UsageScanner::default();
        b.iter(|| scanner.feed(black_box(&chunk)))
    });
    group.bench_function("scan + count + strip", |b| {
        let (mut scanner, mut counter, mut stripper) =
            (UsageScanner::default(), ContentCounter::default(), UsageEventStripper::default());
        // As the meter does: the stripper told what the scanner found.
        b.iter(|| {
            let without_usage_object = scanner.feed(&chunk);
            counter.feed(&chunk);
            black_box(stripper.process_known(black_box(chunk.clone()), without_usage_object))
        })
    });
    group.finish();
}

/// What one request records: its count, TTFB and duration, and its tokens, through the
/// per-thread memo; beside it the family's own lookup (a read lock and a hash), for scale.
fn metrics_recording(c: &mut Criterion) {
    let metrics = nimgate::metrics::Metrics::new();
    let mut group = c.benchmark_group("metrics");
    group.bench_function("one request's series", |b| {
        b.iter(|| {
            metrics.request("meta/llama-3.1-8b-instruct", "llama-a", "team-search", 200);
            let (ttfb, duration) = metrics.timings("meta/llama-3.1-8b-instruct", "llama-a");
            ttfb.observe(0.12);
            duration.observe(1.5);
            let (prompt, completion) = metrics.token_counters("meta/llama-3.1-8b-instruct", "team-search");
            prompt.inc_by(250);
            completion.inc_by(120);
        })
    });
    let family = prometheus::IntCounterVec::new(prometheus::Opts::new("x", "x"), &["model", "backend", "key", "code"])
        .expect("valid family");
    group.bench_function("counter by the family's lookup", |b| {
        b.iter(|| family.with_label_values(&["meta/llama-3.1-8b-instruct", "llama-a", "team-search", "200"]).inc())
    });
    group.bench_function("counter by the memo", |b| {
        b.iter(|| metrics.request("meta/llama-3.1-8b-instruct", "llama-a", "team-search", 200))
    });
    group.finish();
}

criterion_group!(benches, caller_checks, route_lookup, model_extraction, usage_scanning, metrics_recording);
criterion_main!(benches);
