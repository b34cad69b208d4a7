//! Turning runs into the table: medians over the repetitions, latency added to the direct
//! floor, the targets checked as ratios of figures from the same run, then Markdown
//! and JSON.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::load::Measured;

/// One target's repetitions of one scenario.
pub struct Cell {
    pub runs: Vec<Measured>,
    /// CPU seconds of the proxy per 1,000 answered requests, per repetition (None: no proxy).
    pub cpu_per_1k: Vec<f64>,
    /// Share of that CPU time spent in user space, per repetition.
    pub cpu_user_share: Vec<f64>,
    /// CPU seconds of the proxy's store (redis-server, for `nimgate-redis`) per 1,000 answered
    /// requests, per repetition: beside the proxy's own, not in it.
    pub store_cpu_per_1k: Vec<f64>,
}

/// Medians of a cell's figures.
#[derive(Clone, Copy, Default)]
pub struct Figures {
    pub throughput: f64,
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    pub ttfb_p50: f64,
    pub ttfb_p99: f64,
    pub gap_p50: f64,
    pub gap_p99: f64,
    pub errors: u64,
    pub complete_share: f64,
    pub cpu_per_1k: Option<f64>,
    pub cpu_user_share: Option<f64>,
    pub store_cpu_per_1k: Option<f64>,
}

fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    values[values.len() / 2]
}

impl Cell {
    pub fn figures(&self) -> Figures {
        let q = |f: &dyn Fn(&Measured) -> f64| median(self.runs.iter().map(f).collect());
        Figures {
            throughput: q(&|m| m.throughput()),
            p50: q(&|m| m.latency.value_at_quantile(0.5) as f64),
            p99: q(&|m| m.latency.value_at_quantile(0.99) as f64),
            p999: q(&|m| m.latency.value_at_quantile(0.999) as f64),
            ttfb_p50: q(&|m| m.ttfb.value_at_quantile(0.5) as f64),
            ttfb_p99: q(&|m| m.ttfb.value_at_quantile(0.99) as f64),
            gap_p50: q(&|m| m.gaps.value_at_quantile(0.5) as f64),
            gap_p99: q(&|m| m.gaps.value_at_quantile(0.99) as f64),
            errors: self.runs.iter().map(|m| m.errors).sum(),
            complete_share: q(&|m| if m.ok == 0 { 0.0 } else { m.complete_streams as f64 / m.ok as f64 }),
            cpu_per_1k: (!self.cpu_per_1k.is_empty()).then(|| median(self.cpu_per_1k.clone())),
            cpu_user_share: (!self.cpu_user_share.is_empty()).then(|| median(self.cpu_user_share.clone())),
            store_cpu_per_1k: (!self.store_cpu_per_1k.is_empty()).then(|| median(self.store_cpu_per_1k.clone())),
        }
    }
}

/// A scenario and its cells, one per target, in target order.
pub struct ScenarioResult {
    pub name: String,
    pub streaming: bool,
    pub cells: Vec<(String, Cell)>,
}

pub struct Memory {
    pub idle_kib: u64,
    pub streams: usize,
    pub failed: usize,
    pub loaded_kib: u64,
}

impl Memory {
    pub fn per_stream_kib(&self) -> f64 {
        // Per stream held: a stream that failed to open holds nothing.
        self.loaded_kib.saturating_sub(self.idle_kib) as f64 / self.streams.saturating_sub(self.failed).max(1) as f64
    }
}

pub struct Report {
    pub machine: String,
    pub date: String,
    pub command: String,
    pub duration_s: f64,
    pub reps: usize,
    pub scenarios: Vec<ScenarioResult>,
    /// Method notes beyond the usual targets (what `nimgate-redis` is), one line each.
    pub notes: Vec<String>,
    pub peak_rss_kib: Vec<(String, u64)>,
    pub memory: Option<Memory>,
}

/// `markdown` followed by the cluster section of the `RESULTS.md` it replaces, when that has
/// one: the section is `nimgate-cluster`'s, and a harness run must not lose its figures.
pub fn keeping_cluster_section(markdown: &str, previous: &str) -> String {
    match nimgate_benches::cluster_section(previous) {
        Some(section) => nimgate_benches::with_cluster_section(markdown, section),
        None => markdown.to_owned(),
    }
}

fn us(v: f64) -> String {
    if v >= 10_000.0 { format!("{:.1} ms", v / 1000.0) } else { format!("{v:.0} µs") }
}

fn signed_us(v: f64) -> String {
    if v < 0.0 { format!("-{}", us(-v)) } else { format!("+{}", us(v)) }
}

/// A target check: what, the figure, the bound, whether it holds.
struct Check {
    what: String,
    holds: bool,
    detail: String,
}

impl Report {
    fn figures(&self, scenario: &str, target: &str) -> Option<Figures> {
        let s = self.scenarios.iter().find(|s| s.name == scenario)?;
        s.cells.iter().find(|(t, _)| t == target).map(|(_, c)| c.figures())
    }

    /// The open performance issue's targets (#19): throughput and CPU per request against
    /// nginx's, added latency at most nginx's, memory per idle stream.
    fn checks(&self) -> Vec<Check> {
        let mut checks = Vec::new();
        for scenario in ["closed c=64", "closed c=256"] {
            if let (Some(g), Some(n)) = (self.figures(scenario, "nimgate"), self.figures(scenario, "nginx")) {
                checks.push(Check {
                    what: format!("{scenario}: throughput ≥ 1.0 × nginx"),
                    holds: g.throughput >= n.throughput,
                    detail: format!("{:.2} ×", g.throughput / n.throughput.max(1.0)),
                });
                if let (Some(gc), Some(nc)) = (g.cpu_per_1k, n.cpu_per_1k) {
                    checks.push(Check {
                        what: format!("{scenario}: CPU per request ≤ nginx"),
                        holds: gc <= nc,
                        detail: format!("{gc:.4} vs {nc:.4} CPU-s per 1k"),
                    });
                }
            }
        }
        if let (Some(d), Some(g), Some(n)) = (
            self.figures("open 1000/s", "direct"),
            self.figures("open 1000/s", "nimgate"),
            self.figures("open 1000/s", "nginx"),
        ) {
            let (gp50, np50, gp99, np99) = (g.p50 - d.p50, n.p50 - d.p50, g.p99 - d.p99, n.p99 - d.p99);
            checks.push(Check {
                what: "open 1000/s: added p50 ≤ nginx's".into(),
                holds: gp50 <= np50,
                detail: format!("{} vs {}", signed_us(gp50), signed_us(np50)),
            });
            checks.push(Check {
                what: "open 1000/s: added p99 ≤ nginx's".into(),
                holds: gp99 <= np99,
                detail: format!("{} vs {}", signed_us(gp99), signed_us(np99)),
            });
        }
        for scenario in self.scenarios.iter().filter(|s| s.streaming) {
            if let (Some(d), Some(g)) =
                (self.figures(&scenario.name, "direct"), self.figures(&scenario.name, "nimgate"))
            {
                let added = g.ttfb_p50 - d.ttfb_p50;
                checks.push(Check {
                    what: format!("{}: added TTFB p50 ≤ 100 µs", scenario.name),
                    holds: added <= 100.0,
                    detail: signed_us(added),
                });
                checks.push(Check {
                    what: format!("{}: every stream carries every event", scenario.name),
                    holds: g.complete_share >= 0.999 && g.errors == 0,
                    detail: format!("{:.1} % complete, {} errors", 100.0 * g.complete_share, g.errors),
                });
            }
        }
        if let Some(m) = &self.memory {
            checks.push(Check {
                what: format!("{} idle streams: ≤ 24 KiB RSS per stream", m.streams),
                holds: m.per_stream_kib() <= 24.0 && m.failed == 0,
                detail: format!("{:.1} KiB ({} failed to open)", m.per_stream_kib(), m.failed),
            });
            checks.push(Check {
                what: "idle RSS ≤ 32 MiB".into(),
                holds: m.idle_kib <= 32 * 1024,
                detail: format!("{:.1} MiB", m.idle_kib as f64 / 1024.0),
            });
        }
        checks
    }

    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# nimgate load harness: latest results\n");
        let _ = writeln!(out, "- Date: {}", self.date);
        let _ = writeln!(out, "- Machine: {}", self.machine);
        let _ = writeln!(out, "- Command: `{}`", self.command);
        let _ = writeln!(
            out,
            "- Method: the proxy under test (nimgate or nginx) pinned to core 0; the load generator and nim-sim \
             (release, zero latency) share core 1. Each cell is the median of {} interleaved runs of {:.0} s \
             (direct, nimgate, nginx, direct, ...). Latency of open-loop runs is measured from when each request \
             was due (no coordinated omission). nimgate runs a realistic config: 100 keys with request and \
             token limits (requests rotate over them), 50 routes, usage metering on; logging at warn, like \
             nginx with access_log off.",
            self.reps, self.duration_s
        );
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        let checks = self.checks();
        if checks.is_empty() {
            // Every target compares with nginx or a scenario that did not run.
            let _ = writeln!(out, "\n## Targets\n\nNone checked: nginx or the scenarios they need did not run.");
        } else {
            let _ = writeln!(out, "\n## Targets\n\n| target | figure | holds |\n|---|---|---|");
        }
        for c in checks {
            let _ = writeln!(out, "| {} | {} | {} |", c.what, c.detail, if c.holds { "yes" } else { "**no**" });
        }
        let _ = writeln!(
            out,
            "\nWhere the missed targets go, with profiles: [ANALYSIS.md](ANALYSIS.md). Figures move by up to \
             30 % between runs on this machine class; compare within one run, never across runs."
        );
        for scenario in &self.scenarios {
            let direct = scenario.cells.iter().find(|(t, _)| t == "direct").map(|(_, c)| c.figures());
            let _ = writeln!(out, "\n## {}\n", scenario.name);
            if scenario.streaming {
                let _ = writeln!(
                    out,
                    "| target | streams/s | TTFB p50 | TTFB p99 | added TTFB p50 | gap p50 | gap p99 | complete | errors | CPU-s / 1k |\n|---|---|---|---|---|---|---|---|---|---|"
                );
            } else {
                let _ = writeln!(
                    out,
                    "| target | req/s | p50 | p99 | p99.9 | added p50 | added p99 | errors | CPU-s / 1k |\n|---|---|---|---|---|---|---|---|---|"
                );
            }
            for (target, cell) in &scenario.cells {
                let f = cell.figures();
                let cpu = match (f.cpu_per_1k, f.cpu_user_share) {
                    (Some(c), Some(u)) => format!("{c:.4} ({:.0} % user)", 100.0 * u),
                    _ => "-".into(),
                };
                if scenario.streaming {
                    let added = direct.map_or("-".into(), |d| signed_us(f.ttfb_p50 - d.ttfb_p50));
                    let _ = writeln!(
                        out,
                        "| {target} | {:.0} | {} | {} | {added} | {} | {} | {:.1} % | {} | {cpu} |",
                        f.throughput,
                        us(f.ttfb_p50),
                        us(f.ttfb_p99),
                        us(f.gap_p50),
                        us(f.gap_p99),
                        100.0 * f.complete_share,
                        f.errors
                    );
                } else {
                    let (a50, a99) = direct
                        .map_or(("-".into(), "-".into()), |d| (signed_us(f.p50 - d.p50), signed_us(f.p99 - d.p99)));
                    let _ = writeln!(
                        out,
                        "| {target} | {:.0} | {} | {} | {} | {a50} | {a99} | {} | {cpu} |",
                        f.throughput,
                        us(f.p50),
                        us(f.p99),
                        us(f.p999),
                        f.errors
                    );
                }
            }
            for (target, cell) in &scenario.cells {
                if let Some(store) = cell.figures().store_cpu_per_1k {
                    let _ = writeln!(
                        out,
                        "\n{target}'s store, redis-server: {store:.4} CPU-s per 1k requests (on core 1, not in the \
                         CPU column above)."
                    );
                }
            }
        }
        let _ = writeln!(out, "\n## Memory\n\n| process | peak RSS |\n|---|---|");
        for (name, kib) in &self.peak_rss_kib {
            let _ = writeln!(out, "| {name} | {:.1} MiB |", *kib as f64 / 1024.0);
        }
        if let Some(m) = &self.memory {
            let _ = writeln!(
                out,
                "\nnimgate idle: {:.1} MiB; holding {} idle streams ({} failed to open; {} h2 client connections of {} \
                 streams, one HTTP/1.1 upstream connection each): {:.1} MiB, {:.1} KiB per stream held.",
                m.idle_kib as f64 / 1024.0,
                m.streams,
                m.failed,
                m.streams.div_ceil(crate::STREAMS_PER_CONNECTION),
                crate::STREAMS_PER_CONNECTION,
                m.loaded_kib as f64 / 1024.0,
                m.per_stream_kib()
            );
        }
        out
    }

    pub fn json(&self) -> Value {
        let scenarios: Vec<Value> = self
            .scenarios
            .iter()
            .map(|s| {
                let cells: Vec<Value> = s
                    .cells
                    .iter()
                    .map(|(target, cell)| {
                        let f = cell.figures();
                        json!({
                            "target": target, "throughput": f.throughput, "p50_us": f.p50, "p99_us": f.p99,
                            "p999_us": f.p999, "ttfb_p50_us": f.ttfb_p50, "ttfb_p99_us": f.ttfb_p99,
                            "gap_p50_us": f.gap_p50, "gap_p99_us": f.gap_p99, "errors": f.errors,
                            "complete_share": f.complete_share, "cpu_s_per_1k": f.cpu_per_1k, "cpu_user_share": f.cpu_user_share,
                            "store_cpu_s_per_1k": f.store_cpu_per_1k,
                        })
                    })
                    .collect();
                json!({ "scenario": s.name, "streaming": s.streaming, "cells": cells })
            })
            .collect();
        let checks: Vec<Value> = self
            .checks()
            .into_iter()
            .map(|c| json!({ "target": c.what, "figure": c.detail, "holds": c.holds }))
            .collect();
        json!({
            "date": self.date, "machine": self.machine, "command": self.command,
            "duration_s": self.duration_s, "reps": self.reps, "notes": self.notes, "scenarios": scenarios, "checks": checks,
            "peak_rss_kib": self.peak_rss_kib.iter().map(|(n, k)| json!({ "process": n, "kib": k })).collect::<Vec<_>>(),
            "memory": self.memory.as_ref().map(|m| json!({
                "idle_kib": m.idle_kib, "streams": m.streams, "failed": m.failed,
                "loaded_kib": m.loaded_kib, "per_stream_kib": m.per_stream_kib(),
            })),
        })
    }
}
