use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use segtrain::config::Config;
use segtrain::data::synth::{SynthConfig, SynthKind};
use segtrain::device::DeviceChoice;
use segtrain::predict::PredictOptions;
use segtrain::train::TrainOptions;

// Training allocates and frees activation-sized buffers every step: mimalloc reuses them
// instead of returning pages to the OS and faulting them in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Semantic segmentation with a U-Net on Candle, trained with imbalance-aware losses.
#[derive(Parser)]
#[command(name = "segtrain", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train the model of a config file; outputs go to runs/<name>/.
    Train(TrainArgs),
    /// Train several loss configs on the same data, split, schedule and seeds; write a table
    /// (report.md, results.csv) and plots. Re-running skips the finished runs.
    Compare {
        /// Experiment configs that differ only in their [[loss]] tables.
        #[arg(required = true)]
        configs: Vec<PathBuf>,
        /// Runs per variant, with seeds seed, seed+1, … (mean ± std in the report).
        #[arg(long, default_value_t = 1)]
        seeds: usize,
        /// Override a key of every config, e.g. --set train.epochs=5.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Train each config once per value, e.g. --sweep loss.0.gamma=0,0.5,1,2,5.
        #[arg(long, value_name = "KEY=V1,V2,...")]
        sweep: Option<String>,
        /// Output folder: report.md, results.csv, plots, runs/.
        #[arg(long, default_value = "runs/compare")]
        out: PathBuf,
        #[arg(long)]
        device: Option<String>,
    },
    /// Metrics of a trained model on a dataset folder.
    Eval {
        #[command(flatten)]
        on: ModelOnData,
        #[command(flatten)]
        inference: InferenceArgs,
    },
    /// Predict masks for images (files or folders of images).
    Predict {
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
    },
    /// Fit a temperature on labelled images (minimum NLL) and store it in the model file;
    /// `predict` and `eval` apply it. Reports ECE and Brier score before and after.
    Calibrate(ModelOnData),
    /// Generate a synthetic medical-style data set (images/ + masks/) with no download.
    Synth(SynthArgs),
    /// Measure a data set (sizes, channels, intensities, foreground share, lesion sizes) and
    /// write a training config chosen from it, each decision commented with its numbers.
    Plan(PlanArgs),
    /// Cut NIfTI/NRRD scans and their label volumes into 2-D slice pairs (images/ + masks/).
    ///
    /// Slices are <volume>_<axis><index:04>.png. Scan and label are reoriented alike to the
    /// canonical orientation LPS by axis permutation and flips (an oblique volume to its nearest
    /// axes) and must then lie on the same grid. Axial slices show the patient's right on the
    /// left and anterior at the top; coronal and sagittal ones superior at the top.
    Import(ImportArgs),
    /// Write a run's best model as safetensors, optionally in half precision.
    Export {
        /// The run folder (runs/<name>).
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "f32")]
        dtype: ExportDType,
    },
    /// Benchmark a training step (default), inference (--infer) or the loss (--loss) on
    /// synthetic tensors; prints one JSON line per measurement.
    Bench(BenchArgs),
    /// Evaluate and inspect the loss registry.
    #[command(subcommand)]
    Loss(LossCommand),
    /// Figures.
    #[command(subcommand)]
    Plot(PlotCommand),
}

#[derive(Subcommand)]
enum PlotCommand {
    /// Loss against p_t for each γ: the focal-loss paper's figure (γ = 0 is cross-entropy).
    FocalCurve {
        #[arg(long, value_delimiter = ',', default_value = "0,0.5,1,2,5")]
        gammas: Vec<f64>,
        /// Output path without extension: <out>.png and <out>.svg are written.
        #[arg(long, default_value = "focal-curve")]
        out: PathBuf,
    },
}

/// How a trained model is applied (eval, predict).
#[derive(clap::Args)]
struct InferenceArgs {
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
    fn inference(self) -> segtrain::predict::Inference {
        segtrain::predict::Inference {
            overlap: self.overlap,
            tta: self.tta,
            min_lesion_pixels: self.min_lesion_pixels,
        }
    }
}

/// A trained model and a labelled data set.
#[derive(clap::Args)]
struct ModelOnData {
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

#[derive(clap::Args)]
struct TrainArgs {
    /// Experiment config (see models/).
    config: PathBuf,
    /// auto | cpu | cuda | cuda:N | metal (overrides train.device).
    #[arg(long)]
    device: Option<String>,
    /// Override a config key by its dotted path, e.g. --set train.epochs=3 --set loss.1.gamma=1.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Continue the run from its last checkpoint.
    #[arg(long)]
    resume: bool,
    /// Replace an existing run of the same name.
    #[arg(long)]
    overwrite: bool,
    /// Folder of the run folders.
    #[arg(long, default_value = "runs")]
    runs: PathBuf,
}

#[derive(clap::Args)]
struct PlanArgs {
    /// The data set: images/ + masks/, or train/ and val/ folders holding both.
    data: PathBuf,
    /// Write the config here (default: print it).
    #[arg(long)]
    out: Option<PathBuf>,
    /// The run's name (default: the data folder's name).
    #[arg(long)]
    name: Option<String>,
    /// Training time to plan for, on this machine.
    #[arg(long, default_value_t = 10.0)]
    budget_minutes: f64,
    /// Seconds of one training update, instead of timing one here.
    #[arg(long)]
    step_seconds: Option<f64>,
}

#[derive(clap::Args)]
struct SynthArgs {
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
}

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("input").required(true).args(["image", "images"])))]
struct ImportArgs {
    /// Scan volume (.nii, .nii.gz, .nrrd or .nhdr).
    #[arg(long, requires = "label")]
    image: Option<PathBuf>,
    /// Label volume of the scan: integer class indices 0..=255 on the scan's grid.
    #[arg(long, requires = "image")]
    label: Option<PathBuf>,
    /// Folder of scans, paired with --labels by volume name (file name without extension).
    #[arg(long, requires = "labels", conflicts_with = "image")]
    images: Option<PathBuf>,
    /// Folder of label volumes.
    #[arg(long, requires = "images")]
    labels: Option<PathBuf>,
    /// Data set folder: images/ and masks/ are created or added to.
    #[arg(long)]
    out: PathBuf,
    /// z: axial, y: coronal, x: sagittal slices.
    #[arg(long, value_enum, default_value = "z")]
    axis: segtrain::import::Axis,
    /// Fixed intensity window LO,HI (CT Hounsfield units, e.g. -1000,400 for lung).
    #[arg(long, value_name = "LO,HI", allow_hyphen_values = true,
          value_parser = segtrain::import::parse_range, conflicts_with = "percentile")]
    window: Option<(f64, f64)>,
    /// Window between these percentiles of each volume (MRI) [default: 0.5,99.5].
    #[arg(long, value_name = "P_LO,P_HI", value_parser = segtrain::import::parse_range)]
    percentile: Option<(f64, f64)>,
    /// Keep only slices whose label has a non-zero voxel (after --every).
    #[arg(long)]
    only_labelled: bool,
    /// Keep every K-th slice (0, K, 2K, …).
    #[arg(long, value_name = "K", default_value_t = 1)]
    every: usize,
    /// Map label values to classes, e.g. 37=1,38=1 (atlas regions merged into class 1); every
    /// other value becomes 0; values above 255 are allowed.
    #[arg(long, value_name = "V=C,...", value_parser = segtrain::import::parse_label_map)]
    label_map: Option<segtrain::import::LabelMap>,
    /// Largest volume read, in voxels [default: 2^28, or SEGTRAIN_IMPORT_MAX_VOXELS].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_voxels: Option<u64>,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    size: usize,
    #[arg(long, default_value_t = 3)]
    channels: usize,
    #[arg(long, default_value_t = 16)]
    base_width: usize,
    #[arg(long, default_value_t = 4)]
    depth: usize,
    /// Timed repetitions (after 2 untimed ones).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Forward pass only, in evaluation mode.
    #[arg(long)]
    infer: bool,
    /// The loss micro-benchmark (focal and Dice + focal, forward + backward) on
    /// (batch, 1, size, size) logits; use --size 256.
    #[arg(long)]
    loss: bool,
    /// Also report the ms per timed step spent in each kernel (`profile` in the JSON line).
    #[arg(long)]
    profile: bool,
    /// fast: the custom CPU kernels; candle: Candle's generic ops.
    #[arg(long, value_enum, default_value = "fast")]
    kernels: KernelChoice,
}

#[derive(Clone, Copy, ValueEnum)]
enum KernelChoice {
    Fast,
    Candle,
}

#[derive(Clone, Copy, ValueEnum)]
enum ExportDType {
    F32,
    F16,
    Bf16,
}

#[derive(Subcommand)]
enum LossCommand {
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

fn open_device(name: &str) -> anyhow::Result<candle_core::Device> {
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(a) => {
            let config = Config::load(&a.config, &a.sets)?;
            let opts = TrainOptions {
                device: a.device,
                resume: a.resume,
                overwrite: a.overwrite,
                runs_dir: a.runs,
                progress: true,
                bars: None,
                stop: stop_on_ctrl_c(),
            };
            let summary = segtrain::train::train(&config, &opts)?;
            println!(
                "best epoch {}: val dice {:.4}, iou {:.4}; {:.1} s/epoch, {:.1} images/s; model: {}",
                summary.best_epoch,
                summary.val.get("dice").unwrap_or(f64::NAN),
                summary.val.get("iou").unwrap_or(f64::NAN),
                summary.seconds_per_epoch,
                summary.images_per_second,
                summary.run_dir.join("model.safetensors").display()
            );
            Ok(())
        }
        Command::Compare {
            configs,
            seeds,
            sets,
            sweep,
            out,
            device,
        } => {
            let report = segtrain::compare::compare(&segtrain::compare::CompareOptions {
                configs,
                seeds,
                overrides: sets,
                sweep,
                out,
                device,
                stop: stop_on_ctrl_c(),
            })?;
            println!("{}", std::fs::read_to_string(&report)?);
            println!("report: {}", report.display());
            Ok(())
        }
        Command::Eval {
            on:
                ModelOnData {
                    model,
                    data,
                    json,
                    device,
                },
            inference,
        } => {
            let device = open_device(&device)?;
            let report =
                segtrain::predict::evaluate(&model, &data, inference.inference(), &device)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "images         {} ({} with a lesion, {} empty)",
                    report.images, report.lesion_images, report.empty_images
                );
                for m in segtrain::metrics::METRICS {
                    match (m.value)(&report) {
                        Some(v) => println!("{:<14} {v:.d$}", m.name, d = m.digits),
                        None => println!("{:<14} -", m.name),
                    }
                }
                if report.dice_per_class.len() > 1 {
                    for (k, d) in report.dice_per_class.iter().enumerate() {
                        println!("dice class {:<3} {d:.4}", k + 1);
                    }
                }
            }
            Ok(())
        }
        Command::Predict {
            model,
            inputs,
            out,
            threshold,
            overlay,
            probabilities,
            inference,
            device,
        } => {
            let device = open_device(&device)?;
            let opts = PredictOptions {
                threshold,
                overlay,
                probabilities,
                inference: inference.inference(),
            };
            let written = segtrain::predict::predict(&model, &inputs, &out, opts, &device)?;
            println!("wrote {} files to {}", written.len(), out.display());
            Ok(())
        }
        Command::Calibrate(ModelOnData {
            model,
            data,
            json,
            device,
        }) => {
            let device = open_device(&device)?;
            let c = segtrain::calibrate::calibrate(&model, &data, &device)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                println!(
                    "temperature  {:.4} (was {:.4}), fitted on {} pixels",
                    c.temperature, c.previous_temperature, c.pixels
                );
                println!("NLL          {:.5} -> {:.5}", c.nll_before, c.nll_after);
                println!("ECE          {:.5} -> {:.5}", c.ece_before, c.ece_after);
                println!("Brier        {:.5} -> {:.5}", c.brier_before, c.brier_after);
                println!("stored in {}", model.display());
            }
            Ok(())
        }
        Command::Plan(a) => {
            let opts = segtrain::plan::PlanOptions {
                name: a.name,
                budget_minutes: a.budget_minutes,
                step_seconds: a.step_seconds,
            };
            let text = segtrain::plan::plan(&a.data, &opts)?;
            match a.out {
                Some(out) => {
                    segtrain::fsutil::atomic_write(&out, text.as_bytes())?;
                    eprintln!("wrote {}", out.display());
                }
                None => print!("{text}"),
            }
            Ok(())
        }
        Command::Synth(a) => {
            let cfg = SynthConfig {
                kind: a.kind,
                count: a.count,
                size: a.size,
                seed: a.seed,
                foreground: a.foreground,
                empty_fraction: a.empty_fraction,
                label_noise: a.label_noise,
                val_count: a.val_count,
            };
            segtrain::data::synth::write_dataset(&cfg, &a.out)?;
            println!(
                "wrote {} {} pairs to {}",
                cfg.count,
                cfg.kind.name(),
                a.out.display()
            );
            Ok(())
        }
        Command::Import(a) => {
            use segtrain::import::{ImportOptions, Intensity};
            let pairs = match (a.image, a.label, a.images, a.labels) {
                (Some(image), Some(label), ..) => vec![(image, label)],
                (.., Some(images), Some(labels)) => {
                    segtrain::import::pair_folders(&images, &labels)?
                }
                _ => anyhow::bail!("give --image and --label, or --images and --labels"),
            };
            let intensity = match (a.window, a.percentile) {
                (Some((lo, hi)), _) => Intensity::Window(lo, hi),
                (None, Some((lo, hi))) => Intensity::Percentile(lo, hi),
                (None, None) => ImportOptions::default().intensity,
            };
            let opts = ImportOptions {
                axis: a.axis,
                intensity,
                only_labelled: a.only_labelled,
                every: a.every,
                label_map: a.label_map,
            };
            let limits = match a.max_voxels {
                Some(max_voxels) => segtrain::import::Limits { max_voxels },
                None => segtrain::import::Limits::from_env()?,
            };
            println!(
                "{}",
                segtrain::import::import_with(&pairs, &a.out, &opts, &limits)?
            );
            Ok(())
        }
        Command::Export { run, out, dtype } => {
            let dtype = match dtype {
                ExportDType::F32 => candle_core::DType::F32,
                ExportDType::F16 => candle_core::DType::F16,
                ExportDType::Bf16 => candle_core::DType::BF16,
            };
            segtrain::export::convert(&run.join("model.safetensors"), &out, dtype)?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Bench(a) => {
            let opts = segtrain::bench::BenchOptions {
                batch: a.batch,
                size: a.size,
                channels: a.channels,
                base_width: a.base_width,
                depth: a.depth,
                steps: a.steps,
                warmup: 2,
                kernels: match a.kernels {
                    KernelChoice::Fast => segtrain::kernels::Kernels::FastCpu,
                    KernelChoice::Candle => segtrain::kernels::Kernels::Candle,
                },
                profile: a.profile,
            };
            segtrain::cpu::profile::enable(a.profile);
            let results = if a.loss {
                segtrain::bench::loss(&opts)?
            } else if a.infer {
                vec![segtrain::bench::inference(&opts)?]
            } else {
                vec![segtrain::bench::train_step(&opts)?]
            };
            for r in results {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }
        Command::Loss(LossCommand::Eval { config, input, out }) => {
            segtrain::cli::loss::eval(&config, &input, &out)
        }
        Command::Plot(PlotCommand::FocalCurve { gammas, out }) => {
            if let Some(g) = gammas.iter().find(|g| !(g.is_finite() && **g >= 0.0)) {
                anyhow::bail!("--gammas: {g} is not a γ >= 0");
            }
            segtrain::report::plot::focal_curve(&out, &gammas)?;
            println!("wrote {0}.png and {0}.svg", out.display());
            Ok(())
        }
        Command::Loss(LossCommand::List) => {
            print!("{}", segtrain::cli::loss::list());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    // a closed pipe (`segtrain eval --json | head`) ends the program quietly, as for other
    // command-line tools, instead of a failed print
    #[cfg(unix)]
    // SAFETY: restores the default disposition of SIGPIPE before any thread starts
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Keep freed pages mapped: every training step frees and reallocates the same buffers, and
    // returning them to the OS costs page faults and zeroing on the next step.
    // `mi_option_purge_delay` (index 15 of mimalloc's option enum, v2 and v3) = -1: never purge.
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a plain option value before the program starts any other thread
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
