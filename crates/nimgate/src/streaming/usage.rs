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

/// Token counts an upstream reported: chat's names, or the Responses API's (`input_tokens`,
/// `output_tokens`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct Usage {
    #[serde(default, alias = "input_tokens")]
    pub prompt_tokens: u64,
    #[serde(default, alias = "output_tokens")]
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
/// A usage object longer than this is not a usage object; the carry is dropped. Small, since
/// an unfinished object is parsed again whenever a `}` arrives.
const MAX_CARRY: usize = 4 * 1024;

/// Finds the last `"usage": {...}` object in a byte stream fed frame by frame.
#[derive(Debug, Default)]
pub struct UsageScanner {
    carry: Vec<u8>,
    last: Option<Usage>,
}

impl UsageScanner {
    /// Reads one frame. True when the frame was searched on its own and every `"usage"` key
    /// in it (streams carry `"usage":null` in each chunk) has a value other than an object:
    /// then the stripper, which looks for the one usage object, need not search it again.
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        // The common frame needs no copy: the carry is at most a few bytes that cannot begin a
        // key, so `bytes` is scanned where it lies. Only a key cut by the frame boundary, or an
        // object still open from the last frame, joins the carry and the frame.
        // (A frame shorter than the key is joined too: it may continue a key and end before it
        // does, and copying a few bytes costs nothing.)
        let mut without_usage_object = false;
        if self.carry.len() < USAGE_KEY.len() && bytes.len() >= USAGE_KEY.len() && !key_starts_in(&self.carry, bytes) {
            let (keep, objects) = self.scan(bytes);
            without_usage_object = !objects;
            self.carry.clear();
            self.carry.extend_from_slice(&bytes[keep..]);
        } else if self.carry.len() >= USAGE_KEY.len() && memchr::memchr2(b'}', b']', bytes).is_none() {
            // An object still open cannot end (nor, as `object_closes` counts, close) without
            // a `}` or `]` among the new bytes.
            self.carry.extend_from_slice(bytes);
        } else {
            let mut joined = std::mem::take(&mut self.carry);
            joined.extend_from_slice(bytes);
            let (keep, _) = self.scan(&joined);
            joined.drain(..keep);
            self.carry = joined;
        }
        if self.carry.len() > MAX_CARRY {
            self.carry.clear();
        }
        without_usage_object
    }

    /// The last usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.last
    }

    /// Records every complete usage object in `buf`; returns where the bytes that may still
    /// begin one (a split key or an unfinished object) start, and whether any `"usage"` key
    /// in `buf` has (or may have, cut by its end) an object for its value.
    fn scan(&mut self, buf: &[u8]) -> (usize, bool) {
        let mut pos = 0;
        let mut objects = false;
        while let Some(found) = USAGE_FINDER.find(&buf[pos..]) {
            let at = pos + found;
            let Some(open) = object_after_key(buf, at + USAGE_KEY.len()) else {
                return (at, true);
            };
            let Ok(open) = open else {
                pos = at + USAGE_KEY.len();
                continue;
            };
            objects = true;
            if let Some((usage, len)) = flat_usage(&buf[open..]) {
                self.last = Some(usage);
                pos = open + len;
                continue;
            }
            let mut values = serde_json::Deserializer::from_slice(&buf[open..]).into_iter::<Usage>();
            match values.next() {
                Some(Ok(usage)) => {
                    self.last = Some(usage);
                    pos = open + values.byte_offset();
                }
                // Cut by the frame's end (serde may call that a syntax error: after `1.` or
                // `-`), the object may still complete; one that closes and fails is skipped.
                Some(Err(_)) if !object_closes(&buf[open..]) => return (at, true),
                _ => pos = open + 1,
            }
        }
        (buf.len().saturating_sub(USAGE_KEY.len() - 1).max(pos), objects)
    }
}

/// The usage object opening `buf` read by hand when it has the usual shape, with its length:
/// keys without escapes, each value a non-negative integer, `null` or an object of those (the
/// `*_details`). Exact or declines: anything else (a float, a string value, a duplicate known
/// key, an object cut by the frame's end) is `None`, and serde, the reference, reads it. Every
/// JSON answer and the end of every stream carry one, so this saves serde's ~1,000
/// instructions per answer.
fn flat_usage(buf: &[u8]) -> Option<(Usage, usize)> {
    let mut at = 0;
    let (mut prompt, mut completion, mut total) = (None, None, None);
    let mut fields = FlatObject::open(buf, &mut at)?;
    while let Some(key) = fields.next_key(buf, &mut at)? {
        let slot = match key {
            b"prompt_tokens" | b"input_tokens" => Some(&mut prompt),
            b"completion_tokens" | b"output_tokens" => Some(&mut completion),
            b"total_tokens" => Some(&mut total),
            _ => None,
        };
        match (slot, flat_value(buf, &mut at)?) {
            // serde refuses a field named twice (an alias counts as its field).
            (Some(Some(_)), _) => return None,
            (Some(slot @ None), FlatValue::Number(n)) => *slot = Some(Some(n)),
            (Some(slot @ None), FlatValue::Null) if key == b"total_tokens" => *slot = Some(None),
            // A count that is `null` or an object: serde's error, not ours to guess.
            (Some(None), _) => return None,
            (None, FlatValue::Object) => {
                let mut inner = FlatObject::open(buf, &mut at)?;
                while inner.next_key(buf, &mut at)?.is_some() {
                    match flat_value(buf, &mut at)? {
                        FlatValue::Number(_) | FlatValue::Null => {}
                        FlatValue::Object => return None,
                    }
                }
            }
            (None, _) => {}
        }
    }
    let usage = Usage {
        prompt_tokens: prompt.flatten().unwrap_or(0),
        completion_tokens: completion.flatten().unwrap_or(0),
        total_tokens: total.flatten(),
    };
    Some((usage, at))
}

/// A value in a flat usage object. An `Object` is only announced: its `{` is still to read.
enum FlatValue {
    Number(u64),
    Null,
    Object,
}

/// Reads a non-negative integer or `null` at `*at` (after whitespace), or finds a `{` there.
fn flat_value(buf: &[u8], at: &mut usize) -> Option<FlatValue> {
    *at = skip_json_whitespace(buf, *at)?;
    match buf.get(*at)? {
        b'{' => Some(FlatValue::Object),
        b'n' => {
            let end = at.checked_add(4)?;
            (buf.get(*at..end)? == b"null").then(|| *at = end)?;
            Some(FlatValue::Null)
        }
        b'0' => {
            *at += 1;
            // JSON forbids leading zeros, and `0.5`/`0e1` are not integers: serde decides.
            (!matches!(buf.get(*at)?, b'0'..=b'9' | b'.' | b'e' | b'E')).then_some(FlatValue::Number(0))
        }
        b'1'..=b'9' => {
            let mut n: u64 = 0;
            while let Some(&digit @ b'0'..=b'9') = buf.get(*at) {
                n = n.checked_mul(10)?.checked_add(u64::from(digit - b'0'))?;
                *at += 1;
            }
            (!matches!(buf.get(*at)?, b'.' | b'e' | b'E')).then_some(FlatValue::Number(n))
        }
        _ => None,
    }
}

/// Walks the keys of an object of plain keys: `{`, then `"key":` pairs separated by commas.
struct FlatObject {
    first: bool,
}

impl FlatObject {
    fn open(buf: &[u8], at: &mut usize) -> Option<FlatObject> {
        *at = skip_json_whitespace(buf, *at)?;
        (*buf.get(*at)? == b'{').then(|| *at += 1)?;
        Some(FlatObject { first: true })
    }

    /// The next key (its value follows at `*at`), `Some(None)` after the closing `}`, `None`
    /// when the object is not plain or not complete in `buf`.
    fn next_key<'a>(&mut self, buf: &'a [u8], at: &mut usize) -> Option<Option<&'a [u8]>> {
        *at = skip_json_whitespace(buf, *at)?;
        match buf.get(*at)? {
            b'}' => {
                *at += 1;
                return Some(None);
            }
            b',' if !self.first => *at = skip_json_whitespace(buf, *at + 1)?,
            _ if self.first => {}
            _ => return None,
        }
        self.first = false;
        (*buf.get(*at)? == b'"').then_some(())?;
        let start = *at + 1;
        let len = memchr::memchr(b'"', buf.get(start..)?)?;
        let key = &buf[start..start + len];
        // An escape, a control character or a non-ASCII byte: serde's to judge.
        key.iter().all(|&b| (0x20..0x80).contains(&b) && b != b'\\').then_some(())?;
        *at = skip_json_whitespace(buf, start + len + 1)?;
        (*buf.get(*at)? == b':').then(|| *at += 1)?;
        Some(Some(key))
    }
}

/// Past JSON's four whitespace bytes (`is_ascii_whitespace` also takes form feed, which serde
/// does not).
fn skip_json_whitespace(buf: &[u8], from: usize) -> Option<usize> {
    (from..buf.len()).find(|&i| !matches!(buf[i], b' ' | b'\t' | b'\n' | b'\r'))
}

/// Whether the object opening `buf` closes within it (its `}` found, strings skipped).
fn object_closes(buf: &[u8]) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in buf {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'{' | b'[') => depth += 1,
            (false, _, b'}' | b']') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return true;
                }
            }
            (false, _, _) => {}
        }
    }
    false
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
///
/// Linear whatever the backend sends: each frame is searched for event ends once, each byte
/// is copied at most twice, and an event still open past `MAX_EVENT` bytes (no usage event is
/// that long) is forwarded as it comes until it ends, so that a stream without blank lines is
/// neither held back from the client nor rescanned per frame.
#[derive(Debug, Default)]
pub struct UsageEventStripper {
    carry: BytesMut,
    /// Inside an event longer than `MAX_EVENT`, forwarded as it comes.
    overlong: bool,
    removed: bool,
}

/// The longest event the stripper holds back waiting for its end. A usage-only event is a few
/// hundred bytes.
pub const MAX_EVENT: usize = 4 * 1024;

impl UsageEventStripper {
    /// The bytes to forward for `frame` (empty when all of it waits for the next frame).
    pub fn process(&mut self, frame: Bytes) -> Bytes {
        self.process_known(frame, false)
    }

    /// `process`, told by the usage scanner that no `"usage"` key in `frame` has an object
    /// for its value (`without_usage_object`): then, unless bytes held from earlier frames
    /// join it, it holds no usage event and is not searched for one.
    pub fn process_known(&mut self, frame: Bytes, without_usage_object: bool) -> Bytes {
        if self.removed {
            return self.join(frame);
        }
        let Some(end) = events_end(&self.carry, &frame) else {
            // The event goes on past this frame.
            if self.overlong {
                return frame;
            }
            self.carry.extend_from_slice(&frame);
            if self.carry.len() > MAX_EVENT {
                self.overlong = true;
                return self.carry.split().freeze();
            }
            return Bytes::new();
        };
        let searched = without_usage_object && self.carry.is_empty();
        let complete = self.join(frame.slice(..end));
        let rest = frame.slice(end..);
        // The end of an overlong event is no event of its own: it is not looked at.
        let skip = if std::mem::take(&mut self.overlong) { last_event_end_from(&complete).unwrap_or(0) } else { 0 };
        let found = if searched { None } else { usage_only_event(&complete[skip..]) };
        let out = match found {
            None => complete,
            Some(event) => {
                self.removed = true;
                let event = event.start + skip..event.end + skip;
                let mut out = BytesMut::with_capacity(complete.len() - event.len() + rest.len());
                out.extend_from_slice(&complete[..event.start]);
                out.extend_from_slice(&complete[event.end..]);
                if !rest.is_empty() {
                    out.extend_from_slice(&rest);
                }
                return out.freeze();
            }
        };
        if rest.len() > MAX_EVENT {
            // A long unfinished event after the complete ones: forwarded with them.
            self.overlong = true;
            let mut joined = BytesMut::with_capacity(out.len() + rest.len());
            joined.extend_from_slice(&out);
            joined.extend_from_slice(&rest);
            return joined.freeze();
        }
        self.carry.extend_from_slice(&rest);
        out
    }

    /// `bytes` after what is held, as one buffer (no copy when nothing is held).
    fn join(&mut self, bytes: Bytes) -> Bytes {
        if self.carry.is_empty() {
            return bytes;
        }
        self.carry.extend_from_slice(&bytes);
        self.carry.split().freeze()
    }

    /// What is still held when the stream ends (an unterminated last event), to forward as is.
    pub fn finish(&mut self) -> Bytes {
        self.carry.split().freeze()
    }
}

/// Where the complete events end in `frame`, the bytes after `held`: just past the last blank
/// line, which may begin in the last bytes held. Only the new bytes are searched.
fn events_end(held: &[u8], frame: &[u8]) -> Option<usize> {
    let inside = last_event_end(frame);
    if inside > 0 {
        return Some(inside);
    }
    // A blank line cut by the frame boundary ends in the frame's first three bytes.
    let before = &held[held.len().saturating_sub(3)..];
    let mut window = [0u8; 6];
    let after = frame.len().min(3);
    window[..before.len()].copy_from_slice(before);
    window[before.len()..before.len() + after].copy_from_slice(&frame[..after]);
    (before.len()..before.len() + after)
        .rev()
        .find(|&i| window[i] == b'\n' && ends_blank_line(&window[..before.len() + after], i))
        .map(|i| i - before.len() + 1)
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

/// The byte range of the usage-only event in `events` (complete events only), if any. Each
/// event is searched once: after a `"usage"` key, the search goes on from its event's end.
fn usage_only_event(events: &[u8]) -> Option<Range<usize>> {
    // `floor`: where the event being searched began at the latest (an event end, or 0).
    let (mut pos, mut floor) = (0, 0);
    while let Some(found) = USAGE_FINDER.find(&events[pos..]) {
        let at = pos + found;
        // Most chunks carry `"usage": null`: passed over without looking for their event.
        if !matches!(object_after_key(events, at + USAGE_KEY.len()), Some(Ok(_))) {
            pos = at + USAGE_KEY.len();
            continue;
        }
        let mut start = floor + last_event_end(&events[floor..at]);
        // Line ends before the event's first line close the event before it (one that ended
        // in the previous frame): they are not the usage event's to take away.
        while matches!(events[start], b'\n' | b'\r') {
            start += 1;
        }
        let end = at + last_event_end_from(&events[at..])?;
        if end - start <= MAX_EVENT && is_usage_only(&events[start..end]) {
            return Some(start..end);
        }
        (pos, floor) = (end, end);
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
    // The usual event, one `data:` line and its blank line, is read where it lies. Its UTF-8
    // is checked first, as the general reading does: serde does not check the strings it
    // skips.
    match single_data_line(event) {
        Some(json) => {
            std::str::from_utf8(json).is_ok_and(|json| serde_json::from_str::<Chunk>(json).is_ok_and(Chunk::usage_only))
        }
        None => is_usage_only_by_lines(event),
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<serde::de::IgnoredAny>,
    usage: Option<Usage>,
}

impl Chunk {
    fn usage_only(self) -> bool {
        self.choices.is_empty() && self.usage.is_some()
    }
}

/// `is_usage_only` for any event: its `data:` lines joined, as the SSE spec reads them.
fn is_usage_only_by_lines(event: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(event) else { return false };
    let mut data = String::new();
    for line in text.lines() {
        match line.strip_prefix("data:") {
            Some(value) => data.push_str(value.strip_prefix(' ').unwrap_or(value)),
            None if line.is_empty() || line.starts_with(':') => {}
            None => return false,
        }
    }
    serde_json::from_str::<Chunk>(&data).is_ok_and(Chunk::usage_only)
}

/// The value of an event that is one `data:` line and the blank line ending it, as the
/// general reading (`str::lines`) would take it; `None` for any other shape.
fn single_data_line(event: &[u8]) -> Option<&[u8]> {
    let newline = memchr::memchr(b'\n', event)?;
    let (line, rest) = (&event[..newline], &event[newline + 1..]);
    if rest != b"\n" && rest != b"\r\n" {
        return None;
    }
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let value = line.strip_prefix(b"data:")?;
    Some(value.strip_prefix(b" ").unwrap_or(value))
}

/// Counts the SSE events that carry generated text, an estimate of completion tokens for
/// servers that report no usage, or streams cut before it (NIM and vLLM send one token per
/// event).
#[derive(Debug, Default)]
pub struct ContentCounter {
    /// The last bytes of the previous frame, where a marker may have begun.
    tail: [u8; MARKER_MAX],
    tail_len: usize,
    events: u64,
}

/// Chat's `content`, completions' `text`, tool calls' `arguments`, the Responses API's text
/// `delta` (chat's `delta` is an object, never a string).
const CONTENT_MARKERS: [&[u8]; 4] = [b"\"content\":\"", b"\"text\":\"", b"\"arguments\":\"", b"\"delta\":\""];
/// The longest marker.
const MARKER_MAX: usize = 13;
/// The last letter of each marker's key (content, text, arguments, delta).
const MARKER_LAST_LETTERS: [u8; 3] = [b't', b's', b'a'];
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
            // Most `":"` end other keys (`"id"`, `"model"`, `"role"`): the key's last letter
            // rules them out before any marker is compared.
            if !end.checked_sub(1).and_then(|i| bytes.get(i)).is_some_and(|b| MARKER_LAST_LETTERS.contains(b)) {
                continue;
            }
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

    /// serde's reading of a usage object at the start of `buf`, with the bytes it took.
    fn serde_usage(buf: &[u8]) -> Option<(Usage, usize)> {
        let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<Usage>();
        let usage = values.next()?.ok()?;
        Some((usage, values.byte_offset()))
    }

    #[test]
    fn the_hand_reader_agrees_with_serde_or_declines() {
        let corpus: [&[u8]; 9] = [
            br#"{"prompt_tokens":12,"completion_tokens":30,"total_tokens":42}"#,
            br#"{ "prompt_tokens" : 0 , "total_tokens" : null ,"completion_tokens":7 }"#,
            br#"{"input_tokens":5,"input_tokens_details":{"cached_tokens":0},"output_tokens":9,"output_tokens_details":{"reasoning_tokens":3},"total_tokens":14}"#,
            br#"{"prompt_tokens":18446744073709551615,"completion_tokens":1}"#,
            br#"{"prompt_tokens":3,"prompt_tokens_details":null,"completion_tokens":4,"total_tokens":7}"#,
            b"{\n\t\"completion_tokens\": 2,\r\n \"prompt_tokens\": 1}",
            br#"{}"#,
            br#"{"prompt_tokens":1,"input_tokens":2}"#,
            br#"{"prompt_tokens":1.0,"x":"y","total_tokens":-1,"z":[1],"q":{"a":{"b":1}}}"#,
        ];
        let tricky =
            [b'"', b'\\', b'{', b'}', b',', b':', b'0', b'9', b'-', b'.', b'e', b'n', b' ', b'\x0c', 0x01, 0xff];
        let mut agreed = 0;
        let mut check = |buf: &[u8]| {
            if let Some(hand) = flat_usage(buf) {
                assert_eq!(Some(hand), serde_usage(buf), "{}", String::from_utf8_lossy(buf));
                agreed += 1;
            }
        };
        for body in corpus {
            for end in 0..=body.len() {
                check(&body[..end]);
            }
            for at in 0..body.len() {
                for b in tricky {
                    let mut mutated = body.to_vec();
                    mutated[at] = b;
                    check(&mutated);
                    mutated.insert(at, b);
                    check(&mutated);
                }
            }
        }
        assert!(agreed > 1000, "the hand reader read only {agreed} inputs");
        // The usual shapes are read by hand, not left to serde.
        for body in &corpus[..7] {
            assert!(flat_usage(body).is_some(), "{}", String::from_utf8_lossy(body));
        }
        // A duplicate known field, by name or alias, is serde's error, so the hand reader declines.
        assert_eq!(flat_usage(corpus[7]), None);
        assert_eq!(serde_usage(corpus[7]), None);
    }
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
    fn a_stream_without_event_ends_is_forwarded_as_it_comes_holding_little() {
        // 32 MB of one endless "event" (lines, never a blank one), in 1 KiB frames.
        let frame = Bytes::from("data: {\"usage\": {\"x\": 1}\n".repeat(40));
        let mut stripper = UsageEventStripper::default();
        let mut forwarded = 0;
        for i in 0..32 * 1024 {
            forwarded += stripper.process(frame.clone()).len();
            let fed = (i + 1) * frame.len();
            assert!(fed - forwarded <= MAX_EVENT, "held {} bytes after {fed}", fed - forwarded);
        }
        forwarded += stripper.finish().len();
        assert_eq!(forwarded, 32 * 1024 * frame.len());
        // Then a real stream resumes, and its usage event is still found.
        let tail = "\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n";
        let out = stripper.process(Bytes::from(tail));
        assert_eq!(out, "\n\ndata: [DONE]\n\n");
    }

    #[test]
    fn one_byte_frames_are_joined_without_rescanning() {
        let event = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":1}}\n\ndata: [DONE]\n\n";
        let mut stripper = UsageEventStripper::default();
        let mut scanner = UsageScanner::default();
        let mut out = Vec::new();
        for byte in event.bytes() {
            out.extend_from_slice(&stripper.process(Bytes::copy_from_slice(&[byte])));
            scanner.feed(&[byte]);
        }
        out.extend_from_slice(&stripper.finish());
        assert_eq!(String::from_utf8(out).unwrap(), "data: [DONE]\n\n");
        assert_eq!(scanner.usage().map(|u| u.prompt_tokens), Some(1));
    }

    #[test]
    fn usage_inside_a_chunk_with_choices_is_not_stripped() {
        let stream =
            "data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}],\"usage\":{\"total_tokens\":3}}\n\ndata: [DONE]\n\n";
        let mut stripper = UsageEventStripper::default();
        assert_eq!(stripper.process(Bytes::from(stream)), stream);
    }

    #[test]
    fn every_marker_key_ends_in_a_letter_the_counter_looks_at() {
        for marker in CONTENT_MARKERS {
            let last = marker[marker.len() - MARKER_END.len() - 1];
            assert!(MARKER_LAST_LETTERS.contains(&last), "{}", String::from_utf8_lossy(marker));
        }
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
        fn an_event_read_where_it_lies_is_judged_as_by_its_lines(
            start in proptest::sample::select(vec!["data:", "data: ", "data:  ", "event: x\ndata: ", ": c\ndata:", "dat: ", ""]),
            json in proptest::sample::select(vec![
                "{\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2}}",
                "{\"id\":\"\u{e9}\",\"choices\":[],\"usage\":{\"total_tokens\":3}}",
                "{\"choices\":[{\"delta\":{}}],\"usage\":{\"prompt_tokens\":1}}",
                "{\"choices\":[],\"usage\":null}",
                "{\"choices\":[],\"usage\":{\"prompt_tokens\":1}",
                "{\"choices\":[],\"usage\":{\"prompt_tokens\":\"1\"}}",
                "\r{\"choices\":[],\"usage\":{}} ",
            ]),
            bad_byte in proptest::option::of(0usize..40),
            end in proptest::sample::select(vec!["\n\n", "\r\n\r\n", "\r\n\n", "\n\r\n", "\n", "\ndata: {}\n\n", "\r\r\n\n"]),
        ) {
            let mut event = format!("{start}{json}{end}").into_bytes();
            // Bytes that are not UTF-8, inside the JSON or out of it.
            if let Some(at) = bad_byte.filter(|&at| at < event.len()) {
                event.insert(at, 0xff);
            }
            prop_assert_eq!(is_usage_only(&event), is_usage_only_by_lines(&event), "{:?}", String::from_utf8_lossy(&event));
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
            // The stripper alone, and told what the scanner found, as the meter runs them.
            let mut told = UsageEventStripper::default();
            let mut told_out = Vec::new();
            for frame in split_at_points(STREAM, &points) {
                let without_usage_object = scanner.feed(&frame);
                counter.feed(&frame);
                out.extend_from_slice(&stripper.process(frame.clone()));
                told_out.extend_from_slice(&told.process_known(frame, without_usage_object));
            }
            out.extend_from_slice(&stripper.finish());
            told_out.extend_from_slice(&told.finish());
            prop_assert_eq!(scanner.usage().map(|u| u.total()), Some(11));
            prop_assert_eq!(String::from_utf8(out).unwrap(), STREAM.replace(USAGE_EVENT, ""));
            prop_assert_eq!(String::from_utf8(told_out).unwrap(), STREAM.replace(USAGE_EVENT, ""));
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
