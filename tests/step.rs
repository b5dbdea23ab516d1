//! `convlab train` and `convlab bench train` run one training step: the trainer's first step on
//! its first batch and `bench::train_steps` on that same batch give the same loss and the same
//! weights, with EMA, label smoothing, gradient clipping, dropout and a backbone learning rate
//! switched on so that every part of the step is exercised.

use burn::prelude::*;
use convlab::helpers::Stream;
use convlab::kernels::Precision;
use convlab::pipeline::{self, Quiet, TrainOptions};
use convlab::recipe::{Override, Recipe, ScheduleKind};
use convlab::run::RunDir;
use convlab::train::checkpoint;
use convlab::train::loss::smoothed_targets;

fn recipe() -> Recipe {
    let sets = [
        "epochs=1",
        "batch_size=16",
        "data.limit_train=16",
        "data.limit_val=16",
        "data.workers=1",
        "model.dropout=0.3",
        "augment.hflip=0.5",
        "loss.label_smoothing=0.1",
        "regularisation.ema_decay=0.9",
        "regularisation.grad_clip_norm=1.0",
        "finetune.backbone_lr_mult=0.5",
        "schedule.warmup_epochs=0.0",
    ];
    let overrides: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    let mut r = Recipe::resolve(None, &overrides).unwrap();
    // A constant rate: the trainer's step 0 runs at the peak, as bench's steps do.
    r.schedule.kind = ScheduleKind::Constant;
    r
}

/// The device's random streams are the process's: a training run in another test thread would
/// reseed them between the trainer's draws and bench's, so the tests here take turns.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn bench_and_trainer_share_the_step() {
    let _turn = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex().autodiff();

    // The trainer: one epoch of one batch.
    let run = RunDir::create(&dir.path().join("run")).unwrap();
    let opts = TrainOptions {
        resume: false,
        stop_after_epoch: None,
    };
    let summary = pipeline::train(recipe(), &run, &opts, &device, &mut Quiet).unwrap();
    assert_eq!(summary.epochs, 1);
    let mut trained = checkpoint::load(&run.checkpoint("last")).unwrap();
    let metrics = run.read_metrics().unwrap();

    // bench's step on the same batch, from the same initial weights and the same draws.
    let mut r = recipe();
    let splits = pipeline::prepare(&mut r).unwrap();
    let loader = pipeline::loader(&r, splits.train.clone(), true).unwrap();
    assert_eq!(loader.num_batches(), 1);
    let batch = loader.epoch(0).next().unwrap().unwrap();
    let [c, s, _] = batch.sample_shape;
    let (b, k) = (batch.len(), r.model.num_classes);
    let x = Tensor::<4>::from_data(TensorData::new(batch.images, [b, c, s, s]), &device);
    let q = smoothed_targets(&batch.labels, k, r.loss.label_smoothing);
    let targets = Tensor::<2>::from_data(TensorData::new(q, [b, k]), &device);
    device.seed(Stream::ModelInit.seed(r.seed));
    let model = r.model.build(&device).unwrap();
    // As the trainer: the optimiser (reading the classifier's keys) before the first epoch's
    // dropout stream.
    let (mut opt, mut ema, _) = pipeline::optimizer_for(&r, &model, &device);
    device.seed(Stream::Dropout { epoch: 1 }.seed(r.seed));
    let out = convlab::bench::train_steps(
        model,
        &mut opt,
        ema.as_mut(),
        &r,
        Precision::Fp32,
        None,
        x,
        targets,
        1,
    );

    let loss = out.losses[0] as f64;
    assert!(
        (loss - metrics[0].train_loss).abs() <= 1e-6 * loss.abs().max(1.0),
        "bench loss {loss} vs trainer {}",
        metrics[0].train_loss
    );
    let benched = checkpoint::module_tensors(&out.model.valid());
    let saved = trained.take("model");
    assert_eq!(
        benched.keys().collect::<Vec<_>>(),
        saved.keys().collect::<Vec<_>>()
    );
    for (key, t) in &benched {
        assert_eq!(t, &saved[key], "{key} differs between bench and trainer");
    }
}

/// The size the trainer checks the disk for before the first epoch
/// (`pipeline::state::checkpoint_bytes`) is the size of the checkpoint it then writes, but for
/// the header: with SGD's momentum and EMA, with AdamW's two moments, with plain SGD.
#[test]
fn a_checkpoint_takes_the_bytes_the_trainer_checks_for() {
    use convlab::pipeline::state::checkpoint_bytes;
    use convlab::recipe::RunRecipe;
    let _turn = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    let cases: [&[&str]; 3] = [
        &["optim.momentum=0.9", "regularisation.ema_decay=0.9"],
        &["optim.kind=\"adamw\""],
        &["optim.momentum=0.0"],
    ];
    for extra in cases {
        let dir = tempfile::tempdir().unwrap();
        let sets = [
            "epochs=1",
            "batch_size=8",
            "data.limit_train=8",
            "data.limit_val=8",
        ];
        let overrides: Vec<Override> = sets
            .iter()
            .chain(extra)
            .map(|s| Override::parse(s).unwrap())
            .collect();
        let r = Recipe::resolve(None, &overrides).unwrap();
        let run = RunDir::create(&dir.path().join("run")).unwrap();
        let opts = TrainOptions {
            resume: false,
            stop_after_epoch: None,
        };
        pipeline::train(r, &run, &opts, &device, &mut Quiet).unwrap();
        let size = std::fs::metadata(run.checkpoint("last")).unwrap().len();
        // The run's own recipe: the trainer filled in the classes and channels from the data.
        let r = run.read_recipe().unwrap();
        let model = r.model.build(&device).unwrap();
        let estimate = checkpoint_bytes(&r, &model);
        assert!(
            estimate <= size && size - estimate < 64 * 1024,
            "{extra:?}: estimated {estimate} bytes, wrote {size}"
        );
    }
}

/// Gradient accumulation (`grad_accum_steps`) cuts the batch into slices whose loss-weighted
/// gradients sum to the whole batch's: on a model without batch norm or dropout, three uneven
/// slices of a 10-image batch give the one-pass step's loss, logits, weights and momentum
/// buffers, with weight decay and a gradient-norm clip that binds (so the clip sees the summed
/// gradients). One step only: a second forward pass can flip a ReLU whose input sits within
/// rounding of zero, and the two summation orders then part by a whole gradient element.
#[test]
fn accumulated_slices_make_the_whole_batch_step() {
    use convlab::pipeline::{StepConfig, train_step};
    let _turn = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    let sets = [
        "model.num_classes=5",
        "model.in_channels=1",
        "model.input_size=16",
        "model.batch_norm=false",
        "optim.momentum=0.9",
        "optim.weight_decay=0.0005",
        "regularisation.grad_clip_norm=0.001",
    ];
    let overrides: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    let r = Recipe::resolve(None, &overrides).unwrap();
    let (b, k) = (10, 5);
    device.seed(7);
    let x = Tensor::<4>::random([b, 1, 16, 16], burn::tensor::Distribution::Default, &device);
    let labels: Vec<usize> = (0..b).map(|i| (i * 3) % k).collect();
    let q = smoothed_targets(&labels, k, 0.0);
    let targets = Tensor::<2>::from_data(TensorData::new(q, [b, k]), &device);

    let step = |accum: usize| {
        device.seed(Stream::ModelInit.seed(r.seed));
        let model = r.model.build(&device).unwrap().train();
        let before = checkpoint::module_tensors(&model.valid());
        let (mut opt, _, _) = pipeline::optimizer_for(&r, &model, &device);
        let mut cfg = StepConfig::from_recipe(&r, None);
        cfg.grad_accum_steps = accum;
        let out = train_step(model, &mut opt, None, x.clone(), targets.clone(), 1.0, &cfg);
        let loss = out.loss.into_scalar::<f32>();
        let logits = out.logits.inner().into_data().try_to_vec::<f32>().unwrap();
        let mut moved = checkpoint::module_tensors(&out.model.valid());
        for (key, t) in moved.iter_mut() {
            for (w, w0) in t.data.iter_mut().zip(&before[key].data) {
                *w -= w0;
            }
        }
        (loss, logits, moved, opt.state())
    };
    let (loss1, logits1, moved1, state1) = step(1);
    let (loss3, logits3, moved3, state3) = step(3);
    assert!(
        (loss1 - loss3).abs() <= 1e-5 * loss1.abs().max(1.0),
        "loss {loss1} vs {loss3}"
    );
    assert_eq!((logits1.len(), logits3.len()), (b * k, b * k));
    for (a, c) in logits1.iter().zip(&logits3) {
        assert!((a - c).abs() <= 1e-5 * a.abs().max(1.0), "logit {a} vs {c}");
    }
    // The clip binds: no weight moved by more than lr * clip.
    let largest = moved1
        .values()
        .flat_map(|t| &t.data)
        .fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        largest > 0.0 && largest <= 1e-3 * 1.001,
        "largest step {largest}"
    );
    for (one, three, what) in [
        (&moved1, &moved3, "weight steps"),
        (&state1, &state3, "buffers"),
    ] {
        assert_eq!(
            one.keys().collect::<Vec<_>>(),
            three.keys().collect::<Vec<_>>()
        );
        for (key, t) in one {
            let scale = t.data.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = (t.data.iter().zip(&three[key].data))
                .map(|(a, c)| (a - c).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-4 * scale.max(1e-6),
                "{what} of {key} differ by {worst} (largest {scale})"
            );
        }
    }
}

/// With logit adjustment the step's loss is the cross-entropy of the logits plus the offsets
/// (the logits it returns are the model's own).
#[test]
fn logit_adjustment_shifts_the_logits_inside_the_loss() {
    use convlab::pipeline::{StepConfig, train_step};
    let _turn = SEEDED.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex().autodiff();
    let sets = [
        "model.num_classes=3",
        "model.in_channels=1",
        "model.input_size=16",
    ];
    let overrides: Vec<Override> = sets.iter().map(|s| Override::parse(s).unwrap()).collect();
    let r = Recipe::resolve(None, &overrides).unwrap();
    let (b, k) = (6, 3);
    device.seed(3);
    let x = Tensor::<4>::random([b, 1, 16, 16], burn::tensor::Distribution::Default, &device);
    let labels: Vec<usize> = (0..b).map(|i| i % k).collect();
    let q = smoothed_targets(&labels, k, 0.0);
    let targets = Tensor::<2>::from_data(TensorData::new(q, [b, k]), &device);
    let adjust = convlab::train::loss::logit_adjustment(&[80, 15, 5], 1.0);
    device.seed(Stream::ModelInit.seed(r.seed));
    let model = r.model.build(&device).unwrap().train();
    let (mut opt, _, _) = pipeline::optimizer_for(&r, &model, &device);
    let mut cfg = StepConfig::from_recipe(&r, None);
    cfg.logit_adjust = Some(adjust.clone());
    let out = train_step(model, &mut opt, None, x, targets, 0.1, &cfg);
    let loss = out.loss.into_scalar::<f32>() as f64;
    let logits = out.logits.inner().into_data().try_to_vec::<f32>().unwrap();
    let ce = |shift: &[f32]| {
        let mut sum = 0.0;
        for (row, &y) in logits.chunks(k).zip(&labels) {
            let z: Vec<f64> = row.iter().zip(shift).map(|(l, a)| (l + a) as f64).collect();
            let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
            sum += lse - z[y];
        }
        sum / b as f64
    };
    let want = ce(&adjust);
    assert!(
        (loss - want).abs() < 1e-5 * want.max(1.0),
        "{loss} vs {want}"
    );
    assert!(
        (loss - ce(&[0.0; 3])).abs() > 1e-3,
        "the offsets changed nothing"
    );
}
