//! nimgate: one OpenAI-compatible endpoint in front of many NVIDIA NIM backends.
//!
//! Module map (one concern each):
//! - `config`: the file as written (`raw`), loading with env overrides (`load`), validation
//!   into an immutable `Snapshot` (`validate`, `snapshot`).
//! - `handler`: the request path, top to bottom.
//! - `access`: the access log, one line per request at its end.
//! - `auth`: bearer key → `Key` by sha256 digest; ACL globs.
//! - `routing`: model string → `Route` (exact, then globs by longest literal prefix).
//! - `glob`: model-name patterns shared by routes and ACLs.
//! - `limits`: request and token limits per key (admit, reserve, settle) and their store.
//! - `pool`: backends, their run-time state (in flight, ejection, health, NIM load), the
//!   balancer, the wait queue, the retry budget and the background probes.
//! - `proxy`: request body read and peek, upstream request building and sending, backend
//!   clients and the keep-alive connections of plain-http backends.
//! - `streaming`: the response body passed through frame by frame.
//! - `models`: `GET /v1/models`.
//! - `server`: listeners, TLS, connection tasks, graceful shutdown.
//! - `admin`: the admin listener (`/metrics`, `/admin/backends`, `/admin/config`,
//!   `/admin/reload`).
//! - `reload`: hot reload from a file watch, SIGHUP or the admin API.
//! - `metrics`: the Prometheus registry.
//! - `tls`: PEM certificate and key loading.
//! - `demo`: `nimgate demo`, the gateway with two in-process simulated NIMs.
//! - `error`: `GatewayError` and its one rendering as an OpenAI error body.
//! - `api`: the forwarded endpoints and their paths.

pub mod access;
pub mod admin;
pub mod api;
pub mod auth;
pub mod config;
pub mod demo;
pub mod error;
pub mod glob;
pub mod handler;
pub mod limits;
pub mod metrics;
pub mod models;
pub mod pool;
pub mod proxy;
pub mod reload;
pub mod routing;
pub mod server;
pub mod streaming;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

pub use config::Snapshot;
pub use error::GatewayError;

/// The running gateway's shared state: the snapshot in force and what outlives it.
#[derive(Debug)]
pub struct Gateway {
    config: ArcSwap<Snapshot>,
    draining: AtomicBool,
    catalog: models::Catalog,
    limiter: Arc<limits::Limiter>,
    metrics: Arc<metrics::Metrics>,
}

impl Gateway {
    /// The gateway serving `snapshot`. Starts its backends' health and load probes when
    /// called on a tokio runtime.
    pub fn new(snapshot: Snapshot) -> Arc<Self> {
        pool::probe::start(&snapshot.backends);
        Arc::new(Self {
            config: ArcSwap::from_pointee(snapshot),
            draining: AtomicBool::new(false),
            catalog: models::Catalog::default(),
            limiter: Arc::new(limits::Limiter::default()),
            metrics: Arc::new(metrics::Metrics::new()),
        })
    }

    /// The snapshot in force: one atomic load. A request keeps it to its end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.config.load_full()
    }

    /// Puts a new, validated snapshot in force for every request that starts after this.
    /// Limiter state of keys still configured is kept (and reset only where a key's limits
    /// changed); that of removed keys is dropped.
    pub fn replace(&self, snapshot: Snapshot) {
        let names: std::collections::HashSet<&auth::KeyName> = snapshot.keys.names().collect();
        self.limiter.retain(&|name| names.contains(name));
        drop(names);
        pool::probe::start(&snapshot.backends);
        self.config.store(Arc::new(snapshot));
    }

    /// Whether the gateway is shutting down (readiness then answers 503).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(crate) fn catalog(&self) -> &models::Catalog {
        &self.catalog
    }

    pub fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.metrics
    }

    /// The key limiter; its state outlives snapshots.
    pub fn limiter(&self) -> &Arc<limits::Limiter> {
        &self.limiter
    }
}
