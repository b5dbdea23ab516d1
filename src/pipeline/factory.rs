//! What a recipe builds: its data splits (with what the recipe left to the data filled in),
//! transforms, loaders, and models, fresh or loaded from a run folder. The trainer, the
//! evaluators, `viz`, `report`, ensembles and the CLI all build through these functions.

use std::sync::Arc;

use burn::prelude::*;

use crate::checkpoint;
use crate::data::norm::{self, NormStats};
use crate::data::transforms::{Mode, View};
use crate::data::{Cached, Dataset, Loader, LoaderConfig, Splits, Transform, open};
use crate::error::{Error, Result};
use crate::models::Model;
use crate::recipe::RunRecipe;
use crate::recipe::{Normalize, Recipe};
use crate::run::RunDir;

/// Opens the recipe's data and fills in what the recipe left to the data: class count,
/// channels, input size, normalisation statistics.
pub fn prepare(recipe: &mut Recipe) -> Result<Splits> {
    let splits = open(&recipe.data.spec(recipe.seed))?;
    if splits.train.is_empty() || splits.val.is_empty() {
        return Err(Error::Invalid(format!(
            "the data has {} training and {} validation images; both must be non-empty",
            splits.train.len(),
            splits.val.len()
        )));
    }
    let source = match &recipe.model.pretrained {
        Some(p) => Some(pretrained_source(p)?),
        None => None,
    };
    let m = &mut recipe.model;
    // Pretrained weights are used as they were trained: their channels, input size and
    // normalisation, unless the recipe sets its own.
    if let Some(s) = &source {
        if m.in_channels == 0 {
            m.in_channels = s.in_channels;
        }
        if m.input_size == 0 {
            m.input_size = s.input_size.unwrap_or(m.name.default_input_size());
        }
        let d = &mut recipe.data;
        if d.mean.is_none() && d.std.is_none() {
            d.mean = Some(s.mean.clone());
            d.std = Some(s.std.clone());
        }
    }
    let m = &mut recipe.model;
    if m.num_classes == 0 {
        m.num_classes = splits.classes.len();
    }
    if m.num_classes != splits.classes.len() {
        return Err(Error::Recipe {
            origin: String::new(),
            key: "model.num_classes".into(),
            reason: format!(
                "{} but the data has {} classes",
                m.num_classes,
                splits.classes.len()
            ),
        });
    }
    if m.in_channels == 0 {
        m.in_channels = splits.channels;
    }
    if m.input_size == 0 {
        m.input_size = splits.native_size.unwrap_or(m.name.default_input_size());
    }
    m.validate()?;
    let rgb = m.in_channels == 3;
    let d = &mut recipe.data;
    if d.mean.is_none() || d.std.is_none() || (rgb && d.pca.is_none()) {
        let s = norm::cached(
            splits.train.as_ref(),
            m.in_channels,
            m.input_size,
            STATS_IMAGES,
            d.skip_bad_images,
        )?;
        d.mean.get_or_insert(s.mean);
        d.std.get_or_insert(s.std);
        if d.pca.is_none() {
            d.pca = s.pca;
        }
    }
    if d.normalize == Normalize::Mean {
        d.std = Some(vec![1.0; m.in_channels]);
    }
    Ok(splits)
}

/// What pretrained weights were trained with (`model.pretrained`).
pub struct PretrainedSource {
    /// The weights file (a run folder's best checkpoint).
    pub weights: std::path::PathBuf,
    pub in_channels: usize,
    /// `None` for a bare state dict: the model's own default (224 for the ImageNet models).
    pub input_size: Option<usize>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// Reads what `model.pretrained` points at: a run folder (its recipe says how it was trained)
/// or a state dict file (ImageNet's RGB statistics, as torchvision and timm train).
pub fn pretrained_source(path: &std::path::Path) -> Result<PretrainedSource> {
    use crate::interop::{IMAGENET_MEAN, IMAGENET_STD};
    if path.is_dir() {
        let run = RunDir::open(path)?;
        let r = run.read_recipe()?;
        let c = r.model.in_channels.max(1);
        return Ok(PretrainedSource {
            weights: run.checkpoint("best"),
            in_channels: r.model.in_channels,
            input_size: Some(r.model.input_size),
            mean: r.data.mean.unwrap_or_else(|| vec![0.5; c]),
            std: r.data.std.unwrap_or_else(|| vec![0.5; c]),
        });
    }
    if !path.is_file() {
        return Err(Error::Missing {
            path: path.to_path_buf(),
        });
    }
    Ok(PretrainedSource {
        weights: path.to_path_buf(),
        in_channels: 3,
        input_size: None,
        mean: IMAGENET_MEAN.to_vec(),
        std: IMAGENET_STD.to_vec(),
    })
}

/// Training images the normalisation statistics are computed over (evenly spaced): 10,000
/// pin the channel means to about 1e-4.
pub const STATS_IMAGES: usize = 10_000;

/// The normalisation statistics a resolved recipe uses (what `stats.json` in a run holds).
pub fn norm_stats(recipe: &Recipe) -> NormStats {
    let c = recipe.model.in_channels;
    NormStats {
        mean: recipe.data.mean.clone().unwrap_or_else(|| vec![0.5; c]),
        std: recipe.data.std.clone().unwrap_or_else(|| vec![0.5; c]),
        pca: recipe.data.pca.clone(),
        images: 0,
    }
}

/// The transform of a resolved recipe (`train` adds its augmentation).
pub fn transform(recipe: &Recipe, train: bool) -> Transform {
    let mode = if train {
        Mode::Train(recipe.augment.clone())
    } else {
        Mode::Eval(recipe.eval.single())
    };
    with_mode(recipe, recipe.model.input_size, mode)
}

fn with_mode(recipe: &Recipe, size: usize, mode: Mode) -> Transform {
    let s = norm_stats(recipe);
    Transform {
        channels: recipe.model.in_channels,
        size,
        mean: s.mean,
        std: s.std,
        pca: s.pca,
        mode,
    }
}

/// A loader over `data` with the recipe's settings.
pub fn loader(recipe: &Recipe, data: Arc<dyn Dataset>, train: bool) -> Result<Loader> {
    loader_with(recipe, data, transform(recipe, train), train)
}

/// An evaluation loader feeding one fixed view at input size `size` (test-time augmentation).
pub fn view_loader(
    recipe: &Recipe,
    data: Arc<dyn Dataset>,
    size: usize,
    view: View,
) -> Result<Loader> {
    loader_with(
        recipe,
        data,
        with_mode(recipe, size, Mode::Eval(view)),
        false,
    )
}

fn loader_with(
    recipe: &Recipe,
    data: Arc<dyn Dataset>,
    transform: Transform,
    train: bool,
) -> Result<Loader> {
    let data: Arc<dyn Dataset> = match recipe.data.cache_mb {
        0 => data,
        mb => Arc::new(Cached::new(data, recipe.model.in_channels, mb << 20)),
    };
    Loader::new(
        data,
        transform,
        LoaderConfig {
            batch_size: recipe.batch_size,
            train,
            drop_last: train,
            workers: recipe.data.workers,
            prefetch: recipe.data.prefetch,
            seed: recipe.seed,
            skip_bad: recipe.data.skip_bad_images,
            sampler: recipe.data.sampler,
        },
    )
}

/// Loads a run's model from a checkpoint (`best`, `last` or `epoch-N`) onto `device`: its
/// averaged (EMA) weights when the run kept them, else its weights.
pub fn load_model(run: &RunDir, recipe: &Recipe, which: &str, device: &Device) -> Result<Model> {
    let path = run.checkpoint(which);
    // Only the weights are read: not the optimiser's state, nor the raw weights beside the
    // averaged ones.
    let weights = checkpoint::open(&path)?.read_weights()?;
    let model = recipe.model.build(device)?;
    checkpoint::load_module(model, weights, &path, recipe.model.name.as_str())
}
