//! Request and token limits per key. `Limiter::admit` decides before a request goes upstream
//! (reserving its token estimate) and refuses with its own `Refused`; the `Permit` it returns
//! settles the reservation with the real usage when the answer ends. State lives in a store, by
//! key name, outside the config snapshot, so reloads keep every unchanged key's budget.

mod bucket;
mod memory;
mod quota;

use std::sync::Arc;
use std::time::Duration;

pub use bucket::TokenBucket;
pub use memory::{MemoryStore, request_burst};
pub use quota::{Quota, Window, openai_duration, retry_after_secs};

use crate::auth::{Key, KeyName, Limits};

/// Which of a key's limits refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitKind {
    Requests,
    Tokens,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

/// A store's answer to one admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Admitted; `reserved` tokens are held until the request settles.
    Admitted { reserved: u64, quota: Quota },
    /// Refused by `limit`; admission is possible again after `retry_after`.
    Refused { limit: LimitKind, retry_after: Duration, quota: Quota },
}

/// A request refused by one of its key's limits: 429 with `Retry-After`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub limit: LimitKind,
    /// The refusing limit's size.
    pub per_minute: u64,
    /// Until the limit would admit this request.
    pub retry_after: Duration,
    /// Where the key's limits stand, for its headers.
    pub quota: Quota,
}

impl Refused {
    fn new(key: &Key, limit: LimitKind, retry_after: Duration, quota: Quota) -> Self {
        let per_minute = match limit {
            LimitKind::Requests => key.limits.requests_per_minute,
            LimitKind::Tokens => key.limits.tokens_per_minute,
        };
        Self { limit, per_minute: per_minute.unwrap_or(0), retry_after, quota }
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
/// token limit, the permit holding its reservation.
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
            Decision::Admitted { reserved, quota } => {
                let permit = key.limits.tokens_per_minute.map(|_| Permit {
                    limiter: Arc::clone(self),
                    key: key.name.clone(),
                    limits: key.limits,
                    reserved,
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

/// A token reservation held while a request runs. `settle` replaces it with the real usage.
/// Dropped unsettled, no upstream answer started (the answer's meter always settles once it
/// has one): the reservation is refunded, so a key is not charged for a 502, 503 or 504, and
/// SDK retries during an outage do not use up its budget.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    key: KeyName,
    limits: Limits,
    reserved: u64,
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
