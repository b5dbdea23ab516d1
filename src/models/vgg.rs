//! VGG (Simonyan & Zisserman 2014, "Very Deep Convolutional Networks for Large-Scale Image
//! Recognition"): stacks of 3x3 convolutions (two 3x3 layers see as far as one 5x5 with fewer
//! parameters and one more non-linearity), five max-pool stages, and three fully connected
//! layers (4096-4096-K) with dropout 0.5.
//!
//! Configurations, as the paper's table 1: A (`vgg11`), A-LRN (`vgg11_lrn`: LRN after the first
//! conv), B (`vgg13`), C (`vgg16_c`: a 1x1 conv closing the last three blocks), D (`vgg16`),
//! E (`vgg19`), and torchvision's `_bn` variants of A, B, D, E (BN after every conv, conv bias
//! kept). Layouts follow torchvision (adaptive average pool to 7x7 before the classifier), so
//! parameter counts equal torchvision's.
//!
//! `vgg11_small` keeps configuration A's design (stacked 3x3 convs, channels doubling per
//! stage, three FC layers with dropout) for 28-32 px input: half the widths (32-64-128-256),
//! four pool stages instead of five (32 px ends at 2x2, not 1x1 after a fifth), BN so it trains
//! without the paper's shallow-to-deep initialisation, global pooling and 256-wide FC layers.

use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::adaptive_avg_pool2d;

use super::{ModelConfig, ModelName, Options};
use crate::layers::trunk::{Trunk, TrunkSpec, parse_plan};
use crate::layers::{self, PoolKind};

/// The recipe options this family takes: a plan, pooling, batch norm, LRN, dropout, and the
/// paper's `N(0, 0.01)` initialisation.
pub(super) const OPTIONS: Options = Options {
    plan: true,
    pooling: true,
    lrn: true,
    paper_init: true,
    ..Options::NONE
};

/// The registered variants' layer plans (the paper's table 1).
pub(super) fn default_plan(name: ModelName) -> &'static str {
    use ModelName::*;
    match name {
        Vgg13 | Vgg13Bn => VGG_B,
        Vgg16C => VGG_C,
        Vgg16 | Vgg16Bn => VGG_D,
        Vgg19 | Vgg19Bn => VGG_E,
        Vgg11Small => VGG_A_SMALL,
        _ => VGG_A,
    }
}

/// Whether a variant has batch norm by default (torchvision's `_bn` ones and the small one).
pub(super) fn default_batch_norm(name: ModelName) -> bool {
    use ModelName::*;
    matches!(name, Vgg11Bn | Vgg13Bn | Vgg16Bn | Vgg19Bn | Vgg11Small)
}

impl VggConfig {
    /// The configuration of a registered variant with the recipe's options applied.
    pub(super) fn from_options(o: &ModelConfig) -> Self {
        let small = o.name == ModelName::Vgg11Small;
        VggConfig::new(o.plan().to_string(), o.num_classes)
            .with_in_channels(o.in_channels)
            .with_batch_norm(o.batch_norm.unwrap_or(default_batch_norm(o.name)))
            .with_lrn(o.lrn.unwrap_or(o.name == ModelName::Vgg11Lrn))
            .with_pool(o.pool)
            .with_pool_kernel(if o.overlapping_pool == Some(true) {
                3
            } else {
                2
            })
            .with_dropout(o.dropout.unwrap_or(0.5))
            .with_hidden(if small { 256 } else { 4096 })
            .with_head_pool(if small { 1 } else { 7 })
    }
}

/// Configuration A (11 weight layers).
pub const VGG_A: &str = "64,M,128,M,256,256,M,512,512,M,512,512,M";
/// Configuration B (13).
pub const VGG_B: &str = "64,64,M,128,128,M,256,256,M,512,512,M,512,512,M";
/// Configuration C (16, three of them 1x1).
pub const VGG_C: &str = "64,64,M,128,128,M,256,256,256k1,M,512,512,512k1,M,512,512,512k1,M";
/// Configuration D (16).
pub const VGG_D: &str = "64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512,M";
/// Configuration E (19).
pub const VGG_E: &str = "64,64,M,128,128,M,256,256,256,256,M,512,512,512,512,M,512,512,512,512,M";
/// The small-input variant of A.
pub const VGG_A_SMALL: &str = "32,M,64,M,128,128,M,256,256,M";

/// Configuration of a [`Vgg`].
#[derive(Config, Debug)]
pub struct VggConfig {
    pub plan: String,
    pub num_classes: usize,
    #[config(default = 3)]
    pub in_channels: usize,
    #[config(default = false)]
    pub batch_norm: bool,
    #[config(default = false)]
    pub lrn: bool,
    #[config(default = "PoolKind::Max")]
    pub pool: PoolKind,
    #[config(default = 2)]
    pub pool_kernel: usize,
    #[config(default = 0.5)]
    pub dropout: f64,
    /// Width of the two hidden FC layers.
    #[config(default = 4096)]
    pub hidden: usize,
    /// Side of the adaptive average pool before the classifier (torchvision: 7).
    #[config(default = 7)]
    pub head_pool: usize,
}

/// A VGG network.
///
/// # Shapes
/// `[B, 3, 224, 224]` -> features `[B, 512, 7, 7]` -> logits `[B, K]`.
#[derive(Module, Debug)]
pub struct Vgg {
    pub trunk: Trunk,
    pub head_pool: usize,
    pub fc6: Linear,
    pub fc7: Linear,
    pub fc8: Linear,
    pub dropout: Dropout,
    /// The convolutions' arithmetic ([`super::Model::with_precision`]); not a weight.
    #[module(skip)]
    pub precision: crate::layers::Precision,
}

impl VggConfig {
    pub fn trunk_spec(&self) -> TrunkSpec {
        TrunkSpec {
            plan: parse_plan(&self.plan).expect("plan validated by the registry"),
            in_channels: self.in_channels,
            batch_norm: self.batch_norm,
            conv_bias: true,
            pool: self.pool,
            pool_kernel: self.pool_kernel,
            lrn: self.lrn,
        }
    }

    pub fn init(&self, device: &Device) -> Vgg {
        let trunk = self.trunk_spec().init(device);
        let flat = trunk.out_channels * self.head_pool * self.head_pool;
        Vgg {
            fc6: LinearConfig::new(flat, self.hidden).init(device),
            fc7: LinearConfig::new(self.hidden, self.hidden).init(device),
            fc8: LinearConfig::new(self.hidden, self.num_classes).init(device),
            dropout: DropoutConfig::new(self.dropout).init(),
            head_pool: self.head_pool,
            trunk,
            precision: crate::layers::Precision::Fp32,
        }
    }
}

impl Vgg {
    /// Runs the trunk, calling `tap` with `conv1`.. and `pool1`..; in bf16 the activations
    /// between the layers are bf16 ([`crate::layers::activations`]), the last map f32.
    pub fn features(&self, x: Tensor<4>, tap: &mut crate::layers::Tap) -> Tensor<4> {
        let x = crate::layers::activations(x, self.precision);
        crate::layers::f32_activations(self.trunk.forward(x, tap, self.precision))
    }

    /// # Shapes
    /// `[B, C, h, w]` -> `[B, K]`.
    pub fn forward_head(&self, f: Tensor<4>) -> Tensor<2> {
        let p = self.head_pool;
        let x = adaptive_avg_pool2d(f, [p, p]);
        let [b, c, _, _] = x.dims();
        let x = x.reshape([b, c * p * p]);
        let x = self.dropout.forward(relu(layers::linear(&self.fc6, x)));
        let x = self.dropout.forward(relu(layers::linear(&self.fc7, x)));
        layers::linear(&self.fc8, x)
    }

    /// The ONNX nodes of `forward` on an input whose feature map is `hw` (the adaptive pool
    /// depends on it; dropout is the identity at inference).
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> String {
        let f = self.trunk.onnx(g, x, "trunk");
        let x = g.adaptive_avg_pool_flat(&f, self.head_pool);
        let x = g.linear(&self.fc6, &x, "fc6");
        let x = g.relu(&x);
        let x = g.linear(&self.fc7, &x, "fc7");
        let x = g.relu(&x);
        g.linear(&self.fc8, &x, "fc8")
    }

    pub fn num_classes(&self) -> usize {
        self.fc8.weight.val().dims()[1]
    }

    pub fn with_classes(mut self, n: usize, device: &Device) -> Self {
        let h = self.fc8.weight.val().dims()[0];
        self.fc8 = LinearConfig::new(h, n).init(device);
        self
    }
}
