//! GPU-aware scheduling (#17) over real sockets with nim-sim backends that model a KV cache:
//! prefix affinity (conversations stick where their prefix is cached, a hot prefix spreads
//! within the load bound, the decisions are counted).

use std::collections::HashMap;
use std::time::Duration;

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
