//! Throughput measurement of the real training step and of inference (`convlab bench`).
//!
//! A training step is the trainer's own function (`pipeline::train_step`: forward, losses
//! including GoogLeNet's auxiliary heads and distillation, backward in the given precision, the
//! optimiser update, EMA), configured from a recipe exactly as the trainer configures it
//! (`StepConfig::from_recipe`; `convlab bench --recipe FILE`, else the default recipe).
//! Inputs are random tensors made once, so the data loader is not measured here
//! (`convlab bench data` measures it).

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::Distribution;
use serde::Serialize;

use crate::error::Result;
use crate::kernels::Precision;
use crate::models::{Model, ModelConfig};
use crate::pipeline::{Distill, StepConfig, Teacher, optimizer_for, train_step};
use crate::recipe::Recipe;
use crate::train::ema::Ema;
use crate::train::loss::smoothed_targets;
use crate::train::optim::Optimizer;

/// What to time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Infer,
}

/// Timings of `steps` steps after `warmup` untimed ones.
#[derive(Clone, Debug, Serialize)]
pub struct Timings {
    /// Seconds of each timed step.
    pub step_seconds: Vec<f64>,
    pub batch: usize,
}

impl Timings {
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.step_seconds.clone();
        v.sort_by(f64::total_cmp);
        v
    }
    /// Median seconds per step.
    pub fn median(&self) -> f64 {
        let v = self.sorted();
        v[v.len() / 2]
    }
    /// Images per second at the median step, and at the fastest and slowest steps.
    pub fn images_per_sec(&self) -> (f64, f64, f64) {
        let v = self.sorted();
        let b = self.batch as f64;
        (b / self.median(), b / v[v.len() - 1], b / v[0])
    }
}

/// Times `steps` training steps (`device` must be an autodiff device) or inference steps of a
/// model built from `cfg`, trained as `recipe` trains it: its optimiser, loss weights, label
/// smoothing, clipping, EMA and distillation teacher, through the trainer's own step.
#[allow(clippy::too_many_arguments)]
pub fn run(
    cfg: &ModelConfig,
    mode: Mode,
    batch: usize,
    warmup: usize,
    steps: usize,
    recipe: &Recipe,
    precision: Precision,
    device: &Device,
) -> Result<Timings> {
    device.seed(0);
    let model = cfg.build(device)?;
    let (x, targets) = random_batch(cfg, batch, recipe.loss.label_smoothing, device);
    let step_seconds = match mode {
        Mode::Train => {
            let teacher = match &recipe.distill.teacher {
                Some(dir) => Some(Teacher::load(
                    dir,
                    cfg.num_classes,
                    &device.clone().without_autodiff(),
                )?),
                None => None,
            };
            let (mut opt, mut ema, _) = optimizer_for(recipe, &model, device);
            let run = train_steps(
                model,
                &mut opt,
                ema.as_mut(),
                recipe,
                precision,
                teacher.as_ref(),
                x,
                targets,
                warmup + steps,
            );
            run.seconds[warmup..].to_vec()
        }
        Mode::Infer => {
            let eval = model.valid().with_precision(precision);
            let x = x.inner();
            let mut secs = Vec::with_capacity(warmup + steps);
            for _ in 0..warmup + steps {
                let t0 = Instant::now();
                let _ = eval.forward(x.clone()).into_data();
                secs.push(t0.elapsed().as_secs_f64());
            }
            secs[warmup..].to_vec()
        }
    };
    Ok(Timings {
        step_seconds,
        batch,
    })
}

/// A fixed random batch for `cfg` (`N(0, 1)` pixels, labels `i mod K`) and its soft targets.
pub fn random_batch(
    cfg: &ModelConfig,
    batch: usize,
    label_smoothing: f64,
    device: &Device,
) -> (Tensor<4>, Tensor<2>) {
    let (s, k) = (cfg.input_size, cfg.num_classes);
    let x = Tensor::<4>::random(
        [batch, cfg.in_channels, s, s],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let labels: Vec<usize> = (0..batch).map(|i| i % k).collect();
    let targets = Tensor::<2>::from_data(
        TensorData::new(smoothed_targets(&labels, k, label_smoothing), [batch, k]),
        device,
    );
    (x, targets)
}

/// What [`train_steps`] leaves: the trained model, each step's loss and seconds.
pub struct Trained {
    pub model: Model,
    pub losses: Vec<f32>,
    pub seconds: Vec<f64>,
}

/// `n` steps of [`crate::pipeline::train_step`] on one batch, at the recipe's peak learning
/// rate, each timed until its loss is on the host (as the trainer reads it), with the model in
/// training mode. `opt` and `ema` come from [`optimizer_for`], as the trainer makes them.
#[allow(clippy::too_many_arguments)]
pub fn train_steps(
    model: Model,
    opt: &mut Optimizer,
    mut ema: Option<&mut Ema>,
    recipe: &Recipe,
    precision: Precision,
    teacher: Option<&Teacher>,
    x: Tensor<4>,
    targets: Tensor<2>,
    n: usize,
) -> Trained {
    let c = x.dims()[1];
    let mean = recipe.data.mean.clone().unwrap_or_else(|| vec![0.0; c]);
    let std = recipe.data.std.clone().unwrap_or_else(|| vec![1.0; c]);
    let distill = teacher.map(|t| Distill {
        teacher: t,
        alpha: recipe.distill.alpha,
        temperature: recipe.distill.temperature,
        mean: &mean,
        std: &std,
    });
    let mut cfg = StepConfig::from_recipe(recipe, distill);
    if recipe.loss.logit_adjustment > 0.0 {
        // Random data has no class counts: equal priors, the same work in the step.
        let k = targets.dims()[1];
        let tau = recipe.loss.logit_adjustment;
        cfg.logit_adjust = Some(crate::train::loss::logit_adjustment(&vec![1; k], tau));
    }
    let lr = recipe.optim.scaled_lr(x.dims()[0]);
    // Training mode, as the trainer sets it at every epoch's start; `precision` as the trainer
    // gives the model.
    let mut model = model.train().with_precision(precision);
    let (mut losses, mut seconds) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for _ in 0..n {
        let t0 = Instant::now();
        let out = train_step(
            model,
            opt,
            ema.as_deref_mut(),
            x.clone(),
            targets.clone(),
            lr,
            &cfg,
        );
        model = out.model;
        losses.push(out.loss.into_scalar::<f32>());
        seconds.push(t0.elapsed().as_secs_f64());
    }
    Trained {
        model,
        losses,
        seconds,
    }
}
