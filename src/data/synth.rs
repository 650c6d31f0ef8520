//! Deterministic, seeded generators of medical-style segmentation data sets, written in the
//! dataset layout (`images/`, `masks/`), so that the whole tool runs with no download.
//!
//! - `lesion`: dermoscopy-like RGB skin texture with an irregular pigmented lesion, fuzzy
//!   border, mottled interior and occasional hairs; binary mask.
//! - `mri`: grey MRI-like axial slice (skull, grey/white matter texture, ventricles, bias field,
//!   Rician noise) with a few small bright lesions (≈ 1 % of the pixels); binary mask.
//! - `vessel`: fundus-like RGB image with thin branching vessels; binary mask.
//! - `multiclass`: dermoscopy-like lesion with a dark core inside a rim; class-index mask
//!   (0 background, 1 rim, 2 core).
//!
//! Knobs: foreground fraction, share of images without a lesion, and `label_noise`: the share
//! of masks that are dilated, eroded, shifted or dropped — noisy labels for studying focal
//! loss's sensitivity to them; for `mri`, `size_spread` (lesions of very different sizes in
//! one image) and `contrast` (faint lesions): data sets on which losses do differ. Image `i`
//! depends only on (seed, kind, i).

use std::f64::consts::PI;
use std::path::Path;

use anyhow::{bail, Context, Result};
use noise::{Fbm, MultiFractal, NoiseFn, Perlin};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// Which kind of data set to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SynthKind {
    #[default]
    Lesion,
    Mri,
    Vessel,
    Multiclass,
}

impl SynthKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Lesion => "lesion",
            Self::Mri => "mri",
            Self::Vessel => "vessel",
            Self::Multiclass => "multiclass",
        }
    }

    /// Image channels and mask classes of the kind.
    pub fn channels_classes(self) -> (usize, usize) {
        match self {
            Self::Lesion | Self::Vessel => (3, 1),
            Self::Mri => (1, 1),
            Self::Multiclass => (3, 3),
        }
    }

    fn default_foreground(self) -> f64 {
        match self {
            Self::Lesion | Self::Multiclass => 0.12,
            Self::Mri => 0.01,
            Self::Vessel => 0.08,
        }
    }
}

/// Settings of a generated data set (the `synth` command's flags, or `[data.synth]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SynthConfig {
    #[serde(default)]
    pub kind: SynthKind,
    #[serde(default = "default_count")]
    pub count: usize,
    #[serde(default = "default_size")]
    pub size: usize,
    #[serde(default)]
    pub seed: u64,
    /// Mean foreground fraction of an image with a lesion (kind default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub foreground: Option<f64>,
    /// Share of images without any lesion.
    #[serde(default)]
    pub empty_fraction: f64,
    /// Share of masks corrupted by dilation, erosion, a shift or deletion.
    #[serde(default)]
    pub label_noise: f64,
    /// Write `train/` and `val/` folders, the last `val_count` images in `val/` with clean
    /// masks (label noise applies to `train/` only); 0: one `images/` + `masks/` folder.
    #[serde(default)]
    pub val_count: usize,
    /// `mri`: how much one image's lesions differ in area — shares drawn log-uniformly so
    /// that the largest is up to `size_spread` times the smallest; 1: equal sizes.
    #[serde(default = "unit", skip_serializing_if = "is_unit")]
    pub size_spread: f64,
    /// `mri`: the lesions' contrast against the tissue, 1 = bright lesions, towards 0 they fade
    /// into it.
    #[serde(default = "unit", skip_serializing_if = "is_unit")]
    pub contrast: f64,
}

fn unit() -> f64 {
    1.0
}

fn is_unit(v: &f64) -> bool {
    *v == 1.0
}

fn default_count() -> usize {
    200
}

fn default_size() -> usize {
    128
}

/// Most images a synthetic data set holds (a million 128² pairs take ≈ 50 GB on disk).
pub const MAX_COUNT: usize = 100_000;

impl SynthConfig {
    /// Checks the knobs; the message starts with the key.
    pub fn validate(&self) -> Result<()> {
        if !(1..=MAX_COUNT).contains(&self.count) {
            bail!("count: must lie in 1..={MAX_COUNT}, got {}", self.count);
        }
        if self.val_count >= self.count {
            bail!("val_count: must be below count = {}", self.count);
        }
        if !(16..=4096).contains(&self.size) {
            bail!("size: must lie in 16..=4096, got {}", self.size);
        }
        if let Some(f) = self.foreground {
            if !(f > 0.0 && f <= 0.6) {
                bail!("foreground: must lie in (0, 0.6], got {f}");
            }
        }
        for (key, v) in [
            ("empty_fraction", self.empty_fraction),
            ("label_noise", self.label_noise),
        ] {
            if !(0.0..=1.0).contains(&v) {
                bail!("{key}: must lie in [0, 1], got {v}");
            }
        }
        if !(1.0..=1000.0).contains(&self.size_spread) {
            bail!(
                "size_spread: must lie in [1, 1000], got {}",
                self.size_spread
            );
        }
        if !(self.contrast > 0.0 && self.contrast <= 1.0) {
            bail!("contrast: must lie in (0, 1], got {}", self.contrast);
        }
        for (key, v) in [
            ("size_spread", self.size_spread),
            ("contrast", self.contrast),
        ] {
            if v != 1.0 && self.kind != SynthKind::Mri {
                bail!(
                    "{key}: only the mri kind has it (kind = {})",
                    self.kind.name()
                );
            }
        }
        Ok(())
    }

    fn foreground(&self) -> f64 {
        self.foreground.unwrap_or(self.kind.default_foreground())
    }
}

/// An image (`channels` interleaved planes in [0, 1]) and its mask (class per pixel).
pub struct Generated {
    pub image: Vec<f32>,
    pub channels: usize,
    pub mask: Vec<u8>,
}

/// Generates image `index` of the data set (with its label noise, unless `clean`).
pub fn generate(cfg: &SynthConfig, index: usize, clean: bool) -> Generated {
    let seed = cfg
        .seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((cfg.kind as u64) << 56)
        .wrapping_add(index as u64);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let empty = rng.random_bool(cfg.empty_fraction);
    let s = cfg.size;
    let mut g = match cfg.kind {
        SynthKind::Lesion => dermoscopy(&mut rng, s, cfg.foreground(), empty, false),
        SynthKind::Multiclass => dermoscopy(&mut rng, s, cfg.foreground(), empty, true),
        SynthKind::Mri => mri(&mut rng, cfg, empty),
        SynthKind::Vessel => fundus(&mut rng, s, cfg.foreground(), empty),
    };
    if rng.random_bool(cfg.label_noise) && !clean {
        corrupt_mask(&mut rng, &mut g.mask, s);
    }
    g
}

/// Writes the data set into `out/images` and `out/masks` (PNG) and `out/synth.toml`. The files
/// are written into a temporary folder renamed to `out` at the end, so an interrupted run
/// leaves no half data set; `out` must not exist.
pub fn write_dataset(cfg: &SynthConfig, out: &Path) -> Result<()> {
    cfg.validate()?;
    if out.exists() {
        bail!(
            "{} already exists; choose another --out or remove it",
            out.display()
        );
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => ".".into(),
    };
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("cannot create {}", parent.display()))?;
    let name = out
        .file_name()
        .context("--out needs a folder name")?
        .to_string_lossy();
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let result = (|| -> Result<()> {
        // with val_count: train/ (label noise) and val/ (clean masks)
        let split = cfg.count - cfg.val_count;
        let folder = |i: usize| match (cfg.val_count, i < split) {
            (0, _) => tmp.clone(),
            (_, true) => tmp.join("train"),
            (_, false) => tmp.join("val"),
        };
        for i in [0, cfg.count - 1] {
            for sub in ["images", "masks"] {
                let d = folder(i).join(sub);
                std::fs::create_dir_all(&d)
                    .with_context(|| format!("cannot create {}", d.display()))?;
            }
        }
        (0..cfg.count)
            .into_par_iter()
            .try_for_each(|i| -> Result<()> {
                let g = generate(cfg, i, i >= split);
                let stem = format!("{}_{i:04}", cfg.kind.name());
                let dir = folder(i);
                write_png(&dir.join("images").join(format!("{stem}.png")), &g)?;
                let mask: Vec<u8> = match cfg.kind.channels_classes().1 {
                    1 => g
                        .mask
                        .iter()
                        .map(|&m| if m > 0 { 255 } else { 0 })
                        .collect(),
                    _ => g.mask.clone(),
                };
                let path = dir.join("masks").join(format!("{stem}.png"));
                image::GrayImage::from_raw(cfg.size as u32, cfg.size as u32, mask)
                    .expect("mask size")
                    .save(&path)
                    .with_context(|| format!("cannot write {}", path.display()))
            })?;
        std::fs::write(tmp.join("synth.toml"), toml::to_string(cfg)?)?;
        std::fs::rename(&tmp, out)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), out.display()))
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    result
}

fn write_png(path: &Path, g: &Generated) -> Result<()> {
    let s = (g.mask.len() as f64).sqrt() as u32;
    let bytes: Vec<u8> = g
        .image
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    let saved = if g.channels == 1 {
        image::GrayImage::from_raw(s, s, bytes)
            .expect("image size")
            .save(path)
    } else {
        image::RgbImage::from_raw(s, s, bytes)
            .expect("image size")
            .save(path)
    };
    saved.with_context(|| format!("cannot write {}", path.display()))
}

/// Fractal Perlin noise in about [−1, 1], `features` blobs across the image.
fn fbm(
    rng: &mut ChaCha8Rng,
    size: usize,
    features: f64,
    octaves: usize,
) -> impl Fn(usize, usize) -> f64 {
    let f = Fbm::<Perlin>::new(rng.random())
        .set_octaves(octaves)
        .set_frequency(features / size as f64);
    let (ox, oy) = (rng.random_range(0.0..100.0), rng.random_range(0.0..100.0));
    move |x, y| f.get([x as f64 + ox * size as f64, y as f64 + oy * size as f64])
}

fn smoothstep(e0: f64, e1: f64, x: f64) -> f64 {
    let t = ((x - e0) / (e1 - e0)).clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// A star-shaped irregular blob: `signed(x, y)` is < 0 inside, in pixels (approximately).
struct Blob {
    cx: f64,
    cy: f64,
    radius: f64,
    harmonics: Vec<(f64, f64, usize)>,
}

impl Blob {
    fn random(rng: &mut ChaCha8Rng, cx: f64, cy: f64, radius: f64, irregularity: f64) -> Self {
        let harmonics = (2..=12)
            .map(|k| {
                (
                    rng.random_range(0.0..irregularity) / k as f64,
                    rng.random_range(0.0..2.0 * PI),
                    k,
                )
            })
            .collect();
        Self {
            cx,
            cy,
            radius,
            harmonics,
        }
    }

    fn signed(&self, x: f64, y: f64) -> f64 {
        let (dx, dy) = (x - self.cx, y - self.cy);
        let theta = dy.atan2(dx);
        let wobble: f64 = self
            .harmonics
            .iter()
            .map(|(a, phase, k)| a * (*k as f64 * theta + phase).cos())
            .sum();
        (dx * dx + dy * dy).sqrt() - self.radius * (1.0 + wobble)
    }
}

fn mix(a: [f64; 3], b: [f64; 3], t: f64) -> [f64; 3] {
    [0, 1, 2].map(|c| a[c] * (1.0 - t) + b[c] * t)
}

/// Dermoscopy-like skin with a pigmented lesion (and, for `core`, a dark core inside a rim).
fn dermoscopy(
    rng: &mut ChaCha8Rng,
    s: usize,
    foreground: f64,
    empty: bool,
    core: bool,
) -> Generated {
    let sf = s as f64;
    let r = rng.random_range(0.78..0.93);
    let g = r * rng.random_range(0.70..0.82);
    let skin = [r, g, g * rng.random_range(0.78..0.92)];
    let tone = fbm(rng, s, 3.0, 3);
    let grain = fbm(rng, s, 24.0, 2);
    let redness = fbm(rng, s, 5.0, 2);
    let mottling = fbm(rng, s, 10.0, 3);
    let area = (foreground * rng.random_range(0.5..1.5)).min(0.5) * sf * sf;
    let radius = (area / PI).sqrt().max(2.0);
    let margin = (radius * 1.2).min(sf / 2.0 - 1.0);
    let (cx, cy) = (
        rng.random_range(margin..sf - margin),
        rng.random_range(margin..sf - margin),
    );
    let blob = Blob::random(rng, cx, cy, radius, 0.45);
    let core_radius = radius * rng.random_range(0.35..0.55);
    let inner = Blob::random(rng, cx, cy, core_radius, 0.3);
    let fuzz = rng.random_range(1.0..3.5) * sf / 128.0;
    let darkness = rng.random_range(0.35..0.6);
    let brown = [
        skin[0] * darkness,
        skin[1] * darkness * 0.8,
        skin[2] * darkness * 0.7,
    ];
    let dark = [brown[0] * 0.45, brown[1] * 0.5, brown[2] * 0.75];
    let hair_paths = random_hairs(rng, s);
    let mut image = vec![0f32; s * s * 3];
    let mut mask = vec![0u8; s * s];
    for y in 0..s {
        for x in 0..s {
            let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
            let shade = 1.0 + 0.06 * tone(x, y) + 0.025 * grain(x, y);
            let mut c = mix(
                skin,
                [skin[0], skin[1] * 0.85, skin[2] * 0.85],
                0.5 + 0.5 * redness(x, y),
            );
            c = c.map(|v| v * shade);
            if !empty {
                let d = blob.signed(fx, fy);
                let alpha = 1.0 - smoothstep(-fuzz, fuzz, d);
                let depth = smoothstep(0.0, radius, -d);
                let pigment = mix(
                    brown,
                    dark,
                    (0.6 * depth + 0.3 * mottling(x, y)).clamp(0.0, 1.0),
                );
                let mut lesion = pigment;
                let di = inner.signed(fx, fy);
                if core {
                    let beta = 1.0 - smoothstep(-fuzz * 0.6, fuzz * 0.6, di);
                    let blue_grey = [0.30, 0.29, 0.38].map(|v| v * (0.55 + darkness * 0.6));
                    lesion = mix(lesion, blue_grey, beta);
                    if di < 0.0 && d < 0.0 {
                        mask[y * s + x] = 2;
                    } else if d < 0.0 {
                        mask[y * s + x] = 1;
                    }
                } else if d < 0.0 {
                    mask[y * s + x] = 1;
                }
                c = mix(c, lesion, alpha);
            }
            // a dermatoscope's round field of view
            let rr = ((fx - sf / 2.0).powi(2) + (fy - sf / 2.0).powi(2)).sqrt() / (sf / 2.0);
            let vignette = 1.0 - 0.35 * smoothstep(0.85, 1.25, rr);
            for ch in 0..3 {
                image[(y * s + x) * 3 + ch] =
                    (c[ch] * vignette + rng.random_range(-0.012..0.012)) as f32;
            }
        }
    }
    for path in hair_paths {
        draw_path(&mut image, 3, s, &path, [0.12, 0.09, 0.07], None);
    }
    Generated {
        image,
        channels: 3,
        mask,
    }
}

/// A few thin dark curves (hairs) with widths of about one pixel.
fn random_hairs(rng: &mut ChaCha8Rng, s: usize) -> Vec<Vec<(f64, f64, f64)>> {
    let sf = s as f64;
    let n = if rng.random_bool(0.4) {
        rng.random_range(1..=4)
    } else {
        0
    };
    (0..n)
        .map(|_| {
            let mut p = (rng.random_range(0.0..sf), rng.random_range(0.0..sf));
            let mut heading: f64 = rng.random_range(0.0..2.0 * PI);
            let width = rng.random_range(0.6..1.2) * sf / 128.0;
            let steps = (sf * rng.random_range(0.3..0.8)) as usize;
            (0..steps)
                .map(|_| {
                    heading += rng.random_range(-0.08..0.08);
                    p = (p.0 + heading.cos(), p.1 + heading.sin());
                    (p.0, p.1, width)
                })
                .collect()
        })
        .collect()
}

/// Darkens (or marks) pixels within `width/2` of a path of (x, y, width) points: the image is
/// blended towards `colour` with a soft edge; `mask`, if given, is set to 1 where covered.
fn draw_path(
    image: &mut [f32],
    channels: usize,
    s: usize,
    path: &[(f64, f64, f64)],
    colour: [f64; 3],
    mut mask: Option<&mut [u8]>,
) {
    let mut cover = vec![0f64; s * s];
    for &(px, py, w) in path {
        let reach = (w / 2.0 + 1.0).ceil() as isize;
        let (ix, iy) = (px.floor() as isize, py.floor() as isize);
        for y in iy - reach..=iy + reach {
            for x in ix - reach..=ix + reach {
                if x < 0 || y < 0 || x >= s as isize || y >= s as isize {
                    continue;
                }
                let d = ((x as f64 + 0.5 - px).powi(2) + (y as f64 + 0.5 - py).powi(2)).sqrt();
                let a = (w / 2.0 + 0.5 - d).clamp(0.0, 1.0);
                let at = y as usize * s + x as usize;
                cover[at] = cover[at].max(a);
            }
        }
    }
    for (at, &a) in cover.iter().enumerate() {
        if a <= 0.0 {
            continue;
        }
        for ch in 0..channels {
            let v = &mut image[at * channels + ch];
            *v = (*v as f64 * (1.0 - 0.85 * a) + colour[ch] * 0.85 * a) as f32;
        }
        if let Some(m) = mask.as_deref_mut() {
            if a >= 0.5 {
                m[at] = 1;
            }
        }
    }
}

/// A grey MRI-like axial slice with a few small bright lesions.
fn mri(rng: &mut ChaCha8Rng, cfg: &SynthConfig, empty: bool) -> Generated {
    let (s, foreground) = (cfg.size, cfg.foreground());
    let sf = s as f64;
    let (ax, ay) = (
        sf * rng.random_range(0.38..0.45),
        sf * rng.random_range(0.42..0.47),
    );
    let (cx, cy) = (
        sf / 2.0 + rng.random_range(-2.0..2.0),
        sf / 2.0 + rng.random_range(-2.0..2.0),
    );
    let skull = 0.045 * sf;
    let matter = fbm(rng, s, 7.0, 4);
    let bias = fbm(rng, s, 1.5, 1);
    let vent = (
        sf * rng.random_range(0.05..0.08),
        sf * rng.random_range(0.12..0.18),
    );
    let head = |x: f64, y: f64| (((x - cx) / ax).powi(2) + ((y - cy) / ay).powi(2)).sqrt();
    let mut lesions = vec![];
    if !empty {
        let n = rng.random_range(1..=4);
        let total = foreground * rng.random_range(0.6..1.4) * sf * sf;
        // equal shares draw nothing: data sets without size_spread keep their images
        let shares: Vec<f64> = if cfg.size_spread > 1.0 {
            (0..n)
                .map(|_| cfg.size_spread.powf(rng.random_range(0.0..1.0)))
                .collect()
        } else {
            vec![1.0; n]
        };
        let sum: f64 = shares.iter().sum();
        for share in shares {
            let radius = (total * share / sum / PI).sqrt().max(1.2);
            // inside the brain, away from the skull
            let (lx, ly) = loop {
                let p = (rng.random_range(0.0..sf), rng.random_range(0.0..sf));
                if head(p.0, p.1) < 0.78 {
                    break p;
                }
            };
            lesions.push((
                Blob::random(rng, lx, ly, radius, 0.25),
                rng.random_range(0.82..0.97),
            ));
        }
    }
    let sigma = rng.random_range(0.015..0.04);
    let mut image = vec![0f32; s * s];
    let mut mask = vec![0u8; s * s];
    for y in 0..s {
        for x in 0..s {
            let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
            let h = head(fx, fy);
            let edge = skull / ax.min(ay);
            let mut v = if h > 1.0 + edge {
                0.0
            } else if h > 1.0 - edge {
                0.85 // skull and scalp
            } else if h > 1.0 - 1.6 * edge {
                0.12 // cerebrospinal fluid under the skull
            } else {
                // grey / white matter from thresholded noise
                let m = matter(x, y);
                0.42 + 0.14 * smoothstep(-0.05, 0.15, m) + 0.03 * m
            };
            let vx = (fx - cx).abs() - vent.0 * 0.8;
            let ventricle = ((vx / vent.0).powi(2) + ((fy - cy) / vent.1).powi(2)).sqrt();
            if h < 0.7 && ventricle < 1.0 {
                v = 0.12 + 0.1 * smoothstep(0.7, 1.0, ventricle);
            }
            for (blob, brightness) in &lesions {
                let d = blob.signed(fx, fy);
                let alpha = cfg.contrast * (1.0 - smoothstep(-0.8, 0.8, d));
                v = v * (1.0 - alpha) + brightness * alpha;
                if d < 0.0 {
                    mask[y * s + x] = 1;
                }
            }
            v *= 1.0 + 0.12 * bias(x, y);
            // Rician noise: magnitude of a complex signal with Gaussian noise
            let (n1, n2): (f64, f64) = (gaussian(rng) * sigma, gaussian(rng) * sigma);
            image[y * s + x] = ((v + n1).powi(2) + n2 * n2).sqrt() as f32;
        }
    }
    Generated {
        image,
        channels: 1,
        mask,
    }
}

fn gaussian(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random_range(1e-12..1.0);
    let u2: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (2.0 * PI * u2).cos()
}

/// A fundus-like image with branching vessels growing from the optic disc.
fn fundus(rng: &mut ChaCha8Rng, s: usize, foreground: f64, empty: bool) -> Generated {
    let sf = s as f64;
    let tone = fbm(rng, s, 4.0, 3);
    let disc = (
        sf * rng.random_range(0.3..0.7),
        sf * rng.random_range(0.35..0.65),
        sf * rng.random_range(0.06..0.09),
    );
    let mut image = vec![0f32; s * s * 3];
    for y in 0..s {
        for x in 0..s {
            let (fx, fy) = (x as f64 + 0.5, y as f64 + 0.5);
            let rr = ((fx - sf / 2.0).powi(2) + (fy - sf / 2.0).powi(2)).sqrt() / (sf / 2.0);
            let fov = 1.0 - smoothstep(0.92, 1.0, rr);
            let dd = ((fx - disc.0).powi(2) + (fy - disc.1).powi(2)).sqrt() / disc.2;
            let glow = 1.0 - smoothstep(0.6, 1.3, dd);
            let shade = 1.0 + 0.08 * tone(x, y) - 0.2 * rr * rr;
            let base = [0.78 * shade, 0.36 * shade, 0.16 * shade];
            let c = mix(base, [0.98, 0.86, 0.55], glow);
            for ch in 0..3 {
                image[(y * s + x) * 3 + ch] = (c[ch] * fov) as f32;
            }
        }
    }
    let mut mask = vec![0u8; s * s];
    if !empty {
        let mut covered = 0.0;
        let target = foreground * rng.random_range(0.7..1.3) * sf * sf;
        let mut paths = vec![];
        while covered < target && paths.len() < 64 {
            let heading = rng.random_range(0.0..2.0 * PI);
            let width = rng.random_range(1.6..3.2) * sf / 128.0;
            let start = (
                disc.0 + heading.cos() * disc.2 * 0.5,
                disc.1 + heading.sin() * disc.2 * 0.5,
            );
            grow_vessel(rng, s, start, heading, width, 0, &mut paths);
            covered = paths
                .iter()
                .map(|p: &Vec<(f64, f64, f64)>| p.iter().map(|q| q.2).sum::<f64>())
                .sum();
        }
        for path in &paths {
            draw_path(&mut image, 3, s, path, [0.45, 0.08, 0.05], Some(&mut mask));
        }
    }
    for v in image.iter_mut() {
        *v += rng.random_range(-0.01..0.01);
    }
    Generated {
        image,
        channels: 3,
        mask,
    }
}

/// Grows one vessel as a wandering path that narrows and branches.
fn grow_vessel(
    rng: &mut ChaCha8Rng,
    s: usize,
    start: (f64, f64),
    mut heading: f64,
    mut width: f64,
    generation: usize,
    paths: &mut Vec<Vec<(f64, f64, f64)>>,
) {
    let sf = s as f64;
    let mut p = start;
    let mut path = vec![];
    let mut turn = 0.0;
    let length = sf * rng.random_range(0.25..0.6) / (1.0 + generation as f64 * 0.5);
    let mut travelled = 0.0;
    while travelled < length && width > 0.5 {
        turn = 0.85 * turn + rng.random_range(-0.04..0.04);
        heading += turn;
        p = (p.0 + heading.cos() * 0.7, p.1 + heading.sin() * 0.7);
        travelled += 0.7;
        if p.0 < 0.0 || p.1 < 0.0 || p.0 >= sf || p.1 >= sf {
            break;
        }
        path.push((p.0, p.1, width));
        width *= 0.9985;
        if generation < 3 && rng.random_bool(0.012) {
            let side = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
            let branch = heading + side * rng.random_range(0.4..1.0);
            grow_vessel(rng, s, p, branch, width * 0.75, generation + 1, paths);
        }
    }
    paths.push(path);
}

/// Corrupts a mask the way annotators do: dilated, eroded, shifted by a few pixels, or dropped.
fn corrupt_mask(rng: &mut ChaCha8Rng, mask: &mut Vec<u8>, s: usize) {
    let k = ((s as f64 / 128.0) * rng.random_range(1.0..3.0))
        .round()
        .max(1.0) as isize;
    match rng.random_range(0..4) {
        0 => *mask = morph(mask, s, k, true),
        1 => *mask = morph(mask, s, k, false),
        2 => {
            let dx =
                rng.random_range(2i64..=5) as isize * if rng.random_bool(0.5) { 1 } else { -1 };
            let dy =
                rng.random_range(2i64..=5) as isize * if rng.random_bool(0.5) { 1 } else { -1 };
            let mut shifted = vec![0u8; s * s];
            for y in 0..s as isize {
                for x in 0..s as isize {
                    let (sx, sy) = (x - dx, y - dy);
                    if sx >= 0 && sy >= 0 && sx < s as isize && sy < s as isize {
                        shifted[(y * s as isize + x) as usize] =
                            mask[(sy * s as isize + sx) as usize];
                    }
                }
            }
            *mask = shifted;
        }
        _ => mask.iter_mut().for_each(|m| *m = 0),
    }
}

/// Max (dilate) or min (erode) filter over a (2k+1)² square.
fn morph(mask: &[u8], s: usize, k: isize, dilate: bool) -> Vec<u8> {
    let si = s as isize;
    let mut out = vec![0u8; s * s];
    for y in 0..si {
        for x in 0..si {
            let mut v = if dilate { 0 } else { u8::MAX };
            for yy in (y - k).max(0)..=(y + k).min(si - 1) {
                for xx in (x - k).max(0)..=(x + k).min(si - 1) {
                    let m = mask[(yy * si + xx) as usize];
                    v = if dilate { v.max(m) } else { v.min(m) };
                }
            }
            out[(y * si + x) as usize] = v;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::components;

    fn mri(size_spread: f64, contrast: f64) -> SynthConfig {
        SynthConfig {
            kind: SynthKind::Mri,
            count: 60,
            size: 96,
            seed: 4,
            foreground: Some(0.01),
            empty_fraction: 0.0,
            label_noise: 0.0,
            val_count: 0,
            size_spread,
            contrast,
        }
    }

    /// Mean over images with several lesions of (largest area / smallest area).
    fn size_ratio(cfg: &SynthConfig) -> f64 {
        let ratios: Vec<f64> = (0..cfg.count)
            .filter_map(|i| {
                let g = generate(cfg, i, true);
                let areas: Vec<usize> = components(&g.mask, cfg.size, cfg.size)
                    .iter()
                    .map(Vec::len)
                    .collect();
                (areas.len() >= 2).then(|| {
                    *areas.iter().max().unwrap() as f64 / *areas.iter().min().unwrap() as f64
                })
            })
            .collect();
        ratios.iter().sum::<f64>() / ratios.len() as f64
    }

    /// Mean intensity inside the lesions minus the mean of a ring 3–5 pixels outside them.
    fn lesion_contrast(cfg: &SynthConfig) -> f64 {
        let s = cfg.size as isize;
        let (mut inside, mut outside) = ((0.0, 0), (0.0, 0));
        for i in 0..cfg.count {
            let g = generate(cfg, i, true);
            let near = |x: isize, y: isize, r: isize| {
                (-r..=r).any(|dy| {
                    (-r..=r).any(|dx| {
                        let (u, v) = (x + dx, y + dy);
                        u >= 0 && v >= 0 && u < s && v < s && g.mask[(v * s + u) as usize] == 1
                    })
                })
            };
            for y in 0..s {
                for x in 0..s {
                    let v = g.image[(y * s + x) as usize] as f64;
                    if g.mask[(y * s + x) as usize] == 1 {
                        inside = (inside.0 + v, inside.1 + 1);
                    } else if near(x, y, 5) && !near(x, y, 2) {
                        outside = (outside.0 + v, outside.1 + 1);
                    }
                }
            }
        }
        inside.0 / inside.1 as f64 - outside.0 / outside.1 as f64
    }

    #[test]
    fn size_spread_makes_one_images_lesions_differ_in_size() {
        let (equal, spread) = (size_ratio(&mri(1.0, 1.0)), size_ratio(&mri(30.0, 1.0)));
        assert!(
            spread > 3.0 * equal,
            "largest/smallest: {equal:.2} equal, {spread:.2} spread"
        );
    }

    #[test]
    fn contrast_fades_the_lesions_into_the_tissue() {
        let (full, faint) = (
            lesion_contrast(&mri(1.0, 1.0)),
            lesion_contrast(&mri(1.0, 0.3)),
        );
        assert!(full > 0.2, "{full}");
        assert!((faint / full - 0.3).abs() < 0.1, "{faint} vs {full}");
    }

    #[test]
    fn the_mri_knobs_are_checked_and_belong_to_mri() {
        assert!(mri(30.0, 0.3).validate().is_ok());
        let err = |c: SynthConfig| c.validate().unwrap_err().to_string();
        assert!(err(mri(0.5, 1.0)).starts_with("size_spread"));
        assert!(err(mri(1.0, 0.0)).starts_with("contrast"));
        let lesion = SynthConfig {
            kind: SynthKind::Lesion,
            ..mri(1.0, 0.5)
        };
        assert!(err(lesion).contains("only the mri kind"));
    }
}
