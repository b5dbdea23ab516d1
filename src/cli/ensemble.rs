//! `convlab ensemble`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use convlab::pipeline::ensemble::ensemble;
use convlab::run::RunDir;

use super::{DataArgs, RuntimeArgs, device};
use convlab::recipe::RunRecipe;

#[derive(Args, Debug)]
pub struct EnsembleArgs {
    /// Run folders whose softmax outputs are averaged.
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Evaluate on this dataset's held-out split (default: the first run's).
    #[command(flatten)]
    pub data: DataArgs,
    /// Weights of the members, comma-separated (default: equal).
    #[arg(long, value_delimiter = ',')]
    pub weights: Option<Vec<f64>>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(a: EnsembleArgs) -> Result<()> {
    device::set_threads(a.runtime.threads)?;
    let dev = device::pick(&a.runtime.device)?;
    let data = if a.data.data.is_some() || a.data.data_format.is_some() {
        let mut d = RunDir::open(&a.runs[0])?.read_recipe()?.data;
        d.path = a.data.data.clone();
        d.format = a.data.data_format;
        d.limit_val = None;
        Some(d)
    } else {
        None
    };
    let r = ensemble(&a.runs, a.weights.as_deref(), data, &dev)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("{} images", r.count);
    for m in &r.members {
        println!(
            "  {:6.2}% top1  {:6.2}% top5  weight {:.2}  {} ({})",
            100.0 * m.top1,
            100.0 * m.top5,
            m.weight,
            m.run,
            m.model
        );
    }
    println!(
        "ensemble: {:.2}% top1  {:.2}% top5  (best member {:.2}% top1)",
        100.0 * r.top1,
        100.0 * r.top5,
        100.0 * r.best_member_top1
    );
    Ok(())
}
