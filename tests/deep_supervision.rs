//! `model.deep_supervision`: auxiliary heads trained on the decoder levels 1 ..= depth − 2,
//! checkpointed and resumed with the run, left out of the exported model.

mod common;

use std::path::{Path, PathBuf};

use common::{fails, ok, temp_dir, tensors, tiny_config, tiny_dataset};
use segtrain::model::UNetConfig;

/// The shared tiny config (see `common::tiny_config`) as run `name`: a depth-3 U-Net, with or
/// without deep supervision.
fn config(dir: &Path, data: &Path, name: &str, deep_supervision: bool) -> PathBuf {
    let text = std::fs::read_to_string(tiny_config(dir, data, "")).unwrap();
    let text = text.replacen("name = \"tiny\"", &format!("name = \"{name}\""), 1);
    let text = text.replacen(
        "depth = 2",
        &format!("depth = 3\ndeep_supervision = {deep_supervision}"),
        1,
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn first_train_loss(run: &Path) -> f64 {
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let column = header.iter().position(|c| *c == "train_loss").unwrap();
    lines
        .next()
        .unwrap()
        .split(',')
        .nth(column)
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn deep_supervision_trains_resumes_and_exports_the_plain_network() {
    let dir = temp_dir("deep-supervision");
    let data = tiny_dataset(&dir, "lesion", "lesion", 12, 32);
    let runs = dir.join("runs");
    ok(&common::train_args(
        &config(&dir, &data, "ds", true),
        &runs,
        &[],
    ));
    ok(&common::train_args(
        &config(&dir, &data, "plain", false),
        &runs,
        &[],
    ));
    let (ds, plain) = (runs.join("ds"), runs.join("plain"));

    // the exported model is the plain U-Net's state_dict: the auxiliary heads stay behind
    let unet = UNetConfig {
        in_channels: 3,
        classes: 1,
        base_width: 4,
        depth: 3,
    };
    let mut want: Vec<String> = unet.state_dict_spec().into_iter().map(|s| s.0).collect();
    want.sort();
    let mut names: Vec<String> = tensors(&ds.join("model.safetensors")).into_keys().collect();
    names.sort();
    assert_eq!(names, want);
    let checkpoint = tensors(&ds.join("checkpoint.safetensors"));
    assert!(
        checkpoint.keys().any(|k| k.contains("aux1.weight")),
        "the checkpoint keeps the auxiliary head: {:?}",
        checkpoint.keys().collect::<Vec<_>>()
    );
    assert!(!tensors(&plain.join("checkpoint.safetensors"))
        .keys()
        .any(|k| k.contains("aux")));

    // the auxiliary terms are part of the training loss
    let (a, b) = (first_train_loss(&ds), first_train_loss(&plain));
    assert!(a.is_finite() && b.is_finite() && a != b, "{a} vs {b}");

    // resumed from the previous checkpoint, the run ends with the same weights
    let resumed_runs = dir.join("resumed");
    let resumed = resumed_runs.join("ds");
    std::fs::create_dir_all(&resumed).unwrap();
    for entry in std::fs::read_dir(&ds).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, resumed.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::remove_file(resumed.join("summary.json")).unwrap();
    std::fs::rename(
        resumed.join("checkpoint.prev.safetensors"),
        resumed.join("checkpoint.safetensors"),
    )
    .unwrap();
    ok(&common::train_args(
        &config(&dir, &data, "ds", true),
        &resumed_runs,
        &["--resume"],
    ));
    assert_eq!(
        tensors(&resumed.join("model.safetensors")),
        tensors(&ds.join("model.safetensors"))
    );

    // and the exported model predicts like any other
    let out = dir.join("pred");
    ok(&[
        "predict",
        "--model",
        ds.join("model.safetensors").to_str().unwrap(),
        data.join("images").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        std::fs::read_dir(data.join("images")).unwrap().count()
    );
}

#[test]
fn deep_supervision_needs_a_decoder_level_to_supervise() {
    let dir = temp_dir("deep-supervision-depth");
    let data = dir.join("none");
    let cfg = config(&dir, &data, "shallow", true);
    let err = fails(&["train", cfg.to_str().unwrap(), "--set", "model.depth=2"]);
    assert!(
        err.contains("model.deep_supervision") && err.contains("depth ≥ 3"),
        "{err}"
    );
}
