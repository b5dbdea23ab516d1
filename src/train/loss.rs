//! Losses, and the class weighting that reshapes the targets they are given.

use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

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

/// `loss.class_weights`: how much each class's samples count in the training loss.
///
/// In a recipe: `"none"`, `"balanced"`, or a list of one positive weight per class, in the
/// order of `classes.json`.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum ClassWeights {
    /// Every sample counts the same.
    #[default]
    None,
    /// `w_c = N / (K * n_c)` for a class with `n_c` of the `N` training samples: each class
    /// weighs as much in total (King & Zeng 2001; scikit-learn's `class_weight="balanced"`).
    Balanced,
    /// One weight per class.
    List(Vec<f64>),
}

/// The largest weight a list may give.
const MAX_WEIGHT: f64 = 1e6;

impl ClassWeights {
    /// Range checks that do not need the data: finite, positive, at most 1e6.
    pub fn validate(&self) -> Result<()> {
        if let ClassWeights::List(w) = self {
            if w.is_empty() {
                return Err(bad("an empty list (give one weight per class)".into()));
            }
            if let Some((c, v)) = w
                .iter()
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && **v > 0.0 && **v <= MAX_WEIGHT))
            {
                return Err(bad(format!(
                    "weight {v} of class {c} (each must be > 0 and at most {MAX_WEIGHT:e})"
                )));
            }
        }
        Ok(())
    }

    /// The weight of each of `counts.len()` classes, given each class's training samples;
    /// `None` when every sample counts the same. A class without samples gets weight 0 (it is
    /// never a label).
    pub fn resolve(&self, counts: &[usize]) -> Result<Option<Vec<f32>>> {
        match self {
            ClassWeights::None => Ok(None),
            ClassWeights::List(w) if w.len() != counts.len() => Err(bad(format!(
                "{} weights for {} classes (one per class, in the order of classes.json)",
                w.len(),
                counts.len()
            ))),
            ClassWeights::List(w) => Ok(Some(w.iter().map(|&v| v as f32).collect())),
            ClassWeights::Balanced => {
                let n: usize = counts.iter().sum();
                let k = counts.len() as f64;
                Ok(Some(
                    counts
                        .iter()
                        .map(|&c| {
                            if c == 0 {
                                0.0
                            } else {
                                (n as f64 / (k * c as f64)) as f32
                            }
                        })
                        .collect(),
                ))
            }
        }
    }
}

fn bad(reason: String) -> Error {
    Error::Recipe {
        origin: String::new(),
        key: "loss.class_weights".into(),
        reason,
    }
}

impl Serialize for ClassWeights {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self {
            ClassWeights::None => s.serialize_str("none"),
            ClassWeights::Balanced => s.serialize_str("balanced"),
            ClassWeights::List(w) => w.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for ClassWeights {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = ClassWeights;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"none\", \"balanced\" or a list of one weight per class")
            }
            fn visit_str<E: serde::de::Error>(
                self,
                v: &str,
            ) -> std::result::Result<Self::Value, E> {
                match v {
                    "none" => Ok(ClassWeights::None),
                    "balanced" => Ok(ClassWeights::Balanced),
                    _ => Err(E::invalid_value(serde::de::Unexpected::Str(v), &self)),
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut w = Vec::new();
                while let Some(v) = seq.next_element::<f64>()? {
                    // The count is checked against the classes later; this bounds the list.
                    if w.len() == crate::limits::MAX_CLASSES {
                        return Err(serde::de::Error::invalid_length(w.len() + 1, &self));
                    }
                    w.push(v);
                }
                Ok(ClassWeights::List(w))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Scales the rows of `targets` `[B, K]` so that [`soft_cross_entropy`]'s batch mean becomes
/// the weighted mean `sum_b s_b CE_b / sum_b s_b`, where `s_b = sum_k w_k q[b,k]` is the
/// target's class weight (for a one-hot target, its class's weight: PyTorch's
/// `CrossEntropyLoss(weight=w)`; for a mixed target, the mix of the two classes' weights).
/// Each row is multiplied by `B * s_b / sum s`, so the loss's scale does not depend on the
/// weights' and gradient accumulation, which weights each slice's mean by its share of `B`,
/// still sums to the whole batch's loss.
pub fn weight_targets(targets: &mut [f32], classes: usize, weights: &[f32]) {
    let rows = targets.len() / classes;
    let s: Vec<f64> = targets
        .chunks_exact(classes)
        .map(|q| q.iter().zip(weights).map(|(q, w)| (q * w) as f64).sum())
        .collect();
    let total: f64 = s.iter().sum();
    if total <= 0.0 {
        return;
    }
    for (q, s) in targets.chunks_exact_mut(classes).zip(&s) {
        let f = (rows as f64 * s / total) as f32;
        q.iter_mut().for_each(|v| *v *= f);
    }
}

/// Logit adjustment (Menon et al. 2021, "Long-tail learning via logit adjustment", eq. 10):
/// the offsets `tau * log(pi_c)` added to the logits inside the training loss, `pi_c = n_c / N`
/// the class's share of the training samples. The loss then asks the rare classes for larger
/// margins, and the unadjusted logits the model outputs estimate the balanced posterior, so
/// evaluation and prediction need no change. A class without samples counts as one.
pub fn logit_adjustment(counts: &[usize], tau: f64) -> Vec<f32> {
    let n = counts.iter().map(|&c| c.max(1)).sum::<usize>() as f64;
    counts
        .iter()
        .map(|&c| (tau * (c.max(1) as f64 / n).ln()) as f32)
        .collect()
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

    #[test]
    fn weighted_targets_give_the_weighted_mean_of_the_losses() {
        let device = Device::flex();
        // Two samples of class 0 and one of class 1, weights 1 and 4.
        let logits = [0.3f32, -0.2, 1.0, 0.5, -0.7, 0.1];
        let labels = [0, 0, 1];
        let w = [1.0f32, 4.0];
        let mut q = smoothed_targets(&labels, 2, 0.0);
        weight_targets(&mut q, 2, &w);
        let t = Tensor::<2>::from_data(TensorData::new(q, [3, 2]), &device);
        let l = Tensor::<2>::from_data(TensorData::new(logits.to_vec(), [3, 2]), &device);
        let loss = soft_cross_entropy(l, t).into_scalar::<f32>() as f64;
        // PyTorch's weighted mean: sum w_y CE / sum w_y.
        let ce = |r: &[f32], y: usize| {
            let lse = r.iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
            lse - r[y] as f64
        };
        let rows: Vec<&[f32]> = logits.chunks(2).collect();
        let want = (ce(rows[0], 0) + ce(rows[1], 0) + 4.0 * ce(rows[2], 1)) / 6.0;
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        // Equal weights change nothing.
        let mut q = smoothed_targets(&labels, 2, 0.1);
        let plain = q.clone();
        weight_targets(&mut q, 2, &[2.5, 2.5]);
        assert!(q.iter().zip(&plain).all(|(a, b)| (a - b).abs() < 1e-7));
    }

    #[test]
    fn logit_adjustment_is_tau_log_prior() {
        let a = logit_adjustment(&[75, 20, 5], 1.5);
        let want = [1.5 * 0.75f64.ln(), 1.5 * 0.2f64.ln(), 1.5 * 0.05f64.ln()];
        assert!(
            a.iter()
                .zip(want)
                .all(|(a, b)| (*a as f64 - b).abs() < 1e-6),
            "{a:?}"
        );
        // Equal classes shift every logit alike, which softmax ignores.
        let e = logit_adjustment(&[4, 4], 1.0);
        assert_eq!(e[0], e[1]);
    }

    #[test]
    fn balanced_weights_follow_n_over_k_n_c() {
        let w = ClassWeights::Balanced
            .resolve(&[60, 30, 10, 0])
            .unwrap()
            .unwrap();
        // N = 100, K = 4: 100 / (4 * 60), 100 / (4 * 30), 100 / (4 * 10); an absent class 0.
        let want = [100.0 / 240.0, 100.0 / 120.0, 2.5, 0.0];
        assert!(
            w.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6),
            "{w:?}"
        );
        // Each present class weighs the same in total: n_c * w_c = N / K.
        assert!((60.0 * w[0] - 25.0).abs() < 1e-5 && (10.0 * w[2] - 25.0).abs() < 1e-5);
        assert_eq!(ClassWeights::None.resolve(&[1, 2]).unwrap(), None);
        let e = ClassWeights::List(vec![1.0])
            .resolve(&[1, 2])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("loss.class_weights") && e.contains("1 weights for 2"),
            "{e}"
        );
        let e = ClassWeights::List(vec![1.0, -2.0])
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("class 1"), "{e}");
        assert!(ClassWeights::List(vec![f64::NAN]).validate().is_err());
    }

    #[test]
    fn class_weights_read_and_write_as_a_word_or_a_list() {
        #[derive(Deserialize, Serialize)]
        struct T {
            w: ClassWeights,
        }
        for (text, want) in [
            ("w = \"none\"", ClassWeights::None),
            ("w = \"balanced\"", ClassWeights::Balanced),
            ("w = [1, 2.5]", ClassWeights::List(vec![1.0, 2.5])),
        ] {
            let t: T = toml::from_str(text).unwrap();
            assert_eq!(t.w, want);
            let back: T = toml::from_str(&toml::to_string(&t).unwrap()).unwrap();
            assert_eq!(back.w, want);
        }
        let e = toml::from_str::<T>("w = \"balance\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("\"balanced\""), "{e}");
        assert!(toml::from_str::<T>("w = [\"a\"]").is_err());
    }
}
