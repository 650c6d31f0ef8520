//! `segtrain export --format onnx`: the ONNX graph, run by a second runtime (tract, pure
//! Rust), gives segtrain's own probabilities and logits — at input sizes other than the
//! training size, for a 1-class (sigmoid, data-set normalisation, temperature) and a 3-class
//! (softmax, per-image normalisation) model, at several opsets, and in half precision.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{ok, segtrain, temp_dir};
use rand::{Rng, SeedableRng};
use segtrain::data::{Normalization, Normalizer};
use segtrain::export::{self, ModelMeta};
use segtrain::inference::Window;
use segtrain::model::{Activation, ModelKind, UNetConfig};
use tract_onnx::prelude::*;

/// A run folder `dir/name` holding a model of random weights and BatchNorm statistics far
/// from the identity (so that folding them is tested).
fn model(dir: &Path, name: &str, unet: UNetConfig, normalizer: Normalizer, temperature: f64) {
    let (_, vars) = segtrain::model::init(unet, Some(0.1), false, 3, &Device::Cpu).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let tensors: Vec<(String, Tensor)> = export::state_dict(&unet, &vars, 5, DType::F32)
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            let n = t.elem_count();
            let random = |rng: &mut rand_chacha::ChaCha8Rng, lo: f32, hi: f32| {
                let v: Vec<f32> = (0..n).map(|_| rng.random_range(lo..hi)).collect();
                Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap()
            };
            let t = if name.ends_with("running_var") {
                random(&mut rng, 0.3, 2.0)
            } else if name.ends_with("running_mean")
                || name.contains(".bn") && name.ends_with(".bias")
            {
                random(&mut rng, -0.5, 0.5)
            } else if name.contains(".bn") && name.ends_with(".weight") {
                random(&mut rng, 0.5, 1.5)
            } else {
                t
            };
            (name, t)
        })
        .collect();
    let meta = ModelMeta {
        kind: ModelKind::Unet,
        unet,
        window: Window::Whole { size: 32 },
        activation: Activation::default_for(unet.classes),
        normalizer,
        ignore_index: None,
        temperature,
        config: format!("name = \"{name}\"\n"),
        metrics: serde_json::json!({}),
        slicing: None,
    };
    std::fs::create_dir_all(dir.join(name)).unwrap();
    export::save(&dir.join(name).join("model.safetensors"), &tensors, &meta).unwrap();
}

/// A U-Net of base width 4.
fn unet(in_channels: usize, classes: usize, depth: usize) -> UNetConfig {
    UNetConfig {
        in_channels,
        classes,
        base_width: 4,
        depth,
    }
}

/// segtrain's output for raw images `x` (N × C × H × W in [0, 1]): probabilities, or logits.
fn reference(path: &Path, x: &[f32], shape: [usize; 4], activation: bool) -> Vec<f32> {
    let (net, meta) = export::load(path, &Device::Cpu).unwrap();
    let per_image = x.len() / shape[0];
    let mut normalised = x.to_vec();
    for image in normalised.chunks_mut(per_image) {
        meta.normalizer.apply(image);
    }
    let input = Tensor::from_vec(normalised, shape.to_vec(), &Device::Cpu).unwrap();
    let logits = net.forward_t(&input, false).unwrap();
    let out = match activation {
        true => {
            segtrain::inference::probabilities(&logits, meta.activation, meta.temperature).unwrap()
        }
        false => logits,
    };
    out.flatten_all().unwrap().to_vec1().unwrap()
}

/// The ONNX model's output for `x`, run by tract.
fn tract(path: &Path, x: &[f32], shape: [usize; 4]) -> Vec<f32> {
    let model = tract_onnx::onnx()
        .model_for_path(path)
        .unwrap()
        .with_input_fact(0, f32::fact(shape).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let input = tract_ndarray::Array4::from_shape_vec(shape, x.to_vec()).unwrap();
    let out = model.run(tvec!(Tensor4::from(input).into())).unwrap();
    out[0]
        .to_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

type Tensor4 = tract_onnx::prelude::Tensor;

fn export(dir: &Path, run: &str, out: &str, extra: &[&str]) -> std::path::PathBuf {
    let path = dir.join(out);
    let mut args = vec![
        "export",
        "--run",
        dir.join(run).to_str().unwrap(),
        "--format",
        "onnx",
        "--out",
        path.to_str().unwrap(),
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ok(&args);
    path
}

fn random_images(shape: [usize; 4], seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..shape.iter().product())
        .map(|_| rng.random_range(0.0..1.0))
        .collect()
}

fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A run, its export options, two input shapes and the tolerance.
type Case = (&'static str, &'static [&'static str], [[usize; 4]; 2], f32);

#[test]
fn onnx_exports_match_segtrain_in_tract() {
    let dir = temp_dir("onnx");
    let binary = unet(3, 1, 2);
    let dataset = Normalizer::dataset(vec![0.4, 0.5, 0.6], vec![0.2, 0.25, 0.3]);
    model(&dir, "binary", binary, dataset, 1.5);
    let three = unet(1, 3, 3);
    let image = Normalizer {
        mode: Normalization::Image,
        clip: None,
        mean: vec![0.5],
        std: vec![0.25],
    };
    model(&dir, "three", three, image, 1.0);

    // (run, ONNX options, input shapes, tolerance)
    let cases: [Case; 5] = [
        (
            "binary",
            &["--with-activation"],
            [[1, 3, 32, 32], [2, 3, 48, 64]],
            1e-4,
        ),
        ("binary", &[], [[1, 3, 16, 16], [1, 3, 64, 40]], 1e-3),
        (
            "three",
            &["--with-activation", "--opset", "13"],
            [[1, 1, 16, 32], [2, 1, 64, 64]],
            1e-4,
        ),
        (
            "three",
            &["--with-activation", "--opset", "18"],
            [[1, 1, 40, 24], [1, 1, 32, 32]],
            1e-4,
        ),
        (
            "three",
            &["--with-activation", "--dtype", "f16"],
            [[1, 1, 32, 32], [1, 1, 16, 48]],
            2e-2,
        ),
    ];
    for (i, (run, extra, shapes, tolerance)) in cases.into_iter().enumerate() {
        let onnx = export(&dir, run, &format!("{run}{i}.onnx"), extra);
        let activation = extra.contains(&"--with-activation");
        for (j, shape) in shapes.into_iter().enumerate() {
            let x = random_images(shape, (i * 10 + j) as u64);
            let want = reference(
                &dir.join(run).join("model.safetensors"),
                &x,
                shape,
                activation,
            );
            let got = tract(&onnx, &x, shape);
            let d = max_difference(&want, &got);
            assert!(
                d <= tolerance,
                "{run} {extra:?} {shape:?}: largest difference {d}"
            );
        }
    }

    // the metadata says how to use the file
    let bytes = std::fs::read(dir.join("binary0.onnx")).unwrap();
    let model = <tract_onnx::pb::ModelProto as prost::Message>::decode(bytes.as_slice()).unwrap();
    let props: HashMap<String, String> = model
        .metadata_props
        .into_iter()
        .map(|p| (p.key, p.value))
        .collect();
    assert_eq!(props["normalization_in_graph"], "true");
    assert!(props["input"].contains("multiples of 4"), "{props:?}");
    assert!(
        props["output"].contains("sigmoid(logits / 1.5)"),
        "{props:?}"
    );
    assert_eq!(model.opset_import[0].version, 17);

    // bad requests
    for (extra, says) in [
        (&["--opset", "12"][..], "--opset 12"),
        (&["--dtype", "bf16"][..], "bf16"),
    ] {
        let mut args = vec!["export", "--run"];
        let run = dir.join("binary");
        let out = dir.join("bad.onnx");
        args.extend([
            run.to_str().unwrap(),
            "--format",
            "onnx",
            "--out",
            out.to_str().unwrap(),
        ]);
        args.extend(extra);
        let r = segtrain(&args);
        assert!(!r.status.success());
        assert!(String::from_utf8_lossy(&r.stderr).contains(says));
        assert!(!out.exists());
    }
}

/// With percentile clipping, which ONNX cannot express here, the graph takes normalised input
/// and says so.
#[test]
fn clipped_normalisation_stays_out_of_the_graph() {
    let dir = temp_dir("onnx-clip");
    let clipped = Normalizer {
        mode: Normalization::Image,
        clip: Some([1.0, 99.0]),
        mean: vec![0.5],
        std: vec![0.25],
    };
    model(&dir, "clip", unet(1, 1, 2), clipped, 1.0);
    let onnx = export(&dir, "clip", "clip.onnx", &["--with-activation"]);
    let shape = [1, 1, 32, 32];
    let x = random_images(shape, 5);
    let want = reference(&dir.join("clip").join("model.safetensors"), &x, shape, true);
    let (_, meta) =
        export::load(&dir.join("clip").join("model.safetensors"), &Device::Cpu).unwrap();
    let mut normalised = x.clone();
    meta.normalizer.apply(&mut normalised);
    let d = max_difference(&want, &tract(&onnx, &normalised, shape));
    assert!(d <= 1e-4, "largest difference {d}");
    let bytes = std::fs::read(&onnx).unwrap();
    let model = <tract_onnx::pb::ModelProto as prost::Message>::decode(bytes.as_slice()).unwrap();
    assert!(model
        .metadata_props
        .iter()
        .any(|p| p.key == "normalization_in_graph" && p.value == "false"));
}

/// `export --format folder`: model.safetensors, config.json and a model card; `predict
/// --model DIR` takes the folder and predicts what the model file predicts.
#[test]
fn a_model_folder_describes_itself_and_predicts() {
    let dir = temp_dir("model-folder");
    model(
        &dir,
        "run",
        unet(3, 3, 2),
        Normalizer::dataset(vec![0.5; 3], vec![0.25; 3]),
        1.0,
    );
    let folder = dir.join("exported");
    ok(&[
        "export",
        "--run",
        dir.join("run").to_str().unwrap(),
        "--format",
        "folder",
        "--out",
        folder.to_str().unwrap(),
    ]);
    // a folder of other files is not overwritten; an earlier model folder is
    let other = dir.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("README.md"), "mine").unwrap();
    for (out, succeeds) in [(&other, false), (&folder, true)] {
        let r = segtrain(&[
            "export",
            "--run",
            dir.join("run").to_str().unwrap(),
            "--format",
            "folder",
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_eq!(
            r.status.success(),
            succeeds,
            "{}",
            String::from_utf8_lossy(&r.stderr)
        );
    }
    assert_eq!(
        std::fs::read_to_string(other.join("README.md")).unwrap(),
        "mine"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(folder.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architecture"]["in_channels"], 3);
    assert_eq!(config["architecture"]["classes"], 3);
    assert_eq!(config["architecture"]["input_side_multiple"], 4);
    assert_eq!(config["activation"], "softmax");
    assert_eq!(config["normalization"]["mode"], "dataset");
    assert_eq!(config["labels"]["0"], "background");
    assert_eq!(config["window"]["whole"]["size"], 32, "{config}");
    let card = std::fs::read_to_string(folder.join("README.md")).unwrap();
    for part in [
        "## Intended use and limits",
        "load_state_dict",
        "onnxruntime",
        "## Validation",
    ] {
        assert!(card.contains(part), "{part}: {card}");
    }
    let (a, b) = (
        export::read(&folder, &Device::Cpu).unwrap().0,
        export::read(&dir.join("run/model.safetensors"), &Device::Cpu)
            .unwrap()
            .0,
    );
    for (name, t) in &a {
        let d = (t.to_dtype(DType::F64).unwrap() - b[name].to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(d, 0.0, "{name}");
    }

    let image = dir.join("img.png");
    image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 8) as u8, (y * 8) as u8, 90])
    })
    .save(&image)
    .unwrap();
    let predict = |model: &Path, out: &str| {
        let out = dir.join(out);
        ok(&[
            "predict",
            "--model",
            model.to_str().unwrap(),
            image.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--probabilities",
        ]);
        std::fs::read(out.join("img_prob_c1.png")).unwrap()
    };
    assert_eq!(
        predict(&folder, "from-folder"),
        predict(&dir.join("run/model.safetensors"), "from-file")
    );
}
