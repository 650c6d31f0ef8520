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

impl Evaluation {
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

/// Squared Euclidean distance from every pixel to the nearest `true` pixel of an `h × w` grid,
/// exact (Felzenszwalb & Huttenlocher's separable lower-envelope transform); `f32::INFINITY`
/// everywhere when there is none.
pub fn squared_distance_transform(mask: &[bool], h: usize, w: usize) -> Vec<f32> {
    const FAR: f64 = 1e20;
    let mut d: Vec<f64> = mask.iter().map(|&m| if m { 0.0 } else { FAR }).collect();
    let mut column = vec![0f64; h];
    for x in 0..w {
        for y in 0..h {
            column[y] = d[y * w + x];
        }
        let out = envelope(&column);
        for y in 0..h {
            d[y * w + x] = out[y];
        }
    }
    for y in 0..h {
        let out = envelope(&d[y * w..(y + 1) * w]);
        d[y * w..(y + 1) * w].copy_from_slice(&out);
    }
    d.iter()
        .map(|&v| {
            if v >= FAR / 2.0 {
                f32::INFINITY
            } else {
                v as f32
            }
        })
        .collect()
}

/// One-dimensional squared distance transform of sampled costs `f` (lower envelope of
/// parabolas).
fn envelope(f: &[f64]) -> Vec<f64> {
    let n = f.len();
    let mut v = vec![0usize; n];
    let mut z = vec![0f64; n + 1];
    let mut k = 0;
    z[0] = f64::NEG_INFINITY;
    z[1] = f64::INFINITY;
    for q in 1..n {
        loop {
            let p = v[k];
            let s = ((f[q] + (q * q) as f64) - (f[p] + (p * p) as f64))
                / (2.0 * q as f64 - 2.0 * p as f64);
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
        while z[k + 1] < q as f64 {
            k += 1;
        }
        let p = v[k];
        *o = (q as f64 - p as f64).powi(2) + f[p];
    }
    out
}

/// The surface (boundary) of a region: its pixels with a 4-neighbour outside it or on the
/// image border.
pub fn surface(mask: &[bool], h: usize, w: usize) -> Vec<bool> {
    let at = |y: isize, x: isize| {
        y >= 0 && x >= 0 && y < h as isize && x < w as isize && mask[y as usize * w + x as usize]
    };
    (0..h * w)
        .map(|i| {
            let (y, x) = ((i / w) as isize, (i % w) as isize);
            mask[i] && !(at(y - 1, x) && at(y + 1, x) && at(y, x - 1) && at(y, x + 1))
        })
        .collect()
}

/// HD95: the 95th percentile (linear interpolation) of the symmetric surface distances between
/// two regions, in pixels. Both empty: 0; exactly one empty: undefined (None).
pub fn hd95(pred: &[bool], target: &[bool], h: usize, w: usize) -> Option<f64> {
    let (sp, sg) = (surface(pred, h, w), surface(target, h, w));
    match (sp.contains(&true), sg.contains(&true)) {
        (false, false) => return Some(0.0),
        (true, false) | (false, true) => return None,
        _ => {}
    }
    let (dp, dg) = (
        squared_distance_transform(&sp, h, w),
        squared_distance_transform(&sg, h, w),
    );
    let mut d: Vec<f64> = sp
        .iter()
        .zip(&dg)
        .filter(|(s, _)| **s)
        .map(|(_, v)| (*v as f64).sqrt())
        .chain(
            sg.iter()
                .zip(&dp)
                .filter(|(s, _)| **s)
                .map(|(_, v)| (*v as f64).sqrt()),
        )
        .collect();
    d.sort_by(f64::total_cmp);
    Some(percentile(&d, 95.0))
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

/// The 8-connected components of the non-zero classes of an `h × w` label map (row-major): the
/// pixel indices of each region of one class value, in scan order of their first pixel.
pub fn components(labels: &[u8], h: usize, w: usize) -> Vec<Vec<usize>> {
    let mut seen = vec![false; labels.len()];
    let mut found = vec![];
    let mut stack = vec![];
    for start in 0..labels.len() {
        let class = labels[start];
        if class == 0 || seen[start] {
            continue;
        }
        seen[start] = true;
        stack.push(start);
        let mut pixels = vec![];
        while let Some(i) = stack.pop() {
            pixels.push(i);
            let (y, x) = (i / w, i % w);
            for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                    let j = ny * w + nx;
                    if labels[j] == class && !seen[j] {
                        seen[j] = true;
                        stack.push(j);
                    }
                }
            }
        }
        found.push(pixels);
    }
    found
}
