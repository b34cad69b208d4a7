//! Turning runs into the cluster section of `RESULTS.md`: medians per setup over the
//! interleaved repetitions, issue #17's three targets checked against them, every run listed
//! below so the spread is visible, and the method stated with the figures.

use std::fmt::Write as _;

use crate::cluster::{AFFINITY_RESULTS, Counters, Setup};
use crate::replay::Replayed;
use crate::sampler::Load;

/// One run of one setup, everything it measured.
pub struct Run {
    pub setup: Setup,
    pub rep: usize,
    pub replayed: Replayed,
    pub load: Load,
    pub counters: Counters,
}

impl Run {
    fn ttft_ms(&self, quantile: f64) -> f64 {
        self.replayed.ttft.value_at_quantile(quantile) as f64 / 1000.0
    }
}

/// Medians of a setup's runs.
struct Figures {
    runs: usize,
    hit_rate: f64,
    ttft_p50_ms: f64,
    ttft_p99_ms: f64,
    requests_per_second: f64,
    tokens_per_second: f64,
    /// Each backend's time-averaged load, median over the runs backend by backend.
    load: Vec<f64>,
    imbalance: f64,
    affinity: [f64; 3],
    turns: u64,
    errors: u64,
}

/// The median (the upper one of an even count); 0 for none.
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// The workload and settings, as the report states them.
pub struct Method {
    pub workload: String,
    pub sims: String,
    pub gateway: String,
    pub reps: usize,
    /// Why a setting differs from the design, one line each.
    pub notes: Vec<String>,
}

pub struct Report {
    pub date: String,
    pub machine: String,
    pub command: String,
    pub method: Method,
    pub runs: Vec<Run>,
    /// Setups that did not run, and why (a nimgate that rejects `strategy: prefix_affinity`).
    pub skipped: Vec<(Setup, String)>,
}

/// A target check: what, the figure, whether it holds (None: not measured).
struct Check {
    what: &'static str,
    detail: String,
    holds: Option<bool>,
}

const SETUPS: [Setup; 3] = [Setup::TwoChoices, Setup::PrefixAffinity, Setup::Reference];

impl Report {
    fn figures(&self, setup: Setup) -> Option<Figures> {
        let runs: Vec<&Run> = self.runs.iter().filter(|r| r.setup == setup).collect();
        if runs.is_empty() {
            return None;
        }
        let q = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(|r| f(r)).collect());
        let backends = runs.iter().map(|r| r.load.per_backend.len()).max().unwrap_or(0);
        Some(Figures {
            runs: runs.len(),
            hit_rate: q(&|r| r.counters.hit_rate()),
            ttft_p50_ms: q(&|r| r.ttft_ms(0.5)),
            ttft_p99_ms: q(&|r| r.ttft_ms(0.99)),
            requests_per_second: q(&|r| r.replayed.requests_per_second()),
            tokens_per_second: q(&|r| r.replayed.tokens_per_second()),
            load: (0..backends).map(|b| q(&|r| r.load.per_backend.get(b).copied().unwrap_or(0.0))).collect(),
            imbalance: q(&|r| r.load.imbalance()),
            affinity: [0, 1, 2].map(|i| q(&|r| r.counters.affinity[i])),
            turns: runs.iter().map(|r| r.replayed.turns).sum(),
            errors: runs.iter().map(|r| r.replayed.errors).sum(),
        })
    }

    fn checks(&self) -> Vec<Check> {
        let (two, affinity, reference) =
            (self.figures(Setup::TwoChoices), self.figures(Setup::PrefixAffinity), self.figures(Setup::Reference));
        let hit = match (&affinity, &reference) {
            (Some(a), Some(r)) => Check {
                what: "prefix affinity: cache hit rate ≥ 85 % of the reference's",
                detail: format!(
                    "{:.1} % vs {:.1} %: {:.0} % of it",
                    100.0 * a.hit_rate,
                    100.0 * r.hit_rate,
                    100.0 * a.hit_rate / r.hit_rate.max(f64::MIN_POSITIVE)
                ),
                holds: Some(a.hit_rate >= 0.85 * r.hit_rate),
            },
            _ => Check {
                what: "prefix affinity: cache hit rate ≥ 85 % of the reference's",
                detail: "not run".into(),
                holds: None,
            },
        };
        let ttft = match (&affinity, &two) {
            (Some(a), Some(t)) => Check {
                what: "prefix affinity: TTFT p50 ≥ 2× lower than two choices",
                detail: format!(
                    "{:.1} ms vs {:.1} ms: {:.2}× lower",
                    a.ttft_p50_ms,
                    t.ttft_p50_ms,
                    t.ttft_p50_ms / a.ttft_p50_ms.max(f64::MIN_POSITIVE)
                ),
                holds: Some(t.ttft_p50_ms >= 2.0 * a.ttft_p50_ms),
            },
            _ => Check {
                what: "prefix affinity: TTFT p50 ≥ 2× lower than two choices",
                detail: "not run".into(),
                holds: None,
            },
        };
        let load = match &affinity {
            Some(a) => Check {
                what: "prefix affinity: max/mean load ≤ 1.25",
                detail: format!("{:.2}", a.imbalance),
                holds: Some(a.imbalance <= 1.25),
            },
            None => Check { what: "prefix affinity: max/mean load ≤ 1.25", detail: "not run".into(), holds: None },
        };
        vec![hit, ttft, load]
    }

    /// The section, between its markers, ready for `nimgate_benches::with_cluster_section`.
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{}", nimgate_benches::CLUSTER_START);
        let _ = writeln!(out, "# Cluster benchmark: prefix affinity vs two choices (#17)\n");
        let _ = writeln!(out, "- Date: {}", self.date);
        let _ = writeln!(out, "- Machine: {}", self.machine);
        let _ = writeln!(out, "- Command: `{}`", self.command);
        let _ = writeln!(out, "- Workload: {}", self.method.workload);
        let _ = writeln!(out, "- Each GPU: `nim-sim {}`", self.method.sims);
        let _ = writeln!(out, "- Gateway: {}", self.method.gateway);
        let _ = writeln!(
            out,
            "- Method: fresh sims and nimgate for every run (empty caches, counters at 0); nimgate pinned to \
             core 0, the sims and the client to core 1. Runs interleave (two choices, prefix affinity, two \
             choices, ...; the reference last), {} of each 4-GPU setup; each figure is the median over a \
             setup's runs. Hit rate: Σ `prefix_cache_hits_total` / Σ `prefix_cache_queries_total` over the \
             sims (prompt tokens found cached / looked up). TTFT: client side, from sending the request to \
             the first event carrying content. Throughput: turns answered and completion tokens (content \
             events) over the run's wall time. Load: every 50 ms each sim's `num_requests_running` + \
             `num_requests_waiting`; a backend's load is the mean of its samples (a time average), and \
             max/mean is the largest of those means over their mean.",
            self.method.reps
        );
        for note in &self.method.notes {
            let _ = writeln!(out, "- {note}");
        }
        for (setup, why) in &self.skipped {
            let _ = writeln!(out, "- Not run: {}: {why}", setup.name());
        }
        let _ = writeln!(out, "\n## Targets\n\n| target | figure | holds |\n|---|---|---|");
        for c in self.checks() {
            let holds = match c.holds {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "-",
            };
            let _ = writeln!(out, "| {} | {} | {holds} |", c.what, c.detail);
        }
        let _ = writeln!(
            out,
            "\n## Medians\n\n| setup | runs | hit rate | TTFT p50 | TTFT p99 | turns/s | completion tok/s | \
             load per GPU (mean in flight) | max/mean | affinity hit / miss / overflow | turns | errors |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|"
        );
        for setup in SETUPS {
            let Some(f) = self.figures(setup) else { continue };
            let load: Vec<String> = f.load.iter().map(|l| format!("{l:.1}")).collect();
            let affinity = match setup {
                Setup::PrefixAffinity => f.affinity.map(|n| format!("{n:.0}")).join(" / "),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.1} % | {:.1} ms | {:.1} ms | {:.1} | {:.0} | {} | {:.2} | {affinity} | {} | {} |",
                setup.name(),
                f.runs,
                100.0 * f.hit_rate,
                f.ttft_p50_ms,
                f.ttft_p99_ms,
                f.requests_per_second,
                f.tokens_per_second,
                load.join(", "),
                f.imbalance,
                f.turns,
                f.errors
            );
        }
        let _ = writeln!(
            out,
            "\n## Every run\n\n| # | setup | hit rate | TTFT p50 | TTFT p99 | turns/s | max/mean | affinity {} | \
             seconds | load samples | errors |\n|---|---|---|---|---|---|---|---|---|---|---|",
            AFFINITY_RESULTS.join(" / ")
        );
        for (i, run) in self.runs.iter().enumerate() {
            let affinity = match run.setup {
                Setup::PrefixAffinity => run.counters.affinity.map(|n| format!("{n:.0}")).join(" / "),
                _ => "-".into(),
            };
            let errors = match &run.replayed.first_error {
                Some(first) => format!("{} (first: {})", run.replayed.errors, first.replace('|', "\\|")),
                None => run.replayed.errors.to_string(),
            };
            let _ = writeln!(
                out,
                "| {} | {} (rep {}) | {:.1} % | {:.1} ms | {:.1} ms | {:.1} | {:.2} | {affinity} | {:.1} | {} | {errors} |",
                i + 1,
                run.setup.name(),
                run.rep + 1,
                100.0 * run.counters.hit_rate(),
                run.ttft_ms(0.5),
                run.ttft_ms(0.99),
                run.replayed.requests_per_second(),
                run.load.imbalance(),
                run.replayed.seconds,
                run.load.samples,
            );
        }
        let _ = writeln!(out, "{}", nimgate_benches::CLUSTER_END);
        out
    }
}
