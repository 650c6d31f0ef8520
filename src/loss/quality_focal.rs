//! Quality Focal Loss (Li et al.: "Generalized Focal Loss: Learning Qualified and Distributed
//! Bounding Boxes for Dense Object Detection", NeurIPS 2020): focal modulation for soft targets.
//!
//! Sigmoid only, per element `|g − σ(x)|^β · BCE(x, g)`, mean over kept elements; `beta` = 2.0.
//! `g − p` is computed as `g·σ(−x) − (1 − g)·σ(x)`, exact for saturated logits.

use candle_core::{Result, Tensor};
use serde::Deserialize;

use super::{check_non_negative, Activation, LossFn, LossInput, LossKind};

pub const KIND: LossKind = LossKind::new::<QualityFocal>(
    "quality_focal",
    "quality focal |g − p|^β·BCE for soft targets (Li et al. 2020), sigmoid",
);

/// Smallest `|g − p|` raised to β when β < 2 (keeps the gradient finite at g = p).
const TINY: f64 = 1e-30;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QualityFocal {
    #[serde(default = "default_beta")]
    pub beta: f64,
}

fn default_beta() -> f64 {
    2.0
}

impl LossFn for QualityFocal {
    fn validate(&self) -> std::result::Result<(), String> {
        check_non_negative("beta", self.beta, false)
    }

    fn check(&self, _classes: usize, activation: Activation) -> std::result::Result<(), String> {
        match activation {
            Activation::Sigmoid => Ok(()),
            Activation::Softmax => Err("quality_focal is defined for sigmoid only".into()),
        }
    }

    fn default_activation(&self, _classes: usize) -> Activation {
        Activation::Sigmoid
    }

    fn forward(&self, input: &LossInput) -> Result<Tensor> {
        let g = &input.target;
        let gap = ((g * input.one_minus_p()?)? - ((1.0 - g)? * input.p()?)?)?;
        let modulator = if self.beta == 2.0 {
            gap.sqr()?
        } else {
            gap.abs()?.maximum(TINY)?.powf(self.beta)?
        };
        let loss = (modulator * input.cross_entropy(None)?)?.sum_all()?;
        loss / input.kept_elements()?.max(1.0)
    }
}
