//! Listeners and connections: accepts TCP (optionally TLS) connections, serves HTTP/1.1 and h2
//! on each (ALPN with TLS, preface detection without), and shuts down gracefully: stop
//! accepting, mark the gateway draining, let in-flight requests and streams finish up to
//! `server.drain_timeout`.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::gateway::Gateway;
use crate::handler;

/// A client must finish its TLS handshake within this.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A client must send a complete request head within this (also closes idle keep-alive
/// connections that never send another request).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Binds the gateway's listener, with a message an operator can act on when it fails.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await.map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Serves `listener` until `shutdown` completes, then drains.
pub async fn serve(gateway: Arc<Gateway>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    let builder = Arc::new(connection_builder());
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let connection = Connection { gateway: Arc::clone(&gateway), builder: Arc::clone(&builder), peer };
                    let watcher = graceful.watcher();
                    // Read per connection, so that a reloaded certificate serves the next one.
                    let tls = gateway.snapshot().server.tls.clone().map(TlsAcceptor::from);
                    tokio::spawn(async move { connection.run(stream, tls, watcher).await });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    gateway.start_draining();
    let drain_timeout = gateway.snapshot().server.drain_timeout;
    tracing::info!(?drain_timeout, "shutting down: no new connections, draining in-flight requests");
    match tokio::time::timeout(drain_timeout, graceful.shutdown()).await {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!(?drain_timeout, "drain timeout reached; closing the remaining connections"),
    }
}

fn connection_builder() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT).keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .max_concurrent_streams(1024);
    builder
}

struct Connection {
    gateway: Arc<Gateway>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    peer: SocketAddr,
}

impl Connection {
    async fn run(self, stream: TcpStream, tls: Option<TlsAcceptor>, watcher: hyper_util::server::graceful::Watcher) {
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(peer = %self.peer, error = %e, "cannot set TCP_NODELAY");
        }
        let gateway = self.gateway;
        let connections = gateway.metrics().connections.clone();
        connections.inc();
        let _open = scopeguard(move || connections.dec());
        let service = service_fn(move |request| {
            let gateway = Arc::clone(&gateway);
            async move { Ok::<_, Infallible>(handler::serve(gateway, request).await) }
        });
        let result = match tls {
            None => watcher.watch(self.builder.serve_connection(TokioIo::new(stream), service)).await,
            Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => watcher.watch(self.builder.serve_connection(TokioIo::new(stream), service)).await,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                    return;
                }
            },
        };
        if let Err(e) = result {
            tracing::debug!(peer = %self.peer, error = %e, "connection ended with an error");
        }
    }
}

/// Runs `f` when dropped (the connection task ends however it ends).
fn scopeguard(f: impl FnOnce()) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// A gateway server running in the background (tests, `nimgate demo`).
pub struct ServerHandle {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ServerHandle {
    /// Serves `listener` on a background task until `shutdown` is called or the handle dropped.
    pub fn spawn(gateway: Arc<Gateway>, listener: TcpListener) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(gateway, listener, async move {
            let _ = stopped.await;
        }));
        Ok(Self { addr, stop: Some(stop), task: Some(task) })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, drains, and returns when the server has finished.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
