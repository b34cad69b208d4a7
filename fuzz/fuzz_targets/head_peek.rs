//! libFuzzer entry for `checks::head_peek`; the check itself is shared with the regression test.
#![no_main]

// Each target uses one of the checks; the others are compiled but unused here.
#[allow(dead_code)]
#[path = "../checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::head_peek(data));
