//! Segmentation metrics from hard predictions: Dice, IoU, precision and recall, per class,
//! pooled over a data set and per image; boundary distances and calibration; and the registry
//! of validation metrics ([`METRICS`]) that runs, comparisons, `eval` and `train.select_by`
//! read them through.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::stats::mean;

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

/// A target mask of `h × w` class indices.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub mask: &'a [u8],
    pub h: usize,
    pub w: usize,
}

/// A reliability diagram: (mean confidence, accuracy, pixels) per non-empty bin.
pub type Diagram = Vec<(f64, f64, u64)>;

/// Accumulates per-image counts, boundary distances and calibration over a data set.
#[derive(Debug, Clone, Default)]
pub struct Evaluation {
    /// One entry per image, one `Counts` per scored class.
    pub images: Vec<Vec<Counts>>,
    /// HD95 of each image and scored class (None: one of prediction and target empty).
    pub hd95: Vec<Vec<Option<f64>>>,
    pub calibration: Calibration,
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
    /// Mean HD95 (pixels) over the (image, class) pairs where prediction and target are both
    /// non-empty or both empty (0); None when there is no such pair.
    pub hd95: Option<f64>,
    /// (image, class) pairs whose HD95 is undefined (exactly one of the two empty).
    pub hd95_undefined: usize,
    /// Expected calibration error over pixels, 15 equal-width confidence bins.
    pub ece: f64,
    /// Brier score over pixels.
    pub brier: f64,
    /// Reliability diagram: (mean confidence, accuracy, pixels) per non-empty bin.
    pub reliability: Diagram,
    pub images: usize,
}

/// One image's scores at a run's selected epoch: a row of the run's `per_image.csv`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageScores {
    /// The image's file stem.
    pub image: String,
    /// Dice, mean over the scored classes (a class absent from both counts 1).
    pub dice: f64,
    /// IoU, the same way.
    pub iou: f64,
    /// Mean Dice over the classes the target holds; empty for an image without a lesion.
    pub lesion_dice: Option<f64>,
    /// Mean HD95 (pixels) over the classes where it is defined.
    pub hd95: Option<f64>,
    /// For an image without a lesion, whether any foreground was predicted; empty otherwise.
    pub false_alarm: Option<bool>,
}

impl Evaluation {
    /// The evaluation of a whole data set of `len` images from the ranks' evaluations of their
    /// parts (this one of the images at `own`): one sum over the ranks of a table of every
    /// image's counts and HD95 (zero outside a rank's own rows) and of the calibration sums.
    /// Without other ranks, `self`.
    pub fn merged_over_ranks(self, len: usize, own: std::ops::Range<usize>) -> Self {
        if crate::distributed::ranks() == 1 {
            return self;
        }
        // the scored classes, from the ranks that have images
        let mut classes = [self.images.first().map_or(0, Vec::len) as f64, 0.0];
        classes[1] = f64::from(u8::from(classes[0] > 0.0));
        crate::distributed::sum(&mut classes);
        // per image and class: tp, fp, fn, HD95 (NaN: none)
        let row = 4 * (classes[0] / classes[1].max(1.0)) as usize;
        let mut table = vec![0f64; len * row + 4 * CALIBRATION_BINS + 2];
        for (i, (counts, hd95)) in self.images.iter().zip(&self.hd95).enumerate() {
            let at = (own.start + i) * row;
            for (c, (k, h)) in counts.iter().zip(hd95).enumerate() {
                let cell = &mut table[at + 4 * c..at + 4 * c + 4];
                cell.copy_from_slice(&[
                    k.tp as f64,
                    k.fp as f64,
                    k.fn_ as f64,
                    h.unwrap_or(f64::NAN),
                ]);
            }
        }
        let cal = &self.calibration;
        let sums = &mut table[len * row..];
        for b in 0..cal.count.len() {
            sums[3 * b..3 * b + 3].copy_from_slice(&[
                cal.count[b] as f64,
                cal.confidence[b],
                cal.correct[b],
            ]);
        }
        let at = 3 * CALIBRATION_BINS;
        sums[at..at + 2].copy_from_slice(&[cal.brier_sum, cal.pixels as f64]);
        crate::distributed::sum(&mut table);
        let (images, sums) = table.split_at(len * row);
        let calibration = match sums[at + 1] {
            0.0 => Calibration::default(),
            pixels => Calibration {
                count: (0..CALIBRATION_BINS).map(|b| sums[3 * b] as u64).collect(),
                confidence: (0..CALIBRATION_BINS).map(|b| sums[3 * b + 1]).collect(),
                correct: (0..CALIBRATION_BINS).map(|b| sums[3 * b + 2]).collect(),
                brier_sum: sums[at],
                pixels: pixels as u64,
            },
        };
        let cells = |image: &[f64]| -> Vec<[f64; 4]> {
            image.chunks(4).map(|c| [c[0], c[1], c[2], c[3]]).collect()
        };
        Self {
            images: images
                .chunks(row)
                .map(|image| {
                    let cell = |c: [f64; 4]| Counts {
                        tp: c[0] as u64,
                        fp: c[1] as u64,
                        fn_: c[2] as u64,
                    };
                    cells(image).into_iter().map(cell).collect()
                })
                .collect(),
            hd95: images
                .chunks(row)
                .map(|image| {
                    cells(image)
                        .into_iter()
                        .map(|c| Some(c[3]).filter(|h| !h.is_nan()))
                        .collect()
                })
                .collect(),
            calibration,
        }
    }

    /// Each image's scores, named by `names` (in the order the images were added).
    pub fn per_image(&self, names: &[String]) -> Vec<ImageScores> {
        self.images
            .iter()
            .zip(names)
            .enumerate()
            .map(|(i, (counts, name))| {
                let lesion = counts.iter().any(Counts::has_target);
                ImageScores {
                    image: name.clone(),
                    dice: mean(counts.iter().map(Counts::dice)).unwrap_or(1.0),
                    iou: mean(counts.iter().map(Counts::iou)).unwrap_or(1.0),
                    lesion_dice: mean(counts.iter().filter(|c| c.has_target()).map(Counts::dice)),
                    hd95: self
                        .hd95
                        .get(i)
                        .and_then(|h| mean(h.iter().flatten().copied())),
                    false_alarm: (!lesion).then(|| counts.iter().any(|c| c.fp > 0)),
                }
            })
            .collect()
    }

    pub fn push(&mut self, counts: Vec<Counts>) {
        self.images.push(counts);
    }

    /// Adds one predicted image (labels and `k` probability planes) against its target: counts,
    /// HD95 of each scored class, calibration.
    pub fn add_image(
        &mut self,
        pred: &[u8],
        probs: &[f32],
        k: usize,
        target: Target,
        classes: usize,
        ignore: Option<u8>,
    ) {
        let Target { mask, h, w } = target;
        self.images.push(image_counts(pred, mask, classes, ignore));
        self.hd95.push(
            scored_classes(classes)
                .iter()
                .map(|&c| {
                    let region = |m: &[u8]| {
                        m.iter()
                            .zip(mask)
                            .map(|(&v, &t)| v == c && Some(t) != ignore)
                            .collect::<Vec<bool>>()
                    };
                    hd95(&region(pred), &region(mask), h, w)
                })
                .collect(),
        );
        self.calibration.add(probs, k, mask, ignore);
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
            hd95: {
                let defined: Vec<f64> = self.hd95.iter().flatten().flatten().copied().collect();
                (!defined.is_empty()).then(|| defined.iter().sum::<f64>() / defined.len() as f64)
            },
            hd95_undefined: self.hd95.iter().flatten().filter(|v| v.is_none()).count(),
            ece: self.calibration.ece(),
            brier: self.calibration.brier(),
            reliability: self.calibration.diagram(),
            images: self.images.len(),
        }
    }
}

/// Which way a metric improves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

impl Better {
    /// True when `a` is strictly better than `b`.
    pub fn prefers(self, a: f64, b: f64) -> bool {
        match self {
            Better::Higher => a > b,
            Better::Lower => a < b,
        }
    }
}

/// One validation metric of the registry [`METRICS`].
#[derive(Debug)]
pub struct Metric {
    /// Its name: the field of [`Report`] (and of `eval --json`), the value of
    /// `train.select_by`, the column of compare's `results.csv`; `val_<name>` in `metrics.csv`
    /// and `summary.json` ([`Metric::column`]).
    pub name: &'static str,
    /// Its column title in compare's `report.md`.
    pub title: &'static str,
    pub better: Better,
    /// Digits after the point in tables.
    pub digits: usize,
    /// Its value in a report; None where it is undefined.
    pub value: fn(&Report) -> Option<f64>,
    /// The metric `train.select_by` uses instead where this one is undefined; without one, an
    /// epoch where it is undefined is never selected over one where it is defined.
    pub fallback: Option<&'static str>,
}

impl PartialEq for Metric {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for Metric {}

impl Metric {
    /// Its column in `metrics.csv` and key in `summary.json`: `val_<name>` (validation).
    pub fn column(&self) -> String {
        format!("val_{}", self.name)
    }

    /// The score `train.select_by` ranks epochs by: the value, else the fallback's.
    pub fn selection_score(&self, r: &Report) -> Option<f64> {
        (self.value)(r).or_else(|| {
            self.fallback
                .and_then(metric)
                .and_then(|f| f.selection_score(r))
        })
    }
}

/// Every validation metric, in the order of the columns of `metrics.csv`, `results.csv` and
/// `report.md`, of the keys of `summary.json` and of the lines of `eval`. A metric is computed
/// in [`Evaluation::report`] and added here; everything else derives from this table.
pub const METRICS: &[Metric] = &[
    Metric {
        name: "dice",
        title: "Dice",
        better: Better::Higher,
        digits: 4,
        value: |r| Some(r.dice),
        fallback: None,
    },
    Metric {
        name: "iou",
        title: "IoU",
        better: Better::Higher,
        digits: 4,
        value: |r| Some(r.iou),
        fallback: None,
    },
    Metric {
        name: "precision",
        title: "precision",
        better: Better::Higher,
        digits: 4,
        value: |r| Some(r.precision),
        fallback: None,
    },
    Metric {
        name: "recall",
        title: "recall",
        better: Better::Higher,
        digits: 4,
        value: |r| Some(r.recall),
        fallback: None,
    },
    Metric {
        name: "lesion_dice",
        title: "lesion-image Dice",
        better: Better::Higher,
        digits: 4,
        value: |r| r.lesion_dice,
        // no validation image with a lesion: the pooled Dice
        fallback: Some("dice"),
    },
    Metric {
        name: "empty_fp_rate",
        title: "false alarms on empty images",
        better: Better::Lower,
        digits: 3,
        value: |r| r.empty_fp_rate,
        fallback: None,
    },
    Metric {
        name: "hd95",
        title: "HD95 (px)",
        better: Better::Lower,
        digits: 2,
        value: |r| r.hd95,
        fallback: None,
    },
    Metric {
        name: "ece",
        title: "ECE",
        better: Better::Lower,
        digits: 4,
        value: |r| Some(r.ece),
        fallback: None,
    },
    Metric {
        name: "brier",
        title: "Brier",
        better: Better::Lower,
        digits: 4,
        value: |r| Some(r.brier),
        fallback: None,
    },
];

/// The metric of the registry named `name`.
pub fn metric(name: &str) -> Option<&'static Metric> {
    METRICS.iter().find(|m| m.name == name)
}

/// The names of the registry's metrics, in its order.
pub fn names() -> &'static [&'static str] {
    static NAMES: LazyLock<Vec<&'static str>> =
        LazyLock::new(|| METRICS.iter().map(|m| m.name).collect());
    &NAMES
}

/// The registry's metrics of one report, in [`METRICS`] order (None: undefined). Serialised
/// as a map of [`Metric::column`] keys (`summary.json`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scores(Vec<Option<f64>>);

impl Scores {
    pub fn of(r: &Report) -> Self {
        Self(METRICS.iter().map(|m| (m.value)(r)).collect())
    }

    /// Scores by column name (`val_<name>`) from `get`; a missing column is undefined.
    pub fn from_columns(get: impl Fn(&str) -> Option<f64>) -> Self {
        Self(METRICS.iter().map(|m| get(&m.column())).collect())
    }

    /// The value of the metric named `name` (None: undefined, not recorded or not a metric).
    pub fn get(&self, name: &str) -> Option<f64> {
        let i = METRICS.iter().position(|m| m.name == name)?;
        self.0.get(i).copied().flatten()
    }

    /// Each metric with its value, in registry order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static Metric, Option<f64>)> + '_ {
        METRICS
            .iter()
            .enumerate()
            .map(|(i, m)| (m, self.0.get(i).copied().flatten()))
    }
}

impl Serialize for Scores {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(METRICS.len()))?;
        for (m, v) in self.iter() {
            map.serialize_entry(&m.column(), &v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for Scores {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Columns;
        impl<'de> Visitor<'de> for Columns {
            type Value = Scores;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of validation metrics")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scores, A::Error> {
                let mut found = HashMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if METRICS.iter().any(|m| m.column() == key) {
                        found.insert(key, map.next_value::<Option<f64>>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Scores::from_columns(|c| found.get(c).copied().flatten()))
            }
        }
        deserializer.deserialize_map(Columns)
    }
}

/// A row-major grid: `dims` slowest axis first (an image `[h, w]`, a volume `[nz, ny, nx]`)
/// and the spacing of each axis (pixels: 1; volumes: mm).
#[derive(Debug, Clone, Copy)]
pub struct Grid<'a> {
    pub dims: &'a [usize],
    pub spacing: &'a [f64],
}

const PIXELS: [f64; 2] = [1.0, 1.0];

impl<'a> Grid<'a> {
    /// An `h × w` image of unit pixels.
    pub fn image(dims: &'a [usize; 2]) -> Self {
        Self {
            dims,
            spacing: &PIXELS,
        }
    }

    fn len(&self) -> usize {
        self.dims.iter().product()
    }

    fn strides(&self) -> Vec<usize> {
        let mut strides = vec![1; self.dims.len()];
        for a in (0..self.dims.len().saturating_sub(1)).rev() {
            strides[a] = strides[a + 1] * self.dims[a + 1];
        }
        strides
    }

    /// The flat indices of the neighbours of `i` (`strides` = [`Self::strides`]) that differ by
    /// at most one step along every axis (8 in 2-D, 26 in 3-D), or along one axis only
    /// (`faces`: 4 in 2-D, 6 in 3-D); returns how many would lie beyond the border.
    fn neighbours(&self, strides: &[usize], i: usize, faces: bool, out: &mut Vec<usize>) -> usize {
        out.clear();
        let mut outside = 0;
        for code in 0..3usize.pow(self.dims.len() as u32) {
            let (mut c, mut j, mut moved, mut inside) = (code, 0isize, 0, true);
            for (&stride, &dim) in strides.iter().zip(self.dims) {
                let step = (c % 3) as isize - 1;
                c /= 3;
                moved += (step != 0) as usize;
                let x = (i / stride % dim) as isize + step;
                inside &= x >= 0 && x < dim as isize;
                j += x * stride as isize;
            }
            if moved == 0 || (faces && moved > 1) {
                continue;
            }
            if inside {
                out.push(j as usize);
            } else {
                outside += 1;
            }
        }
        outside
    }
}

/// Squared Euclidean distance (in the grid's units) from every element to the nearest `true`
/// one, exact (Felzenszwalb & Huttenlocher's separable lower-envelope transform, one pass per
/// axis with that axis's spacing); `f64::INFINITY` everywhere when there is none.
pub fn squared_distance_transform_grid(mask: &[bool], grid: Grid) -> Vec<f64> {
    const FAR: f64 = 1e20;
    let mut d: Vec<f64> = mask.iter().map(|&m| if m { 0.0 } else { FAR }).collect();
    let strides = grid.strides();
    let mut line = vec![];
    for (a, (&n, &stride)) in grid.dims.iter().zip(&strides).enumerate() {
        // every line along axis a starts at an index whose coordinate on a is 0
        for start in (0..grid.len()).filter(|i| i / stride % n == 0) {
            line.clear();
            line.extend((0..n).map(|k| d[start + k * stride]));
            for (k, v) in envelope(&line, grid.spacing[a]).into_iter().enumerate() {
                d[start + k * stride] = v;
            }
        }
    }
    d.iter()
        .map(|&v| if v >= FAR / 2.0 { f64::INFINITY } else { v })
        .collect()
}

/// [`squared_distance_transform_grid`] of an `h × w` image, in pixels².
pub fn squared_distance_transform(mask: &[bool], h: usize, w: usize) -> Vec<f32> {
    squared_distance_transform_grid(mask, Grid::image(&[h, w]))
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

/// One-dimensional squared distance transform of costs `f` sampled every `step` (lower
/// envelope of the parabolas (x − step·p)² + f[p]).
fn envelope(f: &[f64], step: f64) -> Vec<f64> {
    let n = f.len();
    let at = |q: usize| q as f64 * step;
    let mut v = vec![0usize; n];
    let mut z = vec![0f64; n + 1];
    let mut k = 0;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    for q in 1..n {
        loop {
            let p = v[k];
            let s = ((f[q] + at(q) * at(q)) - (f[p] + at(p) * at(p))) / (2.0 * at(q) - 2.0 * at(p));
            if s <= z[k] && k > 0 {
                k -= 1;
            } else {
                k += 1;
                v[k] = q;
                z[k] = s;
                z[k + 1] = f64::INFINITY;
                break;
            }
        }
    }
    let mut out = vec![0f64; n];
    k = 0;
    for (q, o) in out.iter_mut().enumerate() {
        while z[k + 1] < at(q) {
            k += 1;
        }
        let p = v[k];
        *o = (at(q) - at(p)).powi(2) + f[p];
    }
    out
}

/// The surface (boundary) of a region: its elements with a face neighbour outside it or on
/// the grid's border.
pub fn surface_grid(mask: &[bool], grid: Grid) -> Vec<bool> {
    let (strides, mut around) = (grid.strides(), vec![]);
    (0..mask.len())
        .map(|i| {
            mask[i] && {
                let outside = grid.neighbours(&strides, i, true, &mut around);
                outside > 0 || around.iter().any(|&j| !mask[j])
            }
        })
        .collect()
}

/// [`surface_grid`] of an `h × w` image (4-neighbours).
pub fn surface(mask: &[bool], h: usize, w: usize) -> Vec<bool> {
    surface_grid(mask, Grid::image(&[h, w]))
}

/// HD95: the 95th percentile (linear interpolation) of the symmetric surface distances between
/// two regions, in the grid's units. Both empty: 0; exactly one empty: undefined (None).
pub fn hd95_grid(pred: &[bool], target: &[bool], grid: Grid) -> Option<f64> {
    let (sp, sg) = (surface_grid(pred, grid), surface_grid(target, grid));
    match (sp.contains(&true), sg.contains(&true)) {
        (false, false) => return Some(0.0),
        (true, false) | (false, true) => return None,
        _ => {}
    }
    let (dp, dg) = (
        squared_distance_transform_grid(&sp, grid),
        squared_distance_transform_grid(&sg, grid),
    );
    let mut d: Vec<f64> = sp
        .iter()
        .zip(&dg)
        .filter(|(s, _)| **s)
        .map(|(_, v)| v.sqrt())
        .chain(
            sg.iter()
                .zip(&dp)
                .filter(|(s, _)| **s)
                .map(|(_, v)| v.sqrt()),
        )
        .collect();
    d.sort_by(f64::total_cmp);
    Some(percentile(&d, 95.0))
}

/// [`hd95_grid`] of an `h × w` image, in pixels.
pub fn hd95(pred: &[bool], target: &[bool], h: usize, w: usize) -> Option<f64> {
    hd95_grid(pred, target, Grid::image(&[h, w]))
}

/// The `q`-th percentile of sorted values, linearly interpolated (NumPy's default).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    let rank = q / 100.0 * (sorted.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
}

/// Bins of the reliability diagram and of the expected calibration error.
pub const CALIBRATION_BINS: usize = 15;

/// Pixel-level calibration statistics: per confidence bin the pixels, the summed confidence and
/// the correct predictions, and the Brier score's sum.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Calibration {
    pub count: Vec<u64>,
    pub confidence: Vec<f64>,
    pub correct: Vec<f64>,
    pub brier_sum: f64,
    pub pixels: u64,
}

impl Calibration {
    /// Adds the pixels of one image: `probs` holds `k` planes (one sigmoid channel, or softmax
    /// classes), `target` the class per pixel; `ignore`d pixels are skipped. The confidence is
    /// the probability of the predicted class; for one sigmoid channel, `max(p, 1 − p)`.
    pub fn add(&mut self, probs: &[f32], k: usize, target: &[u8], ignore: Option<u8>) {
        if self.count.is_empty() {
            *self = Self {
                count: vec![0; CALIBRATION_BINS],
                confidence: vec![0.0; CALIBRATION_BINS],
                correct: vec![0.0; CALIBRATION_BINS],
                ..Self::default()
            };
        }
        let n = target.len();
        for (i, &t) in target.iter().enumerate() {
            if Some(t) == ignore {
                continue;
            }
            let truth = if k == 1 { u8::from(t > 0) } else { t };
            let (conf, label, brier) = if k == 1 {
                let p = probs[i] as f64;
                let y = f64::from(u8::from(t > 0));
                (p.max(1.0 - p), u8::from(p > 0.5), (p - y).powi(2))
            } else {
                let mut best = 0;
                let mut brier = 0.0;
                for c in 0..k {
                    let p = probs[c * n + i] as f64;
                    brier += (p - f64::from(u8::from(c == t as usize))).powi(2);
                    if p > probs[best * n + i] as f64 {
                        best = c;
                    }
                }
                (probs[best * n + i] as f64, best as u8, brier)
            };
            let bin = ((conf * CALIBRATION_BINS as f64) as usize).min(CALIBRATION_BINS - 1);
            self.count[bin] += 1;
            self.confidence[bin] += conf;
            self.correct[bin] += f64::from(u8::from(label == truth));
            self.brier_sum += brier;
            self.pixels += 1;
        }
    }

    /// Expected calibration error: `Σ_b (n_b / N)·|accuracy_b − confidence_b|`.
    pub fn ece(&self) -> f64 {
        if self.pixels == 0 {
            return 0.0;
        }
        (0..self.count.len())
            .filter(|&b| self.count[b] > 0)
            .map(|b| (self.correct[b] - self.confidence[b]).abs() / self.pixels as f64)
            .sum()
    }

    /// Mean squared error of the probabilities (summed over classes for softmax).
    pub fn brier(&self) -> f64 {
        self.brier_sum / self.pixels.max(1) as f64
    }

    /// The reliability diagram: per non-empty bin (mean confidence, accuracy, pixels).
    pub fn diagram(&self) -> Diagram {
        (0..self.count.len())
            .filter(|&b| self.count[b] > 0)
            .map(|b| {
                let n = self.count[b] as f64;
                (self.confidence[b] / n, self.correct[b] / n, self.count[b])
            })
            .collect()
    }
}

/// The connected components of the non-zero classes of a label grid (neighbours across
/// edges and corners: 8 in 2-D, 26 in 3-D): the indices of each region of one class value, in
/// scan order of their first element.
pub fn components_grid(labels: &[u8], grid: Grid) -> Vec<Vec<usize>> {
    let mut seen = vec![false; labels.len()];
    let mut found = vec![];
    let (strides, mut stack, mut around) = (grid.strides(), vec![], vec![]);
    for start in 0..labels.len() {
        let class = labels[start];
        if class == 0 || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut region = vec![];
        while let Some(i) = stack.pop() {
            region.push(i);
            grid.neighbours(&strides, i, false, &mut around);
            for &j in &around {
                if labels[j] == class && !seen[j] {
                    seen[j] = true;
                    stack.push(j);
                }
            }
        }
        found.push(region);
    }
    found
}

/// The 8-connected components of the non-zero classes of an `h × w` label map (row-major).
pub fn components(labels: &[u8], h: usize, w: usize) -> Vec<Vec<usize>> {
    components_grid(labels, Grid::image(&[h, w]))
}

#[cfg(test)]
mod tests {
    use super::{metric, Better, Report, Scores, METRICS};

    #[test]
    fn the_registry_keeps_the_file_columns_and_its_names_are_unique() {
        let columns: Vec<String> = METRICS.iter().map(|m| m.column()).collect();
        // the columns of metrics.csv and keys of summary.json that existing runs hold stay
        for old in [
            "val_dice",
            "val_iou",
            "val_precision",
            "val_recall",
            "val_lesion_dice",
            "val_empty_fp_rate",
            "val_hd95",
            "val_ece",
            "val_brier",
        ] {
            assert!(columns.iter().any(|c| c == old), "{old} is gone");
        }
        for (i, m) in METRICS.iter().enumerate() {
            assert_eq!(metric(m.name), Some(m), "{} is found by name", m.name);
            assert!(METRICS[..i].iter().all(|n| n.name != m.name));
            if let Some(f) = m.fallback {
                assert!(
                    metric(f).is_some(),
                    "{}: fallback `{f}` unregistered",
                    m.name
                );
            }
        }
        // every metric is a field of the report of `eval --json`
        let report = serde_json::to_value(Report::default()).unwrap();
        for m in METRICS {
            assert!(report.get(m.name).is_some(), "Report lacks `{}`", m.name);
        }
    }

    #[test]
    fn scores_read_back_by_column_and_selection_falls_back() {
        let report = Report {
            dice: 0.5,
            hd95: Some(3.0),
            ece: 0.25,
            ..Report::default()
        };
        let scores = Scores::of(&report);
        let json = serde_json::to_string(&scores).unwrap();
        assert!(json.contains("\"val_hd95\":3.0") && json.contains("\"val_lesion_dice\":null"));
        let back: Scores = serde_json::from_str(&json).unwrap();
        assert_eq!(back, scores);
        assert_eq!(back.get("ece"), Some(0.25));
        assert_eq!(back.get("lesion_dice"), None);
        assert_eq!(back.get("no such metric"), None);
        // a summary written before a metric existed reads it as undefined
        let old: Scores = serde_json::from_str("{\"val_dice\": 0.5, \"other\": [1]}").unwrap();
        assert_eq!((old.get("dice"), old.get("ece")), (Some(0.5), None));
        // lesion-image Dice without a lesion image selects by the pooled Dice
        let lesion = metric("lesion_dice").unwrap();
        assert_eq!(lesion.selection_score(&report), Some(0.5));
        assert_eq!(
            metric("empty_fp_rate").unwrap().selection_score(&report),
            None
        );
        assert!(Better::Lower.prefers(1.0, 2.0) && !Better::Higher.prefers(1.0, 2.0));
        assert!(!Better::Higher.prefers(1.0, 1.0));
    }
}
