//! Mean, standard deviation and the standard error of a difference of means, over seeds.

/// Summary of repeated measurements.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeanStd {
    pub n: usize,
    pub mean: f64,
    /// Sample standard deviation (n - 1 in the denominator; 0 for one value).
    pub std: f64,
}

impl MeanStd {
    pub fn of(xs: &[f64]) -> Self {
        let n = xs.len();
        if n == 0 {
            return MeanStd {
                n,
                mean: f64::NAN,
                std: f64::NAN,
            };
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        let std = if n > 1 {
            (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        MeanStd { n, mean, std }
    }

    /// Standard error of the mean.
    pub fn se(&self) -> f64 {
        self.std / (self.n as f64).sqrt()
    }

    /// `self.mean - other.mean` and its standard error, `sqrt(se_a^2 + se_b^2)` (independent
    /// samples: different seeds train different nets).
    pub fn diff(&self, other: &MeanStd) -> (f64, f64) {
        (
            self.mean - other.mean,
            (self.se().powi(2) + other.se().powi(2)).sqrt(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_numbers() {
        // 2, 4, 4, 4, 5, 5, 7, 9: mean 5, sample variance 32/7.
        let m = MeanStd::of(&[2., 4., 4., 4., 5., 5., 7., 9.]);
        assert_eq!(m.mean, 5.0);
        assert!((m.std - (32.0f64 / 7.0).sqrt()).abs() < 1e-12);
        assert!((m.se() - (32.0f64 / 7.0 / 8.0).sqrt()).abs() < 1e-12);
        let one = MeanStd::of(&[0.7]);
        assert_eq!((one.mean, one.std, one.se()), (0.7, 0.0, 0.0));
        // Difference: (1, 2, 3) vs (2, 4, 6): means 2 and 4, sds 1 and 2, se^2 = 1/3 + 4/3.
        let (d, se) = MeanStd::of(&[1., 2., 3.]).diff(&MeanStd::of(&[2., 4., 6.]));
        assert_eq!(d, -2.0);
        assert!((se - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }
}
