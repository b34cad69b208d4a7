//! `GatewayError`: everything the gateway itself can refuse or fail a request for, the
//! contract's table of statuses, OpenAI types and codes in one match, and the only writer of an
//! error body: as a whole JSON answer (requests and the admin API alike) or as the final SSE
//! event of a stream that broke after its head went out. An upstream's own error answer is not
//! a `GatewayError`: it passes through unchanged.

use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use http::{Response, StatusCode};
use serde::Serialize;

use crate::auth::AuthFailure;
use crate::config::ConfigError;
use crate::limits::{LimitKind, Refused, Unadmitted, retry_after_secs};
use crate::upstream::{AttemptError, BackendName, UpstreamError};

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
    #[error("{0}")]
    RateLimited(Refused),
    /// The shared limit store did not answer and `rate_limits.on_store_error` is `deny`.
    #[error("the gateway cannot check this key's quota now (its limit store is unavailable); retry shortly")]
    RateLimitUnavailable,
    #[error("request body is larger than the limit of {limit} bytes")]
    RequestTooLarge { limit: u64 },
    #[error("request body was not received within {}s", .0.as_secs())]
    RequestTimeout(Duration),
    #[error("request line and headers are larger than the limit of {limit} bytes")]
    HeaderTooLarge { limit: usize },
    /// The gateway holds as many request bodies as `server.max_buffered_body_bytes` allows
    /// and none finished in time to make room.
    #[error("the gateway is reading too many request bodies at once; retry shortly")]
    Overloaded,
    // Upstream failures tell clients what happened in general words; which backend, the OS
    // error and ejection timers stay in the access log (`detail`) and `/admin/backends`.
    #[error("the model's backend could not be reached; retry later")]
    UpstreamUnavailable { backend: BackendName, cause: String },
    #[error("the model's backend did not answer in time")]
    UpstreamTimeout { backend: BackendName, after: Duration },
    /// Every backend of the route and its fallback is out (ejected, failing its health
    /// check) or full, and the wait for room ended.
    #[error("no backend can take this request now; retry shortly")]
    NoHealthyBackend(String),
    /// The upstream answer broke after its head went out (reset, stalled, cut short): told
    /// in the answer's last SSE event, since the status can no longer change.
    #[error("{message}")]
    AnswerBroken { timed_out: bool, message: String },
    /// Admin listener: `server.admin_token_env` is set and the request lacks the token.
    #[error("the admin API needs `Authorization: Bearer` with the token in server.admin_token_env")]
    AdminUnauthenticated,
    /// Admin listener: a request a browser made (an `Origin`), or one by a host name while no
    /// admin token is set (a DNS-rebinding page): refused.
    #[error("{0}")]
    AdminForbidden(&'static str),
    /// Admin listener: a path it does not serve.
    #[error(
        "no such admin endpoint: {0} (there are GET /metrics, GET /admin/backends, GET /admin/config, POST /admin/reload)"
    )]
    UnknownAdminPath(String),
    /// Admin listener: `POST /admin/reload` on a gateway not started from a file.
    #[error("this gateway was not started from a config file")]
    ReloadUnavailable,
    /// Admin listener: a reload refused; the configuration in force stays.
    #[error("config not reloaded, the one in force stays: {0}")]
    ConfigRefused(ConfigError),
}

impl From<Refused> for GatewayError {
    fn from(refused: Refused) -> Self {
        Self::RateLimited(refused)
    }
}

impl From<Unadmitted> for GatewayError {
    fn from(unadmitted: Unadmitted) -> Self {
        match unadmitted {
            Unadmitted::Refused(refused) => Self::RateLimited(refused),
            Unadmitted::StoreUnavailable => Self::RateLimitUnavailable,
        }
    }
}

impl From<UpstreamError> for GatewayError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Attempt(
                AttemptError::Connect { backend, cause } | AttemptError::Failed { backend, cause },
            ) => Self::UpstreamUnavailable { backend, cause },
            UpstreamError::Attempt(AttemptError::Timeout { backend, after }) => {
                Self::UpstreamTimeout { backend, after }
            }
            UpstreamError::NoBackend(states) => Self::NoHealthyBackend(states),
        }
    }
}

/// OpenAI's error shape. Fields in alphabetical order, as clients have always seen them.
#[derive(Serialize)]
struct Body<'a> {
    error: Detail<'a>,
    /// A refused configuration's problems, each with its field path.
    #[serde(skip_serializing_if = "Option::is_none")]
    problems: Option<Vec<ProblemJson<'a>>>,
}

#[derive(Serialize)]
struct Detail<'a> {
    code: &'static str,
    message: &'a str,
    param: Option<()>,
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct ProblemJson<'a> {
    message: &'a str,
    path: &'a str,
}

impl GatewayError {
    /// The contract's table in one match: a new variant does not compile until it is placed.
    fn status_type_code(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            Self::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request_error", "invalid_request"),
            Self::Unauthenticated(_) | Self::AdminUnauthenticated => {
                (StatusCode::UNAUTHORIZED, "authentication_error", "invalid_api_key")
            }
            Self::AdminForbidden(_) => (StatusCode::FORBIDDEN, "permission_error", "admin_forbidden"),
            Self::ModelNotAllowed(_) => (StatusCode::FORBIDDEN, "permission_error", "model_not_allowed"),
            Self::ModelNotFound(_) => (StatusCode::NOT_FOUND, "invalid_request_error", "model_not_found"),
            Self::UnknownPath(_) | Self::UnknownAdminPath(_) => {
                (StatusCode::NOT_FOUND, "invalid_request_error", "not_found")
            }
            Self::MethodNotAllowed { .. } => {
                (StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", "method_not_allowed")
            }
            Self::RateLimited(Refused { limit: LimitKind::Concurrency, .. }) => {
                (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "concurrency_limit_exceeded")
            }
            Self::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", "rate_limit_exceeded"),
            Self::RequestTooLarge { .. } => {
                (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", "request_too_large")
            }
            Self::RequestTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "invalid_request_error", "request_timeout"),
            Self::HeaderTooLarge { .. } => {
                (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "invalid_request_error", "request_header_too_large")
            }
            Self::Overloaded => (StatusCode::SERVICE_UNAVAILABLE, "server_error", "server_overloaded"),
            Self::RateLimitUnavailable => (StatusCode::SERVICE_UNAVAILABLE, "server_error", "rate_limit_unavailable"),
            Self::UpstreamUnavailable { .. } | Self::AnswerBroken { timed_out: false, .. } => {
                (StatusCode::BAD_GATEWAY, "server_error", "upstream_unavailable")
            }
            Self::UpstreamTimeout { .. } | Self::AnswerBroken { timed_out: true, .. } => {
                (StatusCode::GATEWAY_TIMEOUT, "server_error", "upstream_timeout")
            }
            Self::NoHealthyBackend(_) => (StatusCode::SERVICE_UNAVAILABLE, "server_error", "no_healthy_backend"),
            Self::ReloadUnavailable => (StatusCode::CONFLICT, "invalid_request_error", "reload_unavailable"),
            Self::ConfigRefused(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", "invalid_config"),
        }
    }

    /// What operators need and clients must not see: the backend and the cause of an upstream
    /// failure, the state of every backend of a refused route.
    pub fn detail(&self) -> Option<String> {
        match self {
            Self::UpstreamUnavailable { backend, cause } => {
                Some(format!("backend `{backend}` could not be reached: {cause}"))
            }
            Self::UpstreamTimeout { backend, after } => {
                Some(format!("backend `{backend}` did not answer within {}", humantime::format_duration(*after)))
            }
            Self::NoHealthyBackend(states) => Some(states.clone()),
            _ => None,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.status_type_code().0
    }

    /// The contract's machine-readable `code`.
    pub fn code(&self) -> &'static str {
        self.status_type_code().2
    }

    /// The error body: `{"error": {...}}`, and a refused configuration's `problems`.
    pub fn body(&self) -> Bytes {
        let (_, kind, code) = self.status_type_code();
        let message = self.to_string();
        let problems = match self {
            Self::ConfigRefused(e) => Some(e.problems()),
            _ => None,
        };
        let body = Body {
            error: Detail { code, message: &message, param: None, kind },
            problems: problems
                .as_ref()
                .map(|all| all.iter().map(|p| ProblemJson { message: &p.message, path: &p.path }).collect()),
        };
        // Serialising plain strings into a Vec cannot fail.
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// The whole answer: status, `Content-Type`, the headers the error calls for (`Allow`,
    /// `Retry-After`, a key's quota) and the body, in whatever body type the server sends.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let mut response = Response::new(B::from(self.body()));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            Self::MethodNotAllowed { allow, .. } => {
                headers.insert(ALLOW, HeaderValue::from_static(allow));
            }
            Self::AdminUnauthenticated => {
                headers.insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::RateLimited(refused) => {
                headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(refused.retry_after)));
                refused.quota.write_headers(headers);
            }
            // SDKs retry a 503 after Retry-After: capacity frees in about a second.
            Self::NoHealthyBackend(_) | Self::Overloaded | Self::RateLimitUnavailable => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }

    /// The error as the last event of an SSE stream, in the shape OpenAI's SDKs raise as an
    /// API error: `data: {"error": {...}}`.
    pub fn sse_event(&self) -> Bytes {
        let body = self.body();
        let mut event = Vec::with_capacity(body.len() + 8);
        event.extend_from_slice(b"data: ");
        event.extend_from_slice(&body);
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }

    /// The error as the last event of a Responses API stream, in that API's own shape (its
    /// streams have typed events and no `[DONE]`): `event: error` with
    /// `{"type": "error", "code", "message", "param"}`.
    pub fn responses_sse_event(&self) -> Bytes {
        #[derive(serde::Serialize)]
        struct ErrorEvent<'a> {
            #[serde(rename = "type")]
            kind: &'static str,
            code: &'static str,
            message: &'a str,
            param: Option<&'a str>,
        }
        let message = self.to_string();
        let data = ErrorEvent { kind: "error", code: self.code(), message: &message, param: None };
        let mut event = b"event: error\ndata: ".to_vec();
        // Serialising plain strings into a Vec cannot fail.
        event.extend_from_slice(&serde_json::to_vec(&data).unwrap_or_default());
        event.extend_from_slice(b"\n\n");
        Bytes::from(event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Problem;
    use crate::limits::{LimitKind, Quota, Window};
    use http_body_util::BodyExt;

    fn json(bytes: &[u8]) -> serde_json::Value {
        serde_json::from_slice(bytes).unwrap()
    }

    fn refused() -> Refused {
        let quota =
            Quota { requests: Some(Window { limit: 60, remaining: 0, reset: Duration::from_secs(10) }), tokens: None };
        Refused { limit: LimitKind::Requests, size: 60, retry_after: Duration::from_millis(1200), quota }
    }

    /// The contract's error table (`../shared/CONTRACT.md`, "Errors") and the admin API's,
    /// one row per variant.
    fn every_variant() -> Vec<(GatewayError, u16, &'static str, &'static str)> {
        let a = || BackendName::new("a");
        vec![
            (GatewayError::InvalidRequest("bad".into()), 400, "invalid_request_error", "invalid_request"),
            (GatewayError::Unauthenticated(AuthFailure::Unknown), 401, "authentication_error", "invalid_api_key"),
            (GatewayError::ModelNotAllowed("m".into()), 403, "permission_error", "model_not_allowed"),
            (GatewayError::ModelNotFound("m".into()), 404, "invalid_request_error", "model_not_found"),
            (GatewayError::UnknownPath("/v1/x".into()), 404, "invalid_request_error", "not_found"),
            (
                GatewayError::MethodNotAllowed {
                    method: http::Method::GET,
                    path: "/v1/embeddings".into(),
                    allow: "POST",
                },
                405,
                "invalid_request_error",
                "method_not_allowed",
            ),
            (GatewayError::RateLimited(refused()), 429, "rate_limit_error", "rate_limit_exceeded"),
            (
                GatewayError::RateLimited(Refused { limit: LimitKind::Concurrency, size: 2, ..refused() }),
                429,
                "rate_limit_error",
                "concurrency_limit_exceeded",
            ),
            (GatewayError::RequestTooLarge { limit: 10 }, 413, "invalid_request_error", "request_too_large"),
            (GatewayError::RequestTimeout(Duration::from_secs(60)), 408, "invalid_request_error", "request_timeout"),
            (GatewayError::AdminUnauthenticated, 401, "authentication_error", "invalid_api_key"),
            (GatewayError::AdminForbidden("no"), 403, "permission_error", "admin_forbidden"),
            (GatewayError::HeaderTooLarge { limit: 1024 }, 431, "invalid_request_error", "request_header_too_large"),
            (GatewayError::Overloaded, 503, "server_error", "server_overloaded"),
            (GatewayError::RateLimitUnavailable, 503, "server_error", "rate_limit_unavailable"),
            (
                GatewayError::UpstreamUnavailable { backend: a(), cause: "refused".into() },
                502,
                "server_error",
                "upstream_unavailable",
            ),
            (
                GatewayError::UpstreamTimeout { backend: a(), after: Duration::from_secs(2) },
                504,
                "server_error",
                "upstream_timeout",
            ),
            (GatewayError::NoHealthyBackend("all out".into()), 503, "server_error", "no_healthy_backend"),
            (
                GatewayError::AnswerBroken { timed_out: false, message: "reset".into() },
                502,
                "server_error",
                "upstream_unavailable",
            ),
            (
                GatewayError::AnswerBroken { timed_out: true, message: "stalled".into() },
                504,
                "server_error",
                "upstream_timeout",
            ),
            (GatewayError::UnknownAdminPath("/x".into()), 404, "invalid_request_error", "not_found"),
            (GatewayError::ReloadUnavailable, 409, "invalid_request_error", "reload_unavailable"),
            (
                GatewayError::ConfigRefused(ConfigError::Invalid(vec![Problem::new("routes[0].model", "bad glob")])),
                422,
                "invalid_request_error",
                "invalid_config",
            ),
        ]
    }

    #[tokio::test]
    async fn every_error_renders_in_openai_shape_with_the_contract_codes() {
        for (error, status, kind, code) in every_variant() {
            let message = error.to_string();
            let response: Response<http_body_util::Full<Bytes>> = error.to_response();
            assert_eq!(response.status().as_u16(), status, "{error:?}");
            assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
            let body = json(&response.into_body().collect().await.unwrap().to_bytes());
            assert_eq!(body["error"]["type"], kind, "{error:?}");
            assert_eq!(body["error"]["code"], code, "{error:?}");
            assert_eq!(body["error"]["message"], message.as_str());
            assert!(body["error"]["param"].is_null());
            assert_eq!(body["error"].as_object().unwrap().len(), 4, "{body}");
        }
    }

    #[test]
    fn the_sse_error_event_is_the_same_body_as_an_event() {
        for (error, _, kind, code) in every_variant() {
            let event = error.sse_event();
            let text = std::str::from_utf8(&event).unwrap();
            let payload = text.strip_prefix("data: ").and_then(|t| t.strip_suffix("\n\n")).expect("one SSE event");
            assert_eq!(payload.as_bytes(), &error.body()[..]);
            let body = json(payload.as_bytes());
            assert_eq!((body["error"]["type"].as_str(), body["error"]["code"].as_str()), (Some(kind), Some(code)));
        }
    }

    #[test]
    fn the_body_keeps_the_field_order_clients_have_seen() {
        let body = GatewayError::ModelNotAllowed("m".into()).body();
        assert_eq!(
            &body[..],
            br#"{"error":{"code":"model_not_allowed","message":"this API key may not use model `m`","param":null,"type":"permission_error"}}"#
        );
    }

    #[test]
    fn a_refused_config_lists_its_problems_beside_the_error() {
        let problems = vec![Problem::new("backends[1].url", "bad"), Problem::new("routes[2].backends[0]", "unknown")];
        let body = json(&GatewayError::ConfigRefused(ConfigError::Invalid(problems)).body());
        assert_eq!(body["problems"][0]["path"], "backends[1].url");
        assert_eq!(body["problems"][1]["message"], "unknown");
        assert!(json(&GatewayError::ReloadUnavailable.body()).get("problems").is_none());
    }

    #[test]
    fn a_rate_limit_renders_429_with_retry_after_and_quota_headers() {
        let error = GatewayError::RateLimited(refused());
        let response: Response<http_body_util::Full<Bytes>> = error.to_response();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()[RETRY_AFTER], "2");
        assert_eq!(response.headers()["x-ratelimit-remaining-requests"], "0");
        assert!(error.to_string().contains("rate limit"));
        let response: Response<http_body_util::Full<Bytes>> =
            GatewayError::MethodNotAllowed { method: http::Method::GET, path: "/v1/x".into(), allow: "POST" }
                .to_response();
        assert_eq!(response.headers()[ALLOW], "POST");
    }

    #[test]
    fn only_a_rate_limit_says_rate_limit() {
        for (error, status, ..) in every_variant() {
            assert_eq!(error.to_string().contains("rate limit"), status == 429, "{error}");
        }
    }

    #[test]
    fn clients_get_general_words_and_operators_the_detail() {
        let timeout =
            GatewayError::UpstreamTimeout { backend: BackendName::new("gpu-7"), after: Duration::from_secs(1) };
        let unreachable = GatewayError::UpstreamUnavailable {
            backend: BackendName::new("gpu-7"),
            cause: "connection refused (os error 111)".into(),
        };
        let full = GatewayError::NoHealthyBackend("gpu-7 ejected for 4999 ms more".into());
        for error in [&timeout, &unreachable, &full] {
            let body = String::from_utf8_lossy(&error.body()).into_owned();
            assert!(!body.contains("gpu-7") && !body.contains("os error") && !body.contains("ms more"), "{body}");
            assert!(error.detail().unwrap().contains("gpu-7"));
        }
        assert_eq!(timeout.detail().unwrap(), "backend `gpu-7` did not answer within 1s");
        assert!(GatewayError::ModelNotFound("m".into()).detail().is_none());
    }
}
