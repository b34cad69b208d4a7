//! Shared test support: start the real gateway and simulated NIMs in-process on ephemeral
//! loopback ports, talk to them over real sockets, and wait for conditions without sleeps.
//! Nothing here touches the process environment or fixed ports, so suites run in parallel.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use nim_sim::Sim;
use nimgate::config::raw::{RawBackend, RawConfig, RawKey, RawLimits, RawRoute};
use nimgate::config::{EnvSource, validate};
use nimgate::reload::Reloader;
use nimgate::{Gateway, Launch, Running};
use serde_json::{Value, json};

pub use nim_sim::{Failures, SimOptions};

/// Starts a simulated NIM with `options` on an ephemeral port.
pub async fn sim(options: SimOptions) -> Sim {
    Sim::start(options).await.expect("start nim-sim")
}

/// A simulated NIM serving `models` with default options.
pub async fn sim_serving(models: &[&str]) -> Sim {
    sim(SimOptions { models: models.iter().map(|m| m.to_string()).collect(), ..SimOptions::default() }).await
}

/// The secret a test key named `name` uses.
pub fn secret(name: &str) -> String {
    format!("sk-test-{name}")
}

/// Builds a gateway config in code; `start` validates it exactly as a file would be.
#[derive(Default)]
pub struct GatewayBuilder {
    raw: RawConfig,
    env: HashMap<String, String>,
}

pub fn gateway() -> GatewayBuilder {
    let mut builder = GatewayBuilder::default();
    builder.raw.server.listen = Some("127.0.0.1:0".into());
    builder
}

impl GatewayBuilder {
    /// Adds a backend named `name` at `url`.
    pub fn backend(mut self, name: &str, url: &str) -> Self {
        self.raw.backends.push(RawBackend { name: name.into(), url: url.into(), ..RawBackend::default() });
        self
    }

    /// Adds a backend with every field chosen by the caller.
    pub fn backend_with(mut self, backend: RawBackend) -> Self {
        self.raw.backends.push(backend);
        self
    }

    /// Routes `model` to the named backends.
    pub fn route(self, model: &str, backends: &[&str]) -> Self {
        self.route_with(RawRoute {
            model: model.into(),
            backends: backends.iter().map(|b| b.to_string()).collect(),
            ..RawRoute::default()
        })
    }

    pub fn route_with(mut self, route: RawRoute) -> Self {
        self.raw.routes.push(route);
        self
    }

    /// Routes `model` to these sims, adding a backend `sim-PORT` for each one not yet added.
    pub fn sim_route(mut self, model: &str, sims: &[&Sim]) -> Self {
        let mut names = Vec::new();
        for sim in sims {
            let name = format!("sim-{}", sim.addr().port());
            if !self.raw.backends.iter().any(|b| b.name == name) {
                self = self.backend(&name, &sim.url());
            }
            names.push(name);
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.route(model, &names)
    }

    /// Adds a key `name` (secret `secret(name)`) allowed to use `models`.
    pub fn key(mut self, name: &str, models: &[&str]) -> Self {
        self.raw.keys.push(RawKey {
            name: name.into(),
            key_sha256: Some(nimgate::auth::digest_hex(&secret(name))),
            models: models.iter().map(|m| m.to_string()).collect(),
            ..RawKey::default()
        });
        self
    }

    /// Adds a key like `key` with request and token limits per minute.
    pub fn key_limited(self, name: &str, models: &[&str], rpm: Option<u64>, tpm: Option<u64>) -> Self {
        self.key_with_limits(
            name,
            models,
            RawLimits { requests_per_minute: rpm, tokens_per_minute: tpm, ..RawLimits::default() },
        )
    }

    /// Adds a key like `key` with `limits`.
    pub fn key_with_limits(mut self, name: &str, models: &[&str], limits: RawLimits) -> Self {
        self = self.key(name, models);
        if let Some(key) = self.raw.keys.last_mut() {
            key.limits = Some(limits);
        }
        self
    }

    pub fn max_body_bytes(mut self, bytes: u64) -> Self {
        self.raw.server.max_body_bytes = Some(bytes);
        self
    }

    /// Sets a variable in the environment the config is validated against (not the process's).
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.env.insert(name.into(), value.into());
        self
    }

    /// Changes the raw config directly, for fields without a helper.
    pub fn with(mut self, change: impl FnOnce(&mut RawConfig)) -> Self {
        change(&mut self.raw);
        self
    }

    /// The validated snapshot of this config (to put in force with `Gateway::replace`).
    pub fn snapshot(&self) -> nimgate::Snapshot {
        validate(&self.raw, &EnvSource::Map(self.env.clone())).expect("test config must be valid")
    }

    /// The config as written so far (to change and write for a reload).
    pub fn raw(&self) -> RawConfig {
        self.raw.clone()
    }

    /// Writes the config to a JSON file in a fresh directory and serves it from there, with
    /// hot reload on: the file watch, and `POST /admin/reload` on the admin listener.
    pub async fn start_from_file(self) -> FileGateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("nimgate.json");
        write_config(&path, &self.raw);
        let env = EnvSource::Map(self.env.clone());
        self.serve_file(dir, path, env).await
    }

    /// Serves the config file at `path` (already written) with hot reload on.
    pub async fn serve_file(self, dir: tempfile::TempDir, path: std::path::PathBuf, env: EnvSource) -> FileGateway {
        let snapshot = nimgate::reload::load_initial(&path, &env).expect("test config must be valid");
        let gw = TestGateway::launch(Launch { source: Some((path.clone(), env)), ..Launch::new(snapshot) }).await;
        let reloader = Arc::clone(gw.running.reloader().expect("started from a file"));
        FileGateway { gw, path, reloader, _dir: dir }
    }

    /// Validates the config and serves it on an ephemeral loopback port.
    pub async fn start(self) -> TestGateway {
        TestGateway::launch(Launch::new(self.snapshot())).await
    }
}

/// Writes `raw` as the JSON config file at `path`, in place.
pub fn write_config(path: &std::path::Path, raw: &RawConfig) {
    std::fs::write(path, serde_json::to_vec_pretty(raw).expect("config serializes")).expect("write config");
}

/// A gateway serving a config file, with hot reload on.
pub struct FileGateway {
    pub gw: TestGateway,
    pub path: std::path::PathBuf,
    pub reloader: Arc<Reloader>,
    _dir: tempfile::TempDir,
}

impl FileGateway {
    /// Writes a new config over the file (the watch reloads it).
    pub fn write(&self, raw: &RawConfig) {
        write_config(&self.path, raw);
    }

    /// `POST /admin/reload`.
    pub async fn admin_reload(&self) -> Reply {
        self.gw.admin_client().post("/admin/reload", "").await
    }

    /// The value of `nimgate_config_reloads_total{result="RESULT"}` on `/metrics`.
    pub async fn reloads(&self, result: &str) -> u64 {
        let text = self.gw.admin_client().get("/metrics").await.text();
        let series = format!("nimgate_config_reloads_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|line| line.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in {text}"))
    }
}

/// A gateway serving on loopback.
pub struct TestGateway {
    pub url: String,
    pub admin_url: String,
    pub running: Running,
    pub gateway: Arc<Gateway>,
}

impl TestGateway {
    /// Starts `launch` as the binary would, on ephemeral loopback ports.
    async fn launch(mut launch: Launch) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind gateway");
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
        launch.listeners = Some((listener, admin));
        let running = nimgate::start(launch).await.expect("start the gateway");
        TestGateway {
            url: format!("http://{}", running.addr()),
            admin_url: format!("http://{}", running.admin_addr()),
            gateway: Arc::clone(running.gateway()),
            running,
        }
    }

    /// A client presenting the key `name`.
    pub fn client(&self, name: &str) -> TestClient {
        TestClient::new(&self.url, Some(format!("Bearer {}", secret(name))))
    }

    /// A client of the admin listener.
    pub fn admin_client(&self) -> TestClient {
        TestClient::new(&self.admin_url, None)
    }

    /// `GET /admin/backends`, as JSON, the entry of backend `name`.
    pub async fn admin_backend(&self, name: &str) -> Value {
        let reply = self.admin_client().get("/admin/backends").await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()["backends"]
            .as_array()
            .and_then(|all| all.iter().find(|b| b["name"] == name).cloned())
            .unwrap_or_else(|| panic!("no backend {name} in {}", reply.text()))
    }

    /// A client sending no `Authorization` at all.
    pub fn anonymous(&self) -> TestClient {
        TestClient::new(&self.url, None)
    }

    /// A client sending this exact `Authorization` value.
    pub fn with_authorization(&self, value: &str) -> TestClient {
        TestClient::new(&self.url, Some(value.to_owned()))
    }
}

/// An HTTP/1.1 client for one gateway and one identity.
#[derive(Clone)]
pub struct TestClient {
    base: String,
    authorization: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
}

impl TestClient {
    pub fn new(base: &str, authorization: Option<String>) -> Self {
        let http = Client::builder(TokioExecutor::new()).build_http();
        Self { base: base.trim_end_matches('/').to_owned(), authorization, http }
    }

    /// A request to `path` with the client's identity and `extra` headers.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
        extra: &[(&str, &str)],
    ) -> Request<Full<Bytes>> {
        let mut builder = Request::builder().method(method).uri(format!("{}{path}", self.base));
        if let Some(auth) = &self.authorization {
            builder = builder.header("authorization", auth);
        }
        builder = builder.header("content-type", "application/json");
        for (name, value) in extra {
            builder = builder.header(*name, *value);
        }
        builder.body(Full::new(body.into())).expect("valid test request")
    }

    /// Sends and returns the response head with its body unread, for frame-by-frame reading.
    pub async fn send(&self, request: Request<Full<Bytes>>) -> http::Response<Incoming> {
        self.http.request(request).await.expect("the gateway answers")
    }

    /// Sends and reads the whole answer, or says how the exchange failed (no answer, or a body
    /// that broke), for tests that count failures instead of stopping at the first.
    pub async fn try_fetch(&self, request: Request<Full<Bytes>>) -> Result<Reply, String> {
        let response = self.http.request(request).await.map_err(|e| format!("no answer: {e}"))?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| format!("the body broke: {e}"))?.to_bytes();
        Ok(Reply { status: parts.status, headers: parts.headers, body })
    }

    /// Sends and reads the whole answer.
    pub async fn fetch(&self, request: Request<Full<Bytes>>) -> Reply {
        let response = self.send(request).await;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("read the whole body").to_bytes();
        Reply { status: parts.status, headers: parts.headers, body }
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        self.fetch(self.request(Method::POST, path, body, &[])).await
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.post(path, body.to_string()).await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.fetch(self.request(Method::GET, path, Bytes::new(), &[])).await
    }

    /// A non-streaming chat completion for `model`.
    pub async fn chat(&self, model: &str) -> Reply {
        self.post_json("/v1/chat/completions", &chat_body(model, false)).await
    }

    /// Starts a streaming chat completion for `model`; the body is read by the test.
    pub async fn chat_stream(&self, model: &str) -> http::Response<Incoming> {
        self.send(self.request(Method::POST, "/v1/chat/completions", chat_body(model, true).to_string(), &[])).await
    }
}

/// A minimal chat request body.
pub fn chat_body(model: &str, stream: bool) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": "Hello!" }], "stream": stream })
}

/// A complete answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts an OpenAI-shaped gateway error with this status and contract code, and returns
    /// its message.
    #[track_caller]
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status.as_u16(), status, "status; body: {}", self.text());
        assert_eq!(self.header("content-type"), Some("application/json"));
        let body = self.json();
        let error = &body["error"];
        assert_eq!(error["code"], code, "{body}");
        assert!(error["type"].is_string(), "{body}");
        assert!(error["param"].is_null(), "{body}");
        assert!(body.as_object().is_some_and(|o| o.len() == 1), "only `error` at the top: {body}");
        error["message"].as_str().expect("message is a string").to_owned()
    }
}

/// Reads the next data frame of a streaming body within `within`; `None` at the end.
pub async fn next_frame(body: &mut Incoming, within: Duration) -> Option<Bytes> {
    loop {
        let frame = tokio::time::timeout(within, body.frame()).await.expect("a frame arrives in time")?;
        let frame = frame.expect("the stream is not broken");
        if let Ok(data) = frame.into_data() {
            return Some(data);
        }
    }
}

/// Reads a streaming body to its end, returning each data frame as it arrived.
pub async fn all_frames(body: &mut Incoming) -> Vec<Bytes> {
    let mut frames = Vec::new();
    while let Some(frame) = next_frame(body, Duration::from_secs(10)).await {
        frames.push(frame);
    }
    frames
}

/// The SSE `data:` payloads in `text`, in order.
pub fn sse_data(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| event.lines().find_map(|line| line.strip_prefix("data: ")))
        .map(str::to_owned)
        .collect()
}

/// Waits until `condition` holds, checking every 10 ms; panics with `what` after `deadline`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    while !condition().await {
        assert!(start.elapsed() < deadline, "not within {deadline:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A header name/value pair for requests.
pub fn header(name: &'static str, value: &str) -> (HeaderName, HeaderValue) {
    (HeaderName::from_static(name), HeaderValue::from_str(value).expect("valid header value"))
}

/// Every sample of the exposition: `name{labels}` → value.
pub async fn scrape(gw: &TestGateway) -> (String, HashMap<String, f64>) {
    let reply = gw.admin_client().get("/metrics").await;
    assert_eq!(reply.status, 200);
    assert!(reply.header("content-type").unwrap().starts_with("text/plain"));
    let text = reply.text();
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' ').map(|(series, value)| (series.to_owned(), value.parse().unwrap())))
        .collect();
    (text, samples)
}

pub fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
    *samples.get(series).unwrap_or_else(|| {
        let mut known: Vec<&String> =
            samples.keys().filter(|k| k.starts_with(series.split('{').next().unwrap())).collect();
        known.sort();
        panic!("no sample {series}; the family has {known:#?}")
    })
}

/// A hostile or odd backend on loopback: answers every request, after `delay`, with `status`,
/// `headers` and `body` as given (absurd usage, odd `Retry-After`s, ...). Returns its URL.
pub async fn answering_backend(delay: Duration, status: u16, headers: &[(&str, &str)], body: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind backend");
    let url = format!("http://{}", listener.local_addr().expect("bound"));
    let headers: Vec<(String, String)> = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
    let answer = Arc::new((status, headers, Bytes::from(body.to_owned())));
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let answer = Arc::clone(&answer);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    let answer = Arc::clone(&answer);
                    async move {
                        // Read the request whole, as a backend would, before answering.
                        let _ = request.into_body().collect().await;
                        tokio::time::sleep(delay).await;
                        let mut response = http::Response::builder().status(answer.0);
                        for (name, value) in &answer.1 {
                            response = response.header(name, value);
                        }
                        Ok::<_, std::convert::Infallible>(
                            response.body(Full::new(answer.2.clone())).expect("valid test answer"),
                        )
                    }
                });
                let io = hyper_util::rt::TokioIo::new(socket);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    url
}

/// The gateway's log lines, written into memory by a subscriber set as the default of the
/// test's thread: `#[tokio::test]` runs the gateway's tasks on that thread too.
#[derive(Clone, Default)]
pub struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Logs {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures this thread's logs as JSON lines until the guard is dropped.
    pub fn capture_json(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        tracing::subscriber::set_default(tracing_subscriber::fmt().json().with_writer(move || writer.clone()).finish())
    }

    /// Captures this thread's logs as plain text lines (the default format, no colours).
    pub fn capture_text(&self) -> tracing::subscriber::DefaultGuard {
        let writer = self.clone();
        tracing::subscriber::set_default(
            tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish(),
        )
    }

    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The `fields` of each JSON line logged with `message`.
    pub fn with_message(&self, message: &str) -> Vec<serde_json::Value> {
        self.text()
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .filter(|line| line["fields"]["message"] == message)
            .map(|line| line["fields"].clone())
            .collect()
    }
}

/// A test CA and a leaf certificate it signed for `names` (host names or IP addresses): the
/// CA's PEM, the leaf's PEM and the leaf key's PEM.
pub fn test_pki(names: &[&str]) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().expect("a key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("a CA");
    let leaf_key = KeyPair::generate().expect("a key");
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let leaf = CertificateParams::new(names).expect("leaf params").signed_by(&leaf_key, &ca, &ca_key).expect("a leaf");
    (ca.pem(), leaf.pem(), leaf_key.serialize_pem())
}

/// More than a process's default 1,024 descriptors are needed: raise the soft limit to the hard.
pub fn raise_open_files_limit(wanted: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < wanted {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard.min(wanted), hard);
    }
    getrlimit(Resource::RLIMIT_NOFILE).unwrap().0
}
