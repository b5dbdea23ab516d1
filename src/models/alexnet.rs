//! AlexNet (Krizhevsky, Sutskever & Hinton 2012, "ImageNet Classification with Deep
//! Convolutional Neural Networks") and the module ZFNet reuses.
//!
//! - `alexnet`: torchvision's single-tower layout: convs 64-192-384-256-256 (11x11/4, 5x5,
//!   3x3, 3x3, 3x3), overlapping 3x3 stride-2 max pooling after conv1, conv2 and conv5,
//!   adaptive average pooling to 6x6, dropout 0.5, FC 4096-4096-K. 61,100,840 parameters.
//! - `alexnet_paper`: the paper's 96-256-384-384-256 with ReLU, local response normalisation
//!   (k=2, n=5, alpha=1e-4, beta=0.75) after conv1 and conv2, the two-GPU grouping as
//!   `groups = 2` on conv2, conv4 and conv5 (those layers only saw the kernels on their own
//!   GPU), and the paper's init: weights N(0, 0.01), biases 1 in conv2, conv4, conv5 and the
//!   hidden FC layers (to give ReLUs positive inputs early), 0 elsewhere.
//! - `alexnet_small`, for 28-32 px input: the same sequence (a large strided first filter,
//!   LRN, overlapping pooling, 5x5 then three 3x3 convs, two dropout FC layers) scaled down:
//!   conv1 5x5 stride 2 instead of 11x11 stride 4 (32 px would be 8 px after it), widths
//!   64-128-192-192-128, pools padded by one so each halves the size (16-8-4-2), FC 512.
//!
//! Switches: `pool = "avg"` and plain 2x2/2 pooling (`overlapping_pool = false`), LRN and BN
//! on or off, dropout.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Initializer, Linear, LinearConfig,
    LocalResponseNorm, PaddingConfig2d,
};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::tensor::module::adaptive_avg_pool2d;

use super::init::Init;
use super::{Family, ModelConfig, ModelName, Options};
use crate::layers::{self, Pool, PoolKind, Precision};

/// Configuration of an [`AlexNet`] (also used for ZFNet).
#[derive(Config, Debug)]
pub struct AlexNetConfig {
    /// Each conv: `[out_channels, kernel, stride, padding, groups]`.
    pub convs: Vec<[usize; 5]>,
    /// Indices (0-based) of the convs followed by a pool.
    pub pool_after: Vec<usize>,
    /// Indices of the convs followed by local response normalisation.
    pub lrn_after: Vec<usize>,
    pub num_classes: usize,
    #[config(default = 3)]
    pub in_channels: usize,
    /// Side of the adaptive average pool before the classifier.
    #[config(default = 6)]
    pub head_pool: usize,
    /// Width of the two hidden FC layers; 0 removes them (pooled features -> classifier).
    #[config(default = 4096)]
    pub hidden: usize,
    #[config(default = 0.5)]
    pub dropout: f64,
    #[config(default = "PoolKind::Max")]
    pub pool: PoolKind,
    /// 3x3 stride-2 pooling (true) or 2x2 stride 2 (false).
    #[config(default = true)]
    pub overlapping: bool,
    /// Padding of the pools (1 keeps the small variants' sizes halving).
    #[config(default = 0)]
    pub pool_pad: usize,
    #[config(default = false)]
    pub batch_norm: bool,
    /// The AlexNet paper's Gaussian weights and unit biases.
    #[config(default = false)]
    pub paper_init: bool,
}

/// AlexNet-style network: convs with optional LRN/BN and pools, then three FC layers.
///
/// # Shapes
/// `[B, 3, 224, 224]` -> features `[B, 256, 6, 6]` -> logits `[B, K]` (torchvision layout).
#[derive(Module, Debug)]
pub struct AlexNet {
    pub convs: Vec<Conv2d>,
    pub bns: Vec<Option<BatchNorm>>,
    pub lrns: Vec<Option<LocalResponseNorm>>,
    pub pools: Vec<Option<Pool>>,
    pub head_pool: usize,
    /// The hidden FC layers (absent when the config's `hidden` is 0: ZFNet's ablation).
    pub fc6: Option<Linear>,
    pub fc7: Option<Linear>,
    pub fc8: Linear,
    pub dropout: Dropout,
    /// The convolutions' arithmetic ([`super::Model::with_precision`]); not a weight.
    #[module(skip)]
    pub precision: Precision,
}

fn set_bias(conv: Conv2d, value: f32) -> Conv2d {
    let mut conv = conv;
    conv.bias = conv.bias.map(|b| b.map(|t| t.zeros_like() + value));
    conv
}

fn set_linear_bias(l: Linear, value: f32) -> Linear {
    let mut l = l;
    l.bias = l.bias.map(|b| b.map(|t| t.zeros_like() + value));
    l
}

impl AlexNetConfig {
    pub fn init(&self, device: &Device) -> AlexNet {
        let gauss = Initializer::Normal {
            mean: 0.0,
            std: 0.01,
        };
        let mut c = self.in_channels;
        let mut convs = Vec::new();
        let (mut bns, mut lrns, mut pools) = (Vec::new(), Vec::new(), Vec::new());
        let (k, s) = if self.overlapping { (3, 2) } else { (2, 2) };
        for (i, &[out, ks, stride, pad, groups]) in self.convs.iter().enumerate() {
            let mut cfg = Conv2dConfig::new([c, out], [ks, ks])
                .with_stride([stride, stride])
                .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
                .with_groups(groups)
                .with_bias(!self.batch_norm);
            if self.paper_init {
                cfg = cfg.with_initializer(gauss.clone());
            }
            let mut conv = cfg.init(device);
            if self.paper_init {
                // Paper: bias 1 in conv2, conv4, conv5; 0 in conv1 and conv3.
                conv = set_bias(conv, if [1, 3, 4].contains(&i) { 1.0 } else { 0.0 });
            }
            convs.push(conv);
            bns.push(
                self.batch_norm
                    .then(|| BatchNormConfig::new(out).init(device)),
            );
            lrns.push(
                self.lrn_after
                    .contains(&i)
                    .then(|| crate::layers::paper_lrn().init()),
            );
            pools.push(
                self.pool_after
                    .contains(&i)
                    .then(|| Pool::new(self.pool, k, s, self.pool_pad)),
            );
            c = out;
        }
        let flat = c * self.head_pool * self.head_pool;
        let linear = |i: usize, o: usize, bias: f32| {
            let mut cfg = LinearConfig::new(i, o);
            if self.paper_init {
                cfg = cfg.with_initializer(gauss.clone());
            }
            let l = cfg.init(device);
            if self.paper_init {
                set_linear_bias(l, bias)
            } else {
                l
            }
        };
        AlexNet {
            convs,
            bns,
            lrns,
            pools,
            head_pool: self.head_pool,
            fc6: (self.hidden > 0).then(|| linear(flat, self.hidden, 1.0)),
            fc7: (self.hidden > 0).then(|| linear(self.hidden, self.hidden, 1.0)),
            fc8: linear(
                if self.hidden > 0 { self.hidden } else { flat },
                self.num_classes,
                0.0,
            ),
            dropout: DropoutConfig::new(self.dropout).init(),
            precision: Precision::Fp32,
        }
    }
}

impl AlexNet {
    /// Runs the convolutional part, calling `tap` with `conv1`.. and `pool1`..
    pub fn features(&self, mut x: Tensor<4>, tap: &mut crate::layers::Tap) -> Tensor<4> {
        let mut p = 0;
        for i in 0..self.convs.len() {
            x = crate::layers::conv_bn_relu(
                &self.convs[i],
                self.bns[i].as_ref(),
                x,
                self.precision,
            );
            if let Some(lrn) = &self.lrns[i] {
                x = lrn.forward(x);
            }
            x = tap(format!("conv{}", i + 1), x);
            if let Some(pool) = &self.pools[i] {
                x = pool.forward(x);
                p += 1;
                x = tap(format!("pool{p}"), x);
            }
        }
        x
    }

    /// # Shapes
    /// `[B, C, h, w]` -> `[B, K]`.
    pub fn forward_head(&self, f: Tensor<4>) -> Tensor<2> {
        let p = self.head_pool;
        let x = adaptive_avg_pool2d(f, [p, p]);
        let [b, c, _, _] = x.dims();
        let x = x.reshape([b, c * p * p]);
        match (&self.fc6, &self.fc7) {
            (Some(fc6), Some(fc7)) => {
                let x = relu(layers::linear(fc6, self.dropout.forward(x)));
                let x = relu(layers::linear(fc7, self.dropout.forward(x)));
                layers::linear(&self.fc8, x)
            }
            _ => layers::linear(&self.fc8, self.dropout.forward(x)),
        }
    }

    /// The ONNX nodes of `features` + `forward_head` on an input whose feature map is `hw`.
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str) -> String {
        let mut x = x.to_string();
        for i in 0..self.convs.len() {
            x = g.conv(&self.convs[i], &x, &format!("convs.{i}"));
            if let Some(bn) = &self.bns[i] {
                x = g.batch_norm(bn, &x, &format!("bns.{i}"));
            }
            x = g.relu(&x);
            if self.lrns[i].is_some() {
                x = g.lrn(&crate::layers::paper_lrn(), &x);
            }
            if let Some(pool) = &self.pools[i] {
                x = pool.onnx(g, &x);
            }
        }
        let x = g.adaptive_avg_pool_flat(&x, self.head_pool);
        match (&self.fc6, &self.fc7) {
            (Some(fc6), Some(fc7)) => {
                let x = g.linear(fc6, &x, "fc6");
                let x = g.relu(&x);
                let x = g.linear(fc7, &x, "fc7");
                let x = g.relu(&x);
                g.linear(&self.fc8, &x, "fc8")
            }
            _ => g.linear(&self.fc8, &x, "fc8"),
        }
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

/// torchvision's `alexnet`.
pub fn alexnet(num_classes: usize) -> AlexNetConfig {
    AlexNetConfig::new(
        vec![
            [64, 11, 4, 2, 1],
            [192, 5, 1, 2, 1],
            [384, 3, 1, 1, 1],
            [256, 3, 1, 1, 1],
            [256, 3, 1, 1, 1],
        ],
        vec![0, 1, 4],
        vec![],
        num_classes,
    )
}

/// The paper's two-tower AlexNet as one grouped network.
pub fn alexnet_paper(num_classes: usize) -> AlexNetConfig {
    AlexNetConfig::new(
        vec![
            [96, 11, 4, 2, 1],
            [256, 5, 1, 2, 2],
            [384, 3, 1, 1, 1],
            [384, 3, 1, 1, 2],
            [256, 3, 1, 1, 2],
        ],
        vec![0, 1, 4],
        vec![0, 1],
        num_classes,
    )
    .with_paper_init(true)
}

/// AlexNet scaled for 28-32 px input (see the module documentation).
pub fn alexnet_small(num_classes: usize) -> AlexNetConfig {
    AlexNetConfig::new(
        vec![
            [64, 5, 2, 2, 1],
            [128, 5, 1, 2, 1],
            [192, 3, 1, 1, 1],
            [192, 3, 1, 1, 1],
            [128, 3, 1, 1, 1],
        ],
        vec![0, 1, 4],
        vec![0, 1],
        num_classes,
    )
    .with_pool_pad(1)
    .with_hidden(512)
    .with_head_pool(2)
}

/// The recipe options this family (and ZFNet, which shares its module) takes: the conv stack's
/// shape (`hidden`, `conv_widths`, `remove_convs`), pooling, batch norm, LRN, dropout and the
/// paper's initialisation.
pub(super) const OPTIONS: Options = Options {
    alexnet_shape: true,
    pooling: true,
    lrn: true,
    paper_init: true,
    ..Options::NONE
};

/// The registered AlexNet and ZFNet variants.
pub(super) fn variant(name: ModelName, num_classes: usize) -> AlexNetConfig {
    match name {
        ModelName::AlexnetPaper => alexnet_paper(num_classes),
        ModelName::AlexnetSmall => alexnet_small(num_classes),
        ModelName::Zfnet => super::zfnet::zfnet(num_classes),
        ModelName::ZfnetSmall => super::zfnet::zfnet_small(num_classes),
        _ => alexnet(num_classes),
    }
}

impl AlexNetConfig {
    /// The configuration of a registered variant with the recipe's options applied.
    pub(super) fn from_options(o: &ModelConfig) -> Self {
        let k = o.num_classes;
        let mut c = variant(o.name, k);
        c.in_channels = o.in_channels;
        c.pool = o.pool;
        if let Some(h) = o.hidden {
            c.hidden = h;
        }
        (c.convs, c.pool_after, c.lrn_after) = layers(o).expect("validated before building");
        match o.init {
            Some(Init::Paper) if o.name.family() == Family::AlexNet => c.paper_init = true,
            Some(_) => c.paper_init = false,
            None => {}
        }
        if let Some(overlapping) = o.overlapping_pool {
            c.overlapping = overlapping;
        }
        if let Some(d) = o.dropout {
            c.dropout = d;
        }
        if let Some(bn) = o.batch_norm {
            c.batch_norm = bn;
        }
        match o.lrn {
            Some(false) => c.lrn_after.clear(),
            Some(true) if c.lrn_after.is_empty() => c.lrn_after = vec![0, 1],
            _ => {}
        }
        c
    }
}

/// AlexNet/ZFNet conv stack after `conv_widths` and `remove_convs`: (convs, pool_after,
/// lrn_after), or the offending key and why.
#[allow(clippy::type_complexity)]
pub(super) fn layers(
    o: &ModelConfig,
) -> std::result::Result<(Vec<[usize; 5]>, Vec<usize>, Vec<usize>), (&'static str, String)> {
    let k = o.num_classes;
    let base = variant(o.name, k);
    let mut convs = base.convs.clone();
    let n = convs.len();
    if let Some(w) = &o.conv_widths {
        if w.len() != n || w.contains(&0) {
            return Err((
                "conv_widths",
                format!("{} has {n} convs; give {n} widths > 0", o.name),
            ));
        }
        for (c, &w) in convs.iter_mut().zip(w) {
            if !w.is_multiple_of(c[4]) {
                return Err((
                    "conv_widths",
                    format!("{w} is not divisible by the conv's groups"),
                ));
            }
            c[0] = w;
        }
    }
    let remove = o.remove_convs.clone().unwrap_or_default();
    if let Some(&bad) = remove.iter().find(|&&i| i < 2 || i > n) {
        return Err((
            "remove_convs",
            format!("conv{bad} cannot be removed (conv2..conv{n} can)"),
        ));
    }
    let (mut kept, mut pools, mut lrns) = (Vec::new(), Vec::new(), Vec::new());
    for (i, c) in convs.into_iter().enumerate() {
        let pooled = base.pool_after.contains(&i);
        if remove.contains(&(i + 1)) {
            // Keep the resolution schedule: the pool moves to the previous kept conv.
            if pooled && !pools.contains(&(kept.len() - 1)) {
                pools.push(kept.len() - 1);
            }
            continue;
        }
        if pooled {
            pools.push(kept.len());
        }
        if base.lrn_after.contains(&i) {
            lrns.push(kept.len());
        }
        kept.push(c);
    }
    // A conv's groups must divide its (possibly new) input width.
    let mut cin = o.in_channels.max(1);
    for c in &kept {
        if !cin.is_multiple_of(c[4]) {
            return Err((
                "remove_convs",
                format!("a grouped conv would get {cin} input channels"),
            ));
        }
        cin = c[0];
    }
    Ok((kept, pools, lrns))
}
