//! Every bad input gets a clear error: a non-zero exit, a message naming the file or field and
//! the problem, no panic, and no file destroyed. One table, one row per case.

mod common;

use std::path::{Path, PathBuf};

use common::{ok, segtrain, temp_dir};

/// A small valid data set (binary masks, 48×48) written pixel by pixel.
fn dataset(root: &Path, count: usize) {
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    for i in 0..count {
        let img = image::RgbImage::from_fn(48, 48, |x, y| {
            image::Rgb([(x * 5) as u8, (y * 5) as u8, 90])
        });
        let mask = image::GrayImage::from_fn(48, 48, |x, y| {
            image::Luma([if x > 20 && y > 20 { 255 } else { 0 }])
        });
        img.save(root.join(format!("images/p{i}.png"))).unwrap();
        mask.save(root.join(format!("masks/p{i}.png"))).unwrap();
    }
}

fn config(dir: &Path, root: &Path, extra: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let path = dir.join(format!(
        "c{}.toml",
        NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
    ));
    std::fs::write(
        &path,
        format!(
            "name = \"bad\"\nseed = 1\n[data]\nroot = \"{}\"\nimage_size = 32\nchannels = 3\nclasses = 1\n[model]\nbase_width = 4\ndepth = 2\n[train]\nepochs = 1\nbatch_size = 2\n{extra}\n[[loss]]\nkind = \"dice\"\n",
            root.display()
        ),
    )
    .unwrap();
    path
}

/// Writes a PNG mask with a palette (indexed colour) of the given indices.
fn palette_mask(path: &Path, w: u32, h: u32, index: impl Fn(u32, u32) -> u8) {
    let file = std::fs::File::create(path).unwrap();
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Indexed);
    enc.set_depth(png::BitDepth::Eight);
    enc.set_palette(vec![0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]);
    let mut writer = enc.write_header().unwrap();
    let data: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).map(move |x| (x, y)))
        .map(|(x, y)| index(x, y))
        .collect();
    writer.write_image_data(&data).unwrap();
}

/// A finished run and a model file whose bytes must survive every case.
struct Sentinels {
    files: Vec<(PathBuf, Vec<u8>)>,
}

impl Sentinels {
    fn check(&self) {
        for (path, bytes) in &self.files {
            assert_eq!(
                &std::fs::read(path).unwrap(),
                bytes,
                "{} was modified",
                path.display()
            );
        }
    }
}

struct Case {
    name: &'static str,
    args: Vec<String>,
    /// Substrings the error message must contain (case-sensitive).
    expect: Vec<&'static str>,
}

#[test]
fn bad_inputs_fail_cleanly_and_name_the_problem() {
    let dir = temp_dir("bad-inputs");
    let good = dir.join("good");
    dataset(&good, 6);
    let runs = dir.join("runs");
    let good_cfg = config(&dir, &good, "");
    ok(&common::train_args(&good_cfg, &runs, &[]));
    let model = runs.join("bad/model.safetensors");
    let sentinels = Sentinels {
        files: [
            "model.safetensors",
            "metrics.csv",
            "summary.json",
            "checkpoint.safetensors",
            "config.toml",
        ]
        .iter()
        .map(|f| {
            let p = runs.join("bad").join(f);
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect(),
    };
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let train = |cfg: &Path, extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            "train".to_string(),
            s(cfg),
            "--runs".into(),
            s(&dir.join("scratch")),
        ];
        v.extend(extra.iter().map(|e| e.to_string()));
        v
    };
    // data sets with one defect each
    let broken = |name: &str, damage: &dyn Fn(&Path)| -> PathBuf {
        let root = dir.join(name);
        dataset(&root, 6);
        damage(&root);
        root
    };
    let corrupt = broken("corrupt", &|r| {
        std::fs::write(
            r.join("images/p2.png"),
            b"\x89PNG\r\n\x1a\nnot really a png at all",
        )
        .unwrap()
    });
    let truncated = broken("truncated", &|r| {
        let b = std::fs::read(r.join("images/p1.png")).unwrap();
        std::fs::write(r.join("images/p1.png"), &b[..b.len() / 2]).unwrap();
    });
    let zero = broken("zero", &|r| {
        std::fs::write(r.join("masks/p3.png"), b"").unwrap()
    });
    let text = broken("text", &|r| {
        std::fs::remove_file(r.join("images/p4.png")).unwrap();
        std::fs::write(r.join("images/p4.jpg"), b"hello, I am a text file").unwrap();
    });
    let no_mask = broken("no-mask", &|r| {
        std::fs::remove_file(r.join("masks/p0.png")).unwrap()
    });
    let no_image = broken("no-image", &|r| {
        std::fs::remove_file(r.join("images/p5.png")).unwrap()
    });
    let size = broken("size", &|r| {
        image::GrayImage::new(40, 48)
            .save(r.join("masks/p2.png"))
            .unwrap()
    });
    let values = broken("values", &|r| {
        // valid class maps (0/1) everywhere but p1.png, which holds a 7
        for entry in std::fs::read_dir(r.join("masks")).unwrap() {
            let path = entry.unwrap().path();
            let mut mask = image::open(&path).unwrap().to_luma8();
            mask.pixels_mut().for_each(|p| p.0[0] = (p.0[0] > 0) as u8);
            mask.save(&path).unwrap();
        }
        image::GrayImage::from_pixel(48, 48, image::Luma([7]))
            .save(r.join("masks/p1.png"))
            .unwrap()
    });
    let case_only = broken("case-only", &|r| {
        std::fs::rename(r.join("masks/p1.png"), r.join("masks/P1.png")).unwrap()
    });
    let two_masks = broken("two-masks", &|r| {
        std::fs::copy(r.join("masks/p1.png"), r.join("masks/p1.PNG")).unwrap();
    });
    let jpeg_mask = broken("jpeg-mask", &|r| {
        std::fs::remove_file(r.join("masks/p2.png")).unwrap();
        image::GrayImage::new(48, 48)
            .save(r.join("masks/p2.jpg"))
            .unwrap();
    });
    let jpeg_named_png = broken("jpeg-named-png", &|r| {
        let mut bytes = vec![];
        image::GrayImage::new(48, 48)
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        std::fs::write(r.join("masks/p4.png"), bytes).unwrap();
    });
    let tiff = broken("tiff", &|r| {
        std::fs::rename(r.join("images/p4.png"), r.join("images/p4.tif")).unwrap()
    });
    let empty = dir.join("empty");
    std::fs::create_dir_all(empty.join("images")).unwrap();
    std::fs::create_dir_all(empty.join("masks")).unwrap();
    // a fixed split whose val/ holds nothing (one pair without a split trains: it is
    // validated on itself, see tests/plan.rs)
    let single = dir.join("single");
    dataset(&single.join("train"), 2);
    for sub in ["val/images", "val/masks"] {
        std::fs::create_dir_all(single.join(sub)).unwrap();
    }
    let no_folders = dir.join("no-folders");
    std::fs::create_dir_all(&no_folders).unwrap();
    // model files with one defect each
    let not_st = dir.join("not.safetensors");
    std::fs::write(&not_st, b"plain text, not a model").unwrap();
    let bytes = std::fs::read(&model).unwrap();
    let trunc_model = dir.join("truncated.safetensors");
    std::fs::write(&trunc_model, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let huge = dir.join("huge.safetensors");
    let header = br#"{"a":{"dtype":"F32","shape":[4000000000,4000000000],"data_offsets":[0,64000000000000000000]}}"#;
    let mut h = (header.len() as u64).to_le_bytes().to_vec();
    h.extend_from_slice(header);
    std::fs::write(&huge, &h).unwrap();
    let huge_header = dir.join("huge-header.safetensors");
    std::fs::write(&huge_header, u64::MAX.to_le_bytes()).unwrap();
    // a model whose metadata names another architecture / class count than its tensors
    let relabel = |name: &str, key: &str, value: &str| -> PathBuf {
        let (tensors, mut meta) =
            segtrain::fsutil::read_safetensors(&model, &candle_core::Device::Cpu).unwrap();
        meta.insert(key.into(), value.into());
        let list: Vec<(String, candle_core::Tensor)> = tensors.into_iter().collect();
        let p = dir.join(name);
        segtrain::fsutil::write_safetensors(&p, &list, Some(meta)).unwrap();
        p
    };
    let other_depth = relabel("depth3.safetensors", "depth", "3");
    let other_classes = relabel("classes3.safetensors", "classes", "3");
    let plain_st = dir.join("plain.safetensors");
    segtrain::fsutil::write_safetensors(
        &plain_st,
        &[(
            "x".into(),
            candle_core::Tensor::new(&[1f32, 2.], &candle_core::Device::Cpu).unwrap(),
        )],
        None,
    )
    .unwrap();
    // configs with one defect each
    let syntax = dir.join("syntax.toml");
    std::fs::write(
        &syntax,
        "name = \"x\"\n[data]\nroot = \"a\"\nimage_size = = 32\n",
    )
    .unwrap();
    let read_only_parent = dir.join("a-file");
    std::fs::write(&read_only_parent, b"x").unwrap();

    let cases = vec![
        Case {
            name: "corrupt image",
            args: train(&config(&dir, &corrupt, ""), &[]),
            expect: vec!["p2.png", "not a readable image"],
        },
        Case {
            name: "truncated image",
            args: train(&config(&dir, &truncated, ""), &[]),
            expect: vec!["p1.png"],
        },
        Case {
            name: "zero-byte mask",
            args: train(&config(&dir, &zero, ""), &[]),
            expect: vec!["p3.png", "mask"],
        },
        Case {
            name: "non-image file",
            args: train(&config(&dir, &text, ""), &[]),
            expect: vec!["p4.jpg", "not a readable image"],
        },
        Case {
            name: "image without mask",
            args: train(&config(&dir, &no_mask, ""), &[]),
            expect: vec!["p0.png", "image without a mask"],
        },
        Case {
            name: "mask without image",
            args: train(&config(&dir, &no_image, ""), &[]),
            expect: vec!["p5.png", "mask without an image"],
        },
        Case {
            name: "image/mask size mismatch",
            args: train(&config(&dir, &size, ""), &[]),
            expect: vec!["p2.png", "48×48", "40×48"],
        },
        Case {
            name: "mask value >= classes",
            args: train(
                &config(&dir, &values, "").to_path_buf(),
                &[
                    "--set",
                    "data.classes=3",
                    "--set",
                    "loss.0.kind=\"cross_entropy\"",
                ],
            ),
            expect: vec!["p1.png", "mask value 7", "classes = 3"],
        },
        Case {
            name: "zero-byte mask is called empty",
            args: train(&config(&dir, &zero, ""), &[]),
            expect: vec!["masks/p3.png", "empty file"],
        },
        Case {
            name: "mask stem differing only in case",
            args: train(&config(&dir, &case_only, ""), &[]),
            expect: vec!["P1.png", "mask without an image", "differs only in case"],
        },
        Case {
            name: "two masks of one stem",
            args: train(&config(&dir, &two_masks, ""), &[]),
            expect: vec!["p1.PNG", "p1.png", "two masks with the stem `p1`"],
        },
        Case {
            name: "JPEG mask",
            args: train(&config(&dir, &jpeg_mask, ""), &[]),
            expect: vec!["masks/p2.jpg", "masks must be PNG"],
        },
        Case {
            name: "JPEG mask under a .png name",
            args: train(&config(&dir, &jpeg_named_png, ""), &[]),
            expect: vec!["masks/p4.png", "a JPEG file", "masks must be PNG"],
        },
        Case {
            name: "image of a format not read",
            args: train(&config(&dir, &tiff, ""), &[]),
            expect: vec![
                "masks/p4.png",
                "mask without an image",
                "p4.tif is not read",
            ],
        },
        Case {
            name: "data root that is a file",
            args: train(&config(&dir, &read_only_parent, ""), &[]),
            expect: vec!["data.root", "a-file", "is not a folder"],
        },
        Case {
            name: "eval on a data set without images",
            args: vec![
                "eval".into(),
                "--model".into(),
                s(&model),
                "--data".into(),
                s(&empty),
            ],
            expect: vec!["empty/images", "found 0 image/mask pair"],
        },
        Case {
            name: "config that is a device",
            args: vec!["train".into(), "/dev/zero".into()],
            expect: vec!["/dev/zero", "not a regular file"],
        },
        Case {
            name: "empty images folder",
            args: train(&config(&dir, &empty, ""), &[]),
            expect: vec!["empty/images", "holds no .png, .jpg or .jpeg image"],
        },
        Case {
            name: "empty data set",
            args: train(&config(&dir, &empty, ""), &[]),
            expect: vec!["empty", "found 0 image/mask pair"],
        },
        Case {
            name: "empty validation split",
            args: train(&config(&dir, &single, ""), &[]),
            expect: vec!["the validation split is empty", "val/images"],
        },
        Case {
            name: "no images/ folder",
            args: train(&config(&dir, &no_folders, ""), &[]),
            expect: vec!["images", "missing folder"],
        },
        Case {
            name: "missing data root",
            args: train(&config(&dir, &dir.join("nowhere"), ""), &[]),
            expect: vec!["data.root", "does not exist"],
        },
        Case {
            name: "missing config file",
            args: vec!["train".into(), s(&dir.join("missing.toml"))],
            expect: vec!["missing.toml", "cannot read config"],
        },
        Case {
            name: "TOML syntax error",
            args: vec!["train".into(), s(&syntax)],
            expect: vec!["syntax.toml", "line 4", "column"],
        },
        Case {
            name: "unknown key",
            args: train(&good_cfg, &["--set", "train.epoch=2"]),
            expect: vec!["train", "epoch", "did you mean `epochs`"],
        },
        Case {
            name: "misspelled table",
            args: train(&good_cfg, &["--set", "modle.depth=2"]),
            expect: vec!["modle", "did you mean `model`"],
        },
        Case {
            name: "wrong type",
            args: train(&good_cfg, &["--set", "train.epochs=\"ten\""]),
            expect: vec!["train.epochs", "invalid type"],
        },
        Case {
            name: "negative epochs",
            args: train(&good_cfg, &["--set", "train.epochs=-1"]),
            expect: vec!["train.epochs"],
        },
        Case {
            name: "one fold",
            args: train(&good_cfg, &["--set", "data.folds=1"]),
            expect: vec!["data.folds", ">= 2"],
        },
        Case {
            name: "held-out fold beyond the folds",
            args: train(
                &good_cfg,
                &["--set", "data.folds=3", "--set", "data.fold=3"],
            ),
            expect: vec!["data.fold", "0..=2"],
        },
        Case {
            name: "fold without folds",
            args: train(&good_cfg, &["--set", "data.fold=1"]),
            expect: vec!["data.fold", "data.folds is not set"],
        },
        Case {
            name: "more folds than images",
            args: train(&good_cfg, &["--set", "data.folds=7"]),
            expect: vec!["data.folds", "7 folds need at least 7", "found 6"],
        },
        Case {
            name: "unknown model kind",
            args: train(&good_cfg, &["--set", "model.kind=\"unte\""]),
            expect: vec!["model.kind", "unte", "unet"],
        },
        Case {
            name: "deep supervision on a shallow U-Net",
            args: train(&good_cfg, &["--set", "model.deep_supervision=true"]),
            expect: vec!["model.deep_supervision", "depth ≥ 3", "got depth 2"],
        },
        Case {
            name: "zero epochs",
            args: train(&good_cfg, &["--set", "train.epochs=0"]),
            expect: vec!["train.epochs", ">= 1"],
        },
        Case {
            name: "zero batch size",
            args: train(&good_cfg, &["--set", "train.batch_size=0"]),
            expect: vec!["train.batch_size", ">= 1"],
        },
        Case {
            name: "image size not divisible",
            args: train(&good_cfg, &["--set", "data.image_size=30"]),
            expect: vec!["data.image_size", "2^depth"],
        },
        Case {
            name: "negative gamma",
            args: train(
                &good_cfg,
                &[
                    "--set",
                    "loss.0.kind=\"focal\"",
                    "--set",
                    "loss.0.gamma=-2.0",
                ],
            ),
            expect: vec!["loss.0", "gamma", ">= 0"],
        },
        Case {
            name: "unknown loss kind",
            args: train(&good_cfg, &["--set", "loss.0.kind=\"dcie\""]),
            expect: vec!["loss.0.kind", "did you mean `dice`"],
        },
        Case {
            name: "malformed --set",
            args: train(&good_cfg, &["--set", "train.epochs"]),
            expect: vec!["--set train.epochs", "key=value"],
        },
        Case {
            name: "unknown device",
            args: train(&good_cfg, &["--device", "tpu:0"]),
            expect: vec!["unknown device", "tpu:0"],
        },
        Case {
            name: "CUDA in a CPU-only build (an absent GPU in a CUDA build)",
            args: train(&good_cfg, &["--device", "cuda:7"]),
            expect: if cfg!(feature = "cuda") {
                vec!["CUDA device 7 is not usable"]
            } else {
                vec!["without CUDA support", "--features cuda"]
            },
        },
        Case {
            name: "Metal in a build without it",
            args: train(&good_cfg, &["--device", "metal"]),
            expect: if cfg!(feature = "metal") {
                vec!["Metal device is not usable"]
            } else {
                vec!["without Metal support", "--features metal", "macOS"]
            },
        },
        Case {
            name: "model file not safetensors",
            args: vec![
                "eval".into(),
                "--model".into(),
                s(&not_st),
                "--data".into(),
                s(&good),
            ],
            expect: vec!["not.safetensors", "not a valid safetensors file"],
        },
        Case {
            name: "truncated model file",
            args: vec![
                "eval".into(),
                "--model".into(),
                s(&trunc_model),
                "--data".into(),
                s(&good),
            ],
            expect: vec!["truncated.safetensors", "not a valid safetensors file"],
        },
        Case {
            name: "model header claiming huge sizes",
            args: vec![
                "eval".into(),
                "--model".into(),
                s(&huge),
                "--data".into(),
                s(&good),
            ],
            expect: vec!["huge.safetensors", "not a valid safetensors file"],
        },
        Case {
            name: "model header of absurd length",
            args: vec![
                "eval".into(),
                "--model".into(),
                s(&huge_header),
                "--data".into(),
                s(&good),
            ],
            expect: vec!["huge-header.safetensors", "not a valid safetensors file"],
        },
        Case {
            name: "safetensors that is no segtrain model",
            args: vec![
                "predict".into(),
                "--model".into(),
                s(&plain_st),
                s(&good.join("images/p0.png")),
                "--out".into(),
                s(&dir.join("o1")),
            ],
            expect: vec!["plain.safetensors", "not a segtrain model"],
        },
        Case {
            name: "model of another architecture",
            args: vec![
                "eval".into(),
                "--model".into(),
                s(&other_depth),
                "--data".into(),
                s(&good),
            ],
            expect: vec!["depth3.safetensors", "missing tensor"],
        },
        Case {
            name: "model of another class count",
            args: vec![
                "eval".into(),
                "--model".into(),
                s(&other_classes),
                "--data".into(),
                s(&good),
            ],
            expect: vec!["classes3.safetensors", "head.weight", "shape"],
        },
        Case {
            name: "predict on a missing input",
            args: vec![
                "predict".into(),
                "--model".into(),
                s(&model),
                s(&dir.join("ghost.png")),
                "--out".into(),
                s(&dir.join("o2")),
            ],
            expect: vec!["ghost.png", "no such input"],
        },
        Case {
            name: "unwritable output folder",
            args: vec![
                "predict".into(),
                "--model".into(),
                s(&model),
                s(&good.join("images/p0.png")),
                "--out".into(),
                s(&read_only_parent.join("sub")),
            ],
            expect: vec!["a-file", "cannot create the output folder"],
        },
        Case {
            name: "training into a finished run",
            args: vec!["train".into(), s(&good_cfg), "--runs".into(), s(&runs)],
            expect: vec!["already holds a finished run", "--resume", "--overwrite"],
        },
        Case {
            name: "eval on a missing data folder",
            args: vec![
                "eval".into(),
                "--model".into(),
                s(&model),
                "--data".into(),
                s(&dir.join("nothing")),
            ],
            expect: vec!["nothing", "no images/"],
        },
        Case {
            name: "bad overlap",
            args: vec![
                "eval".into(),
                "--model".into(),
                s(&model),
                "--data".into(),
                s(&good),
                "--overlap".into(),
                "1.5".into(),
            ],
            expect: vec!["--overlap", "[0, 0.95)"],
        },
    ];
    assert!(cases.len() >= 25);
    let mut failures = vec![];
    for case in &cases {
        let args: Vec<&str> = case.args.iter().map(String::as_str).collect();
        let out = segtrain(&args);
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        let problems: Vec<String> = [
            (!out.status.success())
                .then_some(())
                .is_none()
                .then(|| "exited 0".to_string()),
            stderr.contains("panicked").then(|| "panicked".to_string()),
        ]
        .into_iter()
        .flatten()
        .chain(
            case.expect
                .iter()
                .filter(|e| !stderr.contains(*e))
                .map(|e| format!("lacks {e:?}")),
        )
        .collect();
        if !problems.is_empty() {
            failures.push(format!(
                "{}: {} — stderr: {}",
                case.name,
                problems.join(", "),
                stderr.trim()
            ));
        }
        sentinels.check();
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn sixteen_bit_and_palette_masks_are_accepted() {
    let dir = temp_dir("mask-formats");
    let root = dir.join("data");
    dataset(&root, 6);
    // 16-bit binary mask and a palette class-index mask
    let wide = image::ImageBuffer::<image::Luma<u16>, Vec<u16>>::from_fn(48, 48, |x, _| {
        image::Luma([if x > 24 { 65535 } else { 0 }])
    });
    wide.save(root.join("masks/p0.png")).unwrap();
    palette_mask(&root.join("masks/p1.png"), 48, 48, |x, _| u8::from(x > 10));
    let cfg = config(&dir, &root, "");
    ok(&common::train_args(&cfg, &dir.join("runs"), &[]));
    // palette indices are classes: a 3-class palette mask loads as indices 0..2
    let multi = dir.join("multi");
    dataset(&multi, 6);
    for i in 0..6 {
        palette_mask(&multi.join(format!("masks/p{i}.png")), 48, 48, |x, y| {
            ((x / 16 + y / 24) % 3) as u8
        });
    }
    let cfg = config(&dir, &multi, "");
    ok(&common::train_args(
        &cfg,
        &dir.join("runs2"),
        &[
            "--set",
            "data.classes=3",
            "--set",
            "loss.0.kind=\"cross_entropy\"",
        ],
    ));
}
