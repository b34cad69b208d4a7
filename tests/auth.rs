//! Who may call what, over real sockets: 401 for missing, malformed and unknown keys, 403 for a
//! model outside the key's ACL, 404 for an unrouted model whatever the ACL, and `/v1/models`
//! filtered by the ACL. The order of checks is key, route, ACL.

use nimgate_tests::*;

const LLAMA: &str = "meta/llama-3.1-8b-instruct";

async fn setup() -> (nim_sim::Sim, TestGateway) {
    let sim = sim_serving(&[LLAMA, "nvidia/llama-3.1-nemotron-70b-instruct"]).await;
    let gw = gateway()
        .sim_route(LLAMA, &[&sim])
        .sim_route("nvidia/*", &[&sim])
        .key("team-a", &["nvidia/*"])
        .key("team-b", &["*"])
        .start()
        .await;
    (sim, gw)
}

#[tokio::test]
async fn missing_malformed_and_unknown_keys_get_401_in_openai_shape() {
    let (sim, gw) = setup().await;
    let cases = [
        (gw.anonymous(), "missing API key"),
        (gw.with_authorization("sk-test-team-a"), "malformed"),
        (gw.with_authorization("Basic dXNlcjpwYXNz"), "malformed"),
        (gw.with_authorization("Bearer sk-nobody"), "invalid API key"),
    ];
    for (client, words) in cases {
        let reply = client.chat(LLAMA).await;
        let message = reply.assert_error(401, "invalid_api_key");
        assert_eq!(reply.json()["error"]["type"], "authentication_error");
        assert!(message.contains(words), "{message}");
        assert!(!message.contains("sk-"), "the presented key is never echoed: {message}");
    }
    gw.anonymous().get("/v1/models").await.assert_error(401, "invalid_api_key");
    assert_eq!(sim.stats().requests, 0);
}

#[tokio::test]
async fn a_model_outside_the_acl_gets_403_and_the_backend_is_not_called() {
    let (sim, gw) = setup().await;
    let reply = gw.client("team-a").chat(LLAMA).await;
    let message = reply.assert_error(403, "model_not_allowed");
    assert_eq!(reply.json()["error"]["type"], "permission_error");
    assert!(message.contains(LLAMA));
    assert_eq!(sim.stats().requests, 0);
    assert_eq!(gw.client("team-a").chat("nvidia/llama-3.1-nemotron-70b-instruct").await.status, 200);
}

#[tokio::test]
async fn an_unrouted_model_is_404_whatever_the_acl() {
    let (_sim, gw) = setup().await;
    gw.client("team-a").chat("mistralai/mixtral-8x7b").await.assert_error(404, "model_not_found");
    gw.client("team-b").chat("mistralai/mixtral-8x7b").await.assert_error(404, "model_not_found");
}

#[tokio::test]
async fn the_key_is_checked_before_anything_else() {
    let (_sim, gw) = setup().await;
    // Bad JSON, unrouted model or oversized body: without a key the answer is still 401.
    gw.anonymous().post("/v1/chat/completions", "{nope").await.assert_error(401, "invalid_api_key");
    gw.anonymous().chat("no/route").await.assert_error(401, "invalid_api_key");
}

#[tokio::test]
async fn models_lists_only_what_the_key_may_use() {
    let (_sim, gw) = setup().await;
    let ids = |reply: Reply| -> Vec<String> {
        reply.json()["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(ids(gw.client("team-a").get("/v1/models").await), ["nvidia/llama-3.1-nemotron-70b-instruct"]);
    assert_eq!(ids(gw.client("team-b").get("/v1/models").await), [LLAMA, "nvidia/llama-3.1-nemotron-70b-instruct"]);
}

#[tokio::test]
async fn anonymous_access_serves_callers_without_a_key() {
    let sim = sim_serving(&[LLAMA]).await;
    let gw = gateway().sim_route(LLAMA, &[&sim]).with(|raw| raw.server.allow_anonymous = Some(true)).start().await;
    assert_eq!(gw.anonymous().chat(LLAMA).await.status, 200);
    assert_eq!(gw.with_authorization("Bearer anything").chat(LLAMA).await.status, 200);
}
