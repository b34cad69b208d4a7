//! Replaying the workload: a fixed number of client workers take conversations from one shared
//! list and play each one's turns in order, the next turn sent when the previous answer ended,
//! with the assistant's streamed text appended to the history. Closed loop on purpose: a
//! conversation's next turn cannot exist before its answer, and a slower setup then shows as
//! lower throughput as well as higher TTFT.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::task::JoinSet;

use crate::client::{self, HttpClient};
use crate::workload::{self, Message, Workload};

/// What one replay measured, client side.
pub struct Replayed {
    pub turns: u64,
    pub errors: u64,
    pub completion_tokens: u64,
    pub seconds: f64,
    /// Time to the first content event, µs.
    pub ttft: Histogram<u64>,
    /// The first failure, to say why when there were any.
    pub first_error: Option<String>,
}

impl Replayed {
    fn new() -> Self {
        Self { turns: 0, errors: 0, completion_tokens: 0, seconds: 0.0, ttft: histogram(), first_error: None }
    }

    fn merge(&mut self, other: Replayed) {
        self.turns += other.turns;
        self.errors += other.errors;
        self.completion_tokens += other.completion_tokens;
        let _ = self.ttft.add(&other.ttft);
        self.first_error = self.first_error.take().or(other.first_error);
    }

    pub fn requests_per_second(&self) -> f64 {
        if self.seconds > 0.0 { self.turns as f64 / self.seconds } else { 0.0 }
    }

    pub fn tokens_per_second(&self) -> f64 {
        if self.seconds > 0.0 { self.completion_tokens as f64 / self.seconds } else { 0.0 }
    }
}

/// Microseconds from 1 µs to 10 minutes at 3 significant digits.
fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

/// Plays every conversation of `workload` against `url` with `workers` concurrent clients.
pub async fn replay(
    client: &HttpClient,
    url: &str,
    workload: Arc<Workload>,
    workers: usize,
    max_tokens: u32,
) -> Replayed {
    let start = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (client, url, workload, next) = (client.clone(), url.to_owned(), Arc::clone(&workload), Arc::clone(&next));
        tasks.spawn(async move {
            let mut replayed = Replayed::new();
            while let Some(conversation) = workload.conversations.get(next.fetch_add(1, Ordering::Relaxed)) {
                let mut history = workload.opening(conversation);
                for user in &conversation.user_messages {
                    history.push(Message { role: "user", content: user.clone() });
                    let body = workload::request_body(&history, max_tokens);
                    match client::chat_turn(&client, &url, body).await {
                        Ok(answer) => {
                            replayed.turns += 1;
                            replayed.completion_tokens += answer.tokens;
                            let _ = replayed.ttft.record(micros(answer.ttft));
                            history.push(Message { role: "assistant", content: answer.text });
                        }
                        Err(error) => {
                            // Without its answer the history has no honest next turn: the
                            // conversation ends here, and its lost turns show as errors.
                            replayed.errors += 1;
                            replayed.first_error.get_or_insert(error);
                            break;
                        }
                    }
                }
            }
            replayed
        });
    }
    let mut total = Replayed::new();
    while let Some(result) = tasks.join_next().await {
        match result {
            Ok(replayed) => total.merge(replayed),
            Err(e) => {
                total.errors += 1;
                total.first_error.get_or_insert(e.to_string());
            }
        }
    }
    total.seconds = start.elapsed().as_secs_f64();
    total
}

fn micros(d: Duration) -> u64 {
    d.as_micros().clamp(1, 600_000_000) as u64
}
