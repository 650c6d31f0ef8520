//! Helpers shared by the end-to-end tests: the binary, tiny data sets and configs.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn segtrain(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_segtrain"))
        .args(args)
        .output()
        .expect("the segtrain binary runs")
}

/// Runs segtrain and asserts success, returning stdout.
pub fn ok(args: &[&str]) -> String {
    let out = segtrain(args);
    assert!(
        out.status.success(),
        "segtrain {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs segtrain and asserts a clean failure (exit 1, no panic), returning stderr.
pub fn fails(args: &[&str]) -> String {
    let out = segtrain(args);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "segtrain {args:?} should fail");
    assert!(
        !stderr.contains("panicked"),
        "segtrain {args:?} panicked:\n{stderr}"
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit code of {args:?}: {stderr}"
    );
    stderr
}

/// `train CONFIG --runs RUNS` followed by `extra`.
pub fn train_args<'a>(config: &'a Path, runs: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "train",
        config.to_str().unwrap(),
        "--runs",
        runs.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args
}

pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segtrain-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A tiny synthetic dataset at `dir/name`.
pub fn tiny_dataset(dir: &Path, name: &str, kind: &str, count: usize, size: usize) -> PathBuf {
    let out = dir.join(name);
    ok(&[
        "synth",
        "--out",
        out.to_str().unwrap(),
        "--kind",
        kind,
        "--count",
        &count.to_string(),
        "--size",
        &size.to_string(),
        "--seed",
        "3",
    ]);
    out
}

/// A config training a tiny U-Net on `root` for a few updates.
pub fn tiny_config(dir: &Path, root: &Path, extra: &str) -> PathBuf {
    let path = dir.join("tiny.toml");
    let text = format!(
        r#"name = "tiny"
seed = 7

[data]
root = "{}"
image_size = 32
channels = 3
classes = 1
val_fraction = 0.25
workers = 2

[model]
base_width = 4
depth = 2

[train]
epochs = 2
batch_size = 4
lr = 0.01
warmup_epochs = 0.5
grad_clip = 5.0

[[loss]]
kind = "dice"

[[loss]]
kind = "focal"
alpha = 0.25
{extra}"#,
        root.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Every tensor of a safetensors file, as f64 values by name.
pub fn tensors(path: &Path) -> HashMap<String, Vec<f64>> {
    let (t, _) = segtrain::fsutil::read_safetensors(path, &candle_core::Device::Cpu).unwrap();
    t.into_iter()
        .map(|(k, v)| {
            let values = v.to_dtype(candle_core::DType::F64).unwrap();
            (k, values.flatten_all().unwrap().to_vec1().unwrap())
        })
        .collect()
}
