//! The elementwise inner loops of the kernels, compiled three times (AVX-512, AVX2 + FMA, and
//! the baseline) and picked at run time, so they vectorise on the machine they run on without
//! building convlab for one CPU.
//!
//! Sums use [`LANES`] independent partial sums in a fixed order: the compiler may vectorise them
//! (a single running sum is one dependent add per element) but never reorder them, so every
//! instruction set gives the same bits.
// The fused residual and ReLU-gradient rows serve burn-flex's ops only (`flex.rs`).
#![cfg_attr(not(feature = "flex"), allow(dead_code))]

use super::act::Act;
use super::vector::{Unit, Vector, on_units};

/// Partial sums per reduction.
const LANES: usize = 16;

/// Defines `pub fn $name` that runs its body compiled for the best instruction set present.
macro_rules! dispatched {
    ($(#[doc = $doc:literal])* $vis:vis fn $name:ident $(<$($g:ident: $bound:path),+>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[doc = $doc])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn imp $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v4 $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    imp $(::<$($g),+>)? ($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                fn v3 $(<$($g: $bound),+>)? ($($arg: $ty),*) $(-> $ret)? {
                    imp $(::<$($g),+>)? ($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                {
                    // SAFETY: the features v4 is compiled for were detected just above.
                    return unsafe { v4 $(::<$($g),+>)? ($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for v3's features.
                    return unsafe { v3 $(::<$($g),+>)? ($($arg),*) };
                }
            }
            imp $(::<$($g),+>)? ($($arg),*)
        }
    };
}

pub(crate) use dispatched;

/// `Σ f(a_i, b_i)` in [`LANES`] partial sums ([`lane_sum2`] with its second sum unused, which
/// the compiler drops).
#[inline(always)]
fn lane_sum<E: Act>(a: &[E], b: &[E], f: impl Fn(f32, f32) -> f32) -> f32 {
    lane_sum2(a, b, f, |_, _| 0.0).0
}

/// `(Σ f(a_i, b_i), Σ g(a_i, b_i))` in one pass over `a` and `b`, each in [`LANES`] partial
/// sums (lane `l` adds elements `l, l + LANES, ..`, then the lanes and the tail are added):
/// the same bits as two passes.
#[inline(always)]
fn lane_sum2<E: Act>(
    a: &[E],
    b: &[E],
    f: impl Fn(f32, f32) -> f32,
    g: impl Fn(f32, f32) -> f32,
) -> (f32, f32) {
    let (mut af, mut ag) = ([0.0f32; LANES], [0.0f32; LANES]);
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for l in 0..LANES {
            let (x, y) = (xa[l].to_f32(), xb[l].to_f32());
            af[l] += f(x, y);
            ag[l] += g(x, y);
        }
    }
    let tf: f32 = ra
        .iter()
        .zip(rb)
        .map(|(&x, &y)| f(x.to_f32(), y.to_f32()))
        .sum();
    let tg: f32 = ra
        .iter()
        .zip(rb)
        .map(|(&x, &y)| g(x.to_f32(), y.to_f32()))
        .sum();
    (af.iter().sum::<f32>() + tf, ag.iter().sum::<f32>() + tg)
}

/// `Σ r_i`, in [`LANES`] partial sums added as [`lane_sum`] adds them (the same bits).
///
/// On AVX-512 the partial sums are one vector ([`row_sum_avx512`]): compiled from the
/// generic loop, a bf16 row was summed one value at a time, and the bias gradient of a layer
/// without batch norm (a sum of `dy` per channel) was 5.8% of vgg16's bf16 training step at
/// 224 px on the AMX Xeon (BENCHMARKS.md, "The ReLU in the convolution").
pub fn row_sum<E: Act>(r: &[E]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
    {
        let whole = r.len() / LANES * LANES;
        // SAFETY: the features were detected just above; `whole` is a multiple of LANES.
        let lanes = unsafe { row_sum_avx512(&r[..whole]) };
        let tail: f32 = r[whole..].iter().map(|v| v.to_f32()).sum();
        return lanes + tail;
    }
    row_sum_loop(r)
}

dispatched! {
    /// [`row_sum`] by the generic loop.
    fn row_sum_loop<E: Act>(r: &[E]) -> f32 {
        lane_sum(r, r, |v, _| v)
    }
}

/// [`row_sum`]'s body: whole vectors of [`LANES`] values, each lane's sum in order, then the
/// lanes added in order (as [`lane_sum`], whose tail the caller adds).
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL; `r`'s length is a multiple of [`LANES`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn row_sum_avx512<E: Act>(r: &[E]) -> f32 {
    use std::arch::x86_64::*;
    const _: () = assert!(LANES == 16);
    let mut sum = _mm512_setzero_ps();
    match (E::as_bf16_bits(r), E::as_f32s(r)) {
        (Some(h), _) => {
            for v in h.chunks_exact(LANES) {
                // SAFETY: `v` holds 16 values.
                let v = unsafe { _mm256_loadu_si256(v.as_ptr().cast()) };
                let v = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)));
                sum = _mm512_add_ps(sum, v);
            }
        }
        (None, Some(f)) => {
            for v in f.chunks_exact(LANES) {
                // SAFETY: as above.
                sum = _mm512_add_ps(sum, unsafe { _mm512_loadu_ps(v.as_ptr()) });
            }
        }
        (None, None) => unreachable!("an activation is f32 or bf16"),
    }
    let mut lanes = [0.0f32; LANES];
    // SAFETY: the array holds 16 floats.
    unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), sum) };
    lanes.iter().sum()
}

dispatched! {
    /// `Σ (r_i - m)²`.
    pub fn row_sq_dev<E: Act>(r: &[E], m: f32) -> f32 {
        lane_sum(r, r, |v, _| (v - m) * (v - m))
    }
}

dispatched! {
    /// `y = x · a + b`, then `max(·, 0)` when `relu`.
    pub fn affine_row<E: Act>(y: &mut [E], x: &[E], a: f32, b: f32, relu: bool) {
        let it = y.iter_mut().zip(x);
        if relu {
            it.for_each(|(y, &x)| *y = E::from_f32((x.to_f32() * a + b).max(0.0)));
        } else {
            it.for_each(|(y, &x)| *y = E::from_f32(x.to_f32() * a + b));
        }
    }
}

/// `(Σ g_i, Σ g_i · (x_i - m) · s)` with `g = dy`, gated by `x · a + b > 0` when `relu`: batch
/// norm's backward sums.
///
/// On AVX-512 and AVX2 the [`LANES`] partial sums are written out as vectors
/// ([`gated_sums_on`]). Same order of additions, so the same bits as the loop.
pub fn gated_sums<E: Act>(
    x: &[E],
    dy: &[E],
    a: f32,
    b: f32,
    m: f32,
    s: f32,
    relu: bool,
) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if let Some(unit) = Unit::detect() {
        let abms = [a, b, m, s];
        // SAFETY: `unit` was detected on this CPU.
        let body = |x: &[E], dy: &[E]| unsafe { gated_sums_on(unit, x, dy, abms, relu) };
        return gated_sums_by(body, x, dy, abms, relu);
    }
    gated_sums_loop(x, dy, a, b, m, s, relu)
}

/// [`gated_sums`] with `body` over the whole vectors (`x`, `dy` equally long, a multiple of
/// [`LANES`]) and the tail added as [`lane_sum2`] adds it.
fn gated_sums_by<E: Act>(
    body: impl FnOnce(&[E], &[E]) -> (f32, f32),
    x: &[E],
    dy: &[E],
    [a, b, m, s]: [f32; 4],
    relu: bool,
) -> (f32, f32) {
    let n = x.len().min(dy.len());
    let whole = n / LANES * LANES;
    let (u, v) = body(&x[..whole], &dy[..whole]);
    let gate = |x: f32, d: f32| if !relu || x * a + b > 0.0 { d } else { 0.0 };
    let tail = |f: &dyn Fn(f32, f32) -> f32| -> f32 {
        x[whole..n]
            .iter()
            .zip(&dy[whole..n])
            .map(|(&x, &d)| f(x.to_f32(), d.to_f32()))
            .sum()
    };
    let tu = tail(&|x, d| gate(x, d));
    let tv = tail(&|x, d| gate(x, d) * (x - m) * s);
    (u + tu, v + tv)
}

/// `v[i..i + LANES]` of an activation row as f32 lanes (bf16 widened exactly).
///
/// # Safety
/// The CPU has `V`'s instruction set.
#[inline(always)]
unsafe fn load_act<V: Vector, E: Act>(v: &[E], i: usize) -> V {
    let all = V::mask(V::LANES);
    match (E::as_bf16_bits(v), E::as_f32s(v)) {
        // SAFETY: the slice index checks `i + LANES <= len`; the contract.
        (Some(h), _) => unsafe { V::load_bf16(all, h[i..i + V::LANES].as_ptr()) },
        // SAFETY: as above.
        (None, Some(f)) => unsafe { V::load(all, f[i..i + V::LANES].as_ptr()) },
        (None, None) => unreachable!("an activation is f32 or bf16"),
    }
}

on_units! {
    /// [`gated_sums`]' body over whole vectors of [`LANES`] values (`x`, `dy` equally long, a
    /// multiple of it): each of the [`LANES`] partial sums is a lane (of one AVX-512 vector,
    /// of two AVX2 ones), summed in order, then the lanes added in order: the same additions
    /// in the same order as [`lane_sum2`], so the same bits. Compiled from the generic loop,
    /// the sums stayed on the stack and bf16 rows ran as scalar code: 7.5% of a resnet50
    /// fp32 training step at 224 px on Zen 3, written out 1225 / 1279 -> 299 / 379 samples of
    /// 16930 / 17484 -> 16070 / 17027 (`perf record -F 499 convlab bench train --model
    /// resnet50 --input 3x224x224 --batch 16 --steps 3 --threads 2 --precision fp32`, two
    /// alternated runs each, AMD EPYC Zen 3, family 25 model 1, 2026-12-06); on Zen 4 the
    /// bf16 rows' 4.8% of a resnet50 bf16 step.
    ///
    /// # Safety
    /// The unit is present.
    unsafe fn gated_sums_on / gated_sums_v<V: Vector; E: Act>(
        x: &[E],
        dy: &[E],
        abms: [f32; 4],
        relu: bool,
    ) -> (f32, f32) {
        const _: () = assert!(LANES == 16);
        let (lanes, all) = (V::LANES, V::mask(V::LANES));
        let per = LANES / lanes;
        // SAFETY: the CPU has `V`'s instruction set (the contract); every access goes through
        // a slice or a 16-float array.
        unsafe {
            let [a, b, m, s] = [
                V::splat(abms[0]),
                V::splat(abms[1]),
                V::splat(abms[2]),
                V::splat(abms[3]),
            ];
            let (mut su, mut sv) = ([V::zero(); 2], [V::zero(); 2]);
            for i in (0..x.len()).step_by(LANES) {
                for h in 0..per {
                    let (xv, dv) = (load_act::<V, E>(x, i + lanes * h), load_act::<V, E>(dy, i + lanes * h));
                    let g = if relu {
                        // `x · a + b > 0` without a fused multiply-add, as the scalar
                        // expression; `dy` kept or +0.0, as the scalar `if`.
                        V::keep_where_positive(V::add(V::mul(xv, a), b), dv)
                    } else {
                        dv
                    };
                    su[h] = V::add(su[h], g);
                    sv[h] = V::add(sv[h], V::mul(V::mul(g, V::sub(xv, m)), s));
                }
            }
            let (mut lu, mut lv) = ([0.0f32; LANES], [0.0f32; LANES]);
            for h in 0..per {
                V::store(all, lu[lanes * h..][..lanes].as_mut_ptr(), su[h]);
                V::store(all, lv[lanes * h..][..lanes].as_mut_ptr(), sv[h]);
            }
            (lu.iter().sum(), lv.iter().sum())
        }
    }
}

dispatched! {
    /// [`gated_sums`] by the generic loop ([`lane_sum2`]).
    fn gated_sums_loop<E: Act>(x: &[E], dy: &[E], a: f32, b: f32, m: f32, s: f32, relu: bool) -> (f32, f32) {
        // One pass for both sums: two passes read `x` and `dy` twice, and batch norm's
        // backward is memory-bound at photo sizes.
        if relu {
            let gate = |x: f32, d: f32| if x * a + b > 0.0 { d } else { 0.0 };
            lane_sum2(x, dy, gate, |x, d| gate(x, d) * (x - m) * s)
        } else {
            lane_sum2(x, dy, |_, d| d, |x, d| d * (x - m) * s)
        }
    }
}

dispatched! {
    /// `dx = k · (g - mb - (x - m) · s · mg)`, `g` as in [`gated_sums`].
    pub fn bn_dx_row<E: Act>(
        dx: &mut [E],
        x: &[E],
        dy: &[E],
        abms: [f32; 4],
        mbgk: [f32; 3],
        relu: bool,
    ) {
        let ([a, b, m, s], [mb, mg, k]) = (abms, mbgk);
        let it = dx.iter_mut().zip(x).zip(dy);
        if relu {
            it.for_each(|((d, &x), &g)| {
                let (x, g) = (x.to_f32(), g.to_f32());
                let g = if x * a + b > 0.0 { g } else { 0.0 };
                *d = E::from_f32(k * (g - mb - (x - m) * s * mg));
            });
        } else {
            it.for_each(|((d, &x), &g)| {
                let (x, g) = (x.to_f32(), g.to_f32());
                *d = E::from_f32(k * (g - mb - (x - m) * s * mg));
            });
        }
    }
}

/// `relu(a + b)`, NaN kept (as Burn's `relu`: only `<= 0` becomes 0), rounded once.
#[inline(always)]
fn add_relu_value<E: Act>(a: E, b: E) -> E {
    let s = a.to_f32() + b.to_f32();
    E::from_f32(if s <= 0.0 { 0.0 } else { s })
}

/// `dy` where the ReLU's output `y > 0`, else 0: a selection, exact in either type.
#[inline(always)]
fn relu_grad_value<E: Act>(dy: E, y: E) -> E {
    if y.to_f32() > 0.0 { dy } else { E::ZERO }
}

dispatched! {
    /// `y = relu(a + b)` ([`add_relu_value`]).
    pub fn add_relu_row<E: Act>(y: &mut [E], a: &[E], b: &[E]) {
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = add_relu_value(a, b);
        }
    }
}

dispatched! {
    /// `y = a + b`.
    pub fn add_row<E: Act>(y: &mut [E], a: &[E], b: &[E]) {
        for ((y, &a), &b) in y.iter_mut().zip(a).zip(b) {
            *y = E::from_f32(a.to_f32() + b.to_f32());
        }
    }
}

dispatched! {
    /// [`add_row`] over its first summand: `a = a + b`.
    pub fn add_row_in_place<E: Act>(a: &mut [E], b: &[E]) {
        for (a, &b) in a.iter_mut().zip(b) {
            *a = E::from_f32(a.to_f32() + b.to_f32());
        }
    }
}

dispatched! {
    /// [`add_relu_row`] over its first summand: `a = relu(a + b)`.
    pub fn add_relu_row_in_place<E: Act>(a: &mut [E], b: &[E]) {
        for (a, &b) in a.iter_mut().zip(b) {
            *a = add_relu_value(*a, b);
        }
    }
}

dispatched! {
    /// `dx = dy` where `y > 0`, else 0: the gradient through a ReLU from its output.
    pub fn relu_grad_row<E: Act>(dx: &mut [E], dy: &[E], y: &[E]) {
        for ((d, &g), &y) in dx.iter_mut().zip(dy).zip(y) {
            *d = relu_grad_value(g, y);
        }
    }
}

dispatched! {
    /// [`relu_grad_row`] over the incoming gradient: `dy = 0` where `y <= 0`.
    pub fn relu_grad_row_in_place<E: Act>(dy: &mut [E], y: &[E]) {
        for (d, &y) in dy.iter_mut().zip(y) {
            *d = relu_grad_value(*d, y);
        }
    }
}

dispatched! {
    /// `y = max(y, 0)` in place (NaN becomes 0, as [`affine_row`]'s ReLU): the epilogue of an
    /// inference convolution with its batch norm folded in.
    pub fn relu_row(y: &mut [f32]) {
        y.iter_mut().for_each(|v| *v = v.max(0.0));
    }
}

/// Takes `v` over `best` (and its offset `vi` over `at`) when `best` is not NaN and `v` is
/// larger or NaN: the first maximum wins and the first NaN propagates, as PyTorch's max pool.
/// Branch-free, so a row of windows vectorises.
#[inline(always)]
fn pool_take(best: &mut f32, at: &mut u32, v: f32, vi: u32) {
    // `&` and `|`, not `&&` and `||`: no short circuit, so no branch.
    let take = !best.is_nan() & ((v > *best) | v.is_nan());
    *best = if take { v } else { *best };
    *at = if take { vi } else { *at };
}

dispatched! {
    /// One output row of 2x2 stride-2 max pooling: `y[o]` is the first maximum of
    /// `r0[2o], r0[2o+1], r1[2o], r1[2o+1]` in that order, `at[o]` (when `at` is not empty) its
    /// offset in the plane, `r0` and `r1` starting at plane offsets `o0` and `o1`.
    pub fn max_pool2_row(y: &mut [f32], at: &mut [u32], r0: &[f32], r1: &[f32], o0: u32, o1: u32) {
        let n = y.len();
        let (r0, r1) = (&r0[..2 * n], &r1[..2 * n]);
        if at.is_empty() {
            for (o, y) in y.iter_mut().enumerate() {
                let (mut best, mut i) = (r0[2 * o], 0);
                pool_take(&mut best, &mut i, r0[2 * o + 1], 0);
                pool_take(&mut best, &mut i, r1[2 * o], 0);
                pool_take(&mut best, &mut i, r1[2 * o + 1], 0);
                *y = best;
            }
            return;
        }
        let at = &mut at[..n];
        for (o, (y, at)) in y.iter_mut().zip(at).enumerate() {
            let (c0, c1) = (o0 + 2 * o as u32, o1 + 2 * o as u32);
            let (mut best, mut i) = (r0[2 * o], c0);
            pool_take(&mut best, &mut i, r0[2 * o + 1], c0 + 1);
            pool_take(&mut best, &mut i, r1[2 * o], c1);
            pool_take(&mut best, &mut i, r1[2 * o + 1], c1 + 1);
            (*y, *at) = (best, i);
        }
    }
}

/// One output row of a 3-wide, stride-2 max pooling window over `R` input rows: window `o`
/// is `rows[r][2o..2o + 3]` for each row in order, `offs[r]` the plane offset of `rows[r][0]`.
#[inline(always)]
fn max_pool3s2<const R: usize>(y: &mut [f32], at: &mut [u32], rows: [&[f32]; R], offs: [u32; R]) {
    let n = y.len();
    let rows = rows.map(|r| &r[..2 * n + 1]);
    if at.is_empty() {
        for (o, y) in y.iter_mut().enumerate() {
            let (mut best, mut i) = (rows[0][2 * o], 0);
            for (r, row) in rows.iter().enumerate() {
                for d in usize::from(r == 0)..3 {
                    pool_take(&mut best, &mut i, row[2 * o + d], 0);
                }
            }
            *y = best;
        }
        return;
    }
    let at = &mut at[..n];
    for (o, (y, at)) in y.iter_mut().zip(at).enumerate() {
        let (mut best, mut i) = (rows[0][2 * o], offs[0] + 2 * o as u32);
        for (r, row) in rows.iter().enumerate() {
            for d in usize::from(r == 0)..3 {
                pool_take(
                    &mut best,
                    &mut i,
                    row[2 * o + d],
                    offs[r] + (2 * o + d) as u32,
                );
            }
        }
        (*y, *at) = (best, i);
    }
}

/// One output row of 3x3 stride-2 max pooling (ResNet's stem pool) over the first `n` of
/// `r0, r1, r2` (the window's rows inside the image, 1 to 3): `y[o]` is the first maximum of
/// `r0[2o..2o+3]`, then `r1`'s, then `r2`'s, the first NaN propagating, `at[o]` (when `at` is
/// not empty) its plane offset, row `k` starting at plane offset `offs[k]`.
///
/// With AVX-512, 16 windows at a time ([`max_pool3s2_avx512`]); the compiler's vectorisation
/// of the window loop (stride-2 reads and offsets beside the values) was 2.5% of a bf16
/// resnet18 training step at 128 px. resnet18's stem pool at 128 px, batch 32 (64 planes of
/// 64 x 64 per image), with offsets, 2 threads, Zen 4: 15.0 -> 8.5 ms in a first harness
/// without the binary's allocator settings (fresh output pages every run), 2.5 ms now with
/// them (`cargo run --release --example norm_pool`).
pub fn max_pool3s2_row(
    y: &mut [f32],
    at: &mut [u32],
    r0: &[f32],
    r1: &[f32],
    r2: &[f32],
    n: usize,
    offs: [u32; 3],
) {
    let len = y.len();
    let rows = [r0, r1, r2].map(|r| &r[..2 * len + 1]);
    assert!(at.is_empty() || at.len() >= len, "max pool offsets length");
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512 F was detected; every row holds `2·len + 1` values (sliced above)
        // and `at`, when not empty, `len` offsets.
        unsafe {
            match n {
                1 => max_pool3s2_avx512::<1>(y, at, [rows[0]], [offs[0]]),
                2 => max_pool3s2_avx512::<2>(y, at, [rows[0], rows[1]], [offs[0], offs[1]]),
                _ => max_pool3s2_avx512::<3>(y, at, rows, offs),
            }
        }
        return;
    }
    max_pool3s2_rest(y, at, rows[0], rows[1], rows[2], n, offs);
}

dispatched! {
    /// [`max_pool3s2_row`] window by window (without AVX-512).
    fn max_pool3s2_rest(
        y: &mut [f32],
        at: &mut [u32],
        r0: &[f32],
        r1: &[f32],
        r2: &[f32],
        n: usize,
        offs: [u32; 3],
    ) {
        match n {
            1 => max_pool3s2(y, at, [r0], [offs[0]]),
            2 => max_pool3s2(y, at, [r0, r1], [offs[0], offs[1]]),
            _ => max_pool3s2(y, at, [r0, r1, r2], offs),
        }
    }
}

/// [`max_pool3s2`] 16 windows at a time: each row's values `2o, 2o + 1, 2o + 2` of 16
/// windows split from two vectors (and the value after them), and [`pool_take`]'s rule as
/// masks: take `v` where `best` is not NaN and `v > best` or `v` is NaN. The last windows
/// (fewer than 16) through masked loads and stores.
///
/// # Safety
/// The CPU has AVX-512 F; each row holds at least `2·y.len() + 1` values, and `at` is empty
/// or holds at least `y.len()` offsets.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_pool3s2_avx512<const R: usize>(
    y: &mut [f32],
    at: &mut [u32],
    rows: [&[f32]; R],
    offs: [u32; R],
) {
    use std::arch::x86_64::*;
    let evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
    // Lanes 1..16 of the evens, then lane 0 of the second operand: the values `2o + 2`.
    let next = _mm512_setr_epi32(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16);
    let with_at = !at.is_empty();
    for o0 in (0..y.len()).step_by(16) {
        let (d, m) = (2 * o0, (y.len() - o0).min(16));
        // Windows `o0..o0 + m` read the row's `2m + 1` values from `d`.
        let values = 2 * m + 1;
        let lanes = |k: usize| (((1u64 << k.min(16)) - 1) as u16) as __mmask16;
        let (mask_a, mask_b) = (lanes(values), lanes(values.saturating_sub(16)));
        let (mut best, mut idx) = (_mm512_setzero_ps(), _mm512_setzero_si512());
        for (r, row) in rows.iter().enumerate() {
            // SAFETY: the masks keep the loads to the `2m + 1` values from `d`, inside the
            // row (the contract: `2·y.len() + 1` values); the value after the 32 loaded ones
            // is read only for whole vectors (`d + 32 <= 2·y.len()`).
            let (a, b, after) = unsafe {
                let p = row.as_ptr().add(d);
                (
                    _mm512_maskz_loadu_ps(mask_a, p),
                    _mm512_maskz_loadu_ps(mask_b, p.add(16)),
                    if m == 16 { *p.add(32) } else { 0.0 },
                )
            };
            let x0 = _mm512_permutex2var_ps(a, evens, b);
            let x1 = _mm512_permutex2var_ps(a, odds, b);
            let x2 = _mm512_permutex2var_ps(x0, next, _mm512_set1_ps(after));
            let first = _mm512_add_epi32(_mm512_set1_epi32((offs[r] as usize + d) as i32), evens);
            for (k, v) in [x0, x1, x2].into_iter().enumerate() {
                let vi = _mm512_add_epi32(first, _mm512_set1_epi32(k as i32));
                if r == 0 && k == 0 {
                    (best, idx) = (v, vi);
                    continue;
                }
                let best_ok = _mm512_cmp_ps_mask::<_CMP_ORD_Q>(best, best);
                let larger = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, best);
                let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
                let take = best_ok & (larger | nan);
                best = _mm512_mask_mov_ps(best, take, v);
                idx = _mm512_mask_mov_epi32(idx, take, vi);
            }
        }
        let out = lanes(m);
        // SAFETY: the mask keeps the stores to windows `o0..o0 + m`, inside `y` and (when not
        // empty) `at`, which holds `y.len()` offsets.
        unsafe {
            _mm512_mask_storeu_ps(y.as_mut_ptr().add(o0), out, best);
            if with_at {
                _mm512_mask_storeu_epi32(at.as_mut_ptr().add(o0).cast(), out, idx);
            }
        }
    }
}

/// `dst[c·rows + r] = src[r·cols + c]`: the `[rows, cols]` matrix of 32-bit words transposed,
/// 16 x 16 blocks in registers where the CPU has AVX-512.
///
/// # Panics
/// If a slice is not `rows · cols` long.
pub(super) fn transpose_words(src: &[u32], rows: usize, cols: usize, dst: &mut [u32]) {
    assert_eq!(dst.len(), rows * cols, "transpose destination length");
    transpose_words_into(src, rows, cols, dst, rows);
}

/// [`transpose_words`] into a wider matrix: `dst[c·ld + r] = src[r·cols + c]`, the words of
/// `dst` past column `rows` of each row left as they are.
///
/// # Panics
/// If `src` is not `rows · cols` long, `ld < rows`, or `dst` is shorter than `cols` rows of
/// `ld` (the last one `rows` words).
pub(super) fn transpose_words_into(
    src: &[u32],
    rows: usize,
    cols: usize,
    dst: &mut [u32],
    ld: usize,
) {
    assert_eq!(src.len(), rows * cols, "transpose source length");
    assert!(
        ld >= rows,
        "transpose destination stride {ld} < {rows} rows"
    );
    assert!(
        cols == 0 || dst.len() >= (cols - 1) * ld + rows,
        "transpose destination length"
    );
    #[cfg(target_arch = "x86_64")]
    let wide = std::arch::is_x86_feature_detected!("avx512f");
    #[cfg(not(target_arch = "x86_64"))]
    let wide = false;
    let (r16, c16) = if wide {
        (rows / 16 * 16, cols / 16 * 16)
    } else {
        (0, 0)
    };
    for r0 in (0..r16).step_by(16) {
        for c0 in (0..c16).step_by(16) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX-512 F was detected above; rows `r0..r0 + 16` and columns
            // `c0..c0 + 16` lie inside the `[rows, cols]` source and, `ld` apart, inside the
            // destination, whose lengths were asserted.
            unsafe {
                transpose16(
                    src.as_ptr().add(r0 * cols + c0),
                    cols,
                    dst.as_mut_ptr().add(c0 * ld + r0),
                    ld,
                );
            }
        }
    }
    // What the blocks left: the last `cols % 16` columns of their rows, and the last
    // `rows % 16` rows (everything without AVX-512).
    for r in 0..rows {
        let from = if r < r16 { c16 } else { 0 };
        for c in from..cols {
            dst[c * ld + r] = src[r * cols + c];
        }
    }
}

/// One 16 x 16 block of 32-bit words transposed: row `i` of `src` (`ls` words apart) becomes
/// column `i` of `dst` (rows `ld` words apart).
///
/// # Safety
/// The CPU has AVX-512 F; `src + i·ls + j` is readable and `dst + i·ld + j` writable for
/// `i, j < 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose16(src: *const u32, ls: usize, dst: *mut u32, ld: usize) {
    use std::arch::x86_64::*;
    let mut r = [_mm512_setzero_si512(); 16];
    for (i, v) in r.iter_mut().enumerate() {
        // SAFETY: row `i < 16` of the block, readable by the contract.
        *v = unsafe { _mm512_loadu_si512(src.add(i * ls).cast()) };
    }
    transpose16_regs(&mut r);
    for (i, v) in r.into_iter().enumerate() {
        // SAFETY: row `i < 16` of the transposed block, writable by the contract.
        unsafe { _mm512_storeu_si512(dst.add(i * ld).cast(), v) };
    }
}

/// 16 vectors of 16 words as a 16 x 16 matrix, transposed in registers: word `j` of `r[i]`
/// moves to word `i` of `r[j]`. Interleaves 32- and 64-bit words within each 128-bit lane
/// (4 x 4 transposes of each lane), then moves the lanes.
/// Lane `l` holds `l · stride`: the offsets of a gather that reads every `stride`-th value
/// (the kernel packers' taps, `stride` = taps per channel).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) fn lanes_times(stride: i32) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32(stride),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) fn transpose16_regs(r: &mut [std::arch::x86_64::__m512i; 16]) {
    use std::arch::x86_64::*;
    // Lane `L` of `t[2k]` / `t[2k + 1]`: words `4L, 4L + 1` / `4L + 2, 4L + 3` of rows
    // `2k, 2k + 1`, interleaved.
    let mut t = [_mm512_setzero_si512(); 16];
    for k in 0..8 {
        t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
    }
    // `u[4G + k]`, lane `L`: column `4L + k` of rows `4G..4G + 4`.
    let mut u = [_mm512_setzero_si512(); 16];
    for grp in 0..4 {
        let b = 4 * grp;
        u[b] = _mm512_unpacklo_epi64(t[b], t[b + 2]);
        u[b + 1] = _mm512_unpackhi_epi64(t[b], t[b + 2]);
        u[b + 2] = _mm512_unpacklo_epi64(t[b + 1], t[b + 3]);
        u[b + 3] = _mm512_unpackhi_epi64(t[b + 1], t[b + 3]);
    }
    // Column `4L + k` is lane `L` of `u[k], u[4 + k], u[8 + k], u[12 + k]`.
    for k in 0..4 {
        let v0 = _mm512_shuffle_i32x4::<0x44>(u[k], u[4 + k]);
        let v1 = _mm512_shuffle_i32x4::<0xee>(u[k], u[4 + k]);
        let v2 = _mm512_shuffle_i32x4::<0x44>(u[8 + k], u[12 + k]);
        let v3 = _mm512_shuffle_i32x4::<0xee>(u[8 + k], u[12 + k]);
        r[k] = _mm512_shuffle_i32x4::<0x88>(v0, v2);
        r[4 + k] = _mm512_shuffle_i32x4::<0xdd>(v0, v2);
        r[8 + k] = _mm512_shuffle_i32x4::<0x88>(v1, v3);
        r[12 + k] = _mm512_shuffle_i32x4::<0xdd>(v1, v3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 16 x 16 register blocks and the edges they leave against the definition.
    #[test]
    fn transpose_words_is_the_transpose() {
        for (rows, cols) in [(16, 16), (32, 37), (48, 5), (19, 33), (1, 1), (0, 4)] {
            let src: Vec<u32> = (0..rows * cols).map(|v| v as u32 * 7 + 3).collect();
            let mut dst = vec![0u32; rows * cols];
            transpose_words(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}x{cols} at {r},{c}"
                    );
                }
            }
        }
    }

    /// Into a wider destination: the transpose lands in the first `rows` words of each row and
    /// the words past them keep their values.
    #[test]
    fn transpose_words_into_keeps_the_rest_of_each_row() {
        for (rows, cols, ld) in [(16, 32, 64), (32, 37, 48), (17, 5, 20), (0, 3, 2)] {
            let src: Vec<u32> = (0..rows * cols).map(|v| v as u32 * 5 + 1).collect();
            let mut dst = vec![u32::MAX; cols * ld];
            transpose_words_into(&src, rows, cols, &mut dst, ld);
            for c in 0..cols {
                for r in 0..ld {
                    let want = if r < rows {
                        src[r * cols + c]
                    } else {
                        u32::MAX
                    };
                    assert_eq!(dst[c * ld + r], want, "{rows}x{cols} ld {ld} at {c},{r}");
                }
            }
        }
    }

    /// The written-out vector sums are the generic loop's, bit for bit: f32 and bf16 rows,
    /// gated and not, with and without a tail.
    #[test]
    fn vector_gated_sums_are_the_loops() {
        use crate::kernels::act::{bf16, to_bf16};
        use crate::kernels::vector::Emu;
        type Body<E> = Box<dyn Fn(&[E], &[E]) -> (f32, f32)>;
        for n in [0, 5, 16, 37, 64, 1000] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 113) as f32 / 37.0 - 1.4)
                .collect();
            let dy: Vec<f32> = (0..n)
                .map(|i| ((i * 104729) % 97) as f32 / 29.0 - 1.6)
                .collect();
            let (xb, dyb): (Vec<bf16>, Vec<bf16>) = (to_bf16(&x), to_bf16(&dy));
            for relu in [false, true] {
                let args = (1.3, -0.2, 0.1, 0.7, relu);
                let bits = |(u, v): (f32, f32)| (u.to_bits(), v.to_bits());
                let (a, b, m, s, r) = args;
                assert_eq!(
                    bits(gated_sums(&x, &dy, a, b, m, s, r)),
                    bits(gated_sums_loop(&x, &dy, a, b, m, s, r)),
                    "f32, {n} values, relu {relu}"
                );
                assert_eq!(
                    bits(gated_sums(&xb, &dyb, a, b, m, s, r)),
                    bits(gated_sums_loop(&xb, &dyb, a, b, m, s, r)),
                    "bf16, {n} values, relu {relu}"
                );
                // Each unit this CPU has, not only the one `gated_sums` picks, and the body
                // on emulated 16 and 8 lanes (AVX-512's and AVX2's logic on any CPU).
                let abms = [a, b, m, s];
                let mut bodies: Vec<(String, Body<f32>, Body<bf16>)> = vec![
                    (
                        "16 emulated lanes".into(),
                        // SAFETY: an emulation runs on any CPU.
                        Box::new(move |x, dy| unsafe {
                            gated_sums_v::<Emu<16>, f32>(x, dy, abms, r)
                        }),
                        // SAFETY: as above.
                        Box::new(move |x, dy| unsafe {
                            gated_sums_v::<Emu<16>, bf16>(x, dy, abms, r)
                        }),
                    ),
                    (
                        "8 emulated lanes".into(),
                        // SAFETY: as above.
                        Box::new(move |x, dy| unsafe {
                            gated_sums_v::<Emu<8>, f32>(x, dy, abms, r)
                        }),
                        // SAFETY: as above.
                        Box::new(move |x, dy| unsafe {
                            gated_sums_v::<Emu<8>, bf16>(x, dy, abms, r)
                        }),
                    ),
                ];
                #[cfg(target_arch = "x86_64")]
                for unit in Unit::present() {
                    bodies.push((
                        format!("{unit:?}"),
                        // SAFETY: the unit is present.
                        Box::new(move |x, dy| unsafe { gated_sums_on(unit, x, dy, abms, r) }),
                        // SAFETY: as above.
                        Box::new(move |x, dy| unsafe { gated_sums_on(unit, x, dy, abms, r) }),
                    ));
                }
                for (name, body32, body16) in bodies {
                    assert_eq!(
                        bits(gated_sums_by(body32, &x, &dy, abms, r)),
                        bits(gated_sums_loop(&x, &dy, a, b, m, s, r)),
                        "{name} f32, {n} values, relu {relu}"
                    );
                    assert_eq!(
                        bits(gated_sums_by(body16, &xb, &dyb, abms, r)),
                        bits(gated_sums_loop(&xb, &dyb, a, b, m, s, r)),
                        "{name} bf16, {n} values, relu {relu}"
                    );
                }
            }
        }
    }

    #[test]
    fn sums_match_the_obvious_loop() {
        let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let dy: Vec<f32> = (0..37).map(|i| (i % 5) as f32 - 2.0).collect();
        assert_eq!(row_sum(&x), x.iter().sum::<f32>());
        // The vector body and the generic loop: the same bits, f32 and bf16, with tails.
        for n in [0, 5, 16, 37, 300] {
            let v: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 101) as f32 * 0.37 - 17.0)
                .collect();
            let h = crate::kernels::act::to_bf16(&v);
            assert_eq!(
                row_sum(&v).to_bits(),
                row_sum_loop(&v).to_bits(),
                "f32, {n}"
            );
            assert_eq!(
                row_sum(&h).to_bits(),
                row_sum_loop(&h).to_bits(),
                "bf16, {n}"
            );
        }
        let sq: f32 = x.iter().map(|v| (v - 1.0) * (v - 1.0)).sum();
        assert!((row_sq_dev(&x, 1.0) - sq).abs() < 1e-3);
        let (g, gx) = gated_sums(&x, &dy, 2.0, -1.0, 0.5, 0.25, true);
        let (mut g0, mut gx0) = (0.0, 0.0);
        for (&xv, &d) in x.iter().zip(&dy) {
            if xv * 2.0 - 1.0 > 0.0 {
                g0 += d;
                gx0 += d * (xv - 0.5) * 0.25;
            }
        }
        assert!((g - g0).abs() < 1e-4 && (gx - gx0).abs() < 1e-4);
    }

    #[test]
    fn add_relu_and_its_gradient_match_the_obvious_loop() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 9.0).collect();
        let mut b: Vec<f32> = (0..37).map(|i| (i % 5) as f32 - 2.0).collect();
        b[3] = f32::NAN;
        let mut y = vec![0.0; 37];
        add_relu_row(&mut y, &a, &b);
        let mut dx = vec![7.0; 37];
        relu_grad_row(&mut dx, &b, &y);
        for i in 0..37 {
            let s = a[i] + b[i];
            if i == 3 {
                assert!(y[i].is_nan() && dx[i] == 0.0);
                continue;
            }
            assert_eq!(y[i], s.max(0.0));
            assert_eq!(dx[i], if s > 0.0 { b[i] } else { 0.0 });
        }
    }
}
