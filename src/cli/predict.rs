//! `convlab predict`.

use std::path::PathBuf;

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use clap::Args;
use convlab::data::image_folder::{self, decode_file};
use convlab::pipeline::{load_model, transform};
use convlab::run::RunDir;
use rayon::prelude::*;
use serde::Serialize;

use super::eval::Which;
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
    let recipe = run.read_recipe()?;
    let classes = run.read_classes()?;
    let model = load_model(&run, &recipe, a.checkpoint.as_str(), &dev)?;
    let p = device::precision(recipe.precision, &dev, "the run's precision");
    let model = model.with_precision(p);
    let t = transform(&recipe, false);
    let images = expand(&a.images)?;
    let k = classes.len();
    let (mut count, mut failed, mut errors) = (0usize, 0usize, Vec::new());
    if a.json {
        println!("[");
    }
    for chunk in images.chunks(a.batch) {
        // Each image on its own: a bad file is reported in its place and the others still are.
        let decoded: Vec<std::result::Result<Vec<f32>, String>> = chunk
            .par_iter()
            .map(|path| {
                decode_file(path, t.channels)
                    .map(|img| {
                        let mut out = vec![0f32; t.sample_len()];
                        t.apply(img, None, &mut out);
                        out
                    })
                    .map_err(|e| e.to_string())
            })
            .collect();
        let good: Vec<&Vec<f32>> = decoded.iter().filter_map(|d| d.as_ref().ok()).collect();
        let mut probs: Vec<f32> = Vec::new();
        if !good.is_empty() {
            let input: Vec<f32> = good.iter().flat_map(|v| v.iter().copied()).collect();
            let x = Tensor::<4>::from_data(
                TensorData::new(input, [good.len(), t.channels, t.size, t.size]),
                &dev,
            );
            probs = softmax(model.forward(x), 1)
                .into_data()
                .convert::<f32>()
                .try_to_vec()
                .expect("f32");
        }
        let mut rows = probs.chunks_exact(k);
        for (path, d) in chunk.iter().zip(&decoded) {
            let pred = match d {
                Err(e) => {
                    failed += 1;
                    if errors.len() < 5 {
                        errors.push(e.clone());
                    }
                    Prediction {
                        image: path.display().to_string(),
                        top: None,
                        error: Some(e.clone()),
                    }
                }
                Ok(_) => {
                    let row = rows.next().expect("one row per decoded image");
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
                        image: path.display().to_string(),
                        top: Some(top),
                        error: None,
                    }
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
