//! A prompt's prefix as prefix affinity sees it, and what each backend was sent of such
//! prefixes.
//!
//! - `PromptBlocks`: the prompt (the raw bytes of `messages`, `prompt` or `input` as sent) hashed
//!   in fixed-size blocks from its start, chained, so block k's hash stands for the whole prefix
//!   up to it: two prompts share block k's hash only if they share their first k+1 blocks. The
//!   chain is seeded by the model name and uses xxh3 (a specified hash, with fixed seeds), so
//!   every replica and every release computes the same hashes.
//! - `PrefixTable`: per backend, the block hashes recently sent there, least recently used out
//!   first, bounded.

use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::{Mutex, MutexGuard};

use lru::LruCache;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// A prompt's chained block hashes, and the anchor that places it when nothing matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptBlocks {
    blocks: Vec<u64>,
    /// The first block's hash (or, for a prompt shorter than a block, the whole prompt's).
    anchor: u64,
}

impl PromptBlocks {
    /// Hashes `body[prompt]` (the span of its `messages`, `prompt` or `input` value; `None` when
    /// the request has none) for `model`, in blocks of `block_bytes`, its first `max_bytes` at
    /// most.
    pub fn new(block_bytes: usize, max_bytes: usize, model: &str, body: &[u8], prompt: Option<Range<usize>>) -> Self {
        let prompt = prompt.and_then(|span| body.get(span)).unwrap_or_default();
        let prompt = &prompt[..prompt.len().min(max_bytes)];
        let block_bytes = block_bytes.max(1);
        let mut hash = xxh3_64(model.as_bytes());
        let mut blocks = Vec::with_capacity(prompt.len() / block_bytes);
        for block in prompt.chunks_exact(block_bytes) {
            // The block hashed alone, then chained to the prefix's hash: xxh3 seeded on a long
            // input would derive a new secret per call, costing more than the hash itself.
            hash = xxh3_64_with_seed(&xxh3_64(block).to_le_bytes(), hash);
            blocks.push(hash);
        }
        let anchor = blocks.first().copied().unwrap_or_else(|| xxh3_64_with_seed(prompt, hash));
        Self { blocks, anchor }
    }

    /// What places the prompt when no backend holds any of it.
    pub fn anchor(&self) -> u64 {
        self.anchor
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// The block hashes recently sent to one backend: a bounded least-recently-used set, made on
/// first use (a backend no affinity route uses holds none).
#[derive(Debug, Default)]
pub struct PrefixTable {
    blocks: Mutex<Option<LruCache<u64, (), PassThrough>>>,
}

impl PrefixTable {
    /// Poison-safe: a panic elsewhere while holding it leaves at worst a table that is a
    /// little off, which only costs cache hits.
    fn lock(&self) -> MutexGuard<'_, Option<LruCache<u64, (), PassThrough>>> {
        self.blocks.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many of `prompt`'s blocks, from its start, were sent here and not yet forgotten. A
    /// prompt's blocks are remembered together and its early blocks forgotten last, so the
    /// blocks held form a prefix of the chain: found by binary search.
    pub fn matched(&self, prompt: &PromptBlocks) -> usize {
        let guard = self.lock();
        let Some(table) = guard.as_ref() else { return 0 };
        let (mut held, mut beyond) = (0, prompt.blocks.len());
        while held < beyond {
            let middle = held + (beyond - held).div_ceil(2);
            if table.contains(&prompt.blocks[middle - 1]) {
                held = middle;
            } else {
                beyond = middle - 1;
            }
        }
        held
    }

    /// Remembers `prompt` as sent here: its blocks become the most recently used, the first
    /// one most of all, so a table that is full forgets prompts' tails before their heads (as
    /// engines evict their KV blocks).
    pub fn record(&self, prompt: &PromptBlocks, capacity: usize) {
        if prompt.blocks.is_empty() {
            return;
        }
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        let mut guard = self.lock();
        let table = guard.get_or_insert_with(|| LruCache::unbounded_with_hasher(PassThrough::default()));
        if table.cap() != capacity {
            table.resize(capacity);
        }
        for &block in prompt.blocks.iter().rev() {
            table.put(block, ());
        }
    }

    /// Forgets everything (the backend failed).
    pub fn clear(&self) {
        *self.lock() = None;
    }

    /// Block hashes held now.
    pub fn len(&self) -> usize {
        self.lock().as_ref().map_or(0, LruCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The table's keys are already xxh3 hashes: used as they are instead of hashed again.
#[derive(Debug, Clone, Copy, Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys reach here; anything else still hashes, if poorly.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

impl BuildHasher for PassThrough {
    type Hasher = Self;

    fn build_hasher(&self) -> Self {
        Self(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blocks(prompt: &str) -> PromptBlocks {
        PromptBlocks::new(8, 1024, "m", prompt.as_bytes(), Some(0..prompt.len()))
    }

    #[test]
    fn blocks_are_chained_so_a_shared_hash_means_a_shared_prefix() {
        let a = blocks("system-prompt-AAAAAAAA-user-one");
        let b = blocks("system-prompt-AAAAAAAA-user-two");
        let c = blocks("other-prompt--AAAAAAAA-user-one");
        assert_eq!(a.len(), 3, "whole blocks of 8 bytes only");
        assert_eq!(a.blocks[..3], b.blocks[..3], "the same first 24 bytes");
        assert!(a.blocks.iter().all(|h| !c.blocks.contains(h)), "a different start shares nothing after it");
        let other_model = PromptBlocks::new(8, 1024, "n", b"system-prompt-AAAAAAAA", Some(0..22));
        assert_ne!(other_model.blocks[0], a.blocks[0], "seeded by the model");
        let long = "x".repeat(5000);
        assert_eq!(blocks(&long).len(), 1024 / 8, "hashed up to max_prefix_bytes");
        assert!(PromptBlocks::new(8, 1024, "m", b"{}", None).is_empty());
    }

    #[test]
    fn the_table_matches_the_longest_prefix_held_and_forgets_tails_first() {
        let table = PrefixTable::default();
        let conversation = blocks(&"turn one.".repeat(8));
        assert_eq!(table.matched(&conversation), 0);
        table.record(&conversation, 1000);
        assert_eq!(table.matched(&conversation), conversation.len());
        let longer = blocks(&format!("{}and two, longer", "turn one.".repeat(8)));
        assert_eq!(table.matched(&longer), conversation.len(), "the earlier turn's blocks");
        // Room for 5 blocks: recording a 9-block prompt keeps its first 5.
        let small = PrefixTable::default();
        small.record(&conversation, 5);
        assert_eq!((small.len(), small.matched(&conversation)), (5, 5));
        table.clear();
        assert_eq!((table.len(), table.matched(&conversation)), (0, 0));
    }

    #[test]
    fn the_table_never_holds_more_than_its_bound() {
        let table = PrefixTable::default();
        for i in 0..2000 {
            table.record(&blocks(&format!("prompt number {i:>6} with some words after it")), 300);
            assert!(table.len() <= 300);
        }
        assert_eq!(table.len(), 300);
        // A smaller bound after a reload applies at the next record.
        table.record(&blocks("one more prompt, long enough for blocks"), 100);
        assert_eq!(table.len(), 100);
    }
}
