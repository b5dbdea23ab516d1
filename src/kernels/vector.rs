//! One vector register of f32 lanes, written once for AVX-512 (`__m512`) and AVX2 + FMA
//! (`__m256`), so that a kernel's body is written once and compiled for each unit
//! ([`on_units`]); the fully connected products ([`super::fc`]) and Winograd's tile transforms
//! ([`super::winograd_simd`]) are written this way.
//!
//! The methods are `#[inline(always)]` and inline into the `#[target_feature]` functions that
//! [`on_units`] makes around a body (the `pulp` crate's pattern), so each unit's code is what
//! a hand-written kernel for it would be. Tests run the same bodies on [`Emu`], plain arrays
//! of 16 or 8 lanes with the same semantics, so a body's logic at either width is tested on
//! any CPU, and on the units themselves where the CPU has them.

/// The vector unit a kernel runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// 16 lanes, mask registers, 32 vector registers (AVX-512 F, BW and VL: every AVX-512 CPU
    /// since Skylake-SP).
    Avx512,
    /// 8 lanes, 16 registers (AVX2 + FMA: AMD Zen 1-3, Intel client cores).
    Avx2,
}

impl Unit {
    /// The units this CPU has, the faster first.
    pub fn present() -> Vec<Unit> {
        [Unit::Avx512, Unit::Avx2]
            .into_iter()
            .filter(|u| u.runs_here())
            .collect()
    }

    /// The fastest unit this CPU has, if any (detected once).
    pub fn detect() -> Option<Unit> {
        static UNIT: std::sync::OnceLock<Option<Unit>> = std::sync::OnceLock::new();
        *UNIT.get_or_init(|| Unit::present().first().copied())
    }

    /// Whether this CPU has the unit's instructions (`std`'s detection, cached).
    pub fn runs_here(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Unit::Avx512 => has!("avx512f") && has!("avx512bw") && has!("avx512vl"),
                Unit::Avx2 => has!("avx2") && has!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
}

/// One vector register of f32 lanes and the operations convlab's vector bodies use.
///
/// Every `unsafe` method needs the CPU to have the vector's instruction set, besides the
/// conditions it states (the masks and the constants are plain values).
pub(super) trait Vector: Copy {
    /// Lanes per vector.
    const LANES: usize;
    /// Vector registers the unit has (32 on AVX-512, 16 on AVX2).
    const REGISTERS: usize;
    /// Whether a streaming store of one vector writes a whole 64-byte cache line (AVX-512):
    /// a line written in two 32-byte halves is slower than a plain store on Zen 3.
    const WHOLE_LINE_STREAMS: bool;
    /// Which lanes a load or store touches.
    type Mask: Copy;
    /// Lanes `lo..hi` (cut at [`Self::LANES`]); none where `hi <= lo`.
    fn lanes(lo: usize, hi: usize) -> Self::Mask;
    /// The first `min(left, LANES)` lanes: a whole vector, or a row's tail.
    #[inline(always)]
    fn mask(left: usize) -> Self::Mask {
        Self::lanes(0, left)
    }
    /// Whether `m` is every lane.
    fn full(m: Self::Mask) -> bool;
    /// # Safety
    /// The CPU has the vector's instruction set.
    unsafe fn zero() -> Self;
    /// # Safety
    /// As [`Self::zero`].
    unsafe fn splat(v: f32) -> Self;
    /// # Safety
    /// As [`Self::zero`].
    unsafe fn add(a: Self, b: Self) -> Self;
    /// # Safety
    /// As [`Self::zero`].
    unsafe fn sub(a: Self, b: Self) -> Self;
    /// # Safety
    /// As [`Self::zero`].
    unsafe fn mul(a: Self, b: Self) -> Self;
    /// `a b + c`, fused.
    ///
    /// # Safety
    /// As [`Self::zero`].
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    /// The sign flipped, as the scalar negation (`-0.0` from `0.0`).
    ///
    /// # Safety
    /// As [`Self::zero`].
    unsafe fn neg(a: Self) -> Self;
    /// `v`'s lanes where `test > 0` (an ordered compare: NaN fails), `+0.0` in the others.
    ///
    /// # Safety
    /// As [`Self::zero`].
    unsafe fn keep_where_positive(test: Self, v: Self) -> Self;
    /// The lanes of `p` under `m`; the others zero and not read.
    ///
    /// # Safety
    /// The lanes under `m` are readable.
    unsafe fn load(m: Self::Mask, p: *const f32) -> Self;
    /// bf16 values (their bits) under `m` widened exactly to f32; the others zero and not
    /// read.
    ///
    /// # Safety
    /// The lanes under `m` are readable.
    unsafe fn load_bf16(m: Self::Mask, p: *const u16) -> Self;
    /// # Safety
    /// The lanes under `m` are writable.
    unsafe fn store(m: Self::Mask, p: *mut f32, v: Self);
    /// A whole vector by a streaming (non-temporal) store.
    ///
    /// # Safety
    /// `p` is aligned to the vector's size and its lanes are writable.
    unsafe fn stream(p: *mut f32, v: Self);
    /// The lanes added in order, lane 0 first.
    ///
    /// # Safety
    /// As [`Self::zero`].
    unsafe fn sum(self) -> f32;
    /// The lanes added in the unit's own order, the upper half onto the lower one until one
    /// lane is left (fewer dependent adds than [`Self::sum`]; other bits).
    ///
    /// # Safety
    /// As [`Self::zero`].
    unsafe fn reduce(self) -> f32;
    /// The even and the odd lanes of `a` followed by `b`: `[a0, a2, .., b0, b2, ..]` and
    /// `[a1, a3, .., b1, b3, ..]`.
    ///
    /// # Safety
    /// As [`Self::zero`].
    unsafe fn even_odd(a: Self, b: Self) -> [Self; 2];
    /// The first halves of `a` and `b` interleaved, `[a0, b0, a1, b1, ..]`, and the second
    /// halves.
    ///
    /// # Safety
    /// As [`Self::zero`].
    unsafe fn zip(a: Self, b: Self) -> [Self; 2];
}

/// Defines `unsafe fn $name(unit: Unit, args)` that runs the body, generic over the vector
/// type `$v`, compiled for `unit`'s instruction set (so that [`Vector`]'s methods inline into
/// it), and the generic body itself as `$generic` (which tests run on [`Emu`]). The body's
/// `# Safety` contract holds for both, with "the unit is present" for the dispatching one;
/// the generic one needs the CPU to have `$v`'s instruction set.
macro_rules! on_units {
    ($(#[doc = $doc:literal])* $vis:vis unsafe fn $name:ident / $generic:ident<$v:ident: Vector $(, const $c:ident: usize)* $(; $g:ident: $gb:ident)*>($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[doc = $doc])*
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        $vis unsafe fn $generic<$v: $crate::kernels::vector::Vector $(, const $c: usize)* $(, $g: $gb)*>($($arg: $ty),*) $(-> $ret)? $body

        $(#[doc = $doc])*
        #[cfg(target_arch = "x86_64")]
        #[allow(clippy::too_many_arguments)]
        $vis unsafe fn $name<$(const $c: usize,)* $($g: $gb),*>(unit: $crate::kernels::vector::Unit, $($arg: $ty),*) $(-> $ret)? {
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx512<$(const $c: usize,)* $($g: $gb),*>($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: the caller's contract; AVX-512 F, BW and VL are enabled here.
                unsafe { $generic::<std::arch::x86_64::__m512 $(, $c)* $(, $g)*>($($arg),*) }
            }
            #[target_feature(enable = "avx2,fma")]
            #[allow(clippy::too_many_arguments)]
            unsafe fn avx2<$(const $c: usize,)* $($g: $gb),*>($($arg: $ty),*) $(-> $ret)? {
                // SAFETY: the caller's contract; AVX2 and FMA are enabled here.
                unsafe { $generic::<std::arch::x86_64::__m256 $(, $c)* $(, $g)*>($($arg),*) }
            }
            match unit {
                // SAFETY: `unit` is one the CPU has (the caller's contract).
                $crate::kernels::vector::Unit::Avx512 => unsafe { avx512::<$($c,)* $($g),*>($($arg),*) },
                // SAFETY: as above.
                $crate::kernels::vector::Unit::Avx2 => unsafe { avx2::<$($c,)* $($g),*>($($arg),*) },
            }
        }
    };
}
pub(super) use on_units;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Vector;
    use std::arch::x86_64::*;

    impl Vector for __m512 {
        const LANES: usize = 16;
        const REGISTERS: usize = 32;
        const WHOLE_LINE_STREAMS: bool = true;
        type Mask = __mmask16;
        #[inline(always)]
        fn lanes(lo: usize, hi: usize) -> __mmask16 {
            let (lo, hi) = (lo.min(16), hi.min(16));
            if hi <= lo {
                return 0;
            }
            (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as u16
        }
        #[inline(always)]
        fn full(m: __mmask16) -> bool {
            m == !0
        }
        #[inline(always)]
        unsafe fn zero() -> Self {
            // SAFETY: the caller's contract: the CPU has AVX-512.
            unsafe { _mm512_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            // SAFETY: as `zero`.
            unsafe { _mm512_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            // SAFETY: as `zero`.
            unsafe { _mm512_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            // SAFETY: as `zero`.
            unsafe { _mm512_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            // SAFETY: as `zero`.
            unsafe { _mm512_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            // SAFETY: as `zero`.
            unsafe { _mm512_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn neg(a: Self) -> Self {
            // Integer xor: `_mm512_xor_ps` needs AVX-512 DQ.
            // SAFETY: as `zero`.
            unsafe {
                _mm512_castsi512_ps(_mm512_xor_si512(
                    _mm512_castps_si512(a),
                    _mm512_set1_epi32(i32::MIN),
                ))
            }
        }
        #[inline(always)]
        unsafe fn keep_where_positive(test: Self, v: Self) -> Self {
            // SAFETY: as `zero`.
            unsafe {
                let keep = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(test, _mm512_setzero_ps());
                _mm512_maskz_mov_ps(keep, v)
            }
        }
        #[inline(always)]
        unsafe fn load(m: __mmask16, p: *const f32) -> Self {
            // SAFETY: AVX-512 as `zero`; masked lanes are not read, the rest are readable.
            unsafe { _mm512_maskz_loadu_ps(m, p) }
        }
        #[inline(always)]
        unsafe fn load_bf16(m: __mmask16, p: *const u16) -> Self {
            // SAFETY: AVX-512 F, BW and VL as `zero` (BW and VL for the masked 16-bit load);
            // masked lanes are not read.
            unsafe {
                let h = _mm256_maskz_loadu_epi16(m, p.cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
        }
        #[inline(always)]
        unsafe fn store(m: __mmask16, p: *mut f32, v: Self) {
            // SAFETY: as `load`, for writes.
            unsafe { _mm512_mask_storeu_ps(p, m, v) }
        }
        #[inline(always)]
        unsafe fn stream(p: *mut f32, v: Self) {
            // SAFETY: AVX-512 as `zero`; `p` is 64-byte aligned and writable (the caller's).
            unsafe { _mm512_stream_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let mut lanes = [0f32; 16];
            // SAFETY: AVX-512 as `zero`; 16 floats.
            unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), self) };
            lanes.iter().sum()
        }
        #[inline(always)]
        unsafe fn reduce(self) -> f32 {
            // SAFETY: AVX-512 as `zero`.
            unsafe { _mm512_reduce_add_ps(self) }
        }
        #[inline(always)]
        unsafe fn even_odd(a: Self, b: Self) -> [Self; 2] {
            const EVEN: [i32; 16] = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30];
            const ODD: [i32; 16] = [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31];
            // SAFETY: AVX-512 as `zero`; each index array is one 64-byte vector.
            unsafe {
                let (even, odd) = (
                    _mm512_loadu_si512(EVEN.as_ptr().cast()),
                    _mm512_loadu_si512(ODD.as_ptr().cast()),
                );
                [
                    _mm512_permutex2var_ps(a, even, b),
                    _mm512_permutex2var_ps(a, odd, b),
                ]
            }
        }
        #[inline(always)]
        unsafe fn zip(a: Self, b: Self) -> [Self; 2] {
            const LOW: [i32; 16] = [0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23];
            const HIGH: [i32; 16] = [8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31];
            // SAFETY: as `even_odd`.
            unsafe {
                let (lo, hi) = (
                    _mm512_loadu_si512(LOW.as_ptr().cast()),
                    _mm512_loadu_si512(HIGH.as_ptr().cast()),
                );
                [
                    _mm512_permutex2var_ps(a, lo, b),
                    _mm512_permutex2var_ps(a, hi, b),
                ]
            }
        }
    }

    /// Lanes `lo..hi` of an AVX2 vector: `vmaskmovps` takes a vector mask, which is built
    /// only for the partial vectors (its masked moves are slower than plain ones).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Span {
        lo: u8,
        hi: u8,
    }

    impl Span {
        /// `vmaskmovps`' mask: the sign bit of each 32-bit lane in `lo..hi`.
        ///
        /// # Safety
        /// The CPU has AVX2.
        #[inline(always)]
        unsafe fn bits(self) -> __m256i {
            // SAFETY: the caller's contract.
            unsafe {
                let iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                _mm256_and_si256(
                    _mm256_cmpgt_epi32(_mm256_set1_epi32(self.hi as i32), iota),
                    _mm256_cmpgt_epi32(iota, _mm256_set1_epi32(self.lo as i32 - 1)),
                )
            }
        }
    }

    impl Vector for __m256 {
        const LANES: usize = 8;
        const REGISTERS: usize = 16;
        const WHOLE_LINE_STREAMS: bool = false;
        type Mask = Span;
        #[inline(always)]
        fn lanes(lo: usize, hi: usize) -> Span {
            let (lo, hi) = (lo.min(8), hi.min(8));
            if hi <= lo {
                Span { lo: 0, hi: 0 }
            } else {
                Span {
                    lo: lo as u8,
                    hi: hi as u8,
                }
            }
        }
        #[inline(always)]
        fn full(m: Span) -> bool {
            m == Span { lo: 0, hi: 8 }
        }
        #[inline(always)]
        unsafe fn zero() -> Self {
            // SAFETY: the caller's contract: the CPU has AVX2 + FMA.
            unsafe { _mm256_setzero_ps() }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            // SAFETY: as `zero`.
            unsafe { _mm256_set1_ps(v) }
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            // SAFETY: as `zero`.
            unsafe { _mm256_add_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            // SAFETY: as `zero`.
            unsafe { _mm256_sub_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn mul(a: Self, b: Self) -> Self {
            // SAFETY: as `zero`.
            unsafe { _mm256_mul_ps(a, b) }
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            // SAFETY: as `zero`.
            unsafe { _mm256_fmadd_ps(a, b, c) }
        }
        #[inline(always)]
        unsafe fn neg(a: Self) -> Self {
            // SAFETY: as `zero`.
            unsafe { _mm256_xor_ps(a, _mm256_set1_ps(-0.0)) }
        }
        #[inline(always)]
        unsafe fn keep_where_positive(test: Self, v: Self) -> Self {
            // SAFETY: as `zero`.
            unsafe {
                let keep = _mm256_cmp_ps::<_CMP_GT_OQ>(test, _mm256_setzero_ps());
                _mm256_and_ps(keep, v)
            }
        }
        #[inline(always)]
        unsafe fn load(m: Span, p: *const f32) -> Self {
            // SAFETY: AVX2 as `zero`; the lanes in `m` are readable, `vmaskmovps` reads no
            // other.
            unsafe {
                if Self::full(m) {
                    _mm256_loadu_ps(p)
                } else {
                    _mm256_maskload_ps(p, m.bits())
                }
            }
        }
        #[inline(always)]
        unsafe fn load_bf16(m: Span, p: *const u16) -> Self {
            // AVX2 has no 16-bit masked load: a partial vector's lanes go through a zeroed
            // buffer.
            let mut words = [0u16; 8];
            if Self::full(m) {
                // SAFETY: AVX2 as `zero`; the 8 lanes are readable (the caller's).
                unsafe {
                    let h = _mm_loadu_si128(p.cast());
                    return _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)));
                }
            } else {
                let lanes = m.lo as usize..m.hi as usize;
                for (l, word) in words
                    .iter_mut()
                    .enumerate()
                    .take(lanes.end)
                    .skip(lanes.start)
                {
                    // SAFETY: lane `l` is in `m`, so readable (the caller's).
                    *word = unsafe { p.add(l).read_unaligned() };
                }
            }
            // SAFETY: AVX2 as `zero`; `words` is 16 bytes.
            unsafe {
                let h = _mm_loadu_si128(words.as_ptr().cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            }
        }
        #[inline(always)]
        unsafe fn store(m: Span, p: *mut f32, v: Self) {
            // SAFETY: as `load`, for writes.
            unsafe {
                if Self::full(m) {
                    _mm256_storeu_ps(p, v)
                } else {
                    _mm256_maskstore_ps(p, m.bits(), v)
                }
            }
        }
        #[inline(always)]
        unsafe fn stream(p: *mut f32, v: Self) {
            // SAFETY: AVX as `zero`; `p` is 32-byte aligned and writable (the caller's).
            unsafe { _mm256_stream_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn sum(self) -> f32 {
            let mut lanes = [0f32; 8];
            // SAFETY: AVX as `zero`; 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), self) };
            lanes.iter().sum()
        }
        #[inline(always)]
        unsafe fn reduce(self) -> f32 {
            // SAFETY: AVX as `zero`.
            unsafe {
                let h = _mm_add_ps(_mm256_castps256_ps128(self), _mm256_extractf128_ps(self, 1));
                let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
                _mm_cvtss_f32(h)
            }
        }
        #[inline(always)]
        unsafe fn even_odd(a: Self, b: Self) -> [Self; 2] {
            // Within each 128-bit half `[a0 a2 b0 b2 | a4 a6 b4 b6]`, then the 64-bit pairs
            // put in order.
            // SAFETY: AVX2 as `zero`.
            unsafe {
                let e = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
                let o = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
                [
                    _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(e))),
                    _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(o))),
                ]
            }
        }
        #[inline(always)]
        unsafe fn zip(a: Self, b: Self) -> [Self; 2] {
            // `vunpck*ps` interleave within 128-bit halves; the halves then put in order.
            // SAFETY: AVX as `zero`.
            unsafe {
                let (l, h) = (_mm256_unpacklo_ps(a, b), _mm256_unpackhi_ps(a, b));
                [
                    _mm256_permute2f128_ps::<0x20>(l, h),
                    _mm256_permute2f128_ps::<0x31>(l, h),
                ]
            }
        }
    }
}

/// `N` lanes in a plain array, with [`Vector`]'s semantics: tests run the vector bodies on it
/// at 16 and 8 lanes on any CPU.
#[cfg(test)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Emu<const N: usize>(pub [f32; N]);

#[cfg(test)]
impl<const N: usize> Emu<N> {
    fn map2(a: Self, b: Self, f: impl Fn(f32, f32) -> f32) -> Self {
        Emu(std::array::from_fn(|l| f(a.0[l], b.0[l])))
    }
}

#[cfg(test)]
impl<const N: usize> Vector for Emu<N> {
    const LANES: usize = N;
    const REGISTERS: usize = 16;
    const WHOLE_LINE_STREAMS: bool = false;
    type Mask = (usize, usize);
    fn lanes(lo: usize, hi: usize) -> (usize, usize) {
        let (lo, hi) = (lo.min(N), hi.min(N));
        if hi <= lo { (0, 0) } else { (lo, hi) }
    }
    fn full(m: (usize, usize)) -> bool {
        m == (0, N)
    }
    unsafe fn zero() -> Self {
        Emu([0.0; N])
    }
    unsafe fn splat(v: f32) -> Self {
        Emu([v; N])
    }
    unsafe fn add(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| x + y)
    }
    unsafe fn sub(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| x - y)
    }
    unsafe fn mul(a: Self, b: Self) -> Self {
        Self::map2(a, b, |x, y| x * y)
    }
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        Emu(std::array::from_fn(|l| a.0[l].mul_add(b.0[l], c.0[l])))
    }
    unsafe fn neg(a: Self) -> Self {
        Emu(a.0.map(|x| -x))
    }
    unsafe fn keep_where_positive(test: Self, v: Self) -> Self {
        Self::map2(test, v, |t, v| if t > 0.0 { v } else { 0.0 })
    }
    unsafe fn load(m: (usize, usize), p: *const f32) -> Self {
        Emu(std::array::from_fn(|l| {
            if (m.0..m.1).contains(&l) {
                // SAFETY: the lanes in `m` are readable (the caller's).
                unsafe { p.add(l).read_unaligned() }
            } else {
                0.0
            }
        }))
    }
    unsafe fn load_bf16(m: (usize, usize), p: *const u16) -> Self {
        Emu(std::array::from_fn(|l| {
            if (m.0..m.1).contains(&l) {
                // SAFETY: the lanes in `m` are readable (the caller's).
                let bits = unsafe { p.add(l).read_unaligned() };
                f32::from_bits((bits as u32) << 16)
            } else {
                0.0
            }
        }))
    }
    unsafe fn store(m: (usize, usize), p: *mut f32, v: Self) {
        for l in m.0..m.1 {
            // SAFETY: the lanes in `m` are writable (the caller's).
            unsafe { p.add(l).write_unaligned(v.0[l]) };
        }
    }
    unsafe fn stream(p: *mut f32, v: Self) {
        // SAFETY: as `store`, every lane.
        unsafe { Self::store((0, N), p, v) }
    }
    unsafe fn sum(self) -> f32 {
        self.0.iter().sum()
    }
    unsafe fn reduce(self) -> f32 {
        let mut v = self.0.to_vec();
        while v.len() > 1 {
            let half = v.len() / 2;
            v = (0..half).map(|l| v[l] + v[l + half]).collect();
        }
        v[0]
    }
    unsafe fn even_odd(a: Self, b: Self) -> [Self; 2] {
        let both = |l: usize| if l < N { a.0[l] } else { b.0[l - N] };
        [
            Emu(std::array::from_fn(|l| both(2 * l))),
            Emu(std::array::from_fn(|l| both(2 * l + 1))),
        ]
    }
    unsafe fn zip(a: Self, b: Self) -> [Self; 2] {
        let pick = |l: usize| {
            if l.is_multiple_of(2) {
                a.0[l / 2]
            } else {
                b.0[l / 2]
            }
        };
        [
            Emu(std::array::from_fn(pick)),
            Emu(std::array::from_fn(|l| pick(l + N))),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every unit the CPU has does what [`Emu`] does, lane for lane, bit for bit: masks at
    /// every range, masked loads and stores that touch nothing outside their lanes, bf16
    /// widening, the permutes and the arithmetic.
    #[test]
    fn units_are_the_emulation() {
        #[cfg(target_arch = "x86_64")]
        for unit in Unit::present() {
            match unit {
                // SAFETY: the unit is present.
                Unit::Avx512 => unsafe { check::<std::arch::x86_64::__m512, 16>() },
                // SAFETY: as above.
                Unit::Avx2 => unsafe { check::<std::arch::x86_64::__m256, 8>() },
            }
        }
        // The emulation against itself at both widths: the test's own logic runs anywhere.
        // SAFETY: `Emu` runs on any CPU.
        unsafe {
            check::<Emu<16>, 16>();
            check::<Emu<8>, 8>();
        }
    }

    /// # Safety
    /// The CPU has `V`'s instruction set.
    unsafe fn check<V: Vector, const N: usize>() {
        assert_eq!(V::LANES, N);
        let a: Vec<f32> = (0..3 * N).map(|j| j as f32 * 0.75 - 5.0).collect();
        let bf: Vec<u16> = (0..3 * N).map(|j| 0x3f80 + 7 * j as u16).collect();
        let lanes = |v: V| {
            let mut out = [0f32; N];
            // SAFETY: `out` holds N floats; the contract.
            unsafe { V::store(V::mask(N), out.as_mut_ptr(), v) };
            out
        };
        // SAFETY: the contract; every pointer below is inside `a`, `bf` or `out`.
        unsafe {
            let (x, y) = (
                V::load(V::mask(N), a.as_ptr()),
                V::load(V::mask(N), a[N..].as_ptr()),
            );
            let (ex, ey) = (
                Emu::<N>(std::array::from_fn(|l| a[l])),
                Emu::<N>(std::array::from_fn(|l| a[N + l])),
            );
            let same = |v: V, e: Emu<N>, what: &str| {
                let got = lanes(v);
                assert!(
                    got.iter()
                        .zip(&e.0)
                        .all(|(g, w)| g.to_bits() == w.to_bits()),
                    "{what} ({N} lanes): {got:?} vs {:?}",
                    e.0
                );
            };
            same(V::add(x, y), Emu::add(ex, ey), "add");
            same(V::sub(x, y), Emu::sub(ex, ey), "sub");
            same(V::mul(x, y), Emu::mul(ex, ey), "mul");
            same(V::fma(x, y, x), Emu::fma(ex, ey, ex), "fma");
            same(V::neg(V::zero()), Emu::neg(Emu::zero()), "neg");
            let (nan, enan) = (V::splat(f32::NAN), Emu::splat(f32::NAN));
            same(
                V::keep_where_positive(x, y),
                Emu::keep_where_positive(ex, ey),
                "keep",
            );
            same(
                V::keep_where_positive(nan, x),
                Emu::keep_where_positive(enan, ex),
                "keep NaN",
            );
            same(V::splat(2.5), Emu::splat(2.5), "splat");
            for (got, want) in V::even_odd(x, y).into_iter().zip(Emu::even_odd(ex, ey)) {
                same(got, want, "even_odd");
            }
            for (got, want) in V::zip(x, y).into_iter().zip(Emu::zip(ex, ey)) {
                same(got, want, "zip");
            }
            assert_eq!(V::sum(x).to_bits(), Emu::sum(ex).to_bits(), "sum");
            // The units' trees need not be the emulation's to the bit: within rounding.
            let (got, want) = (V::reduce(x), Emu::reduce(ex));
            assert!(
                (got - want).abs() <= 1e-6 * want.abs().max(1.0),
                "reduce {got} vs {want}"
            );
            for lo in 0..=N + 1 {
                for hi in 0..=N + 1 {
                    let (m, e) = (V::lanes(lo, hi), Emu::<N>::lanes(lo, hi));
                    assert_eq!(V::full(m), Emu::<N>::full(e), "full {lo}..{hi}");
                    // Loads from `N` floats in, stores into a marked buffer.
                    same(
                        V::load(m, a[N..].as_ptr()),
                        Emu::load(e, a[N..].as_ptr()),
                        "load",
                    );
                    same(
                        V::load_bf16(m, bf[N..].as_ptr()),
                        Emu::load_bf16(e, bf[N..].as_ptr()),
                        "load_bf16",
                    );
                    let (mut got, mut want) = (vec![-1f32; 3 * N], vec![-1f32; 3 * N]);
                    V::store(m, got[N..].as_mut_ptr(), x);
                    Emu::store(e, want[N..].as_mut_ptr(), ex);
                    assert_eq!(got, want, "store {lo}..{hi} ({N} lanes)");
                }
            }
        }
    }
}
