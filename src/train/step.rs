//! One training update: forward (in the training precision), loss, backward, global-norm
//! gradient clipping and an AdamW step; f16's dynamic loss scaling; in a data-parallel run the
//! loss of the whole gathered batch and gradients summed over the ranks
//! ([`crate::distributed`]). `bench` times this same function.

use anyhow::Result;
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use crate::config::Precision;
use crate::cpu::profile::time;
use crate::distributed::{self, Shard};
use crate::kernels::Kernels;
use crate::loss::{Loss, LossValue, PositivesAverage};
use crate::model::{deep_supervision, is_trainable, SegmentationModel};

/// How one update runs.
#[derive(Debug, Clone, Copy)]
pub struct StepSettings {
    pub lr: f64,
    /// Largest global gradient norm (None: no clipping).
    pub grad_clip: Option<f64>,
    /// Floating-point type of the forward and backward passes.
    pub dtype: DType,
    /// The model's kernels (f32 only; half precision runs Candle's ops).
    pub kernels: Kernels,
}

/// What an update hands to the next besides the weights and the optimiser's moments
/// (checkpointed with the run's progress).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepState {
    /// f16 training's dynamic loss scale (None otherwise).
    loss_scale: Option<LossScale>,
    /// The running positives per batch of `normalize = "positives"` terms.
    #[serde(default)]
    positives: PositivesAverage,
    /// The same for each auxiliary output of deep supervision (its own pixel count).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    aux_positives: Vec<PositivesAverage>,
}

impl StepState {
    /// The state of a run's first update.
    pub fn new(precision: Precision) -> Self {
        Self {
            loss_scale: (precision == Precision::F16).then_some(LossScale {
                scale: LossScale::INITIAL,
                finite_run: 0,
            }),
            positives: PositivesAverage::default(),
            aux_positives: vec![],
        }
    }
}

/// Dynamic loss scaling for f16 (PyTorch's `GradScaler`): the loss is multiplied by `scale`
/// before the backward pass, so that small gradients stay above f16's smallest normal
/// (6·10⁻⁵), and the gradients are divided by it. A non-finite gradient halves the scale and
/// skips the update; `GROWTH_INTERVAL` finite updates in a row double it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct LossScale {
    scale: f64,
    finite_run: u64,
}

impl LossScale {
    const INITIAL: f64 = 65536.0;
    const GROWTH_INTERVAL: u64 = 2000;

    fn finite(&mut self) {
        self.finite_run += 1;
        if self.finite_run == Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.finite_run = 0;
        }
    }

    fn overflow(&mut self) {
        self.scale = (self.scale / 2.0).max(1.0);
        self.finite_run = 0;
    }
}

/// What an update did.
pub enum StepOutcome {
    /// Updated: the loss and each term, over a batch of `images` (every rank's).
    Done {
        loss: f64,
        terms: Vec<f64>,
        images: usize,
    },
    /// What was not finite: a loss term or the gradient.
    NonFinite(String),
    /// f16: the scaled gradient overflowed; the scale is halved and the update skipped.
    Overflow,
}

/// Forward (in `settings.dtype`), loss, backward, clipping and one AdamW update.
pub fn train_step(
    model: &dyn SegmentationModel,
    loss: &Loss,
    optimizer: &mut AdamW,
    (images, masks): (&Tensor, &Tensor),
    settings: StepSettings,
    state: &mut StepState,
) -> Result<StepOutcome> {
    let outputs = time("step: forward", || {
        model.training_outputs(images, settings.kernels, settings.dtype)
    })?;
    let (value, batch) = time("step: loss", || {
        batch_loss(loss, &outputs, &model.aux_levels(), masks, state)
    })?;
    let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let terms = value.terms.iter().map(scalar).collect::<Result<Vec<_>>>()?;
    if let Some(i) = terms.iter().position(|v| !v.is_finite()) {
        let term = &loss.terms[i];
        return Ok(StepOutcome::NonFinite(format!(
            "loss term {i} (`{}`) is {}",
            term.kind, terms[i]
        )));
    }
    let total = scalar(&value.total)?;
    let factor = state.loss_scale.as_ref().map_or(1.0, |s| s.scale);
    let grads = time("step: backward", || {
        let scaled = if factor == 1.0 {
            value.total.clone()
        } else {
            (&value.total * factor)?
        };
        gradients(&scaled, &outputs, batch.as_ref(), optimizer)
    })?;
    let norm = time("step: gradient norm", || optimizer.grad_norm(&grads))? / factor;
    if !norm.is_finite() {
        if let Some(s) = state.loss_scale.as_mut() {
            s.overflow();
            return Ok(StepOutcome::Overflow);
        }
        return Ok(StepOutcome::NonFinite(format!(
            "the gradient norm is {norm}"
        )));
    }
    let clip = match settings.grad_clip {
        Some(c) if norm > c => c / (norm + 1e-6),
        _ => 1.0,
    };
    time("step: optimizer", || {
        optimizer.step(&grads, settings.lr, clip / factor)
    })?;
    if let Some(s) = state.loss_scale.as_mut() {
        s.finite();
    }
    Ok(StepOutcome::Done {
        loss: total,
        terms,
        images: batch.as_ref().map_or(images.dim(0)?, |b| b.images),
    })
}

/// The whole batch of a data-parallel update: every rank's outputs, gathered in batch order as
/// leaves of the loss's graph.
struct GatheredBatch {
    outputs: Vec<Var>,
    images: usize,
}

/// The loss of the batch: of this process's outputs, or in a data-parallel run of every
/// rank's outputs and masks gathered (the same value on every rank).
fn batch_loss(
    loss: &Loss,
    outputs: &[Tensor],
    levels: &[usize],
    masks: &Tensor,
    state: &mut StepState,
) -> Result<(LossValue, Option<GatheredBatch>)> {
    if distributed::ranks() == 1 {
        return Ok((supervised_loss(loss, outputs, levels, masks, state)?, None));
    }
    let gathered = outputs
        .iter()
        .map(|o| Ok(Var::from_tensor(&gather_rows(&o.detach())?)?))
        .collect::<Result<Vec<Var>>>()?;
    let masks = gather_rows(&masks.to_dtype(DType::F32)?)?.to_dtype(masks.dtype())?;
    let whole: Vec<Tensor> = gathered.iter().map(|v| v.as_tensor().clone()).collect();
    let value = supervised_loss(loss, &whole, levels, &masks, state)?;
    let images = masks.dim(0)?;
    Ok((
        value,
        Some(GatheredBatch {
            outputs: gathered,
            images,
        }),
    ))
}

/// Every rank's rows of `t` (batch first), in rank order.
fn gather_rows(t: &Tensor) -> Result<Tensor> {
    let rows = t.dim(0)?;
    let row_len = t.elem_count() / rows.max(1);
    let local: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let all = distributed::gather_rows(&local, rows, row_len);
    let mut dims = t.dims().to_vec();
    dims[0] = all.len() / row_len.max(1);
    Ok(Tensor::from_vec(all, dims, t.device())?.to_dtype(t.dtype())?)
}

/// The parameter gradients of `loss`. In a data-parallel run `loss` is of the gathered batch:
/// its gradient with respect to this rank's rows of each output is back-propagated through
/// this rank's forward pass (`Σ output·∂L/∂output`), and the parameter gradients are summed
/// over the ranks.
fn gradients(
    loss: &Tensor,
    outputs: &[Tensor],
    batch: Option<&GatheredBatch>,
    optimizer: &AdamW,
) -> Result<GradStore> {
    let Some(batch) = batch else {
        return Ok(loss.backward()?);
    };
    let of_outputs = loss.backward()?;
    let own = Shard::current().slots(batch.images);
    let mut surrogate = Tensor::zeros((), DType::F32, loss.device())?;
    for (output, whole) in outputs.iter().zip(&batch.outputs) {
        if let Some(g) = of_outputs.get(whole.as_tensor()) {
            let g = g.narrow(0, own.start, own.len())?.detach();
            surrogate = (surrogate + (output * g)?.sum_all()?.to_dtype(DType::F32)?)?;
        }
    }
    let mut grads = surrogate.backward()?;
    optimizer.sum_gradients_over_ranks(&mut grads)?;
    Ok(grads)
}

/// The loss of a training forward pass: of the logits alone, or with deep supervision
/// Σ_l w_l · loss(output_l, target↓2^l) over the logits and the auxiliary outputs at `levels`
/// (each term, and the total, the same weighted sum).
fn supervised_loss(
    loss: &Loss,
    outputs: &[Tensor],
    levels: &[usize],
    masks: &Tensor,
    state: &mut StepState,
) -> Result<LossValue> {
    let Some((logits, aux)) = outputs.split_first() else {
        anyhow::bail!("the model returned no output");
    };
    if aux.is_empty() {
        return loss.forward_training(logits, masks, &mut state.positives);
    }
    state
        .aux_positives
        .resize_with(levels.len(), PositivesAverage::default);
    let weights = deep_supervision::weights(levels);
    let mut parts = vec![(
        weights[0],
        loss.forward_training(logits, masks, &mut state.positives)?,
    )];
    for (i, (output, &level)) in aux.iter().zip(levels).enumerate() {
        let target = deep_supervision::downsample_target(masks, 1 << level)?;
        let value = loss.forward_training(output, &target, &mut state.aux_positives[i])?;
        parts.push((weights[i + 1], value));
    }
    Ok(LossValue::weighted_sum(&parts)?)
}

/// The optimiser's parameters: every variable but BatchNorm's running statistics, by name.
pub fn trainable(vars: &VarMap) -> Vec<(String, Var)> {
    let data = vars.data().lock().expect("variable map lock");
    let mut params: Vec<(String, Var)> = data
        .iter()
        .filter(|(name, _)| is_trainable(name))
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

#[cfg(test)]
mod tests {
    use super::LossScale;

    #[test]
    fn loss_scale_halves_on_overflow_and_doubles_after_a_finite_run() {
        let mut s = LossScale {
            scale: LossScale::INITIAL,
            finite_run: 0,
        };
        s.overflow();
        assert_eq!(s.scale, LossScale::INITIAL / 2.0);
        for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
            s.finite();
        }
        assert_eq!(s.scale, LossScale::INITIAL / 2.0);
        s.finite();
        assert_eq!(s.scale, LossScale::INITIAL);
        // an overflow resets the run; the scale never drops below 1
        s.finite();
        s.overflow();
        assert_eq!((s.scale, s.finite_run), (LossScale::INITIAL / 2.0, 0));
        for _ in 0..40 {
            s.overflow();
        }
        assert_eq!(s.scale, 1.0);
    }
}
