//! Times convlab's convolution kernels on the layers of `bench-vgg` or `resnet18_small` (batch
//! 64), after one core's arithmetic peak (f32 FMA, and bf16 `VDPBF16PS` where the CPU has it):
//! `cargo run --release --example conv_layers [THREADS] [fp32|bf16] [bench-vgg|resnet18_small]`.
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

/// `(C_in, C_out, input px, kernel, stride, how many such layers)` of a network's convolutions.
type Layer = (usize, usize, usize, usize, usize, usize);

fn layers(net: &str) -> Vec<Layer> {
    match net {
        "bench-vgg" => vec![
            (3, 64, 32, 3, 1, 1),
            (64, 64, 32, 3, 1, 1),
            (64, 128, 16, 3, 1, 1),
            (128, 128, 16, 3, 1, 1),
            (128, 256, 8, 3, 1, 1),
            (256, 256, 8, 3, 1, 1),
        ],
        // The CIFAR stem, four stages of two basic blocks (16-32-64-128 channels), and the
        // 1x1 stride-2 shortcuts.
        "resnet18_small" => vec![
            (3, 16, 32, 3, 1, 1),
            (16, 16, 32, 3, 1, 4),
            (16, 32, 32, 3, 2, 1),
            (16, 32, 32, 1, 2, 1),
            (32, 32, 16, 3, 1, 3),
            (32, 64, 16, 3, 2, 1),
            (32, 64, 16, 1, 2, 1),
            (64, 64, 8, 3, 1, 3),
            (64, 128, 8, 3, 2, 1),
            (64, 128, 8, 1, 2, 1),
            (128, 128, 4, 3, 1, 3),
        ],
        other => panic!("unknown net `{other}`: bench-vgg or resnet18_small"),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().map_or(2, |s| s.parse().unwrap());
    let precision: convlab::kernels::Precision = args
        .next()
        .map_or(Ok(Default::default()), |s| s.parse())
        .unwrap();
    let net = args.next().unwrap_or_else(|| "bench-vgg".into());
    #[cfg(target_arch = "x86_64")]
    peaks();
    println!("{net}, batch 64, {threads} threads, {precision}; times are per layer");
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let (mut tf, mut tb, mut fl) = (0.0, 0.0, 0.0);
    for (cin, cout, hw, kernel, stride, count) in layers(&net) {
        let pad = kernel / 2;
        let g = ConvGeom {
            batch: 64,
            cin,
            h: hw,
            w: hw,
            cout,
            kh: kernel,
            kw: kernel,
            stride: [stride, stride],
            pad: [pad, pad],
            precision,
        };
        let x = vec![0.5f32; 64 * cin * hw * hw];
        let w = vec![0.01f32; cout * g.k()];
        let flops = 2.0 * (64 * cout * g.k() * g.p()) as f64;
        let y = conv2d_forward(&x, &w, None, &g);
        // Seconds per call, the mean of 5.
        let time = |f: &dyn Fn()| {
            let t = Instant::now();
            for _ in 0..5 {
                f();
            }
            t.elapsed().as_secs_f64() / 5.0
        };
        let backward = |need: [bool; 3]| {
            time(&|| {
                std::hint::black_box(conv2d_backward(&x, &w, &y, &g, need));
            })
        };
        let f = time(&|| {
            std::hint::black_box(conv2d_forward(&x, &w, None, &g));
        });
        let b = backward([cin != 3, true, false]);
        let bfl = if cin == 3 { flops } else { 2.0 * flops };
        let bw = backward([false, true, false]);
        let bx = backward([true, false, false]);
        println!(
            "{cin:>3}->{cout:<3} {hw:>2}px {kernel}x{kernel}/{stride} x{count}  fwd {:6.1} ms {:5.1} GF/s   bwd {:6.1} ms {:5.1} GF/s   (dW only {:6.1} ms, dx only {:6.1} ms)",
            f * 1e3,
            flops / f / 1e9,
            b * 1e3,
            bfl / b / 1e9,
            bw * 1e3,
            bx * 1e3
        );
        let n = count as f64;
        tf += f * n;
        tb += b * n;
        fl += (flops + bfl) * n;
    }
    println!(
        "total fwd {:.1} ms, bwd {:.1} ms, {:.1} GF/s",
        tf * 1e3,
        tb * 1e3,
        fl / (tf + tb) / 1e9
    );
}
