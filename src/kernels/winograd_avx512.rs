//! The tile transforms of Winograd's F(4x4, 3x3) and F(2x2, 3x3) ([`super::winograd`]) sixteen
//! tiles at a time with AVX-512: the input's `Bᵀ d B`, the output's `Aᵀ m A` and the output
//! gradient's `A dY Aᵀ`, each the same operations in the same order as the portable loops
//! beside them, so the same bits (`winograd::tests::avx512_transforms_are_the_portable_bits`).
//! The portable loops still run on f32 planes without AVX-512 and on bf16 planes.
//!
//! Tile `tx` of a row reads columns `4tx .. 4tx + 5`: the portable loops split each row into
//! its four column phases one value at a time and then ran the transform over the `tw` tiles
//! of that one row, 8 tiles at 32 px and 4 at 16 px, so most of each vector and most of the
//! time went to loop overhead: F(4x4, 3x3)'s three transforms were 17% of an fp32 resnet18
//! training step at 128 px and took more time than the 64 -> 64 layer's GEMMs. Here a plane
//! is first copied into rows exactly `4·tw` wide, so that value `k` of tile `f` in row-major
//! tile order is element `4f + k` of one flat array whatever the row, and the phases of
//! sixteen tiles are two levels of two-source permutes of four vectors. The copy puts the
//! rows in the order the vertical transform reads them (row `r` at `(r mod 4)·(th + 1) + r /
//! 4`), so that pass, too, runs flat over all tiles.
//!
//! Measured by `perf record -F 499 convlab bench train --model resnet18 --input 3x128x128
//! --batch 32 --steps 6 --threads 2 --precision fp32` (Xeon with AMX, family 6 model 207,
//! 2026-12-06, two alternated runs each, a loaded host): samples in `winograd` functions 1333
//! / 1224 of 6147 / 5978 before, 885 / 837 of 5664 / 5556 after (7% of the step); one thread
//! on 64 planes in L2 (a throwaway harness, not committed), µs per F(4x4) input transform of
//! a plane: 32 px 2.8-3.2 -> 1.6-1.7, 16 px 1.3 -> 0.5-0.6, 56 px 6.4-8.7 -> 4.1-5.4.

use std::arch::x86_64::*;

/// Whether the CPU runs these transforms (AVX-512 F, and BW and VL for bf16 planes' loads).
pub(super) fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// An element of a plane the input transforms read: f32, or bf16 bits (`u16`) widened
/// exactly, as the portable loops' `Act::to_f32` does.
pub(super) trait Lane: Copy {
    /// Lane `l` = the value at `at + l` for the lanes in `mask`, zero for the others.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL; `at + l` is readable for every `l` in `mask`.
    unsafe fn load16(mask: u16, at: *const Self) -> __m512;
}

impl Lane for f32 {
    #[inline(always)]
    unsafe fn load16(mask: u16, at: *const f32) -> __m512 {
        // SAFETY: the contract.
        unsafe { _mm512_maskz_loadu_ps(mask, at) }
    }
}

impl Lane for u16 {
    #[inline(always)]
    unsafe fn load16(mask: u16, at: *const u16) -> __m512 {
        // SAFETY: the contract (BW and VL for the masked 16-bit load).
        unsafe {
            let h = _mm256_maskz_loadu_epi16(mask, at.cast());
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }
}

/// Scratch floats any of the three transforms needs for `th x tw` tiles.
pub(super) fn scratch_len(th: usize, tw: usize) -> usize {
    let rows = 4 * (th + 1);
    let input = 2 * (rows * 4 * tw + 64) + 6 * (rows * tw + 16);
    let n = th * tw;
    let output = 24 * (n + 16) + 4 * n + 64;
    let dy = 16 * n + 64 + 6 * (4 * n + 16);
    input.max(output).max(dy)
}

const EVEN: [i32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
const ODD: [i32; 16] = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];
/// Lanes `0..8` of two vectors interleaved, and lanes `8..16`.
const LOW: [i32; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
const HIGH: [i32; 16] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn index(i: &[i32; 16]) -> __m512i {
    // SAFETY: 16 `i32`s are one 64-byte vector.
    unsafe { _mm512_loadu_si512(i.as_ptr().cast()) }
}

/// `s[at..at + 16]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn load(s: &[f32], at: usize) -> __m512 {
    let s = &s[at..at + 16];
    // SAFETY: `s` holds the 16 floats read.
    unsafe { _mm512_loadu_ps(s.as_ptr()) }
}

/// `d[at..at + 16] = v`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn store(d: &mut [f32], at: usize, v: __m512) {
    let d = &mut d[at..at + 16];
    // SAFETY: `d` holds the 16 floats written.
    unsafe { _mm512_storeu_ps(d.as_mut_ptr(), v) }
}

/// `d[at..at + n] = ` the first `n <= 16` lanes of `v`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn store_first(d: &mut [f32], at: usize, n: usize, v: __m512) {
    let d = &mut d[at..at + n];
    let mask = ((1u32 << n) - 1) as u16;
    // SAFETY: the masked lanes `0..n` write `d`; the others are not accessed.
    unsafe { _mm512_mask_storeu_ps(d.as_mut_ptr(), mask, v) }
}

/// Lane `l` = `s[at + l]` for `l < n <= 16`, zero for the others.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn load_first(s: &[f32], at: usize, n: usize) -> __m512 {
    let s = &s[at..at + n];
    // SAFETY: the masked lanes `0..n` read `s`; the others are not accessed.
    unsafe { _mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, s.as_ptr()) }
}

/// Lanes `l` with `0 <= c + l < w`.
#[inline]
fn lanes_inside(c: isize, w: usize) -> u16 {
    let (lo, hi) = ((-c).clamp(0, 16), (w as isize - c).clamp(0, 16));
    if hi <= lo {
        return 0;
    }
    (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16
}

/// For each vector `j` of a copied row `len` wide (columns `16j..16j + 16`), the lanes that
/// read a column of the `w`-wide source row (column `16j + l + shift`) and the lanes stored
/// (`16j + l < len`); the first 32 vectors' masks kept, once per plane instead of once per row.
struct ColMasks {
    len: usize,
    w: usize,
    shift: isize,
    first: [(u16, u16); 32],
}

impl ColMasks {
    fn new(len: usize, w: usize, shift: isize) -> ColMasks {
        let mut masks = ColMasks {
            len,
            w,
            shift,
            first: [(0, 0); 32],
        };
        for j in 0..len.div_ceil(16).min(32) {
            masks.first[j] = masks.compute(j);
        }
        masks
    }

    #[inline]
    fn compute(&self, j: usize) -> (u16, u16) {
        let c = 16 * j as isize;
        (
            lanes_inside(c + self.shift, self.w),
            lanes_inside(c, self.len),
        )
    }

    #[inline]
    fn get(&self, j: usize) -> (u16, u16) {
        if j < 32 {
            self.first[j]
        } else {
            self.compute(j)
        }
    }
}

/// `dst[c] = row[c + shift]` where that column exists, else zero (all zero without a row), for
/// `c < dst.len()`, the row length `masks` was made for. (Inlined by force: as a call it
/// was a third of [`input4`]'s time.)
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL ([`available`]).
#[inline(always)]
unsafe fn copy_row<L: Lane>(row: Option<&[L]>, masks: &ColMasks, dst: &mut [f32]) {
    assert_eq!(dst.len(), masks.len, "copied row length");
    assert!(row.is_none_or(|r| r.len() == masks.w), "source row length");
    let d = dst.as_mut_ptr();
    for j in 0..masks.len.div_ceil(16) {
        let (read, stored) = masks.get(j);
        let v = match row {
            // Lane `l` reads `row[16j + l + shift]`: the pointer may lie outside the row,
            // where only masked-off lanes would touch.
            // SAFETY: `read` holds the lanes whose column lies inside the row (`lanes_inside`
            // over the row's length, asserted above); masked-off lanes are not accessed.
            Some(row) => unsafe {
                L::load16(
                    read,
                    row.as_ptr().wrapping_offset(16 * j as isize + masks.shift),
                )
            },
            // SAFETY: the CPU has AVX-512 F, BW and VL (the contract).
            None => unsafe { _mm512_setzero_ps() },
        };
        // SAFETY: `stored` holds the lanes `16j + l < len = dst.len()`.
        unsafe { _mm512_mask_storeu_ps(d.wrapping_add(16 * j), stored, v) };
    }
}

/// Rows `0..rows` of a plane (`h` rows of `w`), row `r` being plane row `r - pad_top` (zero
/// outside the plane), copied by [`copy_row`] into each of `dsts` with its masks, row `r` at
/// `((r mod m)·per + r / m)·len`: the order the vertical transforms read the rows in.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL ([`available`]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn copy_rows<L: Lane, const N: usize>(
    plane: &[L],
    [h, w]: [usize; 2],
    pad_top: usize,
    rows: usize,
    [m, per]: [usize; 2],
    mut dsts: [(&ColMasks, &mut [f32]); N],
) {
    for r in 0..rows {
        let row = r
            .checked_sub(pad_top)
            .filter(|&y| y < h)
            .map(|y| &plane[y * w..][..w]);
        for (masks, dst) in dsts.iter_mut() {
            let (len, at) = (masks.len, ((r % m) * per + r / m) * masks.len);
            // SAFETY: the CPU has AVX-512 F, BW and VL (the contract).
            unsafe { copy_row(row, masks, &mut dst[at..at + len]) };
        }
    }
}

/// Output row phase `i` of every tile row (`flat`, rows `m·tw` wide) into rows `m·ty + i` of
/// the `ho x wo` plane `y`, cut at its edges.
fn rows_out(
    flat: &[f32],
    [m, i]: [usize; 2],
    [th, tw]: [usize; 2],
    [ho, wo]: [usize; 2],
    y: &mut [f32],
) {
    for ty in 0..th {
        let oy = m * ty + i;
        if oy >= ho {
            break;
        }
        y[oy * wo..][..wo].copy_from_slice(&flat[m * ty * tw..][..wo]);
    }
}

/// Sixteen tiles' values `k = 0..4` from the 64 floats `4f + k` in four vectors.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn phases4(a: [__m512; 4], even: __m512i, odd: __m512i) -> [__m512; 4] {
    // Lane 2t of `e01` holds tile t's value 0, lane 2t + 1 its value 2 (tiles 0..8); `o01`
    // values 1 and 3; `e23` and `o23` the same for tiles 8..16.
    let e01 = _mm512_permutex2var_ps(a[0], even, a[1]);
    let o01 = _mm512_permutex2var_ps(a[0], odd, a[1]);
    let e23 = _mm512_permutex2var_ps(a[2], even, a[3]);
    let o23 = _mm512_permutex2var_ps(a[2], odd, a[3]);
    [
        _mm512_permutex2var_ps(e01, even, e23),
        _mm512_permutex2var_ps(o01, even, o23),
        _mm512_permutex2var_ps(e01, odd, e23),
        _mm512_permutex2var_ps(o01, odd, o23),
    ]
}

/// Values 0 and 1 only, as [`phases4`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn phases01(a: [__m512; 4], even: __m512i, odd: __m512i) -> [__m512; 2] {
    let e01 = _mm512_permutex2var_ps(a[0], even, a[1]);
    let o01 = _mm512_permutex2var_ps(a[0], odd, a[1]);
    let e23 = _mm512_permutex2var_ps(a[2], even, a[3]);
    let o23 = _mm512_permutex2var_ps(a[2], odd, a[3]);
    [
        _mm512_permutex2var_ps(e01, even, e23),
        _mm512_permutex2var_ps(o01, even, o23),
    ]
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn splat(v: f32) -> __m512 {
    _mm512_set1_ps(v)
}

/// [`super::winograd`]'s `b4` on vectors, operation by operation.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn b4([d0, d1, d2, d3, d4, d5]: [__m512; 6]) -> [__m512; 6] {
    let (add, sub, mul) = (_mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps);
    let (two, four, five) = (splat(2.0), splat(4.0), splat(5.0));
    [
        add(sub(mul(four, d0), mul(five, d2)), d4),
        add(add(mul(splat(-4.0), add(d1, d2)), d3), d4),
        add(sub(mul(four, sub(d1, d2)), d3), d4),
        add(sub(mul(two, sub(d3, d1)), d2), d4),
        add(sub(mul(two, sub(d1, d3)), d2), d4),
        add(sub(mul(four, d1), mul(five, d3)), d5),
    ]
}

/// [`super::winograd`]'s `a4` on vectors, operation by operation.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn a4([m0, m1, m2, m3, m4, m5]: [__m512; 6]) -> [__m512; 4] {
    let (add, sub, mul) = (_mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps);
    let (s12, d12, s34, d34) = (add(m1, m2), sub(m1, m2), add(m3, m4), sub(m3, m4));
    [
        add(add(m0, s12), s34),
        add(d12, mul(splat(2.0), d34)),
        add(s12, mul(splat(4.0), s34)),
        add(add(d12, mul(splat(8.0), d34)), m5),
    ]
}

/// [`super::winograd`]'s `a_adjoint::<4>` on vectors, operation by operation.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn a_adjoint([y0, y1, y2, y3]: [__m512; 4]) -> [__m512; 6] {
    let (add, sub, mul) = (_mm512_add_ps, _mm512_sub_ps, _mm512_mul_ps);
    let (two, four, eight) = (splat(2.0), splat(4.0), splat(8.0));
    [
        y0,
        add(add(add(y0, y1), y2), y3),
        sub(add(sub(y0, y1), y2), y3),
        add(add(add(y0, mul(two, y1)), mul(four, y2)), mul(eight, y3)),
        sub(add(sub(y0, mul(two, y1)), mul(four, y2)), mul(eight, y3)),
        y3,
    ]
}

/// `Bᵀ d B` of every 6x6 tile (4 apart) of one channel plane (`h x w`, `pad` zero columns
/// left, `pad_top` zero rows above), written to `v[ξ · plane_stride + t0 + ty · tw + tx]`,
/// `ξ = 6a + b`: [`super::winograd`]'s `input_transform4` on f32, the same bits. `scratch`
/// holds [`scratch_len`] floats.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn input4(
    plane: &[f32],
    h: usize,
    w: usize,
    pad: usize,
    pad_top: usize,
    th: usize,
    tw: usize,
    v: &mut [f32],
    plane_stride: usize,
    t0: usize,
    scratch: &mut [f32],
) {
    let (even, odd) = (index(&EVEN), index(&ODD));
    let len = 4 * tw;
    let stride = (th + 1) * tw;
    let flat = 4 * stride;
    // `m`: the padded rows cut to `4·tw` columns, row `r` at `(r mod 4)·(th + 1) + r / 4`; `x`
    // the same rows from column 4. The slack is the last 16 tiles' loads.
    let (m, rest) = scratch.split_at_mut(4 * flat + 64);
    let (x, rest) = rest.split_at_mut(4 * flat + 64);
    let hb = &mut rest[..6 * (flat + 16)];
    let (ml, xl) = (
        ColMasks::new(len, w, -(pad as isize)),
        ColMasks::new(len, w, 4 - pad as isize),
    );
    // SAFETY: the CPU has AVX-512 F, BW and VL (the contract).
    unsafe {
        copy_rows(
            plane,
            [h, w],
            pad_top,
            4 * th + 2,
            [4, th + 1],
            [(&ml, m), (&xl, x)],
        )
    };
    // The horizontal transform `d B` of every row, flat over the tiles of all rows: hb[b]'s
    // tile `f` is tile `f mod tw` of copied row `f / tw` (rows never read included).
    for f in (0..flat).step_by(16) {
        let [p0, p1, p2, p3] = phases4(std::array::from_fn(|j| load(m, 4 * f + 16 * j)), even, odd);
        let [p4, p5] = phases01(std::array::from_fn(|j| load(x, 4 * f + 16 * j)), even, odd);
        for (b, t) in b4([p0, p1, p2, p3, p4, p5]).into_iter().enumerate() {
            store(hb, b * (flat + 16) + f, t);
        }
    }
    // The vertical transform: tile `t = ty · tw + tx` reads rows `4ty + k`, which are copied
    // rows `k·(th + 1) + ty` for `k < 4` and `(k - 4)·(th + 1) + ty + 1` for `k = 4, 5`.
    let n = th * tw;
    for t in (0..n).step_by(16) {
        let cnt = (n - t).min(16);
        for b in 0..6 {
            let hr = &hb[b * (flat + 16)..][..flat + 16];
            let d = [
                load(hr, t),
                load(hr, stride + t),
                load(hr, 2 * stride + t),
                load(hr, 3 * stride + t),
                load(hr, tw + t),
                load(hr, stride + tw + t),
            ];
            for (a, value) in b4(d).into_iter().enumerate() {
                store_first(v, (a * 6 + b) * plane_stride + t0 + t, cnt, value);
            }
        }
    }
}

/// `Aᵀ m A` (+ bias) of every tile of one output channel, from `m[ξ · plane_stride + t0 + ty ·
/// tw + tx]` into the `ho x wo` plane `y`: [`super::winograd`]'s `output_transform4`, the
/// same bits. `s` holds [`scratch_len`] floats.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn output4(
    m: &[f32],
    plane_stride: usize,
    t0: usize,
    th: usize,
    tw: usize,
    ho: usize,
    wo: usize,
    bias: f32,
    y: &mut [f32],
    s: &mut [f32],
) {
    let (lo, hi) = (index(&LOW), index(&HIGH));
    let n = th * tw;
    let np = n + 16;
    // r[i][b]: row i of `Aᵀ m` (six columns); `flat`: output row phase i of every tile row,
    // `4·tw` columns each.
    let (r, rest) = s.split_at_mut(24 * np);
    let flat = &mut rest[..4 * n + 64];
    for t in (0..n).step_by(16) {
        let cnt = (n - t).min(16);
        for b in 0..6 {
            let col: [__m512; 6] = std::array::from_fn(|a| {
                let at = (6 * a + b) * plane_stride + t0 + t;
                load_first(m, at, cnt)
            });
            for (i, value) in a4(col).into_iter().enumerate() {
                store(r, (i * 6 + b) * np + t, value);
            }
        }
    }
    let bias = splat(bias);
    for i in 0..4 {
        for t in (0..n).step_by(16) {
            let row: [__m512; 6] = std::array::from_fn(|b| load(r, (i * 6 + b) * np + t));
            let [y0, y1, y2, y3] = a4(row).map(|v| _mm512_add_ps(v, bias));
            // Tile `t + l`'s four columns at `4(t + l)`.
            let (a, c) = (
                _mm512_permutex2var_ps(y0, lo, y2),
                _mm512_permutex2var_ps(y1, lo, y3),
            );
            let (b, d) = (
                _mm512_permutex2var_ps(y0, hi, y2),
                _mm512_permutex2var_ps(y1, hi, y3),
            );
            store(flat, 4 * t, _mm512_permutex2var_ps(a, lo, c));
            store(flat, 4 * t + 16, _mm512_permutex2var_ps(a, hi, c));
            store(flat, 4 * t + 32, _mm512_permutex2var_ps(b, lo, d));
            store(flat, 4 * t + 48, _mm512_permutex2var_ps(b, hi, d));
        }
        rows_out(flat, [4, i], [th, tw], [ho, wo], y);
    }
}

/// `A dY Aᵀ` of every 4x4 block of one output channel's gradient (`ho x wo`, zero past the
/// edges), written to `dm[ξ · plane_stride + t0 + ty · tw + tx]`: [`super::winograd`]'s
/// `dy_transform` for F(4x4, 3x3), the same bits. `s` holds [`scratch_len`] floats.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dy4(
    dy: &[f32],
    ho: usize,
    wo: usize,
    th: usize,
    tw: usize,
    dm: &mut [f32],
    plane_stride: usize,
    t0: usize,
    s: &mut [f32],
) {
    let (even, odd) = (index(&EVEN), index(&ODD));
    let (len, n) = (4 * tw, th * tw);
    // `q`: the rows cut or padded to `4·tw` columns, row `oy` at `(oy mod 4)·th + oy / 4`;
    // `sb[b]`: the horizontal transform, row phase `i` of tile `t` at `i·n + t`.
    let (q, rest) = s.split_at_mut(16 * n + 64);
    let sb = &mut rest[..6 * (4 * n + 16)];
    let masks = ColMasks::new(len, wo, 0);
    // SAFETY: the CPU has AVX-512 F, BW and VL (the contract).
    unsafe { copy_rows(dy, [ho, wo], 0, 4 * th, [4, th], [(&masks, q)]) };
    for f in (0..4 * n).step_by(16) {
        let p = phases4(std::array::from_fn(|j| load(q, 4 * f + 16 * j)), even, odd);
        for (b, h) in a_adjoint(p).into_iter().enumerate() {
            store(sb, b * (4 * n + 16) + f, h);
        }
    }
    for t in (0..n).step_by(16) {
        let cnt = (n - t).min(16);
        for b in 0..6 {
            let rows = std::array::from_fn(|i| load(sb, b * (4 * n + 16) + i * n + t));
            for (a, value) in a_adjoint(rows).into_iter().enumerate() {
                store_first(dm, (a * 6 + b) * plane_stride + t0 + t, cnt, value);
            }
        }
    }
}

/// `-v`, the sign flipped (as the scalar negation: `-0.0` from `0.0`).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[inline]
fn neg(v: __m512) -> __m512 {
    _mm512_castsi512_ps(_mm512_xor_si512(
        _mm512_castps_si512(v),
        _mm512_set1_epi32(i32::MIN),
    ))
}

/// Scratch floats any of the three F(2x2, 3x3) transforms needs for `th x tw` tiles.
pub(super) fn scratch_len2(th: usize, tw: usize) -> usize {
    let rows = 2 * (th + 1);
    let input = 2 * (rows * 2 * tw + 32) + 4 * (rows * tw + 16);
    let n = th * tw;
    let output = 8 * (n + 16) + 2 * n + 32;
    let dy = 4 * n + 32 + 4 * (2 * n + 16);
    input.max(output).max(dy)
}

/// `Bᵀ d B` of every 4x4 tile (2 apart) of one channel plane, written to `v[ξ · plane_stride +
/// t0 + ty · tw + tx]`, `ξ = 4a + b`: [`super::winograd`]'s `input_transform` on f32, the
/// same bits, on f32 or bf16 planes, as [`input4`] (rows `2·tw` wide, row `r` copied to `(r mod 2)·(th + 1) + r /
/// 2`, columns `2tx + 2, 2tx + 3` from a copy shifted by two). `scratch` holds
/// [`scratch_len2`] floats.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn input2<L: Lane>(
    plane: &[L],
    h: usize,
    w: usize,
    pad: usize,
    pad_top: usize,
    th: usize,
    tw: usize,
    v: &mut [f32],
    plane_stride: usize,
    t0: usize,
    scratch: &mut [f32],
) {
    let (even, odd) = (index(&EVEN), index(&ODD));
    let len = 2 * tw;
    let half = (th + 1) * tw;
    let flat = 2 * half;
    let (m, rest) = scratch.split_at_mut(2 * flat + 32);
    let (x, rest) = rest.split_at_mut(2 * flat + 32);
    let hb = &mut rest[..4 * (flat + 16)];
    let (ml, xl) = (
        ColMasks::new(len, w, -(pad as isize)),
        ColMasks::new(len, w, 2 - pad as isize),
    );
    // SAFETY: the CPU has AVX-512 F, BW and VL (the contract).
    unsafe {
        copy_rows(
            plane,
            [h, w],
            pad_top,
            2 * th + 2,
            [2, th + 1],
            [(&ml, m), (&xl, x)],
        )
    };
    // `d B` of every copied row, flat over tiles: columns `2tx, 2tx + 1` (`e0`, `o0`) and
    // `2tx + 2, 2tx + 3` (`e1`, `o1`).
    for i in 0..flat.div_ceil(16) {
        let f = 16 * i;
        let (a0, a1) = (load(m, 2 * f), load(m, 2 * f + 16));
        let (e0, o0) = (
            _mm512_permutex2var_ps(a0, even, a1),
            _mm512_permutex2var_ps(a0, odd, a1),
        );
        let (b0, b1) = (load(x, 2 * f), load(x, 2 * f + 16));
        let (e1, o1) = (
            _mm512_permutex2var_ps(b0, even, b1),
            _mm512_permutex2var_ps(b0, odd, b1),
        );
        let t = [
            _mm512_sub_ps(e0, e1),
            _mm512_add_ps(o0, e1),
            _mm512_sub_ps(e1, o0),
            _mm512_sub_ps(o0, o1),
        ];
        for (b, t) in t.into_iter().enumerate() {
            store(hb, b * (flat + 16) + f, t);
        }
    }
    // `Bᵀ (d B)`: tile `t` reads rows `2ty .. 2ty + 3`, copied rows `ty`, `th + 1 + ty`, `ty +
    // 1`, `th + 2 + ty`.
    let n = th * tw;
    for i in 0..n.div_ceil(16) {
        let t = 16 * i;
        let cnt = (n - t).min(16);
        for b in 0..4 {
            let hr = &hb[b * (flat + 16)..][..flat + 16];
            let (r0, r1, r2, r3) = (
                load(hr, t),
                load(hr, half + t),
                load(hr, tw + t),
                load(hr, half + tw + t),
            );
            let out = [
                _mm512_sub_ps(r0, r2),
                _mm512_add_ps(r1, r2),
                _mm512_sub_ps(r2, r1),
                _mm512_sub_ps(r1, r3),
            ];
            for (a, value) in out.into_iter().enumerate() {
                store_first(v, (a * 4 + b) * plane_stride + t0 + t, cnt, value);
            }
        }
    }
}

/// `Aᵀ m A` (+ bias) of every tile of one output channel: [`super::winograd`]'s
/// `output_transform`, the same bits. `s` holds [`scratch_len2`] floats.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn output2(
    m: &[f32],
    plane_stride: usize,
    t0: usize,
    th: usize,
    tw: usize,
    ho: usize,
    wo: usize,
    bias: f32,
    y: &mut [f32],
    s: &mut [f32],
) {
    let (lo, hi) = (index(&LOW), index(&HIGH));
    let n = th * tw;
    let np = n + 16;
    // r[i][b]: row i of `Aᵀ m`; `flat`: output row phase i of every tile row, `2·tw` wide.
    let (r, rest) = s.split_at_mut(8 * np);
    let flat = &mut rest[..2 * n + 32];
    for i in 0..n.div_ceil(16) {
        let t = 16 * i;
        let cnt = (n - t).min(16);
        for b in 0..4 {
            let [v0, v1, v2, v3] = std::array::from_fn(|a| {
                let at = (4 * a + b) * plane_stride + t0 + t;
                load_first(m, at, cnt)
            });
            store(r, b * np + t, _mm512_add_ps(_mm512_add_ps(v0, v1), v2));
            store(
                r,
                (4 + b) * np + t,
                _mm512_sub_ps(_mm512_sub_ps(v1, v2), v3),
            );
        }
    }
    let bias = splat(bias);
    for i in 0..2 {
        for k in 0..n.div_ceil(16) {
            let t = 16 * k;
            let [v0, v1, v2, v3] = std::array::from_fn(|b| load(r, (4 * i + b) * np + t));
            let e = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(v0, v1), v2), bias);
            let o = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(v1, v2), v3), bias);
            store(flat, 2 * t, _mm512_permutex2var_ps(e, lo, o));
            store(flat, 2 * t + 16, _mm512_permutex2var_ps(e, hi, o));
        }
        rows_out(flat, [2, i], [th, tw], [ho, wo], y);
    }
}

/// `A dY Aᵀ` of every 2x2 block of one output channel's gradient: [`super::winograd`]'s
/// `dy_transform` for F(2x2, 3x3), the same bits. `s` holds [`scratch_len2`] floats.
///
/// # Safety
/// The CPU has AVX-512 F, BW and VL ([`available`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dy2(
    dy: &[f32],
    ho: usize,
    wo: usize,
    th: usize,
    tw: usize,
    dm: &mut [f32],
    plane_stride: usize,
    t0: usize,
    s: &mut [f32],
) {
    let (even, odd) = (index(&EVEN), index(&ODD));
    let (len, n) = (2 * tw, th * tw);
    let (q, rest) = s.split_at_mut(4 * n + 32);
    let sb = &mut rest[..4 * (2 * n + 16)];
    let masks = ColMasks::new(len, wo, 0);
    // SAFETY: the CPU has AVX-512 F, BW and VL (the contract).
    unsafe { copy_rows(dy, [ho, wo], 0, 2 * th, [2, th], [(&masks, q)]) };
    // `A y` of a pair: `[y0, y0 + y1, y0 - y1, -y1]`.
    let adjoint =
        |y0: __m512, y1: __m512| [y0, _mm512_add_ps(y0, y1), _mm512_sub_ps(y0, y1), neg(y1)];
    for i in 0..(2 * n).div_ceil(16) {
        let f = 16 * i;
        let (a0, a1) = (load(q, 2 * f), load(q, 2 * f + 16));
        let h = adjoint(
            _mm512_permutex2var_ps(a0, even, a1),
            _mm512_permutex2var_ps(a0, odd, a1),
        );
        for (b, h) in h.into_iter().enumerate() {
            store(sb, b * (2 * n + 16) + f, h);
        }
    }
    for i in 0..n.div_ceil(16) {
        let t = 16 * i;
        let cnt = (n - t).min(16);
        for b in 0..4 {
            let at = b * (2 * n + 16) + t;
            let out = adjoint(load(sb, at), load(sb, at + n));
            for (a, value) in out.into_iter().enumerate() {
                store_first(dm, (a * 4 + b) * plane_stride + t0 + t, cnt, value);
            }
        }
    }
}
