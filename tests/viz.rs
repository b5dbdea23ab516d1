//! `convlab viz`, `analyze` and `report` end to end: every picture on one small model of each
//! family, and the HTML report opened in a real headless browser.

use crate::common;

use std::path::{Path, PathBuf};

use common::*;

fn train(run: &Path, model: &str, extra: &[&str]) {
    ok(&convlab()
        .args([
            "train",
            "--model",
            model,
            "--epochs",
            "2",
            "--batch-size",
            "32",
        ])
        .args([
            "--set",
            "data.limit_train=128",
            "--set",
            "data.limit_val=64",
        ])
        .args(["--set", "checkpoint_every=1", "--out"])
        .arg(run)
        .args(extra)
        .output()
        .unwrap());
}

/// Printed PNG paths, each checked to decode.
fn pngs(stdout: &str) -> Vec<PathBuf> {
    let files: Vec<PathBuf> = stdout
        .lines()
        .filter(|l| l.ends_with(".png"))
        .map(PathBuf::from)
        .collect();
    for f in &files {
        let img = image::open(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(img.width() > 8 && img.height() > 8);
    }
    files
}

#[test]
fn every_viz_command_runs_on_a_small_model_of_each_family() {
    let d = tmp();
    let picture = d.path().join("shirt.png");
    image::GrayImage::from_fn(28, 28, |x, y| {
        image::Luma([if (8..20).contains(&x) && (5..24).contains(&y) {
            200
        } else {
            10
        }])
    })
    .save(&picture)
    .unwrap();
    let pic = picture.to_str().unwrap();
    for model in [
        "zfnet_small",
        "convnet_small",
        "vgg11_small",
        "googlenet_small",
        "resnet18_small",
    ] {
        let run = d.path().join(model);
        train(&run, model, &[]);
        let r = run.to_str().unwrap();
        let viz = |args: &[&str]| -> Vec<PathBuf> {
            let o = convlab()
                .args(["viz"])
                .args(args)
                .args(["--run", r])
                .output()
                .unwrap();
            pngs(&ok(&o))
        };
        assert_eq!(viz(&["filters"]).len(), 1, "{model}");
        let acts = viz(&["activations", "--image", pic]);
        assert!(acts.len() >= 3, "{model}: {acts:?}");
        assert_eq!(
            viz(&[
                "top-patches",
                "--k",
                "3",
                "--channels",
                "2",
                "--images",
                "16"
            ])
            .len(),
            1
        );
        // The first named layer of every family.
        let first = match model {
            "resnet18_small" => "stem",
            _ => "conv1",
        };
        assert_eq!(viz(&["deconv", "--image", pic, "--layer", first]).len(), 1);
        assert_eq!(viz(&["saliency", "--image", pic]).len(), 1);
        assert_eq!(viz(&["gradcam", "--image", pic, "--class", "3"]).len(), 1);
        assert_eq!(
            viz(&["occlusion", "--image", pic, "--patch", "7", "--stride", "7"]).len(),
            1
        );
        assert_eq!(viz(&["evolution"]).len(), 1);
        // An unknown layer or channel lists the valid ones.
        let o = convlab()
            .args([
                "viz", "gradcam", "--image", pic, "--layer", "nope", "--run", r,
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("valid layers:"),
            "{err}"
        );
        let o = convlab()
            .args([
                "viz",
                "deconv",
                "--image",
                pic,
                "--layer",
                first,
                "--channel",
                "9999",
            ])
            .args(["--run", r])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && err.contains("does not exist"),
            "{err}"
        );
    }
    // analyze --json on the last one.
    let o = convlab()
        .args(["analyze", "--json"])
        .arg(d.path().join("resnet18_small"))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers[0]["layer"], "stem");
    for k in [
        "intra_class_variance",
        "inter_class_variance",
        "ratio",
        "nearest_centroid_top1",
    ] {
        assert!(layers[0].get(k).is_some(), "{k}");
    }
    assert_eq!(v["images"], 64);
}

fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("CONVLAB_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

#[test]
fn report_escapes_names_and_opens_in_a_headless_browser() {
    let d = tmp();
    let data = d.path().join("photos");
    write_image_folder(&data, &["<script>", "b&c", "plain"], 12);
    let run = d.path().join("run");
    let out = ok(&convlab()
        .args([
            "train",
            "--model",
            "convnet_small",
            "--epochs",
            "2",
            "--batch-size",
            "8",
        ])
        .arg("--data")
        .arg(&data)
        .args(["--set", "model.input_size=16", "--report", "--out"])
        .arg(&run)
        .output()
        .unwrap());
    assert!(out.contains("report: "), "{out}");
    let html = std::fs::read_to_string(run.join("report.html")).unwrap();
    assert!(!html.contains("<script"), "a class name became markup");
    assert!(html.contains("&lt;script&gt;") && html.contains("b&amp;c"));
    assert!(!html.contains("http://") && !html.contains("https://") || html.contains("xmlns"));
    for section in [
        "Training curves",
        "confusion matrix",
        "First-layer filters",
        "Where the model looks",
        "Class separation by layer",
        "Dataset",
        "Recipe",
    ] {
        assert!(html.contains(section), "missing {section}");
    }

    let Some(browser) = chromium() else {
        assert!(
            std::env::var_os("CONVLAB_REQUIRE_BROWSER").is_none(),
            "CONVLAB_REQUIRE_BROWSER is set but no chromium was found"
        );
        eprintln!("skipping the browser part: no chromium (apt-get install chromium)");
        return;
    };
    let shot = d.path().join("report.png");
    let o = std::process::Command::new(&browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1280,2000",
        ])
        .arg(format!(
            "--user-data-dir={}",
            d.path().join("profile").display()
        ))
        .arg(format!("--screenshot={}", shot.display()))
        .arg(format!("file://{}", run.join("report.html").display()))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{log}");
    // Chromium logs page console messages as `CONSOLE(line)`; the report has no scripts, so
    // any such line (an error or a blocked resource) is a failure.
    let console: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("Uncaught") || l.contains("net::ERR"))
        .collect();
    assert!(console.is_empty(), "console messages: {console:?}");
    let img = image::open(&shot).unwrap();
    assert!(img.width() >= 1000 && img.height() >= 1000);
    // Keep the screenshot where a human can look at it.
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-screenshot.png");
    std::fs::copy(&shot, &keep).unwrap();
}
