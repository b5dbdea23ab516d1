//! 1x1 convolutions on the AMX tiles, NCHW in and out, rounded to the output type in the tile
//! epilogue: ResNet-50's bottleneck layers (He et al. 2016, "Deep Residual Learning", Table 1:
//! 1x1 reduce, 3x3, 1x1 expand; and the 1x1/2 projections).
//!
//! A 1x1 convolution is one GEMM per image, `Y[C_out, P] = W[C_out, C_in] · X[C_in, P]` (`P`
//! output positions), with a small `K = C_in` (64-2048): each output takes only `C_in`
//! products, so the kernel is bound by what it writes. im2col's path on the tiles wrote the
//! f32 product, then added the bias, then the caller rounded it to bf16 (`perf`, resnet50 bf16
//! training on the AMX Xeon: the GEMM's tile block 24% of samples, its `memset`s and the
//! rounding pass another 8%). Here each 32 x 32 block of `Y` is summed over all of `K` in the
//! tile registers ([`super::amx::block`]), stored to an L1 scratch once, and written out by
//! the epilogue with the bias and ReLU, as bf16 (`VCVTNE2PS2BF16`) or f32: no f32 image, no
//! zero fill, no second pass.
//!
//! `B` is packed from the image's bf16 bits in the tiles' pair layout: for a panel of 32
//! positions, word `(q, j)` holds channels `2q` and `2q + 1` of position `j` (one permute of
//! two 64-byte channel rows per 32 words). Positions go in chunks whose packed panels fit the
//! L2 cache beside the weights; strided layers (the 1x1/2 projections) first gather their
//! positions into a compact `[C_in, P]` copy.
//!
//! The input gradient of a 1x1 layer is the same product with `Wᵀ` ([`input_grad_geom`]); at
//! stride 2 it gives the sampled positions, scattered into a zeroed gradient.
//!
//! # Shapes
//! `x: [B, C_in, H, W]`, `w: [C_out, C_in]` (1x1), `y: [B, C_out, H_out, W_out]`; `C_in` a
//! multiple of 32, `C_out` of 16, no padding ([`fits`]).

use super::act::Act;
use super::amx::PAIRS;
use super::conv::ConvGeom;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Positions per `B` panel: two column tiles.
const COLS: usize = 32;

/// Bytes of packed `B` per chunk of positions: with a 32-row block of weights (up to 128 KiB
/// at 2048 channels) it stays in a core's L2 while every block of output channels reads it.
const CHUNK_BYTES: usize = 512 << 10;

/// Whether this kernel computes `g` (on a CPU where [`super::amx::enabled`]): a 1x1 kernel
/// without padding, whole tiles of input channel pairs and of output channels.
pub fn fits(g: &ConvGeom) -> bool {
    g.kh == 1
        && g.kw == 1
        && g.pad == [0, 0]
        && g.cin.is_multiple_of(2 * PAIRS)
        && g.cout.is_multiple_of(16)
}

/// `y = max(W · x + b, 0)` (the `max` only with `relu`) for a 1x1 layer that [`fits`], in the
/// output type `O`: each value rounded once from its f32 sum when `O` is bf16.
///
/// # Panics
/// When AMX is not [`super::amx::enabled`], `g` does not fit, or a slice has the wrong length.
pub fn forward<E: Act, O: Act>(
    x: &[E],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<O> {
    assert!(
        super::amx::enabled() && fits(g),
        "AMX 1x1 convolution of {g:?}"
    );
    assert_eq!(x.len(), g.batch * g.in_len(), "conv2d input length");
    assert_eq!(w.len(), g.cout * g.cin, "conv2d weight length");
    if let Some(b) = bias {
        assert_eq!(b.len(), g.cout, "conv2d bias length");
    }
    let (p, in_len) = (g.p(), g.in_len());
    let wq = pack_weights(w, g.cout, g.cin);
    // Work units: whole images, or, with fewer images than threads, images split into blocks
    // of output channels (whole 32-row blocks where possible).
    let threads = rayon::current_num_threads().max(1);
    let parts = if g.batch >= threads {
        1
    } else {
        threads.div_ceil(g.batch.max(1))
    };
    let rows_per = g.cout.div_ceil(parts).next_multiple_of(16).max(16);
    let units: Vec<(usize, std::ops::Range<usize>)> = (0..g.batch)
        .flat_map(|n| {
            (0..g.cout)
                .step_by(rows_per)
                .map(move |o0| (n, o0..(o0 + rows_per).min(g.cout)))
        })
        .collect();
    let lens: Vec<usize> = units.iter().map(|(_, r)| r.len() * p).collect();
    let run = |u: usize, out: &mut [MaybeUninit<O>], scratch: &mut Scratch| {
        let (n, rows) = &units[u];
        let xn = &x[n * in_len..][..in_len];
        unit(xn, &wq, bias, relu, g, rows.clone(), out, scratch);
    };
    // SAFETY: `unit` writes every value of its part (all of its rows at every position).
    unsafe { super::buf::par_parts_uninit(&lens, Scratch::default, run) }
}

/// The geometry of the product that gives a 1x1 layer's input gradient, `dx = Wᵀ · dy`: `C_out`
/// channels in, `C_in` out, on the `H_out x W_out` positions the layer sampled (all of `dx`
/// at stride 1, [`ConvGeom::input_grad`]; at stride 2 a quarter, the rest of `dx` being zero).
/// `None` unless `g` is a 1x1 layer without padding.
pub fn input_grad_geom(g: &ConvGeom) -> Option<ConvGeom> {
    (g.kh == 1 && g.kw == 1 && g.pad == [0, 0]).then(|| ConvGeom {
        cin: g.cout,
        cout: g.cin,
        h: g.ho(),
        w: g.wo(),
        stride: [1, 1],
        ..*g
    })
}

/// The input gradient of a 1x1 layer whose [`input_grad_geom`] [`fits`], in the output type
/// `O`: the sampled positions' values from [`forward`] with `Wᵀ`, and at stride > 1 scattered
/// into a zeroed `dx` (im2col's path wrote a column gradient and added it back tap by tap).
///
/// # Panics
/// As [`forward`], for the geometry [`input_grad_geom`].
pub fn input_grad<E: Act, O: Act>(w: &[f32], dy: &[E], g: &ConvGeom) -> Vec<O> {
    let gi = input_grad_geom(g).expect("a 1x1 layer without padding");
    let sampled: Vec<O> = forward(dy, &super::conv::rotated(w, g), None, &gi, false);
    if g.stride == [1, 1] {
        return sampled;
    }
    let ((sy, sx), (ho, wo), plane) = ((g.stride[0], g.stride[1]), (g.ho(), g.wo()), g.h * g.w);
    super::buf::par_zeroed(
        g.batch * g.in_len(),
        plane,
        sampled.par_chunks(ho * wo),
        |dx: &mut [O], src| {
            for (oy, row) in src.chunks_exact(wo).enumerate() {
                let line = &mut dx[oy * sy * g.w..];
                row.iter()
                    .enumerate()
                    .for_each(|(ox, &v)| line[ox * sx] = v);
            }
        },
    )
}

/// `w` (`[rows, k]`, f32) rounded to bf16 pairs along `k`: row `o`'s word `q` holds
/// `(w[o][2q], w[o][2q + 1])`, rows `k / 2` words apart (the tiles' `A` layout).
fn pack_weights(w: &[f32], rows: usize, k: usize) -> Vec<u32> {
    let mut bits = vec![0u16; rows * k];
    super::bf16::round_slice(w, &mut bits);
    bits.chunks_exact(2)
        .map(|pair| pair[0] as u32 | (pair[1] as u32) << 16)
        .collect()
}

/// A worker's buffers: the image's bits (when it is f32 or strided), the packed panels of a
/// chunk of positions, and the f32 block the tiles store.
#[derive(Default)]
struct Scratch {
    bits: Vec<u16>,
    compact: Vec<u16>,
    panels: Vec<u32>,
    block: Block,
}

/// A 32 x 32 f32 block (four tiles), aligned for `TILESTORED`.
#[repr(C, align(64))]
struct Block([f32; 4 * 256]);

impl Default for Block {
    fn default() -> Self {
        Block([0.0; 4 * 256])
    }
}

/// Output channels `rows` of one image `xn` into `out` (`rows.len()` channels of `P` values).
#[allow(clippy::too_many_arguments)]
fn unit<E: Act, O: Act>(
    xn: &[E],
    wq: &[u32],
    bias: Option<&[f32]>,
    relu: bool,
    g: &ConvGeom,
    rows: std::ops::Range<usize>,
    out: &mut [MaybeUninit<O>],
    s: &mut Scratch,
) {
    let (p, kp) = (g.p(), g.cin / 2);
    assert_eq!(out.len(), rows.len() * p, "output part");
    assert!(rows.start.is_multiple_of(16) && rows.len().is_multiple_of(16) && rows.end <= g.cout);
    // The image's bf16 bits, `[C_in, H·W]`.
    let bits: &[u16] = match E::as_bf16_bits(xn) {
        Some(b) => b,
        None => {
            s.bits.resize(xn.len(), 0);
            E::bits_into(xn, &mut s.bits);
            &s.bits
        }
    };
    // Strided: the output positions gathered into `[C_in, P]`.
    let src: &[u16] = if g.stride == [1, 1] {
        bits
    } else {
        let (hw, (sy, sx), wo) = (g.h * g.w, (g.stride[0], g.stride[1]), g.wo());
        s.compact.resize(g.cin * p, 0);
        for (c, dst) in s.compact.chunks_exact_mut(p).enumerate() {
            let plane = &bits[c * hw..][..hw];
            for (oy, row) in dst.chunks_exact_mut(wo).enumerate() {
                let line = &plane[oy * sy * g.w..];
                row.iter_mut()
                    .enumerate()
                    .for_each(|(ox, d)| *d = line[ox * sx]);
            }
        }
        &s.compact
    };
    let chunk = (CHUNK_BYTES / (4 * kp * COLS)).max(1) * COLS;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AMX is enabled (`forward` asserts it), so the CPU has it and the process may use it.
    let _tiles = unsafe { super::amx::Tiles::configure() };
    for pos0 in (0..p).step_by(chunk) {
        let np = chunk.min(p - pos0);
        let panels = np.div_ceil(COLS);
        s.panels.resize(panels * kp * COLS, 0);
        pack_panels(src, p, pos0, np, kp, &mut s.panels);
        for o0 in rows.clone().step_by(32) {
            let r = 32.min(rows.end - o0);
            let a = &wq[o0 * kp..][..r * kp];
            let b = bias.map(|b| &b[o0..o0 + r]);
            for j in 0..panels {
                let cols = COLS.min(np - j * COLS);
                let panel = &s.panels[j * kp * COLS..][..kp * COLS];
                #[cfg(target_arch = "x86_64")]
                // SAFETY: tiles configured on this thread; `kp` is a multiple of PAIRS
                // (`fits`); `a` holds `r` (16 or 32) rows of `kp` words, the panel `kp` pair
                // rows of COLS words; the block is 32 rows of 32 floats, so the full-block
                // stores stay inside it.
                unsafe {
                    let c = s.block.0.as_mut_ptr();
                    if r > 16 {
                        super::amx::block::<2, 2>(
                            kp,
                            a.as_ptr(),
                            panel.as_ptr(),
                            COLS,
                            c,
                            32,
                            r,
                            COLS,
                            false,
                        );
                    } else {
                        super::amx::block::<1, 2>(
                            kp,
                            a.as_ptr(),
                            panel.as_ptr(),
                            COLS,
                            c,
                            32,
                            r,
                            COLS,
                            false,
                        );
                    }
                }
                let at = (o0 - rows.start) * p + pos0 + j * COLS;
                epilogue(&s.block.0, r, cols, b, relu, &mut out[at..], p);
            }
        }
    }
}

/// Packs positions `pos0..pos0 + np` of `src` (`[C_in, p]` bf16 bits) into panels of
/// [`COLS`] positions: panel `j`'s word `(q, c)` is `(src[2q][pos], src[2q + 1][pos])` for
/// position `pos0 + j·COLS + c`, zero past `np`.
fn pack_panels(src: &[u16], p: usize, pos0: usize, np: usize, kp: usize, out: &mut [u32]) {
    let panels = np.div_ceil(COLS);
    assert!(src.len() >= 2 * kp * p && pos0 + np <= p && out.len() >= panels * kp * COLS);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: AVX-512 BW detected; the bounds were asserted just above.
        unsafe { pack_panels_avx512(src, p, pos0, np, kp, out) };
        return;
    }
    for q in 0..kp {
        let (r0, r1) = (
            &src[2 * q * p + pos0..][..np],
            &src[(2 * q + 1) * p + pos0..][..np],
        );
        for j in 0..panels {
            let dst = &mut out[(j * kp + q) * COLS..][..COLS];
            for (c, d) in dst.iter_mut().enumerate() {
                let i = j * COLS + c;
                *d = if i < np {
                    r0[i] as u32 | (r1[i] as u32) << 16
                } else {
                    0
                };
            }
        }
    }
}

/// [`pack_panels`] with two 32-value channel rows interleaved by one permute per 16 words.
///
/// # Safety
/// The CPU has AVX-512 F and BW; the bounds [`pack_panels`] asserts hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_panels_avx512(
    src: &[u16],
    p: usize,
    pos0: usize,
    np: usize,
    kp: usize,
    out: &mut [u32],
) {
    use std::arch::x86_64::*;
    // Word `i` of the low half takes value `i` of each row (`a`'s in its low 16 bits); the high
    // half values `16 + i`.
    let lo: [u16; 32] = std::array::from_fn(|i| (i / 2 + 32 * (i % 2)) as u16);
    let hi: [u16; 32] = std::array::from_fn(|i| (16 + i / 2 + 32 * (i % 2)) as u16);
    // SAFETY (whole body): row reads are masked to the `np - j·COLS` positions left, inside
    // `src` (`(2q + 1)·p + pos0 + np <= 2·kp·p`); each panel's stores cover words `(j·kp +
    // q)·COLS..+COLS` of `out`.
    unsafe {
        let (lo, hi) = (
            _mm512_loadu_si512(lo.as_ptr().cast()),
            _mm512_loadu_si512(hi.as_ptr().cast()),
        );
        for q in 0..kp {
            let (r0, r1) = (
                src.as_ptr().add(2 * q * p + pos0),
                src.as_ptr().add((2 * q + 1) * p + pos0),
            );
            for j in 0..np.div_ceil(COLS) {
                let left = np - j * COLS;
                let mask: __mmask32 = if left >= 32 { !0 } else { (1u32 << left) - 1 };
                let a = _mm512_maskz_loadu_epi16(mask, r0.add(j * COLS).cast());
                let b = _mm512_maskz_loadu_epi16(mask, r1.add(j * COLS).cast());
                let d = out.as_mut_ptr().add((j * kp + q) * COLS);
                _mm512_storeu_si512(d.cast(), _mm512_permutex2var_epi16(a, lo, b));
                _mm512_storeu_si512(d.add(16).cast(), _mm512_permutex2var_epi16(a, hi, b));
            }
        }
    }
}

/// Rows `0..r` and columns `0..cols` of the 32 x 32 `block`, plus `bias[row]`, `max(·, 0)` with
/// `relu`, written to `out` (row `i` at `out[i·p..]`) as `O`.
fn epilogue<O: Act>(
    block: &[f32; 1024],
    r: usize,
    cols: usize,
    bias: Option<&[f32]>,
    relu: bool,
    out: &mut [MaybeUninit<O>],
    p: usize,
) {
    assert!(r <= 32 && cols <= 32 && (r == 0 || out.len() >= (r - 1) * p + cols));
    #[cfg(target_arch = "x86_64")]
    if super::bf16::available() {
        // SAFETY: AVX512-BF16 (and F, BW) detected; row `i`'s `cols` values are inside `out`
        // (asserted).
        unsafe { epilogue_avx512(block, r, cols, bias, relu, out.as_mut_ptr(), p) };
        return;
    }
    for i in 0..r {
        let b = bias.map_or(0.0, |b| b[i]);
        for c in 0..cols {
            let v = block[32 * i + c] + b;
            out[i * p + c] = MaybeUninit::new(O::from_f32(if relu { v.max(0.0) } else { v }));
        }
    }
}

/// [`epilogue`]'s rows as two 16-lane vectors, stored under a mask.
///
/// # Safety
/// The CPU has AVX-512 F, BW and BF16; `out + i·p + (0..cols)` is writable for `i < r`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn epilogue_avx512<O: Act>(
    block: &[f32; 1024],
    r: usize,
    cols: usize,
    bias: Option<&[f32]>,
    relu: bool,
    out: *mut MaybeUninit<O>,
    p: usize,
) {
    use std::arch::x86_64::*;
    let to_bf16 = std::any::TypeId::of::<O>() == std::any::TypeId::of::<super::act::bf16>();
    let mask: u32 = if cols >= 32 { !0 } else { (1u32 << cols) - 1 };
    // SAFETY (whole body): row `i < r` of the block is 32 floats; the stores write the `cols`
    // masked values of row `i` at `out + i·p`, writable by the contract.
    unsafe {
        for i in 0..r {
            let b = _mm512_set1_ps(bias.map_or(0.0, |b| b[i]));
            let mut v0 = _mm512_add_ps(_mm512_loadu_ps(block.as_ptr().add(32 * i)), b);
            let mut v1 = _mm512_add_ps(_mm512_loadu_ps(block.as_ptr().add(32 * i + 16)), b);
            if relu {
                v0 = _mm512_max_ps(v0, _mm512_setzero_ps());
                v1 = _mm512_max_ps(v1, _mm512_setzero_ps());
            }
            let dst = out.add(i * p);
            if to_bf16 {
                let h: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(v1, v0));
                _mm512_mask_storeu_epi16(dst.cast(), mask, h);
            } else {
                _mm512_mask_storeu_ps(dst.cast(), mask as u16, v0);
                _mm512_mask_storeu_ps(dst.cast::<f32>().add(16), (mask >> 16) as u16, v1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::act::{bf16, to_bf16};
    use crate::kernels::conv::test_data as data;
    use crate::kernels::nhwc::tests::assert_close;
    use crate::kernels::nhwc_amx::tests::amx_or_skip;

    /// A 1x1 layer, no padding ([`super::super::nhwc_amx::tests::geom`]).
    fn geom(batch: usize, cin: usize, h: usize, w: usize, cout: usize, s: usize) -> ConvGeom {
        super::super::nhwc_amx::tests::geom(batch, cin, h, w, cout, 1, s)
    }

    /// Against im2col on the same bf16 operands (its `K` blocks are small in tests, so its sums
    /// are grouped differently: close, not equal); the same bits from f32 and bf16 inputs; the
    /// bf16 output equal to the f32 output rounded once: maps
    /// of fewer positions than a panel and of several chunks, strides 1 and 2, 16- and
    /// 32-row blocks, bias and ReLU, f32 and bf16 inputs, one image split over 3 threads.
    #[test]
    fn matches_im2col_and_rounds_once() {
        if !amx_or_skip() {
            return;
        }
        for g in [
            geom(2, 32, 3, 5, 16, 1),
            geom(3, 64, 7, 7, 48, 1),
            geom(2, 256, 40, 33, 64, 1),
            geom(2, 64, 9, 11, 96, 2),
            geom(1, 96, 14, 14, 32, 1),
        ] {
            assert!(fits(&g), "{g:?}");
            let x = data(g.batch * g.in_len(), 1);
            let w = data(g.cout * g.cin, 2);
            let b = data(g.cout, 3);
            let xb = to_bf16(&x);
            let xr: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            for relu in [false, true] {
                let want = super::super::im2col::im2col_forward_act(&xb, &w, Some(&b), &g, relu);
                let got: Vec<f32> = forward(&xb, &w, Some(&b), &g, relu);
                assert_close(&got, &want, &(g, relu));
                let from_f32: Vec<f32> = forward(&xr, &w, Some(&b), &g, relu);
                assert_eq!(from_f32, got, "f32 input {g:?}");
                let narrow: Vec<bf16> = forward(&xb, &w, Some(&b), &g, relu);
                let rounded = to_bf16(&got);
                assert_eq!(narrow, rounded, "bf16 output {g:?}");
            }
            let one = &xb[..g.in_len()];
            let g1 = ConvGeom { batch: 1, ..g };
            let run = |t| {
                crate::kernels::conv::on_threads(t, || {
                    forward::<bf16, f32>(one, &w, None, &g1, false)
                })
            };
            assert_eq!(run(1), run(3), "{g1:?}");
        }
    }

    /// The input gradient against im2col's on the same operands, at strides 1 and 2.
    #[test]
    fn input_grad_matches_im2col() {
        if !amx_or_skip() {
            return;
        }
        for g in [
            geom(2, 32, 5, 6, 32, 1),
            geom(3, 48, 9, 7, 64, 1),
            // The 1x1/2 projections, on even and odd sides.
            geom(2, 32, 8, 10, 64, 2),
            geom(2, 64, 9, 7, 32, 2),
        ] {
            assert!(fits(&input_grad_geom(&g).unwrap()), "{g:?}");
            let x = vec![bf16::ZERO; g.batch * g.in_len()];
            let dy = to_bf16(&data(g.batch * g.out_len(), 4));
            let w = data(g.cout * g.cin, 5);
            let want = super::super::im2col::im2col_backward(&x, &w, &dy, &g, [true, false, false])
                .0
                .unwrap();
            let got: Vec<f32> = input_grad(&w, &dy, &g);
            assert_close(&got, &want, &g);
        }
    }
}
