//! Batch normalisation fused with the ReLU that follows it, on plain `f32` slices (NCHW).
//!
//! Ioffe & Szegedy (2015), "Batch Normalization": `y = relu(γ · (x - μ) / √(σ² + ε) + β)` with
//! the batch's mean and biased variance per channel in training and the running ones in
//! inference. Burn 0.22.1 composes this from about ten whole-tensor operations (two of them
//! transposes) and the ReLU adds one more; here the forward pass reads the input twice (statistics,
//! then output) and the backward pass reads input and gradient twice, writing each result once.
//!
//! Statistics are accumulated in `f64`, per channel, one channel per task; in training the
//! channel's input gradient, and on maps from 56 x 56 its output, is written by the same task
//! right after its sums ([`backward`], [`train_forward`]); the other elementwise passes go one
//! image per task: the results do not depend on the thread count.
//!
//! # Shapes
//! `x, y, dy, dx: [B, C, P]` (any spatial size `P`), `γ, β, μ, σ²: [C]`.

use super::act::Act;
use super::buf::{par_channels, par_lazy};
use super::simd::{affine_row, bn_dx_row, gated_sums, row_sq_dev, row_sum};
use rayon::prelude::*;

/// Tensor sizes: images, channels, positions per channel and image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormGeom {
    pub batch: usize,
    pub channels: usize,
    pub positions: usize,
}

impl NormGeom {
    fn len(&self) -> usize {
        self.batch * self.channels * self.positions
    }
    /// The rows of channel `c`, one per image.
    fn rows<'a, E>(&self, x: &'a [E], c: usize) -> impl Iterator<Item = &'a [E]> + 'a {
        let (cp, p) = (self.channels * self.positions, self.positions);
        (0..self.batch).map(move |n| &x[n * cp + c * p..n * cp + (c + 1) * p])
    }
}

/// Per-channel mean and biased variance of `x`.
pub fn batch_stats<E: Act>(x: &[E], g: &NormGeom) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), g.len(), "batch norm input length");
    (0..g.channels)
        .into_par_iter()
        .map(|c| channel_stats(x, c, g))
        .unzip()
}

/// Positions per channel and image from which the training forward pass writes a channel's
/// output right after its statistics. A channel's runs are `H·W` values one image (`C·H·W`
/// values) apart; at 32 px and below the output pass image by image was as fast or faster in
/// most runs (`cargo run --release --example norm_pool`, batch 32, 2 threads, Zen 4, fastest of
/// 15, channel by channel vs separate passes, four runs, ms: 64 x 32 x 32 0.65-0.90 vs
/// 0.52-0.84, 128 x 16 x 16 0.31-0.41 vs 0.28-0.38, 64 x 64 x 64 2.50-4.20 vs 2.50-4.22; batch
/// 16, 256 x 56 x 56 3.72-4.14 vs 4.09-4.58, 64 x 112 x 112 3.22-4.03 vs 4.33-4.75).
const FUSED_POSITIONS: usize = 56 * 56;

/// Channel `c`'s mean and biased variance.
fn channel_stats<E: Act>(x: &[E], c: usize, g: &NormGeom) -> (f32, f32) {
    let count = (g.batch * g.positions).max(1) as f64;
    let sum: f64 = g.rows(x, c).map(|r| row_sum(r) as f64).sum();
    let mean = sum / count;
    let m = mean as f32;
    let sq: f64 = g.rows(x, c).map(|r| row_sq_dev(r, m) as f64).sum();
    (mean as f32, (sq / count) as f32)
}

/// The training forward pass: `(y, mean, variance)`, the values of [`batch_stats`],
/// [`affine`] and [`scale_shift`] bit for bit. On maps of [`FUSED_POSITIONS`] and more, each
/// channel's output is written right after its statistics, while the channel's inputs are
/// still in cache ([`par_channels`]); on smaller maps by those three passes.
pub fn train_forward<E: Act>(
    x: &[E],
    gamma: &[f32],
    beta: &[f32],
    eps: f64,
    relu: bool,
    g: &NormGeom,
) -> (Vec<E>, Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), g.len(), "batch norm input length");
    assert!(
        gamma.len() == g.channels && beta.len() == g.channels,
        "batch norm γ, β length"
    );
    if g.positions < FUSED_POSITIONS {
        let (mean, var) = batch_stats(x, g);
        let (scale, shift) = affine(gamma, beta, &mean, &var, eps);
        return (scale_shift(x, &scale, &shift, relu, g), mean, var);
    }
    let (y, stats) = par_channels(g.batch, g.channels, g.positions, |c, runs| {
        let (mean, var) = channel_stats(x, c, g);
        let (a, b) = channel_affine(gamma[c], beta[c], mean, var, eps);
        for xr in g.rows(x, c) {
            affine_row(runs.next_run(), xr, a, b, relu);
        }
        (mean, var)
    });
    let (mean, var) = stats.into_iter().unzip();
    (y, mean, var)
}

/// `y = act(x · scale[c] + shift[c])`: the whole forward pass once the statistics are known.
pub fn scale_shift<E: Act>(
    x: &[E],
    scale: &[f32],
    shift: &[f32],
    relu: bool,
    g: &NormGeom,
) -> Vec<E> {
    assert_eq!(x.len(), g.len(), "batch norm input length");
    let (cp, p) = (g.channels * g.positions, g.positions.max(1));
    par_lazy(x.len(), cp, x.par_chunks(cp.max(1)), |yn, xn| {
        for (xc, (&a, &b)) in xn.chunks(p).zip(scale.iter().zip(shift)) {
            affine_row(yn.take(xc.len()), xc, a, b, relu);
        }
    })
}

/// The per-channel `scale = γ / √(σ² + ε)` and `shift = β - μ · scale` of the forward pass.
pub fn affine(
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f64,
) -> (Vec<f32>, Vec<f32>) {
    (0..gamma.len())
        .map(|c| channel_affine(gamma[c], beta[c], mean[c], var[c], eps))
        .unzip()
}

/// One channel's `(scale, shift)` of [`affine`].
fn channel_affine(gamma: f32, beta: f32, mean: f32, var: f32, eps: f64) -> (f32, f32) {
    let scale = gamma / ((var as f64 + eps).sqrt() as f32);
    (scale, beta - mean * scale)
}

/// Gradients of the training-mode forward pass (batch statistics) given `dy`: `(dx, dγ, dβ)`.
///
/// With `g = dy · [pre-activation > 0]` (or `dy` without the ReLU) and `x̂ = (x - μ) / √(σ² + ε)`:
/// `dβ = Σ g`, `dγ = Σ g · x̂`, `dx = γ / √(σ² + ε) · (g - dβ / N - x̂ · dγ / N)`.
#[allow(clippy::too_many_arguments)]
pub fn backward<E: Act>(
    x: &[E],
    dy: &[E],
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f64,
    relu: bool,
    g: &NormGeom,
) -> (Vec<E>, Vec<f32>, Vec<f32>) {
    assert_eq!(dy.len(), g.len(), "batch norm gradient length");
    let (scale, shift) = affine(gamma, beta, mean, var, eps);
    let inv_std: Vec<f32> = var
        .iter()
        .map(|&v| (1.0 / (v as f64 + eps).sqrt()) as f32)
        .collect();
    let count = (g.batch * g.positions).max(1) as f32;
    // Channel by channel ([`par_channels`]): the sums over the channel's `x` and `dy`, then its
    // `dx` while they are still in cache. The ReLU passes the gradient where the forward pass's
    // pre-activation was positive; it is recomputed with the forward pass's own expression, so
    // the mask is the same bit for bit.
    let (dx, sums) = par_channels(g.batch, g.channels, g.positions, |c, runs| {
        let (a, b, m, s) = (scale[c], shift[c], mean[c], inv_std[c]);
        let (mut sg, mut sgx) = (0.0f64, 0.0f64);
        for (xr, dr) in g.rows(x, c).zip(g.rows(dy, c)) {
            let (u, v) = gated_sums(xr, dr, a, b, m, s, relu);
            sg += u as f64;
            sgx += v as f64;
        }
        let (dbeta, dgamma) = (sg as f32, sgx as f32);
        let (mb, mg, k) = (dbeta / count, dgamma / count, gamma[c] * s);
        for (xr, dr) in g.rows(x, c).zip(g.rows(dy, c)) {
            bn_dx_row(runs.next_run(), xr, dr, [a, b, m, s], [mb, mg, k], relu);
        }
        (dbeta, dgamma)
    });
    let (dbeta, dgamma): (Vec<f32>, Vec<f32>) = sums.into_iter().unzip();
    (dx, dgamma, dbeta)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0)
            .collect()
    }

    #[test]
    fn statistics_match_a_direct_computation() {
        let g = NormGeom {
            batch: 3,
            channels: 2,
            positions: 5,
        };
        let x = data(30, 7);
        let (mean, var) = batch_stats(&x, &g);
        for c in 0..2 {
            let vals: Vec<f32> = (0..3)
                .flat_map(|n| x[n * 10 + c * 5..n * 10 + c * 5 + 5].to_vec())
                .collect();
            let m = vals.iter().sum::<f32>() / 15.0;
            let v = vals.iter().map(|a| (a - m) * (a - m)).sum::<f32>() / 15.0;
            assert!((mean[c] - m).abs() < 1e-5 && (var[c] - v).abs() < 1e-5);
        }
    }

    /// The fused training pass is the three separate ones bit for bit, and neither it nor the
    /// backward pass depends on the thread count.
    #[test]
    fn the_training_pass_is_stats_then_affine_and_threads_do_not_matter() {
        // Both training forward paths: a small map (separate passes) and one of
        // `FUSED_POSITIONS` (channel by channel).
        for g in [
            NormGeom {
                batch: 3,
                channels: 5,
                positions: 37,
            },
            NormGeom {
                batch: 2,
                channels: 3,
                positions: FUSED_POSITIONS,
            },
        ] {
            check_training_pass(g);
        }
    }

    fn check_training_pass(g: NormGeom) {
        let x = data(g.len(), 11);
        let dy = data(g.len(), 12);
        let (gamma, beta) = (data(g.channels, 13), data(g.channels, 14));
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for relu in [false, true] {
            let (y, mean, var) = train_forward(&x, &gamma, &beta, 1e-5, relu, &g);
            let (m0, v0) = batch_stats(&x, &g);
            let (a, b) = affine(&gamma, &beta, &m0, &v0, 1e-5);
            assert_eq!(bits(&y), bits(&scale_shift(&x, &a, &b, relu, &g)));
            assert_eq!((bits(&mean), bits(&var)), (bits(&m0), bits(&v0)));
            let run = |threads| {
                crate::kernels::conv::on_threads(threads, || {
                    let (y, ..) = train_forward(&x, &gamma, &beta, 1e-5, relu, &g);
                    let (dx, dg, db) =
                        backward(&x, &dy, &gamma, &beta, &mean, &var, 1e-5, relu, &g);
                    [y, dx, dg, db].map(|v| bits(&v))
                })
            };
            assert_eq!(run(1), run(3), "relu {relu}");
        }
    }

    /// Finite differences of `L = Σ dy · y(x, γ, β)` against the analytic gradients, through the
    /// batch statistics and the ReLU (in f64-free f32, so a loose tolerance).
    #[test]
    fn gradients_match_finite_differences() {
        let g = NormGeom {
            batch: 2,
            channels: 3,
            positions: 4,
        };
        let x = data(g.len(), 3);
        let dy = data(g.len(), 9);
        let gamma = vec![1.5, -0.7, 0.9];
        let beta = vec![0.2, 0.1, -0.3];
        let eps = 1e-5;
        for relu in [false, true] {
            let loss = |x: &[f32], gamma: &[f32], beta: &[f32]| -> f64 {
                let (m, v) = batch_stats(x, &g);
                let (s, t) = affine(gamma, beta, &m, &v, eps);
                let y = scale_shift(x, &s, &t, relu, &g);
                y.iter().zip(&dy).map(|(a, b)| (a * b) as f64).sum()
            };
            let (m, v) = batch_stats(&x, &g);
            let (dx, dgamma, dbeta) = backward(&x, &dy, &gamma, &beta, &m, &v, eps, relu, &g);
            let h = 1e-2f32;
            for i in [0, 5, 11, 17, 23] {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[i] += h;
                xm[i] -= h;
                let num = (loss(&xp, &gamma, &beta) - loss(&xm, &gamma, &beta)) / (2.0 * h as f64);
                assert!(
                    (num - dx[i] as f64).abs() < 2e-2,
                    "relu {relu} dx[{i}]: {num} vs {}",
                    dx[i]
                );
            }
            for c in 0..3 {
                let (mut gp, mut gm) = (gamma.clone(), gamma.clone());
                gp[c] += h;
                gm[c] -= h;
                let num = (loss(&x, &gp, &beta) - loss(&x, &gm, &beta)) / (2.0 * h as f64);
                assert!(
                    (num - dgamma[c] as f64).abs() < 2e-2,
                    "relu {relu} dgamma[{c}]"
                );
                let (mut bp, mut bm) = (beta.clone(), beta.clone());
                bp[c] += h;
                bm[c] -= h;
                let num = (loss(&x, &gamma, &bp) - loss(&x, &gamma, &bm)) / (2.0 * h as f64);
                assert!(
                    (num - dbeta[c] as f64).abs() < 2e-2,
                    "relu {relu} dbeta[{c}]"
                );
            }
        }
    }
}
