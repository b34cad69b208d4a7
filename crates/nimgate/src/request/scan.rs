//! The fast path of [`peek`](super::peek): one pass over a request body that finds the raw
//! text of the top-level fields the gateway reads, without serde's machinery.
//!
//! The contract is *exact or declines*. [`top_level_fields`] returns `Some` only for a body
//! that serde's path (`Fields`, read with `serde_json::from_slice`) reads without error, and
//! then every field holds exactly what serde gives: the value's text as `RawValue::get()` has
//! it (no surrounding whitespace), borrowed from the body, or `None` where serde has `None`.
//! For anything else it returns `None` and `peek` asks serde, so every error message and every
//! odd case stays serde's. serde is the reference; declining is always correct, so whatever
//! is rare or awkward declines rather than being modelled:
//!
//! - invalid JSON anywhere, skipped values included, and invalid UTF-8 anywhere;
//! - a `\u` escape that encodes a surrogate (serde skips them unchecked in values it ignores,
//!   and refuses unpaired ones in strings it reads);
//! - containers nested deeper than [`MAX_DEPTH`] inside a value (serde skips ignored and raw
//!   values without a depth limit, so any limit here only sends more bodies its way);
//! - a top-level key with an escape (serde unescapes keys before it matches field names);
//! - a field the gateway reads given twice (serde reports a duplicate field).
//!
//! Unknown keys, repeated or not, are skipped as serde skips them.
//!
//! It allocates nothing, does not recurse, and does not index: every read is checked, so no
//! input makes it panic.

/// Containers nested deeper than this in a value are left to serde. Requests nest a few
/// levels (a tool's JSON schema perhaps a dozen); 64 keeps the nesting in one `u64`.
const MAX_DEPTH: u32 = 64;

/// The raw text of each top-level field the gateway reads, as serde's path gives it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct RawFields<'a> {
    pub(super) model: Option<&'a str>,
    pub(super) stream: Option<&'a str>,
    pub(super) max_tokens: Option<&'a str>,
    pub(super) max_completion_tokens: Option<&'a str>,
    pub(super) max_output_tokens: Option<&'a str>,
    /// `null` included: serde reads this one with `present`.
    pub(super) stream_options: Option<&'a str>,
    pub(super) messages: Option<&'a str>,
    pub(super) prompt: Option<&'a str>,
    pub(super) input: Option<&'a str>,
    /// `null` included: serde reads this one with `present`.
    pub(super) priority: Option<&'a str>,
}

/// What serde makes of a `null` in a field: `Option<&RawValue>` reads it as `None`, the
/// fields read with `present` keep it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Null {
    Absent,
    Kept,
}

/// Where a known key's value goes: its bit in the set of keys seen, its slot, how it reads
/// `null`.
struct Slot<'f, 'a> {
    bit: u16,
    value: &'f mut Option<&'a str>,
    null: Null,
}

impl<'a> RawFields<'a> {
    /// The slot of a top-level key the gateway reads; `None` for any other key.
    fn slot(&mut self, key: &[u8]) -> Option<Slot<'_, 'a>> {
        let (bit, value, null) = match key {
            b"model" => (0, &mut self.model, Null::Absent),
            b"stream" => (1, &mut self.stream, Null::Absent),
            b"max_tokens" => (2, &mut self.max_tokens, Null::Absent),
            b"max_completion_tokens" => (3, &mut self.max_completion_tokens, Null::Absent),
            b"max_output_tokens" => (4, &mut self.max_output_tokens, Null::Absent),
            b"stream_options" => (5, &mut self.stream_options, Null::Kept),
            b"messages" => (6, &mut self.messages, Null::Absent),
            b"prompt" => (7, &mut self.prompt, Null::Absent),
            b"input" => (8, &mut self.input, Null::Absent),
            b"priority" => (9, &mut self.priority, Null::Kept),
            _ => return None,
        };
        Some(Slot { bit: 1 << bit, value, null })
    }

    /// Every field, in declaration order, for tests that compare two readings.
    #[cfg(test)]
    pub(super) fn all(&self) -> [Option<&'a str>; 10] {
        [
            self.model,
            self.stream,
            self.max_tokens,
            self.max_completion_tokens,
            self.max_output_tokens,
            self.stream_options,
            self.messages,
            self.prompt,
            self.input,
            self.priority,
        ]
    }
}

/// The top-level fields of `body` exactly as serde's path reads them, or `None` when that is
/// not certain (see the module's doc).
pub(super) fn top_level_fields(body: &[u8]) -> Option<RawFields<'_>> {
    // Once for the whole body: the scan below then only has to find ASCII structure, and the
    // values it hands out are `str`s.
    let text = std::str::from_utf8(body).ok()?;
    Scanner { text, at: 0 }.object()
}

/// A cursor over the body. Every structural byte of JSON is ASCII, so `at` is always on a
/// character boundary where a value starts or ends.
struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

/// The kind of an open container.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Container {
    Array,
    Object,
}

/// The containers open inside a value, innermost last: a depth and one bit per level, so that
/// skipping a value needs neither recursion nor allocation.
#[derive(Default)]
struct Nesting {
    depth: u32,
    objects: u64,
}

impl Nesting {
    fn open(&mut self, container: Container) -> Option<()> {
        if self.depth >= MAX_DEPTH {
            return None;
        }
        let bit = 1u64 << self.depth;
        match container {
            Container::Object => self.objects |= bit,
            Container::Array => self.objects &= !bit,
        }
        self.depth += 1;
        Some(())
    }

    fn innermost(&self) -> Option<Container> {
        let level = self.depth.checked_sub(1)?;
        Some(if self.objects >> level & 1 == 1 { Container::Object } else { Container::Array })
    }

    fn close(&mut self) {
        self.depth = self.depth.saturating_sub(1);
    }
}

impl<'a> Scanner<'a> {
    /// The next byte, consumed; 0 at the end of the body, where it is never what the grammar
    /// wants either.
    fn take(&mut self) -> u8 {
        match self.text.as_bytes().get(self.at) {
            Some(byte) => {
                self.at += 1;
                *byte
            }
            None => 0,
        }
    }

    /// The next byte that is not whitespace, consumed (0 at the end).
    fn token(&mut self) -> u8 {
        while let Some(&byte) = self.text.as_bytes().get(self.at) {
            self.at += 1;
            if !matches!(byte, b' ' | b'\t' | b'\n' | b'\r') {
                return byte;
            }
        }
        0
    }

    /// JSON's whitespace only: serde refuses the rest of ASCII's (a form feed, say).
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.text.as_bytes().get(self.at) {
            self.at += 1;
        }
    }

    fn rest(&self) -> &'a [u8] {
        self.text.as_bytes().get(self.at..).unwrap_or_default()
    }

    /// The whole body: one object, its known fields recorded, then only whitespace.
    fn object(mut self) -> Option<RawFields<'a>> {
        let mut fields = RawFields::default();
        let mut seen = 0u16;
        if self.token() != b'{' {
            return None;
        }
        let mut next = self.token();
        if next != b'}' {
            loop {
                if next != b'"' {
                    return None;
                }
                let key = self.key()?;
                if self.token() != b':' {
                    return None;
                }
                let first = self.token();
                // The value's first byte was just taken (the body's `{` came before it).
                let start = self.at.saturating_sub(1);
                self.skip_value(first)?;
                if let Some(slot) = fields.slot(key) {
                    if seen & slot.bit != 0 {
                        return None;
                    }
                    seen |= slot.bit;
                    let value = self.text.get(start..self.at)?;
                    *slot.value = (slot.null == Null::Kept || value != "null").then_some(value);
                }
                match self.token() {
                    b',' => next = self.token(),
                    b'}' => break,
                    _ => return None,
                }
            }
        }
        self.skip_whitespace();
        (self.at == self.text.len()).then_some(fields)
    }

    /// A top-level key after its opening quote, through the closing one, returned without
    /// them. One with an escape declines: serde would match its unescaped text, not these
    /// bytes.
    fn key(&mut self) -> Option<&'a [u8]> {
        let start = self.at;
        self.at += plain_run(self.rest());
        let key = self.text.as_bytes().get(start..self.at)?;
        (self.take() == b'"').then_some(key)
    }

    /// One value of any kind whose `first` byte was just taken, nested containers included,
    /// through its last byte.
    fn skip_value(&mut self, mut first: u8) -> Option<()> {
        let mut nesting = Nesting::default();
        loop {
            match first {
                b'{' => {
                    nesting.open(Container::Object)?;
                    match self.token() {
                        b'"' => {
                            self.member_name()?;
                            first = self.token();
                            continue;
                        }
                        b'}' => nesting.close(),
                        _ => return None,
                    }
                }
                b'[' => {
                    nesting.open(Container::Array)?;
                    first = self.token();
                    if first != b']' {
                        continue;
                    }
                    nesting.close();
                }
                b'"' => self.skip_string()?,
                b't' => self.skip_literal(b"rue")?,
                b'f' => self.skip_literal(b"alse")?,
                b'n' => self.skip_literal(b"ull")?,
                b'-' | b'0'..=b'9' => self.skip_number(first)?,
                _ => return None,
            }
            // A value ended: close the containers it ends, then move on to the next element.
            loop {
                let Some(container) = nesting.innermost() else { return Some(()) };
                match (self.token(), container) {
                    (b',', Container::Array) => {}
                    (b',', Container::Object) => {
                        if self.token() != b'"' {
                            return None;
                        }
                        self.member_name()?;
                    }
                    (b']', Container::Array) | (b'}', Container::Object) => {
                        nesting.close();
                        continue;
                    }
                    _ => return None,
                }
                first = self.token();
                break;
            }
        }
    }

    /// A nested object's key after its opening quote, and the colon after it. Its escapes
    /// are fine: serde skips nested keys as it skips any string.
    fn member_name(&mut self) -> Option<()> {
        self.skip_string()?;
        (self.token() == b':').then_some(())
    }

    /// The rest of a string after its opening quote, through the closing one. Inlined (as is
    /// `plain_run`'s first word): a call per string cost 6 % of a small body's scan.
    #[inline(always)]
    fn skip_string(&mut self) -> Option<()> {
        loop {
            self.at += plain_run(self.rest());
            match self.take() {
                b'"' => return Some(()),
                b'\\' => self.skip_escape()?,
                // A raw control character (JSON wants it escaped), or the end of the body.
                _ => return None,
            }
        }
    }

    /// An escape after its backslash. Out of line and cold: most strings have none, and
    /// keeping it out of `skip_string` keeps that loop tight.
    #[cold]
    #[inline(never)]
    fn skip_escape(&mut self) -> Option<()> {
        match self.take() {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
            b'u' => {
                let digits = self.rest().get(..4)?;
                let unit = digits.iter().try_fold(0u16, |unit, digit| Some(unit << 4 | hex_value(*digit)?))?;
                // A surrogate is valid only as half of a pair, which serde checks in some
                // places and not others: rare, and not worth modelling.
                if (0xD800..=0xDFFF).contains(&unit) {
                    return None;
                }
                self.at += 4;
            }
            _ => return None,
        }
        Some(())
    }

    /// The rest of `true`, `false` or `null` after its first letter.
    fn skip_literal(&mut self, rest_of_word: &[u8]) -> Option<()> {
        self.rest().starts_with(rest_of_word).then(|| self.at += rest_of_word.len())
    }

    /// A number whose `first` byte was just taken, as JSON has it: `-`?, `0` or digits not
    /// starting with `0`, then an optional fraction and exponent, each with at least one
    /// digit. What follows is checked by the caller, which wants a separator there (so `01`
    /// and `1x` decline).
    fn skip_number(&mut self, first: u8) -> Option<()> {
        let leading = if first == b'-' { self.take() } else { first };
        match leading {
            b'0' => {}
            b'1'..=b'9' => self.skip_digits(),
            _ => return None,
        }
        if self.eat(b'.') {
            self.digits()?;
        }
        if self.eat(b'e') || self.eat(b'E') {
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            self.digits()?;
        }
        Some(())
    }

    fn eat(&mut self, byte: u8) -> bool {
        let found = self.text.as_bytes().get(self.at) == Some(&byte);
        if found {
            self.at += 1;
        }
        found
    }

    /// One or more decimal digits.
    fn digits(&mut self) -> Option<()> {
        let start = self.at;
        self.skip_digits();
        (self.at > start).then_some(())
    }

    fn skip_digits(&mut self) {
        self.at += self.rest().iter().take_while(|byte| byte.is_ascii_digit()).count();
    }
}

fn hex_value(digit: u8) -> Option<u16> {
    (digit as char).to_digit(16).map(|value| value as u16)
}

/// How many bytes at the start of `bytes` may stand in a string as they are: anything but a
/// quote, a backslash or a control character. Most strings are short (keys, roles, model
/// names) and end within the first eight bytes, looked at at once here; the longer ones go on
/// out of line.
#[inline(always)]
fn plain_run(bytes: &[u8]) -> usize {
    match bytes.split_first_chunk::<8>() {
        Some((word, rest)) => match special_bytes(u64::from_le_bytes(*word)) {
            // Little-endian: the lowest flagged byte is the first in the body.
            0 => 8 + longer_plain_run(rest),
            special => (special.trailing_zeros() / 8) as usize,
        },
        None => bytes.iter().take_while(|byte| !matches!(byte, b'"' | b'\\' | 0..=0x1F)).count(),
    }
}

/// `plain_run` past a string's first eight bytes: a few more words one by one, then, for a
/// string that is long (the prompt), `memchr`'s vector search.
#[inline(never)]
fn longer_plain_run(bytes: &[u8]) -> usize {
    let mut rest = bytes;
    for _ in 0..SHORT_WORDS {
        let Some((word, tail)) = rest.split_first_chunk::<8>() else { break };
        let special = special_bytes(u64::from_le_bytes(*word));
        if special != 0 {
            return bytes.len() - rest.len() + (special.trailing_zeros() / 8) as usize;
        }
        rest = tail;
    }
    bytes.len() - rest.len() + long_plain_run(rest)
}

/// Words looked at one by one before a string counts as long.
const SHORT_WORDS: usize = 3;

/// `plain_run` for what may be a long string: the next quote or backslash, then a check that
/// no control character comes before it (one pass each, both vectorised).
fn long_plain_run(bytes: &[u8]) -> usize {
    let end = memchr::memchr2(b'"', b'\\', bytes).unwrap_or(bytes.len());
    let before = bytes.get(..end).unwrap_or_default();
    if before.iter().fold(u8::MAX, |lowest, byte| lowest.min(*byte)) >= 0x20 {
        return end;
    }
    before.iter().position(|byte| *byte < 0x20).unwrap_or(end)
}

const ONES: u64 = u64::from_le_bytes([0x01; 8]);
const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);

/// The high bit of each byte of `word` that is a quote, a backslash or below 0x20. Bytes after
/// the first flagged one may be flagged wrongly (a borrow carries on), the first never is.
fn special_bytes(word: u64) -> u64 {
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
    below_space | zero_bytes(word ^ (ONES * u64::from(b'"'))) | zero_bytes(word ^ (ONES * u64::from(b'\\')))
}

/// The high bit of each zero byte of `word` (with the same caveat as above).
fn zero_bytes(word: u64) -> u64 {
    word.wrapping_sub(ONES) & !word & HIGHS
}

#[cfg(test)]
mod tests {
    use std::ops::Range;

    use proptest::prelude::*;

    use super::*;
    use crate::error::GatewayError;
    use crate::request::{RequestHead, fields_by_serde, peek, peek_by_serde, span_of};

    fn fields(body: &str) -> Option<RawFields<'_>> {
        top_level_fields(body.as_bytes())
    }

    #[test]
    fn gives_each_known_field_as_its_text_without_surrounding_whitespace() {
        let body = "\r\n { \"model\" :\t\"m\" , \"stream\":true,\"max_tokens\" : 1e3 ,\"messages\":\n[ {\"a\" : [ ] } ]\n,\"x\":{}} \n";
        let fields = fields(body).unwrap();
        assert_eq!(fields.model, Some("\"m\""));
        assert_eq!(fields.stream, Some("true"));
        assert_eq!(fields.max_tokens, Some("1e3"));
        assert_eq!(fields.messages, Some("[ {\"a\" : [ ] } ]"));
        assert_eq!(fields.prompt, None);
        assert_eq!(fields.stream_options, None);
    }

    #[test]
    fn skips_unknown_keys_even_repeated_but_declines_a_repeated_known_one() {
        assert!(fields(r#"{"x":1,"x":2,"model":"m"}"#).is_some());
        assert!(fields(r#"{"model":"m","model":"m"}"#).is_none());
        assert!(fields(r#"{"model":null,"model":"m"}"#).is_none());
        assert!(fields(r#"{"priority":1,"priority":null}"#).is_none());
    }

    #[test]
    fn declines_what_is_not_exactly_one_valid_object() {
        for body in [
            "",
            " ",
            "[]",
            "\"s\"",
            "1",
            "\x0c{}",
            "{} x",
            "{}{}",
            "{}\x0c",
            "{",
            "{\"a\"}",
            "{\"a\" 1}",
            "{\"a\":1,}",
            "{,}",
            "{\"a\":1 \"b\":2}",
            "{\"a\":[1,]}",
            "{\"a\":[1 2]}",
            "{\"a\":[}",
            "{\"a\":{]}",
            "{\"a\":{\"b\"}}",
            "{\"a\":{1:2}}",
            "{\"a\":[1]]}",
            "{a:1}",
            "{'a':1}",
        ] {
            assert!(fields(body).is_none(), "accepted {body:?}");
        }
    }

    #[test]
    fn declines_bad_numbers_and_literals_even_in_skipped_values() {
        for value in [
            "01", "-01", "1.", "-", "1e", "1e+", "1E-", ".5", "+1", "1.e3", "0x1", "tru", "nul", "True", "nulll",
            "falsey",
        ] {
            assert!(fields(&format!(r#"{{"x":[{value}]}}"#)).is_none(), "accepted {value}");
            assert!(fields(&format!(r#"{{"x":{value}}}"#)).is_none(), "accepted {value}");
        }
        for value in ["0", "-0", "0.5", "-10.25e+3", "1E9", "7e-0", "123456789012345678901234567890", "true", "null"] {
            assert!(fields(&format!(r#"{{"x":[{value}],"y":{value}}}"#)).is_some(), "declined {value}");
        }
    }

    #[test]
    fn declines_bad_strings_even_in_skipped_values() {
        for string in [
            "\"a\x01b\"",
            "\"\x1f\"",
            "\"tab\there\"",
            "\"new\nline\"",
            r#""\x""#,
            r#""\u12""#,
            r#""\u12g4""#,
            r#""\ud83d\ude00""#,
            r#""\udfff""#,
            r#""unterminated"#,
            r#""\"#,
        ] {
            assert!(fields(&format!(r#"{{"x":{string}}}"#)).is_none(), "accepted {string}");
            assert!(fields(&format!(r#"{{"x":{{{string}:1}}}}"#)).is_none(), "accepted key {string}");
        }
        assert!(fields("{\"x\":\"caf\u{e9} \u{1f600} \\u00e9\\n\\\"\\\\\\/\\b\\f\\r\\t\\uABCD\"}").is_some());
        assert!(top_level_fields(b"{\"x\":\"\xff\"}").is_none(), "invalid UTF-8");
    }

    #[test]
    fn declines_escaped_top_level_keys_but_not_nested_ones() {
        assert!(fields(r#"{"mod\u0065l":"m"}"#).is_none());
        assert!(fields(r#"{"a\"b":1}"#).is_none());
        assert!(fields(r#"{"x":{"a\"b\u0065":1}}"#).is_some());
    }

    #[test]
    fn declines_nesting_deeper_than_the_limit() {
        let nested = |depth: usize| format!(r#"{{"x":{}{}}}"#, "[".repeat(depth), "]".repeat(depth));
        assert!(fields(&nested(MAX_DEPTH as usize)).is_some());
        assert!(fields(&nested(MAX_DEPTH as usize + 1)).is_none());
        let objects = |depth: usize| format!(r#"{{"x":{}1{}}}"#, r#"{"a":"#.repeat(depth), "}".repeat(depth));
        assert!(fields(&objects(MAX_DEPTH as usize)).is_some());
        assert!(fields(&objects(MAX_DEPTH as usize + 1)).is_none());
    }

    #[test]
    fn plain_run_stops_at_the_first_special_byte_wherever_it_is() {
        for len in 0..40 {
            for special in [b'"', b'\\', 0x00, 0x1F] {
                let mut bytes = vec![b'a'; len + 20];
                // Bytes just around the thresholds, and non-ASCII, are plain.
                for (i, byte) in bytes.iter_mut().enumerate() {
                    *byte = [b'a', 0x20, 0x21, b'[', b']', 0x7F, 0x80, 0xFF, 0x01 + 0x20][i % 9];
                }
                bytes[len] = special;
                bytes[len + 3] = b'"';
                assert_eq!(plain_run(&bytes), len, "special {special:#x} at {len}");
            }
        }
        assert_eq!(plain_run(b"no end"), 6);
        assert_eq!(plain_run(b"longer with no end"), 18);
    }

    /// The ten known keys, in the order of `RawFields::all`.
    const KNOWN: [&str; 10] = [
        "model",
        "stream",
        "max_tokens",
        "max_completion_tokens",
        "max_output_tokens",
        "stream_options",
        "messages",
        "prompt",
        "input",
        "priority",
    ];

    #[test]
    fn a_null_reads_as_serde_reads_it_in_every_field() {
        for (index, key) in KNOWN.into_iter().enumerate() {
            let body = match key {
                "model" => r#"{"model" : null }"#.to_owned(),
                _ => format!(r#"{{"model":"m", "{key}" : null }}"#),
            };
            let fast = fields(&body).unwrap();
            let serde = fields_by_serde(body.as_bytes()).unwrap();
            // serde's `Option<&RawValue>` reads `null` as `None`; `present` keeps it.
            let expected = matches!(key, "stream_options" | "priority").then_some("null");
            assert_eq!(fast.all()[index], expected, "{key}");
            assert_eq!(serde.all()[index], expected, "{key}");
            assert_eq!(spans(body.as_bytes(), &fast), spans(body.as_bytes(), &serde), "{key}");
            assert_eq!(outcome(peek(body.as_bytes())), outcome(peek_by_serde(body.as_bytes())), "{key}");
        }
        // So a null `messages` leaves the prompt to the next field, on either path.
        let body = r#"{"model":"m","messages":null,"prompt":"p"}"#;
        assert_eq!(&body[peek(body.as_bytes()).unwrap().prompt_span.unwrap()], "\"p\"");
    }

    fn spans(body: &[u8], fields: &RawFields<'_>) -> [Option<Range<usize>>; 10] {
        fields.all().map(|text| text.map(|text| span_of(body, text)))
    }

    /// Everything `peek` tells, to compare two paths.
    fn outcome(result: Result<RequestHead<'_>, GatewayError>) -> String {
        match result {
            Ok(head) => format!("{head:?}"),
            Err(e) => format!("error: {e}"),
        }
    }

    /// Realistic bodies, every one of which the scanner must read itself.
    const READ_BY_THE_SCANNER: &[&str] = &[
        r#"{"model": "bench/fast", "stream": false, "messages": [{"role": "user", "content": "Hello!"}]}"#,
        r#"{"model":"meta/llama-3.1-8b-instruct","messages":[{"role":"system","content":"You are terse."},{"role":"user","content":"What is the weather in Paris?"}],"tools":[{"type":"function","function":{"name":"get_weather","description":"Current weather","parameters":{"type":"object","properties":{"city":{"type":"string"},"unit":{"type":"string","enum":["c","f"]}},"required":["city"]}}}],"tool_choice":"auto","temperature":0.7,"top_p":1,"n":1,"stream":true,"stream_options":{"include_usage":true},"max_tokens":512}"#,
        r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\": \"Paris\", \"unit\": \"c\"}"}}]},{"role":"tool","tool_call_id":"call_1","content":"18\u00b0C, clear"}],"response_format":{"type":"json_schema","json_schema":{"name":"answer","strict":true,"schema":{"type":"object","properties":{"answer":{"type":"string"}},"additionalProperties":false}}}}"#,
        r#"{"model":"vision","messages":[{"role":"user","content":[{"type":"text","text":"What is in this image?"},{"type":"image_url","image_url":{"url":"data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==","detail":"low"}}]}],"max_completion_tokens":300}"#,
        "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"Gr\u{fc}\u{df}e, \u{4e16}\u{754c} \u{1f30d}! caf\\u00e9 line\\nbreak \\\"quoted\\\" back\\\\slash \\/ \\b\\f\\r\\t \\u0000 \\uFFFF \\uabcd\"}]}",
        r#"{"model":"m","x":[0,-0,1,-1,0.5,-0.5,10.25,1e5,1E5,1e+5,1e-5,-1.5E-10,0e0,12345678901234567890123456789,0.000001,9007199254740993],"y":{"a":true,"b":false,"c":null,"d":[],"e":{},"f":[[[]]],"g":[{}],"h":""}}"#,
        "\t\r\n {\r\n\t\"model\" \t:\r\n \"spaced\" \t,\n  \"stream\"\t:\ttrue\t,\r\n \"messages\" : [ { \"role\" : \"user\" , \"content\" : [ ] } ] , \"n\" : 2 \n}\r\n\t ",
        r#"{"prompt":"Once upon a time, in a land far, far away,","model":"gpt-3.5-turbo-instruct","max_tokens":16,"echo":false,"logprobs":null,"stop":["\n\n","END"],"suffix":null}"#,
        r#"{"model":"m","prompt":[[1,2,3],[4,5,6]],"max_tokens":0}"#,
        r#"{"model":"nvidia/nv-embedqa-e5-v5","input":["first passage","second passage","third \"quoted\" passage"],"input_type":"passage","encoding_format":"float","truncate":"END"}"#,
        r#"{"model":"o-mini","input":[{"role":"user","content":[{"type":"input_text","text":"Summarise this."}]}],"instructions":"Be brief.","reasoning":{"effort":"low"},"text":{"format":{"type":"text"}},"max_output_tokens":1024,"store":false,"previous_response_id":null}"#,
        r#"{"model":"m","stream":null,"max_tokens":null,"max_completion_tokens":null,"max_output_tokens":null,"stream_options":null,"messages":null,"prompt":null,"input":null,"priority":null}"#,
        r#"{"model":42,"stream":"yes","max_tokens":-1,"max_completion_tokens":1.5,"max_output_tokens":"10","stream_options":[],"messages":{},"prompt":true,"input":0,"priority":"high"}"#,
        r#"{"model":["a"],"stream":1,"max_tokens":1e3,"stream_options":"yes","priority":{"level":1}}"#,
        r#"{"model":"m","stream":true,"stream_options":{"include_usage":false,"continuous_usage_stats":true},"priority":-5}"#,
        r#"{"model":"meta\/llama\u002d3","priority":10,"max_tokens":18446744073709551615,"max_output_tokens":18446744073709551616}"#,
        r#"{}"#,
        r#"{"model":""}"#,
        r#"{"model":"m","x":{"a\"b\u0065":[1,{"c":"d"}],"":""},"x":"unknown keys may repeat"}"#,
        r#"{"model":"m","messages":[{"role":"user","content":"A longer prompt so that the eight-byte steps run a while: \"quotes\", \\backslashes\\, \u2028 and \t tabs land at every offset modulo eight, 0123456789abcdef."}]}"#,
        r#"{"model":"m","stream_options":{"include_usage":true,"include_usage":false}}"#,
        r#"{"metadata":{"model":"nested","stream":true,"model":"twice"},"model":"m","messages":[{"prompt":1,"input":null}]}"#,
    ];

    /// Valid bodies the scanner leaves to serde (some of which serde reads, some it refuses).
    const LEFT_TO_SERDE: &[&str] = &[
        r#"{"model":"m","messages":[{"role":"user","content":"emoji \ud83d\ude00 as a pair"}]}"#,
        r#"{"model":"m","x":"\udc00 alone"}"#,
        r#"{"mod\u0065l":"m"}"#,
        r#"{"model":"a","model":"b"}"#,
        r#"{"model":"m","stream":true,"stream":null}"#,
        "[1,2]",
        "\"m\"",
        "  ",
        "\u{c}{\"model\":\"m\"}",
    ];

    #[derive(Default)]
    struct Tally {
        read: usize,
        declined: usize,
    }

    /// The scanner either declines `body` or agrees with serde on every field's span; and
    /// `peek` says the same with or without it.
    fn check(body: &[u8], tally: &mut Tally) {
        match top_level_fields(body) {
            Some(fast) => {
                let serde = fields_by_serde(body).unwrap_or_else(|e| {
                    panic!("scanner read what serde refuses ({e}): {}", String::from_utf8_lossy(body))
                });
                assert_eq!(spans(body, &fast), spans(body, &serde), "{}", String::from_utf8_lossy(body));
                tally.read += 1;
            }
            None => tally.declined += 1,
        }
        assert_eq!(outcome(peek(body)), outcome(peek_by_serde(body)), "{}", String::from_utf8_lossy(body));
    }

    /// `body`, every prefix of it, and it with each byte deleted or replaced by a tricky one.
    fn check_with_damage(body: &[u8], tally: &mut Tally) {
        const TRICKY: &[u8] = b"\"\\}],:0-e. {[nu/\x01\x0c\xff";
        check(body, tally);
        let mut damaged = Vec::with_capacity(body.len());
        for at in 0..body.len() {
            check(&body[..at], tally);
            damaged.clear();
            damaged.extend_from_slice(body);
            damaged.remove(at);
            check(&damaged, tally);
            for &byte in TRICKY {
                damaged.clear();
                damaged.extend_from_slice(body);
                damaged[at] = byte;
                check(&damaged, tally);
            }
        }
    }

    /// `body` laid out again by serde, keys sorted, with CRLF and tabs for whitespace.
    fn reformatted(body: &str) -> String {
        let value: serde_json::Value = serde_json::from_str(body).unwrap();
        serde_json::to_string_pretty(&value).unwrap().replace('\n', "\r\n\t")
    }

    #[test]
    fn the_scanner_reads_realistic_bodies_itself() {
        for body in READ_BY_THE_SCANNER {
            assert!(fields(body).is_some(), "declined {body}");
            assert!(fields(&reformatted(body)).is_some(), "declined {}", reformatted(body));
        }
        for body in LEFT_TO_SERDE {
            assert!(fields(body).is_none(), "read {body}");
        }
    }

    #[test]
    fn the_scanner_agrees_with_serde_or_declines_on_damaged_bodies() {
        let mut tally = Tally::default();
        for body in READ_BY_THE_SCANNER.iter().chain(LEFT_TO_SERDE) {
            check_with_damage(body.as_bytes(), &mut tally);
        }
        for body in READ_BY_THE_SCANNER {
            // Whole and truncated only: the damage above already covers every byte kind.
            let body = reformatted(body);
            for end in 0..=body.len() {
                check(&body.as_bytes()[..end], &mut tally);
            }
        }
        // Both outcomes are common, so neither half of `check` passes vacuously.
        assert!(tally.read > 10_000 && tally.declined > 10_000, "read {}, declined {}", tally.read, tally.declined);
    }

    /// A key: mostly the known ones, so that they repeat and nest, and one with an escape.
    fn key() -> impl Strategy<Value = String> {
        proptest::sample::select(vec![
            "model",
            "stream",
            "messages",
            "prompt",
            "input",
            "priority",
            "stream_options",
            "max_tokens",
            "x",
            "mod\\u0065l",
        ])
        .prop_map(|key| format!("\"{key}\""))
    }

    /// JSON text of any shape, spaced one of a few ways.
    fn value() -> impl Strategy<Value = String> {
        let leaf = proptest::sample::select(vec![
            "null",
            "true",
            "false",
            "0",
            "-0",
            "1.5e-3",
            "12",
            "\"\"",
            "\"m\"",
            "\"a\\\"b\\n\"",
            "\"\\u00e9\"",
            "\"\\ud83d\\ude00\"",
            "\"\u{e9}\u{1f600}\"",
        ])
        .prop_map(String::from);
        leaf.prop_recursive(4, 32, 4, |inner| {
            let spacing = proptest::sample::select(vec![("", ""), (" ", "\n"), ("\t", "\r\n  ")]);
            prop_oneof![
                (proptest::collection::vec(inner.clone(), 0..4), spacing.clone())
                    .prop_map(|(items, (space, line))| format!("[{line}{}{space}]", items.join(&format!(",{line}")))),
                (proptest::collection::vec((key(), inner), 0..4), spacing).prop_map(|(members, (space, line))| {
                    let members: Vec<_> =
                        members.iter().map(|(key, value)| format!("{key}{space}:{space}{value}")).collect();
                    format!("{{{line}{}{space}}}", members.join(&format!(",{line}")))
                }),
            ]
        })
    }

    proptest! {
        /// Generated bodies, mostly valid, some with a byte damaged: the scanner never panics,
        /// and agrees with serde or declines.
        #[test]
        fn the_scanner_agrees_with_serde_or_declines_on_generated_bodies(
            members in proptest::collection::vec((key(), value()), 0..6),
            damage in (any::<proptest::sample::Index>(), proptest::sample::select(b"\"\\}],:0-e. \x01\xff".to_vec())),
        ) {
            let members: Vec<_> = members.iter().map(|(key, value)| format!("{key}:{value}")).collect();
            let body = format!("{{{}}}", members.join(","));
            check(body.as_bytes(), &mut Tally::default());
            let mut damaged = body.into_bytes();
            let at = damage.0.index(damaged.len());
            damaged[at] = damage.1;
            check(&damaged, &mut Tally::default());
        }
    }
}
