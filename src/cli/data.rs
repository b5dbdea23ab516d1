//! `convlab data stats`.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use convlab::data::{DataFormat, DataSpec, open, stats};

#[derive(Args, Debug)]
pub struct DataCmdArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Subcommand, Debug)]
pub enum DataCommand {
    /// Counts, sizes, modes, mean/std, RGB PCA, duplicates, corrupt files, class granularity.
    Stats(StatsArgs),
}

#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Dataset (same forms as `train --data`); default: the built-in one.
    pub data: Option<PathBuf>,
    /// Override the detected dataset format.
    #[arg(long, value_enum)]
    pub data_format: Option<DataFormat>,
    /// Side to fit photos to for the pixel statistics (default: the data's own, else 32).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    pub size: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: DataCmdArgs) -> Result<()> {
    let DataCommand::Stats(a) = a.command;
    let splits = open(&DataSpec {
        path: a.data.clone(),
        format: a.data_format,
        val_fraction: 0.2,
        seed: 0,
        limit_train: None,
        limit_val: None,
    })?;
    let size = a.size.or(splits.native_size).unwrap_or(32);
    let s = stats::compute(
        splits.train.as_ref(),
        splits.val.as_ref(),
        &splits.classes,
        splits.channels,
        size,
    )?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "{} training images ({} format), statistics at {size}x{size}, {} channel(s)\n",
        s.images,
        serde_json::to_value(splits.format)?.as_str().unwrap_or("?"),
        splits.channels
    );
    let w = s
        .classes
        .iter()
        .map(|c| c.class.len())
        .max()
        .unwrap_or(5)
        .max(5);
    println!("{:<w$}  {:>7}  {:>7}", "class", "train", splits.val_name);
    for c in &s.classes {
        println!("{:<w$}  {:>7}  {:>7}", c.class, c.train, c.val);
    }
    println!(
        "imbalance ratio (largest / smallest class, train): {:.1}{}",
        s.imbalance_ratio,
        if s.imbalance_ratio >= 10.0 {
            "; see `loss.class_weights` and `data.sampler` (README, \"Recipes and training tricks\")"
        } else {
            ""
        }
    );
    let hist = |m: &std::collections::BTreeMap<String, usize>| {
        m.iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("\nsizes: {}", hist(&s.sizes));
    println!("modes: {}", hist(&s.modes));
    println!("mean: {:.4?}  std: {:.4?}", s.mean, s.std);
    if !s.pca_eigenvalues.is_empty() {
        println!("RGB PCA eigenvalues: {:.6?}", s.pca_eigenvalues);
        println!("RGB PCA eigenvectors (columns): {:.4?}", s.pca_eigenvectors);
    }
    println!("duplicates: {}  corrupt: {}", s.duplicates, s.corrupt);
    let g = &s.granularity;
    println!(
        "\nclass granularity (pixel space): intra-class variance {:.3}, inter-class variance {:.3}, \
         ratio {:.4}",
        g.intra_class_variance, g.inter_class_variance, g.ratio
    );
    println!("nearest class pairs (distance between class means):");
    for p in &g.nearest_pairs {
        println!("  {:.3}  {} - {}", p.distance, p.a, p.b);
    }
    Ok(())
}
