//! Learning rate as a function of the optimiser step (updated every iteration).

use super::recipe::{ScheduleConfig, ScheduleKind};

/// The learning rate at `step` (0-based) of `total` steps, `per_epoch` steps an epoch, for a
/// peak (already batch-scaled) rate `peak`.
///
/// Warmup ramps linearly from `warmup_start_factor * peak` at step 0 to `peak` at the end of
/// `warmup_epochs`; after it, cosine decays as `min + (peak - min) * (1 + cos(pi * t)) / 2`
/// with `t` the fraction of post-warmup steps done.
pub fn lr_at(cfg: &ScheduleConfig, peak: f64, step: usize, total: usize, per_epoch: usize) -> f64 {
    let warm = (cfg.warmup_epochs * per_epoch as f64).round() as usize;
    if step < warm {
        let f =
            cfg.warmup_start_factor + (1.0 - cfg.warmup_start_factor) * step as f64 / warm as f64;
        return peak * f;
    }
    match cfg.kind {
        ScheduleKind::Constant => peak,
        ScheduleKind::Cosine => {
            let span = total.saturating_sub(warm).max(1);
            let t = ((step - warm) as f64 / span as f64).min(1.0);
            cfg.min_lr + (peak - cfg.min_lr) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_hand_computed() {
        let cfg = ScheduleConfig {
            kind: ScheduleKind::Cosine,
            warmup_epochs: 1.0,
            warmup_start_factor: 0.0,
            min_lr: 0.0,
        };
        // 10 steps an epoch, 5 epochs: warmup over steps 0..10, cosine over 40 steps.
        assert_eq!(lr_at(&cfg, 0.4, 0, 50, 10), 0.0);
        assert!((lr_at(&cfg, 0.4, 5, 50, 10) - 0.2).abs() < 1e-12);
        assert!((lr_at(&cfg, 0.4, 10, 50, 10) - 0.4).abs() < 1e-12);
        assert!((lr_at(&cfg, 0.4, 30, 50, 10) - 0.2).abs() < 1e-12);
        assert!(lr_at(&cfg, 0.4, 50, 50, 10).abs() < 1e-12);
    }
}
