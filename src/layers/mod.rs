//! Building blocks shared by the model families.

pub mod trunk;

/// A hook into a forward pass: called with each named intermediate map (`conv1`, `pool2`,
/// `layer3`, ...) and returning the map the network continues with (usually the same one;
/// Grad-CAM adds a zero leaf to read the gradient there, deconvnet records it).
pub type Tap<'a> = dyn FnMut(String, Tensor<4>) -> Tensor<4> + 'a;

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AvgPool2d, AvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PaddingConfig2d};
use burn::prelude::*;
use serde::{Deserialize, Serialize};

/// The arithmetic of a forward pass's convolutions, passed down from the model that holds it.
pub use crate::kernels::Precision;

/// Local response normalisation as Krizhevsky et al. 2012 (section 3.3) set it: `k = 2`,
/// `n = 5`, `alpha = 1e-4`, `beta = 0.75`. Every LRN in convlab is this one, and ONNX export
/// reads its constants here (Burn's module keeps them private).
pub fn paper_lrn() -> burn::nn::LocalResponseNormConfig {
    burn::nn::LocalResponseNormConfig::new(5).with_k(2.0)
}

/// Max or average pooling (a recipe switch: `model.pool = "max" | "avg"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    #[default]
    Max,
    Avg,
}

/// Convolution, optional batch norm, ReLU: the unit every family here is built from.
///
/// With batch norm the convolution has no bias (the BN shift replaces it, as in torchvision).
///
/// # Shapes
/// `[B, C_in, H, W]` -> `[B, C_out, H', W']`, `H' = (H + 2p - k) / s + 1`.
#[derive(Module, Debug)]
pub struct ConvBnAct {
    pub conv: Conv2d,
    pub bn: Option<BatchNorm>,
}

impl ConvBnAct {
    /// A `k x k` convolution with stride `stride` and padding `pad` on each side.
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        batch_norm: bool,
        device: &Device,
    ) -> Self {
        Self::with_bias(cin, cout, k, stride, pad, batch_norm, !batch_norm, device)
    }

    /// As [`Self::new`], choosing the conv bias explicitly (torchvision's VGG-BN keeps it).
    #[allow(clippy::too_many_arguments)]
    pub fn with_bias(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        batch_norm: bool,
        bias: bool,
        device: &Device,
    ) -> Self {
        let conv = Conv2dConfig::new([cin, cout], [k, k])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .with_bias(bias)
            .init(device);
        ConvBnAct {
            conv,
            bn: batch_norm.then(|| BatchNormConfig::new(cout).init(device)),
        }
    }

    /// The convolution's products in `precision` ([`Precision`]).
    pub fn forward(&self, x: Tensor<4>, precision: Precision) -> Tensor<4> {
        conv_bn_relu(&self.conv, self.bn.as_ref(), x, precision)
    }

    /// The ONNX nodes of [`Self::forward`].
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str, name: &str) -> String {
        g.conv_bn(&self.conv, self.bn.as_ref(), x, true, name)
    }
}

/// Convolution + batch norm, no activation unless asked (ResNet's units: the residual
/// addition comes before the ReLU). The convolution has no bias.
///
/// # Shapes
/// `[B, C_in, H, W]` -> `[B, C_out, H / s, W / s]` (padding `k / 2`).
#[derive(Module, Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm,
}

impl ConvBn {
    /// A `k x k` convolution with stride `stride`, padding `k / 2`, then batch norm.
    pub fn new(cin: usize, cout: usize, k: usize, stride: usize, device: &Device) -> Self {
        let p = k / 2;
        ConvBn {
            conv: Conv2dConfig::new([cin, cout], [k, k])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
                .with_bias(false)
                .init(device),
            bn: BatchNormConfig::new(cout).init(device),
        }
    }

    /// The batch-norm scale set to zero ("zero-gamma": the block starts as the identity,
    /// Goyal et al. 2017).
    pub fn zero_gamma(mut self) -> Self {
        self.bn.gamma = self.bn.gamma.map(|g| g.zeros_like());
        self
    }

    /// Convolution and batch norm, then a ReLU when `relu` (fused with the batch norm; in
    /// inference, all three in the convolution); the convolution's products in `precision`.
    pub fn forward(&self, x: Tensor<4>, relu: bool, precision: Precision) -> Tensor<4> {
        crate::kernels::conv_bn(&self.conv, &self.bn, x, relu, precision)
    }
}

/// `relu(bn(conv(x)))`, or `relu(conv(x))` without batch norm, on convlab's kernels where they
/// apply (models call this, never the kernels: a plain `conv.forward` would lose the fast path),
/// the convolution's products in `precision`.
pub fn conv_bn_relu(
    conv: &Conv2d,
    bn: Option<&BatchNorm>,
    x: Tensor<4>,
    precision: Precision,
) -> Tensor<4> {
    match bn {
        Some(bn) => crate::kernels::conv_bn(conv, bn, x, true, precision),
        None => crate::kernels::conv2d_act(conv, x, true, precision),
    }
}

/// The geometry convlab's kernels compute a traced convolution with (batch `batch`, in
/// `precision`), or `None` where Burn's own convolution runs it ([`crate::kernels::conv2d`]'s
/// rule): what the kernel plan is asked about for a model's layers.
pub fn kernel_geometry(
    c: &crate::onnx::ConvLayer,
    batch: usize,
    precision: crate::kernels::Precision,
) -> Option<crate::kernels::conv::ConvGeom> {
    let pad = crate::kernels::kernel_padding(c.pads, c.dilation, c.groups)?;
    Some(crate::kernels::conv::ConvGeom {
        batch,
        cin: c.cin,
        h: c.hw[0],
        w: c.hw[1],
        cout: c.cout,
        kh: c.kernel[0],
        kw: c.kernel[1],
        stride: c.stride,
        pad,
        precision,
    })
}

/// Max pooling on convlab's kernel where it applies.
///
/// # Shapes
/// `[B, C, H, W]` -> `[B, C, (H + 2p - k) / s + 1, (W + 2p - k) / s + 1]` (ceil mode rounds up).
pub fn max_pool2d(pool: &MaxPool2d, x: Tensor<4>) -> Tensor<4> {
    crate::kernels::max_pool2d(pool, x)
}

/// A fully connected layer on `[B, i]` -> `[B, o]`: Burn's `Linear` computed by convlab's op
/// on burn-flex ([`crate::kernels::linear`]: its weight gradient allocated once, where Burn's
/// product allocates a weight-sized block twice; VGG's first classifier layer is 392 MiB).
pub fn linear(layer: &burn::nn::Linear, x: Tensor<2>) -> Tensor<2> {
    crate::kernels::linear(x, layer.weight.val(), layer.bias.as_ref().map(|b| b.val()))
}

/// A residual block's start (He et al. 2016): the branch's input and the shortcut, for
/// [`add_relu_shortcut`] or, projected, through `Shortcut::into_input` (its gradient added by
/// convlab's kernel, not Burn's registry: [`crate::kernels::residual_entry`]).
pub fn residual_entry(x: Tensor<4>) -> (Tensor<4>, crate::kernels::Shortcut) {
    crate::kernels::residual_entry(x)
}

/// `relu(y + x)`: the end of a residual block whose shortcut is the identity.
pub fn add_relu_shortcut(y: Tensor<4>, shortcut: crate::kernels::Shortcut) -> Tensor<4> {
    crate::kernels::add_relu_shortcut(y, shortcut)
}

/// `relu(a + b)`: the end of a residual block (He et al. 2016), fused where it can be.
pub fn add_relu(a: Tensor<4>, b: Tensor<4>) -> Tensor<4> {
    crate::kernels::add_relu(a, b)
}

/// A pooling layer whose kind is chosen at construction: `kernel x kernel`, stride `stride`
/// (3/2 is AlexNet's overlapping pooling, 2/2 the plain kind).
///
/// # Shapes
/// `[B, C, H, W]` -> `[B, C, (H - k) / s + 1, (W - k) / s + 1]`.
#[derive(Module, Debug)]
pub struct Pool {
    pub max: Option<MaxPool2d>,
    pub avg: Option<AvgPool2d>,
}

impl Pool {
    pub fn new(kind: PoolKind, kernel: usize, stride: usize, pad: usize) -> Self {
        let padding = PaddingConfig2d::Explicit(pad, pad, pad, pad);
        match kind {
            PoolKind::Max => Pool {
                max: Some(
                    MaxPool2dConfig::new([kernel, kernel])
                        .with_strides([stride, stride])
                        .with_padding(padding)
                        .init(),
                ),
                avg: None,
            },
            PoolKind::Avg => Pool {
                max: None,
                avg: Some(
                    AvgPool2dConfig::new([kernel, kernel])
                        .with_strides([stride, stride])
                        .with_padding(padding)
                        .with_count_include_pad(false)
                        .init(),
                ),
            },
        }
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match (&self.max, &self.avg) {
            (Some(p), _) => max_pool2d(p, x),
            (_, Some(p)) => p.forward(x),
            _ => x,
        }
    }

    /// The ONNX node of [`Self::forward`].
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> String {
        match (&self.max, &self.avg) {
            (Some(p), _) => g.max_pool(p, x),
            (_, Some(p)) => g.avg_pool(p, x),
            _ => x.to_string(),
        }
    }
}

/// Global average pooling to a feature vector.
///
/// # Shapes
/// `[B, C, H, W]` -> `[B, C]`.
pub fn global_avg_pool(x: Tensor<4>) -> Tensor<2> {
    let [b, c, _, _] = x.dims();
    x.mean_dim(3).mean_dim(2).reshape([b, c])
}

/// The activations a model computing in `precision` keeps between its layers: bf16 with
/// bf16 activations selected, else `x` as it is ([`crate::kernels::activations`]). Called on
/// a model's input; [`f32_activations`] on its last map.
pub fn activations(x: Tensor<4>, precision: Precision) -> Tensor<4> {
    crate::kernels::activations(x, precision)
}

/// `x` in f32 (a no-op on f32): where a model's bf16 activations leave it.
pub fn f32_activations<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    crate::kernels::f32_activations(x)
}
