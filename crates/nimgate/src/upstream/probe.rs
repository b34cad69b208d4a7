//! Background probes of a backend, one task each, alive as long as the backend is: the
//! active health check (`health_check`: unhealthy after N failed probes in a row, healthy
//! again after M passed ones) and the scrape of NIM's own load figures (`load_metrics`).
//! Intervals carry ±10 % jitter so that replicas and backends do not probe in lockstep.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full, Limited};

use super::backend::{Backend, HealthCheck, LoadMetrics, join};
use super::balance::random;
use super::error::ClientError;
use super::health::{FailureKind, NimLoad};

/// A metrics page larger than this is not NIM's.
const MAX_METRICS_BYTES: usize = 4 << 20;

/// Starts the probes `backends` have configured, on the current tokio runtime (none outside
/// one, as in `check-config`). A backend kept from an earlier snapshot keeps its running ones.
pub fn start(backends: &[Arc<Backend>]) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    for backend in backends {
        if backend.probes_started.swap(true, Ordering::AcqRel) {
            continue;
        }
        // A backend replaced for a change of tuning shares its state with this one: from now
        // on only this one's probes (with its settings) write to it, and what a probe no
        // longer configured had found stops counting.
        let generation = backend.state.take_probes();
        match backend.health_check.clone() {
            Some(check) => drop(runtime.spawn(health_loop(Arc::downgrade(backend), check, generation, false))),
            None => backend.state.set_healthy(true),
        }
        match backend.load_metrics.clone() {
            Some(metrics) => drop(runtime.spawn(load_loop(Arc::downgrade(backend), metrics, generation))),
            None => backend.state.set_nim_load(None, false),
        }
    }
}

/// Starts the probes of a group member that has just appeared: with a health check, it takes
/// no request until its first check passes, which is made at once.
pub fn start_member(member: &Arc<Backend>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
    if member.health_check.is_none() || member.probes_started.swap(true, Ordering::AcqRel) {
        return start(std::slice::from_ref(member));
    }
    member.state.set_healthy(false);
    let generation = member.state.take_probes();
    if let Some(check) = member.health_check.clone() {
        drop(runtime.spawn(health_loop(Arc::downgrade(member), check, generation, true)));
    }
    match member.load_metrics.clone() {
        Some(metrics) => drop(runtime.spawn(load_loop(Arc::downgrade(member), metrics, generation))),
        None => member.state.set_nim_load(None, false),
    }
}

/// The backend while its probes of `generation` should go on.
fn probing(backend: &Weak<Backend>, generation: u64) -> Option<Arc<Backend>> {
    backend.upgrade().filter(|b| b.state.probes_current(generation))
}

/// `joining`: a new group member, out of rotation until its first check, made at once, passes.
async fn health_loop(backend: Weak<Backend>, check: HealthCheck, generation: u64, mut joining: bool) {
    let Some(uri) = probe_uri(&backend, &check.path) else { return };
    let (mut passed, mut failed) = (0u32, 0u32);
    // The first probe at a random point of the first interval: backends configured together
    // do not all get probed in the same instant.
    if !joining {
        tokio::time::sleep(check.interval.mul_f64(random() as f64 / u64::MAX as f64)).await;
    }
    loop {
        let Some(backend) = probing(&backend, generation) else { return };
        match get(&backend, &uri, check.timeout).await {
            Ok(_) => {
                passed += 1;
                failed = 0;
                if std::mem::take(&mut joining) {
                    backend.state.set_healthy(true);
                } else if !backend.state.is_healthy() && passed >= check.healthy_after {
                    tracing::info!(backend = %backend.name, "health check passing again: backend back in rotation");
                    backend.state.set_healthy(true);
                }
            }
            Err(cause) => {
                failed += 1;
                passed = 0;
                if backend.state.is_healthy() && failed >= check.unhealthy_after {
                    tracing::warn!(
                        backend = %backend.name, %cause, failures = failed,
                        "health check failing: backend out of rotation"
                    );
                    backend.state.set_healthy(false);
                }
                backend.state.remember(FailureKind::HealthCheck, &cause);
            }
        }
        drop(backend);
        tokio::time::sleep(jitter(check.interval)).await;
    }
}

async fn load_loop(backend: Weak<Backend>, metrics: LoadMetrics, generation: u64) {
    let Some(uri) = probe_uri(&backend, &metrics.path) else { return };
    let timeout = metrics.interval.min(Duration::from_secs(5));
    loop {
        let Some(backend) = probing(&backend, generation) else { return };
        match get(&backend, &uri, timeout).await.and_then(|page| parse_nim_load(&page)) {
            Ok(load) => {
                let full = load.waiting > metrics.max_waiting || load.kv_cache_usage > metrics.max_kv_cache_usage;
                if full != backend.state.is_full_by_load() {
                    tracing::info!(
                        backend = %backend.name, waiting = load.waiting, running = load.running,
                        kv_cache_usage = load.kv_cache_usage, full, "NIM load crossed its threshold"
                    );
                }
                backend.state.set_nim_load(Some(load), full);
            }
            Err(cause) => {
                // Unknown load is not a reason to refuse traffic; passive checks still apply.
                tracing::debug!(backend = %backend.name, %cause, "cannot read NIM load metrics");
                backend.state.set_nim_load(None, false);
            }
        }
        drop(backend);
        tokio::time::sleep(jitter(metrics.interval)).await;
    }
}

fn probe_uri(backend: &Weak<Backend>, path: &str) -> Option<Uri> {
    let backend = backend.upgrade()?;
    let base: Uri = backend.url.parse().ok()?;
    match join(&base, path) {
        Ok(uri) => Some(uri),
        Err(e) => {
            tracing::error!(backend = %backend.name, path, error = %e, "cannot build the probe URL; probe disabled");
            None
        }
    }
}

/// GET `uri` on the backend's own client (its credential included), expecting a 2xx.
async fn get(backend: &Backend, uri: &Uri, timeout: Duration) -> Result<Bytes, String> {
    let mut request = Request::new(Full::new(Bytes::new()));
    *request.method_mut() = Method::GET;
    *request.uri_mut() = uri.clone();
    if let Some(auth) = &backend.auth {
        request.headers_mut().insert(http::header::AUTHORIZATION, auth.clone());
    }
    let exchange = async {
        let (response, _lease) = backend.client.send(request).await.map_err(|e| match e {
            ClientError::Connect(cause) | ClientError::Failed(cause) => cause,
        })?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_METRICS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        if status.is_success() { Ok(body) } else { Err(format!("{} answered {status}", uri.path())) }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or_else(|_| Err(format!("{} did not answer within {timeout:?}", uri.path())))
}

fn jitter(interval: Duration) -> Duration {
    interval.mul_f64(0.9 + 0.2 * (random() as f64 / u64::MAX as f64))
}

/// NIM's load from its Prometheus page, in either dialect: NIM 1.x's own names
/// (`num_requests_running`, `num_requests_waiting`, `gpu_cache_usage_perc`) or NIM 2.x's,
/// which pass the engine's through (`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` or
/// `vllm:gpu_cache_usage_perc`; SGLang's `sglang:num_queue_reqs`, `sglang:num_running_reqs`,
/// `sglang:token_usage`). Each figure is summed over a dialect's series (one per model); when
/// a page reports a figure in several dialects, NIM's own name counts, else the first
/// engine's, so that one queue reported twice is not counted twice. KV-cache use is the
/// highest reported, as a fraction. A page without a waiting count is not an inference
/// server's.
pub fn parse_nim_load(page: &[u8]) -> Result<NimLoad, String> {
    let text = std::str::from_utf8(page).map_err(|_| "the metrics page is not UTF-8".to_owned())?;
    // Per dialect (NIM's own, vllm and other engines, sglang): running and waiting, if seen.
    let mut running = [None::<u64>; 3];
    let mut waiting = [None::<u64>; 3];
    let mut kv_cache_usage: f64 = 0.0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let (prefix, name) = line[..name_end].rsplit_once(':').unwrap_or(("", &line[..name_end]));
        // `name{labels} value [timestamp]`: the value is the first field after the labels.
        let rest = &line[name_end..];
        let rest = if rest.starts_with('{') { rest.rsplit_once('}').map_or("", |(_, r)| r) } else { rest };
        let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        if !value.is_finite() || value < 0.0 {
            continue;
        }
        let dialect = match prefix {
            "" => 0,
            "sglang" => 2,
            _ => 1,
        };
        // `as` saturates a float beyond u64; the sums saturate too (a server may report anything).
        let add = |sum: &mut Option<u64>| *sum = Some(sum.unwrap_or(0).saturating_add(value as u64));
        match (dialect, name) {
            (0 | 1, "num_requests_running") | (2, "num_running_reqs") => add(&mut running[dialect]),
            (0 | 1, "num_requests_waiting") | (2, "num_queue_reqs") => add(&mut waiting[dialect]),
            (0 | 1, "gpu_cache_usage_perc" | "kv_cache_usage_perc") | (2, "token_usage") => {
                let fraction = if value > 1.0 { value / 100.0 } else { value };
                kv_cache_usage = kv_cache_usage.max(fraction);
            }
            _ => {}
        }
    }
    let first = |figures: [Option<u64>; 3]| figures.into_iter().flatten().next();
    match first(waiting) {
        Some(waiting) => Ok(NimLoad { running: first(running).unwrap_or(0), waiting, kv_cache_usage }),
        None => Err("no waiting-request count (num_requests_waiting, num_queue_reqs) on the metrics page".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absurd_figures_saturate() {
        let load = parse_nim_load(b"num_requests_waiting 1e300\nnum_requests_waiting 18446744073709551615\n").unwrap();
        assert_eq!(load.waiting, u64::MAX);
    }

    #[test]
    fn reads_nim_and_vllm_style_pages() {
        let page = b"# HELP num_requests_running Number of requests running.\n\
            # TYPE num_requests_running gauge\n\
            num_requests_running{model_name=\"a\"} 3\n\
            num_requests_running{model_name=\"b\"} 1\n\
            vllm:num_requests_waiting{model_name=\"a\"} 7 1700000000000\n\
            gpu_cache_usage_perc{model_name=\"a\"} 0.42\n\
            gpu_cache_usage_perc{model_name=\"b\"} 0.9\n";
        let load = parse_nim_load(page).unwrap();
        assert_eq!(load, NimLoad { running: 4, waiting: 7, kv_cache_usage: 0.9 });
    }

    #[test]
    fn reads_nim_2_pages_of_vllm_v1_and_sglang() {
        let vllm_v1 = b"vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 5.0\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 12.0\n\
            vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.97\n";
        assert_eq!(parse_nim_load(vllm_v1).unwrap(), NimLoad { running: 5, waiting: 12, kv_cache_usage: 0.97 });
        let sglang = b"sglang:num_running_reqs{model_name=\"m\"} 8\n\
            sglang:num_queue_reqs{model_name=\"m\"} 3\n\
            sglang:token_usage{model_name=\"m\"} 0.5\n\
            token_usage 0.99\n";
        assert_eq!(
            parse_nim_load(sglang).unwrap(),
            NimLoad { running: 8, waiting: 3, kv_cache_usage: 0.5 },
            "an unprefixed token_usage is nobody's KV cache"
        );
    }

    #[test]
    fn a_queue_reported_in_two_dialects_counts_once() {
        let both = b"num_requests_waiting 4\nvllm:num_requests_waiting 4\nnum_requests_running 2\nvllm:num_requests_running 2\n";
        assert_eq!(parse_nim_load(both).unwrap(), NimLoad { running: 2, waiting: 4, kv_cache_usage: 0.0 });
        let engine_only = b"vllm:num_requests_waiting 6\nsglang:num_queue_reqs 1\n";
        assert_eq!(parse_nim_load(engine_only).unwrap().waiting, 6, "the first engine's, not the sum");
    }

    #[test]
    fn percentages_become_fractions_and_unlabelled_series_count() {
        let load = parse_nim_load(b"num_requests_waiting 2\ngpu_cache_usage_perc 85\n").unwrap();
        assert_eq!(load.waiting, 2);
        assert!((load.kv_cache_usage - 0.85).abs() < 1e-9);
    }

    #[test]
    fn a_page_without_the_queue_is_refused() {
        assert!(parse_nim_load(b"process_cpu_seconds_total 3\n").is_err());
        assert!(parse_nim_load(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..100 {
            let d = jitter(Duration::from_secs(10));
            assert!(d >= Duration::from_secs(9) && d <= Duration::from_secs(11));
        }
    }
}
