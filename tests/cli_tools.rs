//! The `convlab` subcommands around training, end to end on tiny generated data: `models`,
//! every small variant, distillation and mixup, `bench`, the kernel switch and precision,
//! `data stats`, `ensemble`.

use crate::common;

use common::*;

#[test]
fn models_lists_every_model_with_exact_keys() {
    let o = convlab().args(["models", "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), convlab::models::ModelName::ALL.len());
    for r in rows {
        let mut keys: Vec<&str> = r.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(keys, ["family", "gflops", "input_size", "name", "params"]);
    }
    let get = |n: &str| rows.iter().find(|r| r["name"] == n).unwrap().clone();
    assert_eq!(get("resnet50")["params"], 25_557_032);
    assert_eq!(get("alexnet")["params"], 61_100_840);
    // torchvision reports 4.09 GMACs for resnet50 at 224 px.
    let g = get("resnet50")["gflops"].as_f64().unwrap();
    assert!((g - 8.18).abs() < 0.05, "{g}");
    let text = ok(&convlab().arg("models").output().unwrap());
    assert!(text.contains("googlenet_small") && text.contains("GFLOPs"));
}

#[test]
fn every_small_variant_trains_from_the_cli() {
    // One short epoch each on a subset of the built-in data: the loss must fall.
    for name in [
        "alexnet_small",
        "zfnet_small",
        "vgg11_small",
        "googlenet_small",
        "resnet18_small",
    ] {
        let d = tmp();
        let run = d.path().join("run");
        let o = convlab()
            .args([
                "train",
                "--model",
                name,
                "--epochs",
                "3",
                "--batch-size",
                "32",
            ])
            .args([
                "--set",
                "data.limit_train=256",
                "--set",
                "data.limit_val=64",
                "--lr",
                "0.1",
            ])
            .args(["--set", "model.input_size=28"])
            .arg("--out")
            .arg(&run)
            .output()
            .unwrap();
        ok(&o);
        let m: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let first = m[0]["train_loss"].as_f64().unwrap();
        let last = m[2]["train_loss"].as_f64().unwrap();
        assert!(last < first, "{name}: train loss {first} -> {last}");
    }
}

#[test]
fn distillation_mixup_and_init_from_runs() {
    let d = tmp();
    let teacher = d.path().join("teacher");
    ok(&train_tiny(&teacher, &[]));
    // A student of another family, input size and channel count, with mixup and CutMix:
    // the teacher gets the batch converted to its own 1x28x28 input and normalisation.
    let student = d.path().join("student");
    let out = ok(&train_tiny(
        &student,
        &[
            "--model",
            "vgg11_small",
            "--set",
            "model.in_channels=3",
            "--set",
            "model.input_size=32",
            "--set",
            &format!("distill.teacher=\"{}\"", teacher.display()),
            "--set",
            "loss.mixup_alpha=0.2",
            "--set",
            "loss.cutmix_alpha=1.0",
        ],
    ));
    assert!(out.contains("distilling from"), "{out}");
    // init_from copies every tensor of a run of the same model: 4 convs x (weight, BN gamma,
    // beta, running mean, running var) + the classifier's weight and bias = 22.
    let warm = d.path().join("warm");
    let out = ok(&train_tiny(
        &warm,
        &["--set", &format!("init_from=\"{}\"", teacher.display())],
    ));
    assert!(out.contains("copied 22 of 22 tensors"), "{out}");
    // A teacher with another number of classes is refused by name.
    let data = d.path().join("photos");
    write_image_folder(&data, &["a", "b"], 6);
    let o = convlab()
        .args([
            "train",
            "--model",
            "convnet_small",
            "--epochs",
            "1",
            "--data",
        ])
        .arg(&data)
        .args([
            "--set",
            &format!("distill.teacher=\"{}\"", teacher.display()),
        ])
        .output()
        .unwrap();
    let e = fails(&o);
    assert!(
        e.contains("distill.teacher") && e.contains("10 classes"),
        "{e}"
    );
}

/// `convlab bench WHAT` on convnet_small at 1x28x28 with `extra` arguments and `CONVLAB_AMX`.
fn tiny_bench(what: &str, extra: &[&str], amx: &str) -> std::process::Output {
    tiny_bench_env(what, extra, &[("CONVLAB_AMX", amx)])
}

/// [`tiny_bench`] with the environment variables `env`.
fn tiny_bench_env(what: &str, extra: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    convlab()
        .args([
            "bench",
            what,
            "--model",
            "convnet_small",
            "--input",
            "1x28x28",
        ])
        .args(extra)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

#[test]
fn bench_reports_the_documented_keys() {
    let json =
        |o: &std::process::Output| -> serde_json::Value { serde_json::from_str(&ok(o)).unwrap() };
    for what in ["train", "infer"] {
        let v = json(&tiny_bench(
            what,
            &["--batch", "4", "--steps", "2", "--json"],
            "",
        ));
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "activations",
                "batch",
                "device",
                "gflops_per_sec",
                "grad_accum_steps",
                "images_per_sec",
                "input",
                "matrix_unit",
                "model",
                "ms_per_step",
                "peak_rss_mb",
                "threads"
            ]
        );
        assert!(v["images_per_sec"].as_f64().unwrap() > 0.0);
        assert_eq!(v["grad_accum_steps"], 1);
        assert_eq!(v["matrix_unit"], "fp32");
        assert_eq!(v["activations"], "f32");
    }
    // bf16 names the unit this CPU has (the AMX tiles, AVX512-BF16 where it beats f32, or
    // fp32), CONVLAB_AMX=0 keeps it off the tiles, and CONVLAB_VDPBF16PS=on|off takes or
    // leaves AVX512-BF16 whether or not it beats f32 here.
    let bf16 = [
        "--batch",
        "2",
        "--steps",
        "1",
        "--json",
        "--precision",
        "bf16",
    ];
    let unit = |amx: &str| json(&tiny_bench("infer", &bf16, amx))["matrix_unit"].clone();
    use convlab::kernels::{bf16::Policy, bf16_unit};
    assert_eq!(unit("1"), bf16_unit(true, Policy::Auto));
    assert_eq!(unit("0"), bf16_unit(false, Policy::Auto));
    let dot = |amx: &str, policy: &str| {
        let env = [("CONVLAB_AMX", amx), ("CONVLAB_VDPBF16PS", policy)];
        tiny_bench_env("infer", &bf16, &env)
    };
    assert_eq!(
        json(&dot("0", "on"))["matrix_unit"],
        bf16_unit(false, Policy::On)
    );
    assert_eq!(
        json(&dot("1", "off"))["matrix_unit"],
        bf16_unit(true, Policy::Off)
    );
    assert!(fails(&tiny_bench("infer", &[], "maybe")).contains("CONVLAB_AMX=maybe"));
    assert!(fails(&dot("1", "fast")).contains("CONVLAB_VDPBF16PS=fast"));
    // A bf16 ConvNet keeps its maps in bf16 while training where bf16 runs at all (the
    // default, and CONVLAB_ACTIVATIONS=bf16), f32 in inference; CONVLAB_ACTIVATIONS=f32 keeps
    // them in f32; a typo is refused naming the variable.
    let acts = |value: &str| tiny_bench_env("train", &bf16, &[("CONVLAB_ACTIVATIONS", value)]);
    let runs_bf16 = bf16_unit(true, Policy::Auto) != "fp32";
    let bf16_maps = if runs_bf16 { "bf16" } else { "f32" };
    assert_eq!(json(&acts("bf16"))["activations"], bf16_maps);
    assert_eq!(
        json(&tiny_bench("train", &bf16, "1"))["activations"],
        bf16_maps
    );
    assert_eq!(json(&tiny_bench("infer", &bf16, "1"))["activations"], "f32");
    assert_eq!(json(&acts("f32"))["activations"], "f32");
    assert!(fails(&acts("half")).contains("CONVLAB_ACTIVATIONS=half"));
    let e = fails(
        &convlab()
            .args(["bench", "train", "--input", "3x32"])
            .output()
            .unwrap(),
    );
    assert!(e.contains("CxHxW"), "{e}");
}

/// `bench --recipe` times the recipe's model (with its options) at its input size, and a bad
/// recipe is refused naming the key.
#[test]
fn bench_times_a_recipes_step() {
    let d = tmp();
    let recipe = d.path().join("r.toml");
    std::fs::write(
        &recipe,
        "grad_accum_steps = 8\n[model]\nname = \"resnet18_small\"\ninput_size = 16\n\
         zero_gamma = true\n[regularisation]\nema_decay = 0.9\n[loss]\nlabel_smoothing = 0.1\n",
    )
    .unwrap();
    let o = convlab()
        .args(["bench", "train", "--recipe"])
        .arg(&recipe)
        .args(["--batch", "4", "--steps", "1", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v["model"], "resnet18_small");
    assert_eq!(v["input"], "3x16x16");
    // Eight passes asked, four images: one pass an image.
    assert_eq!(v["grad_accum_steps"], 4);
    std::fs::write(
        &recipe,
        "[model]\nname = \"resnet18_small\"\nplan = \"8,M\"\n",
    )
    .unwrap();
    let e = fails(
        &convlab()
            .args(["bench", "train", "--recipe"])
            .arg(&recipe)
            .output()
            .unwrap(),
    );
    assert!(e.contains("model.plan"), "{e}");
}

/// A misspelt kernel switch stops the command instead of quietly running the default kernels.
#[test]
fn bad_kernel_switch_is_an_error() {
    let e = fails(
        &convlab()
            .env("CONVLAB_KERNELS", "torch")
            .args(["models"])
            .output()
            .unwrap(),
    );
    assert!(e.contains("CONVLAB_KERNELS=torch"), "{e}");
    let o = tiny_bench_env(
        "infer",
        &["--batch", "2", "--steps", "1"],
        &[("CONVLAB_KERNELS", "burn")],
    );
    assert!(ok(&o).contains("backend kernels"));
}

/// `--grad-accum-steps` trains in that many passes a batch, says so, records it in the run's
/// recipe, and is refused above the batch size naming the key.
#[test]
fn grad_accum_steps_flag_trains() {
    let d = tmp();
    let run = d.path().join("run");
    let out = ok(&train_tiny(&run, &["--grad-accum-steps", "3"]));
    assert!(
        out.contains("each batch of 32 in 3 passes of up to 11 images"),
        "{out}"
    );
    let recipe = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    assert!(recipe.contains("grad_accum_steps = 3"), "{recipe}");
    assert!(run.join("summary.json").exists());
    let e = fails(&train_tiny(
        &d.path().join("too-many"),
        &["--grad-accum-steps", "33"],
    ));
    assert!(
        e.contains("grad_accum_steps") && e.contains("batch_size, 32"),
        "{e}"
    );
}

/// `--precision bf16` trains in bf16 where the CPU can (and says so), or says why it runs fp32;
/// either way the run's recipe records what was asked.
#[test]
fn precision_flag_trains_and_benches() {
    let d = tmp();
    let run = d.path().join("run");
    let out = ok(&train_tiny(&run, &["--precision", "bf16"]));
    let recipe = std::fs::read_to_string(run.join("recipe.toml")).unwrap();
    assert!(recipe.contains("precision = \"bf16\""), "{recipe}");
    use convlab::kernels::{bf16, bf16::Policy, bf16_unit};
    let runs_bf16 = bf16_unit(true, Policy::Auto) != "fp32";
    if runs_bf16 {
        assert!(out.contains("convolutions in bf16"), "{out}");
    } else if bf16::available() {
        // An Intel CPU without usable AMX tiles: VDPBF16PS loses to f32 FMAs there.
        assert!(out.contains("slower than its f32 FMAs"), "{out}");
    } else {
        assert!(out.contains("no AVX512-BF16"), "{out}");
    }
    // eval reads the precision back from the run and gives the top-1 training's last
    // validation gave (the same views, precision and weights).
    let v = eval_json(&run, &[]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    let (t1, want) = (
        v["top1"].as_f64().unwrap(),
        summary["final_val_top1"].as_f64().unwrap(),
    );
    assert!((t1 - want).abs() < 1e-9, "{t1} vs {want}");
    // CONVLAB_VDPBF16PS=on runs bf16 wherever the CPU has AVX512-BF16, even where f32 is faster.
    for (policy, ran) in [
        ("auto", if runs_bf16 { "bf16" } else { "fp32" }),
        ("on", if bf16::available() { "bf16" } else { "fp32" }),
    ] {
        let o = convlab()
            .env("CONVLAB_VDPBF16PS", policy)
            .args([
                "bench",
                "train",
                "--model",
                "convnet_small",
                "--input",
                "1x28x28",
            ])
            .args(["--batch", "4", "--steps", "1", "--precision", "bf16"])
            .output()
            .unwrap();
        let text = ok(&o);
        assert!(
            text.contains(&format!("convlab kernels, {ran}")),
            "{policy}: {text}"
        );
    }
    // Burn's own ops have no bf16 path: the fallback is announced, not silent.
    let o = convlab()
        .env("CONVLAB_KERNELS", "burn")
        .args([
            "bench",
            "infer",
            "--model",
            "convnet_small",
            "--input",
            "1x28x28",
        ])
        .args(["--batch", "2", "--steps", "1", "--precision", "bf16"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--precision bf16") && err.contains("fp32"),
        "{err}"
    );
    let e = fails(&train_tiny(&d.path().join("bad"), &["--precision", "fp16"]));
    assert!(e.contains("--precision"), "{e}");
}

#[test]
fn data_stats_on_builtin_and_cifar() {
    let o = convlab()
        .args(["data", "stats", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v["images"], 8000);
    assert_eq!(v["classes"].as_array().unwrap().len(), 10);
    assert_eq!(v["classes"][0]["val"], 200);
    let train: Vec<f64> = v["classes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["train"].as_f64().unwrap())
        .collect();
    let (most, least) = (
        train.iter().copied().fold(0.0, f64::max),
        train.iter().copied().fold(f64::INFINITY, f64::min),
    );
    assert_eq!(v["imbalance_ratio"].as_f64().unwrap(), most / least);
    let m = v["mean"][0].as_f64().unwrap();
    assert!((m - 0.2869).abs() < 1e-3, "{m}");
    let g = &v["granularity"];
    assert!(g["ratio"].as_f64().unwrap() > 0.0);
    let d = tmp();
    write_cifar10(d.path(), 6);
    let o = convlab()
        .args(["data", "stats", "--json"])
        .arg(d.path())
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v["pca_eigenvalues"].as_array().unwrap().len(), 3);
    assert_eq!(v["modes"]["rgb"], 30);
    // The generator repeats records with the same label, so most are duplicates.
    assert!(v["duplicates"].as_u64().unwrap() > 0);
    let text = ok(&convlab().args(["data", "stats"]).output().unwrap());
    assert!(text.contains("nearest class pairs"), "{text}");
    assert!(text.contains("imbalance ratio"), "{text}");
}

#[test]
fn ensemble_of_identical_members_equals_the_member() {
    let d = tmp();
    let a = d.path().join("a");
    ok(&train_tiny(&a, &[]));
    let single: serde_json::Value = serde_json::from_str(&ok(&convlab()
        .args(["eval", "--json", "--run"])
        .arg(&a)
        .output()
        .unwrap()))
    .unwrap();
    let o = convlab()
        .args(["ensemble", "--json"])
        .arg(&a)
        .arg(&a)
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ok(&o)).unwrap();
    assert_eq!(v["count"], 64);
    assert_eq!(v["members"].as_array().unwrap().len(), 2);
    let t1 = v["top1"].as_f64().unwrap();
    assert!((t1 - single["top1"].as_f64().unwrap()).abs() < 1e-12);
    assert!((t1 - v["best_member_top1"].as_f64().unwrap()).abs() < 1e-12);
    // A member of another architecture and input size joins through its own transform.
    let b = d.path().join("b");
    ok(&train_tiny(
        &b,
        &["--model", "resnet18_small", "--set", "model.input_size=32"],
    ));
    let o = convlab()
        .args(["ensemble", "--weights", "2,1"])
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    let text = ok(&o);
    assert!(
        text.contains("ensemble:") && text.contains("resnet18_small"),
        "{text}"
    );
    let e = fails(
        &convlab()
            .args(["ensemble", "--weights", "1"])
            .arg(&a)
            .arg(&b)
            .output()
            .unwrap(),
    );
    assert!(e.contains("1 weights for 2 runs"), "{e}");
}
