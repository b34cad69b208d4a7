//! The response body the gateway sends: either one it wrote itself (errors, model lists,
//! health), the upstream's body passed through frame by frame, or the same with metering: its
//! usage read as it passes (and the usage event nimgate asked for removed) so that the key's
//! token reservation is settled with the real count when the answer ends. Never collected,
//! never re-chunked. Dropping it (the client left) drops the upstream body, which closes the
//! upstream connection so the backend stops generating.

pub mod usage;

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::limits::Permit;
use usage::{ContentCounter, UsageEventStripper, UsageScanner};

/// The body of every gateway response.
#[derive(Debug)]
pub struct ResponseBody {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Full(Option<Bytes>),
    Upstream(Incoming),
    /// Boxed: only token-limited keys pay for its size.
    Metered(Box<Metered>),
}

impl ResponseBody {
    /// A body written by the gateway.
    pub fn full(bytes: Bytes) -> Self {
        Self { kind: Kind::Full(Some(bytes)) }
    }

    /// An upstream body, forwarded as it arrives.
    pub fn upstream(body: Incoming) -> Self {
        Self { kind: Kind::Upstream(body) }
    }

    /// An upstream body forwarded as it arrives while its usage settles `meter`'s permit.
    pub fn metered(body: Incoming, meter: Meter) -> Self {
        Self { kind: Kind::Metered(Box::new(Metered::new(body, meter))) }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match &mut self.kind {
            Kind::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream(body) => Pin::new(body).poll_frame(cx),
            Kind::Metered(metered) => metered.poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(bytes) => bytes.is_none(),
            Kind::Upstream(body) => body.is_end_stream(),
            Kind::Metered(metered) => metered.ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Kind::Full(None) => SizeHint::with_exact(0),
            Kind::Upstream(body) => body.size_hint(),
            // Removing the usage event changes the length.
            Kind::Metered(metered) if metered.stripper.is_some() => SizeHint::default(),
            Kind::Metered(metered) => metered.inner.size_hint(),
        }
    }
}

/// How one answer is metered.
#[derive(Debug)]
pub struct Meter {
    pub permit: Permit,
    /// The upstream answered 2xx (an error answer costs no tokens).
    pub success: bool,
    /// The answer is an SSE stream.
    pub stream: bool,
    /// nimgate added `stream_options.include_usage`, so the usage event is not the client's.
    pub strip_usage_event: bool,
    /// The prompt's share of the admission estimate, for answers without reported usage.
    pub prompt_estimate: u64,
}

#[derive(Debug)]
struct Metered {
    inner: Incoming,
    permit: Option<Permit>,
    success: bool,
    prompt_estimate: u64,
    scanner: UsageScanner,
    stripper: Option<UsageEventStripper>,
    /// Streams only: text events seen, for an estimate when no usage arrives.
    counter: Option<ContentCounter>,
    ended: bool,
}

impl Metered {
    fn new(inner: Incoming, meter: Meter) -> Self {
        Self {
            inner,
            permit: Some(meter.permit),
            success: meter.success,
            prompt_estimate: meter.prompt_estimate,
            scanner: UsageScanner::default(),
            stripper: meter.strip_usage_event.then(UsageEventStripper::default),
            counter: meter.stream.then(ContentCounter::default),
            ended: false,
        }
    }

    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        loop {
            match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    let data = match frame.into_data() {
                        Ok(data) => data,
                        Err(frame) => return Poll::Ready(Some(Ok(frame))),
                    };
                    if self.success {
                        self.scanner.feed(&data);
                        match &mut self.counter {
                            Some(counter) => {
                                counter.feed(&data);
                                // `[DONE]` ends the stream for the client, which may send its
                                // next request before the body formally ends.
                                if memchr::memmem::find(&data, b"[DONE]").is_some() {
                                    self.settle();
                                }
                            }
                            // A JSON answer's usage is final: settle before its last bytes go
                            // out, so a client that sends its next request the moment it has
                            // read this one finds the refund already made.
                            None if self.scanner.usage().is_some() => self.settle(),
                            None => {}
                        }
                    }
                    let out = match &mut self.stripper {
                        Some(stripper) => stripper.process(data),
                        None => data,
                    };
                    // A frame that only began an event waits, whole, for its end.
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(out))));
                    }
                }
                Some(Err(e)) => {
                    self.settle();
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    self.ended = true;
                    self.settle();
                    let rest = self.stripper.as_mut().map(UsageEventStripper::finish).unwrap_or_default();
                    return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
                }
            }
        }
    }

    /// Replaces the reservation with the best count there is: reported usage, else an estimate
    /// from the stream, else (a whole JSON answer cut short) the reservation itself.
    fn settle(&mut self) {
        let Some(permit) = self.permit.take() else { return };
        let (used, source) = match (self.success, self.scanner.usage(), &self.counter) {
            (false, _, _) => (0, "error answer"),
            (true, Some(usage), _) => (usage.total(), "reported"),
            (true, None, Some(counter)) => (self.prompt_estimate + counter.events(), "estimated"),
            (true, None, None) => (permit.reserved(), "reservation"),
        };
        tracing::debug!(reserved = permit.reserved(), used, source, "tokens settled");
        permit.settle(used);
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        // The client left mid-answer: charge what the backend produced until then.
        self.settle();
    }
}
