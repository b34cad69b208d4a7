//! Sending a request through a route's pool: a backend picked by the balancer, the request
//! built for it, the first-byte timeout, and retries on another backend before any byte reached
//! the client (connect errors, resets, first-byte timeouts, upstream 502/503, and 429 when
//! another backend has room), bounded by `max_attempts` and the route's retry budget. Every
//! attempt's outcome goes to the backend's passive health (`Backend::observe`). An attempt's
//! error says where it is made whether the backend can have received the request, so the
//! retry decision rests on facts; `GatewayError` is made from `UpstreamError` where it leaves
//! this module.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::RETRY_AFTER;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::Instant;

use super::backend::Backend;
use super::backend::BackendName;
use super::balance::Tried;
use super::connections::Lease;
use super::error::ClientError;
use super::headers;
use super::health::{FailureKind, Outcome, Overload};
use super::pool::{NoBackend, Pick, Pool, Slot};
use crate::api::Endpoint;
use crate::metrics::Metrics;

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

/// Why one attempt on one backend brought no response head.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// No connection could be made: the backend received nothing.
    #[error("backend `{backend}` refused the connection: {cause}")]
    Connect { backend: BackendName, cause: String },
    /// The request was (maybe partly) sent and the connection failed before a response head.
    #[error("backend `{backend}` failed: {cause}")]
    Failed { backend: BackendName, cause: String },
    #[error("backend `{backend}` sent no response within {after:?}")]
    Timeout { backend: BackendName, after: Duration },
}

impl AttemptError {
    /// How the failure counts against the backend.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::Connect { .. } => FailureKind::Connect,
            Self::Failed { .. } => FailureKind::Reset,
            Self::Timeout { .. } => FailureKind::Timeout,
        }
    }

    /// What went wrong, without the backend's name (logs and health records carry it apart).
    pub fn cause(&self) -> String {
        match self {
            Self::Connect { cause, .. } | Self::Failed { cause, .. } => cause.clone(),
            Self::Timeout { after, .. } => format!("no response within {}", humantime::format_duration(*after)),
        }
    }

    /// Whether the backend may have worked on the request. Retrying one that never received
    /// it adds no load, so such a retry does not draw on the retry budget.
    pub fn reached_backend(&self) -> bool {
        !matches!(self, Self::Connect { .. })
    }
}

/// Why `send` has no answer to pass on.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The last attempt failed and no other could be made.
    #[error(transparent)]
    Attempt(#[from] AttemptError),
    /// No backend could take the request: every one out of rotation, or full and the wait
    /// for room over. The message says each backend's state.
    #[error("no backend can take this request: {0}")]
    NoBackend(String),
}

/// What one attempt came to, for the retry decision.
enum Attempt {
    /// An answer to pass on.
    Final(Response<Incoming>),
    /// An answer another backend may do better than (502, 503, 429); passed on if none can.
    Retryable(Response<Incoming>),
    /// No answer; another backend may be tried.
    Failed(AttemptError),
}

/// Sends the request through the pool and returns the response head to pass on; the body
/// streams on from there. `started` is when the request arrived: a backend's total timeout
/// counts from then.
pub async fn send(
    pool: &Pool,
    pick: Pick<'_>,
    outgoing: &Outgoing<'_>,
    started: Instant,
    metrics: &Metrics,
    model: &str,
) -> Result<Answer, UpstreamError> {
    pool.budget().deposit();
    let mut waited = None;
    let acquired = match pool.acquire_now(pick) {
        Some(picked) => picked,
        None => pool.acquire_queued(pick, &mut waited).await,
    };
    if let Some(waited) = waited {
        metrics.queue_wait(model).observe(waited.as_secs_f64());
        metrics.key_queue_wait(pick.key.map_or(crate::metrics::NONE, |k| k)).observe(waited.as_secs_f64());
    }
    let mut slot = acquired.map_err(|e| no_backend(pool, &e))?;
    if let Some(decision) = slot.affinity() {
        metrics.affinity_decision(model, decision.as_str());
    }
    let mut tried = Tried::default();
    let retries_possible = pool.max_attempts() > 1 && pool.members().all().nth(1).is_some();
    let mut attempts = 0;
    loop {
        attempts += 1;
        tried.add(slot.member());
        let backend = slot.backend();
        let (bytes, usage_requested) = outgoing.body.for_backend(backend);
        let last_chance = !retries_possible || attempts >= pool.max_attempts();
        let headers = headers::upstream_headers(outgoing.client_headers, outgoing.request_id);
        let request = headers::request(backend, outgoing.endpoint, headers, bytes);
        let deadline = backend.timeouts.total.map(|total| started + total);
        // `send_one`'s steps, inline: an async level less to move the request through.
        let after = first_byte_limit(backend, deadline);
        let sent = tokio::time::timeout(after, backend.client.send(request)).await;
        let (outcome, lease) = match attempt_result(backend, after, sent) {
            Ok((response, lease)) => (Ok(response), lease),
            Err(e) => (Err(e), Lease::default()),
        };
        let (retry_reason, outcome) = match judge(pool, backend, outcome, metrics) {
            Attempt::Final(response) => {
                return Ok(Answer { slot, response, lease, usage_requested, attempts, deadline });
            }
            Attempt::Retryable(response) => (format!("answered {}", response.status()), Ok(response)),
            Attempt::Failed(e) => (e.cause(), Err(e)),
        };
        let out_of_time = deadline.is_some_and(|d| Instant::now() >= d);
        let next = if last_chance || out_of_time { None } else { pool.try_acquire(pick, tried).ok() };
        // The budget is spent only when there is somewhere to retry, and not on an error by
        // which the backend never got the request: retrying that adds no load.
        let free = outcome.as_ref().is_err_and(|e| !e.reached_backend());
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

/// Sorts an attempt's outcome for the retry decision and reports it to the backend's passive
/// health: connect errors, resets, timeouts and 5xx count toward ejection; a 429, or a 503 with
/// `Retry-After`, may take the backend out for that long (`Outcome::Overloaded`).
fn judge(
    pool: &Pool,
    backend: &Backend,
    outcome: Result<Response<Incoming>, AttemptError>,
    metrics: &Metrics,
) -> Attempt {
    let mut response = match outcome {
        Ok(response) => response,
        Err(e) => {
            backend.observe(Outcome::Failed { kind: e.kind(), cause: &e.cause() }, metrics);
            return Attempt::Failed(e);
        }
    };
    let status = response.status();
    // Only an overloaded backend's answer says how long to stay away; what reaches the
    // client is the value as read, in whole seconds, or nothing when it made no sense.
    let retry_after = match status.as_u16() {
        429 | 503 => normalize_retry_after(response.headers_mut(), SystemTime::now()),
        _ => None,
    };
    let overloaded = |status, out_for| Outcome::Overloaded {
        status,
        out_for: Duration::min(out_for, backend.ejection.max),
        others_can_serve: pool.others_in_rotation(backend),
    };
    match (status.as_u16(), retry_after) {
        (429, _) => {
            backend
                .observe(overloaded(Overload::TooManyRequests, retry_after.unwrap_or(backend.ejection.base)), metrics);
            Attempt::Retryable(response)
        }
        (503, Some(out_for)) => {
            backend.observe(overloaded(Overload::UnavailableWithRetryAfter, out_for), metrics);
            Attempt::Retryable(response)
        }
        (500..=599, _) => {
            let cause = format!("answered {status}");
            backend.observe(Outcome::Failed { kind: FailureKind::Status5xx, cause: &cause }, metrics);
            if matches!(status.as_u16(), 502 | 503) { Attempt::Retryable(response) } else { Attempt::Final(response) }
        }
        _ => {
            backend.observe(Outcome::Answered, metrics);
            Attempt::Final(response)
        }
    }
}

/// The longest `Retry-After` passed on to a client.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Reads `Retry-After` (whole seconds, or an HTTP-date counted from `now`) and writes it back
/// as whole seconds between 1 and an hour; removes a value that is neither (`-5`, `soon`).
fn normalize_retry_after(headers: &mut HeaderMap, now: SystemTime) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?;
    let parsed = value.to_str().ok().map(str::trim).and_then(|text| match text.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => httpdate::parse_http_date(text).ok().map(|at| at.duration_since(now).unwrap_or_default()),
    });
    let Some(wait) = parsed else {
        headers.remove(RETRY_AFTER);
        return None;
    };
    let wait = wait.clamp(Duration::from_secs(1), MAX_RETRY_AFTER);
    headers.insert(RETRY_AFTER, HeaderValue::from(wait.as_secs()));
    Some(wait)
}

/// Why nothing could take the request, with each backend's state.
fn no_backend(pool: &Pool, why: &NoBackend) -> UpstreamError {
    let states = pool.describe();
    UpstreamError::NoBackend(match why {
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
) -> Result<(Response<Incoming>, Lease), AttemptError> {
    let after = first_byte_limit(backend, deadline);
    attempt_result(backend, after, tokio::time::timeout(after, backend.client.send(request)).await)
}

/// How long an attempt on `backend` may wait for its answer's head: the backend's first-byte
/// timeout, cut short by the request's deadline.
fn first_byte_limit(backend: &Backend, deadline: Option<Instant>) -> Duration {
    let after = backend.timeouts.first_byte;
    deadline.map_or(after, |deadline| after.min(deadline.saturating_duration_since(Instant::now())))
}

/// An attempt's result, its errors named after `backend`; `after` is the limit it ran under.
fn attempt_result(
    backend: &Backend,
    after: Duration,
    sent: Result<Result<(Response<Incoming>, Lease), ClientError>, tokio::time::error::Elapsed>,
) -> Result<(Response<Incoming>, Lease), AttemptError> {
    match sent {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(ClientError::Connect(cause))) => Err(AttemptError::Connect { backend: backend.name.clone(), cause }),
        Ok(Err(ClientError::Failed(cause))) => Err(AttemptError::Failed { backend: backend.name.clone(), cause }),
        Err(_) => Err(AttemptError::Timeout { backend: backend.name.clone(), after }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalized(value: &str, now: SystemTime) -> (Option<Duration>, Option<String>) {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, HeaderValue::from_str(value).unwrap());
        let wait = normalize_retry_after(&mut headers, now);
        (wait, headers.get(RETRY_AFTER).map(|v| v.to_str().unwrap().to_owned()))
    }

    #[test]
    fn retry_after_is_read_in_seconds_or_as_an_http_date_and_passed_on_sane() {
        let now = httpdate::parse_http_date("Thu, 03 Dec 2026 06:00:00 GMT").unwrap();
        assert_eq!(normalized("7", now), (Some(Duration::from_secs(7)), Some("7".into())));
        assert_eq!(normalized(" 0 ", now), (Some(Duration::from_secs(1)), Some("1".into())));
        assert_eq!(
            normalized("Thu, 03 Dec 2026 06:00:42 GMT", now),
            (Some(Duration::from_secs(42)), Some("42".into()))
        );
        assert_eq!(normalized("Wed, 02 Dec 2026 06:00:00 GMT", now).1, Some("1".into()), "a date past is now");
        assert_eq!(normalized("99999999999999", now), (Some(MAX_RETRY_AFTER), Some("3600".into())));
        for nonsense in ["-5", "soon", "1.5"] {
            assert_eq!(normalized(nonsense, now), (None, None), "{nonsense}");
        }
    }
}
