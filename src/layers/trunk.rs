//! A plain convolutional trunk described in VGG's notation: conv layers and pools in sequence.

use burn::nn::LocalResponseNorm;
use burn::prelude::*;

use super::{ConvBnAct, Pool, PoolKind};

/// One element of a layer plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// A 3x3 convolution (padding 1) to this many channels.
    Conv(usize),
    /// A `k x k` convolution (odd `k`, padding `k / 2`) to this many channels: `Nk1` is VGG
    /// configuration C's 1x1, `Nk5` / `Nk7` the single large kernels VGG argues against.
    ConvK(usize, usize),
    /// A pooling stage that halves the resolution.
    Pool,
}

/// Parses plans such as `"64,M,128,M,256,256k1"` (VGG's notation: numbers are 3x3 conv
/// widths, `NkK` a K x K conv with odd K, `M` a pool).
pub fn parse_plan(s: &str) -> Result<Vec<Plan>, String> {
    s.split(',')
        .map(str::trim)
        .map(|t| {
            if t == "M" || t == "m" {
                return Ok(Plan::Pool);
            }
            let bad = || format!("`{t}` is neither a channel count (N, or NkK with odd K) nor M");
            match t.split_once('k') {
                Some((n, k)) => match (n.parse::<usize>(), k.parse::<usize>()) {
                    (Ok(n), Ok(k)) if n > 0 && k % 2 == 1 => Ok(Plan::ConvK(n, k)),
                    _ => Err(bad()),
                },
                None => match t.parse::<usize>() {
                    Ok(n) if n > 0 => Ok(Plan::Conv(n)),
                    _ => Err(bad()),
                },
            }
        })
        .collect()
}

/// How to build a [`Trunk`].
#[derive(Clone, Debug)]
pub struct TrunkSpec {
    pub plan: Vec<Plan>,
    pub in_channels: usize,
    pub batch_norm: bool,
    /// Conv bias even under batch norm (torchvision's VGG-BN keeps it).
    pub conv_bias: bool,
    pub pool: PoolKind,
    /// 2 = plain 2x2/2 pooling, 3 = overlapping 3x3/2 (padded by 1 so sizes still halve).
    pub pool_kernel: usize,
    /// Local response normalisation after the first conv (VGG A-LRN).
    pub lrn: bool,
}

/// Convs and pools in plan order.
///
/// # Shapes
/// `[B, C_in, H, W]` -> `[B, C_last, H / 2^p, W / 2^p]` for `p` pools.
#[derive(Module, Debug)]
pub struct Trunk {
    pub convs: Vec<ConvBnAct>,
    pub pools: Vec<Pool>,
    /// For each conv, how many pools follow it directly.
    pub pools_after: Vec<usize>,
    pub lrn: Option<LocalResponseNorm>,
    pub out_channels: usize,
}

impl TrunkSpec {
    pub fn init(&self, device: &Device) -> Trunk {
        let mut convs = Vec::new();
        let mut pools = Vec::new();
        let mut pools_after = Vec::new();
        let mut c = self.in_channels;
        for p in &self.plan {
            let (w, k) = match *p {
                Plan::Conv(w) => (w, 3),
                Plan::ConvK(w, k) => (w, k),
                Plan::Pool => {
                    let pad = (self.pool_kernel - 1) / 2;
                    pools.push(Pool::new(self.pool, self.pool_kernel, 2, pad));
                    if let Some(last) = pools_after.last_mut() {
                        *last += 1;
                    }
                    continue;
                }
            };
            convs.push(ConvBnAct::with_bias(
                c,
                w,
                k,
                1,
                k / 2,
                self.batch_norm,
                self.conv_bias || !self.batch_norm,
                device,
            ));
            pools_after.push(0);
            c = w;
        }
        Trunk {
            convs,
            pools,
            pools_after,
            // Krizhevsky et al. 2012: k = 2, n = 5, alpha = 1e-4, beta = 0.75.
            lrn: self.lrn.then(|| crate::layers::paper_lrn().init()),
            out_channels: c,
        }
    }

    /// Channels of the last conv (what the trunk outputs), without building it.
    pub fn out_channels(&self) -> usize {
        self.plan
            .iter()
            .rev()
            .find_map(|p| match *p {
                Plan::Conv(w) | Plan::ConvK(w, _) => Some(w),
                Plan::Pool => None,
            })
            .unwrap_or(self.in_channels)
    }
}

impl Trunk {
    /// Runs the trunk, calling `tap` with each named map (`conv1`, ..., `pool1`, ...), the
    /// convolutions' products in `precision`.
    pub fn forward(
        &self,
        mut x: Tensor<4>,
        tap: &mut crate::layers::Tap,
        precision: crate::layers::Precision,
    ) -> Tensor<4> {
        let mut pool_i = 0;
        for (i, conv) in self.convs.iter().enumerate() {
            x = conv.forward(x, precision);
            if i == 0
                && let Some(lrn) = &self.lrn
            {
                x = lrn.forward(x);
            }
            x = tap(format!("conv{}", i + 1), x);
            for _ in 0..self.pools_after[i] {
                x = self.pools[pool_i].forward(x);
                pool_i += 1;
                x = tap(format!("pool{pool_i}"), x);
            }
        }
        x
    }

    /// The ONNX nodes of [`Self::forward`]; weights are named `{prefix}.convs.i...`.
    pub fn onnx(&self, g: &mut crate::onnx::Graph, x: &str, prefix: &str) -> String {
        let mut x = x.to_string();
        let mut pool_i = 0;
        for (i, conv) in self.convs.iter().enumerate() {
            x = conv.onnx(g, &x, &format!("{prefix}.convs.{i}"));
            if i == 0 && self.lrn.is_some() {
                x = g.lrn(&crate::layers::paper_lrn(), &x);
            }
            for _ in 0..self.pools_after[i] {
                x = self.pools[pool_i].onnx(g, &x);
                pool_i += 1;
            }
        }
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_parsing() {
        assert_eq!(
            parse_plan("8, M,16,4k1,6k7").unwrap(),
            vec![
                Plan::Conv(8),
                Plan::Pool,
                Plan::Conv(16),
                Plan::ConvK(4, 1),
                Plan::ConvK(6, 7)
            ]
        );
        assert!(parse_plan("8,X").unwrap_err().contains("`X`"));
        assert!(parse_plan("8k4").is_err());
    }
}
