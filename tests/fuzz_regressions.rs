//! The fuzz targets' checks (`fuzz/checks.rs`) run on every input kept under
//! `fuzz/regressions/<target>/`: findings once fixed and seeds worth keeping. `cargo test`
//! replays them without libFuzzer, so a fixed finding stays fixed; `scripts/fuzz` seeds the
//! fuzzers from the same directories.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;

#[path = "../fuzz/checks.rs"]
mod checks;

/// Runs `check` on each file of `fuzz/regressions/<target>/`, naming every file that fails
/// (each one's panic is printed above the list).
fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("a readable directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no inputs in {}", dir.display());
    let mut failed = Vec::new();
    for file in files {
        let data = std::fs::read(&file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
            failed.push(format!("{} (hex {hex})", file.display()));
        }
    }
    assert!(failed.is_empty(), "{target} fails on:\n{}", failed.join("\n"));
}

#[test]
fn head_peek_regressions_pass() {
    replay("head_peek", checks::head_peek);
}

#[test]
fn sse_scanners_regressions_pass() {
    replay("sse_scanners", checks::sse_scanners);
}

#[test]
fn globs_regressions_pass() {
    replay("globs", checks::globs);
}

#[test]
fn config_parse_regressions_pass() {
    replay("config_parse", checks::config_parse);
}
