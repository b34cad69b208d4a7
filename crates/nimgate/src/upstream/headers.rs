//! Header rules at the boundary with backends: which client headers go upstream (never
//! `Authorization`, never hop-by-hop ones), the request id, the backend's own credential
//! injected, and the hop-by-hop headers removed from an upstream answer before it goes back.

// Hop-by-hop headers describe one connection, not the message (RFC 9110 §7.6.1), plus the
// legacy `keep-alive`/`proxy-connection`; they never cross the proxy in either direction.
use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CONNECTION, CONTENT_LENGTH, EXPECT, HOST, HeaderName, HeaderValue,
    PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Method, Request};
use http_body_util::Full;

use super::backend::Backend;
use crate::api::Endpoint;

/// The request id header: kept from the client when sane, sent upstream and returned.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The client's headers as they go upstream: without hop-by-hop headers (and those the
/// client's `Connection` names), `Host`, `Authorization`, `Content-Length`, `Expect`,
/// `Accept-Encoding` (usage is read from the answer's bytes, which must then not be
/// compressed) and the forwarding headers by which a client could claim another address or
/// origin to a backend that trusts them (`Forwarded`, `X-Forwarded-*`, `X-Real-IP`), with the
/// request id added. The backend credential is added by `request`.
pub fn upstream_headers(client: &HeaderMap, request_id: &HeaderValue) -> HeaderMap {
    // Most requests have no `Connection` header: it is noticed on the way rather than looked
    // up, and only one that names headers has them filtered again.
    let mut connection = false;
    let mut headers = copy_request_headers(client, |name| {
        connection |= name == CONNECTION;
        false
    });
    if let Some(listed) = connection.then(|| connection_listed(client)).flatten() {
        headers = copy_request_headers(client, |name| listed.contains(name));
    }
    headers.insert(X_REQUEST_ID, request_id.clone());
    headers
}

/// The client's headers but those always dropped and those `listed` says, in their order.
fn copy_request_headers(client: &HeaderMap, mut listed: impl FnMut(&HeaderName) -> bool) -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(client.len() + 3);
    for (name, value) in client {
        if !listed(name) && !is_dropped_request_header(name) {
            headers.append(name.clone(), value.clone());
        }
    }
    headers
}

fn is_dropped_request_header(name: &HeaderName) -> bool {
    name == HOST
        || name == AUTHORIZATION
        || name == CONTENT_LENGTH
        || name == EXPECT
        || name == ACCEPT_ENCODING
        || is_hop_by_hop(name)
        || is_forwarding(name)
}

/// `Forwarded`, `X-Forwarded-*` and `X-Real-IP`. Names are lowercase; most headers are
/// ruled out by their first byte.
fn is_forwarding(name: &HeaderName) -> bool {
    let name = name.as_str();
    match name.as_bytes().first() {
        Some(b'x') => name.starts_with("x-forwarded-") || name == "x-real-ip",
        Some(b'f') => name == "forwarded",
        _ => false,
    }
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
    // One pass over the names first: `Connection` is hop-by-hop, so an answer without any
    // costs neither a lookup nor an allocation.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
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

/// The request for `endpoint` on `backend`, with the backend's credential.
pub fn request(backend: &Backend, endpoint: Endpoint, mut headers: HeaderMap, body: Bytes) -> Request<Full<Bytes>> {
    if let Some(auth) = &backend.auth {
        headers.insert(AUTHORIZATION, auth.clone());
    }
    let method = if endpoint == Endpoint::Models { Method::GET } else { Method::POST };
    if method == Method::POST {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
    }
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = method;
    *request.uri_mut() = backend.request_uri(endpoint).clone();
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
}
