//! `convlab bench`.

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use convlab::bench::{self, Mode};
use convlab::kernels::Precision;
use convlab::models::{ModelConfig, ModelName};
use serde::Serialize;

use super::{RuntimeArgs, device};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum What {
    /// Forward, loss, backward and optimiser update.
    Train,
    /// Forward only, eval mode.
    Infer,
    /// The data loader alone: decode + augment + batch (`--data`, `--transform`, `--workers`).
    Data,
}

/// Training transforms of the loader benchmark, each the same as `bench/torchvision_loader.py`.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Preset {
    /// Fit to --size, 4 px zero-padded random crop, horizontal flip, normalise (CIFAR).
    Cifar,
    /// Random-resized-crop to --size (8-100% area, 3/4-4/3 ratio), flip, normalise (ImageNet).
    Imagenet,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to time.
    #[arg(value_enum)]
    pub what: What,
    /// Model (default: the recipe's, else bench-vgg).
    #[arg(long)]
    pub model: Option<String>,
    /// Input as CxHxW (H = W; default: the recipe's model input size with 3 channels, else
    /// 3x32x32).
    #[arg(long)]
    pub input: Option<String>,
    /// Time the step this recipe trains with (its model and options, optimiser, loss weights,
    /// label smoothing, clipping, EMA, teacher and precision); default: the default recipe.
    #[arg(long)]
    pub recipe: Option<std::path::PathBuf>,
    /// Images per step.
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=65536))]
    pub batch: usize,
    /// Timed steps (after 3 warm-up steps).
    #[arg(long, default_value_t = 20, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000000))]
    pub steps: usize,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
    /// Classes of the model's head (the random labels are drawn from them).
    #[arg(long, default_value_t = 10, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100000))]
    pub classes: usize,
    /// `bench data`: dataset (ImageFolder, CIFAR binary, IDX; default: built-in).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// `bench data`: the training transform.
    #[arg(long, value_enum, default_value = "cifar")]
    pub transform: Preset,
    /// `bench data`: output side in pixels (default 32 for cifar, 224 for imagenet).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub size: Option<usize>,
    /// `bench data`: decode/augment threads.
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    pub workers: usize,
    /// `bench data`: images to load (default: the whole training split).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100000000))]
    pub images: Option<usize>,
    /// Arithmetic of the convolutions (`bf16` needs AVX512-BF16 and burn-flex; else it says so
    /// and measures fp32). Default: the recipe's, else fp32.
    #[arg(long, value_parser = ["fp32", "bf16"])]
    pub precision: Option<String>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    input: String,
    batch: usize,
    /// Forward and backward passes per training step (the recipe's `grad_accum_steps`, at most
    /// one per image; 1 for inference).
    grad_accum_steps: usize,
    threads: usize,
    device: String,
    /// `convlab` (convlab's CPU kernels on burn-flex, libtorch's backward kernels on tch) or
    /// `backend` (the backend's own ops: another device, or `CONVLAB_KERNELS=burn`);
    /// in the text line only, the JSON keys being the contract.
    #[serde(skip)]
    kernels: String,
    /// The precision that ran (text line only, as above).
    #[serde(skip)]
    precision: Precision,
    images_per_sec: f64,
    ms_per_step: f64,
    peak_rss_mb: Option<f64>,
    gflops_per_sec: f64,
    /// What multiplied the convolutions' matrices: `amx-bf16`, `avx512-bf16` or `fp32`
    /// (`kernels::matrix_unit`; `backend` when convlab's kernels did not run).
    matrix_unit: String,
    /// The dtype of the activations between layers: `f32`, or `bf16` for a bf16 model of a
    /// family that keeps them in bf16 while training (the default; `CONVLAB_ACTIVATIONS=f32`
    /// keeps f32; inference keeps f32).
    activations: String,
}

fn parse_input(s: &str) -> Result<(usize, usize)> {
    let parts: Vec<usize> = s
        .split('x')
        .map(|p| p.parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("--input {s}: expected CxHxW, e.g. 3x32x32"))?;
    match parts.as_slice() {
        [_, h, _] if *h == 0 || *h > convlab::limits::MAX_IMAGE_SIDE => bail!(
            "--input {s}: sides must be 1 to {} px",
            convlab::limits::MAX_IMAGE_SIDE
        ),
        [c, h, w] if h == w && (*c == 1 || *c == 3) => Ok((*c, *h)),
        _ => bail!("--input {s}: expected CxHxW with C 1 or 3 and H = W"),
    }
}

#[derive(Serialize)]
struct DataReport {
    data: String,
    transform: String,
    size: usize,
    workers: usize,
    batch: usize,
    images: usize,
    seconds: f64,
    images_per_sec: f64,
    images_per_sec_per_worker: f64,
    peak_rss_mb: Option<f64>,
}

fn run_data(a: &BenchArgs) -> Result<()> {
    use convlab::data::transforms::{Augment, CropMode, Mode, Transform};
    use convlab::data::{DataSpec, Loader, LoaderConfig, Subset, open};
    use std::sync::Arc;
    let splits = open(&DataSpec {
        path: a.data.clone(),
        format: None,
        val_fraction: 0.0,
        seed: 0,
        limit_train: None,
        limit_val: None,
    })?;
    let (augment, default_size) = match a.transform {
        Preset::Cifar => (
            Augment {
                crop: CropMode::Pad,
                crop_padding: 4,
                ..Augment::default()
            },
            32,
        ),
        Preset::Imagenet => (
            Augment {
                crop: CropMode::Resized,
                ..Augment::default()
            },
            224,
        ),
    };
    let size = a.size.unwrap_or(default_size);
    let c = splits.channels;
    let t = Transform {
        channels: c,
        size,
        mean: vec![0.5; c],
        std: vec![0.25; c],
        pca: None,
        mode: Mode::Train(augment),
    };
    let mut data = splits.train.clone();
    if let Some(n) = a.images.filter(|&n| n < data.len()) {
        data = Arc::new(Subset {
            base: data,
            indices: (0..n).collect(),
        });
    }
    let cfg = LoaderConfig {
        batch_size: a.batch,
        train: true,
        drop_last: false,
        workers: a.workers,
        prefetch: 4,
        seed: 0,
        skip_bad: false,
        sampler: Default::default(),
    };
    let loader = Loader::new(data.clone(), t, cfg)?;
    let t0 = std::time::Instant::now();
    let mut images = 0;
    let mut checksum = 0f64;
    for b in loader.epoch(0) {
        let b = b?;
        images += b.len();
        checksum += b.images[0] as f64;
    }
    let seconds = t0.elapsed().as_secs_f64();
    std::hint::black_box(checksum);
    let r = DataReport {
        data: a
            .data
            .as_ref()
            .map_or("built-in".into(), |p| p.display().to_string()),
        transform: format!("{:?}", a.transform).to_lowercase(),
        size,
        workers: a.workers,
        batch: a.batch,
        images,
        seconds,
        images_per_sec: images as f64 / seconds,
        images_per_sec_per_worker: images as f64 / seconds / a.workers.max(1) as f64,
        peak_rss_mb: convlab::run::peak_rss(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "loader {} {} at {} px, {} workers, batch {}: {} images in {:.2} s = {:.0} img/s \
             ({:.0} per worker), peak RSS {}",
            r.data,
            r.transform,
            r.size,
            r.workers,
            r.batch,
            r.images,
            r.seconds,
            r.images_per_sec,
            r.images_per_sec_per_worker,
            r.peak_rss_mb.map_or("n/a".into(), |m| format!("{m:.0} MB"))
        );
    }
    Ok(())
}

/// The model to time: `--model` and `--input` over the recipe's model section (its options:
/// batch norm, widths, stem, ...), the class count from the recipe or `--classes`.
fn model_config(a: &BenchArgs, recipe: &convlab::recipe::Recipe) -> Result<ModelConfig> {
    let from_recipe = a.recipe.is_some();
    let name = match (&a.model, from_recipe) {
        (Some(m), _) => ModelName::from_name(m)?,
        (None, true) => recipe.model.name,
        (None, false) => ModelName::from_name("bench-vgg")?,
    };
    let (c, s) = match &a.input {
        Some(i) => parse_input(i)?,
        None if from_recipe => {
            let c = match recipe.model.in_channels {
                0 => 3,
                c => c,
            };
            let s = match recipe.model.input_size {
                0 => name.default_input_size(),
                s => s,
            };
            (c, s)
        }
        None => (3, 32),
    };
    let mut cfg = if from_recipe && name == recipe.model.name {
        recipe.model.clone()
    } else {
        ModelConfig::for_model(name, a.classes, c)
    };
    if cfg.num_classes == 0 {
        cfg.num_classes = a.classes;
    }
    cfg.in_channels = c;
    cfg.input_size = s;
    cfg.validate()?;
    Ok(cfg)
}

pub fn run(a: BenchArgs) -> Result<()> {
    if matches!(a.what, What::Data) {
        return run_data(&a);
    }
    device::set_threads(a.runtime.threads)?;
    let recipe = match &a.recipe {
        Some(p) => convlab::recipe::Recipe::resolve(Some(p), &[])?,
        None => convlab::recipe::Recipe::default(),
    };
    let cfg = model_config(&a, &recipe)?;
    let model_name = cfg.name.to_string();
    let input = format!("{}x{}x{}", cfg.in_channels, cfg.input_size, cfg.input_size);
    let base = device::pick(&a.runtime.device)?;
    let (mode, dev) = match a.what {
        What::Train => (Mode::Train, base.autodiff()),
        What::Infer | What::Data => (Mode::Infer, base),
    };
    let asked: Precision = match &a.precision {
        Some(p) => p.parse().map_err(anyhow::Error::msg)?,
        None => recipe.precision,
    };
    let precision = device::precision(asked, &dev, &format!("--precision {asked}"));
    let t = bench::run(
        &cfg,
        mode,
        a.batch,
        3,
        a.steps.max(1),
        &recipe,
        precision,
        &dev,
    )?;
    let (ips, slowest, fastest) = t.images_per_sec();
    // A backward pass costs about twice the forward pass.
    let flops = cfg.flops(&dev)? * a.batch as f64 * if mode == Mode::Train { 3.0 } else { 1.0 };
    let r = Report {
        model: model_name,
        input,
        batch: a.batch,
        grad_accum_steps: match mode {
            Mode::Train => {
                convlab::pipeline::step::micro_batches(a.batch, recipe.grad_accum_steps).len()
            }
            Mode::Infer => 1,
        },
        threads: rayon::current_num_threads(),
        device: a.runtime.device.clone(),
        images_per_sec: ips,
        ms_per_step: 1e3 * t.median(),
        peak_rss_mb: convlab::run::peak_rss(),
        gflops_per_sec: flops / t.median() / 1e9,
        kernels: if convlab::kernels::extended_on(&dev) {
            "convlab"
        } else {
            "backend"
        }
        .into(),
        precision,
        matrix_unit: if convlab::kernels::active_on(&dev) {
            convlab::kernels::matrix_unit(precision)
        } else {
            "backend"
        }
        .into(),
        activations: if precision == Precision::Bf16
            && dev.is_autodiff()
            && convlab::kernels::active_on(&dev)
            && convlab::kernels::activation_dtype() == convlab::kernels::ActivationDtype::Bf16
            && cfg.name.family().keeps_bf16_activations()
        {
            "bf16"
        } else {
            "f32"
        }
        .into(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} {:?} {} batch {}{} on {} ({} kernels, {} on {}, {} activations, {} threads): {:.1} img/s \
             median (slowest step {:.1}, fastest {:.1}), {:.1} ms/step, {:.1} GFLOP/s, peak RSS {}",
            r.model,
            a.what,
            r.input,
            r.batch,
            if r.grad_accum_steps > 1 {
                format!(" in {} passes", r.grad_accum_steps)
            } else {
                String::new()
            },
            r.device,
            r.kernels,
            r.precision,
            r.matrix_unit,
            r.activations,
            r.threads,
            ips,
            slowest,
            fastest,
            r.ms_per_step,
            r.gflops_per_sec,
            r.peak_rss_mb.map_or("n/a".into(), |m| format!("{m:.0} MB"))
        );
    }
    Ok(())
}
