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

use super::act::Act;
use super::buf::{par_zeroed, par_zeroed_parts, par_zeroed_with, with_scratch};
use super::conv::{ConvGeom, ConvGrads};
use super::gemm::{Lhs, gemm, gemm_threads, image_blocks, sum_transposed_in_order};
use super::simd::dispatched;
use rayon::prelude::*;

/// Largest column buffer per thread, in floats (4 MiB): big enough that the GEMM's `N` is in
/// the hundreds, small enough to stay near the L2/L3 caches for 224 px inputs.
#[cfg(not(test))]
const COL_BUDGET: usize = 1 << 20;
/// Tiny in tests, so that they cover images split into several tiles.
#[cfg(test)]
const COL_BUDGET: usize = 64;

/// Output positions that small-output images are grouped to, side by side in one GEMM
/// ([`ConvGeom::images_per_gemm`]), and the largest grouped column buffer (16 MiB). 512
/// rather than 128 positions: resnet18's 512 -> 512 layers at 4 px (128 px input, batch 32,
/// 2 threads, Xeon with AMX) then re-read their 9.4 MB weight gradient once per thread
/// instead of once per 8 images; backward 102 -> 80 ms in fp32, 70-80 -> 54-56 ms in bf16
/// (`cargo run --release --example conv_layers 2 fp32|bf16 resnet18 128 32`).
#[cfg(not(test))]
const GROUP_N: usize = 512;
#[cfg(not(test))]
const GROUP_COL: usize = 4 * COL_BUDGET;
/// Small in tests, so that they cover groups of two and an odd last group.
#[cfg(test)]
const GROUP_N: usize = 8;
#[cfg(test)]
const GROUP_COL: usize = 256;

impl ConvGeom {
    /// Images whose column matrices go side by side into one GEMM (1: one image, or part of
    /// one, per GEMM). An image of 16 output positions (resnet18_small's 4 px layers) makes
    /// GEMMs with `N = 16` per image: the `gemm` crate runs its one-vector edge kernel on them,
    /// and the weight gradient re-reads and re-writes all of `dW` (590 KB for 128 -> 128)
    /// every 16 positions. Grouped to [`GROUP_N`] positions, the products have full tiles
    /// and `dW` is touched once per group.
    ///
    /// Pointwise layers are grouped too (their column matrix is a copy of the images): at
    /// 7 px, 49 positions per image made four narrow panels, the last one column wide.
    /// resnet50's 7 px 1x1 layers at 224 px, batch 16, 2 threads, bf16, Zen 4 (`CONV_LAYERS_ONLY
    /// =1x1/1 cargo run --release --example conv_layers 2 bf16 resnet50 224 16`, two alternated
    /// pairs): forward 9.6-10.6 -> 5.6-6.2 ms, input gradient 13.5-14.9 -> 8.0-9.4 ms; fp32
    /// forward 9.7 -> 7.9-9.0 ms; 14 px (two images per group) unchanged. Their weight
    /// gradient stays per image, reading each image in place ([`weight_grad`]): grouped it
    /// went from 5.2 to 7.0-7.3 ms for 2048 -> 512 in bf16.
    pub(super) fn images_per_gemm(&self) -> usize {
        let (p, k) = (self.p(), self.k());
        if p == 0 || 2 * p > GROUP_N || 2 * k * p > GROUP_COL {
            return 1;
        }
        (GROUP_N / p)
            .min(GROUP_COL / (k * p))
            .min(self.batch)
            .max(1)
    }
    /// [`Self::images_per_gemm`] evened out over `threads` workers: the fewest groups of at
    /// most that many images, rounded up to a multiple of `threads`, split as evenly as the
    /// batch allows. Groups of the largest size left a short last one: resnet18's 512 -> 512
    /// layers at 7 px (224 px input, batch 32: 49 positions, 10 images a group) made groups of
    /// 10, 10, 10 and 2, so one worker computed 20 images while the other computed 12; in 4
    /// groups of 8 each computes 16.
    pub(super) fn images_per_gemm_on(&self, threads: usize) -> usize {
        even_groups(self.batch, self.images_per_gemm(), threads)
    }
    /// Output rows per column tile.
    pub(super) fn tile_rows(&self) -> usize {
        (COL_BUDGET / (self.k() * self.wo()).max(1)).clamp(1, self.ho())
    }
}

/// Images per group for `batch` images in groups of at most `most`, on `threads` workers: the
/// fewest groups, rounded up to a multiple of `threads`, as even as the batch allows.
fn even_groups(batch: usize, most: usize, threads: usize) -> usize {
    let most = most.max(1);
    let groups = batch.div_ceil(most).next_multiple_of(threads.max(1));
    batch.div_ceil(groups.max(1)).clamp(1, most)
}

/// `[start, end)` of output columns `o` whose input column `o·s + j - p` lies in `[0, len)`.
pub(super) fn valid_range(len: usize, out: usize, s: usize, j: usize, p: usize) -> (usize, usize) {
    let lo = if p > j { (p - j).div_ceil(s) } else { 0 };
    let hi = if len + p > j {
        (len + p - j).div_ceil(s).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Whether every kernel tap's column row is one long run of a plane whose rows are `W_out`
/// long, shifted by the tap ([`tap_run`]): the image itself for a stride-1 convolution whose
/// output rows are as long as its input rows (a "same" 3x3 with padding 1, say), or for a
/// strided one the phase plane the tap reads ([`Runs`]), where the tap's valid columns
/// stay inside the plane's rows (ResNet's 3x3/2, 1x1/2 and 7x7/2 layers at every size).
fn runs_fit(g: &ConvGeom) -> bool {
    let [sh, sw] = g.stride;
    if g.stride == [1, 1] {
        return g.wo() == g.w;
    }
    let wo = g.wo() as isize;
    sh > 0
        && sw > 0
        && (0..g.kw).all(|j| {
            let (lo, hi) = valid_range(g.w, g.wo(), sw, j, g.pad[1]);
            let b = (j as isize - g.pad[1] as isize).div_euclid(sw as isize);
            lo >= hi || (lo as isize + b >= 0 && hi as isize + b <= wo)
        })
}

/// Tap `(i, j)`'s column row over output rows `oy0..oy1` as one run of the plane it reads (for
/// a geometry that [`runs_fit`]), and that plane: phase `(q_i, q_j)` of the input, where
/// input position `(y, x)` is value `(y div s_h, x div s_w)` of phase `(y mod s_h, x mod s_w)`,
/// stored in rows `W_out` long (stride 1: one phase, the image). With `i - p_h = s_h·b_i + q_i`
/// (and likewise for `j`), output `(oy, ox)` reads plane value `(oy + b_i, ox + b_j)`, at run
/// offset `(oy + b_i)·W_out + ox + b_j`: one contiguous run for the whole band, whose entries
/// outside the image (rows above or below it, columns that wrapped around from the
/// neighbouring row) are zeroed afterwards. Returns the valid output rows `a..b`, the plane
/// offset of row `a`'s run, the valid columns `lo..hi`, and the phase's index `q_i·s_w + q_j`.
fn tap_run(g: &ConvGeom, oy0: usize, oy1: usize, i: usize, j: usize) -> (Shift, usize) {
    let [sh, sw] = g.stride;
    let [ph, pw] = g.pad;
    let (ei, ej) = (i as isize - ph as isize, j as isize - pw as isize);
    // A tap below the image for every row of the band (a 5x5 with padding 2 near the bottom)
    // has no valid rows: `a = b = oy0`.
    let (ra, rb) = valid_range(g.h, g.ho(), sh, i, ph);
    let b = oy1.min(rb).max(oy0);
    let a = oy0.max(ra).min(b);
    let (lo, hi) = valid_range(g.w, g.wo(), sw, j, pw);
    let (si, sj) = (sh as isize, sw as isize);
    let start = (a as isize + ei.div_euclid(si)) * g.wo() as isize + ej.div_euclid(sj);
    let phase = (ei.rem_euclid(si) * sj + ej.rem_euclid(sj)) as usize;
    (
        Shift {
            a,
            b,
            start,
            lo,
            hi,
        },
        phase,
    )
}

/// Every tap's run for one band of output rows ([`tap_run`], in the weights' tap order) and,
/// when strided, the phase planes they read: `s_h·s_w` planes of `H_q = ⌈H / s_h⌉` rows of
/// `W_out` values, filled per input channel in the rows the band reads, for the phases some tap
/// reads (a 1x1/2 reads one of four). A phase shorter than that keeps its last row or column as
/// it was: only entries outside the image read them, and those are zeroed. Made once per band:
/// the runs' divisions, per tap and channel, cost more than copying a 4 px map's run.
struct Runs {
    taps: Vec<(Shift, usize)>,
    /// Phase rows to fill, `(input row, plane offset, column phase, values)`.
    rows: Vec<[usize; 4]>,
    /// Values per phase plane (0 at stride 1: the taps read the image).
    plane: usize,
}

impl Runs {
    fn new(g: &ConvGeom, oy0: usize, oy1: usize) -> Runs {
        let [sh, sw] = g.stride;
        let taps: Vec<(Shift, usize)> = (0..g.kh)
            .flat_map(|i| (0..g.kw).map(move |j| (i, j)))
            .map(|(i, j)| tap_run(g, oy0, oy1, i, j))
            .collect();
        if g.stride == [1, 1] {
            return Runs {
                taps,
                rows: Vec::new(),
                plane: 0,
            };
        }
        let (wo, hq) = (g.wo(), g.h.div_ceil(sh));
        let (si, ph) = (sh as isize, g.pad[0] as isize);
        let first = (oy0 as isize + (-ph).div_euclid(si)).clamp(0, hq as isize) as usize;
        let last = (oy1 as isize + (g.kh as isize - 1 - ph).div_euclid(si)).clamp(0, hq as isize);
        let mut rows = Vec::new();
        for qa in 0..sh {
            for r in first..(last as usize).max(first) {
                let y = r * sh + qa;
                for qb in 0..sw {
                    let q = qa * sw + qb;
                    if y < g.h && taps.iter().any(|t| t.1 == q) {
                        let n = g.w.saturating_sub(qb).div_ceil(sw).min(wo);
                        rows.push([y, (q * hq + r) * wo, qb, n]);
                    }
                }
            }
        }
        Runs {
            taps,
            rows,
            plane: hq * wo,
        }
    }

    /// The phase-plane buffer (empty at stride 1).
    fn buffer<E: Copy>(&self, g: &ConvGeom, zero: E) -> Vec<E> {
        vec![zero; g.stride[0] * g.stride[1] * self.plane]
    }

    /// Copies `image`'s band rows into their phase planes in `buf`.
    #[inline(always)]
    fn fill<E: Copy>(&self, image: &[E], g: &ConvGeom, buf: &mut [E]) {
        let sw = g.stride[1];
        for &[y, at, qb, n] in &self.rows {
            let src = &image[y * g.w + qb..];
            for (c, d) in buf[at..at + n].iter_mut().enumerate() {
                *d = src[c * sw];
            }
        }
    }
}

/// Copies tap `s`'s run of `plane` (rows `wo` long) into its column row `dst` (output rows
/// `oy0..`), zeroing the entries outside the image.
#[inline(always)]
fn copy_tap<T: ColValue, E: Act>(dst: &mut [T], s: &Shift, plane: &[E], oy0: usize, wo: usize) {
    let (ra, rb) = ((s.a - oy0) * wo, (s.b - oy0) * wo);
    dst[..ra].iter_mut().for_each(|v| *v = T::ZERO);
    dst[rb..].iter_mut().for_each(|v| *v = T::ZERO);
    let run = &mut dst[ra..rb];
    let (k_lo, k_hi, p0) = s.clip(wo, plane.len());
    T::copy_run(&mut run[k_lo..k_hi], &plane[p0..p0 + (k_hi - k_lo)]);
    s.zero_wrapped(run, wo);
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
    fn zero_wrapped<T: ColValue>(&self, run: &mut [T], w: usize) {
        let (lo, hi) = (self.lo, self.hi);
        for row in run.chunks_mut(w) {
            match lo {
                0 => {}
                1 => row[0] = T::ZERO,
                _ => row[..lo].fill(T::ZERO),
            }
            match w - hi {
                0 => {}
                1 => row[w - 1] = T::ZERO,
                _ => row[hi..].fill(T::ZERO),
            }
        }
    }
}

/// What a column matrix holds: `f32`, or bf16 bits (`u16`, rounded to nearest even as
/// [`super::bf16::round_bits`] does) where the bf16 GEMM reads it as its packed operand.
trait ColValue: Copy {
    const ZERO: Self;
    /// `dst[i] = src[i]` as this type: f32 widened exactly, bf16 bits rounded from f32 or
    /// copied from bf16 activations.
    fn copy_run<E: Act>(dst: &mut [Self], src: &[E]);
}

impl ColValue for f32 {
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn copy_run<E: Act>(dst: &mut [f32], src: &[E]) {
        dst.iter_mut().zip(src).for_each(|(d, &x)| *d = x.to_f32());
    }
}

impl ColValue for u16 {
    const ZERO: Self = 0;
    #[inline(always)]
    fn copy_run<E: Act>(dst: &mut [u16], src: &[E]) {
        dst.iter_mut()
            .zip(src)
            .for_each(|(d, &x)| *d = x.bf16_bits());
    }
}

/// Fills `col` (`K` rows of `rows · W_out` values, `ld` apart) with the patches of output rows
/// `oy0..oy1` of one image.
#[inline(always)]
fn im2col_into<T: ColValue, E: Act>(
    x: &[E],
    g: &ConvGeom,
    oy0: usize,
    oy1: usize,
    col: &mut [T],
    ld: usize,
) {
    let (wo, n) = (g.wo(), (oy1 - oy0) * g.wo());
    let [sh, sw] = g.stride;
    let [ph, pw] = g.pad;
    let plane_len = g.h * g.w;
    if runs_fit(g) {
        // One run per tap: of the image at stride 1, of a phase plane otherwise. Copied row
        // by row of 4-16 outputs (resnet18's strided 3x3 layers at 128 px), each row's taps
        // cost more in bookkeeping than in copying: a third of those layers' forward time.
        let runs = Runs::new(g, oy0, oy1);
        let mut buf = runs.buffer(g, E::ZERO);
        for c in 0..g.cin {
            let image = &x[c * plane_len..(c + 1) * plane_len];
            runs.fill(image, g, &mut buf);
            for (t, (s, q)) in runs.taps.iter().enumerate() {
                let r = c * g.kh * g.kw + t;
                let plane = if buf.is_empty() {
                    image
                } else {
                    &buf[q * runs.plane..][..runs.plane]
                };
                copy_tap(&mut col[r * ld..r * ld + n], s, plane, oy0, wo);
            }
        }
        return;
    }
    // Strided taps read every `sw`-th input value; a gather per value ran at about 2 ns on
    // the 7x7/2 stem (its weight gradient's bf16 column matrix took 35 of 44 ms at 128 px,
    // batch 32). Instead each input row is split once into its `sw` phases, and every tap
    // `j` then copies a contiguous run of one phase.
    let phase_len = g.w.div_ceil(sw);
    let mut phases = if sw > 1 {
        vec![E::ZERO; sw * phase_len]
    } else {
        Vec::new()
    };
    for c in 0..g.cin {
        let plane = &x[c * plane_len..(c + 1) * plane_len];
        for i in 0..g.kh {
            if sw > 1 {
                let row0 = (c * g.kh + i) * g.kw;
                for oy in oy0..oy1 {
                    let at = (oy - oy0) * wo;
                    let iy = (oy * sh + i) as isize - ph as isize;
                    if iy < 0 || iy >= g.h as isize {
                        for j in 0..g.kw {
                            col[(row0 + j) * ld + at..][..wo].fill(T::ZERO);
                        }
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    split_phases(src, sw, phase_len, &mut phases);
                    for j in 0..g.kw {
                        let d = &mut col[(row0 + j) * ld + at..][..wo];
                        let (lo, hi) = valid_range(g.w, wo, sw, j, pw);
                        d[..lo].fill(T::ZERO);
                        d[hi..].fill(T::ZERO);
                        if lo < hi {
                            // Input column `ox · sw + j - pw` is phase `q`'s value `ox + b`.
                            let e = j as isize - pw as isize;
                            let (q, b) = (e.rem_euclid(sw as isize), e.div_euclid(sw as isize));
                            let start = q as usize * phase_len + (lo as isize + b) as usize;
                            T::copy_run(&mut d[lo..hi], &phases[start..][..hi - lo]);
                        }
                    }
                }
                continue;
            }
            for j in 0..g.kw {
                let r = (c * g.kh + i) * g.kw + j;
                let dst = &mut col[r * ld..r * ld + n];
                let (lo, hi) = valid_range(g.w, wo, sw, j, pw);
                for oy in oy0..oy1 {
                    let d = &mut dst[(oy - oy0) * wo..(oy - oy0 + 1) * wo];
                    let iy = (oy * sh + i) as isize - ph as isize;
                    if iy < 0 || iy >= g.h as isize {
                        d.fill(T::ZERO);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    d[..lo].fill(T::ZERO);
                    d[hi..].fill(T::ZERO);
                    T::copy_run(&mut d[lo..hi], &src[lo + j - pw..hi + j - pw]);
                }
            }
        }
    }
}

/// `out[q · len + t] = src[t · stride + q]`: the `stride` phases of an input row, each `len`
/// long (the last values of the shorter phases are left as they were).
#[inline(always)]
fn split_phases<E: Copy>(src: &[E], stride: usize, len: usize, out: &mut [E]) {
    if stride == 2 {
        // Constant stride: the compiler turns this into shuffles.
        let (even, odd) = out[..2 * len].split_at_mut(len);
        for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(src.chunks_exact(2)) {
            *e = pair[0];
            *o = pair[1];
        }
        if src.len() % 2 == 1 {
            even[len - 1] = src[src.len() - 1];
        }
        return;
    }
    for (t, &v) in src.iter().enumerate() {
        out[(t % stride) * len + t / stride] = v;
    }
}

dispatched! {
    /// [`im2col_into`] in f32.
    fn im2col<E: Act>(x: &[E], g: &ConvGeom, oy0: usize, oy1: usize, col: &mut [f32], ld: usize) {
        im2col_into(x, g, oy0, oy1, col, ld)
    }
}

dispatched! {
    /// [`im2col_into`] in bf16 bits, rows `ld` apart: the packed left operand of the bf16
    /// weight gradient ([`super::bf16::PackedLhs::from_rows`]).
    fn im2col_bf16<E: Act>(x: &[E], g: &ConvGeom, oy0: usize, oy1: usize, col: &mut [u16], ld: usize) {
        im2col_into(x, g, oy0, oy1, col, ld)
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
        if runs_fit(g) {
            // Each tap's run added whole, into the image at stride 1 or into a phase plane
            // that is then interleaved into the image: a strided scatter-add per value took a
            // third of resnet18's strided 3x3 input gradients at 128 px.
            let runs = Runs::new(g, oy0, oy1);
            let mut buf = runs.buffer(g, 0.0f32);
            for c in 0..g.cin {
                let image = &mut dx[c * plane_len..(c + 1) * plane_len];
                for &[_, at, _, n] in &runs.rows {
                    buf[at..at + n].fill(0.0);
                }
                for (t, (s, q)) in runs.taps.iter().enumerate() {
                    let r = c * g.kh * g.kw + t;
                    let run = &mut dcol[r * ld + (s.a - oy0) * wo..r * ld + (s.b - oy0) * wo];
                    s.zero_wrapped(run, wo);
                    let plane = if buf.is_empty() {
                        &mut image[..]
                    } else {
                        &mut buf[q * runs.plane..][..runs.plane]
                    };
                    let (k_lo, k_hi, p0) = s.clip(wo, plane.len());
                    add_row_inline(&mut plane[p0..p0 + (k_hi - k_lo)], &run[k_lo..k_hi]);
                }
                for &[y, at, qb, n] in &runs.rows {
                    let dst = &mut image[y * g.w + qb..];
                    for (c, &v) in buf[at..at + n].iter().enumerate() {
                        dst[c * sw] += v;
                    }
                }
            }
            return;
        }
        for c in 0..g.cin {
            let plane = &mut dx[c * plane_len..(c + 1) * plane_len];
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let r = (c * g.kh + i) * g.kw + j;
                    let src = &mut dcol[r * ld..r * ld + n];
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

/// [`conv2d_forward`] by im2col + GEMM, whatever the geometry.
pub fn im2col_forward<E: Act>(x: &[E], w: &[f32], bias: Option<&[f32]>, g: &ConvGeom) -> Vec<f32> {
    im2col_forward_act(x, w, bias, g, false)
}

/// [`im2col_forward`], then `max(·, 0)` on each image's output when `relu`.
pub(super) fn im2col_forward_act<E: Act>(
    x: &[E],
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
    // At least one group per thread, and as many per thread ([`ConvGeom::images_per_gemm_on`]):
    // resnet18's 512 -> 512 layers at 4 px (128 px input, batch 32) made one group of all 32
    // images, which one thread computed while the other waited (forward 25.6 -> 10.1 ms, and 15.6 -> 6.0 ms for the stride-2 256 -> 512 layer,
    // fastest of three alternated runs, 2 threads, bf16 on AMX, Xeon Sapphire Rapids,
    // `cargo run --release --example conv_layers 2 bf16 resnet18 128 32`).
    let group = g.images_per_gemm_on(rayon::current_num_threads());
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
    if let Some(rows) = few_bands(g, rayon::current_num_threads()) {
        return forward_few(x, &lhs, bias, g, relu, rows);
    }
    // One image's products into `yn` (`col` its scratch), then one channel's bias and ReLU.
    let products = |col: &mut Vec<f32>, yn: &mut [f32], xn: &[E]| {
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
    };
    let epilogue = |row: &mut [f32], o: usize| {
        if let Some(b) = bias {
            row.iter_mut().for_each(|v| *v += b[o]);
        }
        if relu {
            super::simd::relu_row(row);
        }
    };
    if threads > 1 && g.out_len() >= SPREAD_VALUES {
        // Fewer images than workers: the GEMMs run on all of them, and so do the zeros, the
        // bias and the ReLU, which the per-image chunks below leave to one (a resnet50 1x1
        // layer's 3.2 MB output at 56 px zeroed on one thread while the other waited, 1.8% of
        // `convlab bench infer --batch 1`'s samples).
        let mut y = par_zeroed(
            g.batch * g.out_len(),
            p,
            (0..g.batch * cout).into_par_iter(),
            |_, _| {},
        );
        let mut col = Vec::new();
        for (xn, yn) in x
            .chunks(g.in_len().max(1))
            .zip(y.chunks_mut(g.out_len().max(1)))
        {
            products(&mut col, yn, xn);
        }
        if bias.is_some() || relu {
            y.par_chunks_mut(p.max(1))
                .enumerate()
                .for_each(|(i, row)| epilogue(row, i % cout));
        }
        return y;
    }
    par_zeroed_with(
        g.batch * g.out_len(),
        g.out_len(),
        x.par_chunks(g.in_len().max(1)),
        Vec::new,
        |col, yn, xn| {
            products(col, yn, xn);
            for (o, row) in yn.chunks_mut(p.max(1)).enumerate() {
                epilogue(row, o);
            }
        },
    )
}

/// Output values of an image from which the per-image path, with fewer images than workers,
/// spreads its zeros, bias and ReLU over the workers: below it (resnet18's 1x1/2 projection to
/// 512 channels at 7 px, 25,088 values) the two extra parallel loops cost more than they save
/// (0.1 -> 0.2 ms, `bench/conv_layers_ab.sh OLD NEW 5 "->" fp32 resnet18 224 1`).
#[cfg(not(test))]
const SPREAD_VALUES: usize = 1 << 16;
/// Small in tests, so that they cover both sides.
#[cfg(test)]
const SPREAD_VALUES: usize = 64;

/// Output rows per band for [`forward_few`] on `threads` workers: when there are fewer images
/// than workers and an image's columns outweigh its layer's weights (at least
/// [`FEW_POSITIONS_PER_OUTPUT`] positions per output channel), bands enough for two per worker;
/// `None` where the per-image path is the one to take.
fn few_bands(g: &ConvGeom, threads: usize) -> Option<usize> {
    let wide = g.p() >= FEW_POSITIONS_PER_OUTPUT * g.cout;
    (g.batch < threads && !g.is_pointwise() && wide).then(|| {
        let bands = (2 * threads).div_ceil(g.batch);
        g.tile_rows().min(g.ho().div_ceil(bands)).max(1)
    })
}

/// Output positions per output channel from which [`forward_few`] splits an image into bands:
/// each band's GEMM packs the layer's weights again, so layers with small maps and many
/// channels (resnet18's 7-28 px layers) keep one GEMM on all threads.
const FEW_POSITIONS_PER_OUTPUT: usize = 4;

/// [`im2col_forward_act`] of fewer images than threads (one photo classified): each band of
/// output rows on a worker of its own, its columns (in the worker's kept scratch), its GEMM on
/// one thread, into a buffer of its own; then each output channel's plane gathered from the
/// bands, with the bias and ReLU. The per-image path built an image's columns on one thread
/// while the others waited, and added the bias and ReLU on one thread (resnet18's 7x7/2 stem
/// at 224 px, batch 1, 2 threads: forward 1.8 -> 1.6 ms, fastest of five alternated rounds,
/// `bench/conv_layers_ab.sh OLD NEW 5 "->" fp32 resnet18 224 1`, Xeon family 6 model 207).
fn forward_few<E: Act>(
    x: &[E],
    lhs: &Lhs<'_>,
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
    rows: usize,
) -> Vec<f32> {
    let (k, p, wo, ho, cout) = (g.k(), g.p(), g.wo(), g.ho(), g.cout);
    let (in_len, out_len) = (g.in_len(), g.out_len());
    let bands: Vec<(usize, usize, usize)> = (0..g.batch)
        .flat_map(|i| {
            (0..ho)
                .step_by(rows)
                .map(move |oy0| (i, oy0, (oy0 + rows).min(ho)))
        })
        .collect();
    // `prod: [C_out, band's positions]` of each band.
    let prods: Vec<Vec<f32>> = bands
        .par_iter()
        .map(|&(i, oy0, oy1)| {
            let n = (oy1 - oy0) * wo;
            // The worker's columns kept between calls: im2col writes every value.
            with_scratch(k * n, |col| {
                im2col(&x[i * in_len..][..in_len], g, oy0, oy1, col, n);
                lhs.mul_new(n, col, n, 1, 1)
            })
        })
        .collect();
    par_zeroed(
        g.batch * out_len,
        p,
        (0..g.batch * cout).into_par_iter(),
        |plane, io| {
            let (i, o) = (io / cout, io % cout);
            let b = bias.map_or(0.0, |b| b[o]);
            for (&(_, oy0, oy1), prod) in bands.iter().zip(&prods).filter(|(band, _)| band.0 == i) {
                let n = (oy1 - oy0) * wo;
                let src = &prod[o * n..][..n];
                let dst = &mut plane[oy0 * wo..oy1 * wo];
                dst.iter_mut().zip(src).for_each(|(d, &s)| *d = s + b);
            }
            if relu {
                super::simd::relu_row(plane);
            }
        },
    )
}

/// [`conv2d_backward`] by im2col + GEMM, whatever the geometry: the input gradient from
/// [`input_grad`], the weight and bias gradients from [`weight_grad`].
pub fn im2col_backward<E: Act>(
    x: &[E],
    w: &[f32],
    dy: &[E],
    g: &ConvGeom,
    need: [bool; 3],
) -> ConvGrads {
    assert_eq!(x.len(), g.batch * g.in_len(), "conv2d input length");
    assert_eq!(
        dy.len(),
        g.batch * g.out_len(),
        "conv2d output-gradient length"
    );
    let [need_dx, need_dw, need_db] = need;
    let dx = need_dx.then(|| {
        let as_forward = g.precision == super::Precision::Bf16 || g.cin >= 512;
        if as_forward
            && g.stride == [1, 1]
            && !g.is_pointwise()
            && g.pad[0] < g.kh
            && g.pad[1] < g.kw
        {
            // A stride-1 input gradient is the forward convolution of `dY` with the rotated
            // kernel: im2col copies into a `[C_out·kh·kw, P]` column matrix and the GEMM's
            // output is `dX` itself, where `Wᵀ · dY` wrote a `[K, P]` column gradient (4.7 MB
            // per thread for resnet18's 512 -> 512 layers at 4 px) that col2im then added up
            // tap by tap. Measured on Zen 4 (`CONV_LAYERS_ONLY=3x3/1 cargo run --release
            // --example conv_layers 2 fp32|bf16 MODEL SIZE BATCH`, two alternated pairs): in
            // bf16 dx fell 15.0/22.2 -> 12.5/13.1 ms (resnet18 512 -> 512 at 4 px, batch 32),
            // 21.0/19.0 -> 17.5/17.4 (resnet50 512 -> 512 at 7 px, batch 16), 2.2/1.8 ->
            // 2.1/1.6 (resnet18_small 128 -> 128 at 4 px, batch 64); in fp32 17.0/20.7 ->
            // 13.9/17.1, 26.7/23.2 -> 26.6/25.2 and 1.9/2.3 -> 2.4/2.5: fp32 keeps col2im
            // below 512 channels.
            return im2col_forward(dy, &super::conv::rotated(w, g), None, &g.input_grad());
        }
        input_grad(w, dy, g)
    });
    let (dw, db) = if need_dw || need_db {
        weight_grad(x, dy, g, need_dw, need_db)
    } else {
        (None, None)
    };
    (dx, dw, db)
}

/// `dX`: per image (or group of small images), `dcol[K, P] = Wᵀ[K, C_out] · dY[C_out, P]`,
/// then col2im; one contiguous block of images per thread.
fn input_grad<E: Act>(w: &[f32], dy: &[E], g: &ConvGeom) -> Vec<f32> {
    let (k, p, cout, in_len, out_len) = (g.k(), g.p(), g.cout, g.in_len(), g.out_len());
    let threads = gemm_threads(g.batch);
    let rows = g.tile_rows();
    let group = g.images_per_gemm();
    let blocks = image_blocks(g.batch);
    // `Wᵀ [K, C_out]`, the left operand.
    let wt = Lhs::new(g.precision, k, cout, w, 1, k);
    let lens: Vec<usize> = blocks.iter().map(|r| r.len() * in_len).collect();
    par_zeroed_parts(&lens, |b, d| {
        let range = blocks[b].clone();
        let (mut dcol, mut dyg) = (Vec::new(), Vec::new());
        if group > 1 {
            // `group` images at a time: `dY` gathered to `[C_out, images · P]`, and `dcol`
            // `[K, images · P]`, image `i` in columns `i·P..`.
            for first in range.clone().step_by(group) {
                let images = group.min(range.end - first);
                let n = images * p;
                dyg.resize(cout * n, E::ZERO);
                gather(dy, g, first, images, 0, cout, &mut dyg);
                dcol.resize(k * n, 0.0);
                wt.mul(n, &mut dcol, n, false, &dyg, n, 1, threads);
                let at = first - range.start;
                for (i, dxn) in d[at * in_len..][..images * in_len]
                    .chunks_mut(in_len)
                    .enumerate()
                {
                    col2im(&mut dcol[i * p..], g, 0, g.ho(), n, dxn);
                }
            }
            return;
        }
        for (n, dxn) in range.zip(d.chunks_mut(in_len)) {
            let dyn_ = &dy[n * out_len..(n + 1) * out_len];
            if g.is_pointwise() {
                wt.mul(p, dxn, p, false, dyn_, p, 1, threads);
                continue;
            }
            for oy0 in (0..g.ho()).step_by(rows) {
                let oy1 = (oy0 + rows).min(g.ho());
                let nn = (oy1 - oy0) * g.wo();
                dcol.resize(k * nn, 0.0);
                wt.mul(
                    nn,
                    &mut dcol,
                    nn,
                    false,
                    &dyn_[oy0 * g.wo()..],
                    p,
                    1,
                    threads,
                );
                col2im(&mut dcol, g, oy0, oy1, nn, dxn);
            }
        }
    })
}

/// Rows `o0..o0 + os` of `dY` for images `first..first + images`, gathered side by side into
/// `dyg` (`[os, images · P]`, image `i` in columns `i·P..`).
fn gather<E: Copy>(
    dy: &[E],
    g: &ConvGeom,
    first: usize,
    images: usize,
    o0: usize,
    os: usize,
    dyg: &mut [E],
) {
    let (p, out_len) = (g.p(), g.out_len());
    let n = images * p;
    for i in 0..images {
        let dyi = &dy[(first + i) * out_len + o0 * p..][..os * p];
        for (o, row) in dyi.chunks(p).enumerate() {
            dyg[o * n + i * p..][..p].copy_from_slice(row);
        }
    }
}

/// `dW[C_out, K] = Σ_images dY[C_out, P] · col(X)[K, P]ᵀ` and `db[C_out] = Σ dY`, split over
/// the threads by rows of the gradient rather than by images: when `K >= C_out` the gradient
/// is accumulated transposed, `dWᵀ[K, C_out]`, and each thread takes a block of input channels
/// (its rows of `dWᵀ`, from its channels' rows of the column matrix); otherwise each takes a
/// block of output channels (its rows of `dW`, against the whole column matrix). No thread
/// holds a whole partial gradient and nothing is summed afterwards: split by images, two
/// threads each zeroed, filled and then added a 9.4 MB partial for resnet18's 512-channel
/// layers (that sum was 6% of a bf16 training step at 128 px on the AMX Xeon). Every element
/// adds its images in order, so the bits do not depend on the thread count.
///
/// The transposed layout: for the 64 -> 64 channel 32 px layer it took the weight gradient
/// from 85.7 to 32.0 ms per batch of 64, while the first layer (K = 27) is faster as
/// `[C_out, K]` (`cargo run --release --example conv_layers`, before and after).
fn weight_grad<E: Act>(
    x: &[E],
    dy: &[E],
    g: &ConvGeom,
    need_dw: bool,
    need_db: bool,
) -> (Option<Vec<f32>>, Option<Vec<f32>>) {
    let (k, p, cout, in_len, out_len) = (g.k(), g.p(), g.cout, g.in_len(), g.out_len());
    let db = need_db.then(|| {
        (0..cout)
            .into_par_iter()
            .map(|o| {
                (0..g.batch)
                    .map(|i| super::simd::row_sum(&dy[i * out_len + o * p..][..p]))
                    .fold(0.0, |acc, s| acc + s)
            })
            .collect()
    });
    if !need_dw {
        return (None, db);
    }
    let (ho, wo, taps) = (g.ho(), g.wo(), g.kh * g.kw);
    let transposed = k >= cout;
    let split = if transposed { g.cin } else { cout };
    let parts = rayon::current_num_threads().clamp(1, split.max(1));
    let range = |t: usize| t * split / parts..(t + 1) * split / parts;
    let row_len = if transposed { taps * cout } else { k };
    let lens: Vec<usize> = (0..parts).map(|t| range(t).len() * row_len).collect();
    let group = if g.is_pointwise() {
        1
    } else {
        g.images_per_gemm()
    };
    let (rows, bf16) = (g.tile_rows(), g.precision == super::Precision::Bf16);
    let dw = par_zeroed_parts(&lens, |t, dw| {
        let r = range(t);
        // This part's geometry (its input channels, or all of them), its first input channel,
        // and the rows of `dY` it multiplies (all output channels, or its own).
        let (gs, c0, o0, os) = if transposed {
            let gs = ConvGeom { cin: r.len(), ..*g };
            (gs, r.start, 0, cout)
        } else {
            (*g, 0, r.start, r.len())
        };
        let ks = gs.k();
        let image = |i: usize| &x[i * in_len + c0 * g.h * g.w..][..gs.in_len()];
        let mut col = Vec::new();
        // `dw (+)= dY_tile · colᵀ` over `n` positions, `dY_tile` `os` rows `ld` apart; `fill`
        // (f32) or `fill16` (bf16 bits, straight into the packed operand) writes the column
        // matrix, rows `ld` apart.
        let mut product = |dw: &mut [f32],
                           dy_t: &[E],
                           ld: usize,
                           n: usize,
                           fill: &dyn Fn(&mut [f32], usize),
                           fill16: &dyn Fn(&mut [u16], usize)| {
            if transposed
                && bf16
                && let Some(a) = super::bf16::PackedLhs::from_rows(ks, n, fill16)
            {
                super::bf16::gemm_packed(&a, cout, dw, cout, true, dy_t, 1, ld, 1);
                a.recycle();
                return;
            }
            col.resize(ks * n, 0.0);
            fill(&mut col, n);
            if transposed {
                gemm(
                    g.precision,
                    ks,
                    cout,
                    n,
                    dw,
                    cout,
                    true,
                    &col,
                    n,
                    1,
                    dy_t,
                    1,
                    ld,
                    1,
                );
            } else {
                gemm(
                    g.precision,
                    os,
                    k,
                    n,
                    dw,
                    k,
                    true,
                    dy_t,
                    ld,
                    1,
                    &col,
                    1,
                    n,
                    1,
                );
            }
        };
        if group > 1 {
            let mut dyg = Vec::new();
            for first in (0..g.batch).step_by(group) {
                let images = group.min(g.batch - first);
                let n = images * p;
                dyg.resize(os * n, E::ZERO);
                gather(dy, g, first, images, o0, os, &mut dyg);
                let fill = |c: &mut [f32], ld: usize| {
                    for i in 0..images {
                        im2col(image(first + i), &gs, 0, ho, &mut c[i * p..], ld);
                    }
                };
                let fill16 = |h: &mut [u16], ld: usize| {
                    for i in 0..images {
                        im2col_bf16(image(first + i), &gs, 0, ho, &mut h[i * p..], ld);
                    }
                };
                product(dw, &dyg, n, n, &fill, &fill16);
            }
            return;
        }
        for i in 0..g.batch {
            let dyi = &dy[i * out_len + o0 * p..][..os * p];
            if g.is_pointwise() {
                // The image is its own column matrix.
                let xi = image(i);
                if transposed {
                    gemm(
                        g.precision,
                        ks,
                        cout,
                        p,
                        dw,
                        cout,
                        true,
                        xi,
                        p,
                        1,
                        dyi,
                        1,
                        p,
                        1,
                    );
                } else {
                    gemm(g.precision, os, k, p, dw, k, true, dyi, p, 1, xi, 1, p, 1);
                }
                continue;
            }
            for oy0 in (0..ho).step_by(rows) {
                let oy1 = (oy0 + rows).min(ho);
                let n = (oy1 - oy0) * wo;
                let fill = |c: &mut [f32], ld: usize| im2col(image(i), &gs, oy0, oy1, c, ld);
                let fill16 = |h: &mut [u16], ld: usize| im2col_bf16(image(i), &gs, oy0, oy1, h, ld);
                product(dw, &dyi[oy0 * wo..], p, n, &fill, &fill16);
            }
        }
    });
    let dw = if transposed {
        sum_transposed_in_order(&[&dw], k, cout, None)
    } else {
        dw
    };
    (Some(dw), db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::test_data;

    /// Images each worker computes when `batch` images go in groups of `group`, the groups
    /// handed out in contiguous runs, as many to each worker as can be: the busiest's.
    fn busiest(batch: usize, group: usize, threads: usize) -> usize {
        let sizes: Vec<usize> = (0..batch)
            .step_by(group)
            .map(|s| group.min(batch - s))
            .collect();
        let per = sizes.len().div_ceil(threads);
        sizes
            .chunks(per.max(1))
            .map(|c| c.iter().sum())
            .max()
            .unwrap_or(0)
    }

    /// Fewer images than workers (a photo classified): the band-parallel path
    /// ([`forward_few`]) and the per-image path with its zeros, bias and ReLU on all workers
    /// give what one worker gives, image by image, with and without bias and ReLU: an RGB
    /// stem (7x7/2), a strided 3x3, a 1x1, a layer too narrow for bands, and an output too
    /// small to spread ([`SPREAD_VALUES`]); in f32 and, where the CPU has the instructions, in
    /// bf16 products.
    #[test]
    fn few_images_on_many_threads_are_one_threads_values() {
        use crate::kernels::conv::on_threads;
        let geom = |batch, cin, hw, cout, k, stride, pad| ConvGeom {
            batch,
            cin,
            h: hw,
            w: hw,
            cout,
            kh: k,
            kw: k,
            stride: [stride; 2],
            pad: [pad; 2],
            precision: crate::kernels::Precision::Fp32,
        };
        let cases = [
            (geom(1, 3, 30, 4, 7, 2, 3), true),
            (geom(3, 3, 23, 5, 7, 2, 3), true),
            (geom(1, 6, 17, 8, 3, 2, 1), true),
            (geom(1, 8, 9, 6, 1, 1, 0), false),
            (geom(1, 4, 4, 3, 1, 1, 0), false),
            (geom(1, 16, 6, 24, 3, 1, 1), false),
        ];
        let mut precisions = vec![crate::kernels::Precision::Fp32];
        if crate::kernels::bf16::available() {
            precisions.push(crate::kernels::Precision::Bf16);
        }
        let cases = precisions
            .iter()
            .flat_map(|&precision| cases.map(|(g, banded)| (ConvGeom { precision, ..g }, banded)));
        for (g, banded) in cases {
            assert_eq!(few_bands(&g, 4).is_some(), banded, "{g:?}");
            let x = test_data(g.batch * g.in_len(), 3);
            let w = test_data(g.cout * g.k(), 4);
            let b = test_data(g.cout, 5);
            for (bias, relu) in [(None, false), (Some(&b[..]), true)] {
                let run = |t| on_threads(t, || im2col_forward_act(&x, &w, bias, &g, relu));
                let (one, many) = (run(1), run(4));
                assert_eq!(one.len(), many.len());
                for (i, (a, b)) in one.iter().zip(&many).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + a.abs()),
                        "{g:?} at {i}: {a} vs {b}"
                    );
                }
                if relu {
                    assert!(many.iter().all(|&v| v >= 0.0));
                    assert!(many.iter().any(|&v| v > 0.0));
                }
            }
        }
    }

    /// Even groups never leave a worker more images than groups of the largest size (the rule
    /// before them) and never exceed that size; resnet18's 7 px layers (batch 32, 10 images a
    /// group) go from 20 images on one worker to 16 on each.
    #[test]
    fn groups_are_even_over_the_workers() {
        assert_eq!(even_groups(32, 10, 2), 8);
        assert_eq!(busiest(32, 10.min(32usize.div_ceil(2)), 2), 20);
        assert_eq!(busiest(32, 8, 2), 16);
        assert_eq!(even_groups(32, 32, 2), 16);
        assert_eq!(even_groups(16, 10, 2), 8);
        assert_eq!(even_groups(1, 10, 2), 1);
        for threads in 1..=4 {
            for most in 1..=20 {
                for batch in 1..=64 {
                    let g = even_groups(batch, most, threads);
                    assert!((1..=most).contains(&g), "{batch} {most} {threads}: {g}");
                    let before = most.min(batch.div_ceil(threads));
                    assert!(
                        busiest(batch, g, threads) <= busiest(batch, before, threads),
                        "{batch} images, at most {most}, {threads} threads: {g} vs {before}"
                    );
                }
            }
        }
    }

    /// `(H, W, k, stride, padding, whether every tap is one run)`: strides 1-3, padding larger
    /// than the stride, odd and even widths; the last three take the row-by-row path.
    const GEOMETRIES: [(usize, usize, usize, usize, usize, bool); 11] = [
        (7, 7, 3, 2, 1, true),
        (9, 8, 7, 2, 3, true),
        (10, 11, 7, 2, 3, true),
        (8, 9, 1, 2, 0, true),
        (11, 10, 5, 3, 2, true),
        (12, 13, 3, 3, 4, true),
        (6, 6, 3, 1, 1, true),
        (7, 6, 3, 2, 2, true),
        (8, 8, 3, 2, 0, false),
        (6, 7, 3, 1, 0, false),
        (9, 9, 5, 2, 0, false),
    ];

    fn geometry(
        &(h, w, k, stride, pad, _): &(usize, usize, usize, usize, usize, bool),
    ) -> ConvGeom {
        ConvGeom {
            batch: 1,
            cin: 2,
            h,
            w,
            cout: 1,
            kh: k,
            kw: k,
            stride: [stride; 2],
            pad: [pad; 2],
            precision: crate::kernels::Precision::Fp32,
        }
    }

    /// Bands of output rows: the whole map, the rows from the second, the first half.
    fn bands(g: &ConvGeom) -> Vec<(usize, usize)> {
        let ho = g.ho();
        vec![(0, ho), (1.min(ho - 1), ho), (0, ho.div_ceil(2))]
    }

    /// Every entry of the band's column matrix (rows `ld` apart) with the input value it is
    /// the copy of, if inside the image: `col[(c, i, j), (oy, ox)] = x[c, oy·s + i - p, ox·s +
    /// j - p]`.
    fn entries(g: &ConvGeom, oy0: usize, oy1: usize, ld: usize) -> Vec<(usize, Option<usize>)> {
        let (k, wo) = (g.kh, g.wo());
        let mut out = Vec::new();
        for c in 0..g.cin {
            for i in 0..k {
                for j in 0..k {
                    let r = (c * k + i) * k + j;
                    for oy in oy0..oy1 {
                        for ox in 0..wo {
                            let iy = (oy * g.stride[0] + i) as isize - g.pad[0] as isize;
                            let ix = (ox * g.stride[1] + j) as isize - g.pad[1] as isize;
                            let inside =
                                (0..g.h as isize).contains(&iy) && (0..g.w as isize).contains(&ix);
                            let at = (c * g.h + iy as usize) * g.w + ix as usize;
                            out.push((r * ld + (oy - oy0) * wo + ox, inside.then_some(at)));
                        }
                    }
                }
            }
        }
        out
    }

    /// The geometries take the paths the table says: ResNet's strided 3x3, 1x1 and 7x7
    /// layers as runs of phase planes, a "valid" 3x3 (stride 1 or 2) row by row.
    #[test]
    fn strided_resnet_layers_are_runs_of_phase_planes() {
        for case in &GEOMETRIES {
            assert_eq!(runs_fit(&geometry(case)), case.5, "{case:?}");
        }
        for (hw, k, pad) in [(32, 3, 1), (7, 3, 1), (56, 1, 0), (224, 7, 3), (15, 7, 3)] {
            let g = geometry(&(hw, hw, k, 2, pad, true));
            assert!(runs_fit(&g), "{g:?}");
        }
    }

    /// The column matrix is the definition, `col[(c, i, j), (oy, ox)] = x[c, oy·s + i - p,
    /// ox·s + j - p]` (zero outside the plane), for every geometry and band, whichever path.
    #[test]
    fn the_column_matrix_is_the_definition() {
        for case in &GEOMETRIES {
            let g = geometry(case);
            let x = test_data(g.in_len(), 3);
            for (oy0, oy1) in bands(&g) {
                let ld = (oy1 - oy0) * g.wo() + 2;
                let mut col = vec![f32::NAN; g.k() * ld];
                im2col(&x, &g, oy0, oy1, &mut col, ld);
                for (at, src) in entries(&g, oy0, oy1, ld) {
                    let want = src.map_or(0.0, |s| x[s]);
                    assert_eq!(col[at], want, "{g:?} band {oy0}..{oy1}, entry {at}");
                }
            }
        }
    }

    /// col2im adds each column gradient into the input position its entry was copied from
    /// (entries for padding positions dropped), for every geometry and band, whichever path.
    /// Small integers, so every order of the sums gives the same bits.
    #[test]
    fn col2im_adds_into_the_definition() {
        for case in &GEOMETRIES {
            let g = geometry(case);
            for (oy0, oy1) in bands(&g) {
                let ld = (oy1 - oy0) * g.wo() + 1;
                let dcol: Vec<f32> = (0..g.k() * ld).map(|v| (v % 7) as f32 - 3.0).collect();
                let dx0: Vec<f32> = (0..g.in_len()).map(|v| (v % 5) as f32).collect();
                let mut want = dx0.clone();
                for (at, dst) in entries(&g, oy0, oy1, ld) {
                    if let Some(d) = dst {
                        want[d] += dcol[at];
                    }
                }
                let mut dx = dx0.clone();
                col2im(&mut dcol.clone(), &g, oy0, oy1, ld, &mut dx);
                assert_eq!(dx, want, "{g:?} band {oy0}..{oy1}");
            }
        }
    }

    /// The bf16 column matrix is the f32 one rounded, value for value, for the paths im2col
    /// takes: shifted runs (stride 1, "same"), padded rows, stride 2, and 1 x k kernels.
    #[test]
    fn the_bf16_column_matrix_is_the_f32_one_rounded() {
        for &(h, w, kh, kw, stride, pad) in &[
            (5, 6, 3, 3, 1, 1),
            (7, 7, 3, 3, 2, 1),
            (6, 5, 1, 3, 1, 0),
            (9, 8, 7, 7, 2, 3),
            (4, 4, 5, 5, 1, 2),
        ] {
            let g = ConvGeom {
                batch: 1,
                cin: 2,
                h,
                w,
                cout: 3,
                kh,
                kw,
                stride: [stride; 2],
                pad: [pad; 2],
                precision: crate::kernels::Precision::Bf16,
            };
            let x = test_data(g.in_len(), 7);
            let (k, n, ld) = (g.k(), g.p(), g.p() + 3);
            let mut col = vec![f32::NAN; k * ld];
            im2col(&x, &g, 0, g.ho(), &mut col, ld);
            let mut bits = vec![u16::MAX; k * ld];
            im2col_bf16(&x, &g, 0, g.ho(), &mut bits, ld);
            for r in 0..k {
                for j in 0..n {
                    let want = crate::kernels::bf16::round_bits(col[r * ld + j]) as u16;
                    assert_eq!(bits[r * ld + j], want, "{g:?} row {r} column {j}");
                }
            }
        }
    }

    /// The bf16 weight gradient with im2col writing the packed operand (tiles of one image,
    /// and images grouped side by side) is the product of the rounded operands.
    #[test]
    fn the_packed_bf16_weight_gradient_is_the_rounded_product() {
        if !crate::kernels::bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        use crate::kernels::bf16::round;
        // 4 px: one output row per tile; 2 px, 2 input channels: two images per GEMM.
        for &(cin, hw) in &[(4, 4), (2, 2)] {
            let g = ConvGeom {
                batch: 3,
                cin,
                h: hw,
                w: hw,
                cout: 2,
                kh: 3,
                kw: 3,
                stride: [1, 1],
                pad: [1, 1],
                precision: crate::kernels::Precision::Bf16,
            };
            let (k, p) = (g.k(), g.p());
            assert!(k >= g.cout, "the transposed (packed) layout");
            let x = test_data(g.batch * g.in_len(), 3);
            let w = test_data(g.cout * k, 5);
            let dy = test_data(g.batch * g.out_len(), 9);
            let (_, dw, _) = im2col_backward(&x, &w, &dy, &g, [false, true, false]);
            let dw = dw.unwrap();
            let mut col = vec![0.0; k * p];
            let mut want = vec![0.0f64; g.cout * k];
            for b in 0..g.batch {
                im2col(
                    &x[b * g.in_len()..][..g.in_len()],
                    &g,
                    0,
                    g.ho(),
                    &mut col,
                    p,
                );
                for o in 0..g.cout {
                    for r in 0..k {
                        for j in 0..p {
                            want[o * k + r] += round(dy[b * g.out_len() + o * p + j]) as f64
                                * round(col[r * p + j]) as f64;
                        }
                    }
                }
            }
            for (i, (&got, &want)) in dw.iter().zip(&want).enumerate() {
                assert!(
                    (got as f64 - want).abs() < 1e-4,
                    "cin={cin} hw={hw} dw[{i}]: {got} vs {want}"
                );
            }
        }
    }
}
