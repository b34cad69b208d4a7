//! What one client connection is doing, as its watchdog needs to know it: requests in flight,
//! when it last fell idle, when a new request head started arriving, and since when the
//! client has refused to take bytes. Written by the connection's I/O (`Tracked`) and by each
//! request's `Active` guard, read by `watchdog`; all of it lock-free. A request costs its
//! connection a few atomic operations and two clock reads (its head's first byte, its end),
//! and wakes no one.
//!
//! Times are milliseconds since the connection was accepted, plus one, so that 0 means "not
//! now" in the same word.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// One connection's activity.
#[derive(Debug)]
pub struct Activity {
    accepted: Instant,
    in_flight: AtomicU32,
    /// Requests started on this connection so far.
    started: AtomicU64,
    /// When `in_flight` last fell to zero.
    idle_since: AtomicU64,
    /// When the first bytes of a new request head arrived while idle (HTTP/1.1 only).
    head_started: AtomicU64,
    /// When a write first found the client's socket full, until a write goes through.
    write_blocked: AtomicU64,
    /// Set by the watchdog (idle, or the drain): the connection should finish gracefully.
    stop: AtomicBool,
    /// The connection task's waker, to tell it so.
    waker: Mutex<Option<Waker>>,
}

/// The fields of `Activity` read at one moment, in milliseconds as stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Moment {
    pub now: u64,
    pub in_flight: u32,
    pub started: u64,
    pub idle_since: u64,
    pub head_started: u64,
    pub write_blocked: u64,
}

impl Activity {
    pub fn new(accepted: Instant) -> Arc<Self> {
        Arc::new(Self {
            accepted,
            in_flight: AtomicU32::new(0),
            started: AtomicU64::new(0),
            idle_since: AtomicU64::new(1),
            head_started: AtomicU64::new(0),
            write_blocked: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            waker: Mutex::new(None),
        })
    }

    pub fn accepted(&self) -> Instant {
        self.accepted
    }

    /// `t` as stored: milliseconds since accepted, plus one.
    fn stamp(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.accepted).as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// The instant a stored time stands for.
    pub fn instant(&self, stamp: u64) -> Instant {
        // Capped at a year: a deadline that far is "never", and the clock cannot overflow.
        let after = std::time::Duration::from_millis(stamp.saturating_sub(1).min(365 * 86_400_000));
        self.accepted + after
    }

    pub fn moment(&self) -> Moment {
        Moment {
            now: self.stamp(Instant::now()),
            in_flight: self.in_flight.load(Ordering::Acquire),
            started: self.started.load(Ordering::Acquire),
            idle_since: self.idle_since.load(Ordering::Acquire),
            head_started: self.head_started.load(Ordering::Acquire),
            write_blocked: self.write_blocked.load(Ordering::Acquire),
        }
    }

    /// Asks the connection to finish gracefully (its task is told, wherever it waits).
    pub fn stop_gracefully(&self) {
        self.stop.store(true, Ordering::Release);
        let waker = self.waker.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Resolves once `stop_gracefully` has been called. Cheap to poll again and again (the
    /// connection task polls it on every wake-up): an atomic load and a waker comparison.
    pub fn stopped(&self) -> Stopped<'_> {
        Stopped { activity: self, registered: None }
    }

    /// A request's head is in: it is in flight until the returned guard is dropped (with
    /// the response body, when the last byte went out or the client left).
    pub fn request_started(self: &Arc<Self>) -> Active {
        self.head_started.store(0, Ordering::Release);
        self.started.fetch_add(1, Ordering::AcqRel);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Active(Arc::clone(self))
    }

    // Nothing here wakes the watchdog, which looks again on its own often enough
    // (`watchdog::verdict`): a request costs no wake-up and no timer reset.
    fn request_ended(&self) {
        if self.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle_since.store(self.stamp(Instant::now()), Ordering::Release);
        }
    }

    fn read_some(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 && self.head_started.load(Ordering::Acquire) == 0 {
            self.head_started.store(self.stamp(Instant::now()), Ordering::Release);
        }
    }

    fn write_pending(&self) {
        if self.write_blocked.load(Ordering::Acquire) == 0 {
            self.write_blocked.store(self.stamp(Instant::now()), Ordering::Release);
        }
    }

    fn wrote_some(&self) {
        if self.write_blocked.load(Ordering::Relaxed) != 0 {
            self.write_blocked.store(0, Ordering::Release);
        }
    }
}

/// `Activity::stopped`.
pub struct Stopped<'a> {
    activity: &'a Activity,
    registered: Option<Waker>,
}

impl Future for Stopped<'_> {
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.activity.stop.load(Ordering::Acquire) {
            return Poll::Ready(());
        }
        if !self.registered.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            *self.activity.waker.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(waker.clone());
            self.registered = Some(waker);
            // A stop between the first look and the registration would otherwise be missed.
            if self.activity.stop.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

/// A request in flight on its connection; dropped with its response body.
#[derive(Debug)]
pub struct Active(Arc<Activity>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.request_ended();
    }
}

pin_project_lite::pin_project! {
    /// A client connection's socket, reporting reads and blocked writes to its `Activity`.
    /// Bytes read ahead during protocol detection are served first.
    #[derive(Debug)]
    pub struct Tracked<IO> {
        #[pin]
        io: IO,
        read_ahead: Bytes,
        activity: Arc<Activity>,
        // Whether bytes read while idle start a request head (HTTP/1.1; for h2 they may be
        // pings, which must not keep an idle connection open).
        heads: bool,
    }
}

impl<IO> Tracked<IO> {
    pub fn new(io: IO, activity: Arc<Activity>) -> Self {
        Self { io, read_ahead: Bytes::new(), activity, heads: false }
    }

    /// Serves `bytes` before reading from the socket again.
    pub fn unread(&mut self, bytes: Bytes) {
        self.read_ahead = bytes;
    }

    /// Bytes read while idle now start a request head.
    pub fn watch_heads(&mut self) {
        self.heads = true;
    }

    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }
}

impl<IO: AsyncRead> AsyncRead for Tracked<IO> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.read_ahead.is_empty() {
            let n = this.read_ahead.len().min(buf.remaining());
            buf.put_slice(&this.read_ahead[..n]);
            this.read_ahead.advance(n);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let result = this.io.poll_read(cx, buf);
        if *this.heads && buf.filled().len() > before {
            this.activity.read_some();
        }
        result
    }
}

impl<IO: AsyncWrite> AsyncWrite for Tracked<IO> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.project();
        let result = this.io.poll_write(cx, data);
        note_write(this.activity, &result);
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let result = this.io.poll_write_vectored(cx, data);
        note_write(this.activity, &result);
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

fn note_write(activity: &Activity, result: &Poll<io::Result<usize>>) {
    match result {
        Poll::Pending => activity.write_pending(),
        Poll::Ready(Ok(n)) if *n > 0 => activity.wrote_some(),
        Poll::Ready(_) => {}
    }
}
