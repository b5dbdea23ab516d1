//! The one named-tensor walk: every float tensor of a Burn module by its module path
//! (`ResNet.stages.0.1.convs.0.bn.gamma`), as host copies or shapes, and the way back (load a
//! map of such tensors into a module, strictly or only what matches). Checkpoints, weight
//! import and export, `init_from` and parameter counts go through it.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;

use crate::error::{Error, Result};

/// A host copy of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    pub fn from_tensor<const D: usize>(t: &Tensor<D>) -> Self {
        HostTensor {
            shape: t.dims().to_vec(),
            data: t
                .clone()
                .into_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .expect("f32 data"),
        }
    }

    pub fn to_tensor<const D: usize>(&self, device: &Device) -> Tensor<D> {
        Tensor::from_data(
            TensorData::new(self.data.clone(), self.shape.clone()),
            device,
        )
    }
}

/// Tensors by name, sorted.
pub type TensorMap = BTreeMap<String, HostTensor>;

struct Collect {
    path: Vec<String>,
    out: TensorMap,
    /// Copy the values too (else only the shapes, with empty data).
    data: bool,
}

impl ModuleVisitor for Collect {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let t = if self.data {
            HostTensor::from_tensor(&param.val())
        } else {
            // The lazy shape: a module built for its shapes is never initialised.
            HostTensor {
                shape: param.lazy_shape().to_vec(),
                data: Vec::new(),
            }
        };
        self.out.insert(self.path.join("."), t);
    }
}

/// Every float tensor of `module` by path (e.g. `ConvNet.convs.0.conv.weight`). Call it on a
/// `valid()` copy so batch-norm running statistics are up to date.
pub fn module_tensors<M: Module>(module: &M) -> TensorMap {
    let mut c = Collect {
        path: Vec::new(),
        out: TensorMap::new(),
        data: true,
    };
    module.visit(&mut c);
    c.out
}

/// The ids of the float parameters whose module path satisfies `pick` (for Burn's
/// `ParamGroup`: freezing part of a model).
pub fn param_ids<M: Module>(module: &M, pick: impl Fn(&str) -> bool) -> Vec<burn::module::ParamId> {
    struct Ids<F> {
        path: Vec<String>,
        pick: F,
        out: Vec<burn::module::ParamId>,
    }
    impl<F: Fn(&str) -> bool> ModuleVisitor for Ids<F> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if (self.pick)(&self.path.join(".")) {
                self.out.push(param.id);
            }
        }
    }
    let mut v = Ids {
        path: Vec::new(),
        pick,
        out: Vec::new(),
    };
    module.visit(&mut v);
    v.out
}

/// The shape of every float tensor of `module` by path, without copying any values.
pub fn module_shapes<M: Module>(module: &M) -> BTreeMap<String, Vec<usize>> {
    let mut c = Collect {
        path: Vec::new(),
        out: TensorMap::new(),
        data: false,
    };
    module.visit(&mut c);
    c.out.into_iter().map(|(k, t)| (k, t.shape)).collect()
}

struct Apply<'a> {
    path: Vec<String>,
    tensors: &'a TensorMap,
    /// Copy only what matches (for `init_from`) instead of requiring every tensor.
    partial: bool,
    copied: Vec<String>,
    problems: Vec<String>,
    /// Keys that may be missing without a problem.
    optional: &'a dyn Fn(&str) -> bool,
}

impl ModuleMapper for Apply<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = self.path.join(".");
        let (id, tensor, mapper) = param.consume();
        let tensor = match self.tensors.get(&key) {
            Some(h) if h.shape == tensor.dims().to_vec() => {
                let grad = tensor.is_require_grad();
                let mut t = h.to_tensor::<D>(&tensor.device());
                if grad {
                    t = t.require_grad();
                }
                self.copied.push(key);
                t
            }
            Some(h) => {
                if !self.partial {
                    self.problems.push(format!(
                        "`{key}` has shape {:?} in the checkpoint but {:?} in the model",
                        h.shape,
                        tensor.dims()
                    ));
                }
                tensor
            }
            None => {
                if !self.partial && !(self.optional)(&key) {
                    self.problems
                        .push(format!("`{key}` is missing from the checkpoint"));
                }
                tensor
            }
        };
        Param::from_mapped_value(id, tensor, mapper)
    }
}

/// Loads `tensors` into `module`. Strict: every tensor must be present with the right shape,
/// and no checkpoint tensor may be left over; otherwise the error lists the first problems.
pub fn load_module<M: Module>(
    module: M,
    tensors: &TensorMap,
    path: &Path,
    model: &str,
) -> Result<M> {
    load_module_except(module, tensors, path, model, &|_| false)
}

/// [`load_module`], except that tensors for which `optional` holds may be absent (they keep
/// their values): an imported layout without GoogLeNet's auxiliary heads.
pub fn load_module_except<M: Module>(
    module: M,
    tensors: &TensorMap,
    path: &Path,
    model: &str,
    optional: &dyn Fn(&str) -> bool,
) -> Result<M> {
    let mut a = Apply {
        path: Vec::new(),
        tensors,
        partial: false,
        copied: Vec::new(),
        problems: Vec::new(),
        optional,
    };
    let module = module.map(&mut a);
    let extra: Vec<&String> = tensors.keys().filter(|k| !a.copied.contains(k)).collect();
    if a.problems.is_empty() && !extra.is_empty() {
        a.problems.push(format!(
            "`{}` is in the checkpoint but not in the model",
            extra[0]
        ));
    }
    if !a.problems.is_empty() {
        let n = a.problems.len();
        let mut reason = a
            .problems
            .into_iter()
            .take(3)
            .collect::<Vec<_>>()
            .join("; ");
        if n > 3 {
            reason.push_str(&format!("; and {} more", n - 3));
        }
        return Err(Error::CheckpointMismatch {
            path: path.to_path_buf(),
            model: model.to_string(),
            reason,
        });
    }
    Ok(module)
}

/// Copies every layer whose tensors all match by name and shape (a conv's weight and bias, a
/// batch norm's four tensors); returns the module and the copied tensor names. A layer is the
/// module path minus its last component, so a bias is never copied without its weight.
pub fn load_matching<M: Module>(module: M, tensors: &TensorMap) -> (M, Vec<String>) {
    let dest = module_tensors(&module);
    let layer = |k: &str| {
        k.rsplit_once('.')
            .map_or(String::new(), |(l, _)| l.to_string())
    };
    let mut ok_layers: BTreeMap<String, bool> = BTreeMap::new();
    for (k, t) in &dest {
        let fits = tensors.get(k).is_some_and(|h| h.shape == t.shape);
        let e = ok_layers.entry(layer(k)).or_insert(true);
        *e = *e && fits;
    }
    let chosen: TensorMap = tensors
        .iter()
        .filter(|(k, _)| dest.contains_key(*k) && ok_layers.get(&layer(k)) == Some(&true))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut a = Apply {
        path: Vec::new(),
        tensors: &chosen,
        partial: true,
        copied: Vec::new(),
        problems: Vec::new(),
        optional: &|_| true,
    };
    let module = module.map(&mut a);
    (module, a.copied)
}
