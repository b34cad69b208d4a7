//! The processes of one run: nim-sim GPUs with prefix caches and a nimgate in front of them, in
//! one of the three setups compared, started fresh for every run so that caches and counters
//! start empty, and killed (by PID, when dropped) before the next. Also the gateway's config for
//! each setup and the counters read off every process when a run is over.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::client::{self, HttpClient};
use crate::procs::{self, Proc};
use crate::scrape;
use crate::workload::MODEL;

/// What is compared.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Setup {
    /// Four GPUs behind the route's default strategy.
    TwoChoices,
    /// Four GPUs behind `strategy: prefix_affinity`.
    PrefixAffinity,
    /// One GPU with the four's cache and slots together: the hit rate a balancer could at best
    /// approach, since no prompt is ever on the wrong GPU.
    Reference,
}

impl Setup {
    pub fn name(self) -> &'static str {
        match self {
            Self::TwoChoices => "two choices",
            Self::PrefixAffinity => "prefix affinity",
            Self::Reference => "reference: 1 GPU, 4× cache and slots",
        }
    }

    /// GPUs, and how many of a standard GPU's cache and slots each one has.
    fn gpus_and_scale(self) -> (usize, usize) {
        match self {
            Self::TwoChoices | Self::PrefixAffinity => (4, 1),
            Self::Reference => (1, 4),
        }
    }

    fn strategy(self) -> Option<&'static str> {
        (self == Self::PrefixAffinity).then_some("prefix_affinity")
    }
}

/// One simulated GPU, as nim-sim's flags set it.
#[derive(Clone, Copy)]
pub struct SimSettings {
    pub kv_cache_tokens: u64,
    pub kv_block_tokens: u32,
    pub ttft_ms: u64,
    pub prefill_per_token_us: u64,
    pub max_concurrency: usize,
    pub tokens: u32,
    pub chunk_delay_ms: u64,
}

impl SimSettings {
    /// nim-sim's arguments for a GPU `scale` times this one's cache and slots.
    fn args(&self, listen: SocketAddr, scale: usize) -> Vec<String> {
        let flags = [
            ("--listen", listen.to_string()),
            ("--model", MODEL.to_owned()),
            ("--threads", "1".to_owned()),
            ("--kv-cache-tokens", (self.kv_cache_tokens * scale as u64).to_string()),
            ("--kv-block-tokens", self.kv_block_tokens.to_string()),
            ("--ttft", format!("{}ms", self.ttft_ms)),
            ("--prefill-per-token", format!("{}us", self.prefill_per_token_us)),
            ("--max-concurrency", (self.max_concurrency * scale).to_string()),
            ("--tokens", self.tokens.to_string()),
            ("--chunk-delay", format!("{}ms", self.chunk_delay_ms)),
            ("--metrics-dialect", "nim1".to_owned()),
        ];
        flags.into_iter().flat_map(|(flag, value)| [flag.to_owned(), value]).collect()
    }

    /// The flags as a command line, for the report.
    pub fn describe(&self) -> String {
        let args = self.args(SocketAddr::from(([127, 0, 0, 1], 0)), 1);
        args[2..].join(" ").replace(&format!("--model {MODEL} --threads 1 "), "")
    }
}

/// Counters read after a run.
pub struct Counters {
    /// Σ `prefix_cache_queries_total` over the sims (tokens).
    pub queried_tokens: f64,
    /// Σ `prefix_cache_hits_total` over the sims (tokens).
    pub hit_tokens: f64,
    /// `nimgate_affinity_decisions_total` by result: hit, miss, overflow (0 where absent).
    pub affinity: [f64; 3],
}

impl Counters {
    pub fn hit_rate(&self) -> f64 {
        if self.queried_tokens > 0.0 { self.hit_tokens / self.queried_tokens } else { 0.0 }
    }
}

/// The affinity metric's results, in `Counters::affinity`'s order.
pub const AFFINITY_RESULTS: [&str; 3] = ["hit", "miss", "overflow"];

/// A running setup. Fields drop in order: the gateway goes before the backends it talks to.
pub struct Cluster {
    _gateway: Proc,
    _sims: Vec<Proc>,
    pub api_url: String,
    admin_metrics_url: String,
    pub sim_metrics_urls: Vec<String>,
}

/// Where the binaries are and where the configs and logs go.
pub struct Paths {
    pub bin_dir: PathBuf,
    pub work: PathBuf,
}

impl Cluster {
    /// Starts `setup`'s sims on core 1 (beside the client) and nimgate on core 0, and waits
    /// until all listen. `affinity` is a YAML flow map for `balancing.prefix_affinity`.
    pub fn start(paths: &Paths, setup: Setup, sim: &SimSettings, affinity: Option<&str>) -> Result<Self, String> {
        let (gpus, scale) = setup.gpus_and_scale();
        let mut sims = Vec::with_capacity(gpus);
        let mut backends = Vec::with_capacity(gpus);
        for gpu in 0..gpus {
            let (name, addr) = (format!("gpu{gpu}"), procs::free_addr());
            let log = paths.work.join(format!("{name}.log"));
            let mut proc =
                Proc::spawn(&name, Some(1), &paths.bin_dir.join("nim-sim"), &sim.args(addr, scale), &[], &log)?;
            proc.wait_listening(addr, &log)?;
            sims.push(proc);
            backends.push((name, addr));
        }
        let (listen, admin) = (procs::free_addr(), procs::free_addr());
        let yaml = gateway_config(listen, admin, &backends, sim.max_concurrency * scale, setup.strategy(), affinity);
        let config = paths.work.join("nimgate.yaml");
        std::fs::write(&config, yaml).map_err(|e| format!("{}: {e}", config.display()))?;
        let log = paths.work.join("nimgate.log");
        let argv = ["--config".to_owned(), config.display().to_string()];
        let mut gateway =
            Proc::spawn("nimgate", Some(0), &paths.bin_dir.join("nimgate"), &argv, &[("NIMGATE_LOG", "warn")], &log)?;
        gateway.wait_listening(listen, &log)?;
        gateway.wait_listening(admin, &log)?;
        Ok(Self {
            _gateway: gateway,
            _sims: sims,
            api_url: format!("http://{listen}/v1/chat/completions"),
            admin_metrics_url: format!("http://{admin}/metrics"),
            sim_metrics_urls: backends.iter().map(|(_, addr)| format!("http://{addr}/v1/metrics")).collect(),
        })
    }

    /// The prefix-cache counters of every sim and the gateway's affinity decisions.
    pub async fn counters(&self, client: &HttpClient) -> Result<Counters, String> {
        let (mut queried_tokens, mut hit_tokens) = (0.0, 0.0);
        for url in &self.sim_metrics_urls {
            let page = client::get_text(client, url).await?;
            queried_tokens += scrape::sum(&page, "prefix_cache_queries_total", &[]);
            hit_tokens += scrape::sum(&page, "prefix_cache_hits_total", &[]);
        }
        let page = client::get_text(client, &self.admin_metrics_url).await?;
        let affinity = AFFINITY_RESULTS.map(|result| {
            scrape::sum(&page, "nimgate_affinity_decisions_total", &[("model", MODEL), ("result", result)])
        });
        Ok(Counters { queried_tokens, hit_tokens, affinity })
    }
}

/// Whether this nimgate accepts `setup`'s config: `Err` with its complaint when not (a build
/// without prefix affinity rejects `strategy`).
pub fn check(paths: &Paths, setup: Setup, sim: &SimSettings, affinity: Option<&str>) -> Result<(), String> {
    let (gpus, scale) = setup.gpus_and_scale();
    let backends: Vec<(String, SocketAddr)> =
        (0..gpus).map(|gpu| (format!("gpu{gpu}"), SocketAddr::from(([127, 0, 0, 1], 1)))).collect();
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let yaml = gateway_config(any, any, &backends, sim.max_concurrency * scale, setup.strategy(), affinity);
    let config = paths.work.join("check.yaml");
    std::fs::write(&config, yaml).map_err(|e| format!("{}: {e}", config.display()))?;
    let output = std::process::Command::new(paths.bin_dir.join("nimgate"))
        .arg("check-config")
        .arg(&config)
        .output()
        .map_err(|e| format!("nimgate check-config: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    let said = String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    Err(said.lines().filter(|l| !l.trim().is_empty()).skip(1).map(str::trim).collect::<Vec<_>>().join("; "))
}

/// One route over `backends`, each capped at the sim's slots so that the gateway, not the
/// sims, holds the queue (where a balancer can still choose); queueing long enough that
/// nothing is refused, anonymous callers, no limits.
fn gateway_config(
    listen: SocketAddr,
    admin: SocketAddr,
    backends: &[(String, SocketAddr)],
    max_concurrency: usize,
    strategy: Option<&str>,
    affinity: Option<&str>,
) -> String {
    let mut yaml = format!(
        "server:\n  listen: {listen}\n  admin_listen: {admin}\n  allow_anonymous: true\n  drain_timeout: 1s\nbackends:\n"
    );
    for (name, addr) in backends {
        let _ = writeln!(yaml, "  - {{ name: {name}, url: \"http://{addr}\", max_concurrency: {max_concurrency} }}");
    }
    yaml.push_str("balancing:\n  queue_length: 1000\n  queue_timeout: 60s\n");
    if let Some(affinity) = affinity {
        let _ = writeln!(yaml, "  prefix_affinity: {affinity}");
    }
    let names: Vec<&str> = backends.iter().map(|(name, _)| name.as_str()).collect();
    let _ = writeln!(yaml, "routes:\n  - model: {MODEL}\n    backends: [{}]", names.join(", "));
    if let Some(strategy) = strategy {
        let _ = writeln!(yaml, "    strategy: {strategy}");
    }
    yaml
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimgate::config::{EnvSource, load_str, validate};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn the_two_choices_config_is_valid_with_one_route_over_four_gpus() {
        let backends: Vec<_> = (0..4).map(|i| (format!("gpu{i}"), addr(100 + i))).collect();
        let yaml = gateway_config(addr(1), addr(2), &backends, 8, None, None);
        let env = EnvSource::Map(Default::default());
        let raw = load_str(&yaml, config::FileFormat::Yaml, &env).unwrap();
        let snapshot = validate(&raw, &env).unwrap();
        assert!(snapshot.server.allow_anonymous);
        assert!(snapshot.routes.find(MODEL).is_some());
        assert_eq!(snapshot.routes.len(), 1);
    }

    #[test]
    fn the_affinity_config_differs_only_in_strategy_and_its_settings() {
        let backends = [("gpu0".to_owned(), addr(100))];
        let plain = gateway_config(addr(1), addr(2), &backends, 8, None, None);
        let affinity =
            gateway_config(addr(1), addr(2), &backends, 8, Some("prefix_affinity"), Some("{ load_bound: 1.25 }"));
        assert!(affinity.contains("  prefix_affinity: { load_bound: 1.25 }\nroutes:"));
        assert!(affinity.ends_with("    backends: [gpu0]\n    strategy: prefix_affinity\n"));
        let stripped = affinity
            .replace("  prefix_affinity: { load_bound: 1.25 }\n", "")
            .replace("    strategy: prefix_affinity\n", "");
        assert_eq!(stripped, plain);
    }

    #[test]
    fn a_reference_gpu_has_four_times_the_cache_and_slots() {
        let sim = SimSettings {
            kv_cache_tokens: 16_384,
            kv_block_tokens: 16,
            ttft_ms: 5,
            prefill_per_token_us: 100,
            max_concurrency: 8,
            tokens: 24,
            chunk_delay_ms: 2,
        };
        let args = sim.args(addr(9), 4).join(" ");
        assert!(args.contains("--kv-cache-tokens 65536") && args.contains("--max-concurrency 32"), "{args}");
        assert_eq!(
            sim.describe(),
            "--kv-cache-tokens 16384 --kv-block-tokens 16 --ttft 5ms --prefill-per-token 100us --max-concurrency 8 \
             --tokens 24 --chunk-delay 2ms --metrics-dialect nim1"
        );
    }
}
