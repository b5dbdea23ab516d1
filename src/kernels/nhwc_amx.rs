//! The channels-last bf16 convolution on AMX tiles: an implicit GEMM that loads its `A` tiles
//! straight out of the padded channels-last image, as oneDNN's AMX convolutions do.
//!
//! [`super::nhwc`] copies each image once into zero-padded channels-last bf16 pairs
//! (`[H_p, W_p, C_in / 2]` words). Along one output row, output positions `q, q + 1, ...` of
//! tap `(i, j)` read windows `stride · C_in / 2` words apart, so 16 consecutive positions and
//! 32 input channels are one `TDPBF16PS` `A` tile (16 rows of 64 bytes, a fixed row stride)
//! with no im2col matrix and no packing: `Y[q][o] = Σ_{tap, c} X[q + tap][c] · W[tap, c][o]`,
//! every tap and channel summed in the tile registers ([`super::amx::conv_block`]), the `B`
//! tiles read from [`super::nhwc`]'s packed weights (pairs of input channels by 64 output
//! channels).
//!
//! At stride 1 the positions run on across output rows: position `v = r · W_p + c` of the
//! padded grid reads its window `v · C_in / 2` words from the image's first, whatever its row,
//! so one run of `(H_out - 1) · W_p + W_out` grid positions covers the whole image in tiles
//! of 16 and the `W_p - W_out` columns of each row that are not outputs are computed and
//! dropped (3% of the products at 56 px, 12% at 14 px, 22% at 7 px). Strided layers run one
//! output row at a time.
//!
//! The f32 tiles (16 positions x 16 output channels) are transposed in registers and stored
//! NCHW, with the bias and ReLU, as [`super::nhwc::forward_act`]'s other kernel does.
//!
//! # Shapes
//! As [`super::nhwc`]: `x: [B, C_in, H, W]`, `w: [C_out, C_in, kh, kw]`, `y: [B, C_out, H_out,
//! W_out]`; here `C_in` a multiple of 32 and `C_out` of 16 ([`fits`]).

use super::act::Act;
use super::amx::PAIRS;
use super::buf::{par_zeroed, par_zeroed_lines_with, par_zeroed_parts};
use super::conv::ConvGeom;
use super::nhwc::{BLOCK, padded};
use std::mem::MaybeUninit;

/// Output positions per block: two `A` tiles.
pub(super) const ROWS: usize = 32;

/// Whether the AMX kernel computes `g` (on a CPU where [`super::amx::enabled`]): whole tiles of
/// input channel pairs and whole tiles of output channels.
pub fn fits(g: &ConvGeom) -> bool {
    g.cin.is_multiple_of(2 * PAIRS) && g.cout.is_multiple_of(16)
}

/// Words past the last image that a block of [`ROWS`] positions may read (its rows past the
/// image's last position): the padded channels-last buffer is this much longer.
pub(super) fn slack(g: &ConvGeom) -> usize {
    let (_, _, kp) = padded(g);
    ROWS * g.stride[1] * kp
}

/// One run of output positions whose windows lie `step` words apart: positions `v <
/// len` from the word `base`; position `v` is output row `row0 + v / wrap`, column `v % wrap`
/// (an output only when that column is below `W_out`).
struct Run {
    base: usize,
    len: usize,
    image: usize,
    row0: usize,
    wrap: usize,
}

/// One run an image over a grid `wrap` positions wide, `count` images `image` words apart:
/// `h x w` outputs, the grid's columns past `w` computed and dropped.
fn image_runs(count: usize, image: usize, [h, w]: [usize; 2], wrap: usize) -> Vec<Run> {
    (0..count)
        .map(|n| Run {
            base: n * image,
            len: (h - 1) * wrap + w,
            image: n,
            row0: 0,
            wrap,
        })
        .collect()
}

/// The runs of `count` images: one per image at stride 1, one per output row otherwise.
fn runs(g: &ConvGeom, count: usize) -> Vec<Run> {
    let (hp, wp, kp) = padded(g);
    let (ho, wo) = (g.ho(), g.wo());
    if g.stride == [1, 1] {
        image_runs(count, hp * wp * kp, [ho, wo], wp)
    } else {
        (0..count)
            .flat_map(|n| {
                (0..ho).map(move |r| Run {
                    base: (n * hp + r * g.stride[0]) * wp * kp,
                    len: wo,
                    image: n,
                    row0: r,
                    wrap: wo,
                })
            })
            .collect()
    }
}

/// What one product's blocks read and write: the taps (`(A` word offset, `B` pair row)` of
/// each), the runs of output positions, the output image's width and size, and how many
/// words of the padded images the last block reads (its rows past a run's end read on).
pub(super) struct Grid {
    kp: usize,
    step: usize,
    taps: Vec<(usize, usize)>,
    runs: Vec<Run>,
    wo: usize,
    p: usize,
    reads: usize,
}

impl Grid {
    /// The grid of `g` over `count` padded images (as [`super::nhwc`] pads them).
    fn of(g: &ConvGeom, count: usize) -> Grid {
        let (_, wp, kp) = padded(g);
        let taps = (0..g.kh)
            .flat_map(|i| (0..g.kw).map(move |j| ((i * wp + j) * kp, (i * g.kw + j) * kp)))
            .collect();
        Grid::new(kp, g.stride[1] * kp, taps, runs(g, count), g.wo(), g.p())
    }

    /// The grid of a strided layer over `count` images split into phase planes
    /// ([`super::nhwc_phases::forward_planes`]): tap `(i, j)` of output `(r, c)` reads plane
    /// `(i mod s_h, j mod s_w)` at `(r + i / s_h, c + j / s_w)`, so the positions run over the
    /// planes' grid as at stride 1, one run an image, instead of one run per output row (a
    /// block of 32 rows held 7 outputs of a 7-wide row).
    pub(super) fn planes(g: &ConvGeom, count: usize) -> Grid {
        let (kp, [sh, sw]) = (g.cin / 2, g.stride);
        let (hq, wq, plane) = plane_dims(g);
        let taps = (0..g.kh)
            .flat_map(|i| {
                (0..g.kw).map(move |j| {
                    let x_off = ((i % sh) * sw + j % sw) * plane + ((i / sh) * wq + j / sw) * kp;
                    (x_off, (i * g.kw + j) * kp)
                })
            })
            .collect();
        let runs = image_runs(count, sh * sw * plane, [g.ho(), g.wo()], wq);
        debug_assert!(hq > 0);
        Grid::new(kp, kp, taps, runs, g.wo(), g.p())
    }

    /// The grid of one phase of a strided layer's input gradient
    /// ([`super::nhwc_phases::input_grad_strided`]): `count` padded output gradients (`gd`: `C_out`
    /// channels, `H_out x W_out` padded by `gd.pad`), an `h x w` output whose position `(m,
    /// n)` reads taps `(t, u) < (kh, kw)` at padded position `(r0 + m + t, c0 + n + u)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn phase(
        gd: &ConvGeom,
        count: usize,
        [r0, c0]: [usize; 2],
        [kh, kw]: [usize; 2],
        [h, w]: [usize; 2],
    ) -> Grid {
        let (hp, wp, kp) = padded(gd);
        assert!(
            r0 + h - 1 + kh <= hp && c0 + w - 1 + kw <= wp,
            "phase taps inside the padded image"
        );
        let taps = (0..kh)
            .flat_map(|t| (0..kw).map(move |u| (((r0 + t) * wp + c0 + u) * kp, (t * kw + u) * kp)))
            .collect();
        let runs = image_runs(count, hp * wp * kp, [h, w], wp);
        Grid::new(kp, kp, taps, runs, w, h * w)
    }

    fn new(
        kp: usize,
        step: usize,
        taps: Vec<(usize, usize)>,
        runs: Vec<Run>,
        wo: usize,
        p: usize,
    ) -> Grid {
        // Block `v0` reads rows `r < ROWS` at `base + (v0 + r)·step + x_off + (0..kp)`.
        let last_tap = taps.iter().map(|t| t.0).max().unwrap_or(0);
        let reads = runs
            .iter()
            .filter(|r| r.len > 0)
            .map(|r| r.base + (r.len.next_multiple_of(ROWS) - 1) * step)
            .max()
            .map_or(0, |last| last + last_tap + kp);
        Grid {
            kp,
            step,
            taps,
            runs,
            wo,
            p,
            reads,
        }
    }
}

/// A strided layer's phase planes: `(H_q, W_q, words a plane)`, `H_q = ceil(H_p / s_h)`.
pub(super) fn plane_dims(g: &ConvGeom) -> (usize, usize, usize) {
    let (hp, wp, kp) = padded(g);
    let (hq, wq) = (hp.div_ceil(g.stride[0]), wp.div_ceil(g.stride[1]));
    (hq, wq, hq * wq * kp)
}

/// Panics unless AMX is enabled, `g` [`fits`] the tiles and `wq` is its kernel packed as
/// [`super::nhwc`] packs one (`C_out · taps · C_in / 2` pair words): the entry checks of every
/// product over a layer's own weights.
pub(super) fn assert_packed_on_tiles(wq: &[u32], g: &ConvGeom) {
    assert!(super::amx::enabled() && fits(g), "AMX convolution of {g:?}");
    assert_eq!(wq.len(), g.cout * g.kh * g.kw * g.cin / 2, "packed weights");
}

/// [`super::nhwc`]'s `product` on the AMX tiles: output channels `couts` (a range starting on a
/// block of [`BLOCK`]) of `count` images from the padded channels-last images `xq` (followed
/// by at least [`slack`] readable words) and the packed weights `wq`; `y` as there (NCHW, per
/// image those channels' `H_out·W_out` values), every value written, in f32 or rounded once
/// to bf16 by the tile epilogue (`O`).
///
/// # Panics
/// When AMX is not [`super::amx::enabled`], `g` does not [`fits`], or a slice is too short.
#[allow(clippy::too_many_arguments)]
pub(super) fn product<O: Act>(
    wq: &[u32],
    xq: &[u32],
    count: usize,
    g: &ConvGeom,
    bias: Option<&[f32]>,
    relu: bool,
    couts: std::ops::Range<usize>,
    y: &mut [MaybeUninit<O>],
) {
    assert_packed_on_tiles(wq, g);
    assert!(couts.end <= g.cout);
    product_on(&Grid::of(g, count), wq, xq, bias, relu, couts, y);
}

/// [`product`] over any [`Grid`]: output channels `couts` of the grid's images from `xq` (at
/// least `grid.reads` words) and the packed weights `wq` (`[blocks][taps][kp][width]`, output
/// channels `couts` inside them); `y` per image those channels' `grid.p` values, every value
/// written.
///
/// # Panics
/// When AMX is not [`super::amx::enabled`], the grid's pairs are not whole tiles, or a slice
/// is too short.
pub(super) fn product_on<O: Act>(
    grid: &Grid,
    wq: &[u32],
    xq: &[u32],
    bias: Option<&[f32]>,
    relu: bool,
    couts: std::ops::Range<usize>,
    y: &mut [MaybeUninit<O>],
) {
    assert!(super::amx::enabled() && grid.kp.is_multiple_of(PAIRS));
    let Grid {
        kp,
        step,
        ref taps,
        ref runs,
        wo,
        p,
        reads,
    } = *grid;
    assert!(reads <= xq.len(), "padded images");
    let per_block = taps.len() * kp;
    assert!(wq.len() >= couts.end * per_block, "packed weights");
    assert!(couts.start.is_multiple_of(BLOCK) && couts.end.is_multiple_of(16));
    assert!(bias.is_none_or(|b| b.len() >= couts.end), "bias");
    let per_image = couts.len() * p;
    let count = runs.iter().map(|r| r.image + 1).max().unwrap_or(0);
    assert_eq!(y.len(), count * per_image, "output");
    let mut c = Scratch([0.0; 4 * 256]);
    let zero = [0.0f32; 16];
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AMX is enabled (asserted), so the CPU has it and the process may use it.
    let _tiles = unsafe { super::amx::Tiles::configure() };
    let mut segs = Segments::EMPTY;
    for o0 in couts.clone().step_by(BLOCK) {
        let width = BLOCK.min(couts.end - o0);
        let wb = &wq[o0 * per_block..][..width * per_block];
        for run in runs {
            for v0 in (0..run.len).step_by(ROWS) {
                // The block's first window; its rows read at most `reads` words (asserted
                // above, [`Grid::new`]).
                let a = xq[run.base + v0 * step..].as_ptr();
                // Where the block's positions land: the same for every tile of output
                // channels, so found once here.
                segs.fill(run, v0, wo);
                for s0 in (0..width).step_by(32) {
                    let v = if width - s0 > 16 { 2 } else { 1 };
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the tiles are configured on this thread; kp is a multiple of
                    // PAIRS (asserted); the A rows are inside `xq` (above), the B rows inside
                    // `wb` (`(w_off + p)·width + s0 + 16·v <= taps·kp·width`); `c` holds four
                    // aligned tiles.
                    unsafe {
                        let b = wb.as_ptr().add(s0);
                        let out = c.0.as_mut_ptr();
                        if v == 2 {
                            super::amx::conv_block::<2>(a, step, taps, kp, b, width, out);
                        } else {
                            super::amx::conv_block::<1>(a, step, taps, kp, b, width, out);
                        }
                    }
                    for vi in 0..v {
                        let o = o0 + s0 + 16 * vi;
                        let b = bias.map_or(&zero[..], |b| &b[o..o + 16]);
                        let at = run.image * per_image + (o - couts.start) * p;
                        // Tile `(ri, vi)` is at `256·(2·ri + vi)`.
                        let tiles = [&c.0[256 * vi..][..256], &c.0[256 * (2 + vi)..][..256]];
                        store_tiles(tiles, segs.get(), b, relu, &mut y[at..][..16 * p], p);
                    }
                }
            }
        }
    }
}

/// The lanes of a block of [`ROWS`] positions that are outputs, as segments of consecutive
/// outputs: `(first lane, end lane, output index)`, at most one a lane. In `u32`s: a `usize`
/// array (17 entries) was zeroed by a `memset` call on every tile, 2.5% of a resnet18 bf16
/// step.
struct Segments {
    segs: [(u32, u32, u32); ROWS],
    n: usize,
}

impl Segments {
    const EMPTY: Segments = Segments {
        segs: [(0, 0, 0); ROWS],
        n: 0,
    };

    /// The segments of positions `first..first + ROWS` of `run` (those below its length) on
    /// an output `wo` columns wide. One division for the block, then the column counted on.
    /// A division a lane, found again for each of the block's tiles of output channels, held
    /// resnet18's 64 -> 64 forward at 56 px (batch 32, 2 threads, AMX Xeon) at 4.3-4.7 ms
    /// outside the tile products, 3.5-3.9 ms with this (six alternated runs, fastest of 10
    /// calls each, the products switched off in a throwaway build).
    fn fill(&mut self, run: &Run, first: usize, wo: usize) {
        let s = self;
        s.n = 0;
        let end = run.len.min(first + ROWS);
        if first >= end {
            return;
        }
        let (mut row, mut col) = (run.row0 + first / run.wrap, first % run.wrap);
        for lane in 0..(end - first) as u32 {
            if col < wo {
                let out = u32::try_from(row * wo + col).expect("output positions fit u32");
                match s.n.checked_sub(1).map(|i| &mut s.segs[i]) {
                    Some(last) if last.1 == lane && last.2 + (lane - last.0) == out => {
                        last.1 = lane + 1
                    }
                    _ => {
                        s.segs[s.n] = (lane, lane + 1, out);
                        s.n += 1;
                    }
                }
            }
            col += 1;
            if col == run.wrap {
                (row, col) = (row + 1, 0);
            }
        }
    }

    fn get(&self) -> &[(u32, u32, u32)] {
        &self.segs[..self.n]
    }
}

/// Two tiles of 16 positions (lanes `0..16` and `16..32` of a block) by 16 output channels
/// (rows of each tile) into `y` (those 16 channels of one image, `p` apart): plus `bias`,
/// `max(·, 0)` when `relu`; lanes `l0..l1` of each segment `(l0, l1, out)` ([`Segments`]) to
/// outputs `out..`.
fn store_tiles<O: Act>(
    tiles: [&[f32]; 2],
    segs: &[(u32, u32, u32)],
    bias: &[f32],
    relu: bool,
    y: &mut [MaybeUninit<O>],
    p: usize,
) {
    assert!(
        tiles.iter().all(|t| t.len() >= 256)
            && bias.len() >= 16
            && segs.iter().all(|&(l0, l1, out)| l0 < l1
                && l1 as usize <= ROWS
                && (out + l1 - l0) as usize <= p)
            && y.len() >= 16 * p,
        "tile outputs"
    );
    #[cfg(target_arch = "x86_64")]
    if super::bf16::available()
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
    {
        // SAFETY: AVX-512 F, BF16 (`bf16::available`), BW and VL detected; each tile holds 256
        // floats, `bias` 16; every store writes lanes `l0..l1` of channel `j` at `y[j·p +
        // out..][..l1 - l0]`, inside `y` (asserted).
        unsafe { store_tiles_avx512(tiles, segs, bias, relu, y.as_mut_ptr(), p) };
        return;
    }
    for &(l0, l1, out) in segs {
        let (l0, l1, out) = (l0 as usize, l1 as usize, out as usize);
        for (j, &b) in bias[..16].iter().enumerate() {
            for lane in l0..l1 {
                let v = tiles[lane / 16][lane % 16 * 16 + j] + b;
                y[j * p + out + lane - l0] =
                    MaybeUninit::new(O::from_f32(if relu { v.max(0.0) } else { v }));
            }
        }
    }
}

/// [`store_tiles`]' stores: each tile transposed in registers, each channel's 32 lanes stored
/// by segment under a mask (as bf16 rounded to nearest even, `VCVTNE2PS2BF16`, when `O` is
/// bf16). A block's 32 lanes hold one or two segments where a tile of 16 held one or two
/// (`W_out` 56), so about half the masked stores, and one rounding instruction for two: the
/// 64 -> 64 forward at 56 px outside the tile products 4.1-4.7 -> 3.3-3.7 ms (four alternated
/// runs, as measured for [`Segments::fill`]).
///
/// # Safety
/// The CPU has AVX-512 F, BW, VL and BF16; each tile holds 256 floats and `bias` 16; for each
/// `(l0, l1, out)` of `segs`, `l0 < l1 <= 32`, and `j < 16`, `y + j·p + out + (0..l1 - l0)` is
/// writable.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16,avx512vl")]
unsafe fn store_tiles_avx512<O: Act>(
    tiles: [&[f32]; 2],
    segs: &[(u32, u32, u32)],
    bias: &[f32],
    relu: bool,
    y: *mut MaybeUninit<O>,
    p: usize,
) {
    use std::arch::x86_64::*;
    let to_bf16 = std::any::TypeId::of::<O>() == std::any::TypeId::of::<super::act::bf16>();
    // The second tile only when a segment reaches into it (a run's last block may end early).
    let both = segs.iter().any(|s| s.1 > 16);
    let mut r = [[_mm512_setzero_si512(); 16]; 2];
    for (regs, tile) in r.iter_mut().zip(tiles).take(if both { 2 } else { 1 }) {
        for (i, v) in regs.iter_mut().enumerate() {
            // SAFETY: row `i < 16` of a 256-float tile.
            *v = unsafe { _mm512_loadu_si512(tile.as_ptr().add(16 * i).cast()) };
        }
        super::simd::transpose16_regs(regs);
    }
    // By index: `r.into_iter()` copied the array with a `memmove` call on every tile.
    for j in 0..16 {
        let b = _mm512_set1_ps(bias[j]);
        let mut v0 = _mm512_add_ps(_mm512_castsi512_ps(r[0][j]), b);
        let mut v1 = _mm512_add_ps(_mm512_castsi512_ps(r[1][j]), b);
        if relu {
            v0 = _mm512_max_ps(v0, _mm512_setzero_ps());
            v1 = _mm512_max_ps(v1, _mm512_setzero_ps());
        }
        // Lanes 0..16 from `v0`, 16..32 from `v1`.
        // SAFETY: a same-size bit cast of a plain vector.
        let h: __m512i = unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(v1, v0)) };
        for &(l0, l1, out) in segs {
            let (l0, l1, out) = (l0 as usize, l1 as usize, out as usize);
            let mask = (((1u64 << (l1 - l0)) - 1) << l0) as u32;
            // Lane `l` lands on `out + l - l0`: the pointer is shifted back `l0` lanes, which
            // only the masked-off lanes would touch.
            let at = y.wrapping_add(j * p + out).wrapping_sub(l0);
            // SAFETY: the masked lanes `l0..l1` write `y + j·p + out + (0..l1 - l0)`, writable
            // by the contract; masked-off lanes are not accessed.
            unsafe {
                if to_bf16 {
                    _mm512_mask_storeu_epi16(at.cast(), mask, h);
                } else {
                    let f: *mut f32 = at.cast();
                    _mm512_mask_storeu_ps(f, mask as u16, v0);
                    _mm512_mask_storeu_ps(f.wrapping_add(16), (mask >> 16) as u16, v1);
                }
            }
        }
    }
}

/// Whether [`weight_grad`] computes `g` (on a CPU where [`super::amx::enabled`]): whole tiles
/// of channels, as [`fits`], and padding smaller than the kernel (strided layers by phase
/// planes).
pub fn fits_weight_grad(g: &ConvGeom) -> bool {
    fits(g) && g.pad[0] < g.kh && g.pad[1] < g.kw && g.stride[0] > 0 && g.stride[1] > 0
}

/// Bytes of padded images and output gradients summed per weight-gradient block before the
/// block is added to `dW`: about half of a Sapphire Rapids core's 2 MiB L2, so a chunk stays
/// there while every block of the layer reads it.
#[cfg(not(test))]
const CHUNK_BYTES: usize = 1 << 20;
#[cfg(test)]
const CHUNK_BYTES: usize = 4096;

/// The weight gradient `dW[o][c, i, j] = Σ_n Σ_q dY[n][o][q] · X[n][c][s·q + (i, j)]` on the
/// AMX tiles: products in bf16, sums in f32.
///
/// Each channel's padded image is split into `s_h x s_w` phase planes (`H_q x W_q`), plane
/// `(a, b)` holding rows `a, a + s_h, ..` and columns `b, b + s_w, ..` (stride 1: one plane,
/// the padded image), so tap `(i, j)` of output `(r, c)` reads plane `(i % s_h, j % s_w)` at
/// `(r + i / s_h, c + j / s_w)`. As in the forward pass the output positions run over the
/// plane's grid (`v = r·W_q + c`, the columns past `W_out` with a zero `dY`), so tap `(i, j)`
/// of position `v` is value `v + (i / s_h)·W_q + j / s_w` of its phase plane and 32
/// consecutive positions are one 64-byte run of it: the `A` tiles are 16 channels' runs (the
/// planes in bf16, channel after channel), the `B` tiles 16 position pairs of `dY` transposed
/// to `[positions / 2, C_out]` pairs, the `K` of the product all positions of a chunk of
/// images ([`super::amx::wgrad_block`]). Threads split the `(tap, 32 channels)` rows of `dWᵀ`,
/// so each sum has one order whatever the thread count.
///
/// # Panics
/// When AMX is not enabled, `g` does not [`fits_weight_grad`], or a slice's length does not
/// match `g`.
pub(super) fn weight_grad<E: Act>(x: &[E], dy: &[E], g: &ConvGeom) -> Vec<f32> {
    use rayon::prelude::*;
    assert!(
        super::amx::enabled() && fits_weight_grad(g),
        "AMX weight gradient of {g:?}"
    );
    g.assert_grad_lens(x.len(), dy.len());
    let (hp, wp, _) = padded(g);
    let (ho, cin, cout, taps) = (g.ho(), g.cin, g.cout, g.kh * g.kw);
    let [sh, sw] = g.stride;
    let (hq, wq) = (hp.div_ceil(sh), wp.div_ceil(sw));
    let plane = hq * wq;
    // Halves from one channel's planes to the next's: the A tiles' row stride.
    let per_channel = sh * sw * plane;
    let tap_offset = |t: usize| {
        let (i, j) = (t / g.kw, t % g.kw);
        ((i % sh) * sw + j % sw) * plane + (i / sh) * wq + j / sw
    };
    let vpad = (ho * wq).next_multiple_of(32);
    let last_tap = (0..taps).map(tap_offset).max().unwrap_or(0);
    // The last channel's last run reads `last_tap + vpad` halves from its planes' start.
    let img_x = (cin * per_channel)
        .max((cin - 1) * per_channel + last_tap + vpad)
        .next_multiple_of(2);
    let img_d = vpad / 2 * cout;
    let xb = par_zeroed(
        g.batch * img_x / 2,
        img_x / 2,
        x.par_chunks(g.in_len()),
        |d: &mut [f32], s| {
            super::nhwc::phase_planes_into(s, g, hq, wq, bytemuck::cast_slice_mut(d))
        },
    );
    let xb: &[u16] = bytemuck::cast_slice(&xb);
    // dY on the padded grid (zero past each row's `W_out` outputs and past the last row),
    // `[C_out, vpad]` halves, then transposed as pairs to `[vpad / 2, C_out]` words. The
    // scratch's zero columns are never written, so they stay zero from image to image.
    let dyv = par_zeroed_lines_with(
        g.batch * img_d,
        img_d,
        dy.par_chunks(g.out_len()),
        || vec![0u32; img_d],
        |scratch, d: &mut [f32], s| super::nhwc::dy_pairs_into(s, g, vpad, wq, scratch, d),
    );
    let dyv: &[u32] = bytemuck::cast_slice(&dyv);
    let blocks = cin / 32;
    let units = taps * blocks;
    let parts = rayon::current_num_threads().clamp(1, units);
    let part_units = |t: usize| t * units / parts..(t + 1) * units / parts;
    let chunk = (CHUNK_BYTES / (2 * img_x + 4 * img_d)).clamp(1, g.batch.max(1));
    let lens: Vec<usize> = (0..parts)
        .map(|t| part_units(t).len() * 32 * cout)
        .collect();
    // Part `t`: the rows `slot = tap·C_in + c` of `dWᵀ` of its units, `[slots, C_out]`.
    let dwt = par_zeroed_parts(&lens, |t, part| {
        let first_slot = part_units(t).start * 32;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AMX is enabled (asserted above).
        let _tiles = unsafe { super::amx::Tiles::configure() };
        for n0 in (0..g.batch).step_by(chunk) {
            let images = chunk.min(g.batch - n0);
            // The chunk's last A row ends inside its last image (`img_x`, above); its dY
            // inside `dyv`.
            assert!((n0 + images) * img_x <= xb.len() && (n0 + images) * img_d <= dyv.len());
            for u in part_units(t) {
                let (tap, cb) = (u / blocks, u % blocks);
                let a = xb[n0 * img_x + cb * 32 * per_channel + tap_offset(tap)..].as_ptr();
                let a = super::amx::Runs {
                    ptr: a,
                    rs: per_channel,
                    img: img_x,
                };
                let steps = vpad / 32;
                for o0 in (0..cout).step_by(32) {
                    let b = dyv[n0 * img_d + o0..].as_ptr();
                    // The unit's 32 rows of `dWᵀ` from column `o0`: the block's sums over
                    // the chunk are added to them in the tiles.
                    let dst = part[(u * 32 - first_slot) * cout + o0..]
                        [..31 * cout + 32.min(cout - o0)]
                        .as_mut_ptr();
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: the tiles are configured on this thread; image `n` of the
                    // chunk's A rows `r < 32` read `(n0 + n)·img_x + (32·cb + r)·per_channel
                    // + tap_offset + (0..vpad)`, inside `xb` (`img_x` covers the last
                    // channel's last run); its B rows `(0..vpad / 2)·C_out + o0 + (0..w)`,
                    // `w = min(32, C_out - o0)` (the tiles `V` cover), inside its `img_d`
                    // words of `dyv`; `dst + r·C_out + (0..w)` for `r < 32` is inside `part`
                    // (the slice just taken).
                    unsafe {
                        use super::amx::wgrad_block;
                        if cout - o0 > 16 {
                            wgrad_block::<2, 2>(
                                a,
                                None,
                                b,
                                cout,
                                img_d,
                                images,
                                steps,
                                dst,
                                Some(cout),
                            );
                        } else {
                            wgrad_block::<2, 1>(
                                a,
                                None,
                                b,
                                cout,
                                img_d,
                                images,
                                steps,
                                dst,
                                Some(cout),
                            );
                        }
                    }
                }
            }
        }
    });
    let slot_of: Vec<usize> = (0..cin * taps)
        .map(|row| (row % taps) * cin + row / taps)
        .collect();
    super::gemm::sum_transposed_in_order(&[&dwt], cin * taps, cout, Some(&slot_of))
}

/// Four f32 tiles (16 x 16 each), aligned for `TILESTORED`.
#[repr(C, align(64))]
struct Scratch([f32; 4 * 256]);

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::kernels::conv::test_data as data;

    use super::super::nhwc::tests::assert_close;

    /// [`super::super::nhwc::tests::geom`] with its own width.
    pub(in crate::kernels) fn geom(
        batch: usize,
        cin: usize,
        h: usize,
        w: usize,
        cout: usize,
        k: usize,
        s: usize,
    ) -> ConvGeom {
        ConvGeom {
            w,
            ..super::super::nhwc::tests::geom(batch, cin, h, cout, k, s)
        }
    }

    /// Whether AMX runs here; else says the test is skipped. `amx::tests::
    /// a_cpu_that_reports_amx_runs_it` fails where the CPU has AMX and it is not enabled, so
    /// a skip is never silent there.
    pub(in crate::kernels) fn amx_or_skip() -> bool {
        let on = super::super::amx::enabled();
        if !on {
            eprintln!("skipped: no AMX on this CPU");
        }
        on
    }

    /// Through [`super::super::nhwc::forward_act`] (which takes this kernel wherever AMX runs
    /// and the layer [`fits`]) against im2col on the same bf16-rounded operands: runs across
    /// output rows, maps narrower and wider than a tile, strides 1 and 2, a 1x1, blocks of 64
    /// output channels with a 16- and a 48-channel remainder, groups of images, bias and ReLU.
    #[test]
    fn matches_im2col_in_bf16() {
        if !amx_or_skip() {
            return;
        }
        for g in [
            geom(3, 32, 5, 6, 16, 3, 1),
            geom(2, 64, 7, 7, 80, 3, 1),
            geom(2, 32, 18, 21, 48, 3, 1),
            geom(2, 64, 9, 8, 112, 3, 2),
            geom(3, 32, 4, 4, 64, 1, 1),
            geom(2, 32, 11, 9, 32, 1, 2),
            geom(1, 96, 20, 17, 64, 5, 1),
            geom(4, 32, 3, 3, 144, 3, 1),
        ] {
            assert!(fits(&g) && super::super::nhwc::fits(&g), "{g:?}");
            let x = data(g.batch * g.in_len(), 1);
            let w = data(g.cout * g.k(), 2);
            let b = data(g.cout, 3);
            for relu in [false, true] {
                let got = super::super::nhwc::forward_act(&x, &w, Some(&b), &g, relu);
                let want = super::super::im2col::im2col_forward_act(&x, &w, Some(&b), &g, relu);
                assert_close(&got, &want, &(g, relu));
            }
            // One image on three threads splits by output channels: the same values.
            let one = &x[..g.in_len()];
            let g1 = ConvGeom { batch: 1, ..g };
            let run = |t| {
                crate::kernels::conv::on_threads(t, || {
                    super::super::nhwc::forward_act(one, &w, Some(&b), &g1, false)
                })
            };
            assert_eq!(run(1), run(3), "{g1:?}");
        }
    }

    /// [`super::super::nhwc::forward_rounded`] (which `forward_act` now takes for a batch of at
    /// least one image per thread) against the other path to the same tiles, one image at a
    /// time with its output channels split over 3 threads (an f32 output zeroed first): in f32
    /// the same bits, in bf16 those rounded once; from f32 and bf16 inputs, strides 1 and 2,
    /// 16-, 48-, 80- and 112-channel blocks, bias and ReLU, on 1 and 3 threads.
    #[test]
    fn rounded_output_is_the_f32_output_rounded_once() {
        use crate::kernels::act::{bf16, to_bf16};
        use crate::kernels::conv::on_threads;
        use crate::kernels::nhwc::{forward_act, forward_rounded};
        if !amx_or_skip() {
            return;
        }
        for g in [
            geom(3, 32, 5, 6, 16, 3, 1),
            geom(4, 64, 9, 8, 112, 3, 2),
            geom(3, 32, 18, 21, 48, 3, 1),
            geom(3, 96, 7, 7, 80, 5, 1),
            // Strided on phase planes: odd and even maps, 7 outputs a row, 5x5 at stride 3,
            // a 1x1 at stride 2.
            geom(3, 32, 14, 13, 64, 3, 2),
            geom(3, 64, 14, 14, 32, 3, 2),
            geom(3, 32, 11, 12, 48, 5, 3),
            geom(3, 32, 9, 9, 32, 1, 2),
        ] {
            let x = data(g.batch * g.in_len(), 7);
            let xb = to_bf16(&x);
            let w = data(g.cout * g.k(), 8);
            let b = data(g.cout, 9);
            for relu in [false, true] {
                // Image by image: fewer images than threads, so not `forward_rounded`.
                fn by_image<E: Act>(
                    x: &[E],
                    w: &[f32],
                    b: &[f32],
                    g: &ConvGeom,
                    relu: bool,
                ) -> Vec<f32> {
                    let g1 = ConvGeom { batch: 1, ..*g };
                    on_threads(3, || {
                        x.chunks(g.in_len())
                            .flat_map(|xn| forward_act(xn, w, Some(b), &g1, relu))
                            .collect()
                    })
                }
                let (want, want_b) = (
                    by_image(&x, &w, &b, &g, relu),
                    by_image(&xb, &w, &b, &g, relu),
                );
                for threads in [1, 3] {
                    on_threads(threads, || {
                        let got: Vec<bf16> = forward_rounded(&xb, &w, Some(&b), &g, relu);
                        assert_eq!(got, to_bf16(&want_b), "{g:?} relu {relu}");
                        let got: Vec<f32> = forward_rounded(&xb, &w, Some(&b), &g, relu);
                        assert_eq!(got, want_b, "{g:?} relu {relu}");
                        let got: Vec<f32> = forward_rounded(&x, &w, Some(&b), &g, relu);
                        assert_eq!(got, want, "{g:?} relu {relu}");
                    });
                }
            }
        }
    }

    /// The weight gradient against im2col's on the same bf16-rounded operands (3x3, 5x5 and
    /// 1x1 kernels; maps narrower and wider than a tile; 16- and 32-wide output blocks;
    /// several chunks of images), and the same bits for 1 and 3 threads.
    #[test]
    fn weight_grad_matches_im2col_in_bf16() {
        if !amx_or_skip() {
            return;
        }
        for g in [
            geom(3, 32, 5, 6, 16, 3, 1),
            geom(2, 64, 7, 7, 80, 3, 1),
            geom(2, 32, 18, 21, 48, 3, 1),
            geom(3, 32, 4, 4, 64, 1, 1),
            geom(2, 96, 9, 11, 32, 5, 1),
            // Strided, by phase planes: a 3x3/2 on even and odd sides, a 1x1/2, a 5x5/3.
            geom(2, 32, 10, 9, 48, 3, 2),
            geom(3, 64, 7, 8, 16, 3, 2),
            geom(2, 32, 9, 9, 64, 1, 2),
            geom(2, 32, 11, 10, 32, 5, 3),
        ] {
            assert!(fits_weight_grad(&g), "{g:?}");
            let x = data(g.batch * g.in_len(), 4);
            let dy = data(g.batch * g.out_len(), 5);
            let w = data(g.cout * g.k(), 6);
            let got = weight_grad(&x, &dy, &g);
            let want = super::super::im2col::im2col_backward(&x, &w, &dy, &g, [false, true, false])
                .1
                .unwrap();
            assert_close(&got, &want, &g);
            let run = |t| crate::kernels::conv::on_threads(t, || weight_grad(&x, &dy, &g));
            assert_eq!(run(1), run(3), "{g:?}");
        }
    }
}
