//! Prefix affinity (`strategy: prefix_affinity`): a request goes where its prompt's prefix most
//! likely still sits in the KV cache, estimated here without asking the backend.
//!
//! - The prompt (the raw bytes of `messages`, `prompt` or `input` as sent) is hashed in blocks
//!   of `block_bytes` from its start, chained, so block k's hash stands for the whole prefix up
//!   to it: two prompts share block k's hash only if they share their first k+1 blocks. The
//!   chain is seeded by the model name and uses xxh3 with fixed seeds, so every replica and
//!   every release computes the same hashes.
//! - Each backend keeps the block hashes recently sent to it (`PrefixTable`, least recently used
//!   out first, at most `blocks_per_backend`). A failing backend's table is emptied: whatever it
//!   held is lost to a restart as likely as not.
//! - `choose`: among backends under the load bound (at most `load_bound` × the mean load, per
//!   weight), the longest matched prefix less one block per request in flight or waiting there
//!   wins. With no match anywhere, rendezvous hashing on the prompt's first block picks, so
//!   replicas that never talk to each other send a new prefix to the same backend.

use std::hash::{BuildHasher, Hasher};
use std::num::NonZeroUsize;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;
use tokio::time::Instant;
use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

use super::backend::Backend;
use super::balance::{MAX_POOL_MEMBERS, Tried};

/// `balancing.prefix_affinity`, validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AffinitySettings {
    /// Prompt bytes per hashed block (about a quarter as many tokens).
    pub block_bytes: usize,
    /// Block hashes remembered per backend: the memory bound (about 64 bytes each).
    pub blocks_per_backend: usize,
    /// Prompt bytes hashed at most: longer prompts are told apart by their first this many.
    pub max_prefix_bytes: usize,
    /// A backend above this many times the pool's mean load (per weight) is not chosen for
    /// its cache: one hot prefix spreads instead of melting one GPU.
    pub load_bound: f64,
}

impl AffinitySettings {
    pub const DEFAULT: Self =
        Self { block_bytes: 256, blocks_per_backend: 16_384, max_prefix_bytes: 64 * 1024, load_bound: 1.25 };
}

impl Default for AffinitySettings {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A prompt's chained block hashes, and the anchor that places it when nothing matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromptBlocks {
    blocks: Vec<u64>,
    /// The first block's hash (or, for a prompt shorter than a block, the whole prompt's).
    anchor: u64,
}

impl PromptBlocks {
    /// Hashes `body[prompt]` (the span of its `messages`, `prompt` or `input` value; `None` when
    /// the request has none) for `model`.
    pub fn new(settings: &AffinitySettings, model: &str, body: &[u8], prompt: Option<Range<usize>>) -> Self {
        let prompt = prompt.and_then(|span| body.get(span)).unwrap_or_default();
        let prompt = &prompt[..prompt.len().min(settings.max_prefix_bytes)];
        let block_bytes = settings.block_bytes.max(1);
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

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// Why the backend chosen was chosen, for `affinity_decisions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// It holds (we estimate) part of the prompt.
    Hit,
    /// No backend holds any of it: placed by the prompt's first block.
    Miss,
    /// A backend holding more of it was over the load bound, or full.
    Overflow,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Overflow => "overflow",
        }
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

/// The backend of `members` (in rotation, with room, not in `tried`) to send `prompt` to, and
/// why. `any_full` is set when a member was skipped only for being full.
pub fn choose(
    members: &[Arc<Backend>],
    tried: Tried,
    prompt: &PromptBlocks,
    settings: &AffinitySettings,
    now: &mut Option<Instant>,
    any_full: &mut bool,
) -> Option<(usize, Decision)> {
    // One pass for the pool's load (backends in rotation, full ones included: they are part
    // of what the mean is of) and for who may be chosen at all.
    let mut eligible = Tried::default();
    let (mut total_load, mut total_weight) = (0u64, 0u64);
    for (i, b) in members.iter().enumerate().take(MAX_POOL_MEMBERS) {
        if tried.contains(i) || b.state.is_out(now) {
            continue;
        }
        total_load = total_load.saturating_add(load(b));
        total_weight = total_weight.saturating_add(u64::from(b.weight.max(1)));
        if b.has_room() {
            eligible.add(i);
        } else {
            *any_full = true;
        }
    }
    // The bound of consistent hashing with bounded loads: with this request counted, a
    // backend may hold at most ceil(load_bound × its weight's share of the whole).
    let whole = total_load.saturating_add(1) as f64 * settings.load_bound.max(1.0);
    let under_bound = |b: &Backend| {
        let share = whole * f64::from(b.weight.max(1)) / total_weight.max(1) as f64;
        (load(b).saturating_add(1) as f64) <= share.ceil()
    };
    // The longest match among every backend in rotation, for telling an overflow apart.
    let mut longest_anywhere = 0;
    let mut best: Option<(usize, i128, u64, usize)> = None;
    let mut least_loaded: Option<(usize, u64)> = None;
    for (i, b) in members.iter().enumerate().take(MAX_POOL_MEMBERS) {
        if tried.contains(i) || (!eligible.contains(i) && b.state.is_out(now)) {
            continue;
        }
        let matched = b.state.prefixes.matched(prompt);
        longest_anywhere = longest_anywhere.max(matched);
        if !eligible.contains(i) {
            continue;
        }
        let score = b.load_score();
        if least_loaded.is_none_or(|(_, least)| score < least) {
            least_loaded = Some((i, score));
        }
        if !under_bound(b) {
            continue;
        }
        // One block of match is worth one request in flight (scores in thousandths).
        let value = matched as i128 * 1000 - i128::from(score);
        let tie_break = rendezvous(prompt.anchor, b);
        let better = match best {
            None => true,
            Some((_, best_value, best_tie, best_matched)) => {
                if matched == 0 && best_matched == 0 {
                    // Nothing held anywhere yet: placed by the prompt alone, not by load, so
                    // that every replica places it alike.
                    tie_break > best_tie
                } else {
                    value > best_value || (value == best_value && tie_break > best_tie)
                }
            }
        };
        if better {
            best = Some((i, value, tie_break, matched));
        }
    }
    let (chosen, matched) = match (best, least_loaded) {
        (Some((i, _, _, matched)), _) => (i, matched),
        // Every backend with room is over the bound (only when weights are very uneven or
        // the others are full): the least loaded one takes it.
        (None, Some((i, _))) => (i, members[i].state.prefixes.matched(prompt)),
        (None, None) => return None,
    };
    let decision = if longest_anywhere > matched {
        Decision::Overflow
    } else if matched > 0 {
        Decision::Hit
    } else {
        Decision::Miss
    };
    Some((chosen, decision))
}

/// Requests in flight from here plus those NIM reports waiting.
fn load(backend: &Backend) -> u64 {
    u64::from(backend.state.inflight()).saturating_add(backend.state.nim_waiting())
}

/// The backend's weight for a prompt anchored at `anchor` in rendezvous hashing: the same in
/// every replica.
fn rendezvous(anchor: u64, backend: &Backend) -> u64 {
    xxh3_64_with_seed(backend.name.as_str().as_bytes(), anchor)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTINGS: AffinitySettings =
        AffinitySettings { block_bytes: 8, blocks_per_backend: 1000, max_prefix_bytes: 1024, load_bound: 1.25 };

    fn blocks(prompt: &str) -> PromptBlocks {
        PromptBlocks::new(&SETTINGS, "m", prompt.as_bytes(), Some(0..prompt.len()))
    }

    fn pool(n: usize) -> Vec<Arc<Backend>> {
        (0..n).map(|i| Arc::new(Backend::for_tests(&format!("gpu{i}"), "http://127.0.0.1:1"))).collect()
    }

    fn pick(members: &[Arc<Backend>], prompt: &PromptBlocks) -> (usize, Decision) {
        choose(members, Tried::default(), prompt, &SETTINGS, &mut None, &mut false).unwrap()
    }

    /// Picks and records as the pool does, holding a slot (returned) on the chosen backend.
    fn send(members: &[Arc<Backend>], prompt: &PromptBlocks) -> (usize, Decision) {
        let (i, decision) = pick(members, prompt);
        assert!(members[i].state.try_take_slot(None));
        members[i].state.prefixes.record(prompt, SETTINGS.blocks_per_backend);
        (i, decision)
    }

    #[test]
    fn blocks_are_chained_so_a_shared_hash_means_a_shared_prefix() {
        let a = blocks("system-prompt-AAAAAAAA-user-one");
        let b = blocks("system-prompt-AAAAAAAA-user-two");
        let c = blocks("other-prompt--AAAAAAAA-user-one");
        assert_eq!(a.len(), 3, "whole blocks of 8 bytes only");
        assert_eq!(a.blocks[..3], b.blocks[..3], "the same first 24 bytes");
        assert!(a.blocks.iter().all(|h| !c.blocks.contains(h)), "a different start shares nothing after it");
        let other_model = PromptBlocks::new(&SETTINGS, "n", b"system-prompt-AAAAAAAA", Some(0..22));
        assert_ne!(other_model.blocks[0], a.blocks[0], "seeded by the model");
        let long = "x".repeat(5000);
        assert_eq!(blocks(&long).len(), 1024 / 8, "hashed up to max_prefix_bytes");
        assert!(PromptBlocks::new(&SETTINGS, "m", b"{}", None).is_empty());
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

    #[test]
    fn a_conversation_sticks_to_the_backend_that_has_its_prefix() {
        let members = pool(4);
        let first = blocks(&"You are a helpful assistant. ".repeat(20));
        let (home, decision) = send(&members, &first);
        assert_eq!(decision, Decision::Miss);
        members[home].state.release_slot();
        for turn in 1..5 {
            let next = blocks(&format!("{}{}", "You are a helpful assistant. ".repeat(20), "more words ".repeat(turn)));
            let (chosen, decision) = send(&members, &next);
            assert_eq!((chosen, decision), (home, Decision::Hit), "turn {turn}");
            // Turns go one after another: the previous one's answer is over.
            members[chosen].state.release_slot();
        }
    }

    #[test]
    fn a_new_prefix_goes_where_every_replica_sends_it() {
        // Two replicas: separate backends (and tables) with the same names, other loads.
        let (one, two) = (pool(4), pool(4));
        two[0].state.try_take_slot(None);
        for i in 0..50 {
            let prompt = blocks(&format!("a new system prompt number {i} that fills blocks"));
            assert_eq!(pick(&one, &prompt).0, pick(&two, &prompt).0, "prompt {i}");
        }
    }

    #[test]
    fn one_hot_prefix_under_load_spreads_within_the_bound() {
        let members = pool(4);
        let hot = blocks(&"the one system prompt everyone uses ".repeat(10));
        let mut decisions = Vec::new();
        for _ in 0..40 {
            decisions.push(send(&members, &hot).1);
        }
        let loads: Vec<u32> = members.iter().map(|b| b.state.inflight()).collect();
        assert_eq!(loads.iter().sum::<u32>(), 40);
        // Mean 10: none above ceil(1.25 × 10) = 13.
        assert!(loads.iter().all(|&l| (7..=13).contains(&l)), "{loads:?}");
        assert!(decisions.contains(&Decision::Overflow), "the bound sent some elsewhere");
        // Once the others hold it too, it is a hit everywhere: the least loaded one wins.
        let (chosen, decision) = pick(&members, &hot);
        assert_eq!(decision, Decision::Hit);
        assert_eq!(members[chosen].state.inflight(), *loads.iter().min().unwrap());
    }

    #[test]
    fn a_longer_match_is_worth_a_little_load() {
        let members = pool(2);
        let prompt = blocks(&"shared prefix of many blocks ".repeat(10));
        members[0].state.prefixes.record(&prompt, 1000);
        // Only gpu0 holds it: with a request in flight there it still beats an idle gpu1.
        members[0].state.try_take_slot(None);
        assert_eq!(pick(&members, &prompt), (0, Decision::Hit));
    }

    #[test]
    fn a_backend_that_fails_loses_its_prefixes() {
        use crate::upstream::health::{FailureKind, Outcome};
        let members = pool(1);
        let (gpu, metrics) = (&members[0], crate::metrics::Metrics::new());
        let prompt = blocks(&"held until the backend fails ".repeat(4));
        gpu.state.prefixes.record(&prompt, 1000);
        let failed = || Outcome::Failed { kind: FailureKind::Connect, cause: "refused" };
        for _ in 1..gpu.ejection.after {
            gpu.observe(failed(), &metrics);
        }
        assert_eq!(gpu.state.prefixes.matched(&prompt), prompt.len(), "not ejected yet");
        gpu.observe(failed(), &metrics);
        assert_eq!(gpu.state.prefixes.matched(&prompt), 0, "ejected: a restart loses the cache");
        gpu.state.prefixes.record(&prompt, 1000);
        gpu.state.set_healthy(false);
        assert!(gpu.state.prefixes.is_empty(), "failing its health check");
    }

    #[test]
    fn tried_out_and_full_backends_are_not_chosen() {
        let mut full = Backend::for_tests("full", "http://127.0.0.1:1");
        full.max_concurrency = Some(1);
        let members = vec![Arc::new(full), Arc::new(Backend::for_tests("free", "http://127.0.0.1:1"))];
        let prompt = blocks(&"cached on the full one ".repeat(4));
        members[0].state.prefixes.record(&prompt, 1000);
        assert!(members[0].state.try_take_slot(Some(1)));
        let mut any_full = false;
        let chosen = choose(&members, Tried::default(), &prompt, &SETTINGS, &mut None, &mut any_full);
        assert_eq!(chosen, Some((1, Decision::Overflow)));
        assert!(any_full);
        let mut tried = Tried::default();
        tried.add(1);
        assert_eq!(choose(&members, tried, &prompt, &SETTINGS, &mut None, &mut false), None);
    }
}
