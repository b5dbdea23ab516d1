//! The element types activations are stored in between layers: `f32`, or `bf16` when a model
//! runs in bf16 end to end ([`super::Precision::Bf16`] on burn-flex).
//!
//! A kernel on bf16 activations widens each value to f32 in registers ([`Act::to_f32`]), computes
//! in f32 and rounds each result once as it writes it ([`Act::from_f32`]): statistics and sums
//! stay f32, as in oneDNN's bf16 batch norm, and memory sees half the bytes. A convolution's
//! packer copies the bf16 bits as they are ([`Act::bf16_bits`]), the operand it would have
//! rounded an f32 value to. Max pooling still widens a plane into a scratch row
//! ([`Act::read`], [`Act::write`]). On `f32` all of these are the identity, so the f32 path is
//! the same code and the same bits as before.
//!
//! Rounding is to nearest, ties to even ([`super::bf16::round_slice`], the rounding the bf16
//! GEMM applies to its operands), so a bf16 activation is exactly the operand the next
//! convolution would have multiplied.

pub use half::bf16;

/// An activation element: `f32` or `bf16`.
pub trait Act: Copy + Send + Sync + PartialEq + std::fmt::Debug + 'static {
    /// Zero, which output buffers are initialised with.
    const ZERO: Self;
    /// `src` as f32 values: `src` itself for `f32`; widened into `scratch` (exactly) for bf16.
    fn read<'a>(src: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32];
    /// Fills `dst` with the f32 values `f` writes into the (zeroed) slice it is given: `dst`
    /// itself for `f32`; for bf16 a scratch row, rounded into `dst` afterwards.
    fn write(dst: &mut [Self], scratch: &mut Vec<f32>, f: impl FnOnce(&mut [f32]));
    /// The value as f32 (exact).
    fn to_f32(self) -> f32;
    /// `v` in this type: itself, or rounded to the nearest bf16, ties to even (a NaN stays a
    /// NaN).
    fn from_f32(v: f32) -> Self;
    /// The value's bf16 bits: rounded to nearest even from f32
    /// ([`super::bf16::round_bits`]), the value's own bits for bf16. A kernel's packer that
    /// reads bf16 activations this way copies them (no widening, no rounding).
    fn bf16_bits(self) -> u16;
    /// `src` as f32 values: borrowed for `f32`, widened into a new vector for bf16 (the
    /// paths that have no bf16 reader).
    fn widened(src: &[Self]) -> std::borrow::Cow<'_, [f32]>;
    /// `dst[i] = src[i].bf16_bits()` for every `i < dst.len()`: rounded 16 at a time where
    /// the CPU has AVX512-BF16 ([`super::bf16::round_slice`]), or copied.
    fn bits_into(src: &[Self], dst: &mut [u16]);
    /// The bits of bf16 activations; `None` for f32.
    fn as_bf16_bits(src: &[Self]) -> Option<&[u16]>;
    /// f32 activations; `None` for bf16.
    fn as_f32s(src: &[Self]) -> Option<&[f32]>;
}

impl Act for f32 {
    const ZERO: f32 = 0.0;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> f32 {
        v
    }
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        super::bf16::round_bits(self) as u16
    }
    #[inline]
    fn widened(src: &[f32]) -> std::borrow::Cow<'_, [f32]> {
        std::borrow::Cow::Borrowed(src)
    }
    #[inline]
    fn bits_into(src: &[f32], dst: &mut [u16]) {
        super::bf16::round_slice(src, dst)
    }
    #[inline]
    fn as_bf16_bits(_: &[f32]) -> Option<&[u16]> {
        None
    }
    #[inline]
    fn as_f32s(src: &[f32]) -> Option<&[f32]> {
        Some(src)
    }
    #[inline]
    fn read<'a>(src: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        src
    }
    #[inline]
    fn write(dst: &mut [f32], _: &mut Vec<f32>, f: impl FnOnce(&mut [f32])) {
        f(dst)
    }
}

impl Act for bf16 {
    const ZERO: bf16 = bf16::ZERO;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> bf16 {
        // Branch-free, so rows of it vectorise: `round_bits`, with a NaN kept a quiet NaN of
        // its sign and payload as `VCVTNEPS2BF16` does ([`super::bf16::round_slice`]).
        let b = v.to_bits();
        let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
        let nan = ((b >> 16) as u16) | 0x40;
        bf16::from_bits(if v.is_nan() { nan } else { rounded })
    }
    #[inline(always)]
    fn bf16_bits(self) -> u16 {
        self.to_bits()
    }
    #[inline]
    fn widened(src: &[bf16]) -> std::borrow::Cow<'_, [f32]> {
        std::borrow::Cow::Owned(to_f32(src))
    }
    #[inline]
    fn bits_into(src: &[bf16], dst: &mut [u16]) {
        let n = dst.len();
        dst.copy_from_slice(&as_bits(src)[..n]);
    }
    #[inline]
    fn as_bf16_bits(src: &[bf16]) -> Option<&[u16]> {
        Some(as_bits(src))
    }
    #[inline]
    fn as_f32s(_: &[bf16]) -> Option<&[f32]> {
        None
    }
    #[inline]
    fn read<'a>(src: &'a [bf16], scratch: &'a mut Vec<f32>) -> &'a [f32] {
        scratch.clear();
        scratch.resize(src.len(), 0.0);
        widen(src, scratch);
        scratch
    }
    #[inline]
    fn write(dst: &mut [bf16], scratch: &mut Vec<f32>, f: impl FnOnce(&mut [f32])) {
        scratch.clear();
        scratch.resize(dst.len(), 0.0);
        f(scratch);
        narrow(scratch, dst);
    }
}

/// `dst[i] = src[i]` as f32 (exact).
///
/// # Panics
/// If the lengths differ.
pub fn widen(src: &[bf16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "widen: lengths");
    widen_row(as_bits(src), dst);
}

super::simd::dispatched! {
    /// bf16 bits to f32: the bits moved to the upper half (vectorises to a zero-extend and
    /// a shift).
    fn widen_row(src: &[u16], dst: &mut [f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits((s as u32) << 16);
        }
    }
}

/// `dst[i] = src[i]` rounded to the nearest bf16, ties to even.
///
/// # Panics
/// If the lengths differ.
pub fn narrow(src: &[f32], dst: &mut [bf16]) {
    assert_eq!(src.len(), dst.len(), "narrow: lengths");
    super::bf16::round_slice(src, as_bits_mut(dst));
}

/// `src` rounded into `dst` (same length), in parallel chunks (a whole activation).
pub fn narrow_into(src: &[f32], dst: &mut [bf16]) {
    use rayon::prelude::*;
    assert_eq!(src.len(), dst.len(), "narrow_into: lengths");
    dst.par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 16))
        .for_each(|(d, s)| narrow(s, d));
}

/// The bits of bf16 values.
pub fn as_bits(v: &[bf16]) -> &[u16] {
    // SAFETY: `half::bf16` is `#[repr(transparent)]` over `u16`: same size, alignment and
    // validity; the borrow is carried over.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u16>(), v.len()) }
}

/// The bits of bf16 values, mutably.
pub fn as_bits_mut(v: &mut [bf16]) -> &mut [u16] {
    // SAFETY: as in [`as_bits`]; every `u16` is a valid `bf16`, so writes keep it valid.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u16>(), v.len()) }
}

/// `v` rounded to bf16, in parallel chunks (a whole activation).
pub fn to_bf16(v: &[f32]) -> Vec<bf16> {
    let mut out = vec![bf16::ZERO; v.len()];
    narrow_into(v, &mut out);
    out
}

/// `v` widened to f32, in parallel chunks (a whole activation), each value written once (no
/// zeroing pass ahead of the widening, which `vec![0.0; n]` is here: a `memset`).
pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out: Vec<f32> = Vec::with_capacity(v.len());
    out.spare_capacity_mut()[..v.len()]
        .par_chunks_mut(1 << 16)
        .zip(v.par_chunks(1 << 16))
        .for_each(|(d, s)| widen_uninit(as_bits(s), d));
    // SAFETY: the chunks cover all `v.len()` values and `widen_uninit` wrote each of them.
    unsafe { out.set_len(v.len()) };
    out
}

super::simd::dispatched! {
    /// [`widen_row`] into memory not yet written.
    fn widen_uninit(src: &[u16], dst: &mut [std::mem::MaybeUninit<f32>]) {
        assert_eq!(src.len(), dst.len(), "widen: lengths");
        for (d, &s) in dst.iter_mut().zip(src) {
            d.write(f32::from_bits((s as u32) << 16));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widening_is_exact_and_narrowing_rounds_to_nearest_even() {
        // 1 + 2^-8 is halfway between two bf16 values (ties to even: down to 1), 1 + 3·2^-8
        // halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even): up.
        let x = [
            1.0f32,
            1.0 + 1.0 / 256.0,
            1.0 + 3.0 / 256.0,
            -2.5,
            1e-3,
            f32::INFINITY,
        ];
        let mut b = vec![bf16::ZERO; x.len()];
        narrow(&x, &mut b);
        let mut back = vec![0.0; x.len()];
        widen(&b, &mut back);
        assert_eq!(back[0], 1.0);
        assert_eq!(back[1], 1.0);
        assert_eq!(back[2], 1.0 + 4.0 / 256.0);
        assert_eq!(back[3], -2.5);
        assert_eq!(back[5], f32::INFINITY);
        for (v, r) in x.iter().zip(&back) {
            assert_eq!(*r, super::super::bf16::round(*v), "{v}");
        }
        // 37 values: the vector body and a tail.
        let x: Vec<f32> = (0..37).map(|i| i as f32 * 0.377 - 5.0).collect();
        let b = to_bf16(&x);
        assert_eq!(
            to_f32(&b),
            x.iter()
                .map(|&v| super::super::bf16::round(v))
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn read_and_write_are_the_identity_on_f32_and_round_on_bf16() {
        let mut s = Vec::new();
        let x = [1.5f32, -3.0];
        assert_eq!(f32::read(&x, &mut s).as_ptr(), x.as_ptr());
        let mut y = [bf16::ZERO; 2];
        bf16::write(&mut y, &mut s, |r| {
            r[0] = 1.0 + 1.0 / 512.0;
            r[1] = 7.0;
        });
        assert_eq!(y, [bf16::from_f32(1.0), bf16::from_f32(7.0)]);
        assert_eq!(bf16::read(&y, &mut s), [1.0, 7.0]);
    }
}
