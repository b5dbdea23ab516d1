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

/// About the bytes of one checkpoint of `model` trained by `recipe` ([`save_checkpoint`]):
/// every float tensor of the model (weights and batch-norm statistics), the optimiser's
/// buffers (SGD with momentum: one a parameter; AdamW: two) and, with EMA, an average of every
/// tensor, 4 bytes a value. The header (names, shapes, metadata: kilobytes) is left out.
pub fn checkpoint_bytes(recipe: &Recipe, model: &Model) -> u64 {
    let (mut tensors, mut params) = (0u64, 0u64);
    crate::params::for_each_shape(model, |site, shape| {
        let n = shape.iter().product::<usize>() as u64;
        tensors += n;
        if site.role().is_parameter() {
            params += n;
        }
    });
    let buffers = recipe.optim.buffers_per_param();
    let averages = u64::from(recipe.regularisation.ema_decay > 0.0);
    4 * (tensors + buffers * params + averages * tensors)
}

/// What the free space on a run's disk means for its checkpoints.
#[derive(Debug, PartialEq)]
pub enum Room {
    /// Enough for all the run will hold at once: `best`, `last` and the one being written
    /// (each written whole beside the one it replaces, so a killed save loses nothing), and
    /// the `epoch-N` checkpoints that `checkpoint_every` keeps.
    Enough,
    /// One fits, all may not: a later save may stop the run (its last checkpoint kept).
    Tight(String),
    /// Not one: the first epoch's save would fail after the epoch had been trained.
    Short(String),
}

/// [`Room`] for checkpoints of `bytes` each with `free` bytes free (`None`: unknown, taken as
/// enough), when the epochs still to run will keep `kept` more `epoch-N` checkpoints.
/// `refused(n)` asks the disk itself for `n` bytes ([`crate::helpers::allocation_refused`]):
/// one checkpoint's, where the free space says it fits, since a quota can be far below the
/// free space. Only one checkpoint's is asked for: that is what the first save will write
/// anyway, where asking for all the run keeps (up to tens of GB) would briefly take that much
/// of the memory of a run folder on tmpfs.
pub fn room(
    free: Option<u64>,
    bytes: u64,
    kept: u64,
    refused: impl FnOnce(u64) -> Option<std::io::Error>,
) -> Room {
    use crate::helpers::human_bytes as h;
    let each = h(bytes);
    if let Some(free) = free
        && free < bytes
    {
        return Room::Short(format!(
            "a checkpoint of this run takes about {each} (the weights, the optimiser's state \
             and any EMA averages) and the disk has {} free; free some space or train into \
             another --out",
            h(free)
        ));
    }
    if let Some(e) = refused(bytes) {
        let reported = free.map_or(String::new(), |f| format!(" (it reports {} free)", h(f)));
        return Room::Short(format!(
            "a checkpoint of this run takes about {each} (the weights, the optimiser's state \
             and any EMA averages) and the disk refused that much to this run{reported}: {e}; \
             a quota or a file-size limit (`ulimit -f`) may be below the free space; free some \
             space or train into another --out"
        ));
    }
    let Some(free) = free else {
        return Room::Enough;
    };
    let most = (3 + kept).saturating_mul(bytes);
    if free < most {
        let what = if kept > 0 {
            format!(
                "best, last, the one being written and the {kept} epoch checkpoints that \
                 `checkpoint_every` keeps"
            )
        } else {
            "best, last and the one being written".to_string()
        };
        Room::Tight(format!(
            "a checkpoint of this run takes about {each} and the disk has {} free; the run \
             may hold {} at once ({what}), so a later save may stop it (the last complete \
             checkpoint is kept, and --resume goes on from it)",
            h(free),
            h(most)
        ))
    } else {
        Room::Enough
    }
}

/// The `epoch-N` checkpoints that epochs `done + 1 ..= last` keep with `checkpoint_every`.
pub fn kept_epochs(every: usize, done: usize, last: usize) -> u64 {
    if every == 0 || last <= done {
        return 0;
    }
    (last / every - done / every) as u64
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk that grants whatever it is asked for.
    fn grants(_: u64) -> Option<std::io::Error> {
        None
    }

    #[test]
    fn room_is_short_below_one_checkpoint_and_tight_below_all_the_run_keeps() {
        let gb = 1_000_000_000;
        assert_eq!(room(None, gb, 0, grants), Room::Enough);
        assert_eq!(room(Some(3 * gb), gb, 0, grants), Room::Enough);
        assert!(matches!(
            room(Some(3 * gb - 1), gb, 0, grants),
            Room::Tight(_)
        ));
        assert!(matches!(room(Some(gb), gb, 0, grants), Room::Tight(_)));
        // Ten kept epoch checkpoints: 13 GB in all.
        assert_eq!(room(Some(13 * gb), gb, 10, grants), Room::Enough);
        let Room::Tight(why) = room(Some(13 * gb - 1), gb, 10, grants) else {
            panic!("one byte short of 13 checkpoints");
        };
        assert!(
            why.contains("13.00 GB") && why.contains("10 epoch"),
            "{why}"
        );
        let Room::Short(why) = room(Some(gb - 1), gb, 0, grants) else {
            panic!("one byte short of one checkpoint");
        };
        assert!(why.contains("1.00 GB") && why.contains("999 MB"), "{why}");
    }

    /// A quota below the free space: the disk is asked for one checkpoint, and its refusal
    /// (with the system's words) makes the run short whatever the free space says; a disk
    /// short by its free space is not asked.
    #[test]
    fn a_refused_checkpoint_is_short_whatever_the_free_space() {
        let gb = 1_000_000_000;
        let quota = |n: u64| {
            assert_eq!(n, gb, "asked for one checkpoint");
            Some(std::io::Error::from_raw_os_error(122))
        };
        for free in [Some(100 * gb), None] {
            let Room::Short(why) = room(free, gb, 10, quota) else {
                panic!("{free:?}: a refused checkpoint is short");
            };
            assert!(why.contains("1.00 GB") && why.contains("quota"), "{why}");
            assert_eq!(why.contains("100.00 GB free"), free.is_some(), "{why}");
        }
        let never = |_: u64| -> Option<std::io::Error> { panic!("asked despite the free space") };
        assert!(matches!(room(Some(gb - 1), gb, 0, never), Room::Short(_)));
    }

    /// The real disk under the test's temporary folder grants a small allocation, refuses one
    /// past any filesystem's size, and keeps no probe file either way.
    #[test]
    fn the_disk_grants_a_small_allocation_and_refuses_an_impossible_one() {
        let dir = tempfile::tempdir().unwrap();
        assert!(crate::helpers::allocation_refused(dir.path(), 1 << 20).is_none());
        let huge = crate::helpers::allocation_refused(dir.path(), 1 << 62);
        #[cfg(target_os = "linux")]
        {
            // EFBIG or ENOSPC, unless this filesystem cannot allocate ahead at all.
            let f = tempfile::tempfile_in(dir.path()).unwrap();
            let flags = rustix::fs::FallocateFlags::empty();
            let unsupported =
                rustix::fs::fallocate(&f, flags, 0, 1) == Err(rustix::io::Errno::OPNOTSUPP);
            assert!(huge.is_some() || unsupported, "4 EiB granted");
        }
        #[cfg(not(target_os = "linux"))]
        assert!(huge.is_none(), "only Linux is asked");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "probe kept"
        );
    }

    #[test]
    fn kept_epochs_count_the_multiples_still_to_run() {
        assert_eq!(kept_epochs(0, 0, 90), 0);
        assert_eq!(kept_epochs(1, 0, 90), 90);
        assert_eq!(kept_epochs(10, 0, 95), 9);
        // Resumed after epoch 25: 30, 40, ..., 90 are still to come.
        assert_eq!(kept_epochs(10, 25, 95), 7);
        assert_eq!(kept_epochs(10, 30, 30), 0);
    }
}
