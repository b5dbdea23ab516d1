//! Losses.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;

/// Soft-target cross-entropy, averaged over the batch: `-mean_b sum_k q[b,k] log p[b,k]` with
/// `p = softmax(logits)`.
///
/// # Shapes
/// logits `[B, K]`, targets `[B, K]` (rows sum to 1) -> `[1]`.
pub fn soft_cross_entropy(logits: Tensor<2>, targets: Tensor<2>) -> Tensor<1> {
    (log_softmax(logits, 1) * targets).sum_dim(1).mean().neg()
}

/// One-hot targets with label smoothing (Szegedy et al. 2016, "Rethinking the Inception
/// Architecture"): the true class gets `1 - eps + eps / K`, every other class `eps / K`.
/// Returns `[B * K]` row-major.
pub fn smoothed_targets(labels: &[usize], classes: usize, eps: f64) -> Vec<f32> {
    let off = (eps / classes as f64) as f32;
    let on = (1.0 - eps + eps / classes as f64) as f32;
    let mut t = vec![off; labels.len() * classes];
    for (b, &l) in labels.iter().enumerate() {
        t[b * classes + l] = on;
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smoothed_cross_entropy_hand_computed() {
        let device = Device::flex();
        // logits [0, ln 3] -> p = [0.25, 0.75]; eps 0.2, K 2 -> q = [0.1, 0.9] for label 1.
        let logits = Tensor::<2>::from_data([[0.0f32, 3f32.ln()]], &device);
        let q = smoothed_targets(&[1], 2, 0.2);
        assert!(
            (q[0] - 0.1).abs() < 1e-7 && (q[1] - 0.9).abs() < 1e-7,
            "{q:?}"
        );
        let t = Tensor::<2>::from_data(TensorData::new(q, [1, 2]), &device);
        let loss = soft_cross_entropy(logits, t).into_scalar::<f32>();
        let want = -(0.1 * 0.25f32.ln() + 0.9 * 0.75f32.ln());
        assert!((loss - want).abs() < 1e-5, "{loss} vs {want}");
    }
}
