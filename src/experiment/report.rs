//! The experiment's tables, rebuilt from the cells' run folders: `results.md` (per variant,
//! mean +- std over seeds and the difference to the baseline with its standard error),
//! `results.csv` (the same numbers) and `cells.csv` (one line per cell, for re-checking any
//! single run).

use std::fmt::Write as _;
use std::path::Path;

use burn::prelude::*;

use super::stats::MeanStd;
use super::{Cell, CellState, Experiment};
use crate::error::Result;
use crate::recipe::RunRecipe;
use crate::run::{RunDir, write_atomic};

/// One finished cell's numbers (accuracies as fractions).
#[derive(Clone, Debug)]
pub struct CellResult {
    pub variant: String,
    pub seed: u64,
    pub val_top1: f64,
    pub val_top5: f64,
    pub train_top1: f64,
    pub params: usize,
    pub gflops: f64,
    pub seconds: f64,
}

/// One variant's aggregate.
#[derive(Clone, Debug)]
pub struct VariantRow {
    pub name: String,
    pub overrides: String,
    pub top1: MeanStd,
    pub top5: MeanStd,
    pub train_top1: MeanStd,
    /// Difference of mean val top-1 to the baseline, and its standard error.
    pub delta: (f64, f64),
    pub params: usize,
    pub gflops: f64,
    pub seconds: MeanStd,
}

/// Reads the finished cells (unfinished ones are left out of the tables).
pub fn collect(cells: &[Cell], device: &Device) -> Result<Vec<CellResult>> {
    let mut out = Vec::new();
    for c in cells {
        let CellState::Done(s) = c.state() else {
            continue;
        };
        let run = RunDir::open(&c.dir)?;
        let metrics = run.read_metrics()?;
        let recipe = run.read_recipe()?;
        out.push(CellResult {
            variant: c.variant.clone(),
            seed: c.seed,
            val_top1: s.final_val_top1,
            val_top5: s.final_val_top5,
            train_top1: metrics.last().map_or(f64::NAN, |m| m.train_top1),
            params: s.params,
            gflops: recipe.model.flops(device)? / 1e9,
            seconds: s.seconds,
        });
    }
    Ok(out)
}

/// Aggregates per variant, in the experiment's order.
pub fn rows(exp: &Experiment, results: &[CellResult]) -> Vec<VariantRow> {
    let of = |name: &str, f: &dyn Fn(&CellResult) -> f64| {
        let xs: Vec<f64> = results
            .iter()
            .filter(|r| r.variant == name)
            .map(f)
            .collect();
        MeanStd::of(&xs)
    };
    let base = of(exp.baseline_name(), &|r| r.val_top1);
    exp.variants
        .iter()
        .filter(|v| results.iter().any(|r| r.variant == v.name))
        .map(|v| {
            let first = results.iter().find(|r| r.variant == v.name).expect("some");
            let top1 = of(&v.name, &|r| r.val_top1);
            let mut pairs = Vec::new();
            super::flatten("", &v.set, &mut pairs);
            VariantRow {
                name: v.name.clone(),
                overrides: pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                top1,
                top5: of(&v.name, &|r| r.val_top5),
                train_top1: of(&v.name, &|r| r.train_top1),
                delta: top1.diff(&base),
                params: first.params,
                gflops: first.gflops,
                seconds: of(&v.name, &|r| r.seconds),
            }
        })
        .collect()
}

fn pm(m: &MeanStd) -> String {
    format!("{:.2} ± {:.2}", 100.0 * m.mean, 100.0 * m.std)
}

/// The Markdown report.
pub fn markdown(exp: &Experiment, rows: &[VariantRow], cells_total: usize, done: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# Experiment: {}\n", exp.title());
    if let Some(q) = &exp.question {
        let _ = writeln!(s, "{q}\n");
    }
    let mut common = Vec::new();
    super::flatten("", &exp.set, &mut common);
    let _ = writeln!(
        s,
        "Base recipe: {}; seeds: {:?}; every cell also sets: {}. Cells finished: {done} of \
         {cells_total}. Accuracies are final-epoch validation top-1/top-5 in %, mean ± sample \
         std over seeds; Δ is the difference of means to the baseline `{}` ± its standard \
         error; time is training + evaluation wall seconds per cell.\n",
        exp.base
            .as_ref()
            .map_or("built-in defaults".into(), |b| format!("`{}`", b.display())),
        exp.seeds,
        if common.is_empty() {
            "nothing".into()
        } else {
            common
                .iter()
                .map(|(k, v)| format!("`{k}={v}`"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        exp.baseline_name()
    );
    s.push_str(
        "| variant | overrides | seeds | val top-1 % | val top-5 % | Δ top-1 (points) | \
         train top-1 % | train − val | params | GFLOPs | time s |\n",
    );
    s.push_str("|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let base = r.name == exp.baseline_name();
        let _ = writeln!(
            s,
            "| {}{} | {} | {} | {} | {} | {} | {} | {:+.2} | {} | {:.3} | {:.0} |",
            r.name,
            if base { " (baseline)" } else { "" },
            if r.overrides.is_empty() {
                "—".to_string()
            } else {
                format!("`{}`", r.overrides)
            },
            r.top1.n,
            pm(&r.top1),
            pm(&r.top5),
            if base {
                "—".to_string()
            } else {
                format!("{:+.2} ± {:.2}", 100.0 * r.delta.0, 100.0 * r.delta.1)
            },
            pm(&r.train_top1),
            100.0 * (r.train_top1.mean - r.top1.mean),
            r.params,
            r.gflops,
            r.seconds.mean
        );
    }
    s
}

/// `results.csv`: one line per variant.
pub fn csv(rows: &[VariantRow]) -> String {
    let mut s = String::from(
        "variant,seeds,val_top1_mean,val_top1_std,val_top5_mean,val_top5_std,delta_top1,\
         delta_top1_se,train_top1_mean,train_top1_std,params,gflops,seconds_mean\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{},{:.6},{:.2}",
            csv_field(&r.name),
            r.top1.n,
            r.top1.mean,
            r.top1.std,
            r.top5.mean,
            r.top5.std,
            r.delta.0,
            r.delta.1,
            r.train_top1.mean,
            r.train_top1.std,
            r.params,
            r.gflops,
            r.seconds.mean
        );
    }
    s
}

/// `cells.csv`: one line per finished cell.
pub fn cells_csv(results: &[CellResult]) -> String {
    let mut s = String::from("variant,seed,val_top1,val_top5,train_top1,params,gflops,seconds\n");
    for r in results {
        let _ = writeln!(
            s,
            "{},{},{:.6},{:.6},{:.6},{},{:.6},{:.2}",
            csv_field(&r.variant),
            r.seed,
            r.val_top1,
            r.val_top5,
            r.train_top1,
            r.params,
            r.gflops,
            r.seconds
        );
    }
    s
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Writes `results.md`, `results.csv` and `cells.csv` into `out`; returns the Markdown.
pub fn write(
    exp: &Experiment,
    cells: &[Cell],
    out: &Path,
    extra_md: &str,
    device: &Device,
) -> Result<String> {
    let results = collect(cells, device)?;
    let rows = rows(exp, &results);
    let mut md = markdown(exp, &rows, cells.len(), results.len());
    md.push_str(extra_md);
    write_atomic(&out.join("results.md"), md.as_bytes())?;
    write_atomic(&out.join("results.csv"), csv(&rows).as_bytes())?;
    write_atomic(&out.join("cells.csv"), cells_csv(&results).as_bytes())?;
    Ok(md)
}
