//! The `convlab` command end to end on tiny generated data: train one epoch on a subset, then
//! evaluate and predict with the run folder; and the error paths a user meets.

use crate::common;

use std::path::Path;

use common::*;

#[test]
fn train_eval_predict_on_builtin_subset() {
    let d = tmp();
    let run = d.path().join("run");
    let out = ok(&train_tiny(&run, &[]));
    assert!(out.contains("epoch   1/1"), "{out}");
    for f in [
        "recipe.toml",
        "classes.json",
        "metrics.jsonl",
        "summary.json",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    assert!(run.join("checkpoints/last.safetensors").is_file());
    assert!(run.join("checkpoints/best.safetensors").is_file());

    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    let mut keys: Vec<&str> = line
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "epoch",
            "images_per_sec",
            "images_skipped",
            "lr",
            "peak_rss_mb",
            "seconds",
            "train_loss",
            "train_top1",
            "val_balanced_top1",
            "val_loss",
            "val_macro_f1",
            "val_top1",
            "val_top5"
        ]
    );
    let top1 = line["val_top1"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&top1));
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    for k in [
        "model",
        "params",
        "epochs",
        "best_val_top1",
        "final_val_top1",
        "final_val_top5",
        "seconds",
    ] {
        assert!(summary.get(k).is_some(), "summary lacks {k}");
    }

    // eval --json: top-5 >= top-1, the confusion matrix counts every evaluated image.
    let v = eval_json(&run, &[]);
    let (t1, t5) = (v["top1"].as_f64().unwrap(), v["top5"].as_f64().unwrap());
    assert!(t5 >= t1);
    let total: u64 = v["confusion"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()))
        .sum();
    assert_eq!(total, 64);
    assert_eq!(v["per_class"].as_array().unwrap().len(), 10);
    assert!(v["per_class"][0]["class"].as_str().unwrap() == "T-shirt/top");
    // The evaluation reproduces the last epoch's validation numbers exactly.
    assert!((t1 - top1).abs() < 1e-9, "{t1} vs {top1}");

    // Readable table.
    let o = convlab()
        .args(["eval", "--run"])
        .arg(&run)
        .output()
        .unwrap();
    let text = ok(&o);
    assert!(
        text.contains("confusion matrix") && text.contains("Ankle boot"),
        "{text}"
    );

    // predict: top-5 names with probabilities for an image file.
    let img = d.path().join("shoe.png");
    image::GrayImage::from_fn(28, 28, |x, _| image::Luma([(x * 9) as u8]))
        .save(&img)
        .unwrap();
    let rgb = d.path().join("big.jpg");
    class_rgb(0, 120, 80, 1).save(&rgb).unwrap();
    let o = convlab()
        .args(["predict", "--json", "--run"])
        .arg(&run)
        .arg(&img)
        .arg(&rgb)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 2);
    let top = v[0]["top"].as_array().unwrap();
    assert_eq!(top.len(), 5);
    let p: Vec<f64> = top
        .iter()
        .map(|g| g["probability"].as_f64().unwrap())
        .collect();
    assert!(p.windows(2).all(|w| w[0] >= w[1]) && p.iter().sum::<f64>() <= 1.0 + 1e-6);

    let e = fails(
        &convlab()
            .args(["predict", "--run"])
            .arg(&run)
            .arg(d.path().join("nope.png"))
            .output()
            .unwrap(),
    );
    assert!(e.contains("nope.png"), "{e}");

    // A checkpoint that does not fit the model: clear error naming the checkpoint.
    let recipe = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    std::fs::write(
        run.join("recipe.toml"),
        recipe.replace("name = \"convnet_small\"", "name = \"bench-vgg\""),
    )
    .unwrap();
    let e = fails(
        &convlab()
            .args(["eval", "--run"])
            .arg(&run)
            .output()
            .unwrap(),
    );
    assert!(
        e.contains("best.safetensors") && e.contains("does not fit"),
        "{e}"
    );
}

#[test]
fn image_folder_of_varied_photos_trains_and_evaluates() {
    let d = tmp();
    let data = d.path().join("photos");
    write_image_folder(&data, &["red", "green", "blue"], 12);
    std::fs::write(data.join("red/corrupt.jpg"), b"garbage").unwrap();
    let run = d.path().join("run");
    // Without --skip-bad-images the corrupt file stops training, by path, and no summary is
    // written.
    let o = train_on(&data, &run, 8, &[]);
    let e = fails(&o);
    assert!(e.contains("corrupt.jpg"), "{e}");
    assert!(!run.join("summary.json").exists());

    let o = convlab()
        .args([
            "train",
            "--model",
            "convnet_small",
            "--epochs",
            "2",
            "--batch-size",
            "8",
            "--skip-bad-images",
            "--data",
        ])
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    let out = ok(&o);
    assert!(
        out.contains("skipped") && out.contains("corrupt.jpg"),
        "{out}"
    );
    let recipe = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    assert!(
        recipe.contains("in_channels = 3") && recipe.contains("input_size = 28"),
        "{recipe}"
    );
    let o = convlab()
        .args(["eval", "--json", "--checkpoint", "last", "--run"])
        .arg(&run)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v["per_class"].as_array().unwrap().len(), 3);
}

#[test]
fn cifar_and_idx_data_train() {
    let d = tmp();
    let cifar = d.path().join("cifar");
    std::fs::create_dir_all(&cifar).unwrap();
    write_cifar10(&cifar, 12);
    let run = d.path().join("run");
    let o = convlab()
        .args(["train", "--epochs", "1", "--batch-size", "16", "--data"])
        .arg(&cifar)
        .arg("--out")
        .arg(&run)
        .output()
        .unwrap();
    ok(&o);
    let recipe = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    assert!(recipe.contains("input_size = 32") && recipe.contains("in_channels = 3"));

    let idx = d.path().join("fashion");
    std::fs::create_dir_all(&idx).unwrap();
    write_idx(&idx, "train", 64, 28, true);
    write_idx(&idx, "t10k", 32, 28, true);
    let o = convlab()
        .args([
            "train",
            "--epochs",
            "1",
            "--batch-size",
            "16",
            "--data-format",
            "idx",
            "--data",
        ])
        .arg(&idx)
        .arg("--out")
        .arg(d.path().join("run2"))
        .output()
        .unwrap();
    ok(&o);
}

#[test]
fn bad_input_gives_one_clear_error() {
    let d = tmp();
    let out = d.path().join("r");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--data".into(), "/definitely/not/here".into()],
            "/definitely/not/here",
        ),
        (vec!["--model".into(), "resnet9000".into()], "convnet_small"),
        (vec!["--set".into(), "optim.lrr=0.1".into()], "optim.lrr"),
        (vec!["--set".into(), "epochs=\"ten\"".into()], "epochs"),
        (vec!["--lr=-1".into()], "optim.lr"),
        (vec!["--device".into(), "tpu".into()], "tpu"),
    ];
    for (args, needle) in cases {
        let o = convlab()
            .arg("train")
            .args(&args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let e = fails(&o);
        assert!(e.contains(needle), "{args:?}: {e}");
        assert!(
            !out.exists(),
            "{args:?}: a run that never started leaves no folder"
        );
    }
    let recipe = d.path().join("bad.toml");
    std::fs::write(&recipe, "[optim]\nmomentum = \"high\"\n").unwrap();
    let e = fails(
        &convlab()
            .args(["train", "--recipe"])
            .arg(&recipe)
            .output()
            .unwrap(),
    );
    assert!(
        e.contains("optim.momentum") && e.contains("bad.toml"),
        "{e}"
    );
    // A bad flag is clap's usage error (exit 2).
    let o = convlab().args(["train", "--epochz", "3"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    // Not a run folder.
    let e = fails(
        &convlab()
            .args(["eval", "--run"])
            .arg(d.path())
            .output()
            .unwrap(),
    );
    assert!(e.contains("recipe.toml"), "{e}");
}

#[test]
fn writing_into_an_unwritable_place_fails_cleanly() {
    let o = convlab()
        .arg("train")
        .args(TINY)
        .args(["--out", "/proc/convlab-cannot-write-here"])
        .output()
        .unwrap();
    let e = fails(&o);
    assert!(e.contains("/proc/convlab-cannot-write-here"), "{e}");
}

/// A save that fails after an epoch has been kept (here: a directory stands where epoch 2's
/// checkpoint goes) stops the run with the error, says that the last complete checkpoint is
/// kept and how to go on, and leaves that checkpoint as it was.
#[test]
fn a_failed_save_names_the_kept_checkpoint_and_the_resume() {
    let d = tmp();
    let run = p(&d, "run");
    let args = [
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--set",
        "data.limit_train=64",
        "--set",
        "data.limit_val=32",
        "--set",
        "checkpoint_every=1",
    ];
    let mut first = convlab();
    first.arg("train").args(args).arg("--out").arg(&run);
    ok(&first.args(["--stop-after-epoch", "1"]).output().unwrap());
    let last = run.join("checkpoints/last.safetensors");
    let before = std::fs::read(&last).unwrap();
    let blocker = run.join("checkpoints/epoch-2.safetensors");
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let o = convlab()
        .args(["train", "--resume"])
        .arg(&run)
        .output()
        .unwrap();
    let e = fails(&o);
    assert!(e.contains("epoch-2.safetensors"), "{e}");
    assert!(e.contains("last complete checkpoint is kept"), "{e}");
    assert!(e.contains(&format!("--resume {}", run.display())), "{e}");
    assert_eq!(
        std::fs::read(&last).unwrap(),
        before,
        "epoch 1's checkpoint changed"
    );
}

#[test]
fn stop_and_resume_equals_an_uninterrupted_run() {
    let d = tmp();
    let args = [
        "--epochs",
        "3",
        "--batch-size",
        "32",
        "--set",
        "data.limit_train=128",
        "--set",
        "data.limit_val=64",
        "--set",
        "model.dropout=0.3",
        "--set",
        "augment.crop_padding=2",
        "--set",
        "augment.crop=\"pad\"",
        "--set",
        "augment.padding_mode=\"reflect\"",
        "--set",
        "augment.erasing=0.5",
        "--set",
        "augment.contrast=0.2",
        "--set",
        "regularisation.ema_decay=0.9",
        "--set",
        "regularisation.grad_clip_norm=1.0",
        "--set",
        "schedule.kind=\"plateau\"",
        "--set",
        "schedule.patience=0",
        "--set",
        "checkpoint_every=1",
    ];
    let full = d.path().join("full");
    ok(&convlab()
        .arg("train")
        .args(args)
        .arg("--out")
        .arg(&full)
        .output()
        .unwrap());
    let part = d.path().join("part");
    ok(&convlab()
        .arg("train")
        .args(args)
        .args(["--stop-after-epoch", "1", "--out"])
        .arg(&part)
        .output()
        .unwrap());
    assert!(
        !part.join("summary.json").exists(),
        "a stopped run must not claim success"
    );
    ok(&convlab()
        .arg("train")
        .arg("--resume")
        .arg(&part)
        .output()
        .unwrap());
    let strip = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                let o = v.as_object_mut().unwrap();
                o.remove("seconds");
                o.remove("images_per_sec");
                o.remove("peak_rss_mb");
                v
            })
            .collect()
    };
    assert_eq!(strip(&full), strip(&part));
    assert!(part.join("summary.json").exists());
    // The run kept averaged (EMA) weights, which `eval` loads; the resumed run's are the same.
    let eval = |run: &Path| {
        ok(&convlab()
            .args(["eval", "--json", "--run"])
            .arg(run)
            .output()
            .unwrap())
    };
    assert_eq!(eval(&full), eval(&part));
    for e in 1..=3 {
        assert!(
            full.join(format!("checkpoints/epoch-{e}.safetensors"))
                .is_file()
        );
    }
}

#[test]
fn divergence_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint() {
    let d = tmp();
    let run = d.path().join("run");
    ok(&train_tiny(
        &run,
        &["--set", "epochs=3", "--stop-after-epoch", "1"],
    ));
    let before = std::fs::read(run.join("checkpoints/last.safetensors")).unwrap();
    let o = convlab()
        .args(["train", "--resume"])
        .arg(&run)
        .args(["--set", "optim.lr=1e30"])
        .output()
        .unwrap();
    let e = fails(&o);
    assert!(
        e.contains("diverged") && e.contains("last good checkpoint"),
        "{e}"
    );
    assert_eq!(
        std::fs::read(run.join("checkpoints/last.safetensors")).unwrap(),
        before
    );
    assert!(!run.join("summary.json").exists());
}

/// Imbalanced classes: training points at the options; class weights and the balanced sampler
/// say what they do; eval reports balanced top-1, macro F1 and per-class precision and F1.
#[test]
fn imbalanced_classes_train_with_class_weights_and_balanced_sampling() {
    let d = tmp();
    let data = d.path().join("photos");
    write_image_folder(&data, &["many", "few"], 40);
    // Leave 4 of class `few`: about 32 against 3 after the 20% validation split.
    for i in 4..40 {
        let ext = if i % 2 == 0 { "png" } else { "jpg" };
        std::fs::remove_file(data.join(format!("few/{i:03}.{ext}"))).unwrap();
    }
    let train = |out: &str, extra: &[&str]| {
        convlab()
            .args(["train", "--batch-size", "8", "--data"])
            .arg(&data)
            .arg("--out")
            .arg(d.path().join(out))
            .args(extra)
            .output()
            .unwrap()
    };
    let stats = ok(&convlab()
        .args(["data", "stats"])
        .arg(&data)
        .output()
        .unwrap());
    assert!(
        stats.contains("imbalance ratio") && stats.contains("loss.class_weights"),
        "{stats}"
    );
    let plain = ok(&train("plain", &["--epochs", "1"]));
    let adjusted = ok(&train(
        "adjusted",
        &["--epochs", "1", "--set", "loss.logit_adjustment=1"],
    ));
    assert!(
        adjusted.contains("logit adjustment: the loss sees logits + 1 * log(class prior)")
            && !adjusted.contains("classes are imbalanced"),
        "{adjusted}"
    );
    assert!(
        plain.contains("classes are imbalanced") && plain.contains("loss.class_weights"),
        "{plain}"
    );
    let o = train(
        "weighted",
        &[
            "--epochs",
            "3",
            "--set",
            "loss.class_weights=\"balanced\"",
            "--set",
            "data.sampler=\"balanced\"",
            "--set",
            "best_metric=\"val_balanced_top1\"",
        ],
    );
    let out = ok(&o);
    assert!(!out.contains("classes are imbalanced"), "{out}");
    assert!(out.contains("class-balanced sampling"), "{out}");
    // N / (K n_c): `few`'s weight is about ten times `many`'s.
    let line = out
        .lines()
        .find(|l| l.starts_with("class weights in the loss"))
        .unwrap_or_else(|| panic!("{out}"));
    let weight = |name: &str| -> f64 {
        let rest = &line[line.find(&format!("{name} ")).unwrap() + name.len() + 1..];
        rest.split(',').next().unwrap().trim().parse().unwrap()
    };
    assert!(weight("few") > 5.0 * weight("many"), "{line}");
    let recipe = std::fs::read_to_string(d.path().join("weighted/recipe.toml")).unwrap();
    assert!(
        recipe.contains("class_weights = \"balanced\"")
            && recipe.contains("sampler = \"balanced\""),
        "{recipe}"
    );
    // The best checkpoint is the first epoch of highest balanced top-1.
    let metrics = std::fs::read_to_string(d.path().join("weighted/metrics.jsonl")).unwrap();
    let balanced: Vec<f64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["val_balanced_top1"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let first_best =
        (0..balanced.len()).fold(0, |b, i| if balanced[i] > balanced[b] { i } else { b });
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("weighted/summary.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(summary["best_metric"], "val_balanced_top1");
    assert_eq!(summary["best_epoch"], first_best + 1, "{balanced:?}");
    let o = convlab()
        .args(["eval", "--json", "--run"])
        .arg(d.path().join("weighted"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    for key in ["balanced_top1", "macro_f1"] {
        let x = v[key].as_f64().unwrap_or_else(|| panic!("{key}: {v}"));
        assert!((0.0..=1.0).contains(&x), "{key} {x}");
    }
    // Classes in name order: `few` first.
    let c = &v["per_class"][0];
    assert_eq!(c["class"], "few");
    assert!(
        c["precision"].is_f64() && c["f1"].is_f64() && c["predicted"].is_u64(),
        "{c}"
    );
    // A list of the wrong length, and an unknown sampler, name their keys.
    let e = fails(&train("bad", &["--set", "loss.class_weights=[1, 2, 3]"]));
    let e2 = fails(&train("bad", &["--set", "best_metric=\"top1\""]));
    assert!(
        e2.contains("best_metric") && e2.contains("val_balanced_top1"),
        "{e2}"
    );
    assert!(
        e.contains("loss.class_weights") && e.contains("3 weights for 2"),
        "{e}"
    );
    let e = fails(&train("bad", &["--set", "data.sampler=\"weighted\""]));
    assert!(e.contains("data.sampler") && e.contains("balanced"), "{e}");
}

/// CSV label lists: `train.csv` + `val.csv` in a folder (detected), or one `.csv` file split
/// by `--val-fraction`; a label the training list lacks is an error naming the file.
#[test]
fn csv_label_lists_train_and_evaluate() {
    let d = tmp();
    let root = d.path().join("kaggle");
    write_image_folder(&root.join("images"), &["cat", "dog"], 10);
    let rows = |range: std::ops::Range<usize>| -> String {
        let mut s = String::from("id,filename,class\n");
        for class in ["cat", "dog"] {
            for i in range.clone() {
                let ext = if i % 2 == 0 { "png" } else { "jpg" };
                s += &format!("{i},images/{class}/{i:03}.{ext},{class}\n");
            }
        }
        s
    };
    std::fs::write(root.join("train.csv"), rows(0..8)).unwrap();
    std::fs::write(root.join("val.csv"), rows(8..10)).unwrap();
    let run = d.path().join("run");
    let train = |data: &Path, out: &Path| train_on(data, out, 4, &[]);
    let out = ok(&train(&root, &run));
    assert!(out.contains("16 train / 4 val images, 2 classes"), "{out}");
    let classes = std::fs::read_to_string(run.join("classes.json")).unwrap();
    assert!(
        classes.contains("\"cat\"") && classes.contains("\"dog\""),
        "{classes}"
    );
    let v = eval_json(&run, &[]);
    assert_eq!(v["count"], 4);
    // One file, split 80/20 in each class.
    let out = ok(&train(&root.join("train.csv"), &d.path().join("one")));
    assert!(out.contains("12 train / 4 val images"), "{out}");
    // A label that is not in the training list.
    std::fs::write(
        root.join("val.csv"),
        "filename,class\nimages/cat/000.png,lion\n",
    )
    .unwrap();
    let e = fails(&train(&root, &d.path().join("bad")));
    assert!(e.contains("val.csv") && e.contains("lion"), "{e}");
}
