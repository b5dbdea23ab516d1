//! `convlab experiment`.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use convlab::experiment::{Experiment, report, run_cells};
use convlab::pipeline::ensemble::ensemble;

use super::device;

#[derive(Args, Debug)]
pub struct ExperimentArgs {
    /// Experiment file: a base recipe, [[variant]] overrides and seeds.
    pub file: PathBuf,
    /// Folder for the cells and the tables (default: runs/experiments/<name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Cells trained at the same time (sharing the compute threads; for bit-exact
    /// reproduction of a single cell use 1).
    #[arg(long, default_value_t = 1)]
    pub jobs: usize,
    /// Devices, comma-separated; job j trains on device j mod count (e.g. cuda:0,cuda:1).
    #[arg(long, default_value = "cpu", value_delimiter = ',')]
    pub device: Vec<String>,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Only rebuild results.md / results.csv from the finished cells.
    #[arg(long)]
    pub report_only: bool,
}

fn duration(s: f64) -> String {
    let s = s.round() as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

pub fn run(a: ExperimentArgs) -> Result<()> {
    device::set_threads(a.threads)?;
    let exp = Experiment::load(&a.file)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/experiments").join(exp.title()));
    let cells = exp.cells(&out)?;
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let devices = a
        .device
        .iter()
        .map(|d| device::pick(d))
        .collect::<Result<Vec<_>>>()?;
    if !a.report_only {
        let todo = cells
            .iter()
            .filter(|c| !matches!(c.state(), convlab::experiment::CellState::Done(_)))
            .count();
        println!(
            "experiment {}: {} variants x {} seeds = {} cells ({} to run, {} jobs) in {}",
            exp.title(),
            exp.variants.len(),
            exp.seeds.len(),
            cells.len(),
            todo,
            a.jobs,
            out.display()
        );
        let autodiff: Vec<_> = devices.iter().map(|d| d.clone().autodiff()).collect();
        run_cells(&cells, &autodiff, a.jobs, &|d| {
            println!(
                "[{}/{}] {} seed {}: val top1 {:.2}% top5 {:.2}% ({}){}",
                d.done,
                d.total,
                d.cell.variant,
                d.cell.seed,
                100.0 * d.summary.final_val_top1,
                100.0 * d.summary.final_val_top5,
                duration(d.seconds),
                if d.done < d.total {
                    format!(", ETA {}", duration(d.eta))
                } else {
                    String::new()
                }
            );
        })?;
    }
    let mut extra = String::new();
    if let Some(name) = &exp.ensemble {
        let members: Vec<PathBuf> = cells
            .iter()
            .filter(|c| &c.variant == name && c.dir.join(convlab::run::SUMMARY).is_file())
            .map(|c| c.dir.clone())
            .collect();
        if !members.is_empty() {
            let _ = writeln!(
                extra,
                "\n## Ensembles of `{name}` (softmax averaged over the first k seeds)\n\n\
                 | members | top-1 % | top-5 % | mean member top-1 % | best member top-1 % | \
                 gain over mean member | gain over best member |\n\
                 |---|---|---|---|---|---|---|"
            );
            for k in 1..=members.len() {
                let r = ensemble(&members[..k], None, None, &devices[0])?;
                let mean = r.members.iter().map(|m| m.top1).sum::<f64>() / k as f64;
                let _ = writeln!(
                    extra,
                    "| {k} | {:.2} | {:.2} | {:.2} | {:.2} | {:+.2} | {:+.2} |",
                    100.0 * r.top1,
                    100.0 * r.top5,
                    100.0 * mean,
                    100.0 * r.best_member_top1,
                    100.0 * (r.top1 - mean),
                    100.0 * (r.top1 - r.best_member_top1)
                );
            }
        }
    }
    let md = report::write(&exp, &cells, &out, &extra, &devices[0])?;
    println!("\n{md}");
    println!(
        "wrote {}, {} and {}",
        out.join("results.md").display(),
        out.join("results.csv").display(),
        out.join("cells.csv").display()
    );
    Ok(())
}
