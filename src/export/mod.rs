//! `model.safetensors`: exactly the `state_dict` of the PyTorch U-Net (same names, shapes and
//! dtypes, `num_batches_tracked` as i64) plus metadata that lets `predict` and `eval` rebuild
//! the model and its preprocessing.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::data::{Normalization, Normalizer};
use crate::fsutil::{read_safetensors, write_safetensors};
use crate::import::Slicing;
use crate::inference::Window;
use crate::model::{Activation, ModelKind, SegmentationModel, UNetConfig};
use crate::rules;

pub mod folder;
pub mod onnx;

/// The model file of a model folder ([`folder`]).
pub const MODEL_FILE: &str = "model.safetensors";

pub const FORMAT: &str = "segtrain-unet/1";

/// What a model file says about itself, beyond its tensors.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelMeta {
    /// The architecture (files written before `kind` existed are U-Nets).
    pub kind: ModelKind,
    pub unet: UNetConfig,
    /// How images are covered at inference: resized to `image_size`, or sliding windows.
    pub window: Window,
    pub activation: Activation,
    pub normalizer: Normalizer,
    /// Pixel value excluded from metrics.
    pub ignore_index: Option<i64>,
    /// Temperature dividing the logits (1 = none).
    pub temperature: f64,
    /// The resolved training config (TOML).
    pub config: String,
    /// Validation metrics of the saved weights (JSON).
    pub metrics: serde_json::Value,
    /// How `import` cut the training slices from their volumes (absent: images not from
    /// `import`, or files written before it was recorded); `predict` cuts scans alike.
    pub slicing: Option<Slicing>,
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
            ("kind".into(), self.kind.name().into()),
            ("in_channels".into(), u.in_channels.to_string()),
            ("classes".into(), u.classes.to_string()),
            ("base_width".into(), u.base_width.to_string()),
            ("depth".into(), u.depth.to_string()),
            ("window".into(), json(&self.window)?),
            ("activation".into(), self.activation.name().into()),
            ("normalize".into(), json(&self.normalizer.mode)?),
            ("clip_percentiles".into(), json(&self.normalizer.clip)?),
            ("mean".into(), json(&self.normalizer.mean)?),
            ("std".into(), json(&self.normalizer.std)?),
            ("ignore_index".into(), json(&self.ignore_index)?),
            ("temperature".into(), self.temperature.to_string()),
            ("config".into(), self.config.clone()),
            ("val_metrics".into(), self.metrics.to_string()),
            ("import".into(), json(&self.slicing)?),
        ]))
    }

    /// The metadata of the model file `path`, every field checked with the rules a config's
    /// own values obey ([`crate::rules`]); errors name the file and the field.
    fn from_map(path: &Path, m: &HashMap<String, String>) -> Result<Self> {
        let file = path.display().to_string();
        let bytes: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > MAX_METADATA_BYTES {
            bail!("{file}: model metadata of {bytes} bytes, more than the {MAX_METADATA_BYTES} bytes a model's can hold");
        }
        let f = Fields { file, m };
        let format = f.get("format")?;
        if format != FORMAT {
            if format.starts_with("segtrain-checkpoint") {
                bail!(
                    "{}: a training checkpoint, not a model file (use the run's model.safetensors)",
                    f.file
                );
            }
            bail!(
                "{}: unsupported model format `{}` (expected {FORMAT})",
                f.file,
                format.chars().take(80).collect::<String>()
            );
        }
        let kind = f.kind()?;
        let unet = f.unet()?;
        // the channels follow from the import's 2.5-D context: checked before the
        // per-channel fields
        let slicing: Option<Slicing> = f.optional::<Option<Slicing>>("import")?.flatten();
        if let Some(s) = &slicing {
            f.checked("import", s.check())?;
        }
        let context = slicing.map_or(0, |s| s.context);
        f.checked("in_channels", rules::channels(unet.in_channels, context))?;
        let window = f.window(unet.depth)?;
        let activation = match f.get("activation")?.as_str() {
            "sigmoid" => Activation::Sigmoid,
            "softmax" => Activation::Softmax,
            other => {
                return Err(f.field(
                    "activation",
                    &format!(
                        "unknown activation `{}` (sigmoid or softmax)",
                        other.chars().take(40).collect::<String>()
                    ),
                ))
            }
        };
        f.checked("activation", rules::activation(activation, unet.classes))?;
        let normalizer = f.normalizer(unet.in_channels)?;
        let ignore_index: Option<i64> = f.typed("ignore_index")?;
        if let Some(i) = ignore_index {
            f.checked("ignore_index", rules::ignore_index(i, unet.classes))?;
        }
        let temperature: f64 = f
            .get("temperature")?
            .parse()
            .map_err(|_| f.field("temperature", &"not a number"))?;
        f.checked("temperature", rules::temperature(temperature))?;
        let metrics = f.json("val_metrics")?;
        if !metrics.is_object() {
            return Err(f.field("val_metrics", &"not a JSON object"));
        }
        Ok(Self {
            kind,
            unet,
            window,
            activation,
            normalizer,
            ignore_index,
            temperature,
            config: f.get("config")?.clone(),
            metrics,
            slicing,
        })
    }
}

/// The metadata of one model file, read field by field; errors name the file and the field.
struct Fields<'a> {
    file: String,
    m: &'a HashMap<String, String>,
}

impl Fields<'_> {
    fn get(&self, k: &str) -> Result<&String> {
        self.m
            .get(k)
            .ok_or_else(|| anyhow!("{}: not a segtrain model (metadata lacks `{k}`)", self.file))
    }

    fn field(&self, k: &str, msg: &dyn std::fmt::Display) -> anyhow::Error {
        anyhow!("{}: metadata `{k}`: {msg}", self.file)
    }

    fn checked(&self, k: &str, check: rules::Check) -> Result<()> {
        check.map_err(|msg| self.field(k, &msg))
    }

    fn number(&self, k: &str) -> Result<usize> {
        let v = self.get(k)?;
        v.parse().map_err(|_| {
            let shown: String = v.chars().take(40).collect();
            self.field(k, &format!("`{shown}` is not a whole number"))
        })
    }

    fn json(&self, k: &str) -> Result<serde_json::Value> {
        serde_json::from_str(self.get(k)?).map_err(|e| self.field(k, &e))
    }

    fn typed<T: serde::de::DeserializeOwned>(&self, k: &str) -> Result<T> {
        serde_json::from_value(self.json(k)?).map_err(|e| self.field(k, &e))
    }

    /// A field that older files lack: None when absent.
    fn optional<T: serde::de::DeserializeOwned>(&self, k: &str) -> Result<Option<T>> {
        self.m.get(k).map(|_| self.typed(k)).transpose()
    }

    fn kind(&self) -> Result<ModelKind> {
        let Some(name) = self.m.get("kind") else {
            return Ok(ModelKind::Unet);
        };
        ModelKind::parse(name).ok_or_else(|| {
            let known: Vec<&str> = ModelKind::ALL.iter().map(|k| k.name()).collect();
            let shown: String = name.chars().take(40).collect();
            self.field(
                "kind",
                &format!("unknown model kind `{shown}` ({})", known.join(", ")),
            )
        })
    }

    fn unet(&self) -> Result<UNetConfig> {
        let in_channels = self.number("in_channels")?;
        self.checked(
            "in_channels",
            rules::count(in_channels, rules::MAX_IN_CHANNELS),
        )?;
        let classes = self.number("classes")?;
        self.checked("classes", rules::classes(classes))?;
        let base_width = self.number("base_width")?;
        self.checked("base_width", rules::base_width(base_width))?;
        let depth = self.number("depth")?;
        self.checked("depth", rules::depth(depth))?;
        Ok(UNetConfig {
            in_channels,
            classes,
            base_width,
            depth,
        })
    }

    fn window(&self, depth: usize) -> Result<Window> {
        // files written before patch training name only their image size
        let window = match self.optional("window")? {
            Some(w) => w,
            None => Window::Whole {
                size: self.number("image_size")?,
            },
        };
        let (size_key, size, other_key) = match window {
            Window::Whole { size } => ("image_size", size, "patch_size"),
            Window::Sliding { patch, .. } => ("patch_size", patch, "image_size"),
        };
        self.checked(size_key, rules::side(size, depth, "depth"))?;
        if let Window::Sliding { overlap, .. } = window {
            self.checked("window", rules::overlap(overlap))?;
        }
        if self.m.contains_key(size_key) && self.number(size_key)? != size {
            return Err(self.field(size_key, &format!("disagrees with `window` ({size})")));
        }
        if self.m.contains_key(other_key) {
            return Err(self.field(
                other_key,
                &format!("contradicts `window`, which names a {size_key}"),
            ));
        }
        Ok(window)
    }

    fn normalizer(&self, channels: usize) -> Result<Normalizer> {
        let mean: Vec<f64> = self.typed("mean")?;
        self.checked("mean", rules::mean(&mean, channels))?;
        let std: Vec<f64> = self.typed("std")?;
        self.checked("std", rules::std(&std, channels))?;
        // files written before per-image normalisation lack these two: `dataset`, no clipping
        let mode: Normalization = self
            .optional("normalize")?
            .unwrap_or(Normalization::Dataset);
        let clip: Option<[f64; 2]> = self
            .optional::<Option<[f64; 2]>>("clip_percentiles")?
            .flatten();
        if let Some(p) = clip {
            self.checked("clip_percentiles", rules::clip_percentiles(p))?;
        }
        Ok(Normalizer {
            mode,
            clip,
            mean: mean.iter().map(|&v| v as f32).collect(),
            std: std.iter().map(|&v| v as f32).collect(),
        })
    }
}

/// Largest metadata of a model file (keys and values): a model's holds its resolved config and
/// validation metrics, a few KiB.
pub const MAX_METADATA_BYTES: usize = 1 << 20;

/// Largest safetensors header (tensor table and metadata, JSON) of a model file read.
pub const MAX_HEADER_BYTES: u64 = 8 << 20;

/// Refuses a file whose safetensors header is larger than a model's can be, before reading it.
fn check_header_size(path: &Path) -> Result<()> {
    use std::io::Read;
    crate::fsutil::ensure_regular_file(path)?;
    let mut prefix = [0u8; 8];
    let mut file =
        std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    if file.read_exact(&mut prefix).is_ok() {
        let n = u64::from_le_bytes(prefix);
        if n > MAX_HEADER_BYTES {
            bail!(
                "{}: not a valid safetensors file for a model (a header of {n} bytes; a model's is at most {MAX_HEADER_BYTES})",
                path.display()
            );
        }
    }
    Ok(())
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
    let map = meta.to_map()?;
    let bytes: usize = map.iter().map(|(k, v)| k.len() + v.len()).sum();
    if bytes > MAX_METADATA_BYTES {
        bail!(
            "{}: the model's metadata (config and metrics) takes {bytes} bytes, more than {MAX_METADATA_BYTES}",
            path.display()
        );
    }
    write_safetensors(path, tensors, Some(map))
}

/// A model file's tensors and metadata, checked against the architecture its metadata names:
/// every entry of the PyTorch `state_dict`, with the right shape, and nothing else.
/// Every float value is finite and every BatchNorm running variance ≥ 0.
pub fn read(path: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, ModelMeta)> {
    let path = &model_file(path);
    check_header_size(path)?;
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
        if t.dtype().is_float() {
            let values: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                bail!(
                    "{}: `{name}` holds a non-finite weight ({v}): the model is unusable",
                    path.display()
                );
            }
            if name.ends_with(".running_var") && values.iter().any(|v| *v < 0.0) {
                bail!(
                    "{}: `{name}` holds a negative variance: the model is unusable",
                    path.display()
                );
            }
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

/// The model file `path` names: `path` itself, or the `model.safetensors` of a model folder
/// ([`folder`]) or run folder.
pub fn model_file(path: &Path) -> std::path::PathBuf {
    if path.is_dir() {
        path.join(MODEL_FILE)
    } else {
        path.to_path_buf()
    }
}

/// Loads a model file for inference (f32 weights on `device`).
/// Refuses a model whose inference on one image (its `image_size` or `patch_size`) needs more
/// memory than is available (on the CPU).
pub fn load(path: &Path, device: &Device) -> Result<(Box<dyn SegmentationModel>, ModelMeta)> {
    let (tensors, meta) = read(path, device)?;
    let (key, side) = match meta.window {
        Window::Whole { size } => ("image_size", size),
        Window::Sliding { patch, .. } => ("patch_size", patch),
    };
    let need = meta.unet.inference_bytes(1, side);
    // on a GPU the activations live in its memory, whose free size is not known
    let available = device
        .is_cpu()
        .then(crate::memory::available_memory)
        .flatten();
    if let Some(available) = available {
        if need > available as f64 {
            bail!(
                "{}: metadata `{key}` = {side}: predicting one {side}×{side} image with this model needs about {}, more than the {} available",
                path.display(),
                crate::memory::gib(need),
                crate::memory::gib(available as f64)
            );
        }
    }
    let weights: HashMap<String, Tensor> = tensors
        .into_iter()
        .filter(|(_, t)| t.dtype().is_float())
        .map(|(k, t)| Ok((k, t.to_dtype(DType::F32)?)))
        .collect::<candle_core::Result<_>>()?;
    let model = meta
        .kind
        .from_tensors(meta.unet, weights, device)
        .with_context(|| path.display().to_string())?;
    probe(model.as_ref(), &meta, device).with_context(|| path.display().to_string())?;
    Ok((model, meta))
}

/// Refuses a model whose outputs on a mid-grey image of the smallest size it takes are not
/// finite (weights that overflow), rather than letting it predict masks from NaN.
fn probe(model: &dyn SegmentationModel, meta: &ModelMeta, device: &Device) -> Result<()> {
    let (c, side) = (model.in_channels(), model.side_multiple());
    let mut x = vec![0.5f32; c * side * side];
    meta.normalizer.apply(&mut x);
    let x = Tensor::from_vec(x, (1, c, side, side), device)?;
    if model.finite_logits(&x)?.is_none() {
        bail!("the weights give non-finite outputs (NaN or infinite) on a grey test image: the model is unusable");
    }
    Ok(())
}

/// Files a run folder holds besides checkpoints: an export never replaces them.
const RUN_FILES: &[&str] = &[
    ".lock",
    "config.toml",
    "metrics.csv",
    "summary.json",
    "model.safetensors",
];

/// Whether two paths name one existing file.
fn fs_same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Rewrites a model file with its float tensors cast to `dtype` (f32, f16 or bf16).
pub fn convert(src: &Path, dst: &Path, dtype: DType) -> Result<()> {
    let _lock = prepare_out(src, dst)?;
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

/// Writes the model file `src` as an ONNX model ([`onnx::to_onnx`]) to `dst`.
pub fn export_onnx(src: &Path, dst: &Path, opts: onnx::OnnxOptions) -> Result<()> {
    let _lock = prepare_out(src, dst)?;
    let (tensors, meta) = read(src, &Device::Cpu)?;
    crate::fsutil::atomic_write(dst, &onnx::to_onnx(&tensors, &meta, opts)?)
}

/// Checks that an export may write `dst`: never over the model being exported, and into a run
/// folder not while a run writes there nor over the run's own files; removes a killed
/// export's temporaries. Returns the lock of a run folder written into.
fn prepare_out(src: &Path, dst: &Path) -> Result<Option<crate::fsutil::DirLock>> {
    let target = crate::fsutil::target_of(dst)?;
    let folder = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // into a run folder: not while a run writes there, and never over the run's own files;
    // a killed export's temporary goes
    let lock = crate::fsutil::DirLock::acquire_if_locked_folder(folder)?;
    let name = target.file_name().map(|n| n.to_string_lossy().to_string());
    if lock.is_some()
        && name
            .as_deref()
            .is_some_and(|n| n.starts_with("checkpoint") || RUN_FILES.contains(&n))
    {
        bail!(
            "{}: a file of the run in {}; export to another name",
            dst.display(),
            folder.display()
        );
    }
    if target == src || fs_same_file(&target, src) {
        bail!("{}: --out is the model being exported", dst.display());
    }
    crate::fsutil::remove_dead_temporaries(folder)?;
    Ok(lock)
}
