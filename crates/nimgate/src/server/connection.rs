//! One client connection, from accept to close: the TLS handshake (ALPN picks h2 or
//! HTTP/1.1) or, in plain text, the h2 preface told apart from an HTTP/1.1 request line; then
//! hyper serves the protocol chosen. Its watchdog (a task of its own) keeps the deadlines:
//! everything before the first request head counts against `header_read_timeout`, so a socket
//! that sends nothing, `P`, or half a preface is closed.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::activity::{Activity, Tracked};
use crate::auth::KeyMemo;
use crate::gateway::Gateway;
use crate::handler;

/// What a client sends first on an h2 connection with prior knowledge.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// How often an h2 connection is pinged to find a peer that vanished.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    H2,
}

/// A client connection just accepted, with what it is served under.
pub struct Accepted {
    pub gateway: Arc<Gateway>,
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub tls: Option<TlsAcceptor>,
    pub max_header_bytes: usize,
    /// Watched by the connection's watchdog, which also closes a connection that does not
    /// open (its first-bytes deadline).
    pub activity: Arc<Activity>,
}

impl Accepted {
    pub async fn serve(self) {
        let Self { gateway, stream, peer, tls, max_header_bytes, activity } = self;
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let mut io = Tracked::new(stream, Arc::clone(&activity));
        let opening = async {
            match tls {
                None => {
                    let protocol = detect(&mut io).await?;
                    Ok(Opened::Plain(io, protocol))
                }
                Some(acceptor) => {
                    let tls = acceptor.accept(io).await?;
                    let protocol =
                        if tls.get_ref().1.alpn_protocol() == Some(b"h2") { Protocol::H2 } else { Protocol::Http1 };
                    Ok::<_, io::Error>(Opened::Tls(Box::new(tls), protocol))
                }
            }
        };
        let opened = tokio::select! {
            opened = opening => opened,
            () = activity.stopped() => return,
        };
        let opened = match opened {
            Ok(opened) => opened,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection closed before its first request");
                return;
            }
        };
        let serving = Serving { gateway, activity, max_header_bytes, peer };
        match opened {
            Opened::Plain(mut io, protocol) => {
                if protocol == Protocol::Http1 {
                    io.watch_heads();
                }
                serving.run(io, protocol).await;
            }
            Opened::Tls(mut tls, protocol) => {
                if protocol == Protocol::Http1 {
                    tls.get_mut().0.watch_heads();
                }
                serving.run(*tls, protocol).await;
            }
        }
    }
}

enum Opened {
    Plain(Tracked<TcpStream>, Protocol),
    Tls(Box<tokio_rustls::server::TlsStream<Tracked<TcpStream>>>, Protocol),
}

/// Reads until the bytes are either the h2 preface or not, and puts them back.
async fn detect(io: &mut Tracked<TcpStream>) -> io::Result<Protocol> {
    let mut buffer = [0u8; H2_PREFACE.len()];
    let mut filled = 0;
    let protocol = loop {
        let n = io.get_mut().read(&mut buffer[filled..]).await?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        filled += n;
        if buffer[..filled] != H2_PREFACE[..filled] {
            break Protocol::Http1;
        }
        if filled == H2_PREFACE.len() {
            break Protocol::H2;
        }
    };
    io.unread(Bytes::copy_from_slice(&buffer[..filled]));
    Ok(protocol)
}

struct Serving {
    gateway: Arc<Gateway>,
    activity: Arc<Activity>,
    max_header_bytes: usize,
    peer: SocketAddr,
}

impl Serving {
    async fn run<IO>(self, io: IO, protocol: Protocol)
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let gateway = Arc::clone(&self.gateway);
        let activity = Arc::clone(&self.activity);
        // The key this connection last presented: keep-alive requests skip the SHA-256.
        let memo = Arc::new(KeyMemo::default());
        let handle = move |request| {
            let active = activity.request_started();
            let gateway = Arc::clone(&gateway);
            let memo = Arc::clone(&memo);
            async move {
                let mut response = handler::serve(gateway, request, &memo).await;
                response.body_mut().hold(active);
                Ok::<_, Infallible>(response)
            }
        };
        let io = TokioIo::new(io);
        match protocol {
            Protocol::Http1 => {
                let mut builder = http1::Builder::new();
                // Head deadlines are the watchdog's; hyper's own would also close idle
                // keep-alive connections after `header_read_timeout`.
                builder.header_read_timeout(None).keep_alive(true).max_buf_size(h1_buffer_limit(self.max_header_bytes));
                // hyper keeps the request's future in one box per connection, reused.
                self.drive(builder.serve_connection(io, service_fn(handle))).await;
            }
            Protocol::H2 => {
                // hyper spawns a task per stream, sized for the larger of the request's future
                // and the answer's body. Boxed, the future (~5 KB) is freed when the head is
                // out, and a stream holds only its body: ~4 KB less per open stream.
                let service = service_fn(move |request| Box::pin(handle(request)));
                let mut builder = http2::Builder::new(TokioExecutor::new());
                builder
                    .timer(TokioTimer::new())
                    .keep_alive_interval(H2_KEEP_ALIVE)
                    .max_header_list_size(u32::try_from(self.max_header_bytes).unwrap_or(u32::MAX));
                self.drive(builder.serve_connection(io, service)).await;
            }
        }
    }

    /// Serves until the connection ends; asked to stop (idle, or the drain), lets what is in
    /// flight finish. The watchdog's own task enforces every deadline (aborting this one).
    async fn drive<C: Connection>(self, connection: C) {
        let Self { activity, peer, .. } = self;
        tokio::pin!(connection);
        let ended = tokio::select! {
            ended = connection.as_mut() => ended,
            () = activity.stopped() => {
                connection.as_mut().shut_down();
                connection.await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// hyper's read buffer limit for HTTP/1.1: a head beyond it gets hyper's own bare 431. Set
/// above `max_header_bytes` so that heads between the two get the gateway's JSON 431
/// (`handler`), and never below hyper's minimum.
fn h1_buffer_limit(max_header_bytes: usize) -> usize {
    max_header_bytes.saturating_mul(2).max(64 * 1024)
}

/// A hyper connection that can be asked to finish gracefully.
trait Connection: Future<Output = hyper::Result<()>> {
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S> Connection for http1::Connection<I, S>
where
    http1::Connection<I, S>: Future<Output = hyper::Result<()>>,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S::ResBody: 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E> Connection for http2::Connection<I, S, E>
where
    http2::Connection<I, S, E>: Future<Output = hyper::Result<()>>,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S::ResBody: 'static,
    <S::ResBody as http_body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}
