//! Where limiter state lives. The in-memory store serves one replica; a shared store (Redis,
//! a later issue) implements the same three operations so that several replicas enforce one
//! budget instead of multiplying it.

use std::future::Future;
use std::time::Duration;

use super::quota::Quota;
use crate::auth::{KeyName, Limits};

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

/// The outcome of asking to admit one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Admitted; `reserved` tokens are held until the request settles.
    Admitted { reserved: u64, quota: Quota },
    /// Refused by `limit`; admission is possible again after `retry_after`.
    Refused { limit: LimitKind, retry_after: Duration, quota: Quota },
}

/// Limiter state for every key, by key name.
pub trait RateLimitStore: Send + Sync {
    /// Admits one request of `key` whose token estimate is `tokens` (ignored without a token
    /// limit), reserving the tokens; or refuses it without consuming anything.
    fn admit(&self, key: &KeyName, limits: &Limits, tokens: u64) -> impl Future<Output = Decision> + Send;

    /// The key's quota now, consuming nothing (for responses refused before admission).
    fn peek(&self, key: &KeyName, limits: &Limits) -> impl Future<Output = Quota> + Send;

    /// Replaces a reservation with the tokens really used. Not awaited by the request path:
    /// the answer has already gone out when this runs.
    fn settle(&self, key: &KeyName, limits: &Limits, reserved: u64, used: u64);

    /// Forgets keys not in `keep` (state of removed keys must not pile up across reloads).
    fn retain(&self, keep: &dyn Fn(&KeyName) -> bool);
}
