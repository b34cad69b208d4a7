//! What the sim answers on NIM's reranking API (`POST /v1/ranking`, as the
//! `nvidia/nv-rerankqa-*` NIMs serve it): the request's query and passages, and the rankings, best
//! first. A logit is a plain function of the words a passage shares with the query, so a test can
//! predict the order. Kept apart from `reply` because reranking shares nothing with generation.

use std::collections::HashSet;
use std::fmt::Write;

use bytes::Bytes;
use serde_json::Value;

/// A reranking request's texts: the query and the passages, in the order sent.
pub struct Ranking {
    query: String,
    passages: Vec<String>,
}

impl Ranking {
    /// Reads `{"text": ...}` from `query` and each element of `passages`. Fails, with the message
    /// of NIM's 400, when the query has no text or the passages are not a non-empty array of
    /// `{"text": ...}`.
    pub fn read(query: Option<&Value>, passages: Option<&Value>) -> Result<Self, &'static str> {
        let text = |value: &Value| value.get("text").and_then(Value::as_str).map(str::to_owned);
        let query = query.and_then(text).ok_or("`query` must be an object with a string `text`")?;
        let passages = match passages.and_then(Value::as_array) {
            Some(passages) if !passages.is_empty() => passages.iter().map(text).collect::<Option<Vec<_>>>(),
            _ => None,
        };
        let passages = passages.ok_or("`passages` must be a non-empty array of objects with a string `text`")?;
        Ok(Self { query, passages })
    }

    /// `(index, logit)` of every passage, by logit descending, ties by index.
    pub fn rankings(&self) -> Vec<(usize, f64)> {
        let query: HashSet<String> = words(&self.query).collect();
        let mut rankings: Vec<(usize, f64)> =
            self.passages.iter().enumerate().map(|(index, passage)| (index, logit(&query, passage))).collect();
        rankings.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        rankings
    }

    /// `{"rankings":[{"index":i,"logit":f},...],"usage":{...}}`, NIM's answer with an
    /// OpenAI-style usage of `prompt_tokens`.
    pub fn answer(&self, prompt_tokens: u64) -> Bytes {
        let rankings = self.rankings();
        let mut body = String::with_capacity(48 + rankings.len() * 32);
        body.push_str(r#"{"rankings":["#);
        for (n, (index, logit)) in rankings.iter().enumerate() {
            let sep = if n > 0 { "," } else { "" };
            // Debug of an f64 keeps the `.0` of whole numbers, so every logit reads as a float.
            let _ = write!(body, r#"{sep}{{"index":{index},"logit":{logit:?}}}"#);
        }
        let _ = write!(body, r#"],"usage":{{"prompt_tokens":{prompt_tokens},"total_tokens":{prompt_tokens}}}}}"#);
        Bytes::from(body)
    }
}

/// The words of `text`: maximal runs of letters and digits, lowercased.
fn words(text: &str) -> impl Iterator<Item = String> + '_ {
    text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()).map(str::to_lowercase)
}

/// The logit of `passage` for a query of the distinct words `query`: the query words the passage
/// contains minus those it lacks, so from -(query words) for no match to +(query words) for all.
pub fn logit(query: &HashSet<String>, passage: &str) -> f64 {
    let passage: HashSet<String> = words(passage).collect();
    let shared = query.iter().filter(|word| passage.contains(*word)).count();
    // Counts of words in a request body are far below 2^52, so the conversions are exact.
    (2 * shared) as f64 - query.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ranking(query: &str, passages: &[&str]) -> Ranking {
        let passages: Vec<Value> = passages.iter().map(|p| json!({ "text": p })).collect();
        Ranking::read(Some(&json!({ "text": query })), Some(&Value::from(passages))).unwrap()
    }

    #[test]
    fn a_logit_counts_query_words_present_minus_absent_whatever_the_case_and_punctuation() {
        let query: HashSet<String> = words("What is the GPU's memory?").collect();
        assert_eq!(query.len(), 6, "what is the gpu s memory");
        assert_eq!(logit(&query, "The memory of the GPU: what it is, and its s."), 6.0);
        assert_eq!(logit(&query, "memory, memory, memory"), -4.0, "a word counts once");
        assert_eq!(logit(&query, ""), -6.0);
        assert_eq!(logit(&HashSet::new(), "anything"), 0.0);
    }

    #[test]
    fn rankings_go_by_logit_descending_then_index() {
        let r = ranking("fast gpu inference", &["slow cpu", "gpu inference", "fast gpu", "fast inference gpu"]);
        assert_eq!(r.rankings(), [(3, 3.0), (1, 1.0), (2, 1.0), (0, -3.0)]);
        let answer: Value = serde_json::from_slice(&r.answer(9)).unwrap();
        assert_eq!(answer["rankings"][0], json!({ "index": 3, "logit": 3.0 }));
        assert_eq!(answer["usage"], json!({ "prompt_tokens": 9, "total_tokens": 9 }));
        assert!(std::str::from_utf8(&r.answer(9)).unwrap().contains(r#""logit":-3.0}"#));
    }

    #[test]
    fn a_query_without_text_or_passages_without_texts_are_refused() {
        let passages = json!([{ "text": "a" }]);
        assert!(Ranking::read(Some(&json!({ "text": "q" })), Some(&passages)).is_ok());
        assert!(Ranking::read(None, Some(&passages)).is_err());
        assert!(Ranking::read(Some(&json!("q")), Some(&passages)).is_err());
        for bad in [json!([]), json!(["a"]), json!([{ "text": 1 }]), json!({ "text": "a" })] {
            assert!(Ranking::read(Some(&json!({ "text": "q" })), Some(&bad)).is_err(), "{bad}");
        }
    }
}
