//! Compute kernels convlab adds to Burn through its backend-extension mechanism.
//!
//! Model code stays backend-independent: it calls [`conv2d`] and [`batch_norm`], which take the fast path when the
//! tensor lives on burn-flex (with or without autodiff) and the convolution is one the kernel
//! covers (f32; for convolutions no groups, no dilation, symmetric padding), and Burn's own otherwise
//! (CUDA, wgpu, and the cases the kernel does not cover). On libtorch (`--features tch`),
//! convolutions and training batch norm run libtorch's own backward kernels ([`torch`]) where
//! Burn would compose them from other ops.
//!
//! `CONVLAB_KERNELS=burn` in the environment turns the fast paths off, for comparing the two
//! (`convlab bench` prints which one ran).

pub mod bf16;
mod buf;
pub mod conv;
pub mod direct;
#[cfg(feature = "flex")]
mod flex;
pub mod norm;
pub mod pool;
mod simd;
#[cfg(feature = "tch")]
mod torch;
pub mod winograd;

use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation;
use std::sync::OnceLock;

/// Which implementation the layers in this module use on burn-flex.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernels {
    /// convlab's kernels ([`conv`], [`norm`]) with their own backward passes.
    Convlab,
    /// Burn's built-in operations.
    Burn,
}

/// Reads a `CONVLAB_KERNELS` value: unset or empty or `convlab` selects convlab's kernels,
/// `burn` Burn's ops; anything else is an error naming the variable (the binary checks it at
/// start, so a typo does not silently measure the wrong thing).
pub fn parse_kernels(value: Option<&str>) -> Result<Kernels, String> {
    match value {
        None | Some("") | Some("convlab") => Ok(Kernels::Convlab),
        Some("burn") => Ok(Kernels::Burn),
        Some(other) => Err(format!(
            "CONVLAB_KERNELS={other}: expected `convlab` (the default) or `burn`"
        )),
    }
}

/// The kernels chosen for this process by `CONVLAB_KERNELS` ([`parse_kernels`]; an invalid
/// value counts as unset here, the binary having rejected it already).
pub fn kernels() -> Kernels {
    static CHOICE: OnceLock<Kernels> = OnceLock::new();
    *CHOICE.get_or_init(|| {
        parse_kernels(std::env::var("CONVLAB_KERNELS").ok().as_deref()).unwrap_or(Kernels::Convlab)
    })
}

/// Whether convlab's kernels run for float32 tensors on `device`: a burn-flex device (with or
/// without autodiff) and the kernels not switched off.
pub fn active_on(device: &Device) -> bool {
    kernels() == Kernels::Convlab && is_flex(device)
}

/// Whether convlab's kernels run on `device`: [`active_on`], or libtorch's backward kernels
/// through [`torch`] on a `tch` device.
pub fn extended_on(device: &Device) -> bool {
    active_on(device) || (kernels() == Kernels::Convlab && is_tch(device))
}

/// Whether convlab's kernels apply to `x`: f32 on burn-flex, and not switched off.
fn fast_path(x: &Tensor<4>) -> bool {
    x.dtype() == DType::F32 && active_on(&x.device())
}

/// Whether the libtorch extension applies to `x`: f32 on libtorch, and not switched off.
fn torch_path(x: &Tensor<4>) -> bool {
    x.dtype() == DType::F32 && kernels() == Kernels::Convlab && is_tch(&x.device())
}

/// Whether `device` is libtorch (directly or under autodiff).
fn is_tch(device: &Device) -> bool {
    #[cfg(feature = "tch")]
    {
        use burn::backend::DispatchDevice;
        match device.as_dispatch() {
            DispatchDevice::LibTorch(_) => true,
            DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::LibTorch(_)),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
    #[cfg(not(feature = "tch"))]
    {
        let _ = device;
        false
    }
}

/// Whether `device` is burn-flex (directly or under autodiff).
fn is_flex(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    {
        use burn::backend::DispatchDevice;
        match device.as_dispatch() {
            DispatchDevice::Flex(_) => true,
            DispatchDevice::Autodiff(inner) => matches!(**inner, DispatchDevice::Flex(_)),
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = device;
        false
    }
}

/// The arithmetic convolutions use: the recipe field `precision`.
///
/// With `bf16`, convolutions (forward and both gradients) multiply bf16-rounded operands and
/// sum in f32 ([`bf16`]); weights, optimiser state, batch-norm statistics, the loss and every
/// other operation stay f32, as with PyTorch's `torch.autocast(dtype=torch.bfloat16)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE single precision throughout.
    #[default]
    Fp32,
    /// bfloat16 products, f32 sums and state.
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "fp32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!(
                "unknown precision `{other}`: expected `fp32` or `bf16`"
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether `precision` can run on `device`: `Ok` with the precision that will run, or `Err`
/// with the reason it falls back to fp32 (for the caller to print).
pub fn supported_precision(precision: Precision, device: &Device) -> Result<Precision, String> {
    match precision {
        Precision::Fp32 => Ok(Precision::Fp32),
        Precision::Bf16 if !active_on(device) => Err(
            "bf16 convolutions are convlab kernels on burn-flex; this device computes in fp32"
                .to_string(),
        ),
        Precision::Bf16 if !bf16::available() => {
            Err("this CPU has no AVX512-BF16 instructions; computing in fp32".to_string())
        }
        Precision::Bf16 => Ok(Precision::Bf16),
    }
}

thread_local! {
    static PRECISION: std::cell::Cell<Precision> = const { std::cell::Cell::new(Precision::Fp32) };
}

/// The precision convolutions on this thread use (fp32 unless inside [`with_precision`]).
pub fn precision() -> Precision {
    PRECISION.with(|p| p.get())
}

/// Runs `f` with convolutions on this thread computed in `precision` (falling back to fp32
/// where [`supported_precision`] says it cannot run; the caller reports that). Backward passes
/// use the precision their forward pass ran with.
pub fn with_precision<R>(precision: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            PRECISION.with(|p| p.set(self.0));
        }
    }
    let effective = if precision == Precision::Bf16 && !bf16::available() {
        Precision::Fp32
    } else {
        precision
    };
    let _restore = Restore(PRECISION.with(|p| p.replace(effective)));
    f()
}

/// `[rows, columns]` of padding when it is the same on both sides; `None` for asymmetric or
/// `Same` padding (which depends on the input size), left to Burn.
fn symmetric_padding(padding: &PaddingConfig2d) -> Option<[usize; 2]> {
    // Explicit is (top, left, bottom, right).
    match *padding {
        PaddingConfig2d::Valid => Some([0, 0]),
        PaddingConfig2d::Explicit(t, l, b, r) if t == b && l == r => Some([t, l]),
        _ => None,
    }
}

/// `conv.forward(x)`, on the fast kernel where it applies.
///
/// # Shapes
/// `[B, C_in, H, W]` -> `[B, C_out, H_out, W_out]`.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let padding = symmetric_padding(&conv.padding);
    let plain = conv.groups == 1 && conv.dilation == [1, 1];
    let bias = || conv.bias.as_ref().map(|b| b.val());
    match padding {
        Some(padding) if plain && fast_path(&x) => {
            gemm_conv2d(x, conv.weight.val(), bias(), conv.stride, padding)
        }
        Some(padding) if plain && torch_path(&x) => {
            torch_conv2d(x, conv.weight.val(), bias(), conv.stride, padding)
        }
        _ => conv.forward(x),
    }
}

/// A convolution on libtorch whose backward pass is libtorch's `convolution_backward`.
#[cfg(feature = "tch")]
fn torch_conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: [usize; 2],
    padding: [usize; 2],
) -> Tensor<4> {
    use burn::backend::Dispatch;
    use torch::TorchKernelsBackend;
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(b) => <Dispatch as TorchKernelsBackend>::torch_conv2d_bias(
            x,
            weight,
            b.into_dispatch(),
            stride,
            padding,
        ),
        None => <Dispatch as TorchKernelsBackend>::torch_conv2d(x, weight, stride, padding),
    })
}

#[cfg(not(feature = "tch"))]
fn torch_conv2d(
    _: Tensor<4>,
    _: Tensor<4>,
    _: Option<Tensor<1>>,
    _: [usize; 2],
    _: [usize; 2],
) -> Tensor<4> {
    unreachable!("the libtorch convolution is only routed to on libtorch")
}

/// convlab's im2col + GEMM convolution on a burn-flex tensor, differentiable.
///
/// # Panics
/// On a tensor of any other backend.
#[cfg(feature = "flex")]
pub fn gemm_conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: [usize; 2],
    padding: [usize; 2],
) -> Tensor<4> {
    use burn::backend::Dispatch;
    use flex::GemmConvBackend;
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(b) => <Dispatch as GemmConvBackend>::gemm_conv2d_bias(
            x,
            weight,
            b.into_dispatch(),
            stride,
            padding,
        ),
        None => <Dispatch as GemmConvBackend>::gemm_conv2d(x, weight, stride, padding),
    })
}

#[cfg(not(feature = "flex"))]
pub fn gemm_conv2d(
    _x: Tensor<4>,
    _weight: Tensor<4>,
    _bias: Option<Tensor<1>>,
    _stride: [usize; 2],
    _padding: [usize; 2],
) -> Tensor<4> {
    unreachable!("the GEMM convolution is only routed to on burn-flex")
}

/// `bn.forward(conv.forward(x))`, then a ReLU when `relu`.
///
/// In inference on burn-flex (no gradients tracked) the batch norm is folded into the
/// convolution (`w' = w · γ/√(σ²+ε)` per output channel, `b' = β + (b - μ) · γ/√(σ²+ε)`, the
/// standard inference fusion) and the ReLU applied to each image's output as it is computed,
/// so the activation is written once instead of three times. Everywhere else (training, other
/// backends, frozen layers whose input gradient is wanted) it is [`conv2d`] then
/// [`batch_norm`].
///
/// # Shapes
/// `[B, C_in, H, W]` -> `[B, C_out, H_out, W_out]`.
pub fn conv_bn(conv: &Conv2d, bn: &BatchNorm, x: Tensor<4>, relu: bool) -> Tensor<4> {
    let padding = symmetric_padding(&conv.padding);
    let plain = conv.groups == 1 && conv.dilation == [1, 1];
    match padding {
        Some(padding) if plain && fast_path(&x) && !x.device().is_autodiff() => {
            let device = x.device();
            let mean = bn.running_mean.value().to_device(&device);
            let var = bn.running_var.value().to_device(&device);
            let scale = bn.gamma.val() * var.add_scalar(bn.epsilon).sqrt().recip();
            let shift = match &conv.bias {
                Some(b) => b.val() - mean,
                None => mean.neg(),
            } * scale.clone()
                + bn.beta.val();
            let cout = scale.dims()[0];
            let weight = conv.weight.val() * scale.reshape([cout, 1, 1, 1]);
            conv_bias_act_infer(x, weight, shift, conv.stride, padding, relu)
        }
        _ => batch_norm(bn, conv2d(conv, x), relu),
    }
}

#[cfg(feature = "flex")]
fn conv_bias_act_infer(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Tensor<1>,
    stride: [usize; 2],
    padding: [usize; 2],
    relu: bool,
) -> Tensor<4> {
    use burn::backend::Dispatch;
    use flex::ConvActInferBackend;
    Tensor::from_dispatch(<Dispatch as ConvActInferBackend>::conv_bias_act_infer(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        stride,
        padding,
        relu,
    ))
}

#[cfg(not(feature = "flex"))]
fn conv_bias_act_infer(
    _: Tensor<4>,
    _: Tensor<4>,
    _: Tensor<1>,
    _: [usize; 2],
    _: [usize; 2],
    _: bool,
) -> Tensor<4> {
    unreachable!("the folded convolution is only routed to on burn-flex")
}

/// `bn.forward(x)` followed by a ReLU when `relu`, as one fused pass where the fast path applies.
///
/// Same semantics as Burn's `BatchNorm::forward`: batch statistics (and a momentum update of the
/// running ones) when the device tracks gradients and the layer is not frozen, running statistics
/// otherwise.
///
/// # Shapes
/// `[B, C, H, W]` -> `[B, C, H, W]`.
pub fn batch_norm(bn: &BatchNorm, x: Tensor<4>, relu: bool) -> Tensor<4> {
    let training = x.device().is_autodiff() && bn.training.is_enabled();
    let torch_training = training && torch_path(&x);
    // A frozen layer on an autodiff device (the visualisations' input gradients) keeps Burn's
    // differentiable path; only plain inference uses the fused inference kernel.
    if !torch_training && (!fast_path(&x) || (x.device().is_autodiff() && !training)) {
        let y = bn.forward(x);
        return if relu { activation::relu(y) } else { y };
    }
    let device = x.device();
    if training {
        let train = if torch_training {
            torch_bn_act_train
        } else {
            bn_act_train
        };
        let (y, mean, var) = train(x, bn.gamma.val(), bn.beta.val(), bn.epsilon, relu);
        let m = bn.momentum;
        let running_mean = bn.running_mean.value_sync().to_device(&device);
        let running_var = bn.running_var.value_sync().to_device(&device);
        bn.running_mean
            .update((running_mean.mul_scalar(1.0 - m) + mean.detach().mul_scalar(m)).detach());
        bn.running_var
            .update((running_var.mul_scalar(1.0 - m) + var.detach().mul_scalar(m)).detach());
        y
    } else {
        bn_act_infer(
            x,
            bn.gamma.val(),
            bn.beta.val(),
            bn.running_mean.value().to_device(&device),
            bn.running_var.value().to_device(&device),
            bn.epsilon,
            relu,
        )
    }
}

#[cfg(feature = "flex")]
fn bn_act_train(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
    relu: bool,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    use burn::backend::Dispatch;
    use flex::BatchNormBackend;
    let (y, mean, var) = <Dispatch as BatchNormBackend>::bn_act_train(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        epsilon,
        relu,
    );
    (
        Tensor::from_dispatch(y),
        Tensor::from_dispatch(mean),
        Tensor::from_dispatch(var),
    )
}

#[cfg(feature = "tch")]
fn torch_bn_act_train(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    epsilon: f64,
    relu: bool,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    use burn::backend::Dispatch;
    use torch::TorchKernelsBackend;
    let (y, mean, var) = <Dispatch as TorchKernelsBackend>::torch_bn_act_train(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        epsilon,
        relu,
    );
    (
        Tensor::from_dispatch(y),
        Tensor::from_dispatch(mean),
        Tensor::from_dispatch(var),
    )
}

#[cfg(not(feature = "tch"))]
fn torch_bn_act_train(
    _: Tensor<4>,
    _: Tensor<1>,
    _: Tensor<1>,
    _: f64,
    _: bool,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    unreachable!("the libtorch batch norm is only routed to on libtorch")
}

#[cfg(feature = "flex")]
fn bn_act_infer(
    x: Tensor<4>,
    gamma: Tensor<1>,
    beta: Tensor<1>,
    mean: Tensor<1>,
    var: Tensor<1>,
    epsilon: f64,
    relu: bool,
) -> Tensor<4> {
    use burn::backend::Dispatch;
    use flex::BatchNormInferBackend;
    Tensor::from_dispatch(<Dispatch as BatchNormInferBackend>::bn_act_infer(
        x.into_dispatch(),
        gamma.into_dispatch(),
        beta.into_dispatch(),
        mean.into_dispatch(),
        var.into_dispatch(),
        epsilon,
        relu,
    ))
}

#[cfg(not(feature = "flex"))]
fn bn_act_train(
    _: Tensor<4>,
    _: Tensor<1>,
    _: Tensor<1>,
    _: f64,
    _: bool,
) -> (Tensor<4>, Tensor<1>, Tensor<1>) {
    unreachable!("the fused batch norm is only routed to on burn-flex")
}

#[cfg(not(feature = "flex"))]
#[allow(clippy::too_many_arguments)]
fn bn_act_infer(
    _: Tensor<4>,
    _: Tensor<1>,
    _: Tensor<1>,
    _: Tensor<1>,
    _: Tensor<1>,
    _: f64,
    _: bool,
) -> Tensor<4> {
    unreachable!("the fused batch norm is only routed to on burn-flex")
}

/// `pool.forward(x)`, on the fast kernel where it applies (no dilation, symmetric padding).
///
/// # Shapes
/// `[B, C, H, W]` -> `[B, C, H_out, W_out]`.
pub fn max_pool2d(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    let padding = symmetric_padding(&pool.padding);
    match padding {
        Some(padding) if pool.dilation == [1, 1] && fast_path(&x) => {
            fast_max_pool(x, pool.kernel_size, pool.stride, padding, pool.ceil_mode)
        }
        _ => pool.forward(x),
    }
}

#[cfg(feature = "flex")]
fn fast_max_pool(
    x: Tensor<4>,
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    ceil: bool,
) -> Tensor<4> {
    use burn::backend::Dispatch;
    use flex::MaxPoolBackend;
    Tensor::from_dispatch(<Dispatch as MaxPoolBackend>::max_pool(
        x.into_dispatch(),
        kernel,
        stride,
        padding,
        ceil,
    ))
}

#[cfg(not(feature = "flex"))]
fn fast_max_pool(_: Tensor<4>, _: [usize; 2], _: [usize; 2], _: [usize; 2], _: bool) -> Tensor<4> {
    unreachable!("the max pooling kernel is only routed to on burn-flex")
}

/// `relu(a + b)`: the end of a residual block (a shortcut added to the block's output, then
/// a ReLU). On burn-flex one parallel pass forward and one backward (the gradient through the
/// ReLU, shared by both summands) instead of Burn's add and ReLU and their two backward steps,
/// which run on the calling thread.
///
/// # Shapes
/// `a`, `b`: `[B, C, H, W]` (the same) -> `[B, C, H, W]`.
pub fn add_relu(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    if fast_path(&a) && b.dtype() == DType::F32 && a.dims() == b.dims() {
        fast_add_relu(a, b)
    } else {
        activation::relu(a + b)
    }
}

#[cfg(feature = "flex")]
fn fast_add_relu(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    use burn::backend::Dispatch;
    use flex::AddReluBackend;
    Tensor::from_dispatch(<Dispatch as AddReluBackend>::add_relu(
        a.into_dispatch(),
        b.into_dispatch(),
    ))
}

#[cfg(not(feature = "flex"))]
fn fast_add_relu(_: Tensor<4>, _: Tensor<4>) -> Tensor<4> {
    unreachable!("the fused add + ReLU is only routed to on burn-flex")
}

#[cfg(all(test, feature = "flex"))]
mod tests {
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
                    gemm_conv2d(x.clone(), w.clone(), bias, [s, s], [p, p])
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
    /// gradient to each summand (also when only one of them is tracked).
    #[test]
    fn add_relu_matches_burn() {
        let device = Device::flex().autodiff();
        let shape = [3, 5, 7, 9];
        let a = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let dy = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        for track_b in [true, false] {
            let run = |fast: bool| {
                let a = a.clone().require_grad();
                let b = if track_b {
                    b.clone().require_grad()
                } else {
                    b.clone()
                };
                let y = if fast {
                    add_relu(a.clone(), b.clone())
                } else {
                    activation::relu(a.clone() + b.clone())
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

    /// `with_precision(Bf16)` reaches the kernel through Burn's autodiff: the output and all
    /// gradients move by bf16 rounding (not more), and the backward pass keeps the precision of
    /// its forward pass even when it runs outside the scope.
    #[test]
    fn bf16_scope_reaches_the_kernel_and_its_backward() {
        if !bf16::available() {
            assert_eq!(
                with_precision(Precision::Bf16, precision),
                Precision::Fp32,
                "without AVX512-BF16 the scope falls back to fp32"
            );
            return;
        }
        let device = Device::flex().autodiff();
        let x = Tensor::<4>::random([2, 8, 10, 10], Distribution::Normal(0.0, 1.0), &device);
        let w = Tensor::<4>::random([16, 8, 3, 3], Distribution::Normal(0.0, 0.3), &device);
        let run = |p: Precision, backward_inside: bool| {
            let (x, w) = (x.clone().require_grad(), w.clone().require_grad());
            let (y, loss) = with_precision(p, || {
                let y = gemm_conv2d(x.clone(), w.clone(), None, [1, 1], [1, 1]);
                (y.clone(), (y.clone() * y).sum())
            });
            let grads = if backward_inside {
                with_precision(p, || loss.backward())
            } else {
                loss.backward()
            };
            (y.inner(), x.grad(&grads).unwrap(), w.grad(&grads).unwrap())
        };
        let (y32, gx32, gw32) = run(Precision::Fp32, true);
        let (y16, gx16, gw16) = run(Precision::Bf16, true);
        let (_, gx16b, gw16b) = run(Precision::Bf16, false);
        assert_eq!(precision(), Precision::Fp32, "the scope restores fp32");
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
            bf16::available() && kernels() == Kernels::Convlab
        );
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
                bn.gamma = burn::module::Param::from_tensor(Tensor::from_floats(
                    [1.3, -0.7, 0.4],
                    &device,
                ));
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
                let got = conv_bn(&conv, &bn, x.clone(), relu);
                let d = max_rel_diff(got, want);
                assert!(
                    d < 1e-4,
                    "{cin}->{cout} {hw}px {k}x{k}/{s} bias {bias} relu {relu}: {d}"
                );
            }
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
        let y = gemm_conv2d(x.clone(), w.clone(), None, [1, 1], [1, 1]);
        let want = burn_conv2d(x, w, None, ConvOptions::new([1, 1], [1, 1], [1, 1], 1));
        assert!(max_rel_diff(y, want) < 1e-4);
    }
}
