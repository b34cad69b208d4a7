//! `GET /v1/models`: the models a key may use, in OpenAI's list shape. Exact routes name their
//! model; a glob route lists what its backends report under `/v1/models` that the glob sends
//! to it. Backend answers are cached for a few seconds per snapshot, because SDKs and UIs poll
//! this endpoint and it must not turn into a fan-out storm on the backends: concurrent requests
//! that find no fresh list share one fetch.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;
use tokio::sync::OnceCell;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::api::Endpoint;
use crate::auth::Key;
use crate::config::Snapshot;
use crate::upstream::Backend;
use crate::upstream::headers::{self, X_REQUEST_ID};
use crate::upstream::send_one;

/// How long backend model lists are reused.
const CACHE_TTL: Duration = Duration::from_secs(10);
/// A backend that does not list its models within this is left out of the answer.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_LIST_BYTES: usize = 4 * 1024 * 1024;

/// The routed model ids of the current snapshot, with a short-lived cache.
#[derive(Debug)]
pub struct Catalog {
    created: u64,
    cache: Mutex<Option<Cached>>,
}

#[derive(Debug)]
struct Cached {
    snapshot: Weak<Snapshot>,
    /// When its fetch began.
    at: Instant,
    /// Filled by the first request to get here; the others wait for that fetch.
    ids: Arc<OnceCell<Arc<[String]>>>,
}

impl Default for Catalog {
    fn default() -> Self {
        let created = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self { created, cache: Mutex::new(None) }
    }
}

impl Catalog {
    /// The JSON body listing the models `key` may use.
    pub async fn list(&self, snapshot: &Arc<Snapshot>, key: &Key, request_id: &HeaderValue) -> Bytes {
        let cell = self.entry(snapshot);
        let ids = cell.get_or_init(|| async { routed_models(snapshot, request_id).await.into() }).await;
        let data: Vec<serde_json::Value> = ids
            .iter()
            .filter(|id| key.allows(id))
            .map(|id| {
                let owned_by = id.split_once('/').map_or("nimgate", |(org, _)| org);
                serde_json::json!({ "id": id, "object": "model", "created": self.created, "owned_by": owned_by })
            })
            .collect();
        Bytes::from(serde_json::json!({ "object": "list", "data": data }).to_string())
    }

    /// The list of `snapshot` that is fresh, or a new one to fill. The lock is held only to
    /// look and swap: the fetch is awaited outside it.
    fn entry(&self, snapshot: &Arc<Snapshot>) -> Arc<OnceCell<Arc<[String]>>> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(cached) = cache.as_ref() {
            if Weak::ptr_eq(&cached.snapshot, &Arc::downgrade(snapshot)) && cached.at.elapsed() < CACHE_TTL {
                return Arc::clone(&cached.ids);
            }
        }
        let ids = Arc::new(OnceCell::new());
        *cache = Some(Cached { snapshot: Arc::downgrade(snapshot), at: Instant::now(), ids: Arc::clone(&ids) });
        ids
    }
}

/// Every model id the snapshot routes: exact routes first, in config order, then the ids
/// glob routes' backends report that the glob routes to that very route.
async fn routed_models(snapshot: &Snapshot, request_id: &HeaderValue) -> Vec<String> {
    let mut ids: Vec<String> = snapshot.routes.iter().filter_map(|r| r.exact_model().map(str::to_owned)).collect();

    let mut backends: Vec<Arc<Backend>> = Vec::new();
    for route in snapshot.routes.iter().filter(|r| r.exact_model().is_none()) {
        for backend in route.pool.members().all() {
            if !backends.iter().any(|b| Arc::ptr_eq(b, backend)) {
                backends.push(Arc::clone(backend));
            }
        }
    }
    let mut fetches = JoinSet::new();
    for backend in backends {
        let request_id = request_id.clone();
        fetches.spawn(async move { fetch_models(&backend, request_id).await });
    }
    let mut reported: Vec<String> = Vec::new();
    while let Some(result) = fetches.join_next().await {
        reported.extend(result.unwrap_or_default());
    }
    reported.sort_unstable();
    reported.dedup();
    for id in reported {
        let served_by_glob = snapshot.routes.find(&id).is_some_and(|route| route.exact_model().is_none());
        if served_by_glob && !ids.contains(&id) {
            ids.push(id);
        }
    }
    ids
}

#[derive(Deserialize)]
struct ModelList {
    data: Vec<ModelEntry>,
}

#[derive(Deserialize)]
struct ModelEntry {
    id: String,
}

/// The ids a backend lists; empty (and logged) when it cannot say in time.
async fn fetch_models(backend: &Backend, request_id: HeaderValue) -> Vec<String> {
    let mut ours = HeaderMap::new();
    ours.insert(X_REQUEST_ID, request_id);
    let request = headers::request(backend, Endpoint::Models, ours, Bytes::new());
    let fetch = async {
        let (response, _lease) = send_one(backend, request, None).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("status {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_LIST_BYTES).collect().await.map_err(|e| e.to_string())?;
        serde_json::from_slice::<ModelList>(&body.to_bytes()).map_err(|e| format!("not a model list: {e}"))
    };
    match tokio::time::timeout(FETCH_TIMEOUT, fetch).await {
        Ok(Ok(list)) => list.data.into_iter().map(|m| m.id).collect(),
        Ok(Err(e)) => {
            tracing::warn!(backend = %backend.name, error = %e, "could not list the backend's models");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!(backend = %backend.name, "backend did not list its models within {FETCH_TIMEOUT:?}");
            Vec::new()
        }
    }
}
