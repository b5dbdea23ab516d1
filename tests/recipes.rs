//! Every shipped recipe runs end to end (one short epoch on a tiny generated ImageFolder, at a
//! small input size), including VGG's two-stage shallow-to-deep initialisation.

use crate::common;

use std::path::Path;

use assert_cmd::Command;
use common::*;

fn train(recipe: &str, data: &Path, out: &Path, extra: &[&str]) -> String {
    let o = Command::cargo_bin("convlab")
        .unwrap()
        .env("RAYON_NUM_THREADS", "2")
        .args(["train", "--recipe", recipe, "--data"])
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(["--epochs", "1", "--batch-size", "4"])
        .args([
            "--set",
            "model.input_size=64",
            "--set",
            "data.limit_train=8",
        ])
        .args(["--set", "data.limit_val=4"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{recipe} failed\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.join("summary.json").is_file(), "{recipe}");
    stdout
}

#[test]
fn every_shipped_recipe_runs() {
    let d = tmp();
    let data = d.path().join("data");
    write_image_folder(&data, &["a", "b", "c"], 6);
    let recipes = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let mut names: Vec<String> = std::fs::read_dir(&recipes)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "alexnet-paper.toml",
            "cifar10-fast.toml",
            "default.toml",
            "finetune.toml",
            "googlenet-paper.toml",
            "resnet-bag-of-tricks.toml",
            "resnet-baseline.toml",
            "vgg-paper.toml",
            "zfnet-paper.toml"
        ]
    );
    for name in &names {
        let recipe = recipes.join(name);
        let r = recipe.to_str().unwrap();
        let out = d.path().join(name.trim_end_matches(".toml"));
        if name == "vgg-paper.toml" {
            // Stage 1: configuration A from scratch; stage 2: D initialised from it. Stage 1
            // keeps no momentum so its checkpoint is the weights alone (0.5 instead of 1 GB):
            // CI's disk once ran out writing stage 2's while stage 1's and the other
            // recipes' runs were still on it.
            let a = d.path().join("vgg11-paper");
            train(
                r,
                &data,
                &a,
                &[
                    "--model",
                    "vgg11",
                    "--set",
                    "init_from=\"\"",
                    "--set",
                    "optim.momentum=0.0",
                ],
            );
            let from = format!("init_from=\"{}\"", a.display());
            let text = train(r, &data, &out, &["--set", &from]);
            // conv1 (weight, bias) and fc6-fc8 (weight, bias) match between A and D.
            assert!(text.contains("copied 8 of"), "{text}");
            std::fs::remove_dir_all(&a).unwrap();
        } else {
            train(r, &data, &out, &[]);
        }
        // A checked run leaves the disk: AlexNet's, ZFNet's and VGG's are 0.5-1 GB each.
        std::fs::remove_dir_all(&out).unwrap();
    }
}
