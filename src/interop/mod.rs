//! Weights in from other frameworks: PyTorch state dicts (`.pth`/`.pt`, zip and legacy
//! pickle) and safetensors files, in torchvision's, timm's or convlab's naming, mapped onto a
//! convlab model with every key and shape checked.
//!
//! Reading uses `pytorch-reader`, the crate behind burn-store's `PytorchStore`; the mapping is
//! convlab's own table ([`naming`]) rather than burn-store's regex remapper, because the names
//! need index arithmetic (`stages.0` is `layer1`, VGG's convs sit at Sequential positions that
//! depend on the plan) and the same table must run backwards for export. A state dict that does
//! not fit the model is an error listing the missing, unexpected and wrongly shaped keys; a
//! wrong model for a file never half-loads.

pub mod export;
pub mod naming;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::prelude::*;

use crate::checkpoint::{self, HostTensor, TensorMap};
use crate::error::{Error, Result};
use crate::helpers::SafetensorsFile;
use crate::models::{Model, ModelConfig};
pub use naming::Naming;

/// ImageNet's per-channel mean and std (RGB, pixels in [0, 1]): what torchvision's and timm's
/// pretrained weights were trained with.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Keys a checkpoint may nest its state dict under (`torch.save({"state_dict": ...})`), and
/// the prefix `nn.DataParallel` adds.
const NESTS: &[&str] = &["state_dict", "model", "model_state_dict", "module"];

/// A state dict read from a file, in the file's own naming, every tensor as f32.
pub struct StateDict {
    pub path: PathBuf,
    /// `pytorch-zip`, `pytorch-legacy` or `safetensors`.
    pub format: &'static str,
    pub tensors: TensorMap,
}

/// Reads a state dict from `path` (format detected from the bytes, not the name).
pub fn read_state_dict(path: &Path) -> Result<StateDict> {
    let bad = |reason: String| Error::BadData {
        path: path.to_path_buf(),
        reason,
    };
    let mut head = [0u8; 16];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        f.read(&mut head).map_err(|e| Error::io(path, e))?
    };
    let head = &head[..n];
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let max = crate::limits::MAX_DATA_FILE_BYTES;
    if len > max {
        return Err(bad(format!(
            "{len} bytes; weights files are at most {max} bytes"
        )));
    }
    // safetensors first: its 8-byte header length may begin with 0x80, a pickle's first byte.
    let safetensors = head.len() >= 9 && head[8] == b'{' && head[6..8] == [0, 0];
    let (format, tensors) = if safetensors {
        ("safetensors", read_safetensors(path)?)
    } else if head.starts_with(b"PK\x03\x04") || head.first() == Some(&0x80) {
        let format = if head.starts_with(b"PK") {
            "pytorch-zip"
        } else {
            "pytorch-legacy"
        };
        (format, read_pytorch(path)?)
    } else {
        return Err(bad(
            "not a PyTorch (.pth/.pt, zip or legacy pickle) or safetensors state dict".into(),
        ));
    };
    if tensors.is_empty() {
        return Err(bad("holds no tensors".into()));
    }
    Ok(StateDict {
        path: path.to_path_buf(),
        format,
        tensors: unnest(tensors),
    })
}

/// Keeps only the state dict when a checkpoint holds more (`{"state_dict": ..., "optimizer":
/// ...}`), then strips a nesting key every tensor shares (`module.`, ...), repeatedly.
fn unnest(mut t: TensorMap) -> TensorMap {
    if let Some(p) = NESTS[..3]
        .iter()
        .find(|p| t.keys().any(|k| k.starts_with(&format!("{p}."))))
    {
        let prefix = format!("{p}.");
        t.retain(|k, _| k.starts_with(&prefix));
    }
    loop {
        let first = t
            .keys()
            .next()
            .and_then(|k| k.split_once('.'))
            .map(|(p, _)| p.to_string());
        match first {
            Some(p)
                if NESTS.contains(&p.as_str())
                    && t.keys().all(|k| k.starts_with(&format!("{p}."))) =>
            {
                t = t
                    .into_iter()
                    .map(|(k, v)| (k[p.len() + 1..].to_string(), v))
                    .collect();
            }
            _ => return t,
        }
    }
}

fn read_pytorch(path: &Path) -> Result<TensorMap> {
    use pytorch_reader::{DType, PickleValue, PytorchReader};
    let bad = |reason: String| Error::BadData {
        path: path.to_path_buf(),
        reason,
    };
    // `torch.save(model)` pickles the module object itself; convlab wants its state dict.
    // Only a nested dict at the root counts as one.
    // A state dict is a flat dict of tensors (`conv1.weight`), possibly under a nesting key;
    // the reader shows a pickled module as dicts of its submodules (`{"0": {"weight": ..}}`).
    let root = PytorchReader::read_pickle_data(path, None)
        .map_err(|e| bad(format!("not a readable PyTorch file: {e}")))?;
    let whole_module = match &root {
        PickleValue::Dict(d) => {
            // (`_metadata`, which `state_dict()` attaches, is a dict too.)
            !d.keys().any(|k| NESTS.contains(&k.as_str()))
                && !d.values().any(|v| matches!(v, PickleValue::Unsupported(_)))
                && d.values().any(|v| matches!(v, PickleValue::Dict(_)))
        }
        _ => true,
    };
    if whole_module {
        return Err(bad(
            "holds a pickled module object, not a state dict; save `model.state_dict()` \
             (torch.save(model.state_dict(), path)) instead of the whole module"
                .into(),
        ));
    }
    let reader =
        PytorchReader::new(path).map_err(|e| bad(format!("not a readable PyTorch file: {e}")))?;
    let mut out = TensorMap::new();
    for (name, t) in reader.into_tensors() {
        let kind = match t.dtype() {
            DType::F32 => Float::F32,
            DType::F64 => Float::F64,
            DType::F16 => Float::F16,
            DType::BF16 => Float::Bf16,
            _ if name.ends_with("num_batches_tracked") => continue,
            d => {
                return Err(bad(format!(
                    "tensor `{name}` is {d:?}; weights must be floating point"
                )));
            }
        };
        let bytes = t.read().map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        let data = kind.to_f32(&bytes);
        out.insert(
            name,
            HostTensor {
                shape: t.shape().to_vec(),
                data,
            },
        );
    }
    Ok(out)
}

/// The floating-point element types a state dict may store.
#[derive(Clone, Copy)]
enum Float {
    F32,
    F64,
    F16,
    Bf16,
}

impl Float {
    /// Little-endian bytes of this type to f32.
    fn to_f32(self, b: &[u8]) -> Vec<f32> {
        let halves = |f: fn(u16) -> f32| -> Vec<f32> {
            bytemuck::pod_collect_to_vec::<u8, u16>(b)
                .into_iter()
                .map(f)
                .collect()
        };
        match self {
            Float::F32 => bytemuck::pod_collect_to_vec::<u8, f32>(b),
            Float::F64 => bytemuck::pod_collect_to_vec::<u8, f64>(b)
                .into_iter()
                .map(|v| v as f32)
                .collect(),
            Float::F16 => halves(|v| half::f16::from_bits(v).to_f32()),
            Float::Bf16 => halves(|v| half::bf16::from_bits(v).to_f32()),
        }
    }
}

fn read_safetensors(path: &Path) -> Result<TensorMap> {
    use safetensors::Dtype;
    let mut file = SafetensorsFile::open(path)?;
    // A convlab checkpoint groups its tensors (`model/...`, `ema/...`): its weights are the
    // ones `load_model` evaluates, read without the optimiser's state.
    if file.tensors().iter().any(|(k, _)| k.starts_with("model/")) {
        drop(file);
        return checkpoint::open(path)?.read_weights();
    }
    let infos = file.tensors().to_vec();
    let mut out = TensorMap::new();
    for (name, info) in infos {
        let float = match info.dtype {
            Dtype::F32 => Float::F32,
            Dtype::F64 => Float::F64,
            Dtype::F16 => Float::F16,
            Dtype::BF16 => Float::Bf16,
            _ if name.ends_with("num_batches_tracked") => continue,
            d => {
                return Err(Error::BadData {
                    path: path.to_path_buf(),
                    reason: format!("tensor `{name}` is {d:?}; weights must be floating point"),
                });
            }
        };
        let data = match float {
            Float::F32 => file.read_f32(&info)?,
            _ => float.to_f32(&file.read_bytes(&info)?),
        };
        out.insert(
            name,
            HostTensor {
                shape: info.shape,
                data,
            },
        );
    }
    Ok(out)
}

/// The naming the keys are in: convlab's module paths, timm's deep-stem `conv1.0`, else
/// torchvision's (timm's plain ResNets use torchvision's names).
pub fn detect_naming(sd: &StateDict) -> Naming {
    const CONVLAB: &[&str] = &["ResNet.", "Vgg.", "AlexNet.", "GoogLeNet.", "ConvNet."];
    if sd
        .tensors
        .keys()
        .any(|k| CONVLAB.iter().any(|p| k.starts_with(p)))
    {
        Naming::Convlab
    } else if sd.tensors.contains_key("conv1.0.weight") {
        Naming::Timm
    } else {
        Naming::Torchvision
    }
}

fn list(keys: &[String]) -> String {
    let mut s = keys
        .iter()
        .take(6)
        .map(|k| format!("`{k}`"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > 6 {
        s.push_str(&format!(" and {} more", keys.len() - 6));
    }
    s
}

/// Maps `sd` (in `naming`) onto the tensors of a convlab model with shapes `dest`: each
/// convlab key's foreign name is looked up and transposed where the layouts differ. Keys the
/// layout lacks (GoogLeNet's auxiliary heads) are left out of the result. Any missing,
/// unexpected or wrongly shaped key is an error naming them all.
pub fn to_convlab(
    cfg: &ModelConfig,
    naming: Naming,
    sd: StateDict,
    dest: &BTreeMap<String, Vec<usize>>,
) -> Result<TensorMap> {
    let model = cfg.name;
    let mismatch = |reason: String| Error::CheckpointMismatch {
        path: sd.path.clone(),
        model: model.to_string(),
        reason,
    };
    check_supported(cfg, naming, &sd)?;
    let mut src = sd.tensors;
    let (mut out, mut missing, mut shapes) = (TensorMap::new(), Vec::new(), Vec::new());
    for (key, shape) in dest {
        let Some(fk) = naming::foreign_key(model, naming, key) else {
            continue;
        };
        let Some(t) = src.remove(&fk) else {
            missing.push(fk);
            continue;
        };
        let flip = naming != Naming::Convlab && naming::transposed(key, shape);
        let want: Vec<usize> = if flip {
            shape.iter().rev().copied().collect()
        } else {
            shape.clone()
        };
        // Shapes are reported in the file's own layout.
        if t.shape != want {
            shapes.push(format!(
                "`{fk}` is {:?}, the model needs {:?}",
                t.shape, want
            ));
            continue;
        }
        let t = if flip { transpose(t) } else { t };
        out.insert(key.clone(), t);
    }
    let unexpected: Vec<String> = src
        .keys()
        .filter(|k| !naming::ignored(naming, k))
        .cloned()
        .collect();
    let mut problems = Vec::new();
    if !shapes.is_empty() {
        problems.push(format!(
            "wrong shapes: {}",
            shapes[..shapes.len().min(4)].join("; ")
        ));
    }
    if !missing.is_empty() {
        problems.push(format!("missing keys: {}", list(&missing)));
    }
    if !unexpected.is_empty() {
        problems.push(format!("unexpected keys: {}", list(&unexpected)));
    }
    if !problems.is_empty() {
        return Err(mismatch(format!(
            "{} ({} naming); is this state dict of another model?",
            problems.join("; "),
            naming.as_str()
        )));
    }
    Ok(out)
}

/// `[a, b]` -> `[b, a]` (a `Linear` weight between PyTorch's `[out, in]` and Burn's
/// `[in, out]`). In square blocks, so that the reads and the writes of a block each stay
/// within a few cache lines: one element at a time, every write of a row of VGG's 25088 x
/// 4096 classifier weight landed on another page.
pub(crate) fn transpose(t: HostTensor) -> HostTensor {
    const BLOCK: usize = 32;
    let [a, b] = [t.shape[0], t.shape[1]];
    let mut data = vec![0f32; t.data.len()];
    for i0 in (0..a).step_by(BLOCK) {
        for j0 in (0..b).step_by(BLOCK) {
            for i in i0..(i0 + BLOCK).min(a) {
                for j in j0..(j0 + BLOCK).min(b) {
                    data[j * a + i] = t.data[i * b + j];
                }
            }
        }
    }
    HostTensor {
        shape: vec![b, a],
        data,
    }
}

/// The output count of the state dict's classifier, read from the tensor that maps to the
/// model's classifier bias (found as the tensors whose shape follows the class count).
pub fn source_classes(
    cfg: &ModelConfig,
    naming: Naming,
    sd: &StateDict,
    device: &Device,
) -> Result<usize> {
    check_supported(cfg, naming, sd)?;
    let two = ModelConfig {
        num_classes: 2,
        ..cfg.clone()
    }
    .build(device)?;
    let a = checkpoint::module_shapes(&two);
    let b = checkpoint::module_shapes(&two.with_classes(3, device));
    let head = a
        .iter()
        .filter(|(k, s)| b.get(*k) != Some(s) && s.len() == 1)
        .filter_map(|(k, _)| naming::foreign_key(cfg.name, naming, k))
        .next()
        .ok_or_else(|| Error::Invalid(format!("{}: model has no classifier bias", cfg.name)))?;
    match sd.tensors.get(&head) {
        Some(t) if t.shape.len() == 1 && t.shape[0] >= 2 => Ok(t.shape[0]),
        Some(t) => Err(Error::CheckpointMismatch {
            path: sd.path.clone(),
            model: cfg.name.to_string(),
            reason: format!("classifier `{head}` has shape {:?}", t.shape),
        }),
        None => Err(Error::CheckpointMismatch {
            path: sd.path.clone(),
            model: cfg.name.to_string(),
            reason: format!(
                "no classifier `{head}` ({} naming); is this state dict of another model?",
                naming.as_str()
            ),
        }),
    }
}

/// An error naming the model when `naming` has no such model (e.g. torchvision has no
/// `resnet18_small`).
fn check_supported(cfg: &ModelConfig, naming: Naming, sd: &StateDict) -> Result<()> {
    if naming::supports(cfg.name, naming) {
        return Ok(());
    }
    Err(Error::Invalid(format!(
        "{}: {} naming has no model `{}`; it has: {}",
        sd.path.display(),
        naming.as_str(),
        cfg.name,
        naming::supported_models(naming).join(", ")
    )))
}

/// What [`load_weights`] did.
pub struct Loaded {
    pub model: Model,
    pub naming: Naming,
    /// Classes of the state dict's classifier.
    pub source_classes: usize,
    /// Tensors taken from the file.
    pub tensors: usize,
}

/// Builds `cfg`'s model and loads the state dict into it. When the file's classifier has a
/// different class count than `cfg.num_classes`, every other tensor is loaded and the
/// classifier is re-initialised (`with_classes`).
pub fn load_weights(
    cfg: &ModelConfig,
    sd: StateDict,
    naming: Option<Naming>,
    device: &Device,
) -> Result<Loaded> {
    let naming = naming.unwrap_or_else(|| detect_naming(&sd));
    let k = source_classes(cfg, naming, &sd, device)?;
    let src_cfg = ModelConfig {
        num_classes: k,
        ..cfg.clone()
    };
    let model = src_cfg.build(device)?;
    let dest = checkpoint::module_shapes(&model);
    let path = sd.path.clone();
    let map = to_convlab(&src_cfg, naming, sd, &dest)?;
    let tensors = map.len();
    // GoogLeNet's auxiliary heads are the only tensors a layout may lack; they keep their init.
    let optional = |key: &str| naming::foreign_key(cfg.name, naming, key).is_none();
    let mut model =
        checkpoint::load_module_except(model, map, &path, cfg.name.as_str(), &optional)?;
    if k != cfg.num_classes {
        model = model.with_classes(cfg.num_classes, device);
    }
    Ok(Loaded {
        model,
        naming,
        source_classes: k,
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_swaps_axes() {
        let t = HostTensor {
            shape: vec![2, 3],
            data: vec![1., 2., 3., 4., 5., 6.],
        };
        let u = transpose(t);
        assert_eq!(u.shape, vec![3, 2]);
        assert_eq!(u.data, vec![1., 4., 2., 5., 3., 6.]);
        // Shapes that are and are not multiples of the block, on either side.
        for (a, b) in [(1, 1), (31, 33), (32, 64), (70, 5), (65, 97)] {
            let data: Vec<f32> = (0..a * b).map(|v| v as f32).collect();
            let u = transpose(HostTensor {
                shape: vec![a, b],
                data: data.clone(),
            });
            assert_eq!(u.shape, vec![b, a]);
            for i in 0..a {
                for j in 0..b {
                    assert_eq!(u.data[j * a + i], data[i * b + j], "{a}x{b} at ({i}, {j})");
                }
            }
        }
    }

    #[test]
    fn nesting_keys_are_stripped() {
        let t = |k: &str| {
            (
                k.to_string(),
                HostTensor {
                    shape: vec![1],
                    data: vec![0.],
                },
            )
        };
        let m: TensorMap = [
            t("state_dict.module.fc.weight"),
            t("state_dict.module.fc.bias"),
        ]
        .into_iter()
        .collect();
        let keys: Vec<String> = unnest(m).into_keys().collect();
        assert_eq!(keys, ["fc.bias", "fc.weight"]);
        // {"model": sd, "optimizer": ...}: only the state dict is kept.
        let m: TensorMap = [t("model.a"), t("optimizer.b")].into_iter().collect();
        assert_eq!(unnest(m).into_keys().collect::<Vec<_>>(), ["a"]);
        let m: TensorMap = [t("layer.a"), t("other.b")].into_iter().collect();
        assert_eq!(unnest(m).len(), 2, "a prefix that is no nesting key stays");
    }
}
