//! The access log: one line per request (target `nimgate::access`), written when the request
//! is over: at once for answers nimgate writes itself, at the last byte (or when the client
//! leaves) for upstream answers, so that a stream's line carries its duration, tokens and
//! bytes. Never a key or a prompt: key names, route models and backend names only, and the
//! model string as the client sent it. Field values are computed inside the macro, so a line
//! filtered out by `NIMGATE_LOG` costs nothing.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method};
use tokio::time::Instant;

use crate::auth::Key;
use crate::error::GatewayError;
use crate::pool::BackendName;
use crate::routing::Route;

/// What the log says about a request, filled in as the request goes.
#[derive(Debug)]
pub struct AccessRecord {
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

impl AccessRecord {
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
        }
    }

    /// Writes the line.
    pub fn write(&self, ending: &Ending<'_>) {
        let ms = |d: Duration| d.as_micros() as f64 / 1000.0;
        macro_rules! access {
            ($level:ident, $($extra:tt)*) => {
                tracing::$level!(
                    target: "nimgate::access",
                    request_id = self.request_id.to_str().unwrap_or("-"),
                    method = %self.method,
                    path = self.path,
                    key = self.key.as_ref().map_or("-", |k| k.name.as_str()),
                    model = self.model.as_deref().unwrap_or("-"),
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
            Some(e) if e.status().is_server_error() => access!(warn, code = e.code(), error = %e, "request failed"),
            Some(e) => access!(info, code = e.code(), error = %e, "request refused"),
            None if ending.cause.is_some() => {
                access!(warn, error = ending.cause.unwrap_or_default(), "answer broken after its head was sent")
            }
            None if ending.outcome != "complete" => access!(info, "client left before the end"),
            None => access!(info, "request"),
        }
    }
}
