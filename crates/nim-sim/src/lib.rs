//! nim-sim: a fast, deterministic simulated NVIDIA NIM for tests, demos and benchmarks.
//!
//! It speaks NIM's OpenAI-compatible API (chat completions and completions, JSON and SSE,
//! embeddings, `/v1/models`, health) and NIM's Prometheus `/v1/metrics`, fed by a simulated GPU
//! with a concurrency limit and a waiting queue. Latency, answer length and failures (error
//! statuses, resets, stalls, hangs) are set by `SimOptions`. Everything it says is derived from
//! counters, never from randomness, so a test can predict it exactly.
//!
//! Modules: `server` (listener, connections, dispatch), `reply` (what each endpoint answers),
//! `body` (the streamed response body), `gpu` (slots and queue), `state` (shared counters).

mod body;
mod gpu;
mod reply;
mod server;
mod state;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use state::Shared;

/// How a simulated NIM behaves.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Models served; requests for others get NIM's 404.
    pub models: Vec<String>,
    /// Time before the first token (streams: before the first event; non-streams: added to
    /// the generation time).
    pub ttft: Duration,
    /// Completion tokens per answer, capped by the request's `max_tokens`.
    pub tokens: u32,
    /// Time between tokens (one token per stream chunk).
    pub chunk_delay: Duration,
    /// Simulated GPU slots; 0 = unlimited. A request holds one while it generates.
    pub max_concurrency: usize,
    /// Bound of the waiting queue; a request arriving when it is full gets 429.
    pub max_queue: Option<usize>,
    /// When set, `/v1/*` except health requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Keep every request for `Sim::recorded`.
    pub record_requests: bool,
    /// Each stream content chunk waits for a permit from `Sim::release_chunks`.
    pub gated_chunks: bool,
    /// Send every stream event as two frames, cut in the middle, a few milliseconds apart
    /// (tests of clients and proxies that must join events across frames).
    pub split_events: bool,
    pub embedding_dim: usize,
    pub failures: Failures,
    /// Serve HTTPS (h2 and HTTP/1.1 by ALPN).
    pub tls: Option<SimTls>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            models: vec!["meta/llama-3.1-8b-instruct".to_owned()],
            ttft: Duration::ZERO,
            tokens: 16,
            chunk_delay: Duration::ZERO,
            max_concurrency: 0,
            max_queue: None,
            api_key: None,
            record_requests: false,
            gated_chunks: false,
            split_events: false,
            embedding_dim: 16,
            failures: Failures::default(),
            tls: None,
        }
    }
}

/// A certificate chain and private key, PEM.
#[derive(Clone, Default)]
pub struct SimTls {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for SimTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimTls { .. }")
    }
}

/// Failure injection, changeable at run time with `Sim::set_failures`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Failures {
    /// Fraction of inference requests answered with `error_status`, deterministically:
    /// request n (0-based) fails iff floor((n+1)·rate) > floor(n·rate).
    pub error_rate: f64,
    /// Status of injected errors; 0 means 500.
    pub error_status: u16,
    /// `Some(0)`: close the connection without any response. `Some(n)`: streams send n content
    /// chunks and then break the connection; non-streams send half their body and break it.
    pub reset_after_chunks: Option<u32>,
    /// Streams send n content chunks and then nothing more; non-streams send the head only.
    pub stall_after_chunks: Option<u32>,
    /// Accept requests and never answer.
    pub hang: bool,
}

/// Counters since the sim started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Inference requests received (chat, completions, embeddings), failed ones included.
    pub requests: u64,
    /// Inference answers sent to their end.
    pub completed: u64,
    /// Inference requests whose client left before the answer ended.
    pub cancelled: u64,
    pub errors_injected: u64,
    /// GPU slots held now.
    pub running: u64,
    /// Requests waiting for a GPU slot now.
    pub waiting: u64,
    /// Stream content chunks produced.
    pub chunks_sent: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: http::Method,
    /// Path and query.
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
}

/// A running simulated NIM. Dropping it stops it, like `stop`.
pub struct Sim {
    addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
}

impl Sim {
    /// Starts a sim on an ephemeral loopback port.
    pub async fn start(options: SimOptions) -> std::io::Result<Sim> {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await?, options).await
    }

    /// Starts a sim on `listener`.
    pub async fn start_on(listener: TcpListener, options: SimOptions) -> std::io::Result<Sim> {
        let addr = listener.local_addr()?;
        let tls = match &options.tls {
            Some(files) => Some(server::tls_acceptor(files)?),
            None => None,
        };
        let is_tls = tls.is_some();
        let shared = Arc::new(Shared::new(options));
        let (shutdown, watch) = watch::channel(false);
        let accept = tokio::spawn(server::accept_loop(listener, tls, Arc::clone(&shared), watch));
        Ok(Sim { addr, tls: is_tls, shared, shutdown, accept: Some(accept) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, or `https://localhost:PORT` with TLS (so a certificate for
    /// `localhost` verifies).
    pub fn url(&self) -> String {
        if self.tls { format!("https://localhost:{}", self.addr.port()) } else { format!("http://{}", self.addr) }
    }

    pub fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    /// Every request received, when `record_requests` is on.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.shared.recorded()
    }

    pub fn set_failures(&self, failures: Failures) {
        self.shared.set_failures(failures);
    }

    /// Lets `n` more gated stream chunks go.
    pub fn release_chunks(&self, n: usize) {
        self.shared.gate.add_permits(n);
    }

    /// Stops accepting and drops every open connection at once, like a killed process.
    pub async fn stop(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}
