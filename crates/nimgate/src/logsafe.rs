//! Client strings made safe for a log line: cut to `MAX_LOGGED` bytes and every control
//! character escaped, so that a model name cannot forge a line (`\n`), colour a terminal
//! (ESC), hide a field (NUL) or turn one request into a megabyte of log. Used for anything a
//! client chose that a log line or an error message repeats.

use std::borrow::Cow;
use std::fmt::{self, Display, Write};

/// The most of one client string a log line or error message repeats.
pub const MAX_LOGGED: usize = 256;

/// `text` cut to at most `MAX_LOGGED` bytes (at a character boundary), marked with `…` when
/// cut. Borrowed when short enough.
pub fn clip(text: &str) -> Cow<'_, str> {
    if text.len() <= MAX_LOGGED {
        return Cow::Borrowed(text);
    }
    let mut end = MAX_LOGGED;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(format!("{}…", &text[..end]))
}

/// Displays `T` with control characters escaped (`\n`, `\u{1b}`, ...) and cut after
/// `MAX_LOGGED` bytes of output.
pub struct Clean<T>(pub T);

impl<T: Display> Display for Clean<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = Escaping { out: f, written: 0, cut: false };
        // A cut ends the writing with an error from `Escaping`, not from `f`.
        let _ = write!(out, "{}", self.0);
        if out.cut { out.out.write_str("…") } else { Ok(()) }
    }
}

struct Escaping<'a, 'b> {
    out: &'a mut fmt::Formatter<'b>,
    written: usize,
    cut: bool,
}

impl Write for Escaping<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            if self.written >= MAX_LOGGED {
                self.cut = true;
                return Err(fmt::Error);
            }
            if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') {
                for e in c.escape_default() {
                    self.out.write_char(e)?;
                }
                self.written += 6;
            } else {
                self.out.write_char(c)?;
                self.written += c.len_utf8();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_strings_cut() {
        let forged = "llama\n2026-12-03T00:00:00Z INFO nimgate::access: key=admin\u{1b}[31m\0";
        let shown = Clean(forged).to_string();
        assert!(!shown.chars().any(char::is_control), "{shown}");
        assert!(shown.contains("\\n") && shown.contains("\\u{1b}") && shown.contains("\\u{0}"), "{shown}");
        let long = "m".repeat(1 << 20);
        assert_eq!(Clean(&long).to_string().len(), MAX_LOGGED + "…".len());
        assert_eq!(clip(&long).len(), MAX_LOGGED + "…".len());
        assert_eq!(clip("meta/llama"), "meta/llama");
        assert_eq!(clip(&"é".repeat(200)).len(), 256 + "…".len(), "cut at a character boundary");
    }
}
