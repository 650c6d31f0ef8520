//! Soft Dice (Milletari, Navab, Ahmadi: "V-Net", 3DV 2016) and soft Jaccard / IoU loss, with
//! MONAI `DiceLoss` semantics.
//!
//! Over the kept pixels of one image (`per_image` = true) or of the whole batch (false, as
//! nnU-Net's batch Dice): `I = Σ p·g`, `P = Σ p` (`Σ p²` if `squared`), `G = Σ g` (`Σ g²`).
//! - dice: `1 − (2I + smooth_nr) / (G + P + smooth_dr)`
//! - jaccard: `1 − (I + smooth_nr) / (G + P − I + smooth_dr)`
//!
//! The loss is the mean over (image, class), or with `class_weights` the weighted mean
//! `Σ w·f / Σ w` over the scored classes. Defaults: `squared` = false, `smooth_nr` =
//! `smooth_dr` = 1e-5, `per_image` = true, `include_background` = false (softmax only: class 0
//! is not scored; sigmoid scores every channel). Note: MONAI's `DiceLoss(jaccard=True)` matches
//! this Jaccard with its smoothing doubled, and its `weight=` is `mean(w·f)`, not a weighted mean.

use std::fmt::Debug;
use std::marker::PhantomData;

use candle_core::{Result, Tensor};
use serde::Deserialize;

use super::fused::Stat;
use super::input::kept_class_count;
use super::{
    check_len, check_non_negative, class_weighted_mean, default_smooth, default_true,
    validate_weights, Activation, LossFn, LossInput, LossKind,
};

pub const DICE: LossKind = LossKind::new::<Overlap<Dice>>(
    "dice",
    "soft Dice 1 − (2I+s)/(G+P+s) (Milletari et al. 2016; MONAI DiceLoss)",
);

pub const JACCARD: LossKind =
    LossKind::new::<Overlap<Jaccard>>("jaccard", "soft Jaccard / IoU 1 − (I+s)/(G+P−I+s)");

/// The overlap score of one family, from `(rows, K)` region sums.
pub trait Score: Debug + Send + Sync + 'static {
    fn score(i: &Tensor, p: &Tensor, g: &Tensor, smooth_nr: f64, smooth_dr: f64) -> Result<Tensor>;
}

#[derive(Debug)]
pub struct Dice;

impl Score for Dice {
    fn score(i: &Tensor, p: &Tensor, g: &Tensor, nr: f64, dr: f64) -> Result<Tensor> {
        let num = ((i * 2.0)? + nr)?;
        let den = ((g + p)? + dr)?;
        1.0 - (num / den)?
    }
}

#[derive(Debug)]
pub struct Jaccard;

impl Score for Jaccard {
    fn score(i: &Tensor, p: &Tensor, g: &Tensor, nr: f64, dr: f64) -> Result<Tensor> {
        let num = (i + nr)?;
        let den = (((g + p)? - i)? + dr)?;
        1.0 - (num / den)?
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, bound = "")]
pub struct Overlap<S: Score> {
    #[serde(default)]
    pub squared: bool,
    #[serde(default = "default_smooth")]
    pub smooth_nr: f64,
    #[serde(default = "default_smooth")]
    pub smooth_dr: f64,
    #[serde(default = "default_true")]
    pub per_image: bool,
    #[serde(default)]
    pub include_background: bool,
    pub class_weights: Option<Vec<f64>>,
    #[serde(skip)]
    score: PhantomData<S>,
}

impl<S: Score> LossFn for Overlap<S> {
    fn validate(&self) -> std::result::Result<(), String> {
        check_non_negative("smooth_nr", self.smooth_nr, false)?;
        check_non_negative("smooth_dr", self.smooth_dr, false)?;
        if let Some(w) = &self.class_weights {
            validate_weights("class_weights", w)?;
        }
        Ok(())
    }

    fn check(&self, classes: usize, activation: Activation) -> std::result::Result<(), String> {
        match &self.class_weights {
            Some(w) => check_len(
                "class_weights",
                w,
                kept_class_count(classes, activation, self.include_background),
                "scored classes",
            ),
            None => Ok(()),
        }
    }

    fn forward(&self, input: &LossInput) -> Result<Tensor> {
        let stat = |s: Stat| input.stat(s, self.per_image, self.include_background);
        let (p, g) = if self.squared {
            (Stat::PredSq, Stat::TargetSq)
        } else {
            (Stat::Pred, Stat::Target)
        };
        let scores = S::score(
            &stat(Stat::Intersection)?,
            &stat(p)?,
            &stat(g)?,
            self.smooth_nr,
            self.smooth_dr,
        )?;
        class_weighted_mean(&scores, self.class_weights.as_deref())
    }
}
