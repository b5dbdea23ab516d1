//! Checkpoints: every tensor of a model (parameters and batch-norm running statistics) keyed by
//! its module path, plus optimiser state and metadata, in one safetensors file.
//!
//! safetensors (the `safetensors` crate, Hugging Face's format) was chosen over Burn's own
//! record format because the files are readable from Python (`safetensors.torch.load_file`),
//! the keys are the layer names that `init_from` and the viewers match on, and the metadata
//! header carries the resume state. Files are written atomically.

use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, SafeTensors, tensor::TensorView};

use crate::error::{Error, Result};
pub use crate::params::{
    HostTensor, TensorMap, load_matching, load_module, load_module_except, module_shapes,
    module_tensors,
};
use crate::run::write_atomic;

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
