//! The validated configuration the gateway serves from: typed, indexed and immutable. A
//! request loads the current `Arc<Snapshot>` once and keeps it to its end, so a reload (a
//! swap of the whole snapshot) never changes the rules under a request in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ServerConfig;

use crate::auth::KeyTable;
use crate::routing::RouteTable;
use crate::upstream::{Backend, Balancing, Group};

/// One consistent set of rules.
#[derive(Debug)]
pub struct Snapshot {
    pub server: ServerSettings,
    /// Every configured backend, in config order.
    /// Backends configured one by one.
    pub backends: Vec<Arc<Backend>>,
    /// Backend groups found by DNS, each with its members now.
    pub groups: Vec<Arc<Group>>,
    pub routes: RouteTable,
    pub keys: KeyTable,
    pub rate_limits: RateLimitSettings,
    pub balancing: Balancing,
    pub logging: LoggingSettings,
    /// Where this snapshot came from, for `/admin/config`.
    pub meta: ConfigMeta,
    /// Settings that are valid but probably not what the operator wants (a credential sent
    /// over plain http): logged when the snapshot is put in force, printed by `check-config`.
    pub warnings: Vec<crate::config::Problem>,
}

impl Snapshot {
    /// Logs the snapshot's warnings, one line each.
    pub fn log_warnings(&self) {
        for warning in &self.warnings {
            tracing::warn!(field = %warning.path, "{}", warning.message);
        }
    }
}

/// The version and origin of a snapshot.
#[derive(Debug, Clone, Default)]
pub struct ConfigMeta {
    /// 1 for the configuration the gateway started with, one more for each reload applied.
    pub version: u64,
    /// sha256 of the file's bytes (hex).
    pub hash: String,
    /// The configuration as loaded (environment overrides applied).
    pub source: Option<Arc<crate::config::RawConfig>>,
}

/// `server:`.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The listener's TLS configuration, when `server.tls` is set.
    pub tls: Option<Arc<ServerConfig>>,
    pub max_body_bytes: u64,
    pub drain_timeout: Duration,
    pub allow_anonymous: bool,
    /// The admin API's bearer token, read from `admin_token_env` (never shown).
    pub admin_token: Option<AdminToken>,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub max_buffered_body_bytes: u64,
}

/// A secret compared in constant time and never printed.
#[derive(Clone)]
pub struct AdminToken(Arc<[u8]>);

impl AdminToken {
    pub fn new(token: &str) -> Self {
        Self(token.as_bytes().into())
    }

    /// Whether `presented` is the token. Compares digests so that the time taken does not
    /// tell how much of a guess was right.
    pub fn matches(&self, presented: &[u8]) -> bool {
        use sha2::{Digest, Sha256};
        Sha256::digest(presented) == Sha256::digest(&self.0)
    }
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(redacted)")
    }
}

/// `logging:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingSettings {
    pub format: LogFormat,
    /// A tracing filter directive, checked to parse.
    pub level: String,
}

impl Default for LoggingSettings {
    fn default() -> Self {
        Self { format: LogFormat::Text, level: "info".into() }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// `rate_limits:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitSettings {
    /// Completion tokens reserved at admission for a request without `max_tokens`.
    pub default_max_tokens: u64,
    /// Where limiter state lives.
    pub store: StoreSettings,
    /// What admission does when the store cannot answer.
    pub on_store_error: OnStoreError,
}

/// `rate_limits.store`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreSettings {
    /// Each replica counts alone.
    #[default]
    Memory,
    /// Every replica sharing the Redis and the prefix enforces one combined limit.
    Redis(RedisSettings),
}

/// The Redis store's connection and timings.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// The URL, which may carry a password: never logged or shown (`Debug` redacts it).
    pub url: String,
    /// The URL without its password, for messages.
    pub shown: String,
    /// PEM roots to trust for rediss:// instead of the system's (`redis_ca_file`, read at
    /// validation so that a reload picks up a new CA).
    pub ca_pem: Option<Arc<[u8]>>,
    pub key_prefix: String,
    /// The most an admission waits for Redis.
    pub timeout: Duration,
    /// A concurrency slot whose replica stopped renewing it is freed after this.
    pub lease_ttl: Duration,
}

impl std::fmt::Debug for RedisSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("redis", &self.shown)
            .field("custom_ca", &self.ca_pem.is_some())
            .field("key_prefix", &self.key_prefix)
            .field("timeout", &self.timeout)
            .field("lease_ttl", &self.lease_ttl)
            .finish()
    }
}

/// `rate_limits.on_store_error`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStoreError {
    /// Admit the request (and count it in `rate_limit_store_errors_total`).
    #[default]
    Allow,
    /// 503 `rate_limit_unavailable`.
    Deny,
}
