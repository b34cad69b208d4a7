//! What nimgate learns about a backend while it runs: requests in flight, passive ejection
//! after consecutive failures (with a backoff that doubles while it keeps failing, and
//! probation when it comes back), the active health check's verdict, NIM's own load figures,
//! and the last few errors for `/admin/backends`. All lock-free on the request path; the
//! error ring takes a lock only when something failed.
//!
//! Passive health has one writer, `BackendState::observe` (through `Backend::observe`): the
//! retry loop reports each attempt's outcome there and the response body a stream that broke,
//! so both count the error, eject and log alike.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::prefix::PrefixTable;
use crate::metrics::Metrics;

/// Errors kept per backend for the admin API.
const RECENT_ERRORS: usize = 10;

/// What a backend's clock readings count from: its state's creation. Readings are whole
/// milliseconds since, plus one, so that 0 is never a reading (and means "never" in the
/// atomics). Tokio's clock, so that tests pause and advance it.
#[derive(Debug, Clone, Copy)]
struct Epoch(Instant);

impl Default for Epoch {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Epoch {
    fn ms(self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.0).as_millis()).unwrap_or(u64::MAX - 1) + 1
    }
}

/// Wakes requests queued for room on one backend: one per freed slot (the longest waiting,
/// since `Notify` is first in, first out), every one when the backend as a whole comes back.
/// A waiter listens on each backend of its pool; a wake-up it does not use (it got a slot
/// elsewhere first) passes to the next waiter when it stops listening.
#[derive(Debug, Default)]
pub struct Room {
    freed: Notify,
    /// Requests listening here; releases only notify when there are some.
    waiters: AtomicU32,
}

impl Room {
    /// Counts a request as listening here until the guard drops.
    pub fn listen(&self) -> Listening<'_> {
        self.waiters.fetch_add(1, Ordering::AcqRel);
        Listening(self)
    }

    /// The next wake-up here.
    pub fn freed(&self) -> tokio::sync::futures::Notified<'_> {
        self.freed.notified()
    }

    fn one_slot(&self) {
        if self.waiters.load(Ordering::Acquire) > 0 {
            self.freed.notify_one();
        }
    }

    fn all(&self) {
        if self.waiters.load(Ordering::Acquire) > 0 {
            self.freed.notify_waiters();
        }
    }
}

/// A request listening on a backend's `Room`.
pub struct Listening<'a>(&'a Room);

impl Drop for Listening<'_> {
    fn drop(&mut self) {
        self.0.waiters.fetch_sub(1, Ordering::AcqRel);
    }
}

/// When consecutive failures take a backend out, and for how long.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EjectionPolicy {
    pub after: u32,
    pub base: Duration,
    pub max: Duration,
}

impl EjectionPolicy {
    pub const DEFAULT: Self = Self { after: 5, base: Duration::from_secs(5), max: Duration::from_secs(300) };

    /// The `n`th consecutive ejection's length (n from 0): base, doubling, capped.
    pub fn backoff(&self, n: u32) -> Duration {
        self.base.saturating_mul(1u32.checked_shl(n.min(20)).unwrap_or(u32::MAX)).min(self.max)
    }
}

/// What kind of failure a backend had, for logs, the admin API and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    Connect,
    Reset,
    Timeout,
    Status5xx,
    Overloaded,
    StreamBroken,
    HealthCheck,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Reset => "reset",
            Self::Timeout => "timeout",
            Self::Status5xx => "5xx",
            Self::Overloaded => "overloaded",
            Self::StreamBroken => "stream_broken",
            Self::HealthCheck => "health_check",
        }
    }
}

/// What one exchange with a backend came to, for its passive health.
#[derive(Debug, Clone, Copy)]
pub enum Outcome<'a> {
    /// An answer that says nothing against the backend (2xx to 4xx but 429): it is trusted
    /// again.
    Answered,
    /// A connect error, reset, timeout, 5xx or broken stream: counts toward ejection.
    Failed { kind: FailureKind, cause: &'a str },
    /// The backend said it is overloaded (429, or 503 with `Retry-After`): out of rotation
    /// for `out_for` (at most `OVERLOAD_EJECTION_CAP`) when another backend of the request's
    /// pool can serve meanwhile, or when it has refused `OVERLOADS_BEFORE_EJECTION` requests
    /// in a row. A single refusal does not take a backend out of every route that uses it.
    Overloaded { status: Overload, out_for: Duration, others_can_serve: bool },
}

/// The longest an upstream's `Retry-After` keeps a backend out of rotation: its own number
/// is a hint about one client, not a verdict on every route.
pub const OVERLOAD_EJECTION_CAP: Duration = Duration::from_secs(30);
/// Refusals in a row that take out a backend even when nothing else can serve.
pub const OVERLOADS_BEFORE_EJECTION: u32 = 3;

/// The answers by which a backend says it is overloaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    TooManyRequests,
    UnavailableWithRetryAfter,
}

impl Overload {
    /// How the failure is counted: a 429 as overload, a 503 as a server error.
    fn kind(self) -> FailureKind {
        match self {
            Self::TooManyRequests => FailureKind::Overloaded,
            Self::UnavailableWithRetryAfter => FailureKind::Status5xx,
        }
    }

    fn code(self) -> u16 {
        match self {
            Self::TooManyRequests => 429,
            Self::UnavailableWithRetryAfter => 503,
        }
    }

    fn message(self) -> &'static str {
        match self {
            Self::TooManyRequests => "answered 429 Too Many Requests",
            Self::UnavailableWithRetryAfter => "answered 503 with Retry-After",
        }
    }
}

#[derive(Debug, Clone)]
pub struct RecentError {
    pub at: SystemTime,
    pub kind: FailureKind,
    pub message: String,
}

/// NIM's own load, from its `/v1/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NimLoad {
    pub running: u64,
    pub waiting: u64,
    /// 0 to 1.
    pub kv_cache_usage: f64,
}

/// A backend's run-time state.
#[derive(Debug, Default)]
pub struct BackendState {
    epoch: Epoch,
    inflight: AtomicU32,
    consecutive_failures: AtomicU32,
    /// 429s (and 503s with `Retry-After`) in a row.
    consecutive_overloads: AtomicU32,
    /// Ejections in a row without a success between them: the backoff's exponent.
    ejections: AtomicU32,
    /// The reading (`now_ms()`) until which the backend is out; 0 when it is in.
    ejected_until: AtomicU64,
    /// The active health check's verdict (true without a health check).
    unhealthy: AtomicBool,
    /// NIM's load: waiting and running requests, KV-cache use in millionths, and when
    /// it was read (`now_ms()`, 0 = never or stale).
    nim_waiting: AtomicU64,
    nim_running: AtomicU64,
    nim_kv_millionths: AtomicU64,
    nim_read_at: AtomicU64,
    /// Set from the load figures by the scraper: over a configured threshold.
    full_by_load: AtomicBool,
    requests: AtomicU64,
    failures: AtomicU64,
    recent: Mutex<VecDeque<RecentError>>,
    /// Which probes may write here: those of the newest `Backend` sharing this state (one
    /// replaced for a change of tuning stops probing even while its requests finish).
    probe_generation: AtomicU64,
    /// Requests queued for room here.
    pub room: Room,
    /// The prompt blocks recently sent here, for prefix affinity; emptied when the backend
    /// fails (ejected, or failing its health check): a restart loses its KV cache.
    pub prefixes: PrefixTable,
}

impl BackendState {
    /// Makes the caller's probes the ones that write here; returns their generation.
    pub fn take_probes(&self) -> u64 {
        self.probe_generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Whether probes of `generation` still write here.
    pub fn probes_current(&self, generation: u64) -> bool {
        self.probe_generation.load(Ordering::Acquire) == generation
    }

    pub fn inflight(&self) -> u32 {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Takes an in-flight slot unless the backend is at `max`.
    pub fn try_take_slot(&self, max: Option<u32>) -> bool {
        let taken = match max {
            None => {
                self.inflight.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(max) => {
                self.inflight.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).is_ok()
            }
        };
        if taken {
            self.requests.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    pub fn release_slot(&self) {
        self.inflight.fetch_sub(1, Ordering::Release);
        self.room.one_slot();
    }

    /// The clock now, as this state counts it.
    fn now_ms(&self) -> u64 {
        self.epoch.ms(Instant::now())
    }

    /// Out of rotation: ejected or failing its health check. `now` is read once for the
    /// backends of one pick, and only if one of them has been ejected.
    pub fn is_out(&self, now: &mut Option<Instant>) -> bool {
        if self.unhealthy.load(Ordering::Relaxed) {
            return true;
        }
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && until > self.epoch.ms(*now.get_or_insert_with(Instant::now))
    }

    /// Milliseconds of ejection left.
    pub fn ejected_for_ms(&self) -> u64 {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until.saturating_sub(self.now_ms())
    }

    pub fn is_healthy(&self) -> bool {
        !self.unhealthy.load(Ordering::Relaxed)
    }

    pub fn set_healthy(&self, healthy: bool) {
        let was_unhealthy = self.unhealthy.swap(!healthy, Ordering::Relaxed);
        if healthy {
            self.room.all();
        } else if !was_unhealthy {
            self.prefixes.clear();
        }
    }

    pub fn is_full_by_load(&self) -> bool {
        self.full_by_load.load(Ordering::Relaxed)
    }

    /// Requests NIM reports waiting, when its figures are fresh (else 0).
    pub fn nim_waiting(&self) -> u64 {
        if self.nim_read_at.load(Ordering::Relaxed) == 0 { 0 } else { self.nim_waiting.load(Ordering::Relaxed) }
    }

    pub fn nim_load(&self) -> Option<(NimLoad, u64)> {
        let at = self.nim_read_at.load(Ordering::Relaxed);
        (at != 0).then(|| {
            (
                NimLoad {
                    running: self.nim_running.load(Ordering::Relaxed),
                    waiting: self.nim_waiting.load(Ordering::Relaxed),
                    kv_cache_usage: self.nim_kv_millionths.load(Ordering::Relaxed) as f64 / 1e6,
                },
                self.now_ms().saturating_sub(at),
            )
        })
    }

    /// Records NIM's figures (None: they could not be read, so they no longer count) and
    /// whether they make the backend full.
    pub fn set_nim_load(&self, load: Option<NimLoad>, full: bool) {
        match load {
            Some(load) => {
                self.nim_running.store(load.running, Ordering::Relaxed);
                self.nim_waiting.store(load.waiting, Ordering::Relaxed);
                self.nim_kv_millionths.store((load.kv_cache_usage.clamp(0.0, 1.0) * 1e6) as u64, Ordering::Relaxed);
                self.nim_read_at.store(self.now_ms(), Ordering::Relaxed);
            }
            None => self.nim_read_at.store(0, Ordering::Relaxed),
        }
        let was_full = self.full_by_load.swap(full, Ordering::Relaxed);
        if was_full && !full {
            self.room.all();
        }
    }

    /// What one exchange with the backend came to: the one place passive health is written,
    /// the upstream error counted and an ejection logged, whether the retry loop saw the
    /// outcome (an answer's head) or the answer's body did (a stream that broke).
    pub fn observe(&self, backend: &str, policy: &EjectionPolicy, outcome: Outcome<'_>, metrics: &Metrics) {
        match outcome {
            Outcome::Answered => self.record_success(),
            Outcome::Failed { kind, cause } => {
                metrics.upstream_error(backend, kind.as_str());
                if let Some(ejected) = self.record_failure(kind, cause, policy) {
                    tracing::warn!(
                        backend, ejected_for = ?ejected, failures = self.consecutive_failures(),
                        cause, "backend ejected after consecutive failures"
                    );
                }
            }
            Outcome::Overloaded { status, out_for, others_can_serve } => {
                metrics.upstream_error(backend, status.kind().as_str());
                let overloads = self.consecutive_overloads.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                self.failures.fetch_add(1, Ordering::Relaxed);
                self.remember(status.kind(), status.message());
                if others_can_serve || overloads >= OVERLOADS_BEFORE_EJECTION {
                    let out_for = out_for.min(OVERLOAD_EJECTION_CAP);
                    self.eject_for(out_for);
                    tracing::info!(
                        backend,
                        ?out_for,
                        overloads,
                        "backend answered {}: out of rotation for a while",
                        status.code()
                    );
                }
            }
        }
    }

    /// A request got a good answer: the backend is trusted again (probation passed).
    fn record_success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.consecutive_overloads.load(Ordering::Relaxed) != 0 {
            self.consecutive_overloads.store(0, Ordering::Relaxed);
        }
        if self.ejections.load(Ordering::Relaxed) != 0 {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }

    /// A request failed on this backend. Returns the ejection it caused, if any. A backend
    /// back from an ejection is on probation: its failure count still stands, so one more
    /// failure ejects it again, for twice as long.
    fn record_failure(&self, kind: FailureKind, message: &str, policy: &EjectionPolicy) -> Option<Duration> {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.remember(kind, message);
        let failures = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let now = self.now_ms();
        if failures < policy.after || self.ejected_until.load(Ordering::Relaxed) > now {
            return None;
        }
        let n = self.ejections.fetch_add(1, Ordering::Relaxed);
        let backoff = policy.backoff(n);
        self.ejected_until.store(now.saturating_add(millis(backoff)), Ordering::Relaxed);
        self.prefixes.clear();
        Some(backoff)
    }

    /// Takes the backend out for `duration` (an upstream's `Retry-After`), keeping a longer
    /// ejection already in force.
    fn eject_for(&self, duration: Duration) {
        self.ejected_until.fetch_max(self.now_ms().saturating_add(millis(duration)), Ordering::Relaxed);
    }

    pub fn remember(&self, kind: FailureKind, message: &str) {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_ERRORS {
            recent.pop_front();
        }
        recent.push_back(RecentError { at: SystemTime::now(), kind, message: message.to_owned() });
    }

    pub fn recent_errors(&self) -> Vec<RecentError> {
        self.recent.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect()
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    pub fn totals(&self) -> (u64, u64) {
        (self.requests.load(Ordering::Relaxed), self.failures.load(Ordering::Relaxed))
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: EjectionPolicy =
        EjectionPolicy { after: 2, base: Duration::from_millis(100), max: Duration::from_millis(350) };

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        assert_eq!(POLICY.backoff(0), Duration::from_millis(100));
        assert_eq!(POLICY.backoff(1), Duration::from_millis(200));
        assert_eq!(POLICY.backoff(2), Duration::from_millis(350));
        assert_eq!(POLICY.backoff(u32::MAX), Duration::from_millis(350));
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_and_probation_re_ejects_at_once() {
        let state = BackendState::default();
        let mut now = None;
        assert_eq!(state.record_failure(FailureKind::Connect, "refused", &POLICY), None);
        assert!(!state.is_out(&mut now));
        assert_eq!(state.record_failure(FailureKind::Connect, "refused", &POLICY), Some(Duration::from_millis(100)));
        assert!(state.is_out(&mut None));
        tokio::time::advance(Duration::from_millis(99)).await;
        assert!(state.is_out(&mut None), "out for the whole backoff");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!state.is_out(&mut None), "back on probation");
        assert_eq!(
            state.record_failure(FailureKind::Reset, "reset", &POLICY),
            Some(Duration::from_millis(200)),
            "one failure on probation ejects again, for longer"
        );
        state.record_success();
        assert_eq!((state.consecutive_failures(), state.ejections()), (0, 0));
        assert_eq!(state.recent_errors().len(), 3);
    }

    #[test]
    fn slots_respect_max_concurrency() {
        let state = BackendState::default();
        assert!(state.try_take_slot(Some(2)));
        assert!(state.try_take_slot(Some(2)));
        assert!(!state.try_take_slot(Some(2)));
        state.release_slot();
        assert!(state.try_take_slot(Some(2)));
        assert_eq!(state.inflight(), 2);
    }

    #[test]
    fn the_error_ring_keeps_the_last_ten() {
        let state = BackendState::default();
        for i in 0..15 {
            state.remember(FailureKind::Status5xx, &format!("e{i}"));
        }
        let recent = state.recent_errors();
        assert_eq!(recent.len(), RECENT_ERRORS);
        assert_eq!(recent[0].message, "e5");
    }
}
