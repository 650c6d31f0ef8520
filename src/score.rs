//! `segtrain score`: metrics between two sets of binary masks (predicted and true) matched by
//! file stem — overlap per image and pooled, boundary distance, and lesion-wise detection from
//! 8-connected components.
//!
//! Lesion matching: a true lesion is **detected** when at least one predicted component
//! overlaps it by a pixel or more; a predicted component is a **true positive** when it
//! overlaps any true lesion, a false positive otherwise. So a lesion predicted as two pieces is
//! one detection and two true-positive components; two lesions merged into one predicted
//! component are two detections and one true-positive component. The Dice of a detected lesion
//! is taken against the union of the predicted components that overlap it. Lesion-wise
//! sensitivity = detected / true lesions, precision = true-positive / predicted components,
//! F1 their harmonic mean.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::data::{load_mask, mask_pairs, Format};
use crate::metrics::{components, hd95, Counts};

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
        let d = &self.detected_dice;
        (!d.is_empty()).then(|| d.iter().sum::<f64>() / d.len() as f64)
    }
}

/// Matches the 8-connected components of `pred` and `target` (`h × w`, row-major); see the
/// module documentation for the rule.
pub fn match_lesions(pred: &[bool], target: &[bool], h: usize, w: usize) -> LesionMatch {
    let labels = |m: &[bool]| m.iter().map(|&b| b as u8).collect::<Vec<u8>>();
    let truth = components(&labels(target), h, w);
    let predicted = components(&labels(pred), h, w);
    let mut component_of = vec![usize::MAX; h * w];
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

/// The scores of one image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageScore {
    pub image: String,
    pub dice: f64,
    pub iou: f64,
    /// Pixels; None when exactly one of the masks is empty.
    pub hd95: Option<f64>,
    pub true_pixels: u64,
    pub predicted_pixels: u64,
    pub lesions: LesionMatch,
}

/// Every image's scores and the pooled ones.
#[derive(Debug, Clone, Serialize)]
pub struct ScoreReport {
    pub images: Vec<ImageScore>,
    /// Dice over all pixels of all images.
    pub pooled_dice: f64,
    /// Mean of the images' Dice (both masks empty: 1).
    pub mean_dice: f64,
    /// Mean Dice over the images whose true mask holds a lesion.
    pub lesion_image_dice: Option<f64>,
    /// Mean HD95 over the images where it is defined.
    pub mean_hd95: Option<f64>,
    /// Lesion-wise counts summed over the images.
    pub lesions: LesionMatch,
    pub lesion_sensitivity: Option<f64>,
    pub lesion_precision: Option<f64>,
    pub lesion_f1: Option<f64>,
    pub mean_detected_lesion_dice: Option<f64>,
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

/// Scores the masks of `pred_dir` against those of `label_dir` (PNG, matched by stem; any
/// non-zero value is foreground). Masks of one stem must have the same size.
pub fn score(pred_dir: &Path, label_dir: &Path) -> Result<ScoreReport> {
    let pairs = mask_pairs(pred_dir, label_dir)?;
    if pairs.is_empty() {
        anyhow::bail!("{}: holds no .png mask", pred_dir.display());
    }
    let binary = Format {
        channels: 1,
        classes: 1,
        ignore_index: None,
        resize: None,
    };
    let mut images = vec![];
    let mut pooled = Counts::default();
    let mut lesions = LesionMatch::default();
    for (stem, pred_path, label_path) in pairs {
        let (pred, (pw, ph)) = load_mask(&pred_path, &binary)?;
        let (target, (tw, th)) = load_mask(&label_path, &binary)?;
        if (pw, ph) != (tw, th) {
            anyhow::bail!(
                "{}: {pw}×{ph}, but {} is {tw}×{th}",
                pred_path.display(),
                label_path.display()
            );
        }
        let (h, w) = (th as usize, tw as usize);
        let pred: Vec<bool> = pred.iter().map(|&v| v > 0).collect();
        let target: Vec<bool> = target.iter().map(|&v| v > 0).collect();
        let mut counts = Counts::default();
        for (&p, &t) in pred.iter().zip(&target) {
            counts.tp += (p && t) as u64;
            counts.fp += (p && !t) as u64;
            counts.fn_ += (!p && t) as u64;
        }
        pooled.add(&counts);
        let matched = match_lesions(&pred, &target, h, w);
        lesions.add(&matched);
        images.push(ImageScore {
            image: stem,
            dice: counts.dice(),
            iou: counts.iou(),
            hd95: hd95(&pred, &target, h, w),
            true_pixels: counts.tp + counts.fn_,
            predicted_pixels: counts.tp + counts.fp,
            lesions: matched,
        });
    }
    Ok(ScoreReport {
        pooled_dice: pooled.dice(),
        mean_dice: mean(images.iter().map(|i| i.dice)).unwrap_or(1.0),
        lesion_image_dice: mean(images.iter().filter(|i| i.true_pixels > 0).map(|i| i.dice)),
        mean_hd95: mean(images.iter().filter_map(|i| i.hd95)),
        lesion_sensitivity: lesions.sensitivity(),
        lesion_precision: lesions.precision(),
        lesion_f1: lesions.f1(),
        mean_detected_lesion_dice: lesions.mean_detected_dice(),
        lesions,
        images,
    })
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
        match_lesions(&p, &t, h, w)
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
