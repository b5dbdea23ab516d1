//! What the start of an operand buffer costs the AMX tiles: the channels-last 3x3 block
//! (`convlab::kernels::amx::conv_block`, every tap and input channel of 32 positions by 32 output
//! channels summed in the tile registers) over one padded image and a layer's packed weights,
//! with both buffers starting on a 64-byte line and then 16 bytes past one (where `malloc`
//! leaves a `Vec`): a tile row of 64 bytes then straddles two lines.
//! `cargo run --release --example amx_alignment` (one thread; best of 5 per layer and start).
#[cfg(target_arch = "x86_64")]
fn main() {
    use convlab::kernels::amx;
    use std::time::Instant;
    if !amx::available() {
        println!("no AMX on this CPU: nothing to measure");
        return;
    }
    #[repr(C, align(64))]
    struct Out([f32; 1024]);
    // (C_in, side, C_out) of resnet18's stride-1 3x3 layers at 224 px.
    for (cin, side, cout) in [(64, 56, 64), (128, 28, 128), (256, 14, 256), (512, 7, 512)] {
        let kp = cin / 2;
        let wp = side + 2;
        let taps: Vec<(usize, usize)> = (0..3)
            .flat_map(|i| (0..3).map(move |j| ((i * wp + j) * kp, (i * 3 + j) * kp)))
            .collect();
        let len = (side - 1) * wp + side;
        let img = vec![0x3f80_3f80u32; (wp * wp + 64) * kp + 64];
        let w = vec![0x3c00_3c00u32; cout * 9 * kp + 64];
        let mut out = Out([0.0; 1024]);
        let mut line = [0.0f64; 2];
        for (k, shift) in [0usize, 4].into_iter().enumerate() {
            // Words to the first line boundary, plus `shift` words (16 bytes).
            let start = |v: &[u32]| v.as_ptr().align_offset(64) + shift;
            let (x, wq) = (&img[start(&img)..], &w[start(&w)..]);
            let reps = 20;
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let t = Instant::now();
                // SAFETY: AMX is available (checked above); every tile row read lies inside
                // `img` (the last block's 32 positions plus the last tap end within `(wp·wp +
                // 64)·kp` words) and `w` (block `o0`'s taps·kp rows of 32 words); `out` holds
                // four aligned tiles.
                unsafe {
                    let _tiles = amx::Tiles::configure();
                    for _ in 0..reps {
                        for o0 in (0..cout).step_by(32) {
                            let b = wq.as_ptr().add(o0 * 9 * kp);
                            for v0 in (0..len).step_by(32) {
                                let a = x.as_ptr().add(v0 * kp);
                                amx::conv_block::<2>(a, kp, &taps, kp, b, 32, out.0.as_mut_ptr());
                            }
                        }
                    }
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            std::hint::black_box(&out);
            let flops = 2.0 * (reps * cout * 9 * cin * len.next_multiple_of(32)) as f64;
            line[k] = flops / best / 1e9;
        }
        println!(
            "{cin} -> {cout} at {side} px: on a line {:.0} GFLOP/s, 16 bytes past one {:.0} GFLOP/s",
            line[0], line[1]
        );
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    println!("AMX is an x86-64 unit: nothing to measure");
}
