//! The GEMMs every convolution algorithm here ends in (the `gemm` crate in f32, convlab's
//! bf16 kernels in bf16), and how work is split over images and threads so the same thread
//! count always sums in the same order.

use super::act::Act;

/// `dst[m, n] (+)= Σ_k lhs[m, k] · rhs[k, n]` in `precision`, every operand given by (row,
/// column) strides.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm<L: Act, E: Act>(
    precision: super::Precision,
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[L],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[E],
    rhs_rs: usize,
    rhs_cs: usize,
    threads: usize,
) {
    match precision {
        super::Precision::Fp32 => gemm_f32(
            m,
            n,
            k,
            dst,
            dst_rs,
            accumulate,
            &L::widened(lhs),
            lhs_rs,
            lhs_cs,
            &E::widened(rhs),
            rhs_rs,
            rhs_cs,
            threads,
        ),
        super::Precision::Bf16 => super::bf16::gemm(
            m, n, k, dst, dst_rs, accumulate, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, threads,
        ),
    }
}

/// A left operand used for every image of a batch (the weights, or their transpose), prepared
/// once: in bf16 it is rounded and packed once instead of once per image.
pub(super) enum Lhs<'a> {
    F32 {
        m: usize,
        k: usize,
        data: &'a [f32],
        rs: usize,
        cs: usize,
    },
    Bf16(super::bf16::PackedLhs),
}

impl<'a> Lhs<'a> {
    pub(super) fn new(
        precision: super::Precision,
        m: usize,
        k: usize,
        data: &'a [f32],
        rs: usize,
        cs: usize,
    ) -> Self {
        match precision {
            super::Precision::Fp32 => Lhs::F32 { m, k, data, rs, cs },
            super::Precision::Bf16 => Lhs::Bf16(super::bf16::PackedLhs::new(m, k, data, rs, cs)),
        }
    }

    /// `dst[m, n] (+)= self · rhs[k, n]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mul<E: Act>(
        &self,
        n: usize,
        dst: &mut [f32],
        dst_rs: usize,
        accumulate: bool,
        rhs: &[E],
        rhs_rs: usize,
        rhs_cs: usize,
        threads: usize,
    ) {
        match *self {
            // f32 products of bf16 activations (no model runs them: bf16 activations come
            // with bf16 products) widen the operand.
            Lhs::F32 { m, k, data, rs, cs } => gemm_f32(
                m,
                n,
                k,
                dst,
                dst_rs,
                accumulate,
                data,
                rs,
                cs,
                &E::widened(rhs),
                rhs_rs,
                rhs_cs,
                threads,
            ),
            Lhs::Bf16(ref a) => super::bf16::gemm_packed(
                a, n, dst, dst_rs, accumulate, rhs, rhs_rs, rhs_cs, threads,
            ),
        }
    }

    /// `self · rhs[k, n]` as a new row-major `[m, n]` matrix; in f32 without a zero fill
    /// first ([`gemm_f32_new`]).
    pub(super) fn mul_new<E: Act>(
        &self,
        n: usize,
        rhs: &[E],
        rhs_rs: usize,
        rhs_cs: usize,
        threads: usize,
    ) -> Vec<f32> {
        match *self {
            Lhs::F32 { m, k, data, rs, cs } => gemm_f32_new(
                m,
                n,
                k,
                data,
                rs,
                cs,
                &E::widened(rhs),
                rhs_rs,
                rhs_cs,
                threads,
            ),
            Lhs::Bf16(ref a) => {
                let mut out = vec![0.0; a.rows() * n];
                self.mul(n, &mut out, n, false, rhs, rhs_rs, rhs_cs, threads);
                out
            }
        }
    }
}

/// The f32 GEMM: the `gemm` crate.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Bounds the raw-pointer call below: the last element `dst`'s strides reach.
    assert!(dst.len() > (m - 1) * dst_rs + (n - 1));
    // SAFETY: `dst` holds every element its strides reach (asserted above) and is borrowed
    // mutably, so it aliases neither input.
    unsafe {
        gemm_f32_into(
            [m, n, k],
            dst.as_mut_ptr(),
            dst_rs,
            accumulate,
            (lhs, lhs_rs, lhs_cs),
            (rhs, rhs_rs, rhs_cs),
            threads,
        )
    }
}

/// `lhs · rhs` as a new row-major `[m, n]` matrix, written by the GEMM without a zero fill
/// first: a weight gradient of VGG's classifier is 392 MiB, and the fill cost a pass over it
/// for values the product then overwrites.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_f32_new(
    m: usize,
    n: usize,
    k: usize,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
    threads: usize,
) -> Vec<f32> {
    let mut out: Vec<f32> = Vec::with_capacity(m * n);
    if m > 0 && n > 0 {
        // SAFETY: `out` has room for the `m · n` values of a row-major `[m, n]` matrix and is
        // owned here; with `accumulate` false the `gemm` crate writes every element of `dst`
        // before it reads any (gemm-common 0.19.0: the first depth block, or the `k == 0`
        // case, stores `beta · product` with alpha zeroed, without reading `dst`).
        unsafe {
            gemm_f32_into(
                [m, n, k],
                out.as_mut_ptr(),
                n,
                false,
                (lhs, lhs_rs, lhs_cs),
                (rhs, rhs_rs, rhs_cs),
                threads,
            )
        };
    }
    // SAFETY: the product wrote all `m · n` values (above; none when `m · n` is 0).
    unsafe { out.set_len(m * n) };
    out
}

/// The `gemm` crate's call, `dst[m, n] (+)= lhs[m, k] · rhs[k, n]` with `dst`'s rows `dst_rs`
/// apart and each operand given as (values, row stride, column stride).
///
/// # Safety
/// `m, n > 0`; `dst` is valid for writes (and, when `accumulate`, reads) of every element
/// `i · dst_rs + j` for `i < m`, `j < n`, and aliases neither operand.
unsafe fn gemm_f32_into(
    [m, n, k]: [usize; 3],
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (lhs, lhs_rs, lhs_cs): (&[f32], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[f32], usize, usize),
    threads: usize,
) {
    // Bounds the raw-pointer call below: the last element each operand's strides reach.
    if k > 0 {
        assert!(lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
        assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    }
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every operand access inside its slice; `dst` is the
    // caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// Contiguous blocks of images, one per thread; fixed for a given batch and thread count.
pub(super) fn image_blocks(batch: usize) -> Vec<std::ops::Range<usize>> {
    let parts = rayon::current_num_threads().clamp(1, batch.max(1));
    (0..parts)
        .map(|t| t * batch / parts..(t + 1) * batch / parts)
        .collect()
}

/// The elementwise sum of per-block partial gradients, added in block order (so a thread count
/// gives the same bits every run).
///
/// Split over the rayon pool by element ranges (each element still adds its parts in block
/// order, so the bits do not depend on the split): summing two 9.4 MB partial weight gradients
/// on the calling thread left the other worker idle for 4% of a resnet18 bf16 step on AMX.
pub(super) fn sum_in_order<'a>(parts: impl Iterator<Item = &'a Vec<f32>>) -> Vec<f32> {
    use rayon::prelude::*;
    let parts: Vec<&Vec<f32>> = parts.collect();
    let Some((first, rest)) = parts.split_first() else {
        return Vec::new();
    };
    const CHUNK: usize = 1 << 14;
    let n = first.len();
    super::buf::par_zeroed(
        n,
        CHUNK,
        (0..n.div_ceil(CHUNK)).into_par_iter(),
        |out, c| {
            out.copy_from_slice(&first[c * CHUNK..][..out.len()]);
            for part in rest {
                out.iter_mut()
                    .zip(&part[c * CHUNK..])
                    .for_each(|(a, b)| *a += b);
            }
        },
    )
}

/// [`sum_in_order`] of parts stored `[rows, cols]`, returned transposed, `[cols, rows]`: the
/// weight gradient that im2col accumulates as `[K, C_out]`, back in `[C_out, K]`.
///
/// One pass, 16 output rows per task. The sum and then a column-by-column gather (a read
/// `cols` floats apart per element: 2.4 M scalar loads 2 KB apart for resnet18's 512 -> 512
/// layers) were 5.9% of the samples of a resnet18 bf16 training step at 128 px, batch 32, 2
/// threads, on the AMX Xeon; this pass is 3.8% (`perf record --call-graph dwarf` of `convlab
/// bench train`, 2026-12-03). Each element still adds its parts in block order, so the bits
/// are those of the sum and then the transpose.
///
/// With `slot_of`, row `r` (column `r` of the result) is read from row `slot_of[r]` of the
/// parts: a kernel that fills its rows in another order hands them over without a copy.
pub(super) fn sum_transposed_in_order(
    parts: &[&[f32]],
    rows: usize,
    cols: usize,
    slot_of: Option<&[usize]>,
) -> Vec<f32> {
    use rayon::prelude::*;
    const TILE_C: usize = 16;
    let Some((first, rest)) = parts.split_first() else {
        return Vec::new();
    };
    assert!(parts.iter().all(|p| p.len() == rows * cols));
    assert!(slot_of.is_none_or(|s| s.len() == rows && s.iter().all(|&r| r < rows)));
    #[cfg(target_arch = "x86_64")]
    let wide = std::arch::is_x86_feature_detected!("avx512f");
    super::buf::par_zeroed(
        rows * cols,
        TILE_C * rows,
        (0..cols.div_ceil(TILE_C)).into_par_iter(),
        |out: &mut [f32], t| {
            let c0 = t * TILE_C;
            let width = out.len() / rows.max(1);
            // 16 x 16 blocks: 16 rows of the parts (one cache line of 16 columns each, read
            // once), written as 16 runs of 16 output values (whole cache lines). Writing one
            // output value per row read, `rows` floats apart, stalled on every store: about a
            // fifth of the weight gradient of resnet18's 512 -> 512 layers at 4 px in bf16,
            // 2% after (Zen 4, BENCHMARKS.md "Zen 4 at photo sizes").
            let mut block = [[0.0f32; TILE_C]; TILE_C];
            for r0 in (0..rows).step_by(TILE_C) {
                let r1 = (r0 + TILE_C).min(rows);
                for (r, b) in (r0..r1).zip(block.iter_mut()) {
                    let at = slot_of.map_or(r, |s| s[r]) * cols + c0;
                    if width == TILE_C {
                        // A constant length: copied inline, where a variable-length copy is a
                        // memmove call per row (memmove 7.7% -> 4.5% of the samples of the
                        // 512 -> 512 4 px bf16 weight gradient, `CONV_LAYERS_REPEAT=dw`).
                        *b = first[at..at + TILE_C].try_into().unwrap();
                    } else {
                        b[..width].copy_from_slice(&first[at..at + width]);
                    }
                    for part in rest {
                        b.iter_mut()
                            .zip(&part[at..at + width])
                            .for_each(|(v, p)| *v += p);
                    }
                }
                #[cfg(target_arch = "x86_64")]
                if wide && width == TILE_C && r1 - r0 == TILE_C {
                    // SAFETY: AVX-512 F was detected; the block is 16 x 16 values, and the
                    // task's `out` holds 16 columns of `rows` values, so the values
                    // `(c, r0..r0 + 16)` for `c < 16` lie inside it.
                    unsafe {
                        super::simd::transpose16(
                            block.as_ptr().cast(),
                            TILE_C,
                            out.as_mut_ptr().add(r0).cast(),
                            rows,
                        );
                    }
                    continue;
                }
                for c in 0..width {
                    let dst = &mut out[c * rows + r0..c * rows + r1];
                    dst.iter_mut().zip(&block).for_each(|(d, b)| *d = b[c]);
                }
            }
        },
    )
}

/// Threads each GEMM may use: all of them when there are fewer images than threads.
pub(super) fn gemm_threads(batch: usize) -> usize {
    if batch < rayon::current_num_threads() {
        rayon::current_num_threads()
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product into a fresh buffer is the product into a zeroed one, bit for bit, with
    /// transposed operands, a depth beyond one block of the `gemm` crate, an empty depth
    /// (all zeros) and empty shapes; on 1 and 2 threads.
    #[test]
    fn a_fresh_product_is_the_product_into_zeros() {
        for &(m, n, k) in &[(3, 5, 7), (17, 33, 600), (4, 6, 0), (0, 5, 3), (5, 0, 3)] {
            let lhs: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let rhs: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 * 0.25).collect();
            for threads in [1, 2] {
                // lhs read transposed: element (r, c) at c·m + r.
                let got = gemm_f32_new(m, n, k, &lhs, 1, m, &rhs, n, 1, threads);
                let mut want = vec![0.0; m * n];
                gemm_f32(
                    m, n, k, &mut want, n, false, &lhs, 1, m, &rhs, n, 1, threads,
                );
                assert_eq!(got.len(), m * n);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{m}x{n}x{k}, {threads} threads");
            }
        }
    }

    #[test]
    fn the_transposed_sum_is_the_sum_then_the_transpose() {
        // Shapes around the 16-column task width, and three parts whose order matters in f32.
        for &(rows, cols) in &[(1, 1), (3, 17), (33, 16), (20, 50), (64, 48)] {
            let parts: Vec<Vec<f32>> = (0..3)
                .map(|p| {
                    (0..rows * cols)
                        .map(|i| ((i * 7 + p * 13) % 11) as f32 * 0.1 + [1e8, -1e8, 0.3][p])
                        .collect()
                })
                .collect();
            let sum = sum_in_order(parts.iter());
            let refs: Vec<&[f32]> = parts.iter().map(|p| p.as_slice()).collect();
            let got = sum_transposed_in_order(&refs, rows, cols, None);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(got[c * rows + r].to_bits(), sum[r * cols + c].to_bits());
                }
            }
            // Rows handed over in another order: row `r` of the result from slot `(5r+2) % rows`.
            let slot_of: Vec<usize> = (0..rows).map(|r| (5 * r + 2) % rows).collect();
            if rows % 5 != 0 {
                let got = sum_transposed_in_order(&refs, rows, cols, Some(&slot_of));
                for r in 0..rows {
                    for c in 0..cols {
                        let want = sum[slot_of[r] * cols + c];
                        assert_eq!(got[c * rows + r].to_bits(), want.to_bits());
                    }
                }
            }
        }
        assert!(sum_transposed_in_order(&[], 2, 2, None).is_empty());
    }
}
