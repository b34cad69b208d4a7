//! One upstream server as configured: where it is, how to authenticate to it, its timeouts
//! and its pooled keep-alive client. Everything a request needs from it (endpoint URIs, the
//! `Authorization` value) is built once here, not per request.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use http::{HeaderValue, Uri};

use super::client::UpstreamClient;
use super::health::{BackendState, EjectionPolicy, Outcome};
use crate::api::Endpoint;
use crate::metrics::Metrics;

/// A backend's configured name: unique, stable across reloads, safe for logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BackendName(Arc<str>);

impl BackendName {
    pub fn new(name: &str) -> Self {
        Self(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BackendName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Active health probes (`health_check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
}

/// Scraping NIM's own load figures (`load_metrics`).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadMetrics {
    pub path: String,
    pub interval: Duration,
    pub max_waiting: u64,
    pub max_kv_cache_usage: f64,
}

/// How long nimgate waits on a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    pub first_byte: Duration,
    /// The longest gap between two chunks of an answer's body.
    pub idle: Duration,
    /// The whole exchange, when bounded.
    pub total: Option<Duration>,
}

impl Timeouts {
    pub const DEFAULT_CONNECT: Duration = Duration::from_secs(5);
    /// Long, because a non-streaming completion sends its first byte only when the whole
    /// generation is done, which takes minutes for long answers on a busy GPU.
    pub const DEFAULT_FIRST_BYTE: Duration = Duration::from_secs(300);
    /// A GPU sends tokens every few to a few hundred milliseconds; a minute of silence in
    /// the middle of an answer is a stuck backend.
    pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);
    pub const DEFAULT: Self = Self {
        connect: Self::DEFAULT_CONNECT,
        first_byte: Self::DEFAULT_FIRST_BYTE,
        idle: Self::DEFAULT_IDLE,
        total: None,
    };
}

/// A backend ready to take requests.
pub struct Backend {
    /// Its configuration's digest: a reload that leaves it unchanged keeps this backend.
    pub fingerprint: [u8; 32],
    /// The digest of what makes it the same server reached the same way (URL, credential, CA
    /// certificates, timeouts): a reload that changes only its tuning (weight, concurrency cap,
    /// probes, ejection policy) makes a new `Backend` sharing this one's client and state.
    pub identity: [u8; 32],
    pub name: BackendName,
    /// The configured URL, for logs and errors (it carries no credential).
    pub url: String,
    /// The upstream URI of each endpoint, built once.
    pub uris: EndpointUris,
    /// `Authorization: Bearer ...` to inject, marked sensitive so it is never printed.
    pub auth: Option<HeaderValue>,
    pub weight: u32,
    pub max_concurrency: Option<u32>,
    pub stream_usage: bool,
    pub health_check: Option<HealthCheck>,
    pub load_metrics: Option<LoadMetrics>,
    pub timeouts: Timeouts,
    pub ejection: EjectionPolicy,
    /// Its connection pool (clones share it).
    pub client: UpstreamClient,
    /// What nimgate has learnt about it while running, shared with the `Backend`s that
    /// replace this one for a change of tuning: its in-flight count, ejection and health.
    pub state: Arc<BackendState>,
    /// Set once its probes run: each `Backend` runs its own (with its own settings) while it
    /// is in use.
    pub probes_started: AtomicBool,
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend").field("name", &self.name).field("url", &self.url).finish_non_exhaustive()
    }
}

impl Backend {
    /// Whether it has room for one more request: under its `max_concurrency` and not full by
    /// NIM's own figures. Whether it is in rotation is asked separately (`state.is_out`).
    pub fn has_room(&self) -> bool {
        self.max_concurrency.is_none_or(|max| self.state.inflight() < max) && !self.state.is_full_by_load()
    }

    /// How loaded it is, for the balancer: requests in flight from here plus those NIM
    /// reports waiting, per unit of weight (in thousandths).
    pub fn load_score(&self) -> u64 {
        // Saturating: `nim_waiting` is the backend's own number.
        u64::from(self.state.inflight()).saturating_add(self.state.nim_waiting()).saturating_mul(1000)
            / u64::from(self.weight.max(1))
    }

    /// Reports what an exchange with this backend came to: its passive health, the error
    /// counter and the ejection log line are written there and nowhere else.
    pub fn observe(&self, outcome: Outcome<'_>, metrics: &Metrics) {
        self.state.observe(self.name.as_str(), &self.ejection, outcome, metrics);
    }

    /// The full upstream URI of `endpoint` on this backend.
    pub fn uri(&self, endpoint: Endpoint) -> &Uri {
        &self.uris.absolute[endpoint.index()]
    }

    /// The URI a request for `endpoint` is sent with (see `EndpointUris`).
    pub fn request_uri(&self, endpoint: Endpoint) -> &Uri {
        &self.uris.sent[endpoint.index()]
    }

    /// A backend named `name` at `url` with default settings, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str, url: &str) -> Self {
        let base: Uri = url.parse().expect("test URL");
        Self {
            fingerprint: [0; 32],
            identity: [0; 32],
            name: BackendName::new(name),
            url: url.to_owned(),
            uris: EndpointUris::new(&base).expect("test URIs"),
            auth: None,
            weight: 1,
            max_concurrency: None,
            stream_usage: true,
            health_check: None,
            load_metrics: None,
            timeouts: Timeouts::DEFAULT,
            ejection: EjectionPolicy::DEFAULT,
            client: super::client::build(&base, Timeouts::DEFAULT_CONNECT, None).expect("test client"),
            state: Arc::default(),
            probes_started: AtomicBool::new(false),
        }
    }
}

/// Every endpoint's URI under a backend's base URL, and the form a request carries it in.
#[derive(Debug, Clone)]
pub struct EndpointUris {
    absolute: [Uri; Endpoint::ALL.len()],
    /// What a request's line says: the path alone for plain HTTP, whose connections nimgate
    /// keeps itself (with a `Host` header), so that no request converts it on its way; the
    /// absolute URI for https, which hyper-util's client takes apart itself.
    sent: [Uri; Endpoint::ALL.len()],
}

impl EndpointUris {
    /// Fails only if the base URL cannot take the API paths.
    pub fn new(base: &Uri) -> Result<Self, String> {
        let joined = Endpoint::ALL.map(|endpoint| join(base, endpoint.path()));
        if let Some(Err(e)) = joined.iter().find(|uri| uri.is_err()) {
            return Err(e.clone());
        }
        let absolute = joined.map(Result::unwrap_or_default);
        let sent = match base.scheme_str() {
            Some("http") => absolute
                .clone()
                .map(|uri| uri.path_and_query().cloned().map_or_else(|| Uri::from_static("/"), Uri::from)),
            _ => absolute.clone(),
        };
        Ok(Self { absolute, sent })
    }
}

/// `base` (scheme, authority, optional path prefix) + `path`.
pub(crate) fn join(base: &Uri, path: &str) -> Result<Uri, String> {
    let prefix = base.path().trim_end_matches('/');
    let mut parts = base.clone().into_parts();
    let path_and_query = format!("{prefix}{path}");
    parts.path_and_query = Some(path_and_query.parse().map_err(|e| format!("{e}"))?);
    Uri::from_parts(parts).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_paths_are_joined_under_the_base_path() {
        let base: Uri = "https://integrate.api.nvidia.com".parse().unwrap();
        assert_eq!(join(&base, "/v1/models").unwrap(), "https://integrate.api.nvidia.com/v1/models");
        let base: Uri = "http://10.0.0.5:8000/nim/".parse().unwrap();
        assert_eq!(join(&base, "/v1/chat/completions").unwrap(), "http://10.0.0.5:8000/nim/v1/chat/completions");
    }

    #[test]
    fn plain_http_requests_carry_the_path_and_https_ones_the_whole_uri() {
        let chat = Endpoint::ChatCompletions.index();
        let plain = EndpointUris::new(&"http://10.0.0.5:8000/nim/".parse().unwrap()).unwrap();
        assert_eq!(plain.absolute[chat], "http://10.0.0.5:8000/nim/v1/chat/completions");
        assert_eq!(plain.sent[chat], "/nim/v1/chat/completions");
        assert_eq!(plain.sent[chat].scheme(), None);
        let hosted = EndpointUris::new(&"https://integrate.api.nvidia.com".parse().unwrap()).unwrap();
        assert_eq!(hosted.sent[chat], "https://integrate.api.nvidia.com/v1/chat/completions");
    }
}
