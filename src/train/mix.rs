//! Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019) on a host batch, before it becomes
//! a tensor. Each sample is mixed with the batch reversed (sample `i` with `B - 1 - i`, as
//! timm's default), with `lam ~ Beta(alpha, alpha)`:
//!
//! - mixup: `x = lam * x_i + (1 - lam) * x_j`, `y = lam * y_i + (1 - lam) * y_j`;
//! - CutMix: a box of area `(1 - lam) * H * W` (clipped to the image) from `x_j` is pasted
//!   into `x_i`, and `lam` becomes the exact kept fraction `1 - box / (H * W)`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};

/// Which mix a batch got.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum Mixed {
    None,
    Mixup {
        lam: f64,
    },
    Cutmix {
        lam: f64,
        y0: usize,
        x0: usize,
        h: usize,
        w: usize,
    },
}

/// The mix settings (part of the recipe's `[loss]`).
#[derive(Clone, Copy, Debug)]
pub struct MixSettings {
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed at all.
    pub prob: f64,
}

/// Decides the mix of one batch from `seed`: mixup, CutMix (half the time each when both are
/// on), or nothing.
pub fn draw(s: &MixSettings, seed: u64, side: usize) -> Mixed {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mu, cm) = (s.mixup_alpha > 0.0, s.cutmix_alpha > 0.0);
    if !(mu || cm) || !rng.random_bool(s.prob.clamp(0.0, 1.0)) {
        return Mixed::None;
    }
    let use_cutmix = cm && (!mu || rng.random_bool(0.5));
    let alpha = if use_cutmix {
        s.cutmix_alpha
    } else {
        s.mixup_alpha
    };
    let lam: f64 = Beta::new(alpha, alpha).expect("alpha > 0").sample(&mut rng);
    if !use_cutmix {
        return Mixed::Mixup { lam };
    }
    let cut = (1.0 - lam).sqrt();
    let (h, w) = ((side as f64 * cut) as usize, (side as f64 * cut) as usize);
    let (cy, cx) = (rng.random_range(0..side), rng.random_range(0..side));
    let y0 = cy.saturating_sub(h / 2);
    let x0 = cx.saturating_sub(w / 2);
    let h = (cy + h / 2).min(side) - y0;
    let w = (cx + w / 2).min(side) - x0;
    let lam = 1.0 - (h * w) as f64 / (side * side) as f64;
    Mixed::Cutmix { lam, y0, x0, h, w }
}

/// Applies `mix` in place to `images` (`[B, C, S, S]`) and `targets` (`[B, K]`).
pub fn apply(
    mix: Mixed,
    images: &mut [f32],
    targets: &mut [f32],
    b: usize,
    c: usize,
    side: usize,
    k: usize,
) {
    let lam = match mix {
        Mixed::None => return,
        Mixed::Mixup { lam } | Mixed::Cutmix { lam, .. } => lam,
    };
    let n = c * side * side;
    let src_images = images.to_vec();
    let src_targets = targets.to_vec();
    for i in 0..b {
        let j = b - 1 - i;
        let (xi, xj) = (i * n, j * n);
        match mix {
            Mixed::Mixup { lam } => {
                for p in 0..n {
                    images[xi + p] = (lam * src_images[xi + p] as f64
                        + (1.0 - lam) * src_images[xj + p] as f64)
                        as f32;
                }
            }
            Mixed::Cutmix { y0, x0, h, w, .. } => {
                for ch in 0..c {
                    for y in y0..y0 + h {
                        let row = ch * side * side + y * side;
                        for x in x0..x0 + w {
                            images[xi + row + x] = src_images[xj + row + x];
                        }
                    }
                }
            }
            Mixed::None => {}
        }
        for q in 0..k {
            targets[i * k + q] = (lam * src_targets[i * k + q] as f64
                + (1.0 - lam) * src_targets[j * k + q] as f64)
                as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixup_targets_and_pixels_follow_the_formula() {
        // Two 1x1 grey images 0 and 10, one-hot labels 0 and 1, lam = 0.3.
        let mut x = vec![0.0, 10.0];
        let mut y = vec![1.0, 0.0, 0.0, 1.0];
        apply(Mixed::Mixup { lam: 0.3 }, &mut x, &mut y, 2, 1, 1, 2);
        assert!((x[0] - 7.0).abs() < 1e-6 && (x[1] - 3.0).abs() < 1e-6);
        assert!((y[0] - 0.3).abs() < 1e-6 && (y[1] - 0.7).abs() < 1e-6);
        assert!((y[2] - 0.7).abs() < 1e-6 && (y[3] - 0.3).abs() < 1e-6);
    }

    #[test]
    fn cutmix_box_and_lambda_agree() {
        let s = MixSettings {
            mixup_alpha: 0.0,
            cutmix_alpha: 1.0,
            prob: 1.0,
        };
        for seed in 0..50 {
            let Mixed::Cutmix { lam, y0, x0, h, w } = draw(&s, seed, 8) else {
                panic!("cutmix expected");
            };
            assert!(y0 + h <= 8 && x0 + w <= 8);
            assert!((lam - (1.0 - (h * w) as f64 / 64.0)).abs() < 1e-12);
            // Pixels inside the box come from the other image, the rest stay.
            let mut x: Vec<f32> = [vec![1.0; 64], vec![2.0; 64]].concat();
            let mut y = vec![1.0, 0.0, 0.0, 1.0];
            apply(
                Mixed::Cutmix { lam, y0, x0, h, w },
                &mut x,
                &mut y,
                2,
                1,
                8,
                2,
            );
            let twos = x[..64].iter().filter(|&&v| v == 2.0).count();
            assert_eq!(twos, h * w);
            assert!((y[0] as f64 - lam).abs() < 1e-6);
        }
        assert_eq!(draw(&MixSettings { prob: 0.0, ..s }, 1, 8), Mixed::None);
    }
}
