//! Volumes out: label and probability volumes written as NIfTI-1 (`.nii.gz`) on a scan's own
//! voxel grid, so that viewers, nibabel and ITK overlay them on the scan voxel for voxel.

use std::path::Path;

use anyhow::{anyhow, Result};
use nalgebra::Matrix4;
use ndarray::{Array, ShapeBuilder};
use nifti::writer::WriterOptions;
use nifti::{DataElement, NiftiHeader, XForm};

use super::volume::Geometry;
use crate::fsutil::atomic_write_with;

/// `xyzt_units`: millimetres (NIFTI_UNITS_MM), no time unit.
const UNITS_MM: u8 = 2;

/// The NIfTI header of volumes on the grid of the scan `path` (of `geometry`, as read): a
/// NIfTI scan's own header, whose sform, qform (codes included), pixdim and units are kept
/// as they are; for an NRRD scan, its space directions and origin converted from LPS to RAS
/// as the sform and the qform (both code 1, scanner coordinates).
pub fn grid_header(path: &Path, geometry: &Geometry) -> Result<NiftiHeader> {
    let mut header = match super::split_name(path).map(|(_, ext)| ext) {
        Some(".nii" | ".nii.gz") => {
            let scan = super::nifti::read_header(path)?;
            NiftiHeader {
                intent_code: 0,
                intent_p1: 0.0,
                intent_p2: 0.0,
                intent_p3: 0.0,
                intent_name: [0; 16],
                cal_min: 0.0,
                cal_max: 0.0,
                aux_file: [0; 24],
                ..scan
            }
        }
        _ => {
            // LPS → RAS: x and y change sign
            let ras = |v: [f64; 3]| [-v[0], -v[1], v[2]];
            let (axes, origin) = (geometry.axes.map(ras), ras(geometry.origin));
            let affine = Matrix4::from_fn(|r, c| match (r, c) {
                (3, 3) => 1.0,
                (3, _) => 0.0,
                (_, 3) => origin[r],
                _ => axes[c][r],
            });
            let mut h = NiftiHeader {
                xyzt_units: UNITS_MM,
                ..NiftiHeader::default()
            };
            h.set_sform(&affine, XForm::ScannerAnat);
            h.set_qform(&affine, XForm::ScannerAnat);
            h
        }
    };
    header.descrip = Vec::new();
    Ok(header)
}

/// Writes `data` (voxel `(i, j, k)` at `i + nx·(j + ny·k)`, of `dims`) as a gzipped NIfTI-1
/// file with `header`'s geometry, atomically ([`atomic_write_with`]); `description` goes into
/// `descrip` (at most 80 bytes).
pub fn write_nifti<T: DataElement + bytemuck::Pod>(
    path: &Path,
    header: &NiftiHeader,
    dims: [usize; 3],
    data: Vec<T>,
    description: &str,
) -> Result<()> {
    let mut header = header.clone();
    header.set_description(description.as_bytes().to_vec())?;
    let array = Array::from_shape_vec((dims[0], dims[1], dims[2]).f(), data)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    atomic_write_with(path, ".nii.gz", |tmp| {
        WriterOptions::new(tmp)
            .reference_header(&header)
            .write_nifti(&array)
            .map_err(|e| anyhow!("{e}"))
    })
}
