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
