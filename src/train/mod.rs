//! Training: the recipe, the optimiser, the schedule, the losses, checkpoints and the loop.

pub mod checkpoint;
pub mod distill;
pub mod ema;
pub mod finetune;
pub mod loss;
pub mod mix;
pub mod optim;
pub mod recipe;
pub mod schedule;
mod state;
pub mod trainer;

pub use recipe::{Override, Recipe, RunRecipe};
pub use trainer::{Reporter, TrainOptions, train};
