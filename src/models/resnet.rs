//! ResNet (He et al. 2015, "Deep Residual Learning for Image Recognition"), in torchvision's
//! layout, which is the "ResNet-B" of "Bag of Tricks for Image Classification" (He et al.
//! 2019): the stride-2 of a bottleneck sits in its 3x3 conv, not its first 1x1.
//!
//! - `resnet18`, `resnet34`: basic blocks (two 3x3 convs), stages of [2,2,2,2] / [3,4,6,3].
//! - `resnet50`: bottleneck blocks (1x1 reduce, 3x3, 1x1 expand x4), stages [3,4,6,3].
//! - `resnet50_d`: Bag of Tricks' ResNet-D: the 7x7 stem replaced by three 3x3 convs
//!   (32-32-64, the "C" tweak) and the downsampling shortcut made a 2x2 average pool followed
//!   by a stride-1 1x1 conv (the "D" tweak), so the shortcut no longer ignores 3/4 of its input.
//! - `resnet18_small`: for 28-32 px input, the CIFAR design of the ResNet paper (section 4.2):
//!   a single 3x3 stride-1 stem conv without max pooling (a 7x7/2 conv and a pool would shrink
//!   32 px to 8 px before the first block), and widths 16-32-64-128 instead of 64-512, keeping
//!   resnet18's four stages of two basic blocks.
//!
//! `zero_gamma` initialises the last batch norm's scale in each block to zero, so every
//! residual block starts as the identity (Goyal et al. 2017; a "Bag of Tricks" baseline trick).

use super::{ModelConfig, ModelName, Options};
use crate::layers::Precision;
use burn::nn::pool::{AvgPool2d, AvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::prelude::*;

/// The recipe options this family takes: zero-gamma and kaiming/xavier/paper (= He)
/// initialisation; it is always built with batch norm and keeps its own pooling.
pub(super) const OPTIONS: Options = Options {
    zero_gamma: true,
    paper_init: true,
    batch_norm_required: true,
    ..Options::NONE
};

impl ResNetConfig {
    /// The configuration of a registered variant with the recipe's options applied:
    /// ResNet-18/34 (basic blocks), -50 (bottlenecks, torchvision's ResNet-B), -50-D (deep
    /// stem, average-pool shortcuts) and the small CIFAR-stem ResNet-18 (widths 16-128).
    pub(super) fn from_options(o: &ModelConfig) -> Self {
        use ModelName::*;
        let (layers, bottleneck) = match o.name {
            Resnet34 | Resnet50 | Resnet50D => ([3, 4, 6, 3], o.name != Resnet34),
            _ => ([2, 2, 2, 2], false),
        };
        let mut c = ResNetConfig::new(layers, bottleneck, o.num_classes)
            .with_in_channels(o.in_channels)
            .with_zero_gamma(o.zero_gamma);
        if o.name == Resnet50D {
            c = c.with_stem("deep".into()).with_avg_down(true);
        }
        if o.name == Resnet18Small {
            c = c.with_stem("cifar".into()).with_widths([16, 32, 64, 128]);
        }
        c
    }
}

use crate::layers::{ConvBn, global_avg_pool};

/// Configuration of a [`ResNet`].
#[derive(Config, Debug)]
pub struct ResNetConfig {
    /// Blocks per stage.
    pub layers: [usize; 4],
    /// Bottleneck (ResNet-50 and deeper) or basic blocks.
    pub bottleneck: bool,
    pub num_classes: usize,
    #[config(default = 3)]
    pub in_channels: usize,
    /// Widths of the four stages (before the bottleneck expansion).
    #[config(default = "[64, 128, 256, 512]")]
    pub widths: [usize; 4],
    /// Stem: "imagenet" (7x7/2 conv + 3x3/2 max pool), "deep" (ResNet-C: three 3x3 convs +
    /// max pool), or "cifar" (one 3x3/1 conv, no pool).
    #[config(default = "String::from(\"imagenet\")")]
    pub stem: String,
    /// ResNet-D: average-pool then 1x1 conv on downsampling shortcuts.
    #[config(default = false)]
    pub avg_down: bool,
    #[config(default = false)]
    pub zero_gamma: bool,
}

/// The shortcut of a block that changes resolution or width.
#[derive(Module, Debug)]
pub struct Downsample {
    pub pool: Option<AvgPool2d>,
    pub proj: ConvBn,
}

impl Downsample {
    fn forward(&self, x: Tensor<4>, precision: Precision) -> Tensor<4> {
        let x = match &self.pool {
            Some(p) => p.forward(x),
            None => x,
        };
        self.proj.forward(x, false, precision)
    }

    fn onnx(&self, g: &mut crate::onnx::Graph, x: &str, name: &str) -> String {
        let x = match &self.pool {
            Some(p) => g.avg_pool(p, x),
            None => x.to_string(),
        };
        g.conv_bn(&self.proj.conv, Some(&self.proj.bn), &x, false, name)
    }
}

/// A basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1) residual block.
///
/// # Shapes
/// `[B, C_in, H, W]` -> `[B, C_out, H / s, W / s]`.
#[derive(Module, Debug)]
pub struct Block {
    pub convs: Vec<ConvBn>,
    pub down: Option<Downsample>,
}

impl Block {
    fn forward(&self, x: Tensor<4>, precision: Precision) -> Tensor<4> {
        let branch = |mut y: Tensor<4>| {
            let n = self.convs.len();
            for (i, c) in self.convs.iter().enumerate() {
                y = c.forward(y, i + 1 < n, precision);
            }
            y
        };
        // The entry gives the block's input one gradient, the branch's and the shortcut's
        // added by convlab rather than by Burn's registry (`kernels::residual_entry`).
        let (x, shortcut) = crate::layers::residual_entry(x);
        match &self.down {
            Some(d) => {
                let shortcut = d.forward(shortcut.into_input(), precision);
                crate::layers::add_relu(branch(x), shortcut)
            }
            None => crate::layers::add_relu_shortcut(branch(x), shortcut),
        }
    }

    fn onnx(&self, g: &mut crate::onnx::Graph, x: &str, name: &str) -> String {
        let shortcut = match &self.down {
            Some(d) => d.onnx(g, x, &format!("{name}.down.proj")),
            None => x.to_string(),
        };
        let n = self.convs.len();
        let mut y = x.to_string();
        for (i, c) in self.convs.iter().enumerate() {
            y = g.conv_bn(
                &c.conv,
                Some(&c.bn),
                &y,
                i + 1 < n,
                &format!("{name}.convs.{i}"),
            );
        }
        let y = g.add(&y, &shortcut);
        g.relu(&y)
    }
}

/// A ResNet.
///
/// # Shapes
/// `[B, 3, 224, 224]` -> stem `[B, 64, 56, 56]` -> layer4 `[B, 512 * e, 7, 7]` -> `[B, K]`
/// (`e` = 4 for bottlenecks, else 1).
#[derive(Module, Debug)]
pub struct ResNet {
    pub stem: Vec<ConvBn>,
    pub stem_pool: Option<MaxPool2d>,
    pub stages: Vec<Vec<Block>>,
    pub fc: Linear,
    /// The convolutions' arithmetic ([`super::Model::with_precision`]); not a weight.
    #[module(skip)]
    pub precision: Precision,
}

impl ResNetConfig {
    fn expansion(&self) -> usize {
        if self.bottleneck { 4 } else { 1 }
    }

    pub fn init(&self, device: &Device) -> ResNet {
        let c0 = self.widths[0];
        let (stem, pool) = match self.stem.as_str() {
            "deep" => (
                vec![
                    ConvBn::new(self.in_channels, c0 / 2, 3, 2, device),
                    ConvBn::new(c0 / 2, c0 / 2, 3, 1, device),
                    ConvBn::new(c0 / 2, c0, 3, 1, device),
                ],
                true,
            ),
            "cifar" => (vec![ConvBn::new(self.in_channels, c0, 3, 1, device)], false),
            _ => (vec![ConvBn::new(self.in_channels, c0, 7, 2, device)], true),
        };
        let e = self.expansion();
        let mut cin = c0;
        let mut stages = Vec::new();
        for (s, (&n, &w)) in self.layers.iter().zip(&self.widths).enumerate() {
            let mut blocks = Vec::new();
            for b in 0..n {
                let stride = if s > 0 && b == 0 { 2 } else { 1 };
                let cout = w * e;
                let down = (stride != 1 || cin != cout).then(|| Downsample {
                    pool: (self.avg_down && stride != 1).then(|| {
                        AvgPool2dConfig::new([2, 2])
                            .with_strides([2, 2])
                            .with_ceil_mode(true)
                            .with_count_include_pad(false)
                            .init()
                    }),
                    proj: ConvBn::new(cin, cout, 1, if self.avg_down { 1 } else { stride }, device),
                });
                let mut convs = if self.bottleneck {
                    vec![
                        ConvBn::new(cin, w, 1, 1, device),
                        ConvBn::new(w, w, 3, stride, device),
                        ConvBn::new(w, cout, 1, 1, device),
                    ]
                } else {
                    vec![
                        ConvBn::new(cin, w, 3, stride, device),
                        ConvBn::new(w, w, 3, 1, device),
                    ]
                };
                if self.zero_gamma {
                    let last = convs.pop().expect("block has convs").zero_gamma();
                    convs.push(last);
                }
                blocks.push(Block { convs, down });
                cin = cout;
            }
            stages.push(blocks);
        }
        ResNet {
            stem,
            stem_pool: pool.then(|| {
                MaxPool2dConfig::new([3, 3])
                    .with_strides([2, 2])
                    .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                    .init()
            }),
            stages,
            fc: LinearConfig::new(cin, self.num_classes).init(device),
            precision: Precision::Fp32,
        }
    }
}

impl ResNet {
    /// Runs stem and stages, calling `tap` with `stem`, `layer1` .. `layer4`.
    /// In bf16 the activations between the layers are bf16 ([`crate::layers::activations`]);
    /// the last map comes out f32.
    pub fn features(&self, x: Tensor<4>, tap: &mut crate::layers::Tap) -> Tensor<4> {
        let p = self.precision;
        let mut x = crate::layers::activations(x, p);
        for c in &self.stem {
            x = c.forward(x, true, p);
        }
        if let Some(p) = &self.stem_pool {
            x = crate::layers::max_pool2d(p, x);
        }
        x = tap("stem".into(), x);
        for (i, stage) in self.stages.iter().enumerate() {
            for b in stage {
                x = b.forward(x, p);
            }
            x = tap(format!("layer{}", i + 1), x);
        }
        crate::layers::f32_activations(x)
    }

    /// # Shapes
    /// `[B, C, h, w]` -> `[B, K]`.
    pub fn forward_head(&self, f: Tensor<4>) -> Tensor<2> {
        self.fc.forward(global_avg_pool(f))
    }

    /// The ONNX nodes of `forward`.
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> String {
        let mut x = x.to_string();
        for (i, c) in self.stem.iter().enumerate() {
            x = g.conv_bn(&c.conv, Some(&c.bn), &x, true, &format!("stem.{i}"));
        }
        if let Some(p) = &self.stem_pool {
            x = g.max_pool(p, &x);
        }
        for (s, stage) in self.stages.iter().enumerate() {
            for (b, block) in stage.iter().enumerate() {
                x = block.onnx(g, &x, &format!("stages.{s}.{b}"));
            }
        }
        let f = g.global_avg_pool(&x);
        g.linear(&self.fc, &f, "fc")
    }

    pub fn num_classes(&self) -> usize {
        self.fc.weight.val().dims()[1]
    }

    pub fn with_classes(mut self, n: usize, device: &Device) -> Self {
        let d = self.fc.weight.val().dims()[0];
        self.fc = LinearConfig::new(d, n).init(device);
        self
    }
}
