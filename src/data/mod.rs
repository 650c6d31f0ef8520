//! Datasets: folders of image/mask pairs, read once into memory, split, normalised.
//!
//! Layout: `ROOT/images/<stem>.{png,jpg,jpeg}` with `ROOT/masks/<stem>.png`, or `ROOT/train/…`
//! and `ROOT/val/…` with the same layout. Images are converted to the configured channels and
//! resized to `image_size` (bilinear); masks are resized with nearest neighbour. Binary masks
//! (classes = 1): any non-zero value is foreground. Class-index masks: value = class, or
//! `ignore_index`.

pub mod augment;
pub mod loader;
pub mod synth;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::config::DataConfig;

/// One image/mask pair on disk.
#[derive(Debug, Clone)]
pub struct PairPaths {
    pub stem: String,
    pub image: PathBuf,
    pub mask: PathBuf,
}

/// A loaded pair: the image as planar `channels × h × w` values in [0, 1] (not yet normalised)
/// and the mask as one class index per pixel (`ignore_index` kept as is).
#[derive(Debug, Clone)]
pub struct Sample {
    pub stem: String,
    pub image: Vec<f32>,
    pub mask: Vec<u8>,
    pub h: usize,
    pub w: usize,
}

impl Sample {
    /// Whether the mask holds any pixel of a class other than background (and ignore).
    pub fn has_foreground(&self, ignore: Option<u8>) -> bool {
        self.mask.iter().any(|&m| m != 0 && Some(m) != ignore)
    }
}

/// How to read pairs: channels and classes the model expects, and the size images are resized
/// to (`None`: native resolution).
#[derive(Debug, Clone, Copy)]
pub struct Format {
    pub channels: usize,
    pub classes: usize,
    pub ignore_index: Option<i64>,
    pub resize: Option<usize>,
}

impl Format {
    /// The training format of a config: resized to `image_size` (whole-image mode, or patch
    /// mode with an `image_size`), otherwise native.
    pub fn of(cfg: &DataConfig) -> Self {
        Self {
            channels: cfg.channels,
            classes: cfg.classes,
            ignore_index: cfg.ignore_index,
            resize: cfg.image_size,
        }
    }

    /// The same format at native resolution.
    pub fn native(&self) -> Self {
        Self {
            resize: None,
            ..*self
        }
    }

    /// The mask value of ignored pixels, as stored in `Sample::mask`.
    pub fn ignore_mask_value(&self) -> Option<u8> {
        self.ignore_value()
    }

    /// The mask value stored for ignored pixels (must fit a u8 mask).
    fn ignore_value(&self) -> Option<u8> {
        self.ignore_index.and_then(|i| u8::try_from(i).ok())
    }
}

const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// The pairs of one `images/` + `masks/` folder, sorted by stem. A missing partner is an error
/// that names the file.
pub fn scan_pairs(dir: &Path) -> Result<Vec<PairPaths>> {
    let (images_dir, masks_dir) = (dir.join("images"), dir.join("masks"));
    for d in [&images_dir, &masks_dir] {
        if !d.is_dir() {
            bail!(
                "{}: missing folder; a dataset holds images/<stem>.png|jpg and masks/<stem>.png",
                d.display()
            );
        }
    }
    let list = |d: &Path, extensions: &[&str]| -> Result<BTreeMap<String, PathBuf>> {
        let mut found = BTreeMap::new();
        for entry in std::fs::read_dir(d).with_context(|| format!("cannot list {}", d.display()))? {
            let path = entry?.path();
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            if !path.is_file() || !extensions.contains(&ext.as_str()) {
                continue;
            }
            let stem = path
                .file_stem()
                .expect("a file name")
                .to_string_lossy()
                .to_string();
            if let Some(previous) = found.insert(stem.clone(), path.clone()) {
                bail!(
                    "{} and {}: two images with the stem `{stem}`",
                    previous.display(),
                    path.display()
                );
            }
        }
        Ok(found)
    };
    let images = list(&images_dir, IMAGE_EXTENSIONS)?;
    let masks = list(&masks_dir, &["png"])?;
    for (stem, path) in &masks {
        if !images.contains_key(stem) {
            bail!(
                "{}: mask without an image (no images/{stem}.png|jpg)",
                path.display()
            );
        }
    }
    images
        .into_iter()
        .map(|(stem, image)| match masks.get(&stem) {
            Some(mask) => Ok(PairPaths {
                stem,
                image,
                mask: mask.clone(),
            }),
            None => Err(anyhow!(
                "{}: image without a mask (expected {})",
                image.display(),
                masks_dir.join(format!("{stem}.png")).display()
            )),
        })
        .collect()
}

/// An image read from a file.
pub struct LoadedImage {
    /// Planar `channels × h × w` values in [0, 1].
    pub planes: Vec<f32>,
    /// Its (h, w) after any resize.
    pub hw: (usize, usize),
    /// The file's (width, height).
    pub file_dims: (u32, u32),
}

/// Reads an image, resized to `size × size` if given.
pub fn load_image(path: &Path, channels: usize, size: Option<usize>) -> Result<LoadedImage> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read {}", path.display()))?
        .decode()
        .map_err(|e| anyhow!("{}: not a readable image ({e})", path.display()))?;
    let file_dims = (img.width(), img.height());
    let (planes, hw) = image_to_planar(&img, channels, size);
    Ok(LoadedImage {
        planes,
        hw,
        file_dims,
    })
}

/// Converts a decoded image to `channels` (grey or RGB), resized to `size × size` if given
/// (bilinear, antialiased when shrinking), as planar f32 in [0, 1], with its (h, w).
pub fn image_to_planar(
    img: &image::DynamicImage,
    channels: usize,
    size: Option<usize>,
) -> (Vec<f32>, (usize, usize)) {
    use image::imageops::{resize, FilterType};
    let rgb = if channels == 1 {
        image::DynamicImage::ImageLuma16(img.to_luma16()).into_rgb32f()
    } else {
        img.to_rgb32f()
    };
    let rgb = match size {
        Some(s) if (rgb.width(), rgb.height()) != (s as u32, s as u32) => {
            resize(&rgb, s as u32, s as u32, FilterType::Triangle)
        }
        _ => rgb,
    };
    let hw = (rgb.height() as usize, rgb.width() as usize);
    let planes: Vec<Vec<f32>> = (0..channels)
        .map(|c| rgb.pixels().map(|p| p.0[c]).collect())
        .collect();
    (planes.concat(), hw)
}

/// Bilinear resize (pixel centres aligned) of planar `c × h × w` values to `nh × nw`.
pub fn resize_planar(
    values: &[f32],
    c: usize,
    (h, w): (usize, usize),
    (nh, nw): (usize, usize),
) -> Vec<f32> {
    if (h, w) == (nh, nw) {
        return values.to_vec();
    }
    let axis = |n: usize, from: usize| -> Vec<(usize, usize, f32)> {
        (0..n)
            .map(|o| {
                let src =
                    ((o as f64 + 0.5) * from as f64 / n as f64 - 0.5).clamp(0.0, (from - 1) as f64);
                let lo = src.floor() as usize;
                (lo, (lo + 1).min(from - 1), (src - lo as f64) as f32)
            })
            .collect()
    };
    let (ys, xs) = (axis(nh, h), axis(nw, w));
    let mut out = Vec::with_capacity(c * nh * nw);
    for plane in values.chunks(h * w).take(c) {
        for &(y0, y1, fy) in &ys {
            for &(x0, x1, fx) in &xs {
                let top = plane[y0 * w + x0] + (plane[y0 * w + x1] - plane[y0 * w + x0]) * fx;
                let bottom = plane[y1 * w + x0] + (plane[y1 * w + x1] - plane[y1 * w + x0]) * fx;
                out.push(top + (bottom - top) * fy);
            }
        }
    }
    out
}

/// A mask PNG's values, one per pixel: grey level (8 or 16 bit), palette index, or for colour
/// masks the largest of R, G, B (alpha is ignored).
pub struct MaskValues {
    pub values: Vec<u32>,
    pub width: u32,
    pub height: u32,
    /// True for RGB(A) masks, which can only be binary.
    pub colour: bool,
}

/// Reads a mask PNG without any colour conversion (palette indices stay indices).
pub fn read_mask_values(path: &Path) -> Result<MaskValues> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut decoder = png::Decoder::new(std::io::BufReader::new(file));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder
        .read_info()
        .map_err(|e| anyhow!("{}: not a readable PNG mask ({e})", path.display()))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| anyhow!("{}: PNG too large", path.display()))?;
    let mut buf = vec![0; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| anyhow!("{}: corrupt PNG mask ({e})", path.display()))?;
    let samples = info.color_type.samples();
    let colour_samples = match info.color_type {
        png::ColorType::GrayscaleAlpha | png::ColorType::Rgba => samples - 1,
        _ => samples,
    };
    let bits = info.bit_depth as usize;
    let sample = |row: &[u8], i: usize| -> u32 {
        match bits {
            16 => u16::from_be_bytes([row[2 * i], row[2 * i + 1]]) as u32,
            8 => row[i] as u32,
            _ => {
                let per_byte = 8 / bits;
                let shift = 8 - bits * (i % per_byte + 1);
                ((row[i / per_byte] >> shift) as u32) & ((1 << bits) - 1)
            }
        }
    };
    let (w, h) = (info.width as usize, info.height as usize);
    let mut values = Vec::with_capacity(w * h);
    for y in 0..h {
        let row = &buf[y * info.line_size..(y + 1) * info.line_size];
        for x in 0..w {
            let v = (0..colour_samples)
                .map(|c| sample(row, x * samples + c))
                .max();
            values.push(v.unwrap_or(0));
        }
    }
    Ok(MaskValues {
        values,
        width: info.width,
        height: info.height,
        colour: colour_samples == 3,
    })
}

/// Reads a mask and maps it to class indices, resized to the format's size if any (nearest
/// neighbour). Binary: any non-zero value is 1. Class-index: each value must be a class or
/// `ignore_index`. Returns the mask and the file's (width, height).
pub fn load_mask(path: &Path, format: &Format) -> Result<(Vec<u8>, (u32, u32))> {
    let MaskValues {
        values,
        width: w,
        height: h,
        colour,
    } = read_mask_values(path)?;
    if colour && format.classes > 1 {
        bail!(
            "{}: an RGB mask can only be binary; class-index masks (classes = {}) must be grey or palette PNGs",
            path.display(),
            format.classes
        );
    }
    let ignore = format.ignore_index;
    let classes: Vec<u8> = if format.classes == 1 && ignore.is_none() {
        values.iter().map(|&v| u8::from(v > 0)).collect()
    } else {
        let ignore_value = format.ignore_value();
        values
            .iter()
            .map(|&v| {
                if Some(v as i64) == ignore {
                    return Ok(ignore_value.expect("checked ignore_index"));
                }
                if format.classes == 1 {
                    return Ok(u8::from(v > 0));
                }
                if (v as usize) < format.classes {
                    Ok(v as u8)
                } else {
                    let ignored = match ignore {
                        Some(i) => format!(" or ignore_index {i}"),
                        None => String::new(),
                    };
                    Err(anyhow!(
                        "{}: mask value {v} is not a class (classes = {}: values 0..={}{ignored})",
                        path.display(),
                        format.classes,
                        format.classes - 1
                    ))
                }
            })
            .collect::<Result<_>>()?
    };
    let mask = match format.resize {
        Some(size) => resize_nearest(&classes, (h as usize, w as usize), (size, size)),
        None => classes,
    };
    Ok((mask, (w, h)))
}

/// Nearest-neighbour resize of an `h × w` map to `nh × nw` (pixel centres aligned).
pub fn resize_nearest(values: &[u8], (h, w): (usize, usize), (nh, nw): (usize, usize)) -> Vec<u8> {
    let mut out = Vec::with_capacity(nh * nw);
    for y in 0..nh {
        let sy = (((y as f64 + 0.5) * h as f64 / nh as f64) as usize).min(h - 1);
        for x in 0..nw {
            let sx = (((x as f64 + 0.5) * w as f64 / nw as f64) as usize).min(w - 1);
            out.push(values[sy * w + sx]);
        }
    }
    out
}

/// Loads one pair; image and mask must have the same size.
pub fn load_pair(pair: &PairPaths, format: &Format) -> Result<Sample> {
    let LoadedImage {
        planes: image,
        hw: (h, w),
        file_dims: image_dims,
    } = load_image(&pair.image, format.channels, format.resize)?;
    let (mask, mask_dims) = load_mask(&pair.mask, format)?;
    if image_dims != mask_dims {
        bail!(
            "{} is {}×{} but its mask {} is {}×{}",
            pair.image.display(),
            image_dims.0,
            image_dims.1,
            pair.mask.display(),
            mask_dims.0,
            mask_dims.1
        );
    }
    Ok(Sample {
        stem: pair.stem.clone(),
        image,
        mask,
        h,
        w,
    })
}

/// Loads pairs in parallel, in order.
pub fn load_pairs(pairs: &[PairPaths], format: &Format) -> Result<Vec<Sample>> {
    pairs.par_iter().map(|p| load_pair(p, format)).collect()
}

/// The training and validation samples of a dataset and the normalisation applied to images.
pub struct Dataset {
    pub train: Vec<Sample>,
    pub val: Vec<Sample>,
    pub format: Format,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// A generated data set must match `data.synth`: changing a knob (say `label_noise`) while
/// `data.root` still holds the data of the old one would silently train on the wrong data.
fn check_generated_with(root: &Path, synth: &synth::SynthConfig) -> Result<()> {
    let path = root.join("synth.toml");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(()); // not generated by segtrain: the folder is the user's data
    };
    let written: synth::SynthConfig =
        toml::from_str(&text).with_context(|| format!("{}: not a synth config", path.display()))?;
    let table = |s: &synth::SynthConfig| -> Result<toml::Table> {
        match toml::Value::try_from(s)? {
            toml::Value::Table(t) => Ok(t),
            _ => unreachable!("a synth config serialises to a table"),
        }
    };
    if let Some((key, values)) =
        crate::config::first_difference(&table(&written)?, &table(synth)?, "")
    {
        bail!(
            "data.synth.{key}: {} was generated with other settings (on disk vs config: {values}); point data.root at a new folder or remove it",
            root.display()
        );
    }
    Ok(())
}

impl Dataset {
    /// Reads `root` (generating it first from `cfg.synth` when it does not exist), splits it
    /// (`train/` + `val/` folders, or a seeded `val_fraction` split) and computes the
    /// per-channel mean and std of the training images unless the config gives them.
    pub fn open(cfg: &DataConfig, seed: u64) -> Result<Self> {
        let root = &cfg.root;
        if !root.exists() {
            match &cfg.synth {
                Some(synth) => {
                    eprintln!(
                        "generating the synthetic `{}` data set in {} ({} images of {}^2)",
                        synth.kind.name(),
                        root.display(),
                        synth.count,
                        synth.size
                    );
                    synth::write_dataset(synth, root)?;
                }
                None => bail!("data.root: {} does not exist", root.display()),
            }
        } else if let Some(synth) = &cfg.synth {
            check_generated_with(root, synth)?;
        }
        let format = Format::of(cfg);
        if let Some(i) = format.ignore_index {
            if format.ignore_value().is_none() || (i as usize) < format.classes {
                bail!("data.ignore_index: {i} must lie in classes..=255 to be stored in a mask");
            }
        }
        let (train_pairs, val_pairs) = if root.join("train").is_dir() && root.join("val").is_dir() {
            (
                scan_pairs(&root.join("train"))?,
                scan_pairs(&root.join("val"))?,
            )
        } else {
            let mut all = scan_pairs(root)?;
            if all.len() < 2 {
                bail!(
                    "{}: found {} image/mask pair(s); need at least 2 to hold one out for validation",
                    root.display(),
                    all.len()
                );
            }
            let split_seed = cfg.split_seed.unwrap_or(seed);
            all.shuffle(&mut ChaCha8Rng::seed_from_u64(split_seed ^ 0x5EED_5711));
            let n_val =
                ((all.len() as f64 * cfg.val_fraction).round() as usize).clamp(1, all.len() - 1);
            let val = all.split_off(all.len() - n_val);
            (all, val)
        };
        if train_pairs.is_empty() {
            bail!("{}: no training images", root.display());
        }
        if val_pairs.is_empty() {
            bail!("{}: the validation split is empty", root.display());
        }
        let train = load_pairs(&train_pairs, &format)?;
        // validation always at native resolution: metrics count the pixels of the real masks
        let val = load_pairs(&val_pairs, &format.native())?;
        let (mean, std) = match (&cfg.mean, &cfg.std) {
            (Some(m), Some(s)) => (
                m.iter().map(|&v| v as f32).collect(),
                s.iter().map(|&v| v as f32).collect(),
            ),
            (m, s) => {
                let (cm, cs) = channel_stats(&train, format.channels);
                (
                    m.as_ref()
                        .map_or(cm, |m| m.iter().map(|&v| v as f32).collect()),
                    s.as_ref()
                        .map_or(cs, |s| s.iter().map(|&v| v as f32).collect()),
                )
            }
        };
        Ok(Self {
            train,
            val,
            format,
            mean,
            std,
        })
    }
}

/// Per-channel mean and standard deviation of planar images (std floored at 1e-3).
pub fn channel_stats(samples: &[Sample], channels: usize) -> (Vec<f32>, Vec<f32>) {
    (0..channels)
        .map(|c| {
            let (mut sum, mut sq, mut n) = (0f64, 0f64, 0f64);
            for s in samples {
                let plane = s.h * s.w;
                for &v in &s.image[c * plane..(c + 1) * plane] {
                    sum += v as f64;
                    sq += (v as f64) * (v as f64);
                    n += 1.0;
                }
            }
            let mean = sum / n;
            let var = (sq / n - mean * mean).max(0.0);
            (mean as f32, (var.sqrt().max(1e-3)) as f32)
        })
        .unzip()
}

/// `(x − mean) / std` per channel of a planar image, in place.
pub fn normalize(image: &mut [f32], mean: &[f32], std: &[f32]) {
    let plane = image.len() / mean.len();
    for (c, chunk) in image.chunks_mut(plane).enumerate() {
        let (m, s) = (mean[c], std[c]);
        chunk.iter_mut().for_each(|v| *v = (*v - m) / s);
    }
}
