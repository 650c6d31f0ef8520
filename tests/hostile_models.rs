//! Hostile model files, extreme config values and bench arguments: each is refused with an error
//! naming the file (or key, or argument) and the field, exit code 1, no panic, no abort, within
//! bounded memory and time, and nothing already written is changed.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fails_bounded, ok, temp_dir, tiny_config, tiny_dataset};
use segtrain::config::Config;
use segtrain::data::{Normalization, Normalizer};
use segtrain::export::{self, ModelMeta};
use segtrain::inference::Window;
use segtrain::model::UNetConfig;
use segtrain::model::{Activation, ModelKind};
use segtrain::rules;

/// A freshly initialised U-Net (3 channels, base width 4, depth 2) saved as a model file.
fn tiny_model(path: &Path, classes: usize, window: Window) {
    let unet = UNetConfig {
        in_channels: 3,
        classes,
        base_width: 4,
        depth: 2,
    };
    let (_, vars) = segtrain::model::init(unet, Some(0.1), false, 1, &Device::Cpu).unwrap();
    let tensors = export::state_dict(&unet, &vars, 0, DType::F32).unwrap();
    let meta = ModelMeta {
        kind: ModelKind::Unet,
        unet,
        window,
        activation: Activation::default_for(classes),
        normalizer: Normalizer::dataset(vec![0.5; 3], vec![0.25; 3]),
        ignore_index: None,
        temperature: 1.0,
        config: "name = \"tiny\"\n".into(),
        metrics: serde_json::json!({ "dice": 0.5 }),
        slicing: None,
    };
    export::save(path, &tensors, &meta).unwrap();
}

fn read(path: &Path) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    segtrain::fsutil::read_safetensors(path, &Device::Cpu).unwrap()
}

fn write(path: &Path, tensors: HashMap<String, Tensor>, meta: HashMap<String, String>) {
    let list: Vec<(String, Tensor)> = tensors.into_iter().collect();
    segtrain::fsutil::write_safetensors(path, &list, Some(meta)).unwrap();
}

/// A copy of `src` with metadata `key` set to `value` (removed for None).
fn relabel(src: &Path, dst: &Path, key: &str, value: Option<&str>) -> PathBuf {
    let (tensors, mut meta) = read(src);
    match value {
        Some(v) => meta.insert(key.into(), v.into()),
        None => meta.remove(key),
    };
    write(dst, tensors, meta);
    dst.to_path_buf()
}

/// A copy of `src` with the values of tensor `name` changed by `edit`.
fn retensor(src: &Path, dst: &Path, name: &str, edit: impl Fn(&mut Vec<f32>)) -> PathBuf {
    let (mut tensors, meta) = read(src);
    let t = &tensors[name];
    let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    edit(&mut v);
    let new = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
    tensors.insert(name.into(), new);
    write(dst, tensors, meta);
    dst.to_path_buf()
}

fn load_error(path: &Path) -> String {
    match export::load(path, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_refused(path: &Path, expect: &[&str]) {
    let e = load_error(path);
    let name = path.file_name().unwrap().to_str().unwrap();
    assert!(e.contains(name), "{e}: does not name {name}");
    for x in expect {
        assert!(e.contains(x), "`{x}` not in: {e}");
    }
}

#[test]
fn every_metadata_field_is_checked_and_named() {
    let dir = temp_dir("hostile-meta");
    let whole = dir.join("whole.safetensors");
    tiny_model(&whole, 1, Window::Whole { size: 32 });
    let sliding = dir.join("sliding.safetensors");
    tiny_model(
        &sliding,
        1,
        Window::Sliding {
            patch: 16,
            overlap: 0.5,
            blend: segtrain::data::Blend::Gaussian,
        },
    );
    // the unmodified files load
    export::load(&whole, &Device::Cpu).unwrap();
    export::load(&sliding, &Device::Cpu).unwrap();
    let window = |patch: &str, overlap: &str| {
        format!(r#"{{"sliding":{{"patch":{patch},"overlap":{overlap},"blend":"gaussian"}}}}"#)
    };
    let cases: Vec<(&Path, &str, Option<String>, Vec<&str>)> = vec![
        (
            &whole,
            "depth",
            Some("100000000".into()),
            vec!["`depth`", "≤ 6"],
        ),
        (&whole, "depth", Some("40".into()), vec!["`depth`", "≤ 6"]),
        (&whole, "depth", Some("0".into()), vec!["`depth`", ">= 1"]),
        (
            &whole,
            "depth",
            Some("-1".into()),
            vec!["`depth`", "whole number"],
        ),
        (
            &whole,
            "depth",
            Some("two".into()),
            vec!["`depth`", "whole number"],
        ),
        (&whole, "depth", None, vec!["lacks `depth`"]),
        (
            &whole,
            "base_width",
            Some("1000000".into()),
            vec!["`base_width`", "≤ 1024"],
        ),
        (&whole, "base_width", Some("0".into()), vec!["`base_width`"]),
        (
            &whole,
            "in_channels",
            Some("2".into()),
            vec!["`in_channels`", "1 or 3"],
        ),
        (
            &whole,
            "in_channels",
            Some("0".into()),
            vec!["`in_channels`"],
        ),
        (&whole, "classes", Some("0".into()), vec!["`classes`"]),
        (
            &whole,
            "classes",
            Some("100000".into()),
            vec!["`classes`", "≤ 256"],
        ),
        (
            &whole,
            "classes",
            Some("18446744073709551616".into()),
            vec!["`classes`"],
        ),
        // window: sizes, overlap, consistency with image_size / patch_size and depth
        (
            &whole,
            "window",
            Some(r#"{"whole":{"size":33}}"#.into()),
            vec!["`image_size`", "2^depth"],
        ),
        (
            &whole,
            "window",
            Some(r#"{"whole":{"size":0}}"#.into()),
            vec!["`image_size`"],
        ),
        (
            &whole,
            "window",
            Some(r#"{"whole":{"size":1073741824}}"#.into()),
            vec!["`image_size`", "≤ 16384"],
        ),
        (
            &whole,
            "image_size",
            Some("64".into()),
            vec!["`image_size`", "disagrees"],
        ),
        (&whole, "window", Some("[1, 2]".into()), vec!["`window`"]),
        (&whole, "window", Some("{".into()), vec!["`window`"]),
        (
            &sliding,
            "window",
            Some(window("0", "0.5")),
            vec!["`patch_size`", "2^depth"],
        ),
        (
            &sliding,
            "window",
            Some(window("100000", "0.5")),
            vec!["`patch_size`", "≤ 16384"],
        ),
        (
            &sliding,
            "window",
            Some(window("16", "1.0")),
            vec!["`window`", "[0, 0.95)"],
        ),
        (
            &sliding,
            "window",
            Some(window("16", "-0.5")),
            vec!["`window`", "[0, 0.95)"],
        ),
        (
            &sliding,
            "window",
            Some(window("18", "0.5")),
            vec!["`patch_size`", "2^depth"],
        ),
        (
            &sliding,
            "patch_size",
            Some("32".into()),
            vec!["`patch_size`", "disagrees"],
        ),
        (
            &sliding,
            "image_size",
            Some("32".into()),
            vec!["`image_size`", "contradicts"],
        ),
        // preprocessing and output
        (
            &whole,
            "activation",
            Some("softmax".into()),
            vec!["`activation`", "2 classes"],
        ),
        (
            &whole,
            "activation",
            Some("tanh".into()),
            vec!["`activation`", "tanh"],
        ),
        (
            &whole,
            "mean",
            Some("[0.5, 0.5]".into()),
            vec!["`mean`", "2 entries for 3 channels"],
        ),
        (
            &whole,
            "mean",
            Some("[0.5, 0.5, 1e39]".into()),
            vec!["`mean`"],
        ),
        (
            &whole,
            "mean",
            Some("[0.5, 0.5, NaN]".into()),
            vec!["`mean`"],
        ),
        (&whole, "mean", Some("\"grey\"".into()), vec!["`mean`"]),
        (
            &whole,
            "std",
            Some("[0.2, 0.0, 0.2]".into()),
            vec!["`std`", "> 0"],
        ),
        (
            &whole,
            "std",
            Some("[0.2, -1, 0.2]".into()),
            vec!["`std`", "> 0"],
        ),
        (
            &whole,
            "std",
            Some("[0.2, 1e-30, 0.2]".into()),
            vec!["`std`"],
        ),
        (
            &whole,
            "std",
            Some("[0.2, 1e300, 0.2]".into()),
            vec!["`std`"],
        ),
        (
            &whole,
            "normalize",
            Some("\"percentile\"".into()),
            vec!["`normalize`", "unknown variant"],
        ),
        (
            &whole,
            "normalize",
            Some("image".into()),
            vec!["`normalize`"],
        ),
        (
            &whole,
            "clip_percentiles",
            Some("[99, 1]".into()),
            vec!["`clip_percentiles`", "0 <= lo < hi <= 100"],
        ),
        (
            &whole,
            "clip_percentiles",
            Some("[1, 1000]".into()),
            vec!["`clip_percentiles`"],
        ),
        (
            &whole,
            "clip_percentiles",
            Some("[1]".into()),
            vec!["`clip_percentiles`"],
        ),
        (
            &whole,
            "import",
            Some(r#"{"axis":"w","intensity":{"window":[0,1]}}"#.into()),
            vec!["`import`", "unknown variant"],
        ),
        (
            &whole,
            "import",
            Some(r#"{"axis":"z","intensity":{"window":[5,1]}}"#.into()),
            vec!["`import`", "LO < HI"],
        ),
        (
            &whole,
            "import",
            Some(r#"{"axis":"z","intensity":{"percentile":[1,400]}}"#.into()),
            vec!["`import`", "0 <= lo < hi <= 100"],
        ),
        (
            &whole,
            "temperature",
            Some("0".into()),
            vec!["`temperature`", "> 0"],
        ),
        (
            &whole,
            "temperature",
            Some("-1".into()),
            vec!["`temperature`"],
        ),
        (
            &whole,
            "temperature",
            Some("NaN".into()),
            vec!["`temperature`"],
        ),
        (
            &whole,
            "temperature",
            Some("inf".into()),
            vec!["`temperature`"],
        ),
        (
            &whole,
            "temperature",
            Some("1e-300".into()),
            vec!["`temperature`"],
        ),
        (
            &whole,
            "temperature",
            Some("warm".into()),
            vec!["`temperature`"],
        ),
        (
            &whole,
            "ignore_index",
            Some("0".into()),
            vec!["`ignore_index`", "classes..=255"],
        ),
        (
            &whole,
            "ignore_index",
            Some("300".into()),
            vec!["`ignore_index`"],
        ),
        (
            &whole,
            "ignore_index",
            Some("\"none\"".into()),
            vec!["`ignore_index`"],
        ),
        (
            &whole,
            "val_metrics",
            Some("[1, 2]".into()),
            vec!["`val_metrics`", "object"],
        ),
        (
            &whole,
            "val_metrics",
            Some("{".into()),
            vec!["`val_metrics`"],
        ),
        (
            &whole,
            "val_metrics",
            Some(format!("{}{}", "[".repeat(100_000), "]".repeat(100_000))),
            vec!["`val_metrics`"],
        ),
        (
            &whole,
            "format",
            Some("segtrain-checkpoint/1".into()),
            vec!["checkpoint, not a model"],
        ),
        (
            &whole,
            "format",
            Some("segtrain-unet/2".into()),
            vec!["unsupported model format"],
        ),
        // sizes: a metadata string of 2 MB, and one larger than any model's header
        (
            &whole,
            "config",
            Some("x".repeat(2 << 20)),
            vec!["metadata of", "bytes"],
        ),
        (
            &whole,
            "config",
            Some("x".repeat(12 << 20)),
            vec!["header of", "bytes"],
        ),
    ];
    for (i, (src, key, value, expect)) in cases.iter().enumerate() {
        let dst = dir.join(format!("case{i}-{key}.safetensors"));
        relabel(src, &dst, key, value.as_deref());
        assert_refused(&dst, expect);
        // the metadata check comes before any tensor is looked at or built
        let e = load_error(&dst);
        assert!(!e.contains("missing tensor"), "{key}: {e}");
    }
    // an absent window key (older files) falls back to image_size, also checked
    let old = relabel(&whole, &dir.join("old.safetensors"), "window", None);
    export::load(&old, &Device::Cpu).unwrap();
    let old_bad = relabel(
        &old,
        &dir.join("old-bad.safetensors"),
        "image_size",
        Some("30"),
    );
    assert_refused(&old_bad, &["`image_size`", "2^depth"]);
}

#[test]
fn the_model_kind_is_written_checked_and_defaults_to_unet() {
    let dir = temp_dir("kind-meta");
    let src = dir.join("model.safetensors");
    tiny_model(&src, 1, Window::Whole { size: 32 });
    assert_eq!(read(&src).1.get("kind").map(String::as_str), Some("unet"));
    let unknown = relabel(&src, &dir.join("unknown.safetensors"), "kind", Some("vnet"));
    assert_refused(&unknown, &["`kind`", "vnet", "unet"]);
    // a file written before `kind` existed holds a U-Net
    let old = relabel(&src, &dir.join("old.safetensors"), "kind", None);
    let (model, meta) = export::load(&old, &Device::Cpu).unwrap();
    assert_eq!(
        (model.kind(), meta.kind),
        (ModelKind::Unet, ModelKind::Unet)
    );
}

#[test]
fn normalisation_round_trips_and_older_files_mean_dataset_statistics() {
    let dir = temp_dir("normalisation-meta");
    let src = dir.join("model.safetensors");
    tiny_model(&src, 1, Window::Whole { size: 32 });
    // per-image z-score with clipping is written and read back
    let (tensors, mut meta) = read(&src);
    meta.insert("normalize".into(), "\"image\"".into());
    meta.insert("clip_percentiles".into(), "[0.5,99.5]".into());
    let image = dir.join("image.safetensors");
    write(&image, tensors, meta);
    let n = export::load(&image, &Device::Cpu).unwrap().1.normalizer;
    assert_eq!(n.mode, Normalization::Image);
    assert_eq!(n.clip, Some([0.5, 99.5]));
    // a file written before these fields existed normalises with the data set's statistics
    let old = relabel(&src, &dir.join("old.safetensors"), "normalize", None);
    let old = relabel(
        &old,
        &dir.join("older.safetensors"),
        "clip_percentiles",
        None,
    );
    let n = export::load(&old, &Device::Cpu).unwrap().1.normalizer;
    assert_eq!(n, Normalizer::dataset(vec![0.5; 3], vec![0.25; 3]));
}

#[test]
fn unusable_weights_are_refused() {
    let dir = temp_dir("hostile-weights");
    let src = dir.join("model.safetensors");
    tiny_model(&src, 1, Window::Whole { size: 32 });
    for (name, value, expect) in [
        ("inc.conv1.weight", f32::NAN, "non-finite"),
        ("up2.up.bias", f32::INFINITY, "non-finite"),
        ("head.weight", f32::NEG_INFINITY, "non-finite"),
        ("down1.bn2.running_mean", f32::NAN, "non-finite"),
        ("down2.bn1.running_var", -1.0, "negative variance"),
    ] {
        let dst = dir.join(format!("{name}.safetensors"));
        retensor(&src, &dst, name, |v| v[0] = value);
        assert_refused(&dst, &[name, expect]);
    }
    // finite weights whose outputs overflow
    let huge = dir.join("huge.safetensors");
    retensor(&src, &huge, "up2.bn2.bias", |v| {
        v.iter_mut().for_each(|x| *x = 1e3)
    });
    for name in ["head.weight", "head.bias"] {
        retensor(&huge, &huge, name, |v| v.iter_mut().for_each(|x| *x = 3e38));
    }
    assert_refused(&huge, &["non-finite outputs"]);
}

#[test]
fn predict_and_calibrate_refuse_hostile_models_and_leave_them_unchanged() {
    let dir = temp_dir("hostile-cli");
    let data = tiny_dataset(&dir, "data", "lesion", 3, 32);
    let src = dir.join("model.safetensors");
    tiny_model(&src, 1, Window::Whole { size: 32 });
    let nan = retensor(
        &src,
        &dir.join("nan.safetensors"),
        "up1.conv1.weight",
        |v| v[3] = f32::NAN,
    );
    let deep = relabel(
        &src,
        &dir.join("deep.safetensors"),
        "depth",
        Some("100000000"),
    );
    // constant logits: the NLL does not depend on T, the search ends on its edge
    let flat = retensor(&src, &dir.join("flat.safetensors"), "head.weight", |v| {
        v.iter_mut().for_each(|x| *x = 0.0)
    });
    let flat = retensor(&flat, &flat, "head.bias", |v| v[0] = 0.0);
    let out = dir.join("out");
    let image = data
        .join("images")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    for (model, expect) in [
        (
            &nan,
            vec!["nan.safetensors", "up1.conv1.weight", "non-finite"],
        ),
        (&deep, vec!["deep.safetensors", "`depth`", "≤ 6"]),
    ] {
        let before = std::fs::read(model).unwrap();
        let m = s(model);
        fails_bounded(
            &["predict", "--model", &m, "--out", &s(&out), &s(&image)],
            2048,
            60,
            &expect,
        );
        fails_bounded(
            &["calibrate", "--model", &m, "--data", &s(&data)],
            2048,
            60,
            &expect,
        );
        assert_eq!(std::fs::read(model).unwrap(), before, "{m} changed");
    }
    assert!(!out.exists() || out.read_dir().unwrap().next().is_none());
    let before = std::fs::read(&flat).unwrap();
    fails_bounded(
        &["calibrate", "--model", &s(&flat), "--data", &s(&data)],
        2048,
        60,
        &[
            "flat.safetensors",
            "edge of the search range",
            "left unchanged",
        ],
    );
    assert_eq!(
        std::fs::read(&flat).unwrap(),
        before,
        "flat.safetensors changed"
    );
    // a sound model calibrates, on whole images and on windows past small images' edges
    ok(&["calibrate", "--model", &s(&src), "--data", &s(&data)]);
    let patch = dir.join("patch.safetensors");
    tiny_model(
        &patch,
        1,
        Window::Sliding {
            patch: 64,
            overlap: 0.5,
            blend: segtrain::data::Blend::Gaussian,
        },
    );
    ok(&["calibrate", "--model", &s(&patch), "--data", &s(&data)]);
    // an empty and a one-pixel data set: nothing to fit, or a fit on the edge of the range
    let empty = dir.join("empty");
    let one = dir.join("one");
    for d in [&empty, &one] {
        std::fs::create_dir_all(d.join("images")).unwrap();
        std::fs::create_dir_all(d.join("masks")).unwrap();
    }
    image::RgbImage::from_pixel(1, 1, image::Rgb([10, 200, 30]))
        .save(one.join("images/a.png"))
        .unwrap();
    image::GrayImage::from_pixel(1, 1, image::Luma([255]))
        .save(one.join("masks/a.png"))
        .unwrap();
    for model in [&src, &patch] {
        let before = std::fs::read(model).unwrap();
        fails_bounded(
            &["calibrate", "--model", &s(model), "--data", &s(&empty)],
            2048,
            60,
            &["empty", "found 0 image/mask pair(s)"],
        );
        fails_bounded(
            &["calibrate", "--model", &s(model), "--data", &s(&one)],
            2048,
            60,
            &["one", "edge of the search range", "left unchanged"],
        );
        assert_eq!(std::fs::read(model).unwrap(), before);
    }
    // sizes the rules allow but this machine's (capped) memory cannot predict at
    let big = relabel(
        &src,
        &dir.join("big.safetensors"),
        "window",
        Some(r#"{"whole":{"size":16384}}"#),
    );
    let big = relabel(&big, &big, "image_size", Some("16384"));
    fails_bounded(
        &[
            "predict",
            "--model",
            &s(&big),
            "--out",
            &s(&out),
            &s(&image),
        ],
        2048,
        60,
        &["big.safetensors", "`image_size` = 16384", "needs about"],
    );
    // a checkpoint is not a model
    let ckpt = relabel(
        &src,
        &dir.join("checkpoint.safetensors"),
        "format",
        Some("segtrain-checkpoint/1"),
    );
    fails_bounded(
        &[
            "predict",
            "--model",
            &s(&ckpt),
            "--out",
            &s(&out),
            &s(&image),
        ],
        2048,
        60,
        &["checkpoint.safetensors", "checkpoint, not a model"],
    );
}

#[test]
fn extreme_config_values_are_refused_with_their_bound() {
    let dir = temp_dir("hostile-config");
    let cfg = tiny_config(&dir, &dir.join("no-data"), "");
    let runs = dir.join("runs");
    let cases: [(&[&str], &[&str]); 17] = [
        (
            &["data.image_size=1073741824"],
            &["data.image_size", "≤ 16384"],
        ),
        (
            &["model.base_width=1000000"],
            &["model.base_width", "≤ 1024"],
        ),
        (&["model.depth=40"], &["model.depth", "≤ 6"]),
        (&["data.workers=100000"], &["data.workers", "≤ 64"]),
        (&["data.classes=100000"], &["data.classes", "≤ 256"]),
        (
            &["train.batch_size=1000000000"],
            &["train.batch_size", "≤ 4096"],
        ),
        (
            &["train.epochs=1000000000000"],
            &["train.epochs", "≤ 1000000"],
        ),
        (
            &["train.steps_per_epoch=9223372036854775807"],
            &["train.steps_per_epoch", "≤ 1000000"],
        ),
        (
            &["train.steps_per_epoch=1000000", "train.batch_size=100"],
            &["train.steps_per_epoch", "items per epoch"],
        ),
        (&["data.std=[0.2, 1e300, 0.2]"], &["data.std"]),
        (&["data.mean=[0.2, 1e300, 0.2]"], &["data.mean"]),
        (
            &["data.ignore_index=0"],
            &["data.ignore_index", "classes..=255"],
        ),
        (
            &["model.activation=\"softmax\""],
            &["model.activation", "2 classes"],
        ),
        (&["data.overlap=1.0"], &["data.overlap", "[0, 0.95)"]),
        (
            &["data.clip_percentiles=[99.5, 0.5]"],
            &["data.clip_percentiles", "0 <= lo < hi <= 100"],
        ),
        (
            &["data.clip_percentiles=[-1, 50]"],
            &["data.clip_percentiles"],
        ),
        (
            &["data.normalize=\"per_image\""],
            &[
                "data.normalize",
                "unknown value `per_image`",
                "dataset, image",
            ],
        ),
    ];
    for (sets, expect) in cases {
        let mut extra = vec![];
        for set in sets {
            extra.extend(["--set", set]);
        }
        let args = common::train_args(&cfg, &runs, &extra);
        fails_bounded(&args, 1024, 60, expect);
    }
    assert!(!runs.exists(), "a refused config created its run folder");
}

#[test]
fn training_memory_is_estimated_before_any_data_is_read() {
    let text = |extra: &str| {
        format!(
            "name = \"m\"\n[data]\nroot = \"nowhere\"\nchannels = 3\nclasses = 1\n{extra}\n[model]\nbase_width = 16\ndepth = 4\n[train]\nepochs = 1\nbatch_size = 8\n[[loss]]\nkind = \"dice\"\n"
        )
    };
    let small = Config::from_toml(&text("image_size = 128"), &[]).unwrap();
    let (host, device) = small.training_memory(&Device::Cpu);
    // `segtrain bench --batch 8 --size 128` peaks at ≈ 330 MB
    assert!((100e6..1e9).contains(&host), "{host}");
    assert_eq!(device, 0.0);
    let budget = 2u64 << 30;
    assert!(segtrain::config::check_memory_budget(&small, &Device::Cpu, Some(budget)).is_ok());
    // patches far larger than the images: padded, and the memory grows with the patch
    let huge = Config::from_toml(&text("patch_size = 4096"), &[]).unwrap();
    let e = segtrain::config::check_memory_budget(&huge, &Device::Cpu, Some(budget))
        .unwrap_err()
        .to_string();
    for x in [
        "needs about",
        "GiB",
        "data.patch_size = 4096",
        "train.batch_size = 8",
    ] {
        assert!(e.contains(x), "`{x}` not in {e}");
    }
    // a config too large for the model file's metadata is refused before training
    let huge_root = text("image_size = 32").replace("nowhere", &"r".repeat(600_000));
    let e = Config::from_toml(&huge_root, &[]).unwrap_err().to_string();
    assert!(e.contains("resolved config"), "{e}");
    // unknown available memory: no check
    assert!(segtrain::config::check_memory_budget(&huge, &Device::Cpu, None).is_ok());
    // the bound of every size keeps the estimate finite
    let widest = Config::from_toml(
        &text("image_size = 16384"),
        &[
            "model.base_width=1024".into(),
            "model.depth=6".into(),
            "train.batch_size=4096".into(),
        ],
    )
    .unwrap();
    assert!(widest.training_memory(&Device::Cpu).0.is_finite());
}

/// Needs `crate::config::check_training_memory(config, &device)?` at the start of
/// `train::train` (right after the device is opened), which the lead owns.
#[test]
fn training_that_cannot_fit_is_refused_before_reading_data() {
    let dir = temp_dir("hostile-memory");
    let data = tiny_dataset(&dir, "data", "lesion", 4, 32);
    // patches far larger than the 32² images: padded, 4096² activations
    let cfg = tiny_config(&dir, &data, "");
    let runs = dir.join("runs");
    let args = common::train_args(
        &cfg,
        &runs,
        &[
            "--set",
            "data.patch_size=4096",
            "--set",
            "model.base_width=16",
        ],
    );
    fails_bounded(
        &args,
        2048,
        60,
        &["needs about", "GiB", "data.patch_size = 4096", "available"],
    );
    assert!(!runs.join("tiny").join("model.safetensors").exists());
}

#[test]
fn bench_arguments_are_checked_with_the_config_rules() {
    for (args, expect) in [
        (vec!["--size", "0"], vec!["--size", "2^depth"]),
        (vec!["--size", "33"], vec!["--size", "2^depth"]),
        (vec!["--depth", "40"], vec!["--depth", "≤ 6"]),
        (vec!["--depth", "0"], vec!["--depth", ">= 1"]),
        (
            vec!["--base-width", "1000000"],
            vec!["--base-width", "≤ 1024"],
        ),
        (vec!["--channels", "7"], vec!["--channels", "1 or 3"]),
        (vec!["--batch", "0"], vec!["--batch", ">= 1"]),
        (vec!["--steps", "0"], vec!["--steps", ">= 1"]),
        (
            vec!["--size", "16384", "--batch", "4096"],
            vec!["needs about", "available"],
        ),
        (vec!["--loss", "--size", "0"], vec!["--size", ">= 1"]),
        (
            vec!["--infer", "--size", "1048576"],
            vec!["--size", "≤ 16384"],
        ),
    ] {
        let mut full = vec!["bench"];
        full.extend(args);
        fails_bounded(&full, 1024, 60, &expect);
    }
}

#[test]
fn rules_are_shared_by_config_and_model_loader() {
    assert!(rules::side(32, 2, "depth").is_ok());
    assert!(rules::side(36, 2, "depth").is_ok());
    assert!(rules::side(34, 2, "depth").is_err());
    assert!(rules::side(rules::MAX_SIDE * 2, 1, "depth").is_err());
    // an out-of-range depth does not overflow the 2^depth it computes
    assert!(rules::side(64, usize::MAX, "depth").is_err());
    assert!(rules::overlap(f64::NAN).is_err());
    assert!(rules::temperature(f64::NAN).is_err());
    assert!(rules::std(&[f64::NAN], 1).is_err());
    assert!(rules::mean(&[f64::INFINITY], 1).is_err());
    // window origins stay few and in range whatever the overlap
    let starts = segtrain::inference::window_starts(100, 16, 1.0);
    assert!(starts.len() <= 100 && *starts.last().unwrap() == 84);
    assert_eq!(segtrain::inference::window_starts(8, 16, 0.5), vec![0]);
}
