//! The benches live in this package's `[[bench]]` targets; see `hot_path.rs`. Run them with
//! `cargo bench -p nimgate-benches`; CI runs each once with `cargo test --benches`.
//!
//! Also what the package's two result writers share: `benches/RESULTS.md` is the load harness's
//! (`nimgate-bench` rewrites it whole) except for one marked section that `nimgate-cluster`
//! owns. Each writer replaces only its part, so running one never loses the other's figures.

/// Opens the section of `RESULTS.md` that `nimgate-cluster` writes.
pub const CLUSTER_START: &str = "<!-- cluster:start -->";
/// Closes it.
pub const CLUSTER_END: &str = "<!-- cluster:end -->";

/// The cluster section of `text`, markers included, when it has a whole one.
pub fn cluster_section(text: &str) -> Option<&str> {
    let start = text.find(CLUSTER_START)?;
    let end = start + text[start..].find(CLUSTER_END)? + CLUSTER_END.len();
    Some(&text[start..end])
}

/// `text` with its cluster section replaced by `section` (which carries its markers), or with
/// `section` appended after a blank line when `text` has none.
pub fn with_cluster_section(text: &str, section: &str) -> String {
    match cluster_section(text) {
        Some(old) => text.replacen(old, section.trim_end(), 1),
        None if text.trim().is_empty() => format!("{}\n", section.trim_end()),
        None => format!("{}\n\n{}\n", text.trim_end(), section.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECTION: &str = "<!-- cluster:start -->\n## Cluster\nfigures\n<!-- cluster:end -->\n";

    #[test]
    fn a_section_is_appended_once_and_then_replaced_in_place() {
        let harness = "# Harness\n\ntable\n";
        let first = with_cluster_section(harness, SECTION);
        assert_eq!(first, "# Harness\n\ntable\n\n<!-- cluster:start -->\n## Cluster\nfigures\n<!-- cluster:end -->\n");
        let newer = SECTION.replace("figures", "newer figures");
        let second = with_cluster_section(&first, &newer);
        assert_eq!(second, first.replace("figures", "newer figures"));
        assert_eq!(cluster_section(&second), Some(newer.trim_end()));
    }

    #[test]
    fn text_after_the_section_is_kept_and_an_unclosed_section_is_not_one() {
        let text = format!("# Harness\n\n{SECTION}\n## After\n");
        assert!(with_cluster_section(&text, SECTION).ends_with("<!-- cluster:end -->\n\n## After\n"));
        assert_eq!(cluster_section("a <!-- cluster:start --> b"), None);
        assert_eq!(with_cluster_section("", SECTION), SECTION);
    }
}
