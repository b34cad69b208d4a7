//! The request path, top to bottom: identify the caller, read and peek the body, route, check
//! the ACL, forward, and pass the answer back. It calls the modules that own each step, in
//! order, and holds no policy itself. Every request ends here in one response and one access
//! log line.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::Gateway;
use crate::api::Endpoint;
use crate::auth::KeyName;
use crate::config::Snapshot;
use crate::error::GatewayError;
use crate::pool::BackendName;
use crate::proxy::{body, forward};
use crate::streaming::ResponseBody;

/// What the access log says about a request, filled in as the request goes.
#[derive(Default)]
struct Record {
    key: Option<KeyName>,
    model: Option<Box<str>>,
    backend: Option<BackendName>,
}

/// Serves one request on the snapshot in force when it arrived.
pub async fn serve(gateway: Arc<Gateway>, request: Request<Incoming>) -> Response<ResponseBody> {
    let started = Instant::now();
    let request_id = forward::request_id(request.headers());
    let snapshot = gateway.snapshot();
    let method = request.method().clone();
    let uri = request.uri().clone();
    let mut record = Record::default();
    let (mut response, error) = match dispatch(&gateway, &snapshot, request, &request_id, &mut record).await {
        Ok(response) => (response, None),
        Err(e) => (e.render(), Some(e)),
    };
    response.headers_mut().insert(forward::X_REQUEST_ID, request_id.clone());

    let status = response.status().as_u16();
    let request_id = request_id.to_str().unwrap_or("-");
    let key = record.key.as_ref().map_or("-", KeyName::as_str);
    let model = record.model.as_deref().unwrap_or("-");
    let backend = record.backend.as_ref().map_or("-", BackendName::as_str);
    // Logged when the head is ready: for a stream that is its time to first byte, not its
    // duration (the end-of-stream record arrives with the metrics work, #9).
    let ttfb_ms = started.elapsed().as_micros() as f64 / 1000.0;
    let path = uri.path();
    match &error {
        Some(e) if e.status().is_server_error() => tracing::warn!(
            target: "nimgate::access", request_id, %method, path, key, model, backend, status, ttfb_ms,
            code = e.code(), error = %e, "request failed"
        ),
        Some(e) => tracing::info!(
            target: "nimgate::access", request_id, %method, path, key, model, backend, status, ttfb_ms,
            code = e.code(), error = %e, "request refused"
        ),
        None => tracing::info!(
            target: "nimgate::access", request_id, %method, path, key, model, backend, status, ttfb_ms,
            "request"
        ),
    }
    response
}

async fn dispatch(
    gateway: &Gateway,
    snapshot: &Arc<Snapshot>,
    request: Request<Incoming>,
    request_id: &HeaderValue,
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
            record.key = Some(key.name.clone());
            Ok(json(StatusCode::OK, gateway.catalog().list(snapshot, key, request_id).await))
        }
        (&Method::POST, _) => match Endpoint::inference(path) {
            Some(endpoint) => infer(snapshot, request, endpoint, request_id, record).await,
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
    snapshot: &Snapshot,
    request: Request<Incoming>,
    endpoint: Endpoint,
    request_id: &HeaderValue,
    record: &mut Record,
) -> Result<Response<ResponseBody>, GatewayError> {
    let key = snapshot.keys.authenticate(request.headers())?;
    record.key = Some(key.name.clone());

    let (parts, incoming) = request.into_parts();
    let declared = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
    let body = body::read_capped(incoming, declared, snapshot.server.max_body_bytes).await?;
    let head = body::peek(&body)?;
    record.model = Some(head.model.as_ref().into());

    let route = snapshot.routes.find(&head.model).ok_or_else(|| GatewayError::ModelNotFound(head.model.to_string()))?;
    if !key.allows(&head.model) {
        return Err(GatewayError::ModelNotAllowed(head.model.to_string()));
    }

    let upstream_body = match &route.upstream_model {
        Some(alias) => forward::splice(&body, head.model_span.clone(), &alias.json),
        None => body.clone(),
    };
    let headers = forward::upstream_headers(&parts.headers, request_id);
    let (backend, upstream) = forward::send(&route.pool, endpoint, headers, upstream_body).await?;
    record.backend = Some(backend.name.clone());

    let mut response = upstream.map(ResponseBody::upstream);
    forward::strip_response_headers(response.headers_mut());
    Ok(response)
}

fn is_get_path(path: &str) -> bool {
    matches!(path, "/v1/models" | "/health/live" | "/health/ready" | "/v1/health/live" | "/v1/health/ready")
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
