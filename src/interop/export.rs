//! Models out: a run's weights as a state dict in torchvision's, timm's or convlab's naming,
//! written as PyTorch's zip `.pth` (what `torch.save(model.state_dict(), f)` writes) or as
//! `.safetensors`. The names come from the same table import reads ([`super::naming`]), so an
//! export imports back to identical tensors.
//!
//! PyTorch's format (`torch/serialization.py`, `_save`): a stored (uncompressed) zip whose
//! records sit under one folder: `data.pkl` (a protocol-2 pickle of an `OrderedDict` mapping
//! each key to `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
//! hooks)`, the storage a persistent id `('storage', torch.FloatStorage, '<n>', 'cpu', numel)`),
//! `data/<n>` (each storage's little-endian bytes, 64-byte aligned as torch writes them),
//! `byteorder` and `version`. Only globals that `torch.load(weights_only=True)` allows are used.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use safetensors::{Dtype, tensor::TensorView};

use super::naming::{self, Naming};
use crate::error::{Error, Result};
use crate::models::{Model, ModelName};
use crate::params::{HostTensor, TensorMap, into_module_tensors, module_tensors};

/// One exported tensor's values.
#[derive(Clone, Debug, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    /// BN's `num_batches_tracked` (an int64 scalar in PyTorch).
    I64(Vec<i64>),
}

/// One exported tensor: shape (row-major) and values.
#[derive(Clone, Debug, PartialEq)]
pub struct ForeignTensor {
    pub shape: Vec<usize>,
    pub values: Values,
}

/// An exported state dict, by key.
pub type ForeignDict = BTreeMap<String, ForeignTensor>;

/// One key of an exported state dict.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    /// The foreign key.
    pub key: String,
    /// Its shape in the file.
    pub shape: Vec<usize>,
    /// The convlab tensor it holds (`None`: a BN step counter, written as 0).
    pub source: Option<String>,
    /// Stored transposed (Burn's `[in, out]` linear weight as PyTorch's `[out, in]`).
    pub transpose: bool,
}

/// What [`state_dict`] writes for a model with tensor shapes `shapes` (as
/// [`crate::params::module_shapes`] gives them), without touching any values: every tensor under
/// its foreign key, linear weights transposed, and a `num_batches_tracked` beside each batch
/// norm (PyTorch's BN buffer; only its cumulative-average mode reads it). A model the naming
/// does not have is an error naming the ones it has.
pub fn plan(
    name: ModelName,
    naming: Naming,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<Vec<Entry>> {
    if !naming::supports(name, naming) {
        return Err(Error::Invalid(format!(
            "{} naming has no model `{name}`; it has: {}",
            naming.as_str(),
            naming::supported_models(naming).join(", ")
        )));
    }
    let foreign = naming != Naming::Convlab;
    let mut out = Vec::new();
    for (key, shape) in shapes {
        let Some(fk) = naming::export_key(name, naming, key) else {
            continue;
        };
        let transpose = foreign && naming::transposed(key, shape);
        if foreign && let Some(prefix) = fk.strip_suffix(".running_var") {
            out.push(Entry {
                key: format!("{prefix}.num_batches_tracked"),
                shape: Vec::new(),
                source: None,
                transpose: false,
            });
        }
        out.push(Entry {
            key: fk,
            shape: if transpose {
                shape.iter().rev().copied().collect()
            } else {
                shape.clone()
            },
            source: Some(key.clone()),
            transpose,
        });
    }
    Ok(out)
}

/// The state dict of `model` (registered as `name`) in `naming`, as [`plan`] lays it out.
pub fn state_dict(model: &Model, name: ModelName, naming: Naming) -> Result<ForeignDict> {
    lay_out(module_tensors(model), name, naming)
}

/// [`state_dict`], consuming the model tensor by tensor ([`into_module_tensors`]): the peak is
/// one copy of the weights, not the model and its state dict side by side. Only for a model
/// nothing else holds: a clone shares its batch-norm running statistics.
pub fn into_state_dict(model: Model, name: ModelName, naming: Naming) -> Result<ForeignDict> {
    lay_out(into_module_tensors(model), name, naming)
}

fn lay_out(mut tensors: TensorMap, name: ModelName, naming: Naming) -> Result<ForeignDict> {
    let shapes = tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.shape.clone()))
        .collect();
    let mut out = ForeignDict::new();
    for e in plan(name, naming, &shapes)? {
        let values = match &e.source {
            None => Values::I64(vec![0]),
            Some(k) => {
                let t = tensors.remove(k).expect("planned from these tensors");
                let t = if e.transpose { super::transpose(t) } else { t };
                let HostTensor { data, .. } = t;
                Values::F32(data)
            }
        };
        out.insert(
            e.key,
            ForeignTensor {
                shape: e.shape,
                values,
            },
        );
    }
    Ok(out)
}

fn raw(t: &ForeignTensor) -> std::borrow::Cow<'_, [u8]> {
    match &t.values {
        Values::F32(v) => crate::helpers::le_bytes(v),
        Values::I64(v) => crate::helpers::le_bytes(v),
    }
}

/// Writes `sd` as a `.safetensors` file to `path` atomically, with `meta` in its header,
/// streamed from the tensors' own buffers.
pub fn write_safetensors(
    path: &Path,
    sd: &ForeignDict,
    meta: &BTreeMap<String, String>,
) -> Result<()> {
    let bytes: Vec<(&String, std::borrow::Cow<'_, [u8]>, &ForeignTensor)> =
        sd.iter().map(|(k, t)| (k, raw(t), t)).collect();
    let views = bytes
        .iter()
        .map(|(k, raw, t)| {
            let dtype = match t.values {
                Values::F32(_) => Dtype::F32,
                Values::I64(_) => Dtype::I64,
            };
            let view = TensorView::new(dtype, t.shape.clone(), raw)
                .map_err(|e| Error::Invalid(format!("`{k}`: {e}")))?;
            Ok(((*k).clone(), view))
        })
        .collect::<Result<Vec<_>>>()?;
    let meta = meta.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    crate::helpers::write_safetensors(path, views, meta)
}

/// A protocol-2 pickle writer for the few opcodes a state dict needs.
struct Pickle(Vec<u8>);

impl Pickle {
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(b'c');
        self.0.extend_from_slice(module.as_bytes());
        self.0.push(b'\n');
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(b'\n');
    }
    fn str(&mut self, s: &str) {
        self.0.push(b'X'); // BINUNICODE
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }
    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.0.extend_from_slice(&[b'K', v as u8]); // BININT1
        } else if let Ok(v) = i32::try_from(v) {
            self.0.push(b'J'); // BININT
            self.0.extend_from_slice(&v.to_le_bytes());
        } else {
            self.0.extend_from_slice(&[0x8a, 8]); // LONG1, 8 bytes two's complement
            self.0.extend_from_slice(&v.to_le_bytes());
        }
    }
    fn tuple_of(&mut self, v: &[usize]) {
        self.0.push(b'('); // MARK
        for &x in v {
            self.int(x as i64);
        }
        self.0.push(b't'); // TUPLE
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.extend_from_slice(b")R"); // EMPTY_TUPLE, REDUCE
    }
}

/// The `data.pkl` of a state dict whose tensor `i` (in key order) is storage `i`.
fn state_dict_pickle(sd: &ForeignDict) -> Vec<u8> {
    let mut p = Pickle(vec![0x80, 2]); // PROTO 2
    p.ordered_dict();
    p.0.push(b'(');
    for (i, (key, t)) in sd.iter().enumerate() {
        p.str(key);
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.0.push(b'(');
        // The storage's persistent id.
        p.0.push(b'(');
        p.str("storage");
        match t.values {
            Values::F32(_) => p.global("torch", "FloatStorage"),
            Values::I64(_) => p.global("torch", "LongStorage"),
        }
        p.str(&i.to_string());
        p.str("cpu");
        p.int(t.shape.iter().product::<usize>() as i64);
        p.0.extend_from_slice(b"tQ"); // TUPLE, BINPERSID
        p.int(0); // storage offset
        p.tuple_of(&t.shape);
        let mut stride = vec![1usize; t.shape.len()];
        for d in (0..t.shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * t.shape[d + 1];
        }
        p.tuple_of(&stride);
        p.0.push(0x89); // NEWFALSE: requires_grad
        p.ordered_dict(); // backward hooks
        p.0.extend_from_slice(b"tR"); // TUPLE, REDUCE
    }
    p.0.extend_from_slice(b"u."); // SETITEMS, STOP
    p.0
}

/// Writes a PyTorch zip `.pth` holding `sd` into `out`, each tensor's bytes from its own
/// buffer; `folder` is the records' top folder (torch reads any name; `torch.save` to a buffer
/// writes `archive`).
pub fn write_pth<W: Write + std::io::Seek>(out: W, sd: &ForeignDict, folder: &str) -> Result<()> {
    use zip::write::SimpleFileOptions;
    let zerr = |e: zip::result::ZipError| Error::Invalid(format!("cannot write zip: {e}"));
    let mut z = zip::ZipWriter::new(out);
    let opts = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(false);
    let aligned = opts.with_alignment(64);
    let io = |e: std::io::Error| Error::Invalid(format!("cannot write zip: {e}"));
    z.start_file(format!("{folder}/data.pkl"), opts)
        .map_err(zerr)?;
    z.write_all(&state_dict_pickle(sd)).map_err(io)?;
    z.start_file(format!("{folder}/byteorder"), opts)
        .map_err(zerr)?;
    z.write_all(b"little").map_err(io)?;
    for (i, t) in sd.values().enumerate() {
        let bytes = raw(t);
        let o = if bytes.len() as u64 >= u32::MAX as u64 {
            aligned.large_file(true)
        } else {
            aligned
        };
        z.start_file(format!("{folder}/data/{i}"), o)
            .map_err(zerr)?;
        z.write_all(&bytes).map_err(io)?;
    }
    z.start_file(format!("{folder}/version"), opts)
        .map_err(zerr)?;
    z.write_all(b"3\n").map_err(io)?;
    z.finish().map_err(zerr)?.flush().map_err(io)
}

/// Writes `sd` to `path` atomically, as `.pth`/`.pt` or `.safetensors` by its extension.
pub fn write_state_dict(
    path: &Path,
    sd: &ForeignDict,
    meta: &BTreeMap<String, String>,
) -> Result<()> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "pth" | "pt" => crate::helpers::write_atomic_with(path, |tmp| {
            let file = std::io::BufWriter::new(std::fs::File::create(tmp)?);
            write_pth(file, sd, "archive").map_err(|e| std::io::Error::other(e.to_string()))
        }),
        "safetensors" => write_safetensors(path, sd, meta),
        _ => Err(Error::Invalid(format!(
            "{}: a state dict is written as .pth, .pt or .safetensors (by the extension)",
            path.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ForeignDict {
        let mut sd = ForeignDict::new();
        sd.insert(
            "fc.weight".into(),
            ForeignTensor {
                shape: vec![2, 3],
                values: Values::F32(vec![1., 2., 3., 4., 5., 6.]),
            },
        );
        sd.insert(
            "bn.num_batches_tracked".into(),
            ForeignTensor {
                shape: vec![],
                values: Values::I64(vec![7]),
            },
        );
        sd
    }

    #[test]
    fn pth_reads_back_with_the_pytorch_reader() {
        let dir = std::env::temp_dir().join(format!("convlab-pth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.pth");
        write_state_dict(&path, &tiny(), &BTreeMap::new()).unwrap();
        let back = super::super::read_state_dict(&path).unwrap();
        let w = &back.tensors["fc.weight"];
        assert_eq!(w.shape, vec![2, 3]);
        assert_eq!(w.data, vec![1., 2., 3., 4., 5., 6.]);
        // Integer tensors (BN step counters) are read by PyTorch; convlab's reader skips them.
        assert!(!back.tensors.contains_key("bn.num_batches_tracked"));
        // Stored, and each storage 64-byte aligned, as torch writes them.
        let bytes = std::fs::read(&path).unwrap();
        let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
        for i in 0..z.len() {
            let f = z.by_index(i).unwrap();
            assert_eq!(f.compression(), zip::CompressionMethod::Stored);
            let name = f.name().unwrap().to_string();
            if name.contains("/data/") {
                assert_eq!(f.data_start().unwrap() % 64, 0, "{name}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn strides_are_row_major() {
        let p = state_dict_pickle(&tiny());
        // fc.weight [2, 3]: size (2, 3), stride (3, 1) as BININT1 pairs inside MARK..TUPLE.
        let needle = [b'(', b'K', 2, b'K', 3, b't', b'(', b'K', 3, b'K', 1, b't'];
        assert!(p.windows(needle.len()).any(|w| w == needle));
    }
}
