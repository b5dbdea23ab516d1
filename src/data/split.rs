//! Seeded, stratified index selection: the same seed gives the same split on every machine.

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use crate::helpers::Stream;

/// Indices of each class, each list shuffled with a seed derived from `seed` and the class.
fn shuffled_by_class(labels: &[usize], seed: u64) -> Vec<Vec<usize>> {
    let classes = labels.iter().copied().max().map_or(0, |m| m + 1);
    let mut by_class = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l].push(i);
    }
    for (c, list) in by_class.iter_mut().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(Stream::Split { class: c }.seed(seed));
        list.shuffle(&mut rng);
    }
    by_class
}

/// Splits `0..labels.len()` into (train, val) with `round(n_c * val_fraction)` validation samples
/// from every class `c` (at least one when the class has two or more samples and the fraction
/// is positive). Both lists are sorted.
pub fn stratified_split(
    labels: &[usize],
    val_fraction: f64,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let mut train = Vec::new();
    let mut val = Vec::new();
    for list in shuffled_by_class(labels, seed) {
        let n = list.len();
        let mut n_val = (n as f64 * val_fraction).round() as usize;
        if n_val == 0 && val_fraction > 0.0 && n >= 2 {
            n_val = 1;
        }
        val.extend_from_slice(&list[..n_val.min(n)]);
        train.extend_from_slice(&list[n_val.min(n)..]);
    }
    train.sort_unstable();
    val.sort_unstable();
    (train, val)
}

/// A stratified subset of `limit` positions of `labels`: classes are visited round-robin, so
/// every class keeps its share (to within one sample). Returns sorted positions.
pub fn stratified_subset(labels: &[usize], limit: usize, seed: u64) -> Vec<usize> {
    if limit >= labels.len() {
        return (0..labels.len()).collect();
    }
    let lists = shuffled_by_class(labels, seed);
    let mut out = Vec::with_capacity(limit);
    let mut round = 0;
    while out.len() < limit {
        for list in &lists {
            if let Some(&i) = list.get(round) {
                out.push(i);
                if out.len() == limit {
                    break;
                }
            }
        }
        round += 1;
    }
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_stratified_and_deterministic() {
        let labels: Vec<usize> = (0..1000).map(|i| i % 10).collect();
        let (train, val) = stratified_split(&labels, 0.2, 7);
        assert_eq!(train.len(), 800);
        assert_eq!(val.len(), 200);
        for c in 0..10 {
            assert_eq!(val.iter().filter(|&&i| labels[i] == c).count(), 20);
        }
        assert_eq!(
            stratified_split(&labels, 0.2, 7),
            (train.clone(), val.clone())
        );
        assert_ne!(stratified_split(&labels, 0.2, 8).1, val);
        let mut all: Vec<usize> = train.iter().chain(val.iter()).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<_>>());
    }

    #[test]
    fn subset_keeps_class_balance() {
        let labels: Vec<usize> = (0..300).map(|i| if i < 200 { 0 } else { 1 }).collect();
        let s = stratified_subset(&labels, 10, 1);
        assert_eq!(s.len(), 10);
        assert_eq!(s.iter().filter(|&&i| labels[i] == 1).count(), 5);
    }
}
