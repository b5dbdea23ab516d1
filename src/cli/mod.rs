//! Subcommands. Each file holds one subcommand's arguments and its `run`.

mod analyze;
mod bench;
mod data;
mod device;
mod ensemble;
mod eval;
mod experiment;
mod export;
mod import;
mod models;
mod predict;
mod progress;
mod train;
mod viz;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use convlab::data::DataFormat;

/// Train, evaluate and inspect classic CNN image classifiers.
#[derive(Parser, Debug)]
#[command(name = "convlab", version, about, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model (default: convnet_small on the built-in Fashion-MNIST split).
    Train(train::TrainArgs),
    /// Evaluate a trained run: top-1, top-5, loss, per-class accuracy, confusion matrix.
    Eval(eval::EvalArgs),
    /// Classify image files with a trained run.
    Predict(predict::PredictArgs),
    /// List the registered models.
    Models(models::ModelsArgs),
    /// Measure training or inference throughput on random inputs.
    Bench(bench::BenchArgs),
    /// Dataset tools.
    Data(data::DataCmdArgs),
    /// Average the softmax outputs of several runs and compare with each member.
    Ensemble(ensemble::EnsembleArgs),
    /// Run an ablation grid (variants x seeds) and tabulate mean +- std per variant.
    Experiment(experiment::ExperimentArgs),
    /// Pictures of a trained run: filters, activations, top patches, deconv, saliency,
    /// Grad-CAM, occlusion, evolution (PNG files).
    Viz(viz::VizArgs),
    /// Class separation per layer (intra/inter-class variance, nearest-centroid accuracy)
    /// and the most confused class pairs.
    Analyze(analyze::AnalyzeArgs),
    /// Write one self-contained HTML report of a run.
    Report(analyze::ReportArgs),
    /// Turn a PyTorch or safetensors state dict (torchvision, timm or convlab naming) into a
    /// run folder that eval, predict, viz, report, ensemble and --pretrained read.
    Import(import::ImportArgs),
    /// Write a run's model as a torchvision/timm/convlab state dict (.pth, .safetensors) or an
    /// ONNX graph, with its preprocessing in FILE.json.
    Export(export::ExportArgs),
}

/// Options shared by every command that runs a model.
#[derive(Args, Debug, Clone)]
pub struct RuntimeArgs {
    /// Compute device: cpu (= flex), flex, or with the matching cargo feature cuda[:N], wgpu,
    /// tch, tch-cuda[:N].
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Compute threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Where data comes from (for commands that read a dataset).
#[derive(Args, Debug, Clone)]
pub struct DataArgs {
    /// Dataset: an ImageFolder, CIFAR-10/100 binary or IDX directory, a folder with
    /// train.csv/labels.csv or one .csv label list (default: built-in).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Override the detected dataset format.
    #[arg(long, value_enum)]
    pub data_format: Option<DataFormat>,
}

pub fn run(cli: Cli) -> Result<()> {
    // Checked before any work: a misspelt value would otherwise quietly run the default kernels.
    let kernels = convlab::kernels::parse_kernels(std::env::var("CONVLAB_KERNELS").ok().as_deref())
        .map_err(anyhow::Error::msg)?;
    convlab::kernels::select(kernels);
    let amx = convlab::kernels::parse_amx(std::env::var("CONVLAB_AMX").ok().as_deref())
        .map_err(anyhow::Error::msg)?;
    convlab::kernels::amx::allow(amx);
    let dot =
        convlab::kernels::bf16::parse_policy(std::env::var("CONVLAB_VDPBF16PS").ok().as_deref())
            .map_err(anyhow::Error::msg)?;
    convlab::kernels::bf16::select_policy(dot);
    let activations =
        convlab::kernels::parse_activations(std::env::var("CONVLAB_ACTIVATIONS").ok().as_deref())
            .map_err(anyhow::Error::msg)?;
    convlab::kernels::select_activations(activations);
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Models(a) => models::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Data(a) => data::run(a),
        Command::Ensemble(a) => ensemble::run(a),
        Command::Experiment(a) => experiment::run(a),
        Command::Viz(a) => viz::run(a),
        Command::Analyze(a) => analyze::run(a),
        Command::Report(a) => analyze::report(a),
        Command::Import(a) => import::run(a),
        Command::Export(a) => export::run(a),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every flag and positional of every subcommand says what it does in `--help`: a user
    /// meets the CLI through it, and an empty line there was how `--epochs` shipped.
    #[test]
    fn every_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {} (the subcommand)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "convlab", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:?}");
    }
}
