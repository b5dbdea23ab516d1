//! Shared helpers every layer may use (the bottom of the layering: it imports nothing of
//! convlab's but the error type).

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Writes `bytes` to `path` atomically (temporary file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)
    })
}

/// The temporary name [`write_atomic_with`] writes `path` under: hidden, beside it (so the
/// rename stays on one file system), and per process.
fn temporary(path: &Path) -> std::path::PathBuf {
    let dir = path.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|s| s.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ))
}

/// Has `write` create and fill a temporary file beside `path`, then fsyncs it and renames it
/// over `path`: a reader (or a resumed run after a kill) sees the old file or the new one,
/// never part of one. On any error the temporary file is removed and `path` is untouched.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = temporary(path);
    // A temporary name left by a killed process with the same pid may be a hard link to a
    // checkpoint ([`link_atomic`]); creating over it would truncate that checkpoint's data, so
    // the name is unlinked first and `write` always starts a new file.
    let _ = std::fs::remove_file(&tmp);
    let res = (|| -> std::io::Result<()> {
        write(&tmp)?;
        // Opened for writing: Windows flushes only a handle with write access.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)?
            .sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// Makes `path` a second name of the complete file `from` (a hard link, atomically replacing
/// `path`), or an atomic copy where the file system has no hard links. Because every write
/// here replaces a file by renaming a new one over it, rewriting `from` later leaves `path`
/// with the old contents: the two names share data only until one is written again.
pub fn link_atomic(from: &Path, path: &Path) -> Result<()> {
    let tmp = temporary(path);
    let _ = std::fs::remove_file(&tmp);
    if std::fs::hard_link(from, &tmp).is_ok() {
        return std::fs::rename(&tmp, path).map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::io(path, e)
        });
    }
    write_atomic_with(path, |tmp| std::fs::copy(from, tmp).map(|_| ()))
}

/// `values` as safetensors and PyTorch store them (little-endian): the buffer itself on a
/// little-endian CPU, a converted copy elsewhere.
pub fn le_bytes<T: bytemuck::Pod>(values: &[T]) -> std::borrow::Cow<'_, [u8]> {
    if cfg!(target_endian = "little") {
        std::borrow::Cow::Borrowed(bytemuck::cast_slice(values))
    } else {
        let width = std::mem::size_of::<T>();
        let mut bytes = bytemuck::cast_slice::<T, u8>(values).to_vec();
        bytes.chunks_mut(width).for_each(<[u8]>::reverse);
        std::borrow::Cow::Owned(bytes)
    }
}

/// Writes a safetensors file of `views` and `meta` to `path` atomically, streamed from the
/// views' own buffers (`safetensors::serialize_to_file`): building the file in memory first had
/// held two more copies of every tensor (their bytes and the serialised file), and a VGG-11
/// run's peak memory went from 4.1 to 2.5 GB without them (BENCHMARKS.md "Saving a checkpoint").
pub fn write_safetensors<V: safetensors::View>(
    path: &Path,
    views: Vec<(String, V)>,
    meta: std::collections::HashMap<String, String>,
) -> Result<()> {
    write_atomic_with(path, |tmp| {
        // The crate writes through a temporary file of its own, created 0600, and renames it
        // to `tmp`; the file keeps the permissions a plain `File::create` gives (the user's
        // umask), as every other file convlab writes.
        let permissions = std::fs::File::create(tmp)?.metadata()?.permissions();
        let sorted: std::collections::BTreeMap<String, String> = meta.clone().into_iter().collect();
        safetensors::serialize_to_file(views, Some(meta), tmp).map_err(std::io::Error::other)?;
        sort_metadata(tmp, &sorted)?;
        std::fs::set_permissions(tmp, permissions)
    })
}

/// Rewrites the `__metadata__` object at the start of the safetensors header in `tmp` with its
/// keys sorted. The crate writes the map in `HashMap` order, which changes from process to
/// process, so saving the same run twice gave files that differed in their first bytes. The
/// sorted object has the same entries, so the same length, and replaces the crate's in place;
/// a header laid out otherwise (another crate version) is left as the crate wrote it.
fn sort_metadata(
    tmp: &Path,
    meta: &std::collections::BTreeMap<String, String>,
) -> std::io::Result<()> {
    use std::io::{Read, Seek, SeekFrom};
    const PREFIX: &[u8] = b"{\"__metadata__\":";
    let sorted = serde_json::to_vec(meta)?;
    let at = 8 + PREFIX.len();
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(tmp)?;
    let mut head = vec![0u8; at + sorted.len()];
    if f.read_exact(&mut head).is_err() || &head[8..at] != PREFIX {
        return Ok(());
    }
    let written: Option<std::collections::BTreeMap<String, String>> =
        serde_json::from_slice(&head[at..]).ok();
    if written.as_ref() != Some(meta) {
        return Ok(());
    }
    f.seek(SeekFrom::Start(at as u64))?;
    f.write_all(&sorted)
}

/// Largest safetensors header read (the `safetensors` crate's own limit): the length comes
/// from the file, so it is bounded before anything of that size is allocated.
const MAX_SAFETENSORS_HEADER: u64 = 100 << 20;

/// A safetensors file opened for reading one tensor at a time: the header is parsed and
/// validated (by the `safetensors` crate's `Metadata`: offsets contiguous, sizes matching
/// shapes and dtypes) and checked against the file's length, but no tensor is read until asked
/// for. Reading the whole file first (`SafeTensors::deserialize` on a buffer) held every byte
/// of it, the optimiser's state too, while the wanted weights were converted.
pub struct SafetensorsFile {
    path: std::path::PathBuf,
    file: std::fs::File,
    /// Where the tensor data starts: after the 8-byte length and the header.
    data_start: u64,
    meta: std::collections::HashMap<String, String>,
    /// Every tensor, in file order.
    tensors: Vec<(String, safetensors::tensor::TensorInfo)>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        use std::io::Read;
        let bad = |reason: String| Error::BadData {
            path: path.to_path_buf(),
            reason: format!("not a readable safetensors file: {reason}"),
        };
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n).map_err(|_| {
            bad(format!(
                "{len} bytes, shorter than the 8-byte header length"
            ))
        })?;
        let n = u64::from_le_bytes(n);
        if n > MAX_SAFETENSORS_HEADER || n > len.saturating_sub(8) {
            return Err(bad(format!(
                "header of {n} bytes in a file of {len} (at most {MAX_SAFETENSORS_HEADER})"
            )));
        }
        let mut header = vec![0u8; n as usize];
        file.read_exact(&mut header)
            .map_err(|e| Error::io(path, e))?;
        let metadata: safetensors::tensor::Metadata =
            serde_json::from_slice(&header).map_err(|e| bad(e.to_string()))?;
        let data_start = 8 + n;
        if data_start + metadata.data_len() as u64 != len {
            return Err(bad(format!(
                "the header describes {} bytes of tensors, the file holds {}",
                metadata.data_len(),
                len - data_start
            )));
        }
        let mut tensors: Vec<_> = metadata
            .tensors()
            .into_iter()
            .map(|(k, info)| (k, info.clone()))
            .collect();
        tensors.sort_by_key(|(_, info)| info.data_offsets);
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            file,
            data_start,
            meta: metadata.metadata().clone().unwrap_or_default(),
            tensors,
        })
    }

    /// The `__metadata__` strings.
    pub fn metadata(&self) -> &std::collections::HashMap<String, String> {
        &self.meta
    }

    /// Every tensor's name and dtype, shape and offsets, in file order.
    pub fn tensors(&self) -> &[(String, safetensors::tensor::TensorInfo)] {
        &self.tensors
    }

    /// The little-endian bytes of one tensor, sized by the validated header.
    pub fn read_bytes(&mut self, info: &safetensors::tensor::TensorInfo) -> Result<Vec<u8>> {
        let (s, e) = info.data_offsets;
        let mut out = vec![0u8; e - s];
        self.read_into(s, &mut out)?;
        Ok(out)
    }

    /// One `F32` tensor's values, read straight into the returned vector (no byte copy).
    pub fn read_f32(&mut self, info: &safetensors::tensor::TensorInfo) -> Result<Vec<f32>> {
        let (s, e) = info.data_offsets;
        if info.dtype != safetensors::Dtype::F32 || (e - s) % 4 != 0 {
            return Err(Error::BadData {
                path: self.path.clone(),
                reason: format!("a tensor is {:?}, expected F32", info.dtype),
            });
        }
        let mut out = vec![0f32; (e - s) / 4];
        self.read_into(s, bytemuck::cast_slice_mut(&mut out))?;
        if cfg!(target_endian = "big") {
            out.iter_mut()
                .for_each(|v| *v = f32::from_bits(u32::from_le(v.to_bits())));
        }
        Ok(out)
    }

    fn read_into(&mut self, offset: usize, out: &mut [u8]) -> Result<()> {
        use std::io::{Read, Seek, SeekFrom};
        let path = &self.path;
        self.file
            .seek(SeekFrom::Start(self.data_start + offset as u64))
            .and_then(|_| self.file.read_exact(out))
            .map_err(|e| Error::io(path, e))
    }
}

/// Host copy of a tensor's values (row-major).
pub fn host<const D: usize>(t: burn::prelude::Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 tensor")
}

/// Hands a flat tensor's values to `f` a slice of at most `slice` at a time, copied from the
/// device slice by slice: a writer that streams a large weight (VGG-16's `fc6` is 411 MB) never
/// holds a whole host copy of it beside the device's.
pub fn for_each_host_slice(t: &burn::prelude::Tensor<1>, slice: usize, mut f: impl FnMut(&[f32])) {
    let n = t.dims()[0];
    for start in (0..n).step_by(slice.max(1)) {
        let len = slice.max(1).min(n - start);
        f(&host(t.clone().narrow(0, start, len)));
    }
}

/// The bytes an unprivileged writer may still put on the filesystem that holds `path`
/// (`statvfs`'s `f_bavail * f_frsize`, through rustix), or `None` where the system cannot say.
/// A quota below that is not seen; [`allocation_refused`] sees it.
pub fn free_bytes(path: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        let s = rustix::fs::statvfs(path).ok()?;
        Some(s.f_bavail.saturating_mul(s.f_frsize))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// Whether the filesystem holding the folder `dir` refuses this process `bytes` more now: a
/// file of that size is allocated in `dir` (`fallocate`, which reserves the blocks without
/// writing them, and counts against quotas as a write would) and removed at once. It sees what
/// [`free_bytes`] does not: a user, group or project quota, a file-size limit (`ulimit -f`).
/// `Some(refusal)` (`EDQUOT`, `ENOSPC`, `EFBIG`, ...); `None` when it was allocated, or where
/// the filesystem cannot allocate ahead (`EOPNOTSUPP`: some network and FUSE filesystems) or
/// the system is not Linux, so that nothing is refused on a guess.
pub fn allocation_refused(dir: &Path, bytes: u64) -> Option<std::io::Error> {
    #[cfg(target_os = "linux")]
    {
        use rustix::io::Errno;
        let path = dir.join(".space-probe");
        let file = match std::fs::File::create(&path) {
            Ok(f) => f,
            Err(e) => return Some(e),
        };
        // Unlinked before the allocation, so that its blocks go back when the file is closed,
        // even by a kill in between: no stray gigabytes in the run folder.
        let _ = std::fs::remove_file(&path);
        let result =
            rustix::fs::fallocate(&file, rustix::fs::FallocateFlags::empty(), 0, bytes.max(1));
        drop(file);
        match result {
            Ok(()) => None,
            Err(e) if [Errno::OPNOTSUPP, Errno::NOSYS].contains(&e) => None,
            Err(e) => Some(e.into()),
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (dir, bytes);
        None
    }
}

/// A byte count for people: `812 MB`, `1.07 GB` (powers of 1000, as `df -H`).
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2} GB", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{} MB", n / 1_000_000),
        n => format!("{} kB", n.div_ceil(1000)),
    }
}

/// Mixes several integers into one well-spread 64-bit seed (splitmix64 finaliser), so that
/// per-sample random streams for `(seed, epoch, index)` never collide in practice.
pub fn mix_seed(parts: &[u64]) -> u64 {
    let mut h: u64 = 0x9E37_79B9_7F4A_7C15;
    for &p in parts {
        h ^= p
            .wrapping_add(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(h << 6)
            .wrapping_add(h >> 2);
        h = (h ^ (h >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        h = (h ^ (h >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h ^= h >> 31;
    }
    h
}

/// The named random streams of a run, each a seed derived from the recipe's `seed`: one place
/// lists every salt, so two streams can never share one by accident and a resumed run redraws
/// exactly what an uninterrupted one would (each stream depends on the epoch or step only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// The model's initial weights (the device generator before `build`).
    ModelInit,
    /// Dropout masks and other device draws of one epoch.
    Dropout { epoch: usize },
    /// The mixup / CutMix draw of one optimiser step (global step index).
    Mix { step: usize },
    /// The order of the training samples in one epoch (epoch from 0).
    Shuffle { epoch: usize },
    /// The augmentation of sample `sample` (its dataset index) in epoch `epoch` (from 0).
    Augment { epoch: usize, sample: usize },
    /// The class-balanced draws of one epoch (`data.sampler = "balanced"`).
    BalancedDraws { epoch: usize },
    /// The augmentation of the `draw`-th sample drawn in epoch `epoch` when samples are drawn
    /// with replacement: an image drawn twice gets two augmentations.
    AugmentDraw { epoch: usize, draw: usize },
    /// The shuffled members of class `class` when splitting off a validation set.
    Split { class: usize },
}

impl Stream {
    /// The seed of this stream for a run seeded with `seed` (the values predate the names, so
    /// runs made before them draw the same numbers).
    pub fn seed(self, seed: u64) -> u64 {
        match self {
            Stream::ModelInit => mix_seed(&[seed, 0xC0FFEE]),
            Stream::Dropout { epoch } => mix_seed(&[seed, epoch as u64, 0xD0]),
            Stream::Mix { step } => mix_seed(&[seed, step as u64, 0x313]),
            Stream::Shuffle { epoch } => mix_seed(&[seed, epoch as u64, 1]),
            Stream::Augment { epoch, sample } => mix_seed(&[seed, epoch as u64, sample as u64]),
            Stream::BalancedDraws { epoch } => mix_seed(&[seed, epoch as u64, 0xBA1, 0]),
            Stream::AugmentDraw { epoch, draw } => {
                mix_seed(&[seed, epoch as u64, draw as u64, 0xD2A])
            }
            Stream::Split { class } => mix_seed(&[seed, class as u64]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_linked_name_keeps_its_contents_when_the_first_is_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("last"), dir.path().join("best"));
        write_atomic(&b, b"older best").unwrap();
        write_atomic(&a, b"epoch 3").unwrap();
        link_atomic(&a, &b).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"epoch 3");
        // The next epoch rewrites `last` only; `best` keeps epoch 3.
        write_atomic(&a, b"epoch 4").unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"epoch 4");
        assert_eq!(std::fs::read(&b).unwrap(), b"epoch 3");
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn a_stale_temporary_link_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let (last, best) = (dir.path().join("last"), dir.path().join("best"));
        write_atomic(&last, b"epoch 3").unwrap();
        // What a process killed between link and rename leaves: `best`'s temporary name as a
        // second name of `last`, under this pid.
        std::fs::hard_link(&last, temporary(&best)).unwrap();
        write_atomic(&best, b"epoch 4").unwrap();
        assert_eq!(std::fs::read(&best).unwrap(), b"epoch 4");
        assert_eq!(std::fs::read(&last).unwrap(), b"epoch 3");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }

    #[test]
    fn failed_writes_and_links_leave_the_old_file_and_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("best");
        write_atomic(&p, b"kept").unwrap();
        let e = write_atomic_with(&p, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err(std::io::Error::other("disk full"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("best"), "{e}");
        let e = link_atomic(&dir.path().join("missing"), &p).unwrap_err();
        assert!(e.to_string().contains("best"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"kept");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_safetensors_file_is_read_tensor_by_tensor_and_damage_is_named() {
        use safetensors::{Dtype, tensor::TensorView};
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("w.safetensors");
        let (a, b) = ([1.5f32, -2.0, 3.25], [7u16, 9]);
        let (ab, bb) = (le_bytes(&a), le_bytes(&b));
        let views = vec![
            (
                "a".to_string(),
                TensorView::new(Dtype::F32, vec![3, 1], &ab).unwrap(),
            ),
            (
                "b".to_string(),
                TensorView::new(Dtype::BF16, vec![2], &bb).unwrap(),
            ),
        ];
        let meta = std::collections::HashMap::from([("k".to_string(), "v".to_string())]);
        write_safetensors(&p, views, meta).unwrap();
        let mut f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.metadata()["k"], "v");
        let infos = f.tensors().to_vec();
        let names: Vec<&str> = infos.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        // Read out of file order: each read seeks to its own tensor.
        assert_eq!(f.read_bytes(&infos[1].1).unwrap(), le_bytes(&b).to_vec());
        assert_eq!(f.read_f32(&infos[0].1).unwrap(), a);
        assert!(f.read_f32(&infos[1].1).is_err());

        let full = std::fs::read(&p).unwrap();
        let reason = |bytes: &[u8]| {
            std::fs::write(&p, bytes).unwrap();
            let e = SafetensorsFile::open(&p)
                .err()
                .expect("refused")
                .to_string();
            assert!(e.contains("w.safetensors"), "{e}");
            e
        };
        // Cut short, in the length, in the header, in the data; one byte too many.
        assert!(reason(&full[..5]).contains("8-byte"));
        assert!(reason(&full[..20]).contains("header of"));
        assert!(reason(&full[..full.len() - 1]).contains("bytes of tensors"));
        let mut long = full.clone();
        long.push(0);
        assert!(reason(&long).contains("bytes of tensors"));
        // A header length of 2^63: refused before anything of that size is allocated.
        let mut huge = full.clone();
        huge[..8].copy_from_slice(&(1u64 << 63).to_le_bytes());
        assert!(reason(&huge).contains("at most"));
        // Offsets that do not match the shapes.
        let text = String::from_utf8_lossy(&full).replace("[3,1]", "[4,1]");
        reason(text.as_bytes());
    }
}
