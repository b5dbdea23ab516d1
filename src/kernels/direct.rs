//! Stride-1 convolution computed directly on a zero-padded copy of each image, with
//! register-tiled kernels of its own: no im2col buffer and no GEMM packing.
//!
//! In an image padded to `[C, H_p, W_p]`, output position `n = y·W_p + x` of kernel tap
//! `(c, i, j)` reads input `n + off(c, i, j)` with `off = c·H_p·W_p + i·W_p + j`: for every
//! tap, consecutive positions read consecutive floats. So the convolution is a GEMM whose
//! right operand `X[k][n] = xp[off(k) + n]` is never built: the kernels load 16 (AVX-512) or
//! 8 (AVX2) positions at a time straight from the padded image through a table of
//! `K = C·kh·kw` offsets (the "indirect" convolution of Dukhan 2019, "The Indirect Convolution
//! Algorithm", with the table indexed by tap instead of by pixel):
//!
//! - forward:         `Y[o][n] = Σ_k W[o][k] · X[k][n]` (weights broadcast, positions in the
//!   vector lanes: 8 output channels x 48 positions per register tile on AVX-512, 6 x 16 on
//!   AVX2)
//! - weight gradient: `dW[o][k] += Σ_n dY[o][n] · X[k][n]` (4 x 4 `(o, k)` pairs per tile on
//!   AVX-512, 2 x 4 on AVX2, each a vector of partial sums over positions, reduced at the end)
//! - input gradient:  the forward convolution of `dY` with the kernel turned 180° and its
//!   channels swapped (stride 1 makes the transposed convolution an ordinary one).
//!
//! Positions run over `H_out` rows of `W_p` (not `W_out`) columns, so `W_p - W_out` columns
//! per row are computed and dropped: 6% extra work at 32 px. In return the 9x copy of im2col
//! becomes a 1x copy (the padding), and nothing is packed or transposed. That is what slows
//! im2col + the `gemm` crate on narrow layers: with 16 output channels its products have
//! `M = 16`, one vector, and the column buffer's writes and reads cost as much as the
//! multiplies. Two other formulations were measured first and were no faster than im2col on
//! the 16-channel layers of resnet18_small: channels-last images through the `gemm` crate
//! (its packing and `16 x 6` edge kernel), and channels-last with output channels in the lanes
//! (one broadcast per multiply-add).
//!
//! With `precision = "bf16"` on a CPU with AVX512-BF16 the same products run on `VDPBF16PS`,
//! which multiplies a pair of bf16 per 32-bit lane: the forward product on pairs of input
//! channels (weights and padded image both paired, [`Pairs`]), the weight gradient on pairs of
//! consecutive positions ([`PositionPairs`]); sums stay f32. On resnet18_small's 16-channel
//! 32 px layers (one thread, `conv_layers 1 bf16`, Zen 5) that took forward 2.3 -> 1.3 ms,
//! input gradient 2.0 -> 1.0 and weight gradient 1.9 -> 1.3 against im2col + the bf16 GEMM.
//!
//! # Shapes
//! `x: [B, C_in, H, W]`, `w: [C_out, C_in, kh, kw]`, `y: [B, C_out, H_out, W_out]` (NCHW, as
//! everywhere in [`super::conv`]); internally `[C, H_p, W_p]` per image, `H_p = H + 2·ph`.

use super::buf::par_zeroed_with;
use super::conv::{ConvGeom, ConvGrads, image_blocks, sum_in_order};
use super::simd::{dispatched, relu_row};
use super::vector::{Unit, on_units};
use rayon::prelude::*;

/// Floats per vector of positions: one AVX-512 register, two AVX2 ones. Rows of the product are
/// padded to a multiple of it.
const LANES: usize = 16;

/// Which register-tiled kernels run: written for AVX-512 (32 registers of 16 floats) and for
/// AVX2 + FMA (16 registers of 8), picked at run time; the portable loops exist so the tests
/// check the same arithmetic on any machine (they are slower than im2col, so without AVX2
/// [`applies`] says no).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The widest this CPU runs.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if Unit::Avx512.runs_here() {
                return Isa::Avx512;
            }
            if Unit::Avx2.runs_here() {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every kernel set this CPU can run, widest first (for the tests).
    #[cfg(test)]
    fn runnable() -> Vec<Self> {
        let all = [Isa::Avx512, Isa::Avx2, Isa::Portable];
        all.into_iter().skip_while(|&i| i != Isa::best()).collect()
    }
}

/// Whether the register-tiled kernels can run on this CPU (AVX-512 or AVX2 + FMA).
pub fn available() -> bool {
    Isa::best() != Isa::Portable
}

/// Whether the AVX-512 tiles run here (the widest; Winograd gives 32-channel layers to them,
/// [`super::winograd::applies`]).
pub fn wide() -> bool {
    Isa::best() == Isa::Avx512
}

/// Whether this path computes `g` (forward, and both gradients): an AVX-512 or AVX2 CPU,
/// stride 1, a kernel wider than one pixel, at least 16 output channels, and outputs 16+ wide
/// (the dropped columns cost `2·pw / W_out`; at 4 px the 128-channel layers of resnet18_small
/// ran 2.5x slower than im2col). The caller tries Winograd first (as fast on 32-channel 16 px
/// layers, faster on wider ones), and takes the input gradient of layers with fewer than 16
/// input channels from im2col (its outputs would fill a fraction of a register tile; RGB
/// stems need none). Measured with `cargo run --release --example conv_layers 2 fp32
/// resnet18_small` (and `bench-vgg`): the 16-channel 32 px layers of resnet18_small went from
/// 4.6-5.0 to 3.7-4.0 ms forward and 4.3-4.5 to 3.4-3.6 ms input gradient per batch of 64 on
/// one thread, the RGB stems' weight gradient from 4.0-5.5 to 2.0-2.4 ms (bench-vgg) and
/// 1.1-1.6 to 0.4 ms (resnet18_small). With the AVX2 tiles on an AMD EPYC Zen 3 (no AVX-512,
/// 2026-12-01, same command): the 16-channel layer 12.7 -> 7.7 ms forward, 23.7 -> 13.6 ms
/// backward; the stem's backward 3.4 -> 2.0 ms.
///
/// In bf16 the products run on `VDPBF16PS`: the forward one (and so the input gradient) on
/// pairs of channels ([`Pairs`]), the weight gradient on pairs of positions
/// ([`PositionPairs`]).
pub fn applies(g: &ConvGeom) -> bool {
    available() && fits(g)
}

/// The geometry the direct kernels compute (whatever the CPU): the rules of [`applies`]
/// without the instruction-set check; the kernel plan ([`super::plan`]) combines them.
pub fn fits(g: &ConvGeom) -> bool {
    g.stride == [1, 1]
        && g.kh * g.kw > 1
        && g.cin > 0
        && g.cout >= 16
        && g.pad[0] < g.kh
        && g.pad[1] < g.kw
        && g.wo() >= 16
}

/// Where one geometry's operands live in the padded image.
struct Layout {
    hp: usize,
    wp: usize,
    /// Positions computed, `H_out · W_p`, rounded up to whole vectors: the row length of the
    /// outputs.
    np: usize,
    /// Floats of the padded image, with the slack the dropped columns and the last vector read:
    /// the largest offset plus `np`, all that the products may touch.
    len: usize,
    /// `off(c, i, j)` in the weights' order `[C_in, kh, kw]`.
    offs: Vec<usize>,
}

impl Layout {
    fn new(g: &ConvGeom) -> Self {
        let (hp, wp) = (g.h + 2 * g.pad[0], g.w + 2 * g.pad[1]);
        Layout::grid(g.cin, hp, wp, g.ho(), g.kh, g.kw)
    }

    /// `cin` planes of `hp x wp` (already padded), `ho` output rows, a `kh x kw` kernel.
    fn grid(cin: usize, hp: usize, wp: usize, ho: usize, kh: usize, kw: usize) -> Self {
        let n = ho * wp;
        let np = n.div_ceil(LANES) * LANES;
        let mut offs = Vec::with_capacity(cin * kh * kw);
        for c in 0..cin {
            for i in 0..kh {
                for j in 0..kw {
                    offs.push(c * hp * wp + i * wp + j);
                }
            }
        }
        // The last tap of the last channel reads up to `off + np - 1`.
        let len = cin * hp * wp + kw - 1 + np - n;
        Layout {
            hp,
            wp,
            np,
            len,
            offs,
        }
    }

    /// The zero-padded copy of one image `[C, H, W]` into `xp`, a buffer used only with this
    /// layout: every image writes the same interior positions, so the border and the slack
    /// stay zero from the first call and are not cleared again (a whole-buffer clear per image
    /// was 14 MB of memset per layer and step for resnet18_small's 16-channel layers).
    fn pad(&self, x: &[f32], g: &ConvGeom, xp: &mut Vec<f32>) {
        let [ph, pw] = g.pad;
        if xp.len() != self.len {
            xp.clear();
            xp.resize(self.len, 0.0);
        }
        for (c, plane) in x.chunks(g.h * g.w).enumerate() {
            for (y, row) in plane.chunks(g.w).enumerate() {
                let at = c * self.hp * self.wp + (y + ph) * self.wp + pw;
                xp[at..at + g.w].copy_from_slice(row);
            }
        }
    }
}

dispatched! {
    /// `dst[i]` = `src[i]` rounded to bf16 (to nearest even), as its upper 16 bits.
    fn round_halves(src: &[f32], dst: &mut [u16]) {
        for (d, &x) in dst.iter_mut().zip(src) {
            *d = super::bf16::round_bits(x) as u16;
        }
    }
}

dispatched! {
    /// `dst[i]` = the bf16 pair `(lo[i], hi[i])` (`hi` zero when absent).
    fn pair_row(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
        match hi {
            Some(h) => {
                for ((d, &a), &b) in dst.iter_mut().zip(lo).zip(h) {
                    *d = super::bf16::pair(a, b);
                }
            }
            None => {
                for (d, &a) in dst.iter_mut().zip(lo) {
                    *d = super::bf16::pair(a, 0.0);
                }
            }
        }
    }
}

/// bf16 operands for `VDPBF16PS`, which multiplies pairs of bf16 in each 32-bit lane: the
/// padded image with channels `2c` and `2c + 1` in the low and high halves of one word per
/// position (`[⌈C/2⌉, H_p, W_p]` words), the weights likewise in channel pairs. A tap `(c, i, j)`
/// of the f32 kernels becomes a tap `(c/2, i, j)` of pairs, so the same tiles, offsets and
/// output layout apply with half the taps, each doing two multiply-adds per lane.
struct Pairs {
    /// The layout of the paired image: [`Layout`] of a geometry with `⌈C/2⌉` channels.
    lay: Layout,
    /// `[C_out, ⌈C/2⌉ · kh · kw]` weight pairs, bf16-rounded (the odd last channel paired
    /// with zero).
    w: Vec<u32>,
}

impl Pairs {
    fn new(w: &[f32], g: &ConvGeom) -> Self {
        let pairs = g.cin.div_ceil(2);
        let lay = Layout::new(&ConvGeom { cin: pairs, ..*g });
        let taps = g.kh * g.kw;
        let mut wq = vec![0u32; g.cout * pairs * taps];
        for (o, dst) in wq.chunks_mut(pairs * taps).enumerate() {
            let wo = &w[o * g.cin * taps..][..g.cin * taps];
            for (cp, d) in dst.chunks_mut(taps).enumerate() {
                let lo = &wo[2 * cp * taps..][..taps];
                let hi = wo.get((2 * cp + 1) * taps..(2 * cp + 2) * taps);
                for (t, word) in d.iter_mut().enumerate() {
                    *word = super::bf16::pair(lo[t], hi.map_or(0.0, |h| h[t]));
                }
            }
        }
        Pairs { lay, w: wq }
    }

    /// [`Layout::pad`] for the paired image: every interior word rewritten, the border and
    /// slack zero from the first call.
    fn pad(&self, x: &[f32], g: &ConvGeom, xq: &mut Vec<u32>) {
        let (lay, [ph, pw], plane) = (&self.lay, g.pad, g.h * g.w);
        if xq.len() != lay.len {
            xq.clear();
            xq.resize(lay.len, 0);
        }
        for cp in 0..g.cin.div_ceil(2) {
            let lo = &x[2 * cp * plane..][..plane];
            let hi = x.get((2 * cp + 1) * plane..(2 * cp + 2) * plane);
            for y in 0..g.h {
                let at = cp * lay.hp * lay.wp + (y + ph) * lay.wp + pw;
                let (dst, l) = (&mut xq[at..at + g.w], &lo[y * g.w..][..g.w]);
                pair_row(l, hi.map(|h| &h[y * g.w..][..g.w]), dst);
            }
        }
    }
}

on_units! {
    /// `Y[o][n0..n0 + L·NV] = Σ_k W[o·ldw + k] · X[off_k + n0..]` for `R` output channels, `L`
    /// the vector's lanes: `R·NV` sums in registers (8 x 3 of AVX-512's 32, 6 x 2 of AVX2's 16).
    ///
    /// # Safety
    /// The unit is present; `w` holds `R` rows of `offs.len()` weights `ldw` apart, `x + off_k`
    /// `L·NV` floats for every offset, `y` `R` rows of `L·NV` floats `ldy` apart.
    unsafe fn forward_tile / forward_tile_v<V: Vector, const R: usize, const NV: usize>(
        offs: &[usize],
        w: *const f32,
        ldw: usize,
        x: *const f32,
        y: *mut f32,
        ldy: usize,
    ) {
        let (l, all) = (V::LANES, V::mask(V::LANES));
        // SAFETY: for the whole body, the caller's contract bounds every offset below and
        // says the CPU has `V`'s instructions.
        unsafe {
            let mut acc = [[V::zero(); NV]; R];
            for (k, &off) in offs.iter().enumerate() {
                let xk = x.add(off);
                // A loop, not `std::array::from_fn`: its closure would be compiled without the
                // unit's features and called.
                let mut xv = [V::zero(); NV];
                for (v, xv) in xv.iter_mut().enumerate() {
                    *xv = V::load(all, xk.add(v * l));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let a = V::splat(*w.add(r * ldw + k));
                    for v in 0..NV {
                        row[v] = V::fma(a, xv[v], row[v]);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (v, &sum) in row.iter().enumerate() {
                    V::store(all, y.add(r * ldy + v * l), sum);
                }
            }
        }
    }
}

/// The AVX-512 forward products' loop order: positions outside in blocks of 48 (16 for the
/// last few), so a block's slice of every tap stays in L1 while all the channels use it;
/// channels inside, 8 at a time (then 1). Calls `tile(o, n0, eight, wide)` per register tile.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn forward_blocks(cout: usize, np: usize, mut tile: impl FnMut(usize, usize, bool, bool)) {
    let mut n0 = 0;
    while n0 < np {
        let wide = np - n0 >= 3 * LANES;
        let mut o = 0;
        while o < cout {
            let eight = cout - o >= 8;
            tile(o, n0, eight, wide);
            o += if eight { 8 } else { 1 };
        }
        n0 += if wide { 3 * LANES } else { LANES };
    }
}

/// The weight-gradient products' loop order: `rows` channels (then 1) by 4 taps (then 1).
/// Calls `tile(o, t, full_rows, four_taps)` per register tile.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn weight_grad_blocks(
    cout: usize,
    k: usize,
    rows: usize,
    mut tile: impl FnMut(usize, usize, bool, bool),
) {
    let mut o = 0;
    while o < cout {
        let full = cout - o >= rows;
        let mut t = 0;
        while t < k {
            let four = k - t >= 4;
            tile(o, t, full, four);
            t += if four { 4 } else { 1 };
        }
        o += if full { rows } else { 1 };
    }
}

/// [`forward_tile`] on channel pairs: `w` and `x` hold bf16 pairs ([`Pairs`]), each step two
/// multiply-adds per lane, summed in f32.
///
/// # Safety
/// The CPU has AVX-512 F and BF16; as [`forward_tile`], in 32-bit words.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn forward_tile_bf16<const R: usize, const V: usize>(
    offs: &[usize],
    w: *const u32,
    ldw: usize,
    x: *const u32,
    y: *mut f32,
    ldy: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    // SAFETY: for the whole body, the caller's contract bounds every offset below; `__m512bh` and
    // `__m512i` are the same 64 bytes.
    unsafe {
        for (k, &off) in offs.iter().enumerate() {
            let xk = x.add(off);
            let xv: [__m512bh; V] = std::array::from_fn(|v| {
                std::mem::transmute(_mm512_loadu_si512(xk.add(v * LANES).cast()))
            });
            for (r, row) in acc.iter_mut().enumerate() {
                let a: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*w.add(r * ldw + k) as i32));
                for v in 0..V {
                    row[v] = _mm512_dpbf16_ps(row[v], a, xv[v]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, &sum) in row.iter().enumerate() {
                _mm512_storeu_ps(y.add(r * ldy + v * LANES), sum);
            }
        }
    }
}

/// [`forward_product`] on channel pairs (AVX-512 BF16): `w` is `[C_out, K/2]` pairs, `xq` the
/// paired image, `y` `[C_out, np]`.
fn forward_product_bf16(cout: usize, w: &[u32], xq: &[u32], lay: &Layout, y: &mut [f32]) {
    let (k, np) = (lay.offs.len(), lay.np);
    assert!(
        super::bf16::available(),
        "bf16 direct convolution needs AVX512-BF16"
    );
    assert_eq!(w.len(), cout * k, "weights");
    assert_eq!(y.len(), cout * np, "output");
    assert!(xq.len() >= lay.len, "padded image");
    #[cfg(target_arch = "x86_64")]
    {
        let (wp, x, yp, offs) = (w.as_ptr(), xq.as_ptr(), y.as_mut_ptr(), &lay.offs[..]);
        // The AVX-512 f32 loop's order and tiles (8 channels x 48 positions).
        forward_blocks(cout, np, |o, n0, eight, wide| {
            // SAFETY: AVX-512 F and BF16 were asserted above; the asserts bound every row
            // `< C_out`, tap `< K/2` and position `< np` the tiles touch.
            unsafe {
                let (xn, wo, yo) = (x.add(n0), wp.add(o * k), yp.add(o * np + n0));
                match (eight, wide) {
                    (true, true) => forward_tile_bf16::<8, 3>(offs, wo, k, xn, yo, np),
                    (true, false) => forward_tile_bf16::<8, 1>(offs, wo, k, xn, yo, np),
                    (false, true) => forward_tile_bf16::<1, 3>(offs, wo, k, xn, yo, np),
                    (false, false) => forward_tile_bf16::<1, 1>(offs, wo, k, xn, yo, np),
                }
            }
        });
    }
}

/// [`weight_grad_tile`] on pairs of positions: `dy` rows hold bf16 pairs `(n, n + 1)` for even
/// `n`, and so does `x` (bf16 halves) read as words from each tap's offset; `nv` vectors of 16
/// words (32 positions).
///
/// # Safety
/// The CPU has AVX-512 F and BF16; `dy` holds `R` rows of `16·nv` words `ldd` apart, `x + off_t`
/// `32·nv` halves for each of the `T` offsets, `dw` `R` rows of `T` floats `ldw` apart.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn weight_grad_tile_bf16<const R: usize, const T: usize>(
    nv: usize,
    dy: *const u32,
    ldd: usize,
    x: *const u16,
    offs: &[usize],
    dw: *mut f32,
    ldw: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); T]; R];
    // SAFETY: for the whole body, the caller's contract bounds every offset below; `__m512bh` and
    // `__m512i` are the same 64 bytes; the loads are unaligned.
    unsafe {
        let xs: [*const u16; T] = std::array::from_fn(|t| x.add(offs[t]));
        for v in 0..nv {
            let xv: [__m512bh; T] = std::array::from_fn(|t| {
                std::mem::transmute(_mm512_loadu_si512(xs[t].add(2 * v * LANES).cast()))
            });
            for (r, row) in acc.iter_mut().enumerate() {
                let dv: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(dy.add(r * ldd + v * LANES).cast()));
                for t in 0..T {
                    row[t] = _mm512_dpbf16_ps(row[t], dv, xv[t]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (t, &sum) in row.iter().enumerate() {
                *dw.add(r * ldw + t) += _mm512_reduce_add_ps(sum);
            }
        }
    }
}

/// The bf16 operands of one image's weight gradient, paired along positions: `dY` and the
/// padded image rounded to bf16, one 16-bit half per float. The 32-bit word at half `i` is the
/// pair `(v[i], v[i + 1])`, so a tap's run `X[off + n]` for even `n` is read as words from half
/// `off`, whichever its parity (unaligned loads).
#[derive(Default)]
struct PositionPairs {
    /// `[C_out, row]` halves: `dY` over the product's positions, zero past `np`.
    dy: Vec<u16>,
    /// The padded image, then zeros for the last vector's extra positions.
    x: Vec<u16>,
}

impl PositionPairs {
    /// Halves per `dY` row: `np` rounded up to whole vectors of 32 positions.
    fn row(lay: &Layout) -> usize {
        lay.np.next_multiple_of(2 * LANES)
    }

    /// Rounds `dyp` (`[C_out, np]`) and the padded image `xp` to bf16.
    fn fill(&mut self, dyp: &[f32], xp: &[f32], lay: &Layout) {
        let row = Self::row(lay);
        self.dy.resize(dyp.len() / lay.np * row, 0);
        for (d, s) in self.dy.chunks_mut(row).zip(dyp.chunks(lay.np)) {
            round_halves(s, &mut d[..lay.np]);
        }
        // Each tap reads `row` halves from its offset, up to `row - np` past `lay.len`.
        self.x.resize(lay.len + row - lay.np + 2, 0);
        round_halves(&xp[..lay.len], &mut self.x[..lay.len]);
    }

    /// `dW[o][k] += Σ_n dY[o][n] · X[off_k + n]` for every channel and tap (AVX-512 BF16).
    fn weight_grad(&self, cout: usize, lay: &Layout, dw: &mut [f32]) {
        let (k, row) = (lay.offs.len(), Self::row(lay));
        assert!(
            super::bf16::available(),
            "bf16 direct convolution needs AVX512-BF16"
        );
        assert_eq!(dw.len(), cout * k, "weight gradient");
        assert_eq!(self.dy.len(), cout * row, "output gradient");
        let need = lay.offs.iter().max().map_or(0, |&o| o + row);
        assert!(self.x.len() >= need, "paired image");
        #[cfg(target_arch = "x86_64")]
        {
            // In words: `row / 2` per `dY` row, 16 per vector.
            let (nv, d, x, g) = (
                row / (2 * LANES),
                self.dy.as_ptr().cast::<u32>(),
                self.x.as_ptr(),
                dw.as_mut_ptr(),
            );
            let row = row / 2;
            weight_grad_blocks(cout, k, 4, |o, t, full, four| {
                let offs = &lay.offs[t..];
                // SAFETY: AVX-512 F and BF16 were asserted above; the asserts bound every row
                // `< C_out`, tap `< K` and word `< row` (from each tap's start) read.
                unsafe {
                    let (dyo, dwo) = (d.add(o * row), g.add(o * k + t));
                    match (full, four) {
                        (true, true) => {
                            weight_grad_tile_bf16::<4, 4>(nv, dyo, row, x, offs, dwo, k)
                        }
                        (true, false) => {
                            weight_grad_tile_bf16::<4, 1>(nv, dyo, row, x, offs, dwo, k)
                        }
                        (false, true) => {
                            weight_grad_tile_bf16::<1, 4>(nv, dyo, row, x, offs, dwo, k)
                        }
                        (false, false) => {
                            weight_grad_tile_bf16::<1, 1>(nv, dyo, row, x, offs, dwo, k)
                        }
                    }
                }
            });
        }
    }
}

on_units! {
    /// `dW[o][k] += Σ_n dY[o][n] · X[off_k + n]` for `R` channels `o` and `T` taps `k`, over
    /// `nv` vectors of positions: `R·T` sums in registers (4 x 4 on AVX-512; 2 x 4 on AVX2,
    /// where 3 x 4 would spill), each reduced at the end in the unit's order.
    ///
    /// Called with 4 x 4 on AVX-512: at 4 x 6, and at 4 x 4 compiled for AVX-512 F without VL,
    /// LLVM kept one accumulator on the stack (a store and reload per step: 46 GFLOP/s on one
    /// core instead of the forward tile's 103; seen in `perf annotate`).
    ///
    /// # Safety
    /// The unit is present; `dy` holds `R` rows of `L·nv` floats `ldd` apart, `x + off_k`
    /// `L·nv` floats for each of the `T` offsets, `dw` `R` rows of `T` floats `ldw` apart.
    unsafe fn weight_grad_tile / weight_grad_tile_v<V: Vector, const R: usize, const T: usize>(
        nv: usize,
        dy: *const f32,
        ldd: usize,
        x: *const f32,
        offs: &[usize],
        dw: *mut f32,
        ldw: usize,
    ) {
        let (l, all) = (V::LANES, V::mask(V::LANES));
        // SAFETY: for the whole body, the caller's contract bounds every offset below and
        // says the CPU has `V`'s instructions.
        unsafe {
            let mut acc = [[V::zero(); T]; R];
            let xs: [*const f32; T] = std::array::from_fn(|t| x.add(offs[t]));
            for v in 0..nv {
                // A loop, as in `forward_tile`.
                let mut xv = [V::zero(); T];
                for (t, xv) in xv.iter_mut().enumerate() {
                    *xv = V::load(all, xs[t].add(v * l));
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let dv = V::load(all, dy.add(r * ldd + v * l));
                    for t in 0..T {
                        row[t] = V::fma(dv, xv[t], row[t]);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (t, &sum) in row.iter().enumerate() {
                    *dw.add(r * ldw + t) += sum.reduce();
                }
            }
        }
    }
}

/// `Y[o][0..np] = Σ_k W[o][k] · X[off_k + n]` for every output channel: `y` is `[C_out, np]`.
fn forward_product(cout: usize, w: &[f32], xp: &[f32], lay: &Layout, y: &mut [f32], isa: Isa) {
    let (k, np) = (lay.offs.len(), lay.np);
    assert_eq!(w.len(), cout * k, "weights");
    assert_eq!(y.len(), cout * np, "output");
    assert!(xp.len() >= lay.len, "padded image");
    let (wp, x, yp) = (w.as_ptr(), xp.as_ptr(), y.as_mut_ptr());
    let offs = &lay.offs[..];
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            forward_blocks(cout, np, |o, n0, eight, wide| {
                // SAFETY: the unit was detected (`Isa::best`, `Unit::runs_here`); the asserts above bound
                // every row `< C_out`, tap `< K` and position `< np` the tiles touch.
                unsafe {
                    let (xn, wo, yo) = (x.add(n0), wp.add(o * k), yp.add(o * np + n0));
                    match (eight, wide) {
                        (true, true) => forward_tile::<8, 3>(Unit::Avx512, offs, wo, k, xn, yo, np),
                        (true, false) => {
                            forward_tile::<8, 1>(Unit::Avx512, offs, wo, k, xn, yo, np)
                        }
                        (false, true) => {
                            forward_tile::<1, 3>(Unit::Avx512, offs, wo, k, xn, yo, np)
                        }
                        (false, false) => {
                            forward_tile::<1, 1>(Unit::Avx512, offs, wo, k, xn, yo, np)
                        }
                    }
                }
            });
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // 16 registers: 6 channels x 16 positions is 12 accumulators, 2 inputs and the
            // broadcast weight. 4 x 24 (also 12 accumulators, 3 inputs) ran the 16-channel
            // 32 px layer's forward in 12.6 ms against 7.7-8.4 (`conv_layers 1`, Zen 3).
            for n0 in (0..np).step_by(LANES) {
                let mut o = 0;
                // SAFETY: the unit was detected (`Isa::best`, `Unit::runs_here`); the asserts above bound
                // every row `< C_out`, tap `< K` and position `< np` the tiles touch.
                unsafe {
                    let (xn, yn) = (x.add(n0), yp.add(n0));
                    while o < cout {
                        let (wo, yo) = (wp.add(o * k), yn.add(o * np));
                        let r = match cout - o {
                            6.. => 6,
                            4 | 5 => 4,
                            _ => 1,
                        };
                        match r {
                            6 => forward_tile::<6, 2>(Unit::Avx2, offs, wo, k, xn, yo, np),
                            4 => forward_tile::<4, 2>(Unit::Avx2, offs, wo, k, xn, yo, np),
                            _ => forward_tile::<1, 2>(Unit::Avx2, offs, wo, k, xn, yo, np),
                        }
                        o += r;
                    }
                }
            }
        }
        _ => {
            for (wrow, yrow) in w.chunks(k).zip(y.chunks_mut(np)) {
                yrow.fill(0.0);
                for (&a, &off) in wrow.iter().zip(&lay.offs) {
                    for (d, &xv) in yrow.iter_mut().zip(&xp[off..off + np]) {
                        *d = a.mul_add(xv, *d);
                    }
                }
            }
        }
    }
}

/// `dW[o][k] += Σ_n dY[o][n] · X[off_k + n]`: `dy` is `[C_out, np]`, zero where no output is.
fn weight_grad_product(
    cout: usize,
    dy: &[f32],
    xp: &[f32],
    lay: &Layout,
    dw: &mut [f32],
    isa: Isa,
) {
    let (k, np) = (lay.offs.len(), lay.np);
    assert_eq!(dy.len(), cout * np, "output gradient");
    assert_eq!(dw.len(), cout * k, "weight gradient");
    assert!(xp.len() >= lay.len, "padded image");
    let (d, x, g) = (dy.as_ptr(), xp.as_ptr(), dw.as_mut_ptr());
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            let nv = np / LANES;
            weight_grad_blocks(cout, k, 4, |o, t, full, four| {
                let offs = &lay.offs[t..];
                // SAFETY: the unit was detected (`Isa::best`); the asserts above bound every row
                // `< C_out`, tap `< K` and position `< np` the tiles touch.
                unsafe {
                    let (dyo, dwo) = (d.add(o * np), g.add(o * k + t));
                    match (full, four) {
                        (true, true) => {
                            weight_grad_tile::<4, 4>(Unit::Avx512, nv, dyo, np, x, offs, dwo, k)
                        }
                        (true, false) => {
                            weight_grad_tile::<4, 1>(Unit::Avx512, nv, dyo, np, x, offs, dwo, k)
                        }
                        (false, true) => {
                            weight_grad_tile::<1, 4>(Unit::Avx512, nv, dyo, np, x, offs, dwo, k)
                        }
                        (false, false) => {
                            weight_grad_tile::<1, 1>(Unit::Avx512, nv, dyo, np, x, offs, dwo, k)
                        }
                    }
                }
            });
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            // 2 channels x 4 taps: 8 accumulators, 4 inputs and one output gradient of the 16
            // registers (3 x 4 would spill).
            let nv = np / 8;
            weight_grad_blocks(cout, k, 2, |o, t, full, four| {
                let offs = &lay.offs[t..];
                // SAFETY: the unit was detected (`Isa::best`); the asserts above bound every row
                // `< C_out`, tap `< K` and position `< np` the tiles touch.
                unsafe {
                    let (dyo, dwo) = (d.add(o * np), g.add(o * k + t));
                    match (full, four) {
                        (true, true) => {
                            weight_grad_tile::<2, 4>(Unit::Avx2, nv, dyo, np, x, offs, dwo, k)
                        }
                        (true, false) => {
                            weight_grad_tile::<2, 1>(Unit::Avx2, nv, dyo, np, x, offs, dwo, k)
                        }
                        (false, true) => {
                            weight_grad_tile::<1, 4>(Unit::Avx2, nv, dyo, np, x, offs, dwo, k)
                        }
                        (false, false) => {
                            weight_grad_tile::<1, 1>(Unit::Avx2, nv, dyo, np, x, offs, dwo, k)
                        }
                    }
                }
            });
        }
        _ => {
            for (drow, grow) in dy.chunks(np).zip(dw.chunks_mut(k)) {
                for (gv, &off) in grow.iter_mut().zip(&lay.offs) {
                    *gv += drow
                        .iter()
                        .zip(&xp[off..off + np])
                        .fold(0.0f32, |s, (&a, &b)| a.mul_add(b, s));
                }
            }
        }
    }
}

/// Forward convolution (`y`, contiguous NCHW).
///
/// (The input gradient calls it with geometries `applies` may refuse for speed: it computes any
/// stride-1 convolution with padding smaller than its kernel.)
pub fn forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeom) -> Vec<f32> {
    forward_with(x, w, bias, g, Isa::best(), false)
}

/// [`forward`], then `max(·, 0)` on each image's output when `relu`, while it is in cache.
pub fn forward_act(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<f32> {
    forward_with(x, w, bias, g, Isa::best(), relu)
}

fn forward_with(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    isa: Isa,
    relu: bool,
) -> Vec<f32> {
    assert!(
        g.stride == [1, 1] && g.pad[0] < g.kh && g.pad[1] < g.kw,
        "direct convolution of {g:?}"
    );
    assert_eq!(x.len(), g.batch * g.cin * g.h * g.w, "conv2d input length");
    assert_eq!(w.len(), g.cout * g.k(), "conv2d weight length");
    let lay = Layout::new(g);
    let (ho, wo) = (g.ho(), g.wo());
    let out_len = g.cout * ho * wo;
    let split = g.batch < rayon::current_num_threads();
    // bf16 products where the CPU has them (the AVX-512 tiles, on channel pairs).
    let pairs =
        (g.precision == super::Precision::Bf16 && isa == Isa::Avx512 && super::bf16::available())
            .then(|| Pairs::new(w, g));
    par_zeroed_with(
        g.batch * out_len,
        out_len,
        x.par_chunks((g.cin * g.h * g.w).max(1)),
        || (Vec::new(), Vec::new(), Vec::new()),
        |(xp, acc, xq), yn, xn| {
            acc.resize(g.cout * lay.np, 0.0);
            if let Some(pq) = &pairs {
                pq.pad(xn, g, xq);
                let k = pq.lay.offs.len();
                if split {
                    acc.par_chunks_mut(8 * lay.np)
                        .zip(pq.w.par_chunks(8 * k))
                        .for_each(|(a, wc)| forward_product_bf16(wc.len() / k, wc, xq, &pq.lay, a));
                } else {
                    forward_product_bf16(g.cout, &pq.w, xq, &pq.lay, acc);
                }
            } else if split {
                lay.pad(xn, g, xp);
                // Fewer images than threads (a single-image prediction): the threads
                // take blocks of 8 output channels instead, each summing exactly as alone.
                let k = g.k();
                acc.par_chunks_mut(8 * lay.np)
                    .zip(w.par_chunks(8 * k))
                    .for_each(|(a, wc)| forward_product(wc.len() / k, wc, xp, &lay, a, isa));
            } else {
                lay.pad(xn, g, xp);
                forward_product(g.cout, w, xp, &lay, acc, isa);
            }
            for (o, (dst, src)) in yn.chunks_mut(ho * wo).zip(acc.chunks(lay.np)).enumerate() {
                let b = bias.map_or(0.0, |b| b[o]);
                for (d, s) in dst.chunks_mut(wo).zip(src.chunks(lay.wp)) {
                    d.iter_mut().zip(s).for_each(|(d, &s)| *d = s + b);
                }
            }
            if relu {
                relu_row(yn);
            }
        },
    )
}

/// Gradients of [`forward`] given `dy`: `(dx, dw, db)`, each when asked for. Images are split in
/// contiguous blocks, one per thread, and the partial weight gradients summed in block order,
/// so a thread count gives bit-identical results.
pub fn backward(x: &[f32], w: &[f32], dy: &[f32], g: &ConvGeom, need: [bool; 3]) -> ConvGrads {
    if g.stride != [1, 1] {
        return strided_backward(x, dy, g, need);
    }
    backward_with(x, w, dy, g, need, Isa::best())
}

/// Taps `i` of a `k`-tap kernel with `i % s == a`.
fn phase_taps(k: usize, s: usize, a: usize) -> usize {
    k.saturating_sub(a).div_ceil(s)
}

/// Whether [`backward`] computes the weight gradient (and bias gradient; not the input
/// gradient) of a strided layer: an RGB-like stem (fewer than 16 input channels) whose every
/// phase below has at least two taps and which is otherwise a [`fits`] geometry. ResNet's
/// 7x7/2 stem and AlexNet's 11x11/4 are; a 3x3/2 is not (its last phase is one tap).
pub fn fits_strided_weight_grad(g: &ConvGeom) -> bool {
    let [sh, sw] = g.stride;
    g.stride != [1, 1]
        && g.cin < 16
        && g.kh >= sh
        && g.kw >= sw
        && phase_taps(g.kh, sh, sh - 1) * phase_taps(g.kw, sw, sw - 1) > 1
        && g.cin > 0
        && g.cout >= 16
        && g.wo() >= 16
}

/// The weight and bias gradients of a strided layer ([`fits_strided_weight_grad`]) as
/// `s_h x s_w` stride-1 ones. Tap `(i, j)` of output `(oy, ox)` reads the padded image at
/// `(s_h·oy + i, s_w·ox + j)`: with `i = s_h·i' + a` and `j = s_w·j' + b` that is
/// `(oy + i', ox + j')` of phase plane `(a, b)` (padded rows `a, a + s_h, ..`, columns
/// `b, b + s_w, ..`), so each phase is a stride-1, unpadded weight gradient over its plane with
/// the taps `(a + s_h·i', b + s_w·j')`, and every weight belongs to one phase (no sums across
/// phases). The im2col weight gradient of these stems split their 3 input channels unevenly
/// over the threads: resnet18's stem at 128 px, batch 32, 2 threads, fp32 (`conv_layers 2 fp32
/// resnet18 128 32`) took 41 ms at 60 GFLOP/s.
///
/// All phases share one grid, `H_q x P` with the first phase's (the largest) extent, so each
/// image's `dY` is copied to the grid's row pitch once and stays in cache while the phases'
/// products read it: copied once per phase, as four separate stride-1 gradients did, the 32 MB
/// `dY` of resnet18's stem at 128 px (batch 32) came from memory four times, and the copies
/// took half as long as the products (`perf`, `CONV_LAYERS_REPEAT=dw`).
fn strided_backward(x: &[f32], dy: &[f32], g: &ConvGeom, need: [bool; 3]) -> ConvGrads {
    assert!(
        !need[0] && fits_strided_weight_grad(g),
        "direct strided weight gradient of {g:?}"
    );
    assert_eq!(x.len(), g.batch * g.in_len(), "conv2d input length");
    assert_eq!(
        dy.len(),
        g.batch * g.out_len(),
        "conv2d output-gradient length"
    );
    let [sh, sw] = g.stride;
    let (ho, wo, taps, cout) = (g.ho(), g.wo(), g.kh * g.kw, g.cout);
    let (hq, pitch) = (
        ho + phase_taps(g.kh, sh, 0) - 1,
        wo + phase_taps(g.kw, sw, 0) - 1,
    );
    // Phase `(a, b)`: its taps `(a + sh·i', b + sw·j')` and their offsets in the grid.
    let phases: Vec<(usize, usize, Layout)> = (0..sh)
        .flat_map(|a| (0..sw).map(move |b| (a, b)))
        .map(|(a, b)| {
            let (ka, kb) = (phase_taps(g.kh, sh, a), phase_taps(g.kw, sw, b));
            (a, b, Layout::grid(g.cin, hq, pitch, ho, ka, kb))
        })
        .collect();
    let np = phases[0].2.np;
    let xlen = phases.iter().map(|p| p.2.len).max().unwrap_or(0);
    let isa = Isa::best();
    let split = g.batch < rayon::current_num_threads();
    let (in_len, out_len) = (g.in_len(), g.out_len());
    let partials: Vec<(Vec<Vec<f32>>, Vec<f32>)> = image_blocks(g.batch)
        .into_par_iter()
        .map(|range| {
            let mut dws: Vec<Vec<f32>> = phases
                .iter()
                .map(|p| vec![0.0f32; if need[1] { cout * p.2.offs.len() } else { 0 }])
                .collect();
            let mut db = vec![0.0f32; if need[2] { cout } else { 0 }];
            // The grid's dropped columns and tail stay zero from here on.
            let (mut dyp, mut xq) = (vec![0.0f32; cout * np], vec![0.0f32; xlen]);
            for img in range {
                let dyn_ = &dy[img * out_len..(img + 1) * out_len];
                if need[2] {
                    for (acc, plane) in db.iter_mut().zip(dyn_.chunks(ho * wo)) {
                        *acc += plane.iter().sum::<f32>();
                    }
                }
                if !need[1] {
                    continue;
                }
                for (dst, src) in dyp.chunks_mut(np).zip(dyn_.chunks(ho * wo)) {
                    for (d, s) in dst.chunks_mut(pitch).zip(src.chunks(wo)) {
                        d[..wo].copy_from_slice(s);
                    }
                }
                let image = &x[img * in_len..(img + 1) * in_len];
                for ((a, b, lay), dw) in phases.iter().zip(&mut dws) {
                    fill_phase(image, g, *a, *b, hq, pitch, &mut xq);
                    if split {
                        // Fewer images than threads: blocks of 4 output channels per thread.
                        let k = lay.offs.len();
                        dw.par_chunks_mut(4 * k)
                            .zip(dyp.par_chunks(4 * np))
                            .for_each(|(d, dyc)| {
                                weight_grad_product(d.len() / k, dyc, &xq, lay, d, isa)
                            });
                    } else {
                        weight_grad_product(cout, &dyp, &xq, lay, dw, isa);
                    }
                }
            }
            (dws, db)
        })
        .collect();
    let db = need[2].then(|| sum_in_order(partials.iter().map(|p| &p.1)));
    if !need[1] {
        return (None, None, db);
    }
    let mut dw = vec![0.0f32; cout * g.cin * taps];
    for (q, (a, b, lay)) in phases.iter().enumerate() {
        let dwq = sum_in_order(partials.iter().map(|p| &p.0[q]));
        let kb = phase_taps(g.kw, sw, *b);
        // `dwq[o][c][i'][j']` is `dw[o][c][a + sh·i'][b + sw·j']`.
        for (oc, part) in dwq.chunks_exact(lay.offs.len() / g.cin).enumerate() {
            for (i, row) in part.chunks_exact(kb).enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    dw[oc * taps + (a + sh * i) * g.kw + b + sw * j] = v;
                }
            }
        }
    }
    (None, Some(dw), db)
}

/// Phase plane `(a, b)` of one image on the `hq x pitch` grid of [`strided_backward`]: grid
/// value `(c, u, v)` is the input at `(a + s_h·u - p_h, b + s_w·v - p_w)`, zero outside it.
fn fill_phase(
    image: &[f32],
    g: &ConvGeom,
    a: usize,
    b: usize,
    hq: usize,
    pitch: usize,
    xq: &mut [f32],
) {
    let [sh, sw] = g.stride;
    let [ph, pw] = g.pad;
    // Grid columns `v` with an input column `b + sw·v - pw` inside the image.
    let lo = pw.saturating_sub(b).div_ceil(sw).min(pitch);
    let hi = (g.w + pw).saturating_sub(b).div_ceil(sw).clamp(lo, pitch);
    for (plane, src) in xq.chunks_mut(hq * pitch).zip(image.chunks(g.h * g.w)) {
        for (u, row) in plane.chunks_exact_mut(pitch).enumerate() {
            let Some(iy) = (a + sh * u).checked_sub(ph).filter(|&r| r < g.h) else {
                row.fill(0.0);
                continue;
            };
            let src = &src[iy * g.w..(iy + 1) * g.w];
            row[..lo].fill(0.0);
            row[hi..].fill(0.0);
            for (v, d) in row[lo..hi].iter_mut().enumerate() {
                *d = src[b + sw * (lo + v) - pw];
            }
        }
    }
}

fn backward_with(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    g: &ConvGeom,
    need: [bool; 3],
    isa: Isa,
) -> ConvGrads {
    assert!(
        g.stride == [1, 1] && g.pad[0] < g.kh && g.pad[1] < g.kw,
        "direct convolution of {g:?}"
    );
    let [need_dx, need_dw, need_db] = need;
    let dx = need_dx.then(|| {
        forward_with(
            dy,
            &super::conv::rotated(w, g),
            None,
            &g.input_grad(),
            isa,
            false,
        )
    });
    if !need_dw && !need_db {
        return (dx, None, None);
    }
    let lay = Layout::new(g);
    let (ho, wo, cout) = (g.ho(), g.wo(), g.cout);
    let (in_len, out_len) = (g.cin * g.h * g.w, cout * ho * wo);
    let split = g.batch < rayon::current_num_threads();
    let pairs =
        g.precision == super::Precision::Bf16 && isa == Isa::Avx512 && super::bf16::available();
    let partials: Vec<(Vec<f32>, Vec<f32>)> = image_blocks(g.batch)
        .into_par_iter()
        .map(|range| {
            let mut pp = PositionPairs::default();
            let mut dw = vec![0.0f32; if need_dw { cout * g.k() } else { 0 }];
            let mut db = vec![0.0f32; if need_db { cout } else { 0 }];
            // dY over the product's positions; the dropped columns and the tail stay zero.
            let (mut xp, mut dyp) = (Vec::new(), vec![0.0f32; cout * lay.np]);
            for img in range {
                let dyn_ = &dy[img * out_len..(img + 1) * out_len];
                if need_db {
                    for (acc, plane) in db.iter_mut().zip(dyn_.chunks(ho * wo)) {
                        *acc += plane.iter().sum::<f32>();
                    }
                }
                if !need_dw {
                    continue;
                }
                for (dst, src) in dyp.chunks_mut(lay.np).zip(dyn_.chunks(ho * wo)) {
                    for (d, s) in dst.chunks_mut(lay.wp).zip(src.chunks(wo)) {
                        d[..wo].copy_from_slice(s);
                    }
                }
                lay.pad(&x[img * in_len..(img + 1) * in_len], g, &mut xp);
                if pairs {
                    pp.fill(&dyp, &xp, &lay);
                    pp.weight_grad(cout, &lay, &mut dw);
                } else if split {
                    // Fewer images than threads: blocks of 4 output channels per thread.
                    let k = g.k();
                    dw.par_chunks_mut(4 * k)
                        .zip(dyp.par_chunks(4 * lay.np))
                        .for_each(|(d, dyc)| {
                            weight_grad_product(d.len() / k, dyc, &xp, &lay, d, isa)
                        });
                } else {
                    weight_grad_product(cout, &dyp, &xp, &lay, &mut dw, isa);
                }
            }
            (dw, db)
        })
        .collect();
    let dw = need_dw.then(|| sum_in_order(partials.iter().map(|p| &p.0)));
    let db = need_db.then(|| sum_in_order(partials.iter().map(|p| &p.1)));
    (dx, dw, db)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Precision;
    use crate::kernels::conv::{im2col_backward, im2col_forward, test_data as data};

    #[allow(clippy::too_many_arguments)]
    fn geom(
        batch: usize,
        cin: usize,
        cout: usize,
        h: usize,
        w: usize,
        k: [usize; 2],
        pad: [usize; 2],
    ) -> ConvGeom {
        ConvGeom {
            batch,
            cin,
            h,
            w,
            cout,
            kh: k[0],
            kw: k[1],
            stride: [1, 1],
            pad,
            precision: Precision::Fp32,
        }
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}: length");
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * scale, "{what}[{i}]: {x} vs {y}");
        }
    }

    /// Against im2col + GEMM (itself tested against the definition) on odd and even sizes,
    /// paddings 0 to kernel-1, non-square kernels, channel counts that leave partial register
    /// tiles, and more images than threads; every kernel set this CPU runs (AVX-512, AVX2, the
    /// portable loops).
    #[test]
    fn matches_im2col_forward_and_backward() {
        for g in [
            geom(3, 16, 16, 8, 16, [3, 3], [1, 1]),
            geom(2, 16, 32, 7, 19, [3, 3], [0, 0]),
            geom(5, 17, 19, 6, 15, [3, 3], [2, 2]),
            geom(2, 20, 13, 9, 17, [5, 5], [2, 2]),
            geom(1, 3, 64, 5, 17, [1, 3], [0, 1]),
        ] {
            let x = data(g.batch * g.cin * g.h * g.w, 1);
            let w = data(g.cout * g.k(), 2);
            let b = data(g.cout, 3);
            let ey = im2col_forward(&x, &w, Some(&b), &g);
            let dy = data(ey.len(), 4);
            let (ex, ew, eb) = im2col_backward(&x, &w, &dy, &g, [true, true, true]);
            for isa in Isa::runnable() {
                let what = |t: &str| format!("{t} of {g:?}, {isa:?}");
                let y = forward_with(&x, &w, Some(&b), &g, isa, false);
                assert_close(&y, &ey, &what("y"));
                let (dx, dw, db) = backward_with(&x, &w, &dy, &g, [true, true, true], isa);
                assert_close(&dx.unwrap(), ex.as_ref().unwrap(), &what("dx"));
                assert_close(&dw.unwrap(), ew.as_ref().unwrap(), &what("dw"));
                assert_close(&db.unwrap(), eb.as_ref().unwrap(), &what("db"));
                let (dx, dw, db) = backward_with(&x, &w, &dy, &g, [false, true, false], isa);
                assert!(dx.is_none() && db.is_none() && dw.is_some());
            }
        }
    }

    /// In bf16, the forward product and the input gradient are the f32 ones on bf16-rounded
    /// operands (up to the order of the f32 sums), with odd channel counts (a channel paired
    /// with zero), odd output widths (runs that start on odd floats) and fewer images than
    /// threads; so is the weight gradient (on pairs of positions).
    #[test]
    fn bf16_matches_f32_on_rounded_operands() {
        use crate::kernels::bf16::{available, round};
        if !available() || Isa::best() != Isa::Avx512 {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        let rounded = |v: &[f32]| v.iter().map(|&x| round(x)).collect::<Vec<_>>();
        for g in [
            geom(3, 16, 16, 8, 16, [3, 3], [1, 1]),
            geom(5, 17, 19, 6, 15, [3, 3], [2, 2]),
            geom(1, 3, 64, 5, 17, [1, 3], [0, 1]),
        ] {
            let g16 = ConvGeom {
                precision: Precision::Bf16,
                ..g
            };
            let x = data(g.batch * g.cin * g.h * g.w, 1);
            let w = data(g.cout * g.k(), 2);
            let b = data(g.cout, 3);
            let y = forward_with(&x, &w, Some(&b), &g16, Isa::Avx512, false);
            let ey = forward_with(&rounded(&x), &rounded(&w), Some(&b), &g, Isa::Avx512, false);
            assert_close(&y, &ey, &format!("y of {g:?}"));
            let y32 = forward_with(&x, &w, Some(&b), &g, Isa::Avx512, false);
            assert!(y != y32, "bf16 rounds the operands of {g:?}");
            let dy = data(ey.len(), 4);
            let (dx, dw, db) = backward_with(&x, &w, &dy, &g16, [true, true, true], Isa::Avx512);
            let (xr, wr, dyr) = (rounded(&x), rounded(&w), rounded(&dy));
            let (ex, ew, _) = backward_with(&xr, &wr, &dyr, &g, [true; 3], Isa::Avx512);
            assert_close(&dx.unwrap(), &ex.unwrap(), &format!("dx of {g:?}"));
            assert_close(&dw.unwrap(), &ew.unwrap(), &format!("dw of {g:?}"));
            // The bias gradient is a plain f32 sum of the unrounded output gradient.
            let (_, _, eb) = backward_with(&x, &w, &dy, &g, [false, false, true], Isa::Avx512);
            assert_eq!(db, eb, "db of {g:?}");
        }
    }

    #[test]
    fn applies_to_f32_stride_one_layers_of_sixteen_output_channels_or_more() {
        assert_eq!(
            applies(&geom(1, 16, 16, 32, 32, [3, 3], [1, 1])),
            available()
        );
        assert_eq!(
            applies(&geom(1, 3, 16, 32, 32, [3, 3], [1, 1])),
            available()
        );
        assert!(!applies(&geom(1, 16, 8, 32, 32, [3, 3], [1, 1])));
        assert!(!applies(&geom(1, 16, 16, 32, 32, [1, 1], [0, 0])));
        assert!(!applies(&geom(1, 16, 16, 8, 8, [3, 3], [1, 1])));
        let bf16 = ConvGeom {
            precision: Precision::Bf16,
            ..geom(1, 16, 16, 32, 32, [3, 3], [1, 1])
        };
        assert_eq!(applies(&bf16), available());
        let strided = ConvGeom {
            stride: [2, 2],
            ..geom(1, 16, 16, 32, 32, [3, 3], [1, 1])
        };
        assert!(!applies(&strided));
    }

    /// Every register tile the products call, on every unit the CPU has and on emulated 16-
    /// and 8-lane vectors (so the AVX-512 tiles' logic is checked on any CPU): the forward
    /// tile is the fused sums in tap order to the bit, rows and vectors strided; the weight
    /// gradient's sums are the definition within rounding, added to what `dw` held.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tiles_are_the_definition() {
        use super::super::vector::Emu;
        use std::arch::x86_64::{__m256, __m512};
        for unit in Unit::present() {
            // SAFETY: the unit is present.
            unsafe {
                match unit {
                    Unit::Avx512 => {
                        tiles_on::<__m512, 8, 3, 4, 4>(Some(unit));
                        tiles_on::<__m512, 1, 1, 1, 1>(Some(unit));
                        tiles_on::<__m512, 8, 1, 4, 1>(Some(unit));
                        tiles_on::<__m512, 1, 3, 1, 4>(Some(unit));
                    }
                    Unit::Avx2 => {
                        tiles_on::<__m256, 6, 2, 2, 4>(Some(unit));
                        tiles_on::<__m256, 4, 2, 2, 1>(Some(unit));
                        tiles_on::<__m256, 1, 2, 1, 4>(Some(unit));
                        tiles_on::<__m256, 1, 2, 1, 1>(Some(unit));
                    }
                }
            }
        }
        // SAFETY: an emulation runs on any CPU.
        unsafe {
            tiles_on::<Emu<16>, 8, 3, 4, 4>(None);
            tiles_on::<Emu<16>, 1, 1, 1, 1>(None);
            tiles_on::<Emu<8>, 6, 2, 2, 4>(None);
            tiles_on::<Emu<8>, 1, 2, 1, 1>(None);
        }
    }

    /// The tiles `R x NV` (forward) and `RG x T` (weight gradient) through `unit`'s dispatch,
    /// or `V`'s generic bodies without one.
    ///
    /// # Safety
    /// The CPU has `V`'s instructions, and `unit` is `V`'s.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tiles_on<
        V: super::super::vector::Vector,
        const R: usize,
        const NV: usize,
        const RG: usize,
        const T: usize,
    >(
        unit: Option<Unit>,
    ) {
        let l = V::LANES;
        let offs = [0usize, 3, 7, 12, 20, 1];
        let k = offs.len();
        let span = 20 + l * NV.max(3);
        let x = data(span + 5, 1);
        let (ldw, ldy) = (k + 2, l * NV + 5);
        let w = data(R * ldw, 2);
        let mut y = vec![f32::NAN; R * ldy];
        // SAFETY: `w` holds `R` rows of `k` weights `ldw` apart, `x + off` `l·NV` floats for
        // every offset, `y` `R` rows of `l·NV` floats `ldy` apart; the CPU (the contract).
        unsafe {
            let args = (&offs[..], w.as_ptr(), ldw, x.as_ptr(), y.as_mut_ptr(), ldy);
            match unit {
                Some(u) => forward_tile::<R, NV>(u, args.0, args.1, args.2, args.3, args.4, args.5),
                None => forward_tile_v::<V, R, NV>(args.0, args.1, args.2, args.3, args.4, args.5),
            }
        }
        for r in 0..R {
            for n in 0..l * NV {
                let want = offs.iter().enumerate().fold(0f32, |acc, (t, &off)| {
                    w[r * ldw + t].mul_add(x[off + n], acc)
                });
                let got = y[r * ldy + n];
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "forward {R}x{NV} [{r}, {n}] on {l} lanes"
                );
            }
            assert!(
                y[r * ldy + l * NV..(r * ldy + ldy).min(y.len())]
                    .iter()
                    .all(|v| v.is_nan())
            );
        }
        let nv = 3;
        let (ldd, ldg) = (l * nv + 3, T + 1);
        let dy = data(RG * ldd, 3);
        let mut dw = vec![0.5f32; RG * ldg];
        // SAFETY: `dy` holds `RG` rows of `l·nv` floats `ldd` apart, `x + off` `l·nv` floats
        // for each of the first `T` offsets, `dw` `RG` rows of `T` floats `ldg` apart.
        unsafe {
            let args = (
                nv,
                dy.as_ptr(),
                ldd,
                x.as_ptr(),
                &offs[..],
                dw.as_mut_ptr(),
                ldg,
            );
            match unit {
                Some(u) => weight_grad_tile::<RG, T>(
                    u, args.0, args.1, args.2, args.3, args.4, args.5, args.6,
                ),
                None => weight_grad_tile_v::<V, RG, T>(
                    args.0, args.1, args.2, args.3, args.4, args.5, args.6,
                ),
            }
        }
        for r in 0..RG {
            for t in 0..ldg {
                let got = dw[r * ldg + t];
                if t >= T {
                    assert_eq!(got, 0.5, "dw [{r}, {t}] past the tile");
                    continue;
                }
                let want = 0.5
                    + (0..l * nv)
                        .map(|n| dy[r * ldd + n] as f64 * x[offs[t] + n] as f64)
                        .sum::<f64>();
                assert!(
                    (got as f64 - want).abs() < 1e-5 * want.abs().max(1.0),
                    "dw {RG}x{T} [{r}, {t}] on {l} lanes: {got} vs {want}"
                );
            }
        }
    }

    /// The forward tiles sum in the portable loop's order, one fused multiply-add per term:
    /// the same bits.
    #[test]
    fn simd_forward_equals_the_portable_sums() {
        let g = geom(1, 5, 19, 9, 21, [3, 3], [1, 1]);
        let lay = Layout::new(&g);
        let mut xp = Vec::new();
        lay.pad(&data(g.cin * g.h * g.w, 8), &g, &mut xp);
        let w = data(g.cout * g.k(), 9);
        let mut expected = vec![2.0; g.cout * lay.np];
        forward_product(g.cout, &w, &xp, &lay, &mut expected, Isa::Portable);
        for isa in Isa::runnable() {
            let mut y = vec![1.0; g.cout * lay.np];
            forward_product(g.cout, &w, &xp, &lay, &mut y, isa);
            assert_eq!(y, expected, "{isa:?}");
        }
    }

    /// A single image split over threads by output channels gives the bits of one thread.
    #[test]
    fn one_image_split_over_threads_sums_as_one_thread() {
        let g = geom(1, 16, 24, 6, 17, [3, 3], [1, 1]);
        let x = data(g.cin * g.h * g.w, 10);
        let w = data(g.cout * g.k(), 11);
        let dy = data(g.cout * g.ho() * g.wo(), 12);
        let run = |threads: usize| {
            crate::kernels::conv::on_threads(threads, || {
                let y = forward_with(&x, &w, None, &g, Isa::best(), false);
                let (_, dw, _) = backward_with(&x, &w, &dy, &g, [false, true, false], Isa::best());
                (y, dw.unwrap())
            })
        };
        assert_eq!(run(1), run(3));
    }
}
