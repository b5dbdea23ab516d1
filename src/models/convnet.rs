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

use crate::layers::{ConvBnAct, Pool, PoolKind, global_avg_pool};

/// One element of a layer plan: a 3x3 convolution to this many channels, or a pooling stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    Conv(usize),
    Pool,
}

/// Parses `"32,32,M,64"`-style plans (VGG's notation: numbers are conv widths, `M` a pool).
pub fn parse_plan(s: &str) -> Result<Vec<Plan>, String> {
    s.split(',')
        .map(str::trim)
        .map(|t| match t {
            "M" | "m" => Ok(Plan::Pool),
            n => n
                .parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .map(Plan::Conv)
                .ok_or_else(|| format!("`{n}` is neither a channel count nor M")),
        })
        .collect()
}

/// Configuration of a [`ConvNet`].
#[derive(Config, Debug)]
pub struct ConvNetConfig {
    /// Layer plan in VGG notation, e.g. `"32,32,M,64,64,M,128,128"`.
    pub plan: String,
    pub num_classes: usize,
    #[config(default = 3)]
    pub in_channels: usize,
    #[config(default = true)]
    pub batch_norm: bool,
    #[config(default = "PoolKind::Max")]
    pub pool: PoolKind,
    /// Pooling window and stride: (2, 2) plain, (3, 2) overlapping.
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
    pub convs: Vec<ConvBnAct>,
    pub pools: Vec<Pool>,
    /// For each conv, how many pools come right after it.
    pub pools_after: Vec<usize>,
    pub dropout: Dropout,
    pub fc: Linear,
}

impl ConvNetConfig {
    pub fn init(&self, device: &Device) -> ConvNet {
        let plan = parse_plan(&self.plan).expect("plan validated by the registry");
        let mut convs = Vec::new();
        let mut pools = Vec::new();
        let mut pools_after = Vec::new();
        let mut c = self.in_channels;
        for p in plan {
            match p {
                Plan::Conv(w) => {
                    convs.push(ConvBnAct::new(c, w, 3, 1, 1, self.batch_norm, device));
                    pools_after.push(0);
                    c = w;
                }
                Plan::Pool => {
                    // Overlapping pooling pads by one so 3/2 halves the size like 2/2 does.
                    let pad = (self.pool_kernel - 1) / 2;
                    pools.push(Pool::new(self.pool, self.pool_kernel, 2, pad));
                    if let Some(last) = pools_after.last_mut() {
                        *last += 1;
                    }
                }
            }
        }
        ConvNet {
            convs,
            pools,
            pools_after,
            dropout: DropoutConfig::new(self.dropout).init(),
            fc: LinearConfig::new(c, self.num_classes).init(device),
        }
    }
}

impl ConvNet {
    /// Runs the convolutional trunk, calling `tap` with each named intermediate map
    /// (`conv1`, `conv2`, ..., `pool1`, ...).
    pub fn trunk(&self, mut x: Tensor<4>, tap: &mut dyn FnMut(String, &Tensor<4>)) -> Tensor<4> {
        let mut pool_i = 0;
        for (i, conv) in self.convs.iter().enumerate() {
            x = conv.forward(x);
            tap(format!("conv{}", i + 1), &x);
            for _ in 0..self.pools_after[i] {
                x = self.pools[pool_i].forward(x);
                pool_i += 1;
                tap(format!("pool{pool_i}"), &x);
            }
        }
        x
    }

    /// # Shapes
    /// `[B, C_last, h, w]` -> `[B, K]`.
    pub fn forward_head(&self, f: Tensor<4>) -> Tensor<2> {
        self.fc.forward(self.dropout.forward(global_avg_pool(f)))
    }

    pub fn num_classes(&self) -> usize {
        self.fc.weight.val().dims()[1]
    }

    /// Replaces the classifier with a fresh one of `n` outputs, keeping the trunk.
    pub fn with_classes(mut self, n: usize, device: &Device) -> Self {
        let d = self.fc.weight.val().dims()[0];
        self.fc = LinearConfig::new(d, n).init(device);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_parsing() {
        assert_eq!(
            parse_plan("8, M,16").unwrap(),
            vec![Plan::Conv(8), Plan::Pool, Plan::Conv(16)]
        );
        assert!(parse_plan("8,X").unwrap_err().contains("`X`"));
    }
}
