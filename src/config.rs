//! Experiment configuration: the TOML schema, `--set` overrides and validation.
//!
//! A config file names the run and its seed and holds the tables `[data]`, `[model]`,
//! `[train]` and one `[[loss]]` table per loss term. Unknown keys are errors that name the key
//! and suggest the nearest valid one; values are checked before any work starts.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::data::DataConfig;
use crate::loss::{Loss, TermDefaults};
use crate::memory::{available_memory, gib};
use crate::metrics::{self, metric, Metric};
use crate::model::{deep_supervision, Activation, ModelKind, UNetConfig};
use crate::rules;
use crate::toml_util::{apply_override, from_table};

/// One experiment: data, model, schedule and loss.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The run's name: its outputs go to `runs/<name>/`.
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    pub data: DataConfig,
    #[serde(default)]
    pub model: ModelConfig,
    pub train: TrainConfig,
    /// The `[[loss]]` tables, parsed by the loss registry.
    #[serde(default)]
    pub loss: Vec<toml::Table>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The architecture (`unet`, the only one so far).
    #[serde(default, skip_serializing_if = "ModelKind::is_default")]
    pub kind: ModelKind,
    #[serde(default = "default_base_width")]
    pub base_width: usize,
    #[serde(default = "default_depth")]
    pub depth: usize,
    /// π of the head's bias init −log((1 − π)/π); 0 keeps PyTorch's default init.
    #[serde(default = "default_prior")]
    pub prior: f64,
    /// Output activation; default: sigmoid for 1 class, softmax for more.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<Activation>,
    /// Training-only auxiliary heads on the decoder levels 1 ..= depth − 2, loss weights ∝ 2^−l
    /// (nnU-Net); the exported model is the plain network.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deep_supervision: bool,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            kind: ModelKind::default(),
            deep_supervision: false,
            base_width: default_base_width(),
            depth: default_depth(),
            prior: default_prior(),
            activation: None,
        }
    }
}

/// Learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Schedule {
    Constant,
    Cosine,
    /// `(1 − t)^0.9`, nnU-Net's schedule.
    Poly,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_epochs: f64,
    /// Largest global gradient norm (absent = no clipping).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    /// auto | cpu | cuda | cuda:N | metal
    #[serde(default = "default_device")]
    pub device: String,
    /// Also checkpoint every this many updates (0: only at the end of each epoch).
    #[serde(default)]
    pub checkpoint_every: usize,
    /// A non-finite loss or gradient: stop with an error, or skip the batch and count it.
    #[serde(default)]
    pub on_non_finite: NonFinite,
    /// Updates per epoch, batches drawn with replacement (nnU-Net: 250); absent: one pass over
    /// the training images.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps_per_epoch: Option<usize>,
    /// The validation metric that picks the saved model.
    #[serde(default)]
    pub select_by: Selection,
    /// Floating-point type of the forward and backward passes (mixed precision: weights,
    /// optimiser state, BatchNorm and loss stay f32).
    #[serde(default)]
    pub precision: Precision,
    /// Validate with test-time augmentation: the mean probability over the flips and 90°
    /// rotations that `data.augment` trains with (as `predict --tta`).
    #[serde(default)]
    pub val_tta: bool,
    /// Stop after the epoch whose successor would end past this many minutes of wall time
    /// since `train` started (validation included); the best epoch's model is kept, and
    /// `--resume` continues. Not part of the experiment: it may change between resumes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_limit_minutes: Option<f64>,
    /// A data-parallel run (`mpirun -np N`, N > 1): BatchNorm's batch statistics over every
    /// rank's images, so that N ranks train the one-process model (true), or over each rank's
    /// own (false: PyTorch's DDP without SyncBatchNorm). No effect in one process.
    #[serde(default = "crate::loss::default_true", skip_serializing_if = "is_true")]
    pub sync_batchnorm: bool,
}

/// serde: a switch left out of the resolved config when it is on (its default).
fn is_true(on: &bool) -> bool {
    *on
}

/// The type activations are computed in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    F32,
    /// bfloat16: f32's range, 8 significant bits. Needs no loss scaling.
    Bf16,
    /// IEEE half: 11 significant bits but a range of ±65504 (smallest normal 6e-5), so the
    /// loss is scaled to keep small gradients from underflowing.
    F16,
}

impl Precision {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            Precision::F32 => candle_core::DType::F32,
            Precision::Bf16 => candle_core::DType::BF16,
            Precision::F16 => candle_core::DType::F16,
        }
    }
}

/// Which validation metric picks the best epoch: any of [`crate::metrics::METRICS`], by name.
/// The default is the mean Dice over the validation images that contain a lesion (pooled Dice
/// when none does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Selection(&'static Metric);

impl Selection {
    /// The metric of `name`; an unknown name is serde's unknown-variant error, which
    /// [`crate::toml_util::explain_de_error`] turns into the list of names with the nearest one.
    fn by_name<E: serde::de::Error>(name: &str) -> std::result::Result<Self, E> {
        metric(name)
            .map(Self)
            .ok_or_else(|| E::unknown_variant(name, metrics::names()))
    }

    pub fn metric(self) -> &'static Metric {
        self.0
    }
}

impl Default for Selection {
    fn default() -> Self {
        Self(metric("lesion_dice").expect("lesion_dice is a registered metric"))
    }
}

impl Serialize for Selection {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.0.name)
    }
}

impl<'de> Deserialize<'de> for Selection {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        Self::by_name(&String::deserialize(d)?)
    }
}

/// What training does with a batch whose loss or gradient is NaN or infinite.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NonFinite {
    /// Stop with an error naming the epoch, step and loss term; the last checkpoint is kept.
    #[default]
    Error,
    /// Skip the update and count the batch.
    Skip,
}

fn default_base_width() -> usize {
    16
}
fn default_depth() -> usize {
    4
}
fn default_prior() -> f64 {
    0.01
}
fn default_lr() -> f64 {
    1e-3
}
fn default_weight_decay() -> f64 {
    1e-4
}
fn default_schedule() -> Schedule {
    Schedule::Cosine
}
fn default_device() -> String {
    "auto".into()
}

impl Config {
    /// Reads `path`, applies `--set key=value` overrides and validates the result. Errors name
    /// the file, and the line and column of TOML syntax errors.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = crate::fsutil::read_text(path, crate::fsutil::MAX_TEXT_BYTES, "config")
            .with_context(|| format!("cannot read config {}", path.display()))?;
        Self::from_toml(&text, overrides).with_context(|| format!("config {}", path.display()))
    }

    /// Parses, overrides and validates a config given as TOML text.
    pub fn from_toml(text: &str, overrides: &[String]) -> Result<Self> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| anyhow!("{e}"))?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let config: Config = from_table(table, "")?;
        config.validate()?;
        Ok(config)
    }

    /// The run of fold `fold` of `folds`-fold cross-validation: named `<name>-fold<fold>`, its
    /// split seeded by the config's `seed` unless `data.split_seed` fixes it (so that every
    /// fold and every seed of a comparison shares one assignment of images to folds).
    pub fn with_fold(&self, folds: usize, fold: usize) -> Result<Self> {
        rule("--folds", rules::folds(folds))?;
        rule("--fold", rules::fold(fold, folds))?;
        let mut c = self.clone();
        c.data.folds = Some(folds);
        c.data.fold = fold;
        c.data.split_seed.get_or_insert(c.seed);
        c.name = format!("{}-fold{fold}", c.name);
        rule("name", rules::name(&c.name))?;
        Ok(c)
    }

    /// The loss of the `[[loss]]` tables, checked against the model's output channels.
    pub fn loss(&self) -> Result<Loss> {
        let loss = Loss::from_tables(&self.loss, self.term_defaults())?;
        loss.check(self.data.classes)?;
        Ok(loss)
    }

    pub fn term_defaults(&self) -> TermDefaults {
        TermDefaults {
            activation: self.model.activation,
            ignore_index: self.data.ignore_index,
        }
    }

    /// The model's output activation.
    pub fn activation(&self) -> Activation {
        self.model
            .activation
            .unwrap_or_else(|| Activation::default_for(self.data.classes))
    }

    /// The resolved config as TOML (overrides applied, defaults filled in).
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).context("cannot encode the config as TOML")
    }

    /// The U-Net this config trains.
    pub fn unet(&self) -> UNetConfig {
        UNetConfig {
            in_channels: self.data.channels,
            classes: self.data.classes,
            base_width: self.model.base_width,
            depth: self.model.depth,
        }
    }

    /// Side of the square items a training step sees: the patch, or the resized image.
    pub fn item_size(&self) -> usize {
        self.data
            .patch_size
            .or(self.data.image_size)
            .expect("a validated config has a patch or image size")
    }

    /// An estimate of the memory training needs besides the data set: one training step of
    /// `train.batch_size` items of `item_size()²` (weights, AdamW state, activations forward
    /// and backward), on `device`'s memory, and the batches the data workers prepare ahead, on
    /// the host. Returns (host bytes, device bytes) with device bytes 0 on the CPU, where they
    /// are counted in the host's.
    pub fn training_memory(&self, device: &candle_core::Device) -> (f64, f64) {
        let (b, s) = (self.train.batch_size, self.item_size());
        let step = self
            .unet()
            .training_bytes(b, s, self.train.precision.dtype().size_in_bytes());
        // each worker holds one batch in the making, the channel 2 per worker more: f32
        // images and u8 masks
        let item = (s * s) as f64 * (4 * self.data.channels + 1) as f64;
        let loader = (3 * self.data.workers * b) as f64 * item;
        if device.is_cpu() {
            (step + loader, 0.0)
        } else {
            (loader, step)
        }
    }

    /// Every key's rule, section by section; the first failure names its key.
    fn validate(&self) -> Result<()> {
        rules::name(&self.name).map_err(|m| anyhow!("name: {m}"))?;
        self.validate_model()?;
        self.validate_data()?;
        self.validate_augment()?;
        self.validate_train()?;
        crate::device::DeviceChoice::parse(&self.train.device)
            .map_err(|e| anyhow!("train.device: {e}"))?;
        self.loss()?;
        // the resolved config is stored in the model file's bounded metadata
        let resolved = self.to_toml()?.len();
        let max = crate::export::MAX_METADATA_BYTES / 2;
        if resolved > max {
            bail!("the resolved config takes {resolved} bytes; it must be ≤ {max} to be stored in the model file");
        }
        Ok(())
    }

    fn validate_model(&self) -> Result<()> {
        let m = &self.model;
        let bad = |key: &str, msg: String| Err(anyhow!("{key}: {msg}"));
        rule("model.depth", rules::depth(m.depth))?;
        rule("model.base_width", rules::base_width(m.base_width))?;
        if !(m.prior == 0.0 || (m.prior > 0.0 && m.prior < 1.0)) {
            return bad(
                "model.prior",
                format!(
                    "must lie in (0, 1) (or 0 for PyTorch's default bias init), got {}",
                    m.prior
                ),
            );
        }
        if m.deep_supervision && deep_supervision::levels(m.depth).is_empty() {
            return bad(
                "model.deep_supervision",
                format!(
                    "needs model.depth ≥ 3 (auxiliary heads sit on the decoder levels 1 ..= depth − 2), got depth {}",
                    m.depth
                ),
            );
        }
        Ok(())
    }

    fn validate_data(&self) -> Result<()> {
        let (d, m) = (&self.data, &self.model);
        let bad = |key: &str, msg: String| Err(anyhow!("{key}: {msg}"));
        let side = |key: &str, v: usize| rule(key, rules::side(v, m.depth, "model.depth"));
        match (d.patch_size, d.image_size) {
            (None, None) => {
                return bad(
                    "data.image_size",
                    "is required (or set data.patch_size for patch training)".into(),
                )
            }
            (None, Some(size)) => side("data.image_size", size)?,
            (Some(patch), size) => {
                side("data.patch_size", patch)?;
                if let Some(size) = size {
                    rule("data.image_size", rules::count(size, rules::MAX_SIDE))?;
                }
            }
        }
        if !(0.0..=1.0).contains(&d.foreground_fraction) {
            return bad(
                "data.foreground_fraction",
                format!("must lie in [0, 1], got {}", d.foreground_fraction),
            );
        }
        rule("data.overlap", rules::overlap(d.overlap))?;
        rule("data.context_slices", rules::context(d.context_slices))?;
        rule(
            "data.channels",
            rules::channels(d.channels, d.context_slices),
        )?;
        rule("data.classes", rules::classes(d.classes))?;
        rule(
            "model.activation",
            rules::activation(self.activation(), d.classes),
        )?;
        if let Some(i) = d.ignore_index {
            rule("data.ignore_index", rules::ignore_index(i, d.classes))?;
        }
        if !(d.val_fraction > 0.0 && d.val_fraction < 1.0) {
            return bad(
                "data.val_fraction",
                format!("must lie in (0, 1), got {}", d.val_fraction),
            );
        }
        if let Some(p) = d.clip_percentiles {
            rule("data.clip_percentiles", rules::clip_percentiles(p))?;
        }
        if let Some(mean) = &d.mean {
            rule("data.mean", rules::mean(mean, d.channels))?;
        }
        if let Some(std) = &d.std {
            rule("data.std", rules::std(std, d.channels))?;
        }
        rule("data.workers", rules::count(d.workers, rules::MAX_WORKERS))?;
        match d.folds {
            Some(k) => {
                rule("data.folds", rules::folds(k))?;
                rule("data.fold", rules::fold(d.fold, k))?;
            }
            None if d.fold != 0 => {
                return bad(
                    "data.fold",
                    format!("is {} but data.folds is not set", d.fold),
                )
            }
            None => {}
        }
        if let Some(s) = &d.synth {
            s.validate().map_err(|e| anyhow!("data.synth.{e}"))?;
        }
        Ok(())
    }

    fn validate_augment(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(anyhow!("{key}: {msg}"));
        let a = &self.data.augment;
        if !(0.0..=2.0).contains(&a.brightness) {
            return bad(
                "data.augment.brightness",
                format!("must lie in [0, 2], got {}", a.brightness),
            );
        }
        if !(0.0..1.0).contains(&a.contrast) {
            return bad(
                "data.augment.contrast",
                format!("must lie in [0, 1), got {}", a.contrast),
            );
        }
        if !(a.min_crop > 0.0 && a.min_crop <= 1.0) {
            return bad(
                "data.augment.min_crop",
                format!("must lie in (0, 1], got {}", a.min_crop),
            );
        }
        for (key, value, max) in [
            ("data.augment.rotate", a.rotate, 180.0),
            ("data.augment.scale", a.scale, 0.9),
            ("data.augment.gamma", a.gamma, 2.0),
            ("data.augment.noise", a.noise, 2.0),
        ] {
            if !(0.0..=max).contains(&value) {
                return bad(key, format!("must lie in [0, {max}], got {value}"));
            }
        }
        Ok(())
    }

    fn validate_train(&self) -> Result<()> {
        let t = &self.train;
        let bad = |key: &str, msg: String| Err(anyhow!("{key}: {msg}"));
        rule("train.epochs", rules::count(t.epochs, rules::MAX_EPOCHS))?;
        rule(
            "train.batch_size",
            rules::count(t.batch_size, rules::MAX_BATCH_SIZE),
        )?;
        if let Some(steps) = t.steps_per_epoch {
            rule(
                "train.steps_per_epoch",
                rules::count(steps, rules::MAX_STEPS_PER_EPOCH),
            )?;
            if steps * t.batch_size > rules::MAX_ITEMS_PER_EPOCH {
                return bad(
                    "train.steps_per_epoch",
                    format!(
                        "{steps} steps × batch_size {} = {} items per epoch; must be ≤ {} (an epoch's batches are drawn up front)",
                        t.batch_size,
                        steps * t.batch_size,
                        rules::MAX_ITEMS_PER_EPOCH
                    ),
                );
            }
        }
        if let Some(m) = t.time_limit_minutes {
            if !(m > 0.0 && m <= rules::MAX_MINUTES) {
                return bad(
                    "train.time_limit_minutes",
                    format!("must lie in (0, {}], got {m}", rules::MAX_MINUTES),
                );
            }
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return bad("train.lr", format!("must be > 0, got {}", t.lr));
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            return bad(
                "train.weight_decay",
                format!("must be >= 0, got {}", t.weight_decay),
            );
        }
        if !(t.warmup_epochs >= 0.0 && t.warmup_epochs <= t.epochs as f64) {
            return bad(
                "train.warmup_epochs",
                format!(
                    "must lie in [0, epochs = {}], got {}",
                    t.epochs, t.warmup_epochs
                ),
            );
        }
        if let Some(c) = t.grad_clip {
            if !(c > 0.0 && c.is_finite()) {
                return bad("train.grad_clip", format!("must be > 0, got {c}"));
            }
        }
        Ok(())
    }
}

/// `key: message` of a failed rule.
fn rule(key: &str, check: rules::Check) -> Result<()> {
    check.map_err(|msg| anyhow!("{key}: {msg}"))
}

/// Refuses a training run whose estimated memory ([`Config::training_memory`]) exceeds the
/// memory available to this process ([`available_memory`]; skipped where unknown, as is the
/// device part on a GPU, whose free memory is not known). Call it before reading any data.
pub fn check_training_memory(config: &Config, device: &candle_core::Device) -> Result<()> {
    check_memory_budget(config, device, available_memory())
}

/// [`check_training_memory`] with the memory `available` given (None: unknown, no check).
pub fn check_memory_budget(
    config: &Config,
    device: &candle_core::Device,
    available: Option<u64>,
) -> Result<()> {
    let (host, _device_bytes) = config.training_memory(device);
    let Some(available) = available else {
        return Ok(());
    };
    if host > available as f64 {
        let (d, m, t) = (&config.data, &config.model, &config.train);
        let what = match d.patch_size {
            Some(p) => format!("data.patch_size = {p}"),
            None => format!("data.image_size = {}", config.item_size()),
        };
        bail!(
            "training needs about {} of memory ({what}, train.batch_size = {}, model.base_width = {}, model.depth = {}, data.workers = {}), but only {} is available: lower the batch size, the image or patch size or the model's width",
            gib(host),
            t.batch_size,
            m.base_width,
            m.depth,
            d.workers,
            gib(available as f64)
        );
    }
    Ok(())
}
