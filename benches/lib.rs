//! The benches live in this package's `[[bench]]` targets; see `hot_path.rs`. Run them with
//! `cargo bench -p nimgate-benches`; CI runs each once with `cargo test --benches`.
