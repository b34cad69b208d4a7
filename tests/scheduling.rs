//! GPU-aware scheduling (#17) over real sockets with nim-sim backends that model a KV cache:
//! prefix affinity (conversations stick where their prefix is cached, a hot prefix spreads
//! within the load bound, the decisions are counted) and fair share of a saturated pool between
//! keys (a backlog does not make others wait behind it; weights share the freed slots).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use nim_sim::Sim;
use nimgate::config::raw::RawRoute;
use nimgate_tests::*;
use serde_json::{Value, json};

const LLAMA: &str = "meta/llama-3.1-8b-instruct";

/// `n` sims with a prefix cache, recording what they receive.
async fn gpus(n: usize, ttft: Duration) -> Vec<Sim> {
    let mut sims = Vec::new();
    for _ in 0..n {
        sims.push(
            sim(SimOptions {
                kv_cache_tokens: 1 << 16,
                record_requests: true,
                ttft,
                tokens: 4,
                ..SimOptions::default()
            })
            .await,
        );
    }
    sims
}

/// A gateway with one route over `sims` (gpu0, gpu1, ...) using `strategy`.
async fn cluster(sims: &[Sim], strategy: &str) -> TestGateway {
    let mut builder = gateway().key("team-a", &["*"]);
    let mut names = Vec::new();
    for (i, sim) in sims.iter().enumerate() {
        let name = format!("gpu{i}");
        builder = builder.backend(&name, &sim.url());
        names.push(name);
    }
    builder
        .route_with(RawRoute {
            model: LLAMA.into(),
            backends: names,
            strategy: Some(strategy.into()),
            ..RawRoute::default()
        })
        .with(|raw| raw.balancing.queue_length = Some(1000))
        .start()
        .await
}

/// A system prompt of about 4 KB, different for each `n`.
fn system_prompt(n: usize) -> String {
    format!("You are assistant number {n}. ") + &"Answer briefly and cite your sources. ".repeat(100)
}

fn chat(messages: &[Value]) -> Value {
    json!({ "model": LLAMA, "messages": messages, "max_tokens": 4 })
}

/// Which sim received each body that contains `marker`.
fn served_by(sims: &[Sim], marker: &str) -> Vec<usize> {
    let mut found = Vec::new();
    for (i, sim) in sims.iter().enumerate() {
        for request in sim.recorded() {
            if String::from_utf8_lossy(&request.body).contains(marker) {
                found.push(i);
            }
        }
    }
    found
}

#[tokio::test]
async fn each_conversation_stays_on_the_backend_that_caches_its_prefix() {
    let sims = gpus(4, Duration::ZERO).await;
    let gw = cluster(&sims, "prefix_affinity").await;
    let client = gw.client("team-a");
    let (conversations, turns) = (8, 4);
    let mut histories: Vec<Vec<Value>> =
        (0..conversations).map(|c| vec![json!({ "role": "system", "content": system_prompt(c) })]).collect();
    // Turns interleaved across conversations, as many users would send them.
    for turn in 0..turns {
        for (c, history) in histories.iter_mut().enumerate() {
            history.push(json!({ "role": "user", "content": format!("conversation {c} turn {turn}: a question") }));
            let reply = client.post_json("/v1/chat/completions", &chat(history)).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            let answer = reply.json()["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
            history.push(json!({ "role": "assistant", "content": answer }));
        }
    }
    let mut homes = HashMap::new();
    for c in 0..conversations {
        let served = served_by(&sims, &format!("You are assistant number {c}. "));
        assert_eq!(served.len(), turns, "conversation {c}");
        assert!(served.iter().all(|&gpu| gpu == served[0]), "conversation {c} moved: {served:?}");
        *homes.entry(served[0]).or_insert(0) += 1;
    }
    assert!(homes.len() >= 2, "new prefixes are spread over the pool: {homes:?}");
    let (_, samples) = scrape(&gw).await;
    let decisions = |result: &str| {
        value(&samples, &format!("nimgate_affinity_decisions_total{{model=\"{LLAMA}\",result=\"{result}\"}}"))
    };
    assert_eq!(decisions("miss"), conversations as f64, "each conversation's first turn");
    assert_eq!(decisions("hit"), (conversations * (turns - 1)) as f64);
    // The sims agree: every later turn found its history cached.
    let (queried, hits) = sims.iter().fold((0, 0), |(q, h), s| {
        let stats = s.stats();
        (q + stats.prefix_cache_queries, h + stats.prefix_cache_hits)
    });
    assert!(hits as f64 > 0.7 * queried as f64, "hit {hits} of {queried} prompt tokens");
    // Every block sent is remembered where it went: 8 histories of about 4 KB in 256-byte blocks.
    let mut held = 0;
    for i in 0..4 {
        held += gw.admin_backend(&format!("gpu{i}")).await["prefix_blocks"].as_u64().unwrap();
    }
    assert!((8 * 16..=8 * 20).contains(&held), "{held} blocks remembered");
}

#[tokio::test]
async fn two_replicas_that_share_nothing_keep_a_conversation_on_one_backend() {
    let sims = gpus(4, Duration::ZERO).await;
    let replicas = [cluster(&sims, "prefix_affinity").await, cluster(&sims, "prefix_affinity").await];
    let clients = [replicas[0].client("team-a"), replicas[1].client("team-a")];
    let mut histories: Vec<Vec<Value>> =
        (0..8).map(|c| vec![json!({ "role": "system", "content": system_prompt(c) })]).collect();
    // Each turn of each conversation reaches the other replica than the turn before.
    for turn in 0..4 {
        for (c, history) in histories.iter_mut().enumerate() {
            history.push(json!({ "role": "user", "content": format!("turn {turn}") }));
            let reply = clients[(turn + c) % 2].post_json("/v1/chat/completions", &chat(history)).await;
            assert_eq!(reply.status, 200);
            let answer = reply.json()["choices"][0]["message"]["content"].as_str().unwrap().to_owned();
            history.push(json!({ "role": "assistant", "content": answer }));
        }
    }
    for c in 0..8 {
        let served = served_by(&sims, &format!("You are assistant number {c}. "));
        assert!(served.len() == 4 && served.iter().all(|&gpu| gpu == served[0]), "conversation {c}: {served:?}");
    }
}

#[tokio::test]
async fn two_choices_scatters_the_same_conversations() {
    // The baseline the strategy exists for: without it, turns land anywhere.
    let sims = gpus(4, Duration::ZERO).await;
    let gw = cluster(&sims, "two_choices").await;
    let client = gw.client("team-a");
    let mut moved = 0;
    for c in 0..8 {
        let mut history = vec![json!({ "role": "system", "content": system_prompt(c) })];
        for turn in 0..4 {
            history.push(json!({ "role": "user", "content": format!("turn {turn}") }));
            assert_eq!(client.post_json("/v1/chat/completions", &chat(&history)).await.status, 200);
        }
        let served = served_by(&sims, &format!("You are assistant number {c}. "));
        moved += usize::from(served.iter().any(|&gpu| gpu != served[0]));
    }
    assert!(moved >= 4, "only {moved} of 8 conversations moved between backends");
}

#[tokio::test]
async fn one_hot_prefix_under_load_spreads_over_the_pool_within_the_bound() {
    // Slow first tokens: the 40 requests are all in flight at once.
    let sims = gpus(4, Duration::from_millis(300)).await;
    let gw = cluster(&sims, "prefix_affinity").await;
    let client = gw.client("team-a");
    let body =
        chat(&[json!({ "role": "system", "content": system_prompt(0) }), json!({ "role": "user", "content": "hi" })]);
    let replies = futures_join(40, |_| {
        let (client, body) = (client.clone(), body.clone());
        async move { client.post_json("/v1/chat/completions", &body).await.status }
    })
    .await;
    assert!(replies.iter().all(|&status| status == 200), "{replies:?}");
    let served: Vec<u64> = sims.iter().map(|s| s.stats().requests).collect();
    assert_eq!(served.iter().sum::<u64>(), 40);
    // Mean 10 a backend: none above ceil(1.25 × 10) = 13, so every one took some.
    assert!(served.iter().all(|&n| (1..=13).contains(&n)), "{served:?}");
    let (_, samples) = scrape(&gw).await;
    let overflow =
        value(&samples, &format!("nimgate_affinity_decisions_total{{model=\"{LLAMA}\",result=\"overflow\"}}"));
    assert!(overflow >= 1.0, "the bound sent some away from the backend holding it");
}

/// Runs `n` copies of `task` at once and collects their results.
async fn futures_join<F, T>(n: usize, task: impl Fn(usize) -> F) -> Vec<T>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(task(i))).collect();
    let mut out = Vec::with_capacity(n);
    for handle in handles {
        out.push(handle.await.expect("task"));
    }
    out
}

/// A pool of one backend that serves `slots` requests at a time, each taking `service`;
/// keys `a` and `b` (weights as given), a queue long enough for every test's backlog. Its
/// streams send a chunk only when the test lets them (`Sim::release_chunks`).
async fn saturated(service: Duration, slots: u32, weights: (u32, u32)) -> (Sim, TestGateway) {
    let options =
        SimOptions { ttft: service, tokens: 1, record_requests: true, gated_chunks: true, ..Default::default() };
    let gpu = sim(options).await;
    let gw = gateway()
        .backend("gpu", &gpu.url())
        .route(LLAMA, &["gpu"])
        .key("a", &["*"])
        .key("b", &["*"])
        .with(move |raw| {
            raw.backends[0].max_concurrency = Some(slots);
            raw.balancing.queue_length = Some(2000);
            raw.balancing.queue_timeout = Some("120s".into());
            raw.keys[0].weight = Some(weights.0);
            raw.keys[1].weight = Some(weights.1);
        })
        .start()
        .await;
    (gpu, gw)
}

/// A chat request marked with `who`, so the sim's record tells whose it was.
fn marked(who: &str) -> Value {
    json!({ "model": LLAMA, "messages": [{ "role": "user", "content": format!("from {who}") }], "max_tokens": 1 })
}

/// Starts `n` requests of key `key` at once; each task returns its latency.
fn backlog(gw: &TestGateway, key: &str, n: usize) -> Vec<tokio::task::JoinHandle<Duration>> {
    (0..n)
        .map(|_| {
            let (client, body) = (gw.client(key), marked(key));
            tokio::spawn(async move {
                let started = Instant::now();
                let reply = client.post_json("/v1/chat/completions", &body).await;
                assert_eq!(reply.status, 200, "{}", reply.text());
                started.elapsed()
            })
        })
        .collect()
}

async fn queue_length(gw: &TestGateway) -> f64 {
    let (_, samples) = scrape(gw).await;
    value(&samples, &format!("nimgate_queue_length{{model=\"{LLAMA}\"}}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_sending_after_a_backlog_of_500_waits_its_fair_share_not_the_backlog() {
    raise_open_files_limit(4096);
    let (_gpu, gw) = saturated(Duration::from_millis(20), 2, (1, 1)).await;
    let started = Instant::now();
    let a = backlog(&gw, "a", 500);
    eventually("a backlog of 300 queued", Duration::from_secs(30), || async { queue_length(&gw).await >= 300.0 }).await;
    // Key b's requests, one after another, while a's backlog is still there.
    let b = gw.client("b");
    let mut waits = Vec::new();
    for _ in 0..5 {
        let sent = Instant::now();
        assert_eq!(b.post_json("/v1/chat/completions", &marked("b")).await.status, 200);
        waits.push(sent.elapsed());
    }
    let backlog_left = queue_length(&gw).await;
    let mut a_latencies = Vec::new();
    for task in a {
        a_latencies.push(task.await.unwrap());
    }
    let drained = started.elapsed();
    assert!(backlog_left >= 100.0, "b was served while a's backlog stood: {backlog_left} left");
    let slowest_b = waits.iter().max().unwrap();
    eprintln!("b's waits {waits:?} with {backlog_left} of a's left; a's backlog drained in {drained:?}");
    // Behind a's backlog, b would wait for it to drain (2 slots x 20 ms x 500: over 5 s);
    // served fairly, about one of a's requests goes before each of b's.
    assert!(*slowest_b < drained / 10, "b waited {slowest_b:?}; a's backlog took {drained:?}");
    let (_, samples) = scrape(&gw).await;
    assert!(value(&samples, "nimgate_key_queue_wait_seconds_count{key=\"b\"}") >= 1.0);
    assert!(value(&samples, "nimgate_key_queue_wait_seconds_count{key=\"a\"}") >= 300.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_contention_weights_3_to_1_share_the_freed_slots_3_to_1() {
    raise_open_files_limit(4096);
    let (gpu, gw) = saturated(Duration::from_millis(1), 1, (3, 1)).await;
    // A stream holds the only slot until both backlogs have formed behind it.
    let blocker = gw.client("a").chat_stream(LLAMA).await;
    let mut tasks = backlog(&gw, "a", 300);
    tasks.extend(backlog(&gw, "b", 300));
    eventually("both backlogs queued", Duration::from_secs(30), || async { queue_length(&gw).await >= 600.0 }).await;
    gpu.release_chunks(1000);
    drop(blocker);
    for task in tasks {
        task.await.unwrap();
    }
    let order: Vec<bool> = gpu
        .recorded()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .filter(|body| body.contains("from "))
        .map(|body| body.contains("from a"))
        .collect();
    assert_eq!(order.len(), 600);
    // While both keys have requests waiting: a's 300 last until about the 400th served.
    let a = order[..360].iter().filter(|&&from_a| from_a).count() as f64;
    let ratio = a / (360.0 - a);
    eprintln!("a:b = {ratio:.2} (a {a} of the first 360 served)");
    assert!((2.7..=3.3).contains(&ratio), "a:b = {ratio:.2} (a {a} of 360)");
}
