//! The request limit of one key: GCRA (the generic cell rate algorithm), the bucket of
//! `requests_per_minute` in one number. A request is admitted when the theoretical arrival
//! time (`tat`) of the bucket is no more than `burst` intervals ahead of now; each admission
//! moves it one interval on. Pure arithmetic on instants passed in, exact to the nanosecond,
//! and the same formulas as the Redis store's script, so that Retry-After and the headers say
//! the same thing whichever store counts.

use std::time::Duration;

use tokio::time::Instant;

use super::quota::Window;

#[derive(Debug, Clone)]
pub struct Gcra {
    per_minute: u64,
    burst: u32,
    /// One request's share of the minute.
    interval: Duration,
    /// `burst` intervals: how far ahead of now `tat` may be after an admission.
    tolerance: Duration,
    tat: Instant,
}

impl Gcra {
    /// A full bucket: `burst` requests at once, refilled one per `60 s / per_minute`.
    pub fn new(per_minute: u64, burst: u64, now: Instant) -> Self {
        let per_minute = per_minute.max(1);
        let burst = u32::try_from(burst.clamp(1, per_minute)).unwrap_or(u32::MAX);
        // Validation caps the rate at 60M a minute, so the interval is at least a microsecond.
        let interval = Duration::from_nanos(60_000_000_000 / per_minute).max(Duration::from_nanos(1));
        Self { per_minute, burst, interval, tolerance: interval.saturating_mul(burst), tat: now }
    }

    /// Admits one request, or says how long until one would be.
    pub fn check(&mut self, now: Instant) -> Result<Window, Duration> {
        let next = self.tat.max(now) + self.interval;
        let ahead = next - now;
        if ahead > self.tolerance {
            return Err(ahead - self.tolerance);
        }
        self.tat = next;
        Ok(self.window(ahead))
    }

    /// How long until a request would be admitted, when it would not be now.
    pub fn busy_for(&self, now: Instant) -> Option<Duration> {
        let ahead = self.tat.max(now) + self.interval - now;
        ahead.checked_sub(self.tolerance).filter(|wait| !wait.is_zero())
    }

    /// Where the limit stands now, consuming nothing.
    pub fn peek(&self, now: Instant) -> Window {
        self.window(self.tat.saturating_duration_since(now))
    }

    /// The window when `tat` is `ahead` of now: what remains is the whole intervals left
    /// within the tolerance, and the bucket is full again when now reaches `tat`.
    fn window(&self, ahead: Duration) -> Window {
        let room = self.tolerance.saturating_sub(ahead).as_nanos() / self.interval.as_nanos();
        Window { limit: self.per_minute, remaining: room.min(u128::from(self.burst)) as u64, reset: ahead }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minute_goes_at_once_then_one_per_interval() {
        let t0 = Instant::now();
        let mut g = Gcra::new(3, 3, t0);
        assert_eq!(g.peek(t0), Window { limit: 3, remaining: 3, reset: Duration::ZERO });
        for (remaining, reset) in [(2, 20), (1, 40), (0, 60)] {
            assert_eq!(g.check(t0), Ok(Window { limit: 3, remaining, reset: Duration::from_secs(reset) }));
        }
        assert_eq!(g.check(t0), Err(Duration::from_secs(20)));
        assert_eq!(g.busy_for(t0), Some(Duration::from_secs(20)));
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(g.check(t1), Err(Duration::from_secs(15)), "the wait counts down");
        assert_eq!(g.peek(t1), Window { limit: 3, remaining: 0, reset: Duration::from_secs(55) });
        let t2 = t0 + Duration::from_secs(20);
        assert_eq!(g.busy_for(t2), None);
        assert_eq!(g.check(t2), Ok(Window { limit: 3, remaining: 0, reset: Duration::from_secs(60) }));
        let t3 = t0 + Duration::from_secs(200);
        assert_eq!(g.peek(t3).remaining, 3, "an idle minute fills the bucket, and no more");
    }

    #[test]
    fn a_burst_spaces_requests_beyond_it() {
        let t0 = Instant::now();
        let mut g = Gcra::new(60, 1, t0);
        assert!(g.check(t0).is_ok());
        assert_eq!(g.check(t0), Err(Duration::from_secs(1)));
        assert_eq!(g.check(t0 + Duration::from_millis(999)), Err(Duration::from_millis(1)));
        assert!(g.check(t0 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn the_extremes_do_not_overflow() {
        let t0 = Instant::now();
        let mut g = Gcra::new(60_000_000, 60_000_000, t0);
        for _ in 0..1000 {
            assert!(g.check(t0).is_ok());
        }
        assert_eq!(g.peek(t0).remaining, 59_999_000);
        let mut g = Gcra::new(1, 1, t0);
        assert!(g.check(t0).is_ok());
        assert_eq!(g.check(t0), Err(Duration::from_secs(60)));
    }
}
