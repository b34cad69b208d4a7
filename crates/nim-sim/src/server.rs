//! The sim's HTTP side: accepting connections (plain or TLS, HTTP/1.1 and h2), dropping them all
//! at once on stop, and dispatching each request to what it answers. Inference requests pass
//! through authorization, failure injection, the GPU queue, prefill (the KV cache deciding how
//! much of it there is) and the configured latency before their answer. Kept apart from `reply`
//! so what is said and when it is said read separately.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::body::{InjectedReset, Script, SimBody, Stream};
use crate::metrics::{self, PrefixCache, Reading};
use crate::ranking::Ranking;
use crate::reply::{self, Api, InferRequest, Kind, Plan};
use crate::responses;
use crate::state::{RequestGuard, Shared, injects_error};
use crate::{RecordedRequest, SimOptions, SimTls};

/// The TLS side of a sim serving HTTPS: `SimTls`'s chain and key, ALPN h2 then http/1.1.
/// Fails with `InvalidInput` when the PEM does not parse or the key does not fit the chain.
pub fn tls_acceptor(files: &SimTls) -> std::io::Result<TlsAcceptor> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let certs = CertificateDer::pem_slice_iter(files.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("bad certificate PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid("the certificate PEM holds no certificate".to_owned()));
    }
    let key =
        PrivateKeyDer::from_pem_slice(files.key_pem.as_bytes()).map_err(|e| invalid(format!("bad key PEM: {e}")))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Runs hyper's spawned work (h2 streams) as tasks that end when the sim stops, so no request
/// outlives its sim, whatever the protocol.
#[derive(Clone)]
struct StoppableExecutor {
    shutdown: watch::Receiver<bool>,
}

impl<F> hyper::rt::Executor<F> for StoppableExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, future: F) {
        let mut shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = future => {}
                () = stopped(&mut shutdown) => {}
            }
        });
    }
}

/// Accepts until shut down, one task per connection. At the shutdown signal it closes the
/// listener, then aborts every connection task and returns once they are gone.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let executor = StoppableExecutor { shutdown: shutdown.clone() };
    let builder = Arc::new(auto::Builder::new(executor));
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = stopped(&mut shutdown) => break,
            // Reap finished connections so the set stays as large as the open ones.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve(stream, tls.clone(), Arc::clone(&builder), Arc::clone(&shared)));
                }
                // Out of file descriptors and the like: back off instead of spinning.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// One connection, from the TLS handshake (when serving HTTPS) to its end.
async fn serve(
    stream: TcpStream,
    tls: Option<TlsAcceptor>,
    builder: Arc<auto::Builder<StoppableExecutor>>,
    shared: Arc<Shared>,
) {
    // Small SSE events must leave at once, not wait for Nagle.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| handle(Arc::clone(&shared), request));
    match tls {
        None => {
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        }
        Some(acceptor) => {
            if let Ok(stream) = acceptor.accept(stream).await {
                let _ = builder.serve_connection(TokioIo::new(stream), service).await;
            }
        }
    }
}

/// Completes when the sim is stopped or dropped.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// A response, or `InjectedReset` to make hyper drop the connection without one.
type Answer = Result<Response<SimBody>, InjectedReset>;

/// What the sim serves at each path.
enum Endpoint {
    Models,
    Infer(Api),
    /// Anything else, with the message saying so.
    NotFound(String),
}

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Answer {
    let endpoint = match (request.method(), request.uri().path()) {
        (&Method::GET, "/v1/health/ready") => {
            return Ok(json(StatusCode::OK, r#"{"object":"health.response","message":"Service is ready."}"#));
        }
        (&Method::GET, "/v1/health/live") => {
            return Ok(json(StatusCode::OK, r#"{"object":"health.response","message":"Service is live."}"#));
        }
        // Open like health: Prometheus and load-aware balancers scrape it without a key.
        (&Method::GET, "/v1/metrics") => return Ok(metrics(&shared)),
        (&Method::GET, "/v1/models") => Endpoint::Models,
        (&Method::POST, "/v1/chat/completions") => Endpoint::Infer(Api::Chat),
        (&Method::POST, "/v1/completions") => Endpoint::Infer(Api::Completion),
        (&Method::POST, "/v1/responses") => Endpoint::Infer(Api::Responses),
        (&Method::POST, "/v1/embeddings") => Endpoint::Infer(Api::Embeddings),
        (&Method::POST, "/v1/ranking") => Endpoint::Infer(Api::Ranking),
        (method, path) => Endpoint::NotFound(format!("no route for {method} {path}")),
    };
    // The API key guards `/v1/*` (health and metrics answered above); other paths are unknown.
    let guarded = !matches!(endpoint, Endpoint::NotFound(_)) || request.uri().path().starts_with("/v1/");
    let authorized = !guarded || authorized(&shared, request.headers().get(AUTHORIZATION));
    let Some(body) = read(&shared, request).await else {
        return Ok(error(StatusCode::BAD_REQUEST, "could not read the request body"));
    };
    if !authorized {
        return Ok(error(StatusCode::UNAUTHORIZED, "invalid or missing API key"));
    }
    match endpoint {
        Endpoint::Models => Ok(json(StatusCode::OK, shared.models_json.clone())),
        Endpoint::Infer(api) => infer(shared, api, body).await,
        Endpoint::NotFound(message) => Ok(error(StatusCode::NOT_FOUND, &message)),
    }
}

/// Reads the body, keeping the request when recording. `None` if the body could not be read.
async fn read(shared: &Shared, request: Request<Incoming>) -> Option<Bytes> {
    let (parts, incoming) = request.into_parts();
    let body = incoming.collect().await.ok()?.to_bytes();
    if shared.options.record_requests {
        let path = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), |p| p.to_string());
        shared.record(RecordedRequest { method: parts.method, path, headers: parts.headers, body: body.clone() });
    }
    Some(body)
}

/// Whether the request may proceed: always without an `api_key`, else only with its bearer.
fn authorized(shared: &Shared, authorization: Option<&HeaderValue>) -> bool {
    let Some(expected) = shared.options.api_key.as_deref() else {
        return true;
    };
    let presented = authorization.and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    presented == Some(expected)
}

/// What an inference request asks the GPU for, its body checked.
enum Work {
    /// Tokens, as a chat completion or a completion.
    Generate(Kind),
    /// Tokens, as a Response.
    Respond,
    /// Embeddings of these texts.
    Embed(Vec<String>),
    /// Rankings of these passages.
    Rank(Ranking),
}

/// An inference request to `api`, already authorized.
async fn infer(shared: Arc<Shared>, api: Api, body: Bytes) -> Answer {
    let counters = &shared.counters;
    counters.requests.fetch_add(1, Ordering::Relaxed);
    // From here on, being dropped before `complete` or `refuse` means the client left.
    let guard = RequestGuard::new(&shared);
    let failures = shared.failures();
    let sequence = counters.sequence.fetch_add(1, Ordering::Relaxed);

    if failures.reset_after_chunks == Some(0) {
        counters.errors_injected.fetch_add(1, Ordering::Relaxed);
        guard.refuse();
        return Err(InjectedReset);
    }
    if injects_error(sequence, failures.error_rate) {
        counters.errors_injected.fetch_add(1, Ordering::Relaxed);
        guard.refuse();
        let status = match failures.error_status {
            0 => StatusCode::INTERNAL_SERVER_ERROR,
            code => StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        };
        let mut response = error(status, "injected failure");
        if let Some(secs) = failures.retry_after {
            response.headers_mut().insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return Ok(response);
    }
    if failures.hang {
        counters.errors_injected.fetch_add(1, Ordering::Relaxed);
        // Held until the client leaves; the guard then counts the cancellation.
        std::future::pending::<()>().await;
    }

    let request: InferRequest<'_> = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => {
            guard.refuse();
            return Ok(error(StatusCode::BAD_REQUEST, &format!("invalid JSON body: {e}")));
        }
    };
    let Some(model) = request.model.as_deref() else {
        guard.refuse();
        return Ok(error(StatusCode::BAD_REQUEST, "`model` is required"));
    };
    if !shared.options.models.iter().any(|m| m == model) {
        guard.refuse();
        return Ok(error(StatusCode::NOT_FOUND, &format!("The model `{model}` does not exist.")));
    }
    let checked = match api {
        Api::Chat => Ok(Work::Generate(Kind::Chat)),
        Api::Completion => Ok(Work::Generate(Kind::Completion)),
        Api::Responses => match request.input.as_ref().is_some_and(responses::is_input) {
            true => Ok(Work::Respond),
            false => Err("`input` must be a string or an array of input items"),
        },
        Api::Embeddings => match request.input.as_ref().and_then(reply::embedding_inputs) {
            Some(inputs) => Ok(Work::Embed(inputs)),
            None => Err("`input` must be a string, strings or token arrays"),
        },
        Api::Ranking => Ranking::read(request.query.as_ref(), request.passages.as_ref()).map(Work::Rank),
    };
    let work = match checked {
        Ok(work) => work,
        Err(message) => {
            guard.refuse();
            return Ok(error(StatusCode::BAD_REQUEST, message));
        }
    };
    let prompt_tokens = (body.len() as u64 / 4).max(1);

    let Ok(mut slot) = shared.gpu.acquire().await else {
        guard.refuse();
        return Ok(error(StatusCode::TOO_MANY_REQUESTS, "the request queue is full; retry later"));
    };
    counters.prompt_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
    // The prompt is extracted only for the cache model, so the cache-less hot path never reads it.
    let uncached = match shared.gpu.kv().and_then(|_| reply::prompt(&body, api)) {
        Some(prompt) => slot.prefill(|| prompt.as_ref(), prompt_tokens),
        None => prompt_tokens,
    };
    let first_token = time_to_first_token(&shared.options, uncached);

    let script: Box<dyn Script> = match work {
        Work::Embed(inputs) => {
            let base64 = request.encoding_format.as_deref() == Some("base64");
            sleep(first_token).await;
            drop(slot);
            let answer = reply::embeddings_answer(model, &inputs, shared.options.embedding_dim, base64, prompt_tokens);
            return Ok(answer_response(answer, guard));
        }
        Work::Rank(ranking) => {
            sleep(first_token).await;
            drop(slot);
            return Ok(answer_response(ranking.answer(prompt_tokens), guard));
        }
        Work::Generate(kind) => {
            Box::new(Plan::new(kind, sequence, model, &request, shared.options.tokens, prompt_tokens))
        }
        Work::Respond => {
            let cached = prompt_tokens.saturating_sub(uncached);
            Box::new(responses::Plan::new(sequence, model, &request, shared.options.tokens, prompt_tokens, cached))
        }
    };
    if request.stream.unwrap_or(false) {
        let stream = Stream::new(Arc::clone(&shared), script, &failures, guard, slot, first_token);
        let mut response = Response::new(SimBody::Stream(Box::new(stream)));
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        response.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(response);
    }

    let tokens = script.tokens();
    sleep(first_token + shared.options.chunk_delay * tokens).await;
    counters.generation_tokens.fetch_add(u64::from(tokens), Ordering::Relaxed);
    drop(slot);
    let answer = script.answer();
    if failures.stall_after_chunks.is_some() {
        counters.errors_injected.fetch_add(1, Ordering::Relaxed);
        return Ok(with_length(SimBody::Stalled { _held: guard }, answer.len()));
    }
    if failures.reset_after_chunks.is_some() {
        counters.errors_injected.fetch_add(1, Ordering::Relaxed);
        guard.refuse();
        return Ok(with_length(SimBody::broken(&answer), answer.len()));
    }
    Ok(answer_response(answer, guard))
}

/// A 200 JSON inference answer that completes `guard` as it goes out.
fn answer_response(answer: Bytes, guard: RequestGuard) -> Response<SimBody> {
    with_length(SimBody::answer(answer.clone(), guard), answer.len())
}

/// A 200 JSON response whose `Content-Length` is `length`, whatever the body then sends.
fn with_length(body: SimBody, length: usize) -> Response<SimBody> {
    let mut response = Response::new(body);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(length));
    response
}

/// The fixed part of the time to first token plus prefill of the `uncached` prompt tokens.
fn time_to_first_token(options: &SimOptions, uncached: u64) -> Duration {
    let prefill = options.prefill_per_token.saturating_mul(u32::try_from(uncached).unwrap_or(u32::MAX));
    options.ttft.saturating_add(prefill)
}

/// Sleeps, without touching the timer when there is nothing to wait for.
async fn sleep(duration: Duration) {
    if !duration.is_zero() {
        tokio::time::sleep(duration).await;
    }
}

fn metrics(shared: &Shared) -> Response<SimBody> {
    let stats = shared.stats();
    let model = shared.options.models.first().map_or("", String::as_str);
    let reading = Reading {
        running: stats.running,
        waiting: stats.waiting,
        kv_usage: shared.gpu.usage(),
        prompt_tokens: stats.prompt_tokens,
        generation_tokens: stats.generation_tokens,
        completed: stats.completed,
        prefix_cache: shared
            .gpu
            .kv()
            .map(|_| PrefixCache { queried_tokens: stats.prefix_cache_queries, hit_tokens: stats.prefix_cache_hits }),
    };
    let text = metrics::page(shared.options.metrics_dialect, model, &reading);
    let mut response = Response::new(SimBody::full(text));
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    response
}

fn json(status: StatusCode, body: impl Into<Bytes>) -> Response<SimBody> {
    let mut response = Response::new(SimBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// NIM's error envelope with `status`.
fn error(status: StatusCode, message: &str) -> Response<SimBody> {
    json(status, reply::error_body(status.as_u16(), message))
}
