//! `convlab train`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use convlab::pipeline::{TrainOptions, train};
use convlab::recipe::{Override, Recipe};
use convlab::run::{RunDir, default_run_path};

use super::progress::Progress;
use super::{DataArgs, RuntimeArgs, device};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Recipe file (TOML); its values override the built-in defaults.
    #[arg(long)]
    pub recipe: Option<PathBuf>,
    /// Model name (see `convlab models`).
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub data: DataArgs,
    /// Held-out fraction for data without its own split.
    #[arg(long)]
    pub val_fraction: Option<f64>,
    /// Epochs to train (sets `epochs`).
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Images per step (sets `batch_size`; the learning rate scales linearly with it).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Cut each batch into this many forward/backward passes whose gradients are summed before
    /// the one optimiser step: the same step in less memory (sets `grad_accum_steps`).
    #[arg(long)]
    pub grad_accum_steps: Option<usize>,
    /// Base learning rate (at optim.base_batch_size; scaled linearly with --batch-size).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of the initialisation, the data order and the augmentations (sets `seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Arithmetic of the convolutions: fp32, or bf16 (needs AVX512-BF16; f32 weights and
    /// optimiser state).
    #[arg(long, value_parser = ["fp32", "bf16"])]
    pub precision: Option<String>,
    /// Start from pretrained weights: a PyTorch `.pth`/`.pt` or `.safetensors` state dict
    /// (torchvision, timm or convlab naming) or a run folder (sets `model.pretrained`).
    #[arg(long, value_name = "PATH")]
    pub pretrained: Option<PathBuf>,
    /// Run folder (default: runs/<model>-<timestamp>, made unique).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace the run already in --out (its checkpoints, metrics and summary are deleted).
    /// Without it, training into a folder that holds a run is refused.
    #[arg(long, requires = "out")]
    pub overwrite: bool,
    /// Any recipe field, e.g. --set optim.momentum=0.8 --set data.limit_train=500.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// Skip and count undecodable (or vanished) images instead of stopping.
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Continue a run from its last complete checkpoint (uses the run's recipe).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["recipe", "out"])]
    pub resume: Option<PathBuf>,
    /// End cleanly after this epoch; the schedule still spans all epochs.
    #[arg(long)]
    pub stop_after_epoch: Option<usize>,
    /// Write RUN/report.html (`convlab report`) when training finishes.
    #[arg(long)]
    pub report: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// A flag's value as a TOML integer (a signed 64-bit number): larger values are an error
/// naming the flag, not a silent wrap to a negative number.
fn int(flag: &str, v: u64) -> Result<i64> {
    i64::try_from(v).map_err(|_| anyhow::anyhow!("{flag} {v}: too large (at most {})", i64::MAX))
}

/// Photos (an ImageFolder or CSV lists) with no model chosen get resnet18 at 128 px instead of the 28 px
/// default of the built-in data: a 28 px net cannot see what tells photos apart (it stays at
/// chance on cats and dogs), resnet18 is the standard transfer backbone, and 128 px costs a
/// third of 224 px on a CPU. With --pretrained the input size is the weights' own.
fn photo_defaults(a: &TrainArgs, o: &mut Vec<Override>) {
    let chosen = |key: &str| o.iter().any(|x| x.key == key || x.key == "model");
    if a.recipe.is_some() || a.resume.is_some() || chosen("model.name") {
        return;
    }
    let Some(path) = &a.data.data else { return };
    let format = a
        .data
        .data_format
        .or_else(|| convlab::data::dataset::detect(path).ok());
    use convlab::data::DataFormat::{Csv, Imagefolder};
    if !matches!(format, Some(Imagefolder | Csv)) {
        return;
    }
    let mut what = "resnet18".to_string();
    let size_chosen = chosen("model.input_size");
    o.push(Override::flag("model.name", "resnet18", "photo default"));
    if a.pretrained.is_none() && !size_chosen {
        o.push(Override::flag("model.input_size", 128i64, "photo default"));
        what.push_str(" at 128 px");
    }
    eprintln!("photos without --model: training {what} (pass --model to choose another)");
}

fn overrides(a: &TrainArgs) -> Result<Vec<Override>> {
    let mut o = Vec::new();
    if let Some(m) = &a.model {
        o.push(Override::flag("model.name", m.as_str(), "--model"));
    }
    if let Some(p) = &a.data.data {
        o.push(Override::flag(
            "data.path",
            p.display().to_string(),
            "--data",
        ));
    }
    if let Some(f) = a.data.data_format {
        let v = toml::Value::try_from(f)?;
        o.push(Override::flag("data.format", v, "--data-format"));
    }
    if let Some(p) = &a.pretrained {
        o.push(Override::flag(
            "model.pretrained",
            p.display().to_string(),
            "--pretrained",
        ));
    }
    if let Some(v) = a.val_fraction {
        o.push(Override::flag("data.val_fraction", v, "--val-fraction"));
    }
    if let Some(v) = a.epochs {
        o.push(Override::flag(
            "epochs",
            int("--epochs", v as u64)?,
            "--epochs",
        ));
    }
    if let Some(v) = a.batch_size {
        o.push(Override::flag(
            "batch_size",
            int("--batch-size", v as u64)?,
            "--batch-size",
        ));
    }
    if let Some(v) = a.grad_accum_steps {
        o.push(Override::flag(
            "grad_accum_steps",
            int("--grad-accum-steps", v as u64)?,
            "--grad-accum-steps",
        ));
    }
    if let Some(v) = a.lr {
        o.push(Override::flag("optim.lr", v, "--lr"));
    }
    if let Some(v) = a.seed {
        o.push(Override::flag("seed", int("--seed", v)?, "--seed"));
    }
    if let Some(v) = &a.precision {
        o.push(Override::flag("precision", v.as_str(), "--precision"));
    }
    if a.skip_bad_images {
        o.push(Override::flag(
            "data.skip_bad_images",
            true,
            "--skip-bad-images",
        ));
    }
    for s in &a.sets {
        o.push(Override::parse(s)?);
    }
    photo_defaults(a, &mut o);
    Ok(o)
}

pub fn run(a: TrainArgs) -> Result<()> {
    device::set_threads(a.runtime.threads)?;
    let dev = device::pick(&a.runtime.device)?.autodiff();
    let (recipe, run, resume, created) = match &a.resume {
        Some(dir) => {
            let run = RunDir::open(dir)?.lock()?;
            let over = overrides(&a)?;
            let recipe = Recipe::resolve(Some(&run.file(convlab::run::RECIPE)), &over)?;
            if !over.is_empty() {
                let list: Vec<String> = over
                    .iter()
                    .map(|o| format!("{} = {} ({})", o.key, o.value, o.origin))
                    .collect();
                eprintln!(
                    "resuming with {}: for this invocation only; {} keeps the run's recipe, so a \
                     later --resume without them goes back to it",
                    list.join(", "),
                    run.file(convlab::run::RECIPE).display()
                );
            }
            (recipe, run, true, false)
        }
        None => {
            let recipe = Recipe::resolve(a.recipe.as_deref(), &overrides(&a)?)?;
            let (run, created) = match &a.out {
                Some(path) => {
                    let created = !path.exists();
                    let run = RunDir::create(path)?.lock()?;
                    let existing = run.existing_run_files();
                    if !existing.is_empty() {
                        if !a.overwrite {
                            bail!(
                                "{} already holds a run ({}); pass --resume {} to continue it, \
                                 --overwrite to replace it, or another --out",
                                path.display(),
                                existing.join(", "),
                                path.display()
                            );
                        }
                        eprintln!(
                            "--overwrite: deleting the run in {} ({})",
                            path.display(),
                            existing.join(", ")
                        );
                        run.clear()?;
                    }
                    (run, created)
                }
                None => (
                    RunDir::create_unique(&default_run_path(recipe.model.name.as_str()))?.lock()?,
                    true,
                ),
            };
            (recipe, run, false, created)
        }
    };
    let opts = TrainOptions {
        resume,
        stop_after_epoch: a.stop_after_epoch,
    };
    let mut progress = Progress::new();
    println!("run folder: {}", run.path.display());
    let s = match train(recipe, &run, &opts, &dev, &mut progress) {
        Ok(s) => s,
        Err(e) => {
            // A folder this command made and no epoch finished in holds nothing worth keeping.
            if created && !run.file(convlab::run::METRICS).exists() {
                let _ = std::fs::remove_dir_all(&run.path);
                return Err(e).with_context(|| {
                    format!(
                        "training failed before its first epoch; removed the run folder {} it \
                         had made",
                        run.path.display()
                    )
                });
            }
            // Whatever stopped it (a full disk, a damaged image, a kill), the epochs before are
            // safe: say where, and how to go on, unless the error says so itself.
            let last = run.checkpoint("last");
            if last.is_file() && !matches!(e, convlab::error::Error::Diverged { .. }) {
                return Err(e).with_context(|| {
                    format!(
                        "training in {0} failed; its last complete checkpoint is kept ({1}), \
                         and `convlab train --resume {0}` goes on from it",
                        run.path.display(),
                        last.display()
                    )
                });
            }
            return Err(e).with_context(|| format!("training in {} failed", run.path.display()));
        }
    };
    println!(
        "done: {} epochs in {:.1} s; final val top1 {:.2}% top5 {:.2}%, best top1 {:.2}% (epoch {}{}){}",
        s.epochs,
        s.seconds,
        100.0 * s.final_val_top1,
        100.0 * s.final_val_top5,
        100.0 * s.best_val_top1,
        s.best_epoch,
        if s.best_metric != "val_top1" {
            format!(", by {}", s.best_metric)
        } else {
            String::new()
        },
        if s.images_skipped > 0 {
            format!("; {} undecodable images skipped", s.images_skipped)
        } else {
            String::new()
        }
    );
    if a.report {
        let path = convlab::report::write_report(&run, None, &dev)?;
        println!("report: {}", path.display());
    }
    println!("run folder: {}", run.path.display());
    Ok(())
}
