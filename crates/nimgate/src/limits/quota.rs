//! What a key has left, as the `x-ratelimit-*` headers say it: per limit its size, what
//! remains now and when it is whole again. Durations use OpenAI's notation (`20ms`, `6s`,
//! `1m30s`), which SDKs and dashboards already parse.

use std::time::Duration;

use bytes::BytesMut;
use http::{HeaderMap, HeaderName, HeaderValue};

/// One limit's state after a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub limit: u64,
    pub remaining: u64,
    /// Time until the limit is back to its full size.
    pub reset: Duration,
}

/// Every limit a key has.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Quota {
    pub requests: Option<Window>,
    pub tokens: Option<Window>,
}

const REQUESTS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-requests"),
    HeaderName::from_static("x-ratelimit-remaining-requests"),
    HeaderName::from_static("x-ratelimit-reset-requests"),
];
const TOKENS: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit-tokens"),
    HeaderName::from_static("x-ratelimit-remaining-tokens"),
    HeaderName::from_static("x-ratelimit-reset-tokens"),
];

impl Quota {
    /// How many headers `write_headers` adds: three per limit.
    pub fn header_count(&self) -> usize {
        3 * (usize::from(self.requests.is_some()) + usize::from(self.tokens.is_some()))
    }

    /// Adds the header triple of each limit the key has. Runs on every answer to a limited
    /// key, so the values are formatted without `fmt` into one buffer, one allocation for all
    /// six, which each value then shares.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        // Two windows of two u64 (at most 20 digits each) and a duration (at most 31 bytes).
        let mut text = BytesMut::with_capacity(2 * (20 + 20 + 31));
        let mut ends = [0usize; 6];
        let windows = [(self.requests, &REQUESTS), (self.tokens, &TOKENS)];
        let mut values = 0;
        for (window, _) in &windows {
            if let Some(w) = window {
                let mut number = itoa::Buffer::new();
                text.extend_from_slice(number.format(w.limit).as_bytes());
                ends[values] = text.len();
                text.extend_from_slice(number.format(w.remaining).as_bytes());
                ends[values + 1] = text.len();
                let mut duration = [0u8; 32];
                let len = write_openai_duration(w.reset, &mut duration);
                text.extend_from_slice(&duration[..len]);
                ends[values + 2] = text.len();
                values += 3;
            }
        }
        let text = text.freeze();
        headers.reserve(values);
        let names = windows.iter().filter(|(w, _)| w.is_some()).flat_map(|(_, names)| names.iter());
        let mut start = 0;
        for (name, &end) in names.zip(&ends[..values]) {
            // Digits and duration letters are always valid header bytes.
            if let Ok(value) = HeaderValue::from_maybe_shared(text.slice(start..end)) {
                headers.insert(name.clone(), value);
            }
            start = end;
        }
    }
}

/// `20ms`, `6s`, `1.5s`, `1m30s`, `2h0m0s`: the notation of OpenAI's reset headers.
pub fn openai_duration(d: Duration) -> String {
    let mut text = [0u8; 32];
    let len = write_openai_duration(d, &mut text);
    String::from_utf8_lossy(&text[..len]).into_owned()
}

/// Writes `openai_duration(d)` into `out`, returning its length (at most 31 bytes).
fn write_openai_duration(d: Duration, out: &mut [u8; 32]) -> usize {
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        out[len..len + bytes.len()].copy_from_slice(bytes);
        len += bytes.len();
    };
    let mut number = itoa::Buffer::new();
    let ms = d.as_millis().min(u128::from(u64::MAX)) as u64;
    if ms < 1000 {
        push(number.format(ms).as_bytes());
        push(b"ms");
        return len;
    }
    let secs = d.as_secs().min(999_999_999_999);
    if secs < 60 {
        push(number.format(secs).as_bytes());
        let tenths = (ms % 1000) / 100;
        if tenths != 0 {
            push(b".");
            push(number.format(tenths).as_bytes());
        }
        push(b"s");
        return len;
    }
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    if h > 0 {
        push(number.format(h).as_bytes());
        push(b"h");
    }
    push(number.format(m).as_bytes());
    push(b"m");
    push(number.format(s).as_bytes());
    push(b"s");
    len
}

/// `Retry-After`: whole seconds until admission, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs().saturating_add(u64::from(wait.subsec_nanos() > 0));
    secs.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_openai_headers() {
        assert_eq!(openai_duration(Duration::from_millis(20)), "20ms");
        assert_eq!(openai_duration(Duration::from_secs(6)), "6s");
        assert_eq!(openai_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(openai_duration(Duration::from_secs(90)), "1m30s");
        assert_eq!(openai_duration(Duration::from_secs(7200)), "2h0m0s");
        assert_eq!(openai_duration(Duration::from_secs(u64::MAX)), "277777777h46m39s");
    }

    #[test]
    fn retry_after_rounds_up_and_is_never_zero() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2001)), 3);
    }

    #[test]
    fn both_limits_at_their_widest_get_their_six_values() {
        let wide = Window { limit: u64::MAX, remaining: u64::MAX - 1, reset: Duration::from_secs(u64::MAX) };
        let quota =
            Quota { requests: Some(wide), tokens: Some(Window { limit: 7, remaining: 0, reset: Duration::ZERO }) };
        assert_eq!(quota.header_count(), 6);
        let mut headers = HeaderMap::new();
        quota.write_headers(&mut headers);
        assert_eq!(headers.len(), 6);
        assert_eq!(headers["x-ratelimit-limit-requests"], "18446744073709551615");
        assert_eq!(headers["x-ratelimit-remaining-requests"], "18446744073709551614");
        assert_eq!(headers["x-ratelimit-reset-requests"], "277777777h46m39s");
        assert_eq!(headers["x-ratelimit-limit-tokens"], "7");
        assert_eq!(headers["x-ratelimit-remaining-tokens"], "0");
        assert_eq!(headers["x-ratelimit-reset-tokens"], "0ms");
    }

    #[test]
    fn only_the_limits_a_key_has_get_headers() {
        let quota = Quota {
            requests: None,
            tokens: Some(Window { limit: 1000, remaining: 250, reset: Duration::from_secs(45) }),
        };
        let mut headers = HeaderMap::new();
        quota.write_headers(&mut headers);
        assert_eq!(headers.len(), 3);
        assert_eq!(headers["x-ratelimit-limit-tokens"], "1000");
        assert_eq!(headers["x-ratelimit-remaining-tokens"], "250");
        assert_eq!(headers["x-ratelimit-reset-tokens"], "45s");
    }
}
