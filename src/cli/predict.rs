//! `segtrain predict`.

use std::path::PathBuf;

use anyhow::Result;

use super::InferenceArgs;
use crate::predict::PredictOptions;

#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    model: PathBuf,
    /// Image files (.png, .jpg), scans (.nii, .nii.gz, .nrrd, .nhdr) or folders of them. A
    /// scan gives <volume>_seg.nii.gz on its own voxel grid (uint8 labels).
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
    /// Also write probability maps: 16-bit <stem>_prob.png = round(p·65535) for an image,
    /// float32 <volume>_prob.nii.gz for a scan (_prob_c<k> per class of a multi-class model).
    #[arg(long)]
    probabilities: bool,
    #[command(flatten)]
    inference: InferenceArgs,
    /// How scans are cut (default: as the model's training data were imported).
    #[command(flatten)]
    slicing: super::SlicingArgs,
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
        slicing: a.slicing.choice(),
    };
    let predicted = crate::predict::predict(&a.model, &a.inputs, &a.out, opts, &device)?;
    if let Some(note) = predicted.note {
        eprintln!("note: {note}");
    }
    println!(
        "wrote {} files to {}",
        predicted.written.len(),
        a.out.display()
    );
    Ok(())
}
