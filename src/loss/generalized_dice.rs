//! Generalized Dice loss (Sudre, Li, Vercauteren, Ourselin, Cardoso: "Generalised Dice overlap
//! as a deep learning loss function for highly unbalanced segmentations", DLMIA 2017), with
//! MONAI `GeneralizedDiceLoss` semantics.
//!
//! Per image (`per_image` = true) or over the batch, with per-class weights `w_k` computed from
//! the target only (constants for the gradient):
//! `1 − (2 Σ_k w_k I_k + smooth_nr) / (Σ_k w_k (G_k + P_k) + smooth_dr)`,
//! `I_k = Σ p·g`, `P_k = Σ p`, `G_k = Σ g`; the loss is the mean over images.
//! `weight_type`: `"square"` (default, `w = 1/G²`), `"simple"` (`1/G`), `"uniform"` (1).
//! A class absent from an image (`G_k = 0`, infinite weight) takes the largest finite weight of
//! the same image (of the batch when `per_image` = false), or 0 if there is none — MONAI's rule.
//! Defaults: `smooth_nr` = `smooth_dr` = 1e-5, `per_image` = true, `include_background` = false
//! (softmax only).

use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use super::fused::Stat;
use super::{check_non_negative, default_smooth, default_true, LossFn, LossInput, LossKind};

pub const KIND: LossKind = LossKind::new::<GeneralizedDice>(
    "generalized_dice",
    "generalized Dice with 1/G² class weights (Sudre et al. 2017; MONAI)",
);

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightType {
    /// `1 / G²`
    #[default]
    Square,
    /// `1 / G`
    Simple,
    /// 1
    Uniform,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GeneralizedDice {
    #[serde(default)]
    pub weight_type: WeightType,
    #[serde(default = "default_smooth")]
    pub smooth_nr: f64,
    #[serde(default = "default_smooth")]
    pub smooth_dr: f64,
    #[serde(default = "default_true")]
    pub per_image: bool,
    #[serde(default)]
    pub include_background: bool,
}

impl GeneralizedDice {
    /// Class weights `(rows, K)` from the target volumes `G`, with MONAI's rule for empty classes.
    fn weights(&self, g: &Tensor) -> Result<Tensor> {
        let rows = g.to_dtype(DType::F64)?.to_vec2::<f64>()?;
        let weights: Vec<f64> = rows
            .iter()
            .flat_map(|row| {
                let w: Vec<f64> = row
                    .iter()
                    .map(|&v| match self.weight_type {
                        WeightType::Square => 1.0 / (v * v),
                        WeightType::Simple => 1.0 / v,
                        WeightType::Uniform => 1.0,
                    })
                    .collect();
                let largest = w
                    .iter()
                    .copied()
                    .filter(|x| x.is_finite())
                    .fold(0.0, f64::max);
                w.into_iter()
                    .map(move |x| if x.is_finite() { x } else { largest })
            })
            .collect();
        Tensor::from_vec(weights, g.dims(), g.device())?.to_dtype(g.dtype())
    }
}

impl LossFn for GeneralizedDice {
    fn validate(&self) -> std::result::Result<(), String> {
        check_non_negative("smooth_nr", self.smooth_nr, false)?;
        check_non_negative("smooth_dr", self.smooth_dr, false)
    }

    fn forward(&self, input: &LossInput) -> Result<Tensor> {
        let stat = |s: Stat| input.stat(s, self.per_image, self.include_background);
        let (i, p_sum, g_sum) = (
            stat(Stat::Intersection)?,
            stat(Stat::Pred)?,
            stat(Stat::Target)?,
        );
        let w = self.weights(&g_sum)?;
        let num = (((i * &w)?.sum_keepdim(1)? * 2.0)? + self.smooth_nr)?;
        let den = (((g_sum + p_sum)? * w)?.sum_keepdim(1)? + self.smooth_dr)?;
        (1.0 - (num / den)?)?.mean_all()
    }
}
