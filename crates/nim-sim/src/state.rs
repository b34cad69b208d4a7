//! What every connection of one sim shares: its options, the failure settings that tests change
//! at run time, the counters behind `SimStats`, the GPU, the chunk gate and recorded requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::gpu::Gpu;
use crate::kv::KvCache;
use crate::{Failures, RecordedRequest, SimOptions, SimStats};

/// The `created` stamp of every answer: fixed, so answers are reproducible.
pub const CREATED: u64 = 1_700_000_000;

#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    pub errors_injected: AtomicU64,
    pub chunks_sent: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generation_tokens: AtomicU64,
    /// Sequence number of inference requests, for deterministic error injection and ids.
    pub sequence: AtomicU64,
}

pub struct Shared {
    pub options: SimOptions,
    failures: Mutex<Failures>,
    pub counters: Counters,
    pub gpu: Arc<Gpu>,
    pub gate: tokio::sync::Semaphore,
    recorded: Mutex<Vec<RecordedRequest>>,
    /// The `/v1/models` answer, built once.
    pub models_json: Bytes,
}

impl Shared {
    pub fn new(options: SimOptions) -> Self {
        let data: Vec<serde_json::Value> = options
            .models
            .iter()
            .map(|id| {
                let owned_by = id.split_once('/').map_or("system", |(org, _)| org);
                serde_json::json!({
                    "id": id, "object": "model", "created": CREATED, "owned_by": owned_by,
                    "root": id, "parent": null, "max_model_len": 4096
                })
            })
            .collect();
        let models_json = Bytes::from(serde_json::json!({ "object": "list", "data": data }).to_string());
        Self {
            failures: Mutex::new(options.failures.clone()),
            gpu: Arc::new(Gpu::new(
                options.max_concurrency,
                options.max_queue,
                (options.kv_cache_tokens > 0).then(|| KvCache::new(options.kv_cache_tokens, options.kv_block_tokens)),
            )),
            options,
            counters: Counters::default(),
            gate: tokio::sync::Semaphore::new(0),
            recorded: Mutex::new(Vec::new()),
            models_json,
        }
    }

    pub fn failures(&self) -> Failures {
        self.failures.lock().map(|f| f.clone()).unwrap_or_default()
    }

    pub fn set_failures(&self, failures: Failures) {
        if let Ok(mut current) = self.failures.lock() {
            *current = failures;
        }
    }

    pub fn record(&self, request: RecordedRequest) {
        if let Ok(mut recorded) = self.recorded.lock() {
            recorded.push(request);
        }
    }

    pub fn recorded(&self) -> Vec<RecordedRequest> {
        self.recorded.lock().map(|r| r.clone()).unwrap_or_default()
    }

    pub fn stats(&self) -> SimStats {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SimStats {
            requests: load(&c.requests),
            completed: load(&c.completed),
            cancelled: load(&c.cancelled),
            errors_injected: load(&c.errors_injected),
            running: self.gpu.running(),
            waiting: self.gpu.waiting(),
            chunks_sent: load(&c.chunks_sent),
            prompt_tokens: load(&c.prompt_tokens),
            generation_tokens: load(&c.generation_tokens),
            prefix_cache_queries: self.gpu.kv().map_or(0, KvCache::queried_tokens),
            prefix_cache_hits: self.gpu.kv().map_or(0, KvCache::hit_tokens),
            kv_cached_tokens: self.gpu.kv().map_or(0, KvCache::cached_tokens),
        }
    }
}

/// Marks one inference request as cancelled if it is dropped before `finish`: how the sim
/// knows its client left (the connection closed and hyper dropped the request or its body).
pub struct RequestGuard {
    shared: Arc<Shared>,
    finished: bool,
}

impl RequestGuard {
    pub fn new(shared: &Arc<Shared>) -> Self {
        Self { shared: Arc::clone(shared), finished: false }
    }

    /// The answer went out in full.
    pub fn complete(mut self) {
        self.finished = true;
        self.shared.counters.completed.fetch_add(1, Ordering::Relaxed);
    }

    /// The request ended with an error answer: neither completed nor cancelled.
    pub fn refuse(mut self) {
        self.finished = true;
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.shared.counters.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Whether inference request number `n` fails at `rate` (see `Failures::error_rate`).
pub fn injects_error(n: u64, rate: f64) -> bool {
    if rate <= 0.0 {
        return false;
    }
    ((n + 1) as f64 * rate).floor() > (n as f64 * rate).floor()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failing(rate: f64, of: u64) -> Vec<u64> {
        (0..of).filter(|&n| injects_error(n, rate)).collect()
    }

    #[test]
    fn error_injection_is_deterministic_and_exact() {
        assert_eq!(failing(0.0, 10), Vec::<u64>::new());
        assert_eq!(failing(1.0, 4), [0, 1, 2, 3]);
        assert_eq!(failing(0.5, 4), [1, 3]);
        assert_eq!(failing(0.25, 8), [3, 7]);
        assert_eq!(failing(0.1, 100).len(), 10);
    }
}
