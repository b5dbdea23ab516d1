//! GoogLeNet, Inception v1 (Szegedy et al. 2014, "Going Deeper with Convolutions").
//!
//! An Inception module runs four branches on the same input and concatenates them along the
//! channels: a 1x1 conv; a 1x1 "reduction" conv then a 3x3; a 1x1 reduction then a 5x5; and a
//! 3x3 stride-1 max pool then a 1x1 projection. The 1x1 reductions are what make the wide
//! module affordable: they shrink the channels before the expensive 3x3 and 5x5 convs.
//!
//! - `googlenet`: the paper's network: no batch norm (convs with bias), local response
//!   normalisation after the first pool and after conv3, a true 5x5 branch, dropout 0.4 before
//!   the classifier, and two auxiliary classifiers on inception 4a and 4d (5x5/3 average pool
//!   to 4x4, 1x1 conv to 128, FC 1024, dropout 0.7, FC K) whose losses are added with weight 0.3
//!   in training.
//! - `googlenet_tv`: torchvision's layout: batch norm after every conv (no conv bias), no LRN,
//!   a 3x3 conv in the "5x5" branch, dropout 0.2; 6,624,904 parameters without the auxiliary
//!   heads (torchvision's `aux_logits=False`), so its weights can be loaded.
//! - `googlenet_small`, for 28-32 px input: a stem with one pool instead of two (32 px ends at
//!   16 px before inception 3a, where 224 px gives 28), 3x3 stride-1 first conv instead of
//!   7x7/2, every width divided by 4, batch norm, and the auxiliary heads pooling to 2x2.
//!
//! Auxiliary heads are used only in training, through [`GoogLeNet::forward_aux`]; `forward`
//! and evaluation never run them, and they are not counted as model parameters.
//!
//! # Shapes (224 px)
//! stem `[B, 192, 28, 28]` -> 3a/3b `[B, 480, 28, 28]` -> pool -> 4a..4e `[B, 832, 14, 14]`
//! -> pool -> 5a/5b `[B, 1024, 7, 7]` -> GAP, dropout, FC -> `[B, K]`.

use super::{ModelConfig, ModelName, Options};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig, LocalResponseNorm, PaddingConfig2d};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::adaptive_avg_pool2d;

/// The recipe options this family takes: batch norm, LRN and dropout (it keeps its own
/// pooling, and has no paper initialisation).
pub(super) const OPTIONS: Options = Options {
    lrn: true,
    ..Options::NONE
};

impl GoogLeNetConfig {
    /// The configuration of a registered variant with the recipe's options applied: the paper's
    /// (LRN, true 5x5 branches, dropout 0.4), torchvision's (BN with eps 1e-3, 3x3 in the
    /// "5x5" branch, dropout 0.2) or the small one (BN, widths / 4, small stem).
    pub(super) fn from_options(o: &ModelConfig) -> Self {
        use ModelName::*;
        let paper = o.name == Googlenet;
        let mut c = GoogLeNetConfig::new(o.num_classes)
            .with_in_channels(o.in_channels)
            .with_batch_norm(o.batch_norm.unwrap_or(!paper))
            .with_lrn(o.lrn.unwrap_or(paper))
            .with_true_5x5(o.name != GooglenetTv)
            // torchvision's BasicConv2d: BatchNorm2d(eps=0.001), which its weights expect.
            .with_bn_eps(if o.name == GooglenetTv { 1e-3 } else { 1e-5 })
            .with_dropout(o.dropout.unwrap_or(if paper { 0.4 } else { 0.2 }));
        if o.name == GooglenetSmall {
            c = c.with_width_div(4).with_small_stem(true);
        }
        c
    }
}

use crate::layers::{ConvBnAct, Precision, global_avg_pool};

/// Inception module widths: `[in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj]`.
const INCEPTION: [[usize; 7]; 9] = [
    [192, 64, 96, 128, 16, 32, 32],     // 3a
    [256, 128, 128, 192, 32, 96, 64],   // 3b
    [480, 192, 96, 208, 16, 48, 64],    // 4a
    [512, 160, 112, 224, 24, 64, 64],   // 4b
    [512, 128, 128, 256, 24, 64, 64],   // 4c
    [512, 112, 144, 288, 32, 64, 64],   // 4d
    [528, 256, 160, 320, 32, 128, 128], // 4e
    [832, 256, 160, 320, 32, 128, 128], // 5a
    [832, 384, 192, 384, 48, 128, 128], // 5b
];
const NAMES: [&str; 9] = ["3a", "3b", "4a", "4b", "4c", "4d", "4e", "5a", "5b"];

/// Configuration of a [`GoogLeNet`].
#[derive(Config, Debug)]
pub struct GoogLeNetConfig {
    pub num_classes: usize,
    #[config(default = 3)]
    pub in_channels: usize,
    /// Batch norm after every conv (torchvision) instead of conv bias + LRN (paper).
    #[config(default = false)]
    pub batch_norm: bool,
    #[config(default = true)]
    pub lrn: bool,
    /// A true 5x5 conv in the third branch (paper) or a 3x3 (torchvision).
    #[config(default = true)]
    pub true_5x5: bool,
    #[config(default = 0.4)]
    pub dropout: f64,
    #[config(default = true)]
    pub aux: bool,
    /// Every width is divided by this (the small variant uses 4).
    #[config(default = 1)]
    pub width_div: usize,
    /// Small-input stem: one 3x3 stride-1 conv and a single pool.
    #[config(default = false)]
    pub small_stem: bool,
    /// Batch-norm epsilon (torchvision's GoogLeNet uses 1e-3).
    #[config(default = 1e-5)]
    pub bn_eps: f64,
}

/// One Inception module.
///
/// # Shapes
/// `[B, C_in, H, W]` -> `[B, c1 + c3 + c5 + cp, H, W]`.
#[derive(Module, Debug)]
pub struct Inception {
    pub b1: ConvBnAct,
    pub b2_reduce: ConvBnAct,
    pub b2: ConvBnAct,
    pub b3_reduce: ConvBnAct,
    pub b3: ConvBnAct,
    pub b4_pool: MaxPool2d,
    pub b4: ConvBnAct,
}

impl Inception {
    fn forward(&self, x: Tensor<4>, p: Precision) -> Tensor<4> {
        let a = self.b1.forward(x.clone(), p);
        let b = self.b2.forward(self.b2_reduce.forward(x.clone(), p), p);
        let c = self.b3.forward(self.b3_reduce.forward(x.clone(), p), p);
        let d = self
            .b4
            .forward(crate::layers::max_pool2d(&self.b4_pool, x), p);
        Tensor::cat(vec![a, b, c, d], 1)
    }

    fn onnx(&self, g: &mut crate::onnx::Graph, x: &str, name: &str) -> String {
        let a = self.b1.onnx(g, x, &format!("{name}.b1"));
        let b = self.b2_reduce.onnx(g, x, &format!("{name}.b2_reduce"));
        let b = self.b2.onnx(g, &b, &format!("{name}.b2"));
        let c = self.b3_reduce.onnx(g, x, &format!("{name}.b3_reduce"));
        let c = self.b3.onnx(g, &c, &format!("{name}.b3"));
        let d = g.max_pool(&self.b4_pool, x);
        let d = self.b4.onnx(g, &d, &format!("{name}.b4"));
        g.concat(&[a, b, c, d])
    }
}

/// An auxiliary classifier.
#[derive(Module, Debug)]
pub struct AuxHead {
    pub pool: usize,
    pub conv: ConvBnAct,
    pub fc1: Linear,
    pub fc2: Linear,
    pub dropout: Dropout,
}

impl AuxHead {
    fn forward(&self, x: Tensor<4>, p: Precision) -> Tensor<2> {
        let x = self
            .conv
            .forward(adaptive_avg_pool2d(x, [self.pool, self.pool]), p);
        let [b, c, h, w] = x.dims();
        let x = relu(self.fc1.forward(x.reshape([b, c * h * w])));
        self.fc2.forward(self.dropout.forward(x))
    }
}

/// GoogLeNet; see the module documentation.
#[derive(Module, Debug)]
pub struct GoogLeNet {
    pub stem: Vec<ConvBnAct>,
    pub pools: Vec<MaxPool2d>,
    pub lrn: Option<LocalResponseNorm>,
    pub blocks: Vec<Inception>,
    /// Heads on inception 4a and 4d (training only).
    pub aux: Vec<AuxHead>,
    pub dropout: Dropout,
    pub fc: Linear,
    /// The convolutions' arithmetic ([`super::Model::with_precision`]); not a weight.
    #[module(skip)]
    pub precision: Precision,
}

fn max_pool(k: usize, s: usize, p: usize) -> MaxPool2d {
    MaxPool2dConfig::new([k, k])
        .with_strides([s, s])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .with_ceil_mode(true)
        .init()
}

impl GoogLeNetConfig {
    fn w(&self, c: usize) -> usize {
        (c / self.width_div).max(1)
    }

    fn stem_plan(&self) -> Vec<[usize; 5]> {
        // [in, out, kernel, stride, pad]
        let (c64, c192) = (self.w(64), self.w(192));
        if self.small_stem {
            vec![
                [self.in_channels, c64, 3, 1, 1],
                [c64, c64, 1, 1, 0],
                [c64, c192, 3, 1, 1],
            ]
        } else {
            vec![
                [self.in_channels, c64, 7, 2, 3],
                [c64, c64, 1, 1, 0],
                [c64, c192, 3, 1, 1],
            ]
        }
    }

    pub fn init(&self, device: &Device) -> GoogLeNet {
        let bn = self.batch_norm;
        let conv = |i, o, k, s, p| {
            let mut c = ConvBnAct::new(i, o, k, s, p, bn, device);
            if let Some(b) = c.bn.as_mut() {
                b.epsilon = self.bn_eps;
            }
            c
        };
        let stem = self
            .stem_plan()
            .into_iter()
            .map(|[i, o, k, s, p]| conv(i, o, k, s, p))
            .collect();
        let k5 = if self.true_5x5 { 5 } else { 3 };
        let blocks = INCEPTION
            .iter()
            .map(|&[cin, c1, r3, c3, r5, c5, cp]| {
                let (cin, c1, r3, c3, r5, c5, cp) = (
                    self.w(cin),
                    self.w(c1),
                    self.w(r3),
                    self.w(c3),
                    self.w(r5),
                    self.w(c5),
                    self.w(cp),
                );
                Inception {
                    b1: conv(cin, c1, 1, 1, 0),
                    b2_reduce: conv(cin, r3, 1, 1, 0),
                    b2: conv(r3, c3, 3, 1, 1),
                    b3_reduce: conv(cin, r5, 1, 1, 0),
                    b3: conv(r5, c5, k5, 1, k5 / 2),
                    b4_pool: max_pool(3, 1, 1),
                    b4: conv(cin, cp, 1, 1, 0),
                }
            })
            .collect();
        let aux_pool = if self.small_stem { 2 } else { 4 };
        let aux = if self.aux {
            [self.w(512), self.w(528)]
                .into_iter()
                .map(|cin| AuxHead {
                    pool: aux_pool,
                    conv: conv(cin, self.w(128), 1, 1, 0),
                    fc1: LinearConfig::new(self.w(128) * aux_pool * aux_pool, self.w(1024))
                        .init(device),
                    fc2: LinearConfig::new(self.w(1024), self.num_classes).init(device),
                    dropout: DropoutConfig::new(0.7).init(),
                })
                .collect()
        } else {
            Vec::new()
        };
        // Stem pools (two; one for the small stem), then after 3b and after 4e.
        let mut pools = vec![max_pool(3, 2, 0)];
        if !self.small_stem {
            pools.push(max_pool(3, 2, 0));
        }
        pools.push(max_pool(3, 2, 0));
        pools.push(max_pool(2, 2, 0));
        GoogLeNet {
            stem,
            pools,
            lrn: self.lrn.then(|| crate::layers::paper_lrn().init()),
            blocks,
            aux,
            dropout: DropoutConfig::new(self.dropout).init(),
            fc: LinearConfig::new(self.w(1024), self.num_classes).init(device),
            precision: Precision::Fp32,
        }
    }
}

impl GoogLeNet {
    /// The stem and inception modules, calling `tap` with `conv1`..`conv3` and
    /// `inception3a`..`inception5b`; `aux_taps` receives the 4a and 4d outputs.
    fn run(
        &self,
        mut x: Tensor<4>,
        tap: &mut crate::layers::Tap,
        aux_taps: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        let small = self.pools.len() == 3;
        for (i, c) in self.stem.iter().enumerate() {
            x = c.forward(x, self.precision);
            x = tap(format!("conv{}", i + 1), x);
            if i == 0 && !small {
                x = crate::layers::max_pool2d(&self.pools[0], x);
                if let Some(l) = &self.lrn {
                    x = l.forward(x);
                }
            }
        }
        if let Some(l) = &self.lrn {
            x = l.forward(x);
        }
        let p0 = if small { 0 } else { 1 };
        x = crate::layers::max_pool2d(&self.pools[p0], x);
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward(x, self.precision);
            x = tap(format!("inception{}", NAMES[i]), x);
            if i == 2 || i == 5 {
                aux_taps.push(x.clone());
            }
            if i == 1 {
                x = crate::layers::max_pool2d(&self.pools[p0 + 1], x);
            }
            if i == 6 {
                x = crate::layers::max_pool2d(&self.pools[p0 + 2], x);
            }
        }
        x
    }

    pub fn features(&self, x: Tensor<4>, tap: &mut crate::layers::Tap) -> Tensor<4> {
        self.run(x, tap, &mut Vec::new())
    }

    /// Training forward: the logits and the auxiliary classifiers' logits.
    pub fn forward_aux(&self, x: Tensor<4>) -> (Tensor<2>, Vec<Tensor<2>>) {
        let mut taps = Vec::new();
        let f = self.run(x, &mut |_, x| x, &mut taps);
        let aux = self
            .aux
            .iter()
            .zip(taps)
            .map(|(h, t)| h.forward(t, self.precision))
            .collect();
        (self.forward_head(f), aux)
    }

    /// # Shapes
    /// `[B, 1024, h, w]` -> `[B, K]`.
    pub fn forward_head(&self, f: Tensor<4>) -> Tensor<2> {
        self.fc.forward(self.dropout.forward(global_avg_pool(f)))
    }

    /// The ONNX nodes of `forward` (the auxiliary heads are training-only and left out).
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> String {
        let small = self.pools.len() == 3;
        let mut x = x.to_string();
        for (i, c) in self.stem.iter().enumerate() {
            x = c.onnx(g, &x, &format!("stem.{i}"));
            if i == 0 && !small {
                x = g.max_pool(&self.pools[0], &x);
                if self.lrn.is_some() {
                    x = g.lrn(&crate::layers::paper_lrn(), &x);
                }
            }
        }
        if self.lrn.is_some() {
            x = g.lrn(&crate::layers::paper_lrn(), &x);
        }
        let p0 = if small { 0 } else { 1 };
        x = g.max_pool(&self.pools[p0], &x);
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.onnx(g, &x, &format!("blocks.{i}"));
            if i == 1 {
                x = g.max_pool(&self.pools[p0 + 1], &x);
            }
            if i == 6 {
                x = g.max_pool(&self.pools[p0 + 2], &x);
            }
        }
        let f = g.global_avg_pool(&x);
        g.linear(&self.fc, &f, "fc")
    }

    pub fn num_classes(&self) -> usize {
        self.fc.weight.val().dims()[1]
    }

    /// A fresh classifier (and fresh auxiliary classifiers) with `n` outputs.
    pub fn with_classes(mut self, n: usize, device: &Device) -> Self {
        let d = self.fc.weight.val().dims()[0];
        self.fc = LinearConfig::new(d, n).init(device);
        for h in &mut self.aux {
            let d = h.fc2.weight.val().dims()[0];
            h.fc2 = LinearConfig::new(d, n).init(device);
        }
        self
    }
}
