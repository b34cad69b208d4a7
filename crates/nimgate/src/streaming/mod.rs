//! The response body the gateway sends: either one it wrote itself (errors, model lists,
//! health) or the upstream's body passed through frame by frame, never collected, never
//! re-chunked. Around the upstream body:
//! - metering (token-limited keys): usage read as it passes, the usage event nimgate asked
//!   for removed, the key's reservation settled with the real count when the answer ends;
//! - the backend's in-flight slot, held to the last byte;
//! - the idle timeout (longest gap between chunks) and the total deadline;
//! - a broken stream made detectable: once bytes went out the status cannot change, so when
//!   an SSE answer's upstream resets, stalls or closes before its end (`data: [DONE]`, or a
//!   Responses stream's terminal event: `end`), the client gets one final error event in the
//!   endpoint's shape (`data: {"error": ...}` as OpenAI's chat, `event: error` for the
//!   Responses API) and the stream ends without its usual end. A broken JSON answer ends with an error, which aborts the connection. Either
//!   way the backend hears of it (`Backend::observe`), as it does of a failed request.
//!
//! Dropping the body (the client left) drops the upstream body, which closes the upstream
//! connection so the backend stops generating.

pub mod end;
pub mod meter;
pub mod usage;

use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http::header::CONTENT_TYPE;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use prometheus::Histogram;
use tokio::time::{Instant, Sleep};

use crate::api::{Endpoint, StreamEnd};
use crate::error::GatewayError;
use crate::exchange::{Ending, Exchange};
use crate::limits::Permit;
use crate::metrics::Metrics;
use crate::request::TokenEstimate;
use crate::server::activity::Active;
use crate::upstream::headers::strip_response_headers;
use crate::upstream::{Answer, FailureKind, Lease, Outcome, Slot, root_cause};
use end::Completion;
pub use meter::Meter;
use meter::Metering;

/// Why an answer's body ended early, as the client's connection sees it.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// The body of every gateway response.
#[derive(Debug)]
pub struct ResponseBody {
    kind: Kind,
    /// The request's place on its client connection, given up with the body.
    active: Option<Active>,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    /// Boxed and pinned: the timer inside must not move.
    Upstream(Pin<Box<Forwarded>>),
}

/// How an upstream body is forwarded.
#[derive(Debug)]
pub struct Forwarding {
    /// The backend's in-flight slot, released at the last byte.
    pub slot: Option<Slot>,
    /// The upstream connection, given back when the body is dropped.
    pub lease: Lease,
    /// Token metering, for keys with a token limit.
    pub meter: Option<Meter>,
    /// A 2xx `text/event-stream` answer: it must end as its endpoint's streams do.
    pub sse: bool,
    pub stream_end: StreamEnd,
    pub idle_timeout: Duration,
    pub deadline: Option<Instant>,
    /// Where the answer's duration, chunk gaps and failures are recorded.
    pub observe: Observe,
}

/// Where an answer comes from, for its metering and metric labels.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    pub metrics: &'a Arc<Metrics>,
    /// The route's model pattern and the key's name: labels from the configuration only.
    pub model: &'a str,
    pub key: &'a str,
    /// When the request arrived.
    pub started: Instant,
    /// The client asked for a stream.
    pub stream: bool,
    pub estimate: TokenEstimate,
    pub endpoint: Endpoint,
}

/// The answer to pass back: the upstream's head (hop-by-hop headers removed) and its body
/// forwarded frame by frame, holding the backend's slot to the last byte, metered (settling
/// `permit` with the real usage) and timed.
pub fn forward(answer: Answer, permit: Option<Permit>, origin: Origin<'_>) -> Response<ResponseBody> {
    let Answer { slot, response, lease, usage_requested, deadline, .. } = answer;
    let Origin { metrics, model, key, started, stream, estimate, endpoint } = origin;
    let backend = slot.backend();
    let label = backend.name.as_str();
    let success = response.status().is_success();
    let sse = success && is_event_stream(response.headers());
    let (first_byte, duration) = metrics.timings(model, label);
    let observe = Observe {
        metrics: Arc::clone(metrics),
        started,
        first_byte: Some(first_byte),
        duration: Some(duration),
        chunk_gap: sse.then(|| metrics.chunk_gap(model, label)),
    };
    let meter = (permit.is_some() || success).then(|| Meter {
        permit,
        tokens: success.then(|| metrics.token_counters(model, key)),
        success,
        stream,
        strip_usage_event: usage_requested,
        prompt_estimate: estimate.prompt,
    });
    let idle_timeout = backend.timeouts.idle;
    let stream_end = endpoint.stream_end();
    let forwarding = Forwarding { meter, sse, stream_end, idle_timeout, deadline, observe, slot: Some(slot), lease };
    let mut response = response.map(|upstream| ResponseBody::upstream(upstream, forwarding));
    strip_response_headers(response.headers_mut());
    response
}

fn is_event_stream(headers: &http::HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"))
}

/// The metric series one answer records into, resolved once when its head arrives.
#[derive(Debug)]
pub struct Observe {
    pub metrics: Arc<Metrics>,
    pub started: Instant,
    /// Time to the answer's first body byte (a stream's first token: NIM sends a stream's
    /// head before generating). Taken when recorded.
    pub first_byte: Option<Histogram>,
    /// Taken when recorded.
    pub duration: Option<Histogram>,
    /// SSE answers only: gaps between chunks, from the first chunk on.
    pub chunk_gap: Option<Histogram>,
}

impl Observe {
    /// Records the answer's duration, once: at its end, or when it is dropped (hyper drops a
    /// body it knows to be complete without polling its end; a client may leave).
    fn finish(&mut self) {
        if let Some(duration) = self.duration.take() {
            duration.observe(self.started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Observe {
    fn drop(&mut self) {
        self.finish();
    }
}

impl ResponseBody {
    /// A body written by the gateway.
    pub fn full(bytes: Bytes) -> Self {
        Self { kind: Kind::Full(Some(bytes)), active: None }
    }

    /// An upstream body, forwarded as it arrives.
    pub fn upstream(body: Incoming, forwarding: Forwarding) -> Self {
        Self { kind: Kind::Upstream(Box::pin(Forwarded::new(body, forwarding))), active: None }
    }

    /// Keeps the request counted as in flight on its connection until the body is done.
    pub fn hold(&mut self, active: Active) {
        self.active = Some(active);
    }

    /// Hands the request's record to an upstream body, which finishes it at its end (with the
    /// time to its first body byte); gives it back for any other body, whose request is over
    /// now.
    pub fn carry(&mut self, mut exchange: Exchange) -> Option<Exchange> {
        match &mut self.kind {
            Kind::Upstream(forwarded) => {
                *forwarded.as_mut().project().exchange = Some(exchange);
                None
            }
            Kind::Full(_) => {
                exchange.ttfb = Some(exchange.started.elapsed());
                Some(exchange)
            }
        }
    }
}

impl From<Bytes> for ResponseBody {
    fn from(bytes: Bytes) -> Self {
        Self::full(bytes)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(forwarded) => forwarded.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(forwarded) => forwarded.ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            // Removing the usage event, or adding an error event, changes the length.
            Kind::Upstream(forwarded) if forwarded.sse || forwarded.metering.is_some() => SizeHint::default(),
            Kind::Upstream(forwarded) => forwarded.inner.size_hint(),
        }
    }
}

pin_project_lite::pin_project! {
    #[derive(Debug)]
    struct Forwarded {
        inner: Incoming,
        // Dropped after `inner`: the connection goes back once the answer is done with.
        lease: Lease,
        metering: Option<Metering>,
        slot: Option<Slot>,
        sse: bool,
        // Has the stream ended as its endpoint's streams do?
        completion: Completion,
        ended: bool,
        // A data frame went out: the first byte's time is recorded, gaps are counted from it.
        seen_data: bool,
        idle_timeout: Duration,
        deadline: Option<Instant>,
        last_frame: Instant,
        observe: Observe,
        exchange: Option<Exchange>,
        // Body bytes sent to the client.
        bytes: u64,
        // How the answer ended, for the access log, and why when it broke.
        outcome: &'static str,
        cause: Option<String>,
        // Armed for min(last_frame + idle, deadline); moved forward lazily, only when it fires.
        #[pin]
        timer: Sleep,
        // The waker the timer holds, if it holds one: while the body is polled with the same
        // waker and the timer has not fired, polling the timer again changes nothing.
        timer_waker: Option<Waker>,
    }

    impl PinnedDrop for Forwarded {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            // hyper stops polling a body whose declared length it has sent: that is an end.
            if !*this.ended && this.inner.is_end_stream() {
                *this.outcome = "complete";
            }
            this.observe.finish();
            let tokens = this.metering.as_mut().and_then(|metering| {
                metering.settle();
                metering.counted
            });
            let ending =
                Ending { tokens, bytes: *this.bytes, outcome: this.outcome, cause: this.cause.as_deref(), error: None };
            match this.exchange.take() {
                Some(exchange) => exchange.finish(&ending),
                None if this.cause.is_some() => {
                    tracing::warn!(outcome = *this.outcome, cause = ?this.cause, "answer broken after its head was sent");
                }
                None => {}
            }
        }
    }
}

/// How an upstream answer broke.
struct Broken {
    kind: FailureKind,
    message: String,
}

impl Forwarded {
    fn new(inner: Incoming, f: Forwarding) -> Self {
        let now = Instant::now();
        let first = f.deadline.map_or(now + f.idle_timeout, |d| d.min(now + f.idle_timeout));
        Self {
            inner,
            lease: f.lease,
            metering: f.meter.map(Metering::new),
            slot: f.slot,
            sse: f.sse,
            completion: Completion::new(f.stream_end),
            ended: false,
            seen_data: false,
            idle_timeout: f.idle_timeout,
            deadline: f.deadline,
            last_frame: now,
            observe: f.observe,
            exchange: None,
            bytes: 0,
            outcome: "client left",
            cause: None,
            timer: tokio::time::sleep_until(first),
            timer_waker: None,
        }
    }

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut this = self.project();
        if *this.ended {
            return Poll::Ready(None);
        }
        loop {
            let polled = Pin::new(&mut *this.inner).poll_frame(cx);
            let broken = match polled {
                Poll::Ready(Some(Ok(frame))) => {
                    let now = Instant::now();
                    if *this.seen_data {
                        if let Some(gap) = &this.observe.chunk_gap {
                            gap.observe(now.duration_since(*this.last_frame).as_secs_f64());
                        }
                    } else if frame.is_data() {
                        *this.seen_data = true;
                        let ttfb = now.duration_since(this.observe.started);
                        if let Some(first_byte) = this.observe.first_byte.take() {
                            first_byte.observe(ttfb.as_secs_f64());
                        }
                        if let Some(exchange) = this.exchange.as_mut() {
                            exchange.ttfb = Some(ttfb);
                        }
                    }
                    *this.last_frame = now;
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    if *this.sse {
                        this.completion.push(&data);
                    }
                    let out = match this.metering {
                        Some(metering) => {
                            let out = metering.on_data(data);
                            // The end for the client, who may send its next request the moment
                            // it has read it, before the body formally ends: settled before it
                            // goes out. Told by the stream's last bytes, so a `[DONE]` in the
                            // text of a chunk is no end.
                            if *this.sse && this.completion.complete() {
                                metering.settle();
                            }
                            out
                        }
                        None => data,
                    };
                    // A frame that only began an event waits, whole, for its end.
                    if out.is_empty() {
                        continue;
                    }
                    *this.bytes += out.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(out))));
                }
                Poll::Ready(None) if !*this.sse || this.completion.complete() => {
                    *this.ended = true;
                    *this.outcome = "complete";
                    this.observe.finish();
                    let rest = this.metering.as_mut().map(Metering::on_end).unwrap_or_default();
                    *this.bytes += rest.len() as u64;
                    this.slot.take();
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
                Poll::Ready(None) => Broken {
                    kind: FailureKind::StreamBroken,
                    message: "the backend closed the stream before it was complete".into(),
                },
                Poll::Ready(Some(Err(e))) => Broken {
                    kind: FailureKind::Reset,
                    message: format!("the backend's stream broke: {}", root_cause(&e)),
                },
                Poll::Pending => {
                    // A stream waits for its next chunk many times; the timer needs registering
                    // once, not at every wait.
                    if this.timer_waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) && !this.timer.is_elapsed() {
                        return Poll::Pending;
                    }
                    // Polled outside tokio's cooperative budget: a timer the budget turned away
                    // would return Pending without holding the waker, and the shortcut above
                    // would then wait for a wake that never comes.
                    if pin!(tokio::task::unconstrained(this.timer.as_mut())).poll(cx).is_pending() {
                        *this.timer_waker = Some(cx.waker().clone());
                        return Poll::Pending;
                    }
                    // Fired: moved forward below, or the stream ends.
                    *this.timer_waker = None;
                    let now = Instant::now();
                    let idle_end = *this.last_frame + *this.idle_timeout;
                    let past_deadline = this.deadline.is_some_and(|d| now >= d);
                    if now < idle_end && !past_deadline {
                        let next = this.deadline.map_or(idle_end, |d| d.min(idle_end));
                        this.timer.as_mut().reset(next);
                        continue;
                    }
                    let message = if past_deadline {
                        "the answer did not complete within the backend's total timeout".to_owned()
                    } else {
                        format!("the backend sent nothing for {}", humantime::format_duration(*this.idle_timeout))
                    };
                    Broken { kind: FailureKind::Timeout, message }
                }
            };
            *this.ended = true;
            *this.outcome = broken.kind.as_str();
            this.observe.finish();
            if let Some(metering) = this.metering.as_mut() {
                metering.settle();
            }
            // The backend hears of it as of a failed request: counted, and ejected and
            // logged when it keeps failing.
            if let Some(slot) = this.slot.take() {
                let outcome = Outcome::Failed { kind: broken.kind, cause: &broken.message };
                slot.backend().observe(outcome, &this.observe.metrics);
            }
            // Logged once, in the request's access line, with this cause.
            *this.cause = Some(broken.message.clone());
            if *this.sse {
                let timed_out = broken.kind == FailureKind::Timeout;
                // The client hears what happened in general words; the cause is logged.
                let message = if timed_out {
                    "the answer stalled or ran past its time limit and was cut short"
                } else {
                    "the backend's answer broke before it was complete"
                };
                let error = GatewayError::AnswerBroken { timed_out, message: message.into() };
                let event = match this.completion {
                    Completion::Done(_) => error.sse_event(),
                    Completion::Terminal(_) => error.responses_sse_event(),
                };
                *this.bytes += event.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(event))));
            }
            return Poll::Ready(Some(Err("the backend's answer broke before it was complete".into())));
        }
    }
}
