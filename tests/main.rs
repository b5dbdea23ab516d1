//! convlab's integration tests, one crate: every file of `tests/` is a module here (filter by
//! it: `cargo test --release --test integration cli::`), but `step.rs`, a crate and a process of
//! its own because it compares two training runs drawn from the device's random stream, which
//! is the process's (`Cargo.toml`, `[[test]]`). One crate instead of one per file halves the
//! tests' build (BENCHMARKS.md "One test binary").
//!
//! What the modules share in this process, and so must not change under another test's feet:
//! the device's random stream (only `step.rs` depends on its draws), the activation dtype of
//! bf16 models (`kernels::select_activations`, flipped only by `precision.rs`, which restores
//! it), the environment and the working directory (no test here sets them; the CLI tests give
//! the spawned binary its own).

mod common;

mod cli;
mod cli_tools;
mod data_pipeline;
mod experiment;
mod export;
mod fuzz_readers;
mod import;
mod interop;
mod kernel_plan;
mod layering;
mod models;
mod onnx;
mod precision;
mod readers;
mod recipes;
mod robustness;
mod viz;

/// A file of `tests/` that is neither a module above nor a test target of its own in
/// `Cargo.toml` would never be compiled (`autotests = false`), and its tests would pass by
/// not running.
#[test]
fn every_test_file_is_compiled() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let main = std::fs::read_to_string(dir.join("main.rs")).unwrap();
    let manifest = std::fs::read_to_string(dir.parent().unwrap().join("Cargo.toml")).unwrap();
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".rs"))
        else {
            continue;
        };
        let module = main.lines().any(|l| l.trim() == format!("mod {stem};"));
        let target = manifest.contains(&format!("path = \"tests/{stem}.rs\""));
        if stem != "main" && !module && !target {
            missing.push(format!("tests/{stem}.rs"));
        }
    }
    assert!(
        missing.is_empty(),
        "{missing:?}: add `mod NAME;` to tests/main.rs (or a [[test]] to Cargo.toml)"
    );
}
