//! libtorch's own backward kernels for convolutions and batch norm on the `tch` backend,
//! registered with Burn as a backend extension (the same mechanism as [`super::flex`]).
//!
//! Burn 0.22.1 differentiates a convolution on libtorch generically: the weight gradient is a
//! second convolution with the batch as channels, which oneDNN runs far slower than its
//! backward-weights kernel; a training batch norm's gradient is a chain of about ten elementwise
//! libtorch ops. PyTorch's autograd calls `at::convolution_backward` and
//! `at::native_batch_norm_backward` instead. Neither is exposed by the `tch` crate burn-tch pins
//! (0.22.0) or by its C API, so `torch_shim.cpp` (compiled by build.rs against the same libtorch)
//! wraps the two, and this module calls them from the backward passes. Forward passes are the
//! libtorch ops Burn calls too (`conv2d`, `native_batch_norm`).
#![allow(deprecated)] // burn-tch is marked deprecated upstream; the `tch` feature is opt-in.

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::libtorch::TchTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, LibTorch, backend_extension};
use std::ffi::{CStr, c_char};
use torch_sys::C_tensor;

unsafe extern "C" {
    fn convlab_conv2d_backward(
        dy: *const C_tensor,
        x: *const C_tensor,
        w: *const C_tensor,
        stride: *const i64,
        padding: *const i64,
        mask: *const bool,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    #[allow(clippy::too_many_arguments)]
    fn convlab_batch_norm_backward(
        dy: *const C_tensor,
        x: *const C_tensor,
        gamma: *const C_tensor,
        mean: *const C_tensor,
        invstd: *const C_tensor,
        eps: f64,
        mask: *const bool,
        out: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn convlab_free_message(message: *mut c_char);
}

/// Turns the shim's result into the requested gradients: panics with libtorch's message when it
/// threw (as every `tch` op does on error), else takes ownership of the returned tensors.
fn gradients(error: *mut c_char, out: [*mut C_tensor; 3]) -> [Option<tch::Tensor>; 3] {
    if !error.is_null() {
        // SAFETY: a non-null result is a NUL-terminated string the shim allocated.
        let message = unsafe { CStr::from_ptr(error) }
            .to_string_lossy()
            .into_owned();
        unsafe { convlab_free_message(error) };
        panic!("libtorch backward kernel failed: {message}");
    }
    // SAFETY: non-null outputs are `new at::Tensor` the caller owns; tch frees them on drop.
    out.map(|p| (!p.is_null()).then(|| unsafe { tch::Tensor::from_ptr(p) }))
}

/// `(dx, dw, db)` of a convolution without groups or dilation, each where `need` asks.
fn conv2d_backward(
    dy: &tch::Tensor,
    x: &tch::Tensor,
    w: &tch::Tensor,
    stride: [usize; 2],
    padding: [usize; 2],
    need: [bool; 3],
) -> [Option<tch::Tensor>; 3] {
    let (stride, padding) = (stride.map(|s| s as i64), padding.map(|p| p as i64));
    let mut out = [std::ptr::null_mut(); 3];
    // SAFETY: the tensors are live for the call; the shim only reads the inputs and the arrays.
    let error = unsafe {
        convlab_conv2d_backward(
            dy.as_ptr(),
            x.as_ptr(),
            w.as_ptr(),
            stride.as_ptr(),
            padding.as_ptr(),
            need.as_ptr(),
            out.as_mut_ptr(),
        )
    };
    gradients(error, out)
}

#[backend_extension(LibTorch, Autodiff)]
pub trait TorchKernelsBackend: Backend {
    /// A 2-D convolution without groups or dilation, symmetric padding.
    fn torch_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;
    /// As [`Self::torch_conv2d`], plus a bias per output channel.
    fn torch_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;
    /// Training-mode batch norm (batch statistics), then a ReLU when `relu`: the output and the
    /// batch mean and biased variance (`[C]`, not differentiated), as
    /// [`super::flex::BatchNormBackend::bn_act_train`].
    fn torch_bn_act_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

fn conv_forward(
    x: &TchTensor,
    w: &TchTensor,
    b: Option<&TchTensor>,
    stride: [usize; 2],
    padding: [usize; 2],
) -> TchTensor {
    TchTensor::new(tch::Tensor::conv2d(
        &x.tensor,
        &w.tensor,
        b.map(|b| &b.tensor),
        stride.map(|s| s as i64),
        padding.map(|p| p as i64),
        [1, 1],
        1,
    ))
}

/// The training forward pass: `(y, mean, invstd)` as libtorch returns them.
fn bn_forward(
    x: &TchTensor,
    gamma: &TchTensor,
    beta: &TchTensor,
    eps: f64,
    relu: bool,
) -> (TchTensor, TchTensor, TchTensor) {
    let (mut y, mean, invstd) = x.tensor.native_batch_norm(
        Some(&gamma.tensor),
        Some(&beta.tensor),
        None,
        None,
        true,
        0.0,
        eps,
    );
    if relu {
        let _ = y.relu_();
    }
    (
        TchTensor::new(y),
        TchTensor::new(mean),
        TchTensor::new(invstd),
    )
}

/// The biased batch variance from libtorch's `invstd = 1 / sqrt(var + eps)`.
fn variance(invstd: &TchTensor, eps: f64) -> TchTensor {
    TchTensor::new(invstd.tensor.pow_tensor_scalar(-2.0).g_sub_scalar(eps))
}

impl TorchKernelsBackend for LibTorch {
    fn torch_conv2d(x: TchTensor, w: TchTensor, stride: [usize; 2], pad: [usize; 2]) -> TchTensor {
        conv_forward(&x, &w, None, stride, pad)
    }
    fn torch_conv2d_bias(
        x: TchTensor,
        w: TchTensor,
        b: TchTensor,
        stride: [usize; 2],
        pad: [usize; 2],
    ) -> TchTensor {
        conv_forward(&x, &w, Some(&b), stride, pad)
    }
    fn torch_bn_act_train(
        x: TchTensor,
        gamma: TchTensor,
        beta: TchTensor,
        epsilon: f64,
        relu: bool,
    ) -> (TchTensor, TchTensor, TchTensor) {
        let (y, mean, invstd) = bn_forward(&x, &gamma, &beta, epsilon, relu);
        let var = variance(&invstd, epsilon);
        (y, mean, var)
    }
}

/// Saved for the convolution's backward pass: the input and weight nodes, stride, padding.
type ConvState = (NodeId, NodeId, [usize; 2], [usize; 2]);

fn conv_backward<const N: usize>(
    ops: Ops<ConvState, N>,
    grads: &mut Gradients,
    checkpointer: &mut Checkpointer,
) {
    let (x_id, w_id, stride, padding) = ops.state;
    let dy: TchTensor = grads.consume::<LibTorch>(&ops.node);
    let x: TchTensor = checkpointer.retrieve_node_output(x_id);
    let w: TchTensor = checkpointer.retrieve_node_output(w_id);
    let need = [0, 1, 2].map(|i| ops.parents.get(i).is_some_and(|p| p.is_some()));
    let grad = conv2d_backward(&dy.tensor, &x.tensor, &w.tensor, stride, padding, need);
    for (parent, grad) in ops.parents.iter().zip(grad) {
        if let (Some(node), Some(grad)) = (parent, grad) {
            grads.register::<LibTorch>(node.id, TchTensor::new(grad));
        }
    }
}

#[derive(Debug)]
struct TorchConvWithBias;
#[derive(Debug)]
struct TorchConvNoBias;

impl Backward<LibTorch, 3> for TorchConvWithBias {
    type State = ConvState;
    fn backward(self, ops: Ops<ConvState, 3>, grads: &mut Gradients, cp: &mut Checkpointer) {
        conv_backward(ops, grads, cp)
    }
}

impl Backward<LibTorch, 2> for TorchConvNoBias {
    type State = ConvState;
    fn backward(self, ops: Ops<ConvState, 2>, grads: &mut Gradients, cp: &mut Checkpointer) {
        conv_backward(ops, grads, cp)
    }
}

#[derive(Debug)]
struct TorchBnActTrain;

/// The input node, γ, the batch mean and inverse deviation, ε, and the output when a ReLU
/// followed (its sign is the ReLU's mask).
type BnState = (
    NodeId,
    TchTensor,
    TchTensor,
    TchTensor,
    f64,
    Option<TchTensor>,
);

impl Backward<LibTorch, 3> for TorchBnActTrain {
    type State = BnState;
    fn backward(self, ops: Ops<BnState, 3>, grads: &mut Gradients, cp: &mut Checkpointer) {
        let (x_id, gamma, mean, invstd, eps, relu_out) = ops.state;
        let dy: TchTensor = grads.consume::<LibTorch>(&ops.node);
        let x: TchTensor = cp.retrieve_node_output(x_id);
        let dy = match relu_out {
            // tch's receiver is the ReLU's output, the argument the incoming gradient.
            Some(y) => y.tensor.threshold_backward(&dy.tensor, 0.0),
            None => dy.tensor,
        };
        let need = [0, 1, 2].map(|i| ops.parents.get(i).is_some_and(|p| p.is_some()));
        let mut out = [std::ptr::null_mut(); 3];
        // SAFETY: as in `conv2d_backward`.
        let error = unsafe {
            convlab_batch_norm_backward(
                dy.as_ptr(),
                x.tensor.as_ptr(),
                gamma.tensor.as_ptr(),
                mean.tensor.as_ptr(),
                invstd.tensor.as_ptr(),
                eps,
                need.as_ptr(),
                out.as_mut_ptr(),
            )
        };
        for (parent, grad) in ops.parents.iter().zip(gradients(error, out)) {
            if let (Some(node), Some(grad)) = (parent, grad) {
                grads.register::<LibTorch>(node.id, TchTensor::new(grad));
            }
        }
    }
}

impl<C: CheckpointStrategy> TorchKernelsBackend for Autodiff<LibTorch, C> {
    fn torch_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        let y = || conv_forward(x.primitive(), weight.primitive(), None, stride, padding);
        match TorchConvNoBias
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (
                    prep.checkpoint(&x),
                    prep.checkpoint(&weight),
                    stride,
                    padding,
                );
                prep.finish(state, y())
            }
            OpsKind::UnTracked(prep) => prep.finish(y()),
        }
    }

    fn torch_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self> {
        let y = || {
            conv_forward(
                x.primitive(),
                weight.primitive(),
                Some(bias.primitive()),
                stride,
                padding,
            )
        };
        match TorchConvWithBias
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (
                    prep.checkpoint(&x),
                    prep.checkpoint(&weight),
                    stride,
                    padding,
                );
                prep.finish(state, y())
            }
            OpsKind::UnTracked(prep) => prep.finish(y()),
        }
    }

    fn torch_bn_act_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (y, mean, invstd) = bn_forward(
            x.primitive(),
            gamma.primitive(),
            beta.primitive(),
            epsilon,
            relu,
        );
        // Clones share burn-tch's storage count, so Burn never updates in place a tensor the
        // backward pass still reads (the mean it hands to the running statistics, the output).
        let stats = (
            FloatTensor::<Self>::new(mean.clone()),
            FloatTensor::<Self>::new(variance(&invstd, epsilon)),
        );
        let y = match TorchBnActTrain
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (
                    prep.checkpoint(&x),
                    gamma.primitive().clone(),
                    mean,
                    invstd,
                    epsilon,
                    relu.then(|| y.clone()),
                );
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, stats.0, stats.1)
    }
}

#[cfg(test)]
mod tests {
    use crate::kernels::{batch_norm, conv2d};
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::{BatchNormConfig, PaddingConfig2d};
    use burn::prelude::*;
    use burn::tensor::Distribution;
    use burn::tensor::activation;

    fn max_rel_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        let scale = b.clone().abs().max().into_scalar::<f32>().max(1e-6);
        (a - b).abs().max().into_scalar::<f32>() / scale
    }

    /// libtorch's `convolution_backward` through the extension against Burn's generic backward
    /// on the same libtorch tensors: output and all three gradients within 1e-4 relative.
    #[test]
    fn torch_conv_matches_burn() {
        let device = Device::libtorch().autodiff();
        for (cin, cout, hw, k, s, p, bias) in [
            (3, 8, 9, 3, 1, 1, true),
            (4, 6, 12, 5, 2, 2, false),
            (16, 16, 17, 3, 1, 1, false),
            (6, 4, 7, 1, 2, 0, true),
        ] {
            let conv = Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([s, s])
                .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                .with_bias(bias)
                .init(&device);
            let x = Tensor::<4>::random([3, cin, hw, hw], Distribution::Normal(0.0, 1.0), &device);
            let ho = (hw + 2 * p - k) / s + 1;
            let dy =
                Tensor::<4>::random([3, cout, ho, ho], Distribution::Normal(0.0, 1.0), &device);
            let run = |fast: bool| {
                let x = x.clone().require_grad();
                let y = if fast {
                    conv2d(&conv, x.clone())
                } else {
                    conv.forward(x.clone())
                };
                let grads = (y.clone() * dy.clone()).sum().backward();
                let gb = conv.bias.as_ref().map(|b| b.val().grad(&grads).unwrap());
                (
                    y.inner(),
                    x.grad(&grads).unwrap(),
                    conv.weight.val().grad(&grads).unwrap(),
                    gb,
                )
            };
            assert!(crate::kernels::torch_path(&x), "the extension is routed to");
            let (y1, gx1, gw1, gb1) = run(true);
            let (y0, gx0, gw0, gb0) = run(false);
            let case = format!("cin {cin} cout {cout} {hw}px k{k} s{s} p{p} bias {bias}");
            assert!(max_rel_diff(y1, y0) < 1e-4, "{case}: output");
            assert!(max_rel_diff(gx1, gx0) < 1e-4, "{case}: input gradient");
            assert!(max_rel_diff(gw1, gw0) < 1e-4, "{case}: weight gradient");
            if let (Some(a), Some(b)) = (gb1, gb0) {
                assert!(max_rel_diff(a, b) < 1e-4, "{case}: bias gradient");
            }
        }
    }

    /// Training batch norm (+ ReLU) through `native_batch_norm_backward` against Burn's: output,
    /// the three gradients and the running statistics it leaves behind.
    #[test]
    fn torch_batch_norm_matches_burn() {
        let device = Device::libtorch().autodiff();
        for relu in [false, true] {
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
                let stats = (bn.running_mean.value(), bn.running_var.value());
                (y.inner(), gx, gg, gb, stats)
            };
            assert!(crate::kernels::torch_path(&x), "the extension is routed to");
            let (y1, gx1, gg1, gb1, (m1, v1)) = run(true);
            let (y0, gx0, gg0, gb0, (m0, v0)) = run(false);
            assert!(max_rel_diff(y1, y0) < 1e-4, "relu {relu}: output");
            assert!(max_rel_diff(gx1, gx0) < 1e-4, "relu {relu}: input gradient");
            assert!(max_rel_diff(gg1, gg0) < 1e-4, "relu {relu}: gamma gradient");
            assert!(max_rel_diff(gb1, gb0) < 1e-4, "relu {relu}: beta gradient");
            assert!(max_rel_diff(m1, m0) < 1e-4, "relu {relu}: running mean");
            assert!(max_rel_diff(v1, v0) < 1e-4, "relu {relu}: running variance");
        }
    }
}
