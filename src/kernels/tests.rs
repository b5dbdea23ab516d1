//! Tests of the kernels' front doors ([`super::conv2d`], [`super::conv_bn`],
//! [`super::batch_norm`], pooling, the residual add, precision) against Burn's own ops.

use super::*;
use burn::tensor::Distribution;
use burn::tensor::module::conv2d as burn_conv2d;
use burn::tensor::ops::ConvOptions;

fn max_rel_diff(a: Tensor<4>, b: Tensor<4>) -> f32 {
    let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
    (a - b).abs().max().into_scalar::<f32>() / scale
}

/// The GEMM kernel and Burn's convolution agree on the output and on all three gradients
/// (the bar: within 1e-4 relative), for the padding/stride/kernel combinations the
/// model families use.
#[test]
fn gemm_conv_matches_burn_forward_and_backward() {
    let device = Device::flex().autodiff();
    for (cin, cout, hw, k, s, p, bias) in [
        (3, 8, 9, 3, 1, 1, true),
        (4, 6, 12, 5, 2, 2, false),
        (3, 5, 23, 11, 4, 2, true),
        (6, 4, 7, 1, 1, 0, true),
        (5, 3, 8, 1, 2, 0, false),
        (2, 4, 10, 7, 2, 3, true),
        // Winograd's F(2x2, 3x3) forward and input gradient.
        (32, 40, 9, 3, 1, 1, true),
        // The direct kernels (on AVX-512 CPUs): all three products of a 16-channel layer,
        // and an RGB stem (input gradient from im2col).
        (16, 16, 17, 3, 1, 1, false),
        (3, 16, 16, 3, 1, 1, true),
    ] {
        let x = Tensor::<4>::random([3, cin, hw, hw], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<4>::random([cout, cin, k, k], Distribution::Normal(0.0, 0.3), &device);
        let b = Tensor::<1>::random([cout], Distribution::Normal(0.0, 1.0), &device);
        let dy = Tensor::<4>::random(
            [3, cout, (hw + 2 * p - k) / s + 1, (hw + 2 * p - k) / s + 1],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let run = |fast: bool| {
            let (x, w, b) = (
                x.clone().require_grad(),
                w.clone().require_grad(),
                b.clone().require_grad(),
            );
            let bias = bias.then(|| b.clone());
            let y = if fast {
                gemm_conv2d(x.clone(), w.clone(), bias, [s, s], [p, p], Precision::Fp32)
            } else {
                burn_conv2d(
                    x.clone(),
                    w.clone(),
                    bias,
                    ConvOptions::new([s, s], [p, p], [1, 1], 1),
                )
            };
            let grads = (y.clone() * dy.clone()).sum().backward();
            let gx = x.grad(&grads).unwrap();
            let gw = w.grad(&grads).unwrap();
            let gb = b.grad(&grads).map(|g| g.reshape([1, 1, 1, cout]));
            (y.inner(), gx, gw, gb)
        };
        let (y1, gx1, gw1, gb1) = run(true);
        let (y0, gx0, gw0, gb0) = run(false);
        let case = format!("cin {cin} cout {cout} {hw}px k{k} s{s} p{p} bias {bias}");
        assert!(max_rel_diff(y1, y0) < 1e-4, "{case}: output");
        assert!(max_rel_diff(gx1, gx0) < 1e-4, "{case}: input gradient");
        assert!(max_rel_diff(gw1, gw0) < 1e-4, "{case}: weight gradient");
        assert_eq!(gb1.is_some(), gb0.is_some(), "{case}");
        if let (Some(a), Some(b)) = (gb1, gb0) {
            assert!(max_rel_diff(a, b) < 1e-4, "{case}: bias gradient");
        }
    }
}

/// The fused residual add + ReLU and Burn's `relu(a + b)` give the same output and the same
/// gradient to each summand (also when only one of them is tracked, and when the first is a
/// fresh result that the sum may overwrite, as a residual block's batch norm output is).
#[test]
fn add_relu_matches_burn() {
    let device = Device::flex().autodiff();
    let shape = [3, 5, 7, 9];
    let a = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let b = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let dy = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    for (track_b, fresh_a) in [(true, false), (false, false), (true, true)] {
        let run = |fast: bool| {
            let a = a.clone().require_grad();
            let b = if track_b {
                b.clone().require_grad()
            } else {
                b.clone()
            };
            let first = if fresh_a { a.clone() * 1.5 } else { a.clone() };
            let y = if fast {
                add_relu(first, b.clone())
            } else {
                activation::relu(first + b.clone())
            };
            let grads = (y.clone() * dy.clone()).sum().backward();
            (y.inner(), a.grad(&grads).unwrap(), b.grad(&grads))
        };
        let (y1, ga1, gb1) = run(true);
        let (y0, ga0, gb0) = run(false);
        assert!(max_rel_diff(y1, y0) < 1e-6, "output");
        assert!(max_rel_diff(ga1, ga0) < 1e-6, "gradient of a");
        assert_eq!(gb1.is_some(), track_b);
        assert_eq!(gb0.is_some(), track_b);
        if let (Some(g1), Some(g0)) = (gb1, gb0) {
            assert!(max_rel_diff(g1, g0) < 1e-6, "gradient of b");
        }
    }
}

/// A bf16 convolution reaches the kernel through Burn's autodiff: the output and all gradients
/// move by bf16 rounding (not more), and the backward pass runs in its forward pass's precision
/// (the geometry it saved), whichever thread runs it.
#[test]
fn bf16_reaches_the_kernel_and_its_backward() {
    if !bf16::available() {
        assert_eq!(
            runnable(Precision::Bf16),
            Precision::Fp32,
            "without AVX512-BF16 bf16 falls back to fp32"
        );
        return;
    }
    let device = Device::flex().autodiff();
    let x = Tensor::<4>::random([2, 8, 10, 10], Distribution::Normal(0.0, 1.0), &device);
    let w = Tensor::<4>::random([16, 8, 3, 3], Distribution::Normal(0.0, 0.3), &device);
    let run = |p: Precision, backward_elsewhere: bool| {
        let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
        let y = gemm_conv2d(x.clone(), w.clone(), None, [1, 1], [1, 1], p);
        let loss = (y.clone() * y.clone()).sum();
        let grads = if backward_elsewhere {
            std::thread::scope(|s| s.spawn(|| loss.backward()).join().unwrap())
        } else {
            loss.backward()
        };
        (y.inner(), x.grad(&grads).unwrap(), w.grad(&grads).unwrap())
    };
    let (y32, gx32, gw32) = run(Precision::Fp32, false);
    let (y16, gx16, gw16) = run(Precision::Bf16, false);
    let (_, gx16b, gw16b) = run(Precision::Bf16, true);
    for (a, b, what) in [
        (y16, y32, "output"),
        (gx16.clone(), gx32, "dx"),
        (gw16.clone(), gw32, "dw"),
    ] {
        let d = max_rel_diff(a, b);
        assert!(d > 0.0 && d < 3e-2, "{what}: bf16 vs fp32 differ by {d}");
    }
    assert_eq!(max_rel_diff(gx16, gx16b), 0.0);
    assert_eq!(max_rel_diff(gw16, gw16b), 0.0);
}

#[test]
fn precision_parses_and_falls_back_off_flex() {
    assert_eq!("bf16".parse::<Precision>(), Ok(Precision::Bf16));
    assert!("fp16".parse::<Precision>().unwrap_err().contains("fp16"));
    assert_eq!(Precision::Bf16.to_string(), "bf16");
    assert_eq!(
        supported_precision(Precision::Fp32, &Device::flex()),
        Ok(Precision::Fp32)
    );
    let bf16_here = supported_precision(Precision::Bf16, &Device::flex().autodiff());
    assert_eq!(
        bf16_here.is_ok(),
        matrix_unit(Precision::Bf16) != "fp32" && kernels() == Kernels::Convlab
    );
}

/// `CONVLAB_VDPBF16PS` parses, and picks the bf16 unit: `off` leaves only the AMX tiles, `on`
/// takes `VDPBF16PS` wherever the CPU has it, `auto` only where it out-runs f32 FMAs.
#[test]
fn the_vdpbf16ps_policy_picks_the_bf16_unit() {
    use bf16::Policy;
    assert_eq!(bf16::parse_policy(None), Ok(Policy::Auto));
    assert_eq!(bf16::parse_policy(Some("on")), Ok(Policy::On));
    assert_eq!(bf16::parse_policy(Some("0")), Ok(Policy::Off));
    assert!(
        bf16::parse_policy(Some("fast"))
            .unwrap_err()
            .contains("CONVLAB_VDPBF16PS=fast")
    );
    let tiles = amx::available();
    let vector = |p| if tiles { "amx-bf16" } else { p };
    assert_eq!(bf16_unit(true, Policy::Off), vector("fp32"));
    assert_eq!(bf16_unit(false, Policy::Off), "fp32");
    let on = if bf16::available() {
        "avx512-bf16"
    } else {
        "fp32"
    };
    assert_eq!(bf16_unit(false, Policy::On), on);
    let auto = if bf16::available() && bf16::outruns_fma() {
        "avx512-bf16"
    } else {
        "fp32"
    };
    assert_eq!(bf16_unit(false, Policy::Auto), auto);
    assert_eq!(bf16_unit(true, Policy::Auto), vector(auto));
}

fn max_rel_diff1(a: Tensor<1>, b: Tensor<1>) -> f32 {
    max_rel_diff(a.reshape([1, 1, 1, -1]), b.reshape([1, 1, 1, -1]))
}

/// The fused batch norm (+ ReLU) against Burn's `BatchNorm::forward` (+ `relu`): training
/// output, the three gradients and the running statistics it leaves behind; then inference
/// on a plain device with those statistics.
#[test]
fn fused_batch_norm_matches_burn() {
    use burn::nn::BatchNormConfig;
    let device = Device::flex().autodiff();
    for relu in [true, false] {
        let x = Tensor::<4>::random([4, 3, 5, 6], Distribution::Normal(0.5, 2.0), &device);
        let dy = Tensor::<4>::random([4, 3, 5, 6], Distribution::Normal(0.0, 1.0), &device);
        let run = |fast: bool| {
            let mut bn = BatchNormConfig::new(3).init(&device);
            bn.gamma =
                burn::module::Param::from_tensor(Tensor::from_floats([1.3, -0.7, 0.4], &device));
            let x = x.clone().require_grad();
            let y = if fast {
                batch_norm(&bn, x.clone(), relu)
            } else {
                let y = bn.forward(x.clone());
                if relu { activation::relu(y) } else { y }
            };
            let grads = (y.clone() * dy.clone()).sum().backward();
            let gx = x.grad(&grads).unwrap();
            let gg = bn.gamma.val().grad(&grads).unwrap();
            let gb = bn.beta.val().grad(&grads).unwrap();
            (y.inner(), gx, gg, gb, bn)
        };
        let (y1, gx1, gg1, gb1, bn1) = run(true);
        let (y0, gx0, gg0, gb0, bn0) = run(false);
        assert!(max_rel_diff(y1, y0) < 1e-4, "relu {relu}: output");
        assert!(max_rel_diff(gx1, gx0) < 1e-4, "relu {relu}: input gradient");
        assert!(
            max_rel_diff1(gg1, gg0) < 1e-4,
            "relu {relu}: gamma gradient"
        );
        assert!(max_rel_diff1(gb1, gb0) < 1e-4, "relu {relu}: beta gradient");
        let stats = |bn: &BatchNorm| (bn.running_mean.value(), bn.running_var.value());
        let ((m1, v1), (m0, v0)) = (stats(&bn1), stats(&bn0));
        assert!(max_rel_diff1(m1, m0) < 1e-4 && max_rel_diff1(v1, v0) < 1e-4);
        // Inference: plain device, running statistics.
        let plain = Device::flex();
        let bn = bn0.valid();
        let xi = x.clone().inner().to_device(&plain);
        let want = bn.forward(xi.clone());
        let want = if relu { activation::relu(want) } else { want };
        assert!(
            max_rel_diff(batch_norm(&bn, xi, relu), want) < 1e-4,
            "relu {relu}: infer"
        );
    }
}

/// Inference's folded convolution + batch norm (+ ReLU) against Burn's convolution then
/// batch norm then ReLU, on each kernel's geometry (Winograd, direct, im2col with stride
/// 2, pointwise), with and without a convolution bias; and the training path unchanged.
#[test]
fn folded_conv_bn_matches_burn_in_inference() {
    use burn::nn::BatchNormConfig;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    let device = Device::flex();
    for (cin, cout, hw, k, s, p, bias) in [
        (32, 40, 9, 3, 1, 1, false),
        (16, 16, 17, 3, 1, 1, true),
        (3, 16, 16, 3, 1, 1, false),
        (8, 12, 11, 3, 2, 1, true),
        (6, 10, 8, 1, 2, 0, false),
    ] {
        let conv = Conv2dConfig::new([cin, cout], [k, k])
            .with_stride([s, s])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .with_bias(bias)
            .init(&device);
        let mut bn = BatchNormConfig::new(cout).init(&device);
        let stat = |mean: f64, sd: f64| {
            Tensor::<1>::random([cout], Distribution::Normal(mean, sd), &device)
        };
        bn.gamma = burn::module::Param::from_tensor(stat(1.0, 0.5));
        bn.beta = burn::module::Param::from_tensor(stat(0.0, 0.5));
        bn.running_mean = burn::module::RunningState::new(stat(0.2, 0.5));
        bn.running_var = burn::module::RunningState::new(stat(0.0, 1.0).abs() + 0.1);
        let x = Tensor::<4>::random([3, cin, hw, hw], Distribution::Normal(0.0, 1.0), &device);
        for relu in [true, false] {
            let want = bn.forward(conv.forward(x.clone()));
            let want = if relu { activation::relu(want) } else { want };
            let got = conv_bn(&conv, &bn, x.clone(), relu, Precision::Fp32);
            let d = max_rel_diff(got, want);
            assert!(
                d < 1e-4,
                "{cin}->{cout} {hw}px {k}x{k}/{s} bias {bias} relu {relu}: {d}"
            );
        }
    }
}

/// Inference keeps each layer's folded weights between calls ([`super::infer`]): a second
/// call gives the first one's bits, and after the weights are updated (the optimiser's step,
/// which tries to write in place, then a new tensor under the same parameter, as the trainer
/// sets it) or the batch norm's running statistics change, the output follows them.
#[test]
fn folded_weights_are_kept_between_calls_and_follow_updates() {
    use burn::nn::BatchNormConfig;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    let device = Device::flex();
    let mut conv = Conv2dConfig::new([32, 32], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(&device);
    let mut bn = BatchNormConfig::new(32).init(&device);
    bn.running_var = burn::module::RunningState::new(Tensor::<1>::full([32], 2.0, &device));
    let x = Tensor::<4>::random([1, 32, 12, 12], Distribution::Normal(0.0, 1.0), &device);
    let reference = |conv: &burn::nn::conv::Conv2d, bn: &burn::nn::BatchNorm| {
        activation::relu(bn.forward(conv.forward(x.clone())))
    };
    let check = |conv: &burn::nn::conv::Conv2d, bn: &burn::nn::BatchNorm, what: &str| {
        let first = conv_bn(conv, bn, x.clone(), true, Precision::Fp32);
        let again = conv_bn(conv, bn, x.clone(), true, Precision::Fp32);
        let bits = |t: &Tensor<4>| -> Vec<u32> {
            t.to_data()
                .try_to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect()
        };
        assert_eq!(bits(&first), bits(&again), "{what}: a second call differs");
        let d = max_rel_diff(first.clone(), reference(conv, bn));
        assert!(
            d < 1e-4,
            "{what}: {d} from Burn's convolution and batch norm"
        );
        first
    };
    let before = check(&conv, &bn, "first");
    let weight = conv.weight.val();
    let dims = weight.dims();
    let flat = weight.reshape([dims.iter().product::<usize>()]);
    let grad = Tensor::<1>::ones(flat.dims(), &device);
    let h = update::SgdStep {
        lr: 0.05,
        weight_decay: 0.0,
        momentum: 0.0,
        nesterov: false,
    };
    let (stepped, _) = sgd_step(flat, grad, None, h);
    conv.weight = burn::module::Param::initialized(conv.weight.id, stepped.reshape(dims));
    let stepped = check(&conv, &bn, "after an optimiser step");
    assert!(
        max_rel_diff(stepped.clone(), before) > 1e-3,
        "the step changed nothing"
    );
    bn.running_mean = burn::module::RunningState::new(Tensor::<1>::full([32], 0.3, &device));
    let moved = check(&conv, &bn, "after new running statistics");
    assert!(
        max_rel_diff(moved, stepped) > 1e-3,
        "the statistics changed nothing"
    );
}

/// Inference's Winograd layers without a batch norm (VGG, AlexNet) keep their transformed
/// weights too: a second call gives the first one's bits, both tiles (32 and 12 px maps) match
/// Burn's convolution, and a new weight tensor under the same parameter is followed.
#[test]
fn winograd_weights_are_kept_between_inference_calls() {
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    let device = Device::flex();
    let mut conv = Conv2dConfig::new([64, 64], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&device);
    let bits = |t: &Tensor<4>| -> Vec<u32> {
        let v = t.to_data().try_to_vec::<f32>().unwrap();
        v.iter().map(|v| v.to_bits()).collect()
    };
    for hw in [32, 12] {
        let x = Tensor::<4>::random([1, 64, hw, hw], Distribution::Normal(0.0, 1.0), &device);
        let g = conv::ConvGeom {
            batch: 1,
            cin: 64,
            h: hw,
            w: hw,
            cout: 64,
            kh: 3,
            kw: 3,
            stride: [1, 1],
            pad: [1, 1],
            precision: Precision::Fp32,
        };
        assert!(winograd::applies(&g), "{hw} px is not a Winograd layer");
        let first = conv2d(&conv, x.clone(), Precision::Fp32);
        let again = conv2d(&conv, x.clone(), Precision::Fp32);
        assert_eq!(bits(&first), bits(&again), "{hw} px: a second call differs");
        let d = max_rel_diff(first.clone(), conv.forward(x.clone()));
        assert!(d < 1e-4, "{hw} px: {d} from Burn's convolution");
        let scaled = conv.weight.val() * 1.5;
        conv.weight = burn::module::Param::initialized(conv.weight.id, scaled);
        let after = conv2d(&conv, x.clone(), Precision::Fp32);
        let d = max_rel_diff(after.clone(), conv.forward(x.clone()));
        assert!(
            d < 1e-4,
            "{hw} px after an update: {d} from Burn's convolution"
        );
        assert!(
            max_rel_diff(after, first) > 1e-3,
            "{hw} px: the update changed nothing"
        );
    }
}

/// The max-pool kernel against Burn's: AlexNet's overlapping 3/2, VGG's 2/2, ResNet's
/// padded 3/2/1 and GoogLeNet's ceil mode; output and input gradient.
#[test]
fn max_pool_matches_burn() {
    use burn::nn::pool::MaxPool2dConfig;
    let device = Device::flex().autodiff();
    for (k, s, p, ceil, hw) in [
        (3, 2, 0, false, 13),
        (2, 2, 0, false, 8),
        (3, 2, 1, false, 9),
        (3, 2, 0, true, 14),
    ] {
        let pool = MaxPool2dConfig::new([k, k])
            .with_strides([s, s])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .with_ceil_mode(ceil)
            .init();
        let x = Tensor::<4>::random([2, 3, hw, hw], Distribution::Normal(0.0, 1.0), &device);
        let run = |fast: bool| {
            let x = x.clone().require_grad();
            let y = if fast {
                max_pool2d(&pool, x.clone())
            } else {
                pool.forward(x.clone())
            };
            // d/dy of sum(y * (y + 1), y held constant): distinct per output.
            let grads = (y.clone() * y.clone().detach().add_scalar(1.0))
                .sum()
                .backward();
            (y.inner(), x.grad(&grads).unwrap())
        };
        let ((y1, g1), (y0, g0)) = (run(true), run(false));
        assert_eq!(y1.dims(), y0.dims(), "k{k} s{s} p{p} ceil {ceil}");
        assert!(
            max_rel_diff(y1, y0) < 1e-6,
            "k{k} s{s} p{p} ceil {ceil}: output"
        );
        assert!(
            max_rel_diff(g1, g0) < 1e-6,
            "k{k} s{s} p{p} ceil {ceil}: gradient"
        );
    }
}

#[test]
fn kernel_choice_parses_and_rejects_typos() {
    assert_eq!(parse_kernels(None), Ok(Kernels::Convlab));
    assert_eq!(parse_kernels(Some("convlab")), Ok(Kernels::Convlab));
    assert_eq!(parse_kernels(Some("burn")), Ok(Kernels::Burn));
    let e = parse_kernels(Some("Burn")).unwrap_err();
    assert!(e.contains("CONVLAB_KERNELS=Burn"), "{e}");
}

/// Without autodiff the same op runs on the plain backend.
#[test]
fn gemm_conv_runs_without_autodiff() {
    let device = Device::flex();
    let x = Tensor::<4>::random([2, 3, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let w = Tensor::<4>::random([4, 3, 3, 3], Distribution::Normal(0.0, 1.0), &device);
    let y = gemm_conv2d(x.clone(), w.clone(), None, [1, 1], [1, 1], Precision::Fp32);
    let want = burn_conv2d(x, w, None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
    assert!(max_rel_diff(y, want) < 1e-4);
}

/// The in-place SGD step on burn-flex gives the bits of the tensor formula (as Burn's own ops
/// compute it: [`sgd_tensors`], the other backends' path), first step and later ones, shared or owned inputs, and leaves a tensor that
/// shares the weight's storage untouched.
#[test]
fn sgd_step_matches_the_tensor_formula() {
    let device = Device::flex();
    let n = 70_001;
    let rand = || Tensor::<1>::random([n], Distribution::Normal(0.0, 1.0), &device);
    let (w0, g0, g1) = (rand(), rand(), rand());
    let h = update::SgdStep {
        lr: 0.1,
        weight_decay: 5e-4,
        momentum: 0.9,
        nesterov: true,
    };
    let formula = |w, g, buf| {
        let (w, b) = sgd_tensors(w, g, buf, h);
        (w, b.unwrap())
    };
    let bits = |t: &Tensor<1>| t.to_data().try_to_vec::<f32>().unwrap();
    let (want_w1, want_b1) = formula(w0.clone(), g0.clone(), None);
    let (want_w2, want_b2) = formula(want_w1.clone(), g1.clone(), Some(want_b1.clone()));
    let w0_before = bits(&w0);
    // w0 is still held here, so the kernel must copy it rather than write through it.
    let (w1, b1) = sgd_step(w0.clone(), g0.clone(), None, h);
    let b1 = b1.unwrap();
    assert_eq!(bits(&w0), w0_before, "a shared weight was written through");
    assert_eq!(bits(&w1), bits(&want_w1));
    assert_eq!(bits(&b1), bits(&want_b1));
    let (w2, b2) = sgd_step(w1, g1, Some(b1), h);
    assert_eq!(bits(&w2), bits(&want_w2));
    assert_eq!(bits(&b2.unwrap()), bits(&want_b2));
}

/// The in-place AdamW step on burn-flex gives the bits of the tensor formula (Burn's ops:
/// [`adamw_tensors`], the other backends' path), first step and a later one.
#[test]
fn adamw_step_matches_the_tensor_formula() {
    let device = Device::flex();
    let n = 70_001;
    let rand = || Tensor::<1>::random([n], Distribution::Normal(0.0, 1.0), &device);
    let (w0, g0, g1) = (rand(), rand(), rand());
    let hyper = |t| update::AdamwStep::at_step(1e-3, 0.05, [0.9, 0.999], 1e-8, t);
    let formula = |w, g, mv, t| adamw_tensors(w, g, mv, hyper(t));
    let bits = |t: &Tensor<1>| t.to_data().try_to_vec::<f32>().unwrap();
    let (ww1, wm1, wv1) = formula(w0.clone(), g0.clone(), None, 1);
    let (ww2, wm2, wv2) = formula(ww1.clone(), g1.clone(), Some((wm1.clone(), wv1.clone())), 2);
    let (w1, m1, v1) = adamw_step(w0.clone(), g0.clone(), None, hyper(1));
    assert_eq!(bits(&w1), bits(&ww1));
    assert_eq!(bits(&m1), bits(&wm1));
    assert_eq!(bits(&v1), bits(&wv1));
    let (w2, m2, v2) = adamw_step(w1, g1, Some((m1, v1)), hyper(2));
    assert_eq!(bits(&w2), bits(&ww2));
    assert_eq!(bits(&m2), bits(&wm2));
    assert_eq!(bits(&v2), bits(&wv2));
}

/// bf16 activations in, bf16 out: each convlab op on a bf16 tensor returns the f32 op on the
/// same (widened) values rounded once to bf16, bit for bit, and its input's gradient likewise
/// in bf16; the weights' and batch norm's parameters' gradients stay f32 and equal.
#[test]
fn bf16_activations_are_the_f32_ops_rounded_once() {
    let device = Device::flex().autodiff();
    let rounded = |t: Tensor<4>| t.cast(DType::BF16).cast(DType::F32);
    let bits = |t: Tensor<4>| t.cast(DType::F32).into_data().try_to_vec::<f32>().unwrap();
    let x0 = Tensor::<4>::random([3, 8, 9, 9], Distribution::Normal(0.0, 1.0), &device);
    let xb = x0.clone().cast(DType::BF16).detach();
    let xf = xb.clone().cast(DType::F32).detach();
    let w = Tensor::<4>::random([6, 8, 3, 3], Distribution::Normal(0.0, 0.3), &device);
    let bn = burn::nn::BatchNormConfig::new(8).init(&device);
    let pool = burn::nn::pool::MaxPool2dConfig::new([3, 3])
        .with_strides([2, 2])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init();
    let other = rounded(Tensor::<4>::random(
        [3, 8, 9, 9],
        Distribution::Normal(0.0, 1.0),
        &device,
    ));
    // Each op: output and the gradients of x (and the weight) for the weights `dy` (bf16
    // values, so both runs see the same ones).
    type Op<'a> = Box<dyn Fn(Tensor<4>, Tensor<4>) -> Tensor<4> + 'a>;
    let ops: Vec<(&str, Op)> = vec![
        (
            "conv",
            Box::new(|x: Tensor<4>, w: Tensor<4>| {
                gemm_conv2d(x, w, None, [1, 1], [1, 1], Precision::Bf16)
            }),
        ),
        ("batch norm", Box::new(|x, _| batch_norm(&bn, x, true))),
        ("max pool", Box::new(|x, _| max_pool2d(&pool, x))),
        (
            "add relu",
            Box::new(|x: Tensor<4>, _| {
                let o = other.clone().cast(x.dtype());
                add_relu(x, o)
            }),
        ),
    ];
    for (name, op) in &ops {
        let run = |x: Tensor<4>| {
            let (x, w) = (x.require_grad(), w.clone().require_grad());
            let y = op(x.clone(), w.clone());
            // From a formula, not Burn's generator, which other tests draw from meanwhile.
            let dims = y.dims();
            let values = crate::kernels::conv::test_data(dims.iter().product(), 5);
            let dy = rounded(Tensor::<4>::from_data(
                TensorData::new(values, dims),
                &device,
            ))
            .cast(y.dtype());
            let grads = (y.clone() * dy).sum().backward();
            let gx = x.grad(&grads).unwrap();
            let gw = w.grad(&grads);
            (y.inner(), gx, gw)
        };
        let (yb, gxb, gwb) = run(xb.clone());
        let (yf, gxf, gwf) = run(xf.clone());
        assert_eq!(yb.dtype(), DType::BF16, "{name}: output dtype");
        assert_eq!(gxb.dtype(), DType::BF16, "{name}: input gradient dtype");
        assert_eq!(
            bits(yb),
            bits(rounded(yf.cast(DType::F32))),
            "{name}: output"
        );
        assert_eq!(bits(gxb), bits(rounded(gxf)), "{name}: input gradient");
        if let (Some(a), Some(e)) = (gwb, gwf) {
            assert_eq!(a.dtype(), DType::F32, "{name}: weight gradient dtype");
            assert_eq!(bits(a), bits(e), "{name}: weight gradient");
        }
    }
}

/// convlab's linear op gives Burn's output and gradients (input, weight, bias), on autodiff
/// and without, for a batch of one and a few.
#[test]
fn linear_matches_burns() {
    let device = Device::flex().autodiff();
    for n in [1, 5] {
        let x = Tensor::<2>::random([n, 37], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<2>::random([37, 19], Distribution::Normal(0.0, 0.3), &device);
        let b = Tensor::<1>::random([19], Distribution::Normal(0.0, 0.3), &device);
        let run = |ours: bool| {
            let (x, w, b) = (
                x.clone().require_grad(),
                w.clone().require_grad(),
                b.clone().require_grad(),
            );
            let y = if ours {
                linear(x.clone(), w.clone(), Some(b.clone()))
            } else {
                burn::tensor::module::linear(x.clone(), w.clone(), Some(b.clone()))
            };
            let grads = (y.clone() * y.clone()).sum().backward();
            let rows = |t: Tensor<2>| t.reshape([1, 1, 1, -1]);
            (
                rows(y.inner()),
                rows(x.grad(&grads).unwrap()),
                rows(w.grad(&grads).unwrap()),
                b.grad(&grads).unwrap(),
            )
        };
        let (y, gx, gw, gb) = run(true);
        let (y0, gx0, gw0, gb0) = run(false);
        for (a, b, what) in [(y, y0, "output"), (gx, gx0, "dx"), (gw, gw0, "dw")] {
            let d = max_rel_diff(a, b);
            assert!(d < 1e-5, "{what} at batch {n}: {d}");
        }
        assert!(max_rel_diff1(gb, gb0) < 1e-5, "db at batch {n}");
        // Without autodiff: the forward pass alone.
        let (xi, wi, bi) = (x.clone().inner(), w.clone().inner(), b.clone().inner());
        let a = linear(xi.clone(), wi.clone(), Some(bi.clone()));
        let e = burn::tensor::module::linear(xi, wi, Some(bi));
        assert!(max_rel_diff(a.reshape([1, 1, 1, -1]), e.reshape([1, 1, 1, -1])) < 1e-5);
    }
}

/// The ReLU fused into the convolution ([`gemm_conv2d_act`]) gives `relu(conv(x))`'s output
/// and gradients bit for bit, in fp32 and bf16 activations, with and without a bias, on every
/// algorithm the plan picks for these layers (Winograd or the channels-last tiles, the direct
/// kernels, an RGB stem, im2col, a 1x1 layer); also when the next op is one that overwrites
/// a sole summand in place (the residual add), which must not touch the output the fused
/// op's gradient is gated by.
#[test]
fn conv_relu_fused_is_relu_of_conv() {
    let device = Device::flex().autodiff();
    let bits = |t: Tensor<4>| t.cast(DType::F32).into_data().try_to_vec::<f32>().unwrap();
    for (cin, cout, hw, k, s, p) in [
        (32, 32, 16, 3, 1, 1),
        (16, 16, 17, 3, 1, 1),
        (3, 32, 16, 3, 1, 1),
        (8, 6, 9, 5, 2, 2),
        (64, 32, 14, 1, 1, 0),
    ] {
        let x0 = Tensor::<4>::random([2, cin, hw, hw], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<4>::random([cout, cin, k, k], Distribution::Normal(0.0, 0.3), &device);
        let b = Tensor::<1>::random([cout], Distribution::Normal(0.0, 0.5), &device);
        let ho = (hw + 2 * p - k) / s + 1;
        let shape = [2, cout, ho, ho];
        let other = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let dy = Tensor::<4>::from_data(
            TensorData::new(
                crate::kernels::conv::test_data(2 * cout * ho * ho, 7),
                shape,
            ),
            &device,
        );
        for (precision, dtype) in [
            (Precision::Fp32, DType::F32),
            (Precision::Bf16, DType::BF16),
        ] {
            for (bias, residual) in [(true, false), (false, false), (true, true)] {
                let run = |fused: bool| {
                    let x = x0.clone().cast(dtype).detach().require_grad();
                    let (w, b) = (w.clone().require_grad(), b.clone().require_grad());
                    let bias = bias.then(|| b.clone());
                    let y = if fused {
                        gemm_conv2d_act(x.clone(), w.clone(), bias, [s, s], [p, p], precision, true)
                    } else {
                        activation::relu(gemm_conv2d(
                            x.clone(),
                            w.clone(),
                            bias,
                            [s, s],
                            [p, p],
                            precision,
                        ))
                    };
                    let y = if residual {
                        add_relu(y, other.clone().cast(dtype))
                    } else {
                        y
                    };
                    let grads = (y.clone() * dy.clone().cast(y.dtype())).sum().backward();
                    let gb = b.grad(&grads).map(|g| g.reshape([1, 1, 1, cout]));
                    (
                        y.inner(),
                        x.grad(&grads).unwrap(),
                        w.grad(&grads).unwrap(),
                        gb,
                    )
                };
                let (y1, gx1, gw1, gb1) = run(true);
                let (y0, gx0, gw0, gb0) = run(false);
                let case = format!("{cin}->{cout} {hw}px k{k} s{s} {precision:?} bias {bias}");
                assert_eq!(y1.dtype(), dtype, "{case}: output dtype");
                assert_eq!(bits(y1), bits(y0), "{case}: output");
                assert_eq!(bits(gx1), bits(gx0), "{case}: input gradient");
                assert_eq!(bits(gw1), bits(gw0), "{case}: weight gradient");
                assert_eq!(gb1.is_some(), bias, "{case}");
                if let (Some(a), Some(e)) = (gb1, gb0) {
                    assert_eq!(bits(a), bits(e), "{case}: bias gradient");
                }
            }
        }
        // Without autodiff (inference): the same output.
        let (xi, wi, bi) = (x0.clone().inner(), w.clone().inner(), b.clone().inner());
        let a = gemm_conv2d_act(
            xi.clone(),
            wi.clone(),
            Some(bi.clone()),
            [s, s],
            [p, p],
            Precision::Fp32,
            true,
        );
        let e = activation::relu(gemm_conv2d(
            xi,
            wi,
            Some(bi),
            [s, s],
            [p, p],
            Precision::Fp32,
        ));
        assert_eq!(
            bits(a),
            bits(e),
            "{cin}->{cout} {hw}px k{k}: inference output"
        );
    }
}

/// Residual blocks through [`residual_entry`] and [`add_relu_shortcut`] give the plain
/// blocks' (`add_relu(branch(x), x)`) outputs and gradients bit for bit, fp32 and bf16, two
/// blocks in a row (the first one's output is the second one's entry and shortcut), then a
/// projection block (`add_relu(branch(x), down(x))`, its input through
/// [`Shortcut::into_input`]).
#[test]
fn residual_entry_is_the_plain_shortcut() {
    let device = Device::flex().autodiff();
    let bits = |t: Tensor<4>| t.cast(DType::F32).into_data().try_to_vec::<f32>().unwrap();
    let x0 = Tensor::<4>::random([2, 8, 6, 6], Distribution::Normal(0.0, 1.0), &device);
    let w1 = Tensor::<4>::random([8, 8, 3, 3], Distribution::Normal(0.0, 0.3), &device);
    let w2 = Tensor::<4>::random([8, 8, 3, 3], Distribution::Normal(0.0, 0.3), &device);
    let w3 = Tensor::<4>::random([12, 8, 3, 3], Distribution::Normal(0.0, 0.3), &device);
    let wd = Tensor::<4>::random([12, 8, 1, 1], Distribution::Normal(0.0, 0.3), &device);
    let dy = Tensor::<4>::from_data(
        TensorData::new(
            crate::kernels::conv::test_data(2 * 12 * 3 * 3, 3),
            [2, 12, 3, 3],
        ),
        &device,
    );
    for (precision, dtype) in [
        (Precision::Fp32, DType::F32),
        (Precision::Bf16, DType::BF16),
    ] {
        let run = |fused: bool| {
            let x = x0.clone().cast(dtype).detach().require_grad();
            let (w1, w2) = (w1.clone().require_grad(), w2.clone().require_grad());
            let (w3, wd) = (w3.clone().require_grad(), wd.clone().require_grad());
            let branch = |h: Tensor<4>| {
                let h = gemm_conv2d_act(h, w1.clone(), None, [1, 1], [1, 1], precision, true);
                gemm_conv2d(h, w2.clone(), None, [1, 1], [1, 1], precision)
            };
            let block = |h: Tensor<4>| {
                if fused {
                    let (entry, shortcut) = residual_entry(h);
                    add_relu_shortcut(branch(entry), shortcut)
                } else {
                    add_relu(branch(h.clone()), h)
                }
            };
            // 8 -> 12 channels at stride 2: a strided 3x3 branch, a strided 1x1 shortcut.
            let projection = |h: Tensor<4>| {
                let down = |h| gemm_conv2d(h, wd.clone(), None, [2, 2], [0, 0], precision);
                let branch = |h| gemm_conv2d(h, w3.clone(), None, [2, 2], [1, 1], precision);
                if fused {
                    let (entry, shortcut) = residual_entry(h);
                    let s = down(shortcut.into_input());
                    add_relu(branch(entry), s)
                } else {
                    add_relu(branch(h.clone()), down(h))
                }
            };
            let y = projection(block(block(x.clone())));
            let grads = (y.clone() * dy.clone().cast(y.dtype())).sum().backward();
            let [g1, g2, g3, gd] = [&w1, &w2, &w3, &wd].map(|w| bits(w.grad(&grads).unwrap()));
            (
                bits(y.inner()),
                bits(x.grad(&grads).unwrap()),
                [g1, g2, g3, gd],
            )
        };
        let (y1, gx1, gw1) = run(true);
        let (y0, gx0, gw0) = run(false);
        assert_eq!(y1, y0, "{precision:?}: output");
        assert_eq!(gx1, gx0, "{precision:?}: input gradient");
        for (i, (a, b)) in gw1.iter().zip(&gw0).enumerate() {
            assert_eq!(a, b, "{precision:?}: weight {i}'s gradient");
        }
    }
}
