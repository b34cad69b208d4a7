//! Talking to backends: `body` (bounded read, head peek), `forward` (the upstream request,
//! header rules, the model splice, sending with timeouts) and `client` (pooled hyper clients
//! with rustls).

pub mod body;
pub mod client;
pub mod forward;
