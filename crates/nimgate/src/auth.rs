//! Who is calling: `Authorization: Bearer KEY` → the configured key, found by the sha256 digest
//! of what was presented, so plaintext keys are never stored; and what that key may call,
//! by its ACL globs.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use sha2::{Digest, Sha256};

use crate::glob::ModelPattern;

/// A key's configured name: what logs, metrics and the admin API show instead of the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyName(Arc<str>);

impl KeyName {
    pub fn new(name: &str) -> Self {
        Self(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a shared string (a queued request keeps it without copying).
    pub fn shared(&self) -> &Arc<str> {
        &self.0
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key's budgets, enforced by the limiter: requests per minute (a bucket of one minute, or
/// of `burst` requests when set), tokens per minute, and requests in flight.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    /// At most `requests_per_minute`; validation makes sure.
    pub burst: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    pub max_concurrency: Option<u32>,
}

impl Limits {
    /// Whether the key has no limit at all (the limiter is then skipped entirely).
    pub fn is_unlimited(&self) -> bool {
        self.requests_per_minute.is_none() && self.tokens_per_minute.is_none() && self.max_concurrency.is_none()
    }

    /// How many requests may go back to back: `burst`, or the whole minute's allowance.
    pub fn request_burst(&self) -> Option<u64> {
        self.requests_per_minute.map(|rpm| self.burst.unwrap_or(rpm).clamp(1, rpm))
    }
}

/// One caller identity.
#[derive(Debug)]
pub struct Key {
    pub name: KeyName,
    acl: Vec<ModelPattern>,
    pub limits: Limits,
    /// Its share of a saturated pool's freed slots against other keys' (`weight`, default 1).
    pub weight: u32,
    /// `priority` as the JSON number sent to engines on routes with `pass_priority`, encoded
    /// once (lower is served first; default 0).
    pub priority: Bytes,
}

impl Key {
    pub const MAX_WEIGHT: u32 = 1000;

    pub fn new(name: KeyName, acl: Vec<ModelPattern>, limits: Limits) -> Self {
        Self { name, acl, limits, weight: 1, priority: Bytes::from_static(b"0") }
    }

    pub fn with_priority(mut self, priority: i32) -> Self {
        self.priority = Bytes::from(priority.to_string());
        self
    }

    pub fn with_weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// Whether this key may call `model` (the name the client asked for, before any alias).
    pub fn allows(&self, model: &str) -> bool {
        self.acl.iter().any(|pattern| pattern.matches(model))
    }
}

/// Why a request could not be tied to a key. Messages never echo what was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    #[error("missing API key: send `Authorization: Bearer <key>`")]
    Missing,
    #[error("malformed Authorization header: expected `Bearer <key>`")]
    Malformed,
    #[error("invalid API key")]
    Unknown,
}

/// The keys of one snapshot, by digest.
#[derive(Debug, Default)]
pub struct KeyTable {
    /// Tells tables apart for `KeyMemo`: unique per table made (a reload makes a new one).
    generation: u64,
    by_digest: HashMap<[u8; 32], Arc<Key>>,
    /// Present when `server.allow_anonymous` is on: the identity of callers without a known key.
    anonymous: Option<Arc<Key>>,
    len: usize,
}

impl KeyTable {
    /// `keys` pairs each key with the sha256 digest of its secret (validated: no duplicates).
    pub fn new(keys: Vec<([u8; 32], Arc<Key>)>, allow_anonymous: bool) -> Self {
        static GENERATIONS: AtomicU64 = AtomicU64::new(1);
        let len = keys.len();
        let anonymous = allow_anonymous
            .then(|| Arc::new(Key::new(KeyName::new("anonymous"), vec![ModelPattern::Any], Limits::default())));
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        Self { generation, by_digest: keys.into_iter().collect(), anonymous, len }
    }

    /// `authenticate`, remembering the key a client connection presented: the same
    /// `Authorization` bytes again on that connection, against the same table, need no second
    /// SHA-256. Only known keys are remembered (never a refusal, never the anonymous caller).
    pub fn authenticate_on(&self, headers: &HeaderMap, memo: &KeyMemo) -> Result<Arc<Key>, AuthFailure> {
        let presented = headers.get(AUTHORIZATION);
        if let Some(presented) = presented
            && let Some(key) = memo.recall(self.generation, presented)
        {
            return Ok(key);
        }
        let key = self.authenticate(headers)?;
        if let Some(presented) = presented
            && self.anonymous.as_ref().is_none_or(|anonymous| !Arc::ptr_eq(anonymous, key))
        {
            memo.remember(self.generation, presented, key);
        }
        Ok(Arc::clone(key))
    }

    /// The key presented in `headers`. With anonymous access on, a request without a known
    /// key is the `anonymous` caller, which may use every route.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<&Arc<Key>, AuthFailure> {
        let found = bearer_token(headers)
            .and_then(|token| self.by_digest.get(&digest(token.as_bytes())).ok_or(AuthFailure::Unknown));
        match (found, &self.anonymous) {
            (Ok(key), _) => Ok(key),
            (Err(_), Some(anonymous)) => Ok(anonymous),
            (Err(failure), None) => Err(failure),
        }
    }

    /// The names of the configured keys.
    pub fn names(&self) -> impl Iterator<Item = &KeyName> {
        self.keys().map(|key| &key.name)
    }

    /// The configured keys, not the anonymous identity.
    pub fn keys(&self) -> impl Iterator<Item = &Arc<Key>> {
        self.by_digest.values()
    }

    /// Configured keys, not counting the anonymous identity.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The sha256 digest of a key, as stored in `key_sha256`.
pub fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// The key last authenticated on one client connection (`KeyTable::authenticate_on`).
#[derive(Default)]
pub struct KeyMemo {
    last: Mutex<Remembered>,
}

#[derive(Default)]
struct Remembered {
    /// 0: nothing remembered (tables count from 1).
    generation: u64,
    /// The `Authorization` value as presented, in a buffer reused from one key to the next.
    authorization: Vec<u8>,
    key: Option<Arc<Key>>,
}

/// Names the key only: the bytes presented are a secret.
impl std::fmt::Debug for KeyMemo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f.debug_struct("KeyMemo").field("key", &last.key.as_ref().map(|k| k.name.as_str())).finish_non_exhaustive()
    }
}

impl KeyMemo {
    fn recall(&self, generation: u64, presented: &HeaderValue) -> Option<Arc<Key>> {
        let last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let same = last.generation == generation && constant_time_eq(&last.authorization, presented.as_bytes());
        if same { last.key.clone() } else { None }
    }

    fn remember(&self, generation: u64, presented: &HeaderValue, key: &Arc<Key>) {
        let mut last = self.last.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        last.generation = generation;
        last.authorization.clear();
        last.authorization.extend_from_slice(presented.as_bytes());
        last.key = Some(Arc::clone(key));
    }
}

/// Byte equality whose time does not depend on where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `hex(sha256(key))`, what `nimgate hash-key` prints.
pub fn digest_hex(key: &str) -> String {
    hex::encode(digest(key.as_bytes()))
}

/// The token of an `Authorization: Bearer TOKEN` header.
pub fn bearer_token(headers: &HeaderMap) -> Result<&str, AuthFailure> {
    let value = headers.get(AUTHORIZATION).ok_or(AuthFailure::Missing)?;
    let value = value.to_str().map_err(|_| AuthFailure::Malformed)?;
    let (scheme, token) = value.split_once(' ').ok_or(AuthFailure::Malformed)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() || token.contains(' ') {
        return Err(AuthFailure::Malformed);
    }
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(allow_anonymous: bool) -> KeyTable {
        let key = Arc::new(Key::new(
            KeyName::new("team-a"),
            vec![ModelPattern::parse("meta/*").unwrap(), ModelPattern::parse("nvidia/x").unwrap()],
            Limits::default(),
        ));
        KeyTable::new(vec![(digest(b"sk-team-a"), key)], allow_anonymous)
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(value) = auth {
            h.insert(AUTHORIZATION, value.parse().unwrap());
        }
        h
    }

    #[test]
    fn a_known_bearer_key_is_found_by_digest() {
        let t = table(false);
        assert_eq!(t.authenticate(&headers(Some("Bearer sk-team-a"))).unwrap().name.as_str(), "team-a");
        assert_eq!(t.authenticate(&headers(Some("bearer  sk-team-a"))).unwrap().name.as_str(), "team-a");
    }

    #[test]
    fn missing_malformed_and_unknown_keys_are_told_apart() {
        let t = table(false);
        assert_eq!(t.authenticate(&headers(None)).unwrap_err(), AuthFailure::Missing);
        assert_eq!(t.authenticate(&headers(Some("sk-team-a"))).unwrap_err(), AuthFailure::Malformed);
        assert_eq!(t.authenticate(&headers(Some("Basic sk-team-a"))).unwrap_err(), AuthFailure::Malformed);
        assert_eq!(t.authenticate(&headers(Some("Bearer "))).unwrap_err(), AuthFailure::Malformed);
        assert_eq!(t.authenticate(&headers(Some("Bearer sk-other"))).unwrap_err(), AuthFailure::Unknown);
    }

    #[test]
    fn anonymous_access_admits_unknown_callers_to_every_model() {
        let t = table(true);
        let key = t.authenticate(&headers(Some("Bearer whatever"))).unwrap();
        assert_eq!(key.name.as_str(), "anonymous");
        assert!(key.allows("qwen/qwen2.5-7b"));
        assert_eq!(t.authenticate(&headers(Some("Bearer sk-team-a"))).unwrap().name.as_str(), "team-a");
    }

    #[test]
    fn acl_globs_decide_which_models_a_key_may_use() {
        let t = table(false);
        let key = t.authenticate(&headers(Some("Bearer sk-team-a"))).unwrap();
        assert!(key.allows("meta/llama-3.1-8b-instruct"));
        assert!(key.allows("nvidia/x"));
        assert!(!key.allows("nvidia/y"));
    }

    fn remembered(memo: &KeyMemo) -> Option<(u64, Vec<u8>)> {
        let last = memo.last.lock().unwrap();
        last.key.as_ref().map(|_| (last.generation, last.authorization.clone()))
    }

    #[test]
    fn a_connection_remembers_its_key_for_the_same_bytes_and_table_only() {
        let (t, memo) = (table(true), KeyMemo::default());
        assert_eq!(remembered(&memo), None);
        assert!(!format!("{memo:?}").contains("sk-"));
        let first = t.authenticate_on(&headers(Some("Bearer sk-team-a")), &memo).unwrap();
        assert_eq!(remembered(&memo), Some((t.generation, b"Bearer sk-team-a".to_vec())));
        assert_eq!(format!("{memo:?}"), "KeyMemo { key: Some(\"team-a\"), .. }", "the name, never the key");
        // Recalled: the same key, the same bytes.
        let again = t.authenticate_on(&headers(Some("Bearer sk-team-a")), &memo).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        // Other bytes are looked up (and a stranger here is the anonymous caller, not team-a),
        // and neither a refusal nor the anonymous caller replaces what is remembered.
        let stranger = t.authenticate_on(&headers(Some("Bearer sk-team-b")), &memo).unwrap();
        assert_eq!(stranger.name.as_str(), "anonymous");
        assert_eq!(remembered(&memo), Some((t.generation, b"Bearer sk-team-a".to_vec())));
        let strict = table(false);
        assert_eq!(strict.authenticate_on(&headers(Some("Bearer sk-x")), &memo).unwrap_err(), AuthFailure::Unknown);
        assert_eq!(strict.authenticate_on(&headers(None), &memo).unwrap_err(), AuthFailure::Missing);
        // A reloaded table (a new generation, where the key may be gone) is asked again.
        assert_ne!(strict.generation, t.generation);
        let reloaded = strict.authenticate_on(&headers(Some("Bearer sk-team-a")), &memo).unwrap();
        assert!(!Arc::ptr_eq(&first, &reloaded), "the new table's key");
        assert_eq!(remembered(&memo).unwrap().0, strict.generation);
        let gone = KeyTable::new(Vec::new(), false);
        assert_eq!(gone.authenticate_on(&headers(Some("Bearer sk-team-a")), &memo).unwrap_err(), AuthFailure::Unknown);
    }

    #[test]
    fn digest_hex_is_lowercase_sha256() {
        assert_eq!(digest_hex("password"), "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8");
    }
}
