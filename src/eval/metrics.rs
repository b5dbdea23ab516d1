//! Classification metrics on host-side logits: loss, top-k, per-class recall ("accuracy"),
//! precision and F1, the confusion matrix, and the two summaries that stay honest when classes
//! are imbalanced: balanced accuracy (the mean of the per-class recalls, Brodersen et al. 2010)
//! and macro F1 (the mean of the per-class F1 scores), both as scikit-learn defines them.

use serde::{Deserialize, Serialize};

/// Accumulates predictions batch by batch.
#[derive(Clone, Debug)]
pub struct Accumulator {
    pub classes: usize,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    pub top5_hits: usize,
    pub loss_sum: f64,
    pub count: usize,
}

/// Rank of the true class: how many classes score strictly higher (0 = top-1 hit). Ties go
/// in the prediction's favour, as `torch.topk`-based accuracy does in practice.
pub fn rank_of(row: &[f32], label: usize) -> usize {
    let v = row[label];
    row.iter().filter(|&&x| x > v).count()
}

/// Index of the largest score (the first one on ties).
pub fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in row.iter().enumerate() {
        if x > row[best] {
            best = i;
        }
    }
    best
}

/// `-log softmax(row)[label]`, computed stably.
pub fn cross_entropy(row: &[f32], label: usize) -> f64 {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
    lse - row[label] as f64
}

impl Accumulator {
    pub fn new(classes: usize) -> Self {
        Accumulator {
            classes,
            confusion: vec![vec![0; classes]; classes],
            top5_hits: 0,
            loss_sum: 0.0,
            count: 0,
        }
    }

    /// Adds a batch of scores (`[B, K]` row-major logits or log-probabilities) and labels.
    pub fn add(&mut self, scores: &[f32], labels: &[usize]) {
        let k = self.classes;
        for (row, &l) in scores.chunks_exact(k).zip(labels) {
            self.confusion[l][argmax(row)] += 1;
            if rank_of(row, l) < 5 {
                self.top5_hits += 1;
            }
            self.loss_sum += cross_entropy(row, l);
            self.count += 1;
        }
    }

    pub fn finish(&self, names: &[String]) -> EvalReport {
        let n = self.count.max(1) as f64;
        let correct: usize = (0..self.classes).map(|c| self.confusion[c][c]).sum();
        let per_class: Vec<ClassAccuracy> = (0..self.classes)
            .map(|c| {
                let count: usize = self.confusion[c].iter().sum();
                let predicted: usize = self.confusion.iter().map(|row| row[c]).sum();
                let hits = self.confusion[c][c] as f64;
                // 0 where undefined (no sample, no prediction), as scikit-learn's
                // `zero_division=0`.
                let ratio = |d: usize| if d == 0 { 0.0 } else { hits / d as f64 };
                let (recall, precision) = (ratio(count), ratio(predicted));
                ClassAccuracy {
                    class: names.get(c).cloned().unwrap_or_else(|| c.to_string()),
                    accuracy: recall,
                    precision,
                    f1: if recall + precision == 0.0 {
                        0.0
                    } else {
                        2.0 * precision * recall / (precision + recall)
                    },
                    count,
                    predicted,
                }
            })
            .collect();
        // Balanced accuracy averages over the classes that have samples; macro F1 over those
        // that have samples or predictions (scikit-learn's `balanced_accuracy_score` and
        // `f1_score(average="macro")` on the labels seen).
        let mean = |v: Vec<f64>| {
            if v.is_empty() {
                0.0
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        let balanced_top1 = mean(
            per_class
                .iter()
                .filter(|c| c.count > 0)
                .map(|c| c.accuracy)
                .collect(),
        );
        let macro_f1 = mean(
            per_class
                .iter()
                .filter(|c| c.count + c.predicted > 0)
                .map(|c| c.f1)
                .collect(),
        );
        EvalReport {
            top1: correct as f64 / n,
            top5: self.top5_hits as f64 / n,
            balanced_top1,
            macro_f1,
            loss: self.loss_sum / n,
            count: self.count,
            per_class,
            confusion: self.confusion.clone(),
        }
    }
}

/// How well one class is recognised.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassAccuracy {
    pub class: String,
    /// Recall: the fraction of this class's samples predicted as it.
    pub accuracy: f64,
    /// The fraction of predictions of this class that are right.
    #[serde(default)]
    pub precision: f64,
    /// Harmonic mean of precision and recall.
    #[serde(default)]
    pub f1: f64,
    /// Samples of this class.
    pub count: usize,
    /// Samples predicted as this class.
    #[serde(default)]
    pub predicted: usize,
}

/// What `convlab eval --json` prints. Accuracies are fractions in [0, 1].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub top1: f64,
    pub top5: f64,
    /// Mean per-class recall over the classes present: top-1 as if every class were equally
    /// frequent.
    #[serde(default)]
    pub balanced_top1: f64,
    /// Mean per-class F1.
    #[serde(default)]
    pub macro_f1: f64,
    pub loss: f64,
    pub count: usize,
    pub per_class: Vec<ClassAccuracy>,
    /// Rows are the true class, columns the predicted class.
    pub confusion: Vec<Vec<usize>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_and_confusion_hand_computed() {
        // 3 classes, 4 samples.
        let scores = [
            0.9, 0.05, 0.05, // label 0, predicted 0
            0.2, 0.7, 0.1, // label 0, predicted 1 (true class rank 1)
            0.1, 0.3, 0.6, // label 2, predicted 2
            0.5, 0.1, 0.4, // label 1, predicted 0 (true class rank 2)
        ];
        let mut a = Accumulator::new(3);
        a.add(&scores, &[0, 0, 2, 1]);
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let r = a.finish(&names);
        assert_eq!(r.top1, 0.5);
        assert_eq!(r.top5, 1.0);
        assert_eq!(
            r.confusion,
            vec![vec![1, 1, 0], vec![1, 0, 0], vec![0, 0, 1]]
        );
        assert_eq!(r.per_class[0].accuracy, 0.5);
        assert_eq!(r.per_class[1].count, 1);
        assert_eq!(rank_of(&[0.2, 0.7, 0.1], 2), 2);
        let total: usize = r.confusion.iter().flatten().sum();
        assert_eq!(total, 4);
    }

    #[test]
    fn precision_f1_balanced_accuracy_and_macro_f1_hand_computed() {
        // 3 classes; class 2 never occurs and is never predicted. Confusion (true x pred):
        // [[3, 1, 0], [2, 0, 0], [0, 0, 0]]: class 0 recall 3/4, precision 3/5; class 1 recall
        // 0/2, precision 0/1.
        let mut a = Accumulator::new(3);
        let one_hot = |c: usize| {
            let mut r = [0.0f32; 3];
            r[c] = 1.0;
            r
        };
        let pairs = [(0, 0), (0, 0), (0, 0), (0, 1), (1, 0), (1, 0)];
        for (t, p) in pairs {
            a.add(&one_hot(p), &[t]);
        }
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let r = a.finish(&names);
        let c0 = &r.per_class[0];
        assert_eq!((c0.accuracy, c0.precision, c0.predicted), (0.75, 0.6, 5));
        let f1 = 2.0 * 0.6 * 0.75 / (0.6 + 0.75);
        assert!((c0.f1 - f1).abs() < 1e-12);
        assert_eq!((r.per_class[1].precision, r.per_class[1].f1), (0.0, 0.0));
        assert_eq!(r.per_class[2].count + r.per_class[2].predicted, 0);
        assert_eq!(r.top1, 0.5);
        // The absent class counts in neither mean.
        assert!(
            (r.balanced_top1 - 0.375).abs() < 1e-12,
            "{}",
            r.balanced_top1
        );
        assert!((r.macro_f1 - f1 / 2.0).abs() < 1e-12, "{}", r.macro_f1);
    }

    #[test]
    fn cross_entropy_matches_formula() {
        let ce = cross_entropy(&[0.0, 3f32.ln()], 1);
        assert!((ce - (-(0.75f64).ln())).abs() < 1e-6);
    }
}
