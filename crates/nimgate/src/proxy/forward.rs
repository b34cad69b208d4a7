//! The upstream request: which client headers go upstream (never `Authorization`, never
//! hop-by-hop ones), the backend's own credential, the request id, the model alias spliced
//! into the original bytes, and sending it through the route's pool with the backend's
//! first-byte timeout. A backend that cannot be connected to has received nothing, so the
//! next candidate is tried; any other failure is final here (retries come with #7).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
// Hop-by-hop headers describe one connection, not the message (RFC 9110 §7.6.1), plus the
// legacy `keep-alive`/`proxy-connection`; they never cross the proxy in either direction.
use http::header::{
    AUTHORIZATION, CONNECTION, CONTENT_LENGTH, EXPECT, HOST, HeaderName, HeaderValue, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::api::Endpoint;
use crate::error::GatewayError;
use crate::pool::{Backend, BackendName, Pool};
use crate::proxy::body::StreamOptions;

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
/// client's `Connection` names), `Host`, `Authorization`, `Content-Length` and `Expect`,
/// with the request id added. The backend credential is added per attempt by `send`.
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
    name == HOST || name == AUTHORIZATION || name == CONTENT_LENGTH || name == EXPECT || is_hop_by_hop(name)
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
    pub backend: Arc<Backend>,
    pub response: Response<Incoming>,
    /// The request asked for stream usage on the client's behalf.
    pub usage_requested: bool,
}

/// Why no upstream response head arrived.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made: the backend received nothing, so another may be tried.
    #[error("backend `{backend}` refused the connection: {cause}")]
    Connect { backend: BackendName, cause: String },
    /// The request was (maybe partly) sent and the connection failed before a response head.
    #[error("backend `{backend}` failed: {cause}")]
    Failed { backend: BackendName, cause: String },
    #[error("backend `{backend}` sent no response within {after:?}")]
    Timeout { backend: BackendName, after: Duration },
}

impl UpstreamError {
    /// Whether trying another backend cannot duplicate work: true only when nothing was sent.
    pub fn retry_safe(&self) -> bool {
        matches!(self, Self::Connect { .. })
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

/// Sends the request to the pool's first reachable candidate and returns its response head;
/// the body streams on from there.
pub async fn send(
    pool: &Pool,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: &UpstreamBody,
) -> Result<Answer, UpstreamError> {
    let mut last_error = None;
    let mut candidates = pool.candidates().peekable();
    let mut headers = Some(headers);
    while let Some(backend) = candidates.next() {
        let (bytes, usage_requested) = body.for_backend(backend);
        // Only a request that may be tried again needs its headers copied.
        let headers = if candidates.peek().is_some() { headers.clone() } else { headers.take() };
        let request = build(backend, endpoint, headers.unwrap_or_default(), bytes);
        match send_one(backend, request).await {
            Ok(response) => return Ok(Answer { backend: Arc::clone(backend), response, usage_requested }),
            Err(e) if e.retry_safe() => {
                tracing::warn!(backend = %backend.name, error = %e, "backend unreachable, trying the next one");
                last_error = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_error.unwrap_or_else(|| UpstreamError::Connect {
        backend: BackendName::new("none"),
        cause: "the route has no backends".into(),
    }))
}

/// One request to one backend under its first-byte timeout.
pub async fn send_one(backend: &Backend, request: Request<Full<Bytes>>) -> Result<Response<Incoming>, UpstreamError> {
    let after = backend.timeouts.first_byte;
    match tokio::time::timeout(after, backend.client.request(request)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) if e.is_connect() => {
            Err(UpstreamError::Connect { backend: backend.name.clone(), cause: root_cause(&e) })
        }
        Ok(Err(e)) => Err(UpstreamError::Failed { backend: backend.name.clone(), cause: root_cause(&e) }),
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

/// The innermost cause of an error: "Connection refused (os error 111)" rather than
/// "client error (Connect)".
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
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
