//! The gateway's listener: accepts TCP connections up to `server.max_connections` (more wait
//! in the listen backlog), serves each (`connection`, under its `watchdog`), and shuts down
//! gracefully: stop accepting, mark the gateway draining, let in-flight requests and streams
//! finish up to `server.drain_timeout`.

pub mod activity;
mod connection;
mod watchdog;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::gateway::Gateway;
use activity::Activity;
use connection::Accepted;
use watchdog::Deadlines;

/// Binds the gateway's listener, with a message an operator can act on when it fails.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, std::io::Error> {
    TcpListener::bind(addr).await.map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))
}

/// Serves `listener` until `shutdown` completes, then drains.
pub async fn serve(gateway: Arc<Gateway>, listener: TcpListener, shutdown: impl Future<Output = ()>) {
    // Fixed at start (a reload reports a change as needing a restart).
    let slots = Arc::new(Semaphore::new(gateway.snapshot().server.max_connections));
    let (stopping, stop_watch) = watch::channel(false);
    tokio::pin!(shutdown);
    // Warned once per stretch at the cap, not once per connection let in while it lasts.
    let mut at_cap = false;
    loop {
        let slot = match Arc::clone(&slots).try_acquire_owned() {
            Ok(slot) => {
                at_cap = false;
                slot
            }
            Err(_) => {
                gateway.metrics().connection_limit_reached.inc();
                if !std::mem::replace(&mut at_cap, true) {
                    tracing::warn!(
                        max_connections = gateway.snapshot().server.max_connections,
                        "server.max_connections reached: new connections wait in the listen backlog"
                    );
                }
                tokio::select! {
                    slot = Arc::clone(&slots).acquire_owned() => match slot {
                        Ok(slot) => slot,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => serve_connection(Arc::clone(&gateway), stream, peer, stop_watch.clone(), slot),
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
    drop(stop_watch);
    gateway.start_draining();
    let drain_timeout = gateway.snapshot().server.drain_timeout;
    tracing::info!(?drain_timeout, "shutting down: no new connections, draining in-flight requests");
    let _ = stopping.send(true);
    // Every connection's watchdog holds a receiver until its connection ends.
    match tokio::time::timeout(drain_timeout, stopping.closed()).await {
        Ok(()) => tracing::info!("drained"),
        Err(_) => tracing::warn!(?drain_timeout, "drain timeout reached; closing the remaining connections"),
    }
}

/// Serves one connection on a task of its own, with its watchdog on another. `slot` (of
/// `max_connections`) is given back when the connection's task ends, however it ends.
fn serve_connection(
    gateway: Arc<Gateway>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
    slot: OwnedSemaphorePermit,
) {
    // Read per connection, so that a reload (a new certificate, new timeouts) serves the next.
    let server = gateway.snapshot().server.clone();
    let deadlines = Deadlines { header_read: server.header_read_timeout, idle: server.idle_timeout };
    let activity = Activity::new(tokio::time::Instant::now());
    let metrics = Arc::clone(gateway.metrics());
    let connections = metrics.connections.clone();
    let accepted = Accepted {
        gateway,
        stream,
        peer,
        tls: server.tls.map(TlsAcceptor::from),
        max_header_bytes: server.max_header_bytes,
        activity: Arc::clone(&activity),
    };
    let connection = tokio::spawn(async move {
        let _slot = slot;
        connections.inc();
        let _open = scopeguard(move || connections.dec());
        accepted.serve().await;
    });
    tokio::spawn(watchdog::guard(activity, deadlines, connection, shutdown, metrics, peer));
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
