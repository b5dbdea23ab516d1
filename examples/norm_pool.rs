//! Times the memory-bound training kernels around the convolutions at photo sizes: batch norm's
//! training forward and backward passes (channel by channel, and the forward as the separate
//! statistics and output passes for comparison) and ResNet's 3x3/2 stem max pool with its
//! winners' offsets. Before each timed run a 64 MB buffer is written, so the inputs come from
//! memory as they do in a training step; each number is the fastest of `REPEATS` runs.
//! `cargo run --release --example norm_pool [THREADS]` (default 2).
mod common;

use convlab::kernels::norm::{NormGeom, affine, backward, batch_stats, scale_shift, train_forward};
use convlab::kernels::pool::{PoolGeom, max_pool_forward};

const REPEATS: usize = 15;

fn main() {
    let threads = common::setup(2);
    let mut timer = common::Fastest::new(REPEATS);
    let mut fastest = |f: &mut dyn FnMut()| timer.ms(f);
    println!("{threads} threads, fastest of {REPEATS}, ms");
    // (batch, channels, side): resnet18 at 128 px (stem, 32 px, 16 px, 8 px), resnet50 at
    // 224 px (56 px, 256 channels; the 112 px stem).
    for (batch, channels, side) in [
        (32, 64, 64),
        (32, 64, 32),
        (32, 128, 16),
        (32, 256, 8),
        (16, 256, 56),
        (16, 64, 112),
    ] {
        let g = NormGeom {
            batch,
            channels,
            positions: side * side,
        };
        let n = batch * channels * side * side;
        let x: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 * 0.01).collect();
        let dy: Vec<f32> = (0..n)
            .map(|i| ((i * 31) % 1013) as f32 * 0.01 - 5.0)
            .collect();
        let (gamma, beta) = (vec![1.0f32; channels], vec![0.1f32; channels]);
        let (mean, var) = batch_stats(&x, &g);
        let fused = fastest(&mut || {
            std::hint::black_box(train_forward(&x, &gamma, &beta, 1e-5, true, &g));
        });
        let separate = fastest(&mut || {
            let (m, v) = batch_stats(&x, &g);
            let (a, b) = affine(&gamma, &beta, &m, &v, 1e-5);
            std::hint::black_box(scale_shift(&x, &a, &b, true, &g));
        });
        let back = fastest(&mut || {
            std::hint::black_box(backward(
                &x, &dy, &gamma, &beta, &mean, &var, 1e-5, true, &g,
            ));
        });
        println!(
            "batch norm {batch} x {channels} x {side} x {side}: forward {fused:.2} \
             (separate passes {separate:.2}), backward {back:.2}"
        );
    }
    for (batch, side) in [(32, 64), (16, 112)] {
        let g = PoolGeom::new(batch * 64, [side, side], [3, 3], [2, 2], [1, 1], false);
        let x: Vec<f32> = (0..batch * 64 * side * side)
            .map(|i| ((i * 7919) % 1013) as f32)
            .collect();
        let t = fastest(&mut || {
            std::hint::black_box(max_pool_forward(&x, &g, true));
        });
        println!("max pool 3x3/2 {batch} x 64 x {side} x {side}, with offsets: {t:.2}");
    }
}
