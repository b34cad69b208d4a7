//! The sim's HTTP side: accepting connections (plain or TLS, HTTP/1.1 and h2), dropping them all
//! at once on stop, and dispatching each request to what it answers. Inference requests pass
//! through failure injection, the GPU queue and the configured latency before their answer.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::body::{InjectedReset, SimBody, Stream};
use crate::reply::{self, InferRequest, Kind, Plan};
use crate::state::{RequestGuard, Shared, injects_error};
use crate::{RecordedRequest, SimTls};

pub fn tls_acceptor(files: &SimTls) -> std::io::Result<TlsAcceptor> {
    let invalid = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
    let certs = CertificateDer::pem_slice_iter(files.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("bad certificate PEM: {e}")))?;
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

/// Accepts until shut down; every connection task ends (abruptly) at the same signal.
pub async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stopped(&mut shutdown) => return,
        };
        let _ = stream.set_nodelay(true);
        let (builder, shared, tls, mut shutdown) =
            (Arc::clone(&builder), Arc::clone(&shared), tls.clone(), shutdown.clone());
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let shared = Arc::clone(&shared);
                async move { handle(shared, request).await }
            });
            let serve = async {
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
            };
            tokio::select! {
                () = serve => {}
                _ = stopped(&mut shutdown) => {}
            }
        });
    }
}

/// Completes when the sim is stopped or dropped.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}

type Answer = Result<Response<SimBody>, InjectedReset>;

async fn handle(shared: Arc<Shared>, request: Request<Incoming>) -> Answer {
    let kind = match (request.method(), request.uri().path()) {
        (&Method::GET, "/v1/health/ready") => {
            return Ok(json(StatusCode::OK, r#"{"object":"health.response","message":"Service is ready."}"#));
        }
        (&Method::GET, "/v1/health/live") => {
            return Ok(json(StatusCode::OK, r#"{"object":"health.response","message":"Service is live."}"#));
        }
        (&Method::GET, "/v1/metrics") => return Ok(metrics(&shared)),
        (&Method::GET, "/v1/models") => {
            let authorization = request.headers().get(AUTHORIZATION).cloned();
            record(&shared, request).await;
            return Ok(match authorized_or(&shared, authorization.as_ref()) {
                Some(refusal) => refusal,
                None => json(StatusCode::OK, shared.models_json.clone()),
            });
        }
        (&Method::POST, "/v1/chat/completions") => Some(Kind::Chat),
        (&Method::POST, "/v1/completions") => Some(Kind::Completion),
        (&Method::POST, "/v1/embeddings") => None,
        (_, path) => {
            let message = format!("no route for {} {path}", request.method());
            return Ok(error(StatusCode::NOT_FOUND, &message));
        }
    };
    let authorization = request.headers().get(AUTHORIZATION).cloned();
    let Some(body) = record(&shared, request).await else {
        return Ok(error(StatusCode::BAD_REQUEST, "could not read the request body"));
    };
    infer(shared, kind, authorization, body).await
}

/// Reads the body, keeping the request when recording. `None` if the body could not be read.
async fn record(shared: &Shared, request: Request<Incoming>) -> Option<Bytes> {
    let (parts, incoming) = request.into_parts();
    let body = incoming.collect().await.ok()?.to_bytes();
    if shared.options.record_requests {
        let path = parts.uri.path_and_query().map_or_else(|| parts.uri.path().to_owned(), |p| p.to_string());
        shared.record(RecordedRequest { method: parts.method, path, headers: parts.headers, body: body.clone() });
    }
    Some(body)
}

/// `None` when the request may proceed, otherwise the 401 to answer.
fn authorized_or(shared: &Shared, authorization: Option<&HeaderValue>) -> Option<Response<SimBody>> {
    let expected = shared.options.api_key.as_deref()?;
    let presented = authorization.and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    (presented != Some(expected)).then(|| error(StatusCode::UNAUTHORIZED, "invalid or missing API key"))
}

/// A chat completion, completion or embeddings request (`kind` None).
async fn infer(shared: Arc<Shared>, kind: Option<Kind>, authorization: Option<HeaderValue>, body: Bytes) -> Answer {
    let counters = &shared.counters;
    counters.requests.fetch_add(1, Ordering::Relaxed);
    let guard = RequestGuard::new(&shared);
    if let Some(refusal) = authorized_or(&shared, authorization.as_ref()) {
        guard.refuse();
        return Ok(refusal);
    }

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
        let status = StatusCode::from_u16(failures.error_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let status = if failures.error_status == 0 { StatusCode::INTERNAL_SERVER_ERROR } else { status };
        return Ok(error(status, "injected failure"));
    }
    if failures.hang {
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
    let prompt_tokens = (body.len() as u64 / 4).max(1);

    let Ok(slot) = shared.gpu.acquire().await else {
        guard.refuse();
        return Ok(error(StatusCode::TOO_MANY_REQUESTS, "the request queue is full; retry later"));
    };
    counters.prompt_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);

    let Some(kind) = kind else {
        let Some(inputs) = request.input.as_ref().and_then(reply::embedding_inputs) else {
            guard.refuse();
            return Ok(error(StatusCode::BAD_REQUEST, "`input` must be a string, strings or token arrays"));
        };
        let base64 = request.encoding_format.as_deref() == Some("base64");
        sleep(shared.options.ttft).await;
        let answer = reply::embeddings_answer(model, &inputs, shared.options.embedding_dim, base64, prompt_tokens);
        guard.complete();
        return Ok(json(StatusCode::OK, answer));
    };

    let plan = Plan::new(kind, sequence, model, &request, shared.options.tokens, prompt_tokens);
    if request.stream.unwrap_or(false) {
        let mut response =
            Response::new(SimBody::Stream(Box::new(Stream::new(Arc::clone(&shared), plan, guard, slot))));
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        response.headers_mut().insert("cache-control", HeaderValue::from_static("no-cache"));
        return Ok(response);
    }

    sleep(shared.options.ttft + shared.options.chunk_delay * plan.tokens).await;
    counters.generation_tokens.fetch_add(plan.completion_tokens(), Ordering::Relaxed);
    let answer = plan.answer();
    drop(slot);
    if failures.stall_after_chunks.is_some() {
        return Ok(with_length(SimBody::Stalled { _held: guard }, answer.len()));
    }
    if failures.reset_after_chunks.is_some() {
        counters.errors_injected.fetch_add(1, Ordering::Relaxed);
        guard.refuse();
        let half = answer.slice(..answer.len() / 2);
        return Ok(with_length(SimBody::Broken(Some(half)), answer.len()));
    }
    guard.complete();
    Ok(json(StatusCode::OK, answer))
}

fn with_length(body: SimBody, length: usize) -> Response<SimBody> {
    let mut response = Response::new(body);
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(length));
    response
}

async fn sleep(duration: std::time::Duration) {
    if !duration.is_zero() {
        tokio::time::sleep(duration).await;
    }
}

fn metrics(shared: &Shared) -> Response<SimBody> {
    let stats = shared.stats();
    let model = shared.options.models.first().map_or("", String::as_str);
    let text = reply::metrics(
        model,
        stats.running,
        stats.waiting,
        shared.gpu.usage(),
        stats.prompt_tokens,
        stats.generation_tokens,
        stats.completed,
    );
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

fn error(status: StatusCode, message: &str) -> Response<SimBody> {
    json(status, reply::error_body(status.as_u16(), message))
}
