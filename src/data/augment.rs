//! Training-time augmentation of one sample, driven by a seeded RNG: a random scale-crop,
//! flips and 90° rotations (image and mask alike), then brightness and contrast jitter of the
//! normalised image.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use crate::config::AugmentConfig;

/// Geometric augmentation of a planar `channels × size × size` image and its mask.
pub fn geometric(
    image: &mut Vec<f32>,
    mask: &mut Vec<u8>,
    channels: usize,
    size: usize,
    cfg: &AugmentConfig,
    rng: &mut ChaCha8Rng,
) {
    if cfg.min_crop < 1.0 {
        let scale = rng.random_range(cfg.min_crop..=1.0);
        let side = ((size as f64 * scale).round() as usize).clamp(1, size);
        let ox = rng.random_range(0..=size - side);
        let oy = rng.random_range(0..=size - side);
        *image = crop_resize_bilinear(image, channels, size, (ox, oy, side));
        *mask = crop_resize_nearest(mask, size, (ox, oy, side));
    }
    let flip_x = cfg.flip && rng.random_bool(0.5);
    let flip_y = cfg.flip && rng.random_bool(0.5);
    let quarter_turns = if cfg.rotate90 {
        rng.random_range(0..4)
    } else {
        0
    };
    if flip_x || flip_y || quarter_turns > 0 {
        let map = |x: usize, y: usize| -> usize {
            let (mut sx, mut sy) = (x, y);
            for _ in 0..quarter_turns {
                (sx, sy) = (sy, size - 1 - sx);
            }
            if flip_x {
                sx = size - 1 - sx;
            }
            if flip_y {
                sy = size - 1 - sy;
            }
            sy * size + sx
        };
        let plane = size * size;
        let source: Vec<usize> = (0..plane).map(|i| map(i % size, i / size)).collect();
        *mask = source.iter().map(|&s| mask[s]).collect();
        *image = (0..channels)
            .flat_map(|c| source.iter().map(move |&s| c * plane + s))
            .map(|s| image[s])
            .collect();
    }
}

/// Brightness (additive, in standard deviations) and contrast (multiplicative) jitter of a
/// normalised image, the same for every channel.
pub fn photometric(image: &mut [f32], cfg: &AugmentConfig, rng: &mut ChaCha8Rng) {
    let gain = 1.0
        + if cfg.contrast > 0.0 {
            rng.random_range(-cfg.contrast..cfg.contrast)
        } else {
            0.0
        };
    let shift = if cfg.brightness > 0.0 {
        rng.random_range(-cfg.brightness..cfg.brightness)
    } else {
        0.0
    };
    if gain != 1.0 || shift != 0.0 {
        image
            .iter_mut()
            .for_each(|v| *v = (*v as f64 * gain + shift) as f32);
    }
}

/// Bilinear resampling of the square window (x0, y0, side) of a planar image to `size × size`.
pub fn crop_resize_bilinear(
    image: &[f32],
    channels: usize,
    size: usize,
    window: (usize, usize, usize),
) -> Vec<f32> {
    let (x0, y0, side) = window;
    let scale = side as f64 / size as f64;
    let coord = |o: usize| -> (usize, usize, f32) {
        let src = ((o as f64 + 0.5) * scale - 0.5).clamp(0.0, (side - 1) as f64);
        let lo = src.floor() as usize;
        let hi = (lo + 1).min(side - 1);
        (lo, hi, (src - lo as f64) as f32)
    };
    let cols: Vec<_> = (0..size).map(coord).collect();
    let plane = size * size;
    let mut out = vec![0f32; channels * plane];
    for c in 0..channels {
        let src = &image[c * plane..(c + 1) * plane];
        for (y, &(y_lo, y_hi, fy)) in cols.iter().enumerate() {
            let (r0, r1) = ((y0 + y_lo) * size, (y0 + y_hi) * size);
            for (x, &(x_lo, x_hi, fx)) in cols.iter().enumerate() {
                let (a, b) = (src[r0 + x0 + x_lo], src[r0 + x0 + x_hi]);
                let (d, e) = (src[r1 + x0 + x_lo], src[r1 + x0 + x_hi]);
                let top = a + (b - a) * fx;
                let bottom = d + (e - d) * fx;
                out[c * plane + y * size + x] = top + (bottom - top) * fy;
            }
        }
    }
    out
}

/// Nearest-neighbour resampling of the square window (x0, y0, side) of a mask to `size × size`.
pub fn crop_resize_nearest(mask: &[u8], size: usize, window: (usize, usize, usize)) -> Vec<u8> {
    let (x0, y0, side) = window;
    let at = |o: usize| (((o as f64 + 0.5) * side as f64 / size as f64) as usize).min(side - 1);
    let mut out = Vec::with_capacity(size * size);
    for y in 0..size {
        let row = (y0 + at(y)) * size;
        for x in 0..size {
            out.push(mask[row + x0 + at(x)]);
        }
    }
    out
}
