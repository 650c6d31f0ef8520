//! Top-k cross-entropy: online hard-example mining (Shrivastava, Gupta, Girshick: "Training
//! Region-based Object Detectors with Online Hard Example Mining", CVPR 2016) at pixel level —
//! the alternative to focal loss that drops easy pixels instead of down-weighting them.
//!
//! The per-element cross-entropy (sigmoid: BCE per element; softmax: CE per pixel) of the kept
//! elements is sorted and the mean of the `k = max(1, ceil(fraction·count))` largest is the loss;
//! `fraction` = 0.1. Elements tied with the k-th value share its remaining weight, so the value is
//! the same whichever tied element a sort would have picked.

use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use super::{LossFn, LossInput, LossKind};

pub const KIND: LossKind = LossKind::new::<TopKCrossEntropy>(
    "topk_cross_entropy",
    "mean of the hardest fraction of per-pixel cross-entropies (OHEM-style)",
);

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopKCrossEntropy {
    #[serde(default = "default_fraction")]
    pub fraction: f64,
}

fn default_fraction() -> f64 {
    0.1
}

impl LossFn for TopKCrossEntropy {
    fn validate(&self) -> std::result::Result<(), String> {
        if self.fraction > 0.0 && self.fraction <= 1.0 {
            Ok(())
        } else {
            Err(format!(
                "`fraction` must lie in (0, 1], got {}",
                self.fraction
            ))
        }
    }

    fn forward(&self, input: &LossInput) -> Result<Tensor> {
        let ce = input.cross_entropy(None)?;
        let count = input.kept_elements()?;
        if count == 0.0 {
            return ce.sum_all()?.affine(0.0, 0.0);
        }
        let k = ((self.fraction * count).ceil() as usize).max(1);
        // ignored elements (ce = 0 there) drop to −1 so that they are never selected
        let selection = match &input.mask {
            Some(m) => ce.broadcast_add(&(m - 1.0)?)?,
            None => ce.clone(),
        }
        .detach()
        .to_dtype(DType::F64)?;
        let mut values = selection.flatten_all()?.to_vec1::<f64>()?;
        let (_, kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
        let kth = *kth;
        let above = values.iter().filter(|&&v| v > kth).count();
        let tied = values.iter().filter(|&&v| v == kth).count();
        let share = (k - above) as f64 / tied as f64;
        let weights = (selection.gt(kth)?.to_dtype(ce.dtype())?
            + (selection.eq(kth)?.to_dtype(ce.dtype())? * share)?)?;
        (ce * weights)?.sum_all()? / k as f64
    }
}
