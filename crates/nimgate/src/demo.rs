//! `nimgate demo`: the gateway in front of two simulated NIMs (the `nim-sim` library) on
//! loopback, configured by `config/demo.yaml` (compiled in), with a banner that shows how to
//! call it. The quickest way to see nimgate work, and the README's first command.

use std::net::SocketAddr;
use std::time::Duration;

use config::FileFormat;
use nim_sim::{Sim, SimOptions};
use nimgate::config::{ConfigError, EnvSource, load_str, validate};
use nimgate::{Gateway, Launch, Snapshot, server};
use tokio::net::TcpListener;

/// The demo's configuration, the file in `config/demo.yaml`.
pub const DEMO_CONFIG: &str = include_str!("../../../config/demo.yaml");
/// The demo key that may use every model (its digest is in `demo.yaml`).
pub const DEMO_KEY: &str = "sk-nimgate-demo";
/// The demo key limited to `meta/*` and `llama`.
pub const DEMO_KEY_META_ONLY: &str = "sk-nimgate-demo-meta";

/// The simulated NIM behind each backend of `demo.yaml`, and the models it serves.
pub const DEMO_BACKENDS: [(&str, &[&str]); 2] = [
    ("nim-a", &["meta/llama-3.1-8b-instruct", "mistralai/mistral-7b-instruct-v0.3"]),
    (
        "nim-b",
        &[
            "meta/llama-3.1-8b-instruct",
            "mistralai/mistral-7b-instruct-v0.3",
            "nvidia/llama-3.1-nemotron-nano-8b-v1",
            "nvidia/nv-embedqa-e5-v5",
        ],
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the demo configuration is invalid:\n{0}")]
    Config(#[from] ConfigError),
    #[error("demo.yaml names backend `{0}`, which the demo does not simulate")]
    UnknownBackend(String),
    #[error("backend `{name}`: cannot simulate it on {url}: {cause}")]
    Sim { name: String, url: String, cause: String },
    #[error("{0}; choose another address with `nimgate demo --listen 127.0.0.1:PORT`")]
    Listen(std::io::Error),
}

/// Options of a demo NIM: slow enough that a stream is visibly a stream.
fn sim_options(models: &[&str]) -> SimOptions {
    SimOptions {
        models: models.iter().map(|m| m.to_string()).collect(),
        ttft: Duration::from_millis(80),
        tokens: 24,
        chunk_delay: Duration::from_millis(25),
        max_concurrency: 64,
        ..SimOptions::default()
    }
}

/// The demo snapshot, with the listen address overridden when given.
pub fn snapshot(listen: Option<SocketAddr>) -> Result<Snapshot, ConfigError> {
    let mut raw = load_str(DEMO_CONFIG, FileFormat::Yaml, &EnvSource::Process)?;
    if let Some(listen) = listen {
        raw.server.listen = Some(listen.to_string());
    }
    validate(&raw, &EnvSource::Process)
}

/// Runs the demo until `shutdown` completes.
pub async fn run(listen: Option<SocketAddr>, shutdown: impl std::future::Future<Output = ()>) -> Result<(), DemoError> {
    let snapshot = snapshot(listen)?;
    let mut sims = Vec::new();
    for backend in &snapshot.backends {
        let (_, models) = DEMO_BACKENDS
            .iter()
            .find(|(name, _)| *name == backend.name.as_str())
            .ok_or_else(|| DemoError::UnknownBackend(backend.name.to_string()))?;
        let sim_error =
            |cause: String| DemoError::Sim { name: backend.name.to_string(), url: backend.url.clone(), cause };
        let addr: SocketAddr = backend
            .url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .map_err(|_| sim_error("the demo needs http://IP:PORT URLs".into()))?;
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| sim_error(e.to_string()))?;
        sims.push(Sim::start_on(listener, sim_options(models)).await.map_err(|e| sim_error(e.to_string()))?);
    }

    let listener = server::bind(snapshot.server.listen).await.map_err(DemoError::Listen)?;
    // Metrics and the admin API on a port of their own choosing: a demo must not fail for a
    // busy 9090 (a local Prometheus).
    let admin = TcpListener::bind("127.0.0.1:0").await.map_err(DemoError::Listen)?;
    let running = nimgate::start(Launch { listeners: Some((listener, admin)), ..Launch::new(snapshot) })
        .await
        .map_err(DemoError::Listen)?;
    println!("{}", banner(running.addr(), running.admin_addr(), running.gateway()));
    shutdown.await;
    running.shutdown().await;
    drop(sims);
    Ok(())
}

fn banner(addr: SocketAddr, admin: SocketAddr, gateway: &Gateway) -> String {
    let snapshot = gateway.snapshot();
    let backends: Vec<String> = snapshot.backends.iter().map(|b| format!("{} {}", b.name, b.url)).collect();
    let routes: Vec<String> = snapshot.routes.iter().map(|r| r.pattern.as_str().to_owned()).collect();
    let url = format!("http://{addr}");
    format!(
        r#"
nimgate demo is running: the gateway in front of two simulated NIMs.

  gateway    {url}
  API key    {DEMO_KEY}   (and {DEMO_KEY_META_ONLY}: meta/* and llama only)
  backends   {backends}
  routes     {routes}
  metrics    http://{admin}/metrics   (and /admin/backends, /admin/config)

Try it:

  curl -s {url}/v1/chat/completions \
    -H 'Authorization: Bearer {DEMO_KEY}' -H 'Content-Type: application/json' \
    -d '{{"model":"meta/llama-3.1-8b-instruct","messages":[{{"role":"user","content":"Hello!"}}]}}'

  Stream it: add "stream": true to the body and -N to curl. List models: curl -s {url}/v1/models -H 'Authorization: Bearer {DEMO_KEY}'

With the OpenAI SDK (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="{url}/v1", api_key="{DEMO_KEY}")
  reply = client.chat.completions.create(model="llama", messages=[{{"role": "user", "content": "Hello!"}}])
  print(reply.choices[0].message.content)

Ctrl-C stops it."#,
        backends = backends.join(", "),
        routes = routes.join(", "),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid_and_every_backend_is_simulated() {
        let snapshot = snapshot(None).unwrap();
        for backend in &snapshot.backends {
            assert!(DEMO_BACKENDS.iter().any(|(name, _)| *name == backend.name.as_str()), "{}", backend.name);
        }
    }

    #[test]
    fn every_exact_demo_route_is_served_by_each_backend_of_its_pool() {
        let snapshot = snapshot(None).unwrap();
        for route in snapshot.routes.iter() {
            let model = route.upstream_model.as_ref().map(|u| u.name.as_str()).or(route.exact_model());
            let Some(model) = model else { continue };
            for backend in route.pool.members().all() {
                let (_, models) = DEMO_BACKENDS.iter().find(|(n, _)| *n == backend.name.as_str()).unwrap();
                assert!(models.contains(&model), "{} does not serve {model}", backend.name);
            }
        }
    }

    #[test]
    fn demo_keys_match_the_digests_in_demo_yaml() {
        assert!(DEMO_CONFIG.contains(&nimgate::auth::digest_hex(DEMO_KEY)));
        assert!(DEMO_CONFIG.contains(&nimgate::auth::digest_hex(DEMO_KEY_META_ONLY)));
    }
}
