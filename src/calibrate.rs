//! `segtrain calibrate`: temperature scaling (Guo et al., "On Calibration of Modern Neural
//! Networks", ICML 2017). One temperature T divides the logits; it is fitted on labelled images
//! by minimising the pixel negative log-likelihood and stored in the model's metadata, which
//! `predict` and `eval` apply. Focal loss trains models that are under-confident compared with
//! cross-entropy (the modulator discounts confident pixels), so T < 1 is common after it.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::data::{normalize, resize_nearest, resize_planar, Sample};
use crate::export::{self, ModelMeta};
use crate::inference::Window;
use crate::loss::Activation;
use crate::model::UNet;

/// The outcome of a calibration.
#[derive(Debug, Clone, Serialize)]
pub struct Calibrated {
    pub temperature: f64,
    pub previous_temperature: f64,
    pub nll_before: f64,
    pub nll_after: f64,
    pub ece_before: f64,
    pub ece_after: f64,
    pub brier_before: f64,
    pub brier_after: f64,
    pub pixels: usize,
}

/// Logits and targets of every kept pixel, at the model's working resolution: the resized
/// image (whole-image models) or non-overlapping windows (patch models).
struct Pixels {
    /// `classes` values per pixel.
    logits: Vec<f32>,
    targets: Vec<u8>,
    classes: usize,
}

fn collect(model: &UNet, meta: &ModelMeta, samples: &[Sample], device: &Device) -> Result<Pixels> {
    let (c, k) = (meta.unet.in_channels, meta.unet.classes);
    let ignore = meta.ignore_index.and_then(|i| u8::try_from(i).ok());
    let mut out = Pixels {
        logits: vec![],
        targets: vec![],
        classes: k,
    };
    let mut run = |img: Vec<f32>, mask: Vec<u8>, side: usize| -> Result<()> {
        let x = Tensor::from_vec(img, (1, c, side, side), device)?;
        let logits: Vec<f32> = model
            .forward(&x, false)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1()?;
        let n = side * side;
        for (i, &t) in mask.iter().enumerate() {
            if Some(t) == ignore {
                continue;
            }
            out.targets.push(t);
            out.logits.extend((0..k).map(|cl| logits[cl * n + i]));
        }
        Ok(())
    };
    for s in samples {
        let mut img = s.image.clone();
        match meta.window {
            Window::Whole { size } => {
                let mut x = resize_planar(&img, c, (s.h, s.w), (size, size));
                normalize(&mut x, &meta.mean, &meta.std);
                run(x, resize_nearest(&s.mask, (s.h, s.w), (size, size)), size)?;
            }
            Window::Sliding { patch, .. } => {
                normalize(&mut img, &meta.mean, &meta.std);
                // whole windows inside the image (images smaller than a patch are skipped)
                for y0 in (0..s.h.saturating_sub(patch - 1)).step_by(patch) {
                    for x0 in (0..s.w.saturating_sub(patch - 1)).step_by(patch) {
                        let mut win = Vec::with_capacity(c * patch * patch);
                        for ch in 0..c {
                            for y in 0..patch {
                                let row = (ch * s.h + y0 + y) * s.w + x0;
                                win.extend_from_slice(&img[row..row + patch]);
                            }
                        }
                        let mask: Vec<u8> = (0..patch)
                            .flat_map(|y| {
                                s.mask[(y0 + y) * s.w + x0..(y0 + y) * s.w + x0 + patch].to_vec()
                            })
                            .collect();
                        run(win, mask, patch)?;
                    }
                }
            }
        }
    }
    if out.targets.is_empty() {
        bail!("no labelled pixel to calibrate on");
    }
    Ok(out)
}

/// Mean negative log-likelihood of the pixels at temperature `t`.
fn nll(p: &Pixels, activation: Activation, t: f64) -> f64 {
    let k = p.classes;
    let mut total = 0.0;
    for (i, &target) in p.targets.iter().enumerate() {
        let z = &p.logits[i * k..(i + 1) * k];
        total += match activation {
            Activation::Sigmoid => {
                // one channel: class 1 vs rest; several: one-hot per channel
                (0..k)
                    .map(|c| {
                        let x = z[c] as f64 / t;
                        let y = if k == 1 {
                            target > 0
                        } else {
                            target as usize == c
                        };
                        // softplus(x) − y·x, stable
                        x.max(0.0) + (-x.abs()).exp().ln_1p() - if y { x } else { 0.0 }
                    })
                    .sum::<f64>()
            }
            Activation::Softmax => {
                let m = z.iter().fold(f32::MIN, |a, b| a.max(*b)) as f64 / t;
                let lse = m + z
                    .iter()
                    .map(|&v| (v as f64 / t - m).exp())
                    .sum::<f64>()
                    .ln();
                lse - z[target as usize] as f64 / t
            }
        };
    }
    total / p.targets.len() as f64
}

/// The temperature minimising the NLL, by golden-section search on log T in [1/20, 20].
fn fit(p: &Pixels, activation: Activation) -> f64 {
    let f = |log_t: f64| nll(p, activation, log_t.exp());
    let (mut a, mut b) = ((0.05f64).ln(), (20f64).ln());
    let r = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - r * (b - a), a + r * (b - a));
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..60 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - r * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + r * (b - a);
            fd = f(d);
        }
    }
    ((a + b) / 2.0).exp()
}

/// Fits the temperature of `model_path` on the labelled images of `data_dir` (`images/` +
/// `masks/` or its `val/` split), reports ECE and Brier score before and after at native
/// resolution, and stores the temperature in the model file (atomically).
pub fn calibrate(model_path: &Path, data_dir: &Path, device: &Device) -> Result<Calibrated> {
    let (model, mut meta) = export::load(model_path, device)?;
    let (samples, format) = crate::predict::labelled_images(data_dir, &meta)?;
    let pixels = collect(&model, &meta, &samples, device)?;
    let previous = meta.temperature;
    let temperature = fit(&pixels, meta.activation);
    let report = |t: f64| -> Result<(f64, f64)> {
        let m = ModelMeta {
            temperature: t,
            ..meta.clone()
        };
        let r = crate::predict::predictor(&model, &m, None, device)
            .evaluate(&samples, format.ignore_mask_value())?
            .report();
        Ok((r.ece, r.brier))
    };
    let (ece_before, brier_before) = report(previous)?;
    let (ece_after, brier_after) = report(temperature)?;
    let out = Calibrated {
        temperature,
        previous_temperature: previous,
        nll_before: nll(&pixels, meta.activation, previous),
        nll_after: nll(&pixels, meta.activation, temperature),
        ece_before,
        ece_after,
        brier_before,
        brier_after,
        pixels: pixels.targets.len(),
    };
    let (tensors, _) = export::read(model_path, &Device::Cpu)?;
    let ordered: Vec<(String, Tensor)> = meta
        .unet
        .state_dict_spec()
        .into_iter()
        .map(|(name, _, _)| (name.clone(), tensors[&name].clone()))
        .collect();
    meta.temperature = temperature;
    meta.metrics["calibration"] = serde_json::to_value(&out)?;
    export::save(model_path, &ordered, &meta)
        .with_context(|| format!("cannot update {}", model_path.display()))?;
    Ok(out)
}
