//! `segtrain synth`.

use std::path::PathBuf;

use anyhow::Result;

use crate::data::synth::{write_dataset, SynthConfig, SynthKind};

#[derive(clap::Args)]
pub struct Args {
    /// Folder to create (must not exist).
    #[arg(long)]
    out: PathBuf,
    /// lesion: dermoscopy-like RGB; mri: grey slices with ~1 % bright lesions; vessel: thin
    /// structures; multiclass: lesion core + rim (3 classes).
    #[arg(long, value_enum, default_value = "lesion")]
    kind: SynthKind,
    /// Number of image/mask pairs.
    #[arg(long, default_value_t = 200)]
    count: usize,
    /// Side of the square images, in pixels.
    #[arg(long, default_value_t = 128)]
    size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Mean foreground fraction of an image with a lesion (default: lesion 0.12, mri 0.01,
    /// vessel 0.08, multiclass 0.12).
    #[arg(long)]
    foreground: Option<f64>,
    /// Share of images without any lesion.
    #[arg(long, default_value_t = 0.0)]
    empty_fraction: f64,
    /// Share of masks corrupted (dilated, eroded, shifted or dropped).
    #[arg(long, default_value_t = 0.0)]
    label_noise: f64,
    /// Write train/ and val/ folders, the last N images in val/ with clean masks (label
    /// noise then applies to train/ only).
    #[arg(long, default_value_t = 0)]
    val_count: usize,
    /// mri: the largest lesion of an image up to this factor times the smallest (1: equal).
    #[arg(long, default_value_t = 1.0)]
    size_spread: f64,
    /// mri: lesion contrast in (0, 1] (1: bright lesions; small: faint).
    #[arg(long, default_value_t = 1.0)]
    contrast: f64,
}

pub fn run(a: Args) -> Result<()> {
    let cfg = SynthConfig {
        kind: a.kind,
        count: a.count,
        size: a.size,
        seed: a.seed,
        foreground: a.foreground,
        empty_fraction: a.empty_fraction,
        label_noise: a.label_noise,
        val_count: a.val_count,
        size_spread: a.size_spread,
        contrast: a.contrast,
    };
    write_dataset(&cfg, &a.out)?;
    println!(
        "wrote {} {} pairs to {}",
        cfg.count,
        cfg.kind.name(),
        a.out.display()
    );
    Ok(())
}
