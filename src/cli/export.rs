//! `segtrain export`.

use std::path::PathBuf;

use anyhow::Result;
use candle_core::DType;
use clap::ValueEnum;

#[derive(clap::Args)]
pub struct Args {
    /// The run folder (runs/<name>).
    #[arg(long)]
    run: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: ExportDType,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportDType {
    F32,
    F16,
    Bf16,
}

pub fn run(a: Args) -> Result<()> {
    let dtype = match a.dtype {
        ExportDType::F32 => DType::F32,
        ExportDType::F16 => DType::F16,
        ExportDType::Bf16 => DType::BF16,
    };
    crate::export::convert(&a.run.join("model.safetensors"), &a.out, dtype)?;
    println!("wrote {}", a.out.display());
    Ok(())
}
