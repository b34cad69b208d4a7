//! What the fuzz targets check: one function per target, taking the fuzzer's bytes and
//! panicking where nimgate breaks a promise its docs make (a panic of its own counts too). The
//! libFuzzer targets (`fuzz_targets/`) and the `fuzz_regressions` test of `tests/` include this
//! one file, so an input kept under `fuzz/regressions/<target>/` is replayed by `cargo test`
//! exactly as the fuzzer ran it. Plain Rust over nimgate's public API, `bytes` and `serde_json`.

use std::collections::HashMap;
use std::path::Path;

use bytes::Bytes;
use nimgate::config::raw::RawConfig;
use nimgate::config::{self, EnvSource};
use nimgate::glob::ModelPattern;
use nimgate::request::{self, Edit, StreamOptions};
use nimgate::routing::UpstreamModel;
use nimgate::streaming::usage::{ContentCounter, Usage, UsageEventStripper, UsageScanner};
use serde_json::Value;

/// `request::peek` on any body: no panic; when it accepts one, it agrees with a full parse,
/// its spans hold what they claim, the token estimate adds up, and the splices `outgoing`
/// makes (usage requested, a route alias) leave a body that peeks to what was asked for.
pub fn head_peek(data: &[u8]) {
    let Ok(head) = request::peek(data) else { return };
    assert!(!head.model.is_empty(), "peek accepted an empty model");
    let spanned = data.get(head.model_span.clone()).expect("model_span lies outside the body");
    let spanned: String = serde_json::from_slice(spanned).expect("model_span does not hold a JSON string");
    assert_eq!(spanned, head.model, "model_span holds another string than the model");

    // serde_json checks less of a value it skips than of one it builds (escapes in strings), so
    // a body peek accepts may still fail a full parse: then there is nothing to compare with.
    let full: Option<Value> = serde_json::from_slice(data).ok();
    if let Some(full) = &full {
        assert_eq!(full["model"].as_str(), Some(&*head.model), "model differs from a full parse");
        assert_eq!(full["stream"].as_bool().unwrap_or(false), head.stream, "stream differs from a full parse");
        let cap = full["max_completion_tokens"].as_u64().or(full["max_tokens"].as_u64());
        assert_eq!(cap, head.max_tokens, "the token cap differs from a full parse");
        match (&head.stream_options, full.get("stream_options")) {
            (StreamOptions::Absent, None) | (StreamOptions::Null(_), Some(Value::Null)) => {}
            (StreamOptions::Object { include_usage, .. }, Some(options @ Value::Object(_))) => {
                assert_eq!(*include_usage, options["include_usage"].as_bool().unwrap_or(false));
            }
            (ours, theirs) => panic!("stream_options read as {ours:?}, a full parse has {theirs:?}"),
        }
    }
    if let StreamOptions::Null(span) | StreamOptions::Object { span, .. } = &head.stream_options {
        let spanned = data.get(span.clone()).expect("the stream_options span lies outside the body");
        // Read as peek reads it: raw, since a full parse also refuses numbers beyond f64.
        let raw = serde_json::from_slice::<&serde_json::value::RawValue>(spanned);
        assert!(raw.is_ok(), "the stream_options span is no JSON value");
    }

    // The handler admits with `total()`, which must not wrap: `max_tokens` is the client's
    // number. Saturating is what a reservation can honestly be. The defaults are configurable.
    for (completes, default_max_tokens) in [(true, 1), (true, 512), (false, 512)] {
        let estimate = head.token_estimate(data.len(), completes, default_max_tokens);
        assert_eq!(estimate.prompt, (data.len() as u64 / 4).max(1));
        let completion = if completes { head.max_tokens.unwrap_or(default_max_tokens) } else { 0 };
        assert_eq!(estimate.completion, completion);
        assert_eq!(estimate.total(), estimate.prompt.saturating_add(estimate.completion), "{estimate:?}");
    }

    let body = Bytes::copy_from_slice(data);
    assert_eq!(request::splice(&body, &mut []), body, "no edits must give the body back");
    let usage = request::request_usage(data, &head.stream_options);
    let asked = request::splice(&body, &mut [usage.clone()]);
    let again = request::peek(&asked).unwrap_or_else(|e| panic!("with usage requested the body fails to peek: {e}"));
    assert!(again.wants_usage(), "the usage edit did not ask for usage");
    assert_eq!((&again.model, again.stream, again.max_tokens), (&head.model, head.stream, head.max_tokens));
    if let Some(mut expected) = full {
        // `stream_options` keeps its other options, and nothing else changes.
        let got: Value = serde_json::from_slice(&asked).expect("with usage requested the body is no longer JSON");
        let mut options = match expected.get("stream_options") {
            Some(Value::Object(options)) => options.clone(),
            _ => serde_json::Map::new(),
        };
        options.insert("include_usage".into(), Value::Bool(true));
        assert_eq!(got["stream_options"], Value::Object(options), "the usage edit changed the other stream options");
        expected["stream_options"] = got["stream_options"].clone();
        assert_eq!(got, expected, "the usage edit changed more than stream_options");
    }

    // A route alias with characters that need escaping, spliced with the usage edit as
    // `request::outgoing` does.
    let alias = UpstreamModel::new("fuzz/\"alias\"\\é");
    let alias_edit = Edit { span: head.model_span.clone(), bytes: alias.json.clone() };
    let aliased = request::splice(&body, &mut [alias_edit, usage]);
    let again = request::peek(&aliased).unwrap_or_else(|e| panic!("the aliased body fails to peek: {e}"));
    assert_eq!(again.model, alias.name, "the alias splice did not set the model");
    assert!(again.wants_usage(), "the usage edit beside an alias did not ask for usage");
}

/// The scanners bound what they hold across frames (`UsageScanner` drops a usage object longer
/// than its `MAX_CARRY`; from main's f9a5303 on, both hold 4 KiB at most), so past that the
/// frame boundaries may decide, as documented. The fuzzers' inputs (4 KiB by default) stay
/// within it.
const HELD_AT_MOST: usize = 4 * 1024;

/// The SSE scanners on any stream: no panic, and the same result whatever the frame boundaries
/// (`streaming::usage` promises it: an object or event cut by a frame boundary is carried over).
/// The first byte says how many cut points follow (two bytes each, little-endian, taken modulo
/// the stream's length plus one; repeated points make empty frames); the rest is the stream.
pub fn sse_scanners(data: &[u8]) {
    let (cuts, stream) = cut_points(data);
    let whole = feed(&[Bytes::copy_from_slice(stream)]);
    let mut bounds = cuts;
    bounds.push(0);
    bounds.push(stream.len());
    bounds.sort_unstable();
    let frames: Vec<Bytes> = bounds.windows(2).map(|w| Bytes::copy_from_slice(&stream[w[0]..w[1]])).collect();
    let framed = feed(&frames);

    assert_eq!(framed.events, whole.events, "ContentCounter: frame boundaries changed the count");
    assert_eq!(whole.events, content_events(stream), "ContentCounter: differs from each marker counted alone");
    if stream.len() <= HELD_AT_MOST {
        assert_eq!(framed.usage, whole.usage, "UsageScanner: frame boundaries changed the usage found");
        assert!(
            framed.forwarded == whole.forwarded,
            "UsageEventStripper: frame boundaries changed what is forwarded\n whole: {:?}\nframed: {:?}",
            String::from_utf8_lossy(&whole.forwarded),
            String::from_utf8_lossy(&framed.forwarded),
        );
    }
    // The stripper removes one event at most: the stream less one contiguous range.
    let kept = &whole.forwarded;
    let common = stream.iter().zip(kept).take_while(|(a, b)| a == b).count();
    assert!(kept.len() <= stream.len() && stream.ends_with(&kept[common..]), "UsageEventStripper: more than one cut");
}

fn cut_points(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&count, rest)) = data.split_first() else { return (Vec::new(), data) };
    let count = usize::from(count % 16).min(rest.len() / 2);
    let (points, stream) = rest.split_at(2 * count);
    let cuts = points.chunks_exact(2).map(|p| usize::from(u16::from_le_bytes([p[0], p[1]])) % (stream.len() + 1));
    (cuts.collect(), stream)
}

/// What the three scanners make of one stream, fed frame by frame as `streaming::meter` does.
struct Fed {
    usage: Option<Usage>,
    events: u64,
    forwarded: Vec<u8>,
}

fn feed(frames: &[Bytes]) -> Fed {
    let mut scanner = UsageScanner::default();
    let mut counter = ContentCounter::default();
    let mut stripper = UsageEventStripper::default();
    let mut forwarded = Vec::new();
    for frame in frames {
        scanner.feed(frame);
        counter.feed(frame);
        forwarded.extend_from_slice(&stripper.process(frame.clone()));
    }
    forwarded.extend_from_slice(&stripper.finish());
    Fed { usage: scanner.usage(), events: counter.events(), forwarded }
}

/// The slow count `ContentCounter` is tested against in its own module: every place a content
/// marker starts and is followed by a byte other than `"`.
fn content_events(stream: &[u8]) -> u64 {
    let markers: [&[u8]; 3] = [b"\"content\":\"", b"\"text\":\"", b"\"arguments\":\""];
    let text_after = |at: usize, marker: &[u8]| {
        stream[at..].starts_with(marker) && stream.get(at + marker.len()).is_some_and(|&b| b != b'"')
    };
    markers.iter().map(|m| (0..stream.len()).filter(|&at| text_after(at, m)).count() as u64).sum()
}

/// A model pattern and a model name, the input's UTF-8 text split at its first newline: no
/// panic; a text without metacharacters is exact; every match begins with the literal prefix;
/// and a pattern of literals, `*` and `?` matches as the obvious matcher does.
pub fn globs(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let (pattern, model) = text.split_once('\n').unwrap_or((text, ""));
    let metas = ['*', '?', '[', ']', '{', '}', '\\'];
    let Ok(compiled) = ModelPattern::parse(pattern) else {
        assert!(pattern.is_empty() || pattern.contains(metas), "a plain name was refused: {pattern:?}");
        return;
    };
    assert_eq!(compiled.as_str(), pattern);
    let matched = compiled.matches(model);
    if !pattern.contains(metas) {
        assert_eq!(matched, model == pattern, "a plain name matches only itself");
    }
    let prefix = pattern.get(..compiled.literal_prefix()).expect("literal_prefix is not a prefix of the pattern");
    assert!(!prefix.contains(metas), "the literal prefix {prefix:?} holds a metacharacter");
    assert!(!matched || model.starts_with(prefix), "{model:?} matched without the literal prefix {prefix:?}");
    if !pattern.contains(['[', ']', '{', '}', '\\']) {
        let expected = star_glob_matches(pattern.as_bytes(), model.as_bytes());
        assert_eq!(matched, expected, "{pattern:?} ~ {model:?}");
    }
}

/// `*` any run of bytes (`/` included), `?` any one byte, anything else itself; by dynamic
/// programming, so that a pattern of many stars stays linear per byte. Bytes, not characters:
/// globset matches `?` against one byte (its regex runs without Unicode).
fn star_glob_matches(pattern: &[u8], model: &[u8]) -> bool {
    // matched[j]: the pattern so far matches model[..j].
    let mut matched = vec![false; model.len() + 1];
    matched[0] = true;
    for &p in pattern {
        let mut next = vec![false; model.len() + 1];
        for j in 0..=model.len() {
            next[j] = match p {
                b'*' => matched[j] || (j > 0 && next[j - 1]),
                b'?' => j > 0 && matched[j - 1],
                literal => j > 0 && matched[j - 1] && model[j - 1] == literal,
            };
        }
        matched = next;
    }
    matched[model.len()]
}

/// A configuration in YAML, TOML (first byte `t`) or JSON (`j`), the rest UTF-8 text: loaded
/// and validated with an empty environment, never a panic. Validation reads the TLS and CA
/// files a config names; configs naming anything but plain files are not validated.
pub fn config_parse(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let name = match selector {
        b't' => "fuzz.toml",
        b'j' => "fuzz.json",
        _ => "fuzz.yaml",
    };
    let env = EnvSource::Map(HashMap::new());
    let Ok(raw) = config::load_str(text, config::format_of(Path::new(name)), &env) else { return };
    if reads_only_plain_files(&raw) {
        let _ = config::validate(&raw, &env);
    }
}

/// Whether every file `raw` names is missing or a plain file outside /dev, /proc and /sys:
/// /dev/zero never ends and /proc/kmsg blocks, which would be the fuzzer's hang, not nimgate's.
fn reads_only_plain_files(raw: &RawConfig) -> bool {
    let tls = raw.server.tls.iter().flat_map(|t| [&t.cert, &t.key]);
    let ca = raw.backends.iter().filter_map(|b| b.ca_file.as_ref());
    tls.chain(ca).all(|file| match std::fs::canonicalize(file) {
        Err(_) => true,
        Ok(real) => !["/dev", "/proc", "/sys"].iter().any(|p| real.starts_with(p)) && real.is_file(),
    })
}
