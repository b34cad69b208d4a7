//! `GatewayError`: everything the gateway itself can refuse or fail a request for, and its one
//! rendering as an OpenAI-shaped error body with the contract's status and code. An upstream's
//! own error response is not a `GatewayError`: it passes through unchanged.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use serde_json::json;

use crate::auth::AuthFailure;
use crate::limits::{LimitKind, Quota, retry_after_secs};
use crate::pool::BackendName;
use crate::streaming::ResponseBody;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Unauthenticated(#[from] AuthFailure),
    #[error("this API key may not use model `{0}`")]
    ModelNotAllowed(String),
    #[error("no route serves model `{0}`; GET /v1/models lists the models you can use")]
    ModelNotFound(String),
    #[error("no such endpoint: {0}")]
    UnknownPath(String),
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: http::Method, path: String, allow: &'static str },
    #[error(
        "rate limit reached: this key may use {per_minute} {} per minute; retry in {}s",
        .limit.as_str(), retry_after_secs(*.retry_after)
    )]
    RateLimited { limit: LimitKind, per_minute: u64, retry_after: Duration, quota: Quota },
    #[error("request body is larger than the limit of {limit} bytes")]
    RequestTooLarge { limit: u64 },
    #[error("request body was not received within {}s", .0.as_secs())]
    RequestTimeout(Duration),
    #[error("backend `{backend}` could not be reached: {cause}")]
    UpstreamUnavailable { backend: BackendName, cause: String },
    #[error("backend `{backend}` did not answer within {}", humantime::format_duration(*.after))]
    UpstreamTimeout { backend: BackendName, after: Duration },
    /// Every backend of the route and its fallback is out (ejected, failing its health
    /// check) or full, and the wait for room ended.
    #[error("no backend can take this request: {0}")]
    NoHealthyBackend(String),
}

/// The innermost cause of an error: "Connection refused (os error 111)" rather than
/// "client error (Connect)".
pub fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

impl GatewayError {
    /// The contract's table in one match: a new variant does not compile until it is placed.
    fn status_type_code(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request"),
            Self::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "authentication_error", "invalid_api_key"),
            Self::ModelNotAllowed(_) => (StatusCode::FORBIDDEN, "permission_error", "model_not_allowed"),
            Self::ModelNotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", "model_not_found"),
            Self::UnknownPath(_) => (StatusCode::NOT_FOUND, "invalid_request_error", "not_found"),
            Self::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method_not_allowed")
            }
            Self::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "rate_limit_exceeded"),
            Self::RequestTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "request_too_large")
            }
            Self::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "invalid_request_error", "request_timeout"),
            Self::UpstreamUnavailable { .. } => (StatusCode::BAD_GATEWAY, "server_error", "upstream_unavailable"),
            Self::UpstreamTimeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "server_error", "upstream_timeout"),
            Self::NoHealthyBackend(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error", "no_healthy_backend"),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status_type_code().0
    }

    /// The contract's machine-readable `code`.
    pub fn code(&self) -> &'static str {
        self.status_type_code().2
    }

    /// The only place an error body is written.
    pub fn render(&self) -> Response<ResponseBody> {
        let (status, kind, code) = self.status_type_code();
        let body = json!({
            "error": { "message": self.to_string(), "type": kind, "code": code, "param": null }
        });
        let mut response = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
        *response.status_mut() = status;
        response.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            Self::MethodNotAllowed { allow, .. } => {
                response.headers_mut().insert(ALLOW, HeaderValue::from_static(allow));
            }
            Self::RateLimited { retry_after, quota, .. } => {
                response.headers_mut().insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(*retry_after)));
                quota.write_headers(response.headers_mut());
            }
            // SDKs retry a 503 after Retry-After: capacity frees in about a second.
            Self::NoHealthyBackend(_) => {
                response.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response<ResponseBody>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn errors_render_in_openai_shape_with_contract_codes() {
        let cases = [
            (GatewayError::InvalidRequest("bad".into()), 400, "invalid_request_error", "invalid_request"),
            (GatewayError::Unauthenticated(AuthFailure::Unknown), 401, "authentication_error", "invalid_api_key"),
            (GatewayError::ModelNotAllowed("m".into()), 403, "permission_error", "model_not_allowed"),
            (GatewayError::ModelNotFound("m".into()), 404, "invalid_request_error", "model_not_found"),
            (GatewayError::RequestTooLarge { limit: 10 }, 413, "invalid_request_error", "request_too_large"),
            (
                GatewayError::UpstreamUnavailable { backend: BackendName::new("a"), cause: "refused".into() },
                502,
                "server_error",
                "upstream_unavailable",
            ),
            (
                GatewayError::UpstreamTimeout { backend: BackendName::new("a"), after: Duration::from_secs(2) },
                504,
                "server_error",
                "upstream_timeout",
            ),
            (GatewayError::NoHealthyBackend("all out".into()), 503, "server_error", "no_healthy_backend"),
        ];
        for (error, status, kind, code) in cases {
            let message = error.to_string();
            let response = error.render();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
            let body = body_json(response).await;
            assert_eq!(body["error"]["type"], kind);
            assert_eq!(body["error"]["code"], code);
            assert_eq!(body["error"]["message"], message.as_str());
            assert!(body["error"]["param"].is_null());
        }
    }

    #[tokio::test]
    async fn a_rate_limit_renders_429_with_retry_after_and_quota_headers() {
        let quota = Quota {
            requests: Some(crate::limits::Window { limit: 60, remaining: 0, reset: Duration::from_secs(10) }),
            tokens: None,
        };
        let error = GatewayError::RateLimited {
            limit: LimitKind::Requests,
            per_minute: 60,
            retry_after: Duration::from_millis(1200),
            quota,
        };
        let response = error.render();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "0");
        let body = body_json(response).await;
        assert_eq!(body["error"]["type"], "rate_limit_error");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert!(body["error"]["message"].as_str().unwrap().contains("rate limit"));
    }

    #[tokio::test]
    async fn only_a_rate_limit_says_rate_limit() {
        let message =
            GatewayError::UpstreamTimeout { backend: BackendName::new("a"), after: Duration::from_secs(1) }.to_string();
        assert!(!message.contains("rate limit"));
        assert!(message.contains("1s"));
    }
}
