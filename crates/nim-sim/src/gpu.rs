//! The simulated GPU: `max_concurrency` slots and a queue of requests waiting for one, bounded
//! by `max_queue`. Counts of both are what NIM reports as `num_requests_running` and
//! `num_requests_waiting`, and what a load-aware balancer reads. Separate from the HTTP side so
//! the queue's arithmetic stays in one place.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Slots of an unlimited GPU that `usage` treats as full: a stand-in so `gpu_cache_usage_perc`
/// still rises with load.
const UNLIMITED_USAGE_SCALE: f64 = 256.0;

/// GPU slots and the queue in front of them.
pub struct Gpu {
    /// `None` when unlimited.
    slots: Option<Arc<Semaphore>>,
    capacity: usize,
    max_queue: Option<usize>,
    running: AtomicU64,
    waiting: AtomicU64,
}

/// The queue is full: the request is refused at once.
#[derive(Debug)]
pub struct QueueFull;

impl Gpu {
    /// A GPU with `max_concurrency` slots (0 = unlimited) and room for `max_queue` waiters
    /// (`None` = unbounded).
    pub fn new(max_concurrency: usize, max_queue: Option<usize>) -> Self {
        Self {
            slots: (max_concurrency > 0).then(|| Arc::new(Semaphore::new(max_concurrency))),
            capacity: max_concurrency,
            max_queue,
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
        }
    }

    /// Slots held now.
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Relaxed)
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// The fraction of slots in use, 0..=1, as NIM's `gpu_cache_usage_perc` (a stand-in for
    /// KV-cache pressure). An unlimited GPU fills up by 1/256 per running request.
    pub fn usage(&self) -> f64 {
        let scale = if self.capacity == 0 { UNLIMITED_USAGE_SCALE } else { self.capacity as f64 };
        (self.running() as f64 / scale).min(1.0)
    }

    /// Takes a slot, waiting in the queue when none is free; refused at once when the queue is
    /// full. Dropping the future while it waits leaves the queue.
    pub async fn acquire(self: &Arc<Self>) -> Result<Slot, QueueFull> {
        let permit = match &self.slots {
            None => None,
            Some(slots) => match Arc::clone(slots).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    let _waiting = Waiting::enter(self)?;
                    // The semaphore is never closed, so this only fails if that changes.
                    Some(Arc::clone(slots).acquire_owned().await.map_err(|_| QueueFull)?)
                }
            },
        };
        self.running.fetch_add(1, Ordering::Relaxed);
        Ok(Slot { gpu: Arc::clone(self), _permit: permit })
    }
}

/// A place in the queue, held while a request waits (even if it is dropped waiting).
struct Waiting<'a>(&'a Gpu);

impl<'a> Waiting<'a> {
    /// Joins the queue unless it is full. The increment comes first, so concurrent arrivals
    /// cannot overfill it.
    fn enter(gpu: &'a Gpu) -> Result<Self, QueueFull> {
        let before = gpu.waiting.fetch_add(1, Ordering::Relaxed);
        let place = Self(gpu);
        match gpu.max_queue {
            Some(max) if before >= max as u64 => Err(QueueFull),
            _ => Ok(place),
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A GPU slot, held while a request generates; dropping it frees the slot.
pub struct Slot {
    gpu: Arc<Gpu>,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gpu.running.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_refuses_and_a_freed_slot_goes_to_the_waiter() {
        let gpu = Arc::new(Gpu::new(1, Some(1)));
        let first = gpu.acquire().await.unwrap();
        assert_eq!((gpu.running(), gpu.usage()), (1, 1.0));
        let waiter = tokio::spawn({
            let gpu = Arc::clone(&gpu);
            async move { gpu.acquire().await.map(|_slot| ()) }
        });
        while gpu.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(gpu.acquire().await.is_err(), "the queue of one is full");
        assert_eq!(gpu.waiting(), 1, "a refusal leaves no trace in the queue");
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!((gpu.running(), gpu.waiting()), (0, 0));
    }

    #[tokio::test]
    async fn an_unlimited_gpu_never_queues() {
        let gpu = Arc::new(Gpu::new(0, Some(0)));
        let slots = [gpu.acquire().await.unwrap(), gpu.acquire().await.unwrap()];
        assert_eq!((gpu.running(), gpu.waiting()), (2, 0));
        assert!(gpu.usage() > 0.0 && gpu.usage() < 0.1);
        drop(slots);
        assert_eq!(gpu.running(), 0);
    }
}
