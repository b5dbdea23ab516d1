//! MNIST / Fashion-MNIST IDX files (LeCun's format), gzipped or not.
//!
//! An image file is a big-endian header `0x00000803, N, rows, cols` followed by `N*rows*cols`
//! bytes; a label file is `0x00000801, N` followed by `N` bytes. Debian re-gzips the files, so
//! the gzip magic is checked on the bytes, not the file name.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

use super::dataset::{DataFormat, InMemory, Splits};

/// Fashion-MNIST's class names (Xiao, Rasul & Vollgraf 2017), in label order.
pub const FASHION_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Reads a whole file, un-gzipping it when it starts with the gzip magic.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = read_bounded(path)?;
    decompress_if_gz(raw, path)
}

/// Reads a whole data file, refusing one larger than [`crate::limits::MAX_DATA_FILE_BYTES`]
/// before reading it.
pub fn read_bounded(path: &Path) -> Result<Vec<u8>> {
    let max = crate::limits::MAX_DATA_FILE_BYTES;
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    if len > max {
        return Err(Error::BadData {
            path: path.to_path_buf(),
            reason: format!("{len} bytes; data files are read whole, at most {max} bytes"),
        });
    }
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Un-gzips `raw` if it starts with the gzip magic; `path` is only used in the error message.
pub fn decompress_if_gz(raw: Vec<u8>, path: &Path) -> Result<Vec<u8>> {
    decompress_bounded(raw, path, crate::limits::MAX_DATA_FILE_BYTES)
}

/// [`decompress_if_gz`] with the output bound `max` in bytes: a few KB of gzip can claim
/// gigabytes (a "zip bomb"), so decoding stops one byte past `max`.
fn decompress_bounded(raw: Vec<u8>, path: &Path, max: u64) -> Result<Vec<u8>> {
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .take(max + 1)
            .read_to_end(&mut out)
            .map_err(|e| Error::BadData {
                path: path.to_path_buf(),
                reason: format!("corrupt gzip stream: {e}"),
            })?;
        if out.len() as u64 > max {
            return Err(Error::BadData {
                path: path.to_path_buf(),
                reason: format!("decompresses to more than {max} bytes"),
            });
        }
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Parses an IDX image file: returns `(n, rows, cols, pixels)`.
pub fn parse_images(bytes: &[u8], path: &Path) -> Result<(usize, usize, usize, Vec<u8>)> {
    let bad = |reason: String| Error::BadData {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 16 {
        return Err(bad("too short for an IDX image header".into()));
    }
    let magic = be_u32(bytes, 0);
    if magic != 0x0000_0803 {
        return Err(bad(format!(
            "not an IDX image file (magic {magic:#010x}, expected 0x00000803)"
        )));
    }
    let (n, rows, cols) = (
        be_u32(bytes, 4) as usize,
        be_u32(bytes, 8) as usize,
        be_u32(bytes, 12) as usize,
    );
    if rows == 0 || cols == 0 || rows > 4096 || cols > 4096 {
        return Err(bad(format!(
            "header says images of {rows}x{cols}; IDX images must be 1 to 4096 px a side"
        )));
    }
    // Checked: three 32-bit header fields can multiply past usize.
    let need = n
        .checked_mul(rows * cols)
        .and_then(|p| p.checked_add(16))
        .unwrap_or(usize::MAX);
    if bytes.len() != need {
        return Err(bad(format!(
            "header says {n} images of {rows}x{cols} ({need} bytes) but the file has {} bytes",
            bytes.len()
        )));
    }
    Ok((n, rows, cols, bytes[16..].to_vec()))
}

/// Parses an IDX label file.
pub fn parse_labels(bytes: &[u8], path: &Path) -> Result<Vec<usize>> {
    let bad = |reason: String| Error::BadData {
        path: path.to_path_buf(),
        reason,
    };
    if bytes.len() < 8 {
        return Err(bad("too short for an IDX label header".into()));
    }
    let magic = be_u32(bytes, 0);
    if magic != 0x0000_0801 {
        return Err(bad(format!(
            "not an IDX label file (magic {magic:#010x}, expected 0x00000801)"
        )));
    }
    let n = be_u32(bytes, 4) as usize;
    if bytes.len() != 8 + n {
        return Err(bad(format!(
            "header says {n} labels but the file has {} label bytes",
            bytes.len() - 8
        )));
    }
    Ok(bytes[8..].iter().map(|&b| b as usize).collect())
}

/// Reads an image file and its label file into one in-memory dataset.
pub fn read_pair(images: &Path, labels: &Path) -> Result<InMemory> {
    let (n, rows, cols, pixels) = parse_images(&read_maybe_gz(images)?, images)?;
    let labels_v = parse_labels(&read_maybe_gz(labels)?, labels)?;
    from_parsed(images, labels, (n, rows, cols, pixels), labels_v)
}

/// Checks the parsed halves agree and builds the dataset.
pub fn from_parsed(
    images: &Path,
    labels: &Path,
    (n, rows, cols, pixels): (usize, usize, usize, Vec<u8>),
    labels_v: Vec<usize>,
) -> Result<InMemory> {
    if labels_v.len() != n {
        return Err(Error::BadData {
            path: labels.to_path_buf(),
            reason: format!(
                "{} labels for {n} images in {}",
                labels_v.len(),
                images.display()
            ),
        });
    }
    Ok(InMemory {
        source: images.display().to_string(),
        width: cols,
        height: rows,
        channels: 1,
        pixels,
        labels: labels_v,
    })
}

/// The four files of a split, as `(train_images, train_labels, test_images, test_labels)`.
pub fn find_files(dir: &Path) -> Result<[PathBuf; 4]> {
    let find = |stem: &str| -> Option<PathBuf> {
        [stem.to_string(), format!("{stem}.gz")]
            .into_iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file())
    };
    let names = [
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ];
    let found: Vec<Option<PathBuf>> = names.iter().map(|n| find(n)).collect();
    if found.iter().all(Option::is_some) {
        let v: Vec<PathBuf> = found.into_iter().map(Option::unwrap).collect();
        return Ok([v[0].clone(), v[1].clone(), v[2].clone(), v[3].clone()]);
    }
    let missing: Vec<&str> = names
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|(n, _)| *n)
        .collect();
    Err(Error::BadData {
        path: dir.to_path_buf(),
        reason: format!("missing IDX files: {}", missing.join(", ")),
    })
}

/// Opens an IDX directory: `train-*` is the training split and `t10k-*` the held-out test split.
pub fn open(dir: &Path) -> Result<Splits> {
    let [ti, tl, vi, vl] = find_files(dir)?;
    let train = read_pair(&ti, &tl)?;
    let val = read_pair(&vi, &vl)?;
    if train.width != val.width || train.height != val.height {
        return Err(Error::BadData {
            path: vi.clone(),
            reason: format!(
                "images are {}x{} but the training images in {} are {}x{}",
                val.height,
                val.width,
                ti.display(),
                train.height,
                train.width
            ),
        });
    }
    let n_classes = train
        .labels
        .iter()
        .chain(&val.labels)
        .max()
        .map_or(0, |m| m + 1);
    // Labels are class indices 0..K-1; one stray byte (255) would otherwise make a 256-class
    // model whose classes 10..254 have no image.
    let mut seen = vec![false; n_classes];
    for &l in &train.labels {
        seen[l] = true;
    }
    let empty: Vec<usize> = (0..n_classes).filter(|&c| !seen[c]).collect();
    if !empty.is_empty() {
        let (file, max) = if train.labels.iter().max() == Some(&(n_classes - 1)) {
            (&tl, n_classes - 1)
        } else {
            (&vl, n_classes - 1)
        };
        let shown: Vec<String> = empty.iter().take(8).map(|c| c.to_string()).collect();
        return Err(Error::BadData {
            path: file.clone(),
            reason: format!(
                "labels run up to {max}, but {} of the classes 0..{max} have no training image \
                 ({}{}); IDX labels must be the class indices 0..K-1",
                empty.len(),
                shown.join(", "),
                if empty.len() > 8 { ", ..." } else { "" }
            ),
        });
    }
    let fashion = dir.to_string_lossy().to_lowercase().contains("fashion");
    let classes = (0..n_classes)
        .map(|c| {
            if fashion && n_classes == 10 {
                FASHION_CLASSES[c].to_string()
            } else {
                c.to_string()
            }
        })
        .collect();
    let size = train.width;
    Ok(Splits {
        train: Arc::new(train),
        val: Arc::new(val),
        classes,
        channels: 1,
        native_size: Some(size),
        format: DataFormat::Idx,
        val_name: "test".into(),
        warnings: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_output_is_bounded() {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        e.write_all(&vec![0u8; 1 << 20]).unwrap();
        let gz = e.finish().unwrap();
        assert!(gz.len() < 4096);
        let p = Path::new("bomb.gz");
        let err = decompress_bounded(gz.clone(), p, 1 << 16)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("bomb.gz") && err.contains("more than 65536 bytes"),
            "{err}"
        );
        assert_eq!(decompress_bounded(gz, p, 1 << 20).unwrap().len(), 1 << 20);
    }

    #[test]
    fn huge_headers_are_refused_before_allocating() {
        let p = Path::new("x");
        let mut b = vec![0, 0, 8, 3];
        b.extend(u32::MAX.to_be_bytes());
        b.extend(4096u32.to_be_bytes());
        b.extend(4096u32.to_be_bytes());
        assert!(
            parse_images(&b, p)
                .unwrap_err()
                .to_string()
                .contains("bytes")
        );
        b[8..12].copy_from_slice(&70_000u32.to_be_bytes());
        assert!(
            parse_images(&b, p)
                .unwrap_err()
                .to_string()
                .contains("4096 px")
        );
    }

    #[test]
    fn rejects_wrong_magic_and_length() {
        let p = Path::new("x");
        let mut b = vec![0, 0, 8, 1, 0, 0, 0, 1, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4];
        assert!(
            parse_images(&b, p)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        b[3] = 3;
        assert_eq!(parse_images(&b, p).unwrap().3, vec![1, 2, 3, 4]);
        b.pop();
        assert!(
            parse_images(&b, p)
                .unwrap_err()
                .to_string()
                .contains("bytes")
        );
    }
}
