//! Property-based fuzzing of the three parsers that read untrusted files: configs, image and
//! mask files, model files. Random and mutated inputs must give `Ok` or a clean `Err`, never a
//! panic. CI runs a few hundred cases per target; `PROPTEST_CASES=100000 cargo test --release
//! --test fuzz` runs a longer campaign.

use std::io::Write;

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

/// A valid input with a few bytes overwritten, inserted or cut.
fn mutated(base: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
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
        let _ = segtrain::data::load_image(&path, 3, Some(16));
        let _ = segtrain::data::load_image(&path, 1, None);
        let format = segtrain::data::Format { channels: 1, classes: 3, ignore_index: Some(255), resize: Some(8) };
        let _ = segtrain::data::load_mask(&path, &format);
        let _ = segtrain::data::load_mask(&path, &segtrain::data::Format { classes: 1, ignore_index: None, ..format });
    }

    #[test]
    fn model_loader_never_panics(bytes in prop_oneof![mutated(model_bytes()), prop::collection::vec(any::<u8>(), 0..400)]) {
        let path = temp_file("model.safetensors", &bytes);
        let _ = segtrain::export::load(&path, &candle_core::Device::Cpu);
    }
}
