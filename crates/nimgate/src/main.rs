//! The `nimgate` command line: run the gateway, check a config, hash a key, run the demo.
//! The only place `anyhow` appears: the library returns typed errors. What only the binary
//! needs lives here too: the allocator, and the demo's simulated NIMs (`demo`).

mod demo;

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use nimgate::config::{self, EnvSource, LogFormat, LoggingSettings, Snapshot};
use nimgate::{Launch, auth, reload};

/// mimalloc: measurably cheaper than glibc's malloc for the many small, short-lived
/// allocations of a proxy (see benches/RESULTS.md), and it returns memory to the OS.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "nimgate", version, about = "A fast, reliable gateway in front of NVIDIA NIM inference backends")]
struct Cli {
    /// Config file (YAML; TOML or JSON by extension). Default: $NIMGATE_CONFIG, then config/nimgate.yaml.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config: print every problem with its field path (exit 1) or a summary (exit 0).
    CheckConfig {
        /// The file to check.
        path: PathBuf,
    },
    /// Print the sha256 hex of KEY (or of the first line of stdin), for `key_sha256`.
    HashKey {
        /// The key; read from stdin when absent (keeps it out of shell history).
        key: Option<String>,
    },
    /// Run the gateway in front of two in-process simulated NIMs, with a demo key.
    Demo {
        /// Where the demo gateway listens (default: demo.yaml's 127.0.0.1:8080).
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::CheckConfig { path }) => check_config(&path),
        Some(Command::HashKey { key }) => hash_key(key),
        Some(Command::Demo { listen }) => {
            init_logging(&LoggingSettings::default()).and_then(|()| runtime()?.block_on(run_demo(listen)))
        }
        None => {
            let path = config_path(cli.config);
            load(&path).and_then(|snapshot| {
                init_logging(&snapshot.logging)?;
                runtime()?.block_on(run_gateway(snapshot, &path))
            })
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("NIMGATE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("config/nimgate.yaml"))
}

fn load(path: &Path) -> anyhow::Result<Snapshot> {
    reload::load_initial(path, &EnvSource::Process).with_context(|| format!("{} is not valid", path.display()))
}

fn check_config(path: &Path) -> anyhow::Result<ExitCode> {
    let checked =
        config::load_file(path, &EnvSource::Process).and_then(|raw| config::validate(&raw, &EnvSource::Process));
    match checked {
        Ok(snapshot) => {
            println!("{}: ok", path.display());
            println!("{}", summary(&snapshot));
            for warning in &snapshot.warnings {
                println!("  warning: {warning}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            let problems = e.problems();
            eprintln!("{}: {} problem{}", path.display(), problems.len(), if problems.len() == 1 { "" } else { "s" });
            for problem in problems {
                eprintln!("  {problem}");
            }
            Ok(ExitCode::FAILURE)
        }
    }
}

fn summary(snapshot: &Snapshot) -> String {
    let mut lines = vec![format!(
        "  listen {}, {} backend(s), {} route(s), {} key(s){}",
        snapshot.server.listen,
        snapshot.backends.len() + snapshot.groups.len(),
        snapshot.routes.len(),
        snapshot.keys.len(),
        if snapshot.server.allow_anonymous { ", anonymous access ON" } else { "" }
    )];
    for route in snapshot.routes.iter() {
        let names = |entries: &[nimgate::upstream::PoolEntry]| {
            entries.iter().map(|e| e.name().to_string()).collect::<Vec<_>>().join(", ")
        };
        let mut line = format!("  {} -> [{}]", route.pattern.as_str(), names(route.pool.primary_entries()));
        if !route.pool.fallback_entries().is_empty() {
            line.push_str(&format!(" fallback [{}]", names(route.pool.fallback_entries())));
        }
        if let Some(alias) = &route.upstream_model {
            line.push_str(&format!(" as {}", alias.name));
        }
        lines.push(line);
    }
    lines.join("\n")
}

fn hash_key(key: Option<String>) -> anyhow::Result<ExitCode> {
    let key = match key {
        Some(key) => key,
        None => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).context("cannot read the key from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    anyhow::ensure!(!key.is_empty(), "no key given: pass it as an argument or on stdin");
    println!("{}", auth::digest_hex(&key));
    Ok(ExitCode::SUCCESS)
}

async fn run_gateway(snapshot: Snapshot, path: &Path) -> anyhow::Result<ExitCode> {
    raise_open_files_limit(snapshot.server.max_connections);
    let launch =
        Launch { snapshot, source: Some((path.to_path_buf(), EnvSource::Process)), sighup: true, listeners: None };
    nimgate::run(launch, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

async fn run_demo(listen: Option<SocketAddr>) -> anyhow::Result<ExitCode> {
    demo::run(listen, shutdown_signal()).await?;
    Ok(ExitCode::SUCCESS)
}

/// Raises the soft open-file limit to the hard one (most systems start processes at 1,024),
/// and warns when even that cannot hold `max_connections` client connections and their
/// upstream connections: past it, accept fails and connections wait in the backlog.
fn raise_open_files_limit(max_connections: usize) {
    #[cfg(unix)]
    {
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
        if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
            tracing::debug!(soft, hard, "cannot raise the open-file limit");
        }
        let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(soft, _)| soft);
        // Each client connection may hold an upstream connection too, plus a reserve.
        let needed = (max_connections as u64).saturating_mul(2).saturating_add(256);
        if limit < needed {
            tracing::warn!(
                open_files = limit,
                max_connections,
                "the open-file limit cannot hold max_connections with their upstream connections; lower server.max_connections or raise `ulimit -n`"
            );
        }
    }
    #[cfg(not(unix))]
    let _ = max_connections;
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

/// One worker thread per available core; on a single core (a pod with one CPU, or the
/// benchmark's pinned core) the current-thread scheduler, which does the same work without the
/// cross-thread machinery of work stealing.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut builder = if cores == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build().context("cannot start the async runtime")
}

/// Logs go to stderr, as `logging:` says: its `level` is the filter (`NIMGATE_LOG` takes
/// precedence), its `format` text or one JSON object per line (`NIMGATE_LOG_FORMAT` takes
/// precedence).
fn init_logging(settings: &LoggingSettings) -> anyhow::Result<()> {
    let filter = match std::env::var("NIMGATE_LOG") {
        Ok(directive) => tracing_subscriber::EnvFilter::try_new(&directive)
            .with_context(|| format!("NIMGATE_LOG=`{directive}` is not a log filter"))?,
        Err(_) => tracing_subscriber::EnvFilter::try_new(&settings.level).context("logging.level")?,
    };
    let json = match std::env::var("NIMGATE_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("text") => false,
        Ok(other) => anyhow::bail!("NIMGATE_LOG_FORMAT=`{other}` is not a log format: use text or json"),
        Err(_) => settings.format == LogFormat::Json,
    };
    // Colours only on a terminal: escape codes in a file or a log collector are noise.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    let result = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
    result.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}
