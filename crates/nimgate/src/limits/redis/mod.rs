//! The shared store: every replica sharing a Redis and a key prefix enforces one combined
//! limit per key. One script call per admission (`admit.lua`: the concurrency lease, the token
//! reservation and the GCRA, checked and taken atomically on Redis's clock), called by its
//! hash and loaded again by the client when Redis answers NOSCRIPT (after a restart).
//!
//! Off the latency path: settlements and lease releases are sent after the answer, without
//! waiting; the precheck before the body is read answers from this replica's memory of its
//! last refusal of the key, without a round trip. Every call has the store's timeout; what a
//! failed admission becomes is the caller's `on_store_error`.
//!
//! Redis keys, per key name `k`: `{prefix}{k}:rq:{rpm}:{burst}` (GCRA arrival time),
//! `{prefix}{k}:tk:{tpm}` (token bucket), `{prefix}{k}:cc` (leases). The braces keep a key's
//! three in one Redis Cluster slot; the limits in the names start a key afresh when they change
//! (as the memory store does) while leases carry over. Every one expires when it no longer
//! matters, so idle keys cost Redis nothing.

mod leases;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dashmap::DashMap;
use prometheus::IntCounterVec;
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::time::Instant;

pub use leases::Lease;
use leases::Leases;

use super::quota::{Quota, Window};
use super::{CONCURRENCY_RETRY, Decision, LimitKind, Slot};
use crate::auth::{KeyName, Limits};
use crate::config::RedisSettings;

/// How long the start-up connection and script load may take (admissions keep their timeout).
const WARM_UP: Duration = Duration::from_secs(5);

/// The store could not decide: Redis unreachable, too slow, or answering nonsense.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError(pub String);

/// A key's Redis key names, built once per key and limits.
#[derive(Debug)]
struct KeyNames {
    limits: Limits,
    requests: String,
    tokens: String,
    leases: Arc<str>,
}

impl KeyNames {
    fn new(prefix: &str, key: &KeyName, limits: Limits) -> Self {
        let base = format!("{prefix}{{{key}}}");
        Self {
            limits,
            requests: format!(
                "{base}:rq:{}:{}",
                limits.requests_per_minute.unwrap_or(0),
                limits.request_burst().unwrap_or(0)
            ),
            tokens: format!("{base}:tk:{}", limits.tokens_per_minute.unwrap_or(0)),
            leases: format!("{base}:cc").into(),
        }
    }
}

/// What this replica last heard refuse a key, so that the precheck can refuse again without
/// asking Redis until then.
#[derive(Debug, Clone, Copy)]
struct Blocked {
    limits: Limits,
    limit: LimitKind,
    until: Instant,
    quota: Quota,
}

pub(super) struct Shared {
    settings: RedisSettings,
    connection: OnceLock<Result<ConnectionManager, StoreError>>,
    admit: Script,
    settle: Script,
    names: DashMap<KeyName, Arc<KeyNames>>,
    blocked: DashMap<KeyName, Blocked>,
    leases: Leases,
    /// Tells this replica's leases apart from every other's.
    replica: String,
    next_lease: AtomicU64,
    complaints: Complaints,
    errors: IntCounterVec,
}

/// The Redis store of this replica.
#[derive(Clone)]
pub struct RedisStore(Arc<Shared>);

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisStore({})", self.0.settings.shown)
    }
}

impl RedisStore {
    /// A store of `settings`; it connects on first use (and again whenever the connection
    /// breaks), so that a gateway starts, and answers by its `on_store_error`, while Redis
    /// is down. `errors` is `rate_limit_store_errors_total`.
    pub fn new(settings: RedisSettings, errors: IntCounterVec) -> Self {
        let replica = format!("{:016x}", rand_u64());
        let shared = Arc::new(Shared {
            connection: OnceLock::new(),
            admit: Script::new(include_str!("admit.lua")),
            settle: Script::new(include_str!("settle.lua")),
            names: DashMap::new(),
            blocked: DashMap::new(),
            leases: Leases::default(),
            replica,
            next_lease: AtomicU64::new(0),
            complaints: Complaints::default(),
            errors,
            settings,
        });
        let store = Self(shared);
        store.warm_up();
        store
    }

    /// Connects and loads the scripts in the background (when on a runtime), so that the first
    /// admissions do not spend their short timeout on a TCP and TLS handshake; if Redis is not
    /// there yet, the first admissions try again.
    fn warm_up(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        let store = self.clone();
        handle.spawn(async move {
            let Ok(mut connection) = store.connection() else { return };
            for script in [&store.0.admit, &store.0.settle] {
                let loaded = tokio::time::timeout(WARM_UP, script.load_async(&mut connection)).await;
                if !matches!(loaded, Ok(Ok(_))) {
                    return;
                }
            }
        });
    }

    pub fn settings(&self) -> &RedisSettings {
        &self.0.settings
    }

    fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let shared = &self.0;
        let made = shared.connection.get_or_init(|| {
            leases::renew_while_alive(Arc::downgrade(shared));
            let url = shared.settings.url.as_str();
            let client = match &shared.settings.ca_pem {
                Some(pem) => redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates { client_tls: None, root_cert: Some(pem.to_vec()) },
                ),
                None => redis::Client::open(url),
            }
            .map_err(|e| StoreError(format!("invalid Redis settings: {}", e.category())))?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_secs(2))
                .set_number_of_retries(2);
            ConnectionManager::new_lazy_with_config(client, config).map_err(|e| StoreError(describe(&e)))
        });
        made.clone()
    }

    fn names(&self, key: &KeyName, limits: &Limits) -> Arc<KeyNames> {
        if let Some(names) = self.0.names.get(key) {
            if names.limits == *limits {
                return Arc::clone(&names);
            }
        }
        let names = Arc::new(KeyNames::new(&self.0.settings.key_prefix, key, *limits));
        self.0.names.insert(key.clone(), Arc::clone(&names));
        names
    }

    /// One admission: the script's verdict, or why there is none.
    pub async fn admit(&self, key: &KeyName, limits: &Limits, tokens: u64) -> Result<Decision, StoreError> {
        let names = self.names(key, limits);
        let lease = limits.max_concurrency.map(|_| self.0.next_lease.fetch_add(1, Ordering::Relaxed));
        let member = lease.map(|n| format!("{}:{n}", self.0.replica)).unwrap_or_default();
        let reply = self.call(&names, limits, tokens, &member, true).await?;
        let decision = match reply.refused_by {
            None => {
                let slot = lease.map(|n| Slot::Redis(self.0.leases.hold(&self.0, n, &names.leases, member)));
                // A look first: the common case (never refused) takes no write lock.
                if self.0.blocked.contains_key(key) {
                    self.0.blocked.remove(key);
                }
                Decision::Admitted { reserved: reply.reserved, quota: reply.quota, slot, held: None }
            }
            Some(limit) => {
                if limit != LimitKind::Concurrency {
                    let until = Instant::now() + reply.wait;
                    let blocked = Blocked { limits: *limits, limit, until, quota: reply.quota };
                    self.0.blocked.insert(key.clone(), blocked);
                }
                Decision::Refused { limit, retry_after: reply.wait, quota: reply.quota }
            }
        };
        Ok(decision)
    }

    /// Refuses, without a round trip, a key this replica saw refused and whose wait has not
    /// passed. A refusal elsewhere (another replica's traffic) is found at admission instead.
    pub fn precheck(&self, key: &KeyName, limits: &Limits) -> Option<Decision> {
        let blocked = *self.0.blocked.get(key)?;
        let now = Instant::now();
        if blocked.limits != *limits || now >= blocked.until {
            return None;
        }
        Some(Decision::Refused { limit: blocked.limit, retry_after: blocked.until - now, quota: blocked.quota })
    }

    /// The key's quota now, consuming nothing; none when Redis does not answer in time.
    pub async fn peek(&self, key: &KeyName, limits: &Limits) -> Option<Quota> {
        let names = self.names(key, limits);
        self.call(&names, limits, 0, "", false).await.ok().map(|reply| reply.quota)
    }

    /// Sends the settlement of a reservation and returns at once; if it is lost (Redis
    /// down), the bucket keeps the estimate, which it refills within the minute.
    pub fn settle(&self, key: &KeyName, limits: &Limits, reserved: u64, used: u64) {
        let (Some(tpm), Ok(handle)) = (limits.tokens_per_minute, tokio::runtime::Handle::try_current()) else {
            return;
        };
        let names = self.names(key, limits);
        let store = self.clone();
        handle.spawn(async move {
            let Ok(mut connection) = store.connection() else { return };
            let mut invocation = store.0.settle.key(&names.tokens);
            invocation.arg(tpm).arg(reserved).arg(used);
            if let Err(e) = store.within_timeout(invocation.invoke_async::<i64>(&mut connection)).await {
                store.0.complaints.complain(&store.0.settings.shown, "settling a token reservation", &e);
            }
        });
    }

    /// Forgets this replica's memory of keys not in `keep`; Redis forgets them by expiry.
    pub fn retain(&self, keep: &dyn Fn(&KeyName) -> bool) {
        self.0.names.retain(|key, _| keep(key));
        self.0.blocked.retain(|key, _| keep(key));
    }

    /// Counts and logs (at most every few seconds) an admission the store could not decide,
    /// and what was done with it: `allowed` or `denied`.
    pub fn failed(&self, error: &StoreError, action: &'static str) {
        self.0.errors.with_label_values(&[action]).inc();
        let what = match action {
            "allowed" => "requests are admitted without their limits (on_store_error: allow)",
            _ => "requests of limited keys get 503 rate_limit_unavailable (on_store_error: deny)",
        };
        self.0.complaints.complain(&self.0.settings.shown, what, error);
    }

    async fn within_timeout<T>(&self, call: impl Future<Output = redis::RedisResult<T>>) -> Result<T, StoreError> {
        match tokio::time::timeout(self.0.settings.timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError(describe(&e))),
            Err(_) => Err(StoreError(format!("no answer within {:?}", self.0.settings.timeout))),
        }
    }

    async fn call(
        &self,
        names: &KeyNames,
        limits: &Limits,
        tokens: u64,
        member: &str,
        admit: bool,
    ) -> Result<Reply, StoreError> {
        let mut connection = self.connection()?;
        let mut invocation = self.0.admit.key(&names.requests);
        invocation
            .key(&names.tokens)
            .key(&*names.leases)
            .arg(limits.requests_per_minute.unwrap_or(0))
            .arg(limits.request_burst().unwrap_or(0))
            .arg(limits.tokens_per_minute.unwrap_or(0))
            .arg(tokens)
            .arg(limits.max_concurrency.unwrap_or(0))
            .arg(member)
            .arg(self.0.settings.lease_ttl.as_millis() as u64)
            .arg(u8::from(admit));
        if limits.max_concurrency.is_some() {
            invocation.arg(self.0.leases.releasing(&names.leases));
        }
        let values: Vec<i64> = self.within_timeout(invocation.invoke_async(&mut connection)).await?;
        Reply::read(&values, limits)
    }
}

/// The script's answer, typed.
#[derive(Debug)]
struct Reply {
    refused_by: Option<LimitKind>,
    wait: Duration,
    quota: Quota,
    reserved: u64,
}

impl Reply {
    fn read(values: &[i64], limits: &Limits) -> Result<Self, StoreError> {
        let &[_admitted, refused, wait, rq_left, rq_reset, tk_left, tk_reset, reserved] = values else {
            return Err(StoreError(format!("the admit script answered {} values, not 8", values.len())));
        };
        let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
        let window = |limit: Option<u64>, left: i64, reset: i64| {
            limit.filter(|_| left >= 0).map(|limit| Window {
                limit,
                remaining: u64::try_from(left).unwrap_or(0),
                reset: micros(reset),
            })
        };
        let refused_by = match refused {
            0 => None,
            1 => Some(LimitKind::Requests),
            2 => Some(LimitKind::Tokens),
            3 => Some(LimitKind::Concurrency),
            other => return Err(StoreError(format!("the admit script answered an unknown limit {other}"))),
        };
        Ok(Self {
            refused_by,
            wait: if refused_by == Some(LimitKind::Concurrency) { CONCURRENCY_RETRY } else { micros(wait) },
            quota: Quota {
                requests: window(limits.requests_per_minute, rq_left, rq_reset),
                tokens: window(limits.tokens_per_minute, tk_left, tk_reset),
            },
            reserved: u64::try_from(reserved).unwrap_or(0),
        })
    }
}

/// A Redis error in words that never carry the URL or its password.
fn describe(e: &redis::RedisError) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connection_refusal() {
        "connection refused".to_owned()
    } else if e.is_io_error() || e.is_connection_dropped() {
        "connection lost".to_owned()
    } else {
        match e.code() {
            // NOAUTH, WRONGPASS, NOPERM, READONLY, ...: what the operator has to fix.
            Some(code) => format!("Redis answered {code}"),
            None => e.category().to_owned(),
        }
    }
}

/// A random id for this store's leases, without another dependency: the standard library's
/// randomly keyed hasher.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher
        .write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    hasher.finish()
}

/// A log line when the store fails, at most one per `EVERY`, with how many were left out, so
/// that an outage at thousands of requests a second is said, not flooded.
#[derive(Debug, Default)]
struct Complaints {
    /// Milliseconds since `epoch` of the last line, plus one (0: never).
    last: AtomicU64,
    left_out: AtomicU64,
    epoch: OnceLock<Instant>,
}

impl Complaints {
    const EVERY: Duration = Duration::from_secs(10);

    fn complain(&self, redis: &str, what: &str, error: &StoreError) {
        let epoch = *self.epoch.get_or_init(Instant::now);
        let now = epoch.elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= Self::EVERY.as_millis() as u64;
        if !due || self.last.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            self.left_out.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let left_out = self.left_out.swap(0, Ordering::Relaxed);
        tracing::warn!(redis, error = %error.0, left_out, "rate limit store failed: {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits { requests_per_minute: Some(3), tokens_per_minute: Some(1000), ..Limits::default() }
    }

    #[test]
    fn a_reply_becomes_a_decision_with_exact_windows() {
        let admitted = Reply::read(&[1, 0, 0, 2, 20_000_000, 900, 6_000_000, 100], &limits()).unwrap();
        assert_eq!(admitted.refused_by, None);
        assert_eq!(admitted.reserved, 100);
        assert_eq!(admitted.quota.requests, Some(Window { limit: 3, remaining: 2, reset: Duration::from_secs(20) }));
        assert_eq!(admitted.quota.tokens, Some(Window { limit: 1000, remaining: 900, reset: Duration::from_secs(6) }));
        let refused = Reply::read(&[0, 1, 19_500_000, 0, 59_500_000, 900, 6_000_000, 0], &limits()).unwrap();
        assert_eq!((refused.refused_by, refused.wait), (Some(LimitKind::Requests), Duration::from_millis(19_500)));
        let full = Reply::read(&[0, 3, 1_000_000, -1, -1, -1, -1, 0], &Limits::default()).unwrap();
        assert_eq!((full.refused_by, full.wait), (Some(LimitKind::Concurrency), CONCURRENCY_RETRY));
        assert_eq!(full.quota, Quota::default(), "no windows for limits the key does not have");
    }

    #[test]
    fn a_reply_from_something_else_is_an_error_not_a_panic() {
        assert!(Reply::read(&[], &limits()).is_err());
        assert!(Reply::read(&[1, 2, 3], &limits()).is_err());
        assert!(Reply::read(&[0, 9, 0, 0, 0, 0, 0, 0], &limits()).is_err());
        // Negative numbers where none belong saturate to zero.
        let odd = Reply::read(&[1, 0, -5, -7, -9, -3, -4, -100], &limits()).unwrap();
        assert_eq!(odd.reserved, 0);
        assert_eq!(odd.quota.requests, None, "a window the script said the key lacks");
    }

    #[test]
    fn complaints_are_one_line_per_stretch() {
        let complaints = Complaints::default();
        for _ in 0..100 {
            complaints.complain("redis://x", "admitting", &StoreError("timed out".into()));
        }
        assert_eq!(complaints.left_out.load(Ordering::Relaxed), 99);
        assert_ne!(complaints.last.load(Ordering::Relaxed), 0);
    }
}
