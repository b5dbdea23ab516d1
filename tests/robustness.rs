//! A run is never lost, whatever the input: one writer per run folder, no silent overwrite,
//! bounded sizes, per-image errors, and messages that say what is wrong with what. One test
//! per case of issue 21, on tiny generated data.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;

/// One finished tiny run on the built-in data, shared by the tests that only read it.
fn shared_run() -> &'static Path {
    static RUN: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, p) = RUN.get_or_init(|| {
        let d = tmp();
        let run = d.path().join("run");
        ok(&train_tiny(&run, &[]));
        (d, run)
    });
    p
}

fn metrics_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .count()
}

/// Case 1: training onto a finished run is refused unless --resume or --overwrite is given.
#[test]
fn training_onto_an_existing_run_is_refused_without_overwrite() {
    let d = tmp();
    let run = d.path().join("ow");
    ok(&train_tiny(&run, &["--set", "epochs=2"]));
    assert_eq!(metrics_lines(&run), 2);
    let recipe = std::fs::read(run.join("recipe.toml")).unwrap();
    let last = std::fs::read(run.join("checkpoints/last.safetensors")).unwrap();
    let e = fails(&train_tiny(&run, &[]));
    assert!(
        e.contains("already holds a run") && e.contains("--resume") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(
        metrics_lines(&run),
        2,
        "the refused run must not touch the folder"
    );
    assert_eq!(std::fs::read(run.join("recipe.toml")).unwrap(), recipe);
    assert_eq!(
        std::fs::read(run.join("checkpoints/last.safetensors")).unwrap(),
        last
    );
    let o = train_tiny(&run, &["--overwrite"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--overwrite: deleting"));
    assert_eq!(metrics_lines(&run), 1);
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["epochs"], 1, "the summary is the new run's");
    // --overwrite needs an explicit --out: it never applies to a generated folder.
    let o = convlab().args(["train", "--overwrite"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

/// Case 2: a second writer into the same folder is refused at once, naming the holder's pid,
/// and the first completes intact.
#[test]
fn two_trainings_into_one_folder_the_second_is_refused() {
    let d = tmp();
    let run = d.path().join("both");
    let mut first = std::process::Command::new(assert_cmd::cargo::cargo_bin("convlab"))
        .env("RAYON_NUM_THREADS", "2")
        .args(["train", "--epochs", "3", "--batch-size", "32"])
        .args([
            "--set",
            "data.limit_train=600",
            "--set",
            "data.limit_val=64",
        ])
        .arg("--out")
        .arg(&run)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = first.id().to_string();
    // Wait until the first holds the lock (it writes its pid into the lock file).
    let lock = run.join(".lock");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != pid {
        assert!(
            t0.elapsed().as_secs() < 60,
            "the first training never took the lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let e = fails(&train_tiny(&run, &[]));
    assert!(
        e.contains("in use by process") && e.contains(&pid) && e.contains("both"),
        "{e}"
    );
    let status = first.wait().unwrap();
    assert!(status.success(), "the first training must complete");
    assert_eq!(metrics_lines(&run), 3);
    let recipe = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    assert!(recipe.contains("limit_train = 600"), "{recipe}");
    // What eval measures is what the summary says.
    let out = ok(&convlab()
        .args(["eval", "--json", "--run"])
        .arg(&run)
        .output()
        .unwrap());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert!((v["top1"].as_f64().unwrap() - s["best_val_top1"].as_f64().unwrap()).abs() < 1e-9);
}

/// The default run folder never collides, even for two runs started in the same second.
#[test]
fn default_run_folders_are_unique() {
    let d = tmp();
    for _ in 0..2 {
        ok(&convlab()
            .current_dir(d.path())
            .arg("train")
            .args(TINY)
            .args(["--set", "data.limit_train=40", "--set", "data.limit_val=20"])
            .output()
            .unwrap());
    }
    let runs: Vec<_> = std::fs::read_dir(d.path().join("runs")).unwrap().collect();
    assert_eq!(runs.len(), 2);
}

fn folder_with_bad_train_image(root: &Path) {
    write_image_folder(&root.join("train"), &["cat", "dog"], 6);
    write_image_folder(&root.join("val"), &["cat", "dog"], 3);
    std::fs::write(root.join("train/cat/zero.jpg"), b"").unwrap();
    std::fs::write(root.join("val/dog/broken.png"), b"\x89PNG\r\n\x1a\nrubbish").unwrap();
}

/// Case 3: --skip-bad-images covers the training split too, and the count is in metrics and
/// summary.
#[test]
fn skip_bad_images_covers_the_training_split() {
    let d = tmp();
    let data = d.path().join("data");
    folder_with_bad_train_image(&data);
    let run = d.path().join("run");
    let base = [
        "train",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--model",
        "convnet_small",
    ];
    let e = fails(
        &convlab()
            .args(base)
            .arg("--data")
            .arg(&data)
            .arg("--out")
            .arg(&run)
            .output()
            .unwrap(),
    );
    assert!(e.contains("zero.jpg") && e.contains("cannot decode"), "{e}");
    let o = convlab()
        .args(base)
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&run)
        .arg("--skip-bad-images")
        .output()
        .unwrap();
    let out = ok(&o);
    assert!(out.contains("undecodable images skipped"), "{out}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(s["images_skipped"], 2, "one bad file in each split");
    let m: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(m["images_skipped"], 2);
}

/// Cases 4, 5 and 10: sizes from the user are bounded before anything is allocated or spawned.
#[test]
fn sizes_are_bounded_before_allocation() {
    let d = tmp();
    let out = d.path().join("r");
    let started = std::time::Instant::now();
    for (args, needles) in [
        (vec!["--threads", "100000"], vec!["--threads", "1024"]),
        (vec!["--threads", "2000"], vec!["--threads"]),
        (
            vec!["--set", "model.plan=\"99999999999\""],
            vec!["model.plan", "16384"],
        ),
        (
            vec![
                "--set",
                "model.plan=\"8192,8192,8192,8192,8192,8192,8192,8192,8192,8192\"",
            ],
            vec!["model.plan", "parameters"],
        ),
        (
            vec!["--set", "model.input_size=100000"],
            vec!["model.input_size", "1024"],
        ),
        (vec!["--set", "data.workers=100000"], vec!["data.workers"]),
        (
            vec!["--set", "data.cache_mb=99999999999999"],
            vec!["data.cache_mb"],
        ),
        (vec!["--batch-size", "100000000"], vec!["batch_size"]),
        (
            vec!["--epochs", "18446744073709551615"],
            vec!["--epochs", "too large"],
        ),
    ] {
        let o = convlab()
            .arg("train")
            .args(&args)
            .arg("--out")
            .arg(&out)
            .output()
            .unwrap();
        let e = fails(&o);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {e}");
        for n in needles {
            assert!(e.contains(n), "{args:?}: `{n}` not in: {e}");
        }
        assert!(!e.contains("integer `-1`"), "{e}");
        assert!(
            !out.join("recipe.toml").exists(),
            "{args:?} left a run behind"
        );
    }
    assert!(
        started.elapsed().as_secs() < 60,
        "bad sizes must fail at once"
    );
    let run = shared_run();
    let e = fails(
        &convlab()
            .args([
                "eval",
                "--tta",
                "multi-scale",
                "--scales",
                "100000",
                "--run",
            ])
            .arg(run)
            .output()
            .unwrap(),
    );
    assert!(e.contains("eval.scales") && e.contains("1024"), "{e}");
    // Zero or absurd counts are usage errors (exit 2) naming the flag.
    for args in [
        vec!["data", "stats", "--size", "1000000"],
        vec!["data", "stats", "--size", "0"],
        vec!["bench", "train", "--batch", "0"],
        vec!["bench", "train", "--input", "3x100000x100000"],
    ] {
        let o = convlab().args(&args).output().unwrap();
        let e = fails(&o);
        assert!(e.contains("--"), "{args:?}: {e}");
    }
    let r = run.to_str().unwrap();
    for args in [
        vec!["viz", "top-patches", "--run", r, "--k", "0"],
        vec!["viz", "top-patches", "--run", r, "--channels", "0"],
        vec!["viz", "top-patches", "--run", r, "--images", "0"],
        vec!["predict", "--run", r, "--top", "0", "x.png"],
    ] {
        let o = convlab().args(&args).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("0 is not in 1.."), "{args:?}: {e}");
    }
}

/// Case 6: a symlink loop inside a data folder is followed once, with a warning; duplicates
/// across train and val are reported.
#[cfg(unix)]
#[test]
fn symlink_loops_are_followed_once_and_duplicates_reported() {
    let d = tmp();
    let data = d.path().join("data");
    write_image_folder(&data, &["cat", "dog"], 10);
    std::os::unix::fs::symlink(".", data.join("cat/loop")).unwrap();
    let run = d.path().join("run");
    let o = train_on(&data, &run, 4, &[]);
    let err = ok(&o);
    assert!(err.contains("read once only"), "{err}");
    assert!(
        err.contains("16 train / 4 val images"),
        "20 images, not 820: {err}"
    );

    // Pre-split data where val/ links into train/: the shared files are reported.
    let split = d.path().join("split");
    write_image_folder(&split.join("train"), &["cat", "dog"], 6);
    std::fs::create_dir_all(split.join("val")).unwrap();
    std::os::unix::fs::symlink(split.join("train/cat"), split.join("val/cat")).unwrap();
    std::os::unix::fs::symlink(split.join("train/dog"), split.join("val/dog")).unwrap();
    let splits = convlab::data::open(&convlab::data::DataSpec {
        path: Some(split.clone()),
        format: None,
        val_fraction: 0.2,
        seed: 1,
        limit_train: None,
        limit_val: None,
    })
    .unwrap();
    let w = splits.warnings.join("\n");
    assert!(w.contains("12 image(s) are in both"), "{w}");
}

/// Case 7: predict reports each image on its own and exits non-zero after printing.
#[test]
fn predict_reports_every_image_and_fails_after() {
    let d = tmp();
    let run = shared_run();
    let good1 = d.path().join("good1.png");
    let good2 = d.path().join("good2.png");
    class_rgb(0, 28, 28, 1).save(&good1).unwrap();
    class_rgb(1, 30, 20, 2).save(&good2).unwrap();
    let bad = d.path().join("corrupt.jpg");
    std::fs::write(&bad, b"\xff\xd8\xffnot a jpeg").unwrap();
    let o = convlab()
        .args(["predict", "--run"])
        .arg(run)
        .args([&good1, &bad, &good2])
        .output()
        .unwrap();
    let e = fails(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(e.contains("1 of 3 images"), "{e}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("good1.png") && out.contains("good2.png"),
        "{out}"
    );
    assert!(out.contains("corrupt.jpg\n  error:"), "{out}");
    assert_eq!(
        out.matches('%').count(),
        10,
        "top-5 for each good image: {out}"
    );
    let o = convlab()
        .args(["predict", "--json", "--run"])
        .arg(run)
        .args([&good1, &bad, &good2])
        .output()
        .unwrap();
    fails(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 3);
    assert_eq!(a[0]["top"].as_array().unwrap().len(), 5);
    assert!(a[1]["error"].as_str().unwrap().contains("corrupt.jpg"));
    assert!(a[1].get("top").is_none());
    assert_eq!(a[2]["top"].as_array().unwrap().len(), 5);
}

/// predict reads folders (every image at any depth, other files ignored) batch by batch: five
/// images in batches of two give the probabilities the files give named one by one in one
/// batch, in the folder's order; a folder without images is an error naming it.
#[test]
fn predict_reads_folders_in_batches() {
    let d = tmp();
    let run = shared_run();
    let photos = d.path().join("photos");
    std::fs::create_dir_all(photos.join("later/deeper")).unwrap();
    let files = [
        photos.join("a.png"),
        photos.join("b.png"),
        photos.join("later/c.png"),
        photos.join("later/deeper/d.png"),
        photos.join("later/e.png"),
    ];
    for (i, f) in files.iter().enumerate() {
        class_rgb(i % 3, 28 + i as u32, 28, i as u32)
            .save(f)
            .unwrap();
    }
    std::fs::write(photos.join("notes.txt"), "not an image").unwrap();
    let json = |args: &[&std::path::Path], batch: &str| -> Vec<serde_json::Value> {
        let o = convlab()
            .args(["predict", "--json", "--batch", batch, "--run"])
            .arg(run)
            .args(args)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
        v.as_array().unwrap().clone()
    };
    let by_folder = json(&[&photos], "2");
    let named: Vec<&std::path::Path> = files.iter().map(|f| f.as_path()).collect();
    let by_name = json(&named, "64");
    assert_eq!(by_folder.len(), 5);
    let mut seen: Vec<String> = by_folder
        .iter()
        .map(|p| p["image"].as_str().unwrap().to_string())
        .collect();
    seen.sort();
    let mut want: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    want.sort();
    assert_eq!(seen, want);
    for p in &by_folder {
        let q = by_name.iter().find(|q| q["image"] == p["image"]).unwrap();
        let (tp, tq) = (p["top"].as_array().unwrap(), q["top"].as_array().unwrap());
        assert_eq!(tp.len(), 5);
        for (gp, gq) in tp.iter().zip(tq) {
            assert_eq!(gp["index"], gq["index"]);
            let (a, b) = (
                gp["probability"].as_f64().unwrap(),
                gq["probability"].as_f64().unwrap(),
            );
            assert!((a - b).abs() < 1e-5, "{}: {a} vs {b}", p["image"]);
        }
    }
    // The same order on every call.
    let again = json(&[&photos], "3");
    let order = |v: &[serde_json::Value]| -> Vec<String> {
        v.iter()
            .map(|p| p["image"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(order(&by_folder), order(&again));

    let empty = d.path().join("empty");
    std::fs::create_dir_all(empty.join("sub")).unwrap();
    std::fs::write(empty.join("sub/readme.md"), "x").unwrap();
    let e = fails(
        &convlab()
            .args(["predict", "--run"])
            .arg(run)
            .arg(&empty)
            .output()
            .unwrap(),
    );
    assert!(e.contains("empty") && e.contains("no images found"), "{e}");
}

/// `predict --tta flip` gives each image the mean of its own probabilities and its mirror
/// image's (PNGs at the model's input size, so no resampling stands between the two), class by
/// class.
#[test]
fn predict_tta_flip_averages_an_image_and_its_mirror() {
    let d = tmp();
    let run = shared_run();
    let img = class_rgb(1, 28, 28, 5);
    let (plain, mirror) = (d.path().join("plain.png"), d.path().join("mirror.png"));
    img.save(&plain).unwrap();
    image::imageops::flip_horizontal(&img)
        .save(&mirror)
        .unwrap();
    let probs = |tta: &str, path: &std::path::Path| -> Vec<f64> {
        let o = convlab()
            .args(["predict", "--json", "--top", "10", "--tta", tta, "--run"])
            .arg(run)
            .arg(path)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
        let mut by_class = vec![0.0; 10];
        for g in v[0]["top"].as_array().unwrap() {
            by_class[g["index"].as_u64().unwrap() as usize] = g["probability"].as_f64().unwrap();
        }
        by_class
    };
    let (a, b) = (probs("center", &plain), probs("center", &mirror));
    let flip = probs("flip", &plain);
    // The shared run is barely trained: its classes differ by hundredths, the mirror by 1e-5.
    assert!(
        a.iter().zip(&b).any(|(a, b)| (a - b).abs() > 1e-5),
        "the mirror differs: {a:?} {b:?}"
    );
    for c in 0..10 {
        let mean = (a[c] + b[c]) / 2.0;
        assert!(
            (flip[c] - mean).abs() < 1e-7,
            "class {c}: {} vs {mean}",
            flip[c]
        );
    }
}

/// Case 8: ensemble weights must be finite, non-negative and not all zero.
#[test]
fn ensemble_weights_are_checked() {
    let r = shared_run().to_str().unwrap().to_string();
    for w in ["-1,1", "0,0", "NaN,1", "inf,1"] {
        let o = convlab()
            .args(["ensemble", &r, &r, &format!("--weights={w}")])
            .output()
            .unwrap();
        let e = fails(&o);
        assert!(e.contains("--weights"), "{w}: {e}");
    }
}

/// Case 9: each message says what is wrong with what, where.
#[test]
fn messages_name_what_is_wrong() {
    let d = tmp();
    // A divergence in the first epoch keeps nothing, and says so.
    let run = d.path().join("lr");
    let e = fails(&train_tiny(&run, &["--lr", "1e30"]));
    assert!(
        e.contains("diverged") && e.contains("no epoch had finished"),
        "{e}"
    );
    assert!(!e.contains("kept in"), "{e}");
    assert!(!run.exists());
    // A file given as a run folder.
    let png = d.path().join("some_file.png");
    class_rgb(0, 8, 8, 0).save(&png).unwrap();
    let e = fails(
        &convlab()
            .args(["eval", "--run"])
            .arg(&png)
            .output()
            .unwrap(),
    );
    assert!(
        e.contains("a file, not a folder") && !e.contains("no such file"),
        "{e}"
    );
    // An unknown --set key is blamed on --set.
    let e = fails(&train_tiny(&d.path().join("x"), &["--set", "foo.bar=1"]));
    assert!(
        e.contains("--set") && e.contains("foo") && !e.contains("defaults"),
        "{e}"
    );
    // classes.json that does not match the checkpoint is the run folder's fault.
    let copy = d.path().join("copy");
    copy_dir(shared_run(), &copy);
    std::fs::write(copy.join("classes.json"), "[\"a\", \"b\", \"c\"]").unwrap();
    let e = fails(
        &convlab()
            .args(["eval", "--run"])
            .arg(&copy)
            .output()
            .unwrap(),
    );
    assert!(
        e.contains("classes.json") && e.contains("lists 3 classes"),
        "{e}"
    );
    // An ensemble member with another class count.
    let folder = d.path().join("photos");
    write_image_folder(&folder, &["a", "b", "c"], 6);
    let three = d.path().join("three");
    ok(&convlab()
        .args([
            "train",
            "--model",
            "convnet_small",
            "--epochs",
            "1",
            "--batch-size",
            "4",
        ])
        .arg("--data")
        .arg(&folder)
        .arg("--out")
        .arg(&three)
        .output()
        .unwrap());
    let e = fails(
        &convlab()
            .arg("ensemble")
            .arg(shared_run())
            .arg(&three)
            .output()
            .unwrap(),
    );
    assert!(
        e.contains("predicts 3 classes") && !e.contains("not a convlab run folder"),
        "{e}"
    );
    // A single missing IDX file is named.
    let idx = d.path().join("idx");
    std::fs::create_dir_all(&idx).unwrap();
    write_idx(&idx, "train", 20, 28, false);
    write_idx(&idx, "t10k", 10, 28, false);
    std::fs::remove_file(idx.join("t10k-labels-idx1-ubyte")).unwrap();
    let e = fails(&train_tiny(
        &d.path().join("i"),
        &["--data", idx.to_str().unwrap()],
    ));
    assert!(
        e.contains("missing IDX files: t10k-labels-idx1-ubyte"),
        "{e}"
    );
    // An OS error is printed once.
    let e = fails(&train_tiny(
        Path::new("/proc/convlab-cannot-write-here"),
        &[],
    ));
    let first = e.find("/proc/convlab-cannot-write-here").unwrap();
    let tail = &e[first..];
    let os = tail.split(": ").nth(1).unwrap_or("").trim().to_string();
    assert!(!os.is_empty() && e.matches(&os).count() == 1, "{e}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// Case 10: an IDX label 255, an empty class folder, a resumed override, a run killed before
/// its first epoch.
#[test]
fn smaller_cases_have_documented_behaviour() {
    let d = tmp();
    // IDX label 255.
    let idx = d.path().join("idx");
    std::fs::create_dir_all(&idx).unwrap();
    write_idx(&idx, "train", 20, 28, false);
    write_idx(&idx, "t10k", 10, 28, false);
    let lab = idx.join("train-labels-idx1-ubyte");
    let mut b = std::fs::read(&lab).unwrap();
    b[8] = 255;
    std::fs::write(&lab, b).unwrap();
    let e = fails(&train_tiny(
        &d.path().join("i"),
        &["--data", idx.to_str().unwrap()],
    ));
    assert!(
        e.contains("train-labels-idx1-ubyte") && e.contains("0..K-1"),
        "{e}"
    );
    // An empty class folder is an error naming it, not a phantom class.
    let photos = d.path().join("photos");
    write_image_folder(&photos, &["a", "b"], 4);
    std::fs::create_dir_all(photos.join("empty")).unwrap();
    let e = fails(&train_tiny(
        &d.path().join("p"),
        &["--data", photos.to_str().unwrap()],
    ));
    assert!(e.contains("empty") && e.contains("holds no images"), "{e}");

    // --resume with --lr applies once and is not written into recipe.toml.
    let run = d.path().join("run");
    ok(&train_tiny(
        &run,
        &["--set", "epochs=2", "--stop-after-epoch", "1"],
    ));
    let recipe = std::fs::read(run.join("recipe.toml")).unwrap();
    let o = convlab()
        .args(["train", "--resume"])
        .arg(&run)
        .args(["--lr", "0.0123"])
        .output()
        .unwrap();
    ok(&o);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("for this invocation only"),
        "the override must be announced"
    );
    assert_eq!(std::fs::read(run.join("recipe.toml")).unwrap(), recipe);

    // A run killed before its first epoch (recipe written, no checkpoint) resumes from 1.
    let killed = d.path().join("killed");
    ok(&train_tiny(&killed, &[]));
    std::fs::remove_dir_all(killed.join("checkpoints")).unwrap();
    std::fs::remove_file(killed.join("metrics.jsonl")).unwrap();
    std::fs::remove_file(killed.join("summary.json")).unwrap();
    let o = convlab()
        .args(["train", "--resume"])
        .arg(&killed)
        .output()
        .unwrap();
    let out = ok(&o);
    assert!(out.contains("starting it from epoch 1"), "{out}");
    assert!(killed.join("summary.json").is_file());
}

/// Resume state that is damaged fails loudly instead of restarting at epoch 0.
#[test]
fn damaged_resume_state_is_an_error() {
    let d = tmp();
    let run = d.path().join("run");
    copy_dir(shared_run(), &run);
    std::fs::remove_file(run.join("summary.json")).unwrap();
    // Rewrite the checkpoint with its epoch metadata damaged.
    let path = run.join("checkpoints/last.safetensors");
    let ck = convlab::train::checkpoint::load(&path).unwrap();
    let mut meta = ck.meta.clone();
    meta.insert("epoch".into(), "garbage".into());
    let groups: Vec<(String, convlab::train::checkpoint::TensorMap)> =
        ck.groups.into_iter().collect();
    let refs: Vec<(&str, &convlab::train::checkpoint::TensorMap)> =
        groups.iter().map(|(k, v)| (k.as_str(), v)).collect();
    convlab::train::checkpoint::save(&path, &refs, meta).unwrap();
    let e = fails(
        &convlab()
            .args(["train", "--resume"])
            .arg(&run)
            .args(["--epochs", "2"])
            .output()
            .unwrap(),
    );
    assert!(e.contains("epoch") && e.contains("garbage"), "{e}");
}

/// A limit below the free space (here a file-size limit, `ulimit -f`, which the disk check
/// meets as it would a quota: the allocation of one checkpoint is refused) stops the run
/// before its first epoch, naming the folder and the system's refusal, instead of losing the
/// epoch at its save; the folder it made is removed.
#[cfg(target_os = "linux")]
#[test]
fn a_limit_below_the_free_space_stops_the_run_before_its_first_epoch() {
    let d = tmp();
    let run = p(&d, "run");
    // 64 KiB: room for the recipe and the statistics, not for convnet_small's 1 MB checkpoint.
    let o = std::process::Command::new("bash")
        .args(["-c", "ulimit -f 64 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_convlab"))
        .args(["train", "--epochs", "1"])
        .args(["--set", "data.limit_train=64", "--set", "data.limit_val=32"])
        .arg("--out")
        .arg(&run)
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    let e = fails(&o);
    assert!(e.contains("before its first epoch"), "{e}");
    assert!(e.contains("refused") && e.contains("os error 27"), "{e}");
    assert!(e.contains(&run.display().to_string()), "{e}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains("epoch 1"));
    assert!(!run.exists(), "the folder it made is removed");
}
