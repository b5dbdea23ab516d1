//! Times convlab's im2col + GEMM convolution kernels on the layers of `bench-vgg` (batch 64):
//! `cargo run --release --example conv_layers [THREADS] [fp32|bf16]`.
use convlab::kernels::conv::{ConvGeom, conv2d_backward, conv2d_forward};
use std::time::Instant;

fn main() {
    let threads: usize = std::env::args().nth(1).map_or(2, |s| s.parse().unwrap());
    let precision: convlab::kernels::Precision = std::env::args()
        .nth(2)
        .map_or(Ok(Default::default()), |s| s.parse())
        .unwrap();
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
