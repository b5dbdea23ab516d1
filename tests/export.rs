//! Models out. (1) The torchvision/timm state dict convlab writes has exactly the key names and
//! shapes of PyTorch's own (`tests/fixtures/interop/*.json`, made by
//! `tools/interop_fixtures.py`), and an export imports back to identical tensors, through `.pth`
//! and `.safetensors`. The ONNX graphs are checked in `tests/onnx.rs`; the onnxruntime and
//! PyTorch checks are `tools/export_parity.py`.

use crate::common;

use common::build;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;
use convlab::interop::export::{Values, plan, state_dict, write_state_dict};
use convlab::interop::{self, Naming, naming};
use convlab::models::{ModelConfig, ModelName};
use convlab::params::{module_shapes, module_tensors};

use common::ONE_AT_A_TIME;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop")
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("convlab-export-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture_keys(file: &str) -> (ModelName, Naming, usize, Vec<(String, Vec<usize>)>) {
    let text = std::fs::read_to_string(fixtures().join(file)).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let keys = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| {
            let shape = kv[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            (kv[0].as_str().unwrap().to_string(), shape)
        })
        .collect();
    let naming = match v["naming"].as_str().unwrap() {
        "timm" => Naming::Timm,
        _ => Naming::Torchvision,
    };
    (
        ModelName::from_name(v["model"].as_str().unwrap()).unwrap(),
        naming,
        v["num_classes"].as_u64().unwrap() as usize,
        keys,
    )
}

#[test]
fn state_dicts_have_pytorchs_keys_and_shapes() {
    let mut files: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".json"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 14, "one fixture per torchvision/timm layout");
    for file in files {
        let (name, naming, classes, keys) = fixture_keys(&file);
        // Shapes only: the model is built but never initialised.
        let cfg = ModelConfig::for_model(name, classes, 3);
        let shapes = module_shapes(&cfg.build(&Device::flex()).unwrap());
        let ours: BTreeMap<String, Vec<usize>> = plan(name, naming, &shapes)
            .unwrap()
            .into_iter()
            .map(|e| (e.key, e.shape))
            .collect();
        let theirs: BTreeMap<String, Vec<usize>> = keys.into_iter().collect();
        let only_ours: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
        let only_theirs: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
        assert!(
            only_ours.is_empty() && only_theirs.is_empty(),
            "{file}: keys only convlab writes {only_ours:?}, only PyTorch has {only_theirs:?}"
        );
        assert_eq!(ours, theirs, "{file}: shapes");
    }
}

#[test]
fn exports_import_back_to_identical_tensors() {
    let dir = tmp("sd");
    use ModelName::*;
    for (name, naming) in [
        (Resnet18, Naming::Torchvision),
        (GooglenetTv, Naming::Torchvision),
        (Resnet50D, Naming::Timm),
    ] {
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let model = build(name, 7, 64);
        let sd = state_dict(&model, name, naming).unwrap();
        assert!(
            sd.iter()
                .filter(|(k, _)| k.ends_with("num_batches_tracked"))
                .all(|(_, t)| t.values == Values::I64(vec![0]))
        );
        // GoogLeNet's auxiliary heads are written but, as import documents, not read back.
        let original = module_tensors(&model);
        for ext in ["pth", "safetensors"] {
            let path = dir.join(format!("{name}.{ext}"));
            write_state_dict(&path, &sd, &BTreeMap::new()).unwrap();
            let read = interop::read_state_dict(&path).unwrap();
            assert_eq!(interop::detect_naming(&read), naming, "{name}");
            let cfg = ModelConfig::for_model(name, 7, 3);
            let back = interop::to_convlab(&cfg, naming, read, &module_shapes(&model)).unwrap();
            for (k, t) in &original {
                if naming::foreign_key(name, naming, k).is_none() {
                    continue;
                }
                assert_eq!(back.get(k), Some(t), "{name} via .{ext}: `{k}`");
            }
            std::fs::remove_file(&path).unwrap();
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn convlab_naming_round_trips_every_model_family_small() {
    let dir = tmp("own");
    for name in [
        ModelName::ConvnetSmall,
        ModelName::AlexnetSmall,
        ModelName::GooglenetSmall,
        ModelName::Resnet18Small,
    ] {
        let model = build(name, 5, name.default_input_size());
        let sd = state_dict(&model, name, Naming::Convlab).unwrap();
        let path = dir.join("m.safetensors");
        write_state_dict(&path, &sd, &BTreeMap::new()).unwrap();
        let read = interop::read_state_dict(&path).unwrap();
        assert_eq!(interop::detect_naming(&read), Naming::Convlab);
        let cfg = ModelConfig::for_model(name, 5, 3);
        let back = interop::to_convlab(&cfg, Naming::Convlab, read, &module_shapes(&model));
        assert_eq!(back.unwrap(), module_tensors(&model), "{name}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_model_a_naming_lacks_is_refused_by_name() {
    let model = build(ModelName::ConvnetSmall, 3, 28);
    let err = state_dict(&model, ModelName::ConvnetSmall, Naming::Torchvision)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("convnet_small") && err.contains("resnet18"),
        "{err}"
    );
    let dir = tmp("ext");
    let sd = state_dict(&model, ModelName::ConvnetSmall, Naming::Convlab).unwrap();
    let bad = dir.join("m.bin");
    let err = write_state_dict(&bad, &sd, &BTreeMap::new()).unwrap_err();
    assert!(err.to_string().contains(".safetensors"), "{err}");
    assert!(!bad.exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- ONNX ----
