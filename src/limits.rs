//! The stated limits on every size a user or a file can set, checked before anything is
//! allocated or spawned, so no input makes convlab abort, hang or exhaust memory. Each is far
//! above what the classic networks need (VGG-19: 144 M parameters at 224 px) and each error
//! names the field, the value and the limit.

use crate::error::{Error, Result};

/// Compute threads (`--threads`): more than this only thrashes; 2,000 already makes no progress.
pub const MAX_THREADS: usize = 1024;
/// Loader worker threads (`data.workers`).
pub const MAX_WORKERS: usize = 256;
/// Side of a model's input, of an evaluation scale or of `data stats --size`, in pixels
/// (4x ImageNet's 224 with room to spare; a 1024 px RGB batch of 64 is 0.8 GB of f32).
pub const MAX_IMAGE_SIDE: usize = 1024;
/// Channels of any one layer (`model.plan`, `model.conv_widths`) and FC width (`model.hidden`).
pub const MAX_WIDTH: usize = 16_384;
/// Learned parameters of a configured model: 500 M is 2 GB of f32 weights, about 6 GB with
/// gradients and momentum.
pub const MAX_PARAMS: f64 = 5e8;
/// Layers in a `model.plan`.
pub const MAX_PLAN_LAYERS: usize = 256;
/// Classes of a dataset or a model.
pub const MAX_CLASSES: usize = 100_000;
/// Images per batch.
pub const MAX_BATCH: usize = 65_536;
/// Epochs of a recipe.
pub const MAX_EPOCHS: usize = 1_000_000;
/// Scales of multi-scale testing (`eval --scales`).
pub const MAX_SCALES: usize = 16;
/// Bytes of one data file after decompression (CIFAR batches, IDX files): Fashion-MNIST's
/// training images are 47 MB, CIFAR-100's train.bin 154 MB.
pub const MAX_DATA_FILE_BYTES: u64 = 4 << 30;
/// Width or height of a decoded image file, in pixels.
pub const MAX_DECODED_SIDE: u32 = 32_768;
/// Bytes the image decoder may allocate for one image.
pub const MAX_DECODED_BYTES: u64 = 1 << 30;
/// Images found while walking one ImageFolder.
pub const MAX_FOLDER_FILES: usize = 50_000_000;

/// `Ok` when `min <= value <= max`, else an error naming `field`, the value and the range.
pub fn check(field: &str, value: usize, min: usize, max: usize) -> Result<usize> {
    if value < min || value > max {
        return Err(Error::Invalid(format!(
            "{field} = {value} is out of range: it must be between {min} and {max}"
        )));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_names_the_field_and_the_limit() {
        assert_eq!(check("--threads", 4, 1, MAX_THREADS).unwrap(), 4);
        let e = check("--threads", 100_000, 1, MAX_THREADS)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--threads") && e.contains("100000") && e.contains("1024"),
            "{e}"
        );
        assert!(check("--k", 0, 1, 10).is_err());
    }
}
