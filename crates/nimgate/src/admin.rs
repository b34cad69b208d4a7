//! The admin listener (`server.admin_listen`, loopback by default): operators' endpoints,
//! kept off the gateway's port so that they are never exposed with it.
//! - `GET /metrics`: Prometheus text.
//! - `GET /admin/backends`: per backend its health, in-flight count, ejection state, NIM load
//!   and recent errors.
//! - `GET /admin/config`: the configuration in force, credentials redacted, with its version
//!   and hash.
//! - `POST /admin/reload`: reload the config file; 200 with the new version, or 422 with every
//!   problem (the configuration in force stays).
//!
//! It shows names and URLs, never credentials. With `server.admin_token_env` set, every
//! endpoint needs `Authorization: Bearer TOKEN` (401 without). Requests a browser makes (they
//! carry `Origin`) are refused whatever they carry, so that no web page can drive a reload;
//! without a token, so are requests by host name (`Host: evil.example` resolving to loopback:
//! DNS rebinding): IP literals, `localhost` and single-label names (Kubernetes services) pass.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::auth;
use crate::config::AdminToken;
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::metrics::BackendGauges;
use crate::reload::{self, Reloader, Trigger};
use crate::streaming::ResponseBody;
use crate::upstream::Backend;

/// Serves the admin endpoints on `listener` in the background until the handle is dropped.
pub struct AdminHandle {
    addr: std::net::SocketAddr,
    task: JoinHandle<()>,
}

impl AdminHandle {
    /// `reloader` is the gateway's, when it was started from a file.
    pub fn spawn(
        gateway: Arc<Gateway>,
        listener: TcpListener,
        reloader: Option<Arc<Reloader>>,
    ) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (gateway, reloader) = (Arc::clone(&gateway), reloader.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let (gateway, reloader) = (Arc::clone(&gateway), reloader.clone());
                        async move { Ok::<_, Infallible>(handle(&gateway, reloader.as_deref(), &request).await) }
                    });
                    let mut builder = hyper::server::conn::http1::Builder::new();
                    builder.timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

impl Drop for AdminHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(gateway: &Gateway, reloader: Option<&Reloader>, request: &Request<Incoming>) -> Response<ResponseBody> {
    match answer(gateway, reloader, request).await {
        Ok(response) => response,
        Err(e) => e.to_response(),
    }
}

async fn answer(
    gateway: &Gateway,
    reloader: Option<&Reloader>,
    request: &Request<Incoming>,
) -> Result<Response<ResponseBody>, GatewayError> {
    guard(&gateway.snapshot().server.admin_token, request.headers())?;
    let path = request.uri().path();
    let allowed = match path {
        "/metrics" | "/admin/backends" | "/admin/config" => Method::GET,
        "/admin/reload" => Method::POST,
        _ => return Err(GatewayError::UnknownAdminPath(path.to_owned())),
    };
    if request.method() != allowed {
        let allow = if allowed == Method::GET { "GET" } else { "POST" };
        return Err(GatewayError::MethodNotAllowed { method: request.method().clone(), path: path.to_owned(), allow });
    }
    Ok(match path {
        "/metrics" => {
            let snapshot = gateway.snapshot();
            let mut now = None;
            let members: Vec<Arc<Backend>> =
                snapshot.groups.iter().flat_map(|g| g.members().iter().cloned().collect::<Vec<_>>()).collect();
            let gauges = snapshot.backends.iter().chain(&members).map(|b| BackendGauges {
                name: b.name.as_str(),
                in_flight: b.state.inflight(),
                in_rotation: !b.state.is_out(&mut now),
            });
            let queues = snapshot.routes.iter().map(|r| (r.pattern.as_str(), r.pool.queued()));
            let mut response = Response::new(ResponseBody::full(Bytes::from(gateway.metrics().render(gauges, queues))));
            response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"));
            response
        }
        "/admin/backends" => json_response(StatusCode::OK, &backends(gateway)),
        "/admin/config" => {
            let snapshot = gateway.snapshot();
            let restart_needed = reloader.map(|r| r.restart_needed(&snapshot)).unwrap_or_default();
            json_response(
                StatusCode::OK,
                &json!({
                    "version": snapshot.meta.version,
                    "hash": snapshot.meta.hash,
                    "path": reloader.map(|r| r.path().display().to_string()),
                    "restart_needed": restart_needed,
                    "config": reload::redacted(&snapshot),
                }),
            )
        }
        _ => {
            let reloader = reloader.ok_or(GatewayError::ReloadUnavailable)?;
            let applied = reloader.reload(Trigger::AdminApi).await.map_err(GatewayError::ConfigRefused)?;
            json_response(
                StatusCode::OK,
                &json!({ "status": "reloaded", "version": applied.version, "hash": applied.hash, "restart_needed": applied.restart_needed }),
            )
        }
    })
}

/// Refuses browser-driven requests, requests without the admin token when one is set, and
/// requests by a host name when none is.
fn guard(token: &Option<AdminToken>, headers: &http::HeaderMap) -> Result<(), GatewayError> {
    if headers.contains_key(http::header::ORIGIN) || headers.contains_key("sec-fetch-mode") {
        return Err(GatewayError::AdminForbidden("the admin API does not serve requests made by a browser"));
    }
    match token {
        Some(token) => match auth::bearer_token(headers) {
            Ok(presented) if token.matches(presented.as_bytes()) => Ok(()),
            _ => Err(GatewayError::AdminUnauthenticated),
        },
        None if host_is_not_a_name(headers) => Ok(()),
        None => Err(GatewayError::AdminForbidden(
            "the admin API answers requests by IP address, localhost or a single-label name; set server.admin_token_env to reach it by another name",
        )),
    }
}

/// Whether `Host` is absent, an IP literal, `localhost` or a single-label name: nothing a
/// public DNS name can rebind.
fn host_is_not_a_name(headers: &http::HeaderMap) -> bool {
    let Some(host) = headers.get(http::header::HOST).and_then(|h| h.to_str().ok()) else { return true };
    let name = match host.strip_prefix('[') {
        Some(v6) => return v6.split_once(']').is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok()),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.parse::<std::net::Ipv4Addr>().is_ok() || name.eq_ignore_ascii_case("localhost") || !name.contains('.')
}

/// Every backend, a group's members each as one (with `group` naming it), and the groups.
fn backends(gateway: &Gateway) -> Value {
    let snapshot = gateway.snapshot();
    let mut listed: Vec<Value> = snapshot.backends.iter().map(|b| backend(b)).collect();
    let mut groups = Vec::new();
    for group in &snapshot.groups {
        let members = group.members();
        for member in members.iter() {
            let mut entry = backend(member);
            entry["group"] = Value::from(group.name.as_str());
            listed.push(entry);
        }
        groups.push(json!({
            "name": group.name.as_str(),
            "host": group.host(),
            "interval_ms": group.discovery.interval.as_millis() as u64,
            "members": members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(),
            "resolution_error": group.failing(),
        }));
    }
    json!({ "backends": listed, "groups": groups })
}

fn backend(b: &Backend) -> Value {
    let state = &b.state;
    let ejected_for_ms = state.ejected_for_ms();
    let (requests, failures) = state.totals();
    let load = state.nim_load().map(|(load, age_ms)| {
        json!({
            "running": load.running,
            "waiting": load.waiting,
            "kv_cache_usage": load.kv_cache_usage,
            "age_ms": age_ms,
            "full": state.is_full_by_load(),
        })
    });
    let health = match (&b.health_check, state.is_healthy()) {
        (None, _) => "unchecked",
        (Some(_), true) => "healthy",
        (Some(_), false) => "unhealthy",
    };
    json!({
        "name": b.name.as_str(),
        "url": b.url,
        "health": health,
        "in_rotation": state.is_healthy() && ejected_for_ms == 0,
        "in_flight": state.inflight(),
        "idle_connections": b.client.idle_connections(),
        "max_concurrency": b.max_concurrency,
        "weight": b.weight,
        "ejected": ejected_for_ms > 0,
        "ejected_for_ms": ejected_for_ms,
        "consecutive_failures": state.consecutive_failures(),
        "consecutive_ejections": state.ejections(),
        "requests": requests,
        "failures": failures,
        "load": load,
        // Prompt blocks prefix affinity remembers as sent here (0 when no route uses it).
        "prefix_blocks": state.prefixes.len(),
        "recent_errors": state.recent_errors().iter().map(|e| json!({
            "at": humantime::format_rfc3339_millis(e.at).to_string(),
            "kind": e.kind.as_str(),
            "message": e.message,
        })).collect::<Vec<_>>(),
    })
}

fn json_response(status: StatusCode, value: &Value) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::full(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> http::HeaderMap {
        pairs.iter().map(|(n, v)| (http::HeaderName::from_static(n), HeaderValue::from_str(v).unwrap())).collect()
    }

    #[test]
    fn browsers_and_rebound_names_are_refused_and_the_token_is_required_when_set() {
        let none = None;
        for ok in ["127.0.0.1:9090", "localhost:9090", "[::1]:9090", "10.0.3.7:9090", "nimgate-admin:9090"] {
            assert!(guard(&none, &headers(&[("host", ok)])).is_ok(), "{ok}");
        }
        assert!(guard(&none, &headers(&[])).is_ok());
        for refused in ["evil.example:9090", "127.0.0.1.nip.io", "[::1"] {
            assert!(matches!(guard(&none, &headers(&[("host", refused)])), Err(GatewayError::AdminForbidden(_))));
        }
        let cross_origin = headers(&[("host", "127.0.0.1:9090"), ("origin", "https://evil.example")]);
        assert!(matches!(guard(&none, &cross_origin), Err(GatewayError::AdminForbidden(_))));

        let token = Some(AdminToken::new("s3cret"));
        let by_name = |auth: &str| headers(&[("host", "nimgate.example.com"), ("authorization", auth)]);
        assert!(guard(&token, &by_name("Bearer s3cret")).is_ok(), "a token makes names safe");
        assert!(matches!(guard(&token, &by_name("Bearer wrong")), Err(GatewayError::AdminUnauthenticated)));
        assert!(matches!(guard(&token, &headers(&[])), Err(GatewayError::AdminUnauthenticated)));
    }
}
