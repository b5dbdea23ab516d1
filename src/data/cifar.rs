//! CIFAR-10 and CIFAR-100 binary versions (Krizhevsky 2009).
//!
//! CIFAR-10: `data_batch_1.bin` .. `data_batch_5.bin` and `test_batch.bin`, each record one
//! label byte then 3,072 bytes: the 32x32 R plane, then G, then B. CIFAR-100: `train.bin` and
//! `test.bin`, each record a coarse and a fine label byte then the same 3,072 bytes; convlab
//! uses the fine (100-class) label.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

use super::dataset::{DataFormat, InMemory, Splits};

/// The file that marks a CIFAR-10 directory.
pub const CIFAR10_FILES: &[&str] = &["data_batch_1.bin", "test_batch.bin"];
/// The files that mark a CIFAR-100 directory.
pub const CIFAR100_FILES: &[&str] = &["train.bin", "test.bin"];

/// CIFAR-10's class names, in label order.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// `dir` or its usual sub-folder, whichever holds any of `marks`.
pub fn find_dir(dir: &Path, marks: &[&str]) -> Option<PathBuf> {
    [
        dir.to_path_buf(),
        dir.join("cifar-10-batches-bin"),
        dir.join("cifar-100-binary"),
    ]
    .into_iter()
    .find(|d| marks.iter().any(|m| d.join(m).is_file()))
}

/// Parses a file of records: `label_bytes` label bytes (the last one is used) + 3,072 pixels.
/// Returns interleaved `[N, 32, 32, 3]` pixels and labels.
pub fn parse_records(
    bytes: &[u8],
    label_bytes: usize,
    path: &Path,
) -> Result<(Vec<u8>, Vec<usize>)> {
    let rec = label_bytes + 3072;
    if bytes.is_empty() || !bytes.len().is_multiple_of(rec) {
        return Err(Error::BadData {
            path: path.to_path_buf(),
            reason: format!(
                "{} bytes is not a whole number of {rec}-byte CIFAR records",
                bytes.len()
            ),
        });
    }
    let n = bytes.len() / rec;
    let mut pixels = vec![0u8; n * 3072];
    let mut labels = Vec::with_capacity(n);
    for (r, chunk) in bytes.chunks_exact(rec).enumerate() {
        labels.push(chunk[label_bytes - 1] as usize);
        let planes = &chunk[label_bytes..];
        let out = &mut pixels[r * 3072..(r + 1) * 3072];
        for p in 0..1024 {
            out[p * 3] = planes[p];
            out[p * 3 + 1] = planes[1024 + p];
            out[p * 3 + 2] = planes[2048 + p];
        }
    }
    Ok((pixels, labels))
}

fn read_files(files: &[PathBuf], label_bytes: usize) -> Result<InMemory> {
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    for f in files {
        let bytes = super::idx::read_bounded(f)?;
        let (p, l) = parse_records(&bytes, label_bytes, f)?;
        pixels.extend_from_slice(&p);
        labels.extend_from_slice(&l);
    }
    Ok(InMemory {
        source: files
            .first()
            .map(|f| f.display().to_string())
            .unwrap_or_default(),
        width: 32,
        height: 32,
        channels: 3,
        pixels,
        labels,
    })
}

fn class_names(dir: &Path, file: &str, n: usize, default: &[&str]) -> Vec<String> {
    if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
        let names: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        if names.len() >= n {
            return names[..n].to_vec();
        }
    }
    (0..n)
        .map(|c| {
            default
                .get(c)
                .map(|s| s.to_string())
                .unwrap_or_else(|| format!("class_{c}"))
        })
        .collect()
}

/// Opens a CIFAR-10 (`hundred == false`) or CIFAR-100 directory.
pub fn open(dir: &Path, hundred: bool) -> Result<Splits> {
    let marks = if hundred {
        CIFAR100_FILES
    } else {
        CIFAR10_FILES
    };
    let dir = find_dir(dir, marks).ok_or_else(|| Error::BadData {
        path: dir.to_path_buf(),
        reason: format!("no {} found", marks.join(" or ")),
    })?;
    let (train_files, test_files, label_bytes) = if hundred {
        (vec![dir.join("train.bin")], vec![dir.join("test.bin")], 2)
    } else {
        let mut batches: Vec<PathBuf> = (1..=5)
            .map(|i| dir.join(format!("data_batch_{i}.bin")))
            .filter(|p| p.is_file())
            .collect();
        if batches.is_empty() {
            batches.push(dir.join("data_batch_1.bin"));
        }
        (batches, vec![dir.join("test_batch.bin")], 1)
    };
    let train = read_files(&train_files, label_bytes)?;
    let val = read_files(&test_files, label_bytes)?;
    let n = if hundred { 100 } else { 10 };
    if let Some(bad) = train.labels.iter().chain(&val.labels).find(|&&l| l >= n) {
        return Err(Error::BadData {
            path: dir.clone(),
            reason: format!("label {bad} out of range for {n} classes"),
        });
    }
    let classes = if hundred {
        class_names(&dir, "fine_label_names.txt", n, &[])
    } else {
        class_names(&dir, "batches.meta.txt", n, &CIFAR10_CLASSES)
    };
    Ok(Splits {
        train: Arc::new(train),
        val: Arc::new(val),
        classes,
        channels: 3,
        native_size: Some(32),
        format: if hundred {
            DataFormat::Cifar100
        } else {
            DataFormat::Cifar10
        },
        val_name: "test".into(),
        warnings: Vec::new(),
    })
}
