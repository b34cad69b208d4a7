//! The load generator: closed loop (a fixed number of clients, each sending its next request
//! when the last is answered), open loop (requests sent on a fixed schedule, each timed from
//! when it was *due*, so a slow server cannot hide its queue: no coordinated omission), and
//! streams (time to first byte, the events each stream carries, the gaps between them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::task::JoinSet;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client with keep-alive connections (as many as there are requests in flight).
pub fn http1_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(usize::MAX).build(connector)
}

/// An h2 client over cleartext (prior knowledge): many streams per connection.
pub fn http2_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).http2_only(true).build(connector)
}

/// What requests look like: where they go, which model, which keys take turns.
pub struct Requests {
    pub url: String,
    pub model: &'static str,
    pub stream: bool,
    pub keys: Arc<Vec<String>>,
}

impl Requests {
    fn build(&self, n: usize) -> Request<Full<Bytes>> {
        let body = format!(
            r#"{{"model":"{}","messages":[{{"role":"user","content":"Say something about load balancers."}}],"max_tokens":128,"stream":{}}}"#,
            self.model, self.stream
        );
        let key = &self.keys[n % self.keys.len()];
        Request::post(&self.url)
            .header("content-type", "application/json")
            .header("authorization", key.as_str())
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
    }
}

/// Everything one run measured.
#[derive(Clone)]
pub struct Measured {
    pub ok: u64,
    pub errors: u64,
    pub seconds: f64,
    /// Whole request (non-stream) or whole stream, µs.
    pub latency: Histogram<u64>,
    /// Streams: to the first body byte, µs.
    pub ttfb: Histogram<u64>,
    /// Streams: between consecutive frames, µs.
    pub gaps: Histogram<u64>,
    /// Streams that carried exactly the expected number of events.
    pub complete_streams: u64,
}

/// Microseconds from 1 µs to 10 minutes at 2 significant digits (1 % resolution): small
/// enough for one per client even at 1,000 clients.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 2)
        .unwrap_or_else(|_| Histogram::new(2).unwrap_or_else(|_| unreachable!()))
}

impl Measured {
    fn new() -> Self {
        Self {
            ok: 0,
            errors: 0,
            seconds: 0.0,
            latency: histogram(),
            ttfb: histogram(),
            gaps: histogram(),
            complete_streams: 0,
        }
    }

    fn merge(&mut self, other: &Measured) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.complete_streams += other.complete_streams;
        let _ = self.latency.add(&other.latency);
        let _ = self.ttfb.add(&other.ttfb);
        let _ = self.gaps.add(&other.gaps);
    }

    pub fn throughput(&self) -> f64 {
        if self.seconds > 0.0 { self.ok as f64 / self.seconds } else { 0.0 }
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().clamp(1, 600_000_000) as u64
}

/// One request, read to its end; for streams the frame timing and the count of SSE events.
async fn exchange(
    client: &HttpClient,
    request: Request<Full<Bytes>>,
    due: Instant,
    expected_events: usize,
    m: &mut Measured,
) {
    let response = match client.request(request).await {
        Ok(response) => response,
        Err(_) => {
            m.errors += 1;
            return;
        }
    };
    let ok = response.status() == StatusCode::OK;
    let mut body = response.into_body();
    let (mut events, mut last_byte, mut previous) = (0usize, 0u8, None::<Instant>);
    let mut failed = false;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            failed = true;
            break;
        };
        let Ok(data) = frame.into_data() else { continue };
        let now = Instant::now();
        match previous {
            None => {
                let _ = m.ttfb.record(micros(now - due));
            }
            Some(before) => {
                let _ = m.gaps.record(micros(now - before));
            }
        }
        previous = Some(now);
        // Count blank lines, also when one is cut between two frames.
        for &b in data.iter() {
            if b == b'\n' && last_byte == b'\n' {
                events += 1;
            }
            last_byte = b;
        }
    }
    if !ok || failed {
        m.errors += 1;
        return;
    }
    m.ok += 1;
    let _ = m.latency.record(micros(due.elapsed()));
    if expected_events > 0 && events == expected_events {
        m.complete_streams += 1;
    }
}

/// `concurrency` clients, each sending requests back to back for `duration`.
pub async fn closed_loop(
    client: &HttpClient,
    requests: Arc<Requests>,
    concurrency: usize,
    duration: Duration,
    expected_events: usize,
) -> Measured {
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for worker in 0..concurrency {
        let (client, requests) = (client.clone(), Arc::clone(&requests));
        tasks.spawn(async move {
            let mut m = Measured::new();
            let mut n = worker;
            while Instant::now() < deadline {
                let due = Instant::now();
                exchange(&client, requests.build(n), due, expected_events, &mut m).await;
                n += concurrency;
            }
            m
        });
    }
    let mut total = Measured::new();
    while let Some(result) = tasks.join_next().await {
        if let Ok(m) = result {
            total.merge(&m);
        }
    }
    total.seconds = start.elapsed().as_secs_f64();
    total
}

/// Requests due at `rate` per second for `duration`, each timed from when it was due.
///
/// A separate thread keeps the schedule with `nanosleep` (tens of microseconds late at most):
/// tokio's timer ticks in milliseconds, and spinning instead would take the core from the
/// nim-sim it shares, which would then answer late for every target alike.
pub async fn open_loop(client: &HttpClient, requests: Arc<Requests>, rate: u64, duration: Duration) -> Measured {
    let start = Instant::now();
    let count = (rate as f64 * duration.as_secs_f64()) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let (due_tx, mut due_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let pacer = std::thread::spawn(move || {
        for n in 0..count {
            let due = start + interval * n as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if due_tx.send((n, due)).is_err() {
                break;
            }
        }
    });
    // Each request reports only its latency (a `Measured` holds histograms of ~0.7 MB, far too
    // big to make one per request at thousands per second).
    let mut tasks = JoinSet::new();
    while let Some((n, due)) = due_rx.recv().await {
        let (client, request) = (client.clone(), requests.build(n));
        tasks.spawn(async move { exchange_latency(&client, request, due).await });
    }
    let _ = pacer.join();
    let mut total = Measured::new();
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Some(latency)) => {
                total.ok += 1;
                let _ = total.latency.record(latency);
            }
            _ => total.errors += 1,
        }
    }
    total.seconds = start.elapsed().as_secs_f64();
    total
}

/// One non-streaming request read to its end: its latency from `due` in µs, or `None`.
async fn exchange_latency(client: &HttpClient, request: Request<Full<Bytes>>, due: Instant) -> Option<u64> {
    let response = client.request(request).await.ok()?;
    let ok = response.status() == StatusCode::OK;
    response.into_body().collect().await.ok()?;
    ok.then(|| micros(due.elapsed()))
}

/// Opens `count` streams over `client` and holds them until each has sent its first event;
/// returns the open bodies (dropping them closes the streams) and how many failed.
pub async fn hold_streams(
    client: &HttpClient,
    requests: Arc<Requests>,
    count: usize,
) -> (Vec<hyper::body::Incoming>, usize) {
    let mut tasks = JoinSet::new();
    for n in 0..count {
        let (client, request) = (client.clone(), requests.build(n));
        tasks.spawn(async move {
            let response = client.request(request).await.ok()?;
            // An error answer (a 429, a 503) has a body too: only a stream counts as held.
            if response.status() != hyper::StatusCode::OK {
                return None;
            }
            let mut body = response.into_body();
            body.frame().await?.ok()?;
            Some(body)
        });
    }
    let (mut open, mut failed) = (Vec::with_capacity(count), 0);
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(Some(body)) => open.push(body),
            _ => failed += 1,
        }
    }
    (open, failed)
}
