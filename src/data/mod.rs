//! Datasets, transforms and the parallel loader.
//!
//! A [`Dataset`] gives decoded 8-bit images and labels by index; [`open`] detects the on-disk
//! format (ImageFolder, CIFAR binary, IDX, the built-in Fashion-MNIST) and returns the train and
//! validation splits; [`transforms`] turns a decoded image into a normalised `[C, H, W]` tensor
//! slice, and [`loader`] does that for whole batches on worker threads behind a bounded queue.

pub mod builtin;
pub mod cache;
pub mod cifar;
pub mod csv_labels;
pub mod dataset;
pub mod idx;
pub mod image_folder;
pub mod loader;
pub mod norm;
pub mod split;
pub mod stats;
pub mod transforms;

pub use cache::Cached;
pub use dataset::{DataFormat, DataSpec, Dataset, InMemory, RawImage, Splits, Subset, open};
pub use loader::{Batch, Loader, LoaderConfig, Sampler};
pub use transforms::{Augment, Transform};
