//! A key's requests in flight on this replica (`max_concurrency` with the memory store): a
//! counter taken with a compare-and-swap below the cap and given back when the request's
//! `Slot` is dropped, however the request ends.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// The in-flight count of one key.
#[derive(Debug, Default)]
pub struct InFlight(AtomicU32);

impl InFlight {
    /// Takes a slot if fewer than `max` are taken.
    pub fn try_take(self: &Arc<Self>, max: u32) -> Option<InFlightSlot> {
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then(|| n + 1))
            .ok()
            .map(|_| InFlightSlot(Arc::clone(self)))
    }

    /// Whether every one of `max` slots is taken now.
    pub fn is_full(&self, max: u32) -> bool {
        self.0.load(Ordering::Acquire) >= max
    }

    pub fn count(&self) -> u32 {
        self.0.load(Ordering::Acquire)
    }
}

/// One slot of a key's in-flight count, given back on drop.
#[derive(Debug)]
pub struct InFlightSlot(Arc<InFlight>);

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_stop_at_the_cap_and_come_back_when_dropped() {
        let in_flight = Arc::new(InFlight::default());
        let a = in_flight.try_take(2).unwrap();
        let _b = in_flight.try_take(2).unwrap();
        assert!(in_flight.try_take(2).is_none());
        assert!(in_flight.is_full(2));
        drop(a);
        assert_eq!(in_flight.count(), 1);
        assert!(in_flight.try_take(2).is_some(), "the slot is back, and the new one is dropped at once");
        assert_eq!(in_flight.count(), 1);
    }

    #[test]
    fn concurrent_takers_never_exceed_the_cap() {
        let in_flight = Arc::new(InFlight::default());
        let start = Arc::new(std::sync::Barrier::new(16));
        let held: Vec<_> = (0..16)
            .map(|_| {
                let (in_flight, start) = (Arc::clone(&in_flight), Arc::clone(&start));
                std::thread::spawn(move || {
                    start.wait();
                    in_flight.try_take(5)
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        assert_eq!(held.len(), 5);
    }
}
