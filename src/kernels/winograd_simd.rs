//! The tile transforms of Winograd's F(4x4, 3x3) and F(2x2, 3x3) ([`super::winograd`]) a
//! vector of tiles at a time (one body over [`Vector`]): the input's `Bᵀ d B`, the output's
//! `Aᵀ m A` and the output gradient's `A dY Aᵀ`, each the same operations in the same order
//! as the portable loops beside them, so the same bits
//! (`winograd::tests::simd_transforms_are_the_portable_bits`, on every unit the CPU has and
//! on 16 and 8 emulated lanes). They run sixteen tiles at a time with AVX-512; eight at a
//! time with AVX2 they were slower on Zen 3 than the portable loops, which the compiler
//! vectorises for AVX2 itself (`winograd::simd_unit`), so those run there.
//!
//! Tile `tx` of a row reads columns `4tx .. 4tx + 5`: the portable loops split each row into
//! its four column phases one value at a time and then ran the transform over the `tw` tiles
//! of that one row, 8 tiles at 32 px and 4 at 16 px, so most of each vector and most of the
//! time went to loop overhead: F(4x4, 3x3)'s three transforms were 17% of an fp32 resnet18
//! training step at 128 px and took more time than the 64 -> 64 layer's GEMMs. Here a plane
//! is first copied into rows exactly `4·tw` wide, so that value `k` of tile `f` in row-major
//! tile order is element `4f + k` of one flat array whatever the row, and the phases of a
//! vector of tiles are two levels of two-source permutes of four vectors
//! ([`Vector::even_odd`]). The copy puts the rows in the order the vertical transform reads
//! them (row `r` at `(r mod 4)·(th + 1) + r / 4`), so that pass, too, runs flat over all
//! tiles.
//!
//! Measured by `perf record -F 499 convlab bench train --model resnet18 --input 3x128x128
//! --batch 32 --steps 6 --threads 2 --precision fp32` (Xeon with AMX, family 6 model 207,
//! 2026-12-06, two alternated runs each, a loaded host): samples in `winograd` functions 1333
//! / 1224 of 6147 / 5978 before, 885 / 837 of 5664 / 5556 after (7% of the step); one thread
//! on 64 planes in L2 (a throwaway harness, not committed), µs per F(4x4) input transform of
//! a plane: 32 px 2.8-3.2 -> 1.6-1.7, 16 px 1.3 -> 0.5-0.6, 56 px 6.4-8.7 -> 4.1-5.4.

use super::vector::{Vector, on_units};

/// An element of a plane the input transforms read: f32, or bf16 bits (`u16`) widened
/// exactly, as the portable loops' `Act::to_f32` does.
pub(super) trait Lane: Copy {
    /// Lane `l` = the value at `at + l` for the lanes in `mask`, zero for the others.
    ///
    /// # Safety
    /// The CPU has `V`'s instruction set; `at + l` is readable for every `l` in `mask`.
    unsafe fn load<V: Vector>(mask: V::Mask, at: *const Self) -> V;
}

impl Lane for f32 {
    #[inline(always)]
    unsafe fn load<V: Vector>(mask: V::Mask, at: *const f32) -> V {
        // SAFETY: the contract.
        unsafe { V::load(mask, at) }
    }
}

impl Lane for u16 {
    #[inline(always)]
    unsafe fn load<V: Vector>(mask: V::Mask, at: *const u16) -> V {
        // SAFETY: the contract.
        unsafe { V::load_bf16(mask, at) }
    }
}

/// Scratch floats any of the three transforms needs for `th x tw` tiles (the slack is the
/// last vector of tiles' loads, sized for 16 lanes, so for 8 too).
pub(super) fn scratch_len(th: usize, tw: usize) -> usize {
    let rows = 4 * (th + 1);
    let input = 2 * (rows * 4 * tw + 64) + 6 * (rows * tw + 16);
    let n = th * tw;
    let output = 24 * (n + 16) + 4 * n + 64;
    let dy = 16 * n + 64 + 6 * (4 * n + 16);
    input.max(output).max(dy)
}

/// `s[at..at + LANES]`.
///
/// # Safety
/// The CPU has `V`'s instruction set.
#[inline(always)]
unsafe fn load<V: Vector>(s: &[f32], at: usize) -> V {
    let s = &s[at..at + V::LANES];
    // SAFETY: `s` holds the lanes read; the contract.
    unsafe { V::load(V::mask(V::LANES), s.as_ptr()) }
}

/// Vector `j` of the result = `s[at(j)..at(j) + LANES]` (`at` computes offsets only: a
/// closure that ran the vector instructions would be compiled without the unit's features
/// and called, not inlined, as `std::array::from_fn`'s was).
///
/// # Safety
/// As [`load`].
#[inline(always)]
unsafe fn loads<V: Vector, const N: usize>(s: &[f32], at: impl Fn(usize) -> usize) -> [V; N] {
    // SAFETY: the contract.
    let mut out = [unsafe { V::zero() }; N];
    for (j, v) in out.iter_mut().enumerate() {
        // SAFETY: the contract.
        *v = unsafe { load(s, at(j)) };
    }
    out
}

/// As [`loads`], each vector's first `n` lanes ([`load_first`]).
///
/// # Safety
/// As [`load`].
#[inline(always)]
unsafe fn loads_first<V: Vector, const N: usize>(
    s: &[f32],
    n: usize,
    at: impl Fn(usize) -> usize,
) -> [V; N] {
    // SAFETY: the contract.
    let mut out = [unsafe { V::zero() }; N];
    for (j, v) in out.iter_mut().enumerate() {
        // SAFETY: the contract.
        *v = unsafe { load_first(s, at(j), n) };
    }
    out
}

/// `d[at..at + LANES] = v`.
///
/// # Safety
/// As [`load`].
#[inline(always)]
unsafe fn store<V: Vector>(d: &mut [f32], at: usize, v: V) {
    let d = &mut d[at..at + V::LANES];
    // SAFETY: `d` holds the lanes written; the contract.
    unsafe { V::store(V::mask(V::LANES), d.as_mut_ptr(), v) }
}

/// `d[at..at + n] = ` the first `n <= LANES` lanes of `v`.
///
/// # Safety
/// As [`load`].
#[inline(always)]
unsafe fn store_first<V: Vector>(d: &mut [f32], at: usize, n: usize, v: V) {
    let d = &mut d[at..at + n];
    // SAFETY: the masked lanes `0..n` write `d`; the others are not accessed; the contract.
    unsafe { V::store(V::mask(n), d.as_mut_ptr(), v) }
}

/// Lane `l` = `s[at + l]` for `l < n <= LANES`, zero for the others.
///
/// # Safety
/// As [`load`].
#[inline(always)]
unsafe fn load_first<V: Vector>(s: &[f32], at: usize, n: usize) -> V {
    let s = &s[at..at + n];
    // SAFETY: the masked lanes `0..n` read `s`; the others are not accessed; the contract.
    unsafe { V::load(V::mask(n), s.as_ptr()) }
}

/// Lanes `l` of a vector at column `c` with `0 <= c + l < w`.
#[inline(always)]
fn lanes_inside<V: Vector>(c: isize, w: usize) -> V::Mask {
    let l = V::LANES as isize;
    let (lo, hi) = ((-c).clamp(0, l), (w as isize - c).clamp(0, l));
    V::lanes(lo as usize, hi as usize)
}

/// `dst[c] = row[c + shift]` where that column exists (`row` is `w` wide), else zero (all zero
/// without a row), for `c < dst.len()`. The vectors wholly inside the row and `dst` take
/// plain loads and stores, only the edges masks: AVX2's masked moves and the mask per vector
/// made the copy 40% of the input transform's time on Zen 3. (Inlined by force: as a call it
/// was a third of [`input4`]'s time on AVX-512.)
///
/// # Safety
/// The CPU has `V`'s instruction set.
#[inline(always)]
unsafe fn copy_row<V: Vector, L: Lane>(row: Option<&[L]>, w: usize, shift: isize, dst: &mut [f32]) {
    let Some(row) = row else {
        dst.fill(0.0);
        return;
    };
    assert_eq!(row.len(), w, "source row length");
    let (lanes, len) = (V::LANES, dst.len());
    let vectors = len.div_ceil(lanes);
    // Vectors `inside`: columns `lanes·j + shift ..` within the row, `lanes·j ..` within `dst`.
    let first = (-shift).max(0).unsigned_abs().div_ceil(lanes);
    let end = ((w as isize - shift).max(0).unsigned_abs() / lanes).min(len / lanes);
    let inside = first..end.max(first);
    let (s, d) = (row.as_ptr(), dst.as_mut_ptr());
    let at = |j: usize| (lanes * j) as isize;
    for j in (0..vectors.min(first)).chain(inside.end.max(first)..vectors) {
        let (read, stored) = (
            lanes_inside::<V>(at(j) + shift, w),
            lanes_inside::<V>(at(j), len),
        );
        // Lane `l` reads `row[lanes·j + l + shift]`: the pointer may lie outside the row,
        // where only masked-off lanes would touch.
        // SAFETY: `read` holds the lanes whose column lies inside the row (asserted `w`
        // wide), `stored` those inside `dst`; masked-off lanes are not accessed; the CPU has
        // `V`'s instructions (the contract).
        unsafe {
            let v = L::load::<V>(read, s.wrapping_offset(at(j) + shift));
            V::store(stored, d.wrapping_add(lanes * j), v);
        }
    }
    for j in inside {
        // SAFETY: the whole vector lies inside the row and `dst` (`first` and `end` above);
        // the contract.
        unsafe {
            let v = L::load::<V>(V::mask(lanes), s.offset(at(j) + shift));
            V::store(V::mask(lanes), d.add(lanes * j), v);
        }
    }
}

/// Rows `0..rows` of a plane (`h` rows of `w`), row `r` being plane row `r - pad_top` (zero
/// outside the plane), copied by [`copy_row`] into each of `dsts` (rows `len` wide, the
/// columns shifted by its shift), row `r` at `((r mod m)·per + r / m)·len`: the order the
/// vertical transforms read the rows in.
///
/// # Safety
/// The CPU has `V`'s instruction set.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn copy_rows<V: Vector, L: Lane, const N: usize>(
    plane: &[L],
    [h, w]: [usize; 2],
    pad_top: usize,
    rows: usize,
    [m, per, len]: [usize; 3],
    mut dsts: [(isize, &mut [f32]); N],
) {
    for r in 0..rows {
        let row = r
            .checked_sub(pad_top)
            .filter(|&y| y < h)
            .map(|y| &plane[y * w..][..w]);
        for (shift, dst) in dsts.iter_mut() {
            let at = ((r % m) * per + r / m) * len;
            // SAFETY: the contract.
            unsafe { copy_row::<V, L>(row, w, *shift, &mut dst[at..at + len]) };
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

/// A vector of tiles' values `k = 0..4` from the floats `4f + k` in four vectors.
///
/// # Safety
/// The CPU has `V`'s instruction set.
#[inline(always)]
unsafe fn phases4<V: Vector>([a0, a1, a2, a3]: [V; 4]) -> [V; 4] {
    // SAFETY: the contract.
    unsafe {
        // `e01` holds the first half of the tiles' values 0 and 2 (interleaved), `o01` their
        // values 1 and 3; `e23` and `o23` the same for the second half.
        let [e01, o01] = V::even_odd(a0, a1);
        let [e23, o23] = V::even_odd(a2, a3);
        let [p0, p2] = V::even_odd(e01, e23);
        let [p1, p3] = V::even_odd(o01, o23);
        [p0, p1, p2, p3]
    }
}

/// [`super::winograd`]'s `b4` on vectors, operation by operation.
///
/// # Safety
/// The CPU has `V`'s instruction set.
#[inline(always)]
unsafe fn b4<V: Vector>([d0, d1, d2, d3, d4, d5]: [V; 6]) -> [V; 6] {
    let (add, sub, mul) = (V::add, V::sub, V::mul);
    // SAFETY: the contract.
    unsafe {
        let (two, four, five) = (V::splat(2.0), V::splat(4.0), V::splat(5.0));
        [
            add(sub(mul(four, d0), mul(five, d2)), d4),
            add(add(mul(V::splat(-4.0), add(d1, d2)), d3), d4),
            add(sub(mul(four, sub(d1, d2)), d3), d4),
            add(sub(mul(two, sub(d3, d1)), d2), d4),
            add(sub(mul(two, sub(d1, d3)), d2), d4),
            add(sub(mul(four, d1), mul(five, d3)), d5),
        ]
    }
}

/// [`super::winograd`]'s `a4` on vectors, operation by operation.
///
/// # Safety
/// The CPU has `V`'s instruction set.
#[inline(always)]
unsafe fn a4<V: Vector>([m0, m1, m2, m3, m4, m5]: [V; 6]) -> [V; 4] {
    let (add, sub, mul) = (V::add, V::sub, V::mul);
    // SAFETY: the contract.
    unsafe {
        let (s12, d12, s34, d34) = (add(m1, m2), sub(m1, m2), add(m3, m4), sub(m3, m4));
        [
            add(add(m0, s12), s34),
            add(d12, mul(V::splat(2.0), d34)),
            add(s12, mul(V::splat(4.0), s34)),
            add(add(d12, mul(V::splat(8.0), d34)), m5),
        ]
    }
}

/// [`super::winograd`]'s `a_adjoint::<4>` on vectors, operation by operation.
///
/// # Safety
/// The CPU has `V`'s instruction set.
#[inline(always)]
unsafe fn a_adjoint<V: Vector>([y0, y1, y2, y3]: [V; 4]) -> [V; 6] {
    let (add, sub, mul) = (V::add, V::sub, V::mul);
    // SAFETY: the contract.
    unsafe {
        let (two, four, eight) = (V::splat(2.0), V::splat(4.0), V::splat(8.0));
        [
            y0,
            add(add(add(y0, y1), y2), y3),
            sub(add(sub(y0, y1), y2), y3),
            add(add(add(y0, mul(two, y1)), mul(four, y2)), mul(eight, y3)),
            sub(add(sub(y0, mul(two, y1)), mul(four, y2)), mul(eight, y3)),
            y3,
        ]
    }
}

on_units! {
    /// `Bᵀ d B` of every 6x6 tile (4 apart) of one channel plane (`h x w`, `pad` zero columns
    /// left, `pad_top` zero rows above), written to `v[ξ · plane_stride + t0 + ty · tw + tx]`,
    /// `ξ = 6a + b`: [`super::winograd`]'s `input_transform4` on f32, the same bits. `scratch`
    /// holds [`scratch_len`] floats.
    ///
    /// # Safety
    /// The unit is present.
    pub(super) unsafe fn input4 / input4_v<V: Vector>(
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
        let lanes = V::LANES;
        let len = 4 * tw;
        let stride = (th + 1) * tw;
        let flat = 4 * stride;
        // `m`: the padded rows cut to `4·tw` columns, row `r` at `(r mod 4)·(th + 1) + r / 4`;
        // `x` the same rows from column 4. The slack is the last vector of tiles' loads.
        let (m, rest) = scratch.split_at_mut(4 * flat + 64);
        let (x, rest) = rest.split_at_mut(4 * flat + 64);
        let hb = &mut rest[..6 * (flat + 16)];
        let pad = pad as isize;
        // SAFETY: the CPU has `V`'s instruction set (the contract); every other access goes
        // through a slice.
        unsafe {
            copy_rows::<V, _, _>(
                plane,
                [h, w],
                pad_top,
                4 * th + 2,
                [4, th + 1, len],
                [(-pad, m), (4 - pad, x)],
            );
            // The horizontal transform `d B` of every row, flat over the tiles of all rows:
            // hb[b]'s tile `f` is tile `f mod tw` of copied row `f / tw` (rows never read
            // included).
            for f in (0..flat).step_by(lanes) {
                let [p0, p1, p2, p3] =
                    phases4(loads::<V, 4>(m, |j| 4 * f + lanes * j));
                let [p4, p5, _, _] =
                    phases4(loads::<V, 4>(x, |j| 4 * f + lanes * j));
                for (b, t) in b4([p0, p1, p2, p3, p4, p5]).into_iter().enumerate() {
                    store(hb, b * (flat + 16) + f, t);
                }
            }
            // The vertical transform: tile `t = ty · tw + tx` reads rows `4ty + k`, which are
            // copied rows `k·(th + 1) + ty` for `k < 4` and `(k - 4)·(th + 1) + ty + 1` for
            // `k = 4, 5`.
            let n = th * tw;
            for t in (0..n).step_by(lanes) {
                let cnt = (n - t).min(lanes);
                for b in 0..6 {
                    let hr = &hb[b * (flat + 16)..][..flat + 16];
                    let d = [
                        load::<V>(hr, t),
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
    }
}

on_units! {
    /// `Aᵀ m A` (+ bias) of every tile of one output channel, from `m[ξ · plane_stride + t0 +
    /// ty · tw + tx]` into the `ho x wo` plane `y`: [`super::winograd`]'s `output_transform4`,
    /// the same bits. `s` holds [`scratch_len`] floats.
    ///
    /// # Safety
    /// The unit is present.
    pub(super) unsafe fn output4 / output4_v<V: Vector>(
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
        let lanes = V::LANES;
        let n = th * tw;
        let np = n + 16;
        // r[i][b]: row i of `Aᵀ m` (six columns); `flat`: output row phase i of every tile
        // row, `4·tw` columns each.
        let (r, rest) = s.split_at_mut(24 * np);
        let flat = &mut rest[..4 * n + 64];
        // SAFETY: the CPU has `V`'s instruction set (the contract); every access goes through
        // a slice.
        unsafe {
            for t in (0..n).step_by(lanes) {
                let cnt = (n - t).min(lanes);
                for b in 0..6 {
                    let col: [V; 6] =
                        loads_first(m, cnt, |a| (6 * a + b) * plane_stride + t0 + t);
                    for (i, value) in a4(col).into_iter().enumerate() {
                        store(r, (i * 6 + b) * np + t, value);
                    }
                }
            }
            let bias = V::splat(bias);
            for i in 0..4 {
                for t in (0..n).step_by(lanes) {
                    let row: [V; 6] = loads(r, |b| (i * 6 + b) * np + t);
                    let [y0, y1, y2, y3] = a4(row);
                    let [y0, y1, y2, y3] = [
                        V::add(y0, bias),
                        V::add(y1, bias),
                        V::add(y2, bias),
                        V::add(y3, bias),
                    ];
                    // Tile `t + l`'s four columns at `4(t + l)`.
                    let ([a, b], [c, d]) = (V::zip(y0, y2), V::zip(y1, y3));
                    let ([ac0, ac1], [bd0, bd1]) = (V::zip(a, c), V::zip(b, d));
                    for (k, v) in [ac0, ac1, bd0, bd1].into_iter().enumerate() {
                        store(flat, 4 * t + lanes * k, v);
                    }
                }
                rows_out(flat, [4, i], [th, tw], [ho, wo], y);
            }
        }
    }
}

on_units! {
    /// `A dY Aᵀ` of every 4x4 block of one output channel's gradient (`ho x wo`, zero past
    /// the edges), written to `dm[ξ · plane_stride + t0 + ty · tw + tx]`: [`super::winograd`]'s
    /// `dy_transform` for F(4x4, 3x3), the same bits. `s` holds [`scratch_len`] floats.
    ///
    /// # Safety
    /// The unit is present.
    pub(super) unsafe fn dy4 / dy4_v<V: Vector>(
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
        let lanes = V::LANES;
        let (len, n) = (4 * tw, th * tw);
        // `q`: the rows cut or padded to `4·tw` columns, row `oy` at `(oy mod 4)·th + oy / 4`;
        // `sb[b]`: the horizontal transform, row phase `i` of tile `t` at `i·n + t`.
        let (q, rest) = s.split_at_mut(16 * n + 64);
        let sb = &mut rest[..6 * (4 * n + 16)];
        // SAFETY: the CPU has `V`'s instruction set (the contract); every other access goes
        // through a slice.
        unsafe {
            copy_rows::<V, _, _>(dy, [ho, wo], 0, 4 * th, [4, th, len], [(0, q)]);
            for f in (0..4 * n).step_by(lanes) {
                let p = phases4(loads::<V, 4>(q, |j| 4 * f + lanes * j));
                for (b, h) in a_adjoint(p).into_iter().enumerate() {
                    store(sb, b * (4 * n + 16) + f, h);
                }
            }
            for t in (0..n).step_by(lanes) {
                let cnt = (n - t).min(lanes);
                for b in 0..6 {
                    let rows =
                        loads::<V, 4>(sb, |i| b * (4 * n + 16) + i * n + t);
                    for (a, value) in a_adjoint(rows).into_iter().enumerate() {
                        store_first(dm, (a * 6 + b) * plane_stride + t0 + t, cnt, value);
                    }
                }
            }
        }
    }
}

/// `A y` of a pair: `[y0, y0 + y1, y0 - y1, -y1]` ([`super::winograd`]'s `a_adjoint::<2>`).
///
/// # Safety
/// The CPU has `V`'s instruction set.
#[inline(always)]
unsafe fn adjoint2<V: Vector>(y0: V, y1: V) -> [V; 4] {
    // SAFETY: the contract.
    unsafe { [y0, V::add(y0, y1), V::sub(y0, y1), V::neg(y1)] }
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

on_units! {
    /// `Bᵀ d B` of every 4x4 tile (2 apart) of one channel plane, written to `v[ξ ·
    /// plane_stride + t0 + ty · tw + tx]`, `ξ = 4a + b`: [`super::winograd`]'s
    /// `input_transform` on f32, the same bits, on f32 or bf16 planes, as [`input4`] (rows
    /// `2·tw` wide, row `r` copied to `(r mod 2)·(th + 1) + r / 2`, columns `2tx + 2, 2tx + 3`
    /// from a copy shifted by two). `scratch` holds [`scratch_len2`] floats.
    ///
    /// # Safety
    /// The unit is present.
    pub(super) unsafe fn input2 / input2_v<V: Vector; L: Lane>(
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
        let lanes = V::LANES;
        let len = 2 * tw;
        let half = (th + 1) * tw;
        let flat = 2 * half;
        let (m, rest) = scratch.split_at_mut(2 * flat + 32);
        let (x, rest) = rest.split_at_mut(2 * flat + 32);
        let hb = &mut rest[..4 * (flat + 16)];
        let pad = pad as isize;
        let (add, sub) = (V::add, V::sub);
        // SAFETY: the CPU has `V`'s instruction set (the contract); every other access goes
        // through a slice.
        unsafe {
            copy_rows::<V, _, _>(
                plane,
                [h, w],
                pad_top,
                2 * th + 2,
                [2, th + 1, len],
                [(-pad, m), (2 - pad, x)],
            );
            // `d B` of every copied row, flat over tiles: columns `2tx, 2tx + 1` (`e0`, `o0`)
            // and `2tx + 2, 2tx + 3` (`e1`, `o1`).
            for f in (0..flat).step_by(lanes) {
                let [e0, o0] = V::even_odd(load(m, 2 * f), load(m, 2 * f + lanes));
                let [e1, o1] = V::even_odd(load(x, 2 * f), load(x, 2 * f + lanes));
                let t = [sub(e0, e1), add(o0, e1), sub(e1, o0), sub(o0, o1)];
                for (b, t) in t.into_iter().enumerate() {
                    store(hb, b * (flat + 16) + f, t);
                }
            }
            // `Bᵀ (d B)`: tile `t` reads rows `2ty .. 2ty + 3`, copied rows `ty`, `th + 1 +
            // ty`, `ty + 1`, `th + 2 + ty`.
            let n = th * tw;
            for t in (0..n).step_by(lanes) {
                let cnt = (n - t).min(lanes);
                for b in 0..4 {
                    let hr = &hb[b * (flat + 16)..][..flat + 16];
                    let (r0, r1, r2, r3) = (
                        load::<V>(hr, t),
                        load::<V>(hr, half + t),
                        load::<V>(hr, tw + t),
                        load::<V>(hr, half + tw + t),
                    );
                    let out = [sub(r0, r2), add(r1, r2), sub(r2, r1), sub(r1, r3)];
                    for (a, value) in out.into_iter().enumerate() {
                        store_first(v, (a * 4 + b) * plane_stride + t0 + t, cnt, value);
                    }
                }
            }
        }
    }
}

on_units! {
    /// `Aᵀ m A` (+ bias) of every tile of one output channel: [`super::winograd`]'s
    /// `output_transform`, the same bits. `s` holds [`scratch_len2`] floats.
    ///
    /// # Safety
    /// The unit is present.
    pub(super) unsafe fn output2 / output2_v<V: Vector>(
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
        let lanes = V::LANES;
        let n = th * tw;
        let np = n + 16;
        // r[i][b]: row i of `Aᵀ m`; `flat`: output row phase i of every tile row, `2·tw` wide.
        let (r, rest) = s.split_at_mut(8 * np);
        let flat = &mut rest[..2 * n + 32];
        let (add, sub) = (V::add, V::sub);
        // SAFETY: the CPU has `V`'s instruction set (the contract); every access goes through
        // a slice.
        unsafe {
            for t in (0..n).step_by(lanes) {
                let cnt = (n - t).min(lanes);
                for b in 0..4 {
                    let [v0, v1, v2, v3] =
                        loads_first::<V, 4>(m, cnt, |a| (4 * a + b) * plane_stride + t0 + t);
                    store(r, b * np + t, add(add(v0, v1), v2));
                    store(r, (4 + b) * np + t, sub(sub(v1, v2), v3));
                }
            }
            let bias = V::splat(bias);
            for i in 0..2 {
                for t in (0..n).step_by(lanes) {
                    let [v0, v1, v2, v3] =
                        loads::<V, 4>(r, |b| (4 * i + b) * np + t);
                    let e = add(add(add(v0, v1), v2), bias);
                    let o = add(sub(sub(v1, v2), v3), bias);
                    let [lo, hi] = V::zip(e, o);
                    store(flat, 2 * t, lo);
                    store(flat, 2 * t + lanes, hi);
                }
                rows_out(flat, [2, i], [th, tw], [ho, wo], y);
            }
        }
    }
}

on_units! {
    /// `A dY Aᵀ` of every 2x2 block of one output channel's gradient: [`super::winograd`]'s
    /// `dy_transform` for F(2x2, 3x3), the same bits. `s` holds [`scratch_len2`] floats.
    ///
    /// # Safety
    /// The unit is present.
    pub(super) unsafe fn dy2 / dy2_v<V: Vector>(
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
        let lanes = V::LANES;
        let (len, n) = (2 * tw, th * tw);
        let (q, rest) = s.split_at_mut(4 * n + 32);
        let sb = &mut rest[..4 * (2 * n + 16)];
        // SAFETY: the CPU has `V`'s instruction set (the contract); every other access goes
        // through a slice.
        unsafe {
            copy_rows::<V, _, _>(dy, [ho, wo], 0, 2 * th, [2, th, len], [(0, q)]);
            for f in (0..2 * n).step_by(lanes) {
                let [e, o] = V::even_odd(load(q, 2 * f), load(q, 2 * f + lanes));
                for (b, h) in adjoint2(e, o).into_iter().enumerate() {
                    store(sb, b * (2 * n + 16) + f, h);
                }
            }
            for t in (0..n).step_by(lanes) {
                let cnt = (n - t).min(lanes);
                for b in 0..4 {
                    let at = b * (2 * n + 16) + t;
                    let out = adjoint2::<V>(load(sb, at), load(sb, at + n));
                    for (a, value) in out.into_iter().enumerate() {
                        store_first(dm, (a * 4 + b) * plane_stride + t0 + t, cnt, value);
                    }
                }
            }
        }
    }
}
