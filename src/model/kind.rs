//! What the rest of segtrain asks of a segmentation network, and the architectures that
//! provide it. Training, validation, inference, calibration and export see a
//! `&dyn SegmentationModel`; a second architecture is a new [`ModelKind`] and an implementation
//! of the trait, not a fork of the loop.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use super::{UNet, UNetConfig};
use crate::kernels::Kernels;

/// The architectures segtrain builds: `model.kind` in a config, `kind` in a model file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// The U-Net of the README (Ronneberger et al. 2015, with BatchNorm), PyTorch-compatible.
    #[default]
    Unet,
}

impl ModelKind {
    pub const ALL: &'static [ModelKind] = &[ModelKind::Unet];

    pub fn name(self) -> &'static str {
        match self {
            Self::Unet => "unet",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.name() == name)
    }

    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// A fresh, seeded model of this kind for training (see [`super::init`]) and the
    /// `VarMap` that owns its variables.
    pub fn init(
        self,
        config: UNetConfig,
        prior: Option<f64>,
        deep_supervision: bool,
        seed: u64,
        device: &Device,
    ) -> Result<(Box<dyn SegmentationModel>, VarMap)> {
        match self {
            Self::Unet => {
                let (model, vars) = super::init(config, prior, deep_supervision, seed, device)?;
                Ok((Box::new(model), vars))
            }
        }
    }

    /// A model of this kind for inference on `tensors` (its `state_dict`'s float entries;
    /// others are ignored).
    pub fn from_tensors(
        self,
        config: UNetConfig,
        tensors: HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Box<dyn SegmentationModel>> {
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        match self {
            Self::Unet => Ok(Box::new(UNet::new(config, None, vb)?)),
        }
    }
}

/// A network mapping images `(N, in_channels, H, W)` to logits `(N, classes, H, W)`.
pub trait SegmentationModel {
    fn kind(&self) -> ModelKind;

    fn in_channels(&self) -> usize;

    fn classes(&self) -> usize;

    /// H and W of an input must be multiples of this.
    fn side_multiple(&self) -> usize;

    /// The exported `state_dict`: name, shape and dtype of every entry (training-only heads
    /// excluded).
    fn state_dict_spec(&self) -> Vec<(String, Vec<usize>, DType)>;

    /// Forward FLOPs of one `size × size` image.
    fn forward_flops(&self, size: usize) -> f64;

    /// Bytes an evaluation-mode forward pass of `batch` images of `size × size` needs.
    fn inference_bytes(&self, batch: usize, size: usize) -> f64;

    /// The logits, in training (batch statistics) or evaluation mode; the device's kernels.
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor>;

    /// A training forward pass in `dtype` with `kernels`: the logits, then the auxiliary
    /// outputs at [`Self::aux_levels`] (each at 1/2^level of the input's side), all f32.
    fn training_outputs(&self, x: &Tensor, kernels: Kernels, dtype: DType) -> Result<Vec<Tensor>>;

    /// The levels of the auxiliary outputs [`Self::training_outputs`] returns after the logits.
    fn aux_levels(&self) -> Vec<usize>;

    /// Evaluation-mode logits of `x`, flattened on the host; None when any is NaN or infinite
    /// (weights or inputs that overflow).
    fn finite_logits(&self, x: &Tensor) -> Result<Option<Vec<f32>>> {
        let logits: Vec<f32> = self
            .forward_t(x, false)?
            .flatten_all()?
            .to_device(&Device::Cpu)?
            .to_vec1()?;
        Ok(logits.iter().all(|v| v.is_finite()).then_some(logits))
    }
}

impl SegmentationModel for UNet {
    fn kind(&self) -> ModelKind {
        ModelKind::Unet
    }

    fn in_channels(&self) -> usize {
        self.config.in_channels
    }

    fn classes(&self) -> usize {
        self.config.classes
    }

    fn side_multiple(&self) -> usize {
        1 << self.config.depth
    }

    fn state_dict_spec(&self) -> Vec<(String, Vec<usize>, DType)> {
        self.config.state_dict_spec()
    }

    fn forward_flops(&self, size: usize) -> f64 {
        self.config.forward_flops(size)
    }

    fn inference_bytes(&self, batch: usize, size: usize) -> f64 {
        self.config.inference_bytes(batch, size)
    }

    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        self.forward(x, train)
    }

    fn training_outputs(&self, x: &Tensor, kernels: Kernels, dtype: DType) -> Result<Vec<Tensor>> {
        self.forward_outputs(kernels, x, true, dtype)
    }

    fn aux_levels(&self) -> Vec<usize> {
        self.aux.iter().map(|(l, _)| *l).collect()
    }
}
