//! Test-time augmentation: average the softmax over several fixed views of each image.
//!
//! - `center`: one centre crop (the default, and the "single crop" every report compares to);
//! - `flip`: the centre crop and its mirror image;
//! - `ten_crop`: four corners and the centre of the image resized to `eval.resize` (default
//!   8/7 of the input size: AlexNet's 224 of 256), and their mirror images (Krizhevsky et al.
//!   2012, section 4.1);
//! - `multi_scale`: VGG's multi-scale evaluation (Simonyan & Zisserman 2015, section 3.2): the
//!   whole (centre-square) image at each scale Q in `eval.scales` and its mirror image, fed at
//!   its full size. Every registered model ends in global or adaptive pooling, so a Q x Q input
//!   is evaluated densely and its class scores pooled, as VGG's fully convolutional test net
//!   does.

use std::str::FromStr;

use burn::prelude::*;
use burn::tensor::activation::softmax;
use serde::{Deserialize, Serialize};

use super::batch_tensor;
use super::metrics::{Accumulator, EvalReport};
use crate::data::Dataset;
use crate::data::Loader;
use crate::data::transforms::{CropPos, Interpolation, View};
use crate::error::{Error, Result};
use crate::models::Model;

/// Which views to average.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tta {
    #[default]
    Center,
    Flip,
    TenCrop,
    MultiScale,
}

impl FromStr for Tta {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.replace('-', "_").as_str() {
            "center" | "centre" => Tta::Center,
            "flip" => Tta::Flip,
            "ten_crop" | "10_crop" => Tta::TenCrop,
            "multi_scale" => Tta::MultiScale,
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown test-time augmentation `{s}`; one of center, flip, ten-crop, \
                     multi-scale"
                )));
            }
        })
    }
}

impl Tta {
    pub fn as_str(self) -> &'static str {
        match self {
            Tta::Center => "center",
            Tta::Flip => "flip",
            Tta::TenCrop => "ten-crop",
            Tta::MultiScale => "multi-scale",
        }
    }
}

/// `[eval]`: how held-out images are fed to the model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Shorter side (px) before the centre crop; 0 = the input size (no margin). ImageNet
    /// recipes use 256 for a 224 input.
    pub resize: usize,
    pub interpolation: Interpolation,
    /// Views averaged by `convlab eval` and `convlab ensemble`.
    pub tta: Tta,
    /// Shorter sides for `multi_scale` (px); empty = `[1, 8/7, 9/7] x input size`.
    pub scales: Vec<usize>,
}

impl EvalConfig {
    pub fn validate(&self) -> Result<()> {
        use crate::limits::{MAX_IMAGE_SIDE, MAX_SCALES};
        let bad = |reason: String| {
            Err(Error::Recipe {
                origin: String::new(),
                key: "eval.scales".into(),
                reason,
            })
        };
        if let Some(&s) = self.scales.iter().find(|&&s| s == 0 || s > MAX_IMAGE_SIDE) {
            return bad(format!(
                "{s}: scales are image sides in pixels, 1 to {MAX_IMAGE_SIDE}"
            ));
        }
        if self.scales.len() > MAX_SCALES {
            return bad(format!(
                "{} scales (at most {MAX_SCALES})",
                self.scales.len()
            ));
        }
        Ok(())
    }

    /// The single centre-crop view at the input size.
    pub fn single(&self) -> View {
        View {
            resize: self.resize,
            pos: CropPos::Center,
            flip: false,
            interpolation: self.interpolation,
        }
    }

    /// The `(input size, view)` pairs that `tta` averages, for a model input of `size`.
    pub fn views(&self, tta: Tta, size: usize) -> Vec<(usize, View)> {
        let single = self.single();
        let flipped = |v: View| [v, View { flip: true, ..v }];
        match tta {
            Tta::Center => vec![(size, single)],
            Tta::Flip => flipped(single).map(|v| (size, v)).to_vec(),
            Tta::TenCrop => {
                let resize = if self.resize > size {
                    self.resize
                } else {
                    (size * 8).div_ceil(7)
                };
                CropPos::FIVE
                    .iter()
                    .flat_map(|&pos| {
                        flipped(View {
                            resize,
                            pos,
                            ..single
                        })
                    })
                    .map(|v| (size, v))
                    .collect()
            }
            Tta::MultiScale => {
                let scales = if self.scales.is_empty() {
                    vec![size, (size * 8).div_ceil(7), (size * 9).div_ceil(7)]
                } else {
                    self.scales.clone()
                };
                scales
                    .iter()
                    .flat_map(|&q| {
                        flipped(View {
                            resize: q,
                            ..single
                        })
                        .map(|v| (q, v))
                    })
                    .collect()
            }
        }
    }
}

/// Softmax probabilities over a dataset.
#[derive(Clone, Debug, PartialEq)]
pub struct Probs {
    /// `[N * K]` in dataset order.
    pub probs: Vec<f32>,
    /// Which samples were decoded (undecodable ones are skipped when the recipe says so).
    pub seen: Vec<bool>,
    /// `(source, reason)` of the skipped samples.
    pub skipped: Vec<(String, String)>,
}

/// Builds the evaluation loader of one view `(input size, view)`; the pipeline layer makes it
/// from a recipe (its `view_loader`), so evaluation needs no recipe.
pub type ViewLoader<'a> = dyn Fn(usize, View) -> Result<Loader> + 'a;

/// Softmax probabilities of `model` (`k` classes) over the `n` samples `loader` yields.
pub fn view_probabilities(
    model: &Model,
    k: usize,
    n: usize,
    loader: Loader,
    device: &Device,
) -> Result<Probs> {
    let mut out = Probs {
        probs: vec![0f32; n * k],
        seen: vec![false; n],
        skipped: Vec::new(),
    };
    for batch in loader.epoch(0) {
        let mut batch = batch?;
        out.skipped.append(&mut batch.skipped);
        if batch.is_empty() {
            continue;
        }
        let p = softmax(model.forward(batch_tensor(&batch, device)), 1)
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .expect("f32 probabilities");
        for (row, &i) in p.chunks_exact(k).zip(&batch.indices) {
            out.probs[i * k..(i + 1) * k].copy_from_slice(row);
            out.seen[i] = true;
        }
    }
    Ok(out)
}

/// Mean softmax over `views` of `n` samples; samples missing from any view are marked unseen.
pub fn probabilities(
    model: &Model,
    k: usize,
    n: usize,
    views: &[(usize, View)],
    make: &ViewLoader,
    device: &Device,
) -> Result<Probs> {
    let parts = views
        .iter()
        .map(|&(s, v)| view_probabilities(model, k, n, make(s, v)?, device));
    average(parts)
}

/// The mean of per-view probabilities; `skipped` comes from the first view (the same files
/// fail in every view).
fn average(parts: impl ExactSizeIterator<Item = Result<Probs>>) -> Result<Probs> {
    let w = 1.0 / parts.len().max(1) as f32;
    let mut mean: Option<Probs> = None;
    for p in parts {
        let p = p?;
        match &mut mean {
            None => {
                mean = Some(Probs {
                    probs: p.probs.iter().map(|v| v * w).collect(),
                    ..p
                })
            }
            Some(m) => {
                m.probs
                    .iter_mut()
                    .zip(&p.probs)
                    .for_each(|(a, b)| *a += b * w);
                m.seen.iter_mut().zip(&p.seen).for_each(|(a, b)| *a &= b);
            }
        }
    }
    Ok(mean.expect("at least one view"))
}

/// Scores the seen samples' probabilities.
pub fn score(p: &Probs, data: &dyn Dataset, classes: &[String]) -> EvalReport {
    let k = classes.len();
    let mut acc = Accumulator::new(k);
    for (i, row) in p.probs.chunks_exact(k).enumerate() {
        if p.seen[i] {
            let logp: Vec<f32> = row.iter().map(|p| p.max(1e-12).ln()).collect();
            acc.add(&logp, &[data.label(i)]);
        }
    }
    acc.finish(classes)
}

/// What test-time augmentation added over the single centre crop.
#[derive(Clone, Debug, Serialize)]
pub struct TtaSummary {
    pub mode: String,
    pub views: usize,
    pub single_top1: f64,
    pub single_top5: f64,
    pub top1: f64,
    pub top5: f64,
    /// `top1 - single_top1` (fractions).
    pub gain_top1: f64,
}

/// The result of [`evaluate_tta`].
pub struct TtaResult {
    pub report: EvalReport,
    pub summary: TtaSummary,
    /// Undecodable images skipped, `(source, reason)`.
    pub skipped: Vec<(String, String)>,
}

/// Evaluates `model` (input side `size`) on `data` with `tta` and, for comparison, with the
/// single centre crop, the views as `eval` defines them.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_tta(
    model: &Model,
    eval: &EvalConfig,
    size: usize,
    data: &dyn Dataset,
    classes: &[String],
    tta: Tta,
    make: &ViewLoader,
    device: &Device,
) -> Result<TtaResult> {
    let (k, n) = (classes.len(), data.len());
    let single_view = (size, eval.single());
    let views = eval.views(tta, size);
    let run = |(s, v): (usize, View)| view_probabilities(model, k, n, make(s, v)?, device);
    let single_p = run(single_view)?;
    let single = score(&single_p, data, classes);
    let report = if views == [single_view] {
        single.clone()
    } else {
        // The single crop is usually one of the views: reuse it rather than run it again.
        let parts = views.iter().map(|&v| {
            if v == single_view {
                Ok(single_p.clone())
            } else {
                run(v)
            }
        });
        score(&average(parts)?, data, classes)
    };
    let summary = TtaSummary {
        mode: tta.as_str().into(),
        views: views.len(),
        single_top1: single.top1,
        single_top5: single.top5,
        top1: report.top1,
        top5: report.top5,
        gain_top1: report.top1 - single.top1,
    };
    Ok(TtaResult {
        report,
        summary,
        skipped: single_p.skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_lists() {
        let c = EvalConfig::default();
        assert_eq!(c.views(Tta::Center, 32).len(), 1);
        assert_eq!(c.views(Tta::Flip, 32).len(), 2);
        let ten = c.views(Tta::TenCrop, 32);
        assert_eq!(ten.len(), 10);
        assert!(ten.iter().all(|(s, v)| *s == 32 && v.resize == 37));
        assert_eq!(ten.iter().filter(|(_, v)| v.flip).count(), 5);
        let ms = c.views(Tta::MultiScale, 28);
        let sizes: Vec<usize> = ms.iter().map(|(s, _)| *s).collect();
        assert_eq!(sizes, vec![28, 28, 32, 32, 36, 36]);
        assert!("ten-crop".parse::<Tta>().is_ok() && "x".parse::<Tta>().is_err());
    }
}
