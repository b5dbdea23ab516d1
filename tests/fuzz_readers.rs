//! Readers that random bytes cannot crash: a seeded mutation loop (stable Rust, no fuzzing
//! crate) over every reader of untrusted input. Each starts from a valid file in the real
//! format, flips, inserts, deletes and overwrites bytes (header fields included), and requires
//! an `Ok` or an `Err`, never a panic, an abort or an unbounded allocation (the readers check
//! sizes against `convlab::limits` before allocating). A failure prints the seed to replay.

use crate::common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use common::*;
use convlab::data::{DataSpec, cifar, idx, image_folder};
use convlab::recipe::Recipe;
use convlab::run::RunDir;

/// xorshift64*: the tests' own reproducible stream.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to eight random edits of `base`; the header (first 32 bytes) is hit half the time,
/// since that is where sizes live.
fn mutate(base: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = base.to_vec();
    for _ in 0..1 + rng.below(8) {
        let at = if rng.below(2) == 0 {
            rng.below(b.len().min(32))
        } else {
            rng.below(b.len())
        };
        match rng.below(6) {
            0 if !b.is_empty() => b[at] ^= 1 << rng.below(8),
            1 if !b.is_empty() => b[at] = [0, 0xff, 0x7f, 0x80][rng.below(4)],
            2 => b.insert(at.min(b.len()), rng.next() as u8),
            3 if !b.is_empty() => {
                b.remove(at);
            }
            4 => b.truncate(rng.below(b.len() + 1)),
            _ if b.len() >= 4 => {
                let at = at.min(b.len() - 4);
                b[at..at + 4].copy_from_slice(&(rng.next() as u32).to_be_bytes());
            }
            _ => b.push(rng.next() as u8),
        }
    }
    b
}

/// Runs `f` on `cases` mutations of `base` (times `CONVLAB_FUZZ_SCALE`, 1 unless set, for a
/// longer campaign by hand: `CONVLAB_FUZZ_SCALE=1000 cargo test --release --test integration
/// fuzz_readers::`); a panic fails the test with the case's seed.
fn fuzz(name: &str, base: &[u8], cases: u64, mut f: impl FnMut(&[u8])) {
    let scale: u64 = std::env::var("CONVLAB_FUZZ_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for seed in 1..=cases * scale.max(1) {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let input = if seed == 1 {
            base.to_vec()
        } else {
            mutate(base, &mut rng)
        };
        if catch_unwind(AssertUnwindSafe(|| f(&input))).is_err() {
            panic!("{name}: input {seed} ({} bytes) panicked", input.len());
        }
    }
}

#[test]
fn idx_readers_never_panic() {
    let d = tmp();
    write_idx(d.path(), "train", 12, 6, false);
    write_idx(d.path(), "t10k", 10, 6, false);
    let images = std::fs::read(d.path().join("train-images-idx3-ubyte")).unwrap();
    let labels = std::fs::read(d.path().join("train-labels-idx1-ubyte")).unwrap();
    let p = Path::new("fuzz");
    fuzz("idx images", &images, 1500, |b| {
        let _ = idx::parse_images(b, p);
    });
    fuzz("idx labels", &labels, 1500, |b| {
        let _ = idx::parse_labels(b, p);
    });
    // Whole directories, gzipped: the decompressor, the header and the label checks.
    let gz = tmp();
    write_idx(gz.path(), "train", 12, 6, true);
    write_idx(gz.path(), "t10k", 10, 6, true);
    let target = gz.path().join("train-labels-idx1-ubyte.gz");
    let base = std::fs::read(&target).unwrap();
    fuzz("idx gz dir", &base, 400, |b| {
        std::fs::write(&target, b).unwrap();
        let _ = idx::open(gz.path());
    });
    // A header that claims 2^32 - 1 images of 65535 x 65535 is refused without allocating.
    let mut huge = vec![0, 0, 8, 3];
    huge.extend(u32::MAX.to_be_bytes());
    huge.extend(65_535u32.to_be_bytes());
    huge.extend(65_535u32.to_be_bytes());
    assert!(idx::parse_images(&huge, p).is_err());
}

#[test]
fn cifar_reader_never_panics() {
    let d = tmp();
    write_cifar10(d.path(), 3);
    let target = d.path().join("data_batch_1.bin");
    let base = std::fs::read(&target).unwrap();
    fuzz("cifar records", &base, 800, |b| {
        let _ = cifar::parse_records(b, 1, Path::new("fuzz"));
        let _ = cifar::parse_records(b, 2, Path::new("fuzz"));
    });
    fuzz("cifar dir", &base[..3073 * 2], 200, |b| {
        std::fs::write(&target, b).unwrap();
        let _ = cifar::open(d.path(), false);
    });
}

#[test]
fn image_decoding_never_panics() {
    let d = tmp();
    let path = d.path().join("x");
    let mut bases = Vec::new();
    for ext in ["png", "jpg", "gif", "bmp", "tiff", "webp"] {
        let p = d.path().join(format!("base.{ext}"));
        let img = class_rgb(1, 9, 7, 3);
        if ext == "webp" || ext == "gif" {
            image::DynamicImage::ImageRgb8(img)
                .to_rgba8()
                .save(&p)
                .unwrap();
        } else {
            img.save(&p).unwrap();
        }
        bases.push((ext, std::fs::read(&p).unwrap()));
    }
    // The two modes whose headers `stored_mode` reads with PNG's and JPEG's own crates.
    let p = d.path().join("palette.png");
    write_palette_png(&p, 6, 5);
    bases.push(("palette png", std::fs::read(&p).unwrap()));
    let p = d.path().join("cmyk.jpg");
    write_cmyk_jpeg(&p, 16, 12);
    bases.push(("cmyk jpg", std::fs::read(&p).unwrap()));
    for (ext, base) in &bases {
        fuzz(&format!("decode {ext}"), base, 300, |b| {
            std::fs::write(&path, b).unwrap();
            let _ = image_folder::decode_file(&path, 3);
            let _ = image_folder::decode_file(&path, 1);
            let _ = image_folder::stored_mode(b.to_vec());
        });
    }
    // A PNG whose header claims 100,000 x 100,000 pixels is refused before decoding.
    let mut png = bases[0].1.clone();
    png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    std::fs::write(&path, &png).unwrap();
    assert!(image_folder::decode_file(&path, 3).is_err());
}

/// Random ImageFolder trees: nested folders, symlinks to ancestors and siblings, empty
/// folders, odd names. Opening terminates and never panics.
#[cfg(unix)]
#[test]
fn image_folder_walking_never_panics_or_hangs() {
    let mut rng = Rng(0xF01D);
    for case in 0..60 {
        let d = tmp();
        let root = d.path().join("data");
        let classes = ["a", "b", "c"];
        let n = rng.below(3);
        write_image_folder(&root, &classes[..1 + n], 1 + rng.below(3));
        for _ in 0..rng.below(6) {
            let class = classes[rng.below(1 + n)];
            let link = root.join(class).join(format!("l{}", rng.below(1000)));
            let target = match rng.below(4) {
                0 => root.clone(),
                1 => root.join(class),
                2 => Path::new("..").to_path_buf(),
                _ => root.join(classes[rng.below(3)]).join("missing"),
            };
            let _ = std::os::unix::fs::symlink(&target, &link);
        }
        if rng.below(3) == 0 {
            std::fs::create_dir_all(root.join("zz_empty")).unwrap();
        }
        if rng.below(3) == 0 {
            std::fs::write(root.join("a").join("weird name ü.png"), b"junk").unwrap();
        }
        let spec = DataSpec {
            path: Some(root.clone()),
            format: None,
            val_fraction: 0.3,
            seed: case,
            limit_train: None,
            limit_val: None,
        };
        let t0 = std::time::Instant::now();
        let r = catch_unwind(AssertUnwindSafe(|| {
            convlab::data::open(&spec).map(|s| s.train.len())
        }));
        assert!(r.is_ok(), "case {case} panicked");
        assert!(t0.elapsed().as_secs() < 20, "case {case} took too long");
    }
}

#[test]
fn csv_label_lists_never_panic() {
    let d = tmp();
    let root = d.path().join("data");
    write_image_folder(&root, &["a", "b"], 3);
    let base = "path,label,extra\na/000.png,a,1\na/001.jpg,a,2\nb/000.png,b,\"q,uoted\"\n\
                b/001.jpg,b,3\nb/002.png,b,4\n";
    let list = root.join("labels.csv");
    let spec = DataSpec {
        path: Some(root.clone()),
        format: None,
        val_fraction: 0.4,
        seed: 0,
        limit_train: None,
        limit_val: None,
    };
    std::fs::write(&list, base).unwrap();
    assert_eq!(convlab::data::open(&spec).unwrap().classes, ["a", "b"]);
    fuzz("labels.csv", base.as_bytes(), 400, |bytes| {
        std::fs::write(&list, bytes).unwrap();
        let _ = convlab::data::open(&spec).map(|s| s.train.len());
    });
}

#[test]
fn recipes_and_overrides_never_panic() {
    let d = tmp();
    let path = d.path().join("r.toml");
    let base = std::fs::read("recipes/default.toml")
        .or_else(|_| std::fs::read("recipes/alexnet.toml"))
        .unwrap_or_else(|_| Recipe::default().to_toml().unwrap().into_bytes());
    fuzz("recipe file", &base, 400, |b| {
        std::fs::write(&path, b).unwrap();
        let _ = Recipe::resolve(Some(&path), &[]);
    });
    // --set with random keys and values, numbers at their extremes among them.
    let keys = [
        "epochs",
        "batch_size",
        "seed",
        "model.plan",
        "model.input_size",
        "model.hidden",
        "model.conv_widths",
        "model.num_classes",
        "data.workers",
        "data.prefetch",
        "data.cache_mb",
        "data.limit_train",
        "eval.scales",
        "augment.crop_padding",
        "augment.scale",
        "optim.lr",
        "schedule.warmup_epochs",
        "checkpoint_every",
        "foo.bar",
        "model",
        "model.name",
        "",
        ".",
        "a..b",
    ];
    let values = [
        "0",
        "-1",
        "1e308",
        "nan",
        "inf",
        "18446744073709551615",
        "9223372036854775807",
        "\"99999999999\"",
        "\"8192,8192,M,8192\"",
        "[100000, 1]",
        "[]",
        "[0]",
        "\"\"",
        "true",
        "{a = 1}",
        "\"M,M,M,M,M,M,M,M,M,M,M,M\"",
        "\"1k99999\"",
        "\"64k3,M\"",
        "2.5",
        "[4096, 4096, 4096, 4096, 4096]",
    ];
    let mut rng = Rng(7);
    for case in 0..1500 {
        let text = format!(
            "{}={}",
            keys[rng.below(keys.len())],
            values[rng.below(values.len())]
        );
        let r = catch_unwind(|| {
            convlab::recipe::Override::parse(&text)
                .and_then(|o| Recipe::resolve(None, &[o]))
                .map(|r| r.model.validate_options())
        });
        assert!(r.is_ok(), "--set {text} (case {case}) panicked");
    }
}

#[test]
fn checkpoints_and_run_folder_files_never_panic() {
    let d = tmp();
    let run = RunDir::create(d.path()).unwrap();
    std::fs::write(
        run.file("recipe.toml"),
        Recipe::default().to_toml().unwrap(),
    )
    .unwrap();
    // A real checkpoint of a tiny model.
    let mut map = convlab::checkpoint::TensorMap::new();
    map.insert(
        "w".into(),
        convlab::checkpoint::HostTensor {
            shape: vec![2, 3],
            data: vec![0.5; 6],
        },
    );
    let ck = run.checkpoint("last");
    let meta = [("epoch".to_string(), "1".to_string())]
        .into_iter()
        .collect();
    convlab::checkpoint::save(&ck, &[("model", &map), ("ema", &map)], meta).unwrap();
    let base = std::fs::read(&ck).unwrap();
    fuzz("checkpoint", &base, 1500, |b| {
        std::fs::write(&ck, b).unwrap();
        let _ = convlab::checkpoint::load(&ck);
        if let Ok(mut f) = convlab::checkpoint::open(&ck) {
            let _ = f.read_weights();
            let _ = f.read("optim");
        }
    });
    let metrics = br#"{"epoch":1,"train_loss":2.0,"train_top1":0.1,"val_loss":2.0,"val_top1":0.1,"val_top5":0.5,"lr":0.1,"images_per_sec":100.0,"seconds":1.0,"peak_rss_mb":100.0,"images_skipped":0}
"#;
    fuzz("metrics.jsonl", metrics, 600, |b| {
        std::fs::write(run.file("metrics.jsonl"), b).unwrap();
        let _ = run.read_metrics();
    });
    let summary = br#"{"model":"convnet_small","params":1,"epochs":1,"best_val_top1":0.5,"best_epoch":1,"final_val_top1":0.5,"final_val_top5":0.9,"final_val_loss":1.0,"seconds":1.0,"images_skipped":0}"#;
    fuzz("summary.json", summary, 600, |b| {
        std::fs::write(run.file("summary.json"), b).unwrap();
        let _ = run.read_json::<convlab::run::Summary>("summary.json");
    });
    fuzz("classes.json", br#"["a","b"]"#, 300, |b| {
        std::fs::write(run.file("classes.json"), b).unwrap();
        let _ = run.read_classes();
    });
    fuzz(
        "stats.json",
        br#"{"mean":[0.5],"std":[0.2],"pca":null,"images":3}"#,
        300,
        |b| {
            std::fs::write(run.file("stats.json"), b).unwrap();
            let _ = run.read_json::<convlab::data::norm::NormStats>("stats.json");
        },
    );
}

#[test]
fn weight_imports_never_panic() {
    let d = tmp();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/interop");
    for file in [
        "small_zip.pth",
        "small_legacy.pth",
        "small.safetensors",
        "small_nested.pth",
    ] {
        let base = std::fs::read(fixtures.join(file)).unwrap();
        let path = d.path().join(file);
        fuzz(file, &base, 400, |b| {
            std::fs::write(&path, b).unwrap();
            let _ = convlab::interop::read_state_dict(&path);
        });
    }
}
