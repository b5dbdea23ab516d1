//! `convlab predict`.

use std::path::PathBuf;

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use clap::Args;
use convlab::data::image_folder::decode_file;
use convlab::pipeline::{load_model, transform};
use convlab::run::RunDir;
use serde::Serialize;

use super::eval::Which;
use super::{RuntimeArgs, device};
use convlab::recipe::RunRecipe;

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Run folder written by `convlab train`.
    #[arg(long)]
    pub run: PathBuf,
    /// Image files to classify.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Checkpoint to load: the best validation epoch's, or the last epoch's.
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint: Which,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100000))]
    pub top: usize,
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

pub fn run(a: PredictArgs) -> Result<()> {
    device::set_threads(a.runtime.threads)?;
    let dev = device::pick(&a.runtime.device)?;
    let run = RunDir::open(&a.run)?;
    let recipe = run.read_recipe()?;
    let classes = run.read_classes()?;
    let model = load_model(&run, &recipe, a.checkpoint.as_str(), &dev)?;
    let t = transform(&recipe, false);
    // Each image on its own: a bad file is reported in its place and the others still are.
    let decoded: Vec<std::result::Result<Vec<f32>, String>> = a
        .images
        .iter()
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
    let k = classes.len();
    let mut probs: Vec<f32> = Vec::new();
    if !good.is_empty() {
        let input: Vec<f32> = good.iter().flat_map(|v| v.iter().copied()).collect();
        let x = Tensor::<4>::from_data(
            TensorData::new(input, [good.len(), t.channels, t.size, t.size]),
            &dev,
        );
        let p = device::precision(recipe.precision, &dev, "the run's precision");
        let logits = model.with_precision(p).forward(x);
        probs = softmax(logits, 1)
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .expect("f32");
    }
    let mut rows = probs.chunks_exact(k);
    let preds: Vec<Prediction> = a
        .images
        .iter()
        .zip(&decoded)
        .map(|(path, d)| match d {
            Err(e) => Prediction {
                image: path.display().to_string(),
                top: None,
                error: Some(e.clone()),
            },
            Ok(_) => {
                let row = rows.next().expect("one row per decoded image");
                let mut order: Vec<usize> = (0..k).collect();
                order.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
                Prediction {
                    image: path.display().to_string(),
                    top: Some(
                        order
                            .into_iter()
                            .take(a.top)
                            .map(|i| Guess {
                                class: classes[i].clone(),
                                index: i,
                                probability: row[i] as f64,
                            })
                            .collect(),
                    ),
                    error: None,
                }
            }
        })
        .collect();
    let failed = preds.iter().filter(|p| p.error.is_some()).count();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&preds)?);
    } else {
        for p in &preds {
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
        }
    }
    if failed > 0 {
        let errors: Vec<&str> = preds
            .iter()
            .filter_map(|p| p.error.as_deref())
            .take(5)
            .collect();
        anyhow::bail!(
            "{failed} of {} images could not be classified: {}{}",
            preds.len(),
            errors.join("; "),
            if failed > 5 { "; ..." } else { "" }
        );
    }
    Ok(())
}
