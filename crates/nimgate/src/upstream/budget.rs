//! The retry budget of a route: retries may be at most a share of its requests (plus a few per
//! second so that a quiet route can still retry), so that when every backend fails, retries
//! add a bounded fraction to the load instead of multiplying it. Every request deposits on
//! the hot path with one relaxed atomic add; only a retry takes the lock.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::time::Instant;

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    per_second: f64,
    /// Requests since the last retry looked.
    requests: AtomicU64,
    state: Mutex<Balance>,
}

#[derive(Debug)]
struct Balance {
    tokens: f64,
    refilled: Instant,
}

impl RetryBudget {
    pub fn new(ratio: f64, per_second: u32) -> Self {
        let per_second = f64::from(per_second);
        Self {
            ratio,
            per_second,
            requests: AtomicU64::new(0),
            // One second's allowance to start with, as if the route had been quiet that long.
            state: Mutex::new(Balance { tokens: per_second, refilled: Instant::now() }),
        }
    }

    /// Savings are capped at ten seconds of the per-second allowance (at least 10 retries'
    /// worth), so a long quiet spell does not fund a burst of retries when an outage begins.
    fn cap(&self) -> f64 {
        (self.per_second * 10.0).max(10.0)
    }

    /// A request arrived.
    pub fn deposit(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether one retry may be made now; takes it from the budget if so.
    pub fn withdraw(&self) -> bool {
        let mut balance = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let requests = self.requests.swap(0, Ordering::Relaxed) as f64;
        let elapsed = now.duration_since(balance.refilled).as_secs_f64();
        balance.refilled = now;
        balance.tokens = (balance.tokens + requests * self.ratio + elapsed * self.per_second).min(self.cap());
        // Shares like 0.1 do not add up to exactly 1.0 in binary.
        if balance.tokens >= 1.0 - 1e-9 {
            balance.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_are_a_share_of_requests() {
        let budget = RetryBudget::new(0.1, 0);
        let mut retries = 0;
        for _ in 0..100 {
            budget.deposit();
            if budget.withdraw() {
                retries += 1;
            }
        }
        assert_eq!(retries, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn the_per_second_allowance_refills_with_time() {
        let budget = RetryBudget::new(0.0, 100);
        let at_start = (0..200).filter(|_| budget.withdraw()).count();
        assert!((100..=120).contains(&at_start), "one second's allowance to start with: {at_start}");
        assert_eq!(at_start, 100, "exactly, on a clock that does not move");
        tokio::time::advance(std::time::Duration::from_millis(9)).await;
        assert!(!budget.withdraw(), "0.9 of a retry refilled");
        tokio::time::advance(std::time::Duration::from_millis(21)).await;
        assert_eq!((0..10).filter(|_| budget.withdraw()).count(), 3, "3 refilled in 30 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn savings_are_capped() {
        let budget = RetryBudget::new(1.0, 0);
        for _ in 0..1000 {
            budget.deposit();
        }
        let retries = (0..100).filter(|_| budget.withdraw()).count();
        assert_eq!(retries, 10);
    }
}
