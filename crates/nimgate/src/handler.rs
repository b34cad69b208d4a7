//! The request path, top to bottom: identify the caller, read and peek the body, route, check
//! the ACL, admit under the key's limits, forward, and pass the answer back (metered when the
//! key has a token limit). It calls the modules that own each step, in
//! order, and holds no policy itself. Every request ends here in one response and one access
//! log line.

use std::sync::Arc;
use tokio::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::Gateway;
use crate::access::{AccessRecord, Ending};
use crate::api::Endpoint;
use crate::config::Snapshot;
use crate::error::GatewayError;
use crate::limits::Quota;
use crate::metrics::NONE;
use crate::proxy::{body, forward};
use crate::streaming::{Forwarding, Meter, Observe, ResponseBody};

/// What is learnt about a request as it goes: its access-log record, and the key's quota for
/// the rate-limit headers.
struct Record {
    access: AccessRecord,
    /// The key's quota after admission.
    quota: Option<Quota>,
}

/// Serves one request on the snapshot in force when it arrived.
pub async fn serve(gateway: Arc<Gateway>, request: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    let request_id = forward::request_id(request.headers());
    let snapshot = gateway.snapshot();
    let access =
        AccessRecord::new(request_id.clone(), request.method().clone(), path_label(request.uri().path()), started);
    let mut record = Record { access, quota: None };
    let (mut response, error) = match dispatch(&gateway, &snapshot, request, &request_id, started, &mut record).await {
        Ok(response) => (response, None),
        Err(e) => (e.render(), Some(e)),
    };
    // Every answer to a limited key says where its limits stand; a 429 has written its own.
    if !matches!(error, Some(GatewayError::RateLimited { .. })) {
        let quota = match (record.quota, &record.access.key) {
            (Some(quota), _) => Some(quota),
            (None, Some(key)) => gateway.limiter().peek(key).await,
            (None, None) => None,
        };
        if let Some(quota) = quota {
            quota.write_headers(response.headers_mut());
        }
    }
    record.access.status = response.status().as_u16();
    record_metrics(&gateway, &record.access, error.as_ref());
    response.headers_mut().insert(forward::X_REQUEST_ID, request_id);
    // An upstream answer is logged at its end, with its duration and tokens; the rest now.
    if let Some(access) = response.body_mut().attach_access(record.access) {
        access.write(&Ending { outcome: "complete", error: error.as_ref(), ..Ending::default() });
    }
    response
}

/// `requests_total` and, for refusals, `rate_limited_total`. Labels come from the config only:
/// a model without a route is counted under `-`, never under the name the client sent.
fn record_metrics(gateway: &Gateway, record: &AccessRecord, error: Option<&GatewayError>) {
    let status = record.status;
    let metrics = gateway.metrics();
    let model = record.route.as_ref().map_or(NONE, |r| r.pattern.as_str());
    let key = record.key.as_ref().map_or(NONE, |k| k.name.as_str());
    let backend = match (&record.backend, error) {
        (Some(backend), _) => backend.as_str(),
        (
            None,
            Some(GatewayError::UpstreamUnavailable { backend, .. } | GatewayError::UpstreamTimeout { backend, .. }),
        ) => backend.as_str(),
        (None, _) => NONE,
    };
    metrics.request(model, backend, key, status);
    if let Some(GatewayError::RateLimited { limit, .. }) = error {
        metrics.rate_limited(key, limit.as_str());
    }
}

/// The request path as logged: one of the paths nimgate serves, or `other` (an unknown path
/// is named in its error). Static, so logging copies nothing.
fn path_label(path: &str) -> &'static str {
    match Endpoint::inference(path) {
        Some(endpoint) => endpoint.path(),
        None => match path {
            "/v1/models" => "/v1/models",
            "/health/live" => "/health/live",
            "/health/ready" => "/health/ready",
            "/v1/health/live" => "/v1/health/live",
            "/v1/health/ready" => "/v1/health/ready",
            _ => "other",
        },
    }
}

async fn dispatch(
    gateway: &Gateway,
    snapshot: &Arc<Snapshot>,
    request: Request<Incoming>,
    request_id: &HeaderValue,
    started: Instant,
    record: &mut Record,
) -> Result<Response<ResponseBody>, GatewayError> {
    let path = request.uri().path();
    match (request.method(), path) {
        (&Method::GET, "/health/live" | "/v1/health/live") => Ok(health(StatusCode::OK, "live")),
        (&Method::GET, "/health/ready" | "/v1/health/ready") => Ok(if gateway.is_draining() {
            health(StatusCode::SERVICE_UNAVAILABLE, "draining")
        } else {
            health(StatusCode::OK, "ready")
        }),
        (&Method::GET, "/v1/models") => {
            let key = snapshot.keys.authenticate(request.headers())?;
            record.access.key = Some(Arc::clone(key));
            Ok(json(StatusCode::OK, gateway.catalog().list(snapshot, key, request_id).await))
        }
        (&Method::POST, _) => match Endpoint::inference(path) {
            Some(endpoint) => infer(gateway, snapshot, request, endpoint, request_id, started, record).await,
            None if is_get_path(path) => Err(method_not_allowed(&request, "GET")),
            None => Err(GatewayError::UnknownPath(path.to_owned())),
        },
        _ if Endpoint::inference(path).is_some() => Err(method_not_allowed(&request, "POST")),
        _ if is_get_path(path) => Err(method_not_allowed(&request, "GET")),
        _ => Err(GatewayError::UnknownPath(path.to_owned())),
    }
}

/// A model-routed POST: chat completions, completions, embeddings.
async fn infer(
    gateway: &Gateway,
    snapshot: &Snapshot,
    request: Request<Incoming>,
    endpoint: Endpoint,
    request_id: &HeaderValue,
    started: Instant,
    record: &mut Record,
) -> Result<Response<ResponseBody>, GatewayError> {
    let key = snapshot.keys.authenticate(request.headers())?;
    record.access.key = Some(Arc::clone(key));

    let (parts, incoming) = request.into_parts();
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
    let body = body::read_capped(incoming, declared, snapshot.server.max_body_bytes).await?;
    let head = body::peek(&body)?;
    record.access.model = Some(head.model.as_ref().into());

    let route = snapshot.routes.find(&head.model).ok_or_else(|| GatewayError::ModelNotFound(head.model.to_string()))?;
    record.access.route = Some(Arc::clone(route));
    if !key.allows(&head.model) {
        return Err(GatewayError::ModelNotAllowed(head.model.to_string()));
    }

    let estimate =
        head.token_estimate(body.len(), endpoint != Endpoint::Embeddings, snapshot.rate_limits.default_max_tokens);
    let admission = gateway.limiter().admit(key, estimate.total()).await?;
    record.quota = admission.as_ref().map(|a| a.quota);
    let permit = admission.and_then(|a| a.permit);

    let mut edits = Vec::with_capacity(2);
    if let Some(alias) = &route.upstream_model {
        edits.push(forward::Edit { span: head.model_span.clone(), bytes: alias.json.clone() });
    }
    let plain = forward::splice(&body, &mut edits.clone());
    // Streams are counted (and token-limited ones settled) from their usage chunk: ask for it
    // if the client did not (it is removed from what the client sees).
    let with_usage = (head.stream && !head.wants_usage()).then(|| {
        edits.push(forward::request_usage(&body, &head.stream_options));
        forward::splice(&body, &mut edits)
    });
    let outgoing = forward::Outgoing {
        endpoint,
        client_headers: &parts.headers,
        request_id,
        body: forward::UpstreamBody { plain, with_usage },
    };
    let metrics = gateway.metrics();
    let model = route.pattern.as_str();
    let answer = forward::send(&route.pool, &outgoing, started, metrics, model).await?;
    let backend = answer.slot.backend();
    record.access.backend = Some(backend.name.clone());
    record.access.attempts = answer.attempts;
    let backend_label = backend.name.as_str();

    let success = answer.response.status().is_success();
    let sse = success && is_event_stream(answer.response.headers());
    let forwarding = Forwarding {
        meter: (permit.is_some() || success).then(|| Meter {
            permit,
            tokens: success.then(|| metrics.token_counters(model, key.name.as_str())),
            success,
            stream: head.stream,
            strip_usage_event: answer.usage_requested,
            prompt_estimate: estimate.prompt,
        }),
        sse,
        idle_timeout: backend.timeouts.idle,
        deadline: answer.deadline,
        observe: Observe {
            metrics: Arc::clone(metrics),
            started,
            first_byte: Some(metrics.ttfb(model, backend_label)),
            duration: Some(metrics.duration(model, backend_label)),
            chunk_gap: sse.then(|| metrics.chunk_gap(model, backend_label)),
        },
        slot: Some(answer.slot),
        lease: answer.lease,
    };
    let mut response = answer.response.map(|upstream| ResponseBody::upstream(upstream, forwarding));
    forward::strip_response_headers(response.headers_mut());
    Ok(response)
}

fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

fn is_get_path(path: &str) -> bool {
    Endpoint::inference(path).is_none() && path_label(path) != "other"
}

fn method_not_allowed(request: &Request<Incoming>, allow: &'static str) -> GatewayError {
    GatewayError::MethodNotAllowed { method: request.method().clone(), path: request.uri().path().to_owned(), allow }
}

fn health(status: StatusCode, state: &'static str) -> Response<ResponseBody> {
    json(status, Bytes::from(format!("{{\"status\":\"{state}\"}}")))
}

fn json(status: StatusCode, body: Bytes) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(body));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
