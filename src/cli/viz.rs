//! `convlab viz`: PNG pictures of a trained run's insides.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::activation::softmax;
use clap::{Args, Subcommand};
use convlab::data::open;
use convlab::models::Model;
use convlab::pipeline::load_model;
use convlab::recipe::Recipe;
use convlab::run::RunDir;
use convlab::viz::attribution::{self, ReluRule};
use convlab::viz::{self, Input, grid, maps};
use image::RgbImage;

use super::eval::Which;
use super::{RuntimeArgs, device};
use convlab::recipe::RunRecipe;

#[derive(Args, Debug)]
pub struct VizArgs {
    #[command(subcommand)]
    pub what: What,
    /// Run folder written by `convlab train`.
    #[arg(long, global = true)]
    pub run: Option<PathBuf>,
    /// Folder for the PNG files (default: RUN/viz).
    #[arg(long, global = true)]
    pub out: Option<PathBuf>,
    /// Checkpoint to load: the best validation epoch's, or the last epoch's.
    #[arg(long, value_enum, default_value = "best", global = true)]
    pub checkpoint: Which,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

#[derive(Subcommand, Debug)]
pub enum What {
    /// A conv layer's filters as a grid (default: the first layer, in colour for RGB input).
    Filters {
        /// Conv layer by parameter path (an unknown name lists them).
        #[arg(long)]
        layer: Option<String>,
    },
    /// Feature maps of one image at each chosen layer (default: every named layer).
    Activations {
        /// Image file to look at (any format the loader reads; resized like validation images).
        #[arg(long)]
        image: PathBuf,
        /// Layers by name (repeat the flag; default: every named layer; an unknown name lists
        /// them).
        #[arg(long)]
        layer: Vec<String>,
    },
    /// For the strongest channels of a layer, the validation images that excite each most.
    TopPatches {
        /// Layer by name (default: the last named layer; an unknown name lists them).
        #[arg(long)]
        layer: Option<String>,
        /// Images per channel.
        #[arg(long, default_value_t = 9, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000))]
        k: usize,
        /// Channels shown (one row each).
        #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=16384))]
        channels: usize,
        /// Validation images searched.
        #[arg(long, default_value_t = 500, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1000000))]
        images: usize,
    },
    /// ZFNet deconvnet projection of a layer's strongest activation back to pixels.
    Deconv {
        /// Image file to project (resized like validation images).
        #[arg(long)]
        image: PathBuf,
        /// Layer by name (an unknown name lists them).
        #[arg(long)]
        layer: String,
        /// Channel to project (default: the one with the strongest activation).
        #[arg(long)]
        channel: Option<usize>,
    },
    /// Gradient of the class score w.r.t. the input, and guided backpropagation.
    Saliency {
        /// Image file to explain (resized like validation images).
        #[arg(long)]
        image: PathBuf,
        /// Class index (default: the predicted class).
        #[arg(long)]
        class: Option<usize>,
    },
    /// Grad-CAM heat map over the image.
    Gradcam {
        /// Image file to explain (resized like validation images).
        #[arg(long)]
        image: PathBuf,
        /// Class index (default: the predicted class).
        #[arg(long)]
        class: Option<usize>,
        /// Layer (default: the last named layer).
        #[arg(long)]
        layer: Option<String>,
    },
    /// Occlusion maps: probability of the class, and the most probable class, as a grey
    /// square slides over the image.
    Occlusion {
        /// Image file to occlude (resized like validation images).
        #[arg(long)]
        image: PathBuf,
        /// Side of the grey square in input pixels (default: a quarter of the input).
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
        patch: Option<usize>,
        /// Step between the square's positions in input pixels.
        #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
        stride: usize,
        /// Class whose probability is mapped (default: the predicted class).
        #[arg(long)]
        class: Option<usize>,
    },
    /// First-layer filters (or `--layer`'s) at each saved epoch, side by side.
    Evolution {
        /// Conv layer by parameter path (default: the first conv layer).
        #[arg(long)]
        layer: Option<String>,
    },
}

struct Ctx {
    run: RunDir,
    recipe: Recipe,
    model: Model,
    device: burn::prelude::Device,
    out: PathBuf,
}

impl Ctx {
    fn write(&self, name: &str, img: &RgbImage) -> Result<()> {
        let path = self.out.join(name);
        viz::save(img, &path)?;
        println!("{}", path.display());
        Ok(())
    }
    fn input(&self, path: &Path) -> Result<Input> {
        Ok(viz::input_from_file(&self.recipe, path, &self.device)?)
    }
    fn predicted(&self, input: &Input) -> usize {
        let p = viz::host(softmax(self.model.forward(input.tensor.clone()), 1));
        convlab::eval::metrics::argmax(&p)
    }
    fn class_name(&self, k: usize) -> String {
        self.run
            .read_classes()
            .ok()
            .and_then(|c| c.get(k).cloned())
            .unwrap_or_else(|| k.to_string())
    }
}

fn safe(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

/// A `[C, H, W]` projection as a picture (colour for RGB input).
fn picture(v: &[f32], c: usize, s: usize) -> RgbImage {
    viz::tile(v, if c == 3 { 3 } else { 1 }, s, s)
}

pub fn run(a: VizArgs) -> Result<()> {
    device::set_threads(a.runtime.threads)?;
    let Some(run_dir) = a.run.clone() else {
        bail!("--run RUN_DIR is required");
    };
    let device = device::pick(&a.runtime.device)?.autodiff();
    let run = RunDir::open(&run_dir)?;
    let recipe = run.read_recipe()?;
    let model = load_model(&run, &recipe, a.checkpoint.as_str(), &device)?.freeze();
    let out = a.out.clone().unwrap_or_else(|| run.path.join("viz"));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let cx = Ctx {
        run,
        recipe,
        model,
        device,
        out,
    };
    let (c, s) = (cx.recipe.model.in_channels, cx.recipe.model.input_size);
    match a.what {
        What::Filters { layer } => {
            let (name, img) = maps::filters(&cx.model, layer.as_deref())?;
            cx.write(&format!("filters-{}.png", safe(&name)), &img)?;
        }
        What::Activations { image, layer } => {
            let input = cx.input(&image)?;
            let layers = if layer.is_empty() {
                cx.model
                    .feature_maps(input.tensor.clone(), &[])?
                    .into_iter()
                    .map(|(n, _)| n)
                    .collect()
            } else {
                layer
            };
            cx.write("input.png", &viz::enlarge(&input.picture, 128))?;
            for l in &layers {
                let img = maps::activations(&cx.model, input.tensor.clone(), l)?;
                cx.write(&format!("activations-{}.png", safe(l)), &img)?;
            }
        }
        What::TopPatches {
            layer,
            k,
            channels,
            images,
        } => {
            let mut spec = cx.recipe.data.spec(cx.recipe.seed);
            // The run's own limit, capped.
            spec.limit_val = Some(spec.limit_val.map_or(images, |l| l.min(images)));
            let splits = open(&spec)?;
            let layer = match layer {
                Some(l) => l,
                None => last_layer(&cx)?,
            };
            let (img, order) = maps::top_images(
                &cx.model,
                &cx.recipe,
                splits.val.as_ref(),
                &layer,
                channels,
                k,
                &cx.device,
            )?;
            println!("rows: channels {order:?} of {layer}");
            cx.write(&format!("top-patches-{}.png", safe(&layer)), &img)?;
        }
        What::Deconv {
            image,
            layer,
            channel,
        } => {
            let input = cx.input(&image)?;
            let (p, ch) = attribution::project_activation(
                &cx.model,
                input.tensor.clone(),
                &layer,
                channel,
                ReluRule::Deconv,
            )?;
            if !p.exact_rule {
                eprintln!(
                    "note: {} branches (residual/inception), so the deconvnet rule cannot be \
                     applied layer by layer; this is the gradient of the activation instead",
                    cx.recipe.model.name
                );
            }
            let img = grid(&[input.picture.clone(), picture(&p.values, c, s)], 2, 128);
            cx.write(&format!("deconv-{}-c{ch}.png", safe(&layer)), &img)?;
        }
        What::Saliency { image, class } => {
            let input = cx.input(&image)?;
            let k = class.unwrap_or_else(|| cx.predicted(&input));
            let g = attribution::saliency(&cx.model, input.tensor.clone(), k, false)?;
            // The usual display: max over channels of |gradient|.
            let hw = s * s;
            let mag: Vec<f32> = (0..hw)
                .map(|p| {
                    (0..c)
                        .map(|ch| g.values[ch * hw + p].abs())
                        .fold(0.0, f32::max)
                })
                .collect();
            let guided = attribution::saliency(&cx.model, input.tensor.clone(), k, true)?;
            if !guided.exact_rule {
                eprintln!(
                    "note: {} branches, so guided backpropagation is not available; the third \
                     picture is the plain gradient",
                    cx.recipe.model.name
                );
            }
            let img = grid(
                &[
                    input.picture.clone(),
                    viz::heat_image(&mag, s, s),
                    picture(&guided.values, c, s),
                ],
                3,
                128,
            );
            println!("class {k} ({})", cx.class_name(k));
            cx.write(&format!("saliency-class{k}.png"), &img)?;
        }
        What::Gradcam {
            image,
            class,
            layer,
        } => {
            let input = cx.input(&image)?;
            let k = class.unwrap_or_else(|| cx.predicted(&input));
            let layer = match layer {
                Some(l) => l,
                None => last_layer(&cx)?,
            };
            let (cam, w, h) = attribution::grad_cam(&cx.model, input.tensor.clone(), &layer, k)?;
            let pic = viz::enlarge(&input.picture, 128);
            let img = grid(
                &[pic.clone(), viz::overlay_heat(&pic, &cam, w, h, 0.5)],
                2,
                128,
            );
            println!("class {k} ({}) at {layer}", cx.class_name(k));
            cx.write(&format!("gradcam-{}-class{k}.png", safe(&layer)), &img)?;
        }
        What::Occlusion {
            image,
            patch,
            stride,
            class,
        } => {
            let input = cx.input(&image)?;
            let k = class.unwrap_or_else(|| cx.predicted(&input));
            let patch = patch.unwrap_or((s / 4).max(1));
            let (probs, classes, nx, ny) =
                attribution::occlusion(&cx.model, input.tensor.clone(), k, patch, stride)?;
            let pic = viz::enlarge(&input.picture, 128);
            // Absolute probabilities (not self-normalised): black 0, white 1.
            let prob_img = RgbImage::from_fn(nx as u32, ny as u32, |x, y| {
                viz::heat(probs[y as usize * nx + x as usize])
            });
            let class_img = RgbImage::from_fn(nx as u32, ny as u32, |x, y| {
                viz::class_colour(classes[y as usize * nx + x as usize])
            });
            let img = grid(&[pic, prob_img, class_img], 3, 128);
            let mut seen: Vec<usize> = classes.clone();
            seen.sort_unstable();
            seen.dedup();
            println!(
                "class {k} ({}): probability {:.3} to {:.3} over {nx}x{ny} positions; most \
                 probable classes seen: {}",
                cx.class_name(k),
                probs.iter().copied().fold(f32::INFINITY, f32::min),
                probs.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                seen.iter()
                    .map(|&j| format!("{j} {}", cx.class_name(j)))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            cx.write(&format!("occlusion-class{k}.png"), &img)?;
        }
        What::Evolution { layer } => {
            let dir = cx.run.path.join("checkpoints");
            let mut epochs: Vec<usize> = std::fs::read_dir(&dir)
                .with_context(|| format!("cannot list {}", dir.display()))?
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.strip_prefix("epoch-")?
                        .strip_suffix(".safetensors")?
                        .parse()
                        .ok()
                })
                .collect();
            epochs.sort_unstable();
            if epochs.is_empty() {
                bail!(
                    "{} has no checkpoints/epoch-N files; train with --set checkpoint_every=1",
                    cx.run.path.display()
                );
            }
            let mut tiles = Vec::new();
            for e in &epochs {
                let m = load_model(&cx.run, &cx.recipe, &format!("epoch-{e}"), &cx.device)?;
                tiles.push(maps::filters(&m, layer.as_deref())?.1);
            }
            println!("epochs {epochs:?}, left to right");
            cx.write("evolution.png", &grid(&tiles, tiles.len(), 64))?;
        }
    }
    Ok(())
}

fn last_layer(cx: &Ctx) -> Result<String> {
    let s = cx.recipe.model.input_size;
    let x = burn::prelude::Tensor::<4>::zeros([1, cx.recipe.model.in_channels, s, s], &cx.device);
    cx.model
        .feature_maps(x, &[])?
        .last()
        .map(|(n, _)| n.clone())
        .context("the model names no layers")
}
