//! The im2col + GEMM convolution ([`super::conv`]) registered with Burn as a backend extension
//! for burn-flex, with its own autodiff backward pass.
//!
//! Burn 0.22's supported extension point: a `#[backend_extension]` trait implemented for the
//! execution backend (`Flex`) and for `Autodiff<Flex>`, reached from backend-independent code
//! through `Dispatch` (`Tensor::into_dispatch` / `Tensor::from_dispatch`).

use super::buf::par_zeroed;
use super::conv::{ConvGeom, conv2d_backward, conv2d_forward, conv2d_forward_act};
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
use burn::tensor::TensorData;

#[backend_extension(Flex, Autodiff)]
pub trait GemmConvBackend: Backend {
    /// A 2-D convolution without groups or dilation, symmetric padding.
    fn gemm_conv2d(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        bf16: bool,
    ) -> FloatTensor<Self>;
    /// As [`Self::gemm_conv2d`], plus a bias per output channel. (Two methods because the
    /// extension macro routes no `Option` of a tensor.)
    fn gemm_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        bf16: bool,
    ) -> FloatTensor<Self>;
}

#[backend_extension(Flex)]
pub trait ConvActInferBackend: Backend {
    /// Inference only: the convolution with a bias per output channel, then a ReLU when
    /// `relu`, in one pass over the output ([`super::conv_bn`] folds a batch norm into
    /// `weight` and `bias`).
    fn conv_bias_act_infer(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        relu: bool,
        bf16: bool,
    ) -> FloatTensor<Self>;
}

impl ConvActInferBackend for Flex {
    fn conv_bias_act_infer(
        x: FlexTensor,
        w: FlexTensor,
        b: FlexTensor,
        stride: [usize; 2],
        pad: [usize; 2],
        relu: bool,
        bf16: bool,
    ) -> FlexTensor {
        let g = geom(&x, &w, stride, pad, bf16);
        let y = conv2d_forward_act(&values(&x), &values(&w), Some(&values(&b)), &g, relu);
        FlexTensor::from_data(TensorData::new(y, [g.batch, g.cout, g.ho(), g.wo()]))
    }
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

/// The values of a float tensor in row-major order (a copy only when it is strided or shared
/// storage that does not start at its first element).
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(s) => std::borrow::Cow::Borrowed(s),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().unwrap().to_vec()),
    }
}

fn forward(x: &FlexTensor, w: &FlexTensor, b: Option<&FlexTensor>, g: &ConvGeom) -> FlexTensor {
    let b = b.map(values);
    let y = conv2d_forward(&values(x), &values(w), b.as_deref(), g);
    FlexTensor::from_data(TensorData::new(y, [g.batch, g.cout, g.ho(), g.wo()]))
}

impl GemmConvBackend for Flex {
    fn gemm_conv2d(
        x: FlexTensor,
        w: FlexTensor,
        stride: [usize; 2],
        pad: [usize; 2],
        bf16: bool,
    ) -> FlexTensor {
        forward(&x, &w, None, &geom(&x, &w, stride, pad, bf16))
    }
    fn gemm_conv2d_bias(
        x: FlexTensor,
        w: FlexTensor,
        b: FlexTensor,
        stride: [usize; 2],
        pad: [usize; 2],
        bf16: bool,
    ) -> FlexTensor {
        forward(&x, &w, Some(&b), &geom(&x, &w, stride, pad, bf16))
    }
}

/// Saved for the backward pass: the input and weight nodes, the geometry, and which parents
/// (x, weight, bias) want a gradient.
type State = (NodeId, NodeId, ConvGeom);

/// Computes the gradients the tracked parents ask for and registers them.
fn backward<const N: usize>(
    ops: Ops<State, N>,
    grads: &mut Gradients,
    checkpointer: &mut Checkpointer,
) {
    let (x_id, w_id, g) = ops.state;
    let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
    let x: FlexTensor = checkpointer.retrieve_node_output(x_id);
    let w: FlexTensor = checkpointer.retrieve_node_output(w_id);
    let need = [0, 1, 2].map(|i| ops.parents.get(i).is_some_and(|p| p.is_some()));
    let (dx, dw, db) = conv2d_backward(&values(&x), &values(&w), &values(&dy), &g, need);
    let shapes = [x.shape(), w.shape(), [g.cout].into()];
    for ((parent, grad), shape) in ops.parents.iter().zip([dx, dw, db]).zip(shapes) {
        if let (Some(node), Some(grad)) = (parent, grad) {
            let t = FlexTensor::from_data(TensorData::new(grad, shape));
            grads.register::<Flex>(node.id, t);
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
    ) -> FloatTensor<Self> {
        let g = geom(x.primitive(), weight.primitive(), stride, padding, bf16);
        match GemmConvNoBias
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight), g);
                prep.finish(state, forward(x.primitive(), weight.primitive(), None, &g))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(forward(x.primitive(), weight.primitive(), None, &g))
            }
        }
    }

    fn gemm_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
        bf16: bool,
    ) -> FloatTensor<Self> {
        let g = geom(x.primitive(), weight.primitive(), stride, padding, bf16);
        let y = || {
            forward(
                x.primitive(),
                weight.primitive(),
                Some(bias.primitive()),
                &g,
            )
        };
        match GemmConvWithBias
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let state = (prep.checkpoint(&x), prep.checkpoint(&weight), g);
                prep.finish(state, y())
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
    let (y, mean, var) = train_forward(&values(x), &values(gamma), &values(beta), eps, relu, &g);
    (
        FlexTensor::from_data(TensorData::new(y, x.shape())),
        mean,
        var,
    )
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
        let y = scale_shift(&values(&x), &scale, &shift, relu, &g);
        FlexTensor::from_data(TensorData::new(y, x.shape()))
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
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        let x: FlexTensor = cp.retrieve_node_output(x_id);
        let g = norm_geom(&x);
        let (dx, dgamma, dbeta) = norm_backward(
            &values(&x),
            &values(&dy),
            &values(&gamma),
            &values(&beta),
            &mean,
            &var,
            eps,
            relu,
            &g,
        );
        let shapes = [x.shape(), gamma.shape(), beta.shape()];
        for ((parent, grad), shape) in ops.parents.iter().zip([dx, dgamma, dbeta]).zip(shapes) {
            if let Some(node) = parent {
                grads
                    .register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(grad, shape)));
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

fn pool_output(y: Vec<f32>, x: &FlexTensor, g: &PoolGeom) -> FlexTensor {
    let [b, c, _, _] = x.shape().dims();
    FlexTensor::from_data(TensorData::new(y, [b, c, g.ho, g.wo]))
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
        let (y, _) = max_pool_forward(&values(&x), &g, false);
        pool_output(y, &x, &g)
    }
}

#[derive(Debug)]
struct MaxPoolOp;

impl Backward<Flex, 1> for MaxPoolOp {
    /// The switches, the input's shape and the geometry.
    type State = (Vec<u32>, burn::tensor::Shape, PoolGeom);
    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (switches, shape, g) = ops.state;
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        if let Some(node) = &ops.parents[0] {
            let dx = max_pool_backward(&values(&dy), &switches, &g);
            grads.register::<Flex>(node.id, FlexTensor::from_data(TensorData::new(dx, shape)));
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
                let (y, switches) = max_pool_forward(&values(x.primitive()), &g, true);
                let y = pool_output(y, x.primitive(), &g);
                prep.finish((switches, x.primitive().shape(), g), y)
            }
            OpsKind::UnTracked(prep) => {
                let (y, _) = max_pool_forward(&values(x.primitive()), &g, false);
                prep.finish(pool_output(y, x.primitive(), &g))
            }
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

fn add_relu(a: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    use rayon::prelude::*;
    let (av, bv) = (values(a), values(b));
    assert_eq!(
        av.len(),
        bv.len(),
        "add_relu: shapes {:?} and {:?}",
        a.shape(),
        b.shape()
    );
    let inputs = av.par_chunks(CHUNK).zip(bv.par_chunks(CHUNK));
    let y = par_zeroed(av.len(), CHUNK, inputs, |y, (a, b)| {
        simd::add_relu_row(y, a, b)
    });
    FlexTensor::from_data(TensorData::new(y, a.shape()))
}

impl AddReluBackend for Flex {
    fn add_relu(a: FlexTensor, b: FlexTensor) -> FlexTensor {
        add_relu(&a, &b)
    }
}

#[derive(Debug)]
struct AddRelu;

impl Backward<Flex, 2> for AddRelu {
    /// The output (shared storage, not a copy): the ReLU's gate.
    type State = FlexTensor;
    fn backward(self, ops: Ops<FlexTensor, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        use rayon::prelude::*;
        let y = ops.state;
        let dy: FlexTensor = grads.consume::<Flex>(&ops.node);
        let (yv, dyv) = (values(&y), values(&dy));
        let inputs = dyv.par_chunks(CHUNK).zip(yv.par_chunks(CHUNK));
        let dx = par_zeroed(yv.len(), CHUNK, inputs, |dx, (dy, y)| {
            simd::relu_grad_row(dx, dy, y)
        });
        // Both summands get the same gradient: one buffer, shared.
        let dx = FlexTensor::from_data(TensorData::new(dx, y.shape()));
        for node in ops.parents.iter().flatten() {
            grads.register::<Flex>(node.id, dx.clone());
        }
    }
}

impl<C: CheckpointStrategy> AddReluBackend for Autodiff<Flex, C> {
    fn add_relu(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let y = add_relu(a.primitive(), b.primitive());
        match AddRelu
            .prepare::<C>([a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(y.clone(), y),
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
