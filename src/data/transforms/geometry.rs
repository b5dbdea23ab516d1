//! Where the model's square input comes from in the source image: crop boxes and resizing.
//!
//! Every geometric transform here is one crop box in source-pixel coordinates followed by one
//! resize of that box to `size x size` (fast_image_resize, SIMD, anti-aliased when shrinking).
//! "Resize the shorter side to S, then crop `size`" is the box of side `size * min(w, h) / S`,
//! so scale jittering, centre crops, ten-crop and random-resized-crop all share one resize and
//! never allocate the intermediate resized image.

use std::cell::RefCell;

use fast_image_resize::images::{TypedImage, TypedImageRef};
use fast_image_resize::pixels::{U8, U8x3};
use fast_image_resize::{FilterType, PixelTrait, ResizeAlg, ResizeOptions, Resizer};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::data::dataset::RawImage;

/// Resampling filter of every resize.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    Nearest,
    /// Anti-aliased bilinear (PIL's and torchvision's default for tensors from PIL images).
    #[default]
    Bilinear,
    /// Catmull-Rom bicubic.
    Bicubic,
    /// Box filter: each output pixel is the mean of the source area it covers (OpenCV's
    /// INTER_AREA when shrinking).
    Area,
}

impl Interpolation {
    fn alg(self) -> ResizeAlg {
        match self {
            Interpolation::Nearest => ResizeAlg::Nearest,
            Interpolation::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
            Interpolation::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
            Interpolation::Area => ResizeAlg::Convolution(FilterType::Box),
        }
    }
}

/// A crop box in source pixels (fractional: boxes come from scaled sizes).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CropBox {
    pub left: f64,
    pub top: f64,
    pub width: f64,
    pub height: f64,
}

impl CropBox {
    /// The whole image.
    pub fn full(w: usize, h: usize) -> Self {
        CropBox {
            left: 0.0,
            top: 0.0,
            width: w as f64,
            height: h as f64,
        }
    }
}

/// One of the five fixed crops of AlexNet's 10-crop test (each also flipped).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CropPos {
    Center,
    TopLeft,
    TopRight,
    BottomLeft,
    BottomRight,
}

impl CropPos {
    pub const FIVE: [CropPos; 5] = [
        CropPos::Center,
        CropPos::TopLeft,
        CropPos::TopRight,
        CropPos::BottomLeft,
        CropPos::BottomRight,
    ];
}

/// The box that "resize the shorter side to `resize`, then take the `size x size` crop at
/// `pos`" cuts from a `w x h` image. `resize < size` is treated as `size`.
pub fn fixed_box(w: usize, h: usize, resize: usize, size: usize, pos: CropPos) -> CropBox {
    let side = size as f64 * w.min(h) as f64 / resize.max(size) as f64;
    let (fw, fh) = (w as f64, h as f64);
    let (left, top) = match pos {
        CropPos::Center => ((fw - side) / 2.0, (fh - side) / 2.0),
        CropPos::TopLeft => (0.0, 0.0),
        CropPos::TopRight => (fw - side, 0.0),
        CropPos::BottomLeft => (0.0, fh - side),
        CropPos::BottomRight => (fw - side, fh - side),
    };
    CropBox {
        left,
        top,
        width: side,
        height: side,
    }
}

/// VGG scale jittering (Simonyan & Zisserman 2015, section 3.1): the shorter side is resized to
/// `s` drawn uniformly from `[s_min, s_max]`, then a random `size x size` crop is taken.
pub fn jitter_box(w: usize, h: usize, size: usize, s: [usize; 2], rng: &mut impl Rng) -> CropBox {
    let s = rng.random_range(s[0].max(size)..=s[1].max(s[0]).max(size));
    let side = size as f64 * w.min(h) as f64 / s as f64;
    let left = rng.random::<f64>() * (w as f64 - side);
    let top = rng.random::<f64>() * (h as f64 - side);
    CropBox {
        left,
        top,
        width: side,
        height: side,
    }
}

/// Random-resized-crop (Szegedy et al. 2015, "Going deeper with convolutions", section 6; the
/// "Bag of Tricks" baseline): a box covering a fraction of the area drawn from `scale` with
/// aspect ratio log-uniform in `ratio`; torchvision's algorithm, 10 tries, then the centre crop
/// clamped to the ratio range.
pub fn resized_crop_box(
    w: usize,
    h: usize,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut impl Rng,
) -> CropBox {
    let (fw, fh) = (w as f64, h as f64);
    let area = fw * fh;
    let (lr0, lr1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale[0]..=scale[1]);
        let ar = rng.random_range(lr0..=lr1).exp();
        let bw = (target * ar).sqrt().round();
        let bh = (target / ar).sqrt().round();
        if bw >= 1.0 && bh >= 1.0 && bw <= fw && bh <= fh {
            let left = rng.random_range(0..=(fw - bw) as usize) as f64;
            let top = rng.random_range(0..=(fh - bh) as usize) as f64;
            return CropBox {
                left,
                top,
                width: bw,
                height: bh,
            };
        }
    }
    let in_ratio = fw / fh;
    let (bw, bh) = if in_ratio < ratio[0] {
        (fw, (fw / ratio[0]).round())
    } else if in_ratio > ratio[1] {
        ((fh * ratio[1]).round(), fh)
    } else {
        (fw, fh)
    };
    CropBox {
        left: ((fw - bw) / 2.0).floor(),
        top: ((fh - bh) / 2.0).floor(),
        width: bw,
        height: bh,
    }
}

thread_local! {
    // The resizer keeps scratch buffers; one per loader thread avoids reallocating them.
    static RESIZER: RefCell<Resizer> = RefCell::new(Resizer::new());
}

/// Cuts `b` out of `img` and resizes it to `out_w x out_h`. A box that is exactly the whole
/// image at the output size returns the image untouched (CIFAR and MNIST never resample).
pub fn crop_resize(
    img: RawImage,
    b: CropBox,
    out_w: usize,
    out_h: usize,
    interp: Interpolation,
) -> RawImage {
    let whole = b == CropBox::full(img.width, img.height);
    if whole && img.width == out_w && img.height == out_h {
        return img;
    }
    let c = img.channels;
    let integral = [b.left, b.top, b.width, b.height]
        .iter()
        .all(|v| v.fract() == 0.0);
    if integral && b.width as usize == out_w && b.height as usize == out_h {
        // A pure crop: copy rows, no resampling.
        let (l, t) = (b.left as usize, b.top as usize);
        let mut pixels = Vec::with_capacity(out_w * out_h * c);
        for y in t..t + out_h {
            let row = (y * img.width + l) * c;
            pixels.extend_from_slice(&img.pixels[row..row + out_w * c]);
        }
        return RawImage {
            width: out_w,
            height: out_h,
            channels: c,
            pixels,
        };
    }
    let mut pixels = vec![0u8; out_w * out_h * c];
    let opts = ResizeOptions::new()
        .resize_alg(interp.alg())
        .crop(b.left, b.top, b.width, b.height);
    let (w, h) = (img.width as u32, img.height as u32);
    let (ow, oh) = (out_w as u32, out_h as u32);
    // The typed entry point for the two pixel types convlab decodes: the untyped `resize`
    // instantiates the resampler for all thirteen of the crate's pixel types, which was a fifth
    // of convlab's LLVM IR and compiled twice (library and unit tests).
    if c == 1 {
        resize_as::<U8>(w, h, &img.pixels, ow, oh, &mut pixels, &opts);
    } else {
        resize_as::<U8x3>(w, h, &img.pixels, ow, oh, &mut pixels, &opts);
    }
    RawImage {
        width: out_w,
        height: out_h,
        channels: c,
        pixels,
    }
}

/// Resamples a `w x h` image of pixel type `P` into `dst` (`ow x oh`) with this thread's
/// resizer.
fn resize_as<P: PixelTrait>(
    w: u32,
    h: u32,
    src: &[u8],
    ow: u32,
    oh: u32,
    dst: &mut [u8],
    opts: &ResizeOptions,
) {
    let src = TypedImageRef::<P>::from_buffer(w, h, src).expect("decoded buffer matches its size");
    let mut dst = TypedImage::<P>::from_buffer(ow, oh, dst).expect("buffer sized for the output");
    RESIZER.with(|r| {
        r.borrow_mut()
            .resize_typed(&src, &mut dst, opts)
            .expect("non-empty box")
    });
}

/// Resizes the shorter side to `size` and takes the centre square (bilinear). Images already
/// `size x size` pass through untouched.
pub fn fit(img: RawImage, size: usize) -> RawImage {
    let b = fixed_box(img.width, img.height, size, size, CropPos::Center);
    crop_resize(img, b, size, size, Interpolation::Bilinear)
}

/// Index into a row of `n` pixels for a (possibly out-of-range) coordinate under reflect
/// padding (`dcba|abcd|dcba` without repeating the edge, as numpy's and torchvision's
/// "reflect"). `None` means outside under zero padding.
pub fn pad_index(i: isize, n: usize, reflect: bool) -> Option<usize> {
    let n = n as isize;
    if (0..n).contains(&i) {
        return Some(i as usize);
    }
    if !reflect || n == 1 {
        return if reflect { Some(0) } else { None };
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    Some(if m < n { m } else { period - m } as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn resized_crop_boxes_respect_scale_and_ratio() {
        // Golden: seeds 0..200 on a 640x480 image, scale [0.08, 1], ratio [3/4, 4/3]. Every box
        // lies inside the image, and boxes from the 10-try loop (all of them here: the
        // fallback needs 10 misses) cover 8-100% of the area at a ratio within range up to the
        // rounding of width and height to whole pixels.
        for seed in 0..200 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let b = resized_crop_box(640, 480, [0.08, 1.0], [0.75, 4.0 / 3.0], &mut rng);
            assert!(b.left >= 0.0 && b.top >= 0.0);
            assert!(b.left + b.width <= 640.0 && b.top + b.height <= 480.0);
            let frac = b.width * b.height / (640.0 * 480.0);
            assert!((0.079..=1.0).contains(&frac), "seed {seed}: {b:?}");
            let ar = b.width / b.height;
            assert!((0.74..=1.35).contains(&ar), "seed {seed}: {b:?}");
        }
        // Same seed, same box.
        let a = resized_crop_box(
            640,
            480,
            [0.08, 1.0],
            [0.75, 4.0 / 3.0],
            &mut ChaCha8Rng::seed_from_u64(7),
        );
        let b = resized_crop_box(
            640,
            480,
            [0.08, 1.0],
            [0.75, 4.0 / 3.0],
            &mut ChaCha8Rng::seed_from_u64(7),
        );
        assert_eq!(a, b);
    }

    #[test]
    fn resized_crop_falls_back_to_a_clamped_centre_crop() {
        // A 1000x10 strip cannot hold any box of ratio <= 4/3 covering >= 90% of it.
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let b = resized_crop_box(1000, 10, [0.9, 1.0], [0.75, 4.0 / 3.0], &mut rng);
        assert_eq!(
            b,
            CropBox {
                left: 493.0,
                top: 0.0,
                width: 13.0,
                height: 10.0
            }
        );
    }

    #[test]
    fn jitter_box_is_a_crop_of_the_rescaled_image() {
        for seed in 0..50 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let b = jitter_box(300, 200, 100, [120, 240], &mut rng);
            // Side = 100 * 200 / S for S in [120, 240].
            let s = 100.0 * 200.0 / b.width;
            assert!((119.99..=240.01).contains(&s), "{b:?}");
            assert!(b.left + b.width <= 300.0 + 1e-9 && b.top + b.height <= 200.0 + 1e-9);
        }
    }

    #[test]
    fn ten_crop_boxes_are_the_corners_and_centre() {
        let c = |p| fixed_box(40, 36, 36, 32, p);
        assert_eq!(
            c(CropPos::TopLeft),
            CropBox {
                left: 0.0,
                top: 0.0,
                width: 32.0,
                height: 32.0
            }
        );
        assert_eq!(c(CropPos::BottomRight).left, 8.0);
        assert_eq!(c(CropPos::BottomRight).top, 4.0);
        assert_eq!(c(CropPos::Center).left, 4.0);
        assert_eq!(c(CropPos::Center).top, 2.0);
    }

    #[test]
    fn integral_crop_copies_pixels_exactly() {
        let img = RawImage {
            width: 4,
            height: 3,
            channels: 1,
            pixels: (0..12).collect(),
        };
        let b = CropBox {
            left: 1.0,
            top: 1.0,
            width: 2.0,
            height: 2.0,
        };
        let out = crop_resize(img, b, 2, 2, Interpolation::Bicubic);
        assert_eq!(out.pixels, vec![5, 6, 9, 10]);
    }

    #[test]
    fn area_resize_averages_blocks() {
        let img = RawImage {
            width: 4,
            height: 2,
            channels: 1,
            pixels: vec![0, 10, 20, 40, 0, 10, 20, 40],
        };
        let out = crop_resize(img, CropBox::full(4, 2), 2, 1, Interpolation::Area);
        assert_eq!(out.pixels, vec![5, 30]);
    }

    /// The RGB path (fast_image_resize's `U8x3`): channels stay interleaved and apart.
    #[test]
    fn area_resize_averages_rgb_blocks() {
        let row = [0, 100, 200, 10, 110, 200, 20, 120, 0, 40, 140, 0];
        let img = RawImage {
            width: 4,
            height: 2,
            channels: 3,
            pixels: [row, row].concat(),
        };
        let out = crop_resize(img, CropBox::full(4, 2), 2, 1, Interpolation::Area);
        assert_eq!(out.pixels, vec![5, 105, 200, 30, 130, 0]);
    }

    #[test]
    fn reflect_and_zero_padding_indices() {
        let r: Vec<_> = (-3..7).map(|i| pad_index(i, 4, true).unwrap()).collect();
        assert_eq!(r, vec![3, 2, 1, 0, 1, 2, 3, 2, 1, 0]);
        assert_eq!(pad_index(-1, 4, false), None);
        assert_eq!(pad_index(2, 4, false), Some(2));
    }
}
