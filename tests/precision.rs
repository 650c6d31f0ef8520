//! Mixed precision on the CPU: bf16 and f16 forward/backward passes against f32 on a tiny
//! U-Net, and a short bf16 / f16 training run against the f32 one.
//!
//! Tolerances: bf16 keeps 8 significant bits (a rounding error of at most 2⁻⁹ ≈ 0.2 % per
//! value), f16 11 bits (2⁻¹² ≈ 0.02 %). A tensor is rounded at every layer boundary, about a
//! dozen times through this network, and BatchNorm renormalises each block, so the errors add
//! up rather than compound. Measured on four inputs: logits within 0.8 % (bf16) and 0.1 % (f16)
//! of their largest magnitude, the loss within 0.06 % and 0.02 %; the gradient of the last
//! layer keeps its direction (cosine > 0.99999 for both), that of the first layer, reached
//! through the whole backward pass in low precision, less so (cosine 0.95–0.98 for bf16,
//! 0.994–0.9998 for f16). The bounds below leave a factor of 2–3 of margin.

mod common;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use segtrain::loss::Loss;
use segtrain::model::{init, UNetConfig};

const CFG: UNetConfig = UNetConfig {
    in_channels: 3,
    classes: 1,
    base_width: 4,
    depth: 2,
};

fn batch() -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let pixels: Vec<f32> = (0..2 * 3 * 16 * 16)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let x = Tensor::from_vec(pixels, (2, 3, 16, 16), &dev).unwrap();
    // a blob of foreground in each image
    let mask: Vec<f32> = (0..2 * 16 * 16)
        .map(|i| {
            let (y, x) = ((i % 256) / 16, i % 16);
            f32::from((4..10).contains(&y) && (5..12).contains(&x))
        })
        .collect();
    let g = Tensor::from_vec(mask, (2, 1, 16, 16), &dev).unwrap();
    (x, g)
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let dot: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (*x as f64) * (*y as f64))
        .sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// Logits, loss and the gradients of the first and last weights in `dtype`.
fn pass(dtype: DType, x: &Tensor, g: &Tensor) -> (Tensor, f64, Tensor, Tensor) {
    let (model, vars) = init(CFG, Some(0.01), false, 5, &Device::Cpu).unwrap();
    let loss = Loss::from_toml_str(
        "[[loss]]\nkind = \"dice\"\n[[loss]]\nkind = \"focal\"\nalpha = 0.25\nnormalize = \"positives\"",
    )
    .unwrap();
    let logits = model.forward_in(x, true, dtype).unwrap();
    assert_eq!(logits.dtype(), DType::F32, "logits reach the loss in f32");
    let value = loss.forward(&logits, g).unwrap();
    let grads = value.total.backward().unwrap();
    let data = vars.data().lock().unwrap();
    let grad = |name: &str| grads.get(data[name].as_tensor()).unwrap().clone();
    let total = value.total.to_scalar::<f32>().unwrap() as f64;
    (logits, total, grad("inc.conv1.weight"), grad("head.weight"))
}

#[test]
fn half_precision_passes_track_f32() {
    let (x, g) = batch();
    let (l32, v32, first32, head32) = pass(DType::F32, &x, &g);
    let scale = max_abs(&l32);
    for (dtype, logit_tol, loss_tol, cos_min) in [
        (DType::BF16, 0.02, 0.005, [0.9, 0.999]),
        (DType::F16, 0.003, 0.001, [0.98, 0.9999]),
    ] {
        let (l, v, first, head) = pass(dtype, &x, &g);
        let diff = max_abs(&(&l - &l32).unwrap());
        assert!(
            diff <= logit_tol * scale,
            "{dtype:?}: logits differ by {diff} (scale {scale})"
        );
        assert!(
            ((v - v32) / v32).abs() <= loss_tol,
            "{dtype:?}: loss {v} vs f32 {v32}"
        );
        let pairs = [("inc.conv1", &first, &first32), ("head", &head, &head32)];
        for ((name, a, b), cos_min) in pairs.into_iter().zip(cos_min) {
            assert_eq!(a.dtype(), DType::F32, "master gradients are f32");
            let c = cosine(a, b);
            assert!(c >= cos_min, "{dtype:?} {name}: gradient cosine {c}");
        }
        // and it is not f32 in disguise
        assert!(diff > 0.0, "{dtype:?} gave exactly the f32 logits");
    }
}

#[test]
fn bf16_and_f16_training_runs_track_f32() {
    let dir = common::temp_dir("precision");
    let root = common::tiny_dataset(&dir, "data", "lesion", 16, 32);
    let cfg = common::tiny_config(&dir, &root, "");
    let runs = dir.join("runs");
    let loss_of = |precision: &str| -> Vec<f64> {
        common::ok(&common::train_args(
            &cfg,
            &runs,
            &[
                "--set",
                &format!("name=\"{precision}\""),
                "--set",
                &format!("train.precision=\"{precision}\""),
            ],
        ));
        let csv = std::fs::read_to_string(runs.join(precision).join("metrics.csv")).unwrap();
        csv.lines()
            .skip(1)
            .map(|l| l.split(',').nth(2).unwrap().parse().unwrap())
            .collect()
    };
    let f32_loss = loss_of("f32");
    for precision in ["bf16", "f16"] {
        let loss = loss_of(precision);
        assert_eq!(loss.len(), f32_loss.len());
        for (a, b) in loss.iter().zip(&f32_loss) {
            assert!(a.is_finite());
            assert!(
                ((a - b) / b).abs() < 0.03,
                "{precision}: training loss {loss:?} vs f32 {f32_loss:?}"
            );
        }
    }
    // an unknown precision is a config error naming the key
    let err = common::fails(&common::train_args(
        &cfg,
        &runs,
        &["--set", "train.precision=\"fp8\""],
    ));
    assert!(err.contains("precision"), "{err}");
}
