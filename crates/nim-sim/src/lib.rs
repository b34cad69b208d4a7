//! nim-sim: a fast, deterministic simulated NVIDIA NIM for tests, demos and benchmarks.
//!
//! It speaks NIM's OpenAI-compatible API (chat completions and completions, JSON and SSE,
//! OpenAI's Responses API, JSON and typed SSE events, embeddings, `/v1/models`, health), NIM's
//! reranking API (`/v1/ranking`) and NIM's Prometheus `/v1/metrics` (NIM 1.x's names, or
//! vLLM's or SGLang's as NIM 2.x passes them through), fed by a simulated GPU with a concurrency
//! limit, a waiting queue and optionally a KV cache of prompt prefixes that shortens the time to
//! first token of a prompt starting like a recent one. Latency, answer length and failures (error
//! statuses, resets, stalls, hangs) are set by `SimOptions`. Everything it says is derived from
//! counters, never from randomness, so a test can predict it exactly.
//!
//! Modules: `server` (listener, connections, dispatch), `reply` (what each endpoint answers),
//! `responses` (the Responses API's object and typed events), `ranking` (reranking and its
//! logits), `metrics` (the Prometheus page in each dialect), `body` (response bodies, the stream's timing
//! and its injected failures), `gpu` (slots, queue, and the cache blocks a slot holds), `kv` (the
//! prefix-block cache), `state` (shared counters, the request guard behind `completed` and
//! `cancelled`).

mod body;
mod gpu;
mod kv;
mod metrics;
mod ranking;
mod reply;
mod responses;
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
    /// Time before the first token: its fixed part, to which `prefill_per_token` adds. Streams
    /// send their headers at once and hold the first event (the role chunk, as vLLM does) for
    /// it, except the Responses API's `response.created` and `response.in_progress`, sent at once
    /// as OpenAI and vLLM send them; non-streams add it to the generation time.
    pub ttft: Duration,
    /// Prefill time per prompt token the KV cache does not hold (every token without the cache
    /// model), added to `ttft`. Prompt tokens are a quarter of the request body's bytes.
    pub prefill_per_token: Duration,
    /// Capacity of the simulated GPU's KV cache of prompt-prefix blocks, in tokens; 0 = no cache
    /// model (nothing is hashed). The prompt is the raw JSON of `messages` (chat), `prompt`
    /// (completions), `instructions` then `input` (Responses) or `input` (embeddings) as sent;
    /// reranking neither looks up nor fills the cache. 4 bytes a token, cut into blocks of
    /// `kv_block_tokens`, each block's hash chained with the one before; a request's cached
    /// prefix is its longest run of leading blocks found in the cache. Blocks running requests
    /// hold are never evicted; the others go least recently used first.
    pub kv_cache_tokens: u64,
    /// Tokens per KV-cache block (vLLM's default is 16); at least 1 when the cache is on.
    pub kv_block_tokens: u32,
    /// Completion tokens per answer, capped by the request's `max_completion_tokens` or
    /// `max_tokens` (the answer then finishes with `length`), or for the Responses API by
    /// `max_output_tokens` (the response is then `incomplete`).
    pub tokens: u32,
    /// Time between tokens (one token per stream chunk).
    pub chunk_delay: Duration,
    /// Simulated GPU slots; 0 = unlimited. A request holds one while it generates.
    pub max_concurrency: usize,
    /// Bound of the waiting queue; a request arriving when it is full gets 429.
    pub max_queue: Option<usize>,
    /// The names `/v1/metrics` uses.
    pub metrics_dialect: MetricsDialect,
    /// When set, `/v1/*` except health requires `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Keep every request for `Sim::recorded`.
    pub record_requests: bool,
    /// Each stream content chunk waits for a permit from `Sim::release_chunks`.
    pub gated_chunks: bool,
    /// Send every stream event as two frames, cut in the middle, a few milliseconds apart
    /// (tests of clients and proxies that must join events across frames).
    pub split_events: bool,
    /// Dimension of embedding vectors.
    pub embedding_dim: usize,
    /// Failure injection at start; change it later with `Sim::set_failures`.
    pub failures: Failures,
    /// Serve HTTPS (h2 and HTTP/1.1 by ALPN).
    pub tls: Option<SimTls>,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            models: vec!["meta/llama-3.1-8b-instruct".to_owned()],
            ttft: Duration::ZERO,
            prefill_per_token: Duration::ZERO,
            kv_cache_tokens: 0,
            kv_block_tokens: 16,
            tokens: 16,
            chunk_delay: Duration::ZERO,
            max_concurrency: 0,
            max_queue: None,
            metrics_dialect: MetricsDialect::Nim1,
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

/// The names of `/v1/metrics`: NIM 1.x's own, or those of the engine a NIM 2.x passes through.
/// Every dialect reports the same figures: requests running and waiting, KV-cache usage, prompt
/// and generation tokens, completed requests and the prefix cache's queries and hits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MetricsDialect {
    /// `num_requests_running`, `num_requests_waiting`, `gpu_cache_usage_perc`, ...; adds
    /// `prefix_cache_queries_total` and `prefix_cache_hits_total` only with the cache model on,
    /// so the page without it stays what it always was.
    #[default]
    Nim1,
    /// `vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`,
    /// `vllm:prefix_cache_queries_total`, `vllm:prefix_cache_hits_total`, ...
    Vllm,
    /// `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:token_usage`,
    /// `sglang:cache_hit_rate`, `sglang:cached_tokens_total`, ...
    Sglang,
}

impl std::str::FromStr for MetricsDialect {
    type Err = String;

    /// `nim1`, `vllm` or `sglang`.
    fn from_str(name: &str) -> Result<Self, String> {
        match name {
            "nim1" => Ok(Self::Nim1),
            "vllm" => Ok(Self::Vllm),
            "sglang" => Ok(Self::Sglang),
            other => Err(format!("unknown metrics dialect `{other}`: expected nim1, vllm or sglang")),
        }
    }
}

/// A certificate chain and private key, PEM, for a sim serving HTTPS. `Debug` hides both.
#[derive(Clone, Default)]
pub struct SimTls {
    /// The certificate chain, leaf first.
    pub cert_pem: String,
    /// The private key: PKCS#8, PKCS#1 or SEC1.
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
    /// `Retry-After` (seconds) sent with injected error statuses, as an overloaded NIM or the
    /// hosted API sends it with 429 and 503.
    pub retry_after: Option<u32>,
    /// `Some(0)`: close the connection without any response (h2: reset the stream).
    /// `Some(n)`: streams send min(n, tokens) content chunks and then break the connection, never
    /// finishing; non-streams send their head and half their body, then break it. Applies to
    /// inference requests only, so health checks keep passing.
    pub reset_after_chunks: Option<u32>,
    /// Streams send min(n, tokens) content chunks and then nothing more; non-streams send the
    /// head only. Either holds until the client leaves (counted as cancelled).
    pub stall_after_chunks: Option<u32>,
    /// Streams send min(n, tokens) content chunks and then end cleanly, without their finish
    /// event or `data: [DONE]` (Responses: without `response.output_text.done` and what follows,
    /// the terminal `response.completed` among them): a stream that looks whole to HTTP but is
    /// not.
    pub end_after_chunks: Option<u32>,
    /// Accept inference requests and never answer, until the client leaves (counted as
    /// cancelled).
    pub hang: bool,
}

/// Counters since the sim started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Inference requests received (chat, completions, Responses, embeddings, rankings) past
    /// the API key check, failed ones included.
    pub requests: u64,
    /// Inference answers sent to their end.
    pub completed: u64,
    /// Inference requests whose client left before the answer ended.
    pub cancelled: u64,
    /// Requests on which a failure was injected: error statuses, resets, stalls and hangs.
    pub errors_injected: u64,
    /// GPU slots held now.
    pub running: u64,
    /// Requests waiting for a GPU slot now.
    pub waiting: u64,
    /// Stream content chunks produced (one per token: Responses count their text deltas).
    pub chunks_sent: u64,
    /// Prompt tokens of requests that reached the GPU (a quarter of the body bytes, at least 1).
    pub prompt_tokens: u64,
    /// Completion tokens generated (streams count each chunk as it is produced).
    pub generation_tokens: u64,
    /// Prompt tokens looked up in the KV cache, as vLLM's `prefix_cache_queries` (0 without the
    /// cache model).
    pub prefix_cache_queries: u64,
    /// Of those, tokens found cached (whole leading blocks), as vLLM's `prefix_cache_hits`.
    pub prefix_cache_hits: u64,
    /// Tokens of the blocks in the KV cache now, whether a running request holds them or not.
    pub kv_cached_tokens: u64,
}

impl SimStats {
    /// `prefix_cache_hits / prefix_cache_queries`, 0 before any query.
    pub fn prefix_cache_hit_rate(&self) -> f64 {
        match self.prefix_cache_queries {
            0 => 0.0,
            queries => self.prefix_cache_hits as f64 / queries as f64,
        }
    }
}

/// One request as received (`SimOptions::record_requests`), any path, refused ones included.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The request method.
    pub method: http::Method,
    /// Path and query.
    pub path: String,
    /// Headers as received.
    pub headers: http::HeaderMap,
    /// The whole body.
    pub body: bytes::Bytes,
}

/// A running simulated NIM. Dropping it stops it, like `stop` but without waiting.
pub struct Sim {
    addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    /// Sending `true` (or dropping it) ends the accept loop and every connection.
    shutdown: watch::Sender<bool>,
    accept: Option<JoinHandle<()>>,
}

impl Sim {
    /// Starts a sim on an ephemeral loopback port. Fails only if no port can be bound, or with
    /// `InvalidInput` as `start_on` does.
    pub async fn start(options: SimOptions) -> std::io::Result<Sim> {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await?, options).await
    }

    /// Starts a sim on `listener`. Fails with `InvalidInput` when the TLS material does not
    /// parse or the KV cache is on with blocks of 0 tokens.
    pub async fn start_on(listener: TcpListener, options: SimOptions) -> std::io::Result<Sim> {
        let addr = listener.local_addr()?;
        if options.kv_cache_tokens > 0 && options.kv_block_tokens == 0 {
            let message = "kv_block_tokens must be at least 1 when kv_cache_tokens is set";
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, message));
        }
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

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`, or with TLS `https://localhost:PORT` when listening on loopback or
    /// every interface (so a certificate for `localhost` verifies).
    pub fn url(&self) -> String {
        let ip = self.addr.ip();
        match self.tls {
            true if ip.is_loopback() || ip.is_unspecified() => format!("https://localhost:{}", self.addr.port()),
            true => format!("https://{}", self.addr),
            false => format!("http://{}", self.addr),
        }
    }

    /// A snapshot of the counters, the prefix cache's hit figures among them.
    pub fn stats(&self) -> SimStats {
        self.shared.stats()
    }

    /// Every request received, in order, when `record_requests` is on; empty otherwise.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.shared.recorded()
    }

    /// Replaces the failure injection for requests arriving from now on.
    pub fn set_failures(&self, failures: Failures) {
        self.shared.set_failures(failures);
    }

    /// Lets `n` more gated stream chunks go (`gated_chunks`), across all streams.
    pub fn release_chunks(&self, n: usize) {
        self.shared.gate.add_permits(n);
    }

    /// Stops accepting and drops every open connection at once, like a killed process. Returns
    /// once the port is closed and every connection is gone.
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
