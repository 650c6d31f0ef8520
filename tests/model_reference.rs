//! The U-Net against a plain-loop f64 re-implementation of the README's PyTorch module
//! (Conv2d, BatchNorm2d in eval and train mode, ReLU, max_pool2d, ConvTranspose2d, cat order,
//! head), and the focal-loss prior initialisation of the head.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use segtrain::model::{init, UNet, UNetConfig};

/// A dense (C, H, W) image.
#[derive(Clone)]
struct Img {
    c: usize,
    h: usize,
    w: usize,
    v: Vec<f64>,
}

impl Img {
    fn at(&self, c: usize, y: usize, x: usize) -> f64 {
        self.v[(c * self.h + y) * self.w + x]
    }
}

struct Weights(HashMap<String, (Vec<usize>, Vec<f64>)>);

impl Weights {
    fn get(&self, k: &str) -> &[f64] {
        &self.0[k].1
    }
}

fn conv3x3(x: &Img, w: &[f64], cout: usize) -> Img {
    let mut v = vec![0.0; cout * x.h * x.w];
    for o in 0..cout {
        for y in 0..x.h {
            for xx in 0..x.w {
                let mut s = 0.0;
                for i in 0..x.c {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (sy, sx) =
                                (y as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                            if sy < 0 || sx < 0 || sy >= x.h as isize || sx >= x.w as isize {
                                continue;
                            }
                            s += w[((o * x.c + i) * 3 + ky) * 3 + kx]
                                * x.at(i, sy as usize, sx as usize);
                        }
                    }
                }
                v[(o * x.h + y) * x.w + xx] = s;
            }
        }
    }
    Img {
        c: cout,
        h: x.h,
        w: x.w,
        v,
    }
}

/// BatchNorm (given per-channel mean and variance) then ReLU.
fn bn_relu(x: &Img, mean: &[f64], var: &[f64], g: &[f64], b: &[f64]) -> Img {
    let mut out = x.clone();
    for c in 0..x.c {
        for i in 0..x.h * x.w {
            let v = &mut out.v[c * x.h * x.w + i];
            *v = ((*v - mean[c]) / (var[c] + 1e-5).sqrt() * g[c] + b[c]).max(0.0);
        }
    }
    out
}

/// Per-channel mean and biased variance over a batch.
fn batch_stats(xs: &[Img]) -> (Vec<f64>, Vec<f64>) {
    let c = xs[0].c;
    let n = (xs.len() * xs[0].h * xs[0].w) as f64;
    (0..c)
        .map(|ch| {
            let vals: Vec<f64> = xs
                .iter()
                .flat_map(|x| x.v[ch * x.h * x.w..(ch + 1) * x.h * x.w].to_vec())
                .collect();
            let m = vals.iter().sum::<f64>() / n;
            (m, vals.iter().map(|v| (v - m).powi(2)).sum::<f64>() / n)
        })
        .unzip()
}

fn maxpool(x: &Img) -> Img {
    let (h, w) = (x.h / 2, x.w / 2);
    let mut v = vec![0.0; x.c * h * w];
    for c in 0..x.c {
        for y in 0..h {
            for xx in 0..w {
                let m = [(0, 0), (0, 1), (1, 0), (1, 1)]
                    .iter()
                    .map(|(dy, dx)| x.at(c, 2 * y + dy, 2 * xx + dx))
                    .fold(f64::MIN, f64::max);
                v[(c * h + y) * w + xx] = m;
            }
        }
    }
    Img { c: x.c, h, w, v }
}

/// ConvTranspose2d(k=2, s=2): weight (Cin, Cout, 2, 2).
fn up(x: &Img, w: &[f64], b: &[f64], cout: usize) -> Img {
    let (h, ww) = (x.h * 2, x.w * 2);
    let mut v = vec![0.0; cout * h * ww];
    for o in 0..cout {
        for y in 0..h {
            for xx in 0..ww {
                let mut s = b[o];
                for i in 0..x.c {
                    s += x.at(i, y / 2, xx / 2) * w[((i * cout + o) * 2 + y % 2) * 2 + xx % 2];
                }
                v[(o * h + y) * ww + xx] = s;
            }
        }
    }
    Img {
        c: cout,
        h,
        w: ww,
        v,
    }
}

fn cat(a: &Img, b: &Img) -> Img {
    Img {
        c: a.c + b.c,
        h: a.h,
        w: a.w,
        v: [a.v.clone(), b.v.clone()].concat(),
    }
}

/// The PyTorch module's forward over a batch; `train` uses batch statistics.
fn reference(xs: &[Img], w: &Weights, cfg: UNetConfig, train: bool) -> Vec<Img> {
    let double = |xs: Vec<Img>, p: &str, cout: usize| -> Vec<Img> {
        let mut xs = xs;
        for i in 1..=2 {
            let ys: Vec<Img> = xs
                .iter()
                .map(|x| conv3x3(x, w.get(&format!("{p}.conv{i}.weight")), cout))
                .collect();
            let (mean, var) = if train {
                batch_stats(&ys)
            } else {
                (
                    w.get(&format!("{p}.bn{i}.running_mean")).to_vec(),
                    w.get(&format!("{p}.bn{i}.running_var")).to_vec(),
                )
            };
            let (g, b) = (
                w.get(&format!("{p}.bn{i}.weight")),
                w.get(&format!("{p}.bn{i}.bias")),
            );
            xs = ys.iter().map(|y| bn_relu(y, &mean, &var, g, b)).collect();
        }
        xs
    };
    let f = cfg.base_width;
    let mut skips = vec![double(xs.to_vec(), "inc", f)];
    for i in 1..=cfg.depth {
        let pooled = skips.last().unwrap().iter().map(maxpool).collect();
        skips.push(double(pooled, &format!("down{i}"), f << i));
    }
    let mut x = skips.pop().unwrap();
    for i in 1..=cfg.depth {
        let a = f << (cfg.depth - i + 1);
        let skip = skips.pop().unwrap();
        let p = format!("up{i}");
        let merged = x
            .iter()
            .zip(&skip)
            .map(|(xi, si)| {
                cat(
                    si,
                    &up(
                        xi,
                        w.get(&format!("{p}.up.weight")),
                        w.get(&format!("{p}.up.bias")),
                        a / 2,
                    ),
                )
            })
            .collect();
        x = double(merged, &p, a / 2);
    }
    x.iter()
        .map(|xi| {
            let (hw, hb) = (w.get("head.weight"), w.get("head.bias"));
            let mut v = vec![0.0; cfg.classes * xi.h * xi.w];
            for o in 0..cfg.classes {
                for p in 0..xi.h * xi.w {
                    v[o * xi.h * xi.w + p] = hb[o]
                        + (0..xi.c)
                            .map(|i| hw[o * xi.c + i] * xi.v[i * xi.h * xi.w + p])
                            .sum::<f64>();
                }
            }
            Img {
                c: cfg.classes,
                h: xi.h,
                w: xi.w,
                v,
            }
        })
        .collect()
}

fn random_weights(cfg: &UNetConfig, seed: u64) -> Weights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    Weights(
        cfg.state_dict_spec()
            .into_iter()
            .filter(|(_, _, dtype)| *dtype == DType::F32)
            .map(|(name, shape, _)| {
                let n = shape.iter().product();
                let values = (0..n)
                    .map(|_| {
                        if name.ends_with("running_var") {
                            rng.random_range(0.5..2.0)
                        } else {
                            rng.random_range(-0.6..0.6)
                        }
                    })
                    .collect();
                (name, (shape, values))
            })
            .collect(),
    )
}

fn model_from(w: &Weights, cfg: UNetConfig) -> UNet {
    let tensors: HashMap<String, Tensor> =
        w.0.iter()
            .map(|(k, (shape, v))| {
                let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
                (
                    k.clone(),
                    Tensor::from_vec(f, shape.as_slice(), &Device::Cpu).unwrap(),
                )
            })
            .collect();
    UNet::new(
        cfg,
        None,
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu),
    )
    .unwrap()
}

fn max_abs_diff(model: &Tensor, reference: &[Img]) -> f64 {
    let got: Vec<f32> = model.flatten_all().unwrap().to_vec1().unwrap();
    let want: Vec<f64> = reference.iter().flat_map(|i| i.v.clone()).collect();
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(&want)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max)
}

#[test]
fn forward_matches_the_pytorch_module_in_eval_and_train_mode() {
    let cfg = UNetConfig {
        in_channels: 2,
        classes: 3,
        base_width: 3,
        depth: 2,
    };
    let w = random_weights(&cfg, 5);
    let model = model_from(&w, cfg);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    let (n, s) = (2, 8);
    let xs: Vec<Img> = (0..n)
        .map(|_| Img {
            c: 2,
            h: s,
            w: s,
            v: (0..2 * s * s)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect(),
        })
        .collect();
    let flat: Vec<f32> = xs
        .iter()
        .flat_map(|i| i.v.iter().map(|&v| v as f32))
        .collect();
    let x = Tensor::from_vec(flat, (n, 2, s, s), &Device::Cpu).unwrap();
    for train in [false, true] {
        let got = model.forward(&x, train).unwrap();
        assert_eq!(got.dims(), &[n, 3, s, s]);
        let err = max_abs_diff(&got, &reference(&xs, &w, cfg, train));
        assert!(err < 1e-4, "train = {train}: max |difference| {err}");
    }
}

#[test]
fn training_updates_running_statistics_like_pytorch() {
    let cfg = UNetConfig {
        in_channels: 1,
        classes: 1,
        base_width: 2,
        depth: 1,
    };
    let (model, vars) = init(cfg, Some(0.01), false, 3, &Device::Cpu).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 1, 4, 4), &Device::Cpu).unwrap();
    let conv: Vec<f64> = {
        let w = vars.data().lock().unwrap()["inc.conv1.weight"]
            .as_tensor()
            .clone();
        let y = x.conv2d(&w, 1, 1, 1, 1).unwrap();
        // per channel: mean and unbiased variance over (N, H, W)
        let y = y
            .transpose(0, 1)
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let rows: Vec<Vec<f64>> = y.to_vec2().unwrap();
        rows.iter()
            .flat_map(|r| {
                let m = r.iter().sum::<f64>() / r.len() as f64;
                let var = r.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (r.len() - 1) as f64;
                [m, var]
            })
            .collect()
    };
    model.forward(&x, true).unwrap();
    let data = vars.data().lock().unwrap();
    let mean: Vec<f32> = data["inc.bn1.running_mean"].as_tensor().to_vec1().unwrap();
    let var: Vec<f32> = data["inc.bn1.running_var"].as_tensor().to_vec1().unwrap();
    for c in 0..2 {
        assert!(
            (mean[c] as f64 - 0.1 * conv[2 * c]).abs() < 1e-5,
            "running_mean"
        );
        assert!(
            (var[c] as f64 - (0.9 + 0.1 * conv[2 * c + 1])).abs() < 1e-5,
            "running_var"
        );
    }
    // the head starts at p = prior: bias = −log((1 − π)/π)
    let bias: Vec<f32> = data["head.bias"].as_tensor().to_vec1().unwrap();
    assert!(
        (bias[0] as f64 + (99.0f64).ln()).abs() < 1e-6,
        "head bias {}",
        bias[0]
    );
}

#[test]
fn initialisation_is_seeded() {
    let cfg = UNetConfig {
        in_channels: 3,
        classes: 1,
        base_width: 4,
        depth: 2,
    };
    let weights = |seed| {
        let (_, vars) = init(cfg, Some(0.01), false, seed, &Device::Cpu).unwrap();
        let data = vars.data().lock().unwrap();
        data["down2.conv1.weight"]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(weights(1), weights(1));
    assert_ne!(weights(1), weights(2));
    // PyTorch's default bound 1/sqrt(fan_in)
    let bound = 1.0 / ((8 * 9) as f32).sqrt();
    assert!(weights(1).iter().all(|w| w.abs() <= bound));
}

/// `tests/fixtures/`: a model trained by segtrain (3 classes, base 4, depth 2), loaded by
/// PyTorch 2.15 with `load_state_dict(strict=True)` into the README's module, and PyTorch's
/// eval-mode logits on a random input (script in the fixture's metadata note).
#[test]
fn exported_model_predicts_like_pytorch() {
    use segtrain::kernels::Kernels;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let file = dir.join("pytorch_unet_model.safetensors");
    let (_, meta) = segtrain::export::load(&file, &Device::Cpu).unwrap();
    let (tensors, _) = segtrain::fsutil::read_safetensors(&file, &Device::Cpu).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &Device::Cpu);
    let model = segtrain::model::UNet::new(meta.unet, None, vb).unwrap();
    assert_eq!(
        (meta.unet.classes, meta.unet.base_width, meta.unet.depth),
        (3, 4, 2)
    );
    let (io, _) =
        segtrain::fsutil::read_safetensors(&dir.join("pytorch_unet_io.safetensors"), &Device::Cpu)
            .unwrap();
    let want: Vec<f32> = io["logits"].flatten_all().unwrap().to_vec1().unwrap();
    for kernels in [Kernels::FastCpu, Kernels::Candle] {
        let got: Vec<f32> = model
            .forward_using(kernels, &io["input"], false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-4, "{kernels:?}: max |segtrain − PyTorch| = {err}");
    }
}
