//! The simulated GPU's KV cache of prompt-prefix blocks: why a request whose prompt starts like an
//! earlier one reaches its first token sooner, and what a prefix-aware balancer tries to exploit.
//!
//! A prompt is cut into blocks of `block_tokens` tokens (4 bytes a token, the sim's estimate
//! everywhere), each block's hash chained with the one before, so block k stands for the whole
//! prefix up to it. A request's cached prefix is its longest run of leading blocks found here. Only
//! whole blocks are cached, as in vLLM, so a prompt's ragged tail is always prefilled.
//!
//! Blocks are held by the running requests that use them, and held blocks are what the engines
//! report as KV-cache usage. Blocks nobody holds stay cached but evictable, least recently used
//! first. A request's blocks turn evictable tail first (vLLM frees them in reverse for the same
//! reason), so a prefix is lost from its end and never from its start, which would orphan the rest.
//! Separate from `gpu` so the cache's bookkeeping is tested alone, without slots or time.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, DefaultHasher, Hasher};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Prompt bytes per token: the quarter that `prompt_tokens` counts everywhere in the sim.
pub const BYTES_PER_TOKEN: usize = 4;

/// A KV cache holding up to `capacity_tokens / block_tokens` whole blocks.
pub struct KvCache {
    block_tokens: u64,
    capacity_blocks: usize,
    blocks: Mutex<Blocks>,
    /// Prompt tokens looked up, as vLLM's `prefix_cache_queries` counts them.
    queried_tokens: AtomicU64,
    /// Prompt tokens found cached, as vLLM's `prefix_cache_hits` counts them.
    hit_tokens: AtomicU64,
}

/// What one request found in the cache and holds there while it runs.
pub struct Admission {
    /// Leading prompt tokens whose blocks were cached, so need no prefill.
    pub hit_tokens: u64,
    /// The blocks held, to hand back to `release` when the request stops running.
    pub held: Vec<u64>,
}

impl KvCache {
    /// A cache of `capacity_tokens` tokens in blocks of `block_tokens` (at least 1), rounded down
    /// to whole blocks.
    pub fn new(capacity_tokens: u64, block_tokens: u32) -> Self {
        let block_tokens = u64::from(block_tokens.max(1));
        Self {
            block_tokens,
            capacity_blocks: usize::try_from(capacity_tokens / block_tokens).unwrap_or(usize::MAX),
            blocks: Mutex::new(Blocks::default()),
            queried_tokens: AtomicU64::new(0),
            hit_tokens: AtomicU64::new(0),
        }
    }

    /// The chained hash of each whole block of `prompt`: block k's hash covers bytes 0..end of k.
    pub fn block_hashes(&self, prompt: &[u8]) -> Vec<u64> {
        let block_bytes = self.block_tokens as usize * BYTES_PER_TOKEN;
        let mut previous = 0;
        prompt
            .chunks_exact(block_bytes)
            .map(|block| {
                // SipHash with fixed keys: the same prompt hashes the same in every sim and run.
                let mut hasher = DefaultHasher::new();
                hasher.write_u64(previous);
                hasher.write(block);
                previous = hasher.finish();
                previous
            })
            .collect()
    }

    /// Looks up `prompt`'s cached prefix and holds every block of it, cached or not, evicting
    /// idle blocks for the new ones; blocks that find no room (every block held) are not cached.
    /// Counts `prompt_tokens` queried and the hit, at most `prompt_tokens`.
    pub fn admit(&self, prompt: &[u8], prompt_tokens: u64) -> Admission {
        let hashes = self.block_hashes(prompt);
        let (hit_blocks, held) = match self.blocks.lock() {
            Ok(mut blocks) => blocks.admit(hashes, self.capacity_blocks),
            Err(_) => (0, Vec::new()),
        };
        let hit_tokens = (hit_blocks as u64 * self.block_tokens).min(prompt_tokens);
        self.queried_tokens.fetch_add(prompt_tokens, Ordering::Relaxed);
        self.hit_tokens.fetch_add(hit_tokens, Ordering::Relaxed);
        Admission { hit_tokens, held }
    }

    /// Lets go of blocks `admit` held; those no other request holds become evictable.
    pub fn release(&self, held: &[u64]) {
        if let Ok(mut blocks) = self.blocks.lock() {
            blocks.release(held);
        }
    }

    /// Held blocks over capacity, 0..=1: vLLM's `kv_cache_usage_perc`, SGLang's `token_usage`
    /// (both count cached blocks that nobody holds as free).
    pub fn usage(&self) -> f64 {
        if self.capacity_blocks == 0 {
            return 0.0;
        }
        let held = self.blocks.lock().map_or(0, |b| b.entries.len() - b.idle.len());
        held as f64 / self.capacity_blocks as f64
    }

    /// Tokens of the blocks cached now, held or not.
    pub fn cached_tokens(&self) -> u64 {
        self.blocks.lock().map_or(0, |b| b.entries.len() as u64 * self.block_tokens)
    }

    /// Prompt tokens looked up since the start.
    pub fn queried_tokens(&self) -> u64 {
        self.queried_tokens.load(Ordering::Relaxed)
    }

    /// Prompt tokens found cached since the start.
    pub fn hit_tokens(&self) -> u64 {
        self.hit_tokens.load(Ordering::Relaxed)
    }
}

/// The cache's contents, behind its lock.
#[derive(Default)]
struct Blocks {
    /// Every cached block by hash.
    entries: HashMap<u64, Entry, BuildHasherDefault<PassThrough>>,
    /// Blocks no running request holds, by last use: the first is the next evicted.
    idle: BTreeMap<u64, u64>,
    /// The last stamp given, increasing, so `idle`'s order is the order of release.
    clock: u64,
}

/// Uses a block hash as its own map hash: it is a SipHash output already, and hashing it again
/// was a sixth of the cost of a request with the cache model on.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }

    /// Not reached for `u64` keys; folds the bytes in case that changes.
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }
}

struct Entry {
    /// Running requests holding the block; 0 means it is in `idle`.
    holders: u32,
    /// Its key in `idle` while nobody holds it.
    stamp: u64,
}

impl Blocks {
    /// Holds each of `hashes` in order, inserting the missing ones while there is room; returns
    /// how many leading blocks were cached already and the blocks now held (a prefix of `hashes`).
    fn admit(&mut self, mut hashes: Vec<u64>, capacity: usize) -> (usize, Vec<u64>) {
        let mut hit = 0;
        let mut leading = true;
        let mut held = 0;
        for &hash in &hashes {
            match self.entries.get_mut(&hash) {
                Some(entry) => {
                    hit += usize::from(leading);
                    if entry.holders == 0 {
                        self.idle.remove(&entry.stamp);
                    }
                    entry.holders += 1;
                }
                None => {
                    // A later block may still be cached (a prefix shared up to a point), but it
                    // no longer extends the hit: its prefix must be computed anyway.
                    leading = false;
                    if self.entries.len() >= capacity && !self.evict_one() {
                        break;
                    }
                    self.entries.insert(hash, Entry { holders: 1, stamp: 0 });
                }
            }
            held += 1;
        }
        hashes.truncate(held);
        (hit, hashes)
    }

    /// Drops the least recently used idle block; false when every block is held.
    fn evict_one(&mut self) -> bool {
        match self.idle.pop_first() {
            Some((_, hash)) => {
                self.entries.remove(&hash);
                true
            }
            None => false,
        }
    }

    /// Lets go of `held`, tail first, so the tail is evicted before the prefix it extends.
    fn release(&mut self, held: &[u64]) {
        for hash in held.iter().rev() {
            if let Some(entry) = self.entries.get_mut(hash) {
                entry.holders = entry.holders.saturating_sub(1);
                if entry.holders == 0 {
                    self.clock += 1;
                    entry.stamp = self.clock;
                    self.idle.insert(self.clock, *hash);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache of `blocks` blocks of 1 token (4 bytes).
    fn cache(blocks: u64) -> KvCache {
        KvCache::new(blocks, 1)
    }

    /// Admits `prompt` and lets it go at once, as a request that ran; returns its hit tokens.
    fn run(kv: &KvCache, prompt: &str) -> u64 {
        let admission = kv.admit(prompt.as_bytes(), prompt.len() as u64 / 4);
        kv.release(&admission.held);
        admission.hit_tokens
    }

    #[test]
    fn block_hashes_chain_so_a_block_stands_for_its_whole_prefix() {
        let kv = KvCache::new(64, 2);
        let a = kv.block_hashes(b"aaaaaaaabbbbbbbbcccccccc-tail");
        assert_eq!(a.len(), 3, "whole blocks of 8 bytes only");
        let b = kv.block_hashes(b"aaaaaaaabbbbbbbbdddddddd");
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        let shifted = kv.block_hashes(b"xxxxxxxxbbbbbbbbcccccccc");
        assert!(shifted.iter().all(|h| !a.contains(h)), "the same block after another prefix differs");
        assert!(kv.block_hashes(b"short").is_empty());
    }

    #[test]
    fn a_repeated_prompt_hits_its_whole_blocks_and_a_shared_start_hits_that_far() {
        let kv = cache(100);
        assert_eq!(run(&kv, "aaaabbbbccccdddd"), 0);
        assert_eq!(run(&kv, "aaaabbbbccccdddd"), 4);
        assert_eq!(run(&kv, "aaaabbbbxxxxyyyy"), 2);
        assert_eq!((kv.queried_tokens(), kv.hit_tokens()), (12, 6));
        assert_eq!(kv.cached_tokens(), 6);
    }

    #[test]
    fn the_least_recently_used_prompt_is_evicted_tail_first() {
        let kv = cache(4);
        run(&kv, "aaaabbbb");
        run(&kv, "ccccdddd");
        assert_eq!(run(&kv, "aaaabbbb"), 2, "touched: now the most recent");
        run(&kv, "eeee");
        assert_eq!(kv.cached_tokens(), 4);
        // "ccccdddd" was least recent, and its tail went first: its head is still there.
        assert_eq!(run(&kv, "cccc"), 1);
        assert_eq!(run(&kv, "aaaabbbb"), 2);
        run(&kv, "ffffgggghhhh");
        assert_eq!(run(&kv, "aaaa"), 1, "three blocks evicted its tail, not its head");
        run(&kv, "iiiijjjjkkkkllll");
        assert_eq!(run(&kv, "aaaabbbb"), 0, "evicted whole by a prompt as large as the cache");
    }

    #[test]
    fn held_blocks_are_never_evicted_and_count_as_usage() {
        let kv = cache(4);
        let running = kv.admit(b"aaaabbbbcccc", 3);
        assert_eq!(kv.usage(), 0.75);
        let other = kv.admit(b"xxxxyyyy", 2);
        assert_eq!(other.held.len(), 1, "room for one block only, the rest is not cached");
        assert_eq!(kv.usage(), 1.0);
        kv.release(&other.held);
        kv.release(&running.held);
        assert_eq!(kv.usage(), 0.0);
        assert_eq!(run(&kv, "aaaabbbbcccc"), 3, "cached, though nobody holds it");
        let shared = [kv.admit(b"aaaa", 1), kv.admit(b"aaaa", 1)];
        assert_eq!(kv.usage(), 0.25, "a block two requests hold counts once");
        shared.iter().for_each(|a| kv.release(&a.held));
    }

    #[test]
    fn a_cache_smaller_than_a_block_holds_nothing() {
        let kv = KvCache::new(15, 16);
        let admission = kv.admit(&[b'a'; 256], 64);
        assert!(admission.held.is_empty());
        assert_eq!((kv.usage(), kv.cached_tokens(), kv.queried_tokens()), (0.0, 0, 64));
    }
}
