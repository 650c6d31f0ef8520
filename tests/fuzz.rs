//! Property-based fuzzing of the three parsers that read untrusted files: configs, image and
//! mask files, model files (bytes and metadata fields). Random and mutated inputs must give `Ok`
//! or a clean `Err`, never a panic; a model file loads as a consistent model or gives an error
//! naming the file. CI runs a few hundred cases per target; `PROPTEST_CASES=100000 cargo test --release
//! --test fuzz` runs a longer campaign.

mod common;

use std::collections::HashMap;
use std::io::Write;

use common::mutated;
use proptest::prelude::*;

const CONFIG: &str = r#"name = "fuzz"
seed = 3
[data]
root = "data/none"
image_size = 32
channels = 3
classes = 2
ignore_index = 255
[data.augment]
flip = true
min_crop = 0.8
[model]
base_width = 4
depth = 2
[train]
epochs = 2
batch_size = 2
schedule = "poly"
grad_clip = 1.0
[[loss]]
kind = "focal"
gamma = 2.0
alpha = [0.25, 0.75]
[[loss]]
kind = "tversky"
fp_weight = 0.3
fn_weight = 0.7
"#;

fn png_bytes() -> Vec<u8> {
    let img = image::GrayImage::from_fn(12, 9, |x, y| image::Luma([(x * 20 + y) as u8]));
    let mut out = std::io::Cursor::new(vec![]);
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn model_bytes() -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pytorch_unet_model.safetensors");
    std::fs::read(path).unwrap()
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("segtrain-fuzz-{}-{name}", std::process::id()));
    std::fs::File::create(&path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
    path
}

/// The metadata keys of a model file.
const META_KEYS: [&str; 16] = [
    "format",
    "segtrain_version",
    "in_channels",
    "classes",
    "base_width",
    "depth",
    "image_size",
    "patch_size",
    "window",
    "activation",
    "mean",
    "std",
    "ignore_index",
    "temperature",
    "config",
    "val_metrics",
];

/// A hostile metadata value: removed (None), a number that is huge, zero, negative or not
/// finite, something that is no number, a huge string, or JSON of the fields' shapes with such
/// values.
fn meta_value() -> impl Strategy<Value = Option<String>> {
    let number = prop_oneof![
        prop::sample::select(vec![
            "0",
            "1",
            "2",
            "3",
            "4",
            "-1",
            "0.5",
            "1.0",
            "0.95",
            "1e-300",
            "1e308",
            "1e39",
            "NaN",
            "inf",
            "-inf",
            "100000000",
            "1073741824",
            "9223372036854775807",
            "18446744073709551615",
            "18446744073709551616",
        ])
        .prop_map(String::from),
        (0u32..80).prop_map(|v| v.to_string()),
        any::<i64>().prop_map(|v| v.to_string()),
        any::<f64>().prop_map(|v| v.to_string()),
    ];
    let json_number = prop_oneof![
        (0u32..80).prop_map(|v| v.to_string()),
        prop::sample::select(vec![
            "0", "-1", "0.5", "1.0", "1e39", "1e308", "\"x\"", "null"
        ])
        .prop_map(String::from),
        any::<u32>().prop_map(|v| v.to_string()),
    ];
    let window = (
        prop::bool::ANY,
        json_number.clone(),
        json_number.clone(),
        prop::sample::select(vec!["gaussian", "linear", "uniform", "cubic"]),
    )
        .prop_map(|(whole, a, b, blend)| {
            if whole {
                format!(r#"{{"whole":{{"size":{a}}}}}"#)
            } else {
                format!(r#"{{"sliding":{{"patch":{a},"overlap":{b},"blend":"{blend}"}}}}"#)
            }
        });
    let array = prop::collection::vec(json_number, 0..5).prop_map(|v| format!("[{}]", v.join(",")));
    prop_oneof![
        Just(None),
        number.prop_map(Some),
        window.prop_map(Some),
        array.prop_map(Some),
        "[ -~]{0,24}".prop_map(Some),
        prop::sample::select(vec![
            "",
            "null",
            "[]",
            "{}",
            "true",
            "sigmoid",
            "softmax",
            "segtrain-unet/1",
            "segtrain-checkpoint/1"
        ])
        .prop_map(|v| Some(v.to_string())),
        (1usize..300_000).prop_map(|n| Some("x".repeat(n))),
        (1usize..300).prop_map(|n| Some(format!("{}{}", "[".repeat(n), "]".repeat(n)))),
    ]
}

/// The fixture model's tensors and metadata.
fn model_parts() -> (Vec<(String, candle_core::Tensor)>, HashMap<String, String>) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/pytorch_unet_model.safetensors");
    let (tensors, meta) =
        segtrain::fsutil::read_safetensors(&path, &candle_core::Device::Cpu).unwrap();
    (tensors.into_iter().collect(), meta)
}

/// Checks what loading a model file with fuzzed metadata gave: a model whose metadata obeys
/// the rules and which predicts finite probabilities, or an error naming the file.
fn check_loaded(
    path: &std::path::Path,
    loaded: anyhow::Result<(
        Box<dyn segtrain::model::SegmentationModel>,
        segtrain::export::ModelMeta,
    )>,
) -> Result<(), TestCaseError> {
    use segtrain::inference::Window;
    use segtrain::rules;
    let (model, meta) = match loaded {
        Err(e) => {
            let msg = format!("{e:#}");
            let name = path.file_name().unwrap().to_str().unwrap();
            prop_assert!(
                msg.contains(name),
                "the error does not name the file: {}",
                msg
            );
            return Ok(());
        }
        Ok(m) => m,
    };
    let u = meta.unet;
    prop_assert_eq!(
        (model.in_channels(), model.classes(), model.side_multiple()),
        (u.in_channels, u.classes, 1 << u.depth)
    );
    prop_assert_eq!(model.state_dict_spec(), u.state_dict_spec());
    prop_assert!(rules::depth(u.depth).is_ok());
    prop_assert!(rules::base_width(u.base_width).is_ok());
    let context = meta.slicing.map_or(0, |s| s.context);
    prop_assert!(rules::channels(u.in_channels, context).is_ok());
    prop_assert!(rules::classes(u.classes).is_ok());
    prop_assert!(rules::activation(meta.activation, u.classes).is_ok());
    prop_assert!(rules::temperature(meta.temperature).is_ok());
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    prop_assert!(rules::mean(&f64s(&meta.normalizer.mean), u.in_channels).is_ok());
    prop_assert!(rules::std(&f64s(&meta.normalizer.std), u.in_channels).is_ok());
    let side = match meta.window {
        Window::Whole { size } => size,
        Window::Sliding { patch, overlap, .. } => {
            prop_assert!(rules::overlap(overlap).is_ok());
            patch
        }
    };
    prop_assert!(rules::side(side, u.depth, "depth").is_ok());
    if side <= 64 {
        let predictor = segtrain::inference::Predictor {
            model: model.as_ref(),
            activation: meta.activation,
            temperature: meta.temperature,
            window: meta.window,
            normalizer: &meta.normalizer,
            batch: 2,
            device: &candle_core::Device::Cpu,
            tta: vec![],
            min_lesion_pixels: 0,
        };
        let image = vec![0.25f32; u.in_channels * 20 * 27];
        let probs = predictor.probabilities(&[(&image, 20, 27)]);
        prop_assert!(probs.is_ok(), "{:?}", probs.err());
    }
    Ok(())
}

/// Cases per target: `PROPTEST_CASES`, 256 by default.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn config_parser_never_panics(bytes in prop_oneof![mutated(CONFIG.as_bytes().to_vec()), prop::collection::vec(any::<u8>(), 0..200)]) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = segtrain::config::Config::from_toml(&text, &[]);
        let _ = segtrain::loss::Loss::from_toml_str(&text);
    }

    #[test]
    fn config_overrides_never_panic(key in "[a-z_.0-9]{0,20}", value in "[ -~]{0,12}") {
        let _ = segtrain::config::Config::from_toml(CONFIG, &[format!("{key}={value}")]);
    }

    #[test]
    fn image_and_mask_loaders_never_panic(bytes in prop_oneof![mutated(png_bytes()), prop::collection::vec(any::<u8>(), 0..300)]) {
        let path = temp_file("img.png", &bytes);
        let format = segtrain::data::Format { channels: 1, slice_stack: false, classes: 3, ignore_index: Some(255), resize: Some(8) };
        let _ = segtrain::data::load_image(&path, &segtrain::data::Format { channels: 3, resize: Some(16), ..format });
        let _ = segtrain::data::load_image(&path, &segtrain::data::Format { resize: None, ..format });
        let _ = segtrain::data::load_image(&path, &segtrain::data::Format { channels: 5, slice_stack: true, ..format });
        let _ = segtrain::data::load_mask(&path, &format);
        let _ = segtrain::data::load_mask(&path, &segtrain::data::Format { classes: 1, ignore_index: None, ..format });
    }

    #[test]
    fn model_metadata_gives_a_consistent_model_or_names_the_file(
        edits in prop::collection::vec((0..META_KEYS.len(), meta_value()), 1..4)
    ) {
        let (tensors, mut meta) = model_parts();
        for (k, v) in edits {
            match v {
                Some(v) => meta.insert(META_KEYS[k].to_string(), v),
                None => meta.remove(META_KEYS[k]),
            };
        }
        let path = temp_file("meta.safetensors", b"");
        segtrain::fsutil::write_safetensors(&path, &tensors, Some(meta)).unwrap();
        let loaded = segtrain::export::load(&path, &candle_core::Device::Cpu);
        check_loaded(&path, loaded)?;
        let read = segtrain::export::read(&path, &candle_core::Device::Cpu);
        if let Err(e) = read {
            prop_assert!(format!("{e:#}").contains("meta.safetensors"), "{:#}", e);
        }
    }

    #[test]
    fn model_loader_never_panics(bytes in prop_oneof![mutated(model_bytes()), prop::collection::vec(any::<u8>(), 0..400)]) {
        let path = temp_file("model.safetensors", &bytes);
        let _ = segtrain::export::load(&path, &candle_core::Device::Cpu);
    }
}
