//! The memory all request bodies being read may take at once (`server.max_buffered_body_bytes`),
//! across every connection and stream. A body takes room for each frame as it arrives (not for
//! its declared length, which costs a client nothing to claim) and gives it back when the
//! request no longer needs its bytes. When the budget is spent, readers wait (so clients are
//! slowed by flow control, not buffered) and, after the wait given (`header_read_timeout`),
//! are refused with 503.
//! Without it, h2's many streams per connection, each up to `max_body_bytes`, would let one
//! client make the gateway hold gigabytes.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::error::GatewayError;

/// The shared budget, in bytes.
#[derive(Debug, Clone)]
pub struct BodyBudget {
    room: Arc<Semaphore>,
}

impl BodyBudget {
    pub fn new(bytes: u64) -> Self {
        let bytes = usize::try_from(bytes).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        Self { room: Arc::new(Semaphore::new(bytes)) }
    }

    /// Bytes free now.
    pub fn available(&self) -> usize {
        self.room.available_permits()
    }

    /// An empty share of the budget, grown as a body arrives, each time waiting up to `wait`
    /// for room.
    pub fn lease(&self, wait: Duration) -> BodyLease {
        BodyLease { room: Arc::clone(&self.room), bytes: 0, wait, waited: false }
    }
}

/// Room held by one request's body, given back when dropped.
#[derive(Debug)]
pub struct BodyLease {
    room: Arc<Semaphore>,
    bytes: u64,
    wait: Duration,
    /// Whether this body had to wait for room (counted once per request).
    pub waited: bool,
}

impl BodyLease {
    /// Takes `bytes` more: at once when free, else waiting for room up to the lease's wait.
    pub async fn grow(&mut self, bytes: u64) -> Result<(), GatewayError> {
        let mut left = bytes;
        while left > 0 {
            let piece = u32::try_from(left).unwrap_or(u32::MAX);
            let permit = match self.room.try_acquire_many(piece) {
                Ok(permit) => permit,
                Err(_) => {
                    self.waited = true;
                    match tokio::time::timeout(self.wait, self.room.acquire_many(piece)).await {
                        Ok(Ok(permit)) => permit,
                        _ => return Err(GatewayError::Overloaded),
                    }
                }
            };
            // Given back by hand in `drop`: one counter instead of a permit per frame.
            permit.forget();
            self.bytes += u64::from(piece);
            left -= u64::from(piece);
        }
        Ok(())
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for BodyLease {
    fn drop(&mut self) {
        let bytes = usize::try_from(self.bytes).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        if bytes > 0 {
            self.room.add_permits(bytes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(5);

    #[tokio::test(start_paused = true)]
    async fn bodies_share_the_budget_and_give_it_back() {
        let budget = BodyBudget::new(100);
        let mut a = budget.lease(WAIT);
        a.grow(60).await.unwrap();
        a.grow(30).await.unwrap();
        assert_eq!((a.bytes(), budget.available()), (90, 10));
        let mut b = budget.lease(WAIT);
        let waiting = tokio::spawn(async move {
            let result = b.grow(50).await;
            (result.is_ok(), b.waited, b.bytes())
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        drop(a);
        assert_eq!(waiting.await.unwrap(), (true, true, 50));
        assert_eq!(budget.available(), 100, "b's room came back when it was dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_cannot_get_room_in_time_is_refused() {
        let budget = BodyBudget::new(100);
        let mut a = budget.lease(WAIT);
        a.grow(100).await.unwrap();
        let mut b = budget.lease(WAIT);
        assert!(matches!(b.grow(1).await, Err(GatewayError::Overloaded)));
        assert_eq!(budget.available(), 0);
        drop(a);
        assert_eq!(budget.available(), 100);
    }
}
