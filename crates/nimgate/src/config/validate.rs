//! `RawConfig` → `Snapshot`. Checks everything that can be checked before serving (names,
//! references, URLs, globs, durations, credentials in the environment, TLS files) and reports
//! every problem at once, each with its field path, so an operator fixes a file in one pass.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Uri};

use super::load::EnvSource;
use super::raw::{
    RawBackend, RawBalancing, RawConfig, RawDiscovery, RawHealthCheck, RawKey, RawLoadMetrics, RawLogging,
    RawPrefixAffinity, RawRateLimits, RawRoute, RawServer,
};
use super::snapshot::{
    AdminToken, ConfigMeta, LogFormat, LoggingSettings, OnStoreError, RateLimitSettings, RedisSettings, ServerSettings,
    Snapshot, StoreSettings,
};
use super::{ConfigError, Problem};
use crate::auth::{self, Key, KeyName, KeyTable, Limits};
use crate::glob::ModelPattern;
use crate::routing::{Route, RouteTable, UpstreamModel};
use crate::tls::{self, TlsFileError};
use crate::upstream::discovery;
use crate::upstream::registry::{self, BackendSettings, BuildError};
use crate::upstream::{
    AffinitySettings, BackendName, Balancing, Discovery, EjectionPolicy, Group, HealthCheck, LoadMetrics,
    MAX_POOL_MEMBERS, Pool, PoolEntry, Strategy, Timeouts,
};

pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";
pub const DEFAULT_MAX_BODY_BYTES: u64 = 10 * 1024 * 1024;
/// A million requests a second: above it the GCRA's nanosecond arithmetic loses its meaning.
pub const MAX_REQUESTS_PER_MINUTE: u64 = 60_000_000;
/// A billion tokens a second, far above any GPU fleet.
pub const MAX_TOKENS_PER_MINUTE: u64 = 60_000_000_000;
/// Completion tokens reserved for a request without `max_tokens`: a typical chat answer.
pub const DEFAULT_MAX_TOKENS: u64 = 512;
/// How long an admission waits for Redis: a round trip on a local network is well under a
/// millisecond, and a limiter slower than this costs every request more than it protects.
pub const DEFAULT_STORE_TIMEOUT: Duration = Duration::from_millis(50);
/// A crashed replica's concurrency slots come back after this; live ones renew theirs every
/// third of it.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_MAX_HEADER_BYTES: u64 = 64 * 1024;
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10_000;
/// Room for 25 maximal requests at once (with the default `max_body_bytes`).
pub const DEFAULT_MAX_BUFFERED_BODY_BYTES: u64 = 256 * 1024 * 1024;
/// The longest duration any setting takes. Longer ones are mistakes (`300000000000y`) that
/// would overflow the clock arithmetic of every request.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
const DEFAULT_HEALTH: (&str, Duration) = ("/v1/health/ready", Duration::from_secs(5));
const DEFAULT_HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_UNHEALTHY_AFTER: u32 = 3;
const DEFAULT_HEALTHY_AFTER: u32 = 2;
/// How often a backend group's host is resolved again: a Kubernetes headless Service's answer
/// follows pod readiness within seconds.
const DEFAULT_DISCOVERY_INTERVAL: Duration = Duration::from_secs(10);
const DEFAULT_LOAD_METRICS: (&str, Duration) = ("/v1/metrics", Duration::from_secs(2));
/// A NIM with more requests than this waiting is busy: the next one would wait behind them.
const DEFAULT_MAX_WAITING: u64 = 8;
const DEFAULT_MAX_KV_CACHE_USAGE: f64 = 0.95;

/// Validates `raw`, reading credentials named by `api_key_env` / `key_env` from `env`.
pub fn validate(raw: &RawConfig, env: &EnvSource) -> Result<Snapshot, ConfigError> {
    validate_after(raw, env, None)
}

/// Validates `raw` to replace `previous`: its backends keep their live parts where their
/// settings allow (`upstream::registry`).
pub fn validate_after(raw: &RawConfig, env: &EnvSource, previous: Option<&Snapshot>) -> Result<Snapshot, ConfigError> {
    let mut v = Validator { problems: Vec::new(), warnings: Vec::new(), env, previous };
    let server = v.server(&raw.server);
    let balancing = v.balancing(&raw.balancing);
    let backends = v.backends(&raw.backends, &balancing);
    let routes = v.routes(&raw.routes, &raw.backends, &backends, &balancing);
    let keys = v.keys(&raw.keys, server.allow_anonymous);
    let rate_limits = v.rate_limits(&raw.rate_limits);
    let logging = v.logging(&raw.logging);
    if !v.problems.is_empty() {
        return Err(ConfigError::Invalid(v.problems));
    }
    let (mut plain, mut groups) = (Vec::new(), Vec::new());
    for entry in backends.into_iter().flatten() {
        match entry {
            PoolEntry::Backend(backend) => plain.push(backend),
            PoolEntry::Group(group) => groups.push(group),
        }
    }
    Ok(Snapshot {
        server,
        backends: plain,
        groups,
        routes,
        keys,
        rate_limits,
        balancing,
        logging,
        meta: ConfigMeta::default(),
        warnings: v.warnings,
    })
}

struct Validator<'a> {
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
    env: &'a EnvSource,
    previous: Option<&'a Snapshot>,
}

impl Validator<'_> {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem::new(path, message));
    }

    fn server(&mut self, raw: &RawServer) -> ServerSettings {
        let listen = self.socket_addr("server.listen", raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN));
        let admin_listen =
            self.socket_addr("server.admin_listen", raw.admin_listen.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN));
        let max_body_bytes = raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes == 0 {
            self.problem("server.max_body_bytes", "must be at least 1");
        }
        let drain_timeout =
            self.duration_or("server.drain_timeout", raw.drain_timeout.as_deref(), DEFAULT_DRAIN_TIMEOUT);
        let tls = raw.tls.as_ref().and_then(|t| {
            tls::server_config(Path::new(&t.cert), Path::new(&t.key))
                .map_err(|e| match e {
                    TlsFileError::Cert(m) => self.problem("server.tls.cert", m),
                    TlsFileError::Key(m) => self.problem("server.tls.key", m),
                })
                .ok()
        });
        let admin_token = raw
            .admin_token_env
            .as_deref()
            .and_then(|var| self.env_secret("server.admin_token_env", var))
            .map(|token| AdminToken::new(&token));
        let header_read_timeout = self.duration_or(
            "server.header_read_timeout",
            raw.header_read_timeout.as_deref(),
            DEFAULT_HEADER_READ_TIMEOUT,
        );
        let idle_timeout = self.duration_or("server.idle_timeout", raw.idle_timeout.as_deref(), DEFAULT_IDLE_TIMEOUT);
        let max_header_bytes = raw.max_header_bytes.unwrap_or(DEFAULT_MAX_HEADER_BYTES);
        if !(1024..=16 * 1024 * 1024).contains(&max_header_bytes) {
            self.problem("server.max_header_bytes", "must be between 1024 and 16777216");
        }
        let max_connections = raw.max_connections.unwrap_or(DEFAULT_MAX_CONNECTIONS);
        if max_connections == 0 {
            self.problem("server.max_connections", "must be at least 1");
        }
        let max_buffered_body_bytes = raw.max_buffered_body_bytes.unwrap_or(DEFAULT_MAX_BUFFERED_BODY_BYTES);
        if max_buffered_body_bytes < max_body_bytes {
            self.problem(
                "server.max_buffered_body_bytes",
                format!("must be at least server.max_body_bytes ({max_body_bytes}), or no request of that size could be read"),
            );
        }
        ServerSettings {
            listen,
            admin_listen,
            tls,
            max_body_bytes,
            drain_timeout,
            allow_anonymous: raw.allow_anonymous.unwrap_or(false),
            admin_token,
            header_read_timeout,
            idle_timeout,
            max_header_bytes: usize::try_from(max_header_bytes).unwrap_or(usize::MAX),
            max_connections: max_connections as usize,
            max_buffered_body_bytes,
        }
    }

    fn logging(&mut self, raw: &RawLogging) -> LoggingSettings {
        let d = LoggingSettings::default();
        let format = match raw.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                self.problem("logging.format", format!("`{other}` is not a log format: use text or json"));
                d.format
            }
        };
        let level = raw.level.clone().unwrap_or(d.level);
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
            self.problem(
                "logging.level",
                format!("`{level}` is not a log filter ({e}): e.g. info, or warn,nimgate::access=info"),
            );
        }
        LoggingSettings { format, level }
    }

    fn balancing(&mut self, raw: &RawBalancing) -> Balancing {
        let d = Balancing::default();
        let max_attempts = raw.max_attempts.unwrap_or(d.max_attempts);
        if max_attempts == 0 {
            self.problem("balancing.max_attempts", "must be at least 1 (1: no retries)");
        }
        let retry_budget = raw.retry_budget.unwrap_or(d.retry_budget);
        if !(0.0..=1.0).contains(&retry_budget) {
            self.problem("balancing.retry_budget", format!("{retry_budget} is not a share between 0 and 1"));
        }
        let eject_after = raw.eject_after.unwrap_or(d.ejection.after);
        if eject_after == 0 {
            self.problem("balancing.eject_after", "must be at least 1");
        }
        let base = self.duration_or("balancing.ejection_base", raw.ejection_base.as_deref(), d.ejection.base);
        let max = self.duration_or("balancing.ejection_max", raw.ejection_max.as_deref(), d.ejection.max);
        if max < base {
            self.problem("balancing.ejection_max", "must not be shorter than balancing.ejection_base");
        }
        let prefix_affinity = self.prefix_affinity(raw.prefix_affinity.as_ref());
        Balancing {
            prefix_affinity,
            queue_length: raw.queue_length.unwrap_or(d.queue_length),
            queue_timeout: self.duration_or("balancing.queue_timeout", raw.queue_timeout.as_deref(), d.queue_timeout),
            max_attempts,
            retry_budget,
            min_retries_per_second: raw.min_retries_per_second.unwrap_or(d.min_retries_per_second),
            ejection: EjectionPolicy { after: eject_after, base, max },
        }
    }

    fn prefix_affinity(&mut self, raw: Option<&RawPrefixAffinity>) -> AffinitySettings {
        let d = AffinitySettings::DEFAULT;
        let Some(raw) = raw else { return d };
        let at = "balancing.prefix_affinity";
        let block_bytes = raw.block_bytes.unwrap_or(d.block_bytes);
        if !(16..=65_536).contains(&block_bytes) {
            self.problem(format!("{at}.block_bytes"), "must be between 16 and 65536 (bytes of prompt per block)");
        }
        let blocks_per_backend = raw.blocks_per_backend.unwrap_or(d.blocks_per_backend);
        if !(1..=16_777_216).contains(&blocks_per_backend) {
            self.problem(
                format!("{at}.blocks_per_backend"),
                "must be between 1 and 16777216 (about 64 bytes of memory each, per backend)",
            );
        }
        let max_prefix_bytes = raw.max_prefix_bytes.unwrap_or(d.max_prefix_bytes);
        if !(block_bytes..=16 * 1024 * 1024).contains(&max_prefix_bytes) {
            self.problem(format!("{at}.max_prefix_bytes"), "must be between block_bytes and 16777216");
        }
        let load_bound = raw.load_bound.unwrap_or(d.load_bound);
        if !(1.0..=100.0).contains(&load_bound) {
            self.problem(
                format!("{at}.load_bound"),
                format!("{load_bound} is not a ratio between 1 and 100 (1.25: at most 25 % above the mean load)"),
            );
        }
        AffinitySettings { block_bytes, blocks_per_backend, max_prefix_bytes, load_bound }
    }

    /// One entry per `backends[]` item, `None` where it was invalid (so indices line up).
    fn backends(&mut self, raw: &[RawBackend], balancing: &Balancing) -> Vec<Option<PoolEntry>> {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut out = Vec::with_capacity(raw.len());
        for (i, b) in raw.iter().enumerate() {
            let at = format!("backends[{i}]");
            self.name(&format!("{at}.name"), &b.name, "backend");
            if let Some(first) = seen.insert(&b.name, i) {
                self.problem(
                    format!("{at}.name"),
                    format!("duplicate backend name `{}` (first at backends[{first}])", b.name),
                );
            }
            out.push(self.backend(&at, b, balancing));
        }
        out
    }

    fn backend(&mut self, at: &str, b: &RawBackend, balancing: &Balancing) -> Option<PoolEntry> {
        let before = self.problems.len();
        let base = self.backend_url(&format!("{at}.url"), &b.url);
        let discovery = b.discovery.as_ref().and_then(|d| self.discovery(at, d, base.as_ref()));
        let auth = b.api_key_env.as_deref().and_then(|var| {
            let secret = self.env_secret(&format!("{at}.api_key_env"), var)?;
            match HeaderValue::from_str(&format!("Bearer {secret}")) {
                Ok(mut value) => {
                    value.set_sensitive(true);
                    Some(value)
                }
                Err(_) => {
                    self.problem(
                        format!("{at}.api_key_env"),
                        format!("environment variable {var} holds characters not allowed in an HTTP header"),
                    );
                    None
                }
            }
        });
        if auth.is_some() && base.as_ref().is_some_and(|uri| uri.scheme_str() == Some("http") && !is_loopback(uri)) {
            self.warnings.push(Problem::new(
                format!("{at}.api_key_env"),
                "the credential goes to this backend over plain http, readable on the network: use https",
            ));
        }
        let weight = b.weight.unwrap_or(1);
        if weight == 0 {
            self.problem(format!("{at}.weight"), "must be at least 1");
        }
        if b.max_concurrency == Some(0) {
            self.problem(format!("{at}.max_concurrency"), "must be at least 1 (omit it for no cap)");
        }
        let health_check = b.health_check.as_ref().map(|h| self.health_check(&format!("{at}.health_check"), h));
        let load_metrics = b.load_metrics.as_ref().map(|l| self.load_metrics(&format!("{at}.load_metrics"), l));
        let t = b.timeouts.clone().unwrap_or_default();
        let timeouts = Timeouts {
            connect: self.duration_or(
                &format!("{at}.timeouts.connect"),
                t.connect.as_deref(),
                Timeouts::DEFAULT_CONNECT,
            ),
            first_byte: self.duration_or(
                &format!("{at}.timeouts.first_byte"),
                t.first_byte.as_deref(),
                Timeouts::DEFAULT_FIRST_BYTE,
            ),
            idle: self.duration_or(&format!("{at}.timeouts.idle"), t.idle.as_deref(), Timeouts::DEFAULT_IDLE),
            total: t
                .total
                .as_deref()
                .map(|text| self.duration_or(&format!("{at}.timeouts.total"), Some(text), Duration::MAX)),
        };
        let extra_ca = b.ca_file.as_deref().and_then(|file| {
            if base.as_ref().is_some_and(|u| u.scheme_str() != Some("https")) {
                self.problem(format!("{at}.ca_file"), "only applies to https backends");
            }
            tls::certificates(Path::new(file)).map_err(|e| self.problem(format!("{at}.ca_file"), e.to_string())).ok()
        });
        if self.problems.len() > before {
            return None;
        }
        let settings = BackendSettings {
            name: BackendName::new(&b.name),
            url: b.url.clone(),
            base: base?,
            auth,
            extra_ca,
            weight,
            max_concurrency: b.max_concurrency,
            stream_usage: b.stream_usage.unwrap_or(true),
            health_check,
            load_metrics,
            timeouts,
            ejection: balancing.ejection,
        };
        let built = match discovery {
            Some(discovery) => {
                let fingerprint = discovery::fingerprint(&settings, &discovery);
                let previous = self.previous.and_then(|p| p.groups.iter().find(|g| g.name == settings.name));
                if let Some(same) = previous.filter(|g| g.fingerprint == fingerprint) {
                    return Some(PoolEntry::Group(Arc::clone(same)));
                }
                Group::new(settings, discovery, fingerprint, previous.map(|g| &**g))
                    .map(|g| PoolEntry::Group(Arc::new(g)))
            }
            None => {
                let in_force = self.previous.map_or(&[][..], |p| &p.backends[..]);
                registry::build(settings, in_force).map(PoolEntry::Backend)
            }
        };
        built
            .map_err(|e| match e {
                BuildError::Url(message) => self.problem(format!("{at}.url"), message),
                BuildError::CaFile(message) => self.problem(format!("{at}.ca_file"), message),
            })
            .ok()
    }

    /// `discovery:` of the backend at `at` whose URL is `base`.
    fn discovery(&mut self, at: &str, raw: &RawDiscovery, base: Option<&Uri>) -> Option<Discovery> {
        let at = format!("{at}.discovery");
        if !raw.dns {
            self.problem(format!("{at}.dns"), "the only discovery is by DNS: set `dns: true` (or drop `discovery`)");
        }
        let interval = self.duration_or(&format!("{at}.interval"), raw.interval.as_deref(), DEFAULT_DISCOVERY_INTERVAL);
        if interval < Duration::from_secs(1) {
            self.problem(format!("{at}.interval"), "at least 1s: every interval asks the nameserver again");
        }
        let nameserver = raw.nameserver.as_deref().and_then(|text| {
            text.parse::<SocketAddr>()
                .map_err(|_| {
                    self.problem(
                        format!("{at}.nameserver"),
                        format!("`{text}` is not an IP address and port like 10.96.0.10:53"),
                    )
                })
                .ok()
        });
        if let Some(base) = base {
            let host = base.host().unwrap_or_default();
            if host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok() {
                self.problem(
                    format!("{at}.dns"),
                    format!("the URL's host {host} is an address: discovery needs a name to resolve"),
                );
            }
            if base.scheme_str() == Some("https") {
                // Members are reached by address, and a certificate names the service.
                self.problem(format!("{at}.dns"), "not available for https backends yet: use http inside the cluster");
            }
        }
        Some(Discovery { interval, nameserver })
    }

    fn backend_url(&mut self, at: &str, url: &str) -> Option<Uri> {
        // Messages repeat the URL without any password it carries.
        let shown = redacted_url(url);
        let uri: Uri = match url.parse() {
            Ok(uri) => uri,
            Err(e) => {
                self.problem(at, format!("invalid URL `{shown}`: {e}"));
                return None;
            }
        };
        let problem = match (uri.scheme_str(), uri.authority()) {
            (Some("http" | "https"), Some(authority)) if authority.as_str().contains('@') => Some(
                "must not carry credentials: put the API key in an environment variable named by api_key_env"
                    .to_owned(),
            ),
            (Some("http" | "https"), Some(_)) if uri.query().is_some() => {
                Some("must not have a query string".to_owned())
            }
            (Some("http" | "https"), Some(_)) if uri.path().trim_end_matches('/').ends_with("/v1") => Some(format!(
                "`{shown}` ends in /v1, but nimgate appends the request path (/v1/chat/completions): drop the /v1"
            )),
            (Some("http" | "https"), Some(_)) => None,
            (Some(scheme), _) if scheme != "http" && scheme != "https" => {
                Some(format!("unsupported scheme `{scheme}` in `{shown}`: use http or https"))
            }
            _ => Some(format!("`{shown}` is not an absolute URL like http://127.0.0.1:8000")),
        };
        match problem {
            Some(message) => {
                self.problem(at, message);
                None
            }
            None => Some(uri),
        }
    }

    fn probe_path(&mut self, at: &str, path: Option<&String>, default: &str) -> String {
        let path = path.cloned().unwrap_or_else(|| default.to_owned());
        if !path.starts_with('/') {
            self.problem(format!("{at}.path"), format!("`{path}` must start with /"));
        }
        path
    }

    fn health_check(&mut self, at: &str, raw: &RawHealthCheck) -> HealthCheck {
        let path = self.probe_path(at, raw.path.as_ref(), DEFAULT_HEALTH.0);
        let interval = self.duration_or(&format!("{at}.interval"), raw.interval.as_deref(), DEFAULT_HEALTH.1);
        let timeout = self.duration_or(&format!("{at}.timeout"), raw.timeout.as_deref(), DEFAULT_HEALTH_TIMEOUT);
        let unhealthy_after = raw.unhealthy_after.unwrap_or(DEFAULT_UNHEALTHY_AFTER);
        let healthy_after = raw.healthy_after.unwrap_or(DEFAULT_HEALTHY_AFTER);
        for (field, value) in [("unhealthy_after", unhealthy_after), ("healthy_after", healthy_after)] {
            if value == 0 {
                self.problem(format!("{at}.{field}"), "must be at least 1");
            }
        }
        HealthCheck { path, interval, timeout, unhealthy_after, healthy_after }
    }

    fn load_metrics(&mut self, at: &str, raw: &RawLoadMetrics) -> LoadMetrics {
        let path = self.probe_path(at, raw.path.as_ref(), DEFAULT_LOAD_METRICS.0);
        let interval = self.duration_or(&format!("{at}.interval"), raw.interval.as_deref(), DEFAULT_LOAD_METRICS.1);
        let max_kv_cache_usage = raw.max_kv_cache_usage.unwrap_or(DEFAULT_MAX_KV_CACHE_USAGE);
        if !(max_kv_cache_usage > 0.0 && max_kv_cache_usage <= 1.0) {
            self.problem(
                format!("{at}.max_kv_cache_usage"),
                format!("{max_kv_cache_usage} is not a share above 0 and at most 1"),
            );
        }
        LoadMetrics { path, interval, max_waiting: raw.max_waiting.unwrap_or(DEFAULT_MAX_WAITING), max_kv_cache_usage }
    }

    fn routes(
        &mut self,
        raw: &[RawRoute],
        raw_backends: &[RawBackend],
        backends: &[Option<PoolEntry>],
        balancing: &Balancing,
    ) -> RouteTable {
        if raw.is_empty() {
            self.problem("routes", "no routes configured: every model would get 404; add at least one route");
        }
        // Names of invalid backends still resolve (to None) so that one bad backend does not
        // also produce an "unknown backend" problem in every route that uses it.
        let mut by_name: HashMap<&str, Option<&PoolEntry>> = HashMap::new();
        for (raw, backend) in raw_backends.iter().zip(backends) {
            by_name.entry(raw.name.as_str()).or_insert(backend.as_ref());
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        let mut routes = Vec::with_capacity(raw.len());
        for (i, r) in raw.iter().enumerate() {
            let at = format!("routes[{i}]");
            let pattern = ModelPattern::parse(&r.model).map_err(|e| self.problem(format!("{at}.model"), e)).ok();
            if let Some(first) = seen.insert(r.model.clone(), i) {
                self.problem(
                    format!("{at}.model"),
                    format!("duplicate route for `{}` (first at routes[{first}])", r.model),
                );
            }
            if r.backends.is_empty() {
                self.problem(format!("{at}.backends"), "empty pool: a route needs at least one backend");
            }
            let primary = self.pool_members(&format!("{at}.backends"), &r.backends, &[], &by_name);
            let fallback = self.pool_members(&format!("{at}.fallback"), &r.fallback, &r.backends, &by_name);
            if r.backends.len() + r.fallback.len() > MAX_POOL_MEMBERS {
                self.problem(
                    format!("{at}.backends"),
                    format!("at most {MAX_POOL_MEMBERS} backends per route, fallback included"),
                );
            }
            let upstream_model = r.upstream_model.as_deref().map(|name| {
                if name.is_empty() {
                    self.problem(
                        format!("{at}.upstream_model"),
                        "must not be empty (omit it to forward the model name as sent)",
                    );
                }
                UpstreamModel::new(name)
            });
            let strategy = match r.strategy.as_deref() {
                None | Some("two_choices") => Strategy::TwoChoices,
                Some("prefix_affinity") => Strategy::PrefixAffinity,
                Some(other) => {
                    self.problem(
                        format!("{at}.strategy"),
                        format!("`{other}` is not a strategy: use two_choices (the default) or prefix_affinity"),
                    );
                    Strategy::TwoChoices
                }
            };
            if let (Some(pattern), Some(primary), Some(fallback)) = (pattern, primary, fallback) {
                let pool = Pool::new(primary, fallback, balancing, strategy);
                let pass_priority = r.pass_priority.unwrap_or(false);
                routes.push(Arc::new(Route { pattern, pool, upstream_model, pass_priority }));
            }
        }
        RouteTable::new(routes)
    }

    fn pool_members(
        &mut self,
        at: &str,
        names: &[String],
        exclude: &[String],
        by_name: &HashMap<&str, Option<&PoolEntry>>,
    ) -> Option<Vec<PoolEntry>> {
        let mut members = Vec::with_capacity(names.len());
        let mut complete = true;
        for (j, name) in names.iter().enumerate() {
            match by_name.get(name.as_str()) {
                Some(Some(entry)) => members.push((*entry).clone()),
                Some(None) => complete = false,
                None => {
                    let mut known: Vec<&str> = by_name.keys().copied().collect();
                    known.sort_unstable();
                    self.problem(
                        format!("{at}[{j}]"),
                        format!("unknown backend `{name}` (known: {})", known.join(", ")),
                    );
                    complete = false;
                }
            }
            if names[..j].contains(name) {
                self.problem(format!("{at}[{j}]"), format!("backend `{name}` is listed twice"));
            } else if exclude.contains(name) {
                self.problem(format!("{at}[{j}]"), format!("backend `{name}` is already in the route's backends"));
            }
        }
        complete.then_some(members)
    }

    fn keys(&mut self, raw: &[RawKey], allow_anonymous: bool) -> KeyTable {
        if raw.is_empty() && !allow_anonymous {
            self.problem(
                "keys",
                "no keys configured: add keys, or set server.allow_anonymous: true to serve without authentication",
            );
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut digests: HashMap<[u8; 32], usize> = HashMap::new();
        let mut keys = Vec::with_capacity(raw.len());
        for (i, k) in raw.iter().enumerate() {
            let at = format!("keys[{i}]");
            self.name(&format!("{at}.name"), &k.name, "key");
            if k.name == "anonymous" {
                self.problem(format!("{at}.name"), "`anonymous` is reserved for callers without a key");
            }
            if let Some(first) = names.insert(&k.name, i) {
                self.problem(format!("{at}.name"), format!("duplicate key name `{}` (first at keys[{first}])", k.name));
            }
            let digest = match (&k.key_sha256, &k.key_env) {
                (Some(_), Some(_)) => {
                    self.problem(at.clone(), "set key_sha256 or key_env, not both");
                    None
                }
                (None, None) => {
                    self.problem(at.clone(), "no key: set key_sha256 (from `nimgate hash-key`) or key_env");
                    None
                }
                (Some(hex_digest), None) => self.sha256(&format!("{at}.key_sha256"), hex_digest),
                (None, Some(var)) => {
                    self.env_secret(&format!("{at}.key_env"), var).map(|key| auth::digest(key.as_bytes()))
                }
            };
            if let Some(digest) = digest {
                if let Some(first) = digests.insert(digest, i) {
                    self.problem(
                        at.clone(),
                        format!("same key as keys[{first}] (`{}`): each key must be unique", raw[first].name),
                    );
                }
            }
            if k.models.is_empty() {
                self.problem(
                    format!("{at}.models"),
                    "no ACL: list the model globs this key may use (\"*\" for every model)",
                );
            }
            let acl: Vec<ModelPattern> = k
                .models
                .iter()
                .enumerate()
                .filter_map(|(j, m)| {
                    ModelPattern::parse(m).map_err(|e| self.problem(format!("{at}.models[{j}]"), e)).ok()
                })
                .collect();
            let limits = k.limits.as_ref().map_or(Limits::default(), |l| {
                for (field, value, max) in [
                    ("requests_per_minute", l.requests_per_minute, MAX_REQUESTS_PER_MINUTE),
                    ("tokens_per_minute", l.tokens_per_minute, MAX_TOKENS_PER_MINUTE),
                ] {
                    match value {
                        Some(0) => {
                            self.problem(format!("{at}.limits.{field}"), "must be at least 1 (omit it for no limit)")
                        }
                        Some(n) if n > max => self.problem(
                            format!("{at}.limits.{field}"),
                            format!("{n} is beyond what can be enforced (at most {max}); omit it for no limit"),
                        ),
                        _ => {}
                    }
                }
                match (l.burst, l.requests_per_minute) {
                    (Some(_), None) => self.problem(
                        format!("{at}.limits.burst"),
                        "caps requests_per_minute's back-to-back requests: set requests_per_minute too",
                    ),
                    (Some(0), _) => self.problem(format!("{at}.limits.burst"), "must be at least 1"),
                    (Some(burst), Some(rpm)) if burst > rpm => self.problem(
                        format!("{at}.limits.burst"),
                        format!("{burst} is more than requests_per_minute ({rpm}): the bucket holds one minute"),
                    ),
                    _ => {}
                }
                if l.max_concurrency == Some(0) {
                    self.problem(format!("{at}.limits.max_concurrency"), "must be at least 1 (omit it for no limit)");
                }
                Limits {
                    requests_per_minute: l.requests_per_minute,
                    burst: l.burst,
                    tokens_per_minute: l.tokens_per_minute,
                    max_concurrency: l.max_concurrency,
                }
            });
            let weight = k.weight.unwrap_or(1);
            if !(1..=Key::MAX_WEIGHT).contains(&weight) {
                self.problem(
                    format!("{at}.weight"),
                    format!("must be between 1 and {} (its share of a saturated pool)", Key::MAX_WEIGHT),
                );
            }
            if let Some(digest) = digest {
                let key = Key::new(KeyName::new(&k.name), acl, limits)
                    .with_weight(weight)
                    .with_priority(k.priority.unwrap_or(0));
                keys.push((digest, Arc::new(key)));
            }
        }
        KeyTable::new(keys, allow_anonymous)
    }

    fn rate_limits(&mut self, raw: &RawRateLimits) -> RateLimitSettings {
        let store = match raw.store.as_deref().unwrap_or("memory") {
            "memory" => {
                for (field, set) in [
                    ("redis_url", raw.redis_url.is_some()),
                    ("redis_url_env", raw.redis_url_env.is_some()),
                    ("key_prefix", raw.key_prefix.is_some()),
                ] {
                    if set {
                        self.problem(format!("rate_limits.{field}"), "is for the redis store: set `store: redis`");
                    }
                }
                StoreSettings::Memory
            }
            "redis" => self.redis(raw).map_or(StoreSettings::Memory, StoreSettings::Redis),
            other => {
                self.problem("rate_limits.store", format!("unknown store `{other}`: use memory or redis"));
                StoreSettings::Memory
            }
        };
        let on_store_error = match raw.on_store_error.as_deref().unwrap_or("allow") {
            "allow" => OnStoreError::Allow,
            "deny" => OnStoreError::Deny,
            other => {
                self.problem("rate_limits.on_store_error", format!("unknown policy `{other}`: use allow or deny"));
                OnStoreError::Allow
            }
        };
        let default_max_tokens = raw.default_max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
        if default_max_tokens == 0 {
            self.problem("rate_limits.default_max_tokens", "must be at least 1");
        }
        RateLimitSettings { default_max_tokens, store, on_store_error }
    }

    /// The redis store's settings: a URL from `redis_url` or the variable `redis_url_env` names
    /// (for one with a password), a key prefix, and its timings.
    fn redis(&mut self, raw: &RawRateLimits) -> Option<RedisSettings> {
        let url = match (&raw.redis_url, &raw.redis_url_env) {
            (Some(_), Some(_)) => {
                self.problem("rate_limits.redis_url", "set redis_url or redis_url_env, not both");
                None
            }
            (Some(url), None) => Some(("rate_limits.redis_url", url.trim().to_owned())),
            (None, Some(var)) => {
                self.env_secret("rate_limits.redis_url_env", var).map(|url| ("rate_limits.redis_url_env", url))
            }
            (None, None) => Some(("rate_limits.redis_url", "redis://127.0.0.1:6379".to_owned())),
        };
        let timeout = self.duration_or("rate_limits.timeout", raw.timeout.as_deref(), DEFAULT_STORE_TIMEOUT);
        if timeout > Duration::from_secs(10) {
            self.problem("rate_limits.timeout", "at most 10s: every limited request waits for it when Redis is slow");
        }
        let lease_ttl = self.duration_or("rate_limits.lease_ttl", raw.lease_ttl.as_deref(), DEFAULT_LEASE_TTL);
        if lease_ttl < Duration::from_secs(1) || lease_ttl > Duration::from_secs(3600) {
            self.problem("rate_limits.lease_ttl", "must be between 1s and 1h");
        }
        let key_prefix = raw.key_prefix.clone().unwrap_or_else(|| "nimgate:".to_owned());
        if key_prefix.len() > 128 || key_prefix.contains(['{', '}']) || key_prefix.chars().any(char::is_control) {
            self.problem("rate_limits.key_prefix", "at most 128 characters, without braces or control characters");
        }
        let ca_pem = raw.redis_ca_file.as_deref().and_then(|path| self.redis_ca(path));
        if ca_pem.is_some() && !url.as_ref().is_some_and(|(_, u)| u.starts_with("rediss://")) {
            self.problem("rate_limits.redis_ca_file", "is for TLS: use a rediss:// URL");
        }
        let (at, url) = url?;
        let shown = redacted_url(&url);
        match redis::Client::open(url.as_str()) {
            Ok(_) if url.starts_with("redis://") || url.starts_with("rediss://") => {}
            _ => {
                self.problem(
                    at,
                    format!("`{shown}` is not a redis:// or rediss:// URL like redis://:password@host:6379/0"),
                );
                return None;
            }
        }
        Some(RedisSettings { url, shown, ca_pem, key_prefix, timeout, lease_ttl })
    }

    /// The PEM certificates of `redis_ca_file`, checked to hold at least one.
    fn redis_ca(&mut self, path: &str) -> Option<Arc<[u8]>> {
        let at = "rate_limits.redis_ca_file";
        let pem = match std::fs::read(path) {
            Ok(pem) => pem,
            Err(e) => {
                self.problem(at, format!("cannot read `{path}`: {e}"));
                return None;
            }
        };
        use rustls::pki_types::CertificateDer;
        use rustls::pki_types::pem::PemObject;
        let certificates = CertificateDer::pem_slice_iter(&pem).filter(Result::is_ok).count();
        if certificates == 0 {
            self.problem(at, format!("`{path}` holds no PEM certificate"));
            return None;
        }
        Some(pem.into())
    }

    fn name(&mut self, at: &str, name: &str, what: &str) {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            self.problem(at, format!("invalid {what} name `{name}`: use 1-64 letters, digits, '-', '_' or '.'"));
        }
    }

    fn sha256(&mut self, at: &str, text: &str) -> Option<[u8; 32]> {
        let mut digest = [0u8; 32];
        match hex::decode_to_slice(text.trim(), &mut digest) {
            Ok(()) => Some(digest),
            Err(_) => {
                self.problem(at, "must be 64 hex digits: the output of `nimgate hash-key`");
                None
            }
        }
    }

    fn env_secret(&mut self, at: &str, var: &str) -> Option<String> {
        match self.env.var(var) {
            Some(value) if !value.trim().is_empty() => Some(value.trim().to_owned()),
            Some(_) => {
                self.problem(at, format!("environment variable {var} is empty"));
                None
            }
            None => {
                self.problem(at, format!("environment variable {var} is not set"));
                None
            }
        }
    }

    fn socket_addr(&mut self, at: &str, text: &str) -> SocketAddr {
        text.parse().unwrap_or_else(|_| {
            self.problem(at, format!("`{text}` is not an IP address and port like 0.0.0.0:8080"));
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn duration_or(&mut self, at: &str, text: Option<&str>, default: Duration) -> Duration {
        let Some(text) = text else { return default };
        match parse_duration(text) {
            Ok(d) => d,
            Err(message) => {
                self.problem(at, message);
                default
            }
        }
    }
}

/// Whether `uri`'s host is this machine (a sidecar's NIM on localhost).
fn is_loopback(uri: &Uri) -> bool {
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// `url` with any `user:password@` replaced, for messages.
fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// A humane duration (`250ms`, `5s`, `2m`, `1h 30m`) that is not zero.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    match humantime::parse_duration(text.trim()) {
        Ok(d) if d.is_zero() => Err(format!("`{text}` must be greater than zero")),
        Ok(d) if d > MAX_DURATION => Err(format!("`{text}` is too long: at most 7 days (168h)")),
        Ok(d) => Ok(d),
        Err(_) => Err(format!("invalid duration `{text}`: write it like 250ms, 5s or 2m")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;
    use config::FileFormat;

    const GOOD: &str = r#"
server: { listen: "127.0.0.1:8080" }
backends:
  - { name: a, url: "http://127.0.0.1:8000" }
  - { name: b, url: "https://nim.example.com", api_key_env: NIM_KEY }
routes:
  - { model: "meta/llama", backends: [a], fallback: [b] }
  - { model: "nvidia/*", backends: [a, b] }
keys:
  - { name: team-a, key_sha256: "5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8", models: ["*"] }
  - { name: team-b, key_env: TEAM_B_KEY, models: ["meta/*"] }
"#;

    fn env() -> EnvSource {
        EnvSource::Map(
            [("NIM_KEY", "nvapi-secret"), ("TEAM_B_KEY", "sk-b"), ("REDIS_URL", "rediss://:pw@redis.internal:6380/2")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn check(yaml: &str) -> Result<Snapshot, Vec<String>> {
        let raw = load_str(yaml, FileFormat::Yaml, &env()).map_err(|e| vec![e.to_string()])?;
        validate(&raw, &env()).map_err(|e| e.problems().iter().map(ToString::to_string).collect())
    }

    /// `GOOD` with `from` replaced by `to` (which must occur).
    fn with(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        GOOD.replacen(from, to, 1)
    }

    fn problems(yaml: &str) -> Vec<String> {
        check(yaml).expect_err("expected problems")
    }

    fn assert_problem(yaml: &str, expected_path_and_words: &str) {
        let found = problems(yaml);
        assert!(
            found.iter().any(|p| p.starts_with(expected_path_and_words)),
            "wanted `{expected_path_and_words}`, got {found:#?}"
        );
    }

    #[test]
    fn a_good_config_validates_with_defaults_filled_in() {
        let s = check(GOOD).unwrap();
        assert_eq!(s.backends.len(), 2);
        assert_eq!(s.routes.len(), 2);
        assert_eq!(s.keys.len(), 2);
        assert_eq!(s.server.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
        assert_eq!(s.server.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
        assert_eq!(s.server.admin_listen.to_string(), DEFAULT_ADMIN_LISTEN);
        let b = &s.backends[1];
        assert!(b.auth.as_ref().unwrap().is_sensitive());
        assert!(b.health_check.is_none(), "active health checks only where configured");
        assert_eq!(b.timeouts, Timeouts::DEFAULT);
        assert_eq!(s.balancing, Balancing::default());
        assert_eq!(b.uri(crate::api::Endpoint::ChatCompletions), "https://nim.example.com/v1/chat/completions");
    }

    #[test]
    fn balancing_and_probe_settings_validate() {
        let s = check(&format!(
            "{GOOD}\nbalancing: {{ queue_length: 4, queue_timeout: 1s, max_attempts: 2, retry_budget: 0.5, eject_after: 1 }}"
        ))
        .unwrap();
        assert_eq!((s.balancing.queue_length, s.balancing.max_attempts, s.balancing.ejection.after), (4, 2, 1));
        let probes = with(
            r#"url: "http://127.0.0.1:8000" }"#,
            r#"url: "http://127.0.0.1:8000", health_check: { interval: 1s, unhealthy_after: 2 },
                load_metrics: { max_waiting: 3 }, timeouts: { idle: 10s, total: 5m } }"#,
        );
        let s = check(&probes).unwrap();
        let b = &s.backends[0];
        let health = b.health_check.as_ref().unwrap();
        assert_eq!(
            (health.path.as_str(), health.interval, health.unhealthy_after),
            ("/v1/health/ready", Duration::from_secs(1), 2)
        );
        assert_eq!(b.load_metrics.as_ref().unwrap().max_waiting, 3);
        assert_eq!((b.timeouts.idle, b.timeouts.total), (Duration::from_secs(10), Some(Duration::from_secs(300))));
    }

    #[test]
    fn a_route_may_pass_its_keys_priority() {
        let yaml = GOOD
            .replace(r#"backends: [a, b] }"#, r#"backends: [a, b], pass_priority: true }"#)
            .replace(r#"models: ["meta/*"] }"#, r#"models: ["meta/*"], priority: -5 }"#);
        let s = check(&yaml).unwrap();
        let passing: Vec<bool> = s.routes.iter().map(|r| r.pass_priority).collect();
        assert_eq!(passing, [false, true]);
        let mut priorities: Vec<_> = s.keys.keys().map(|k| k.priority.clone()).collect();
        priorities.sort();
        assert_eq!(priorities, [bytes::Bytes::from_static(b"-5"), bytes::Bytes::from_static(b"0")]);
    }

    #[test]
    fn a_key_takes_its_weight_between_1_and_1000() {
        let s = check(&GOOD.replace(r#"models: ["meta/*"] }"#, r#"models: ["meta/*"], weight: 3 }"#)).unwrap();
        let weights: Vec<u32> = s.keys.keys().map(|k| k.weight).collect();
        assert!(weights.contains(&3) && weights.contains(&1), "{weights:?}");
        for bad in ["0", "1001"] {
            assert_problem(
                &GOOD.replace(r#"models: ["meta/*"] }"#, &format!(r#"models: ["meta/*"], weight: {bad} }}"#)),
                "keys[1].weight: must be between 1 and 1000",
            );
        }
    }

    #[test]
    fn a_route_takes_its_strategy_and_affinity_its_tuning() {
        let s = check(&GOOD.replace(
            r#"{ model: "nvidia/*", backends: [a, b] }"#,
            r#"{ model: "nvidia/*", backends: [a, b], strategy: prefix_affinity }"#,
        ))
        .unwrap();
        let strategies: Vec<_> = s.routes.iter().map(|r| r.pool.strategy()).collect();
        assert_eq!(strategies, [Strategy::TwoChoices, Strategy::PrefixAffinity]);
        assert_eq!(s.routes.iter().nth(1).unwrap().pool.affinity(), Some(&AffinitySettings::DEFAULT));
        let tuned = check(&format!(
            "{GOOD}\nbalancing: {{ prefix_affinity: {{ block_bytes: 64, blocks_per_backend: 1000, load_bound: 2 }} }}"
        ))
        .unwrap();
        let expected =
            AffinitySettings { block_bytes: 64, blocks_per_backend: 1000, load_bound: 2.0, ..Default::default() };
        assert_eq!(tuned.balancing.prefix_affinity, expected);
        for (bad, problem) in [
            ("block_bytes: 8", "balancing.prefix_affinity.block_bytes: must be between 16 and 65536"),
            ("blocks_per_backend: 0", "balancing.prefix_affinity.blocks_per_backend: must be between 1"),
            ("block_bytes: 512, max_prefix_bytes: 256", "balancing.prefix_affinity.max_prefix_bytes: must be between"),
            ("load_bound: 0.5", "balancing.prefix_affinity.load_bound: 0.5 is not a ratio"),
        ] {
            assert_problem(&format!("{GOOD}\nbalancing: {{ prefix_affinity: {{ {bad} }} }}"), problem);
        }
        assert_problem(
            &GOOD.replace(r#"backends: [a, b] }"#, r#"backends: [a, b], strategy: round_robin }"#),
            "routes[1].strategy: `round_robin` is not a strategy: use two_choices (the default) or prefix_affinity",
        );
    }

    #[test]
    fn bad_balancing_values_are_reported() {
        for (bad, problem) in [
            ("max_attempts: 0", "balancing.max_attempts: must be at least 1"),
            ("retry_budget: 1.5", "balancing.retry_budget: 1.5 is not a share"),
            ("eject_after: 0", "balancing.eject_after: must be at least 1"),
            ("ejection_base: 1m, ejection_max: 1s", "balancing.ejection_max: must not be shorter"),
        ] {
            assert_problem(&format!("{GOOD}\nbalancing: {{ {bad} }}"), problem);
        }
        assert_problem(
            &with(
                r#"url: "http://127.0.0.1:8000" }"#,
                r#"url: "http://127.0.0.1:8000", load_metrics: { max_kv_cache_usage: 0 } }"#,
            ),
            "backends[0].load_metrics.max_kv_cache_usage",
        );
    }

    #[test]
    fn unknown_backend_in_a_route_names_the_known_ones() {
        assert_problem(
            &with("backends: [a], fallback", "backends: [a, c], fallback"),
            "routes[0].backends[1]: unknown backend `c` (known: a, b)",
        );
        assert_problem(&with("fallback: [b]", "fallback: [zz]"), "routes[0].fallback[0]: unknown backend `zz`");
    }

    #[test]
    fn duplicate_names_are_reported_where_they_repeat() {
        assert_problem(
            &with("name: b,", "name: a,"),
            "backends[1].name: duplicate backend name `a` (first at backends[0])",
        );
        assert_problem(&with("name: team-b", "name: team-a"), "keys[1].name: duplicate key name `team-a`");
        assert_problem(
            &with("model: \"nvidia/*\"", "model: \"meta/llama\""),
            "routes[1].model: duplicate route for `meta/llama`",
        );
    }

    #[test]
    fn bad_urls_say_why() {
        assert_problem(
            &with("http://127.0.0.1:8000", "127.0.0.1:8000"),
            "backends[0].url: `127.0.0.1:8000` is not an absolute URL",
        );
        assert_problem(&with("http://127.0.0.1:8000", "ftp://h:1"), "backends[0].url: unsupported scheme `ftp`");
        assert_problem(&with("http://127.0.0.1:8000", "http://u:p@h:1"), "backends[0].url: must not carry credentials");
        assert_problem(
            &with("http://127.0.0.1:8000", "http://h:8000/v1"),
            "backends[0].url: `http://h:8000/v1` ends in /v1",
        );
        assert_problem(
            &with("http://127.0.0.1:8000", "http://h:8000/?x=1"),
            "backends[0].url: must not have a query string",
        );
        assert_problem(&with("http://127.0.0.1:8000", "http://bad host"), "backends[0].url: invalid URL");
    }

    #[test]
    fn bad_globs_are_reported_in_routes_and_acls() {
        assert_problem(
            &with("model: \"nvidia/*\"", "model: \"nvidia/[x\""),
            "routes[1].model: invalid glob `nvidia/[x`",
        );
        assert_problem(&with("models: [\"meta/*\"]", "models: [\"meta/{a\"]"), "keys[1].models[0]: invalid glob");
    }

    #[test]
    fn absurd_durations_are_refused_instead_of_overflowing_every_request() {
        assert_problem(
            &with(
                "url: \"http://127.0.0.1:8000\" }",
                "url: \"http://127.0.0.1:8000\", timeouts: { total: 300000000000y } }",
            ),
            "backends[0].timeouts.total: `300000000000y` is too long: at most 7 days (168h)",
        );
        assert!(parse_duration("168h").is_ok());
    }

    #[test]
    fn credentials_in_urls_are_never_repeated_and_a_key_over_plain_http_is_warned_of() {
        let leaky = with("http://127.0.0.1:8000\" }", "ftp://admin:hunter2@nim:21\" }");
        let problems = check(&leaky).unwrap_err().join("\n");
        assert!(problems.contains("ftp://***@nim:21") && !problems.contains("hunter2"), "{problems}");
        assert_eq!(redacted_url("https://u:p@h/x@y"), "https://***@h/x@y");
        let s = check(&with("https://nim.example.com", "http://nim.example.com")).unwrap();
        assert_eq!(s.warnings.len(), 1);
        assert_eq!(s.warnings[0].path, "backends[1].api_key_env");
        let local = check(&with("https://nim.example.com", "http://localhost:8000")).unwrap();
        assert!(local.warnings.is_empty(), "a sidecar's NIM on localhost is fine");
    }

    #[test]
    fn connection_settings_have_defaults_and_bounds() {
        let s = check(GOOD).unwrap();
        assert_eq!(s.server.header_read_timeout, DEFAULT_HEADER_READ_TIMEOUT);
        assert_eq!(s.server.idle_timeout, DEFAULT_IDLE_TIMEOUT);
        assert_eq!((s.server.max_header_bytes, s.server.max_connections), (65536, 10_000));
        assert!(s.server.admin_token.is_none());
        let server =
            |fields: &str| with("listen: \"127.0.0.1:8080\"", &format!("listen: \"127.0.0.1:8080\", {fields}"));
        assert_problem(&server("max_connections: 0"), "server.max_connections: must be at least 1");
        assert_problem(&server("max_header_bytes: 100"), "server.max_header_bytes: must be between 1024 and 16777216");
        assert_problem(
            &server("max_body_bytes: 2000, max_buffered_body_bytes: 1000"),
            "server.max_buffered_body_bytes: must be at least server.max_body_bytes (2000), or no request of that size could be read",
        );
        assert_problem(
            &server("admin_token_env: NO_SUCH_TOKEN"),
            "server.admin_token_env: environment variable NO_SUCH_TOKEN is not set",
        );
        let s = check(&server("admin_token_env: NIM_KEY")).unwrap();
        let token = s.server.admin_token.unwrap();
        assert!(token.matches(b"nvapi-secret") && !token.matches(b"nvapi-secreT"));
        assert_eq!(format!("{token:?}"), "AdminToken(redacted)");
    }

    #[test]
    fn bad_durations_are_reported_with_an_example() {
        assert_problem(
            &with("listen: \"127.0.0.1:8080\"", "listen: \"127.0.0.1:8080\", drain_timeout: five seconds"),
            "server.drain_timeout: invalid duration `five seconds`: write it like 250ms, 5s or 2m",
        );
        assert_problem(
            &with("url: \"http://127.0.0.1:8000\" }", "url: \"http://127.0.0.1:8000\", timeouts: { first_byte: 0s } }"),
            "backends[0].timeouts.first_byte: `0s` must be greater than zero",
        );
        assert_problem(
            &with(
                "url: \"http://127.0.0.1:8000\" }",
                "url: \"http://127.0.0.1:8000\", health_check: { interval: soon } }",
            ),
            "backends[0].health_check.interval: invalid duration",
        );
    }

    #[test]
    fn an_empty_pool_is_refused() {
        assert_problem(&with("backends: [a, b]", "backends: []"), "routes[1].backends: empty pool");
    }

    #[test]
    fn a_key_without_acl_or_secret_is_refused() {
        assert_problem(&with("models: [\"meta/*\"]", "models: []"), "keys[1].models: no ACL");
        assert_problem(&with("key_env: TEAM_B_KEY, ", ""), "keys[1]: no key: set key_sha256");
        assert_problem(
            &with("key_env: TEAM_B_KEY", "key_env: TEAM_B_KEY, key_sha256: abc"),
            "keys[1]: set key_sha256 or key_env, not both",
        );
        assert_problem(
            &with("5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8", "5e88"),
            "keys[0].key_sha256: must be 64 hex digits",
        );
        assert_problem(
            &with("key_env: TEAM_B_KEY", "key_env: MISSING_VAR"),
            "keys[1].key_env: environment variable MISSING_VAR is not set",
        );
    }

    #[test]
    fn the_same_secret_twice_is_refused() {
        let yaml = with(
            "key_env: TEAM_B_KEY",
            "key_sha256: \"5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8\"",
        );
        assert_problem(&yaml, "keys[1]: same key as keys[0] (`team-a`)");
    }

    #[test]
    fn a_missing_backend_credential_is_reported_without_its_value() {
        assert_problem(
            &with("api_key_env: NIM_KEY", "api_key_env: NO_SUCH_KEY"),
            "backends[1].api_key_env: environment variable NO_SUCH_KEY is not set",
        );
        let all = format!("{:?}", check(&with("NIM_KEY", "NIM_KEY }\n  - { name: 'bad name', url: x")).err().unwrap());
        assert!(!all.contains("nvapi-secret"));
    }

    #[test]
    fn no_keys_needs_anonymous_access_turned_on() {
        let keyless = GOOD.split("keys:").next().unwrap().to_owned();
        assert_problem(&keyless, "keys: no keys configured");
        let anonymous =
            keyless.replace("listen: \"127.0.0.1:8080\"", "listen: \"127.0.0.1:8080\", allow_anonymous: true");
        assert!(check(&anonymous).is_ok());
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let yaml = with("backends: [a], fallback", "backends: [nope], fallback")
            .replace("name: team-b", "name: team-a")
            .replace("\"127.0.0.1:8080\"", "\"nowhere\"");
        let found = problems(&yaml);
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(found[0].starts_with("server.listen: `nowhere` is not an IP address and port"));
    }

    #[test]
    fn invalid_names_limits_and_stores_are_reported() {
        assert_problem(&with("name: a,", "name: 'a b',"), "backends[0].name: invalid backend name `a b`");
        assert_problem(&with("name: team-b", "name: anonymous"), "keys[1].name: `anonymous` is reserved");
        assert_problem(
            &with("models: [\"meta/*\"]", "models: [\"meta/*\"], limits: { requests_per_minute: 0 }"),
            "keys[1].limits.requests_per_minute: must be at least 1",
        );
        assert_problem(
            &with("models: [\"meta/*\"]", "models: [\"meta/*\"], limits: { requests_per_minute: 99000000000 }"),
            "keys[1].limits.requests_per_minute: 99000000000 is beyond what can be enforced",
        );
        for (limits, problem) in [
            ("{ burst: 5 }", "keys[1].limits.burst: caps requests_per_minute's back-to-back requests"),
            (
                "{ requests_per_minute: 10, burst: 11 }",
                "keys[1].limits.burst: 11 is more than requests_per_minute (10)",
            ),
            ("{ requests_per_minute: 10, burst: 0 }", "keys[1].limits.burst: must be at least 1"),
            ("{ max_concurrency: 0 }", "keys[1].limits.max_concurrency: must be at least 1"),
        ] {
            assert_problem(&with("models: [\"meta/*\"]", &format!("models: [\"meta/*\"], limits: {limits}")), problem);
        }
        let ok = check(&with(
            "models: [\"meta/*\"]",
            "models: [\"meta/*\"], limits: { requests_per_minute: 10, burst: 10, max_concurrency: 4 }",
        ))
        .unwrap();
        let limits = ok.keys.keys().find(|k| k.name.as_str() == "team-b").unwrap().limits;
        assert_eq!((limits.request_burst(), limits.max_concurrency), (Some(10), Some(4)));
        assert_problem(&format!("{GOOD}rate_limits: {{ store: etcd }}\n"), "rate_limits.store: unknown store `etcd`");
        assert_problem(
            &format!("{GOOD}rate_limits: {{ store: redis, redis_url: 'http://x' }}\n"),
            "rate_limits.redis_url:",
        );
        assert_problem(
            &with("url: \"http://127.0.0.1:8000\" }", "url: \"http://127.0.0.1:8000\", weight: 0 }"),
            "backends[0].weight: must be at least 1",
        );
    }

    #[test]
    fn the_redis_store_takes_a_url_or_a_variable_and_checks_its_settings() {
        let store = |yaml: &str| check(&format!("{GOOD}rate_limits: {yaml}\n")).map(|s| s.rate_limits);
        let settings = store("{ store: redis, redis_url_env: REDIS_URL, on_store_error: deny }").unwrap();
        let StoreSettings::Redis(redis) = &settings.store else { panic!("{settings:?}") };
        assert_eq!(redis.url, "rediss://:pw@redis.internal:6380/2");
        assert_eq!(redis.shown, "rediss://***@redis.internal:6380/2");
        assert_eq!(
            (redis.key_prefix.as_str(), redis.timeout, redis.lease_ttl),
            ("nimgate:", DEFAULT_STORE_TIMEOUT, DEFAULT_LEASE_TTL)
        );
        assert_eq!(settings.on_store_error, OnStoreError::Deny);
        assert!(!format!("{redis:?}").contains("pw"), "Debug shows no password: {redis:?}");
        let default = store("{ store: redis }").unwrap();
        assert!(matches!(&default.store, StoreSettings::Redis(r) if r.url == "redis://127.0.0.1:6379"));
        assert_eq!(store("{ }").unwrap().store, StoreSettings::Memory);

        for (yaml, problem) in [
            (
                "{ store: redis, redis_url: 'redis://a', redis_url_env: REDIS_URL }",
                "rate_limits.redis_url: set redis_url or redis_url_env",
            ),
            (
                "{ store: redis, redis_url_env: NOT_SET }",
                "rate_limits.redis_url_env: environment variable NOT_SET is not set",
            ),
            ("{ redis_url: 'redis://a' }", "rate_limits.redis_url: is for the redis store"),
            ("{ store: redis, timeout: 30s }", "rate_limits.timeout: at most 10s"),
            ("{ store: redis, lease_ttl: 2h }", "rate_limits.lease_ttl: must be between 1s and 1h"),
            ("{ store: redis, key_prefix: 'a{b}' }", "rate_limits.key_prefix: at most 128 characters, without braces"),
            ("{ store: redis, redis_ca_file: /nonexistent/ca.pem }", "rate_limits.redis_ca_file: cannot read"),
            (
                "{ store: redis, redis_url: 'redis://:secret@[::1' }",
                "rate_limits.redis_url: `redis://***@[::1` is not a redis:// or rediss:// URL",
            ),
        ] {
            assert_problem(&format!("{GOOD}rate_limits: {yaml}\n"), problem);
        }
        let refused = problems(&format!("{GOOD}rate_limits: {{ store: redis, redis_url: 'redis://:secret@[::1' }}\n"));
        assert!(!refused.iter().any(|p| p.contains("secret")), "{refused:?}");
    }

    #[test]
    fn a_backend_with_dns_discovery_is_a_group_routes_can_name() {
        let grouped = |discovery: &str| {
            with(
                r#"{ name: a, url: "http://127.0.0.1:8000" }"#,
                &format!(r#"{{ name: a, url: "http://nim.nim.svc.cluster.local:8000", discovery: {discovery} }}"#),
            )
        };
        let ok = check(&grouped("{ dns: true, interval: 5s, nameserver: '10.96.0.10:53' }")).unwrap();
        assert_eq!((ok.backends.len(), ok.groups.len()), (1, 1));
        let group = &ok.groups[0];
        assert_eq!((group.name.as_str(), group.host()), ("a", "nim.nim.svc.cluster.local"));
        assert_eq!(group.discovery.interval, Duration::from_secs(5));
        assert_eq!(group.discovery.nameserver, Some("10.96.0.10:53".parse().unwrap()));
        let route = ok.routes.find("meta/llama").unwrap();
        assert!(matches!(&route.pool.primary_entries()[0], PoolEntry::Group(g) if Arc::ptr_eq(g, group)));
        let default = check(&grouped("{ dns: true }")).unwrap();
        assert_eq!(default.groups[0].discovery.interval, DEFAULT_DISCOVERY_INTERVAL);

        for (discovery, problem) in [
            ("{ dns: false }", "backends[0].discovery.dns: the only discovery is by DNS"),
            ("{ dns: true, interval: 100ms }", "backends[0].discovery.interval: at least 1s"),
            (
                "{ dns: true, nameserver: 'dns.local' }",
                "backends[0].discovery.nameserver: `dns.local` is not an IP address",
            ),
        ] {
            assert_problem(&grouped(discovery), problem);
        }
        assert_problem(
            &with(r#"url: "http://127.0.0.1:8000" }"#, r#"url: "http://127.0.0.1:8000", discovery: { dns: true } }"#),
            "backends[0].discovery.dns: the URL's host 127.0.0.1 is an address",
        );
        assert_problem(
            &with(
                r#"url: "https://nim.example.com", api_key_env"#,
                r#"url: "https://nim.example.com", discovery: { dns: true }, api_key_env"#,
            ),
            "backends[1].discovery.dns: not available for https backends yet",
        );
    }

    #[test]
    fn logging_takes_a_format_and_a_filter() {
        let ok = check(&format!("{GOOD}logging: {{ format: json, level: \"warn,nimgate::access=info\" }}\n")).unwrap();
        assert_eq!(ok.logging, LoggingSettings { format: LogFormat::Json, level: "warn,nimgate::access=info".into() });
        assert_eq!(check(GOOD).unwrap().logging, LoggingSettings::default());
        assert_problem(
            &format!("{GOOD}logging: {{ format: logfmt }}\n"),
            "logging.format: `logfmt` is not a log format: use text or json",
        );
        assert_problem(
            &format!("{GOOD}logging: {{ level: \"info,[\" }}\n"),
            "logging.level: `info,[` is not a log filter",
        );
    }

    #[test]
    fn missing_tls_files_are_reported_on_their_field() {
        assert_problem(
            &with(
                "listen: \"127.0.0.1:8080\"",
                "listen: \"127.0.0.1:8080\", tls: { cert: /no/cert.pem, key: /no/key.pem }",
            ),
            "server.tls.cert: cannot read certificates from /no/cert.pem",
        );
        assert_problem(
            &with("api_key_env: NIM_KEY", "api_key_env: NIM_KEY, ca_file: /no/ca.pem"),
            "backends[1].ca_file: cannot read certificates",
        );
    }

    #[test]
    fn durations_parse_humanely() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("").is_err());
    }
}
