//! The balancer's choice among a pool's backends: the power of two choices by weight and load.
//! Two backends are drawn at random in proportion to their `weight` and the less loaded one wins
//! (load = requests in flight from here plus those NIM reports waiting, per unit of weight). Two
//! random draws instead of the global minimum keep replicas that see the same figures from all
//! piling onto one backend. Pure: the random source is a parameter, so tests choose the draws.

use std::cell::Cell;
use std::sync::Arc;

use tokio::time::Instant;

use super::backend::Backend;

/// Backends per route (pool and fallback together) that a request can tell apart as tried.
pub const MAX_POOL_MEMBERS: usize = 64;

/// Members of a pool a request has already tried (bit i: primary then fallback order).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tried(u64);

impl Tried {
    /// Marks pool member `member` as tried.
    pub fn add(&mut self, member: usize) {
        if member < MAX_POOL_MEMBERS {
            self.0 |= 1 << member;
        }
    }

    pub fn contains(self, member: usize) -> bool {
        member < MAX_POOL_MEMBERS && self.0 & (1 << member) != 0
    }
}

/// The power of two choices over `members` in rotation, with room and not in `tried`: two
/// draws of `random` weighted by `weight`, the lower load score wins. `any_full` is set when a
/// member was skipped only for being full. Allocation-free: one pass decides who may be drawn
/// (a bit each; pools have at most `MAX_POOL_MEMBERS`), so a backend that gains or loses room
/// meanwhile cannot change the weights drawn from.
pub fn two_choices(
    members: &[Arc<Backend>],
    tried: Tried,
    now: &mut Option<Instant>,
    any_full: &mut bool,
    random: &mut impl FnMut() -> u64,
) -> Option<usize> {
    let mut eligible = Tried::default();
    let mut total = 0u64;
    let mut count = 0;
    let mut last = 0;
    for (i, b) in members.iter().enumerate().take(MAX_POOL_MEMBERS) {
        if tried.contains(i) || b.state.is_out(now) {
            continue;
        }
        if !b.has_room() {
            *any_full = true;
            continue;
        }
        eligible.add(i);
        total = total.saturating_add(u64::from(b.weight));
        count += 1;
        last = i;
    }
    match count {
        0 => return None,
        1 => return Some(last),
        _ => {}
    }
    let mut draw = |exclude: Option<usize>, total: u64| -> usize {
        let mut point = random() % total.max(1);
        for (i, b) in members.iter().enumerate() {
            if Some(i) == exclude || !eligible.contains(i) {
                continue;
            }
            let w = u64::from(b.weight);
            if point < w {
                return i;
            }
            point -= w;
        }
        last
    };
    let a = draw(None, total);
    let rest = total.saturating_sub(u64::from(members[a].weight));
    if rest == 0 {
        return Some(a);
    }
    let b = draw(Some(a), rest);
    Some(if members[b].load_score() < members[a].load_score() { b } else { a })
}

/// A fast thread-local xorshift generator: the balancer and the probes' jitter need spread,
/// not secrecy.
pub fn random() -> u64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(&STATE as *const _ as usize);
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        x
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(name: &str, weight: u32) -> Arc<Backend> {
        let mut b = Backend::for_tests(name, "http://127.0.0.1:1");
        b.weight = weight;
        Arc::new(b)
    }

    /// Draws from a fixed list, round and round.
    fn draws(values: &[u64]) -> impl FnMut() -> u64 + '_ {
        let mut i = 0;
        move || {
            i += 1;
            values[(i - 1) % values.len()]
        }
    }

    #[test]
    fn draws_land_by_weight_and_the_less_loaded_of_the_two_wins() {
        let members = [backend("a", 1), backend("b", 3), backend("c", 1)];
        let choose = |values: &[u64]| {
            two_choices(&members, Tried::default(), &mut None, &mut false, &mut draws(values)).unwrap()
        };
        // Weights 1, 3, 1 cover points 0, 1..=3, 4 of 5. First draw at 0 is `a`; the second,
        // over the 4 left, at 3 lands on `c`. Both idle: the first drawn stays.
        assert_eq!(choose(&[0, 3]), 0);
        // First draw at 2 is `b`; second at 1 (of `a`'s 1 and `c`'s 1) is `c`.
        assert_eq!(choose(&[2, 1]), 1);
        // With `a` busy, the pair (a, c) goes to `c`.
        members[0].state.try_take_slot(None);
        assert_eq!(choose(&[0, 3]), 2);
    }

    #[test]
    fn a_backend_gaining_room_during_the_draw_changes_nothing() {
        let mut full = Backend::for_tests("full", "http://127.0.0.1:1");
        (full.weight, full.max_concurrency) = (5, Some(1));
        let members = [Arc::new(full), backend("b", 1), backend("c", 1)];
        assert!(members[0].state.try_take_slot(Some(1)));
        // The draw frees the full backend's slot: the weights drawn from must not change.
        let mut calls = 0;
        let mut freeing = || {
            calls += 1;
            if calls == 1 {
                members[0].state.release_slot();
            }
            1
        };
        let mut any_full = false;
        let chosen = two_choices(&members, Tried::default(), &mut None, &mut any_full, &mut freeing);
        assert!(matches!(chosen, Some(1 | 2)) && any_full, "{chosen:?}");
    }

    #[test]
    fn tried_and_lone_members_need_no_draw() {
        let members = [backend("a", 1), backend("b", 1)];
        let mut tried = Tried::default();
        tried.add(0);
        let mut never = || -> u64 { panic!("no draw needed") };
        assert_eq!(two_choices(&members, tried, &mut None, &mut false, &mut never), Some(1));
        tried.add(1);
        assert_eq!(two_choices(&members, tried, &mut None, &mut false, &mut never), None);
    }
}
