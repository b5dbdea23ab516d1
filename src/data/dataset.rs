//! The dataset interface and format detection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

use super::split::{stratified_split, stratified_subset};

/// One decoded 8-bit image, pixels interleaved row-major (`[H, W, C]`), `channels` 1 or 3.
#[derive(Clone, Debug, PartialEq)]
pub struct RawImage {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub pixels: Vec<u8>,
}

impl RawImage {
    /// Converts from any `image` crate image: grey, grey+alpha, RGB, RGBA, palette, 16-bit and
    /// float images all become 8-bit grey (`channels == 1`) or RGB (`channels == 3`). Alpha is
    /// dropped (composited on nothing), as torchvision's `convert("RGB")` does.
    pub fn from_dynamic(img: image::DynamicImage, channels: usize) -> Self {
        let (width, height) = (img.width() as usize, img.height() as usize);
        let pixels = if channels == 1 {
            img.into_luma8().into_raw()
        } else {
            img.into_rgb8().into_raw()
        };
        RawImage {
            width,
            height,
            channels: if channels == 1 { 1 } else { 3 },
            pixels,
        }
    }
}

/// Images and labels by index. Implementations decode lazily (ImageFolder) or hold decoded
/// bytes (IDX, CIFAR); both are shared read-only between loader threads.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    /// True when there are no samples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Class index of sample `index`.
    fn label(&self, index: usize) -> usize;
    /// Decoded image of sample `index`, with `channels` (1 or 3) channels.
    fn image(&self, index: usize, channels: usize) -> Result<RawImage>;
    /// Where sample `index` comes from, for error messages (a path, or `file#record`).
    fn describe(&self, index: usize) -> String;
    /// The stored colour mode of sample `index` (`grey`, `rgb`, `rgba`, `palette`, `cmyk`,
    /// `grey16`, ...), where cheap to tell; `None` otherwise.
    fn mode(&self, _index: usize) -> Option<&'static str> {
        None
    }
}

/// Decoded images held in memory: what the IDX and CIFAR readers produce.
pub struct InMemory {
    /// Source description used in messages, e.g. the file the records came from.
    pub source: String,
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    /// `len * height * width * channels` bytes, `[N, H, W, C]`.
    pub pixels: Vec<u8>,
    pub labels: Vec<usize>,
}

impl Dataset for InMemory {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn label(&self, index: usize) -> usize {
        self.labels[index]
    }
    fn image(&self, index: usize, channels: usize) -> Result<RawImage> {
        let n = self.width * self.height * self.channels;
        let src = &self.pixels[index * n..(index + 1) * n];
        let pixels = convert_channels(src, self.channels, channels);
        Ok(RawImage {
            width: self.width,
            height: self.height,
            channels,
            pixels,
        })
    }
    fn describe(&self, index: usize) -> String {
        format!("{}#{}", self.source, index)
    }
    fn mode(&self, _index: usize) -> Option<&'static str> {
        Some(if self.channels == 1 { "grey" } else { "rgb" })
    }
}

/// Grey <-> RGB on interleaved bytes. RGB to grey uses ITU-R 601 luma, as PIL's `convert("L")`.
pub fn convert_channels(src: &[u8], from: usize, to: usize) -> Vec<u8> {
    match (from, to) {
        (a, b) if a == b => src.to_vec(),
        (1, 3) => src.iter().flat_map(|&v| [v, v, v]).collect(),
        (3, 1) => src
            .chunks_exact(3)
            .map(|p| {
                ((p[0] as u32 * 299 + p[1] as u32 * 587 + p[2] as u32 * 114 + 500) / 1000) as u8
            })
            .collect(),
        _ => unreachable!("only 1 and 3 channels are supported"),
    }
}

/// A view of some samples of another dataset, in the given order.
pub struct Subset {
    pub base: Arc<dyn Dataset>,
    pub indices: Vec<usize>,
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }
    fn label(&self, index: usize) -> usize {
        self.base.label(self.indices[index])
    }
    fn image(&self, index: usize, channels: usize) -> Result<RawImage> {
        self.base.image(self.indices[index], channels)
    }
    fn describe(&self, index: usize) -> String {
        self.base.describe(self.indices[index])
    }
    fn mode(&self, index: usize) -> Option<&'static str> {
        self.base.mode(self.indices[index])
    }
}

/// Labels of all samples, in order.
pub fn labels_of(d: &dyn Dataset) -> Vec<usize> {
    (0..d.len()).map(|i| d.label(i)).collect()
}

/// The on-disk formats convlab reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// The Fashion-MNIST test set shipped inside convlab (8,000 train / 2,000 val).
    Builtin,
    /// One sub-folder of images per class (optionally under `train/` and `val/` or `test/`).
    Imagefolder,
    /// CIFAR-10 binary batches (`data_batch_*.bin`, `test_batch.bin`).
    Cifar10,
    /// CIFAR-100 binary (`train.bin`, `test.bin`), fine labels.
    Cifar100,
    /// MNIST / Fashion-MNIST IDX files, gzipped or not.
    Idx,
    /// Image paths and labels in CSV lists (`train.csv` + `val.csv`/`test.csv`, `labels.csv`,
    /// or one `.csv` file).
    Csv,
}

/// Where the data comes from and how to split it.
#[derive(Clone, Debug)]
pub struct DataSpec {
    /// `None`: the built-in dataset.
    pub path: Option<PathBuf>,
    /// `None`: detect from the path.
    pub format: Option<DataFormat>,
    /// Fraction held out for validation when the data has no split of its own.
    pub val_fraction: f64,
    /// Seed of the split (and of the subsets below).
    pub seed: u64,
    /// Stratified subsets, for tests and quick trials.
    pub limit_train: Option<usize>,
    pub limit_val: Option<usize>,
}

/// A train / validation pair with what the model needs to know about the data.
pub struct Splits {
    pub train: Arc<dyn Dataset>,
    pub val: Arc<dyn Dataset>,
    pub classes: Vec<String>,
    /// Channels of the stored images (1 grey, 3 colour).
    pub channels: usize,
    /// Side of the stored images when all have one size (IDX, CIFAR); `None` for photos.
    pub native_size: Option<usize>,
    pub format: DataFormat,
    /// `"val"` or `"test"`: what the held-out split is.
    pub val_name: String,
    /// What the reader noticed but did not refuse (symlink cycles skipped, files reached twice,
    /// images in both splits); the trainer prints them.
    pub warnings: Vec<String>,
}

impl Splits {
    /// The splits of a list of photos (an ImageFolder or CSV lists): colour, no native size.
    pub fn photos(
        format: DataFormat,
        (train, val): (Arc<dyn Dataset>, Arc<dyn Dataset>),
        classes: Vec<String>,
        val_name: String,
        warnings: Vec<String>,
    ) -> Splits {
        Splits {
            train,
            val,
            classes,
            channels: 3,
            native_size: None,
            format,
            val_name,
            warnings,
        }
    }
}

/// Detects the format of `path` from its contents.
pub fn detect(path: &Path) -> Result<DataFormat> {
    if !path.exists() {
        return Err(Error::Missing {
            path: path.to_path_buf(),
        });
    }
    if super::csv_labels::is_csv_file(path) {
        return Ok(DataFormat::Csv);
    }
    if !path.is_dir() {
        return Err(Error::UnknownFormat {
            path: path.to_path_buf(),
            reason: "expected a directory".into(),
        });
    }
    if super::cifar::find_dir(path, super::cifar::CIFAR10_FILES).is_some() {
        return Ok(DataFormat::Cifar10);
    }
    if super::cifar::find_dir(path, super::cifar::CIFAR100_FILES).is_some() {
        return Ok(DataFormat::Cifar100);
    }
    match super::idx::find_files(path) {
        Ok(_) => return Ok(DataFormat::Idx),
        // Some IDX files but not all four: say which are missing rather than "no format".
        Err(e) if has_any_idx(path) => return Err(e),
        Err(_) => {}
    }
    if super::csv_labels::find(path).is_some() {
        return Ok(DataFormat::Csv);
    }
    let has_subdirs = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok())
        .any(|e| e.path().is_dir() && !e.file_name().to_string_lossy().starts_with('.'));
    if has_subdirs {
        return Ok(DataFormat::Imagefolder);
    }
    Err(Error::UnknownFormat {
        path: path.to_path_buf(),
        reason: "no class sub-folders, CIFAR .bin files or IDX files found".into(),
    })
}

fn has_any_idx(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("-idx"))
    })
}

/// Opens the dataset `spec` describes and returns its train and validation splits.
pub fn open(spec: &DataSpec) -> Result<Splits> {
    let format = match (&spec.format, &spec.path) {
        (Some(f), _) => *f,
        (None, None) => DataFormat::Builtin,
        (None, Some(p)) => detect(p)?,
    };
    let mut splits = match format {
        DataFormat::Builtin => super::builtin::open()?,
        DataFormat::Imagefolder => super::image_folder::open(need_path(spec)?, spec)?,
        DataFormat::Cifar10 => super::cifar::open(need_path(spec)?, false)?,
        DataFormat::Cifar100 => super::cifar::open(need_path(spec)?, true)?,
        DataFormat::Idx => super::idx::open(need_path(spec)?)?,
        DataFormat::Csv => super::csv_labels::open(need_path(spec)?, spec)?,
    };
    if let Some(n) = spec.limit_train {
        splits.train = limit(splits.train, n, spec.seed);
    }
    if let Some(n) = spec.limit_val {
        splits.val = limit(splits.val, n, spec.seed.wrapping_add(1));
    }
    Ok(splits)
}

fn need_path(spec: &DataSpec) -> Result<&Path> {
    spec.path
        .as_deref()
        .ok_or_else(|| Error::Invalid("--data-format needs --data PATH".into()))
}

fn limit(d: Arc<dyn Dataset>, n: usize, seed: u64) -> Arc<dyn Dataset> {
    if n >= d.len() {
        return d;
    }
    let indices = stratified_subset(&labels_of(d.as_ref()), n, seed);
    Arc::new(Subset { base: d, indices })
}

/// Splits one labelled set into stratified train / val subsets.
pub fn split_one(
    all: Arc<dyn Dataset>,
    val_fraction: f64,
    seed: u64,
) -> (Arc<dyn Dataset>, Arc<dyn Dataset>) {
    let (train, val) = stratified_split(&labels_of(all.as_ref()), val_fraction, seed);
    (
        Arc::new(Subset {
            base: all.clone(),
            indices: train,
        }),
        Arc::new(Subset {
            base: all,
            indices: val,
        }),
    )
}
