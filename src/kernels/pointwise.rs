//! 1x1 convolutions on the AMX tiles or, without them, on AVX512-BF16's `VDPBF16PS` ([`Unit`]),
//! NCHW in and out, rounded to the output type in the block's epilogue: ResNet-50's
//! bottleneck layers (He et al. 2016, "Deep Residual Learning", Table 1:
//! 1x1 reduce, 3x3, 1x1 expand; and the 1x1/2 projections).
//!
//! A 1x1 convolution is one GEMM per image, `Y[C_out, P] = W[C_out, C_in] · X[C_in, P]` (`P`
//! output positions), with a small `K = C_in` (64-2048): each output takes only `C_in`
//! products, so the kernel is bound by what it writes. im2col's path on the tiles wrote the
//! f32 product, then added the bias, then the caller rounded it to bf16 (`perf`, resnet50 bf16
//! training on the AMX Xeon: the GEMM's tile block 24% of samples, its `memset`s and the
//! rounding pass another 8%). Here each 32 x 32 block of `Y` is summed over all of `K` in the
//! tile registers ([`super::amx::block`]; in 8 x 32 register tiles by [`super::bf16::block32`]
//! without AMX), stored to an L1 scratch once, and written out by
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
use super::buf::Lines;
use super::conv::ConvGeom;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Positions per `B` panel: two column tiles.
pub(super) const COLS: usize = 32;

/// Bytes of packed `B` per chunk of positions: with a 32-row block of weights (up to 128 KiB
/// at 2048 channels) it stays in a core's L2 while every block of output channels reads it.
pub(super) const CHUNK_BYTES: usize = 512 << 10;

/// Whether this kernel computes `g` (on a CPU where a [`Unit`] runs): a 1x1 kernel
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
/// When no [`Unit`] runs here (neither AMX nor AVX512-BF16), `g` does not fit, or a slice
/// has the wrong length.
pub fn forward<E: Act, O: Act>(
    x: &[E],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<O> {
    forward_on(Unit::detect(), x, w, bias, g, relu)
}

/// What multiplies a 32 x 32 block: the AMX tiles ([`super::amx::block`]) where they are
/// [`super::amx::enabled`], else `VDPBF16PS` ([`super::bf16::block32`]) on AVX512-BF16. The
/// rest of the kernel (packing, the epilogue that rounds to the output type, no f32 image, no
/// zero fill) is the same for both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Unit {
    Amx,
    Vdpbf16ps,
}

impl Unit {
    /// The tiles where enabled, else `VDPBF16PS`.
    pub(super) fn detect() -> Unit {
        if super::amx::enabled() {
            Unit::Amx
        } else {
            Unit::Vdpbf16ps
        }
    }

    /// Whether this CPU (and process) can run it.
    pub(super) fn runs_here(self) -> bool {
        match self {
            Unit::Amx => super::amx::enabled(),
            Unit::Vdpbf16ps => super::bf16::available(),
        }
    }

    /// `c[r, 32] = A · panel` over `kp` pair words: `a` holds `r` (16 or 32) rows of `kp`
    /// words (as [`pack_weights`] packs them), `panel` `kp` pair rows of [`COLS`] words (as
    /// [`pack_panels`] packs them); `c`'s rows are 32 floats apart.
    ///
    /// # Safety
    /// The unit [`Unit::runs_here`]; on [`Unit::Amx`] a [`super::amx::Tiles`] is live on this
    /// thread.
    ///
    /// # Panics
    /// When `r` is not 16 or 32, `kp` not a multiple of the tiles' pairs, or `a` or `panel` too
    /// short.
    pub(super) unsafe fn block(self, kp: usize, a: &[u32], panel: &[u32], c: &mut Block, r: usize) {
        assert!(
            (r == 16 || r == 32)
                && kp.is_multiple_of(super::amx::PAIRS)
                && a.len() >= r * kp
                && panel.len() >= kp * COLS,
            "a {r}-row block of {kp} pairs"
        );
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (a, panel, c);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the operands hold what the kernels read (asserted); the block is 32 rows of
        // 32 floats, so the full-block stores stay inside it; the unit runs here and on AMX
        // the tiles are live (the caller's contract).
        unsafe {
            let (a, b, c) = (a.as_ptr(), panel.as_ptr(), c.0.as_mut_ptr());
            match (self, r > 16) {
                (Unit::Vdpbf16ps, _) => super::bf16::block32(kp, a, b, c, r),
                (Unit::Amx, true) => {
                    super::amx::block::<2, 2>(kp, a, b, COLS, c, 32, r, COLS, false)
                }
                (Unit::Amx, false) => {
                    super::amx::block::<1, 2>(kp, a, b, COLS, c, 32, r, COLS, false)
                }
            }
        }
    }
}

/// [`forward`] on a given [`Unit`].
fn forward_on<E: Act, O: Act>(
    unit_kind: Unit,
    x: &[E],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &ConvGeom,
    relu: bool,
) -> Vec<O> {
    assert!(
        unit_kind.runs_here() && fits(g),
        "1x1 convolution of {g:?} on {unit_kind:?}"
    );
    g.assert_forward_lens(x.len(), w.len(), bias.map(<[f32]>::len));
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
    // Where each channel's positions start in an image's `[C_in, P]` bits.
    let starts: Vec<usize> = (0..g.cin).map(|c| c * p).collect();
    let run = |u: usize, out: &mut [MaybeUninit<O>], scratch: &mut Scratch| {
        let (n, rows) = &units[u];
        let xn = &x[n * in_len..][..in_len];
        unit(
            unit_kind,
            xn,
            &wq,
            bias,
            relu,
            g,
            rows.clone(),
            &starts,
            out,
            scratch,
        );
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
    input_grad_on(Unit::detect(), w, dy, g)
}

/// [`input_grad`] on a given [`Unit`].
fn input_grad_on<E: Act, O: Act>(unit_kind: Unit, w: &[f32], dy: &[E], g: &ConvGeom) -> Vec<O> {
    let gi = input_grad_geom(g).expect("a 1x1 layer without padding");
    let sampled: Vec<O> = forward_on(unit_kind, dy, &super::conv::rotated(w, g), None, &gi, false);
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

/// Bytes of one chunk of images' transposed operand (all of its blocks) and one 32-row block
/// of the other: about half of a Sapphire Rapids core's 2 MiB L2, so the chunk stays there while
/// every block of the layer reads it. Small in tests, so they cover several chunks.
#[cfg(not(test))]
const WGRAD_CHUNK_BYTES: usize = 1 << 20;

/// Entries of a [`gram`] product small enough to sum one copy per chunk of images (256 KiB).
const SMALL_GRAM: usize = 1 << 16;
#[cfg(test)]
const WGRAD_CHUNK_BYTES: usize = 8192;

/// The weight gradient of a 1x1 layer that [`fits`], `dW[o][c] = Σ_n Σ_p dY[n][o][p] ·
/// X[n][c][s·p]` (`s·p` the input position sampled for output `p`), `[C_out, C_in]`: products in
/// bf16, sums in f32.
///
/// A product of two activations over their positions, `M = A · Bᵀ` with `A` and `B`
/// `[channels, P]` per image. The operand with more channels is `A` (`dY`, or `X` when the layer
/// narrows; `dY` for the 1x1/2 projections, whose `X` is strided): its tile rows are 32
/// consecutive positions of one channel, read straight from the NCHW activation (the last
/// `P % 32` positions from a zero-padded copy). The other, `B`, is transposed per block of 32
/// channels to position pairs `[P / 2, 32]`, which the tiles take as they are. The channels-last
/// kernel ([`super::nhwc_amx::weight_grad`]) instead copied `X` and transposed `dY`, so on the
/// widening layers it transposed the larger operand (plan.rs has its times).
///
/// Threads split `B`'s channel blocks and each packs its own, so every sum has one order (chunk
/// by chunk of images, positions ascending) whatever the thread count.
///
/// # Panics
/// When no [`Unit`] runs here, `g` does not [`fits`], or a slice's length does not match `g`.
pub fn weight_grad<E: Act>(x: &[E], dy: &[E], g: &ConvGeom) -> Vec<f32> {
    weight_grad_on(Unit::detect(), x, dy, g)
}

/// [`weight_grad`] on a given [`Unit`].
fn weight_grad_on<E: Act>(unit_kind: Unit, x: &[E], dy: &[E], g: &ConvGeom) -> Vec<f32> {
    assert!(
        unit_kind.runs_here() && fits(g),
        "1x1 weight gradient of {g:?} on {unit_kind:?}"
    );
    g.assert_grad_lens(x.len(), dy.len());
    let (xb, dyb) = (bf16_bits(x), bf16_bits(dy));
    let (ho, wo) = (g.ho(), g.wo());
    let dense = |bits, ch| Operand::dense(bits, ch, ho * wo, wo);
    let hw = g.h * g.w;
    let xs = Operand {
        bits: &xb,
        img: g.cin * hw,
        rows: (0..g.cin).map(|c| c * hw).collect(),
        line: g.stride[0] * g.w,
        step: g.stride[1],
    };
    let a_is_dy = g.cout >= g.cin || g.stride != [1, 1];
    let (a, b) = if a_is_dy {
        (dense(&dyb, g.cout), xs)
    } else {
        (dense(&xb, g.cin), dense(&dyb, g.cout))
    };
    let m = gram(unit_kind, &a, &b, g.batch, ho, wo);
    if a_is_dy {
        m
    } else {
        // `M = dWᵀ`.
        super::gemm::sum_transposed_in_order(&[&m], g.cin, g.cout, None)
    }
}

/// The bf16 bits of `v`: borrowed from bf16 activations, rounded from f32 ones.
pub(super) fn bf16_bits<E: Act>(v: &[E]) -> std::borrow::Cow<'_, [u16]> {
    match E::as_bf16_bits(v) {
        Some(b) => b.into(),
        None => {
            let mut b = vec![0; v.len()];
            E::bits_into(v, &mut b);
            b.into()
        }
    }
}

/// One operand of [`gram`], `img` bf16 values per image: row `r`'s value at output position
/// `(y, x)` is `bits[n·img + rows[r] + y·line + x·step]` (a channel at its sampled positions, or
/// a tap of a phase-planed image, [`super::stem`]).
pub(super) struct Operand<'a> {
    pub bits: &'a [u16],
    pub img: usize,
    pub rows: Vec<usize>,
    pub line: usize,
    pub step: usize,
}

impl<'a> Operand<'a> {
    /// `ch` channels of `p` positions per image, `wo` a row, every one counted.
    pub fn dense(bits: &'a [u16], ch: usize, p: usize, wo: usize) -> Self {
        Operand {
            bits,
            img: ch * p,
            rows: (0..ch).map(|c| c * p).collect(),
            line: wo,
            step: 1,
        }
    }

    fn image(&self, n: usize) -> &[u16] {
        &self.bits[n * self.img..][..self.img]
    }
}

/// [`weight_grad`]'s product, `[A.ch, B.ch]`: `M[i][j] = Σ_n Σ_{p < ho·wo} A[n][i][p] ·
/// B[n][j][sampled p]` with `A` dense (stride 1, `ho x wo`).
///
/// Each worker sums one part of `M`: all its rows and a range of `B`'s 32-channel blocks, or,
/// where `B` has fewer blocks than there are threads (and than `A`), a range of `A`'s blocks
/// against all of `B` (a narrow `dY`, which then each worker packs whole). A small `M` whose
/// `B` has fewer blocks than threads (a stem's taps, [`super::stem`]) is summed one part per
/// chunk of images instead, so no worker packs what another packs too.
pub(super) fn gram(
    unit_kind: Unit,
    a: &Operand,
    b: &Operand,
    batch: usize,
    ho: usize,
    wo: usize,
) -> Vec<f32> {
    let p = ho * wo;
    let (ra, rb) = (a.rows.len(), b.rows.len());
    // `A` is read as runs of 32 positions of each row, rows `p` apart.
    assert!(a.rows.iter().enumerate().all(|(r, &at)| at == r * p) && a.img == ra * p);
    assert!(ra.is_multiple_of(16) && a.bits.len() == batch * a.img);
    assert!(b.bits.len() >= batch * b.img);
    let vpad = p.next_multiple_of(32);
    let (steps, tail) = (p / 32, p % 32);
    let panel = vpad / 2 * COLS;
    let chunk = (WGRAD_CHUNK_BYTES / (2 * vpad * (rb + 32)).max(1)).clamp(1, batch.max(1));
    let (a_blocks, b_blocks) = (ra.div_ceil(32), rb.div_ceil(32));
    let threads = rayon::current_num_threads().max(1);
    let chunks = batch.div_ceil(chunk);
    // A small `M` whose `B` has fewer blocks than threads: one part per chunk of images, summed
    // in order (the same additions as one part's, so the same bits on any thread count).
    let by_chunk = b_blocks < threads && chunks > 1 && ra * rb <= SMALL_GRAM;
    let split_b = b_blocks >= threads || b_blocks >= a_blocks;
    let parts = if by_chunk {
        chunks
    } else {
        threads
            .min(if split_b { b_blocks } else { a_blocks })
            .max(1)
    };
    let share = |t: usize, n: usize| t * n / parts..(t + 1) * n / parts;
    // Part `t`'s blocks of `A` rows and of `B` channels, and its images.
    let own = |t: usize| {
        if by_chunk {
            (
                0..a_blocks,
                0..b_blocks,
                t * chunk..((t + 1) * chunk).min(batch),
            )
        } else if split_b {
            (0..a_blocks, share(t, b_blocks), 0..batch)
        } else {
            (share(t, a_blocks), 0..b_blocks, 0..batch)
        }
    };
    let span = |r: &std::ops::Range<usize>, n: usize| 32 * r.start..(32 * r.end).min(n);
    let sums: Vec<Vec<f32>> = (0..parts)
        .into_par_iter()
        .map(|t| {
            let (own_a, own_b, imgs) = own(t);
            let (rows, cols) = (span(&own_a, ra), span(&own_b, rb));
            let (nrows, ncols, nown) = (rows.len(), cols.len(), own_b.len());
            let mut part = vec![0.0f32; nrows * ncols];
            let mut packed = Lines::<u32>::zeroed(chunk * nown * panel);
            let mut compact = vec![0u32; 32 * vpad / 2];
            let mut tails = Lines::<u16>::zeroed(if tail > 0 { chunk * nrows * 32 } else { 0 });
            let mut c = Block::default();
            let amx = unit_kind == Unit::Amx;
            #[cfg(target_arch = "x86_64")]
            // SAFETY: on `Unit::Amx` AMX is enabled (the callers assert that the unit runs
            // here).
            let _tiles = amx.then(|| unsafe { super::amx::Tiles::configure() });
            for n0 in imgs.clone().step_by(chunk) {
                let images = chunk.min(imgs.end - n0);
                for i in 0..images {
                    let bn = b.image(n0 + i);
                    for (k, cb) in own_b.clone().enumerate() {
                        let dst = &mut packed[(i * nown + k) * panel..][..panel];
                        let chans = 32 * cb..(32 * cb + 32).min(rb);
                        pack_pairs(b, bn, chans, ho, wo, vpad, &mut compact, dst);
                    }
                    if tail > 0 {
                        let an = a.image(n0 + i);
                        let ti = tails[i * nrows * 32..][..nrows * 32].chunks_exact_mut(32);
                        for (r, t) in rows.clone().zip(ti) {
                            t[..tail].copy_from_slice(&an[r * p + 32 * steps..][..tail]);
                        }
                    }
                }
                for ob in rows.clone().step_by(32) {
                    let r2 = ra - ob > 16;
                    let runs = super::amx::Runs {
                        ptr: a.bits[n0 * ra * p + ob * p..].as_ptr(),
                        rs: p,
                        img: ra * p,
                    };
                    let tail_runs = (tail > 0).then(|| super::amx::Runs {
                        ptr: tails[(ob - rows.start) * 32..].as_ptr(),
                        rs: 32,
                        img: nrows * 32,
                    });
                    for k in 0..nown {
                        let c0 = 32 * k;
                        let v2 = ncols - c0 > 16;
                        let bp = packed[k * panel..].as_ptr();
                        let b_img = nown * panel;
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: on AMX the tiles are configured on this thread, else the CPU
                        // has AVX512-BF16 (the callers assert the unit runs here). Image `i < images`
                        // of the block reads `A` rows `ob + r` (`r < 16·R <= ra - ob`) at
                        // positions `32·s + (0..32) <= 32·steps <= p` of its own row, inside
                        // `a.bits` (`(n0 + i)·ra·p + (ob + r)·p`, `n0 + i < batch`); the tail's
                        // rows `ob + r - rows.start < nrows` of 32 halves inside image `i`'s
                        // `nrows·32`; `B` pair rows `< 16·(steps + 1) <= vpad / 2` (`< vpad /
                        // 2` without a tail) of `COLS` words, inside block `k` of image `i`'s
                        // panels; `c` holds four aligned tiles.
                        unsafe {
                            use super::amx::wgrad_block;
                            use super::bf16::wgrad_block32;
                            let out = c.0.as_mut_ptr();
                            let (ta, bi) = (tail_runs, b_img);
                            // One block of `16·R x 16·V` on the unit.
                            macro_rules! block {
                                ($r:literal, $v:literal) => {
                                    if amx {
                                        wgrad_block::<$r, $v>(
                                            runs, ta, bp, COLS, bi, images, steps, out, None,
                                        )
                                    } else {
                                        wgrad_block32::<$r, $v>(
                                            runs, ta, bp, COLS, bi, images, steps, out,
                                        )
                                    }
                                };
                            }
                            match (r2, v2) {
                                (true, true) => block!(2, 2),
                                (true, false) => block!(2, 1),
                                (false, true) => block!(1, 2),
                                (false, false) => block!(1, 1),
                            }
                        }
                        for ri in 0..1 + r2 as usize {
                            for vi in 0..1 + v2 as usize {
                                // `B`'s last block may end inside a tile (a stem's 147 taps).
                                let w = 16.min(ncols - c0 - 16 * vi);
                                for r in 0..16 {
                                    let row = ob - rows.start + 16 * ri + r;
                                    let dst = &mut part[row * ncols + c0 + 16 * vi..][..w];
                                    let src = &c.0[256 * (2 * ri + vi) + 16 * r..][..w];
                                    dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s);
                                }
                            }
                        }
                    }
                }
            }
            part
        })
        .collect();
    if by_chunk {
        let mut m = vec![0.0f32; ra * rb];
        for part in &sums {
            m.iter_mut().zip(part).for_each(|(m, p)| *m += p);
        }
        return m;
    }
    // The parts into `M`, row by row.
    let mut m = vec![0.0f32; ra * rb];
    m.par_chunks_mut(rb).enumerate().for_each(|(i, row)| {
        for (t, part) in sums.iter().enumerate() {
            let (own_a, own_b, _) = own(t);
            let (rows, cols) = (span(&own_a, ra), span(&own_b, rb));
            if rows.contains(&i) {
                let at = (i - rows.start) * cols.len();
                row[cols.clone()].copy_from_slice(&part[at..][..cols.len()]);
            }
        }
    });
    m
}

/// Rows `chans` of `bn` (one image of `b`), at the sampled positions, as position pairs:
/// `dst[q·COLS + j] = (v[j][2q], v[j][2q + 1])` for channel `chans.start + j` (zero past `P`
/// and past the channels), through `compact` (`[32, vpad]` halves).
#[allow(clippy::too_many_arguments)]
fn pack_pairs(
    b: &Operand,
    bn: &[u16],
    chans: std::ops::Range<usize>,
    ho: usize,
    wo: usize,
    vpad: usize,
    compact: &mut [u32],
    dst: &mut [u32],
) {
    let p = ho * wo;
    let halves: &mut [u16] = bytemuck::cast_slice_mut(compact);
    for (j, c) in chans.clone().enumerate() {
        let src = &bn[b.rows[c]..];
        let row = &mut halves[j * vpad..][..vpad];
        if b.step == 1 && b.line == wo {
            row[..p].copy_from_slice(&src[..p]);
        } else {
            for (oy, out) in row[..p].chunks_exact_mut(wo).enumerate() {
                let line = &src[oy * b.line..];
                if b.step == 1 {
                    out.copy_from_slice(&line[..wo]);
                } else {
                    out.iter_mut()
                        .enumerate()
                        .for_each(|(ox, d)| *d = line[ox * b.step]);
                }
            }
        }
        row[p..].fill(0);
    }
    let rows = chans.len();
    super::simd::transpose_words_into(&compact[..rows * vpad / 2], rows, vpad / 2, dst, COLS);
}

/// `w` (`[rows, k]`, f32) rounded to bf16 pairs along `k`: row `o`'s word `q` holds
/// `(w[o][2q], w[o][2q + 1])`, rows `k / 2` words apart (the tiles' `A` layout).
pub(super) fn pack_weights(w: &[f32], rows: usize, k: usize) -> Lines<u32> {
    assert!(
        k.is_multiple_of(2) && w.len() == rows * k,
        "1x1 weights [{rows}, {k}]"
    );
    let mut out = Lines::zeroed(rows * k / 2);
    // A pair word's low half is its first value: the words' halves in memory order are `w`'s
    // values in order (as `PackedLhs::from_rows` writes them).
    super::bf16::round_slice(w, bytemuck::cast_slice_mut(&mut out));
    out
}

/// A worker's buffers: the image's bits (when it is f32 or strided), the packed panels of a
/// chunk of positions, and the f32 block the tiles store.
#[derive(Default)]
struct Scratch {
    bits: Vec<u16>,
    compact: Vec<u16>,
    panels: Lines<u32>,
    block: Block,
}

/// A 32 x 32 f32 block (four tiles), aligned for `TILESTORED`.
#[repr(C, align(64))]
pub(super) struct Block(pub [f32; 4 * 256]);

impl Default for Block {
    fn default() -> Self {
        Block([0.0; 4 * 256])
    }
}

/// Output channels `rows` of one image `xn` into `out` (`rows.len()` channels of `P` values);
/// `starts[c]` is where channel `c`'s positions begin in the image's `[C_in, P]` bits.
#[allow(clippy::too_many_arguments)]
fn unit<E: Act, O: Act>(
    unit_kind: Unit,
    xn: &[E],
    wq: &[u32],
    bias: Option<&[f32]>,
    relu: bool,
    g: &ConvGeom,
    rows: std::ops::Range<usize>,
    starts: &[usize],
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
    // SAFETY: on `Unit::Amx`, AMX is enabled (`forward_on` asserts it), so the CPU has it and
    // the process may use it.
    let _tiles = (unit_kind == Unit::Amx).then(|| unsafe { super::amx::Tiles::configure() });
    for pos0 in (0..p).step_by(chunk) {
        let np = chunk.min(p - pos0);
        let panels = np.div_ceil(COLS);
        s.panels.resize(panels * kp * COLS, 0);
        pack_panels(src, starts, pos0, np, kp, &mut s.panels);
        for o0 in rows.clone().step_by(32) {
            let r = 32.min(rows.end - o0);
            let a = &wq[o0 * kp..][..r * kp];
            let b = bias.map(|b| &b[o0..o0 + r]);
            for j in 0..panels {
                let cols = COLS.min(np - j * COLS);
                let panel = &s.panels[j * kp * COLS..][..kp * COLS];
                // SAFETY: on AMX the tiles are configured on this thread (above).
                unsafe { unit_kind.block(kp, a, panel, &mut s.block, r) };
                let at = (o0 - rows.start) * p + pos0 + j * COLS;
                epilogue(&s.block.0, r, 0, cols, b, relu, &mut out[at..], p);
            }
        }
    }
}

/// Packs positions `pos0..pos0 + np` of the `2·kp` rows of `src` (bf16 bits; row `r`'s
/// position `v` at `src[rows[r] + v]`) into panels of [`COLS`] positions: panel `j`'s word
/// `(q, c)` is `(row 2q, row 2q + 1)` at position `pos0 + j·COLS + c`, zero past `np`.
pub(super) fn pack_panels(
    src: &[u16],
    rows: &[usize],
    pos0: usize,
    np: usize,
    kp: usize,
    out: &mut [u32],
) {
    let panels = np.div_ceil(COLS);
    assert!(rows.len() == 2 * kp && out.len() >= panels * kp * COLS);
    assert!(
        rows.iter().all(|&r| r + pos0 + np <= src.len()),
        "panel rows"
    );
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bw") {
        // SAFETY: AVX-512 BW detected; the bounds were asserted just above.
        unsafe { pack_panels_avx512(src, rows, pos0, np, kp, out) };
        return;
    }
    for q in 0..kp {
        let (r0, r1) = (
            &src[rows[2 * q] + pos0..][..np],
            &src[rows[2 * q + 1] + pos0..][..np],
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
    rows: &[usize],
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
    // SAFETY: for the whole body, row reads are masked to the `np - j·COLS` positions left, inside
    // `src` (`rows[r] + pos0 + np <= src.len()`); each panel's stores cover words `(j·kp +
    // q)·COLS..+COLS` of `out`.
    unsafe {
        let (lo, hi) = (
            _mm512_loadu_si512(lo.as_ptr().cast()),
            _mm512_loadu_si512(hi.as_ptr().cast()),
        );
        for q in 0..kp {
            let (r0, r1) = (
                src.as_ptr().add(rows[2 * q] + pos0),
                src.as_ptr().add(rows[2 * q + 1] + pos0),
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

/// Rows `0..r` and columns `c0..c0 + cols` of the 32 x 32 `block`, plus `bias[row]`, `max(·,
/// 0)` with `relu`, written to `out` (row `i` at `out[i·p..]`) as `O`.
#[allow(clippy::too_many_arguments)]
pub(super) fn epilogue<O: Act>(
    block: &[f32; 1024],
    r: usize,
    c0: usize,
    cols: usize,
    bias: Option<&[f32]>,
    relu: bool,
    out: &mut [MaybeUninit<O>],
    p: usize,
) {
    assert!(r <= 32 && c0 + cols <= 32 && (r == 0 || out.len() >= (r - 1) * p + cols));
    #[cfg(target_arch = "x86_64")]
    if super::bf16::available() {
        // SAFETY: AVX512-BF16 (and F, BW) detected; row `i`'s `cols` values are inside `out`
        // (asserted), and `c0 + cols <= 32` inside the block's row.
        unsafe { epilogue_avx512(block, r, c0, cols, bias, relu, out.as_mut_ptr(), p) };
        return;
    }
    for i in 0..r {
        let b = bias.map_or(0.0, |b| b[i]);
        for c in 0..cols {
            let v = block[32 * i + c0 + c] + b;
            out[i * p + c] = MaybeUninit::new(O::from_f32(if relu { v.max(0.0) } else { v }));
        }
    }
}

/// [`epilogue`]'s rows as two 16-lane vectors, stored under a mask.
///
/// # Safety
/// The CPU has AVX-512 F, BW and BF16; `c0 + cols <= 32`; `out + i·p + (0..cols)` is writable
/// for `i < r`.
#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn epilogue_avx512<O: Act>(
    block: &[f32; 1024],
    r: usize,
    c0: usize,
    cols: usize,
    bias: Option<&[f32]>,
    relu: bool,
    out: *mut MaybeUninit<O>,
    p: usize,
) {
    use std::arch::x86_64::*;
    let to_bf16 = std::any::TypeId::of::<O>() == std::any::TypeId::of::<super::act::bf16>();
    let mask: u32 = if cols >= 32 { !0 } else { (1u32 << cols) - 1 };
    // SAFETY: for the whole body, the loads read the `cols` masked values from column `c0` of row `i
    // < r` of the block (`c0 + cols <= 32`); the stores write them at `out + i·p`, writable by
    // the contract.
    unsafe {
        for i in 0..r {
            let b = _mm512_set1_ps(bias.map_or(0.0, |b| b[i]));
            let row = block.as_ptr().add(32 * i + c0);
            let (m0, m1) = (mask as u16, (mask >> 16) as u16);
            let mut v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(m0, row), b);
            let mut v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(m1, row.add(16)), b);
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
pub(super) mod tests {
    use super::*;
    use crate::kernels::act::{bf16, to_bf16};
    use crate::kernels::conv::test_data as data;
    use crate::kernels::nhwc::tests::assert_close;

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
        for unit_kind in units_or_skip() {
            matches_im2col_and_rounds_once_on(unit_kind);
        }
    }

    /// The units this CPU runs: the tiles where enabled and `VDPBF16PS` where the CPU has
    /// AVX512-BF16 (both on a CPU with AMX); none, said so, elsewhere.
    pub(in crate::kernels) fn units_or_skip() -> Vec<Unit> {
        let units: Vec<Unit> = [Unit::Amx, Unit::Vdpbf16ps]
            .into_iter()
            .filter(|u| u.runs_here())
            .collect();
        if units.is_empty() {
            eprintln!("skipped: neither AMX nor AVX512-BF16 on this CPU");
        }
        units
    }

    fn matches_im2col_and_rounds_once_on(unit_kind: Unit) {
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
                let got: Vec<f32> = forward_on(unit_kind, &xb, &w, Some(&b), &g, relu);
                assert_close(&got, &want, &(g, relu, unit_kind));
                let from_f32: Vec<f32> = forward_on(unit_kind, &xr, &w, Some(&b), &g, relu);
                assert_eq!(from_f32, got, "f32 input {g:?}");
                let narrow: Vec<bf16> = forward_on(unit_kind, &xb, &w, Some(&b), &g, relu);
                let rounded = to_bf16(&got);
                assert_eq!(narrow, rounded, "bf16 output {g:?}");
            }
            let one = &xb[..g.in_len()];
            let g1 = ConvGeom { batch: 1, ..g };
            let run = |t| {
                crate::kernels::conv::on_threads(t, || {
                    forward_on::<bf16, f32>(unit_kind, one, &w, None, &g1, false)
                })
            };
            assert_eq!(run(1), run(3), "{g1:?} on {unit_kind:?}");
        }
    }

    /// The input gradient against im2col's on the same operands, at strides 1 and 2.
    #[test]
    fn input_grad_matches_im2col() {
        for unit_kind in units_or_skip() {
            input_grad_matches_im2col_on(unit_kind);
        }
    }

    fn input_grad_matches_im2col_on(unit_kind: Unit) {
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
            let got: Vec<f32> = input_grad_on(unit_kind, &w, &dy, &g);
            assert_close(&got, &want, &(g, unit_kind));
        }
    }

    /// The weight gradient against im2col's on the same bf16 operands: widening and narrowing
    /// layers (either operand read straight, the other transposed), `P` a multiple of 32 or
    /// not (the tail's copy), odd `P`, strided projections, 16-row and 16-column edge blocks,
    /// several chunks of images; the same bits from f32 and bf16 inputs and on 1 and 3 threads
    /// (the narrow-`dY` layers split `A`'s rows on 3).
    #[test]
    fn weight_grad_matches_im2col() {
        for unit_kind in units_or_skip() {
            weight_grad_matches_im2col_on(unit_kind);
        }
    }

    fn weight_grad_matches_im2col_on(unit_kind: Unit) {
        let weight_grad =
            |x: &[bf16], dy: &[bf16], g: &ConvGeom| weight_grad_on(unit_kind, x, dy, g);
        for g in [
            geom(3, 32, 8, 8, 96, 1),
            geom(2, 32, 5, 7, 48, 1),
            geom(3, 96, 6, 6, 32, 1),
            geom(3, 160, 7, 7, 16, 1),
            geom(2, 64, 7, 7, 48, 1),
            geom(5, 32, 9, 5, 64, 1),
            geom(2, 64, 9, 11, 96, 2),
            geom(3, 32, 8, 10, 64, 2),
            geom(2, 64, 7, 7, 16, 2),
        ] {
            assert!(fits(&g), "{g:?}");
            let x = to_bf16(&data(g.batch * g.in_len(), 6));
            let dy = to_bf16(&data(g.batch * g.out_len(), 7));
            let w = data(g.cout * g.cin, 8);
            let want = super::super::im2col::im2col_backward(&x, &w, &dy, &g, [false, true, false])
                .1
                .unwrap();
            let got = weight_grad(&x, &dy, &g);
            assert_close(&got, &want, &(g, unit_kind));
            let widen = |v: &[bf16]| v.iter().map(|h| h.to_f32()).collect::<Vec<f32>>();
            assert_eq!(
                weight_grad_on(unit_kind, &widen(&x), &widen(&dy), &g),
                got,
                "f32 input {g:?} on {unit_kind:?}"
            );
            let run = |t| crate::kernels::conv::on_threads(t, || weight_grad(&x, &dy, &g));
            assert_eq!(run(1), run(3), "{g:?}");
        }
    }
}
