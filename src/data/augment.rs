//! Training-time augmentation of one sample, driven by a seeded RNG: a random scale-crop,
//! a small rotation and zoom, flips and 90° rotations (image and mask alike), a gamma of the raw
//! intensities, then brightness and contrast jitter and Gaussian noise of the normalised
//! image. An option that is off draws nothing, so adding one leaves the others' streams as
//! they were.

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::AugmentConfig;

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
    if cfg.rotate > 0.0 || cfg.scale > 0.0 {
        let angle = if cfg.rotate > 0.0 {
            rng.random_range(-cfg.rotate..=cfg.rotate).to_radians()
        } else {
            0.0
        };
        let zoom = if cfg.scale > 0.0 {
            rng.random_range(1.0 - cfg.scale..=1.0 + cfg.scale)
        } else {
            1.0
        };
        (*image, *mask) = rotate_zoom(image, mask, channels, size, angle, zoom);
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

/// The image and mask turned by `angle` (radians) and zoomed by `zoom` about the centre:
/// output pixel p samples the input at centre + R(−angle)·(p − centre)/zoom, bilinear for the
/// image and nearest for the mask; outside the input the image is 0 (black) and the mask 0.
pub fn rotate_zoom(
    image: &[f32],
    mask: &[u8],
    channels: usize,
    size: usize,
    angle: f64,
    zoom: f64,
) -> (Vec<f32>, Vec<u8>) {
    let c = (size as f64 - 1.0) / 2.0;
    let (sin, cos) = angle.sin_cos();
    let plane = size * size;
    let mut out_image = vec![0f32; channels * plane];
    let mut out_mask = vec![0u8; plane];
    let last = (size - 1) as f64;
    for y in 0..size {
        for x in 0..size {
            let (dx, dy) = ((x as f64 - c) / zoom, (y as f64 - c) / zoom);
            let sx = c + cos * dx + sin * dy;
            let sy = c - sin * dx + cos * dy;
            if !(-0.5..=last + 0.5).contains(&sx) || !(-0.5..=last + 0.5).contains(&sy) {
                continue;
            }
            let at = y * size + x;
            out_mask[at] = mask[sy.round().clamp(0.0, last) as usize * size
                + sx.round().clamp(0.0, last) as usize];
            let (fx, fy) = (sx.clamp(0.0, last), sy.clamp(0.0, last));
            let (x0, y0) = (fx.floor() as usize, fy.floor() as usize);
            let (x1, y1) = ((x0 + 1).min(size - 1), (y0 + 1).min(size - 1));
            let (wx, wy) = ((fx - x0 as f64) as f32, (fy - y0 as f64) as f32);
            for ch in 0..channels {
                let p = &image[ch * plane..(ch + 1) * plane];
                let top = p[y0 * size + x0] + (p[y0 * size + x1] - p[y0 * size + x0]) * wx;
                let bottom = p[y1 * size + x0] + (p[y1 * size + x1] - p[y1 * size + x0]) * wx;
                out_image[ch * plane + at] = top + (bottom - top) * wy;
            }
        }
    }
    (out_image, out_mask)
}

/// A random gamma of raw intensities in [0, 1]: v^γ, ln γ uniform in [−gamma, gamma].
pub fn gamma(image: &mut [f32], cfg: &AugmentConfig, rng: &mut ChaCha8Rng) {
    if cfg.gamma > 0.0 {
        let g = rng.random_range(-cfg.gamma..=cfg.gamma).exp() as f32;
        image
            .iter_mut()
            .for_each(|v| *v = v.clamp(0.0, 1.0).powf(g));
    }
}

/// Brightness (additive, in standard deviations) and contrast (multiplicative) jitter of a
/// normalised image, the same for every channel, then Gaussian noise (Box–Muller, its standard
/// deviation drawn per image in [0, noise]).
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
    if cfg.noise > 0.0 {
        let sigma = rng.random_range(0.0..=cfg.noise);
        for v in image.iter_mut() {
            let (u1, u2): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random());
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            *v += (sigma * z) as f32;
        }
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
