//! The simulated GPU: `max_concurrency` slots, a queue of requests waiting for one, bounded by
//! `max_queue`, and optionally a KV cache of prompt-prefix blocks (`kv`). Counts of the first two
//! are what NIM reports as `num_requests_running` and `num_requests_waiting`, and what a
//! load-aware balancer reads. A slot holds its request's cache blocks while it runs, so freeing
//! the slot frees both. Separate from the HTTP side so the queue's arithmetic stays in one place.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::kv::KvCache;

/// Slots of an unlimited GPU that `usage` treats as full: a stand-in so `gpu_cache_usage_perc`
/// still rises with load.
const UNLIMITED_USAGE_SCALE: f64 = 256.0;

/// GPU slots, the queue in front of them and the KV cache behind them.
pub struct Gpu {
    /// `None` when unlimited.
    slots: Option<Arc<Semaphore>>,
    capacity: usize,
    max_queue: Option<usize>,
    running: AtomicU64,
    waiting: AtomicU64,
    /// `None` without the cache model: nothing is hashed and every prompt token is prefilled.
    kv: Option<KvCache>,
}

/// The queue is full: the request is refused at once.
#[derive(Debug)]
pub struct QueueFull;

impl Gpu {
    /// A GPU with `max_concurrency` slots (0 = unlimited), room for `max_queue` waiters
    /// (`None` = unbounded) and, when given, a KV cache.
    pub fn new(max_concurrency: usize, max_queue: Option<usize>, kv: Option<KvCache>) -> Self {
        Self {
            slots: (max_concurrency > 0).then(|| Arc::new(Semaphore::new(max_concurrency))),
            capacity: max_concurrency,
            max_queue,
            running: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            kv,
        }
    }

    /// The KV cache, when the cache model is on.
    pub fn kv(&self) -> Option<&KvCache> {
        self.kv.as_ref()
    }

    /// Slots held now.
    pub fn running(&self) -> u64 {
        self.running.load(Ordering::Relaxed)
    }

    /// Requests waiting for a slot now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// KV-cache usage, 0..=1, as NIM's `gpu_cache_usage_perc`: with the cache model, the blocks
    /// running requests hold; without it, the fraction of slots in use as a stand-in for KV-cache
    /// pressure, an unlimited GPU filling up by 1/256 per running request.
    pub fn usage(&self) -> f64 {
        if let Some(kv) = &self.kv {
            return kv.usage();
        }
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
        Ok(Slot { gpu: Arc::clone(self), _permit: permit, held: Vec::new() })
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

/// A GPU slot, held while a request generates; dropping it frees the slot and lets go of the
/// request's KV-cache blocks.
pub struct Slot {
    gpu: Arc<Gpu>,
    _permit: Option<OwnedSemaphorePermit>,
    /// The cache blocks this request holds (none without the cache model).
    held: Vec<u64>,
}

impl Slot {
    /// Starts prefilling the prompt (`prompt_tokens` tokens): returns the tokens the KV cache did
    /// not hold, which are what prefill time is charged for. The whole prompt's blocks go into the
    /// cache now, as vLLM registers a block when it schedules its computation, so a request
    /// arriving during this prefill already finds them. Without the cache model every token is
    /// uncached, and `prompt` is never called: the prompt is neither extracted nor hashed.
    pub fn prefill<'p>(&mut self, prompt: impl FnOnce() -> &'p [u8], prompt_tokens: u64) -> u64 {
        let Some(kv) = &self.gpu.kv else {
            return prompt_tokens;
        };
        let admission = kv.admit(prompt(), prompt_tokens);
        // One prefill per slot; a second would otherwise leak the first one's hold.
        kv.release(&std::mem::replace(&mut self.held, admission.held));
        prompt_tokens - admission.hit_tokens
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gpu.running.fetch_sub(1, Ordering::Relaxed);
        if let Some(kv) = &self.gpu.kv {
            kv.release(&self.held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_refuses_and_a_freed_slot_goes_to_the_waiter() {
        let gpu = Arc::new(Gpu::new(1, Some(1), None));
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
        let gpu = Arc::new(Gpu::new(0, Some(0), None));
        let slots = [gpu.acquire().await.unwrap(), gpu.acquire().await.unwrap()];
        assert_eq!((gpu.running(), gpu.waiting()), (2, 0));
        assert!(gpu.usage() > 0.0 && gpu.usage() < 0.1);
        drop(slots);
        assert_eq!(gpu.running(), 0);
    }

    #[tokio::test]
    async fn a_slot_holds_its_prompt_blocks_until_it_is_freed() {
        let gpu = Arc::new(Gpu::new(0, None, Some(KvCache::new(64, 1))));
        let prompt = [b'a'; 64];
        let mut first = gpu.acquire().await.unwrap();
        assert_eq!(first.prefill(|| &prompt, 20), 20, "a cold cache prefills everything");
        assert_eq!(gpu.usage(), 0.25);
        let mut second = gpu.acquire().await.unwrap();
        assert_eq!(second.prefill(|| &prompt, 20), 4, "16 whole blocks cached, the rest prefilled");
        assert_eq!(gpu.usage(), 0.25, "shared blocks count once");
        drop((first, second));
        assert_eq!(gpu.usage(), 0.0);
        assert_eq!(gpu.kv().unwrap().cached_tokens(), 16);
    }

    #[tokio::test]
    async fn without_the_cache_model_every_token_is_prefilled() {
        let gpu = Arc::new(Gpu::new(0, None, None));
        let mut slot = gpu.acquire().await.unwrap();
        assert_eq!(slot.prefill(|| unreachable!("no cache model, no prompt"), 20), 20);
        assert!(gpu.kv().is_none());
    }
}
