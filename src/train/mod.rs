//! Training components: the optimiser, the learning-rate schedule, the losses, mixing, EMA,
//! fine-tuning's freezing rules and checkpoint files. The loop that composes them from a recipe
//! lives in the pipeline layer above (its `train` function), so nothing here knows recipes.

pub mod checkpoint;
pub mod ema;
pub mod finetune;
pub mod loss;
pub mod mix;
pub mod optim;
pub mod schedule;
