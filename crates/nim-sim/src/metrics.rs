//! NIM's Prometheus page at `/v1/metrics`, in the dialect the sim is set to speak: NIM 1.x's own
//! names, or those of the engine NIM 2.x passes through (vLLM's, SGLang's). One reading of the
//! GPU is rendered through a table of families per dialect, so every dialect reports the same
//! figures and only names, help texts and number formats differ. Separate from `reply` because
//! what a scraper reads is a contract of its own, which the gateway's load probe parses.

use std::fmt::Write;

use crate::MetricsDialect;

/// The figures a scrape reports, read once.
pub struct Reading {
    pub running: u64,
    pub waiting: u64,
    /// KV-cache usage, 0..=1.
    pub kv_usage: f64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub completed: u64,
    /// The prefix cache's counters; `None` without the cache model.
    pub prefix_cache: Option<PrefixCache>,
}

/// Prompt tokens looked up in the KV cache and found there.
pub struct PrefixCache {
    pub queried_tokens: u64,
    pub hit_tokens: u64,
}

impl PrefixCache {
    fn hit_rate(&self) -> f64 {
        match self.queried_tokens {
            0 => 0.0,
            queried => self.hit_tokens as f64 / queried as f64,
        }
    }
}

/// One metric family with its single sample.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    value: f64,
}

const GAUGE: &str = "gauge";
const COUNTER: &str = "counter";

fn family(name: &'static str, kind: &'static str, help: &'static str, value: impl Into<Value>) -> Family {
    Family { name, kind, help, value: value.into().0 }
}

/// A sample's value; counters are whole numbers, exact below 2^53.
struct Value(f64);

impl From<u64> for Value {
    fn from(value: u64) -> Self {
        Self(value as f64)
    }
}

impl From<f64> for Value {
    fn from(value: f64) -> Self {
        Self(value)
    }
}

/// The page, in the text exposition format, every sample labelled with `model_name`.
pub fn page(dialect: MetricsDialect, model: &str, reading: &Reading) -> String {
    let label = model.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    let families = match dialect {
        MetricsDialect::Nim1 => nim1(reading),
        MetricsDialect::Vllm => vllm(reading),
        MetricsDialect::Sglang => sglang(reading),
    };
    let mut out = String::with_capacity(families.len() * 200);
    for Family { name, kind, help, value } in families {
        let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{model_name=\"{label}\"}} ");
        // NIM 1.x writes whole numbers bare ("3"); the Python engines' prometheus_client writes
        // every value as a float ("3.0"), and scrapers of NIM 2.x must read that.
        let _ = match dialect {
            MetricsDialect::Nim1 => writeln!(out, "{value}"),
            MetricsDialect::Vllm | MetricsDialect::Sglang => writeln!(out, "{value:?}"),
        };
    }
    out
}

/// NIM 1.x's own names. The prefix-cache counters appear only with the cache model, so the page
/// without it stays byte for byte what it was.
fn nim1(r: &Reading) -> Vec<Family> {
    let mut families = vec![
        family("num_requests_running", GAUGE, "Number of requests currently running on GPU.", r.running),
        family("num_requests_waiting", GAUGE, "Number of requests waiting to be processed.", r.waiting),
        family("gpu_cache_usage_perc", GAUGE, "GPU KV-cache usage. 1 means 100 percent usage.", r.kv_usage),
        family("prompt_tokens_total", COUNTER, "Number of prefill tokens processed.", r.prompt_tokens),
        family("generation_tokens_total", COUNTER, "Number of generation tokens processed.", r.generation_tokens),
        family("request_success_total", COUNTER, "Count of successfully processed requests.", r.completed),
    ];
    if let Some(prefix) = &r.prefix_cache {
        families.extend([
            family("prefix_cache_queries_total", COUNTER, QUERIES_HELP, prefix.queried_tokens),
            family("prefix_cache_hits_total", COUNTER, HITS_HELP, prefix.hit_tokens),
        ]);
    }
    families
}

const QUERIES_HELP: &str = "Prefix cache queries, in terms of number of queried tokens.";
const HITS_HELP: &str = "Prefix cache hits, in terms of number of cached tokens.";

/// vLLM v1's names, as NIM 2.x passes them through (vLLM adds an `engine` label, left out here).
fn vllm(r: &Reading) -> Vec<Family> {
    let (queried, hit) = r.prefix_cache.as_ref().map_or((0, 0), |p| (p.queried_tokens, p.hit_tokens));
    vec![
        family("vllm:num_requests_running", GAUGE, "Number of requests in model execution batches.", r.running),
        family("vllm:num_requests_waiting", GAUGE, "Number of requests waiting to be processed.", r.waiting),
        family("vllm:kv_cache_usage_perc", GAUGE, "KV-cache usage. 1 means 100 percent usage.", r.kv_usage),
        family("vllm:prefix_cache_queries_total", COUNTER, QUERIES_HELP, queried),
        family("vllm:prefix_cache_hits_total", COUNTER, HITS_HELP, hit),
        family("vllm:prompt_tokens_total", COUNTER, "Number of prefill tokens processed.", r.prompt_tokens),
        family("vllm:generation_tokens_total", COUNTER, "Number of generation tokens processed.", r.generation_tokens),
        family("vllm:request_success_total", COUNTER, "Count of successfully processed requests.", r.completed),
    ]
}

/// SGLang's names. Its `cache_hit_rate` is over recent batches; the sim's is over its lifetime.
fn sglang(r: &Reading) -> Vec<Family> {
    let (hit, rate) = r.prefix_cache.as_ref().map_or((0, 0.0), |p| (p.hit_tokens, p.hit_rate()));
    vec![
        family("sglang:num_running_reqs", GAUGE, "The number of running requests.", r.running),
        family("sglang:num_queue_reqs", GAUGE, "The number of requests in the waiting queue.", r.waiting),
        family("sglang:token_usage", GAUGE, "The token usage.", r.kv_usage),
        family("sglang:cache_hit_rate", GAUGE, "The prefix cache hit rate.", rate),
        family("sglang:prompt_tokens_total", COUNTER, "Number of prefill tokens processed.", r.prompt_tokens),
        family("sglang:cached_tokens_total", COUNTER, "Number of cached prompt tokens.", hit),
        family(
            "sglang:generation_tokens_total",
            COUNTER,
            "Number of generation tokens processed.",
            r.generation_tokens,
        ),
        family("sglang:num_requests_total", COUNTER, "Number of requests processed.", r.completed),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(prefix_cache: Option<PrefixCache>) -> Reading {
        Reading {
            running: 2,
            waiting: 1,
            kv_usage: 0.5,
            prompt_tokens: 10,
            generation_tokens: 20,
            completed: 3,
            prefix_cache,
        }
    }

    /// Checks the text exposition format: HELP then TYPE then one sample of that family, labelled
    /// `label`, with a float value; returns the families' names and values.
    fn parse(text: &str, label: &str) -> Vec<(String, f64)> {
        let mut described = Vec::new();
        let mut samples = Vec::new();
        for line in text.lines() {
            if let Some(help) = line.strip_prefix("# HELP ") {
                described.push(help.split(' ').next().unwrap().to_owned());
            } else if let Some(kind) = line.strip_prefix("# TYPE ") {
                let (name, kind) = kind.split_once(' ').unwrap();
                assert_eq!(described.last().map(String::as_str), Some(name), "HELP then TYPE");
                assert!(kind == "gauge" || (kind == "counter" && name.ends_with("_total")), "{line}");
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                let name = series.split('{').next().unwrap();
                assert_eq!(described.last().map(String::as_str), Some(name), "a sample of the family just typed");
                assert!(series.ends_with(&format!("{{model_name=\"{label}\"}}")), "{line}");
                samples.push((name.to_owned(), value.parse::<f64>().unwrap()));
            }
        }
        assert_eq!(samples.len(), described.len());
        samples
    }

    fn value(samples: &[(String, f64)], name: &str) -> f64 {
        samples.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1
    }

    #[test]
    fn nim1_follows_the_text_exposition_format() {
        let text = page(MetricsDialect::Nim1, "meta/llama \"x\"", &reading(None));
        let samples = parse(&text, r#"meta/llama \"x\""#);
        let names: Vec<&str> = samples.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "num_requests_running",
                "num_requests_waiting",
                "gpu_cache_usage_perc",
                "prompt_tokens_total",
                "generation_tokens_total",
                "request_success_total"
            ]
        );
        assert!(text.contains("gpu_cache_usage_perc{model_name=\"meta/llama \\\"x\\\"\"} 0.5\n"));
        assert!(text.contains("generation_tokens_total{model_name=\"meta/llama \\\"x\\\"\"} 20\n"));
    }

    #[test]
    fn nim1_adds_the_prefix_cache_counters_only_with_the_cache_model() {
        let text = page(MetricsDialect::Nim1, "m", &reading(Some(PrefixCache { queried_tokens: 8, hit_tokens: 6 })));
        let samples = parse(&text, "m");
        assert_eq!(samples.len(), 8);
        assert_eq!(value(&samples, "prefix_cache_queries_total"), 8.0);
        assert!(text.contains("prefix_cache_hits_total{model_name=\"m\"} 6\n"), "{text}");
    }

    #[test]
    fn vllm_and_sglang_use_their_names_and_write_floats() {
        let prefix = || Some(PrefixCache { queried_tokens: 8, hit_tokens: 6 });
        let text = page(MetricsDialect::Vllm, "m", &reading(prefix()));
        let samples = parse(&text, "m");
        assert!(samples.iter().all(|(n, _)| n.starts_with("vllm:")));
        assert_eq!(value(&samples, "vllm:num_requests_running"), 2.0);
        assert_eq!(value(&samples, "vllm:num_requests_waiting"), 1.0);
        assert_eq!(value(&samples, "vllm:kv_cache_usage_perc"), 0.5);
        assert_eq!(value(&samples, "vllm:prefix_cache_queries_total"), 8.0);
        assert!(text.contains("vllm:prefix_cache_hits_total{model_name=\"m\"} 6.0\n"), "{text}");

        let text = page(MetricsDialect::Sglang, "m", &reading(prefix()));
        let samples = parse(&text, "m");
        assert!(samples.iter().all(|(n, _)| n.starts_with("sglang:")));
        assert_eq!(value(&samples, "sglang:num_running_reqs"), 2.0);
        assert_eq!(value(&samples, "sglang:num_queue_reqs"), 1.0);
        assert_eq!(value(&samples, "sglang:token_usage"), 0.5);
        assert_eq!(value(&samples, "sglang:cache_hit_rate"), 0.75);
        assert_eq!(value(&samples, "sglang:cached_tokens_total"), 6.0);

        let cold = parse(&page(MetricsDialect::Vllm, "m", &reading(None)), "m");
        assert_eq!(value(&cold, "vllm:prefix_cache_hits_total"), 0.0, "present without the cache model");
    }
}
