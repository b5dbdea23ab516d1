//! Times convlab's convolution kernels on every distinct convolution of a registered model (its
//! layers from the model's own shape trace), with the algorithm the kernel plan picks for each
//! product, after one core's arithmetic peak (f32 FMA on 16 lanes, or 8 without AVX-512, and
//! bf16 `VDPBF16PS` and the AMX tile block where the CPU has them) and, with 2 or more threads,
//! that many cores' at once, and ranks the layers by their share of the time:
//! `cargo run --release --example conv_layers [THREADS] [fp32|bf16] [MODEL] [SIZE] [BATCH]`
//! (defaults: 2 threads, fp32, bench-vgg, 32 px, batch 64). `CONV_LAYERS_ONLY=TEXT` times only
//! the layers whose description (`512->512 4px 3x3/1`) contains `TEXT` (`peaks`: none, the
//! peaks alone); `CONV_LAYERS_REPEAT=
//! fwd|dw|dx` runs only that product of each layer, 30 times and untimed, for `perf record`;
//! `CONV_LAYERS_RUNS=N` times the fastest of `N` calls instead of 5 (a loaded host).
//! In bf16 the kernels read and write bf16 activations, as in training on burn-flex.
use convlab::kernels::Precision;
use convlab::kernels::act::to_bf16;
use convlab::kernels::conv::{
    ConvGeom, conv2d_backward, conv2d_backward_bf16, conv2d_forward, conv2d_forward_bf16,
};
use convlab::kernels::plan::{Cpu, plan};
use convlab::models::{ModelConfig, ModelName};
use std::time::Instant;

/// GFLOP/s of one core running 12 independent accumulator chains of the instruction (enough to
/// hide its latency), operands in registers: the ceiling a GEMM kernel can approach. With
/// `threads > 1`, also of `threads` cores running it at once, against `threads` times one
/// core's: where two vCPUs share a physical core's unit (hyperthread siblings, or a tile unit
/// shared on the host), the kernels on that unit cannot scale with the threads either.
#[cfg(target_arch = "x86_64")]
fn peaks(threads: usize) {
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
    // The same on 8 lanes, for a CPU without AVX-512 (Zen 3): the ceiling of the AVX2 GEMM.
    #[target_feature(enable = "avx2,fma")]
    fn fma256() -> f32 {
        let mut acc = [_mm256_setzero_ps(); 12];
        let (a, b) = (_mm256_set1_ps(1.000_000_1), _mm256_set1_ps(0.999));
        for _ in 0..N {
            for v in acc.iter_mut() {
                *v = _mm256_fmadd_ps(*v, a, b);
            }
        }
        let mut lanes = [0f32; 8];
        let sum = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, &v| _mm256_add_ps(s, v));
        // SAFETY: `lanes` holds the 8 floats the unaligned store writes.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        lanes.iter().sum()
    }
    // `f` on `n` threads at once: the total GFLOP/s.
    let at_once = |f: &(dyn Fn() -> f32 + Sync), flops_per_op: f64, n: usize| {
        let t = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..n {
                s.spawn(|| std::hint::black_box(f()));
            }
        });
        (n * N * 12) as f64 * flops_per_op / t.elapsed().as_secs_f64() / 1e9
    };
    let report = |what: &str, f: &(dyn Fn() -> f32 + Sync), flops_per_op: f64| {
        let one = at_once(f, flops_per_op, 1);
        println!("one core: {what} {one:.0} GFLOP/s");
        if threads > 1 {
            let all = at_once(f, flops_per_op, threads);
            println!(
                "{threads} cores at once: {what} {all:.0} GFLOP/s ({:.2}x one core)",
                all / one
            );
        }
    };
    if !(std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("fma"))
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: AVX2 and FMA were detected just above.
            report("f32 FMA (AVX2)", &|| unsafe { fma256() }, 16.0);
        }
        return;
    }
    // SAFETY: AVX-512 F and FMA were detected above.
    report("f32 FMA", &|| unsafe { fma() }, 32.0);
    if convlab::kernels::bf16::available() {
        // SAFETY: AVX-512 BF16 is reported by `available()`.
        report("bf16 VDPBF16PS", &|| unsafe { dpbf16() }, 64.0);
    }
    if convlab::kernels::amx::enabled() {
        let what = "bf16 AMX 32x32 block, operands in L1";
        let one = amx_block(1);
        println!("one core: {what} {one:.0} GFLOP/s");
        if threads > 1 {
            let all = amx_block(threads);
            println!(
                "{threads} cores at once: {what} {all:.0} GFLOP/s ({:.2}x one core)",
                all / one
            );
        }
    }
}

/// GFLOP/s of the GEMM's AMX microkernel (`amx::block::<2, 2>`) on `threads` cores at once
/// (the total), A (32 rows) and B (32 columns) of 256 pair words each, small enough to stay in
/// L1: the tile loads included, so the ceiling of the AMX path rather than of the instruction
/// alone.
#[cfg(target_arch = "x86_64")]
fn amx_block(threads: usize) -> f64 {
    use convlab::kernels::amx::{Tiles, block};
    const KP: usize = 256;
    const CALLS: usize = 200_000;
    let start = std::sync::Barrier::new(threads);
    let seconds = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let a = vec![0x3f80_3f80u32; 32 * KP];
                    let b = vec![0x3f80_3f80u32; KP * 32];
                    let mut c = vec![0f32; 32 * 32];
                    // SAFETY: `amx::enabled()` was checked by the caller (the permission is
                    // the process's, the tile configuration this thread's own); `a` holds 32
                    // rows of KP words, `b` KP rows of 32 words, `c` 32 rows of 32 elements.
                    let mut run = |calls: usize| unsafe {
                        let _tiles = Tiles::configure();
                        for _ in 0..calls {
                            block::<2, 2>(
                                KP,
                                a.as_ptr(),
                                b.as_ptr(),
                                32,
                                c.as_mut_ptr(),
                                32,
                                32,
                                32,
                                false,
                            );
                        }
                    };
                    run(CALLS / 10);
                    // Every thread warmed up before any clock starts.
                    start.wait();
                    let t = Instant::now();
                    run(CALLS);
                    let seconds = t.elapsed().as_secs_f64();
                    std::hint::black_box(&c);
                    seconds
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap())
            .fold(0f64, f64::max)
    });
    // 32 x 32 outputs, 2 KP values of K each, a multiply and an add, on each thread.
    (threads * CALLS * 32 * 32 * 2 * KP * 2) as f64 / seconds / 1e9
}

/// A distinct convolution of the network and how many times it occurs.
struct Layer {
    geom: ConvGeom,
    count: usize,
    first: String,
}

/// The network's convolutions from its own shape trace (`Model::trace`), identical geometries
/// merged; only those convlab's kernels run (no groups or dilation, symmetric padding).
fn layers(net: &str, size: usize, batch: usize, precision: Precision) -> Vec<Layer> {
    let name = ModelName::from_name(net).unwrap();
    let mut cfg = ModelConfig::for_model(name, 10, 3);
    cfg.input_size = size;
    let model = cfg.build(&burn::prelude::Device::flex()).unwrap();
    let mut out: Vec<Layer> = Vec::new();
    for c in model.trace([3, size, size]).convs() {
        let Some(geom) = convlab::layers::kernel_geometry(c, batch, precision) else {
            continue;
        };
        match out.iter_mut().find(|x| x.geom == geom) {
            Some(x) => x.count += 1,
            None => out.push(Layer {
                geom,
                count: 1,
                first: c.name.clone(),
            }),
        }
    }
    out
}

fn main() {
    // The binary's allocator settings (`src/main.rs`): freed blocks stay on the heap, so a
    // layer's fresh output is not page-faulted in from the kernel on every call, which made
    // up a fifth of the samples of some layers here and is not what `convlab` pays.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: allocator tuning before any thread starts or any large block is allocated.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().map_or(2, |s| s.parse().unwrap());
    let precision: Precision = args
        .next()
        .map_or(Ok(Default::default()), |s| s.parse())
        .unwrap();
    let net = args.next().unwrap_or_else(|| "bench-vgg".into());
    let size: usize = args.next().map_or(32, |s| s.parse().unwrap());
    let batch: usize = args.next().map_or(64, |s| s.parse().unwrap());
    let amx = convlab::kernels::parse_amx(std::env::var("CONVLAB_AMX").ok().as_deref()).unwrap();
    convlab::kernels::amx::allow(amx);
    // This example calls the bf16 kernels itself, wherever the CPU has them (even where a run
    // would compute in f32 instead), so its header names the unit they ran on.
    convlab::kernels::bf16::select_policy(convlab::kernels::bf16::Policy::On);
    let only = std::env::var("CONV_LAYERS_ONLY").ok();
    let repeat = std::env::var("CONV_LAYERS_REPEAT").ok();
    if let Some(other) = repeat
        .as_deref()
        .filter(|r| !["fwd", "dw", "dx"].contains(r))
    {
        eprintln!("CONV_LAYERS_REPEAT={other}: expected fwd, dw or dx");
        std::process::exit(2);
    }
    #[cfg(target_arch = "x86_64")]
    peaks(threads);
    if only.as_deref() == Some("peaks") {
        return;
    }
    println!(
        "{net} at {size} px, batch {batch}, {threads} threads, {precision} on {}; times are per layer",
        convlab::kernels::matrix_unit(precision)
    );
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    let (mut tf, mut tb, mut fl) = (0.0, 0.0, 0.0);
    let cpu = Cpu::detect();
    let mut rows = Vec::new();
    for Layer {
        geom: g,
        count,
        first,
    } in layers(&net, size, batch, precision)
    {
        let (cin, cout, hw, kernel, stride) = (g.cin, g.cout, g.h, g.kh, g.stride[0]);
        let name = format!("{cin}->{cout} {hw}px {kernel}x{kernel}/{stride}");
        if only.as_deref().is_some_and(|o| !name.contains(o)) {
            continue;
        }
        let p = plan(&g, cpu);
        let runs: usize = std::env::var("CONV_LAYERS_RUNS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(5);
        let x = vec![0.5f32; batch * cin * hw * hw];
        let w = vec![0.01f32; cout * g.k()];
        let flops = 2.0 * (batch * cout * g.k() * g.p()) as f64;
        let y = conv2d_forward(&x, &w, None, &g);
        // Seconds per call, the fastest of `runs` (5, or `CONV_LAYERS_RUNS`).
        // The fastest of several runs: on a VM whose neighbours take 10-40% of the CPU at times, the
        // minimum is the steadiest estimate of what the kernel itself costs.
        let time = |f: &dyn Fn()| {
            (0..runs)
                .map(|_| {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min)
        };
        // In bf16 on the activations training keeps between layers (bf16 in, bf16 out), as
        // burn-flex calls the kernels.
        let bf16_act = precision == Precision::Bf16;
        let (xb, yb) = if bf16_act {
            (to_bf16(&x), to_bf16(&y))
        } else {
            (Vec::new(), Vec::new())
        };
        let forward_once = || {
            if bf16_act {
                drop(std::hint::black_box(conv2d_forward_bf16(
                    &xb, &w, None, &g, false,
                )));
            } else {
                drop(std::hint::black_box(conv2d_forward(&x, &w, None, &g)));
            }
        };
        let backward_once = |need: [bool; 3]| {
            if bf16_act {
                drop(std::hint::black_box(conv2d_backward_bf16(
                    &xb, &w, &yb, &g, need,
                )));
            } else {
                drop(std::hint::black_box(conv2d_backward(&x, &w, &y, &g, need)));
            }
        };
        let backward = |need: [bool; 3]| time(&|| backward_once(need));
        if let Some(part) = repeat.as_deref() {
            for _ in 0..30 {
                match part {
                    "fwd" => forward_once(),
                    "dw" => backward_once([false, true, false]),
                    "dx" => backward_once([true, false, false]),
                    _ => unreachable!("checked at start"),
                }
            }
            continue;
        }
        let f = time(&forward_once);
        let b = backward([cin != 3, true, false]);
        let bfl = if cin == 3 { flops } else { 2.0 * flops };
        let bw = backward([false, true, false]);
        let bx = backward([true, false, false]);
        println!(
            "{cin:>4}->{cout:<4} {hw:>3}px {kernel}x{kernel}/{stride} x{count:<2} fwd {:7.1} ms {:5.1} GF/s  bwd {:7.1} ms {:5.1} GF/s  (dW {:7.1} ms, dx {:7.1} ms)  {}/{}/{}  {first}",
            f * 1e3,
            flops / f / 1e9,
            b * 1e3,
            bfl / b / 1e9,
            bw * 1e3,
            bx * 1e3,
            p.forward.as_str(),
            p.input_grad.as_str(),
            p.weight_grad.as_str(),
        );
        let n = count as f64;
        tf += f * n;
        tb += b * n;
        fl += (flops + bfl) * n;
        rows.push((name, (f + b) * n));
    }
    if let (Some(o), true) = (only.as_deref(), rows.is_empty() && repeat.is_none()) {
        eprintln!("CONV_LAYERS_ONLY={o}: no convolution of {net} at {size} px matches");
        std::process::exit(2);
    }
    if repeat.is_some() {
        return;
    }
    let total = tf + tb;
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("largest shares of the convolution time (forward + backward, all occurrences):");
    for (name, t) in rows.iter().take(8) {
        println!(
            "  {name:<28} {:5.1}%  {:7.1} ms",
            100.0 * t / total,
            t * 1e3
        );
    }
    println!(
        "total fwd {:.1} ms, bwd {:.1} ms, {:.1} GF/s",
        tf * 1e3,
        tb * 1e3,
        fl / (tf + tb) / 1e9
    );
}
