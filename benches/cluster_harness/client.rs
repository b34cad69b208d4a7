//! Talking HTTP: one streamed chat turn, timed to its first token and read to its end for the
//! assistant's text (the next turn must carry exactly what came back), and plain GETs for the
//! metrics pages. Separate from the replay so that a turn's parsing is tested without sockets.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// An HTTP/1.1 client with keep-alive connections, as many as there are requests in flight.
pub fn http1_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).pool_max_idle_per_host(usize::MAX).build(connector)
}

/// What one streamed turn gave back.
pub struct Answer {
    /// From sending the request to the first event carrying content.
    pub ttft: Duration,
    /// The assistant's text, the content deltas joined.
    pub text: String,
    /// Content events: a token each in nim-sim's streams.
    pub tokens: u64,
}

/// Posts `body` to `url` and reads the stream to `[DONE]`. Fails on a status other than 200, a
/// broken stream, an error event, or a stream that ends without content or without `[DONE]`.
pub async fn chat_turn(client: &HttpClient, url: &str, body: Vec<u8>) -> Result<Answer, String> {
    let request = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let start = Instant::now();
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let mut body = response.into_body();
    if status != StatusCode::OK {
        let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        return Err(format!("{status}: {}", String::from_utf8_lossy(&text)));
    }
    let mut events = Events::default();
    let mut ttft = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|e| e.to_string())?.into_data() else { continue };
        let had_content = events.tokens > 0;
        events.feed(&data)?;
        if !had_content && events.tokens > 0 {
            ttft = Some(start.elapsed());
        }
    }
    match (ttft, events.done) {
        (Some(ttft), true) => Ok(Answer { ttft, text: events.text, tokens: events.tokens }),
        (None, _) => Err("the stream carried no content".into()),
        (_, false) => Err("the stream ended without [DONE]".into()),
    }
}

/// GETs `url` and returns its body as text; fails on a status other than 200.
pub async fn get_text(client: &HttpClient, url: &str) -> Result<String, String> {
    let request = Request::get(url).body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| format!("{url}: {e}"))?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(|e| format!("{url}: {e}"))?.to_bytes();
    if status != StatusCode::OK {
        return Err(format!("{url}: {status}"));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A stream's SSE events as they arrive, in frames cut anywhere.
#[derive(Default)]
struct Events {
    /// The bytes after the last complete event.
    pending: Vec<u8>,
    text: String,
    tokens: u64,
    done: bool,
}

/// The part of a chat chunk read here; an error event has `error` and no `choices`.
#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    delta: Delta,
}

#[derive(Default, Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
}

impl Events {
    /// Takes a frame, handling every event it completes.
    fn feed(&mut self, data: &[u8]) -> Result<(), String> {
        self.pending.extend_from_slice(data);
        while let Some(end) = self.pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = self.pending.drain(..end + 2).collect();
            self.event(&event)?;
        }
        Ok(())
    }

    fn event(&mut self, event: &[u8]) -> Result<(), String> {
        let text = std::str::from_utf8(event).map_err(|e| e.to_string())?;
        for data in text.lines().filter_map(|line| line.strip_prefix("data:")).map(str::trim_start) {
            if data == "[DONE]" {
                self.done = true;
                continue;
            }
            let chunk: Chunk = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
            if let Some(error) = chunk.error {
                return Err(format!("error event: {error}"));
            }
            // The role event carries `"content":""`; only a token counts.
            for content in chunk.choices.into_iter().filter_map(|c| c.delta.content).filter(|c| !c.is_empty()) {
                self.text.push_str(&content);
                self.tokens += 1;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
        "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" The\"}}]}\n\n",
        "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" quick\"}}]}\n\n",
        "data: {\"id\":\"x\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n",
        "data: {\"id\":\"x\",\"choices\":[],\"usage\":{\"completion_tokens\":2}}\n\n",
        "data: [DONE]\n\n",
    );

    #[test]
    fn tokens_and_text_are_read_from_content_deltas_under_any_frame_cut() {
        for cut in 1..STREAM.len() {
            let mut events = Events::default();
            events.feed(&STREAM.as_bytes()[..cut]).unwrap();
            events.feed(&STREAM.as_bytes()[cut..]).unwrap();
            assert_eq!((events.text.as_str(), events.tokens, events.done), (" The quick", 2, true), "cut {cut}");
        }
    }

    #[test]
    fn an_error_event_fails_the_turn() {
        let mut events = Events::default();
        let error = "data: {\"error\":{\"message\":\"upstream timed out\",\"code\":\"upstream_timeout\"}}\n\n";
        assert!(events.feed(error.as_bytes()).unwrap_err().contains("upstream_timeout"));
    }
}
