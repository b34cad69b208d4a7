//! The simulated GPU: `max_concurrency` slots and a queue of requests waiting for one, bounded
//! by `max_queue`. Counts of both are what NIM reports as `num_requests_running` and
//! `num_requests_waiting`, and what a load-aware balancer reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub struct Gpu {
    slots: Option<Arc<Semaphore>>,
    max_queue: Option<usize>,
    running: AtomicU64,
    waiting: AtomicU64,
}

/// The queue is full: the request is refused at once.
pub struct QueueFull;

impl Gpu {
    pub fn new(max_concurrency: usize, max_queue: Option<usize>) -> Self {
        Self {
            slots: (max_concurrency > 0).then(|| Arc::new(Semaphore::new(max_concurrency))),
            max_queue,
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
        }
    }

    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Relaxed)
    }

    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The fraction of slots in use, as NIM's `gpu_cache_usage_perc` (a stand-in for KV-cache
    /// pressure). Unlimited GPUs fill up by 1/256 per running request.
    pub fn usage(&self) -> f64 {
        let running = self.running() as f64;
        let capacity = self.slots.as_ref().map_or(256.0, |_| self.capacity() as f64);
        (running / capacity).min(1.0)
    }

    fn capacity(&self) -> usize {
        self.slots.as_ref().map_or(0, |s| s.available_permits() + self.running() as usize)
    }

    /// Waits for a slot; refused when the queue is full.
    pub async fn acquire(self: &Arc<Self>) -> Result<Slot, QueueFull> {
        let permit = match &self.slots {
            None => None,
            Some(slots) => match Arc::clone(slots).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    if self.max_queue.is_some_and(|max| self.waiting() as usize >= max) {
                        return Err(QueueFull);
                    }
                    let _waiting = Waiting::new(self);
                    Some(Arc::clone(slots).acquire_owned().await.map_err(|_| QueueFull)?)
                }
            },
        };
        self.running.fetch_add(1, Ordering::Relaxed);
        Ok(Slot { gpu: Arc::clone(self), _permit: permit })
    }
}

/// Counts a request in the queue for as long as it waits (even if it is dropped waiting).
struct Waiting<'a>(&'a Gpu);

impl<'a> Waiting<'a> {
    fn new(gpu: &'a Gpu) -> Self {
        gpu.waiting.fetch_add(1, Ordering::Relaxed);
        Self(gpu)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A GPU slot, held while a request generates.
pub struct Slot {
    gpu: Arc<Gpu>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gpu.running.fetch_sub(1, Ordering::Relaxed);
    }
}
