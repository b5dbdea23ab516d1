//! Dataset statistics (`convlab data stats`): counts, sizes and modes, per-channel mean and
//! std, the RGB PCA of AlexNet's colour augmentation, duplicates and corrupt files, and how
//! fine-grained the classes are in pixel space.
//!
//! Granularity, on images fitted to one size and scaled to [0, 1], as vectors `x`:
//! - intra-class variance: mean over images of `||x - mu_class||^2`;
//! - inter-class variance: mean over images of `||mu_class - mu||^2` (class means weighted by
//!   their counts);
//! - their ratio (higher = classes easier to tell apart), and the closest pairs of class means.

// Small fixed-size matrix code reads best with explicit indices.
#![allow(clippy::needless_range_loop)]

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use rayon::prelude::*;
use serde::Serialize;

use super::dataset::Dataset;
use super::transforms::fit;
use crate::error::{Error, Result};

#[derive(Clone, Debug, Serialize)]
pub struct ClassCount {
    pub class: String,
    pub train: usize,
    pub val: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct ClassPair {
    pub a: String,
    pub b: String,
    /// Euclidean distance between the two class means.
    pub distance: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Granularity {
    pub intra_class_variance: f64,
    pub inter_class_variance: f64,
    pub ratio: f64,
    pub nearest_pairs: Vec<ClassPair>,
}

/// Everything `convlab data stats` reports (on the training split unless said otherwise).
#[derive(Clone, Debug, Serialize)]
pub struct DataStats {
    pub images: usize,
    pub classes: Vec<ClassCount>,
    /// Training images of the largest class over those of the smallest (1 = balanced; a class
    /// without training images counts as one). CIFAR-10-LT's benchmarks use 10 to 200.
    pub imbalance_ratio: f64,
    /// `"WxH"` -> count, as stored (before fitting).
    pub sizes: BTreeMap<String, usize>,
    /// `"grey"`, `"rgb"`, ... -> count.
    pub modes: BTreeMap<String, usize>,
    /// Per channel, pixel values in [0, 1], after fitting to `size`.
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    /// Eigenvalues (descending) and eigenvectors (columns) of the 3x3 RGB covariance; empty for
    /// grey data.
    pub pca_eigenvalues: Vec<f64>,
    pub pca_eigenvectors: Vec<[f64; 3]>,
    pub duplicates: usize,
    pub corrupt: usize,
    /// Side the images were fitted to for the pixel statistics.
    pub size: usize,
    pub granularity: Granularity,
}

#[derive(Clone)]
struct Acc {
    sums: Vec<Vec<f64>>,
    sq: Vec<f64>,
    counts: Vec<usize>,
    ch_sum: Vec<f64>,
    cross: [[f64; 3]; 3],
    pixels: usize,
    corrupt: usize,
    hashes: Vec<u64>,
    sizes: BTreeMap<String, usize>,
    modes: BTreeMap<String, usize>,
}

impl Acc {
    fn new(k: usize, dim: usize, c: usize) -> Self {
        Acc {
            sums: vec![vec![0.0; dim]; k],
            sq: vec![0.0; k],
            counts: vec![0; k],
            ch_sum: vec![0.0; c],
            cross: [[0.0; 3]; 3],
            pixels: 0,
            corrupt: 0,
            hashes: Vec::new(),
            sizes: BTreeMap::new(),
            modes: BTreeMap::new(),
        }
    }

    fn merge(mut self, o: Acc) -> Acc {
        for (a, b) in self.sums.iter_mut().zip(&o.sums) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        self.sq.iter_mut().zip(&o.sq).for_each(|(x, y)| *x += y);
        self.counts
            .iter_mut()
            .zip(&o.counts)
            .for_each(|(x, y)| *x += y);
        self.ch_sum
            .iter_mut()
            .zip(&o.ch_sum)
            .for_each(|(x, y)| *x += y);
        for i in 0..3 {
            for j in 0..3 {
                self.cross[i][j] += o.cross[i][j];
            }
        }
        self.pixels += o.pixels;
        self.corrupt += o.corrupt;
        self.hashes.extend(o.hashes);
        for (k, v) in o.sizes {
            *self.sizes.entry(k).or_default() += v;
        }
        for (k, v) in o.modes {
            *self.modes.entry(k).or_default() += v;
        }
        self
    }
}

/// Eigen-decomposition of a symmetric 3x3 matrix by Jacobi rotations: (values descending,
/// vectors as columns).
pub fn eigh3(m: [[f64; 3]; 3]) -> ([f64; 3], [[f64; 3]; 3]) {
    let mut a = m;
    let mut v = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    for _ in 0..100 {
        let (mut p, mut q, mut big) = (0, 1, 0.0);
        for i in 0..3 {
            for j in i + 1..3 {
                if a[i][j].abs() > big {
                    big = a[i][j].abs();
                    (p, q) = (i, j);
                }
            }
        }
        if big < 1e-15 {
            break;
        }
        let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
        let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
        let t = if theta == 0.0 { 1.0 } else { t };
        let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
        let mut r = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
        r[p][p] = c;
        r[q][q] = c;
        r[p][q] = s;
        r[q][p] = -s;
        let mul = |x: [[f64; 3]; 3], y: [[f64; 3]; 3]| {
            let mut z = [[0.0; 3]; 3];
            for i in 0..3 {
                for j in 0..3 {
                    z[i][j] = (0..3).map(|k| x[i][k] * y[k][j]).sum();
                }
            }
            z
        };
        let rt = [
            [r[0][0], r[1][0], r[2][0]],
            [r[0][1], r[1][1], r[2][1]],
            [r[0][2], r[1][2], r[2][2]],
        ];
        a = mul(mul(rt, a), r);
        v = mul(v, r);
    }
    let mut order = [0, 1, 2];
    order.sort_by(|&i, &j| a[j][j].total_cmp(&a[i][i]));
    let vals = order.map(|i| a[i][i]);
    let vecs = [0, 1, 2].map(|row| order.map(|i| v[row][i]));
    (vals, vecs)
}

/// Computes the statistics of `train` (counts also of `val`), fitting images to `size` with
/// `channels` channels.
pub fn compute(
    train: &dyn Dataset,
    val: &dyn Dataset,
    classes: &[String],
    channels: usize,
    size: usize,
) -> Result<DataStats> {
    let k = classes.len();
    let dim = channels * size * size;
    let n = train.len();
    if n == 0 {
        return Err(Error::Invalid("no training images to describe".into()));
    }
    let acc = (0..n)
        .into_par_iter()
        .fold(
            || Acc::new(k, dim, channels),
            |mut a, i| {
                let img = match train.image(i, channels) {
                    Ok(img) => img,
                    Err(_) => {
                        a.corrupt += 1;
                        return a;
                    }
                };
                *a.sizes
                    .entry(format!("{}x{}", img.width, img.height))
                    .or_default() += 1;
                let mode = train
                    .mode(i)
                    .unwrap_or(if channels == 1 { "grey" } else { "rgb" });
                *a.modes.entry(mode.to_string()).or_default() += 1;
                let img = fit(img, size);
                let mut h = std::collections::hash_map::DefaultHasher::new();
                img.pixels.hash(&mut h);
                a.hashes.push(h.finish());
                let l = train.label(i);
                let sum = &mut a.sums[l];
                let mut sq = 0.0;
                for (p, px) in img.pixels.chunks_exact(channels).enumerate() {
                    let v: Vec<f64> = px.iter().map(|&b| b as f64 / 255.0).collect();
                    for ch in 0..channels {
                        sum[ch * size * size + p] += v[ch];
                        a.ch_sum[ch] += v[ch];
                        sq += v[ch] * v[ch];
                    }
                    if channels == 3 {
                        for r in 0..3 {
                            for c in 0..3 {
                                a.cross[r][c] += v[r] * v[c];
                            }
                        }
                    }
                }
                a.sq[l] += sq;
                a.counts[l] += 1;
                a.pixels += size * size;
                a
            },
        )
        .reduce(|| Acc::new(k, dim, channels), Acc::merge);

    let good = acc.counts.iter().sum::<usize>().max(1) as f64;
    let px = acc.pixels.max(1) as f64;
    let mean: Vec<f64> = acc.ch_sum.iter().map(|s| s / px).collect();
    // Per-channel variance from the class sums: E[v^2] per channel needs its own pass-free
    // form, so use the RGB cross products (or the total for grey).
    let std: Vec<f64> = (0..channels)
        .map(|c| {
            let ex2 = if channels == 3 {
                acc.cross[c][c] / px
            } else {
                acc.sq.iter().sum::<f64>() / px
            };
            (ex2 - mean[c] * mean[c]).max(0.0).sqrt()
        })
        .collect();
    let (pca_eigenvalues, pca_eigenvectors) = if channels == 3 {
        let mut cov = [[0.0; 3]; 3];
        for r in 0..3 {
            for c in 0..3 {
                cov[r][c] = acc.cross[r][c] / px - mean[r] * mean[c];
            }
        }
        let (vals, vecs) = eigh3(cov);
        (vals.to_vec(), vecs.to_vec())
    } else {
        (Vec::new(), Vec::new())
    };
    let means: Vec<Vec<f64>> = acc
        .sums
        .iter()
        .zip(&acc.counts)
        .map(|(s, &c)| s.iter().map(|v| v / c.max(1) as f64).collect())
        .collect();
    let global: Vec<f64> = (0..dim)
        .map(|d| acc.sums.iter().map(|s| s[d]).sum::<f64>() / good)
        .collect();
    let sqn = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>();
    let intra: f64 = (0..k)
        .map(|c| acc.sq[c] - acc.counts[c] as f64 * sqn(&means[c]))
        .sum::<f64>()
        / good;
    let inter: f64 = (0..k)
        .map(|c| {
            let d: Vec<f64> = means[c].iter().zip(&global).map(|(a, b)| a - b).collect();
            acc.counts[c] as f64 * sqn(&d)
        })
        .sum::<f64>()
        / good;
    let mut pairs = Vec::new();
    for a in 0..k {
        for b in a + 1..k {
            if acc.counts[a] == 0 || acc.counts[b] == 0 {
                continue;
            }
            let d: Vec<f64> = means[a].iter().zip(&means[b]).map(|(x, y)| x - y).collect();
            pairs.push(ClassPair {
                a: classes[a].clone(),
                b: classes[b].clone(),
                distance: sqn(&d).sqrt(),
            });
        }
    }
    pairs.sort_by(|x, y| x.distance.total_cmp(&y.distance));
    pairs.truncate(5);
    let mut seen: HashMap<u64, usize> = HashMap::new();
    for h in &acc.hashes {
        *seen.entry(*h).or_default() += 1;
    }
    let duplicates = seen.values().map(|c| c - 1).sum();
    let mut val_counts = vec![0; k];
    for i in 0..val.len() {
        val_counts[val.label(i)] += 1;
    }
    let (most, least) = (
        acc.counts.iter().copied().max().unwrap_or(0),
        acc.counts.iter().copied().min().unwrap_or(0),
    );
    Ok(DataStats {
        images: n,
        imbalance_ratio: most as f64 / least.max(1) as f64,
        classes: classes
            .iter()
            .enumerate()
            .map(|(c, name)| ClassCount {
                class: name.clone(),
                train: acc.counts[c],
                val: val_counts[c],
            })
            .collect(),
        sizes: acc.sizes,
        modes: acc.modes,
        mean,
        std,
        pca_eigenvalues,
        pca_eigenvectors,
        duplicates,
        corrupt: acc.corrupt,
        size,
        granularity: Granularity {
            intra_class_variance: intra.max(0.0),
            inter_class_variance: inter,
            ratio: if intra > 0.0 {
                inter / intra
            } else {
                f64::INFINITY
            },
            nearest_pairs: pairs,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::dataset::InMemory;

    #[test]
    fn variances_of_a_dataset_with_a_known_answer() {
        // 1x1 grey images: class a = {0.2, 0.4}, class b = {0.8, 0.8} (51, 102, 204 / 255).
        // intra = (0.01 + 0.01 + 0 + 0) / 4 = 0.005; global mean 0.55;
        // inter = (2 * 0.25^2 + 2 * 0.25^2) / 4 = 0.0625; ratio 12.5; one duplicate.
        let d = InMemory {
            source: "mem".into(),
            width: 1,
            height: 1,
            channels: 1,
            pixels: vec![51, 102, 204, 204],
            labels: vec![0, 0, 1, 1],
        };
        let names = vec!["a".to_string(), "b".to_string()];
        let s = compute(&d, &d, &names, 1, 1).unwrap();
        let g = &s.granularity;
        assert!(
            (g.intra_class_variance - 0.005).abs() < 1e-12,
            "{}",
            g.intra_class_variance
        );
        assert!((g.inter_class_variance - 0.0625).abs() < 1e-12);
        assert!((g.ratio - 12.5).abs() < 1e-9);
        assert!((g.nearest_pairs[0].distance - 0.5).abs() < 1e-12);
        assert_eq!(s.duplicates, 1);
        assert!((s.mean[0] - 0.55).abs() < 1e-12);
        // std: E[v^2] = (0.04 + 0.16 + 0.64 + 0.64) / 4 = 0.37; var = 0.37 - 0.3025 = 0.0675.
        assert!((s.std[0] - 0.0675f64.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn eigh3_diagonalises() {
        let m = [[2.0, 1.0, 0.0], [1.0, 2.0, 0.0], [0.0, 0.0, 5.0]];
        let (vals, vecs) = eigh3(m);
        assert!(
            (vals[0] - 5.0).abs() < 1e-9
                && (vals[1] - 3.0).abs() < 1e-9
                && (vals[2] - 1.0).abs() < 1e-9
        );
        for (i, &lam) in vals.iter().enumerate() {
            let v = [vecs[0][i], vecs[1][i], vecs[2][i]];
            for r in 0..3 {
                let mv: f64 = (0..3).map(|c| m[r][c] * v[c]).sum();
                assert!((mv - lam * v[r]).abs() < 1e-9);
            }
        }
    }
}
