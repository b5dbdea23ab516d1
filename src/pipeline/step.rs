//! One training step, the function the trainer's loop calls for every batch and `convlab bench`
//! times, so the benchmark measures exactly what training runs.
//!
//! For a batch `x` `[B, C, H, W]` and soft targets `q` `[B, K]` (one-hot, label-smoothed or
//! mixed): logits = f(x); loss = CE(logits, q) + aux_weight * sum_a CE(aux_a, q) (GoogLeNet's
//! auxiliary heads, Szegedy et al. 2014); with a teacher, loss = (1 - alpha) * loss +
//! alpha * KD(logits, teacher(x), T) (Hinton et al. 2015); forward and backward in the
//! model's precision ([`Model::with_precision`]), then the optimiser update in fp32 and, with
//! EMA on, the weight average (Polyak averaging) folded in.

use std::collections::BTreeSet;

use burn::optim::GradientsParams;
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
    /// Global gradient-norm clip (0 = none).
    pub grad_clip_norm: f64,
    pub distill: Option<Distill<'a>>,
}

impl<'a> StepConfig<'a> {
    /// The step a recipe trains with, distilling from `distill` when the recipe has a teacher.
    /// (The precision is the model's: [`Model::with_precision`].)
    pub fn from_recipe(recipe: &Recipe, distill: Option<Distill<'a>>) -> Self {
        StepConfig {
            aux_weight: recipe.loss.aux_weight,
            grad_clip_norm: recipe.regularisation.grad_clip_norm,
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

/// One optimiser step at learning rate `lr` (`model` on an autodiff device), then the EMA
/// update when `ema` is given.
pub fn train_step(
    model: Model,
    opt: &mut Optimizer,
    ema: Option<&mut Ema>,
    x: Tensor<4>,
    targets: Tensor<2>,
    lr: f64,
    cfg: &StepConfig,
) -> StepOut {
    let out = model.forward_train(x.clone());
    let logits = out.logits;
    let mut loss = soft_cross_entropy(logits.clone(), targets.clone());
    for aux in out.aux {
        loss = loss + soft_cross_entropy(aux, targets.clone()) * cfg.aux_weight;
    }
    if let Some(d) = &cfg.distill {
        let tl = Tensor::from_inner(d.teacher.logits(x, d.mean, d.std));
        loss = loss * (1.0 - d.alpha) + kd_loss(logits.clone(), tl, d.temperature) * d.alpha;
    }
    let grads = GradientsParams::from_grads(loss.backward(), &model);
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
