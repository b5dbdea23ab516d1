//! Times convlab's fully connected layer ([`convlab::kernels::linear`]) at VGG's classifier
//! shapes and small training batches: the forward pass alone (inference, no autodiff) and the
//! forward and backward passes (input, weight and bias gradients). Before each timed run a
//! 64 MB buffer is written, so the weights come from memory as they do in a training step;
//! each number is the fastest of `REPEATS` runs.
//! `cargo run --release --example linear_layers [THREADS]` (default 2).
mod common;

use burn::prelude::*;
use burn::tensor::Distribution;
use convlab::kernels::linear;

const REPEATS: usize = 7;

fn main() {
    let threads = common::setup(2);
    let mut timer = common::Fastest::new(REPEATS);
    let mut fastest = |f: &mut dyn FnMut()| timer.ms(f);
    let device = Device::flex().autodiff();
    println!("{threads} threads, fastest of {REPEATS}, ms");
    println!("| layer | batch | forward | forward + backward |");
    println!("|---|---|---|---|");
    for (name, i, o) in [
        ("fc6", 25088, 4096),
        ("fc7", 4096, 4096),
        ("fc8", 4096, 1000),
    ] {
        let w = Tensor::<2>::random([i, o], Distribution::Normal(0.0, 0.01), &device);
        let b = Tensor::<1>::random([o], Distribution::Normal(0.0, 0.01), &device);
        for n in [8, 16, 32] {
            let x = Tensor::<2>::random([n, i], Distribution::Normal(0.0, 1.0), &device);
            let dy = Tensor::<2>::random([n, o], Distribution::Normal(0.0, 1.0), &device);
            let (xi, wi, bi) = (x.clone().inner(), w.clone().inner(), b.clone().inner());
            let fwd = fastest(&mut || {
                let y = linear(xi.clone(), wi.clone(), Some(bi.clone()));
                std::hint::black_box(y.into_data());
            });
            let both = fastest(&mut || {
                let (x, w, b) = (
                    x.clone().require_grad(),
                    w.clone().require_grad(),
                    b.clone().require_grad(),
                );
                let y = linear(x.clone(), w.clone(), Some(b.clone()));
                let grads = (y * dy.clone()).sum().backward();
                std::hint::black_box((x.grad(&grads), w.grad(&grads), b.grad(&grads)));
            });
            println!("| {name} {i} -> {o} | {n} | {fwd:.1} | {both:.1} |");
        }
    }
}
