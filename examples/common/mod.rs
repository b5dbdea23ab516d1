//! What the timing examples share: the binary's allocator settings, a thread pool from the
//! first argument, and the fastest of several runs that each start with cold caches.

use std::time::Instant;

/// The binary's allocator settings (`src/main.rs`: freed memory stays on the heap, so outputs
/// do not pay for fresh pages) and a global rayon pool of as many threads as the first
/// argument says (`default` without one); returns that count.
pub fn setup(default: usize) -> usize {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: allocator tuning before any thread starts or any large block is allocated.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
    let threads: usize = std::env::args()
        .nth(1)
        .map_or(default, |t| t.parse().expect("THREADS"));
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .expect("thread pool");
    threads
}

/// Times a call as the fastest of `repeats` runs, a 64 MB buffer written before each so that
/// the inputs come from memory as they do in a training step.
pub struct Fastest {
    repeats: usize,
    flush: Vec<u8>,
}

impl Fastest {
    pub fn new(repeats: usize) -> Self {
        Fastest {
            repeats,
            flush: vec![0u8; 64 << 20],
        }
    }

    /// The fastest run of `f`, in ms.
    pub fn ms(&mut self, f: &mut dyn FnMut()) -> f64 {
        let mut best = f64::MAX;
        for i in 0..self.repeats {
            self.flush
                .iter_mut()
                .for_each(|b| *b = b.wrapping_add(i as u8));
            let t = Instant::now();
            f();
            best = best.min(t.elapsed().as_secs_f64());
        }
        best * 1e3
    }
}
