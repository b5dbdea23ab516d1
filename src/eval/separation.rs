//! How well each layer separates the classes (`convlab analyze`): for every named layer, the
//! validation images' globally average-pooled features give
//! - intra-class variance: mean over images of `||f - mu_class||^2`,
//! - inter-class variance: mean over images of `||mu_class - mu||^2`,
//! - their ratio (a Fisher criterion: larger = classes further apart relative to their spread;
//!   invariant to a global rescaling of the layer),
//! - nearest-centroid accuracy: how often an image's nearest class mean is its own class (the
//!   means are computed on the same images, so it is an optimistic, resubstitution estimate).
//!
//! Zeiler & Fergus (2014, section 5.2) showed features becoming more class-discriminative with
//! depth; this measures that on one's own data.

use burn::prelude::*;
use serde::Serialize;

use super::metrics::Accumulator;
use crate::data::Loader;
use crate::error::Result;
use crate::models::Model;

/// Separation at one layer.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct LayerSeparation {
    pub layer: String,
    pub channels: usize,
    pub intra_class_variance: f64,
    pub inter_class_variance: f64,
    pub ratio: f64,
    pub nearest_centroid_top1: f64,
}

/// Two classes the model mixes up.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ConfusedPair {
    pub a: String,
    pub b: String,
    /// Images of `a` predicted as `b`, and of `b` as `a`.
    pub a_as_b: usize,
    pub b_as_a: usize,
}

/// What `convlab analyze --json` prints.
#[derive(Clone, Debug, Serialize)]
pub struct Analysis {
    pub images: usize,
    pub top1: f64,
    pub layers: Vec<LayerSeparation>,
    pub confused_pairs: Vec<ConfusedPair>,
}

/// The variance quantities of `n` feature vectors of length `dim` (row-major) with labels in
/// `0..k`: (intra, inter, ratio, nearest-centroid accuracy).
pub fn separation(
    features: &[f32],
    dim: usize,
    labels: &[usize],
    k: usize,
) -> (f64, f64, f64, f64) {
    let n = labels.len();
    let mut means = vec![0f64; k * dim];
    let mut counts = vec![0usize; k];
    let mut global = vec![0f64; dim];
    for (f, &l) in features.chunks_exact(dim).zip(labels) {
        counts[l] += 1;
        for (j, &v) in f.iter().enumerate() {
            means[l * dim + j] += v as f64;
            global[j] += v as f64;
        }
    }
    for c in 0..k {
        for j in 0..dim {
            means[c * dim + j] /= counts[c].max(1) as f64;
        }
    }
    global.iter_mut().for_each(|g| *g /= n.max(1) as f64);
    let dist = |f: &[f32], c: usize| -> f64 {
        f.iter()
            .enumerate()
            .map(|(j, &v)| (v as f64 - means[c * dim + j]).powi(2))
            .sum()
    };
    let (mut intra, mut inter, mut hits) = (0f64, 0f64, 0usize);
    for (f, &l) in features.chunks_exact(dim).zip(labels) {
        intra += dist(f, l);
        inter += (0..dim)
            .map(|j| (means[l * dim + j] - global[j]).powi(2))
            .sum::<f64>();
        let nearest = (0..k)
            .filter(|&c| counts[c] > 0)
            .min_by(|&a, &b| dist(f, a).total_cmp(&dist(f, b)))
            .unwrap_or(0);
        hits += usize::from(nearest == l);
    }
    let n = n.max(1) as f64;
    let (intra, inter) = (intra / n, inter / n);
    let ratio = if intra > 0.0 {
        inter / intra
    } else {
        f64::INFINITY
    };
    (intra, inter, ratio, hits as f64 / n)
}

/// Runs `model` (eval mode) over `loader`, pooling every named layer.
pub fn analyze(
    model: &Model,
    loader: &Loader,
    classes: &[String],
    device: &Device,
) -> Result<Analysis> {
    let k = classes.len();
    let mut names: Vec<String> = Vec::new();
    let mut dims: Vec<usize> = Vec::new();
    let mut feats: Vec<Vec<f32>> = Vec::new();
    let mut labels = Vec::new();
    let mut acc = Accumulator::new(k);
    for batch in loader.epoch(0) {
        let batch = batch?;
        if batch.is_empty() {
            continue;
        }
        let x = super::batch_tensor(&batch, device);
        let mut pooled: Vec<(String, Tensor<2>)> = Vec::new();
        let logits = model.forward_tapped(x, &mut |name, t| {
            let [b, c, _, _] = t.dims();
            pooled.push((name, t.clone().mean_dim(3).mean_dim(2).reshape([b, c])));
            t
        });
        if names.is_empty() {
            names = pooled.iter().map(|(n, _)| n.clone()).collect();
            dims = pooled.iter().map(|(_, t)| t.dims()[1]).collect();
            feats = vec![Vec::new(); names.len()];
        }
        for (i, (_, t)) in pooled.into_iter().enumerate() {
            feats[i].extend(crate::helpers::host(t));
        }
        acc.add(&crate::helpers::host(logits), &batch.labels);
        labels.extend_from_slice(&batch.labels);
    }
    let layers = names
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let (intra, inter, ratio, nc) = separation(&feats[i], dims[i], &labels, k);
            LayerSeparation {
                layer: name.clone(),
                channels: dims[i],
                intra_class_variance: intra,
                inter_class_variance: inter,
                ratio,
                nearest_centroid_top1: nc,
            }
        })
        .collect();
    let report = acc.finish(classes);
    let mut pairs = Vec::new();
    for a in 0..k {
        for b in a + 1..k {
            let (ab, ba) = (report.confusion[a][b], report.confusion[b][a]);
            if ab + ba > 0 {
                pairs.push(ConfusedPair {
                    a: classes[a].clone(),
                    b: classes[b].clone(),
                    a_as_b: ab,
                    b_as_a: ba,
                });
            }
        }
    }
    pairs.sort_by_key(|p| std::cmp::Reverse(p.a_as_b + p.b_as_a));
    pairs.truncate(5);
    Ok(Analysis {
        images: labels.len(),
        top1: report.top1,
        layers,
        confused_pairs: pairs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variances_with_a_known_answer() {
        // Two classes in 1-D: class 0 at {-2, -4}, class 1 at {2, 4}. Class means -3 and 3,
        // global mean 0. Intra: every point is 1 from its mean -> 1. Inter: 3^2 = 9. Ratio 9.
        let f = [-2.0, -4.0, 2.0, 4.0];
        let (intra, inter, ratio, nc) = separation(&f, 1, &[0, 0, 1, 1], 2);
        assert_eq!((intra, inter, ratio, nc), (1.0, 9.0, 9.0, 1.0));
        // Overlapping classes: class 0 at {0, 4}, class 1 at {1, 3}: both means 2 -> inter 0,
        // intra (4 + 4 + 1 + 1) / 4 = 2.5.
        let (intra, inter, ratio, _) = separation(&[0.0, 4.0, 1.0, 3.0], 1, &[0, 0, 1, 1], 2);
        assert_eq!((intra, inter, ratio), (2.5, 0.0, 0.0));
        // 2-D, three classes at the corners with no spread: intra 0, ratio infinite.
        let f = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let (intra, _, ratio, nc) = separation(&f, 2, &[0, 1, 2], 3);
        assert_eq!((intra, ratio.is_infinite(), nc), (0.0, true, 1.0));
    }
}
