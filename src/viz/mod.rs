//! Seeing inside a trained network, after Zeiler & Fergus (2014), "Visualizing and
//! Understanding Convolutional Networks": filters, feature maps, top activating images,
//! deconvnet projections, saliency and guided backpropagation, Grad-CAM (Selvaraju et al.
//! 2017), occlusion maps, and filters across epochs. Every function returns RGB images; the
//! CLI writes them as PNG.

pub mod attribution;
pub mod maps;

use burn::prelude::*;
use image::{Rgb, RgbImage};

use crate::data::Dataset;
use crate::data::transforms::{Mode, Transform, fit};
use crate::error::{Error, Result};
use crate::pipeline::transform;
use crate::recipe::Recipe;

/// One input image: the model's `[1, C, H, W]` tensor and what it looks like (fitted to the
/// input size, RGB).
pub struct Input {
    pub tensor: Tensor<4>,
    pub picture: RgbImage,
}

/// Fits and normalises `img` the way the run evaluates images.
pub fn input_from_raw(recipe: &Recipe, img: crate::data::RawImage, device: &Device) -> Input {
    let t: Transform = transform(recipe, false);
    let mut buf = vec![0f32; t.sample_len()];
    let size = t.size;
    let shown = fit(img.clone(), size);
    t.apply(img, None, &mut buf);
    debug_assert!(matches!(t.mode, Mode::Eval(_)));
    Input {
        tensor: Tensor::from_data(TensorData::new(buf, [1, t.channels, size, size]), device),
        picture: to_rgb(&shown),
    }
}

/// Reads an image file and prepares it as [`input_from_raw`] does.
pub fn input_from_file(recipe: &Recipe, path: &std::path::Path, device: &Device) -> Result<Input> {
    let img = crate::data::image_folder::decode_file(path, recipe.model.in_channels)?;
    Ok(input_from_raw(recipe, img, device))
}

/// Sample `index` of `data`.
pub fn input_from_dataset(
    recipe: &Recipe,
    data: &dyn Dataset,
    index: usize,
    device: &Device,
) -> Result<Input> {
    Ok(input_from_raw(
        recipe,
        data.image(index, recipe.model.in_channels)?,
        device,
    ))
}

fn to_rgb(img: &crate::data::RawImage) -> RgbImage {
    RgbImage::from_fn(img.width as u32, img.height as u32, |x, y| {
        let p = (y as usize * img.width + x as usize) * img.channels;
        if img.channels == 1 {
            let v = img.pixels[p];
            Rgb([v, v, v])
        } else {
            Rgb([img.pixels[p], img.pixels[p + 1], img.pixels[p + 2]])
        }
    })
}

pub use crate::helpers::host;

/// Scales values linearly to 0..=255 (constant input gives mid grey).
pub fn to_u8(v: &[f32]) -> Vec<u8> {
    let (lo, hi) = v
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let span = hi - lo;
    v.iter()
        .map(|&x| {
            if span > 0.0 && span.is_finite() {
                ((x - lo) / span * 255.0).round() as u8
            } else {
                128
            }
        })
        .collect()
}

/// A heat colour map (black - red - yellow - white, like matplotlib's "hot") of `t` in [0, 1].
pub fn heat(t: f32) -> Rgb<u8> {
    let t = t.clamp(0.0, 1.0) * 3.0;
    let c = |x: f32| (x.clamp(0.0, 1.0) * 255.0).round() as u8;
    Rgb([c(t), c(t - 1.0), c(t - 2.0)])
}

/// Distinct colours for class indices (categorical maps).
pub fn class_colour(k: usize) -> Rgb<u8> {
    const P: [[u8; 3]; 10] = [
        [31, 119, 180],
        [255, 127, 14],
        [44, 160, 44],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [227, 119, 194],
        [127, 127, 127],
        [188, 189, 34],
        [23, 190, 207],
    ];
    let base = P[k % 10];
    let shade = 1.0 - 0.3 * ((k / 10) % 3) as f32;
    Rgb(base.map(|v| (v as f32 * shade) as u8))
}

/// A `h x w` map of values as a heat-coloured image (normalised to its own range).
pub fn heat_image(v: &[f32], w: usize, h: usize) -> RgbImage {
    let u = to_u8(v);
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        heat(u[y as usize * w + x as usize] as f32 / 255.0)
    })
}

/// A grey (`c == 1`) or colour (`c == 3`) tile from planar values, normalised together.
pub fn tile(v: &[f32], c: usize, w: usize, h: usize) -> RgbImage {
    let u = to_u8(v);
    let hw = w * h;
    RgbImage::from_fn(w as u32, h as u32, |x, y| {
        let p = y as usize * w + x as usize;
        if c == 3 {
            Rgb([u[p], u[hw + p], u[2 * hw + p]])
        } else {
            Rgb([u[p], u[p], u[p]])
        }
    })
}

/// Nearest-neighbour upscaling so the longer side is at least `min` pixels.
pub fn enlarge(img: &RgbImage, min: u32) -> RgbImage {
    let f = min.div_ceil(img.width().max(img.height()).max(1)).max(1);
    if f == 1 {
        return img.clone();
    }
    image::imageops::resize(
        img,
        img.width() * f,
        img.height() * f,
        image::imageops::FilterType::Nearest,
    )
}

/// Lays tiles out in rows of `cols` with a 2 px white gap; tiles are enlarged to a common size.
pub fn grid(tiles: &[RgbImage], cols: usize, min_tile: u32) -> RgbImage {
    let tiles: Vec<RgbImage> = tiles.iter().map(|t| enlarge(t, min_tile)).collect();
    let tw = tiles.iter().map(|t| t.width()).max().unwrap_or(1);
    let th = tiles.iter().map(|t| t.height()).max().unwrap_or(1);
    let cols = cols.max(1).min(tiles.len().max(1));
    let rows = tiles.len().div_ceil(cols).max(1);
    let gap = 2;
    let mut out = RgbImage::from_pixel(
        cols as u32 * (tw + gap) + gap,
        rows as u32 * (th + gap) + gap,
        Rgb([255, 255, 255]),
    );
    for (i, t) in tiles.iter().enumerate() {
        let (r, c) = ((i / cols) as u32, (i % cols) as u32);
        image::imageops::overlay(
            &mut out,
            t,
            (gap + c * (tw + gap)) as i64,
            (gap + r * (th + gap)) as i64,
        );
    }
    out
}

/// Blends a heat map (values for an `w x h` grid, any range) over `picture`, resized to it.
pub fn overlay_heat(picture: &RgbImage, v: &[f32], w: usize, h: usize, alpha: f32) -> RgbImage {
    let hm = heat_image(v, w, h);
    let hm = image::imageops::resize(
        &hm,
        picture.width(),
        picture.height(),
        image::imageops::FilterType::Triangle,
    );
    RgbImage::from_fn(picture.width(), picture.height(), |x, y| {
        let (a, b) = (picture.get_pixel(x, y), hm.get_pixel(x, y));
        Rgb([0, 1, 2].map(|i| ((1.0 - alpha) * a[i] as f32 + alpha * b[i] as f32) as u8))
    })
}

/// Writes a PNG atomically.
pub fn save(img: &RgbImage, path: &std::path::Path) -> Result<()> {
    let bytes = encode_png(img)
        .map_err(|e| Error::Invalid(format!("cannot encode {}: {e}", path.display())))?;
    crate::run::write_atomic(path, &bytes)
}

/// PNG bytes of an image (for embedding in the report).
pub fn png_bytes(img: &RgbImage) -> Vec<u8> {
    encode_png(img).expect("in-memory PNG")
}

/// The PNG encoder itself rather than `write_to(.., ImageFormat::Png)`, which instantiates
/// every encoder the `image` crate has in convlab's build (the same bytes either way).
fn encode_png(img: &RgbImage) -> image::ImageResult<Vec<u8>> {
    use image::ImageEncoder;
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(&mut bytes).write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(bytes)
}

/// Picks `channel`, or errors listing the valid range.
pub fn check_channel(layer: &str, channel: usize, channels: usize) -> Result<()> {
    if channel >= channels {
        return Err(Error::Invalid(format!(
            "layer `{layer}` has channels 0..{}; channel {channel} does not exist",
            channels.saturating_sub(1)
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_and_scaling() {
        let t = tile(&[0.0, 1.0, 2.0, 3.0], 1, 2, 2);
        assert_eq!(t.get_pixel(0, 0)[0], 0);
        assert_eq!(t.get_pixel(1, 1)[0], 255);
        let g = grid(&[t.clone(), t.clone(), t], 2, 8);
        // Tiles enlarged to 8 px, 2 columns, 2 rows, 2 px gaps.
        assert_eq!((g.width(), g.height()), (2 * 10 + 2, 2 * 10 + 2));
        assert_eq!(heat(0.0), Rgb([0, 0, 0]));
        assert_eq!(heat(1.0), Rgb([255, 255, 255]));
    }
}
