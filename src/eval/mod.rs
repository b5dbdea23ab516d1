//! Evaluation: run a model over a loader and summarise its predictions.

pub mod metrics;
pub mod separation;
pub mod tta;

use burn::prelude::*;

use crate::data::{Batch, Loader};
use crate::error::Result;
use crate::models::Model;
pub use metrics::{Accumulator, ClassAccuracy, EvalReport};

/// Turns a loader batch into a `[B, C, H, W]` tensor on `device`.
pub fn batch_tensor(batch: &Batch, device: &Device) -> Tensor<4> {
    let [c, h, w] = batch.sample_shape;
    Tensor::from_data(
        TensorData::new(batch.images.clone(), [batch.len(), c, h, w]),
        device,
    )
}

/// Logits of a batch, on the host, `[B * K]` row-major. `model` should be in eval mode.
pub fn logits(model: &Model, batch: &Batch, device: &Device) -> Vec<f32> {
    model
        .forward(batch_tensor(batch, device))
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 logits")
}

/// Evaluates `model` (eval mode, no autodiff) over every batch of `loader`. Returns the report
/// and the images skipped as undecodable, as `(source, reason)`.
pub fn evaluate(
    model: &Model,
    loader: &Loader,
    classes: &[String],
    device: &Device,
) -> Result<(EvalReport, Vec<(String, String)>)> {
    let mut acc = Accumulator::new(classes.len());
    let mut skipped = Vec::new();
    for batch in loader.epoch(0) {
        let mut batch = batch?;
        skipped.append(&mut batch.skipped);
        if batch.is_empty() {
            continue;
        }
        acc.add(&logits(model, &batch, device), &batch.labels);
    }
    Ok((acc.finish(classes), skipped))
}
