//! The optimisers' updates in one pass over each parameter, in place.
//!
//! The optimiser (`src/train/optim.rs`) states them; SGD (PyTorch's `torch.optim.SGD`,
//! dampening 0):
//! ```text
//! g'  = g + wd * w
//! buf = g'  (first step)  or  mu * buf + g'
//! d   = g' + mu * buf  (Nesterov)  or  buf
//! w   = w - lr * d
//! ```
//! Written as tensor operations that is five passes over memory and two temporaries the size
//! of the parameter (`wd * w`, `mu * buf`); for vgg16's 411 MB first fully connected weight
//! those temporaries were what held the heap's high-water mark a parameter's size above the
//! live set. Here `w` and `buf` are updated where they lie and the first step's buffer is the
//! gradient's own storage. Each value is computed with the same f32 operations in the same
//! order as the tensor formula, so the bits are those of the formula.
//!
//! AdamW (Loshchilov & Hutter 2019) as tensor operations took seven temporaries the size of
//! the parameter; [`adamw`] takes none (its first step keeps `m` in the gradient's storage).

use rayon::prelude::*;

/// The step's hyperparameters, as the f32 values the tensor formula multiplies by.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdStep {
    pub lr: f32,
    /// Added to the gradient as `wd * w`; 0 skips it (biases under `no_bias_decay`).
    pub weight_decay: f32,
    /// 0: plain SGD (no buffer is kept).
    pub momentum: f32,
    pub nesterov: bool,
}

/// Values per parallel chunk: large enough that a chunk is many pages of streaming work.
const CHUNK: usize = 1 << 16;

/// One step of every value: `w` and `buf` in place. On the first step (`buf = None`) `g` is
/// overwritten with `g'`, so that the gradient's storage becomes the momentum buffer; later
/// steps only read it.
///
/// # Panics
/// If the lengths differ.
pub fn sgd(w: &mut [f32], g: &mut [f32], buf: Option<&mut [f32]>, h: SgdStep) {
    assert_eq!(w.len(), g.len(), "sgd: weight and gradient lengths differ");
    let wd = h.weight_decay;
    // `g + w * wd`, skipped (not added as 0) where the formula skips it, so -0.0 stays -0.0.
    let decayed = move |g: f32, w: f32| if wd != 0.0 { g + w * wd } else { g };
    match buf {
        Some(buf) if h.momentum != 0.0 => {
            assert_eq!(w.len(), buf.len(), "sgd: weight and buffer lengths differ");
            w.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(buf.par_chunks_mut(CHUNK))
                .for_each(|((w, g), buf)| {
                    for ((w, &g), b) in w.iter_mut().zip(g).zip(buf.iter_mut()) {
                        let g1 = decayed(g, *w);
                        *b = *b * h.momentum + g1;
                        let d = if h.nesterov { g1 + *b * h.momentum } else { *b };
                        *w -= d * h.lr;
                    }
                });
        }
        _ => {
            w.par_chunks_mut(CHUNK)
                .zip(g.par_chunks_mut(CHUNK))
                .for_each(|(w, g)| {
                    for (w, g) in w.iter_mut().zip(g.iter_mut()) {
                        let g1 = decayed(*g, *w);
                        // First step: buf = g', so the Nesterov direction is g' + mu * g'.
                        let d = if h.nesterov && h.momentum != 0.0 {
                            g1 + g1 * h.momentum
                        } else {
                            g1
                        };
                        *w -= d * h.lr;
                        *g = g1;
                    }
                });
        }
    }
}

/// AdamW's step as the f32 scalars the tensor formula multiplies and divides by; the caller
/// works them out in f64 as the formula does (`lr * wd`, `1 - b1`, `1 - b1^t`, ...).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamwStep {
    pub lr: f32,
    /// `lr * weight_decay`; 0 skips the decoupled decay.
    pub lr_decay: f32,
    pub b1: f32,
    pub b2: f32,
    /// `1 - b1`, `1 - b2`.
    pub one_minus_b1: f32,
    pub one_minus_b2: f32,
    /// The bias corrections `1 - b1^t`, `1 - b2^t`.
    pub correction1: f32,
    pub correction2: f32,
    pub eps: f32,
}

impl AdamwStep {
    /// Step `t` (from 1) at learning rate `lr` with decoupled decay `weight_decay` (0 for the
    /// tensors not decayed): the scalars worked out in f64 as the formula writes them, then
    /// rounded once to f32.
    pub fn at_step(lr: f64, weight_decay: f64, [b1, b2]: [f64; 2], eps: f64, t: i32) -> Self {
        AdamwStep {
            lr: lr as f32,
            lr_decay: (lr * weight_decay) as f32,
            b1: b1 as f32,
            b2: b2 as f32,
            one_minus_b1: (1.0 - b1) as f32,
            one_minus_b2: (1.0 - b2) as f32,
            correction1: (1.0 - b1.powi(t)) as f32,
            correction2: (1.0 - b2.powi(t)) as f32,
            eps: eps as f32,
        }
    }
}

/// One AdamW step of every value, `w` in place:
/// ```text
/// w = w - w * (lr * wd)
/// m = b1 * m + (1 - b1) * g          (first step: (1 - b1) * g)
/// v = b2 * v + (1 - b2) * g^2        (first step: (1 - b2) * g^2)
/// w = w - (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps) * lr
/// ```
/// With `moments = None` (the first step) `g` becomes `m` and `v_out` (same length) receives
/// `v`; otherwise `g` is left as it was and `moments = (m, v)` are updated in place.
///
/// # Panics
/// If the lengths differ.
pub fn adamw(
    w: &mut [f32],
    g: &mut [f32],
    moments: Option<(&mut [f32], &mut [f32])>,
    v_out: &mut [f32],
    h: AdamwStep,
) {
    assert_eq!(
        w.len(),
        g.len(),
        "adamw: weight and gradient lengths differ"
    );
    let apply = move |w: &mut f32, m: f32, v: f32| {
        if h.lr_decay != 0.0 {
            *w -= *w * h.lr_decay;
        }
        let (mhat, vhat) = (m / h.correction1, v / h.correction2);
        *w -= mhat / (vhat.sqrt() + h.eps) * h.lr;
    };
    match moments {
        Some((m, v)) => {
            assert!(
                m.len() == w.len() && v.len() == w.len(),
                "adamw: moment lengths differ"
            );
            w.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
                .for_each(|((w, g), (m, v))| {
                    for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v) {
                        *m = *m * h.b1 + g * h.one_minus_b1;
                        *v = *v * h.b2 + g * g * h.one_minus_b2;
                        apply(w, *m, *v);
                    }
                });
        }
        None => {
            assert_eq!(w.len(), v_out.len(), "adamw: moment lengths differ");
            w.par_chunks_mut(CHUNK)
                .zip(g.par_chunks_mut(CHUNK))
                .zip(v_out.par_chunks_mut(CHUNK))
                .for_each(|((w, g), v)| {
                    for ((w, g), v) in w.iter_mut().zip(g.iter_mut()).zip(v) {
                        let (m1, v1) = (*g * h.one_minus_b1, *g * *g * h.one_minus_b2);
                        apply(w, m1, v1);
                        (*g, *v) = (m1, v1);
                    }
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The formula one value at a time, as the tensor operations compute it.
    fn reference(w: f32, g: f32, buf: Option<f32>, h: SgdStep) -> (f32, f32) {
        let g = if h.weight_decay != 0.0 {
            g + w * h.weight_decay
        } else {
            g
        };
        let b = match buf {
            Some(b) => b * h.momentum + g,
            None => g,
        };
        let d = match (h.momentum != 0.0, h.nesterov) {
            (false, _) => g,
            (true, true) => g + b * h.momentum,
            (true, false) => b,
        };
        (w - d * h.lr, b)
    }

    #[test]
    fn matches_the_formula_bit_for_bit() {
        let n = CHUNK * 2 + 77;
        let val = |i: usize, s: u32| ((i as u32).wrapping_mul(2654435761) ^ s) as f32 / 4e9 - 0.5;
        for h in [
            SgdStep {
                lr: 0.1,
                weight_decay: 5e-4,
                momentum: 0.9,
                nesterov: true,
            },
            SgdStep {
                lr: 0.05,
                weight_decay: 0.0,
                momentum: 0.9,
                nesterov: false,
            },
            SgdStep {
                lr: 0.3,
                weight_decay: 1e-2,
                momentum: 0.0,
                nesterov: false,
            },
        ] {
            for first in [true, false] {
                let w0: Vec<f32> = (0..n).map(|i| val(i, 1)).collect();
                let g0: Vec<f32> = (0..n).map(|i| val(i, 2)).collect();
                let b0: Vec<f32> = (0..n).map(|i| val(i, 3)).collect();
                let (mut w, mut g, mut b) = (w0.clone(), g0.clone(), b0.clone());
                sgd(&mut w, &mut g, (!first).then_some(&mut b[..]), h);
                // On the first step the gradient's storage is the new buffer.
                let new_buf = if first { &g } else { &b };
                for i in 0..n {
                    let (want_w, want_b) = reference(w0[i], g0[i], (!first).then_some(b0[i]), h);
                    assert_eq!(
                        w[i].to_bits(),
                        want_w.to_bits(),
                        "{h:?} first {first} w[{i}]"
                    );
                    if h.momentum != 0.0 {
                        assert_eq!(new_buf[i].to_bits(), want_b.to_bits(), "{h:?} buf[{i}]");
                    }
                }
            }
        }
    }

    #[test]
    fn worked_example() {
        // w = 1, g = 2, lr 0.1, mu 0.9, wd 0.5, Nesterov (the optimiser's own test):
        // step 1: g' = 2.5, buf = 2.5, d = 4.75, w = 0.525.
        let h = SgdStep {
            lr: 0.1,
            weight_decay: 0.5,
            momentum: 0.9,
            nesterov: true,
        };
        let (mut w, mut g) = ([1.0f32], [2.0f32]);
        sgd(&mut w, &mut g, None, h);
        assert!((w[0] - 0.525).abs() < 1e-6 && g[0] == 2.5, "{w:?} {g:?}");
        // step 2: g' = 2 + 0.2625, buf = 0.9 * 2.5 + 2.2625 = 4.5125, w = 0.525 - 0.632375.
        let mut buf = g;
        let mut g = [2.0f32];
        sgd(&mut w, &mut g, Some(&mut buf), h);
        assert!((buf[0] - 4.5125).abs() < 1e-5, "{buf:?}");
        assert!((w[0] + 0.107375).abs() < 1e-5, "{w:?}");
    }
}
