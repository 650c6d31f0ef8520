//! From images to probabilities and labels at native resolution, and to metrics: shared by
//! validation, `eval` and `predict`.
//!
//! Two ways to cover an image of any size:
//! - whole-image: resized to the model's `image_size`, predicted, probabilities resized back;
//! - sliding window: overlapping `patch × patch` windows at native resolution (padded where the
//!   image is smaller), their probabilities blended with per-pixel weights (Gaussian by
//!   default) so that window borders leave no seams.

use candle_core::{Device, Result, Tensor};

use crate::data::{resize_planar, Blend, Normalizer, Sample};
use crate::metrics::{Evaluation, Target};
use crate::model::Activation;
use crate::model::SegmentationModel;
use crate::rules;

/// Probabilities `(N, C, H, W)` of `logits / temperature`: sigmoid per element or softmax over
/// the classes.
pub fn probabilities(logits: &Tensor, activation: Activation, temperature: f64) -> Result<Tensor> {
    let z = if temperature != 1.0 {
        (logits / temperature)?
    } else {
        logits.clone()
    };
    match activation {
        Activation::Sigmoid => candle_nn::ops::sigmoid(&z),
        Activation::Softmax => candle_nn::ops::softmax(&z, 1),
    }
}

/// One class index per pixel from `k` planes of probabilities: for one plane, 1 where
/// p > threshold; otherwise the most probable plane.
pub fn labels(probs: &[f32], k: usize, threshold: f64) -> Vec<u8> {
    let n = probs.len() / k;
    if k == 1 {
        return probs
            .iter()
            .map(|&p| u8::from(p as f64 > threshold))
            .collect();
    }
    (0..n)
        .map(|i| {
            let mut best = 0;
            for c in 1..k {
                if probs[c * n + i] > probs[best * n + i] {
                    best = c;
                }
            }
            best as u8
        })
        .collect()
}

/// A symmetry of the square: a transpose, then a flip of the rows, then of the columns (each
/// optional). The 8 of them are the flips and 90° rotations training's augmentation draws.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Symmetry {
    pub transpose: bool,
    pub flip_rows: bool,
    pub flip_cols: bool,
}

impl Symmetry {
    pub const IDENTITY: Self = Self::new(false, false, false);

    const fn new(transpose: bool, flip_rows: bool, flip_cols: bool) -> Self {
        Self {
            transpose,
            flip_rows,
            flip_cols,
        }
    }

    /// The symmetries of test-time augmentation for a model trained with random flips and/or
    /// 90° rotations: those it has seen (flips: the 4 row/column flips; rotations: the 4
    /// rotations; both: all 8; neither: the identity alone).
    pub fn seen_in_training(flip: bool, rotate90: bool) -> Vec<Self> {
        let all = (0..8).map(|i| Self::new(i & 4 != 0, i & 2 != 0, i & 1 != 0));
        all.filter(|s| match (flip, rotate90) {
            (true, true) => true,
            (true, false) => !s.transpose,
            // a transpose with one flip is a quarter turn; both flips a half turn
            (false, true) => s.transpose != (s.flip_rows == s.flip_cols),
            (false, false) => *s == Self::IDENTITY,
        })
        .collect()
    }

    /// Applies the symmetry to each `side × side` plane of `v`.
    pub fn apply(self, v: &[f32], side: usize) -> Vec<f32> {
        let mut v = v.to_vec();
        if self.transpose {
            v = remap(&v, side, |y, x| (x, y));
        }
        if self.flip_rows {
            v = remap(&v, side, |y, x| (side - 1 - y, x));
        }
        if self.flip_cols {
            v = remap(&v, side, |y, x| (y, side - 1 - x));
        }
        v
    }

    /// Undoes [`Self::apply`] (each step is its own inverse: they are undone in reverse).
    pub fn invert(self, v: &[f32], side: usize) -> Vec<f32> {
        let mut v = v.to_vec();
        if self.flip_cols {
            v = remap(&v, side, |y, x| (y, side - 1 - x));
        }
        if self.flip_rows {
            v = remap(&v, side, |y, x| (side - 1 - y, x));
        }
        if self.transpose {
            v = remap(&v, side, |y, x| (x, y));
        }
        v
    }
}

/// Each `side²` plane of `v` with pixel (y, x) taken from `source(y, x)`.
fn remap(v: &[f32], side: usize, source: impl Fn(usize, usize) -> (usize, usize)) -> Vec<f32> {
    let mut out = Vec::with_capacity(v.len());
    for plane in v.chunks(side * side) {
        for y in 0..side {
            for x in 0..side {
                let (sy, sx) = source(y, x);
                out.push(plane[sy * side + sx]);
            }
        }
    }
    out
}

/// Removes, in place, the 8-connected components of each class of an `h × w` label map that
/// have fewer than `min_pixels` pixels (they become background, 0).
pub fn remove_small_lesions(labels: &mut [u8], (h, w): (usize, usize), min_pixels: usize) {
    if min_pixels <= 1 {
        return;
    }
    for component in crate::metrics::components(labels, h, w) {
        if component.len() < min_pixels {
            for i in component {
                labels[i] = 0;
            }
        }
    }
}

/// How an image is covered.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// Resize to `size × size`.
    Whole { size: usize },
    /// Native resolution, overlapping `patch × patch` windows.
    Sliding {
        patch: usize,
        overlap: f64,
        blend: Blend,
    },
}

/// A model with everything needed to predict raw images.
pub struct Predictor<'a> {
    pub model: &'a dyn SegmentationModel,
    pub activation: Activation,
    pub temperature: f64,
    pub window: Window,
    pub normalizer: &'a Normalizer,
    /// Images (whole-image mode) or windows per forward pass.
    pub batch: usize,
    pub device: &'a Device,
    /// Test-time augmentation: probabilities averaged over these symmetries (empty or the
    /// identity alone: none).
    pub tta: Vec<Symmetry>,
    /// Predicted lesions smaller than this are removed ([`remove_small_lesions`]; 0: none).
    pub min_lesion_pixels: usize,
}

/// Window origins along an axis of length `len` (≥ patch; shorter axes get one window at 0):
/// step `patch·(1 − overlap)`, at least 1, the last window flush with the end. An overlap
/// outside the valid [0, MAX_OVERLAP) (callers check it with [`rules::overlap`]) counts as
/// the largest, so that the windows stay few.
pub fn window_starts(len: usize, patch: usize, overlap: f64) -> Vec<usize> {
    let overlap = if rules::overlap(overlap).is_ok() {
        overlap
    } else {
        rules::MAX_OVERLAP
    };
    let last = len.saturating_sub(patch);
    let step = ((patch as f64 * (1.0 - overlap)).round() as usize).max(1);
    let mut starts: Vec<usize> = (0..last).step_by(step).collect();
    starts.push(last);
    starts
}

/// The blending weight of each pixel of a `patch × patch` window (peak 1, never below 1e-3).
pub fn window_weights(patch: usize, blend: Blend) -> Vec<f32> {
    let c = (patch as f64 - 1.0) / 2.0;
    let sigma = patch as f64 / 8.0;
    let tent = |v: f64| (1.0 - (v - c).abs() / (patch as f64 / 2.0)).max(0.0);
    let mut w = Vec::with_capacity(patch * patch);
    for y in 0..patch {
        for x in 0..patch {
            let (fy, fx) = (y as f64, x as f64);
            let v = match blend {
                Blend::Gaussian => {
                    (-((fy - c).powi(2) + (fx - c).powi(2)) / (2.0 * sigma * sigma)).exp()
                }
                Blend::Linear => tent(fy) * tent(fx),
                Blend::Uniform => 1.0,
            };
            w.push(v.max(1e-3) as f32);
        }
    }
    w
}

impl Predictor<'_> {
    pub fn classes(&self) -> usize {
        self.model.classes()
    }

    /// Images or windows of `side²` per forward pass: `batch`, fewer where the memory available
    /// holds fewer (at least 1; the model loader checks that one fits).
    fn batch_for(&self, side: usize) -> usize {
        let per_item = self.model.inference_bytes(1, side);
        let available = self
            .device
            .is_cpu()
            .then(crate::memory::available_memory)
            .flatten();
        match available {
            Some(available) => self.batch.min((available as f64 / per_item) as usize),
            None => self.batch,
        }
        .max(1)
    }

    /// Probabilities `(N, K, H, W)` on the host of a batch of normalised square images,
    /// averaged over the test-time symmetries.
    fn forward(&self, batch: Vec<f32>, n: usize, (h, w): (usize, usize)) -> Result<Vec<f32>> {
        if self.tta.len() <= 1 || h != w {
            return self.forward_once(batch, n, (h, w));
        }
        let mut mean: Vec<f32> = vec![];
        for s in &self.tta {
            let probs = s.invert(&self.forward_once(s.apply(&batch, h), n, (h, w))?, h);
            if mean.is_empty() {
                mean = probs;
            } else {
                mean.iter_mut().zip(&probs).for_each(|(m, p)| *m += p);
            }
        }
        let scale = 1.0 / self.tta.len() as f32;
        mean.iter_mut().for_each(|m| *m *= scale);
        Ok(mean)
    }

    /// Probabilities `(N, K, H, W)` on the host of a batch of normalised images.
    fn forward_once(&self, batch: Vec<f32>, n: usize, (h, w): (usize, usize)) -> Result<Vec<f32>> {
        let c = self.model.in_channels();
        let x = Tensor::from_vec(batch, (n, c, h, w), self.device)?;
        let logits = self.model.forward_t(&x, false)?;
        let probs: Vec<f32> = probabilities(&logits, self.activation, self.temperature)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1()?;
        if probs.iter().any(|p| !p.is_finite()) {
            candle_core::bail!(
                "the model gives non-finite probabilities (NaN or infinite) on this image: its weights or normalisation overflow"
            );
        }
        Ok(probs)
    }

    /// Class probabilities (`K × h × w`, native resolution) of several raw images (planar
    /// `C × h × w` in [0, 1]).
    pub fn probabilities(&self, images: &[(&[f32], usize, usize)]) -> Result<Vec<Vec<f32>>> {
        let (c, k) = (self.model.in_channels(), self.classes());
        match self.window {
            Window::Whole { size } => {
                let mut out = Vec::with_capacity(images.len());
                for chunk in images.chunks(self.batch_for(size)) {
                    let mut batch = Vec::with_capacity(chunk.len() * c * size * size);
                    for &(img, h, w) in chunk {
                        let mut x = resize_planar(img, c, (h, w), (size, size));
                        self.normalizer.apply(&mut x);
                        batch.extend(x);
                    }
                    let probs = self.forward(batch, chunk.len(), (size, size))?;
                    for (p, &(_, h, w)) in probs.chunks(k * size * size).zip(chunk) {
                        out.push(resize_planar(p, k, (size, size), (h, w)));
                    }
                }
                Ok(out)
            }
            Window::Sliding {
                patch,
                overlap,
                blend,
            } => images
                .iter()
                .map(|&(img, h, w)| self.sliding(img, (h, w), patch, overlap, blend))
                .collect(),
        }
    }

    fn sliding(
        &self,
        img: &[f32],
        (h, w): (usize, usize),
        patch: usize,
        overlap: f64,
        blend: Blend,
    ) -> Result<Vec<f32>> {
        let (c, k) = (self.model.in_channels(), self.classes());
        let (ph, pw) = (h.max(patch), w.max(patch));
        // normalised, and padded with zeros (the mean) up to one patch
        let mut x = img.to_vec();
        self.normalizer.apply(&mut x);
        let mut padded = vec![0f32; c * ph * pw];
        for ch in 0..c {
            for y in 0..h {
                padded[(ch * ph + y) * pw..(ch * ph + y) * pw + w]
                    .copy_from_slice(&x[(ch * h + y) * w..(ch * h + y + 1) * w]);
            }
        }
        let weights = window_weights(patch, blend);
        let origins: Vec<(usize, usize)> = window_starts(ph, patch, overlap)
            .into_iter()
            .flat_map(|y| {
                window_starts(pw, patch, overlap)
                    .into_iter()
                    .map(move |x| (y, x))
            })
            .collect();
        let mut acc = vec![0f32; k * ph * pw];
        let mut norm = vec![0f32; ph * pw];
        for chunk in origins.chunks(self.batch_for(patch)) {
            let mut batch = Vec::with_capacity(chunk.len() * c * patch * patch);
            for &(y0, x0) in chunk {
                for ch in 0..c {
                    for y in 0..patch {
                        let row = (ch * ph + y0 + y) * pw + x0;
                        batch.extend_from_slice(&padded[row..row + patch]);
                    }
                }
            }
            let probs = self.forward(batch, chunk.len(), (patch, patch))?;
            for (p, &(y0, x0)) in probs.chunks(k * patch * patch).zip(chunk) {
                for y in 0..patch {
                    for x in 0..patch {
                        let wgt = weights[y * patch + x];
                        let at = (y0 + y) * pw + x0 + x;
                        norm[at] += wgt;
                        for cl in 0..k {
                            acc[cl * ph * pw + at] += p[(cl * patch + y) * patch + x] * wgt;
                        }
                    }
                }
            }
        }
        let mut out = Vec::with_capacity(k * h * w);
        for cl in 0..k {
            for y in 0..h {
                for x in 0..w {
                    let at = y * pw + x;
                    out.push(acc[cl * ph * pw + at] / norm[at]);
                }
            }
        }
        Ok(out)
    }

    /// The label map of an `h × w` image's probabilities ([`labels`]), small lesions removed.
    pub fn labels(&self, probs: &[f32], hw: (usize, usize), threshold: f64) -> Vec<u8> {
        let mut out = labels(probs, self.classes(), threshold);
        remove_small_lesions(&mut out, hw, self.min_lesion_pixels);
        out
    }

    /// Per-image hit and miss counts of every scored class, predicted at native resolution.
    pub fn evaluate(&self, samples: &[Sample], ignore: Option<u8>) -> Result<Evaluation> {
        let k = self.classes();
        let mut evaluation = Evaluation::default();
        for chunk in samples.chunks(self.batch.max(1)) {
            let images: Vec<(&[f32], usize, usize)> = chunk
                .iter()
                .map(|s| (s.image.as_slice(), s.h, s.w))
                .collect();
            for (probs, sample) in self.probabilities(&images)?.iter().zip(chunk) {
                let pred = self.labels(probs, (sample.h, sample.w), 0.5);
                let target = Target {
                    mask: &sample.mask,
                    h: sample.h,
                    w: sample.w,
                };
                evaluation.add_image(&pred, probs, k, target, self.model.classes(), ignore);
            }
        }
        Ok(evaluation)
    }
}
