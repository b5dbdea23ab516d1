//! `convlab export`: a run's model out, as a PyTorch state dict (torchvision, timm or convlab
//! naming) or an ONNX graph, with a JSON beside it saying how to preprocess its input.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use convlab::interop::Naming;
use convlab::interop::export::{into_state_dict, write_state_dict};
use convlab::pipeline::{load_model, norm_stats};
use convlab::run::RunDir;
use serde::Serialize;

use super::eval::Which;
use super::{RuntimeArgs, device};
use convlab::recipe::RunRecipe;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// torchvision's `state_dict()` keys (`.pth`, `.pt` or `.safetensors`).
    Torchvision,
    /// timm's keys: the ResNets and `resnet50_d` (timm's `resnet50d`).
    Timm,
    /// convlab's own keys, as `.safetensors` (what `convlab import --format convlab` reads).
    Safetensors,
    /// An ONNX inference graph (opset 17, dynamic batch).
    Onnx,
}

impl ExportFormat {
    fn as_str(self) -> &'static str {
        match self {
            ExportFormat::Torchvision => "torchvision",
            ExportFormat::Timm => "timm",
            ExportFormat::Safetensors => "safetensors",
            ExportFormat::Onnx => "onnx",
        }
    }
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Run folder (trained, resumed, fine-tuned or made by `convlab import`).
    pub run: PathBuf,
    /// What to write: a state dict in torchvision's, timm's or convlab's naming, or an ONNX graph.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// File to write: `.pth`/`.pt`/`.safetensors` for state dicts, `.onnx` for ONNX. The
    /// preprocessing JSON goes beside it as `FILE.json`.
    #[arg(long)]
    pub out: PathBuf,
    /// Checkpoint to export: the best validation epoch's, or the last epoch's.
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint: Which,
    /// Also write `FILE.sample.safetensors`: a fixed input batch (`input`, 2 images already
    /// normalised) and the logits convlab computes for it (`logits`), so the runtime that
    /// reads the export can check it reproduces convlab's numbers.
    #[arg(long)]
    pub sample: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// What a consumer needs to feed the exported model exactly as convlab did (`FILE.json`).
#[derive(Serialize)]
struct Preprocess {
    model: String,
    format: &'static str,
    /// The file this describes.
    file: String,
    num_classes: usize,
    classes: Vec<String>,
    /// `[channels, height, width]` of one input.
    input_size: [usize; 3],
    /// `NCHW`, float32.
    layout: &'static str,
    /// `RGB` (3 channels) or `L` (grey).
    channel_order: &'static str,
    /// Pixels are scaled to [0, 1] (`/ 255`), then `(x - mean) / std` per channel.
    scale: f32,
    mean: Vec<f32>,
    std: Vec<f32>,
    /// Shorter side resized to this (px), then the centre `input_size` crop.
    resize: usize,
    interpolation: String,
    /// Only for ONNX: the graph's input and output names and opset.
    #[serde(skip_serializing_if = "Option::is_none")]
    onnx: Option<OnnxInfo>,
    /// Only for torchvision: the builder arguments that accept this state dict.
    #[serde(skip_serializing_if = "Option::is_none")]
    torchvision: Option<BTreeMap<String, serde_json::Value>>,
    /// Only for timm: `timm.create_model` arguments that accept this state dict.
    #[serde(skip_serializing_if = "Option::is_none")]
    timm: Option<BTreeMap<String, serde_json::Value>>,
    source_run: String,
    checkpoint: String,
}

#[derive(Serialize)]
struct OnnxInfo {
    input: &'static str,
    output: &'static str,
    opset: i64,
    batch: &'static str,
}

/// A fixed batch of 2 inputs (a smooth pattern in normalised units, about -2..2) and convlab's
/// logits for it, as the tensors of `FILE.sample.safetensors`.
fn sample(
    model: &convlab::models::Model,
    chw: [usize; 3],
    dev: &burn::prelude::Device,
) -> Result<convlab::interop::export::ForeignDict> {
    use burn::prelude::*;
    let [c, h, w] = chw;
    let n = 2 * c * h * w;
    let x: Vec<f32> = (0..n)
        .map(|i| 2.0 * ((i as f32) * 0.0137).sin() * ((i % 7) as f32 / 7.0 + 0.3))
        .collect();
    let t = Tensor::<4>::from_data(TensorData::new(x.clone(), [2, c, h, w]), dev);
    let y = model.forward(t);
    let k = y.dims()[1];
    let logits: Vec<f32> = y
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .map_err(|e| anyhow::anyhow!("logits: {e:?}"))?;
    use convlab::interop::export::{ForeignDict, ForeignTensor, Values};
    let tensor = |shape: Vec<usize>, v: Vec<f32>| ForeignTensor {
        shape,
        values: Values::F32(v),
    };
    Ok(ForeignDict::from([
        ("input".to_string(), tensor(vec![2, c, h, w], x)),
        ("logits".to_string(), tensor(vec![2, k], logits)),
    ]))
}

fn extension(p: &Path) -> String {
    p.extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

pub fn run(a: ExportArgs) -> Result<()> {
    device::set_threads(a.runtime.threads)?;
    let dev = device::pick(&a.runtime.device)?;
    let ext = extension(&a.out);
    let ok = match a.format {
        ExportFormat::Onnx => ext == "onnx",
        ExportFormat::Safetensors => ext == "safetensors",
        _ => matches!(ext.as_str(), "pth" | "pt" | "safetensors"),
    };
    if !ok {
        bail!(
            "--out {}: --format {} writes {}",
            a.out.display(),
            a.format.as_str(),
            match a.format {
                ExportFormat::Onnx => "a .onnx file",
                ExportFormat::Safetensors => "a .safetensors file",
                _ => "a .pth, .pt or .safetensors file",
            }
        );
    }
    if a.out.is_dir() {
        bail!("--out {}: is a folder; give a file name", a.out.display());
    }
    if let Some(parent) = a.out.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.is_dir()
    {
        bail!(
            "--out {}: folder {} does not exist",
            a.out.display(),
            parent.display()
        );
    }
    let run = RunDir::open(&a.run)?;
    let recipe = run.read_recipe()?;
    let classes = run.read_classes()?;
    let name = recipe.model.name;
    let which = a.checkpoint.as_str();
    let model = load_model(&run, &recipe, which, &dev)?;
    let stats = norm_stats(&recipe);
    let c = recipe.model.in_channels;
    let size = recipe.model.input_size;
    let resize = if recipe.eval.resize == 0 {
        size
    } else {
        recipe.eval.resize
    };
    let mut info = Preprocess {
        model: name.to_string(),
        format: a.format.as_str(),
        file: a
            .out
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        num_classes: classes.len(),
        classes: classes.clone(),
        input_size: [c, size, size],
        layout: "NCHW",
        channel_order: if c == 1 { "L" } else { "RGB" },
        scale: 1.0 / 255.0,
        mean: stats.mean.clone(),
        std: stats.std.clone(),
        resize,
        interpolation: serde_json::to_value(recipe.eval.interpolation)?
            .as_str()
            .unwrap_or("bilinear")
            .to_string(),
        onnx: None,
        torchvision: None,
        timm: None,
        source_run: run.path.display().to_string(),
        checkpoint: which.to_string(),
    };
    // The sample's logits come first: a state-dict export then consumes the model.
    let sample = (a.sample)
        .then(|| sample(&model, [c, size, size], &dev))
        .transpose()?;
    let summary = match a.format {
        ExportFormat::Onnx => {
            let meta = [
                ("convlab_model", name.to_string()),
                ("classes", serde_json::to_string(&classes)?),
                ("mean", serde_json::to_string(&stats.mean)?),
                ("std", serde_json::to_string(&stats.std)?),
            ];
            let proto = model.to_onnx([c, size, size], &meta);
            let nodes = proto.proto().graph.as_ref().map_or(0, |g| g.node.len());
            convlab::helpers::write_atomic_with(&a.out, |tmp| {
                proto.write(std::fs::File::create(tmp)?)
            })?;
            info.onnx = Some(OnnxInfo {
                input: convlab::onnx::INPUT,
                output: convlab::onnx::OUTPUT,
                opset: convlab::onnx::OPSET,
                batch: "dynamic (dim 0, `batch`)",
            });
            format!("{nodes} nodes, opset {}", convlab::onnx::OPSET)
        }
        f => {
            let naming = match f {
                ExportFormat::Torchvision => Naming::Torchvision,
                ExportFormat::Timm => Naming::Timm,
                _ => Naming::Convlab,
            };
            if naming == Naming::Torchvision && c != 3 {
                bail!(
                    "{}: torchvision's {name} takes 3-channel input, this run's model has {c} \
                     (export --format onnx or safetensors, or --format timm, whose models take \
                     in_chans)",
                    run.path.display()
                );
            }
            let googlenet_aux = match &model {
                convlab::models::Model::GoogLeNet(g) => Some(!g.aux.is_empty()),
                _ => None,
            };
            let sd = into_state_dict(model, name, naming)?;
            let meta = BTreeMap::from([
                ("convlab_model".to_string(), name.to_string()),
                ("naming".to_string(), naming.as_str().to_string()),
            ]);
            write_state_dict(&a.out, &sd, &meta)?;
            if f == ExportFormat::Torchvision {
                let mut kw =
                    BTreeMap::from([("num_classes".to_string(), serde_json::json!(classes.len()))]);
                if let Some(aux) = googlenet_aux {
                    kw.insert("aux_logits".into(), serde_json::json!(aux));
                    kw.insert("init_weights".into(), serde_json::json!(false));
                }
                info.torchvision = Some(kw);
            }
            if f == ExportFormat::Timm {
                let timm_name = match name {
                    convlab::models::ModelName::Resnet50D => "resnet50d",
                    other => other.as_str(),
                };
                info.timm = Some(BTreeMap::from([
                    ("model_name".to_string(), serde_json::json!(timm_name)),
                    ("num_classes".to_string(), serde_json::json!(classes.len())),
                    ("in_chans".to_string(), serde_json::json!(c)),
                ]));
            }
            format!("{} tensors, {} naming", sd.len(), naming.as_str())
        }
    };
    let json_path = PathBuf::from(format!("{}.json", a.out.display()));
    let text = serde_json::to_string_pretty(&info)?;
    let mut written = vec![json_path.clone()];
    let mut side = || -> Result<()> {
        convlab::run::write_atomic(&json_path, text.as_bytes())
            .with_context(|| format!("{}", json_path.display()))?;
        if let Some(sd) = &sample {
            let path = PathBuf::from(format!("{}.sample.safetensors", a.out.display()));
            written.push(path.clone());
            convlab::interop::export::write_safetensors(&path, sd, &BTreeMap::new())?;
        }
        Ok(())
    };
    if let Err(e) = side() {
        // Nothing half-written: the export goes with its side files or not at all.
        for p in std::iter::once(&a.out).chain(&written) {
            let _ = std::fs::remove_file(p);
        }
        return Err(e);
    }
    println!(
        "exported {} ({name}, {} classes, input {c}x{size}x{size}) to {} ({summary}); \
         preprocessing in {}",
        run.path.display(),
        classes.len(),
        a.out.display(),
        json_path.display()
    );
    Ok(())
}
