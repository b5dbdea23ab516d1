//! 2-D convolution as im2col + GEMM on plain `f32` slices (NCHW), forward and backward.
//!
//! This is Caffe's formulation (Jia et al., 2014, "Caffe: Convolutional Architecture for Fast
//! Feature Embedding"), chosen because every product it asks for is a well-shaped GEMM:
//!
//! - forward, per image: `Y[C_out, P] = W[C_out, K] · col(X)[K, P]`
//! - weight gradient:    `dW[C_out, K] += dY[C_out, P] · col(X)[K, P]ᵀ`
//! - input gradient:     `dcol[K, P] = Wᵀ[K, C_out] · dY[C_out, P]`, then col2im into `dX`
//!
//! with `K = C_in · kh · kw` and `P = H_out · W_out`. Burn-flex 0.22.1 computes the weight gradient
//! as a convolution with the batch as channels, which becomes a GEMM with `N = kh · kw` (9 for a
//! 3x3): a skinny product that runs at a fraction of the machine's rate (profiled with `perf`:
//! 24% of a `bench-vgg` training step in gemm's `x1x6` edge kernel). Here all three products have
//! `M, N, K` in the hundreds.
//!
//! The GEMM is the `gemm` crate (the one burn-flex already links; 88-105 GFLOP/s on one core of
//! this machine for the 64-256 channel layers of `bench-vgg`, forward and backward:
//! `cargo run --release --example conv_layers 1`). Work is split over images, one
//! contiguous block of images per thread, so each GEMM runs single-threaded on a private column
//! buffer and partial weight gradients are summed in a fixed order: the same thread count gives
//! bit-identical results.
//!
//! # Shapes
//! `x: [B, C_in, H, W]`, `w: [C_out, C_in, kh, kw]`, `bias: [C_out]`, `y: [B, C_out, H_out, W_out]`,
//! `H_out = (H + 2·ph - kh) / sh + 1` (and likewise for the width).

use super::buf::par_zeroed_with;
use super::simd::dispatched;
use super::{direct, winograd};
use rayon::prelude::*;

/// Largest column buffer per thread, in floats (4 MiB): big enough that the GEMM's `N` is in
/// the hundreds, small enough to stay near the L2/L3 caches for 224 px inputs.
#[cfg(not(test))]
const COL_BUDGET: usize = 1 << 20;
/// Tiny in tests, so that they cover images split into several tiles.
#[cfg(test)]
const COL_BUDGET: usize = 64;

/// Output positions that small-output images are grouped to, side by side in one GEMM
/// ([`ConvGeom::images_per_gemm`]).
#[cfg(not(test))]
const GROUP_N: usize = 128;
#[cfg(not(test))]
const GROUP_COL: usize = COL_BUDGET;
/// Small in tests, so that they cover groups of two and an odd last group.
#[cfg(test)]
const GROUP_N: usize = 8;
#[cfg(test)]
const GROUP_COL: usize = 256;

/// The geometry of one convolution (no groups, no dilation, symmetric padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub batch: usize,
    pub cin: usize,
    pub h: usize,
    pub w: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: [usize; 2],
    pub pad: [usize; 2],
    /// The arithmetic of the three GEMMs (f32, or bf16 products summed in f32).
    pub precision: super::Precision,
}

impl ConvGeom {
    /// The geometry of the convolution that computes this stride-1 convolution's input
    /// gradient from its output gradient (with the kernel turned 180° and the channels
    /// swapped): `C_out` channels in, `C_in` out, padding `k - 1 - p`, output `H x W`.
    pub fn input_grad(&self) -> ConvGeom {
        assert_eq!(
            self.stride,
            [1, 1],
            "input gradient as a convolution of {self:?}"
        );
        ConvGeom {
            cin: self.cout,
            cout: self.cin,
            h: self.ho(),
            w: self.wo(),
            pad: [self.kh - 1 - self.pad[0], self.kw - 1 - self.pad[1]],
            ..*self
        }
    }
    pub fn ho(&self) -> usize {
        (self.h + 2 * self.pad[0] - self.kh) / self.stride[0] + 1
    }
    pub fn wo(&self) -> usize {
        (self.w + 2 * self.pad[1] - self.kw) / self.stride[1] + 1
    }
    /// Rows of the column matrix: `C_in · kh · kw`.
    pub fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }
    /// Output positions per image.
    pub fn p(&self) -> usize {
        self.ho() * self.wo()
    }
    fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }
    fn out_len(&self) -> usize {
        self.cout * self.p()
    }
    /// A 1x1 stride-1 unpadded convolution reads the image itself as its column matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == [1, 1] && self.pad == [0, 0]
    }
    /// Images whose column matrices go side by side into one GEMM (1: one image, or part of
    /// one, per GEMM). An image of 16 output positions (resnet18_small's 4 px layers) makes
    /// GEMMs with `N = 16` per image: the `gemm` crate runs its one-vector edge kernel on them,
    /// and the weight gradient re-reads and re-writes all of `dW` (590 KB for 128 -> 128)
    /// every 16 positions. Grouped to [`GROUP_N`] positions, the products have full tiles
    /// and `dW` is touched once per group. Pointwise layers read the image in place and
    /// are left alone.
    fn images_per_gemm(&self) -> usize {
        let (p, k) = (self.p(), self.k());
        if self.is_pointwise() || p == 0 || 2 * p > GROUP_N || 2 * k * p > GROUP_COL {
            return 1;
        }
        (GROUP_N / p)
            .min(GROUP_COL / (k * p))
            .min(self.batch)
            .max(1)
    }
    /// Output rows per column tile.
    fn tile_rows(&self) -> usize {
        (COL_BUDGET / (self.k() * self.wo()).max(1)).clamp(1, self.ho())
    }
}

/// `[start, end)` of output columns `o` whose input column `o·s + j - p` lies in `[0, len)`.
fn valid_range(len: usize, out: usize, s: usize, j: usize, p: usize) -> (usize, usize) {
    let lo = if p > j { (p - j).div_ceil(s) } else { 0 };
    let hi = if len + p > j {
        (len + p - j).div_ceil(s).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// For a stride-1 convolution whose output rows are as long as its input rows (a "same" 3x3
/// with padding 1, say), the column row of kernel tap `(i, j)` over output rows `oy0..oy1` is
/// the input plane shifted by one offset: one long copy, plus zeros in the columns that wrapped
/// around from the neighbouring row. Returns, for that tap, the valid output rows `a..b`, the
/// plane offset of output row `a`'s first element, and the valid columns `lo..hi`.
fn shifted_tap(g: &ConvGeom, oy0: usize, oy1: usize, i: usize, j: usize) -> Option<Shift> {
    if g.stride != [1, 1] || g.wo() != g.w {
        return None;
    }
    let [ph, pw] = g.pad;
    // A tap below the image for every row of the tile (a 5x5 with padding 2 near the bottom)
    // has no valid rows: `a = b = oy0`.
    let b = oy1.min((g.h + ph).saturating_sub(i)).max(oy0);
    let a = oy0.max(ph.saturating_sub(i));
    let (lo, hi) = valid_range(g.w, g.wo(), 1, j, pw);
    let start =
        (a.min(b) + i) as isize * g.w as isize - (ph * g.w) as isize + j as isize - pw as isize;
    Some(Shift {
        a: a.min(b),
        b,
        start,
        lo,
        hi,
    })
}

struct Shift {
    a: usize,
    b: usize,
    start: isize,
    lo: usize,
    hi: usize,
}

impl Shift {
    /// The part of the `(b - a) · W` long run that falls inside the plane: run positions and
    /// the plane index of the first.
    fn clip(&self, w: usize, plane_len: usize) -> (usize, usize, usize) {
        let len = (self.b - self.a) * w;
        let k_lo = (-self.start).max(0) as usize;
        let k_hi = (plane_len as isize - self.start).clamp(0, len as isize) as usize;
        if k_lo >= k_hi {
            return (0, 0, 0);
        }
        (k_lo, k_hi, (self.start + k_lo as isize) as usize)
    }
    /// Zeroes the wrapped columns of rows `a..b` in `run` (which starts at row `a`). Usually
    /// one column on one side (a 3x3 with padding 1), written directly: a `memset` call per
    /// row cost more than the copy itself on 8-32 px planes.
    #[inline(always)]
    fn zero_wrapped(&self, run: &mut [f32], w: usize) {
        let (lo, hi) = (self.lo, self.hi);
        for row in run.chunks_mut(w) {
            match lo {
                0 => {}
                1 => row[0] = 0.0,
                _ => row[..lo].fill(0.0),
            }
            match w - hi {
                0 => {}
                1 => row[w - 1] = 0.0,
                _ => row[hi..].fill(0.0),
            }
        }
    }
}

dispatched! {
    /// Fills `col` (`K` rows of `rows · W_out` floats, `ld` apart) with the patches of output
    /// rows `oy0..oy1` of one image.
    fn im2col(x: &[f32], g: &ConvGeom, oy0: usize, oy1: usize, col: &mut [f32], ld: usize) {
        let (wo, n) = (g.wo(), (oy1 - oy0) * g.wo());
        let [sh, sw] = g.stride;
        let [ph, pw] = g.pad;
        let plane_len = g.h * g.w;
        for c in 0..g.cin {
            let plane = &x[c * plane_len..(c + 1) * plane_len];
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let r = (c * g.kh + i) * g.kw + j;
                    let dst = &mut col[r * ld..r * ld + n];
                    if let Some(sh) = shifted_tap(g, oy0, oy1, i, j) {
                        let (ra, rb) = ((sh.a - oy0) * wo, (sh.b - oy0) * wo);
                        dst[..ra].iter_mut().for_each(|v| *v = 0.0);
                        dst[rb..].iter_mut().for_each(|v| *v = 0.0);
                        let run = &mut dst[ra..rb];
                        let (k_lo, k_hi, p0) = sh.clip(g.w, plane_len);
                        run[k_lo..k_hi].copy_from_slice(&plane[p0..p0 + (k_hi - k_lo)]);
                        sh.zero_wrapped(run, g.w);
                        continue;
                    }
                    let (lo, hi) = valid_range(g.w, wo, sw, j, pw);
                    for oy in oy0..oy1 {
                        let d = &mut dst[(oy - oy0) * wo..(oy - oy0 + 1) * wo];
                        let iy = (oy * sh + i) as isize - ph as isize;
                        if iy < 0 || iy >= g.h as isize {
                            d.fill(0.0);
                            continue;
                        }
                        let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                        d[..lo].fill(0.0);
                        d[hi..].fill(0.0);
                        if sw == 1 {
                            d[lo..hi].copy_from_slice(&src[lo + j - pw..hi + j - pw]);
                        } else {
                            for (ox, v) in d[lo..hi].iter_mut().enumerate() {
                                *v = src[(lo + ox) * sw + j - pw];
                            }
                        }
                    }
                }
            }
        }
    }
}

dispatched! {
    /// The transpose of [`im2col`]: adds the column gradients of rows `oy0..oy1` (rows `ld`
    /// apart) into `dx` (`dcol` is scratch: its entries for padding positions are zeroed on
    /// the way).
    fn col2im(dcol: &mut [f32], g: &ConvGeom, oy0: usize, oy1: usize, ld: usize, dx: &mut [f32]) {
        let (wo, n) = (g.wo(), (oy1 - oy0) * g.wo());
        let [sh, sw] = g.stride;
        let [ph, pw] = g.pad;
        let plane_len = g.h * g.w;
        for c in 0..g.cin {
            let plane = &mut dx[c * plane_len..(c + 1) * plane_len];
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let r = (c * g.kh + i) * g.kw + j;
                    let src = &mut dcol[r * ld..r * ld + n];
                    if let Some(sh) = shifted_tap(g, oy0, oy1, i, j) {
                        let run = &mut src[(sh.a - oy0) * wo..(sh.b - oy0) * wo];
                        sh.zero_wrapped(run, g.w);
                        let (k_lo, k_hi, p0) = sh.clip(g.w, plane_len);
                        add_row_inline(&mut plane[p0..p0 + (k_hi - k_lo)], &run[k_lo..k_hi]);
                        continue;
                    }
                    let (lo, hi) = valid_range(g.w, wo, sw, j, pw);
                    for oy in oy0..oy1 {
                        let iy = (oy * sh + i) as isize - ph as isize;
                        if iy < 0 || iy >= g.h as isize {
                            continue;
                        }
                        let s = &src[(oy - oy0) * wo..(oy - oy0 + 1) * wo];
                        let d = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                        if sw == 1 {
                            add_row_inline(&mut d[lo + j - pw..hi + j - pw], &s[lo..hi]);
                        } else {
                            for ox in lo..hi {
                                d[ox * sw + j - pw] += s[ox];
                            }
                        }
                    }
                }
            }
        }
    }
}

#[inline(always)]
fn add_row_inline(d: &mut [f32], s: &[f32]) {
    d.iter_mut().zip(s).for_each(|(a, &b)| *a += b);
}

/// `dst[m, n] (+)= Σ_k lhs[m, k] · rhs[k, n]` in `precision`, every operand given by (row,
/// column) strides.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    precision: super::Precision,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    threads: usize,
) {
    let f = match precision {
        super::Precision::Fp32 => gemm_f32,
        super::Precision::Bf16 => super::bf16::gemm,
    };
    f(
        m, n, k, dst, dst_rs, accumulate, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, threads,
    )
}

/// A left operand used for every image of a batch (the weights, or their transpose), prepared
/// once: in bf16 it is rounded and packed once instead of once per image.
pub(super) enum Lhs<'a> {
    F32 {
        m: usize,
        k: usize,
        data: &'a [f32],
        rs: usize,
        cs: usize,
    },
    Bf16(super::bf16::PackedLhs),
}

impl<'a> Lhs<'a> {
    pub(super) fn new(
        precision: super::Precision,
        m: usize,
        k: usize,
        data: &'a [f32],
        rs: usize,
        cs: usize,
    ) -> Self {
        match precision {
            super::Precision::Fp32 => Lhs::F32 { m, k, data, rs, cs },
            super::Precision::Bf16 => Lhs::Bf16(super::bf16::PackedLhs::new(m, k, data, rs, cs)),
        }
    }

    /// `dst[m, n] (+)= self · rhs[k, n]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mul(
        &self,
        n: usize,
        dst: &mut [f32],
        dst_rs: usize,
        accumulate: bool,
        rhs: &[f32],
        rhs_rs: usize,
        rhs_cs: usize,
        threads: usize,
    ) {
        match *self {
            Lhs::F32 { m, k, data, rs, cs } => gemm_f32(
                m, n, k, dst, dst_rs, accumulate, data, rs, cs, rhs, rhs_rs, rhs_cs, threads,
            ),
            Lhs::Bf16(ref a) => super::bf16::gemm_packed(
                a, n, dst, dst_rs, accumulate, rhs, rhs_rs, rhs_cs, threads,
            ),
        }
    }
}

/// The f32 GEMM: the `gemm` crate.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds the raw-pointer call below: the last element each operand's strides reach.
    assert!(dst.len() > (m - 1) * dst_rs + (n - 1));
    if k > 0 {
        assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
        assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every strided access inside the three slices, and `dst`
    // is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Contiguous blocks of images, one per thread; fixed for a given batch and thread count.
pub(super) fn image_blocks(batch: usize) -> Vec<std::ops::Range<usize>> {
    let parts = rayon::current_num_threads().clamp(1, batch.max(1));
    (0..parts)
        .map(|t| t * batch / parts..(t + 1) * batch / parts)
        .collect()
}

/// The elementwise sum of per-block partial gradients, added in block order (so a thread count
/// gives the same bits every run).
pub(super) fn sum_in_order<'a>(mut parts: impl Iterator<Item = &'a Vec<f32>>) -> Vec<f32> {
    let mut acc = parts.next().cloned().unwrap_or_default();
    for part in parts {
        acc.iter_mut().zip(part).for_each(|(a, b)| *a += b);
    }
    acc
}

/// Threads each GEMM may use: all of them when there are fewer images than threads.
pub(super) fn gemm_threads(batch: usize) -> usize {
    if batch < rayon::current_num_threads() {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// Forward convolution. Returns `y` (`[B, C_out, H_out, W_out]`, contiguous). 3x3 stride-1
/// layers with enough channels go through Winograd's F(2x2, 3x3) ([`super::winograd`]), other
/// stride-1 layers of 16 or more output channels through the direct kernels
/// ([`super::direct`]), the rest through im2col + GEMM.
pub fn conv2d_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeom) -> Vec<f32> {
    conv2d_forward_act(x, w, bias, g, false)
}

/// [`conv2d_forward`], then `max(·, 0)` when `relu`: applied to each image's output by the
/// thread that computed it, while it is still in cache (inference with batch norm folded into
/// the weights, [`super::conv_bn`]).
pub fn conv2d_forward_act(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<f32> {
    if winograd::applies(g) {
        let u = winograd::transform_weights(w, g.cout, g.cin, false);
        return winograd::forward_act(x, &u, bias, g, relu);
    }
    if direct::applies(g) {
        return direct::forward_act(x, w, bias, g, relu);
    }
    im2col_forward_act(x, w, bias, g, relu)
}

/// [`conv2d_forward`] by im2col + GEMM, whatever the geometry.
pub fn im2col_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeom) -> Vec<f32> {
    im2col_forward_act(x, w, bias, g, false)
}

/// [`im2col_forward`], then `max(·, 0)` on each image's output when `relu`.
fn im2col_forward_act(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<f32> {
    assert_eq!(x.len(), g.batch * g.in_len(), "conv2d input length");
    assert_eq!(w.len(), g.cout * g.k(), "conv2d weight length");
    let (k, p, cout) = (g.k(), g.p(), g.cout);
    let threads = gemm_threads(g.batch);
    let rows = g.tile_rows();
    let lhs = Lhs::new(g.precision, cout, k, w, k, 1);
    let group = g.images_per_gemm();
    if group > 1 {
        let (in_len, out_len, ho) = (g.in_len(), g.out_len(), g.ho());
        return par_zeroed_with(
            g.batch * out_len,
            group * out_len,
            x.par_chunks(group * in_len),
            || (Vec::new(), Vec::new()),
            |(col, prod), yc, xc| {
                // `col: [K, images · P]`, image `i` in columns `i·P..`; `prod: [C_out, images · P]`.
                let n = xc.len() / in_len * p;
                col.resize(k * n, 0.0);
                for (i, xn) in xc.chunks(in_len).enumerate() {
                    im2col(xn, g, 0, ho, &mut col[i * p..], n);
                }
                prod.resize(cout * n, 0.0);
                lhs.mul(n, prod, n, false, col, n, 1, threads);
                for (i, yn) in yc.chunks_mut(out_len).enumerate() {
                    for (o, row) in yn.chunks_mut(p).enumerate() {
                        let b = bias.map_or(0.0, |b| b[o]);
                        let src = &prod[o * n + i * p..][..p];
                        row.iter_mut().zip(src).for_each(|(d, &s)| *d = s + b);
                    }
                    if relu {
                        super::simd::relu_row(yn);
                    }
                }
            },
        );
    }
    let inputs = x.par_chunks(g.in_len().max(1));
    par_zeroed_with(
        g.batch * g.out_len(),
        g.out_len(),
        inputs,
        Vec::new,
        |col, yn, xn| {
            if g.is_pointwise() {
                lhs.mul(p, yn, p, false, xn, p, 1, threads);
            } else {
                for oy0 in (0..g.ho()).step_by(rows) {
                    let oy1 = (oy0 + rows).min(g.ho());
                    let n = (oy1 - oy0) * g.wo();
                    col.resize(k * n, 0.0);
                    im2col(xn, g, oy0, oy1, col, n);
                    let dst = &mut yn[oy0 * g.wo()..];
                    lhs.mul(n, dst, p, false, col, n, 1, threads);
                }
            }
            if let Some(b) = bias {
                for (row, &bo) in yn.chunks_mut(p).zip(b) {
                    row.iter_mut().for_each(|v| *v += bo);
                }
            }
            if relu {
                super::simd::relu_row(yn);
            }
        },
    )
}

/// `(dx, dw, db)`, each present when it was asked for.
pub type ConvGrads = (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>);

/// Gradients of [`conv2d_forward`] given the output gradient `dy`: `(dx, dw, db)`, each only when
/// asked for. The input gradient of a Winograd-eligible layer is a Winograd convolution of `dy`
/// with the rotated kernel; the rest come from the direct kernels ([`super::direct`]) or
/// im2col + GEMM, whichever was faster for such a layer.
pub fn conv2d_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    g: &ConvGeom,
    need: [bool; 3],
) -> ConvGrads {
    // The input gradient from Winograd where it applies, else from the direct kernels if they
    // take this layer and it has 16 input channels or more, else from im2col. The weight and
    // bias gradients from the direct kernels where they apply, except on Winograd layers
    // narrower than 32 px, where im2col's was faster (bench-vgg's 16 px layers: 24.7 vs 30.8
    // ms for 128 -> 128, 12.4-14.4 vs 16 ms for 64 -> 128; at 32 px 64 -> 64 direct won, 26.3
    // vs 29.5-33 ms: `cargo run --release --example conv_layers 2 fp32 bench-vgg`).
    // In bf16, im2col's weight gradient (on the bf16 GEMM) also wins at 32 px: 15.3 vs 18.7 ms
    // for bench-vgg's 64 -> 64 layer (`conv_layers 1 bf16 bench-vgg`).
    let winograd = winograd::applies(g);
    let direct_dx = direct::applies(g);
    let direct =
        direct_dx && (!winograd || (g.wo() >= 32 && g.precision == super::Precision::Fp32));
    let dx_by = if !need[0] {
        None
    } else if winograd {
        Some(DxBy::Winograd)
    } else if direct_dx && g.cin >= 16 {
        Some(DxBy::Direct)
    } else {
        Some(DxBy::Im2col)
    };
    let rest = [false, need[1], need[2]];
    let (_, dw, db) = if direct {
        direct::backward(x, w, dy, g, rest)
    } else {
        im2col_backward(x, w, dy, g, rest)
    };
    let dx = dx_by.map(|by| match by {
        DxBy::Winograd => {
            let gi = g.input_grad();
            let ut = winograd::transform_weights(w, g.cout, g.cin, true);
            winograd::forward(dy, &ut, None, &gi)
        }
        DxBy::Direct => direct::backward(x, w, dy, g, [true, false, false])
            .0
            .unwrap(),
        DxBy::Im2col => im2col_backward(x, w, dy, g, [true, false, false])
            .0
            .unwrap(),
    });
    (dx, dw, db)
}

/// Which kernel computes an input gradient.
enum DxBy {
    Winograd,
    Direct,
    Im2col,
}

/// [`conv2d_backward`] by im2col + GEMM, whatever the geometry.
pub fn im2col_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    g: &ConvGeom,
    need: [bool; 3],
) -> ConvGrads {
    assert_eq!(x.len(), g.batch * g.in_len(), "conv2d input length");
    assert_eq!(
        dy.len(),
        g.batch * g.out_len(),
        "conv2d output-gradient length"
    );
    let (k, p, cout, in_len, out_len) = (g.k(), g.p(), g.cout, g.in_len(), g.out_len());
    let [need_dx, need_dw, need_db] = need;
    let threads = gemm_threads(g.batch);
    let rows = g.tile_rows();
    let mut dx = need_dx.then(|| vec![0.0f32; x.len()]);
    let blocks = image_blocks(g.batch);
    let group = g.images_per_gemm();
    // Each block of images gets its own slice of dx and returns its partial dW and db.
    let mut dx_parts: Vec<Option<&mut [f32]>> = match dx.as_mut() {
        Some(d) => {
            let mut rest = d.as_mut_slice();
            blocks
                .iter()
                .map(|r| {
                    let (head, tail) = std::mem::take(&mut rest).split_at_mut(r.len() * in_len);
                    rest = tail;
                    Some(head)
                })
                .collect()
        }
        None => blocks.iter().map(|_| None).collect(),
    };
    // The weight gradient is accumulated transposed, `[K, C_out]`, when K >= C_out: for the
    // 64 -> 64 channel 32 px layer that took its weight gradient from 85.7 to 32.0 ms per batch
    // of 64, while the first layer (K = 27) is faster as `[C_out, K]`
    // (`cargo run --release --example conv_layers`, before and after).
    let transposed = k >= cout;
    // `Wᵀ [K, C_out]`, the left operand of the input gradient.
    let wt = need_dx.then(|| Lhs::new(g.precision, k, cout, w, 1, k));
    // `dw (+)= dY[C_out, n] · col[K, n]ᵀ` for one tile of `n` positions (`col` rows `n` long,
    // `dY` rows `ld` apart).
    let add_weight_grad = |dw: &mut [f32], col: &[f32], dy_tile: &[f32], n: usize, ld: usize| {
        if transposed {
            gemm(
                g.precision,
                k,
                cout,
                n,
                dw,
                cout,
                true,
                col,
                n,
                1,
                dy_tile,
                1,
                ld,
                threads,
            );
        } else {
            gemm(
                g.precision,
                cout,
                k,
                n,
                dw,
                k,
                true,
                dy_tile,
                ld,
                1,
                col,
                1,
                n,
                threads,
            );
        }
    };
    let partials: Vec<(Vec<f32>, Vec<f32>)> = blocks
        .par_iter()
        .zip(dx_parts.par_iter_mut())
        .map(|(range, dx_block)| {
            let mut dwt = if need_dw {
                vec![0.0f32; k * cout]
            } else {
                Vec::new()
            };
            let mut db = vec![0.0f32; if need_db { cout } else { 0 }];
            let (mut col, mut dcol) = (Vec::new(), Vec::new());
            if group > 1 {
                // `group` images at a time: `dY` gathered to `[C_out, images · P]`, and `col`
                // / `dcol` `[K, images · P]`, image `i` in columns `i·P..`.
                let mut dyg = Vec::new();
                for first in range.clone().step_by(group) {
                    let images = group.min(range.end - first);
                    let n = images * p;
                    dyg.resize(cout * n, 0.0);
                    for i in 0..images {
                        let dyn_ = &dy[(first + i) * out_len..][..out_len];
                        for (o, row) in dyn_.chunks(p).enumerate() {
                            dyg[o * n + i * p..][..p].copy_from_slice(row);
                            if need_db {
                                db[o] += row.iter().sum::<f32>();
                            }
                        }
                    }
                    if need_dw {
                        col.resize(k * n, 0.0);
                        for i in 0..images {
                            let xn = &x[(first + i) * in_len..][..in_len];
                            im2col(xn, g, 0, g.ho(), &mut col[i * p..], n);
                        }
                        add_weight_grad(&mut dwt, &col, &dyg, n, n);
                    }
                    if let Some(d) = dx_block.as_deref_mut() {
                        dcol.resize(k * n, 0.0);
                        let wt = wt.as_ref().unwrap();
                        wt.mul(n, &mut dcol, n, false, &dyg, n, 1, threads);
                        let at = first - range.start;
                        for (i, dxn) in d[at * in_len..][..images * in_len]
                            .chunks_mut(in_len)
                            .enumerate()
                        {
                            col2im(&mut dcol[i * p..], g, 0, g.ho(), n, dxn);
                        }
                    }
                }
                return (dwt, db);
            }
            for (i, n) in range.clone().enumerate() {
                let xn = &x[n * in_len..(n + 1) * in_len];
                let dyn_ = &dy[n * out_len..(n + 1) * out_len];
                if need_db {
                    for (acc, row) in db.iter_mut().zip(dyn_.chunks(p)) {
                        *acc += row.iter().sum::<f32>();
                    }
                }
                let dxn = dx_block
                    .as_deref_mut()
                    .map(|d| &mut d[i * in_len..(i + 1) * in_len]);
                if g.is_pointwise() {
                    if need_dw {
                        add_weight_grad(&mut dwt, xn, dyn_, p, p);
                    }
                    if let Some(dxn) = dxn {
                        wt.as_ref()
                            .unwrap()
                            .mul(p, dxn, p, false, dyn_, p, 1, threads);
                    }
                    continue;
                }
                let mut dxn = dxn;
                for oy0 in (0..g.ho()).step_by(rows) {
                    let oy1 = (oy0 + rows).min(g.ho());
                    let nn = (oy1 - oy0) * g.wo();
                    let dy_tile = &dyn_[oy0 * g.wo()..];
                    if need_dw {
                        col.resize(k * nn, 0.0);
                        im2col(xn, g, oy0, oy1, &mut col, nn);
                        add_weight_grad(&mut dwt, &col, dy_tile, nn, p);
                    }
                    if let Some(d) = dxn.as_deref_mut() {
                        dcol.resize(k * nn, 0.0);
                        let wt = wt.as_ref().unwrap();
                        wt.mul(nn, &mut dcol, nn, false, dy_tile, p, 1, threads);
                        col2im(&mut dcol, g, oy0, oy1, nn, d);
                    }
                }
            }
            (dwt, db)
        })
        .collect();
    let dw = need_dw.then(|| {
        let dwt = sum_in_order(partials.iter().map(|t| &t.0));
        if !transposed {
            return dwt;
        }
        let mut dw = vec![0.0f32; cout * k];
        for (r, row) in dwt.chunks(cout).enumerate() {
            for (o, &v) in row.iter().enumerate() {
                dw[o * k + r] = v;
            }
        }
        dw
    });
    let db = need_db.then(|| sum_in_order(partials.iter().map(|t| &t.1)));
    (dx, dw, db)
}

/// Deterministic test values in [-1, 1), different for each seed.
#[cfg(test)]
pub(super) fn test_data(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::test_data as data;
    use super::*;

    /// The definition, one multiply-add at a time.
    fn naive(x: &[f32], w: &[f32], b: &[f32], g: &ConvGeom) -> Vec<f32> {
        let (ho, wo) = (g.ho(), g.wo());
        let mut y = vec![0.0; g.batch * g.cout * ho * wo];
        for n in 0..g.batch {
            for o in 0..g.cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = b[o];
                        for c in 0..g.cin {
                            for i in 0..g.kh {
                                for j in 0..g.kw {
                                    let iy = (oy * g.stride[0] + i) as isize - g.pad[0] as isize;
                                    let ix = (ox * g.stride[1] + j) as isize - g.pad[1] as isize;
                                    if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize
                                    {
                                        continue;
                                    }
                                    s += x
                                        [((n * g.cin + c) * g.h + iy as usize) * g.w + ix as usize]
                                        * w[((o * g.cin + c) * g.kh + i) * g.kw + j];
                                }
                            }
                        }
                        y[((n * g.cout + o) * ho + oy) * wo + ox] = s;
                    }
                }
            }
        }
        y
    }

    fn geoms() -> Vec<ConvGeom> {
        let g = |batch, cin, h, w, cout, k: [usize; 2], s, p| ConvGeom {
            batch,
            cin,
            h,
            w,
            cout,
            kh: k[0],
            kw: k[1],
            stride: [s, s],
            pad: [p, p],
            precision: crate::kernels::Precision::Fp32,
        };
        vec![
            g(3, 2, 7, 6, 4, [3, 3], 1, 1),
            g(2, 3, 9, 9, 5, [5, 5], 2, 2),
            g(2, 3, 11, 11, 2, [11, 11], 4, 2),
            g(3, 4, 5, 5, 3, [1, 1], 1, 0),
            g(1, 2, 8, 7, 3, [1, 1], 2, 0),
            g(2, 1, 6, 6, 2, [7, 7], 2, 3),
            g(1, 2, 4, 4, 2, [3, 2], 1, 1),
            g(2, 2, 5, 5, 6, [1, 1], 1, 0),
            // Stride 1, output as wide as the input: the shifted-plane copy, with taps that
            // miss every row of the last one-row tiles.
            g(2, 2, 9, 8, 3, [5, 5], 1, 2),
            // The direct kernels where AVX-512 is present: an RGB stem (input gradient from
            // im2col), a 16-channel layer (all three), and a Winograd layer 32 wide (weight
            // gradient from them).
            g(2, 3, 5, 16, 16, [3, 3], 1, 1),
            g(2, 16, 4, 17, 16, [3, 3], 1, 1),
            g(1, 32, 8, 32, 32, [3, 3], 1, 1),
            // Small outputs, several images per GEMM (checked in `small_outputs_are_grouped`):
            // groups of two and an odd last one, stride 1 and 2.
            g(7, 1, 2, 2, 2, [3, 3], 1, 1),
            g(5, 2, 4, 4, 3, [3, 3], 2, 1),
        ]
    }

    #[test]
    fn small_outputs_are_grouped() {
        let grouped: Vec<usize> = geoms().iter().map(|g| g.images_per_gemm()).collect();
        assert_eq!(grouped.iter().filter(|&&n| n > 1).count(), 2, "{grouped:?}");
    }

    /// bf16 convolutions are the f32 ones on bf16-rounded operands (bias and sums stay f32), in
    /// all three products.
    #[test]
    fn bf16_matches_f32_on_rounded_operands() {
        use crate::kernels::{Precision, bf16};
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let rounded = |v: &[f32]| v.iter().map(|&x| bf16::round(x)).collect::<Vec<_>>();
        // Winograd rounds its transformed operands to bf16, not the raw ones: its bf16 path is
        // checked against its f32 one within bf16 rounding in `winograd`'s tests.
        for g32 in geoms().into_iter().filter(|g| !winograd::applies(g)) {
            let g16 = ConvGeom {
                precision: Precision::Bf16,
                ..g32
            };
            let x = data(g32.batch * g32.in_len(), 1);
            let w = data(g32.cout * g32.k(), 2);
            let b = data(g32.cout, 3);
            let dy = data(g32.batch * g32.out_len(), 4);
            let close = |got: &[f32], want: &[f32], what: &str| {
                assert_eq!(got.len(), want.len());
                for (a, e) in got.iter().zip(want) {
                    assert!(
                        (a - e).abs() < 1e-4 * (1.0 + e.abs()),
                        "{what} {g32:?}: {a} vs {e}"
                    );
                }
            };
            let (xr, wr, dyr) = (rounded(&x), rounded(&w), rounded(&dy));
            close(
                &conv2d_forward(&x, &w, Some(&b), &g16),
                &conv2d_forward(&xr, &wr, Some(&b), &g32),
                "forward",
            );
            let got = conv2d_backward(&x, &w, &dy, &g16, [true; 3]);
            let want = conv2d_backward(&xr, &wr, &dyr, &g32, [true; 3]);
            close(got.0.as_ref().unwrap(), want.0.as_ref().unwrap(), "dx");
            close(got.1.as_ref().unwrap(), want.1.as_ref().unwrap(), "dw");
            // The bias gradient is a plain f32 sum of the unrounded output gradient.
            close(
                got.2.as_ref().unwrap(),
                &conv2d_backward(&x, &w, &dy, &g32, [false, false, true])
                    .2
                    .unwrap(),
                "db",
            );
            // And the rounding is real: the result differs from f32 on the raw operands.
            assert_ne!(
                conv2d_forward(&x, &w, None, &g16),
                conv2d_forward(&x, &w, None, &g32)
            );
        }
    }

    #[test]
    fn forward_matches_the_definition() {
        for g in geoms() {
            let x = data(g.batch * g.in_len(), 1);
            let w = data(g.cout * g.k(), 2);
            let b = data(g.cout, 3);
            let got = conv2d_forward(&x, &w, Some(&b), &g);
            let want = naive(&x, &w, &b, &g);
            for (a, e) in got.iter().zip(&want) {
                assert!((a - e).abs() < 1e-4, "{g:?}: {a} vs {e}");
            }
        }
    }

    /// The backward pass is the adjoint of the forward one: `<dy, conv(x)> = <dconv(dy), x>` for
    /// the input and likewise for the weights, so each gradient is checked against the forward
    /// pass with no second implementation of convolution.
    #[test]
    fn backward_is_the_adjoint_of_forward() {
        for g in geoms() {
            let x = data(g.batch * g.in_len(), 4);
            let w = data(g.cout * g.k(), 5);
            let dy = data(g.batch * g.out_len(), 6);
            let (dx, dw, db) = conv2d_backward(&x, &w, &dy, &g, [true, true, true]);
            let (dx, dw, db) = (dx.unwrap(), dw.unwrap(), db.unwrap());
            let dot =
                |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(a, b)| (a * b) as f64).sum::<f64>();
            let y = conv2d_forward(&x, &w, None, &g);
            // Linear in x and in w separately: <dy, y> = <dx, x> = <dw, w>.
            let lhs = dot(&dy, &y);
            assert!(
                (lhs - dot(&dx, &x)).abs() < 1e-3 * lhs.abs().max(1.0),
                "{g:?} dx"
            );
            assert!(
                (lhs - dot(&dw, &w)).abs() < 1e-3 * lhs.abs().max(1.0),
                "{g:?} dw"
            );
            let ones = vec![1.0; g.cout];
            let yb = conv2d_forward(&vec![0.0; x.len()], &w, Some(&ones), &g);
            assert!((dot(&dy, &yb) - db.iter().map(|&v| v as f64).sum::<f64>()).abs() < 1e-3);
        }
    }

    /// Same inputs and thread count, same bits (the weight gradient is the one summed across
    /// threads); and 1 vs 3 threads agree to rounding.
    #[test]
    fn backward_is_deterministic_for_a_thread_count() {
        let g = geoms()[0];
        let g = ConvGeom { batch: 7, ..g };
        let x = data(g.batch * g.in_len(), 11);
        let w = data(g.cout * g.k(), 12);
        let dy = data(g.batch * g.out_len(), 13);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| conv2d_backward(&x, &w, &dy, &g, [true, true, true]))
        };
        let (a, b) = (run(3), run(3));
        assert_eq!(a, b);
        let one = run(1);
        for (p, q) in one.1.unwrap().iter().zip(a.1.as_ref().unwrap()) {
            assert!((p - q).abs() < 1e-4);
        }
    }

    #[test]
    fn valid_range_is_exact() {
        for (len, s, j, p) in [(7, 1, 0, 1), (7, 2, 4, 2), (5, 3, 0, 0), (4, 1, 6, 3)] {
            let out = (len + 2 * p - 7.min(len + 2 * p)) / s + 1;
            let (lo, hi) = valid_range(len, out, s, j, p);
            for o in 0..out {
                let i = (o * s + j) as isize - p as isize;
                assert_eq!(
                    (lo..hi).contains(&o),
                    i >= 0 && i < len as isize,
                    "{len} {s} {j} {p} {o}"
                );
            }
        }
    }
}
