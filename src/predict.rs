//! `segtrain predict` and `segtrain eval`: a trained model applied to image files or to a
//! dataset folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use image::{ImageBuffer, Luma};

use crate::data::{self, Format};
use crate::export::{self, ModelMeta};
use crate::fsutil::write_png;
use crate::inference::{self, Predictor, Window};
use crate::metrics::Report;
use crate::model::UNet;

/// What `predict` writes beside each mask.
#[derive(Debug, Clone, Copy)]
pub struct PredictOptions {
    /// Foreground threshold on the probability (one sigmoid channel).
    pub threshold: f64,
    /// Also write `<stem>_overlay.png`: the image with the mask's outline.
    pub overlay: bool,
    /// Also write `<stem>_prob.png` (16-bit, p·65535; `_prob_c<k>` per class).
    pub probabilities: bool,
    /// Sliding-window overlap instead of the model's.
    pub overlap: Option<f64>,
}

/// Input files: image files as given, folders expanded to the images they hold (sorted).
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = vec![];
    for input in inputs {
        if input.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(input)
                .with_context(|| format!("cannot list {}", input.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.extension().is_some_and(|e| {
                        ["png", "jpg", "jpeg"]
                            .contains(&e.to_string_lossy().to_ascii_lowercase().as_str())
                    })
                })
                .collect();
            found.sort();
            files.extend(found);
        } else if input.is_file() {
            files.push(input.clone());
        } else {
            bail!("{}: no such input file or folder", input.display());
        }
    }
    if files.is_empty() {
        bail!("no input images");
    }
    Ok(files)
}

/// The predictor of a loaded model, with an optional overlap override for sliding windows.
pub fn predictor<'a>(
    model: &'a UNet,
    meta: &'a ModelMeta,
    overlap: Option<f64>,
    device: &'a Device,
) -> Predictor<'a> {
    let window = match (meta.window, overlap) {
        (Window::Sliding { patch, blend, .. }, Some(overlap)) => Window::Sliding {
            patch,
            overlap,
            blend,
        },
        (w, _) => w,
    };
    Predictor {
        model,
        activation: meta.activation,
        temperature: meta.temperature,
        window,
        mean: &meta.mean,
        std: &meta.std,
        batch: 8,
        device,
    }
}

/// Predicts a mask for every input and writes the outputs into `out`. Returns the files
/// written.
pub fn predict(
    model_path: &Path,
    inputs: &[PathBuf],
    out: &Path,
    opts: PredictOptions,
    device: &Device,
) -> Result<Vec<PathBuf>> {
    let (model, meta) = export::load(model_path, device)?;
    let predictor = predictor(&model, &meta, opts.overlap, device);
    let files = expand_inputs(inputs)?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the output folder {}", out.display()))?;
    let mut written = vec![];
    for file in &files {
        let decoded = image::ImageReader::open(file)
            .with_context(|| format!("cannot open {}", file.display()))?
            .with_guessed_format()?
            .decode()
            .map_err(|e| anyhow::anyhow!("{}: not a readable image ({e})", file.display()))?;
        let (planar, (h, w)) = data::image_to_planar(&decoded, meta.unet.in_channels, None);
        let probs = predictor.probabilities(&[(&planar, h, w)])?.remove(0);
        let classes = meta.unet.classes;
        let labels = inference::labels(&probs, classes, opts.threshold);
        let (w32, h32) = (w as u32, h as u32);
        let stem = file
            .file_stem()
            .expect("a file name")
            .to_string_lossy()
            .to_string();
        let mask_values: Vec<u8> = if classes == 1 {
            labels.iter().map(|&l| l * 255).collect()
        } else {
            labels.clone()
        };
        let path = out.join(format!("{stem}_mask.png"));
        write_png(
            &path,
            &ImageBuffer::<Luma<u8>, _>::from_raw(w32, h32, mask_values).expect("size"),
        )?;
        written.push(path);
        if opts.overlay {
            let path = out.join(format!("{stem}_overlay.png"));
            write_png(&path, &overlay(&decoded.to_rgb8(), &labels))?;
            written.push(path);
        }
        if opts.probabilities {
            for (k, plane) in probs.chunks(h * w).enumerate() {
                let name = if classes == 1 {
                    format!("{stem}_prob.png")
                } else {
                    format!("{stem}_prob_c{k}.png")
                };
                let values: Vec<u16> = plane
                    .iter()
                    .map(|p| (p.clamp(0.0, 1.0) * 65535.0).round() as u16)
                    .collect();
                let path = out.join(name);
                write_png(
                    &path,
                    &ImageBuffer::<Luma<u16>, _>::from_raw(w32, h32, values).expect("size"),
                )?;
                written.push(path);
            }
        }
    }
    Ok(written)
}

/// The image with the outline of every predicted region drawn in a colour per class.
fn overlay(rgb: &image::RgbImage, labels: &[u8]) -> image::RgbImage {
    const COLOURS: [[u8; 3]; 6] = [
        [255, 40, 40],
        [40, 220, 40],
        [60, 120, 255],
        [255, 220, 0],
        [255, 0, 255],
        [0, 230, 230],
    ];
    let (w, h) = rgb.dimensions();
    let mut out = rgb.clone();
    let at = |x: u32, y: u32| labels[(y * w + x) as usize];
    for y in 0..h {
        for x in 0..w {
            let l = at(x, y);
            if l == 0 {
                continue;
            }
            let edge = x == 0
                || y == 0
                || x + 1 == w
                || y + 1 == h
                || at(x - 1, y) != l
                || at(x + 1, y) != l
                || at(x, y - 1) != l
                || at(x, y + 1) != l;
            if edge {
                out.put_pixel(x, y, image::Rgb(COLOURS[(l as usize - 1) % COLOURS.len()]));
            }
        }
    }
    out
}

/// The folder of image/mask pairs of a data set: `images/` + `masks/`, or its `val/` split.
pub fn dataset_folder(data_dir: &Path) -> Result<PathBuf> {
    if data_dir.join("images").is_dir() {
        Ok(data_dir.to_path_buf())
    } else if data_dir.join("val").join("images").is_dir() {
        Ok(data_dir.join("val"))
    } else {
        bail!(
            "{}: no images/ + masks/ (or val/images/) folder",
            data_dir.display()
        )
    }
}

/// The labelled images of a dataset folder (`images/` + `masks/`, or its `val/` split) at
/// native resolution, read in the format of the model `meta` describes.
pub fn labelled_images(data_dir: &Path, meta: &ModelMeta) -> Result<(Vec<data::Sample>, Format)> {
    let dir = dataset_folder(data_dir)?;
    let format = Format {
        channels: meta.unet.in_channels,
        classes: meta.unet.classes,
        ignore_index: meta.ignore_index,
        resize: None,
    };
    let samples = data::load_pairs(&data::scan_pairs(&dir)?, &format)?;
    Ok((samples, format))
}

/// Metrics of a model on a dataset folder (`images/` + `masks/`, or its `val/` split), at the
/// images' native resolution.
pub fn evaluate(
    model_path: &Path,
    data_dir: &Path,
    overlap: Option<f64>,
    device: &Device,
) -> Result<Report> {
    let (model, meta) = export::load(model_path, device)?;
    let (samples, format) = labelled_images(data_dir, &meta)?;
    let evaluation =
        predictor(&model, &meta, overlap, device).evaluate(&samples, format.ignore_mask_value())?;
    Ok(evaluation.report())
}
