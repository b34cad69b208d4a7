//! `Gateway`: the snapshot in force, swapped whole by a reload, and the parts that outlive
//! every snapshot (limiter state, the model catalog's cache, metrics, the draining flag).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;

use crate::auth::KeyName;
use crate::config::Snapshot;
use crate::limits::Limiter;
use crate::metrics::Metrics;
use crate::models::Catalog;
use crate::request::BodyBudget;
use crate::upstream::{discovery, probe};

/// The running gateway's shared state: the snapshot in force and what outlives it.
#[derive(Debug)]
pub struct Gateway {
    config: ArcSwap<Snapshot>,
    draining: AtomicBool,
    catalog: Catalog,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    /// Sized at start (`server.max_buffered_body_bytes`; a change needs a restart).
    body_budget: BodyBudget,
}

impl Gateway {
    /// The gateway serving `snapshot`. Starts its backends' health and load probes when
    /// called on a tokio runtime.
    pub fn new(snapshot: Snapshot) -> Arc<Self> {
        probe::start(&snapshot.backends);
        let body_budget = BodyBudget::new(snapshot.server.max_buffered_body_bytes);
        let metrics = Arc::new(Metrics::new());
        discovery::start(&snapshot.groups, &metrics.discovery_errors);
        let limiter = Arc::new(Limiter::new(&snapshot.rate_limits, metrics.rate_limit_store_errors.clone()));
        Arc::new(Self {
            config: ArcSwap::from_pointee(snapshot),
            draining: AtomicBool::new(false),
            catalog: Catalog::default(),
            limiter,
            metrics,
            body_budget,
        })
    }

    /// The snapshot in force: one atomic load. A request keeps it to its end.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.config.load_full()
    }

    /// Puts a new, validated snapshot in force for every request that starts after this.
    /// Limiter state of keys still configured is kept (and reset only where a key's limits
    /// changed, or the limit store did); that of removed keys is dropped.
    pub fn replace(&self, snapshot: Snapshot) {
        self.limiter.configure(&snapshot.rate_limits);
        let names: HashSet<&KeyName> = snapshot.keys.names().collect();
        self.limiter.retain(&|name| names.contains(name));
        drop(names);
        probe::start(&snapshot.backends);
        discovery::start(&snapshot.groups, &self.metrics.discovery_errors);
        self.config.store(Arc::new(snapshot));
    }

    /// Whether the gateway is shutting down (readiness then answers 503).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub(crate) fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub(crate) fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The memory request bodies being read may take, over all connections.
    pub fn body_budget(&self) -> &BodyBudget {
        &self.body_budget
    }

    /// The key limiter; its state outlives snapshots.
    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }
}
