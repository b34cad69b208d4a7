//! nimgate: one OpenAI-compatible endpoint in front of many NVIDIA NIM backends.
//!
//! Module map (one concern each; imports run downward, from the edge to the leaves):
//! - `server`, `admin`, `reload`: the edge. Listeners and connections; the operators'
//!   listener; hot reload from a file watch, SIGHUP or the admin API.
//! - `handler`: the request path, top to bottom, as calls to the modules below.
//! - `exchange`: one request's record; its request metrics and access line, written once.
//! - `request`: the request id, the body read under its cap and peeked, splices (alias, usage).
//! - `streaming`: the answer's body passed through frame by frame, metered and timed.
//! - `models`: `GET /v1/models`.
//! - `gateway`: the snapshot in force and the state that outlives snapshots.
//! - `config`: the file as written (`raw`), loading with env overrides (`load`), validation
//!   into an immutable `Snapshot` (`validate`, `snapshot`).
//! - `routing`: model string → `Route`; `auth`: bearer key → `Key`, ACLs; `glob`: the model
//!   patterns both use.
//! - `limits`: request and token limits per key (admit, reserve, settle) and their store.
//! - `upstream`: everything about talking to backends (pools, balancing, health, retries,
//!   clients and connections, header rules, backends carried across reloads).
//! - `error`: `GatewayError`, the contract's table, and the only writer of an error body.
//! - `api`: the paths nimgate serves; `metrics`: the Prometheus registry; `tls`: PEM loading;
//!   `logsafe`: client strings cut and escaped for log lines.
//!
//! `start` and `run` below are the one place the gateway is put together: the binary, the demo
//! and the test support all go through them.

pub mod admin;
pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod exchange;
pub mod gateway;
pub mod glob;
pub mod handler;
pub mod limits;
pub mod logsafe;
pub mod metrics;
pub mod models;
pub mod reload;
pub mod request;
pub mod routing;
pub mod server;
pub mod streaming;
pub mod tls;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Snapshot;
pub use error::GatewayError;
pub use gateway::Gateway;

use admin::AdminHandle;
use config::EnvSource;
use reload::{FileWatch, Reloader};
use server::ServerHandle;

/// What to run: a validated snapshot, where it came from, and where to listen.
pub struct Launch {
    pub snapshot: Snapshot,
    /// The file the snapshot was loaded from, with the environment it was read in: hot reload
    /// on (the file watch and `POST /admin/reload`).
    pub source: Option<(PathBuf, EnvSource)>,
    /// Reload on SIGHUP too. A process-wide signal: for the binary, not for embedded gateways.
    pub sighup: bool,
    /// The gateway and admin listeners, already bound (tests bind `127.0.0.1:0`); else the
    /// snapshot's `server.listen` and `server.admin_listen` are bound.
    pub listeners: Option<(TcpListener, TcpListener)>,
}

impl Launch {
    /// `snapshot` served on its own addresses, without hot reload.
    pub fn new(snapshot: Snapshot) -> Self {
        Self { snapshot, source: None, sighup: false, listeners: None }
    }
}

/// A gateway serving in the background: its listener, the admin listener and hot reload.
/// Dropping it stops everything at once; `shutdown` drains first.
pub struct Running {
    gateway: Arc<Gateway>,
    reloader: Option<Arc<Reloader>>,
    // Field order is drop order: the listener stops before the admin listener and the watch.
    server: ServerHandle,
    admin: AdminHandle,
    _watch: Option<FileWatch>,
    _sighup: Option<AbortOnDrop>,
}

/// A background task that ends with its owner.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Running {
    /// Where the gateway listens.
    pub fn addr(&self) -> SocketAddr {
        self.server.addr()
    }

    /// Where the admin listener listens.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.addr()
    }

    pub fn gateway(&self) -> &Arc<Gateway> {
        &self.gateway
    }

    /// The reloader of a gateway started from a file.
    pub fn reloader(&self) -> Option<&Arc<Reloader>> {
        self.reloader.as_ref()
    }

    /// Stops accepting, lets requests in flight finish (up to `server.drain_timeout`), then
    /// stops the admin listener and the reload triggers.
    pub async fn shutdown(self) {
        let Self { server, admin, _watch, _sighup, .. } = self;
        server.shutdown().await;
        drop((admin, _watch, _sighup));
    }
}

/// Binds (unless given listeners), starts serving and the admin listener, and turns hot
/// reload on when the snapshot came from a file. Fails only when a listener cannot be bound.
pub async fn start(launch: Launch) -> std::io::Result<Running> {
    let Launch { snapshot, source, sighup, listeners } = launch;
    // Taken over first: until a handler is registered, SIGHUP's default action ends the
    // process, and a config-reloader sidecar may send one as soon as the pod starts.
    let hangups = sighup.then(reload::hangup_signals).flatten();
    snapshot.log_warnings();
    if snapshot.server.allow_anonymous {
        tracing::warn!("server.allow_anonymous is on: requests without a known key are served");
    }
    let (listener, admin_listener) = match listeners {
        Some(bound) => bound,
        None => (server::bind(snapshot.server.listen).await?, server::bind(snapshot.server.admin_listen).await?),
    };
    let admin_addr = admin_listener.local_addr()?;
    if !admin_addr.ip().is_loopback() && snapshot.server.admin_token.is_none() {
        tracing::warn!(
            admin_listen = %admin_addr,
            "the admin API listens beyond loopback without a token: whoever reaches it can read the config and reload it; set server.admin_token_env"
        );
    }
    tracing::info!(
        config = source.as_ref().map(|(path, _)| path.display().to_string()),
        listen = %listener.local_addr()?, admin_listen = %admin_listener.local_addr()?,
        tls = snapshot.server.tls.is_some(), backends = snapshot.backends.len(),
        routes = snapshot.routes.len(), keys = snapshot.keys.len(), "nimgate listening"
    );
    let gateway = Gateway::new(snapshot);
    let reloader = source.map(|(path, env)| Reloader::new(Arc::clone(&gateway), path, env));
    // The admin listener answers until the gateway is done, drain included.
    let admin = AdminHandle::spawn(Arc::clone(&gateway), admin_listener, reloader.clone())?;
    let watch = reloader.as_ref().and_then(|reloader| match reload::watch(Arc::clone(reloader)) {
        Ok(watch) => Some(watch),
        Err(e) => {
            tracing::warn!(
                error = %e, config = %reloader.path().display(),
                "cannot watch the config file; reload with SIGHUP or POST /admin/reload"
            );
            None
        }
    });
    let sighup = match (hangups, &reloader) {
        (Some(hangups), Some(reloader)) => {
            Some(AbortOnDrop(tokio::spawn(reload::on_sighup(hangups, Arc::clone(reloader)))))
        }
        _ => None,
    };
    let server = ServerHandle::spawn(Arc::clone(&gateway), listener)?;
    Ok(Running { gateway, reloader, server, admin, _watch: watch, _sighup: sighup })
}

/// Serves `launch` until `shutdown` completes, then drains.
pub async fn run(launch: Launch, shutdown: impl Future<Output = ()>) -> std::io::Result<()> {
    let running = start(launch).await?;
    shutdown.await;
    running.shutdown().await;
    Ok(())
}
