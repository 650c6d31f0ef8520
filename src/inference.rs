//! From logits to probabilities, labels and metrics: shared by validation, `eval` and
//! `predict`.

use candle_core::{DType, Device, Result, Tensor};

use crate::loss::Activation;
use crate::metrics::{image_counts, Evaluation};
use crate::model::UNet;

/// Probabilities `(N, C, H, W)` of `logits / temperature`: sigmoid per element or softmax over
/// the classes.
pub fn probabilities(logits: &Tensor, activation: Activation, temperature: f64) -> Result<Tensor> {
    let z = if temperature != 1.0 {
        (logits / temperature)?
    } else {
        logits.clone()
    };
    match activation {
        Activation::Sigmoid => candle_nn::ops::sigmoid(&z),
        Activation::Softmax => candle_nn::ops::softmax(&z, 1),
    }
}

/// One class index per pixel `(N, H, W)` u8: for one sigmoid channel, 1 where p > threshold;
/// otherwise the most probable channel.
pub fn labels(probs: &Tensor, threshold: f64) -> Result<Tensor> {
    if probs.dim(1)? == 1 {
        probs.squeeze(1)?.gt(threshold)?.to_dtype(DType::U8)
    } else {
        probs.argmax(1)?.to_dtype(DType::U8)
    }
}

/// Runs `model` in evaluation mode over `(images, masks)` batches and counts, per image, the
/// hits and misses of every scored class.
pub fn evaluate<I>(
    model: &UNet,
    batches: I,
    device: &Device,
    activation: Activation,
    temperature: f64,
    ignore: Option<u8>,
) -> Result<Evaluation>
where
    I: Iterator<Item = Result<(Tensor, Tensor)>>,
{
    let classes = model.config.classes;
    let mut evaluation = Evaluation::default();
    for batch in batches {
        let (images, masks) = batch?;
        let logits = model.forward(&images.to_device(device)?, false)?;
        let probs = probabilities(&logits, activation, temperature)?;
        let pred = labels(&probs, 0.5)?.to_device(&Device::Cpu)?;
        let n = pred.dim(0)?;
        let pred = pred.flatten_from(1)?.to_vec2::<u8>()?;
        let masks = masks.flatten_from(1)?.to_vec2::<u8>()?;
        for i in 0..n {
            evaluation.push(image_counts(&pred[i], &masks[i], classes, ignore));
        }
    }
    Ok(evaluation)
}
