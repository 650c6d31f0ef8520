//! `model.safetensors`: exactly the `state_dict` of the PyTorch U-Net (same names, shapes and
//! dtypes, `num_batches_tracked` as i64) plus metadata that lets `predict` and `eval` rebuild
//! the model and its preprocessing.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::fsutil::{read_safetensors, write_safetensors};
use crate::inference::Window;
use crate::loss::Activation;
use crate::model::{UNet, UNetConfig};

pub const FORMAT: &str = "segtrain-unet/1";

/// What a model file says about itself, beyond its tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelMeta {
    pub unet: UNetConfig,
    /// How images are covered at inference: resized to `image_size`, or sliding windows.
    pub window: Window,
    pub activation: Activation,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// Pixel value excluded from metrics.
    pub ignore_index: Option<i64>,
    /// Temperature dividing the logits (1 = none).
    pub temperature: f64,
    /// The resolved training config (TOML).
    pub config: String,
    /// Validation metrics of the saved weights (JSON).
    pub metrics: serde_json::Value,
}

impl ModelMeta {
    fn to_map(&self) -> Result<HashMap<String, String>> {
        let u = &self.unet;
        let size = match self.window {
            Window::Whole { size } => ("image_size".to_string(), size.to_string()),
            Window::Sliding { patch, .. } => ("patch_size".to_string(), patch.to_string()),
        };
        Ok(HashMap::from([
            size,
            ("format".into(), FORMAT.into()),
            ("segtrain_version".into(), env!("CARGO_PKG_VERSION").into()),
            ("in_channels".into(), u.in_channels.to_string()),
            ("classes".into(), u.classes.to_string()),
            ("base_width".into(), u.base_width.to_string()),
            ("depth".into(), u.depth.to_string()),
            ("window".into(), json(&self.window)?),
            ("activation".into(), self.activation.name().into()),
            ("mean".into(), json(&self.mean)?),
            ("std".into(), json(&self.std)?),
            ("ignore_index".into(), json(&self.ignore_index)?),
            ("temperature".into(), self.temperature.to_string()),
            ("config".into(), self.config.clone()),
            ("val_metrics".into(), self.metrics.to_string()),
        ]))
    }

    fn from_map(path: &Path, m: &HashMap<String, String>) -> Result<Self> {
        let get = |k: &str| {
            m.get(k).ok_or_else(|| {
                anyhow!(
                    "{}: not a segtrain model (metadata lacks `{k}`)",
                    path.display()
                )
            })
        };
        let number = |k: &str| -> Result<usize> {
            get(k)?
                .parse()
                .map_err(|_| anyhow!("{}: metadata `{k}` is not a number", path.display()))
        };
        let format = get("format")?;
        if format != FORMAT {
            bail!(
                "{}: unsupported model format `{format}` (expected {FORMAT})",
                path.display()
            );
        }
        let parse_json = |k: &str| -> Result<serde_json::Value> {
            serde_json::from_str(get(k)?)
                .with_context(|| format!("{}: metadata `{k}`", path.display()))
        };
        let unet = UNetConfig {
            in_channels: number("in_channels")?,
            classes: number("classes")?,
            base_width: number("base_width")?,
            depth: number("depth")?,
        };
        let activation = match get("activation")?.as_str() {
            "sigmoid" => Activation::Sigmoid,
            "softmax" => Activation::Softmax,
            other => bail!(
                "{}: unknown activation `{other}` in metadata",
                path.display()
            ),
        };
        let meta = Self {
            unet,
            // files written before patch training name only their image size
            window: match m.get("window") {
                Some(_) => serde_json::from_value(parse_json("window")?)?,
                None => Window::Whole {
                    size: number("image_size")?,
                },
            },
            activation,
            mean: serde_json::from_value(parse_json("mean")?)?,
            std: serde_json::from_value(parse_json("std")?)?,
            ignore_index: serde_json::from_value(parse_json("ignore_index")?)?,
            temperature: get("temperature")?.parse().map_err(|_| {
                anyhow!("{}: metadata `temperature` is not a number", path.display())
            })?,
            config: get("config")?.clone(),
            metrics: parse_json("val_metrics")?,
        };
        if meta.mean.len() != unet.in_channels || meta.std.len() != unet.in_channels {
            bail!(
                "{}: mean/std do not match in_channels = {}",
                path.display(),
                unet.in_channels
            );
        }
        if !(meta.temperature > 0.0 && meta.temperature.is_finite()) {
            bail!("{}: temperature must be > 0", path.display());
        }
        Ok(meta)
    }
}

fn json<T: Serialize>(value: &T) -> Result<String> {
    Ok(serde_json::to_string(value)?)
}

/// The PyTorch `state_dict` of the parameters in `vars` (names as in the module), in the
/// module's order, cast to `dtype`; `num_batches_tracked` = `bn_updates` as i64.
pub fn state_dict(
    unet: &UNetConfig,
    vars: &VarMap,
    bn_updates: u64,
    dtype: DType,
) -> Result<Vec<(String, Tensor)>> {
    let data = vars.data().lock().expect("variable map lock");
    unet.state_dict_spec()
        .into_iter()
        .map(|(name, shape, kind)| {
            let t = if kind == DType::I64 {
                Tensor::new(bn_updates as i64, &Device::Cpu)?
            } else {
                let var = data
                    .get(&name)
                    .ok_or_else(|| anyhow!("the model has no `{name}`"))?;
                var.as_tensor().to_dtype(dtype)?
            };
            if t.dims() != shape.as_slice() {
                bail!("`{name}` has shape {:?}, expected {shape:?}", t.dims());
            }
            Ok((name, t))
        })
        .collect()
}

/// Writes a model file (atomically).
pub fn save(path: &Path, tensors: &[(String, Tensor)], meta: &ModelMeta) -> Result<()> {
    write_safetensors(path, tensors, Some(meta.to_map()?))
}

/// A model file's tensors and metadata, checked against the architecture its metadata names:
/// every entry of the PyTorch `state_dict`, with the right shape, and nothing else.
pub fn read(path: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, ModelMeta)> {
    let (tensors, meta) = read_safetensors(path, device)?;
    let meta = ModelMeta::from_map(path, &meta)?;
    let spec = meta.unet.state_dict_spec();
    for (name, shape, kind) in &spec {
        let t = tensors.get(name).ok_or_else(|| {
            anyhow!(
                "{}: missing tensor `{name}` for a U-Net {:?}",
                path.display(),
                meta.unet
            )
        })?;
        if t.dims() != shape.as_slice() {
            bail!(
                "{}: `{name}` has shape {:?}, the architecture needs {shape:?}",
                path.display(),
                t.dims()
            );
        }
        let ok = if *kind == DType::I64 {
            t.dtype() == DType::I64
        } else {
            t.dtype().is_float()
        };
        if !ok {
            bail!("{}: `{name}` has dtype {:?}", path.display(), t.dtype());
        }
    }
    if let Some(extra) = tensors
        .keys()
        .find(|k| !spec.iter().any(|(n, _, _)| n == *k))
    {
        bail!(
            "{}: unexpected tensor `{extra}` for a U-Net {:?}",
            path.display(),
            meta.unet
        );
    }
    Ok((tensors, meta))
}

/// Loads a model file for inference (f32 weights on `device`).
pub fn load(path: &Path, device: &Device) -> Result<(UNet, ModelMeta)> {
    let (tensors, meta) = read(path, device)?;
    let weights: HashMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(_, t)| t.dtype().is_float())
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<candle_core::Result<_>>()?;
    let vb = VarBuilder::from_tensors(weights, DType::F32, device);
    let model = UNet::new(meta.unet, None, vb).with_context(|| path.display().to_string())?;
    Ok((model, meta))
}

/// Rewrites a model file with its float tensors cast to `dtype` (f32, f16 or bf16).
pub fn convert(src: &Path, dst: &Path, dtype: DType) -> Result<()> {
    let (tensors, meta) = read(src, &Device::Cpu)?;
    let ordered = meta
        .unet
        .state_dict_spec()
        .into_iter()
        .map(|(name, _, kind)| {
            let t = &tensors[&name];
            let t = if kind == DType::I64 {
                t.clone()
            } else {
                t.to_dtype(dtype)?
            };
            Ok((name, t))
        })
        .collect::<Result<Vec<_>>>()?;
    save(dst, &ordered, &meta)
}
