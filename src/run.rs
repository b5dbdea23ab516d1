//! The run folder: everything needed to evaluate, explain and resume a training run.
//!
//! ```text
//! runs/<name>/recipe.toml      the fully resolved recipe (enough to reproduce the run)
//!             classes.json     class names, in label order
//!             metrics.jsonl    one JSON object per finished epoch
//!             summary.json     written only when training finished successfully
//!             checkpoints/last.safetensors, best.safetensors
//! ```
//! Every file is written to a temporary name in the same folder, synced, then renamed, so a
//! crash or a full disk never leaves a half-written file under the real name.
//!
//! One process writes a run folder at a time: [`RunDir::lock`] takes an advisory lock on
//! `RUN/.lock` (`flock`, through `std::fs::File::try_lock`, so no extra crate), which the OS
//! releases when the process ends, however it ends. A second writer fails at once with the
//! holder's pid.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const RECIPE: &str = "recipe.toml";
pub const CLASSES: &str = "classes.json";
pub const METRICS: &str = "metrics.jsonl";
pub const SUMMARY: &str = "summary.json";
/// Normalisation statistics (mean, std, RGB PCA) the run trained with.
pub const STATS: &str = "stats.json";
pub const CHECKPOINTS: &str = "checkpoints";
/// The advisory lock file of a run folder (holds the writer's pid).
pub const LOCK: &str = ".lock";

pub use crate::helpers::write_atomic;

/// One line of `metrics.jsonl`. Accuracies are fractions in [0, 1].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_top1: f64,
    pub val_loss: f64,
    pub val_top1: f64,
    pub val_top5: f64,
    /// Mean per-class recall on the validation split (equals `val_top1` when its classes are
    /// equally frequent).
    #[serde(default)]
    pub val_balanced_top1: f64,
    /// Mean per-class F1 on the validation split.
    #[serde(default)]
    pub val_macro_f1: f64,
    pub lr: f64,
    pub images_per_sec: f64,
    pub seconds: f64,
    /// The process's peak resident memory so far, in MB (`VmHWM`; 0 where the OS does not
    /// tell). Flat over a long run means nothing leaks per epoch.
    #[serde(default)]
    pub peak_rss_mb: f64,
    /// Undecodable images skipped this epoch (`--skip-bad-images`), train and val together.
    #[serde(default)]
    pub images_skipped: usize,
}

/// The process's peak resident set size in MB, from `/proc/self/status` (`VmHWM`), or `None`
/// where that is not available.
pub fn peak_rss() -> Option<f64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
}

/// [`peak_rss`], or 0.0 where it is not available (`metrics.jsonl`'s `peak_rss_mb`).
pub fn peak_rss_mb() -> f64 {
    peak_rss().unwrap_or(0.0)
}

/// `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub model: String,
    pub params: usize,
    pub epochs: usize,
    /// Validation top-1 of the best epoch (the one `checkpoints/best` holds).
    pub best_val_top1: f64,
    pub best_epoch: usize,
    /// What chose the best epoch (the recipe's `best_metric`; runs from before it: top-1).
    #[serde(default = "val_top1")]
    pub best_metric: String,
    pub final_val_top1: f64,
    pub final_val_top5: f64,
    #[serde(default)]
    pub final_val_balanced_top1: f64,
    #[serde(default)]
    pub final_val_macro_f1: f64,
    pub final_val_loss: f64,
    pub seconds: f64,
    pub images_skipped: usize,
    /// For a run made by `convlab import`: the weights file it came from (then `epochs` is 0
    /// and the accuracies are unmeasured, 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported_from: Option<String>,
}

fn val_top1() -> String {
    "val_top1".into()
}

/// A run folder on disk.
#[derive(Clone, Debug)]
pub struct RunDir {
    pub path: PathBuf,
    /// Held while this process writes the folder ([`RunDir::lock`]).
    lock: Option<std::sync::Arc<RunLock>>,
}

/// The exclusive advisory lock on a run folder; released when the last clone is dropped or the
/// process ends (the OS drops `flock` locks with the file descriptor, even after `kill -9`).
#[derive(Debug)]
pub struct RunLock {
    _file: std::fs::File,
}

impl RunDir {
    /// Creates the folder (and its checkpoint folder) if needed.
    pub fn create(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path.join(CHECKPOINTS)).map_err(|e| Error::io(path, e))?;
        Ok(RunDir {
            path: path.to_path_buf(),
            lock: None,
        })
    }

    /// Creates a fresh folder under `base` that no other run uses: `base`, else `base-2`,
    /// `base-3`, ... (`create_dir` claims the name atomically, so two processes started in the
    /// same second get different folders).
    pub fn create_unique(base: &Path) -> Result<Self> {
        if let Some(parent) = base.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        for i in 1..10_000 {
            let path = if i == 1 {
                base.to_path_buf()
            } else {
                PathBuf::from(format!("{}-{i}", base.display()))
            };
            match std::fs::create_dir(&path) {
                Ok(()) => return Self::create(&path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io(&path, e)),
            }
        }
        Err(Error::Invalid(format!(
            "{}: 10,000 run folders of this name exist already",
            base.display()
        )))
    }

    /// Takes the folder's writer lock, or fails at once naming the folder and the pid that
    /// holds it. Idempotent on a `RunDir` that holds it already.
    pub fn lock(mut self) -> Result<Self> {
        if self.lock.is_none() {
            self.lock = Some(std::sync::Arc::new(self.acquire()?));
        }
        Ok(self)
    }

    /// True when this value holds the folder's writer lock.
    pub fn is_locked(&self) -> bool {
        self.lock.is_some()
    }

    fn acquire(&self) -> Result<RunLock> {
        let path = self.path.join(LOCK);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {
                // The pid is only a hint for the message of a second writer.
                let _ = file.set_len(0);
                let _ = write!(file, "{}", std::process::id());
                let _ = file.flush();
                Ok(RunLock { _file: file })
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                Err(Error::Locked {
                    path: self.path.clone(),
                    holder: if holder.is_empty() {
                        "another process".into()
                    } else {
                        format!("process {holder}")
                    },
                })
            }
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&path, e)),
        }
    }

    /// What of a run the folder holds already (empty: nothing a new run would overwrite).
    pub fn existing_run_files(&self) -> Vec<String> {
        let mut found: Vec<String> = [RECIPE, METRICS, SUMMARY, CLASSES, STATS]
            .into_iter()
            .filter(|f| self.file(f).exists())
            .map(String::from)
            .collect();
        if let Ok(rd) = std::fs::read_dir(self.path.join(CHECKPOINTS)) {
            let n = rd
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
                .count();
            if n > 0 {
                found.push(format!("{n} checkpoint(s)"));
            }
        }
        found
    }

    /// Empties the folder for a new run (`train --overwrite`, a fresh experiment cell): every
    /// entry but the lock file, which must stay so that the lock keeps meaning this folder.
    /// Needs the lock.
    pub fn clear(&self) -> Result<()> {
        if !self.is_locked() {
            return Err(Error::Invalid(format!(
                "{}: clearing a run folder needs its lock",
                self.path.display()
            )));
        }
        let rd = std::fs::read_dir(&self.path).map_err(|e| Error::io(&self.path, e))?;
        for e in rd {
            let e = e.map_err(|e| Error::io(&self.path, e))?;
            if e.file_name() == LOCK {
                continue;
            }
            let p = e.path();
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            let res = if is_dir {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            res.map_err(|e| Error::io(&p, e))?;
        }
        std::fs::create_dir_all(self.path.join(CHECKPOINTS))
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(())
    }

    /// Opens an existing run folder; it must hold a recipe.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.exists() {
            return Err(Error::Missing {
                path: path.to_path_buf(),
            });
        }
        if !path.is_dir() {
            return Err(Error::BadRun {
                path: path.to_path_buf(),
                reason: "a file, not a folder; pass the run folder `convlab train` wrote".into(),
            });
        }
        if !path.join(RECIPE).is_file() {
            return Err(Error::BadRun {
                path: path.to_path_buf(),
                reason: format!("no {RECIPE}"),
            });
        }
        Ok(RunDir {
            path: path.to_path_buf(),
            lock: None,
        })
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// `checkpoints/<which>.safetensors`.
    pub fn checkpoint(&self, which: &str) -> PathBuf {
        self.path
            .join(CHECKPOINTS)
            .join(format!("{which}.safetensors"))
    }

    pub fn write_json<T: Serialize>(&self, name: &str, value: &T) -> Result<()> {
        let text = serde_json::to_string_pretty(value).expect("serialisable");
        write_atomic(&self.file(name), format!("{text}\n").as_bytes())
    }

    pub fn read_json<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<T> {
        let path = self.file(name);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::BadRun {
            path: path.clone(),
            reason: e.to_string(),
        })
    }

    /// The class names, checked against the model the run's recipe builds: a `classes.json`
    /// that does not match the checkpoint is this folder's fault, not the data's.
    pub fn read_classes(&self) -> Result<Vec<String>> {
        let names: Vec<String> = self.read_json(CLASSES)?;
        // Only `model.num_classes` is read: the recipe's full meaning belongs to the recipe
        // layer (`train::RunRecipe`), which this module sits below.
        let path = self.file(RECIPE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let k = text
            .parse::<toml::Table>()
            .ok()
            .and_then(|t| t.get("model")?.get("num_classes")?.as_integer())
            .and_then(|k| usize::try_from(k).ok());
        if let Some(k) = k
            && names.len() != k
        {
            return Err(Error::BadData {
                path: self.file(CLASSES),
                reason: format!(
                    "lists {} classes but the run's model ({}) has {k} outputs",
                    names.len(),
                    self.file(RECIPE).display()
                ),
            });
        }
        Ok(names)
    }

    /// The epochs recorded so far.
    pub fn read_metrics(&self) -> Result<Vec<EpochMetrics>> {
        let path = self.file(METRICS);
        if !path.exists() {
            return Ok(Vec::new());
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l).map_err(|e| Error::BadRun {
                    path: path.clone(),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// Rewrites `metrics.jsonl` with exactly these epochs (atomic; used after each epoch so a
    /// resumed run never shows epochs past its last checkpoint).
    pub fn write_metrics(&self, all: &[EpochMetrics]) -> Result<()> {
        let mut text = String::new();
        for m in all {
            text.push_str(&serde_json::to_string(m).expect("serialisable"));
            text.push('\n');
        }
        write_atomic(&self.file(METRICS), text.as_bytes())
    }
}

/// `runs/<model>-<UTC timestamp>`.
pub fn default_run_path(model: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    PathBuf::from("runs").join(format!(
        "{model}-{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_rss_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let mb = peak_rss_mb();
            assert!(mb > 1.0 && mb < 1e6, "{mb}");
        }
    }

    #[test]
    fn a_second_writer_is_refused_and_the_lock_is_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let a = RunDir::create(dir.path()).unwrap().lock().unwrap();
        let e = RunDir::create(dir.path()).unwrap().lock().unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("in use by process"), "{msg}");
        assert!(msg.contains(&std::process::id().to_string()), "{msg}");
        assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
        drop(a);
        RunDir::create(dir.path()).unwrap().lock().unwrap();
    }

    #[test]
    fn unique_folders_never_collide_and_clear_keeps_only_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("runs/m-1");
        let a = RunDir::create_unique(&base).unwrap();
        let b = RunDir::create_unique(&base).unwrap();
        assert_ne!(a.path, b.path);
        assert!(b.path.ends_with("m-1-2"));
        let a = a.lock().unwrap();
        std::fs::write(a.file(METRICS), "{}").unwrap();
        std::fs::write(a.checkpoint("last"), "x").unwrap();
        assert_eq!(
            a.existing_run_files(),
            vec![METRICS.to_string(), "1 checkpoint(s)".into()]
        );
        a.clear().unwrap();
        assert!(a.existing_run_files().is_empty());
        assert!(a.file(LOCK).exists());
        assert!(
            b.clear().is_err(),
            "clearing without the lock must be refused"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_785), (2026, 11, 28));
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn write_into_missing_folder_names_the_file() {
        let e = write_atomic(Path::new("/nonexistent-dir/x.json"), b"1").unwrap_err();
        assert!(e.to_string().contains("/nonexistent-dir/x.json"), "{e}");
    }
}
