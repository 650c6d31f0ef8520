//! `segtrain predict`.

use std::path::PathBuf;

use anyhow::Result;

use super::InferenceArgs;
use crate::predict::PredictOptions;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: PathBuf,
    /// Image files or folders.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Output folder (created).
    #[arg(long)]
    out: PathBuf,
    /// Foreground threshold on the probability (binary models).
    #[arg(long, default_value_t = 0.5)]
    threshold: f64,
    /// Also write the image with the mask outline (<stem>_overlay.png).
    #[arg(long)]
    overlay: bool,
    /// Also write 16-bit probability maps (<stem>_prob.png = round(p·65535)).
    #[arg(long)]
    probabilities: bool,
    #[command(flatten)]
    inference: InferenceArgs,
    #[arg(long, default_value = "auto")]
    device: String,
}

pub fn run(a: Args) -> Result<()> {
    let device = super::open_device(&a.device)?;
    let opts = PredictOptions {
        threshold: a.threshold,
        overlay: a.overlay,
        probabilities: a.probabilities,
        inference: a.inference.inference(),
    };
    let written = crate::predict::predict(&a.model, &a.inputs, &a.out, opts, &device)?;
    println!("wrote {} files to {}", written.len(), a.out.display());
    Ok(())
}
