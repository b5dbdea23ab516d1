//! A fully connected layer at a small batch (VGG's and AlexNet's classifiers at photo sizes):
//! the three products stream the weight matrix once each, straight from its row-major
//! storage, in AVX-512 or AVX2 + FMA (one body for both, [`Vector`]).
//!
//! With `n` rows (the batch) of at most [`MAX_ROWS`], each weight is used `n` times per
//! product, so all three are bound by the pass over the `[I, O]` weights (vgg16's first
//! layer: 25088 x 4096, 392 MiB in f32). The `gemm` crate packs a block of the weights
//! before multiplying it (a second pass over them) and writes the weight gradient with
//! ordinary stores (each line read before it is written); here the forward pass and the
//! input gradient read each weight once, in rows, and the weight gradient is written with
//! streaming stores on AVX-512: vgg16's first layer at batch 8, forward and backward, 163 ->
//! 84 ms on two cores of the AMX Xeon (batches up to 16), 176 -> 118-139 ms on Zen 3's AVX2
//! (batches up to 8) (`cargo run --release --example linear_layers`; BENCHMARKS.md "The ReLU
//! in the convolution, the classifier's weights streamed once" and "The classifier on AVX2").
//!
//! Every sum runs in a fixed order that the thread count does not change (the threads split
//! output columns or weight rows, never a sum), so the bits are the same on 1 or 2 threads.
//!
//! # Shapes
//! `x: [n, I]`, `w: [I, O]` (Burn's `Linear` stores `[in, out]`), `b: [O]`, `y, dy: [n, O]`,
//! all row-major.

use super::vector::{Unit, Vector, on_units};
use std::mem::MaybeUninit;

/// The most rows (batch) these kernels take on any unit ([`Unit::max_rows`]); larger batches
/// use the `gemm` crate, which reuses each weight enough to be compute-bound.
pub const MAX_ROWS: usize = 16;

/// Weight rows per weight-gradient step (their sums kept in registers).
const DW_ROWS: usize = 4;

impl Unit {
    /// The most rows (batch) these kernels take on this unit: on AVX2 a block of 16 rows'
    /// sums does not fit the 16 registers, and fc6 (25088 -> 4096) at batch 16 took 278 ms
    /// forward and backward against the `gemm` crate's 190 (Zen 3; at batch 8 118-139
    /// against 176).
    pub fn max_rows(self) -> usize {
        match self {
            Unit::Avx512 => MAX_ROWS,
            Unit::Avx2 => 8,
        }
    }
}

/// Weight rows a product keeps in registers: half the unit's (16 of AVX-512's 32, 8 of
/// AVX2's 16), the rest for the sums and the operand being multiplied.
const fn rows<V: Vector>() -> usize {
    V::REGISTERS / 2
}

/// Whether these kernels compute an `n`-row product on this CPU: AVX-512 and `1..=16` rows,
/// or AVX2 + FMA and `1..=8`.
pub fn applies(n: usize) -> bool {
    Unit::detect().is_some_and(|u| (1..=u.max_rows()).contains(&n))
}

/// Consecutive ranges of `len` items, one per worker thread, each starting on a multiple of
/// `align`.
fn split(len: usize, align: usize) -> Vec<std::ops::Range<usize>> {
    let units = len.div_ceil(align);
    let parts = rayon::current_num_threads().clamp(1, units.max(1));
    (0..parts)
        .map(|t| (t * units / parts * align).min(len)..((t + 1) * units / parts * align).min(len))
        .collect()
}

/// `y = x w + b`.
///
/// # Panics
/// Unless [`applies`]`(n)` and the slices have the shapes above.
pub fn forward(x: &[f32], w: &[f32], b: &[f32], n: usize, i: usize, o: usize) -> Vec<f32> {
    assert!(applies(n), "fc::forward: {n} rows on this CPU");
    forward_on(Unit::detect().expect("applies"), x, w, b, n, i, o)
}

/// [`forward`] on `unit`, one this CPU has.
fn forward_on(
    unit: Unit,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    n: usize,
    i: usize,
    o: usize,
) -> Vec<f32> {
    assert!(
        (1..=unit.max_rows()).contains(&n) && unit.runs_here(),
        "fc::forward: {n} rows on {unit:?}"
    );
    assert!(
        x.len() == n * i && w.len() == i * o && b.len() == o,
        "fc::forward: shapes"
    );
    use rayon::prelude::*;
    // Each worker its own output columns, as `[n, cols]`; then put together.
    let parts: Vec<(std::ops::Range<usize>, Vec<f32>)> = split(o, 16)
        .into_par_iter()
        .map(|cols| {
            let width = cols.len();
            let mut y: Vec<f32> = (0..n)
                .flat_map(|_| b[cols.clone()].iter().copied())
                .collect();
            // SAFETY: `unit` is present (asserted above); the slices' shapes are asserted
            // above and `y` is `[n, width]`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                forward_cols(unit, x, w, &mut y, n, i, o, cols.start, width)
            };
            (cols, y)
        })
        .collect();
    let mut y = vec![0f32; n * o];
    for (cols, part) in parts {
        for (r, row) in part.chunks_exact(cols.len().max(1)).enumerate() {
            y[r * o + cols.start..r * o + cols.end].copy_from_slice(row);
        }
    }
    y
}

on_units! {
    /// `y[r, ..] += Σ_k x[r, k] · w[k, c0 + ..]` for `width` columns from `c0`, `y` being
    /// `[n, width]`: `rows::<V>()` weight rows in registers at a time, each output row's tile
    /// loaded, added to in order of `k` and stored back.
    ///
    /// # Safety
    /// `unit` is present; `x` is `[n, i]`, `w` `[i, o]`, `c0 + width <= o`, `y` `[n, width]`.
    unsafe fn forward_cols / forward_cols_v<V: Vector>(
        x: &[f32],
        w: &[f32],
        y: &mut [f32],
        n: usize,
        i: usize,
        o: usize,
        c0: usize,
        width: usize,
    ) {
        for k0 in (0..i).step_by(rows::<V>()) {
            let kb = rows::<V>().min(i - k0);
            for c in (0..width).step_by(V::LANES) {
                let m = V::mask(width - c);
                // SAFETY: the unit runs here (the caller's contract).
                let mut wv = [unsafe { V::zero() }; 16];
                for (j, v) in wv.iter_mut().enumerate().take(kb) {
                    // SAFETY: row `k0 + j < i`, columns `c0 + c + lane < c0 + width <= o`
                    // under the mask.
                    *v = unsafe { V::load(m, w.as_ptr().add((k0 + j) * o + c0 + c)) };
                }
                for r in 0..n {
                    let xr = &x[r * i + k0..r * i + k0 + kb];
                    // SAFETY: `y` is `[n, width]`; lanes past `width` are masked.
                    let yp = unsafe { y.as_mut_ptr().add(r * width + c) };
                    // SAFETY: as the pointer above.
                    let mut acc = unsafe { V::load(m, yp) };
                    for (v, &xv) in wv.iter().zip(xr) {
                        // SAFETY: the unit runs here (the caller's contract).
                        acc = unsafe { V::fma(V::splat(xv), *v, acc) };
                    }
                    // SAFETY: as the load.
                    unsafe { V::store(m, yp, acc) };
                }
            }
        }
    }
}

/// `dx = dy wᵀ`: `dx[r, k] = Σ_c dy[r, c] · w[k, c]`, each weight row read once against all
/// `n` rows of `dy`.
///
/// # Panics
/// Unless [`applies`]`(n)` and the slices have the shapes above.
pub fn input_grad(dy: &[f32], w: &[f32], n: usize, i: usize, o: usize) -> Vec<f32> {
    assert!(applies(n), "fc::input_grad: {n} rows on this CPU");
    input_grad_on(Unit::detect().expect("applies"), dy, w, n, i, o)
}

/// [`input_grad`] on `unit`, one this CPU has.
fn input_grad_on(unit: Unit, dy: &[f32], w: &[f32], n: usize, i: usize, o: usize) -> Vec<f32> {
    assert!(
        (1..=unit.max_rows()).contains(&n) && unit.runs_here(),
        "fc::input_grad: {n} rows on {unit:?}"
    );
    assert!(
        dy.len() == n * o && w.len() == i * o,
        "fc::input_grad: shapes"
    );
    use rayon::prelude::*;
    // `dy` padded with zero rows to a register block of 8 or 16 rows (its sums stay in
    // registers); the padding's sums are dropped.
    let rows = if n <= 8 { 8 } else { 16 };
    let mut padded = dy.to_vec();
    padded.resize(rows * o, 0.0);
    // Each worker its own weight rows, as `dxᵀ` `[k, rows]`; then transposed into place.
    let parts: Vec<(std::ops::Range<usize>, Vec<f32>)> = split(i, 1)
        .into_par_iter()
        .map(|ks| {
            let mut t = vec![0f32; ks.len() * rows];
            // SAFETY: `unit` is present (asserted above); `padded` is `[rows, o]`, `w`
            // `[i, o]`, `t` `[ks.len(), rows]`.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                if rows == 8 {
                    input_grad_rows::<8>(unit, &padded, w, &mut t, o, ks.clone())
                } else {
                    input_grad_rows::<16>(unit, &padded, w, &mut t, o, ks.clone())
                }
            };
            (ks, t)
        })
        .collect();
    let mut dx = vec![0f32; n * i];
    for (ks, t) in parts {
        for (kk, sums) in t.chunks_exact(rows).enumerate() {
            for (r, &s) in sums.iter().take(n).enumerate() {
                dx[r * i + ks.start + kk] = s;
            }
        }
    }
    dx
}

on_units! {
    /// `t[k - ks.start, r] = Σ_c dy[r, c] · w[k, c]` for `k` in `ks`, `R` rows of `dy`: one
    /// weight row at a time, `R` sums in registers over its tiles of `V::LANES` columns, each
    /// sum's lanes added in order at the end.
    ///
    /// # Safety
    /// `unit` is present; `dy` is `[R, o]`, `w` holds rows `ks` of `o` values, `t` is
    /// `[ks.len(), R]`.
    unsafe fn input_grad_rows / input_grad_rows_v<V: Vector, const R: usize>(
        dy: &[f32],
        w: &[f32],
        t: &mut [f32],
        o: usize,
        ks: std::ops::Range<usize>,
    ) {
        assert!(dy.len() >= R * o && w.len() >= ks.end * o && t.len() >= ks.len() * R);
        for (kk, k) in ks.enumerate() {
            // SAFETY: the unit runs here (the caller's contract).
            let mut acc = [unsafe { V::zero() }; R];
            for c in (0..o).step_by(V::LANES) {
                let m = V::mask(o - c);
                // SAFETY: row `k` of `w` and rows `r < R` of `dy` hold `o` values; lanes past
                // `o` are masked (asserted lengths above).
                let wv = unsafe { V::load(m, w.as_ptr().add(k * o + c)) };
                for (r, a) in acc.iter_mut().enumerate() {
                    // SAFETY: row `r < R` of `dy` holds `o` values; lanes past `o` are masked.
                    let d = unsafe { V::load(m, dy.as_ptr().add(r * o + c)) };
                    // SAFETY: the unit runs here (the caller's contract).
                    *a = unsafe { V::fma(d, wv, *a) };
                }
            }
            for (r, a) in acc.iter().enumerate() {
                // SAFETY: the unit runs here (the caller's contract).
                t[kk * R + r] = unsafe { a.sum() };
            }
        }
    }
}

/// `dw = xᵀ dy`: `dw[k, c] = Σ_r x[r, k] · dy[r, c]` (the rows added in order), written
/// with streaming stores: a weight-sized block that nothing reads until the optimiser.
///
/// # Panics
/// Unless [`applies`]`(n)` and the slices have the shapes above.
pub fn weight_grad(x: &[f32], dy: &[f32], n: usize, i: usize, o: usize) -> Vec<f32> {
    assert!(applies(n), "fc::weight_grad: {n} rows on this CPU");
    weight_grad_on(Unit::detect().expect("applies"), x, dy, n, i, o)
}

/// [`weight_grad`] on `unit`, one this CPU has.
fn weight_grad_on(unit: Unit, x: &[f32], dy: &[f32], n: usize, i: usize, o: usize) -> Vec<f32> {
    assert!(
        (1..=unit.max_rows()).contains(&n) && unit.runs_here(),
        "fc::weight_grad: {n} rows on {unit:?}"
    );
    assert!(
        x.len() == n * i && dy.len() == n * o,
        "fc::weight_grad: shapes"
    );
    // Blocks of DW_ROWS weight rows, one run per worker.
    let blocks = split(i, DW_ROWS);
    let lens: Vec<usize> = blocks.iter().map(|r| r.len() * o).collect();
    let fill = |p: usize, part: &mut [MaybeUninit<f32>], _: &mut ()| {
        // SAFETY: `unit` is present (asserted above); `part` is rows `blocks[p]` of `[i, o]`.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            weight_grad_rows(unit, x, dy, part, n, i, o, blocks[p].clone())
        };
    };
    // SAFETY: `weight_grad_rows` writes every value of its rows.
    unsafe { super::buf::par_parts_uninit(&lens, || (), fill) }
}

on_units! {
    /// Rows `ks` of `dw = xᵀ dy` into `part` (`[ks.len(), o]`, every value written):
    /// [`DW_ROWS`] weight rows at a time, each tile of `V::LANES` columns summed over the `n`
    /// rows of `dy` in registers and stored (streaming where the tile is a whole aligned
    /// vector).
    ///
    /// # Safety
    /// `unit` is present; `x` is `[n, i]`, `dy` `[n, o]`, `part` `[ks.len(), o]`.
    unsafe fn weight_grad_rows / weight_grad_rows_v<V: Vector>(
        x: &[f32],
        dy: &[f32],
        part: &mut [MaybeUninit<f32>],
        n: usize,
        i: usize,
        o: usize,
        ks: std::ops::Range<usize>,
    ) {
        assert!(x.len() >= n * i && dy.len() >= n * o && part.len() >= ks.len() * o);
        let out = part.as_mut_ptr().cast::<f32>();
        let bytes = V::LANES * 4;
        for k0 in ks.clone().step_by(DW_ROWS) {
            let kb = DW_ROWS.min(ks.end - k0);
            // Tiles start where the first row's vectors align (the allocation starts 16
            // bytes into a line), so that whole tiles can be streamed: a head tile of `h`
            // columns, then `V::LANES` at a time. With `o` a multiple of the lanes every row
            // of the block lines up alike.
            let first = out.wrapping_add((k0 - ks.start) * o) as usize;
            let h = if o.is_multiple_of(V::LANES) {
                (bytes - first % bytes) % bytes / 4
            } else {
                0
            };
            let mut c = 0;
            while c < o {
                let width = if c < h { h } else { V::LANES.min(o - c) };
                let m = V::mask(width);
                // SAFETY: the unit runs here (the caller's contract).
                let mut acc = [unsafe { V::zero() }; DW_ROWS];
                for r in 0..n {
                    // SAFETY: row `r < n` of `dy` holds `o` values; lanes past `o` are masked.
                    let d = unsafe { V::load(m, dy.as_ptr().add(r * o + c)) };
                    for (j, a) in acc.iter_mut().enumerate().take(kb) {
                        // SAFETY: the unit runs here (the caller's contract).
                        *a = unsafe { V::fma(V::splat(x[r * i + k0 + j]), d, *a) };
                    }
                }
                for (j, a) in acc.iter().enumerate().take(kb) {
                    // SAFETY: row `k0 + j - ks.start < ks.len()` of `part`, columns under the
                    // mask.
                    let p = unsafe { out.add((k0 + j - ks.start) * o + c) };
                    if V::WHOLE_LINE_STREAMS && V::full(m) && (p as usize).is_multiple_of(bytes) {
                        // SAFETY: a whole vector of `part`, aligned as streaming stores need.
                        unsafe { V::stream(p, *a) };
                    } else {
                        // SAFETY: as above, lanes under the mask.
                        unsafe { V::store(m, p, *a) };
                    }
                }
                c += width;
            }
        }
        // Streaming stores are weakly ordered: fenced on the thread that made them, before
        // the join that hands the gradient to another thread.
        // SAFETY: SSE, which every x86-64 CPU has.
        unsafe { std::arch::x86_64::_mm_sfence() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|j| (((j + seed) * 7919) % 1009) as f32 / 1009.0 - 0.5)
            .collect()
    }

    /// All three products against the plain triple loops (f64 sums), on every unit the CPU
    /// has, for batches of 1 to the unit's most rows, weight blocks whole and cut short, and
    /// widths with and without a vector's tail, on 1 and 3 threads (the same bits on both).
    #[test]
    fn products_are_the_definitions() {
        let units = Unit::present();
        if units.is_empty() {
            eprintln!("skipped: neither AVX-512 nor AVX2 + FMA on this CPU");
            return;
        }
        for unit in units {
            products_on(unit);
        }
    }

    fn products_on(unit: Unit) {
        for (n, i, o) in [
            (1, 19, 33),
            (5, 40, 16),
            (8, 37, 70),
            (13, 64, 100),
            (16, 21, 48),
            (7, 24, 24),
        ]
        .into_iter()
        .filter(|&(n, ..)| n <= unit.max_rows())
        {
            let (x, w, b, dy) = (data(n * i, 1), data(i * o, 2), data(o, 3), data(n * o, 4));
            let close = |a: &[f32], e: &[f64], what: &str| {
                assert_eq!(a.len(), e.len(), "{what}");
                for (j, (&a, &e)) in a.iter().zip(e).enumerate() {
                    assert!(
                        (a as f64 - e).abs() < 1e-4,
                        "{unit:?} {what} [{j}]: {a} vs {e} ({n}, {i}, {o})"
                    );
                }
            };
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    (
                        forward_on(unit, &x, &w, &b, n, i, o),
                        input_grad_on(unit, &dy, &w, n, i, o),
                        weight_grad_on(unit, &x, &dy, n, i, o),
                    )
                })
            };
            let (y, dx, dw) = run(1);
            let y0: Vec<f64> = (0..n * o)
                .map(|e| {
                    let (r, c) = (e / o, e % o);
                    b[c] as f64
                        + (0..i)
                            .map(|k| x[r * i + k] as f64 * w[k * o + c] as f64)
                            .sum::<f64>()
                })
                .collect();
            let dx0: Vec<f64> = (0..n * i)
                .map(|e| {
                    let (r, k) = (e / i, e % i);
                    (0..o)
                        .map(|c| dy[r * o + c] as f64 * w[k * o + c] as f64)
                        .sum()
                })
                .collect();
            let dw0: Vec<f64> = (0..i * o)
                .map(|e| {
                    let (k, c) = (e / o, e % o);
                    (0..n)
                        .map(|r| x[r * i + k] as f64 * dy[r * o + c] as f64)
                        .sum()
                })
                .collect();
            close(&y, &y0, "y");
            close(&dx, &dx0, "dx");
            close(&dw, &dw0, "dw");
            assert_eq!(
                run(3),
                (y, dx, dw),
                "{unit:?} 3 threads: the same bits ({n}, {i}, {o})"
            );
        }
    }
}
