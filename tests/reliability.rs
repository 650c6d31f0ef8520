//! Crash safety: runs killed at random instants and resumed end with the same weights as an
//! uninterrupted run; Ctrl-C and SIGTERM checkpoint and stop; a damaged checkpoint falls back to
//! the previous one; one writer per run folder; non-finite losses stop (or are skipped).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{fails, ok, temp_dir, tensors, tiny_dataset};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A tiny config that checkpoints after every update.
fn config(dir: &Path, data: &Path) -> PathBuf {
    let path = dir.join("resume.toml");
    std::fs::write(
        &path,
        format!(
            r#"name = "resume"
seed = 11
[data]
root = "{}"
image_size = 48
channels = 3
val_fraction = 0.25
[data.augment]
min_crop = 0.7
[model]
base_width = 6
depth = 2
[train]
epochs = 4
batch_size = 2
lr = 0.01
warmup_epochs = 0.5
grad_clip = 2.0
checkpoint_every = 1
[[loss]]
kind = "dice"
[[loss]]
kind = "focal"
"#,
            data.display()
        ),
    )
    .unwrap();
    path
}

/// An uninterrupted run of `config` in `dir/reference`, and how long it took (ms).
fn reference_run(dir: &Path, config: &Path) -> (PathBuf, u64) {
    let reference = dir.join("reference");
    let started = std::time::Instant::now();
    ok(&common::train_args(config, &reference, &[]));
    (reference, started.elapsed().as_millis() as u64)
}

fn train_command(config: &Path, runs: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_segtrain"));
    c.args([
        "train",
        config.to_str().unwrap(),
        "--runs",
        runs.to_str().unwrap(),
        "--resume",
    ]);
    c
}

/// A 400-epoch run of `config` in `runs`, returned once it has written `file` into its folder.
fn long_run(config: &Path, runs: &Path, file: &str, stderr: Stdio) -> std::process::Child {
    let child = train_command(config, runs)
        .args(["--set", "train.epochs=400"])
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let path = runs.join("resume").join(file);
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} not written",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

fn csv_epochs(run: &Path) -> Vec<String> {
    std::fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').next().unwrap().to_string())
        .collect()
}

#[test]
fn runs_killed_at_random_instants_resume_to_identical_weights() {
    let dir = temp_dir("kill-resume");
    let data = tiny_dataset(&dir, "lesion", "lesion", 24, 48);
    let config = config(&dir, &data);
    let (reference, duration) = reference_run(&dir, &config);
    let want_model = tensors(&reference.join("resume/model.safetensors"));
    let want_checkpoint = tensors(&reference.join("resume/checkpoint.safetensors"));

    let runs = dir.join("killed");
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut kills = 0;
    let mut finished = false;
    // anywhere from start-up to a third of a whole run, so that several kills land before it
    // ends; the reference's time is only an estimate (other tests run beside it), so a run
    // that ends before 3 kills starts over with waits half as long
    let mut longest = (duration / 3).max(10);
    for _ in 0..200 {
        let mut child = train_command(&config, &runs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(
            rng.random_range(longest / 5..longest),
        ));
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "a resumed run failed");
            if kills >= 3 {
                finished = true;
                break;
            }
            std::fs::remove_dir_all(&runs).unwrap();
            kills = 0;
            longest = (longest / 2).max(10);
            continue;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
    }
    if !finished {
        assert!(train_command(&config, &runs).status().unwrap().success());
    }
    assert!(kills >= 3, "only {kills} kills landed");
    let run = runs.join("resume");
    assert_eq!(
        tensors(&run.join("model.safetensors")),
        want_model,
        "after {kills} kills the model differs"
    );
    assert_eq!(
        tensors(&run.join("checkpoint.safetensors")),
        want_checkpoint,
        "the final checkpoint differs"
    );
    assert_eq!(
        csv_epochs(&run),
        vec!["1", "2", "3", "4"],
        "metrics.csv rows"
    );
    assert!(run.join("summary.json").exists());
    let leftovers: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(
        leftovers.len() <= 1,
        "temporaries accumulate: {leftovers:?}"
    );
}

/// A run sent `signal` mid-training checkpoints, exits non-zero with the resume command, and
/// `--resume` ends with the uninterrupted run's weights.
fn interrupted_by(signal: &str) {
    let dir = temp_dir(&format!("signal-{signal}"));
    let data = tiny_dataset(&dir, "lesion", "lesion", 24, 48);
    let config = config(&dir, &data);
    let (reference, duration) = reference_run(&dir, &config);
    let runs = dir.join("interrupted");
    for wait in [duration / 2, duration / 3, duration / 5, duration * 3 / 4] {
        let _ = std::fs::remove_dir_all(&runs);
        let child = train_command(&config, &runs)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(wait));
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &child.id().to_string()])
            .status();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            continue; // finished before the signal: try a shorter wait
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{stderr}");
        if !stderr.contains("interrupted after update") {
            continue; // the signal arrived before training started
        }
        assert!(stderr.contains("--resume"), "{stderr}");
        assert!(runs.join("resume/checkpoint.safetensors").exists());
        assert!(train_command(&config, &runs).status().unwrap().success());
        assert_eq!(
            tensors(&runs.join("resume/model.safetensors")),
            tensors(&reference.join("resume/model.safetensors"))
        );
        return;
    }
    panic!("no SIG{signal} landed during training");
}

#[test]
fn ctrl_c_checkpoints_and_the_run_resumes_to_identical_weights() {
    interrupted_by("INT");
}

/// What schedulers and `docker stop` send: handled like Ctrl-C.
#[test]
fn sigterm_checkpoints_and_the_run_resumes_to_identical_weights() {
    interrupted_by("TERM");
}

/// A newest checkpoint truncated (a full disk, a crash of the file system) is reported and the
/// previous one used; the resumed run still ends with the uninterrupted run's weights.
#[test]
fn a_truncated_checkpoint_falls_back_to_the_previous_one() {
    let dir = temp_dir("truncated-checkpoint");
    let data = tiny_dataset(&dir, "lesion", "lesion", 12, 48);
    let config = config(&dir, &data);
    let (reference, _) = reference_run(&dir, &config);
    let runs = dir.join("damaged");
    let run = runs.join("resume");
    std::fs::create_dir_all(&run).unwrap();
    for entry in std::fs::read_dir(reference.join("resume")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, run.join(path.file_name().unwrap())).unwrap();
    }
    std::fs::remove_file(run.join("summary.json")).unwrap();
    let checkpoint = run.join("checkpoint.safetensors");
    let bytes = std::fs::read(&checkpoint).unwrap();
    std::fs::write(&checkpoint, &bytes[..bytes.len() / 2]).unwrap();
    let out = train_command(&config, &runs).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("checkpoint.safetensors") && stderr.contains("checkpoint.prev.safetensors"),
        "the fallback is not reported:\n{stderr}"
    );
    for file in ["model.safetensors", "checkpoint.safetensors"] {
        assert_eq!(
            tensors(&run.join(file)),
            tensors(&reference.join("resume").join(file)),
            "{file}"
        );
    }
    // both checkpoints damaged: an error naming both, no panic
    for file in ["checkpoint.safetensors", "checkpoint.prev.safetensors"] {
        std::fs::write(run.join(file), b"garbage").unwrap();
    }
    std::fs::remove_file(run.join("summary.json")).unwrap();
    let err = fails(&[
        "train",
        config.to_str().unwrap(),
        "--runs",
        runs.to_str().unwrap(),
        "--resume",
    ]);
    assert!(
        err.contains("no usable checkpoint") && err.contains("checkpoint.prev.safetensors"),
        "{err}"
    );
}

/// A run folder is written by one process at a time: a `--resume` or `--overwrite` beside a
/// running run is refused, naming the holder's PID, and the running run is not disturbed.
#[test]
fn a_second_writer_of_a_run_folder_is_refused() {
    let dir = temp_dir("lock");
    let data = tiny_dataset(&dir, "lesion", "lesion", 12, 48);
    let config = config(&dir, &data);
    let runs = dir.join("runs");
    let (c, r) = (config.to_str().unwrap(), runs.to_str().unwrap());
    let mut first = long_run(&config, &runs, "checkpoint.safetensors", Stdio::piped());
    let run = runs.join("resume");
    let pid = first.id().to_string();
    for extra in ["--resume", "--overwrite"] {
        let err = fails(&["train", c, "--runs", r, "--set", "train.epochs=400", extra]);
        assert!(
            err.contains("in use") && err.contains(&pid),
            "{extra}: {err}"
        );
    }
    assert!(
        run.join("config.toml").exists(),
        "--overwrite cleared a running run"
    );
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    let out = first.wait().unwrap();
    assert!(!out.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(first.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("interrupted after update"), "{stderr}");
    // the holder is gone: the lock is free again
    let err = fails(&[
        "train",
        c,
        "--runs",
        r,
        "--set",
        "train.epochs=1",
        "--resume",
    ]);
    assert!(
        err.contains("different config") && err.contains("train.epochs") && err.contains("400"),
        "{err}"
    );
}

#[test]
fn non_finite_losses_stop_with_a_clear_error_or_are_skipped() {
    let dir = temp_dir("nan");
    let data = tiny_dataset(&dir, "lesion", "lesion", 12, 32);
    let config = config(&dir, &data);
    let runs = dir.join("runs");
    let r = runs.to_str().unwrap();
    let c = config.to_str().unwrap();
    let err = fails(&[
        "train",
        c,
        "--runs",
        r,
        "--set",
        "train.lr=1e30",
        "--set",
        "train.grad_clip=1e30",
    ]);
    assert!(
        err.contains("epoch 1, update") && (err.contains("loss term") || err.contains("gradient")),
        "{err}"
    );
    assert!(err.contains("checkpoint"), "{err}");
    // the checkpoint of the last good update survives
    assert!(runs.join("resume/checkpoint.safetensors").exists());
    let runs2 = dir.join("skip");
    ok(&[
        "train",
        c,
        "--runs",
        runs2.to_str().unwrap(),
        "--set",
        "train.lr=1e30",
        "--set",
        "train.grad_clip=1e30",
        "--set",
        "train.on_non_finite=\"skip\"",
    ]);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs2.join("resume/summary.json")).unwrap())
            .unwrap();
    assert!(
        summary["skipped_batches"].as_u64().unwrap() >= 1,
        "{summary}"
    );
}

#[test]
fn a_run_folder_is_never_mixed_with_another_run() {
    let dir = temp_dir("mix");
    let data = tiny_dataset(&dir, "lesion", "lesion", 8, 32);
    let config = config(&dir, &data);
    let runs = dir.join("runs");
    let (c, r) = (config.to_str().unwrap(), runs.to_str().unwrap());
    ok(&["train", c, "--runs", r, "--set", "train.epochs=1"]);
    let model = std::fs::read(runs.join("resume/model.safetensors")).unwrap();
    let err = fails(&["train", c, "--runs", r, "--set", "train.epochs=1"]);
    assert!(
        err.contains("finished") && err.contains("--overwrite"),
        "{err}"
    );
    let err = fails(&[
        "train",
        c,
        "--runs",
        r,
        "--set",
        "train.epochs=2",
        "--resume",
    ]);
    assert!(
        err.contains("different config") && err.contains("train.epochs: 1 vs 2"),
        "the differing key is not named: {err}"
    );
    assert_eq!(
        std::fs::read(runs.join("resume/model.safetensors")).unwrap(),
        model,
        "a refused run touched the files"
    );
    // resuming a finished run of the same config is a no-op that reports it
    let out = ok(&[
        "train",
        c,
        "--runs",
        r,
        "--set",
        "train.epochs=1",
        "--resume",
    ]);
    assert!(out.contains("best epoch"), "{out}");
    assert_eq!(
        std::fs::read(runs.join("resume/model.safetensors")).unwrap(),
        model
    );
}

/// The temporaries a killed `predict` or `export` left (`.<name>.tmp-<pid>` of a dead process)
/// are removed by the next one writing there; `calibrate` and `export` refuse to write into a
/// run folder while its training runs.
#[test]
fn killed_writers_temporaries_go_and_running_runs_are_not_written_into() {
    let dir = temp_dir("writers");
    let data = tiny_dataset(&dir, "lesion", "lesion", 8, 32);
    let config = config(&dir, &data);
    let runs = dir.join("runs");
    let (c, r) = (config.to_str().unwrap(), runs.to_str().unwrap());
    ok(&["train", c, "--runs", r, "--set", "train.epochs=1"]);
    let model = runs.join("resume/model.safetensors");
    // PIDs above the kernel's limit (at most 2^22) belong to no process
    let dead = |folder: &Path| {
        std::fs::create_dir_all(folder).unwrap();
        let p = folder.join(".x.png.tmp-4194305");
        std::fs::write(&p, vec![0u8; 1000]).unwrap();
        p
    };
    let predictions = dir.join("predictions");
    let stale = dead(&predictions);
    let image = std::fs::read_dir(data.join("images"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    ok(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        image.to_str().unwrap(),
        "--out",
        predictions.to_str().unwrap(),
    ]);
    assert!(!stale.exists(), "predict left a dead writer's temporary");
    let exports = dir.join("exports");
    let stale = dead(&exports);
    let exported = exports.join("m.safetensors");
    ok(&[
        "export",
        "--run",
        &format!("{r}/resume"),
        "--out",
        exported.to_str().unwrap(),
    ]);
    assert!(!stale.exists() && exported.exists());
    // never over the run's own files, nor over a FIFO or device
    for own in [
        "checkpoint.safetensors",
        "config.toml",
        ".lock",
        "model.safetensors",
    ] {
        let target = runs.join("resume").join(own);
        let before = std::fs::read(&target).unwrap();
        let err = fails(&[
            "export",
            "--run",
            &format!("{r}/resume"),
            "--out",
            target.to_str().unwrap(),
        ]);
        assert!(err.contains(own), "{own}: {err}");
        // (the lock file holds the PID of its latest holder: the export took it)
        if own != ".lock" {
            assert_eq!(
                std::fs::read(&target).unwrap(),
                before,
                "{own} was replaced"
            );
        }
    }
    let fifo = dir.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let err = fails(&[
        "export",
        "--run",
        &format!("{r}/resume"),
        "--out",
        fifo.to_str().unwrap(),
    ]);
    assert!(err.contains("not a regular file"), "{err}");
    assert!(!std::fs::metadata(&fifo).unwrap().is_file());

    let busy = dir.join("busy");
    let mut running = long_run(&config, &busy, "model.safetensors", Stdio::null());
    let run = busy.join("resume");
    let pid = running.id().to_string();
    let busy_model = run.join("model.safetensors");
    let err = fails(&[
        "calibrate",
        "--model",
        busy_model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(err.contains("in use") && err.contains(&pid), "{err}");
    let err = fails(&[
        "export",
        "--run",
        runs.join("resume").to_str().unwrap(),
        "--out",
        run.join("half.safetensors").to_str().unwrap(),
    ]);
    assert!(err.contains("in use") && err.contains(&pid), "{err}");
    let _ = Command::new("kill").args(["-INT", &pid]).status();
    assert!(!running.wait().unwrap().success());
    assert!(!run.join("half.safetensors").exists());
}

/// `train.time_limit_minutes` stops after the epoch past which another would end beyond the
/// limit, keeps the best epoch's model and writes a summary of the epochs trained; `--resume`
/// with another limit (not part of the experiment) finishes the run to the same weights as an
/// uninterrupted one.
#[test]
fn a_time_limit_stops_between_epochs_and_the_run_resumes() {
    let dir = temp_dir("time-limit");
    let data = tiny_dataset(&dir, "data", "lesion", 8, 48);
    let config = config(&dir, &data);
    let (reference, _) = reference_run(&dir, &config);
    let runs = dir.join("limited");
    // a limit shorter than any epoch: the first epoch runs, the second would end past it
    let out = ok(&common::train_args(
        &config,
        &runs,
        &["--set", "train.time_limit_minutes=1e-6"],
    ));
    assert!(out.contains("time limit"), "{out}");
    assert!(out.contains("stopping after epoch 1 of 4"), "{out}");
    let run = runs.join("resume");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["epochs"], 1);
    assert_eq!(summary["best_epoch"], 1);
    assert!(run.join("model.safetensors").exists());
    assert_eq!(csv_epochs(&run).len(), 1);
    // resumed without the limit, it trains epochs 2..4 to the uninterrupted run's weights
    ok(&common::train_args(&config, &runs, &["--resume"]));
    assert_eq!(csv_epochs(&run).len(), 4);
    assert_eq!(
        tensors(&run.join("model.safetensors")),
        tensors(&reference.join("resume/model.safetensors"))
    );
    // a limit that is not a positive number of minutes is refused
    let e = fails(&common::train_args(
        &config,
        &dir.join("bad"),
        &["--set", "train.time_limit_minutes=0"],
    ));
    assert!(e.contains("train.time_limit_minutes"), "{e}");
}
