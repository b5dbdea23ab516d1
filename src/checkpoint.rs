//! Checkpoints: every tensor of a model (parameters and batch-norm running statistics) keyed by
//! its module path, plus optimiser state and metadata, in one safetensors file.
//!
//! safetensors (the `safetensors` crate, Hugging Face's format) was chosen over Burn's own
//! record format because the files are readable from Python (`safetensors.torch.load_file`),
//! the keys are the layer names that `init_from` and the viewers match on, and the metadata
//! header carries the resume state. Files are written atomically.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use safetensors::{Dtype, tensor::TensorInfo};

use crate::error::{Error, Result};
use crate::helpers::{SafetensorsFile, le_bytes, write_safetensors};
pub use crate::params::{
    DeviceMap, DeviceTensor, HostTensor, TensorMap, load_matching, load_module, load_module_except,
    module_device_tensors, module_shapes, module_tensors,
};

/// The layout version written into every checkpoint's metadata (`convlab_checkpoint_format`).
/// Files from before it was recorded have the same layout as version 1 and still load; a file
/// from a newer convlab is refused with a message rather than misread.
pub const FORMAT_VERSION: u32 = 1;
const FORMAT_KEY: &str = "convlab_checkpoint_format";

/// One tensor given to [`save_entries`]: host values, or a tensor still on its device, which
/// is copied to the host only when the file reaches it.
pub enum Entry<'a> {
    Host(&'a HostTensor),
    Device(&'a DeviceTensor),
}

/// The entries of `map` under `prefix/`.
pub fn entries<'a>(prefix: &str, map: &'a TensorMap) -> Vec<(String, Entry<'a>)> {
    map.iter()
        .map(|(k, t)| (format!("{prefix}/{k}"), Entry::Host(t)))
        .collect()
}

/// The entries of `map` under `prefix/`.
pub fn device_entries<'a>(prefix: &str, map: &'a DeviceMap) -> Vec<(String, Entry<'a>)> {
    map.iter()
        .map(|(k, t)| (format!("{prefix}/{k}"), Entry::Device(t)))
        .collect()
}

impl safetensors::View for Entry<'_> {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }

    fn shape(&self) -> &[usize] {
        match self {
            Entry::Host(t) => &t.shape,
            Entry::Device(t) => &t.shape,
        }
    }

    /// Called once per tensor, in file order, and dropped once written (the `safetensors`
    /// crate's `serialize_to_file`): one device tensor's host copy is alive at a time.
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            Entry::Host(t) => le_bytes(&t.data),
            Entry::Device(t) => Cow::Owned(t.le_bytes()),
        }
    }

    fn data_len(&self) -> usize {
        4 * self.shape().iter().product::<usize>()
    }
}

/// Writes tensor groups (`prefix/name` keys) and string metadata to `path` atomically, streamed
/// from the tensors' own buffers ([`write_safetensors`]).
pub fn save(
    path: &Path,
    groups: &[(&str, &TensorMap)],
    meta: HashMap<String, String>,
) -> Result<()> {
    let all = groups.iter().flat_map(|(p, m)| entries(p, m)).collect();
    save_entries(path, all, meta)
}

/// [`save`] of entries on the host or on a device (a training run's model, optimiser state and
/// averages): a VGG-16 run's checkpoint had held host copies of all three at once.
pub fn save_entries(
    path: &Path,
    entries: Vec<(String, Entry<'_>)>,
    mut meta: HashMap<String, String>,
) -> Result<()> {
    meta.insert(FORMAT_KEY.into(), FORMAT_VERSION.to_string());
    write_safetensors(path, entries, meta)
}

/// A loaded checkpoint: tensor groups by prefix, and metadata.
pub struct Checkpoint {
    pub groups: HashMap<String, TensorMap>,
    pub meta: HashMap<String, String>,
}

impl Checkpoint {
    /// Takes the tensors under `prefix` out of the checkpoint (empty if there are none):
    /// moved, not copied, so a VGG's 0.5 GB group is never held twice while it is loaded.
    pub fn take(&mut self, prefix: &str) -> TensorMap {
        self.groups.remove(prefix).unwrap_or_default()
    }
}

/// A checkpoint file opened with its header read and checked, whose tensor groups are read
/// one at a time when asked for: evaluating a run reads its weights only, not the optimiser's
/// state or the other copy of the weights beside the averaged ones.
pub struct CheckpointFile {
    file: SafetensorsFile,
}

/// Opens a checkpoint written by [`save`]: a readable safetensors header, every tensor `F32`,
/// and a format version this convlab reads.
pub fn open(path: &Path) -> Result<CheckpointFile> {
    let file = SafetensorsFile::open(path)?;
    let bad = |reason: String| Error::BadData {
        path: path.to_path_buf(),
        reason: format!("not a readable checkpoint: {reason}"),
    };
    if let Some(v) = file.metadata().get(FORMAT_KEY) {
        match v.parse::<u32>() {
            Ok(n) if n <= FORMAT_VERSION => {}
            Ok(n) => {
                return Err(bad(format!(
                    "checkpoint format {n} is newer than this convlab reads ({FORMAT_VERSION}); \
                     use a newer convlab"
                )));
            }
            Err(_) => {
                return Err(bad(format!(
                    "`{FORMAT_KEY}` is `{v}`, not a version number"
                )));
            }
        }
    }
    if let Some((name, info)) = file.tensors().iter().find(|(_, i)| i.dtype != Dtype::F32) {
        return Err(bad(format!(
            "tensor `{name}` is {:?}, expected F32",
            info.dtype
        )));
    }
    Ok(CheckpointFile { file })
}

/// The group and name of a stored tensor (`model/fc.weight`); keys without a group are the
/// model's.
fn split(name: &str) -> (&str, &str) {
    name.split_once('/').unwrap_or(("model", name))
}

impl CheckpointFile {
    pub fn meta(&self) -> &HashMap<String, String> {
        self.file.metadata()
    }

    /// Whether the file holds tensors under `prefix`.
    pub fn has(&self, prefix: &str) -> bool {
        self.file
            .tensors()
            .iter()
            .any(|(n, _)| split(n).0 == prefix)
    }

    /// The tensors under `prefix` (empty if there are none), read from the file now.
    pub fn read(&mut self, prefix: &str) -> Result<TensorMap> {
        let wanted: Vec<(String, TensorInfo)> = self
            .file
            .tensors()
            .iter()
            .filter(|(n, _)| split(n).0 == prefix)
            .cloned()
            .collect();
        let mut out = TensorMap::new();
        for (name, info) in wanted {
            let data = self.file.read_f32(&info)?;
            out.insert(
                split(&name).1.to_string(),
                HostTensor {
                    shape: info.shape,
                    data,
                },
            );
        }
        Ok(out)
    }

    /// The weights a run is evaluated with: its averaged (EMA) weights when it kept them, else
    /// its weights. Checkpoints before 2026-12-06 stored the averages flattened (`[n]`); such
    /// a tensor takes the shape of the raw weight of the same name, as the model needs it.
    pub fn read_weights(&mut self) -> Result<TensorMap> {
        if !self.has("ema") {
            return self.read("model");
        }
        let shapes: HashMap<String, Vec<usize>> = self
            .file
            .tensors()
            .iter()
            .filter(|(n, _)| split(n).0 == "model")
            .map(|(n, i)| (split(n).1.to_string(), i.shape.clone()))
            .collect();
        let mut ema = self.read("ema")?;
        for (k, t) in ema.iter_mut() {
            if let Some(s) = shapes.get(k)
                && t.shape.len() == 1
                && s.iter().product::<usize>() == t.data.len()
            {
                t.shape = s.clone();
            }
        }
        Ok(ema)
    }
}

/// Reads every group of a checkpoint written by [`save`].
pub fn load(path: &Path) -> Result<Checkpoint> {
    let mut file = open(path)?;
    let prefixes: std::collections::BTreeSet<String> = file
        .file
        .tensors()
        .iter()
        .map(|(n, _)| split(n).0.to_string())
        .collect();
    let mut groups: HashMap<String, TensorMap> = HashMap::new();
    for p in prefixes {
        let g = file.read(&p)?;
        groups.insert(p, g);
    }
    Ok(Checkpoint {
        groups,
        meta: file.meta().clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one() -> TensorMap {
        TensorMap::from([(
            "fc.weight".to_string(),
            HostTensor {
                shape: vec![2],
                data: vec![1.0, 2.0],
            },
        )])
    }

    #[test]
    fn streamed_tensors_read_back_bit_for_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        // Values whose bytes would show a wrong byte order or a lost sign, in two groups and
        // three shapes (an empty tensor too).
        let odd = [-0.0f32, f32::MIN_POSITIVE, 1.0e-40, -3.5, f32::MAX, 0.1];
        let model: TensorMap = TensorMap::from([
            (
                "conv.weight".to_string(),
                HostTensor {
                    shape: vec![1, 2, 3],
                    data: odd.to_vec(),
                },
            ),
            (
                "bn.running_mean".to_string(),
                HostTensor {
                    shape: vec![0],
                    data: vec![],
                },
            ),
        ]);
        let optim = one();
        save(
            &path,
            &[("model", &model), ("optim", &optim)],
            HashMap::new(),
        )
        .unwrap();
        let mut ck = load(&path).unwrap();
        let bits = |m: &TensorMap| -> Vec<(String, Vec<usize>, Vec<u32>)> {
            m.iter()
                .map(|(k, t)| {
                    (
                        k.clone(),
                        t.shape.clone(),
                        t.data.iter().map(|v| v.to_bits()).collect(),
                    )
                })
                .collect()
        };
        assert_eq!(bits(&ck.take("model")), bits(&model));
        assert_eq!(bits(&ck.take("optim")), bits(&optim));
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        // Readable as the run's other files are, not only by its owner.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            let plain = dir.path().join("plain");
            std::fs::File::create(&plain).unwrap();
            assert_eq!(mode(&path), mode(&plain));
        }
    }

    #[test]
    fn the_same_state_gives_the_same_file() {
        let dir = tempfile::tempdir().unwrap();
        let meta = || -> HashMap<String, String> {
            (0..12)
                .map(|i| (format!("key{i}"), format!("value {i}")))
                .collect()
        };
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        save(&a, &[("model", &one())], meta()).unwrap();
        // Another map of the same entries, built with other hash keys: another iteration order.
        save(&b, &[("model", &one())], meta()).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        let mut ck = load(&a).unwrap();
        assert_eq!(ck.meta["key7"], "value 7");
        assert_eq!(ck.meta.len(), 13);
        assert_eq!(ck.take("model"), one());
    }

    #[test]
    fn weights_are_the_averages_when_kept_and_flattened_ones_take_the_model_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("last.safetensors");
        let model = TensorMap::from([(
            "fc.weight".to_string(),
            HostTensor {
                shape: vec![2, 2],
                data: vec![1.0, 2.0, 3.0, 4.0],
            },
        )]);
        let with = |shape: Vec<usize>| {
            TensorMap::from([(
                "fc.weight".to_string(),
                HostTensor {
                    shape,
                    data: vec![5.0, 6.0, 7.0, 8.0],
                },
            )])
        };
        let optim = one();
        save(
            &path,
            &[("model", &model), ("optim", &optim)],
            HashMap::new(),
        )
        .unwrap();
        let mut f = open(&path).unwrap();
        assert!(f.has("optim") && !f.has("ema"));
        assert_eq!(f.read_weights().unwrap(), model);
        assert_eq!(f.read("optim").unwrap(), optim);
        assert!(f.read("ema").unwrap().is_empty());
        // Averages as written now, and flattened as before 2026-12-06: both in the model shape.
        for ema in [with(vec![2, 2]), with(vec![4])] {
            save(&path, &[("model", &model), ("ema", &ema)], HashMap::new()).unwrap();
            assert_eq!(
                open(&path).unwrap().read_weights().unwrap(),
                with(vec![2, 2])
            );
        }
        // A flat tensor of another size is left as it is, for the model to refuse by name.
        let odd = TensorMap::from([(
            "fc.weight".to_string(),
            HostTensor {
                shape: vec![3],
                data: vec![0.0; 3],
            },
        )]);
        save(&path, &[("model", &model), ("ema", &odd)], HashMap::new()).unwrap();
        assert_eq!(open(&path).unwrap().read_weights().unwrap(), odd);
    }

    #[test]
    fn format_version_is_written_checked_and_optional() {
        let dir = std::env::temp_dir().join(format!("convlab-ck-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.safetensors");
        save(&path, &[("model", &one())], HashMap::new()).unwrap();
        let mut ck = load(&path).unwrap();
        assert_eq!(ck.meta[FORMAT_KEY], FORMAT_VERSION.to_string());
        assert_eq!(ck.take("model"), one());
        // A file from before the version was recorded (same layout) still loads.
        let raw: Vec<u8> = [1f32, 2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        let write = |meta: Option<HashMap<String, String>>| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![2], &raw).unwrap();
            let bytes = safetensors::serialize(vec![("model/fc.weight", view)], meta).unwrap();
            std::fs::write(&path, bytes).unwrap();
        };
        write(None);
        assert_eq!(load(&path).unwrap().take("model"), one());
        // A newer format, or a garbled one, is refused by name.
        write(Some(HashMap::from([(FORMAT_KEY.into(), "99".into())])));
        let err = load(&path).err().unwrap().to_string();
        assert!(
            err.contains("format 99") && err.contains("a.safetensors"),
            "{err}"
        );
        write(Some(HashMap::from([(FORMAT_KEY.into(), "x".into())])));
        assert!(load(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
