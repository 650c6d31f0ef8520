//! `segtrain score`: metrics between predicted and true binary masks — two folders of PNG
//! masks matched by file stem, or label volumes (NIfTI/NRRD) on one voxel grid: overlap per
//! case and pooled, HD95 (pixels; mm for volumes, from the spacing), lesion volumes in mL, and
//! lesion-wise detection from connected components (8-connected in 2-D, 26 in 3-D).
//!
//! Lesion matching: a true lesion is **detected** when at least one predicted component
//! overlaps it by a pixel or more; a predicted component is a **true positive** when it
//! overlaps any true lesion, a false positive otherwise. So a lesion predicted as two pieces is
//! one detection and two true-positive components; two lesions merged into one predicted
//! component are two detections and one true-positive component. The Dice of a detected lesion
//! is taken against the union of the predicted components that overlap it. Lesion-wise
//! sensitivity = detected / true lesions, precision = true-positive / predicted components,
//! F1 their harmonic mean.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::data::{load_mask, mask_pairs, Format};
use crate::import::{
    pair_volumes, read_label, volume_stem, volumes_in, Canonical, LabelMap, Limits,
};
use crate::metrics::{components_grid, hd95_grid, image_counts, Counts, Grid};
use crate::stats::mean;

/// Lesion-wise counts of one image (or summed over images).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LesionMatch {
    /// Connected components of the true mask.
    pub true_lesions: usize,
    /// True lesions overlapped by a predicted component.
    pub detected: usize,
    /// Connected components of the predicted mask.
    pub predicted: usize,
    /// Predicted components that overlap a true lesion.
    pub true_positive: usize,
    /// Dice of each detected lesion against the predicted components overlapping it.
    pub detected_dice: Vec<f64>,
}

impl LesionMatch {
    pub fn add(&mut self, other: &LesionMatch) {
        self.true_lesions += other.true_lesions;
        self.detected += other.detected;
        self.predicted += other.predicted;
        self.true_positive += other.true_positive;
        self.detected_dice.extend(&other.detected_dice);
    }

    /// Detected / true lesions (None without true lesions).
    pub fn sensitivity(&self) -> Option<f64> {
        (self.true_lesions > 0).then(|| self.detected as f64 / self.true_lesions as f64)
    }

    /// True-positive / predicted components (None without predicted components).
    pub fn precision(&self) -> Option<f64> {
        (self.predicted > 0).then(|| self.true_positive as f64 / self.predicted as f64)
    }

    pub fn f1(&self) -> Option<f64> {
        match (self.sensitivity(), self.precision()) {
            (Some(s), Some(p)) if s + p > 0.0 => Some(2.0 * s * p / (s + p)),
            (Some(_), Some(_)) => Some(0.0),
            _ => None,
        }
    }

    /// Mean Dice of the detected lesions.
    pub fn mean_detected_dice(&self) -> Option<f64> {
        mean(self.detected_dice.iter().copied())
    }
}

/// Matches the connected components of `pred` and `target` on `grid`; see the module
/// documentation for the rule.
pub fn match_lesions(pred: &[bool], target: &[bool], grid: Grid) -> LesionMatch {
    let labels = |m: &[bool]| m.iter().map(|&b| b as u8).collect::<Vec<u8>>();
    let truth = components_grid(&labels(target), grid);
    let predicted = components_grid(&labels(pred), grid);
    let mut component_of = vec![usize::MAX; pred.len()];
    for (k, c) in predicted.iter().enumerate() {
        for &i in c {
            component_of[i] = k;
        }
    }
    let mut m = LesionMatch {
        true_lesions: truth.len(),
        predicted: predicted.len(),
        ..Default::default()
    };
    let mut overlaps_truth = vec![false; predicted.len()];
    for lesion in &truth {
        let mut touching: Vec<usize> = lesion
            .iter()
            .map(|&i| component_of[i])
            .filter(|&k| k != usize::MAX)
            .collect();
        touching.sort_unstable();
        touching.dedup();
        if touching.is_empty() {
            continue;
        }
        m.detected += 1;
        let inside = lesion.iter().filter(|&&i| pred[i]).count();
        let union: usize = touching.iter().map(|&k| predicted[k].len()).sum();
        m.detected_dice
            .push(2.0 * inside as f64 / (lesion.len() + union) as f64);
        for k in touching {
            overlaps_truth[k] = true;
        }
    }
    m.true_positive = overlaps_truth.iter().filter(|&&t| t).count();
    m
}

/// The scores of one image or volume.
#[derive(Debug, Clone, Serialize)]
pub struct CaseScore {
    /// The file stem (volumes: without the extension and a `_seg` suffix).
    pub case: String,
    pub dice: f64,
    pub iou: f64,
    /// In the report's `unit`; None when exactly one of the masks is empty.
    pub hd95: Option<f64>,
    pub true_voxels: u64,
    pub predicted_voxels: u64,
    /// Voxels (pixels) in both.
    pub overlap_voxels: u64,
    /// Volumes: the true and predicted lesion volume (mL) and their difference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Volumes>,
    pub lesions: LesionMatch,
}

/// Lesion volumes of a case, mL.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Volumes {
    pub true_ml: f64,
    pub predicted_ml: f64,
    /// predicted − true.
    pub error_ml: f64,
    /// (predicted − true) / true; None for an empty true mask.
    pub relative_error: Option<f64>,
}

/// Every case's scores and the pooled ones.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    /// The unit of the HD95 figures: `px` (images) or `mm` (volumes).
    pub unit: &'static str,
    pub cases: Vec<CaseScore>,
    /// Dice over all pixels of all cases.
    pub pooled_dice: f64,
    /// Mean of the cases' Dice (both masks empty: 1).
    pub mean_dice: f64,
    /// Mean Dice over the cases whose true mask holds a lesion.
    pub lesion_case_dice: Option<f64>,
    /// Mean HD95 over the cases where it is defined.
    pub mean_hd95: Option<f64>,
    /// Lesion-wise counts summed over the cases.
    pub lesions: LesionMatch,
    pub lesion_sensitivity: Option<f64>,
    pub lesion_precision: Option<f64>,
    pub lesion_f1: Option<f64>,
    pub mean_detected_lesion_dice: Option<f64>,
}

/// The scores of one case: binary masks (0/1) `pred` and `target` on `grid`; `voxel_ml` for
/// volumes.
fn case(name: String, pred: &[u8], target: &[u8], grid: Grid, voxel_ml: Option<f64>) -> CaseScore {
    let counts = image_counts(pred, target, 1, None)[0];
    let (pred, target): (Vec<bool>, Vec<bool>) = (
        pred.iter().map(|&v| v > 0).collect(),
        target.iter().map(|&v| v > 0).collect(),
    );
    let (true_voxels, predicted_voxels) = (counts.tp + counts.fn_, counts.tp + counts.fp);
    CaseScore {
        case: name,
        dice: counts.dice(),
        iou: counts.iou(),
        hd95: hd95_grid(&pred, &target, grid),
        true_voxels,
        predicted_voxels,
        overlap_voxels: counts.tp,
        volumes: voxel_ml.map(|v| {
            let (t, p) = (true_voxels as f64 * v, predicted_voxels as f64 * v);
            Volumes {
                true_ml: t,
                predicted_ml: p,
                error_ml: p - t,
                relative_error: (true_voxels > 0).then(|| (p - t) / t),
            }
        }),
        lesions: match_lesions(&pred, &target, grid),
    }
}

/// Scores predicted against true masks: two PNG files' folders (matched by stem; predict's
/// `<stem>_mask.png` read under `<stem>`; any non-zero value is foreground, masks of one stem
/// of one size), two label volumes, or two folders of label volumes (matched by name, a
/// predicted `<name>_seg` under `<name>`) on one voxel grid each.
pub fn score(pred: &Path, label: &Path, label_map: Option<&LabelMap>) -> Result<ScoreReport> {
    let volumes = if pred.is_dir() {
        volume_pairs(pred, label)?
    } else {
        vec![(
            case_name(pred).to_string(),
            pred.to_path_buf(),
            label.to_path_buf(),
        )]
    };
    let (unit, cases) = if volumes.is_empty() {
        if label_map.is_some() {
            bail!(
                "--label-map maps label volumes' values; {} holds PNG masks",
                pred.display()
            );
        }
        ("px", mask_cases(pred, label)?)
    } else {
        let limits = Limits::from_env()?;
        let cases = volumes
            .into_iter()
            .map(|(name, p, l)| volume_case(name, &p, &l, label_map, &limits))
            .collect::<Result<Vec<_>>>()?;
        ("mm", cases)
    };
    Ok(ScoreReport::new(unit, cases))
}

impl ScoreReport {
    /// The report of `cases`, pooled; `unit`: of their HD95 figures.
    pub fn new(unit: &'static str, cases: Vec<CaseScore>) -> Self {
        let mut pooled = Counts::default();
        let mut lesions = LesionMatch::default();
        for c in &cases {
            lesions.add(&c.lesions);
            pooled.add(&Counts {
                tp: c.overlap_voxels,
                fp: c.predicted_voxels - c.overlap_voxels,
                fn_: c.true_voxels - c.overlap_voxels,
            });
        }
        ScoreReport {
            unit,
            pooled_dice: pooled.dice(),
            mean_dice: mean(cases.iter().map(|c| c.dice)).unwrap_or(1.0),
            lesion_case_dice: mean(cases.iter().filter(|c| c.true_voxels > 0).map(|c| c.dice)),
            mean_hd95: mean(cases.iter().filter_map(|c| c.hd95)),
            lesion_sensitivity: lesions.sensitivity(),
            lesion_precision: lesions.precision(),
            lesion_f1: lesions.f1(),
            mean_detected_lesion_dice: lesions.mean_detected_dice(),
            lesions,
            cases,
        }
    }
}

/// A volume file's case name: its name without the extension and a `_seg` suffix.
fn case_name(path: &Path) -> &str {
    let stem = volume_stem(path).unwrap_or_default();
    stem.strip_suffix(SEG).unwrap_or(stem)
}

/// The suffix of a predicted volume's name.
const SEG: &str = "_seg";

/// The volume files of two folders paired by case name; empty when `pred_dir` holds none.
fn volume_pairs(pred_dir: &Path, label_dir: &Path) -> Result<Vec<(String, PathBuf, PathBuf)>> {
    if volumes_in(pred_dir)?.is_empty() {
        return Ok(vec![]);
    }
    pair_volumes(
        pred_dir,
        label_dir,
        SEG,
        ["predicted volume", "label volume"],
    )
}

/// The cases of two folders of PNG masks.
fn mask_cases(pred_dir: &Path, label_dir: &Path) -> Result<Vec<CaseScore>> {
    let pairs = mask_pairs(pred_dir, label_dir)?;
    if pairs.is_empty() {
        bail!(
            "{}: holds no .png mask and no label volume",
            pred_dir.display()
        );
    }
    let binary = Format {
        slice_stack: false,
        channels: 1,
        classes: 1,
        ignore_index: None,
        resize: None,
    };
    pairs
        .into_iter()
        .map(|(stem, pred_path, label_path)| {
            let (pred, (pw, ph)) = load_mask(&pred_path, &binary)?;
            let (target, (tw, th)) = load_mask(&label_path, &binary)?;
            if (pw, ph) != (tw, th) {
                bail!(
                    "{}: {pw}×{ph}, but {} is {tw}×{th}",
                    pred_path.display(),
                    label_path.display()
                );
            }
            let dims = [th as usize, tw as usize];
            Ok(case(stem, &pred, &target, Grid::image(&dims), None))
        })
        .collect()
}

/// One pair of label volumes read from files (any non-zero label is foreground).
fn volume_case(
    name: String,
    pred: &Path,
    label: &Path,
    label_map: Option<&LabelMap>,
    limits: &Limits,
) -> Result<CaseScore> {
    let (pdims, pgeom, pvalues) = read_label(pred, limits, None)?;
    let (ldims, lgeom, lvalues) = read_label(label, limits, label_map)?;
    let (pc, lc) = (
        Canonical::new(pred, pdims, &pgeom)?,
        Canonical::new(label, ldims, &lgeom)?,
    );
    volume_scores(name, (&pvalues, &pc, pred), (&lvalues, &lc, label))
}

/// The scores of a predicted and a true label volume (`(voxels as stored, canonical view,
/// file)` each; any non-zero label is foreground), which must cover the same voxels in space
/// (checked as `import` checks a label against its scan); either may store them in any axis
/// order and direction. Distances and volumes come from the canonical grid's spacing.
pub fn volume_scores(
    name: String,
    (pred, pred_view, pred_path): (&[u8], &Canonical, &Path),
    (label, label_view, label_path): (&[u8], &Canonical, &Path),
) -> Result<CaseScore> {
    pred_view.check_same_grid(label_view, pred_path, label_path)?;
    let [n0, n1, n2] = label_view.dims;
    let [s0, s1, s2] = label_view.geometry.spacing();
    let (dims, spacing) = ([n2, n1, n0], [s2, s1, s0]);
    let grid = Grid {
        dims: &dims,
        spacing: &spacing,
    };
    let binary = |m: Vec<u8>| m.into_iter().map(|v| (v > 0) as u8).collect::<Vec<u8>>();
    Ok(case(
        name,
        &binary(pred_view.reorder(pred)),
        &binary(label_view.reorder(label)),
        grid,
        Some(s0 * s1 * s2 / 1000.0),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `h × w` mask from rows of `#` (foreground) and `.`.
    fn mask(rows: &[&str]) -> (Vec<bool>, usize, usize) {
        let w = rows[0].len();
        let m = rows
            .iter()
            .flat_map(|r| r.chars().map(|c| c == '#'))
            .collect();
        (m, rows.len(), w)
    }

    fn matched(pred: &[&str], truth: &[&str]) -> LesionMatch {
        let (p, h, w) = mask(pred);
        let (t, ..) = mask(truth);
        match_lesions(&p, &t, Grid::image(&[h, w]))
    }

    #[test]
    fn two_lesions_one_found() {
        let truth = ["##.....", "##...##", ".....##"];
        let pred = ["##.....", "#......", "......."];
        let m = matched(&pred, &truth);
        assert_eq!(
            (m.true_lesions, m.detected, m.predicted, m.true_positive),
            (2, 1, 1, 1)
        );
        assert_eq!(m.sensitivity(), Some(0.5));
        assert_eq!(m.precision(), Some(1.0));
        // the found lesion: 3 of its 4 pixels, nothing outside: 2·3 / (4 + 3)
        assert_eq!(m.detected_dice, vec![6.0 / 7.0]);
        assert!((m.f1().unwrap() - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn a_false_positive_lowers_precision_only() {
        let truth = ["##.....", "##.....", "......."];
        let pred = ["##.....", "##....#", "......#"];
        let m = matched(&pred, &truth);
        assert_eq!(
            (m.true_lesions, m.detected, m.predicted, m.true_positive),
            (1, 1, 2, 1)
        );
        assert_eq!((m.sensitivity(), m.precision()), (Some(1.0), Some(0.5)));
        assert_eq!(m.detected_dice, vec![1.0]);
    }

    #[test]
    fn a_lesion_predicted_in_two_pieces_is_one_detection() {
        let truth = ["#####", "#####", "....."];
        let pred = ["##.##", "##.##", "....."];
        let m = matched(&pred, &truth);
        assert_eq!(
            (m.true_lesions, m.detected, m.predicted, m.true_positive),
            (1, 1, 2, 2)
        );
        // 8 of 10 pixels, the union of both pieces 8: 2·8 / 18
        assert_eq!(m.detected_dice, vec![16.0 / 18.0]);
        assert_eq!((m.sensitivity(), m.precision()), (Some(1.0), Some(1.0)));
    }

    #[test]
    fn two_lesions_merged_in_one_prediction_are_two_detections() {
        let truth = ["##.##", "##.##", "....."];
        let pred = ["#####", "#####", "....."];
        let m = matched(&pred, &truth);
        assert_eq!(
            (m.true_lesions, m.detected, m.predicted, m.true_positive),
            (2, 2, 1, 1)
        );
        // each lesion (4 px) against the whole merged component (10 px): 2·4 / 14
        assert_eq!(m.detected_dice, vec![8.0 / 14.0, 8.0 / 14.0]);
    }

    #[test]
    fn diagonal_neighbours_are_one_lesion() {
        let m = matched(&["#..", ".#.", "..."], &["#..", ".#.", "..."]);
        assert_eq!((m.true_lesions, m.predicted), (1, 1));
        let empty = matched(&["...", "..."], &["...", "..."]);
        assert_eq!(empty, LesionMatch::default());
        assert_eq!(
            (empty.sensitivity(), empty.precision(), empty.f1()),
            (None, None, None)
        );
    }
}
