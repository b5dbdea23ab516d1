//! Exponential moving average of the weights (Polyak averaging; as timm's `ModelEmaV2`):
//! after every optimiser step, `shadow = decay * shadow + (1 - decay) * w` for every float
//! tensor of the model, batch-norm running statistics included. With EMA on, validation and
//! the saved "best" checkpoint use the averaged weights.

use std::collections::BTreeMap;

use burn::module::{Param, ParamId};
use burn::prelude::*;

use crate::params::{self, DeviceMap, DeviceTensor, Site, TensorMap, TensorMapper, TensorVisitor};

/// The averaged weights, by module path, flattened.
pub struct Ema {
    pub decay: f64,
    pub shadow: BTreeMap<String, Tensor<1>>,
    /// Updates so far.
    pub updates: u64,
}

struct Collect<'a> {
    ema: &'a mut Ema,
}

impl TensorVisitor for Collect<'_> {
    fn tensor<const D: usize>(&mut self, site: &Site, param: &Param<Tensor<D>>) {
        let t = param.val().inner();
        let n = t.shape().num_elements();
        let w = t.reshape([n]);
        let key = site.path();
        let d = self.ema.decay;
        let new = match self.ema.shadow.remove(&key) {
            Some(s) => s * d + w * (1.0 - d),
            None => w,
        };
        self.ema.shadow.insert(key, new);
    }
}

struct Apply<'a> {
    shadow: &'a BTreeMap<String, Tensor<1>>,
}

impl TensorMapper for Apply<'_> {
    fn tensor<const D: usize>(&mut self, site: &Site, _: ParamId, t: Tensor<D>) -> Tensor<D> {
        match self.shadow.get(&site.path()) {
            Some(s) => s.clone().reshape(t.dims()),
            None => t,
        }
    }
}

impl Ema {
    pub fn new(decay: f64) -> Self {
        Ema {
            decay,
            shadow: BTreeMap::new(),
            updates: 0,
        }
    }

    /// Folds the current weights of `module` (a `valid()` copy, so BN statistics are synced)
    /// into the average. The first update copies the weights.
    pub fn update<M: Module>(&mut self, module: &M) {
        params::visit(module, &mut Collect { ema: self });
        self.updates += 1;
    }

    /// `module` with its tensors replaced by the averages (module in eval mode, no autodiff).
    pub fn apply<M: Module>(&self, module: M) -> M {
        params::map(
            module,
            &mut Apply {
                shadow: &self.shadow,
            },
        )
    }

    /// The averages, left on the device, in the model's shapes (`shapes`, by path, from
    /// `params::module_shapes`): a checkpoint's `ema` group then loads into the model as its
    /// `model` group does.
    pub fn device_state(&self, shapes: &BTreeMap<String, Vec<usize>>) -> DeviceMap {
        self.shadow
            .iter()
            .map(|(k, t)| {
                let shape = shapes.get(k).cloned().unwrap_or_else(|| t.dims().to_vec());
                let flat = t.clone();
                (k.clone(), DeviceTensor { shape, flat })
            })
            .collect()
    }

    /// [`Ema::device_state`] on the host.
    pub fn state(&self, shapes: &BTreeMap<String, Vec<usize>>) -> TensorMap {
        self.device_state(shapes)
            .iter()
            .map(|(k, d)| (k.clone(), d.to_host()))
            .collect()
    }

    /// Restores [`Ema::state`], or the flattened averages that checkpoints held before
    /// 2026-12-06, moving the values. `shapes` are the model's tensors by path: an average for
    /// a tensor the model lacks, or of another size, is refused by key.
    pub fn load_state(
        &mut self,
        state: TensorMap,
        shapes: &BTreeMap<String, Vec<usize>>,
        device: &Device,
    ) -> std::result::Result<(), String> {
        let mut shadow = BTreeMap::new();
        for (k, h) in state {
            let Some(shape) = shapes.get(&k) else {
                return Err(format!("EMA average `{k}` is for no tensor of the model"));
            };
            let n = h.data.len();
            if shape.iter().product::<usize>() != n {
                return Err(format!(
                    "EMA average `{k}` has {n} values, the model's {shape:?}"
                ));
            }
            shadow.insert(k, Tensor::from_data(TensorData::new(h.data, [n]), device));
        }
        self.shadow = shadow;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::HostTensor;
    use burn::nn::{Linear, LinearConfig};

    fn weights(l: &Linear) -> Vec<f32> {
        l.weight
            .val()
            .into_data()
            .convert::<f32>()
            .try_to_vec()
            .unwrap()
    }

    #[test]
    fn ema_after_k_updates_matches_the_formula() {
        let device = Device::flex();
        let l = LinearConfig::new(2, 1).with_bias(false).init(&device);
        let set = |l: Linear, v: f32| {
            let mut l = l;
            l.weight = l.weight.map(|t| t.zeros_like() + v);
            l
        };
        let mut ema = Ema::new(0.9);
        // Weights 1, 2, 3 in turn: shadow = 1; 0.9 + 0.2 = 1.1; 0.99 + 0.3 = 1.29.
        let mut l = set(l, 1.0);
        ema.update(&l);
        l = set(l, 2.0);
        ema.update(&l);
        l = set(l, 3.0);
        ema.update(&l);
        let avg = ema.apply(l.clone());
        for v in weights(&avg) {
            assert!((v - 1.29).abs() < 1e-6, "{v}");
        }
        assert_eq!(weights(&l), vec![3.0, 3.0]);
    }

    #[test]
    fn state_keeps_the_model_shapes_and_reloads_flat_or_shaped() {
        let device = Device::flex();
        let l = LinearConfig::new(3, 2).init(&device);
        let mut ema = Ema::new(0.5);
        ema.update(&l);
        let model_shapes = params::module_shapes(&l);
        let state = ema.state(&model_shapes);
        let shapes: Vec<Vec<usize>> = state.values().map(|h| h.shape.clone()).collect();
        // Burn's Linear: bias [out], weight [in, out].
        assert_eq!(shapes, vec![vec![2], vec![3, 2]]);
        // Older checkpoints held the averages flattened; both load to the same averages.
        let flat: TensorMap = state
            .iter()
            .map(|(k, h)| {
                let h = HostTensor {
                    shape: vec![h.data.len()],
                    data: h.data.clone(),
                };
                (k.clone(), h)
            })
            .collect();
        for s in [&state, &flat] {
            let mut back = Ema::new(0.5);
            back.load_state(s.clone(), &model_shapes, &device).unwrap();
            assert_eq!(weights(&back.apply(l.clone())), weights(&l));
            back.update(&l);
            assert_eq!(back.state(&model_shapes), state);
        }
    }
}
