//! The im2col + GEMM convolution ([`super::conv`]) registered with Burn as a backend extension
//! for burn-flex, with its own autodiff backward pass.
//!
//! Burn 0.22's supported extension point: a `#[backend_extension]` trait implemented for the
//! execution backend (`Flex`) and for `Autodiff<Flex>`, reached from backend-independent code
//! through `Dispatch` (`Tensor::into_dispatch` / `Tensor::from_dispatch`).

use super::conv::{ConvGeom, conv2d_backward, conv2d_forward};
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
    ) -> FloatTensor<Self>;
    /// As [`Self::gemm_conv2d`], plus a bias per output channel. (Two methods because the
    /// extension macro routes no `Option` of a tensor.)
    fn gemm_conv2d_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        stride: [usize; 2],
        padding: [usize; 2],
    ) -> FloatTensor<Self>;
}

fn geom(x: &FlexTensor, w: &FlexTensor, stride: [usize; 2], padding: [usize; 2]) -> ConvGeom {
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
    ) -> FlexTensor {
        forward(&x, &w, None, &geom(&x, &w, stride, pad))
    }
    fn gemm_conv2d_bias(
        x: FlexTensor,
        w: FlexTensor,
        b: FlexTensor,
        stride: [usize; 2],
        pad: [usize; 2],
    ) -> FlexTensor {
        forward(&x, &w, Some(&b), &geom(&x, &w, stride, pad))
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
    ) -> FloatTensor<Self> {
        let g = geom(x.primitive(), weight.primitive(), stride, padding);
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
    ) -> FloatTensor<Self> {
        let g = geom(x.primitive(), weight.primitive(), stride, padding);
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
