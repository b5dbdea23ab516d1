//! Photometric augmentation on `[C, H, W]` float planes with values in [0, 1] (before
//! normalisation), and random erasing (after it).

use rand::Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

/// Principal components of the training set's RGB pixels (values in [0, 1]): the eigenvalues
/// and, as columns, the eigenvectors of their 3x3 covariance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pca {
    pub eigval: [f32; 3],
    /// `eigvec[row][k]`: component `row` (R, G, B) of eigenvector `k`.
    pub eigvec: [[f32; 3]; 3],
}

impl Pca {
    /// The RGB offset AlexNet adds to every pixel: `eigvec @ (alpha * eigval)` (Krizhevsky et
    /// al. 2012, section 4.1), for the per-image draws `alpha`.
    pub fn offset(&self, alpha: [f32; 3]) -> [f32; 3] {
        let mut o = [0f32; 3];
        for (out, row) in o.iter_mut().zip(&self.eigvec) {
            *out = (0..3).map(|k| row[k] * alpha[k] * self.eigval[k]).sum();
        }
        o
    }
}

/// Adds `offset[c]` to every pixel of channel `c` (no clamping: AlexNet's lighting noise is a
/// shift of intensity and colour, allowed to leave [0, 1]).
pub fn add_per_channel(planes: &mut [f32], hw: usize, offset: &[f32]) {
    for (plane, &o) in planes.chunks_exact_mut(hw).zip(offset) {
        plane.iter_mut().for_each(|v| *v += o);
    }
}

/// Draws the three PCA-lighting coefficients, `alpha_k ~ N(0, sigma)`.
pub fn pca_alpha(sigma: f64, rng: &mut impl Rng) -> [f32; 3] {
    let n = Normal::new(0.0, sigma).expect("sigma >= 0 was validated");
    [0, 1, 2].map(|_| n.sample(rng) as f32)
}

/// Luma weights of ITU-R BT.601 (what PIL and torchvision use for greyscale).
const LUMA: [f32; 3] = [0.299, 0.587, 0.114];

fn grey(planes: &[f32], hw: usize, p: usize) -> f32 {
    if planes.len() == hw {
        return planes[p];
    }
    LUMA[0] * planes[p] + LUMA[1] * planes[hw + p] + LUMA[2] * planes[2 * hw + p]
}

/// Colour jitter (torchvision's ColorJitter semantics for brightness, contrast and
/// saturation): factors drawn uniformly from `[1 - x, 1 + x]`, applied in that fixed order,
/// clamped to [0, 1] after each; hue rotates the chroma by an angle drawn from
/// `[-hue, hue] * 360` degrees in YIQ space (a linear approximation of an HSV hue shift).
/// Grey images get brightness and contrast only.
pub fn colour_jitter(
    planes: &mut [f32],
    hw: usize,
    [brightness, contrast, saturation, hue]: [f64; 4],
    rng: &mut impl Rng,
) {
    let mut factor = |x: f64| (x > 0.0).then(|| rng.random_range(1.0 - x..=1.0 + x) as f32);
    let (b, c, s) = (factor(brightness), factor(contrast), factor(saturation));
    let h = (hue > 0.0).then(|| rng.random_range(-hue..=hue) as f32);
    let rgb = planes.len() == 3 * hw;
    if let Some(b) = b {
        planes
            .iter_mut()
            .for_each(|v| *v = (*v * b).clamp(0.0, 1.0));
    }
    if let Some(c) = c {
        let mean = (0..hw).map(|p| grey(planes, hw, p)).sum::<f32>() / hw as f32;
        planes
            .iter_mut()
            .for_each(|v| *v = (c * *v + (1.0 - c) * mean).clamp(0.0, 1.0));
    }
    if !rgb {
        return;
    }
    if let Some(s) = s {
        for p in 0..hw {
            let g = grey(planes, hw, p);
            for ch in 0..3 {
                let v = &mut planes[ch * hw + p];
                *v = (s * *v + (1.0 - s) * g).clamp(0.0, 1.0);
            }
        }
    }
    if let Some(h) = h {
        let (sin, cos) = (h * std::f32::consts::TAU).sin_cos();
        for p in 0..hw {
            let (r, g, b) = (planes[p], planes[hw + p], planes[2 * hw + p]);
            let y = 0.299 * r + 0.587 * g + 0.114 * b;
            let i = 0.596 * r - 0.274 * g - 0.322 * b;
            let q = 0.211 * r - 0.523 * g + 0.312 * b;
            let (i, q) = (i * cos - q * sin, i * sin + q * cos);
            planes[p] = (y + 0.956 * i + 0.621 * q).clamp(0.0, 1.0);
            planes[hw + p] = (y - 0.272 * i - 0.647 * q).clamp(0.0, 1.0);
            planes[2 * hw + p] = (y - 1.106 * i + 1.703 * q).clamp(0.0, 1.0);
        }
    }
}

/// Random erasing (Zhong et al. 2020): with probability `p`, a rectangle covering 2-33% of the
/// image with aspect ratio log-uniform in [0.3, 3.3] is set to 0, the dataset mean after
/// normalisation (torchvision's `RandomErasing(value=0)`). Up to 10 tries to fit a box.
pub fn random_erase(planes: &mut [f32], size: usize, p: f64, rng: &mut impl Rng) {
    if p <= 0.0 || !rng.random_bool(p.min(1.0)) {
        return;
    }
    let area = (size * size) as f64;
    for _ in 0..10 {
        let target = area * rng.random_range(0.02..=0.33);
        let ar = rng.random_range(0.3f64.ln()..=3.3f64.ln()).exp();
        let h = (target * ar).sqrt().round() as usize;
        let w = (target / ar).sqrt().round() as usize;
        if h == 0 || w == 0 || h >= size || w >= size {
            continue;
        }
        let top = rng.random_range(0..=size - h);
        let left = rng.random_range(0..=size - w);
        for plane in planes.chunks_exact_mut(size * size) {
            for y in top..top + h {
                plane[y * size + left..y * size + left + w].fill(0.0);
            }
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn pca_offset_is_the_alexnet_formula() {
        let pca = Pca {
            eigval: [0.2, 0.02, 0.002],
            eigvec: [[0.6, -0.7, 0.4], [0.6, 0.0, -0.8], [0.5, 0.7, 0.5]],
        };
        let alpha = [0.1, -0.2, 0.3];
        let o = pca.offset(alpha);
        for (r, &got) in o.iter().enumerate() {
            let want: f32 = (0..3)
                .map(|k| pca.eigvec[r][k] * alpha[k] * pca.eigval[k])
                .sum();
            assert!((got - want).abs() < 1e-7);
        }
        // Hand-computed first row: 0.6*0.02 + (-0.7)*(-0.004) + 0.4*0.0006.
        assert!((o[0] - (0.012 + 0.0028 + 0.00024)).abs() < 1e-7);
    }

    #[test]
    fn no_jitter_is_identity_and_brightness_scales() {
        let mut planes = vec![1.0, 0.0, 0.0, 0.5, 0.0, 1.0];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        colour_jitter(&mut planes, 2, [0.0, 0.0, 0.0, 0.0], &mut rng);
        assert_eq!(planes, vec![1.0, 0.0, 0.0, 0.5, 0.0, 1.0]);
        // Brightness multiplies and clamps.
        let mut p = vec![0.5, 0.9];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        colour_jitter(&mut p, 2, [0.5, 0.0, 0.0, 0.0], &mut rng);
        let f = p[0] / 0.5;
        assert!((0.5..=1.5).contains(&f));
        assert!((p[1] - (0.9 * f).min(1.0)).abs() < 1e-6);
    }

    #[test]
    fn zero_hue_rotation_is_identity() {
        // YIQ there and back is the identity up to the matrices' 3-digit rounding.
        let mut planes = vec![0.2, 0.7, 0.4, 0.1, 0.9, 0.5];
        let orig = planes.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        colour_jitter(&mut planes, 2, [0.0, 0.0, 0.0, 1e-9], &mut rng);
        for (a, b) in planes.iter().zip(&orig) {
            assert!((a - b).abs() < 2e-3, "{planes:?}");
        }
    }

    #[test]
    fn erasing_zeroes_one_rectangle_in_every_channel() {
        let size = 16;
        let mut planes = vec![1.0; 3 * size * size];
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        random_erase(&mut planes, size, 1.0, &mut rng);
        let zeros: Vec<usize> = (0..size * size).filter(|&p| planes[p] == 0.0).collect();
        let frac = zeros.len() as f64 / (size * size) as f64;
        assert!((0.01..=0.4).contains(&frac), "{frac}");
        for p in &zeros {
            assert_eq!(planes[size * size + p], 0.0);
            assert_eq!(planes[2 * size * size + p], 0.0);
        }
        // A rectangle: its bounding box is all zeros.
        let (ys, xs): (Vec<_>, Vec<_>) = zeros.iter().map(|p| (p / size, p % size)).unzip();
        let h = ys.iter().max().unwrap() - ys.iter().min().unwrap() + 1;
        let w = xs.iter().max().unwrap() - xs.iter().min().unwrap() + 1;
        assert_eq!(h * w, zeros.len());
    }
}
