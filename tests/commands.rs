//! Every command end to end on tiny data: synth, train, eval, predict, export, loss eval.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device};
use common::{fails, ok, temp_dir, tiny_config, tiny_dataset};
use segtrain::fsutil::read_safetensors;

/// The state_dict keys, shapes and dtypes of the README's PyTorch module, derived here
/// independently from its Python definition.
fn pytorch_state_dict(
    in_ch: usize,
    out_ch: usize,
    f: usize,
    d: usize,
) -> Vec<(String, Vec<usize>, DType)> {
    let mut keys = vec![];
    // DoubleConv registers conv1, bn1, conv2, bn2 in that order; BatchNorm2d has weight, bias,
    // running_mean, running_var, num_batches_tracked
    let double = |keys: &mut Vec<(String, Vec<usize>, DType)>, p: &str, a: usize, b: usize| {
        for (i, cin) in [(1, a), (2, b)] {
            keys.push((
                format!("{p}.conv{i}.weight"),
                vec![b, cin, 3, 3],
                DType::F32,
            ));
            for s in ["weight", "bias", "running_mean", "running_var"] {
                keys.push((format!("{p}.bn{i}.{s}"), vec![b], DType::F32));
            }
            keys.push((format!("{p}.bn{i}.num_batches_tracked"), vec![], DType::I64));
        }
    };
    double(&mut keys, "inc", in_ch, f);
    for i in 1..=d {
        double(
            &mut keys,
            &format!("down{i}"),
            f * 2usize.pow(i as u32 - 1),
            f * 2usize.pow(i as u32),
        );
    }
    for i in 1..=d {
        let a = f * 2usize.pow((d - i + 1) as u32);
        double(&mut keys, &format!("up{i}"), a, a / 2);
        keys.push((format!("up{i}.up.weight"), vec![a, a / 2, 2, 2], DType::F32));
        keys.push((format!("up{i}.up.bias"), vec![a / 2], DType::F32));
    }
    keys.push(("head.weight".into(), vec![out_ch, f, 1, 1], DType::F32));
    keys.push(("head.bias".into(), vec![out_ch], DType::F32));
    keys
}

fn check_state_dict(path: &Path, dtype: DType, steps: i64) -> HashMap<String, String> {
    let (tensors, meta) = read_safetensors(path, &Device::Cpu).unwrap();
    let want = pytorch_state_dict(3, 1, 4, 2);
    assert_eq!(
        tensors.len(),
        want.len(),
        "strict load: no missing or unexpected keys"
    );
    for (name, shape, kind) in want {
        let t = tensors
            .get(&name)
            .unwrap_or_else(|| panic!("missing {name}"));
        assert_eq!(t.dims(), shape.as_slice(), "{name}");
        let expected = if kind == DType::I64 {
            DType::I64
        } else {
            dtype
        };
        assert_eq!(t.dtype(), expected, "{name}");
        if kind == DType::I64 {
            assert_eq!(t.to_scalar::<i64>().unwrap(), steps, "{name}");
        }
    }
    meta
}

#[test]
fn synth_is_deterministic_and_writes_the_dataset_layout() {
    let dir = temp_dir("synth");
    for kind in ["lesion", "mri", "vessel", "multiclass"] {
        let a = tiny_dataset(&dir, &format!("{kind}-a"), kind, 3, 32);
        let b = tiny_dataset(&dir, &format!("{kind}-b"), kind, 3, 32);
        for sub in ["images", "masks"] {
            let file = format!("{sub}/{kind}_0002.png");
            let (fa, fb) = (
                std::fs::read(a.join(&file)).unwrap(),
                std::fs::read(b.join(&file)).unwrap(),
            );
            assert_eq!(fa, fb, "{kind} {sub} differ between two runs with one seed");
        }
        let mask = image::open(a.join(format!("masks/{kind}_0000.png")))
            .unwrap()
            .to_luma8();
        assert_eq!(mask.dimensions(), (32, 32));
        let values: std::collections::BTreeSet<u8> = mask.pixels().map(|p| p.0[0]).collect();
        let allowed: &[u8] = if kind == "multiclass" {
            &[0, 1, 2]
        } else {
            &[0, 255]
        };
        assert!(
            values.iter().all(|v| allowed.contains(v)),
            "{kind}: mask values {values:?}"
        );
    }
    // an existing folder is not overwritten
    let err = fails(&[
        "synth",
        "--out",
        dir.join("lesion-a").to_str().unwrap(),
        "--count",
        "2",
    ]);
    assert!(err.contains("already exists"), "{err}");
}

#[test]
fn synth_knobs_control_foreground_and_empty_images() {
    let dir = temp_dir("synth-knobs");
    let out = dir.join("mri");
    ok(&[
        "synth",
        "--out",
        out.to_str().unwrap(),
        "--kind",
        "mri",
        "--count",
        "20",
        "--size",
        "64",
        "--foreground",
        "0.005",
        "--empty-fraction",
        "0.5",
    ]);
    let mut empty = 0;
    let mut fg = vec![];
    for i in 0..20 {
        let m = image::open(out.join(format!("masks/mri_{i:04}.png")))
            .unwrap()
            .to_luma8();
        let n = m.pixels().filter(|p| p.0[0] > 0).count();
        if n == 0 {
            empty += 1;
        } else {
            fg.push(n as f64 / (64.0 * 64.0));
        }
    }
    assert!((4..=16).contains(&empty), "empty slices: {empty} of 20");
    let mean = fg.iter().sum::<f64>() / fg.len() as f64;
    assert!(mean < 0.02 && mean > 0.001, "mean foreground {mean}");
}

#[test]
fn train_writes_a_run_that_pytorch_can_load_and_every_command_uses() {
    let dir = temp_dir("train");
    let data = tiny_dataset(&dir, "lesion", "lesion", 12, 48);
    let config = tiny_config(&dir, &data, "");
    let runs = dir.join("runs");
    let stdout = ok(&common::train_args(&config, &runs, &["--device", "cpu"]));
    assert!(stdout.contains("epoch 2/2"), "{stdout}");
    let run = runs.join("tiny");
    for f in [
        "config.toml",
        "metrics.csv",
        "checkpoint.safetensors",
        "model.safetensors",
        "summary.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 3, "{csv}");
    let header: Vec<&str> = lines[0].split(',').collect();
    assert!(header.starts_with(&["epoch", "lr", "train_loss", "loss_0_dice", "loss_1_focal"]));
    for column in [
        "val_dice",
        "val_lesion_dice",
        "val_hd95",
        "val_ece",
        "val_brier",
    ] {
        assert!(
            header.contains(&column),
            "metrics.csv lacks {column}: {}",
            lines[0]
        );
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    for key in [
        "best_epoch",
        "val_dice",
        "val_iou",
        "epochs",
        "train_seconds",
        "device",
    ] {
        assert!(summary.get(key).is_some(), "summary lacks {key}");
    }
    assert_eq!(summary["epochs"], 2);
    // 9 training images (12 - 25 %) in batches of 4: 3 updates per epoch
    let meta = check_state_dict(
        &run.join("model.safetensors"),
        DType::F32,
        3 * summary["best_epoch"].as_i64().unwrap(),
    );
    for key in [
        "config",
        "in_channels",
        "classes",
        "base_width",
        "depth",
        "image_size",
        "mean",
        "std",
        "val_metrics",
        "segtrain_version",
    ] {
        assert!(meta.contains_key(key), "metadata lacks {key}");
    }
    assert!(meta["config"].contains("name = \"tiny\""));

    // the resolved config records the overrides
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    assert!(
        resolved.contains("epochs = 2") && resolved.contains("image_size = 32"),
        "{resolved}"
    );

    // a second run into the same folder is refused
    let err = fails(&common::train_args(&config, &runs, &[]));
    assert!(
        err.contains("--resume") && err.contains("--overwrite"),
        "{err}"
    );

    // eval
    let model = run.join("model.safetensors");
    let json = ok(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
        "--device",
        "cpu",
    ]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["images"], 12);
    let dice = report["dice"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&dice));
    let table = ok(&[
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(
        table.contains("dice") && table.contains("recall"),
        "{table}"
    );

    // predict on an image of another size: outputs come back at the input's size
    let odd = dir.join("odd.png");
    image::open(data.join("images/lesion_0000.png"))
        .unwrap()
        .resize_exact(45, 37, image::imageops::FilterType::Triangle)
        .save(&odd)
        .unwrap();
    let out = dir.join("pred");
    ok(&[
        "predict",
        "--model",
        model.to_str().unwrap(),
        odd.to_str().unwrap(),
        data.join("images").to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--overlay",
        "--probabilities",
    ]);
    let mask = image::open(out.join("odd_mask.png")).unwrap();
    assert_eq!((mask.width(), mask.height()), (45, 37));
    let values: std::collections::BTreeSet<u8> = mask.to_luma8().pixels().map(|p| p.0[0]).collect();
    assert!(values.iter().all(|v| *v == 0 || *v == 255), "{values:?}");
    let prob = image::open(out.join("odd_prob.png")).unwrap();
    assert!(
        matches!(prob, image::DynamicImage::ImageLuma16(_)),
        "16-bit probabilities"
    );
    assert_eq!(
        image::open(out.join("odd_overlay.png")).unwrap().width(),
        45
    );
    assert!(
        out.join("lesion_0011_mask.png").exists(),
        "a folder input expands to its images"
    );

    // export in half precision
    for (dtype, want) in [
        ("f16", DType::F16),
        ("bf16", DType::BF16),
        ("f32", DType::F32),
    ] {
        let file = dir.join(format!("model-{dtype}.safetensors"));
        ok(&[
            "export",
            "--run",
            run.to_str().unwrap(),
            "--out",
            file.to_str().unwrap(),
            "--dtype",
            dtype,
        ]);
        check_state_dict(&file, want, 3 * summary["best_epoch"].as_i64().unwrap());
        // and the exported file predicts like the original
        ok(&[
            "eval",
            "--model",
            file.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--json",
        ]);
    }
}

#[test]
fn overrides_and_config_errors_name_the_key() {
    let dir = temp_dir("overrides");
    let data = tiny_dataset(&dir, "lesion", "lesion", 6, 32);
    let config = tiny_config(&dir, &data, "");
    let cfg = config.to_str().unwrap();
    let runs = dir.join("runs");
    let r = runs.to_str().unwrap();
    let err = fails(&["train", cfg, "--runs", r, "--set", "train.epoch=3"]);
    assert!(
        err.contains("train") && err.contains("epoch") && err.contains("did you mean `epochs`"),
        "{err}"
    );
    let err = fails(&["train", cfg, "--runs", r, "--set", "loss.1.gama=1"]);
    assert!(
        err.contains("loss.1") && err.contains("did you mean `gamma`"),
        "{err}"
    );
    let err = fails(&["train", cfg, "--runs", r, "--set", "loss.5.gamma=1"]);
    assert!(err.contains("loss") && err.contains("2 entries"), "{err}");
    let err = fails(&["train", cfg, "--runs", r, "--set", "data.image_size=42"]);
    assert!(
        err.contains("data.image_size") && err.contains("2^depth"),
        "{err}"
    );
    let err = fails(&["train", cfg, "--runs", r, "--device", "tpu"]);
    assert!(err.contains("unknown device `tpu`"), "{err}");
    let err = fails(&["train", cfg, "--runs", r, "--device", "cuda"]);
    assert!(err.contains("without CUDA support"), "{err}");
    // an override that is valid trains with it
    let stdout = ok(&[
        "train",
        cfg,
        "--runs",
        r,
        "--set",
        "train.epochs=1",
        "--set",
        "loss.1.gamma=1",
        "--set",
        "name=\"other\"",
    ]);
    assert!(stdout.contains("epoch 1/1"), "{stdout}");
    let resolved = std::fs::read_to_string(runs.join("other/config.toml")).unwrap();
    assert!(resolved.contains("gamma = 1"), "{resolved}");
}

#[test]
fn loss_eval_reproduces_a_golden_case() {
    let dir = temp_dir("loss-eval");
    let golden = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/combo_dice_focal_sigmoid_map_ignore.safetensors");
    let (tensors, meta) = read_safetensors(&golden, &Device::Cpu).unwrap();
    let config = dir.join("loss.toml");
    std::fs::write(&config, &meta["config"]).unwrap();
    let out = dir.join("out.safetensors");
    ok(&[
        "loss",
        "eval",
        "--config",
        config.to_str().unwrap(),
        "--input",
        golden.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let (result, _) = read_safetensors(&out, &Device::Cpu).unwrap();
    assert_eq!(result["loss"].dims(), &[] as &[usize]);
    let (got, want) = (
        result["loss"].to_scalar::<f32>().unwrap(),
        tensors["loss"].to_scalar::<f32>().unwrap(),
    );
    assert!(
        (got - want).abs() <= 1e-4 * want.abs() + 1e-6,
        "{got} vs {want}"
    );
    assert_eq!(result["grad"].dims(), tensors["logits"].dims());
    let t0 = result["term.0"].to_scalar::<f32>().unwrap();
    let t1 = result["term.1"].to_scalar::<f32>().unwrap();
    assert!(
        (t0 + t1 - got).abs() < 1e-5,
        "the weights are 1: terms add up"
    );
    let list = ok(&["loss", "list"]);
    assert!(list.contains("focal_tversky"));
    let err = fails(&[
        "loss",
        "eval",
        "--config",
        config.to_str().unwrap(),
        "--input",
        config.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("not a valid safetensors file"), "{err}");
}

#[test]
fn every_command_has_help() {
    use clap::CommandFactory;
    // every path of subcommands in clap's command tree, from the one definition in `cli`
    fn paths(cmd: &clap::Command, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands() {
            let mut path = prefix.clone();
            path.push(sub.get_name().to_string());
            out.push(path.clone());
            paths(sub, path, out);
        }
    }
    let mut all = vec![];
    paths(&segtrain::cli::Cli::command(), vec![], &mut all);
    assert!(all.len() >= 14, "{all:?}");
    for path in all {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let out = ok(&args);
        assert!(out.contains("Usage"), "{args:?}: {out}");
    }
}

#[test]
fn every_shipped_config_is_valid_and_they_differ_only_in_the_loss() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("models");
    let mut configs = vec![];
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let c = segtrain::config::Config::load(&path, &[])
                .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            configs.push((path, c));
        }
    }
    for name in [
        "unet-bce",
        "unet-focal",
        "unet-dice",
        "unet-dice-focal",
        "unet-tversky",
        "unet-focal-tversky",
    ] {
        assert!(
            configs.iter().any(|(_, c)| c.name == name),
            "models/{name}.toml missing"
        );
    }
    // one example per loss family
    let kinds: std::collections::BTreeSet<String> = configs
        .iter()
        .flat_map(|(_, c)| {
            c.loss
                .iter()
                .map(|t| t["kind"].as_str().unwrap().to_string())
        })
        .collect();
    for family in [
        "cross_entropy",
        "focal",
        "dice",
        "jaccard",
        "tversky",
        "focal_tversky",
        "generalized_dice",
        "quality_focal",
        "topk_cross_entropy",
    ] {
        assert!(kinds.contains(family), "no models/ config uses `{family}`");
    }
    // fair comparisons: the unet-* experiments share data, model, schedule and seed
    configs.retain(|(_, c)| c.name.starts_with("unet-"));
    let key = |c: &segtrain::config::Config| {
        format!(
            "{} {:?} {:?} {:?}",
            c.seed,
            c.data.root,
            serde_json::to_string(&c.model).unwrap(),
            serde_json::to_string(&c.train).unwrap()
        )
    };
    let first = key(&configs[0].1);
    for (path, c) in &configs {
        assert_eq!(key(c), first, "{} differs beyond its loss", path.display());
    }
}

#[test]
fn the_same_config_and_seed_train_the_same_weights() {
    let dir = temp_dir("reproducible");
    let data = tiny_dataset(&dir, "lesion", "lesion", 10, 32);
    let config = tiny_config(&dir, &data, "");
    let weights = |runs: &str, extra: &[&str]| -> HashMap<String, Vec<f64>> {
        let runs = dir.join(runs);
        ok(&common::train_args(&config, &runs, extra));
        common::tensors(&runs.join("tiny/model.safetensors"))
    };
    let a = weights("a", &[]);
    assert_eq!(a, weights("b", &[]), "two runs of one config differ");
    let c = weights("c", &["--set", "seed=8"]);
    assert_ne!(
        a["down1.conv1.weight"], c["down1.conv1.weight"],
        "another seed gave the same weights"
    );
}

#[test]
fn device_auto_says_what_it_took_and_why() {
    let dir = temp_dir("device");
    let data = tiny_dataset(&dir, "lesion", "lesion", 8, 32);
    let config = tiny_config(&dir, &data, "");
    let runs = dir.join("runs");
    let out = common::segtrain(&common::train_args(
        &config,
        &runs,
        &["--device", "auto", "--set", "train.epochs=1"],
    ));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    if !cfg!(feature = "cuda") && !cfg!(feature = "metal") {
        assert!(
            stderr
                .contains("device: cpu (auto; CUDA: not in this build; Metal: not in this build)"),
            "{stderr}"
        );
    } else {
        assert!(stderr.contains("device: "), "{stderr}");
    }
}

#[test]
fn a_generated_data_set_must_match_its_synth_settings() {
    let dir = temp_dir("synth-stamp");
    let root = dir.join("generated");
    let config = tiny_config(
        &dir,
        &root,
        "\n[data.synth]\nkind = \"lesion\"\ncount = 8\nsize = 32\nseed = 2\n",
    );
    let runs = dir.join("runs");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["train", config.to_str().unwrap(), "--runs"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.push(runs.to_str().unwrap().into());
        v.extend([
            "--set".into(),
            "train.epochs=1".into(),
            "--overwrite".into(),
        ]);
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let first = args(&[]);
    ok(&first.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(root.join("synth.toml").exists());
    let changed = args(&["--set", "data.synth.label_noise=0.3"]);
    let err = fails(&changed.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("data.synth.label_noise"), "{err}");
    assert!(err.contains("0.3"), "{err}");
}

/// One tiny `bench` step's JSON line, with `extra` arguments and environment.
fn bench_line(extra: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let mut args = vec![
        "bench",
        "--batch",
        "1",
        "--size",
        "32",
        "--base-width",
        "4",
        "--depth",
        "2",
        "--steps",
        "1",
    ];
    args.extend_from_slice(extra);
    let out = common::ok_with_env(&args, env);
    serde_json::from_str(out.trim()).expect("one JSON line")
}

#[test]
fn bench_names_the_cpu_and_the_instruction_sets_it_runs() {
    let line = bench_line(&[], &[]);
    assert!(!line["cpu"].as_str().expect("cpu").is_empty(), "{line}");
    // (kernels' path, GEMMs' path) on this CPU, in the default build
    #[cfg(target_arch = "x86_64")]
    let (widest, gemm) = {
        let f = |name| match name {
            "avx2" => std::arch::is_x86_feature_detected!("avx2"),
            "fma" => std::arch::is_x86_feature_detected!("fma"),
            "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
            "avx512bw" => std::arch::is_x86_feature_detected!("avx512bw"),
            _ => std::arch::is_x86_feature_detected!("avx512vl"),
        };
        let avx2 = f("avx2") && f("fma");
        let kernels = match (avx2, f("avx512f") && f("avx512bw") && f("avx512vl")) {
            (true, true) => "avx512",
            (true, false) => "avx2",
            _ => "generic",
        };
        let gemm = match (f("avx512f"), f("fma")) {
            (true, _) => "avx512",
            (false, true) => "avx2",
            _ => "generic",
        };
        (kernels, gemm)
    };
    #[cfg(target_arch = "aarch64")]
    let (widest, gemm) = ("neon", "neon");
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let (widest, gemm) = ("generic", "generic");
    assert_eq!(line["isa"], widest, "{line}");
    assert_eq!(line["gemm_isa"], gemm, "{line}");
    assert!(line["images_per_second"].as_f64().expect("a speed") > 0.0);
    if cfg!(target_arch = "x86_64") {
        // narrower paths: by flag and by environment; never wider than the CPU
        let generic = bench_line(&["--isa", "generic"], &[]);
        assert_eq!(generic["isa"], "generic", "{generic}");
        let avx2 = bench_line(&[], &[("SEGTRAIN_ISA", "avx2")]);
        let expect = if widest == "generic" {
            "generic"
        } else {
            "avx2"
        };
        assert_eq!(avx2["isa"], expect, "{avx2}");
        assert_eq!(
            avx2["gemm_isa"], gemm,
            "the GEMMs follow the build, not the cap"
        );
    }
}

/// The element-wise kernels' instruction-set paths (AVX-512, AVX2 + FMA, baseline) compute the
/// same arithmetic: a short training run ends with bitwise the same weights on each path the
/// machine has.
#[test]
fn every_element_wise_path_trains_the_same_weights() {
    let dir = temp_dir("isa-paths");
    let data = tiny_dataset(&dir, "data", "lesion", 8, 32);
    let config = tiny_config(&dir, &data, "");
    let weights = |isa: &str| {
        let runs = dir.join(format!("runs-{isa}"));
        common::ok_with_env(
            &common::train_args(&config, &runs, &[]),
            &[("SEGTRAIN_ISA", isa)],
        );
        common::tensors(&runs.join("tiny").join("model.safetensors"))
    };
    let generic = weights("generic");
    assert!(!generic.is_empty());
    for isa in ["avx2", "avx512"] {
        assert!(
            weights(isa) == generic,
            "SEGTRAIN_ISA={isa} trained other weights"
        );
    }
}
