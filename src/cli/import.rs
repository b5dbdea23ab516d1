//! `convlab import`: a PyTorch or safetensors state dict in, an ordinary run folder out.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use convlab::data::norm::NormStats;
use convlab::interop::{self, IMAGENET_MEAN, IMAGENET_STD, Naming};
use convlab::models::{ModelConfig, ModelName, param_count};
use convlab::recipe::Recipe;
use convlab::run::{CLASSES, RunDir, STATS, SUMMARY, Summary};

use super::{RuntimeArgs, device};
use convlab::recipe::RunRecipe;

#[derive(Args, Debug)]
pub struct ImportArgs {
    /// State dict: PyTorch `.pth`/`.pt` (zip or legacy pickle, optionally nested under
    /// `state_dict`/`model`) or `.safetensors`.
    pub weights: PathBuf,
    /// The convlab model the weights are for (see `convlab models`).
    #[arg(long)]
    pub model: String,
    /// Run folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Class names, one a line (default: class_0 .. class_{N-1} from the classifier's size).
    #[arg(long)]
    pub classes: Option<PathBuf>,
    /// Input side the weights were trained at (default: the model's, 224 for ImageNet models).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(8..=1024))]
    pub input_size: Option<usize>,
    /// Per-channel mean of the training images in [0, 1] (default: ImageNet's).
    #[arg(
        long,
        value_delimiter = ',',
        requires = "std",
        allow_hyphen_values = true
    )]
    pub mean: Option<Vec<f32>>,
    /// Per-channel std (default: ImageNet's).
    #[arg(long, value_delimiter = ',', requires = "mean")]
    pub std: Option<Vec<f32>>,
    /// Key naming (default: detected from the keys).
    #[arg(long, value_enum)]
    pub format: Option<Naming>,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

fn three(flag: &str, v: Option<Vec<f32>>, default: [f32; 3], positive: bool) -> Result<Vec<f32>> {
    let v = v.unwrap_or_else(|| default.to_vec());
    if v.len() != 3 || v.iter().any(|x| !x.is_finite() || (positive && *x <= 0.0)) {
        bail!(
            "{flag} {:?}: expected three finite values R,G,B{}",
            v,
            if positive { " > 0" } else { "" }
        );
    }
    Ok(v)
}

pub fn run(a: ImportArgs) -> Result<()> {
    device::set_threads(a.runtime.threads)?;
    let dev = device::pick(&a.runtime.device)?;
    let name = ModelName::from_name(&a.model)?;
    let mean = three("--mean", a.mean.clone(), IMAGENET_MEAN, false)?;
    let std = three("--std", a.std.clone(), IMAGENET_STD, true)?;
    let input_size = a.input_size.unwrap_or(name.default_input_size());
    // Everything is read and checked before anything is written.
    let sd = interop::read_state_dict(&a.weights)?;
    let format = sd.format;
    let naming = a.format.unwrap_or_else(|| interop::detect_naming(&sd));
    let probe = ModelConfig {
        input_size,
        ..ModelConfig::for_model(name, 2, 3)
    };
    let k = interop::source_classes(&probe, naming, &sd, &dev)?;
    let classes: Vec<String> = match &a.classes {
        Some(f) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("{}", f.display()))?;
            let names: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect();
            if names.len() != k {
                bail!(
                    "{}: {} class names, but the classifier of {} has {k} outputs",
                    f.display(),
                    names.len(),
                    a.weights.display()
                );
            }
            names
        }
        None => (0..k).map(|c| format!("class_{c}")).collect(),
    };
    let cfg = ModelConfig {
        num_classes: k,
        ..probe
    };
    let loaded = interop::load_weights(&cfg, sd, Some(naming), &dev)?;
    let mut recipe = Recipe {
        model: cfg,
        ..Recipe::default()
    };
    recipe.data.mean = Some(mean.clone());
    recipe.data.std = Some(std.clone());
    // torchvision's evaluation transform: shorter side to 256/224 of the input, centre crop.
    recipe.eval.resize = (input_size * 256).div_ceil(224);
    recipe.validate()?;

    let created = !a.out.exists();
    let run = RunDir::create(&a.out)?.lock()?;
    let existing = run.existing_run_files();
    if !existing.is_empty() {
        bail!(
            "{} already holds a run ({}); import into a new folder",
            a.out.display(),
            existing.join(", ")
        );
    }
    let write = || -> convlab::Result<()> {
        run.write_recipe(&recipe)?;
        run.write_json(CLASSES, &classes)?;
        run.write_json(
            STATS,
            &NormStats {
                mean: mean.clone(),
                std: std.clone(),
                pca: None,
                images: 0,
            },
        )?;
        let weights = convlab::checkpoint::module_device_tensors(&loaded.model);
        let meta = std::collections::HashMap::from([
            ("epoch".to_string(), "0".to_string()),
            ("imported_from".to_string(), a.weights.display().to_string()),
            ("naming".to_string(), naming.as_str().to_string()),
        ]);
        // One file under both names (as the trainer keeps an epoch's checkpoints).
        let entries = convlab::checkpoint::device_entries("model", &weights);
        convlab::checkpoint::save_entries(&run.checkpoint("best"), entries, meta)?;
        convlab::helpers::link_atomic(&run.checkpoint("best"), &run.checkpoint("last"))?;
        run.write_json(
            SUMMARY,
            &Summary {
                model: name.to_string(),
                params: param_count(&loaded.model),
                epochs: 0,
                best_val_top1: 0.0,
                best_epoch: 0,
                best_metric: "val_top1".into(),
                final_val_top1: 0.0,
                final_val_top5: 0.0,
                final_val_balanced_top1: 0.0,
                final_val_macro_f1: 0.0,
                final_val_loss: 0.0,
                seconds: 0.0,
                images_skipped: 0,
                imported_from: Some(a.weights.display().to_string()),
            },
        )
    };
    if let Err(e) = write() {
        if created {
            let _ = std::fs::remove_dir_all(&a.out);
        } else {
            let _ = run.clear();
        }
        return Err(e.into());
    }
    println!(
        "imported {} ({format}, {} naming): {} tensors into {name} with {k} classes, input \
         {input_size} px, mean {:?} std {:?}",
        a.weights.display(),
        naming.as_str(),
        loaded.tensors,
        mean,
        std
    );
    println!("run folder: {}", run.path.display());
    Ok(())
}
