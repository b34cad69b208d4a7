//! Request, token and concurrency limits per key. `Limiter::admit` decides before a request
//! goes upstream (reserving its token estimate and taking an in-flight slot) and refuses with
//! its own `Refused`; the `Permit` it returns settles the reservation with the real usage when
//! the answer ends and gives the slot back. State lives in a store, by key name, outside the
//! config snapshot, so reloads keep every unchanged key's budget.

mod bucket;
mod gcra;
mod inflight;
mod memory;
mod quota;
mod redis;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntCounterVec;

pub use bucket::TokenBucket;
pub use gcra::Gcra;
pub use inflight::{InFlight, InFlightSlot};
pub use memory::{KeyHandle, MemoryStore};
pub use quota::{Quota, Window, openai_duration, retry_after_secs};
pub use redis::{Lease, RedisStore, StoreError};

use crate::auth::{Key, KeyName, Limits};
use crate::config::{OnStoreError, RateLimitSettings, StoreSettings};

/// Which of a key's limits refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
    Concurrency,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
            Self::Concurrency => "concurrency",
        }
    }
}

/// Retry-After of a request refused by `max_concurrency`: a slot frees when any request of the
/// key ends, which cannot be foreseen; SDKs retry after the whole seconds they are told.
pub const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// One of a key's `max_concurrency` slots, held by a running request and given back on drop.
#[derive(Debug)]
pub enum Slot {
    Memory(InFlightSlot),
    Redis(Lease),
}

/// A store's answer to one admission.
#[derive(Debug)]
pub enum Decision {
    /// Admitted; `reserved` tokens are held until the request settles (into `held`, the key's
    /// state, for the memory store), and `slot` until it ends.
    Admitted { reserved: u64, quota: Quota, slot: Option<Slot>, held: Option<KeyHandle> },
    /// Refused by `limit`; admission is possible again after `retry_after`.
    Refused { limit: LimitKind, retry_after: Duration, quota: Quota },
}

/// A request refused by one of its key's limits: 429 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub limit: LimitKind,
    /// The refusing limit's size (per minute; in flight for concurrency).
    pub size: u64,
    /// Until the limit would admit this request.
    pub retry_after: Duration,
    /// Where the key's limits stand, for its headers.
    pub quota: Quota,
}

impl Refused {
    fn new(key: &Key, limit: LimitKind, retry_after: Duration, quota: Quota) -> Self {
        let size = match limit {
            LimitKind::Requests => key.limits.requests_per_minute,
            LimitKind::Tokens => key.limits.tokens_per_minute,
            LimitKind::Concurrency => key.limits.max_concurrency.map(u64::from),
        };
        Self { limit, size: size.unwrap_or(0), retry_after, quota }
    }
}

impl std::fmt::Display for Refused {
    /// The client's message; only a 429 says "rate limit", which some SDKs look for.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let retry = retry_after_secs(self.retry_after);
        match self.limit {
            LimitKind::Concurrency => write!(
                f,
                "rate limit reached: this key may have {} requests in flight at once; retry in {retry}s",
                self.size
            ),
            kind => write!(
                f,
                "rate limit reached: this key may use {} {} per minute; retry in {retry}s",
                self.size,
                kind.as_str()
            ),
        }
    }
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unadmitted {
    /// One of its key's limits: 429.
    Refused(Refused),
    /// The shared store did not answer and `on_store_error` is `deny`: 503.
    StoreUnavailable,
}

impl From<Refused> for Unadmitted {
    fn from(refused: Refused) -> Self {
        Self::Refused(refused)
    }
}

/// The limiter of the running gateway: the store in force (a reload may switch it) and what
/// to do when it cannot answer.
pub struct Limiter {
    store: ArcSwap<Store>,
    settings: ArcSwap<RateLimitSettings>,
    /// `rate_limit_store_errors_total`.
    store_errors: IntCounterVec,
}

/// Where limiter state lives. An enum rather than a trait object so that the request path
/// makes no allocation and no dynamic call to reach it; each store answers the same five
/// calls (admit, precheck, peek, settle, retain).
#[derive(Debug)]
pub enum Store {
    Memory(MemoryStore),
    Redis(RedisStore),
}

impl Store {
    fn new(settings: &StoreSettings, store_errors: &IntCounterVec) -> Self {
        match settings {
            StoreSettings::Memory => Self::Memory(MemoryStore::default()),
            StoreSettings::Redis(redis) => {
                tracing::info!(redis = %redis.shown, prefix = %redis.key_prefix, "key limits are shared through Redis");
                Self::Redis(RedisStore::new(redis.clone(), store_errors.clone()))
            }
        }
    }

    fn settle(&self, key: &KeyName, limits: &Limits, reserved: u64, used: u64) {
        match self {
            Self::Memory(store) => store.settle(key, limits, reserved, used),
            Self::Redis(store) => store.settle(key, limits, reserved, used),
        }
    }

    fn is(&self, settings: &StoreSettings) -> bool {
        match (self, settings) {
            (Self::Memory(_), StoreSettings::Memory) => true,
            (Self::Redis(store), StoreSettings::Redis(redis)) => store.settings() == redis,
            _ => false,
        }
    }
}

impl Default for Limiter {
    fn default() -> Self {
        let settings = RateLimitSettings {
            default_max_tokens: crate::config::validate::DEFAULT_MAX_TOKENS,
            store: StoreSettings::Memory,
            on_store_error: OnStoreError::Allow,
        };
        Self::new(
            &settings,
            IntCounterVec::new(prometheus::Opts::new("unregistered", "-"), &["action"]).expect("valid"),
        )
    }
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &**self.store.load() {
            Store::Memory(_) => f.write_str("Limiter(memory)"),
            Store::Redis(store) => write!(f, "Limiter({store:?})"),
        }
    }
}

/// What an admitted request carries on: the quota for its headers and, when the key has a
/// token or concurrency limit, the permit holding its reservation and slot.
#[derive(Debug)]
pub struct Admission {
    pub quota: Quota,
    pub permit: Option<Permit>,
}

impl Limiter {
    /// A limiter of `settings`; `store_errors` is `rate_limit_store_errors_total`.
    pub fn new(settings: &RateLimitSettings, store_errors: IntCounterVec) -> Self {
        Self {
            store: ArcSwap::from_pointee(Store::new(&settings.store, &store_errors)),
            settings: ArcSwap::from_pointee(settings.clone()),
            store_errors,
        }
    }

    /// Puts `settings` in force: a new store when the store or its connection changed (the
    /// old one finishes the requests it admitted); otherwise the same store, whose keys keep
    /// their state.
    pub fn configure(&self, settings: &RateLimitSettings) {
        if !self.store.load().is(&settings.store) {
            self.store.store(Arc::new(Store::new(&settings.store, &self.store_errors)));
        }
        self.settings.store(Arc::new(settings.clone()));
    }

    /// Admits one request of `key` estimated at `tokens`, or refuses it. A key without limits
    /// is admitted without a look at the store.
    pub async fn admit(&self, key: &Key, tokens: u64) -> Result<Option<Admission>, Unadmitted> {
        self.admit_checked(key, tokens, Checked::default()).await
    }

    /// `admit` after `precheck` passed: on the key state the precheck found, when the store
    /// is still the one it looked in.
    pub async fn admit_checked(
        &self,
        key: &Key,
        tokens: u64,
        checked: Checked,
    ) -> Result<Option<Admission>, Unadmitted> {
        if key.limits.is_unlimited() {
            return Ok(None);
        }
        let store = self.store.load_full();
        let decision = match (&*store, checked.held) {
            (Store::Memory(memory), Some((checked_in, held))) if Arc::ptr_eq(&checked_in, &store) => {
                memory.admit_held(held, &key.limits, tokens)
            }
            (Store::Memory(memory), _) => memory.admit(&key.name, &key.limits, tokens),
            (Store::Redis(redis), _) => match redis.admit(&key.name, &key.limits, tokens).await {
                Ok(decision) => decision,
                Err(e) => return self.unanswered(redis, &e),
            },
        };
        match decision {
            Decision::Admitted { reserved, quota, slot, held } => {
                let needs_permit = key.limits.tokens_per_minute.is_some() || slot.is_some();
                let permit = needs_permit.then(|| Permit {
                    account: match held {
                        Some(held) => Account::Held(held),
                        None => Account::Store { store, key: key.name.clone(), limits: key.limits },
                    },
                    tokens_limited: key.limits.tokens_per_minute.is_some(),
                    reserved,
                    _slot: slot,
                });
                Ok(Some(Admission { quota, permit }))
            }
            Decision::Refused { limit, retry_after, quota } => Err(Refused::new(key, limit, retry_after, quota).into()),
        }
    }

    /// An admission the store could not decide: admitted without limits (and without a
    /// quota to show) or refused, as `on_store_error` says; counted and logged either way.
    fn unanswered(&self, redis: &RedisStore, error: &StoreError) -> Result<Option<Admission>, Unadmitted> {
        match self.settings.load().on_store_error {
            OnStoreError::Allow => {
                redis.failed(error, "allowed");
                Ok(Some(Admission { quota: Quota::default(), permit: None }))
            }
            OnStoreError::Deny => {
                redis.failed(error, "denied");
                Err(Unadmitted::StoreUnavailable)
            }
        }
    }

    /// Refuses, before its body is read, a request of `key` that its limits could not admit
    /// whatever the body: no request left now, no token, or no slot. Consumes nothing; what
    /// it found is for `admit_checked`.
    pub fn precheck(&self, key: &Key) -> Result<Checked, Refused> {
        if key.limits.is_unlimited() {
            return Ok(Checked::default());
        }
        let store = self.store.load_full();
        let (decision, held) = match &*store {
            Store::Memory(memory) => {
                let (decision, held) = memory.precheck(&key.name, &key.limits);
                (decision, Some(held))
            }
            Store::Redis(redis) => (redis.precheck(&key.name, &key.limits), None),
        };
        match decision {
            Some(Decision::Refused { limit, retry_after, quota }) => Err(Refused::new(key, limit, retry_after, quota)),
            _ => Ok(Checked { held: held.map(|held| (store, held)) }),
        }
    }

    /// The key's quota without consuming any of it, for answers refused before admission.
    pub async fn peek(&self, key: &Key) -> Option<Quota> {
        if key.limits.is_unlimited() {
            return None;
        }
        let store = self.store.load_full();
        match &*store {
            Store::Memory(memory) => Some(memory.peek(&key.name, &key.limits)),
            Store::Redis(redis) => redis.peek(&key.name, &key.limits).await,
        }
    }

    /// Forgets the state of keys `keep` rejects (keys removed by a reload).
    pub fn retain(&self, keep: &dyn Fn(&KeyName) -> bool) {
        match &**self.store.load() {
            Store::Memory(store) => store.retain(keep),
            Store::Redis(store) => store.retain(keep),
        }
    }
}

/// What a passed precheck found: the memory store's state of the key, and the store it is in.
#[derive(Debug, Default)]
pub struct Checked {
    held: Option<(Arc<Store>, KeyHandle)>,
}

/// Where a permit's tokens settle.
#[derive(Debug)]
enum Account {
    /// The key's state in the memory store, as admission found it.
    Held(KeyHandle),
    /// The store that admitted the request (Redis), by key name.
    Store { store: Arc<Store>, key: KeyName, limits: Limits },
}

impl Account {
    fn settle(&self, reserved: u64, used: u64) {
        match self {
            Self::Held(held) => held.settle(reserved, used),
            Self::Store { store, key, limits } => store.settle(key, limits, reserved, used),
        }
    }
}

/// A token reservation and in-flight slot held while a request runs. `settle` replaces the
/// reservation with the real usage. Dropped unsettled, no upstream answer started (the
/// answer's meter always settles once it has one): the reservation is refunded, so a key is
/// not charged for a 502, 503 or 504, and SDK retries during an outage do not use up its
/// budget. The slot is given back when the permit goes, settled or not. Both go to the store
/// that admitted the request, even after a reload switched stores.
#[derive(Debug)]
pub struct Permit {
    account: Account,
    tokens_limited: bool,
    reserved: u64,
    _slot: Option<Slot>,
}

impl Permit {
    /// Tokens reserved at admission.
    pub fn reserved(&self) -> u64 {
        self.reserved
    }

    /// Charges `used` tokens instead of the reservation (refunding or charging the difference).
    pub fn settle(mut self, used: u64) {
        let reserved = std::mem::take(&mut self.reserved);
        if used != reserved && self.tokens_limited {
            self.account.settle(reserved, used);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.reserved > 0 {
            self.account.settle(self.reserved, 0);
        }
    }
}
