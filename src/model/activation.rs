//! The model's output activation: how its logits become probabilities, for the loss, the
//! metrics and inference alike.

use serde::{Deserialize, Serialize};

/// How logits become probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `p = σ(x)` per element: binary (C = 1) or multilabel (C > 1) targets.
    Sigmoid,
    /// `p = softmax(x)` over the class dimension: exactly one class per pixel.
    Softmax,
}

impl Activation {
    /// The contract's default: sigmoid for one output channel, softmax for several.
    pub fn default_for(classes: usize) -> Self {
        if classes == 1 {
            Self::Sigmoid
        } else {
            Self::Softmax
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Sigmoid => "sigmoid",
            Self::Softmax => "softmax",
        }
    }
}
