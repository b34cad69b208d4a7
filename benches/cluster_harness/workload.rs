//! The multi-turn chat workload of issue #17, made from a seed alone: a handful of long system
//! prompts shared by many conversations, each conversation a system prompt and its users'
//! messages. Pure and deterministic, so every run of every setup replays the same prompts and
//! the setups differ only in where the gateway sends them.
//!
//! The request body is serialised from the history, and serde_json writes a list the same way
//! whatever follows it, so turn k+1's `messages` starts with turn k's bytes (less the closing
//! `]`): the prefix a KV cache, and a prefix-aware balancer, can recognise.

use serde::Serialize;

/// The model every request names: the route under test.
pub const MODEL: &str = "meta/llama-3.1-8b-instruct";

/// Bytes per token, as nim-sim counts them (4 bytes of the raw `messages` JSON).
const BYTES_PER_TOKEN: usize = 4;

/// The shape of a workload: how much of each thing, in tokens where it matters.
#[derive(Clone, Copy)]
pub struct Shape {
    pub conversations: usize,
    pub turns: usize,
    pub system_prompts: usize,
    pub system_prompt_tokens: usize,
    /// A user message is between these many tokens, drawn uniformly.
    pub user_tokens: (usize, usize),
    pub seed: u64,
}

/// One message of a chat history, in the OpenAI shape.
#[derive(Clone, Serialize)]
pub struct Message {
    pub role: &'static str,
    pub content: String,
}

/// A conversation to replay: which system prompt it opens with and its users' messages, one
/// per turn. The assistant's replies are not known until the backend sends them.
pub struct Conversation {
    pub system_prompt: usize,
    pub user_messages: Vec<String>,
}

/// Everything a run replays.
pub struct Workload {
    pub system_prompts: Vec<String>,
    pub conversations: Vec<Conversation>,
}

impl Workload {
    /// The workload of `shape`: the same for the same shape, in every process and run.
    pub fn generate(shape: &Shape) -> Self {
        let mut rng = SplitMix64(shape.seed);
        let system_prompts = (0..shape.system_prompts)
            .map(|i| {
                // A distinct opening, so no two prompts share even their first cache block.
                let opening = format!("You are assistant number {i} of the nimgate cluster benchmark.");
                text(&mut rng, opening, shape.system_prompt_tokens * BYTES_PER_TOKEN)
            })
            .collect();
        let (low, high) = shape.user_tokens;
        let conversations = (0..shape.conversations)
            .map(|c| Conversation {
                // Drawn, not dealt round robin: the prompts' popularity varies a little, as it would.
                system_prompt: rng.below(shape.system_prompts as u64) as usize,
                user_messages: (0..shape.turns)
                    .map(|turn| {
                        let tokens = low + rng.below((high - low + 1) as u64) as usize;
                        text(&mut rng, format!("Conversation {c}, turn {turn}:"), tokens * BYTES_PER_TOKEN)
                    })
                    .collect(),
            })
            .collect();
        Self { system_prompts, conversations }
    }

    /// The history a conversation starts from: its system prompt alone.
    pub fn opening(&self, conversation: &Conversation) -> Vec<Message> {
        vec![Message { role: "system", content: self.system_prompts[conversation.system_prompt].clone() }]
    }
}

/// The body of one streamed chat request carrying `history`. `messages` comes before the other
/// fields, so the body's own bytes also grow by appending (whatever a balancer hashes).
pub fn request_body(history: &[Message], max_tokens: u32) -> Vec<u8> {
    #[derive(Serialize)]
    struct Body<'a> {
        model: &'static str,
        messages: &'a [Message],
        max_tokens: u32,
        stream: bool,
    }
    serde_json::to_vec(&Body { model: MODEL, messages: history, max_tokens, stream: true }).unwrap_or_default()
}

/// `opening` and then pseudo-random lowercase words up to about `bytes` bytes: plain ASCII, so
/// JSON carries it unescaped and its size in the body is its size here.
fn text(rng: &mut SplitMix64, opening: String, bytes: usize) -> String {
    const LETTERS: &[u8] = b"etaoinshrdlucmfwypvbgk";
    let mut out = opening;
    while out.len() < bytes {
        out.push(' ');
        for _ in 0..2 + rng.below(8) {
            out.push(LETTERS[rng.below(LETTERS.len() as u64) as usize] as char);
        }
    }
    out
}

/// Steele, Lea and Flood's SplitMix64: a few lines, and the same sequence on every platform,
/// which is all the workload needs from a generator.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number below `n` (n > 0); the modulo bias is far below what a benchmark can see.
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            conversations: 20,
            turns: 3,
            system_prompts: 4,
            system_prompt_tokens: 500,
            user_tokens: (10, 30),
            seed: 7,
        }
    }

    #[test]
    fn the_same_shape_gives_the_same_workload_and_prompts_differ_from_their_start() {
        let (a, b) = (Workload::generate(&shape()), Workload::generate(&shape()));
        assert_eq!(a.system_prompts, b.system_prompts);
        assert_eq!(a.conversations[5].user_messages, b.conversations[5].user_messages);
        for prompt in &a.system_prompts {
            assert!((2000..2020).contains(&prompt.len()), "{}", prompt.len());
        }
        assert_ne!(a.system_prompts[0][..64], a.system_prompts[1][..64]);
        let used: std::collections::HashSet<_> = a.conversations.iter().map(|c| c.system_prompt).collect();
        assert_eq!(used.len(), 4, "20 conversations draw every one of 4 prompts");
        assert!(a.conversations.iter().flat_map(|c| &c.user_messages).all(|m| (40..140).contains(&m.len())));
    }

    #[test]
    fn the_next_turns_messages_start_with_this_turns_bytes() {
        let workload = Workload::generate(&shape());
        let conversation = &workload.conversations[0];
        let mut history = workload.opening(conversation);
        history.push(Message { role: "user", content: conversation.user_messages[0].clone() });
        let first = serde_json::to_string(&history).unwrap();
        history.push(Message { role: "assistant", content: " The quick brown".into() });
        history.push(Message { role: "user", content: conversation.user_messages[1].clone() });
        let second = String::from_utf8(request_body(&history, 16)).unwrap();
        let messages = second.strip_prefix(&format!(r#"{{"model":"{MODEL}","messages":"#)).unwrap();
        assert!(messages.starts_with(first.strip_suffix(']').unwrap()));
    }
}
