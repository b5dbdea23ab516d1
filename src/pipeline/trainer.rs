//! The training loop, top to bottom: open the data, resolve what the recipe left open, build
//! the model, then for every epoch: train over shuffled augmented batches with a per-step
//! learning rate, evaluate on the held-out split, append the metrics, save checkpoints.

use std::sync::Arc;
use std::time::Instant;

use burn::prelude::*;

use super::distill::Teacher;
use super::state::{Progress, apply_init_from, apply_pretrained, restore, save_checkpoint};
use super::step::{Distill, StepConfig, train_step};
use crate::data::norm::{self, NormStats};
use crate::data::split::mix_seed;
use crate::data::transforms::{Mode, View};
use crate::data::{Cached, Dataset, Loader, LoaderConfig, Splits, Transform, open};
use crate::error::{Error, Result};
use crate::eval::{evaluate, metrics::argmax};
use crate::kernels;
use crate::models::Model;
use crate::recipe::RunRecipe;
use crate::recipe::ScheduleKind;
use crate::recipe::{Normalize, Recipe};
use crate::run::{CLASSES, EpochMetrics, RunDir, STATS, SUMMARY, Summary};
use crate::train::checkpoint;
use crate::train::ema::Ema;
use crate::train::loss::smoothed_targets;
use crate::train::mix::{self, MixSettings};
use crate::train::optim::Optimizer;
use crate::train::schedule::lr_at;

/// Where training reports progress; the CLI draws bars, tests stay quiet.
pub trait Reporter {
    fn message(&mut self, text: &str);
    fn epoch_start(&mut self, epoch: usize, epochs: usize, batches: usize);
    fn batch(&mut self, done: usize, loss: f32, images_per_sec: f64);
    fn epoch_end(&mut self, metrics: &EpochMetrics);
}

/// A reporter that prints nothing.
pub struct Quiet;
impl Reporter for Quiet {
    fn message(&mut self, _: &str) {}
    fn epoch_start(&mut self, _: usize, _: usize, _: usize) {}
    fn batch(&mut self, _: usize, _: f32, _: f64) {}
    fn epoch_end(&mut self, _: &EpochMetrics) {}
}

/// How to run (not what to learn: that is the recipe).
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Continue the run in the folder from its last complete checkpoint.
    pub resume: bool,
    /// End cleanly after this epoch (the schedule still spans all epochs).
    pub stop_after_epoch: Option<usize>,
}

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
        },
    )
}

/// Loads a run's model from a checkpoint (`best`, `last` or `epoch-N`) onto `device`: its
/// averaged (EMA) weights when the run kept them, else its weights.
pub fn load_model(run: &RunDir, recipe: &Recipe, which: &str, device: &Device) -> Result<Model> {
    let path = run.checkpoint(which);
    let ck = checkpoint::load(&path)?;
    let model = recipe.model.build(device)?;
    let ema = ck.group("ema");
    let group = if ema.is_empty() {
        ck.group("model")
    } else {
        ema
    };
    checkpoint::load_module(model, &group, &path, recipe.model.name.as_str())
}

/// Trains `recipe` into the run folder `run` on `device` (an autodiff device).
pub fn train(
    mut recipe: Recipe,
    run: &RunDir,
    opts: &TrainOptions,
    device: &Device,
    rep: &mut dyn Reporter,
) -> Result<Summary> {
    // One writer per folder: a caller that has not locked the folder gets it locked here.
    let run = &run.clone().lock()?;
    let ck_dir = run.path.join(crate::run::CHECKPOINTS);
    std::fs::create_dir_all(&ck_dir).map_err(|e| Error::io(&ck_dir, e))?;
    let splits = prepare(&mut recipe)?;
    for w in &splits.warnings {
        rep.message(&format!("warning: {w}"));
    }
    // A run killed before its first checkpoint has nothing to resume from: it starts over.
    let resume = opts.resume && run.checkpoint("last").is_file();
    if opts.resume && !resume {
        rep.message(&format!(
            "{} has no complete epoch (no {}): starting it from epoch 1",
            run.path.display(),
            run.checkpoint("last").display()
        ));
    }
    // On resume recipe.toml keeps the run's own recipe: overrides given with --resume apply to
    // this invocation only, so a later plain --resume does not repeat them unseen.
    if !resume || !run.file(crate::run::RECIPE).is_file() {
        run.write_recipe(&recipe)?;
    }
    if !resume || !run.file(CLASSES).is_file() {
        run.write_json(CLASSES, &splits.classes)?;
    }
    if !resume || !run.file(STATS).is_file() {
        run.write_json(STATS, &norm_stats(&recipe))?;
    }
    let eval_device = device.clone().without_autodiff();

    device.seed(mix_seed(&[recipe.seed, 0xC0FFEE]));
    let mut model = recipe.model.build(device)?;
    let mut sgd = Optimizer::new(recipe.optim.clone());
    let reg = recipe.regularisation.clone();
    let mut ema = (reg.ema_decay > 0.0).then(|| Ema::new(reg.ema_decay));
    let mut p = Progress::default();
    let mut history = Vec::new();
    if !resume {
        model = apply_pretrained(&recipe, model, device, rep)?;
        model = apply_init_from(&recipe, model, rep)?;
    }
    let ft = recipe.finetune.clone();
    let head = if ft.active() {
        let head = crate::train::finetune::classifier_keys(&model, device);
        if ft.backbone_lr_mult != 1.0 {
            sgd = sgd.with_backbone_lr(ft.backbone_lr_mult, head.clone());
        }
        head
    } else {
        Default::default()
    };
    let teacher = match &recipe.distill.teacher {
        Some(dir) => {
            let t = Teacher::load(dir, recipe.model.num_classes, &eval_device)?;
            rep.message(&format!(
                "distilling from {} ({}), T = {}, alpha = {}",
                dir.display(),
                t.recipe.model.name,
                recipe.distill.temperature,
                recipe.distill.alpha
            ));
            Some(t)
        }
        None => None,
    };
    let mix_settings = MixSettings {
        mixup_alpha: recipe.loss.mixup_alpha,
        cutmix_alpha: recipe.loss.cutmix_alpha,
        prob: recipe.loss.mix_prob,
    };
    let (mean, std) = (
        recipe.data.mean.clone().unwrap_or_default(),
        recipe.data.std.clone().unwrap_or_default(),
    );
    if resume {
        (model, p, history) = restore(run, &recipe, model, &mut sgd, ema.as_mut(), &eval_device)?;
        rep.message(&format!(
            "resuming {} after epoch {}",
            run.path.display(),
            p.epochs_done
        ));
    }

    let train_loader = loader(&recipe, splits.train.clone(), true)?;
    let val_loader = loader(&recipe, splits.val.clone(), false)?;
    let per_epoch = train_loader.num_batches();
    let total_steps = per_epoch * recipe.epochs;
    let peak = recipe.optim.scaled_lr(recipe.batch_size);
    let k = recipe.model.num_classes;
    let params = crate::models::param_count(&model);
    rep.message(&format!(
        "{}: {params} parameters, input {}x{}x{}; {} train / {} {} images, {} classes; \
         lr {} x {}/{} = {peak}",
        recipe.model.name,
        recipe.model.in_channels,
        recipe.model.input_size,
        recipe.model.input_size,
        splits.train.len(),
        splits.val.len(),
        splits.val_name,
        k,
        recipe.optim.lr,
        recipe.batch_size,
        recipe.optim.base_batch_size,
    ));

    let precision = match kernels::supported_precision(recipe.precision, device) {
        Ok(p) => p,
        Err(why) => {
            rep.message(&format!("precision = \"{}\": {why}", recipe.precision));
            kernels::Precision::Fp32
        }
    };
    if precision != kernels::Precision::Fp32 {
        rep.message(&format!(
            "convolutions in {precision}, weights and optimiser in fp32"
        ));
    }

    let step_cfg = StepConfig {
        precision,
        aux_weight: recipe.loss.aux_weight,
        grad_clip_norm: reg.grad_clip_norm,
        distill: teacher.as_ref().map(|t| Distill {
            teacher: t,
            alpha: recipe.distill.alpha,
            temperature: recipe.distill.temperature,
            mean: &mean,
            std: &std,
        }),
    };
    let last_epoch = opts
        .stop_after_epoch
        .unwrap_or(recipe.epochs)
        .min(recipe.epochs);
    for epoch in p.epochs_done + 1..=last_epoch {
        let start = Instant::now();
        let skipped_before = p.skipped;
        // Dropout masks come from the device generator; reseeding per epoch makes a resumed
        // run draw exactly what an uninterrupted one would.
        device.seed(mix_seed(&[recipe.seed, epoch as u64, 0xD0]));
        model = model.train();
        if ft.freeze != crate::train::finetune::Freeze::None {
            // Derived from the epoch alone, so a resumed run freezes exactly as this one did.
            let frozen = ft.frozen_at(epoch);
            if epoch == p.epochs_done + 1 || frozen != ft.frozen_at(epoch - 1) {
                rep.message(&if frozen {
                    format!(
                        "epoch {epoch}: backbone frozen (batch norm on running statistics), \
                         training {}",
                        head.iter().cloned().collect::<Vec<_>>().join(", ")
                    )
                } else {
                    format!("epoch {epoch}: every layer trains")
                });
            }
            model = crate::train::finetune::set_backbone_frozen(model, &head, frozen);
        }
        rep.epoch_start(epoch, recipe.epochs, per_epoch);
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        let mut lr = peak;
        for (i, batch) in train_loader.epoch(epoch - 1).enumerate() {
            let mut batch = batch?;
            p.skipped += batch.skipped.len();
            for (src, why) in &batch.skipped {
                rep.message(&format!("skipped {src}: {why}"));
            }
            if batch.is_empty() {
                continue;
            }
            let step = (epoch - 1) * per_epoch + i;
            lr = lr_at(
                &recipe.schedule,
                peak,
                step,
                total_steps,
                per_epoch,
                p.plateau.scale,
            );
            let b = batch.len();
            let [c, side, _] = batch.sample_shape;
            let mut images = std::mem::take(&mut batch.images);
            let mut q = smoothed_targets(&batch.labels, k, recipe.loss.label_smoothing);
            if epoch + recipe.loss.mix_off_epochs <= recipe.epochs {
                let m = mix::draw(
                    &mix_settings,
                    mix_seed(&[recipe.seed, step as u64, 0x313]),
                    side,
                );
                mix::apply(m, &mut images, &mut q, b, c, side, k);
            }
            let x = Tensor::<4>::from_data(TensorData::new(images, [b, c, side, side]), device);
            let targets = Tensor::<2>::from_data(TensorData::new(q, [b, k]), device);
            let out = train_step(model, &mut sgd, x, targets, lr, &step_cfg);
            let (loss, logits) = (out.loss, out.logits);
            model = out.model;
            if let Some(e) = ema.as_mut() {
                e.update(&model.valid());
            }
            let loss_v = loss.into_scalar::<f32>();
            if !loss_v.is_finite() {
                return Err(Error::Diverged {
                    epoch,
                    step,
                    loss: loss_v,
                    kept: (p.epochs_done > 0).then(|| run.checkpoint("last")),
                });
            }
            let host: Vec<f32> = logits
                .inner()
                .into_data()
                .convert::<f32>()
                .try_to_vec()
                .expect("f32");
            correct += host
                .chunks_exact(k)
                .zip(&batch.labels)
                .filter(|(row, l)| argmax(row) == **l)
                .count();
            loss_sum += loss_v as f64 * b as f64;
            seen += b;
            rep.batch(i + 1, loss_v, seen as f64 / start.elapsed().as_secs_f64());
        }
        let train_secs = start.elapsed().as_secs_f64();
        let eval_model = match &ema {
            Some(e) => e.apply(model.valid()),
            None => model.valid(),
        };
        let (report, skipped) = kernels::with_precision(precision, || {
            evaluate(&eval_model, &val_loader, &splits.classes, &eval_device)
        })?;
        p.skipped += skipped.len();
        for (src, why) in &skipped {
            rep.message(&format!("skipped {src}: {why}"));
        }
        let seconds = start.elapsed().as_secs_f64();
        let m = EpochMetrics {
            epoch,
            train_loss: loss_sum / seen.max(1) as f64,
            train_top1: correct as f64 / seen.max(1) as f64,
            val_loss: report.loss,
            val_top1: report.top1,
            val_top5: report.top5,
            lr,
            images_per_sec: seen as f64 / train_secs.max(1e-9),
            seconds,
            peak_rss_mb: crate::run::peak_rss_mb(),
            images_skipped: p.skipped - skipped_before,
        };
        p.epochs_done = epoch;
        p.seconds += seconds;
        if recipe.schedule.kind == ScheduleKind::Plateau
            && p.plateau.observe(&recipe.schedule, m.val_loss, m.val_top1)
        {
            rep.message(&format!(
                "no improvement for {} epochs: learning rate x {} (now {})",
                recipe.schedule.patience + 1,
                recipe.schedule.gamma,
                (peak * p.plateau.scale).max(recipe.schedule.min_lr)
            ));
        }
        let improved = m.val_top1 > p.best_top1;
        if improved {
            p.best_top1 = m.val_top1;
            p.best_epoch = epoch;
        }
        history.push(m.clone());
        run.write_metrics(&history)?;
        if improved {
            save_checkpoint(run, "best", &model, &sgd, ema.as_ref(), &p)?;
        }
        if recipe.checkpoint_every > 0 && epoch % recipe.checkpoint_every == 0 {
            save_checkpoint(
                run,
                &format!("epoch-{epoch}"),
                &model,
                &sgd,
                ema.as_ref(),
                &p,
            )?;
        }
        save_checkpoint(run, "last", &model, &sgd, ema.as_ref(), &p)?;
        rep.epoch_end(&m);
    }

    let last = history
        .last()
        .cloned()
        .ok_or_else(|| Error::Invalid("no epoch was run".into()))?;
    let summary = Summary {
        model: recipe.model.name.to_string(),
        params,
        epochs: p.epochs_done,
        best_val_top1: p.best_top1,
        best_epoch: p.best_epoch,
        final_val_top1: last.val_top1,
        final_val_top5: last.val_top5,
        final_val_loss: last.val_loss,
        seconds: p.seconds,
        images_skipped: p.skipped,
        imported_from: None,
    };
    if p.epochs_done == recipe.epochs {
        run.write_json(SUMMARY, &summary)?;
    }
    Ok(summary)
}
