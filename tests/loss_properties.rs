//! Properties of the loss registry beyond the golden cases: γ = 0 focal is CE, focal ≤ CE
//! per element, perfect predictions, saturated logits, empty and full masks, config errors,
//! and every term's gradient against central finite differences in f64.

use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use segtrain::loss::{kind_names, Loss, REGISTRY};

fn logits(shape: (usize, usize, usize, usize), scale: f64, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Float target of the given shape: binary with `fg` foreground probability, or soft.
fn float_target(shape: (usize, usize, usize, usize), fg: f64, soft: bool, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let v: Vec<f64> = (0..n)
        .map(|_| {
            if soft {
                rng.random_range(0.0..1.0)
            } else if rng.random_bool(fg) {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Class map (N, H, W) with values 0..classes and `ignored` of the pixels set to 255.
fn class_map(n: usize, h: usize, w: usize, classes: u32, ignored: f64, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<i64> = (0..n * h * w)
        .map(|_| {
            if rng.random_bool(ignored) {
                255
            } else {
                rng.random_range(0..classes) as i64
            }
        })
        .collect();
    Tensor::from_vec(v, (n, h, w), &Device::Cpu).unwrap()
}

/// (total loss, term values, gradient) in the logits' dtype, as f64.
fn evaluate(config: &str, logits: &Tensor, target: &Tensor) -> (f64, Vec<f64>, Vec<f64>) {
    let loss = Loss::from_toml_str(config).unwrap();
    let x = Var::from_tensor(logits).unwrap();
    let value = loss.forward(x.as_tensor(), target).unwrap();
    let scalar = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
    let grads = value.total.backward().unwrap();
    let grad = grads
        .get(x.as_tensor())
        .map(|g| {
            g.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        })
        .unwrap_or_else(|| vec![0.0; logits.elem_count()]);
    (
        scalar(&value.total),
        value.terms.iter().map(scalar).collect(),
        grad,
    )
}

fn loss_value(config: &str, logits: &Tensor, target: &Tensor) -> f64 {
    let loss = Loss::from_toml_str(config).unwrap();
    let v = loss.forward(logits, target).unwrap().total;
    v.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol, "{what}: element {i}: {x} vs {y}");
    }
}

#[test]
fn focal_with_gamma_zero_is_cross_entropy() {
    let sigmoid_x = logits((2, 1, 6, 6), 8.0, 1).to_dtype(DType::F32).unwrap();
    let sigmoid_t = float_target((2, 1, 6, 6), 0.3, false, 2)
        .to_dtype(DType::F32)
        .unwrap();
    let softmax_x = logits((2, 3, 6, 6), 8.0, 3).to_dtype(DType::F32).unwrap();
    let softmax_t = class_map(2, 6, 6, 3, 0.2, 4);
    for (x, t, ignore) in [
        (&sigmoid_x, &sigmoid_t, ""),
        (&softmax_x, &softmax_t, "ignore_index = 255\n"),
    ] {
        let focal = evaluate(
            &format!("[[loss]]\nkind = \"focal\"\ngamma = 0.0\n{ignore}"),
            x,
            t,
        );
        let ce = evaluate(
            &format!("[[loss]]\nkind = \"cross_entropy\"\n{ignore}"),
            x,
            t,
        );
        assert_eq!(focal.0, ce.0, "loss");
        assert_eq!(focal.2, ce.2, "gradient");
    }
}

#[test]
fn focal_is_at_most_cross_entropy_per_element() {
    // single-element inputs over a grid of logits, targets and γ: FL(x, g) ≤ CE(x, g)
    for &x in &[-100.0, -30.0, -4.0, -0.5, 0.0, 0.3, 2.0, 12.0, 100.0] {
        for &g in &[0.0, 0.25, 1.0] {
            for &gamma in &[0.5, 1.0, 2.0, 5.0] {
                let xt = Tensor::new(&[[[[x]]]], &Device::Cpu).unwrap();
                let gt = Tensor::new(&[[[[g]]]], &Device::Cpu).unwrap();
                let fl = loss_value(
                    &format!("[[loss]]\nkind = \"focal\"\ngamma = {gamma}"),
                    &xt,
                    &gt,
                );
                let ce = loss_value("[[loss]]\nkind = \"cross_entropy\"", &xt, &gt);
                assert!(fl.is_finite() && ce.is_finite());
                assert!(
                    fl <= ce + 1e-12,
                    "x {x} g {g} γ {gamma}: focal {fl} > CE {ce}"
                );
            }
        }
    }
    // softmax, per pixel
    let x = logits((1, 4, 5, 5), 6.0, 9);
    let t = class_map(1, 5, 5, 4, 0.0, 10);
    let fl = loss_value("[[loss]]\nkind = \"focal\"\nnormalize = \"sum\"", &x, &t);
    let ce = loss_value("[[loss]]\nkind = \"cross_entropy\"", &x, &t) * 25.0;
    assert!(fl < ce, "softmax focal {fl} vs CE {ce}");
}

#[test]
fn perfect_prediction_scores_zero_on_region_losses() {
    let t = float_target((2, 1, 8, 8), 0.3, false, 5);
    let x = ((&t * 2.0).unwrap() - 1.0).unwrap() * 30.0; // ±30 logits matching the target
    let x = x.unwrap();
    for kind in [
        "dice",
        "jaccard",
        "tversky",
        "focal_tversky",
        "generalized_dice",
    ] {
        let v = loss_value(&format!("[[loss]]\nkind = \"{kind}\""), &x, &t);
        assert!(v.abs() < 1e-6, "{kind}: {v}");
    }
    // and a bad prediction does not
    let v = loss_value("[[loss]]\nkind = \"dice\"", &x.neg().unwrap(), &t);
    assert!(v > 0.99, "inverted prediction: {v}");
}

/// Kinds defined for sigmoid outputs only (refused under softmax, tested in config errors).
const SIGMOID_ONLY: &[&str] = &["quality_focal"];

/// Every registered kind with its defaults (a new loss is checked without touching this list),
/// then typical options, for the saturated and finite-difference checks.
fn configs(softmax: bool) -> Vec<String> {
    let mut c: Vec<String> = REGISTRY
        .iter()
        .filter(|k| !(softmax && SIGMOID_ONLY.contains(&k.name)))
        .map(|k| format!("kind = \"{}\"", k.name))
        .collect();
    c.extend([
        "kind = \"focal\"\ngamma = 0.5\nalpha = 0.25\nnormalize = \"positives\"".into(),
        "kind = \"focal\"\ngamma = 1.5\np_floor = 0.05\nnormalize = \"sum\"".into(),
        "kind = \"dice\"\nsquared = true\nper_image = false".into(),
        "kind = \"focal_tversky\"\nexponent = 2.0\nper_image = false".into(),
        "kind = \"generalized_dice\"\nweight_type = \"simple\"\nper_image = false".into(),
        "kind = \"topk_cross_entropy\"\nfraction = 0.3".into(),
    ]);
    if softmax {
        c.push("kind = \"cross_entropy\"\nclass_weights = [0.2, 1.0, 3.0]".into());
        c.push("kind = \"focal\"\nalpha = [0.2, 0.3, 0.5]".into());
        c.push("kind = \"dice\"\ninclude_background = true\nclass_weights = [1, 2, 3]".into());
        c.push(
            "kind = \"tversky\"\nfp_weight = 0.5\nfn_weight = 0.5\ninclude_background = true"
                .into(),
        );
    } else {
        c.push("kind = \"cross_entropy\"\npos_weight = 5.0".into());
        c.push("kind = \"quality_focal\"\nbeta = 0.7".into());
    }
    c.into_iter().map(|o| format!("[[loss]]\n{o}\n")).collect()
}

#[test]
fn saturated_logits_and_empty_or_full_masks_stay_finite() {
    let shape = (2, 1, 6, 6);
    let big = (logits(shape, 1.0, 11)
        .ge(0.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        * 200.0)
        .unwrap()
        .affine(1.0, -100.0)
        .unwrap(); // ±100
    let targets = [
        (
            "empty",
            Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "full",
            Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap(),
        ),
        (
            "random",
            float_target(shape, 0.2, false, 12)
                .to_dtype(DType::F32)
                .unwrap(),
        ),
    ];
    for config in configs(false) {
        for (name, t) in &targets {
            for x in [&big, &big.neg().unwrap()] {
                let (v, _, g) = evaluate(&config, x, t);
                assert!(v.is_finite(), "{config} on {name}: loss {v}");
                assert!(
                    g.iter().all(|g| g.is_finite()),
                    "{config} on {name}: gradient"
                );
            }
        }
    }
    let sx = (logits((2, 3, 5, 5), 1.0, 13).sign().unwrap() * 100.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    for config in configs(true) {
        for (name, t) in [
            (
                "background only",
                Tensor::zeros((2, 5, 5), DType::U8, &Device::Cpu).unwrap(),
            ),
            (
                "class 2 only",
                Tensor::full(2u8, (2, 5, 5), &Device::Cpu).unwrap(),
            ),
            ("random", class_map(2, 5, 5, 3, 0.0, 14)),
        ] {
            let (v, _, g) = evaluate(&config, &sx, &t);
            assert!(v.is_finite(), "{config} on {name}: loss {v}");
            assert!(
                g.iter().all(|g| g.is_finite()),
                "{config} on {name}: gradient"
            );
        }
    }
}

/// Central differences of the f64 loss against its autograd gradient, element by element.
fn check_gradient(config: &str, x: &Tensor, t: &Tensor) {
    let (_, _, grad) = evaluate(config, x, t);
    let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let h = 1e-6;
    let max = grad.iter().fold(0f64, |m, g| m.max(g.abs()));
    for i in 0..base.len() {
        let at = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            let xi = Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap();
            loss_value(config, &xi, t)
        };
        let fd = (at(h) - at(-h)) / (2.0 * h);
        assert!(
            (fd - grad[i]).abs() <= 1e-6 + 1e-5 * max,
            "{config}: element {i}: autograd {} vs finite difference {fd}",
            grad[i]
        );
    }
}

#[test]
fn every_term_gradient_matches_finite_differences() {
    let x = logits((2, 1, 4, 4), 4.0, 21);
    let binary = float_target((2, 1, 4, 4), 0.3, false, 22);
    let soft = float_target((2, 1, 4, 4), 0.0, true, 23);
    for config in configs(false) {
        check_gradient(&config, &x, &binary);
        if !config.contains("positives") {
            check_gradient(&config, &x, &soft);
        }
    }
    // sigmoid over a one-hot map with ignored pixels
    let xm = logits((2, 3, 4, 4), 4.0, 24);
    let map = class_map(2, 4, 4, 3, 0.2, 25);
    check_gradient(
        "[[loss]]\nkind = \"focal\"\nactivation = \"sigmoid\"\nignore_index = 255\n",
        &xm,
        &map,
    );
    check_gradient(
        "[[loss]]\nkind = \"dice\"\nactivation = \"sigmoid\"\nignore_index = 255\n",
        &xm,
        &map,
    );
    for config in configs(true) {
        check_gradient(&format!("{config}ignore_index = 255\n"), &xm, &map);
    }
    // a weighted combination
    check_gradient(
        "[[loss]]\nkind = \"dice\"\nweight = 0.4\n[[loss]]\nkind = \"focal\"\nweight = 2.5\n",
        &x,
        &binary,
    );
}

#[test]
fn combined_loss_is_the_weighted_sum_of_its_terms() {
    let x = logits((2, 1, 6, 6), 3.0, 31).to_dtype(DType::F32).unwrap();
    let t = float_target((2, 1, 6, 6), 0.2, false, 32)
        .to_dtype(DType::F32)
        .unwrap();
    let config =
        "[[loss]]\nkind = \"dice\"\nweight = 0.7\n[[loss]]\nkind = \"focal\"\nweight = 0.3\n";
    let (total, terms, _) = evaluate(config, &x, &t);
    assert_eq!(terms.len(), 2);
    let dice = loss_value("[[loss]]\nkind = \"dice\"", &x, &t);
    let focal = loss_value("[[loss]]\nkind = \"focal\"", &x, &t);
    assert_close(&terms, &[dice, focal], 1e-7, "terms");
    assert!((total - (0.7 * dice + 0.3 * focal)).abs() < 1e-6);
}

#[test]
fn positives_normalisation_divides_by_the_foreground_count() {
    let x = logits((1, 1, 10, 10), 3.0, 41);
    let t = float_target((1, 1, 10, 10), 0.07, false, 42);
    let positives = t.sum_all().unwrap().to_scalar::<f64>().unwrap();
    assert!(positives >= 2.0);
    let sum = loss_value("[[loss]]\nkind = \"focal\"\nnormalize = \"sum\"", &x, &t);
    let pos = loss_value(
        "[[loss]]\nkind = \"focal\"\nnormalize = \"positives\"",
        &x,
        &t,
    );
    let mean = loss_value("[[loss]]\nkind = \"focal\"", &x, &t);
    assert!((pos - sum / positives).abs() < 1e-12);
    assert!((mean - sum / 100.0).abs() < 1e-12);
    // an empty mask divides by max(1, 0) = 1
    let empty = Tensor::zeros((1, 1, 10, 10), DType::F64, &Device::Cpu).unwrap();
    let s = loss_value(
        "[[loss]]\nkind = \"focal\"\nnormalize = \"sum\"",
        &x,
        &empty,
    );
    let p = loss_value(
        "[[loss]]\nkind = \"focal\"\nnormalize = \"positives\"",
        &x,
        &empty,
    );
    assert_eq!(s, p);
}

#[test]
fn p_floor_caps_each_pixel_loss() {
    // a confidently contradicted pixel: x = +30 with target 0
    let x = Tensor::new(&[[[[30.0f64]]]], &Device::Cpu).unwrap();
    let t = Tensor::new(&[[[[0.0f64]]]], &Device::Cpu).unwrap();
    let plain = evaluate("[[loss]]\nkind = \"focal\"\ngamma = 0.0", &x, &t);
    let floored = evaluate(
        "[[loss]]\nkind = \"focal\"\ngamma = 0.0\np_floor = 0.1",
        &x,
        &t,
    );
    assert!((plain.0 - 30.0).abs() < 1e-6);
    assert!(
        (floored.0 - (-(0.1f64).ln())).abs() < 1e-12,
        "{}",
        floored.0
    );
    assert_eq!(floored.2, vec![0.0], "a floored pixel has no gradient");
}

#[test]
fn topk_keeps_the_hardest_fraction() {
    let x = Tensor::new(
        &[[[[-3.0f64, -1.0, 0.0, 1.0, 2.0, 4.0, 6.0, 9.0, -6.0, 0.5]]]],
        &Device::Cpu,
    )
    .unwrap();
    let t = Tensor::zeros((1, 1, 1, 10), DType::F64, &Device::Cpu).unwrap();
    // BCE with target 0 is softplus(x): the 3 hardest are x = 9, 6, 4
    let softplus = |v: f64| (1.0 + v.exp()).ln();
    let want = (softplus(9.0) + softplus(6.0) + softplus(4.0)) / 3.0;
    let got = loss_value(
        "[[loss]]\nkind = \"topk_cross_entropy\"\nfraction = 0.25",
        &x,
        &t,
    );
    assert!((got - want).abs() < 1e-12, "{got} vs {want}");
}

fn config_error(config: &str) -> String {
    format!("{:#}", Loss::from_toml_str(config).unwrap_err())
}

#[test]
fn config_errors_name_the_table_key_and_problem() {
    let cases: &[(&str, &[&str])] = &[
        (
            "[[loss]]\nkind = \"focl\"",
            &["loss.0.kind", "focl", "did you mean `focal`", "dice"],
        ),
        (
            "[[loss]]\nkind = \"focal\"\ngama = 2",
            &["loss.0", "gama", "did you mean `gamma`"],
        ),
        (
            "[[loss]]\nkind = \"focal\"\ngamma = -1.0",
            &["loss.0", "gamma", ">= 0"],
        ),
        (
            "[[loss]]\nkind = \"dice\"\n[[loss]]\nkind = \"focal\"\nweight = -0.5",
            &["loss.1", "weight"],
        ),
        (
            "[[loss]]\nkind = \"focal_tversky\"\nexponent = 0.0",
            &["exponent", "> 0"],
        ),
        (
            "[[loss]]\nkind = \"tversky\"\nfp_weight = 0.0\nfn_weight = 0.0",
            &["fp_weight", "fn_weight"],
        ),
        (
            "[[loss]]\nkind = \"focal\"\np_floor = 1.5",
            &["p_floor", "(0, 1)"],
        ),
        // finite in f64, infinite in the f32 the losses compute in: refused up front
        (
            "[[loss]]\nkind = \"focal\"\ngamma = 4e38",
            &["loss.0", "gamma", "<= 1e6"],
        ),
        (
            "[[loss]]\nkind = \"dice\"\nweight = 3e38",
            &["loss.0", "weight", "<= 1e6"],
        ),
        (
            "[[loss]]\nkind = \"focal_tversky\"\nexponent = 1e308",
            &["exponent", "<= 1e6"],
        ),
        (
            "[[loss]]\nkind = \"tversky\"\nfp_weight = 1e308\nfn_weight = 1e308",
            &["fp_weight", "<= 1e6"],
        ),
        (
            "[[loss]]\nkind = \"cross_entropy\"\npos_weight = 1e308",
            &["pos_weight", "<= 1e6"],
        ),
        (
            "[[loss]]\nkind = \"quality_focal\"\nbeta = 1e308",
            &["beta", "<= 1e6"],
        ),
        ("[[loss]]\nkind = \"focal\"\np_floor = 0.0", &["p_floor"]),
        (
            "[[loss]]\nkind = \"focal\"\nnormalize = \"positive\"",
            &["positive", "did you mean `positives`"],
        ),
        (
            "[[loss]]\nkind = \"tversky\"\nexponent = 2.0",
            &["exponent", "focal_tversky"],
        ),
        (
            "[[loss]]\nkind = \"dice\"\nactivation = \"softmx\"",
            &["activation"],
        ),
        (
            "[[loss]]\nkind = \"focal\"\ngamma = \"two\"",
            &["loss.0", "gamma"],
        ),
        ("[[loss]]\nweight = 1.0", &["loss.0", "missing `kind`"]),
        ("", &["no [[loss]] table"]),
    ];
    for (config, needles) in cases {
        let msg = config_error(config);
        for needle in *needles {
            assert!(
                msg.contains(needle),
                "config {config:?}: message {msg:?} lacks {needle:?}"
            );
        }
    }
}

#[test]
fn per_class_option_lengths_are_checked_against_the_data() {
    let x = logits((1, 3, 4, 4), 1.0, 51);
    let t = class_map(1, 4, 4, 3, 0.0, 52);
    for (config, needle) in [
        (
            "[[loss]]\nkind = \"focal\"\nalpha = [0.2, 0.8]",
            "`alpha` has 2 entries but there are 3 classes",
        ),
        (
            "[[loss]]\nkind = \"dice\"\nclass_weights = [1, 2, 3]",
            "3 entries but there are 2 scored classes",
        ),
        (
            "[[loss]]\nkind = \"quality_focal\"\nactivation = \"softmax\"",
            "sigmoid only",
        ),
        (
            "[[loss]]\nkind = \"cross_entropy\"\npos_weight = 3.0",
            "sigmoid",
        ),
    ] {
        let loss = Loss::from_toml_str(config).unwrap();
        let msg = format!("{:#}", loss.forward(&x, &t).err().unwrap());
        assert!(msg.contains(needle), "{config}: {msg}");
    }
    // a class map value beyond the classes, without ignore_index
    let bad = class_map(1, 4, 4, 3, 0.3, 53);
    let loss = Loss::from_toml_str("[[loss]]\nkind = \"dice\"").unwrap();
    let msg = format!("{:#}", loss.forward(&x, &bad).err().unwrap());
    assert!(msg.contains("255") && msg.contains("ignore_index"), "{msg}");
}

#[test]
fn registry_names_are_unique_and_documented() {
    let names = kind_names();
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), names.len(), "duplicate kind names");
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for name in names {
        assert!(
            readme.contains(&format!("`{name}`")),
            "README does not document `{name}`"
        );
    }
}

/// (loss, gradient) in f32 with the chosen kernels.
fn evaluate_with(
    config: &str,
    logits: &Tensor,
    target: &Tensor,
    kernels: segtrain::kernels::Kernels,
) -> (f32, Vec<f32>) {
    let loss = Loss::from_toml_str(config).unwrap();
    let x = Var::from_tensor(&logits.to_dtype(DType::F32).unwrap()).unwrap();
    let value = loss.forward_using(x.as_tensor(), target, kernels).unwrap();
    let grads = value.total.backward().unwrap();
    let grad = grads
        .get(x.as_tensor())
        .map(|g| g.flatten_all().unwrap().to_vec1().unwrap())
        .unwrap_or_else(|| vec![0.0; logits.elem_count()]);
    (value.total.to_scalar::<f32>().unwrap(), grad)
}

#[test]
fn fused_kernels_match_the_generic_formulas() {
    use segtrain::kernels::Kernels;
    let check = |config: &str, x: &Tensor, t: &Tensor| {
        let (a, ga) = evaluate_with(config, x, t, Kernels::FastCpu);
        let (b, gb) = evaluate_with(config, x, t, Kernels::Candle);
        assert!(
            (a - b).abs() <= 1e-4 * b.abs() + 1e-6,
            "{config}: fused {a} vs generic {b}"
        );
        let max = gb.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (p, q)) in ga.iter().zip(&gb).enumerate() {
            assert!(
                (p - q).abs() <= 1e-4 * max + 1e-7,
                "{config}: gradient {i}: fused {p} vs generic {q}"
            );
        }
    };
    // odd sizes exercise the vector tails; ±30 logits the saturated ends
    let x = logits((3, 1, 7, 9), 30.0, 61);
    for t in [
        float_target((3, 1, 7, 9), 0.2, false, 62),
        float_target((3, 1, 7, 9), 0.0, true, 63),
    ] {
        let t32 = t.to_dtype(DType::F32).unwrap();
        for config in configs(false) {
            check(&config, &x, &t32);
        }
    }
    let xm = logits((2, 3, 5, 11), 12.0, 64);
    let map = class_map(2, 5, 11, 3, 0.2, 65);
    for config in configs(true) {
        check(&format!("{config}ignore_index = 255\n"), &xm, &map);
    }
    check(
        "[[loss]]\nkind = \"focal\"\nactivation = \"sigmoid\"\nignore_index = 255\n",
        &xm,
        &map,
    );
    check("[[loss]]\nkind = \"dice\"\nactivation = \"sigmoid\"\nignore_index = 255\nper_image = false\n", &xm, &map);
    // combined losses share one fused pass: statistics per image and over the batch, several
    // pixel terms (the first fused with the statistics, the others in their own loops)
    let combined = [
        "[[loss]]\nkind = \"dice\"\n[[loss]]\nkind = \"focal\"\n",
        "[[loss]]\nkind = \"dice\"\nsquared = true\n[[loss]]\nkind = \"focal\"\nweight = 0.5\n",
        "[[loss]]\nkind = \"focal\"\ngamma = 1.0\n[[loss]]\nkind = \"tversky\"\nper_image = false\n[[loss]]\nkind = \"cross_entropy\"\nweight = 2.0\n[[loss]]\nkind = \"dice\"\n",
        "[[loss]]\nkind = \"cross_entropy\"\n[[loss]]\nkind = \"focal\"\n",
    ];
    let x = logits((3, 1, 7, 9), 30.0, 66);
    for t in [
        float_target((3, 1, 7, 9), 0.2, false, 67),
        float_target((3, 1, 7, 9), 0.0, true, 68),
    ] {
        let t32 = t.to_dtype(DType::F32).unwrap();
        for config in combined {
            check(config, &x, &t32);
        }
    }
    for config in combined {
        check(
            &format!("{config}[model]\nactivation = \"softmax\"\n[data]\nignore_index = 255\n"),
            &xm,
            &map,
        );
    }
    // a float target with ignored elements: a per-element mask, over several channels
    let x = logits((2, 3, 5, 7), 20.0, 69);
    let t = float_target((2, 3, 5, 7), 0.3, false, 70);
    let ignored = float_target((2, 3, 5, 7), 0.2, false, 73);
    let t = ((&ignored * 255.0).unwrap() + (t * (1.0 - &ignored).unwrap()).unwrap())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    for config in combined {
        let sigmoid = "[model]\nactivation = \"sigmoid\"\n[data]\nignore_index = 255\n";
        check(&format!("{config}{sigmoid}"), &x, &t);
    }
}

#[test]
fn a_nan_logit_gives_a_nan_loss_on_both_paths() {
    use segtrain::kernels::Kernels;
    let x = logits((2, 1, 4, 5), 3.0, 71).to_dtype(DType::F32).unwrap();
    let mut v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[7] = f32::NAN;
    let x = Tensor::from_vec(v, (2, 1, 4, 5), &Device::Cpu).unwrap();
    let t = float_target((2, 1, 4, 5), 0.3, false, 72)
        .to_dtype(DType::F32)
        .unwrap();
    for config in configs(false) {
        for kernels in [Kernels::FastCpu, Kernels::Candle] {
            let loss = Loss::from_toml_str(&config).unwrap();
            let value = loss.forward_using(&x, &t, kernels).unwrap();
            let v = value.total.to_scalar::<f32>().unwrap();
            assert!(v.is_nan(), "{config} {kernels:?}: {v}");
        }
    }
}

/// Focal loss normalised by the positives, over a sequence of batches with 1000, 0 and 1
/// foreground pixels: divided by each batch's own count it jumps by an order of magnitude on the
/// nearly empty batches (the explosion seen in patch training); training divides by the running
/// average (`PositivesAverage`) and stays within a small factor of the first batch. A first
/// batch, like any single evaluation, is exactly the per-batch value.
#[test]
fn positives_normalised_focal_stays_bounded_on_batches_with_few_positives() {
    use segtrain::loss::PositivesAverage;
    let loss = Loss::from_toml_str(
        "[[loss]]\nkind = \"focal\"\nnormalize = \"positives\"\nalpha = 0.25\n",
    )
    .unwrap();
    let (n, h, w) = (2, 64, 64);
    // a half-trained model: background at p ≈ 0.05, lesion pixels still uncertain (p = 0.5)
    let batch = |positives: usize| -> (Tensor, Tensor) {
        let target: Vec<f32> = (0..n * h * w)
            .map(|i| if i < positives { 1.0 } else { 0.0 })
            .collect();
        let logits: Vec<f32> = target
            .iter()
            .enumerate()
            .map(|(i, &g)| {
                if g > 0.0 {
                    0.0
                } else {
                    -3.0 + (i % 7) as f32 * 0.1
                }
            })
            .collect();
        (
            Tensor::from_vec(logits, (n, 1, h, w), &Device::Cpu).unwrap(),
            Tensor::from_vec(target, (n, 1, h, w), &Device::Cpu).unwrap(),
        )
    };
    let value = |t: &Tensor| t.to_scalar::<f32>().unwrap() as f64;
    let mut average = PositivesAverage::default();
    let (mut per_batch, mut running) = (vec![], vec![]);
    for positives in [1000, 1000, 0, 1, 1000, 0, 1] {
        let (logits, target) = batch(positives);
        per_batch.push(value(&loss.forward(&logits, &target).unwrap().total));
        running.push(value(
            &loss
                .forward_training(&logits, &target, &mut average)
                .unwrap()
                .total,
        ));
    }
    assert!((running[0] - per_batch[0]).abs() <= 1e-6 * per_batch[0]);
    let first = per_batch[0];
    let worst_per_batch = per_batch.iter().cloned().fold(0.0, f64::max);
    assert!(
        worst_per_batch > 10.0 * first,
        "the per-batch normalisation should explode here: {per_batch:?}"
    );
    for (k, v) in running.iter().enumerate() {
        assert!(
            v.is_finite() && *v <= 1.5 * first,
            "batch {k}: running-average focal {v} vs first batch {first} ({running:?})"
        );
    }
}
