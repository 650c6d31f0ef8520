//! How an image's raw intensities (in [0, 1]) become the network's input, per channel c:
//!
//! - `dataset` (default): x' = (x − μ_c) / σ_c, the training images' mean and standard deviation.
//! - `image`: x' = (x − μ_c(I)) / σ_c(I), the image's own (nnU-Net's z-score for MRI): scans
//!   whose brightness and contrast differ from one to the next — scanners, sequences, a CT
//!   beside an MRI — reach the network alike.
//! - `clip = [lo, hi]` (optional, with either): x is first clamped to the lo-th and hi-th
//!   percentiles of the image's channel (nnU-Net clips CT to 0.5 / 99.5), so that a few very
//!   bright pixels (metal, fat, burnt-in text) do not squash the rest; with `dataset` the
//!   mean and standard deviation are then those of the clipped training images.
//!
//! Statistics are taken over the whole image before augmentation (σ floored at [`MIN_STD`]), so
//! a patch, an augmented copy and the image at inference are mapped alike.

use serde::{Deserialize, Serialize};

/// Smallest standard deviation divided by: a constant image maps to 0, not to infinity.
pub const MIN_STD: f32 = 1e-3;

/// Whose statistics normalise an image.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Normalization {
    /// The training images' per-channel mean and standard deviation.
    #[default]
    Dataset,
    /// Each image's own per-channel mean and standard deviation.
    Image,
}

/// The normalisation of a model: mode, optional percentile clipping, and the data set's
/// statistics (used by `dataset`; recorded either way).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalizer {
    pub mode: Normalization,
    /// Percentiles (0 ≤ lo < hi ≤ 100) each image's channels are clamped to.
    pub clip: Option<[f64; 2]>,
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// One image's map per channel: x ↦ (clamp(x, lo, hi) − centre) / scale.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageNorm {
    lo: Vec<f32>,
    hi: Vec<f32>,
    centre: Vec<f32>,
    scale: Vec<f32>,
}

impl Normalizer {
    /// `dataset` normalisation with these statistics, without clipping.
    pub fn dataset(mean: Vec<f32>, std: Vec<f32>) -> Self {
        Self {
            mode: Normalization::Dataset,
            clip: None,
            mean,
            std,
        }
    }

    /// The map of the planar image `image` (`C × pixels`, C = the statistics' channels).
    pub fn for_image(&self, image: &[f32]) -> ImageNorm {
        let planes = image.chunks((image.len() / self.mean.len().max(1)).max(1));
        let mut norm = ImageNorm {
            lo: vec![],
            hi: vec![],
            centre: vec![],
            scale: vec![],
        };
        for (c, plane) in planes.enumerate() {
            let (lo, hi) = self.clip.map_or((f32::NEG_INFINITY, f32::INFINITY), |p| {
                clip_bounds(plane, p)
            });
            let (centre, scale) = match self.mode {
                Normalization::Dataset => (self.mean[c], self.std[c]),
                Normalization::Image => moments(plane.iter().map(|&v| v.clamp(lo, hi))),
            };
            norm.lo.push(lo);
            norm.hi.push(hi);
            norm.centre.push(centre);
            norm.scale.push(scale);
        }
        norm
    }

    /// Normalises the planar image `image` in place with its own map.
    pub fn apply(&self, image: &mut [f32]) {
        self.for_image(image).apply(image);
    }

    /// Per-channel mean and standard deviation of the training images (each clipped first
    /// when `clip` is set), for `dataset`.
    pub fn dataset_moments<'a>(
        images: impl Iterator<Item = &'a [f32]> + Clone,
        channels: usize,
        clip: Option<[f64; 2]>,
    ) -> (Vec<f32>, Vec<f32>) {
        (0..channels)
            .map(|c| {
                let values = images.clone().flat_map(move |image| {
                    let plane =
                        &image[c * image.len() / channels..(c + 1) * image.len() / channels];
                    let (lo, hi) = clip.map_or((f32::NEG_INFINITY, f32::INFINITY), |p| {
                        clip_bounds(plane, p)
                    });
                    plane.iter().map(move |&v| v.clamp(lo, hi))
                });
                moments(values)
            })
            .unzip()
    }
}

impl ImageNorm {
    /// Normalises a planar image or patch of the image this map was made for, in place.
    pub fn apply(&self, x: &mut [f32]) {
        let plane = x.len() / self.centre.len();
        for (c, chunk) in x.chunks_mut(plane).enumerate() {
            let (lo, hi, m, s) = (self.lo[c], self.hi[c], self.centre[c], self.scale[c]);
            chunk
                .iter_mut()
                .for_each(|v| *v = (v.clamp(lo, hi) - m) / s);
        }
    }

    /// The raw value of each channel that normalises to 0: the padding outside an image.
    pub fn centre(&self) -> &[f32] {
        &self.centre
    }
}

/// Mean and standard deviation (floored at [`MIN_STD`]) of some values, accumulated in f64.
fn moments(values: impl Iterator<Item = f32>) -> (f32, f32) {
    let (mut n, mut sum, mut sq) = (0f64, 0f64, 0f64);
    for v in values {
        let v = v as f64;
        n += 1.0;
        sum += v;
        sq += v * v;
    }
    let mean = sum / n.max(1.0);
    let var = (sq / n.max(1.0) - mean * mean).max(0.0);
    (mean as f32, (var.sqrt() as f32).max(MIN_STD))
}

/// The `p[0]`-th and `p[1]`-th percentiles of `values` (nearest rank).
fn clip_bounds(values: &[f32], p: [f64; 2]) -> (f32, f32) {
    if values.is_empty() {
        return (f32::NEG_INFINITY, f32::INFINITY);
    }
    let mut v = values.to_vec();
    let rank = |q: f64| ((q / 100.0 * (v.len() - 1) as f64).round() as usize).min(v.len() - 1);
    let (lo_rank, hi_rank) = (rank(p[0]), rank(p[1]));
    let lo = *v.select_nth_unstable_by(lo_rank, f32::total_cmp).1;
    let hi = *v.select_nth_unstable_by(hi_rank, f32::total_cmp).1;
    (lo, hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalizer(mode: Normalization, clip: Option<[f64; 2]>) -> Normalizer {
        Normalizer {
            mode,
            clip,
            mean: vec![0.5, 0.25],
            std: vec![0.1, 0.5],
        }
    }

    #[test]
    fn dataset_mode_uses_the_data_sets_statistics() {
        let mut x = vec![0.5, 0.7, 0.25, 0.75];
        normalizer(Normalization::Dataset, None).apply(&mut x);
        let want = [0.0, 2.0, 0.0, 1.0];
        assert!(
            x.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-5),
            "{x:?}"
        );
    }

    #[test]
    fn image_mode_gives_every_channel_zero_mean_and_unit_std() {
        // two images of one scene at different brightness and contrast normalise alike
        let scene: Vec<f32> = (0..200).map(|i| ((i * 37) % 101) as f32 / 100.0).collect();
        let n = normalizer(Normalization::Image, None);
        let mut a: Vec<f32> = scene.iter().map(|v| 0.1 + 0.3 * v).collect();
        let mut b: Vec<f32> = scene.iter().map(|v| 0.4 + 0.6 * v).collect();
        n.apply(&mut a);
        n.apply(&mut b);
        for plane in a.chunks(100) {
            let (m, s) = moments(plane.iter().copied());
            assert!(m.abs() < 1e-5 && (s - 1.0).abs() < 1e-4, "{m} {s}");
        }
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-4));
        // a constant image maps to 0
        let mut flat = vec![0.3f32; 8];
        n.apply(&mut flat);
        assert!(flat.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn clipping_clamps_to_the_images_percentiles_before_normalising() {
        // 99 values 0..=0.98 and one outlier at 100
        let mut plane: Vec<f32> = (0..99).map(|i| i as f32 / 100.0).collect();
        plane.push(100.0);
        assert_eq!(clip_bounds(&plane, [1.0, 98.0]), (0.01, 0.97));
        let n = Normalizer {
            mode: Normalization::Image,
            clip: Some([0.0, 98.0]),
            mean: vec![0.0],
            std: vec![1.0],
        };
        let map = n.for_image(&plane);
        assert_eq!(map.hi, vec![0.97]);
        let mut x = plane.clone();
        map.apply(&mut x);
        // the outlier lands where the 98th percentile does, not 100 σ away
        assert_eq!(x[99], x[97]);
        // the data set's moments are those of the clipped images
        let (m, _) =
            Normalizer::dataset_moments([plane.as_slice()].into_iter(), 1, Some([0.0, 98.0]));
        assert!(m[0] < 0.5, "{m:?}");
        let (m_raw, _) = Normalizer::dataset_moments([plane.as_slice()].into_iter(), 1, None);
        assert!(m_raw[0] > 1.0, "{m_raw:?}");
    }
}
