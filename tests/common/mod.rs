//! Tiny datasets written in the exact real on-disk formats.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;

use burn::prelude::*;
use convlab::models::{Model, ModelConfig, ModelName};
use convlab::params::{HostTensor, TensorMap, load_module, module_shapes};
use flate2::Compression;
use flate2::write::GzEncoder;

/// The full-size models of `export.rs`, `interop.rs` and `onnx.rs` need a few GB each; they
/// take turns, across the three files (one test process runs them all).
pub static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Writes IDX image + label files (`prefix-images-idx3-ubyte[.gz]`) with `n` images of
/// `side x side`, pixel value depending on label so the data is learnable.
pub fn write_idx(dir: &Path, prefix: &str, n: usize, side: usize, gz: bool) -> Vec<u8> {
    let mut img = vec![0, 0, 8, 3];
    img.extend((n as u32).to_be_bytes());
    img.extend((side as u32).to_be_bytes());
    img.extend((side as u32).to_be_bytes());
    let mut lab = vec![0, 0, 8, 1];
    lab.extend((n as u32).to_be_bytes());
    let mut labels = Vec::new();
    for i in 0..n {
        let l = (i % 10) as u8;
        labels.push(l);
        lab.push(l);
        for p in 0..side * side {
            img.push(((l as usize * 25 + p) % 256) as u8);
        }
    }
    let ext = if gz { ".gz" } else { "" };
    write(
        &dir.join(format!("{prefix}-images-idx3-ubyte{ext}")),
        &img,
        gz,
    );
    write(
        &dir.join(format!("{prefix}-labels-idx1-ubyte{ext}")),
        &lab,
        gz,
    );
    labels
}

fn write(path: &Path, bytes: &[u8], gz: bool) {
    if gz {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(bytes).unwrap();
        std::fs::write(path, e.finish().unwrap()).unwrap();
    } else {
        std::fs::write(path, bytes).unwrap();
    }
}

/// One CIFAR record: `label_bytes` labels then R, G, B planes of 32x32.
pub fn cifar_record(labels: &[u8], rgb: [u8; 3]) -> Vec<u8> {
    let mut r = labels.to_vec();
    for c in rgb {
        r.extend(std::iter::repeat_n(c, 1024));
    }
    r
}

/// A CIFAR-10 directory with 5 train batches of `per_batch` records and a test batch.
pub fn write_cifar10(dir: &Path, per_batch: usize) {
    for b in 1..=5 {
        let mut bytes = Vec::new();
        for i in 0..per_batch {
            let l = ((b + i) % 10) as u8;
            bytes.extend(cifar_record(&[l], [l * 20, 255 - l * 20, 7]));
        }
        std::fs::write(dir.join(format!("data_batch_{b}.bin")), bytes).unwrap();
    }
    let mut bytes = Vec::new();
    for i in 0..per_batch {
        let l = (i % 10) as u8;
        bytes.extend(cifar_record(&[l], [l * 20, 255 - l * 20, 7]));
    }
    std::fs::write(dir.join("test_batch.bin"), bytes).unwrap();
}

/// An image of `w x h` whose colour depends on `class` (learnable), with some noise.
pub fn class_rgb(class: usize, w: u32, h: u32, seed: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        let n = ((x * 7 + y * 13 + seed * 31) % 40) as u8;
        match class % 3 {
            0 => image::Rgb([200 + n / 2, 30 + n, 30]),
            1 => image::Rgb([30, 200 + n / 2, 30 + n]),
            _ => image::Rgb([30 + n, 30, 200 + n / 2]),
        }
    })
}

/// An ImageFolder `root/<class>/*.{png,jpg}` with `per_class` images in each of `classes`
/// classes, of varied sizes and modes.
pub fn write_image_folder(root: &Path, classes: &[&str], per_class: usize) {
    for (c, name) in classes.iter().enumerate() {
        let d = root.join(name);
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..per_class {
            let (w, h) = (20 + (i as u32 * 7) % 30, 18 + (i as u32 * 11) % 40);
            let img = class_rgb(c, w, h, i as u32);
            let path = d.join(format!("{i:03}.{}", if i % 2 == 0 { "png" } else { "jpg" }));
            img.save(&path).unwrap();
        }
    }
}

/// Writes a PNG in palette (indexed) mode.
pub fn write_palette_png(path: &Path, w: u32, h: u32) {
    let f = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(f), w, h);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(vec![255, 0, 0, 0, 255, 0, 0, 0, 255]);
    let mut wr = enc.write_header().unwrap();
    let data: Vec<u8> = (0..w * h).map(|i| (i % 3) as u8).collect();
    wr.write_image_data(&data).unwrap();
}

/// Writes a CMYK JPEG.
pub fn write_cmyk_jpeg(path: &Path, w: u16, h: u16) {
    let data: Vec<u8> = (0..w as usize * h as usize)
        .flat_map(|i| [(i % 200) as u8, 40, 90, 10])
        .collect();
    let enc = jpeg_encoder::Encoder::new_file(path, 90).unwrap();
    enc.encode(&data, w, h, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
}

/// A temporary directory path helper.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

pub fn p(dir: &tempfile::TempDir, rel: &str) -> PathBuf {
    dir.path().join(rel)
}

/// The `convlab` binary with 2 compute threads (what CI has).
pub fn convlab() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("convlab").unwrap();
    c.env("RAYON_NUM_THREADS", "2");
    c
}

/// Asserts success and returns stdout.
pub fn ok(o: &std::process::Output) -> String {
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "command failed\nstdout:\n{out}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// Asserts a clean failure (no panic) and returns stderr.
pub fn fails(o: &std::process::Output) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "command should fail; stderr: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    err
}

/// splitmix64 of `(seed << 32) + i`, in [-1, 1): the formula `tools/interop_fixtures.py`
/// (`uniform`) fills PyTorch's tensors with, so tests can compute the same values.
pub fn uniform(n: usize, seed: u64) -> impl Iterator<Item = f64> {
    (0..n as u64).map(move |i| {
        let mut z = (i + (seed << 32)).wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 * 2f64.powi(-52) - 1.0
    })
}

/// A one-epoch run on a subset of the built-in data.
pub const TINY: &[&str] = &[
    "--epochs",
    "1",
    "--batch-size",
    "32",
    "--set",
    "data.limit_train=160",
    "--set",
    "data.limit_val=64",
];

pub fn train_tiny(out: &Path, extra: &[&str]) -> Output {
    convlab()
        .arg("train")
        .args(TINY)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// `convlab train` of `convnet_small` for one epoch, `batch` images a step, on the data at
/// `data`, into `out`, with `extra` arguments.
pub fn train_on(data: &Path, out: &Path, batch: usize, extra: &[&str]) -> Output {
    convlab()
        .args(["train", "--model", "convnet_small", "--epochs", "1"])
        .args(["--batch-size", &batch.to_string()])
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// `convlab eval --json --run RUN` with `extra` arguments, its JSON parsed (the test fails with
/// its stderr when the command does).
pub fn eval_json(run: &Path, extra: &[&str]) -> serde_json::Value {
    let o = convlab()
        .args(["eval", "--json", "--run"])
        .arg(run)
        .args(extra)
        .output()
        .unwrap();
    serde_json::from_str(&ok(&o)).unwrap()
}

/// Every tensor of `model` set from its convlab name, with BN statistics away from (0, 1) so a
/// graph that dropped or misplaced one would show.
pub fn formula_weights(model: Model) -> Model {
    let shapes = module_shapes(&model);
    let map: TensorMap = shapes
        .into_iter()
        .map(|(k, shape)| {
            let n: usize = shape.iter().product();
            let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
            let seed = k.bytes().map(|b| b as u64).sum::<u64>();
            let data = uniform(n, seed)
                .map(|u| {
                    let u = u as f32;
                    if k.ends_with("running_var") {
                        1.0 + 0.5 * u * u
                    } else if k.ends_with("running_mean") {
                        0.1 * u
                    } else if k.ends_with("gamma") {
                        0.8 + 0.2 * u
                    } else if shape.len() >= 2 {
                        // Burn's Linear is [in, out]: its fan-in is the first axis.
                        let fan = if shape.len() == 2 { shape[0] } else { fan_in };
                        u * (6.0 / fan as f32).sqrt()
                    } else {
                        0.1 * u
                    }
                })
                .collect();
            (k, HostTensor { shape, data })
        })
        .collect();
    load_module(model, map, Path::new("formula"), "formula").unwrap()
}

pub fn build(name: ModelName, classes: usize, size: usize) -> Model {
    let cfg = ModelConfig {
        input_size: size,
        ..ModelConfig::for_model(name, classes, 3)
    };
    formula_weights(cfg.build(&Device::flex()).unwrap())
}
