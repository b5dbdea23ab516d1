//! From a decoded image to the normalised `[C, H, W]` floats a model eats.
//!
//! Order, as in torchvision's reference scripts: fit to the input size (resize the shorter side,
//! centre-crop), augment (training only: random crop with zero padding, horizontal flip), scale
//! to [0, 1], subtract the per-channel mean and divide by the standard deviation. Randomness
//! comes from a seed per `(run seed, epoch, sample)`, so the output never depends on which
//! thread did the work.

use image::imageops::FilterType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::dataset::{Dataset, RawImage};
use crate::error::Result;

/// Training-time augmentation (the recipe's `[augment]` section).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    /// Pixels of zero padding on each side before a random crop back to the input size
    /// (0 = no random crop). 2-4 px is the usual value for 28-32 px images.
    pub crop_padding: usize,
    /// Probability of a horizontal flip.
    pub hflip: f64,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            crop_padding: 0,
            hflip: 0.5,
        }
    }
}

impl Augment {
    /// No augmentation at all (evaluation).
    pub fn none() -> Self {
        Augment {
            crop_padding: 0,
            hflip: 0.0,
        }
    }
}

/// Everything needed to turn one image into model input.
#[derive(Clone, Debug)]
pub struct Transform {
    pub channels: usize,
    pub size: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    pub augment: Augment,
}

impl Transform {
    /// Floats per sample: `C * H * W`.
    pub fn sample_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// Writes the transformed image into `out` (`[C, H, W]`, length [`Self::sample_len`]).
    /// `seed` drives the augmentation; `None` means none (evaluation).
    pub fn apply(&self, img: RawImage, seed: Option<u64>, out: &mut [f32]) {
        let img = fit(img, self.size);
        let s = self.size;
        let c = self.channels;
        let (mut dy, mut dx, mut flip) = (0isize, 0isize, false);
        if let Some(seed) = seed {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let p = self.augment.crop_padding as i64;
            if p > 0 {
                dy = rng.random_range(-p..=p) as isize;
                dx = rng.random_range(-p..=p) as isize;
            }
            flip = self.augment.hflip > 0.0 && rng.random_bool(self.augment.hflip.min(1.0));
        }
        let scale: Vec<f32> = self.std.iter().map(|s| 1.0 / (255.0 * s)).collect();
        let shift: Vec<f32> = self
            .mean
            .iter()
            .zip(&self.std)
            .map(|(m, s)| m / s)
            .collect();
        for y in 0..s {
            let sy = y as isize + dy;
            for x in 0..s {
                let xs = if flip { s - 1 - x } else { x } as isize + dx;
                let inside = sy >= 0 && sy < s as isize && xs >= 0 && xs < s as isize;
                for ch in 0..c {
                    let v = if inside {
                        img.pixels[(sy as usize * s + xs as usize) * c + ch] as f32
                    } else {
                        0.0
                    };
                    out[ch * s * s + y * s + x] = v * scale[ch] - shift[ch];
                }
            }
        }
    }
}

/// Resizes the shorter side to `size` (bilinear, anti-aliased when shrinking), then takes the
/// centre `size x size` crop. Images already of that size pass through untouched.
pub fn fit(img: RawImage, size: usize) -> RawImage {
    if img.width == size && img.height == size {
        return img;
    }
    let (w, h) = (img.width, img.height);
    let (nw, nh) = if w <= h {
        (
            size,
            ((h * size) as f64 / w as f64).round().max(size as f64) as usize,
        )
    } else {
        (
            ((w * size) as f64 / h as f64).round().max(size as f64) as usize,
            size,
        )
    };
    let resized: Vec<u8> = if img.channels == 1 {
        let buf = image::GrayImage::from_raw(w as u32, h as u32, img.pixels).expect("sized");
        image::imageops::resize(&buf, nw as u32, nh as u32, FilterType::Triangle).into_raw()
    } else {
        let buf = image::RgbImage::from_raw(w as u32, h as u32, img.pixels).expect("sized");
        image::imageops::resize(&buf, nw as u32, nh as u32, FilterType::Triangle).into_raw()
    };
    let (x0, y0) = ((nw - size) / 2, (nh - size) / 2);
    let c = img.channels;
    let mut pixels = Vec::with_capacity(size * size * c);
    for y in 0..size {
        let row = ((y0 + y) * nw + x0) * c;
        pixels.extend_from_slice(&resized[row..row + size * c]);
    }
    RawImage {
        width: size,
        height: size,
        channels: c,
        pixels,
    }
}

/// Per-channel mean and standard deviation of pixel values in [0, 1] over (at most `max`,
/// evenly spaced) images of `data`, after fitting them to `size`. These are the statistics the
/// normalisation uses; they are computed once per run and stored in its recipe.
pub fn channel_stats(
    data: &dyn Dataset,
    channels: usize,
    size: usize,
    max: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    use rayon::prelude::*;
    let n = data.len();
    let step = n.div_ceil(max.max(1)).max(1);
    let picks: Vec<usize> = (0..n).step_by(step).collect();
    let sums = picks
        .par_iter()
        .map(|&i| -> Result<Vec<f64>> {
            let img = fit(data.image(i, channels)?, size);
            let mut acc = vec![0f64; 2 * channels];
            for px in img.pixels.chunks_exact(channels) {
                for (ch, &v) in px.iter().enumerate() {
                    let v = v as f64 / 255.0;
                    acc[ch] += v;
                    acc[channels + ch] += v * v;
                }
            }
            Ok(acc)
        })
        .try_reduce(
            || vec![0f64; 2 * channels],
            |a, b| Ok(a.iter().zip(&b).map(|(x, y)| x + y).collect()),
        )?;
    let count = (picks.len() * size * size) as f64;
    let mean: Vec<f64> = sums[..channels].iter().map(|s| s / count).collect();
    let std: Vec<f32> = (0..channels)
        .map(|ch| ((sums[channels + ch] / count - mean[ch] * mean[ch]).max(1e-12)).sqrt() as f32)
        .collect();
    Ok((mean.into_iter().map(|m| m as f32).collect(), std))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(size: usize) -> RawImage {
        RawImage {
            width: size,
            height: size,
            channels: 1,
            pixels: (0..size * size).map(|i| i as u8).collect(),
        }
    }

    fn plain(size: usize) -> Transform {
        Transform {
            channels: 1,
            size,
            mean: vec![0.0],
            std: vec![1.0 / 255.0],
            augment: Augment::none(),
        }
    }

    #[test]
    fn identity_without_augmentation() {
        let t = plain(4);
        let mut out = vec![0.0; 16];
        t.apply(ramp(4), None, &mut out);
        assert_eq!(out, (0..16).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn flip_mirrors_rows_exactly() {
        let mut t = plain(3);
        t.augment = Augment {
            crop_padding: 0,
            hflip: 1.0,
        };
        let mut out = vec![0.0; 9];
        t.apply(ramp(3), Some(5), &mut out);
        assert_eq!(out, vec![2., 1., 0., 5., 4., 3., 8., 7., 6.]);
    }

    #[test]
    fn padded_crop_is_a_shift_with_zero_fill() {
        let mut t = plain(4);
        t.augment = Augment {
            crop_padding: 1,
            hflip: 0.0,
        };
        // Over many seeds every output is the input shifted by at most one pixel, zero-filled.
        for seed in 0..20 {
            let mut out = vec![0.0; 16];
            t.apply(ramp(4), Some(seed), &mut out);
            let ok = (-1..=1).any(|dy: isize| {
                (-1..=1).any(|dx: isize| {
                    (0..16).all(|i| {
                        let (y, x) = ((i / 4) as isize + dy, (i % 4) as isize + dx);
                        let want = if (0..4).contains(&y) && (0..4).contains(&x) {
                            (y * 4 + x) as f32
                        } else {
                            0.0
                        };
                        out[i] == want
                    })
                })
            });
            assert!(ok, "seed {seed}: {out:?}");
        }
    }

    #[test]
    fn fit_resizes_shorter_side_and_centre_crops() {
        let img = RawImage {
            width: 8,
            height: 4,
            channels: 3,
            pixels: vec![100; 8 * 4 * 3],
        };
        let f = fit(img, 2);
        assert_eq!((f.width, f.height, f.pixels.len()), (2, 2, 12));
        assert!(f.pixels.iter().all(|&v| v == 100));
    }

    #[test]
    fn normalisation_uses_mean_and_std() {
        let t = Transform {
            channels: 1,
            size: 1,
            mean: vec![0.5],
            std: vec![0.25],
            augment: Augment::none(),
        };
        let mut out = [0.0];
        t.apply(
            RawImage {
                width: 1,
                height: 1,
                channels: 1,
                pixels: vec![255],
            },
            None,
            &mut out,
        );
        assert!((out[0] - 2.0).abs() < 1e-6);
    }
}
