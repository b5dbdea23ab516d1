//! Plain convolutional networks: stacks of 3x3 conv-BN-ReLU units separated by pooling, global
//! average pooling and one linear classifier.
//!
//! This is the VGG design (Simonyan & Zisserman 2014, "Very Deep Convolutional Networks for
//! Large-Scale Image Recognition": stacked 3x3 convolutions, channels doubling after each pool)
//! with two changes that make it train in minutes on small images: batch norm after every
//! convolution (Ioffe & Szegedy 2015) and global average pooling instead of the 4096-wide fully
//! connected layers (Lin et al. 2013, "Network in Network"), which removes ~90% of VGG's
//! parameters. It is convlab's default model (`convnet_small`) and the peer-comparison network
//! (`bench-vgg`).

use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::prelude::*;

use super::{ModelConfig, ModelName, Options};
use crate::layers::trunk::{Trunk, TrunkSpec, parse_plan};
use crate::layers::{PoolKind, global_avg_pool};

/// The recipe options this family takes: a plan, pooling kind and size, batch norm on or
/// off, dropout, xavier/kaiming init.
pub(super) const OPTIONS: Options = Options {
    plan: true,
    pooling: true,
    ..Options::NONE
};

/// The registered variants' layer plans.
pub(super) fn default_plan(name: ModelName) -> &'static str {
    match name {
        ModelName::BenchVgg => "64,64,M,128,128,M,256,256,M",
        _ => "32,M,64,M,128,128",
    }
}

impl ConvNetConfig {
    /// The configuration of a registered variant with the recipe's options applied. Both
    /// variants have batch norm by default and no dropout.
    pub(super) fn from_options(o: &ModelConfig) -> Self {
        ConvNetConfig::new(o.plan().to_string(), o.num_classes)
            .with_in_channels(o.in_channels)
            .with_batch_norm(o.batch_norm.unwrap_or(true))
            .with_pool(o.pool)
            .with_pool_kernel(if o.overlapping_pool == Some(true) {
                3
            } else {
                2
            })
            .with_dropout(o.dropout.unwrap_or(0.0))
    }
}

/// Configuration of a [`ConvNet`].
#[derive(Config, Debug)]
pub struct ConvNetConfig {
    /// Layer plan in VGG notation, e.g. `"32,32,M,64,64,M,128"`.
    pub plan: String,
    pub num_classes: usize,
    #[config(default = 3)]
    pub in_channels: usize,
    #[config(default = true)]
    pub batch_norm: bool,
    #[config(default = "PoolKind::Max")]
    pub pool: PoolKind,
    /// Pooling window (stride 2): 2 plain, 3 overlapping.
    #[config(default = 2)]
    pub pool_kernel: usize,
    #[config(default = 0.0)]
    pub dropout: f64,
}

/// A plain conv net; see the module documentation.
///
/// # Shapes
/// `[B, C_in, H, W]` -> features `[B, C_last, H / 2^p, W / 2^p]` (p pools) -> logits `[B, K]`.
#[derive(Module, Debug)]
pub struct ConvNet {
    pub trunk: Trunk,
    pub dropout: Dropout,
    pub fc: Linear,
    /// The convolutions' arithmetic ([`super::Model::with_precision`]); not a weight.
    #[module(skip)]
    pub precision: crate::layers::Precision,
}

impl ConvNetConfig {
    pub fn trunk_spec(&self) -> TrunkSpec {
        TrunkSpec {
            plan: parse_plan(&self.plan).expect("plan validated by the registry"),
            in_channels: self.in_channels,
            batch_norm: self.batch_norm,
            conv_bias: false,
            pool: self.pool,
            pool_kernel: self.pool_kernel,
            lrn: false,
        }
    }

    pub fn init(&self, device: &Device) -> ConvNet {
        let trunk = self.trunk_spec().init(device);
        ConvNet {
            dropout: DropoutConfig::new(self.dropout).init(),
            fc: LinearConfig::new(trunk.out_channels, self.num_classes).init(device),
            trunk,
            precision: crate::layers::Precision::Fp32,
        }
    }
}

impl ConvNet {
    /// Runs the trunk, calling `tap` with `conv1`.. and `pool1`..; in bf16 the activations
    /// between the layers are bf16 ([`crate::layers::activations`]), the last map f32.
    pub fn features(&self, x: Tensor<4>, tap: &mut crate::layers::Tap) -> Tensor<4> {
        let x = crate::layers::activations(x, self.precision);
        crate::layers::f32_activations(self.trunk.forward(x, tap, self.precision))
    }

    /// # Shapes
    /// `[B, C_last, h, w]` -> `[B, K]`.
    pub fn forward_head(&self, f: Tensor<4>) -> Tensor<2> {
        self.fc.forward(self.dropout.forward(global_avg_pool(f)))
    }

    /// The ONNX nodes of `forward` (dropout is the identity at inference).
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> String {
        let f = self.trunk.onnx(g, x, "trunk");
        let f = g.global_avg_pool(&f);
        g.linear(&self.fc, &f, "fc")
    }

    pub fn num_classes(&self) -> usize {
        self.fc.weight.val().dims()[1]
    }

    /// Replaces the classifier with a fresh one of `n` outputs, keeping the trunk.
    pub fn with_classes(mut self, n: usize, device: &Device) -> Self {
        self.fc = LinearConfig::new(self.trunk.out_channels, n).init(device);
        self
    }
}
