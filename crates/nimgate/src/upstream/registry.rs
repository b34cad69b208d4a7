//! Live backends carried across reloads. A backend's live parts (its connections, in-flight
//! count, ejection and health) must survive a reload that leaves it alone, or every reload would
//! drop connections and forget which backend is failing. A new snapshot's backend therefore
//! takes them from the backend of the same name in force:
//! - unchanged settings: the very same `Backend` is kept;
//! - the same server reached the same way (URL, credential, CA certificates, timeouts) with new
//!   tuning (weight, concurrency cap, probes, ejection policy): a new `Backend` sharing the old
//!   one's client and state, so a new weight cannot overshoot `max_concurrency` while older
//!   requests still hold slots;
//! - anything else: a new `Backend` with its own client and fresh state.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use http::{HeaderValue, Uri};
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};

use super::backend::{Backend, BackendName, EndpointUris, HealthCheck, LoadMetrics, Timeouts};
use super::client;
use super::health::EjectionPolicy;

/// A backend's validated settings: everything but its live parts.
#[derive(Debug, Clone)]
pub struct BackendSettings {
    pub name: BackendName,
    /// As configured, for logs and errors.
    pub url: String,
    pub base: Uri,
    /// `Authorization: Bearer ...`, marked sensitive.
    pub auth: Option<HeaderValue>,
    /// CA certificates trusted for this (https) backend besides the webpki roots.
    pub extra_ca: Option<Vec<CertificateDer<'static>>>,
    pub weight: u32,
    pub max_concurrency: Option<u32>,
    pub stream_usage: bool,
    pub health_check: Option<HealthCheck>,
    pub load_metrics: Option<LoadMetrics>,
    pub timeouts: Timeouts,
    pub ejection: EjectionPolicy,
}

impl BackendSettings {
    /// Settings named `name` at `url`, every other field at its default, for unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(name: &str, url: &str) -> Self {
        Self {
            name: BackendName::new(name),
            url: url.to_owned(),
            base: url.parse().expect("test URL"),
            auth: None,
            extra_ca: None,
            weight: 1,
            max_concurrency: None,
            stream_usage: true,
            health_check: None,
            load_metrics: None,
            timeouts: Timeouts::DEFAULT,
            ejection: EjectionPolicy::DEFAULT,
        }
    }
}

/// Why a backend could not be built from valid-looking settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildError {
    /// Its URL cannot take the API paths, or its host is unusable.
    Url(String),
    /// A CA certificate of `ca_file` was refused.
    CaFile(String),
}

/// The backend for `settings`, taking its live parts from the backend of the same name in
/// `in_force` where the settings allow (see the module doc).
pub fn build(settings: BackendSettings, in_force: &[Arc<Backend>]) -> Result<Arc<Backend>, BuildError> {
    let identity = identity(&settings);
    let fingerprint = fingerprint(&identity, &settings);
    let previous = in_force.iter().find(|old| old.name == settings.name);
    if let Some(same) = previous.filter(|old| old.fingerprint == fingerprint) {
        return Ok(Arc::clone(same));
    }
    let carried = previous.filter(|old| old.identity == identity);
    let uris =
        EndpointUris::new(&settings.base).map_err(|e| BuildError::Url(format!("cannot append API paths: {e}")))?;
    let client = match carried {
        Some(old) => old.client.clone(),
        None => {
            client::build(&settings.base, settings.timeouts.connect, settings.extra_ca.as_deref()).map_err(|e| {
                if settings.base.scheme_str() == Some("https") { BuildError::CaFile(e) } else { BuildError::Url(e) }
            })?
        }
    };
    Ok(Arc::new(Backend {
        fingerprint,
        identity,
        name: settings.name,
        url: settings.url,
        uris,
        auth: settings.auth,
        weight: settings.weight,
        max_concurrency: settings.max_concurrency,
        stream_usage: settings.stream_usage,
        health_check: settings.health_check,
        load_metrics: settings.load_metrics,
        timeouts: settings.timeouts,
        ejection: settings.ejection,
        client,
        state: carried.map_or_else(Arc::default, |old| Arc::clone(&old.state)),
        probes_started: AtomicBool::new(false),
    }))
}

/// What makes a backend the same server reached the same way: its URL, the credential and CA
/// certificates its settings resolved to, and its timeouts.
fn identity(settings: &BackendSettings) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(&settings.url);
    hash.update([0]);
    hash.update(settings.auth.as_ref().map_or(&[][..], HeaderValue::as_bytes));
    for cert in settings.extra_ca.as_deref().unwrap_or_default() {
        hash.update(cert.as_ref());
    }
    hash.update(format!("{:?}", settings.timeouts));
    hash.finalize().into()
}

/// What makes backends of these settings the same backend (a group's members have it in
/// common): their identity and their tuning.
pub fn settings_fingerprint(settings: &BackendSettings) -> [u8; 32] {
    fingerprint(&identity(settings), settings)
}

/// What makes a backend the same backend: its identity and its tuning.
fn fingerprint(identity: &[u8; 32], s: &BackendSettings) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(identity);
    hash.update(format!(
        "{:?}",
        (s.weight, s.max_concurrency, s.stream_usage, &s.health_check, &s.load_metrics, &s.ejection)
    ));
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn settings(url: &str, weight: u32) -> BackendSettings {
        BackendSettings { weight, ..BackendSettings::for_tests("a", url) }
    }

    #[test]
    fn unchanged_settings_keep_the_backend_and_new_tuning_keeps_its_live_parts() {
        let first = build(settings("http://127.0.0.1:8000", 1), &[]).unwrap();
        first.state.try_take_slot(None);
        let in_force = [Arc::clone(&first)];
        assert!(Arc::ptr_eq(&build(settings("http://127.0.0.1:8000", 1), &in_force).unwrap(), &first));

        let retuned = build(settings("http://127.0.0.1:8000", 3), &in_force).unwrap();
        assert!(!Arc::ptr_eq(&retuned, &first));
        assert!(Arc::ptr_eq(&retuned.state, &first.state), "in-flight count and health carry over");
        assert_eq!(retuned.state.inflight(), 1);

        let moved = build(settings("http://127.0.0.1:8001", 1), &in_force).unwrap();
        assert!(!Arc::ptr_eq(&moved.state, &first.state), "another server starts afresh");
        assert_eq!(moved.state.inflight(), 0);

        let mut slower = settings("http://127.0.0.1:8000", 1);
        slower.timeouts.first_byte = Duration::from_secs(1);
        assert!(!Arc::ptr_eq(&build(slower, &in_force).unwrap().state, &first.state), "timeouts are identity");
    }
}
