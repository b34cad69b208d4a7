//! Reading token usage out of upstream answers as they pass, without delaying or parsing them:
//! `UsageScanner` finds `"usage": {...}` objects by byte search (JSON answers and SSE streams
//! alike), carrying an object that straddles two frames; `UsageEventStripper` removes the
//! usage-only SSE event nimgate asked for on the client's behalf; `ContentCounter` estimates the
//! tokens of a stream whose server reports none.

use std::ops::Range;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem;
use serde::Deserialize;

/// Token counts an upstream reported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub total_tokens: Option<u64>,
}

impl Usage {
    /// What the request costs: `total_tokens`, or prompt plus completion when it is absent.
    pub fn total(&self) -> u64 {
        self.total_tokens.unwrap_or(self.prompt_tokens.saturating_add(self.completion_tokens))
    }
}

const USAGE_KEY: &[u8] = b"\"usage\"";
static USAGE_FINDER: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(USAGE_KEY));

/// Whether `USAGE_KEY` begins inside `tail` (shorter than the key) and goes on into `next`.
fn key_starts_in(tail: &[u8], next: &[u8]) -> bool {
    if tail.is_empty() {
        return false;
    }
    let mut window = [0u8; 2 * 8];
    let take = next.len().min(USAGE_KEY.len());
    window[..tail.len()].copy_from_slice(tail);
    window[tail.len()..tail.len() + take].copy_from_slice(&next[..take]);
    let window = &window[..tail.len() + take];
    (0..tail.len()).any(|i| window[i..].starts_with(USAGE_KEY))
}
/// A usage object longer than this is not a usage object; the carry is dropped.
const MAX_CARRY: usize = 64 * 1024;

/// Finds the last `"usage": {...}` object in a byte stream fed frame by frame.
#[derive(Debug, Default)]
pub struct UsageScanner {
    carry: Vec<u8>,
    last: Option<Usage>,
}

impl UsageScanner {
    pub fn feed(&mut self, bytes: &[u8]) {
        // The common frame needs no copy: the carry is at most a few bytes that cannot begin a
        // key, so `bytes` is scanned where it lies. Only a key cut by the frame boundary, or an
        // object still open from the last frame, joins the carry and the frame.
        // (A frame shorter than the key is joined too: it may continue a key and end before it
        // does, and copying a few bytes costs nothing.)
        if self.carry.len() < USAGE_KEY.len() && bytes.len() >= USAGE_KEY.len() && !key_starts_in(&self.carry, bytes) {
            let keep = self.scan(bytes);
            self.carry.clear();
            self.carry.extend_from_slice(&bytes[keep..]);
        } else {
            let mut joined = std::mem::take(&mut self.carry);
            joined.extend_from_slice(bytes);
            let keep = self.scan(&joined);
            joined.drain(..keep);
            self.carry = joined;
        }
        if self.carry.len() > MAX_CARRY {
            self.carry.clear();
        }
    }

    /// The last usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.last
    }

    /// Records every complete usage object in `buf`; returns where the bytes that may still
    /// begin one (a split key or an unfinished object) start.
    fn scan(&mut self, buf: &[u8]) -> usize {
        let mut pos = 0;
        while let Some(found) = USAGE_FINDER.find(&buf[pos..]) {
            let at = pos + found;
            let Some(open) = object_after_key(buf, at + USAGE_KEY.len()) else {
                return at;
            };
            let Ok(open) = open else {
                pos = at + USAGE_KEY.len();
                continue;
            };
            let mut values = serde_json::Deserializer::from_slice(&buf[open..]).into_iter::<Usage>();
            match values.next() {
                Some(Ok(usage)) => {
                    self.last = Some(usage);
                    pos = open + values.byte_offset();
                }
                Some(Err(e)) if e.is_eof() => return at,
                _ => pos = open + 1,
            }
        }
        buf.len().saturating_sub(USAGE_KEY.len() - 1).max(pos)
    }
}

/// After a `"usage"` key ending at `from`: `Some(Ok(i))` when `buf[i]` opens its object value,
/// `Some(Err(()))` when the value is something else (`null`) or this was no key, `None` when
/// `buf` ends before it can tell.
fn object_after_key(buf: &[u8], from: usize) -> Option<Result<usize, ()>> {
    let colon = skip_whitespace(buf, from)?;
    if buf[colon] != b':' {
        return Some(Err(()));
    }
    let value = skip_whitespace(buf, colon + 1)?;
    Some(if buf[value] == b'{' { Ok(value) } else { Err(()) })
}

fn skip_whitespace(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).find(|&i| !buf[i].is_ascii_whitespace())
}

/// Removes the usage-only event (empty `choices`, a `usage` object) from an SSE stream whose
/// client did not ask for it. Complete events pass at once, untouched and uncopied; only an
/// event cut by a frame boundary waits for the rest of itself, so that the usage event can be
/// seen whole. Once it has been removed, everything passes straight through.
#[derive(Debug, Default)]
pub struct UsageEventStripper {
    carry: BytesMut,
    removed: bool,
}

impl UsageEventStripper {
    /// The bytes to forward for `frame` (empty when all of it waits for the next frame).
    pub fn process(&mut self, frame: Bytes) -> Bytes {
        let data = if self.carry.is_empty() {
            frame
        } else {
            self.carry.extend_from_slice(&frame);
            self.carry.split().freeze()
        };
        if self.removed {
            return data;
        }
        let end = last_event_end(&data);
        if end < data.len() {
            self.carry.extend_from_slice(&data[end..]);
        }
        let complete = data.slice(..end);
        match usage_only_event(&complete) {
            None => complete,
            Some(event) => {
                self.removed = true;
                let mut out = BytesMut::with_capacity(complete.len() - event.len());
                out.extend_from_slice(&complete[..event.start]);
                out.extend_from_slice(&complete[event.end..]);
                out.freeze()
            }
        }
    }

    /// What is still held when the stream ends (an unterminated last event), to forward as is.
    pub fn finish(&mut self) -> Bytes {
        self.carry.split().freeze()
    }
}

/// The offset just past the last blank line (`\n\n` or `\r\n\r\n`) in `data`, or 0. Runs on
/// every frame, which usually ends with one: a backward byte search, no searcher to build.
fn last_event_end(data: &[u8]) -> usize {
    let mut end = data.len();
    while let Some(i) = memchr::memrchr(b'\n', &data[..end]) {
        if ends_blank_line(data, i) {
            return i + 1;
        }
        end = i;
    }
    0
}

/// Whether the `\n` at `i` ends a blank line (`\n\n` or `\r\n\r\n`).
fn ends_blank_line(data: &[u8], i: usize) -> bool {
    (i >= 1 && data[i - 1] == b'\n') || (i >= 3 && &data[i - 3..i] == b"\r\n\r")
}

/// The byte range of the usage-only event in `events` (complete events only), if any.
fn usage_only_event(events: &[u8]) -> Option<Range<usize>> {
    let mut pos = 0;
    while let Some(found) = USAGE_FINDER.find(&events[pos..]) {
        let at = pos + found;
        pos = at + USAGE_KEY.len();
        if !matches!(object_after_key(events, pos), Some(Ok(_))) {
            continue;
        }
        let start = last_event_end(&events[..at]);
        let end = at + last_event_end_from(&events[at..])?;
        if is_usage_only(&events[start..end]) {
            return Some(start..end);
        }
    }
    None
}

/// The offset just past the first blank line in `data`.
fn last_event_end_from(data: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', data).find(|&i| ends_blank_line(data, i)).map(|i| i + 1)
}

/// Whether one SSE event is a `data:` line carrying usage and no choices. Parsed, but only for
/// the one event per stream that mentions a usage object.
fn is_usage_only(event: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Chunk {
        #[serde(default)]
        choices: Vec<serde::de::IgnoredAny>,
        usage: Option<Usage>,
    }
    let Ok(text) = std::str::from_utf8(event) else { return false };
    let mut data = String::new();
    for line in text.lines() {
        match line.strip_prefix("data:") {
            Some(value) => data.push_str(value.strip_prefix(' ').unwrap_or(value)),
            None if line.is_empty() || line.starts_with(':') => {}
            None => return false,
        }
    }
    serde_json::from_str::<Chunk>(&data).is_ok_and(|chunk| chunk.choices.is_empty() && chunk.usage.is_some())
}

/// Counts the SSE events that carry generated text, an estimate of completion tokens for
/// servers that report no usage (NIM and vLLM send one token per event).
#[derive(Debug, Default)]
pub struct ContentCounter {
    /// The last bytes of the previous frame, where a marker may have begun.
    tail: [u8; MARKER_MAX],
    tail_len: usize,
    events: u64,
}

const CONTENT_MARKERS: [&[u8]; 3] = [b"\"content\":\"", b"\"text\":\"", b"\"arguments\":\""];
/// The longest marker.
const MARKER_MAX: usize = 13;
/// The end every marker shares: one pass over a frame finds them all.
const MARKER_END: &[u8] = b"\":\"";
static MARKER_END_FINDER: LazyLock<memmem::Finder<'static>> = LazyLock::new(|| memmem::Finder::new(MARKER_END));

impl ContentCounter {
    pub fn feed(&mut self, bytes: &[u8]) {
        // Markers that begin in the previous frame's tail and end (with the byte after them)
        // in this one: looked for in a small window, without copying the frame. A tail that
        // ends with a byte no marker has (a frame ending its event with a blank line, as they
        // nearly all do) cannot hold the start of one.
        let last = self.tail_len.checked_sub(1).map(|i| self.tail[i]);
        if last.is_some_and(|b| CONTENT_MARKERS.iter().any(|m| m.contains(&b))) {
            let mut window = [0u8; 2 * MARKER_MAX + 1];
            let take = bytes.len().min(MARKER_MAX + 1);
            window[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
            window[self.tail_len..self.tail_len + take].copy_from_slice(&bytes[..take]);
            let window = &window[..self.tail_len + take];
            for marker in CONTENT_MARKERS {
                self.events += (0..self.tail_len)
                    .filter(|&i| i + marker.len() >= self.tail_len && text_follows(window, i, marker))
                    .count() as u64;
            }
        }
        // Markers within this frame whose following byte is here too, found by their shared
        // end (`":"`, which every string-valued key has) in one pass.
        for end in MARKER_END_FINDER.find_iter(bytes) {
            let starts = CONTENT_MARKERS.iter().map(|m| (end + MARKER_END.len()).checked_sub(m.len()));
            if CONTENT_MARKERS.iter().zip(starts).any(|(m, at)| at.is_some_and(|at| text_follows(bytes, at, m))) {
                self.events += 1;
            }
        }
        // The new tail is the stream's last bytes, which may reach back past a short frame.
        if bytes.len() >= MARKER_MAX {
            self.tail.copy_from_slice(&bytes[bytes.len() - MARKER_MAX..]);
            self.tail_len = MARKER_MAX;
        } else {
            let kept = self.tail_len.min(MARKER_MAX - bytes.len());
            self.tail.copy_within(self.tail_len - kept..self.tail_len, 0);
            self.tail[kept..kept + bytes.len()].copy_from_slice(bytes);
            self.tail_len = kept + bytes.len();
        }
    }

    /// Events with text seen so far.
    pub fn events(&self) -> u64 {
        self.events
    }
}

/// Whether `marker` is at `at` in `buf` and followed by a character other than `"` (text).
fn text_follows(buf: &[u8], at: usize, marker: &[u8]) -> bool {
    buf[at..].starts_with(marker) && buf.get(at + marker.len()).is_some_and(|&b| b != b'"')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" Hello\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" world\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
        "data: [DONE]\n\n",
    );
    const USAGE_EVENT: &str = "data: {\"id\":\"c1\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n";

    fn split_at_points(text: &str, points: &[usize]) -> Vec<Bytes> {
        let mut cuts: Vec<usize> = points.iter().map(|p| p % (text.len() + 1)).collect();
        cuts.push(0);
        cuts.push(text.len());
        cuts.sort_unstable();
        cuts.dedup();
        cuts.windows(2).map(|w| Bytes::copy_from_slice(&text.as_bytes()[w[0]..w[1]])).collect()
    }

    #[test]
    fn finds_usage_in_a_json_answer() {
        let mut s = UsageScanner::default();
        s.feed(br#"{"id":"x","choices":[{"message":{"content":"the \"usage\": {\"total_tokens\": 99}"}}],"usage": {"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":0}}}"#);
        assert_eq!(s.usage().map(|u| u.total()), Some(7));
    }

    #[test]
    fn usage_null_and_non_object_values_are_skipped() {
        let mut s = UsageScanner::default();
        s.feed(br#"{"usage":null,"x":{"usage":5}}"#);
        assert_eq!(s.usage(), None);
    }

    #[test]
    fn total_defaults_to_prompt_plus_completion() {
        let mut s = UsageScanner::default();
        s.feed(br#"{"usage":{"prompt_tokens":3,"completion_tokens":4}}"#);
        assert_eq!(s.usage().unwrap().total(), 7);
        s.feed(br#"{"usage":{"prompt_tokens":5,"total_tokens":5}}"#);
        assert_eq!(s.usage().unwrap().total(), 5, "embeddings: prompt only");
    }

    #[test]
    fn an_event_split_across_two_frames_is_found_and_stripped() {
        let cut = STREAM.find("completion_tokens").unwrap();
        let (a, b) = STREAM.split_at(cut);
        let mut scanner = UsageScanner::default();
        let mut stripper = UsageEventStripper::default();
        let mut out = Vec::new();
        for part in [a, b] {
            scanner.feed(part.as_bytes());
            out.extend_from_slice(&stripper.process(Bytes::copy_from_slice(part.as_bytes())));
        }
        out.extend_from_slice(&stripper.finish());
        assert_eq!(scanner.usage().unwrap().total(), 11);
        assert_eq!(String::from_utf8(out).unwrap(), STREAM.replace(USAGE_EVENT, ""));
    }

    #[test]
    fn complete_frames_pass_without_copy_or_delay() {
        let mut stripper = UsageEventStripper::default();
        let frame = Bytes::from_static(b"data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n");
        let out = stripper.process(frame.clone());
        assert_eq!(out.as_ptr(), frame.as_ptr());
        assert_eq!(out.len(), frame.len());
    }

    #[test]
    fn usage_inside_a_chunk_with_choices_is_not_stripped() {
        let stream =
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"total_tokens\":3}}\n\ndata: [DONE]\n\n";
        let mut stripper = UsageEventStripper::default();
        assert_eq!(stripper.process(Bytes::from(stream)), stream);
    }

    #[test]
    fn content_events_are_counted_for_estimates() {
        let mut counter = ContentCounter::default();
        for frame in split_at_points(STREAM, &[17, 130, 131, 200]) {
            counter.feed(&frame);
        }
        assert_eq!(counter.events(), 2, "the empty role content does not count");
    }

    /// The obvious count: each marker looked for on its own.
    fn content_events_reference(bytes: &[u8]) -> u64 {
        CONTENT_MARKERS
            .iter()
            .map(|m| memmem::find_iter(bytes, m).filter(|&i| text_follows(bytes, i, m)).count() as u64)
            .sum()
    }

    proptest! {
        #[test]
        fn content_events_agree_with_each_marker_counted_on_its_own(pieces in proptest::collection::vec(
            proptest::sample::select(vec![
                "\"content\":\"", "\"text\":\"", "\"arguments\":\"", "\":\"", "\"", "x", "\"role\":\"", ",", "{",
            ]), 0..30)) {
            let text = pieces.concat();
            let mut counter = ContentCounter::default();
            counter.feed(text.as_bytes());
            prop_assert_eq!(counter.events(), content_events_reference(text.as_bytes()), "{}", text);
        }
    }

    /// The obvious versions of the blank-line searches, to check the fast ones against.
    fn last_event_end_reference(data: &[u8]) -> usize {
        let lf = memmem::rfind(data, b"\n\n").map_or(0, |i| i + 2);
        let crlf = memmem::rfind(data, b"\r\n\r\n").map_or(0, |i| i + 4);
        lf.max(crlf)
    }

    fn first_event_end_reference(data: &[u8]) -> Option<usize> {
        let lf = memmem::find(data, b"\n\n").map(|i| i + 2);
        let crlf = memmem::find(data, b"\r\n\r\n").map(|i| i + 4);
        match (lf, crlf) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    proptest! {
        #[test]
        fn blank_line_searches_agree_with_the_obvious_ones(data in proptest::collection::vec(
            proptest::sample::select(vec![b'\n', b'\r', b'a', b'd', b':']), 0..40)) {
            prop_assert_eq!(last_event_end(&data), last_event_end_reference(&data));
            prop_assert_eq!(last_event_end_from(&data), first_event_end_reference(&data));
        }
    }

    proptest! {
        /// Whatever the frame boundaries, the scanner finds the usage the whole stream has, the
        /// stripper forwards exactly the stream without its usage event, and the counter counts
        /// the same events.
        #[test]
        fn any_frame_boundaries_give_the_same_result(points in proptest::collection::vec(0usize..2000, 0..12)) {
            let mut scanner = UsageScanner::default();
            let mut stripper = UsageEventStripper::default();
            let mut counter = ContentCounter::default();
            let mut out = Vec::new();
            for frame in split_at_points(STREAM, &points) {
                scanner.feed(&frame);
                counter.feed(&frame);
                out.extend_from_slice(&stripper.process(frame));
            }
            out.extend_from_slice(&stripper.finish());
            prop_assert_eq!(scanner.usage().map(|u| u.total()), Some(11));
            prop_assert_eq!(String::from_utf8(out).unwrap(), STREAM.replace(USAGE_EVENT, ""));
            prop_assert_eq!(counter.events(), 2);
        }

        /// The scanner agrees with a full JSON parse on answers of any shape around the usage.
        #[test]
        fn scanner_agrees_with_a_full_parse(
            prompt in 0u64..100_000, completion in 0u64..100_000,
            text in "[a-z \\\\\"{}:]{0,40}", points in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let answer = serde_json::json!({
                "choices": [{ "message": { "content": text } }],
                "usage": { "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion },
            })
            .to_string();
            let reference: serde_json::Value = serde_json::from_str(&answer).unwrap();
            let mut scanner = UsageScanner::default();
            for frame in split_at_points(&answer, &points) {
                scanner.feed(&frame);
            }
            prop_assert_eq!(scanner.usage().map(|u| u.total()), reference["usage"]["total_tokens"].as_u64());
        }
    }
}
