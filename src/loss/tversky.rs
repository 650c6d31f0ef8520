//! Tversky loss (Salehi, Erdogmus, Gholipour: "Tversky loss function for image segmentation
//! using 3D fully convolutional deep networks", MLMI 2017) and Focal Tversky loss (Abraham,
//! Khan: "A novel Focal Tversky loss function with improved attention U-Net for lesion
//! segmentation", ISBI 2019).
//!
//! Over the kept pixels of one image (`per_image` = true) or of the batch, per class:
//! `TP = Σ p·g`, `FP = Σ p·(1 − g)`, `FN = Σ (1 − p)·g` and
//! `TI = (TP + smooth_nr) / (TP + fp_weight·FP + fn_weight·FN + smooth_dr)`.
//! - tversky: mean over (image, class) of `1 − TI`;
//! - focal_tversky: mean over (image, class) of `(1 − TI)^exponent` — the exponent is applied
//!   per image and class before averaging (segmentation_models_pytorch applies it after the
//!   mean, a known bug). `exponent` = 0.75 = 1/γ with the paper's γ = 4/3.
//!
//! Defaults: `fp_weight` = 0.3, `fn_weight` = 0.7 (recall-leaning, as in both papers),
//! `smooth_nr` = `smooth_dr` = 1e-5, `per_image` = true, `include_background` = false (softmax).
//!
//! Naming: the literature's α/β swap meaning between sources. Salehi et al. and MONAI's
//! `TverskyLoss(alpha, beta)` weight FP by α and FN by β: `fp_weight = alpha`,
//! `fn_weight = beta`. Abraham & Khan's paper and segmentation_models_pytorch write
//! `TI = TP / (TP + α·FN + β·FP)`: there `fn_weight = alpha`, `fp_weight = beta`.
//!
//! `1 − TI` is computed as `(fp_weight·FP + fn_weight·FN + smooth_dr − smooth_nr) / den`, which
//! stays exact near a perfect prediction; for the focal form it is clamped to ≥ 1e-12 before the
//! power so the gradient of `(1 − TI)^0.75` stays finite as TI → 1.

use std::fmt::Debug;
use std::marker::PhantomData;

use candle_core::{Result, Tensor};
use serde::Deserialize;

use super::fused::Stat;
use super::{check_non_negative, default_smooth, default_true, LossFn, LossInput, LossKind};

pub const TVERSKY: LossKind = LossKind::new::<Tversky<Plain>>(
    "tversky",
    "Tversky 1 − TP/(TP + fp_weight·FP + fn_weight·FN) (Salehi et al. 2017)",
);

pub const FOCAL_TVERSKY: LossKind = LossKind::new::<Tversky<Focusing>>(
    "focal_tversky",
    "focal Tversky (1 − TI)^exponent per image and class (Abraham & Khan 2019)",
);

/// Smallest `1 − TI` raised to the focal exponent.
const MIN_GAP: f64 = 1e-12;

/// Whether the family member raises `1 − TI` to an exponent, and its default.
pub trait Exponent: Debug + Send + Sync + 'static {
    const DEFAULT: Option<f64>;
}

#[derive(Debug)]
pub struct Plain;

impl Exponent for Plain {
    const DEFAULT: Option<f64> = None;
}

#[derive(Debug)]
pub struct Focusing;

impl Exponent for Focusing {
    const DEFAULT: Option<f64> = Some(0.75);
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, bound = "")]
pub struct Tversky<E: Exponent> {
    #[serde(default = "default_fp_weight")]
    pub fp_weight: f64,
    #[serde(default = "default_fn_weight")]
    pub fn_weight: f64,
    #[serde(default = "default_smooth")]
    pub smooth_nr: f64,
    #[serde(default = "default_smooth")]
    pub smooth_dr: f64,
    #[serde(default = "default_true")]
    pub per_image: bool,
    #[serde(default)]
    pub include_background: bool,
    exponent: Option<f64>,
    #[serde(skip)]
    focusing: PhantomData<E>,
}

fn default_fp_weight() -> f64 {
    0.3
}

fn default_fn_weight() -> f64 {
    0.7
}

impl<E: Exponent> Tversky<E> {
    /// The exponent applied to `1 − TI` (None: the plain Tversky loss).
    pub fn exponent(&self) -> Option<f64> {
        E::DEFAULT.map(|d| self.exponent.unwrap_or(d))
    }
}

impl<E: Exponent> LossFn for Tversky<E> {
    fn validate(&self) -> std::result::Result<(), String> {
        check_non_negative("fp_weight", self.fp_weight, false)?;
        check_non_negative("fn_weight", self.fn_weight, false)?;
        if self.fp_weight + self.fn_weight <= 0.0 {
            return Err("`fp_weight` + `fn_weight` must be > 0".into());
        }
        check_non_negative("smooth_nr", self.smooth_nr, false)?;
        check_non_negative("smooth_dr", self.smooth_dr, false)?;
        match (E::DEFAULT, self.exponent) {
            (None, Some(_)) => Err("`exponent` belongs to kind = \"focal_tversky\"".into()),
            (Some(_), Some(e)) => check_non_negative("exponent", e, true),
            _ => Ok(()),
        }
    }

    fn forward(&self, input: &LossInput) -> Result<Tensor> {
        let stat = |s: Stat| input.stat(s, self.per_image, self.include_background);
        let (tp, fp, fn_) = (
            stat(Stat::Intersection)?,
            stat(Stat::FalsePos)?,
            stat(Stat::FalseNeg)?,
        );
        let misses = ((fp * self.fp_weight)? + (fn_ * self.fn_weight)?)?;
        let den = ((&tp + &misses)? + self.smooth_dr)?;
        let gap = ((misses + (self.smooth_dr - self.smooth_nr))? / den)?;
        match self.exponent() {
            None => gap.mean_all(),
            Some(e) => gap.maximum(MIN_GAP)?.powf(e)?.mean_all(),
        }
    }
}
