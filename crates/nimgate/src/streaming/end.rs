//! Whether an SSE answer ended complete, as its endpoint defines it, read from the bytes as
//! they pass (frames can cut an event anywhere):
//! - chat and completions end with `data: [DONE]` (`Tail` keeps the last bytes);
//! - the Responses API ends with a terminal typed event, `response.completed`,
//!   `response.incomplete` or `response.failed`, and sends no `[DONE]` (`TerminalEvent` reads
//!   the start of each line: an `event:` line, or a `data:` line whose JSON begins with its
//!   `"type"`). The event counts once its data is through (the empty line after it), so its
//!   usage has been read when the stream is called complete.

use crate::api::StreamEnd;

/// Tells whether a stream has ended complete.
#[derive(Debug)]
pub enum Completion {
    Done(Tail),
    Terminal(TerminalEvent),
}

impl Completion {
    pub fn new(end: StreamEnd) -> Self {
        match end {
            StreamEnd::Done => Self::Done(Tail::default()),
            StreamEnd::TerminalEvent => Self::Terminal(TerminalEvent::default()),
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        match self {
            Self::Done(tail) => tail.push(data),
            Self::Terminal(terminal) => terminal.push(data),
        }
    }

    /// The stream's end has gone by: nothing more is owed.
    pub fn complete(&self) -> bool {
        match self {
            Self::Done(tail) => tail.ends_with_done(),
            Self::Terminal(terminal) => terminal.seen(),
        }
    }
}

/// The last bytes of a stream, kept across frames: an event can be split anywhere.
#[derive(Debug, Default)]
pub struct Tail {
    /// Room for `\r\ndata: [DONE]\r\n\r\n` and a few bytes of trailing whitespace.
    bytes: [u8; 24],
    len: usize,
}

impl Tail {
    pub fn push(&mut self, data: &[u8]) {
        let cap = self.bytes.len();
        if data.len() >= cap {
            self.bytes.copy_from_slice(&data[data.len() - cap..]);
            self.len = cap;
            return;
        }
        let keep = (cap - data.len()).min(self.len);
        self.bytes.copy_within(self.len - keep..self.len, 0);
        self.bytes[keep..keep + data.len()].copy_from_slice(data);
        self.len = keep + data.len();
    }

    /// The stream's last event is `[DONE]` (`data:` takes one optional space, per the SSE spec).
    /// Only at a line's start: a frame may end inside a chunk's text that reads `data: [DONE]`,
    /// but JSON text holds no raw line break, so one before `data:` is the event's own.
    pub fn ends_with_done(&self) -> bool {
        let end = self.bytes[..self.len].trim_ascii_end();
        [&b"data: [DONE]"[..], b"data:[DONE]"].iter().any(|done| {
            end.strip_suffix(*done).is_some_and(|before| match before.last() {
                Some(&byte) => byte == b'\n',
                // The stream's first line, or one whose start went by behind a long run of
                // trailing whitespace: taken as the end, as a line break before it is likely.
                None => true,
            })
        })
    }
}

/// Bytes of a line's start kept to name its event: enough for `data: {"type":"response.incomplete"`.
const LINE_START: usize = 48;

/// Watches a Responses stream for its terminal event.
#[derive(Debug)]
pub struct TerminalEvent {
    /// The current line's first bytes.
    line: [u8; LINE_START],
    /// How many of `line` hold the current line's start (bytes beyond `line`'s room are not kept).
    len: usize,
    /// A terminal event's name went by; it counts at the end of its event.
    pending: bool,
    seen: bool,
}

impl Default for TerminalEvent {
    fn default() -> Self {
        Self { line: [0; LINE_START], len: 0, pending: false, seen: false }
    }
}

/// The Responses API's terminal events.
const TERMINAL: [&[u8]; 3] = [b"response.completed", b"response.incomplete", b"response.failed"];

impl TerminalEvent {
    pub fn push(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.seen {
            let newline = memchr::memchr(b'\n', data);
            let piece = &data[..newline.unwrap_or(data.len())];
            let room = LINE_START - self.len;
            let take = piece.len().min(room);
            self.line[self.len..self.len + take].copy_from_slice(&piece[..take]);
            self.len += take;
            match newline {
                Some(at) => {
                    self.line_ended();
                    data = &data[at + 1..];
                }
                None => return,
            }
        }
    }

    pub fn seen(&self) -> bool {
        self.seen
    }

    fn line_ended(&mut self) {
        let line = self.line[..self.len].strip_suffix(b"\r").unwrap_or(&self.line[..self.len]);
        if line.is_empty() {
            // The end of an event: a terminal one's data has been read.
            self.seen = self.pending;
        } else if let Some(name) = event_name(line) {
            self.pending = TERMINAL.contains(&name);
        }
        self.len = 0;
    }
}

/// The event a line names: `event: NAME`, or `data: {"type":"NAME"...` (servers that send no
/// `event:` lines put the type first).
fn event_name(line: &[u8]) -> Option<&[u8]> {
    if let Some(name) = line.strip_prefix(b"event:") {
        return Some(name.strip_prefix(b" ").unwrap_or(name));
    }
    let data = line.strip_prefix(b"data:")?;
    let json = data.strip_prefix(b" ").unwrap_or(data);
    let rest = json.strip_prefix(b"{\"type\":\"").or_else(|| json.strip_prefix(b"{\"type\": \""))?;
    let end = memchr::memchr(b'"', rest)?;
    Some(&rest[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_sees_done_however_the_frames_cut_it() {
        let stream = b"data: {\"x\":1}\n\ndata: [DONE]\n\n";
        for cut in 0..stream.len() {
            for second in cut..stream.len() {
                let mut tail = Tail::default();
                tail.push(&stream[..cut]);
                tail.push(&stream[cut..second]);
                tail.push(&stream[second..]);
                assert!(tail.ends_with_done(), "cut at {cut} and {second}");
            }
        }
        let mut tail = Tail::default();
        tail.push(b"data: {}\n\ndata:[DONE]\n\n");
        assert!(tail.ends_with_done(), "the space after `data:` is optional");
        let mut tail = Tail::default();
        tail.push(b"data: [DONE]\n\ndata: {\"late\":1}\n\n");
        assert!(!tail.ends_with_done());
        let mut tail = Tail::default();
        tail.push(b"data: {\"choices\":[]}\n\n");
        assert!(!tail.ends_with_done());
    }

    #[test]
    fn done_in_a_chunks_text_is_no_end_even_where_a_frame_ends_after_it() {
        let chunk = b"data: {\"choices\":[{\"delta\":{\"content\":\"data: [DONE]";
        let mut tail = Tail::default();
        tail.push(chunk);
        assert!(!tail.ends_with_done());
        let mut tail = Tail::default();
        tail.push(b"data: {\"x\":1}\n\n");
        tail.push(&chunk[..chunk.len() - 3]);
        tail.push(&chunk[chunk.len() - 3..]);
        assert!(!tail.ends_with_done());
        for stream in [&b"data: [DONE]\n\n"[..], b"data: {}\r\n\r\ndata: [DONE]\r\n\r\n", b"data: {}\n\ndata: [DONE]"] {
            let mut tail = Tail::default();
            tail.push(stream);
            assert!(tail.ends_with_done(), "{}", String::from_utf8_lossy(stream));
        }
    }

    const RESPONSES: &[u8] = b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n\
event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"event: response.completed\\n\"}\n\n\
event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n";

    /// Where the terminal event's `event:` line starts.
    fn last_event() -> usize {
        let line = b"\nevent: response.completed\n";
        RESPONSES.windows(line.len()).rposition(|w| w == line).unwrap() + 1
    }

    fn terminal(frames: &[&[u8]]) -> bool {
        let mut ending = Completion::new(StreamEnd::TerminalEvent);
        for frame in frames {
            ending.push(frame);
        }
        ending.complete()
    }

    #[test]
    fn a_responses_stream_is_complete_after_its_terminal_event_however_the_frames_cut_it() {
        for cut in 0..RESPONSES.len() {
            for second in (cut..RESPONSES.len()).step_by(7) {
                let frames = [&RESPONSES[..cut], &RESPONSES[cut..second], &RESPONSES[second..]];
                assert!(terminal(&frames), "cut at {cut} and {second}");
            }
        }
        // Not before the terminal event's data is through: its usage comes with it.
        let without_blank_line = &RESPONSES[..RESPONSES.len() - 1];
        assert!(!terminal(&[without_blank_line]));
        assert!(!terminal(&[&RESPONSES[..last_event() + 40]]), "its name and part of its data");
    }

    #[test]
    fn text_that_looks_like_an_event_and_other_events_do_not_end_it() {
        // The delta's text holds "event: response.completed", escaped inside a data line.
        assert!(!terminal(&[&RESPONSES[..last_event()]]));
        assert!(!terminal(&[b"event: response.output_text.done\ndata: {}\n\n"]));
        for end in ["response.incomplete", "response.failed"] {
            assert!(terminal(&[format!("event: {end}\ndata: {{}}\n\n").as_bytes()]), "{end}");
        }
        assert!(terminal(&[b"event:response.completed\r\ndata: {}\r\n\r\n"]), "no space, CRLF");
        // A server that sends no `event:` lines: the data's leading type.
        assert!(terminal(&[b"data: {\"type\":\"response.completed\",\"response\":{}}\n\n"]));
        assert!(!terminal(&[b"data: {\"type\":\"response.in_progress\"}\n\n"]));
        // Chat's ending means nothing here.
        assert!(!terminal(&[b"data: [DONE]\n\n"]));
    }
}
