//! Times convlab's convolution kernels on the layers of `bench-vgg` (batch 64), after one
//! core's arithmetic peak (f32 FMA, and bf16 `VDPBF16PS` where the CPU has it):
//! `cargo run --release --example conv_layers [THREADS] [fp32|bf16]`.
use convlab::kernels::conv::{ConvGeom, conv2d_backward, conv2d_forward};
use std::time::Instant;

/// GFLOP/s of one core running 12 independent accumulator chains of the instruction (enough to
/// hide its latency), operands in registers: the ceiling a GEMM kernel can approach.
#[cfg(target_arch = "x86_64")]
fn peaks() {
    use std::arch::x86_64::*;
    const N: usize = 50_000_000;
    #[target_feature(enable = "avx512f,fma")]
    fn fma() -> f32 {
        let mut acc = [_mm512_setzero_ps(); 12];
        let (a, b) = (_mm512_set1_ps(1.000_000_1), _mm512_set1_ps(0.999));
        for _ in 0..N {
            for v in acc.iter_mut() {
                *v = _mm512_fmadd_ps(*v, a, b);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn dpbf16() -> f32 {
        let mut acc = [_mm512_setzero_ps(); 12];
        // SAFETY: same-size bit casts of plain vectors.
        let (a, b): (__m512bh, __m512bh) = unsafe {
            (
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3f80_3f80)),
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x0001_0001)),
            )
        };
        for _ in 0..N {
            for v in acc.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        acc.iter().map(|&v| _mm512_reduce_add_ps(v)).sum()
    }
    if !(std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("fma"))
    {
        return;
    }
    let time = |f: &dyn Fn() -> f32, flops_per_op: f64| {
        let t = Instant::now();
        std::hint::black_box(f());
        (N * 12) as f64 * flops_per_op / t.elapsed().as_secs_f64() / 1e9
    };
    // SAFETY: AVX-512 F and FMA were detected above, BF16 by `available()` before its use.
    println!(
        "one core: f32 FMA {:.0} GFLOP/s",
        time(&|| unsafe { fma() }, 32.0)
    );
    if convlab::kernels::bf16::available() {
        println!(
            "one core: bf16 VDPBF16PS {:.0} GFLOP/s",
            time(&|| unsafe { dpbf16() }, 64.0)
        );
    }
}

fn main() {
    let threads: usize = std::env::args().nth(1).map_or(2, |s| s.parse().unwrap());
    let precision: convlab::kernels::Precision = std::env::args()
        .nth(2)
        .map_or(Ok(Default::default()), |s| s.parse())
        .unwrap();
    #[cfg(target_arch = "x86_64")]
    peaks();
    println!("{threads} threads, {precision}");
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let layers = [
        (3, 64, 32),
        (64, 64, 32),
        (64, 128, 16),
        (128, 128, 16),
        (128, 256, 8),
        (256, 256, 8),
    ];
    let (mut tf, mut tb, mut fl) = (0.0, 0.0, 0.0);
    for (cin, cout, hw) in layers {
        let g = ConvGeom {
            batch: 64,
            cin,
            h: hw,
            w: hw,
            cout,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            pad: [1, 1],
            precision,
        };
        let x = vec![0.5f32; 64 * cin * hw * hw];
        let w = vec![0.01f32; cout * cin * 9];
        let flops = 2.0 * (64 * cout * g.k() * g.p()) as f64;
        let y = conv2d_forward(&x, &w, None, &g);
        let reps = 5;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(conv2d_forward(&x, &w, None, &g));
        }
        let f = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(conv2d_backward(&x, &w, &y, &g, [cin != 3, true, false]));
        }
        let b = t.elapsed().as_secs_f64() / reps as f64;
        let bfl = if cin == 3 { flops } else { 2.0 * flops };
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(conv2d_backward(&x, &w, &y, &g, [false, true, false]));
        }
        let bw = t.elapsed().as_secs_f64() / reps as f64;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(conv2d_backward(&x, &w, &y, &g, [true, false, false]));
        }
        let bx = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "   dW only {:6.1} ms, dx only {:6.1} ms",
            bw * 1e3,
            bx * 1e3
        );
        println!(
            "{cin:>3}->{cout:<3} {hw:>2}px  fwd {:6.1} ms {:5.1} GF/s   bwd {:6.1} ms {:5.1} GF/s",
            f * 1e3,
            flops / f / 1e9,
            b * 1e3,
            bfl / b / 1e9
        );
        tf += f;
        tb += b;
        fl += flops + bfl;
    }
    println!(
        "total fwd {:.1} ms, bwd {:.1} ms, {:.1} GF/s",
        tf * 1e3,
        tb * 1e3,
        fl / (tf + tb) / 1e9
    );
}
