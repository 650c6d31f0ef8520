//! Cross-entropy, the baseline every imbalance-aware loss is compared with.
//!
//! - sigmoid (BCE-with-logits): `ℓ = −[w₊·g·log σ(x) + (1 − g)·log σ(−x)]`, mean over kept
//!   elements; `pos_weight` = w₊ (PyTorch's `pos_weight`, absent = 1) up-weights positives.
//! - softmax: `ℓ = −log p_y`, mean over kept pixels; with `class_weights` w:
//!   `Σ w_y·ℓ / Σ w_y` (PyTorch's weighted-mean convention of `F.cross_entropy`).

use candle_core::{Result, Tensor};
use serde::Deserialize;

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

    fn forward(&self, input: &LossInput) -> Result<Tensor> {
        let ce = input.cross_entropy(self.pos_weight)?;
        match &self.class_weights {
            Some(w) if input.activation == Activation::Softmax => {
                let w = Tensor::new(w.as_slice(), ce.device())?
                    .to_dtype(ce.dtype())?
                    .reshape((1, w.len(), 1, 1))?;
                // w_y per pixel (0 at ignored pixels, whose one-hot row is zero)
                let w_pixel = input.target.broadcast_mul(&w)?.sum_keepdim(1)?;
                // every kept pixel weighted 0 (or ignored) gives 0, not 0/0
                let total = sum_all_f64(&w_pixel)?;
                let scale = if total > 0.0 { 1.0 / total } else { 0.0 };
                (ce * w_pixel)?.sum_all()? * scale
            }
            _ => ce.sum_all()? / input.kept_elements()?.max(1.0),
        }
    }
}
