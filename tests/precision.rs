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

/// With bf16 activations selected (the default), a bf16 ResNet and a bf16
/// ConvNet keep their maps in bf16 between layers, yet their logits and the gradient that
/// reaches the (f32) input stay f32 and within bf16 rounding of the f32-activation run; the
/// maps a tap sees are f32. The selection is process-wide (this file's other test passes
/// with either), and the default is restored after each run.
#[test]
fn bf16_activations_stay_inside_the_model() {
    use convlab::kernels::{ActivationDtype, select_activations};
    use convlab::models::{ModelConfig, ModelName};
    let device = Device::flex().autodiff();
    if !convlab::kernels::bf16::available() {
        eprintln!("skipped: this CPU has no AVX512-BF16 (bf16 computes in fp32)");
        return;
    }
    for name in [ModelName::Resnet18Small, ModelName::BenchVgg] {
        let cfg = ModelConfig::for_model(name, 5, 3);
        device.seed(3);
        let model = cfg.build(&device).unwrap().with_precision(Precision::Bf16);
        let s = cfg.input_size;
        let x = Tensor::<4>::random([4, 3, s, s], burn::tensor::Distribution::Default, &device);
        let run = |dtype| {
            select_activations(dtype);
            let x = x.clone().require_grad();
            let logits = model.forward(x.clone());
            let grads = logits.clone().powi_scalar(2).sum().backward();
            let dx = x.grad(&grads).unwrap();
            let maps = model.feature_maps(x.clone().detach(), &[]).unwrap();
            select_activations(ActivationDtype::default());
            (logits.inner(), dx, maps)
        };
        let (l32, dx32, _) = run(ActivationDtype::F32);
        let (l16, dx16, maps) = run(ActivationDtype::Bf16);
        assert_eq!(l16.dtype(), burn::tensor::DType::F32, "{name:?} logits");
        assert_eq!(
            dx16.dtype(),
            burn::tensor::DType::F32,
            "{name:?} input gradient"
        );
        assert!(
            maps.iter()
                .all(|(_, m)| m.dtype() == burn::tensor::DType::F32),
            "{name:?} taps"
        );
        let v = |t: Tensor<4>| t.into_data().try_to_vec::<f32>().unwrap();
        let (a, b) = (
            l16.into_data().try_to_vec::<f32>().unwrap(),
            l32.into_data().try_to_vec::<f32>().unwrap(),
        );
        assert_ne!(a, b, "{name:?}: the bf16 activations did not run");
        let rel = |a: &[f32], b: &[f32]| {
            let d: f32 = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).powi(2))
                .sum::<f32>()
                .sqrt();
            d / b.iter().map(|y| y * y).sum::<f32>().sqrt().max(1e-12)
        };
        assert!(rel(&a, &b) < 0.05, "{name:?} logits: {}", rel(&a, &b));
        // The input gradient of an untrained network is ill-conditioned: bf16 products alone
        // (f32 activations) move it 37% from fp32's here. Storing the activations in bf16
        // must not add much to that.
        let fp32 = model.clone().with_precision(Precision::Fp32);
        let xg = x.clone().require_grad();
        let grads = fp32.forward(xg.clone()).powi_scalar(2).sum().backward();
        let g32 = v(xg.grad(&grads).unwrap());
        let (ga, gb) = (v(dx16), v(dx32));
        let (e16, e32) = (rel(&ga, &g32), rel(&gb, &g32));
        assert!(
            e16 < 1.5 * e32 + 0.02,
            "{name:?} input gradient: {e16} from fp32's with bf16 activations, {e32} without"
        );
        assert!(name.family().keeps_bf16_activations(), "{name:?}");
    }
    // A family that keeps f32 activations computes the same bits with the selection on
    // (in inference: no dropout draws).
    let device = Device::flex();
    let cfg = ModelConfig::for_model(ModelName::AlexnetSmall, 5, 3);
    assert!(!ModelName::AlexnetSmall.family().keeps_bf16_activations());
    let model = cfg.build(&device).unwrap().with_precision(Precision::Bf16);
    let x = Tensor::<4>::random([2, 3, 32, 32], burn::tensor::Distribution::Default, &device);
    let logits = |dtype| {
        select_activations(dtype);
        let l = model.forward(x.clone()).into_data();
        select_activations(ActivationDtype::default());
        l
    };
    assert_eq!(logits(ActivationDtype::Bf16), logits(ActivationDtype::F32));
}
