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
    /// Mean per-class accuracy of the final validation (NaN for a run from before it was
    /// recorded).
    pub val_balanced_top1: f64,
    /// Macro-averaged F1 of the final validation (NaN likewise).
    pub val_macro_f1: f64,
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
    pub balanced_top1: MeanStd,
    pub macro_f1: MeanStd,
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
        // Summaries from before these were recorded read as 0 (serde's default), which no
        // run that measured anything gives for both.
        let unrecorded = s.final_val_balanced_top1 == 0.0 && s.final_val_macro_f1 == 0.0;
        let recorded = |x: f64| if unrecorded { f64::NAN } else { x };
        out.push(CellResult {
            variant: c.variant.clone(),
            seed: c.seed,
            val_top1: s.final_val_top1,
            val_top5: s.final_val_top5,
            val_balanced_top1: recorded(s.final_val_balanced_top1),
            val_macro_f1: recorded(s.final_val_macro_f1),
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
                balanced_top1: of(&v.name, &|r| r.val_balanced_top1),
                macro_f1: of(&v.name, &|r| r.val_macro_f1),
                train_top1: of(&v.name, &|r| r.train_top1),
                delta: top1.diff(&base),
                params: first.params,
                gflops: first.gflops,
                seconds: of(&v.name, &|r| r.seconds),
            }
        })
        .collect()
}

/// `mean ± std` in %, or "—" where a cell did not record the number.
fn pm(m: &MeanStd) -> String {
    if m.mean.is_nan() {
        "—".into()
    } else {
        format!("{:.2} ± {:.2}", 100.0 * m.mean, 100.0 * m.std)
    }
}

/// Whether some cell's validation classes are imbalanced: its balanced top-1 (the mean of the
/// per-class accuracies) differs from its top-1, which it equals when every class has as many
/// validation images. Only then does `results.md` show the balanced top-1 column.
pub fn imbalanced_validation(results: &[CellResult]) -> bool {
    results
        .iter()
        .any(|r| (r.val_balanced_top1 - r.val_top1).abs() > 1e-9)
}

/// The Markdown report.
pub fn markdown(
    exp: &Experiment,
    rows: &[VariantRow],
    cells_total: usize,
    done: usize,
    balanced: bool,
) -> String {
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
         std over seeds{}; macro F1 is the mean over classes of each class's F1, in %; Δ is \
         the difference of means to the baseline `{}` ± its standard error; time is training \
         + evaluation wall seconds per cell.\n",
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
        if balanced {
            " (balanced top-1: the mean of the per-class accuracies, shown because some \
             cell's validation classes are imbalanced)"
        } else {
            ""
        },
        exp.baseline_name()
    );
    let mut head = vec![
        "variant",
        "overrides",
        "seeds",
        "val top-1 %",
        "val top-5 %",
    ];
    if balanced {
        head.push("val balanced top-1 %");
    }
    head.extend([
        "val macro F1 %",
        "Δ top-1 (points)",
        "train top-1 %",
        "train − val",
        "params",
        "GFLOPs",
        "time s",
    ]);
    let _ = writeln!(s, "| {} |", head.join(" | "));
    let _ = writeln!(s, "|{}", "---|".repeat(head.len()));
    for r in rows {
        let base = r.name == exp.baseline_name();
        let mut cells = vec![
            format!("{}{}", r.name, if base { " (baseline)" } else { "" }),
            if r.overrides.is_empty() {
                "—".to_string()
            } else {
                format!("`{}`", r.overrides)
            },
            r.top1.n.to_string(),
            pm(&r.top1),
            pm(&r.top5),
        ];
        if balanced {
            cells.push(pm(&r.balanced_top1));
        }
        cells.extend([
            pm(&r.macro_f1),
            if base {
                "—".to_string()
            } else {
                format!("{:+.2} ± {:.2}", 100.0 * r.delta.0, 100.0 * r.delta.1)
            },
            pm(&r.train_top1),
            format!("{:+.2}", 100.0 * (r.train_top1.mean - r.top1.mean)),
            r.params.to_string(),
            format!("{:.3}", r.gflops),
            format!("{:.0}", r.seconds.mean),
        ]);
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }
    s
}

/// `results.csv`: one line per variant.
pub fn csv(rows: &[VariantRow]) -> String {
    let mut s = String::from(
        "variant,seeds,val_top1_mean,val_top1_std,val_top5_mean,val_top5_std,delta_top1,\
         delta_top1_se,train_top1_mean,train_top1_std,params,gflops,seconds_mean,\
         val_balanced_top1_mean,val_balanced_top1_std,val_macro_f1_mean,val_macro_f1_std\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "{},{},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{},{:.6},{:.2},{:.6},{:.6},{:.6},{:.6}",
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
            r.seconds.mean,
            r.balanced_top1.mean,
            r.balanced_top1.std,
            r.macro_f1.mean,
            r.macro_f1.std
        );
    }
    s
}

/// `cells.csv`: one line per finished cell.
pub fn cells_csv(results: &[CellResult]) -> String {
    let mut s = String::from(
        "variant,seed,val_top1,val_top5,train_top1,params,gflops,seconds,val_balanced_top1,\
         val_macro_f1\n",
    );
    for r in results {
        let _ = writeln!(
            s,
            "{},{},{:.6},{:.6},{:.6},{},{:.6},{:.2},{:.6},{:.6}",
            csv_field(&r.variant),
            r.seed,
            r.val_top1,
            r.val_top5,
            r.train_top1,
            r.params,
            r.gflops,
            r.seconds,
            r.val_balanced_top1,
            r.val_macro_f1
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
    let balanced = imbalanced_validation(&results);
    let mut md = markdown(exp, &rows, cells.len(), results.len(), balanced);
    md.push_str(extra_md);
    write_atomic(&out.join("results.md"), md.as_bytes())?;
    write_atomic(&out.join("results.csv"), csv(&rows).as_bytes())?;
    write_atomic(&out.join("cells.csv"), cells_csv(&results).as_bytes())?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(variant: &str, seed: u64, top1: f64, balanced: f64, f1: f64) -> CellResult {
        CellResult {
            variant: variant.into(),
            seed,
            val_top1: top1,
            val_top5: 1.0,
            val_balanced_top1: balanced,
            val_macro_f1: f1,
            train_top1: 0.9,
            params: 10,
            gflops: 0.5,
            seconds: 1.0,
        }
    }

    fn experiment() -> Experiment {
        toml::from_str(
            r#"
name = "t"
seeds = [0, 1]
[[variant]]
name = "a"
[[variant]]
name = "b"
"#,
        )
        .unwrap()
    }

    /// The balanced top-1 column appears only where some cell's validation classes are
    /// imbalanced; macro F1 always, as mean ± std over seeds; an unrecorded number is "—".
    #[test]
    fn tables_carry_balanced_top1_and_macro_f1() {
        let exp = experiment();
        let even = [
            cell("a", 0, 0.5, 0.5, 0.4),
            cell("a", 1, 0.7, 0.7, 0.6),
            cell("b", 0, 0.6, 0.6, f64::NAN),
        ];
        assert!(!imbalanced_validation(&even));
        let r = rows(&exp, &even);
        assert!((r[0].macro_f1.mean - 0.5).abs() < 1e-12);
        let md = markdown(&exp, &r, 4, 3, false);
        assert!(!md.contains("balanced top-1"), "{md}");
        assert!(md.contains("| val macro F1 % |"), "{md}");
        assert!(md.contains("| 50.00 ± 14.14 |"), "{md}");
        assert!(md.contains("| — |"), "{md}");
        let header = md.lines().find(|l| l.starts_with("| variant")).unwrap();
        let row = md
            .lines()
            .find(|l| l.starts_with("| a (baseline)"))
            .unwrap();
        assert_eq!(header.matches('|').count(), row.matches('|').count());

        let skewed = [cell("a", 0, 0.9, 0.6, 0.5), cell("b", 0, 0.8, 0.7, 0.6)];
        assert!(imbalanced_validation(&skewed));
        let r = rows(&exp, &skewed);
        let md = markdown(&exp, &r, 4, 2, true);
        assert!(md.contains("| val balanced top-1 % |"), "{md}");
        let row = md.lines().find(|l| l.starts_with("| b |")).unwrap();
        assert!(row.contains("| 70.00 ± 0.00 | 60.00 ± 0.00 |"), "{row}");
        let csv = csv(&r);
        assert!(csv.lines().next().unwrap().ends_with(
            "val_balanced_top1_mean,val_balanced_top1_std,val_macro_f1_mean,val_macro_f1_std"
        ));
        let cells = cells_csv(&skewed);
        assert!(
            cells
                .lines()
                .nth(1)
                .unwrap()
                .ends_with(",0.600000,0.500000"),
            "{cells}"
        );
    }
}
