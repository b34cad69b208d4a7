//! The in-memory store: per key a `Gcra` for requests, a `TokenBucket` for tokens and an in-flight count, in a `DashMap` by key name. A key's state is kept as long as
//! its limits do not change, so a config reload that leaves a key alone leaves its budget
//! alone (and its in-flight count always).

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
#[cfg(test)]
use std::time::Duration;

use dashmap::DashMap;
use tokio::time::Instant;

use super::bucket::TokenBucket;
use super::gcra::Gcra;
use super::inflight::InFlight;
use super::quota::{Quota, Window};
use super::{CONCURRENCY_RETRY, Decision, LimitKind, Slot};
use crate::auth::{KeyName, Limits};

/// Locks `mutex` even when a panic poisoned it: the state inside is plain numbers, valid at
/// every step, and a limit that stopped counting after a panic would fail open.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

struct KeyState {
    limits: Limits,
    requests: Option<Mutex<Gcra>>,
    tokens: Option<Mutex<TokenBucket>>,
    /// Carried over when the limits change: the requests in flight are still in flight.
    in_flight: Arc<InFlight>,
}

impl KeyState {
    fn new(limits: Limits, in_flight: Arc<InFlight>) -> Self {
        Self {
            limits,
            requests: (limits.requests_per_minute.zip(limits.request_burst()))
                .map(|(rpm, burst)| Mutex::new(Gcra::new(rpm, burst, Instant::now()))),
            tokens: limits.tokens_per_minute.map(|tpm| Mutex::new(TokenBucket::new(tpm, Instant::now()))),
            in_flight,
        }
    }

    /// Refuses when every `max_concurrency` slot is taken (consuming nothing).
    fn concurrency_full(&self) -> bool {
        self.limits.max_concurrency.is_some_and(|max| self.in_flight.is_full(max))
    }

    fn token_window(&self, bucket: &mut TokenBucket, now: Instant) -> Option<Window> {
        let limit = self.limits.tokens_per_minute?;
        Some(Window { limit, remaining: bucket.remaining(now), reset: bucket.until_full(now) })
    }
}

/// A key's state as one request found it: admission takes it from the precheck, and the
/// request's permit settles into it, without looking the key up again. It settles into the
/// bucket its reservation came from even after a reload changed the key's limits (and so
/// replaced its state), where that bucket is gone and the reservation with it.
#[derive(Clone)]
pub struct KeyHandle(Arc<KeyState>);

impl std::fmt::Debug for KeyHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyHandle")
    }
}

impl KeyHandle {
    /// Replaces a reservation with the tokens really used.
    pub fn settle(&self, reserved: u64, used: u64) {
        if let Some(bucket) = &self.0.tokens {
            lock(bucket).settle(reserved, used, Instant::now());
        }
    }
}

/// Limiter state of every key of this replica.
#[derive(Default)]
pub struct MemoryStore {
    // foldhash rather than SipHash: the names are the config's, nothing a client chooses, and
    // every request looks its key up two or three times.
    keys: DashMap<KeyName, Arc<KeyState>, foldhash::fast::RandomState>,
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryStore({} keys)", self.keys.len())
    }
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
        let mut entry =
            self.keys.entry(key.clone()).or_insert_with(|| Arc::new(KeyState::new(*limits, Arc::default())));
        if entry.limits != *limits {
            *entry = Arc::new(KeyState::new(*limits, Arc::clone(&entry.in_flight)));
        }
        Arc::clone(&entry)
    }

    fn decide(&self, key: &KeyName, limits: &Limits, tokens: u64) -> Decision {
        self.decide_on(self.state(key, limits), limits, tokens)
    }

    fn decide_on(&self, state: Arc<KeyState>, limits: &Limits, tokens: u64) -> Decision {
        let now = Instant::now();
        let mut quota = Quota::default();

        // A slot first: it is given back by dropping it if a later limit refuses.
        let slot = match limits.max_concurrency {
            Some(max) => match state.in_flight.try_take(max) {
                Some(slot) => Some(Slot::Memory(slot)),
                None => {
                    let quota = self.quota_of(&state, now);
                    return Decision::Refused { limit: LimitKind::Concurrency, retry_after: CONCURRENCY_RETRY, quota };
                }
            },
            None => None,
        };
        // Tokens next: a refused token reservation is simply not made, while a request cell
        // taken from the GCRA cannot be given back. One lock at a time, never nested.
        let mut reserved = 0;
        if let Some(bucket) = &state.tokens {
            let mut bucket = lock(bucket);
            let reservation = bucket.try_reserve(tokens, now);
            quota.tokens = state.token_window(&mut bucket, now);
            drop(bucket);
            match reservation {
                Ok(amount) => reserved = amount,
                Err(wait) => {
                    quota.requests = state.requests.as_ref().map(|r| lock(r).peek(now));
                    return Decision::Refused { limit: LimitKind::Tokens, retry_after: wait, quota };
                }
            }
        }
        if let Some(requests) = &state.requests {
            let checked = lock(requests).check(now);
            match checked {
                Ok(window) => quota.requests = Some(window),
                Err(wait) => {
                    if let Some(bucket) = &state.tokens {
                        let mut bucket = lock(bucket);
                        bucket.settle(reserved, 0, now);
                        quota.tokens = state.token_window(&mut bucket, now);
                    }
                    quota.requests = Some(lock(requests).peek(now));
                    return Decision::Refused { limit: LimitKind::Requests, retry_after: wait, quota };
                }
            }
        }
        Decision::Admitted { reserved, quota, slot, held: Some(KeyHandle(state)) }
    }
}

impl MemoryStore {
    /// Admits one request of `key` whose token estimate is `tokens` (ignored without a token
    /// limit), reserving the tokens; or refuses it without consuming anything.
    pub fn admit(&self, key: &KeyName, limits: &Limits, tokens: u64) -> Decision {
        self.decide(key, limits, tokens)
    }

    /// `admit` on the state the precheck found (`held`, for these `limits`).
    pub fn admit_held(&self, held: KeyHandle, limits: &Limits, tokens: u64) -> Decision {
        self.decide_on(held.0, limits, tokens)
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
    /// The key's state comes back with the answer, for `admit_held`.
    pub fn precheck(&self, key: &KeyName, limits: &Limits) -> (Option<Decision>, KeyHandle) {
        let state = self.state(key, limits);
        let refusal = self.refusal(&state);
        (refusal, KeyHandle(state))
    }

    fn refusal(&self, state: &KeyState) -> Option<Decision> {
        let now = Instant::now();
        if state.concurrency_full() {
            let quota = self.quota_of(state, now);
            return Some(Decision::Refused { limit: LimitKind::Concurrency, retry_after: CONCURRENCY_RETRY, quota });
        }
        if let Some(wait) = state.requests.as_ref().and_then(|r| lock(r).busy_for(now)) {
            let quota = self.quota_of(state, now);
            return Some(Decision::Refused { limit: LimitKind::Requests, retry_after: wait, quota });
        }
        let bucket = state.tokens.as_ref()?;
        let wait = lock(bucket).until_holding(1, now);
        (!wait.is_zero()).then(|| Decision::Refused {
            limit: LimitKind::Tokens,
            retry_after: wait,
            quota: self.quota_of(state, now),
        })
    }

    fn quota_of(&self, state: &KeyState, now: Instant) -> Quota {
        let tokens = state.tokens.as_ref().and_then(|b| state.token_window(&mut lock(b), now));
        Quota { requests: state.requests.as_ref().map(|r| lock(r).peek(now)), tokens }
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
        Limits { requests_per_minute: rpm, tokens_per_minute: tpm, ..Limits::default() }
    }

    fn admitted(d: Decision) -> (u64, Quota) {
        match d {
            Decision::Admitted { reserved, quota, .. } => (reserved, quota),
            other => panic!("refused: {other:?}"),
        }
    }

    fn refused(d: Decision) -> (LimitKind, Duration, Quota) {
        match d {
            Decision::Refused { limit, retry_after, quota } => (limit, retry_after, quota),
            other => panic!("admitted: {other:?}"),
        }
    }

    /// How many of `n` simultaneous first requests of a fresh key `limits` admits.
    fn admitted_at_once(n: usize, limits: Limits, tokens: u64) -> usize {
        let store = Arc::new(MemoryStore::default());
        let start = Arc::new(std::sync::Barrier::new(n));
        let decisions: Vec<Decision> = (0..n)
            .map(|_| {
                let (store, start) = (Arc::clone(&store), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    store.admit(&KeyName::new("fresh"), &limits, tokens)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        decisions.iter().filter(|d| matches!(d, Decision::Admitted { .. })).count()
    }

    #[test]
    fn concurrent_first_requests_of_a_key_share_one_allowance() {
        for _ in 0..5 {
            assert_eq!(admitted_at_once(200, limits(Some(50), None), 0), 50, "a minute of 50 requests");
            assert_eq!(admitted_at_once(200, limits(Some(6), Some(100)), 60), 1, "a minute of 100 tokens");
            let burst = Limits { burst: Some(7), ..limits(Some(600), None) };
            assert_eq!(admitted_at_once(200, burst, 0), 7, "a burst of 7");
            let concurrency = Limits { max_concurrency: Some(3), ..Limits::default() };
            assert_eq!(admitted_at_once(200, concurrency, 0), 3, "3 in flight (all held till the end)");
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
        assert!(store.precheck(&key, &limits).0.is_some(), "the precheck refuses the spent key too");
    }

    #[tokio::test(start_paused = true)]
    async fn the_state_a_precheck_found_is_the_one_admission_and_settling_use() {
        let store = MemoryStore::default();
        let key = KeyName::new("k");
        let l = limits(Some(2), Some(100));
        let (refusal, held) = store.precheck(&key, &l);
        assert!(refusal.is_none());
        let (reserved, quota) = admitted(store.admit_held(held.clone(), &l, 60));
        assert_eq!((reserved, quota.requests.unwrap().remaining), (60, 1));
        // The same count as `admit` by name: one state.
        let (_, quota) = admitted(store.admit(&key, &l, 10));
        assert_eq!((quota.requests.unwrap().remaining, quota.tokens.unwrap().remaining), (0, 30));
        held.settle(60, 5);
        assert_eq!(store.peek(&key, &l).tokens.unwrap().remaining, 85, "55 tokens refunded");
        // After a reload changed the key's limits, a settlement of the old state leaves the
        // new one alone: its reservation went with the old bucket.
        let changed = limits(Some(2), Some(200));
        assert_eq!(store.peek(&key, &changed).tokens.unwrap().remaining, 200);
        held.settle(10, 0);
        assert_eq!(store.peek(&key, &changed).tokens.unwrap().remaining, 200);
    }

    #[tokio::test(start_paused = true)]
    async fn a_minute_of_requests_goes_at_once_then_one_per_interval() {
        let store = MemoryStore::default();
        let key = KeyName::new("k");
        let l = limits(Some(3), None);
        for expected in [2, 1, 0] {
            let (_, quota) = admitted(store.decide(&key, &l, 0));
            let window = quota.requests.unwrap();
            assert_eq!((window.limit, window.remaining), (3, expected));
            assert_eq!(window.reset, Duration::from_secs(20 * (3 - expected)), "until the bucket is full");
        }
        let (limit, retry_after, quota) = refused(store.decide(&key, &l, 0));
        assert_eq!((limit, retry_after), (LimitKind::Requests, Duration::from_secs(20)));
        assert_eq!(quota.requests.unwrap().reset, Duration::from_secs(60));
        assert!(store.precheck(&key, &l).0.is_some(), "the precheck refuses too, consuming nothing");
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(store.precheck(&key, &l).0.is_none());
        let (_, quota) = admitted(store.decide(&key, &l, 0));
        assert_eq!(quota.requests.unwrap().remaining, 0);
        assert!(matches!(store.decide(&key, &l, 0), Decision::Refused { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_caps_back_to_back_requests() {
        let store = MemoryStore::default();
        let key = KeyName::new("k");
        // One minute holds 60, but only 10 may go at once; then one a second.
        let l = Limits { burst: Some(10), ..limits(Some(60), None) };
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
    async fn the_concurrency_limit_refuses_while_every_slot_is_held() {
        let store = MemoryStore::default();
        let key = KeyName::new("k");
        let l = Limits { max_concurrency: Some(2), ..limits(Some(60), Some(1000)) };
        let first = store.decide(&key, &l, 10);
        let second = store.decide(&key, &l, 10);
        let (limit, retry_after, quota) = refused(store.decide(&key, &l, 10));
        assert_eq!((limit, retry_after), (LimitKind::Concurrency, Duration::from_secs(1)));
        assert_eq!(quota.requests.unwrap().remaining, 58, "the refusal took no request");
        assert_eq!(quota.tokens.unwrap().remaining, 980, "nor tokens");
        assert!(matches!(store.precheck(&key, &l).0, Some(Decision::Refused { limit: LimitKind::Concurrency, .. })));
        drop(first);
        assert!(store.precheck(&key, &l).0.is_none());
        admitted(store.decide(&key, &l, 10));
        drop(second);
        // A request refused by a later limit gives its slot back at once.
        let tight = Limits { max_concurrency: Some(1), ..limits(Some(1), None) };
        admitted(store.decide(&KeyName::new("t"), &tight, 0));
        let (limit, ..) = refused(store.decide(&KeyName::new("t"), &tight, 0));
        assert_eq!(limit, LimitKind::Requests);
        assert_eq!(store.state(&KeyName::new("t"), &tight).in_flight.count(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_refusal_consumes_no_request_and_a_request_refusal_no_tokens() {
        let store = MemoryStore::default();
        let key = KeyName::new("k");
        let l = limits(Some(1), Some(100)); // one request a minute
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
        let held = Limits { max_concurrency: Some(1), ..limits(None, Some(100)) };
        let slot = store.decide(&key, &held, 0);
        let changed = Limits { max_concurrency: Some(1), ..limits(Some(5), None) };
        let (limit, ..) = refused(store.decide(&key, &changed, 0));
        assert_eq!(limit, LimitKind::Concurrency, "the in-flight count outlives a change of limits");
        drop(slot);
        admitted(store.decide(&key, &limits(None, Some(100)), 80));
        let (_, quota) = admitted(store.decide(&key, &limits(None, Some(100)), 10));
        assert_eq!(quota.tokens.unwrap().remaining, 10);
        let (_, quota) = admitted(store.decide(&key, &limits(None, Some(200)), 10));
        assert_eq!(quota.tokens.unwrap().remaining, 190);
        store.retain(&|k| k.as_str() != "k");
        assert!(store.keys.is_empty());
    }
}
