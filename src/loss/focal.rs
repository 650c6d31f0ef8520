//! Focal loss (Lin, Goyal, Girshick, He, Dollár: "Focal Loss for Dense Object Detection",
//! ICCV 2017): `FL(p_t) = −α_t (1 − p_t)^γ log p_t`.
//!
//! - sigmoid (torchvision's `sigmoid_focal_loss`): per element `BCE(x, g)·(1 − p_t)^γ·α_t` with
//!   `1 − p_t = g(1 − p) + (1 − g)p` and `α_t = α·g + (1 − α)(1 − g)` when `alpha` is set.
//! - softmax: per pixel `−α_y (1 − p_y)^γ log p_y`; `alpha` is one float for every class or a
//!   list of C floats (α_y = alpha[y]); absent = 1.
//!
//! Defaults: `gamma` = 2.0, no `alpha`, `normalize` = `"mean"` (over kept elements; softmax:
//! kept pixels), `"sum"`, or `"positives"` (sum / max(1, positive elements; softmax: pixels of
//! a class other than 0) — RetinaNet's normalisation by the number of positive anchors). In
//! training, `"positives"` divides by a running average of that count instead (momentum 0.9, as
//! detectron2's RetinaNet; see [`super::PositivesAverage`]), so a batch with few or no
//! positives cannot blow the term up; a single evaluation divides by its own count.
//! γ = 0 without α is exactly `cross_entropy`.
//!
//! The modulator is computed as `exp(γ·log(1 − p_t))` with `log(1 − p_t)` from log-sigmoid or
//! the log-sum-exp of the other classes, so γ < 1 keeps a finite gradient at saturated logits.
//!
//! `p_floor` (absent by default) is the noise-robust variant: the log term uses
//! `max(p_t, p_floor)`, so no pixel's loss exceeds `−log(p_floor)` and a confidently
//! contradicted (likely mislabelled) pixel stops pulling the model.

use candle_core::{Result, Tensor};
use serde::Deserialize;

use super::fused::{ElementWeights, PixelSpec, PixelTerm};
use super::input::sum_all_f64;
use super::{check_len, check_non_negative, Activation, LossFn, LossInput, LossKind};

pub const KIND: LossKind = LossKind::new::<Focal>(
    "focal",
    "focal loss −α_t(1−p_t)^γ log p_t (Lin et al. 2017), sigmoid or softmax",
);

/// Smallest mixture value kept before a log (soft targets only).
const TINY: f64 = 1e-30;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Focal {
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    pub alpha: Option<Alpha>,
    #[serde(default)]
    pub normalize: Normalize,
    pub p_floor: Option<f64>,
}

fn default_gamma() -> f64 {
    2.0
}

/// The class-balancing weight α: one float, or (softmax) one per class.
#[derive(Debug, Clone, Deserialize)]
#[serde(
    untagged,
    expecting = "a number in [0, 1] or (softmax) a list of one number per class"
)]
pub enum Alpha {
    Scalar(f64),
    PerClass(Vec<f64>),
}

/// What the summed focal loss is divided by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalize {
    /// The number of kept elements (softmax: kept pixels).
    #[default]
    Mean,
    /// Nothing.
    Sum,
    /// max(1, number of positive elements) — RetinaNet's normalisation (in training: its
    /// running average).
    Positives,
}

impl LossFn for Focal {
    fn validate(&self) -> std::result::Result<(), String> {
        check_non_negative("gamma", self.gamma, false)?;
        match &self.alpha {
            Some(Alpha::Scalar(a)) if !(0.0..=1.0).contains(a) => {
                return Err(format!("`alpha` must lie in [0, 1], got {a}"));
            }
            Some(Alpha::PerClass(list)) => {
                for a in list {
                    check_non_negative("alpha", *a, false)?;
                }
            }
            _ => {}
        }
        if let Some(f) = self.p_floor {
            if !(f > 0.0 && f < 1.0) {
                return Err(format!("`p_floor` must lie in (0, 1), got {f}"));
            }
        }
        Ok(())
    }

    fn check(&self, classes: usize, activation: Activation) -> std::result::Result<(), String> {
        match (&self.alpha, activation) {
            (Some(Alpha::PerClass(_)), Activation::Sigmoid) => {
                Err("a list `alpha` needs softmax; with sigmoid give one float".into())
            }
            (Some(Alpha::PerClass(list)), Activation::Softmax) => {
                check_len("alpha", list, classes, "classes")
            }
            _ => Ok(()),
        }
    }

    fn normalises_by_positives(&self) -> bool {
        self.normalize == Normalize::Positives
    }

    fn pixel_term(&self, input: &LossInput) -> Result<Option<PixelTerm>> {
        Ok(Some(PixelTerm {
            spec: self.fused_spec(input.activation, input.classes()),
            scale: 1.0 / self.normaliser(input)?,
        }))
    }

    fn forward(&self, input: &LossInput) -> Result<Tensor> {
        if input.fused {
            if let Some(term) = self.pixel_term(input)? {
                return input.pixel_sum(term);
            }
        }
        let per_element = match input.activation {
            Activation::Sigmoid => self.sigmoid_elements(input)?,
            Activation::Softmax => self.softmax_pixels(input)?,
        };
        per_element.sum_all()? / self.normaliser(input)?
    }
}

impl Focal {
    /// What the summed loss is divided by.
    fn normaliser(&self, input: &LossInput) -> Result<f64> {
        Ok(match self.normalize {
            Normalize::Sum => 1.0,
            Normalize::Mean => input.kept_elements()?.max(1.0),
            Normalize::Positives => input.positives_normaliser()?,
        })
    }

    fn log_floor(&self) -> Option<f64> {
        self.p_floor.map(f64::ln)
    }

    /// The same loss for the fused kernel.
    fn fused_spec(&self, activation: Activation, classes: usize) -> PixelSpec {
        let weights = match (&self.alpha, activation) {
            (None, _) => ElementWeights::None,
            (Some(Alpha::Scalar(a)), Activation::Sigmoid) => ElementWeights::Alpha(*a as f32),
            (Some(Alpha::Scalar(a)), Activation::Softmax) => {
                ElementWeights::PerClass(vec![*a as f32; classes])
            }
            (Some(Alpha::PerClass(list)), _) => {
                ElementWeights::PerClass(list.iter().map(|v| *v as f32).collect())
            }
        };
        PixelSpec {
            pos_weight: 1.0,
            gamma: self.gamma as f32,
            log_floor: self.log_floor().map(|f| f as f32),
            weights,
        }
    }

    /// `α_t (1 − p_t)^γ BCE` per element, zero where ignored.
    fn sigmoid_elements(&self, input: &LossInput) -> Result<Tensor> {
        let g = &input.target;
        let (log_p, log_1mp) = (input.log_p()?, input.log_1mp()?);
        let ce = match self.log_floor() {
            None => input.cross_entropy(None)?,
            Some(floor) => {
                let pos = (g * log_p.maximum(floor)?)?;
                let neg = ((1.0 - g)? * log_1mp.maximum(floor)?)?;
                input.masked(&(pos + neg)?.neg()?)?
            }
        };
        let mut loss = ce;
        if self.gamma != 0.0 {
            let log_q = log_one_minus_pt(g, log_p, log_1mp)?;
            loss = (loss * (log_q * self.gamma)?.exp()?)?;
        }
        if let Some(Alpha::Scalar(a)) = self.alpha {
            // α_t = α·g + (1 − α)(1 − g)
            loss = (loss * g.affine(2.0 * a - 1.0, 1.0 - a)?)?;
        }
        Ok(loss)
    }

    /// `−α_y (1 − p_y)^γ log p_y` per pixel, zero where ignored.
    fn softmax_pixels(&self, input: &LossInput) -> Result<Tensor> {
        let log_py = input.log_p_true()?;
        let mut loss = match self.log_floor() {
            None => log_py.neg()?,
            Some(floor) => log_py.maximum(floor)?.neg()?,
        };
        if self.gamma != 0.0 {
            loss = (loss * (input.log_1mp_true()? * self.gamma)?.exp()?)?;
        }
        match &self.alpha {
            None => Ok(loss),
            Some(Alpha::Scalar(a)) => loss * *a,
            Some(Alpha::PerClass(list)) => {
                let w = Tensor::new(list.as_slice(), loss.device())?
                    .to_dtype(loss.dtype())?
                    .reshape((1, list.len(), 1, 1))?;
                loss * input.target.broadcast_mul(&w)?.sum_keepdim(1)?
            }
        }
    }
}

/// `log(1 − p_t)` with `1 − p_t = g(1 − p) + (1 − g)p`. Binary targets take the exact
/// `g·log(1 − p) + (1 − g)·log p`; soft targets (0 < g < 1) the mixture through a stabilised
/// log-sum-exp. Both branches are NaN-free, so their `where` is safe to differentiate.
pub fn log_one_minus_pt(g: &Tensor, log_p: &Tensor, log_1mp: &Tensor) -> Result<Tensor> {
    let binary = ((g * log_1mp)? + ((1.0 - g)? * log_p)?)?;
    let softness = (g * (1.0 - g)?)?;
    if sum_all_f64(&softness)? == 0.0 {
        return Ok(binary);
    }
    let m = log_p.maximum(log_1mp)?.detach();
    let mix = ((g * (log_1mp - &m)?.exp()?)? + ((1.0 - g)? * (log_p - &m)?.exp()?)?)?;
    let soft = (m + mix.maximum(TINY)?.log()?)?;
    softness.gt(0.0)?.where_cond(&soft, &binary)
}
