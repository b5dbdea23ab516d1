//! `convlab eval`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use convlab::data::open;
use convlab::eval::tta::Tta;
use convlab::pipeline::evaluate_tta;
use convlab::pipeline::load_model;
use convlab::run::RunDir;
use serde::Serialize;

use super::{DataArgs, RuntimeArgs, device};
use convlab::recipe::RunRecipe;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Which {
    Best,
    Last,
}

impl Which {
    pub fn as_str(self) -> &'static str {
        match self {
            Which::Best => "best",
            Which::Last => "last",
        }
    }
}

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// Run folder written by `convlab train`.
    #[arg(long)]
    pub run: PathBuf,
    /// Evaluate on this dataset's held-out split instead of the run's.
    #[command(flatten)]
    pub data: DataArgs,
    /// Checkpoint to load: the best validation epoch's, or the last epoch's.
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint: Which,
    /// Test-time augmentation: center (one crop), flip (+ mirror), ten-crop (corners, centre
    /// and their mirrors), multi-scale (whole image at each of --scales, and mirrors).
    /// Default: the recipe's `eval.tta`. The single-crop result is reported beside it.
    #[arg(long, value_parser = parse_tta)]
    pub tta: Option<Tta>,
    /// Shorter sides in pixels for multi-scale, e.g. `28,32,36` (sets `eval.scales`).
    #[arg(long, value_delimiter = ',')]
    pub scales: Option<Vec<usize>>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub(super) fn parse_tta(s: &str) -> std::result::Result<Tta, String> {
    s.parse().map_err(|e: convlab::Error| e.to_string())
}

/// `--json` output: the report's keys, plus what test-time augmentation gained.
#[derive(Serialize)]
struct Json<'a> {
    #[serde(flatten)]
    report: &'a convlab::eval::EvalReport,
    tta: &'a convlab::eval::tta::TtaSummary,
}

pub fn run(a: EvalArgs) -> Result<()> {
    device::set_threads(a.runtime.threads)?;
    let dev = device::pick(&a.runtime.device)?;
    let run = RunDir::open(&a.run)?;
    let mut recipe = run.read_recipe()?;
    let classes = run.read_classes()?;
    if a.data.data.is_some() || a.data.data_format.is_some() {
        recipe.data.path = a.data.data.clone();
        recipe.data.format = a.data.data_format;
        recipe.data.limit_val = None;
    }
    let splits = open(&recipe.data.spec(recipe.seed))?;
    if splits.classes.len() != classes.len() {
        bail!(
            "the data has {} classes but the run was trained on {}",
            splits.classes.len(),
            classes.len()
        );
    }
    if let Some(s) = a.scales {
        recipe.eval.scales = s;
        recipe.eval.validate()?;
    }
    let tta = a.tta.unwrap_or(recipe.eval.tta);
    // The run's precision, as validation during training used it.
    let p = device::precision(recipe.precision, &dev, "the run's precision");
    let model = load_model(&run, &recipe, a.checkpoint.as_str(), &dev)?.with_precision(p);
    let convlab::eval::tta::TtaResult {
        report,
        summary,
        skipped,
    } = evaluate_tta(&model, &recipe, splits.val.clone(), &classes, tta, &dev)?;
    if a.json {
        let j = Json {
            report: &report,
            tta: &summary,
        };
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(());
    }
    println!(
        "{} ({} checkpoint) on {} {} images{}",
        run.path.display(),
        a.checkpoint.as_str(),
        report.count,
        splits.val_name,
        if !skipped.is_empty() {
            format!(" ({} undecodable skipped)", skipped.len())
        } else {
            String::new()
        }
    );
    if tta != Tta::Center {
        println!(
            "single crop: top1 {:.2}%  top5 {:.2}%",
            100.0 * summary.single_top1,
            100.0 * summary.single_top5
        );
        println!(
            "{} ({} views): top1 {:.2}%  top5 {:.2}%  gain {:+.2} points top-1",
            summary.mode,
            summary.views,
            100.0 * summary.top1,
            100.0 * summary.top5,
            100.0 * summary.gain_top1
        );
    }
    println!(
        "top1 {:.2}%  top5 {:.2}%  loss {:.4}  balanced top1 {:.2}%  macro F1 {:.4}\n",
        100.0 * report.top1,
        100.0 * report.top5,
        report.loss,
        100.0 * report.balanced_top1,
        report.macro_f1,
    );
    let w = classes.iter().map(|c| c.len()).max().unwrap_or(5).max(5);
    println!(
        "{:<w$}  {:>8}  {:>9}  {:>6}  {:>6}",
        "class", "accuracy", "precision", "F1", "count"
    );
    for c in &report.per_class {
        println!(
            "{:<w$}  {:>7.2}%  {:>8.2}%  {:>6.4}  {:>6}",
            c.class,
            100.0 * c.accuracy,
            100.0 * c.precision,
            c.f1,
            c.count
        );
    }
    println!("\nconfusion matrix (rows: true class, columns: predicted)");
    let cw = report
        .confusion
        .iter()
        .flatten()
        .map(|v| v.to_string().len())
        .max()
        .unwrap_or(1)
        .max(3);
    print!("{:<w$} ", "");
    for i in 0..classes.len() {
        print!(" {:>cw$}", i);
    }
    println!();
    for (i, row) in report.confusion.iter().enumerate() {
        print!("{:<w$} ", format!("{i} {}", classes[i]));
        for v in row {
            print!(" {v:>cw$}");
        }
        println!();
    }
    Ok(())
}
