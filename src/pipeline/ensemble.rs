//! Model fusion: average the softmax outputs of several runs (optionally weighted) over the same
//! images. Members may be different architectures with different input sizes, channel counts
//! and normalisations: each sees the images through its own run's transform.

use std::path::PathBuf;

use burn::prelude::*;
use serde::Serialize;

use crate::data::{Dataset, open};
use crate::error::{Error, Result};
use crate::eval::metrics::Accumulator;
use crate::models::Model;
use crate::pipeline::load_model;
use crate::recipe::DataConfig;
use crate::recipe::RunRecipe;
use crate::run::RunDir;

/// One member's accuracy on its own.
#[derive(Clone, Debug, Serialize)]
pub struct MemberReport {
    pub run: String,
    pub model: String,
    pub weight: f64,
    pub top1: f64,
    pub top5: f64,
}

/// What `convlab ensemble` prints. Accuracies are fractions in [0, 1].
#[derive(Clone, Debug, Serialize)]
pub struct EnsembleReport {
    pub count: usize,
    pub members: Vec<MemberReport>,
    pub best_member_top1: f64,
    pub top1: f64,
    pub top5: f64,
}

/// Softmax probabilities of `model` over every image of `data` in order, `[N * K]`, averaged
/// over the run's own test-time views (`eval.tta` in its recipe).
fn probabilities(
    model: &Model,
    data: std::sync::Arc<dyn Dataset>,
    recipe: &crate::recipe::Recipe,
    device: &Device,
) -> Result<Vec<f32>> {
    let mut r = recipe.clone();
    r.data.skip_bad_images = false;
    let views = r.eval.views(r.eval.tta, r.model.input_size);
    Ok(super::probabilities(model, &r, data, &views, device)?.probs)
}

/// Adds `weight * p` into the running fusion `sum` (softmax averaging, AlexNet section 6).
pub fn accumulate(sum: &mut [f64], p: &[f32], weight: f64) {
    for (s, v) in sum.iter_mut().zip(p) {
        *s += weight * *v as f64;
    }
}

/// Evaluates each run in `runs` and their weighted average on the held-out split of `data`
/// (default: the first run's data).
pub fn ensemble(
    runs: &[PathBuf],
    weights: Option<&[f64]>,
    data: Option<DataConfig>,
    device: &Device,
) -> Result<EnsembleReport> {
    if runs.is_empty() {
        return Err(Error::Invalid("an ensemble needs at least one run".into()));
    }
    if let Some(w) = weights
        && w.len() != runs.len()
    {
        return Err(Error::Invalid(format!(
            "{} weights for {} runs",
            w.len(),
            runs.len()
        )));
    }
    if let Some(w) = weights {
        if let Some((i, x)) = w
            .iter()
            .enumerate()
            .find(|(_, x)| !(x.is_finite() && **x >= 0.0))
        {
            return Err(Error::Invalid(format!(
                "--weights: weight {} (of {}) is {x}; weights must be finite and >= 0",
                i + 1,
                runs[i].display()
            )));
        }
        if w.iter().sum::<f64>() <= 0.0 {
            return Err(Error::Invalid(
                "--weights: all weights are 0; at least one member must count".into(),
            ));
        }
    }
    let first = RunDir::open(&runs[0])?.read_recipe()?;
    let data_cfg = data.unwrap_or(first.data.clone());
    let splits = open(&data_cfg.spec(first.seed))?;
    let k = splits.classes.len();
    let n = splits.val.len();
    let labels: Vec<usize> = (0..n).map(|i| splits.val.label(i)).collect();
    let mut sum = vec![0f64; n * k];
    let mut members = Vec::new();
    let total_w: f64 = weights.map_or(runs.len() as f64, |w| w.iter().sum());
    for (m, dir) in runs.iter().enumerate() {
        let run = RunDir::open(dir)?;
        let recipe = run.read_recipe()?;
        if recipe.model.num_classes != k {
            return Err(Error::Invalid(format!(
                "{}: this member predicts {} classes but the ensemble's data ({}) has {k}; \
                 every member must be trained on the same classes",
                dir.display(),
                recipe.model.num_classes,
                data_cfg
                    .path
                    .as_ref()
                    .map_or("the built-in dataset".into(), |p| p.display().to_string())
            )));
        }
        let model = load_model(&run, &recipe, "best", device)?;
        let p = probabilities(&model, splits.val.clone(), &recipe, device)?;
        let w = weights.map_or(1.0, |w| w[m]);
        let mut acc = Accumulator::new(k);
        acc.add(
            &p.iter().map(|v| v.max(1e-12).ln()).collect::<Vec<_>>(),
            &labels,
        );
        let r = acc.finish(&splits.classes);
        accumulate(&mut sum, &p, w / total_w);
        members.push(MemberReport {
            run: dir.display().to_string(),
            model: recipe.model.name.to_string(),
            weight: w,
            top1: r.top1,
            top5: r.top5,
        });
    }
    let mut acc = Accumulator::new(k);
    let logp: Vec<f32> = sum.iter().map(|v| (v.max(1e-12)).ln() as f32).collect();
    acc.add(&logp, &labels);
    let r = acc.finish(&splits.classes);
    Ok(EnsembleReport {
        count: n,
        best_member_top1: members.iter().map(|m| m.top1).fold(0.0, f64::max),
        members,
        top1: r.top1,
        top5: r.top5,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Top-1 of `[N * K]` scores against labels.
    fn top1(p: &[f64], labels: &[usize], k: usize) -> f64 {
        let hits = p
            .chunks_exact(k)
            .zip(labels)
            .filter(|(row, l)| {
                let f: Vec<f32> = row.iter().map(|&v| v as f32).collect();
                crate::eval::metrics::argmax(&f) == **l
            })
            .count();
        hits as f64 / labels.len() as f64
    }

    #[test]
    fn complementary_members_fuse_into_a_better_ensemble() {
        // Four samples, two classes, all of class 0. Member A is confidently right on the first
        // two and narrowly wrong on the last two; member B the other way round. Each alone:
        // 50%. Averaged: every sample leans to class 0, 100%.
        let labels = [0, 0, 0, 0];
        let a = [0.9f32, 0.1, 0.9, 0.1, 0.45, 0.55, 0.45, 0.55];
        let b = [0.45f32, 0.55, 0.45, 0.55, 0.9, 0.1, 0.9, 0.1];
        let widen = |p: &[f32]| p.iter().map(|&v| v as f64).collect::<Vec<_>>();
        assert_eq!(top1(&widen(&a), &labels, 2), 0.5);
        assert_eq!(top1(&widen(&b), &labels, 2), 0.5);
        let mut sum = vec![0f64; 8];
        accumulate(&mut sum, &a, 0.5);
        accumulate(&mut sum, &b, 0.5);
        assert_eq!(top1(&sum, &labels, 2), 1.0);
        assert!((sum[0] - 0.675).abs() < 1e-6);
        // An ensemble of identical members is the member.
        let mut same = vec![0f64; 8];
        accumulate(&mut same, &a, 0.5);
        accumulate(&mut same, &a, 0.5);
        for (s, v) in same.iter().zip(&a) {
            assert!((s - *v as f64).abs() < 1e-7);
        }
    }
}
