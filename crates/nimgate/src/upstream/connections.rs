//! Keep-alive HTTP/1.1 connections to one plain-http backend (a self-hosted NIM), over hyper's
//! connection API. hyper-util's pooled client costs every request a boxed connect future of
//! about 7 KB (allocated, copied and kept for the whole answer), a pool checkout and a second
//! task hand-off; here a request takes an idle connection off a list (or opens one), sends,
//! and gives the connection back when its answer's body is done, by dropping its `Lease`.
//!
//! - An idle connection the backend closed is skipped at checkout; one idle for longer than
//!   `IDLE_TIMEOUT` is closed there too.
//! - A request a reused connection could not even begin to send (it closed just then) goes
//!   out on another connection: the backend never saw it.
//! - A lease dropped before its answer was read through closes its connection (hyper cannot
//!   reuse it), which is how a client leaving stops the backend's work.
//! - No lock is held across an await: the idle list is taken and given back in two short
//!   critical sections.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::HOST;
use http::{HeaderValue, Request, Response, Uri};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::error::{ClientError, root_cause};

/// Idle connections are closed after this; NIM's own keep-alive is longer.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per backend; more than its peak concurrency is never useful.
const MAX_IDLE: usize = 1024;
/// TCP keep-alive probes on connections, so that a backend host gone silently is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// The connections of one backend. Clones share them.
#[derive(Clone)]
pub struct Connections {
    shared: Arc<Shared>,
}

struct Shared {
    /// `host:port`, to connect to.
    authority: Box<str>,
    /// The `Host` header of every request.
    host: HeaderValue,
    connect_timeout: Duration,
    /// Most recently returned last.
    idle: Mutex<Vec<Idle>>,
}

struct Idle {
    sender: SendRequest<Full<Bytes>>,
    since: Instant,
}

/// A connection lent to one answer; dropping it gives the connection back.
#[derive(Default)]
pub struct Lease {
    held: Option<(SendRequest<Full<Bytes>>, Arc<Shared>)>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some((sender, shared)) = self.held.take() {
            shared.give_back(sender);
        }
    }
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("held", &self.held.is_some()).finish()
    }
}

impl Connections {
    /// Connections to the `http` backend at `base` (its authority; the path is the request's).
    pub fn new(base: &Uri, connect_timeout: Duration) -> Result<Self, String> {
        let authority = base.authority().ok_or("the URL has no host")?;
        let port = base.port_u16().unwrap_or(80);
        let host = HeaderValue::from_str(authority.as_str()).map_err(|e| format!("invalid host: {e}"))?;
        let authority = format!("{}:{port}", authority.host()).into_boxed_str();
        Ok(Self { shared: Arc::new(Shared { authority, host, connect_timeout, idle: Mutex::new(Vec::new()) }) })
    }

    /// Sends `request` (its URI absolute or origin-form) on an idle connection or a new one.
    pub async fn send(&self, mut request: Request<Full<Bytes>>) -> Result<(Response<Incoming>, Lease), ClientError> {
        to_origin_form(&mut request, &self.shared.host);
        loop {
            let (mut sender, reused) = match self.shared.checkout() {
                Some(sender) => (sender, true),
                None => (self.connect().await?, false),
            };
            // A connection just given back may still be finishing its previous answer.
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(ClientError::Failed(root_cause(&e)));
            }
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, Lease { held: Some((sender, Arc::clone(&self.shared))) })),
                Err(mut e) => match e.take_message() {
                    // Not sent at all: the backend saw nothing, another connection may serve.
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(ClientError::Failed(root_cause(e.error()))),
                },
            }
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ClientError> {
        let shared = &self.shared;
        let stream = match tokio::time::timeout(shared.connect_timeout, TcpStream::connect(&*shared.authority)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Err(ClientError::Connect(e.to_string())),
            Err(_) => {
                let after = humantime::format_duration(shared.connect_timeout);
                return Err(ClientError::Connect(format!("no connection within {after}")));
            }
        };
        // Both are best effort: a socket without them still works.
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE).with_interval(TCP_KEEPALIVE / 3);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Connect(root_cause(&e)))?;
        tokio::spawn(async move {
            // Ends when the backend or nimgate closes the connection; errors are the answer's.
            if let Err(e) = connection.await {
                tracing::debug!(error = %root_cause(&e), "upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// Idle connections now, for the admin view.
    pub fn idle(&self) -> usize {
        self.shared.idle.lock().map_or(0, |idle| idle.len())
    }
}

impl Shared {
    /// The most recently used idle connection still open and not idle for too long.
    fn checkout(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(candidate) = idle.pop() {
            if candidate.since.elapsed() >= IDLE_TIMEOUT {
                // The rest were returned earlier still.
                idle.clear();
                return None;
            }
            if !candidate.sender.is_closed() {
                return Some(candidate.sender);
            }
        }
        None
    }

    fn give_back(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        // The oldest are first: drop those past their time while here.
        let expired = idle.iter().take_while(|i| now.duration_since(i.since) >= IDLE_TIMEOUT).count();
        idle.drain(..expired);
        if idle.len() < MAX_IDLE {
            idle.push(Idle { sender, since: now });
        }
    }
}

/// hyper's connection API sends the URI as it is: an origin-form one and a `Host` header are
/// what HTTP/1.1 servers expect.
fn to_origin_form(request: &mut Request<Full<Bytes>>, host: &HeaderValue) {
    if request.uri().scheme().is_some() {
        let origin = request.uri().path_and_query().cloned().map_or_else(|| Uri::from_static("/"), Uri::from);
        *request.uri_mut() = origin;
    }
    request.headers_mut().entry(HOST).or_insert_with(|| host.clone());
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[test]
    fn requests_go_out_in_origin_form_with_their_host() {
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = "http://10.0.0.5:8000/nim/v1/chat/completions?x=1".parse().unwrap();
        to_origin_form(&mut request, &HeaderValue::from_static("10.0.0.5:8000"));
        assert_eq!(request.uri(), "/nim/v1/chat/completions?x=1");
        assert_eq!(request.headers()[HOST], "10.0.0.5:8000");
    }

    #[test]
    fn the_authority_gets_its_default_port() {
        let c = Connections::new(&"http://nim-llama.svc".parse().unwrap(), Duration::from_secs(1)).unwrap();
        assert_eq!(&*c.shared.authority, "nim-llama.svc:80");
        assert_eq!(c.shared.host, "nim-llama.svc");
        let c = Connections::new(&"http://127.0.0.1:8000/base".parse().unwrap(), Duration::from_secs(1)).unwrap();
        assert_eq!(&*c.shared.authority, "127.0.0.1:8000");
    }

    /// A listener in front of `to` that counts the TCP connections made through it and
    /// passes their bytes on unchanged. Returns its URL and the count.
    async fn counting_relay(to: std::net::SocketAddr) -> (String, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::Relaxed);
                let mut backend = TcpStream::connect(to).await.unwrap();
                tokio::spawn(async move { tokio::io::copy_bidirectional(&mut client, &mut backend).await });
            }
        });
        (url, accepted)
    }

    #[tokio::test]
    async fn connections_are_reused_and_a_closed_one_is_skipped() {
        // Gated: a stream's answer stays unfinished, its chunks never let go.
        let options = nim_sim::SimOptions { gated_chunks: true, ..nim_sim::SimOptions::default() };
        let sim = nim_sim::Sim::start(options).await.unwrap();
        let (url, accepted) = counting_relay(sim.addr()).await;
        let connections = Connections::new(&url.parse().unwrap(), Duration::from_secs(1)).unwrap();
        let request = |method: http::Method, path: &str, body: &'static str| {
            let mut request = Request::new(Full::new(Bytes::from_static(body.as_bytes())));
            *request.method_mut() = method;
            *request.uri_mut() = format!("{url}{path}").parse().unwrap();
            request
        };
        let get = || request(http::Method::GET, "/v1/models", "");
        for _ in 0..3 {
            let (response, lease) = connections.send(get()).await.unwrap();
            assert_eq!(response.status(), 200);
            http_body_util::BodyExt::collect(response.into_body()).await.unwrap();
            drop(lease);
            assert_eq!(connections.idle(), 1, "one connection, given back after each answer");
        }
        assert_eq!(accepted.load(Ordering::Relaxed), 1, "the three answers came on one connection");
        // An answer left unread closes its connection instead of giving it back dirty: the
        // next request goes out on a new one. A stream, so that its body is truly unread: a
        // small answer hyper had already read whole leaves a clean connection, rightly reused.
        let stream = r#"{"model":"meta/llama-3.1-8b-instruct","messages":[],"stream":true}"#;
        let (response, lease) =
            connections.send(request(http::Method::POST, "/v1/chat/completions", stream)).await.unwrap();
        assert_eq!(response.status(), 200);
        drop(response);
        drop(lease);
        tokio::task::yield_now().await;
        let (response, _lease) = connections.send(get()).await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(accepted.load(Ordering::Relaxed), 2, "the unread answer's connection was not reused");
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url: Uri = format!("http://{}", listener.local_addr().unwrap()).parse().unwrap();
        drop(listener);
        let connections = Connections::new(&url, Duration::from_secs(1)).unwrap();
        let mut request = Request::new(Full::new(Bytes::new()));
        *request.uri_mut() = url;
        assert!(matches!(connections.send(request).await, Err(ClientError::Connect(_))));
    }
}
