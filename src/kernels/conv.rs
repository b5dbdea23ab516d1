//! Convolution on plain `f32` slices (NCHW): the geometry of a layer and the front door that
//! runs each of its products on the algorithm the kernel plan picks ([`super::plan`]):
//! Winograd ([`super::winograd`]), direct ([`super::direct`]), channels-last bf16
//! ([`super::nhwc`]) or im2col + GEMM ([`super::im2col`]).
//!
//! # Shapes
//! `x: [B, C_in, H, W]`, `w: [C_out, C_in, kh, kw]`, `bias: [C_out]`, `y: [B, C_out, H_out, W_out]`,
//! `H_out = (H + 2·ph - kh) / sh + 1` (and likewise for the width).

use super::act::{Act, bf16};
pub(super) use super::gemm::{image_blocks, sum_in_order};
use super::im2col::im2col_forward_act;
pub use super::im2col::{im2col_backward, im2col_forward};
use super::plan::{Algo, Cpu, plan};
use super::{direct, nhwc, nhwc_phases, pointwise, stem, winograd};
use rayon::prelude::*;
use std::borrow::Cow;
use std::cell::OnceCell;

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
    pub(super) fn in_len(&self) -> usize {
        self.cin * self.h * self.w
    }
    pub(super) fn out_len(&self) -> usize {
        self.cout * self.p()
    }
    /// Panics unless `x` is `batch` images of this layer's input, `w` its `[C_out, C_in, kh,
    /// kw]` weights and `bias` (when given) `C_out` values (the forward kernels' arguments).
    pub(super) fn assert_forward_lens(&self, x: usize, w: usize, bias: Option<usize>) {
        assert_eq!(x, self.batch * self.in_len(), "conv2d input length");
        assert_eq!(w, self.cout * self.k(), "conv2d weight length");
        if let Some(b) = bias {
            assert_eq!(b, self.cout, "conv2d bias length");
        }
    }
    /// Panics unless `x` and `dy` are `batch` images of this layer's input and output (the
    /// weight-gradient kernels' arguments).
    pub(super) fn assert_grad_lens(&self, x: usize, dy: usize) {
        assert_eq!(x, self.batch * self.in_len(), "conv2d input length");
        assert_eq!(
            dy,
            self.batch * self.out_len(),
            "conv2d output gradient length"
        );
    }
    /// A 1x1 stride-1 unpadded convolution reads the image itself as its column matrix.
    pub(super) fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == [1, 1] && self.pad == [0, 0]
    }
}

/// Forward convolution. Returns `y` (`[B, C_out, H_out, W_out]`, contiguous). 3x3 stride-1
/// layers with enough channels go through Winograd's F(2x2, 3x3) ([`super::winograd`]), other
/// stride-1 layers of 16 or more output channels through the direct kernels
/// ([`super::direct`]), the rest through im2col + GEMM; in bf16 without AMX, wide layers on
/// small maps and stride-2 3x3 layers through the channels-last kernel ([`super::nhwc`]).
pub fn conv2d_forward(x: &[f32], w: &[f32], bias: Option<&[f32]>, g: &ConvGeom) -> Vec<f32> {
    conv2d_forward_act(x, w, bias, g, false)
}

/// [`conv2d_forward`], then `max(·, 0)` when `relu`: applied to each image's output by the
/// thread that computed it, while it is still in cache (inference with batch norm folded into
/// the weights, [`super::conv_bn`]).
///
/// `x` is f32, or bf16 activations (a model running bf16 end to end), which the packers that
/// have a bf16 reader copy as they are and the others widen first ([`Act::widened`]).
pub fn conv2d_forward_act<E: Act>(
    x: &[E],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<f32> {
    match plan(g, Cpu::detect()).forward {
        Algo::Winograd(tile) => {
            let u = winograd::transform_weights(w, g.cout, g.cin, false, tile);
            winograd::forward_act(x, &u, bias, g, relu, tile)
        }
        Algo::Direct => direct::forward_act(&E::widened(x), w, bias, g, relu),
        Algo::ChannelsLast => nhwc::forward_act(x, w, bias, g, relu),
        Algo::Pointwise => pointwise::forward(x, w, bias, g, relu),
        Algo::Stem => stem::forward(x, w, bias, g, relu),
        Algo::Im2col => im2col_forward_act(x, w, bias, g, relu),
    }
}

/// The forward convolution (then `max(·, 0)` with `relu`) on bf16 activations into bf16
/// activations: rounded in the kernel's epilogue where the plan's algorithm does that
/// ([`Algo::Pointwise`]), else the f32 sums of chunks of images rounded while in cache.
pub fn conv2d_forward_bf16(
    x: &[bf16],
    w: &[f32],
    b: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<bf16> {
    forward_bf16_in(x, w, b, g, relu, BF16_CHUNK_BYTES)
}

/// A layer's weights prepared once for repeated forward passes (inference with a batch norm
/// folded in, [`super::infer`]): the weights and bias, and Winograd's transformed weights for
/// each tile, made on the first pass that runs Winograd.
pub struct Prepared {
    pub w: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    u: [std::sync::OnceLock<Vec<f32>>; 2],
}

impl Prepared {
    pub fn new(w: Vec<f32>, bias: Option<Vec<f32>>) -> Prepared {
        Prepared {
            w,
            bias,
            u: Default::default(),
        }
    }

    /// Winograd's transformed weights for `tile` alone (`w` not kept: the caller holds the
    /// weights, and asks for no other algorithm or tile).
    pub fn winograd_only(
        w: &[f32],
        bias: Option<Vec<f32>>,
        g: &ConvGeom,
        tile: winograd::Tile,
    ) -> Self {
        let p = Prepared::new(Vec::new(), bias);
        let u = winograd::transform_weights(w, g.cout, g.cin, false, tile);
        let _ = p.u[usize::from(tile == winograd::Tile::F4)].set(u);
        p
    }

    /// `U` of [`winograd::transform_weights`] for `tile`, made once.
    fn winograd(&self, tile: winograd::Tile, g: &ConvGeom) -> &[f32] {
        let slot = &self.u[usize::from(tile == winograd::Tile::F4)];
        slot.get_or_init(|| {
            assert!(
                !self.w.is_empty(),
                "prepared for another Winograd tile only"
            );
            winograd::transform_weights(&self.w, g.cout, g.cin, false, tile)
        })
    }
}

/// [`conv2d_forward_act`] (with the prepared bias) of prepared weights: the same values, with
/// Winograd's weight transform made once per layer instead of once per call.
pub fn conv2d_forward_prepared<E: Act>(
    x: &[E],
    p: &Prepared,
    g: &ConvGeom,
    relu: bool,
) -> Vec<f32> {
    match plan(g, Cpu::detect()).forward {
        Algo::Winograd(tile) => {
            winograd::forward_act(x, p.winograd(tile, g), p.bias.as_deref(), g, relu, tile)
        }
        _ => conv2d_forward_act(x, &p.w, p.bias.as_deref(), g, relu),
    }
}

/// [`conv2d_backward`] on bf16 activations: `dx` in bf16 (rounded as
/// [`conv2d_forward_bf16`]'s output), `dw` and `db` in f32.
pub fn conv2d_backward_bf16(
    x: &[bf16],
    w: &[f32],
    dy: &[bf16],
    g: &ConvGeom,
    need: [bool; 3],
) -> Bf16Grads {
    backward_bf16_in(x, w, dy, g, need, BF16_CHUNK_BYTES)
}

/// Bytes of f32 results per chunk of images of a convolution on bf16 activations: the kernels
/// read the bf16 activations themselves and write f32 (their sums), which the chunk rounds to
/// bf16 while it is still in the last-level cache.
const BF16_CHUNK_BYTES: usize = 16 << 20;

/// Images per chunk of [`BF16_CHUNK_BYTES`]: a multiple of the thread count (the kernels share a
/// chunk's images out among the threads), at most the batch.
fn images_per_chunk(g: &ConvGeom, budget: usize) -> usize {
    // The forward pass's output, or the input gradient.
    let per_image = 4 * g.in_len().max(g.out_len()).max(1);
    let threads = rayon::current_num_threads().max(1);
    (budget / per_image)
        .max(1)
        .next_multiple_of(threads)
        .min(g.batch.max(1))
}

/// `(x, dy)`'s chunks of images of about `budget` bytes for a convolution of geometry `g`:
/// the chunk's geometry and its range of images.
fn chunks(
    g: &ConvGeom,
    budget: usize,
) -> impl Iterator<Item = (ConvGeom, std::ops::Range<usize>)> + '_ {
    let n = images_per_chunk(g, budget);
    (0..g.batch).step_by(n.max(1)).map(move |i| {
        let m = n.min(g.batch - i);
        (ConvGeom { batch: m, ..*g }, i..i + m)
    })
}

/// The forward convolution (then `max(·, 0)` with `relu`) on bf16 activations, chunk by
/// chunk ([`BF16_CHUNK_BYTES`]): the kernels read the chunk's bf16 values, and their f32 sums are
/// rounded into `y`.
fn forward_bf16_in(
    x: &[bf16],
    w: &[f32],
    b: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
    budget: usize,
) -> Vec<bf16> {
    // Rounded in the kernel's own epilogue.
    match plan(g, Cpu::detect()).forward {
        Algo::Pointwise => return pointwise::forward(x, w, b, g, relu),
        Algo::Stem => return stem::forward(x, w, b, g, relu),
        Algo::ChannelsLast if nhwc::rounds_itself(g) => {
            return nhwc::forward_rounded(x, w, b, g, relu);
        }
        _ => {}
    }
    let (il, ol) = (g.in_len(), g.out_len());
    // Grown chunk by chunk: each chunk's zeros are written just before its values, in cache.
    let mut y = Vec::with_capacity(g.batch * ol);
    for (gc, r) in chunks(g, budget) {
        let yf = conv2d_forward_act(&x[r.start * il..r.end * il], w, b, &gc, relu);
        y.resize(r.end * ol, bf16::ZERO);
        super::act::narrow_into(&yf, &mut y[r.start * ol..]);
    }
    y
}

/// `(dx, dw, db)` of a convolution on bf16 activations: `dx` in bf16, the rest f32.
pub type Bf16Grads = (Option<Vec<bf16>>, Option<Vec<f32>>, Option<Vec<f32>>);

/// [`conv2d_backward`] on bf16 activations, chunk by chunk as [`conv2d_forward_bf16`]: `dx` rounded
/// to bf16, `dw` and `db` (f32) summed over the chunks in order.
fn backward_bf16_in(
    x: &[bf16],
    w: &[f32],
    dy: &[bf16],
    g: &ConvGeom,
    need: [bool; 3],
    budget: usize,
) -> Bf16Grads {
    let (il, ol) = (g.in_len(), g.out_len());
    // Whole, where the kernel rounds its own output; else grown chunk by chunk, as
    // `conv2d_forward_bf16`'s output.
    let plan = plan(g, Cpu::detect());
    let whole = match plan.input_grad {
        _ if !need[0] => None,
        Algo::Pointwise => Some(pointwise::input_grad(w, dy, g)),
        Algo::ChannelsLast if g.stride != [1, 1] => Some(nhwc_phases::input_grad_strided(dy, w, g)),
        Algo::ChannelsLast if nhwc::rounds_itself(&g.input_grad()) => Some(nhwc::forward_packed(
            dy,
            &nhwc_phases::pack_rotated(w, g),
            None,
            &g.input_grad(),
            false,
        )),
        _ => None,
    };
    // The tile kernels' weight gradients read the bf16 activations and sum in f32 themselves:
    // whole.
    let whole_dw = match plan.weight_grad {
        Algo::Pointwise if need[1] => Some(pointwise::weight_grad(x, dy, g)),
        Algo::Stem if need[1] => Some(stem::weight_grad(x, dy, g)),
        _ => None,
    };
    let need = [
        need[0] && whole.is_none(),
        need[1] && whole_dw.is_none(),
        need[2],
    ];
    let mut dx = need[0].then(|| Vec::with_capacity(g.batch * il));
    let (mut dw, mut db): (Option<Vec<f32>>, Option<Vec<f32>>) = (None, None);
    let add = |sum: &mut Option<Vec<f32>>, part: Option<Vec<f32>>| match (sum.as_mut(), part) {
        (Some(s), Some(p)) => s.iter_mut().zip(&p).for_each(|(s, p)| *s += p),
        (None, p) => *sum = p,
        _ => {}
    };
    for (gc, r) in chunks(g, budget).filter(|_| need.contains(&true)) {
        let (xc, dyc) = (&x[r.start * il..r.end * il], &dy[r.start * ol..r.end * ol]);
        let (dxc, dwc, dbc) = conv2d_backward(xc, w, dyc, &gc, need);
        if let (Some(dx), Some(dxc)) = (dx.as_mut(), dxc) {
            dx.resize(r.end * il, bf16::ZERO);
            super::act::narrow_into(&dxc, &mut dx[r.start * il..]);
        }
        add(&mut dw, dwc);
        add(&mut db, dbc);
    }
    (whole.or(dx), whole_dw.or(dw), db)
}

/// `(dx, dw, db)`, each present when it was asked for.
pub type ConvGrads = (Option<Vec<f32>>, Option<Vec<f32>>, Option<Vec<f32>>);

/// Gradients of [`conv2d_forward`] given the output gradient `dy`: `(dx, dw, db)`, each only when
/// asked for. The input gradient of a Winograd-eligible layer is a Winograd convolution of `dy`
/// with the rotated kernel; the rest come from the direct kernels ([`super::direct`]) or
/// im2col + GEMM, whichever was faster for such a layer.
///
/// `x` and `dy` are f32 or bf16 activations, as in [`conv2d_forward_act`].
pub fn conv2d_backward<E: Act>(
    x: &[E],
    w: &[f32],
    dy: &[E],
    g: &ConvGeom,
    need: [bool; 3],
) -> ConvGrads {
    // Which algorithm computes each gradient is the kernel plan's ([`super::plan`]); in fp32
    // the weight gradient of Winograd layers now runs through Winograd too (measured beside
    // the rule). Measured for the older rule: on Winograd layers narrower than 32 px im2col's weight
    // gradient was faster than the direct one (bench-vgg's 16 px layers: 24.7 vs 30.8 ms for
    // 128 -> 128, 12.4-14.4 vs 16 ms for 64 -> 128; at 32 px 64 -> 64 direct won, 26.3 vs
    // 29.5-33 ms: `cargo run --release --example conv_layers 2 fp32 bench-vgg`). In bf16,
    // im2col's weight gradient (on the bf16 GEMM) also wins at 32 px: 15.3 vs 18.7 ms for
    // bench-vgg's 64 -> 64 layer (`conv_layers 1 bf16 bench-vgg`).
    let plan = plan(g, Cpu::detect());
    let rest = [false, need[1], need[2]];
    // The products without a bf16 reader (the direct kernels, Winograd's weight gradient)
    // share one widened copy of bf16 `x` and `dy` (a borrow on f32): widened per product, a
    // layer whose weight and input gradients both run direct (the default run's ConvNet in
    // bf16) copied each twice.
    let (xw, dyw) = (OnceCell::new(), OnceCell::new());
    let xf = || widened_once(&xw, x);
    let dyf = || widened_once(&dyw, dy);
    let (_, dw, db) = match plan.weight_grad {
        Algo::Direct => direct::backward(xf(), w, dyf(), g, rest),
        Algo::Im2col => im2col_backward(x, w, dy, g, rest),
        // The kernels that give the weight gradient alone; the bias gradient (a sum of `dy`)
        // from im2col's.
        algo => {
            let db = im2col_backward(x, w, dy, g, [false, false, need[2]]).2;
            let dw = need[1].then(|| match algo {
                Algo::ChannelsLast => nhwc::weight_grad(x, dy, g),
                Algo::Pointwise => pointwise::weight_grad(x, dy, g),
                Algo::Stem => stem::weight_grad(x, dy, g),
                Algo::Winograd(tile) => winograd::weight_grad(xf(), dyf(), g, tile),
                Algo::Direct | Algo::Im2col => unreachable!("matched above"),
            });
            (None, dw, db)
        }
    };
    let dx = need[0].then(|| match plan.input_grad {
        Algo::Winograd(tile) => {
            let gi = g.input_grad();
            let ut = winograd::transform_weights(w, g.cout, g.cin, true, tile);
            winograd::forward(dy, &ut, None, &gi, tile)
        }
        Algo::Direct => direct::backward(xf(), w, dyf(), g, [true, false, false])
            .0
            .unwrap(),
        Algo::ChannelsLast if g.stride != [1, 1] => nhwc_phases::input_grad_strided(dy, w, g),
        Algo::ChannelsLast => nhwc::forward_act(dy, &rotated(w, g), None, &g.input_grad(), false),
        Algo::Pointwise => pointwise::input_grad(w, dy, g),
        // The plan never gives the stem kernel an input gradient (a stem has none to give).
        Algo::Im2col | Algo::Stem => im2col_backward(x, w, dy, g, [true, false, false])
            .0
            .unwrap(),
    });
    (dx, dw, db)
}

/// `v` as f32, widened into `cell` on first use ([`Act::widened`]).
fn widened_once<'a, E: Act>(cell: &'a OnceCell<Cow<'a, [f32]>>, v: &'a [E]) -> &'a [f32] {
    cell.get_or_init(|| E::widened(v))
}

/// `w'[c][o][i][j] = w[o][c][kh-1-i][kw-1-j]`: the kernel of the input gradient as a
/// convolution ([`ConvGeom::input_grad`]).
///
/// Every backward pass makes it again; written `c` by `c` it read `w` one tap group per
/// `C_in * taps` floats, a cache miss each (0.9% of a resnet18 128 px fp32 step in `perf`).
/// Here workers take blocks of input channels and walk `o` outermost, so each read is a
/// block's contiguous run of `w`.
pub(super) fn rotated(w: &[f32], g: &ConvGeom) -> Vec<f32> {
    const BLOCK: usize = 16;
    let taps = g.kh * g.kw;
    assert_eq!(w.len(), g.cout * g.cin * taps, "rotated: weight length");
    let row = g.cout * taps;
    if w.is_empty() {
        return Vec::new();
    }
    // Zeroed by the worker that fills each block: `vec![0.0; n]` zeroed the 9.4 MB of
    // resnet18's 512 -> 512 kernels on the calling thread while the other worker waited.
    super::buf::par_zeroed(
        w.len(),
        BLOCK * row,
        (0..g.cin.div_ceil(BLOCK)).into_par_iter(),
        |dst, blk| {
            let c0 = blk * BLOCK;
            let cs = dst.len() / row;
            for o in 0..g.cout {
                let src = &w[(o * g.cin + c0) * taps..][..cs * taps];
                for (k, s) in src.chunks_exact(taps).enumerate() {
                    let d = &mut dst[k * row + o * taps..][..taps];
                    for (d, s) in d.iter_mut().zip(s.iter().rev()) {
                        *d = *s;
                    }
                }
            }
        },
    )
}

/// `f` run on a fresh rayon pool of `threads` threads (the kernels' tests of thread-count
/// determinism).
#[cfg(test)]
pub(super) fn on_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap()
        .install(f)
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
    use super::super::im2col::valid_range;
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
            // A pointwise layer on small maps, grouped like the others (the weight gradient
            // per image).
            g(5, 3, 2, 2, 4, [1, 1], 1, 0),
            // 512 input channels: im2col's fp32 input gradient as the forward convolution of
            // `dY` with the rotated kernel (bf16 takes that route at any width).
            g(2, 512, 3, 4, 3, [3, 3], 1, 1),
            // 1152+ products per output: bf16 on AVX512-BF16 takes the channels-last kernel
            // (forward and input gradient; forward only at stride 2).
            g(2, 128, 4, 5, 128, [3, 3], 1, 1),
            g(3, 130, 5, 6, 32, [3, 3], 2, 1),
            // RGB stems whose fp32 weight gradient the direct kernel takes by phase planes
            // (ResNet's 7x7/2, AlexNet's 11x11/4; the last with a ragged right edge).
            g(2, 3, 37, 36, 16, [7, 7], 2, 3),
            g(2, 3, 75, 78, 16, [11, 11], 4, 2),
        ]
    }

    /// The phase-plane weight gradient of strided stems is im2col's, value by value, on one
    /// thread and on more threads than images (channel blocks), and the plan routes fp32
    /// stems to it where the AVX-512 direct kernels run.
    #[test]
    fn strided_stem_weight_gradient_matches_im2col() {
        use crate::kernels::im2col::im2col_backward;
        let stems: Vec<ConvGeom> = geoms()
            .into_iter()
            .filter(direct::fits_strided_weight_grad)
            .collect();
        assert_eq!(stems.len(), 2, "{stems:?}");
        for g in stems {
            let x = data(g.batch * g.in_len(), 7);
            let w = data(g.cout * g.k(), 8);
            let dy = data(g.batch * g.out_len(), 9);
            if !direct::available() {
                eprintln!("skipped: this CPU runs no direct kernel");
                return;
            }
            // The plan gives it these stems with the AVX-512 kernel (measured: AVX2 lost at
            // 224 px); the kernel itself runs with either.
            if direct::wide() {
                assert_eq!(plan(&g, Cpu::detect()).weight_grad, Algo::Direct, "{g:?}");
            }
            let (_, dw0, db0) = im2col_backward(&x, &w, &dy, &g, [false, true, true]);
            let (dw0, db0) = (dw0.unwrap(), db0.unwrap());
            for threads in [1, g.batch + 1] {
                let (_, dw, db) = on_threads(threads, || {
                    direct::backward(&x, &w, &dy, &g, [false, true, true])
                });
                for (a, e) in dw.unwrap().iter().zip(&dw0) {
                    assert!((a - e).abs() < 1e-3 * e.abs().max(1.0), "{g:?}: {a} vs {e}");
                }
                for (a, e) in db.unwrap().iter().zip(&db0) {
                    assert!((a - e).abs() < 1e-3 * e.abs().max(1.0), "{g:?}: {a} vs {e}");
                }
            }
        }
    }

    /// The blocked, parallel rotation is the definition `w'[c][o][i][j] = w[o][c][kh-1-i][kw-1-j]`,
    /// with input channels that fill no whole block and a non-square kernel.
    #[test]
    fn rotated_is_the_definition() {
        for (cin, cout, kh, kw) in [(37, 5, 3, 2), (16, 3, 1, 1), (3, 64, 7, 7)] {
            let g = ConvGeom {
                cin,
                cout,
                kh,
                kw,
                ..geoms()[0]
            };
            let w = test_data(cout * cin * kh * kw, 9);
            let r = rotated(&w, &g);
            for c in 0..cin {
                for o in 0..cout {
                    for i in 0..kh {
                        for j in 0..kw {
                            let want = w[((o * cin + c) * kh + kh - 1 - i) * kw + kw - 1 - j];
                            assert_eq!(r[((c * cout + o) * kh + i) * kw + j], want);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn small_outputs_are_grouped() {
        let grouped: Vec<usize> = geoms().iter().map(|g| g.images_per_gemm()).collect();
        assert_eq!(grouped.iter().filter(|&&n| n > 1).count(), 3, "{grouped:?}");
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
        let bf16_winograd = |g: &ConvGeom| {
            winograd::applies(&ConvGeom {
                precision: Precision::Bf16,
                ..*g
            })
        };
        for g32 in geoms().into_iter().filter(|g| !bf16_winograd(g)) {
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

    /// Where the plan gives the weight gradient to the channels-last kernel (bf16 without
    /// AMX, stride 1, 28+ px), `conv2d_backward` returns its `dW` and im2col's `db`.
    #[test]
    fn channels_last_weight_gradient_is_routed() {
        use crate::kernels::{Precision, bf16, nhwc};
        let g = ConvGeom {
            precision: Precision::Bf16,
            ..geoms()[0]
        };
        let g = ConvGeom {
            cin: 64,
            cout: 32,
            h: 8,
            w: 28,
            ..g
        };
        if !bf16::available() || plan(&g, Cpu::detect()).weight_grad != Algo::ChannelsLast {
            eprintln!("skipped: the plan does not use the channels-last weight gradient here");
            return;
        }
        let x = data(g.batch * g.in_len(), 7);
        let w = data(g.cout * g.k(), 8);
        let dy = data(g.batch * g.out_len(), 9);
        let (_, dw, db) = conv2d_backward(&x, &w, &dy, &g, [false, true, true]);
        assert_eq!(dw.unwrap(), nhwc::weight_grad(&x, &dy, &g));
        let g32 = ConvGeom {
            precision: Precision::Fp32,
            ..g
        };
        assert_eq!(
            db,
            conv2d_backward(&x, &w, &dy, &g32, [false, false, true]).2
        );
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
            on_threads(threads, || {
                conv2d_backward(&x, &w, &dy, &g, [true, true, true])
            })
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

    /// Every algorithm reads bf16 activations as the f32 values they widen to: a convolution
    /// of bf16 `x` (and `dy`) gives the bits of the same convolution of the widened values,
    /// forward and backward, in f32 and bf16 products, on geometries that the plan sends to
    /// each algorithm this CPU has (checked: none silently missed).
    #[test]
    fn bf16_activations_read_as_their_widened_values() {
        use super::super::act::{bf16, to_bf16, to_f32};
        use super::super::plan::{Algo, Tiles};
        use std::collections::BTreeSet;
        let geoms = [
            // (cin, cout, size, k, stride, pad)
            (16, 24, 28, 1, 1, 0),
            (24, 40, 9, 1, 2, 0),
            (64, 64, 8, 3, 1, 1),
            (128, 32, 6, 3, 1, 1),
            (32, 48, 9, 3, 2, 1),
            (3, 16, 20, 7, 2, 3),
            (8, 16, 16, 3, 1, 1),
            (8, 16, 16, 5, 1, 2),
        ];
        let cpu = Cpu::detect();
        let mut precisions = vec![crate::kernels::Precision::Fp32];
        if crate::kernels::bf16::available() {
            precisions.push(crate::kernels::Precision::Bf16);
        }
        for precision in precisions {
            let mut seen = BTreeSet::new();
            for (i, &(cin, cout, size, k, s, p)) in geoms.iter().enumerate() {
                let g = ConvGeom {
                    batch: 2,
                    cin,
                    h: size,
                    w: size,
                    cout,
                    kh: k,
                    kw: k,
                    stride: [s; 2],
                    pad: [p; 2],
                    precision,
                };
                let pl = plan(&g, cpu);
                seen.extend([pl.forward, pl.input_grad, pl.weight_grad].map(|a| a.as_str()));
                let xb: Vec<bf16> = to_bf16(&data(g.batch * g.in_len(), 3 + i as u32));
                let dyb: Vec<bf16> = to_bf16(&data(g.batch * g.out_len(), 7 + i as u32));
                let w = data(g.cout * g.k(), 11 + i as u32);
                let b = data(g.cout, 13);
                let (xf, dyf) = (to_f32(&xb), to_f32(&dyb));
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                let at = format!("{g:?} planned {pl:?}");
                assert_eq!(
                    bits(&conv2d_forward_act(&xb, &w, Some(&b), &g, true)),
                    bits(&conv2d_forward_act(&xf, &w, Some(&b), &g, true)),
                    "forward of {at}"
                );
                let (gb, gf) = (
                    conv2d_backward(&xb, &w, &dyb, &g, [true; 3]),
                    conv2d_backward(&xf, &w, &dyf, &g, [true; 3]),
                );
                assert_eq!(bits(&gb.0.unwrap()), bits(&gf.0.unwrap()), "dx of {at}");
                assert_eq!(bits(&gb.1.unwrap()), bits(&gf.1.unwrap()), "dw of {at}");
                assert_eq!(bits(&gb.2.unwrap()), bits(&gf.2.unwrap()), "db of {at}");
            }
            let mut want = vec![Algo::Im2col.as_str()];
            if cpu.tiles != Tiles::None {
                if precision == crate::kernels::Precision::Fp32 {
                    want.extend(["winograd", Algo::Direct.as_str()]);
                } else if cpu.amx {
                    // The tiles' implicit GEMM takes these geometries' 3x3 layers.
                    want.push(Algo::ChannelsLast.as_str());
                } else if cpu.tiles == Tiles::Avx512 {
                    want.extend(["winograd", Algo::ChannelsLast.as_str()]);
                } else {
                    want.push("winograd");
                }
            }
            for a in want {
                assert!(
                    seen.contains(a),
                    "{precision:?}: no geometry ran {a}: {seen:?}"
                );
            }
        }
    }
}

#[cfg(test)]
mod bf16_tests {
    use super::*;
    use crate::kernels::act;

    /// A batch split into chunks gives the one-chunk output and input gradient bit for bit
    /// (each image is computed alone), and the weight and bias gradients up to the order of
    /// the chunks' sums.
    #[test]
    fn chunks_of_images_give_the_whole_batch_result() {
        let g = ConvGeom {
            batch: 5,
            cin: 6,
            h: 9,
            w: 8,
            cout: 7,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            pad: [1, 1],
            precision: crate::kernels::Precision::Fp32,
        };
        let one = 4 * (g.in_len() + g.out_len());
        let ranges: Vec<_> = chunks(&g, one).map(|(_, r)| r).collect();
        assert!(
            ranges.len() > 1 || rayon::current_num_threads() >= 5,
            "{ranges:?}"
        );
        assert!(chunks(&g, one).all(|(c, r)| c.batch == r.len()));
        assert_eq!(ranges.first().map(|r| r.start), Some(0));
        assert_eq!(ranges.last().map(|r| r.end), Some(5));
        assert!(ranges.windows(2).all(|p| p[0].end == p[1].start));
        let x = act::to_bf16(&test_data(g.batch * g.in_len(), 1));
        let w = test_data(g.cout * g.k(), 2);
        let b = test_data(g.cout, 3);
        let dy = act::to_bf16(&test_data(g.batch * g.out_len(), 4));
        let whole = usize::MAX / 2;
        assert_eq!(
            forward_bf16_in(&x, &w, Some(&b), &g, true, one),
            forward_bf16_in(&x, &w, Some(&b), &g, true, whole)
        );
        let (dx1, dw1, db1) = backward_bf16_in(&x, &w, &dy, &g, [true; 3], one);
        let (dx0, dw0, db0) = backward_bf16_in(&x, &w, &dy, &g, [true; 3], whole);
        assert_eq!(dx1, dx0);
        for (a, e) in dw1
            .unwrap()
            .iter()
            .chain(&db1.unwrap())
            .zip(dw0.unwrap().iter().chain(&db0.unwrap()))
        {
            assert!((a - e).abs() <= 1e-5 * (1.0 + e.abs()), "{a} vs {e}");
        }
    }
}
