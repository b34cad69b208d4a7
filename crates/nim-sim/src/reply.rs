//! What the sim answers: the request fields it reads, and the JSON and SSE it writes, in the
//! shapes NIM (vLLM underneath) uses. Text is a fixed word cycle and every number comes from the
//! request or a counter, so answers are reproducible. Streams are rendered event by event from a
//! prefix built once per request.

use std::borrow::Cow;
use std::fmt::Write;

use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::body::Script;
use crate::responses;
use crate::state::CREATED;

/// The fields of an inference request the sim acts on; the rest is skipped unread.
#[derive(Deserialize)]
pub struct InferRequest<'a> {
    #[serde(borrow, default)]
    pub model: Option<Cow<'a, str>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub max_completion_tokens: Option<u32>,
    #[serde(default)]
    pub tools: Option<Vec<Tool>>,
    #[serde(default)]
    pub tool_choice: Option<serde_json::Value>,
    /// Embeddings input: a string, strings, or token arrays. Responses input: a string or an
    /// array of input items.
    #[serde(default)]
    pub input: Option<serde_json::Value>,
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Responses: caps the generated tokens, as `max_tokens` does for chat.
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    /// Responses: the system message, echoed as sent in the answer.
    #[serde(borrow, default)]
    pub instructions: Option<&'a RawValue>,
    /// Ranking: `{"text": ...}`.
    #[serde(default)]
    pub query: Option<serde_json::Value>,
    /// Ranking: `[{"text": ...}, ...]`.
    #[serde(default)]
    pub passages: Option<serde_json::Value>,
}

/// The inference APIs the sim serves, one path each.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completion,
    /// OpenAI's Responses API.
    Responses,
    Embeddings,
    /// NIM's reranking API.
    Ranking,
}

/// The prompt of a request to `api` as the KV-cache model hashes it (see `prompt_bytes` and
/// `responses::prompt_bytes`), or `None` for reranking: a reranker scores each passage with the
/// query as a pair of its own, so its requests neither look up nor fill the prefix cache.
pub fn prompt(body: &[u8], api: Api) -> Option<Cow<'_, [u8]>> {
    match api {
        Api::Chat => Some(Cow::Borrowed(prompt_bytes(body, Some(Kind::Chat)))),
        Api::Completion => Some(Cow::Borrowed(prompt_bytes(body, Some(Kind::Completion)))),
        Api::Embeddings => Some(Cow::Borrowed(prompt_bytes(body, None))),
        Api::Responses => Some(responses::prompt_bytes(body)),
        Api::Ranking => None,
    }
}

/// The prompt fields of an inference request, raw as sent. Read in a pass of their own, and only
/// with the KV-cache model on: borrowing a field raw checks its bytes are UTF-8, a cost the
/// cache-less hot path has no use for.
#[derive(Deserialize)]
struct RawPrompt<'a> {
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
}

/// The prompt of `body` as the client sent it, raw JSON: `messages` for chat, `prompt` for
/// completions, `input` for embeddings (`kind` None); empty when absent. The KV-cache model
/// hashes these bytes, so prompts sharing a start share cache blocks, the way a gateway routing
/// by prefix sees them.
pub fn prompt_bytes(body: &[u8], kind: Option<Kind>) -> &[u8] {
    let Ok(fields) = serde_json::from_slice::<RawPrompt<'_>>(body) else {
        return &[];
    };
    let raw = match kind {
        Some(Kind::Chat) => fields.messages,
        Some(Kind::Completion) => fields.prompt,
        None => fields.input,
    };
    raw.map_or(&[], |raw| raw.get().as_bytes())
}

#[derive(Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Deserialize)]
pub struct Tool {
    #[serde(default)]
    pub function: Option<ToolFunction>,
}

#[derive(Deserialize)]
pub struct ToolFunction {
    pub name: String,
}

/// The words tokens are made of, cycled.
const WORDS: [&str; 16] = [
    " The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ".", " NIM", " serves", " tokens",
    " fast", " and", " well",
];

const DONE: &[u8] = b"data: [DONE]\n\n";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Completion,
}

/// Everything needed to render one answer, with the per-request parts of its JSON built once.
pub struct Plan {
    pub kind: Kind,
    /// Content events to send (a tool call is one).
    pub tokens: u32,
    pub finish_reason: &'static str,
    pub include_usage: bool,
    pub prompt_tokens: u64,
    /// The tool call, without the stream's `index`, when the answer is one:
    /// `"id":"call_<n>","type":"function","function":{...}}`.
    pub tool_call: Option<String>,
    /// `"id":"<id>","object":"<object>","created":N,"model":"<model>"` of the whole answer.
    answer_head: String,
    /// `data: {"id":...,"model":...,"choices":[` of every stream event.
    event_prefix: String,
    /// `]}` or `],"usage":null}`, then the blank line ending an event.
    event_suffix: &'static str,
}

impl Plan {
    /// The plan for inference request number `sequence` of `kind` asking for `model`.
    pub fn new(
        kind: Kind,
        sequence: u64,
        model: &str,
        request: &InferRequest<'_>,
        tokens: u32,
        prompt_tokens: u64,
    ) -> Self {
        let cap = request.max_completion_tokens.or(request.max_tokens);
        let capped = cap.is_some_and(|cap| cap < tokens);
        let tokens = cap.map_or(tokens, |cap| cap.min(tokens));
        let wants_tool = !matches!(&request.tool_choice, Some(serde_json::Value::String(choice)) if choice == "none");
        let tool_call = match &request.tools {
            Some(tools) if kind == Kind::Chat && wants_tool => {
                tools.iter().find_map(|t| t.function.as_ref()).map(|f| {
                    let name = json_string(&f.name);
                    format!(
                        r#""id":"call_{sequence}","type":"function","function":{{"name":{name},"arguments":"{{}}"}}}}"#
                    )
                })
            }
            _ => None,
        };
        let finish_reason = match (&tool_call, capped) {
            (Some(_), _) => "tool_calls",
            (None, true) => "length",
            (None, false) => "stop",
        };
        let (id, object, chunk_object) = match kind {
            Kind::Chat => ("chatcmpl", "chat.completion", "chat.completion.chunk"),
            Kind::Completion => ("cmpl", "text_completion", "text_completion"),
        };
        let model = json_string(model);
        let include_usage = request.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Self {
            kind,
            tokens: if tool_call.is_some() { 1 } else { tokens },
            finish_reason,
            include_usage,
            prompt_tokens,
            tool_call,
            answer_head: format!(r#""id":"{id}-{sequence}","object":"{object}","created":{CREATED},"model":{model}"#),
            event_prefix: format!(
                r#"data: {{"id":"{id}-{sequence}","object":"{chunk_object}","created":{CREATED},"model":{model},"choices":["#
            ),
            event_suffix: if include_usage { "],\"usage\":null}\n\n" } else { "]}\n\n" },
        }
    }

    /// The tokens this answer generates (a tool call counts as one).
    pub fn completion_tokens(&self) -> u64 {
        u64::from(self.tokens)
    }

    fn usage(&self) -> String {
        let completion = self.completion_tokens();
        format!(
            r#"{{"prompt_tokens":{},"completion_tokens":{completion},"total_tokens":{}}}"#,
            self.prompt_tokens,
            self.prompt_tokens + completion
        )
    }

    /// The non-streaming answer.
    pub fn answer(&self) -> Bytes {
        let (head, usage, finish) = (&self.answer_head, self.usage(), self.finish_reason);
        let body = match (self.kind, &self.tool_call) {
            (Kind::Chat, Some(call)) => format!(
                r#"{{{head},"choices":[{{"index":0,"message":{{"role":"assistant","content":null,"tool_calls":[{{{call}]}},"logprobs":null,"finish_reason":"{finish}"}}],"usage":{usage}}}"#
            ),
            (Kind::Chat, None) => format!(
                r#"{{{head},"choices":[{{"index":0,"message":{{"role":"assistant","content":"{}"}},"logprobs":null,"finish_reason":"{finish}"}}],"usage":{usage}}}"#,
                text(self.tokens)
            ),
            (Kind::Completion, _) => format!(
                r#"{{{head},"choices":[{{"index":0,"text":"{}","logprobs":null,"finish_reason":"{finish}"}}],"usage":{usage}}}"#,
                text(self.tokens)
            ),
        };
        Bytes::from(body)
    }

    /// A stream event whose only choice is `parts` joined: one allocation, sized exactly.
    fn event(&self, parts: &[&str]) -> Bytes {
        let len = self.event_prefix.len() + parts.iter().map(|p| p.len()).sum::<usize>() + self.event_suffix.len();
        let mut event = String::with_capacity(len);
        event.push_str(&self.event_prefix);
        parts.iter().for_each(|part| event.push_str(part));
        event.push_str(self.event_suffix);
        Bytes::from(event)
    }

    /// The first chat event, announcing the assistant's turn; completions have none.
    pub fn role_event(&self) -> Option<Bytes> {
        (self.kind == Kind::Chat).then(|| {
            self.event(&[
                r#"{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}"#,
            ])
        })
    }

    /// Content event `i` (0-based): one token, or the whole tool call.
    pub fn content_event(&self, i: u32) -> Bytes {
        const TAIL: &str = r#"","logprobs":null,"finish_reason":null}"#;
        let word = word(i);
        match (self.kind, &self.tool_call) {
            (Kind::Chat, Some(call)) => self.event(&[
                r#"{"index":0,"delta":{"tool_calls":[{"index":0,"#,
                call,
                r#"]},"logprobs":null,"finish_reason":null}"#,
            ]),
            (Kind::Chat, None) => {
                self.event(&[r#"{"index":0,"delta":{"content":""#, word, r#""},"logprobs":null,"finish_reason":null}"#])
            }
            (Kind::Completion, _) => self.event(&[r#"{"index":0,"text":""#, word, TAIL]),
        }
    }

    /// The event with an empty delta (chat) or text (completions) and the finish reason.
    pub fn finish_event(&self) -> Bytes {
        let head = match self.kind {
            Kind::Chat => r#"{"index":0,"delta":{},"logprobs":null,"finish_reason":""#,
            Kind::Completion => r#"{"index":0,"text":"","logprobs":null,"finish_reason":""#,
        };
        self.event(&[head, self.finish_reason, "\"}"])
    }

    /// The final usage-only event (`choices` empty), sent when the client asked for it.
    pub fn usage_event(&self) -> Bytes {
        Bytes::from(format!("{}],\"usage\":{}}}\n\n", self.event_prefix, self.usage()))
    }
}

impl Script for Plan {
    fn tokens(&self) -> u32 {
        self.tokens
    }

    fn heading(&self) -> Vec<Bytes> {
        self.role_event().into_iter().collect()
    }

    fn content(&self, i: u32) -> Bytes {
        self.content_event(i)
    }

    fn closing(&self) -> Vec<Bytes> {
        let mut events = vec![self.finish_event()];
        if self.include_usage {
            events.push(self.usage_event());
        }
        events.push(Bytes::from_static(DONE));
        events
    }

    fn answer(&self) -> Bytes {
        Plan::answer(self)
    }
}

/// `value` as a JSON string literal, quotes included.
pub fn json_string(value: &str) -> String {
    serde_json::Value::from(value).to_string()
}

/// Token `i` (0-based) of every answer. No word needs escaping in JSON.
pub fn word(i: u32) -> &'static str {
    WORDS[i as usize % WORDS.len()]
}

/// The text of `tokens` tokens.
pub fn text(tokens: u32) -> String {
    let mut text = String::with_capacity(tokens as usize * 6);
    for i in 0..tokens {
        text.push_str(word(i));
    }
    text
}

/// The texts to embed, from any of the accepted `input` shapes.
pub fn embedding_inputs(input: &serde_json::Value) -> Option<Vec<String>> {
    match input {
        serde_json::Value::String(s) => Some(vec![s.clone()]),
        serde_json::Value::Array(items) if items.is_empty() => None,
        serde_json::Value::Array(items) if items.iter().all(|i| i.is_number()) => Some(vec![input.to_string()]),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|item| match item {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(_) => Some(item.to_string()),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

/// A deterministic unit vector for `text`.
pub fn embedding(text: &str, dim: usize) -> Vec<f32> {
    // FNV-1a of the text seeds an xorshift generator.
    let mut state =
        text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    let mut vector: Vec<f32> = (0..dim.max(1))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::EPSILON);
    vector.iter_mut().for_each(|x| *x /= norm);
    vector
}

/// The embeddings answer, floats or base64 of little-endian f32s (what the official OpenAI SDKs
/// ask for by default).
pub fn embeddings_answer(model: &str, inputs: &[String], dim: usize, base64: bool, prompt_tokens: u64) -> Bytes {
    let mut body = String::with_capacity(64 + inputs.len() * (48 + dim * 12));
    body.push_str(r#"{"object":"list","data":["#);
    for (index, text) in inputs.iter().enumerate() {
        let vector = embedding(text, dim);
        if index > 0 {
            body.push(',');
        }
        let _ = write!(body, r#"{{"object":"embedding","index":{index},"embedding":"#);
        if base64 {
            let bytes: Vec<u8> = vector.iter().flat_map(|x| x.to_le_bytes()).collect();
            body.push('"');
            base64::engine::general_purpose::STANDARD.encode_string(bytes, &mut body);
            body.push('"');
        } else {
            body.push('[');
            for (i, x) in vector.iter().enumerate() {
                let sep = if i > 0 { "," } else { "" };
                // Display of a finite f32 is its shortest round-trip decimal, never exponent form.
                let _ = write!(body, "{sep}{x}");
            }
            body.push(']');
        }
        body.push('}');
    }
    let model = json_string(model);
    let _ = write!(
        body,
        r#"],"model":{model},"usage":{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens}}}}}"#
    );
    Bytes::from(body)
}

/// The OpenAI-style error type NIM names for `status`. Injected errors take theirs from here
/// too; a full queue's 429 is a `RateLimitError`.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 => "BadRequestError",
        401 => "AuthenticationError",
        403 => "PermissionDeniedError",
        404 => "NotFoundError",
        408 => "RequestTimeoutError",
        409 => "ConflictError",
        413 => "RequestEntityTooLargeError",
        422 => "UnprocessableEntityError",
        429 => "RateLimitError",
        502 => "BadGatewayError",
        503 => "ServiceUnavailableError",
        504 => "GatewayTimeoutError",
        _ if status >= 500 => "InternalServerError",
        _ => "APIStatusError",
    }
}

/// NIM's error envelope: `{"error":{"message":...,"type":...,"code":<status>}}`.
pub fn error_body(status: u16, message: &str) -> Bytes {
    let message = json_string(message);
    let kind = error_type(status);
    Bytes::from(format!(r#"{{"error":{{"message":{message},"type":"{kind}","code":{status}}}}}"#))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: &str) -> InferRequest<'_> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_prompt_is_the_raw_json_of_its_field_as_sent() {
        let body = br#"{"model":"m","messages": [ {"role":"user","content":"h\u0069"} ],"prompt":"p","input":["a"]}"#;
        assert_eq!(prompt_bytes(body, Some(Kind::Chat)), br#"[ {"role":"user","content":"h\u0069"} ]"#);
        assert_eq!(prompt_bytes(body, Some(Kind::Completion)), br#""p""#);
        assert_eq!(prompt_bytes(body, None), br#"["a"]"#);
        assert!(prompt_bytes(br#"{"model":"m","messages":null}"#, Some(Kind::Chat)).is_empty());
        assert!(prompt_bytes(b"{not json", Some(Kind::Chat)).is_empty());
    }

    #[test]
    fn max_tokens_caps_the_answer_and_says_length() {
        let r = request(r#"{"model":"m","max_tokens":3}"#);
        let plan = Plan::new(Kind::Chat, 1, "m", &r, 16, 5);
        assert_eq!((plan.tokens, plan.finish_reason), (3, "length"));
        let answer: serde_json::Value = serde_json::from_slice(&plan.answer()).unwrap();
        assert_eq!(answer["choices"][0]["message"]["content"], " The quick brown");
        assert_eq!(answer["usage"]["total_tokens"], 8);
    }

    #[test]
    fn stream_events_are_single_sse_data_lines_of_valid_json() {
        let r = request(r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#);
        let plan = Plan::new(Kind::Chat, 7, "org/m\"x", &r, 2, 5);
        for event in [plan.role_event().unwrap(), plan.content_event(0), plan.finish_event(), plan.usage_event()] {
            let text = std::str::from_utf8(&event).unwrap();
            let json = text.strip_prefix("data: ").unwrap().strip_suffix("\n\n").unwrap();
            let value: serde_json::Value = serde_json::from_str(json).unwrap();
            assert_eq!(value["model"], "org/m\"x");
            assert!(value.get("usage").is_some());
        }
    }

    #[test]
    fn tool_calls_name_the_first_tool_unless_tool_choice_is_none() {
        let r = request(r#"{"model":"m","tools":[{"type":"function","function":{"name":"f1"}}]}"#);
        let plan = Plan::new(Kind::Chat, 1, "m", &r, 16, 1);
        let answer: serde_json::Value = serde_json::from_slice(&plan.answer()).unwrap();
        assert_eq!(answer["choices"][0]["message"]["tool_calls"][0]["function"]["name"], "f1");
        assert_eq!(answer["choices"][0]["finish_reason"], "tool_calls");
        let event = plan.content_event(0);
        let value: serde_json::Value = serde_json::from_str(std::str::from_utf8(&event).unwrap()[6..].trim()).unwrap();
        assert_eq!(value["choices"][0]["delta"]["tool_calls"][0]["index"], 0);

        let r = request(r#"{"model":"m","tools":[{"type":"function","function":{"name":"f1"}}],"tool_choice":"none"}"#);
        assert!(Plan::new(Kind::Chat, 1, "m", &r, 16, 1).tool_call.is_none());
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let a = embedding("hello", 16);
        assert_eq!(a, embedding("hello", 16));
        assert_ne!(a, embedding("world", 16));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
        assert_eq!(embedding_inputs(&serde_json::json!(["a", "b"])).unwrap().len(), 2);
        assert_eq!(embedding_inputs(&serde_json::json!([1, 2, 3])).unwrap().len(), 1);
        assert!(embedding_inputs(&serde_json::json!(42)).is_none());
    }

    #[test]
    fn errors_use_nims_envelope_and_escape_their_message() {
        let body: serde_json::Value =
            serde_json::from_slice(&error_body(404, "The model `a\"b` does not exist.")).unwrap();
        assert_eq!(
            body,
            serde_json::json!({ "error": {
                "message": "The model `a\"b` does not exist.", "type": "NotFoundError", "code": 404
            }})
        );
        assert_eq!(error_type(429), "RateLimitError");
        assert_eq!(error_type(418), "APIStatusError");
    }

    #[test]
    fn float_and_base64_embeddings_carry_the_same_vector() {
        let inputs = vec!["a".to_owned(), "b".to_owned()];
        let floats: serde_json::Value = serde_json::from_slice(&embeddings_answer("m", &inputs, 4, false, 3)).unwrap();
        let b64: serde_json::Value = serde_json::from_slice(&embeddings_answer("m", &inputs, 4, true, 3)).unwrap();
        assert_eq!(floats["usage"], serde_json::json!({ "prompt_tokens": 3, "total_tokens": 3 }));
        for i in 0..2 {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64["data"][i]["embedding"].as_str().unwrap())
                .unwrap();
            let decoded: Vec<f32> = bytes.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
            let parsed: Vec<f32> =
                floats["data"][i]["embedding"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            assert_eq!(decoded, parsed, "the decimal form round-trips exactly");
            assert_eq!(decoded, embedding(&inputs[i], 4));
        }
    }
}
