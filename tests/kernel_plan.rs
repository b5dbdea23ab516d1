//! The kernel plan pinned: for every convolution of every registered model (at its default
//! input size, and resnet18/resnet50/vgg16 also at 128 and 224 px), the algorithm of the
//! forward pass, the input gradient and the weight gradient, on AVX-512 (fp32 and bf16), AMX
//! (bf16), AVX2 and a CPU with neither. The geometries come from the models' own shape trace. A changed
//! rule shows up as a diff of `tests/fixtures/kernel_plan.txt`; after measuring the change,
//! regenerate it with `CONVLAB_BLESS=1 cargo test --release --test integration kernel_plan::`.

use burn::prelude::*;
use convlab::kernels::Precision;
use convlab::kernels::plan::{Cpu, Tiles, plan};
use convlab::layers::kernel_geometry;
use convlab::models::{ModelConfig, ModelName};
use convlab::onnx::ConvLayer;

const COLUMNS: [(&str, Tiles, bool, Precision); 5] = [
    ("avx512", Tiles::Avx512, false, Precision::Fp32),
    ("avx512-bf16", Tiles::Avx512, false, Precision::Bf16),
    ("amx-bf16", Tiles::Avx512, true, Precision::Bf16),
    ("avx2", Tiles::Avx2, false, Precision::Fp32),
    ("none", Tiles::None, false, Precision::Fp32),
];

fn row(c: &ConvLayer) -> String {
    let cells: Vec<String> = COLUMNS
        .iter()
        .map(|&(name, tiles, amx, precision)| {
            let choice = match kernel_geometry(c, 1, precision) {
                Some(g) => {
                    let p = plan(&g, Cpu { tiles, amx });
                    format!(
                        "{}/{}/{}",
                        p.forward.as_str(),
                        p.input_grad.as_str(),
                        p.weight_grad.as_str()
                    )
                }
                None => "burn".into(),
            };
            format!("{name} {choice}")
        })
        .collect();
    format!(
        "{}->{} {}x{}/{} g{} at {}x{}: {}",
        c.cin,
        c.cout,
        c.kernel[0],
        c.kernel[1],
        c.stride[0],
        c.groups,
        c.hw[0],
        c.hw[1],
        cells.join(", ")
    )
}

fn table() -> String {
    let mut out = String::from(
        "# model size: conv geometry: forward/input-gradient/weight-gradient per CPU column \
         (count, first layer)\n",
    );
    let mut runs: Vec<(ModelName, usize)> = ModelName::ALL
        .iter()
        .map(|&n| (n, ModelConfig::for_model(n, 10, 3).input_size))
        .collect();
    for name in ["resnet18", "resnet50", "vgg16"] {
        let n = ModelName::from_name(name).unwrap();
        runs.push((n, 128));
        runs.push((n, 224));
    }
    for (name, size) in runs {
        let mut cfg = ModelConfig::for_model(name, 10, 3);
        cfg.input_size = size;
        // Built lazily: the trace reads shapes only, no weight is initialised.
        let model = cfg.build(&Device::flex()).unwrap();
        let trace = model.trace([3, size, size]);
        let mut rows: Vec<(String, usize, String)> = Vec::new();
        for c in trace.convs() {
            let r = row(c);
            match rows.iter_mut().find(|(x, _, _)| *x == r) {
                Some(e) => e.1 += 1,
                None => rows.push((r, 1, c.name.clone())),
            }
        }
        for (r, n, first) in rows {
            out.push_str(&format!("{name} {size}: {r} (x{n}, {first})\n"));
        }
    }
    out
}

#[test]
fn every_zoo_convolution_has_its_pinned_plan() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/kernel_plan.txt");
    let got = table();
    if std::env::var_os("CONVLAB_BLESS").is_some() {
        std::fs::write(&path, &got).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    if got != want {
        let diff: Vec<String> = got
            .lines()
            .zip(want.lines().chain(std::iter::repeat("")))
            .filter(|(g, w)| g != w)
            .take(5)
            .map(|(g, w)| format!("  now:    {g}\n  pinned: {w}"))
            .collect();
        panic!(
            "the kernel plan changed ({} vs {} lines); first differences:\n{}\n\
             if intended (and measured), rerun with CONVLAB_BLESS=1",
            got.lines().count(),
            want.lines().count(),
            diff.join("\n")
        );
    }
}
