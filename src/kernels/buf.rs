//! Output buffers zeroed by the workers that fill them.
//!
//! `vec![0.0; n]` zeroes a whole activation on the calling thread before a parallel kernel
//! overwrites it. The binary keeps freed memory on its heap (`mallopt`, `src/main.rs`), so
//! calloc cannot hand out fresh zero pages and really runs `memset`: 45% of the main thread's
//! samples in a resnet18_small training step (`perf record -s`, 2026-12-01), while both rayon
//! workers waited for it. Here each chunk is zeroed by the worker that then writes it, whole
//! ([`par_zeroed`]) or part by part as the kernel takes the parts ([`par_lazy`]).

use super::act::Act;
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// A buffer that starts on a cache line, for the operands the AMX tiles load. A tile row is 64
/// bytes; where the buffer starts 16 bytes into a line (what `malloc` gives a `Vec`), every
/// row straddles two lines, and the channels-last 3x3 block ran at 0.75-0.8 against 1.9-2.0
/// TFLOP/s on one core (resnet18's 64-, 128- and 256-channel layers; `cargo run --release
/// --example amx_alignment`, Xeon with AMX, 2026-12-05).
///
/// A plain `Vec` one line longer, the values starting at its first line boundary. An
/// over-aligned allocation (`aligned-vec`'s `AVec`, which this replaced; glibc's `memalign`
/// underneath) raised the peak memory of a resnet18 bf16 step at 224 px from 527 to 611-624
/// MB; with this one it is 576 MB.
#[derive(Debug, Default)]
pub struct Lines<T> {
    buf: Vec<T>,
    off: usize,
    len: usize,
}

/// Bytes of a cache line.
const LINE: usize = 64;

/// Values of `T` in one line: the slack a [`Lines`] buffer carries.
fn slack<T>() -> usize {
    LINE / std::mem::size_of::<T>().clamp(1, LINE)
}

impl<T: Copy + bytemuck::Zeroable> Lines<T> {
    /// `buf` holding the values from its first line boundary on, `len` of them.
    fn around(buf: Vec<T>, len: usize) -> Self {
        let off = buf.as_ptr().align_offset(LINE);
        assert!(
            off + len <= buf.len(),
            "Lines: {off} + {len} > {}",
            buf.len()
        );
        Lines { buf, off, len }
    }

    /// `n` zeros.
    pub fn zeroed(n: usize) -> Self {
        Self::around(vec![T::zeroed(); n + slack::<T>()], n)
    }

    /// Grown or shrunk to `n` values, new ones `value` (what it held before stays).
    pub fn resize(&mut self, n: usize, value: T) {
        if n <= self.len || self.off + n <= self.buf.len() {
            let end = self.off + n;
            if n > self.len {
                self.buf[self.off + self.len..end].fill(value);
            }
            self.len = n;
            return;
        }
        let mut grown = Self::around(vec![value; n + slack::<T>()], n);
        grown[..self.len].copy_from_slice(self);
        *self = grown;
    }
}

/// A copy on a line of its own (a derived clone would keep the offset of the original's
/// allocation in another one).
impl<T: Copy + bytemuck::Zeroable> Clone for Lines<T> {
    fn clone(&self) -> Self {
        let mut out = Self::zeroed(self.len);
        out.copy_from_slice(self);
        out
    }
}

impl<T: PartialEq> PartialEq for Lines<T> {
    fn eq(&self, other: &Self) -> bool {
        self[..] == other[..]
    }
}

impl<T> std::ops::Deref for Lines<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.off..self.off + self.len]
    }
}

impl<T> std::ops::DerefMut for Lines<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.off..self.off + self.len]
    }
}

/// `n` values in chunks of `chunk` (the last one shorter), chunk `i` zeroed and then passed
/// to `f` together with item `i` of `inputs`, on the worker that runs it; `init` makes each
/// worker's scratch state, as in rayon's `for_each_init`.
///
/// # Panics
/// If `inputs` does not have exactly one item per chunk.
pub fn par_zeroed_with<E, I, S, Init, F>(
    n: usize,
    chunk: usize,
    inputs: I,
    init: Init,
    f: F,
) -> Vec<E>
where
    E: Act,
    I: IndexedParallelIterator,
    Init: Fn() -> S + Sync + Send,
    F: Fn(&mut S, &mut [E], I::Item) + Sync + Send,
{
    par_lazy_with(n, chunk, inputs, init, |state, c, item| {
        let whole = c.take(c.rest.len());
        f(state, whole, item)
    })
}

/// [`par_zeroed_with`] without per-worker state.
pub fn par_zeroed<E, I, F>(n: usize, chunk: usize, inputs: I, f: F) -> Vec<E>
where
    E: Act,
    I: IndexedParallelIterator,
    F: Fn(&mut [E], I::Item) + Sync + Send,
{
    par_zeroed_with(n, chunk, inputs, || (), |_, c, item| f(c, item))
}

/// Consecutive parts of `lens[i]` values each, part `i` zeroed and then passed to `f(i, part)`
/// on the worker that runs it (as [`par_zeroed`], for parts of different lengths).
pub fn par_zeroed_parts<F>(lens: &[usize], f: F) -> Vec<f32>
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    let fill = |i: usize, c: &mut [MaybeUninit<f32>], _: &mut ()| {
        c.fill(MaybeUninit::new(0.0));
        // SAFETY: every element of `c` was just written, and `MaybeUninit<f32>` has the
        // layout of `f32`.
        let c = unsafe { std::slice::from_raw_parts_mut(c.as_mut_ptr().cast::<f32>(), c.len()) };
        f(i, c);
    };
    // SAFETY: `fill` writes every value of its part before `f` sees it.
    unsafe { par_parts_uninit(lens, || (), fill) }
}

/// Consecutive parts of `lens[i]` values each, part `i` handed uninitialised to `f(i, part,
/// state)` on the worker that runs it (`init` making each worker's state), for a kernel that
/// writes every value itself: no zero fill first.
///
/// # Safety
/// `f` writes every value of the part it is given.
pub unsafe fn par_parts_uninit<E, S, Init, F>(lens: &[usize], init: Init, f: F) -> Vec<E>
where
    E: Send,
    Init: Fn() -> S + Sync + Send,
    F: Fn(usize, &mut [MaybeUninit<E>], &mut S) + Sync + Send,
{
    let n: usize = lens.iter().sum();
    let mut out: Vec<E> = Vec::with_capacity(n);
    let mut rest = &mut out.spare_capacity_mut()[..n];
    let mut parts = Vec::with_capacity(lens.len());
    for &len in lens {
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(len);
        parts.push(head);
        rest = tail;
    }
    parts
        .into_par_iter()
        .enumerate()
        .for_each_init(init, |state, (i, part)| f(i, part, state));
    // SAFETY: the parts cover all `n` values (their lengths sum to `n`) and `f` wrote each
    // (the caller's contract); a panic in `f` propagates before this.
    unsafe { out.set_len(n) };
    out
}

/// `f` on `n` values of a scratch buffer that the calling thread keeps between calls, for a
/// kernel that writes every value before it reads it: zeroed only where the buffer grows, where
/// a fresh `vec![0.0; n]` zeroes it all on the calling thread while the workers wait. For
/// Winograd's transformed input and output of one photo ([`super::winograd`]'s `forward_few`):
/// 3.6 MB for resnet18's 64-channel layers at 224 px, zeroed on every call, 3-4% of the samples
/// of `convlab bench infer --batch 1` (`perf record`, 2026-12-07); and for the columns of one
/// band of a photo ([`super::im2col`]'s `forward_few`). Kept until the thread ends: at most the
/// largest `n` asked on it.
///
/// A call from inside `f` (a worker that took another job while it waited) gets a buffer of
/// its own.
pub fn with_scratch<R>(n: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static KEPT: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut buf = KEPT.take();
    if buf.len() < n {
        buf.resize(n, 0.0);
    }
    // A value the kernel read before writing it makes its tests' outputs NaN, however the
    // buffer was last left.
    #[cfg(test)]
    buf[..n].fill(f32::NAN);
    let out = f(&mut buf[..n]);
    KEPT.set(buf);
    out
}

/// One chunk of an output handed to the kernel that fills it: [`Lazy::take`] gives its parts in
/// order, each zeroed just before the kernel writes it, and what the kernel did not take is
/// zeroed when it returns. A whole-chunk `memset` ahead of the kernel (what [`par_zeroed`]
/// does) writes every byte twice; for a chunk larger than the L2 cache (a batch norm's image,
/// 3.2 MB for resnet18's stem at 224 px; Winograd's half batch) the zeros go out to memory
/// before the values do. A part zeroed just before it is written is still in L1.
pub struct Lazy<'a, E = f32> {
    rest: &'a mut [MaybeUninit<E>],
}

impl<'a, E: Act> Lazy<'a, E> {
    /// The next `len` values, zeroed.
    ///
    /// # Panics
    /// If fewer than `len` values are left.
    pub fn take(&mut self, len: usize) -> &'a mut [E] {
        assert!(
            len <= self.rest.len(),
            "Lazy::take: {len} values asked, {} left",
            self.rest.len()
        );
        let (head, tail) = std::mem::take(&mut self.rest).split_at_mut(len);
        self.rest = tail;
        head.fill(MaybeUninit::new(E::ZERO));
        // SAFETY: every element of `head` was just written, and `MaybeUninit<E>` has the
        // layout of `E`.
        unsafe { std::slice::from_raw_parts_mut(head.as_mut_ptr().cast::<E>(), head.len()) }
    }
}

/// As [`par_zeroed`], with each chunk zeroed part by part as `f` takes it ([`Lazy`]).
///
/// # Panics
/// If `inputs` does not have exactly one item per chunk.
pub fn par_lazy<E, I, F>(n: usize, chunk: usize, inputs: I, f: F) -> Vec<E>
where
    E: Act,
    I: IndexedParallelIterator,
    F: Fn(&mut Lazy<'_, E>, I::Item) + Sync + Send,
{
    par_lazy_with(n, chunk, inputs, || (), |_, c, item| f(c, item))
}

/// The one loop under [`par_zeroed_with`] and [`par_lazy`]: chunk `i` of `n` values handed
/// to `f` as a [`Lazy`] with item `i` of `inputs`, `init` making each worker's state.
fn par_lazy_with<E, I, S, Init, F>(n: usize, chunk: usize, inputs: I, init: Init, f: F) -> Vec<E>
where
    E: Act,
    I: IndexedParallelIterator,
    Init: Fn() -> S + Sync + Send,
    F: Fn(&mut S, &mut Lazy<'_, E>, I::Item) + Sync + Send,
{
    let mut out: Vec<E> = Vec::with_capacity(n);
    fill_lazy(&mut out.spare_capacity_mut()[..n], chunk, inputs, init, f);
    // SAFETY: `fill_lazy` wrote all `n` values (its contract); a panic propagates before this.
    unsafe { out.set_len(n) };
    out
}

/// [`par_zeroed_with`] into a [`Lines`] buffer: for the output of a kernel whose values the
/// AMX tiles then load.
pub fn par_zeroed_lines_with<E, I, S, Init, F>(
    n: usize,
    chunk: usize,
    inputs: I,
    init: Init,
    f: F,
) -> Lines<E>
where
    E: Act,
    I: IndexedParallelIterator,
    Init: Fn() -> S + Sync + Send,
    F: Fn(&mut S, &mut [E], I::Item) + Sync + Send,
{
    let slack = slack::<E>();
    let mut buf: Vec<E> = Vec::with_capacity(n + slack);
    let off = buf.as_ptr().align_offset(LINE);
    assert!(off <= slack, "a line boundary within {slack} values");
    let spare = &mut buf.spare_capacity_mut()[..off + n];
    let (head, values) = spare.split_at_mut(off);
    head.fill(MaybeUninit::new(E::ZERO));
    fill_lazy(values, chunk, inputs, init, |state, c, item| {
        let whole = c.take(c.rest.len());
        f(state, whole, item)
    });
    // SAFETY: the head was zeroed just above and `fill_lazy` wrote the `n` values after it; a
    // panic propagates before this.
    unsafe { buf.set_len(off + n) };
    Lines { buf, off, len: n }
}

/// Every value of `out` written: chunk `i` of `chunk` values handed to `f` as a [`Lazy`] with
/// item `i` of `inputs`, `init` making each worker's state, and what `f` did not take zeroed.
///
/// # Panics
/// If `inputs` does not have exactly one item per chunk.
fn fill_lazy<E, I, S, Init, F>(
    out: &mut [MaybeUninit<E>],
    chunk: usize,
    inputs: I,
    init: Init,
    f: F,
) where
    E: Act,
    I: IndexedParallelIterator,
    Init: Fn() -> S + Sync + Send,
    F: Fn(&mut S, &mut Lazy<'_, E>, I::Item) + Sync + Send,
{
    let n = out.len();
    if n == 0 {
        return;
    }
    let chunk = chunk.max(1);
    assert_eq!(
        inputs.len(),
        n.div_ceil(chunk),
        "{n} values in chunks of {chunk} need one input per chunk"
    );
    // `inputs` has one item per chunk (asserted above) and the zip visits each pair exactly
    // once; every value of a chunk is zeroed either by `take` or after `f` returns.
    out.par_chunks_mut(chunk)
        .zip(inputs)
        .for_each_init(init, |state, (c, item)| {
            let mut lazy = Lazy { rest: c };
            f(state, &mut lazy, item);
            // `f` holds the `Lazy` only by reference, so it cannot keep or forget it: what it
            // did not take is zeroed here.
            lazy.rest.fill(MaybeUninit::new(E::ZERO));
        });
}

/// The runs of one channel of an NCHW output being filled by [`par_channels`]: image `n`'s
/// `positions` values of the channel, handed out image by image, each zeroed just before the
/// task writes it (as [`Lazy::take`]).
pub struct ChannelRuns<'a, E = f32> {
    /// The channel's first value in image 0.
    base: *mut MaybeUninit<E>,
    next: usize,
    batch: usize,
    /// Values from one image's run to the next: `channels · positions`.
    stride: usize,
    len: usize,
    _out: std::marker::PhantomData<&'a mut [E]>,
}

impl<'a, E: Act> ChannelRuns<'a, E> {
    /// The channel's run in the next image, zeroed.
    ///
    /// # Panics
    /// When every image's run was already taken.
    pub fn next_run(&mut self) -> &'a mut [E] {
        assert!(
            self.next < self.batch,
            "ChannelRuns: all {} runs taken",
            self.batch
        );
        // SAFETY: run `next < batch` of this channel lies inside the output (`par_channels`
        // sized it `batch · stride` with `base` at channel `c`'s offset `c · len < stride`);
        // the runs of different images, and of different channels, do not overlap, and each is
        // handed out once, so no other reference to it exists.
        let run = unsafe {
            std::slice::from_raw_parts_mut(self.base.add(self.next * self.stride), self.len)
        };
        self.next += 1;
        run.fill(MaybeUninit::new(E::ZERO));
        // SAFETY: every element was just written; `MaybeUninit<E>` has the layout of `E`.
        unsafe { std::slice::from_raw_parts_mut(run.as_mut_ptr().cast::<E>(), run.len()) }
    }
}

/// A pointer the channel tasks share; each writes only its own channel's runs.
struct Shared<E>(*mut MaybeUninit<E>);
// SAFETY: the tasks write disjoint runs through it ([`ChannelRuns`]), and the output outlives
// the parallel loop; `E` is plain data (`f32`, `bf16`).
unsafe impl<E: Act> Sync for Shared<E> {}
// SAFETY: as for `Sync`: the pointer is only written through, at disjoint runs.
unsafe impl<E: Act> Send for Shared<E> {}

/// An NCHW output of `batch · channels · positions` values filled channel by channel: task
/// `c` gets the channel's runs ([`ChannelRuns`], image by image) and returns a value kept in
/// channel order. What a task did not take is zeroed when it returns.
///
/// For a batch norm, whose statistics need the whole channel before any output: the channel's
/// `batch · positions` inputs (512 KB for resnet18's stem at 128 px, batch 32) are read again
/// for the output while they are still in L2, where the statistics pass and then an image by
/// image output pass read every activation from memory twice (the numbers are beside
/// `norm::FUSED_POSITIONS`; `cargo run --release --example norm_pool` times both).
pub fn par_channels<E, T, F>(
    batch: usize,
    channels: usize,
    positions: usize,
    f: F,
) -> (Vec<E>, Vec<T>)
where
    E: Act,
    T: Send,
    F: Fn(usize, &mut ChannelRuns<'_, E>) -> T + Sync + Send,
{
    let n = batch * channels * positions;
    let mut out: Vec<E> = Vec::with_capacity(n);
    let shared = Shared(out.spare_capacity_mut().as_mut_ptr());
    let shared = &shared;
    let values = (0..channels)
        .into_par_iter()
        .map(|c| {
            let mut runs = ChannelRuns {
                // SAFETY: `c · positions <= n` (the channel's first value in image 0, or the end
                // of an empty output).
                base: unsafe { shared.0.add(c * positions) },
                next: 0,
                batch,
                stride: channels * positions,
                len: positions,
                _out: std::marker::PhantomData,
            };
            let value = f(c, &mut runs);
            while runs.next < runs.batch {
                runs.next_run();
            }
            value
        })
        .collect();
    // SAFETY: every channel's task took (and so zeroed or wrote) each of its `batch` runs, and
    // the channels' runs cover all `n` values; a panic in `f` propagates before this.
    unsafe { out.set_len(n) };
    (out, values)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scratch a thread keeps: the length asked, the same block again on the next call,
    /// and a buffer of its own for a call made inside another.
    #[test]
    fn scratch_is_kept_and_a_nested_call_gets_its_own() {
        let first = with_scratch(1000, |s| {
            assert_eq!(s.len(), 1000);
            s.fill(1.0);
            let inner = with_scratch(10, |t| {
                assert_eq!(t.len(), 10);
                t.fill(2.0);
                t.as_ptr()
            });
            assert_ne!(inner, s.as_ptr());
            assert!(
                s.iter().all(|&v| v == 1.0),
                "the nested call wrote into the outer buffer"
            );
            s.as_ptr()
        });
        assert_eq!(with_scratch(500, |s| (s.len(), s.as_ptr())), (500, first));
    }

    /// Every [`Lines`] buffer starts on a line, however it was made or grown, and keeps its
    /// values when grown.
    #[test]
    fn lines_start_on_a_line_and_keep_their_values() {
        let on_line = |p: *const u8| (p as usize).is_multiple_of(LINE);
        for n in [0, 1, 15, 16, 17, 1000] {
            let z = Lines::<u32>::zeroed(n);
            assert!(n == 0 || on_line(z.as_ptr().cast()), "{n}");
            assert!(z.len() == n && z.iter().all(|&v| v == 0));
            let h = Lines::<u16>::zeroed(n);
            assert!(n == 0 || on_line(h.as_ptr().cast()), "{n}");
        }
        let mut g = Lines::<u32>::default();
        for n in [3, 40, 20, 5000] {
            let before: Vec<u32> = g.to_vec();
            g.resize(n, 7);
            assert!(on_line(g.as_ptr().cast()), "{n}");
            let kept = before.len().min(n);
            assert_eq!(&g[..kept], &before[..kept]);
            assert!(g[kept..].iter().all(|&v| v == 7), "{n}");
            g.iter_mut().enumerate().for_each(|(i, v)| *v = i as u32);
        }
        let mut c = Lines::<u32>::zeroed(33);
        c.iter_mut().zip(0..).for_each(|(v, i)| *v = i);
        assert!(on_line(c.as_ptr().cast()) && c.iter().copied().eq(0..33));
        let copy = c.clone();
        assert!(on_line(copy.as_ptr().cast()) && copy == c);
        let d = par_zeroed_lines_with(
            10,
            4,
            (0..3usize).into_par_iter(),
            || (),
            |_, c: &mut [f32], i| c[0] = i as f32 + 1.0,
        );
        assert!(on_line(d.as_ptr().cast()));
        assert_eq!(&d[..], &[1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0]);
    }

    #[test]
    fn every_chunk_is_zeroed_then_written_with_its_own_input() {
        // 10 values in chunks of 4: lengths 4, 4, 2; only the first value of each is written,
        // so the rest must read as zeros.
        let y = par_zeroed(10, 4, (0..3usize).into_par_iter(), |c, i| {
            c[0] = (i + 1) as f32 * 10.0 + c.len() as f32;
        });
        assert_eq!(y, [14.0, 0.0, 0.0, 0.0, 24.0, 0.0, 0.0, 0.0, 32.0, 0.0]);
        assert!(par_zeroed::<f32, _, _>(0, 4, (0..0usize).into_par_iter(), |_, _| {}).is_empty());
    }

    #[test]
    fn uneven_parts_are_zeroed_then_written_in_order() {
        let y = par_zeroed_parts(&[3, 0, 2], |i, c| {
            if let Some(v) = c.last_mut() {
                *v = i as f32 + 1.0;
            }
        });
        assert_eq!(y, [0.0, 0.0, 1.0, 0.0, 3.0]);
        assert!(par_zeroed_parts(&[], |_, _| {}).is_empty());
    }

    #[test]
    fn lazy_parts_are_zeroed_when_taken_and_the_rest_after() {
        // Chunks of 4: the first takes two parts and writes into them, the second takes
        // nothing (all zeros), the last (2 values) takes one.
        let y = par_lazy(10, 4, (0..3usize).into_par_iter(), |c, i| {
            if i == 0 {
                c.take(1)[0] = 1.0;
                let p = c.take(2);
                assert_eq!(p, [0.0, 0.0]);
                p[1] = 2.0;
            } else if i == 2 {
                c.take(1)[0] = 3.0;
            }
        });
        assert_eq!(y, [1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0, 3.0, 0.0]);
    }

    #[test]
    #[should_panic(expected = "values asked")]
    fn lazy_refuses_to_take_past_its_chunk() {
        par_lazy::<f32, _, _>(4, 4, (0..1usize).into_par_iter(), |c, _| {
            c.take(5);
        });
    }

    #[test]
    fn channel_runs_cover_the_output_and_values_keep_channel_order() {
        // 2 images, 3 channels, 2 positions: channel 1 writes only image 0's run, channel 2
        // both, channel 0 none (zeros).
        let (y, v) = par_channels(2, 3, 2, |c, runs| {
            if c >= 1 {
                runs.next_run()[1] = c as f32;
            }
            if c == 2 {
                runs.next_run()[0] = 20.0;
            }
            c * 10
        });
        assert_eq!(
            y,
            [0.0, 0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 20.0, 0.0]
        );
        assert_eq!(v, [0, 10, 20]);
    }

    #[test]
    #[should_panic(expected = "runs taken")]
    fn channel_runs_refuse_a_run_past_the_batch() {
        par_channels::<f32, _, _>(1, 2, 3, |_, runs| {
            runs.next_run();
            runs.next_run();
        });
    }

    #[test]
    #[should_panic(expected = "one input per chunk")]
    fn too_few_inputs_are_refused() {
        par_zeroed::<f32, _, _>(10, 4, (0..2usize).into_par_iter(), |_, _| {});
    }
}
