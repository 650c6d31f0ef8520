//! `segtrain predict` and `segtrain eval`: a trained model applied to image files, scans
//! ([`volume`]) or a dataset folder.

pub mod volume;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use image::{ImageBuffer, Luma};

use crate::data::{self, Format};
use crate::export::{self, ModelMeta};
use crate::fsutil::write_png;
use crate::import::volume_stem;
use crate::inference::{self, Predictor, Window};
use crate::metrics::Report;
use crate::model::SegmentationModel;

/// What `predict` writes beside each mask.
#[derive(Debug, Clone, Copy)]
pub struct PredictOptions {
    /// Foreground threshold on the probability (one sigmoid channel).
    pub threshold: f64,
    /// Also write `<stem>_overlay.png`: the image with the mask's outline.
    pub overlay: bool,
    /// Also write `<stem>_prob.png` (16-bit, p·65535; `_prob_c<k>` per class).
    pub probabilities: bool,
    /// How the model is applied.
    pub inference: Inference,
    /// How scans are cut into slices, beyond what the model records.
    pub slicing: volume::SlicingChoice,
}

/// What [`predict`] did.
#[derive(Debug, Clone)]
pub struct Predicted {
    /// The files written.
    pub written: Vec<PathBuf>,
    /// A warning for the user: scans were cut with settings the model does not record.
    pub note: Option<String>,
}

/// How a trained model is applied, beyond what its file records.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inference {
    /// Sliding-window overlap instead of the model's.
    pub overlap: Option<f64>,
    /// Test-time augmentation: the mean probability over the flips and 90° rotations the model
    /// was trained with (its config's `data.augment`; all 8 when the file records none).
    pub tta: bool,
    /// Remove predicted lesions smaller than this many pixels (default: the model config's
    /// `data.min_lesion_pixels`).
    pub min_lesion_pixels: Option<usize>,
}

/// Why a path given or found as an input cannot be read, in words.
fn unreadable(path: &Path, e: &std::io::Error) -> anyhow::Error {
    if e.raw_os_error() == Some(libc::ELOOP) {
        anyhow!("{}: a loop of symbolic links", path.display())
    } else if e.kind() == std::io::ErrorKind::NotFound && path.is_symlink() {
        anyhow!("{}: a broken symbolic link", path.display())
    } else if e.kind() == std::io::ErrorKind::NotFound {
        anyhow!("{}: no such input file or folder", path.display())
    } else {
        anyhow!("cannot read {}: {e}", path.display())
    }
}

/// Whether `path` names a scan (NIfTI or NRRD) rather than a 2-D image.
fn is_volume(path: &Path) -> bool {
    volume_stem(path).is_some()
}

/// Input files: image and volume files as given, folders expanded to the images and volumes
/// they hold (sorted; hidden files skipped; not recursive). A file given twice is predicted once. Anything that is not a
/// regular file (a FIFO, a device, a folder named like an image inside an input folder) is an
/// error naming it, so that nothing blocks or is skipped silently.
pub fn expand_inputs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut files = vec![];
    let mut empty_folders = vec![];
    for input in inputs {
        if input.as_os_str().is_empty() {
            bail!("an input path is empty (an unset variable?)");
        }
        let meta = std::fs::metadata(input).map_err(|e| unreadable(input, &e))?;
        if meta.is_dir() {
            let mut found = vec![];
            for entry in std::fs::read_dir(input)
                .with_context(|| format!("cannot list {}", input.display()))?
            {
                let path = entry
                    .with_context(|| format!("cannot list {}", input.display()))?
                    .path();
                if data::is_hidden(&path)
                    || (data::image_extension(&path).is_none() && !is_volume(&path))
                {
                    continue;
                }
                let meta = std::fs::metadata(&path).map_err(|e| unreadable(&path, &e))?;
                if meta.is_dir() {
                    bail!(
                        "{}: a folder named like an image (input folders are not searched recursively)",
                        path.display()
                    );
                }
                if !meta.is_file() {
                    bail!(
                        "{}: not a regular file (a FIFO, device or socket)",
                        path.display()
                    );
                }
                found.push(path);
            }
            if found.is_empty() {
                empty_folders.push(input.display().to_string());
            }
            found.sort();
            files.extend(found);
        } else if meta.is_file() {
            files.push(input.clone());
        } else {
            bail!(
                "{}: not a regular file (a FIFO, device or socket)",
                input.display()
            );
        }
    }
    // the same file reached twice (given and inside a given folder, or through a link)
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())));
    if files.is_empty() {
        if empty_folders.is_empty() {
            bail!("no input images");
        }
        bail!(
            "no input images: {} holds no .png, .jpg or .jpeg image and no .nii, .nii.gz, .nrrd or .nhdr volume",
            empty_folders.join(", ")
        );
    }
    Ok(files)
}

/// Checks the options a caller may get wrong: the threshold a probability in [0, 1], the
/// overlap in [0, 0.95).
pub fn check_options(opts: &PredictOptions) -> Result<()> {
    if !(0.0..=1.0).contains(&opts.threshold) {
        bail!(
            "--threshold must lie in [0, 1] (a probability), got {}",
            opts.threshold
        );
    }
    check_overlap(opts.inference.overlap)
}

/// A sliding-window overlap override obeys the config's rule ([`rules::overlap`]; NaN is
/// refused).
pub fn check_overlap(overlap: Option<f64>) -> Result<()> {
    match overlap {
        Some(o) => crate::rules::overlap(o).map_err(|m| anyhow!("--overlap: {m}")),
        None => Ok(()),
    }
}

/// The file names `predict` writes for the input `file`: an image's ([`output_names`]) or a
/// volume's ([`volume::output_names`]).
fn outputs_of(file: &Path, classes: usize, opts: &PredictOptions) -> Result<Vec<String>> {
    if let Some(name) = volume_stem(file) {
        if opts.overlay {
            bail!(
                "{}: --overlay draws outlines on 2-D images; a volume gets none (open \
                 <volume>_seg.nii.gz over the scan in a viewer)",
                file.display()
            );
        }
        return Ok(volume::output_names(name, classes, opts.probabilities));
    }
    let stem = file
        .file_stem()
        .with_context(|| format!("{}: not a file name", file.display()))?
        .to_string_lossy();
    Ok(output_names(&stem, classes, opts))
}

/// The file names `predict` writes for the image of stem `stem`.
pub fn output_names(stem: &str, classes: usize, opts: &PredictOptions) -> Vec<String> {
    let mut names = vec![format!("{stem}_mask.png")];
    if opts.overlay {
        names.push(format!("{stem}_overlay.png"));
    }
    if opts.probabilities {
        if classes == 1 {
            names.push(format!("{stem}_prob.png"));
        } else {
            names.extend((0..classes).map(|k| format!("{stem}_prob_c{k}.png")));
        }
    }
    names
}

/// The output folder must be a folder (or not exist yet), must not be one of the input
/// folders (a later run would take the masks written there for images), and no two inputs may
/// write the same output file, nor any output replace an input.
fn check_outputs(
    inputs: &[PathBuf],
    files: &[PathBuf],
    out: &Path,
    classes: usize,
    opts: &PredictOptions,
) -> Result<()> {
    if out.as_os_str().is_empty() {
        bail!("--out is empty (an unset variable?); give the folder to write the masks into");
    }
    if out.exists() && !out.is_dir() {
        bail!(
            "--out {}: exists and is not a folder; give a folder to write the masks into",
            out.display()
        );
    }
    let out_canonical = std::fs::canonicalize(out).ok();
    if let Some(oc) = &out_canonical {
        for input in inputs.iter().filter(|i| i.is_dir()) {
            if std::fs::canonicalize(input).ok().as_ref() == Some(oc) {
                bail!(
                    "--out {} is also an input folder: the masks written there would be taken for images by the next run; choose another output folder",
                    out.display()
                );
            }
        }
    }
    let canonical_inputs: std::collections::HashMap<PathBuf, &PathBuf> = files
        .iter()
        .filter_map(|f| std::fs::canonicalize(f).ok().map(|c| (c, f)))
        .collect();
    // keyed in lower case: on a case-insensitive file system (macOS, Windows) `A_mask.png` and
    // `a_mask.png` are one file
    let mut writers: std::collections::HashMap<String, (&PathBuf, String)> = Default::default();
    for file in files {
        for name in outputs_of(file, classes, opts)? {
            if let Some((other, other_name)) =
                writers.insert(name.to_lowercase(), (file, name.clone()))
            {
                let case = if other_name != name {
                    format!(
                        " (as {other_name}: names that differ only in case are one file on some file systems)"
                    )
                } else {
                    String::new()
                };
                bail!(
                    "{} and {} would both be written to {}{case}; predict them into separate --out folders or rename one",
                    other.display(),
                    file.display(),
                    out.join(&name).display()
                );
            }
            if let Some(input) = out_canonical
                .as_ref()
                .and_then(|oc| canonical_inputs.get(&oc.join(&name)))
            {
                bail!(
                    "{}: the output of {} would replace this input; choose another --out folder",
                    input.display(),
                    file.display()
                );
            }
        }
    }
    Ok(())
}

/// The predictor of a loaded model, applied as `inference` says.
pub fn predictor<'a>(
    model: &'a dyn SegmentationModel,
    meta: &'a ModelMeta,
    inference: &Inference,
    device: &'a Device,
) -> Predictor<'a> {
    let window = match (meta.window, inference.overlap) {
        (Window::Sliding { patch, blend, .. }, Some(overlap)) => Window::Sliding {
            patch,
            overlap,
            blend,
        },
        (w, _) => w,
    };
    let trained = crate::config::Config::from_toml(&meta.config, &[]).ok();
    let tta = match (&trained, inference.tta) {
        (_, false) => vec![],
        (Some(c), true) => {
            inference::Symmetry::seen_in_training(c.data.augment.flip, c.data.augment.rotate90)
        }
        (None, true) => inference::Symmetry::seen_in_training(true, true),
    };
    Predictor {
        model,
        activation: meta.activation,
        temperature: meta.temperature,
        window,
        normalizer: &meta.normalizer,
        batch: 8,
        device,
        tta,
        min_lesion_pixels: inference
            .min_lesion_pixels
            .or(trained.map(|c| c.data.min_lesion_pixels))
            .unwrap_or(0),
    }
}

/// Predicts a mask for every input and writes the outputs into `out`: a PNG mask per image,
/// a label volume per scan ([`volume`]).
///
/// Everything that can be checked before writing is checked first (options, the model, every
/// image's header, output names), so a bad input leaves no output behind; each output file is
/// written whole or not at all. (A scan is read whole only when its turn comes: one that
/// fails stops the command with an error naming it, after the outputs of the inputs before
/// it.)
pub fn predict(
    model_path: &Path,
    inputs: &[PathBuf],
    out: &Path,
    opts: PredictOptions,
    device: &Device,
) -> Result<Predicted> {
    check_options(&opts)?;
    opts.slicing
        .intensity
        .map(|i| i.check())
        .transpose()
        .map_err(|m| anyhow!(m))?;
    let files = expand_inputs(inputs)?;
    for file in files.iter().filter(|f| !is_volume(f)) {
        data::ImageFile::open(file)?;
    }
    let (model, meta) = export::load(model_path, device)?;
    let classes = meta.unet.classes;
    check_outputs(inputs, &files, out, classes, &opts)?;
    let predictor = predictor(model.as_ref(), &meta, &opts.inference, device);
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the output folder {}", out.display()))?;
    crate::fsutil::remove_dead_temporaries(out)?;
    let (slicing, note) = volume::slicing(&meta, &opts.slicing);
    let format = model_format(&meta);
    let note = note.filter(|_| files.iter().any(|f| is_volume(f)));
    let mut written = vec![];
    for file in &files {
        if is_volume(file) {
            written.extend(volume::predict_volume(
                &predictor,
                file,
                out,
                &slicing,
                opts.threshold,
                opts.probabilities,
            )?);
            continue;
        }
        let image = data::ImageFile::open(file)?;
        let (_, slice_h) = format.slice_dims(file, image.dims())?;
        let _budget = data::DecodeBudget::reserve(image.pixels())?;
        let decoded = image.decode()?;
        let (planar, (h, w)) = format.planar(&decoded);
        // a slice stack is overlaid on its centre slice
        let centre = format.channels as u32 / 2 * slice_h * u32::from(format.slice_stack);
        let rgb = opts
            .overlay
            .then(|| decoded.crop_imm(0, centre, w as u32, h as u32).to_rgb8());
        drop(decoded);
        let probs = predictor
            .probabilities(&[(&planar, h, w)])
            .with_context(|| format!("{} on {}", model_path.display(), file.display()))?
            .remove(0);
        drop(planar);
        let labels = predictor.labels(&probs, (h, w), opts.threshold);
        let (w32, h32) = (w as u32, h as u32);
        let stem = file
            .file_stem()
            .expect("checked by check_outputs")
            .to_string_lossy()
            .to_string();
        let mut names = output_names(&stem, classes, &opts).into_iter();
        let mut next = || out.join(names.next().expect("one name per output"));
        let mask_values: Vec<u8> = if classes == 1 {
            labels.iter().map(|&l| l * 255).collect()
        } else {
            labels.clone()
        };
        let path = next();
        write_png(
            &path,
            &ImageBuffer::<Luma<u8>, _>::from_raw(w32, h32, mask_values).expect("size"),
        )?;
        written.push(path);
        if let Some(rgb) = rgb {
            let path = next();
            write_png(&path, &overlay(&rgb, &labels))?;
            written.push(path);
        }
        if opts.probabilities {
            for plane in probs.chunks(h * w) {
                let values: Vec<u16> = plane
                    .iter()
                    .map(|p| (p.clamp(0.0, 1.0) * 65535.0).round() as u16)
                    .collect();
                let path = next();
                write_png(
                    &path,
                    &ImageBuffer::<Luma<u16>, _>::from_raw(w32, h32, values).expect("size"),
                )?;
                written.push(path);
            }
        }
    }
    Ok(Predicted { written, note })
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

/// The native-resolution image format a model reads: its channels, or with 2.5-D context
/// (recorded in its `import` slicing) slice stacks.
fn model_format(meta: &ModelMeta) -> Format {
    Format {
        channels: meta.unet.in_channels,
        slice_stack: meta.slicing.as_ref().is_some_and(|s| s.context > 0),
        classes: meta.unet.classes,
        ignore_index: meta.ignore_index,
        resize: None,
    }
}

/// The labelled images of a dataset folder (`images/` + `masks/`, or its `val/` split) at
/// native resolution, read in the format of the model `meta` describes.
pub fn labelled_images(data_dir: &Path, meta: &ModelMeta) -> Result<(Vec<data::Sample>, Format)> {
    let dir = dataset_folder(data_dir)?;
    let format = model_format(meta);
    let pairs = data::scan_pairs(&dir)?;
    if pairs.is_empty() {
        bail!(
            "{}: found 0 image/mask pair(s): {} holds no .png, .jpg or .jpeg image",
            dir.display(),
            dir.join("images").display()
        );
    }
    let samples = data::load_pairs(&pairs, &format)?;
    Ok((samples, format))
}

/// Metrics of a model on a dataset folder (`images/` + `masks/`, or its `val/` split), at the
/// images' native resolution.
pub fn evaluate(
    model_path: &Path,
    data_dir: &Path,
    inference: Inference,
    device: &Device,
) -> Result<Report> {
    check_overlap(inference.overlap)?;
    let (model, meta) = export::load(model_path, device)?;
    let (samples, format) = labelled_images(data_dir, &meta)?;
    let evaluation = predictor(model.as_ref(), &meta, &inference, device)
        .evaluate(&samples, format.ignore_mask_value())?;
    Ok(evaluation.report())
}

/// `eval --volumes`: the scores of a model on scans against their label volumes
/// ([`volume::evaluate_volumes`]).
pub fn evaluate_scans(
    model_path: &Path,
    folders: (&Path, &Path),
    label_map: Option<&crate::import::LabelMap>,
    inference: Inference,
    choice: &volume::SlicingChoice,
    device: &Device,
) -> Result<(crate::score::ScoreReport, Option<String>)> {
    check_overlap(inference.overlap)?;
    if let Some(i) = choice.intensity {
        i.check().map_err(|m| anyhow!(m))?;
    }
    let (model, meta) = export::load(model_path, device)?;
    let predictor = predictor(model.as_ref(), &meta, &inference, device);
    volume::evaluate_volumes(&predictor, &meta, folders, label_map, choice)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> PredictOptions {
        PredictOptions {
            threshold: 0.5,
            overlay: true,
            probabilities: true,
            inference: Inference::default(),
            slicing: Default::default(),
        }
    }

    #[test]
    fn empty_paths_are_refused() {
        let err = expand_inputs(&[PathBuf::new()]).unwrap_err().to_string();
        assert!(err.contains("input path is empty"), "{err}");
        let input =
            std::env::temp_dir().join(format!("segtrain-empty-out-{}.png", std::process::id()));
        std::fs::write(&input, b"x").unwrap();
        let files = [input.clone()];
        let err = check_outputs(&files, &files, Path::new(""), 1, &opts())
            .unwrap_err()
            .to_string();
        assert!(err.contains("--out is empty"), "{err}");
        let _ = std::fs::remove_file(input);
    }

    #[test]
    fn options_are_checked() {
        for threshold in [f64::NAN, -0.01, 1.01, f64::INFINITY] {
            let o = PredictOptions {
                threshold,
                ..opts()
            };
            assert!(check_options(&o).is_err(), "threshold {threshold}");
        }
        for overlap in [f64::NAN, -0.1, 0.95, f64::NEG_INFINITY] {
            let o = PredictOptions {
                inference: Inference {
                    overlap: Some(overlap),
                    ..Inference::default()
                },
                ..opts()
            };
            assert!(check_options(&o).is_err(), "overlap {overlap}");
        }
        for (threshold, overlap) in [(0.0, Some(0.0)), (1.0, Some(0.9)), (0.3, None)] {
            let o = PredictOptions {
                threshold,
                inference: Inference {
                    overlap,
                    ..Inference::default()
                },
                ..opts()
            };
            assert!(check_options(&o).is_ok());
        }
    }

    #[test]
    fn output_names_cover_every_file_written() {
        assert_eq!(
            output_names("a", 3, &opts()),
            [
                "a_mask.png",
                "a_overlay.png",
                "a_prob_c0.png",
                "a_prob_c1.png",
                "a_prob_c2.png"
            ]
        );
        let plain = PredictOptions {
            overlay: false,
            probabilities: false,
            ..opts()
        };
        assert_eq!(output_names("a", 1, &plain), ["a_mask.png"]);
    }
}
