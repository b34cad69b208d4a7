//! The token budget of one key: a bucket holding up to a minute of tokens, refilled
//! continuously at `tokens_per_minute / 60` per second. A request reserves its estimate at
//! admission (only if the bucket holds it) and settles with its real usage at the end: the
//! difference is refunded or charged, so the level may go below zero after an answer longer
//! than its estimate and later requests wait until the debt is refilled. Pure arithmetic on
//! instants passed in, so it is tested exactly.
//!
//! Usage comes from backends, which may report anything: the debt is capped at
//! `MAX_DEBT_MINUTES` of budget, and every duration computed saturates instead of panicking.

use std::time::Duration;

use tokio::time::Instant;

/// The most a key can owe: this many minutes of its budget. A backend reporting absurd usage
/// locks the key out for at most this long (plus the minute it takes to refill).
pub const MAX_DEBT_MINUTES: f64 = 10.0;

/// `seconds` as a duration, saturating (negative: zero; huge, infinite or NaN: a day).
fn seconds(seconds: f64) -> Duration {
    const CEILING: Duration = Duration::from_secs(86_400);
    if seconds.is_nan() {
        return CEILING;
    }
    Duration::try_from_secs_f64(seconds.max(0.0)).map_or(CEILING, |d| d.min(CEILING))
}

#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    level: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket for `tokens_per_minute`.
    pub fn new(tokens_per_minute: u64, now: Instant) -> Self {
        let capacity = tokens_per_minute as f64;
        Self { capacity, per_second: capacity / 60.0, level: capacity, updated: now }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.level = (self.level + elapsed * self.per_second).min(self.capacity);
        self.updated = now;
    }

    /// Reserves `tokens` if the bucket holds them now; otherwise says how long until it will.
    /// An estimate above a whole minute's budget is clamped to it: such a request waits for a
    /// full bucket instead of never being admitted, and its real usage is charged at the end.
    pub fn try_reserve(&mut self, tokens: u64, now: Instant) -> Result<u64, Duration> {
        self.refill(now);
        let wanted = (tokens as f64).min(self.capacity);
        if self.level >= wanted {
            self.level -= wanted;
            Ok(wanted as u64)
        } else {
            Err(seconds((wanted - self.level) / self.per_second))
        }
    }

    /// Replaces a reservation with what was really used.
    pub fn settle(&mut self, reserved: u64, used: u64, now: Instant) {
        self.refill(now);
        let floor = -MAX_DEBT_MINUTES * self.capacity;
        self.level = (self.level + reserved as f64 - used as f64).clamp(floor, self.capacity);
    }

    /// Whole tokens available now (0 while in debt).
    pub fn remaining(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.level.max(0.0).floor() as u64
    }

    /// Time until the bucket holds `tokens` (zero when it does now).
    pub fn until_holding(&mut self, tokens: u64, now: Instant) -> Duration {
        self.refill(now);
        seconds(((tokens as f64).min(self.capacity) - self.level) / self.per_second)
    }

    /// Time until the bucket is full again.
    pub fn until_full(&mut self, now: Instant) -> Duration {
        self.refill(now);
        seconds((self.capacity - self.level) / self.per_second)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TPM: u64 = 600; // 10 tokens per second

    #[test]
    fn reserves_while_the_budget_holds_then_says_when_it_will() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(TPM, t0);
        assert_eq!(b.try_reserve(500, t0), Ok(500));
        assert_eq!(b.remaining(t0), 100);
        assert_eq!(b.try_reserve(150, t0), Err(Duration::from_secs(5)));
        assert_eq!(b.try_reserve(150, t0 + Duration::from_secs(5)), Ok(150));
    }

    #[test]
    fn settling_refunds_a_short_answer_and_charges_a_long_one() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(TPM, t0);
        b.try_reserve(600, t0).unwrap();
        b.settle(600, 100, t0);
        assert_eq!(b.remaining(t0), 500, "refund");
        b.try_reserve(500, t0).unwrap();
        b.settle(500, 800, t0);
        assert_eq!(b.remaining(t0), 0, "in debt by 300");
        assert_eq!(b.try_reserve(10, t0), Err(Duration::from_secs(31)));
        assert_eq!(b.until_full(t0), Duration::from_secs(90));
    }

    #[test]
    fn an_estimate_above_a_minute_waits_for_a_full_bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(TPM, t0);
        b.try_reserve(60, t0).unwrap();
        assert_eq!(b.try_reserve(10_000, t0), Err(Duration::from_secs(6)));
        assert_eq!(b.try_reserve(10_000, t0 + Duration::from_secs(6)), Ok(600));
    }

    #[test]
    fn absurd_usage_caps_the_debt_and_never_panics() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(TPM, t0);
        b.try_reserve(10, t0).unwrap();
        b.settle(10, u64::MAX, t0);
        // Ten minutes of debt plus the minute of the request's own estimate, not 10^17 s.
        assert_eq!(b.try_reserve(600, t0), Err(Duration::from_secs(660)));
        assert_eq!(b.until_full(t0), Duration::from_secs(660));
        assert_eq!(b.remaining(t0 + Duration::from_secs(660)), 600);
    }

    #[test]
    fn durations_saturate() {
        assert_eq!(seconds(f64::INFINITY), Duration::from_secs(86_400));
        assert_eq!(seconds(f64::NAN), Duration::from_secs(86_400));
        assert_eq!(seconds(-5.0), Duration::ZERO);
        assert_eq!(seconds(1e300), Duration::from_secs(86_400));
    }

    #[test]
    fn refill_never_exceeds_capacity() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(TPM, t0);
        b.settle(100, 0, t0);
        assert_eq!(b.remaining(t0 + Duration::from_secs(3600)), 600);
        assert_eq!(b.until_full(t0), Duration::ZERO);
    }
}
