//! What the sim answers on OpenAI's Responses API (`POST /v1/responses`): the Response object,
//! and the typed SSE events of its stream in OpenAI's order. The text, token counts and failures
//! are chat's, so a test can compare the two APIs; only the shapes differ. Kept apart from
//! `reply` because nothing in these shapes is shared with chat completions.
//!
//! A stream is `response.created` and `response.in_progress` at once, then with the first token
//! `response.output_item.added` and `response.content_part.added`, one
//! `response.output_text.delta` per token, `response.output_text.done`,
//! `response.content_part.done`, `response.output_item.done` and the terminal
//! `response.completed` (`response.incomplete` when `max_output_tokens` cut the answer), which
//! carries the whole response and its usage. Every event is `event: <type>` then one `data:` line
//! whose JSON starts with the same `type` and ends with its `sequence_number`, counted from 0.
//! There is no `data: [DONE]`: the Responses API sends none.

use std::borrow::Cow;
use std::fmt::Write;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::body::Script;
use crate::reply::{self, InferRequest};
use crate::state::CREATED;

/// Events before the first delta: `created`, `in_progress`, `output_item.added` and
/// `content_part.added`; the first delta's sequence number.
const HEADING_EVENTS: u64 = 4;

/// The prompt fields of a Responses request, raw as sent (only read with the KV-cache model on).
#[derive(Deserialize)]
struct RawPrompt<'a> {
    #[serde(borrow, default)]
    instructions: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
}

/// The prompt of a Responses request as the KV-cache model sees it: the raw JSON of
/// `instructions` followed by that of `input`, as sent. `instructions` comes first because it is
/// the system message the model reads first, and the part most requests of one application
/// share, so it is the prefix a cache keeps.
pub fn prompt_bytes(body: &[u8]) -> Cow<'_, [u8]> {
    let Ok(fields) = serde_json::from_slice::<RawPrompt<'_>>(body) else {
        return Cow::Borrowed(&[]);
    };
    match (fields.instructions, fields.input) {
        (Some(instructions), Some(input)) => {
            Cow::Owned([instructions.get().as_bytes(), input.get().as_bytes()].concat())
        }
        (Some(only), None) | (None, Some(only)) => Cow::Borrowed(only.get().as_bytes()),
        (None, None) => Cow::Borrowed(&[]),
    }
}

/// Whether `input` has a shape the Responses API takes: a string, or an array of input items.
pub fn is_input(input: &serde_json::Value) -> bool {
    input.is_string() || input.is_array()
}

/// Everything needed to render one Responses answer, with its per-request parts built once.
pub struct Plan {
    /// Tokens generated, one delta event each.
    pub tokens: u32,
    /// `max_output_tokens` cut the answer: status `incomplete`.
    pub incomplete: bool,
    prompt_tokens: u64,
    /// Of the prompt tokens, those the KV cache held.
    cached_tokens: u64,
    /// `msg_<n>`, the id of the one output message.
    item_id: String,
    /// `"id":"resp_<n>","object":"response","created_at":N`.
    head: String,
    /// `"instructions":...,"max_output_tokens":...,"model":...`, echoing the request.
    settings: String,
    /// Everything of a delta event before its token.
    delta_prefix: String,
}

impl Plan {
    /// The plan for inference request number `sequence` asking for `model`: `tokens` capped by
    /// `max_output_tokens`, `cached_tokens` of the `prompt_tokens` found in the KV cache.
    pub fn new(
        sequence: u64,
        model: &str,
        request: &InferRequest<'_>,
        tokens: u32,
        prompt_tokens: u64,
        cached_tokens: u64,
    ) -> Self {
        let cap = request.max_output_tokens;
        let item_id = format!("msg_{sequence}");
        let instructions = request.instructions.map_or("null", RawValue::get);
        let max_output_tokens = cap.map_or_else(|| "null".to_owned(), |cap| cap.to_string());
        let model = reply::json_string(model);
        Self {
            tokens: cap.map_or(tokens, |cap| cap.min(tokens)),
            incomplete: cap.is_some_and(|cap| cap < tokens),
            prompt_tokens,
            cached_tokens,
            head: format!(r#""id":"resp_{sequence}","object":"response","created_at":{CREATED}"#),
            settings: format!(
                r#""instructions":{instructions},"max_output_tokens":{max_output_tokens},"model":{model}"#
            ),
            delta_prefix: format!(
                "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\
                 \"item_id\":\"{item_id}\",\"output_index\":0,\"content_index\":0,\"delta\":\""
            ),
            item_id,
        }
    }

    /// The answer's status once generated, and the terminal event's type.
    fn status(&self) -> (&'static str, &'static str) {
        match self.incomplete {
            true => ("incomplete", "response.incomplete"),
            false => ("completed", "response.completed"),
        }
    }

    /// The output text part holding `text`.
    fn part(text: &str) -> String {
        format!(r#"{{"type":"output_text","text":"{text}","annotations":[],"logprobs":[]}}"#)
    }

    /// The output message: in progress and empty, or done with its part holding `text`.
    fn message(&self, done: Option<&str>) -> String {
        let (status, content) = match done {
            None => ("in_progress", String::new()),
            Some(text) => (self.status().0, Self::part(text)),
        };
        let id = &self.item_id;
        format!(r#"{{"type":"message","id":"{id}","status":"{status}","role":"assistant","content":[{content}]}}"#)
    }

    /// The Response object: in progress with no output or usage, or done with `text`.
    fn response(&self, done: Option<&str>) -> String {
        let (head, settings) = (&self.head, &self.settings);
        let (status, details, output, usage) = match done {
            None => ("in_progress", "null", String::new(), "null".to_owned()),
            Some(text) => {
                let details = if self.incomplete { r#"{"reason":"max_output_tokens"}"# } else { "null" };
                (self.status().0, details, self.message(Some(text)), self.usage())
            }
        };
        format!(
            r#"{{{head},"status":"{status}","error":null,"incomplete_details":{details},{settings},"output":[{output}],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{{"effort":null,"summary":null}},"store":false,"temperature":1.0,"text":{{"format":{{"type":"text"}}}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{usage},"user":null,"metadata":{{}}}}"#
        )
    }

    fn usage(&self) -> String {
        let (input, cached, output) = (self.prompt_tokens, self.cached_tokens, u64::from(self.tokens));
        let total = input + output;
        format!(
            r#"{{"input_tokens":{input},"input_tokens_details":{{"cached_tokens":{cached}}},"output_tokens":{output},"output_tokens_details":{{"reasoning_tokens":0}},"total_tokens":{total}}}"#
        )
    }

    /// One typed event: `fields` (JSON members, without braces) between its `type` and its
    /// `sequence_number`.
    fn event(kind: &str, fields: &str, sequence_number: u64) -> Bytes {
        Bytes::from(format!(
            "event: {kind}\ndata: {{\"type\":\"{kind}\",{fields},\"sequence_number\":{sequence_number}}}\n\n"
        ))
    }

    /// The members naming the one output text part of the one output message.
    fn part_address(&self) -> String {
        format!(r#""item_id":"{}","output_index":0,"content_index":0"#, self.item_id)
    }
}

impl Script for Plan {
    fn tokens(&self) -> u32 {
        self.tokens
    }

    fn opening(&self) -> Vec<Bytes> {
        let response = format!(r#""response":{}"#, self.response(None));
        vec![Self::event("response.created", &response, 0), Self::event("response.in_progress", &response, 1)]
    }

    fn heading(&self) -> Vec<Bytes> {
        vec![
            Self::event("response.output_item.added", &format!(r#""output_index":0,"item":{}"#, self.message(None)), 2),
            Self::event(
                "response.content_part.added",
                &format!(r#"{},"part":{}"#, self.part_address(), Self::part("")),
                3,
            ),
        ]
    }

    fn content(&self, i: u32) -> Bytes {
        const TAIL: &str = r#"","logprobs":[],"sequence_number":"#;
        let word = reply::word(i);
        let mut event = String::with_capacity(self.delta_prefix.len() + word.len() + TAIL.len() + 24);
        event.push_str(&self.delta_prefix);
        event.push_str(word);
        event.push_str(TAIL);
        let _ = write!(event, "{}}}\n\n", HEADING_EVENTS + u64::from(i));
        Bytes::from(event)
    }

    fn closing(&self) -> Vec<Bytes> {
        let text = reply::text(self.tokens);
        let (address, next) = (self.part_address(), HEADING_EVENTS + u64::from(self.tokens));
        vec![
            Self::event("response.output_text.done", &format!(r#"{address},"text":"{text}","logprobs":[]"#), next),
            Self::event("response.content_part.done", &format!(r#"{address},"part":{}"#, Self::part(&text)), next + 1),
            Self::event(
                "response.output_item.done",
                &format!(r#""output_index":0,"item":{}"#, self.message(Some(&text))),
                next + 2,
            ),
            Self::event(self.status().1, &format!(r#""response":{}"#, self.response(Some(&text))), next + 3),
        ]
    }

    fn answer(&self) -> Bytes {
        Bytes::from(self.response(Some(&reply::text(self.tokens))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(json: &str, tokens: u32) -> Plan {
        let request: InferRequest<'_> = serde_json::from_str(json).unwrap();
        Plan::new(3, "org/m\"x", &request, tokens, 10, 4)
    }

    /// Every event of a whole stream, in order, as (event line, parsed data).
    fn stream(plan: &Plan) -> Vec<(String, serde_json::Value)> {
        let mut events = plan.opening();
        events.extend(plan.heading());
        events.extend((0..plan.tokens).map(|i| plan.content(i)));
        events.extend(plan.closing());
        events
            .iter()
            .map(|event| {
                let text = std::str::from_utf8(event).unwrap();
                let (line, data) = text.strip_suffix("\n\n").unwrap().split_once('\n').unwrap();
                let kind = line.strip_prefix("event: ").unwrap().to_owned();
                (kind, serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap())
            })
            .collect()
    }

    #[test]
    fn the_prompt_is_instructions_then_input_raw_as_sent() {
        let body = br#"{"model":"m","input": [ {"role":"user","content":"h\u0069"} ],"instructions":"be brief"}"#;
        assert_eq!(&*prompt_bytes(body), br#""be brief"[ {"role":"user","content":"h\u0069"} ]"#);
        assert_eq!(&*prompt_bytes(br#"{"input":"x"}"#), br#""x""#);
        assert_eq!(&*prompt_bytes(br#"{"input":"x","instructions":null}"#), br#""x""#);
        assert!(prompt_bytes(b"{not json").is_empty());
    }

    #[test]
    fn the_answer_is_a_response_object_with_usage() {
        let plan = plan(r#"{"model":"m","input":"hi","instructions":"be brief"}"#, 3);
        let answer: serde_json::Value = serde_json::from_slice(&plan.answer()).unwrap();
        assert_eq!(answer["id"], "resp_3");
        assert_eq!((answer["status"].clone(), answer["model"].clone()), ("completed".into(), "org/m\"x".into()));
        assert_eq!(answer["instructions"], "be brief");
        assert_eq!(answer["incomplete_details"], serde_json::Value::Null);
        assert_eq!(answer["output"][0]["content"][0]["text"], " The quick brown");
        assert_eq!(answer["usage"]["input_tokens_details"]["cached_tokens"], 4);
        assert_eq!(answer["usage"]["total_tokens"], 13);
    }

    #[test]
    fn a_stream_numbers_its_events_and_ends_with_the_whole_response() {
        let plan = plan(r#"{"model":"m","input":"hi","max_output_tokens":2}"#, 5);
        let events = stream(&plan);
        assert_eq!(events.len(), 4 + 2 + 4);
        for (n, (kind, data)) in events.iter().enumerate() {
            assert_eq!(data["type"], kind.as_str());
            assert_eq!(data["sequence_number"], n);
        }
        let (kind, last) = events.last().unwrap();
        assert_eq!(kind, "response.incomplete");
        assert_eq!(last["response"]["incomplete_details"]["reason"], "max_output_tokens");
        assert_eq!(last["response"]["output"][0]["status"], "incomplete");
        assert_eq!(last["response"]["max_output_tokens"], 2);
        let answer: serde_json::Value = serde_json::from_slice(&plan.answer()).unwrap();
        assert_eq!(last["response"], answer, "the terminal event carries the JSON answer");
    }
}
