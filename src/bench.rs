//! Throughput measurement of the real training step and of inference (`convlab bench`).
//!
//! A training step is the trainer's own function (`pipeline::train_step`: forward, losses
//! including GoogLeNet's auxiliary heads, backward in the current precision, the optimiser
//! update), with the default recipe's optimiser and loss weights. Inputs are random tensors
//! made once, so the data loader is not measured here.

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::Distribution;
use serde::Serialize;

use crate::error::Result;
use crate::models::ModelConfig;
use crate::pipeline::{StepConfig, train_step};
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

/// Times `steps` training steps (`device` must be an autodiff device) or inference steps.
pub fn run(
    cfg: &ModelConfig,
    mode: Mode,
    batch: usize,
    warmup: usize,
    steps: usize,
    device: &Device,
) -> Result<Timings> {
    device.seed(0);
    let mut model = cfg.build(device)?;
    let s = cfg.input_size;
    let k = cfg.num_classes;
    let x = Tensor::<4>::random(
        [batch, cfg.in_channels, s, s],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let labels: Vec<usize> = (0..batch).map(|i| i % k).collect();
    let targets = Tensor::<2>::from_data(
        TensorData::new(smoothed_targets(&labels, k, 0.0), [batch, k]),
        device,
    );
    let recipe = crate::recipe::Recipe::default();
    let mut opt = Optimizer::new(recipe.optim.clone());
    let step = StepConfig {
        precision: crate::kernels::precision(),
        aux_weight: recipe.loss.aux_weight,
        grad_clip_norm: recipe.regularisation.grad_clip_norm,
        distill: None,
    };
    let eval = model.valid();
    let eval_x = x.clone().inner();
    let mut step_seconds = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        let t0 = Instant::now();
        match mode {
            Mode::Train => {
                let out = train_step(model, &mut opt, x.clone(), targets.clone(), 0.01, &step);
                model = out.model;
                let _ = out.loss.into_scalar::<f32>();
            }
            Mode::Infer => {
                let y = eval.forward(eval_x.clone());
                let _ = y.into_data();
            }
        }
        if i >= warmup {
            step_seconds.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(Timings {
        step_seconds,
        batch,
    })
}

/// Peak resident set size of this process in MB (`VmHWM`), where the OS reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
