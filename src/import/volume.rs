//! The volume model: voxels, their place in space, and the canonical (LPS) view used to slice.

use std::path::Path;

use anyhow::{bail, Result};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
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
    /// in errors (an affine with a zero or non-finite axis).
    pub fn new(path: &Path, dims: [usize; 3], g: &Geometry) -> Result<Self> {
        let spacing = g.spacing();
        if let Some(a) = (0..3).find(|&a| !(spacing[a].is_finite() && spacing[a] > 0.0)) {
            bail!(
                "{}: voxel axis {a} has length {} in the affine; cannot orient the volume",
                path.display(),
                spacing[a]
            );
        }
        if !g.origin.iter().all(|o| o.is_finite()) {
            bail!(
                "{}: the origin {:?} is not finite",
                path.display(),
                g.origin
            );
        }
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

    /// Slice `k` along `axis` of the stored `data`, mapped through `f`, as (width, height,
    /// row-major pixels).
    pub fn slice<T: Copy, U>(
        &self,
        data: &[T],
        axis: Axis,
        k: usize,
        f: impl Fn(T) -> U,
    ) -> (usize, usize, Vec<U>) {
        let (s, col, row, reversed) = axis.plane();
        let (w, h) = (self.dims[col], self.dims[row]);
        let base = self.offset + k as isize * self.strides[s];
        let mut out = Vec::with_capacity(w * h);
        for r in 0..h {
            let r = if reversed { h - 1 - r } else { r };
            let start = base + r as isize * self.strides[row];
            out.extend((0..w).map(|c| f(data[(start + c as isize * self.strides[col]) as usize])));
        }
        (w, h, out)
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
