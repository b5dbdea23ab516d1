//! The parallel batch loader.
//!
//! A producer thread walks the epoch's (seeded) order in batch-sized chunks; each chunk is
//! decoded and transformed by a dedicated rayon pool straight into the batch buffer, and the
//! finished batch goes into a bounded channel of `prefetch` slots. The training step takes
//! batches from the other end, so decoding overlaps compute and at most `prefetch + 2` batches of
//! decoded pixels exist at any time, however large the dataset.

use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, bounded};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::dataset::Dataset;
use super::transforms::Transform;
use crate::error::{Error, Result};
use crate::helpers::Stream;

/// One batch of model input, `[B, C, H, W]` floats and `B` labels.
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<usize>,
    /// Positions in the dataset, in batch order.
    pub indices: Vec<usize>,
    /// `[C, H, W]` of one sample.
    pub sample_shape: [usize; 3],
    /// Samples dropped because their file could not be decoded (`--skip-bad-images`):
    /// `(source, reason)`.
    pub skipped: Vec<(String, String)>,
}

impl Batch {
    /// Number of samples in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    /// True for an empty batch (every sample was skipped).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// How to walk a dataset.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Shuffle and augment (training) or neither (evaluation).
    pub train: bool,
    /// Drop the last incomplete batch (training only: keeps batch-norm statistics sane).
    pub drop_last: bool,
    /// Decode/augment threads.
    pub workers: usize,
    /// Finished batches waiting in the queue.
    pub prefetch: usize,
    pub seed: u64,
    /// Skip undecodable images instead of failing.
    pub skip_bad: bool,
    /// How a training epoch picks its samples (evaluation walks the data in order).
    pub sampler: Sampler,
}

/// `data.sampler`: how a training epoch picks its samples.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// Every sample once, in a seeded random order.
    #[default]
    Shuffle,
    /// As many draws as samples, with replacement, each draw a uniformly random class and then
    /// a uniformly random sample of it, so every class is seen equally often (class-balanced
    /// sampling, as PyTorch's `WeightedRandomSampler` with weights `1 / n_class`; Shen et al.
    /// 2016, "Relay Backpropagation"). Rare classes' images repeat within an epoch (each
    /// repeat augmented afresh); frequent classes' images are not all seen every epoch.
    Balanced,
}

impl std::fmt::Display for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Sampler::Shuffle => "shuffle",
            Sampler::Balanced => "balanced",
        })
    }
}

/// The samples of one epoch, in order, and the key that seeds each one's augmentation.
#[derive(Clone, Debug, PartialEq)]
pub struct EpochOrder {
    pub indices: Vec<usize>,
    /// Per position: [`Stream::Augment`]'s sample index (each sample once), or
    /// [`Stream::AugmentDraw`]'s draw number (sampling with replacement).
    keys: Vec<AugmentKey>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum AugmentKey {
    Sample(usize),
    Draw(usize),
}

impl AugmentKey {
    fn stream(self, epoch: usize) -> Stream {
        match self {
            AugmentKey::Sample(sample) => Stream::Augment { epoch, sample },
            AugmentKey::Draw(draw) => Stream::AugmentDraw { epoch, draw },
        }
    }
}

/// `n` draws with replacement from `labels`' samples: a uniform class among those present,
/// then a uniform member of it.
pub fn balanced_draws(labels: &[usize], n: usize, seed: u64) -> Vec<usize> {
    use rand::Rng;
    let classes = labels.iter().max().map_or(0, |&m| m + 1);
    let mut members = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        members[l].push(i);
    }
    members.retain(|m| !m.is_empty());
    if members.is_empty() {
        return Vec::new();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let m = &members[rng.random_range(0..members.len())];
            m[rng.random_range(0..m.len())]
        })
        .collect()
}

/// Produces the batches of epochs of one dataset.
pub struct Loader {
    data: Arc<dyn Dataset>,
    transform: Arc<Transform>,
    config: LoaderConfig,
    pool: Arc<rayon::ThreadPool>,
}

impl Loader {
    pub fn new(data: Arc<dyn Dataset>, transform: Transform, config: LoaderConfig) -> Result<Self> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(config.workers.max(1))
            .thread_name(|i| format!("convlab-loader-{i}"))
            .build()
            .map_err(|e| Error::Invalid(format!("cannot start loader threads: {e}")))?;
        Ok(Loader {
            data,
            transform: Arc::new(transform),
            config,
            pool: Arc::new(pool),
        })
    }

    /// Number of batches in one epoch.
    pub fn num_batches(&self) -> usize {
        let (n, b) = (self.data.len(), self.config.batch_size);
        if self.config.train && self.config.drop_last && n >= b {
            n / b
        } else {
            n.div_ceil(b)
        }
    }

    /// The samples of `epoch` in order: when training, a seeded permutation or, with the
    /// balanced sampler, seeded class-balanced draws; else `0..n`.
    pub fn order(&self, epoch: usize) -> EpochOrder {
        let n = self.data.len();
        let seed = self.config.seed;
        if self.config.train && self.config.sampler == Sampler::Balanced {
            let labels = super::dataset::labels_of(self.data.as_ref());
            let indices = balanced_draws(&labels, n, Stream::BalancedDraws { epoch }.seed(seed));
            let keys = (0..indices.len()).map(AugmentKey::Draw).collect();
            return EpochOrder { indices, keys };
        }
        let mut indices: Vec<usize> = (0..n).collect();
        if self.config.train {
            let mut rng = ChaCha8Rng::seed_from_u64(Stream::Shuffle { epoch }.seed(seed));
            indices.shuffle(&mut rng);
        }
        let keys = indices.iter().map(|&i| AugmentKey::Sample(i)).collect();
        EpochOrder { indices, keys }
    }

    /// Starts producing the batches of `epoch` in the background.
    pub fn epoch(&self, epoch: usize) -> EpochIter {
        let order = self.order(epoch);
        let nb = self.num_batches();
        let (tx, rx) = bounded(self.config.prefetch.max(1));
        let data = self.data.clone();
        let transform = self.transform.clone();
        let config = self.config.clone();
        let pool = self.pool.clone();
        let handle = std::thread::spawn(move || {
            let b = config.batch_size;
            let chunks = order.indices.chunks(b).zip(order.keys.chunks(b));
            for (chunk, keys) in chunks.take(nb) {
                let batch = pool
                    .install(|| make_batch(data.as_ref(), &transform, &config, epoch, chunk, keys));
                let stop = batch.is_err();
                if tx.send(batch).is_err() || stop {
                    return;
                }
            }
        });
        EpochIter {
            rx: Some(rx),
            handle: Some(handle),
        }
    }
}

/// Builds one batch from the dataset positions `chunk`, augmenting each (when training) with
/// the stream its key names.
fn make_batch(
    data: &dyn Dataset,
    transform: &Transform,
    config: &LoaderConfig,
    epoch: usize,
    chunk: &[usize],
    keys: &[AugmentKey],
) -> Result<Batch> {
    let len = transform.sample_len();
    let mut images = vec![0f32; chunk.len() * len];
    let results: Vec<Result<()>> = images
        .par_chunks_mut(len)
        .zip(chunk.par_iter().zip(keys))
        .map(|(out, (&i, key))| {
            let img = data.image(i, transform.channels)?;
            let seed = config.train.then(|| key.stream(epoch).seed(config.seed));
            transform.apply(img, seed, out);
            Ok(())
        })
        .collect();
    let mut keep = Vec::with_capacity(chunk.len());
    let mut skipped = Vec::new();
    for (k, r) in results.into_iter().enumerate() {
        match r {
            Ok(()) => keep.push(k),
            // A file gone since the folder was scanned is as unreadable as a corrupt one.
            Err(e @ (Error::BadImage { .. } | Error::Io { .. } | Error::Missing { .. }))
                if config.skip_bad =>
            {
                skipped.push((data.describe(chunk[k]), e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    if !skipped.is_empty() {
        let mut compact = Vec::with_capacity(keep.len() * len);
        for &k in &keep {
            compact.extend_from_slice(&images[k * len..(k + 1) * len]);
        }
        images = compact;
    }
    let indices: Vec<usize> = keep.iter().map(|&k| chunk[k]).collect();
    Ok(Batch {
        images,
        labels: indices.iter().map(|&i| data.label(i)).collect(),
        indices,
        sample_shape: [transform.channels, transform.size, transform.size],
        skipped,
    })
}

/// The batches of one epoch, in order. Dropping it stops the producer.
pub struct EpochIter {
    rx: Option<Receiver<Result<Batch>>>,
    handle: Option<JoinHandle<()>>,
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.as_ref()?.recv().ok()
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        // Closing the channel first makes a blocked producer's `send` fail, so `join` returns.
        self.rx.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::InMemory;
    use crate::data::transforms::{Augment, CropMode, Mode};

    fn tiny(n: usize) -> Arc<dyn Dataset> {
        Arc::new(InMemory {
            source: "mem".into(),
            width: 4,
            height: 4,
            channels: 1,
            pixels: (0..n * 16).map(|i| (i * 7 % 256) as u8).collect(),
            labels: (0..n).map(|i| i % 3).collect(),
        })
    }

    /// A transform to 4x4 grey samples in `mode`.
    fn grey4(mode: Mode) -> Transform {
        Transform {
            channels: 1,
            size: 4,
            mean: vec![0.5],
            std: vec![0.25],
            pca: None,
            mode,
        }
    }

    /// A training loader over `data` with padded crops and flips.
    fn augmenting(
        data: Arc<dyn Dataset>,
        batch_size: usize,
        workers: usize,
        sampler: Sampler,
    ) -> Loader {
        let t = grey4(Mode::Train(Augment {
            crop: CropMode::Pad,
            crop_padding: 1,
            hflip: 0.5,
            ..Augment::none()
        }));
        let cfg = LoaderConfig {
            batch_size,
            train: true,
            drop_last: true,
            workers,
            prefetch: 2,
            seed: 3,
            skip_bad: false,
            sampler,
        };
        Loader::new(data, t, cfg).unwrap()
    }

    fn loader(workers: usize) -> Loader {
        augmenting(tiny(23), 5, workers, Sampler::Shuffle)
    }

    #[test]
    fn batches_do_not_depend_on_thread_count() {
        let a: Vec<Vec<f32>> = loader(1).epoch(2).map(|b| b.unwrap().images).collect();
        let b: Vec<Vec<f32>> = loader(2).epoch(2).map(|b| b.unwrap().images).collect();
        assert_eq!(a.len(), 4);
        assert_eq!(a, b);
        let c: Vec<Vec<f32>> = loader(2).epoch(3).map(|b| b.unwrap().images).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn epoch_covers_each_sample_once() {
        let l = loader(2);
        let mut seen: Vec<usize> = l.epoch(0).flat_map(|b| b.unwrap().indices).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 20);
    }

    /// With `skip_bad`, a corrupt file and a file that has vanished are both skipped with
    /// their reasons and the good one still comes through; without it, the vanished file stops
    /// the epoch naming it.
    #[test]
    fn skip_bad_drops_corrupt_and_vanished_files() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.png");
        image::GrayImage::from_fn(4, 4, |x, y| image::Luma([(x * 40 + y) as u8]))
            .save(&good)
            .unwrap();
        let corrupt = dir.path().join("corrupt.png");
        std::fs::write(&corrupt, b"\x89PNG\r\n\x1a\nrubbish").unwrap();
        let gone = dir.path().join("gone.png");
        let data: Arc<dyn Dataset> = Arc::new(crate::data::image_folder::ImageFolder {
            files: vec![gone.clone(), good, corrupt],
            labels: vec![0, 1, 0],
        });
        let make = |skip_bad| {
            let t = grey4(Mode::Train(Augment::none()));
            let cfg = LoaderConfig {
                batch_size: 3,
                train: false,
                drop_last: false,
                workers: 1,
                prefetch: 1,
                seed: 0,
                skip_bad,
                sampler: Sampler::Shuffle,
            };
            Loader::new(data.clone(), t, cfg).unwrap()
        };
        let batch = make(true).epoch(0).next().unwrap().unwrap();
        assert_eq!(batch.indices, vec![1]);
        let reasons: Vec<&str> = batch.skipped.iter().map(|(_, why)| why.as_str()).collect();
        assert_eq!(batch.skipped.len(), 2, "{reasons:?}");
        assert!(reasons[0].contains("gone.png") && reasons[0].contains("no such file"));
        assert!(reasons[1].contains("corrupt.png") && reasons[1].contains("cannot decode"));
        let Err(e) = make(false).epoch(0).next().unwrap() else {
            panic!("a vanished file without skip_bad must stop the epoch")
        };
        let e = e.to_string();
        assert!(e.contains("gone.png"), "{e}");
    }

    #[test]
    fn balanced_draws_make_every_class_equally_frequent() {
        // 100 : 10 : 1 samples; class 3 has none.
        let labels: Vec<usize> = [vec![0; 100], vec![1; 10], vec![2; 1], vec![4; 5]].concat();
        let n = 40_000;
        let d = balanced_draws(&labels, n, 7);
        assert_eq!(d.len(), n);
        let mut per_class = [0usize; 5];
        let mut per_sample = vec![0usize; labels.len()];
        for &i in &d {
            per_class[labels[i]] += 1;
            per_sample[i] += 1;
        }
        assert_eq!(per_class[3], 0);
        // A quarter each, within 5 standard deviations (sqrt(n p (1 - p)) ~ 87).
        for c in [0, 1, 2, 4] {
            assert!(per_class[c].abs_diff(n / 4) < 450, "{per_class:?}");
        }
        // Within a class, members are drawn uniformly: class 1's ten share its 10,000 draws.
        assert!(per_sample[100..110].iter().all(|&k| k.abs_diff(1000) < 160));
        assert_eq!(d, balanced_draws(&labels, n, 7));
        assert_ne!(d, balanced_draws(&labels, n, 8));
        assert!(balanced_draws(&[], 5, 0).is_empty());
    }

    #[test]
    fn balanced_sampler_repeats_rare_images_with_fresh_augmentation() {
        // 23 samples, one of class 1 among twenty-two of class 0 (labels 0 and 1 only).
        let data: Arc<dyn Dataset> = Arc::new(InMemory {
            source: "mem".into(),
            width: 4,
            height: 4,
            channels: 1,
            pixels: (0..23 * 16).map(|i| (i * 7 % 256) as u8).collect(),
            labels: (0..23).map(|i| usize::from(i == 5)).collect(),
        });
        let make = |workers| augmenting(data.clone(), 23, workers, Sampler::Balanced);
        let batch = make(1).epoch(0).next().unwrap().unwrap();
        let rare: Vec<usize> = (0..23).filter(|&k| batch.indices[k] == 5).collect();
        // About half the draws are the one rare image (a 1 in 2^23 chance of fewer than 4).
        assert!(rare.len() >= 4, "{:?}", batch.indices);
        let len = 16;
        let views: Vec<&[f32]> = rare
            .iter()
            .map(|&k| &batch.images[k * len..(k + 1) * len])
            .collect();
        assert!(
            views.iter().any(|v| *v != views[0]),
            "every repeat of the image got the same crop and flip"
        );
        let again = make(2).epoch(0).next().unwrap().unwrap();
        assert_eq!((again.indices, again.images), (batch.indices, batch.images));
    }

    #[test]
    fn dropping_mid_epoch_does_not_hang() {
        let l = loader(1);
        let mut it = l.epoch(0);
        assert!(it.next().is_some());
        drop(it);
    }
}
