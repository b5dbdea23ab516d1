//! What a run carries between epochs and across a resume: progress counters, the
//! reduce-on-plateau state, optimiser and EMA buffers; and the two ways a model can start from
//! a checkpoint (`--resume`, `init_from`).

use std::collections::HashMap;

use super::checkpoint::{self, module_tensors};
use super::ema::Ema;
use super::optim::Optimizer;
use super::recipe::Recipe;
use super::schedule::Plateau;
use super::trainer::Reporter;
use crate::error::Result;
use crate::models::Model;
use crate::run::{EpochMetrics, RunDir};
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
    let weights = module_tensors(&model.valid());
    let averaged = ema.map(Ema::state).unwrap_or_default();
    checkpoint::save(
        &run.checkpoint(which),
        &[
            ("model", &weights),
            ("optim", &sgd.state()),
            ("ema", &averaged),
        ],
        meta,
    )
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
    let ck = checkpoint::load(&path)?;
    let model =
        checkpoint::load_module(model, &ck.group("model"), &path, recipe.model.name.as_str())?;
    sgd.load_state(&ck.group("optim"), device);
    if let Some(e) = ema {
        e.load_state(&ck.group("ema"), device);
    }
    let num = |k: &str| {
        ck.meta
            .get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let p = Progress {
        plateau: ck
            .meta
            .get("plateau")
            .and_then(|v| serde_json::from_str(v).ok())
            .unwrap_or_default(),
        epochs_done: num("epoch") as usize,
        best_top1: num("best_val_top1"),
        best_epoch: num("best_epoch") as usize,
        skipped: num("images_skipped") as usize,
        seconds: num("seconds"),
    };
    let mut history = run.read_metrics()?;
    history.truncate(p.epochs_done);
    Ok((model, p, history))
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
    let ck = checkpoint::load(&from.checkpoint("best"))?;
    let total = module_tensors(&model.valid()).len();
    let (model, copied) = checkpoint::load_matching(model, &ck.group("model"));
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
