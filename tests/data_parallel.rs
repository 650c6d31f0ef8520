//! Data-parallel training (README "Many machines"). Without the `mpi` feature a launcher's
//! ranks are refused, and without `nccl` so is `--gpus`. With `mpi` (`cargo test --release
//! --features mpi --test data_parallel`, which needs `mpirun`): N ranks train the weights of
//! one process, only rank 0 writes, a run resumes with another number of ranks, and a
//! failing, killed or stopped rank ends the job.

mod common;

use std::path::{Path, PathBuf};

/// A config of a few updates at a learning rate low enough that float reassociation stays
/// small: Adam's first steps move a weight whose gradient is near ε by up to the learning rate
/// on a last-bit change of that gradient (the weights of `WHOLE` differ by 5e-7 at 3e-4, 2e-6
/// at 1e-3, 2e-5 at 1e-2).
fn config(dir: &Path, root: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "name = \"{name}\"\nseed = 7\n\n[data]\nroot = \"{}\"\nchannels = 3\nclasses = 1\n\
         val_fraction = 0.25\nworkers = 2\n{body}",
        root.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Batch Dice (a sum over the whole batch) + focal on whole images; 15 training images in
/// batches of 4, so that the last batch of an epoch (3) splits unevenly.
const WHOLE: &str = r#"image_size = 32

[model]
base_width = 4
depth = 2

[train]
epochs = 1
batch_size = 4
lr = 3e-4

[[loss]]
kind = "dice"
per_image = false

[[loss]]
kind = "focal"
alpha = 0.25
"#;

/// Foreground-biased 32² patches of 48² images, deep supervision, batch generalised Dice and
/// focal normalised by the running positives. (Top-k cross-entropy works alike but is left
/// out: a last-bit change of a logit swaps near-tied pixels in and out of its top k.)
#[cfg(feature = "mpi")]
const PATCHES: &str = r#"patch_size = 32
foreground_fraction = 0.5

[model]
base_width = 4
depth = 3
deep_supervision = true

[train]
epochs = 1
batch_size = 5
lr = 3e-4

[[loss]]
kind = "generalized_dice"
per_image = false

[[loss]]
kind = "focal"
normalize = "positives"
"#;

/// A fresh folder `name` with a data set of `images` tiny images and the config `WHOLE` on them.
fn whole_image_job(name: &str, images: usize) -> (PathBuf, PathBuf) {
    let dir = common::temp_dir(name);
    let data = common::tiny_dataset(&dir, "lesion", "lesion", images, 32);
    let cfg = config(&dir, &data, "whole", WHOLE);
    (dir, cfg)
}

#[cfg(not(feature = "mpi"))]
#[test]
fn a_launcher_s_ranks_are_refused_without_the_mpi_feature() {
    let (dir, cfg) = whole_image_job("dp-refused", 8);
    let runs = dir.join("runs");
    for key in ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_segtrain"))
            .args(common::train_args(&cfg, &runs, &[]))
            .env(key, "2")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("one of 2 MPI ranks") && stderr.contains("--features mpi"),
            "{stderr}"
        );
        assert!(!runs.exists(), "nothing is written");
    }
    // one rank is one process
    common::ok_with_env(&common::train_args(&cfg, &runs, &[]), &[("PMI_SIZE", "1")]);
}

#[cfg(not(feature = "nccl"))]
#[test]
fn gpus_are_refused_without_the_nccl_feature() {
    let (dir, cfg) = whole_image_job("dp-gpus", 8);
    let runs = dir.join("runs");
    let mut args = common::train_args(&cfg, &runs, &[]);
    args.extend(["--gpus", "2"]);
    let stderr = common::fails(&args);
    assert!(
        stderr.contains("--gpus") && stderr.contains("--features nccl"),
        "{stderr}"
    );
    assert!(!runs.exists(), "nothing is written");
}

#[cfg(feature = "mpi")]
mod mpi {
    use std::collections::HashMap;
    use std::path::Path;
    use std::process::{Child, Command, Output, Stdio};
    use std::time::{Duration, Instant};

    use super::{config, whole_image_job, PATCHES, WHOLE};
    use crate::common::{self, temp_dir, tensors, tiny_dataset};

    /// `mpirun` with one program per group: `(ranks, segtrain arguments)`, in rank order.
    fn mpirun(groups: &[(usize, Vec<&str>)]) -> Command {
        mpirun_with(groups, &[])
    }

    /// [`mpirun`] with environment variables for every rank.
    fn mpirun_with(groups: &[(usize, Vec<&str>)], env: &[(&str, &str)]) -> Command {
        let mut cmd = Command::new("mpirun");
        // root in CI containers; two cores for up to three ranks
        cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .arg("--oversubscribe");
        for (key, value) in env {
            cmd.args(["-x", &format!("{key}={value}")]);
        }
        for (i, (n, args)) in groups.iter().enumerate() {
            if i > 0 {
                cmd.arg(":");
            }
            cmd.args(["-np", &n.to_string(), env!("CARGO_BIN_EXE_segtrain")])
                .args(args);
        }
        cmd
    }

    fn run(groups: &[(usize, Vec<&str>)]) -> Output {
        mpirun(groups).output().expect("mpirun runs")
    }

    fn succeeded(out: &Output) -> String {
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            out.status.success(),
            "{}\n{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        stderr
    }

    /// `‖a − b‖ / ‖b‖` over the tensors of two checkpoints whose names start with `prefix`,
    /// as one vector.
    fn difference(a: &Path, b: &Path, prefix: &str) -> f64 {
        let (a, b) = (tensors(a), tensors(b));
        assert_eq!(
            a.keys().collect::<std::collections::BTreeSet<_>>(),
            b.keys().collect()
        );
        let (mut diff, mut norm) = (0.0, 0.0);
        for (k, x) in a.iter().filter(|(k, _)| k.starts_with(prefix)) {
            for (p, q) in x.iter().zip(&b[k]) {
                diff += (p - q) * (p - q);
                norm += q * q;
            }
        }
        (diff / norm).sqrt()
    }

    /// Asserts that two checkpoints hold the same model up to float reassociation: weights
    /// and BatchNorm statistics within 1e-5 (relative), AdamW's moments within 1e-4. (Tensor
    /// by tensor the small ones differ more: a bias that BatchNorm follows has a gradient of
    /// rounding noise, which Adam turns into steps of up to the learning rate.)
    fn same_model(a: &Path, b: &Path, what: &str) {
        for (prefix, bound) in [("model.", 1e-5), ("adam.", 1e-4)] {
            let d = difference(a, b, prefix);
            assert!(d <= bound, "{what}: `{prefix}*` differ by {d:e} (relative)");
        }
    }

    /// Asserts that two runs' validation (split over the ranks in one) scored alike: every
    /// `val_*` column of `metrics.csv` and every score of `per_image.csv`, image by image in
    /// the same order, within 1e-4.
    fn same_validation(a: &Path, b: &Path, what: &str) {
        let table = |dir: &Path, file: &str| -> Vec<Vec<String>> {
            std::fs::read_to_string(dir.join(file))
                .unwrap()
                .lines()
                .map(|l| l.split(',').map(str::to_string).collect())
                .collect()
        };
        for (file, scored) in [("metrics.csv", "val_"), ("per_image.csv", "")] {
            let (x, y) = (table(a, file), table(b, file));
            assert_eq!(x.len(), y.len(), "{what}: {file}");
            assert_eq!(x[0], y[0], "{what}: {file} header");
            for (row_x, row_y) in x.iter().zip(&y).skip(1) {
                for ((column, p), q) in x[0].iter().zip(row_x).zip(row_y) {
                    if !column.starts_with(scored) || column == "seconds" {
                        continue;
                    }
                    match (p.parse::<f64>(), q.parse::<f64>()) {
                        (Ok(p), Ok(q)) => assert!(
                            (p - q).abs() <= 1e-4 || (p.is_nan() && q.is_nan()),
                            "{what}: {file} {column}: {p} vs {q}"
                        ),
                        _ => assert_eq!(p, q, "{what}: {file} {column}"),
                    }
                }
            }
        }
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn ranks_train_the_weights_of_one_process_and_only_rank_0_writes() {
        let dir = temp_dir("dp-same");
        for (name, body, size, ranks) in [("whole", WHOLE, 32, 2), ("patches", PATCHES, 48, 3)] {
            let data = tiny_dataset(&dir, &format!("lesion{size}"), "lesion", 20, size);
            let cfg = config(&dir, &data, name, body);
            let cfg = cfg.to_str().unwrap();
            let one = dir.join(format!("one-{name}"));
            common::ok(&["train", cfg, "--runs", one.to_str().unwrap()]);
            // rank 0 writes to `many`; the other ranks are told `elsewhere` and must not touch it
            let (many, elsewhere) = (dir.join(format!("many-{name}")), dir.join("elsewhere"));
            let out = run(&[
                (1, vec!["train", cfg, "--runs", many.to_str().unwrap()]),
                (
                    ranks - 1,
                    vec!["train", cfg, "--runs", elsewhere.to_str().unwrap()],
                ),
            ]);
            succeeded(&out);
            assert!(!elsewhere.exists(), "a rank other than 0 wrote files");
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(
                stdout.matches("best epoch").count(),
                1,
                "one summary line: {stdout}"
            );
            let (a, b) = (one.join(name), many.join(name));
            assert_eq!(files(&a), files(&b));
            same_model(
                &b.join("checkpoint.safetensors"),
                &a.join("checkpoint.safetensors"),
                &format!("{name}, {ranks} ranks"),
            );
            same_validation(&a, &b, &format!("{name}, {ranks} ranks"));
        }
    }

    #[test]
    fn batchnorm_is_synchronised_on_both_paths_and_only_when_asked() {
        // segtrain's CPU kernels, and Candle's ops (the path of CUDA and Metal, here on the
        // CPU: BatchNorm's batch sums as an op of the autograd graph)
        let (dir, cfg) = whole_image_job("dp-sync", 20);
        let cfg = cfg.to_str().unwrap();
        for kernels in ["fast", "candle"] {
            let env = [("SEGTRAIN_KERNELS", kernels)];
            let runs = |what: &str| dir.join(format!("{kernels}-{what}"));
            let one = runs("one");
            common::ok_with_env(&common::train_args(Path::new(cfg), &one, &[]), &env);
            let one = one.join("whole/checkpoint.safetensors");
            for sync in [true, false] {
                let many = runs(&format!("sync-{sync}"));
                let set = format!("train.sync_batchnorm={sync}");
                let args = common::train_args(Path::new(cfg), &many, &["--set", &set]);
                succeeded(&mpirun_with(&[(2, args)], &env).output().unwrap());
                let many = many.join("whole/checkpoint.safetensors");
                if sync {
                    same_model(&many, &one, &format!("{kernels}, 2 ranks"));
                } else {
                    let d = difference(&many, &one, "model.");
                    assert!(d > 1e-3, "{kernels}: each rank's own statistics: {d:e}");
                }
            }
        }
    }

    #[test]
    fn a_run_resumes_with_another_number_of_ranks() {
        let (dir, cfg) = whole_image_job("dp-resume", 20);
        let cfg = cfg.to_str().unwrap();
        let one = dir.join("one");
        let two_epochs = ["--set", "train.epochs=2"];
        common::ok(&common::train_args(Path::new(cfg), &one, &two_epochs));
        // the run as it stood after its first epoch, resumed by two ranks
        let resumed = dir.join("resumed");
        std::fs::create_dir_all(resumed.join("whole")).unwrap();
        for name in [
            "config.toml",
            "metrics.csv",
            "per_image.csv",
            "model.safetensors",
        ] {
            std::fs::copy(
                one.join("whole").join(name),
                resumed.join("whole").join(name),
            )
            .unwrap();
        }
        std::fs::copy(
            one.join("whole/checkpoint.prev.safetensors"),
            resumed.join("whole/checkpoint.safetensors"),
        )
        .unwrap();
        let mut args = common::train_args(Path::new(cfg), &resumed, &two_epochs);
        args.push("--resume");
        let stderr = succeeded(&run(&[(2, args)]));
        assert!(stderr.contains("resuming"), "{stderr}");
        same_model(
            &resumed.join("whole/checkpoint.safetensors"),
            &one.join("whole/checkpoint.safetensors"),
            "resumed by 2 ranks",
        );
    }

    #[test]
    fn bad_splits_are_refused_by_name() {
        let (dir, cfg) = whole_image_job("dp-refused", 20);
        let cfg = cfg.to_str().unwrap();
        let runs = dir.join("runs");
        for (set, ranks, expect) in [
            (
                "train.batch_size=2",
                3,
                "every batch needs an image per rank",
            ),
            // 15 training images in batches of 4: the last holds 3
            (
                "train.batch_size=4",
                4,
                "the last batch of an epoch of 15 training images has 3",
            ),
        ] {
            let args = vec!["train", cfg, "--runs", runs.to_str().unwrap(), "--set", set];
            let out = run(&[(ranks, args)]);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(!out.status.success(), "{set}");
            assert!(
                stderr.contains(expect) && stderr.contains("error (rank "),
                "{set}: {stderr}"
            );
            assert!(!stderr.contains("panicked"), "{stderr}");
        }
        // bf16 (Candle's ops) trains with synchronised BatchNorm
        let args = common::train_args(Path::new(cfg), &runs, &["--set", "train.precision=bf16"]);
        succeeded(&run(&[(2, args)]));
        assert!(runs.join("whole/model.safetensors").exists());
    }

    /// The segtrain processes of `config` and their MPI ranks.
    fn ranks_of(config: &str) -> HashMap<usize, u32> {
        let mut found = HashMap::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if !cmdline.contains(config) || cmdline.starts_with("mpirun") {
                continue;
            }
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let rank = environ
                .split(|b| *b == 0)
                .filter_map(|kv| std::str::from_utf8(kv).ok())
                .find_map(|kv| kv.strip_prefix("OMPI_COMM_WORLD_RANK=")?.parse().ok());
            if let Some(rank) = rank {
                found.insert(rank, pid);
            }
        }
        found
    }

    /// Starts a long two-rank run of `config` and waits until its first epoch is logged.
    fn long_run(config: &str, runs: &Path) -> Child {
        let args = vec![
            "train",
            config,
            "--runs",
            runs.to_str().unwrap(),
            "--set",
            "train.epochs=1000",
        ];
        let child = mpirun(&[(2, args)])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        while !runs.join("whole/metrics.csv").exists() {
            assert!(started.elapsed() < Duration::from_secs(120), "no epoch");
            std::thread::sleep(Duration::from_millis(50));
        }
        child
    }

    /// Waits for `child` at most two minutes: the job must end, not hang.
    fn ends(mut child: Child) -> (std::process::ExitStatus, String) {
        let started = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut stderr = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
                return (status, stderr);
            }
            if started.elapsed() > Duration::from_secs(120) {
                child.kill().unwrap();
                panic!("the job hangs");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_failing_or_killed_rank_ends_the_job_and_a_stop_stops_every_rank() {
        let (dir, cfg) = whole_image_job("dp-ends", 20);
        let cfg = cfg.to_str().unwrap();

        // a rank that fails alone (its data is missing) stops the others
        let runs = dir.join("failing");
        let bad = format!("data.root={}", dir.join("missing").display());
        let out = run(&[
            (1, vec!["train", cfg, "--runs", runs.to_str().unwrap()]),
            (1, vec!["train", cfg, "--runs", "x", "--set", &bad]),
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            stderr.contains("error (rank 1 of 2)") && stderr.contains("missing"),
            "{stderr}"
        );

        // a killed rank ends the job
        let runs = dir.join("killed");
        let child = long_run(cfg, &runs);
        let ranks = ranks_of(cfg);
        assert_eq!(ranks.len(), 2, "{ranks:?}");
        Command::new("kill")
            .args(["-KILL", &ranks[&1].to_string()])
            .status()
            .unwrap();
        let (status, stderr) = ends(child);
        assert!(!status.success(), "{stderr}");
        assert!(stderr.contains("rank 1"), "{stderr}");

        // a stop request (SIGTERM to every rank, as Slurm sends it) stops them at one update
        // with a checkpoint that one process resumes
        let runs = dir.join("stopped");
        let child = long_run(cfg, &runs);
        for pid in ranks_of(cfg).values() {
            Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .unwrap();
        }
        let (status, stderr) = ends(child);
        assert!(!status.success(), "{stderr}");
        assert_eq!(
            stderr.matches("interrupted after update").count(),
            1,
            "rank 0 reports the stop once: {stderr}"
        );
        assert!(!stderr.contains("MPI_ABORT"), "{stderr}");
        let resumed = common::ok(&[
            "train",
            cfg,
            "--runs",
            runs.to_str().unwrap(),
            "--resume",
            "--set",
            "train.epochs=1000",
            "--set",
            "train.time_limit_minutes=0.02",
        ]);
        assert!(resumed.contains("best epoch"), "{resumed}");
    }
}
