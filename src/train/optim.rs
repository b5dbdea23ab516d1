//! The optimisers, written out so that their state can be saved for an exact resume and so they
//! match PyTorch's `torch.optim.SGD` (dampening 0; Burn's defaults to 0.1) and
//! `torch.optim.AdamW`.
//!
//! Per parameter `w` with gradient `g`, learning rate `lr`, momentum `mu`, decay `wd`:
//! ```text
//! g   = g + wd * w                    (skipped for biases and BN when no_bias_decay)
//! buf = g                (first step)  or  mu * buf + g
//! d   = g + mu * buf     (Nesterov)    or  buf
//! w   = w - lr * d
//! ```
//!
//! AdamW (Loshchilov & Hutter 2019), step `t` from 1:
//! ```text
//! w   = w - lr * wd * w               (decoupled; skipped as above)
//! m   = b1 * m + (1 - b1) * g,   v = b2 * v + (1 - b2) * g^2
//! w   = w - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
//! ```
//!
//! Each parameter's update is one pass in place ([`crate::kernels::sgd_step`],
//! [`crate::kernels::adamw_step`]): as tensor operations the temporaries held vgg16's peak
//! memory 166 MB (SGD) and 539 MB (AdamW) higher at batch 8 (BENCHMARKS.md).

use std::collections::BTreeMap;

use burn::module::{Param, ParamId};
use burn::optim::GradientsParams;
use burn::prelude::*;

use crate::kernels::update::{AdamwStep, SgdStep};
use crate::kernels::{adamw_step, sgd_step};
use crate::params::{
    self, DeviceMap, DeviceTensor, HostTensor, Role, Site, TensorMap, TensorMapper, TensorVisitor,
};
use serde::{Deserialize, Serialize};

/// Optimiser kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimKind {
    /// SGD with (Nesterov) momentum; L2 weight decay added to the gradient.
    Sgd,
    /// Adam with decoupled weight decay (Loshchilov & Hutter 2019).
    Adamw,
}

/// `[optim]`: SGD with momentum, or AdamW.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub kind: OptimKind,
    /// Learning rate at `base_batch_size`; the run uses `lr * batch_size / base_batch_size`
    /// (linear scaling, Goyal et al. 2017).
    pub lr: f64,
    pub base_batch_size: usize,
    /// Momentum coefficient (dampening 0, as PyTorch).
    pub momentum: f64,
    /// Nesterov momentum (Sutskever et al. 2013).
    pub nesterov: bool,
    /// L2 penalty coefficient.
    pub weight_decay: f64,
    /// No decay on biases and batch-norm parameters ("Bag of Tricks", He et al. 2019).
    pub no_bias_decay: bool,
    /// AdamW's moment decay rates and denominator epsilon.
    pub betas: [f64; 2],
    pub eps: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            kind: OptimKind::Sgd,
            betas: [0.9, 0.999],
            eps: 1e-8,
            lr: 0.2,
            base_batch_size: 256,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
            no_bias_decay: false,
        }
    }
}

impl OptimConfig {
    /// The peak learning rate after linear scaling.
    pub fn scaled_lr(&self, batch_size: usize) -> f64 {
        self.lr * batch_size as f64 / self.base_batch_size.max(1) as f64
    }

    /// The buffers [`Optimizer`] keeps per parameter once it has stepped (what a checkpoint's
    /// `optim` group holds): AdamW's two moments, SGD's momentum unless it is 0.
    pub fn buffers_per_param(&self) -> u64 {
        match self.kind {
            OptimKind::Adamw => 2,
            OptimKind::Sgd => u64::from(self.momentum != 0.0),
        }
    }
}

/// Optimiser state: buffers per parameter, keyed by module path (SGD: the momentum buffer;
/// AdamW: `m.<path>` and `v.<path>`), and the step count.
pub struct Optimizer {
    pub config: OptimConfig,
    buffers: BTreeMap<String, Tensor<1>>,
    steps: u64,
    /// Discriminative learning rates: every parameter not in `head` steps at `lr * mult`.
    backbone: Option<(f64, std::collections::BTreeSet<String>)>,
}

impl Optimizer {
    pub fn new(config: OptimConfig) -> Self {
        Optimizer {
            config,
            buffers: BTreeMap::new(),
            steps: 0,
            backbone: None,
        }
    }

    /// Parameters outside `head` (module paths) take `mult` times the learning rate.
    pub fn with_backbone_lr(mut self, mult: f64, head: std::collections::BTreeSet<String>) -> Self {
        self.backbone = (mult != 1.0).then_some((mult, head));
        self
    }

    /// Whether a tensor of this role is decayed: with `no_bias_decay`, only conv and linear
    /// weights are (biases and normalisation scales/shifts are not).
    pub fn decays(&self, role: Role) -> bool {
        self.config.weight_decay > 0.0 && (role.is_weight() || !self.config.no_bias_decay)
    }

    /// One update of every parameter that has a gradient. With `clip_norm > 0` the gradients
    /// are first scaled so their global L2 norm is at most `clip_norm` (Pascanu et al. 2013).
    /// Returns the module and the gradient norm before clipping (0 when not computed).
    pub fn step<M: Module>(
        &mut self,
        lr: f64,
        module: M,
        grads: GradientsParams,
        clip_norm: f64,
    ) -> (M, f64) {
        let (scale, norm) = if clip_norm > 0.0 {
            let norm = grad_norm(&module, &grads);
            ((clip_norm / (norm + 1e-6)).min(1.0), norm)
        } else {
            (1.0, 0.0)
        };
        self.steps += 1;
        let mut m = SgdMapper {
            sgd: self,
            grads,
            lr,
            scale,
        };
        (params::map(module, &mut m), norm)
    }

    /// A checkpoint's `optim` group: the buffers (flat), left on the device, and the step
    /// count on the host.
    pub fn device_state(&self) -> (DeviceMap, TensorMap) {
        let buffers = self
            .buffers
            .iter()
            .map(|(k, t)| (k.clone(), DeviceTensor::new(t.clone())))
            .collect();
        let steps = HostTensor {
            shape: vec![1],
            data: vec![self.steps as f32],
        };
        (buffers, TensorMap::from([("#steps".to_string(), steps)]))
    }

    /// [`Optimizer::device_state`] on the host.
    pub fn state(&self) -> TensorMap {
        let (buffers, mut m) = self.device_state();
        m.extend(buffers.iter().map(|(k, d)| (k.clone(), d.to_host())));
        m
    }

    /// Restores what [`Self::state`] saved, moving the values. `shapes` are the model's
    /// tensors by path: a buffer for a tensor the model lacks, or of another size, is refused
    /// by key here rather than failing inside a later step.
    pub fn load_state(
        &mut self,
        mut state: TensorMap,
        shapes: &BTreeMap<String, Vec<usize>>,
        device: &Device,
    ) -> std::result::Result<(), String> {
        self.steps = match state.remove("#steps").map(|h| h.data) {
            None => 0,
            Some(v) if v.len() == 1 && v[0] >= 0.0 && v[0].is_finite() => v[0] as u64,
            Some(v) => {
                return Err(format!(
                    "optimiser `#steps` holds {} values ({:?}...), not one count",
                    v.len(),
                    &v[..v.len().min(2)]
                ));
            }
        };
        let mut buffers = BTreeMap::new();
        for (k, h) in state {
            // SGD keys its momentum by path; AdamW its moments by `m.` and `v.` + path.
            let param = if shapes.contains_key(&k) {
                k.as_str()
            } else {
                k.strip_prefix("m.")
                    .or_else(|| k.strip_prefix("v."))
                    .unwrap_or(&k)
            };
            let want = shapes.get(param).map(|s| s.iter().product::<usize>());
            if want != Some(h.data.len()) {
                return Err(match want {
                    Some(n) => format!(
                        "optimiser buffer `{k}` has {} values, the model's `{param}` {n}",
                        h.data.len()
                    ),
                    None => format!("optimiser buffer `{k}` is for no tensor of the model"),
                });
            }
            let n = h.data.len();
            buffers.insert(k, Tensor::from_data(TensorData::new(h.data, [n]), device));
        }
        self.buffers = buffers;
        Ok(())
    }
}

/// Global L2 norm of all gradients of `module`'s parameters.
pub fn grad_norm<M: Module>(module: &M, grads: &GradientsParams) -> f64 {
    struct Norm<'a> {
        grads: &'a GradientsParams,
        sum: Option<Tensor<1>>,
    }
    impl TensorVisitor for Norm<'_> {
        fn tensor<const D: usize>(&mut self, _: &Site, p: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(p.id) {
                let s = g.square().sum();
                self.sum = Some(match self.sum.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    let mut n = Norm { grads, sum: None };
    params::visit(module, &mut n);
    n.sum
        .map_or(0.0, |s| (s.into_scalar::<f32>() as f64).sqrt())
}

struct SgdMapper<'a> {
    sgd: &'a mut Optimizer,
    grads: GradientsParams,
    lr: f64,
    /// Gradient multiplier from clipping.
    scale: f64,
}

impl TensorMapper for SgdMapper<'_> {
    fn tensor<const D: usize>(&mut self, site: &Site, id: ParamId, tensor: Tensor<D>) -> Tensor<D> {
        let Some(grad) = self.grads.remove::<D>(id) else {
            return tensor;
        };
        let key = site.path();
        let decays = self.sgd.decays(site.role());
        let dims = tensor.dims();
        let n: usize = dims.iter().product();
        let w = tensor.inner().reshape([n]);
        let mut g = grad.reshape([n]);
        if self.scale != 1.0 {
            g = g * self.scale;
        }
        let lr = match &self.sgd.backbone {
            Some((mult, head)) if !head.contains(&key) => self.lr * mult,
            _ => self.lr,
        };
        let cfg = &self.sgd.config;
        if cfg.kind == OptimKind::Adamw {
            let wd = if decays { cfg.weight_decay } else { 0.0 };
            let h = AdamwStep::at_step(lr, wd, cfg.betas, cfg.eps, self.sgd.steps as i32);
            let (mk, vk) = (format!("m.{key}"), format!("v.{key}"));
            let moments = match (self.sgd.buffers.remove(&mk), self.sgd.buffers.remove(&vk)) {
                (Some(m), Some(v)) => Some((m, v)),
                _ => None,
            };
            let (w, m, v) = adamw_step(w, g, moments, h);
            self.sgd.buffers.insert(mk, m);
            self.sgd.buffers.insert(vk, v);
            return Tensor::from_inner(w.reshape(dims));
        }
        let h = SgdStep {
            lr: lr as f32,
            weight_decay: if decays { cfg.weight_decay as f32 } else { 0.0 },
            momentum: cfg.momentum as f32,
            nesterov: cfg.nesterov,
        };
        let (w, buf) = sgd_step(w, g, self.sgd.buffers.remove(&key), h);
        if let Some(buf) = buf {
            self.sgd.buffers.insert(key, buf);
        }
        Tensor::from_inner(w.reshape(dims))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;

    #[test]
    fn no_bias_decay_skips_biases_and_batch_norm() {
        let mut sgd = Optimizer::new(OptimConfig {
            no_bias_decay: true,
            ..OptimConfig::default()
        });
        assert!(sgd.decays(Role::LinearWeight) && sgd.decays(Role::ConvWeight));
        assert!(!sgd.decays(Role::ConvBias) && !sgd.decays(Role::NormScale));
        sgd.config.no_bias_decay = false;
        assert!(sgd.decays(Role::ConvBias));
    }

    #[test]
    fn sgd_nesterov_matches_pytorch_formula() {
        // One weight w = 1 with gradient g = 2 each step, lr 0.1, momentum 0.9, wd 0.5, Nesterov:
        // step 1: g' = 2 + 0.5 = 2.5, buf = 2.5, d = 2.5 + 0.9 * 2.5 = 4.75, w = 1 - 0.475 = 0.525
        // step 2: g' = 2 + 0.2625 = 2.2625, buf = 2.25 + 2.2625 = 4.5125,
        //         d = 2.2625 + 4.06125 = 6.32375, w = 0.525 - 0.632375 = -0.107375
        let device = Device::flex().autodiff();
        let mut fc = LinearConfig::new(1, 1).with_bias(false).init(&device);
        fc.weight = fc.weight.map(|t| (t.zeros_like() + 1.0).require_grad());
        let mut sgd = Optimizer::new(OptimConfig {
            weight_decay: 0.5,
            ..OptimConfig::default()
        });
        for want in [0.525f32, -0.107375] {
            let x = Tensor::<2>::from_data([[2.0f32]], &device);
            let loss = fc.forward(x).sum(); // d loss / d w = 2
            let grads = GradientsParams::from_grads(loss.backward(), &fc);
            fc = sgd.step(0.1, fc, grads, 0.0).0;
            let w = fc.weight.val().into_scalar::<f32>();
            assert!((w - want).abs() < 1e-5, "{w} vs {want}");
        }
    }

    #[test]
    fn weight_decay_reaches_exactly_conv_and_linear_weights() {
        // Zero gradients, no momentum: a step changes exactly the decayed tensors (w -= lr*wd*w).
        use crate::checkpoint::module_tensors;
        use crate::models::{ModelConfig, ModelName};
        let device = Device::flex().autodiff();
        let model = ModelConfig::for_model(ModelName::ConvnetSmall, 10, 1)
            .build(&device)
            .unwrap();
        let before = module_tensors(&model);
        let x = Tensor::<4>::ones([2, 1, 28, 28], &device);
        let loss = model.forward(x).sum() * 0.0;
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let mut opt = Optimizer::new(OptimConfig {
            momentum: 0.0,
            weight_decay: 0.1,
            no_bias_decay: true,
            ..OptimConfig::default()
        });
        let after = module_tensors(&opt.step(1.0, model, grads, 0.0).0);
        let changed: Vec<&String> = before.keys().filter(|k| before[*k] != after[*k]).collect();
        assert!(!changed.is_empty());
        for k in before.keys() {
            let decayed = k.ends_with("conv.weight") || k.ends_with("fc.weight");
            assert_eq!(changed.contains(&k), decayed, "{k}");
        }
    }

    #[test]
    fn adamw_matches_the_formula() {
        // w = 1, g = 2 each step, lr 0.1, wd 0.5, betas (0.9, 0.999), eps 1e-8:
        // step 1: w = 1 - 0.05 = 0.95; m = 0.2, v = 0.004; mhat = 2, vhat = 4; w -= 0.1 * 1
        //   -> 0.85. step 2: w = 0.85 - 0.0425 = 0.8075; m = 0.38, v = 0.007996;
        //   mhat = 2, vhat = 4 -> w = 0.7075.
        let device = Device::flex().autodiff();
        let mut fc = LinearConfig::new(1, 1).with_bias(false).init(&device);
        fc.weight = fc.weight.map(|t| (t.zeros_like() + 1.0).require_grad());
        let mut opt = Optimizer::new(OptimConfig {
            kind: OptimKind::Adamw,
            weight_decay: 0.5,
            ..OptimConfig::default()
        });
        for want in [0.85f32, 0.7075] {
            let x = Tensor::<2>::from_data([[2.0f32]], &device);
            let grads = GradientsParams::from_grads(fc.forward(x).sum().backward(), &fc);
            fc = opt.step(0.1, fc, grads, 0.0).0;
            let w = fc.weight.val().into_scalar::<f32>();
            assert!((w - want).abs() < 1e-5, "{w} vs {want}");
        }
        assert_eq!(opt.state()["#steps"].data, vec![2.0]);
        // The moments reload into a model of the same shapes, and are refused, by key, for
        // one of other shapes (they would fail inside the next step).
        let state = opt.state();
        let mut back = Optimizer::new(opt.config.clone());
        back.load_state(state.clone(), &params::module_shapes(&fc), &device)
            .unwrap();
        assert_eq!(back.state(), state);
        let wide = LinearConfig::new(2, 1).with_bias(false).init(&device);
        let e = back
            .load_state(state.clone(), &params::module_shapes(&wide), &device)
            .unwrap_err();
        assert!(
            e.contains("`m.weight` has 1 values") && e.contains("2"),
            "{e}"
        );
        let e = back
            .load_state(state, &BTreeMap::new(), &device)
            .unwrap_err();
        assert!(e.contains("is for no tensor"), "{e}");
        let mut damaged = opt.state();
        damaged.get_mut("#steps").unwrap().data.clear();
        let e = back
            .load_state(damaged, &params::module_shapes(&fc), &device)
            .unwrap_err();
        assert!(e.contains("`#steps` holds 0 values"), "{e}");
    }

    #[test]
    fn clipping_caps_the_global_norm() {
        let device = Device::flex().autodiff();
        let mut fc = LinearConfig::new(2, 1).with_bias(false).init(&device);
        fc.weight = fc.weight.map(|t| t.zeros_like().require_grad());
        let mut sgd = Optimizer::new(OptimConfig {
            momentum: 0.0,
            weight_decay: 0.0,
            ..OptimConfig::default()
        });
        // Gradient (3, 4): norm 5; clipped to 1 -> (0.6, 0.8); lr 1 -> w = (-0.6, -0.8).
        let x = Tensor::<2>::from_data([[3.0f32, 4.0]], &device);
        let grads = GradientsParams::from_grads(fc.forward(x).sum().backward(), &fc);
        let (fc, norm) = sgd.step(1.0, fc, grads, 1.0);
        assert!((norm - 5.0).abs() < 1e-5);
        let w: Vec<f32> = fc
            .weight
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap();
        assert!(
            (w[0] + 0.6).abs() < 1e-5 && (w[1] + 0.8).abs() < 1e-5,
            "{w:?}"
        );
    }
}
