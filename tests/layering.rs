//! The library's layering, enforced: each top-level module may use only modules of a lower
//! layer (the brief's order: helpers -> data -> kernels -> layers -> models -> train/eval ->
//! recipe -> pipeline -> viz/report/experiment/bench -> cli). A new top-level module must be
//! given a layer here; a `crate::X` reference that climbs or stays sideways fails with the
//! file and line. (`../shared/tools/module-cycles` checks for cycles; this is stricter.)

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const LAYERS: &[(&str, u32)] = &[
    ("error", 0),
    ("limits", 1),
    ("helpers", 1),
    ("data", 2),
    ("kernels", 2),
    ("onnx", 2),
    ("params", 2),
    ("checkpoint", 3),
    ("run", 2),
    ("layers", 3),
    ("models", 4),
    ("interop", 5),
    ("train", 5),
    ("eval", 5),
    ("recipe", 6),
    ("pipeline", 7),
    ("viz", 8),
    ("bench", 8),
    ("experiment", 8),
    ("report", 9),
];

fn rust_files(p: &Path, out: &mut Vec<PathBuf>) {
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            rust_files(&e.unwrap().path(), out);
        }
    } else if p.extension().is_some_and(|e| e == "rs") {
        out.push(p.to_path_buf());
    }
}

/// The top-level modules a line names through `crate::X` or `crate::{X, Y::..}`.
fn referenced(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + 7..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.push(name);
            }
        } else {
            out.push(
                rest.chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect(),
            );
        }
    }
    out
}

#[test]
fn top_level_modules_use_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let layer: BTreeMap<&str, u32> = LAYERS.iter().copied().collect();
    let mut problems = Vec::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_stem().unwrap().to_string_lossy().into_owned();
        if ["lib", "main", "cli"].contains(&name.as_str()) {
            continue;
        }
        let Some(&mine) = layer.get(name.as_str()) else {
            problems.push(format!(
                "src/{name}: a new top-level module; give it a layer in tests/layering.rs"
            ));
            continue;
        };
        let mut files = Vec::new();
        rust_files(&p, &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or("");
                for dep in referenced(code) {
                    if dep == name {
                        continue;
                    }
                    if let Some(&theirs) = layer.get(dep.as_str())
                        && theirs >= mine
                    {
                        problems.push(format!(
                            "{}:{}: `{name}` (layer {mine}) uses `{dep}` (layer {theirs})",
                            f.strip_prefix(&src).unwrap().display(),
                            n + 1
                        ));
                    }
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "layering broken:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_reference_scanner_sees_groups() {
    assert_eq!(
        referenced("use crate::{data::Dataset, models::Model};"),
        ["data", "models"]
    );
    assert_eq!(referenced("let x = crate::helpers::host(t);"), ["helpers"]);
}

/// Exactly one implementation of Burn's module walk: `src/params.rs`. Everything else
/// (checkpoints, EMA, optimiser, init, parameter counts, filter maps, tests) goes through
/// `params::visit` / `params::map`, so the layer kind comes from Burn's container type in one
/// place instead of being guessed from field names in eight.
#[test]
fn one_named_tensor_walk() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    rust_files(&root.join("tests"), &mut files);
    rust_files(&root.join("examples"), &mut files);
    let mut walkers = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let n = text
            .lines()
            .filter(|l| l.trim_start().starts_with("impl"))
            .filter(|l| l.contains("ModuleVisitor for") || l.contains("ModuleMapper for"))
            .count();
        if n > 0 {
            walkers.push(format!("{} ({n})", f.strip_prefix(root).unwrap().display()));
        }
    }
    assert_eq!(
        walkers,
        ["src/params.rs (2)"],
        "module walks outside params"
    );
}

/// Models are built from layers, and only layers call the kernels: a model written with a
/// kernel call (or a plain `conv.forward` next to one) would pick the fast path by itself.
#[test]
fn models_use_layers_not_kernels() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src/models"), &mut files);
    let mut problems = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            if referenced(code).iter().any(|m| m == "kernels") {
                problems.push(format!(
                    "{}:{}",
                    f.strip_prefix(root).unwrap().display(),
                    n + 1
                ));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "models call kernels: {}",
        problems.join(", ")
    );
}
