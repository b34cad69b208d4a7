//! Response bodies: whole answers, and the streamed answer produced event by event with the
//! configured delays (or on release when gated), which also plays the injected stream failures.
//! Every inference body holds its request guard, so the body reaching its end counts a
//! completion and the body being dropped early (the client left) counts a cancellation. A stream
//! also holds its GPU slot, freed when the stream ends or is dropped.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Sleep;

use crate::Failures;
use crate::gpu::Slot;
use crate::reply::{DONE, Plan};
use crate::state::{RequestGuard, Shared};

/// The injected failure that breaks a connection mid-answer (or, as a service error, before
/// any answer).
#[derive(Debug, thiserror::Error)]
#[error("nim-sim: connection reset by failure injection")]
pub struct InjectedReset;

/// Every body the sim sends.
pub enum SimBody {
    /// A whole answer in one frame; an inference answer completes its guard as it goes out.
    Full { bytes: Option<Bytes>, guard: Option<RequestGuard> },
    /// Sends the first half of an answer whose `Content-Length` promised all of it, pauses for
    /// the connection to write it out, then breaks the connection.
    Broken { head: Option<Bytes>, pause: Option<Pin<Box<Sleep>>> },
    /// Never sends anything; the guard counts a cancellation when the client leaves.
    Stalled { _held: RequestGuard },
    /// A streamed answer.
    Stream(Box<Stream>),
}

impl SimBody {
    /// A whole body that is not an inference answer (or one already accounted for).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        Self::Full { bytes: Some(bytes.into()), guard: None }
    }

    /// The first half of `answer`, then a broken connection.
    pub fn broken(answer: &Bytes) -> Self {
        Self::Broken { head: Some(answer.slice(..answer.len() / 2)), pause: None }
    }

    /// A whole inference answer, completed when it is handed to the connection.
    pub fn answer(bytes: Bytes, guard: RequestGuard) -> Self {
        Self::Full { bytes: Some(bytes), guard: Some(guard) }
    }
}

impl Body for SimBody {
    type Data = Bytes;
    type Error = InjectedReset;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, InjectedReset>>> {
        match self.get_mut() {
            Self::Full { bytes, guard } => {
                if let Some(guard) = guard.take() {
                    guard.complete();
                }
                Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b))))
            }
            Self::Broken { head, pause } => {
                if let Some(head) = head.take() {
                    return Poll::Ready(Some(Ok(Frame::data(head))));
                }
                // Pending once makes hyper flush what it holds, so the client gets the half.
                ready!(pause.get_or_insert_with(|| Box::pin(tokio::time::sleep(RESET_PAUSE))).as_mut().poll(cx));
                Poll::Ready(Some(Err(InjectedReset)))
            }
            Self::Stalled { .. } => Poll::Pending,
            Self::Stream(stream) => stream.poll_next(cx).map(|event| event.map(|e| e.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not for a `Full` with a guard still to complete: hyper would then never poll it.
        matches!(self, Self::Full { bytes: None, guard: None })
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Full { bytes, .. } => SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64)),
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
    /// Content events produced so far.
    sent: u32,
    delay: Option<Pin<Box<Sleep>>>,
    gate: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// Content events after which the connection breaks, at most `plan.tokens`.
    reset_at: Option<u32>,
    /// Whether the pause that lets hyper flush before the reset was taken.
    flushed: bool,
    /// Content events after which the stream goes silent, at most `plan.tokens`.
    stall_at: Option<u32>,
    /// Whether the stall began (and was counted).
    stalled: bool,
    /// Content events after which the stream ends without finishing, at most `plan.tokens`.
    end_at: Option<u32>,
    guard: Option<RequestGuard>,
    /// With `split_events`: the second half of the last event, sent after a short pause.
    second_half: Option<(Bytes, Pin<Box<Sleep>>)>,
    _slot: Slot,
}

impl Stream {
    /// A stream of `plan`, playing the stream failures of `failures`. The first event waits
    /// for `first_token` (the fixed part and the prefill).
    pub fn new(
        shared: Arc<Shared>,
        plan: Plan,
        failures: &Failures,
        guard: RequestGuard,
        slot: Slot,
        first_token: Duration,
    ) -> Self {
        Self {
            delay: sleep(first_token),
            reset_at: failures.reset_after_chunks.map(|n| n.min(plan.tokens)),
            stall_at: failures.stall_after_chunks.map(|n| n.min(plan.tokens)),
            end_at: failures.end_after_chunks.map(|n| n.min(plan.tokens)),
            shared,
            plan,
            stage: Stage::Start,
            sent: 0,
            gate: None,
            flushed: false,
            stalled: false,
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
                    if self.reset_at == Some(self.sent) {
                        if !self.flushed {
                            // Let the connection write out the events already produced (hyper
                            // flushes when the body is pending; h2 would drop queued frames on
                            // the reset), so the client sees them before the break.
                            self.flushed = true;
                            self.delay = sleep(RESET_PAUSE);
                            cx.waker().wake_by_ref();
                            return Poll::Pending;
                        }
                        self.stage = Stage::End;
                        self.shared.counters.errors_injected.fetch_add(1, Ordering::Relaxed);
                        if let Some(guard) = self.guard.take() {
                            guard.refuse();
                        }
                        return Poll::Ready(Some(Err(InjectedReset)));
                    }
                    if self.end_at == Some(self.sent) {
                        self.stage = Stage::End;
                        self.shared.counters.errors_injected.fetch_add(1, Ordering::Relaxed);
                        if let Some(guard) = self.guard.take() {
                            guard.refuse();
                        }
                        return Poll::Ready(None);
                    }
                    if self.stall_at == Some(self.sent) {
                        if !self.stalled {
                            self.stalled = true;
                            self.shared.counters.errors_injected.fetch_add(1, Ordering::Relaxed);
                        }
                        // Never woken: the stream is held until the client drops it.
                        return Poll::Pending;
                    }
                    if self.sent == self.plan.tokens {
                        self.stage = Stage::Finish;
                        continue;
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

/// Before an injected reset, for the events already produced to reach the socket.
const RESET_PAUSE: Duration = Duration::from_millis(2);

fn sleep(duration: Duration) -> Option<Pin<Box<Sleep>>> {
    (!duration.is_zero()).then(|| Box::pin(tokio::time::sleep(duration)))
}
