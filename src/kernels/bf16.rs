//! A bfloat16 GEMM for CPUs with AVX512-BF16: operands rounded to bf16, products summed in f32.
//!
//! bf16 keeps f32's 8-bit exponent and 7 of its 23 mantissa bits (Kalamkar et al., 2019, "A
//! Study of BFLOAT16 for Deep Learning Training"): convolutions computed this way train to the
//! same accuracy as f32 when weights, optimiser state, batch-norm statistics and the loss stay
//! in f32, which is what convlab's `precision = "bf16"` does. The speed comes from `VDPBF16PS`,
//! which does two multiply-adds per f32 lane where an FMA does one; the `gemm` crate (used for
//! f32) has no bf16 kernel, so this is one in the GotoBLAS shape (Goto & van de Geijn, 2008,
//! "Anatomy of High-Performance Matrix Multiplication"):
//!
//! - `B` (`K x N`) is packed once per `KC` rows into panels of [`WIDE`] columns (and of
//!   [`NARROW`] for the last few), each `K` pair of a column in one 32-bit word (the
//!   instruction's operand layout); a panel stays in L1 while
//! - `A` (`M x K`), rounded and packed once ([`PackedLhs`]; in L2), streams past it, and
//! - a microkernel keeps a tile of `C` in 16 or 24 of the 32 vector registers: 6 x 64 for wide
//!   panels, 16 x 16 for narrow ones, so a 4x4 feature map (16 positions per image) wastes no
//!   work on padding (the 6 x 64 tile alone made `resnet18_small` slower in bf16 than in f32).
//!
//! Rounding is to nearest even, as PyTorch's autocast and the hardware's `VCVTNE2PS2BF16` do.
//! Accumulation is in f32 in a fixed order, so results are deterministic.

use super::act::Act;
use super::buf::Lines;

/// Columns of a wide `B` panel (four 16-lane vectors), multiplied by [`WIDE_ROWS`] rows of `A`
/// at a time: the best of 6 x 64, 8 x 32, 12 x 32 and 8 x 48 on the layers of `bench-vgg`
/// (`cargo run --release --example conv_layers 1 bf16`: 157, 159, 141 and 130 GFLOP/s).
const WIDE: usize = 64;
const WIDE_ROWS: usize = 6;
/// Columns of a narrow panel (one vector), for the last `N % WIDE` columns, by
/// [`NARROW_ROWS`] rows.
const NARROW: usize = 16;
const NARROW_ROWS: usize = 16;
/// Packed rows of `A` are padded to a multiple of both tile heights.
const ROW_PAD: usize = 48;
/// Rows of `A` per cache block: a multiple of [`ROW_PAD`] and of the AMX block's 32 rows, so
/// every block's tiles start on packed rows.
const ROW_STEP: usize = 96;
/// Bytes of packed `A` rows multiplied by one chunk of `B` panels before the next rows
/// ([`gemm_block`]).
#[cfg(not(test))]
const A_CHUNK: usize = 1 << 20;
/// Bytes of packed `B` panels per chunk.
#[cfg(not(test))]
const B_CHUNK: usize = 1 << 19;
/// Small in tests, so that products of a few hundred rows and columns span several chunks.
#[cfg(test)]
const A_CHUNK: usize = 4 << 10;
#[cfg(test)]
const B_CHUNK: usize = 2 << 10;

/// Words a thread's panel buffer needs: one chunk of panels ([`B_CHUNK`] bytes and a
/// [`WIDE`] panel of a whole block).
fn panel_words(amx: bool) -> usize {
    // `nc` is rounded up to whole wide panels: at most one more than the chunk holds.
    B_CHUNK / 4 + WIDE * pairs(kc(amx), amx)
}
/// Rows of `B` (columns of `A`) packed at a time: a `KC x WIDE` panel is 32 KiB, this CPU's L1
/// data cache (128 and 192 were slower).
#[cfg(not(test))]
const KC: usize = 256;
/// Small in tests, so that they cover several `K` blocks and an odd last one.
#[cfg(test)]
const KC: usize = 10;
/// `KC` for the AMX tiles: 32 tile products per load and store of the `C` tiles instead of 8
/// (the B panel, 256 KiB, then streams from L2). resnet50 at 224 px, batch 16, 2 threads
/// (`conv_layers 2 bf16 resnet50 224 16`, Xeon with AMX): 154.8 / 149.1 GFLOP/s against
/// 144.0 / 140.7 with this constant at 256, in alternated runs; resnet18 at 128 px the same
/// within noise.
#[cfg(not(test))]
const KC_AMX: usize = 1024;
/// Small in tests: two tiles of `K` per block, the second padded.
#[cfg(test)]
const KC_AMX: usize = 40;

/// Rows of `B` packed at a time for the AMX tiles or the AVX512-BF16 kernel.
fn kc(amx: bool) -> usize {
    if amx { KC_AMX } else { KC }
}

thread_local! {
    /// Packed `B` panels, kept per thread: a fresh zeroed buffer per call (half a MiB for a
    /// 32 px image) was a memset in every GEMM, and `pack_panel` writes every word it hands
    /// to the microkernel.
    static PANELS: std::cell::RefCell<Option<Lines<u32>>> =
        const { std::cell::RefCell::new(None) };
    /// The storage of the `A` that [`gemm`] packs for one product, kept for the next one.
    static LHS_WORDS: std::cell::Cell<Option<Lines<u32>>> = const { std::cell::Cell::new(None) };
}

/// Whether this CPU has the instructions the kernel needs (AVX-512 F and BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// When bf16 products may run on `VDPBF16PS` where the AMX tiles do not take them (the binary
/// reads `CONVLAB_VDPBF16PS`, [`parse_policy`], and calls [`select_policy`] once at start).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// Where it out-runs the CPU's f32 FMAs ([`outruns_fma`]): the default.
    #[default]
    Auto,
    /// Wherever the CPU has it, even where f32 would be faster (to measure it there).
    On,
    /// Never: bf16 runs on the AMX tiles or computes in f32.
    Off,
}

/// The process-wide [`Policy`]: 0 = auto, 1 = on, 2 = off.
static POLICY: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Chooses the [`Policy`] for this process, before any model is built in bf16 (the precision
/// a run resolves to is decided once, [`super::supported_precision`]).
pub fn select_policy(policy: Policy) {
    let v = match policy {
        Policy::Auto => 0,
        Policy::On => 1,
        Policy::Off => 2,
    };
    POLICY.store(v, std::sync::atomic::Ordering::Relaxed);
}

/// This process's [`Policy`] ([`select_policy`]).
pub fn policy() -> Policy {
    match POLICY.load(std::sync::atomic::Ordering::Relaxed) {
        0 => Policy::Auto,
        1 => Policy::On,
        _ => Policy::Off,
    }
}

/// Reads a `CONVLAB_VDPBF16PS` value: unset, empty or `auto` uses the instruction where it
/// out-runs f32 FMAs; `1`/`on` wherever the CPU has it; `0`/`off` never. Anything else is an
/// error naming the variable.
pub fn parse_policy(value: Option<&str>) -> Result<Policy, String> {
    match value {
        None | Some("") | Some("auto") => Ok(Policy::Auto),
        Some("1") | Some("on") => Ok(Policy::On),
        Some("0") | Some("off") => Ok(Policy::Off),
        Some(other) => Err(format!(
            "CONVLAB_VDPBF16PS={other}: expected `auto` (the default: where it is faster than f32), `on` or `off`"
        )),
    }
}

/// Whether this CPU's `VDPBF16PS` does more multiply-adds a second than its f32 FMAs, so that
/// bf16 convolutions off the AMX tiles beat f32 ones. Decided by vendor, not timed, so that a
/// run computes in the same precision every time on the same CPU. One core's peaks, 12
/// independent chains in registers (the first lines of `cargo run --release --example
/// conv_layers`): AMD Zen 4 234 GFLOP/s against 108-114 for f32 FMAs, Zen 5 425-431 against
/// 206-234 (the bf16 instruction does two multiply-adds per f32 lane at the FMA's rate);
/// Intel Xeons 65-69 against 108-135 (family 6 model 167 with AMX, 2026-12-02) and 67-76
/// against 175-177 (family 6 model 207, a VM without AMX, 2026-12-07): 0.4-0.6x the FMAs' multiply-adds a second on Intel's
/// cores, where bf16 is fast only on the AMX tiles (BENCHMARKS.md "bf16 on an Intel Xeon
/// without AMX").
pub fn outruns_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let id = std::arch::x86_64::__cpuid(0);
        // "GenuineIntel" is EBX, EDX, ECX of leaf 0.
        let vendor = [id.ebx, id.edx, id.ecx].map(u32::to_le_bytes).concat();
        vendor != b"GenuineIntel"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether bf16 products off the AMX tiles run on `VDPBF16PS` under `policy` on this CPU.
pub fn chosen(policy: Policy) -> bool {
    available()
        && match policy {
            Policy::Auto => outruns_fma(),
            Policy::On => true,
            Policy::Off => false,
        }
}

/// `x` rounded to the nearest bf16 (ties to even), as the upper 16 bits of an f32. NaN stays a
/// (quiet) NaN.
#[inline(always)]
pub fn round_bits(x: f32) -> u32 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    if x.is_nan() { 0x7fc0 } else { rounded }
}

/// `x` rounded to bf16 and back: the value the kernel multiplies.
pub fn round(x: f32) -> f32 {
    f32::from_bits(round_bits(x) << 16)
}

/// `dst[i] = round_bits(src[i])` for every `i < dst.len()` (`src` at least as long), 16 at a
/// time with `VCVTNEPS2BF16` where the CPU has AVX512-BF16 (the same rounding, to nearest
/// even, except that a denormal, below 1.2e-38, becomes a zero of its sign, as the
/// instruction reads it; a NaN stays a quiet NaN of its sign and payload instead of
/// `0x7fc0`).
pub fn round_slice(src: &[f32], dst: &mut [u16]) {
    let src = &src[..dst.len()];
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: AVX512-BF16 (and F) were detected just above.
        unsafe { round_slice_avx512(src, dst) };
        return;
    }
    dst.iter_mut()
        .zip(src)
        .for_each(|(d, &v)| *d = round_bits(v) as u16);
}

/// [`round_slice`] on AVX512-BF16.
///
/// # Safety
/// The CPU has AVX-512 F and BF16; `src` and `dst` have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn round_slice_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let n = src.len().min(dst.len());
    let mut i = 0;
    // SAFETY: for the whole body, every vector load and store covers indices `i..i + 16 <= n`.
    unsafe {
        while i + 16 <= n {
            let v = _mm512_loadu_ps(src.as_ptr().add(i));
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
            _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), h);
            i += 16;
        }
    }
    for j in i..n {
        dst[j] = round_bits(src[j]) as u16;
    }
}

/// Two values as one packed pair, the first in the low half.
#[inline(always)]
pub(super) fn pair(lo: f32, hi: f32) -> u32 {
    round_bits(lo) | (round_bits(hi) << 16)
}

/// [`pair`] of two activations: bf16 ones are copied as they are (they are already the
/// rounded values), f32 ones rounded.
#[inline(always)]
pub(super) fn pair_of<E: Act>(lo: E, hi: E) -> u32 {
    lo.bf16_bits() as u32 | ((hi.bf16_bits() as u32) << 16)
}

/// A strided read-only matrix: element `(r, c)` is `data[r * rs + c * cs]`.
struct View<'a, E = f32> {
    data: &'a [E],
    rs: usize,
    cs: usize,
}

impl<E> Clone for View<'_, E> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<E> Copy for View<'_, E> {}

/// Rounds `src` to bf16 into `dst` in order: consecutive pairs of `src` become the words of
/// `dst` (`dst` holds `src.len().div_ceil(2)` words, the last one's upper half zero if odd).
#[inline(always)]
fn round_into(src: &[f32], dst: &mut [u32]) {
    round_into_of(src, dst)
}

/// [`round_into`] of activations (bf16 ones copied).
#[inline(always)]
fn round_into_of<E: Act>(src: &[E], dst: &mut [u32]) {
    let halves: &mut [u16] = bytemuck::cast_slice_mut(dst);
    for (h, &x) in halves.iter_mut().zip(src) {
        *h = x.bf16_bits();
    }
    halves[src.len()..].fill(0);
}

/// The left operand rounded and packed once, reused by every product with it (a convolution's
/// weights, for every image of the batch).
///
/// Layout: for each `KC` block of columns, the rows (padded with zeros to a multiple of
/// [`ROW_PAD`]) one after another, each `kp = kc.div_ceil(2)` pair words long:
/// `(a[i, k0 + 2p], a[i, k0 + 2p + 1])`, zero past the last column.
pub struct PackedLhs {
    m: usize,
    k: usize,
    /// Packed for the AMX tiles ([`super::amx`]): every block's pairs padded to whole tiles.
    amx: bool,
    /// On a cache line: the tiles load its rows ([`super::buf::Lines`]).
    words: Lines<u32>,
}

/// Pair words a packed row of `kc` columns takes: `kc / 2` rounded up, and up to whole AMX
/// tiles ([`super::amx::PAIRS`]) when packed for them.
fn pairs(kc: usize, amx: bool) -> usize {
    let kp = kc.div_ceil(2);
    if amx {
        kp.next_multiple_of(super::amx::PAIRS)
    } else {
        kp
    }
}

impl PackedLhs {
    /// Rows of the matrix packed (`m`).
    pub fn rows(&self) -> usize {
        self.m
    }

    /// Packs the `m x k` matrix `lhs[i * rs + j * cs]`.
    ///
    /// # Panics
    /// When `lhs` is too short for the shape and strides.
    pub fn new(m: usize, k: usize, lhs: &[f32], rs: usize, cs: usize) -> Self {
        Self::new_in(None, m, k, lhs, rs, cs, super::amx::enabled())
    }

    /// As [`Self::new`], in `words`' allocation (grown, never cleared: packing writes every
    /// word a product reads), for the AMX tiles or not.
    fn new_in<L: Act>(
        words: Option<Lines<u32>>,
        m: usize,
        k: usize,
        lhs: &[L],
        rs: usize,
        cs: usize,
        amx: bool,
    ) -> Self {
        assert!(
            !amx || super::amx::available(),
            "AMX requested on a CPU without it"
        );
        if m > 0 && k > 0 {
            assert!(lhs.len() > (m - 1) * rs + (k - 1) * cs);
        }
        let need = m.next_multiple_of(ROW_PAD) * k.div_ceil(kc(amx)) * pairs(kc(amx), amx);
        let mut words = words.unwrap_or_default();
        if words.len() < need {
            words.resize(need, 0);
        }
        let a = View { data: lhs, rs, cs };
        #[inline(always)]
        fn pack_all<L: Act>(a: View<L>, m: usize, k: usize, amx: bool, words: &mut [u32]) {
            let rows = m.next_multiple_of(ROW_PAD);
            let full = kc(amx);
            for (b, k0) in (0..k).step_by(full).enumerate() {
                let kc = full.min(k - k0);
                let block = &mut words[b * rows * pairs(full, amx)..][..rows * pairs(kc, amx)];
                pack_a(a, m, k0, kc, pairs(kc, amx), block);
            }
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw")]
        fn pack_avx512<L: Act>(a: View<L>, m: usize, k: usize, amx: bool, words: &mut [u32]) {
            pack_all(a, m, k, amx, words)
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
        {
            // SAFETY: the features `pack_avx512` is compiled for were detected just above.
            unsafe { pack_avx512(a, m, k, amx, &mut words) };
            return PackedLhs { m, k, amx, words };
        }
        pack_all(a, m, k, amx, &mut words);
        PackedLhs { m, k, amx, words }
    }

    /// A one-block operand whose rows the caller writes as bf16 bits: `fill(halves, ld)` writes
    /// row `i`'s `k` values at `halves[i * ld..][..k]` for `i < m` (value `j` of a row is pair
    /// word `j / 2`'s half `j % 2`, the packed layout); the padding columns and rows are zeroed
    /// here. `None` when `k` spans more than one block of `K` ([`kc`]).
    ///
    /// im2col writes the weight gradient's column matrix this way: packing an f32 column matrix
    /// wrote and re-read every value once more.
    pub fn from_rows(m: usize, k: usize, fill: impl FnOnce(&mut [u16], usize)) -> Option<Self> {
        let amx = super::amx::enabled();
        if m == 0 || k == 0 || k > kc(amx) {
            return None;
        }
        let (kp, rows) = (pairs(k, amx), m.next_multiple_of(ROW_PAD));
        let mut words = LHS_WORDS.take().unwrap_or_default();
        if words.len() < rows * kp {
            words.resize(rows * kp, 0);
        }
        // NaN pairs in tests: a value `fill` did not write shows in the product.
        #[cfg(test)]
        words.fill(u32::MAX);
        let halves: &mut [u16] = bytemuck::cast_slice_mut(&mut words[..rows * kp]);
        let ld = 2 * kp;
        fill(&mut *halves, ld);
        for row in halves[..m * ld].chunks_mut(ld) {
            row[k..].fill(0);
        }
        halves[m * ld..].fill(0);
        Some(PackedLhs { m, k, amx, words })
    }

    /// Gives the storage back to this thread for the next packed operand.
    pub fn recycle(self) {
        LHS_WORDS.set(Some(self.words));
    }

    /// The packed rows of the `b`-th `KC` block.
    fn block(&self, b: usize) -> &[u32] {
        let full = kc(self.amx);
        let kp = pairs(full.min(self.k - b * full), self.amx);
        let rows = self.m.next_multiple_of(ROW_PAD);
        &self.words[b * rows * pairs(full, self.amx)..][..rows * kp]
    }
}

/// Rows `0..rows`, columns `k0..k0 + kc` of `a`, as rows of `kp` pair words (zero past the
/// last column and in the rows past `rows`).
#[inline(always)]
fn pack_a<L: Act>(a: View<L>, rows: usize, k0: usize, kc: usize, kp: usize, out: &mut [u32]) {
    if a.rs == 1 && a.cs != 1 {
        return pack_a_transposed(a, rows, k0, kc, kp, out);
    }
    let mut run = vec![L::ZERO; kc];
    for (i, dst) in out.chunks_mut(kp).enumerate() {
        if i >= rows {
            dst.fill(0);
        } else if a.cs == 1 {
            round_into_of(&a.data[i * a.rs + k0..][..kc], dst);
        } else {
            run.iter_mut()
                .enumerate()
                .for_each(|(j, v)| *v = a.data[i * a.rs + (k0 + j) * a.cs]);
            round_into_of(&run, dst);
        }
    }
}

/// [`pack_a`] of a transposed matrix (`rs == 1`: row `i` is column `i` of a row-major
/// matrix whose rows are `cs` apart, as `Wᵀ` for an input gradient), 16 rows at a time: each
/// of the `kc` source rows gives its 16 values as one contiguous run, and the `kc x 16` block is
/// transposed 16 x 16 in registers ([`super::simd::transpose_words`]). Row by row, every value
/// came from a different cache line (`cs` floats apart): packing `Wᵀ` for resnet50's 512 -> 512
/// 3x3/2 layer was 12% of its input gradient, on the calling thread before the workers start.
/// resnet50 at 224 px, batch 16, 2 threads, Zen 4, fastest of 2 alternated runs
/// (`bench/conv_layers_ab.sh OLD NEW 2 /2 bf16 resnet50 224 16`), input gradient ms: 512 ->
/// 512 3x3/2 at 14 px 18.3 -> 15.2, 512 -> 1024 1x1/2 at 28 px 11.7 -> 11.1, 256 -> 512
/// 1x1/2 at 56 px 13.2 -> 12.9.
#[inline(always)]
fn pack_a_transposed<L: Act>(
    a: View<L>,
    rows: usize,
    k0: usize,
    kc: usize,
    kp: usize,
    out: &mut [u32],
) {
    let (mut block, mut t) = (vec![0u32; kc * 16], vec![0u32; 16 * kc]);
    for (c, chunk) in out.chunks_mut(16 * kp).enumerate() {
        let i0 = c * 16;
        let live = rows.saturating_sub(i0).min(16);
        if live == 0 {
            chunk.fill(0);
            continue;
        }
        for (j, dst) in block.chunks_exact_mut(16).enumerate() {
            let src = &a.data[i0 + (k0 + j) * a.cs..][..live];
            dst.iter_mut()
                .zip(src)
                .for_each(|(d, s)| *d = s.to_f32().to_bits());
            dst[live..].fill(0);
        }
        // `t[r·kc + j] = block[j·16 + r]`: row `i0 + r`'s values in order.
        super::simd::transpose_words(&block, kc, 16, &mut t);
        for (r, dst) in chunk.chunks_mut(kp).enumerate() {
            if r < live {
                round_into(bytemuck::cast_slice(&t[r * kc..][..kc]), dst);
            } else {
                dst.fill(0);
            }
        }
    }
}

/// Rows `k0..k0 + kc`, columns `j0..j0 + cols` of `b` as one panel `width` columns wide and
/// `out.len() / width` pair rows deep:
/// `out[p · width + j] = (b[k0 + 2p, j0 + j], b[k0 + 2p + 1, j0 + j])`, zero past the edges.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pack_panel<E: Act>(
    b: View<E>,
    j0: usize,
    cols: usize,
    width: usize,
    k0: usize,
    kc: usize,
    out: &mut [u32],
    run: &mut Vec<u32>,
) {
    let kp = kc.div_ceil(2);
    // Pair rows past `kc` (whole AMX tiles) are zero.
    out[kp * width..].fill(0);
    if b.cs == 1 {
        // Rows contiguous: two rows interleaved, a loop the compiler vectorises.
        for p in 0..kp {
            let dst = &mut out[p * width..(p + 1) * width];
            let lo = &b.data[(k0 + 2 * p) * b.rs + j0..][..cols];
            if 2 * p + 1 < kc {
                let hi = &b.data[(k0 + 2 * p + 1) * b.rs + j0..][..cols];
                for ((d, &l), &h) in dst.iter_mut().zip(lo).zip(hi) {
                    *d = pair_of(l, h);
                }
            } else {
                for (d, &l) in dst.iter_mut().zip(lo) {
                    *d = l.bf16_bits() as u32;
                }
            }
            dst[cols..].fill(0);
        }
    } else if b.rs == 1 {
        // Columns contiguous (a transposed operand): round each column in order, then spread
        // its words over the panel's rows.
        run.resize(kp, 0);
        for j in 0..width {
            if j < cols {
                round_into_of(&b.data[(j0 + j) * b.cs + k0..][..kc], run);
                for (p, &w) in run.iter().enumerate() {
                    out[p * width + j] = w;
                }
            } else {
                (0..kp).for_each(|p| out[p * width + j] = 0);
            }
        }
    } else {
        for p in 0..kp {
            for j in 0..width {
                let at = |kk: usize| {
                    if j < cols && kk < kc {
                        b.data[(k0 + kk) * b.rs + (j0 + j) * b.cs].bf16_bits() as u32
                    } else {
                        0
                    }
                };
                out[p * width + j] = at(2 * p) | (at(2 * p + 1) << 16);
            }
        }
    }
}

/// The panels `B`'s `n` columns are cut into: `(first column, columns, width)`, wide ones first.
fn panels(n: usize) -> impl Iterator<Item = (usize, usize, usize)> {
    let wide = n / WIDE;
    let rest = n - wide * WIDE;
    (0..wide)
        .map(|p| (p * WIDE, WIDE, WIDE))
        .chain((0..rest.div_ceil(NARROW)).map(move |p| {
            let j0 = wide * WIDE + p * NARROW;
            (j0, NARROW.min(n - j0), NARROW)
        }))
}

/// `C[rows, cols] += A · B_panel` (`=` unless `add`) over `kp` packed pairs: `a` points at the
/// first of `R` rows,
/// `kp` words apart; `b` at a panel `16 · V` columns wide; `c` at the tile's first element, rows
/// `c_rs` apart.
///
/// # Safety
/// The CPU has AVX-512 F and BF16; `a` holds `R` rows of `kp` words, `b` `kp · 16 · V` words;
/// `c` is valid for `rows <= R` rows of `cols <= 16 · V` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn microkernel<const R: usize, const V: usize>(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    c_rs: usize,
    rows: usize,
    cols: usize,
    add: bool,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); V]; R];
    // SAFETY: for the whole body, the caller's contract bounds every pointer offset below.
    unsafe {
        for p in 0..kp {
            let bp = b.add(p * 16 * V);
            let bv: [__m512bh; V] = std::array::from_fn(|v| {
                std::mem::transmute(_mm512_loadu_si512(bp.add(16 * v).cast()))
            });
            for (r, row) in acc.iter_mut().enumerate() {
                let av: __m512bh =
                    std::mem::transmute(_mm512_set1_epi32(*a.add(r * kp + p) as i32));
                for v in 0..V {
                    row[v] = _mm512_dpbf16_ps(row[v], av, bv[v]);
                }
            }
        }
        for (r, row) in acc.iter().enumerate().take(rows) {
            let cr = c.add(r * c_rs);
            for (v, &sum) in row.iter().enumerate() {
                let left = cols.saturating_sub(16 * v).min(16);
                if left == 0 {
                    break;
                }
                let mask: __mmask16 = if left == 16 { !0 } else { (1u16 << left) - 1 };
                let out = if add {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, cr.add(16 * v)), sum)
                } else {
                    sum
                };
                _mm512_mask_storeu_ps(cr.add(16 * v), mask, out);
            }
        }
    }
}

/// Rows of `A` per microkernel call in [`block32`]: 8 x 32 ran as fast as the 6 x 64 tile of
/// [`WIDE`] panels on `bench-vgg`'s layers (the numbers beside [`WIDE`]), and 8 divides the
/// 16- and 32-row blocks of the 1x1 kernel.
const BLOCK_ROWS: usize = 8;

/// `c[rows, 32] = A[rows, kp pairs] · panel` on `VDPBF16PS`, rows of `c` 32 apart: the
/// AVX512-BF16 counterpart of [`super::amx::block`] for the 1x1 kernel's 32 x 32 blocks
/// ([`super::pointwise`]), on the same operand layouts (`a`: rows of `kp` pair words; the
/// panel: `kp` rows of 32 pair words).
///
/// # Safety
/// The CPU has AVX-512 F and BF16; `rows` is a multiple of [`BLOCK_ROWS`]; `a` holds `rows`
/// rows of `kp` words, `panel` `32 · kp` words, and `c` `32 · rows` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn block32(
    kp: usize,
    a: *const u32,
    panel: *const u32,
    c: *mut f32,
    rows: usize,
) {
    assert!(rows.is_multiple_of(BLOCK_ROWS), "block32 of {rows} rows");
    for i in (0..rows).step_by(BLOCK_ROWS) {
        // SAFETY: rows `i..i + BLOCK_ROWS` of `a` and of `c` exist (`rows` a multiple of
        // BLOCK_ROWS); the panel is two vectors wide (the caller's contract).
        unsafe {
            microkernel::<BLOCK_ROWS, 2>(
                kp,
                a.add(i * kp),
                panel,
                c.add(32 * i),
                32,
                BLOCK_ROWS,
                32,
                false,
            )
        };
    }
}

/// The `VDPBF16PS` counterpart of [`super::amx::wgrad_block`] with `acc: None`, for the 1x1
/// weight gradient's blocks ([`super::pointwise`]'s `gram`) without AMX: `C[16·R rows, 16·V] =
/// Σ_{n < images} (Σ_{s < steps} A_n,s · B_n,s + T_n · B_n,steps)` on the same operands (`A`
/// rows of 32 bf16 values, read as 16 pair words, `a.rs` halves apart; `B` pair rows `b_rs`
/// words apart), stored the same way: tile `2·ri + vi` (rows `16·ri..`, columns `16·vi..`) at
/// `out + 256·(2·ri + vi)`, rows of 16 floats. Rows go [`BLOCK_ROWS`] at a time, each group's
/// sums in registers over all images and steps.
///
/// # Safety
/// The CPU has AVX-512 F and BF16; the reads [`super::amx::wgrad_block`]'s contract allows are
/// readable (as unaligned words); `out` is writable for `256·2·R` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn wgrad_block32<const R: usize, const V: usize>(
    a: super::amx::Runs,
    tail: Option<super::amx::Runs>,
    b: *const u32,
    b_rs: usize,
    b_img: usize,
    images: usize,
    steps: usize,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    debug_assert!((1..=2).contains(&R) && (1..=2).contains(&V));
    // SAFETY: for the whole body, the caller's contract bounds every read of `A`, the tail and
    // `B` (rows `< 16·R`, 16 pair words a run; 16 pair rows a step) and every store to `out`.
    unsafe {
        for group in 0..16 * R / BLOCK_ROWS {
            let r0 = group * BLOCK_ROWS;
            let mut acc = [[_mm512_setzero_ps(); V]; BLOCK_ROWS];
            // One run of 32 positions: rows at `at` (`rs` halves apart), pair rows at `bt`.
            let mut run = |at: *const u16, rs: usize, bt: *const u32| {
                for q in 0..16 {
                    let bv: [__m512bh; V] = std::array::from_fn(|v| {
                        std::mem::transmute(_mm512_loadu_si512(bt.add(q * b_rs + 16 * v).cast()))
                    });
                    for (r, row) in acc.iter_mut().enumerate() {
                        let word = at.add(r * rs + 2 * q).cast::<i32>().read_unaligned();
                        let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(word));
                        for v in 0..V {
                            row[v] = _mm512_dpbf16_ps(row[v], av, bv[v]);
                        }
                    }
                }
            };
            for n in 0..images {
                let (an, bn) = (a.ptr.add(n * a.img + r0 * a.rs), b.add(n * b_img));
                for s in 0..steps {
                    run(an.add(32 * s), a.rs, bn.add(16 * s * b_rs));
                }
                if let Some(t) = tail {
                    let tn = t.ptr.add(n * t.img + r0 * t.rs);
                    run(tn, t.rs, bn.add(16 * steps * b_rs));
                }
            }
            let (ri, first) = (r0 / 16, r0 % 16);
            for (r, row) in acc.iter().enumerate() {
                for (v, &sum) in row.iter().enumerate() {
                    _mm512_storeu_ps(out.add(256 * (2 * ri + v) + 16 * (first + r)), sum);
                }
            }
        }
    }
}

/// `dst[rows, n] += A[rows, k] · B` for the rows `rows` of `a` (`dst` starting at the first),
/// packing `B` one panel at a time into `bp` (at least [`WIDE`] times `KC / 2` words, [`pairs`] of [`kc`]).
///
/// # Safety
/// The CPU has AVX-512 F and BF16 ([`available`]); `b` and `dst` cover the `k x n` and
/// `rows x n` elements they are indexed with (checked by [`gemm_packed`]); `rows.start` is a
/// multiple of [`ROW_PAD`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_block<E: Act>(
    a: &PackedLhs,
    rows: std::ops::Range<usize>,
    n: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    b: View<E>,
    bp: &mut [u32],
) {
    let mut run = Vec::new();
    // SAFETY: a PackedLhs is packed for AMX only where `amx::enabled()`, so the CPU has it.
    let _tiles = a.amx.then(|| unsafe { super::amx::Tiles::configure() });
    let full = kc(a.amx);
    for (blk, k0) in (0..a.k).step_by(full).enumerate() {
        // The first block of `K` overwrites `dst` unless asked to accumulate (a zero fill
        // before the product was 2% of a bench-vgg bf16 step), the others add to it.
        let add = accumulate || blk > 0;
        let kc = full.min(a.k - k0);
        let kp = pairs(kc, a.amx);
        let ap = a.block(blk);
        // GotoBLAS's cache blocking: `B` packed `nc` columns at a time (about half a MiB of
        // panels), each chunk multiplied by `mc` rows of `A` at a time (about one MiB), so
        // both stay in this core's L2 (2 MiB on Sapphire Rapids) while the tiles reuse them.
        // One panel against all rows re-read the whole block of `A` per panel: 4.7 MB from L3
        // per panel for the input gradient of resnet18's 512-channel layers (`A` = `Wᵀ`, 4608
        // rows), and packing all panels first sent them to L3 before their first product.
        let nc = (B_CHUNK / (4 * kp))
            .max(1)
            .next_multiple_of(WIDE)
            .min(n.next_multiple_of(WIDE));
        let mc = (A_CHUNK / (4 * kp)).max(1).next_multiple_of(ROW_STEP);
        for n0 in (0..n).step_by(nc) {
            let chunk: Vec<(usize, usize, usize, usize)> = panels(n)
                .filter(|&(j0, _, _)| (n0..n0 + nc).contains(&j0))
                .scan(0, |at, (j0, cols, width)| {
                    let start = *at;
                    *at += kp * width;
                    Some((j0, cols, width, start))
                })
                .collect();
            for &(j0, cols, width, at) in &chunk {
                pack_panel(
                    b,
                    j0,
                    cols,
                    width,
                    k0,
                    kc,
                    &mut bp[at..at + kp * width],
                    &mut run,
                );
            }
            for m0 in rows.clone().step_by(mc) {
                let part = m0..(m0 + mc).min(rows.end);
                for &(j0, cols, width, at) in &chunk {
                    let panel = &bp[at..at + kp * width];
                    let dst = &mut dst[(m0 - rows.start) * dst_rs..];
                    // SAFETY: `part` starts a multiple of ROW_STEP (a multiple of ROW_PAD)
                    // rows after `rows.start`, so it starts on packed rows as `rows` does; the
                    // caller's contract covers the rest.
                    unsafe {
                        panel_product(
                            a.amx,
                            ap,
                            kp,
                            part.clone(),
                            panel,
                            width,
                            cols,
                            dst,
                            dst_rs,
                            j0,
                            add,
                        )
                    };
                }
            }
        }
    }
}

/// `dst[rows, j0..j0 + cols] (+)= A_block · panel` on the AMX tiles (`amx`) or the
/// AVX512-BF16 microkernels; `dst` starts at row `rows.start`.
///
/// # Safety
/// As [`gemm_block`]'s, for a block `ap` of `kp` pairs and a panel of `kp · width` words; with
/// `amx`, a [`super::amx::Tiles`] is live on this thread.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn panel_product(
    amx: bool,
    ap: &[u32],
    kp: usize,
    rows: std::ops::Range<usize>,
    panel: &[u32],
    width: usize,
    cols: usize,
    dst: &mut [f32],
    dst_rs: usize,
    j0: usize,
    add: bool,
) {
    if amx {
        // SAFETY: the caller's contract (tiles live, block packed for AMX, `dst` holds the tile).
        unsafe { amx_panel(ap, kp, rows, panel, width, cols, dst, dst_rs, j0, add) };
        return;
    }
    let tile = if width == WIDE {
        WIDE_ROWS
    } else {
        NARROW_ROWS
    };
    for i in rows.clone().step_by(tile) {
        let (i0, r) = (i - rows.start, tile.min(rows.end - i));
        // SAFETY: packed rows are padded to a multiple of both tile heights, so `tile`
        // rows of `kp` words exist from row `i`; the panel holds `kp · width` words; the
        // tile at (i0, j0) has `r` rows `dst_rs` apart of `cols` elements, inside `dst`
        // (the caller's contract).
        unsafe {
            let (pa, pb) = (ap.as_ptr().add(i * kp), panel.as_ptr());
            let pc = dst.as_mut_ptr().add(i0 * dst_rs + j0);
            if width == WIDE {
                microkernel::<WIDE_ROWS, 4>(kp, pa, pb, pc, dst_rs, r, cols, add);
            } else {
                microkernel::<NARROW_ROWS, 1>(kp, pa, pb, pc, dst_rs, r, cols, add);
            }
        }
    }
}

/// The AMX tiles' share of [`gemm_block`]: `dst[rows, j0..j0 + cols] (+)= A_block · panel`
/// in 32 x 32 blocks ([`super::amx::block`]).
///
/// # Safety
/// A [`super::amx::Tiles`] is live on this thread; `ap` is a block packed for AMX (`kp` a multiple of
/// [`super::amx::PAIRS`], rows padded to [`ROW_PAD`]) and `rows.start` a multiple of
/// [`ROW_PAD`]; the tile of `dst` at (row 0, column `j0`) has `rows.len()` rows `dst_rs`
/// apart of `cols` elements.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn amx_panel(
    ap: &[u32],
    kp: usize,
    rows: std::ops::Range<usize>,
    panel: &[u32],
    width: usize,
    cols: usize,
    dst: &mut [f32],
    dst_rs: usize,
    j0: usize,
    add: bool,
) {
    use super::amx::block;
    for i in rows.clone().step_by(32) {
        let (i0, r) = (i - rows.start, 32.min(rows.end - i));
        for v0 in (0..cols).step_by(32) {
            let c = 32.min(cols - v0);
            // SAFETY: rows are padded to a multiple of ROW_PAD (48) from a multiple of 48, so
            // when more than 16 rows are left from `i` there are 32 packed rows (and 16
            // otherwise); the panel has `kp` pair rows of `width >= v0 + 16·V` words; the C
            // block is inside `dst` (the caller's contract).
            unsafe {
                let pa = ap.as_ptr().add(i * kp);
                let pb = panel.as_ptr().add(v0);
                let pc = dst.as_mut_ptr().add(i0 * dst_rs + j0 + v0);
                match (r > 16, c > 16) {
                    (true, true) => block::<2, 2>(kp, pa, pb, width, pc, dst_rs, r, c, add),
                    (true, false) => block::<2, 1>(kp, pa, pb, width, pc, dst_rs, r, c, add),
                    (false, true) => block::<1, 2>(kp, pa, pb, width, pc, dst_rs, r, c, add),
                    (false, false) => block::<1, 1>(kp, pa, pb, width, pc, dst_rs, r, c, add),
                }
            }
        }
    }
}

/// `dst[m, n] (+)= A · rhs[k, n]` for a packed `A` (`m x k`), `rhs` given by (row, column)
/// strides. With `threads > 1` the rows of `dst` are split over the rayon pool.
///
/// # Panics
/// When [`available`] is false, or an operand is too short for its shape and strides.
#[allow(clippy::too_many_arguments)]
pub fn gemm_packed<E: Act>(
    a: &PackedLhs,
    n: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    rhs: &[E],
    rhs_rs: usize,
    rhs_cs: usize,
    threads: usize,
) {
    assert!(available(), "the bf16 GEMM needs AVX512-BF16");
    let (m, k) = (a.m, a.k);
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst.len() > (m - 1) * dst_rs + (n - 1));
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs)
                .take(m)
                .for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    assert!(rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    let b = View {
        data: rhs,
        rs: rhs_rs,
        cs: rhs_cs,
    };
    // Rows per thread: a multiple of ROW_PAD, so every thread's tiles start on packed rows.
    let per = m.div_ceil(threads.max(1)).next_multiple_of(ROW_PAD);
    #[cfg(target_arch = "x86_64")]
    {
        use rayon::prelude::*;
        let run = |(t, part): (usize, &mut [f32])| {
            let range = t * per..((t + 1) * per).min(m);
            PANELS.with_borrow_mut(|bp| {
                let bp = bp.get_or_insert_default();
                let need = panel_words(a.amx);
                if bp.len() < need {
                    bp.resize(need, 0);
                }
                // SAFETY: `available()` was asserted above; the asserts bound every index the
                // block reads (all of rhs) and writes (`part`, from the first row of `range`);
                // `bp` holds `need` words.
                unsafe { gemm_block(a, range, n, part, dst_rs, accumulate, b, bp) }
            })
        };
        if per >= m {
            run((0, dst));
        } else {
            dst.par_chunks_mut(per * dst_rs)
                .take(m.div_ceil(per))
                .enumerate()
                .for_each(run);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (b, per, dst_rs);
}

/// `dst[m, n] (+)= Σ_k lhs[m, k] · rhs[k, n]` with `lhs` and `rhs` rounded to bf16, every
/// operand given by (row, column) strides; the same contract as the f32 GEMM in
/// [`super::conv`]. Packs `lhs` for this one product; [`PackedLhs`] and [`gemm_packed`] reuse it.
///
/// # Panics
/// When [`available`] is false, or an operand is too short for its shape and strides.
#[allow(clippy::too_many_arguments)]
pub fn gemm<L: Act, E: Act>(
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
    gemm_on(
        super::amx::enabled(),
        [m, n, k],
        (dst, dst_rs, accumulate),
        (lhs, lhs_rs, lhs_cs),
        (rhs, rhs_rs, rhs_cs),
        threads,
    )
}

/// [`gemm`] on the AMX tiles (`amx`) or the AVX512-BF16 kernel.
fn gemm_on<L: Act, E: Act>(
    amx: bool,
    [m, n, k]: [usize; 3],
    (dst, dst_rs, accumulate): (&mut [f32], usize, bool),
    (lhs, lhs_rs, lhs_cs): (&[L], usize, usize),
    (rhs, rhs_rs, rhs_cs): (&[E], usize, usize),
    threads: usize,
) {
    // The weight gradient packs a new `A` (the column matrix) per image: reuse its storage.
    let a = PackedLhs::new_in(LHS_WORDS.take(), m, k, lhs, lhs_rs, lhs_cs, amx);
    gemm_packed(&a, n, dst, dst_rs, accumulate, rhs, rhs_rs, rhs_cs, threads);
    a.recycle();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// A transposed view packs as the transposed matrix written out, word for word: rows
    /// around the 16-row blocks and the 48-row padding, widths over more than one block of K.
    #[test]
    fn transposed_views_pack_like_the_transposed_matrix() {
        let full = kc(super::super::amx::enabled());
        for &(m, k) in &[(1, 1), (17, 5), (50, 3), (33, full + 7), (64, 2 * full)] {
            // `b` is `[k, m]` row-major; `a = bᵀ` is `[m, k]`: `a[i][j] = b[j·m + i]`.
            let b = data(m * k, 8);
            let a: Vec<f32> = (0..m * k).map(|x| b[(x % k) * m + x / k]).collect();
            let got = PackedLhs::new(m, k, &b, 1, m);
            let want = PackedLhs::new(m, k, &a, k, 1);
            assert_eq!(got.words, want.words, "m={m} k={k}");
        }
    }

    #[test]
    fn rows_written_as_bits_pack_like_the_f32_matrix() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // Widths around a pair word and a tile, up to one block of K; one past it is refused.
        let full = kc(super::super::amx::enabled());
        for &(m, k) in &[(1, 1), (3, 7), (49, full), (5, 2)] {
            let a = data(m * k, 4);
            let want = PackedLhs::new(m, k, &a, k, 1);
            let got = PackedLhs::from_rows(m, k, |h, ld| {
                for i in 0..m {
                    for j in 0..k {
                        h[i * ld + j] = round_bits(a[i * k + j]) as u16;
                    }
                }
            })
            .unwrap();
            assert_eq!(got.block(0), want.block(0), "m={m} k={k}");
        }
        assert!(PackedLhs::from_rows(2, full + 1, |_, _| {}).is_none());
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(round(1.0), 1.0);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(round(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        assert_eq!(round(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert_eq!(round(-2.5), -2.5);
        assert!(round(f32::NAN).is_nan());
        assert_eq!(round(f32::INFINITY), f32::INFINITY);
        assert!((round(0.1) - 0.1).abs() < 0.1 / 128.0);
    }

    /// Every shape class: edges in M and N, odd K, several K blocks, strided operands on both
    /// sides, accumulation and threads; against f64 sums of the bf16-rounded operands.
    #[test]
    fn gemm_matches_the_rounded_definition() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX512-BF16");
            return;
        }
        // Both kernels where the CPU has AMX (`amx::tests` fails if it reports AMX and the
        // tiles are not usable, so this cannot silently test one of them only).
        let engines: &[bool] = if super::super::amx::available() {
            &[false, true]
        } else {
            &[false]
        };
        for &amx in engines {
            for &(m, n, k) in &[
                (1, 1, 1),
                (8, 32, 2),
                (9, 33, 3),
                (17, 70, 21),
                (64, 40, 27),
                (3, 5, 0),
                (20, 16, 7),
                (100, 130, 33),
                (32, 64, 32),
                (49, 97, 64),
                // Several cache blocks of rows and of panels ([`A_CHUNK`], [`B_CHUNK`]).
                (300, 200, 45),
            ] {
                for transposed in [false, true] {
                    for accumulate in [false, true] {
                        for threads in [1, 3] {
                            let a = data(m * k, 1);
                            let b = data(k * n, 2);
                            // lhs [m, k] row-major, or stored as its transpose [k, m].
                            let (lrs, lcs) = if transposed { (1, m) } else { (k, 1) };
                            let (rrs, rcs) = if transposed { (1, k) } else { (n, 1) };
                            let dst_rs = n + 3;
                            let init = data(m * dst_rs, 3);
                            let mut dst = init.clone();
                            gemm_on(
                                amx,
                                [m, n, k],
                                (&mut dst, dst_rs, accumulate),
                                (&a, lrs, lcs),
                                (&b, rrs, rcs),
                                threads,
                            );
                            for i in 0..m {
                                for j in 0..n {
                                    let mut want: f64 = if accumulate {
                                        init[i * dst_rs + j] as f64
                                    } else {
                                        0.0
                                    };
                                    for kk in 0..k {
                                        want += round(a[i * lrs + kk * lcs]) as f64
                                            * round(b[kk * rrs + j * rcs]) as f64;
                                    }
                                    let got = dst[i * dst_rs + j] as f64;
                                    assert!(
                                        (got - want).abs() <= 1e-5 * (1.0 + k as f64),
                                        "amx={amx} m={m} n={n} k={k} t={transposed} acc={accumulate}: [{i},{j}] {got} vs {want}"
                                    );
                                }
                                // Padding between rows is left alone.
                                for j in n..dst_rs {
                                    assert_eq!(dst[i * dst_rs + j], init[i * dst_rs + j]);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
