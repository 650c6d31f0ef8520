//! `predict` on scans: a NIfTI or NRRD volume is cut into slices exactly as `import` cut the
//! training data (the axis and intensity mapping recorded in the model), the slices are
//! predicted in batches through the same image path as PNG slices, and the labels go back
//! into a volume on the scan's own voxel grid: `<volume>_seg.nii.gz` (uint8 class indices;
//! same dimensions, sform, qform and pixdim as a NIfTI scan; an NRRD scan's space directions
//! and origin converted to RAS), with `--probabilities` `<volume>_prob.nii.gz` (float32; one
//! `_prob_c<k>` per class of a multi-class model).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use image::{DynamicImage, GrayImage};

use crate::data;
use crate::export::ModelMeta;
use crate::import::{
    grid_header, read_volume, volume_stem, write_nifti, Axis, Canonical, ImportOptions, Intensity,
    Limits, Slicing,
};
use crate::inference::Predictor;

/// How scans are cut, beyond what the model records (`--axis`, `--window`, `--percentile`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SlicingChoice {
    pub axis: Option<Axis>,
    pub intensity: Option<Intensity>,
}

/// The slicing of scans for the model `meta`: each part from `choice` where given, else from
/// the model's record of its import, else `import`'s default. The second value says, in
/// words, which parts were defaults guessed for a model that records none (`None` when
/// nothing was guessed).
pub fn slicing(meta: &ModelMeta, choice: &SlicingChoice) -> (Slicing, Option<String>) {
    let default = ImportOptions::default();
    let slicing = Slicing {
        axis: choice
            .axis
            .or(meta.slicing.map(|s| s.axis))
            .unwrap_or(default.axis),
        intensity: choice
            .intensity
            .or(meta.slicing.map(|s| s.intensity))
            .unwrap_or(default.intensity),
    };
    let guessed = meta.slicing.is_none() && (choice.axis.is_none() || choice.intensity.is_none());
    let note = guessed.then(|| {
        format!(
            "the model does not record how its training slices were imported; scans are cut \
             with {slicing} (import's defaults where not given): pass --axis and --window or \
             --percentile as they were given to `segtrain import`"
        )
    });
    (slicing, note)
}

/// The files `predict` writes for the volume named `name`.
pub fn output_names(name: &str, classes: usize, probabilities: bool) -> Vec<String> {
    let mut names = vec![format!("{name}_seg.nii.gz")];
    if probabilities {
        if classes == 1 {
            names.push(format!("{name}_prob.nii.gz"));
        } else {
            names.extend((0..classes).map(|k| format!("{name}_prob_c{k}.nii.gz")));
        }
    }
    names
}

/// Predicts the scan `path` slice by slice and writes its label volume (and probability
/// volumes where `probabilities`) into `out`. Returns the files written.
pub fn predict_volume(
    predictor: &Predictor,
    path: &Path,
    out: &Path,
    slicing: &Slicing,
    threshold: f64,
    probabilities: bool,
) -> Result<Vec<PathBuf>> {
    let name = volume_stem(path).expect("a volume file, checked by the caller");
    let volume = read_volume(path, &Limits::from_env()?)?;
    let view = Canonical::new(path, volume.dims, &volume.geometry)?;
    let header = grid_header(path, &volume.geometry)?;
    let grey = slicing.intensity.grey(&volume.data, path)?;
    let (axis, classes) = (slicing.axis, predictor.classes());
    let (w, h) = view.slice_size(axis);
    let voxels = volume.data.len();
    let mut labels = vec![0u8; voxels];
    let mut planes = vec![vec![0f32; if probabilities { voxels } else { 0 }]; classes];
    let slices: Vec<usize> = (0..view.slices(axis)).collect();
    for chunk in slices.chunks(predictor.batch.max(1)) {
        let images: Vec<Vec<f32>> = chunk
            .iter()
            .map(|&k| {
                let (_, _, pixels) = view.slice(&volume.data, axis, k, grey);
                let slice = GrayImage::from_raw(w as u32, h as u32, pixels).expect("w × h pixels");
                data::image_to_planar(
                    &DynamicImage::ImageLuma8(slice),
                    predictor.model.in_channels(),
                    None,
                )
                .0
            })
            .collect();
        let batch: Vec<(&[f32], usize, usize)> =
            images.iter().map(|x| (x.as_slice(), h, w)).collect();
        let probs = predictor.probabilities(&batch).with_context(|| {
            format!(
                "{}: slices {}..={} along {}",
                path.display(),
                chunk[0],
                chunk[chunk.len() - 1],
                axis.letter()
            )
        })?;
        for (&k, p) in chunk.iter().zip(&probs) {
            view.put_slice(
                &mut labels,
                axis,
                k,
                &predictor.labels(p, (h, w), threshold),
            );
            if probabilities {
                for (plane, values) in planes.iter_mut().zip(p.chunks(h * w)) {
                    view.put_slice(plane, axis, k, values);
                }
            }
        }
    }
    drop(volume.data);
    let mut names = output_names(name, classes, probabilities).into_iter();
    let mut next = || out.join(names.next().expect("one name per output"));
    let mut written = vec![];
    let path = next();
    write_nifti(&path, &header, volume.dims, labels, "segtrain labels")?;
    written.push(path);
    for plane in planes.into_iter().filter(|_| probabilities) {
        let path = next();
        write_nifti(&path, &header, volume.dims, plane, "segtrain probabilities")?;
        written.push(path);
    }
    Ok(written)
}
