//! Response bodies: whole answers, and the streamed answer produced event by event with the
//! configured delays (or on release when gated), which also plays the injected stream failures.
//! A stream holds its GPU slot and its request guard, so dropping it (the client left) frees the
//! slot and counts a cancellation.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::gpu::Slot;
use crate::reply::{DONE, Plan};
use crate::state::{RequestGuard, Shared};

/// The injected failure that breaks a connection mid-answer.
#[derive(Debug, thiserror::Error)]
#[error("nim-sim: connection reset by failure injection")]
pub struct InjectedReset;

pub enum SimBody {
    Full(Option<Bytes>),
    /// Sends `head`, then breaks the connection.
    Broken(Option<Bytes>),
    /// Never sends anything; the guard counts a cancellation when the client leaves.
    Stalled {
        _held: RequestGuard,
    },
    Stream(Box<Stream>),
}

impl SimBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full(Some(bytes.into()))
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = InjectedReset;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, InjectedReset>>> {
        match self.get_mut() {
            Self::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            Self::Broken(head) => Poll::Ready(Some(match head.take() {
                Some(head) => Ok(Frame::data(head)),
                None => Err(InjectedReset),
            })),
            Self::Stalled { .. } => Poll::Pending,
            Self::Stream(stream) => stream.poll_next(cx).map(|event| event.map(|e| e.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, Self::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Self::Full(None) => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Start,
    Content,
    Finish,
    Usage,
    Done,
    End,
}

/// A streamed answer in progress.
pub struct Stream {
    shared: Arc<Shared>,
    plan: Plan,
    stage: Stage,
    sent: u32,
    delay: Option<Pin<Box<Sleep>>>,
    gate: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    reset_after: Option<u32>,
    flushed: bool,
    stall_after: Option<u32>,
    guard: Option<RequestGuard>,
    /// With `split_events`: the second half of the last event, sent after a short pause.
    second_half: Option<(Bytes, Pin<Box<Sleep>>)>,
    _slot: Slot,
}

impl Stream {
    pub fn new(shared: Arc<Shared>, plan: Plan, guard: RequestGuard, slot: Slot) -> Self {
        let failures = shared.failures();
        let ttft = shared.options.ttft;
        Self {
            delay: sleep(ttft),
            shared,
            plan,
            stage: Stage::Start,
            sent: 0,
            gate: None,
            reset_after: failures.reset_after_chunks,
            flushed: false,
            stall_after: failures.stall_after_chunks,
            guard: Some(guard),
            second_half: None,
            _slot: slot,
        }
    }

    /// The next frame: an event, or with `split_events` each half of one in its own frame.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, InjectedReset>>> {
        if let Some((_, pause)) = &mut self.second_half {
            ready!(pause.as_mut().poll(cx));
            return Poll::Ready(self.second_half.take().map(|(half, _)| Ok(half)));
        }
        match ready!(self.poll_event(cx)) {
            Some(Ok(event)) if self.shared.options.split_events && event.len() > 1 => {
                let middle = event.len() / 2;
                // The pause makes hyper flush the first half on its own.
                self.second_half = Some((event.slice(middle..), Box::pin(tokio::time::sleep(SPLIT_PAUSE))));
                Poll::Ready(Some(Ok(event.slice(..middle))))
            }
            other => Poll::Ready(other),
        }
    }

    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, InjectedReset>>> {
        if let Some(delay) = &mut self.delay {
            ready!(delay.as_mut().poll(cx));
            self.delay = None;
        }
        loop {
            match self.stage {
                Stage::Start => {
                    self.stage = Stage::Content;
                    if let Some(role) = self.plan.role_event() {
                        return Poll::Ready(Some(Ok(role)));
                    }
                }
                Stage::Content => {
                    if self.sent == self.plan.tokens {
                        self.stage = Stage::Finish;
                        continue;
                    }
                    if self.reset_after == Some(self.sent) {
                        if !self.flushed {
                            // Let hyper flush the chunks already produced (it flushes when the
                            // body is pending), so the client sees them before the reset.
                            self.flushed = true;
                            self.delay = sleep(Duration::from_millis(1));
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                        self.stage = Stage::End;
                        self.shared.counters.errors_injected.fetch_add(1, Ordering::Relaxed);
                        return Poll::Ready(Some(Err(InjectedReset)));
                    }
                    if self.stall_after == Some(self.sent) {
                        // Never woken: the stream is held until the client drops it.
                        return Poll::Pending;
                    }
                    if self.shared.options.gated_chunks {
                        let shared = Arc::clone(&self.shared);
                        let gate = self.gate.get_or_insert_with(|| {
                            Box::pin(async move {
                                if let Ok(permit) = shared.gate.acquire().await {
                                    permit.forget();
                                }
                            })
                        });
                        ready!(gate.as_mut().poll(cx));
                        self.gate = None;
                    }
                    let event = self.plan.content_event(self.sent);
                    self.sent += 1;
                    let counters = &self.shared.counters;
                    counters.chunks_sent.fetch_add(1, Ordering::Relaxed);
                    counters.generation_tokens.fetch_add(1, Ordering::Relaxed);
                    if self.sent < self.plan.tokens {
                        self.delay = sleep(self.shared.options.chunk_delay);
                    }
                    return Poll::Ready(Some(Ok(event)));
                }
                Stage::Finish => {
                    self.stage = if self.plan.include_usage { Stage::Usage } else { Stage::Done };
                    return Poll::Ready(Some(Ok(self.plan.finish_event())));
                }
                Stage::Usage => {
                    self.stage = Stage::Done;
                    return Poll::Ready(Some(Ok(self.plan.usage_event())));
                }
                Stage::Done => {
                    self.stage = Stage::End;
                    if let Some(guard) = self.guard.take() {
                        guard.complete();
                    }
                    return Poll::Ready(Some(Ok(Bytes::from_static(DONE))));
                }
                Stage::End => return Poll::Ready(None),
            }
        }
    }
}

/// Between the two halves of a split event.
const SPLIT_PAUSE: Duration = Duration::from_millis(3);

fn sleep(duration: Duration) -> Option<Pin<Box<Sleep>>> {
    (!duration.is_zero()).then(|| Box::pin(tokio::time::sleep(duration)))
}
