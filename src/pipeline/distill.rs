//! Knowledge distillation (Hinton, Vinyals & Dean 2015) from a trained run:
//!
//! `loss = (1 - alpha) * CE(student, targets) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))`
//!
//! The teacher is any registered model from a run folder, in eval mode and without gradients.
//! It sees the student's (augmented, possibly mixed) batch converted to its own input: the
//! student's normalisation is undone, channels converted, the image resized to the teacher's
//! input size (bilinear), and the teacher's normalisation applied.

use std::path::Path;

use burn::prelude::*;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use super::factory::load_model;
use crate::error::{Error, Result};
use crate::models::Model;
use crate::recipe::Recipe;
use crate::recipe::RunRecipe;
use crate::run::RunDir;

/// A loaded teacher.
pub struct Teacher {
    pub model: Model,
    pub recipe: Recipe,
    device: Device,
}

fn per_channel(v: &[f32], device: &Device) -> Tensor<4> {
    Tensor::<1>::from_data(TensorData::new(v.to_vec(), [v.len()]), device).reshape([
        1,
        v.len(),
        1,
        1,
    ])
}

impl Teacher {
    /// Loads the best checkpoint of the run in `dir` onto `device` (no autodiff).
    pub fn load(dir: &Path, classes: usize, device: &Device) -> Result<Self> {
        let run = RunDir::open(dir)?;
        let recipe = run.read_recipe()?;
        if recipe.model.num_classes != classes {
            return Err(Error::Recipe {
                origin: String::new(),
                key: "distill.teacher".into(),
                reason: format!(
                    "{} predicts {} classes, the student {}",
                    dir.display(),
                    recipe.model.num_classes,
                    classes
                ),
            });
        }
        let model = load_model(&run, &recipe, "best", device)?;
        Ok(Teacher {
            model,
            recipe,
            device: device.clone(),
        })
    }

    /// The teacher with its convolutions in `precision` ([`Model::with_precision`]).
    pub fn with_precision(mut self, precision: crate::kernels::Precision) -> Self {
        self.model = self.model.with_precision(precision);
        self
    }

    /// Teacher logits for a student batch `x` normalised with `mean`/`std`.
    ///
    /// # Shapes
    /// `[B, C_s, S_s, S_s]` -> `[B, K]`.
    pub fn logits(&self, x: Tensor<4>, mean: &[f32], std: &[f32]) -> Tensor<2> {
        let d = &self.device;
        let x = x.inner().detach();
        let raw = x * per_channel(std, d) + per_channel(mean, d);
        let [_, c, s, _] = raw.dims();
        let tc = self.recipe.model.in_channels;
        let raw = match (c, tc) {
            (1, 3) => raw.repeat_dim(1, 3),
            (3, 1) => (raw * per_channel(&[0.299, 0.587, 0.114], d)).sum_dim(1),
            _ => raw,
        };
        let ts = self.recipe.model.input_size;
        let raw = if ts != s {
            interpolate(
                raw,
                InterpolateOptions::new(InterpolateMode::Bilinear)
                    .with_align_corners(false)
                    .with_output_size([ts, ts]),
            )
        } else {
            raw
        };
        let tm = self
            .recipe
            .data
            .mean
            .clone()
            .unwrap_or_else(|| vec![0.5; tc]);
        let tsd = self
            .recipe
            .data
            .std
            .clone()
            .unwrap_or_else(|| vec![0.5; tc]);
        let xt = (raw - per_channel(&tm, d)) / per_channel(&tsd, d);
        self.model.forward(xt)
    }
}

/// `T^2 * KL(softmax(teacher / T) || softmax(student / T))`, averaged over the batch.
///
/// # Shapes
/// `[B, K]`, `[B, K]` -> `[1]`.
pub fn kd_loss(student: Tensor<2>, teacher: Tensor<2>, temperature: f64) -> Tensor<1> {
    let t = temperature;
    let log_p_t = log_softmax(teacher.clone() / t, 1);
    let p_t = softmax(teacher / t, 1);
    let log_p_s = log_softmax(student / t, 1);
    (p_t * (log_p_t - log_p_s)).sum_dim(1).mean() * (t * t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kd_loss_hand_computed() {
        let device = Device::flex();
        // T = 2: teacher logits [0, 2 ln 3] -> p_t = [1/4, 3/4]; student [0, 0] -> p_s = [1/2, 1/2].
        // KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812; x T^2 = 0.523248.
        let t = Tensor::<2>::from_data([[0.0f32, 2.0 * 3f32.ln()]], &device);
        let s = Tensor::<2>::from_data([[0.0f32, 0.0]], &device);
        let v = kd_loss(s, t, 2.0).into_scalar::<f32>();
        let want = 4.0 * (0.25 * 0.5f32.ln() + 0.75 * 1.5f32.ln());
        assert!((v - want).abs() < 1e-5, "{v} vs {want}");
        // Identical distributions: zero.
        let a = Tensor::<2>::from_data([[1.0f32, -1.0, 0.5]], &device);
        assert!(kd_loss(a.clone(), a, 3.0).into_scalar::<f32>().abs() < 1e-6);
    }
}
