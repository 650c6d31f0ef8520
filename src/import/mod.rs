//! Medical volumes in: NIfTI (`.nii`, `.nii.gz`) and NRRD (`.nrrd`, `.nhdr`) scans and their
//! label volumes, cut into 2-D slice pairs of the data-set layout:
//! `OUT/images/<volume>_<axis><index:04>.png` (8-bit grey, windowed) and `OUT/masks/<same>.png`
//! (8-bit class index = label value).
//!
//! Scan and label are both seen in the canonical orientation LPS ([`Canonical`]: permutation
//! and flips of the stored axes, nearest axes for an oblique volume), must lie on the same grid
//! there, and are sliced alike, so masks stay aligned with images whatever the files' affines.

mod nifti;
mod nrrd;
mod volume;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use image::GrayImage;
use rayon::prelude::*;

use crate::fsutil::write_png;
pub use volume::{Axis, Canonical, Geometry, Space, Volume};

/// The volume file extensions, longest first (a volume's name is its file name without it).
pub const EXTENSIONS: [&str; 4] = [".nii.gz", ".nii", ".nrrd", ".nhdr"];

/// A volume file's name without its extension, and the extension (`case1.nii.gz` → `case1`,
/// `.nii.gz`; case-insensitive), or `None` for a file of another format.
fn split_name(path: &Path) -> Option<(&str, &'static str)> {
    let name = path.file_name()?.to_str()?;
    EXTENSIONS.into_iter().find_map(|ext| {
        let cut = name.len().checked_sub(ext.len())?;
        (cut > 0 && name.is_char_boundary(cut) && name[cut..].eq_ignore_ascii_case(ext))
            .then(|| (&name[..cut], ext))
    })
}

/// The name of a volume file without its format's extension, or `None` for another format.
pub fn volume_stem(path: &Path) -> Option<&str> {
    split_name(path).map(|(stem, _)| stem)
}

fn unknown_format(path: &Path) -> anyhow::Error {
    anyhow!(
        "{}: unknown volume format (expected .nii, .nii.gz, .nrrd or .nhdr)",
        path.display()
    )
}

/// Reads a NIfTI or NRRD volume, chosen by the file's extension.
pub fn read_volume(path: &Path) -> Result<Volume> {
    let (_, ext) = split_name(path).ok_or_else(|| unknown_format(path))?;
    std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    match ext {
        ".nii.gz" | ".nii" => nifti::read(path),
        _ => nrrd::read(path),
    }
}

/// How scan values become 8-bit grey: `round(255·clamp((v − lo)/(hi − lo), 0, 1))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Intensity {
    /// A fixed window `[lo, hi]` in the scan's units (CT: Hounsfield, e.g. −1000,400 for lung).
    Window(f64, f64),
    /// `lo`, `hi` = the `p_lo`-th and `p_hi`-th percentiles of the volume's finite voxels
    /// (nearest rank: sorted[round(p/100·(n − 1))]), for MRI.
    Percentile(f64, f64),
}

/// What `import` writes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImportOptions {
    /// Slice along this canonical axis.
    pub axis: Axis,
    pub intensity: Intensity,
    /// Keep only slices whose label has a non-zero voxel (applied after `every`).
    pub only_labelled: bool,
    /// Keep slices 0, K, 2K, … (K ≥ 1).
    pub every: usize,
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            axis: Axis::Z,
            intensity: Intensity::Percentile(0.5, 99.5),
            only_labelled: false,
            every: 1,
        }
    }
}

/// Parses `LO,HI` (two numbers, LO < HI), for `--window` and `--percentile`.
pub fn parse_range(s: &str) -> Result<(f64, f64), String> {
    let bad = || format!("`{s}` is not LO,HI (two numbers, LO < HI)");
    let (lo, hi) = s.split_once(',').ok_or_else(bad)?;
    let (lo, hi): (f64, f64) = (
        lo.trim().parse().map_err(|_| bad())?,
        hi.trim().parse().map_err(|_| bad())?,
    );
    if lo.is_finite() && hi.is_finite() && lo < hi {
        Ok((lo, hi))
    } else {
        Err(bad())
    }
}

/// One imported volume: its name, its slice count along the axis, and the pairs written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeReport {
    pub name: String,
    pub slices: usize,
    pub written: usize,
    /// Slice pairs of an earlier import of this volume that this one replaced by nothing.
    pub removed: usize,
}

/// What [`import`] did, per volume, and its wall time; displayed as one line per volume and a
/// total with the speed in slices/s.
#[derive(Debug, Clone)]
pub struct ImportReport {
    pub out: PathBuf,
    pub volumes: Vec<VolumeReport>,
    pub seconds: f64,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for v in &self.volumes {
            write!(f, "{}: {} of {} slices", v.name, v.written, v.slices)?;
            if v.removed > 0 {
                write!(
                    f,
                    "; removed {} stale slices of an earlier import",
                    v.removed
                )?;
            }
            writeln!(f)?;
        }
        let written: usize = self.volumes.iter().map(|v| v.written).sum();
        write!(
            f,
            "wrote {written} slice pairs from {} volume{} to {} in {:.2} s ({:.0} slices/s)",
            self.volumes.len(),
            if self.volumes.len() == 1 { "" } else { "s" },
            self.out.display(),
            self.seconds,
            written as f64 / self.seconds.max(1e-9)
        )
    }
}

/// Pairs the volumes of two folders by volume name ([`volume_stem`]); other files are ignored.
/// A volume without a partner, two volumes of one name, or an empty folder is an error.
pub fn pair_folders(images: &Path, labels: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let scans = volumes_in(images)?;
    let mut masks = volumes_in(labels)?;
    if scans.is_empty() {
        bail!(
            "{}: no volumes (.nii, .nii.gz, .nrrd, .nhdr)",
            images.display()
        );
    }
    if let Some((name, path)) = masks.iter().find(|(n, _)| !scans.contains_key(*n)) {
        bail!(
            "{}: no scan named `{name}` in {}",
            path.display(),
            images.display()
        );
    }
    scans
        .into_iter()
        .map(|(name, scan)| match masks.remove(&name) {
            Some(label) => Ok((scan, label)),
            None => bail!(
                "{}: no label named `{name}` in {}",
                scan.display(),
                labels.display()
            ),
        })
        .collect()
}

fn volumes_in(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut out = BTreeMap::new();
    for entry in entries {
        let path = entry
            .with_context(|| format!("cannot list {}", dir.display()))?
            .path();
        let Some(name) = volume_stem(&path).filter(|n| !n.starts_with('.')) else {
            continue;
        };
        if let Some(other) = out.insert(name.to_string(), path.clone()) {
            bail!(
                "{} and {}: two volumes named `{name}`",
                other.display(),
                path.display()
            );
        }
    }
    Ok(out)
}

/// Writes the slices of each (scan, label) pair into `out` (`images/`, `masks/`, created; files
/// of the same names are replaced, and slices of an earlier import of the same volume and axis
/// that this one does not write are removed). Stops at the first bad volume with an error
/// naming it.
pub fn import(
    pairs: &[(PathBuf, PathBuf)],
    out: &Path,
    opts: &ImportOptions,
) -> Result<ImportReport> {
    if opts.every == 0 {
        bail!("--every must be at least 1");
    }
    if let Intensity::Percentile(lo, hi) = opts.intensity {
        if !(0.0 <= lo && lo < hi && hi <= 100.0) {
            bail!("--percentile {lo},{hi}: need 0 <= LO < HI <= 100");
        }
    }
    let start = Instant::now();
    for sub in ["images", "masks"] {
        let dir = out.join(sub);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let volumes = pairs
        .iter()
        .map(|(scan, label)| import_pair(scan, label, out, opts))
        .collect::<Result<_>>()?;
    Ok(ImportReport {
        out: out.to_path_buf(),
        volumes,
        seconds: start.elapsed().as_secs_f64(),
    })
}

fn import_pair(
    scan_path: &Path,
    label_path: &Path,
    out: &Path,
    opts: &ImportOptions,
) -> Result<VolumeReport> {
    let name = volume_stem(scan_path)
        .ok_or_else(|| unknown_format(scan_path))?
        .to_string();
    let (scan, label) = rayon::join(|| read_volume(scan_path), || read_volume(label_path));
    let (scan, label) = (scan?, label?);
    let scan_view = Canonical::new(scan_path, scan.dims, &scan.geometry)?;
    let label_view = Canonical::new(label_path, label.dims, &label.geometry)?;
    label_view.check_same_grid(&scan_view, label_path, scan_path)?;
    let classes = class_indices(&label, label_path)?;
    let (lo, hi) = match opts.intensity {
        Intensity::Window(lo, hi) => (lo, hi),
        Intensity::Percentile(p_lo, p_hi) => percentiles(&scan.data, p_lo, p_hi),
    };
    // ⌊x + 0.5⌋ rounds x ∈ [0, 255] (no libm call per voxel); NaN ↦ 0 (a NaN cast to u8), and
    // everything ↦ 0 for an empty window
    let grey = |v: f32| match hi > lo {
        true => (((f64::from(v) - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0 + 0.5) as u8,
        false => 0,
    };

    let axis = opts.axis;
    let slices = scan_view.slices(axis);
    let kept: Vec<usize> = (0..slices).step_by(opts.every).collect();
    let written = kept
        .par_iter()
        .map(|&k| -> Result<Option<String>> {
            let (w, h, mask) = label_view.slice(&classes, axis, k, |c| c);
            if opts.only_labelled && mask.iter().all(|&c| c == 0) {
                return Ok(None);
            }
            let (_, _, pixels) = scan_view.slice(&scan.data, axis, k, grey);
            let file = slice_file(&name, axis, k);
            write_grey(&out.join("images").join(&file), w, h, pixels)?;
            write_grey(&out.join("masks").join(&file), w, h, mask)?;
            Ok(Some(file))
        })
        .filter_map(Result::transpose)
        .collect::<Result<BTreeSet<String>>>()?;
    let removed = remove_stale(out, &name, axis, &written)?;
    Ok(VolumeReport {
        name,
        slices,
        written: written.len(),
        removed,
    })
}

/// The file name of slice `k` of volume `name` along `axis`: `<name>_<axis><k:04>.png`.
fn slice_file(name: &str, axis: Axis, k: usize) -> String {
    format!("{name}_{}{k:04}.png", axis.letter())
}

/// Removes the slice files ([`slice_file`]) of volume `name` along `axis` that this import did
/// not write — left by an earlier import with other `--every` / `--only-labelled` settings or
/// of a longer volume — so that the data set holds exactly this import's slices. Returns the
/// number of image files removed.
fn remove_stale(out: &Path, name: &str, axis: Axis, written: &BTreeSet<String>) -> Result<usize> {
    let prefix = format!("{name}_{}", axis.letter());
    let is_slice = |file: &str| {
        file.strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(".png"))
            .is_some_and(|k| k.len() >= 4 && k.bytes().all(|b| b.is_ascii_digit()))
    };
    let mut removed = 0;
    for sub in ["images", "masks"] {
        let dir = out.join(sub);
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            let file = entry.file_name();
            let Some(file) = file.to_str() else { continue };
            if is_slice(file) && !written.contains(file) {
                let path = dir.join(file);
                std::fs::remove_file(&path)
                    .with_context(|| format!("cannot remove the stale slice {}", path.display()))?;
                removed += usize::from(sub == "images");
            }
        }
    }
    Ok(removed)
}

fn write_grey(path: &Path, w: usize, h: usize, pixels: Vec<u8>) -> Result<()> {
    let img = u32::try_from(w)
        .ok()
        .zip(u32::try_from(h).ok())
        .and_then(|(w, h)| GrayImage::from_raw(w, h, pixels))
        .with_context(|| format!("{}: a {w}×{h} slice is too large", path.display()))?;
    write_png(path, &img)
}

/// The label values as class indices; a value that is not an integer in 0..=255 is an error
/// naming the file, the value and its voxel.
fn class_indices(label: &Volume, path: &Path) -> Result<Vec<u8>> {
    let is_class = |v: f32| (0.0..=255.0).contains(&v) && f32::from(v as u8) == v;
    if let Some(i) = label.data.iter().position(|&v| !is_class(v)) {
        let [nx, ny, _] = label.dims;
        bail!(
            "{}: label value {} at voxel ({}, {}, {}) is not a class index (an integer 0..=255)",
            path.display(),
            label.data[i],
            i % nx,
            i / nx % ny,
            i / (nx * ny)
        );
    }
    Ok(label.data.iter().map(|&v| v as u8).collect())
}

/// The `p_lo`-th and `p_hi`-th percentiles of the finite values (nearest rank); (0, 0) if none.
fn percentiles(data: &[f32], p_lo: f64, p_hi: f64) -> (f64, f64) {
    let mut v: Vec<f32> = data.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return (0.0, 0.0);
    }
    let rank = |p: f64| (p / 100.0 * (v.len() - 1) as f64).round() as usize;
    let (r_lo, r_hi) = (rank(p_lo), rank(p_hi));
    let (_, lo, above) = v.select_nth_unstable_by(r_lo, f32::total_cmp);
    let lo = *lo;
    let hi = if r_hi > r_lo {
        *above
            .select_nth_unstable_by(r_hi - r_lo - 1, f32::total_cmp)
            .1
    } else {
        lo
    };
    (f64::from(lo), f64::from(hi))
}
