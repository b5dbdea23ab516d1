//! Weight initialisation schemes, applied to a built model by layer shape.
//!
//! - `xavier` (Glorot & Bengio 2010): `U(-a, a)`, `a = sqrt(6 / (fan_in + fan_out))`.
//! - `kaiming` (He et al. 2015, "Delving Deep into Rectifiers"): `N(0, 2 / fan)` with
//!   `fan = fan_out` for convolutions (torchvision's ResNet and VGG) and `fan_in` for linear
//!   layers.
//! - `paper`: the model's paper: AlexNet `N(0, 0.01)` with unit biases in conv2, conv4, conv5
//!   and the hidden FC layers; ZFNet and VGG `N(0, 0.01)` with zero biases; ResNet = kaiming.
//! - `default`: Burn's (and PyTorch's) layer default, `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`.
//!
//! Every scheme but `default` sets conv and linear biases to zero (AlexNet's paper rule aside);
//! batch-norm scales and shifts keep 1 and 0 (or the zero-gamma setting).
//!
//! Conv weights are `[out, in / groups, k, k]`: `fan_in = in / groups * k * k`,
//! `fan_out = out * k * k`. Burn's linear weights are `[in, out]`.

use burn::module::ParamId;
use burn::prelude::*;
use burn::tensor::Distribution;
use serde::{Deserialize, Serialize};

use crate::params::{self, Role, Site, TensorMapper};

/// An initialisation scheme (`model.init` in the recipe).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Init {
    Default,
    Xavier,
    Kaiming,
    Paper,
}

/// What to draw for each kind of tensor.
#[derive(Clone, Copy, Debug)]
pub enum Scheme {
    Xavier,
    Kaiming,
    /// `N(0, std)` weights, zero biases.
    Gaussian(f64),
}

struct Reinit {
    scheme: Scheme,
}

impl TensorMapper for Reinit {
    fn tensor<const D: usize>(&mut self, site: &Site, _: ParamId, t: Tensor<D>) -> Tensor<D> {
        let dims = t.dims();
        let device = t.device();
        match site.role() {
            role @ (Role::ConvWeight | Role::LinearWeight) => {
                let (fan_in, fan_out) = if role == Role::ConvWeight {
                    let rf = dims[2] * dims[3];
                    (dims[1] * rf, dims[0] * rf)
                } else {
                    (dims[0], dims[1])
                };
                let dist = match self.scheme {
                    Scheme::Xavier => {
                        let a = (6.0 / (fan_in + fan_out) as f64).sqrt();
                        Distribution::Uniform(-a, a)
                    }
                    Scheme::Kaiming => {
                        let fan = if role == Role::ConvWeight {
                            fan_out
                        } else {
                            fan_in
                        };
                        Distribution::Normal(0.0, (2.0 / fan as f64).sqrt())
                    }
                    Scheme::Gaussian(std) => Distribution::Normal(0.0, std),
                };
                Tensor::<D>::random(dims, dist, &device)
            }
            Role::ConvBias | Role::LinearBias => t.zeros_like(),
            _ => t,
        }
    }
}

/// Re-draws every conv and linear weight of `module` with `scheme` and zeroes their biases.
pub fn apply<M: Module>(module: M, scheme: Scheme) -> M {
    params::map(module, &mut Reinit { scheme })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::conv::Conv2dConfig;

    fn stats(v: &[f32]) -> (f64, f64, f32) {
        let n = v.len() as f64;
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let s = (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / n).sqrt();
        (m, s, v.iter().fold(0f32, |a, &x| a.max(x.abs())))
    }

    #[test]
    fn xavier_and_kaiming_match_their_formulas() {
        let device = Device::flex();
        device.seed(3);
        // 64 -> 128 channels, 3x3: fan_in 576, fan_out 1152.
        let conv = Conv2dConfig::new([64, 128], [3, 3]).init(&device);
        let x = apply(conv.clone(), Scheme::Xavier);
        let w: Vec<f32> = x
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap();
        let a = (6.0f64 / (576.0 + 1152.0)).sqrt();
        let (m, s, max) = stats(&w);
        assert!(
            m.abs() < 2e-3 && (s - a / 3f64.sqrt()).abs() < 2e-3 && max as f64 <= a,
            "{m} {s} {max}"
        );
        let b: Vec<f32> = x
            .bias
            .unwrap()
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap();
        assert!(b.iter().all(|&v| v == 0.0));
        let k = apply(conv, Scheme::Kaiming);
        let w: Vec<f32> = k
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap();
        let (_, s, _) = stats(&w);
        assert!((s - (2.0f64 / 1152.0).sqrt()).abs() < 2e-3, "{s}");
    }
}
