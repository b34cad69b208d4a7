//! The Prometheus registry behind the admin listener's `/metrics`, with the contract's names
//! (all prefixed `nimgate_`). Families are created once at start; label values come only from
//! the configuration, never from client input.

use prometheus::{Encoder, IntCounterVec, Opts, Registry, TextEncoder};

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// `config_reloads_total{result}`: result is `ok` or `error`.
    pub config_reloads: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("nimgate".into()), None).expect("a valid metric prefix");
        let config_reloads = IntCounterVec::new(
            Opts::new("config_reloads_total", "Configuration reloads, by result (ok, error)."),
            &["result"],
        )
        .expect("a valid metric family");
        registry.register(Box::new(config_reloads.clone())).expect("registered once");
        // Both series exist from the start, so that a rate() over them never starts empty.
        for result in ["ok", "error"] {
            config_reloads.with_label_values(&[result]);
        }
        Self { registry, config_reloads }
    }

    /// The exposition in Prometheus' text format.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reload_counter_is_exposed_with_both_results() {
        let metrics = Metrics::new();
        metrics.config_reloads.with_label_values(&["ok"]).inc();
        let text = metrics.render();
        assert!(text.contains("nimgate_config_reloads_total{result=\"ok\"} 1"), "{text}");
        assert!(text.contains("nimgate_config_reloads_total{result=\"error\"} 0"), "{text}");
        assert!(text.contains("# TYPE nimgate_config_reloads_total counter"), "{text}");
    }
}
