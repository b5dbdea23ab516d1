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
    let device = burn::prelude::Device::flex();
    let mut rows = Vec::new();
    for &name in ModelName::ALL {
        let cfg = ModelConfig {
            name,
            num_classes: 10,
            in_channels: if name == ModelName::ConvnetSmall {
                1
            } else {
                3
            },
            input_size: name.default_input_size(),
            ..Default::default()
        };
        let model = cfg.build(&device)?;
        rows.push(Row {
            name: name.to_string(),
            family: name.family().as_str().to_string(),
            params: convlab::models::param_count(&model),
            input_size: cfg.input_size,
            gflops: cfg.flops() / 1e9,
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
