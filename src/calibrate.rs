//! `segtrain calibrate`: temperature scaling (Guo et al., "On Calibration of Modern Neural
//! Networks", ICML 2017). One temperature T divides the logits; it is fitted on labelled images
//! by minimising the pixel negative log-likelihood and stored in the model's metadata, which
//! `predict` and `eval` apply. Focal loss trains models that are under-confident compared with
//! cross-entropy (the modulator discounts confident pixels), so T < 1 is common after it.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::Serialize;

use crate::data::{resize_nearest, resize_planar, Sample};
use crate::export::{self, ModelMeta};
use crate::inference::Window;
use crate::model::Activation;
use crate::model::SegmentationModel;

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

/// Most logit values (pixels × classes) a calibration keeps: beyond, every n-th pixel is kept
/// (256 MiB of f32).
pub const MAX_CALIBRATION_VALUES: usize = 1 << 26;

/// Logits and targets of the kept pixels, at the model's working resolution: the resized image
/// (whole-image models) or non-overlapping windows, padded past the image's edges (patch
/// models); every n-th pixel where there are more than [`MAX_CALIBRATION_VALUES`] / classes.
struct Pixels {
    /// `classes` values per pixel.
    logits: Vec<f32>,
    targets: Vec<u8>,
    classes: usize,
}

fn collect(
    model: &dyn SegmentationModel,
    meta: &ModelMeta,
    samples: &[Sample],
    device: &Device,
) -> Result<Pixels> {
    let (c, k) = (meta.unet.in_channels, meta.unet.classes);
    let ignore = meta.ignore_index.and_then(|i| u8::try_from(i).ok());
    let total: usize = samples
        .iter()
        .map(|s| match meta.window {
            Window::Whole { size } => size * size,
            Window::Sliding { .. } => s.h * s.w,
        })
        .sum();
    let stride = (total.saturating_mul(k))
        .div_ceil(MAX_CALIBRATION_VALUES)
        .max(1);
    let mut out = Pixels {
        logits: vec![],
        targets: vec![],
        classes: k,
    };
    let mut seen = 0usize;
    // `mask`: the target of each pixel of the `side²` input, None outside the image
    let mut run = |img: Vec<f32>, mask: Vec<Option<u8>>, side: usize| -> Result<()> {
        let x = Tensor::from_vec(img, (1, c, side, side), device)?;
        let Some(logits) = model.finite_logits(&x)? else {
            bail!("the model gives non-finite logits (NaN or infinite): it cannot be calibrated");
        };
        let n = side * side;
        for (i, &t) in mask.iter().enumerate() {
            let Some(t) = t else { continue };
            seen += 1;
            if Some(t) == ignore || !seen.is_multiple_of(stride) {
                continue;
            }
            out.targets.push(t);
            out.logits.extend((0..k).map(|cl| logits[cl * n + i]));
        }
        Ok(())
    };
    for s in samples {
        match meta.window {
            Window::Whole { size } => {
                let mut x = resize_planar(&s.image, c, (s.h, s.w), (size, size));
                meta.normalizer.apply(&mut x);
                let mask = resize_nearest(&s.mask, (s.h, s.w), (size, size));
                run(x, mask.into_iter().map(Some).collect(), size)?;
            }
            Window::Sliding { patch, .. } => {
                let mut img = s.image.clone();
                meta.normalizer.apply(&mut img);
                // windows tiling the image, padded with zeros (the mean) past its edges
                for y0 in (0..s.h).step_by(patch) {
                    for x0 in (0..s.w).step_by(patch) {
                        let (hh, ww) = (patch.min(s.h - y0), patch.min(s.w - x0));
                        let mut win = vec![0f32; c * patch * patch];
                        let mut mask = vec![None; patch * patch];
                        for y in 0..hh {
                            for ch in 0..c {
                                let from = (ch * s.h + y0 + y) * s.w + x0;
                                let to = (ch * patch + y) * patch;
                                win[to..to + ww].copy_from_slice(&img[from..from + ww]);
                            }
                            for x in 0..ww {
                                mask[y * patch + x] = Some(s.mask[(y0 + y) * s.w + x0 + x]);
                            }
                        }
                        run(win, mask, patch)?;
                    }
                }
            }
        }
    }
    if out.targets.is_empty() {
        bail!("no labelled pixel to calibrate on (every pixel is ignore_index, or no image)");
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

/// Bounds of the temperature search.
pub const T_MIN: f64 = 0.05;
pub const T_MAX: f64 = 20.0;

/// The temperature minimising the NLL, by golden-section search on log T in
/// [`T_MIN`, `T_MAX`]. Refuses a non-finite NLL, and a minimum on the edge of the range (the
/// NLL still falls beyond it, or does not depend on T: the logits carry no usable confidence).
fn fit(p: &Pixels, activation: Activation) -> Result<f64> {
    let f = |log_t: f64| nll(p, activation, log_t.exp());
    let (lo, hi) = (T_MIN.ln(), T_MAX.ln());
    for t in [T_MIN, 1.0, T_MAX] {
        let v = nll(p, activation, t);
        if !v.is_finite() {
            bail!("the negative log-likelihood at T = {t} is {v}: the model cannot be calibrated");
        }
    }
    let (mut a, mut b) = (lo, hi);
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
    let log_t = (a + b) / 2.0;
    // within 1 % of an end of the range
    if log_t - lo < 0.01 || hi - log_t < 0.01 {
        bail!(
            "the fitted temperature hits the edge of the search range [{T_MIN}, {T_MAX}] (T = {:.3}; NLL {:.6} at T = {T_MIN}, {:.6} at T = 1, {:.6} at T = {T_MAX}): the model's logits carry no usable confidence on these images",
            log_t.exp(),
            nll(p, activation, T_MIN),
            nll(p, activation, 1.0),
            nll(p, activation, T_MAX)
        );
    }
    Ok(log_t.exp())
}

/// Fits the temperature of `model_path` on the labelled images of `data_dir` (`images/` +
/// `masks/` or its `val/` split), reports ECE and Brier score before and after at native
/// resolution, and stores the temperature in the model file (atomically).
pub fn calibrate(model_path: &Path, data_dir: &Path, device: &Device) -> Result<Calibrated> {
    if model_path.is_dir() {
        bail!(
            "{}: a folder; calibrate a model file (a run's model.safetensors), then export the model folder again so that its config.json and card carry the temperature",
            model_path.display()
        );
    }
    // the model of a run: no training may replace it while the temperature is fitted
    let target = crate::fsutil::target_of(model_path)?;
    let folder = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let _lock = crate::fsutil::DirLock::acquire_if_locked_folder(folder)?;
    let (model, mut meta) = export::load(model_path, device)?;
    let (samples, format) = crate::predict::labelled_images(data_dir, &meta)?;
    let context = || {
        format!(
            "cannot calibrate {} on {} (the model file is left unchanged)",
            model_path.display(),
            data_dir.display()
        )
    };
    let pixels = collect(model.as_ref(), &meta, &samples, device).with_context(context)?;
    let previous = meta.temperature;
    let temperature = fit(&pixels, meta.activation).with_context(context)?;
    let report = |t: f64| -> Result<(f64, f64)> {
        let m = ModelMeta {
            temperature: t,
            ..meta.clone()
        };
        let r = crate::predict::predictor(model.as_ref(), &m, &Default::default(), device)
            .evaluate(&samples, format.ignore_mask_value())?
            .report();
        Ok((r.ece, r.brier))
    };
    let (ece_before, brier_before) = report(previous).with_context(context)?;
    let (ece_after, brier_after) = report(temperature).with_context(context)?;
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
