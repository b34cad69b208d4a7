//! The order in which a route's queued requests get freed slots: weighted fair queueing by key.
//! When every backend of a pool is full, one team's batch job of 500 requests must not make
//! another team's interactive request wait behind all of them.
//!
//! Start-time fair queueing on virtual time: a request of key k arriving gets the tags
//! `start = max(V, last finish of k)` and `finish = start + COST / weight(k)`; the waiting
//! request with the smallest finish tag (then the earliest arrival) is served next, and `V`
//! becomes its start tag. A key alone in the queue is served in arrival order; keys with
//! waiting requests share the freed slots in proportion to their weights, whatever their
//! backlogs; a key that was idle starts at the present, with no credit saved up.
//!
//! Only the head may take a slot. A freed slot wakes some waiter of the pool (whichever the
//! backend's `Room` wakes); a waiter woken so wakes the head, and whoever leaves the head (by
//! a slot, an error or giving up) wakes the next, so slots freed together are all handed out.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// Virtual time a request of weight 1 costs; a weight w costs COST / w.
const COST: u64 = 1 << 20;

/// A queued request's place: its finish tag, then its arrival.
pub type Place = (u64, u64);

/// One queued request.
#[derive(Debug)]
struct Waiter {
    start: u64,
    key: Arc<str>,
    wake: Arc<Notify>,
}

#[derive(Debug, Default)]
struct State {
    /// The start tag of the request served last.
    virtual_time: u64,
    arrivals: u64,
    waiting: BTreeMap<Place, Waiter>,
    /// Per key with requests waiting: its last finish tag and how many wait.
    keys: HashMap<Arc<str>, (u64, usize)>,
}

/// A pool's queue order.
#[derive(Debug, Default)]
pub struct FairQueue {
    state: Mutex<State>,
}

/// A request's ticket in the queue: where it stands and how it is woken.
#[derive(Debug)]
pub struct Ticket {
    pub place: Place,
    pub wake: Arc<Notify>,
}

impl FairQueue {
    /// Poison-safe: a panic while holding the lock leaves tags that are at worst a little
    /// unfair, never a queue that stops serving.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Queues a request of `key` (none: an unnamed one) with `weight`.
    pub fn join(&self, key: Option<&Arc<str>>, weight: u32) -> Ticket {
        let key: Arc<str> = key.map_or_else(|| Arc::from(""), Arc::clone);
        let weight = u64::from(weight.max(1));
        let wake = Arc::new(Notify::new());
        let mut state = self.lock();
        let virtual_time = state.virtual_time;
        let entry = state.keys.entry(Arc::clone(&key)).or_insert((virtual_time, 0));
        let start = entry.0.max(virtual_time);
        let finish = start.saturating_add(COST / weight);
        *entry = (finish, entry.1 + 1);
        state.arrivals += 1;
        let place = (finish, state.arrivals);
        state.waiting.insert(place, Waiter { start, key, wake: Arc::clone(&wake) });
        Ticket { place, wake }
    }

    /// Whether the request at `place` is next.
    pub fn is_head(&self, place: Place) -> bool {
        self.lock().waiting.first_key_value().is_some_and(|(first, _)| *first == place)
    }

    /// Wakes the request that is next (a slot was freed: it is its to take).
    pub fn wake_head(&self) {
        if let Some((_, head)) = self.lock().waiting.first_key_value() {
            head.wake.notify_one();
        }
    }

    /// The request at `place` got a slot: virtual time moves to its start.
    pub fn served(&self, place: Place) {
        let mut state = self.lock();
        if let Some(start) = state.waiting.get(&place).map(|w| w.start) {
            state.virtual_time = state.virtual_time.max(start);
        }
        drop(state);
        self.leave(place);
    }

    /// The request at `place` leaves the queue (served, refused or given up); if it was the
    /// head, the next one is woken to look for room.
    pub fn leave(&self, place: Place) {
        let mut state = self.lock();
        let was_head = state.waiting.first_key_value().is_some_and(|(first, _)| *first == place);
        let Some(waiter) = state.waiting.remove(&place) else { return };
        if let Some(entry) = state.keys.get_mut(&waiter.key) {
            entry.1 -= 1;
            if entry.1 == 0 {
                state.keys.remove(&waiter.key);
            }
        }
        if was_head && let Some((_, next)) = state.waiting.first_key_value() {
            next.wake.notify_one();
        }
    }

    /// Requests queued now (the pool counts them without the lock, in `Pool::queued`).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serves the queue's head `n` times; returns whose requests were served.
    fn serve(queue: &FairQueue, tickets: &mut Vec<(Arc<str>, Ticket)>, n: usize) -> Vec<Arc<str>> {
        let mut served = Vec::new();
        for _ in 0..n {
            let i = tickets.iter().position(|(_, t)| queue.is_head(t.place)).expect("a head");
            let (key, ticket) = tickets.remove(i);
            queue.served(ticket.place);
            served.push(key);
        }
        served
    }

    #[test]
    fn a_key_arriving_behind_a_backlog_is_served_next_not_last() {
        let queue = FairQueue::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("batch"), Arc::from("chat"));
        let mut tickets: Vec<_> = (0..500).map(|_| (Arc::clone(&a), queue.join(Some(&a), 1))).collect();
        assert_eq!(serve(&queue, &mut tickets, 10).iter().filter(|k| ***k == *"batch").count(), 10);
        tickets.push((Arc::clone(&b), queue.join(Some(&b), 1)));
        let next = serve(&queue, &mut tickets, 2);
        assert!(next.iter().any(|k| **k == *"chat"), "served within two slots: {next:?}");
        assert_eq!(queue.len(), 490 - 2 + 1);
    }

    #[test]
    fn backlogged_keys_share_by_weight() {
        let queue = FairQueue::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let mut tickets = Vec::new();
        for _ in 0..300 {
            tickets.push((Arc::clone(&a), queue.join(Some(&a), 3)));
            tickets.push((Arc::clone(&b), queue.join(Some(&b), 1)));
        }
        let served = serve(&queue, &mut tickets, 200);
        let from_a = served.iter().filter(|k| ***k == *"a").count();
        assert!((148..=152).contains(&from_a), "3:1 of 200 is 150 for a: {from_a}");
    }

    #[tokio::test]
    async fn leaving_the_head_wakes_the_next_and_an_idle_key_saves_no_credit() {
        let queue = FairQueue::default();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        let first = queue.join(Some(&a), 1);
        let second = queue.join(Some(&b), 1);
        assert!(queue.is_head(first.place) && !queue.is_head(second.place));
        queue.leave(first.place);
        assert!(queue.is_head(second.place));
        // The wake-up is kept for the next waiter even though it was not waiting yet.
        let woken = tokio::time::timeout(std::time::Duration::from_secs(5), second.wake.notified()).await;
        assert!(woken.is_ok(), "notified when the head left");
        queue.served(second.place);
        assert!(queue.len() == 0 && queue.lock().keys.is_empty(), "nothing kept for keys with no waiter");
        // After a long quiet spell of b, a's backlog and b's new request interleave.
        let mut tickets: Vec<_> = (0..20).map(|_| (Arc::clone(&a), queue.join(Some(&a), 1))).collect();
        serve(&queue, &mut tickets, 10);
        tickets.push((Arc::clone(&b), queue.join(Some(&b), 1)));
        assert!(serve(&queue, &mut tickets, 2).iter().any(|k| **k == *"b"));
    }
}
