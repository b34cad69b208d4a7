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
            limits: Some(RawLimits { requests_per_minute: Some(60_000_000), tokens_per_minute: Some(60_000_000_000) }),
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
    let mut headers = HeaderMap::new();
    headers.insert("authorization", "Bearer sk-team-42".parse().expect("header"));
    let model = "org1/model-1";

    c.bench_function("auth: key by sha256 digest", |b| {
        b.iter(|| black_box(snapshot.keys.authenticate(black_box(&headers)).is_ok()))
    });
    let key = snapshot.keys.authenticate(&headers).expect("known key");
    c.bench_function("acl: two globs", |b| b.iter(|| black_box(key.allows(black_box(model)))));
    c.bench_function("limits: admit + settle (requests and tokens)", |b| {
        b.iter(|| {
            let admission = now(gateway.limiter().admit(key, black_box(700))).expect("admitted");
            if let Some(permit) = admission.and_then(|a| a.permit) {
                permit.settle(black_box(300));
            }
        })
    });
    c.bench_function("auth + acl + limits: one request's caller checks", |b| {
        b.iter(|| {
            let key = snapshot.keys.authenticate(black_box(&headers)).expect("known key");
            assert!(key.allows(black_box(model)));
            let admission = now(gateway.limiter().admit(key, 700)).expect("admitted");
            if let Some(permit) = admission.and_then(|a| a.permit) {
                permit.settle(300);
            }
        })
    });
}

fn request_steps(c: &mut Criterion) {
    let snapshot = validate(&config(), &EnvSource::Map(Default::default())).expect("bench config is valid");
    c.bench_function("route: exact of 50", |b| {
        b.iter(|| black_box(snapshot.routes.find(black_box("org7/model-7")).is_some()))
    });
    c.bench_function("route: glob of 50", |b| {
        b.iter(|| black_box(snapshot.routes.find(black_box("org45/anything")).is_some()))
    });

    let small = format!(
        r#"{{"model":"org1/model-1","messages":[{{"role":"user","content":"{}"}}],"stream":true,"max_tokens":256}}"#,
        "x".repeat(900)
    );
    c.bench_function("peek: 1 KB body", |b| {
        b.iter(|| black_box(nimgate::proxy::body::peek(black_box(small.as_bytes())).is_ok()))
    });
}

criterion_group!(benches, caller_checks, request_steps);
criterion_main!(benches);
