//! The training recipe: one serialisable struct, layered as built-in defaults < `--recipe FILE`
//! < command-line flags < `--set key.path=value`. Unknown keys and wrongly typed values are
//! errors that name the key and where it came from.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::transforms::Pca;
use crate::data::{Augment, DataFormat, DataSpec, Sampler};
use crate::error::{Error, Result};
use crate::eval::tta::EvalConfig;
use crate::models::ModelConfig;
use crate::train::loss::ClassWeights;

// Each section's config lives with the code that consumes it; the recipe composes them.
pub use crate::train::optim::{OptimConfig, OptimKind};
pub use crate::train::schedule::{PlateauMetric, ScheduleConfig, ScheduleKind, ValMetric};

/// Everything that defines a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// Seeds weight init, shuffling, augmentation and dropout.
    pub seed: u64,
    /// Full passes over the training split.
    pub epochs: usize,
    /// Images per optimiser step.
    pub batch_size: usize,
    /// Forward and backward passes each batch is cut into, their gradients summed before the
    /// one optimiser step (1 = off): the same step in less memory, batch norm aside (each
    /// slice normalises with its own statistics). `batch_size` and the learning rate keep
    /// their meaning.
    pub grad_accum_steps: usize,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub augment: Augment,
    pub eval: EvalConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub loss: LossConfig,
    pub regularisation: RegularisationConfig,
    /// Fine-tuning from `model.pretrained`: frozen backbone, discriminative learning rates.
    pub finetune: crate::train::finetune::FinetuneConfig,
    pub distill: DistillConfig,
    /// Start from a trained run: copy every tensor whose layer name and shape match from its
    /// best checkpoint (VGG's shallow-to-deep initialisation); the rest keeps `model.init`.
    pub init_from: Option<PathBuf>,
    /// Also keep `checkpoints/epoch-N` every this many epochs (0 = only last and best); the
    /// visualisations of features across epochs read them.
    pub checkpoint_every: usize,
    /// What picks `checkpoints/best`: `val_top1`, `val_balanced_top1` (for imbalanced
    /// validation data, where top-1 rewards predicting the frequent classes), `val_macro_f1`
    /// or `val_loss`.
    pub best_metric: ValMetric,
    /// `fp32`, or `bf16`: convolutions multiply in bfloat16 (summing in f32) while weights,
    /// optimiser state, batch-norm statistics and the loss stay f32. Needs AVX512-BF16 on
    /// burn-flex; elsewhere training says so and runs in fp32.
    pub precision: crate::kernels::Precision,
}

/// `[distill]`: knowledge distillation from a trained run (Hinton et al. 2015).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillConfig {
    /// Run folder of the teacher; absent = no distillation.
    pub teacher: Option<PathBuf>,
    /// Softmax temperature T.
    pub temperature: f64,
    /// Weight of the distillation term.
    pub alpha: f64,
}

impl Default for DistillConfig {
    fn default() -> Self {
        DistillConfig {
            teacher: None,
            temperature: 4.0,
            alpha: 0.5,
        }
    }
}

/// `[regularisation]`: stability and averaging (dropout is a model option).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RegularisationConfig {
    /// Exponential moving average of the weights, decay per step (0 = off; 0.999 is usual).
    pub ema_decay: f64,
    /// Clip the global gradient L2 norm to this value (0 = off).
    pub grad_clip_norm: f64,
}

/// `[data]`: where the images come from and how they are read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Dataset path; absent = the built-in Fashion-MNIST split.
    pub path: Option<PathBuf>,
    /// Format; absent = detected from the path.
    pub format: Option<DataFormat>,
    /// Held-out fraction when the data has no split of its own.
    pub val_fraction: f64,
    /// Stratified subsets (tests, quick trials).
    pub limit_train: Option<usize>,
    pub limit_val: Option<usize>,
    /// Skip and count undecodable (or vanished) images instead of stopping.
    pub skip_bad_images: bool,
    /// How a training epoch picks its samples: `shuffle` (each once) or `balanced` (classes
    /// equally often, with replacement).
    pub sampler: Sampler,
    /// Decode/augment threads.
    pub workers: usize,
    /// Batches decoded ahead of the training step.
    pub prefetch: usize,
    /// Keep decoded images in memory up to this many MiB (0 = off: stream from disk, holding
    /// only the batches in flight).
    pub cache_mb: usize,
    /// `standard`: `(v - mean) / std`; `mean`: subtract the mean only (VGG, AlexNet).
    pub normalize: Normalize,
    /// Per-channel mean and std of the training images in [0, 1]; computed when absent.
    pub mean: Option<Vec<f32>>,
    pub std: Option<Vec<f32>>,
    /// Principal components of the training set's RGB pixels (PCA lighting); computed when
    /// absent and the data is RGB.
    pub pca: Option<Pca>,
}

/// How pixels are normalised.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    #[default]
    Standard,
    Mean,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            path: None,
            format: None,
            val_fraction: 0.2,
            limit_train: None,
            limit_val: None,
            skip_bad_images: false,
            sampler: Sampler::Shuffle,
            workers: 2,
            prefetch: 4,
            cache_mb: 0,
            normalize: Normalize::Standard,
            mean: None,
            std: None,
            pca: None,
        }
    }
}

impl DataConfig {
    pub fn spec(&self, seed: u64) -> DataSpec {
        DataSpec {
            path: self.path.clone(),
            format: self.format,
            val_fraction: self.val_fraction,
            seed,
            limit_train: self.limit_train,
            limit_val: self.limit_val,
        }
    }
}

/// `[loss]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Label smoothing epsilon (Szegedy et al. 2016).
    pub label_smoothing: f64,
    /// Weight of each auxiliary classifier's loss (GoogLeNet: 0.3, Szegedy et al. 2014).
    pub aux_weight: f64,
    /// Mixup's Beta(alpha, alpha) (0 = off; Zhang et al. 2018; "Bag of Tricks" uses 0.2).
    pub mixup_alpha: f64,
    /// CutMix's Beta(alpha, alpha) (0 = off; Yun et al. 2019 use 1.0).
    pub cutmix_alpha: f64,
    /// Probability that a batch is mixed.
    pub mix_prob: f64,
    /// No mixing in the last this many epochs.
    pub mix_off_epochs: usize,
    /// `"none"`, `"balanced"` (`N / (K * n_c)`) or one weight per class: how much each
    /// class's samples count in the loss.
    pub class_weights: ClassWeights,
    /// Logit adjustment's `tau` (0 = off; Menon et al. 2021 use 1): the loss sees
    /// `logits + tau * log(class prior)`.
    pub logit_adjustment: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            label_smoothing: 0.0,
            aux_weight: 0.3,
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            mix_prob: 1.0,
            mix_off_epochs: 0,
            class_weights: ClassWeights::None,
            logit_adjustment: 0.0,
        }
    }
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe {
            seed: 0,
            epochs: 15,
            batch_size: 64,
            grad_accum_steps: 1,
            model: ModelConfig::default(),
            data: DataConfig::default(),
            augment: Augment::default(),
            eval: EvalConfig::default(),
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            loss: LossConfig {
                label_smoothing: 0.1,
                ..LossConfig::default()
            },
            regularisation: RegularisationConfig::default(),
            finetune: Default::default(),
            distill: DistillConfig::default(),
            init_from: None,
            checkpoint_every: 0,
            best_metric: ValMetric::ValTop1,
            precision: crate::kernels::Precision::Fp32,
        }
    }
}

/// One `key.path=value` override and where it came from (`--set`, `--lr`, ...).
#[derive(Clone, Debug)]
pub struct Override {
    pub key: String,
    pub value: toml::Value,
    pub origin: String,
}

impl Override {
    /// Parses `key.path=value`; the value is read as TOML (`0.1`, `true`, `"max"`, `[1, 2]`),
    /// and as a plain string when it is not valid TOML (`model.name=vgg16`).
    pub fn parse(text: &str) -> Result<Self> {
        let (key, raw) = text.split_once('=').ok_or_else(|| Error::Recipe {
            origin: "--set".into(),
            key: text.into(),
            reason: "expected key.path=value".into(),
        })?;
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        Ok(Override {
            key: key.trim().to_string(),
            value,
            origin: "--set".into(),
        })
    }

    /// An override from a named command-line flag.
    pub fn flag(key: &str, value: impl Into<toml::Value>, flag: &str) -> Self {
        Override {
            key: key.into(),
            value: value.into(),
            origin: flag.into(),
        }
    }
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn set_path(
    table: &mut toml::Table,
    key: &str,
    value: toml::Value,
) -> std::result::Result<(), String> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().filter(|s| !s.is_empty()).ok_or("empty key")?;
    let mut t = table;
    for p in parts {
        let entry = t
            .entry(p.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is a value, not a section"))?;
    }
    t.insert(last.to_string(), value);
    Ok(())
}

fn has_path(table: &toml::Table, key: &str) -> bool {
    let mut t = table;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, p) in parts.iter().enumerate() {
        match t.get(*p) {
            Some(toml::Value::Table(sub)) if i + 1 < parts.len() => t = sub,
            Some(_) if i + 1 == parts.len() => return true,
            _ => return false,
        }
    }
    false
}

impl Recipe {
    /// Resolves defaults < `file` < `overrides` (in order).
    pub fn resolve(file: Option<&Path>, overrides: &[Override]) -> Result<Self> {
        let mut table = toml::Table::try_from(Recipe::default()).expect("defaults serialise");
        let mut file_table = toml::Table::new();
        if let Some(f) = file {
            let text = std::fs::read_to_string(f).map_err(|e| Error::io(f, e))?;
            file_table = toml::from_str(&text).map_err(|e| Error::Recipe {
                origin: f.display().to_string(),
                key: "(syntax)".into(),
                reason: e.to_string().trim().to_string(),
            })?;
            merge(&mut table, file_table.clone());
        }
        for o in overrides {
            set_path(&mut table, &o.key, o.value.clone()).map_err(|reason| Error::Recipe {
                origin: o.origin.clone(),
                key: o.key.clone(),
                reason,
            })?;
        }
        let value = toml::Value::Table(table);
        let recipe: Recipe = serde_path_to_error::deserialize(value).map_err(|e| {
            let mut key = e.path().to_string();
            // The message alone: toml's `Display` adds "in `KEY`" on lines of its own, and the
            // key is already named.
            let reason = e.inner().message().trim().to_string();
            // For an unknown field the path stops at its section; add the field's name.
            if let Some(name) = reason
                .strip_prefix("unknown field `")
                .and_then(|r| r.split('`').next())
            {
                if key == "." {
                    key = name.to_string();
                } else if !key.ends_with(&format!(".{name}")) && key != name {
                    key = format!("{key}.{name}");
                }
            }
            let origin = overrides
                .iter()
                .rev()
                .find(|o| {
                    o.key == key
                        || key.starts_with(&format!("{}.", o.key))
                        || o.key.starts_with(&format!("{key}."))
                })
                .map(|o| o.origin.clone())
                .or_else(|| {
                    (file.is_some() && has_path(&file_table, &key))
                        .then(|| file.unwrap().display().to_string())
                })
                .unwrap_or_else(|| file.map_or("defaults".into(), |f| f.display().to_string()));
            Error::Recipe {
                origin,
                key,
                reason,
            }
        })?;
        recipe.validate()?;
        Ok(recipe)
    }

    /// Reads a resolved recipe (from a run folder).
    pub fn load_resolved(path: &Path) -> Result<Self> {
        Self::resolve(Some(path), &[])
    }

    /// Range checks that serde's types cannot express.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, reason: &str| {
            Err(Error::Recipe {
                origin: String::new(),
                key: key.into(),
                reason: reason.into(),
            })
        };
        use crate::limits::{MAX_BATCH, MAX_EPOCHS, MAX_WORKERS};
        if !(1..=MAX_EPOCHS).contains(&self.epochs) {
            return bad(
                "epochs",
                &format!("{} (must be 1 to {MAX_EPOCHS})", self.epochs),
            );
        }
        if !(1..=MAX_BATCH).contains(&self.batch_size) {
            return bad(
                "batch_size",
                &format!("{} (must be 1 to {MAX_BATCH})", self.batch_size),
            );
        }
        if !(1..=self.batch_size).contains(&self.grad_accum_steps) {
            return bad(
                "grad_accum_steps",
                &format!(
                    "{} (must be 1 to batch_size, {})",
                    self.grad_accum_steps, self.batch_size
                ),
            );
        }
        if self.data.prefetch > 1024 {
            return bad(
                "data.prefetch",
                &format!("{} batches (at most 1024)", self.data.prefetch),
            );
        }
        if self.data.cache_mb > 1 << 20 {
            return bad(
                "data.cache_mb",
                &format!("{} MB (at most 1048576, 1 TB)", self.data.cache_mb),
            );
        }
        if self.data.workers > MAX_WORKERS {
            return bad(
                "data.workers",
                &format!("{} (at most {MAX_WORKERS})", self.data.workers),
            );
        }
        if !(self.optim.lr > 0.0 && self.optim.lr.is_finite()) {
            return bad("optim.lr", "must be a positive number");
        }
        if !(0.0..1.0).contains(&self.optim.momentum) {
            return bad("optim.momentum", "must be in [0, 1)");
        }
        if self.optim.weight_decay < 0.0 {
            return bad("optim.weight_decay", "must be >= 0");
        }
        if !(0.0..1.0).contains(&self.data.val_fraction) {
            return bad("data.val_fraction", "must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.loss.label_smoothing) {
            return bad("loss.label_smoothing", "must be in [0, 1)");
        }
        self.loss.class_weights.validate()?;
        if !(0.0..=10.0).contains(&self.loss.logit_adjustment) {
            return bad("loss.logit_adjustment", "tau must be in [0, 10]");
        }
        self.augment.validate()?;
        self.finetune.validate(self.epochs)?;
        self.eval.validate()?;
        if self.schedule.warmup_epochs < 0.0 {
            return bad("schedule.warmup_epochs", "must be >= 0");
        }
        if self.loss.mixup_alpha < 0.0 || self.loss.cutmix_alpha < 0.0 {
            return bad("loss.mixup_alpha", "alphas must be >= 0");
        }
        if !(0.0..=1.0).contains(&self.distill.alpha) || self.distill.temperature <= 0.0 {
            return bad(
                "distill.alpha",
                "alpha must be in [0, 1] and temperature > 0",
            );
        }
        if !(0.0..1.0).contains(&self.regularisation.ema_decay) {
            return bad("regularisation.ema_decay", "must be in [0, 1)");
        }
        if self.regularisation.grad_clip_norm < 0.0 {
            return bad("regularisation.grad_clip_norm", "must be >= 0");
        }
        if !(self.schedule.gamma > 0.0 && self.schedule.gamma <= 1.0) {
            return bad("schedule.gamma", "must be in (0, 1]");
        }
        self.model.validate_options()
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::Invalid(format!("recipe: {e}")))
    }
}

/// How a recipe lives in a run folder (`recipe.toml`): here, so the run folder (`crate::run`)
/// knows nothing of recipes and sits below them.
pub trait RunRecipe {
    /// Writes `recipe` atomically as the run's `recipe.toml`.
    fn write_recipe(&self, recipe: &Recipe) -> Result<()>;
    /// The run's recipe, resolved (relative data paths against the file).
    fn read_recipe(&self) -> Result<Recipe>;
}

impl RunRecipe for crate::run::RunDir {
    fn write_recipe(&self, recipe: &Recipe) -> Result<()> {
        let text = recipe.to_toml()?;
        crate::helpers::write_atomic(&self.file(crate::run::RECIPE), text.as_bytes())
    }

    fn read_recipe(&self) -> Result<Recipe> {
        Recipe::load_resolved(&self.file(crate::run::RECIPE))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layering_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("r.toml");
        std::fs::write(&f, "epochs = 3\n[optim]\nlr = 0.05\n").unwrap();
        let r = Recipe::resolve(
            Some(&f),
            &[
                Override::parse("optim.lr=0.01").unwrap(),
                Override::parse("model.name=bench-vgg").unwrap(),
            ],
        )
        .unwrap();
        assert_eq!(r.epochs, 3);
        assert_eq!(r.optim.lr, 0.01);
        assert_eq!(r.model.name.as_str(), "bench-vgg");
        let text = r.to_toml().unwrap();
        std::fs::write(&f, text).unwrap();
        assert_eq!(Recipe::load_resolved(&f).unwrap(), r);
    }

    #[test]
    fn shipped_default_recipe_is_the_built_in_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/default.toml");
        assert_eq!(
            Recipe::resolve(Some(&path), &[]).unwrap(),
            Recipe::default()
        );
    }

    #[test]
    fn unknown_key_names_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, "[optim]\nlrr = 0.1\n").unwrap();
        let e = Recipe::resolve(Some(&f), &[]).unwrap_err().to_string();
        assert!(e.contains("`optim.lrr`") && e.contains("bad.toml"), "{e}");
    }

    #[test]
    fn wrong_type_from_set_names_key_and_origin() {
        let e = Recipe::resolve(None, &[Override::parse("epochs=\"many\"").unwrap()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("epochs") && e.contains("--set"), "{e}");
        let e = Recipe::resolve(None, &[Override::parse("model.name=resnet9000").unwrap()])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("model.name") && e.contains("convnet_small"),
            "{e}"
        );
        // One line: the key is named once, not again by toml's "in `model.name`" line.
        assert!(!e.contains('\n'), "{e}");
    }
}
