//! `segtrain loss eval` and `segtrain loss list`.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use candle_core::{DType, Device, Var};

use crate::fsutil::{read_safetensors, write_safetensors};
use crate::loss::{Loss, REGISTRY};

#[derive(clap::Subcommand)]
pub enum Command {
    /// Evaluate the [[loss]] tables of a config on tensors `logits` and `target` of a
    /// safetensors file; write `loss`, `grad` and `term.<i>` to another.
    Eval {
        /// A training config or a file with only [[loss]] tables.
        #[arg(long)]
        config: PathBuf,
        /// safetensors file holding `logits` (N, C, H, W) and `target`.
        #[arg(long)]
        input: PathBuf,
        /// safetensors file to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// List the loss kinds.
    List,
}

pub fn run(c: Command) -> Result<()> {
    match c {
        Command::Eval { config, input, out } => eval(&config, &input, &out),
        Command::List => {
            print!("{}", list());
            Ok(())
        }
    }
}

/// Evaluates the `[[loss]]` tables of `config` on the `logits` and `target` tensors of `input`
/// and writes `loss` (f32, shape []), `grad` (d loss / d logits) and `term.<i>` (each term's
/// unweighted value) to `out`.
pub fn eval(config: &Path, input: &Path, out: &Path) -> Result<()> {
    let text = crate::fsutil::read_text(config, crate::fsutil::MAX_TEXT_BYTES, "config")?;
    let loss = Loss::from_toml_str(&text).with_context(|| config.display().to_string())?;
    let (tensors, _) = read_safetensors(input, &Device::Cpu)?;
    let get = |name: &str| {
        tensors
            .get(name)
            .cloned()
            .ok_or_else(|| anyhow!("{}: no tensor named `{name}`", input.display()))
    };
    let (logits, target) = (get("logits")?, get("target")?);
    if !logits.dtype().is_float() {
        anyhow::bail!("{}: `logits` must be a float tensor", input.display());
    }
    let logits = Var::from_tensor(&logits.to_dtype(DType::F32)?)?;
    let value = loss
        .forward(logits.as_tensor(), &target)
        .with_context(|| format!("{} on {}", config.display(), input.display()))?;
    let grads = value.total.backward()?;
    let grad = grads
        .get(logits.as_tensor())
        .cloned()
        .map_or_else(|| logits.as_tensor().zeros_like(), Ok)?;
    let mut outputs = vec![
        ("loss".to_string(), value.total.to_dtype(DType::F32)?),
        ("grad".to_string(), grad.to_dtype(DType::F32)?),
    ];
    for (i, term) in value.terms.iter().enumerate() {
        outputs.push((format!("term.{i}"), term.to_dtype(DType::F32)?));
    }
    write_safetensors(out, &outputs, None)
}

/// One line per registered loss kind.
pub fn list() -> String {
    REGISTRY
        .iter()
        .map(|k| format!("{:<20} {}\n", k.name, k.summary))
        .collect()
}
