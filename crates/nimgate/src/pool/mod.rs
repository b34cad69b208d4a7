//! Backend pools: which backend of a route gets a request, and in what order the others are
//! tried when one cannot be reached. For now a plain round robin over the route's backends,
//! then its `fallback` backends in config order (the real balancer, health and retry budget
//! come with #7).

mod backend;

pub use backend::{Backend, BackendName, EndpointUris, Probe, Timeouts};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The backends of one route.
#[derive(Debug, Default)]
pub struct Pool {
    primary: Vec<Arc<Backend>>,
    fallback: Vec<Arc<Backend>>,
    next: AtomicUsize,
}

impl Pool {
    pub fn new(primary: Vec<Arc<Backend>>, fallback: Vec<Arc<Backend>>) -> Self {
        Self { primary, fallback, next: AtomicUsize::new(0) }
    }

    /// The order in which to try backends for one request: the primary pool starting at the
    /// round-robin position (each request advances it by one), then the fallback pool.
    pub fn candidates(&self) -> impl Iterator<Item = &Arc<Backend>> {
        let n = self.primary.len();
        let start = if n > 1 { self.next.fetch_add(1, Ordering::Relaxed) % n } else { 0 };
        (0..n).map(move |i| &self.primary[(start + i) % n]).chain(self.fallback.iter())
    }

    pub fn primary(&self) -> &[Arc<Backend>] {
        &self.primary
    }

    pub fn fallback(&self) -> &[Arc<Backend>] {
        &self.fallback
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::raw::RawBackend;

    fn backend(name: &str) -> Arc<Backend> {
        let raw = RawBackend { name: name.into(), url: "http://127.0.0.1:1".into(), ..Default::default() };
        Arc::new(Backend::for_tests(&raw))
    }

    fn order(pool: &Pool) -> Vec<String> {
        pool.candidates().map(|b| b.name.to_string()).collect()
    }

    #[test]
    fn round_robin_rotates_the_primary_then_falls_back() {
        let pool = Pool::new(vec![backend("a"), backend("b"), backend("c")], vec![backend("h")]);
        assert_eq!(order(&pool), ["a", "b", "c", "h"]);
        assert_eq!(order(&pool), ["b", "c", "a", "h"]);
        assert_eq!(order(&pool), ["c", "a", "b", "h"]);
        assert_eq!(order(&pool), ["a", "b", "c", "h"]);
    }

    #[test]
    fn a_single_backend_pool_always_starts_with_it() {
        let pool = Pool::new(vec![backend("a")], vec![]);
        assert_eq!(order(&pool), ["a"]);
        assert_eq!(order(&pool), ["a"]);
    }
}
