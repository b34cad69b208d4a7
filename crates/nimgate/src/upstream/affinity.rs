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

use std::ops::Range;
use std::sync::Arc;

use tokio::time::Instant;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use super::backend::Backend;
use super::balance::{MAX_POOL_MEMBERS, Tried};
use super::prefix::PromptBlocks;

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

impl AffinitySettings {
    /// `body`'s prompt (at `prompt`) in blocks as these settings cut it, for `model`.
    pub fn blocks(&self, model: &str, body: &[u8], prompt: Option<Range<usize>>) -> PromptBlocks {
        PromptBlocks::new(self.block_bytes, self.max_prefix_bytes, model, body, prompt)
    }
}

impl Default for AffinitySettings {
    fn default() -> Self {
        Self::DEFAULT
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
        let tie_break = rendezvous(prompt.anchor(), b);
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
        SETTINGS.blocks("m", prompt.as_bytes(), Some(0..prompt.len()))
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
