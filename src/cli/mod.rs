//! The command line: one module per subcommand, each holding its arguments and its printing;
//! `main.rs` only parses and dispatches.

pub mod bench;
pub mod calibrate;
pub mod compare;
pub mod eval;
pub mod export;
pub mod import;
pub mod loss;
pub mod plan;
pub mod plot;
pub mod predict;
pub mod score;
pub mod synth;
pub mod train;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::device::DeviceChoice;

/// Semantic segmentation with a U-Net on Candle, trained with imbalance-aware losses.
#[derive(Parser)]
#[command(name = "segtrain", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Train the model of a config file; outputs go to runs/<name>/.
    Train(train::Args),
    /// Train several loss configs on the same data, split, schedule and seeds; write a table
    /// (report.md, results.csv) and plots. Re-running skips the finished runs.
    Compare(compare::Args),
    /// Metrics of a trained model on a dataset folder, or on scans and their label volumes
    /// (--volumes: per-volume Dice, HD95 in mm, mL, lesion-wise detection).
    Eval(eval::Args),
    /// Predict masks for images, and label volumes (<volume>_seg.nii.gz, on the scan's own
    /// voxel grid) for NIfTI/NRRD scans (files or folders of them).
    Predict(predict::Args),
    /// Compare predicted masks with true ones (two folders of PNG masks matched by stem, or
    /// label volumes): Dice, IoU, HD95 per image and pooled, and lesion-wise detection.
    Score(score::Args),
    /// Fit a temperature on labelled images (minimum NLL) and store it in the model file;
    /// `predict` and `eval` apply it. Reports ECE and Brier score before and after.
    Calibrate(ModelOnData),
    /// Generate a synthetic medical-style data set (images/ + masks/) with no download.
    Synth(synth::Args),
    /// Measure a data set (sizes, channels, intensities, foreground share, lesion sizes) and
    /// write a training config chosen from it, each decision commented with its numbers.
    Plan(plan::Args),
    /// Cut NIfTI/NRRD scans and their label volumes into 2-D slice pairs (images/ + masks/).
    ///
    /// Slices are <volume>_<axis><index:04>.png. Scan and label are reoriented alike to the
    /// canonical orientation LPS by axis permutation and flips (an oblique volume to its nearest
    /// axes) and must then lie on the same grid. Axial slices show the patient's right on the
    /// left and anterior at the top; coronal and sagittal ones superior at the top.
    Import(import::Args),
    /// Write a run's best model as safetensors, optionally in half precision.
    Export(export::Args),
    /// Benchmark a training step (default), inference (--infer) or the loss (--loss) on
    /// synthetic tensors; prints one JSON line per measurement.
    Bench(bench::Args),
    /// Evaluate and inspect the loss registry.
    #[command(subcommand)]
    Loss(loss::Command),
    /// Figures.
    #[command(subcommand)]
    Plot(plot::Command),
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train(a) => train::run(a),
        Command::Compare(a) => compare::run(a),
        Command::Eval(a) => eval::run(a),
        Command::Predict(a) => predict::run(a),
        Command::Score(a) => score::run(a),
        Command::Calibrate(a) => calibrate::run(a),
        Command::Synth(a) => synth::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Import(a) => import::run(a),
        Command::Export(a) => export::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Loss(c) => loss::run(c),
        Command::Plot(c) => plot::run(c),
    }
}

/// How a trained model is applied (eval, predict).
#[derive(clap::Args)]
pub struct InferenceArgs {
    /// Sliding-window overlap (patch-trained models; default: the model's).
    #[arg(long)]
    overlap: Option<f64>,
    /// Test-time augmentation: average the probabilities over the flips and 90° rotations the
    /// model was trained with.
    #[arg(long)]
    tta: bool,
    /// Remove predicted lesions smaller than N pixels (default: the model's
    /// data.min_lesion_pixels; 0 keeps all).
    #[arg(long, value_name = "N")]
    min_lesion_pixels: Option<usize>,
}

impl InferenceArgs {
    /// The options as the library takes them (which checks them).
    fn inference(self) -> crate::predict::Inference {
        crate::predict::Inference {
            overlap: self.overlap,
            tta: self.tta,
            min_lesion_pixels: self.min_lesion_pixels,
        }
    }
}

/// How scans are cut into 2-D slices (import; predict, where they override the model's
/// record of its import).
#[derive(clap::Args)]
pub struct SlicingArgs {
    /// z: axial, y: coronal, x: sagittal slices [import: default z; predict: default the axis
    /// the model's data were imported along].
    #[arg(long, value_enum)]
    axis: Option<crate::import::Axis>,
    /// Fixed intensity window LO,HI (CT Hounsfield units, e.g. -1000,400 for lung).
    #[arg(long, value_name = "LO,HI", allow_hyphen_values = true,
          value_parser = crate::import::parse_range, conflicts_with = "percentile")]
    window: Option<(f64, f64)>,
    /// Window between these percentiles of each volume (MRI) [import: default 0.5,99.5;
    /// predict: default the model's import setting].
    #[arg(long, value_name = "P_LO,P_HI", value_parser = crate::import::parse_range)]
    percentile: Option<(f64, f64)>,
}

impl SlicingArgs {
    /// The choices given (`None` where a flag is absent).
    fn choice(&self) -> crate::predict::volume::SlicingChoice {
        use crate::import::Intensity;
        crate::predict::volume::SlicingChoice {
            axis: self.axis,
            intensity: match (self.window, self.percentile) {
                (Some((lo, hi)), _) => Some(Intensity::Window(lo, hi)),
                (None, Some((lo, hi))) => Some(Intensity::Percentile(lo, hi)),
                (None, None) => None,
            },
        }
    }
}

/// A trained model and a labelled data set.
#[derive(clap::Args)]
pub struct ModelOnData {
    /// model.safetensors written by `train` or `export`.
    #[arg(long)]
    model: PathBuf,
    /// Dataset folder (images/ + masks/, or its val/ split).
    #[arg(long)]
    data: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = "auto")]
    device: String,
}

fn open_device(name: &str) -> Result<candle_core::Device> {
    let (device, description) = DeviceChoice::parse(name)?.open()?;
    eprintln!("device: {description}");
    Ok(device)
}

/// Ctrl-C sets the returned flag, with which training finishes the current update, writes a
/// checkpoint and stops; a second one stops at once.
fn stop_on_ctrl_c() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nstopping after this update (Ctrl-C again to stop now)");
    });
    stop
}
