//! The `[data]` table of a config: the data set, its split and normalisation, patches and
//! sliding windows, augmentation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::synth::SynthConfig;
use super::Normalization;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset folder: `images/` + `masks/`, or `train/` and `val/` each holding both.
    pub root: PathBuf,
    /// Side of the square images the model sees (resized); divisible by 2^depth. Required
    /// without `patch_size`; with it, optional (images are resized before cropping patches;
    /// absent: native resolution).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<usize>,
    /// Patch training: random `patch_size²` crops at native resolution (padded where an image
    /// is smaller), and sliding-window inference; divisible by 2^depth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_size: Option<usize>,
    /// Patch mode: share of patches centred on a random foreground pixel (nnU-Net: 1/3).
    #[serde(default = "default_foreground_fraction")]
    pub foreground_fraction: f64,
    /// Sliding-window inference: overlap of neighbouring windows, as a fraction of the patch.
    #[serde(default = "default_overlap")]
    pub overlap: f64,
    /// Sliding-window inference: how overlapping windows are blended.
    #[serde(default)]
    pub blend: Blend,
    /// 1 (grey) or 3 (RGB); images are converted.
    #[serde(default = "three")]
    pub channels: usize,
    /// Output channels: 1 for binary masks, C for class-index masks.
    #[serde(default = "one")]
    pub classes: usize,
    /// Share of the images held out for validation (without `train/` + `val/` folders).
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Seed of the train/validation split (default: the run's `seed`); `compare` fixes it so
    /// that every seed of every variant sees the same split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split_seed: Option<u64>,
    /// K-fold cross-validation: the pairs in `folds` folds (seeded by `split_seed`, stratified
    /// by the classes present in each mask, so empty images spread evenly), fold `fold`
    /// (0-based) held out for validation; replaces `val_fraction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folds: Option<usize>,
    /// The held-out fold of `folds`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fold: usize,
    /// Mask value excluded from the loss and metrics (class-index masks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ignore_index: Option<i64>,
    /// Whose statistics normalise an image: `dataset` (the training images' per-channel mean
    /// and std) or `image` (each image's own: z-score per image); see [`crate::data::intensity`].
    #[serde(default)]
    pub normalize: Normalization,
    /// Percentiles `[lo, hi]` each image's channels are clamped to before normalising.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_percentiles: Option<[f64; 2]>,
    /// `dataset` normalisation's per-channel mean and std; computed from the training images
    /// when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub std: Option<Vec<f64>>,
    #[serde(default)]
    pub augment: AugmentConfig,
    /// Threads that prepare batches while the model trains.
    #[serde(default = "two")]
    pub workers: usize,
    /// Predicted lesions (8-connected components of a class) smaller than this many pixels, at
    /// native resolution, are removed — in validation, `eval` and `predict` (0: keep all).
    #[serde(default)]
    pub min_lesion_pixels: usize,
    /// 2.5-D context k: the network sees slices z−k … z+k as its input channels
    /// (data.channels = 2k + 1). The images come from `import --context k`: each stacks those
    /// slices top to bottom, a grey image 2k + 1 slices high over its one-slice mask; this key
    /// must agree with the data set's `import.json`. 0: no context.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub context_slices: usize,
    /// Generate `root` with these settings when it does not exist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub synth: Option<SynthConfig>,
}

/// Weights of a window's pixels when overlapping sliding-window predictions are blended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Blend {
    /// A Gaussian centred on the window, σ = patch/8 (nnU-Net), floored at 1e-3 of its peak.
    #[default]
    Gaussian,
    /// A tent: 1 in the centre, falling linearly towards the window's edges.
    Linear,
    /// Every pixel of every window alike.
    Uniform,
}

/// Training-time augmentation (train split only, seeded).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AugmentConfig {
    /// Random horizontal and vertical flips.
    #[serde(default = "yes")]
    pub flip: bool,
    /// Random rotation by a multiple of 90°.
    #[serde(default = "yes")]
    pub rotate90: bool,
    /// Largest brightness shift, in standard deviations (0 = off).
    #[serde(default = "default_jitter")]
    pub brightness: f64,
    /// Largest relative contrast change (0 = off).
    #[serde(default = "default_jitter")]
    pub contrast: f64,
    /// Smallest side of a random crop, as a fraction of the image, resized back (1 = off).
    #[serde(default = "one_f")]
    pub min_crop: f64,
    /// Largest random rotation, in degrees, about the image centre (0 = off).
    #[serde(default)]
    pub rotate: f64,
    /// Largest random zoom: a scale factor in [1 − scale, 1 + scale] about the centre (0 = off).
    #[serde(default)]
    pub scale: f64,
    /// Random gamma of the raw intensities: v^γ with ln γ in [−gamma, gamma] (0 = off).
    #[serde(default)]
    pub gamma: f64,
    /// Largest standard deviation of Gaussian noise added to the normalised image, in
    /// standard deviations (each image draws its own in [0, noise]; 0 = off).
    #[serde(default)]
    pub noise: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self {
            flip: true,
            rotate90: true,
            brightness: default_jitter(),
            contrast: default_jitter(),
            min_crop: 1.0,
            rotate: 0.0,
            scale: 0.0,
            gamma: 0.0,
            noise: 0.0,
        }
    }
}

fn one() -> usize {
    1
}
fn two() -> usize {
    2
}
fn three() -> usize {
    3
}
fn yes() -> bool {
    true
}
fn one_f() -> f64 {
    1.0
}
fn is_zero(v: &usize) -> bool {
    *v == 0
}

fn default_val_fraction() -> f64 {
    0.2
}
fn default_foreground_fraction() -> f64 {
    1.0 / 3.0
}
fn default_overlap() -> f64 {
    0.5
}
fn default_jitter() -> f64 {
    0.1
}
