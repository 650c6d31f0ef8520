//! Medical volumes in: NIfTI (`.nii`, `.nii.gz`) and NRRD (`.nrrd`, `.nhdr`) scans and their
//! label volumes, cut into 2-D slice pairs of the data-set layout:
//! `OUT/images/<volume>_<axis><index:04>.png` (8-bit grey, windowed) and `OUT/masks/<same>.png`
//! (8-bit class index = label value).
//!
//! Scan and label are both seen in the canonical orientation LPS ([`Canonical`]: permutation
//! and flips of the stored axes, nearest axes for an oblique volume), must lie on the same grid
//! there, and are sliced alike, so masks stay aligned with images whatever the files' affines.
//!
//! Bounds: a volume's size is checked from its header against [`Limits::max_voxels`] before
//! any voxel is read, compressed data is never inflated past what the header needs, and only
//! regular files are read.
//!
//! A re-import of a volume replaces its slices as a whole: the new slices are written to
//! `OUT/.import-staging/<volume>_<axis>/`, a commit record is written there, and only then are
//! the old slices replaced (`commit`, `apply`). A kill before the commit record leaves the old
//! slices untouched; a kill after it leaves a state the data-set reader refuses (images
//! without masks), which the next `import` into OUT completes before anything else.

mod nifti;
mod nrrd;
mod volume;
mod write;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use image::GrayImage;
use rayon::prelude::*;

use crate::fsutil::{
    atomic_write, ensure_regular_file, read_text, remove_dead_temporaries, write_png, DirLock,
    MAX_TEXT_BYTES,
};
pub use volume::{
    Axis, Canonical, Geometry, Limits, Space, Volume, DEFAULT_MAX_VOXELS, MAX_VOXELS_ENV,
};
use volume::{Classes, Sink, Values};
pub use write::{grid_header, write_nifti};

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

/// Reads a NIfTI or NRRD volume, chosen by the file's extension, as f32 values, within
/// `limits`. Errors name the file and the header field at fault.
pub fn read_volume(path: &Path, limits: &Limits) -> Result<Volume> {
    let mut values = Values::default();
    let (dims, geometry) = read_into(path, limits, &mut values)?;
    Ok(Volume {
        dims,
        data: values.data,
        geometry,
    })
}

/// Reads a label volume as class indices: the values themselves (a value that is not an
/// integer in 0..=255, NaN included, is an error naming the file, the value and its voxel), or
/// through `map` (any integer; unnamed values become 0).
pub fn read_label(
    path: &Path,
    limits: &Limits,
    map: Option<&LabelMap>,
) -> Result<([usize; 3], Geometry, Vec<u8>)> {
    let mut classes = Classes::new(map);
    let (dims, geometry) = read_into(path, limits, &mut classes)?;
    Ok((dims, geometry, classes.data))
}

fn read_into(path: &Path, limits: &Limits, sink: &mut dyn Sink) -> Result<([usize; 3], Geometry)> {
    let (_, ext) = split_name(path).ok_or_else(|| unknown_format(path))?;
    match ext {
        ".nii.gz" | ".nii" => nifti::read(path, limits, sink),
        _ => nrrd::read(path, limits, sink),
    }
}

/// How scan values become 8-bit grey: `round(255·clamp((v − lo)/(hi − lo), 0, 1))`.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Intensity {
    /// A fixed window `[lo, hi]` in the scan's units (CT: Hounsfield, e.g. −1000,400 for lung).
    Window(f64, f64),
    /// `lo`, `hi` = the `p_lo`-th and `p_hi`-th percentiles of the volume's finite voxels
    /// (nearest rank: sorted[round(p/100·(n − 1))]), for MRI; where they are equal (a volume
    /// that is nearly all one value), the least and greatest finite values instead, so that
    /// what differs from the background stays visible.
    Percentile(f64, f64),
}

impl Intensity {
    /// A window needs finite LO < HI; percentiles 0 ≤ LO < HI ≤ 100. The error names the
    /// command-line flag.
    pub fn check(&self) -> Result<(), String> {
        match *self {
            Intensity::Window(lo, hi) if !(lo.is_finite() && hi.is_finite() && lo < hi) => {
                Err(format!("--window {lo},{hi}: need finite LO < HI"))
            }
            Intensity::Window(..) => Ok(()),
            Intensity::Percentile(lo, hi) => crate::rules::clip_percentiles([lo, hi])
                .map_err(|m| format!("--percentile {lo},{hi}: {m}")),
        }
    }

    /// The grey value of each scan value of `data` (`path` names the scan in the error where
    /// no voxel is finite): ⌊x + 0.5⌋ rounds x ∈ [0, 255] (no libm call per voxel); NaN ↦ 0,
    /// and everything ↦ 0 for an empty window (a constant volume).
    pub fn grey(&self, data: &[f32], path: &Path) -> Result<impl Fn(f32) -> u8 + Sync + Copy> {
        let (lo, hi) = window(data, *self).ok_or_else(|| {
            anyhow!(
                "{}: no finite voxel (every value is NaN or infinite); nothing to window",
                path.display()
            )
        })?;
        Ok(move |v: f32| match hi > lo {
            true => (((f64::from(v) - lo) / (hi - lo)).clamp(0.0, 1.0) * 255.0 + 0.5) as u8,
            false => 0,
        })
    }
}

/// How a data set's slices were cut from their volumes: the axis and the intensity mapping.
/// `import` writes it as `OUT/import.json` ([`SLICING_FILE`]); training records it in the model,
/// so that `predict` cuts a new scan the same way.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slicing {
    pub axis: Axis,
    pub intensity: Intensity,
    /// 2.5-D context: each image stacks slices k−c … k+c top to bottom (a grey image
    /// 2c + 1 slices high, [`slice_planes`]); 0 = slice k alone.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub context: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

pub use crate::rules::MAX_CONTEXT;

/// Slices k−`context` … k+`context` along `axis` of the stored scan `data` (seen through
/// `view`), each value mapped to grey by `grey`, one after the other: planar
/// `(2·context + 1) × h × w` bytes, which as a grey image `w` wide is the slices stacked top to
/// bottom. Past the volume's ends the first or last slice repeats.
pub fn slice_planes(
    view: &Canonical,
    data: &[f32],
    axis: Axis,
    k: usize,
    context: usize,
    grey: impl Fn(f32) -> u8 + Copy,
) -> Vec<u8> {
    let last = view.slices(axis) - 1;
    let mut planes = Vec::new();
    for offset in 0..=2 * context {
        let z = (k + offset).saturating_sub(context).min(last);
        planes.extend(view.slice(data, axis, z, grey).2);
    }
    planes
}

/// The file of a data set folder that records its [`Slicing`].
pub const SLICING_FILE: &str = "import.json";

impl Slicing {
    /// The slicing recorded in `dir/import.json`, if that file exists; a malformed record is an
    /// error naming the file.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(SLICING_FILE);
        if !path.exists() {
            return Ok(None);
        }
        let text = read_text(&path, MAX_TEXT_BYTES, "import record")?;
        let slicing: Slicing = serde_json::from_str(&text)
            .map_err(|e| anyhow!("{}: not an import record ({e})", path.display()))?;
        slicing
            .check()
            .map_err(|m| anyhow!("{}: {m}", path.display()))?;
        Ok(Some(slicing))
    }

    /// The intensity mapping and the context obey their rules; the error names the field.
    pub fn check(&self) -> Result<(), String> {
        self.intensity
            .check()
            .map_err(|m| format!("`intensity`: {m}"))?;
        crate::rules::context(self.context).map_err(|m| format!("`context`: {m}"))
    }

    /// Input channels of the images this slicing cuts: 2·context + 1.
    pub fn channels(&self) -> usize {
        2 * self.context + 1
    }

    /// The slicing of a data set folder: recorded in `root`, or in its `train/` and `val/`
    /// splits (which must then agree); `None` where no record exists (images not from
    /// `import`, or imported before it wrote records).
    pub fn of_dataset(root: &Path) -> Result<Option<Self>> {
        let mut found: Option<(PathBuf, Slicing)> = None;
        for dir in [root.to_path_buf(), root.join("train"), root.join("val")] {
            let Some(s) = Self::read(&dir)? else { continue };
            match &found {
                Some((other, o)) if *o != s => bail!(
                    "{} and {}: the data set's import records disagree ({} vs {}); its slices \
                     must be cut alike",
                    other.join(SLICING_FILE).display(),
                    dir.join(SLICING_FILE).display(),
                    o,
                    s
                ),
                Some(_) => {}
                None => found = Some((dir, s)),
            }
        }
        Ok(found.map(|(_, s)| s))
    }
}

impl fmt::Display for Slicing {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "--axis {}", self.axis.letter())?;
        match self.intensity {
            Intensity::Window(lo, hi) => write!(f, " --window {lo},{hi}")?,
            Intensity::Percentile(lo, hi) => write!(f, " --percentile {lo},{hi}")?,
        }
        match self.context {
            0 => Ok(()),
            k => write!(f, " --context {k}"),
        }
    }
}

/// What `import` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct ImportOptions {
    /// Slice along this canonical axis.
    pub axis: Axis,
    pub intensity: Intensity,
    /// Keep only slices whose label has a non-zero voxel (applied after `every`).
    pub only_labelled: bool,
    /// Keep slices 0, K, 2K, … (K ≥ 1).
    pub every: usize,
    /// 2.5-D context ([`Slicing::context`], 0 or 1).
    pub context: usize,
    /// Label values to classes (`--label-map`); None: the values are the classes.
    pub label_map: Option<LabelMap>,
}

/// `--label-map 37=1,38=1`: which label values become which class; every other value becomes
/// 0 (background). Merges or renumbers atlas regions, whose values may exceed 255.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelMap(pub std::collections::BTreeMap<i64, u8>);

impl LabelMap {
    /// The class of label value `v`.
    pub fn class_of(&self, v: i64) -> u8 {
        self.0.get(&v).copied().unwrap_or(0)
    }
}

/// Largest |label value| a map takes: voxels are read as f32, exact up to 2^24.
pub const MAX_MAPPED_LABEL: i64 = 1 << 24;

/// Parses `VALUE=CLASS,…` (integers, |VALUE| ≤ 2^24; classes 0..=255; each value named once).
pub fn parse_label_map(s: &str) -> Result<LabelMap, String> {
    let mut map = std::collections::BTreeMap::new();
    for item in s.split(',') {
        let (value, class) = item
            .split_once('=')
            .ok_or_else(|| format!("`{item}` is not VALUE=CLASS (e.g. 37=1,38=1)"))?;
        let value: i64 = value
            .trim()
            .parse()
            .map_err(|_| format!("`{value}` in `{item}` is not an integer label value"))?;
        let class: u8 = class
            .trim()
            .parse()
            .map_err(|_| format!("`{class}` in `{item}` is not a class 0..=255"))?;
        if value.abs() > MAX_MAPPED_LABEL {
            return Err(format!(
                "label value {value} is beyond 2^24 = {MAX_MAPPED_LABEL}, where labels read as 32-bit floats are no longer exact"
            ));
        }
        if map.insert(value, class).is_some() {
            return Err(format!("label value {value} is mapped twice"));
        }
    }
    Ok(LabelMap(map))
}

impl Default for ImportOptions {
    fn default() -> Self {
        ImportOptions {
            axis: Axis::Z,
            intensity: Intensity::Percentile(0.5, 99.5),
            only_labelled: false,
            every: 1,
            context: 0,
            label_map: None,
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
    /// Interrupted imports found in OUT at the start (`<volume>_<axis>`, and whether it was
    /// completed or, not yet committed, discarded with the earlier slices kept).
    pub recovered: Vec<(String, Recovery)>,
}

/// What became of an interrupted import of one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Killed after its commit record: its new slices were put in place.
    Completed,
    /// Killed before: its staged slices were removed, the earlier ones are unchanged.
    Discarded,
}

impl fmt::Display for ImportReport {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (what, how) in &self.recovered {
            match how {
                Recovery::Completed => writeln!(f, "completed the interrupted import of {what}")?,
                Recovery::Discarded => writeln!(
                    f,
                    "discarded the unfinished import of {what} (its earlier slices are kept)"
                )?,
            }
        }
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
    Ok(pair_volumes(images, labels, "", ["scan", "label"])?
        .into_iter()
        .map(|(_, scan, label)| (scan, label))
        .collect())
}

/// The volumes of folders `a` and `b` paired by name, `(name, a's, b's)`, sorted; `a_suffix`
/// is cut from the names of `a`'s volumes (a predicted `<name>_seg` is `<name>`), `what`
/// names the two kinds in errors. A volume without a partner is an error naming it.
pub fn pair_volumes(
    a: &Path,
    b: &Path,
    a_suffix: &str,
    what: [&str; 2],
) -> Result<Vec<(String, PathBuf, PathBuf)>> {
    let firsts: BTreeMap<String, PathBuf> = volumes_in(a)?
        .into_iter()
        .map(|(name, path)| {
            (
                name.strip_suffix(a_suffix).unwrap_or(&name).to_string(),
                path,
            )
        })
        .collect();
    let mut seconds = volumes_in(b)?;
    if firsts.is_empty() {
        bail!("{}: no volumes (.nii, .nii.gz, .nrrd, .nhdr)", a.display());
    }
    if let Some((name, path)) = seconds.iter().find(|(n, _)| !firsts.contains_key(*n)) {
        bail!(
            "{}: no {} named `{name}` in {}",
            path.display(),
            what[0],
            a.display()
        );
    }
    firsts
        .into_iter()
        .map(|(name, first)| match seconds.remove(&name) {
            Some(second) => Ok((name, first, second)),
            None => bail!(
                "{}: no {} named `{name}` in {}",
                first.display(),
                what[1],
                b.display()
            ),
        })
        .collect()
}

/// The volume files of `dir` by name (hidden files skipped; two of one name are an error).
pub fn volumes_in(dir: &Path) -> Result<BTreeMap<String, PathBuf>> {
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
/// that this one does not write are removed), within the [`Limits`] of [`Limits::from_env`].
/// Stops at the first bad volume with an error naming it; the volumes before it are imported.
pub fn import(
    pairs: &[(PathBuf, PathBuf)],
    out: &Path,
    opts: &ImportOptions,
) -> Result<ImportReport> {
    import_with(pairs, out, opts, &Limits::from_env()?)
}

/// [`import`] within the given limits.
///
/// Before it writes anything it checks every input is a regular file, takes the lock of `out`
/// (one import at a time), completes or discards the imports into `out` that a kill
/// interrupted, and removes the temporaries of killed writers in `images/` and `masks/`.
pub fn import_with(
    pairs: &[(PathBuf, PathBuf)],
    out: &Path,
    opts: &ImportOptions,
    limits: &Limits,
) -> Result<ImportReport> {
    if opts.every == 0 {
        bail!("--every must be at least 1");
    }
    opts.intensity.check().map_err(|m| anyhow!(m))?;
    crate::rules::context(opts.context).map_err(|m| anyhow!("--context {m}"))?;
    for (scan, label) in pairs {
        volume_stem(scan).ok_or_else(|| unknown_format(scan))?;
        volume_stem(label).ok_or_else(|| unknown_format(label))?;
        ensure_regular_file(scan)?;
        ensure_regular_file(label)?;
    }
    let start = Instant::now();
    let _lock = lock(out)?;
    for sub in ["images", "masks"] {
        let dir = out.join(sub);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        remove_dead_temporaries(&dir)?;
    }
    let recovered = recover(out)?;
    record_slicing(out, opts)?;
    let volumes = pairs
        .iter()
        .map(|(scan, label)| import_pair(scan, label, out, opts, limits))
        .collect::<Result<_>>()?;
    Ok(ImportReport {
        out: out.to_path_buf(),
        volumes,
        seconds: start.elapsed().as_secs_f64(),
        recovered,
    })
}

/// How long `import` waits for the lock of OUT (another import into it finishing).
const LOCK_WAIT: Duration = Duration::from_secs(3);

/// Takes the lock of `out`, waiting up to [`LOCK_WAIT`] for its holder. (A short wait also
/// rides out a lock that outlives its holder's release for an instant: a process forked by
/// another thread shares the lock's open file until it execs.)
fn lock(out: &Path) -> Result<DirLock> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match DirLock::acquire(out) {
            Ok(lock) => return Ok(lock),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn import_pair(
    scan_path: &Path,
    label_path: &Path,
    out: &Path,
    opts: &ImportOptions,
    limits: &Limits,
) -> Result<VolumeReport> {
    let name = volume_stem(scan_path)
        .ok_or_else(|| unknown_format(scan_path))?
        .to_string();
    let (scan, label) = rayon::join(
        || read_volume(scan_path, limits),
        || read_label(label_path, limits, opts.label_map.as_ref()),
    );
    let (scan, (label_dims, label_geometry, classes)) = (scan?, label?);
    let scan_view = Canonical::new(scan_path, scan.dims, &scan.geometry)?;
    let label_view = Canonical::new(label_path, label_dims, &label_geometry)?;
    label_view.check_same_grid(&scan_view, label_path, scan_path)?;
    let grey = opts.intensity.grey(&scan.data, scan_path)?;

    let axis = opts.axis;
    let prefix = format!("{name}_{}", axis.letter());
    let stage = out.join(STAGING).join(&prefix);
    if stage.exists() {
        std::fs::remove_dir_all(&stage)
            .with_context(|| format!("cannot remove {}", stage.display()))?;
    }
    for sub in ["images", "masks"] {
        let dir = stage.join(sub);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let slices = scan_view.slices(axis);
    let kept: Vec<usize> = (0..slices).step_by(opts.every).collect();
    let written: Result<BTreeSet<String>> = kept
        .par_iter()
        .map(|&k| -> Result<Option<String>> {
            let (w, h, mask) = label_view.slice(&classes, axis, k, |c| c);
            if opts.only_labelled && mask.iter().all(|&c| c == 0) {
                return Ok(None);
            }
            let file = slice_file(&name, axis, k);
            let planes = slice_planes(&scan_view, &scan.data, axis, k, opts.context, grey);
            write_grey(
                &stage.join("images").join(&file),
                w,
                planes.len() / w,
                planes,
            )?;
            write_grey(&stage.join("masks").join(&file), w, h, mask)?;
            Ok(Some(file))
        })
        .filter_map(Result::transpose)
        .collect();
    let written = match written {
        Ok(written) => written,
        Err(e) => {
            // not committed: the earlier slices are untouched; drop the partial new set
            let _ = finish(out, &stage);
            return Err(e);
        }
    };
    let removed = commit(out, &prefix, &written)?;
    Ok(VolumeReport {
        name,
        slices,
        written: written.len(),
        removed,
    })
}

/// Writes `OUT/import.json` ([`Slicing`]) before any slice: a data set's slices share one
/// slicing, so an import that would cut them otherwise than the record says is refused while
/// `OUT/images` holds slices (one axis and one intensity mapping per data set). Where it holds
/// slices but no record (imported before records were written), none is written: their
/// slicing is unknown.
fn record_slicing(out: &Path, opts: &ImportOptions) -> Result<()> {
    let slicing = Slicing {
        axis: opts.axis,
        intensity: opts.intensity,
        context: opts.context,
    };
    let has_slices = has_slices(&out.join("images"))?;
    match Slicing::read(out)? {
        Some(recorded) if recorded == slicing => Ok(()),
        Some(recorded) if has_slices => bail!(
            "{}: its slices were imported with {recorded}, this import would cut them with \
             {slicing}; a data set's slices must be cut alike (import into another folder, or \
             remove {} and its slices)",
            out.display(),
            out.join(SLICING_FILE).display()
        ),
        None if has_slices => Ok(()),
        _ => atomic_write(
            &out.join(SLICING_FILE),
            format!("{}\n", serde_json::to_string_pretty(&slicing)?).as_bytes(),
        ),
    }
}

/// Whether `dir` holds a PNG file.
fn has_slices(dir: &Path) -> Result<bool> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        if entry.file_name().to_string_lossy().ends_with(".png") {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The folder of `OUT` where each volume's new slices are staged (`<volume>_<axis>/images`,
/// `…/masks`, and the commit record).
pub const STAGING: &str = ".import-staging";

/// The commit record of a staged import: the `<volume>_<axis>` prefix on its first line, then
/// the file names of the new slice set, one a line.
const COMMIT: &str = "COMMIT";

/// Replaces the slices of `prefix` (`<volume>_<axis>`) in `out` by the set `names` staged in
/// `OUT/.import-staging/<prefix>/`: writes the commit record, then [`apply`]s it, then removes
/// the staging folder. Returns the number of earlier images removed that the new set lacks.
fn commit(out: &Path, prefix: &str, names: &BTreeSet<String>) -> Result<usize> {
    let stage = out.join(STAGING).join(prefix);
    let mut record = format!("{prefix}\n");
    for name in names {
        record.push_str(name);
        record.push('\n');
    }
    atomic_write(&stage.join(COMMIT), record.as_bytes())?;
    let removed = apply(out, &stage, prefix, names)?;
    finish(out, &stage)?;
    Ok(removed)
}

/// Puts a committed staged set in place; safe to repeat after a kill at any point (the
/// recovery runs it again). The order keeps every intermediate state detectable: first all
/// masks of the volume go, so that from then until the last new mask is in, some image of the
/// volume has no mask, and the data-set reader refuses the folder rather than mixing old and
/// new slices; then the new images replace the old ones (renames), the stale images and masks
/// go, and the new masks come in last.
fn apply(out: &Path, stage: &Path, prefix: &str, names: &BTreeSet<String>) -> Result<usize> {
    let (images, masks) = (out.join("images"), out.join("masks"));
    let staged = |sub: &str| -> Result<Vec<String>> {
        let dir = stage.join(sub);
        // a kill inside `finish` (its recursive removal) can leave the record without the
        // staged folders: everything was moved in already, nothing is left to move
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
            if let Some(file) = entry.file_name().to_str().filter(|f| names.contains(*f)) {
                files.push(file.to_string());
            }
        }
        Ok(files)
    };
    let move_in = |sub: &str, files: &[String]| -> Result<()> {
        for file in files {
            let (from, to) = (stage.join(sub).join(file), out.join(sub).join(file));
            std::fs::rename(&from, &to)
                .with_context(|| format!("cannot move {} to {}", from.display(), to.display()))?;
        }
        Ok(())
    };
    let new_images = staged("images")?;
    if !new_images.is_empty() {
        // the images are still staged: no new mask is in yet, every mask here is old
        remove_slices(&masks, prefix, |_| true)?;
        move_in("images", &new_images)?;
    }
    let removed = remove_slices(&images, prefix, |f| !names.contains(f))?;
    remove_slices(&masks, prefix, |f| !names.contains(f))?;
    move_in("masks", &staged("masks")?)?;
    for dir in [&images, &masks] {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(removed)
}

/// Removes a staging folder once its set is in place (and `.import-staging` once empty).
fn finish(out: &Path, stage: &Path) -> Result<()> {
    std::fs::remove_dir_all(stage).with_context(|| format!("cannot remove {}", stage.display()))?;
    let _ = std::fs::remove_dir(out.join(STAGING));
    Ok(())
}

/// Completes the committed imports that a kill interrupted in `out` and discards the staged
/// slices of uncommitted ones (their earlier slices were never touched).
fn recover(out: &Path) -> Result<Vec<(String, Recovery)>> {
    let staging = out.join(STAGING);
    let entries = match std::fs::read_dir(&staging) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", staging.display())),
    };
    let mut done = Vec::new();
    for entry in entries {
        let stage = entry
            .with_context(|| format!("cannot list {}", staging.display()))?
            .path();
        let prefix = stage
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let record = stage.join(COMMIT);
        if !stage.is_dir() {
            std::fs::remove_file(&stage)
                .with_context(|| format!("cannot remove {}", stage.display()))?;
            continue;
        }
        if !record.exists() {
            finish(out, &stage)?;
            done.push((prefix, Recovery::Discarded));
            continue;
        }
        let text = read_text(&record, MAX_TEXT_BYTES, "import commit record")?;
        let mut lines = text.lines();
        let names: BTreeSet<String> = lines.by_ref().skip(1).map(str::to_string).collect();
        let valid = text.lines().next() == Some(prefix.as_str())
            && names.iter().all(|n| is_slice(&prefix, n));
        if !valid {
            bail!(
                "{}: not a commit record of {prefix}; remove {} and import that volume again",
                record.display(),
                stage.display()
            );
        }
        apply(out, &stage, &prefix, &names)?;
        finish(out, &stage)?;
        done.push((prefix, Recovery::Completed));
    }
    Ok(done)
}

/// The file name of slice `k` of volume `name` along `axis`: `<name>_<axis><k:04>.png`.
fn slice_file(name: &str, axis: Axis, k: usize) -> String {
    format!("{name}_{}{k:04}.png", axis.letter())
}

/// Whether `file` is a slice file ([`slice_file`]) of the `<volume>_<axis>` `prefix`.
fn is_slice(prefix: &str, file: &str) -> bool {
    file.strip_prefix(prefix)
        .and_then(|rest| rest.strip_suffix(".png"))
        .is_some_and(|k| k.len() >= 4 && k.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes the slice files of `prefix` in `dir` that `remove` selects; returns their number.
fn remove_slices(dir: &Path, prefix: &str, remove: impl Fn(&str) -> bool) -> Result<usize> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    let mut removed = 0;
    for entry in entries {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let file = entry.file_name();
        let Some(file) = file.to_str() else { continue };
        if is_slice(prefix, file) && remove(file) {
            let path = dir.join(file);
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove the slice {}", path.display()))?;
            removed += 1;
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

/// The window `(lo, hi)` of `intensity` for the scan `data`, or `None` where no voxel is finite.
fn window(data: &[f32], intensity: Intensity) -> Option<(f64, f64)> {
    let hist = Histogram::new(data);
    if hist.count == 0 {
        return None;
    }
    Some(match intensity {
        Intensity::Window(lo, hi) => (lo, hi),
        Intensity::Percentile(p_lo, p_hi) => {
            let rank = |p: f64| (p / 100.0 * (hist.count - 1) as f64).round() as usize;
            let [lo, hi] = hist.ranks(data, [rank(p_lo), rank(p_hi)]);
            if lo < hi {
                (f64::from(lo), f64::from(hi))
            } else {
                let [min, max] = hist.ranks(data, [0, hist.count - 1]);
                (f64::from(min), f64::from(max))
            }
        }
    })
}

/// The finite values of a volume counted by the high 16 bits of their order key: selects
/// values by rank in two passes over the data, without a copy of it (which would be 4 bytes a
/// voxel).
struct Histogram {
    high: Vec<usize>,
    count: usize,
}

/// A key whose unsigned order is the order of `f32::total_cmp`.
fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

fn from_order_key(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7fff_ffff } else { !k })
}

impl Histogram {
    fn new(data: &[f32]) -> Self {
        let high = data
            .par_chunks(1 << 20)
            .fold(
                || vec![0usize; 1 << 16],
                |mut h, chunk| {
                    for &x in chunk.iter().filter(|x| x.is_finite()) {
                        h[(order_key(x) >> 16) as usize] += 1;
                    }
                    h
                },
            )
            .reduce(
                || vec![0usize; 1 << 16],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        let count = high.iter().sum();
        Histogram { high, count }
    }

    /// The finite values of ranks `ranks` (< count) in ascending `total_cmp` order: the bucket
    /// of each from the histogram, then its low 16 bits from a histogram of that bucket.
    fn ranks(&self, data: &[f32], ranks: [usize; 2]) -> [f32; 2] {
        let locate = |counts: &[usize], mut r: usize| {
            let mut i = 0;
            while r >= counts[i] {
                r -= counts[i];
                i += 1;
            }
            (i as u32, r)
        };
        let at = ranks.map(|r| locate(&self.high, r));
        let buckets = [at[0].0, at[1].0];
        let mut low = [vec![0usize; 1 << 16], vec![0usize; 1 << 16]];
        for &x in data.iter().filter(|x| x.is_finite()) {
            let k = order_key(x);
            for (b, l) in buckets.iter().zip(low.iter_mut()) {
                if k >> 16 == *b {
                    l[(k & 0xffff) as usize] += 1;
                }
            }
        }
        [0, 1].map(|i| {
            let (bits, _) = locate(&low[i], at[i].1);
            from_order_key(buckets[i] << 16 | bits)
        })
    }
}
