//! `convlab models`.

use anyhow::Result;
use clap::Args;
use convlab::models::{ModelConfig, ModelName};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct ModelsArgs {
    /// Print a JSON array of {name, family, params, input_size, gflops}.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Row {
    name: String,
    family: String,
    params: usize,
    input_size: usize,
    gflops: f64,
}

pub fn run(a: ModelsArgs) -> Result<()> {
    // Models are built for their shapes only (never initialised): any compiled-in backend does.
    let device = super::device::first_available()?;
    let mut rows = Vec::new();
    for &name in ModelName::ALL {
        // Full-size models at ImageNet's 1000 classes, small ones at 10 (their datasets');
        // grey input only for the default model, whose built-in data is grey.
        let classes = if name.is_small() { 10 } else { 1000 };
        let channels = if name == ModelName::ConvnetSmall {
            1
        } else {
            3
        };
        let cfg = ModelConfig::for_model(name, classes, channels);
        let model = cfg.build(&device)?;
        rows.push(Row {
            name: name.to_string(),
            family: name.family().as_str().to_string(),
            params: convlab::models::param_count(&model),
            input_size: cfg.input_size,
            gflops: model
                .trace([channels, cfg.input_size, cfg.input_size])
                .flops()
                / 1e9,
        });
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "{:<16} {:<10} {:>12} {:>6} {:>8}",
            "name", "family", "params", "input", "GFLOPs"
        );
        for r in rows {
            println!(
                "{:<16} {:<10} {:>12} {:>6} {:>8.4}",
                r.name, r.family, r.params, r.input_size, r.gflops
            );
        }
    }
    Ok(())
}
