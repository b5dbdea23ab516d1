//! 3x3 stride-1 convolutions by Winograd's minimal filtering (Lavin & Gray, 2016, "Fast
//! Algorithms for Convolutional Neural Networks"). F(2x2, 3x3): each 2x2 block of outputs
//! comes from a 4x4 block of input with 16 multiplies per channel pair instead of 36, so the
//! GEMM work of a 3x3 layer drops 2.25x, at the price of cheap add-only transforms:
//!
//! ```text
//! Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A        Bᵀ = | 1  0 -1  0 |   G = | 1    0    0  |   Aᵀ = | 1 1  1  0 |
//!                                              | 0  1  1  0 |       | 1/2  1/2  1/2|        | 0 1 -1 -1 |
//!                                              | 0 -1  1  0 |       | 1/2 -1/2  1/2|
//!                                              | 0  1  0 -1 |       | 0    0    1  |
//! ```
//!
//! F(4x4, 3x3) ([`Tile::F4`]): 4x4 outputs from a 6x6 input block with 36 multiplies instead of
//! 144 (4x fewer), and 2.25 transformed values per output instead of 4 (Lavin & Gray's
//! matrices; [`b4`], [`a4`], [`Tile::filter`]).
//!
//! Summed over input channels, the elementwise product becomes one GEMM per position ξ of
//! the transformed tile (16 or 36): `M[ξ] (C_out x T) = U[ξ] (C_out x C_in) · V[ξ] (C_in x T)`
//! over the `T` tiles of a group of images. The input gradient of a stride-1 convolution is
//! itself a stride-1 convolution of the output gradient (kernel rotated 180°, channels
//! swapped, padding `2 - p`), so it runs through the same code; the weight gradient stays
//! im2col + GEMM or the direct kernels. Which variant a layer runs is the kernel plan's call.
//!
//! F(2x2, 3x3) keeps f32 accuracy (its transforms have entries 0, ±1/2, ±1: rounding errors are
//! of the order of the direct method's, Lavin & Gray table 4); F(4x4, 3x3)'s larger entries
//! cost more of it, which f32 can afford and bf16 cannot ([`Tile`]). The tests bound both
//! variants' difference from the definition at 1e-4 in f32. With `precision = "bf16"` the
//! GEMMs of F(2x2, 3x3) run on the bf16 kernel ([`super::bf16`]), the transforms in f32; the
//! tests keep that within bf16 rounding of f32.
//!
//! On a CPU with AVX-512 the tile transforms run sixteen tiles at a time where rows of tiles
//! are short ([`super::winograd_simd`], the same bits as the portable loops here).
//!
//! # Shapes
//! `x: [B, C_in, H, W]`, `w: [C_out, C_in, 3, 3]`, `y: [B, C_out, H + 2p - 2, W + 2p - 2]`.

use super::act::Act;
use super::buf::{par_lazy, par_zeroed, with_scratch};
use super::conv::ConvGeom;
use super::simd::{dispatched, relu_row};
use super::vector::Unit;
use rayon::prelude::*;

/// Tiles per group of images (the GEMMs' `N`): small enough that a group's transformed input
/// and output stay in the per-core L2 cache when both cores run. `conv_layers 2` totals for
/// bench-vgg's layers: 16: 258 ms, 32: 276, 64: 252, 128: 267, 256: 269, 512: 289 (noisy, ±5%).
#[cfg(not(test))]
const GROUP_TILES: usize = 64;
/// Bytes of transformed input and output per band of one image, for images whose own take
/// more ([`Bands`]).
#[cfg(not(test))]
const BAND_BYTES: usize = 8 << 20;
/// Small in tests, so that their images span groups, bands of several tile rows, bands of
/// one row, and a shorter last band.
#[cfg(test)]
const GROUP_TILES: usize = 8;
#[cfg(test)]
const BAND_BYTES: usize = 6 * 16 * 40 * 4;

/// Whether a convolution goes through Winograd: 3x3, stride 1, padding at most 2 (else the
/// output would need input tiles entirely outside the image), at least 32 channels in and
/// out and an output of at least 8x8. The transforms cost per channel and per tile what the
/// GEMMs save per channel pair, so narrow layers and tiny maps lose: with 16 channels allowed,
/// `resnet18_small` (widths 16-128) trained at 405-419 img/s against 535 with im2col; with
/// these limits at 559-564 (`convlab bench train --model resnet18_small --threads 2`).
///
/// Whether the kernel plan runs this layer's forward pass (and input gradient) on Winograd.
///
/// Layers of fewer than 64 input channels that the direct kernels take go to them instead in
/// bf16, and in f32 where their AVX-512 tiles run: on `VDPBF16PS` they beat Winograd's bf16
/// GEMMs plus f32 transforms (resnet18_small's 32 -> 32 16 px layers, one thread: forward
/// 1.6 -> 1.0 ms, backward 2.8 -> 2.2 ms; +7% bf16 training in four alternated pairs, Zen 5),
/// in f32 by less (1.9 -> 1.7 and 3.6 -> 3.4 ms, +1.7% training in five pairs; the AVX2 tiles
/// were not measured against Winograd there, so they keep it). At 64 channels Winograd still
/// wins (bench-vgg's 64 -> 128 16 px in bf16: 5.5 against 6.0 ms forward).
pub fn applies(g: &ConvGeom) -> bool {
    matches!(
        super::plan::plan(g, super::plan::Cpu::detect()).forward,
        super::plan::Algo::Winograd(_)
    )
}

/// The geometry F(2x2, 3x3) computes exactly and is worth it for: 3x3 stride 1, symmetric
/// padding up to 2, 32+ channels in and out, outputs of 8x8 or more, or of 6x6 or more with
/// 512+ channels in and out. Whether it runs is the kernel plan's call
/// ([`super::plan::plan`]), which gives some of these layers to the direct kernels as
/// measured above.
///
/// At 7 px a 512-channel layer's F(2x2) tiles cover 64 outputs for 49 (2.25 x 49/64 = 1.7x
/// fewer products), and its transforms cost per channel what the GEMMs save per channel
/// pair. Against im2col, fp32, 2 threads, AMD EPYC Zen 3 (AVX2), 2026-12-06, three
/// alternated runs (`bench/conv_layers_ab.sh OLD NEW 3 "7px 3x3/1" fp32 MODEL 224 BATCH`),
/// median ms forward / weight gradient / input gradient: resnet18 at batch 32 60.5 / 48.6 /
/// 61.5 -> 39.3 / 44.2 / 38.6, resnet50 at batch 16 23.3 / 36.5 / 30.9 -> 22.2 / 26.2 /
/// 22.8. At 4 px (resnet18 at 128 px) it tied or lost (forward 14.1-17.0 -> 15.8-22.5 ms).
pub fn fits(g: &ConvGeom) -> bool {
    g.kh == 3
        && g.kw == 3
        && g.stride == [1, 1]
        && g.pad[0] == g.pad[1]
        && g.pad[0] <= 2
        && g.cin >= 32
        && g.cout >= 32
        && ((g.ho() >= 8 && g.wo() >= 8)
            || (g.cin >= 512 && g.cout >= 512 && g.ho() >= 6 && g.wo() >= 6))
}

/// Which of Lavin & Gray's algorithms a layer runs: F(2x2, 3x3) (4x4 input tiles, 16
/// products per 2x2 outputs) or F(4x4, 3x3) (6x6 input tiles, 36 products per 4x4 outputs:
/// 4x fewer multiplies than the direct method instead of 2.25x, and 2.25 transformed values
/// per output instead of 4).
///
/// F(4x4, 3x3)'s transforms have entries up to 5 (`Bᵀ`) and 8 (`Aᵀ`), which scale the
/// operands' rounding errors: on bf16-rounded operands its output error was 1.55e-2 of the
/// output's mean magnitude against 3.6e-3 for F(2x2, 3x3) and 3.0e-3 for the direct method
/// (one output block of a 64-channel layer, random normal data and 0.1-scaled weights,
/// `bench/winograd_bf16_error.py`).
/// So bf16 keeps F(2x2, 3x3), and f32, whose rounding is 2^16 times finer, runs F(4x4, 3x3)
/// where the kernel plan says so ([`super::plan`]: on maps of 16 px and more).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tile {
    F2,
    F4,
}

impl Tile {
    /// Outputs per tile side (`m`).
    fn m(self) -> usize {
        match self {
            Tile::F2 => 2,
            Tile::F4 => 4,
        }
    }
    /// Transformed values per tile: `(m + 2)²`, one GEMM each.
    pub fn xis(self) -> usize {
        (self.m() + 2) * (self.m() + 2)
    }
    /// `G · (a, b, c)`: one column of a 3x3 kernel through the filter transform.
    fn filter(self, [a, b, c]: [f32; 3]) -> [f32; 6] {
        match self {
            Tile::F2 => [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c, 0.0, 0.0],
            Tile::F4 => [
                a / 4.0,
                -(a + b + c) / 6.0,
                -(a - b + c) / 6.0,
                a / 24.0 + b / 12.0 + c / 6.0,
                a / 24.0 - b / 12.0 + c / 6.0,
                c,
            ],
        }
    }
}

/// `U[ξ][o][c] = (G g_oc Gᵀ)[ξ]` for `w: [C_out, C_in, 3, 3]`; with `for_input_grad`, of the
/// rotated, channel-swapped kernel (`U[ξ][c][o]` from `g_oc` turned 180°). `ξ` runs over the
/// `tile.xis()` transformed positions, row by row.
pub fn transform_weights(
    w: &[f32],
    cout: usize,
    cin: usize,
    for_input_grad: bool,
    tile: Tile,
) -> Vec<f32> {
    let (rows, cols) = if for_input_grad {
        (cin, cout)
    } else {
        (cout, cin)
    };
    let xis = tile.xis();
    // Row by row of `U` (`o` forward, `c` for the input gradient): the row's kernels gathered
    // tap by tap (`taps[t][s]`, turned 180° for the input gradient), transformed as runs over
    // `s` ([`transform_row`]), then each ξ plane gathers its rows as contiguous runs. Kernels
    // transformed one by one into `[kernel][ξ]` and regrouped plane by plane read that whole
    // array once per ξ, a cache line per value at F(4x4, 3x3)'s 36 (9.4 MB for 256 -> 256,
    // twice per step), and ran scalar.
    let mut by_row = vec![0.0f32; rows * xis * cols];
    by_row
        .par_chunks_mut(xis * cols)
        .enumerate()
        .for_each_init(Vec::new, |scratch, (r, out)| {
            scratch.resize(27 * cols, 0.0);
            let (taps, gk) = scratch.split_at_mut(9 * cols);
            for s in 0..cols {
                let (o, c) = if for_input_grad { (s, r) } else { (r, s) };
                let k = &w[(o * cin + c) * 9..][..9];
                for (t, &v) in k.iter().enumerate() {
                    let t = if for_input_grad { 8 - t } else { t };
                    taps[t * cols + s] = v;
                }
            }
            transform_row(taps, gk, cols, tile == Tile::F4, out);
        });
    let mut u = vec![0.0f32; xis * rows * cols];
    u.par_chunks_mut(rows * cols)
        .enumerate()
        .for_each(|(xi, plane)| {
            for (r, dst) in plane.chunks_exact_mut(cols).enumerate() {
                dst.copy_from_slice(&by_row[(r * xis + xi) * cols..][..cols]);
            }
        });
    u
}

/// `G g Gᵀ` for the `cols` kernels of one row of `U`: `taps[t · cols + s]` is tap `t` (row
/// major) of kernel `s`, `out[ξ · cols + s]` its transformed value `ξ`; `gk` is scratch of
/// `18 · cols` floats.
fn transform_row(taps: &[f32], gk: &mut [f32], cols: usize, f4: bool, out: &mut [f32]) {
    #[inline(always)]
    fn rows<const F4: bool>(taps: &[f32], gk: &mut [f32], cols: usize, out: &mut [f32]) {
        let tile = if F4 { Tile::F4 } else { Tile::F2 };
        let side = tile.m() + 2;
        let tap = |t: usize| &taps[t * cols..][..cols];
        // `G g` row by row of the kernel (a, 0..3) -> gk[i][b], then `(G g) Gᵀ`.
        for b in 0..3 {
            let (k0, k1, k2) = (tap(b), tap(3 + b), tap(6 + b));
            for s in 0..cols {
                let col = tile.filter([k0[s], k1[s], k2[s]]);
                for (i, &v) in col[..side].iter().enumerate() {
                    gk[(i * 3 + b) * cols + s] = v;
                }
            }
        }
        for i in 0..side {
            let row = |b: usize| &gk[(i * 3 + b) * cols..][..cols];
            let (g0, g1, g2) = (row(0), row(1), row(2));
            let dst = &mut out[i * side * cols..][..side * cols];
            for s in 0..cols {
                let t = tile.filter([g0[s], g1[s], g2[s]]);
                for (j, &v) in t[..side].iter().enumerate() {
                    dst[j * cols + s] = v;
                }
            }
        }
    }
    dispatched! {
        fn run(taps: &[f32], gk: &mut [f32], cols: usize, f4: bool, out: &mut [f32]) {
            if f4 {
                rows::<true>(taps, gk, cols, out)
            } else {
                rows::<false>(taps, gk, cols, out)
            }
        }
    }
    run(taps, gk, cols, f4, out)
}

/// Row `r` of a plane (`h x w`) as the transforms read it, padded by `pad_top` rows above
/// and `pad` columns on the left: `padded[j] = plane[r - pad_top][j - pad]`, zero outside the
/// plane (`padded` may be longer than `pad + w`, or shorter: the row is cut). False, with
/// `padded` untouched, when row `r` lies entirely in the padding.
#[inline(always)]
fn padded_row<E: Act>(
    plane: &[E],
    [h, w]: [usize; 2],
    [pad_top, pad]: [usize; 2],
    r: usize,
    padded: &mut [f32],
) -> bool {
    let Some(y) = r.checked_sub(pad_top).filter(|&y| y < h) else {
        return false;
    };
    let n = w.min(padded.len() - pad);
    padded[..pad].fill(0.0);
    let src = &plane[y * w..][..n];
    padded[pad..pad + n]
        .iter_mut()
        .zip(src)
        .for_each(|(d, &v)| *d = v.to_f32());
    padded[pad + n..].fill(0.0);
    true
}

dispatched! {
    /// `Bᵀ d B` for every tile of one channel plane (`h x w`, padding `pad` left and right,
    /// `pad_top` above: 0 for a band that starts inside the plane), written to
    /// `v[ξ · plane_stride + t0 + ty · tw + tx]`; `scratch` holds [`scratch_len`] floats.
    fn input_transform<E: Act>(
        plane: &[E],
        h: usize,
        w: usize,
        pad: usize,
        pad_top: usize,
        th: usize,
        tw: usize,
        v: &mut [f32],
        plane_stride: usize,
        t0: usize,
        scratch: &mut [f32],
    ) {
        // The horizontal transform `d B` of every padded row, each computed once although
        // neighbouring tiles share two rows, stored as hrows[b][r % 2][(r / 2) · tw + tx]: then
        // the rows a tile row needs, 2ty .. 2ty + 3, are the flat runs at `ty · tw` and
        // `(ty + 1) · tw` of the even and odd halves, so the vertical transform is a few long
        // loops per plane instead of many `tw`-long ones (loop overhead was most of its cost).
        let rows = 2 * th + 2;
        let half = (th + 1) * tw;
        let (hrows, rest) = scratch.split_at_mut(8 * half);
        let (padded, rest) = rest.split_at_mut(2 * tw + 2);
        let (ev, od) = rest.split_at_mut(tw + 1);
        let od = &mut od[..tw + 1];
        for r in 0..rows {
            let at = (r / 2) * tw;
            // The four outputs of row r: hrows[b][r % 2][at..at + tw], disjoint for each b.
            let mut outs = hrows.chunks_mut(half).skip(r % 2).step_by(2).map(|c| &mut c[at..at + tw]);
            let (h0, h1, h2, h3) = (
                outs.next().unwrap(),
                outs.next().unwrap(),
                outs.next().unwrap(),
                outs.next().unwrap(),
            );
            if !padded_row(plane, [h, w], [pad_top, pad], r, padded) {
                for o in [h0, h1, h2, h3] {
                    o.fill(0.0);
                }
                continue;
            }
            // Split into even and odd columns so that the loop below is contiguous.
            for ((e, o), pair) in ev.iter_mut().zip(od.iter_mut()).zip(padded.chunks_exact(2)) {
                *e = pair[0];
                *o = pair[1];
            }
            let (e0, e1, o0, o1) = (&ev[..tw], &ev[1..], &od[..tw], &od[1..]);
            for (x, (((a, b), c), d)) in h0.iter_mut().zip(h1).zip(h2).zip(h3).enumerate() {
                let (ea, eb, oa, ob) = (e0[x], e1[x], o0[x], o1[x]);
                *a = ea - eb;
                *b = oa + eb;
                *c = eb - oa;
                *d = oa - ob;
            }
        }
        // The vertical transform `Bᵀ (d B)`: for tile t = ty · tw + tx, rows 2ty, 2ty + 1,
        // 2ty + 2, 2ty + 3 are even[t], odd[t], even[t + tw], odd[t + tw].
        let n = th * tw;
        for b in 0..4 {
            let even = &hrows[2 * b * half..][..half];
            let odd = &hrows[(2 * b + 1) * half..][..half];
            let (r0, r1, r2, r3) = (&even[..n], &odd[..n], &even[tw..tw + n], &odd[tw..tw + n]);
            let dst = |a: usize| (a * 4 + b) * plane_stride + t0;
            for (d, (x, y)) in v[dst(0)..][..n].iter_mut().zip(r0.iter().zip(r2)) {
                *d = x - y;
            }
            for (d, (x, y)) in v[dst(1)..][..n].iter_mut().zip(r1.iter().zip(r2)) {
                *d = x + y;
            }
            for (d, (x, y)) in v[dst(2)..][..n].iter_mut().zip(r2.iter().zip(r1)) {
                *d = x - y;
            }
            for (d, (x, y)) in v[dst(3)..][..n].iter_mut().zip(r1.iter().zip(r3)) {
                *d = x - y;
            }
        }
    }
}

/// Scratch floats the transforms of `tile` need for `th x tw` tiles.
fn scratch_len(tile: Tile, th: usize, tw: usize) -> usize {
    match tile {
        Tile::F2 => (8 * (th + 1) * tw + 4 * tw + 4)
            .max(10 * th * tw)
            .max(simd_scratch_len(Tile::F2, th, tw)),
        Tile::F4 => (48 * (th + 1) * tw + 4 * tw + 4)
            .max(28 * th * tw)
            .max(simd_scratch_len(Tile::F4, th, tw)),
    }
}

/// Scratch floats the vector transforms need ([`super::winograd_simd`]).
fn simd_scratch_len(tile: Tile, th: usize, tw: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    return match tile {
        Tile::F2 => super::winograd_simd::scratch_len2(th, tw),
        Tile::F4 => super::winograd_simd::scratch_len(th, tw),
    };
    #[cfg(not(target_arch = "x86_64"))]
    0
}

/// The widest rows of tiles (`tw`) the AVX-512 input and output-gradient transforms take:
/// one vector of tiles. On wider rows the portable loops already run long vectors, and the
/// flat copies' larger scratch cost more than the permutes saved (`perf record` of
/// `CONV_LAYERS_REPEAT=fwd|dw conv_layers 2 fp32 vgg16 224 8` and `CONVLAB_AMX=0 ...
/// conv_layers 2 bf16 resnet18 224 32`, Xeon with AMX, 2026-12-06, samples in the
/// transform, portable -> AVX-512: vgg16's 64 -> 64 at 224 px (56 tiles a row) input 555 /
/// 618 -> 939 / 927, output gradient 634 -> 705; bf16 resnet18's 64 -> 64 at 56 px (28)
/// input 417-451 -> 492-514; but its 128 -> 128 at 28 px (14) 240 / 250 -> 180 / 210). The
/// output transform runs on AVX-512 at every width (vgg16 at 224 px 568 / 629 -> 472 / 487).
const SIMD_MAX_TW: usize = 16;

/// The unit the vector transforms ([`super::winograd_simd`]) run on here: AVX-512 only. On
/// AVX2 the same bodies (eight tiles a vector, tested beside the AVX-512 ones) took more of
/// an fp32 resnet18 training step at 224 px than the portable loops, which the compiler
/// vectorises for AVX2 itself: `perf record -F 499 convlab bench train --model resnet18
/// --input 3x224x224 --batch 32 --steps 3 --threads 2`, Zen 3 (AMD EPYC family 25 model 1),
/// 2026-12-08, two alternated runs each, the step's samples in the input transforms 8.4% /
/// 9.1% on AVX2 against 7.7% / 7.4% portable, output 3.9% / 4.7% against 3.0% / 2.6%,
/// output gradient 2.1% / 2.3% against 1.8% / 1.9%.
fn simd_unit() -> Option<Unit> {
    Unit::detect().filter(|&u| u == Unit::Avx512)
}

/// The input transform of `tile` ([`input_transform`], [`input_transform4`]), sixteen tiles
/// at a time where the CPU has AVX-512 and rows have at most [`SIMD_MAX_TW`] tiles
/// ([`super::winograd_simd::input2`] on f32 and bf16 planes,
/// [`super::winograd_simd::input4`] on f32 ones; the same bits).
#[allow(clippy::too_many_arguments)]
fn input_transform_any<E: Act>(
    tile: Tile,
    plane: &[E],
    h: usize,
    w: usize,
    pad: usize,
    pad_top: usize,
    th: usize,
    tw: usize,
    v: &mut [f32],
    plane_stride: usize,
    t0: usize,
    scratch: &mut [f32],
) {
    macro_rules! run {
        ($f:expr, $p:expr) => {
            $f($p, h, w, pad, pad_top, th, tw, v, plane_stride, t0, scratch)
        };
        ($f:expr, $unit:expr, $p:expr) => {
            $f(
                $unit,
                $p,
                h,
                w,
                pad,
                pad_top,
                th,
                tw,
                v,
                plane_stride,
                t0,
                scratch,
            )
        };
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(unit) = simd_unit().filter(|_| tw <= SIMD_MAX_TW) {
        use super::winograd_simd as simd;
        match (tile, E::as_f32s(plane), E::as_bf16_bits(plane)) {
            // SAFETY: `unit` was detected on this CPU.
            (Tile::F2, Some(p), _) => return unsafe { run!(simd::input2, unit, p) },
            // SAFETY: as above.
            (Tile::F2, None, Some(p)) => return unsafe { run!(simd::input2, unit, p) },
            // SAFETY: as above.
            (Tile::F4, Some(p), _) => return unsafe { run!(simd::input4, unit, p) },
            _ => {}
        }
    }
    match tile {
        Tile::F2 => run!(input_transform, plane),
        Tile::F4 => run!(input_transform4, plane),
    }
}

/// The output transform of `tile` ([`output_transform`], [`output_transform4`]), sixteen
/// tiles at a time where the CPU has AVX-512 ([`super::winograd_simd::output2`],
/// [`super::winograd_simd::output4`]; the same bits).
#[allow(clippy::too_many_arguments)]
fn output_transform_any(
    tile: Tile,
    m: &[f32],
    plane_stride: usize,
    t0: usize,
    th: usize,
    tw: usize,
    ho: usize,
    wo: usize,
    bias: f32,
    y: &mut [f32],
    s: &mut [f32],
) {
    macro_rules! run {
        ($f:expr) => {
            $f(m, plane_stride, t0, th, tw, ho, wo, bias, y, s)
        };
        ($f:expr, $unit:expr) => {
            $f($unit, m, plane_stride, t0, th, tw, ho, wo, bias, y, s)
        };
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(unit) = simd_unit() {
        use super::winograd_simd as simd;
        return match tile {
            // SAFETY: `unit` was detected on this CPU.
            Tile::F2 => unsafe { run!(simd::output2, unit) },
            // SAFETY: as above.
            Tile::F4 => unsafe { run!(simd::output4, unit) },
        };
    }
    match tile {
        Tile::F2 => run!(output_transform),
        Tile::F4 => run!(output_transform4),
    }
}

/// [`dy_transform`], sixteen tiles at a time where the CPU has AVX-512 and rows have at most
/// [`SIMD_MAX_TW`] tiles ([`super::winograd_simd::dy4`] and
/// [`super::winograd_simd::dy2`], the same bits).
#[allow(clippy::too_many_arguments)]
fn dy_transform_fast(
    f4: bool,
    dy: &[f32],
    ho: usize,
    wo: usize,
    th: usize,
    tw: usize,
    dm: &mut [f32],
    plane_stride: usize,
    t0: usize,
    s: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(unit) = simd_unit().filter(|_| tw <= SIMD_MAX_TW) {
        let run = if f4 {
            super::winograd_simd::dy4
        } else {
            super::winograd_simd::dy2
        };
        // SAFETY: `unit` was detected on this CPU.
        unsafe { run(unit, dy, ho, wo, th, tw, dm, plane_stride, t0, s) };
        return;
    }
    dy_transform(f4, dy, ho, wo, th, tw, dm, plane_stride, t0, s)
}

/// `Bᵀ d` for F(4x4, 3x3), `d` six consecutive values of a row or column.
#[inline(always)]
fn b4([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
    [
        4.0 * d0 - 5.0 * d2 + d4,
        -4.0 * (d1 + d2) + d3 + d4,
        4.0 * (d1 - d2) - d3 + d4,
        2.0 * (d3 - d1) - d2 + d4,
        2.0 * (d1 - d3) - d2 + d4,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// `Aᵀ m` for F(4x4, 3x3), `m` six transformed values of a row or column.
#[inline(always)]
fn a4([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 4] {
    let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [
        m0 + s12 + s34,
        d12 + 2.0 * d34,
        s12 + 4.0 * s34,
        d12 + 8.0 * d34 + m5,
    ]
}

/// `out[4t + k] = cols[k][at + t]` for every whole group of four in `out`: the four output
/// columns of each F(4x4) tile interleaved into a row. Four tiles at a time by SSE 4x4
/// transposes on x86_64 (baseline there), one tile at a time elsewhere and for the rest.
#[inline(always)]
fn interleave4(cols: [&[f32]; 4], at: usize, out: &mut [f32]) {
    let tiles = out.len() / 4;
    assert!(
        cols.iter().all(|c| at + tiles <= c.len()),
        "{tiles} tiles from {at}"
    );
    #[allow(unused_mut)]
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    while t + 4 <= tiles {
        use std::arch::x86_64::*;
        // SAFETY: the loads read cols[k][at + t .. at + t + 4) and the stores write
        // out[4t .. 4t + 16), in bounds by the assert and `t + 4 <= tiles`.
        unsafe {
            let r = cols.map(|c| _mm_loadu_ps(c.as_ptr().add(at + t)));
            let (lo01, hi01) = (_mm_unpacklo_ps(r[0], r[1]), _mm_unpackhi_ps(r[0], r[1]));
            let (lo23, hi23) = (_mm_unpacklo_ps(r[2], r[3]), _mm_unpackhi_ps(r[2], r[3]));
            let o = out.as_mut_ptr().add(4 * t);
            _mm_storeu_ps(o, _mm_movelh_ps(lo01, lo23));
            _mm_storeu_ps(o.add(4), _mm_movehl_ps(lo23, lo01));
            _mm_storeu_ps(o.add(8), _mm_movelh_ps(hi01, hi23));
            _mm_storeu_ps(o.add(12), _mm_movehl_ps(hi23, hi01));
        }
        t += 4;
    }
    for (t, o) in out.chunks_exact_mut(4).enumerate().skip(t) {
        o.copy_from_slice(&cols.map(|c| c[at + t]));
    }
}

/// `q[at[j] + t] = padded[4t + j]` for `j < 6`, `t < tw`: the six columns each tile of a
/// padded row reads (F(4x4, 3x3)'s tiles are 6 wide, 4 apart). Four tiles at a time by 4x4
/// transposes on x86_64 (SSE, which every x86_64 has), one value at a time elsewhere and for
/// the last `tw mod 4` tiles.
#[inline(always)]
fn tile_columns4(padded: &[f32], tw: usize, q: &mut [f32], at: [usize; 6]) {
    assert!(padded.len() >= 4 * tw + 2, "a padded row of {tw} tiles");
    assert!(
        at.iter().all(|&a| a + tw <= q.len()),
        "six runs of {tw} in q"
    );
    #[allow(unused_mut)]
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    while t + 4 <= tw && 4 * t + 20 <= padded.len() {
        use std::arch::x86_64::*;
        // SAFETY: the loads read padded[4t .. 4t + 20) (the loop's condition), the stores
        // write q[at[j] + t .. at[j] + t + 4) with t + 4 <= tw (the assert above).
        unsafe {
            let p = padded.as_ptr().add(4 * t);
            // Row `i`: the four values that start tile t + i.
            let r = [0, 1, 2, 3, 4].map(|i| _mm_loadu_ps(p.add(4 * i)));
            let (lo01, hi01) = (_mm_unpacklo_ps(r[0], r[1]), _mm_unpackhi_ps(r[0], r[1]));
            let (lo23, hi23) = (_mm_unpacklo_ps(r[2], r[3]), _mm_unpackhi_ps(r[2], r[3]));
            // Columns 4 and 5 of a tile are columns 0 and 1 of the next one.
            let (lo12, lo34) = (_mm_unpacklo_ps(r[1], r[2]), _mm_unpacklo_ps(r[3], r[4]));
            let columns = [
                _mm_movelh_ps(lo01, lo23),
                _mm_movehl_ps(lo23, lo01),
                _mm_movelh_ps(hi01, hi23),
                _mm_movehl_ps(hi23, hi01),
                _mm_movelh_ps(lo12, lo34),
                _mm_movehl_ps(lo34, lo12),
            ];
            let q = q.as_mut_ptr();
            for (&a, c) in at.iter().zip(columns) {
                _mm_storeu_ps(q.add(a + t), c);
            }
        }
        t += 4;
    }
    for t in t..tw {
        for (j, &a) in at.iter().enumerate() {
            q[a + t] = padded[4 * t + j];
        }
    }
}

dispatched! {
    /// [`input_transform`] for F(4x4, 3x3): `Bᵀ d B` of every 6x6 tile (4 apart) of one
    /// channel plane, written to `v[ξ · plane_stride + t0 + ty · tw + tx]`, `ξ = 6a + b`.
    fn input_transform4<E: Act>(
        plane: &[E],
        h: usize,
        w: usize,
        pad: usize,
        pad_top: usize,
        th: usize,
        tw: usize,
        v: &mut [f32],
        plane_stride: usize,
        t0: usize,
        scratch: &mut [f32],
    ) {
        // As in `input_transform`, with rows and columns split four ways instead of two:
        // tile `tx` reads columns 4tx .. 4tx + 5. The six columns of every tile of padded row
        // `r` go to q[j][r % 4][(r / 4) · tw + tx] first ([`tile_columns4`]), so the
        // horizontal transform of all rows of one phase `r % 4` runs flat over them, into
        // hrows[b][r % 4][(r / 4) · tw + tx]. Row by row, its loop of `tw` tiles (8 at 32 px,
        // 4 at 16 px) was shorter than one pass of the compiler's vectorised loop and ran one
        // value at a time.
        let rows = 4 * th + 2;
        let quarter = (th + 1) * tw;
        let (hrows, rest) = scratch.split_at_mut(24 * quarter);
        let (q, rest) = rest.split_at_mut(24 * quarter);
        let padded = &mut rest[..4 * tw + 4];
        for r in 0..rows {
            let at: [usize; 6] = std::array::from_fn(|j| (j * 4 + r % 4) * quarter + (r / 4) * tw);
            if !padded_row(plane, [h, w], [pad_top, pad], r, padded) {
                for a in at {
                    q[a..][..tw].fill(0.0);
                }
                continue;
            }
            tile_columns4(padded, tw, q, at);
        }
        for k in 0..4 {
            // Rows `k, k + 4, ..` below `rows`.
            let len = (rows - k).div_ceil(4) * tw;
            let ph = |j: usize| &q[(j * 4 + k) * quarter..][..len];
            let (q0, q1, q2, q3, q4, q5) = (ph(0), ph(1), ph(2), ph(3), ph(4), ph(5));
            let mut outs = [0usize; 6].map(|_| &mut [][..]);
            let mut rest: &mut [f32] = hrows;
            let mut taken = 0;
            for (b, slot) in outs.iter_mut().enumerate() {
                let start = (b * 4 + k) * quarter;
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - taken);
                let (run, tail) = tail.split_at_mut(len);
                *slot = run;
                rest = tail;
                taken = start + len;
            }
            let [h0, h1, h2, h3, h4, h5] = outs;
            for x in 0..len {
                let t = b4([q0[x], q1[x], q2[x], q3[x], q4[x], q5[x]]);
                (h0[x], h1[x], h2[x], h3[x], h4[x], h5[x]) = (t[0], t[1], t[2], t[3], t[4], t[5]);
            }
        }
        // The vertical transform: tile t = ty · tw + tx reads rows 4ty .. 4ty + 5, phases 0-3
        // at `t` and phases 0-1 at `t + tw`.
        let n = th * tw;
        for b in 0..6 {
            let ph = |k: usize, off: usize| &hrows[(b * 4 + k) * quarter + off..][..n];
            let (r0, r1, r2, r3, r4, r5) = (ph(0, 0), ph(1, 0), ph(2, 0), ph(3, 0), ph(0, tw), ph(1, tw));
            let mut outs = [0usize; 6].map(|_| &mut [][..]);
            let mut rest: &mut [f32] = v;
            let mut taken = 0;
            for (a, slot) in outs.iter_mut().enumerate() {
                let start = (a * 6 + b) * plane_stride + t0;
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - taken);
                let (run, tail) = tail.split_at_mut(n);
                *slot = run;
                rest = tail;
                taken = start + n;
            }
            let [v0, v1, v2, v3, v4, v5] = outs;
            for x in 0..n {
                let t = b4([r0[x], r1[x], r2[x], r3[x], r4[x], r5[x]]);
                (v0[x], v1[x], v2[x], v3[x], v4[x], v5[x]) = (t[0], t[1], t[2], t[3], t[4], t[5]);
            }
        }
    }
}

dispatched! {
    /// [`output_transform`] for F(4x4, 3x3): `Aᵀ m A` (+ bias) of every tile of one output
    /// channel, from `m[ξ · plane_stride + t0 + ty · tw + tx]` into the `ho x wo` plane `y`.
    fn output_transform4(
        m: &[f32],
        plane_stride: usize,
        t0: usize,
        th: usize,
        tw: usize,
        ho: usize,
        wo: usize,
        bias: f32,
        y: &mut [f32],
        s: &mut [f32],
    ) {
        // The four rows of `Aᵀ m` (six columns each), flat over all tiles: r[i][b][t]; then
        // per output row phase i the four output columns of every tile, interleaved into the
        // rows 4ty + i.
        let n = th * tw;
        let q = |xi: usize| &m[xi * plane_stride + t0..][..n];
        let (r, rest) = s.split_at_mut(24 * n);
        let cols = &mut rest[..4 * n];
        for b in 0..6 {
            let (m0, m1, m2, m3, m4, m5) = (q(b), q(6 + b), q(12 + b), q(18 + b), q(24 + b), q(30 + b));
            let (r0, rest) = r[b * n..].split_at_mut(6 * n);
            let (r1, rest) = rest.split_at_mut(6 * n);
            let (r2, r3) = rest.split_at_mut(6 * n);
            for x in 0..n {
                let t = a4([m0[x], m1[x], m2[x], m3[x], m4[x], m5[x]]);
                (r0[x], r1[x], r2[x], r3[x]) = (t[0], t[1], t[2], t[3]);
            }
        }
        for i in 0..4 {
            let ri = &r[i * 6 * n..][..6 * n];
            let c = |b: usize| &ri[b * n..][..n];
            let (c0, c1, c2, c3, c4, c5) = (c(0), c(1), c(2), c(3), c(4), c(5));
            let (y0, rest) = cols.split_at_mut(n);
            let (y1, rest) = rest.split_at_mut(n);
            let (y2, y3) = rest.split_at_mut(n);
            for x in 0..n {
                let t = a4([c0[x], c1[x], c2[x], c3[x], c4[x], c5[x]]);
                (y0[x], y1[x], y2[x], y3[x]) = (t[0] + bias, t[1] + bias, t[2] + bias, t[3] + bias);
            }
            for ty in 0..th {
                let oy = 4 * ty + i;
                if oy >= ho {
                    break;
                }
                let at = ty * tw;
                let row = &mut y[oy * wo..(oy + 1) * wo];
                let (full, last) = row.split_at_mut(wo / 4 * 4);
                interleave4([y0, y1, y2, y3], at, full);
                let tx = wo / 4;
                for (k, out) in last.iter_mut().enumerate() {
                    *out = [&*y0, &*y1, &*y2, &*y3][k][at + tx];
                }
            }
        }
    }
}

dispatched! {
    /// `Aᵀ m A` (+ bias) for every tile of one output channel: reads
    /// `m[ξ · plane_stride + t0 + ty · tw + tx]`, writes the `ho x wo` plane `y`; `s` is scratch
    /// ([`scratch_len`]).
    fn output_transform(
        m: &[f32],
        plane_stride: usize,
        t0: usize,
        th: usize,
        tw: usize,
        ho: usize,
        wo: usize,
        bias: f32,
        y: &mut [f32],
        s: &mut [f32],
    ) {
        // Flat over all tiles, as in `input_transform`: the two rows of `Aᵀ m` (four columns
        // each), then the even and odd output columns of each output row parity, then one
        // interleaving pass per output row.
        let n = th * tw;
        let q = |xi: usize| &m[xi * plane_stride + t0..][..n];
        let (r0, rest) = s.split_at_mut(4 * n);
        let (r1, rest) = rest.split_at_mut(4 * n);
        let (ye, yo) = rest.split_at_mut(n);
        let yo = &mut yo[..n];
        for b in 0..4 {
            let (m0, m1, m2, m3) = (q(b), q(4 + b), q(8 + b), q(12 + b));
            let (a, c) = (&mut r0[b * n..(b + 1) * n], &mut r1[b * n..(b + 1) * n]);
            for (x, (a, c)) in a.iter_mut().zip(c.iter_mut()).enumerate() {
                let (v0, v1, v2, v3) = (m0[x], m1[x], m2[x], m3[x]);
                *a = v0 + v1 + v2;
                *c = v1 - v2 - v3;
            }
        }
        for i in 0..2 {
            let r: &[f32] = if i == 0 { r0 } else { r1 };
            let (c0, c1, c2, c3) = (&r[..n], &r[n..2 * n], &r[2 * n..3 * n], &r[3 * n..4 * n]);
            for (x, (e, o)) in ye.iter_mut().zip(yo.iter_mut()).enumerate() {
                let (v0, v1, v2, v3) = (c0[x], c1[x], c2[x], c3[x]);
                *e = v0 + v1 + v2 + bias;
                *o = v1 - v2 - v3 + bias;
            }
            for ty in 0..th {
                let oy = 2 * ty + i;
                if oy >= ho {
                    break;
                }
                let (e, o) = (&ye[ty * tw..][..tw], &yo[ty * tw..][..tw]);
                let row = &mut y[oy * wo..(oy + 1) * wo];
                let (pairs, last) = row.split_at_mut(wo / 2 * 2);
                for ((out, &e), &o) in pairs.chunks_exact_mut(2).zip(e).zip(o) {
                    out[0] = e;
                    out[1] = o;
                }
                if let Some(out) = last.first_mut() {
                    *out = e[wo / 2];
                }
            }
        }
    }
}

/// The convolution `y = conv(x, w) (+ bias)` of [`applies`]-able geometry `g`, with the weights
/// already transformed ([`transform_weights`] with `for_input_grad = false`; for an input
/// gradient pass the output gradient as `x`, the transformed rotated weights as `u` and the
/// geometry of that convolution, see [`ConvGeom::input_grad`]).
pub fn forward<E: Act>(
    x: &[E],
    u: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    tile: Tile,
) -> Vec<f32> {
    forward_act(x, u, bias, g, false, tile)
}

/// [`forward`], then `max(·, 0)` on each image's output when `relu`, while it is in cache.
///
/// `u` is transformed for `tile` ([`transform_weights`]).
pub fn forward_act<E: Act>(
    x: &[E],
    u: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
    tile: Tile,
) -> Vec<f32> {
    let (cin, cout, h, w) = (g.cin, g.cout, g.h, g.w);
    let (ho, wo) = (g.ho(), g.wo());
    let (th, tw) = (ho.div_ceil(tile.m()), wo.div_ceil(tile.m()));
    let tiles = th * tw;
    let xis = tile.xis();
    let (in_len, out_len) = (cin * h * w, cout * ho * wo);
    assert_eq!(x.len(), g.batch * in_len, "winograd input length");
    assert_eq!(u.len(), xis * cout * cin, "winograd weight length");
    assert!(
        tile == Tile::F2 || g.precision == super::Precision::Fp32,
        "F(4x4, 3x3) runs in f32 only"
    );
    // In bf16 the transformed weight matrices are rounded and packed once per call.
    let packed = (g.precision == super::Precision::Bf16).then(|| {
        (0..xis)
            .into_par_iter()
            .map(|xi| super::bf16::PackedLhs::new(cout, cin, &u[xi * cout * cin..], cin, 1))
            .collect::<Vec<_>>()
    });
    let bands = Bands::new(tile, g);
    if g.batch < rayon::current_num_threads() {
        return forward_few(x, u, packed.as_deref(), bias, g, relu, &bands);
    }
    let parts = rayon::current_num_threads().clamp(1, g.batch.max(1));
    let per = g.batch.div_ceil(parts).max(1);
    let inputs = x.par_chunks((per * in_len).max(1));
    par_lazy(g.batch * out_len, per * out_len, inputs, |yb, xb| {
        let images = xb.len() / in_len.max(1);
        let mut v = vec![0.0f32; xis * cin * bands.max_tiles()];
        let mut m = vec![0.0f32; xis * cout * bands.max_tiles()];
        let mut scratch = vec![0.0f32; scratch_len(tile, bands.rows, tw)];
        // A banded image's output, taken whole before its first band.
        let mut image_out: &mut [f32] = &mut [];
        for b in bands.blocks(images) {
            let t_all = b.count * b.tiles(tw);
            bands.transform_input(xb, b, &mut v, &mut scratch);
            for xi in 0..xis {
                let (mx, vx) = (&mut m[xi * cout * t_all..], &v[xi * cin * t_all..]);
                position_product(u, packed.as_deref(), g, xi, t_all, mx, vx, t_all);
            }
            if b.rows == th {
                // Whole images, plane by plane, in the order of the chunk: each plane zeroed
                // just before its transform writes it ([`par_lazy`]).
                for i in 0..b.count {
                    for o in 0..cout {
                        let plane = yb.take(ho * wo);
                        output_transform_any(
                            tile,
                            &m[o * t_all..],
                            cout * t_all,
                            i * tiles,
                            th,
                            tw,
                            ho,
                            wo,
                            bias.map_or(0.0, |b| b[o]),
                            plane,
                            &mut scratch,
                        );
                        if relu {
                            relu_row(plane);
                        }
                    }
                }
                continue;
            }
            if b.ty0 == 0 {
                image_out = yb.take(out_len);
            }
            for (o, plane) in image_out.chunks_exact_mut(ho * wo).enumerate() {
                bands.band_output(&m, t_all, b, o, bias, relu, plane, &mut scratch);
            }
        }
    })
}

/// [`forward_act`] of fewer images than threads (one photo classified, a latency): each
/// band of each image on all threads, where the batched path gives every thread whole images
/// and so left all but one idle. The input transform runs channel by channel (`v[c][ξ][t]`,
/// each channel's values together), the `ξ` GEMMs one per task, and the output transform
/// output channel by output channel: the same values and products as the batched path (the
/// GEMMs read `V_ξ` with a longer row stride), so the same bits.
///
/// resnet18 at 224 px, batch 1, 2 threads: its Winograd layers' forward passes had run at
/// the speed of one thread (64 -> 64 at 56 px 1.8 ms against 2.0 on one thread).
fn forward_few<E: Act>(
    x: &[E],
    u: &[f32],
    packed: Option<&[super::bf16::PackedLhs]>,
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
    bands: &Bands,
) -> Vec<f32> {
    let tile = bands.tile;
    let (cin, cout, h, w, pad) = (g.cin, g.cout, g.h, g.w, g.pad[0]);
    let (ho, wo, tw) = (g.ho(), g.wo(), bands.tw);
    let (xis, in_len, out_len) = (tile.xis(), cin * h * w, cout * ho * wo);
    let band_tiles = bands.rows * tw;
    let (v_len, m_len) = (xis * cin * band_tiles, xis * cout * band_tiles);
    // Zeroed by all workers: one thread's `memset` of a 64-channel 56 px output kept the
    // others waiting.
    let mut y = par_zeroed(
        g.batch * out_len,
        (ho * wo).max(1),
        (0..g.batch * cout).into_par_iter(),
        |_, _| {},
    );
    let scratch = || vec![0.0f32; scratch_len(tile, bands.rows, tw)];
    with_scratch(v_len + m_len, |vm| {
        let (v, m) = vm.split_at_mut(v_len);
        for (xn, yn) in x.chunks(in_len.max(1)).zip(y.chunks_mut(out_len.max(1))) {
            for b in bands.blocks(1) {
                let t_all = b.tiles(tw);
                let (start, pad_top) = bands.input_rows(b);
                v.par_chunks_mut(xis * t_all)
                    .take(cin)
                    .enumerate()
                    .for_each_init(scratch, |s, (c, vc)| {
                        let plane = &xn[c * h * w..][..h * w];
                        input_transform_any(
                            tile,
                            &plane[start * w..],
                            h - start,
                            w,
                            pad,
                            pad_top,
                            b.rows,
                            tw,
                            vc,
                            t_all,
                            0,
                            s,
                        );
                    });
                m.par_chunks_mut(cout * t_all)
                    .take(xis)
                    .enumerate()
                    .for_each(|(xi, mx)| {
                        let vx = &v[xi * t_all..];
                        position_product(u, packed, g, xi, t_all, mx, vx, xis * t_all);
                    });
                yn.par_chunks_mut(ho * wo)
                    .enumerate()
                    .for_each_init(scratch, |s, (o, plane)| {
                        bands.band_output(m, t_all, b, o, bias, relu, plane, s);
                    });
            }
        }
    });
    y
}

/// `M_ξ = U_ξ · V_ξ` of one transformed position `ξ` over `t_all` tiles: `mx` is `M_ξ`
/// (`[C_out, t_all]`), `vx` starts `V_ξ` (`[C_in, t_all]`, rows `v_rs` apart); in bf16 with
/// `U_ξ` packed once per call.
#[allow(clippy::too_many_arguments)]
fn position_product(
    u: &[f32],
    packed: Option<&[super::bf16::PackedLhs]>,
    g: &ConvGeom,
    xi: usize,
    t_all: usize,
    mx: &mut [f32],
    vx: &[f32],
    v_rs: usize,
) {
    let (cin, cout) = (g.cin, g.cout);
    match packed {
        Some(p) => super::bf16::gemm_packed(&p[xi], t_all, mx, t_all, false, vx, v_rs, 1, 1),
        None => super::gemm::gemm_f32(
            cout,
            t_all,
            cin,
            mx,
            t_all,
            false,
            &u[xi * cout * cin..],
            cin,
            1,
            vx,
            v_rs,
            1,
            1,
        ),
    }
}

/// The units the transforms and GEMMs of one thread's images run in: groups of whole images
/// while an image has at most [`GROUP_TILES`] tiles, whole images while their transformed
/// input and output fit in [`BAND_BYTES`], else bands of whole rows of tiles of that size. A 224 px image had all its tiles in one GEMM: 12544
/// for F(2x2, 3x3), whose 16 transformed copies of the input (51 MB for 64 channels) and of
/// the output went out to memory and back between the transform and the GEMMs.
struct Bands {
    tile: Tile,
    g: ConvGeom,
    th: usize,
    tw: usize,
    /// Tile rows per block (`th` for whole images).
    rows: usize,
    /// Images per block of whole images.
    group: usize,
}

/// `count` images from `first` (of a thread's chunk), tile rows `ty0 .. ty0 + rows` of each.
#[derive(Clone, Copy)]
struct Block {
    first: usize,
    count: usize,
    ty0: usize,
    rows: usize,
}

impl Block {
    fn tiles(&self, tw: usize) -> usize {
        self.rows * tw
    }
}

impl Bands {
    fn new(tile: Tile, g: &ConvGeom) -> Bands {
        let (th, tw) = (g.ho().div_ceil(tile.m()), g.wo().div_ceil(tile.m()));
        let tiles = th * tw;
        // Bytes of transformed input and output per tile.
        let per_tile = tile.xis() * (g.cin + g.cout) * 4;
        // Each group's GEMMs read all of `U` too: where it is larger than a band (512 -> 512
        // in F(2x2), 256 -> 256 and up in F(4x4)), groups of four times the tiles. fp32, 2
        // threads, Zen 3, 2026-12-06, three alternated runs (`bench/conv_layers_ab.sh OLD NEW
        // 3 "512->512" fp32 vgg16 224 8`), median ms forward / weight gradient / input
        // gradient: 28 px (F(4x4), 49 tiles an image) 79.7 / 76.8 / 77.1 -> 67.6 / 69.7 /
        // 67.0, 14 px (F(2x2), 49 tiles) 33.4 / 33.8 / 34.3 -> 30.7 / 30.3 / 29.5. Four times
        // the tiles for every layer lost on 128 and 256 channels (resnet18 at 128 px: 128 ->
        // 128 at 16 px forward 6.7 -> 8.5 ms, 256 -> 256 at 8 px 8.6 -> 10.4).
        let wide = tile.xis() * g.cin * g.cout * 4 > BAND_BYTES;
        let group_tiles = if wide { 4 * GROUP_TILES } else { GROUP_TILES };
        let (rows, group) = if tiles <= group_tiles {
            (th, (group_tiles / tiles.max(1)).max(1))
        } else if tiles * per_tile <= BAND_BYTES || tile.xis() * g.cin * g.cout * 4 > BAND_BYTES / 4
        {
            // Every band multiplies by all of `U`: for wide layers reading it once per band
            // cost more than the bands saved (vgg16 at 224 px, bf16: 256 -> 256 at 56 px
            // 58.3 -> 69.3 ms forward, 512 -> 512 at 28 px 56.5 -> 68.3 with 8 MB bands).
            (th, 1)
        } else {
            ((BAND_BYTES / per_tile / tw).clamp(1, th), 1)
        };
        Bands {
            tile,
            g: *g,
            th,
            tw,
            rows,
            group,
        }
    }

    /// Where block `b`'s input starts: `(first input row, zero rows above it)`. A band below
    /// the first starts at input row `m·ty0 - pad` with no padding above.
    fn input_rows(&self, b: Block) -> (usize, usize) {
        let (pad, h) = (self.g.pad[0], self.g.h);
        if b.ty0 == 0 {
            (0, pad)
        } else {
            ((self.tile.m() * b.ty0 - pad).min(h), 0)
        }
    }

    /// The most tiles one block has.
    fn max_tiles(&self) -> usize {
        self.group * self.rows * self.tw
    }

    /// Output channel `o`'s rows of band `b` (one image's) in its `plane`: `Aᵀ m A` of the
    /// band's tiles from `m[ξ][o][t]` (`t_all` tiles), plus the bias, then ReLU.
    #[allow(clippy::too_many_arguments)]
    fn band_output(
        &self,
        m: &[f32],
        t_all: usize,
        b: Block,
        o: usize,
        bias: Option<&[f32]>,
        relu: bool,
        plane: &mut [f32],
        scratch: &mut [f32],
    ) {
        let (ho, wo, mm) = (self.g.ho(), self.g.wo(), self.tile.m());
        let (y0, y1) = (mm * b.ty0, (mm * (b.ty0 + b.rows)).min(ho));
        let band = &mut plane[y0 * wo..];
        output_transform_any(
            self.tile,
            &m[o * t_all..],
            self.g.cout * t_all,
            0,
            b.rows,
            self.tw,
            ho - y0,
            wo,
            bias.map_or(0.0, |b| b[o]),
            band,
            scratch,
        );
        if relu {
            relu_row(&mut band[..(y1 - y0) * wo]);
        }
    }

    /// The blocks of a chunk of `images` images, in order.
    fn blocks(&self, images: usize) -> impl Iterator<Item = Block> + '_ {
        (0..images).step_by(self.group).flat_map(move |first| {
            let count = self.group.min(images - first);
            (0..self.th).step_by(self.rows).map(move |ty0| Block {
                first,
                count,
                ty0,
                rows: self.rows.min(self.th - ty0),
            })
        })
    }

    /// `V = Bᵀ d B` of block `b` of the images `xb` (`[images, C_in, H, W]`) into
    /// `v[ξ][c][t]`, `t` running over the block's tiles image by image.
    fn transform_input<E: Act>(&self, xb: &[E], b: Block, v: &mut [f32], scratch: &mut [f32]) {
        let g = &self.g;
        let (cin, h, w, pad) = (g.cin, g.h, g.w, g.pad[0]);
        let in_len = cin * h * w;
        let (tiles, t_all) = (b.tiles(self.tw), b.count * b.tiles(self.tw));
        let (start, pad_top) = self.input_rows(b);
        for i in 0..b.count {
            let xn = &xb[(b.first + i) * in_len..][..in_len];
            for c in 0..cin {
                let plane = &xn[c * h * w..][..h * w];
                input_transform_any(
                    self.tile,
                    &plane[start * w..],
                    h - start,
                    w,
                    pad,
                    pad_top,
                    b.rows,
                    self.tw,
                    &mut v[c * t_all..],
                    cin * t_all,
                    i * tiles,
                    scratch,
                );
            }
        }
    }
}

/// Scratch floats [`dy_transform`] needs.
fn dy_scratch_len(tile: Tile, th: usize, tw: usize) -> usize {
    let m = tile.m();
    let portable = (m + 2) * m * th * tw + m * m * th * tw + m * tw;
    portable.max(simd_scratch_len(tile, th, tw))
}

/// `A y` for one run of `m` output-gradient values: the adjoint of [`a4`] (and of F(2x2)'s
/// `Aᵀ`), `m + 2` values.
#[inline(always)]
fn a_adjoint<const M: usize>(y: [f32; M]) -> [f32; 6] {
    if M == 4 {
        let (y0, y1, y2, y3) = (y[0], y[1], y[2], y[3]);
        [
            y0,
            y0 + y1 + y2 + y3,
            y0 - y1 + y2 - y3,
            y0 + 2.0 * y1 + 4.0 * y2 + 8.0 * y3,
            y0 - 2.0 * y1 + 4.0 * y2 - 8.0 * y3,
            y3,
        ]
    } else {
        let (y0, y1) = (y[0], y[1]);
        [y0, y0 + y1, y0 - y1, -y1, 0.0, 0.0]
    }
}

/// Disjoint runs `buf[starts[k] .. starts[k] + len)`, `starts` increasing by at least `len`:
/// the several outputs of a flat transform loop, borrowed at once.
#[inline(always)]
fn runs_mut<const K: usize>(buf: &mut [f32], starts: [usize; K], len: usize) -> [&mut [f32]; K] {
    let mut rest = buf;
    let mut taken = 0;
    starts.map(|start| {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(start - taken);
        let (run, tail) = tail.split_at_mut(len);
        rest = tail;
        taken = start + len;
        run
    })
}

/// `q[at[j] + t] = row[M t + j]` for `j < M`, `t < tw`: the `M` column phases of a row of
/// `tw` blocks of `M` values. Four blocks at a time by SSE shuffles on x86_64 (baseline
/// there), one value at a time elsewhere and for the last `tw mod 4` blocks.
#[inline(always)]
fn phase_columns<const M: usize>(row: &[f32], tw: usize, q: &mut [f32], at: [usize; M]) {
    assert!(row.len() >= M * tw, "a row of {tw} blocks of {M}");
    assert!(
        at.iter().all(|&a| a + tw <= q.len()),
        "{M} runs of {tw} in q"
    );
    #[allow(unused_mut)]
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    if M == 2 || M == 4 {
        use std::arch::x86_64::*;
        while t + 4 <= tw {
            // SAFETY: the loads read row[M t .. M (t + 4)) and the stores write
            // q[at[j] + t .. at[j] + t + 4), both in bounds by the asserts (t + 4 <= tw).
            unsafe {
                let p = row.as_ptr().add(M * t);
                let q = q.as_mut_ptr();
                let at: &[usize] = &at;
                if M == 4 {
                    // A 4x4 transpose: vector i holds block t + i.
                    let r = [0, 1, 2, 3].map(|i| _mm_loadu_ps(p.add(4 * i)));
                    let (lo01, hi01) = (_mm_unpacklo_ps(r[0], r[1]), _mm_unpackhi_ps(r[0], r[1]));
                    let (lo23, hi23) = (_mm_unpacklo_ps(r[2], r[3]), _mm_unpackhi_ps(r[2], r[3]));
                    _mm_storeu_ps(q.add(at[0] + t), _mm_movelh_ps(lo01, lo23));
                    _mm_storeu_ps(q.add(at[1] + t), _mm_movehl_ps(lo23, lo01));
                    _mm_storeu_ps(q.add(at[2] + t), _mm_movelh_ps(hi01, hi23));
                    _mm_storeu_ps(q.add(at[3] + t), _mm_movehl_ps(hi23, hi01));
                } else {
                    // Even and odd values of eight.
                    let (a, b) = (_mm_loadu_ps(p), _mm_loadu_ps(p.add(4)));
                    _mm_storeu_ps(q.add(at[0] + t), _mm_shuffle_ps::<0b10_00_10_00>(a, b));
                    _mm_storeu_ps(q.add(at[1] + t), _mm_shuffle_ps::<0b11_01_11_01>(a, b));
                }
            }
            t += 4;
        }
    }
    for t in t..tw {
        for (j, &a) in at.iter().enumerate() {
            q[a + t] = row[M * t + j];
        }
    }
}

/// `outs[b][x] = (A y)[b]` with `y[j] = ins[j][x]` ([`a_adjoint`]) for every `x` of runs of
/// one length. Eight values at a time through fixed arrays, which the compiler keeps in
/// vectors; indexed through the arrays of slices element by element, it kept every access's
/// bounds check and ran one value at a time (`perf annotate`).
#[inline(always)]
fn flat_adjoint<const M: usize, const SIDE: usize>(ins: [&[f32]; M], mut outs: [&mut [f32]; SIDE]) {
    const L: usize = 8;
    let n = outs.first().map_or(0, |o| o.len());
    assert!(ins.iter().all(|s| s.len() == n) && outs.iter().all(|o| o.len() == n));
    let mut x = 0;
    while x + L <= n {
        let y: [[f32; L]; M] = std::array::from_fn(|j| ins[j][x..x + L].try_into().unwrap());
        let mut v = [[0.0f32; L]; 6];
        for l in 0..L {
            let a = a_adjoint::<M>(std::array::from_fn(|j| y[j][l]));
            for (vb, a) in v.iter_mut().zip(a) {
                vb[l] = a;
            }
        }
        for (out, v) in outs.iter_mut().zip(&v) {
            out[x..x + L].copy_from_slice(v);
        }
        x += L;
    }
    for x in x..n {
        let a = a_adjoint::<M>(std::array::from_fn(|j| ins[j][x]));
        for (out, a) in outs.iter_mut().zip(a) {
            out[x] = a;
        }
    }
}

dispatched! {
    /// `A dY Aᵀ` for every `m x m` block of one output channel's gradient (`ho x wo`, zero
    /// past the edges), written to `dm[ξ · plane_stride + t0 + ty · tw + tx]`: the adjoint
    /// of [`output_transform`] / [`output_transform4`]. `s` holds
    /// [`dy_scratch_len`] floats.
    fn dy_transform(
        f4: bool,
        dy: &[f32],
        ho: usize,
        wo: usize,
        th: usize,
        tw: usize,
        dm: &mut [f32],
        plane_stride: usize,
        t0: usize,
        s: &mut [f32],
    ) {
        #[inline(always)]
        fn run<const M: usize, const SIDE: usize>(
            dy: &[f32],
            ho: usize,
            wo: usize,
            [th, tw]: [usize; 2],
            dm: &mut [f32],
            plane_stride: usize,
            t0: usize,
            s: &mut [f32],
        ) {
            let n = th * tw;
            // Output row `M·ty + i`, zero-padded to `M · tw` columns, is split into its `M`
            // column phases q[(j · M + i) · n + ty · tw + tx] ([`phase_columns`]), so that
            // the horizontal transform of all rows of row phase `i` runs flat over the tiles,
            // into h[(b · M + i) · n + t], and the vertical one flat again. Row by row, the
            // horizontal loop of `tw` tiles (8 at 32 px) ran one value at a time.
            let (h, rest) = s.split_at_mut(SIDE * M * n);
            let (q, rest) = rest.split_at_mut(M * M * n);
            let row = &mut rest[..M * tw];
            for oy in 0..M * th {
                let (ty, i) = (oy / M, oy % M);
                let at: [usize; M] = std::array::from_fn(|j| (j * M + i) * n + ty * tw);
                if !padded_row(dy, [ho, wo], [0, 0], oy, row) {
                    for a in at {
                        q[a..][..tw].fill(0.0);
                    }
                    continue;
                }
                phase_columns::<M>(row, tw, q, at);
            }
            // `SIDE = M + 2` values of `A y`: F(2x2)'s last two of the six are zeros.
            for i in 0..M {
                let ins: [&[f32]; M] = std::array::from_fn(|j| &q[(j * M + i) * n..][..n]);
                let outs: [_; SIDE] = runs_mut(h, std::array::from_fn(|b| (b * M + i) * n), n);
                flat_adjoint(ins, outs);
            }
            for b in 0..SIDE {
                let ins: [&[f32]; M] = std::array::from_fn(|i| &h[(b * M + i) * n..][..n]);
                let starts = std::array::from_fn(|a| (a * SIDE + b) * plane_stride + t0);
                flat_adjoint(ins, runs_mut::<SIDE>(dm, starts, n));
            }
        }
        if f4 {
            run::<4, 6>(dy, ho, wo, [th, tw], dm, plane_stride, t0, s)
        } else {
            run::<2, 4>(dy, ho, wo, [th, tw], dm, plane_stride, t0, s)
        }
    }
}

dispatched! {
    /// `Gᵀ dU G` for `cols` kernels: `du[ξ · plane + at + c]` is value ξ of kernel `c`;
    /// writes tap `i · 3 + j` of kernel `c` to `out[(i · 3 + j) · cols + c]`; `right` is
    /// scratch of `18 · cols` floats.
    fn filter_adjoint(
        du: &[f32],
        plane: usize,
        at: usize,
        cols: usize,
        f4: bool,
        right: &mut [f32],
        out: &mut [f32],
    ) {
        let tile = if f4 { Tile::F4 } else { Tile::F2 };
        let side = tile.m() + 2;
        // Column i of G is G e_i.
        let gcol: [[f32; 6]; 3] = std::array::from_fn(|i| {
            let mut e = [0.0f32; 3];
            e[i] = 1.0;
            tile.filter(e)
        });
        // (dU G)[a][j] = Σ_b dU[a][b] G[b][j], then dW[i][j] = Σ_a G[a][i] (dU G)[a][j].
        right[..side * 3 * cols].fill(0.0);
        for a in 0..side {
            for j in 0..3 {
                let dst = &mut right[(a * 3 + j) * cols..][..cols];
                for b in 0..side {
                    let coef = gcol[j][b];
                    if coef == 0.0 {
                        continue;
                    }
                    let src = &du[(a * side + b) * plane + at..][..cols];
                    dst.iter_mut().zip(src).for_each(|(d, &v)| *d += coef * v);
                }
            }
        }
        out[..9 * cols].fill(0.0);
        for i in 0..3 {
            for j in 0..3 {
                let dst = &mut out[(i * 3 + j) * cols..][..cols];
                for a in 0..side {
                    let coef = gcol[i][a];
                    if coef == 0.0 {
                        continue;
                    }
                    let src = &right[(a * 3 + j) * cols..][..cols];
                    dst.iter_mut().zip(src).for_each(|(d, &v)| *d += coef * v);
                }
            }
        }
    }
}

/// The weight gradient of the convolution [`forward_act`] computes, through the same
/// algorithm: with `V = Bᵀ d B` (the forward's input transform) and `dM = A dY Aᵀ` (the
/// adjoint of its output transform) for every tile, `dU[ξ] (C_out x C_in) = Σ_tiles dM[ξ] ·
/// V[ξ]ᵀ`, one GEMM per ξ over the tiles of a group of images, and `dW = Gᵀ dU G`. The
/// identity `Y = Aᵀ [U ⊙ V] A` is exact, so this is the direct method's `dW` up to rounding,
/// with F(4x4, 3x3)'s 36 products per 16 positions instead of 144.
///
/// Images are split into one part per thread, each part's `dU` summed in part order: the
/// same thread count gives the same bits.
pub fn weight_grad(x: &[f32], dy: &[f32], g: &ConvGeom, tile: Tile) -> Vec<f32> {
    assert!(
        g.precision == super::Precision::Fp32,
        "the Winograd weight gradient runs in f32 only"
    );
    let (cin, cout, h, w) = (g.cin, g.cout, g.h, g.w);
    let (ho, wo) = (g.ho(), g.wo());
    let tw = wo.div_ceil(tile.m());
    let xis = tile.xis();
    let (in_len, out_len) = (cin * h * w, cout * ho * wo);
    assert_eq!(x.len(), g.batch * in_len, "winograd input length");
    assert_eq!(
        dy.len(),
        g.batch * out_len,
        "winograd output gradient length"
    );
    let parts = rayon::current_num_threads().clamp(1, g.batch.max(1));
    let per = g.batch.div_ceil(parts).max(1);
    let bands = Bands::new(tile, g);
    let partial: Vec<Vec<f32>> = (0..g.batch.div_ceil(per))
        .into_par_iter()
        .map(|p| {
            let images = p * per..((p + 1) * per).min(g.batch);
            let (xb, dyb) = (
                &x[images.start * in_len..images.end * in_len],
                &dy[images.start * out_len..images.end * out_len],
            );
            let mut du = vec![0.0f32; xis * cout * cin];
            let mut v = vec![0.0f32; xis * cin * bands.max_tiles()];
            let mut dm = vec![0.0f32; xis * cout * bands.max_tiles()];
            let mut scratch = vec![
                0.0f32;
                scratch_len(tile, bands.rows, tw)
                    .max(dy_scratch_len(tile, bands.rows, tw))
            ];
            for (bi, b) in bands.blocks(images.len()).enumerate() {
                let t_all = b.count * b.tiles(tw);
                bands.transform_input(xb, b, &mut v, &mut scratch);
                let y0 = tile.m() * b.ty0;
                for i in 0..b.count {
                    let dyn_ = &dyb[(b.first + i) * out_len..][..out_len];
                    for o in 0..cout {
                        dy_transform_fast(
                            tile == Tile::F4,
                            &dyn_[o * ho * wo + y0 * wo..(o + 1) * ho * wo],
                            ho - y0,
                            wo,
                            b.rows,
                            tw,
                            &mut dm[o * t_all..],
                            cout * t_all,
                            i * b.tiles(tw),
                            &mut scratch,
                        );
                    }
                }
                for xi in 0..xis {
                    super::gemm::gemm_f32(
                        cout,
                        cin,
                        t_all,
                        &mut du[xi * cout * cin..],
                        cin,
                        bi > 0,
                        &dm[xi * cout * t_all..],
                        t_all,
                        1,
                        &v[xi * cin * t_all..],
                        1,
                        t_all,
                        1,
                    );
                }
            }
            du
        })
        .collect();
    let du = super::gemm::sum_in_order(partial.iter());
    // dW = Gᵀ dU G, one output channel at a time, as runs over the input channels (`dU`'s
    // rows are contiguous in `c`; kernel by kernel, each value was 36 loads `C_out · C_in`
    // floats apart and 324 scalar products, 30% of the 128 -> 128 16 px weight gradient).
    let mut dw = vec![0.0f32; cout * cin * 9];
    dw.par_chunks_mut(cin * 9)
        .enumerate()
        .for_each_init(Vec::new, |scratch, (o, row)| {
            scratch.resize(27 * cin, 0.0);
            let (t, right) = scratch.split_at_mut(9 * cin);
            filter_adjoint(&du, cout * cin, o * cin, cin, tile == Tile::F4, right, t);
            for (c, k) in row.chunks_exact_mut(9).enumerate() {
                for (ij, v) in k.iter_mut().enumerate() {
                    *v = t[ij * cin + c];
                }
            }
        });
    dw
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every tile's six columns land where `at` says, for rows of whole blocks of four tiles,
    /// of a ragged tail, and of fewer than four tiles; nothing else of `q` is written.
    #[test]
    fn tile_columns_are_the_definition() {
        for tw in 0..=13 {
            let padded: Vec<f32> = (0..4 * tw + 4).map(|i| i as f32 + 0.5).collect();
            let at: [usize; 6] = std::array::from_fn(|j| 3 + j * (tw + 2));
            let mut q = vec![-1.0; 6 * (tw + 2) + 3];
            tile_columns4(&padded, tw, &mut q, at);
            let mut want = vec![-1.0; q.len()];
            for (j, &a) in at.iter().enumerate() {
                for t in 0..tw {
                    want[a + t] = padded[4 * t + j];
                }
            }
            assert_eq!(q, want, "{tw} tiles");
        }
    }
    use crate::kernels::conv::{im2col_backward, im2col_forward, test_data as data};

    /// Every tile's `Bᵀ d B`, one tile at a time as the definition reads (rows, then columns,
    /// the same operations in the same order as the flat loops): their bits, both variants,
    /// rows of 1 to 13 tiles, padding 0-2 left and above, tiles past the plane's bottom and
    /// right; `v` outside the tiles' runs keeps its marker.
    #[test]
    fn input_transforms_are_the_tilewise_definition() {
        fn b2([d0, d1, d2, d3]: [f32; 4]) -> [f32; 4] {
            [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
        }
        for f4 in [false, true] {
            let (m, side) = if f4 { (4, 6) } else { (2, 4) };
            for (th, tw, h, w, pad, pad_top) in [
                (1, 1, 3, 3, 1, 1),
                (2, 3, 5, 6, 1, 0),
                (3, 4, 7, 9, 2, 2),
                (2, 5, 9, 11, 0, 1),
                (3, 8, 12, 30, 1, 1),
                (1, 13, 4, 50, 2, 0),
            ] {
                let plane = data(h * w, 9);
                let at = |r: usize, c: usize| match (r.checked_sub(pad_top), c.checked_sub(pad)) {
                    (Some(y), Some(x)) if y < h && x < w => plane[y * w + x],
                    _ => 0.0,
                };
                let (n, t0) = (th * tw, 2);
                let ps = n + 3;
                let mut got = vec![-9.0; side * side * ps];
                let mut want = got.clone();
                let tile = if f4 { Tile::F4 } else { Tile::F2 };
                let mut scratch = vec![1.0; scratch_len(tile, th, tw)];
                let args = (h, w, pad, pad_top, th, tw);
                type Transform = fn(
                    &[f32],
                    usize,
                    usize,
                    usize,
                    usize,
                    usize,
                    usize,
                    &mut [f32],
                    usize,
                    usize,
                    &mut [f32],
                );
                let run: Transform = if f4 {
                    input_transform4
                } else {
                    input_transform
                };
                run(
                    &plane,
                    h,
                    w,
                    pad,
                    pad_top,
                    th,
                    tw,
                    &mut got,
                    ps,
                    t0,
                    &mut scratch,
                );
                // `Bᵀ` of `side` values.
                let bt = |d: &dyn Fn(usize) -> f32| -> Vec<f32> {
                    match f4 {
                        true => b4(std::array::from_fn(d)).to_vec(),
                        false => b2(std::array::from_fn(d)).to_vec(),
                    }
                };
                for ty in 0..th {
                    for tx in 0..tw {
                        let rows: Vec<Vec<f32>> = (0..side)
                            .map(|i| bt(&|j| at(m * ty + i, m * tx + j)))
                            .collect();
                        for b in 0..side {
                            for (a, v) in bt(&|i| rows[i][b]).into_iter().enumerate() {
                                want[(a * side + b) * ps + t0 + ty * tw + tx] = v;
                            }
                        }
                    }
                }
                assert_eq!(got, want, "F{m} {args:?}");
            }
        }
    }

    /// Every F(4x4) tile's `Aᵀ m A` + bias, one tile at a time as the definition reads (the
    /// same operations in the same order as the flat loops): their bits, rows of 1 to 13
    /// tiles (whole and ragged groups of four for the transposes), outputs cut at the bottom
    /// and right; nothing past the plane is written.
    #[test]
    fn output_transform4_is_the_tilewise_definition() {
        for (th, tw, cut) in [
            (1, 1, 1),
            (2, 3, 0),
            (2, 4, 2),
            (3, 5, 3),
            (2, 8, 1),
            (2, 13, 0),
        ] {
            let (ho, wo) = (4 * th - cut.min(3), 4 * tw - cut);
            let (n, t0) = (th * tw, 1);
            let ps = n + 2;
            let m = data(36 * ps, 11);
            let bias = 0.25;
            let mut got = vec![-5.0; ho * wo + 7];
            let mut want = got.clone();
            let mut scratch = vec![1.0; scratch_len(Tile::F4, th, tw)];
            output_transform4(
                &m,
                ps,
                t0,
                th,
                tw,
                ho,
                wo,
                bias,
                &mut got[..ho * wo],
                &mut scratch,
            );
            for ty in 0..th {
                for tx in 0..tw {
                    let at = |xi: usize| m[xi * ps + t0 + ty * tw + tx];
                    let cols: [[f32; 4]; 6] =
                        std::array::from_fn(|b| a4(std::array::from_fn(|a| at(6 * a + b))));
                    let rows: [[f32; 4]; 4] =
                        std::array::from_fn(|i| a4(std::array::from_fn(|b| cols[b][i])));
                    for (i, row) in rows.into_iter().enumerate() {
                        for (k, v) in row.into_iter().enumerate() {
                            let (oy, ox) = (4 * ty + i, 4 * tx + k);
                            if oy < ho && ox < wo {
                                want[oy * wo + ox] = v + bias;
                            }
                        }
                    }
                }
            }
            assert_eq!(got, want, "{th}x{tw} tiles, {ho}x{wo}");
        }
    }

    /// Every block's `A dY Aᵀ`, one tile at a time as the definition reads (rows, then
    /// columns, the same operations in the same order): the flat transform's bits, for rows
    /// of 1 to 13 tiles (whole and ragged blocks of four for the shuffles), gradients cut
    /// short of the tiles at the bottom and right, both variants; `dm` outside the tiles'
    /// runs keeps its marker.
    #[test]
    fn dy_transform_is_the_blockwise_definition() {
        fn blockwise<const M: usize>(
            dy: &[f32],
            [ho, wo, th, tw]: [usize; 4],
            dm: &mut [f32],
            ps: usize,
            t0: usize,
        ) {
            let at = |y: usize, x: usize| {
                if y < ho && x < wo {
                    dy[y * wo + x]
                } else {
                    0.0
                }
            };
            for ty in 0..th {
                for tx in 0..tw {
                    let rows: [[f32; 6]; M] = std::array::from_fn(|i| {
                        a_adjoint::<M>(std::array::from_fn(|j| at(M * ty + i, M * tx + j)))
                    });
                    for b in 0..M + 2 {
                        let col = a_adjoint::<M>(std::array::from_fn(|i| rows[i][b]));
                        for a in 0..M + 2 {
                            dm[(a * (M + 2) + b) * ps + t0 + ty * tw + tx] = col[a];
                        }
                    }
                }
            }
        }
        for f4 in [false, true] {
            let m = if f4 { 4 } else { 2 };
            for (tw, th, cut) in [
                (1, 1, 0),
                (3, 2, 1),
                (4, 3, 0),
                (5, 2, 3),
                (8, 4, 2),
                (13, 3, 1),
            ] {
                let (ho, wo) = (m * th - cut.min(m - 1), m * tw - cut);
                let dy = data(ho * wo, 7);
                let (n, t0) = (th * tw, 3);
                let ps = n + 5;
                let side = m + 2;
                let mut got = vec![-7.0; side * side * ps];
                let mut want = got.clone();
                let mut scratch =
                    vec![1.0; dy_scratch_len(if f4 { Tile::F4 } else { Tile::F2 }, th, tw)];
                dy_transform(f4, &dy, ho, wo, th, tw, &mut got, ps, t0, &mut scratch);
                let dims = [ho, wo, th, tw];
                if f4 {
                    blockwise::<4>(&dy, dims, &mut want, ps, t0);
                } else {
                    blockwise::<2>(&dy, dims, &mut want, ps, t0);
                }
                assert_eq!(got, want, "F{m} {th}x{tw} tiles, {ho}x{wo}");
            }
        }
    }

    fn geom(batch: usize, cin: usize, cout: usize, h: usize, w: usize, pad: usize) -> ConvGeom {
        ConvGeom {
            batch,
            cin,
            h,
            w,
            cout,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            pad: [pad, pad],
            precision: crate::kernels::Precision::Fp32,
        }
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (a, e)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - e).abs() < 1e-4 * (1.0 + e.abs()),
                "{what}[{i}]: {a} vs {e}"
            );
        }
    }

    /// Forward and input gradient against the im2col kernel (itself tested against the
    /// definition), both variants, over odd and even sizes (F(4x4, 3x3)'s tiles cut off one
    /// to three outputs), every padding, tiles spanning image groups.
    #[test]
    fn matches_im2col_forward_and_input_gradient() {
        for tile in [Tile::F2, Tile::F4] {
            for g in [
                geom(3, 16, 16, 8, 8, 1),
                geom(2, 17, 19, 7, 9, 1),
                geom(5, 16, 18, 5, 6, 0),
                geom(2, 16, 16, 3, 4, 2),
                geom(40, 16, 16, 2, 2, 1),
                geom(1, 20, 16, 1, 1, 1),
                geom(2, 32, 40, 8, 8, 1),
                geom(2, 8, 8, 13, 11, 1),
                geom(3, 8, 9, 10, 14, 2),
            ] {
                // `forward` is exact for every size; `applies` only says where it is faster.
                let x = data(g.batch * g.cin * g.h * g.w, 1);
                let w = data(g.cout * g.cin * 9, 2);
                let b = data(g.cout, 3);
                let u = transform_weights(&w, g.cout, g.cin, false, tile);
                close(
                    &forward_act(&x, &u, Some(&b), &g, false, tile),
                    &im2col_forward(&x, &w, Some(&b), &g),
                    &format!("forward {tile:?} {g:?}"),
                );
                let dy = data(g.batch * g.cout * g.ho() * g.wo(), 4);
                let gi = g.input_grad();
                let ut = transform_weights(&w, g.cout, g.cin, true, tile);
                let want = im2col_backward(&x, &w, &dy, &g, [true, false, false])
                    .0
                    .unwrap();
                close(
                    &forward_act(&dy, &ut, None, &gi, false, tile),
                    &want,
                    &format!("dx {tile:?} {g:?}"),
                );
            }
        }
    }

    /// Fewer images than threads ([`forward_few`]: each image on all threads) give the bits
    /// of the batched path (one thread), with bias and ReLU, banded images included, f32 and
    /// bf16 (where the CPU has it), and match im2col.
    #[test]
    fn few_images_on_many_threads_are_the_batched_bits() {
        use super::super::conv::on_threads;
        let mut precisions = vec![super::super::Precision::Fp32];
        if super::super::bf16::available() {
            precisions.push(super::super::Precision::Bf16);
        }
        for precision in precisions {
            for tile in [Tile::F2, Tile::F4] {
                if tile == Tile::F4 && precision == super::super::Precision::Bf16 {
                    continue;
                }
                for g in [
                    geom(1, 16, 16, 8, 8, 1),
                    geom(3, 17, 19, 7, 9, 1),
                    geom(1, 4, 4, 40, 36, 1),
                    geom(2, 16, 16, 3, 4, 2),
                ] {
                    let g = ConvGeom { precision, ..g };
                    // The third image is cut into bands.
                    assert!(Bands::new(tile, &geom(1, 4, 4, 40, 36, 1)).rows < 9);
                    let x = data(g.batch * g.cin * g.h * g.w, 5);
                    let w = data(g.cout * g.cin * 9, 6);
                    let b = data(g.cout, 7);
                    let u = transform_weights(&w, g.cout, g.cin, false, tile);
                    for relu in [false, true] {
                        let run =
                            |t| on_threads(t, || forward_act(&x, &u, Some(&b), &g, relu, tile));
                        let (batched, few) = (run(1), run(4));
                        assert!(
                            batched
                                .iter()
                                .zip(&few)
                                .all(|(a, b)| a.to_bits() == b.to_bits()),
                            "{tile:?} {g:?} relu {relu}"
                        );
                        if precision == super::super::Precision::Fp32 && !relu {
                            close(&few, &im2col_forward(&x, &w, Some(&b), &g), "few vs im2col");
                        }
                    }
                }
            }
        }
    }

    /// The weight gradient through both variants against im2col's (tested against the
    /// definition), over odd sizes, every padding, groups of images; the same bits from two
    /// runs on the same thread count.
    #[test]
    fn weight_gradient_matches_im2col() {
        for tile in [Tile::F2, Tile::F4] {
            for g in [
                geom(3, 16, 16, 8, 8, 1),
                geom(2, 17, 19, 7, 9, 1),
                geom(5, 16, 18, 5, 6, 0),
                geom(2, 16, 16, 3, 4, 2),
                geom(40, 16, 16, 2, 2, 1),
                geom(3, 8, 9, 10, 14, 2),
            ] {
                let x = data(g.batch * g.cin * g.h * g.w, 1);
                let w = data(g.cout * g.cin * 9, 2);
                let dy = data(g.batch * g.cout * g.ho() * g.wo(), 4);
                let want = im2col_backward(&x, &w, &dy, &g, [false, true, false])
                    .1
                    .unwrap();
                let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
                let got = weight_grad(&x, &dy, &g, tile);
                assert_eq!(got.len(), want.len());
                for (i, (a, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a - e).abs() < 1e-4 * scale,
                        "dW {tile:?} {g:?}[{i}]: {a} vs {e}"
                    );
                }
                let run = |threads| {
                    crate::kernels::conv::on_threads(threads, || weight_grad(&x, &dy, &g, tile))
                };
                assert_eq!(run(2), run(2), "{tile:?} {g:?}");
            }
        }
    }

    /// Where the vector transforms run: a unit the CPU has, or the vector bodies on emulated
    /// 16- and 8-lane vectors (so both widths' logic is tested on any CPU).
    #[derive(Clone, Copy, Debug)]
    enum Lanes {
        Unit(Unit),
        Emu16,
        Emu8,
    }

    /// Calls `simd::$name` on a unit, or its generic body `simd::$generic` on an emulation.
    macro_rules! on_lanes {
        ($lanes:expr, $name:ident / $generic:ident $(<$l:ty>)?, $($arg:expr),* $(,)?) => {{
            use super::super::vector::Emu;
            use super::super::winograd_simd as simd;
            match $lanes {
                // SAFETY: the unit is one the CPU has (`Unit::present`).
                Lanes::Unit(u) => unsafe { simd::$name(u, $($arg),*) },
                // SAFETY: an emulation runs on any CPU.
                Lanes::Emu16 => unsafe { simd::$generic::<Emu<16> $(, $l)?>($($arg),*) },
                // SAFETY: as above.
                Lanes::Emu8 => unsafe { simd::$generic::<Emu<8> $(, $l)?>($($arg),*) },
            }
        }};
        // F(4x4, 3x3)'s function if `$f4`, else F(2x2, 3x3)'s, on the same arguments.
        ($lanes:expr, $f4:expr; $n4:ident / $g4:ident, $n2:ident / $g2:ident $(<$l:ty>)?, $($arg:expr),* $(,)?) => {
            if $f4 {
                on_lanes!($lanes, $n4 / $g4, $($arg),*)
            } else {
                on_lanes!($lanes, $n2 / $g2 $(<$l>)?, $($arg),*)
            }
        };
    }

    /// The vector transforms give the portable loops' bits, on every unit the CPU has and on
    /// both widths emulated: both variants, whole planes and bands (no padding above, rows
    /// cut), rows of 1 to 18 tiles (one vector of tiles spanning rows, and rows longer than a
    /// vector), every padding, f32 and bf16 planes, and write nothing else: `v`, `y` and `dm`
    /// start filled with a marker that must survive outside the outputs.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn simd_transforms_are_the_portable_bits() {
        let units = Unit::present().into_iter().map(Lanes::Unit);
        for lanes in units.chain([Lanes::Emu16, Lanes::Emu8]) {
            transforms_are_the_portable_bits_on(lanes);
        }
    }

    fn transforms_are_the_portable_bits_on(lanes: Lanes) {
        let same = |got: &[f32], want: &[f32], what: &str| {
            let first = got
                .iter()
                .zip(want)
                .position(|(a, b)| a.to_bits() != b.to_bits());
            if let Some(i) = first {
                panic!("{what}[{i}]: {} vs {}", got[i], want[i]);
            }
        };
        // (h, w, pad, pad_top, th, tw): the plane and the tiles a call covers.
        for tile in [Tile::F2, Tile::F4] {
            let (f4, xis, m) = (tile == Tile::F4, tile.xis(), tile.m());
            for (h, w, pad, pad_top, th, tw) in [
                (32, 32, 1, 1, 8, 8),
                (16, 16, 1, 1, 4, 4),
                (13, 19, 1, 1, 4, 5),
                (18, 18, 0, 0, 4, 4),
                (10, 10, 2, 2, 3, 3),
                (9, 30, 1, 0, 2, 8),
                (6, 70, 1, 1, 2, 18),
                (1, 1, 1, 1, 1, 1),
                (5, 7, 1, 0, 3, 2),
                (14, 14, 1, 1, 7, 7),
                (5, 4, 1, 1, 3, 3),
            ] {
                let what = format!("{lanes:?} {tile:?} {:?}", (h, w, pad, pad_top, th, tw));
                let n = th * tw;
                let (t0, stride) = (3, 3 + n + 5);
                let plane = data(h * w, 7);
                let marker = f32::from_bits(0x7fc0_1234);
                let (mut want, mut got) = (vec![marker; xis * stride], vec![marker; xis * stride]);
                let mut scratch = vec![0.0; scratch_len(tile, th, tw)];
                let input = if f4 {
                    input_transform4::<f32>
                } else {
                    input_transform::<f32>
                };
                input(
                    &plane,
                    h,
                    w,
                    pad,
                    pad_top,
                    th,
                    tw,
                    &mut want,
                    stride,
                    t0,
                    &mut scratch,
                );
                on_lanes!(lanes, f4; input4 / input4_v, input2 / input2_v<_>, &plane, h, w, pad, pad_top, th, tw, &mut got, stride, t0, &mut scratch);
                same(&got, &want, &format!("input transform {what}"));
                if !f4 {
                    // bf16 planes (F(2x2, 3x3) on bf16 activations), widened as they load.
                    use crate::kernels::act::bf16;
                    let halves: Vec<bf16> = plane.iter().map(|&x| bf16::from_f32(x)).collect();
                    let words: Vec<u16> = halves.iter().map(|b| b.to_bits()).collect();
                    input_transform(
                        &halves,
                        h,
                        w,
                        pad,
                        pad_top,
                        th,
                        tw,
                        &mut want,
                        stride,
                        t0,
                        &mut scratch,
                    );
                    on_lanes!(lanes, input2 / input2_v<_>, &words, h, w, pad, pad_top, th, tw, &mut got, stride, t0, &mut scratch);
                    same(&got, &want, &format!("bf16 input transform {what}"));
                }

                // The output transform of those tiles into `ho x wo` (cut at the plane's
                // edge), and the output gradient's transform from such a plane.
                let mt = data(xis * stride, 8);
                let (ho, wo) = ((m * th).min(h + 2), (m * tw).min(w + 1));
                let (mut want, mut got) = (vec![marker; ho * wo + 4], vec![marker; ho * wo + 4]);
                let output = if f4 {
                    output_transform4
                } else {
                    output_transform
                };
                output(
                    &mt,
                    stride,
                    t0,
                    th,
                    tw,
                    ho,
                    wo,
                    0.25,
                    &mut want,
                    &mut scratch,
                );
                on_lanes!(lanes, f4; output4 / output4_v, output2 / output2_v, &mt, stride, t0, th, tw, ho, wo, 0.25, &mut got, &mut scratch);
                same(&got, &want, &format!("output transform {what}"));

                // Zeros in both column phases: `-0.0` and `0.0` are different bits.
                let mut dy = data(ho * wo, 9);
                dy[..2.min(ho * wo)].fill(0.0);
                let (mut want, mut got) = (vec![marker; xis * stride], vec![marker; xis * stride]);
                let mut scratch = vec![0.0; dy_scratch_len(tile, th, tw)];
                dy_transform(f4, &dy, ho, wo, th, tw, &mut want, stride, t0, &mut scratch);
                on_lanes!(lanes, f4; dy4 / dy4_v, dy2 / dy2_v, &dy, ho, wo, th, tw, &mut got, stride, t0, &mut scratch);
                same(&got, &want, &format!("output gradient transform {what}"));
            }
        }
    }

    /// In bf16 the GEMMs multiply rounded transformed operands: the result stays within
    /// bf16 rounding of the f32 convolution, as the im2col bf16 path does.
    #[test]
    fn bf16_stays_within_rounding_of_f32() {
        use crate::kernels::{Precision, bf16};
        if !bf16::available() {
            return;
        }
        let g = geom(3, 32, 40, 9, 9, 1);
        let g16 = ConvGeom {
            precision: Precision::Bf16,
            ..g
        };
        let x = data(g.batch * g.cin * g.h * g.w, 1);
        let w = data(g.cout * g.cin * 9, 2);
        let u = transform_weights(&w, g.cout, g.cin, false, Tile::F2);
        let exact = im2col_forward(&x, &w, None, &g);
        let scale = exact.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let err = |got: &[f32]| {
            got.iter()
                .zip(&exact)
                .fold(0.0f32, |m, (a, e)| m.max((a - e).abs()))
                / scale
        };
        let wino = err(&forward(&x, &u, None, &g16, Tile::F2));
        let im2col = err(&im2col_forward(&x, &w, None, &g16));
        assert!(wino > 0.0 && wino < 2e-2, "winograd bf16 error {wino}");
        assert!(
            wino < 4.0 * im2col.max(1e-3),
            "winograd {wino} vs im2col {im2col}"
        );
    }

    #[test]
    fn applies_only_where_it_is_exact_and_worth_it() {
        assert!(!applies(&geom(1, 3, 64, 32, 32, 1)), "RGB first layer");
        assert!(!applies(&geom(1, 16, 16, 32, 32, 1)), "narrow");
        assert!(!applies(&geom(1, 128, 128, 4, 4, 1)), "tiny map");
        assert!(!applies(&ConvGeom {
            stride: [2, 2],
            ..geom(1, 64, 64, 8, 8, 1)
        }));
        assert!(!applies(&ConvGeom {
            kh: 5,
            kw: 5,
            ..geom(1, 64, 64, 8, 8, 1)
        }));
        assert!(applies(&geom(1, 64, 64, 8, 8, 1)));
        // 32-channel layers go to the direct kernels where those take them: in bf16, and in
        // f32 with the AVX-512 tiles.
        let direct = |g: &ConvGeom| super::super::direct::applies(g);
        assert_eq!(
            applies(&geom(1, 32, 32, 16, 16, 1)),
            !(direct(&geom(1, 32, 32, 16, 16, 1)) && super::super::direct::wide())
        );
        let bf16 = |g: ConvGeom| ConvGeom {
            precision: crate::kernels::Precision::Bf16,
            ..g
        };
        // (On AMX, bf16 takes neither: the tiles' implicit GEMM runs it, the plan's rule.)
        let amx = super::super::amx::enabled();
        assert_eq!(
            applies(&bf16(geom(1, 32, 32, 16, 16, 1))),
            !amx && !super::super::direct::applies(&bf16(geom(1, 32, 32, 16, 16, 1)))
        );
        assert_eq!(
            applies(&bf16(geom(1, 32, 32, 8, 8, 1))),
            !amx,
            "too narrow for direct"
        );
        // On AMX the tiles' implicit GEMM takes whole tiles of channels instead.
        assert_eq!(applies(&bf16(geom(1, 64, 64, 16, 16, 1))), !amx);
    }
}
