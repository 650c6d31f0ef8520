//! Segmentation metrics from hard predictions: Dice, IoU, precision and recall, per class,
//! pooled over a data set and per image.

use serde::Serialize;

/// Pixel counts of one class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub tp: u64,
    pub fp: u64,
    pub fn_: u64,
}

fn ratio(num: u64, den: u64, empty: f64) -> f64 {
    if den == 0 {
        empty
    } else {
        num as f64 / den as f64
    }
}

impl Counts {
    pub fn add(&mut self, other: &Counts) {
        self.tp += other.tp;
        self.fp += other.fp;
        self.fn_ += other.fn_;
    }

    /// `2TP / (2TP + FP + FN)`; 1 when prediction and target are both empty.
    pub fn dice(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_, 1.0)
    }

    /// `TP / (TP + FP + FN)`; 1 when both are empty.
    pub fn iou(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp + self.fn_, 1.0)
    }

    /// `TP / (TP + FP)`; 1 when nothing is predicted.
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp, 1.0)
    }

    /// `TP / (TP + FN)`; 1 when the target is empty.
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_, 1.0)
    }

    /// True when the target holds the class.
    pub fn has_target(&self) -> bool {
        self.tp + self.fn_ > 0
    }
}

/// The classes a metric scores: 1 for binary masks, 1..C for class-index masks (background
/// excluded).
pub fn scored_classes(classes: usize) -> Vec<u8> {
    if classes == 1 {
        vec![1]
    } else {
        (1..classes as u8).collect()
    }
}

/// Counts of each scored class for one image: `pred` and `target` hold class indices;
/// pixels whose target is `ignore` are skipped.
pub fn image_counts(pred: &[u8], target: &[u8], classes: usize, ignore: Option<u8>) -> Vec<Counts> {
    let scored = scored_classes(classes);
    let mut counts = vec![Counts::default(); scored.len()];
    for (&p, &t) in pred.iter().zip(target) {
        if Some(t) == ignore {
            continue;
        }
        for (k, &c) in scored.iter().enumerate() {
            match (p == c, t == c) {
                (true, true) => counts[k].tp += 1,
                (true, false) => counts[k].fp += 1,
                (false, true) => counts[k].fn_ += 1,
                _ => {}
            }
        }
    }
    counts
}

/// Accumulates per-image counts over a data set.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    /// One entry per image, one `Counts` per scored class.
    pub images: Vec<Vec<Counts>>,
}

/// Summary metrics over a data set.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Pooled (data-set level) Dice, mean over scored classes.
    pub dice: f64,
    pub iou: f64,
    pub precision: f64,
    pub recall: f64,
    /// Pooled Dice of each scored class.
    pub dice_per_class: Vec<f64>,
    /// Mean Dice over the images whose target holds the class (per class, then the mean over
    /// classes); None when no image holds any. Empty images cannot inflate it.
    pub lesion_dice: Option<f64>,
    /// Images whose target holds a scored class.
    pub lesion_images: usize,
    /// Images whose target holds none.
    pub empty_images: usize,
    /// Share of the empty images with any predicted foreground; None without empty images.
    pub empty_fp_rate: Option<f64>,
    pub images: usize,
}

impl Evaluation {
    pub fn push(&mut self, counts: Vec<Counts>) {
        self.images.push(counts);
    }

    /// Counts of each class summed over the images.
    pub fn pooled(&self) -> Vec<Counts> {
        let k = self.images.first().map_or(0, |c| c.len());
        let mut total = vec![Counts::default(); k];
        for image in &self.images {
            for (t, c) in total.iter_mut().zip(image) {
                t.add(c);
            }
        }
        total
    }

    pub fn report(&self) -> Report {
        let pooled = self.pooled();
        let mean = |f: fn(&Counts) -> f64| {
            if pooled.is_empty() {
                0.0
            } else {
                pooled.iter().map(f).sum::<f64>() / pooled.len() as f64
            }
        };
        let classes = pooled.len();
        let per_class: Vec<f64> = (0..classes)
            .filter_map(|k| {
                let with: Vec<f64> = self
                    .images
                    .iter()
                    .filter(|c| c[k].has_target())
                    .map(|c| c[k].dice())
                    .collect();
                (!with.is_empty()).then(|| with.iter().sum::<f64>() / with.len() as f64)
            })
            .collect();
        let is_empty = |c: &Vec<Counts>| c.iter().all(|k| !k.has_target());
        let empty: Vec<&Vec<Counts>> = self.images.iter().filter(|c| is_empty(c)).collect();
        let false_alarms = empty.iter().filter(|c| c.iter().any(|k| k.fp > 0)).count();
        Report {
            dice: mean(Counts::dice),
            iou: mean(Counts::iou),
            precision: mean(Counts::precision),
            recall: mean(Counts::recall),
            dice_per_class: pooled.iter().map(Counts::dice).collect(),
            lesion_dice: (!per_class.is_empty())
                .then(|| per_class.iter().sum::<f64>() / per_class.len() as f64),
            lesion_images: self.images.len() - empty.len(),
            empty_images: empty.len(),
            empty_fp_rate: (!empty.is_empty()).then(|| false_alarms as f64 / empty.len() as f64),
            images: self.images.len(),
        }
    }
}
