//! `convlab eval`.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use convlab::data::open;
use convlab::eval::evaluate;
use convlab::run::RunDir;
use convlab::train::trainer::{load_model, loader};

use super::{DataArgs, RuntimeArgs, device};

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
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint: Which,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
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
    let model = load_model(&run, &recipe, a.checkpoint.as_str(), &dev)?;
    let val = loader(&recipe, splits.val.clone(), false)?;
    let (report, skipped) = evaluate(&model, &val, &classes, &dev)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
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
    println!(
        "top1 {:.2}%  top5 {:.2}%  loss {:.4}\n",
        100.0 * report.top1,
        100.0 * report.top5,
        report.loss
    );
    let w = classes.iter().map(|c| c.len()).max().unwrap_or(5).max(5);
    println!("{:<w$}  {:>8}  {:>6}", "class", "accuracy", "count");
    for c in &report.per_class {
        println!(
            "{:<w$}  {:>7.2}%  {:>6}",
            c.class,
            100.0 * c.accuracy,
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
