//! Convolutions of few input channels on the AMX tiles (or, without them, on `VDPBF16PS`: the
//! 1x1 kernel's [`Unit`]), NCHW in and out, by phase planes: the
//! RGB stems (ResNet's and GoogLeNet's 7x7/2, He et al. 2016 and Szegedy et al. 2015; VGG's
//! 3x3 and AlexNet's 11x11/4 first layers), whose 3 channels are no tile of channels for the
//! channels-last kernel ([`super::nhwc_amx`]).
//!
//! Each channel's zero-padded image is split into `s_h x s_w` phase planes of `H_q x W_q`
//! ([`super::nhwc::phase_planes_into`]), so tap `(i, j)` of output `(y, x)` is value `(y + i /
//! s_h, x + j / s_w)` of plane `(i % s_h, j % s_w)`. With the outputs numbered over the planes'
//! grid (`v = y·W_q + x`, the `W_q - W_out` columns past each row computed and dropped), row
//! `(c, i, j)` of the im2col matrix is one contiguous run of a plane: the forward pass packs its
//! `B` panels straight from the planes ([`super::pointwise::pack_panels`], two runs interleaved
//! per pair row), sums `K = C_in·k_h·k_w` (padded to whole tiles) in the tile registers and
//! writes each output row's part of a block through the 1x1 kernel's epilogue (bias, ReLU,
//! bf16). im2col's path gathered an f32 column matrix, packed it to bf16 again, wrote an f32
//! product and rounded it in another pass. The weight gradient is the 1x1 kernel's product
//! ([`super::pointwise::gram`]) with the taps' runs as `B` and `dY` as `A`.
//!
//! # Shapes
//! `x: [B, C_in, H, W]`, `w: [C_out, C_in, k_h, k_w]`, `y: [B, C_out, H_out, W_out]`;
//! `C_out` a multiple of 16 ([`fits`]).

use super::act::Act;
use super::buf::Lines;
use super::conv::ConvGeom;
use super::pointwise::{Block, COLS, Operand, Unit};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Whether this kernel computes `g` (on a CPU where a [`Unit`] runs): fewer than 32 input
/// channels, whole tiles of output channels, more than one tap, padding smaller than the kernel,
/// and at most 1024 products per output.
pub fn fits(g: &ConvGeom) -> bool {
    g.cin < 32
        && g.cout.is_multiple_of(16)
        && g.kh * g.kw > 1
        && g.pad[0] < g.kh
        && g.pad[1] < g.kw
        && g.stride[0] > 0
        && g.stride[1] > 0
        && g.cin * g.kh * g.kw <= 1024
}

/// One image's phase planes and where the im2col rows lie in them.
struct Planes {
    /// Plane width: the grid's row length.
    wq: usize,
    /// Halves per image: the planes, then a zero run as long as the grid.
    img: usize,
    /// Start of im2col row `(c, i, j)` (in `w`'s order), then rows of zeros up to whole tiles
    /// of `K`.
    rows: Vec<usize>,
    /// Output positions over the grid, `H_out·W_q`.
    grid: usize,
}

impl Planes {
    fn new(g: &ConvGeom) -> Planes {
        let [sh, sw] = g.stride;
        let (hp, wp) = (g.h + 2 * g.pad[0], g.w + 2 * g.pad[1]);
        let (hq, wq) = (hp.div_ceil(sh), wp.div_ceil(sw));
        let plane = hq * wq;
        let grid = g.ho() * wq;
        let mut rows = Vec::with_capacity(g.cin * g.kh * g.kw);
        for c in 0..g.cin {
            for i in 0..g.kh {
                for j in 0..g.kw {
                    let p = (i % sh) * sw + j % sw;
                    rows.push(((c * sh * sw + p) * plane) + (i / sh) * wq + j / sw);
                }
            }
        }
        // The last run may pass the last plane's end by the grid's junk columns.
        let zero = (g.cin * sh * sw * plane).max(rows.iter().max().map_or(0, |&r| r + grid));
        rows.resize(rows.len().next_multiple_of(2 * super::amx::PAIRS), zero);
        Planes {
            wq,
            img: (zero + grid).next_multiple_of(2),
            rows,
            grid,
        }
    }

    /// One image's planes into `d` (`img` halves, zero wherever the image does not write).
    fn fill<E: Act>(&self, image: &[E], g: &ConvGeom, d: &mut [u16]) {
        let hq = (g.h + 2 * g.pad[0]).div_ceil(g.stride[0]);
        super::nhwc::phase_planes_into(image, g, hq, self.wq, d);
    }
}

/// `y = max(W * x + b, 0)` (the `max` only with `relu`) for a layer that [`fits`], in the output
/// type `O`, each value rounded once from its f32 sum.
///
/// # Panics
/// When no [`Unit`] runs here, `g` does not fit, or a slice has the wrong length.
pub fn forward<E: Act, O: Act>(
    x: &[E],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<O> {
    forward_on(Unit::detect(), x, w, bias, g, relu)
}

/// [`forward`] on a given [`Unit`] (the tiles, or `VDPBF16PS` without them).
fn forward_on<E: Act, O: Act>(
    unit: Unit,
    x: &[E],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<O> {
    assert!(unit.runs_here() && fits(g), "stem of {g:?} on {unit:?}");
    g.assert_forward_lens(x.len(), w.len(), bias.map(<[f32]>::len));
    let pl = Planes::new(g);
    let (k, kpad) = (g.k(), pl.rows.len());
    let kp = kpad / 2;
    let mut wpad = vec![0.0f32; g.cout * kpad];
    for (d, s) in wpad.chunks_exact_mut(kpad).zip(w.chunks_exact(k)) {
        d[..k].copy_from_slice(s);
    }
    let wq = super::pointwise::pack_weights(&wpad, g.cout, kpad);
    let (p, wo) = (g.p(), g.wo());
    let chunk = (super::pointwise::CHUNK_BYTES / (4 * kp * COLS)).max(1) * COLS;
    let run = |n: usize, out: &mut [MaybeUninit<O>], s: &mut Scratch| {
        s.planes.resize(pl.img, 0);
        pl.fill(&x[n * g.in_len()..][..g.in_len()], g, &mut s.planes);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: on `Unit::Amx` AMX is enabled (asserted above).
        let _tiles = (unit == Unit::Amx).then(|| unsafe { super::amx::Tiles::configure() });
        for pos0 in (0..pl.grid).step_by(chunk) {
            let np = chunk.min(pl.grid - pos0);
            let panels = np.div_ceil(COLS);
            s.panels.resize(panels * kp * COLS, 0);
            super::pointwise::pack_panels(&s.planes, &pl.rows, pos0, np, kp, &mut s.panels);
            for o0 in (0..g.cout).step_by(32) {
                let r = 32.min(g.cout - o0);
                let a = &wq[o0 * kp..][..r * kp];
                let b = bias.map(|b| &b[o0..o0 + r]);
                for j in 0..panels {
                    let panel = &s.panels[j * kp * COLS..][..kp * COLS];
                    // SAFETY: the unit runs here (asserted above), and on AMX its tiles are
                    // configured on this thread (above).
                    unsafe { unit.block(kp, a, panel, &mut s.block, r) };
                    // The block's grid positions, row by row of the output.
                    let (first, end) = (pos0 + j * COLS, pos0 + (j * COLS + COLS).min(np));
                    let mut v = first;
                    while v < end {
                        let (oy, ox) = (v / pl.wq, v % pl.wq);
                        let row_end = end.min((oy + 1) * pl.wq);
                        if ox < wo {
                            let cols = row_end.min(oy * pl.wq + wo) - v;
                            let dst = &mut out[o0 * p + oy * wo + ox..];
                            super::pointwise::epilogue(
                                &s.block.0,
                                r,
                                v - first,
                                cols,
                                b,
                                relu,
                                dst,
                                p,
                            );
                        }
                        v = row_end;
                    }
                }
            }
        }
    };
    let lens = vec![g.out_len(); g.batch];
    // SAFETY: every output position of every channel lies in one grid row's first `W_out`
    // columns, which the epilogue writes for all `C_out` rows.
    unsafe { super::buf::par_parts_uninit(&lens, Scratch::default, run) }
}

/// The weight gradient `dW[o][c, i, j] = Σ_n Σ_(y, x) dY[n][o][y, x] · X[n][c][s·(y, x) + (i, j)]`
/// of a layer that [`fits`], `[C_out, C_in·k_h·k_w]`: products in bf16, sums in f32.
///
/// # Panics
/// When no [`Unit`] runs here, `g` does not fit, or a slice's length does not match `g`.
pub fn weight_grad<E: Act>(x: &[E], dy: &[E], g: &ConvGeom) -> Vec<f32> {
    weight_grad_on(Unit::detect(), x, dy, g)
}

/// [`weight_grad`] on a given [`Unit`].
fn weight_grad_on<E: Act>(unit: Unit, x: &[E], dy: &[E], g: &ConvGeom) -> Vec<f32> {
    assert!(
        unit.runs_here() && fits(g),
        "stem weight gradient of {g:?} on {unit:?}"
    );
    g.assert_grad_lens(x.len(), dy.len());
    let pl = Planes::new(g);
    let mut planes = vec![0u16; g.batch * pl.img];
    planes
        .par_chunks_mut(pl.img)
        .zip(x.par_chunks(g.in_len()))
        .for_each(|(d, s)| pl.fill(s, g, d));
    let b = Operand {
        bits: &planes,
        img: pl.img,
        rows: pl.rows[..g.k()].to_vec(),
        line: pl.wq,
        step: 1,
    };
    let dyb = super::pointwise::bf16_bits(dy);
    let a = Operand::dense(&dyb, g.cout, g.p(), g.wo());
    super::pointwise::gram(unit, &a, &b, g.batch, g.ho(), g.wo())
}

/// A worker's buffers: one image's planes, the packed panels of a chunk of positions, the f32
/// block the tiles store.
#[derive(Default)]
struct Scratch {
    planes: Vec<u16>,
    panels: Lines<u32>,
    block: Block,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::act::{bf16, to_bf16};
    use crate::kernels::conv::test_data as data;
    use crate::kernels::nhwc::tests::assert_close;
    use crate::kernels::pointwise::tests::units_or_skip;

    /// `k x k` stride `s` padding `pad`, `h x w` inputs.
    #[allow(clippy::too_many_arguments)]
    fn geom(
        b: usize,
        cin: usize,
        h: usize,
        w: usize,
        cout: usize,
        k: usize,
        s: usize,
        pad: usize,
    ) -> ConvGeom {
        ConvGeom {
            pad: [pad, pad],
            ..super::super::nhwc_amx::tests::geom(b, cin, h, w, cout, k, s)
        }
    }

    /// The layers the kernel takes: ResNet's 7x7/2 stem, VGG's 3x3 first layer, AlexNet's
    /// 11x11/4 (`K` = 363, padded to 384), odd sides, no padding, 16- and 32-row blocks, one
    /// and four channels.
    fn layers() -> Vec<ConvGeom> {
        vec![
            geom(2, 3, 20, 22, 64, 7, 2, 3),
            geom(3, 3, 9, 9, 32, 3, 1, 1),
            geom(2, 3, 31, 29, 48, 11, 4, 2),
            geom(2, 1, 12, 7, 16, 5, 1, 0),
            geom(3, 4, 11, 13, 16, 3, 2, 1),
        ]
    }

    /// Against im2col on the same bf16 operands (close: its sums group `K` differently); bias
    /// and ReLU; the bf16 output equal to the f32 output rounded once; f32 and bf16 inputs
    /// giving the same bits; 1 and 3 threads the same.
    #[test]
    fn forward_matches_im2col_and_rounds_once() {
        for unit in units_or_skip() {
            forward_matches_im2col_and_rounds_once_on(unit);
        }
    }

    fn forward_matches_im2col_and_rounds_once_on(unit: Unit) {
        for g in layers() {
            assert!(fits(&g), "{g:?}");
            let xb = to_bf16(&data(g.batch * g.in_len(), 1));
            let xr: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
            let w = data(g.cout * g.k(), 2);
            let b = data(g.cout, 3);
            for relu in [false, true] {
                let want = super::super::im2col::im2col_forward_act(&xb, &w, Some(&b), &g, relu);
                let got: Vec<f32> = forward_on(unit, &xb, &w, Some(&b), &g, relu);
                assert_close(&got, &want, &(g, relu, unit));
                let from_f32: Vec<f32> = forward_on(unit, &xr, &w, Some(&b), &g, relu);
                assert_eq!(from_f32, got, "f32 input {g:?}");
                let narrow: Vec<bf16> = forward_on(unit, &xb, &w, Some(&b), &g, relu);
                assert_eq!(narrow, to_bf16(&got), "bf16 output {g:?}");
            }
            let run = |t| {
                crate::kernels::conv::on_threads(t, || {
                    forward_on::<bf16, f32>(unit, &xb, &w, None, &g, false)
                })
            };
            assert_eq!(run(1), run(3), "{g:?} on {unit:?}");
        }
    }

    /// The weight gradient against im2col's on the same bf16 operands, on 1 and 3 threads.
    #[test]
    fn weight_grad_matches_im2col() {
        for unit in units_or_skip() {
            weight_grad_matches_im2col_on(unit);
        }
    }

    fn weight_grad_matches_im2col_on(unit: Unit) {
        for g in layers() {
            let x = to_bf16(&data(g.batch * g.in_len(), 4));
            let dy = to_bf16(&data(g.batch * g.out_len(), 5));
            let w = data(g.cout * g.k(), 6);
            let want = super::super::im2col::im2col_backward(&x, &w, &dy, &g, [false, true, false])
                .1
                .unwrap();
            let got = weight_grad_on(unit, &x, &dy, &g);
            assert_close(&got, &want, &(g, unit));
            let run = |t| crate::kernels::conv::on_threads(t, || weight_grad_on(unit, &x, &dy, &g));
            assert_eq!(run(1), run(3), "{g:?} on {unit:?}");
        }
    }
}
