//! Stochastic gradient descent with momentum, written out so that its state can be saved for an
//! exact resume and so it matches PyTorch's `torch.optim.SGD` (dampening 0; Burn's defaults to
//! 0.1).
//!
//! Per parameter `w` with gradient `g`, learning rate `lr`, momentum `mu`, decay `wd`:
//! ```text
//! g   = g + wd * w                    (skipped for biases and BN when no_bias_decay)
//! buf = g                (first step)  or  mu * buf + g
//! d   = g + mu * buf     (Nesterov)    or  buf
//! w   = w - lr * d
//! ```

use std::collections::BTreeMap;

use burn::module::{ModuleMapper, Param};
use burn::optim::GradientsParams;
use burn::prelude::*;

use super::checkpoint::{HostTensor, TensorMap};
use super::recipe::OptimConfig;

/// SGD state: one momentum buffer per parameter, keyed by module path.
pub struct Sgd {
    pub config: OptimConfig,
    buffers: BTreeMap<String, Tensor<1>>,
}

impl Sgd {
    pub fn new(config: OptimConfig) -> Self {
        Sgd {
            config,
            buffers: BTreeMap::new(),
        }
    }

    /// Whether the parameter at `path` with rank `rank` is decayed: with `no_bias_decay`, only
    /// conv and linear weights (rank >= 2) are.
    pub fn decays(&self, rank: usize) -> bool {
        self.config.weight_decay > 0.0 && !(self.config.no_bias_decay && rank < 2)
    }

    /// One update of every parameter that has a gradient.
    pub fn step<M: Module>(&mut self, lr: f64, module: M, grads: GradientsParams) -> M {
        let mut m = SgdMapper {
            sgd: self,
            grads,
            lr,
            path: Vec::new(),
        };
        module.map(&mut m)
    }

    /// Momentum buffers, for checkpoints.
    pub fn state(&self) -> TensorMap {
        self.buffers
            .iter()
            .map(|(k, t)| (k.clone(), HostTensor::from_tensor(t)))
            .collect()
    }

    /// Restores buffers saved by [`Self::state`].
    pub fn load_state(&mut self, state: &TensorMap, device: &Device) {
        self.buffers = state
            .iter()
            .map(|(k, h)| (k.clone(), h.to_tensor::<1>(device)))
            .collect();
    }
}

struct SgdMapper<'a> {
    sgd: &'a mut Sgd,
    grads: GradientsParams,
    lr: f64,
    path: Vec<String>,
}

impl ModuleMapper for SgdMapper<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove::<D>(id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let dims = tensor.dims();
        let n: usize = dims.iter().product();
        let require_grad = tensor.is_require_grad();
        let w = tensor.inner().reshape([n]);
        let mut g = grad.reshape([n]);
        let cfg = &self.sgd.config;
        if self.sgd.decays(D) {
            g = g + w.clone() * cfg.weight_decay;
        }
        let d = if cfg.momentum > 0.0 {
            let key = self.path.join(".");
            let buf = match self.sgd.buffers.remove(&key) {
                Some(b) => b * cfg.momentum + g.clone(),
                None => g.clone(),
            };
            let d = if cfg.nesterov {
                g + buf.clone() * cfg.momentum
            } else {
                buf.clone()
            };
            self.sgd.buffers.insert(key, buf);
            d
        } else {
            g
        };
        let mut w = Tensor::from_inner((w - d * self.lr).reshape(dims));
        if require_grad {
            w = w.require_grad();
        }
        Param::from_mapped_value(id, w, mapper)
    }
}
