//! The volume model: voxels, their place in space, and the canonical (LPS) view used to slice.

use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, Result};

/// Voxel axes and origin in patient coordinates, LPS, millimetres: voxel `(i, j, k)` lies at
/// `origin + i·axes[0] + j·axes[1] + k·axes[2]`. `|axes[a]|` is the spacing of voxel axis `a`,
/// `axes[a] / |axes[a]|` its direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Geometry {
    pub axes: [[f64; 3]; 3],
    pub origin: [f64; 3],
}

/// The anatomical meaning of a file's coordinates: which way x, y and z grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// x → right, y → anterior, z → superior (NIfTI).
    Ras,
    /// x → left, y → anterior, z → superior.
    Las,
    /// x → left, y → posterior, z → superior (DICOM, ITK).
    Lps,
}

impl Geometry {
    /// Converts axes and origin given in `space` coordinates to LPS.
    pub fn new(axes: [[f64; 3]; 3], origin: [f64; 3], space: Space) -> Self {
        let sign = match space {
            Space::Ras => [-1.0, -1.0, 1.0],
            Space::Las => [1.0, -1.0, 1.0],
            Space::Lps => [1.0, 1.0, 1.0],
        };
        let to_lps = |v: [f64; 3]| [v[0] * sign[0], v[1] * sign[1], v[2] * sign[2]];
        Geometry {
            axes: axes.map(to_lps),
            origin: to_lps(origin),
        }
    }

    /// Voxel axes along the coordinate axes of `space`, with the given spacing, origin 0.
    pub fn scaled(spacing: [f64; 3], space: Space) -> Self {
        let mut axes = [[0.0; 3]; 3];
        for (a, s) in spacing.into_iter().enumerate() {
            axes[a][a] = s;
        }
        Geometry::new(axes, [0.0; 3], space)
    }

    /// Checks that the geometry can orient a volume: finite voxel axes of non-zero length that
    /// are independent (no two along the same line), and a finite origin. `field` names the
    /// header field(s) they come from, for the error.
    pub fn check(&self, field: &str) -> Result<()> {
        let spacing = self.spacing();
        if let Some(a) = (0..3).find(|&a| !(spacing[a].is_finite() && spacing[a] > 0.0)) {
            bail!(
                "voxel axis {a} has length {} ({field}); cannot orient the volume",
                spacing[a]
            );
        }
        if !self.origin.iter().all(|o| o.is_finite()) {
            bail!("the origin {:?} is not finite ({field})", self.origin);
        }
        let dir = self.directions();
        // the unit directions span a box of volume |det| ≤ 1: about 0 where two axes (nearly)
        // coincide, which no permutation and flips can orient
        let det = dir[0][0] * (dir[1][1] * dir[2][2] - dir[1][2] * dir[2][1])
            - dir[0][1] * (dir[1][0] * dir[2][2] - dir[1][2] * dir[2][0])
            + dir[0][2] * (dir[1][0] * dir[2][1] - dir[1][1] * dir[2][0]);
        if det.abs() < 1e-6 {
            bail!(
                "the voxel axes {} are not independent (two of them point the same way; \
                 {field}); cannot orient the volume",
                dir.map(fmt3).join(" ")
            );
        }
        Ok(())
    }

    pub fn spacing(&self) -> [f64; 3] {
        self.axes.map(norm)
    }

    /// Unit direction of each voxel axis.
    pub fn directions(&self) -> [[f64; 3]; 3] {
        self.axes.map(|v| {
            let n = norm(v);
            v.map(|c| c / n)
        })
    }
}

fn norm(v: [f64; 3]) -> f64 {
    v.iter().map(|c| c * c).sum::<f64>().sqrt()
}

/// Bounds on what `import` reads, checked from the header before any voxel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest volume read, in voxels (`--max-voxels`; [`DEFAULT_MAX_VOXELS`]). A volume takes
    /// 4 bytes a voxel as f32 (the scan) or 1 (the label) once read; import holds one scan and
    /// its label at a time, so its peak memory is about 5 bytes × this (1.25 GiB at the
    /// default) plus the slices being encoded.
    pub max_voxels: u64,
}

/// The default of [`Limits::max_voxels`]: 2^28 voxels (e.g. 512×512×1024).
pub const DEFAULT_MAX_VOXELS: u64 = 1 << 28;

/// The environment variable that sets [`Limits::max_voxels`] where no flag does.
pub const MAX_VOXELS_ENV: &str = "SEGTRAIN_IMPORT_MAX_VOXELS";

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_voxels: DEFAULT_MAX_VOXELS,
        }
    }
}

impl Limits {
    /// The default limits, with `max_voxels` from [`MAX_VOXELS_ENV`] where it is set.
    pub fn from_env() -> Result<Self> {
        match std::env::var(MAX_VOXELS_ENV) {
            Err(std::env::VarError::NotPresent) => Ok(Limits::default()),
            Ok(s) => match s.trim().parse::<u64>() {
                Ok(n) if n > 0 => Ok(Limits { max_voxels: n }),
                _ => bail!("{MAX_VOXELS_ENV}=`{s}`: need a voxel count > 0"),
            },
            Err(e) => bail!("{MAX_VOXELS_ENV}: {e}"),
        }
    }

    /// The voxel count of a volume of `dims`, or an error when it is above
    /// [`Limits::max_voxels`] (or overflows).
    pub(super) fn voxels(&self, dims: [u64; 3]) -> Result<usize> {
        let n = dims.iter().try_fold(1u64, |n, &d| n.checked_mul(d));
        match n.filter(|&n| n <= self.max_voxels) {
            Some(n) => usize::try_from(n).map_err(|_| anyhow!("{n} voxels: too many to address")),
            None => bail!(
                "{}×{}×{} = {} voxels, more than --max-voxels {} (the largest volume import \
                 reads; raise --max-voxels or {MAX_VOXELS_ENV} for a larger one)",
                dims[0],
                dims[1],
                dims[2],
                n.map_or("over 2^64".to_string(), |n| n.to_string()),
                self.max_voxels
            ),
        }
    }
}

/// Where a reader puts the voxel values it decodes, in file order (x fastest): an f32 buffer
/// for a scan, class indices for a label.
pub(super) trait Sink {
    /// Called once, before any value, with the volume's size; `exact`: the file is known to
    /// hold all the voxels, so the whole buffer may be allocated at once (else it grows as
    /// values arrive, and a short file fails before a large allocation).
    fn start(&mut self, dims: [usize; 3], exact: bool) -> Result<()>;
    fn push(&mut self, values: &[f32]) -> Result<()>;
}

/// Room in `v` for `more` values of at most `total`: all at once where `exact`, else doubling
/// (from 1 Mi values), never past `total`. An allocation failure is an error, not an abort.
pub(super) fn grow<T>(v: &mut Vec<T>, more: usize, total: usize, exact: bool) -> Result<()> {
    let need = v.len() + more;
    if need <= v.capacity() {
        return Ok(());
    }
    let target = match exact {
        true => total.max(need),
        false => (v.capacity() * 2).max(1 << 20).clamp(need, total.max(need)),
    };
    v.try_reserve_exact(target - v.len()).map_err(|_| {
        anyhow!(
            "cannot allocate memory for {target} voxels ({} bytes)",
            target * std::mem::size_of::<T>()
        )
    })
}

/// A scan's voxels as f32.
#[derive(Default)]
pub(super) struct Values {
    pub data: Vec<f32>,
    total: usize,
    exact: bool,
}

impl Sink for Values {
    fn start(&mut self, dims: [usize; 3], exact: bool) -> Result<()> {
        self.total = dims.iter().product();
        self.exact = exact;
        grow(&mut self.data, 0, self.total, exact)
    }

    fn push(&mut self, values: &[f32]) -> Result<()> {
        grow(&mut self.data, values.len(), self.total, self.exact)?;
        self.data.extend_from_slice(values);
        Ok(())
    }
}

/// A label's voxels as class indices: without a map, a value that is not an integer in
/// 0..=255 (NaN included) is an error naming the value and its voxel; with a map, any integer
/// is allowed and mapped (values the map does not name become 0).
#[derive(Default)]
pub(super) struct Classes<'a> {
    pub data: Vec<u8>,
    dims: [usize; 3],
    exact: bool,
    map: Option<&'a super::LabelMap>,
}

impl<'a> Classes<'a> {
    pub fn new(map: Option<&'a super::LabelMap>) -> Self {
        Self {
            map,
            ..Self::default()
        }
    }
}

impl Sink for Classes<'_> {
    fn start(&mut self, dims: [usize; 3], exact: bool) -> Result<()> {
        self.dims = dims;
        self.exact = exact;
        grow(&mut self.data, 0, dims.iter().product(), exact)
    }

    fn push(&mut self, values: &[f32]) -> Result<()> {
        let total = self.dims.iter().product();
        grow(&mut self.data, values.len(), total, self.exact)?;
        for &v in values {
            if let Some(map) = self.map {
                // voxels arrive as f32, exact for integers up to 2^24 only: larger labels
                // could merge with their neighbours, so they are refused, never guessed
                let why = if !(v.is_finite() && v.fract() == 0.0) {
                    Some("is not an integer")
                } else if v.abs() > super::MAX_MAPPED_LABEL as f32 {
                    Some("is beyond 2^24, where labels read as 32-bit floats are no longer exact (renumber the atlas)")
                } else {
                    None
                };
                if let Some(why) = why {
                    let i = self.data.len();
                    let [nx, ny, _] = self.dims;
                    bail!(
                        "label value {v} at voxel ({}, {}, {}) {why}",
                        i % nx,
                        i / nx % ny,
                        i / (nx * ny)
                    );
                }
                self.data.push(map.class_of(v as i64));
                continue;
            }
            if !((0.0..=255.0).contains(&v) && f32::from(v as u8) == v) {
                let i = self.data.len();
                let [nx, ny, _] = self.dims;
                bail!(
                    "label value {v} at voxel ({}, {}, {}) is not a class index (an integer \
                     0..=255)",
                    i % nx,
                    i / nx % ny,
                    i / (nx * ny)
                );
            }
            self.data.push(v as u8);
        }
        Ok(())
    }
}

/// The binary voxel types of NIfTI and NRRD.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Scalar {
    I8,
    U8,
    I16,
    U16,
    I32,
    U32,
    I64,
    U64,
    F32,
    F64,
}

/// Bytes decoded per chunk (a multiple of every scalar size).
const CHUNK_BYTES: usize = 1 << 16;

impl Scalar {
    pub fn size(self) -> usize {
        match self {
            Scalar::I8 | Scalar::U8 => 1,
            Scalar::I16 | Scalar::U16 => 2,
            Scalar::I32 | Scalar::U32 | Scalar::F32 => 4,
            Scalar::I64 | Scalar::U64 | Scalar::F64 => 8,
        }
    }

    /// Appends the values of `bytes` (a whole number of voxels) to `out`, as f32.
    pub fn decode(self, bytes: &[u8], big_endian: bool, out: &mut Vec<f32>) {
        macro_rules! decode {
            ($t:ty) => {{
                const N: usize = std::mem::size_of::<$t>();
                out.extend(bytes.chunks_exact(N).map(|c| {
                    let b: [u8; N] = c.try_into().expect("N bytes");
                    let v = if big_endian {
                        <$t>::from_be_bytes(b)
                    } else {
                        <$t>::from_le_bytes(b)
                    };
                    v as f32
                }))
            }};
        }
        match self {
            Scalar::I8 => decode!(i8),
            Scalar::U8 => decode!(u8),
            Scalar::I16 => decode!(i16),
            Scalar::U16 => decode!(u16),
            Scalar::I32 => decode!(i32),
            Scalar::U32 => decode!(u32),
            Scalar::I64 => decode!(i64),
            Scalar::U64 => decode!(u64),
            Scalar::F32 => decode!(f32),
            Scalar::F64 => decode!(f64),
        }
    }
}

/// Reads exactly `n` voxels of type `scalar` from `source` in chunks, maps each value through
/// `map` (e.g. NIfTI scaling) and pushes them to `sink`: memory beyond the sink's buffer is
/// one chunk, and no byte past the voxels is read (a bounded read of a compressed stream).
/// Returns the number of bytes read: less than the voxels need where the source ends early
/// (the caller's "truncated" error); read errors pass through.
pub(super) fn read_voxels(
    source: &mut dyn Read,
    scalar: Scalar,
    big_endian: bool,
    n: usize,
    map: impl Fn(f32) -> f32,
    sink: &mut dyn Sink,
) -> std::io::Result<ReadOutcome> {
    let size = scalar.size();
    let total = n * size;
    let mut buf = vec![0u8; CHUNK_BYTES.min(total)];
    let mut values = Vec::with_capacity(buf.len() / size);
    let mut done = 0;
    while done < total {
        let want = (total - done).min(buf.len());
        let mut got = 0;
        while got < want {
            match source.read(&mut buf[got..want]) {
                Ok(0) => return Ok(ReadOutcome::Short(done + got)),
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        values.clear();
        scalar.decode(&buf[..want], big_endian, &mut values);
        for v in &mut values {
            *v = map(*v);
        }
        if let Err(e) = sink.push(&values) {
            return Ok(ReadOutcome::Refused(e));
        }
        done += want;
    }
    Ok(ReadOutcome::Complete)
}

/// How [`read_voxels`] ended.
pub(super) enum ReadOutcome {
    Complete,
    /// The source ended after this many bytes.
    Short(usize),
    /// The sink refused a value (a label that is not a class index) or memory ran out.
    Refused(anyhow::Error),
}

/// A 3-D scalar volume: voxel `(i, j, k)` is `data[i + nx·(j + ny·k)]`.
#[derive(Debug, Clone)]
pub struct Volume {
    pub dims: [usize; 3],
    pub data: Vec<f32>,
    pub geometry: Geometry,
}

/// The volume seen in the canonical orientation LPS: canonical axis 0 grows towards the
/// patient's left, 1 towards posterior, 2 towards superior. Each canonical axis is the stored
/// voxel axis nearest to it, read forwards or backwards (permutation and flips only; an oblique
/// volume is not resampled). Canonical voxel `c` is stored at `offset + Σ c[a]·strides[a]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Canonical {
    pub dims: [usize; 3],
    strides: [isize; 3],
    offset: isize,
    /// The geometry of the canonical voxel grid (equal for grids that coincide in space).
    pub geometry: Geometry,
}

/// Grids agree when spacings differ by at most this fraction, direction cosines by at most
/// this much, and origins by at most this fraction of the smallest spacing.
const GRID_TOLERANCE: f64 = 1e-3;

/// Which way an image slice is read off the canonical volume.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Axis {
    /// Sagittal slices (along left–right).
    X,
    /// Coronal slices (along anterior–posterior).
    Y,
    /// Axial slices (along inferior–superior).
    Z,
}

impl Axis {
    pub fn letter(self) -> char {
        match self {
            Axis::X => 'x',
            Axis::Y => 'y',
            Axis::Z => 'z',
        }
    }

    /// (slice axis, column axis, row axis, rows reversed), as canonical axes.
    /// Axial: columns R→L, rows A→P (radiological view); coronal: columns R→L, superior at top;
    /// sagittal: columns A→P, superior at top.
    fn plane(self) -> (usize, usize, usize, bool) {
        match self {
            Axis::X => (0, 1, 2, true),
            Axis::Y => (1, 0, 2, true),
            Axis::Z => (2, 0, 1, false),
        }
    }
}

impl Canonical {
    /// The canonical view of a volume of `dims` voxels with geometry `g`. `path` names the file
    /// in errors (an affine that fails [`Geometry::check`]).
    pub fn new(path: &Path, dims: [usize; 3], g: &Geometry) -> Result<Self> {
        g.check("in the affine")
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let dir = g.directions();
        // greedy: the largest |cosine| among free (voxel axis, canonical axis) pairs first
        let (mut from, mut flip) = ([usize::MAX; 3], [false; 3]);
        for _ in 0..3 {
            let (mut best, mut at) = (-1.0, (0, 0));
            for (v, d) in dir.iter().enumerate() {
                for (c, x) in d.iter().enumerate() {
                    if !from.contains(&v) && from[c] == usize::MAX && x.abs() > best {
                        (best, at) = (x.abs(), (v, c));
                    }
                }
            }
            from[at.1] = at.0;
            flip[at.1] = dir[at.0][at.1] < 0.0;
        }
        let stored_strides = [1, dims[0] as isize, (dims[0] * dims[1]) as isize];
        let mut out = Canonical {
            dims: from.map(|v| dims[v]),
            strides: [0; 3],
            offset: 0,
            geometry: Geometry {
                axes: [[0.0; 3]; 3],
                origin: g.origin,
            },
        };
        for c in 0..3 {
            let (v, n) = (from[c], out.dims[c]);
            let sign = if flip[c] { -1.0 } else { 1.0 };
            out.strides[c] = sign as isize * stored_strides[v];
            out.geometry.axes[c] = g.axes[v].map(|x| sign * x);
            if flip[c] {
                // canonical voxel 0 is the last stored one along this axis
                out.offset += (n as isize - 1) * stored_strides[v];
                for (o, x) in out.geometry.origin.iter_mut().zip(g.axes[v]) {
                    *o += (n as f64 - 1.0) * x;
                }
            }
        }
        Ok(out)
    }

    /// Number of slices along `axis`.
    pub fn slices(&self, axis: Axis) -> usize {
        self.dims[axis.plane().0]
    }

    /// The (width, height) of a slice along `axis`.
    pub fn slice_size(&self, axis: Axis) -> (usize, usize) {
        let (_, col, row, _) = axis.plane();
        (self.dims[col], self.dims[row])
    }

    /// The stored index of each pixel of slice `k` along `axis`, in row-major order.
    fn slice_indices(&self, axis: Axis, k: usize) -> impl Iterator<Item = usize> + '_ {
        let (s, col, row, reversed) = axis.plane();
        let (w, h) = self.slice_size(axis);
        let base = self.offset + k as isize * self.strides[s];
        (0..h).flat_map(move |r| {
            let r = if reversed { h - 1 - r } else { r };
            let start = base + r as isize * self.strides[row];
            (0..w).map(move |c| (start + c as isize * self.strides[col]) as usize)
        })
    }

    /// Slice `k` along `axis` of the stored `data`, mapped through `f`, as (width, height,
    /// row-major pixels).
    pub fn slice<T: Copy, U>(
        &self,
        data: &[T],
        axis: Axis,
        k: usize,
        f: impl Fn(T) -> U,
    ) -> (usize, usize, Vec<U>) {
        let (w, h) = self.slice_size(axis);
        let out = self.slice_indices(axis, k).map(|i| f(data[i])).collect();
        (w, h, out)
    }

    /// The stored `data` in canonical order: canonical voxel `(c0, c1, c2)` at
    /// `c0 + n0·(c1 + n1·c2)`.
    pub fn reorder<T: Copy>(&self, data: &[T]) -> Vec<T> {
        let [n0, n1, n2] = self.dims;
        let mut out = Vec::with_capacity(n0 * n1 * n2);
        for c2 in 0..n2 as isize {
            for c1 in 0..n1 as isize {
                let start = self.offset + c1 * self.strides[1] + c2 * self.strides[2];
                out.extend(
                    (0..n0 as isize).map(|c0| data[(start + c0 * self.strides[0]) as usize]),
                );
            }
        }
        out
    }

    /// Writes the row-major `pixels` of slice `k` along `axis` into the stored `data`: the
    /// inverse of [`Canonical::slice`].
    pub fn put_slice<T: Copy>(&self, data: &mut [T], axis: Axis, k: usize, pixels: &[T]) {
        for (i, &p) in self.slice_indices(axis, k).zip(pixels) {
            data[i] = p;
        }
    }

    /// Checks that `label` (this view) and `scan` (`other`) cover the same voxels in space:
    /// equal sizes, and spacing, direction and origin within [`GRID_TOLERANCE`].
    pub fn check_same_grid(&self, other: &Canonical, label: &Path, scan: &Path) -> Result<()> {
        let (a, b) = (&self.geometry, &other.geometry);
        let (sa, sb) = (a.spacing(), b.spacing());
        let min_spacing = sa.iter().chain(&sb).cloned().fold(f64::INFINITY, f64::min);
        let differs = |x: &[f64], y: &[f64], tol: &dyn Fn(f64, f64) -> f64| {
            x.iter().zip(y).any(|(p, q)| (p - q).abs() > tol(*p, *q))
        };
        let rel = |p: f64, q: f64| GRID_TOLERANCE * p.abs().max(q.abs());
        let property = if self.dims != other.dims {
            Some(("size", fmt_usize(self.dims), fmt_usize(other.dims)))
        } else if differs(&sa, &sb, &rel) {
            Some(("spacing", fmt3(sa), fmt3(sb)))
        } else if differs(
            a.directions().as_flattened(),
            b.directions().as_flattened(),
            &|_, _| GRID_TOLERANCE,
        ) {
            let d = |g: &Geometry| g.directions().map(fmt3).join(" ");
            Some(("direction", d(a), d(b)))
        } else if differs(&a.origin, &b.origin, &|_, _| GRID_TOLERANCE * min_spacing) {
            Some(("origin", fmt3(a.origin), fmt3(b.origin)))
        } else {
            None
        };
        match property {
            None => Ok(()),
            Some((what, l, s)) => bail!(
                "{} and {}: the label's grid differs from the scan's in {what}: {l} vs {s} \
                 (in the canonical LPS orientation)",
                label.display(),
                scan.display()
            ),
        }
    }
}

fn fmt3(v: [f64; 3]) -> String {
    // rounded first, so that −0.00001 prints as 0.0000 (+ 0.0 turns −0 into 0)
    let v = v.map(|x| (x * 1e4).round() / 1e4 + 0.0);
    format!("({:.4}, {:.4}, {:.4})", v[0], v[1], v[2])
}

fn fmt_usize(v: [usize; 3]) -> String {
    format!("{}×{}×{}", v[0], v[1], v[2])
}
