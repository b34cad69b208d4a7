//! The client's request as the gateway takes it in: its id (`x-request-id`), its body read
//! once under the size cap (refusing an oversized body by its `Content-Length` before reading
//! a byte of it), then peeked for the few fields the gateway acts on without building a JSON
//! tree. The same bytes are what goes upstream, changed only by splices at known offsets (a
//! route's model alias, the stream usage nimgate asks for on the client's behalf).

mod budget;
mod scan;

use std::borrow::Cow;
use std::collections::HashMap;
use std::ops::Range;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::api::Endpoint;
use crate::error::GatewayError;
use crate::routing::Route;
use crate::upstream::UpstreamBody;
use crate::upstream::headers::X_REQUEST_ID;
pub use budget::{BodyBudget, BodyLease};
use scan::RawFields;

/// The longest client-chosen request id nimgate keeps; longer or odd ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// The client's `x-request-id` when it is sane (visible ASCII, at most 128 bytes), otherwise
/// a new random one.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&X_REQUEST_ID) {
        Some(id)
            if !id.is_empty() && id.len() <= MAX_REQUEST_ID_LEN && id.as_bytes().iter().all(u8::is_ascii_graphic) =>
        {
            id.clone()
        }
        _ => {
            let mut buffer = uuid::Uuid::encode_buffer();
            let id = uuid::Uuid::new_v4().simple().encode_lower(&mut buffer);
            HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("unknown"))
        }
    }
}

/// A client gets this long to send its whole body once the headers are in.
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads `body` whole, refusing it with 413 once it exceeds `max_bytes`: at once when the
/// `Content-Length` in `headers` is over, or as soon as the bytes received are, without reading
/// the rest into memory. Every byte is read into room taken first from the gateway's body
/// budget (`lease`, kept by the caller while it needs the bytes).
pub async fn read_capped(
    body: Incoming,
    headers: &HeaderMap,
    max_bytes: u64,
    lease: &mut BodyLease,
) -> Result<Bytes, GatewayError> {
    let content_length = headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok());
    if content_length.is_some_and(|declared| declared > max_bytes) {
        return Err(GatewayError::RequestTooLarge { limit: max_bytes });
    }
    match tokio::time::timeout(BODY_READ_TIMEOUT, collect(body, content_length, max_bytes, lease)).await {
        Ok(result) => result,
        Err(_) => Err(GatewayError::RequestTimeout(BODY_READ_TIMEOUT)),
    }
}

async fn collect(
    mut body: Incoming,
    content_length: Option<u64>,
    max_bytes: u64,
    lease: &mut BodyLease,
) -> Result<Bytes, GatewayError> {
    // Room is taken for bytes received, not for a declared length: a client that only
    // declares 10 MiB must not hold 10 MiB of everyone's budget.
    // The common case is one frame: keep it as is, no copy.
    let mut first: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| GatewayError::InvalidRequest(format!("could not read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else { continue };
        total = total.saturating_add(data.len() as u64);
        if total > max_bytes {
            return Err(GatewayError::RequestTooLarge { limit: max_bytes });
        }
        if total > lease.bytes() {
            lease.grow(total - lease.bytes()).await?;
        }
        match (&mut first, &mut joined) {
            (None, None) => first = Some(data),
            (Some(head), None) => {
                let capacity = content_length.unwrap_or(2 * total).min(max_bytes) as usize;
                let mut buffer = BytesMut::with_capacity(capacity.max(total as usize));
                buffer.extend_from_slice(head);
                buffer.extend_from_slice(&data);
                first = None;
                joined = Some(buffer);
            }
            (_, Some(buffer)) => buffer.extend_from_slice(&data),
        }
    }
    Ok(match (first, joined) {
        (_, Some(buffer)) => buffer.freeze(),
        (Some(only), None) => only,
        (None, None) => Bytes::new(),
    })
}

/// One change to a request body: the bytes at `span` replaced (an empty span inserts).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Edit {
    pub span: Range<usize>,
    pub bytes: Bytes,
}

/// `body` with `edits` applied (non-overlapping, in any order), without re-serialising.
pub fn splice(body: &Bytes, edits: &mut [Edit]) -> Bytes {
    if edits.is_empty() {
        return body.clone();
    }
    edits.sort_by_key(|e| e.span.start);
    let added: usize = edits.iter().map(|e| e.bytes.len()).sum();
    let removed: usize = edits.iter().map(|e| e.span.len()).sum();
    let mut out = BytesMut::with_capacity(body.len() + added - removed);
    let mut at = 0;
    for edit in edits.iter() {
        out.extend_from_slice(&body[at..edit.span.start]);
        out.extend_from_slice(&edit.bytes);
        at = edit.span.end;
    }
    out.extend_from_slice(&body[at..]);
    out.freeze()
}

/// The edit that makes a streaming request ask for the final usage chunk: `stream_options`
/// added (right after the opening brace), or set to include usage, keeping its other options.
pub fn request_usage(body: &[u8], options: &StreamOptions) -> Edit {
    const ADDED: &[u8] = br#""stream_options":{"include_usage":true},"#;
    match options {
        StreamOptions::Absent => {
            // `peek` checked that the body is an object, so its first non-blank byte is `{`.
            let open = body.iter().position(|b| *b == b'{').map_or(0, |i| i + 1);
            Edit { span: open..open, bytes: Bytes::from_static(ADDED) }
        }
        StreamOptions::Null(span) => {
            Edit { span: span.clone(), bytes: Bytes::from_static(br#"{"include_usage":true}"#) }
        }
        // The client's object edited in place, every other byte of it untouched: its
        // `include_usage` value replaced (the last one, which parsers keep), or the key added.
        StreamOptions::Object { span, .. } => {
            let Ok(fields) = serde_json::from_slice::<HashMap<Cow<'_, str>, &RawValue>>(&body[span.clone()]) else {
                // Not readable as an object here: left as the client wrote it.
                return Edit { span: span.start..span.start, bytes: Bytes::new() };
            };
            match fields.get("include_usage") {
                Some(value) => {
                    // The raw value lies inside `body`: its offset is where it points.
                    let at = value.get().as_ptr() as usize - body.as_ptr() as usize;
                    Edit { span: at..at + value.get().len(), bytes: Bytes::from_static(b"true") }
                }
                None if fields.is_empty() => {
                    Edit { span: span.start + 1..span.end - 1, bytes: Bytes::from_static(br#""include_usage":true"#) }
                }
                None => Edit {
                    span: span.start + 1..span.start + 1,
                    bytes: Bytes::from_static(br#""include_usage":true,"#),
                },
            }
        }
    }
}

/// What goes upstream for `head` on `route`: the body as the client sent it (the route's
/// alias spliced in), and for a stream whose client did not ask for its usage a variant that
/// does, for the backends that take `stream_options` (streams are counted, and token-limited
/// ones settled, from their usage chunk, which is then kept from the client).
///
/// On a route with `pass_priority`, `priority` (the key's, as JSON) replaces the body's own
/// `priority` or is added.
pub fn outgoing(
    route: &Route,
    endpoint: Endpoint,
    head: &RequestHead<'_>,
    body: &Bytes,
    priority: &Bytes,
) -> UpstreamBody {
    let alias =
        route.upstream_model.as_ref().map(|alias| Edit { span: head.model_span.clone(), bytes: alias.json.clone() });
    let priority = route.pass_priority.then(|| match &head.priority_span {
        Some(span) => Edit { span: span.clone(), bytes: priority.clone() },
        None => {
            // `peek` checked that the body is an object, so its first non-blank byte is `{`.
            let open = body.iter().position(|b| *b == b'{').map_or(0, |i| i + 1);
            let mut field = BytesMut::with_capacity(priority.len() + 12);
            field.extend_from_slice(b"\"priority\":");
            field.extend_from_slice(priority);
            field.extend_from_slice(b",");
            Edit { span: open..open, bytes: field.freeze() }
        }
    });
    // At most three edits: kept on the stack.
    let mut edits: [Edit; 3] = Default::default();
    let mut count = 0;
    for edit in alias.into_iter().chain(priority) {
        edits[count] = edit;
        count += 1;
    }
    let plain = splice(body, &mut edits[..count]);
    let asks_for_usage = head.stream && !head.wants_usage() && endpoint.usage_needs_stream_options();
    let with_usage = asks_for_usage.then(|| {
        edits[count] = request_usage(body, &head.stream_options);
        splice(body, &mut edits[..=count])
    });
    UpstreamBody { plain, with_usage }
}

/// The request fields the gateway acts on, borrowed from the body.
#[derive(Debug)]
pub struct RequestHead<'a> {
    pub model: Cow<'a, str>,
    /// Byte range of the `model` value (with its quotes) in the body, for alias rewrites.
    pub model_span: Range<usize>,
    pub stream: bool,
    /// `max_completion_tokens`, else `max_tokens`, else (Responses API) `max_output_tokens`.
    pub max_tokens: Option<u64>,
    pub stream_options: StreamOptions,
    /// Byte range of the prompt as sent (`messages`, else `prompt`, else `input`), for prefix
    /// affinity.
    pub prompt_span: Option<Range<usize>>,
    /// Byte range of the `priority` value, replaced on routes that pass the key's.
    pub priority_span: Option<Range<usize>>,
}

/// The request's `stream_options`, located so that it can be amended in place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamOptions {
    Absent,
    /// `null`, at this span.
    Null(Range<usize>),
    /// An object at this span; whether it asks for `include_usage`.
    Object {
        span: Range<usize>,
        include_usage: bool,
    },
}

impl RequestHead<'_> {
    /// Whether the client asked for the final usage chunk of a stream.
    pub fn wants_usage(&self) -> bool {
        matches!(self.stream_options, StreamOptions::Object { include_usage: true, .. })
    }

    /// Tokens to reserve at admission: the body's bytes / 4 for the prompt (JSON syntax
    /// included, so a little high), plus the completion cap, or `default_max_tokens` when the
    /// request sets none. Embeddings have no completion.
    pub fn token_estimate(&self, body_len: usize, completes: bool, default_max_tokens: u64) -> TokenEstimate {
        let prompt = (body_len as u64 / 4).max(1);
        let completion = if completes { self.max_tokens.unwrap_or(default_max_tokens) } else { 0 };
        TokenEstimate { prompt, completion }
    }
}

/// A request's expected token use, before any answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenEstimate {
    pub prompt: u64,
    pub completion: u64,
}

impl TokenEstimate {
    /// Saturating: `max_tokens` is the client's number and may be near `u64::MAX`.
    pub fn total(&self) -> u64 {
        self.prompt.saturating_add(self.completion)
    }
}

/// What serde reads: each field as raw JSON so that a wrong type gets a message naming the
/// field, and every other field skipped without being built. `scan` reads the same fields
/// without serde (and is tested against this): a field added here is added there too.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<&'a RawValue>,
    #[serde(borrow, default)]
    stream: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    stream_options: Option<&'a RawValue>,
    // The prompt, by endpoint: borrowed as raw bytes, never built into a tree.
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    priority: Option<&'a RawValue>,
}

/// A field that is present, `null` included: `Option` alone would read `null` as absent, and
/// `"stream_options": null` must be replaced, not left beside an added one.
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

#[derive(Deserialize)]
struct StreamOptionsFields {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// Finds `model` and `stream` in a JSON request body.
pub fn peek(body: &[u8]) -> Result<RequestHead<'_>, GatewayError> {
    // Nearly every body is plain enough for the scanner; it declines the rest, which serde
    // reads (and words the errors of) as before.
    let fields = match scan::top_level_fields(body) {
        Some(fields) => fields,
        None => fields_by_serde(body)?,
    };
    head_of(body, fields)
}

/// `peek` without its fast path: the reference the scanner is tested against.
#[cfg(test)]
fn peek_by_serde(body: &[u8]) -> Result<RequestHead<'_>, GatewayError> {
    head_of(body, fields_by_serde(body)?)
}

/// The fields as serde reads them, with the messages clients get for bodies it cannot read.
fn fields_by_serde(body: &[u8]) -> Result<RawFields<'_>, GatewayError> {
    // serde would also read a struct from a JSON array, positionally; a request is an object.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => {
            return Err(GatewayError::InvalidRequest(
                "request body is empty: send a JSON object with a `model`".into(),
            ));
        }
        Some(b'{') => {}
        Some(_) if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() => {
            return Err(GatewayError::InvalidRequest("request body must be a JSON object".into()));
        }
        Some(_) => {}
    }
    let fields: Fields<'_> = serde_json::from_slice(body).map_err(|e| {
        GatewayError::InvalidRequest(match e.classify() {
            serde_json::error::Category::Data if e.to_string().starts_with("duplicate field") => {
                format!("request body has a {}", strip_position(&e))
            }
            serde_json::error::Category::Data => "request body must be a JSON object".to_owned(),
            _ => format!("request body is not valid JSON: {e}"),
        })
    })?;
    Ok(RawFields {
        model: fields.model.map(RawValue::get),
        stream: fields.stream.map(RawValue::get),
        max_tokens: fields.max_tokens.map(RawValue::get),
        max_completion_tokens: fields.max_completion_tokens.map(RawValue::get),
        max_output_tokens: fields.max_output_tokens.map(RawValue::get),
        stream_options: fields.stream_options.map(RawValue::get),
        messages: fields.messages.map(RawValue::get),
        prompt: fields.prompt.map(RawValue::get),
        input: fields.input.map(RawValue::get),
        priority: fields.priority.map(RawValue::get),
    })
}

/// The request head from the raw fields of `body`, whichever path read them.
fn head_of<'a>(body: &'a [u8], fields: RawFields<'a>) -> Result<RequestHead<'a>, GatewayError> {
    // A `null` arrives as `None` in every field but `stream_options` and `priority` (both
    // paths read it so; `a_null_reads_as_serde_reads_it_in_every_field` holds them to it).
    let raw_model = fields.model.ok_or_else(|| GatewayError::InvalidRequest("`model` is required".into()))?;
    let model =
        json_string(raw_model).ok_or_else(|| GatewayError::InvalidRequest("`model` must be a string".into()))?;
    if model.is_empty() {
        return Err(GatewayError::InvalidRequest("`model` must not be empty".into()));
    }
    let stream = match fields.stream {
        None => false,
        Some(raw) => match raw {
            "true" => true,
            "false" => false,
            _ => return Err(GatewayError::InvalidRequest("`stream` must be a boolean".into())),
        },
    };
    let mut max_tokens = None;
    for (name, raw) in [
        ("max_completion_tokens", fields.max_completion_tokens),
        ("max_tokens", fields.max_tokens),
        ("max_output_tokens", fields.max_output_tokens),
    ] {
        match raw {
            None => {}
            Some(text) => {
                let value = text
                    .parse::<u64>()
                    .map_err(|_| GatewayError::InvalidRequest(format!("`{name}` must be a non-negative integer")))?;
                max_tokens = max_tokens.or(Some(value));
            }
        }
    }
    let stream_options = match fields.stream_options {
        None => StreamOptions::Absent,
        Some(raw) if raw == "null" => StreamOptions::Null(span_of(body, raw)),
        Some(raw) => {
            let object = raw.starts_with('{').then(|| serde_json::from_str::<StreamOptionsFields>(raw));
            let options = object.and_then(Result::ok).ok_or_else(|| {
                GatewayError::InvalidRequest("`stream_options` must be an object like {\"include_usage\": true}".into())
            })?;
            StreamOptions::Object { span: span_of(body, raw), include_usage: options.include_usage.unwrap_or(false) }
        }
    };
    let prompt_span = fields.messages.or(fields.prompt).or(fields.input).map(|raw| span_of(body, raw));
    Ok(RequestHead {
        model,
        model_span: span_of(body, raw_model),
        stream,
        max_tokens,
        stream_options,
        prompt_span,
        priority_span: fields.priority.map(|raw| span_of(body, raw)),
    })
}

/// The value of a raw JSON string, borrowed unless it has escapes; `None` if not a string.
fn json_string(raw: &str) -> Option<Cow<'_, str>> {
    let inner = raw.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
    } else {
        // `raw` is valid JSON (serde checked it), so without escapes the text is the value.
        Some(Cow::Borrowed(inner))
    }
}

/// Where `part`, a slice borrowed from `whole`, sits in it.
fn span_of(whole: &[u8], part: &str) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

fn strip_position(e: &serde_json::Error) -> String {
    let text = e.to_string();
    match text.find(" at line ") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_max_tokens_near_the_top_of_u64_saturates_the_estimate_instead_of_wrapping() {
        let body = format!(r#"{{"model":"m","max_tokens":{}}}"#, u64::MAX - 1);
        let estimate = peek(body.as_bytes()).unwrap().token_estimate(1 << 20, true, 512);
        assert_eq!(estimate.total(), u64::MAX);
    }

    fn message(body: &str) -> String {
        peek(body.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn the_responses_apis_output_cap_counts_in_the_estimate() {
        let body = r#"{"model":"m","input":[{"role":"user","content":"hi"}],"max_output_tokens":300}"#;
        let head = peek(body.as_bytes()).unwrap();
        assert_eq!(head.max_tokens, Some(300));
        assert_eq!(head.token_estimate(body.len(), true, 512).completion, 300);
        assert!(
            peek(br#"{"model":"m","max_output_tokens":-1}"#).unwrap_err().to_string().contains("max_output_tokens")
        );
    }

    #[test]
    fn finds_the_prompt_of_each_endpoint_as_sent() {
        let chat = r#"{"model":"m","messages": [{"role":"user","content":"hi"}] ,"n":1}"#;
        let head = peek(chat.as_bytes()).unwrap();
        assert_eq!(&chat[head.prompt_span.unwrap()], r#"[{"role":"user","content":"hi"}]"#);
        let completion = r#"{"prompt":"Once upon","model":"m"}"#;
        assert_eq!(&completion[peek(completion.as_bytes()).unwrap().prompt_span.unwrap()], "\"Once upon\"");
        let embedding = r#"{"model":"m","input":["a","b"]}"#;
        assert_eq!(&embedding[peek(embedding.as_bytes()).unwrap().prompt_span.unwrap()], r#"["a","b"]"#);
        assert_eq!(peek(br#"{"model":"m"}"#).unwrap().prompt_span, None);
    }

    #[test]
    fn finds_model_and_stream_and_the_model_span() {
        let body = r#"{"messages":[{"role":"user","content":"hi"}],"model":"meta/llama","stream":true}"#;
        let head = peek(body.as_bytes()).unwrap();
        assert_eq!(head.model, "meta/llama");
        assert!(head.stream);
        assert_eq!(&body[head.model_span], "\"meta/llama\"");
        assert!(matches!(head.model, Cow::Borrowed(_)));
    }

    #[test]
    fn escaped_model_names_are_decoded() {
        let body = r#"{"model":"meta\/llama\u002d3"}"#;
        let head = peek(body.as_bytes()).unwrap();
        assert_eq!(head.model, "meta/llama-3");
        assert_eq!(&body[head.model_span], r#""meta\/llama\u002d3""#);
    }

    #[test]
    fn stream_defaults_to_false_and_accepts_null() {
        assert!(!peek(br#"{"model":"m"}"#).unwrap().stream);
        assert!(!peek(br#"{"model":"m","stream":null}"#).unwrap().stream);
    }

    #[test]
    fn bad_bodies_get_messages_that_say_what_is_wrong() {
        assert!(message("").contains("empty"));
        assert!(message("{\"model\":").contains("not valid JSON"));
        assert!(message("[1,2]").contains("must be a JSON object"));
        assert!(message("{}").contains("`model` is required"));
        assert!(message(r#"{"model":null}"#).contains("`model` is required"));
        assert!(message(r#"{"model":42}"#).contains("`model` must be a string"));
        assert!(message(r#"{"model":""}"#).contains("must not be empty"));
        assert!(message(r#"{"model":"m","stream":"yes"}"#).contains("`stream` must be a boolean"));
        assert!(message(r#"{"model":"a","model":"b"}"#).contains("duplicate field `model`"));
        assert!(message("{\"model\":\"m\"} trailing").contains("not valid JSON"));
    }

    #[test]
    fn finds_token_caps_and_stream_options() {
        let body =
            r#"{"model":"m","max_tokens":100,"max_completion_tokens":50,"stream_options":{"include_usage":true}}"#;
        let head = peek(body.as_bytes()).unwrap();
        assert_eq!(head.max_tokens, Some(50), "max_completion_tokens wins");
        assert!(head.wants_usage());
        let StreamOptions::Object { span, .. } = &head.stream_options else { panic!() };
        assert_eq!(&body[span.clone()], r#"{"include_usage":true}"#);

        let head = peek(br#"{"model":"m","max_tokens":null,"stream_options":null}"#).unwrap();
        assert_eq!(head.max_tokens, None);
        assert!(matches!(head.stream_options, StreamOptions::Null(_)));
        assert!(!head.wants_usage());
        assert!(message(r#"{"model":"m","max_tokens":-1}"#).contains("`max_tokens` must be a non-negative integer"));
        assert!(message(r#"{"model":"m","stream_options":[]}"#).contains("`stream_options` must be an object"));
    }

    #[test]
    fn the_token_estimate_is_prompt_bytes_over_four_plus_the_cap() {
        let body = format!(r#"{{"model":"m","max_tokens":30,"messages":[{{"content":"{}"}}]}}"#, "x".repeat(370));
        let head = peek(body.as_bytes()).unwrap();
        let estimate = head.token_estimate(body.len(), true, 512);
        assert_eq!(estimate, TokenEstimate { prompt: body.len() as u64 / 4, completion: 30 });
        let head = peek(br#"{"model":"m"}"#).unwrap();
        assert_eq!(head.token_estimate(13, true, 512).completion, 512);
        assert_eq!(head.token_estimate(13, false, 512), TokenEstimate { prompt: 3, completion: 0 });
    }

    #[test]
    fn agrees_with_a_full_parse_on_assorted_bodies() {
        let bodies = [
            r#"{"model":"a/b","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA"}}]}]}"#,
            r#"{"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],"model":"x","stream":false}"#,
            r#"  {"model" : "spaced" , "stream" : true }  "#,
        ];
        for body in bodies {
            let head = peek(body.as_bytes()).unwrap();
            let full: serde_json::Value = serde_json::from_str(body).unwrap();
            assert_eq!(full["model"].as_str().unwrap(), head.model);
            assert_eq!(full["stream"].as_bool().unwrap_or(false), head.stream);
        }
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    #[test]
    fn request_ids_are_kept_when_sane_and_generated_otherwise() {
        assert_eq!(request_id(&map(&[("x-request-id", "abc-123")])), "abc-123");
        let generated = request_id(&map(&[("x-request-id", &"x".repeat(200))]));
        assert_eq!(generated.len(), 32);
        let fresh = request_id(&HeaderMap::new());
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, request_id(&HeaderMap::new()));
    }

    #[test]
    fn splice_replaces_exactly_the_spans() {
        let body = Bytes::from_static(br#"{"model":"alias","x":1}"#);
        let mut edits = [
            Edit { span: 21..22, bytes: Bytes::from_static(b"2") },
            Edit { span: 9..16, bytes: Bytes::from_static(br#""meta/llama-3.1-8b-instruct""#) },
            Edit { span: 1..1, bytes: Bytes::from_static(br#""a":0,"#) },
        ];
        let out = splice(&body, &mut edits);
        assert_eq!(&out[..], br#"{"a":0,"model":"meta/llama-3.1-8b-instruct","x":2}"#);
    }

    fn with_usage(body: &str) -> String {
        let head = peek(body.as_bytes()).unwrap();
        let bytes = Bytes::copy_from_slice(body.as_bytes());
        let out = splice(&bytes, &mut [request_usage(body.as_bytes(), &head.stream_options)]);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn usage_is_requested_whatever_stream_options_held() {
        assert_eq!(
            with_usage(r#" {"model":"m","stream":true}"#),
            r#" {"stream_options":{"include_usage":true},"model":"m","stream":true}"#
        );
        assert_eq!(
            with_usage(r#"{"model":"m","stream_options":null}"#),
            r#"{"model":"m","stream_options":{"include_usage":true}}"#
        );
        let kept =
            with_usage(r#"{"model":"m","stream_options":{"continuous_usage_stats":true,"include_usage":false}}"#);
        let value: serde_json::Value = serde_json::from_str(&kept).unwrap();
        assert_eq!(value["stream_options"], serde_json::json!({"continuous_usage_stats":true,"include_usage":true}));
        assert_eq!(peek(kept.as_bytes()).unwrap().model, "m");
    }
}
