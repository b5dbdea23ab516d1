//! The built-in dataset: the Fashion-MNIST test set (t10k, 10,000 28x28 grey images, MIT
//! licence, see `assets/fashion-mnist/LICENSE`), compiled into the binary and split
//! deterministically and stratified into 8,000 train and 2,000 val images (800 / 200 per class).

use std::path::Path;
use std::sync::Arc;

use crate::error::Result;

use super::dataset::{DataFormat, Splits, split_one};
use super::idx::{FASHION_CLASSES, decompress_if_gz, from_parsed, parse_images, parse_labels};

static IMAGES_GZ: &[u8] = include_bytes!("../../assets/fashion-mnist/t10k-images-idx3-ubyte.gz");
static LABELS_GZ: &[u8] = include_bytes!("../../assets/fashion-mnist/t10k-labels-idx1-ubyte.gz");

/// The split is part of the dataset's definition, so its seed is fixed, not the run's seed.
pub const SPLIT_SEED: u64 = 20_171_025;
/// 2,000 of 10,000 images are held out.
pub const VAL_FRACTION: f64 = 0.2;

/// Decodes the embedded files and returns the fixed 8,000 / 2,000 split.
pub fn open() -> Result<Splits> {
    let ip = Path::new("<builtin>/t10k-images-idx3-ubyte.gz");
    let lp = Path::new("<builtin>/t10k-labels-idx1-ubyte.gz");
    let images = parse_images(&decompress_if_gz(IMAGES_GZ.to_vec(), ip)?, ip)?;
    let labels = parse_labels(&decompress_if_gz(LABELS_GZ.to_vec(), lp)?, lp)?;
    let all = from_parsed(ip, lp, images, labels)?;
    let (train, val) = split_one(Arc::new(all), VAL_FRACTION, SPLIT_SEED);
    Ok(Splits {
        train,
        val,
        classes: FASHION_CLASSES.iter().map(|s| s.to_string()).collect(),
        channels: 1,
        native_size: Some(28),
        format: DataFormat::Builtin,
        val_name: "val".into(),
        warnings: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_split_sizes_and_balance() {
        let s = open().unwrap();
        assert_eq!(s.train.len(), 8000);
        assert_eq!(s.val.len(), 2000);
        let mut counts = [0usize; 10];
        for i in 0..s.val.len() {
            counts[s.val.label(i)] += 1;
        }
        assert_eq!(counts, [200; 10]);
        let img = s.train.image(0, 1).unwrap();
        assert_eq!((img.width, img.height, img.pixels.len()), (28, 28, 784));
    }
}
