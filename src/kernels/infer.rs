//! Inference's folded convolution weights, kept between calls while the tensors they were made
//! from live (and Winograd's transformed weights of layers without a batch norm: VGG,
//! AlexNet).
//!
//! Inference folds each batch norm into its convolution (`w' = w · γ/√(σ²+ε)`,
//! [`super::conv_bn`]) and Winograd transforms the folded weights. Both were redone on every
//! call: for one photo (resnet18 at 224 px, batch 1, 2 threads) they were 26% of the samples
//! of `perf record` on `convlab bench infer --batch 1` (the fold 9%, Burn's single-threaded
//! broadcast multiply; the transform 17%). Here a layer's [`Prepared`] weights are made once
//! and found again by the storage of the tensors they came from.
//!
//! An entry holds those tensors (handles to the same storage), which is what makes the lookup
//! sound: a held storage can neither be freed, so its address cannot come back for other
//! values, nor written in place, since burn-flex copies a shared storage before a write
//! (`FlexTensor::storage_mut`) and convlab's in-place ops write only into storage nothing else
//! holds (`flex::writable`, the in-place optimiser). An update of the weights therefore makes
//! new storage, which misses. An entry whose tensors only the cache still holds can never match
//! again and goes at the next insertion; a training step's convolution empties the cache
//! ([`clear`]), so the weights an evaluation between epochs prepared are not kept through the
//! next epoch.
//!
//! The cost is memory while a model is used for inference: its folded weights and their
//! transforms (from the layer shapes: resnet18 67 MB, resnet50 about 115 MB). Measured peak
//! RSS of `convlab bench infer` at 224 px, 2 threads, Intel Xeon family 6 model 207,
//! 2026-12-07: resnet18 batch 1 73 -> 137 MB, batch 64 366 -> 561 MB (the cached blocks,
//! made during the first call among its activations, also leave holes the heap cannot give
//! back), resnet50 batch 32 490 -> 604 MB, vgg16 batch 1 608 -> 753 MB; PyTorch's, the same
//! runs: 1197, 1253, 1225 MB.

use super::conv::Prepared;
use burn::backend::flex::FlexTensor;
use std::sync::{Arc, Mutex};

/// A prepared layer and what it was made from.
struct Entry {
    sources: Vec<FlexTensor>,
    /// Anything else the values depend on: ε's bits for a folded layer, a marker of the
    /// Winograd tile for a layer without batch norm (whether a bias is used is `sources`'
    /// length).
    extra: u64,
    prepared: Arc<Prepared>,
}

static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// Entries at most (the oldest go first): more than the convolutions of any registered model.
const MOST: usize = 1024;

/// Whether `a` and `b` are the same view of the same storage.
fn same(a: &FlexTensor, b: &FlexTensor) -> bool {
    let (x, y) = (a.bytes(), b.bytes());
    x.as_ptr() == y.as_ptr()
        && x.len() == y.len()
        && a.layout() == b.layout()
        && a.dtype() == b.dtype()
}

/// The prepared weights made from `sources` (and `extra`), found again or made by `make`.
pub(super) fn prepared(
    sources: &[&FlexTensor],
    extra: u64,
    make: impl FnOnce() -> Prepared,
) -> Arc<Prepared> {
    let found = |cache: &Vec<Entry>| {
        cache
            .iter()
            .find(|e| {
                e.extra == extra
                    && e.sources.len() == sources.len()
                    && e.sources.iter().zip(sources).all(|(a, b)| same(a, b))
            })
            .map(|e| e.prepared.clone())
    };
    if let Some(p) = found(&lock()) {
        return p;
    }
    // Made outside the lock (it runs on the thread pool); two threads making the same layer at
    // once both insert it, which costs memory, not correctness.
    let prepared = Arc::new(make());
    let mut cache = lock();
    forget_dead(&mut cache);
    if cache.len() >= MOST {
        cache.remove(0);
    }
    cache.push(Entry {
        sources: sources.iter().map(|&t| t.clone()).collect(),
        extra,
        prepared: prepared.clone(),
    });
    prepared
}

/// Drops the entries that can never match again: those with a tensor whose storage only the
/// cache still holds (counted over all entries, which may share a storage: one layer's weights
/// under two ε, or the same γ).
fn forget_dead(cache: &mut Vec<Entry>) {
    let mut held = std::collections::HashMap::<*const u8, usize>::new();
    for t in cache.iter().flat_map(|e| &e.sources) {
        *held.entry(t.bytes().as_ptr()).or_default() += 1;
    }
    // `data_arc` is one more handle, dropped at once.
    let others = |t: &FlexTensor| Arc::strong_count(&t.data_arc()) - 1 - held[&t.bytes().as_ptr()];
    cache.retain(|e| e.sources.iter().all(|t| others(t) > 0));
}

/// Drops every entry (a training step is running: the weights are changing).
pub(super) fn clear() {
    lock().clear();
}

fn lock() -> std::sync::MutexGuard<'static, Vec<Entry>> {
    // A panic while the lock was held left at worst a partly filtered list of whole entries.
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn tensor(values: Vec<f32>) -> FlexTensor {
        let n = values.len();
        FlexTensor::from_data(TensorData::new(values, [n]))
    }

    /// Whether an entry holds this storage.
    fn holds(ptr: *const u8) -> bool {
        lock()
            .iter()
            .any(|e| e.sources.iter().any(|t| t.bytes().as_ptr() == ptr))
    }

    /// `prepared` twice on the same tensors, counting how often it made the layer. Another
    /// test's training step may empty the cache between the two calls ([`clear`]); then the
    /// pair is tried again.
    fn made_twice(sources: &[&FlexTensor], extra: u64) -> usize {
        for _ in 0..10 {
            let made = AtomicUsize::new(0);
            let make = || {
                made.fetch_add(1, Ordering::Relaxed);
                Prepared::new(vec![1.0], Some(vec![2.0]))
            };
            let (a, b) = (
                prepared(sources, extra, make),
                prepared(sources, extra, make),
            );
            assert_eq!((&a.w, &a.bias), (&b.w, &b.bias));
            if made.load(Ordering::Relaxed) == 1 || !holds(sources[0].bytes().as_ptr()) {
                return made.load(Ordering::Relaxed);
            }
        }
        2
    }

    /// A layer is made once and found again by its tensors' storage (a handle to the same
    /// storage finds it; equal values in other storage, or another ε, do not), a write to a
    /// held tensor goes to a copy, and an entry whose tensors only the cache holds is dropped
    /// at the next insertion.
    #[test]
    fn layers_are_found_by_their_storage_and_never_stale() {
        let (w, g) = (tensor(vec![1.0, 2.0, 3.0]), tensor(vec![0.5]));
        assert_eq!(made_twice(&[&w, &g], 7), 1);
        let same = w.clone();
        let hit = AtomicUsize::new(0);
        let count = || {
            hit.fetch_add(1, Ordering::Relaxed);
            Prepared::new(vec![], None)
        };
        prepared(&[&w, &g], 7, count);
        prepared(&[&same, &g], 7, count);
        assert!(
            hit.load(Ordering::Relaxed) <= 1,
            "a handle to the same storage missed"
        );

        let made = AtomicUsize::new(0);
        let make = || {
            made.fetch_add(1, Ordering::Relaxed);
            Prepared::new(vec![], None)
        };
        prepared(&[&tensor(vec![1.0, 2.0, 3.0]), &g], 7, make);
        prepared(&[&w, &g], 8, make);
        assert_eq!(
            made.load(Ordering::Relaxed),
            2,
            "other storage or another ε was found"
        );

        // A write through a handle of a held storage copies it: the held values stay, and the
        // written tensor is other storage.
        let mut written = w.clone();
        written.storage_mut::<f32>()[0] = 9.0;
        assert_eq!(w.storage::<f32>()[0], 1.0);
        assert_ne!(written.bytes().as_ptr(), w.bytes().as_ptr());

        // Once the cache alone holds a layer's tensors, the next insertion drops the entry.
        let ptr = w.bytes().as_ptr();
        if holds(ptr) {
            drop((w, same, written));
            prepared(&[&tensor(vec![4.0]), &g], 7, || Prepared::new(vec![], None));
            assert!(!holds(ptr), "an entry nothing else holds was kept");
        }
    }
}
