//! A self-describing model folder: `model.safetensors`, `config.json` (everything needed to
//! rebuild the network and its pre- and post-processing, without segtrain) and `README.md`, a
//! model card. `predict`, `eval` and `calibrate` take the folder as `--model`.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::json;

use super::{ModelMeta, MODEL_FILE};
use crate::data::Normalization;
use crate::fsutil::atomic_write;
use crate::inference::Window;
use crate::model::Activation;

/// `config.json` of a model folder.
pub fn config_json(meta: &ModelMeta) -> Result<serde_json::Value> {
    let u = &meta.unet;
    let n = &meta.normalizer;
    let labels: serde_json::Map<String, serde_json::Value> = match u.classes {
        1 => [("0", "background"), ("1", "foreground")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect(),
        k => (0..k)
            .map(|c| {
                let name = if c == 0 {
                    "background".into()
                } else {
                    format!("class {c}")
                };
                (c.to_string(), json!(name))
            })
            .collect(),
    };
    Ok(json!({
        "format": super::FORMAT,
        "segtrain_version": env!("CARGO_PKG_VERSION"),
        "architecture": {
            "kind": meta.kind.name(),
            "in_channels": u.in_channels,
            "classes": u.classes,
            "base_width": u.base_width,
            "depth": u.depth,
            "input_side_multiple": 1usize << u.depth,
        },
        "activation": meta.activation.name(),
        "temperature": meta.temperature,
        "normalization": {
            "mode": n.mode,
            "clip_percentiles": n.clip,
            "mean": n.mean,
            "std": n.std,
            "input": "raw intensities in [0, 1] (8-bit / 255), planar C × H × W",
        },
        "window": meta.window,
        "import": meta.slicing,
        "ignore_index": meta.ignore_index,
        "labels": labels,
        "validation": meta.metrics,
    }))
}

/// Writes the model folder `dir` for the model file `src` (of the run folder holding it, whose
/// `summary.json` adds the training figures where present).
pub fn write(src: &Path, dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        bail!("--out {}: exists and is not a folder", dir.display());
    }
    if dir.is_dir() && !is_model_folder(dir) {
        let mut entries =
            std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
        if entries.next().is_some() {
            bail!(
                "--out {}: a folder holding other files (its README.md or config.json would be \
                 replaced); give a new or empty folder, or an earlier model folder to replace",
                dir.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    crate::fsutil::remove_dead_temporaries(dir)?;
    super::convert(src, &dir.join(MODEL_FILE), candle_core::DType::F32)?;
    let (_, meta) = super::read(&dir.join(MODEL_FILE), &candle_core::Device::Cpu)?;
    let config = serde_json::to_string_pretty(&config_json(&meta)?)? + "\n";
    atomic_write(&dir.join("config.json"), config.as_bytes())?;
    let summary = src
        .parent()
        .map(|run| run.join("summary.json"))
        .filter(|p| p.is_file())
        .and_then(|p| crate::fsutil::read_text(&p, crate::fsutil::MAX_TEXT_BYTES, "summary").ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
    atomic_write(
        &dir.join("README.md"),
        card(&meta, summary.as_ref())?.as_bytes(),
    )
}

/// Whether `dir` is a model folder written by [`write`] (its `config.json` names the format).
fn is_model_folder(dir: &Path) -> bool {
    crate::fsutil::read_text(
        &dir.join("config.json"),
        crate::fsutil::MAX_TEXT_BYTES,
        "config",
    )
    .ok()
    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    .is_some_and(|c| c["format"] == super::FORMAT)
}

/// The model card.
fn card(meta: &ModelMeta, summary: Option<&serde_json::Value>) -> Result<String> {
    // the resolved config as a TOML table (export sits below config in the module graph)
    let config: Option<toml::Table> = meta.config.parse().ok();
    let u = &meta.unet;
    let mut s = String::new();
    let get = |path: &[&str]| -> Option<toml::Value> {
        let mut v = toml::Value::Table(config.clone()?);
        for k in path {
            v = v.get(k)?.clone();
        }
        Some(v)
    };
    let text = |path: &[&str]| {
        get(path).map_or("?".to_string(), |v| match v {
            toml::Value::String(s) => s,
            v => v.to_string(),
        })
    };
    let name = text(&["name"]);
    writeln!(s, "# {name}: a segtrain U-Net\n")?;
    writeln!(
        s,
        "A 2-D U-Net (base width {}, depth {}, {} input channel(s), {} output class(es), {} \
         activation) trained with segtrain {}.\n",
        u.base_width,
        u.depth,
        u.in_channels,
        u.classes,
        meta.activation.name(),
        env!("CARGO_PKG_VERSION")
    )?;
    writeln!(s, "## Data\n")?;
    match &config {
        Some(_) => writeln!(
            s,
            "Trained on `{}` ({}).",
            text(&["data", "root"]),
            match meta.window {
                Window::Whole { size } => format!("whole images resized to {size}²"),
                Window::Sliding { patch, overlap, .. } => format!(
                    "patches of {patch}², sliding windows with overlap {overlap} at inference"
                ),
            }
        )?,
        None => writeln!(s, "The training config is not readable by this segtrain.")?,
    }
    if let Some(sl) = &meta.slicing {
        writeln!(
            s,
            "\nIts images are slices cut from NIfTI/NRRD scans by `segtrain import {sl}`; \
             `segtrain predict` cuts new scans the same way."
        )?;
        if sl.context > 0 {
            writeln!(
                s,
                "Its {} input channels are slices z−{k} … z+{k} of the scan around the slice \
                 segmented (2.5-D context; the first or last slice repeats at the ends); as a \
                 PNG, those slices stacked top to bottom.",
                u.in_channels,
                k = sl.context
            )?;
        }
    }
    writeln!(s, "\n## Training\n")?;
    if config.is_some() {
        let losses: Vec<String> = get(&["loss"])
            .and_then(|l| l.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .map(|t| {
                let weight = t.get("weight").map_or("1".to_string(), |w| w.to_string());
                let kind = t.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
                format!("{weight} × {kind}")
            })
            .collect();
        writeln!(
            s,
            "Loss: {}. Optimiser AdamW, learning rate {}, batch size {}, {} epochs planned, seed {}.",
            losses.join(" + "),
            text(&["train", "lr"]),
            text(&["train", "batch_size"]),
            text(&["train", "epochs"]),
            text(&["seed"])
        )?;
    }
    if let Some(sm) = summary {
        writeln!(
            s,
            "Trained {} epochs ({} updates) in {:.1} min on {}; the weights are those of epoch {}.",
            sm["epochs"],
            sm["steps"],
            sm["train_seconds"].as_f64().unwrap_or(0.0) / 60.0,
            sm["device"].as_str().unwrap_or("?"),
            sm["best_epoch"]
        )?;
    }
    writeln!(s, "\n## Validation\n")?;
    writeln!(
        s,
        "Scores of these weights on the held-out images (`val_metrics`): Dice and IoU pooled over \
         all pixels, `lesion_dice` the mean Dice over images with a lesion, HD95 the 95th \
         percentile of boundary distances in pixels, ECE the calibration error.\n"
    )?;
    writeln!(
        s,
        "```json\n{}\n```",
        serde_json::to_string_pretty(&meta.metrics)?
    )?;
    writeln!(s, "\n## Intended use and limits\n")?;
    writeln!(
        s,
        "Research use on images like the training data: same modality, contrast and scale. It \
         was validated only on the split above; it has not been validated for clinical use. \
         It sees one 2-D image (or slice) at a time."
    )?;
    writeln!(s, "\n## Input and output\n")?;
    let n = &meta.normalizer;
    writeln!(
        s,
        "Input: N × {} × H × W float32, raw intensities in [0, 1], H and W multiples of {}. \
         Normalisation: {}{}. Output: N × {} × H × W logits; {} (divided by the temperature {} \
         first).",
        u.in_channels,
        1usize << u.depth,
        match n.mode {
            Normalization::Dataset => format!(
                "x' = (x − mean_c) / std_c, mean {:?}, std {:?}",
                n.mean, n.std
            ),
            Normalization::Image =>
                "x' = (x − mean_c) / max(std_c, 1e-3) over each image channel".into(),
        },
        match n.clip {
            Some([lo, hi]) =>
                format!(", after clamping each channel to its {lo}th–{hi}th percentiles"),
            None => String::new(),
        },
        u.classes,
        match meta.activation {
            Activation::Sigmoid => "sigmoid per class, foreground where p > 0.5",
            Activation::Softmax => "softmax over the classes, label = argmax",
        },
        meta.temperature
    )?;
    writeln!(s, "\n## Loading it\n")?;
    writeln!(
        s,
        "segtrain: `segtrain predict --model THIS_FOLDER images/ --out masks/`.\n\n\
         PyTorch (the `UNet` module of segtrain's README, section \"The model and PyTorch\"):\n\n\
         ```python\nfrom safetensors.torch import load_file\n\
         net = UNet({}, {}, f={}, d={})\n\
         net.load_state_dict(load_file(\"model.safetensors\"), strict=True)\nnet.eval()\n```\n\n\
         ONNX Runtime (`segtrain export --run RUN --format onnx --with-activation --out model.onnx`):\n\n\
         ```python\nimport onnxruntime as ort\n\
         session = ort.InferenceSession(\"model.onnx\")\n\
         probabilities = session.run(None, {{\"image\": x}})[0]  # x: N×{}×H×W float32 in [0, 1]\n```",
        u.in_channels,
        u.classes,
        u.base_width,
        u.depth,
        u.in_channels
    )?;
    Ok(s)
}
