//! `convlab import` and `train --pretrained` end to end: a torchvision-named state dict (made
//! here from the formula of tests/interop.rs and torchvision's key list in the fixtures) turns
//! into a run folder that eval, predict and fine-tuning read; bad weights files are clear
//! errors that write nothing.

use crate::common;

use std::path::{Path, PathBuf};

use common::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop")
}

/// torchvision resnet18 (7 classes) as a safetensors file in torchvision's naming, every
/// tensor a smooth pseudo-random pattern.
fn write_resnet18(path: &Path) {
    let text = std::fs::read_to_string(fixtures().join("resnet18.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut data: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for kv in v["keys"].as_array().unwrap() {
        let name = kv[0].as_str().unwrap();
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let shape: Vec<usize> = kv[1]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        let n: usize = shape.iter().product();
        let fan: usize = shape.iter().skip(1).product();
        let vals: Vec<f32> = (0..n)
            .map(|i| {
                let u = ((i as f64) * 0.61 + name.len() as f64).sin();
                if name.ends_with("running_var") {
                    1.0 + 0.2 * u as f32
                } else if shape.len() >= 2 {
                    (u * (3.0 / fan as f64).sqrt()) as f32
                } else if name.ends_with("weight") {
                    1.0
                } else {
                    (0.05 * u) as f32
                }
            })
            .collect();
        data.push((
            name.to_string(),
            shape,
            vals.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn import_eval_predict_and_finetune() {
    let d = tmp();
    let weights = d.path().join("resnet18_tv.safetensors");
    write_resnet18(&weights);
    let classes = d.path().join("classes.txt");
    std::fs::write(&classes, "a\nb\nc\nd\ne\nf\ng\n").unwrap();
    let run = d.path().join("imported");
    let out = ok(&convlab()
        .arg("import")
        .arg(&weights)
        .args(["--model", "resnet18", "--input-size", "32", "--out"])
        .arg(&run)
        .arg("--classes")
        .arg(&classes)
        .output()
        .unwrap());
    assert!(
        out.contains("torchvision naming") && out.contains("7 classes"),
        "{out}"
    );
    for f in ["recipe.toml", "classes.json", "stats.json", "summary.json"] {
        assert!(run.join(f).is_file(), "{f}");
    }
    assert!(run.join("checkpoints/best.safetensors").is_file());
    let recipe = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    assert!(
        recipe.contains("0.485") && recipe.contains("0.229"),
        "ImageNet mean/std: {recipe}"
    );
    assert!(
        recipe.contains("input_size = 32") && recipe.contains("resize = 37"),
        "{recipe}"
    );
    let summary = std::fs::read_to_string(run.join("summary.json")).unwrap();
    assert!(summary.contains("resnet18_tv.safetensors"), "{summary}");

    // predict and eval read it like any run.
    let img = d.path().join("x.png");
    class_rgb(1, 40, 30, 2).save(&img).unwrap();
    let out = ok(&convlab()
        .args(["predict", "--json", "--run"])
        .arg(&run)
        .arg(&img)
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["top"].as_array().unwrap().len(), 5);
    let photos = d.path().join("photos");
    write_image_folder(&photos, &["a", "b", "c", "d", "e", "f", "g"], 3);
    let out = ok(&convlab()
        .args(["eval", "--json", "--run"])
        .arg(&run)
        .arg("--data")
        .arg(&photos)
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["count"].as_u64().unwrap() > 0);

    // Fine-tune on 3 classes: the classifier is re-initialised, the rest loads; the input
    // size and normalisation come from the source run.
    let three = d.path().join("three");
    write_image_folder(&three, &["x", "y", "z"], 8);
    for (from, what) in [(&run, "run"), (&weights, "file")] {
        let ft = d.path().join(format!("ft-{what}"));
        let out = ok(&convlab()
            .args([
                "train",
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--model",
                "resnet18",
            ])
            .arg("--data")
            .arg(&three)
            .arg("--pretrained")
            .arg(from)
            .arg("--out")
            .arg(&ft)
            .output()
            .unwrap());
        assert!(
            out.contains("classifier re-initialised for 3 classes (the weights have 7)"),
            "{what}: {out}"
        );
        let r = std::fs::read_to_string(ft.join("recipe.toml")).unwrap();
        assert!(r.contains("0.485"), "{what}: ImageNet statistics kept: {r}");
        if what == "run" {
            assert!(
                r.contains("input_size = 32"),
                "the source run's input size: {r}"
            );
        } else {
            assert!(
                r.contains("input_size = 224"),
                "a file's model default: {r}"
            );
        }
    }
}

#[test]
fn bad_weights_are_clear_errors_and_write_nothing() {
    let d = tmp();
    let weights = d.path().join("r18.safetensors");
    write_resnet18(&weights);
    let bytes = std::fs::read(&weights).unwrap();
    let cut = d.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let wrong_lines = d.path().join("two.txt");
    std::fs::write(&wrong_lines, "a\nb\n").unwrap();
    let text = d.path().join("notes.pth");
    std::fs::write(&text, "just some text, not weights").unwrap();
    let whole = fixtures().join("whole_module.pth");
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec![
                cut.display().to_string(),
                "--model".into(),
                "resnet18".into(),
            ],
            vec!["cut.safetensors"],
        ),
        (
            vec![
                weights.display().to_string(),
                "--model".into(),
                "resnet34".into(),
            ],
            vec!["resnet34", "missing keys", "layer1.2.conv1.weight"],
        ),
        (
            vec![
                weights.display().to_string(),
                "--model".into(),
                "resnet50".into(),
            ],
            vec!["resnet50", "wrong shapes", "[7, 512]"],
        ),
        (
            vec![
                weights.display().to_string(),
                "--model".into(),
                "vgg11_small".into(),
            ],
            vec!["vgg11_small", "torchvision naming has no model"],
        ),
        (
            vec![
                weights.display().to_string(),
                "--model".into(),
                "resnet18".into(),
                "--classes".into(),
                wrong_lines.display().to_string(),
            ],
            vec!["two.txt", "2 class names", "7 outputs"],
        ),
        (
            vec![
                text.display().to_string(),
                "--model".into(),
                "resnet18".into(),
            ],
            vec!["notes.pth", "not a PyTorch"],
        ),
        (
            vec![
                whole.display().to_string(),
                "--model".into(),
                "resnet18".into(),
            ],
            vec!["whole_module.pth", "state_dict()"],
        ),
    ];
    for (args, needles) in cases {
        let out = d.path().join("out");
        let o = convlab()
            .arg("import")
            .args(&args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let e = fails(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        for n in needles {
            assert!(e.contains(n), "{args:?}: `{n}` not in {e}");
        }
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
}

/// A frozen backbone keeps every pretrained tensor (batch-norm statistics included) while the
/// classifier learns; unfreezing at epoch 2 trains everything; stop + resume equals the
/// uninterrupted run.
#[test]
fn frozen_backbone_and_exact_resume() {
    let d = tmp();
    let weights = d.path().join("r18.safetensors");
    write_resnet18(&weights);
    let src = d.path().join("src");
    ok(&convlab()
        .arg("import")
        .arg(&weights)
        .args(["--model", "resnet18", "--input-size", "32", "--out"])
        .arg(&src)
        .output()
        .unwrap());
    let photos = d.path().join("photos");
    write_image_folder(&photos, &["x", "y", "z"], 8);
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            "--recipe",
            "recipes/finetune.toml",
            "--epochs",
            "3",
            "--batch-size",
            "8",
            "--set",
            "finetune.freeze=\"backbone\"",
            "--set",
            "finetune.unfreeze_epoch=2",
            "--set",
            "checkpoint_every=1",
            "--pretrained",
            src.to_str().unwrap(),
            "--data",
            photos.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };
    let full = d.path().join("full");
    let out = ok(&convlab()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args(&full))
        .output()
        .unwrap());
    assert!(
        out.contains("epoch 1: backbone frozen") && out.contains("epoch 2: every layer trains"),
        "{out}"
    );
    let load = |p: PathBuf| convlab::train::checkpoint::load(&p).unwrap().take("model");
    let before = load(src.join("checkpoints/best.safetensors"));
    let e1 = load(full.join("checkpoints/epoch-1.safetensors"));
    let e2 = load(full.join("checkpoints/epoch-2.safetensors"));
    let mut frozen = 0;
    for (k, t) in &e1 {
        if k.starts_with("ResNet.fc.") {
            continue;
        }
        assert_eq!(t, &before[k], "{k} changed while frozen");
        frozen += 1;
        if k.ends_with("conv.weight") || k.ends_with("running_mean") {
            assert_ne!(t, &e2[k], "{k} did not train after unfreezing");
        }
    }
    assert_eq!(frozen, 100);
    assert_ne!(e1["ResNet.fc.bias"].data.len(), 0);
    let part = d.path().join("part");
    let mut a = args(&part);
    a.extend(["--stop-after-epoch".to_string(), "1".to_string()]);
    ok(&convlab()
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(a)
        .output()
        .unwrap());
    ok(&convlab()
        .args(["train", "--resume"])
        .arg(&part)
        .output()
        .unwrap());
    let strip = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                for k in ["seconds", "images_per_sec", "peak_rss_mb"] {
                    v.as_object_mut().unwrap().remove(k);
                }
                v
            })
            .collect()
    };
    assert_eq!(strip(&full), strip(&part));
    assert_eq!(
        load(full.join("checkpoints/last.safetensors")),
        load(part.join("checkpoints/last.safetensors"))
    );
}

fn read_sample(path: &Path) -> (Vec<f32>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let f = |k: &str| -> Vec<f32> {
        st.tensor(k)
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    (f("input"), f("logits"))
}

/// `convlab export`: an imported torchvision run goes out as `.pth` and `.safetensors` in
/// torchvision's naming and comes back in with the same logits; ONNX and convlab's own naming
/// from a trained run; and every bad request fails naming what is wrong, writing nothing.
#[test]
fn export_round_trips_and_refuses_bad_requests() {
    let d = tmp();
    let weights = d.path().join("resnet18_tv.safetensors");
    write_resnet18(&weights);
    let run = d.path().join("imported");
    ok(&convlab()
        .arg("import")
        .arg(&weights)
        .args(["--model", "resnet18", "--input-size", "32", "--out"])
        .arg(&run)
        .output()
        .unwrap());
    let (_, want) = {
        let out = d.path().join("orig.safetensors");
        ok(&convlab()
            .arg("export")
            .arg(&run)
            .args(["--format", "safetensors", "--sample", "--out"])
            .arg(&out)
            .output()
            .unwrap());
        read_sample(&d.path().join("orig.safetensors.sample.safetensors"))
    };
    for ext in ["pth", "safetensors"] {
        let out = d.path().join(format!("tv.{ext}"));
        let text = ok(&convlab()
            .arg("export")
            .arg(&run)
            .args(["--format", "torchvision", "--out"])
            .arg(&out)
            .output()
            .unwrap());
        assert!(text.contains("torchvision naming"), "{text}");
        let json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(d.path().join(format!("tv.{ext}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(json["input_size"], serde_json::json!([3, 32, 32]));
        assert_eq!(json["num_classes"], 7);
        assert_eq!(json["torchvision"]["num_classes"], 7);
        assert_eq!(json["resize"], 37);
        assert!((json["mean"][0].as_f64().unwrap() - 0.485).abs() < 1e-6);
        // Back in, the same model computes the same logits on the same input.
        let back = d.path().join(format!("back-{ext}"));
        ok(&convlab()
            .arg("import")
            .arg(&out)
            .args(["--model", "resnet18", "--input-size", "32", "--out"])
            .arg(&back)
            .output()
            .unwrap());
        let again = d.path().join(format!("again-{ext}.onnx"));
        ok(&convlab()
            .arg("export")
            .arg(&back)
            .args(["--format", "onnx", "--sample", "--out"])
            .arg(&again)
            .output()
            .unwrap());
        let (_, got) = read_sample(
            &d.path()
                .join(format!("again-{ext}.onnx.sample.safetensors")),
        );
        assert_eq!(got, want, "via .{ext}");
        let graph = convlab::onnx::decode(std::fs::read(&again).unwrap()).unwrap();
        assert_eq!(graph.opset_import[0].version, 17);
    }

    // Bad requests: each names the problem, exits 1, and leaves no file behind.
    let not_run = d.path().join("empty");
    std::fs::create_dir_all(&not_run).unwrap();
    let pth = d.path().join("x.pth");
    let args = |from: &Path, format: &str, out: &Path| -> Vec<String> {
        let (from, out) = (from.display().to_string(), out.display().to_string());
        vec![from, "--format".into(), format.into(), "--out".into(), out]
    };
    let cases = [
        (
            args(&not_run, "onnx", &d.path().join("x.onnx")),
            "recipe.toml",
        ),
        (args(&run, "keras", &pth), "keras"),
        (args(&run, "onnx", &pth), ".onnx"),
        (
            args(&run, "timm", &d.path().join("no/such/dir/x.pth")),
            "does not exist",
        ),
    ];
    for (args, needle) in cases {
        let err = fails(&convlab().arg("export").args(&args).output().unwrap());
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!pth.exists() && !d.path().join("x.onnx").exists());

    // A model torchvision does not have, from a trained run: named, nothing written; its
    // ONNX and convlab-named exports work.
    let small = d.path().join("small");
    write_image_folder(&d.path().join("photos"), &["a", "b"], 4);
    ok(&convlab()
        .args([
            "train",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--model",
            "convnet_small",
            "--data",
        ])
        .arg(d.path().join("photos"))
        .arg("--out")
        .arg(&small)
        .output()
        .unwrap());
    let tv = d.path().join("small.pth");
    let err = fails(
        &convlab()
            .arg("export")
            .arg(&small)
            .args(["--format", "torchvision", "--out"])
            .arg(&tv)
            .output()
            .unwrap(),
    );
    assert!(
        err.contains("convnet_small") && err.contains("resnet18"),
        "{err}"
    );
    assert!(!tv.exists() && !d.path().join("small.pth.json").exists());
    let onnx = d.path().join("small.onnx");
    ok(&convlab()
        .arg("export")
        .arg(&small)
        .args(["--format", "onnx", "--out"])
        .arg(&onnx)
        .output()
        .unwrap());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("small.onnx.json")).unwrap())
            .unwrap();
    assert_eq!(json["classes"], serde_json::json!(["a", "b"]));
    assert_eq!(json["onnx"]["input"], "input");
}
