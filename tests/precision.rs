//! A model's precision is its own setting, not a thread's (in its own test binary: Burn's
//! random generator is global, and this test's draws must not interleave with the seeded
//! draws of `tests/step.rs`).

use burn::prelude::*;
use convlab::helpers::Stream;
use convlab::kernels::Precision;
use convlab::pipeline;
use convlab::recipe::{Override, Recipe};
use convlab::train::loss::smoothed_targets;

/// The precision is the model's own setting (`Model::with_precision`), not a thread's: it
/// survives `train()`, `valid()`, an optimiser step, the EMA average being applied and a
/// checkpoint being loaded into the model, so no later forward pass silently drops to fp32.
#[test]
fn precision_travels_with_the_model() {
    let device = Device::flex().autodiff();
    let overrides: Vec<Override> = [
        "batch_size=4",
        "data.limit_train=16",
        "data.limit_val=16",
        "regularisation.ema_decay=0.9",
    ]
    .iter()
    .map(|s| Override::parse(s).unwrap())
    .collect();
    let mut r = Recipe::resolve(None, &overrides).unwrap();
    pipeline::prepare(&mut r).unwrap();
    device.seed(Stream::ModelInit.seed(r.seed));
    let model = r.model.build(&device).unwrap();
    assert_eq!(
        model.precision(),
        Precision::Fp32,
        "models are built in fp32"
    );
    let model = model.with_precision(Precision::Bf16).train();
    assert_eq!(
        model.valid().precision(),
        Precision::Bf16,
        "valid() keeps it"
    );
    let (mut opt, mut ema, _) = pipeline::optimizer_for(&r, &model, &device);
    let [c, s] = [r.model.in_channels, r.model.input_size];
    let (b, k) = (4, r.model.num_classes);
    let x = Tensor::<4>::random([b, c, s, s], burn::tensor::Distribution::Default, &device);
    let q = smoothed_targets(&[0, 1, 2, 3], k, 0.0);
    let targets = Tensor::<2>::from_data(TensorData::new(q, [b, k]), &device);
    let cfg = pipeline::StepConfig::from_recipe(&r, None);
    let out = pipeline::train_step(model, &mut opt, ema.as_mut(), x, targets, 0.01, &cfg);
    assert_eq!(
        out.model.precision(),
        Precision::Bf16,
        "the optimiser step keeps it"
    );
    let averaged = ema.as_ref().unwrap().apply(out.model.valid());
    assert_eq!(
        averaged.precision(),
        Precision::Bf16,
        "EMA's apply keeps it"
    );
    let record = out.model.clone().into_record();
    let reloaded = out.model.load_record(record);
    assert_eq!(
        reloaded.precision(),
        Precision::Bf16,
        "load_record keeps it"
    );
}
