//! Hot reload. Three triggers (a change to the config file, SIGHUP, `POST /admin/reload`)
//! lead to one procedure: read the file, build and validate a complete new snapshot while the
//! old one keeps serving, then put it in force with one atomic swap. A request keeps the
//! snapshot it started with to its end, so nothing in flight notices. Backends whose
//! configuration did not change are carried over as they are (connection pool, health,
//! ejection state, in-flight count), and the limiter keeps the state of unchanged keys. An
//! invalid file changes nothing: its problems are logged with their field paths and counted in
//! `config_reloads_total{result="error"}`.
//!
//! The file watch covers editors that write in place or replace the file, and Kubernetes
//! ConfigMap mounts, where the file is a symlink through `..data`, which the kubelet swaps: the
//! whole directory is watched, events are debounced, and a reload whose file bytes did not
//! change is skipped. The directories of the TLS certificate and key are watched too, so a
//! rotated certificate is served from the next connection on.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;

use crate::config::{self, ConfigError, ConfigMeta, EnvSource, Snapshot};
use crate::gateway::Gateway;

/// Quiet time after the last file event before reloading: editors and the kubelet write in
/// several steps.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// The longest a stream of changes defers a reload.
const MAX_DEBOUNCE: Duration = Duration::from_secs(2);

/// What set off a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    FileChange,
    Signal,
    AdminApi,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::FileChange => "file change",
            Self::Signal => "SIGHUP",
            Self::AdminApi => "admin API",
        }
    }
}

/// A reload that was put in force (or skipped as unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub version: u64,
    pub hash: String,
    /// Settings that changed but only take effect after a restart (listen addresses).
    pub restart_needed: Vec<&'static str>,
    /// The file's bytes were those in force already: nothing was done.
    pub unchanged: bool,
}

/// Reads, validates and puts in force the configuration at one path.
pub struct Reloader {
    gateway: Arc<Gateway>,
    path: PathBuf,
    env: EnvSource,
    /// What the process set up at start and a reload cannot change.
    fixed: Fixed,
    /// One reload at a time: a file event, SIGHUP and the admin API may coincide.
    serial: tokio::sync::Mutex<()>,
    /// Signalled after each reload put in force, for the file watch to follow the TLS files.
    applied: tokio::sync::Notify,
}

/// Settings applied once at start: the listen addresses bound and the logging set up.
struct Fixed {
    listen: SocketAddr,
    admin_listen: SocketAddr,
    logging: config::LoggingSettings,
    max_connections: usize,
    max_buffered_body_bytes: u64,
}

/// Loads and validates the file at `path` as the first snapshot (version 1).
pub fn load_initial(path: &Path, env: &EnvSource) -> Result<Snapshot, ConfigError> {
    let mut snapshot = build(path, env, None)?;
    snapshot.meta.version = 1;
    Ok(snapshot)
}

/// The file's snapshot, its meta filled in but for the version. The hash covers the file and
/// the TLS certificate and key it names, so that a rotated certificate counts as a change.
fn build(path: &Path, env: &EnvSource, previous: Option<&Snapshot>) -> Result<Snapshot, ConfigError> {
    let bytes = std::fs::read(path).map_err(|cause| ConfigError::Read { path: path.display().to_string(), cause })?;
    let text = String::from_utf8_lossy(&bytes);
    let raw = config::load_str(&text, config::format_of(path), env)?;
    // The TLS files are hashed before validation reads them: a renewal landing in between
    // leaves a hash older than the certificate in force, so the renewal's own file event
    // still counts as a change (the other order would skip it as unchanged).
    let mut hash = Sha256::new();
    hash.update(&bytes);
    for file in tls_files(&raw) {
        hash.update(std::fs::read(file).unwrap_or_default());
    }
    let mut snapshot = config::validate_after(&raw, env, previous)?;
    snapshot.meta = ConfigMeta { version: 0, hash: hex::encode(hash.finalize()), source: Some(Arc::new(raw)) };
    Ok(snapshot)
}

/// The TLS certificate and key files a config names.
fn tls_files(raw: &config::RawConfig) -> Vec<PathBuf> {
    raw.server.tls.iter().flat_map(|t| [PathBuf::from(&t.cert), PathBuf::from(&t.key)]).collect()
}

impl Reloader {
    /// A reloader for the gateway serving the snapshot loaded from `path`.
    pub fn new(gateway: Arc<Gateway>, path: PathBuf, env: EnvSource) -> Arc<Self> {
        let snapshot = gateway.snapshot();
        let fixed = Fixed {
            listen: snapshot.server.listen,
            admin_listen: snapshot.server.admin_listen,
            logging: snapshot.logging.clone(),
            max_connections: snapshot.server.max_connections,
            max_buffered_body_bytes: snapshot.server.max_buffered_body_bytes,
        };
        Arc::new(Self {
            gateway,
            path,
            env,
            fixed,
            serial: tokio::sync::Mutex::new(()),
            applied: tokio::sync::Notify::new(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Settings of the snapshot in force that differ from what the process set up at start.
    pub fn restart_needed(&self, snapshot: &Snapshot) -> Vec<&'static str> {
        let mut fields = Vec::new();
        if snapshot.server.listen != self.fixed.listen {
            fields.push("server.listen");
        }
        if snapshot.server.admin_listen != self.fixed.admin_listen {
            fields.push("server.admin_listen");
        }
        if snapshot.logging != self.fixed.logging {
            fields.push("logging");
        }
        if snapshot.server.max_connections != self.fixed.max_connections {
            fields.push("server.max_connections");
        }
        if snapshot.server.max_buffered_body_bytes != self.fixed.max_buffered_body_bytes {
            fields.push("server.max_buffered_body_bytes");
        }
        fields
    }

    /// Reads the file and puts it in force if valid. A file change whose bytes are those in
    /// force already is skipped; SIGHUP and the admin API always rebuild (credentials in the
    /// environment may have changed).
    pub async fn reload(&self, trigger: Trigger) -> Result<Applied, ConfigError> {
        let _serial = self.serial.lock().await;
        let current = self.gateway.snapshot();
        let (path, env, previous) = (self.path.clone(), self.env.clone(), Arc::clone(&current));
        // Reading files and building TLS clients blocks: not on the request runtime's threads.
        let built =
            tokio::task::spawn_blocking(move || build(&path, &env, Some(&previous))).await.unwrap_or_else(|e| {
                Err(ConfigError::Invalid(vec![config::Problem::new("", format!("reload failed: {e}"))]))
            });
        let mut snapshot = match built {
            Ok(snapshot) => snapshot,
            Err(e) => {
                self.gateway.metrics().config_reloads.with_label_values(&["error"]).inc();
                let problems: Vec<String> = e.problems().iter().map(ToString::to_string).collect();
                tracing::error!(
                    trigger = trigger.as_str(), config = %self.path.display(), version = current.meta.version,
                    problems = %problems.join("; "), "config reload refused; the configuration in force stays"
                );
                return Err(e);
            }
        };
        if trigger == Trigger::FileChange && snapshot.meta.hash == current.meta.hash {
            return Ok(Applied {
                version: current.meta.version,
                hash: current.meta.hash.clone(),
                restart_needed: self.restart_needed(&current),
                unchanged: true,
            });
        }
        snapshot.meta.version = current.meta.version + 1;
        let applied = Applied {
            version: snapshot.meta.version,
            hash: snapshot.meta.hash.clone(),
            restart_needed: self.restart_needed(&snapshot),
            unchanged: false,
        };
        let kept = snapshot.backends.iter().filter(|b| current.backends.iter().any(|old| Arc::ptr_eq(old, b))).count();
        tracing::info!(
            trigger = trigger.as_str(), version = applied.version, hash = %applied.hash,
            backends = snapshot.backends.len(), backends_kept = kept, routes = snapshot.routes.len(),
            keys = snapshot.keys.len(), "config reloaded"
        );
        for field in &applied.restart_needed {
            tracing::warn!(field, "changed in the config file, but only a restart applies it");
        }
        snapshot.log_warnings();
        self.gateway.replace(snapshot);
        self.gateway.metrics().config_reloads.with_label_values(&["ok"]).inc();
        self.applied.notify_one();
        Ok(applied)
    }
}

/// SIGHUP, taken over from now on (its default action ends the process).
#[cfg(unix)]
pub type Hangups = tokio::signal::unix::Signal;
#[cfg(not(unix))]
pub type Hangups = ();

/// SIGHUP, handled from now on; `None` where it cannot be (logged).
pub fn hangup_signals() -> Option<Hangups> {
    #[cfg(unix)]
    {
        let signals = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
        if signals.is_err() {
            tracing::warn!("cannot listen for SIGHUP; reload with POST /admin/reload");
        }
        signals.ok()
    }
    #[cfg(not(unix))]
    None
}

/// Reloads the configuration on every SIGHUP.
pub async fn on_sighup(hangups: Hangups, reloader: Arc<Reloader>) {
    #[cfg(unix)]
    {
        let mut hangups = hangups;
        while hangups.recv().await.is_some() {
            // Problems are logged and counted by `reload`.
            let _ = reloader.reload(Trigger::Signal).await;
        }
    }
    #[cfg(not(unix))]
    let _ = (hangups, reloader);
}

/// Watches the config file's directory and reloads after changes, until dropped.
pub struct FileWatch {
    task: JoinHandle<()>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The directories to watch for the snapshot in force: the config file's, and those of the
/// TLS certificate and key it names (cert-manager and Secret mounts swap files there).
fn watched_dirs(reloader: &Reloader) -> Vec<PathBuf> {
    let parent = |path: &Path| match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut dirs = vec![parent(reloader.path())];
    if let Some(raw) = reloader.gateway.snapshot().meta.source.clone() {
        for file in tls_files(&raw) {
            let dir = parent(&file);
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

/// Starts watching `reloader`'s file and the TLS files it names. After every reload, by
/// whatever trigger, the watch follows the TLS files to their new directories.
pub fn watch(reloader: Arc<Reloader>) -> notify::Result<FileWatch> {
    let (events, mut received) = tokio::sync::mpsc::unbounded_channel::<Vec<PathBuf>>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| match event {
        Ok(event) if !matches!(event.kind, EventKind::Access(_)) => {
            let _ = events.send(event.paths);
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "config file watch error"),
    })?;
    let mut watched = watched_dirs(&reloader);
    for dir in &watched {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    let task = tokio::spawn(async move {
        loop {
            tokio::select! {
                event = received.recv() => {
                    let Some(paths) = event else { return };
                    if !concerns_us(&reloader, &paths) {
                        continue;
                    }
                    // Debounce: wait until our files have been quiet for a moment, but no
                    // longer than MAX_DEBOUNCE (an editor or a swap makes several events).
                    let due = tokio::time::Instant::now() + MAX_DEBOUNCE;
                    let mut quiet = tokio::time::Instant::now() + DEBOUNCE;
                    loop {
                        match tokio::time::timeout_at(quiet.min(due), received.recv()).await {
                            Ok(Some(paths)) if concerns_us(&reloader, &paths) => {
                                quiet = tokio::time::Instant::now() + DEBOUNCE;
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => return,
                            Err(_) => break,
                        }
                    }
                    // Problems are logged and counted by `reload`.
                    let _ = reloader.reload(Trigger::FileChange).await;
                }
                () = reloader.applied.notified() => {}
            }
            follow(&mut watcher, &mut watched, watched_dirs(&reloader));
        }
    });
    Ok(FileWatch { task })
}

/// Whether an event on `paths` may be a change of the config file or a TLS file: their own
/// names, or a Kubernetes volume's `..data` swap (names starting with `..`). Anything else in
/// the directory (a log file written beside the config) is no reason to reload, nor to wait.
fn concerns_us(reloader: &Reloader, paths: &[PathBuf]) -> bool {
    let mut ours: Vec<std::ffi::OsString> = reloader.path().file_name().map(ToOwned::to_owned).into_iter().collect();
    if let Some(raw) = reloader.gateway.snapshot().meta.source.clone() {
        ours.extend(tls_files(&raw).iter().filter_map(|f| f.file_name().map(ToOwned::to_owned)));
    }
    paths.iter().any(|path| match path.file_name() {
        Some(name) => name.to_string_lossy().starts_with("..") || ours.iter().any(|o| o == name),
        None => true,
    })
}

/// Moves the watch to `wanted`: new directories added, those no longer named dropped.
fn follow(watcher: &mut notify::RecommendedWatcher, watched: &mut Vec<PathBuf>, wanted: Vec<PathBuf>) {
    for dir in watched.iter().filter(|d| !wanted.contains(d)) {
        let _ = watcher.unwatch(dir);
    }
    for dir in wanted.iter().filter(|d| !watched.contains(d)) {
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a TLS file's directory; reload with SIGHUP");
        }
    }
    *watched = wanted;
}

/// The configuration in force as `/admin/config` shows it: credentials redacted.
pub fn redacted(snapshot: &Snapshot) -> Value {
    let mut value =
        snapshot.meta.source.as_ref().and_then(|raw| serde_json::to_value(raw.as_ref()).ok()).unwrap_or(Value::Null);
    if let Some(keys) = value.get_mut("keys").and_then(Value::as_array_mut) {
        for key in keys {
            if let Some(digest) = key.get_mut("key_sha256").filter(|d| !d.is_null()) {
                *digest = Value::from("<redacted>");
            }
        }
    }
    if let Some(url) = value.pointer_mut("/rate_limits/redis_url").filter(|u| u.is_string()) {
        let text = url.as_str().unwrap_or_default();
        // redis://user:password@host: keep the host, drop the credentials.
        if let Some((scheme, rest)) = text.split_once("://") {
            if let Some((_, host)) = rest.rsplit_once('@') {
                *url = Value::from(format!("{scheme}://<redacted>@{host}"));
            }
        }
    }
    value
}
