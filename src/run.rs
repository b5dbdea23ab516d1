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

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::train::recipe::Recipe;

pub const RECIPE: &str = "recipe.toml";
pub const CLASSES: &str = "classes.json";
pub const METRICS: &str = "metrics.jsonl";
pub const SUMMARY: &str = "summary.json";
/// Normalisation statistics (mean, std, RGB PCA) the run trained with.
pub const STATS: &str = "stats.json";
pub const CHECKPOINTS: &str = "checkpoints";

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|s| s.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// One line of `metrics.jsonl`. Accuracies are fractions in [0, 1].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_top1: f64,
    pub val_loss: f64,
    pub val_top1: f64,
    pub val_top5: f64,
    pub lr: f64,
    pub images_per_sec: f64,
    pub seconds: f64,
}

/// `summary.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub model: String,
    pub params: usize,
    pub epochs: usize,
    pub best_val_top1: f64,
    pub best_epoch: usize,
    pub final_val_top1: f64,
    pub final_val_top5: f64,
    pub final_val_loss: f64,
    pub seconds: f64,
    pub images_skipped: usize,
}

/// A run folder on disk.
#[derive(Clone, Debug)]
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    /// Creates the folder (and its checkpoint folder) if needed.
    pub fn create(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path.join(CHECKPOINTS)).map_err(|e| Error::io(path, e))?;
        Ok(RunDir {
            path: path.to_path_buf(),
        })
    }

    /// Opens an existing run folder; it must hold a recipe.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            return Err(Error::Missing {
                path: path.to_path_buf(),
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

    pub fn write_recipe(&self, recipe: &Recipe) -> Result<()> {
        let text = recipe.to_toml()?;
        write_atomic(&self.file(RECIPE), text.as_bytes())
    }

    pub fn read_recipe(&self) -> Result<Recipe> {
        Recipe::load_resolved(&self.file(RECIPE))
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

    pub fn read_classes(&self) -> Result<Vec<String>> {
        self.read_json(CLASSES)
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
