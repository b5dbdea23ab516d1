//! `convlab analyze` and `convlab report`.

use std::path::PathBuf;

use anyhow::Result;
use burn::module::Module;
use clap::Args;
use convlab::data::open;
use convlab::eval::separation::analyze;
use convlab::pipeline::{load_model, view_loader};
use convlab::report::{MAX_IMAGES, write_report};
use convlab::run::RunDir;

use super::eval::Which;
use super::{RuntimeArgs, device};
use convlab::recipe::RunRecipe;

#[derive(Args, Debug)]
pub struct AnalyzeArgs {
    /// Run folder written by `convlab train`.
    pub run: PathBuf,
    /// Validation images used (a stratified subset of the split).
    #[arg(long, default_value_t = MAX_IMAGES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000000))]
    pub images: usize,
    /// Checkpoint to load: the best validation epoch's, or the last epoch's.
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint: Which,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn run(a: AnalyzeArgs) -> Result<()> {
    device::set_threads(a.runtime.threads)?;
    let dev = device::pick(&a.runtime.device)?;
    let run = RunDir::open(&a.run)?;
    let recipe = run.read_recipe()?;
    let classes = run.read_classes()?;
    let mut spec = recipe.data.spec(recipe.seed);
    // The run's own limit, capped.
    spec.limit_val = Some(spec.limit_val.map_or(a.images, |l| l.min(a.images)));
    let splits = open(&spec)?;
    let model = load_model(&run, &recipe, a.checkpoint.as_str(), &dev)?.valid();
    let size = recipe.model.input_size;
    let loader = view_loader(&recipe, splits.val.clone(), size, recipe.eval.single())?;
    let r = analyze(&model, &loader, &classes, &dev)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "{} on {} validation images: top-1 {:.2}%\n",
        run.path.display(),
        r.images,
        100.0 * r.top1
    );
    let w = r
        .layers
        .iter()
        .map(|l| l.layer.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!(
        "{:<w$}  {:>8}  {:>12}  {:>12}  {:>8}  {:>16}",
        "layer", "channels", "intra-class", "inter-class", "ratio", "nearest-centroid"
    );
    for l in &r.layers {
        println!(
            "{:<w$}  {:>8}  {:>12.4}  {:>12.4}  {:>8.3}  {:>15.2}%",
            l.layer,
            l.channels,
            l.intra_class_variance,
            l.inter_class_variance,
            l.ratio,
            100.0 * l.nearest_centroid_top1
        );
    }
    println!("\nmost confused pairs (a predicted as b, b as a):");
    for p in &r.confused_pairs {
        println!("  {} / {}: {} / {}", p.a, p.b, p.a_as_b, p.b_as_a);
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Run folder written by `convlab train`.
    pub run: PathBuf,
    /// HTML file to write (default: RUN/report.html).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

pub fn report(a: ReportArgs) -> Result<()> {
    device::set_threads(a.runtime.threads)?;
    let dev = device::pick(&a.runtime.device)?.autodiff();
    let run = RunDir::open(&a.run)?;
    let path = write_report(&run, a.out.as_deref(), &dev)?;
    println!("{}", path.display());
    Ok(())
}
