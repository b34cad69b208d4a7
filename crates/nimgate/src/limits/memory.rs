//! The in-memory store: per key a `governor` GCRA limiter for requests and a `TokenBucket`
//! for tokens, in a `DashMap` by key name. A key's state is kept as long as its limits do not
//! change, so a config reload that leaves a key alone leaves its budget alone.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::Clock;
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota as GovernorQuota, RateLimiter};
use tokio::time::Instant;

use super::bucket::TokenBucket;
use super::quota::{Quota, Window};
use super::{Decision, LimitKind};
use crate::auth::{KeyName, Limits};

/// The burst of a request limit: ten seconds' worth of the per-minute rate (at least 1). A
/// client may send that many at once; after that requests are spaced at the steady rate. A
/// whole minute's burst would let a key spend its minute in one instant and starve the GPU;
/// no burst would refuse an SDK that sends a few requests in parallel.
pub fn request_burst(requests_per_minute: u64) -> u32 {
    u32::try_from(requests_per_minute.div_ceil(6)).unwrap_or(u32::MAX).max(1)
}

/// Governor's time source: tokio's clock, which tests pause and advance, so that every limit
/// here runs on one clock with the token buckets beside it.
#[derive(Debug, Clone, Copy, Default)]
struct TokioClock;

impl Clock for TokioClock {
    type Instant = std::time::Instant;

    fn now(&self) -> Self::Instant {
        Instant::now().into_std()
    }
}

/// Locks `mutex` even when a panic poisoned it: the state inside is plain numbers, valid at
/// every step, and a limit that stopped counting after a panic would fail open.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

type Gcra = RateLimiter<NotKeyed, InMemoryState, TokioClock, StateInformationMiddleware>;

#[derive(Debug, Clone, Copy)]
struct Last {
    at: Instant,
    remaining: u32,
    next_free: Instant,
}

struct RequestLimit {
    per_minute: u64,
    burst: u32,
    interval: Duration,
    gcra: Gcra,
    /// Remaining burst after the last decision and when it was made, for `peek`, and when
    /// the next request will be admitted if that remaining was zero.
    last: Mutex<Last>,
}

impl RequestLimit {
    fn new(per_minute: u64) -> Self {
        let burst = request_burst(per_minute);
        let interval = Duration::from_secs(60).div_f64(per_minute as f64);
        // Validation caps the rate, so the period is at least a microsecond and never zero.
        let quota = GovernorQuota::with_period(interval)
            .unwrap_or_else(|| GovernorQuota::per_second(NonZeroU32::MAX))
            .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        Self {
            per_minute,
            burst,
            interval,
            gcra: RateLimiter::direct_with_clock(quota, TokioClock).with_middleware(),
            last: Mutex::new(Last { at: Instant::now(), remaining: burst, next_free: Instant::now() }),
        }
    }

    fn window(&self, remaining: u32) -> Window {
        Window {
            limit: self.per_minute,
            remaining: u64::from(remaining),
            reset: self.interval * (self.burst - remaining.min(self.burst)),
        }
    }

    /// Takes one request cell, or says how long until one is free.
    fn check(&self, now: Instant) -> Result<Window, Duration> {
        match self.gcra.check() {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                let next_free = if remaining == 0 { now + self.interval } else { now };
                *lock(&self.last) = Last { at: now, remaining, next_free };
                Ok(self.window(remaining))
            }
            Err(not_until) => {
                let wait = not_until.wait_time_from(TokioClock.now());
                *lock(&self.last) = Last { at: now, remaining: 0, next_free: now + wait };
                Err(wait)
            }
        }
    }

    /// How long until a request would be admitted, when it would not be now (consuming
    /// nothing).
    fn busy_for(&self, now: Instant) -> Option<Duration> {
        let last = *lock(&self.last);
        (last.remaining == 0 && now < last.next_free).then(|| last.next_free - now)
    }

    fn peek(&self) -> Window {
        let Last { at, remaining, .. } = *lock(&self.last);
        let refilled = (at.elapsed().as_secs_f64() / self.interval.as_secs_f64()) as u64;
        let remaining = (u64::from(remaining) + refilled).min(u64::from(self.burst)) as u32;
        self.window(remaining)
    }
}

struct KeyState {
    limits: Limits,
    requests: Option<RequestLimit>,
    tokens: Option<Mutex<TokenBucket>>,
}

impl KeyState {
    fn new(limits: Limits) -> Self {
        Self {
            limits,
            requests: limits.requests_per_minute.map(RequestLimit::new),
            tokens: limits.tokens_per_minute.map(|tpm| Mutex::new(TokenBucket::new(tpm, Instant::now()))),
        }
    }

    fn token_window(&self, bucket: &mut TokenBucket, now: Instant) -> Option<Window> {
        let limit = self.limits.tokens_per_minute?;
        Some(Window { limit, remaining: bucket.remaining(now), reset: bucket.until_full(now) })
    }
}

/// Limiter state of every key of this replica.
#[derive(Default)]
pub struct MemoryStore {
    keys: DashMap<KeyName, Arc<KeyState>>,
}

impl MemoryStore {
    /// The key's state, created (or recreated, when its limits changed) as needed. Created
    /// under the map shard's lock, so that concurrent first requests of a key share one state
    /// instead of each being admitted against a fresh one. No guard is held past the return:
    /// nothing holds one across an await.
    fn state(&self, key: &KeyName, limits: &Limits) -> Arc<KeyState> {
        if let Some(state) = self.keys.get(key) {
            if state.limits == *limits {
                return Arc::clone(&state);
            }
        }
        let mut entry = self.keys.entry(key.clone()).or_insert_with(|| Arc::new(KeyState::new(*limits)));
        if entry.limits != *limits {
            *entry = Arc::new(KeyState::new(*limits));
        }
        Arc::clone(&entry)
    }

    fn decide(&self, key: &KeyName, limits: &Limits, tokens: u64) -> Decision {
        let state = self.state(key, limits);
        let now = Instant::now();
        let mut quota = Quota::default();

        // Tokens first: a refused token reservation is simply not made, while a request cell
        // taken from the GCRA cannot be given back.
        let mut reserved = 0;
        if let Some(bucket) = &state.tokens {
            let mut bucket = lock(bucket);
            match bucket.try_reserve(tokens, now) {
                Ok(amount) => reserved = amount,
                Err(wait) => {
                    quota.tokens = state.token_window(&mut bucket, now);
                    quota.requests = state.requests.as_ref().map(RequestLimit::peek);
                    return Decision::Refused { limit: LimitKind::Tokens, retry_after: wait, quota };
                }
            }
            quota.tokens = state.token_window(&mut bucket, now);
        }
        if let Some(requests) = &state.requests {
            match requests.check(now) {
                Ok(window) => quota.requests = Some(window),
                Err(wait) => {
                    if let Some(bucket) = &state.tokens {
                        let mut bucket = lock(bucket);
                        bucket.settle(reserved, 0, now);
                        quota.tokens = state.token_window(&mut bucket, now);
                    }
                    quota.requests = Some(requests.window(0));
                    return Decision::Refused { limit: LimitKind::Requests, retry_after: wait, quota };
                }
            }
        }
        Decision::Admitted { reserved, quota }
    }
}

impl MemoryStore {
    /// Admits one request of `key` whose token estimate is `tokens` (ignored without a token
    /// limit), reserving the tokens; or refuses it without consuming anything.
    pub fn admit(&self, key: &KeyName, limits: &Limits, tokens: u64) -> Decision {
        self.decide(key, limits, tokens)
    }

    /// The key's quota now, consuming nothing (for responses refused before admission).
    pub fn peek(&self, key: &KeyName, limits: &Limits) -> Quota {
        let state = self.state(key, limits);
        self.quota_of(&state, Instant::now())
    }

    /// Replaces a reservation with the tokens really used, in the bucket it was taken from:
    /// when a reload changed the key's limits since, that bucket is gone and so is the
    /// reservation (settling into the new one, or recreating the old, would be wrong).
    pub fn settle(&self, key: &KeyName, limits: &Limits, reserved: u64, used: u64) {
        let Some(state) = self.keys.get(key).map(|s| Arc::clone(&s)) else { return };
        if state.limits != *limits {
            return;
        }
        if let Some(bucket) = &state.tokens {
            lock(bucket).settle(reserved, used, Instant::now());
        }
    }

    /// Refuses a request that no body could make admissible: its key has no request left
    /// now, or no token at all. Consumes nothing; `admit` decides on the body's estimate.
    pub fn precheck(&self, key: &KeyName, limits: &Limits) -> Option<Decision> {
        let state = self.state(key, limits);
        let now = Instant::now();
        if let Some(wait) = state.requests.as_ref().and_then(|r| r.busy_for(now)) {
            let quota = self.quota_of(&state, now);
            return Some(Decision::Refused { limit: LimitKind::Requests, retry_after: wait, quota });
        }
        let bucket = state.tokens.as_ref()?;
        let wait = lock(bucket).until_holding(1, now);
        (!wait.is_zero()).then(|| Decision::Refused {
            limit: LimitKind::Tokens,
            retry_after: wait,
            quota: self.quota_of(&state, now),
        })
    }

    fn quota_of(&self, state: &KeyState, now: Instant) -> Quota {
        let tokens = state.tokens.as_ref().and_then(|b| state.token_window(&mut lock(b), now));
        Quota { requests: state.requests.as_ref().map(RequestLimit::peek), tokens }
    }

    /// Forgets keys not in `keep` (state of removed keys must not pile up across reloads).
    pub fn retain(&self, keep: &dyn Fn(&KeyName) -> bool) {
        self.keys.retain(|key, _| keep(key));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(rpm: Option<u64>, tpm: Option<u64>) -> Limits {
        Limits { requests_per_minute: rpm, tokens_per_minute: tpm }
    }

    fn admitted(d: Decision) -> (u64, Quota) {
        match d {
            Decision::Admitted { reserved, quota } => (reserved, quota),
            other => panic!("refused: {other:?}"),
        }
    }

    #[test]
    fn concurrent_first_requests_of_a_key_share_one_allowance() {
        for _ in 0..20 {
            let store = Arc::new(MemoryStore::default());
            let start = Arc::new(std::sync::Barrier::new(32));
            let admitted: usize = (0..32)
                .map(|_| {
                    let (store, start) = (Arc::clone(&store), Arc::clone(&start));
                    std::thread::spawn(move || {
                        start.wait();
                        let decision = store.admit(&KeyName::new("fresh"), &limits(Some(6), Some(100)), 60);
                        usize::from(matches!(decision, Decision::Admitted { .. }))
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .sum();
            assert_eq!(admitted, 1, "a burst of one request, a minute of 100 tokens");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_lock_poisoned_by_a_panic_does_not_turn_the_token_limit_off() {
        let store = MemoryStore::default();
        let (key, limits) = (KeyName::new("k"), limits(None, Some(100)));
        admitted(store.admit(&key, &limits, 100));
        let state = store.state(&key, &limits);
        let poisoner = std::thread::spawn(move || {
            let _held = state.tokens.as_ref().unwrap().lock();
            panic!("a panic while the bucket is locked");
        });
        assert!(poisoner.join().is_err());
        assert!(matches!(store.admit(&key, &limits, 10), Decision::Refused { limit: LimitKind::Tokens, .. }));
        assert!(store.precheck(&key, &limits).is_some(), "the precheck refuses the spent key too");
    }

    #[test]
    fn burst_is_ten_seconds_of_the_rate() {
        assert_eq!(request_burst(600), 100);
        assert_eq!(request_burst(60), 10);
        assert_eq!(request_burst(5), 1);
        assert_eq!(request_burst(1), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_request_limit_admits_its_burst_then_refuses_with_the_interval() {
        let store = MemoryStore::default();
        let key = KeyName::new("k");
        let l = limits(Some(60), None);
        for expected in (0..10).rev() {
            let (_, quota) = admitted(store.decide(&key, &l, 0));
            assert_eq!(quota.requests.unwrap().remaining, expected);
        }
        match store.decide(&key, &l, 0) {
            Decision::Refused { limit: LimitKind::Requests, retry_after, quota } => {
                assert!(
                    retry_after <= Duration::from_secs(1) && retry_after > Duration::from_millis(900),
                    "{retry_after:?}"
                );
                assert_eq!(retry_after, Duration::from_secs(1), "one interval, on a clock that does not move");
                assert_eq!(quota.requests.unwrap().remaining, 0);
                assert_eq!(quota.requests.unwrap().limit, 60);
            }
            other => panic!("{other:?}"),
        }
        // Another key is unaffected.
        admitted(store.decide(&KeyName::new("other"), &l, 0));
        // One interval later, one more request.
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(matches!(store.decide(&key, &l, 0), Decision::Refused { .. }));
        tokio::time::advance(Duration::from_millis(1)).await;
        let (_, quota) = admitted(store.decide(&key, &l, 0));
        assert_eq!(quota.requests.unwrap().remaining, 0);
    }

    #[test]
    fn the_extremes_validation_allows_do_not_overflow() {
        use crate::config::validate::{MAX_REQUESTS_PER_MINUTE, MAX_TOKENS_PER_MINUTE};
        let store = MemoryStore::default();
        for (i, l) in [limits(Some(MAX_REQUESTS_PER_MINUTE), Some(MAX_TOKENS_PER_MINUTE)), limits(Some(1), Some(1))]
            .iter()
            .enumerate()
        {
            let key = KeyName::new(&format!("k{i}"));
            admitted(store.decide(&key, l, 1));
            let _ = store.decide(&key, l, u64::MAX);
            store.settle(&key, l, 1, u64::MAX / 2);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_refusal_consumes_no_request_and_a_request_refusal_no_tokens() {
        let store = MemoryStore::default();
        let key = KeyName::new("k");
        let l = limits(Some(6), Some(100)); // burst 1 request
        let (reserved, _) = admitted(store.decide(&key, &l, 60));
        assert_eq!(reserved, 60);
        // Tokens refuse first; the second request cell is not spent on it.
        assert!(matches!(store.decide(&key, &l, 60), Decision::Refused { limit: LimitKind::Tokens, .. }));
        store.settle(&key, &l, 60, 10);
        // Now tokens fit, but the request burst (1) is spent: the reservation is undone.
        match store.decide(&key, &l, 60) {
            Decision::Refused { limit: LimitKind::Requests, quota, .. } => {
                assert_eq!(quota.tokens.unwrap().remaining, 90);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn state_survives_unchanged_limits_and_resets_on_changed_ones() {
        let store = MemoryStore::default();
        let key = KeyName::new("k");
        admitted(store.decide(&key, &limits(None, Some(100)), 80));
        let (_, quota) = admitted(store.decide(&key, &limits(None, Some(100)), 10));
        assert_eq!(quota.tokens.unwrap().remaining, 10);
        let (_, quota) = admitted(store.decide(&key, &limits(None, Some(200)), 10));
        assert_eq!(quota.tokens.unwrap().remaining, 190);
        store.retain(&|k| k.as_str() != "k");
        assert!(store.keys.is_empty());
    }
}
