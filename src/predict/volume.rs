//! `predict` on scans: a NIfTI or NRRD volume is cut into slices exactly as `import` cut the
//! training data (the axis and intensity mapping recorded in the model), the slices are
//! predicted in batches through the same image path as PNG slices, and the labels go back
//! into a volume on the scan's own voxel grid: `<volume>_seg.nii.gz` (uint8 class indices;
//! same dimensions, sform, qform and pixdim as a NIfTI scan; an NRRD scan's space directions
//! and origin converted to RAS), with `--probabilities` `<volume>_prob.nii.gz` (float32; one
//! `_prob_c<k>` per class of a multi-class model).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::export::ModelMeta;
use crate::import::{
    grid_header, pair_volumes, read_label, read_volume, slice_planes, volume_stem, write_nifti,
    Axis, Canonical, ImportOptions, Intensity, LabelMap, Limits, Slicing,
};
use crate::inference::Predictor;
use crate::score::{volume_scores, ScoreReport};

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
        context: meta.slicing.map_or(0, |s| s.context),
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

/// A scan's predicted labels and probabilities on its own voxel grid (stored order).
pub struct Segmented {
    pub dims: [usize; 3],
    /// The scan's canonical view (also that of the labels).
    pub view: Canonical,
    /// The NIfTI header of volumes on the scan's grid.
    pub header: nifti::NiftiHeader,
    pub labels: Vec<u8>,
    /// One probability volume per class where asked for, else none.
    pub probabilities: Vec<Vec<f32>>,
}

/// Predicts the scan `path` slice by slice: cut along `slicing`'s axis, mapped to grey by its
/// intensity, each slice through the image path of PNG slices, in batches.
pub fn segment(
    predictor: &Predictor,
    path: &Path,
    slicing: &Slicing,
    threshold: f64,
    probabilities: bool,
) -> Result<Segmented> {
    let volume = read_volume(path, &Limits::from_env()?)?;
    let view = Canonical::new(path, volume.dims, &volume.geometry)?;
    let header = grid_header(path, &volume.geometry)?;
    let grey = slicing.intensity.grey(&volume.data, path)?;
    let (axis, classes) = (slicing.axis, predictor.classes());
    let (w, h) = view.slice_size(axis);
    let voxels = volume.data.len();
    let mut labels = vec![0u8; voxels];
    let mut planes = match probabilities {
        true => vec![vec![0f32; voxels]; classes],
        false => vec![],
    };
    let slices: Vec<usize> = (0..view.slices(axis)).collect();
    for chunk in slices.chunks(predictor.batch.max(1)) {
        let images: Vec<Vec<f32>> = chunk
            .iter()
            .map(|&k| {
                let planes = slice_planes(&view, &volume.data, axis, k, slicing.context, grey);
                planes.into_iter().map(|v| f32::from(v) / 255.0).collect()
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
            for (plane, values) in planes.iter_mut().zip(p.chunks(h * w)) {
                view.put_slice(plane, axis, k, values);
            }
        }
    }
    Ok(Segmented {
        dims: volume.dims,
        view,
        header,
        labels,
        probabilities: planes,
    })
}

/// Predicts the scan `path` ([`segment`]) and writes its label volume (and probability
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
    let s = segment(predictor, path, slicing, threshold, probabilities)?;
    let mut names = output_names(name, predictor.classes(), probabilities).into_iter();
    let mut next = || out.join(names.next().expect("one name per output"));
    let path = next();
    write_nifti(&path, &s.header, s.dims, s.labels, "segtrain labels")?;
    let mut written = vec![path];
    for plane in s.probabilities {
        let path = next();
        write_nifti(&path, &s.header, s.dims, plane, "segtrain probabilities")?;
        written.push(path);
    }
    Ok(written)
}

/// `eval --volumes`: the model's scores ([`crate::score`]: Dice, HD95 in mm, volumes in mL,
/// lesion-wise detection) on the scans of `scans` against the label volumes of `labels`,
/// paired by name as `import --images/--labels` pairs them; the labels read through
/// `label_map` where given. The second value is [`slicing`]'s note.
pub fn evaluate_volumes(
    predictor: &Predictor,
    meta: &ModelMeta,
    (scans, labels): (&Path, &Path),
    label_map: Option<&LabelMap>,
    choice: &SlicingChoice,
) -> Result<(ScoreReport, Option<String>)> {
    let (slicing, note) = slicing(meta, choice);
    let limits = Limits::from_env()?;
    let cases = pair_volumes(scans, labels, "", ["scan", "label"])?
        .into_iter()
        .map(|(name, scan, label)| {
            let s = segment(predictor, &scan, &slicing, 0.5, false)?;
            let (dims, geometry, truth) = read_label(&label, &limits, label_map)?;
            let truth_view = Canonical::new(&label, dims, &geometry)?;
            volume_scores(
                name,
                (&s.labels, &s.view, &scan),
                (&truth, &truth_view, &label),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((ScoreReport::new("mm", cases), note))
}
