//! Max pooling on plain `f32` slices (NCHW), forward with the argmax "switches" and backward.
//!
//! The switches are the deconvnet's (Zeiler & Fergus, 2014): the backward pass sends each output
//! gradient to the input position that won the window. Burn-flex 0.22.1 pools through its 3-D
//! path with indices even for inference (15% of a `bench-vgg` inference pass, by `perf`); here
//! inference records nothing and a plane is one task, so the result does not depend on threads.
//!
//! # Shapes
//! `x: [B, C, H, W]` -> `y: [B, C, H_out, W_out]`, the sizes given by [`PoolGeom::new`].

use super::buf::par_zeroed;
use super::simd::max_pool2_row;
use rayon::prelude::*;

/// Sizes of one pooling: planes (`B · C`), input and output sides, window, stride, padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    pub planes: usize,
    pub h: usize,
    pub w: usize,
    pub ho: usize,
    pub wo: usize,
    pub kernel: [usize; 2],
    pub stride: [usize; 2],
    pub pad: [usize; 2],
}

/// PyTorch's output length: `⌊(L + 2p - k) / s⌋ + 1`, or with `ceil` the ceiling, dropping a last
/// window that would start in the right padding.
fn out_len(len: usize, k: usize, s: usize, p: usize, ceil: bool) -> usize {
    let span = len + 2 * p - k;
    let mut out = if ceil { span.div_ceil(s) } else { span / s } + 1;
    if ceil && (out - 1) * s >= len + p {
        out -= 1;
    }
    out
}

impl PoolGeom {
    pub fn new(
        planes: usize,
        [h, w]: [usize; 2],
        kernel: [usize; 2],
        stride: [usize; 2],
        pad: [usize; 2],
        ceil: bool,
    ) -> Self {
        PoolGeom {
            planes,
            h,
            w,
            ho: out_len(h, kernel[0], stride[0], pad[0], ceil),
            wo: out_len(w, kernel[1], stride[1], pad[1], ceil),
            kernel,
            stride,
            pad,
        }
    }

    /// The clipped input range of output position `o` along one axis.
    fn window(o: usize, k: usize, s: usize, p: usize, len: usize) -> (usize, usize) {
        let start = (o * s) as isize - p as isize;
        let lo = start.max(0) as usize;
        let hi = ((start + k as isize).max(0) as usize).min(len);
        (lo, hi)
    }
}

/// Forward pass; with `switches`, also the winning input offset (within its plane) per output.
pub fn max_pool_forward(x: &[f32], g: &PoolGeom, switches: bool) -> (Vec<f32>, Vec<u32>) {
    let (in_len, out_len) = (g.h * g.w, g.ho * g.wo);
    assert_eq!(x.len(), g.planes * in_len, "max pool input length");
    let mut y = vec![0.0f32; g.planes * out_len];
    let mut idx = vec![0u32; if switches { y.len() } else { 0 }];
    let pairs = g.kernel == [2, 2] && g.stride == [2, 2] && g.pad == [0, 0];
    let plane = |xp: &[f32], yp: &mut [f32], mut ip: Option<&mut [u32]>| {
        if pairs && 2 * g.ho <= g.h && 2 * g.wo <= g.w {
            // The plain 2x2/2 pooling of VGG and friends: no window arithmetic, the four
            // candidates in the general loop's order, so the same winner.
            for (oy, yr) in yp.chunks_mut(g.wo).enumerate() {
                let (r0, r1) = (2 * oy * g.w, (2 * oy + 1) * g.w);
                let ir = match ip.as_deref_mut() {
                    Some(ip) => &mut ip[oy * g.wo..(oy + 1) * g.wo],
                    None => &mut [][..],
                };
                let (x0, x1) = (&xp[r0..r0 + g.w], &xp[r1..r1 + g.w]);
                max_pool2_row(yr, ir, x0, x1, r0 as u32, r1 as u32);
            }
            return;
        }
        for oy in 0..g.ho {
            let (y0, y1) = PoolGeom::window(oy, g.kernel[0], g.stride[0], g.pad[0], g.h);
            for ox in 0..g.wo {
                let (x0, x1) = PoolGeom::window(ox, g.kernel[1], g.stride[1], g.pad[1], g.w);
                let (mut best, mut at) = (f32::NEG_INFINITY, y0 * g.w + x0);
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        let v = xp[iy * g.w + ix];
                        // First maximum wins, and NaN propagates (as PyTorch).
                        if v > best || v.is_nan() {
                            best = v;
                            at = iy * g.w + ix;
                            if v.is_nan() {
                                break;
                            }
                        }
                    }
                }
                yp[oy * g.wo + ox] = best;
                if let Some(ip) = ip.as_deref_mut() {
                    ip[oy * g.wo + ox] = at as u32;
                }
            }
        }
    };
    if switches {
        y.par_chunks_mut(out_len.max(1))
            .zip(idx.par_chunks_mut(out_len.max(1)))
            .zip(x.par_chunks(in_len.max(1)))
            .for_each(|((yp, ip), xp)| plane(xp, yp, Some(ip)));
    } else {
        y.par_chunks_mut(out_len.max(1))
            .zip(x.par_chunks(in_len.max(1)))
            .for_each(|(yp, xp)| plane(xp, yp, None));
    }
    (y, idx)
}

/// Backward pass: each output gradient added at its switch.
pub fn max_pool_backward(dy: &[f32], switches: &[u32], g: &PoolGeom) -> Vec<f32> {
    let (in_len, out_len) = (g.h * g.w, g.ho * g.wo);
    assert_eq!(dy.len(), g.planes * out_len, "max pool gradient length");
    let inputs = dy
        .par_chunks(out_len.max(1))
        .zip(switches.par_chunks(out_len.max(1)));
    par_zeroed(g.planes * in_len, in_len, inputs, |dxp, (dyp, ip)| {
        for (&d, &i) in dyp.iter().zip(ip) {
            dxp[i as usize] += d;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_sizes_follow_pytorch() {
        // AlexNet 55 -> 27 (3/2), GoogLeNet ceil-mode 112 -> 56 (3/2/ceil), ResNet 112 -> 56 (3/2/1).
        assert_eq!(out_len(55, 3, 2, 0, false), 27);
        assert_eq!(out_len(112, 3, 2, 0, true), 56);
        assert_eq!(out_len(112, 3, 2, 1, false), 56);
        assert_eq!(out_len(14, 3, 2, 0, true), 7);
        assert_eq!(out_len(7, 2, 2, 0, true), 4);
        assert_eq!(out_len(7, 2, 2, 0, false), 3);
    }

    /// The 2x2/2 shortcut (vectorised rows) picks the same winners as a plain
    /// first-maximum-wins window loop, ties, NaNs and odd sizes included, with and without
    /// switches; rows of 20 outputs run the vector body, not just its tail.
    #[test]
    fn pairs_shortcut_matches_the_window_loop() {
        for (h, w) in [(6, 8), (7, 41), (4, 40)] {
            let mut x: Vec<f32> = (0..2 * h * w).map(|i| ((i * 7919) % 13) as f32).collect();
            let n = x.len();
            for i in [5, 6, 7, 90, 91, n - 1] {
                x[i % n] = f32::NAN;
            }
            let g = PoolGeom::new(2, [h, w], [2, 2], [2, 2], [0, 0], false);
            let (y, idx) = max_pool_forward(&x, &g, true);
            let (y0, idx0) = general_loop(&x, &g);
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!((bits(&y), &idx), (bits(&y0), &idx0), "{h}x{w}");
            assert_eq!(
                bits(&max_pool_forward(&x, &g, false).0),
                bits(&y0),
                "{h}x{w}"
            );
        }
    }

    /// A 2x2/2 window loop written out.
    fn general_loop(x: &[f32], g: &PoolGeom) -> (Vec<f32>, Vec<u32>) {
        let (mut y, mut idx) = (Vec::new(), Vec::new());
        for p in 0..g.planes {
            let xp = &x[p * g.h * g.w..(p + 1) * g.h * g.w];
            for oy in 0..g.ho {
                for ox in 0..g.wo {
                    let (mut best, mut at) = (f32::NEG_INFINITY, 0);
                    for iy in 2 * oy..2 * oy + 2 {
                        for ix in 2 * ox..2 * ox + 2 {
                            let v = xp[iy * g.w + ix];
                            if !best.is_nan() && (v > best || v.is_nan()) {
                                (best, at) = (v, iy * g.w + ix);
                            }
                        }
                    }
                    y.push(best);
                    idx.push(at as u32);
                }
            }
        }
        (y, idx)
    }

    #[test]
    fn pools_and_routes_gradients_to_the_winners() {
        // One 4x4 plane, 2x2/2: the maxima and where they were.
        #[rustfmt::skip]
        let x = [
            1.0, 5.0, 2.0, 0.0,
            3.0, 4.0, 8.0, 7.0,
            0.0, 0.0, 1.0, 1.0,
            9.0, 0.0, 1.0, 2.0,
        ];
        let g = PoolGeom::new(1, [4, 4], [2, 2], [2, 2], [0, 0], false);
        let (y, idx) = max_pool_forward(&x, &g, true);
        assert_eq!(y, [5.0, 8.0, 9.0, 2.0]);
        assert_eq!(idx, [1, 6, 12, 15]);
        let dx = max_pool_backward(&[1.0, 2.0, 3.0, 4.0], &idx, &g);
        let mut want = [0.0; 16];
        (want[1], want[6], want[12], want[15]) = (1.0, 2.0, 3.0, 4.0);
        assert_eq!(dx, want);
        // Overlapping 3x3/2 with padding 1 on the same plane: windows clip at the borders and
        // an input that wins two windows collects both gradients.
        let g = PoolGeom::new(1, [4, 4], [3, 3], [2, 2], [1, 1], false);
        let (y, idx) = max_pool_forward(&x, &g, true);
        assert_eq!(y, [5.0, 8.0, 9.0, 8.0]);
        let dx = max_pool_backward(&[1.0, 1.0, 1.0, 1.0], &idx, &g);
        assert_eq!(dx[6], 2.0);
        assert_eq!(dx.iter().sum::<f32>(), 4.0);
    }
}
