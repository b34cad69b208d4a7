//! Request and token limits per key. `Limiter::admit` decides before a request goes upstream
//! (reserving its token estimate), and the `Permit` it returns settles the reservation with
//! the real usage when the answer ends. State lives in a `RateLimitStore`, by key name, outside
//! the config snapshot, so reloads keep every unchanged key's budget.

mod bucket;
mod memory;
mod quota;
mod store;

use std::sync::Arc;

pub use bucket::TokenBucket;
pub use memory::{MemoryStore, request_burst};
pub use quota::{Quota, Window, openai_duration, retry_after_secs};
pub use store::{Decision, LimitKind, RateLimitStore};

use crate::auth::{Key, KeyName, Limits};
use crate::error::GatewayError;

/// The limiter of the running gateway.
pub struct Limiter {
    store: Store,
}

/// The configured store. An enum rather than a trait object so that the request path makes
/// no allocation and no dynamic call to reach it.
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
    /// Admits one request of `key` estimated at `tokens`, or refuses it with 429.
    pub async fn admit(self: &Arc<Self>, key: &Key, tokens: u64) -> Result<Option<Admission>, GatewayError> {
        if key.limits.is_unlimited() {
            return Ok(None);
        }
        let decision = match &self.store {
            Store::Memory(store) => store.admit(&key.name, &key.limits, tokens).await,
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
            Decision::Refused { limit, retry_after, quota } => {
                let per_minute = match limit {
                    LimitKind::Requests => key.limits.requests_per_minute,
                    LimitKind::Tokens => key.limits.tokens_per_minute,
                };
                Err(GatewayError::RateLimited { limit, per_minute: per_minute.unwrap_or(0), retry_after, quota })
            }
        }
    }

    /// The key's quota without consuming any of it, for answers refused before admission.
    pub async fn peek(&self, key: &Key) -> Option<Quota> {
        if key.limits.is_unlimited() {
            return None;
        }
        Some(match &self.store {
            Store::Memory(store) => store.peek(&key.name, &key.limits).await,
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

/// A token reservation held while a request runs. `settle` replaces it with the real usage;
/// dropped unsettled, the reservation (already taken from the budget) stands as the charge.
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
    pub fn settle(self, used: u64) {
        if used != self.reserved {
            self.limiter.settle(&self.key, &self.limits, self.reserved, used);
        }
    }
}
