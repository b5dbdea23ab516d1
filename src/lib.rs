//! convlab: train, evaluate, analyse and visualise classic CNN image classifiers.
//!
//! The library never picks a device: every entry point takes a Burn [`burn::prelude::Device`]
//! (the `convlab` binary chooses one from its cargo features and `--device`).
//!
//! - [`data`]: datasets (built-in Fashion-MNIST, ImageFolder, CIFAR, IDX), transforms, loader.
//! - [`models`]: the model registry and families; [`layers`]: shared blocks.
//! - [`train`]: recipe, optimiser, schedule, losses, checkpoints, the training loop.
//! - [`eval`]: metrics and evaluation; [`run`]: the run folder; [`checkpoint`]: checkpoint files.
//! - [`limits`]: the bounds on every user-given size, checked before allocating.

pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod eval;
pub mod experiment;
pub mod helpers;
pub mod interop;
pub mod kernels;
pub mod layers;
pub mod limits;
pub mod models;
pub mod onnx;
pub mod params;
pub mod pipeline;
pub mod recipe;
pub mod report;
pub mod run;
pub mod train;
pub mod viz;

pub use error::{Error, Result};
