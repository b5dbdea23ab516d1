//! The data pipeline end to end: the papers' augmentations on an RGB ImageFolder, the
//! statistics stored in the run folder, test-time augmentation in `convlab eval`, and the
//! loader benchmark.

use crate::common;

use common::*;

#[test]
fn augmented_rgb_run_stores_stats_and_evaluates_with_every_tta() {
    let d = tmp();
    let data = d.path().join("photos");
    write_image_folder(&data, &["red", "green", "blue"], 12);
    let run = d.path().join("run");
    let cache = d.path().join("cache");
    ok(&convlab()
        .env("CONVLAB_CACHE_DIR", &cache)
        .args(["train", "--model", "convnet_small", "--epochs", "2"])
        .args(["--batch-size", "8", "--data"])
        .arg(&data)
        .args(["--set", "model.input_size=16"])
        .args(["--set", "augment.crop=\"resized\""])
        .args(["--set", "augment.scale=[0.25, 1.0]"])
        .args(["--set", "augment.pca_lighting=0.1"])
        .args(["--set", "augment.brightness=0.3"])
        .args(["--set", "augment.saturation=0.3"])
        .args(["--set", "augment.hue=0.05"])
        .args(["--set", "augment.vflip=0.5"])
        .args(["--set", "augment.erasing=0.5"])
        .args(["--set", "augment.interpolation=\"bicubic\""])
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap());
    // The statistics: in stats.json, in the resolved recipe, and in the cache.
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["mean"].as_array().unwrap().len(), 3);
    assert_eq!(stats["pca"]["eigval"].as_array().unwrap().len(), 3);
    let recipe = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    assert!(recipe.contains("[data.pca]"), "{recipe}");
    assert_eq!(std::fs::read_dir(cache.join("stats")).unwrap().count(), 1);

    let eval = |tta: &str, extra: &[&str]| -> serde_json::Value {
        let o = convlab()
            .args(["eval", "--run"])
            .arg(&run)
            .args(["--tta", tta, "--json"])
            .args(extra)
            .output()
            .unwrap();
        serde_json::from_str(&ok(&o)).unwrap()
    };
    let center = eval("center", &[]);
    assert_eq!(center["tta"]["views"], 1);
    assert_eq!(center["tta"]["gain_top1"], 0.0);
    assert_eq!(center["top1"], center["tta"]["single_top1"]);
    for (tta, views) in [("flip", 2), ("ten-crop", 10)] {
        let v = eval(tta, &[]);
        assert_eq!(v["tta"]["views"], views, "{v}");
        assert_eq!(v["tta"]["single_top1"], center["top1"]);
        let top1 = v["top1"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&top1));
        assert_eq!(v["count"], center["count"]);
    }
    let ms = eval("multi-scale", &["--scales", "16,20"]);
    assert_eq!(ms["tta"]["views"], 4, "{ms}");
    // Text mode reports the gain over the single crop.
    let o = convlab()
        .args(["eval", "--run"])
        .arg(&run)
        .args(["--tta", "flip"])
        .output()
        .unwrap();
    assert!(ok(&o).contains("single crop: top1"));
    let o = convlab()
        .args(["eval", "--run"])
        .arg(&run)
        .args(["--tta", "twelve-crop"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("ten-crop"), "{err}");
}

#[test]
fn bad_augment_values_name_their_key() {
    let d = tmp();
    for (set, key) in [
        ("augment.crop_padding=4", "augment.crop_padding"),
        ("augment.scale=[0.9, 0.1]", "augment.scale"),
        ("augment.crop=\"zoom\"", "augment.crop"),
        ("eval.tta=\"all\"", "eval.tta"),
    ] {
        let o = convlab()
            .args(["train", "--epochs", "1", "--set", set, "--out"])
            .arg(d.path().join("x"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(key), "{set}: {err}");
    }
}

#[test]
fn loader_bench_reports_its_keys() {
    let d = tmp();
    let data = d.path().join("photos");
    write_image_folder(&data, &["a", "b"], 10);
    for t in ["cifar", "imagenet"] {
        let o = convlab()
            .args([
                "bench",
                "data",
                "--transform",
                t,
                "--size",
                "24",
                "--json",
                "--data",
            ])
            .arg(&data)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
        assert_eq!(v["images"], 20);
        assert!(v["images_per_sec"].as_f64().unwrap() > 0.0);
        for k in ["workers", "seconds", "images_per_sec_per_worker", "size"] {
            assert!(v.get(k).is_some(), "{k}: {v}");
        }
    }
}
