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

use crate::layers::trunk::{Trunk, TrunkSpec, parse_plan};
use crate::layers::{PoolKind, global_avg_pool};

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
        }
    }

    /// Multiply-adds x 2 per image at `size x size`.
    pub fn flops(&self, size: usize) -> f64 {
        let spec = self.trunk_spec();
        let (f, _) = spec.flops(size);
        f + 2.0 * (spec.out_channels() * self.num_classes) as f64
    }
}

impl ConvNet {
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
