//! Dataset readers on small files written in the exact real formats.

use crate::common;

use common::*;
use convlab::data::dataset::detect;
use convlab::data::{DataFormat, DataSpec, open};

fn spec(path: &std::path::Path) -> DataSpec {
    DataSpec {
        path: Some(path.to_path_buf()),
        format: None,
        val_fraction: 0.2,
        seed: 1,
        limit_train: None,
        limit_val: None,
    }
}

#[test]
fn idx_gzipped_and_plain() {
    for gz in [true, false] {
        let d = tmp();
        let tl = write_idx(d.path(), "train", 30, 28, gz);
        write_idx(d.path(), "t10k", 20, 28, gz);
        assert_eq!(detect(d.path()).unwrap(), DataFormat::Idx);
        let s = open(&spec(d.path())).unwrap();
        assert_eq!((s.train.len(), s.val.len(), s.channels), (30, 20, 1));
        assert_eq!(s.train.label(7), tl[7] as usize);
        let img = s.train.image(3, 1).unwrap();
        assert_eq!(img.pixels[5], (3 * 25 + 5) as u8);
        // Grey data converted to RGB for a colour model.
        let rgb = s.train.image(3, 3).unwrap();
        assert_eq!(&rgb.pixels[15..18], &[img.pixels[5]; 3]);
    }
}

#[test]
fn idx_truncated_file_names_the_file() {
    let d = tmp();
    write_idx(d.path(), "train", 10, 28, false);
    write_idx(d.path(), "t10k", 10, 28, false);
    let f = d.path().join("train-images-idx3-ubyte");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 5]).unwrap();
    let e = open(&spec(d.path())).err().unwrap().to_string();
    assert!(e.contains("train-images-idx3-ubyte"), "{e}");
}

#[test]
fn cifar10_records_are_deinterleaved() {
    let d = tmp();
    write_cifar10(d.path(), 4);
    assert_eq!(detect(d.path()).unwrap(), DataFormat::Cifar10);
    let s = open(&spec(d.path())).unwrap();
    assert_eq!((s.train.len(), s.val.len(), s.classes.len()), (20, 4, 10));
    assert_eq!(s.classes[0], "airplane");
    let l = s.val.label(3);
    assert_eq!(l, 3);
    let img = s.val.image(3, 3).unwrap();
    assert_eq!((img.width, img.height), (32, 32));
    assert_eq!(&img.pixels[..3], &[60, 195, 7]);
}

#[test]
fn cifar100_uses_fine_label() {
    let d = tmp();
    let mut train = Vec::new();
    for i in 0..5u8 {
        train.extend(cifar_record(&[i % 20, 50 + i], [i, i, i]));
    }
    std::fs::write(d.path().join("train.bin"), &train).unwrap();
    std::fs::write(d.path().join("test.bin"), &train).unwrap();
    let s = open(&spec(d.path())).unwrap();
    assert_eq!(s.format, DataFormat::Cifar100);
    assert_eq!(s.classes.len(), 100);
    assert_eq!(s.train.label(2), 52);
    // A file that is not a whole number of records is reported by name.
    std::fs::write(d.path().join("test.bin"), &train[..100]).unwrap();
    let e = open(&spec(d.path())).err().unwrap().to_string();
    assert!(e.contains("test.bin"), "{e}");
}

#[test]
fn image_folder_mixed_modes_and_corrupt_file() {
    let d = tmp();
    write_image_folder(d.path(), &["cat", "dog"], 6);
    let cat = d.path().join("cat");
    // Grey, grey+alpha, RGBA, 16-bit, palette and CMYK images all decode to 3 channels.
    image::GrayImage::from_pixel(9, 9, image::Luma([77]))
        .save(cat.join("grey.png"))
        .unwrap();
    image::GrayAlphaImage::from_pixel(9, 5, image::LumaA([10, 128]))
        .save(cat.join("ga.png"))
        .unwrap();
    image::RgbaImage::from_pixel(5, 9, image::Rgba([1, 2, 3, 4]))
        .save(cat.join("rgba.png"))
        .unwrap();
    image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(8, 8, image::Rgb([65535u16, 0, 32768]))
        .save(cat.join("deep.png"))
        .unwrap();
    write_palette_png(&cat.join("palette.png"), 6, 6);
    write_cmyk_jpeg(&cat.join("cmyk.jpg"), 16, 12);
    std::fs::write(
        cat.join("broken.jpg"),
        b"\xff\xd8\xff\xe0 not really a jpeg",
    )
    .unwrap();
    std::fs::write(cat.join("notes.txt"), b"ignored").unwrap();

    let s = open(&spec(d.path())).unwrap();
    assert_eq!(s.classes, vec!["cat", "dog"]);
    assert_eq!(s.train.len() + s.val.len(), 19);
    let mut bad = Vec::new();
    for ds in [&s.train, &s.val] {
        for i in 0..ds.len() {
            match ds.image(i, 3) {
                Ok(img) => assert_eq!(img.pixels.len(), img.width * img.height * 3),
                Err(e) => bad.push(e.to_string()),
            }
        }
    }
    assert_eq!(bad.len(), 1, "{bad:?}");
    assert!(bad[0].contains("broken.jpg"), "{bad:?}");
    // `data stats` counts each file's mode as it was stored, read from its header.
    let mut modes = std::collections::BTreeMap::new();
    for ds in [&s.train, &s.val] {
        for i in 0..ds.len() {
            let name = std::path::PathBuf::from(ds.describe(i));
            let name = name.file_name().unwrap().to_string_lossy().into_owned();
            if !name.starts_with(|c: char| c.is_ascii_digit()) {
                modes.insert(name, ds.mode(i));
            }
        }
    }
    let want = [
        ("broken.jpg", None),
        ("cmyk.jpg", Some("cmyk")),
        ("deep.png", Some("rgb16")),
        ("ga.png", Some("grey+alpha")),
        ("grey.png", Some("grey")),
        ("palette.png", Some("palette")),
        ("rgba.png", Some("rgba")),
    ];
    let want: std::collections::BTreeMap<String, Option<&str>> =
        want.iter().map(|(n, m)| (n.to_string(), *m)).collect();
    assert_eq!(modes, want);
    let deep = convlab::data::image_folder::decode_file(&cat.join("deep.png"), 3).unwrap();
    assert_eq!(&deep.pixels[..3], &[255, 0, 128]);
    let grey = convlab::data::image_folder::decode_file(&cat.join("grey.png"), 1).unwrap();
    assert_eq!(grey.pixels[0], 77);
}

#[test]
fn image_folder_with_train_and_val_subfolders() {
    let d = tmp();
    write_image_folder(&d.path().join("train"), &["a", "b", "c"], 4);
    write_image_folder(&d.path().join("val"), &["a", "b", "c"], 2);
    let s = open(&spec(d.path())).unwrap();
    assert_eq!(
        (s.train.len(), s.val.len(), s.val_name.as_str()),
        (12, 6, "val")
    );
}

#[test]
fn bad_folders_have_clear_errors() {
    let d = tmp();
    std::fs::create_dir_all(d.path().join("only")).unwrap();
    let e = open(&spec(d.path())).err().unwrap().to_string();
    assert!(e.contains("no images"), "{e}");
    write_image_folder(d.path(), &["only"], 3);
    let e = open(&spec(d.path())).err().unwrap().to_string();
    assert!(e.contains("at least 2"), "{e}");
    let e = open(&spec(&d.path().join("missing")))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing") && e.contains("no such file"), "{e}");
    let empty = tmp();
    let e = open(&spec(empty.path())).err().unwrap().to_string();
    assert!(e.contains("unknown dataset format"), "{e}");
}

#[test]
fn limits_give_stratified_subsets() {
    let mut s = spec(std::path::Path::new("unused"));
    s.path = None;
    s.limit_train = Some(100);
    s.limit_val = Some(50);
    let sp = open(&s).unwrap();
    assert_eq!((sp.train.len(), sp.val.len()), (100, 50));
    let mut counts = [0; 10];
    for i in 0..100 {
        counts[sp.train.label(i)] += 1;
    }
    assert_eq!(counts, [10; 10]);
}
