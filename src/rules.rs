//! The rules of the values a config and a model file's metadata share (one description of
//! each, used by [`Config`](crate::config::Config)'s validation, the model loader and `bench`).
//! Each returns what is wrong, without the key: the caller names the key (and the file).

use crate::model::Activation;

pub type Check = std::result::Result<(), String>;

/// Deepest U-Net (2^6 = 64: the images are halved 6 times).
pub const MAX_DEPTH: usize = 6;
/// Widest first level (the deepest has `base_width · 2^depth` channels).
pub const MAX_BASE_WIDTH: usize = 1024;
/// Largest image or patch side.
pub const MAX_SIDE: usize = 16384;
/// Masks hold one byte per pixel.
pub const MAX_CLASSES: usize = 256;
pub const MAX_WORKERS: usize = 64;
/// Cross-validation folds.
pub const MAX_FOLDS: usize = 100;
pub const MAX_BATCH_SIZE: usize = 4096;
pub const MAX_EPOCHS: usize = 1_000_000;
/// Longest time budget or limit, in minutes: a week.
pub const MAX_MINUTES: f64 = 7.0 * 24.0 * 60.0;
pub const MAX_STEPS_PER_EPOCH: usize = 1_000_000;
/// steps_per_epoch × batch_size: the sample indices of an epoch are drawn up front.
pub const MAX_ITEMS_PER_EPOCH: usize = 1 << 24;
/// Sliding-window overlap: at most 0.95, so that a window moves ≥ 5 % of its side.
pub const MAX_OVERLAP: f64 = 0.95;
/// Bounds of a model's softmax/sigmoid temperature (calibration searches [1/20, 20]).
pub const MIN_TEMPERATURE: f64 = 0.01;
pub const MAX_TEMPERATURE: f64 = 100.0;
/// Bounds of normalisation statistics (images hold values in [0, 1]).
pub const MAX_ABS_MEAN: f64 = 1e6;
pub const MIN_STD: f64 = 1e-6;
pub const MAX_STD: f64 = 1e6;

/// A run name, used as a folder name: 1 to 200 bytes, no `/`, `\\` or control
/// characters, not `.` or `..`.
pub fn name(name: &str) -> Check {
    if name.is_empty()
        || name.len() > 200
        || name.contains(['/', '\\'])
        || name.chars().any(char::is_control)
        || name == "."
        || name == ".."
    {
        return Err(format!(
            "`{}` is not usable as a folder name (1 to 200 bytes, no / or \\ or control characters)",
            name.escape_debug().take(200).collect::<String>()
        ));
    }
    Ok(())
}

/// A count in `1..=max`.
pub fn count(v: usize, max: usize) -> Check {
    if v == 0 {
        Err("must be >= 1, got 0".into())
    } else if v > max {
        Err(format!("must be ≤ {max}, got {v}"))
    } else {
        Ok(())
    }
}

/// K-fold cross-validation: 2 ..= MAX_FOLDS folds.
pub fn folds(k: usize) -> Check {
    if k < 2 {
        Err(format!(
            "must be >= 2 (one fold is held out, the others train), got {k}"
        ))
    } else {
        count(k, MAX_FOLDS)
    }
}

/// The held-out fold: 0 ..= folds − 1.
pub fn fold(i: usize, folds: usize) -> Check {
    if i >= folds {
        Err(format!(
            "must lie in 0..={} (the folds are numbered from 0), got {i}",
            folds - 1
        ))
    } else {
        Ok(())
    }
}

pub fn depth(d: usize) -> Check {
    count(d, MAX_DEPTH)
}

pub fn base_width(f: usize) -> Check {
    count(f, MAX_BASE_WIDTH)
}

/// An image or patch side the U-Net of depth `depth` (named `depth_key`) can take.
pub fn side(v: usize, depth: usize, depth_key: &str) -> Check {
    depth_in_range(depth, depth_key)?;
    let multiple = 1usize << depth;
    if v == 0 || !v.is_multiple_of(multiple) {
        return Err(format!(
            "{v} is not a positive multiple of 2^depth = {multiple} ({depth_key} = {depth})"
        ));
    }
    if v > MAX_SIDE {
        return Err(format!("must be ≤ {MAX_SIDE}, got {v}"));
    }
    Ok(())
}

fn depth_in_range(depth: usize, depth_key: &str) -> Check {
    depth
        .le(&MAX_DEPTH)
        .then_some(())
        .ok_or_else(|| format!("{depth_key} = {depth} is out of range"))
}

pub fn overlap(o: f64) -> Check {
    if (0.0..MAX_OVERLAP).contains(&o) {
        Ok(())
    } else {
        Err(format!("must lie in [0, {MAX_OVERLAP}), got {o}"))
    }
}

/// Most neighbour slices each side in 2.5-D context: 2·4 + 1 = 9 input channels. (A guard
/// against typos: the gain of context is in the nearest slices; wider is what 3-D networks
/// are for.)
pub const MAX_CONTEXT: usize = 4;

/// Most input channels of a network: 2.5-D context at [`MAX_CONTEXT`].
pub const MAX_IN_CHANNELS: usize = 2 * MAX_CONTEXT + 1;

/// 2.5-D context: 0 ..= MAX_CONTEXT neighbour slices each side.
pub fn context(k: usize) -> Check {
    match k {
        0..=MAX_CONTEXT => Ok(()),
        _ => Err(format!(
            "{k}: at most {MAX_CONTEXT} neighbour slices each side"
        )),
    }
}

/// Input channels of images: grey or RGB (1 or 3); with 2.5-D context k (slices z−k … z+k),
/// 2k + 1 (`k` checked by [`context`]).
pub fn channels(c: usize, context: usize) -> Check {
    match context {
        0 if [1, 3].contains(&c) => Ok(()),
        0 => Err(format!("must be 1 or 3, got {c}")),
        k if c != 2 * k + 1 => Err(format!(
            "must be {} (2.5-D context {k}: slices z−{k} … z+{k}), got {c}",
            2 * k + 1
        )),
        _ => Ok(()),
    }
}

pub fn classes(k: usize) -> Check {
    count(k, MAX_CLASSES)
}

pub fn activation(a: Activation, classes: usize) -> Check {
    if a == Activation::Softmax && classes < 2 {
        Err(format!(
            "softmax needs at least 2 classes, the model has {classes}"
        ))
    } else {
        Ok(())
    }
}

/// A mask value excluded from the loss and metrics: stored in a mask byte, not a class.
pub fn ignore_index(i: i64, classes: usize) -> Check {
    if (classes as i64..=255).contains(&i) {
        Ok(())
    } else {
        Err(format!(
            "{i} must lie in classes..=255 = {classes}..=255 to be stored in a mask"
        ))
    }
}

fn per_channel(values: &[f64], channels: usize) -> Check {
    if values.len() != channels {
        return Err(format!(
            "has {} entries for {channels} channels",
            values.len()
        ));
    }
    Ok(())
}

/// Per-channel means: finite, |m| ≤ MAX_ABS_MEAN.
pub fn mean(values: &[f64], channels: usize) -> Check {
    per_channel(values, channels)?;
    match values
        .iter()
        .find(|m| !(m.is_finite() && m.abs() <= MAX_ABS_MEAN))
    {
        Some(m) => Err(format!(
            "must hold finite numbers in [-{MAX_ABS_MEAN:e}, {MAX_ABS_MEAN:e}], got {m}"
        )),
        None => Ok(()),
    }
}

/// Clipping percentiles: 0 ≤ lo < hi ≤ 100.
pub fn clip_percentiles([lo, hi]: [f64; 2]) -> Check {
    if (0.0..=100.0).contains(&lo) && (0.0..=100.0).contains(&hi) && lo < hi {
        Ok(())
    } else {
        Err(format!("needs 0 <= lo < hi <= 100, got [{lo}, {hi}]"))
    }
}

/// Per-channel standard deviations: > 0, in [MIN_STD, MAX_STD].
pub fn std(values: &[f64], channels: usize) -> Check {
    per_channel(values, channels)?;
    match values.iter().find(|s| !(MIN_STD..=MAX_STD).contains(*s)) {
        Some(s) => Err(format!(
            "must be > 0, finite and lie in [{MIN_STD:e}, {MAX_STD:e}], got {s}"
        )),
        None => Ok(()),
    }
}

pub fn temperature(t: f64) -> Check {
    if (MIN_TEMPERATURE..=MAX_TEMPERATURE).contains(&t) {
        Ok(())
    } else {
        Err(format!(
            "must be > 0, finite and lie in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], got {t}"
        ))
    }
}
