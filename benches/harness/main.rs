//! `nimgate-bench`: the load harness. Starts nim-sim (release, zero latency), nimgate (release,
//! a realistic config) and nginx (`proxy_pass` with upstream keepalive) and drives all three
//! side by side in one run: closed and open loop, streams, and a memory test of 10,000 idle
//! streams. Writes `RESULTS.md` and `results.json`. Run it through `benches/run`, which builds
//! the release binaries, installs nginx when missing and pins the harness to its core. With
//! `--redis`, also nimgate with its limits in a redis-server the harness starts: the cost of the
//! shared store's round trip per admission, side by side with the memory store.

mod load;
mod procs;
mod report;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use load::{HttpClient, Measured, Requests};
use procs::Proc;
use report::{Cell, Memory, Report, ScenarioResult};

#[derive(Parser)]
#[command(name = "nimgate-bench", about = "Load harness: nim-sim direct vs through nimgate vs through nginx")]
struct Args {
    /// Seconds per run.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Interleaved repetitions of every run (medians are reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Where RESULTS.md and results.json go.
    #[arg(long, default_value = "benches")]
    out: PathBuf,
    /// Idle streams held open for the memory test (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    idle_streams: usize,
    /// Run without nginx even if it is installed.
    #[arg(long)]
    no_nginx: bool,
    /// Also run `hyper-floor` (a bare hyper proxy on nimgate's HTTP stack) as a target, to
    /// separate nimgate's own cost from its HTTP stack's.
    #[arg(long)]
    floor: bool,
    /// Also run this other nimgate binary (e.g. a build of the commit before a change) with the
    /// same config: before/after figures from one interleaved run. Repeatable; one baseline is
    /// the target `baseline`, several are named by their file names.
    #[arg(long)]
    baseline: Vec<PathBuf>,
    /// Also run `nimgate-redis`: the same nimgate binary and config with `rate_limits.store:
    /// redis`, on a redis-server of the harness's own (core 1, beside the load generator).
    #[arg(long)]
    redis: bool,
    /// Also run `nimgate-affinity`: the same nimgate binary and config with `strategy:
    /// prefix_affinity` on the benchmarked routes, for the strategy's cost against two choices.
    #[arg(long)]
    affinity: bool,
    /// Run only the scenarios whose name contains this (e.g. `closed`, `streams`, `none`).
    /// Repeatable: a scenario runs when it matches any.
    #[arg(long)]
    only: Vec<String>,
    /// The command line to show in the report.
    #[arg(long, default_value = "benches/run")]
    command: String,
}

const KEYS: usize = 100;
const FILLER_ROUTES: usize = 47;
/// Events of a streamed answer of 100 tokens: role, 100 tokens, finish, `[DONE]`.
const STREAM_EVENTS: usize = 103;

/// Where the generated config keeps the limiter's state, or which strategy it balances by.
#[derive(Clone, Copy, PartialEq)]
enum Store {
    Memory,
    /// A redis-server listening here.
    Redis(SocketAddr),
    /// In memory, with `strategy: prefix_affinity` on the benchmarked routes.
    MemoryWithAffinity,
}

#[derive(Clone, Copy)]
enum Load {
    Closed(usize),
    Open(u64),
    Streams(usize),
}

struct Target<'a> {
    name: String,
    fast: String,
    stream: String,
    proxy: Option<&'a Proc>,
    /// The proxy's limiter store, when it is a process of its own (redis-server): its CPU time
    /// is reported beside the proxy's.
    store: Option<&'a Proc>,
}

/// One run's CPU time: the proxy's per 1,000 answered requests and its user-space share, and
/// its store's per 1,000 when it has one.
struct Cpu {
    per_1k: f64,
    user_share: f64,
    store_per_1k: Option<f64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nimgate-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nimgate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    let bin = std::env::current_exe().map_err(|e| e.to_string())?;
    let bin_dir = bin.parent().ok_or("no binary directory")?.to_path_buf();
    let work = std::env::temp_dir().join(format!("nimgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|e| e.to_string())?;
    let ticks = procs::ticks_per_second();

    // nim-sim instances on core 1, beside the load generator.
    let (fast_addr, stream_addr, idle_addr) = (procs::free_addr(), procs::free_addr(), procs::free_addr());
    let sim = bin_dir.join("nim-sim");
    let mut sims = Vec::new();
    for (name, addr, extra) in [
        ("sim-fast", fast_addr, vec!["--model", "bench/fast"]),
        ("sim-stream", stream_addr, vec!["--model", "bench/stream", "--tokens", "100", "--chunk-delay", "1ms"]),
        ("sim-idle", idle_addr, vec!["--model", "bench/idle", "--stall-after-chunks", "1"]),
    ] {
        let mut argv = vec!["--listen".to_owned(), addr.to_string(), "--threads".to_owned(), "1".to_owned()];
        argv.extend(extra.iter().map(|s| s.to_string()));
        let log = work.join(format!("{name}.log"));
        let mut proc = Proc::spawn(name, Some(1), &sim, &argv, &[], &log)?;
        proc.wait_listening(addr, &log)?;
        sims.push(proc);
    }

    // nimgate on core 0.
    let gateway_addr = procs::free_addr();
    let config = work.join("nimgate.yaml");
    std::fs::write(&config, nimgate_config(gateway_addr, fast_addr, stream_addr, idle_addr, Store::Memory))
        .map_err(|e| e.to_string())?;
    let log = work.join("nimgate.log");
    let mut gateway = Proc::spawn(
        "nimgate",
        Some(0),
        &bin_dir.join("nimgate"),
        &["--config".to_owned(), config.display().to_string()],
        &[("NIMGATE_LOG", "warn")],
        &log,
    )?;
    gateway.wait_listening(gateway_addr, &log)?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle_kib = gateway.rss_kib();

    // With --redis: redis-server on core 1, beside the load generator (as a shared store on
    // another host would be, it takes no CPU from the proxy), and nimgate-redis on core 0.
    let redis = if args.redis {
        let binary =
            procs::redis_binary().ok_or("--redis: redis-server is not installed (benches/run --redis installs it)")?;
        let addr = procs::free_addr();
        let log = work.join("redis-server.log");
        let mut server = Proc::spawn("redis-server", Some(1), &binary, &procs::redis_args(addr, &work), &[], &log)?;
        server.wait_redis(addr, &log)?;
        let gateway_addr = procs::free_addr();
        let config = work.join("nimgate-redis.yaml");
        let yaml = nimgate_config(gateway_addr, fast_addr, stream_addr, idle_addr, Store::Redis(addr));
        std::fs::write(&config, yaml).map_err(|e| e.to_string())?;
        let log = work.join("nimgate-redis.log");
        let argv = ["--config".to_owned(), config.display().to_string()];
        let mut gateway =
            Proc::spawn("nimgate-redis", Some(0), &bin_dir.join("nimgate"), &argv, &[("NIMGATE_LOG", "warn")], &log)?;
        gateway.wait_listening(gateway_addr, &log)?;
        Some((gateway_addr, gateway, server))
    } else {
        None
    };

    // nginx on core 0, one worker.
    let (nginx_fast, nginx_stream) = (procs::free_addr(), procs::free_addr());
    let nginx = match (args.no_nginx, procs::nginx_binary()) {
        (false, Some(nginx)) => {
            let prefix = work.join("nginx");
            std::fs::create_dir_all(&prefix).map_err(|e| e.to_string())?;
            let conf = prefix.join("nginx.conf");
            std::fs::write(
                &conf,
                procs::nginx_config(&prefix, &[(nginx_fast, fast_addr), (nginx_stream, stream_addr)]),
            )
            .map_err(|e| e.to_string())?;
            let argv: Vec<String> =
                ["-p", &prefix.display().to_string(), "-c", &conf.display().to_string(), "-g", "daemon off;"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            let log = work.join("nginx.log");
            let mut proc = Proc::spawn("nginx", Some(0), &nginx, &argv, &[], &log)?;
            proc.wait_listening(nginx_fast, &log)?;
            Some(proc)
        }
        (false, None) => {
            eprintln!("nimgate-bench: nginx is not installed (benches/run installs it); running without it");
            None
        }
        (true, _) => None,
    };

    // Baseline nimgate builds on core 0, when asked for.
    let mut baselines = Vec::new();
    for (i, binary) in args.baseline.iter().enumerate() {
        let name = match args.baseline.len() {
            1 => "baseline".to_owned(),
            _ => binary.file_name().map_or_else(|| format!("baseline {i}"), |n| n.to_string_lossy().into_owned()),
        };
        let addr = procs::free_addr();
        let config = work.join(format!("baseline-{i}.yaml"));
        std::fs::write(&config, nimgate_config(addr, fast_addr, stream_addr, idle_addr, Store::Memory))
            .map_err(|e| e.to_string())?;
        let log = work.join(format!("baseline-{i}.log"));
        let argv = ["--config".to_owned(), config.display().to_string()];
        let mut proc = Proc::spawn("baseline", Some(0), binary, &argv, &[("NIMGATE_LOG", "warn")], &log)?;
        proc.wait_listening(addr, &log)?;
        baselines.push((name, addr, proc));
    }
    if args.affinity {
        let addr = procs::free_addr();
        let config = work.join("nimgate-affinity.yaml");
        std::fs::write(&config, nimgate_config(addr, fast_addr, stream_addr, idle_addr, Store::MemoryWithAffinity))
            .map_err(|e| e.to_string())?;
        let log = work.join("nimgate-affinity.log");
        let argv = ["--config".to_owned(), config.display().to_string()];
        let mut proc = Proc::spawn(
            "nimgate-affinity",
            Some(0),
            &bin_dir.join("nimgate"),
            &argv,
            &[("NIMGATE_LOG", "warn")],
            &log,
        )?;
        proc.wait_listening(addr, &log)?;
        baselines.push(("nimgate-affinity".to_owned(), addr, proc));
    }

    // hyper-floor on core 0, when asked for.
    let (floor_fast, floor_stream) = (procs::free_addr(), procs::free_addr());
    let floor = if args.floor {
        let argv = vec![format!("{floor_fast}={fast_addr}"), format!("{floor_stream}={stream_addr}")];
        let log = work.join("hyper-floor.log");
        let mut proc = Proc::spawn("hyper-floor", Some(0), &bin_dir.join("hyper-floor"), &argv, &[], &log)?;
        proc.wait_listening(floor_fast, &log)?;
        Some(proc)
    } else {
        None
    };

    let chat = |addr: SocketAddr| format!("http://{addr}/v1/chat/completions");
    let mut targets = vec![
        Target { name: "direct".into(), fast: chat(fast_addr), stream: chat(stream_addr), proxy: None, store: None },
        Target {
            name: "nimgate".into(),
            fast: chat(gateway_addr),
            stream: chat(gateway_addr),
            proxy: Some(&gateway),
            store: None,
        },
    ];
    if let Some((addr, proc, server)) = &redis {
        targets.push(Target {
            name: "nimgate-redis".into(),
            fast: chat(*addr),
            stream: chat(*addr),
            proxy: Some(proc),
            store: Some(server),
        });
    }
    if let Some(nginx) = &nginx {
        targets.push(Target {
            name: "nginx".into(),
            fast: chat(nginx_fast),
            stream: chat(nginx_stream),
            proxy: Some(nginx),
            store: None,
        });
    }
    for (name, addr, proc) in &baselines {
        targets.push(Target {
            name: name.clone(),
            fast: chat(*addr),
            stream: chat(*addr),
            proxy: Some(proc),
            store: None,
        });
    }
    if let Some(floor) = &floor {
        targets.push(Target {
            name: "hyper floor".into(),
            fast: chat(floor_fast),
            stream: chat(floor_stream),
            proxy: Some(floor),
            store: None,
        });
    }
    let keys: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| format!("Bearer sk-bench-{i}")).collect());
    let client = load::http1_client();
    let duration = Duration::from_secs_f64(args.duration);

    eprintln!("warming up");
    for target in &targets {
        measure(&client, target, &keys, Load::Closed(64), Duration::from_secs(1), ticks).await;
        measure(&client, target, &keys, Load::Streams(20), Duration::from_millis(500), ticks).await;
    }

    let scenarios: [(&str, Load); 7] = [
        ("closed c=1", Load::Closed(1)),
        ("closed c=64", Load::Closed(64)),
        ("closed c=256", Load::Closed(256)),
        ("open 1000/s", Load::Open(1000)),
        ("open 5000/s", Load::Open(5000)),
        ("streams c=100", Load::Streams(100)),
        ("streams c=1000", Load::Streams(1000)),
    ];
    let scenarios: Vec<(&str, Load)> = scenarios
        .into_iter()
        .filter(|(name, _)| args.only.is_empty() || args.only.iter().any(|only| name.contains(only.as_str())))
        .collect();
    let mut results: Vec<ScenarioResult> = scenarios
        .iter()
        .map(|(name, load)| ScenarioResult {
            name: name.to_string(),
            streaming: matches!(load, Load::Streams(_)),
            cells: targets
                .iter()
                .map(|t| {
                    let cell = Cell {
                        runs: Vec::new(),
                        cpu_per_1k: Vec::new(),
                        cpu_user_share: Vec::new(),
                        store_cpu_per_1k: Vec::new(),
                    };
                    (t.name.clone(), cell)
                })
                .collect(),
        })
        .collect();
    for rep in 0..args.reps {
        for (scenario, (name, load)) in scenarios.iter().enumerate() {
            for (t, target) in targets.iter().enumerate() {
                eprintln!("rep {}/{}: {name} -> {}", rep + 1, args.reps, target.name);
                let (measured, cpu) = measure(&client, target, &keys, *load, duration, ticks).await;
                let cell = &mut results[scenario].cells[t].1;
                if let Some(cpu) = cpu {
                    cell.cpu_per_1k.push(cpu.per_1k);
                    cell.cpu_user_share.push(cpu.user_share);
                    cell.store_cpu_per_1k.extend(cpu.store_per_1k);
                }
                cell.runs.push(measured);
            }
        }
    }

    let memory = if args.idle_streams > 0 {
        eprintln!("memory: {} idle streams through nimgate", args.idle_streams);
        Some(memory_test(gateway_addr, &keys, args.idle_streams, idle_kib, &gateway).await)
    } else {
        None
    };

    let mut peak_rss_kib = vec![("nimgate".to_owned(), gateway.peak_rss_kib())];
    if let Some((_, proc, server)) = &redis {
        peak_rss_kib.push(("nimgate-redis".to_owned(), proc.peak_rss_kib()));
        peak_rss_kib.push(("redis-server".to_owned(), server.peak_rss_kib()));
    }
    if let Some(nginx) = &nginx {
        peak_rss_kib.push(("nginx (master + worker)".to_owned(), nginx.peak_rss_kib()));
    }
    let mut notes = Vec::new();
    if redis.is_some() {
        notes.push(
            "nimgate-redis: the same nimgate binary and config with `rate_limits.store: redis` (timeout 50ms, \
             on_store_error: deny), on a redis-server the harness starts, pinned to core 1 beside the load \
             generator and nim-sim. Each request costs one Lua script round trip to be admitted (on its latency \
             path) and one script call to settle it after the answer (not waited for). Its CPU column counts \
             nimgate alone; redis-server's CPU is noted under each table."
                .to_owned(),
        );
    }
    if args.affinity {
        notes.push(
            "nimgate-affinity: the same nimgate binary and config with `strategy: prefix_affinity` on the \
             benchmarked routes (one backend each, a prompt shorter than one 256-byte block): the strategy's \
             fixed cost per request. What hashing longer prompts adds is in benches/instructions \
             (--strategies two_choices,prefix_affinity --prompt-bytes N)."
                .to_owned(),
        );
    }
    let report = Report {
        machine: machine(),
        date: command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        command: args.command.clone(),
        duration_s: args.duration,
        reps: args.reps,
        scenarios: results,
        notes,
        peak_rss_kib,
        memory,
    };
    let markdown = report.markdown();
    println!("{markdown}");
    std::fs::create_dir_all(&args.out).map_err(|e| e.to_string())?;
    let results_md = args.out.join("RESULTS.md");
    let previous = std::fs::read_to_string(&results_md).unwrap_or_default();
    write(&results_md, &report::keeping_cluster_section(&markdown, &previous))?;
    write(&args.out.join("results.json"), &serde_json::to_string_pretty(&report.json()).unwrap_or_default())?;
    drop(targets);
    drop(nginx);
    drop(floor);
    drop(baselines);
    // nimgate-redis before its store (a tuple drops in field order), so that it does not spend
    // its last moments on store errors.
    drop(redis);
    drop(gateway);
    drop(sims);
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// One run against one target, with the proxy's CPU seconds per 1,000 answered requests and
/// the share of them spent in user space (the rest is the kernel's: sockets, wakeups), and its
/// store's CPU seconds per 1,000 when the store is a process of its own.
async fn measure(
    client: &HttpClient,
    target: &Target<'_>,
    keys: &Arc<Vec<String>>,
    load: Load,
    duration: Duration,
    ticks: f64,
) -> (Measured, Option<Cpu>) {
    let (url, model, stream) = match load {
        Load::Streams(_) => (target.stream.clone(), "bench/stream", true),
        _ => (target.fast.clone(), "bench/fast", false),
    };
    let requests = Arc::new(Requests { url, model, stream, keys: Arc::clone(keys) });
    let cpu_before = target.proxy.map(|p| p.cpu_seconds(ticks));
    let store_before = target.store.map(|p| p.cpu_seconds(ticks));
    let measured = match load {
        Load::Closed(c) => load::closed_loop(client, requests, c, duration, 0).await,
        Load::Open(rate) => load::open_loop(client, requests, rate, duration).await,
        Load::Streams(c) => load::closed_loop(client, requests, c, duration, STREAM_EVENTS).await,
    };
    let cpu = match (target.proxy, cpu_before) {
        (Some(proxy), Some((user_before, system_before))) if measured.ok > 0 => {
            let (user, system) = proxy.cpu_seconds(ticks);
            let (user, system) = (user - user_before, system - system_before);
            let total = user + system;
            let user_share = if total > 0.0 { user / total } else { 0.0 };
            let thousands = measured.ok as f64 / 1000.0;
            let store_per_1k = target.store.zip(store_before).map(|(store, (user_before, system_before))| {
                let (user, system) = store.cpu_seconds(ticks);
                (user - user_before + system - system_before) / thousands
            });
            Some(Cpu { per_1k: total / thousands, user_share, store_per_1k })
        }
        _ => None,
    };
    (measured, cpu)
}

/// Streams per h2 client connection in the memory test: the most hyper's h2 server (and so
/// nimgate) allows at once by default. More would wait in the client, never reaching the gateway.
pub const STREAMS_PER_CONNECTION: usize = 200;

/// Holds `count` idle streams through the gateway (h2 client connections of
/// `STREAMS_PER_CONNECTION` streams, so that the gateway's file descriptors go to its upstream
/// connections) and reads its RSS.
async fn memory_test(gateway: SocketAddr, keys: &Arc<Vec<String>>, count: usize, idle_kib: u64, proc: &Proc) -> Memory {
    let requests = Arc::new(Requests {
        url: format!("http://{gateway}/v1/chat/completions"),
        model: "bench/idle",
        stream: true,
        keys: Arc::clone(keys),
    });
    let mut open = Vec::new();
    let mut failed = 0;
    for start in (0..count).step_by(STREAMS_PER_CONNECTION) {
        let batch = (count - start).min(STREAMS_PER_CONNECTION);
        let (streams, lost) = load::hold_streams(&load::http2_client(), Arc::clone(&requests), batch).await;
        open.extend(streams);
        failed += lost;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded_kib = proc.rss_kib();
    drop(open);
    Memory { idle_kib, streams: count, failed, loaded_kib }
}

/// 100 keys with limits (never reached by the harness's load), 50 routes, three sims; the
/// limiter's state in memory or in the redis-server at the given address.
fn nimgate_config(listen: SocketAddr, fast: SocketAddr, stream: SocketAddr, idle: SocketAddr, store: Store) -> String {
    let mut yaml = String::new();
    let strategy = if store == Store::MemoryWithAffinity { ", strategy: prefix_affinity" } else { "" };
    let _ = writeln!(
        yaml,
        "server:\n  listen: {listen}\n  admin_listen: 127.0.0.1:0\n  drain_timeout: 1s\nbackends:\n  \
         - {{ name: fast, url: \"http://{fast}\" }}\n  - {{ name: stream, url: \"http://{stream}\" }}\n  \
         - {{ name: idle, url: \"http://{idle}\" }}\nroutes:\n  - {{ model: bench/fast, backends: [fast]{strategy} }}\n  \
         - {{ model: bench/stream, backends: [stream]{strategy} }}\n  - {{ model: bench/idle, backends: [idle] }}"
    );
    for i in 0..FILLER_ROUTES {
        let model = if i % 5 == 0 { format!("\"org{i}/*\"") } else { format!("org{i}/model-{i}") };
        let _ = writeln!(yaml, "  - {{ model: {model}, backends: [fast] }}");
    }
    yaml.push_str("keys:\n");
    for i in 0..KEYS {
        let digest = nimgate::auth::digest_hex(&format!("sk-bench-{i}"));
        let _ = writeln!(
            yaml,
            "  - {{ name: team-{i}, key_sha256: {digest}, models: [\"bench/*\", \"org{i}/*\"], \
             limits: {{ requests_per_minute: 600000, tokens_per_minute: 6000000000 }} }}"
        );
    }
    if let Store::Redis(redis) = store {
        // Deny on a store error: a failing store shows as errors in the tables, not as a
        // gateway that got faster by skipping Redis.
        let _ = writeln!(
            yaml,
            "rate_limits:\n  store: redis\n  redis_url: \"redis://{redis}/\"\n  key_prefix: \"bench:\"\n  \
             timeout: 50ms\n  on_store_error: deny"
        );
    }
    yaml
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|l| l.trim_start_matches([' ', '\t', ':']));
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{}, {cores} cores, Linux {}", model.unwrap_or("unknown CPU"), kernel.trim())
}

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimgate::config::{EnvSource, OnStoreError, Snapshot, StoreSettings, load_str, validate};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn validated(store: Store) -> Snapshot {
        let yaml = nimgate_config(addr(1), addr(2), addr(3), addr(4), store);
        let raw = load_str(&yaml, config::FileFormat::Yaml, &EnvSource::Map(Default::default())).unwrap();
        validate(&raw, &EnvSource::Map(Default::default())).unwrap()
    }

    #[test]
    fn the_generated_config_is_valid_and_as_described() {
        let snapshot = validated(Store::Memory);
        assert_eq!(snapshot.keys.len(), KEYS);
        assert_eq!(snapshot.routes.len(), 50);
        assert!(snapshot.routes.find("bench/stream").is_some());
        assert!(snapshot.routes.find("org5/anything").is_some());
        assert!(matches!(snapshot.rate_limits.store, StoreSettings::Memory));
    }

    /// Validation parses the Redis URL without connecting, so no server is needed here.
    #[test]
    fn the_redis_variant_is_valid_and_differs_only_in_its_store() {
        let snapshot = validated(Store::Redis(addr(6380)));
        assert_eq!(snapshot.keys.len(), KEYS);
        assert_eq!(snapshot.routes.len(), 50);
        let StoreSettings::Redis(redis) = &snapshot.rate_limits.store else {
            panic!("the store is not redis: {:?}", snapshot.rate_limits.store);
        };
        assert_eq!(redis.url, "redis://127.0.0.1:6380/");
        assert_eq!(redis.key_prefix, "bench:");
        assert_eq!(redis.timeout, Duration::from_millis(50));
        assert!(matches!(snapshot.rate_limits.on_store_error, OnStoreError::Deny));
        let memory = nimgate_config(addr(1), addr(2), addr(3), addr(4), Store::Memory);
        let redis = nimgate_config(addr(1), addr(2), addr(3), addr(4), Store::Redis(addr(6380)));
        assert!(redis.starts_with(&memory), "the redis config only appends its rate_limits section");
    }

    #[test]
    fn the_affinity_variant_balances_the_benchmarked_routes_by_prefix_affinity() {
        use nimgate::upstream::Strategy;
        let snapshot = validated(Store::MemoryWithAffinity);
        let strategy = |model: &str| snapshot.routes.find(model).unwrap().pool.strategy();
        assert_eq!(strategy("bench/fast"), Strategy::PrefixAffinity);
        assert_eq!(strategy("bench/stream"), Strategy::PrefixAffinity);
        assert_eq!(strategy("bench/idle"), Strategy::TwoChoices);
        assert_eq!(validated(Store::Memory).routes.find("bench/fast").unwrap().pool.strategy(), Strategy::TwoChoices);
    }
}
