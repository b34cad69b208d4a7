//! One request's record, filled in as it goes, and its end: what the gateway writes about a
//! request is written here, once.
//! - When the answer's head is ready (`respond`): the key's quota headers and the request id on
//!   the answer, and `requests_total` (and `rate_limited_total`) counted. Metric labels come
//!   from the configuration only: a model without a route is counted under `-`, never under
//!   the name the client sent.
//! - When the request is over (`finish`): the access log line (target `nimgate::access`), at
//!   once for answers nimgate writes itself, at the last byte (or when the client leaves) for
//!   upstream answers, so that a stream's line carries its duration, tokens and bytes. Never a
//!   key or a prompt: key names, route models and backend names only, and the model string as
//!   the client sent it. Field values are computed inside the macro, so a line filtered out by
//!   `NIMGATE_LOG` costs nothing.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Response};
use tokio::time::Instant;

use crate::auth::Key;
use crate::error::GatewayError;
use crate::limits::{Admission, Limiter, Quota};
use crate::logsafe::Clean;
use crate::metrics::{Metrics, NONE};
use crate::routing::Route;
use crate::upstream::headers::X_REQUEST_ID;
use crate::upstream::{Answer, BackendName};

/// What is known about a request, filled in as the request goes.
#[derive(Debug)]
pub struct Exchange {
    pub request_id: HeaderValue,
    pub method: Method,
    /// One of the paths nimgate serves, or `other`.
    pub path: &'static str,
    pub started: Instant,
    pub key: Option<Arc<Key>>,
    /// As the client sent it.
    pub model: Option<Box<str>>,
    pub route: Option<Arc<Route>>,
    pub backend: Option<BackendName>,
    /// Backends tried.
    pub attempts: u32,
    pub status: u16,
    /// Time to the answer's first body byte (a stream's first token); for answers nimgate
    /// writes itself, to when it was ready. None when no byte went out.
    pub ttfb: Option<Duration>,
    /// The key's quota as admission left it.
    pub quota: Option<Quota>,
}

/// How the request ended.
#[derive(Debug, Default)]
pub struct Ending<'a> {
    /// Prompt and completion tokens, reported or estimated.
    pub tokens: Option<(u64, u64)>,
    /// Body bytes sent to the client.
    pub bytes: u64,
    /// `complete`, `client left`, or how the upstream answer broke.
    pub outcome: &'static str,
    /// Why it broke, when it did.
    pub cause: Option<&'a str>,
    /// The gateway's own error, for answers it refused or failed.
    pub error: Option<&'a GatewayError>,
}

impl Exchange {
    /// The record of a request that arrived at `started`.
    pub fn new(request_id: HeaderValue, method: Method, path: &'static str, started: Instant) -> Self {
        Self {
            request_id,
            method,
            path,
            started,
            key: None,
            model: None,
            route: None,
            backend: None,
            attempts: 0,
            status: 0,
            ttfb: None,
            quota: None,
        }
    }

    /// The request was admitted under its key's limits.
    pub fn admitted(&mut self, admission: Option<&Admission>) {
        self.quota = admission.map(|a| a.quota);
    }

    /// A backend answered (after `answer.attempts` tries).
    pub fn answered_by(&mut self, answer: &Answer) {
        self.backend = Some(answer.slot.backend().name.clone());
        self.attempts = answer.attempts;
    }

    /// The answer's head is ready: every answer to a limited key says where its limits stand
    /// (a 429 has written its own), every answer carries the request id, and the request is
    /// counted.
    pub async fn respond<B>(
        &mut self,
        response: &mut Response<B>,
        error: Option<&GatewayError>,
        limiter: &Limiter,
        metrics: &Metrics,
    ) {
        let quota = match (self.quota, &self.key) {
            _ if matches!(error, Some(GatewayError::RateLimited(_))) => None,
            (Some(quota), _) => Some(quota),
            (None, Some(key)) => limiter.peek(key).await,
            (None, None) => None,
        };
        // One growth of the header map for everything added here.
        let headers = response.headers_mut();
        headers.reserve(quota.map_or(0, |q| q.header_count()) + 1);
        if let Some(quota) = quota {
            quota.write_headers(headers);
        }
        headers.insert(X_REQUEST_ID, self.request_id.clone());
        self.status = response.status().as_u16();
        self.count(error, metrics);
    }

    /// `requests_total` and, for refusals, `rate_limited_total`.
    fn count(&self, error: Option<&GatewayError>, metrics: &Metrics) {
        let model = self.route.as_ref().map_or(NONE, |r| r.pattern.as_str());
        let key = self.key.as_ref().map_or(NONE, |k| k.name.as_str());
        let backend = match (&self.backend, error) {
            (Some(backend), _) => backend.as_str(),
            (
                None,
                Some(GatewayError::UpstreamUnavailable { backend, .. } | GatewayError::UpstreamTimeout { backend, .. }),
            ) => backend.as_str(),
            (None, _) => NONE,
        };
        metrics.request(model, backend, key, self.status);
        if let Some(GatewayError::RateLimited(refused)) = error {
            metrics.rate_limited(key, refused.limit.as_str());
        }
    }

    /// The request is over: writes its access line.
    pub fn finish(&self, ending: &Ending<'_>) {
        let ms = |d: Duration| d.as_micros() as f64 / 1000.0;
        macro_rules! access {
            ($level:ident, $($extra:tt)*) => {
                tracing::$level!(
                    target: "nimgate::access",
                    request_id = self.request_id.to_str().unwrap_or("-"),
                    method = %self.method,
                    path = self.path,
                    key = self.key.as_ref().map_or("-", |k| k.name.as_str()),
                    model = %Clean(self.model.as_deref().unwrap_or("-")),
                    route = self.route.as_ref().map_or("-", |r| r.pattern.as_str()),
                    backend = self.backend.as_ref().map_or("-", BackendName::as_str),
                    attempts = self.attempts,
                    status = self.status,
                    duration_ms = ms(self.started.elapsed()),
                    ttfb_ms = self.ttfb.map(ms),
                    prompt_tokens = ending.tokens.map(|t| t.0),
                    completion_tokens = ending.tokens.map(|t| t.1),
                    bytes = ending.bytes,
                    outcome = ending.outcome,
                    $($extra)*
                )
            };
        }
        match ending.error {
            Some(e) if e.status().is_server_error() => {
                access!(warn, code = e.code(), error = %Clean(e), detail = e.detail().as_deref().map(|d| tracing::field::display(Clean(d))), "request failed")
            }
            Some(e) => access!(info, code = e.code(), error = %Clean(e), "request refused"),
            None if ending.cause.is_some() => {
                access!(warn, error = ending.cause.unwrap_or_default(), "answer broken after its head was sent")
            }
            None if ending.outcome != "complete" => access!(info, "client left before the end"),
            None => access!(info, "request"),
        }
    }
}
