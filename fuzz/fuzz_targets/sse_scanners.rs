//! libFuzzer entry for `checks::sse_scanners`; the check itself is shared with the regression test.
#![no_main]

// Each target uses one of the checks; the others are compiled but unused here.
#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::sse_scanners(data));
