//! `segtrain export`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::DType;
use clap::ValueEnum;

use crate::export::onnx::OnnxOptions;

#[derive(clap::Args)]
pub struct Args {
    /// The run folder (runs/<name>).
    #[arg(long)]
    run: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// safetensors: the model file (PyTorch state_dict + metadata); onnx: an ONNX graph (input
    /// `image` N×C×H×W in [0, 1], H and W multiples of 2^depth); folder: --out becomes a model
    /// folder (model.safetensors, config.json, README.md model card) that --model accepts.
    #[arg(long, value_enum, default_value = "safetensors")]
    format: Format,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ExportDType,
    /// ONNX opset (13..=21).
    #[arg(long, default_value_t = OnnxOptions::default().opset)]
    opset: i64,
    /// ONNX: end with the model's sigmoid/softmax (output `probabilities`, temperature
    /// applied) instead of `logits`.
    #[arg(long)]
    with_activation: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Safetensors,
    Onnx,
    Folder,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportDType {
    F32,
    F16,
    Bf16,
}

pub fn run(a: Args) -> Result<()> {
    let model = a.run.join("model.safetensors");
    match a.format {
        Format::Safetensors => {
            if a.with_activation {
                bail!("--with-activation is for --format onnx (a model file keeps its activation in its metadata)");
            }
            let dtype = match a.dtype {
                ExportDType::F32 => DType::F32,
                ExportDType::F16 => DType::F16,
                ExportDType::Bf16 => DType::BF16,
            };
            crate::export::convert(&model, &a.out, dtype)?;
        }
        Format::Folder => {
            if a.with_activation || !matches!(a.dtype, ExportDType::F32) {
                bail!("--format folder writes the f32 model as trained; --dtype and --with-activation do not apply");
            }
            crate::export::folder::write(&model, &a.out)?;
        }
        Format::Onnx => {
            let half = match a.dtype {
                ExportDType::F32 => false,
                ExportDType::F16 => true,
                ExportDType::Bf16 => bail!("--format onnx writes f32 or f16, not bf16"),
            };
            let opts = OnnxOptions {
                opset: a.opset,
                activation: a.with_activation,
                half,
            };
            crate::export::export_onnx(&model, &a.out, opts)?;
        }
    }
    println!("wrote {}", a.out.display());
    Ok(())
}
