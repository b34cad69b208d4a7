//! The upstream request: which client headers go upstream (never `Authorization`, never
//! hop-by-hop ones), the backend's own credential, the request id, the model alias spliced
//! into the original bytes, and sending it through the route's pool: a backend picked by the
//! balancer, the first-byte timeout, and retries on another backend before any byte reached
//! the client (connect errors, resets, first-byte timeouts, upstream 502/503, and 429 when
//! another backend has room), bounded by `max_attempts` and the route's retry budget. Every
//! outcome feeds the backend's passive health.

use std::ops::Range;
use std::time::Duration;

use tokio::time::Instant;

use bytes::{Bytes, BytesMut};
// Hop-by-hop headers describe one connection, not the message (RFC 9110 §7.6.1), plus the
// legacy `keep-alive`/`proxy-connection`; they never cross the proxy in either direction.
use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, EXPECT, HOST, HeaderName, HeaderValue,
    PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, RETRY_AFTER, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::api::Endpoint;
use crate::error::GatewayError;
use crate::metrics::Metrics;
use crate::pool::state::FailureKind;
use crate::pool::{Backend, BackendName, NoBackend, Pool, Slot, Tried};
use crate::proxy::body::StreamOptions;
use crate::proxy::client::ClientError;
use crate::proxy::connections::Lease;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The longest client-chosen request id nimgate keeps; longer or odd ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The client's `x-request-id` when it is sane (visible ASCII, at most 128 bytes), otherwise
/// a new random one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(id)
            if !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && id.as_bytes().iter().all(u8::is_ascii_graphic) =>
        {
            id.clone()
        }
        _ => {
            let mut buffer = uuid::Uuid::encode_buffer();
            let id = uuid::Uuid::new_v4().simple().encode_lower(&mut buffer);
            HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("unknown"))
        }
    }
}

/// The client's headers as they go upstream: without hop-by-hop headers (and those the
/// client's `Connection` names), `Host`, `Authorization`, `Content-Length`, `Expect` and
/// `Accept-Encoding` (usage is read from the answer's bytes, which must then not be
/// compressed), with the request id added. The backend credential is added by `build`.
pub fn upstream_headers(client: &HeaderMap, request_id: &HeaderValue) -> HeaderMap {
    let listed = connection_listed(client);
    let mut headers = HeaderMap::with_capacity(client.len() + 3);
    for (name, value) in client {
        let dropped = is_dropped_request_header(name) || listed.as_ref().is_some_and(|l| l.contains(name));
        if !dropped {
            headers.append(name.clone(), value.clone());
        }
    }
    headers.insert(X_REQUEST_ID, request_id.clone());
    headers
}

fn is_dropped_request_header(name: &HeaderName) -> bool {
    name == HOST
        || name == AUTHORIZATION
        || name == CONTENT_LENGTH
        || name == EXPECT
        || name == ACCEPT_ENCODING
        || is_hop_by_hop(name)
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    // Standard names compare as enum values; only the two non-standard ones compare text.
    name == CONNECTION
        || name == TRANSFER_ENCODING
        || name == TE
        || name == TRAILER
        || name == UPGRADE
        || name == PROXY_AUTHORIZATION
        || name == PROXY_AUTHENTICATE
        || HOP_BY_HOP_EXTRA.contains(&name.as_str())
}

/// Legacy hop-by-hop headers without a standard `HeaderName`.
const HOP_BY_HOP_EXTRA: [&str; 2] = ["keep-alive", "proxy-connection"];

/// The headers a `Connection` header names besides its own options; `None` (no allocation)
/// in the usual case of no `Connection` header, or only `keep-alive`/`close`.
fn connection_listed(headers: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut listed = Vec::new();
    for value in headers.get_all(CONNECTION) {
        for token in value.to_str().unwrap_or("").split(',').map(str::trim) {
            if !token.eq_ignore_ascii_case("keep-alive") && !token.eq_ignore_ascii_case("close") && !token.is_empty() {
                if let Ok(name) = HeaderName::from_bytes(token.as_bytes()) {
                    listed.push(name);
                }
            }
        }
    }
    (!listed.is_empty()).then_some(listed)
}

/// Removes hop-by-hop headers from an upstream response before it goes to the client. Most
/// responses carry none, so it looks before it removes (each removal hashes a name).
pub fn strip_response_headers(headers: &mut HeaderMap) {
    let listed = connection_listed(headers);
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name) || listed.as_ref().is_some_and(|l| l.contains(name)))
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
}

/// One change to a request body: the bytes at `span` replaced (an empty span inserts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub span: Range<usize>,
    pub bytes: Bytes,
}

/// `body` with `edits` applied (non-overlapping, in any order), without re-serialising.
pub fn splice(body: &Bytes, edits: &mut [Edit]) -> Bytes {
    if edits.is_empty() {
        return body.clone();
    }
    edits.sort_by_key(|e| e.span.start);
    let added: usize = edits.iter().map(|e| e.bytes.len()).sum();
    let removed: usize = edits.iter().map(|e| e.span.len()).sum();
    let mut out = BytesMut::with_capacity(body.len() + added - removed);
    let mut at = 0;
    for edit in edits.iter() {
        out.extend_from_slice(&body[at..edit.span.start]);
        out.extend_from_slice(&edit.bytes);
        at = edit.span.end;
    }
    out.extend_from_slice(&body[at..]);
    out.freeze()
}

/// The edit that makes a streaming request ask for the final usage chunk: `stream_options`
/// added (right after the opening brace), or set to include usage, keeping its other options.
pub fn request_usage(body: &[u8], options: &StreamOptions) -> Edit {
    const ADDED: &[u8] = br#""stream_options":{"include_usage":true},"#;
    match options {
        StreamOptions::Absent => {
            // `peek` checked that the body is an object, so its first non-blank byte is `{`.
            let open = body.iter().position(|b| *b == b'{').map_or(0, |i| i + 1);
            Edit { span: open..open, bytes: Bytes::from_static(ADDED) }
        }
        StreamOptions::Null(span) => {
            Edit { span: span.clone(), bytes: Bytes::from_static(br#"{"include_usage":true}"#) }
        }
        StreamOptions::Object { span, .. } => {
            let mut object: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(&body[span.clone()]).unwrap_or_default();
            object.insert("include_usage".into(), serde_json::Value::Bool(true));
            let bytes = serde_json::to_vec(&object).unwrap_or_else(|_| br#"{"include_usage":true}"#.to_vec());
            Edit { span: span.clone(), bytes: Bytes::from(bytes) }
        }
    }
}

/// The body to send upstream: as the client sent it (aliases applied), and, when nimgate needs
/// a stream's usage the client did not ask for, a variant that asks for it, used with backends
/// that accept `stream_options` (`stream_usage: true`).
#[derive(Debug, Clone)]
pub struct UpstreamBody {
    pub plain: Bytes,
    pub with_usage: Option<Bytes>,
}

/// What goes to whichever backend takes the request. The upstream headers are built from the
/// client's for each attempt, so the usual single attempt copies them once.
#[derive(Debug)]
pub struct Outgoing<'a> {
    pub endpoint: Endpoint,
    pub client_headers: &'a HeaderMap,
    pub request_id: &'a HeaderValue,
    pub body: UpstreamBody,
}

impl UpstreamBody {
    /// The bytes for `backend`, and whether they ask for usage on the client's behalf.
    fn for_backend(&self, backend: &Backend) -> (Bytes, bool) {
        match &self.with_usage {
            Some(with_usage) if backend.stream_usage => (with_usage.clone(), true),
            _ => (self.plain.clone(), false),
        }
    }
}

/// A response head from the backend that answered.
pub struct Answer {
    /// The backend's in-flight slot, to hold until the answer's last byte.
    pub slot: Slot,
    pub response: Response<Incoming>,
    /// The connection the answer comes on, given back when it is dropped after the body.
    pub lease: Lease,
    /// The request asked for stream usage on the client's behalf.
    pub usage_requested: bool,
    /// Backends tried, this one included.
    pub attempts: u32,
    /// When the answering backend's total timeout ends, if it has one.
    pub deadline: Option<Instant>,
}

/// Why no upstream response head arrived from one backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made: the backend received nothing.
    #[error("backend `{backend}` refused the connection: {cause}")]
    Connect { backend: BackendName, cause: String },
    /// The request was (maybe partly) sent and the connection failed before a response head.
    #[error("backend `{backend}` failed: {cause}")]
    Failed { backend: BackendName, cause: String },
    #[error("backend `{backend}` sent no response within {after:?}")]
    Timeout { backend: BackendName, after: Duration },
}

impl UpstreamError {
    fn kind(&self) -> FailureKind {
        match self {
            Self::Connect { .. } => FailureKind::Connect,
            Self::Failed { .. } => FailureKind::Reset,
            Self::Timeout { .. } => FailureKind::Timeout,
        }
    }

    fn cause(&self) -> String {
        match self {
            Self::Connect { cause, .. } | Self::Failed { cause, .. } => cause.clone(),
            Self::Timeout { after, .. } => format!("no response within {}", humantime::format_duration(*after)),
        }
    }
}

impl From<UpstreamError> for GatewayError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Connect { backend, cause } | UpstreamError::Failed { backend, cause } => {
                GatewayError::UpstreamUnavailable { backend, cause }
            }
            UpstreamError::Timeout { backend, after } => GatewayError::UpstreamTimeout { backend, after },
        }
    }
}

/// What one attempt came to, for the retry decision.
enum Attempt {
    /// An answer to pass on.
    Final(Response<Incoming>),
    /// An answer another backend may do better than (502, 503, 429); passed on if none can.
    Retryable(Response<Incoming>),
    /// No answer; another backend may be tried.
    Failed(UpstreamError),
}

/// Sends the request through the pool and returns the response head to pass on; the body
/// streams on from there. `started` is when the request arrived: a backend's total timeout
/// counts from then.
pub async fn send(
    pool: &Pool,
    outgoing: &Outgoing<'_>,
    started: Instant,
    metrics: &Metrics,
    model: &str,
) -> Result<Answer, GatewayError> {
    pool.budget().deposit();
    let mut waited = None;
    let acquired = pool.acquire(&mut waited).await;
    if let Some(waited) = waited {
        metrics.queue_wait(model).observe(waited.as_secs_f64());
    }
    let mut slot = acquired.map_err(|e| no_backend(pool, &e))?;
    let mut tried = Tried::default();
    let retries_possible = pool.max_attempts() > 1 && pool.primary().len() + pool.fallback().len() > 1;
    let mut attempts = 0;
    loop {
        attempts += 1;
        tried.add(&slot);
        let backend = slot.backend();
        let (bytes, usage_requested) = outgoing.body.for_backend(backend);
        let last_chance = !retries_possible || attempts >= pool.max_attempts();
        let headers = upstream_headers(outgoing.client_headers, outgoing.request_id);
        let request = build(backend, outgoing.endpoint, headers, bytes);
        let deadline = backend.timeouts.total.map(|total| started + total);
        let (outcome, lease) = match send_one(backend, request, deadline).await {
            Ok((response, lease)) => (Ok(response), lease),
            Err(e) => (Err(e), Lease::default()),
        };
        let (retry_reason, outcome) = match judge(backend, outcome, metrics) {
            Attempt::Final(response) => {
                return Ok(Answer { slot, response, lease, usage_requested, attempts, deadline });
            }
            Attempt::Retryable(response) => (format!("answered {}", response.status()), Ok(response)),
            Attempt::Failed(e) => (e.cause(), Err(e)),
        };
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        let next = if last_chance || out_of_time { None } else { pool.try_acquire(tried).ok() };
        // The budget is spent only when there is somewhere to retry, and not on a connect
        // error: a backend that was never reached did no work, so retrying it adds no load.
        let free = matches!(outcome, Err(UpstreamError::Connect { .. }));
        let next = next.filter(|_| free || pool.budget().withdraw());
        match (next, outcome) {
            (Some(next), _) => {
                metrics.retry(model, backend.name.as_str());
                tracing::warn!(
                    backend = %backend.name, next = %next.backend().name, attempt = attempts,
                    reason = %retry_reason, "retrying on another backend"
                );
                slot = next;
            }
            (None, Ok(response)) => return Ok(Answer { slot, response, lease, usage_requested, attempts, deadline }),
            (None, Err(e)) => return Err(e.into()),
        }
    }
}

/// Sorts an attempt's outcome and feeds it to the backend's passive health: connect errors,
/// resets, timeouts and 5xx count toward ejection; a 429, or a 503 with `Retry-After`, takes
/// the backend out for that long (a 429 without it for the ejection base).
fn judge(backend: &Backend, outcome: Result<Response<Incoming>, UpstreamError>, metrics: &Metrics) -> Attempt {
    let state = &backend.state;
    let response = match outcome {
        Ok(response) => response,
        Err(e) => {
            metrics.upstream_error(backend.name.as_str(), e.kind().as_str());
            let cause = e.cause();
            if let Some(ejected) = state.record_failure(e.kind(), &cause, &backend.ejection) {
                warn_ejected(backend, ejected, &cause);
            }
            return Attempt::Failed(e);
        }
    };
    let status = response.status();
    if status.is_server_error() || status == 429 {
        let kind = if status == 429 { FailureKind::Overloaded } else { FailureKind::Status5xx };
        metrics.upstream_error(backend.name.as_str(), kind.as_str());
    }
    // Only an overloaded backend's answer says how long to stay away.
    let retry_after = match status.as_u16() {
        429 | 503 => retry_after(response.headers()).map(|d| d.min(backend.ejection.max)),
        _ => None,
    };
    match status.as_u16() {
        429 => {
            let out_for = retry_after.unwrap_or(backend.ejection.base);
            state.eject_for(out_for, FailureKind::Overloaded, "answered 429 Too Many Requests");
            tracing::info!(backend = %backend.name, ?out_for, "backend answered 429: out of rotation for a while");
            Attempt::Retryable(response)
        }
        503 if retry_after.is_some() => {
            let out_for = retry_after.unwrap_or_default();
            state.eject_for(out_for, FailureKind::Status5xx, "answered 503 with Retry-After");
            tracing::info!(backend = %backend.name, ?out_for, "backend answered 503: out of rotation for a while");
            Attempt::Retryable(response)
        }
        500..=599 => {
            let cause = format!("answered {status}");
            if let Some(ejected) = state.record_failure(FailureKind::Status5xx, &cause, &backend.ejection) {
                warn_ejected(backend, ejected, &cause);
            }
            if matches!(status.as_u16(), 502 | 503) { Attempt::Retryable(response) } else { Attempt::Final(response) }
        }
        _ => {
            state.record_success();
            Attempt::Final(response)
        }
    }
}

fn warn_ejected(backend: &Backend, ejected: Duration, cause: &str) {
    tracing::warn!(
        backend = %backend.name, ejected_for = ?ejected, failures = backend.state.consecutive_failures(),
        cause, "backend ejected after consecutive failures"
    );
}

/// `Retry-After` in seconds (the HTTP-date form is rare from inference servers and ignored).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers.get(RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(secs.max(1)))
}

fn no_backend(pool: &Pool, why: &NoBackend) -> GatewayError {
    let states = pool.describe();
    GatewayError::NoHealthyBackend(match why {
        NoBackend::AllOut => format!("every backend is out of rotation ({states})"),
        NoBackend::Full | NoBackend::QueueFull => format!("every backend is full and the wait queue too ({states})"),
        NoBackend::Waited(waited) => {
            format!("every backend stayed full for {} ({states})", humantime::format_duration(*waited))
        }
    })
}

/// One request to one backend under its first-byte timeout (and the request's deadline). The
/// lease holds the answer's connection until its body is done with.
pub async fn send_one(
    backend: &Backend,
    request: Request<Full<Bytes>>,
    deadline: Option<Instant>,
) -> Result<(Response<Incoming>, Lease), UpstreamError> {
    let mut after = backend.timeouts.first_byte;
    if let Some(deadline) = deadline {
        after = after.min(deadline.saturating_duration_since(Instant::now()));
    }
    match tokio::time::timeout(after, backend.client.send(request)).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(ClientError::Connect(cause))) => Err(UpstreamError::Connect { backend: backend.name.clone(), cause }),
        Ok(Err(ClientError::Failed(cause))) => Err(UpstreamError::Failed { backend: backend.name.clone(), cause }),
        Err(_) => Err(UpstreamError::Timeout { backend: backend.name.clone(), after }),
    }
}

/// The request for `endpoint` on `backend`, with the backend's credential.
pub fn build(backend: &Backend, endpoint: Endpoint, mut headers: HeaderMap, body: Bytes) -> Request<Full<Bytes>> {
    if let Some(auth) = &backend.auth {
        headers.insert(AUTHORIZATION, auth.clone());
    }
    let method = if endpoint == Endpoint::Models { Method::GET } else { Method::POST };
    if method == Method::POST {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = backend.uri(endpoint).clone();
    *request.headers_mut() = headers;
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn client_credentials_and_hop_by_hop_headers_never_go_upstream() {
        let client = map(&[
            ("authorization", "Bearer sk-client"),
            ("host", "gateway"),
            ("connection", "keep-alive, x-secret-hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("content-length", "12"),
            ("expect", "100-continue"),
            ("accept-encoding", "gzip"),
            ("content-type", "application/json"),
            ("x-custom", "kept"),
        ]);
        let id = HeaderValue::from_static("req-1");
        let up = upstream_headers(&client, &id);
        let names: Vec<&str> = up.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-type", "x-custom", "x-request-id"]);
        assert_eq!(up["x-request-id"], "req-1");
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_generated_otherwise() {
        assert_eq!(request_id(&map(&[("x-request-id", "abc-123")])), "abc-123");
        let generated = request_id(&map(&[("x-request-id", &"x".repeat(200))]));
        assert_eq!(generated.len(), 32);
        let fresh = request_id(&HeaderMap::new());
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, request_id(&HeaderMap::new()));
    }

    #[test]
    fn response_hop_by_hop_headers_are_stripped() {
        let mut h = map(&[
            ("connection", "close, x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/event-stream"),
        ]);
        strip_response_headers(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-type"));
    }

    #[test]
    fn splice_replaces_exactly_the_spans() {
        let body = Bytes::from_static(br#"{"model":"alias","x":1}"#);
        let mut edits = [
            Edit { span: 21..22, bytes: Bytes::from_static(b"2") },
            Edit { span: 9..16, bytes: Bytes::from_static(br#""meta/llama-3.1-8b-instruct""#) },
            Edit { span: 1..1, bytes: Bytes::from_static(br#""a":0,"#) },
        ];
        let out = splice(&body, &mut edits);
        assert_eq!(&out[..], br#"{"a":0,"model":"meta/llama-3.1-8b-instruct","x":2}"#);
    }

    fn with_usage(body: &str) -> String {
        let head = crate::proxy::body::peek(body.as_bytes()).unwrap();
        let bytes = Bytes::copy_from_slice(body.as_bytes());
        let out = splice(&bytes, &mut [request_usage(body.as_bytes(), &head.stream_options)]);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn usage_is_requested_whatever_stream_options_held() {
        assert_eq!(
            with_usage(r#" {"model":"m","stream":true}"#),
            r#" {"stream_options":{"include_usage":true},"model":"m","stream":true}"#
        );
        assert_eq!(
            with_usage(r#"{"model":"m","stream_options":null}"#),
            r#"{"model":"m","stream_options":{"include_usage":true}}"#
        );
        let kept =
            with_usage(r#"{"model":"m","stream_options":{"continuous_usage_stats":true,"include_usage":false}}"#);
        let value: serde_json::Value = serde_json::from_str(&kept).unwrap();
        assert_eq!(value["stream_options"], serde_json::json!({"continuous_usage_stats":true,"include_usage":true}));
        assert_eq!(crate::proxy::body::peek(kept.as_bytes()).unwrap().model, "m");
    }
}
