//! Load imbalance, sampled while a run goes on: every backend's requests in flight (nim-sim's
//! `num_requests_running` + `num_requests_waiting`) read at a fixed interval from the sims
//! themselves, not from the gateway, so that sampling costs the gateway under test nothing.
//! A run's imbalance is then max/mean over the backends of their time-averaged load.

use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;

use crate::client::{self, HttpClient};
use crate::scrape;

/// Sampling in progress; `finish` stops it and averages.
pub struct Sampler {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Vec<Vec<f64>>>,
}

/// Each backend's time-averaged load over a run, in the order of the URLs sampled.
pub struct Load {
    pub per_backend: Vec<f64>,
    /// Samples taken (each of every backend at once).
    pub samples: usize,
}

impl Load {
    /// The most loaded backend's average over the mean of all backends' averages: 1 is perfect
    /// balance, 4 is every request on one of four. 1 for an idle run.
    pub fn imbalance(&self) -> f64 {
        let mean = self.per_backend.iter().sum::<f64>() / self.per_backend.len().max(1) as f64;
        let max = self.per_backend.iter().copied().fold(0.0, f64::max);
        if mean > 0.0 { max / mean } else { 1.0 }
    }
}

impl Sampler {
    /// Samples the metrics pages at `urls` every `every` until `finish`.
    pub fn start(client: HttpClient, urls: Vec<String>, every: Duration) -> Self {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut tick = tokio::time::interval(every);
            // A late tick is skipped, not caught up with: samples stay evenly spaced in time, so
            // their plain mean is the time average.
            tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {}
                }
                let mut sample = Vec::with_capacity(urls.len());
                for url in &urls {
                    let Ok(page) = client::get_text(&client, url).await else { break };
                    sample.push(
                        scrape::sum(&page, "num_requests_running", &[])
                            + scrape::sum(&page, "num_requests_waiting", &[]),
                    );
                }
                // A sample missing a backend would skew every average: all or nothing.
                if sample.len() == urls.len() {
                    samples.push(sample);
                }
            }
            samples
        });
        Self { stop, task }
    }

    /// Stops sampling; the per-backend means of what was sampled.
    pub async fn finish(self) -> Load {
        let _ = self.stop.send(());
        let samples = self.task.await.unwrap_or_default();
        let backends = samples.first().map_or(0, Vec::len);
        let per_backend =
            (0..backends).map(|b| samples.iter().map(|s| s[b]).sum::<f64>() / samples.len() as f64).collect();
        Load { per_backend, samples: samples.len() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imbalance_is_the_busiest_backend_over_the_mean() {
        let load = |per_backend: Vec<f64>| Load { per_backend, samples: 10 };
        assert_eq!(load(vec![4.0, 4.0, 4.0, 4.0]).imbalance(), 1.0);
        assert_eq!(load(vec![8.0, 4.0, 2.0, 2.0]).imbalance(), 2.0);
        assert_eq!(load(vec![6.0]).imbalance(), 1.0);
        assert_eq!(load(vec![0.0, 0.0]).imbalance(), 1.0);
    }
}
