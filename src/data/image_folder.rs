//! ImageFolder: `root/<class>/<image>`, as torchvision's `ImageFolder`; with `root/train/` and
//! `root/val/` (or `root/test/`) when the data comes pre-split. Images are decoded lazily on the
//! loader's worker threads, so a dataset larger than memory streams from disk.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

use super::dataset::{DataFormat, DataSpec, Dataset, RawImage, Splits, split_one};

/// File extensions read as images (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff"];

/// A list of image files with their class indices.
pub struct ImageFolder {
    pub files: Vec<PathBuf>,
    pub labels: Vec<usize>,
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn label(&self, index: usize) -> usize {
        self.labels[index]
    }
    fn image(&self, index: usize, channels: usize) -> Result<RawImage> {
        decode_file(&self.files[index], channels)
    }
    fn describe(&self, index: usize) -> String {
        self.files[index].display().to_string()
    }
    fn mode(&self, index: usize) -> Option<&'static str> {
        stored_mode(std::fs::read(&self.files[index]).ok()?)
    }
}

/// The colour mode an image file was stored in (`data stats`' "modes"): "grey", "grey16",
/// "grey+alpha", "rgb", "rgb16", "rgba", "palette", "cmyk" or "other"; `None` for a file no
/// decoder reads. Only the headers are parsed.
pub fn stored_mode(bytes: Vec<u8>) -> Option<&'static str> {
    use image::ImageDecoder;
    // The `image` crate's PNG and JPEG decoders report the colour type they expand to (a
    // palette to RGB, CMYK to RGB), so those two ask their own crates' header readers first.
    match image::guess_format(&bytes).ok()? {
        image::ImageFormat::Png => {
            let png = png::Decoder::new(std::io::Cursor::new(&bytes[..]))
                .read_info()
                .ok()?;
            if png.info().color_type == png::ColorType::Indexed {
                return Some("palette");
            }
        }
        image::ImageFormat::Jpeg => {
            use zune_core::colorspace::ColorSpace;
            let mut jpeg = zune_jpeg::JpegDecoder::new(zune_core::bytestream::ZCursor::new(&bytes));
            jpeg.decode_headers().ok()?;
            if matches!(
                jpeg.input_colorspace(),
                Some(ColorSpace::CMYK | ColorSpace::YCCK)
            ) {
                return Some("cmyk");
            }
        }
        _ => {}
    }
    // The same reader type as `decode_file`'s: each reader type instantiates every decoder
    // the `image` crate has once more in convlab's build.
    let dec = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .ok()?
        .into_decoder()
        .ok()?;
    Some(match dec.original_color_type() {
        image::ExtendedColorType::L1
        | image::ExtendedColorType::L2
        | image::ExtendedColorType::L4
        | image::ExtendedColorType::L8 => "grey",
        image::ExtendedColorType::L16 => "grey16",
        image::ExtendedColorType::La8 | image::ExtendedColorType::La16 => "grey+alpha",
        image::ExtendedColorType::Rgb8 => "rgb",
        image::ExtendedColorType::Rgb16 => "rgb16",
        image::ExtendedColorType::Rgba8 | image::ExtendedColorType::Rgba16 => "rgba",
        image::ExtendedColorType::Cmyk8 => "cmyk",
        image::ExtendedColorType::Unknown(_) => "palette",
        _ => "other",
    })
}

/// Decodes one image file of any supported mode into 8-bit grey or RGB.
pub fn decode_file(path: &Path, channels: usize) -> Result<RawImage> {
    let bad = |reason: String| Error::BadImage {
        path: path.to_path_buf(),
        reason,
    };
    // One read of the whole file: small images (CIFAR's are ~1 KB) would otherwise cost more
    // in buffered-read system calls than in decoding.
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    // A header may claim any size; the decoder refuses past these before allocating.
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(crate::limits::MAX_DECODED_SIDE);
    limits.max_image_height = Some(crate::limits::MAX_DECODED_SIDE);
    limits.max_alloc = Some(crate::limits::MAX_DECODED_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| bad(e.to_string()))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(bad("image has zero size".into()));
    }
    Ok(RawImage::from_dynamic(img, channels))
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok())
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    v.sort();
    Ok(v)
}

/// Class sub-folders of `dir`, sorted by name.
pub fn class_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_dir())
        .collect())
}

/// A walk over folders of images that follows symlinked folders once: a folder reached again
/// (a cycle such as `cat/loop -> .`, or two links to one folder) and a file reached twice are
/// skipped and counted, for [`Walk::warnings`].
#[derive(Default)]
struct Walk {
    seen_dirs: std::collections::HashSet<PathBuf>,
    seen_files: std::collections::HashSet<PathBuf>,
    cycles: Vec<String>,
    twice: usize,
}

impl Walk {
    /// Calls `found` with every image file under `top` (depth first, hidden entries skipped:
    /// a folder's files in name order, then its sub-folders, the last-named first, the order
    /// ImageFolder runs have always listed their files in), stopping at its first error.
    fn images(&mut self, top: &Path, mut found: impl FnMut(PathBuf) -> Result<()>) -> Result<()> {
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let mut stack = vec![top.to_path_buf()];
        while let Some(d) = stack.pop() {
            if !self.seen_dirs.insert(canon(&d)) {
                self.cycles.push(d.display().to_string());
                continue;
            }
            for p in sorted_entries(&d)? {
                if p.is_dir() {
                    stack.push(p);
                } else if is_image(&p) {
                    if !self.seen_files.insert(canon(&p)) {
                        self.twice += 1;
                        continue;
                    }
                    found(p)?;
                }
            }
        }
        Ok(())
    }

    /// What the walk skipped under `dir`, as warnings.
    fn warnings(&self, dir: &Path, warnings: &mut Vec<String>) {
        let cycles = &self.cycles;
        if !cycles.is_empty() {
            warnings.push(format!(
                "{}: {} folder(s) reached again through symlinks were read once only ({}{})",
                dir.display(),
                cycles.len(),
                cycles
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", "),
                if cycles.len() > 3 { ", ..." } else { "" }
            ));
        }
        if self.twice > 0 {
            warnings.push(format!(
                "{}: {} image file(s) reached twice (symlinks) were counted once",
                dir.display(),
                self.twice
            ));
        }
    }
}

/// The error for a folder holding more images than one ImageFolder may.
fn too_many(dir: &Path) -> Error {
    Error::BadData {
        path: dir.to_path_buf(),
        reason: format!(
            "more than {} images; that is the limit of one ImageFolder",
            crate::limits::MAX_FOLDER_FILES
        ),
    }
}

/// Scans `dir` with the given class list; every image under `dir/<class>/` (recursively).
/// Symlinked folders are followed once ([`Walk`]), what was skipped reported in `warnings`.
/// An empty class folder is an error, as in torchvision, not a phantom class.
pub fn scan(dir: &Path, classes: &[String], warnings: &mut Vec<String>) -> Result<ImageFolder> {
    let mut files = Vec::new();
    let mut labels = Vec::new();
    let mut walk = Walk::default();
    for (c, name) in classes.iter().enumerate() {
        let cdir = dir.join(name);
        if !cdir.is_dir() {
            continue;
        }
        let before = files.len();
        walk.images(&cdir, |p| {
            if files.len() >= crate::limits::MAX_FOLDER_FILES {
                return Err(too_many(dir));
            }
            files.push(p);
            labels.push(c);
            Ok(())
        })?;
        if files.len() == before {
            return Err(Error::BadData {
                path: cdir,
                reason: format!(
                    "class folder `{name}` holds no images ({} files); remove it or add images",
                    IMAGE_EXTENSIONS.join("/")
                ),
            });
        }
    }
    walk.warnings(dir, warnings);
    Ok(ImageFolder { files, labels })
}

/// Every image file under `dir`, at any depth and in a fixed order (what `convlab predict`
/// reads for a folder), with warnings for what symlinks made it skip. A folder without images
/// is an error naming it.
pub fn images_under(dir: &Path, warnings: &mut Vec<String>) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut walk = Walk::default();
    walk.images(dir, |p| {
        if files.len() >= crate::limits::MAX_FOLDER_FILES {
            return Err(too_many(dir));
        }
        files.push(p);
        Ok(())
    })?;
    if files.is_empty() {
        return Err(Error::BadData {
            path: dir.to_path_buf(),
            reason: format!(
                "no images found (looked for {} files at any depth)",
                IMAGE_EXTENSIONS.join("/")
            ),
        });
    }
    walk.warnings(dir, warnings);
    Ok(files)
}

/// The warning for images that are the same file (by canonical path) in the training split,
/// read from `t`, and the validation split, read from `v`; `None` when no file is in both.
pub(super) fn overlap_warning(
    train: &ImageFolder,
    val: &ImageFolder,
    t: &Path,
    v: &Path,
) -> Option<String> {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let set: std::collections::HashSet<PathBuf> = train.files.iter().map(|p| canon(p)).collect();
    let both: Vec<&PathBuf> = val
        .files
        .iter()
        .filter(|p| set.contains(&canon(p)))
        .collect();
    let first = both.first()?;
    Some(format!(
        "{} image(s) are in both {} and {} (e.g. {}): validation accuracy overstates what the \
         model learned",
        both.len(),
        t.display(),
        v.display(),
        first.display()
    ))
}

fn names(dirs: &[PathBuf]) -> Vec<String> {
    dirs.iter()
        .map(|d| d.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

fn check(dir: &Path, set: &ImageFolder, classes: &[String]) -> Result<()> {
    if set.files.is_empty() {
        return Err(Error::BadData {
            path: dir.to_path_buf(),
            reason: format!(
                "no images found (looked for {} files in class sub-folders)",
                IMAGE_EXTENSIONS.join("/")
            ),
        });
    }
    if classes.len() < 2 {
        return Err(Error::BadData {
            path: dir.to_path_buf(),
            reason: format!(
                "found {} class folder(s); a classifier needs at least 2",
                classes.len()
            ),
        });
    }
    Ok(())
}

/// Opens an ImageFolder root, pre-split or not.
pub fn open(root: &Path, spec: &DataSpec) -> Result<Splits> {
    let mut warnings = Vec::new();
    let val_dir = ["val", "test"]
        .into_iter()
        .map(|n| (n, root.join(n)))
        .find(|(_, p)| p.is_dir());
    let (train, val, classes, val_name): (Arc<dyn Dataset>, Arc<dyn Dataset>, _, _) =
        match (root.join("train"), val_dir) {
            (t, Some((vname, v))) if t.is_dir() => {
                let classes = names(&class_dirs(&t)?);
                let train = scan(&t, &classes, &mut warnings)?;
                check(&t, &train, &classes)?;
                let extra: Vec<String> = names(&class_dirs(&v)?)
                    .into_iter()
                    .filter(|n| !classes.contains(n))
                    .collect();
                if !extra.is_empty() {
                    return Err(Error::BadData {
                        path: v,
                        reason: format!("classes not in train/: {}", extra.join(", ")),
                    });
                }
                let val = scan(&v, &classes, &mut warnings)?;
                check(&v, &val, &classes)?;
                warnings.extend(overlap_warning(&train, &val, &t, &v));
                (Arc::new(train), Arc::new(val), classes, vname.to_string())
            }
            _ => {
                let classes = names(&class_dirs(root)?);
                let all = scan(root, &classes, &mut warnings)?;
                check(root, &all, &classes)?;
                let (t, v) = split_one(Arc::new(all), spec.val_fraction, spec.seed);
                (t, v, classes, "val".to_string())
            }
        };
    Ok(Splits::photos(
        DataFormat::Imagefolder,
        (train, val),
        classes,
        val_name,
        warnings,
    ))
}
