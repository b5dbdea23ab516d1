//! The strided layers on the AMX tiles by phases, as stride-1 products over
//! [`super::nhwc_amx`]'s grids.
//!
//! A stride-`s` convolution splits by the phase of a position modulo `s`. Forward, tap `(i, j)`
//! of output `(r, c)` reads the padded image's phase plane `(i mod s_h, j mod s_w)` at `(r + i /
//! s_h, c + j / s_w)`, so over the planes the positions run as at stride 1 ([`forward_planes`]).
//! Backward, input position `(s_h·m + a, s_w·n + b)` meets only the taps of its phase `(a, b)`,
//! so the input gradient is one stride-1 product of the padded output gradient per phase, with
//! that phase's taps turned 180° ([`input_grad_strided`]; for 3x3 at stride 2 the phases have
//! 1x1, 1x2, 2x1 and 2x2 taps, the 9 of the kernel).
//!
//! # Shapes
//! As [`super::nhwc`]: `x: [B, C_in, H, W]`, `w: [C_out, C_in, kh, kw]`, `y, dY: [B, C_out,
//! H_out, W_out]`.

use super::act::Act;
use super::amx::PAIRS;
use super::bf16::pair;
use super::conv::{ConvGeom, image_blocks};
use super::nhwc::{BLOCK, padded};
use super::nhwc_amx::{Grid, ROWS, plane_dims, product_on};
use std::mem::MaybeUninit;

/// A strided layer's forward pass on the tiles over phase planes ([`Grid::planes`]): images
/// `images` of `x` (NCHW) into `y` (their outputs, NCHW, every value written), `wq` as
/// [`super::nhwc`] packs the layer's weights.
///
/// Each image is padded and packed channels-last as at stride 1 ([`super::nhwc::pad_pack`]),
/// then its positions are copied to their planes, `s_h·s_w` planes of `H_q x W_q` positions
/// an image, a group of images at a time (as [`super::nhwc::by_groups`]).
///
/// # Panics
/// When AMX is not enabled, `g` does not [`super::nhwc_amx::fits`] or a slice's length does
/// not match.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward_planes<E: Act, O: Act>(
    x: &[E],
    wq: &[u32],
    g: &ConvGeom,
    bias: Option<&[f32]>,
    relu: bool,
    images: std::ops::Range<usize>,
    y: &mut [MaybeUninit<O>],
) {
    super::nhwc_amx::assert_packed_on_tiles(wq, g);
    assert_eq!(y.len(), images.len() * g.out_len(), "output");
    let (hp, wp, kp) = padded(g);
    let [sh, sw] = g.stride;
    let (_, plane_w, plane) = plane_dims(g);
    let per_image = sh * sw * plane;
    let group = (super::nhwc::GROUP_WORDS / per_image.max(1)).clamp(1, images.len().max(1));
    // `image`'s padding stays zero (`pad_pack` writes the image's own positions only), and
    // every position of it is copied to its plane; plane positions past the padded image (an
    // odd `H_p` or `W_p`) are never written and stay zero.
    let mut image = super::buf::Lines::zeroed(hp * wp * kp);
    let mut xq = super::buf::Lines::zeroed(group * per_image + ROWS * kp);
    for first in images.clone().step_by(group) {
        let count = group.min(images.end - first);
        for n in 0..count {
            super::nhwc::pad_pack(&x[(first + n) * g.in_len()..], 1, g, &mut image);
            let dst = &mut xq[n * per_image..][..per_image];
            for (r, row) in image.chunks_exact(wp * kp).enumerate() {
                for (c, v) in row.chunks_exact(kp).enumerate() {
                    let at = ((r % sh) * sw + c % sw) * plane + ((r / sh) * plane_w + c / sw) * kp;
                    dst[at..at + kp].copy_from_slice(v);
                }
            }
        }
        let at = (first - images.start) * g.out_len();
        let grid = Grid::planes(g, count);
        let out = &mut y[at..][..count * g.out_len()];
        product_on(
            &grid,
            wq,
            &xq[..count * per_image + ROWS * kp],
            bias,
            relu,
            0..g.cout,
            out,
        );
    }
}

/// One dimension of one phase of a strided layer's input gradient: input rows `u = s·m + a`
/// (`m < len`) meet kernel rows `first, first + s, ..` (`taps` of them) only, row `first + s·t`
/// through output row `m + shift - t` (`s·(m + shift - t) + first + s·t - pad = u`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PhaseDim {
    a: usize,
    first: usize,
    taps: usize,
    shift: usize,
    len: usize,
}

/// The `s` phases of one dimension of a layer with kernel `k`, padding `pad`, stride `s` and
/// `n` input rows.
fn phase_dims(s: usize, k: usize, pad: usize, n: usize) -> Vec<PhaseDim> {
    (0..s)
        .map(|a| {
            let first = (a + pad) % s;
            PhaseDim {
                a,
                first,
                taps: k.saturating_sub(first).div_ceil(s),
                shift: (a + pad - first) / s,
                len: n.saturating_sub(a).div_ceil(s),
            }
        })
        .collect()
}

/// The zero padding of the output gradient that every phase's taps stay inside: row `m` of
/// a phase reads rows `m + shift + 1 - taps ..= m + shift` of `n_out`.
fn phase_pad(dims: &[PhaseDim], n_out: usize) -> usize {
    dims.iter()
        .filter(|d| d.taps > 0 && d.len > 0)
        .map(|d| {
            (d.taps - 1)
                .saturating_sub(d.shift)
                .max((d.len + d.shift).saturating_sub(n_out))
        })
        .max()
        .unwrap_or(0)
}

/// The weights of a stride-1 layer's input gradient (the kernel turned 180°, the channels
/// swapped: [`ConvGeom::input_grad`]) packed as [`super::nhwc`] packs a layer's: one pass
/// over `w` ([`pack_phase_weights`] with the one phase of stride 1), where rotating `w` into
/// a new f32 kernel and packing that read and wrote it twice more (1.2% of a resnet18 bf16
/// step in the rotation alone).
pub(super) fn pack_rotated(w: &[f32], g: &ConvGeom) -> super::buf::Lines<u32> {
    assert_eq!(g.stride, [1, 1], "rotated weights of a strided layer");
    let whole = |k| PhaseDim {
        a: 0,
        first: 0,
        taps: k,
        shift: 0,
        len: 1,
    };
    let mut packed = pack_phase_weights(w, g, &[(whole(g.kh), whole(g.kw))]);
    packed
        .pop()
        .flatten()
        .expect("a kernel of at least one tap")
}

/// Whether [`input_grad_strided`] computes the input gradient of `g` (on a CPU where
/// [`super::amx::enabled`]): a strided layer whose output channels are whole tiles of pairs
/// and input channels whole tiles.
pub fn fits_input_grad_strided(g: &ConvGeom) -> bool {
    g.stride != [1, 1]
        && g.stride[0] > 0
        && g.stride[1] > 0
        && g.cout.is_multiple_of(2 * PAIRS)
        && g.cin.is_multiple_of(16)
}

/// Each phase's kernel packed as [`super::nhwc`]'s `pack_weights` packs a layer's (`None` for
/// a phase without taps): the phase's taps turned 180° with the channels swapped, so block
/// `o0`'s word `(t, p, c)` is `(w[2p][o0 + c][i, j], w[2p + 1][o0 + c][i, j])` for the phase's
/// tap `t = (tr, tc)`: `i = r.first + s_h·(taps_r - 1 - tr)`, `j` likewise. One pass over
/// `w`, a block of 64 input channels per task: for each pair of output channels its two
/// rows are contiguous runs of `w`, and each `(t, p)` row of the block is written in order
/// (a kernel per phase gathered from `w` and packed after read `w` once per phase, 4.7 MB
/// for 256 -> 512 3x3, a tenth of that layer's input gradient).
fn pack_phase_weights(
    w: &[f32],
    g: &ConvGeom,
    phases: &[(PhaseDim, PhaseDim)],
) -> Vec<Option<super::buf::Lines<u32>>> {
    use rayon::prelude::*;
    let (taps, kp) = (g.kh * g.kw, g.cout / 2);
    // Per phase: the kernel tap (`i·kw + j`) of each of its taps.
    let tap_of: Vec<Vec<usize>> = phases
        .iter()
        .map(|&(r, c)| {
            (0..r.taps * c.taps)
                .map(|k| {
                    let (t, u) = (k / c.taps, k % c.taps);
                    let i = r.first + g.stride[0] * (r.taps - 1 - t);
                    i * g.kw + c.first + g.stride[1] * (c.taps - 1 - u)
                })
                .collect()
        })
        .collect();
    let mut out: Vec<Option<super::buf::Lines<u32>>> = tap_of
        .iter()
        .map(|t| (!t.is_empty()).then(|| super::buf::Lines::zeroed(g.cin * t.len() * kp)))
        .collect();
    // Per block of 64 input channels, its part of every phase's packed weights.
    let mut blocks: Vec<Vec<&mut [u32]>> = (0..g.cin.div_ceil(BLOCK)).map(|_| Vec::new()).collect();
    for (buf, t) in out.iter_mut().zip(&tap_of) {
        if let Some(buf) = buf {
            for (blk, part) in buf.chunks_mut(BLOCK * t.len() * kp).enumerate() {
                blocks[blk].push(part);
            }
        }
    }
    let used: Vec<&Vec<usize>> = tap_of.iter().filter(|t| !t.is_empty()).collect();
    blocks
        .into_par_iter()
        .enumerate()
        .for_each(|(blk, mut parts)| {
            let c0 = blk * BLOCK;
            let width = BLOCK.min(g.cin - c0);
            for p in 0..kp {
                let lo = &w[(2 * p * g.cin + c0) * taps..][..width * taps];
                let hi = &w[((2 * p + 1) * g.cin + c0) * taps..][..width * taps];
                for (part, tap_of) in parts.iter_mut().zip(&used) {
                    for (t, &k) in tap_of.iter().enumerate() {
                        let row = &mut part[(t * kp + p) * width..][..width];
                        pair_taps(lo, hi, taps, k, row);
                    }
                }
            }
        });
    out
}

/// `row[c] = pair(lo[c·taps + k], hi[c·taps + k])`: tap `k` of two rows of the kernel
/// (`[channels, taps]` each) as pairs.
fn pair_taps(lo: &[f32], hi: &[f32], taps: usize, k: usize, row: &mut [u32]) {
    let n = row.len();
    assert!(
        k < taps && lo.len() >= n * taps && hi.len() >= n * taps,
        "kernel rows"
    );
    #[cfg(target_arch = "x86_64")]
    if super::bf16::available()
        && std::arch::is_x86_feature_detected!("avx512bw")
        && i32::try_from(n * taps).is_ok()
    {
        // SAFETY: AVX-512 F, BW and BF16 detected; the lengths are checked above.
        unsafe { pair_taps_avx512(lo, hi, taps, k, row) };
        return;
    }
    for (c, d) in row.iter_mut().enumerate() {
        *d = pair(lo[c * taps + k], hi[c * taps + k]);
    }
}

/// [`pair_taps`] 16 words at a time: the values gathered `taps` floats apart, rounded with
/// `VCVTNEPS2BF16` (the rounding of [`pair`], denormals to zero as in
/// [`super::bf16::round_slice`]) and interleaved, as the forward kernel's rows
/// are packed ([`super::nhwc`]). The scalar loop was 0.85% of a resnet18 224 px bf16 training
/// step's samples, this 0.7% (`perf record`, AMX Xeon, 2026-12-05).
///
/// # Safety
/// The CPU has AVX-512 F, BW and BF16; `k < taps`, `lo` and `hi` hold `row.len()·taps`
/// floats and `row.len()·taps` is below `i32::MAX`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pair_taps_avx512(lo: &[f32], hi: &[f32], taps: usize, k: usize, row: &mut [u32]) {
    use std::arch::x86_64::*;
    let lanes = super::simd::lanes_times(taps as i32);
    for c0 in (0..row.len()).step_by(16) {
        let m = (((1u32 << 16.min(row.len() - c0)) - 1) & 0xffff) as __mmask16;
        let idx = _mm512_add_epi32(lanes, _mm512_set1_epi32((c0 * taps + k) as i32));
        let zero = _mm512_setzero_ps();
        // SAFETY: lane `l < 16` (masked to the row) reads `lo[(c0 + l)·taps + k]` and the same
        // of `hi`, inside both; the masked store writes `row[c0..][..l]`.
        unsafe {
            let a = _mm512_mask_i32gather_ps::<4>(zero, m, idx, lo.as_ptr());
            let b = _mm512_mask_i32gather_ps::<4>(zero, m, idx, hi.as_ptr());
            let a: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(a));
            let b: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(b));
            let w = _mm512_or_si512(
                _mm512_cvtepu16_epi32(a),
                _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(b)),
            );
            _mm512_mask_storeu_epi32(row.as_mut_ptr().add(c0).cast(), m, w);
        }
    }
}

/// The input gradient of a strided layer, `dX[c][u][v] = Σ_{o, i, j} w[o][c][i][j] ·
/// dY[o][(u + p - i) / s][(v + p - j) / s]` over the `i, j` that divide evenly, on the AMX
/// tiles: split by the phase `(u mod s_h, v mod s_w)` of the input position, each phase is a
/// stride-1 convolution of the zero-padded `dY` with the taps of that phase (turned 180°;
/// for 3x3 at stride 2: 1x1, 1x2, 2x1 and 2x2), so the products are those of the layer's
/// forward pass. Written as a stride-1 convolution of `dY` with zeros between its values
/// (what the plan ran before, through im2col), three quarters of the products were zeros.
///
/// The phases of a group of images are computed into a scratch (`[images, C_in, H/s_h,
/// W/s_w]`) and interleaved into `dX` (NCHW, `O`: f32, or bf16 rounded once by the tiles).
///
/// # Panics
/// When AMX is not enabled, `g` does not [`fits_input_grad_strided`], or when a slice's length does not match `g`.
pub fn input_grad_strided<E: Act, O: Act>(dy: &[E], w: &[f32], g: &ConvGeom) -> Vec<O> {
    assert!(
        super::amx::enabled() && fits_input_grad_strided(g),
        "AMX strided input gradient of {g:?}"
    );
    assert_eq!(dy.len(), g.batch * g.out_len(), "output gradient length");
    assert_eq!(w.len(), g.cout * g.k(), "weight length");
    let [sh, sw] = g.stride;
    let rows = phase_dims(sh, g.kh, g.pad[0], g.h);
    let cols = phase_dims(sw, g.kw, g.pad[1], g.w);
    let pad = phase_pad(&rows, g.ho()).max(phase_pad(&cols, g.wo()));
    // `dY` as the images of a stride-1 layer (for [`super::nhwc::by_groups`]' padding).
    let gd = ConvGeom {
        cin: g.cout,
        h: g.ho(),
        w: g.wo(),
        cout: g.cin,
        kh: 1,
        kw: 1,
        stride: [1, 1],
        pad: [pad, pad],
        ..*g
    };
    // Phase `(a, b)` at `a·s_w + b`, each with its packed kernel.
    let pairs: Vec<(PhaseDim, PhaseDim)> = rows
        .iter()
        .flat_map(|&r| cols.iter().map(move |&c| (r, c)))
        .collect();
    let weights = pack_phase_weights(w, g, &pairs);
    let blocks = image_blocks(g.batch);
    let lens: Vec<usize> = blocks.iter().map(|b| b.len() * g.in_len()).collect();
    let (cin, hw) = (g.cin, g.h * g.w);
    // SAFETY: the phases partition the input positions (every `(u, v)` is `(s_h·m + a, s_w·n
    // + b)` for one phase); each phase's scratch is written whole (by the tiles, which write
    // every value of the `y` they are given, or with zeros), then every row `u` of every
    // channel and image of the group is written from its phases' rows.
    unsafe {
        super::buf::par_parts_uninit(&lens, Vec::new, |t, out, scratch| {
            super::nhwc::by_groups(
                dy,
                &gd,
                blocks[t].clone(),
                out,
                g.in_len(),
                |xq, count, out| {
                    // The group's phases, `[images, C_in, len_r, len_c]` each, one after another.
                    let sizes: Vec<usize> = pairs
                        .iter()
                        .map(|(r, c)| count * cin * r.len * c.len)
                        .collect();
                    let total: usize = sizes.iter().sum();
                    if scratch.len() < total {
                        scratch.resize(total, MaybeUninit::new(O::ZERO));
                    }
                    let mut rest = &mut scratch[..total];
                    let mut parts: Vec<&[MaybeUninit<O>]> = Vec::with_capacity(pairs.len());
                    for (((r, c), wq), &n) in pairs.iter().zip(&weights).zip(&sizes) {
                        let (ph, tail) = std::mem::take(&mut rest).split_at_mut(n);
                        rest = tail;
                        match wq {
                            Some(wq) if n > 0 => {
                                let at = |d: &PhaseDim| d.shift + pad + 1 - d.taps;
                                let grid = Grid::phase(
                                    &gd,
                                    count,
                                    [at(r), at(c)],
                                    [r.taps, c.taps],
                                    [r.len, c.len],
                                );
                                product_on(&grid, wq, xq, None, false, 0..cin, ph);
                            }
                            _ => ph.fill(MaybeUninit::new(O::ZERO)),
                        }
                        parts.push(ph);
                    }
                    for ic in 0..count * cin {
                        for (ri, r) in rows.iter().enumerate() {
                            let srcs = &parts[ri * sw..][..sw];
                            for m in 0..r.len {
                                let row = &mut out[ic * hw + (sh * m + r.a) * g.w..][..g.w];
                                let src = |ci: usize| {
                                    let n = cols[ci].len;
                                    &srcs[ci][(ic * r.len + m) * n..][..n]
                                };
                                interleave(row, sw, src);
                            }
                        }
                    }
                },
            )
        })
    }
}

/// `row[s·k + b] = src(b)[k]`: the phases of one row put back in order. Two phases (stride
/// 2) as pairs, which the compiler vectorises: written phase by phase, one value every
/// other position, the interleave was a third of the 64 -> 128 layer's input gradient.
fn interleave<'a, T: Copy + 'a>(row: &mut [T], s: usize, src: impl Fn(usize) -> &'a [T]) {
    if s == 2 {
        let (even, odd) = (src(0), src(1));
        for ((d, a), b) in row.chunks_exact_mut(2).zip(even).zip(odd) {
            d[0] = *a;
            d[1] = *b;
        }
        if row.len() % 2 == 1 {
            row[row.len() - 1] = even[even.len() - 1];
        }
        return;
    }
    for b in 0..s.min(row.len()) {
        for (d, v) in row[b..].iter_mut().step_by(s).zip(src(b)) {
            *d = *v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::conv::test_data as data;
    use crate::kernels::nhwc::tests::assert_close;
    use crate::kernels::nhwc_amx::tests::{amx_or_skip, geom};

    /// The input gradient's kernel packed in one pass is the rotated kernel packed: 3x3,
    /// 5x5 and 1x3 kernels, 64-channel blocks with 16- and 48-channel remainders.
    #[test]
    fn pack_rotated_is_the_rotated_kernel_packed() {
        for g in [
            geom(2, 80, 5, 5, 32, 3, 1),
            geom(2, 112, 5, 5, 64, 5, 1),
            ConvGeom {
                kh: 1,
                pad: [0, 1],
                ..geom(2, 48, 5, 5, 32, 3, 1)
            },
        ] {
            let w = data(g.cout * g.k(), 13);
            let want = super::super::nhwc::pack_weights(
                &crate::kernels::conv::rotated(&w, &g),
                &g.input_grad(),
            );
            assert_eq!(&pack_rotated(&w, &g)[..], &want[..], "{g:?}");
        }
    }

    /// A tap of two kernel rows paired 16 words at a time is the pair-by-pair definition, on
    /// whole and ragged rows (5, 16, 21 and 64 channels); a denormal is a zero of its sign
    /// where the vector instruction rounds it.
    #[test]
    fn pair_taps_is_the_pair_by_pair_copy() {
        let vector = crate::kernels::bf16::available();
        let flush = |v: f32| {
            if vector && v.is_subnormal() {
                0.0f32.copysign(v)
            } else {
                v
            }
        };
        for (n, taps) in [(5, 9), (16, 1), (21, 9), (64, 25)] {
            let (mut lo, hi) = (data(n * taps, 3), data(n * taps, 4));
            lo[0] = -3.0e-40;
            for k in [0, taps / 2, taps - 1] {
                let mut got = vec![7u32; n];
                pair_taps(&lo, &hi, taps, k, &mut got);
                let want: Vec<u32> = (0..n)
                    .map(|c| pair(flush(lo[c * taps + k]), flush(hi[c * taps + k])))
                    .collect();
                assert_eq!(got, want, "{n} channels, tap {k} of {taps}");
            }
        }
    }

    /// The strided input gradient by phases against im2col's on the same bf16-rounded
    /// operands: 3x3, 5x5 and 7x7 kernels at strides 2 and 3, a 1x1 at stride 2 (phases
    /// without taps: zeros), unequal row and column strides, odd and even sizes, one image;
    /// the bf16 output is the f32 output rounded once, and 1 and 3 threads give the same bits.
    #[test]
    fn strided_input_grad_matches_im2col() {
        use crate::kernels::act::{bf16, to_bf16};
        use crate::kernels::conv::on_threads;
        if !amx_or_skip() {
            return;
        }
        let uneven = ConvGeom {
            kw: 1,
            stride: [2, 1],
            pad: [1, 0],
            ..geom(2, 16, 9, 7, 32, 3, 2)
        };
        for g in [
            geom(2, 16, 9, 8, 32, 3, 2),
            geom(3, 48, 14, 14, 64, 3, 2),
            geom(1, 80, 8, 8, 96, 3, 2),
            geom(2, 16, 11, 10, 32, 1, 2),
            geom(2, 32, 10, 13, 96, 5, 3),
            geom(2, 16, 12, 11, 32, 7, 2),
            uneven,
        ] {
            assert!(fits_input_grad_strided(&g), "{g:?}");
            let w = data(g.cout * g.k(), 11);
            let dy = data(g.batch * g.out_len(), 12);
            let x = vec![0.0f32; g.batch * g.in_len()];
            let want =
                crate::kernels::im2col::im2col_backward(&x, &w, &dy, &g, [true, false, false]).0;
            let got: Vec<f32> = input_grad_strided(&dy, &w, &g);
            assert_close(&got, &want.unwrap(), &g);
            let dyb = to_bf16(&dy);
            let f32_out: Vec<f32> = input_grad_strided(&dyb, &w, &g);
            for threads in [1, 3] {
                let got: Vec<bf16> = on_threads(threads, || input_grad_strided(&dyb, &w, &g));
                assert_eq!(got, to_bf16(&f32_out), "{g:?} on {threads} threads");
            }
        }
    }
}
