//! The im2col + GEMM convolution ([`super::conv`]) registered with Burn as a backend extension
//! for burn-flex, with its own autodiff backward pass.
//!
//! Burn 0.22's supported extension point: a `#[backend_extension]` trait implemented for the
//! execution backend (`Flex`) and for `Autodiff<Flex>`, reached from backend-independent code
//! through `Dispatch` (`Tensor::into_dispatch` / `Tensor::from_dispatch`).

use super::act::{Act, bf16};
use super::buf::par_zeroed;
use super::conv::{
    ConvGeom, Prepared, conv2d_backward, conv2d_backward_bf16, conv2d_forward_act,
    conv2d_forward_bf16, conv2d_forward_prepared,
};
use super::norm::{NormGeom, affine, backward as norm_backward, scale_shift, train_forward};
use super::pool::{PoolGeom, max_pool_backward, max_pool_forward};
use super::simd;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend, Flex, TensorMetadata, backend_extension};
use burn::tensor::{DType, Element, Shape, TensorData};
use std::borrow::Cow;

#[backend_extension(Flex, Autodiff)]
pub trait GemmConvBackend: Backend {
    /// A 2-D convolution without groups or dilation, symmetric padding, then a ReLU when
    /// `relu` (written by the convolution's epilogue; its gradient gated by the output).
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        bf16: bool,
        relu: bool,
    ) -> FloatTensor<Self>;
    /// As [`Self::gemm_conv2d`], plus a bias per output channel. (Two methods because the
    /// extension macro routes no `Option` of a tensor.)
    #[allow(clippy::too_many_arguments)]
    fn gemm_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        bf16: bool,
        relu: bool,
    ) -> FloatTensor<Self>;
}

#[backend_extension(Flex)]
pub trait ConvActInferBackend: Backend {
    /// Inference only: the convolution with a batch norm's running statistics folded into it
    /// (`w' = w · γ/√(σ²+ε)` per output channel, `b' = β + (b - μ) · γ/√(σ²+ε)`), then a ReLU
    /// when `relu`; the folded weights are made once per layer and kept while these tensors
    /// live ([`super::infer`]). `bias` is the convolution's own, used only when `has_bias`
    /// (the extension macro routes no `Option` of a tensor).
    #[allow(clippy::too_many_arguments)]
    fn conv_bn_act_infer(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        var: FloatTensor<Self>,
        epsilon: f64,
        has_bias: bool,
        stride: [usize; 2],
        padding: [usize; 2],
        relu: bool,
        bf16: bool,
    ) -> FloatTensor<Self>;
}

impl ConvActInferBackend for Flex {
    fn conv_bn_act_infer(
        x: FlexTensor,
        w: FlexTensor,
        b: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        mean: FlexTensor,
        var: FlexTensor,
        epsilon: f64,
        has_bias: bool,
        stride: [usize; 2],
        pad: [usize; 2],
        relu: bool,
        bf16: bool,
    ) -> FlexTensor {
        let g = geom(&x, &w, stride, pad, bf16);
        let mut sources = vec![&w, &gamma, &beta, &mean, &var];
        if has_bias {
            sources.push(&b);
        }
        let p = super::infer::prepared(&sources, epsilon.to_bits(), || {
            let bias = has_bias.then(|| values(&b));
            let [gamma, beta, mean, var] = [&gamma, &beta, &mean, &var].map(values);
            fold(
                &values(&w),
                bias.as_deref(),
                &gamma,
                &beta,
                &mean,
                &var,
                epsilon,
            )
        });
        let shape = [g.batch, g.cout, g.ho(), g.wo()];
        if is_bf16(&x) {
            let y = conv2d_forward_bf16(&slice::<bf16>(&x), &p.w, p.bias.as_deref(), &g, relu);
            tensor(y, shape)
        } else {
            tensor(conv2d_forward_prepared(&values(&x), &p, &g, relu), shape)
        }
    }
}

/// A batch norm's running statistics folded into the convolution before it: the weights
/// scaled by `γ/√(σ²+ε)` per output channel and the bias `β + (b - μ) · γ/√(σ²+ε)`, in f32 with
/// the operations (and so the bits) of the Burn expression this replaced.
fn fold(
    w: &[f32],
    b: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    mean: &[f32],
    var: &[f32],
    eps: f64,
) -> Prepared {
    use rayon::prelude::*;
    let eps = eps as f32;
    let scale: Vec<f32> = (0..gamma.len())
        .map(|o| gamma[o] * (1.0 / (var[o] + eps).sqrt()))
        .collect();
    let bias = (0..gamma.len())
        .map(|o| b.map_or(-mean[o], |b| b[o] - mean[o]) * scale[o] + beta[o])
        .collect();
    let k = w.len() / scale.len().max(1);
    let mut folded = vec![0.0f32; w.len()];
    folded
        .par_chunks_mut(k.max(1))
        .zip(w.par_chunks(k.max(1)))
        .zip(&scale)
        .for_each(|((d, s), &a)| d.iter_mut().zip(s).for_each(|(d, &s)| *d = s * a));
    Prepared::new(folded, Some(bias))
}

fn geom(
    x: &FlexTensor,
    w: &FlexTensor,
    stride: [usize; 2],
    padding: [usize; 2],
    bf16: bool,
) -> ConvGeom {
    let [batch, cin, h, wd] = x.shape().dims();
    let [cout, _, kh, kw] = w.shape().dims();
    ConvGeom {
        batch,
        cin,
        h,
        w: wd,
        cout,
        kh,
        kw,
        stride,
        pad: padding,
        precision: super::runnable(if bf16 {
            super::Precision::Bf16
        } else {
            super::Precision::Fp32
        }),
    }
}

/// The values of an f32 tensor in row-major order (a copy only when it is strided or shared
/// storage that does not start at its first element): weights, statistics, and activations of
/// f32 models.
fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
    slice::<f32>(t)
}

/// An activation element as Burn stores it.
trait Stored: Act + Element + bytemuck::Pod {}
impl Stored for f32 {}
impl Stored for bf16 {}

/// The values of a tensor of element `E` in row-major order, as [`values`].
///
/// # Panics
/// If the tensor's dtype is not `E`'s.
fn slice<E: Stored>(t: &FlexTensor) -> Cow<'_, [E]> {
    match t.as_slice::<E>() {
        Some(s) => Cow::Borrowed(s),
        None => {
            let c = t.to_contiguous();
            let s = c.as_slice::<E>().unwrap_or_else(|| {
                panic!(
                    "a {:?} tensor where {:?} was expected",
                    t.dtype(),
                    E::dtype()
                )
            });
            Cow::Owned(s.to_vec())
        }
    }
}

fn tensor<E: Stored>(v: Vec<E>, shape: impl Into<Shape>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(v, shape))
}

/// Whether an activation is stored in bf16 (a model running bf16 end to end); else f32.
fn is_bf16(t: &FlexTensor) -> bool {
    t.dtype() == DType::BF16
}

/// `t` in `like`'s dtype: a gradient handed to a backward pass in another dtype than its
/// forward pass's input (not produced by convlab's own ops, which keep each node's dtype).
fn same_dtype(t: FlexTensor, like: &FlexTensor) -> FlexTensor {
    to_dtype(t, like.dtype())
}

/// `t` in `dtype` (bf16 or f32).
fn to_dtype(t: FlexTensor, dtype: DType) -> FlexTensor {
    use burn::backend::ops::FloatTensorOps;
    use burn::tensor::FloatDType;
    if t.dtype() == dtype {
        return t;
    }
    let to = if dtype == DType::BF16 {
        FloatDType::BF16
    } else {
        FloatDType::F32
    };
    <Flex as FloatTensorOps<Flex>>::float_cast(t, to)
}

/// Runs `$body` with `$E` the element type of `$t` (`bf16` or `f32`).
macro_rules! on_dtype {
    ($t:expr, $E:ident => $body:expr) => {
        if is_bf16($t) {
            type $E = bf16;
            $body
        } else {
            type $E = f32;
            $body
        }
    };
}

/// The forward convolution in `x`'s dtype (bf16 activations in, bf16 out).
fn forward_act(
    x: &FlexTensor,
    w: &FlexTensor,
    b: Option<&FlexTensor>,
    g: &ConvGeom,
    relu: bool,
) -> FlexTensor {
    let b = b.map(values);
    let shape = [g.batch, g.cout, g.ho(), g.wo()];
    if is_bf16(x) {
        let y = conv2d_forward_bf16(&slice::<bf16>(x), &values(w), b.as_deref(), g, relu);
        tensor(y, shape)
    } else {
        let y = conv2d_forward_act(&values(x), &values(w), b.as_deref(), g, relu);
        tensor(y, shape)
    }
}

// Without autodiff: inference (the autodiff backend's ops call `forward` themselves).
impl GemmConvBackend for Flex {
    fn gemm_conv2d(
        x: FlexTensor,
        w: FlexTensor,
        stride: [usize; 2],
        pad: [usize; 2],
        bf16: bool,
        relu: bool,
    ) -> FlexTensor {
        forward_infer(&x, &w, None, &geom(&x, &w, stride, pad, bf16), relu)
    }
    fn gemm_conv2d_bias(
        x: FlexTensor,
        w: FlexTensor,
        b: FlexTensor,
        stride: [usize; 2],
        pad: [usize; 2],
        bf16: bool,
        relu: bool,
    ) -> FlexTensor {
        forward_infer(&x, &w, Some(&b), &geom(&x, &w, stride, pad, bf16), relu)
    }
}

/// An inference convolution without a batch norm after it (VGG without batch norm, AlexNet):
/// where Winograd runs it, its transformed weights are made once per layer and kept while its
/// tensors live ([`super::infer`]), as the folded layers' are; else [`forward`].
fn forward_infer(
    x: &FlexTensor,
    w: &FlexTensor,
    b: Option<&FlexTensor>,
    g: &ConvGeom,
    relu: bool,
) -> FlexTensor {
    let super::plan::Algo::Winograd(tile) =
        super::plan::plan(g, super::plan::Cpu::detect()).forward
    else {
        return forward_act(x, w, b, g, relu);
    };
    if is_bf16(x) {
        return forward_act(x, w, b, g, relu);
    }
    let sources: Vec<&FlexTensor> = std::iter::once(w).chain(b).collect();
    // `extra` tells these apart from the folded layers (whose ε's bits are never a NaN's), and
    // the two tiles apart: each entry has the one transform.
    let extra = u64::MAX - u64::from(tile == super::winograd::Tile::F4);
    let p = super::infer::prepared(&sources, extra, || {
        Prepared::winograd_only(&values(w), b.map(|b| values(b).into_owned()), g, tile)
    });
    let y = conv2d_forward_prepared(&values(x), &p, g, relu);
    tensor(y, [g.batch, g.cout, g.ho(), g.wo()])
}

/// Saved for the backward pass: the input and weight nodes, the geometry, and with a fused
/// ReLU its output (shared storage, not a copy: the next layer keeps it as its input anyway),
/// whose positives gate the gradient (`y > 0` exactly where the pre-activation is).
type State = (NodeId, NodeId, ConvGeom, Option<FlexTensor>);

/// Computes the gradients the tracked parents ask for and registers them.
fn backward<const N: usize>(
    ops: Ops<State, N>,
    grads: &mut Gradients,
    checkpointer: &mut Checkpointer,
) {
    let (x_id, w_id, g, relu_out) = ops.state;
    let x: FlexTensor = checkpointer.retrieve_node_output(x_id);
    let mut dy = same_dtype(grads.consume::<Flex>(&ops.node), &x);
    if let Some(y) = relu_out {
        dy = relu_grad(dy, &y);
    }
    let w: FlexTensor = checkpointer.retrieve_node_output(w_id);
    let need = [0, 1, 2].map(|i| ops.parents.get(i).is_some_and(|p| p.is_some()));
    let (dx, dw, db) = if is_bf16(&x) {
        let (dx, dw, db) = conv2d_backward_bf16(&slice(&x), &values(&w), &slice(&dy), &g, need);
        (dx.map(|v| tensor(v, x.shape())), dw, db)
    } else {
        let (dx, dw, db) = conv2d_backward(&values(&x), &values(&w), &values(&dy), &g, need);
        (dx.map(|v| tensor(v, x.shape())), dw, db)
    };
    let dw = dw.map(|v| tensor(v, w.shape()));
    let db = db.map(|v| tensor(v, [g.cout]));
    for (parent, grad) in ops.parents.iter().zip([dx, dw, db]) {
        if let (Some(node), Some(grad)) = (parent, grad) {
            grads.register::<Flex>(node.id, grad);
        }
    }
}

#[derive(Debug)]
struct GemmConvWithBias;
#[derive(Debug)]
struct GemmConvNoBias;

impl Backward<Flex, 3> for GemmConvWithBias {
    type State = State;
    fn backward(self, ops: Ops<State, 3>, grads: &mut Gradients, cp: &mut Checkpointer) {
        backward(ops, grads, cp)
    }
}

impl Backward<Flex, 2> for GemmConvNoBias {
    type State = State;
    fn backward(self, ops: Ops<State, 2>, grads: &mut Gradients, cp: &mut Checkpointer) {
        backward(ops, grads, cp)
    }
}

impl<C: CheckpointStrategy> GemmConvBackend for Autodiff<Flex, C> {
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        bf16: bool,
        relu: bool,
    ) -> FloatTensor<Self> {
        let g = geom(x.primitive(), weight.primitive(), stride, padding, bf16);
        let y = || forward_act(x.primitive(), weight.primitive(), None, &g, relu);
        match GemmConvNoBias
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                super::infer::clear();
                let y = y();
                let gate = relu.then(|| y.clone());
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight), g, gate);
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y()),
        }
    }

    fn gemm_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        bf16: bool,
        relu: bool,
    ) -> FloatTensor<Self> {
        let g = geom(x.primitive(), weight.primitive(), stride, padding, bf16);
        let y = || {
            forward_act(
                x.primitive(),
                weight.primitive(),
                Some(bias.primitive()),
                &g,
                relu,
            )
        };
        match GemmConvWithBias
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                super::infer::clear();
                let y = y();
                let gate = relu.then(|| y.clone());
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight), g, gate);
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y()),
        }
    }
}

#[backend_extension(Flex, Autodiff)]
pub trait BatchNormBackend: Backend {
    /// Training-mode batch norm (batch statistics), then a ReLU when `relu`: returns the output
    /// and the batch mean and biased variance (`[C]`, not differentiated).
    fn bn_act_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

#[backend_extension(Flex)]
pub trait BatchNormInferBackend: Backend {
    /// Inference-mode batch norm with the given statistics, then a ReLU when `relu`.
    fn bn_act_infer(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> FloatTensor<Self>;
}

fn norm_geom(x: &FlexTensor) -> NormGeom {
    let dims = x.shape().to_vec();
    NormGeom {
        batch: dims[0],
        channels: dims[1],
        positions: dims[2..].iter().product(),
    }
}

fn vector(values: Vec<f32>) -> FlexTensor {
    let n = values.len();
    FlexTensor::from_data(TensorData::new(values, [n]))
}

/// The training forward pass on flex tensors: `(y, mean, variance)`.
fn bn_train(
    x: &FlexTensor,
    gamma: &FlexTensor,
    beta: &FlexTensor,
    eps: f64,
    relu: bool,
) -> (FlexTensor, Vec<f32>, Vec<f32>) {
    let g = norm_geom(x);
    let (gamma, beta) = (values(gamma), values(beta));
    on_dtype!(x, E => {
        let (y, mean, var) = train_forward(&slice::<E>(x), &gamma, &beta, eps, relu, &g);
        (tensor(y, x.shape()), mean, var)
    })
}

impl BatchNormBackend for Flex {
    fn bn_act_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
        relu: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (y, mean, var) = bn_train(&x, &gamma, &beta, epsilon, relu);
        (y, vector(mean), vector(var))
    }
}

impl BatchNormInferBackend for Flex {
    fn bn_act_infer(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
        relu: bool,
    ) -> FlexTensor {
        let g = norm_geom(&x);
        let (scale, shift) = affine(
            &values(&gamma),
            &values(&beta),
            &values(&mean),
            &values(&variance),
            epsilon,
        );
        on_dtype!(&x, E => tensor(scale_shift(&slice::<E>(&x), &scale, &shift, relu, &g), x.shape()))
    }
}

#[derive(Debug)]
struct BnActTrain;

/// The input node, γ and β, the batch statistics, ε and whether a ReLU followed.
type BnState = (
    NodeId,
    FlexTensor,
    FlexTensor,
    Vec<f32>,
    Vec<f32>,
    f64,
    bool,
);

impl Backward<Flex, 3> for BnActTrain {
    type State = BnState;
    fn backward(self, ops: Ops<BnState, 3>, grads: &mut Gradients, cp: &mut Checkpointer) {
        let (x_id, gamma, beta, mean, var, eps, relu) = ops.state;
        let x: FlexTensor = cp.retrieve_node_output(x_id);
        let dy = same_dtype(grads.consume::<Flex>(&ops.node), &x);
        let g = norm_geom(&x);
        let (gv, bv) = (values(&gamma), values(&beta));
        let (dx, dgamma, dbeta) = on_dtype!(&x, E => {
            let (dx, dgamma, dbeta) =
                norm_backward(&slice::<E>(&x), &slice::<E>(&dy), &gv, &bv, &mean, &var, eps, relu, &g);
            (tensor(dx, x.shape()), dgamma, dbeta)
        });
        let grads3 = [
            dx,
            tensor(dgamma, gamma.shape()),
            tensor(dbeta, beta.shape()),
        ];
        for (parent, grad) in ops.parents.iter().zip(grads3) {
            if let Some(node) = parent {
                grads.register::<Flex>(node.id, grad);
            }
        }
    }
}

impl<C: CheckpointStrategy> BatchNormBackend for Autodiff<Flex, C> {
    fn bn_act_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (y, mean, var) = bn_train(
            x.primitive(),
            gamma.primitive(),
            beta.primitive(),
            epsilon,
            relu,
        );
        let stats = (
            FloatTensor::<Self>::new(vector(mean.clone())),
            FloatTensor::<Self>::new(vector(var.clone())),
        );
        let y = match BnActTrain
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (
                    prep.checkpoint(&x),
                    gamma.primitive().clone(),
                    beta.primitive().clone(),
                    mean,
                    var,
                    epsilon,
                    relu,
                );
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, stats.0, stats.1)
    }
}

#[backend_extension(Flex, Autodiff)]
pub trait MaxPoolBackend: Backend {
    /// Max pooling of `[B, C, H, W]` to `[B, C, out[0], out[1]]` (sizes worked out by the caller).
    fn max_pool(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        ceil: bool,
    ) -> FloatTensor<Self>;
}

fn pool_geom(
    x: &FlexTensor,
    kernel: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 2],
    ceil: bool,
) -> PoolGeom {
    let [b, c, h, w] = x.shape().dims();
    PoolGeom::new(b * c, [h, w], kernel, stride, pad, ceil)
}

/// The pooled `x` in its dtype, with the switches when asked for.
fn pool(x: &FlexTensor, g: &PoolGeom, switches: bool) -> (FlexTensor, Vec<u32>) {
    let [b, c, _, _] = x.shape().dims();
    on_dtype!(x, E => {
        let (y, at) = max_pool_forward(&slice::<E>(x), g, switches);
        (tensor(y, [b, c, g.ho, g.wo]), at)
    })
}

impl MaxPoolBackend for Flex {
    fn max_pool(
        x: FlexTensor,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        ceil: bool,
    ) -> FlexTensor {
        let g = pool_geom(&x, kernel, stride, padding, ceil);
        pool(&x, &g, false).0
    }
}

#[derive(Debug)]
struct MaxPoolOp;

impl Backward<Flex, 1> for MaxPoolOp {
    /// The switches, the input's shape and dtype (its gradient's), and the geometry.
    type State = (Vec<u32>, Shape, DType, PoolGeom);
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (switches, shape, dtype, g) = ops.state;
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        if let Some(node) = &ops.parents[0] {
            let dy = to_dtype(dy, dtype);
            let dx = on_dtype!(&dy, E => tensor(max_pool_backward(&slice::<E>(&dy), &switches, &g), shape));
            grads.register::<Flex>(node.id, dx);
        }
    }
}

impl<C: CheckpointStrategy> MaxPoolBackend for Autodiff<Flex, C> {
    fn max_pool(
        x: FloatTensor<Self>,
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        ceil: bool,
    ) -> FloatTensor<Self> {
        let g = pool_geom(x.primitive(), kernel, stride, padding, ceil);
        match MaxPoolOp
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (y, switches) = pool(x.primitive(), &g, true);
                let (shape, dtype) = (x.primitive().shape(), x.primitive().dtype());
                prep.finish((switches, shape, dtype, g), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(pool(x.primitive(), &g, false).0),
        }
    }
}

#[backend_extension(Flex, Autodiff)]
pub trait AddReluBackend: Backend {
    /// `relu(a + b)` elementwise, `a` and `b` of one shape: a residual block's output.
    fn add_relu(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self>;
}

/// Elements per parallel chunk: large enough that a chunk outweighs scheduling it.
const CHUNK: usize = 1 << 14;

/// `relu(a + b)`, written over `a`'s storage when nothing else holds it (a batch norm's
/// output that no backward state keeps), else over `b`'s, else into a new buffer.
fn add_relu(mut a: FlexTensor, mut b: FlexTensor) -> FlexTensor {
    assert_eq!(
        (a.shape(), a.dtype()),
        (b.shape(), b.dtype()),
        "add_relu: the summands' shapes and dtypes"
    );
    on_dtype!(&a, E => {
        if let Some(dst) = writable::<E>(&mut a) {
            rows_in_place(dst, &slice::<E>(&b), simd::add_relu_row_in_place);
            return a;
        }
        if let Some(dst) = writable::<E>(&mut b) {
            rows_in_place(dst, &slice::<E>(&a), simd::add_relu_row_in_place);
            return b;
        }
        tensor(two_rows(&slice::<E>(&a), &slice::<E>(&b), simd::add_relu_row), a.shape())
    })
}

/// `dy · [y > 0]` in `y`'s dtype, over `dy`'s storage when nothing else holds it.
fn relu_grad(dy: FlexTensor, y: &FlexTensor) -> FlexTensor {
    let mut dy = same_dtype(dy, y);
    on_dtype!(y, E => {
        if let Some(dst) = writable::<E>(&mut dy) {
            rows_in_place(dst, &slice::<E>(y), simd::relu_grad_row_in_place);
            return dy;
        }
        tensor(two_rows(&slice::<E>(&dy), &slice::<E>(y), simd::relu_grad_row), y.shape())
    })
}

/// The values of `t` to overwrite with an elementwise result, when `t` is the only handle to
/// its storage and holds them contiguously: then the result needs no buffer of its own, no
/// zero fill and no cache lines of its own (resnet50's residual additions and their
/// gradients at 224 px, batch 16: 6.4 to 51 MB each).
fn writable<E: Stored>(t: &mut FlexTensor) -> Option<&mut [E]> {
    let (start, end) = t.layout().contiguous_offsets()?;
    if t.dtype() != E::dtype() {
        return None;
    }
    t.try_storage_mut::<E>().map(|s| &mut s[start..end])
}

/// `f(dst, other)` over [`CHUNK`]-value rows of `dst` and `other`, in parallel.
fn rows_in_place<E: Act>(dst: &mut [E], other: &[E], f: fn(&mut [E], &[E])) {
    use rayon::prelude::*;
    assert_eq!(dst.len(), other.len(), "elementwise operands' lengths");
    dst.par_chunks_mut(CHUNK)
        .zip(other.par_chunks(CHUNK))
        .for_each(|(d, o)| f(d, o));
}

/// `f(out, a, b)` over [`CHUNK`]-value rows of two inputs, in parallel, in their element type
/// (the row kernels widen bf16 values in registers and round each result once).
fn two_rows<E: Act>(a: &[E], b: &[E], f: fn(&mut [E], &[E], &[E])) -> Vec<E> {
    use rayon::prelude::*;
    let inputs = a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK));
    par_zeroed(a.len(), CHUNK, inputs, |out, (a, b)| f(out, a, b))
}

impl AddReluBackend for Flex {
    fn add_relu(a: FlexTensor, b: FlexTensor) -> FlexTensor {
        add_relu(a, b)
    }
}

#[derive(Debug)]
struct AddRelu;

impl Backward<Flex, 2> for AddRelu {
    /// The output (shared storage, not a copy): the ReLU's gate.
    type State = FlexTensor;
    fn backward(self, ops: Ops<FlexTensor, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let y = ops.state;
        let dx = relu_grad(grads.consume::<Flex>(&ops.node), &y);
        // Both summands get the same gradient: one buffer, shared.
        for node in ops.parents.iter().flatten() {
            grads.register::<Flex>(node.id, dx.clone());
        }
    }
}

impl<C: CheckpointStrategy> AddReluBackend for Autodiff<Flex, C> {
    fn add_relu(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        // The primitives moved out (not borrowed), so that one no backward state keeps can
        // take the sum in place.
        let ((a, a_node), (b, b_node)) = (a.into_parts(), b.into_parts());
        let y = add_relu(a, b);
        match AddRelu
            .prepare::<C>([a_node, b_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

/// The gradient of a residual block's identity shortcut, handed from the residual add's
/// backward pass to the block entry's ([`ResidualBackend`]).
#[derive(Clone, Debug, Default)]
pub struct ShortcutGrad(std::sync::Arc<std::sync::Mutex<Option<FlexTensor>>>);

impl ShortcutGrad {
    fn put(&self, g: FlexTensor) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(g);
    }
    fn take(&self) -> Option<FlexTensor> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

#[backend_extension(Flex, Autodiff)]
pub trait ResidualBackend: Backend {
    /// A residual block's input as its branch's input: the same values; in the backward pass
    /// the branch's gradient plus the one [`Self::add_relu_shortcut`] handed over, added by
    /// convlab's row kernel in place on the workers. A node with two consumers (the branch and
    /// the shortcut) gets its second gradient added by Burn's `Gradients::register`, which
    /// for bf16 is a scalar loop on the calling thread.
    fn residual_entry(x: FloatTensor<Self>, shortcut: ShortcutGrad) -> FloatTensor<Self>;
    /// `relu(a + b)` for `b` the input of the block whose branch ends in `a`: `b`'s gradient
    /// goes to `shortcut` (for that block's [`Self::residual_entry`]), not to `b`'s node.
    fn add_relu_shortcut(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        shortcut: ShortcutGrad,
    ) -> FloatTensor<Self>;
    /// `x`, the output of a block's [`Self::residual_entry`], as the input of the block's
    /// projection shortcut: the same values; its gradient goes to `shortcut` (for the entry to
    /// add), not to `x`'s node, so that the entry's node gets one gradient, the branch's.
    fn shortcut_input(x: FloatTensor<Self>, shortcut: ShortcutGrad) -> FloatTensor<Self>;
}

/// `g + s`, over `g`'s storage when nothing else holds it.
fn add_to(mut g: FlexTensor, s: FlexTensor) -> FlexTensor {
    let s = same_dtype(s, &g);
    on_dtype!(&g, E => {
        if let Some(dst) = writable::<E>(&mut g) {
            rows_in_place(dst, &slice::<E>(&s), simd::add_row_in_place);
            return g;
        }
        tensor(two_rows(&slice::<E>(&g), &slice::<E>(&s), simd::add_row), g.shape())
    })
}

impl ResidualBackend for Flex {
    fn residual_entry(x: FlexTensor, _: ShortcutGrad) -> FlexTensor {
        x
    }
    fn add_relu_shortcut(a: FlexTensor, b: FlexTensor, _: ShortcutGrad) -> FlexTensor {
        add_relu(a, b)
    }
    fn shortcut_input(x: FlexTensor, _: ShortcutGrad) -> FlexTensor {
        x
    }
}

#[derive(Debug)]
struct ResidualEntry;

impl Backward<Flex, 1> for ResidualEntry {
    type State = ShortcutGrad;
    fn backward(self, ops: Ops<ShortcutGrad, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let g = grads.consume::<Flex>(&ops.node);
        // Empty when no gradient reached the residual add (nothing to add then).
        let g = match ops.state.take() {
            Some(s) => add_to(g, s),
            None => g,
        };
        if let Some(node) = &ops.parents[0] {
            grads.register::<Flex>(node.id, g);
        }
    }
}

#[derive(Debug)]
struct AddReluShortcut;

impl Backward<Flex, 1> for AddReluShortcut {
    /// The output (shared storage, not a copy): the ReLU's gate; and where the shortcut's
    /// gradient goes.
    type State = (FlexTensor, ShortcutGrad);
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (y, shortcut) = ops.state;
        let dx = relu_grad(grads.consume::<Flex>(&ops.node), &y);
        if let Some(node) = &ops.parents[0] {
            grads.register::<Flex>(node.id, dx.clone());
        }
        shortcut.put(dx);
    }
}

#[derive(Debug)]
struct ShortcutInput;

impl Backward<Flex, 1> for ShortcutInput {
    type State = ShortcutGrad;
    fn backward(self, ops: Ops<ShortcutGrad, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        // Handed to the entry rather than registered: the entry is this op's parent, so
        // Burn's reverse topological order runs this step before the entry's.
        ops.state.put(grads.consume::<Flex>(&ops.node));
    }
}

impl<C: CheckpointStrategy> ResidualBackend for Autodiff<Flex, C> {
    fn residual_entry(x: FloatTensor<Self>, shortcut: ShortcutGrad) -> FloatTensor<Self> {
        let y = x.primitive().clone();
        match ResidualEntry
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(shortcut, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn add_relu_shortcut(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        shortcut: ShortcutGrad,
    ) -> FloatTensor<Self> {
        // `a` moved out so that the sum may take its storage; `b` only read (the block's
        // input, which its entry and the branch keep too).
        let (a, a_node) = a.into_parts();
        let y = add_relu(a, b.primitive().clone());
        match AddReluShortcut
            .prepare::<C>([a_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((y.clone(), shortcut), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn shortcut_input(x: FloatTensor<Self>, shortcut: ShortcutGrad) -> FloatTensor<Self> {
        let y = x.primitive().clone();
        match ShortcutInput
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(shortcut, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

#[backend_extension(Flex, Autodiff)]
pub trait LinearBackend: Backend {
    /// `x w + b` for f32 `x` `[n, i]`, `w` `[i, o]`, `b` `[o]`: a fully connected layer.
    fn linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self>;
}

/// `[rows, cols]` of a 2-D tensor.
fn dims2(t: &FlexTensor) -> [usize; 2] {
    let s = t.shape();
    assert_eq!(s.num_dims(), 2, "linear: a 2-D operand");
    [s[0], s[1]]
}

/// `x w + b` into a fresh `Vec`: burn-flex's own product allocates its output through
/// `FlexTensor::empty`, which cubecl realigns by a copy (BENCHMARKS.md, "bf16 on an Intel Xeon
/// without AMX": a second weight-sized block for every weight gradient of VGG's classifier).
fn linear_forward(x: &FlexTensor, w: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let ([n, i], [i2, o]) = (dims2(x), dims2(w));
    assert_eq!(i, i2, "linear: x's columns and w's rows");
    let (x, w, b) = (slice::<f32>(x), slice::<f32>(w), slice::<f32>(b));
    assert_eq!(b.len(), o, "linear: one bias per output");
    if super::fc::applies(n) {
        return tensor(super::fc::forward(&x, &w, &b, n, i, o), [n, o]);
    }
    let mut y: Vec<f32> = (0..n).flat_map(|_| b.iter().copied()).collect();
    let threads = rayon::current_num_threads().max(1);
    super::gemm::gemm_f32(n, o, i, &mut y, o, true, &x, i, 1, &w, o, 1, threads);
    tensor(y, [n, o])
}

impl LinearBackend for Flex {
    fn linear(x: FlexTensor, w: FlexTensor, b: FlexTensor) -> FlexTensor {
        linear_forward(&x, &w, &b)
    }
}

#[derive(Debug)]
struct LinearOp;

impl Backward<Flex, 3> for LinearOp {
    /// The input and the weight (shared storage, not copies).
    type State = (FlexTensor, FlexTensor);
    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w) = ops.state;
        let ([n, i], [_, o]) = (dims2(&x), dims2(&w));
        // A gradient that reached the head in another dtype (not from convlab's ops) is read as f32.
        let dy = same_dtype(grads.consume::<Flex>(&ops.node), &x);
        let dy = slice::<f32>(&dy);
        let threads = rayon::current_num_threads().max(1);
        let [px, pw, pb] = ops.parents;
        // A small batch streams the weights once per product (`fc`); a large one reuses
        // each weight enough for the `gemm` crate's blocking to pay.
        let small = super::fc::applies(n);
        if let Some(node) = px {
            let w = slice::<f32>(&w);
            let dx = if small {
                super::fc::input_grad(&dy, &w, n, i, o)
            } else {
                // dx = dy w^T: w^T's element (r, c) is w[c * o + r].
                super::gemm::gemm_f32_new(n, i, o, &dy, o, 1, &w, 1, o, threads)
            };
            grads.register::<Flex>(node.id, tensor(dx, [n, i]));
        }
        if let Some(node) = pw {
            let x = slice::<f32>(&x);
            let dw = if small {
                super::fc::weight_grad(&x, &dy, n, i, o)
            } else {
                // dw = x^T dy: x^T's element (r, c) is x[c * i + r].
                super::gemm::gemm_f32_new(i, o, n, &x, 1, i, &dy, o, 1, threads)
            };
            grads.register::<Flex>(node.id, tensor(dw, [i, o]));
        }
        if let Some(node) = pb {
            let mut db = vec![0f32; o];
            for row in dy.chunks_exact(o) {
                for (d, g) in db.iter_mut().zip(row) {
                    *d += g;
                }
            }
            grads.register::<Flex>(node.id, tensor(db, [o]));
        }
    }
}

impl<C: CheckpointStrategy> LinearBackend for Autodiff<Flex, C> {
    fn linear(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        b: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let y = linear_forward(x.primitive(), w.primitive(), b.primitive());
        match LinearOp
            .prepare::<C>([x.node(), w.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let state = (x.primitive().clone(), w.primitive().clone());
                prep.finish(state, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

#[backend_extension(Flex)]
pub trait UpdateBackend: Backend {
    /// The first SGD step of a parameter ([`super::update::sgd`] without a buffer): returns the
    /// updated weight and the new momentum buffer (the gradient's storage, holding `g'`).
    fn sgd_first(
        w: FloatTensor<Self>,
        g: FloatTensor<Self>,
        h: super::update::SgdStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// A later SGD step: returns the updated weight and momentum buffer, both in place.
    fn sgd_momentum(
        w: FloatTensor<Self>,
        g: FloatTensor<Self>,
        buf: FloatTensor<Self>,
        h: super::update::SgdStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>);
    /// The first AdamW step ([`super::update::adamw`]): returns the weight, `m` (the gradient's
    /// storage) and `v`.
    fn adamw_first(
        w: FloatTensor<Self>,
        g: FloatTensor<Self>,
        h: super::update::AdamwStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// A later AdamW step: the weight, `m` and `v`, in place.
    fn adamw_next(
        w: FloatTensor<Self>,
        g: FloatTensor<Self>,
        m: FloatTensor<Self>,
        v: FloatTensor<Self>,
        h: super::update::AdamwStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// `t` with storage of its own, exactly its values, row-major: itself when it already is
/// (a moved buffer, no copy), else a copy.
fn owned(t: FlexTensor) -> FlexTensor {
    FlexTensor::from_data(t.into_data())
}

impl UpdateBackend for Flex {
    fn sgd_first(
        w: FlexTensor,
        g: FlexTensor,
        h: super::update::SgdStep,
    ) -> (FlexTensor, FlexTensor) {
        let (mut w, mut g) = (owned(w), owned(g));
        super::update::sgd(w.storage_mut::<f32>(), g.storage_mut::<f32>(), None, h);
        (w, g)
    }
    fn sgd_momentum(
        w: FlexTensor,
        g: FlexTensor,
        buf: FlexTensor,
        h: super::update::SgdStep,
    ) -> (FlexTensor, FlexTensor) {
        let (mut w, mut g, mut buf) = (owned(w), owned(g), owned(buf));
        let b = buf.storage_mut::<f32>();
        super::update::sgd(w.storage_mut::<f32>(), g.storage_mut::<f32>(), Some(b), h);
        (w, buf)
    }
    fn adamw_first(
        w: FlexTensor,
        g: FlexTensor,
        h: super::update::AdamwStep,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (mut w, mut g) = (owned(w), owned(g));
        let shape = g.shape();
        let mut v = vec![0.0f32; shape.num_elements()];
        super::update::adamw(w.storage_mut(), g.storage_mut(), None, &mut v, h);
        (w, g, FlexTensor::from_data(TensorData::new(v, shape)))
    }
    fn adamw_next(
        w: FlexTensor,
        g: FlexTensor,
        m: FlexTensor,
        v: FlexTensor,
        h: super::update::AdamwStep,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (mut w, mut g, mut m, mut v) = (owned(w), owned(g), owned(m), owned(v));
        let moments = Some((m.storage_mut::<f32>(), v.storage_mut::<f32>()));
        super::update::adamw(w.storage_mut(), g.storage_mut(), moments, &mut [], h);
        (w, m, v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values_of(t: &FlexTensor) -> Vec<f32> {
        slice::<f32>(t).into_owned()
    }

    fn address(t: &FlexTensor) -> *const f32 {
        slice::<f32>(t).as_ptr()
    }

    /// The residual add and the ReLU's gradient write over an operand only where nothing else
    /// holds its storage: a kept handle sees its values unchanged, and an operand held only by
    /// the call gives its buffer to the result.
    #[test]
    fn elementwise_results_overwrite_only_operands_nothing_else_holds() {
        let (av, bv) = (vec![1.0, -2.0, 0.5, -0.5], vec![-3.0, 1.0, 0.25, 0.5]);
        let sum = vec![0.0, 0.0, 0.75, 0.0];
        let t = |v: &[f32]| tensor(v.to_vec(), [2, 2]);

        // Both summands kept elsewhere: a new buffer, both unchanged.
        let (a, b) = (t(&av), t(&bv));
        let y = add_relu(a.clone(), b.clone());
        assert_eq!(values_of(&y), sum);
        assert_eq!((values_of(&a), values_of(&b)), (av.clone(), bv.clone()));
        assert!(address(&y) != address(&a) && address(&y) != address(&b));

        // Only the call holds `a`: the result is `a`'s buffer; `b`, kept, is unchanged.
        let (a, b) = (t(&av), t(&bv));
        let at = address(&a);
        let y = add_relu(a, b.clone());
        assert_eq!((values_of(&y), address(&y)), (sum.clone(), at));
        assert_eq!(values_of(&b), bv);

        // `a` kept, `b` not: the result is `b`'s buffer.
        let (a, b) = (t(&av), t(&bv));
        let bt = address(&b);
        let y = add_relu(a.clone(), b);
        assert_eq!((values_of(&y), address(&y)), (sum, bt));
        assert_eq!(values_of(&a), av);

        // The ReLU's gradient: `dy` where `y > 0`, over `dy` when only the call holds it.
        let (dyv, yv) = (vec![1.0, 2.0, 3.0, 4.0], vec![0.5, 0.0, -1.0, 2.0]);
        let gated = vec![1.0, 0.0, 0.0, 4.0];
        let (dy, y) = (t(&dyv), t(&yv));
        let dx = relu_grad(dy.clone(), &y);
        assert_eq!(
            (values_of(&dx), values_of(&dy)),
            (gated.clone(), dyv.clone())
        );
        let dy = t(&dyv);
        let dt = address(&dy);
        let dx = relu_grad(dy, &y);
        assert_eq!((values_of(&dx), address(&dx)), (gated, dt));
    }
}
