//! The request path, top to bottom: identify the caller, read and peek the body, route, check
//! the ACL, admit under the key's limits, send upstream, and pass the answer back. Each step is
//! a call to the module that owns it, in order; every `?` is a refusal the contract names.
//! Every request ends in one response, counted and logged by its `Exchange`.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::time::Instant;

use crate::api::{self, Endpoint, Resource};
use crate::auth::KeyMemo;
use crate::config::Snapshot;
use crate::error::GatewayError;
use crate::exchange::{Ending, Exchange};
use crate::gateway::Gateway;
use crate::logsafe;
use crate::request;
use crate::streaming::{self, Origin, ResponseBody};
use crate::upstream::{self, Outgoing, Pick};

/// Serves one request on the snapshot in force when it arrived; `memo` is its client
/// connection's last authenticated key.
pub async fn serve(gateway: Arc<Gateway>, request: Request<Incoming>, memo: &KeyMemo) -> Response<ResponseBody> {
    let started = Instant::now();
    let snapshot = gateway.snapshot();
    let path = request.uri().path();
    let served = api::resource(path);
    let label = served.map_or("other", |(_, label)| label);
    let mut exchange = Exchange::new(request::request_id(request.headers()), request.method().clone(), label, started);
    let result = match served {
        _ if head_size(&request) > snapshot.server.max_header_bytes => {
            Err(GatewayError::HeaderTooLarge { limit: snapshot.server.max_header_bytes })
        }
        // Each resource's work is called from here, not through a dispatching async fn: a level
        // less to build and move the request's futures through on every request.
        Some((resource, _)) if *request.method() == resource.method() => match resource {
            Resource::Live => Ok(health(StatusCode::OK, "live")),
            Resource::Ready if gateway.is_draining() => Ok(health(StatusCode::SERVICE_UNAVAILABLE, "draining")),
            Resource::Ready => Ok(health(StatusCode::OK, "ready")),
            Resource::Models => models(&gateway, &snapshot, &request, memo, &mut exchange).await,
            Resource::Inference(endpoint) => infer(&gateway, &snapshot, request, endpoint, memo, &mut exchange).await,
        },
        Some((resource, _)) => Err(GatewayError::MethodNotAllowed {
            method: request.method().clone(),
            path: path.to_owned(),
            allow: resource.allow(),
        }),
        None => Err(GatewayError::UnknownPath(path.to_owned())),
    };
    let (mut response, error) = match result {
        Ok(response) => (response, None),
        Err(e) => (e.to_response(), Some(e)),
    };
    exchange.respond(&mut response, error.as_ref(), gateway.limiter(), gateway.metrics()).await;
    // An upstream answer finishes its exchange at its end, with its duration and tokens.
    if let Some(exchange) = response.body_mut().carry(exchange) {
        exchange.finish(&Ending { outcome: "complete", error: error.as_ref(), ..Ending::default() });
    }
    response
}

/// `GET /v1/models`: the models the key may use.
async fn models(
    gateway: &Gateway,
    snapshot: &Arc<Snapshot>,
    request: &Request<Incoming>,
    memo: &KeyMemo,
    exchange: &mut Exchange,
) -> Result<Response<ResponseBody>, GatewayError> {
    let key = snapshot.keys.authenticate_on(request.headers(), memo)?;
    exchange.key = Some(Arc::clone(&key));
    Ok(json(StatusCode::OK, gateway.catalog().list(snapshot, &key, &exchange.request_id).await))
}

/// A model-routed POST: chat completions, completions, embeddings.
async fn infer(
    gateway: &Gateway,
    snapshot: &Snapshot,
    request: Request<Incoming>,
    endpoint: Endpoint,
    memo: &KeyMemo,
    exchange: &mut Exchange,
) -> Result<Response<ResponseBody>, GatewayError> {
    let key = snapshot.keys.authenticate_on(request.headers(), memo)?;
    exchange.key = Some(Arc::clone(&key));
    let key = &key;
    // Before a byte of the body is read: a key its limits would refuse whatever it sends.
    let checked = gateway.limiter().precheck(key)?;

    let (parts, body) = request.into_parts();
    let mut lease = gateway.body_budget().lease(snapshot.server.header_read_timeout);
    let read = request::read_capped(body, &parts.headers, snapshot.server.max_body_bytes, &mut lease).await;
    if lease.waited {
        let result = if read.is_ok() { "admitted" } else { "refused" };
        gateway.metrics().body_budget_waits.with_label_values(&[result]).inc();
    }
    let body = read?;
    let head = request::peek(&body)?;
    let model = logsafe::clip(&head.model);
    exchange.model = Some(model.as_ref().into());

    let route = snapshot.routes.find(&head.model).ok_or_else(|| GatewayError::ModelNotFound(model.to_string()))?;
    exchange.route = Some(Arc::clone(route));
    if !key.allows(&head.model) {
        return Err(GatewayError::ModelNotAllowed(model.to_string()));
    }

    let estimate = head.token_estimate(body.len(), endpoint.completes(), snapshot.rate_limits.default_max_tokens);
    let admission = gateway.limiter().admit_checked(key, estimate.total(), checked).await?;
    exchange.admitted(admission.as_ref());

    let model = route.pattern.as_str();
    let outgoing = Outgoing {
        endpoint,
        client_headers: &parts.headers,
        request_id: &exchange.request_id,
        body: request::outgoing(route, endpoint, &head, &body, &key.priority),
    };
    // Hashed only for a route with prefix affinity: the others never look at the prompt. Seeded
    // by the model the backend sees: a cached prefix serves that model only.
    let prompt = route.pool.affinity().map(|settings| {
        let served = route.upstream_model.as_ref().map_or(&*head.model, |alias| alias.name.as_str());
        settings.blocks(served, &body, head.prompt_span.clone())
    });
    let pick = Pick { prompt: prompt.as_ref(), key: Some(key.name.shared()), weight: key.weight };
    let answer = upstream::send(&route.pool, pick, &outgoing, exchange.started, gateway.metrics(), model).await;
    // The body has gone upstream (or never will): its room is free for others.
    drop(lease);
    let answer = answer?;
    exchange.answered_by(&answer);

    let origin = Origin {
        metrics: gateway.metrics(),
        model,
        key: key.name.as_str(),
        started: exchange.started,
        stream: head.stream,
        estimate,
        endpoint,
    };
    Ok(streaming::forward(answer, admission.and_then(|a| a.permit), origin))
}

/// The request line and headers as they came, near enough: what `max_header_bytes` bounds.
fn head_size<B>(request: &Request<B>) -> usize {
    let line = request.method().as_str().len() + request.uri().path_and_query().map_or(1, |p| p.as_str().len()) + 11;
    request.headers().iter().fold(line, |size, (name, value)| size + name.as_str().len() + value.len() + 4)
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
