//! `convlab predict`.

use std::path::PathBuf;

use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use convlab::data::Dataset;
use convlab::data::image_folder::{self, ImageFolder};
use convlab::eval::tta::{Tta, probabilities};
use convlab::pipeline::{load_model, view_loader};
use convlab::run::RunDir;
use serde::Serialize;

use super::eval::{Which, parse_tta};
use super::{RuntimeArgs, device};
use convlab::recipe::RunRecipe;

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Run folder written by `convlab train`.
    #[arg(long)]
    pub run: PathBuf,
    /// Image files to classify, and folders: every image under a folder, at any depth.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Checkpoint to load: the best validation epoch's, or the last epoch's.
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint: Which,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100000))]
    pub top: usize,
    /// Test-time augmentation: center (one crop), flip (+ mirror), ten-crop (corners, centre
    /// and their mirrors), multi-scale (whole image at each of the recipe's `eval.scales`, and
    /// mirrors); the probabilities are the views' mean. Default: the recipe's `eval.tta`.
    #[arg(long, value_parser = parse_tta)]
    pub tta: Option<Tta>,
    /// Images decoded and classified at a time: the memory bound, whatever the number of
    /// images (results are printed batch by batch).
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub batch: usize,
    /// Print a JSON array.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Serialize)]
struct Guess {
    class: String,
    index: usize,
    probability: f64,
}

#[derive(Serialize)]
struct Prediction {
    image: String,
    /// Absent when the image could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    top: Option<Vec<Guess>>,
    /// Why the image could not be classified (then `top` is absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The files named, with each folder replaced by the images under it.
fn expand(args: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for p in args {
        if p.is_dir() {
            let mut warnings = Vec::new();
            files.extend(image_folder::images_under(p, &mut warnings)?);
            for w in warnings {
                eprintln!("warning: {w}");
            }
        } else {
            files.push(p.clone());
        }
    }
    Ok(files)
}

pub fn run(a: PredictArgs) -> Result<()> {
    device::set_threads(a.runtime.threads)?;
    let dev = device::pick(&a.runtime.device)?;
    let run = RunDir::open(&a.run)?;
    let mut recipe = run.read_recipe()?;
    let classes = run.read_classes()?;
    let model = load_model(&run, &recipe, a.checkpoint.as_str(), &dev)?;
    let p = device::precision(recipe.precision, &dev, "the run's precision");
    let model = model.with_precision(p);
    let tta = a.tta.unwrap_or(recipe.eval.tta);
    let views = recipe.eval.views(tta, recipe.model.input_size);
    // The evaluation loaders of `convlab eval`, over one batch of files at a time: a file
    // that does not decode is skipped and reported in its place, nothing is cached.
    recipe.batch_size = a.batch;
    recipe.data.skip_bad_images = true;
    recipe.data.cache_mb = 0;
    let images = expand(&a.images)?;
    let k = classes.len();
    let (mut count, mut failed, mut errors) = (0usize, 0usize, Vec::new());
    if a.json {
        println!("[");
    }
    for chunk in images.chunks(a.batch) {
        let data: Arc<dyn Dataset> = Arc::new(ImageFolder {
            files: chunk.to_vec(),
            labels: vec![0; chunk.len()],
        });
        let make = |size, view| view_loader(&recipe, data.clone(), size, view);
        let probs = match probabilities(&model, k, chunk.len(), &views, &make, &dev) {
            Ok(p) => p,
            Err(e) => {
                // What was printed stays valid JSON: close the array before the error.
                if a.json {
                    println!("\n]");
                }
                return Err(e.into());
            }
        };
        for (i, path) in chunk.iter().enumerate() {
            let image = path.display().to_string();
            let pred = if probs.seen[i] {
                let row = &probs.probs[i * k..(i + 1) * k];
                let mut order: Vec<usize> = (0..k).collect();
                order.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
                let top = order
                    .into_iter()
                    .take(a.top)
                    .map(|i| Guess {
                        class: classes[i].clone(),
                        index: i,
                        probability: row[i] as f64,
                    })
                    .collect();
                Prediction {
                    image,
                    top: Some(top),
                    error: None,
                }
            } else {
                let why = probs
                    .skipped
                    .iter()
                    .find(|(source, _)| *source == image)
                    .map_or_else(|| format!("{image}: not decoded"), |(_, why)| why.clone());
                failed += 1;
                if errors.len() < 5 {
                    errors.push(why.clone());
                }
                Prediction {
                    image,
                    top: None,
                    error: Some(why),
                }
            };
            show(&pred, a.json, count == 0)?;
            count += 1;
        }
    }
    if a.json {
        println!("\n]");
    }
    if failed > 0 {
        anyhow::bail!(
            "{failed} of {count} images could not be classified: {}{}",
            errors.join("; "),
            if failed > 5 { "; ..." } else { "" }
        );
    }
    Ok(())
}

/// Prints one prediction: as an element of the JSON array (`first` opens it), or as lines.
fn show(p: &Prediction, json: bool, first: bool) -> Result<()> {
    if json {
        let element = serde_json::to_string_pretty(p)?;
        let element = element.replace('\n', "\n  ");
        print!("{}  {element}", if first { "" } else { ",\n" });
        return Ok(());
    }
    println!("{}", p.image);
    match (&p.top, &p.error) {
        (Some(top), _) => {
            for g in top {
                println!("  {:6.2}%  {}", 100.0 * g.probability, g.class);
            }
        }
        (None, Some(e)) => println!("  error: {e}"),
        (None, None) => {}
    }
    Ok(())
}
