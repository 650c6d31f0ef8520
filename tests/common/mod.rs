//! Helpers shared by the end-to-end tests: the binary, tiny data sets and configs.
#![allow(dead_code)]

pub mod volumes;

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

/// `segtrain args` with `env` set: its standard output, after asserting that it succeeded.
pub fn ok_with_env(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segtrain"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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

/// What a bounded run of segtrain did.
pub struct Bounded {
    /// Exit code (None: killed by a signal, e.g. an abort).
    pub code: Option<i32>,
    pub stderr: String,
    /// Whether it had to be killed at the time limit.
    pub timed_out: bool,
}

/// Runs segtrain with its address space capped at `memory_mib` MiB (`setrlimit(RLIMIT_AS)` in the
/// child) and kills it after `seconds`: a decompression or allocation bomb must fail cleanly
/// inside both bounds.
pub fn segtrain_bounded(args: &[&str], memory_mib: u64, seconds: u64) -> Bounded {
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};
    let limit = memory_mib << 20;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_segtrain"));
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing
    unsafe {
        cmd.pre_exec(move || {
            let rl = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &rl) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("the segtrain binary runs");
    let mut stderr_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr_pipe, &mut s);
        s
    });
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(seconds) {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Bounded {
        code: status.code(),
        stderr: reader.join().unwrap(),
        timed_out,
    }
}

/// Asserts that a bounded run failed cleanly (exit 1, no panic, no abort, in time) with an error
/// containing every one of `expect`; returns stderr.
pub fn fails_bounded(args: &[&str], memory_mib: u64, seconds: u64, expect: &[&str]) -> String {
    let run = segtrain_bounded(args, memory_mib, seconds);
    assert!(
        !run.timed_out,
        "segtrain {args:?} ran past {seconds} s:\n{}",
        run.stderr
    );
    assert!(
        !run.stderr.contains("panicked") && run.code == Some(1),
        "segtrain {args:?} did not fail cleanly (exit {:?}) under {memory_mib} MiB:\n{}",
        run.code,
        run.stderr
    );
    for e in expect {
        assert!(
            run.stderr.contains(e),
            "segtrain {args:?}: `{e}` not in\n{}",
            run.stderr
        );
    }
    run.stderr
}

/// A valid input with a few bytes overwritten, and then cut or given an extra newline: the
/// fuzz targets' mutation of a known-good file.
pub fn mutated(base: Vec<u8>) -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let len = base.len();
    (
        prop::collection::vec((0..len.max(1), any::<u8>()), 0..8),
        0..len.max(1),
        0..3usize,
    )
        .prop_map(move |(edits, cut, how)| {
            let mut b = base.clone();
            for (at, v) in edits {
                if at < b.len() {
                    b[at] = v;
                }
            }
            match how {
                0 => b.truncate(cut),
                1 => b.insert(cut.min(b.len()), b'\n'),
                _ => {}
            }
            b
        })
}
