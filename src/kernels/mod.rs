//! Compute kernels convlab adds to Burn through its backend-extension mechanism.
//!
//! Model code stays backend-independent: it calls [`conv2d`] and [`batch_norm`], which take the fast path when the
//! tensor lives on burn-flex (with or without autodiff) and the convolution is one the kernel
//! covers (f32; for convolutions no groups, no dilation, symmetric padding), and Burn's own otherwise
//! (CUDA, wgpu, and the cases the kernel does not cover). On libtorch (`--features tch`),
//! convolutions and training batch norm run libtorch's own backward kernels ([`torch`]) where
//! Burn would compose them from other ops.
//!
//! [`select`]`(Kernels::Burn)` turns the fast paths off, for comparing the two (the binary does
//! it for `CONVLAB_KERNELS=burn`; `convlab bench` prints which one ran).

pub mod act;
pub mod amx;
pub mod bf16;
mod buf;
pub mod conv;
pub mod direct;
#[cfg(feature = "flex")]
mod fc;
#[cfg(feature = "flex")]
mod flex;
mod gemm;
pub mod im2col;
#[cfg(feature = "flex")]
mod infer;
pub mod nhwc;
mod nhwc_amx;
mod nhwc_phases;
pub mod norm;
pub mod plan;
pub mod pointwise;
pub mod pool;
mod simd;
mod stem;
#[cfg(feature = "tch")]
mod torch;
pub mod update;
mod vector;
pub mod winograd;
#[cfg(target_arch = "x86_64")]
mod winograd_simd;

use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::DType;
use burn::tensor::activation;
use std::sync::atomic::{AtomicU8, Ordering};

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

/// The process-wide choice: 0 = convlab's kernels (the default), 1 = Burn's ops.
static CHOICE: AtomicU8 = AtomicU8::new(0);

/// Chooses the kernels for this process. The library never reads the environment: the binary
/// parses `CONVLAB_KERNELS` ([`parse_kernels`]) and calls this once at start, before any model
/// runs; embedding code that never calls it gets convlab's kernels.
pub fn select(kernels: Kernels) {
    CHOICE.store(
        match kernels {
            Kernels::Convlab => 0,
            Kernels::Burn => 1,
        },
        Ordering::Relaxed,
    );
}

/// The kernels this process uses ([`select`]).
pub fn kernels() -> Kernels {
    match CHOICE.load(Ordering::Relaxed) {
        0 => Kernels::Convlab,
        _ => Kernels::Burn,
    }
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

/// Whether convlab's kernels apply to `x`: f32 or bf16 activations ([`activations`]) on
/// burn-flex, and not switched off.
fn fast_path(x: &Tensor<4>) -> bool {
    matches!(x.dtype(), DType::F32 | DType::BF16) && active_on(&x.device())
}

/// The dtype bf16 models keep their activations in between layers ([`activations`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActivationDtype {
    /// f32 activations; bf16 only inside the convolutions.
    F32,
    /// bf16 activations end to end while training (ResNet, VGG and the plain ConvNets in bf16,
    /// on an autodiff device: [`activations`]): the default.
    #[default]
    Bf16,
}

/// Reads a `CONVLAB_ACTIVATIONS` value: unset, empty or `bf16` stores bf16 models'
/// activations in bf16 while training (the default, see [`activations`]); `f32` keeps them in
/// f32.
/// Anything else is an error naming the variable.
pub fn parse_activations(value: Option<&str>) -> Result<ActivationDtype, String> {
    match value {
        None | Some("") | Some("bf16") => Ok(ActivationDtype::Bf16),
        Some("f32") => Ok(ActivationDtype::F32),
        Some(other) => Err(format!(
            "CONVLAB_ACTIVATIONS={other}: expected `bf16` (the default) or `f32`"
        )),
    }
}

/// The process-wide activation dtype: true = bf16 (the default), false = f32.
static BF16_ACTIVATIONS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Chooses the activation dtype of bf16 models for this process (the binary calls it once at
/// start from `CONVLAB_ACTIVATIONS`, [`parse_activations`]).
pub fn select_activations(dtype: ActivationDtype) {
    BF16_ACTIVATIONS.store(dtype == ActivationDtype::Bf16, Ordering::Relaxed);
}

/// The activation dtype bf16 models use in this process ([`select_activations`]).
pub fn activation_dtype() -> ActivationDtype {
    if BF16_ACTIVATIONS.load(Ordering::Relaxed) {
        ActivationDtype::Bf16
    } else {
        ActivationDtype::F32
    }
}

/// The activations a model computing in `precision` keeps between its layers: `x` stored in
/// bf16 when bf16 activations are selected ([`select_activations`]), `precision` is bf16 and
/// it runs ([`runnable`]) on convlab's kernels on an autodiff device (training, or gradients
/// of the input); else `x` as it is. Every convlab op takes
/// bf16 activations and returns its output (and its input's gradient) in bf16, with f32
/// weights, statistics and sums; a model calls this on its input and [`f32_activations`] on
/// its last feature map, so nothing outside it sees bf16.
///
/// PyTorch's `torch.autocast(dtype=torch.bfloat16)` with channels-last on oneDNN keeps the
/// same tensors in bf16 (convolution outputs, batch norm, ReLU, pooling, the residual add).
/// Here batch norm, the residual add and the ReLU gradient read bf16 in registers and round
/// each result once ([`simd`]); the convolutions' packers (im2col's column matrix, the bf16
/// GEMM's panels, the channels-last pairs, Winograd's padded rows) read the bf16 values as
/// they are, and their f32 sums are rounded to bf16 a few images at a time. Training speed
/// is within noise of f32 activations with 12-41% less peak memory (BENCHMARKS.md "bf16
/// activations between layers"); `CONVLAB_ACTIVATIONS=f32` keeps the f32 ones.
///
/// Only on an autodiff device: a training step keeps every activation for its backward pass,
/// and bf16 halves that memory at the same speed, but inference frees each map after the next
/// layer, so it saves little there while each convolution's rounding of its f32 sums costs
/// time: bf16 inference with bf16 activations ran at 0.88-0.93x of f32 activations on
/// resnet18 at 128 and 224 px and 0.92-1.00x on resnet50 (BENCHMARKS.md "bf16 activations
/// read by the kernels themselves").
pub fn activations(x: Tensor<4>, precision: Precision) -> Tensor<4> {
    if activation_dtype() == ActivationDtype::Bf16
        && runnable(precision) == Precision::Bf16
        && x.dtype() == DType::F32
        && x.device().is_autodiff()
        && fast_path(&x)
    {
        x.cast(DType::BF16)
    } else {
        x
    }
}

/// `x` in f32 (a no-op on f32): where a model's bf16 activations ([`activations`]) leave it.
pub fn f32_activations<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if x.dtype() == DType::F32 {
        x
    } else {
        x.cast(DType::F32)
    }
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
/// with the reason it falls back to fp32 (for the caller to print). bf16 runs where a unit
/// multiplies it faster than f32 ([`bf16_unit`] under this process's choices): on Intel's
/// Xeons without usable AMX tiles `VDPBF16PS` is slower than f32 FMAs, so f32 runs there.
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
        Precision::Bf16 if matrix_unit(Precision::Bf16) == "fp32" => Err(match bf16::policy() {
            bf16::Policy::Off => {
                "CONVLAB_VDPBF16PS=off and no AMX tiles in use; computing in fp32".to_string()
            }
            _ => "no AMX tiles in use, and this CPU's bf16 dot product (VDPBF16PS) is slower \
                  than its f32 FMAs; computing in fp32, which is faster here \
                  (CONVLAB_VDPBF16PS=on runs bf16 anyway)"
                .to_string(),
        }),
        Precision::Bf16 => Ok(Precision::Bf16),
    }
}

/// What multiplies convolutions' matrices in `precision` on this CPU (`convlab bench` prints
/// it): `amx-bf16` (the AMX tiles, [`amx`]), `avx512-bf16` (`VDPBF16PS`, [`bf16`]) or
/// `fp32` (f32 FMAs), under this process's `CONVLAB_AMX` and `CONVLAB_VDPBF16PS` choices.
pub fn matrix_unit(precision: Precision) -> &'static str {
    match precision {
        Precision::Bf16 => bf16_unit(amx::allowed(), bf16::policy()),
        Precision::Fp32 => "fp32",
    }
}

/// The unit bf16 products run on with the AMX tiles allowed or not and `dot` as the
/// `VDPBF16PS` policy: the tiles where allowed and usable, else `VDPBF16PS` where the policy
/// picks it ([`bf16::chosen`]), else `fp32`.
pub fn bf16_unit(amx: bool, dot: bf16::Policy) -> &'static str {
    if amx && amx::available() {
        "amx-bf16"
    } else if bf16::chosen(dot) {
        "avx512-bf16"
    } else {
        "fp32"
    }
}

/// Reads a `CONVLAB_AMX` value: unset, empty, `1` or `on` lets bf16 use the AMX tiles where
/// the CPU has them; `0` or `off` keeps it on AVX512-BF16 (to measure one against the other
/// on the same CPU). Anything else is an error naming the variable.
pub fn parse_amx(value: Option<&str>) -> Result<bool, String> {
    match value {
        None | Some("") | Some("1") | Some("on") => Ok(true),
        Some("0") | Some("off") => Ok(false),
        Some(other) => Err(format!(
            "CONVLAB_AMX={other}: expected `1`/`on` (the default: AMX where the CPU has it) or `0`/`off`"
        )),
    }
}

/// The precision a convolution asked for `precision` computes in: bf16 falls back to fp32 on
/// a CPU without AVX512-BF16 ([`supported_precision`] gives the caller the reason to print).
pub fn runnable(precision: Precision) -> Precision {
    if precision == Precision::Bf16 && !bf16::available() {
        Precision::Fp32
    } else {
        precision
    }
}

/// The `[rows, columns]` padding with which convlab's kernels compute a convolution with
/// `pads = [top, left, bottom, right]`: symmetric padding, no groups, no dilation. `None`
/// leaves the layer to Burn's own convolution (AlexNet's grouped layers, for one).
pub fn kernel_padding(pads: [usize; 4], dilation: [usize; 2], groups: usize) -> Option<[usize; 2]> {
    let [t, l, b, r] = pads;
    (groups == 1 && dilation == [1, 1] && t == b && l == r).then_some([t, l])
}

/// [`kernel_padding`] of a Burn convolution (`Same` padding depends on the input size: Burn's).
fn conv_padding(conv: &Conv2d) -> Option<[usize; 2]> {
    let pads = match conv.padding {
        PaddingConfig2d::Valid => [0; 4],
        PaddingConfig2d::Explicit(t, l, b, r) => [t, l, b, r],
        _ => return None,
    };
    kernel_padding(pads, conv.dilation, conv.groups)
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

/// `conv.forward(x)`, on the fast kernel where it applies, its products in `precision`
/// ([`runnable`]; Burn's and libtorch's convolutions compute in fp32). The backward pass runs
/// in the precision of its forward pass.
///
/// # Shapes
/// `[B, C_in, H, W]` -> `[B, C_out, H_out, W_out]`.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>, precision: Precision) -> Tensor<4> {
    conv2d_act(conv, x, false, precision)
}

/// [`conv2d`], then a ReLU when `relu` (a layer without batch norm: VGG, AlexNet, ZFNet). On
/// convlab's kernels the convolution's epilogue writes the ReLU and the backward pass gates
/// the output gradient by the saved output, so the activation is written once and kept once,
/// where `relu(conv(x))` writes it twice, keeps both copies for the backward pass and gates
/// through a mask of its own (vgg16's bf16 training step at 224 px spent 9% of its samples
/// in Burn's ReLU and its gradient; BENCHMARKS.md, "The ReLU in the convolution").
///
/// # Shapes
/// `[B, C_in, H, W]` -> `[B, C_out, H_out, W_out]`.
pub fn conv2d_act(conv: &Conv2d, x: Tensor<4>, relu: bool, precision: Precision) -> Tensor<4> {
    let padding = conv_padding(conv);
    let bias = || conv.bias.as_ref().map(|b| b.val());
    let act = |y: Tensor<4>| if relu { activation::relu(y) } else { y };
    match padding {
        Some(padding) if fast_path(&x) => gemm_conv2d_act(
            x,
            conv.weight.val(),
            bias(),
            conv.stride,
            padding,
            precision,
            relu,
        ),
        Some(padding) if torch_path(&x) => act(torch_conv2d(
            x,
            conv.weight.val(),
            bias(),
            conv.stride,
            padding,
        )),
        _ => act(conv.forward(x)),
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
pub fn gemm_conv2d(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: [usize; 2],
    padding: [usize; 2],
    precision: Precision,
) -> Tensor<4> {
    gemm_conv2d_act(x, weight, bias, stride, padding, precision, false)
}

/// [`gemm_conv2d`], then a ReLU when `relu`, fused ([`conv2d_act`]).
///
/// # Panics
/// On a tensor of any other backend.
#[cfg(feature = "flex")]
pub fn gemm_conv2d_act(
    x: Tensor<4>,
    weight: Tensor<4>,
    bias: Option<Tensor<1>>,
    stride: [usize; 2],
    padding: [usize; 2],
    precision: Precision,
    relu: bool,
) -> Tensor<4> {
    use burn::backend::Dispatch;
    use flex::GemmConvBackend;
    let bf16 = precision == Precision::Bf16;
    let (x, weight) = (x.into_dispatch(), weight.into_dispatch());
    Tensor::from_dispatch(match bias {
        Some(b) => <Dispatch as GemmConvBackend>::gemm_conv2d_bias(
            x,
            weight,
            b.into_dispatch(),
            stride,
            padding,
            bf16,
            relu,
        ),
        None => <Dispatch as GemmConvBackend>::gemm_conv2d(x, weight, stride, padding, bf16, relu),
    })
}

#[cfg(not(feature = "flex"))]
pub fn gemm_conv2d_act(
    _x: Tensor<4>,
    _weight: Tensor<4>,
    _bias: Option<Tensor<1>>,
    _stride: [usize; 2],
    _padding: [usize; 2],
    _precision: Precision,
    _relu: bool,
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
pub fn conv_bn(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: Tensor<4>,
    relu: bool,
    precision: Precision,
) -> Tensor<4> {
    let padding = conv_padding(conv);
    match padding {
        Some(padding) if fast_path(&x) && !x.device().is_autodiff() => {
            conv_bn_act_infer(conv, bn, x, padding, relu, precision)
        }
        _ => batch_norm(bn, conv2d(conv, x, precision), relu),
    }
}

/// The folded inference pass of [`conv_bn`] ([`flex::ConvActInferBackend::conv_bn_act_infer`]).
#[cfg(feature = "flex")]
fn conv_bn_act_infer(
    conv: &Conv2d,
    bn: &BatchNorm,
    x: Tensor<4>,
    padding: [usize; 2],
    relu: bool,
    precision: Precision,
) -> Tensor<4> {
    use burn::backend::Dispatch;
    use flex::ConvActInferBackend;
    let device = x.device();
    let gamma = bn.gamma.val();
    // Without a bias of its own the convolution passes γ in its place, unread.
    let bias = conv.bias.as_ref().map_or(gamma.clone(), |b| b.val());
    Tensor::from_dispatch(<Dispatch as ConvActInferBackend>::conv_bn_act_infer(
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        bias.into_dispatch(),
        gamma.into_dispatch(),
        bn.beta.val().into_dispatch(),
        bn.running_mean.value().to_device(&device).into_dispatch(),
        bn.running_var.value().to_device(&device).into_dispatch(),
        bn.epsilon,
        conv.bias.is_some(),
        conv.stride,
        padding,
        relu,
        precision == Precision::Bf16,
    ))
}

#[cfg(not(feature = "flex"))]
fn conv_bn_act_infer(
    _: &Conv2d,
    _: &BatchNorm,
    _: Tensor<4>,
    _: [usize; 2],
    _: bool,
    _: Precision,
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
    if fast_path(&a) && b.dtype() == a.dtype() && a.dims() == b.dims() {
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

/// A residual block's shortcut: the block's input, and (training on convlab's kernels) where
/// the residual add, or the projection's input ([`Shortcut::into_input`]), leaves its gradient
/// for the block's entry to add ([`residual_entry`], [`add_relu_shortcut`]).
pub struct Shortcut {
    x: Tensor<4>,
    #[cfg(feature = "flex")]
    grad: Option<flex::ShortcutGrad>,
}

/// A residual block's start: `x` as the branch's input, and the shortcut to end the block
/// with ([`add_relu_shortcut`]) or, for a projection shortcut, to take its input from
/// ([`Shortcut::into_input`]). Training on convlab's kernels, the block's
/// input gets its one gradient, the branch's and the shortcut's added by convlab's row
/// kernel, where `x` feeding both would have Burn add them in its gradient registry: for bf16
/// a scalar loop on one thread, 239 of 3339 samples (7%) of a resnet50 bf16 training step at
/// 224 px on the AMX Xeon, the other worker idle meanwhile (BENCHMARKS.md, "The ReLU in the
/// convolution"). Elsewhere the shortcut is `x` itself.
pub fn residual_entry(x: Tensor<4>) -> (Tensor<4>, Shortcut) {
    #[cfg(feature = "flex")]
    if fast_path(&x) && x.device().is_autodiff() {
        use burn::backend::Dispatch;
        use flex::ResidualBackend;
        let grad = flex::ShortcutGrad::default();
        let entry = Tensor::from_dispatch(<Dispatch as ResidualBackend>::residual_entry(
            x.clone().into_dispatch(),
            grad.clone(),
        ));
        // The entry's output, not `x`: a projection's input op ([`Shortcut::into_input`])
        // must be the entry's descendant, so that its backward step runs first.
        let shortcut = Shortcut {
            x: entry.clone(),
            grad: Some(grad),
        };
        return (entry, shortcut);
    }
    let shortcut = Shortcut {
        x: x.clone(),
        #[cfg(feature = "flex")]
        grad: None,
    };
    (x, shortcut)
}

impl Shortcut {
    /// The block's input for a projection shortcut (a strided or widening 1x1 convolution,
    /// ResNet-D's average pool before it): the same values, whose gradient the block's entry
    /// adds to the branch's ([`residual_entry`]); 4 of resnet50's 16 blocks.
    pub fn into_input(self) -> Tensor<4> {
        #[cfg(feature = "flex")]
        if let Some(grad) = self.grad {
            use burn::backend::Dispatch;
            use flex::ResidualBackend;
            return Tensor::from_dispatch(<Dispatch as ResidualBackend>::shortcut_input(
                self.x.into_dispatch(),
                grad,
            ));
        }
        self.x
    }
}

/// `relu(y + x)` for the shortcut of [`residual_entry`]: the end of the residual block.
///
/// # Shapes
/// `y`: `[B, C, H, W]`, the shape of the block's input -> `[B, C, H, W]`.
pub fn add_relu_shortcut(y: Tensor<4>, shortcut: Shortcut) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if let Some(grad) = shortcut.grad
        && fast_path(&y)
        && y.dtype() == shortcut.x.dtype()
        && y.dims() == shortcut.x.dims()
    {
        use burn::backend::Dispatch;
        use flex::ResidualBackend;
        return Tensor::from_dispatch(<Dispatch as ResidualBackend>::add_relu_shortcut(
            y.into_dispatch(),
            shortcut.x.into_dispatch(),
            grad,
        ));
    }
    add_relu(y, shortcut.x)
}

/// A fully connected layer, `x w + b` (`x` `[n, i]`, `w` `[i, o]` as Burn's `Linear` stores
/// it, `b` `[o]`): convlab's op on burn-flex for f32 (its outputs and gradients allocated once:
/// burn-flex's product allocates each twice), Burn's `linear` elsewhere.
pub fn linear(x: Tensor<2>, w: Tensor<2>, b: Option<Tensor<1>>) -> Tensor<2> {
    let flex_f32 = active_on(&x.device())
        && [x.dtype(), w.dtype()] == [DType::F32, DType::F32]
        && b.as_ref().is_some_and(|b| b.dtype() == DType::F32);
    match b {
        Some(b) if flex_f32 => fast_linear(x, w, b),
        b => burn::tensor::module::linear(x, w, b),
    }
}

#[cfg(feature = "flex")]
fn fast_linear(x: Tensor<2>, w: Tensor<2>, b: Tensor<1>) -> Tensor<2> {
    use burn::backend::Dispatch;
    use flex::LinearBackend;
    Tensor::from_dispatch(<Dispatch as LinearBackend>::linear(
        x.into_dispatch(),
        w.into_dispatch(),
        b.into_dispatch(),
    ))
}

#[cfg(not(feature = "flex"))]
fn fast_linear(_: Tensor<2>, _: Tensor<2>, _: Tensor<1>) -> Tensor<2> {
    unreachable!("convlab's linear op is only routed to on burn-flex")
}

#[cfg(all(test, feature = "flex"))]
mod tests;

/// One SGD step of a parameter (`w`, its gradient `g` and momentum buffer, flattened; the
/// formula is [`update`]'s): in place on burn-flex, as tensor operations elsewhere, the same bits
/// either way. Returns the new weight and, with momentum, the new buffer.
pub fn sgd_step(
    w: Tensor<1>,
    g: Tensor<1>,
    buf: Option<Tensor<1>>,
    h: update::SgdStep,
) -> (Tensor<1>, Option<Tensor<1>>) {
    #[cfg(feature = "flex")]
    if w.dtype() == DType::F32 && g.dtype() == DType::F32 && active_on(&w.device()) {
        use burn::backend::Dispatch;
        use flex::UpdateBackend;
        let (w, g) = (w.into_dispatch(), g.into_dispatch());
        let (w, b) = match buf {
            Some(b) if h.momentum != 0.0 => {
                <Dispatch as UpdateBackend>::sgd_momentum(w, g, b.into_dispatch(), h)
            }
            _ => <Dispatch as UpdateBackend>::sgd_first(w, g, h),
        };
        let buf = (h.momentum != 0.0).then(|| Tensor::from_dispatch(b));
        return (Tensor::from_dispatch(w), buf);
    }
    sgd_tensors(w, g, buf, h)
}

/// [`sgd_step`] as tensor operations: any backend, and the reference the kernel is tested
/// against.
fn sgd_tensors(
    w: Tensor<1>,
    g: Tensor<1>,
    buf: Option<Tensor<1>>,
    h: update::SgdStep,
) -> (Tensor<1>, Option<Tensor<1>>) {
    let mut g = g;
    if h.weight_decay != 0.0 {
        g = g + w.clone() * h.weight_decay;
    }
    if h.momentum == 0.0 {
        return (w - g * h.lr, None);
    }
    let buf = match buf {
        Some(b) => b * h.momentum + g.clone(),
        None => g.clone(),
    };
    let d = if h.nesterov {
        g + buf.clone() * h.momentum
    } else {
        buf.clone()
    };
    (w - d * h.lr, Some(buf))
}

/// One AdamW step of a parameter (flattened `w`, gradient `g`, and the moments `(m, v)` after
/// the first step; the formula is [`update::adamw`]'s): in place on burn-flex, as tensor
/// operations elsewhere. Returns the new weight, `m` and `v`.
pub fn adamw_step(
    w: Tensor<1>,
    g: Tensor<1>,
    moments: Option<(Tensor<1>, Tensor<1>)>,
    h: update::AdamwStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    #[cfg(feature = "flex")]
    if w.dtype() == DType::F32 && g.dtype() == DType::F32 && active_on(&w.device()) {
        use burn::backend::Dispatch;
        use flex::UpdateBackend;
        let (w, g) = (w.into_dispatch(), g.into_dispatch());
        let (w, m, v) = match moments {
            Some((m, v)) => <Dispatch as UpdateBackend>::adamw_next(
                w,
                g,
                m.into_dispatch(),
                v.into_dispatch(),
                h,
            ),
            None => <Dispatch as UpdateBackend>::adamw_first(w, g, h),
        };
        return (
            Tensor::from_dispatch(w),
            Tensor::from_dispatch(m),
            Tensor::from_dispatch(v),
        );
    }
    adamw_tensors(w, g, moments, h)
}

/// [`adamw_step`] as tensor operations: any backend, and the reference the kernel is tested
/// against.
fn adamw_tensors(
    w: Tensor<1>,
    g: Tensor<1>,
    moments: Option<(Tensor<1>, Tensor<1>)>,
    h: update::AdamwStep,
) -> (Tensor<1>, Tensor<1>, Tensor<1>) {
    let mut w = w;
    if h.lr_decay != 0.0 {
        w = w.clone() - w * h.lr_decay;
    }
    let (m, v) = match moments {
        Some((m, v)) => (
            m * h.b1 + g.clone() * h.one_minus_b1,
            v * h.b2 + g.clone() * g * h.one_minus_b2,
        ),
        None => (g.clone() * h.one_minus_b1, g.clone() * g * h.one_minus_b2),
    };
    let mhat = m.clone() / h.correction1;
    let vhat = v.clone() / h.correction2;
    (w - mhat / (vhat.sqrt() + h.eps) * h.lr, m, v)
}
