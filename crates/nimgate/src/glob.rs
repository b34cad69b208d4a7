//! Model-name patterns, shared by routes and key ACLs: an exact name or a glob (`nvidia/*`,
//! `*`, `meta/llama-3.?-*`). `*` crosses `/`, because model names are `org/name` and an ACL
//! of `*` means every model. A pattern knows its literal prefix, which is how routing ranks
//! overlapping globs.

use globset::{GlobBuilder, GlobMatcher};

/// How a glob is matched. `org/*`, a literal and one trailing star, is most of what ACLs and
/// routes hold, and a prefix comparison answers it without the regex engine.
#[derive(Debug, Clone)]
pub enum Matcher {
    Prefix,
    Glob(GlobMatcher),
}

/// A compiled model pattern.
#[derive(Debug, Clone)]
pub enum ModelPattern {
    Exact(String),
    /// `*`: every model. Common enough in ACLs and catch-all routes to skip the matcher.
    Any,
    Glob {
        text: String,
        matcher: Matcher,
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
        let collapsed = collapse_stars(text);
        let matcher = if collapsed.len() == literal_prefix + 1 && collapsed.ends_with('*') {
            Matcher::Prefix
        } else {
            let glob = GlobBuilder::new(&collapsed)
                .literal_separator(false)
                .backslash_escape(true)
                .build()
                .map_err(|e| format!("invalid glob `{text}`: {}", e.kind()))?;
            Matcher::Glob(glob.compile_matcher())
        };
        Ok(Self::Glob { text: text.to_owned(), matcher, literal_prefix })
    }

    pub fn matches(&self, model: &str) -> bool {
        match self {
            Self::Exact(name) => name == model,
            Self::Any => true,
            Self::Glob { matcher: Matcher::Prefix, text, literal_prefix } => {
                model.starts_with(&text[..*literal_prefix])
            }
            Self::Glob { matcher: Matcher::Glob(matcher), .. } => matcher.is_match(model),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Exact(text) | Self::Glob { text, .. } => text,
            Self::Any => "*",
        }
    }
}

/// `**` means what `*` does: `*` already crosses `/`, and globset's path-style `**/` (which
/// also matches nothing at all) would surprise anyone writing a model pattern.
fn collapse_stars(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut escaped, mut after_star) = (false, false);
    for c in text.chars() {
        let star = c == '*' && !escaped;
        if !(star && after_star) {
            out.push(c);
        }
        after_star = star;
        escaped = c == '\\' && !escaped;
    }
    out
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
    fn a_literal_and_one_trailing_star_is_a_prefix_test() {
        assert!(matches!(glob("nvidia/*"), ModelPattern::Glob { matcher: Matcher::Prefix, .. }));
        assert!(matches!(glob("nvidia/**"), ModelPattern::Glob { matcher: Matcher::Prefix, .. }));
        assert!(matches!(glob("nvidia/*-8b"), ModelPattern::Glob { matcher: Matcher::Glob(_), .. }));
        assert!(matches!(glob(r"a\*"), ModelPattern::Glob { matcher: Matcher::Glob(_), .. }), "escapes go to globset");
        assert!(glob("nvidia/*").matches("nvidia/"));
        assert!(!glob("nvidia/*").matches("nvidia"));
    }

    #[test]
    fn literal_prefix_stops_at_the_first_metacharacter() {
        assert_eq!(glob("nvidia/llama*").literal_prefix(), "nvidia/llama".len());
        assert_eq!(glob("*").literal_prefix(), 0);
        assert_eq!(glob("a/b").literal_prefix(), 3);
    }

    /// The obvious matcher: `*` any run (slashes included), `?` any one character.
    fn reference(pattern: &[u8], name: &[u8]) -> bool {
        match (pattern.first(), name.first()) {
            (None, None) => true,
            (Some(b'*'), _) => reference(&pattern[1..], name) || (!name.is_empty() && reference(pattern, &name[1..])),
            (Some(b'?'), Some(_)) => reference(&pattern[1..], &name[1..]),
            (Some(p), Some(n)) if p == n => reference(&pattern[1..], &name[1..]),
            _ => false,
        }
    }

    proptest::proptest! {
        #[test]
        fn matches_like_the_obvious_matcher(pattern in "[ab/.*?-]{1,8}", name in "[ab/.-]{0,10}") {
            let compiled = ModelPattern::parse(&pattern).unwrap();
            proptest::prop_assert_eq!(compiled.matches(&name), reference(pattern.as_bytes(), name.as_bytes()), "{} ~ {}", pattern, name);
        }

        #[test]
        fn literal_prefix_is_a_prefix_of_every_match(pattern in "[ab/]{0,4}[*?][ab/*]{0,4}", name in "[ab/]{0,10}") {
            let compiled = ModelPattern::parse(&pattern).unwrap();
            if compiled.matches(&name) {
                let prefix = &pattern[..compiled.literal_prefix()];
                proptest::prop_assert!(name.starts_with(prefix));
            }
        }
    }

    #[test]
    fn double_stars_mean_single_stars() {
        assert!(!glob("**/").matches(""));
        assert!(glob("meta/**").matches("meta/a/b"));
        assert_eq!(collapse_stars(r"a\\**b***"), r"a\\*b*");
        assert_eq!(collapse_stars(r"a\**"), r"a\**", "an escaped star is a literal");
    }

    #[test]
    fn bad_globs_and_empty_patterns_are_errors() {
        assert!(ModelPattern::parse("meta/[abc").unwrap_err().contains("invalid glob"));
        assert!(ModelPattern::parse("").is_err());
    }
}
