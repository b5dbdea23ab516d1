//! Weights from PyTorch load into convlab with identical layouts: for every torchvision-layout
//! model (and timm's resnet50d) the fixtures in `tests/fixtures/interop/` hold torchvision's key
//! names and shapes and the logits PyTorch computed with every tensor set by a formula
//! (`tools/interop_fixtures.py`); this test computes the same formula, maps the tensors into
//! convlab's model and must reproduce the logits within 1e-4 of their scale. The small `.pth`
//! and `.safetensors` files check the reader on real PyTorch containers.

use crate::common;

use common::uniform;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use convlab::interop::{self, Naming, StateDict};
use convlab::models::{ModelConfig, ModelName};
use convlab::train::checkpoint::{HostTensor, TensorMap};

use common::ONE_AT_A_TIME;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop")
}

/// `fill` of tools/interop_fixtures.py: every tensor's values from its name and shape.
fn formula(name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let seed = name.bytes().map(|b| b as u64).sum::<u64>();
    let fan_in: usize = shape.iter().skip(1).product();
    uniform(n, seed)
        .map(|u| {
            let v = if name.ends_with("running_var") {
                1.0 + 0.5 * u * u
            } else if name.ends_with("running_mean") {
                0.1 * u
            } else if shape.len() >= 2 {
                u * (6.0 / fan_in as f64).sqrt()
            } else if name.ends_with("weight") {
                0.6 + 0.1 * u
            } else {
                0.1 * u
            };
            v as f32
        })
        .collect()
}

struct Fixture {
    model: ModelName,
    naming: Naming,
    classes: usize,
    input: Vec<usize>,
    keys: Vec<(String, Vec<usize>)>,
    logits: Vec<f32>,
}

fn fixture(name: &str) -> Fixture {
    let text = std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let usizes = |v: &serde_json::Value| -> Vec<usize> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect()
    };
    Fixture {
        model: ModelName::from_name(v["model"].as_str().unwrap()).unwrap(),
        naming: match v["naming"].as_str().unwrap() {
            "timm" => Naming::Timm,
            _ => Naming::Torchvision,
        },
        classes: v["num_classes"].as_u64().unwrap() as usize,
        input: usizes(&v["input_shape"]),
        keys: v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|kv| (kv[0].as_str().unwrap().to_string(), usizes(&kv[1])))
            .collect(),
        logits: v["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect(),
    }
}

/// The fixture's state dict, every tensor by the formula (the BN step counters left out, as
/// they are integers in PyTorch's file too).
fn state_dict(f: &Fixture, name: &str) -> StateDict {
    let tensors: TensorMap = f
        .keys
        .iter()
        .filter(|(k, _)| !k.ends_with("num_batches_tracked"))
        .map(|(k, s)| {
            (
                k.clone(),
                HostTensor {
                    shape: s.clone(),
                    data: formula(k, s),
                },
            )
        })
        .collect();
    StateDict {
        path: PathBuf::from(format!("{name}.formula")),
        format: "formula",
        tensors,
    }
}

fn cfg(f: &Fixture) -> ModelConfig {
    ModelConfig {
        input_size: f.input[2],
        ..ModelConfig::for_model(f.model, f.classes, 3)
    }
}

/// convlab's logits for the fixture's state dict and input.
fn logits(f: &Fixture, sd: StateDict) -> Vec<f32> {
    let device = Device::flex();
    let loaded = interop::load_weights(&cfg(f), sd, Some(f.naming), &device).unwrap();
    assert_eq!(loaded.source_classes, f.classes);
    let n: usize = f.input.iter().product();
    let x: Vec<f32> = uniform(n, 12345).map(|v| v as f32).collect();
    let x = Tensor::<4>::from_data(
        TensorData::new(x, [f.input[0], f.input[1], f.input[2], f.input[3]]),
        &device,
    );
    loaded
        .model
        .forward(x)
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

/// Largest |difference| over the logits' scale.
fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
        / scale
}

fn parity(names: &[&str]) {
    for name in names {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let f = fixture(name);
        let ours = logits(&f, state_dict(&f, name));
        let d = rel_diff(&ours, &f.logits);
        assert!(
            d <= 1e-4,
            "{name}: max |convlab - PyTorch| is {d} of the logits' scale"
        );
    }
}

#[test]
fn resnets_match_pytorch() {
    parity(&["resnet18", "resnet34", "resnet50", "resnet50_d"]);
}

#[test]
fn alexnet_and_googlenet_match_pytorch() {
    parity(&["alexnet", "googlenet_tv"]);
}

#[test]
fn plain_vggs_match_pytorch() {
    parity(&["vgg11", "vgg13", "vgg16", "vgg19"]);
}

#[test]
fn batch_norm_vggs_match_pytorch() {
    parity(&["vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]);
}

/// The comparison is sensitive: one tensor 1% off, or two convs' weights swapped, is caught.
#[test]
fn a_wrong_mapping_would_be_caught() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let f = fixture("resnet18");
    let mut sd = state_dict(&f, "resnet18");
    for v in sd
        .tensors
        .get_mut("layer3.0.conv1.weight")
        .unwrap()
        .data
        .iter_mut()
    {
        *v *= 1.01;
    }
    assert!(rel_diff(&logits(&f, sd), &f.logits) > 1e-3);
    let mut sd = state_dict(&f, "resnet18");
    let a = sd.tensors.remove("layer1.0.conv1.weight").unwrap();
    let b = sd.tensors.remove("layer1.0.conv2.weight").unwrap();
    sd.tensors.insert("layer1.0.conv1.weight".into(), b);
    sd.tensors.insert("layer1.0.conv2.weight".into(), a);
    assert!(rel_diff(&logits(&f, sd), &f.logits) > 1e-3);
}

/// Another architecture's state dict, a missing key and a wrong shape: errors naming keys.
#[test]
fn mismatched_state_dicts_are_errors_naming_the_keys() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex();
    let f = fixture("resnet18");
    let target = ModelConfig {
        input_size: 64,
        ..ModelConfig::for_model(ModelName::Resnet34, 7, 3)
    };
    let e = interop::load_weights(&target, state_dict(&f, "resnet18"), None, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("missing keys") && e.contains("layer1.2.conv1.weight"),
        "{e}"
    );
    let mut sd = state_dict(&f, "resnet18");
    sd.tensors.remove("layer4.1.bn2.running_var");
    sd.tensors.insert(
        "extra.weight".into(),
        HostTensor {
            shape: vec![1],
            data: vec![0.],
        },
    );
    let e = interop::load_weights(&cfg(&f), sd, None, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("`layer4.1.bn2.running_var`") && e.contains("`extra.weight`"),
        "{e}"
    );
    let mut sd = state_dict(&f, "resnet18");
    sd.tensors.get_mut("layer2.0.conv1.weight").unwrap().shape = vec![128, 64, 1, 9];
    let e = interop::load_weights(&cfg(&f), sd, None, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("wrong shapes") && e.contains("layer2.0.conv1.weight"),
        "{e}"
    );
    // A class count that differs re-initialises only the classifier.
    let five = ModelConfig {
        num_classes: 5,
        ..cfg(&f)
    };
    let l = interop::load_weights(&five, state_dict(&f, "resnet18"), None, &device).unwrap();
    assert_eq!((l.source_classes, l.model.num_classes()), (7, 5));
    // A model torchvision does not have.
    let small = ModelConfig::for_model(ModelName::Resnet18Small, 7, 3);
    let e = interop::load_weights(&small, state_dict(&f, "resnet18"), None, &device)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("resnet18_small") && e.contains("torchvision naming has no model"),
        "{e}"
    );
}

fn small_expected() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("conv.weight", vec![4, 3, 3, 3]),
        ("bn.weight", vec![4]),
        ("bn.bias", vec![4]),
        ("bn.running_mean", vec![4]),
        ("bn.running_var", vec![4]),
        ("fc.weight", vec![2, 4]),
    ]
}

#[test]
fn pytorch_containers_are_read() {
    for (file, tol) in [
        ("small_zip.pth", 0.0),
        ("small_legacy.pth", 0.0),
        ("small_nested.pth", 0.0),
        ("small.safetensors", 0.0),
        ("small_f16.pth", 1e-3),
    ] {
        let sd = interop::read_state_dict(&fixtures().join(file)).unwrap();
        let keys: Vec<&String> = sd.tensors.keys().collect();
        assert_eq!(
            keys.len(),
            6,
            "{file}: {keys:?} (num_batches_tracked is dropped)"
        );
        for (k, shape) in small_expected() {
            let t = &sd.tensors[k];
            assert_eq!(t.shape, shape, "{file}: {k}");
            let want = formula(k, &shape);
            let d = t
                .data
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d <= tol, "{file}: {k} differs by {d}");
        }
    }
    // A transposed view is read as its logical values.
    let sd = interop::read_state_dict(&fixtures().join("small_strided.pth")).unwrap();
    let t = &sd.tensors["fc.weight"];
    assert_eq!(t.shape, vec![2, 4]);
    let src = formula("fc.weight", &[4, 2]);
    for i in 0..2 {
        for j in 0..4 {
            assert_eq!(t.data[i * 4 + j], src[j * 2 + i]);
        }
    }
}

#[test]
fn bad_weight_files_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let e = interop::read_state_dict(&fixtures().join("whole_module.pth"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("whole_module.pth") && e.contains("state_dict()"),
        "{e}"
    );
    let good = std::fs::read(fixtures().join("small_zip.pth")).unwrap();
    let cut = d.path().join("truncated.pth");
    std::fs::write(&cut, &good[..good.len() / 2]).unwrap();
    let e = interop::read_state_dict(&cut).err().unwrap().to_string();
    assert!(e.contains("truncated.pth"), "{e}");
    let png = d.path().join("photo.pth");
    std::fs::write(&png, b"\x89PNG\r\n\x1a\n0000000000").unwrap();
    let e = interop::read_state_dict(&png).err().unwrap().to_string();
    assert!(
        e.contains("photo.pth") && e.contains("not a PyTorch"),
        "{e}"
    );
    let legacy = std::fs::read(fixtures().join("small_legacy.pth")).unwrap();
    let cut = d.path().join("legacy_cut.pth");
    std::fs::write(&cut, &legacy[..legacy.len() - 40]).unwrap();
    let e = interop::read_state_dict(&cut).err().unwrap().to_string();
    assert!(e.contains("legacy_cut.pth"), "{e}");
}
