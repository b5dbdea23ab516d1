//! What the layers hold: filters, feature maps, the images that excite a channel most, and
//! filters across training epochs (Zeiler & Fergus 2014, figures 2 and 4).

use burn::module::Param;
use burn::prelude::*;
use image::RgbImage;

use super::{grid, host, tile};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::models::Model;
use crate::params::{self, Role, Site, TensorVisitor};
use crate::recipe::Recipe;

/// Every convolution weight (`[out, in, k, k]`) of a model, by parameter path, in order.
pub fn conv_weights(model: &Model) -> Vec<(String, Tensor<4>)> {
    struct V(Vec<(String, Tensor<4>)>);
    impl TensorVisitor for V {
        fn tensor<const D: usize>(&mut self, site: &Site, p: &Param<Tensor<D>>) {
            if site.role() == Role::ConvWeight && !site.inside("AuxHead") {
                let t = p.val();
                let dims = t.dims();
                let t4: Tensor<4> = t.reshape([dims[0], dims[1], dims[2], dims[3]]);
                self.0.push((site.path_from(1), t4));
            }
        }
    }
    let mut v = V(Vec::new());
    params::visit(model, &mut v);
    v.0
}

/// The filters of a conv layer (default: the first) as one grid: colour tiles for a layer
/// reading RGB, otherwise one grey tile per (output, input) pair for the first 8 inputs.
pub fn filters(model: &Model, layer: Option<&str>) -> Result<(String, RgbImage)> {
    let all = conv_weights(model);
    let (name, w) = match layer {
        None => all.first().cloned(),
        Some(l) => all.iter().find(|(n, _)| n == l).cloned(),
    }
    .ok_or_else(|| {
        let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
        Error::Invalid(format!(
            "unknown conv layer `{}`; conv layers: {}",
            layer.unwrap_or(""),
            names.join(", ")
        ))
    })?;
    let [o, i, kh, kw] = w.dims();
    let v = host(w);
    let per = i * kh * kw;
    let mut tiles = Vec::new();
    if i == 3 {
        for f in 0..o {
            tiles.push(tile(&v[f * per..(f + 1) * per], 3, kw, kh));
        }
        return Ok((name, grid(&tiles, (o as f64).sqrt().ceil() as usize, 24)));
    }
    let shown = i.min(8);
    for f in 0..o.min(64) {
        for c in 0..shown {
            let s = f * per + c * kh * kw;
            tiles.push(tile(&v[s..s + kh * kw], 1, kw, kh));
        }
    }
    Ok((name, grid(&tiles, shown.max(8), 16)))
}

/// Feature maps of `layer` for one image, one grey tile per channel (at most 64).
pub fn activations(model: &Model, x: Tensor<4>, layer: &str) -> Result<RgbImage> {
    let maps = model.feature_maps(x, &[layer.to_string()])?;
    let t = maps[0].1.clone();
    let [_, c, h, w] = t.dims();
    let v = host(t);
    let tiles: Vec<RgbImage> = (0..c.min(64))
        .map(|k| tile(&v[k * h * w..(k + 1) * h * w], 1, w, h))
        .collect();
    Ok(grid(&tiles, 8, 48))
}

/// For the `channels` strongest channels of `layer` (largest mean of per-image maxima over
/// `data`), the `k` images of `data` that activate each most: one row per channel. Returns the
/// grid and the channel indices.
pub fn top_images(
    model: &Model,
    recipe: &Recipe,
    data: &dyn Dataset,
    layer: &str,
    channels: usize,
    k: usize,
    device: &Device,
) -> Result<(RgbImage, Vec<usize>)> {
    let n = data.len();
    if n == 0 {
        return Err(Error::Invalid("no images to search".into()));
    }
    let eval = model.valid();
    let dev = device.clone().without_autodiff();
    // maxima[image][channel]
    let mut maxima: Vec<Vec<f32>> = Vec::with_capacity(n);
    for i in 0..n {
        let input = super::input_from_dataset(recipe, data, i, &dev)?;
        let maps = eval.feature_maps(input.tensor, &[layer.to_string()])?;
        let t = maps[0].1.clone();
        let [_, c, h, w] = t.dims();
        let v = host(t);
        maxima.push(
            (0..c)
                .map(|ch| {
                    v[ch * h * w..(ch + 1) * h * w]
                        .iter()
                        .copied()
                        .fold(f32::MIN, f32::max)
                })
                .collect(),
        );
    }
    let c = maxima[0].len();
    let mut order: Vec<usize> = (0..c).collect();
    let mean = |ch: usize| maxima.iter().map(|m| m[ch]).sum::<f32>();
    order.sort_by(|&a, &b| mean(b).total_cmp(&mean(a)));
    order.truncate(channels.min(c));
    let mut tiles = Vec::new();
    for &ch in &order {
        let mut imgs: Vec<usize> = (0..n).collect();
        imgs.sort_by(|&a, &b| maxima[b][ch].total_cmp(&maxima[a][ch]));
        for &i in imgs.iter().take(k) {
            tiles.push(super::input_from_dataset(recipe, data, i, &dev)?.picture);
        }
        for _ in imgs.len()..k {
            tiles.push(RgbImage::new(1, 1));
        }
    }
    Ok((grid(&tiles, k, 48), order))
}
