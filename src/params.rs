//! The one named-tensor walk: every float tensor of a Burn module by its module path
//! (`ResNet.stages.0.1.convs.0.bn.gamma`), as host copies or shapes, and the way back (load a
//! map of such tensors into a module, strictly or only what matches). Checkpoints, EMA, the
//! optimiser (and its decay rule), initialisation, parameter counts, filter maps, freezing,
//! weight import and export all go through [`visit`] / [`map`]: the one implementation of
//! Burn's `ModuleVisitor`/`ModuleMapper` in convlab (a test in `tests/layering.rs` keeps it so).

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{ModuleMapper, ModuleVisitor, Param, ParamId};
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

/// A tensor left on its device, flattened, with the shape it is saved under: a checkpoint
/// copies it to the host only when the file reaches it ([`DeviceTensor::le_bytes`]), so saving
/// a model, its optimiser state and its averages never holds host copies of them all at once.
#[derive(Clone, Debug)]
pub struct DeviceTensor {
    pub shape: Vec<usize>,
    pub flat: Tensor<1>,
}

/// Device tensors by name, sorted.
pub type DeviceMap = BTreeMap<String, DeviceTensor>;

impl DeviceTensor {
    /// `t` flattened (a view on its buffer), saved under its own shape.
    pub fn new<const D: usize>(t: Tensor<D>) -> Self {
        let shape = t.dims().to_vec();
        let n = t.shape().num_elements();
        DeviceTensor {
            shape,
            flat: t.reshape([n]),
        }
    }

    pub fn to_host(&self) -> HostTensor {
        HostTensor {
            shape: self.shape.clone(),
            data: crate::helpers::host(self.flat.clone()),
        }
    }

    /// The values as little-endian f32 bytes, copied from the device a slice at a time: the
    /// whole tensor is on the host once (the returned bytes), not twice (device data and
    /// bytes), which for VGG-16's 411 MB `fc6` weight is the difference.
    pub fn le_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.flat.dims()[0] * 4);
        crate::helpers::for_each_host_slice(&self.flat, 1 << 20, |part| {
            out.extend_from_slice(&crate::helpers::le_bytes(part));
        });
        out
    }
}

/// What a float tensor is, from the Burn type that owns it (the container type Burn passes to
/// `enter_module`, e.g. `Struct:Conv2d`) and its field name; never guessed from the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `Conv2d.weight`: `[out, in / groups, kh, kw]`.
    ConvWeight,
    ConvBias,
    /// `Linear.weight`: `[in, out]` (Burn's layout).
    LinearWeight,
    LinearBias,
    /// A normalisation layer's learnable scale and shift (`BatchNorm.gamma` / `.beta`).
    NormScale,
    NormShift,
    /// Batch-norm running statistics: buffers, not parameters.
    RunningStat,
    Other,
}

impl Role {
    /// Conv and linear weights: what initialisation draws and weight decay may reach.
    pub fn is_weight(self) -> bool {
        matches!(self, Role::ConvWeight | Role::LinearWeight)
    }
    /// Learnable (PyTorch's `parameters()`), as opposed to a buffer.
    pub fn is_parameter(self) -> bool {
        self != Role::RunningStat
    }
}

/// Where the walk is: the module path of a float tensor and the types that hold it.
pub struct Site<'a> {
    names: &'a [String],
    owners: &'a [String],
}

impl Site<'_> {
    /// The dotted path, e.g. `ResNet.stages.0.1.convs.0.bn.gamma`.
    pub fn path(&self) -> String {
        self.names.join(".")
    }
    /// The path without its first `n` parts (`n = 1` drops the model's enum variant).
    pub fn path_from(&self, n: usize) -> String {
        self.names[n.min(self.names.len())..].join(".")
    }
    /// The field that holds the tensor (`weight`, `running_mean`, ...).
    pub fn field(&self) -> &str {
        self.names.last().map_or("", String::as_str)
    }
    /// The Burn type that owns the tensor (`Conv2d`, `Linear`, `BatchNorm`, ...).
    pub fn owner(&self) -> &str {
        self.owners.last().map_or("", |o| type_name(o))
    }
    /// Whether any enclosing module is of type `ty` (e.g. GoogLeNet's `AuxHead`).
    pub fn inside(&self, ty: &str) -> bool {
        self.owners.iter().any(|o| type_name(o) == ty)
    }
    pub fn role(&self) -> Role {
        match (self.owner(), self.field()) {
            ("Conv2d", "weight") => Role::ConvWeight,
            ("Conv2d", "bias") => Role::ConvBias,
            ("Linear", "weight") => Role::LinearWeight,
            ("Linear", "bias") => Role::LinearBias,
            ("BatchNorm" | "LayerNorm" | "GroupNorm", "gamma") => Role::NormScale,
            ("BatchNorm" | "LayerNorm" | "GroupNorm", "beta") => Role::NormShift,
            ("BatchNorm", "running_mean" | "running_var") => Role::RunningStat,
            _ => Role::Other,
        }
    }
}

/// `Struct:Conv2d` -> `Conv2d`; `Vec` stays `Vec`.
fn type_name(container: &str) -> &str {
    container
        .split_once(':')
        .map_or(container, |(_, name)| name)
}

/// Reads every float tensor of a module with its [`Site`] (see [`visit`]).
pub trait TensorVisitor {
    fn tensor<const D: usize>(&mut self, site: &Site, param: &Param<Tensor<D>>);
}

/// Replaces every float tensor of a module (see [`map`]). Whether the tensor required a
/// gradient is kept by the walk.
pub trait TensorMapper {
    fn tensor<const D: usize>(&mut self, site: &Site, id: ParamId, t: Tensor<D>) -> Tensor<D>;
}

#[derive(Default)]
struct Stack {
    names: Vec<String>,
    owners: Vec<String>,
}

impl Stack {
    fn enter(&mut self, name: &str, container: &str) {
        self.names.push(name.to_string());
        self.owners.push(container.to_string());
    }
    fn exit(&mut self) {
        self.names.pop();
        self.owners.pop();
    }
    fn site(&self) -> Site<'_> {
        Site {
            names: &self.names,
            owners: &self.owners,
        }
    }
}

struct Walk<'v, V> {
    stack: Stack,
    inner: &'v mut V,
}

impl<V: TensorVisitor> ModuleVisitor for Walk<'_, V> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.stack.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.stack.exit();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.inner.tensor(&self.stack.site(), param);
    }
}

impl<F: TensorMapper> ModuleMapper for Walk<'_, F> {
    fn enter_module(&mut self, name: &str, container: &str) {
        self.stack.enter(name, container);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.stack.exit();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, t, mapper) = param.consume();
        let grad = t.is_require_grad();
        let mut t = self.inner.tensor(&self.stack.site(), id, t);
        if grad && !t.is_require_grad() {
            t = t.require_grad();
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

/// The walk: calls `v` on every float tensor of `module`, in module order, with its site.
pub fn visit<M: Module, V: TensorVisitor>(module: &M, v: &mut V) {
    module.visit(&mut Walk {
        stack: Stack::default(),
        inner: v,
    });
}

/// The walk, writing: every float tensor of `module` replaced by what `f` returns.
pub fn map<M: Module, F: TensorMapper>(module: M, f: &mut F) -> M {
    module.map(&mut Walk {
        stack: Stack::default(),
        inner: f,
    })
}

/// [`visit`] with a closure that sees each tensor's site and shape (the lazy shape: nothing is
/// initialised or copied).
pub fn for_each_shape<M: Module>(module: &M, f: impl FnMut(&Site, &[usize])) {
    struct Shapes<F>(F);
    impl<F: FnMut(&Site, &[usize])> TensorVisitor for Shapes<F> {
        fn tensor<const D: usize>(&mut self, site: &Site, param: &Param<Tensor<D>>) {
            (self.0)(site, &param.lazy_shape().to_vec());
        }
    }
    visit(module, &mut Shapes(f));
}

struct Collect {
    out: TensorMap,
}

impl TensorVisitor for Collect {
    fn tensor<const D: usize>(&mut self, site: &Site, param: &Param<Tensor<D>>) {
        self.out
            .insert(site.path(), HostTensor::from_tensor(&param.val()));
    }
}

/// [`module_tensors`] left on the device, for a checkpoint to read back one at a time.
pub fn module_device_tensors<M: Module>(module: &M) -> DeviceMap {
    struct Handles(DeviceMap);
    impl TensorVisitor for Handles {
        fn tensor<const D: usize>(&mut self, site: &Site, param: &Param<Tensor<D>>) {
            self.0.insert(site.path(), DeviceTensor::new(param.val()));
        }
    }
    let mut h = Handles(DeviceMap::new());
    visit(module, &mut h);
    h.0
}

/// [`module_tensors`], consuming the module: each tensor goes to the host and its slot in the
/// module is emptied as the walk passes, so the module and the host copy are never both whole
/// (exporting a VGG-16 had held both, 0.5 GB each). Only for a module nothing else holds:
/// Burn's `RunningState` (batch norm's running statistics) is shared between clones, so
/// consuming a clone would empty the original's.
pub fn into_module_tensors<M: Module>(module: M) -> TensorMap {
    struct Take(TensorMap);
    impl TensorMapper for Take {
        fn tensor<const D: usize>(&mut self, site: &Site, _: ParamId, t: Tensor<D>) -> Tensor<D> {
            let (shape, device) = (t.dims().to_vec(), t.device());
            let data = t
                .into_data()
                .convert::<f32>()
                .try_into_vec::<f32>()
                .expect("f32 data");
            self.0.insert(site.path(), HostTensor { shape, data });
            Tensor::empty([0; D], &device)
        }
    }
    let mut take = Take(TensorMap::new());
    drop(map(module, &mut take));
    take.0
}

/// Every float tensor of `module` by path (e.g. `ConvNet.convs.0.conv.weight`). Call it on a
/// `valid()` copy so batch-norm running statistics are up to date.
pub fn module_tensors<M: Module>(module: &M) -> TensorMap {
    let mut c = Collect {
        out: TensorMap::new(),
    };
    visit(module, &mut c);
    c.out
}

/// The ids of the float parameters whose module path satisfies `pick` (for Burn's
/// `ParamGroup`: freezing part of a model).
pub fn param_ids<M: Module>(module: &M, pick: impl Fn(&str) -> bool) -> Vec<ParamId> {
    struct Ids<F> {
        pick: F,
        out: Vec<ParamId>,
    }
    impl<F: Fn(&str) -> bool> TensorVisitor for Ids<F> {
        fn tensor<const D: usize>(&mut self, site: &Site, param: &Param<Tensor<D>>) {
            if (self.pick)(&site.path()) {
                self.out.push(param.id);
            }
        }
    }
    let mut v = Ids {
        pick,
        out: Vec::new(),
    };
    visit(module, &mut v);
    v.out
}

/// The shape of every float tensor of `module` by path, without copying any values.
pub fn module_shapes<M: Module>(module: &M) -> BTreeMap<String, Vec<usize>> {
    let mut out = BTreeMap::new();
    for_each_shape(module, |site, shape| {
        out.insert(site.path(), shape.to_vec());
    });
    out
}

struct Apply<'a> {
    /// What is left to load: each tensor is moved into the module as it is loaded, so the host
    /// copy and the module's tensor are never both whole (the loaded model's own 0.5 GB
    /// beside a VGG's checkpoint, plus a copy of its largest tensor, before).
    tensors: TensorMap,
    /// Copy only what matches (for `init_from`) instead of requiring every tensor.
    partial: bool,
    copied: Vec<String>,
    problems: Vec<String>,
    /// Keys that may be missing without a problem.
    optional: &'a dyn Fn(&str) -> bool,
}

impl TensorMapper for Apply<'_> {
    fn tensor<const D: usize>(&mut self, site: &Site, _: ParamId, tensor: Tensor<D>) -> Tensor<D> {
        let key = site.path();
        match self.tensors.get(&key) {
            Some(h) if h.shape == tensor.dims().to_vec() => {
                let h = self.tensors.remove(&key).expect("present");
                self.copied.push(key);
                let device = tensor.device();
                drop(tensor);
                Tensor::from_data(TensorData::new(h.data, h.shape), &device)
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
        }
    }
}

/// Loads `tensors` into `module`. Strict: every tensor must be present with the right shape,
/// and no checkpoint tensor may be left over; otherwise the error lists the first problems.
pub fn load_module<M: Module>(
    module: M,
    tensors: TensorMap,
    path: &Path,
    model: &str,
) -> Result<M> {
    load_module_except(module, tensors, path, model, &|_| false)
}

/// [`load_module`], except that tensors for which `optional` holds may be absent (they keep
/// their values): an imported layout without GoogLeNet's auxiliary heads.
pub fn load_module_except<M: Module>(
    module: M,
    tensors: TensorMap,
    path: &Path,
    model: &str,
    optional: &dyn Fn(&str) -> bool,
) -> Result<M> {
    let mut a = Apply {
        tensors,
        partial: false,
        copied: Vec::new(),
        problems: Vec::new(),
        optional,
    };
    let module = map(module, &mut a);
    // Without other problems, whatever was not moved into the module is not in the model.
    if a.problems.is_empty()
        && let Some(extra) = a.tensors.keys().next()
    {
        a.problems.push(format!(
            "`{extra}` is in the checkpoint but not in the model"
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
        tensors: chosen,
        partial: true,
        copied: Vec::new(),
        problems: Vec::new(),
        optional: &|_| true,
    };
    let module = map(module, &mut a);
    (module, a.copied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_tensor_is_written_as_its_host_values_across_slices() {
        let device = Device::flex();
        // Two slices and a ragged third, in a 3-D shape: the bytes are the row-major values.
        let n = 5 * 419_431; // 2^21 + 3
        let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 7.0).collect();
        let t = Tensor::<3>::from_data(TensorData::new(values.clone(), [n / 5, 5, 1]), &device);
        let d = DeviceTensor::new(t);
        assert_eq!(d.shape, vec![n / 5, 5, 1]);
        assert_eq!(d.le_bytes(), crate::helpers::le_bytes(&values).to_vec());
        assert_eq!(d.to_host().data, values);
    }

    #[test]
    fn a_consumed_module_gives_the_tensors_a_copy_gives() {
        let device = Device::flex();
        let mut bn = burn::nn::BatchNormConfig::new(3).init(&device);
        bn.gamma = bn.gamma.map(|t| t + 0.5);
        let copied = module_tensors(&bn);
        let keys: Vec<&str> = copied.keys().map(String::as_str).collect();
        // Parameters and the running statistics (Burn's `RunningState`) alike.
        assert_eq!(keys, ["beta", "gamma", "running_mean", "running_var"]);
        assert_eq!(into_module_tensors(bn), copied);
    }
}
