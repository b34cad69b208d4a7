//! Reading figures off a Prometheus text page: nim-sim's `/v1/metrics` (prefix-cache counters,
//! running and waiting requests) and nimgate's admin `/metrics` (affinity decisions). Only the
//! few families the benchmark reads, by name and label; a family that is absent reads as 0, so a
//! gateway without the affinity metric still reports the rest.

/// The sum of `family`'s samples whose labels include every `name="value"` of `labels`.
pub fn sum(page: &str, family: &str, labels: &[(&str, &str)]) -> f64 {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(family)?;
            // The name must end here: `prefix_cache_hits_total` is not `prefix_cache_hits`.
            let (label_set, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once('}')?,
                None if rest.starts_with(' ') => ("", rest),
                None => return None,
            };
            let wanted = labels.iter().all(|(name, value)| label_set.contains(&format!("{name}=\"{value}\"")));
            wanted.then(|| value.split_whitespace().next()?.parse::<f64>().ok()).flatten()
        })
        // Not `sum()`: an empty f64 sum is -0.0, which prints as "-0".
        .fold(0.0, |total, value| total + value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "\
# HELP num_requests_running Number of requests currently running on GPU.
# TYPE num_requests_running gauge
num_requests_running{model_name=\"m\"} 3
num_requests_waiting{model_name=\"m\"} 1
prefix_cache_queries_total{model_name=\"m\"} 1.5e3
prefix_cache_hits_total{model_name=\"m\"} 900
nimgate_affinity_decisions_total{model=\"m\",result=\"hit\"} 7
nimgate_affinity_decisions_total{model=\"m\",result=\"miss\"} 2
nimgate_affinity_decisions_total{model=\"other\",result=\"hit\"} 5
plain_total 4
";

    #[test]
    fn sums_the_samples_of_one_family_and_label_set() {
        assert_eq!(sum(PAGE, "num_requests_running", &[]), 3.0);
        assert_eq!(sum(PAGE, "prefix_cache_queries_total", &[]), 1500.0);
        assert_eq!(sum(PAGE, "nimgate_affinity_decisions_total", &[("result", "hit")]), 12.0);
        assert_eq!(sum(PAGE, "nimgate_affinity_decisions_total", &[("model", "m"), ("result", "hit")]), 7.0);
        assert_eq!(sum(PAGE, "plain_total", &[]), 4.0);
    }

    #[test]
    fn an_absent_family_or_a_longer_name_reads_as_zero() {
        assert_eq!(sum(PAGE, "nimgate_affinity_decisions_total", &[("result", "overflow")]), 0.0);
        assert_eq!(sum(PAGE, "prefix_cache_hits", &[]), 0.0);
        assert_eq!(sum(PAGE, "plain", &[]), 0.0);
    }
}
