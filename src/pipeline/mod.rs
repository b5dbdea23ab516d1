//! From a recipe to running code: the dataset splits, transforms and loaders a recipe
//! describes, the model it builds or loads from a run folder ([`load_model`]), the training
//! loop ([`train`]), its resumable state, distillation's teacher, and ensembles of runs.
//!
//! Layering: this module sits above [`crate::recipe`] (which composes the configs of the
//! layers below) and below `viz`, `report`, `experiment`, `bench` and the CLI.

pub mod distill;
pub mod ensemble;
pub mod factory;
pub mod state;
pub mod step;
pub mod trainer;

pub use distill::Teacher;
pub use factory::{
    PretrainedSource, STATS_IMAGES, load_model, loader, norm_stats, prepare, pretrained_source,
    transform, view_loader,
};
pub use step::{Distill, StepConfig, StepOut, optimizer_for, train_step};
pub use trainer::{Quiet, Reporter, TrainOptions, train};

use std::sync::Arc;

use burn::prelude::*;

use crate::data::Dataset;
use crate::data::transforms::View;
use crate::error::Result;
use crate::eval::tta::{self, Probs, Tta, TtaResult};
use crate::models::Model;
use crate::recipe::Recipe;

/// Softmax probabilities of one view `(size, view)` of `data`, loaded as `recipe` says.
pub fn view_probabilities(
    model: &Model,
    recipe: &Recipe,
    data: Arc<dyn Dataset>,
    (size, view): (usize, View),
    device: &Device,
) -> Result<Probs> {
    let n = data.len();
    let l = view_loader(recipe, data, size, view)?;
    tta::view_probabilities(model, recipe.model.num_classes, n, l, device)
}

/// Mean softmax over `views` of `data`, loaded as `recipe` says.
pub fn probabilities(
    model: &Model,
    recipe: &Recipe,
    data: Arc<dyn Dataset>,
    views: &[(usize, View)],
    device: &Device,
) -> Result<Probs> {
    let n = data.len();
    let make = |s, v| view_loader(recipe, data.clone(), s, v);
    tta::probabilities(model, recipe.model.num_classes, n, views, &make, device)
}

/// [`tta::evaluate_tta`] with the views, input size and loaders of `recipe`.
pub fn evaluate_tta(
    model: &Model,
    recipe: &Recipe,
    data: Arc<dyn Dataset>,
    classes: &[String],
    tta: Tta,
    device: &Device,
) -> Result<TtaResult> {
    let make = |s, v| view_loader(recipe, data.clone(), s, v);
    tta::evaluate_tta(
        model,
        &recipe.eval,
        recipe.model.input_size,
        data.as_ref(),
        classes,
        tta,
        &make,
        device,
    )
}
