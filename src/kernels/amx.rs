//! The bf16 GEMM's tile on Intel AMX (Advanced Matrix Extensions, Sapphire Rapids and later).
//!
//! AMX adds eight tile registers (`tmm0..tmm7`, each up to 16 rows of 64 bytes) and a matrix
//! unit: `TDPBF16PS C, A, B` computes `C[16 x 16 f32] += A[16 x 32 bf16] · B[32 x 16 bf16]`,
//! with `B` stored as 16 rows of 16 bf16 *pairs* (`B[2p, j], B[2p + 1, j]` in one 32-bit word,
//! Intel SDM vol. 1 ch. 20 and vol. 2 `TDPBF16PS`). That is exactly the layout [`super::bf16`]
//! already packs for `VDPBF16PS` (its `B` panels are rows of pair words, its `A` rows are runs
//! of pair words), so the AMX tile drops into the same packed operands: a block of `A` is a
//! tile of 16 rows `kp` words apart, a panel of `B` 16 columns at a time is a tile of 16 pair
//! rows `width` words apart. The only extra requirement is that `K` comes in whole tiles (16
//! pairs, 32 values); [`super::bf16`] pads its packed blocks with zeros when AMX runs.
//!
//! The microkernel ([`block`]) keeps a 32 x 32 block of `C` in four tiles (`tmm0..tmm3`) and
//! streams two tiles of `A` (`tmm4`, `tmm5`) and two of `B` (`tmm6`, `tmm7`) per 32 values of
//! `K`: four tile products per four tile loads, the blocking Intel's optimisation manual gives
//! for BF16 GEMM. Sums are in f32 in a fixed order (per tile, `K` ascending), so results are
//! deterministic on a given CPU; they differ in the last bits from the AVX512-BF16 kernel,
//! which adds the pairs of a word in another order.
//!
//! The convolutions of [`super::nhwc_amx`] use the same tiles without the GEMM's packing:
//! [`conv_block`] loads its `A` tiles straight from a padded channels-last image (16 output
//! positions a fixed stride apart, 32 input channels) and sums every tap in the tile registers;
//! [`wgrad_block`] loads 16 channels' runs of 32 positions against position pairs of `dY`.
//!
//! Stable Rust has no AMX intrinsics (`x86_amx_intrinsics` is unstable, and so is
//! `is_x86_feature_detected!("amx-bf16")`), so the instructions are inline `asm!` and the
//! detection reads CPUID and XCR0 itself. Linux keeps the 8 KiB tile state off until a process
//! asks for it: [`available`] makes the `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`
//! request once, and answers false if the kernel refuses (then the AVX512-BF16 kernel runs).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

/// Whether this CPU and OS run AMX bf16 tiles (detected once; see the module doc).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(detect)
}

/// Cleared by [`allow`]`(false)`: AMX is then never used, even where [`available`].
static ALLOWED: AtomicBool = AtomicBool::new(true);

/// Allows or forbids the AMX tiles for this process (the binary forbids them for
/// `CONVLAB_AMX=0`, to measure the AVX512-BF16 kernel on the same CPU). Call it before any
/// bf16 product: a packed operand keeps the layout it was packed for.
pub fn allow(allowed: bool) {
    ALLOWED.store(allowed, Ordering::Relaxed);
}

/// Whether [`allow`] left the tiles allowed (the default), whether or not the CPU has them.
pub fn allowed() -> bool {
    ALLOWED.load(Ordering::Relaxed)
}

/// Whether bf16 products run on AMX tiles: [`available`] and not forbidden by [`allow`].
pub fn enabled() -> bool {
    ALLOWED.load(Ordering::Relaxed) && available()
}

/// What the CPU says it has, from `/proc/cpuinfo`'s point of view: the `amx_bf16` and
/// `amx_tile` flags (CPUID leaf 7, EDX bits 22 and 24), whether or not the OS lets us use them.
pub fn cpu_reports_amx() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid_count;
        // Leaf 7 exists when leaf 0 says so.
        if __cpuid_count(0, 0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn detect() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        if !cpu_reports_amx() || !super::bf16::available() {
            return false;
        }
        // The OS must manage the tile state (XCR0 bits 17 XTILECFG and 18 XTILEDATA), which
        // needs XSAVE enabled by the OS (CPUID.1:ECX.OSXSAVE, bit 27) to read XCR0 at all.
        if std::arch::x86_64::__cpuid(1).ecx & (1 << 27) == 0 {
            return false;
        }
        // SAFETY: OSXSAVE is set (checked just above).
        let xcr0 = unsafe { xgetbv0() };
        if xcr0 & (0b11 << 17) != 0b11 << 17 {
            return false;
        }
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) only changes which XSAVE
        // features this process may use; the `syscall` instruction clobbers rcx and r11, which
        // are declared, and touches no memory of ours.
        unsafe {
            std::arch::asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// XCR0, the OS-enabled XSAVE features.
///
/// # Safety
/// The OS has set CR4.OSXSAVE (CPUID.1:ECX bit 27).
#[cfg(target_arch = "x86_64")]
unsafe fn xgetbv0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller checked OSXSAVE, so XGETBV with ecx = 0 does not fault.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Pair words of `K` per tile: a tile row is 64 bytes, 16 words of two bf16.
pub const PAIRS: usize = 16;

/// The 64-byte tile configuration `LDTILECFG` reads: palette 1, every tile 16 rows of 64
/// bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

const CONFIG: Config = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        // colsb (bytes per row) at 16 + 2t as u16, rows at 48 + t.
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    Config(c)
};

/// The tile unit configured on this thread for as long as the value lives; released on drop
/// (so a descheduled thread does not carry 8 KiB of tile state through every context switch).
/// Not `Send`: the configuration belongs to the thread that loaded it. One at a time per
/// thread (the bf16 GEMM holds one per block of work and spawns nothing while it does).
pub struct Tiles(std::marker::PhantomData<*const ()>);

impl Tiles {
    /// # Safety
    /// [`available`] is true.
    #[cfg(target_arch = "x86_64")]
    pub unsafe fn configure() -> Tiles {
        // SAFETY: the CPU has AMX and the process has tile permission (the caller's contract);
        // CONFIG is 64 aligned bytes.
        unsafe {
            std::arch::asm!("ldtilecfg [{0}]", in(reg) CONFIG.0.as_ptr(), options(nostack));
        }
        Tiles(std::marker::PhantomData)
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: a `Tiles` exists only after `configure`, so the CPU has AMX.
        unsafe { std::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

/// Loads tile `$t` from `$p`, rows `$s` bytes apart.
#[cfg(target_arch = "x86_64")]
macro_rules! load {
    ($t:literal, $p:expr, $s:expr) => {
        std::arch::asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"),
            p = in(reg) $p, s = in(reg) $s, options(nostack, readonly))
    };
}

/// Stores tile `$t` to `$p`, rows `$s` bytes apart.
#[cfg(target_arch = "x86_64")]
macro_rules! store {
    ($t:literal, $p:expr, $s:expr) => {
        std::arch::asm!(concat!("tilestored [{p} + {s}*1], tmm", $t),
            p = in(reg) $p, s = in(reg) $s, options(nostack))
    };
}

/// `tmm$c += tmm$a · tmm$b` in bf16 pairs, f32 sums.
#[cfg(target_arch = "x86_64")]
macro_rules! dot {
    ($c:literal, $a:literal, $b:literal) => {
        std::arch::asm!(
            concat!("tdpbf16ps tmm", $c, ", tmm", $a, ", tmm", $b),
            options(nostack, nomem)
        )
    };
}

/// Applies `$m!(tile, row, column)` to each C tile of an `R x V` block (tile `2·row + column`).
#[cfg(target_arch = "x86_64")]
macro_rules! c_tiles {
    ($r:expr, $v:expr, $m:ident) => {{
        $m!(0, 0, 0);
        if $v > 1 {
            $m!(1, 0, 1);
        }
        if $r > 1 {
            $m!(2, 1, 0);
        }
        if $r > 1 && $v > 1 {
            $m!(3, 1, 1);
        }
    }};
}

/// `C[rows, cols] (+)= A · B` for a block of `16·R` rows and `16·V` columns (`R`, `V` in 1..=2)
/// over `kp` pair words (a multiple of [`PAIRS`]): `a` points at the block's first row of
/// packed `A`, rows `kp` words apart; `b` at its first column of a packed `B` panel, pair rows
/// `width` words apart; `c` at the block's first element, rows `c_rs` apart. `add` keeps what
/// `C` holds (else it is overwritten).
///
/// # Safety
/// A [`Tiles`] is live on this thread; `a` holds `16·R` rows of `kp` words, `b` `kp` rows of
/// `width >= 16·V` words; `c` is valid for `rows <= 16·R` rows of `cols <= 16·V` elements.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn block<const R: usize, const V: usize>(
    kp: usize,
    a: *const u32,
    b: *const u32,
    width: usize,
    c: *mut f32,
    c_rs: usize,
    rows: usize,
    cols: usize,
    add: bool,
) {
    debug_assert!(kp.is_multiple_of(PAIRS) && (1..=2).contains(&R) && (1..=2).contains(&V));
    let full = rows == 16 * R && cols == 16 * V;
    // Edge blocks go through a scratch copy of C, one 16 x 16 tile per C tile. Left
    // uninitialised (zeroing its 4 KiB per block was 5% of a resnet18 step): only the rows
    // and columns inside the block are copied back, and what the others hold reaches only them.
    let mut scratch = std::mem::MaybeUninit::<[f32; 4 * 256]>::uninit();
    let scratch = scratch.as_mut_ptr().cast::<f32>();
    let (a_s, b_s, c_s) = (kp * 4, width * 4, c_rs * 4);
    // The part of C tile (ri, vi) inside the block: (rows, columns).
    let part = |ri: usize, vi: usize| {
        (
            rows.saturating_sub(16 * ri).min(16),
            cols.saturating_sub(16 * vi).min(16),
        )
    };
    // SAFETY: for the whole body, the caller's contract bounds every tile load and store of C, A
    // and B below; scratch tiles are 16 rows of 64 bytes, 4 of them.
    unsafe {
        let tile_c = |ri: usize, vi: usize| c.add(16 * ri * c_rs + 16 * vi);
        let tile_s = |ri: usize, vi: usize| scratch.add(256 * (2 * ri + vi));
        // Copies the inside part of each C tile between C and the scratch tiles.
        let copy = |to_scratch: bool| {
            for t in 0..4 {
                let (ri, vi) = (t / 2, t % 2);
                if ri >= R || vi >= V {
                    continue;
                }
                let (pr, pc) = part(ri, vi);
                for r in 0..pr {
                    let (c_row, s_row) = (tile_c(ri, vi).add(r * c_rs), tile_s(ri, vi).add(16 * r));
                    if to_scratch {
                        std::ptr::copy_nonoverlapping(c_row, s_row, pc);
                    } else {
                        std::ptr::copy_nonoverlapping(s_row, c_row, pc);
                    }
                }
            }
        };
        if !full && add {
            copy(true);
        }
        macro_rules! init {
            ($t:literal, $ri:expr, $vi:expr) => {
                if full && add {
                    load!($t, tile_c($ri, $vi), c_s)
                } else if add {
                    load!($t, tile_s($ri, $vi), 64usize)
                } else {
                    std::arch::asm!(concat!("tilezero tmm", $t), options(nostack, nomem))
                }
            };
        }
        c_tiles!(R, V, init);
        for p in (0..kp).step_by(PAIRS) {
            load!(4, a.add(p), a_s);
            load!(6, b.add(p * width), b_s);
            dot!(0, 4, 6);
            if R > 1 {
                load!(5, a.add(16 * kp + p), a_s);
                dot!(2, 5, 6);
            }
            if V > 1 {
                load!(7, b.add(p * width + 16), b_s);
                dot!(1, 4, 7);
                if R > 1 {
                    dot!(3, 5, 7);
                }
            }
        }
        macro_rules! fin {
            ($t:literal, $ri:expr, $vi:expr) => {
                if full {
                    store!($t, tile_c($ri, $vi), c_s)
                } else {
                    store!($t, tile_s($ri, $vi), 64usize)
                }
            };
        }
        c_tiles!(R, V, fin);
        if !full {
            copy(false);
        }
    }
}

/// Zeroes the C tiles of a block of `16·R` rows by `16·V` columns (tile `2·row + column`).
///
/// # Safety
/// A [`Tiles`] is live on this thread.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn zero_c<const R: usize, const V: usize>() {
    macro_rules! zero {
        ($t:literal, $ri:expr, $vi:expr) => {
            std::arch::asm!(concat!("tilezero tmm", $t), options(nostack, nomem))
        };
    }
    // SAFETY: the tiles are configured (the caller's contract); TILEZERO touches no memory.
    unsafe { c_tiles!(R, V, zero) }
}

/// Stores [`zero_c`]'s tiles to `out`: tile `2·ri + vi` at `out + 256·(2·ri + vi)`, rows of
/// 16 floats.
///
/// # Safety
/// A [`Tiles`] is live on this thread; `out` is writable for `256·2·R` floats, 64-byte aligned.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn store_c<const R: usize, const V: usize>(out: *mut f32) {
    macro_rules! put {
        ($t:literal, $ri:expr, $vi:expr) => {
            store!($t, out.add(256 * $t), 64usize)
        };
    }
    // SAFETY: tile `t < 2·R` goes to `out + 256·t`, inside the `256·2·R` floats of `out` (the
    // caller's contract).
    unsafe { c_tiles!(R, V, put) }
}

/// One block of an implicit-GEMM convolution ([`super::nhwc_amx`]): for 32 output positions
/// (two A tiles of 16 rows, `step` words apart) and `16·V` output channels (`V` B tiles),
/// `C = Σ_{(x_off, w_off) ∈ taps} Σ_{p < kp, step 16} A(a + x_off + p) · B(b + (w_off + p)·width)`,
/// stored as f32 tiles to `out`: tile `2·ri + vi` (positions `16·ri..`, channels `16·vi..`) at
/// `out + 256·(2·ri + vi)`, rows of 16 floats. Every row is computed: rows past the caller's
/// positions read whatever lies there and their sums are the caller's to drop (a tile row's
/// sums depend on that row of `A` only).
///
/// # Safety
/// A [`Tiles`] is live on this thread; `kp` is a multiple of [`PAIRS`]; for every tap, `a +
/// x_off + r·step + p` is readable for `r < 32`, `p < kp`, and `b + (w_off + p)·width + j` for
/// `p < kp`, `j < 16·V`; `out` is writable for `256·2·V` floats, 64-byte aligned.
#[cfg(target_arch = "x86_64")]
pub unsafe fn conv_block<const V: usize>(
    a: *const u32,
    step: usize,
    taps: &[(usize, usize)],
    kp: usize,
    b: *const u32,
    width: usize,
    out: *mut f32,
) {
    debug_assert!(kp.is_multiple_of(PAIRS) && (1..=2).contains(&V));
    let (a_s, b_s) = (step * 4, width * 4);
    // SAFETY: for the whole body, the caller's contract bounds every tile load and store.
    unsafe {
        zero_c::<2, V>();
        for &(xo, wo) in taps {
            let (at, bt) = (a.add(xo), b.add(wo * width));
            for p in (0..kp).step_by(PAIRS) {
                load!(4, at.add(p), a_s);
                load!(6, bt.add(p * width), b_s);
                dot!(0, 4, 6);
                load!(5, at.add(16 * step + p), a_s);
                dot!(2, 5, 6);
                if V > 1 {
                    load!(7, bt.add(p * width + 16), b_s);
                    dot!(1, 4, 7);
                    dot!(3, 5, 7);
                }
            }
        }
        store_c::<2, V>(out);
    }
}

/// Runs of 32 bf16 values, the `A` tiles of a [`wgrad_block`]: row `r` of image `n` starts at
/// `ptr + n·img + r·rs` (halves).
#[derive(Clone, Copy, Debug)]
pub struct Runs {
    pub ptr: *const u16,
    pub rs: usize,
    pub img: usize,
}

/// One block of a weight gradient ([`super::nhwc_amx::weight_grad`],
/// [`super::pointwise::weight_grad`]): `C[16·R rows, 16·V] = Σ_{n < images} (Σ_{s < steps}
/// A_n,s · B_n,s + T_n · B_n,steps)` with `A_n,s` `R` tiles of 16 rows of 32 bf16 values at
/// `a.ptr + n·a.img + 32·s` (rows `a.rs` halves apart, the second tile `16·a.rs` after the
/// first), `T_n` the same tiles of `tail` (when given) at `tail.ptr + n·tail.img`, and `B_n,s`
/// `V` tiles of 16 pair rows at `b + n·b_img + 16·s·b_rs` (rows `b_rs` words apart, the second
/// tile 16 words right). With `acc: None`, stored as [`conv_block`] stores (`2·R` tiles); with
/// `acc: Some(rs)`, `C` is added to the block of `out` whose rows are `rs` floats apart (tile
/// `(ri, vi)` at `out + 16·ri·rs + 16·vi`): loaded into the tiles first and stored back, so
/// a gradient summed chunk by chunk needs no copy of the tiles and no add of its own.
///
/// # Safety
/// A [`Tiles`] is live on this thread; every row read is readable (`a.ptr + n·a.img + r·a.rs +
/// 32·s + (0..32)` halves for `r < 16·R`, the same of `tail` at `s = 0`, `b + n·b_img + (16·s +
/// p)·b_rs + (0..16·V)` words for `p < 16`, `s <= steps` with a tail); with `acc: None`,
/// `out` is writable for `256·2·R` floats, 64-byte aligned; with `Some(rs)`, `out + r·rs +
/// (0..16·V)` is readable and writable for `r < 16·R`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn wgrad_block<const R: usize, const V: usize>(
    a: Runs,
    tail: Option<Runs>,
    b: *const u32,
    b_rs: usize,
    b_img: usize,
    images: usize,
    steps: usize,
    out: *mut f32,
    acc: Option<usize>,
) {
    debug_assert!((1..=2).contains(&R) && (1..=2).contains(&V));
    let b_s = b_rs * 4;
    // SAFETY: for the whole body, the caller's contract bounds every tile load and store.
    unsafe {
        // The `A` tiles at `at` (rows `rs` halves apart) against the `B` tiles at `bt`.
        let step = |at: *const u16, rs: usize, bt: *const u32| {
            let a_s = rs * 2;
            load!(4, at, a_s);
            load!(6, bt, b_s);
            dot!(0, 4, 6);
            if R > 1 {
                load!(5, at.add(16 * rs), a_s);
                dot!(2, 5, 6);
            }
            if V > 1 {
                load!(7, bt.add(16), b_s);
                dot!(1, 4, 7);
                if R > 1 {
                    dot!(3, 5, 7);
                }
            }
        };
        let tile = |rs: usize, ri: usize, vi: usize| out.add(16 * ri * rs + 16 * vi);
        match acc {
            Some(rs) => {
                macro_rules! get {
                    ($t:literal, $ri:expr, $vi:expr) => {
                        load!($t, tile(rs, $ri, $vi), rs * 4)
                    };
                }
                c_tiles!(R, V, get);
            }
            None => zero_c::<R, V>(),
        }
        for n in 0..images {
            let (an, bn) = (a.ptr.add(n * a.img), b.add(n * b_img));
            for s in 0..steps {
                step(an.add(32 * s), a.rs, bn.add(16 * s * b_rs));
            }
            if let Some(t) = tail {
                step(t.ptr.add(n * t.img), t.rs, bn.add(16 * steps * b_rs));
            }
        }
        match acc {
            Some(rs) => {
                macro_rules! put {
                    ($t:literal, $ri:expr, $vi:expr) => {
                        store!($t, tile(rs, $ri, $vi), rs * 4)
                    };
                }
                c_tiles!(R, V, put);
            }
            None => store_c::<R, V>(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPU that reports AMX must get it: otherwise the bf16 tests would silently cover the
    /// AVX512-BF16 kernel only.
    #[test]
    fn a_cpu_that_reports_amx_runs_it() {
        if cpu_reports_amx() && super::super::bf16::available() {
            assert!(
                available(),
                "CPUID reports amx_bf16 and amx_tile but the tiles are unusable"
            );
            assert!(enabled());
        } else {
            eprintln!("this CPU has no AMX: the AVX512-BF16 kernel runs");
        }
    }

    /// One tile product against its definition, at the two strides the GEMM uses.
    #[test]
    fn one_tile_product_is_the_definition() {
        if !available() {
            eprintln!("skipped: no AMX on this CPU");
            return;
        }
        let bf = |x: f32| x.to_bits() >> 16;
        let av = |i: usize, k: usize| ((i * 7 + k * 3) % 5) as f32 - 2.0;
        let bv = |k: usize, j: usize| ((k * 5 + j) % 7) as f32 - 3.0;
        let (kp, width) = (32, 48);
        let a: Vec<u32> = (0..32 * kp)
            .map(|w| {
                let (i, p) = (w / kp, w % kp);
                bf(av(i, 2 * p)) | (bf(av(i, 2 * p + 1)) << 16)
            })
            .collect();
        let b: Vec<u32> = (0..kp * width)
            .map(|w| {
                let (p, j) = (w / width, w % width);
                bf(bv(2 * p, j)) | (bf(bv(2 * p + 1, j)) << 16)
            })
            .collect();
        for (rows, cols, add) in [
            (32, 32, false),
            (32, 32, true),
            (17, 20, true),
            (5, 3, false),
        ] {
            let c_rs = 40;
            let mut c = vec![1.5f32; 32 * c_rs];
            // SAFETY: AMX is available; `a` holds 32 rows of kp words, `b` kp rows of width
            // words, `c` 32 rows of c_rs >= 32 elements.
            unsafe {
                let _t = Tiles::configure();
                block::<2, 2>(
                    kp,
                    a.as_ptr(),
                    b.as_ptr(),
                    width,
                    c.as_mut_ptr(),
                    c_rs,
                    rows,
                    cols,
                    add,
                );
            }
            for i in 0..32 {
                for j in 0..c_rs {
                    let inside = i < rows && j < cols;
                    let sum: f32 = (0..2 * kp).map(|k| av(i, k) * bv(k, j)).sum();
                    let want = match (inside, add) {
                        (false, _) => 1.5,
                        (true, false) => sum,
                        (true, true) => sum + 1.5,
                    };
                    assert_eq!(
                        c[i * c_rs + j],
                        want,
                        "{rows}x{cols} add={add} at [{i},{j}]"
                    );
                }
            }
        }
    }
}
