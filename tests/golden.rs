//! Every golden case of `tests/golden/` (PyTorch 2.15 / torchvision / MONAI 1.6.1, see its
//! README) must match: loss rtol 1e-4 + atol 1e-6, gradient atol 1e-4·max|grad| + 1e-7.

use std::path::Path;

use candle_core::{Device, Tensor, Var};
use segtrain::kernels::Kernels;
use segtrain::loss::Loss;

struct Case {
    name: String,
    config: String,
    logits: Tensor,
    target: Tensor,
    loss: f32,
    grad: Vec<f32>,
}

fn load(path: &Path) -> Case {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    Case {
        name: meta["name"].clone(),
        config: meta["config"].clone(),
        logits: tensors["logits"].clone(),
        target: tensors["target"].clone(),
        loss: tensors["loss"].to_scalar::<f32>().unwrap(),
        grad: tensors["grad"].flatten_all().unwrap().to_vec1().unwrap(),
    }
}

/// (loss error / tolerance, grad error / tolerance): both must be ≤ 1.
fn evaluate(case: &Case, kernels: Kernels) -> (f64, f64) {
    let loss = Loss::from_toml_str(&case.config).unwrap();
    let x = Var::from_tensor(&case.logits).unwrap();
    let value = loss
        .forward_using(x.as_tensor(), &case.target, kernels)
        .unwrap();
    let got = value.total.to_scalar::<f32>().unwrap() as f64;
    let want = case.loss as f64;
    let loss_ratio = (got - want).abs() / (1e-4 * want.abs() + 1e-6);
    let grads = value.total.backward().unwrap();
    let grad: Vec<f32> = grads
        .get(x.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let max_abs = case.grad.iter().fold(0f64, |m, g| m.max(g.abs() as f64));
    let tol = 1e-4 * max_abs + 1e-7;
    let grad_err = grad
        .iter()
        .zip(&case.grad)
        .map(|(a, b)| {
            assert!(a.is_finite(), "{}: non-finite gradient", case.name);
            (*a as f64 - *b as f64).abs()
        })
        .fold(0f64, f64::max);
    (loss_ratio, grad_err / tol)
}

#[test]
fn every_golden_case_matches_pytorch() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 34, "golden cases missing: {}", paths.len());
    let mut failures = vec![];
    // the fused CPU kernels and Candle's generic ops must both match
    for kernels in [Kernels::FastCpu, Kernels::Candle] {
        for path in &paths {
            let case = load(path);
            let (loss_ratio, grad_ratio) = evaluate(&case, kernels);
            println!(
                "{kernels:?} {:<55} loss err/tol {:.3e}  grad err/tol {:.3e}",
                case.name, loss_ratio, grad_ratio
            );
            if !(loss_ratio <= 1.0 && grad_ratio <= 1.0) {
                failures.push(format!("{kernels:?} {}", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "golden cases off: {failures:?}");
}
