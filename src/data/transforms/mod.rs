//! From a decoded image to the normalised `[C, H, W]` floats a model eats.
//!
//! Order, as in torchvision's reference scripts and the papers:
//! 1. geometry: one crop box in the source image (centre, padded random crop, random-resized
//!    crop, VGG scale jittering, or a fixed test-time view) resized to `size x size`;
//! 2. flips (horizontal, optionally vertical), folded into the copy to floats in [0, 1];
//! 3. colour: jitter (brightness, contrast, saturation, hue), then AlexNet PCA lighting;
//! 4. normalisation, `(v - mean) / std` per channel (std = 1 for VGG-style mean subtraction);
//! 5. random erasing.
//!
//! Randomness comes from one seed per `(run seed, epoch, sample)`, drawn in that fixed order,
//! so the output never depends on which thread did the work.

pub mod colour;
pub mod geometry;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::dataset::RawImage;
use crate::error::{Error, Result};
pub use colour::Pca;
pub use geometry::{CropBox, CropPos, Interpolation, fit};
use geometry::{crop_resize, fixed_box, jitter_box, pad_index, resized_crop_box};

/// How the training crop is chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CropMode {
    /// Shorter side to the input size, centre square: no geometric randomness.
    #[default]
    Center,
    /// Centre as above, then padded by `crop_padding` px and randomly cropped back (the
    /// standard CIFAR augmentation).
    Pad,
    /// Random-resized-crop over `scale` (area fraction) and `ratio` (aspect ratio).
    Resized,
    /// VGG scale jittering: shorter side to S in `jitter` px, then a random crop.
    ScaleJitter,
}

/// What fills the border of a padded crop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaddingMode {
    #[default]
    Zero,
    /// Mirror without repeating the edge pixel.
    Reflect,
}

/// Training-time augmentation (the recipe's `[augment]` section).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Augment {
    pub crop: CropMode,
    /// Pixels of padding on each side for `crop = "pad"`.
    pub crop_padding: usize,
    pub padding_mode: PaddingMode,
    /// Random-resized-crop: range of the box's area as a fraction of the image's.
    pub scale: [f64; 2],
    /// Random-resized-crop: range of the box's width / height (drawn log-uniformly).
    pub ratio: [f64; 2],
    /// Scale jittering: `[S_min, S_max]`, the shorter side in pixels before the crop;
    /// `[0, 0]` means `[8/7, 16/7] x input size` (VGG's 256-512 for 224).
    pub jitter: [usize; 2],
    /// Probability of a horizontal flip.
    pub hflip: f64,
    /// Probability of a vertical flip (off for natural photos; useful for texture or
    /// microscopy data).
    pub vflip: f64,
    /// Standard deviation of AlexNet's PCA lighting coefficients (0 = off; the paper's 0.1).
    pub pca_lighting: f64,
    /// Colour jitter strengths: factors from `[1 - x, 1 + x]`; hue as a fraction of a turn
    /// in [0, 0.5].
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
    /// Probability of random erasing.
    pub erasing: f64,
    pub interpolation: Interpolation,
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            hflip: 0.5,
            ..Augment::none()
        }
    }
}

impl Augment {
    /// No augmentation at all.
    pub fn none() -> Self {
        Augment {
            crop: CropMode::Center,
            crop_padding: 0,
            padding_mode: PaddingMode::Zero,
            scale: [0.08, 1.0],
            ratio: [0.75, 4.0 / 3.0],
            jitter: [0, 0],
            hflip: 0.0,
            vflip: 0.0,
            pca_lighting: 0.0,
            brightness: 0.0,
            contrast: 0.0,
            saturation: 0.0,
            hue: 0.0,
            erasing: 0.0,
            interpolation: Interpolation::Bilinear,
        }
    }

    /// Range checks; errors name the `augment.*` key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: &str| {
            Err(Error::Recipe {
                origin: String::new(),
                key: format!("augment.{key}"),
                reason: reason.into(),
            })
        };
        for (key, p) in [
            ("hflip", self.hflip),
            ("vflip", self.vflip),
            ("erasing", self.erasing),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(key, "must be a probability in [0, 1]");
            }
        }
        if (self.crop == CropMode::Pad) != (self.crop_padding > 0) {
            return bad(
                "crop_padding",
                "a padded random crop needs both crop = \"pad\" and crop_padding >= 1",
            );
        }
        let [s0, s1] = self.scale;
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 1.0) {
            return bad("scale", "must be [min, max] with 0 < min <= max <= 1");
        }
        let [r0, r1] = self.ratio;
        if !(r0 > 0.0 && r0 <= r1) {
            return bad("ratio", "must be [min, max] with 0 < min <= max");
        }
        if self.jitter[0] > self.jitter[1] {
            return bad("jitter", "must be [S_min, S_max] with S_min <= S_max");
        }
        for (key, x) in [
            ("pca_lighting", self.pca_lighting),
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            if !(x >= 0.0 && x.is_finite()) {
                return bad(key, "must be a finite number >= 0");
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            return bad("hue", "must be in [0, 0.5] (a fraction of a turn)");
        }
        Ok(())
    }

    fn colour_jitter(&self) -> Option<[f64; 4]> {
        let j = [self.brightness, self.contrast, self.saturation, self.hue];
        j.iter().any(|&x| x > 0.0).then_some(j)
    }
}

/// One deterministic test-time view: the shorter side resized to `resize` (at least the
/// input size), the `size x size` crop at `pos`, optionally mirrored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct View {
    pub resize: usize,
    pub pos: CropPos,
    pub flip: bool,
    pub interpolation: Interpolation,
}

impl View {
    /// The single centre crop at the input size.
    pub fn center() -> Self {
        View {
            resize: 0,
            pos: CropPos::Center,
            flip: false,
            interpolation: Interpolation::Bilinear,
        }
    }
}

/// Training augmentation or one fixed evaluation view.
#[derive(Clone, Debug)]
pub enum Mode {
    Train(Augment),
    Eval(View),
}

/// Everything needed to turn one image into model input.
#[derive(Clone, Debug)]
pub struct Transform {
    pub channels: usize,
    pub size: usize,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// The training set's RGB principal components, for PCA lighting.
    pub pca: Option<Pca>,
    pub mode: Mode,
}

impl Transform {
    /// Floats per sample: `C * H * W`.
    pub fn sample_len(&self) -> usize {
        self.channels * self.size * self.size
    }

    /// Writes the transformed image into `out` (`[C, H, W]`, length [`Self::sample_len`]).
    /// `seed` drives training augmentation; `None` (or an evaluation mode) means none.
    pub fn apply(&self, img: RawImage, seed: Option<u64>, out: &mut [f32]) {
        let s = self.size;
        let (w, h) = (img.width, img.height);
        match (&self.mode, seed) {
            (Mode::Train(a), Some(seed)) => {
                let mut rng = ChaCha8Rng::seed_from_u64(seed);
                let (b, shift) = match a.crop {
                    CropMode::Center | CropMode::Pad => {
                        let b = fixed_box(w, h, s, s, CropPos::Center);
                        let p = a.crop_padding as i64;
                        let shift = if a.crop == CropMode::Pad {
                            let dy = rng.random_range(-p..=p) as isize;
                            (dy, rng.random_range(-p..=p) as isize)
                        } else {
                            (0, 0)
                        };
                        (b, shift)
                    }
                    CropMode::Resized => {
                        (resized_crop_box(w, h, a.scale, a.ratio, &mut rng), (0, 0))
                    }
                    CropMode::ScaleJitter => {
                        let j = if a.jitter == [0, 0] {
                            [(s * 8).div_ceil(7), (s * 16).div_ceil(7)]
                        } else {
                            a.jitter
                        };
                        (jitter_box(w, h, s, j, &mut rng), (0, 0))
                    }
                };
                let hflip = a.hflip > 0.0 && rng.random_bool(a.hflip);
                let vflip = a.vflip > 0.0 && rng.random_bool(a.vflip);
                let img = crop_resize(img, b, s, s, a.interpolation);
                let reflect = a.padding_mode == PaddingMode::Reflect;
                self.write_unit(&img, shift, hflip, vflip, reflect, out);
                let hw = s * s;
                if let Some(j) = a.colour_jitter() {
                    colour::colour_jitter(out, hw, j, &mut rng);
                }
                if a.pca_lighting > 0.0
                    && let Some(pca) = self.pca.as_ref().filter(|_| self.channels == 3)
                {
                    let alpha = colour::pca_alpha(a.pca_lighting, &mut rng);
                    colour::add_per_channel(out, hw, &pca.offset(alpha));
                }
                self.normalise(out);
                colour::random_erase(out, s, a.erasing, &mut rng);
            }
            (Mode::Eval(v), _) => {
                let b = fixed_box(w, h, v.resize, s, v.pos);
                let img = crop_resize(img, b, s, s, v.interpolation);
                self.write_unit(&img, (0, 0), v.flip, false, false, out);
                self.normalise(out);
            }
            (Mode::Train(_), None) => {
                let img = fit(img, s);
                self.write_unit(&img, (0, 0), false, false, false, out);
                self.normalise(out);
            }
        }
    }

    /// Copies `img` (`size x size`, interleaved) into planar floats in [0, 1], shifted by
    /// `(dy, dx)` with zero or reflect padding and optionally mirrored.
    fn write_unit(
        &self,
        img: &RawImage,
        (dy, dx): (isize, isize),
        hflip: bool,
        vflip: bool,
        reflect: bool,
        out: &mut [f32],
    ) {
        let (s, c) = (self.size, self.channels);
        let hw = s * s;
        let plain = !hflip && dx == 0;
        // Source column of each output column (None = zero padding); only shifted or mirrored
        // rows need it, so the common case allocates nothing.
        let cols: Vec<Option<usize>> = if plain {
            Vec::new()
        } else {
            (0..s)
                .map(|x| pad_index(if hflip { s - 1 - x } else { x } as isize + dx, s, reflect))
                .collect()
        };
        for y in 0..s {
            let yy = if vflip { s - 1 - y } else { y } as isize + dy;
            let row_out = y * s;
            let Some(sy) = pad_index(yy, s, reflect) else {
                for ch in 0..c {
                    out[ch * hw + row_out..ch * hw + row_out + s].fill(0.0);
                }
                continue;
            };
            let row = &img.pixels[sy * s * c..(sy + 1) * s * c];
            for ch in 0..c {
                let dst = &mut out[ch * hw + row_out..ch * hw + row_out + s];
                if plain {
                    for (d, px) in dst.iter_mut().zip(row.chunks_exact(c)) {
                        *d = px[ch] as f32 * (1.0 / 255.0);
                    }
                } else {
                    for (d, col) in dst.iter_mut().zip(&cols) {
                        *d = col.map_or(0.0, |sx| row[sx * c + ch] as f32 * (1.0 / 255.0));
                    }
                }
            }
        }
    }

    fn normalise(&self, out: &mut [f32]) {
        let hw = self.size * self.size;
        for ((plane, &m), &sd) in out.chunks_exact_mut(hw).zip(&self.mean).zip(&self.std) {
            let inv = 1.0 / sd;
            plane.iter_mut().for_each(|v| *v = (*v - m) * inv);
        }
    }
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

    /// Identity normalisation: output = pixel value (mean 0, std 1/255).
    fn plain(size: usize, augment: Augment) -> Transform {
        Transform {
            channels: 1,
            size,
            mean: vec![0.0],
            std: vec![1.0 / 255.0],
            pca: None,
            mode: Mode::Train(augment),
        }
    }

    fn run(t: &Transform, img: RawImage, seed: u64) -> Vec<f32> {
        let mut out = vec![0.0; t.sample_len()];
        t.apply(img, Some(seed), &mut out);
        out.iter().map(|v| v.round()).collect()
    }

    #[test]
    fn identity_without_augmentation() {
        let t = plain(4, Augment::none());
        assert_eq!(
            run(&t, ramp(4), 0),
            (0..16).map(|i| i as f32).collect::<Vec<_>>()
        );
    }

    #[test]
    fn flips_mirror_exactly() {
        let t = plain(
            3,
            Augment {
                hflip: 1.0,
                ..Augment::none()
            },
        );
        assert_eq!(
            run(&t, ramp(3), 5),
            vec![2., 1., 0., 5., 4., 3., 8., 7., 6.]
        );
        let t = plain(
            3,
            Augment {
                vflip: 1.0,
                ..Augment::none()
            },
        );
        assert_eq!(
            run(&t, ramp(3), 5),
            vec![6., 7., 8., 3., 4., 5., 0., 1., 2.]
        );
    }

    fn shifted(out: &[f32], n: usize, p: isize, reflect: bool) -> bool {
        (-p..=p).any(|dy| {
            (-p..=p).any(|dx| {
                (0..n * n).all(|i| {
                    let y = pad_index((i / n) as isize + dy, n, reflect);
                    let x = pad_index((i % n) as isize + dx, n, reflect);
                    let want = y.zip(x).map_or(0.0, |(y, x)| (y * n + x) as f32);
                    out[i] == want
                })
            })
        })
    }

    #[test]
    fn padded_crop_is_a_shift_with_zero_or_reflect_fill() {
        for reflect in [false, true] {
            let a = Augment {
                crop: CropMode::Pad,
                crop_padding: 2,
                padding_mode: if reflect {
                    PaddingMode::Reflect
                } else {
                    PaddingMode::Zero
                },
                ..Augment::none()
            };
            let t = plain(4, a);
            let mut distinct = std::collections::HashSet::new();
            for seed in 0..30 {
                let out = run(&t, ramp(4), seed);
                assert!(shifted(&out, 4, 2, reflect), "seed {seed}: {out:?}");
                distinct.insert(out.iter().map(|v| *v as i32).collect::<Vec<_>>());
            }
            assert!(distinct.len() > 5);
        }
        // Golden: a shift of (+1, -1) under reflect padding of a 3x3 ramp.
        let t = plain(3, Augment::none());
        let mut out = vec![0.0; 9];
        t.write_unit(&ramp(3), (1, -1), false, false, true, &mut out);
        assert_eq!(
            out.iter()
                .map(|v| v * 255.0)
                .map(f32::round)
                .collect::<Vec<_>>(),
            vec![4., 3., 4., 7., 6., 7., 4., 3., 4.]
        );
    }

    #[test]
    fn resized_crop_output_has_input_size_and_is_seeded() {
        let img = RawImage {
            width: 50,
            height: 30,
            channels: 3,
            pixels: (0..50 * 30 * 3).map(|i| (i % 251) as u8).collect(),
        };
        let t = Transform {
            channels: 3,
            size: 8,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
            pca: None,
            mode: Mode::Train(Augment {
                crop: CropMode::Resized,
                ..Augment::none()
            }),
        };
        let a = run(&t, img.clone(), 3);
        assert_eq!(a.len(), 3 * 64);
        assert_eq!(a, run(&t, img.clone(), 3));
        let mut t2 = t.clone();
        t2.mode = Mode::Train(Augment {
            crop: CropMode::ScaleJitter,
            jitter: [8, 16],
            ..Augment::none()
        });
        let mut out = vec![0.0; 3 * 64];
        t2.apply(img, Some(1), &mut out);
        assert!(out.iter().all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn pca_lighting_adds_the_formula_offset() {
        let img = RawImage {
            width: 2,
            height: 2,
            channels: 3,
            pixels: vec![128; 12],
        };
        let pca = Pca {
            eigval: [0.2, 0.02, 0.002],
            eigvec: [[0.6, -0.7, 0.4], [0.6, 0.0, -0.8], [0.5, 0.7, 0.5]],
        };
        let t = Transform {
            channels: 3,
            size: 2,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
            pca: Some(pca.clone()),
            mode: Mode::Train(Augment {
                pca_lighting: 0.1,
                ..Augment::none()
            }),
        };
        let mut out = vec![0.0; 12];
        t.apply(img, Some(9), &mut out);
        // Redraw the coefficients the transform drew from the same seed.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let o = pca.offset(colour::pca_alpha(0.1, &mut rng));
        for ch in 0..3 {
            for p in 0..4 {
                assert!((out[ch * 4 + p] - (128.0 / 255.0 + o[ch])).abs() < 1e-6);
            }
        }
        assert!(o.iter().any(|v| v.abs() > 1e-4));
    }

    #[test]
    fn eval_views_crop_corners_and_flip() {
        // 4x4 ramp, resize 4 (no resampling), 2x2 crops.
        let view = |pos, flip| Transform {
            channels: 1,
            size: 2,
            mean: vec![0.0],
            std: vec![1.0 / 255.0],
            pca: None,
            mode: Mode::Eval(View {
                resize: 4,
                pos,
                flip,
                interpolation: Interpolation::Bilinear,
            }),
        };
        let got = |t: Transform| run(&t, ramp(4), 0);
        assert_eq!(got(view(CropPos::TopLeft, false)), vec![0., 1., 4., 5.]);
        assert_eq!(got(view(CropPos::TopRight, false)), vec![2., 3., 6., 7.]);
        assert_eq!(
            got(view(CropPos::BottomLeft, false)),
            vec![8., 9., 12., 13.]
        );
        assert_eq!(
            got(view(CropPos::BottomRight, true)),
            vec![11., 10., 15., 14.]
        );
        assert_eq!(got(view(CropPos::Center, false)), vec![5., 6., 9., 10.]);
    }

    #[test]
    fn normalisation_uses_mean_and_std() {
        let t = Transform {
            channels: 1,
            size: 1,
            mean: vec![0.5],
            std: vec![0.25],
            pca: None,
            mode: Mode::Eval(View::center()),
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

    #[test]
    fn validation_names_the_key() {
        let e = Augment {
            crop_padding: 2,
            ..Augment::none()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("augment.crop_padding"), "{e}");
        let e = Augment {
            scale: [0.5, 0.2],
            ..Augment::none()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("augment.scale"), "{e}");
        assert!(Augment::default().validate().is_ok());
    }
}
