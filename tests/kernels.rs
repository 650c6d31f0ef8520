//! The fast CPU kernels against Candle's generic ops: same outputs, gradients and running
//! statistics on small U-Nets (the CUDA/Metal path is the generic one).

use candle_core::{DType, Device, Tensor};
use segtrain::kernels::Kernels;
use segtrain::model::{init, UNetConfig};

fn snapshot(vars: &candle_nn::VarMap) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vars
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
        / scale
}

/// Named tensors, sorted by name.
type Named = Vec<(String, Tensor)>;

/// (outputs: the logits, then any auxiliary heads' logits; gradients of every variable;
/// variables after the pass)
fn pass(
    kernels: Kernels,
    cfg: UNetConfig,
    deep_supervision: bool,
    x: &Tensor,
    train: bool,
) -> (Vec<Tensor>, Named, Named) {
    let (model, vars) = init(cfg, Some(0.01), deep_supervision, 11, &Device::Cpu).unwrap();
    let outputs = model
        .forward_outputs(kernels, x, train, DType::F32)
        .unwrap();
    let mut grads = vec![];
    if train {
        // a loss that weighs every output differently (fixed weights, seeded per output shape)
        let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
        for (i, o) in outputs.iter().enumerate() {
            let w = weights(o.dims(), i as u64);
            loss = (loss + (o.tanh().unwrap() * w).unwrap().sum_all().unwrap()).unwrap();
        }
        let g = loss.backward().unwrap();
        for (name, var) in vars.data().lock().unwrap().iter() {
            if let Some(t) = g.get(var.as_tensor()) {
                grads.push((name.clone(), t.clone()));
            }
        }
        grads.sort_by(|a, b| a.0.cmp(&b.0));
    }
    (outputs, grads, snapshot(&vars))
}

/// Deterministic pseudo-random weights in [−1, 1) of `shape`.
fn weights(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n as u64)
        .map(|i| {
            let h = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ seed.wrapping_mul(0xD1B5_4A32_D192_ED03);
            ((h >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Runs both kernel sets on `cfg` and asserts equal outputs, gradients and variables.
fn assert_paths_agree(cfg: UNetConfig, deep_supervision: bool, n: usize, size: usize) {
    let x = weights(&[n, cfg.in_channels, size, size], 11);
    for train in [true, false] {
        let (ya, ga, va) = pass(Kernels::Candle, cfg, deep_supervision, &x, train);
        let (yb, gb, vb) = pass(Kernels::FastCpu, cfg, deep_supervision, &x, train);
        assert_eq!(ya.len(), yb.len(), "{cfg:?} train={train}: output count");
        for (i, (a, b)) in ya.iter().zip(&yb).enumerate() {
            assert_eq!(
                a.dims(),
                b.dims(),
                "{cfg:?} train={train}: output {i} shape"
            );
            let d = max_rel_diff(a, b);
            assert!(d < 1e-4, "{cfg:?} train={train}: output {i} differs by {d}");
        }
        assert_eq!(ga.len(), gb.len());
        if train {
            assert!(ga.len() > 10, "gradients reach the weights");
        }
        for ((name, a), (_, b)) in ga.iter().zip(&gb) {
            let d = max_rel_diff(a, b);
            assert!(d < 1e-4, "{cfg:?}: gradient of {name} differs by {d}");
        }
        for ((name, a), (_, b)) in va.iter().zip(&vb) {
            let d = max_rel_diff(a, b);
            assert!(d < 1e-5, "{cfg:?}: {name} after the pass differs by {d}");
        }
    }
}

#[test]
fn fast_cpu_kernels_match_candle_ops() {
    for (cfg, n, size) in [
        (
            UNetConfig {
                in_channels: 3,
                classes: 1,
                base_width: 4,
                depth: 2,
            },
            2,
            16,
        ),
        (
            UNetConfig {
                in_channels: 1,
                classes: 3,
                base_width: 3,
                depth: 3,
            },
            3,
            24,
        ),
        (
            UNetConfig {
                in_channels: 2,
                classes: 2,
                base_width: 5,
                depth: 1,
            },
            1,
            10,
        ),
    ] {
        assert_paths_agree(cfg, false, n, size);
    }
}

/// Deep supervision: the auxiliary heads' outputs at 1/2 and 1/4 of the side, and the
/// gradients through them into the decoder, agree between both kernel sets; evaluation
/// returns the logits alone.
#[test]
fn deep_supervision_heads_match_between_kernels() {
    let cfg = UNetConfig {
        in_channels: 2,
        classes: 2,
        base_width: 3,
        depth: 4,
    };
    let x = weights(&[2, 2, 32, 32], 11);
    let (train_outputs, grads, _) = pass(Kernels::FastCpu, cfg, true, &x, true);
    let shapes: Vec<Vec<usize>> = train_outputs.iter().map(|t| t.dims().to_vec()).collect();
    assert_eq!(
        shapes,
        [vec![2, 2, 32, 32], vec![2, 2, 16, 16], vec![2, 2, 8, 8]]
    );
    for level in [1, 2] {
        assert!(grads
            .iter()
            .any(|(n, _)| n == &format!("aux{level}.weight")));
    }
    let (eval_outputs, _, _) = pass(Kernels::FastCpu, cfg, true, &x, false);
    assert_eq!(eval_outputs.len(), 1);
    assert_paths_agree(cfg, true, 2, 32);
}

#[test]
fn max_pooling_sends_the_whole_gradient_to_the_maximum() {
    // Candle 0.11's own max_pool2d backward scales it by 1/4; neither path may
    use segtrain::kernels::{padded, pool};
    let x = [1f32, 2., 0., 0., 3., 4., 0., 5.];
    let g = padded::Geom { n: 1, h: 2, w: 4 };
    let xp = padded::to_padded(&x, g, 1);
    let pooled = pool::forward(g, &xp, 1);
    assert_eq!(padded::from_padded(&pooled, g.half(), 1), vec![4., 5.]);
    let dy = padded::to_padded(&[1., 1.], g.half(), 1);
    let mut dx = vec![0f32; g.rows()];
    pool::backward_into(g, &xp, &dy, 1, &mut dx);
    assert_eq!(
        padded::from_padded(&dx, g, 1),
        vec![0., 0., 0., 0., 0., 1., 0., 1.]
    );
    // ties: each channel's first maximum in scan order (top left, top right, bottom left,
    // bottom right) takes it, as in PyTorch
    let x = [3f32, 3., 1., 3., 0., 1., 1., 1.]; // (1, 2, 2, 2): channel 0, then channel 1
    let g = padded::Geom { n: 1, h: 2, w: 2 };
    let xp = padded::to_padded(&x, g, 2);
    let pooled = pool::forward(g, &xp, 2);
    assert_eq!(padded::from_padded(&pooled, g.half(), 2), vec![3., 1.]);
    let dy = padded::to_padded(&[1., 2.], g.half(), 2);
    let mut dx = vec![0f32; g.rows() * 2];
    pool::backward_into(g, &xp, &dy, 2, &mut dx);
    assert_eq!(
        padded::from_padded(&dx, g, 2),
        vec![1., 0., 0., 0., 0., 2., 0., 0.]
    );
    // the generic path, through a depth-1 U-Net whose pooled input is the identity: checked by
    // `fast_cpu_kernels_match_candle_ops`, which compares every gradient of both paths
}
