//! `segtrain plan`: a data set's fingerprint and the training config chosen from it.
//!
//! Like nnU-Net's experiment planner, the decisions follow from a few numbers measured on the
//! training images — sizes, channels, intensities, foreground share, lesion sizes — and the
//! time a training step takes on this machine; unlike it, every decision is written into the
//! config as a comment that gives the numbers behind it, so the plan can be read and edited.
//!
//! Rules (sides are multiples of 2^depth = 16):
//! - **Whole image or patches.** Whole images at side S = the median image side, clamped to
//!   [`MIN_SIDE`, `MAX_WHOLE_SIDE`], as long as the 5th-percentile lesion keeps at least
//!   [`MIN_LESION_PIXELS`] pixels after the resize, or the resize at most halves its area (a
//!   typical lesion must survive it); otherwise patches of [`PATCH_SIDE`] at native resolution, which see every lesion at full
//!   size, with a third of the patches (half when most images are empty) centred on lesions.
//! - **Batch**: 8 images of 128² per update, fewer for larger sides (the same pixels per
//!   update), at least 2.
//! - **Budget**: epochs = the time budget (default 10 min) × 0.85 / the time of one epoch
//!   (its updates, timed on this machine, plus validation), between 5 and 500; and
//!   `train.time_limit_minutes` = the budget, so a busier machine stops early instead of
//!   overrunning.
//! - **Normalisation**: grey images by their own mean and std (`normalize = "image"`: scans
//!   from several scanners, sequences or windows reach the network alike), colour photographs
//!   by the data set's; each image clipped to its 0.5th..99.5th percentile when the outer 0.5 %
//!   of the pixels span more than the other 99 % (raw CT, burnt-in text).
//! - **Post-processing**: predicted lesions smaller than a quarter of the 5th-percentile
//!   training lesion are removed (`data.min_lesion_pixels`).
//! - **Loss**: Dice + focal (γ = 2, mean), the MONAI `DiceFocalLoss` that plain PyTorch
//!   baselines use; in patch mode the focal term is normalised by the running average of the
//!   positives.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rayon::prelude::*;

use crate::bench::{self, BenchOptions};
use crate::config::Config;
use crate::data::{self, Format, PairPaths};
use crate::kernels::Kernels;
use crate::metrics::percentile;
use crate::rules;

/// Smallest model input side.
pub const MIN_SIDE: usize = 64;
/// Largest whole-image side (larger images are resized down to it, or cut into patches).
pub const MAX_WHOLE_SIDE: usize = 256;
/// Side of the patches of patch mode.
pub const PATCH_SIDE: usize = 128;
/// Fewest pixels a 5th-percentile lesion may keep after the whole-image resize.
pub const MIN_LESION_PIXELS: f64 = 16.0;
/// The U-Net the plans train (the project's tested default).
const BASE_WIDTH: usize = 16;
const DEPTH: usize = 4;

/// Median, smallest and largest of a list of numbers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Option<Self> {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Self {
            min: *v.first()?,
            max: *v.last()?,
            median: percentile(&v, 50.0),
        })
    }
}

/// Intensity statistics of one channel, values in [0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Intensity {
    pub min: f64,
    pub p0_5: f64,
    pub p50: f64,
    pub p99_5: f64,
    pub max: f64,
    pub mean: f64,
    pub std: f64,
}

/// What `plan` measures on the training images.
#[derive(Debug, Clone)]
pub struct Fingerprint {
    /// The folder read: `DATA/train` when the data set has a fixed split, else `DATA`.
    pub folder: PathBuf,
    pub images: usize,
    pub fixed_split: bool,
    pub heights: Spread,
    pub widths: Spread,
    /// 1 when every image is grey (R = G = B), else 3.
    pub channels: usize,
    /// 2.5-D context k (`import --context k`): the channels are slices z−k … z+k of grey
    /// scans, not colour; 0: none.
    pub context: usize,
    pub intensity: Vec<Intensity>,
    /// Each image's mean and standard deviation (grey level, all channels averaged).
    pub image_means: Spread,
    pub image_stds: Spread,
    /// Share of pixels darker than 2 % of full scale: the black background of a scan slice.
    pub dark_share: f64,
    /// Classes including background: 1 (binary masks) or the largest class index + 1.
    pub classes: usize,
    /// 255 in class-index masks whose other values are small: an "ignore" border.
    pub ignore_index: Option<u8>,
    /// Foreground share of each image that has foreground.
    pub foreground: Option<Spread>,
    pub empty_share: f64,
    /// Connected lesions (8-neighbourhood) per image with foreground.
    pub lesions_per_image: Option<Spread>,
    /// Lesion areas in native pixels: median and 5th percentile.
    pub lesion_area_median: f64,
    pub lesion_area_p5: f64,
}

impl Fingerprint {
    /// What the intensities look like.
    pub fn modality(&self) -> &'static str {
        if self.context > 0 {
            "grey scan slices, each stacked with its neighbours as input channels (import --context)"
        } else if self.channels == 3 {
            "colour photographs (RGB)"
        } else if self.dark_share > 0.2 {
            "grey scan slices on a black background (MRI, or CT after windowing)"
        } else {
            "grey images without a black background (microscopy, ultrasound or photographs)"
        }
    }
}

/// One image's measurements.
struct ImageStats {
    h: usize,
    w: usize,
    grey: bool,
    /// Pixel values per channel, subsampled.
    samples: Vec<Vec<f32>>,
    /// Mean and standard deviation of the grey level.
    luma_moments: (f64, f64),
    dark: f64,
    /// The mask's distinct non-zero values (colour masks: {1}), at most [`MAX_VALUES`] + 1.
    values: std::collections::BTreeSet<u32>,
    foreground: f64,
    lesion_areas: Vec<f64>,
}

/// Measures one pair, its image read as RGB or, for 2.5-D context, as a slice stack
/// (`format`); the grey level is the mean of R, G and B, or the stack's centre slice.
fn measure(pair: &PairPaths, format: &Format) -> Result<ImageStats> {
    let (image, (h, w)) = data::load_image(&pair.image, format)?;
    let planes: Vec<&[f32]> = image.chunks(h * w).collect();
    let grey = format.slice_stack
        || (0..h * w).all(|i| planes[0][i] == planes[1][i] && planes[1][i] == planes[2][i]);
    let step = (h * w / 4096).max(1);
    let samples = planes
        .iter()
        .map(|p| p.iter().step_by(step).copied().collect())
        .collect();
    let luma = |i: usize| match format.slice_stack {
        true => planes[planes.len() / 2][i],
        false => (planes[0][i] + planes[1][i] + planes[2][i]) / 3.0,
    };
    let dark = (0..h * w).filter(|&i| luma(i) < 0.02).count() as f64 / (h * w) as f64;
    let n = (h * w) as f64;
    let mean = (0..h * w).map(|i| luma(i) as f64).sum::<f64>() / n;
    let var = (0..h * w)
        .map(|i| (luma(i) as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let mask = data::read_mask_values(&pair.mask)?;
    if (mask.width as usize, mask.height as usize) != (w, h) {
        let what = match format.slice_stack {
            true => format!("a stack of {} slices of {w}×{h}", format.channels),
            false => format!("{w}×{h}"),
        };
        bail!(
            "{} is {what} but its mask {} is {}×{}",
            pair.image.display(),
            pair.mask.display(),
            mask.width,
            mask.height
        );
    }
    let fg: Vec<bool> = mask.values.iter().map(|&v| v > 0).collect();
    let mut values = std::collections::BTreeSet::new();
    for &v in &mask.values {
        if v != 0 && values.len() <= MAX_VALUES {
            values.insert(if mask.colour { 1 } else { v });
        }
    }
    Ok(ImageStats {
        h,
        w,
        grey,
        samples,
        luma_moments: (mean, var.sqrt()),
        dark,
        values,
        foreground: fg.iter().filter(|&&f| f).count() as f64 / (h * w) as f64,
        lesion_areas: component_areas(&fg, h, w),
    })
}

/// Areas of the 8-connected lesions of a foreground mask (`h × w`, row-major).
pub fn component_areas(mask: &[bool], h: usize, w: usize) -> Vec<f64> {
    let labels: Vec<u8> = mask.iter().map(|&f| u8::from(f)).collect();
    crate::metrics::components(&labels, h, w)
        .iter()
        .map(|c| c.len() as f64)
        .collect()
}

/// Most distinct mask values tracked: more are not class indices.
const MAX_VALUES: usize = 256;

/// Classes (and an ignore value) of masks holding these distinct non-zero values: one value
/// (whatever it is: 1, 128, 255, 1000) is a binary mask; several are class indices 1..=K,
/// with 255 beside small indices an ignore value; values above 255 cannot be class indices.
pub fn mask_classes(values: &std::collections::BTreeSet<u32>) -> Result<(usize, Option<u8>)> {
    if values.len() <= 1 {
        return Ok((1, None));
    }
    let ignore = (values.contains(&255) && values.len() > 2).then_some(255u8);
    let largest = values
        .iter()
        .copied()
        .filter(|&v| Some(v) != ignore.map(u32::from))
        .max()
        .unwrap_or(0);
    if largest > 254 || values.len() > MAX_VALUES {
        bail!(
            "{} distinct mask values up to {largest}: class indices are 0..=254 (import atlases with --label-map, or make the masks binary)",
            values.len()
        );
    }
    Ok((largest as usize + 1, ignore))
}

/// Measures the training images of the data set at `root`.
pub fn fingerprint(root: &Path) -> Result<Fingerprint> {
    let fixed_split = root.join("train").is_dir() && root.join("val").is_dir();
    let folder = if fixed_split {
        root.join("train")
    } else {
        root.to_path_buf()
    };
    let pairs = data::scan_pairs(&folder)?;
    if pairs.is_empty() {
        bail!("{}: no image/mask pairs", folder.display());
    }
    if fixed_split && data::scan_pairs(&root.join("val"))?.is_empty() {
        bail!(
            "{}: no image/mask pairs to validate on (add some, or remove val/ and train/ to split the pairs)",
            root.join("val").display()
        );
    }
    let context = crate::import::Slicing::of_dataset(root)?.map_or(0, |s| s.context);
    let format = Format {
        channels: if context > 0 { 2 * context + 1 } else { 3 },
        slice_stack: context > 0,
        classes: 1,
        ignore_index: None,
        resize: None,
    };
    let stats = pairs
        .par_iter()
        .map(|p| measure(p, &format))
        .collect::<Result<Vec<_>>>()?;
    let channels = match stats.iter().all(|s| s.grey) && context == 0 {
        true => 1,
        false => format.channels,
    };
    let intensity = (0..channels)
        .map(|c| {
            let mut v: Vec<f64> = stats
                .iter()
                .flat_map(|s| s.samples[c].iter().map(|&x| x as f64))
                .collect();
            v.sort_by(f64::total_cmp);
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
            Intensity {
                min: v[0],
                p0_5: percentile(&v, 0.5),
                p50: percentile(&v, 50.0),
                p99_5: percentile(&v, 99.5),
                max: v[v.len() - 1],
                mean,
                std: var.sqrt(),
            }
        })
        .collect();
    let values: std::collections::BTreeSet<u32> = stats
        .iter()
        .flat_map(|s| s.values.iter().copied())
        .collect();
    let (classes, ignore_index) = mask_classes(&values).with_context(|| {
        format!(
            "{}: the masks are neither binary nor class indices",
            folder.display()
        )
    })?;
    let with_fg: Vec<&ImageStats> = stats.iter().filter(|s| s.foreground > 0.0).collect();
    let mut areas: Vec<f64> = stats.iter().flat_map(|s| s.lesion_areas.clone()).collect();
    areas.sort_by(f64::total_cmp);
    let spread = |f: &dyn Fn(&ImageStats) -> f64, of: &[&ImageStats]| -> Option<Spread> {
        Spread::of(&of.iter().map(|s| f(s)).collect::<Vec<_>>())
    };
    let all: Vec<&ImageStats> = stats.iter().collect();
    Ok(Fingerprint {
        folder,
        images: stats.len(),
        fixed_split,
        heights: spread(&|s| s.h as f64, &all).expect("one image at least"),
        widths: spread(&|s| s.w as f64, &all).expect("one image at least"),
        channels,
        context,
        intensity,
        image_means: spread(&|s| s.luma_moments.0, &all).expect("one image at least"),
        image_stds: spread(&|s| s.luma_moments.1, &all).expect("one image at least"),
        dark_share: stats.iter().map(|s| s.dark).sum::<f64>() / stats.len() as f64,
        classes,
        ignore_index,
        foreground: spread(&|s| s.foreground, &with_fg),
        empty_share: 1.0 - with_fg.len() as f64 / stats.len() as f64,
        lesions_per_image: spread(&|s| s.lesion_areas.len() as f64, &with_fg),
        lesion_area_median: if areas.is_empty() {
            0.0
        } else {
            percentile(&areas, 50.0)
        },
        lesion_area_p5: if areas.is_empty() {
            0.0
        } else {
            percentile(&areas, 5.0)
        },
    })
}

/// How `plan` runs.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// The run's name (default: the data folder's name).
    pub name: Option<String>,
    /// Training time to plan for, in minutes.
    pub budget_minutes: f64,
    /// Seconds of one training update at the planned size; None: timed on this machine.
    pub step_seconds: Option<f64>,
}

fn round_to(v: f64, multiple: usize) -> usize {
    ((v / multiple as f64).round() as usize).max(1) * multiple
}

/// The config for `root` as commented TOML, checked to parse as a valid config.
pub fn plan(root: &Path, opts: &PlanOptions) -> Result<String> {
    if !(opts.budget_minutes > 0.0 && opts.budget_minutes <= rules::MAX_MINUTES) {
        bail!(
            "--budget-minutes: must lie in (0, {}], got {}",
            rules::MAX_MINUTES,
            opts.budget_minutes
        );
    }
    let fp = fingerprint(root)?;
    let root_abs = root
        .canonicalize()
        .with_context(|| format!("cannot resolve {}", root.display()))?;
    let name = match &opts.name {
        Some(n) => {
            rules::name(n).map_err(|m| anyhow::anyhow!("--name: {m}"))?;
            n.clone()
        }
        None => root_abs
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .filter(|n| rules::name(n).is_ok())
            .unwrap_or_else(|| "plan".into()),
    };
    let mut text = String::new();
    let w = &mut text;
    write_fingerprint(w, root, &fp)?;
    writeln!(w)?;
    writeln!(w, "name = {}", toml::Value::String(name))?;
    writeln!(w, "seed = 0")?;
    writeln!(w)?;
    writeln!(w, "[data]")?;
    writeln!(
        w,
        "root = {}",
        toml::Value::String(root_abs.display().to_string())
    )?;
    let input = write_data(w, &fp)?;
    write_normalisation(w, &fp)?;
    writeln!(w)?;
    writeln!(w, "[model]")?;
    writeln!(w, "# the tested default U-Net: base width {BASE_WIDTH}, depth {DEPTH} (sides multiples of {})", 1usize << DEPTH)?;
    writeln!(w, "base_width = {BASE_WIDTH}")?;
    writeln!(w, "depth = {DEPTH}")?;
    writeln!(w, "prior = 0.01")?;
    writeln!(w)?;
    write_train(w, root, &fp, &input, opts)?;
    write_loss(w, input.patch_mode)?;
    Config::from_toml(&text, &[]).with_context(|| {
        format!(
            "the config planned for {} does not validate",
            root.display()
        )
    })?;
    Ok(text)
}

/// The comment block at the top: the fingerprint's numbers.
fn write_fingerprint(w: &mut String, root: &Path, fp: &Fingerprint) -> Result<()> {
    writeln!(w, "# Planned by `segtrain plan {}`", root.display())?;
    writeln!(
        w,
        "# Fingerprint of {} ({} training images):",
        fp.folder.display(),
        fp.images
    )?;
    writeln!(
        w,
        "#   sizes: height median {:.0} (min {:.0}, max {:.0}), width median {:.0} (min {:.0}, max {:.0})",
        fp.heights.median, fp.heights.min, fp.heights.max, fp.widths.median, fp.widths.min, fp.widths.max
    )?;
    writeln!(
        w,
        "#   looks like {}; {:.0} % of the pixels are black",
        fp.modality(),
        100.0 * fp.dark_share
    )?;
    writeln!(
        w,
        "#   per image: mean grey level {:.3}..{:.3}, standard deviation {:.3}..{:.3}",
        fp.image_means.min, fp.image_means.max, fp.image_stds.min, fp.image_stds.max
    )?;
    for (c, i) in fp.intensity.iter().enumerate() {
        writeln!(
            w,
            "#   channel {c}: min {:.3}, percentiles 0.5/50/99.5 = {:.3}/{:.3}/{:.3}, max {:.3}, mean {:.3}, std {:.3} (of full scale)",
            i.min, i.p0_5, i.p50, i.p99_5, i.max, i.mean, i.std
        )?;
    }
    match (&fp.foreground, &fp.lesions_per_image) {
        (Some(f), Some(l)) => {
            writeln!(
                w,
                "#   foreground: {:.2} % of an image with a lesion (median; min {:.3} %, max {:.2} %); {:.0} % of the images are empty",
                100.0 * f.median, 100.0 * f.min, 100.0 * f.max, 100.0 * fp.empty_share
            )?;
            writeln!(
                w,
                "#   lesions: {:.0} per image with any (median; max {:.0}), area median {:.0} px, 5th percentile {:.0} px",
                l.median, l.max, fp.lesion_area_median, fp.lesion_area_p5
            )?;
        }
        _ => writeln!(
            w,
            "#   no image has foreground: the model can only learn background"
        )?,
    }
    Ok(())
}

/// What the network sees, as `write_data` decided it.
struct Input {
    /// Random patches at native resolution rather than whole resized images.
    patch_mode: bool,
    /// Side of the square the network trains on (whole image or patch).
    side: usize,
    /// Pixels of a resized whole image over the median native image's (1 in patch mode's
    /// validation windows covers the native image).
    scale: f64,
}

/// The `[data]` decisions: whole images or patches and their size, channels, classes, the
/// split and the smallest kept lesion.
fn write_data(w: &mut String, fp: &Fingerprint) -> Result<Input> {
    let multiple = 1usize << DEPTH;
    let side = (fp.heights.median * fp.widths.median).sqrt();
    // whole image or patches
    let whole = round_to(side, multiple).clamp(MIN_SIDE, MAX_WHOLE_SIDE);
    let scale = (whole * whole) as f64 / (fp.heights.median * fp.widths.median);
    let kept = fp.lesion_area_p5 * scale.min(1.0);
    // patches only when the resize is what makes lesions too small: a lesion small already
    // at native resolution loses nothing to a near-native whole image
    let patch_mode =
        fp.lesion_area_p5 > 0.0 && kept < MIN_LESION_PIXELS && fp.lesion_area_p5 >= 2.0 * kept;
    let model_side = if patch_mode {
        let patch = PATCH_SIDE.min(round_to(side, multiple).max(MIN_SIDE));
        writeln!(
            w,
            "# patches: resized to {whole}² the 5th-percentile lesion ({:.0} px) would keep {kept:.1} px (< {MIN_LESION_PIXELS}); patches of {patch}² at native resolution keep every lesion whole",
            fp.lesion_area_p5
        )?;
        writeln!(w, "patch_size = {patch}")?;
        let share = if fp.empty_share > 0.5 { 0.5 } else { 1.0 / 3.0 };
        writeln!(
            w,
            "# {:.0} % of the patches centred on a lesion pixel ({:.0} % of the images are empty)",
            100.0 * share,
            100.0 * fp.empty_share
        )?;
        writeln!(w, "foreground_fraction = {share:.3}")?;
        patch
    } else {
        writeln!(
            w,
            "# whole images resized to {whole}² (median side {side:.0}, clamped to {MIN_SIDE}..{MAX_WHOLE_SIDE}): the 5th-percentile lesion ({:.0} px) keeps {kept:.0} px (>= {MIN_LESION_PIXELS}, or at least half)",
            fp.lesion_area_p5
        )?;
        writeln!(w, "image_size = {whole}")?;
        whole
    };
    writeln!(w, "# {}", fp.modality())?;
    writeln!(w, "channels = {}", fp.channels)?;
    if fp.context > 0 {
        writeln!(w, "context_slices = {}", fp.context)?;
    }
    if fp.classes > 1 {
        writeln!(w, "# mask values 0..{}: class indices", fp.classes - 1)?;
    } else {
        writeln!(w, "# binary masks (any non-zero value is foreground)")?;
    }
    writeln!(w, "classes = {}", fp.classes)?;
    if let Some(i) = fp.ignore_index {
        writeln!(
            w,
            "# {i} beside the class indices: pixels left out of the loss and metrics"
        )?;
        writeln!(w, "ignore_index = {i}")?;
    }
    if !fp.fixed_split && fp.images == 1 {
        writeln!(
            w,
            "# one image pair: it is trained and validated on (no held-out score)"
        )?;
    } else if !fp.fixed_split {
        writeln!(
            w,
            "# no train/ + val/ folders: 20 % of the pairs are held out (seeded)"
        )?;
        writeln!(w, "val_fraction = 0.2")?;
    }
    let min_lesion = (fp.lesion_area_p5 / 4.0).floor() as usize;
    if min_lesion >= 2 {
        writeln!(
            w,
            "# predicted lesions under a quarter of the 5th-percentile lesion ({:.0} px) are noise: removed in validation and predict",
            fp.lesion_area_p5
        )?;
        writeln!(w, "min_lesion_pixels = {min_lesion}")?;
    }
    Ok(Input {
        patch_mode,
        side: model_side,
        scale,
    })
}

/// The `[train]` decisions: batch, updates per epoch, epochs for the budget from a timed
/// update, the schedule.
fn write_train(
    w: &mut String,
    root: &Path,
    fp: &Fingerprint,
    input: &Input,
    opts: &PlanOptions,
) -> Result<()> {
    let (patch_mode, side, scale) = (input.patch_mode, input.side, input.scale);
    // batch and budget
    let batch = ((8.0 * (128.0 * 128.0) / (side * side) as f64).round() as usize).clamp(2, 8);
    let train_images = fp.images
        - if fp.fixed_split || fp.images == 1 {
            0
        } else {
            (fp.images as f64 * 0.2).round() as usize
        };
    let updates_per_pass = train_images.max(1).div_ceil(batch);
    let steps_per_epoch = updates_per_pass.clamp(if patch_mode { 25 } else { 1 }, 50);
    let step_seconds = match opts.step_seconds {
        Some(s) if s > 0.0 && s.is_finite() => s,
        Some(s) => bail!("--step-seconds: must be > 0, got {s}"),
        // timed with at most 3 input channels (bench's images): the extra input channels of
        // 2.5-D context touch only the first convolution, < 1 % of the step
        None => time_step(fp.channels.min(3), batch, side)?,
    };
    let val_images = if fp.fixed_split {
        data::scan_pairs(&root.join("val"))?.len()
    } else {
        fp.images / 5
    };
    // validation: a forward pass per image (a third of a training update's work per image),
    // windows overlapping by half in patch mode
    let val_seconds = val_images as f64 * step_seconds / (3.0 * batch as f64)
        * if patch_mode {
            4.0 * scale.max(1.0)
        } else {
            1.0
        };
    let epoch_seconds = steps_per_epoch as f64 * step_seconds + val_seconds;
    let budget = opts.budget_minutes * 60.0;
    let epochs = ((0.85 * budget / epoch_seconds).floor() as usize).clamp(5, 500);
    writeln!(w, "[train]")?;
    writeln!(
        w,
        "# budget {:.1} min: an update of {batch} × {side}² takes {step_seconds:.2} s here, an epoch ≈ {epoch_seconds:.1} s with validation; {epochs} epochs fill 85 % of it (5..500)",
        opts.budget_minutes
    )?;
    writeln!(w, "epochs = {epochs}")?;
    writeln!(
        w,
        "# and never past the budget: a machine busier than at planning time stops early, keeping the best epoch"
    )?;
    writeln!(
        w,
        "time_limit_minutes = {}",
        toml::Value::Float(opts.budget_minutes)
    )?;
    writeln!(
        w,
        "# {batch} images of {side}² per update (8 × 128² worth of pixels, 2..8)"
    )?;
    writeln!(w, "batch_size = {batch}")?;
    if steps_per_epoch != updates_per_pass {
        writeln!(
            w,
            "# {steps_per_epoch} updates per epoch, batches drawn with replacement (one pass would be {updates_per_pass})"
        )?;
        writeln!(w, "steps_per_epoch = {steps_per_epoch}")?;
    }
    writeln!(
        w,
        "# AdamW with cosine decay after a one-epoch warm-up, clipped gradients"
    )?;
    writeln!(w, "lr = 1e-3")?;
    writeln!(w, "schedule = \"cosine\"")?;
    writeln!(w, "warmup_epochs = 1")?;
    writeln!(w, "grad_clip = 5.0")?;
    writeln!(w)?;
    Ok(())
}

/// Dice + focal; focal normalised by the running average of the positives in patch mode.
fn write_loss(w: &mut String, patch_mode: bool) -> Result<()> {
    writeln!(w, "# Dice + focal (γ = 2): the region term counts the rare lesion pixels as much as the background,")?;
    writeln!(w, "# the pixel term keeps gradients on hard pixels")?;
    writeln!(w, "[[loss]]")?;
    writeln!(w, "kind = \"dice\"")?;
    writeln!(w)?;
    writeln!(w, "[[loss]]")?;
    writeln!(w, "kind = \"focal\"")?;
    writeln!(w, "gamma = 2.0")?;
    if patch_mode {
        writeln!(
            w,
            "# divided by the running average of the lesion pixels per batch: patches hold few"
        )?;
        writeln!(w, "normalize = \"positives\"")?;
        writeln!(w, "alpha = 0.25")?;
    }
    Ok(())
}

/// The `normalize` and `clip_percentiles` decisions (see the module's rules), with comments.
fn write_normalisation(w: &mut String, fp: &Fingerprint) -> Result<()> {
    if fp.channels == 1 || fp.context > 0 {
        writeln!(
            w,
            "# grey images (or slices): each normalised by its own mean and std (z-score per image, nnU-Net's rule for MRI),"
        )?;
        writeln!(
            w,
            "# so that scans of other scanners, sequences or windows reach the network alike (here: means {:.3}..{:.3}, stds {:.3}..{:.3})",
            fp.image_means.min, fp.image_means.max, fp.image_stds.min, fp.image_stds.max
        )?;
        writeln!(w, "normalize = \"image\"")?;
    } else {
        writeln!(
            w,
            "# colour photographs: the training images' per-channel mean and std (colour carries meaning)"
        )?;
    }
    let outliers: Vec<usize> = fp
        .intensity
        .iter()
        .enumerate()
        .filter(|(_, i)| i.max - i.p99_5 > i.p99_5 - i.p0_5 || i.p0_5 - i.min > i.p99_5 - i.p0_5)
        .map(|(c, _)| c)
        .collect();
    if !outliers.is_empty() {
        writeln!(
            w,
            "# channel(s) {outliers:?}: the brightest or darkest 0.5 % of the pixels span more than the other 99 %: clipped to the 0.5th..99.5th percentile of each image"
        )?;
        writeln!(w, "clip_percentiles = [0.5, 99.5]")?;
    }
    Ok(())
}

/// Median seconds of a training update (forward, Dice + focal, backward, AdamW) of the planned
/// U-Net on random data.
fn time_step(channels: usize, batch: usize, side: usize) -> Result<f64> {
    let result = bench::train_step(&BenchOptions {
        batch,
        size: side,
        channels,
        base_width: BASE_WIDTH,
        depth: DEPTH,
        steps: 3,
        warmup: 1,
        kernels: Kernels::for_device(&candle_core::Device::Cpu),
        profile: false,
    })?;
    Ok(result.ms_median / 1e3)
}

#[cfg(test)]
mod tests {
    use super::component_areas;

    #[test]
    fn components_are_8_connected() {
        #[rustfmt::skip]
        let mask = [
            1, 1, 0, 0, 0,
            0, 0, 1, 0, 0,
            0, 0, 0, 0, 1,
            1, 0, 0, 0, 1,
        ].map(|v| v == 1);
        let mut areas = component_areas(&mask, 4, 5);
        areas.sort_by(f64::total_cmp);
        assert_eq!(areas, vec![1.0, 2.0, 3.0]);
        assert!(component_areas(&[false; 6], 2, 3).is_empty());
    }
}
