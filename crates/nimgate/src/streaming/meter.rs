//! Token metering of one answer: usage read from the bytes as they pass (JSON answers and SSE
//! streams alike), the usage event nimgate asked for on the client's behalf removed, the
//! key's reservation settled with the real count when the answer ends (or the client leaves),
//! and `tokens_total` counted.

use bytes::Bytes;
use prometheus::IntCounter;

use super::usage::{ContentCounter, UsageEventStripper, UsageScanner};
use crate::limits::Permit;

/// How one answer is metered.
#[derive(Debug)]
pub struct Meter {
    /// The key's token reservation, when it has a token limit.
    pub permit: Option<Permit>,
    /// `tokens_total` of the route model and key: prompt, completion.
    pub tokens: Option<(IntCounter, IntCounter)>,
    /// The upstream answered 2xx (an error answer costs no tokens).
    pub success: bool,
    /// The answer is an SSE stream.
    pub stream: bool,
    /// nimgate added `stream_options.include_usage`, so the usage event is not the client's.
    pub strip_usage_event: bool,
    /// The prompt's share of the admission estimate, for answers without reported usage.
    pub prompt_estimate: u64,
}

#[derive(Debug)]
pub(super) struct Metering {
    permit: Option<Permit>,
    tokens: Option<(IntCounter, IntCounter)>,
    settled: bool,
    /// Prompt and completion tokens, once settled (successful answers).
    pub(super) counted: Option<(u64, u64)>,
    success: bool,
    prompt_estimate: u64,
    scanner: UsageScanner,
    stripper: Option<UsageEventStripper>,
    /// Streams only: text events seen, for an estimate when no usage arrives.
    counter: Option<ContentCounter>,
}

impl Metering {
    pub(super) fn new(meter: Meter) -> Self {
        Self {
            permit: meter.permit,
            tokens: meter.tokens,
            settled: false,
            counted: None,
            success: meter.success,
            prompt_estimate: meter.prompt_estimate,
            scanner: UsageScanner::default(),
            stripper: meter.strip_usage_event.then(UsageEventStripper::default),
            counter: meter.stream.then(ContentCounter::default),
        }
    }

    /// One frame's bytes in, the bytes to send out (empty while an event is held whole).
    pub(super) fn on_data(&mut self, data: Bytes) -> Bytes {
        let mut without_usage_object = false;
        if self.success {
            without_usage_object = self.scanner.feed(&data);
            match &mut self.counter {
                // A stream settles when its end goes by (`[DONE]`, or the Responses API's
                // terminal event), which the body's `Completion` tells.
                Some(counter) => counter.feed(&data),
                // A JSON answer's usage is final: settle before its last bytes go out, so a
                // client that sends its next request the moment it has read this one finds
                // the refund already made.
                None if self.scanner.usage().is_some() => self.settle(),
                None => {}
            }
        }
        match &mut self.stripper {
            // One search for `"usage"` serves both when the frame has no usage object.
            Some(stripper) => stripper.process_known(data, without_usage_object),
            None => data,
        }
    }

    /// The body ended: settle, and release what the stripper still holds.
    pub(super) fn on_end(&mut self) -> Bytes {
        self.settle();
        self.stripper.as_mut().map(UsageEventStripper::finish).unwrap_or_default()
    }

    /// Replaces the reservation with the best count there is: reported usage, else an estimate
    /// from the stream, else (a whole JSON answer cut short) the reservation itself.
    pub(super) fn settle(&mut self) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let usage = self.scanner.usage();
        // For metrics: the split the backend reported, else the estimate.
        let (prompt, completion) = match (self.success, usage, &self.counter) {
            (false, _, _) => (0, 0),
            (true, Some(usage), _) => (usage.prompt_tokens, usage.completion_tokens),
            (true, None, Some(counter)) => (self.prompt_estimate, counter.events()),
            (true, None, None) => (self.prompt_estimate, 0),
        };
        if let Some((prompt_tokens, completion_tokens)) = &self.tokens {
            prompt_tokens.inc_by(prompt);
            completion_tokens.inc_by(completion);
        }
        if self.success {
            self.counted = Some((prompt, completion));
        }
        let Some(permit) = self.permit.take() else { return };
        let (used, source) = match (self.success, usage, &self.counter) {
            (false, _, _) => (0, "error answer"),
            (true, Some(usage), _) => (usage.total(), "reported"),
            (true, None, Some(counter)) => (self.prompt_estimate.saturating_add(counter.events()), "estimated"),
            (true, None, None) => (permit.reserved(), "reservation"),
        };
        tracing::debug!(reserved = permit.reserved(), used, source, "tokens settled");
        permit.settle(used);
    }
}

impl Drop for Metering {
    fn drop(&mut self) {
        // The client left mid-answer: charge what the backend produced until then.
        self.settle();
    }
}
