//! Image lists with labels in CSV files, the form Kaggle competitions and labelling tools hand
//! out: a header row naming a path column (`path`, `file`, `filename`, `image`, `image_path`,
//! `img`) and a label column (`label`, `class`, `category`, `target`), one image a row. Paths
//! are relative to the CSV file's folder (or absolute). Three layouts:
//!
//! - `--data list.csv`: one list, split into train / val by `--val-fraction` (stratified, seeded);
//! - `--data DIR` with `DIR/train.csv` and `DIR/val.csv` (or `DIR/test.csv`): pre-split;
//! - `--data DIR` with `DIR/labels.csv`: one list, split as above.
//!
//! Class names are the labels as written, in numeric order when every label is an integer
//! (`2` before `10`), else in byte order (as ImageFolder sorts its folder names). Every listed
//! file must exist: a missing one is an error naming the CSV file and line.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::limits::{MAX_CLASSES, MAX_DATA_FILE_BYTES};

use super::dataset::{DataFormat, DataSpec, Dataset, Splits, split_one};
use super::image_folder::{ImageFolder, overlap_warning};

/// Header names accepted for the image path, in order of preference (case-insensitive).
pub const PATH_COLUMNS: &[&str] = &["path", "file", "filename", "image", "image_path", "img"];
/// Header names accepted for the label.
pub const LABEL_COLUMNS: &[&str] = &["label", "class", "category", "target"];

/// The CSV files of a folder in the formats above, if any: `(train, Some(val))` pre-split or
/// `(labels, None)`.
pub fn find(dir: &Path) -> Option<(PathBuf, Option<PathBuf>)> {
    let train = dir.join("train.csv");
    if train.is_file() {
        let val = ["val.csv", "test.csv"]
            .iter()
            .map(|n| dir.join(n))
            .find(|p| p.is_file());
        return Some((train, val));
    }
    let labels = dir.join("labels.csv");
    labels.is_file().then_some((labels, None))
}

/// True for a path that names a `.csv` file.
pub fn is_csv_file(path: &Path) -> bool {
    path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

/// One parsed list: resolved paths and the labels as written.
#[derive(Debug)]
struct Rows {
    file: PathBuf,
    paths: Vec<PathBuf>,
    labels: Vec<String>,
}

fn bad(file: &Path, reason: String) -> Error {
    Error::BadData {
        path: file.to_path_buf(),
        reason,
    }
}

/// Reads a CSV list, checking its size before reading and each listed file's existence.
fn read(file: &Path) -> Result<Rows> {
    let len = std::fs::metadata(file)
        .map_err(|e| Error::io(file, e))?
        .len();
    if len > MAX_DATA_FILE_BYTES {
        return Err(bad(
            file,
            format!("{len} bytes (a label list may hold at most {MAX_DATA_FILE_BYTES})"),
        ));
    }
    let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
    parse(file, &bytes)
}

/// Parses `bytes` as the CSV list `file` (whose folder relative paths start from).
fn parse(file: &Path, bytes: &[u8]) -> Result<Rows> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .trim(csv::Trim::All)
        .from_reader(bytes);
    let header = reader
        .headers()
        .map_err(|e| bad(file, format!("cannot read the header row: {e}")))?
        .clone();
    let column = |names: &[&str]| {
        names.iter().find_map(|n| {
            header
                .iter()
                .position(|h| h.trim_start_matches('\u{feff}').eq_ignore_ascii_case(n))
        })
    };
    let (pc, lc) = (column(PATH_COLUMNS), column(LABEL_COLUMNS));
    let (Some(pc), Some(lc)) = (pc, lc) else {
        let missing: Vec<String> = [
            (pc, "image path", PATH_COLUMNS),
            (lc, "label", LABEL_COLUMNS),
        ]
        .iter()
        .filter(|(c, _, _)| c.is_none())
        .map(|(_, what, names)| format!("{what} column (one of {})", names.join(", ")))
        .collect();
        return Err(bad(
            file,
            format!(
                "the header row ({}) names no {}",
                header.iter().collect::<Vec<_>>().join(","),
                missing.join(" and no ")
            ),
        ));
    };
    let base = file.parent().unwrap_or(Path::new("."));
    let mut rows = Rows {
        file: file.to_path_buf(),
        paths: Vec::new(),
        labels: Vec::new(),
    };
    let mut classes = BTreeSet::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map_or(0, |p| p.line());
            bad(file, format!("line {line}: {e}"))
        })?;
        let line = record.position().map_or(0, |p| p.line());
        let (Some(p), Some(l)) = (record.get(pc), record.get(lc)) else {
            return Err(bad(file, format!("line {line}: too few fields")));
        };
        if p.is_empty() || l.is_empty() {
            return Err(bad(file, format!("line {line}: an empty path or label")));
        }
        let path = base.join(p);
        if !path.is_file() {
            let what = if path.exists() {
                "not a file"
            } else {
                "no such file"
            };
            return Err(bad(
                file,
                format!("line {line}: {}: {what}", path.display()),
            ));
        }
        if classes.insert(l.to_string()) && classes.len() > MAX_CLASSES {
            return Err(bad(
                file,
                format!("more than {MAX_CLASSES} distinct labels (line {line})"),
            ));
        }
        rows.paths.push(path);
        rows.labels.push(l.to_string());
    }
    if rows.paths.is_empty() {
        return Err(bad(file, "no rows after the header".into()));
    }
    Ok(rows)
}

/// The class names of `labels`: numeric order when all are integers (ties, such as `2` and
/// `02`, in byte order), else byte order.
fn class_names<'a>(labels: impl Iterator<Item = &'a String>) -> Vec<String> {
    let set: BTreeSet<&String> = labels.collect();
    let mut names: Vec<String> = set.into_iter().cloned().collect();
    if names.iter().all(|n| n.parse::<i64>().is_ok()) {
        names.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
    }
    names
}

/// The rows as a dataset over `classes` (every label must be one of them).
fn dataset(rows: Rows, classes: &[String]) -> Result<ImageFolder> {
    let index: HashMap<&str, usize> = classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.as_str(), i))
        .collect();
    let mut labels = Vec::with_capacity(rows.labels.len());
    for (i, l) in rows.labels.iter().enumerate() {
        let Some(&c) = index.get(l.as_str()) else {
            return Err(bad(
                &rows.file,
                format!(
                    "{}: label {l:?} is not a class of the training list",
                    rows.paths[i].display()
                ),
            ));
        };
        labels.push(c);
    }
    Ok(ImageFolder {
        files: rows.paths,
        labels,
    })
}

/// Opens `path` (a CSV file, or a folder holding `train.csv` [+ `val.csv`/`test.csv`] or
/// `labels.csv`) and returns its train and validation splits.
pub fn open(path: &Path, spec: &DataSpec) -> Result<Splits> {
    let (train_file, val_file) = if path.is_dir() {
        find(path).ok_or_else(|| {
            bad(
                path,
                "no train.csv or labels.csv in this folder (the csv format's lists)".into(),
            )
        })?
    } else {
        (path.to_path_buf(), None)
    };
    let train = read(&train_file)?;
    let mut warnings = Vec::new();
    let (train, val, classes, val_name): (Arc<dyn Dataset>, Arc<dyn Dataset>, _, _) = match val_file
    {
        Some(vf) => {
            let val = read(&vf)?;
            let classes = class_names(train.labels.iter());
            check(&train_file, &classes)?;
            let train = dataset(train, &classes)?;
            let val = dataset(val, &classes)?;
            warnings.extend(overlap_warning(&train, &val, &train_file, &vf));
            let name = vf
                .file_stem()
                .map_or("val".into(), |s| s.to_string_lossy().into_owned());
            (Arc::new(train), Arc::new(val), classes, name)
        }
        None => {
            let classes = class_names(train.labels.iter());
            check(&train_file, &classes)?;
            let all = dataset(train, &classes)?;
            let (t, v) = split_one(Arc::new(all), spec.val_fraction, spec.seed);
            (t, v, classes, "val".to_string())
        }
    };
    Ok(Splits::photos(
        DataFormat::Csv,
        (train, val),
        classes,
        val_name,
        warnings,
    ))
}

fn check(file: &Path, classes: &[String]) -> Result<()> {
    if classes.len() < 2 {
        return Err(bad(
            file,
            format!(
                "{} distinct label(s); a classifier needs at least 2",
                classes.len()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn headers_columns_order_and_errors() {
        let d = tempfile::tempdir().unwrap();
        for f in ["a.png", "b.png", "c.png"] {
            std::fs::write(d.path().join(f), b"not decoded here").unwrap();
        }
        // Extra columns, another column order, a BOM, spaces, numeric labels.
        let f = list(
            d.path(),
            "l.csv",
            "\u{feff}id, Label ,File\n1,10,a.png\n2, 2 ,b.png\n3,10,c.png\n",
        );
        let rows = read(&f).unwrap();
        assert_eq!(rows.labels, ["10", "2", "10"]);
        assert_eq!(rows.paths[1], d.path().join("b.png"));
        let classes = class_names(rows.labels.iter());
        assert_eq!(classes, ["2", "10"]);
        assert_eq!(dataset(rows, &classes).unwrap().labels, [1, 0, 1]);
        assert_eq!(
            class_names(["b", "a", "10"].map(String::from).iter()),
            ["10", "a", "b"]
        );

        let e = read(&list(d.path(), "x.csv", "name,label\na.png,1\n")).unwrap_err();
        let e = e.to_string();
        assert!(
            e.contains("x.csv") && e.contains("no image path column"),
            "{e}"
        );
        let e = read(&list(
            d.path(),
            "x.csv",
            "path,label\na.png,1\nmissing.png,2\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("line 3") && e.contains("missing.png"), "{e}");
        let e = read(&list(d.path(), "x.csv", "path,label\na.png,1,extra\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.csv") && e.contains("line 2"), "{e}");
        let e = read(&list(d.path(), "x.csv", "path,label\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no rows"), "{e}");
        let e = read(&list(d.path(), "x.csv", "path,label\n,1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("empty path"), "{e}");
    }

    /// A photo listed in both train.csv and val.csv is warned about, naming both lists.
    #[test]
    fn a_photo_in_both_lists_is_warned_about() {
        let d = tempfile::tempdir().unwrap();
        for f in ["a.png", "b.png", "c.png"] {
            std::fs::write(d.path().join(f), b"not decoded here").unwrap();
        }
        list(d.path(), "train.csv", "path,label\na.png,x\nb.png,y\n");
        let spec = DataSpec {
            path: None,
            format: None,
            val_fraction: 0.2,
            seed: 0,
            limit_train: None,
            limit_val: None,
        };
        list(d.path(), "val.csv", "path,label\nc.png,x\n");
        assert!(open(d.path(), &spec).unwrap().warnings.is_empty());
        list(d.path(), "val.csv", "path,label\nc.png,x\nb.png,y\n");
        let w = open(d.path(), &spec).unwrap().warnings.join("\n");
        assert!(
            w.contains("1 image(s) are in both")
                && w.contains("train.csv")
                && w.contains("val.csv")
                && w.contains("b.png"),
            "{w}"
        );
    }
}
