//! The training loop: AdamW with warm-up and a schedule, global-norm gradient clipping,
//! validation every epoch, the best model exported, checkpoints to resume from.
//!
//! A run writes to `runs/<name>/`: `config.toml` (resolved), `metrics.csv` (a row per epoch),
//! `checkpoint.safetensors` (+ the previous one), `model.safetensors` (the best epoch by
//! `train.select_by`) and `summary.json`. Every file is replaced atomically.
//!
//! The parts: `run_dir` (the run folder), `checkpoint` (what is saved and when), `record`
//! (`metrics.csv` and the summary's numbers), `display` (progress bars and epoch lines),
//! [`step`] (one update); this module holds the loop.
//!
//! In a data-parallel run ([`crate::distributed`]) every rank runs this loop on its part of
//! each batch; rank 0 alone validates, writes the folder and shows progress, and the decisions
//! that end an epoch or the run (a stop request, the time limit) are taken together.

mod checkpoint;
mod display;
pub mod optim;
mod record;
pub use record::{read_per_image, PER_IMAGE};
mod run_dir;
pub mod schedule;
pub mod step;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use indicatif::{MultiProgress, ProgressBar};
use serde::{Deserialize, Serialize};

use crate::config::{Config, NonFinite, Selection};
use crate::data::loader::{epoch_batches, mix_seed, BatchRecipe, Crop, TrainLoader};
use crate::data::{DataConfig, Dataset};
use crate::device::DeviceChoice;
use crate::distributed::{self, Shard};
use crate::export::{self, ModelMeta};
use crate::fsutil::atomic_write;
use crate::import::Slicing;
use crate::inference::{Predictor, Symmetry, Window};
use crate::kernels::Kernels;
use crate::loss::Loss;
use crate::metrics::{Evaluation, Report, Scores};
use crate::model::{ModelKind, SegmentationModel, UNetConfig};
use checkpoint::{Checkpointer, Progress};
use display::{epoch_line, progress_bar, running_message};
use optim::AdamW;
use record::{EpochLog, EpochRow};
use run_dir::{experiment_difference, RunDir};
use step::{train_step, trainable, StepOutcome, StepSettings, StepState};

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
    /// Set (by a Ctrl-C handler, say) to stop after the current update with a checkpoint.
    pub stop: Arc<AtomicBool>,
}

impl TrainOptions {
    /// Runs `print` (that prints) with the progress bars out of the way; only the process that
    /// shows progress prints (rank 0 of a data-parallel run).
    fn suspend(&self, print: impl FnOnce()) {
        if !distributed::is_root() {
            return;
        }
        match &self.bars {
            Some(bars) => bars.suspend(print),
            None => print(),
        }
    }

    /// Whether a stop was requested (on any rank: every rank stops at the same update).
    fn stopped(&self) -> bool {
        distributed::any(self.stop.load(Ordering::SeqCst))
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
            stop: Arc::default(),
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
    /// Epochs trained: `train.epochs`, fewer when `train.time_limit_minutes` stopped the run.
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

/// Trains the model of `config` and returns the run's summary.
pub fn train(config: &Config, opts: &TrainOptions) -> Result<Summary> {
    let started = Instant::now();
    let mut run = Run::start(config, opts)?;
    run.announce();
    while run.progress.epoch < config.train.epochs {
        let epoch_started = Instant::now();
        let lr = run.train_epoch()?;
        run.end_epoch(lr)?;
        let (elapsed, last) = (started.elapsed(), epoch_started.elapsed());
        if run.progress.epoch < config.train.epochs && run.out_of_time(elapsed + last) {
            break;
        }
    }
    run.finish()
}

/// A training job in progress: what the parts of the loop share.
struct Run<'a> {
    config: &'a Config,
    opts: &'a TrainOptions,
    /// Locked until the run is dropped.
    dir: RunDir,
    device: Device,
    device_name: String,
    dataset: Dataset,
    /// How `import` cut the data set's slices, recorded in the model.
    slicing: Option<Slicing>,
    recipe: BatchRecipe,
    loss: Loss,
    model: Box<dyn SegmentationModel>,
    vars: VarMap,
    optimizer: AdamW,
    progress: Progress,
    checkpoints: Checkpointer,
    log: EpochLog,
    /// Updates per epoch.
    per_epoch: usize,
    /// Updates in all, and of warm-up (the learning-rate schedule's).
    total_steps: usize,
    warmup: usize,
}

impl<'a> Run<'a> {
    /// Opens the device and the run folder, loads the data set, builds the model and the
    /// optimiser, and restores the newest checkpoint of a resumed run.
    fn start(config: &'a Config, opts: &'a TrainOptions) -> Result<Self> {
        let loss = config.loss()?;
        let choice = DeviceChoice::parse(opts.device.as_deref().unwrap_or(&config.train.device))?;
        let (device, device_name) = match distributed::device() {
            // a `--gpus` rank trains on the GPU its collective runs on
            Some(gpu) if matches!(choice, DeviceChoice::Auto | DeviceChoice::Cuda(_)) => {
                (gpu, format!("cuda:{} (--gpus)", distributed::rank()))
            }
            Some(_) => bail!("--gpus trains on GPUs, but the device asked for is {choice:?}"),
            None => choice.open()?,
        };
        distributed::attach_device(&device)?;
        crate::config::check_training_memory(config, &device)?;
        let (dir, checkpoints) = if distributed::is_root() {
            RunDir::open(config, opts)?
        } else {
            (RunDir::unopened(config, opts)?, vec![])
        };
        opts.suspend(|| eprintln!("device: {device_name}"));

        let slicing = Slicing::of_dataset(&config.data.root)?;
        let recorded = slicing.map_or(0, |s| s.context);
        if config.data.context_slices != recorded {
            let fix = match slicing.filter(|s| s.context > 0) {
                Some(s) => format!(
                    "set data.context_slices = {recorded} and data.channels = {}",
                    s.channels()
                ),
                None => "drop data.context_slices".into(),
            };
            bail!(
                "data.context_slices = {}, but the slices of {} were imported with --context \
                 {recorded}; {fix}, or import them with --context {}",
                config.data.context_slices,
                config.data.root.display(),
                config.data.context_slices
            );
        }
        let dataset = Dataset::open(&config.data, config.seed)?;
        data_parallel(config, dataset.train.len())?;
        let prior = (config.model.prior > 0.0).then_some(config.model.prior);
        let m = &config.model;
        let (model, vars) = m.kind.init(
            config.unet(),
            prior,
            m.deep_supervision,
            config.seed,
            &device,
        )?;
        let mut optimizer = AdamW::new(trainable(&vars), config.train.weight_decay)?;
        let mut progress = if checkpoints.is_empty() {
            if distributed::is_root() {
                dir.write_config()?;
            }
            Progress {
                mean: dataset.normalizer.mean.clone(),
                std: dataset.normalizer.std.clone(),
                state: StepState::new(config.train.precision),
                ..Progress::default()
            }
        } else {
            let progress =
                checkpoint::load_newest(&checkpoints, &vars, &mut optimizer, &device, opts)?;
            resumed(&dir.path, &progress, &dataset, opts)?;
            progress
        };
        if distributed::ranks() > 1 {
            checkpoint::share_from_root(&vars, &mut optimizer, &mut progress, &device)?;
            if progress.mean != dataset.normalizer.mean || progress.std != dataset.normalizer.std {
                bail!(
                    "rank {}: the data set in {} differs from rank 0's (its normalisation statistics)",
                    distributed::rank(),
                    config.data.root.display()
                );
            }
        }
        let terms = loss.terms.iter().map(|t| t.kind).collect();
        let log = EpochLog::resume(&dir.path, progress.epoch, terms)?;
        let t = &config.train;
        let per_epoch = t
            .steps_per_epoch
            .unwrap_or(dataset.train.len().div_ceil(t.batch_size));
        Ok(Self {
            recipe: BatchRecipe {
                shard: Shard::current(),
                ..train_recipe(&config.data, &dataset)
            },
            checkpoints: Checkpointer {
                dir: dir.path.clone(),
                config: dir.resolved.clone(),
                every: t.checkpoint_every,
            },
            per_epoch,
            total_steps: per_epoch * t.epochs,
            warmup: (t.warmup_epochs * per_epoch as f64).round() as usize,
            config,
            opts,
            dir,
            device,
            device_name,
            dataset,
            slicing,
            loss,
            model,
            vars,
            optimizer,
            progress,
            log,
        })
    }

    /// Says what the run trains on.
    fn announce(&self) {
        let (config, t) = (self.config, &self.config.train);
        let mode = match window_of(&config.data) {
            Window::Whole { size } => format!("whole images resized to {size}^2"),
            Window::Sliding { patch, .. } => {
                format!("{patch}^2 patches, sliding-window validation")
            }
        };
        self.opts.suspend(|| {
            eprintln!(
                "{}: {} training / {} validation images, {mode}; {} epochs of {} updates",
                config.name,
                self.dataset.train.len(),
                self.dataset.val.len(),
                t.epochs,
                self.per_epoch
            )
        });
    }

    /// Trains the rest of the epoch in progress; returns its last learning rate (0 when no
    /// update was left). Stopped, it checkpoints and fails with how to resume.
    fn train_epoch(&mut self) -> Result<f64> {
        let (config, t) = (self.config, &self.config.train);
        let epoch = self.progress.epoch;
        let batches = epoch_batches(
            self.dataset.train.len(),
            t.batch_size,
            config.seed,
            epoch,
            t.steps_per_epoch,
        );
        let loader = TrainLoader::new(
            self.recipe.clone(),
            batches,
            self.progress.batch,
            mix_seed(config.seed, epoch as u64),
            config.data.workers,
        );
        let bar = progress_bar(
            self.opts,
            self.per_epoch,
            self.progress.batch,
            epoch,
            t.epochs,
        );
        if self.progress.epoch_terms.len() != self.log.terms.len() {
            self.progress.epoch_terms = vec![0.0; self.log.terms.len()];
        }
        let mut lr = 0.0;
        for batch in loader {
            let started = Instant::now();
            let (images, masks) = batch?;
            lr = self.update(&images, &masks, &bar)?;
            let p = &mut self.progress;
            p.batch += 1;
            let seconds = started.elapsed().as_secs_f64();
            p.epoch_seconds += seconds;
            p.train_seconds += seconds;
            bar.set_position(p.batch as u64);
            bar.set_message(running_message(p, &self.log.terms));
            let (vars, optimizer, p) = (&self.vars, &self.optimizer, &self.progress);
            if distributed::is_root() {
                self.checkpoints
                    .after_update(vars, optimizer, p, self.per_epoch)?;
            }
            if self.opts.stopped() && p.batch < self.per_epoch {
                if distributed::is_root() {
                    self.checkpoints.save(vars, optimizer, p)?;
                }
                bar.finish_and_clear();
                return Err(distributed::Agreed(interrupted(&self.dir.path, p)).into());
            }
        }
        bar.finish_and_clear();
        Ok(lr)
    }

    /// One update on a batch, added to the epoch's sums; returns its learning rate.
    fn update(&mut self, images: &Tensor, masks: &Tensor, bar: &ProgressBar) -> Result<f64> {
        let t = &self.config.train;
        let p = &mut self.progress;
        let lr = schedule::learning_rate(
            t.schedule,
            t.lr,
            p.step as usize,
            self.total_steps,
            self.warmup,
        );
        let settings = StepSettings {
            lr,
            grad_clip: t.grad_clip,
            dtype: t.precision.dtype(),
            kernels: Kernels::for_device(&self.device),
        };
        let outcome = train_step(
            self.model.as_ref(),
            &self.loss,
            &mut self.optimizer,
            (
                &images.to_device(&self.device)?,
                &masks.to_device(&self.device)?,
            ),
            settings,
            &mut p.state,
        );
        let at = format!("epoch {}, update {}", p.epoch + 1, p.step + 1);
        match outcome.with_context(|| at.clone())? {
            StepOutcome::Done {
                loss,
                terms,
                images: n,
            } => {
                p.step += 1;
                p.epoch_loss += loss * n as f64;
                for (s, v) in p.epoch_terms.iter_mut().zip(&terms) {
                    *s += v * n as f64;
                }
                p.epoch_images += n;
            }
            StepOutcome::Overflow => {}
            StepOutcome::NonFinite(what) => match t.on_non_finite {
                NonFinite::Error => bail!(
                    "{at}: {what}; the last checkpoint in {} is kept (train.on_non_finite = \"skip\" skips such batches)",
                    self.dir.path.display()
                ),
                NonFinite::Skip => {
                    p.skipped += 1;
                    self.opts
                        .suspend(|| bar.suspend(|| eprintln!("{at}: {what}; batch skipped")));
                }
            },
        }
        Ok(lr)
    }

    /// Validates the epoch just trained (every rank its part of the images), logs it, keeps its
    /// model if it is the best so far and checkpoints (rank 0 of a data-parallel run); stopped
    /// before the last epoch, fails with how to resume.
    fn end_epoch(&mut self, lr: f64) -> Result<()> {
        let evaluation = self.validate()?;
        if distributed::is_root() {
            let report = evaluation.report();
            let row = EpochRow::finished(&self.progress, lr, &report);
            let line = epoch_line(&row, &report, self.config.train.epochs, &self.log.terms);
            self.opts.suspend(|| println!("{line}"));
            self.log.push(row)?;
            self.select(&report, &evaluation)?;
        }
        self.progress.next_epoch(self.log.terms.len());
        if distributed::is_root() {
            self.checkpoints
                .save(&self.vars, &self.optimizer, &self.progress)?;
        }
        if self.opts.stopped() && self.progress.epoch < self.config.train.epochs {
            return Err(distributed::Agreed(interrupted(&self.dir.path, &self.progress)).into());
        }
        Ok(())
    }

    /// Whether another epoch, ending at `next_end` since the start, would pass
    /// `train.time_limit_minutes` (rank 0's clock decides for every rank); says so when it
    /// would.
    fn out_of_time(&self, next_end: std::time::Duration) -> bool {
        let Some(limit) = self.config.train.time_limit_minutes else {
            return false;
        };
        let late = distributed::is_root() && next_end.as_secs_f64() > limit * 60.0;
        if !distributed::any(late) {
            return false;
        }
        let line = format!(
            "time limit: another epoch would end at {:.1} min, past train.time_limit_minutes = {limit}; stopping after epoch {} of {} with the model of epoch {} (--resume continues)",
            next_end.as_secs_f64() / 60.0,
            self.progress.epoch,
            self.config.train.epochs,
            self.progress.best_epoch
        );
        self.opts.suspend(|| println!("{line}"));
        true
    }

    /// The current weights evaluated on the validation images.
    fn validate(&self) -> Result<Evaluation> {
        let (d, t) = (&self.config.data, &self.config.train);
        let kind = self.config.model.kind;
        let eval_model = detached_model(&self.vars, kind, self.config.unet(), &self.device)?;
        let predictor = Predictor {
            model: eval_model.as_ref(),
            activation: self.config.activation(),
            temperature: 1.0,
            window: window_of(d),
            normalizer: &self.dataset.normalizer,
            batch: t.batch_size,
            device: &self.device,
            tta: if t.val_tta {
                Symmetry::seen_in_training(d.augment.flip, d.augment.rotate90)
            } else {
                vec![]
            },
            min_lesion_pixels: d.min_lesion_pixels,
        };
        // each rank evaluates its part of the images; the sums are added over the ranks
        let ignore = self.dataset.format.ignore_mask_value();
        let own = Shard::current().slots(self.dataset.val.len());
        let evaluation = predictor.evaluate(&self.dataset.val[own.clone()], ignore)?;
        Ok(evaluation.merged_over_ranks(self.dataset.val.len(), own))
    }

    /// Exports the model of the epoch just validated, with its per-image scores
    /// (`per_image.csv`), if `train.select_by` prefers it.
    fn select(&mut self, report: &Report, evaluation: &Evaluation) -> Result<()> {
        let select_by = self.config.train.select_by;
        let score = select_by.metric().selection_score(report);
        if !improves(select_by, score, &self.progress) {
            return Ok(());
        }
        self.progress.best_score = score;
        self.progress.best_epoch = self.progress.epoch + 1;
        let unet = self.config.unet();
        let weights = export::state_dict(&unet, &self.vars, self.progress.step, DType::F32)?;
        let meta = ModelMeta {
            kind: self.config.model.kind,
            unet,
            window: window_of(&self.config.data),
            activation: self.config.activation(),
            normalizer: self.dataset.normalizer.clone(),
            ignore_index: self.config.data.ignore_index,
            temperature: 1.0,
            config: self.dir.resolved.clone(),
            metrics: serde_json::to_value(report)?,
            slicing: self.slicing,
        };
        let names: Vec<String> = self.dataset.val.iter().map(|s| s.stem.clone()).collect();
        record::write_per_image(
            &self.dir.path.join(record::PER_IMAGE),
            &evaluation.per_image(&names),
        )?;
        export::save(&self.dir.path.join("model.safetensors"), &weights, &meta)
    }

    /// Writes and returns the summary of the finished run (rank 0's, on every rank).
    fn finish(self) -> Result<Summary> {
        if distributed::ranks() > 1 {
            let mut json = match distributed::is_root() {
                true => serde_json::to_vec(&self.write_summary()?)?,
                false => vec![],
            };
            distributed::broadcast(&mut json);
            return Ok(serde_json::from_slice(&json)?);
        }
        self.write_summary()
    }

    fn write_summary(&self) -> Result<Summary> {
        let best = self.log.row(self.progress.best_epoch)?;
        let (seconds_per_epoch, images_per_second) = self.log.throughput();
        let summary = Summary {
            name: self.config.name.clone(),
            best_epoch: self.progress.best_epoch,
            val: best.val.clone(),
            selected_by: self.config.train.select_by,
            epochs: self.progress.epoch,
            steps: self.progress.step,
            train_seconds: self.progress.train_seconds,
            seconds_per_epoch,
            images_per_second,
            skipped_batches: self.progress.skipped,
            device: self.device_name.clone(),
            val_images: self.dataset.val.iter().map(|s| s.stem.clone()).collect(),
            run_dir: self.dir.path.clone(),
        };
        atomic_write(
            &self.dir.path.join("summary.json"),
            serde_json::to_string_pretty(&summary)?.as_bytes(),
        )?;
        Ok(summary)
    }
}

/// Checks that a data-parallel run can split its batches (every batch, the last of an epoch
/// too, needs an image per rank), and turns BatchNorm synchronisation on or off.
fn data_parallel(config: &Config, train_images: usize) -> Result<()> {
    let ranks = distributed::ranks();
    if ranks == 1 {
        return Ok(());
    }
    let t = &config.train;
    let smallest = match (t.steps_per_epoch, train_images % t.batch_size) {
        (None, rest) if rest > 0 => rest,
        _ => t.batch_size,
    };
    if smallest < ranks {
        let which = match smallest == t.batch_size {
            true => "each batch has".to_string(),
            false => format!("the last batch of an epoch of {train_images} training images has"),
        };
        bail!(
            "train.batch_size = {} over {ranks} ranks: every batch needs an image per rank, but \
             {which} {smallest}; choose a batch size (or train.steps_per_epoch) that leaves every \
             batch at least {ranks} images, or run fewer ranks",
            t.batch_size
        );
    }
    distributed::set_sync_batchnorm(t.sync_batchnorm);
    Ok(())
}

/// Checks a restored checkpoint against the data set and says where the run resumes.
fn resumed(dir: &Path, progress: &Progress, dataset: &Dataset, opts: &TrainOptions) -> Result<()> {
    if progress.mean != dataset.normalizer.mean || progress.std != dataset.normalizer.std {
        bail!(
            "{}: the data set changed since the checkpoint was written",
            dir.display()
        );
    }
    opts.suspend(|| {
        eprintln!(
            "resuming {} at epoch {}, batch {} (update {})",
            dir.display(),
            progress.epoch + 1,
            progress.batch,
            progress.step
        )
    });
    Ok(())
}

/// How training batches are drawn: whole images or foreground-biased patches, normalised and
/// augmented as `data` says.
fn train_recipe(d: &DataConfig, dataset: &Dataset) -> BatchRecipe {
    let crop = match d.patch_size {
        Some(size) => Crop::Patch {
            size,
            foreground: d.foreground_fraction,
        },
        None => Crop::Whole,
    };
    BatchRecipe::new(
        dataset.train.clone(),
        dataset.format.channels,
        crop,
        dataset.normalizer.clone(),
        Some(d.augment.clone()),
        dataset.format.ignore_mask_value(),
    )
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

/// A copy of the model for evaluation that shares the weights' storage but records no
/// gradients (without training-only heads).
pub fn detached_model(
    vars: &VarMap,
    kind: ModelKind,
    unet: UNetConfig,
    device: &Device,
) -> Result<Box<dyn SegmentationModel>> {
    Ok(kind.from_tensors(unet, detached_tensors(vars), device)?)
}

/// Every variable of `vars`, sharing its storage but recording no gradients.
pub fn detached_tensors(vars: &VarMap) -> HashMap<String, Tensor> {
    vars.data()
        .lock()
        .expect("variable map lock")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect()
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

#[cfg(test)]
mod tests {
    use super::{improves, Progress};
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
}
