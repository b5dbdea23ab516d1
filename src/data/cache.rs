//! An opt-in in-memory cache of decoded images (`data.cache_mb`): JPEG decoding is most of an
//! ImageFolder loader's work, and a dataset that fits in memory need not pay it every epoch.
//!
//! Images are kept first come, first served until the byte budget is spent; the rest keep
//! streaming from disk. Off (the default), nothing is kept beyond the batches in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use super::dataset::{Dataset, RawImage};
use crate::error::Result;

/// Wraps a dataset, caching decoded images up to `budget` bytes.
pub struct Cached {
    inner: Arc<dyn Dataset>,
    channels: usize,
    slots: Vec<OnceLock<Arc<RawImage>>>,
    used: AtomicUsize,
    budget: usize,
}

impl Cached {
    pub fn new(inner: Arc<dyn Dataset>, channels: usize, budget: usize) -> Self {
        Cached {
            slots: (0..inner.len()).map(|_| OnceLock::new()).collect(),
            inner,
            channels,
            used: AtomicUsize::new(0),
            budget,
        }
    }

    /// Bytes of decoded pixels held.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }
}

impl Dataset for Cached {
    fn len(&self) -> usize {
        self.inner.len()
    }
    fn label(&self, index: usize) -> usize {
        self.inner.label(index)
    }
    fn image(&self, index: usize, channels: usize) -> Result<RawImage> {
        if channels != self.channels {
            return self.inner.image(index, channels);
        }
        if let Some(img) = self.slots[index].get() {
            return Ok(img.as_ref().clone());
        }
        let img = self.inner.image(index, channels)?;
        let bytes = img.pixels.len();
        // Reserve the bytes first so concurrent threads never overshoot the budget.
        if self.used.fetch_add(bytes, Ordering::Relaxed) + bytes <= self.budget {
            if self.slots[index].set(Arc::new(img.clone())).is_err() {
                self.used.fetch_sub(bytes, Ordering::Relaxed);
            }
        } else {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
        }
        Ok(img)
    }
    fn describe(&self, index: usize) -> String {
        self.inner.describe(index)
    }
    fn mode(&self, index: usize) -> Option<&'static str> {
        self.inner.mode(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::InMemory;
    use std::sync::atomic::AtomicUsize;

    /// Counts decodes.
    struct Counting(InMemory, AtomicUsize);
    impl Dataset for Counting {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn label(&self, i: usize) -> usize {
            self.0.label(i)
        }
        fn image(&self, i: usize, c: usize) -> Result<RawImage> {
            self.1.fetch_add(1, Ordering::Relaxed);
            self.0.image(i, c)
        }
        fn describe(&self, i: usize) -> String {
            self.0.describe(i)
        }
    }

    #[test]
    fn caches_within_the_budget_only() {
        let inner = Arc::new(Counting(
            InMemory {
                source: "m".into(),
                width: 2,
                height: 2,
                channels: 1,
                pixels: (0..40).collect(),
                labels: vec![0; 10],
            },
            AtomicUsize::new(0),
        ));
        // 4 bytes per image, budget for 3.
        let c = Cached::new(inner.clone(), 1, 12);
        for _ in 0..2 {
            for i in 0..10 {
                assert_eq!(c.image(i, 1).unwrap().pixels[0], (4 * i) as u8);
            }
        }
        assert_eq!(c.used(), 12);
        // First pass decodes 10; the second decodes the 7 that did not fit.
        assert_eq!(inner.1.load(Ordering::Relaxed), 17);
    }
}
