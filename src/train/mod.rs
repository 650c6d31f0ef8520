//! The training loop: AdamW with warm-up and a schedule, global-norm gradient clipping,
//! validation every epoch, the best model exported, checkpoints to resume from.
//!
//! A run writes to `runs/<name>/`: `config.toml` (resolved), `metrics.csv` (a row per epoch),
//! `checkpoint.safetensors` (+ the previous one), `model.safetensors` (the best epoch by
//! `train.select_by`) and `summary.json`. Every file is replaced atomically.

pub mod optim;
pub mod schedule;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

use crate::config::{Config, DataConfig, NonFinite, Precision, Selection};
use crate::data::loader::{epoch_batches, mix_seed, BatchRecipe, Crop, TrainLoader};
use crate::data::Dataset;
use crate::device::DeviceChoice;
use crate::export::{self, ModelMeta};
use crate::fsutil::{
    atomic_write, read_safetensors, remove_dead_temporaries, write_safetensors, DirLock,
};
use crate::inference::{Predictor, Symmetry, Window};
use crate::loss::{Loss, PositivesAverage};
use crate::metrics::{Report, Scores};
use crate::model::{self, is_trainable, UNet, UNetConfig};
use optim::AdamW;

/// Set (by a Ctrl-C handler) to stop training after the current update with a checkpoint.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// How to run a training job, beyond its config.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Overrides `train.device`.
    pub device: Option<String>,
    /// Continue the run in the run folder from its last checkpoint.
    pub resume: bool,
    /// Replace whatever the run folder holds.
    pub overwrite: bool,
    /// Parent of the run folders (`runs`).
    pub runs_dir: PathBuf,
    /// Show progress bars (they are hidden anyway when stderr is not a terminal).
    pub progress: bool,
    /// Draw the epoch bar below these (a comparison's overall bar) and print through them.
    pub bars: Option<MultiProgress>,
}

impl TrainOptions {
    /// Runs `print` (that prints) with the progress bars out of the way.
    fn suspend(&self, print: impl FnOnce()) {
        match &self.bars {
            Some(bars) => bars.suspend(print),
            None => print(),
        }
    }
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            device: None,
            resume: false,
            overwrite: false,
            runs_dir: PathBuf::from("runs"),
            progress: true,
            bars: None,
        }
    }
}

/// The outcome of a run (`summary.json`): the validation metrics of the selected epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub name: String,
    pub best_epoch: usize,
    /// The registry's metrics of that epoch, as `val_<name>` keys.
    #[serde(flatten)]
    pub val: Scores,
    pub selected_by: Selection,
    pub epochs: usize,
    pub steps: u64,
    pub train_seconds: f64,
    pub seconds_per_epoch: f64,
    pub images_per_second: f64,
    pub skipped_batches: u64,
    pub device: String,
    /// The validation images (file stems), for comparisons on the same split.
    pub val_images: Vec<String>,
    pub run_dir: PathBuf,
}

/// One row of `metrics.csv`.
#[derive(Debug, Clone)]
struct EpochRow {
    epoch: usize,
    lr: f64,
    loss: f64,
    terms: Vec<f64>,
    val: Scores,
    /// Pooled Dice of each scored class (columns only for more than one).
    dice_per_class: Vec<f64>,
    seconds: f64,
    images_per_second: f64,
}

/// Everything a checkpoint restores besides tensors.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
struct Progress {
    /// The epoch in progress (0-based) and the next batch within it.
    epoch: usize,
    batch: usize,
    /// Optimiser updates so far (also the BatchNorm `num_batches_tracked`).
    step: u64,
    /// The `train.select_by` score of the best epoch so far (None: undefined there).
    #[serde(rename = "best_dice")]
    best_score: Option<f64>,
    /// 0 before the first epoch is validated.
    best_epoch: usize,
    train_seconds: f64,
    skipped: u64,
    /// Sums over the batches of the epoch in progress: loss, each term, images, seconds.
    epoch_loss: f64,
    epoch_terms: Vec<f64>,
    epoch_images: usize,
    epoch_seconds: f64,
    mean: Vec<f32>,
    std: Vec<f32>,
    /// f16 training's dynamic loss scale (None otherwise).
    loss_scale: Option<LossScale>,
    /// The running positives per batch of `normalize = "positives"` terms.
    #[serde(default)]
    positives: PositivesAverage,
}

/// Dynamic loss scaling for f16 (PyTorch's `GradScaler`): the loss is multiplied by `scale`
/// before the backward pass, so that small gradients stay above f16's smallest normal
/// (6·10⁻⁵), and the gradients are divided by it. A non-finite gradient halves the scale and
/// skips the update; `GROWTH_INTERVAL` finite updates in a row double it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct LossScale {
    scale: f64,
    finite_run: u64,
}

impl LossScale {
    const INITIAL: f64 = 65536.0;
    const GROWTH_INTERVAL: u64 = 2000;

    fn finite(&mut self) {
        self.finite_run += 1;
        if self.finite_run == Self::GROWTH_INTERVAL {
            self.scale *= 2.0;
            self.finite_run = 0;
        }
    }

    fn overflow(&mut self) {
        self.scale = (self.scale / 2.0).max(1.0);
        self.finite_run = 0;
    }
}

const CHECKPOINT: &str = "checkpoint.safetensors";
/// The lock file of a run folder ([`DirLock`]).
const LOCK: &str = ".lock";
const PREVIOUS_CHECKPOINT: &str = "checkpoint.prev.safetensors";
const CHECKPOINT_FORMAT: &str = "segtrain-checkpoint/1";

/// Trains the model of `config` and returns the run's summary.
pub fn train(config: &Config, opts: &TrainOptions) -> Result<Summary> {
    let loss = config.loss()?;
    let choice = DeviceChoice::parse(opts.device.as_deref().unwrap_or(&config.train.device))?;
    let (device, device_name) = choice.open()?;
    crate::config::check_training_memory(config, &device)?;
    let run_dir = opts.runs_dir.join(&config.name);
    let resolved = config.to_toml()?;
    // held until training returns: a second writer of this folder is refused, not mixed in
    let _lock = DirLock::acquire(&run_dir)?;
    let checkpoints = prepare_run_dir(&run_dir, &resolved, opts)?;
    opts.suspend(|| eprintln!("device: {device_name}"));

    let dataset = Dataset::open(&config.data, config.seed)?;
    let unet = config.unet();
    let prior = (config.model.prior > 0.0).then_some(config.model.prior);
    let (model, vars) = model::init(unet, prior, config.seed, &device)?;
    let params = trainable(&vars);
    let mut optimizer = AdamW::new(params, config.train.weight_decay)?;
    let precision = config.train.precision;
    let mut progress = Progress {
        mean: dataset.mean.clone(),
        std: dataset.std.clone(),
        loss_scale: (precision == Precision::F16).then_some(LossScale {
            scale: LossScale::INITIAL,
            finite_run: 0,
        }),
        ..Progress::default()
    };
    if !checkpoints.is_empty() {
        progress = load_newest_checkpoint(&checkpoints, &vars, &mut optimizer, &device, opts)?;
        if progress.mean != dataset.mean || progress.std != dataset.std {
            bail!(
                "{}: the data set changed since the checkpoint was written",
                run_dir.display()
            );
        }
        opts.suspend(|| {
            eprintln!(
                "resuming {} at epoch {}, batch {} (update {})",
                run_dir.display(),
                progress.epoch + 1,
                progress.batch,
                progress.step
            )
        });
    } else {
        atomic_write(&run_dir.join("config.toml"), resolved.as_bytes())?;
    }
    let mut rows = read_metrics(&run_dir, progress.epoch)?;

    let ignore = dataset.format.ignore_mask_value();
    let d = &config.data;
    let crop = match d.patch_size {
        Some(size) => Crop::Patch {
            size,
            foreground: d.foreground_fraction,
        },
        None => Crop::Whole,
    };
    let train_recipe = BatchRecipe::new(
        dataset.train.clone(),
        dataset.format.channels,
        crop,
        (dataset.mean.clone(), dataset.std.clone()),
        Some(d.augment.clone()),
        ignore,
    );
    let window = window_of(d);
    let t = &config.train;
    let per_epoch = t
        .steps_per_epoch
        .unwrap_or(dataset.train.len().div_ceil(t.batch_size));
    let total_steps = per_epoch * t.epochs;
    let warmup = (t.warmup_epochs * per_epoch as f64).round() as usize;
    let activation = config.activation();
    let meta = |metrics: &Report| -> Result<ModelMeta> {
        Ok(ModelMeta {
            unet,
            window,
            activation,
            mean: dataset.mean.clone(),
            std: dataset.std.clone(),
            ignore_index: config.data.ignore_index,
            temperature: 1.0,
            config: resolved.clone(),
            metrics: serde_json::to_value(metrics)?,
        })
    };

    let mode = match window {
        Window::Whole { size } => format!("whole images resized to {size}^2"),
        Window::Sliding { patch, .. } => format!("{patch}^2 patches, sliding-window validation"),
    };
    opts.suspend(|| {
        eprintln!(
            "{}: {} training / {} validation images, {mode}; {} epochs of {per_epoch} updates",
            config.name,
            dataset.train.len(),
            dataset.val.len(),
            t.epochs
        )
    });
    let term_names: Vec<&str> = loss.terms.iter().map(|t| t.kind).collect();
    while progress.epoch < t.epochs {
        let epoch = progress.epoch;
        let batches = epoch_batches(
            dataset.train.len(),
            t.batch_size,
            config.seed,
            epoch,
            t.steps_per_epoch,
        );
        let loader = TrainLoader::new(
            train_recipe.clone(),
            batches,
            progress.batch,
            mix_seed(config.seed, epoch as u64),
            config.data.workers,
        );
        let bar = progress_bar(opts, per_epoch, progress.batch, epoch, t.epochs);
        if progress.epoch_terms.len() != term_names.len() {
            progress.epoch_terms = vec![0.0; term_names.len()];
        }
        let mut lr = 0.0;
        for batch in loader {
            let started = Instant::now();
            let (images, masks) = batch?;
            let n = images.dim(0)?;
            lr = schedule::learning_rate(
                t.schedule,
                t.lr,
                progress.step as usize,
                total_steps,
                warmup,
            );
            let outcome = train_step(
                &model,
                &loss,
                &mut optimizer,
                (&images.to_device(&device)?, &masks.to_device(&device)?),
                (lr, t.grad_clip),
                precision.dtype(),
                progress.loss_scale.as_mut(),
                &mut progress.positives,
            );
            let at = format!("epoch {}, update {}", epoch + 1, progress.step + 1);
            match outcome.with_context(|| at.clone())? {
                StepOutcome::Done { loss: value, terms } => {
                    progress.step += 1;
                    progress.epoch_loss += value * n as f64;
                    for (s, v) in progress.epoch_terms.iter_mut().zip(&terms) {
                        *s += v * n as f64;
                    }
                    progress.epoch_images += n;
                }
                StepOutcome::Overflow => {}
                StepOutcome::NonFinite(what) => match t.on_non_finite {
                    NonFinite::Error => bail!(
                        "{at}: {what}; the last checkpoint in {} is kept (train.on_non_finite = \"skip\" skips such batches)",
                        run_dir.display()
                    ),
                    NonFinite::Skip => {
                        progress.skipped += 1;
                        bar.suspend(|| eprintln!("{at}: {what}; batch skipped"));
                    }
                },
            }
            progress.batch += 1;
            let seconds = started.elapsed().as_secs_f64();
            progress.epoch_seconds += seconds;
            progress.train_seconds += seconds;
            bar.set_position(progress.batch as u64);
            bar.set_message(running_message(&progress, &term_names));
            if t.checkpoint_every > 0
                && progress.step.is_multiple_of(t.checkpoint_every as u64)
                && progress.batch < per_epoch
            {
                save_checkpoint(&run_dir, &vars, &optimizer, &progress, &resolved)?;
            }
            if STOP.load(Ordering::SeqCst) && progress.batch < per_epoch {
                save_checkpoint(&run_dir, &vars, &optimizer, &progress, &resolved)?;
                bar.finish_and_clear();
                bail!(interrupted(&run_dir, &progress));
            }
        }
        bar.finish_and_clear();

        let eval_model = detached_model(&vars, unet, &device)?;
        let predictor = Predictor {
            model: &eval_model,
            activation,
            temperature: 1.0,
            window,
            mean: &dataset.mean,
            std: &dataset.std,
            batch: t.batch_size,
            device: &device,
            tta: if t.val_tta {
                Symmetry::seen_in_training(d.augment.flip, d.augment.rotate90)
            } else {
                vec![]
            },
            min_lesion_pixels: d.min_lesion_pixels,
        };
        let report = predictor.evaluate(&dataset.val, ignore)?.report();
        let images = progress.epoch_images.max(1) as f64;
        let row = EpochRow {
            epoch: epoch + 1,
            lr,
            loss: progress.epoch_loss / images,
            terms: progress.epoch_terms.iter().map(|s| s / images).collect(),
            val: Scores::of(&report),
            dice_per_class: report.dice_per_class.clone(),
            seconds: progress.epoch_seconds,
            images_per_second: progress.epoch_images as f64 / progress.epoch_seconds.max(1e-9),
        };
        let line = epoch_line(&row, &report, t.epochs, &term_names);
        opts.suspend(|| println!("{line}"));
        rows.push(row);
        write_metrics(&run_dir, &rows, &term_names)?;
        let score = t.select_by.metric().selection_score(&report);
        if improves(t.select_by, score, &progress) {
            progress.best_score = score;
            progress.best_epoch = epoch + 1;
            let weights = export::state_dict(&unet, &vars, progress.step, DType::F32)?;
            export::save(
                &run_dir.join("model.safetensors"),
                &weights,
                &meta(&report)?,
            )?;
        }
        progress.epoch += 1;
        progress.batch = 0;
        progress.epoch_loss = 0.0;
        progress.epoch_terms = vec![0.0; term_names.len()];
        progress.epoch_images = 0;
        progress.epoch_seconds = 0.0;
        save_checkpoint(&run_dir, &vars, &optimizer, &progress, &resolved)?;
        if STOP.load(Ordering::SeqCst) && progress.epoch < t.epochs {
            bail!(interrupted(&run_dir, &progress));
        }
    }

    let best = rows
        .iter()
        .find(|r| r.epoch == progress.best_epoch)
        .ok_or_else(|| anyhow!("metrics.csv lacks the best epoch {}", progress.best_epoch))?;
    let images: f64 = rows.iter().map(|r| r.images_per_second * r.seconds).sum();
    let seconds: f64 = rows.iter().map(|r| r.seconds).sum();
    let summary = Summary {
        name: config.name.clone(),
        best_epoch: progress.best_epoch,
        val: best.val.clone(),
        selected_by: t.select_by,
        epochs: t.epochs,
        steps: progress.step,
        train_seconds: progress.train_seconds,
        seconds_per_epoch: seconds / rows.len().max(1) as f64,
        images_per_second: images / seconds.max(1e-9),
        skipped_batches: progress.skipped,
        device: device_name,
        val_images: dataset.val.iter().map(|s| s.stem.clone()).collect(),
        run_dir: run_dir.clone(),
    };
    atomic_write(
        &run_dir.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    Ok(summary)
}

/// How validation covers an image: the config's patch (sliding window) or image size.
pub fn window_of(d: &DataConfig) -> Window {
    match (d.patch_size, d.image_size) {
        (Some(patch), _) => Window::Sliding {
            patch,
            overlap: d.overlap,
            blend: d.blend,
        },
        (None, Some(size)) => Window::Whole { size },
        (None, None) => unreachable!("validated: image_size or patch_size"),
    }
}

/// Whether an epoch of `train.select_by` score `score` replaces the best so far: the first
/// validated epoch does; later ones by a strictly better score, a defined score beating an
/// undefined one.
fn improves(select_by: Selection, score: Option<f64>, p: &Progress) -> bool {
    if p.best_epoch == 0 {
        return true;
    }
    match (score, p.best_score) {
        (Some(score), Some(best)) => select_by.metric().better.prefers(score, best),
        (score, best) => score.is_some() && best.is_none(),
    }
}

fn interrupted(run_dir: &Path, p: &Progress) -> String {
    format!(
        "interrupted after update {} (epoch {}); the checkpoint in {} is saved: continue with `segtrain train CONFIG --resume` (same config and --set overrides)",
        p.step,
        p.epoch + 1,
        run_dir.display()
    )
}

enum StepOutcome {
    Done {
        loss: f64,
        terms: Vec<f64>,
    },
    /// What was not finite: a loss term or the gradient.
    NonFinite(String),
    /// f16: the scaled gradient overflowed; the scale is halved and the update skipped.
    Overflow,
}

/// Forward (in `dtype`), loss, backward, clipping and one AdamW update.
#[allow(clippy::too_many_arguments)]
fn train_step(
    model: &UNet,
    loss: &Loss,
    optimizer: &mut AdamW,
    (images, masks): (&Tensor, &Tensor),
    (lr, grad_clip): (f64, Option<f64>),
    dtype: DType,
    loss_scale: Option<&mut LossScale>,
    positives: &mut PositivesAverage,
) -> Result<StepOutcome> {
    let logits = model.forward_in(images, true, dtype)?;
    let value = loss.forward_training(&logits, masks, positives)?;
    let scalar = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?) };
    let terms = value.terms.iter().map(scalar).collect::<Result<Vec<_>>>()?;
    if let Some(i) = terms.iter().position(|v| !v.is_finite()) {
        let term = &loss.terms[i];
        return Ok(StepOutcome::NonFinite(format!(
            "loss term {i} (`{}`) is {}",
            term.kind, terms[i]
        )));
    }
    let total = scalar(&value.total)?;
    let factor = loss_scale.as_ref().map_or(1.0, |s| s.scale);
    let grads = if factor == 1.0 {
        value.total.backward()?
    } else {
        (&value.total * factor)?.backward()?
    };
    let norm = optimizer.grad_norm(&grads)? / factor;
    if !norm.is_finite() {
        if let Some(s) = loss_scale {
            s.overflow();
            return Ok(StepOutcome::Overflow);
        }
        return Ok(StepOutcome::NonFinite(format!(
            "the gradient norm is {norm}"
        )));
    }
    let clip = match grad_clip {
        Some(c) if norm > c => c / (norm + 1e-6),
        _ => 1.0,
    };
    optimizer.step(&grads, lr, clip / factor)?;
    if let Some(s) = loss_scale {
        s.finite();
    }
    Ok(StepOutcome::Done { loss: total, terms })
}

/// The optimiser's parameters: every variable but BatchNorm's running statistics, by name.
fn trainable(vars: &VarMap) -> Vec<(String, Var)> {
    let data = vars.data().lock().expect("variable map lock");
    let mut params: Vec<(String, Var)> = data
        .iter()
        .filter(|(name, _)| is_trainable(name))
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

/// A copy of the model for evaluation that shares the weights' storage but records no
/// gradients.
pub fn detached_model(vars: &VarMap, unet: UNetConfig, device: &Device) -> Result<UNet> {
    let tensors: HashMap<String, Tensor> = vars
        .data()
        .lock()
        .expect("variable map lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    Ok(UNet::new(
        unet,
        None,
        VarBuilder::from_tensors(tensors, DType::F32, device),
    )?)
}

/// The summary of `config`'s run in `runs_dir` if it finished (`summary.json` written) with
/// the same config; None when it has not started or not finished.
pub fn finished(config: &Config, runs_dir: &Path) -> Result<Option<Summary>> {
    let run_dir = runs_dir.join(&config.name);
    let path = run_dir.join("summary.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let previous = std::fs::read_to_string(run_dir.join("config.toml")).unwrap_or_default();
    if let Some((key, values)) = experiment_difference(&previous, &config.to_toml()?) {
        bail!(
            "{} holds a finished run of a different config ({key}: {values}, the run's first); use another output folder or remove it",
            run_dir.display()
        );
    }
    let summary = serde_json::from_str(&text).with_context(|| path.display().to_string())?;
    Ok(Some(summary))
}

/// Checks the run folder (locked by the caller): a fresh run needs it empty (or `--overwrite`),
/// `--resume` needs a run of the same config. Returns the checkpoints to resume from, newest
/// first (none: start from scratch).
fn prepare_run_dir(run_dir: &Path, resolved: &str, opts: &TrainOptions) -> Result<Vec<PathBuf>> {
    if opts.resume && opts.overwrite {
        bail!("--resume and --overwrite exclude each other");
    }
    remove_dead_temporaries(run_dir)?;
    // everything but the lock, which the caller holds
    let contents: Vec<PathBuf> = std::fs::read_dir(run_dir)
        .and_then(|entries| entries.map(|e| e.map(|e| e.path())).collect())
        .with_context(|| format!("cannot list {}", run_dir.display()))?;
    let contents: Vec<PathBuf> = contents
        .into_iter()
        .filter(|p| p.file_name() != Some(LOCK.as_ref()))
        .collect();
    let occupied = !contents.is_empty();
    if occupied && opts.overwrite {
        for path in &contents {
            let removed = if path.is_dir() && !path.is_symlink() {
                std::fs::remove_dir_all(path)
            } else {
                std::fs::remove_file(path)
            };
            removed.with_context(|| format!("cannot clear {}", path.display()))?;
        }
    } else if occupied && !opts.resume {
        let state = if run_dir.join("summary.json").exists() {
            "a finished"
        } else {
            "an unfinished"
        };
        bail!(
            "{} already holds {state} run; pass --resume to continue it or --overwrite to start over",
            run_dir.display()
        );
    }
    if !opts.resume || !occupied {
        return Ok(vec![]);
    }
    // the run must be the same experiment
    match std::fs::read_to_string(run_dir.join("config.toml")) {
        Ok(previous) => {
            if let Some((key, values)) = experiment_difference(&previous, resolved) {
                bail!(
                    "{} holds a run of a different config ({key}: {values}, the run's first); --resume needs the same config and overrides (or use --overwrite)",
                    run_dir.display()
                );
            }
        }
        Err(_) => bail!(
            "{}: not a segtrain run (no config.toml); use --overwrite to start over",
            run_dir.display()
        ),
    }
    // a kill between keeping the previous checkpoint and writing the next leaves only the
    // previous one; a kill before the first checkpoint, none (the run starts over)
    Ok([CHECKPOINT, PREVIOUS_CHECKPOINT]
        .iter()
        .map(|f| run_dir.join(f))
        .filter(|p| p.exists())
        .collect())
}

/// Loads the first of `checkpoints` (newest first) that reads; a damaged newer one (truncated
/// by a full disk, say) is reported and the previous one used.
fn load_newest_checkpoint(
    checkpoints: &[PathBuf],
    vars: &VarMap,
    optimizer: &mut AdamW,
    device: &Device,
    opts: &TrainOptions,
) -> Result<Progress> {
    let mut failures = vec![];
    for path in checkpoints {
        match load_checkpoint(path, vars, optimizer, device) {
            Ok(progress) => {
                for failure in &failures {
                    opts.suspend(|| {
                        eprintln!("warning: {failure:#}; resuming from {}", path.display())
                    });
                }
                return Ok(progress);
            }
            Err(e) => failures.push(e),
        }
    }
    let why: Vec<String> = failures.iter().map(|e| format!("{e:#}")).collect();
    bail!(
        "no usable checkpoint: {}; use --overwrite to start over",
        why.join("; ")
    )
}

/// The first key in which a run folder's `config.toml` (`previous`) differs as an experiment
/// from the resolved config `resolved`, with both values; None when they are the same
/// experiment: equal once both are read with today's defaults (a key added to the schema since
/// the run was written takes its default) and without `train.device`, which may change between
/// resumes. A previous config that no longer reads differs in `config.toml` itself.
fn experiment_difference(previous: &str, resolved: &str) -> Option<(String, String)> {
    let normal = |text: &str| -> Result<toml::Table> {
        let mut config = Config::from_toml(text, &[])?;
        config.train.device = String::new();
        Ok(config.to_toml()?.parse()?)
    };
    let Ok(now) = normal(resolved) else {
        return Some(("config".into(), "the new config does not read back".into()));
    };
    match normal(previous) {
        Ok(before) => crate::config::first_difference(&before, &now, ""),
        Err(e) => Some(("config.toml".into(), format!("unreadable ({e:#})"))),
    }
}

fn save_checkpoint(
    run_dir: &Path,
    vars: &VarMap,
    optimizer: &AdamW,
    progress: &Progress,
    config: &str,
) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = vars
        .data()
        .lock()
        .expect("variable map lock")
        .iter()
        .map(|(k, v)| (format!("model.{k}"), v.as_tensor().clone()))
        .collect();
    tensors.extend(optimizer.state());
    let meta = HashMap::from([
        ("format".to_string(), CHECKPOINT_FORMAT.to_string()),
        ("progress".to_string(), serde_json::to_string(progress)?),
        ("config".to_string(), config.to_string()),
    ]);
    let current = run_dir.join(CHECKPOINT);
    if current.exists() {
        std::fs::rename(&current, run_dir.join(PREVIOUS_CHECKPOINT)).with_context(|| {
            format!(
                "cannot keep the previous checkpoint in {}",
                run_dir.display()
            )
        })?;
    }
    write_safetensors(&current, &tensors, Some(meta))
}

fn load_checkpoint(
    path: &Path,
    vars: &VarMap,
    optimizer: &mut AdamW,
    device: &Device,
) -> Result<Progress> {
    let (tensors, meta) = read_safetensors(path, device)?;
    if meta.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
        bail!("{}: not a segtrain checkpoint", path.display());
    }
    let progress: Progress = serde_json::from_str(
        meta.get("progress")
            .ok_or_else(|| anyhow!("{}: checkpoint lacks its progress", path.display()))?,
    )
    .with_context(|| format!("{}: progress", path.display()))?;
    for (name, var) in vars.data().lock().expect("variable map lock").iter() {
        let t = tensors
            .get(&format!("model.{name}"))
            .ok_or_else(|| anyhow!("{}: checkpoint lacks `{name}`", path.display()))?;
        var.set(t)
            .with_context(|| format!("{}: `{name}`", path.display()))?;
    }
    optimizer
        .load_state(&tensors, progress.step)
        .with_context(|| path.display().to_string())?;
    Ok(progress)
}

/// The validation metrics of a `metrics.csv` row, by column name (None: undefined): the
/// registry's, then the Dice of each class.
fn metric_columns(r: &EpochRow) -> Vec<(String, Option<f64>)> {
    let mut cols: Vec<(String, Option<f64>)> = r.val.iter().map(|(m, v)| (m.column(), v)).collect();
    if r.dice_per_class.len() > 1 {
        cols.extend(
            r.dice_per_class
                .iter()
                .enumerate()
                .map(|(k, d)| (format!("val_dice_class_{}", k + 1), Some(*d))),
        );
    }
    cols
}

fn write_metrics(run_dir: &Path, rows: &[EpochRow], terms: &[&str]) -> Result<()> {
    let mut header = vec!["epoch".to_string(), "lr".into(), "train_loss".into()];
    header.extend(
        terms
            .iter()
            .enumerate()
            .map(|(i, t)| format!("loss_{i}_{t}")),
    );
    header.extend(["seconds", "images_per_second"].map(String::from));
    if let Some(r) = rows.first() {
        header.extend(metric_columns(r).into_iter().map(|(k, _)| k));
    }
    let mut out = header.join(",") + "\n";
    for r in rows {
        let mut cols = vec![
            r.epoch.to_string(),
            format!("{:e}", r.lr),
            r.loss.to_string(),
        ];
        cols.extend(r.terms.iter().map(|v| v.to_string()));
        cols.push(format!("{:.3}", r.seconds));
        cols.push(format!("{:.2}", r.images_per_second));
        cols.extend(
            metric_columns(r)
                .into_iter()
                .map(|(_, v)| v.map_or(String::new(), |v| v.to_string())),
        );
        out += &(cols.join(",") + "\n");
    }
    atomic_write(&run_dir.join("metrics.csv"), out.as_bytes())
}

/// The rows of an existing `metrics.csv` for epochs before `before` (0-based epoch count), so a
/// resumed run neither loses nor duplicates rows.
fn read_metrics(run_dir: &Path, before: usize) -> Result<Vec<EpochRow>> {
    let path = run_dir.join("metrics.csv");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(vec![]);
    };
    let table = crate::report::Csv::parse(&text).with_context(|| path.display().to_string())?;
    let mut rows = vec![];
    for row in 0..table.rows() {
        let get = |name: &str| table.get(row, name);
        let epoch = get("epoch").unwrap_or(0.0) as usize;
        if epoch == 0 || epoch > before {
            continue;
        }
        let terms = table
            .columns()
            .iter()
            .filter(|c| c.starts_with("loss_"))
            .map(|c| get(c).unwrap_or(f64::NAN))
            .collect();
        let classes: Vec<f64> = table
            .columns()
            .iter()
            .filter(|c| c.starts_with("val_dice_class_"))
            .map(|c| get(c).unwrap_or(f64::NAN))
            .collect();
        rows.push(EpochRow {
            epoch,
            lr: get("lr").unwrap_or(f64::NAN),
            loss: get("train_loss").unwrap_or(f64::NAN),
            terms,
            val: Scores::from_columns(get),
            dice_per_class: classes,
            seconds: get("seconds").unwrap_or(0.0),
            images_per_second: get("images_per_second").unwrap_or(0.0),
        });
    }
    Ok(rows)
}

fn progress_bar(
    opts: &TrainOptions,
    len: usize,
    position: usize,
    epoch: usize,
    epochs: usize,
) -> ProgressBar {
    let bar = match (&opts.bars, opts.progress) {
        (Some(bars), true) => bars.add(ProgressBar::new(len as u64)),
        (None, true) => ProgressBar::new(len as u64),
        (_, false) => ProgressBar::hidden(),
    };
    bar.set_style(
        ProgressStyle::with_template("{prefix} [{bar:25}] {pos}/{len} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
    bar.set_position(position as u64);
    bar
}

fn running_message(p: &Progress, terms: &[&str]) -> String {
    let n = p.epoch_images.max(1) as f64;
    let parts: Vec<String> = terms
        .iter()
        .zip(&p.epoch_terms)
        .map(|(t, s)| format!("{t} {:.4}", s / n))
        .collect();
    format!(
        "loss {:.4} [{}] {:.1} img/s",
        p.epoch_loss / n,
        parts.join(", "),
        p.epoch_images as f64 / p.epoch_seconds.max(1e-9)
    )
}

/// The console line of a validated epoch: a digest of `report`, the epoch's validation.
fn epoch_line(r: &EpochRow, report: &Report, epochs: usize, terms: &[&str]) -> String {
    let mut honest = String::new();
    if let Some(d) = report.lesion_dice {
        honest += &format!("  lesion-image dice {d:.4}");
    }
    if let Some(f) = report.empty_fp_rate {
        honest += &format!(" false alarms on empty images {:.0}%", 100.0 * f);
    }
    let per_class = if r.dice_per_class.len() > 1 {
        let d: Vec<String> = r.dice_per_class.iter().map(|v| format!("{v:.3}")).collect();
        format!(" (classes {})", d.join(" "))
    } else {
        String::new()
    };
    let parts: Vec<String> = terms
        .iter()
        .zip(&r.terms)
        .map(|(t, v)| format!("{t} {v:.4}"))
        .collect();
    format!(
        "epoch {}/{epochs}  loss {:.4} [{}]  val dice {:.4}{per_class} iou {:.4} precision {:.4} recall {:.4}{honest}  {:.1} img/s  {:.1} s",
        r.epoch,
        r.loss,
        parts.join(", "),
        report.dice,
        report.iou,
        report.precision,
        report.recall,
        r.images_per_second,
        r.seconds
    )
}

#[cfg(test)]
mod tests {
    use super::{experiment_difference, improves, LossScale, Progress};
    use crate::config::Selection;

    #[test]
    fn select_by_ranks_epochs_by_its_metric_in_its_direction() {
        let brier: Selection = serde_json::from_str("\"brier\"").unwrap();
        let mut p = Progress::default();
        assert!(improves(brier, None, &p), "the first epoch is selected");
        p.best_epoch = 1;
        p.best_score = Some(0.3);
        assert!(improves(brier, Some(0.2), &p), "lower is better");
        assert!(!improves(brier, Some(0.4), &p));
        assert!(
            !improves(brier, Some(0.3), &p),
            "a tie keeps the earlier epoch"
        );
        assert!(!improves(brier, None, &p));
        let dice: Selection = serde_json::from_str("\"dice\"").unwrap();
        assert!(improves(dice, Some(0.4), &p), "higher is better");
        p.best_score = None;
        assert!(improves(brier, Some(0.4), &p), "defined beats undefined");
        assert!(!improves(brier, None, &p));
    }

    fn same_experiment(previous: &str, resolved: &str) -> bool {
        experiment_difference(previous, resolved).is_none()
    }

    #[test]
    fn a_run_written_before_a_schema_key_existed_is_the_same_experiment() {
        let old = "name = \"x\"\nseed = 1\n[data]\nroot = \"d\"\nimage_size = 32\n[train]\nepochs = 2\nbatch_size = 4\ndevice = \"cpu\"\n[[loss]]\nkind = \"dice\"\n";
        let config = crate::config::Config::from_toml(old, &[]).unwrap();
        let mut now = config.to_toml().unwrap();
        assert!(
            now.contains("precision"),
            "today's schema writes the new key"
        );
        assert!(same_experiment(old, &now));
        now = now.replace("device = \"cpu\"", "device = \"auto\"");
        assert!(same_experiment(old, &now), "the device may change");
        let other = old.replace("epochs = 2", "epochs = 3");
        assert!(!same_experiment(&other, &now));
        assert!(!same_experiment("not toml [", &now));
    }

    #[test]
    fn loss_scale_halves_on_overflow_and_doubles_after_a_finite_run() {
        let mut s = LossScale {
            scale: LossScale::INITIAL,
            finite_run: 0,
        };
        s.overflow();
        assert_eq!(s.scale, LossScale::INITIAL / 2.0);
        for _ in 0..LossScale::GROWTH_INTERVAL - 1 {
            s.finite();
        }
        assert_eq!(s.scale, LossScale::INITIAL / 2.0);
        s.finite();
        assert_eq!(s.scale, LossScale::INITIAL);
        // an overflow resets the run; the scale never drops below 1
        s.finite();
        s.overflow();
        assert_eq!((s.scale, s.finite_run), (LossScale::INITIAL / 2.0, 0));
        for _ in 0..40 {
            s.overflow();
        }
        assert_eq!(s.scale, 1.0);
    }
}
