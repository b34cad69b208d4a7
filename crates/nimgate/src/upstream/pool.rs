//! Backend pools: which backend of a route takes a request.
//!
//! - The route's own backends first, by the route's `strategy`: the power of two choices by
//!   weight and load (`balance`), or prefix affinity (`affinity`), which also remembers the
//!   prompt blocks sent to each backend.
//! - Backends out of rotation (ejected after failures, failing their health check) are
//!   skipped, and so are full ones (at `max_concurrency`, or over NIM's load thresholds).
//! - When none of them has room, the `fallback` backends in the order listed: put
//!   self-hosted NIMs first and the hosted API last, and the hosted API serves only when
//!   they are all down or busy.
//! - When nothing has room but something is merely full, the request waits in the route's
//!   bounded queue; when everything is out, or the queue is full or its wait is over: 503.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use super::affinity::{AffinitySettings, Decision, choose};
use super::backend::{Backend, BackendName};
use super::balance::{Tried, random, two_choices};
use super::budget::RetryBudget;
use super::discovery::Group;
use super::fair::FairQueue;
use super::health::EjectionPolicy;
use super::prefix::PromptBlocks;

/// `balancing:`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Balancing {
    pub queue_length: usize,
    pub queue_timeout: Duration,
    pub max_attempts: u32,
    pub retry_budget: f64,
    pub min_retries_per_second: u32,
    pub ejection: EjectionPolicy,
    pub prefix_affinity: AffinitySettings,
}

/// How a route picks among its own backends (`strategy:`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Strategy {
    /// Two random draws by weight, the less loaded wins.
    #[default]
    TwoChoices,
    /// Where the prompt's prefix most likely is cached, within a load bound.
    PrefixAffinity,
}

/// What the balancer is told about a request.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pick<'a> {
    /// The prompt's blocks, on a route with prefix affinity.
    pub prompt: Option<&'a PromptBlocks>,
    /// The key's name and weight: its share of a full pool's freed slots.
    pub key: Option<&'a Arc<str>>,
    pub weight: u32,
}

impl Default for Balancing {
    fn default() -> Self {
        Self {
            queue_length: 128,
            queue_timeout: Duration::from_secs(5),
            max_attempts: 3,
            retry_budget: 0.2,
            min_retries_per_second: 5,
            ejection: EjectionPolicy::DEFAULT,
            prefix_affinity: AffinitySettings::DEFAULT,
        }
    }
}

/// What a route lists: a backend, or a group standing for its members of the moment.
#[derive(Debug, Clone)]
pub enum PoolEntry {
    Backend(Arc<Backend>),
    Group(Arc<Group>),
}

impl PoolEntry {
    pub fn name(&self) -> &BackendName {
        match self {
            Self::Backend(backend) => &backend.name,
            Self::Group(group) => &group.name,
        }
    }
}

/// The backends a pool picks from now: its backends in order, each group replaced by its
/// members.
#[derive(Debug, Default)]
pub struct Members {
    pub primary: Vec<Arc<Backend>>,
    pub fallback: Vec<Arc<Backend>>,
    /// The groups' versions these were listed at.
    version: u64,
}

impl Members {
    /// Primary then fallback.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.primary.iter().chain(&self.fallback)
    }
}

/// The backends of one route.
#[derive(Debug)]
pub struct Pool {
    primary: Vec<PoolEntry>,
    fallback: Vec<PoolEntry>,
    /// The groups among them, whose versions say when `members` is out of date.
    groups: Vec<Arc<Group>>,
    members: ArcSwap<Members>,
    queue_length: usize,
    queue_timeout: Duration,
    max_attempts: u32,
    /// Set for `strategy: prefix_affinity`.
    affinity: Option<AffinitySettings>,
    queued: AtomicUsize,
    /// Who among the queued gets the next freed slot.
    fair: FairQueue,
    budget: RetryBudget,
}

/// An in-flight slot on a backend, held until the answer's last byte (or until the answer is
/// dropped); releasing it wakes requests queued for room.
#[derive(Debug)]
pub struct Slot {
    backend: Arc<Backend>,
    member: usize,
    /// Why prefix affinity chose it, on a route with it.
    affinity: Option<Decision>,
}

impl Slot {
    fn new(backend: &Arc<Backend>, member: usize) -> Self {
        Self { backend: Arc::clone(backend), member, affinity: None }
    }

    pub fn affinity(&self) -> Option<Decision> {
        self.affinity
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Its backend's place in the pool (primary then fallback order).
    pub fn member(&self) -> usize {
        self.member
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.backend.state.release_slot();
    }
}

/// Why no backend was picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoBackend {
    /// Some backend is in rotation but every one is full.
    Full,
    /// Every backend not yet tried is out of rotation (or there is none left to try).
    AllOut,
    /// The route's queue is at its length.
    QueueFull,
    /// Waited the whole queue timeout without room.
    Waited(Duration),
}

impl Pool {
    pub fn new(primary: Vec<PoolEntry>, fallback: Vec<PoolEntry>, balancing: &Balancing, strategy: Strategy) -> Self {
        let groups: Vec<Arc<Group>> = primary
            .iter()
            .chain(&fallback)
            .filter_map(|entry| match entry {
                PoolEntry::Group(group) => Some(Arc::clone(group)),
                PoolEntry::Backend(_) => None,
            })
            .collect();
        let members = ArcSwap::from_pointee(list(&primary, &fallback, version_of(&groups)));
        Self {
            primary,
            fallback,
            groups,
            members,
            queue_length: balancing.queue_length,
            queue_timeout: balancing.queue_timeout,
            max_attempts: balancing.max_attempts.max(1),
            affinity: (strategy == Strategy::PrefixAffinity).then_some(balancing.prefix_affinity),
            queued: AtomicUsize::new(0),
            fair: FairQueue::default(),
            budget: RetryBudget::new(balancing.retry_budget, balancing.min_retries_per_second),
        }
    }

    /// What the route lists, groups as groups.
    pub fn entries(&self) -> impl Iterator<Item = &PoolEntry> {
        self.primary.iter().chain(&self.fallback)
    }

    pub fn primary_entries(&self) -> &[PoolEntry] {
        &self.primary
    }

    pub fn fallback_entries(&self) -> &[PoolEntry] {
        &self.fallback
    }

    /// The backends to pick from now. Listed again only when a group's members changed: a
    /// pool without groups costs one atomic load.
    pub fn members(&self) -> arc_swap::Guard<Arc<Members>> {
        let members = self.members.load();
        if self.groups.is_empty() {
            return members;
        }
        let version = version_of(&self.groups);
        if members.version == version {
            return members;
        }
        drop(members);
        self.members.store(Arc::new(list(&self.primary, &self.fallback, version)));
        self.members.load()
    }

    pub fn strategy(&self) -> Strategy {
        if self.affinity.is_some() { Strategy::PrefixAffinity } else { Strategy::TwoChoices }
    }

    /// The settings of prefix affinity, when the route uses it.
    pub fn affinity(&self) -> Option<&AffinitySettings> {
        self.affinity.as_ref()
    }

    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    pub fn budget(&self) -> &RetryBudget {
        &self.budget
    }

    /// Requests waiting in this route's queue now.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// A backend for a request's first attempt, waiting in the queue while all are full
    /// (`waited` tells how long, when it did). Queued requests are served by weighted fair
    /// queueing of their keys (`fair`); while any wait, a new request queues behind them
    /// instead of taking a slot freed for them. `retry::send` spells out these two steps
    /// itself, so that its own future holds the queue's only on the path that waits.
    pub async fn acquire(&self, pick: Pick<'_>, waited: &mut Option<Duration>) -> Result<Slot, NoBackend> {
        match self.acquire_now(pick) {
            Some(picked) => picked,
            None => self.acquire_queued(pick, waited).await,
        }
    }

    /// `acquire` when it need not wait: a backend with room and nobody queued before this
    /// request, or a refusal. None when the request must queue (`acquire_queued`). Apart so
    /// that the usual request takes its slot without building the queue's future.
    pub fn acquire_now(&self, pick: Pick<'_>) -> Option<Result<Slot, NoBackend>> {
        if self.queued.load(Ordering::Acquire) == 0 {
            match self.try_acquire(pick, Tried::default()) {
                Err(NoBackend::Full) => {}
                picked => return Some(picked),
            }
        }
        (self.queue_length == 0).then_some(Err(NoBackend::QueueFull))
    }

    /// `acquire` once `acquire_now` said to queue.
    pub async fn acquire_queued(&self, pick: Pick<'_>, waited: &mut Option<Duration>) -> Result<Slot, NoBackend> {
        if self.queue_length == 0 {
            return Err(NoBackend::QueueFull);
        }
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.queue_length {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(NoBackend::QueueFull);
        }
        let _leave = Leave(self);
        let queued_at = tokio::time::Instant::now();
        let deadline = queued_at + self.queue_timeout;
        let _measure = Measure(queued_at, waited);
        let ticket = self.fair.join(pick.key, pick.weight);
        let _give_up = GiveUp(&self.fair, ticket.place);
        // Listening on each member's room: a freed slot wakes one waiter of that backend, not
        // every queued request of every route; that waiter passes it to the queue's head.
        let listed = self.members.load_full();
        let members: Vec<&Backend> = listed.all().map(|b| &**b).collect();
        let _listening: Vec<_> = members.iter().map(|b| b.state.room.listen()).collect();
        loop {
            let mut freed: Vec<_> = members.iter().map(|b| Box::pin(b.state.room.freed())).collect();
            // Registered before looking, so a release between the look and the wait wakes us.
            for wakeup in &mut freed {
                wakeup.as_mut().enable();
            }
            let mut turn = std::pin::pin!(ticket.wake.notified());
            turn.as_mut().enable();
            if self.fair.is_head(ticket.place) {
                match self.try_acquire(pick, Tried::default()) {
                    Err(NoBackend::Full) => {}
                    Ok(slot) => {
                        self.fair.served(ticket.place);
                        return Ok(slot);
                    }
                    Err(e) => return Err(e),
                }
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(NoBackend::Waited(self.queue_timeout));
            }
            let woken = std::future::poll_fn(|cx| {
                if turn.as_mut().poll(cx).is_ready() {
                    return std::task::Poll::Ready(false);
                }
                if freed.iter_mut().any(|wakeup| wakeup.as_mut().poll(cx).is_ready()) {
                    std::task::Poll::Ready(true)
                } else {
                    std::task::Poll::Pending
                }
            });
            // Ejections end by the clock, not by a release: look again at least every 100 ms.
            let by_room = tokio::time::timeout_at(deadline.min(now + Duration::from_millis(100)), woken).await;
            if by_room != Ok(false) {
                // A slot was freed (or the clock says look): it is the head's to take.
                self.fair.wake_head();
            }
        }
    }

    /// A backend not in `tried`, without waiting: the primary pool by the route's strategy,
    /// then the fallback pool in order.
    pub fn try_acquire(&self, pick: Pick<'_>, tried: Tried) -> Result<Slot, NoBackend> {
        let mut now = None;
        let mut any_full = false;
        let members = self.members();
        // A slot can be taken by another request between the choice and the take: choose again.
        for _ in 0..4 {
            let (member, affinity) = match (&self.affinity, pick.prompt) {
                (Some(settings), Some(prompt)) => {
                    match choose(&members.primary, tried, prompt, settings, &mut now, &mut any_full) {
                        Some((member, decision)) => (member, Some(decision)),
                        None => break,
                    }
                }
                _ => match two_choices(&members.primary, tried, &mut now, &mut any_full, &mut random) {
                    Some(member) => (member, None),
                    None => break,
                },
            };
            let backend = &members.primary[member];
            if backend.state.try_take_slot(backend.max_concurrency) {
                if let (Some(settings), Some(prompt)) = (&self.affinity, pick.prompt) {
                    backend.state.prefixes.record(prompt, settings.blocks_per_backend);
                }
                let mut slot = Slot::new(backend, member);
                slot.affinity = affinity;
                return Ok(slot);
            }
        }
        let offset = members.primary.len();
        for (i, backend) in members.fallback.iter().enumerate() {
            if tried.contains(offset + i) || backend.state.is_out(&mut now) {
                continue;
            }
            if !backend.state.is_full_by_load() && backend.state.try_take_slot(backend.max_concurrency) {
                return Ok(Slot::new(backend, offset + i));
            }
            any_full = true;
        }
        Err(if any_full { NoBackend::Full } else { NoBackend::AllOut })
    }

    /// Why nothing could be picked, for the 503's message: each backend's state.
    /// Whether a backend of this pool other than `this` is in rotation now.
    pub fn others_in_rotation(&self, this: &Backend) -> bool {
        let mut now = None;
        self.members().all().any(|b| !std::ptr::eq(&**b, this) && !b.state.is_out(&mut now))
    }

    pub fn describe(&self) -> String {
        let mut now = None;
        let members = self.members();
        if members.primary.is_empty() && members.fallback.is_empty() {
            return "no member found yet by DNS".to_owned();
        }
        let states: Vec<String> = members
            .all()
            .map(|b| {
                let state = if !b.state.is_healthy() {
                    "failing its health check".to_owned()
                } else if b.state.is_out(&mut now) {
                    format!("ejected for {} ms more", b.state.ejected_for_ms())
                } else if b.state.is_full_by_load() {
                    "full by its NIM load".to_owned()
                } else if !b.has_room() {
                    format!("at max_concurrency {}", b.max_concurrency.unwrap_or(0))
                } else {
                    "tried".to_owned()
                };
                format!("{} {state}", b.name)
            })
            .collect();
        states.join(", ")
    }
}

/// The members of `primary` and `fallback` at `version`.
fn list(primary: &[PoolEntry], fallback: &[PoolEntry], version: u64) -> Members {
    let expand = |entries: &[PoolEntry]| {
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            match entry {
                PoolEntry::Backend(backend) => out.push(Arc::clone(backend)),
                PoolEntry::Group(group) => out.extend(group.members().iter().cloned()),
            }
        }
        out
    };
    Members { primary: expand(primary), fallback: expand(fallback), version }
}

/// One number that moves whenever any of `groups` changes its members.
fn version_of(groups: &[Arc<Group>]) -> u64 {
    groups.iter().fold(0u64, |v, g| v.wrapping_mul(1_000_003).wrapping_add(g.version()))
}

/// Writes the time spent in the queue, however the wait ends.
struct Measure<'a>(tokio::time::Instant, &'a mut Option<Duration>);

impl Drop for Measure<'_> {
    fn drop(&mut self) {
        *self.1 = Some(self.0.elapsed());
    }
}

/// Takes a request out of the fair queue however its wait ends (a no-op once served).
struct GiveUp<'a>(&'a FairQueue, super::fair::Place);

impl Drop for GiveUp<'_> {
    fn drop(&mut self) {
        self.0.leave(self.1);
    }
}

struct Leave<'a>(&'a Pool);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::health::{Outcome, Overload};

    fn backend(name: &str, weight: u32, max: Option<u32>) -> Arc<Backend> {
        let mut b = Backend::for_tests(name, "http://127.0.0.1:1");
        b.weight = weight;
        b.max_concurrency = max;
        Arc::new(b)
    }

    fn pool(primary: Vec<Arc<Backend>>, fallback: Vec<Arc<Backend>>) -> Pool {
        let entries = |list: Vec<Arc<Backend>>| list.into_iter().map(PoolEntry::Backend).collect();
        Pool::new(entries(primary), entries(fallback), &Balancing::default(), Strategy::TwoChoices)
    }

    fn name(slot: &Slot) -> String {
        slot.backend().name.to_string()
    }

    #[test]
    fn idle_backends_share_by_weight() {
        let p = pool(vec![backend("a", 1, None), backend("b", 3, None)], vec![]);
        let mut b = 0;
        for _ in 0..4000 {
            // Dropped at once: every pick sees both idle, so the draw alone decides.
            if name(&p.try_acquire(Pick::default(), Tried::default()).unwrap()) == "b" {
                b += 1;
            }
        }
        assert!((2700..3300).contains(&b), "b took {b} of 4000 at weight 3:1");
    }

    #[test]
    fn the_less_loaded_of_two_wins() {
        let p = pool(vec![backend("a", 1, None), backend("b", 1, None)], vec![]);
        let held: Vec<Slot> = (0..10).map(|_| p.try_acquire(Pick::default(), Tried::default()).unwrap()).collect();
        let a = held.iter().filter(|s| name(s) == "a").count();
        assert!((4..=6).contains(&a), "load stays even: a holds {a} of 10");
    }

    #[test]
    fn full_backends_are_skipped_then_the_fallback_serves_in_order() {
        let p = pool(vec![backend("a", 1, Some(1))], vec![backend("local", 1, Some(1)), backend("hosted", 1, None)]);
        let first = p.try_acquire(Pick::default(), Tried::default()).unwrap();
        assert_eq!(name(&first), "a");
        let second = p.try_acquire(Pick::default(), Tried::default()).unwrap();
        assert_eq!(name(&second), "local", "self-hosted fallback before the hosted API");
        let third = p.try_acquire(Pick::default(), Tried::default()).unwrap();
        assert_eq!(name(&third), "hosted");
        drop(first);
        assert_eq!(
            name(&p.try_acquire(Pick::default(), Tried::default()).unwrap()),
            "a",
            "back to the pool once it has room"
        );
    }

    #[test]
    fn tried_backends_are_not_picked_again() {
        let p = pool(vec![backend("a", 1, None), backend("b", 1, None)], vec![]);
        let first = p.try_acquire(Pick::default(), Tried::default()).unwrap();
        let mut tried = Tried::default();
        tried.add(first.member());
        let second = p.try_acquire(Pick::default(), tried).unwrap();
        assert_ne!(name(&first), name(&second));
        tried.add(second.member());
        assert_eq!(p.try_acquire(Pick::default(), tried).unwrap_err(), NoBackend::AllOut);
    }

    #[test]
    fn ejected_backends_are_out_and_full_is_not_out() {
        let a = backend("a", 1, Some(1));
        let p = pool(vec![Arc::clone(&a)], vec![]);
        let held = p.try_acquire(Pick::default(), Tried::default()).unwrap();
        assert_eq!(p.try_acquire(Pick::default(), Tried::default()).unwrap_err(), NoBackend::Full);
        drop(held);
        let overloaded = Outcome::Overloaded {
            status: Overload::TooManyRequests,
            out_for: Duration::from_secs(60),
            others_can_serve: true,
        };
        a.observe(overloaded, &crate::metrics::Metrics::new());
        assert_eq!(p.try_acquire(Pick::default(), Tried::default()).unwrap_err(), NoBackend::AllOut);
        assert!(p.describe().contains("a ejected for"), "{}", p.describe());
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_request_gets_the_slot_freed_for_it() {
        let p = Arc::new(pool(vec![backend("a", 1, Some(1))], vec![]));
        let held = p.try_acquire(Pick::default(), Tried::default()).unwrap();
        let waiter = tokio::spawn({
            let p = Arc::clone(&p);
            async move { p.acquire(Pick::default(), &mut None).await.map(|s| name(&s)) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(p.queued(), 1);
        drop(held);
        assert_eq!(waiter.await.unwrap().unwrap(), "a");
        assert_eq!(p.queued(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn queued_requests_get_freed_slots_one_each_in_arrival_order() {
        let p = Arc::new(pool(vec![backend("a", 1, Some(1))], vec![]));
        let held = p.try_acquire(Pick::default(), Tried::default()).unwrap();
        let (served, mut order) = tokio::sync::mpsc::unbounded_channel();
        let mut releases = Vec::new();
        for id in 0..3 {
            let (release, released) = tokio::sync::oneshot::channel::<()>();
            releases.push(release);
            let (waiter, served) = (Arc::clone(&p), served.clone());
            tokio::spawn(async move {
                let slot = waiter.acquire(Pick::default(), &mut None).await.unwrap();
                served.send(id).unwrap();
                let _ = released.await;
                drop(slot);
            });
            while p.queued() < id + 1 {
                tokio::task::yield_now().await;
            }
        }
        drop(held);
        for (expected, release) in (0..3).zip(releases) {
            assert_eq!(order.recv().await, Some(expected), "first in, first served");
            tokio::task::yield_now().await;
            assert!(order.try_recv().is_err(), "one slot freed, one request served");
            release.send(()).unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_slot_goes_to_a_request_of_a_pool_with_that_backend() {
        let (a, b) = (backend("a", 1, Some(1)), backend("b", 1, Some(1)));
        let pool_a = Arc::new(pool(vec![Arc::clone(&a)], vec![]));
        let pool_b = Arc::new(pool(vec![Arc::clone(&b)], vec![]));
        let (held_a, _held_b) = (
            pool_a.try_acquire(Pick::default(), Tried::default()).unwrap(),
            pool_b.try_acquire(Pick::default(), Tried::default()).unwrap(),
        );
        // A request for b queues first, then one for a.
        let for_b = tokio::spawn({
            let p = Arc::clone(&pool_b);
            async move { p.acquire(Pick::default(), &mut None).await.map(|s| name(&s)) }
        });
        while pool_b.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let for_a = tokio::spawn({
            let p = Arc::clone(&pool_a);
            async move { p.acquire(Pick::default(), &mut None).await.map(|s| name(&s)) }
        });
        while pool_a.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let started = tokio::time::Instant::now();
        drop(held_a);
        assert_eq!(for_a.await.unwrap().unwrap(), "a");
        assert_eq!(started.elapsed(), Duration::ZERO, "at once, not at the next periodic look");
        assert!(!for_b.is_finished(), "b is still full");
        for_b.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_is_bounded_in_length_and_time() {
        let balancing =
            Balancing { queue_length: 1, queue_timeout: Duration::from_millis(100), ..Balancing::default() };
        let p = Arc::new(Pool::new(
            vec![PoolEntry::Backend(backend("a", 1, Some(1)))],
            vec![],
            &balancing,
            Strategy::TwoChoices,
        ));
        let _held = p.try_acquire(Pick::default(), Tried::default()).unwrap();
        let waiter = tokio::spawn({
            let p = Arc::clone(&p);
            async move { p.acquire(Pick::default(), &mut None).await.map(|s| name(&s)) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(p.acquire(Pick::default(), &mut None).await.unwrap_err(), NoBackend::QueueFull);
        assert_eq!(waiter.await.unwrap().unwrap_err(), NoBackend::Waited(Duration::from_millis(100)));
    }
}
