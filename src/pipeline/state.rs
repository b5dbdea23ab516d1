//! What a run carries between epochs and across a resume: progress counters, the
//! reduce-on-plateau state, optimiser and EMA buffers; and the two ways a model can start from
//! a checkpoint (`--resume`, `init_from`).

use std::collections::HashMap;

use super::trainer::Reporter;
use crate::checkpoint::{self, device_entries, entries, module_device_tensors, module_shapes};
use crate::error::{Error, Result};
use crate::models::Model;
use crate::recipe::Recipe;
use crate::run::{EpochMetrics, RunDir};
use crate::train::ema::Ema;
use crate::train::optim::Optimizer;
use crate::train::schedule::Plateau;
use burn::prelude::*;

/// Resume state stored in a checkpoint's metadata.
pub(crate) struct Progress {
    pub plateau: Plateau,
    pub epochs_done: usize,
    pub best_top1: f64,
    pub best_epoch: usize,
    pub skipped: usize,
    pub seconds: f64,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            plateau: Plateau::default(),
            epochs_done: 0,
            best_top1: -1.0,
            best_epoch: 0,
            skipped: 0,
            seconds: 0.0,
        }
    }
}

/// Writes `checkpoints/<which>.safetensors`: weights, optimiser and EMA state, progress.
pub(crate) fn save_checkpoint(
    run: &RunDir,
    which: &str,
    model: &Model,
    sgd: &Optimizer,
    ema: Option<&Ema>,
    p: &Progress,
) -> Result<()> {
    let meta = HashMap::from([
        ("epoch".to_string(), p.epochs_done.to_string()),
        ("best_val_top1".to_string(), p.best_top1.to_string()),
        ("best_epoch".to_string(), p.best_epoch.to_string()),
        ("images_skipped".to_string(), p.skipped.to_string()),
        ("seconds".to_string(), p.seconds.to_string()),
        (
            "plateau".to_string(),
            serde_json::to_string(&p.plateau).expect("serialisable"),
        ),
    ]);
    let weights = module_device_tensors(&model.valid());
    let (buffers, scalars) = sgd.device_state();
    let shapes = module_shapes(model);
    let averaged = ema.map(|e| e.device_state(&shapes)).unwrap_or_default();
    let mut all = device_entries("model", &weights);
    all.extend(device_entries("optim", &buffers));
    all.extend(entries("optim", &scalars));
    all.extend(device_entries("ema", &averaged));
    checkpoint::save_entries(&run.checkpoint(which), all, meta)
}

/// Restores model, optimiser, EMA and progress from `checkpoints/last`, and the metrics of the
/// epochs it covers.
pub(crate) fn restore(
    run: &RunDir,
    recipe: &Recipe,
    model: Model,
    sgd: &mut Optimizer,
    ema: Option<&mut Ema>,
    device: &Device,
) -> Result<(Model, Progress, Vec<EpochMetrics>)> {
    let path = run.checkpoint("last");
    // Group by group, so that one group's host copy is alive at a time.
    let mut ck = checkpoint::open(&path)?;
    let model =
        checkpoint::load_module(model, ck.read("model")?, &path, recipe.model.name.as_str())?;
    let shapes = module_shapes(&model);
    let mismatch = |reason: String| Error::CheckpointMismatch {
        path: path.clone(),
        model: recipe.model.name.to_string(),
        reason,
    };
    sgd.load_state(ck.read("optim")?, &shapes, device)
        .map_err(mismatch)?;
    if let Some(e) = ema {
        e.load_state(ck.read("ema")?, &shapes, device)
            .map_err(mismatch)?;
    }
    // A damaged or foreign value must fail loudly: read as 0 it would silently restart the run
    // at epoch 0. Keys other than `epoch` may be absent in checkpoints of older versions.
    let bad = |k: &str, why: String| Error::CheckpointMismatch {
        path: path.clone(),
        model: recipe.model.name.to_string(),
        reason: format!("resume metadata `{k}`: {why}"),
    };
    let num = |k: &str, required: bool| -> Result<f64> {
        match ck.meta().get(k) {
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|x| !x.is_nan())
                .ok_or_else(|| bad(k, format!("`{v}` is not a number"))),
            None if required => Err(bad(
                k,
                "missing; is this a convlab training checkpoint?".into(),
            )),
            None => Ok(0.0),
        }
    };
    let count = |k: &str, required: bool| -> Result<usize> {
        let x = num(k, required)?;
        if x < 0.0 || x.fract() != 0.0 || x > 1e15 {
            return Err(bad(k, format!("`{x}` is not a count")));
        }
        Ok(x as usize)
    };
    let plateau = match ck.meta().get("plateau") {
        Some(v) => serde_json::from_str(v).map_err(|e| bad("plateau", e.to_string()))?,
        None => Default::default(),
    };
    let p = Progress {
        plateau,
        epochs_done: count("epoch", true)?,
        best_top1: num("best_val_top1", false)?,
        best_epoch: count("best_epoch", false)?,
        skipped: count("images_skipped", false)?,
        seconds: num("seconds", false)?,
    };
    let mut history = run.read_metrics()?;
    history.truncate(p.epochs_done);
    Ok((model, p, history))
}

/// `model.pretrained`: the model with the weights of a state dict file or of another run's best
/// checkpoint; a classifier of another class count is re-initialised and the message says so.
pub(crate) fn apply_pretrained(
    recipe: &Recipe,
    model: Model,
    device: &Device,
    rep: &mut dyn Reporter,
) -> Result<Model> {
    let Some(p) = &recipe.model.pretrained else {
        return Ok(model);
    };
    let src = super::factory::pretrained_source(p)?;
    let sd = crate::interop::read_state_dict(&src.weights)?;
    let format = sd.format;
    let l = crate::interop::load_weights(&recipe.model, sd, None, device)?;
    let k = recipe.model.num_classes;
    rep.message(&format!(
        "pretrained {}: {} tensors ({format}, {} naming){}",
        src.weights.display(),
        l.tensors,
        l.naming.as_str(),
        if l.source_classes != k {
            format!(
                "; classifier re-initialised for {k} classes (the weights have {})",
                l.source_classes
            )
        } else {
            String::new()
        }
    ));
    drop(model);
    Ok(l.model)
}

/// `init_from`: copies every layer that matches from the best checkpoint of another run and
/// reports what was copied (an empty path means none).
pub(crate) fn apply_init_from(
    recipe: &Recipe,
    model: Model,
    rep: &mut dyn Reporter,
) -> Result<Model> {
    let Some(src) = recipe
        .init_from
        .as_ref()
        .filter(|p| !p.as_os_str().is_empty())
    else {
        return Ok(model);
    };
    let from = RunDir::open(src)?;
    let weights = checkpoint::open(&from.checkpoint("best"))?.read("model")?;
    let total = module_shapes(&model).len();
    let (model, copied) = checkpoint::load_matching(model, &weights);
    rep.message(&format!(
        "init_from {}: copied {} of {} tensors ({}); {} left as initialised",
        src.display(),
        copied.len(),
        total,
        copied.join(", "),
        total - copied.len()
    ));
    Ok(model)
}
