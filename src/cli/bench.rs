//! `convlab bench`.

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};
use convlab::bench::{self, Mode};
use convlab::models::{ModelConfig, ModelName};
use serde::Serialize;

use super::device;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum What {
    /// Forward, loss, backward and optimiser update.
    Train,
    /// Forward only, eval mode.
    Infer,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[arg(value_enum)]
    pub what: What,
    #[arg(long, default_value = "bench-vgg")]
    pub model: String,
    /// Input as CxHxW (H = W).
    #[arg(long, default_value = "3x32x32")]
    pub input: String,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Timed steps (after 3 warm-up steps).
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[arg(long, default_value_t = 10)]
    pub classes: usize,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    model: String,
    input: String,
    batch: usize,
    threads: usize,
    device: String,
    images_per_sec: f64,
    ms_per_step: f64,
    peak_rss_mb: Option<f64>,
    gflops_per_sec: f64,
}

fn parse_input(s: &str) -> Result<(usize, usize)> {
    let parts: Vec<usize> = s
        .split('x')
        .map(|p| p.parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("--input {s}: expected CxHxW, e.g. 3x32x32"))?;
    match parts.as_slice() {
        [c, h, w] if h == w && (*c == 1 || *c == 3) => Ok((*c, *h)),
        _ => bail!("--input {s}: expected CxHxW with C 1 or 3 and H = W"),
    }
}

pub fn run(a: BenchArgs) -> Result<()> {
    device::set_threads(a.threads)?;
    let (c, s) = parse_input(&a.input)?;
    let mut cfg = ModelConfig::for_model(ModelName::from_name(&a.model)?, a.classes, c);
    cfg.input_size = s;
    let base = device::pick(&a.device)?;
    let (mode, dev) = match a.what {
        What::Train => (Mode::Train, base.autodiff()),
        What::Infer => (Mode::Infer, base),
    };
    let t = bench::run(&cfg, mode, a.batch, 3, a.steps.max(1), &dev)?;
    let (ips, slowest, fastest) = t.images_per_sec();
    // A backward pass costs about twice the forward pass.
    let flops = cfg.flops() * a.batch as f64 * if mode == Mode::Train { 3.0 } else { 1.0 };
    let r = Report {
        model: a.model.clone(),
        input: a.input.clone(),
        batch: a.batch,
        threads: rayon::current_num_threads(),
        device: a.device.clone(),
        images_per_sec: ips,
        ms_per_step: 1e3 * t.median(),
        peak_rss_mb: bench::peak_rss_mb(),
        gflops_per_sec: flops / t.median() / 1e9,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "{} {:?} {} batch {} on {} ({} threads): {:.1} img/s median (slowest step {:.1}, \
             fastest {:.1}), {:.1} ms/step, {:.1} GFLOP/s, peak RSS {}",
            r.model,
            a.what,
            r.input,
            r.batch,
            r.device,
            r.threads,
            ips,
            slowest,
            fastest,
            r.ms_per_step,
            r.gflops_per_sec,
            r.peak_rss_mb.map_or("n/a".into(), |m| format!("{m:.0} MB"))
        );
    }
    Ok(())
}
