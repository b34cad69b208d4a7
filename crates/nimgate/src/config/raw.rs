//! The configuration exactly as an operator writes it: plain serde structs, every field
//! optional where the contract gives a default. Nothing here is trusted; `validate` turns it
//! into a `Snapshot` and reports every problem with its field path. Keeping the written form
//! separate from the validated one means a `Snapshot` in hand is always valid.

use serde::{Deserialize, Serialize};

/// The whole file. Unknown fields are refused so that a typo (`max_body_byte`) is an error
/// with its path instead of a setting silently ignored.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub backends: Vec<RawBackend>,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    #[serde(default)]
    pub rate_limits: RawRateLimits,
    #[serde(default)]
    pub balancing: RawBalancing,
    #[serde(default)]
    pub logging: RawLogging,
}

/// `logging:`: applied at start (a change needs a restart). `NIMGATE_LOG` and
/// `NIMGATE_LOG_FORMAT` in the environment take precedence.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogging {
    /// `text` (default) or `json`: one JSON object per line.
    pub format: Option<String>,
    /// A tracing filter: `info` (default), `warn,nimgate::access=info`, ...
    pub level: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub tls: Option<RawTls>,
    pub max_body_bytes: Option<u64>,
    pub drain_timeout: Option<String>,
    pub allow_anonymous: Option<bool>,
    /// The environment variable holding the bearer token every admin endpoint then requires.
    pub admin_token_env: Option<String>,
    /// A client must send the first bytes of a connection (TLS handshake and protocol
    /// detection included) and each complete request head within this.
    pub header_read_timeout: Option<String>,
    /// An open connection with no request in flight is closed after this; so is one whose
    /// client has taken no byte of its answer for this long.
    pub idle_timeout: Option<String>,
    /// Request line and headers together; 431 beyond.
    pub max_header_bytes: Option<u64>,
    /// Client connections held at once; more wait in the listen backlog.
    pub max_connections: Option<u32>,
    /// Request bodies being read and held, over all connections; a body that would go
    /// beyond waits for room (up to `header_read_timeout`), then gets 503.
    pub max_buffered_body_bytes: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBackend {
    pub name: String,
    pub url: String,
    pub api_key_env: Option<String>,
    pub weight: Option<u32>,
    pub max_concurrency: Option<u32>,
    pub health_check: Option<RawHealthCheck>,
    pub load_metrics: Option<RawLoadMetrics>,
    pub stream_usage: Option<bool>,
    /// PEM file of extra CA certificates trusted for this https backend (self-hosted NIMs
    /// behind an internal CA). The webpki roots stay trusted as well.
    pub ca_file: Option<String>,
    pub timeouts: Option<RawTimeouts>,
    /// Makes the backend a group: one member per address its host resolves to.
    pub discovery: Option<RawDiscovery>,
}

/// `discovery:` of a backend.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawDiscovery {
    pub dns: bool,
    /// How often the host is resolved again (default 10s).
    pub interval: Option<String>,
    /// `IP:PORT` of a nameserver to ask instead of the system's.
    pub nameserver: Option<String>,
}

/// `health_check:` of a backend: active probes, on only where configured.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHealthCheck {
    pub path: Option<String>,
    pub interval: Option<String>,
    /// How long one probe may take.
    pub timeout: Option<String>,
    /// Consecutive failed probes that make a healthy backend unhealthy.
    pub unhealthy_after: Option<u32>,
    /// Consecutive passed probes that make an unhealthy backend healthy again.
    pub healthy_after: Option<u32>,
}

/// `load_metrics:` of a backend: NIM's own Prometheus figures, scraped.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLoadMetrics {
    pub path: Option<String>,
    pub interval: Option<String>,
    /// The backend counts as full while NIM reports more requests waiting than this.
    pub max_waiting: Option<u64>,
    /// ... or a KV-cache use (0 to 1) above this (1: never full by KV cache).
    pub max_kv_cache_usage: Option<f64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// TCP (and TLS) connection establishment.
    pub connect: Option<String>,
    /// From sending the request to the first byte of the response head. A non-streaming
    /// completion only answers when generation is done, so this bounds whole generations.
    pub first_byte: Option<String>,
    /// The longest gap between two body chunks (a stalled stream).
    pub idle: Option<String>,
    /// The whole exchange, from the request's arrival to the answer's last byte.
    pub total: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub model: String,
    #[serde(default)]
    pub backends: Vec<String>,
    #[serde(default)]
    pub fallback: Vec<String>,
    pub upstream_model: Option<String>,
    /// two_choices (default) or prefix_affinity.
    pub strategy: Option<String>,
    /// Send the key's `priority` to the engine in the body.
    pub pass_priority: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub name: String,
    pub key_sha256: Option<String>,
    pub key_env: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    pub limits: Option<RawLimits>,
    /// Its share of a saturated pool against other keys (default 1).
    pub weight: Option<u32>,
    /// Sent as the body's `priority` on routes with `pass_priority` (lower is served first).
    pub priority: Option<i32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub requests_per_minute: Option<u64>,
    /// Requests that may go back to back (default: the whole `requests_per_minute`).
    pub burst: Option<u64>,
    pub tokens_per_minute: Option<u64>,
    /// Requests of the key in flight at once.
    pub max_concurrency: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimits {
    pub store: Option<String>,
    pub redis_url: Option<String>,
    /// The environment variable holding the Redis URL (for a URL with a password).
    pub redis_url_env: Option<String>,
    /// PEM file of the CA(s) that signed a rediss:// server's certificate (default: the
    /// system's roots).
    pub redis_ca_file: Option<String>,
    /// Prefix of every Redis key; replicas sharing Redis and prefix share limits.
    pub key_prefix: Option<String>,
    /// How long an admission waits for Redis before `on_store_error` decides.
    pub timeout: Option<String>,
    /// How long a concurrency slot outlives a replica that stopped renewing it (a crash).
    pub lease_ttl: Option<String>,
    pub on_store_error: Option<String>,
    /// Completion tokens reserved for a request that sets no `max_tokens`.
    pub default_max_tokens: Option<u64>,
}

/// `balancing:`: how a route's pool is used when backends are busy or failing.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawBalancing {
    /// Requests of one route that may wait for a backend with room; beyond it, 503 at once.
    pub queue_length: Option<usize>,
    /// How long a request waits for room before 503.
    pub queue_timeout: Option<String>,
    /// Tries per request, each on a different backend (1: no retries).
    pub max_attempts: Option<u32>,
    /// Retries are capped at this share of a route's requests ...
    pub retry_budget: Option<f64>,
    /// ... plus this many per second, so that a quiet route can still retry.
    pub min_retries_per_second: Option<u32>,
    /// Consecutive failures (connect errors, resets, 5xx, timeouts) that eject a backend.
    pub eject_after: Option<u32>,
    /// The first ejection's length; it doubles while the backend keeps failing ...
    pub ejection_base: Option<String>,
    /// ... up to this.
    pub ejection_max: Option<String>,
    /// Tuning of `strategy: prefix_affinity` routes.
    pub prefix_affinity: Option<RawPrefixAffinity>,
}

/// `balancing.prefix_affinity:`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrefixAffinity {
    /// Prompt bytes per hashed block.
    pub block_bytes: Option<usize>,
    /// Block hashes remembered per backend (about 64 bytes each).
    pub blocks_per_backend: Option<usize>,
    /// Prompt bytes hashed at most.
    pub max_prefix_bytes: Option<usize>,
    /// A backend above this many times the mean load is not chosen for its cache.
    pub load_bound: Option<f64>,
}
