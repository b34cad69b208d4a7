//! Model-name patterns, shared by routes and key ACLs: an exact name or a glob (`nvidia/*`,
//! `*`, `meta/llama-3.?-*`). `*` crosses `/`, because model names are `org/name` and an ACL
//! of `*` means every model. A pattern knows its literal prefix, which is how routing ranks
//! overlapping globs.

use globset::{GlobBuilder, GlobMatcher};

/// A compiled model pattern.
#[derive(Debug, Clone)]
pub enum ModelPattern {
    Exact(String),
    /// `*`: every model. Common enough in ACLs and catch-all routes to skip the matcher.
    Any,
    Glob {
        text: String,
        matcher: GlobMatcher,
        /// Length in bytes of the literal text before the first glob metacharacter.
        literal_prefix: usize,
    },
}

impl ModelPattern {
    /// Length in bytes of the literal text before the first metacharacter: the rank of a
    /// glob route among overlapping globs. An exact name is all literal.
    pub fn literal_prefix(&self) -> usize {
        match self {
            Self::Exact(name) => name.len(),
            Self::Any => 0,
            Self::Glob { literal_prefix, .. } => *literal_prefix,
        }
    }

    /// Compiles `text`; a text without metacharacters is an exact name.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.is_empty() {
            return Err("must not be empty".into());
        }
        if text == "*" {
            return Ok(Self::Any);
        }
        let Some(literal_prefix) = text.find(is_meta) else {
            return Ok(Self::Exact(text.to_owned()));
        };
        let glob = GlobBuilder::new(text)
            .literal_separator(false)
            .backslash_escape(true)
            .build()
            .map_err(|e| format!("invalid glob `{text}`: {}", e.kind()))?;
        Ok(Self::Glob { text: text.to_owned(), matcher: glob.compile_matcher(), literal_prefix })
    }

    pub fn matches(&self, model: &str) -> bool {
        match self {
            Self::Exact(name) => name == model,
            Self::Any => true,
            Self::Glob { matcher, .. } => matcher.is_match(model),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Exact(text) | Self::Glob { text, .. } => text,
            Self::Any => "*",
        }
    }
}

fn is_meta(c: char) -> bool {
    matches!(c, '*' | '?' | '[' | ']' | '{' | '}' | '\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(text: &str) -> ModelPattern {
        ModelPattern::parse(text).unwrap()
    }

    #[test]
    fn plain_names_are_exact() {
        assert!(matches!(glob("meta/llama-3.1-8b-instruct"), ModelPattern::Exact(_)));
        assert!(glob("a/b").matches("a/b"));
        assert!(!glob("a/b").matches("a/bc"));
    }

    #[test]
    fn star_crosses_slashes_and_matches_everything() {
        assert!(glob("*").matches("meta/llama-3.1-8b-instruct"));
        assert!(glob("nvidia/*").matches("nvidia/llama-3.1-nemotron-70b-instruct"));
        assert!(glob("nvidia/*").matches("nvidia/a/b"));
        assert!(!glob("nvidia/*").matches("meta/llama"));
        assert!(glob("meta/llama-3.?-*").matches("meta/llama-3.1-8b"));
    }

    #[test]
    fn literal_prefix_stops_at_the_first_metacharacter() {
        assert_eq!(glob("nvidia/llama*").literal_prefix(), "nvidia/llama".len());
        assert_eq!(glob("*").literal_prefix(), 0);
        assert_eq!(glob("a/b").literal_prefix(), 3);
    }

    #[test]
    fn bad_globs_and_empty_patterns_are_errors() {
        assert!(ModelPattern::parse("meta/[abc").unwrap_err().contains("invalid glob"));
        assert!(ModelPattern::parse("").is_err());
    }
}
