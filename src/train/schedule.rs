//! Learning rate as a function of the optimiser step (updated every iteration).
//!
//! Every schedule starts with an optional linear warmup (Goyal et al. 2017) and then follows
//! one of: a half-cosine to `min_lr` (Loshchilov & Hutter 2017), a constant, a step decay
//! (`gamma` every `step_epochs`), a multi-step decay (`gamma` at each of `milestones`), an
//! exponential decay (`gamma` per epoch, applied continuously), or reduce-on-plateau: divide by
//! `1 / factor` when the validation metric has not improved for `patience` epochs (the rule
//! VGG and AlexNet trained with: "divide the learning rate by 10 when the validation accuracy
//! stops improving").

use serde::{Deserialize, Serialize};

/// Learning-rate schedule kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// Half-cosine from the peak to `min_lr` over the run (Loshchilov & Hutter 2017).
    Cosine,
    /// Constant after warmup.
    Constant,
    /// Multiply by `gamma` every `step_epochs` epochs.
    Step,
    /// Multiply by `gamma` at each epoch in `milestones`.
    Multistep,
    /// Multiply by `gamma` per epoch, continuously.
    Exponential,
    /// Multiply by `gamma` when `plateau_metric` has not improved for `patience` epochs.
    Plateau,
}

/// A validation metric the trainer watches: reduce-on-plateau's (`schedule.plateau_metric`)
/// and the one that picks the best checkpoint (`best_metric`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValMetric {
    ValLoss,
    #[default]
    ValTop1,
    /// The mean of the per-class accuracies: what top-1 would be if every class were equally
    /// frequent.
    ValBalancedTop1,
    /// The mean of the per-class F1 scores.
    ValMacroF1,
}

/// The name reduce-on-plateau's metric had before the best checkpoint could watch one too.
pub type PlateauMetric = ValMetric;

/// One epoch's validation scores.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ValScores {
    pub loss: f64,
    pub top1: f64,
    pub balanced_top1: f64,
    pub macro_f1: f64,
}

impl ValMetric {
    /// The metric's value in "higher is better" form (the loss negated).
    pub fn score(self, v: &ValScores) -> f64 {
        match self {
            ValMetric::ValLoss => -v.loss,
            ValMetric::ValTop1 => v.top1,
            ValMetric::ValBalancedTop1 => v.balanced_top1,
            ValMetric::ValMacroF1 => v.macro_f1,
        }
    }

    /// The recipe's (and `metrics.jsonl`'s) name of the metric.
    pub fn as_str(self) -> &'static str {
        match self {
            ValMetric::ValLoss => "val_loss",
            ValMetric::ValTop1 => "val_top1",
            ValMetric::ValBalancedTop1 => "val_balanced_top1",
            ValMetric::ValMacroF1 => "val_macro_f1",
        }
    }
}

/// `[schedule]`: evaluated every optimiser step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    /// Epochs of linear warmup from `warmup_start_factor * peak` to the peak.
    pub warmup_epochs: f64,
    pub warmup_start_factor: f64,
    /// Floor of every schedule (the cosine's end point).
    pub min_lr: f64,
    /// Decay factor of step, multistep, exponential and plateau schedules.
    pub gamma: f64,
    /// Step schedule: epochs between decays.
    pub step_epochs: usize,
    /// Multistep schedule: epochs at which to decay.
    pub milestones: Vec<usize>,
    /// Plateau schedule: the metric, epochs without improvement tolerated, and the smallest
    /// change that counts as an improvement.
    pub plateau_metric: PlateauMetric,
    pub patience: usize,
    pub plateau_threshold: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            kind: ScheduleKind::Cosine,
            warmup_epochs: 0.0,
            warmup_start_factor: 0.1,
            min_lr: 0.0,
            gamma: 0.1,
            step_epochs: 30,
            milestones: Vec::new(),
            plateau_metric: PlateauMetric::ValTop1,
            patience: 2,
            plateau_threshold: 0.0,
        }
    }
}

/// Reduce-on-plateau state, carried across epochs (and checkpoints).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plateau {
    /// Current multiplier of the peak learning rate.
    pub scale: f64,
    /// Best metric seen, in "higher is better" form.
    pub best: Option<f64>,
    /// Epochs since the last improvement.
    pub bad_epochs: usize,
}

impl Default for Plateau {
    fn default() -> Self {
        Plateau {
            scale: 1.0,
            best: None,
            bad_epochs: 0,
        }
    }
}

impl Plateau {
    /// Records one epoch's validation scores; returns true when the rate was reduced.
    pub fn observe(&mut self, cfg: &ScheduleConfig, scores: &ValScores) -> bool {
        let v = cfg.plateau_metric.score(scores);
        match self.best {
            Some(b) if v <= b + cfg.plateau_threshold => {
                self.bad_epochs += 1;
                if self.bad_epochs > cfg.patience {
                    self.scale *= cfg.gamma;
                    self.bad_epochs = 0;
                    return true;
                }
            }
            _ => {
                self.best = Some(v);
                self.bad_epochs = 0;
            }
        }
        false
    }
}

/// The learning rate at `step` (0-based) of `total` steps, `per_epoch` steps an epoch, for a
/// peak (already batch-scaled) rate `peak`; `plateau` is the reduce-on-plateau multiplier.
pub fn lr_at(
    cfg: &ScheduleConfig,
    peak: f64,
    step: usize,
    total: usize,
    per_epoch: usize,
    plateau: f64,
) -> f64 {
    let warm = (cfg.warmup_epochs * per_epoch as f64).round() as usize;
    if step < warm {
        let f =
            cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * step as f64 / warm as f64;
        return peak * f;
    }
    let epoch = step as f64 / per_epoch.max(1) as f64;
    let lr = match cfg.kind {
        ScheduleKind::Constant => peak,
        ScheduleKind::Cosine => {
            let span = total.saturating_sub(warm).max(1);
            let t = ((step - warm) as f64 / span as f64).min(1.0);
            return cfg.min_lr
                + (peak - cfg.min_lr) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0;
        }
        ScheduleKind::Step => {
            peak * cfg
                .gamma
                .powi((epoch / cfg.step_epochs.max(1) as f64).floor() as i32)
        }
        ScheduleKind::Multistep => {
            let passed = cfg
                .milestones
                .iter()
                .filter(|&&m| epoch >= m as f64)
                .count();
            peak * cfg.gamma.powi(passed as i32)
        }
        ScheduleKind::Exponential => peak * cfg.gamma.powf(epoch),
        ScheduleKind::Plateau => peak * plateau,
    };
    lr.max(cfg.min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(kind: ScheduleKind) -> ScheduleConfig {
        ScheduleConfig {
            kind,
            warmup_epochs: 0.0,
            ..ScheduleConfig::default()
        }
    }

    #[test]
    fn warmup_then_cosine_hand_computed() {
        let c = ScheduleConfig {
            warmup_epochs: 1.0,
            warmup_start_factor: 0.0,
            ..cfg(ScheduleKind::Cosine)
        };
        // 10 steps an epoch, 5 epochs: warmup over steps 0..10, cosine over 40 steps.
        assert_eq!(lr_at(&c, 0.4, 0, 50, 10, 1.0), 0.0);
        assert!((lr_at(&c, 0.4, 5, 50, 10, 1.0) - 0.2).abs() < 1e-12);
        assert!((lr_at(&c, 0.4, 10, 50, 10, 1.0) - 0.4).abs() < 1e-12);
        assert!((lr_at(&c, 0.4, 30, 50, 10, 1.0) - 0.2).abs() < 1e-12);
        assert!(lr_at(&c, 0.4, 50, 50, 10, 1.0).abs() < 1e-12);
    }

    #[test]
    fn step_multistep_exponential_hand_computed() {
        let mut c = cfg(ScheduleKind::Step);
        c.step_epochs = 2;
        c.gamma = 0.1;
        // Epoch 0-1: 1.0, epoch 2-3: 0.1, epoch 4: 0.01 (10 steps an epoch).
        assert_eq!(lr_at(&c, 1.0, 19, 100, 10, 1.0), 1.0);
        assert!((lr_at(&c, 1.0, 20, 100, 10, 1.0) - 0.1).abs() < 1e-12);
        assert!((lr_at(&c, 1.0, 45, 100, 10, 1.0) - 0.01).abs() < 1e-12);
        c.kind = ScheduleKind::Multistep;
        c.milestones = vec![3, 7];
        assert_eq!(lr_at(&c, 1.0, 29, 100, 10, 1.0), 1.0);
        assert!((lr_at(&c, 1.0, 30, 100, 10, 1.0) - 0.1).abs() < 1e-12);
        assert!((lr_at(&c, 1.0, 75, 100, 10, 1.0) - 0.01).abs() < 1e-12);
        c.kind = ScheduleKind::Exponential;
        c.gamma = 0.5;
        // Half an epoch in: 0.5^0.5.
        assert!((lr_at(&c, 1.0, 5, 100, 10, 1.0) - 0.5f64.sqrt()).abs() < 1e-12);
    }

    /// Observes an epoch with validation loss `loss` and top-1 `top1` (balanced top-1 and
    /// macro F1 a fixed fraction of it, so that a test on them sees the same ups and downs).
    fn observe(p: &mut Plateau, c: &ScheduleConfig, loss: f64, top1: f64) -> bool {
        let scores = ValScores {
            loss,
            top1,
            balanced_top1: 0.9 * top1,
            macro_f1: 0.8 * top1,
        };
        p.observe(c, &scores)
    }

    #[test]
    fn metrics_score_higher_is_better() {
        let v = ValScores {
            loss: 0.7,
            top1: 0.9,
            balanced_top1: 0.6,
            macro_f1: 0.5,
        };
        let got: Vec<f64> = [
            ValMetric::ValLoss,
            ValMetric::ValTop1,
            ValMetric::ValBalancedTop1,
            ValMetric::ValMacroF1,
        ]
        .iter()
        .map(|m| m.score(&v))
        .collect();
        assert_eq!(got, [-0.7, 0.9, 0.6, 0.5]);
    }

    #[test]
    fn plateau_divides_by_ten_after_patience() {
        let mut c = cfg(ScheduleKind::Plateau);
        c.patience = 1;
        c.gamma = 0.1;
        c.plateau_metric = PlateauMetric::ValTop1;
        c.min_lr = 0.001;
        let mut p = Plateau::default();
        assert!(!observe(&mut p, &c, 1.0, 0.50)); // first: best
        assert!(!observe(&mut p, &c, 1.0, 0.60)); // improved
        assert!(!observe(&mut p, &c, 1.0, 0.60)); // 1 bad epoch = patience: wait
        assert!(observe(&mut p, &c, 1.0, 0.59)); // 2 bad epochs: reduce
        assert!((lr_at(&c, 0.1, 0, 10, 10, p.scale) - 0.01).abs() < 1e-12);
        assert!(!observe(&mut p, &c, 1.0, 0.70));
        p.scale = 1e-6;
        assert_eq!(lr_at(&c, 0.1, 0, 10, 10, p.scale), 0.001); // floor
        // On val loss lower is better.
        c.plateau_metric = PlateauMetric::ValLoss;
        let mut p = Plateau::default();
        observe(&mut p, &c, 1.0, 0.0);
        observe(&mut p, &c, 0.9, 0.0);
        assert_eq!(p.bad_epochs, 0);
        observe(&mut p, &c, 0.95, 0.0);
        assert_eq!(p.bad_epochs, 1);
        // Balanced top-1 watched as top-1 is.
        c.plateau_metric = ValMetric::ValBalancedTop1;
        let mut p = Plateau::default();
        observe(&mut p, &c, 1.0, 0.5);
        observe(&mut p, &c, 1.0, 0.4);
        assert!(observe(&mut p, &c, 1.0, 0.45));
    }
}
