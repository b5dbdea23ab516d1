//! The training loop, top to bottom (as an algorithm box):
//!
//! ```text
//! open the data; fill in what the recipe left to it            (factory::prepare)
//! build the model; load pretrained / init_from weights, or resume the last checkpoint
//! for epoch e = 1..E:
//!     reseed dropout for e; freeze or unfreeze the backbone     (finetune)
//!     for each shuffled (or class-balanced), augmented batch (x, y):   (train_epoch)
//!         lr = schedule(step);  q = smooth(y), mix(x, q), weight(q by class)
//!         model = train_step(model, x, q, lr)                    (step.rs: loss, backward, update, EMA)
//!     evaluate; plateau; best; checkpoints; metrics              (end_epoch)
//! ```

use std::time::Instant;

use burn::prelude::*;

use super::distill::Teacher;
use super::factory::{loader, norm_stats, prepare};
use super::state::{self, Progress, apply_init_from, apply_pretrained, restore, save_checkpoint};
use super::step::{Distill, StepConfig, optimizer_for, train_step};
use crate::data::{Loader, Splits};
use crate::error::{Error, Result};
use crate::eval::evaluate;
use crate::helpers::Stream;
use crate::kernels;
use crate::models::Model;
use crate::recipe::ScheduleKind;
use crate::recipe::{Recipe, RunRecipe};
use crate::run::{CLASSES, EpochMetrics, RunDir, STATS, SUMMARY, Summary};
use crate::train::ema::Ema;
use crate::train::finetune::{FinetuneConfig, Freeze};
use crate::train::loss::{logit_adjustment, smoothed_targets, weight_targets};
use crate::train::mix::{self, MixSettings};
use crate::train::optim::Optimizer;
use crate::train::schedule::{ValMetric, ValScores, lr_at};

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
    let (splits, resume) = open_run(&mut recipe, run, opts, rep)?;
    let eval_device = device.clone().without_autodiff();
    let (model, mut st) = start(&recipe, run, resume, device, &eval_device, rep)?;
    // The precision travels with the models: the step, EMA's copy, validation and the teacher
    // all compute in it.
    let precision = precision_for(&recipe, device, rep);
    let mut model = model.with_precision(precision);
    let teacher = match &recipe.distill.teacher {
        Some(dir) => Some(load_teacher(dir, &recipe, &eval_device, rep)?.with_precision(precision)),
        None => None,
    };
    let (mean, std) = (
        recipe.data.mean.clone().unwrap_or_default(),
        recipe.data.std.clone().unwrap_or_default(),
    );
    let distill = teacher.as_ref().map(|t| Distill {
        teacher: t,
        alpha: recipe.distill.alpha,
        temperature: recipe.distill.temperature,
        mean: &mean,
        std: &std,
    });
    let mut step_cfg = StepConfig::from_recipe(&recipe, distill);
    let loaders = [
        loader(&recipe, splits.train.clone(), true)?,
        loader(&recipe, splits.val.clone(), false)?,
    ];
    let params = crate::models::param_count(&model);
    describe(&recipe, &splits, params, rep);
    let imbalance = imbalance(&recipe, &splits, rep)?;
    step_cfg.logit_adjust = imbalance.logit_adjust;

    let last_epoch = opts
        .stop_after_epoch
        .unwrap_or(recipe.epochs)
        .min(recipe.epochs);
    // Before the first epoch, not after it: a disk that cannot take one checkpoint would lose
    // the epoch at its save.
    match state::room(
        crate::helpers::free_bytes(&run.path),
        state::checkpoint_bytes(&recipe, &model),
        state::kept_epochs(recipe.checkpoint_every, st.p.epochs_done, last_epoch),
        |bytes| crate::helpers::allocation_refused(&run.path, bytes),
    ) {
        state::Room::Enough => {}
        state::Room::Tight(why) => rep.message(&format!("warning: {why}")),
        state::Room::Short(why) => {
            let err = std::io::Error::new(std::io::ErrorKind::StorageFull, why);
            return Err(Error::io(&run.path, err));
        }
    }
    for epoch in st.p.epochs_done + 1..=last_epoch {
        let start = Instant::now();
        // Dropout masks come from the device generator; reseeding per epoch makes a resumed
        // run draw exactly what an uninterrupted one would.
        device.seed(Stream::Dropout { epoch }.seed(recipe.seed));
        model = freeze_for(&recipe.finetune, model.train(), &st, epoch, rep);
        let tally;
        (model, tally) = train_epoch(
            &recipe,
            &mut st,
            model,
            &loaders[0],
            &step_cfg,
            imbalance.class_weights.as_deref(),
            epoch,
            device,
            run,
            rep,
        )?;
        let m = end_epoch(
            &recipe,
            &mut st,
            &model,
            &loaders[1],
            &splits,
            tally,
            start,
            &eval_device,
            run,
            rep,
        )?;
        rep.epoch_end(&m);
    }
    finish(&recipe, run, &st, params)
}

/// Everything the loop changes besides the model, saved with it in every checkpoint.
struct State {
    opt: Optimizer,
    ema: Option<Ema>,
    p: Progress,
    history: Vec<EpochMetrics>,
    /// The classifier's parameter paths (fine-tuning: frozen backbone, backbone lr).
    head: std::collections::BTreeSet<String>,
}

/// What one epoch of training measured. Correct predictions are counted on the device and
/// read once, at the end of the epoch.
struct Tally {
    loss_sum: f64,
    correct: Option<Tensor<1, Int>>,
    seen: usize,
    lr: f64,
    skipped_before: usize,
    seconds: f64,
}

/// Opens the data, fills in the recipe, and writes the run's recipe, classes and statistics
/// (on resume the run's own are kept). Returns the splits and whether this is a resume.
fn open_run(
    recipe: &mut Recipe,
    run: &RunDir,
    opts: &TrainOptions,
    rep: &mut dyn Reporter,
) -> Result<(Splits, bool)> {
    let ck_dir = run.path.join(crate::run::CHECKPOINTS);
    std::fs::create_dir_all(&ck_dir).map_err(|e| Error::io(&ck_dir, e))?;
    let splits = prepare(recipe)?;
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
        run.write_recipe(recipe)?;
    }
    if !resume || !run.file(CLASSES).is_file() {
        run.write_json(CLASSES, &splits.classes)?;
    }
    if !resume || !run.file(STATS).is_file() {
        run.write_json(STATS, &norm_stats(recipe))?;
    }
    Ok((splits, resume))
}

/// The model, optimiser and EMA at the start: fresh (with pretrained or `init_from` weights),
/// or restored from the last checkpoint.
fn start(
    recipe: &Recipe,
    run: &RunDir,
    resume: bool,
    device: &Device,
    eval_device: &Device,
    rep: &mut dyn Reporter,
) -> Result<(Model, State)> {
    device.seed(Stream::ModelInit.seed(recipe.seed));
    let mut model = recipe.model.build(device)?;
    if !resume {
        model = apply_pretrained(recipe, model, device, rep)?;
        model = apply_init_from(recipe, model, rep)?;
    }
    let (mut opt, mut ema, head) = optimizer_for(recipe, &model, device);
    let (mut p, mut history) = (Progress::default(), Vec::new());
    if resume {
        (model, p, history) = restore(run, recipe, model, &mut opt, ema.as_mut(), eval_device)?;
        rep.message(&format!(
            "resuming {} after epoch {}",
            run.path.display(),
            p.epochs_done
        ));
    }
    Ok((
        model,
        State {
            opt,
            ema,
            p,
            history,
            head,
        },
    ))
}

fn load_teacher(
    dir: &std::path::Path,
    recipe: &Recipe,
    eval_device: &Device,
    rep: &mut dyn Reporter,
) -> Result<Teacher> {
    let t = Teacher::load(dir, recipe.model.num_classes, eval_device)?;
    rep.message(&format!(
        "distilling from {} ({}), T = {}, alpha = {}",
        dir.display(),
        t.recipe.model.name,
        recipe.distill.temperature,
        recipe.distill.alpha
    ));
    Ok(t)
}

/// The precision that can run for the recipe's `precision` on `device` (fp32, saying why,
/// where bf16 cannot).
fn precision_for(recipe: &Recipe, device: &Device, rep: &mut dyn Reporter) -> kernels::Precision {
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
    precision
}

fn describe(recipe: &Recipe, splits: &Splits, params: usize, rep: &mut dyn Reporter) {
    rep.message(&format!(
        "{}: {params} parameters, input {}x{}x{}; {} train / {} {} images, {} classes; \
         lr {} x {}/{} = {}",
        recipe.model.name,
        recipe.model.in_channels,
        recipe.model.input_size,
        recipe.model.input_size,
        splits.train.len(),
        splits.val.len(),
        splits.val_name,
        recipe.model.num_classes,
        recipe.optim.lr,
        recipe.batch_size,
        recipe.optim.base_batch_size,
        recipe.optim.scaled_lr(recipe.batch_size),
    ));
    if recipe.grad_accum_steps > 1 {
        let slices = super::step::micro_batches(recipe.batch_size, recipe.grad_accum_steps);
        rep.message(&format!(
            "gradient accumulation: each batch of {} in {} passes of up to {} images, one \
             optimiser step",
            recipe.batch_size,
            slices.len(),
            slices[0].len(),
        ));
    }
}

/// What the recipe does about classes of unequal frequency, from the training split's counts.
struct Imbalance {
    /// Each class's weight in the loss (`loss.class_weights`).
    class_weights: Option<Vec<f32>>,
    /// Logit adjustment's per-class offsets (`loss.logit_adjustment`).
    logit_adjust: Option<Vec<f32>>,
}

/// Resolves the class weights and logit adjustment and says which of the three imbalance
/// options are on; with none on, a note when the classes are far from equally frequent.
fn imbalance(recipe: &Recipe, splits: &Splits, rep: &mut dyn Reporter) -> Result<Imbalance> {
    let counts = class_counts(splits);
    let name = |c: usize| splits.classes[c].as_str();
    let class_weights = recipe.loss.class_weights.resolve(&counts)?;
    if let Some(w) = &class_weights {
        rep.message(&if w.len() <= 20 {
            let list: Vec<String> = (0..w.len())
                .map(|c| format!("{} {:.3}", name(c), w[c]))
                .collect();
            format!("class weights in the loss: {}", list.join(", "))
        } else {
            let lo = w
                .iter()
                .copied()
                .filter(|&v| v > 0.0)
                .fold(f32::INFINITY, f32::min);
            let hi = w.iter().copied().fold(0.0, f32::max);
            format!(
                "class weights in the loss: {lo:.3} to {hi:.3} over {} classes",
                w.len()
            )
        });
    }
    let sampling = recipe.data.sampler == crate::data::Sampler::Balanced;
    if sampling {
        rep.message(&format!(
            "class-balanced sampling: {} draws an epoch, each class equally likely",
            splits.train.len()
        ));
    }
    let tau = recipe.loss.logit_adjustment;
    let logit_adjust = (tau > 0.0).then(|| logit_adjustment(&counts, tau));
    if logit_adjust.is_some() {
        rep.message(&format!(
            "logit adjustment: the loss sees logits + {tau} * log(class prior)"
        ));
    }
    let most = (0..counts.len()).max_by_key(|&c| counts[c]);
    let least = (0..counts.len()).min_by_key(|&c| counts[c]);
    let any_on = class_weights.is_some() || sampling || logit_adjust.is_some();
    if let (Some(most), Some(least), false) = (most, least, any_on) {
        // The ratio at which "long-tailed" benchmarks start (CIFAR-10-LT's mildest is 10).
        if counts[most] >= IMBALANCE_NOTE * counts[least].max(1) {
            rep.message(&format!(
                "note: the classes are imbalanced ({} has {} training images, {} has {}); \
                 `--set data.sampler=\"balanced\"`, `--set loss.class_weights=\"balanced\"` \
                 or `--set loss.logit_adjustment=1` counter it, and eval's balanced top-1 \
                 measures it",
                name(most),
                counts[most],
                name(least),
                counts[least]
            ));
        }
    }
    Ok(Imbalance {
        class_weights,
        logit_adjust,
    })
}

/// Training images per class.
fn class_counts(splits: &Splits) -> Vec<usize> {
    let mut counts = vec![0usize; splits.classes.len()];
    for l in crate::data::dataset::labels_of(splits.train.as_ref()) {
        counts[l] += 1;
    }
    counts
}

/// How many times more images the largest class must have than the smallest for the trainer
/// to point at the imbalance options.
const IMBALANCE_NOTE: usize = 10;

/// The model with its backbone frozen or not for `epoch` (a function of the epoch alone, so a
/// resumed run freezes exactly as an uninterrupted one), saying so when it changes.
fn freeze_for(
    ft: &FinetuneConfig,
    model: Model,
    st: &State,
    epoch: usize,
    rep: &mut dyn Reporter,
) -> Model {
    if ft.freeze == Freeze::None {
        return model;
    }
    let frozen = ft.frozen_at(epoch);
    if epoch == st.p.epochs_done + 1 || frozen != ft.frozen_at(epoch - 1) {
        rep.message(&if frozen {
            format!(
                "epoch {epoch}: backbone frozen (batch norm on running statistics), training {}",
                st.head.iter().cloned().collect::<Vec<_>>().join(", ")
            )
        } else {
            format!("epoch {epoch}: every layer trains")
        });
    }
    crate::train::finetune::set_backbone_frozen(model, &st.head, frozen)
}

/// One pass over the shuffled, augmented training batches; returns the trained model.
#[allow(clippy::too_many_arguments)]
fn train_epoch(
    recipe: &Recipe,
    st: &mut State,
    mut model: Model,
    loader: &Loader,
    step_cfg: &StepConfig,
    class_weights: Option<&[f32]>,
    epoch: usize,
    device: &Device,
    run: &RunDir,
    rep: &mut dyn Reporter,
) -> Result<(Model, Tally)> {
    let start = Instant::now();
    let per_epoch = loader.num_batches();
    let total_steps = per_epoch * recipe.epochs;
    let peak = recipe.optim.scaled_lr(recipe.batch_size);
    let k = recipe.model.num_classes;
    let mix_settings = MixSettings {
        mixup_alpha: recipe.loss.mixup_alpha,
        cutmix_alpha: recipe.loss.cutmix_alpha,
        prob: recipe.loss.mix_prob,
    };
    let mixing = epoch + recipe.loss.mix_off_epochs <= recipe.epochs;
    let mut t = Tally {
        loss_sum: 0.0,
        correct: None,
        seen: 0,
        lr: peak,
        skipped_before: st.p.skipped,
        seconds: 0.0,
    };
    rep.epoch_start(epoch, recipe.epochs, per_epoch);
    for (i, batch) in loader.epoch(epoch - 1).enumerate() {
        let mut batch = batch?;
        st.p.skipped += batch.skipped.len();
        for (src, why) in &batch.skipped {
            rep.message(&format!("skipped {src}: {why}"));
        }
        if batch.is_empty() {
            continue;
        }
        let step = (epoch - 1) * per_epoch + i;
        let s = &recipe.schedule;
        t.lr = lr_at(s, peak, step, total_steps, per_epoch, st.p.plateau.scale);
        let b = batch.len();
        let [c, side, _] = batch.sample_shape;
        let mut images = std::mem::take(&mut batch.images);
        let mut q = smoothed_targets(&batch.labels, k, recipe.loss.label_smoothing);
        if mixing {
            let m = mix::draw(&mix_settings, Stream::Mix { step }.seed(recipe.seed), side);
            mix::apply(m, &mut images, &mut q, b, c, side, k);
        }
        if let Some(w) = class_weights {
            weight_targets(&mut q, k, w);
        }
        let x = Tensor::<4>::from_data(TensorData::new(images, [b, c, side, side]), device);
        let targets = Tensor::<2>::from_data(TensorData::new(q, [b, k]), device);
        let out = train_step(
            model,
            &mut st.opt,
            st.ema.as_mut(),
            x,
            targets,
            t.lr,
            step_cfg,
        );
        model = out.model;
        let loss = out.loss.into_scalar::<f32>();
        if !loss.is_finite() {
            return Err(Error::Diverged {
                epoch,
                step,
                loss,
                kept: (st.p.epochs_done > 0).then(|| run.checkpoint("last")),
            });
        }
        let hits = correct(out.logits.inner(), &batch.labels);
        t.correct = Some(match t.correct.take() {
            Some(c) => c + hits,
            None => hits,
        });
        t.loss_sum += loss as f64 * b as f64;
        t.seen += b;
        rep.batch(i + 1, loss, t.seen as f64 / start.elapsed().as_secs_f64());
    }
    t.seconds = start.elapsed().as_secs_f64();
    Ok((model, t))
}

/// How many rows of `logits` `[B, K]` have their largest value at the label, as a one-element
/// tensor on the logits' device (no copy to the host).
fn correct(logits: Tensor<2>, labels: &[usize]) -> Tensor<1, Int> {
    let b = labels.len();
    let device = logits.device();
    let labels: Vec<i64> = labels.iter().map(|&l| l as i64).collect();
    let labels = Tensor::<1, Int>::from_data(TensorData::new(labels, [b]), &device);
    logits.argmax(1).reshape([b]).equal(labels).int().sum()
}

/// After an epoch's training: evaluate, record the metrics, step the plateau schedule, keep
/// the best checkpoint and write the others.
#[allow(clippy::too_many_arguments)]
fn end_epoch(
    recipe: &Recipe,
    st: &mut State,
    model: &Model,
    val_loader: &Loader,
    splits: &Splits,
    t: Tally,
    start: Instant,
    eval_device: &Device,
    run: &RunDir,
    rep: &mut dyn Reporter,
) -> Result<EpochMetrics> {
    let epoch = st.p.epochs_done + 1;
    let eval_model = match &st.ema {
        Some(e) => e.apply(model.valid()),
        None => model.valid(),
    };
    let (report, skipped) = evaluate(&eval_model, val_loader, &splits.classes, eval_device)?;
    st.p.skipped += skipped.len();
    for (src, why) in &skipped {
        rep.message(&format!("skipped {src}: {why}"));
    }
    let correct = t.correct.map_or(0, |c| c.into_scalar::<i64>()) as f64;
    let seconds = start.elapsed().as_secs_f64();
    let m = EpochMetrics {
        epoch,
        train_loss: t.loss_sum / t.seen.max(1) as f64,
        train_top1: correct / t.seen.max(1) as f64,
        val_loss: report.loss,
        val_top1: report.top1,
        val_top5: report.top5,
        val_balanced_top1: report.balanced_top1,
        val_macro_f1: report.macro_f1,
        lr: t.lr,
        images_per_sec: t.seen as f64 / t.seconds.max(1e-9),
        seconds,
        peak_rss_mb: crate::run::peak_rss_mb(),
        images_skipped: st.p.skipped - t.skipped_before,
    };
    let p = &mut st.p;
    p.epochs_done = epoch;
    p.seconds += seconds;
    let s = &recipe.schedule;
    let scores = val_scores(&m);
    if s.kind == ScheduleKind::Plateau && p.plateau.observe(s, &scores) {
        let peak = recipe.optim.scaled_lr(recipe.batch_size);
        rep.message(&format!(
            "no improvement for {} epochs: learning rate x {} (now {})",
            s.patience + 1,
            s.gamma,
            (peak * p.plateau.scale).max(s.min_lr)
        ));
    }
    let improved = improves(recipe.best_metric, &st.history, p.best_epoch, &m);
    if improved {
        p.best_top1 = m.val_top1;
        p.best_epoch = epoch;
    }
    st.history.push(m.clone());
    run.write_metrics(&st.history)?;
    // The epoch's checkpoints hold the same state: the first is written, the others are links
    // to it (a VGG's checkpoint with its momentum is 1 GB). `last` comes last, so a run
    // killed in between resumes from the previous epoch and writes them all again.
    let mut written: Option<std::path::PathBuf> = None;
    let mut keep = |which: &str| -> Result<()> {
        let path = run.checkpoint(which);
        match &written {
            Some(first) => crate::helpers::link_atomic(first, &path),
            None => {
                save_checkpoint(run, which, model, &st.opt, st.ema.as_ref(), &st.p)?;
                written = Some(path);
                Ok(())
            }
        }
    };
    if improved {
        keep("best")?;
    }
    if recipe.checkpoint_every > 0 && epoch.is_multiple_of(recipe.checkpoint_every) {
        keep(&format!("epoch-{epoch}"))?;
    }
    keep("last")?;
    Ok(m)
}

/// Whether epoch `m` beats the best epoch so far by `metric` (`best_epoch` 0: none yet; its
/// scores are in `history`, resumed or not). Ties keep the earlier epoch.
fn improves(
    metric: ValMetric,
    history: &[EpochMetrics],
    best_epoch: usize,
    m: &EpochMetrics,
) -> bool {
    let best = best_epoch
        .checked_sub(1)
        .and_then(|i| history.get(i))
        .map(|b| metric.score(&val_scores(b)));
    best.is_none_or(|b| metric.score(&val_scores(m)) > b)
}

fn val_scores(m: &EpochMetrics) -> ValScores {
    ValScores {
        loss: m.val_loss,
        top1: m.val_top1,
        balanced_top1: m.val_balanced_top1,
        macro_f1: m.val_macro_f1,
    }
}

/// The run's summary (written when every epoch has run).
fn finish(recipe: &Recipe, run: &RunDir, st: &State, params: usize) -> Result<Summary> {
    let last = st
        .history
        .last()
        .cloned()
        .ok_or_else(|| Error::Invalid("no epoch was run".into()))?;
    let p = &st.p;
    let summary = Summary {
        model: recipe.model.name.to_string(),
        params,
        epochs: p.epochs_done,
        best_val_top1: p.best_top1,
        best_epoch: p.best_epoch,
        best_metric: recipe.best_metric.as_str().into(),
        final_val_top1: last.val_top1,
        final_val_top5: last.val_top5,
        final_val_balanced_top1: last.val_balanced_top1,
        final_val_macro_f1: last.val_macro_f1,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_best_epoch_is_chosen_by_best_metric() {
        // Top-1 peaks at epoch 2 (the frequent classes), balanced top-1 and macro F1 at
        // epoch 3, the loss at epoch 1.
        let epoch = |e, loss, top1, balanced_top1, macro_f1| EpochMetrics {
            epoch: e,
            train_loss: 0.0,
            train_top1: 0.0,
            val_loss: loss,
            val_top1: top1,
            val_top5: 1.0,
            val_balanced_top1: balanced_top1,
            val_macro_f1: macro_f1,
            lr: 0.1,
            images_per_sec: 1.0,
            seconds: 1.0,
            peak_rss_mb: 0.0,
            images_skipped: 0,
        };
        let history = [
            epoch(1, 0.5, 0.80, 0.40, 0.30),
            epoch(2, 0.6, 0.90, 0.45, 0.35),
            epoch(3, 0.7, 0.85, 0.60, 0.50),
            epoch(4, 0.7, 0.85, 0.60, 0.50),
        ];
        let best_by = |metric| {
            let mut best = 0;
            for (i, m) in history.iter().enumerate() {
                if improves(metric, &history[..i], best, m) {
                    best = i + 1;
                }
            }
            best
        };
        assert_eq!(best_by(ValMetric::ValTop1), 2);
        assert_eq!(best_by(ValMetric::ValBalancedTop1), 3);
        assert_eq!(best_by(ValMetric::ValMacroF1), 3);
        assert_eq!(best_by(ValMetric::ValLoss), 1);
    }
}
