//! Max pooling on plain `f32` slices (NCHW), forward with the argmax "switches" and backward.
//!
//! The switches are the deconvnet's (Zeiler & Fergus, 2014): the backward pass sends each output
//! gradient to the input position that won the window. Burn-flex 0.22.1 pools through its 3-D
//! path with indices even for inference (15% of a `bench-vgg` inference pass, by `perf`); here
//! inference records nothing and a plane is one task, so the result does not depend on threads.
//!
//! # Shapes
//! `x: [B, C, H, W]` -> `y: [B, C, H_out, W_out]`, the sizes given by [`PoolGeom::new`].

use super::act::Act;
use super::buf::par_zeroed_with;
use super::simd::{max_pool2_row, max_pool3s2_row};
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
/// On bf16 (`E`) each plane is widened, pooled in f32 and rounded back: exact, as the maximum
/// is one of the inputs.
pub fn max_pool_forward<E: Act>(x: &[E], g: &PoolGeom, switches: bool) -> (Vec<E>, Vec<u32>) {
    let (in_len, out_len) = (g.h * g.w, g.ho * g.wo);
    assert_eq!(x.len(), g.planes * in_len, "max pool input length");
    let mut y = vec![E::ZERO; g.planes * out_len];
    let mut idx = vec![0u32; if switches { y.len() } else { 0 }];
    let pairs = g.kernel == [2, 2] && g.stride == [2, 2] && g.pad == [0, 0];
    let cols: Vec<(usize, usize)> = (0..g.wo)
        .map(|ox| PoolGeom::window(ox, g.kernel[1], g.stride[1], g.pad[1], g.w))
        .collect();
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
        if g.kernel == [3, 3] && g.stride == [2, 2] {
            max_pool3s2_plane(xp, yp, ip, &cols, g);
            return;
        }
        if !xp.iter().any(|v| v.is_nan()) {
            // Without NaN the winner is the first strict maximum: no NaN tests, and the column
            // windows computed once per plane (ResNet's 3x3/2/1 pool took 7% of a resnet18
            // step at 128 px through the general loop below).
            max_pool_plane_finite(xp, yp, ip, &cols, g);
            return;
        }
        for oy in 0..g.ho {
            let rows = PoolGeom::window(oy, g.kernel[0], g.stride[0], g.pad[0], g.h);
            for (ox, &cols) in cols.iter().enumerate() {
                let (best, at) = window_max(xp, g.w, rows, cols);
                yp[oy * g.wo + ox] = best;
                if let Some(ip) = ip.as_deref_mut() {
                    ip[oy * g.wo + ox] = at;
                }
            }
        }
    };
    let scratch = || (Vec::new(), Vec::new());
    let plane = |(sx, sy): &mut (Vec<f32>, Vec<f32>), xp: &[E], yp: &mut [E], ip| {
        E::write(yp, sy, |yp| plane(E::read(xp, sx), yp, ip))
    };
    if switches {
        y.par_chunks_mut(out_len.max(1))
            .zip(idx.par_chunks_mut(out_len.max(1)))
            .zip(x.par_chunks(in_len.max(1)))
            .for_each_init(scratch, |s, ((yp, ip), xp)| plane(s, xp, yp, Some(ip)));
    } else {
        y.par_chunks_mut(out_len.max(1))
            .zip(x.par_chunks(in_len.max(1)))
            .for_each_init(scratch, |s, (yp, xp)| plane(s, xp, yp, None));
    }
    (y, idx)
}

/// The first maximum of one window (rows `y0..y1`, columns `x0..x1`, clipped to the plane),
/// the first NaN propagating (as PyTorch), and its plane offset.
fn window_max(
    xp: &[f32],
    w: usize,
    (y0, y1): (usize, usize),
    (x0, x1): (usize, usize),
) -> (f32, u32) {
    let (mut best, mut at) = (f32::NEG_INFINITY, y0 * w + x0);
    for iy in y0..y1 {
        for ix in x0..x1 {
            let v = xp[iy * w + ix];
            if v > best || v.is_nan() {
                best = v;
                at = iy * w + ix;
                if v.is_nan() {
                    return (best, at as u32);
                }
            }
        }
    }
    (best, at as u32)
}

/// One plane of 3x3 stride-2 max pooling (ResNet's stem pool, 2.5% of a bf16 resnet18 step at
/// 224 px window by window): the windows that lie inside the row in one vectorised
/// pass per output row ([`max_pool3s2_row`], NaN handled there), the clipped ones at the
/// ends one by one. Same winners as the window loop.
fn max_pool3s2_plane(
    xp: &[f32],
    yp: &mut [f32],
    mut ip: Option<&mut [u32]>,
    cols: &[(usize, usize)],
    g: &PoolGeom,
) {
    let p = g.pad[1];
    // Outputs whose window `2o - p .. 2o - p + 3` is inside the row.
    let lo = p.div_ceil(2).min(g.wo);
    let hi = if g.w + p >= 3 {
        ((g.w + p - 3) / 2 + 1).min(g.wo)
    } else {
        0
    }
    .max(lo);
    for oy in 0..g.ho {
        let rows = PoolGeom::window(oy, 3, 2, g.pad[0], g.h);
        let yr = &mut yp[oy * g.wo..(oy + 1) * g.wo];
        let mut ir = ip
            .as_deref_mut()
            .map(|ip| &mut ip[oy * g.wo..(oy + 1) * g.wo]);
        for ox in (0..lo).chain(hi..g.wo) {
            let (best, at) = window_max(xp, g.w, rows, cols[ox]);
            yr[ox] = best;
            if let Some(ir) = ir.as_deref_mut() {
                ir[ox] = at;
            }
        }
        if lo == hi {
            continue;
        }
        let x0 = 2 * lo - p;
        let row = |k: usize| {
            let iy = (rows.0 + k).min(rows.1 - 1);
            (&xp[iy * g.w + x0..(iy + 1) * g.w], (iy * g.w + x0) as u32)
        };
        let ((r0, o0), (r1, o1), (r2, o2)) = (row(0), row(1), row(2));
        let at = match ir {
            Some(ir) => &mut ir[lo..hi],
            None => &mut [][..],
        };
        let n = rows.1 - rows.0;
        max_pool3s2_row(&mut yr[lo..hi], at, r0, r1, r2, n, [o0, o1, o2]);
    }
}

/// One plane of [`max_pool_forward`]'s window loop for a plane without NaN: the first strict
/// maximum of each window (the general loop's winner), `cols` the clipped column windows.
fn max_pool_plane_finite(
    xp: &[f32],
    yp: &mut [f32],
    mut ip: Option<&mut [u32]>,
    cols: &[(usize, usize)],
    g: &PoolGeom,
) {
    for oy in 0..g.ho {
        let (y0, y1) = PoolGeom::window(oy, g.kernel[0], g.stride[0], g.pad[0], g.h);
        let yr = &mut yp[oy * g.wo..(oy + 1) * g.wo];
        for (ox, (&(x0, x1), y)) in cols.iter().zip(yr.iter_mut()).enumerate() {
            let (mut best, mut at) = (f32::NEG_INFINITY, y0 * g.w + x0);
            for iy in y0..y1 {
                let row = &xp[iy * g.w + x0..iy * g.w + x1];
                for (dx, &v) in row.iter().enumerate() {
                    if v > best {
                        best = v;
                        at = iy * g.w + x0 + dx;
                    }
                }
            }
            *y = best;
            if let Some(ip) = ip.as_deref_mut() {
                ip[oy * g.wo + ox] = at as u32;
            }
        }
    }
}

/// Backward pass: each output gradient added at its switch.
/// On bf16 (`E`) a plane's sums are f32, rounded once.
pub fn max_pool_backward<E: Act>(dy: &[E], switches: &[u32], g: &PoolGeom) -> Vec<E> {
    let (in_len, out_len) = (g.h * g.w, g.ho * g.wo);
    assert_eq!(dy.len(), g.planes * out_len, "max pool gradient length");
    let inputs = dy
        .par_chunks(out_len.max(1))
        .zip(switches.par_chunks(out_len.max(1)));
    let scratch = || (Vec::new(), Vec::new());
    par_zeroed_with(
        g.planes * in_len,
        in_len,
        inputs,
        scratch,
        |(sd, sx): &mut (Vec<f32>, Vec<f32>), dxp, (dyp, ip)| {
            let dyp = E::read(dyp, sd);
            E::write(dxp, sx, |dxp| {
                for (&d, &i) in dyp.iter().zip(ip) {
                    dxp[i as usize] += d;
                }
            })
        },
    )
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

    /// The finite-plane loop (no NaN tests) against the definition, for the other windows.
    #[test]
    fn finite_planes_take_the_first_maximum_of_each_window() {
        // ResNet's 3x3/2/1, AlexNet's 3x3/2, GoogLeNet's ceil-mode 3x3/2 and 3x3/1/1, over
        // few distinct values so windows tie: the first maximum in row-major order wins.
        for (k, s, p, ceil) in [
            (3, 2, 1, false),
            (3, 2, 0, false),
            (3, 2, 0, true),
            (3, 1, 1, false),
        ] {
            for (h, w) in [(9, 9), (8, 13), (56, 56)] {
                let x: Vec<f32> = (0..3 * h * w)
                    .map(|i| ((i * 7919) % 5) as f32 - 4.0)
                    .collect();
                let g = PoolGeom::new(3, [h, w], [k, k], [s, s], [p, p], ceil);
                let (y, idx) = max_pool_forward(&x, &g, true);
                let mut at = 0;
                for plane in x.chunks(h * w) {
                    for oy in 0..g.ho {
                        let (y0, y1) = PoolGeom::window(oy, k, s, p, h);
                        for ox in 0..g.wo {
                            let (x0, x1) = PoolGeom::window(ox, k, s, p, w);
                            let cells = (y0..y1).flat_map(|iy| (x0..x1).map(move |ix| iy * w + ix));
                            let best = cells
                                .clone()
                                .map(|i| plane[i])
                                .fold(f32::NEG_INFINITY, f32::max);
                            let first = cells.clone().find(|&i| plane[i] == best).unwrap();
                            assert_eq!(
                                (y[at], idx[at]),
                                (best, first as u32),
                                "{k}/{s}/{p} {h}x{w}"
                            );
                            at += 1;
                        }
                    }
                }
            }
        }
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

    /// ResNet's 3x3/2 pool (row-vectorised inside, window by window at the edges) against the
    /// window loop: ties (ReLU zeros), NaN and -inf, pad 0 and 1, odd and even sides, ceil mode.
    #[test]
    fn three_by_three_stride_two_matches_the_window_loop() {
        for (h, w, p, ceil) in [
            (8, 8, 1, false),
            (7, 41, 1, false),
            (9, 40, 0, false),
            (13, 37, 0, true),
            (3, 3, 1, false),
            (2, 5, 1, false),
            // Two whole vectors of 16 windows per row and 8 left.
            (5, 80, 1, false),
        ] {
            let mut x: Vec<f32> = (0..2 * h * w)
                .map(|i| (((i * 7919) % 13) as f32 - 6.0).max(0.0))
                .collect();
            let n = x.len();
            for i in [5, 6, 90, 91, n - 1].into_iter().chain((17..n).step_by(97)) {
                x[i % n] = f32::NAN;
            }
            x[(3 * w + 4) % n] = f32::NEG_INFINITY;
            let g = PoolGeom::new(2, [h, w], [3, 3], [2, 2], [p, p], ceil);
            let (y, idx) = max_pool_forward(&x, &g, true);
            let (mut y0, mut idx0) = (Vec::new(), Vec::new());
            for xp in x.chunks(h * w) {
                for oy in 0..g.ho {
                    for ox in 0..g.wo {
                        let rows = PoolGeom::window(oy, 3, 2, p, h);
                        let (b, a) = window_max(xp, w, rows, PoolGeom::window(ox, 3, 2, p, w));
                        y0.push(b);
                        idx0.push(a);
                    }
                }
            }
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let case = format!("{h}x{w} pad {p} ceil {ceil}");
            assert_eq!((bits(&y), &idx), (bits(&y0), &idx0), "{case}");
            assert_eq!(
                bits(&max_pool_forward(&x, &g, false).0),
                bits(&y0),
                "{case}"
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
