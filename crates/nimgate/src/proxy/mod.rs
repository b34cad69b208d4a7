//! Talking to backends: `body` (bounded read, head peek), `forward` (the upstream request,
//! header rules, the model splice, sending with timeouts), `client` (a backend's client) and
//! `connections` (keep-alive HTTP/1.1 connections to plain-http backends).

pub mod body;
pub mod client;
pub mod connections;
pub mod forward;
