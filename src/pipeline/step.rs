//! One training step, the function the trainer's loop calls for every batch and `convlab bench`
//! times, so the benchmark measures exactly what training runs.
//!
//! For a batch `x` `[B, C, H, W]` and soft targets `q` `[B, K]` (one-hot, label-smoothed or
//! mixed): logits = f(x); loss = CE(logits + a, q) + aux_weight * sum_a CE(aux_a + a, q)
//! (GoogLeNet's auxiliary heads, Szegedy et al. 2014; `a` the logit adjustment, 0 unless on); with a teacher, loss = (1 - alpha) * loss +
//! alpha * KD(logits, teacher(x), T) (Hinton et al. 2015); forward and backward in the
//! model's precision ([`Model::with_precision`]), then the optimiser update in fp32 and, with
//! EMA on, the weight average (Polyak averaging) folded in.
//!
//! With gradient accumulation (`grad_accum_steps = k`) the batch is cut into `k` contiguous
//! slices of `n_i` images; slice `i`'s loss is weighted `n_i / B` before its backward pass, so
//! the summed gradients are the whole batch's mean-loss gradient, and one optimiser update
//! follows. Only the activations of one slice are alive at a time, so peak memory falls
//! with `k` while the update stays the same, except where a layer looks across the batch:
//! batch norm normalises each slice with that slice's statistics and updates its running
//! averages once per slice (as accumulation does in PyTorch and timm).

use std::collections::BTreeSet;
use std::ops::Range;

use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::prelude::*;

use super::distill::{Teacher, kd_loss};
use crate::models::Model;
use crate::recipe::Recipe;
use crate::train::ema::Ema;
use crate::train::loss::soft_cross_entropy;
use crate::train::optim::Optimizer;

/// Knowledge distillation inside a step.
pub struct Distill<'a> {
    pub teacher: &'a Teacher,
    /// Weight of the distillation term.
    pub alpha: f64,
    /// Softmax temperature.
    pub temperature: f64,
    /// The student's normalisation, which the teacher undoes to apply its own.
    pub mean: &'a [f32],
    pub std: &'a [f32],
}

/// Everything a step needs besides the model, the optimiser and the batch.
pub struct StepConfig<'a> {
    /// Weight of each auxiliary classifier's loss (GoogLeNet: 0.3).
    pub aux_weight: f64,
    /// Global gradient-norm clip (0 = none), applied to the accumulated gradients.
    pub grad_clip_norm: f64,
    /// Forward and backward passes per optimiser step (1 = the whole batch at once).
    pub grad_accum_steps: usize,
    /// Per-class offsets added to the logits (and auxiliary logits) inside the loss only:
    /// logit adjustment's `tau * log(prior)` ([`crate::train::loss::logit_adjustment`]), set
    /// by the trainer from the training split's class counts.
    pub logit_adjust: Option<Vec<f32>>,
    pub distill: Option<Distill<'a>>,
}

impl<'a> StepConfig<'a> {
    /// The step a recipe trains with, distilling from `distill` when the recipe has a teacher.
    /// (The precision is the model's: [`Model::with_precision`].)
    pub fn from_recipe(recipe: &Recipe, distill: Option<Distill<'a>>) -> Self {
        StepConfig {
            aux_weight: recipe.loss.aux_weight,
            grad_clip_norm: recipe.regularisation.grad_clip_norm,
            grad_accum_steps: recipe.grad_accum_steps,
            logit_adjust: None,
            distill,
        }
    }
}

/// The optimiser state and weight average a recipe trains `model` with: `[optim]`, fine-tuning's
/// backbone learning rate (`finetune.backbone_lr_mult`, over every parameter outside the
/// classifier), and EMA when `regularisation.ema_decay > 0`. Also returns the classifier's
/// parameter paths (empty unless fine-tuning).
pub fn optimizer_for(
    recipe: &Recipe,
    model: &Model,
    device: &Device,
) -> (Optimizer, Option<Ema>, BTreeSet<String>) {
    let mut opt = Optimizer::new(recipe.optim.clone());
    let ft = &recipe.finetune;
    let head = if ft.active() {
        let head = crate::train::finetune::classifier_keys(model, device);
        if ft.backbone_lr_mult != 1.0 {
            opt = opt.with_backbone_lr(ft.backbone_lr_mult, head.clone());
        }
        head
    } else {
        BTreeSet::new()
    };
    let decay = recipe.regularisation.ema_decay;
    let ema = (decay > 0.0).then(|| Ema::new(decay));
    (opt, ema, head)
}

/// What a step returns: the updated model, the loss and the logits (still on the device, so
/// the caller decides when to read them).
pub struct StepOut {
    pub model: Model,
    pub loss: Tensor<1>,
    pub logits: Tensor<2>,
}

/// One optimiser step at learning rate `lr` (`model` on an autodiff device) on the batch `x`
/// `[B, C, H, W]` with targets `[B, K]`, in `cfg.grad_accum_steps` slices, then the EMA update
/// when `ema` is given.
pub fn train_step(
    model: Model,
    opt: &mut Optimizer,
    ema: Option<&mut Ema>,
    x: Tensor<4>,
    targets: Tensor<2>,
    lr: f64,
    cfg: &StepConfig,
) -> StepOut {
    let b = x.dims()[0];
    let slices = micro_batches(b, cfg.grad_accum_steps);
    let (grads, loss, logits) = if slices.len() == 1 {
        let (loss, logits) = batch_loss(&model, x, targets, cfg);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        (grads, loss, logits)
    } else {
        let mut acc = GradientsAccumulator::new();
        let (mut losses, mut logits) = (Vec::new(), Vec::new());
        for r in slices {
            let weight = r.len() as f64 / b as f64;
            let xs = x.clone().narrow(0, r.start, r.len());
            let ts = targets.clone().narrow(0, r.start, r.len());
            let (loss, l) = batch_loss(&model, xs, ts, cfg);
            let loss = loss * weight;
            acc.accumulate(&model, GradientsParams::from_grads(loss.backward(), &model));
            // Detached, so that the slice's graph (its activations) is freed here.
            losses.push(loss.detach());
            logits.push(l.detach());
        }
        (
            acc.grads(),
            Tensor::cat(losses, 0).sum(),
            Tensor::cat(logits, 0),
        )
    };
    let model = opt.step(lr, model, grads, cfg.grad_clip_norm).0;
    if let Some(e) = ema {
        e.update(&model.valid());
    }
    StepOut {
        model,
        loss,
        logits,
    }
}

/// The step's loss on one batch or slice, and the logits.
fn batch_loss(
    model: &Model,
    x: Tensor<4>,
    targets: Tensor<2>,
    cfg: &StepConfig,
) -> (Tensor<1>, Tensor<2>) {
    let out = model.forward_train(x.clone());
    let logits = out.logits;
    let adjust = |l: Tensor<2>| match &cfg.logit_adjust {
        Some(a) => {
            let a = Tensor::<2>::from_data(TensorData::new(a.clone(), [1, a.len()]), &l.device());
            l + a
        }
        None => l,
    };
    let mut loss = soft_cross_entropy(adjust(logits.clone()), targets.clone());
    for aux in out.aux {
        loss = loss + soft_cross_entropy(adjust(aux), targets.clone()) * cfg.aux_weight;
    }
    if let Some(d) = &cfg.distill {
        let tl = Tensor::from_inner(d.teacher.logits(x, d.mean, d.std));
        loss = loss * (1.0 - d.alpha) + kd_loss(logits.clone(), tl, d.temperature) * d.alpha;
    }
    (loss, logits)
}

/// The contiguous slices a batch of `b` images is cut into for `k` accumulation steps: `k`
/// slices (at most `b`) whose sizes differ by at most one, the larger first.
pub fn micro_batches(b: usize, k: usize) -> Vec<Range<usize>> {
    let k = k.clamp(1, b.max(1));
    let (base, extra) = (b / k, b % k);
    let mut start = 0;
    (0..k)
        .map(|i| {
            let n = base + usize::from(i < extra);
            let r = start..start + n;
            start += n;
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_cover_the_batch_in_near_equal_slices() {
        assert_eq!(micro_batches(10, 1), vec![0..10]);
        assert_eq!(micro_batches(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(micro_batches(8, 4), vec![0..2, 2..4, 4..6, 6..8]);
        // More steps than images: one image a slice.
        assert_eq!(micro_batches(3, 8), vec![0..1, 1..2, 2..3]);
        assert_eq!(micro_batches(5, 0), vec![0..5]);
        for b in 1..40 {
            for k in 1..12 {
                let s = micro_batches(b, k);
                assert_eq!(s.len(), k.min(b));
                assert_eq!(s[0].start, 0);
                assert_eq!(s.last().unwrap().end, b);
                assert!(s.windows(2).all(|w| w[0].end == w[1].start));
                let (lo, hi) = (
                    s.iter().map(|r| r.len()).min(),
                    s.iter().map(|r| r.len()).max(),
                );
                assert!(hi.unwrap() - lo.unwrap() <= 1);
            }
        }
    }
}
