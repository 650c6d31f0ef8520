//! `segtrain plan`: the planning rules on small generated data sets, and every planned config
//! trains without edits.

mod common;

use std::path::{Path, PathBuf};

use common::{fails, ok, temp_dir, tiny_dataset};

/// Plans `data` (a fixed step time, a tiny budget) and returns the config's path and text.
fn plan(dir: &Path, data: &Path, name: &str) -> (PathBuf, String) {
    let out = dir.join(format!("{name}.toml"));
    ok(&[
        "plan",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--name",
        name,
        "--budget-minutes",
        "0.05",
        "--step-seconds",
        "0.05",
    ]);
    let text = std::fs::read_to_string(&out).unwrap();
    (out, text)
}

/// The value of `key = …` in the planned TOML (first occurrence).
fn value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key} = ")))
        .map(str::trim)
}

/// Every setting line is preceded by a comment that explains it, or belongs to a group that
/// one comment explains.
fn assert_commented(text: &str) {
    for key in [
        "image_size",
        "patch_size",
        "channels",
        "classes",
        "epochs",
        "batch_size",
    ] {
        if let Some(at) = text
            .lines()
            .position(|l| l.starts_with(&format!("{key} = ")))
        {
            let before = text.lines().nth(at - 1).unwrap();
            assert!(before.starts_with('#'), "`{key}` has no comment:\n{text}");
        }
    }
    assert!(text.contains("# Fingerprint of"), "{text}");
}

fn train(dir: &Path, config: &Path) -> String {
    ok(&common::train_args(config, &dir.join("runs"), &[]))
}

#[test]
fn grey_scans_with_mostly_empty_slices() {
    let dir = temp_dir("plan-mri");
    let data = dir.join("mri");
    ok(&[
        "synth",
        "--out",
        data.to_str().unwrap(),
        "--kind",
        "mri",
        "--count",
        "20",
        "--size",
        "48",
        "--empty-fraction",
        "0.7",
        "--seed",
        "2",
    ]);
    let (config, text) = plan(&dir, &data, "mri");
    assert_commented(&text);
    assert_eq!(value(&text, "channels"), Some("1"), "{text}");
    assert_eq!(value(&text, "classes"), Some("1"), "{text}");
    assert!(
        text.contains("scan slices on a black background") || text.contains("grey"),
        "{text}"
    );
    // 48² images: whole images at the smallest side
    assert_eq!(value(&text, "image_size"), Some("64"), "{text}");
    assert!(text.contains("% of the images are empty"), "{text}");
    let empty: f64 = text
        .lines()
        .find(|l| l.contains("% of the images are empty"))
        .and_then(|l| l.split(';').next_back())
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!((55.0..=85.0).contains(&empty), "{text}");
    // the budget: at 0.05 s per update the epochs fill it, clamped to 5..500
    let epochs: usize = value(&text, "epochs").unwrap().parse().unwrap();
    assert!((5..=500).contains(&epochs));
    // grey scans: z-score per image; synthetic MRI has no outliers to clip
    assert_eq!(value(&text, "normalize"), Some("\"image\""), "{text}");
    assert_eq!(value(&text, "clip_percentiles"), None, "{text}");
    let out = train(&dir, &config);
    assert!(out.contains("best epoch"), "{out}");
}

#[test]
fn rgb_photographs_and_class_index_masks() {
    let dir = temp_dir("plan-rgb");
    let data = tiny_dataset(&dir, "lesion", "lesion", 10, 40);
    let (config, text) = plan(&dir, &data, "rgb");
    assert_commented(&text);
    assert_eq!(value(&text, "channels"), Some("3"), "{text}");
    assert!(text.contains("colour photographs"), "{text}");
    // colour carries meaning: the data set's statistics, not each image's
    assert_eq!(value(&text, "normalize"), None, "{text}");
    train(&dir, &config);

    let multi = tiny_dataset(&dir, "multi", "multiclass", 10, 40);
    let (config, text) = plan(&dir, &multi, "multi");
    assert_eq!(value(&text, "classes"), Some("3"), "{text}");
    assert!(text.contains("class indices"), "{text}");
    train(&dir, &config);
}

/// Large images whose small lesions a whole-image resize would erase: patches at native
/// resolution, oversampling the lesions; images of different sizes are fine.
#[test]
fn small_lesions_on_large_images_get_patches() {
    let dir = temp_dir("plan-patch");
    let data = dir.join("large");
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(data.join(sub)).unwrap();
    }
    for (i, side) in [400u32, 420, 380, 400, 440, 400].into_iter().enumerate() {
        let img = image::GrayImage::from_fn(side, side, |x, y| {
            image::Luma([((x * 7 + y * 3) % 200) as u8 + 20])
        });
        // one 3×3 lesion: 9 px at native resolution, under 1 px at 256²
        let c = 100 + 20 * i as u32;
        let mask = image::GrayImage::from_fn(side, side, |x, y| {
            image::Luma([if x.abs_diff(c) <= 1 && y.abs_diff(c) <= 1 {
                255
            } else {
                0
            }])
        });
        img.save(data.join(format!("images/s{i}.png"))).unwrap();
        mask.save(data.join(format!("masks/s{i}.png"))).unwrap();
    }
    let (config, text) = plan(&dir, &data, "large");
    assert_commented(&text);
    assert_eq!(value(&text, "patch_size"), Some("128"), "{text}");
    assert!(value(&text, "image_size").is_none(), "{text}");
    assert!(value(&text, "foreground_fraction").is_some(), "{text}");
    assert!(value(&text, "steps_per_epoch").is_some(), "{text}");
    assert!(
        text.contains("width median 400 (min 380, max 440)"),
        "{text}"
    );
    // training these 400² images is the slow part: one short epoch shows the config works
    ok(&common::train_args(
        &config,
        &dir.join("runs"),
        &[
            "--set",
            "train.epochs=1",
            "--set",
            "train.steps_per_epoch=2",
            "--set",
            "train.warmup_epochs=0",
        ],
    ));
}

#[test]
fn bad_plan_inputs_are_refused() {
    let dir = temp_dir("plan-bad");
    let err = fails(&["plan", dir.join("absent").to_str().unwrap()]);
    assert!(err.contains("absent"), "{err}");
    let data = tiny_dataset(&dir, "lesion", "lesion", 4, 32);
    let err = fails(&["plan", data.to_str().unwrap(), "--budget-minutes", "0"]);
    assert!(err.contains("--budget-minutes"), "{err}");
    let err = fails(&["plan", data.to_str().unwrap(), "--step-seconds=-1"]);
    assert!(err.contains("--step-seconds"), "{err}");
}

/// Writes a data set of `n` grey 24² images whose masks hold `mask(i, x, y)` (16-bit PNGs when
/// a value exceeds 255).
fn masks_dataset(root: &Path, n: usize, mask: impl Fn(usize, u32, u32) -> u16) {
    for sub in ["images", "masks"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    for i in 0..n {
        image::GrayImage::from_fn(24, 24, |x, y| {
            image::Luma([((x * 9 + y * 5 + i as u32) % 250) as u8])
        })
        .save(root.join(format!("images/m{i}.png")))
        .unwrap();
        let values: Vec<u16> = (0..24 * 24).map(|p| mask(i, p % 24, p / 24)).collect();
        if values.iter().all(|&v| v <= 255) {
            let bytes: Vec<u8> = values.iter().map(|&v| v as u8).collect();
            image::GrayImage::from_raw(24, 24, bytes).unwrap()
        } else {
            return image::ImageBuffer::<image::Luma<u16>, _>::from_raw(24, 24, values)
                .unwrap()
                .save(root.join(format!("masks/m{i}.png")))
                .unwrap();
        }
        .save(root.join(format!("masks/m{i}.png")))
        .unwrap();
    }
}

type MaskFn = Box<dyn Fn(usize, u32, u32) -> u16>;

/// What the masks hold decides the classes: one non-zero value (1, 128, 1000) is binary;
/// several small ones are class indices, 255 beside them an ignore border; a value above 255
/// among several cannot be a class index. No foreground at all still plans (and says so).
#[test]
fn the_classes_follow_from_the_mask_values() {
    let dir = temp_dir("plan-classes");
    let square = |x: u32, y: u32| (6..12).contains(&x) && (6..12).contains(&y);
    let cases: Vec<(&str, MaskFn, &str, Option<&str>)> = vec![
        (
            "half",
            Box::new(move |_, x, y| if square(x, y) { 128 } else { 0 }),
            "1",
            None,
        ),
        (
            "wide",
            Box::new(move |_, x, y| if square(x, y) { 1000 } else { 0 }),
            "1",
            None,
        ),
        (
            "ignore",
            Box::new(move |i, x, y| match (x, square(x, y)) {
                (0, _) => 255,
                (_, true) => 1 + (i % 2) as u16,
                _ => 0,
            }),
            "3",
            Some("255"),
        ),
        ("empty", Box::new(|_, _, _| 0), "1", None),
    ];
    for (name, mask, classes, ignore) in cases {
        let root = dir.join(name);
        masks_dataset(&root, 5, mask);
        let (config, text) = plan(&dir, &root, name);
        assert_eq!(value(&text, "classes"), Some(classes), "{name}:\n{text}");
        assert_eq!(value(&text, "ignore_index"), ignore, "{name}:\n{text}");
        if name == "empty" {
            assert!(text.contains("no image has foreground"), "{text}");
        }
        if name == "ignore" {
            train(&dir, &config);
        }
    }
    let atlas = dir.join("atlas");
    masks_dataset(
        &atlas,
        4,
        move |i, x, y| if square(x, y) { [1, 2, 300, 7][i] } else { 0 },
    );
    let err = fails(&["plan", atlas.to_str().unwrap(), "--step-seconds", "0.05"]);
    assert!(err.contains("300") && err.contains("--label-map"), "{err}");
}

/// One image pair plans and trains (validated on itself, said so); a fixed split whose val/
/// is empty and a name that cannot be a folder are refused naming the cause.
#[test]
fn a_single_pair_trains_and_bad_splits_and_names_are_refused() {
    let dir = temp_dir("plan-single");
    let one = dir.join("one");
    masks_dataset(&one, 1, |_, x, y| u16::from(x > 10 && y > 10) * 255);
    let (config, text) = plan(&dir, &one, "one");
    assert!(text.contains("one image pair"), "{text}");
    let out = common::segtrain(&common::train_args(&config, &dir.join("runs"), &[]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("validating on the training image"),
        "{stderr}"
    );

    let split = dir.join("split");
    masks_dataset(&split.join("train"), 3, |_, x, _| u16::from(x > 10) * 255);
    for sub in ["val/images", "val/masks"] {
        std::fs::create_dir_all(split.join(sub)).unwrap();
    }
    let err = fails(&["plan", split.to_str().unwrap(), "--step-seconds", "0.05"]);
    assert!(
        err.contains("val") && err.contains("no image/mask pairs"),
        "{err}"
    );
    for name in ["a\nb", "..", "x/y", ""] {
        let err = fails(&[
            "plan",
            one.to_str().unwrap(),
            "--step-seconds",
            "0.05",
            "--name",
            name,
        ]);
        assert!(err.contains("--name"), "{name:?}: {err}");
    }
}

/// `data.normalize = "image"` with clipping is recorded in the model file and applied by
/// `predict`: an image and a copy of it at twice the brightness (exact in 8 bits) get the same
/// probabilities, as the per-image z-score (and the clip percentiles) cancel the factor; the
/// same weights with the data set's statistics do not.
#[test]
fn per_image_normalisation_is_recorded_and_applied_by_predict() {
    let dir = temp_dir("plan-normalise");
    let data = tiny_dataset(&dir, "mri", "mri", 8, 32);
    let config = common::tiny_config(&dir, &data, "");
    ok(&common::train_args(
        &config,
        &dir.join("runs"),
        &[
            "--set",
            "data.channels=1",
            "--set",
            "data.normalize=\"image\"",
            "--set",
            "data.clip_percentiles=[1, 99]",
            // PyTorch's head init (logits near 0): probabilities that vary across the image
            "--set",
            "model.prior=0",
        ],
    ));
    let model = dir.join("runs/tiny/model.safetensors");
    let (tensors, mut meta) =
        segtrain::fsutil::read_safetensors(&model, &candle_core::Device::Cpu).unwrap();
    assert_eq!(meta["normalize"], "\"image\"");
    assert_eq!(meta["clip_percentiles"], "[1.0,99.0]");
    // the same weights, normalised with the data set's statistics
    meta.insert("normalize".into(), "\"dataset\"".into());
    let dataset_model = dir.join("dataset.safetensors");
    let list: Vec<_> = tensors.into_iter().collect();
    segtrain::fsutil::write_safetensors(&dataset_model, &list, Some(meta)).unwrap();

    let source = std::fs::read_dir(data.join("images"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let grey = image::open(&source).unwrap().to_luma8();
    let (w, h) = grey.dimensions();
    let dark = image::GrayImage::from_fn(w, h, |x, y| image::Luma([grey.get_pixel(x, y)[0] / 2]));
    let bright = image::GrayImage::from_fn(w, h, |x, y| image::Luma([dark.get_pixel(x, y)[0] * 2]));
    dark.save(dir.join("dark.png")).unwrap();
    bright.save(dir.join("bright.png")).unwrap();
    // largest difference between the probability maps (in 1/65535) of the two images
    let gap = |model: &Path, out: &str| -> (u16, u16) {
        let out = dir.join(out);
        ok(&[
            "predict",
            "--model",
            model.to_str().unwrap(),
            dir.join("dark.png").to_str().unwrap(),
            dir.join("bright.png").to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--probabilities",
        ]);
        let read = |n: &str| {
            image::open(out.join(format!("{n}_prob.png")))
                .unwrap()
                .to_luma16()
                .into_raw()
        };
        let (a, b) = (read("dark"), read("bright"));
        let spread = a.iter().max().unwrap() - a.iter().min().unwrap();
        let gap = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        (gap, spread)
    };
    let (image_gap, spread) = gap(&model, "pred-image");
    assert!(
        spread > 100,
        "the probabilities are flat ({spread}/65535): the comparison says nothing"
    );
    assert!(
        image_gap <= 2,
        "per-image normalisation: {image_gap}/65535 apart"
    );
    let (dataset_gap, _) = gap(&dataset_model, "pred-dataset");
    assert!(
        dataset_gap > 100,
        "data-set normalisation: only {dataset_gap}/65535 apart"
    );
}

/// A few pixels far brighter than the rest (burnt-in text on a dim scan) are clipped to each
/// image's 99.5th percentile; the planned config trains.
#[test]
fn outlying_intensities_are_clipped() {
    let dir = temp_dir("plan-clip");
    let data = dir.join("dim");
    masks_dataset(&data, 6, |i, x, y| {
        u16::from(x.abs_diff(8 + i as u32) <= 2 && y.abs_diff(12) <= 2)
    });
    for i in 0..6 {
        let path = data.join(format!("images/m{i}.png"));
        let dim = image::GrayImage::from_fn(24, 24, |x, y| {
            image::Luma([if x < 2 && y == 0 {
                255
            } else {
                20 + ((x * 3 + y + i) % 40) as u8
            }])
        });
        dim.save(&path).unwrap();
    }
    let (config, text) = plan(&dir, &data, "dim");
    assert_eq!(
        value(&text, "clip_percentiles"),
        Some("[0.5, 99.5]"),
        "{text}"
    );
    assert!(text.contains("span more than the other 99 %"), "{text}");
    train(&dir, &config);
}
