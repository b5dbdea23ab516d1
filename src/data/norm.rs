//! Normalisation statistics of a training set: per-channel mean and std, and for RGB data the
//! principal components of pixel colour (for AlexNet's PCA lighting).
//!
//! They are computed once per dataset (over at most `max` evenly spaced training images fitted
//! to the input size), cached on disk under `$CONVLAB_CACHE_DIR` (default
//! `$XDG_CACHE_HOME/convlab` or `~/.cache/convlab`) keyed by a fingerprint of the training
//! split, and stored in each run folder as `stats.json` and in its `recipe.toml`, so eval,
//! predict and resume reuse exactly the training values.

use std::hash::{Hash, Hasher};
use std::path::PathBuf;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::dataset::Dataset;
use super::stats::eigh3;
use super::transforms::{Pca, fit};
use crate::error::{Error, Result};

/// What the normalisation and PCA lighting need.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NormStats {
    /// Per-channel mean of pixel values in [0, 1].
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// RGB data only.
    pub pca: Option<Pca>,
    /// Images the statistics were computed over (0 = not recorded).
    #[serde(default)]
    pub images: usize,
}

/// Computes the statistics directly (no cache). With `skip_bad`, images that cannot be read
/// (undecodable, unreadable) are left out instead of failing, as the loader skips them.
pub fn compute(
    data: &dyn Dataset,
    channels: usize,
    size: usize,
    max: usize,
    skip_bad: bool,
) -> Result<NormStats> {
    let n = data.len();
    let step = n.div_ceil(max.max(1)).max(1);
    let picks: Vec<usize> = (0..n).step_by(step).collect();
    // Sums of v and of v_i * v_j over every pixel (f64: 10^8 terms).
    let zero = || {
        (
            vec![0f64; channels],
            vec![0f64; channels * channels],
            0usize,
        )
    };
    let (sum, cross, used) = picks
        .par_iter()
        .map(|&i| -> Result<(Vec<f64>, Vec<f64>, usize)> {
            let img = match data.image(i, channels) {
                Ok(img) => fit(img, size),
                Err(Error::BadImage { .. } | Error::Io { .. }) if skip_bad => return Ok(zero()),
                Err(e) => return Err(e),
            };
            let (mut s, mut x, _) = zero();
            for px in img.pixels.chunks_exact(channels) {
                for a in 0..channels {
                    let va = px[a] as f64 / 255.0;
                    s[a] += va;
                    for b in 0..channels {
                        x[a * channels + b] += va * px[b] as f64 / 255.0;
                    }
                }
            }
            Ok((s, x, 1))
        })
        .try_reduce(zero, |a, b| {
            let add = |p: Vec<f64>, q: Vec<f64>| p.iter().zip(&q).map(|(u, v)| u + v).collect();
            Ok((add(a.0, b.0), add(a.1, b.1), a.2 + b.2))
        })?;
    if used == 0 && !picks.is_empty() {
        return Err(Error::Invalid(format!(
            "none of the {} training images sampled for the normalisation statistics could be \
             read (all skipped as bad images)",
            picks.len()
        )));
    }
    let count = (used * size * size).max(1) as f64;
    let mean: Vec<f64> = sum.iter().map(|s| s / count).collect();
    let cov = |a: usize, b: usize| cross[a * channels + b] / count - mean[a] * mean[b];
    let std = (0..channels)
        .map(|c| cov(c, c).max(1e-12).sqrt() as f32)
        .collect();
    let pca = (channels == 3).then(|| {
        let m = [0, 1, 2].map(|a| [0, 1, 2].map(|b| cov(a, b)));
        let (vals, vecs) = eigh3(m);
        Pca {
            eigval: vals.map(|v| v.max(0.0) as f32),
            eigvec: vecs.map(|row| row.map(|v| v as f32)),
        }
    });
    Ok(NormStats {
        mean: mean.iter().map(|&m| m as f32).collect(),
        std,
        pca,
        images: used,
    })
}

/// The cache folder, or `None` when no home is known (then nothing is cached).
pub fn cache_dir() -> Option<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    env("CONVLAB_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|p| p.join("convlab")))
        .or_else(|| env("HOME").map(|p| p.join(".cache").join("convlab")))
}

/// A fingerprint of what the statistics depend on: every training sample's source and label,
/// the channel count, the input size and the sample budget. Editing an image in place without
/// renaming it is not noticed (delete the cache folder then).
pub fn fingerprint(data: &dyn Dataset, channels: usize, size: usize, max: usize) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (data.len(), channels, size, max, 1u32).hash(&mut h);
    for i in 0..data.len() {
        data.describe(i).hash(&mut h);
        data.label(i).hash(&mut h);
    }
    h.finish()
}

/// [`compute`] through the on-disk cache. A cache that cannot be read or written is ignored
/// (the statistics are recomputed), never an error.
pub fn cached(
    data: &dyn Dataset,
    channels: usize,
    size: usize,
    max: usize,
    skip_bad: bool,
) -> Result<NormStats> {
    let file = cache_dir().map(|d| {
        d.join("stats").join(format!(
            "{:016x}.json",
            fingerprint(data, channels, size, max)
        ))
    });
    if let Some(f) = &file
        && let Ok(text) = std::fs::read_to_string(f)
        && let Ok(s) = serde_json::from_str::<NormStats>(&text)
    {
        return Ok(s);
    }
    let stats = compute(data, channels, size, max, skip_bad)?;
    if let Some(f) = &file
        && let Some(dir) = f.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        let json = serde_json::to_string_pretty(&stats).expect("plain data");
        let _ = crate::helpers::write_atomic(f, json.as_bytes());
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::InMemory;

    fn data() -> InMemory {
        // Two 2x2 RGB images with known pixels.
        let pixels: Vec<u8> = (0..24).map(|i| (i * 37 % 256) as u8).collect();
        InMemory {
            source: "mem".into(),
            width: 2,
            height: 2,
            channels: 3,
            pixels,
            labels: vec![0, 1],
        }
    }

    #[test]
    fn statistics_equal_a_direct_computation() {
        let d = data();
        let s = compute(&d, 3, 2, 100, false).unwrap();
        for c in 0..3 {
            let v: Vec<f64> = d
                .pixels
                .iter()
                .skip(c)
                .step_by(3)
                .map(|&p| p as f64 / 255.0)
                .collect();
            let m = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
            assert!((s.mean[c] as f64 - m).abs() < 1e-6);
            assert!((s.std[c] as f64 - var.sqrt()).abs() < 1e-6);
        }
        // PCA: eigenvalues sum to the trace of the covariance, vectors are unit length.
        let pca = s.pca.unwrap();
        let trace: f32 = s.std.iter().map(|x| x * x).sum();
        assert!((pca.eigval.iter().sum::<f32>() - trace).abs() < 1e-5);
        for k in 0..3 {
            let n: f32 = (0..3).map(|r| pca.eigvec[r][k].powi(2)).sum();
            assert!((n - 1.0).abs() < 1e-5);
        }
        assert_eq!(s.images, 2);
    }

    #[test]
    fn cache_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: tests in this binary that read CONVLAB_CACHE_DIR all set it to a temp folder.
        unsafe { std::env::set_var("CONVLAB_CACHE_DIR", dir.path()) };
        let d = data();
        let a = cached(&d, 3, 2, 100, false).unwrap();
        let files: Vec<_> = std::fs::read_dir(dir.path().join("stats"))
            .unwrap()
            .collect();
        assert_eq!(files.len(), 1);
        let b = cached(&d, 3, 2, 100, false).unwrap();
        assert_eq!(a, b);
    }
}
