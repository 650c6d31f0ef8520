//! NIfTI-1 volumes (`.nii`, `.nii.gz`) through the `nifti` crate.

use std::io::ErrorKind;
use std::path::Path;

use anyhow::{anyhow, bail, Result};
use nifti::{IntoNdArray, NiftiError, NiftiHeader, NiftiObject, ReaderOptions};

use super::volume::{Geometry, Space, Volume};

/// Reads a 3-D NIfTI volume (a 4th and higher dimension of size 1 is dropped), values scaled by
/// `scl_slope`/`scl_inter`, with its geometry from the sform if `sform_code > 0`, else the
/// qform if `qform_code > 0`, else `pixdim` along the RAS axes.
pub fn read(path: &Path) -> Result<Volume> {
    let obj = ReaderOptions::new()
        .read_file(path)
        .map_err(|e| anyhow!("{}: not a readable NIfTI file ({})", path.display(), why(e)))?;
    let header = obj.header();
    let rank = header.dim[0] as usize;
    if !(3..=7).contains(&rank) {
        bail!(
            "{}: {rank}-D image (dim[0] = {rank}); only 3-D volumes can be imported",
            path.display()
        );
    }
    if let Some(d) = (4..=rank).find(|&d| header.dim[d] > 1) {
        bail!(
            "{}: dim[{d}] = {} (a {rank}-D series); only 3-D volumes can be imported",
            path.display(),
            header.dim[d]
        );
    }
    let dims = [1, 2, 3].map(|d| header.dim[d] as usize);
    if dims.contains(&0) {
        bail!("{}: a dimension is 0 ({:?})", path.display(), dims);
    }
    let geometry = geometry(header);
    let array = obj
        .into_volume()
        .into_ndarray::<f32>()
        .map_err(|e| anyhow!("{}: cannot read the voxels ({})", path.display(), why(e)))?;
    // into_ndarray keeps the file's order, x fastest (the transpose is row-major): the layout
    // of `Volume`, so the buffer is taken as it is
    anyhow::ensure!(
        array.t().is_standard_layout(),
        "{}: voxels not in file order",
        path.display()
    );
    let (data, _) = array.into_raw_vec_and_offset();
    Ok(Volume {
        dims,
        data,
        geometry,
    })
}

/// The crate's error in words (its I/O errors otherwise print as debug output).
fn why(e: NiftiError) -> String {
    match e {
        NiftiError::Io(e) if e.kind() == ErrorKind::UnexpectedEof => format!("truncated: {e}"),
        NiftiError::Io(e) => e.to_string(),
        NiftiError::IncompatibleLength(got, want) => {
            format!("truncated: {got} bytes of voxel data where the header needs {want}")
        }
        e => e.to_string(),
    }
}

/// Spacing along voxel axis `a` (`pixdim[a + 1]`; 1 where it is not positive, as nifti1_io).
fn pixdim(h: &NiftiHeader, a: usize) -> f64 {
    let p = h.pixdim[a + 1] as f64;
    if p > 0.0 {
        p
    } else {
        1.0
    }
}

fn geometry(h: &NiftiHeader) -> Geometry {
    if h.sform_code > 0 {
        let rows = [h.srow_x, h.srow_y, h.srow_z].map(|r| r.map(f64::from));
        let axes = [0, 1, 2].map(|a| rows.map(|r| r[a]));
        Geometry::new(axes, rows.map(|r| r[3]), Space::Ras)
    } else if h.qform_code > 0 {
        // R from the unit quaternion (a, b, c, d), a = √(1 − b² − c² − d²); axis a of the
        // voxels is column a of R times pixdim, the last one times qfac = sign(pixdim[0])
        let [b, c, d] = [h.quatern_b, h.quatern_c, h.quatern_d].map(f64::from);
        let a = (1.0 - b * b - c * c - d * d).max(0.0).sqrt();
        let r = [
            [
                a * a + b * b - c * c - d * d,
                2.0 * (b * c - a * d),
                2.0 * (b * d + a * c),
            ],
            [
                2.0 * (b * c + a * d),
                a * a + c * c - b * b - d * d,
                2.0 * (c * d - a * b),
            ],
            [
                2.0 * (b * d - a * c),
                2.0 * (c * d + a * b),
                a * a + d * d - c * c - b * b,
            ],
        ];
        let qfac = if h.pixdim[0] < 0.0 { -1.0 } else { 1.0 };
        let axes = [0, 1, 2].map(|i| {
            let s = pixdim(h, i) * if i == 2 { qfac } else { 1.0 };
            r.map(|row| row[i] * s)
        });
        let origin = [h.quatern_x, h.quatern_y, h.quatern_z].map(f64::from);
        Geometry::new(axes, origin, Space::Ras)
    } else {
        Geometry::scaled([0, 1, 2].map(|a| pixdim(h, a)), Space::Ras)
    }
}
