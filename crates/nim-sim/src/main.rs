//! The `nim-sim` binary: a simulated NIM on a socket, for benchmarks, demos and manual tests.
//! Flags map one to one onto `SimOptions`; everything else lives in the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use nim_sim::{Failures, MetricsDialect, Sim, SimOptions, SimTls};

#[derive(Parser)]
#[command(name = "nim-sim", version, about = "A fast, deterministic simulated NVIDIA NIM (OpenAI-compatible)")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// A model to serve (repeatable). Default: meta/llama-3.1-8b-instruct.
    #[arg(long = "model")]
    models: Vec<String>,
    /// Latency to the first token, e.g. 50ms: the fixed part, before prefill.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    ttft: Duration,
    /// Prefill time per prompt token not in the KV cache (a token is 4 bytes), e.g. 200us.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    prefill_per_token: Duration,
    /// KV-cache capacity in tokens, for prompt-prefix caching (0 = no cache model).
    #[arg(long, default_value_t = 0)]
    kv_cache_tokens: u64,
    /// Tokens per KV-cache block; only whole blocks are cached.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    kv_block_tokens: u32,
    /// Names of /v1/metrics: nim1 (NIM 1.x), vllm or sglang (NIM 2.x passing its engine's).
    #[arg(long, default_value = "nim1")]
    metrics_dialect: MetricsDialect,
    /// Completion tokens per answer (capped by the request's max_tokens).
    #[arg(long, default_value_t = 16)]
    tokens: u32,
    /// Delay between stream chunks (one token each), e.g. 10ms.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    chunk_delay: Duration,
    /// Simulated GPU slots (0 = unlimited); others wait in a queue.
    #[arg(long, default_value_t = 0)]
    max_concurrency: usize,
    /// Bound of the waiting queue; beyond it requests get 429.
    #[arg(long)]
    max_queue: Option<usize>,
    /// Require `Authorization: Bearer KEY`.
    #[arg(long, env = "NIM_SIM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Fraction of requests answered with --error-status, 0 to 1 (deterministic: every 1/rate-th).
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    error_rate: f64,
    /// Status of injected errors.
    #[arg(long, default_value_t = 500)]
    error_status: u16,
    /// Send `Retry-After: SECS` with injected errors.
    #[arg(long)]
    retry_after: Option<u32>,
    /// Break the connection after N stream chunks (0: before any response).
    #[arg(long)]
    reset_after_chunks: Option<u32>,
    /// Stop sending after N stream chunks, keeping the connection open.
    #[arg(long)]
    stall_after_chunks: Option<u32>,
    /// End streams cleanly after N chunks, without their finish event or `data: [DONE]`.
    #[arg(long)]
    end_after_chunks: Option<u32>,
    /// Accept requests and never answer.
    #[arg(long)]
    hang: bool,
    /// Send every stream event as two frames, cut in the middle.
    #[arg(long)]
    split_events: bool,
    /// Dimension of embedding vectors.
    #[arg(long, default_value_t = 16)]
    embedding_dim: usize,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Runtime worker threads (one leaves the other cores to the gateway under test).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

/// Why the sim could not run.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("cannot start the runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start: {0}")]
    Start(std::io::Error),
}

fn parse_rate(value: &str) -> Result<f64, String> {
    let rate: f64 = value.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&rate) { Ok(rate) } else { Err("must be between 0 and 1".to_owned()) }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
        .map_err(RunError::Runtime)
        .and_then(|runtime| runtime.block_on(run(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nim-sim: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), RunError> {
    let read = |path: &PathBuf| {
        std::fs::read_to_string(path).map_err(|source| RunError::Read { path: path.display().to_string(), source })
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(SimTls { cert_pem: read(cert)?, key_pem: read(key)? }),
        _ => None,
    };
    let mut options = SimOptions {
        ttft: args.ttft,
        prefill_per_token: args.prefill_per_token,
        kv_cache_tokens: args.kv_cache_tokens,
        kv_block_tokens: args.kv_block_tokens,
        metrics_dialect: args.metrics_dialect,
        tokens: args.tokens,
        chunk_delay: args.chunk_delay,
        max_concurrency: args.max_concurrency,
        max_queue: args.max_queue,
        api_key: args.api_key,
        embedding_dim: args.embedding_dim,
        split_events: args.split_events,
        failures: Failures {
            error_rate: args.error_rate,
            error_status: args.error_status,
            retry_after: args.retry_after,
            reset_after_chunks: args.reset_after_chunks,
            stall_after_chunks: args.stall_after_chunks,
            end_after_chunks: args.end_after_chunks,
            hang: args.hang,
        },
        tls,
        ..SimOptions::default()
    };
    if !args.models.is_empty() {
        options.models = args.models;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| RunError::Listen { addr: args.listen, source })?;
    let sim = Sim::start_on(listener, options).await.map_err(RunError::Start)?;
    // Scripts wait for this line, so it must not sit in a buffer.
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "nim-sim listening on {}", sim.url());
    let _ = stdout.flush();
    drop(stdout);
    shutdown_signal().await;
    sim.stop().await;
    Ok(())
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
