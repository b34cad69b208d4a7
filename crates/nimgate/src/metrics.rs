//! The Prometheus registry behind the admin listener's `/metrics`, with the contract's names
//! (all prefixed `nimgate_`) and a few more operators need. Label values come only from the
//! configuration (route models, backend names, key names) or from a fixed vocabulary (status
//! codes, error kinds), never from client input, so the series count is bounded by the config.
//!
//! Recording takes no shared lock: each thread keeps the series it has used (`Series`), so the
//! family's own lock is taken once per series and thread, not per request. Gauges of backend
//! state (in flight, healthy) are read from the backends when scraped, costing the request
//! path nothing.

use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// Label value for "none" (no route, no backend, no key yet).
pub const NONE: &str = "-";

/// Time to first byte: from 10 ms (a cached prefix on an idle GPU) to a minute (a long
/// prompt on a busy one).
const TTFB_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Whole requests: up to ten minutes of generation.
const DURATION_BUCKETS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0];
/// Gaps between stream chunks (inter-token latency): 1 ms to 10 s.
const GAP_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];
/// Waiting for a backend with room: up to the longest sensible queue timeout.
const QUEUE_BUCKETS: &[f64] = &[0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// A backend's state gauges, read from it when scraped (costing the request path nothing).
#[derive(Debug, Clone, Copy)]
pub struct BackendGauges<'a> {
    pub name: &'a str,
    pub in_flight: u32,
    pub in_rotation: bool,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Tells this registry's series apart in the per-thread memo.
    id: usize,
    pub config_reloads: IntCounterVec,
    requests: IntCounterVec,
    duration: HistogramVec,
    ttfb: HistogramVec,
    chunk_gap: HistogramVec,
    queue_wait: HistogramVec,
    key_queue_wait: HistogramVec,
    upstream_errors: IntCounterVec,
    retries: IntCounterVec,
    rate_limited: IntCounterVec,
    tokens: IntCounterVec,
    affinity_decisions: IntCounterVec,
    pub connections: IntGauge,
    /// Client connections the gateway closed on a deadline, by reason.
    pub connections_expired: IntCounterVec,
    /// Times the listener paused accepting because `max_connections` were open.
    pub connection_limit_reached: IntCounter,
    /// Requests that waited for, or were refused, room in the request body budget.
    pub body_budget_waits: IntCounterVec,
    /// Admissions the limit store could not decide, by what was done (allowed, denied).
    pub rate_limit_store_errors: IntCounterVec,
    /// Failed resolutions of backend groups (`discovery: { dns: true }`), by group.
    pub discovery_errors: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let family = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric family");
    registry.register(Box::new(family.clone())).expect("registered once");
    family
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let family =
        HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets.to_vec()), labels).expect("a valid histogram");
    registry.register(Box::new(family.clone())).expect("registered once");
    family
}

impl Metrics {
    pub fn new() -> Self {
        static IDS: AtomicUsize = AtomicUsize::new(0);
        let registry = Registry::new_custom(Some("nimgate".into()), None).expect("a valid metric prefix");
        let r = &registry;
        let config_reloads =
            counter(r, "config_reloads_total", "Configuration reloads, by result (ok, error).", &["result"]);
        // Both series exist from the start, so that a rate() over them never starts empty.
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        let connections = IntGauge::new("active_connections", "Client connections open now.").expect("valid");
        r.register(Box::new(connections.clone())).expect("registered once");
        let connections_expired = counter(
            r,
            "connections_expired_total",
            "Client connections closed by a deadline: first_bytes, header_read, idle, write_stalled.",
            &["reason"],
        );
        for reason in ["first_bytes", "header_read", "idle", "write_stalled"] {
            connections_expired.with_label_values(&[reason]);
        }
        let connection_limit_reached = IntCounter::new(
            "connection_limit_reached_total",
            "Times the listener stopped accepting because server.max_connections were open.",
        )
        .expect("valid");
        r.register(Box::new(connection_limit_reached.clone())).expect("registered once");
        let body_budget_waits = counter(
            r,
            "body_budget_waits_total",
            "Requests whose body had to wait for room in server.max_buffered_body_bytes, by result (admitted, refused).",
            &["result"],
        );
        for result in ["admitted", "refused"] {
            body_budget_waits.with_label_values(&[result]);
        }
        let rate_limit_store_errors = counter(
            r,
            "rate_limit_store_errors_total",
            "Admissions the shared limit store (Redis) did not answer in time, by what on_store_error did (allowed, denied).",
            &["action"],
        );
        for action in ["allowed", "denied"] {
            rate_limit_store_errors.with_label_values(&[action]);
        }
        let discovery_errors = counter(
            r,
            "discovery_errors_total",
            "Failed DNS resolutions of a backend group, which then keeps the members it found last.",
            &["backend"],
        );
        let build =
            IntGaugeVec::new(Opts::new("build_info", "The running build (always 1)."), &["version"]).expect("valid");
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        r.register(Box::new(build)).expect("registered once");
        Self {
            id: IDS.fetch_add(1, Ordering::Relaxed),
            config_reloads,
            requests: counter(
                r,
                "requests_total",
                "Requests answered, by route model, backend, key and HTTP status.",
                &["model", "backend", "key", "code"],
            ),
            duration: histogram(
                r,
                "request_duration_seconds",
                "From the request's arrival to the answer's last byte.",
                &["model", "backend"],
                DURATION_BUCKETS,
            ),
            ttfb: histogram(
                r,
                "time_to_first_byte_seconds",
                "From the request's arrival to the answer's first body byte (a stream's first token).",
                &["model", "backend"],
                TTFB_BUCKETS,
            ),
            chunk_gap: histogram(
                r,
                "stream_chunk_gap_seconds",
                "Gaps between the chunks of streamed answers (inter-token latency).",
                &["model", "backend"],
                GAP_BUCKETS,
            ),
            queue_wait: histogram(
                r,
                "queue_wait_seconds",
                "Time requests waited for a backend with room.",
                &["model"],
                QUEUE_BUCKETS,
            ),
            key_queue_wait: histogram(
                r,
                "key_queue_wait_seconds",
                "Time a key's requests waited for a backend with room (served by weighted fair queueing).",
                &["key"],
                QUEUE_BUCKETS,
            ),
            upstream_errors: counter(
                r,
                "upstream_errors_total",
                "Failed upstream attempts and broken answers, by backend and kind.",
                &["backend", "kind"],
            ),
            retries: counter(r, "retries_total", "Attempts made again on another backend.", &["model", "backend"]),
            rate_limited: counter(
                r,
                "rate_limited_total",
                "Requests refused by a key's limit (requests, tokens or concurrency).",
                &["key", "limit"],
            ),
            tokens: counter(
                r,
                "tokens_total",
                "Tokens by route model, key and kind (prompt, completion): reported by the backend or estimated.",
                &["model", "key", "kind"],
            ),
            affinity_decisions: counter(
                r,
                "affinity_decisions_total",
                "Backends chosen by prefix affinity, by route model and result: hit (it holds part of the \
                 prompt), miss (none does), overflow (one holding more was over the load bound or full).",
                &["model", "result"],
            ),
            connections,
            connections_expired,
            connection_limit_reached,
            body_budget_waits,
            rate_limit_store_errors,
            discovery_errors,
            registry,
        }
    }

    pub fn request(&self, model: &str, backend: &str, key: &str, code: u16) {
        let mut text = itoa::Buffer::new();
        let code = text.format(code);
        with_series(self.id, 0, &self.requests, &[model, backend, key, code], IntCounter::inc);
    }

    /// The time-to-first-byte and duration histograms of a route model and backend, in one
    /// lookup: every upstream answer observes both.
    pub fn timings(&self, model: &str, backend: &str) -> (Histogram, Histogram) {
        let labels = [model, backend];
        let make = || (self.ttfb.with_label_values(&labels), self.duration.with_label_values(&labels));
        memo(self.id, 8, &labels, make, Clone::clone)
    }

    pub fn chunk_gap(&self, model: &str, backend: &str) -> Histogram {
        series(self.id, 3, &self.chunk_gap, &[model, backend])
    }

    pub fn queue_wait(&self, model: &str) -> Histogram {
        series(self.id, 4, &self.queue_wait, &[model])
    }

    pub fn key_queue_wait(&self, key: &str) -> Histogram {
        series(self.id, 7, &self.key_queue_wait, &[key])
    }

    /// The prompt and completion token counters of a route model and key.
    pub fn token_counters(&self, model: &str, key: &str) -> (IntCounter, IntCounter) {
        let make = || {
            let series = |kind| self.tokens.with_label_values(&[model, key, kind]);
            (series("prompt"), series("completion"))
        };
        memo(self.id, 5, &[model, key], make, Clone::clone)
    }

    /// A choice of prefix affinity (`result`: hit, miss, overflow).
    pub fn affinity_decision(&self, model: &str, result: &str) {
        with_series(self.id, 6, &self.affinity_decisions, &[model, result], IntCounter::inc);
    }

    // Error paths: rare, so the family's own lookup is fine.

    pub fn upstream_error(&self, backend: &str, kind: &str) {
        self.upstream_errors.with_label_values(&[backend, kind]).inc();
    }

    pub fn retry(&self, model: &str, backend: &str) {
        self.retries.with_label_values(&[model, backend]).inc();
    }

    pub fn rate_limited(&self, key: &str, limit: &str) {
        self.rate_limited.with_label_values(&[key, limit]).inc();
    }

    /// The exposition in Prometheus' text format, with the backends' gauges as read now.
    /// The exposition: the registry's families, and the gauges read at scrape time from the
    /// snapshot: per backend its in-flight count and rotation, per route (`model`, its pattern)
    /// the requests waiting in its queue for a backend with room.
    pub fn render<'a>(
        &self,
        backends: impl IntoIterator<Item = BackendGauges<'a>>,
        queues: impl IntoIterator<Item = (&'a str, usize)>,
    ) -> String {
        let mut families = self.registry.gather();
        let queued = IntGaugeVec::new(
            Opts::new("nimgate_queue_length", "Requests of a route waiting now for a backend with room."),
            &["model"],
        )
        .expect("valid");
        let mut routes = 0;
        for (model, waiting) in queues {
            queued.with_label_values(&[model]).set(i64::try_from(waiting).unwrap_or(i64::MAX));
            routes += 1;
        }
        // The text encoder refuses a family without series, and the families after it with it.
        if routes > 0 {
            families.extend(queued.collect());
        }
        let inflight = IntGaugeVec::new(
            Opts::new("nimgate_inflight_requests", "Requests in flight to a backend now, answers streaming included."),
            &["backend"],
        )
        .expect("valid");
        let healthy = IntGaugeVec::new(
            Opts::new(
                "nimgate_backend_healthy",
                "1 when the backend is in rotation (not ejected, passing its health check).",
            ),
            &["backend"],
        )
        .expect("valid");
        let mut listed = 0;
        for backend in backends {
            inflight.with_label_values(&[backend.name]).set(i64::from(backend.in_flight));
            healthy.with_label_values(&[backend.name]).set(i64::from(backend.in_rotation));
            listed += 1;
        }
        // None when every backend is a group whose members DNS has not answered yet.
        if listed > 0 {
            families.extend(inflight.collect());
            families.extend(healthy.collect());
        }
        families.sort_by(|a, b| a.name().cmp(b.name()));
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&families, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// A word-at-a-time multiplicative hash (the Fx hash's scheme): label values are short,
/// come from the config, and are hashed on every request, so speed matters more than
/// resistance to crafted input.
#[derive(Default)]
struct WordHash(u64);

impl WordHash {
    const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(Self::SEED);
    }

    fn add_str(&mut self, text: &str) {
        let mut chunks = text.as_bytes().chunks_exact(8);
        for chunk in &mut chunks {
            self.add(u64::from_le_bytes(chunk.try_into().unwrap_or_default()));
        }
        let mut last = [0u8; 8];
        let rest = chunks.remainder();
        last[..rest.len()].copy_from_slice(rest);
        // The length keeps "ab" + "c" apart from "a" + "bc".
        self.add(u64::from_le_bytes(last) ^ ((text.len() as u64) << 56));
    }
}

/// The key is a hash already: use it as is.
#[derive(Default)]
struct Identity(u64);

impl Hasher for Identity {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, _: &[u8]) {
        unreachable!("only u64 keys")
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Series already resolved on this thread: by hash, then by family and label values.
type Table<T> = HashMap<u64, Vec<(usize, Box<[Box<str>]>, T)>, BuildHasherDefault<Identity>>;

/// A series type with its own per-thread table.
trait Memoized: Clone + 'static {
    fn with_table<R>(f: impl FnOnce(&mut Table<Self>) -> R) -> R;
}

/// `Memoized` for a series type, with its thread-local table.
macro_rules! memoized {
    ($($table:ident: $type:ty),* $(,)?) => {
        thread_local! {
            $(static $table: RefCell<Table<$type>> = RefCell::new(Table::default());)*
        }
        $(impl Memoized for $type {
            fn with_table<R>(f: impl FnOnce(&mut Table<Self>) -> R) -> R {
                $table.with(|table| f(&mut table.borrow_mut()))
            }
        })*
    };
}

memoized! {
    COUNTERS: IntCounter,
    HISTOGRAMS: Histogram,
    // Series a request always uses together, found with one lookup.
    COUNTER_PAIRS: (IntCounter, IntCounter),
    HISTOGRAM_PAIRS: (Histogram, Histogram),
}

/// The series of `family` with `labels`, from this thread's memo (the family's lock is taken
/// only the first time this thread uses the series).
fn series<T, B>(registry: usize, family: usize, vec: &prometheus::core::MetricVec<B>, labels: &[&str]) -> T
where
    T: Memoized,
    B: prometheus::core::MetricVecBuilder<M = T>,
{
    with_series(registry, family, vec, labels, T::clone)
}

/// `f` applied to the series of `family` with `labels` (no clone of the series' handle).
fn with_series<T, B, R>(
    registry: usize,
    family: usize,
    vec: &prometheus::core::MetricVec<B>,
    labels: &[&str],
    f: impl FnOnce(&T) -> R,
) -> R
where
    T: Memoized,
    B: prometheus::core::MetricVecBuilder<M = T>,
{
    memo(registry, family, labels, || vec.with_label_values(labels), f)
}

/// `f` applied to what `make` made for `family` and `labels`, made once per thread.
fn memo<T: Memoized, R>(
    registry: usize,
    family: usize,
    labels: &[&str],
    make: impl FnOnce() -> T,
    f: impl FnOnce(&T) -> R,
) -> R {
    let family = registry << 8 | family;
    let mut hash = WordHash(family as u64);
    for label in labels {
        hash.add_str(label);
    }
    T::with_table(|table| {
        let bucket = table.entry(hash.0).or_default();
        let same = |(f, values, _): &&(usize, Box<[Box<str>]>, T)| {
            *f == family && values.len() == labels.len() && values.iter().zip(labels).all(|(v, l)| **v == **l)
        };
        if let Some((_, _, series)) = bucket.iter().find(same) {
            return f(series);
        }
        let series = make();
        let out = f(&series);
        bucket.push((family, labels.iter().map(|l| Box::from(*l)).collect(), series));
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu() -> [BackendGauges<'static>; 1] {
        [BackendGauges { name: "gpu", in_flight: 0, in_rotation: true }]
    }

    #[test]
    fn families_are_exposed_with_their_labels() {
        let metrics = Metrics::new();
        metrics.config_reloads.with_label_values(&["ok"]).inc();
        metrics.request("m", "gpu", "team-a", 200);
        metrics.request("m", "gpu", "team-a", 200);
        metrics.timings("m", "gpu").0.observe(0.02);
        let (ttfb, duration) = metrics.timings("m", "gpu");
        ttfb.observe(0.5);
        duration.observe(1.0);
        let (prompt, completion) = metrics.token_counters("m", "team-a");
        prompt.inc_by(10);
        completion.inc_by(5);
        let text = metrics.render(gpu(), [("m", 2)]);
        for line in [
            "nimgate_config_reloads_total{result=\"ok\"} 1",
            "nimgate_config_reloads_total{result=\"error\"} 0",
            "nimgate_requests_total{backend=\"gpu\",code=\"200\",key=\"team-a\",model=\"m\"} 2",
            "nimgate_time_to_first_byte_seconds_bucket{backend=\"gpu\",model=\"m\",le=\"0.025\"} 1",
            "nimgate_time_to_first_byte_seconds_count{backend=\"gpu\",model=\"m\"} 2",
            "nimgate_request_duration_seconds_count{backend=\"gpu\",model=\"m\"} 1",
            "nimgate_tokens_total{key=\"team-a\",kind=\"completion\",model=\"m\"} 5",
            "nimgate_inflight_requests{backend=\"gpu\"} 0",
            "nimgate_backend_healthy{backend=\"gpu\"} 1",
            "nimgate_queue_length{model=\"m\"} 2",
            "nimgate_build_info{version=",
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn no_backend_yet_still_renders_every_other_family() {
        let metrics = Metrics::new();
        metrics.request("m", "gpu", "k", 200);
        let text = metrics.render([], []);
        assert!(text.contains("nimgate_requests_total{"), "{text}");
        assert!(
            text.contains("nimgate_tokens_total") || text.contains("nimgate_rate_limit_store_errors_total"),
            "{text}"
        );
        assert!(!text.contains("nimgate_inflight_requests"), "{text}");
    }

    #[test]
    fn two_registries_do_not_share_memoized_series() {
        let (a, b) = (Metrics::new(), Metrics::new());
        a.request("m", "gpu", "k", 200);
        b.request("m", "gpu", "k", 200);
        b.request("m", "gpu", "k", 200);
        assert!(a.render(gpu(), []).contains("code=\"200\",key=\"k\",model=\"m\"} 1"));
        assert!(b.render(gpu(), []).contains("code=\"200\",key=\"k\",model=\"m\"} 2"));
    }
}
