//! Checkpoints: every tensor of a model (parameters and batch-norm running statistics) keyed by
//! its module path, plus optimiser state and metadata, in one safetensors file.
//!
//! safetensors (the `safetensors` crate, Hugging Face's format) was chosen over Burn's own
//! record format because the files are readable from Python (`safetensors.torch.load_file`),
//! the keys are the layer names that `init_from` and the viewers match on, and the metadata
//! header carries the resume state. Files are written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::module::{ModuleMapper, ModuleVisitor, Param};
use burn::prelude::*;
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{Error, Result};
use crate::run::write_atomic;

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
            HostTensor {
                shape: param.val().dims().to_vec(),
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

/// Writes tensor groups (`prefix/name` keys) and string metadata to `path` atomically.
pub fn save(
    path: &Path,
    groups: &[(&str, &TensorMap)],
    meta: HashMap<String, String>,
) -> Result<()> {
    let mut bytes: Vec<(String, Vec<u8>, Vec<usize>)> = Vec::new();
    for (prefix, map) in groups {
        for (k, t) in map.iter() {
            let raw: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            bytes.push((format!("{prefix}/{k}"), raw, t.shape.clone()));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(k, raw, shape)| {
            (
                k.clone(),
                TensorView::new(Dtype::F32, shape.clone(), raw).expect("sizes agree"),
            )
        })
        .collect();
    let out = safetensors::serialize(views, Some(meta)).map_err(|e| {
        Error::Invalid(format!(
            "{}: cannot serialise checkpoint: {e}",
            path.display()
        ))
    })?;
    write_atomic(path, &out)
}

/// A loaded checkpoint: tensor groups by prefix, and metadata.
pub struct Checkpoint {
    pub groups: HashMap<String, TensorMap>,
    pub meta: HashMap<String, String>,
}

impl Checkpoint {
    pub fn group(&self, prefix: &str) -> TensorMap {
        self.groups.get(prefix).cloned().unwrap_or_default()
    }
}

/// Reads a checkpoint written by [`save`].
pub fn load(path: &Path) -> Result<Checkpoint> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |reason: String| Error::BadData {
        path: path.to_path_buf(),
        reason: format!("not a readable checkpoint: {reason}"),
    };
    let (_, metadata) = SafeTensors::read_metadata(&raw).map_err(|e| bad(e.to_string()))?;
    let st = SafeTensors::deserialize(&raw).map_err(|e| bad(e.to_string()))?;
    let mut groups: HashMap<String, TensorMap> = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(bad(format!(
                "tensor `{name}` is {:?}, expected F32",
                view.dtype()
            )));
        }
        let data: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let (prefix, key) = name.split_once('/').unwrap_or(("model", name.as_str()));
        groups.entry(prefix.to_string()).or_default().insert(
            key.to_string(),
            HostTensor {
                shape: view.shape().to_vec(),
                data,
            },
        );
    }
    Ok(Checkpoint {
        groups,
        meta: metadata.metadata().clone().unwrap_or_default(),
    })
}
