//! Cross-entropy, the baseline every imbalance-aware loss is compared with.
//!
//! - sigmoid (BCE-with-logits): `ℓ = −[w₊·g·log σ(x) + (1 − g)·log σ(−x)]`, mean over kept
//!   elements; `pos_weight` = w₊ (PyTorch's `pos_weight`, absent = 1) up-weights positives.
//! - softmax: `ℓ = −log p_y`, mean over kept pixels; with `class_weights` w:
//!   `Σ w_y·ℓ / Σ w_y` (PyTorch's weighted-mean convention of `F.cross_entropy`).

use candle_core::{Result, Tensor};
use serde::Deserialize;

use super::fused::{ElementWeights, PixelSpec, PixelTerm};
use super::input::sum_all_f64;
use super::{
    check_len, check_non_negative, validate_weights, Activation, LossFn, LossInput, LossKind,
};

pub const KIND: LossKind = LossKind::new::<CrossEntropy>(
    "cross_entropy",
    "BCE-with-logits (sigmoid, pos_weight) or softmax CE (class_weights)",
);

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossEntropy {
    /// Sigmoid only: weight of the positive term (absent = 1).
    pub pos_weight: Option<f64>,
    /// Softmax only: one weight per class.
    pub class_weights: Option<Vec<f64>>,
}

impl LossFn for CrossEntropy {
    fn validate(&self) -> std::result::Result<(), String> {
        if let Some(w) = self.pos_weight {
            check_non_negative("pos_weight", w, true)?;
        }
        if let Some(w) = &self.class_weights {
            validate_weights("class_weights", w)?;
        }
        Ok(())
    }

    fn check(&self, classes: usize, activation: Activation) -> std::result::Result<(), String> {
        match (activation, &self.pos_weight, &self.class_weights) {
            (Activation::Softmax, Some(_), _) => {
                Err("`pos_weight` is for sigmoid; use `class_weights` with softmax".into())
            }
            (Activation::Sigmoid, _, Some(_)) => {
                Err("`class_weights` is for softmax; use `pos_weight` with sigmoid".into())
            }
            (Activation::Softmax, _, Some(w)) => check_len("class_weights", w, classes, "classes"),
            _ => Ok(()),
        }
    }

    fn pixel_term(&self, input: &LossInput) -> Result<Option<PixelTerm>> {
        let weights = match self.class_weights_for(input) {
            Some(w) => ElementWeights::PerClass(w.iter().map(|v| *v as f32).collect()),
            None => ElementWeights::None,
        };
        let spec = PixelSpec {
            pos_weight: self.pos_weight.unwrap_or(1.0) as f32,
            gamma: 0.0,
            log_floor: None,
            weights,
        };
        Ok(Some(PixelTerm {
            spec,
            scale: self.scale(input)?,
        }))
    }

    fn forward(&self, input: &LossInput) -> Result<Tensor> {
        if input.fused {
            if let Some(term) = self.pixel_term(input)? {
                return input.pixel_sum(term);
            }
        }
        let ce = input.cross_entropy(self.pos_weight)?;
        let sum = match self.class_weights_for(input) {
            Some(w) => (ce * class_weight_per_pixel(input, w)?)?.sum_all()?,
            None => ce.sum_all()?,
        };
        sum * self.scale(input)?
    }
}

impl CrossEntropy {
    /// The class weights, which only softmax uses.
    fn class_weights_for(&self, input: &LossInput) -> Option<&[f64]> {
        match (&self.class_weights, input.activation) {
            (Some(w), Activation::Softmax) => Some(w),
            _ => None,
        }
    }

    /// `1 / normaliser`: Σ w_y over kept pixels, or the kept elements (0/0 gives 0).
    fn scale(&self, input: &LossInput) -> Result<f64> {
        let total = match self.class_weights_for(input) {
            Some(w) => sum_all_f64(&class_weight_per_pixel(input, w)?)?,
            None => input.kept_elements()?,
        };
        Ok(if total > 0.0 { 1.0 / total } else { 0.0 })
    }
}

/// `w_y` of every pixel `(N, 1, H, W)`: 0 at ignored pixels, whose one-hot row is zero.
fn class_weight_per_pixel(input: &LossInput, w: &[f64]) -> Result<Tensor> {
    let t = &input.target;
    let w = Tensor::new(w, t.device())?
        .to_dtype(t.dtype())?
        .reshape((1, w.len(), 1, 1))?;
    t.broadcast_mul(&w)?.sum_keepdim(1)
}
