//! Direct convolutions in bf16 (AVX512-BF16) that read images in place: no im2col buffer, no
//! packed `B` panels. The forward pass (any stride) on channels-last copies of the images.
//!
//! Each image is copied once into a zero-padded channels-last buffer of bf16 channel pairs
//! (`[H_p, W_p, C_in / 2]` words, [`super::bf16::pair`]). Output position `q` of tap `(i, j)`
//! then reads the `C_in / 2` consecutive words at `base(q) + (i·W_p + j)·C_in/2`, so the
//! convolution is a GEMM `Y[q][o] = Σ_{tap, c} X[q][tap, c] · W[tap, c][o]` whose left operand
//! is read in place (the indirect convolution of Dukhan 2019, "The Indirect Convolution
//! Algorithm", with one base pointer per output position and one offset per tap). The register
//! tile is the bf16 GEMM's ([`super::bf16`]): 6 output positions x 64 output channels, one
//! broadcast channel pair per position and four weight vectors per step, `VDPBF16PS` summing
//! in f32; every tap and channel of a tile is summed in registers before one store.
//!
//! The weight gradient ([`weight_grad`]; strided layers by phase planes) reads its left operand
//! in place too, from the padded image kept NCHW: along each output row, positions `q` and
//! `q + 1` read neighbouring inputs for every tap, so one 32-bit load is the position pair
//! `VDPBF16PS` multiplies with `(dY[q], dY[q + 1])` of 16 output channels.
//!
//! Which layers use which kernel is the plan's call ([`super::plan`], measured there).
//!
//! This is the layout oneDNN's bf16 convolutions use (channels-last activations). Against
//! im2col + the bf16 GEMM it skips the `K x N` column matrix (9x the image for a 3x3), its
//! f32 -> bf16 packing per panel and the narrow panels of an `N` that is not a multiple of
//! 64 (490 columns for ten 7x7 maps); against Winograd it does 2.25x the multiplies but no
//! transforms.
//!
//! # Shapes
//! `x: [B, C_in, H, W]`, `w: [C_out, C_in, kh, kw]`, `bias: [C_out]`,
//! `y: [B, C_out, H_out, W_out]` (NCHW at the boundary, as everywhere in [`super::conv`]);
//! `C_in` even and `C_out` a multiple of 16 ([`fits`]).

use super::act::Act;
use super::bf16::{pair, pair_of};
use super::buf::{par_zeroed, par_zeroed_parts, par_zeroed_with};
use super::conv::{ConvGeom, image_blocks};

/// Output positions per register tile.
const TILE: usize = 6;
/// Output channels per weight block: four 16-lane vectors (the last block may be narrower).
pub(super) const BLOCK: usize = 64;
const LANES: usize = 16;
/// Padded channels-last words per group of images convolved together (4 MiB): every weight
/// block sweeps a group, so at small maps, where the weights outweigh the images, a larger
/// group re-reads them less. 1 Mi words against 64 Ki (resnet18 at 128 px, batch 32,
/// 2 threads, Zen 4, `conv_layers 2 bf16 resnet18 128 32`): forward of the 4 px 512 -> 512
/// layer 10.0 -> 8.0 ms, the 8 px 256 -> 512 stride-2 one 5.3 -> 4.3 ms.
#[cfg(not(test))]
pub(super) const GROUP_WORDS: usize = 1 << 20;
#[cfg(test)]
pub(super) const GROUP_WORDS: usize = 256;

/// Whether the kernel computes `g`: channel pairs and whole vectors of output channels.
pub fn fits(g: &ConvGeom) -> bool {
    g.cin.is_multiple_of(2) && g.cout.is_multiple_of(LANES) && g.cin >= 16
}

/// Padded channels-last geometry of one image: `(H_p, W_p, C_in / 2)`.
pub(super) fn padded(g: &ConvGeom) -> (usize, usize, usize) {
    (g.h + 2 * g.pad[0], g.w + 2 * g.pad[1], g.cin / 2)
}

/// The weights as `[C_out / 64 blocks][taps][C_in / 2][width]` pair words, `width` 64 except
/// for a narrower last block: block `o0`'s word `(t, p, o)` is `(w[o0 + o][2p][t],
/// w[o0 + o][2p + 1][t])`.
///
/// Each run of 16 output channels is rounded into 16 rows of `taps · C_in / 2` pairs (read in
/// the order `w` is stored), then transposed 16 x 16 in registers into its 16 columns of the
/// block. Writing each half-word straight to its place (256 bytes after the one before) was a
/// third of the 4 px 512 -> 512 layer's forward samples (Zen 4, bf16, 128 px).
pub(super) fn pack_weights(w: &[f32], g: &ConvGeom) -> super::buf::Lines<u32> {
    use rayon::prelude::*;
    let (taps, kp) = (g.kh * g.kw, g.cin / 2);
    let words = taps * kp;
    let mut out = super::buf::Lines::zeroed(g.cout * words);
    // One block per task (4.7 MB of weights for 512 -> 512 3x3, a third of the layer's time
    // at 4 px when one thread packed them).
    out.par_chunks_mut(BLOCK * words)
        .zip(w.par_chunks(BLOCK * g.cin * taps))
        .for_each(|(block, wb)| {
            let width = wb.len() / (g.cin * taps);
            let mut rows = vec![0u32; LANES.min(width) * words];
            for o0 in (0..width).step_by(LANES) {
                let n = LANES.min(width - o0);
                let rows = &mut rows[..n * words];
                for (wo, row) in wb[o0 * g.cin * taps..]
                    .chunks_exact(g.cin * taps)
                    .zip(rows.chunks_exact_mut(words))
                {
                    pack_weight_row(wo, taps, row);
                }
                super::simd::transpose_words_into(rows, n, words, &mut block[o0..], width);
            }
        });
    out
}

/// One output channel's weights `wo` (`[C_in, taps]`) as `row[t·C_in/2 + p] = pair(wo[2p, t],
/// wo[2p + 1, t])`: tap-major rows of channel pairs.
fn pack_weight_row(wo: &[f32], taps: usize, row: &mut [u32]) {
    let kp = row.len() / taps.max(1);
    assert!(
        wo.len() == 2 * kp * taps && row.len() == taps * kp,
        "weights row"
    );
    #[cfg(target_arch = "x86_64")]
    if super::bf16::available() && kp.is_multiple_of(16) && i32::try_from(wo.len()).is_ok() {
        // SAFETY: AVX-512 F and BF16 detected; the lengths are checked above, `C_in` a
        // multiple of 32 and every index below `i32::MAX`.
        unsafe { pack_weight_row_avx512(wo, taps, row) };
        return;
    }
    for (p, wc) in wo.chunks_exact(2 * taps).enumerate() {
        let (lo, hi) = wc.split_at(taps);
        for t in 0..taps {
            row[t * kp + p] = pair(lo[t], hi[t]);
        }
    }
}

/// [`pack_weight_row`] 32 channels at a time: each tap's 32 values gathered (`taps` floats apart)
/// and rounded into 16 pairs by one `VCVTNE2PS2BF16` (the rounding of [`pair`], except that a
/// denormal weight becomes a zero of its sign, as in [`super::bf16::round_slice`]). With a
/// scalar pair a word, written `C_in / 2` words after the one before, resnet18's 512 -> 512
/// forward at 7 px (batch 32, 2 threads, AMX Xeon) took 2.0-2.5 ms outside the tile products
/// and their stores, mostly packing the kernel; 0.9-1.8 ms with this (three alternated runs,
/// fastest of 10 calls, the products switched off in a throwaway build).
///
/// # Safety
/// The CPU has AVX-512 F and BF16; `wo.len() == 2·kp·taps == 2·row.len()` with `kp` a
/// multiple of 16 and `wo.len()` below `i32::MAX`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_weight_row_avx512(wo: &[f32], taps: usize, row: &mut [u32]) {
    use std::arch::x86_64::*;
    let kp = row.len() / taps;
    let t32 = taps as i32;
    let lanes = super::simd::lanes_times(t32);
    for c0 in (0..2 * kp).step_by(32) {
        for t in 0..taps {
            let idx = _mm512_add_epi32(lanes, _mm512_set1_epi32(c0 as i32 * t32 + t as i32));
            let idx_hi = _mm512_add_epi32(idx, _mm512_set1_epi32(16 * t32));
            // SAFETY: lane `l` reads `wo[(c0 + l)·taps + t]` and `wo[(c0 + 16 + l)·taps + t]`,
            // `c0 + 32 <= 2·kp`, inside `wo`; the store writes `row[t·kp + c0 / 2..][..16]`,
            // inside `row` (`c0 / 2 + 16 <= kp`).
            unsafe {
                let lo = _mm512_i32gather_ps::<4>(idx, wo.as_ptr());
                let hi = _mm512_i32gather_ps::<4>(idx_hi, wo.as_ptr());
                let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
                _mm512_storeu_si512(row.as_mut_ptr().add(t * kp + c0 / 2).cast(), h);
            }
        }
    }
}

/// `count` images of `x` (NCHW f32) into `xq` as zero-padded channels-last bf16 pairs.
///
/// Only the images' own positions are written: the padding words of `xq` must already be
/// zero. The callers allocate `xq` zeroed and reuse it image group after image group, so the
/// padding stays zero; zeroing the whole group buffer (up to 4 MiB) on every call went out
/// to memory ahead of the values, as [`super::buf::par_lazy`] describes.
pub(super) fn pad_pack<E: Act>(x: &[E], count: usize, g: &ConvGeom, xq: &mut [u32]) {
    let (hp, wp, kp) = padded(g);
    let (plane, in_len) = (g.h * g.w, g.in_len());
    #[cfg(target_arch = "x86_64")]
    if super::bf16::available()
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
    {
        assert!(x.len() >= count * in_len && xq.len() >= count * hp * wp * kp);
        let (bits, floats) = (E::as_bf16_bits(x), E::as_f32s(x));
        for n in 0..count {
            for y in 0..g.h {
                let at = ((n * hp + y + g.pad[0]) * wp + g.pad[1]) * kp;
                let from = n * in_len + y * g.w;
                let dst = xq[at..].as_mut_ptr();
                // SAFETY: AVX-512 F, BW, VL and BF16 were detected (`available`); image `n`
                // is inside `x` and its padded row `y + pad` (`W` positions from column
                // `pad`) inside `xq`, both asserted just above.
                unsafe {
                    match (bits, floats) {
                        (Some(b), _) => {
                            pack_row_bits_avx512(b.as_ptr().add(from), plane, g.w, kp, dst)
                        }
                        (None, Some(f)) => {
                            pack_row_avx512(f.as_ptr().add(from), plane, g.w, kp, dst)
                        }
                        (None, None) => unreachable!("an activation is f32 or bf16"),
                    }
                };
            }
        }
        return;
    }
    pad_pack_words(x, count, g, xq);
}

/// [`pad_pack`] word by word with [`pair`]: the definition the vector path is tested against,
/// and the path without AVX512-BF16.
fn pad_pack_words<E: Act>(x: &[E], count: usize, g: &ConvGeom, xq: &mut [u32]) {
    let (hp, wp, kp) = padded(g);
    let (plane, in_len) = (g.h * g.w, g.in_len());
    for n in 0..count {
        let xn = &x[n * in_len..][..in_len];
        for y in 0..g.h {
            for xx in 0..g.w {
                let dst = &mut xq[((n * hp + y + g.pad[0]) * wp + xx + g.pad[1]) * kp..][..kp];
                let at = y * g.w + xx;
                for (p, d) in dst.iter_mut().enumerate() {
                    *d = pair_of(xn[2 * p * plane + at], xn[(2 * p + 1) * plane + at]);
                }
            }
        }
    }
}

/// One row of `W` positions of an image into channels-last pairs: word `(x, p)` at
/// `dst + x·kp + p` is channels `2p, 2p + 1` at `src + x` (channel `c` `plane` floats after
/// channel `c - 1`), rounded with `VCVTNEPS2BF16` ([`pack_blocks`]). The word-by-word loop (a
/// read `plane` floats apart for every value, rounded one at a time) was 10% of the forward
/// kernel's samples in bf16 inference.
///
/// # Safety
/// The CPU has AVX-512 F and BF16; `src + c·plane + x` is readable for `c < 2·kp`, `x < w`,
/// and `dst + x·kp + p` writable for `x < w`, `p < kp`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_row_avx512(src: *const f32, plane: usize, w: usize, kp: usize, dst: *mut u32) {
    use std::arch::x86_64::*;
    // SAFETY: `dst` as the contract says; `half` reads channel `c < 2·kp`, positions
    // `x0..x0 + 16` masked to the row's `w` (readable by the contract).
    unsafe {
        pack_blocks(w, kp, dst, |c, x0, lanes| {
            let v = _mm512_maskz_loadu_ps(lanes, src.add(c * plane + x0));
            std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v))
        })
    }
}

/// [`pack_row_avx512`] of bf16 activations (their bits, `u16` apart): each pair's 16
/// positions are two 16-bit loads interleaved, nothing to round.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `src + c·plane + x` is readable for `c < 2·kp`, `x < w`,
/// and `dst + x·kp + p` writable for `x < w`, `p < kp`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_row_bits_avx512(src: *const u16, plane: usize, w: usize, kp: usize, dst: *mut u32) {
    use std::arch::x86_64::*;
    // SAFETY: as in `pack_row_avx512`.
    unsafe {
        pack_blocks(w, kp, dst, |c, x0, lanes| {
            _mm256_maskz_loadu_epi16(lanes, src.add(c * plane + x0).cast())
        })
    }
}

/// The blocks of 16 positions x 16 pairs of one row: `half(c, x0, lanes)` gives channel `c`'s
/// 16 bf16 values at positions `x0..` (the `lanes` mask of them in the row, the rest zero);
/// two channels' halves make each pair's vector, the 16 vectors are transposed in registers
/// ([`super::simd::transpose16_regs`]) and stored as 16 runs of pairs.
///
/// # Safety
/// The CPU has AVX-512 F; `half` may be called for every `c < 2·kp` and `x0 < w` a multiple of
/// 16; `dst + x·kp + p` is writable for `x < w`, `p < kp`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn pack_blocks(
    w: usize,
    kp: usize,
    dst: *mut u32,
    half: impl Fn(usize, usize, std::arch::x86_64::__mmask16) -> std::arch::x86_64::__m256i,
) {
    use std::arch::x86_64::*;
    for x0 in (0..w).step_by(16) {
        let nx = 16.min(w - x0);
        let lanes: __mmask16 = (1u32 << nx).wrapping_sub(1) as __mmask16;
        for p0 in (0..kp).step_by(16) {
            let np = 16.min(kp - p0);
            // SAFETY: for the whole block, AVX-512 F by the contract; the stores write positions
            // `x0 + i < w`, pairs `p0..p0 + np` (the mask): writable by the contract.
            unsafe {
                let mut r = [_mm512_setzero_si512(); 16];
                for (j, v) in r.iter_mut().enumerate().take(np) {
                    let c = 2 * (p0 + j);
                    let (a, b) = (half(c, x0, lanes), half(c + 1, x0, lanes));
                    *v = _mm512_or_si512(
                        _mm512_cvtepu16_epi32(a),
                        _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b)),
                    );
                }
                super::simd::transpose16_regs(&mut r);
                let pairs: __mmask16 = (1u32 << np).wrapping_sub(1) as __mmask16;
                for (i, v) in r.into_iter().enumerate().take(nx) {
                    _mm512_mask_storeu_epi32(dst.add((x0 + i) * kp + p0).cast(), pairs, v);
                }
            }
        }
    }
}

/// Forward convolution (`y = conv(x, w) + bias`, then `max(·, 0)` when `relu`), products in
/// bf16 and sums in f32.
///
/// # Panics
/// When the CPU has no AVX512-BF16, `g` does not [`fits`], or a slice's length does not match
/// `g`.
pub fn forward_act<E: Act>(
    x: &[E],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<f32> {
    assert!(
        super::bf16::available(),
        "the channels-last bf16 convolution needs AVX512-BF16"
    );
    assert!(fits(g), "channels-last convolution of {g:?}");
    if rounds_itself(g) {
        // Every output written by the tiles' epilogue: no zero fill first.
        return forward_rounded(x, w, bias, g, relu);
    }
    g.assert_forward_lens(x.len(), w.len(), bias.map(<[f32]>::len));
    let wq = pack_weights(w, g);
    // The position classes once per call: every group, block and image shares them.
    let windows = Windows::new(g);
    if g.batch < rayon::current_num_threads() {
        return forward_by_channels(x, &wq, &windows, bias, g, relu);
    }
    let blocks = image_blocks(g.batch);
    let lens: Vec<usize> = blocks.iter().map(|r| r.len() * g.out_len()).collect();
    par_zeroed_parts(&lens, |t, y| {
        by_groups(x, g, blocks[t].clone(), y, g.out_len(), |xq, count, y| {
            product(&wq, &windows, xq, count, g, bias, relu, 0..g.cout, y)
        })
    })
}

/// Images `images` of `x` through `product(xq, count, y)` a group at a time: each group padded
/// and packed into one channels-last buffer (`xq`: `count` images and the AMX kernel's
/// [`super::nhwc_amx::slack`], which its last block of positions reads past the last image),
/// `y` the group's part of `out` (the images' outputs, `out_len` values each).
pub(super) fn by_groups<E: Act, O>(
    x: &[E],
    g: &ConvGeom,
    images: std::ops::Range<usize>,
    out: &mut [O],
    out_len: usize,
    mut product: impl FnMut(&[u32], usize, &mut [O]),
) {
    let (hp, wp, kp) = padded(g);
    let per_image = hp * wp * kp;
    let slack = super::nhwc_amx::slack(g);
    let group = (GROUP_WORDS / per_image.max(1)).clamp(1, images.len().max(1));
    let mut xq = super::buf::Lines::zeroed(group * per_image + slack);
    for first in images.clone().step_by(group) {
        let count = group.min(images.end - first);
        pad_pack(&x[first * g.in_len()..], count, g, &mut xq);
        let at = (first - images.start) * out_len;
        let y = &mut out[at..][..count * out_len];
        product(&xq[..count * per_image + slack], count, y);
    }
}

/// Whether [`forward_rounded`] computes `g` here: the AMX kernel's layers, at least one image
/// per thread.
pub fn rounds_itself(g: &ConvGeom) -> bool {
    super::amx::enabled() && super::nhwc_amx::fits(g) && g.batch >= rayon::current_num_threads()
}

/// [`forward_act`] on the AMX tiles with the output in `O` (bf16: rounded once, by the tile
/// epilogue): no f32 output to zero, write and round again in another pass (the f32 output of
/// resnet18's 64 -> 64 layer at 224 px is 25.7 MB for a batch of 32).
///
/// # Panics
/// Where not [`rounds_itself`], or a slice's length does not match `g`.
pub fn forward_rounded<E: Act, O: Act>(
    x: &[E],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<O> {
    g.assert_forward_lens(x.len(), w.len(), bias.map(<[f32]>::len));
    forward_packed(x, &pack_weights(w, g), bias, g, relu)
}

/// [`forward_rounded`] with the weights already packed (`wq`, as `pack_weights` packs them):
/// the input gradient's rotated kernel is packed straight from the layer's
/// ([`super::nhwc_phases::pack_rotated`]).
///
/// # Panics
/// Where not [`rounds_itself`], or a slice's length does not match `g`.
pub fn forward_packed<E: Act, O: Act>(
    x: &[E],
    wq: &[u32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<O> {
    assert!(rounds_itself(g), "channels-last AMX convolution of {g:?}");
    assert_eq!(x.len(), g.batch * g.in_len(), "conv2d input length");
    assert_eq!(wq.len(), g.cout * g.k() / 2, "packed weights");
    assert!(bias.is_none_or(|b| b.len() == g.cout), "bias length");
    let blocks = image_blocks(g.batch);
    let lens: Vec<usize> = blocks.iter().map(|r| r.len() * g.out_len()).collect();
    // SAFETY: each part is its images' whole output, and the AMX kernel writes every value of
    // the `y` it is given (every output position of every channel of `0..C_out`).
    unsafe {
        super::buf::par_parts_uninit(
            &lens,
            || (),
            |t, y, _| {
                let images = blocks[t].clone();
                // Strided layers of fewer than 28 outputs a row on phase planes (one run an
                // image), against one run per output row, bf16, 2 threads, Xeon with AMX
                // (family 6 model 207), 2026-12-05 20:40 UTC, three alternated runs, fastest
                // of 10-15 calls (`CONV_LAYERS_ONLY=3x3/2 conv_layers 2 bf16 MODEL 224
                // BATCH`), forward ms: resnet18 (batch 32) 128 -> 256 at 28 px 4.2-4.7 ->
                // 3.2-3.6, 256 -> 512 at 14 px (im2col before: 7 outputs a row) 6.7-7.8 ->
                // 3.4-3.9; resnet50 (batch 16) 256 -> 256 at 28 px 4.2-4.3 -> 3.1-3.4, 512
                // -> 512 at 14 px (im2col) 6.1-6.5 -> 4.5-4.7; at 28 outputs a row the
                // planes' copy did not pay: resnet18's 64 -> 128 4.2-4.4 -> 4.1-4.2,
                // resnet50's 128 -> 128 3.4-3.5 -> 3.9.
                if g.stride != [1, 1] && g.wo() < 28 {
                    super::nhwc_phases::forward_planes(x, wq, g, bias, relu, images, y);
                    return;
                }
                by_groups(x, g, images, y, g.out_len(), |xq, count, y| {
                    super::nhwc_amx::product(wq, xq, count, g, bias, relu, 0..g.cout, y)
                })
            },
        )
    }
}

/// [`forward_act`] for fewer images than threads (a single photo in `predict`): one image at a
/// time, its blocks of 64 output channels split over the threads, so none waits.
fn forward_by_channels<E: Act>(
    x: &[E],
    wq: &[u32],
    windows: &Windows,
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<f32> {
    use rayon::prelude::*;
    let (hp, wp, kp) = padded(g);
    let mut xq = super::buf::Lines::zeroed(hp * wp * kp + super::nhwc_amx::slack(g));
    let mut y = vec![0.0f32; g.batch * g.out_len()];
    for (xn, yn) in x
        .chunks_exact(g.in_len())
        .zip(y.chunks_exact_mut(g.out_len()))
    {
        pad_pack(xn, 1, g, &mut xq);
        yn.par_chunks_mut(BLOCK * g.p())
            .enumerate()
            .for_each(|(b, yb)| {
                let o0 = b * BLOCK;
                product(
                    wq,
                    windows,
                    &xq,
                    1,
                    g,
                    bias,
                    relu,
                    o0..o0 + yb.len() / g.p().max(1),
                    yb,
                );
            });
    }
    y
}

/// Output channels `couts` of `count` images (NCHW: `y` holds, per image, those channels'
/// `H_out·W_out` values, images `couts.len()·H_out·W_out` apart) from the padded
/// channels-last images `xq` and packed weights; `couts` starts on a block of [`BLOCK`].
///
/// Positions go through the tiles class by class ([`Windows`]): six positions of one class
/// share their taps inside the image, and the taps that fall on padding are skipped instead of
/// multiplied by zeros (31% of a 4 px map's products for a 3x3, 16% at 8 px, 9% at 14 px;
/// oneDNN skips them too). resnet18 at 128 px, batch 32, bf16, 2 threads, Zen 4, fastest of 3
/// alternated runs (`bench/conv_layers_ab.sh OLD NEW 3 "px 3x3/" bf16 resnet18 128 32`),
/// forward / input gradient ms: 512 -> 512 at 4 px 6.9 / 8.2 -> 5.6 / 6.8, 256 -> 256 at
/// 8 px 6.0 / 6.4 -> 5.2 / 5.6, 256 -> 512 stride 2 at 8 px forward 3.6 -> 3.2; the 16 and
/// 32 px layers within 0.1 ms.
#[allow(clippy::too_many_arguments)]
fn product(
    wq: &[u32],
    windows: &Windows,
    xq: &[u32],
    count: usize,
    g: &ConvGeom,
    bias: Option<&[f32]>,
    relu: bool,
    couts: std::ops::Range<usize>,
    y: &mut [f32],
) {
    if super::amx::enabled() && super::nhwc_amx::fits(g) {
        // SAFETY: `MaybeUninit<f32>` has `f32`'s layout, and the kernel writes only f32 values
        // into the slice, so it stays initialised.
        let y = unsafe { &mut *(y as *mut [f32] as *mut [std::mem::MaybeUninit<f32>]) };
        return super::nhwc_amx::product(wq, xq, count, g, bias, relu, couts, y);
    }
    let (hp, wp, kp) = padded(g);
    let (wo, p) = (g.wo(), g.p());
    let taps = g.kh * g.kw;
    // The word where output position `pos` of image `n` has its window's top-left tap.
    let base = |n: usize, pos: usize| {
        ((n * hp + (pos / wo) * g.stride[0]) * wp + (pos % wo) * g.stride[1]) * kp
    };
    let last_tap = ((g.kh - 1) * wp + g.kw - 1) * kp;
    assert!(count * p == 0 || base(count - 1, p - 1) + last_tap + kp <= xq.len());
    assert_eq!(wq.len(), g.cout * taps * kp, "packed weights");
    assert!(couts.start.is_multiple_of(BLOCK) && couts.end <= g.cout);
    let per_image = couts.len() * p;
    assert_eq!(y.len(), count * per_image, "output");
    let mut c = [[0.0f32; BLOCK]; TILE];
    for o0 in couts.clone().step_by(BLOCK) {
        let width = BLOCK.min(couts.end - o0);
        let wb = &wq[o0 * taps * kp..][..width * taps * kp];
        for class in &windows.classes {
            // The class's positions of every image, image by image.
            let n_pos = class.positions.len();
            let total = count * n_pos;
            let at = |k: usize| (k / n_pos, class.positions[k % n_pos]);
            for k0 in (0..total).step_by(TILE) {
                let rows = TILE.min(total - k0);
                // Rows past the last position repeat it (their sums are dropped).
                let a: [usize; TILE] = std::array::from_fn(|r| {
                    let (n, pos) = at(k0 + r.min(rows - 1));
                    base(n, pos)
                });
                tile(width / LANES, &a, xq, &class.taps, kp, wb, &mut c);
                for (r, cr) in c.iter().enumerate().take(rows) {
                    let (n, pos) = at(k0 + r);
                    let yn = &mut y[n * per_image + (o0 - couts.start) * p + pos..];
                    for (o, &v) in cr[..width].iter().enumerate() {
                        let v = v + bias.map_or(0.0, |b| b[o0 + o]);
                        yn[o * p] = if relu { v.max(0.0) } else { v };
                    }
                }
            }
        }
    }
}

/// An image's output positions grouped by which kernel taps of their window fall inside the
/// image (the rest read padding): the interior's positions take every tap, an edge's or a
/// corner's fewer. Rows and columns are classified apart (the valid kernel rows of output row
/// `r` are those `i` with `0 <= r·s + i - pad < H`), and a class is one run of rows with the
/// same valid kernel rows by one run of columns with the same valid kernel columns.
struct Windows {
    classes: Vec<Class>,
}

struct Class {
    /// Positions `row · W_out + column` within one image, row by row.
    positions: Vec<usize>,
    /// The class's taps inside the image: `(word offset from the window's top-left tap in the
    /// padded channels-last image, tap index · C_in/2)`.
    taps: Vec<(usize, usize)>,
}

impl Windows {
    fn new(g: &ConvGeom) -> Windows {
        let (_, wp, kp) = padded(g);
        let rows = Self::runs(g.ho(), g.stride[0], g.pad[0], g.kh, g.h);
        let cols = Self::runs(g.wo(), g.stride[1], g.pad[1], g.kw, g.w);
        let mut classes = Vec::with_capacity(rows.len() * cols.len());
        for (rr, ri) in &rows {
            for (cr, cj) in &cols {
                let positions = rr
                    .clone()
                    .flat_map(|r| cr.clone().map(move |c| r * g.wo() + c))
                    .collect();
                let taps = ri
                    .clone()
                    .flat_map(|i| {
                        cj.clone()
                            .map(move |j| ((i * wp + j) * kp, (i * g.kw + j) * kp))
                    })
                    .collect();
                classes.push(Class { positions, taps });
            }
        }
        Windows { classes }
    }

    /// Runs of consecutive outputs along one axis with the same range of kernel offsets inside
    /// the input: `(outputs, offsets)`.
    fn runs(
        out: usize,
        stride: usize,
        pad: usize,
        k: usize,
        size: usize,
    ) -> Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> {
        let mut runs: Vec<(std::ops::Range<usize>, std::ops::Range<usize>)> = Vec::new();
        for o in 0..out {
            let lo = pad.saturating_sub(o * stride).min(k);
            let hi = (size + pad).saturating_sub(o * stride).clamp(lo, k);
            match runs.last_mut() {
                Some((outs, offsets)) if *offsets == (lo..hi) => outs.end = o + 1,
                _ => runs.push((o..o + 1, lo..hi)),
            }
        }
        runs
    }
}

/// One register tile: `c[r][o] = Σ_{(off, t) ∈ taps, p} xq[a[r] + off + p] ·
/// wb[(t + p)·16V + o]` for `V = vectors` vectors of output channels.
fn tile(
    vectors: usize,
    a: &[usize; TILE],
    xq: &[u32],
    taps: &[(usize, usize)],
    kp: usize,
    wb: &[u32],
    c: &mut [[f32; BLOCK]; TILE],
) {
    let last = taps.iter().map(|&(off, _)| off + kp).max().unwrap_or(0);
    assert!(a.iter().all(|&at| at + last <= xq.len()), "tile rows");
    let w_end = taps.iter().map(|&(_, t)| t + kp).max().unwrap_or(0);
    assert!(wb.len() >= w_end * LANES * vectors, "tile weights");
    #[cfg(target_arch = "x86_64")]
    {
        let (x, w) = (xq.as_ptr(), wb.as_ptr());
        let rows: [*const u32; TILE] = std::array::from_fn(|r| x.wrapping_add(a[r]));
        // SAFETY: `forward_act` asserted AVX512-BF16; the asserts above bound every word the
        // tile reads (each row's furthest tap ends within `xq`, `wb` holds every listed tap's
        // pairs).
        unsafe {
            match vectors {
                4 => tile_bf16::<4>(&rows, taps, kp, w, c),
                3 => tile_bf16::<3>(&rows, taps, kp, w, c),
                2 => tile_bf16::<2>(&rows, taps, kp, w, c),
                1 => tile_bf16::<1>(&rows, taps, kp, w, c),
                _ => unreachable!("1 to 4 vectors of output channels"),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX512-BF16 is x86-64 only");
}

/// [`tile`] on `V` vectors of output channels.
///
/// # Safety
/// The CPU has AVX-512 F and BF16; for every `(off, t)` of `taps`, each `a[r]` is valid for
/// `off + kp` words and `w` for `(t + kp) · 16 · V` words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_bf16<const V: usize>(
    a: &[*const u32; TILE],
    taps: &[(usize, usize)],
    kp: usize,
    w: *const u32,
    c: &mut [[f32; BLOCK]; TILE],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; TILE];
    // SAFETY: for the whole body, the caller's contract bounds every offset below; `__m512bh` and
    // `__m512i` are the same 64 bytes.
    unsafe {
        for &(off, t) in taps {
            let at: [*const u32; TILE] = std::array::from_fn(|r| a[r].add(off));
            let mut wp = w.add(t * LANES * V);
            for p in 0..kp {
                let wv: [__m512bh; V] = std::array::from_fn(|v| {
                    std::mem::transmute(_mm512_loadu_si512(wp.add(LANES * v).cast()))
                });
                wp = wp.add(LANES * V);
                for (r, row) in acc.iter_mut().enumerate() {
                    let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(*at[r].add(p) as i32));
                    for v in 0..V {
                        row[v] = _mm512_dpbf16_ps(row[v], xv, wv[v]);
                    }
                }
            }
        }
        for (row, cr) in acc.iter().zip(c.iter_mut()) {
            for (v, &sum) in row.iter().enumerate() {
                _mm512_storeu_ps(cr.as_mut_ptr().add(LANES * v), sum);
            }
        }
    }
}

/// Whether [`weight_grad`] computes `g`'s weight gradient: whole vectors of output channels
/// and padding smaller than the kernel (any stride: [`weight_grad`] splits strided images into
/// phases).
pub fn fits_weight_grad(g: &ConvGeom) -> bool {
    g.cout.is_multiple_of(LANES)
        && g.pad[0] < g.kh
        && g.pad[1] < g.kw
        && g.stride[0] > 0
        && g.stride[1] > 0
}

/// Position pairs summed in registers per weight-gradient tile before they are added to
/// `dW`: whole images up to this many `dY` words (512 KiB), so a chunk's `dYᵀ` stays in L2
/// while every tile of the chunk reads it.
#[cfg(not(test))]
const CHUNK_WORDS: usize = 128 << 10;
#[cfg(test)]
const CHUNK_WORDS: usize = 64;

/// The weight gradient `dW[o][c, i, j] = Σ_n Σ_q dY[n][o][q] · X[n][c][s·q + (i, j)]`,
/// products in bf16 and sums in f32.
///
/// Positions run in pairs along each output row of the padded image (with a stride, of the
/// phase planes described below), so positions `q` and `q + 1` read neighbouring inputs for
/// every tap: one 32-bit load from the bf16 padded image
/// (`[C_in, H_p, W_p]`, NCHW) is the pair `VDPBF16PS` multiplies with
/// the pair `(dY[q], dY[q + 1])` of 16 output channels, from `dY` transposed to
/// `[positions / 2, C_out]` pairs. A register tile is 6 `(c, i, j)` rows x 64 output
/// channels summed over all positions of a chunk of images; threads split the rows, so each
/// sum has one order whatever the thread count.
///
/// # Panics
/// When the CPU has no AVX512-BF16, `g` does not [`fits_weight_grad`], or a slice's length
/// does not match `g`.
pub fn weight_grad<E: Act>(x: &[E], dy: &[E], g: &ConvGeom) -> Vec<f32> {
    use rayon::prelude::*;
    if super::amx::enabled() && super::nhwc_amx::fits_weight_grad(g) {
        return super::nhwc_amx::weight_grad(x, dy, g);
    }
    assert!(
        super::bf16::available(),
        "the bf16 weight gradient needs AVX512-BF16"
    );
    assert!(
        fits_weight_grad(g),
        "channels-last weight gradient of {g:?}"
    );
    g.assert_grad_lens(x.len(), dy.len());
    let (hp, wp, _) = padded(g);
    let (ho, wo, cout, taps) = (g.ho(), g.wo(), g.cout, g.kh * g.kw);
    let [sh, sw] = g.stride;
    // Each channel's padded image split into `sh x sw` phase planes, plane `(a, b)` holding
    // rows `a, a + sh, ..` and columns `b, b + sw, ..`: tap `(i, j)` of output `(oy, ox)`
    // reads plane `(i % sh, j % sw)` at `(oy + i / sh, ox + j / sw)`, so consecutive outputs
    // read consecutive values at any stride (stride 1: one plane, the padded image).
    let (hq, wq) = (hp.div_ceil(sh), wp.div_ceil(sw));
    let plane = hq * wq;
    // Position pairs within each output row only: the row's last `W_q - W_out` columns (a
    // third of the positions at 4 px, 512 -> 512) have no `dY`, and pairs running over them
    // multiplied zeros.
    let positions = Rows {
        first: 0,
        count: ho,
        pairs: wo.div_ceil(2),
        stride: wq,
    };
    let pairs = positions.count * positions.pairs;
    // The last pair of the last tap of the last plane reads up to `wq` halves past the planes.
    let img_x = (g.cin * sh * sw * plane + wq + 2).next_multiple_of(2);
    let img_d = pairs * cout;
    // Both copies zeroed image by image by the worker that fills the image ([`par_zeroed`]:
    // `vec![0; n]` zeroed all of them on the calling thread, 5% of the 64 -> 64 56 px layer's
    // weight-gradient samples), as f32 words cast to the halves and pairs they hold.
    let xb = par_zeroed(
        g.batch * img_x / 2,
        img_x / 2,
        x.par_chunks(g.in_len()),
        |d: &mut [f32], s| phase_planes_into(s, g, hq, wq, bytemuck::cast_slice_mut(d)),
    );
    let xb: &[u16] = bytemuck::cast_slice(&xb);
    // dY of an image as position pairs `[positions / 2, C_out]` ([`dy_pairs_into`]), pairs
    // within each output row.
    let dyt = par_zeroed_with(
        g.batch * img_d,
        img_d,
        dy.par_chunks(g.out_len()),
        || vec![0u32; img_d],
        |scratch, d: &mut [f32], s| dy_pairs_into(s, g, 2 * pairs, 2 * positions.pairs, scratch, d),
    );
    let dyt: &[u32] = bytemuck::cast_slice(&dyt);
    let k = g.cin * taps;
    let row_base: Vec<usize> = (0..k)
        .map(|r| {
            let (c, i, j) = (r / taps, r % taps / g.kw, r % g.kw);
            ((c * sh + i % sh) * sw + j % sw) * plane + (i / sh) * wq + j / sw
        })
        .collect();
    // At stride 1 the rows of `dWᵀ` go kernel row by kernel row (`(i, c, j)` instead of
    // `(c, i, j)`), so the six rows of a tile share `i` and sum only the output rows whose tap
    // row `i` lies inside the image (`0 <= oy + i - pad < H`): the others read padding. A
    // tile's rows of several kernel rows (`C_in·kw` not a multiple of 6, as RGB stems; and
    // strided layers, where the `(i, c, j)` order lost 0.1-0.2 ms a layer for one skipped row)
    // sum the hull of their output rows, still exact (the extra rows read zeros).
    // `order[slot]` is the row of `dWᵀ` that slot `slot` of the parts holds. resnet18 at 128
    // px, batch 32, 2 threads, Zen 4, fastest of 4 alternated runs (`bench/conv_layers_ab.sh
    // OLD NEW 4 3x3 bf16 resnet18 128 32`), ms: 512 -> 512 at 4 px 7.1 -> 6.7, 256 -> 256 at
    // 8 px 6.3 -> 5.9, 128 -> 128 at 16 px 6.0 -> 5.9.
    let order: Vec<usize> = if g.stride == [1, 1] {
        (0..g.kh)
            .flat_map(|i| {
                (0..g.cin).flat_map(move |c| (0..g.kw).map(move |j| (c * g.kh + i) * g.kw + j))
            })
            .collect()
    } else {
        (0..k).collect()
    };
    let inside = |i: usize| {
        let inside = |oy: usize| oy * sh + i >= g.pad[0] && oy * sh + i < g.h + g.pad[0];
        let first = (0..ho).find(|&oy| inside(oy)).unwrap_or(ho);
        first..first + (first..ho).take_while(|&oy| inside(oy)).count()
    };
    let tiles: Vec<(usize, usize, Rows)> = (0..k)
        .step_by(TILE)
        .map(|s0| {
            let live = TILE.min(k - s0);
            // The hull of the rows' output rows (kernel rows that see only padding left out).
            let (first, end) = order[s0..s0 + live]
                .iter()
                .map(|&row| inside(row % taps / g.kw))
                .filter(|r| !r.is_empty())
                .fold((ho, 0), |(f, e), r| (f.min(r.start), e.max(r.end)));
            let rows = Rows {
                first,
                count: end.saturating_sub(first),
                ..positions
            };
            (s0, live, rows)
        })
        .collect();
    let parts = rayon::current_num_threads().clamp(1, tiles.len().max(1));
    let part_tiles = |t: usize| t * tiles.len() / parts..(t + 1) * tiles.len() / parts;
    let slots = |t: usize| {
        let ts = part_tiles(t);
        let start = tiles.get(ts.start).map_or(k, |&(s0, _, _)| s0);
        let end = ts
            .end
            .checked_sub(1)
            .map_or(start, |l| tiles[l].0 + tiles[l].1);
        start..end.max(start)
    };
    let chunk = (CHUNK_WORDS / img_d.max(1)).clamp(1, g.batch.max(1));
    let lens: Vec<usize> = (0..parts).map(|t| slots(t).len() * cout).collect();
    // Each part: its slots of `dWᵀ` (`[slots, C_out]`), summed over every image in order.
    let dwt = par_zeroed_parts(&lens, |t, part| {
        let first_slot = slots(t).start;
        let mut c = [[0.0f32; BLOCK]; TILE];
        for n0 in (0..g.batch).step_by(chunk) {
            let images = chunk.min(g.batch - n0);
            for o0 in (0..cout).step_by(BLOCK) {
                let width = BLOCK.min(cout - o0);
                for &(s0, live, rows) in &tiles[part_tiles(t)] {
                    let a: [usize; TILE] =
                        std::array::from_fn(|r| n0 * img_x + row_base[order[s0 + r.min(live - 1)]]);
                    let d0 = n0 * img_d + o0;
                    wgrad_tile(
                        width / LANES,
                        &a,
                        xb,
                        img_x,
                        images,
                        rows,
                        dyt,
                        d0,
                        img_d,
                        cout,
                        &mut c,
                    );
                    for (r, cr) in c.iter().enumerate().take(live) {
                        let dst = &mut part[(s0 + r - first_slot) * cout + o0..][..width];
                        dst.iter_mut().zip(cr).for_each(|(d, &v)| *d += v);
                    }
                }
            }
        }
    });
    // `dWᵀ [K, C_out]` (slot `s` holding row `order[s]`) -> `dW [C_out, K]`, in 16 x 16 blocks.
    let mut slot_of = vec![0; k];
    for (slot, &row) in order.iter().enumerate() {
        slot_of[row] = slot;
    }
    super::gemm::sum_transposed_in_order(&[&dwt], k, cout, Some(&slot_of))
}

/// One image (`[C_in, H, W]`) into `d` as each channel's zero-padded image split into
/// `s_h x s_w` phase planes of `H_q x W_q` halves (bf16 bits), channel after channel: plane
/// `(a, b)` of channel `c` starts at `((c·s_h + a)·s_w + b)·H_q·W_q` and holds padded rows
/// `a, a + s_h, ..` and columns `b, b + s_w, ..` (stride 1: the padded image). Only the
/// image's own positions are written; the rest of `d` keeps what it holds (zeros).
pub(super) fn phase_planes_into<E: Act>(
    image: &[E],
    g: &ConvGeom,
    hq: usize,
    wq: usize,
    d: &mut [u16],
) {
    let [sh, sw] = g.stride;
    for (c, sc) in image.chunks_exact(g.h * g.w).enumerate() {
        for (y, row) in sc.chunks_exact(g.w).enumerate() {
            let py = y + g.pad[0];
            let rows = c * sh + py % sh;
            for b in 0..sw {
                // Columns `x` with `(x + pw) % sw == b`, at `(x + pw) / sw`.
                let first = (b + sw - g.pad[1] % sw) % sw;
                let at = ((rows * sw + b) * hq + py / sh) * wq + (first + g.pad[1]) / sw;
                if sw == 1 {
                    E::bits_into(row, &mut d[at..at + g.w]);
                    continue;
                }
                for (d, &v) in d[at..].iter_mut().zip(row.iter().skip(first).step_by(sw)) {
                    *d = v.bf16_bits();
                }
            }
        }
    }
}

/// One image's `dY` (`[C_out, H_out, W_out]`) into `d` as position pairs `[len / 2, C_out]`:
/// output row `r` at position `r · row_stride` of `len` per channel (the positions between
/// rows and past the last stay zero), in two passes: each channel's rows copied into the
/// scratch `[C_out, len]` (read in order, so the hardware prefetcher streams them), then that
/// transposed as 32-bit pairs, 16 x 16 words in registers. Reading 16 positions of every
/// channel at a time (one cache line per channel, `H_out·W_out` floats apart) and writing
/// them position by position was, with the copies' zeroing, 30% of the samples of the
/// 64 -> 64 56 px layer's weight gradient. The scratch's other positions are never written,
/// so they stay zero from image to image.
pub(super) fn dy_pairs_into<E: Act>(
    dy: &[E],
    g: &ConvGeom,
    len: usize,
    row_stride: usize,
    scratch: &mut [u32],
    d: &mut [f32],
) {
    let (ho, wo) = (g.ho(), g.wo());
    let halves: &mut [u16] = bytemuck::cast_slice_mut(scratch);
    for (o, so) in dy.chunks_exact(ho * wo).enumerate() {
        let t = &mut halves[o * len..][..len];
        for (oy, row) in so.chunks_exact(wo).enumerate() {
            E::bits_into(row, &mut t[oy * row_stride..][..wo]);
        }
    }
    super::simd::transpose_words(scratch, g.cout, len / 2, bytemuck::cast_slice_mut(d));
}

/// The output positions a weight-gradient tile sums over, per image: `count` rows from row
/// `first`, of `pairs` position pairs each, rows `stride` halves apart in the bf16 image.
#[derive(Clone, Copy, Debug)]
struct Rows {
    first: usize,
    count: usize,
    pairs: usize,
    stride: usize,
}

/// One weight-gradient tile: `c[r][o] = Σ_{n < images} Σ_{y ∈ rows.first..+rows.count} Σ_{m < rows.pairs}
/// xb[a[r] + n·img_x + y·rows.stride + 2m ..+2] · dyt[d0 + n·img_d + (y·rows.pairs + m)·ld + o]`
/// (pairs), for `vectors` vectors of output channels.
#[allow(clippy::too_many_arguments)]
fn wgrad_tile(
    vectors: usize,
    a: &[usize; TILE],
    xb: &[u16],
    img_x: usize,
    images: usize,
    rows: Rows,
    dyt: &[u32],
    d0: usize,
    img_d: usize,
    ld: usize,
    c: &mut [[f32; BLOCK]; TILE],
) {
    if images == 0 || rows.count == 0 || rows.pairs == 0 {
        c.iter_mut().for_each(|r| r.fill(0.0));
        return;
    }
    let end = rows.first + rows.count;
    let last_x = (images - 1) * img_x + (end - 1) * rows.stride + 2 * rows.pairs;
    assert!(a.iter().all(|&at| at + last_x <= xb.len()), "tile rows");
    let last_d = d0 + (images - 1) * img_d + (end * rows.pairs - 1) * ld + LANES * vectors;
    assert!(last_d <= dyt.len(), "tile output gradient");
    #[cfg(target_arch = "x86_64")]
    {
        let at: [*const u16; TILE] = std::array::from_fn(|r| xb.as_ptr().wrapping_add(a[r]));
        let d = dyt.as_ptr().wrapping_add(d0);
        // SAFETY: `weight_grad` asserted AVX512-BF16; the asserts above bound the last pair
        // of every row and the last vector of `dyt` the tile reads.
        unsafe {
            match vectors {
                4 => wgrad_tile_bf16::<4>(&at, img_x, images, rows, d, img_d, ld, c),
                3 => wgrad_tile_bf16::<3>(&at, img_x, images, rows, d, img_d, ld, c),
                2 => wgrad_tile_bf16::<2>(&at, img_x, images, rows, d, img_d, ld, c),
                1 => wgrad_tile_bf16::<1>(&at, img_x, images, rows, d, img_d, ld, c),
                _ => unreachable!("1 to 4 vectors of output channels"),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX512-BF16 is x86-64 only");
}

/// [`wgrad_tile`] on `V` vectors.
///
/// # Safety
/// The CPU has AVX-512 F and BF16; every `a[r] + n·img_x + y·rows.stride` is valid for
/// `2·rows.pairs` halves and `d + n·img_d + m·ld` for `16·V` words, for `n < images`,
/// `y < rows.first + rows.count`, `m < (rows.first + rows.count)·rows.pairs`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn wgrad_tile_bf16<const V: usize>(
    a: &[*const u16; TILE],
    img_x: usize,
    images: usize,
    rows: Rows,
    d: *const u32,
    img_d: usize,
    ld: usize,
    c: &mut [[f32; BLOCK]; TILE],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; TILE];
    // SAFETY: for the whole body, the caller's contract bounds every offset below; a pair of halves
    // is read as one unaligned 32-bit word.
    unsafe {
        for n in 0..images {
            let at: [*const u16; TILE] = std::array::from_fn(|r| a[r].add(n * img_x));
            let dn = d.add(n * img_d);
            for y in rows.first..rows.first + rows.count {
                let xy: [*const u16; TILE] = std::array::from_fn(|r| at[r].add(y * rows.stride));
                let dy = dn.add(y * rows.pairs * ld);
                for m in 0..rows.pairs {
                    let dm = dy.add(m * ld);
                    let dv: [__m512bh; V] = std::array::from_fn(|v| {
                        std::mem::transmute(_mm512_loadu_si512(dm.add(LANES * v).cast()))
                    });
                    for (r, row) in acc.iter_mut().enumerate() {
                        let word = xy[r].add(2 * m).cast::<i32>().read_unaligned();
                        let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(word));
                        for v in 0..V {
                            row[v] = _mm512_dpbf16_ps(row[v], xv, dv[v]);
                        }
                    }
                }
            }
        }
        for (row, cr) in acc.iter().zip(c.iter_mut()) {
            for (v, &sum) in row.iter().enumerate() {
                _mm512_storeu_ps(cr.as_mut_ptr().add(LANES * v), sum);
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::kernels::Precision;
    use crate::kernels::conv::test_data as data;

    pub(in crate::kernels) fn geom(
        batch: usize,
        cin: usize,
        side: usize,
        cout: usize,
        k: usize,
        s: usize,
    ) -> ConvGeom {
        ConvGeom {
            batch,
            cin,
            h: side,
            w: side + 1,
            cout,
            kh: k,
            kw: k,
            stride: [s, s],
            pad: [k / 2, k / 2],
            precision: Precision::Bf16,
        }
    }

    /// Equal lengths and every value within bf16-summation-order rounding of the other.
    pub(in crate::kernels) fn assert_close(got: &[f32], want: &[f32], at: &dyn std::fmt::Debug) {
        assert_eq!(got.len(), want.len(), "{at:?}");
        for (i, (a, e)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - e).abs() < 1e-4 * (1.0 + e.abs()),
                "{at:?} [{i}]: {a} vs {e}"
            );
        }
    }

    /// A 3x1 kernel, no padding, strides 2 and 1: rows and columns handled apart.
    fn odd() -> ConvGeom {
        ConvGeom {
            kh: 3,
            kw: 1,
            stride: [2, 1],
            pad: [0, 0],
            ..geom(2, 16, 7, 32, 1, 1)
        }
    }

    /// The im2col convolution on the same bf16-rounded operands: both sum exact bf16 products
    /// in f32, in different orders.
    #[test]
    fn matches_im2col_in_bf16() {
        if !crate::kernels::bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for g in [
            geom(3, 16, 5, 16, 3, 1),
            geom(2, 18, 7, 48, 3, 2),
            geom(5, 32, 3, 80, 1, 1),
            geom(2, 16, 6, 32, 1, 2),
            geom(1, 20, 4, 64, 3, 1),
            geom(4, 16, 9, 128, 5, 2),
            // Rows of more than 16 positions and more than 16 channel pairs: whole 16 x 16
            // blocks of the channels-last copy and the edges they leave.
            geom(2, 40, 18, 32, 3, 1),
            odd(),
        ] {
            let x = data(g.batch * g.in_len(), 1);
            let w = data(g.cout * g.k(), 2);
            let b = data(g.cout, 3);
            for relu in [false, true] {
                let got = forward_act(&x, &w, Some(&b), &g, relu);
                let want = super::super::im2col::im2col_forward_act(&x, &w, Some(&b), &g, relu);
                assert_close(&got, &want, &g);
            }
        }
    }

    /// The vector channels-last copy against the word-by-word one, bit for bit (finite
    /// values: both round to nearest even), with rows and channel pairs that fill whole 16 x 16
    /// blocks and ragged ones; the padding is left as it was.
    #[test]
    fn pad_pack_is_the_word_by_word_copy() {
        if !crate::kernels::bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for g in [
            geom(2, 40, 18, 32, 3, 1),
            geom(3, 16, 5, 16, 3, 1),
            geom(2, 34, 37, 32, 3, 1),
            odd(),
        ] {
            let x = data(g.batch * g.in_len(), 10);
            let (hp, wp, kp) = padded(&g);
            let mut got = vec![0u32; g.batch * hp * wp * kp];
            let mut want = got.clone();
            pad_pack(&x, g.batch, &g, &mut got);
            pad_pack_words(&x, g.batch, &g, &mut want);
            assert_eq!(got, want, "{g:?}");
            // bf16 activations: their bits copied as they are (`pack_row_bits_avx512`).
            let xb = crate::kernels::act::to_bf16(&x);
            let (mut got, mut want) = (vec![0u32; got.len()], vec![0u32; got.len()]);
            pad_pack(&xb, g.batch, &g, &mut got);
            pad_pack_words(&xb, g.batch, &g, &mut want);
            assert_eq!(got, want, "bf16 {g:?}");
        }
    }

    /// A kernel row packed 32 channels at a time is the pair-by-pair definition: 3x3, 1x1 and
    /// 5x5 taps, 32 to 96 channels, values of every size (a NaN stays a NaN; a denormal is a
    /// zero of its sign where the vector instruction rounds it).
    #[test]
    fn weight_rows_pack_as_pairs() {
        for (cin, taps) in [(32, 9), (64, 1), (96, 25), (48, 9)] {
            let mut wo = data(cin * taps, 17);
            wo.iter_mut().step_by(7).for_each(|v| *v *= 1.0e30);
            wo[3] = f32::NAN;
            wo[5] = -3.0e-40;
            let kp = cin / 2;
            let vector = crate::kernels::bf16::available() && kp.is_multiple_of(16);
            let flush = |v: f32| {
                if vector && v.is_subnormal() {
                    0.0f32.copysign(v)
                } else {
                    v
                }
            };
            let mut got = vec![0u32; taps * kp];
            pack_weight_row(&wo, taps, &mut got);
            for t in 0..taps {
                for p in 0..kp {
                    let (lo, hi) = (
                        flush(wo[2 * p * taps + t]),
                        flush(wo[(2 * p + 1) * taps + t]),
                    );
                    let w = got[t * kp + p];
                    let half = |b: u32| f32::from_bits(b << 16);
                    if lo.is_nan() {
                        assert!(half(w & 0xffff).is_nan(), "tap {t} pair {p}");
                        continue;
                    }
                    assert_eq!(
                        w,
                        pair(lo, hi),
                        "{cin} channels, {taps} taps: tap {t} pair {p}"
                    );
                }
            }
        }
    }

    /// The weight gradient against im2col's on the same bf16-rounded operands, and the same
    /// bits for 1 and 3 threads (threads split the rows, not the sums).
    #[test]
    fn weight_grad_matches_im2col_in_bf16() {
        if !crate::kernels::bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        for g in [
            geom(3, 16, 5, 16, 3, 1),
            geom(2, 18, 7, 48, 3, 1),
            geom(5, 3, 3, 80, 1, 1),
            geom(2, 5, 6, 32, 5, 1),
            geom(4, 7, 4, 64, 3, 1),
            // Strided: phase planes (a 7x7/2 stem, a 3x3/2, a 1x1/2, an uneven 5x5/3).
            geom(2, 3, 11, 64, 7, 2),
            geom(3, 16, 7, 32, 3, 2),
            geom(2, 8, 6, 16, 1, 2),
            geom(2, 5, 10, 16, 5, 3),
            odd(),
            // One channel, one tap per kernel row: a tile of all three kernel rows, the first
            // and last of which see only padding (one output row).
            ConvGeom {
                h: 1,
                w: 3,
                kw: 1,
                pad: [1, 0],
                ..geom(2, 1, 1, 16, 3, 1)
            },
            // Stride 3 on 4 rows: kernel rows whose output rows have gaps between them.
            ConvGeom {
                h: 4,
                kw: 1,
                stride: [3, 1],
                pad: [2, 0],
                ..geom(2, 1, 4, 16, 3, 1)
            },
        ] {
            let x = data(g.batch * g.in_len(), 4);
            let dy = data(g.batch * g.out_len(), 5);
            let w = data(g.cout * g.k(), 6);
            let got = weight_grad(&x, &dy, &g);
            let want = super::super::im2col::im2col_backward(&x, &w, &dy, &g, [false, true, false])
                .1
                .unwrap();
            assert_close(&got, &want, &g);
            let run =
                |threads| crate::kernels::conv::on_threads(threads, || weight_grad(&x, &dy, &g));
            assert_eq!(run(1), run(3), "{g:?}");
        }
    }

    /// Fewer images than threads: split by output channels, the same values as one thread.
    #[test]
    fn a_single_image_splits_by_output_channels() {
        if !crate::kernels::bf16::available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let g = geom(1, 16, 6, 144, 3, 1);
        let x = data(g.in_len(), 7);
        let w = data(g.cout * g.k(), 8);
        let b = data(g.cout, 9);
        let run = |threads| {
            crate::kernels::conv::on_threads(threads, || forward_act(&x, &w, Some(&b), &g, true))
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn fits_channel_pairs_and_whole_vectors() {
        assert!(fits(&geom(1, 64, 8, 64, 3, 1)));
        assert!(!fits(&geom(1, 3, 8, 64, 7, 2)));
        assert!(!fits(&geom(1, 64, 8, 40, 3, 1)));
    }
}
