//! `convlab predict`.

use std::path::PathBuf;

use anyhow::Result;
use burn::prelude::*;
use burn::tensor::activation::softmax;
use clap::Args;
use convlab::data::image_folder::decode_file;
use convlab::run::RunDir;
use convlab::train::trainer::{load_model, transform};
use serde::Serialize;

use super::eval::Which;
use super::{RuntimeArgs, device};

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Run folder written by `convlab train`.
    #[arg(long)]
    pub run: PathBuf,
    /// Image files to classify.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "best")]
    pub checkpoint: Which,
    /// How many classes to show per image.
    #[arg(long, default_value_t = 5)]
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
    top: Vec<Guess>,
}

pub fn run(a: PredictArgs) -> Result<()> {
    device::set_threads(a.runtime.threads)?;
    let dev = device::pick(&a.runtime.device)?;
    let run = RunDir::open(&a.run)?;
    let recipe = run.read_recipe()?;
    let classes = run.read_classes()?;
    let model = load_model(&run, &recipe, a.checkpoint.as_str(), &dev)?;
    let t = transform(&recipe, false);
    // Decode everything first: a bad file fails before any output.
    let mut input = vec![0f32; a.images.len() * t.sample_len()];
    for (path, out) in a.images.iter().zip(input.chunks_mut(t.sample_len())) {
        t.apply(decode_file(path, t.channels)?, None, out);
    }
    let x = Tensor::<4>::from_data(
        TensorData::new(input, [a.images.len(), t.channels, t.size, t.size]),
        &dev,
    );
    let p = device::precision(recipe.precision, &dev, "the run's precision");
    let logits = convlab::kernels::with_precision(p, || model.forward(x));
    let probs: Vec<f32> = softmax(logits, 1)
        .into_data()
        .convert::<f32>()
        .try_to_vec()
        .expect("f32");
    let k = classes.len();
    let preds: Vec<Prediction> = a
        .images
        .iter()
        .zip(probs.chunks_exact(k))
        .map(|(path, row)| {
            let mut order: Vec<usize> = (0..k).collect();
            order.sort_by(|&i, &j| row[j].total_cmp(&row[i]));
            Prediction {
                image: path.display().to_string(),
                top: order
                    .into_iter()
                    .take(a.top)
                    .map(|i| Guess {
                        class: classes[i].clone(),
                        index: i,
                        probability: row[i] as f64,
                    })
                    .collect(),
            }
        })
        .collect();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&preds)?);
    } else {
        for p in preds {
            println!("{}", p.image);
            for g in p.top {
                println!("  {:6.2}%  {}", 100.0 * g.probability, g.class);
            }
        }
    }
    Ok(())
}
