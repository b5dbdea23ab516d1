//! Ablation grids: a base recipe, named variants (sets of recipe overrides) and seeds. Every
//! (variant, seed) cell is an ordinary run folder under `<out>/cells/`, so a finished cell is
//! never trained again and an interrupted one resumes from its last checkpoint; the tables in
//! `results.md` / `results.csv` are rebuilt from the cells' files after every run.
//!
//! ```toml
//! name = "pooling"
//! question = "Does overlapping pooling lower the error?"
//! base = "../recipes/default.toml"   # relative to this file; absent = built-in defaults
//! seeds = [0, 1, 2]
//! baseline = "max 2x2/2"             # absent = the first variant
//! set = { epochs = 4, "data.limit_train" = 4000 }   # applied to every cell
//!
//! [[variant]]
//! name = "max 2x2/2"
//!
//! [[variant]]
//! name = "avg 2x2/2"
//! set = { "model.pool" = "avg" }
//! ```

pub mod report;
pub mod stats;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use burn::prelude::Device;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::pipeline::{Quiet, TrainOptions, train};
use crate::recipe::{Override, Recipe};
use crate::run::{METRICS, RunDir, SUMMARY, Summary};

/// One `[[variant]]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    /// Recipe overrides, dotted keys (`"model.pool" = "avg"`) or nested tables. In string
    /// values `{out}` stands for the experiment's output folder, so a variant can name another
    /// variant's cell (a distillation teacher, a shallow net to initialise from).
    #[serde(default)]
    pub set: toml::Table,
    /// Seeds of this variant (default: the experiment's); a teacher needs only one.
    pub seeds: Option<Vec<u64>>,
}

/// An experiment file.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: Option<String>,
    /// The claim being tested, printed at the top of `results.md`.
    pub question: Option<String>,
    /// Base recipe, relative to the experiment file.
    pub base: Option<PathBuf>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    pub baseline: Option<String>,
    /// Overrides applied to every cell before the variant's own.
    #[serde(default)]
    pub set: toml::Table,
    #[serde(rename = "variant")]
    pub variants: Vec<Variant>,
    /// Also report ensembles of the first 1..=n seeds of this variant (model fusion).
    pub ensemble: Option<String>,
    /// Where the file was read from (set by [`Experiment::load`]).
    #[serde(skip)]
    pub file: PathBuf,
}

fn default_seeds() -> Vec<u64> {
    vec![0, 1, 2]
}

/// One (variant, seed) run of the grid.
#[derive(Clone, Debug)]
pub struct Cell {
    pub variant: String,
    pub seed: u64,
    /// Run folder, `<out>/cells/<variant>-s<seed>` (the name made path-safe).
    pub dir: PathBuf,
    pub recipe: Recipe,
}

/// Where a cell stands on disk.
#[derive(Clone, Debug, PartialEq)]
pub enum CellState {
    Done(Box<Summary>),
    /// Interrupted after at least one complete epoch: resume it.
    Partial,
    Fresh,
}

/// Flattens nested tables into `a.b.c` keys (values that are arrays stay whole).
fn flatten(prefix: &str, t: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in t {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(inner) => flatten(&key, inner, out),
            v => out.push((key, v.clone())),
        }
    }
}

/// A file-system-safe form of a variant name.
pub fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    s.trim_matches('_').to_string()
}

impl Experiment {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut e: Experiment = toml::from_str(&text).map_err(|e| Error::Recipe {
            origin: path.display().to_string(),
            key: "(experiment)".into(),
            reason: e.to_string().trim().to_string(),
        })?;
        e.file = path.to_path_buf();
        e.check()?;
        Ok(e)
    }

    fn check(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::Recipe {
                origin: self.file.display().to_string(),
                key: "variant".into(),
                reason,
            })
        };
        if self.variants.is_empty() {
            return bad("an experiment needs at least one [[variant]]".into());
        }
        if self.seeds.is_empty() {
            return bad("seeds must list at least one seed".into());
        }
        let mut seen = std::collections::HashSet::new();
        for v in &self.variants {
            if !seen.insert(slug(&v.name)) || slug(&v.name).is_empty() {
                return bad(format!("variant name `{}` is empty or repeated", v.name));
            }
        }
        for named in [&self.baseline, &self.ensemble].into_iter().flatten() {
            if !self.variants.iter().any(|v| &v.name == named) {
                return bad(format!("`{named}` is not the name of a variant"));
            }
        }
        Ok(())
    }

    /// The experiment's name: `name`, else the file's stem.
    pub fn title(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            self.file
                .file_stem()
                .map_or("experiment".into(), |s| s.to_string_lossy().into())
        })
    }

    /// The baseline variant's name.
    pub fn baseline_name(&self) -> &str {
        self.baseline.as_deref().unwrap_or(&self.variants[0].name)
    }

    /// The base recipe's path, relative to the experiment file.
    pub fn base_path(&self) -> Option<PathBuf> {
        self.base.as_ref().map(|b| {
            if b.is_absolute() {
                b.clone()
            } else {
                self.file.parent().unwrap_or(Path::new(".")).join(b)
            }
        })
    }

    /// The overrides of a variant: the common `set`, the variant's `set`, then the seed;
    /// `{out}` in string values becomes `out`.
    pub fn overrides(&self, v: &Variant, seed: u64, out: &Path) -> Vec<Override> {
        let dir = out;
        let mut out = Vec::new();
        let mut pairs = Vec::new();
        flatten("", &self.set, &mut pairs);
        for (key, value) in pairs.drain(..) {
            out.push(Override {
                key,
                value,
                origin: format!("{} set", self.file.display()),
            });
        }
        flatten("", &v.set, &mut pairs);
        for (key, value) in pairs {
            out.push(Override {
                key,
                value,
                origin: format!("{} variant `{}`", self.file.display(), v.name),
            });
        }
        out.push(Override::flag("seed", seed as i64, "experiment seed"));
        for o in &mut out {
            if let toml::Value::String(text) = &o.value {
                o.value = toml::Value::String(text.replace("{out}", &dir.display().to_string()));
            }
        }
        out
    }

    /// Every cell in run order (variant-major, then seed), with its resolved recipe. A
    /// recipe error names the variant and the key.
    pub fn cells(&self, out: &Path) -> Result<Vec<Cell>> {
        let base = self.base_path();
        let mut cells = Vec::new();
        for v in &self.variants {
            for &seed in v.seeds.as_ref().unwrap_or(&self.seeds) {
                let recipe = Recipe::resolve(base.as_deref(), &self.overrides(v, seed, out))?;
                cells.push(Cell {
                    variant: v.name.clone(),
                    seed,
                    dir: out.join("cells").join(format!("{}-s{seed}", slug(&v.name))),
                    recipe,
                });
            }
        }
        Ok(cells)
    }
}

impl Cell {
    pub fn state(&self) -> CellState {
        if let Ok(run) = RunDir::open(&self.dir) {
            if let Ok(s) = run.read_json::<Summary>(SUMMARY) {
                return CellState::Done(Box::new(s));
            }
            if run.file(METRICS).is_file() && run.checkpoint("last").is_file() {
                return CellState::Partial;
            }
        }
        CellState::Fresh
    }

    /// Trains the cell to completion (resuming it if it was interrupted) on `device`.
    pub fn run(&self, device: &Device) -> Result<Summary> {
        if let CellState::Done(s) = self.state() {
            return Ok(*s);
        }
        // Locked before its state is read again: another `experiment` on the same grid may be
        // training this cell right now, and then this one must not touch it.
        let run = RunDir::create(&self.dir)?.lock()?;
        match self.state() {
            CellState::Done(s) => Ok(*s),
            CellState::Partial => {
                let recipe = Recipe::resolve(Some(&run.file(crate::run::RECIPE)), &[])?;
                let opts = TrainOptions {
                    resume: true,
                    stop_after_epoch: None,
                };
                train(recipe, &run, &opts, device, &mut Quiet)
            }
            CellState::Fresh => {
                // Nothing complete in it (killed before its first epoch): start over.
                run.clear()?;
                let opts = TrainOptions {
                    resume: false,
                    stop_after_epoch: None,
                };
                train(self.recipe.clone(), &run, &opts, device, &mut Quiet)
            }
        }
    }
}

/// What the runner reports after each cell.
pub struct CellDone<'a> {
    pub cell: &'a Cell,
    pub summary: &'a Summary,
    /// Cells finished so far (including ones found finished on disk) and in all.
    pub done: usize,
    pub total: usize,
    /// Wall seconds this cell took in this process (0 when it was already finished).
    pub seconds: f64,
    /// Estimated seconds until every cell is done.
    pub eta: f64,
}

/// Runs every unfinished cell, `jobs` at a time; job `j` trains on `devices[j % len]`.
/// Returns after all cells ran; the first error stops new cells from starting and is returned.
pub fn run_cells(
    cells: &[Cell],
    devices: &[Device],
    jobs: usize,
    on_done: &(dyn Fn(CellDone) + Sync),
) -> Result<()> {
    let todo: Vec<&Cell> = cells
        .iter()
        .filter(|c| !matches!(c.state(), CellState::Done(_)))
        .collect();
    let done = AtomicUsize::new(cells.len() - todo.len());
    let next = AtomicUsize::new(0);
    let error: Mutex<Option<Error>> = Mutex::new(None);
    let start = Instant::now();
    let ran = AtomicUsize::new(0);
    let jobs = jobs.clamp(1, todo.len().max(1));
    std::thread::scope(|s| {
        for j in 0..jobs {
            let device = devices[j % devices.len()].clone();
            let (todo, next, done, error, ran) = (&todo, &next, &done, &error, &ran);
            s.spawn(move || {
                loop {
                    if error.lock().expect("lock").is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(cell) = todo.get(i) else { return };
                    let t0 = Instant::now();
                    match cell.run(&device) {
                        Ok(summary) => {
                            let d = done.fetch_add(1, Ordering::SeqCst) + 1;
                            let r = ran.fetch_add(1, Ordering::SeqCst) + 1;
                            let per_cell = start.elapsed().as_secs_f64() / r as f64;
                            let left = todo.len().saturating_sub(r);
                            on_done(CellDone {
                                cell,
                                summary: &summary,
                                done: d,
                                total: cells.len(),
                                seconds: t0.elapsed().as_secs_f64(),
                                eta: per_cell * left as f64,
                            });
                        }
                        Err(e) => {
                            let mut slot = error.lock().expect("lock");
                            slot.get_or_insert(Error::Invalid(format!(
                                "experiment cell {} (variant `{}`, seed {}) failed: {e}",
                                cell.dir.display(),
                                cell.variant,
                                cell.seed
                            )));
                            return;
                        }
                    }
                }
            });
        }
    });
    match error.into_inner().expect("lock") {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exp(text: &str) -> Experiment {
        let mut e: Experiment = toml::from_str(text).unwrap();
        e.file = PathBuf::from("exp/x.toml");
        e.check().unwrap();
        e
    }

    #[test]
    fn grid_expands_variants_times_seeds_with_overrides_in_order() {
        let e = exp(r#"
            seeds = [3, 4]
            set = { epochs = 2, "data.limit_train" = 100 }
            [[variant]]
            name = "max"
            [[variant]]
            name = "avg pool"
            set = { "model.pool" = "avg", model = { dropout = 0.2 }, epochs = 5 }
            [[variant]]
            name = "student"
            seeds = [7]
            set = { "distill.teacher" = "{out}/cells/max-s3" }
        "#);
        let cells = e.cells(Path::new("out")).unwrap();
        assert_eq!(cells.len(), 5);
        assert_eq!(cells[4].seed, 7);
        assert_eq!(
            cells[4].recipe.distill.teacher.as_deref(),
            Some(Path::new("out/cells/max-s3"))
        );
        let names: Vec<_> = cells[..4]
            .iter()
            .map(|c| c.dir.display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "out/cells/max-s3",
                "out/cells/max-s4",
                "out/cells/avg_pool-s3",
                "out/cells/avg_pool-s4"
            ]
        );
        let (a, b) = (&cells[0].recipe, &cells[3].recipe);
        assert_eq!((a.seed, a.epochs, a.data.limit_train), (3, 2, Some(100)));
        // The variant's `set` comes after the common one, so its epochs win.
        assert_eq!((b.seed, b.epochs), (4, 5));
        assert_eq!(b.model.pool, crate::layers::PoolKind::Avg);
        assert_eq!(b.model.dropout, Some(0.2));
        assert_eq!(e.baseline_name(), "max");
    }

    #[test]
    fn bad_grids_are_errors_naming_the_problem() {
        let bad = |text: &str, needle: &str| {
            let mut e: Experiment = toml::from_str(text).unwrap();
            e.file = PathBuf::from("x.toml");
            let err = e
                .check()
                .and_then(|_| e.cells(Path::new("o")).map(|_| ()))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{err}");
        };
        bad("variant = []", "at least one");
        bad(
            "[[variant]]\nname = \"a\"\n[[variant]]\nname = \"a\"",
            "repeated",
        );
        bad("baseline = \"b\"\n[[variant]]\nname = \"a\"", "`b` is not");
        bad(
            "[[variant]]\nname = \"a\"\nset = { \"model.pool\" = \"median\" }",
            "model.pool",
        );
    }
}
