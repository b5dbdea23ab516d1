//! Training components: the optimiser, the learning-rate schedule, the losses, mixing, EMA and
//! fine-tuning's freezing rules. Checkpoint files are [`crate::checkpoint`] (re-exported here
//! as `train::checkpoint`), a layer below: evaluation and weight import read them too. The loop
//! that composes these from a recipe lives in the pipeline layer above (its `train` function),
//! so nothing here knows recipes.

pub use crate::checkpoint;
pub mod ema;
pub mod finetune;
pub mod loss;
pub mod mix;
pub mod optim;
pub mod schedule;
