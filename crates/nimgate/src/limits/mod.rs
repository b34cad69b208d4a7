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

use std::sync::Arc;
use std::time::Duration;

pub use bucket::TokenBucket;
pub use gcra::Gcra;
pub use inflight::{InFlight, InFlightSlot};
pub use memory::MemoryStore;
pub use quota::{Quota, Window, openai_duration, retry_after_secs};

use crate::auth::{Key, KeyName, Limits};

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
}

/// A store's answer to one admission.
#[derive(Debug)]
pub enum Decision {
    /// Admitted; `reserved` tokens are held until the request settles, and `slot` until it
    /// ends.
    Admitted { reserved: u64, quota: Quota, slot: Option<Slot> },
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

/// The limiter of the running gateway.
pub struct Limiter {
    store: Store,
}

/// Where limiter state lives. An enum rather than a trait object so that the request path
/// makes no allocation and no dynamic call to reach it; each store answers the same four calls
/// (admit, peek, settle, retain). A shared store for several replicas is #15.
enum Store {
    Memory(MemoryStore),
}

impl Default for Limiter {
    fn default() -> Self {
        Self { store: Store::Memory(MemoryStore::default()) }
    }
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.store {
            Store::Memory(_) => "Limiter(memory)",
        })
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
    /// Admits one request of `key` estimated at `tokens`, or refuses it. A key without limits
    /// is admitted without a look at the store.
    pub async fn admit(self: &Arc<Self>, key: &Key, tokens: u64) -> Result<Option<Admission>, Refused> {
        if key.limits.is_unlimited() {
            return Ok(None);
        }
        let decision = match &self.store {
            Store::Memory(store) => store.admit(&key.name, &key.limits, tokens),
        };
        match decision {
            Decision::Admitted { reserved, quota, slot } => {
                let needs_permit = key.limits.tokens_per_minute.is_some() || slot.is_some();
                let permit = needs_permit.then(|| Permit {
                    limiter: Arc::clone(self),
                    key: key.name.clone(),
                    limits: key.limits,
                    reserved,
                    _slot: slot,
                });
                Ok(Some(Admission { quota, permit }))
            }
            Decision::Refused { limit, retry_after, quota } => Err(Refused::new(key, limit, retry_after, quota)),
        }
    }

    /// Refuses, before its body is read, a request of `key` that its limits could not admit
    /// whatever the body: no request left now, or no token. Consumes nothing.
    pub async fn precheck(&self, key: &Key) -> Result<(), Refused> {
        if key.limits.is_unlimited() {
            return Ok(());
        }
        let decision = match &self.store {
            Store::Memory(store) => store.precheck(&key.name, &key.limits),
        };
        match decision {
            Some(Decision::Refused { limit, retry_after, quota }) => Err(Refused::new(key, limit, retry_after, quota)),
            _ => Ok(()),
        }
    }

    /// The key's quota without consuming any of it, for answers refused before admission.
    pub async fn peek(&self, key: &Key) -> Option<Quota> {
        if key.limits.is_unlimited() {
            return None;
        }
        Some(match &self.store {
            Store::Memory(store) => store.peek(&key.name, &key.limits),
        })
    }

    fn settle(&self, key: &KeyName, limits: &Limits, reserved: u64, used: u64) {
        match &self.store {
            Store::Memory(store) => store.settle(key, limits, reserved, used),
        }
    }

    /// Forgets the state of keys `keep` rejects (keys removed by a reload).
    pub fn retain(&self, keep: &dyn Fn(&KeyName) -> bool) {
        match &self.store {
            Store::Memory(store) => store.retain(keep),
        }
    }
}

/// A token reservation and in-flight slot held while a request runs. `settle` replaces the
/// reservation with the real usage. Dropped unsettled, no upstream answer started (the
/// answer's meter always settles once it has one): the reservation is refunded, so a key is
/// not charged for a 502, 503 or 504, and SDK retries during an outage do not use up its
/// budget. The slot is given back when the permit goes, settled or not.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    key: KeyName,
    limits: Limits,
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
        if used != reserved {
            self.limiter.settle(&self.key, &self.limits, reserved, used);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.reserved > 0 {
            self.limiter.settle(&self.key, &self.limits, self.reserved, 0);
        }
    }
}
