//! Response bodies: whole answers, and the streamed answer produced event by event with the
//! configured delays (or on release when gated), which also plays the injected stream failures.
//! What a stream says comes from its API's `Script`; when it says it, and how it fails, is here
//! for every API alike.
//! Every inference body holds its request guard, so the body reaching its end counts a
//! completion and the body being dropped early (the client left) counts a cancellation. A stream
//! also holds its GPU slot, freed when the stream ends or is dropped.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use crate::Failures;
use crate::gpu::Slot;
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

/// What a streamed answer says, event by event; `Stream` decides when each goes out and plays
/// the failures. Each API's answer implements it (chat and completions in `reply`, the Responses
/// API in `responses`).
pub trait Script: Send + Sync + 'static {
    /// Content events to send: one per token (a chat tool call is one).
    fn tokens(&self) -> u32;
    /// Events sent at once, before the time to first token: the Responses API's `created` and
    /// `in_progress`. None for chat and completions.
    fn opening(&self) -> Vec<Bytes> {
        Vec::new()
    }
    /// Events sent with the first token, before it: chat's role event, or the Responses API's
    /// output item and content part.
    fn heading(&self) -> Vec<Bytes>;
    /// Content event `i` (0-based).
    fn content(&self, i: u32) -> Bytes;
    /// Events after the last token, the last of which completes the answer.
    fn closing(&self) -> Vec<Bytes>;
    /// The whole answer as one JSON document, for requests that do not stream.
    fn answer(&self) -> Bytes;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Stage {
    Opening,
    Heading,
    Content,
    Closing,
    End,
}

/// A streamed answer in progress.
pub struct Stream {
    shared: Arc<Shared>,
    script: Box<dyn Script>,
    /// `script.tokens()`, read once.
    tokens: u32,
    stage: Stage,
    /// Events due now, sent before anything else.
    due: VecDeque<Bytes>,
    /// When the first token is ready (`None`: at once); the heading events wait for it.
    first_token: Option<Instant>,
    /// Content events produced so far.
    sent: u32,
    delay: Option<Pin<Box<Sleep>>>,
    gate: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// Content events after which the connection breaks, at most `tokens`.
    reset_at: Option<u32>,
    /// Whether the pause that lets hyper flush before the reset was taken.
    flushed: bool,
    /// Content events after which the stream goes silent, at most `tokens`.
    stall_at: Option<u32>,
    /// Whether the stall began (and was counted).
    stalled: bool,
    /// Content events after which the stream ends without finishing, at most `tokens`.
    end_at: Option<u32>,
    guard: Option<RequestGuard>,
    /// With `split_events`: the second half of the last event, sent after a short pause.
    second_half: Option<(Bytes, Pin<Box<Sleep>>)>,
    _slot: Slot,
}

impl Stream {
    /// A stream of `script`, playing the stream failures of `failures`. The opening events go
    /// out at once; the heading ones wait for `first_token` (the fixed part and the prefill).
    pub fn new(
        shared: Arc<Shared>,
        script: Box<dyn Script>,
        failures: &Failures,
        guard: RequestGuard,
        slot: Slot,
        first_token: Duration,
    ) -> Self {
        let tokens = script.tokens();
        Self {
            reset_at: failures.reset_after_chunks.map(|n| n.min(tokens)),
            stall_at: failures.stall_after_chunks.map(|n| n.min(tokens)),
            end_at: failures.end_after_chunks.map(|n| n.min(tokens)),
            shared,
            script,
            tokens,
            stage: Stage::Opening,
            due: VecDeque::new(),
            // From now, not from the first poll: the clock runs while the headers go out.
            first_token: (!first_token.is_zero()).then(|| Instant::now() + first_token),
            sent: 0,
            delay: None,
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
        loop {
            if let Some(event) = self.due.pop_front() {
                if self.stage == Stage::Closing && self.due.is_empty() {
                    self.finish();
                }
                return Poll::Ready(Some(Ok(event)));
            }
            if let Some(delay) = &mut self.delay {
                ready!(delay.as_mut().poll(cx));
                self.delay = None;
            }
            match self.stage {
                Stage::Opening => {
                    self.stage = Stage::Heading;
                    self.due.extend(self.script.opening());
                    self.delay = self.first_token.map(|at| Box::pin(tokio::time::sleep_until(at)));
                }
                Stage::Heading => {
                    self.stage = Stage::Content;
                    self.due.extend(self.script.heading());
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
                    if self.sent == self.tokens {
                        self.stage = Stage::Closing;
                        self.due.extend(self.script.closing());
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
                    let event = self.script.content(self.sent);
                    self.sent += 1;
                    let counters = &self.shared.counters;
                    counters.chunks_sent.fetch_add(1, Ordering::Relaxed);
                    counters.generation_tokens.fetch_add(1, Ordering::Relaxed);
                    if self.sent < self.tokens {
                        self.delay = sleep(self.shared.options.chunk_delay);
                    }
                    return Poll::Ready(Some(Ok(event)));
                }
                // Only with no closing events at all: the answer is whole now.
                Stage::Closing => self.finish(),
                Stage::End => return Poll::Ready(None),
            }
        }
    }

    /// The answer went out whole: counts the completion and sends nothing more.
    fn finish(&mut self) {
        self.stage = Stage::End;
        if let Some(guard) = self.guard.take() {
            guard.complete();
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
