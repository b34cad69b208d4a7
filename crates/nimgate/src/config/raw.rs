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
    pub health_check: Option<RawProbe>,
    pub load_metrics: Option<RawProbe>,
    pub stream_usage: Option<bool>,
    /// PEM file of extra CA certificates trusted for this https backend (self-hosted NIMs
    /// behind an internal CA). The webpki roots stay trusted as well.
    pub ca_file: Option<String>,
    pub timeouts: Option<RawTimeouts>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawProbe {
    pub path: Option<String>,
    pub interval: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    /// TCP (and TLS) connection establishment.
    pub connect: Option<String>,
    /// From sending the request to the first byte of the response head. A non-streaming
    /// completion only answers when generation is done, so this bounds whole generations.
    pub first_byte: Option<String>,
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
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub requests_per_minute: Option<u64>,
    pub tokens_per_minute: Option<u64>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimits {
    pub store: Option<String>,
    pub redis_url: Option<String>,
    pub on_store_error: Option<String>,
    /// Completion tokens reserved for a request that sets no `max_tokens`.
    pub default_max_tokens: Option<u64>,
}
