//! Everything about talking to backends, and nothing about the client's request beyond the
//! bytes and headers handed in: where a request can go and what happens when it gets there.
//!
//! - `backend`: one configured backend and what is built once for it (URIs, credential);
//!   `discovery`: a group of backends, one per address its host name resolves to.
//! - `registry`: backends built from validated settings, keeping live parts across reloads.
//! - `pool`: a route's backends, the wait queue and the fallback order; `balance`: the power
//!   of two choices among them; `affinity`: prefix affinity, the other strategy; `fair`: the
//!   order of the wait queue (weighted fair queueing by key); `prefix`: prompts in chained
//!   blocks and the table of those each backend was sent.
//! - `health`: what is learnt about a backend while it runs (in flight, ejection, health
//!   check, NIM load) and `observe`, the one writer of passive health; `probe`: the active
//!   health check and NIM load scrape.
//! - `retry`: the send loop (attempts, retries, outcomes); `budget`: the retry budget.
//! - `headers`: what crosses to and from a backend; `client` and `connections`: the
//!   connections themselves; `error`: why a connection brought no answer.

pub mod affinity;
pub mod backend;
pub mod balance;
pub mod budget;
pub mod client;
pub mod connections;
pub mod discovery;
pub mod error;
pub mod fair;
pub mod headers;
pub mod health;
pub mod pool;
pub mod prefix;
pub mod probe;
pub mod registry;
pub mod retry;

pub use affinity::{AffinitySettings, Decision};
pub use backend::{Backend, BackendName, HealthCheck, LoadMetrics, Timeouts};
pub use balance::MAX_POOL_MEMBERS;
pub use connections::Lease;
pub use discovery::{Discovery, Group};
pub use error::root_cause;
pub use health::{EjectionPolicy, FailureKind, Outcome};
pub use pool::{Balancing, Members, Pick, Pool, PoolEntry, Slot, Strategy};
pub use prefix::PromptBlocks;
pub use retry::{Answer, AttemptError, Outgoing, UpstreamBody, UpstreamError, send, send_one};
