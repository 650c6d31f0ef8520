//! `segtrain predict` and `segtrain eval`: a trained model applied to image files or to a
//! dataset folder.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use image::{ImageBuffer, ImageFormat, Luma};

use crate::data::{self, normalize, Format};
use crate::export::{self, ModelMeta};
use crate::fsutil::atomic_write;
use crate::inference::{self, probabilities};
use crate::metrics::{Evaluation, Report};
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
        let (w, h) = (decoded.width(), decoded.height());
        let probs = predict_probabilities(&model, &meta, &decoded, device)?;
        let classes = probs.len();
        // resize each class's probability back to the input's size (bilinear)
        let full: Vec<Vec<f32>> = probs
            .into_iter()
            .map(|p| resize_plane(p, meta.image_size as u32, (w, h)))
            .collect();
        let labels = labels_from_planes(&full, opts.threshold);
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
        write_image(
            &path,
            &ImageBuffer::<Luma<u8>, _>::from_raw(w, h, mask_values).expect("size"),
        )?;
        written.push(path);
        if opts.overlay {
            let path = out.join(format!("{stem}_overlay.png"));
            write_image(&path, &overlay(&decoded.to_rgb8(), &labels))?;
            written.push(path);
        }
        if opts.probabilities {
            for (k, plane) in full.iter().enumerate() {
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
                write_image(
                    &path,
                    &ImageBuffer::<Luma<u16>, _>::from_raw(w, h, values).expect("size"),
                )?;
                written.push(path);
            }
        }
    }
    Ok(written)
}

/// The model's probabilities for one image, one `size × size` plane per class.
pub fn predict_probabilities(
    model: &UNet,
    meta: &ModelMeta,
    img: &image::DynamicImage,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let (c, s) = (meta.unet.in_channels, meta.image_size);
    let mut planar = data::image_to_planar(img, c, s);
    normalize(&mut planar, &meta.mean, &meta.std);
    let x = Tensor::from_vec(planar, (1, c, s, s), device)?;
    let logits = model.forward(&x, false)?;
    let probs = probabilities(&logits, meta.activation, meta.temperature)?;
    Ok(probs
        .squeeze(0)?
        .flatten_from(1)?
        .to_device(&Device::Cpu)?
        .to_vec2::<f32>()?)
}

fn resize_plane(plane: Vec<f32>, side: u32, (w, h): (u32, u32)) -> Vec<f32> {
    let img =
        ImageBuffer::<Luma<f32>, Vec<f32>>::from_raw(side, side, plane).expect("a square plane");
    if (w, h) == (side, side) {
        return img.into_raw();
    }
    image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle).into_raw()
}

/// Class per pixel: one plane → p > threshold; several → the most probable.
fn labels_from_planes(planes: &[Vec<f32>], threshold: f64) -> Vec<u8> {
    let n = planes[0].len();
    if planes.len() == 1 {
        return planes[0]
            .iter()
            .map(|&p| u8::from(p as f64 > threshold))
            .collect();
    }
    (0..n)
        .map(|i| {
            let mut best = 0;
            for k in 1..planes.len() {
                if planes[k][i] > planes[best][i] {
                    best = k;
                }
            }
            best as u8
        })
        .collect()
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

fn write_image<P, C>(path: &Path, img: &ImageBuffer<P, C>) -> Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let mut bytes = Cursor::new(vec![]);
    img.write_to(&mut bytes, ImageFormat::Png)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    atomic_write(path, bytes.get_ref())
}

/// Metrics of a model on a dataset folder (`images/` + `masks/`, or its `val/` split).
pub fn evaluate(
    model_path: &Path,
    data_dir: &Path,
    device: &Device,
) -> Result<(Report, Evaluation)> {
    let (model, meta) = export::load(model_path, device)?;
    let dir = if data_dir.join("images").is_dir() {
        data_dir.to_path_buf()
    } else if data_dir.join("val").join("images").is_dir() {
        data_dir.join("val")
    } else {
        bail!(
            "{}: no images/ + masks/ (or val/images/) folder",
            data_dir.display()
        );
    };
    let format = Format {
        channels: meta.unet.in_channels,
        size: meta.image_size,
        classes: meta.unet.classes,
        ignore_index: meta.ignore_index,
    };
    let pairs = data::scan_pairs(&dir)?;
    let samples = data::load_pairs(&pairs, &format)?;
    let recipe = data::loader::BatchRecipe {
        samples: std::sync::Arc::new(samples),
        channels: format.channels,
        size: format.size,
        mean: meta.mean.clone(),
        std: meta.std.clone(),
        augment: None,
    };
    let evaluation = inference::evaluate(
        &model,
        data::loader::eval_batches(&recipe, 8),
        device,
        meta.activation,
        meta.temperature,
        meta.ignore_index.map(|i| i as u8),
    )?;
    Ok((evaluation.report(), evaluation))
}
